"""kill -9 of ``sparsefl run`` mid-run, then ``--resume``: the same final model (bitwise) and
the same per-round accuracy and loss as an uninterrupted run of the same config."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from fl_core.runlog import load_npz, read_csv

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CONFIG = """
name = "resume"
rounds = 10
clients_per_round = 3
min_clients = 1
seed = 11
threads = 1

[data]
name = "digits"
partition = "lda"
alpha = 1.0
num_clients = 4

[model]
name = "mlp"

[strategy]
name = "fedavgm"
server_momentum = 0.5

[train]
lr = 0.05
batch_size = 32
epochs = 1
max_steps = 6

[fleet]
devices = { rpi4 = 0.5, pixel4 = 0.5 }
availability = 0.9
workers = 0
"""


def _cli(*args: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.Popen([sys.executable, "-m", "fl_core.cli", "run", *args, "--no-progress"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _wait(p: subprocess.Popen, timeout: float = 240) -> None:
    out, err = p.communicate(timeout=timeout)
    assert p.returncode == 0, err.decode()[-2000:]


@pytest.mark.slow
def test_kill_9_then_resume_matches_an_uninterrupted_run(tmp_path, capsys):
    cfg = tmp_path / "resume.toml"
    cfg.write_text(CONFIG)
    full, killed = tmp_path / "full", tmp_path / "killed"
    p_full = _cli(str(cfg), "--out", str(full))
    p_kill = _cli(str(cfg), "--out", str(killed))
    ck = killed / "checkpoints"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        if (ck / "ckpt-000001.json").exists() or p_kill.poll() is not None:
            break
        time.sleep(0.005)
    alive = p_kill.poll() is None
    p_kill.send_signal(signal.SIGKILL)
    p_kill.communicate(timeout=60)
    assert alive, "the run finished before it could be killed mid-run"
    assert not (killed / "final_model.npz").exists()
    done = sorted(int(n[5:11]) for n in os.listdir(ck) if n.endswith(".json"))
    assert done and done[-1] < 10
    _wait(p_full)
    # the killed run's logs may hold rows past its last checkpoint; resume truncates them
    p_res = _cli("--resume", str(killed))
    _wait(p_res)
    a, b = load_npz(full / "final_model.npz"), load_npz(killed / "final_model.npz")
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].tobytes() == b[k].tobytes(), k
    ra, rb = read_csv(full / "rounds.csv"), read_csv(killed / "rounds.csv")
    assert [r["round"] for r in rb] == [str(i) for i in range(1, 11)]
    for col in ("accuracy", "loss", "energy_j", "uplink_bytes", "clients_ok", "clients_dropped"):
        assert [r[col] for r in ra] == [r[col] for r in rb], col
    ca, cb = read_csv(full / "clients.csv"), read_csv(killed / "clients.csv")
    drop = ("host_wall_s",)
    assert [{k: v for k, v in r.items() if k not in drop} for r in ca] == \
        [{k: v for k, v in r.items() if k not in drop} for r in cb]
    for d in (full, killed):
        assert (d / "report.md").is_file() and (d / "summary.json").is_file()
        assert len(os.listdir(d / "checkpoints")) == 4   # keep_checkpoints = 2 (json + npz)
    # a finished run directory is never overwritten by a new run (checked before any work)
    from fl_core.cli import main

    assert main(["run", str(cfg), "--out", str(full), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "already exists" in err and "--force" in err
    assert (full / "final_model.npz").is_file()


@pytest.mark.slow
def test_sparsefl_run_without_arguments_runs_the_bundled_demo(tmp_path, capsys, monkeypatch):
    """``sparsefl run``: the main job, reduced to 2 rounds — 2 emulated boards beside 48
    simulated clients, fedavg vs zerofl / feddst / flash at 0.9, a comparison at the end."""
    import json

    from fl_core.cli import main

    monkeypatch.setenv("SPARSEFL_HOME", str(tmp_path / "home"))
    out = tmp_path / "demo"
    assert main(["run", "--rounds", "2", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "comparison.md" in printed and "| fedavg" in printed
    labels = ["fedavg", "zerofl-0.9", "feddst-0.9", "flash-0.9"]
    for lab in labels:
        d = out / lab
        for name in ("config.toml", "rounds.csv", "clients.csv", "summary.json",
                     "final_model.npz", "report.md", "accuracy_vs_rounds.png",
                     "accuracy_vs_energy.png", "accuracy_vs_uplink.png", "energy_by_device.png",
                     "boards.json"):
            assert (d / name).is_file(), (lab, name)
        s = json.loads((d / "summary.json").read_text())
        assert s["rounds_completed"] == 2 and s["status"] == "completed"
        rows = read_csv(d / "clients.csv")
        boards = [r for r in rows if r["client_id"].startswith("board")]
        assert len(boards) == 4, "both boards take part in both rounds"
        # (FLASH's round 1 is its hunting round: a fraction of the clients train)
        trained = [r for r in boards if r["status"] != "dropped"]
        assert len(trained) == (2 if lab == "flash-0.9" else 4)
        assert all(r["status"] == "ok" and r["board"] for r in trained)
        assert {r["time_provenance"] for r in trained} == {"measured-emulated"}
    assert (out / "comparison.md").is_file() and (out / "calibration").is_dir()
    # every strategy's clients were priced by the same calibration
    cal = {(out / lab / "calibration" / "generic-x86.toml").read_text() for lab in labels}
    assert len(cal) == 1
    # ZeroFL's top-K uplink at 90 % sparsity + 10 % mask ratio is well below FedAvg's
    up = {lab: json.loads((out / lab / "summary.json").read_text())["totals"]["uplink_bytes"]
          for lab in labels}
    assert up["zerofl-0.9"] < 0.6 * up["fedavg"]
