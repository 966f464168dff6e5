"""The README cannot go stale: every command in it is run here, or parsed where it needs hardware.

Every fenced ```bash block of README.md is split into commands (backslash continuations joined,
comments dropped, ``&&`` / ``;`` chains split). Each command is either

* **run** — ``sparsefl ...`` through ``fl_core.cli.main`` in a scratch directory (the README's
  relative paths such as ``runs/demo/...`` resolve there), with ``SPARSEFL_HOME`` in it, against
  an emulated board (the real agent on a pseudo-terminal) wherever the README names a board's
  port, and with reduced settings where the real thing takes minutes (the demo gets 2 rounds
  and 1 local epoch; BENCH fewer repeats); or
* **allow-listed** (``ALLOWED``: it needs a Raspberry Pi, root, the network, or it is this test
  suite itself), each with its reason, and even then ``python -m embedded.agent ...`` and
  ``python benchmarks/...`` commands are parsed by their real argparse parser, and the install
  commands must be the ones ``.ci/run`` really runs.

A command that is neither fails ``test_every_readme_command_is_known``. ```python blocks are
executed; ```toml blocks preceded by ``<!-- file: NAME -->`` are written to NAME (the commands
use them) and must load as run configs. Inline ``sparsefl ...`` / ``python benchmarks/...``
code in the prose must name real subcommands and options.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import runpy
import shlex
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
#: the port the README gives a board on the host; an emulated board's pty replaces it
README_PORT = "/dev/ttyACM0"


# ------------------------------------------------------------------------------ parsing README
@dataclass(frozen=True)
class Command:
    """One command of a fenced block: its text, its tokens, and where it is."""

    text: str
    argv: tuple[str, ...]
    line: int

    @property
    def id(self) -> str:
        return f"L{self.line}:{self.text[:60]}"


def fenced_blocks(lang: str, text: str | None = None) -> list[tuple[int, str, str]]:
    """``(first line number, body, the line before the fence)`` of every ```lang block."""
    lines = (README.read_text("utf-8") if text is None else text).splitlines()
    out, i = [], 0
    while i < len(lines):
        if lines[i].strip() == f"```{lang}":
            j = i + 1
            while j < len(lines) and lines[j].strip() != "```":
                j += 1
            out.append((i + 2, "\n".join(lines[i + 1:j]), lines[i - 1] if i else ""))
            i = j
        i += 1
    return out


def split_commands(body: str, first_line: int) -> list[Command]:
    """The commands of a shell block: continuations joined, comments dropped, chains split."""
    cmds: list[Command] = []
    buf, start = "", first_line
    for k, raw in enumerate(body.splitlines()):
        if not buf:
            start = first_line + k
        buf += raw
        if buf.rstrip().endswith("\\"):
            buf = buf.rstrip()[:-1] + " "
            continue
        tokens = shlex.split(buf, comments=True)
        part: list[str] = []
        for t in [*tokens, "&&"]:
            if t in ("&&", ";"):
                if part:
                    cmds.append(Command(shlex.join(part), tuple(part), start))
                part = []
            else:
                part.append(t)
        buf = ""
    return cmds


def readme_commands() -> list[Command]:
    return [c for line, body, _ in fenced_blocks("bash") for c in split_commands(body, line)]


# ------------------------------------------------------------------------------ allow-list
def _ci_runs(cmd: Command) -> None:
    """The install commands are what CI runs on a clean checkout."""
    ci = (ROOT / ".ci" / "run").read_text("utf-8").splitlines()
    assert cmd.text in [shlex.join(shlex.split(s, comments=True)) for s in ci if s.strip()], \
        f"README's {cmd.text!r} is not a command of .ci/run"


def _packaging_builds_the_wheel(cmd: Command) -> None:
    src = (ROOT / "tests" / "test_packaging.py").read_text("utf-8")
    assert '"wheel", "--no-deps"' in src and '"install"' in src, \
        "tests/test_packaging.py no longer builds and installs the wheel"
    assert cmd.argv[:2] in (("pip", "wheel"), ("pip", "install"))


def _tox_env(cmd: Command) -> None:
    import configparser

    ini = configparser.ConfigParser()
    ini.read(ROOT / "tox.ini")
    env = cmd.argv[2]
    assert ini.has_section(f"testenv:{env}"), f"tox.ini has no [testenv:{env}]"
    if env == "bench":         # its commands are benchmark commands with valid arguments
        for line in ini.get("testenv:bench", "commands").splitlines():
            if line.strip():
                parse_benchmark(shlex.split(line))


def _pytest_args(cmd: Command) -> None:
    args = list(cmd.argv[1:])
    if "-m" in args:
        expr = args[args.index("-m") + 1]
        import tomllib

        markers = tomllib.loads((ROOT / "pyproject.toml").read_text("utf-8"))["tool"]["pytest"][
            "ini_options"]["markers"]
        names = {m.split(":")[0] for m in markers}
        for word in re.findall(r"[A-Za-z_]+", expr):
            assert word in names | {"not", "and", "or"}, f"unknown marker {word!r} in {expr!r}"


def _ci_script(cmd: Command) -> None:
    p = ROOT / ".ci" / "run"
    assert p.is_file() and os.access(p, os.X_OK), ".ci/run is missing or not executable"


def _jetson_modes(cmd: Command) -> None:
    """The README's nvpmodel ids match what the two Jetson Nano profiles say of themselves."""
    import hwmodel

    text = README.read_text("utf-8")
    for mode, name in (("0", "jetson-nano-10w"), ("1", "jetson-nano-5w")):
        line = next(ln for ln in text.splitlines() if f"nvpmodel -m {mode}" in ln)
        assert name in line
        assert f"nvpmodel ID {mode}" in hwmodel.load_profile(name).description


#: regex on a command's text -> (why it is not run here, an optional check)
ALLOWED: dict[str, tuple[str, Any]] = {
    r"python3 -m venv \.venv|\. \.venv/bin/activate|pip install torch==2\.13\.0"
    r"|pip install -e '\.\[test\]'":
        ("installs into a fresh venv from the package index: .ci/run runs exactly these", _ci_runs),
    r"pip wheel --no-deps -w dist \.|pip install '?~/sparsefl-\*\.whl'?":
        ("builds the wheel / installs it on the Pi: tests/test_packaging.py builds the same wheel "
         "(--no-build-isolation: an isolated build fetches setuptools) and installs it",
         _packaging_builds_the_wheel),
    r"python3 -m venv '?~/sparsefl-venv'?|\. '?~/sparsefl-venv/bin/activate'?":
        ("creates the venv on the Pi", None),
    r"scp .*": ("copies to or from a Raspberry Pi on the network", None),
    r"echo .*dtoverlay=dwc2.* sudo tee -a /boot/firmware/config\.txt"
    r"|sudo sed -i .* /boot/firmware/cmdline\.txt|sudo reboot":
        ("configures and reboots a Raspberry Pi (root, its boot partition)", None),
    r"sudo nvpmodel -(q|m [01])": ("sets a Jetson's power mode (root, Jetson only)", _jetson_modes),
    r"sudo apt-get install dataset-fashion-mnist":
        ("root and the Debian archive; .ci/run installs it when it can", None),
    r"pytest( .*)?": ("this test suite itself", _pytest_args),
    r"tox -e (bench|lint)": ("tox builds its own venvs from the index", _tox_env),
    r"\.ci/run": ("CI itself: a fresh venv and the whole suite", _ci_script),
    r"python -m embedded\.agent .*":
        ("runs the agent on a board's serial gadget /dev/ttyGS0 (parsed by the agent's own "
         "parser here; the agent itself runs in every emulated board below)", None),
    r"python benchmarks/.*":
        ("benchmarks take minutes to hours (parsed by the script's own parser here; "
         "tests/test_benchmarks_smoke.py runs the long ones in --smoke form)", None),
}


def allowed(cmd: Command) -> tuple[str, Any] | None:
    for pat, entry in ALLOWED.items():
        if re.fullmatch(pat, cmd.text):
            return entry
    return None


# ------------------------------------------------------------------------------ real parsers
class _Parsed(Exception):
    def __init__(self, ns: argparse.Namespace) -> None:
        self.ns = ns


def _parse_only(monkeypatch_target: Any, call: Any) -> argparse.Namespace:
    """Run ``call`` until its first ``ArgumentParser.parse_args`` returns, then stop it."""
    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        raise _Parsed(original(self, args, namespace))

    argparse.ArgumentParser.parse_args = parse_then_stop
    try:
        call()
    except _Parsed as p:
        return p.ns
    finally:
        argparse.ArgumentParser.parse_args = original
    raise AssertionError(f"{monkeypatch_target}: parsed no arguments")


def parse_agent(argv: list[str]) -> argparse.Namespace:
    """``python -m embedded.agent ARGS`` through the agent's real parser (nothing started)."""
    from embedded import agent

    assert argv[:3] == ["python", "-m", "embedded.agent"]
    return _parse_only("embedded.agent", lambda: agent.main(argv[3:]))


def parse_benchmark(argv: list[str]) -> argparse.Namespace:
    """``python benchmarks/X.py ARGS`` through the script's real parser (nothing run)."""
    assert argv[0] == "python" and argv[1].startswith("benchmarks/"), argv
    script = ROOT / argv[1]
    assert script.is_file(), f"{argv[1]}: no such benchmark"
    old = sys.argv
    sys.argv = [str(script), *argv[2:]]
    sys.path.insert(0, str(script.parent))
    try:
        return _parse_only(argv[1], lambda: runpy.run_path(str(script), run_name="__main__"))
    finally:
        sys.argv = old
        sys.path.remove(str(script.parent))


def parse_sparsefl(argv: list[str]) -> argparse.Namespace:
    from fl_core.cli import build_parser

    assert argv[0] == "sparsefl"
    return build_parser().parse_args(argv[1:])


# ------------------------------------------------------------------------------ the scratch world
#: the bundled demo's settings the test reduces (one local epoch, one BENCH repeat; 2 rounds)
REDUCED_DEMO = {r"^epochs = \d+$": "epochs = 1", r"^calibration_repeats = \d+$":
                "calibration_repeats = 1"}


class World:
    """The scratch directory the README's commands run in, and what they need, made lazily."""

    def __init__(self, cwd: Path, home: Path) -> None:
        self.cwd, self.home = cwd, home
        self._board: Any = None
        self.demo_out: str | None = None
        self.calibrated = False

    # the demo, run once: README's `sparsefl run` with reduced settings
    def demo(self) -> Path:
        if self.demo_out is None:
            rc, out = self.sparsefl(["run", "--rounds", "2", "--no-progress"])
            assert rc == 0, out
            m = re.search(r"comparison finished: (\S+)", out)
            assert m, out
            self.demo_out = m.group(1)
        return self.cwd / self.demo_out

    def board(self) -> Any:
        if self._board is None:
            from fl_core.board_client import EmulatedBoard

            self._board = EmulatedBoard()
        return self._board

    def calibrate(self) -> None:
        if not self.calibrated:
            self.board()
            cmd = next(c for c in readme_commands() if c.argv[:3] == ("sparsefl", "board",
                                                                      "calibrate"))
            rc, out = self.sparsefl(self.substitute(list(cmd.argv))[1:] + ["--repeats", "2"])
            assert rc == 0, out
            self.calibrated = True

    def substitute(self, argv: list[str]) -> list[str]:
        """README placeholders -> this world's: the board's port and UUID, SPARSEFL_HOME."""
        out = []
        for a in argv:
            if README_PORT in a:
                a = a.replace(README_PORT, self.board().path)
            if a.startswith("~/.cache/sparsefl"):
                a = str(self.home) + a[len("~/.cache/sparsefl"):]
                if "/UUID/" in a:
                    a = a.replace("/UUID/", f"/{self.board().board_uuid}/")
            out.append(a)
        return out

    def sparsefl(self, args: list[str]) -> tuple[int, str]:
        """``sparsefl ARGS`` in-process (the bundled demo reduced); exit code and stdout."""
        import contextlib
        import io

        from fl_core import config
        from fl_core.cli import main

        reduced = self.cwd / ".reduced-demo.toml"
        if not reduced.exists():
            text = config.BUNDLED_DEMO.read_text("utf-8")
            for a, b in REDUCED_DEMO.items():
                text, n = re.subn(a, b, text, flags=re.M)
                assert n == 1, f"the bundled demo has no line {a!r}: update REDUCED_DEMO"
            reduced.write_text(text)
        saved = config.BUNDLED_DEMO
        config.BUNDLED_DEMO = reduced
        buf = io.StringIO()
        try:
            with contextlib.redirect_stdout(buf):
                rc = main(args)
        finally:
            config.BUNDLED_DEMO = saved
        return rc, buf.getvalue()

    def close(self) -> None:
        if self._board is not None:
            self._board.close()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("readme")
    home = cwd / "sparsefl-home"
    mp = pytest.MonkeyPatch()
    mp.setenv("SPARSEFL_HOME", str(home))
    mp.setenv("NUMBA_CACHE_DIR", "")      # Numba's default cache, shared with the suite
    mp.chdir(cwd)
    (cwd / "examples").symlink_to(ROOT / "examples")
    for _, body, before in fenced_blocks("toml"):
        m = re.fullmatch(r"<!-- file: (\S+) -->", before.strip())
        if m:
            (cwd / m.group(1)).write_text(body)
    w = World(cwd, home)
    try:
        yield w
    finally:
        w.close()
        mp.undo()


# ------------------------------------------------------------------------------ the handlers
def _run_ok(world: World, argv: list[str], extra: list[str] | None = None) -> str:
    rc, out = world.sparsefl(world.substitute(argv)[1:] + list(extra or []))
    assert rc == 0, f"{shlex.join(argv)} exited {rc}: {out[-2000:]}"
    return out


def h_run(world: World, cmd: Command) -> None:
    a = parse_sparsefl(list(cmd.argv))
    if a.resume:                                  # resume the demo (finished: nothing to redo)
        world.demo()
        out = _run_ok(world, list(cmd.argv), ["--no-progress"])
        assert "comparison finished" in out
        return
    if a.config is None and a.out is None:        # the main job: the shared reduced demo
        root = world.demo()
        labels = ["fedavg", "zerofl-0.9", "feddst-0.9", "flash-0.9"]
        for lab in labels:
            rows = (root / lab / "clients.csv").read_text().splitlines()
            head = rows[0].split(",")
            for col in ("board", "compute_s", "transfer_s", "est_time_s", "est_provenance",
                        "time_provenance", "energy_provenance"):
                assert col in head, (lab, col)
            assert (root / lab / "report.md").is_file()
        # the README's provenance table, column by column
        import csv

        with open(root / "fedavg" / "clients.csv", newline="") as f:
            rows = [r for r in csv.DictReader(f) if r["status"] == "ok"]
        prov = {}
        for r in rows:
            kind = "board" if r["board"] else ("calibrated" if r["device"] == "generic-x86"
                                               else "simulated")
            prov.setdefault(kind, set()).add((r["time_provenance"], r["energy_provenance"],
                                              r["bytes_provenance"]))
        assert prov["board"] == {("measured-emulated", "calibrated-estimate", "measured")}
        assert prov["simulated"] == {("estimated", "estimated", "measured")}
        assert prov.get("calibrated", set()) <= {("calibrated-estimate", "calibrated-estimate",
                                                   "measured")}
        boards = json.loads((root / "boards.json").read_text())
        assert [b["device"] for b in boards] == ["generic-x86", "generic-x86"]
        assert (root / "calibration" / "generic-x86.toml").is_file()
        assert (root / "comparison.md").is_file() and (root / "pareto.png").is_file()
        return
    hybrid = False
    if a.config and README_PORT in (world.cwd / a.config).read_text():
        # the README's board -> the emulated board (same class, the port replaced)
        cfg = world.cwd / a.config
        cfg.write_text(cfg.read_text().replace(README_PORT, world.board().path))
        hybrid = True
    extra = ["--no-progress"]
    if a.rounds is None or a.rounds > 2:
        extra += ["--rounds", "1" if a.config else "2"]
    out = _run_ok(world, list(cmd.argv), extra)
    where = re.search(r"(?:run|comparison) finished: (\S+)", out)
    assert where, out
    done = world.cwd / where.group(1)
    assert (done / "config.toml").is_file()
    if hybrid:
        (board,) = json.loads((done / "boards.json").read_text())
        assert board["port"] == world.board().path and board["device"] == "rpi4", board
        rows = (done / "clients.csv").read_text().splitlines()
        assert any(",board0,rpi4,ok," in r for r in rows), "the board trained"


def h_budget(world: World, cmd: Command) -> None:
    a = parse_sparsefl(list(cmd.argv))
    if a.run:
        world.demo()
    if a.profile:
        world.calibrate()
    out = _run_ok(world, list(cmd.argv))
    if a.run or a.profile:
        assert "calibrated-estimate" in out, out
    if a.format == "json":
        json.loads(out)


def h_report(world: World, cmd: Command) -> None:
    world.demo()
    out = _run_ok(world, list(cmd.argv))
    a = parse_sparsefl(list(cmd.argv))
    target = Path(a.out) if a.out else Path(a.dirs[0])
    assert (world.cwd / target / "comparison.md").is_file(), out


def h_export(world: World, cmd: Command) -> None:
    a = parse_sparsefl(list(cmd.argv))
    if a.weights:
        world.demo()
    if a.calib and not (world.cwd / a.calib).exists():
        x = np.random.default_rng(0).random((32, 1, 28, 28), dtype=np.float32)
        np.savez(world.cwd / a.calib, x=x)
    _run_ok(world, list(cmd.argv))
    assert (world.cwd / a.out).stat().st_size > 10_000


def h_estimate(world: World, cmd: Command) -> None:
    a = parse_sparsefl(list(cmd.argv))
    if a.device.endswith(".toml"):
        world.calibrate()
    out = _run_ok(world, list(cmd.argv))
    if a.format == "json":
        json.loads(out)
    if a.device.endswith(".toml"):
        assert "calibrated-estimate" in out, out


def h_profiles(world: World, cmd: Command) -> None:
    out = _run_ok(world, list(cmd.argv))
    for name in ("rpi4", "jetson-nano-5w", "jetson-nano-10w", "generic-x86"):
        assert name in out


def h_board(world: World, cmd: Command) -> None:
    sub = cmd.argv[2]
    extra: list[str] = []
    if sub == "emulate":
        return _board_emulate(world, cmd)
    if sub == "pair":                 # the README copies the agent's token to this file
        a = parse_sparsefl(list(cmd.argv))
        shutil.copy(Path(world.board().state_dir) / "token", world.cwd / a.token_file)
    if sub == "calibrate":
        world.calibrate()             # README's command with --repeats 2
        a = parse_sparsefl(list(cmd.argv))
        assert (world.cwd / a.out).is_file()
        assert (world.home / "boards" / world.board().board_uuid / "calibration.toml").is_file()
        return
    if sub == "bench":
        extra = ["--repeats", "2"]
    if sub != "list":
        world.board()
    out = _run_ok(world, list(cmd.argv), extra)
    if sub == "pair":
        assert (world.home / "boards" / world.board().board_uuid / "token").is_file(), out
    if sub in ("probe", "bench"):
        assert world.board().board_uuid in out, out


def _board_emulate(world: World, cmd: Command) -> None:
    """``sparsefl board emulate`` in its own process: its first line is a port that probes."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    p = subprocess.Popen([sys.executable, "-m", "fl_core.cli", *cmd.argv[1:]], cwd=world.cwd,
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        path = p.stdout.readline().strip()
        assert path.startswith("/dev/"), (path, p.stderr.read() if p.poll() is not None else "")
        rc, out = world.sparsefl(["board", "probe", path])
        assert rc == 0 and "emulated" in out, out
    finally:
        p.send_signal(signal.SIGINT)
        rc = p.wait(timeout=30)
    assert rc == 0, p.stderr.read()


HANDLERS = {"run": h_run, "budget": h_budget, "report": h_report, "export": h_export,
            "estimate": h_estimate, "profiles": h_profiles, "board": h_board}
#: sparsefl commands that take more than ~20 s when they are the first to need the demo
NEEDS_DEMO = re.compile(r"sparsefl (run|report|budget --run|export .*--weights)( |$)")


def _params() -> list[Any]:
    out = []
    for c in readme_commands():
        slow = c.argv[0] == "sparsefl" and NEEDS_DEMO.match(c.text) and "examples/" not in c.text \
            and "hybrid" not in c.text
        out.append(pytest.param(c, id=c.id, marks=[pytest.mark.slow] if slow else []))
    return out


# ------------------------------------------------------------------------------ the tests
def test_readme_has_the_sections_a_newcomer_needs():
    text = README.read_text("utf-8")
    heads = re.findall(r"^#+ (.+)$", text, flags=re.M)
    order = ["Quick start", "Estimate before you deploy", "Profile a real board", "Hybrid runs",
             "Scaling out with Flower", "Tests and CI", "Measured results", "Layout"]
    pos = [next(i for i, h in enumerate(heads) if h.startswith(o)) for o in order]
    assert pos == sorted(pos), heads
    for tag in ("trainer-table", "tradeoff-table"):    # the lead updates these tables
        assert text.count(f"<!-- {tag} -->") == 1 and text.count(f"<!-- /{tag} -->") == 1
        assert text.index(f"<!-- {tag} -->") < text.index(f"<!-- /{tag} -->")
    trainer = text[text.index("<!-- trainer-table -->"):text.index("<!-- /trainer-table -->")]
    headers = [ln for ln in trainer.splitlines() if ln.startswith("| ") and "sparsity 0" in ln]
    assert len(headers) == 1, "one trainer table"
    assert text.count("**Trainer speed") == 1


def test_commands_are_split_like_a_shell_would():
    body = ("# a comment\nsparsefl run --rounds 2   # trailing\n"
            "pip install x && python -m embedded.agent --port \\\n    /dev/ttyGS0 --warmup\n")
    cmds = split_commands(body, 10)
    assert [c.argv for c in cmds] == [
        ("sparsefl", "run", "--rounds", "2"), ("pip", "install", "x"),
        ("python", "-m", "embedded.agent", "--port", "/dev/ttyGS0", "--warmup")]
    assert [c.line for c in cmds] == [11, 12, 12]


def test_every_readme_command_is_known():
    unknown = [c.text for c in readme_commands()
               if not (c.argv[0] == "sparsefl" and len(c.argv) > 1 and c.argv[1] in HANDLERS)
               and allowed(c) is None]
    assert not unknown, f"README commands neither run by this test nor allow-listed: {unknown}"


@pytest.mark.parametrize("cmd", [c for c in readme_commands() if allowed(c)], ids=lambda c: c.id)
def test_allow_listed_command(cmd):
    reason, check = allowed(cmd)
    assert reason
    if cmd.argv[:3] == ("python", "-m", "embedded.agent"):
        ns = parse_agent(list(cmd.argv))
        assert ns.port == "/dev/ttyGS0" and ns.warmup
    elif cmd.argv[0] == "python" and cmd.argv[1].startswith("benchmarks/"):
        parse_benchmark(list(cmd.argv))
    if check is not None:
        check(cmd)


def test_a_renamed_flag_is_caught_by_the_parse_checks():
    """The parse-only checks reject what the real parsers reject."""
    with pytest.raises(SystemExit):
        parse_agent(["python", "-m", "embedded.agent", "--port", "/dev/ttyGS0", "--warm-up"])
    with pytest.raises(SystemExit):
        parse_agent(["python", "-m", "embedded.agent", "--port", "x", "--sensor", "ina3221"])
    with pytest.raises(SystemExit):
        parse_benchmark(["python", "benchmarks/train_step.py", "--quik"])
    assert parse_agent(["python", "-m", "embedded.agent", "--listen", "8765"]).listen == "8765"


@pytest.mark.parametrize("cmd", [p for p in _params() if p.values[0].argv[0] == "sparsefl"])
def test_sparsefl_command_runs(cmd, world):
    parse_sparsefl(list(cmd.argv))               # a renamed option fails here first
    HANDLERS[cmd.argv[1]](world, cmd)


def test_toml_files_are_valid_run_configs():
    from fl_core.config import parse_config
    from fl_core.hybrid import parse_boards

    found = 0
    for _, body, before in fenced_blocks("toml"):
        if "file:" in before:
            import tomllib

            doc = tomllib.loads(body)
            cfg = parse_config(doc, "README")
            assert cfg.fleet.boards and parse_boards(cfg.fleet.boards)[0].port == README_PORT
            found += 1
    assert found, "the README's hybrid config (<!-- file: hybrid.toml -->) is gone"


def test_hwmodel_python_block_runs(world, capsys):
    blocks = [b for _, b, _ in fenced_blocks("python") if "flwr" not in b and "flower" not in b]
    assert blocks
    for b in blocks:
        exec(compile(b, "README.md", "exec"), {})
    assert "flops" in capsys.readouterr().out.lower()


@pytest.mark.slow
def test_flower_python_block_runs(world, capsys):
    (block,) = [b for _, b, _ in fenced_blocks("python") if "flower" in b]
    assert "rounds=2," in block
    block = block.replace("rounds=2,", "rounds=1,")      # reduced: Ray's start-up dominates
    ns: dict[str, Any] = {}
    exec(compile(block, "README.md", "exec"), ns)
    acc = float(capsys.readouterr().out.strip().splitlines()[-1])
    assert 0.0 <= acc <= 1.0 and len(ns["run"].rounds) == 1


def agent_parser() -> argparse.ArgumentParser:
    """The agent's real parser, caught as ``embedded.agent.main`` builds it."""
    from embedded import agent

    seen: list[argparse.ArgumentParser] = []
    original = argparse.ArgumentParser.parse_args

    def catch(self, args=None, namespace=None):
        seen.append(self)
        raise _Parsed(argparse.Namespace())

    argparse.ArgumentParser.parse_args = catch
    try:
        agent.main(["--port", "x"])
    except _Parsed:
        pass
    finally:
        argparse.ArgumentParser.parse_args = original
    return seen[0]


def check_words(parser: argparse.ArgumentParser, words: list[str], where: str) -> None:
    """Subcommands and ``--options`` of ``words`` exist in ``parser`` (placeholders, values and
    ``[optional]`` brackets allowed); stops at ``...``."""
    p = parser
    for word in words:
        word = word.strip("[]")
        if word in ("...", "") or word.startswith("..."):
            return
        if word.startswith("--"):
            for opt in word.split("|"):
                opt = opt.split("=")[0]
                assert opt in p._option_string_actions, f"{where}: no option {opt}"
            continue
        subs = [a for a in p._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs:
            continue                  # positional arguments and option values
        assert word in subs[0].choices, f"{where}: no subcommand {word!r}"
        p = subs[0].choices[word]


def mentions(text: str) -> list[tuple[str, list[str]]]:
    """Every ``sparsefl SUB ...``, ``python -m embedded.agent ...`` and ``python benchmarks/...``:
    inline code spans of the prose, and lines of fenced blocks (continuations joined)."""
    starts = ("sparsefl ", "python benchmarks/", "python -m embedded.agent")
    found: list[str] = []
    fences, prose_lines, body = [], [], None
    for line in text.splitlines():
        if line.strip().startswith("```"):
            if body is None:
                body = []
            else:
                fences.append("\n".join(body))
                body = None
        elif body is None:
            prose_lines.append(line)
        else:
            body.append(line)
    prose = "\n".join(prose_lines)
    for span in re.findall(r"`([^`]+)`", prose):
        found.append(re.sub(r"\s+", " ", span).strip())
    for body in fences:
        for line in re.sub(r"\\\n\s*", " ", body).splitlines():
            line = line.split(" #")[0].strip()
            i = line.find("python -m embedded.agent")     # also inside ExecStart=...
            found.append(line[i:] if i > 0 and not line.startswith(starts) else line)
    out = []
    for s in found:
        if s.startswith(starts):
            w = s.split()
            if w[:3] == ["python", "-m", "embedded.agent"] or w[0] == "sparsefl" or \
                    w[1].startswith("benchmarks/"):
                out.append((s, w))
    return out


@pytest.mark.parametrize("doc", ["README.md", "docs/boards.md"])
def test_every_mention_names_real_subcommands_and_options(doc):
    """`sparsefl ...`, agent and benchmark command lines anywhere in the text (prose, code
    blocks, the systemd unit): their subcommands and options exist."""
    from fl_core.cli import build_parser

    text = (ROOT / doc).read_text("utf-8")
    found = mentions(text)
    assert len(found) >= 10
    agent = agent_parser()
    for where, words in found:
        if words[0] == "sparsefl":
            if len(words) > 1:
                check_words(build_parser(), words[1:], f"{doc}: `{where}`")
        elif words[:3] == ["python", "-m", "embedded.agent"]:
            check_words(agent, words[3:], f"{doc}: `{where}`")
        else:
            script = ROOT / words[1]
            assert script.is_file(), f"{doc}: `{where}`: no such benchmark"
            if "[" not in where:
                parse_benchmark(words)


def test_the_mention_check_rejects_a_wrong_option():
    from fl_core.cli import build_parser

    with pytest.raises(AssertionError, match="no option --token"):
        check_words(build_parser(), ["board", "pair", "PORT", "--token", "f"], "x")
    with pytest.raises(AssertionError, match="no subcommand 'probe/bench'"):
        check_words(build_parser(), ["board", "probe/bench", "PATH"], "x")
    with pytest.raises(AssertionError, match="no option --sensors"):
        check_words(agent_parser(), ["--port", "/dev/ttyGS0", "[--sensors", "auto]"], "x")
