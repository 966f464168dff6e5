"""Hybrid federations: emulated boards (the real agent on pseudo-terminals, in their own
processes) training beside simulated clients — calibration before round 1, measured vs
calibrated-estimate columns, a board unplugged and plugged back, kill -9 and Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from fl_core.config import ConfigError, parse_config
from fl_core.runlog import load_npz, read_csv

try:
    import tomllib
except ModuleNotFoundError:  # pragma: no cover
    import tomli as tomllib  # type: ignore[no-redef]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CONFIG = """
name = "hybrid"
rounds = 3
clients_per_round = 4
min_clients = 1
seed = 5
threads = 1

[data]
name = "digits"
partition = "iid"
num_clients = 6

[model]
name = "mlp"

[strategy]
name = "zerofl"
sparsity = 0.9
rule = "topk_weights"
mask_ratio = 0.1

[train]
lr = 0.05
batch_size = 32
epochs = 1
max_steps = 4

[fleet]
devices = { "generic-x86" = 0.5, rpi4 = 0.5 }
workers = 0
calibration_repeats = 2

[[fleet.boards]]
port = "emulate"
"""


@pytest.fixture(autouse=True)
def _home(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSEFL_HOME", str(tmp_path / "home"))


def _doc(extra: str = "") -> dict:
    return tomllib.loads(CONFIG + extra)


# ------------------------------------------------------------------------------ config
def test_board_tables_are_validated_with_clear_errors():
    ok = parse_config(_doc())
    assert ok.fleet.boards == [{"port": "emulate"}]
    bad = [
        ('[[fleet.boards]]\nprot = "/dev/ttyUSB0"\n', "unknown key(s) ['prot']"),
        ('[[fleet.boards]]\ndevice = "rpi4"\n', "missing key 'port'"),
        ('[[fleet.boards]]\nport = 3\n', "boards[1].port: expected a string"),
        ('[[fleet.boards]]\nport = "/dev/x"\ndevice = "toaster"\n', "unknown device class"),
        ('[[fleet.boards]]\nport = "/dev/x"\n[[fleet.boards]]\nport = "/dev/x"\n',
         "listed twice"),
    ]
    for extra, msg in bad:
        with pytest.raises(ConfigError) as e:
            parse_config(_doc(extra))
        assert msg in str(e.value) and "[fleet]" in str(e.value), (extra, str(e.value))
    many = "".join('[[fleet.boards]]\nport = "emulate"\n' for _ in range(4))
    with pytest.raises(ConfigError, match="clients_per_round .4. is smaller than the 5"):
        parse_config(_doc(many))
    sampled = "".join('[[fleet.boards]]\nport = "emulate"\nevery_round = false\n'
                      for _ in range(5))        # 1 + 5 boards for 6 clients
    with pytest.raises(ConfigError, match="must exceed the number of"):
        parse_config(_doc(sampled))


def test_demo_config_is_a_hybrid_comparison():
    from fl_core.config import BUNDLED_DEMO, load_config, resolved_toml

    cfg = load_config(BUNDLED_DEMO)
    assert [b["port"] for b in cfg.fleet.boards] == ["emulate", "emulate"]
    assert cfg.data.name == "mnist_small" and cfg.data.num_clients == 50
    assert [c["name"] for c in cfg.compare] == ["fedavg", "zerofl", "feddst", "flash"]
    again = parse_config(tomllib.loads(resolved_toml(cfg)), "resolved")
    assert again.to_dict() == cfg.to_dict()


# ------------------------------------------------------------------------------ a hybrid run
def test_hybrid_run_calibrates_then_measures_beside_simulated_clients(tmp_path):
    from fl_core.federation import Federation
    from hwmodel.profiles import load_profile

    cfg = parse_config(_doc())
    fed = Federation(cfg, tmp_path / "run")
    emu = fed.boards.emulators[0]
    s = fed.run()
    assert emu.proc.poll() is not None, "the emulated board's agent must be stopped at the end"
    assert s["status"] == "completed" and s["boards"][0]["emulated"] is True
    out = tmp_path / "run"
    prof = load_profile(out / "calibration" / "generic-x86.toml")
    assert prof.fitted, "the class profile is fitted to the board's BENCH measurements"
    raw = (out / "calibration" / "generic-x86-measurements.csv").read_text().splitlines()
    assert len(raw) > 10 and "median_s" in raw[0]      # the raw BENCH data is kept
    boards = json.loads((out / "boards.json").read_text())
    assert boards[0]["device"] == "generic-x86" and boards[0]["calibration"]["n_measurements"] > 0
    rows = read_csv(out / "clients.csv")
    brd = [r for r in rows if r["client_id"] == "board0"]
    assert [r["round"] for r in brd] == ["1", "2", "3"], "a board trains every round"
    for r in brd:
        assert r["status"] == "ok", r["reason"]
        assert r["time_provenance"] == "measured-emulated"
        assert r["board"] == boards[0]["board_uuid"]
        assert float(r["compute_s"]) > 0 and float(r["transfer_s"]) > 0
        assert r["transfer_provenance"] == "measured"
        assert float(r["est_time_s"]) > 0 and r["est_provenance"] == "calibrated-estimate"
        # no sensor on an emulated board: its energy is the calibrated estimate
        assert r["energy_provenance"] == "calibrated-estimate"
    sims = [r for r in rows if r["client_id"] != "board0" and r["status"] == "ok"]
    assert sims
    for r in sims:
        want = "calibrated-estimate" if r["device"] == "generic-x86" else "estimated"
        assert r["time_provenance"] == want and r["energy_provenance"] == want, r
        assert r["board"] == "" and r["est_time_s"] == ""
    # weights stay resident on the board: after round 1 only changed tensors travel down
    down = [int(r["downlink_bytes"]) for r in brd]
    assert down[0] > 0
    assert (out / "report.md").is_file()


@pytest.mark.slow
def test_board_unplugged_mid_round_fails_it_and_reconnects_when_back(tmp_path):
    """The agent is killed right after the host sent its TRAIN (an unplugged board): the
    board's round fails after its train timeout, the round completes without it; the agent
    started again on the same port is reconnected at the next round."""
    from embedded.protocol import MSG
    from fl_core.federation import Federation

    doc = _doc()
    doc["fleet"]["boards"][0]["train_timeout_s"] = 4.0
    fed = Federation(parse_config(doc), tmp_path / "run")
    try:
        fed.prepare()
        emu, bc = fed.boards.emulators[0], fed.boards.clients[0]
        r1 = fed.run_round(1)
        assert r1.clients[0]["client_id"] == "board0" and r1.clients[0]["status"] == "ok"
        orig_long = bc._long

        def unplug_after_sending(msg_type, fields, wait_s):
            if msg_type == MSG.TRAIN:
                link = bc._ensure()
                send = link.send_message

                def send_then_unplug(*a, **k):
                    out = send(*a, **k)
                    emu.kill()
                    return out
                link.send_message = send_then_unplug
            return orig_long(msg_type, fields, wait_s)

        bc._long = unplug_after_sending
        r2 = fed.run_round(2)
        bc._long = orig_long
        assert emu.proc.poll() is not None
        b2 = next(r for r in r2.clients if r["client_id"] == "board0")
        assert b2["status"] == "failed" and "board" in b2["reason"], b2
        assert r2.row["clients_ok"] == 3 and r2.row["clients_failed"] == 1
        assert r2.row["accuracy"] is not None, "the round completes without the board"
        emu.restart()                                  # plugged back in
        r3 = fed.run_round(3)
        b3 = next(r for r in r3.clients if r["client_id"] == "board0")
        assert b3["status"] == "ok", b3["reason"]
        assert b3["time_provenance"] == "measured-emulated"
    finally:
        fed.close()
    assert emu.proc.poll() is not None


# ------------------------------------------------------------------------------ processes
def _env(tmp_path) -> dict:
    return dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
                SPARSEFL_HOME=str(tmp_path / "home"))


#: ``python -m fl_core.cli`` that takes Ctrl-C as a run in a terminal's foreground does, also when
#: this test process runs as a background job (a non-interactive shell starts those with SIGINT
#: ignored, the child inherits that, and Python then installs no KeyboardInterrupt handler)
_CLI_CTRL_C = ("import runpy, signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
               "runpy.run_module('fl_core.cli', run_name='__main__', alter_sys=True)")


def _cli(tmp_path, *args: str, ctrl_c: bool = False) -> subprocess.Popen:
    cli = ["-c", _CLI_CTRL_C] if ctrl_c else ["-m", "fl_core.cli"]
    return subprocess.Popen([sys.executable, *cli, "run", *args, "--no-progress"],
                            cwd=ROOT, env=_env(tmp_path), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)


def _agents(home: str) -> list[int]:
    """Board agents still running with this SPARSEFL_HOME."""
    pids = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read()
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = f.read()
        except OSError:
            continue
        if b"embedded.agent" in cmd and f"SPARSEFL_HOME={home}".encode() in env:
            pids.append(int(pid))
    return pids


def _wait_for(path, p, timeout=240):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() or p.poll() is not None:
            return
        time.sleep(0.01)


@pytest.mark.slow
def test_kill_9_with_a_board_then_resume_matches_an_uninterrupted_run(tmp_path):
    cfg = tmp_path / "h.toml"
    cfg.write_text(CONFIG.replace("rounds = 3", "rounds = 5"))
    full, killed = tmp_path / "full", tmp_path / "killed"
    p = _cli(tmp_path, str(cfg), "--out", str(full))
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err.decode()[-2000:]
    p = _cli(tmp_path, str(cfg), "--out", str(killed))
    _wait_for(killed / "checkpoints" / "ckpt-000002.json", p)
    alive = p.poll() is None
    p.send_signal(signal.SIGKILL)
    p.communicate(timeout=60)
    assert alive, "the run finished before it could be killed"
    deadline = time.monotonic() + 10
    while _agents(str(tmp_path / "home")) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _agents(str(tmp_path / "home")), "the emulated board died with its host"
    p = _cli(tmp_path, "--resume", str(killed))
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err.decode()[-2000:]
    a, b = load_npz(full / "final_model.npz"), load_npz(killed / "final_model.npz")
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].tobytes() == b[k].tobytes(), k
    ra, rb = read_csv(full / "rounds.csv"), read_csv(killed / "rounds.csv")
    assert [r["round"] for r in rb] == ["1", "2", "3", "4", "5"]
    for col in ("accuracy", "loss", "uplink_bytes", "clients_ok"):
        assert [r[col] for r in ra] == [r[col] for r in rb], col
    # the board's rows (measured costs) from before the kill are kept as they were logged
    cb = read_csv(killed / "clients.csv")
    assert sum(r["client_id"] == "board0" and r["status"] == "ok" for r in cb) == 5
    # resume reused the saved calibration: the same estimate for the same task
    ca = read_csv(full / "clients.csv")
    est = {(r["round"], r["client_id"]): r["time_s"] for r in ca if r["device"] == "rpi4"}
    assert est == {(r["round"], r["client_id"]): r["time_s"] for r in cb
                   if r["device"] == "rpi4"}
    gx = [r["time_s"] for r in cb if r["device"] == "generic-x86" and r["client_id"] != "board0"
          and r["status"] == "ok"]
    assert all(r["time_provenance"] == "calibrated-estimate" for r in cb
               if r["device"] == "generic-x86" and r["client_id"] != "board0"
               and r["status"] == "ok") and gx


@pytest.mark.slow
def test_ctrl_c_checkpoints_writes_a_partial_report_and_releases_the_boards(tmp_path):
    cfg = tmp_path / "h.toml"
    cfg.write_text(CONFIG.replace("rounds = 3", "rounds = 200"))
    out = tmp_path / "run"
    p = _cli(tmp_path, str(cfg), "--out", str(out), ctrl_c=True)
    _wait_for(out / "checkpoints" / "ckpt-000001.json", p)
    assert p.poll() is None
    p.send_signal(signal.SIGINT)
    so, err = p.communicate(timeout=120)
    tail = (so + err).decode()[-3000:]       # every message carries the run's output
    assert p.returncode == 130, tail
    assert "--resume" in err.decode(), tail
    s = json.loads((out / "summary.json").read_text())
    assert s["status"] == "interrupted" and 1 <= s["rounds_completed"] < 200, (s, tail)
    assert "Partial report" in (out / "report.md").read_text(), tail
    assert not _agents(str(tmp_path / "home")), f"boards released on Ctrl-C\n{tail}"
    assert np.isfinite(float(read_csv(out / "rounds.csv")[0]["loss"]))


def test_a_board_trains_on_a_shard_already_on_it(tmp_path):
    """``data = "NAME"``: the board's own shard (LOAD_DATA'd before, or under its data root);
    the host sends no data, only the task."""
    from sklearn.datasets import load_digits

    from fl_core.board_client import BoardClient, EmulatedBoard
    from fl_core.federation import Federation

    d = load_digits()
    x = (d.data[:120] / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
    y = d.target[:120].astype(np.int64)
    with EmulatedBoard() as emu:
        with BoardClient(emu.path) as bc:
            bc.load_data("my-shard", x, y)
        doc = _doc(f'[[fleet.boards]]\nport = "{emu.path}"\ndevice = "generic-x86"\n'
                   'data = "my-shard"\n')
        doc["fleet"]["boards"] = doc["fleet"]["boards"][1:]     # only the external board
        doc["rounds"] = 1
        fed = Federation(parse_config(doc), tmp_path / "run")
        s = fed.run()
        assert fed.boards.emulators == [] and emu.proc.poll() is None, \
            "a board the run did not start is left running"
    assert s["status"] == "completed"
    row = next(r for r in read_csv(tmp_path / "run" / "clients.csv")
               if r["client_id"] == "board0")
    assert row["status"] == "ok", row["reason"]
    assert row["num_samples"] == "0"      # the host does not know the on-board shard's size


@pytest.mark.slow
def test_a_killed_comparison_resumes_to_the_same_results(tmp_path):
    """The main job's shape ([[compare]] + a board): kill -9 during the second strategy, then
    ``--resume`` the comparison directory: the finished run is kept, the interrupted one
    resumes from its checkpoint, and every final model equals an uninterrupted comparison's."""
    cfg = tmp_path / "cmp.toml"
    cfg.write_text(CONFIG.replace("rounds = 3", "rounds = 4") +
                   '\n[[compare]]\nname = "fedavg"\n\n[[compare]]\nname = "zerofl"\n'
                   'sparsity = 0.9\nrule = "topk_weights"\nmask_ratio = 0.1\n')
    full, killed = tmp_path / "full", tmp_path / "killed"
    p = _cli(tmp_path, str(cfg), "--out", str(full))
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err.decode()[-2000:]
    assert (full / "comparison.md").is_file()
    p = _cli(tmp_path, str(cfg), "--out", str(killed))
    _wait_for(killed / "zerofl-0.9" / "checkpoints" / "ckpt-000002.json", p)
    alive = p.poll() is None
    p.send_signal(signal.SIGKILL)
    p.communicate(timeout=60)
    assert alive, "the comparison finished before it could be killed"
    assert json.loads((killed / "fedavg" / "summary.json").read_text())["status"] == "completed"
    assert not (killed / "zerofl-0.9" / "final_model.npz").exists()
    p = _cli(tmp_path, "--resume", str(killed))
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err.decode()[-2000:]
    assert "fedavg: already finished" in err.decode()
    for lab in ("fedavg", "zerofl-0.9"):
        a = load_npz(full / lab / "final_model.npz")
        b = load_npz(killed / lab / "final_model.npz")
        assert a.keys() == b.keys()
        for k in a:
            assert a[k].tobytes() == b[k].tobytes(), (lab, k)
    assert (killed / "comparison.md").is_file()
