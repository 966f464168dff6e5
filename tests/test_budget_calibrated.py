"""``sparsefl budget --profile FILE`` and ``--run DIR``: calibrated figures, said to be so.

The calibrated profile is fitted by hwmodel.calibration.calibrate to hand-made per-layer
timings: those of a made-up board whose (additive compute + memory) profile we know, four times
slower per MAC and per elementwise op than the shipped rpi4 profile. Its budget must then be that
board's, not the shipped profile's.
"""

from __future__ import annotations

import dataclasses
import json

import pytest

import hwmodel
from fl_core.cli import main
from fl_core.config import parse_config, resolved_toml
from fl_core.runlog import CLIENT_COLUMNS, ROUND_COLUMNS, _csv_text, atomic_write_text
from hwmodel import SparsityPlan
from hwmodel.calibration import calibrate, predict
from hwmodel.measure import PHASES, Measurement
from hwmodel.profiles import load_profile, save_profile

SLOWER = 4.0


def _truth():
    start = load_profile("rpi4")
    return start, dataclasses.replace(
        start, efficiency={k: v / SLOWER for k, v in start.efficiency.items()},
        overhead_s=2e-5, overlap=0.0, sources=dict(start.sources))


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    """(path of the calibrated profile, the made-up board's true profile, n measurements)."""
    start, truth = _truth()
    ms = []
    for model in ("lenet5", "mlp"):
        spec = hwmodel.build(model)
        for batch in (8, 32):
            for d in (1.0, 0.1):
                for node in spec.nodes:
                    if d < 1 and node.op not in ("conv2d", "linear"):
                        continue
                    for ph in PHASES:
                        ms.append(Measurement(model, node.name, node.op, ph, d, d, batch, 1,
                                              1.0, 0.0, 5, device="made-up-board"))
    timed = [dataclasses.replace(m, median_s=float(t))
             for m, t in zip(ms, predict(truth, ms), strict=True) if t > 0]
    fit = calibrate(start, timed, date="2026-11-22")
    path = save_profile(fit, tmp_path_factory.mktemp("board") / "calibration.toml")
    return path, truth, len(timed)


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def _json(capsys, *argv):
    code, out, err = run(capsys, *argv, "--format", "json")
    assert code == 0, err
    return json.loads(out)


def test_budget_profile_end_to_end(calibrated, capsys):
    path, truth, n = calibrated
    round_args = ("--model", "lenet5", "--sparsity", "0.9", "--batch", "32", "--samples", "96")
    cal = _json(capsys, "budget", "--profile", path, *round_args)
    shipped = _json(capsys, "budget", "--device", "rpi4", *round_args)
    assert cal["provenance"] == "calibrated-estimate" and shipped["provenance"] == "estimated"
    assert cal["profile_source"] == str(path)
    # the made-up board's own figures (its true profile, SWAT's uniform plan at 0.9)
    want = hwmodel.estimate("lenet5", truth, 0.9, batch=32, samples=96, radio=None)
    assert cal["compute_time_per_round_s"] == pytest.approx(want.totals.time_s, rel=0.02)
    # ... far from the shipped profile's (the board is 4x slower per op)
    assert cal["compute_time_per_round_s"] > 2.5 * shipped["compute_time_per_round_s"]
    # the calibration fits time; power stays the profile's: compute energy = busy W x time
    busy = load_profile("rpi4").busy_w
    assert cal["compute_energy_per_round_j"] == pytest.approx(
        busy * cal["compute_time_per_round_s"])
    # bytes do not depend on the device
    assert cal["uplink_bytes"] == shipped["uplink_bytes"]
    code, out, _ = run(capsys, "budget", "--profile", path, *round_args)
    assert code == 0
    assert f"profile: {path}; figures: calibrated-estimate" in out
    assert f"calibrated from {n} measurements on 2026-11-22" in out
    assert "provenance: calibrated-estimate" in out


def test_budget_profile_errors(calibrated, capsys, tmp_path):
    path, _, _ = calibrated
    code, _, err = run(capsys, "budget", "--profile", tmp_path / "nope.toml", "--model", "mlp")
    assert code == 2 and "no such profile file" in err and "nope.toml" in err
    code, _, err = run(capsys, "budget", "--profile", path, "--device", "rpi4", "--model", "mlp")
    assert code == 2 and "--device or --profile, not both" in err
    code, _, err = run(capsys, "budget", "--profile", path)
    assert code == 2 and "--model" in err
    code, _, err = run(capsys, "budget", "--model", "mlp")
    assert code == 2 and "--device" in err and "--profile" in err
    # a profile file that is not a calibration: estimated, and said so
    shipped = hwmodel.profiles.profile_dir() / "rpi4.toml"
    code, out, _ = run(capsys, "budget", "--profile", shipped, "--model", "mlp")
    assert code == 0 and "figures: estimated" in out and "no fitted values" in out


# ------------------------------------------------------------------------------ --run DIR
CONFIG = {
    "name": "hybrid", "rounds": 2, "clients_per_round": 4, "min_clients": 1, "seed": 0,
    "data": {"name": "mnist_small", "partition": "iid", "num_clients": 4},
    "model": {"name": "lenet5"},
    "strategy": {"name": "zerofl", "sparsity": 0.9},
    "train": {"batch_size": 16, "epochs": 2, "lr": 0.05},
    "fleet": {"devices": {"rpi4": 0.5, "pixel4": 0.5}},
}


def _row(rnd, cid, device, samples):
    return {"round": rnd, "client_id": cid, "device": device, "status": "ok", "reason": "",
            "num_samples": samples, "time_s": 1.0, "time_provenance": "estimated",
            "energy_j": 1.0, "energy_provenance": "estimated", "uplink_bytes": 10,
            "bytes_provenance": "measured", "downlink_bytes": 10}


def write_run(d, cal_path=None):
    """A run directory: config.toml as fl_core.config resolves it, the logs, a calibration."""
    d.mkdir(parents=True)
    atomic_write_text(d / "config.toml", resolved_toml(parse_config(CONFIG, "test")))
    # per client: 60, 80, 100, 120 samples -> median over clients 90 (c3 trains twice: a
    # median over rows would be 100)
    rows = [_row(1, "c0", "rpi4", 60), _row(1, "c1", "pixel4", 80), _row(1, "c2", "rpi4", 100),
            _row(1, "c3", "pixel4", 120), _row(2, "c3", "pixel4", 120)]
    atomic_write_text(d / "clients.csv", _csv_text(CLIENT_COLUMNS, rows))
    atomic_write_text(d / "rounds.csv", _csv_text(ROUND_COLUMNS, []))
    if cal_path is not None:
        (d / "calibration").mkdir()
        (d / "calibration" / "rpi4.toml").write_bytes(cal_path.read_bytes())
        atomic_write_text(d / "boards.json", json.dumps([{
            "client_id": "board0", "board_uuid": "u1", "port": "/dev/ttyUSB0", "device": "rpi4",
            "emulated": True, "sensor": None, "calibrated_profile": "calibration/rpi4.toml",
            "calibration": {"n_measurements": 1, "models": ["lenet5"], "sparsities": [0.9]}}]))
    return d


def test_budget_run_takes_workload_and_calibration(calibrated, capsys, tmp_path):
    path, _, _ = calibrated
    d = write_run(tmp_path / "runs" / "hybrid", path)
    b = _json(capsys, "budget", "--run", d, "--device", "rpi4")
    assert (b["model"], b["batch"], b["epochs"], b["samples"]) == ("lenet5", 16, 2, 90)
    assert b["sparsity"] == 0.9 and b["mode"] == "swat"
    assert b["provenance"] == "calibrated-estimate"
    assert b["profile_source"] == str(d / "calibration" / "rpi4.toml")
    # ZeroFL trains SWAT's uniform plan (first conv and classifier dense) at its sparsity
    spec = hwmodel.build("lenet5")
    plan = SparsityPlan.uniform(spec, 0.9, mode="swat", layers="swat")
    want = hwmodel.estimate(spec, load_profile(d / "calibration" / "rpi4.toml"), plan=plan,
                            batch=16, samples=90, epochs=2, radio=None)
    assert b["compute_time_per_round_s"] == pytest.approx(want.totals.time_s, rel=1e-9)
    # the same workload on the shipped profile: other (estimated) numbers
    s = _json(capsys, "budget", "--model", "lenet5", "--device", "rpi4", "--sparsity", "0.9",
              "--batch", "16", "--samples", "90", "--epochs", "2")
    assert s["provenance"] == "estimated"
    assert b["compute_time_per_round_s"] > 2.5 * s["compute_time_per_round_s"]
    # with no --device the run's only calibrated class is used; explicit options win
    b2 = _json(capsys, "budget", "--run", d, "--samples", "40")
    assert b2["device"] == b["device"] and b2["samples"] == 40
    assert b2["provenance"] == "calibrated-estimate"
    # a class of the run without a calibration: the shipped profile, said so
    code, out, _ = run(capsys, "budget", "--run", d, "--device", "pixel4")
    assert code == 0 and "figures: estimated" in out
    assert "the run has no calibration for 'pixel4'" in out
    # the text output names the run and the calibration file
    code, out, _ = run(capsys, "budget", "--run", d, "--device", "rpi4")
    assert f"workload from run {d}" in out and "median of 4 clients" in out
    assert f"profile: {d / 'calibration' / 'rpi4.toml'}; figures: calibrated-estimate" in out


def test_budget_run_errors(calibrated, capsys, tmp_path):
    path, _, _ = calibrated
    d = write_run(tmp_path / "runs" / "demo" / "zerofl", path)
    code, _, err = run(capsys, "budget", "--run", d, "--device", "jetson-nano-5w")
    assert code == 2 and "no such device class" in err and "pixel4, rpi4" in err
    code, _, err = run(capsys, "budget", "--run", tmp_path / "nowhere", "--device", "rpi4")
    assert code == 2 and "no such run directory" in err
    code, _, err = run(capsys, "budget", "--run", d.parent, "--device", "rpi4")
    assert code == 2 and "holds several runs (zerofl)" in err
    (d / "clients.csv").unlink()
    code, _, err = run(capsys, "budget", "--run", d, "--device", "rpi4")
    assert code == 2 and "not a run directory" in err and "clients.csv" in err
    # two device classes, none calibrated: --device is needed
    d2 = write_run(tmp_path / "plain")
    code, _, err = run(capsys, "budget", "--run", d2)
    assert code == 2 and "give --device" in err and "pixel4, rpi4" in err
