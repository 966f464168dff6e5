"""Run directory contract: atomic files, checkpoints (prune, fallback), CSV logs, reports."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from fl_core import runlog
from fl_core.report import compare, group_runs, load_run, pareto_front, write_report
from fl_core.runlog import (
    CLIENT_COLUMNS,
    ROUND_COLUMNS,
    Checkpointer,
    RunLog,
    atomic_write_bytes,
    load_npz,
    npz_bytes,
    read_csv,
)


def test_atomic_write_replaces_and_leaves_no_temp(tmp_path):
    p = tmp_path / "f.bin"
    atomic_write_bytes(p, b"one")
    atomic_write_bytes(p, b"two")
    assert p.read_bytes() == b"two"
    assert sorted(os.listdir(tmp_path)) == ["f.bin"]


def test_atomic_write_failure_keeps_old_file(tmp_path, monkeypatch):
    p = tmp_path / "f.bin"
    atomic_write_bytes(p, b"good")

    def boom(fd):
        raise OSError("disk gone")

    monkeypatch.setattr(runlog.os, "fsync", boom)
    with pytest.raises(OSError, match="disk gone"):
        atomic_write_bytes(p, b"half-written")
    monkeypatch.undo()
    assert p.read_bytes() == b"good"
    assert sorted(os.listdir(tmp_path)) == ["f.bin"]


def test_npz_roundtrip_without_pickle_and_rejects_objects(tmp_path):
    arrays = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "m": np.array([True, False])}
    atomic_write_bytes(tmp_path / "x.npz", npz_bytes(arrays))
    back = load_npz(tmp_path / "x.npz")
    assert set(back) == {"a", "m"}
    assert back["a"].dtype == np.float32 and np.array_equal(back["a"], arrays["a"])
    assert back["m"].dtype == bool
    with pytest.raises(TypeError, match="object"):
        npz_bytes({"o": np.array([{"x": 1}], dtype=object)})


def test_checkpoints_prune_and_fall_back_to_last_good(tmp_path):
    ck = Checkpointer(tmp_path, keep=2)
    for r in range(1, 5):
        ck.save(r, {"note": f"round {r}"}, {"w": np.full(3, r, dtype=np.float32)})
    assert ck.rounds() == [3, 4]
    names = sorted(os.listdir(tmp_path / "checkpoints"))
    assert names == ["ckpt-000003.json", "ckpt-000003.npz", "ckpt-000004.json",
                     "ckpt-000004.npz"]
    latest = ck.load_latest()
    assert latest.round == 4 and latest.meta["note"] == "round 4"
    assert np.array_equal(latest.arrays["w"], np.full(3, 4, np.float32))
    # a torn array file (e.g. disk full after the rename of a later version): fall back
    npz = tmp_path / "checkpoints" / "ckpt-000004.npz"
    npz.write_bytes(npz.read_bytes()[:40])
    fallback = ck.load_latest()
    assert fallback.round == 3 and np.array_equal(fallback.arrays["w"], np.full(3, 3, np.float32))
    # an array file without its JSON is not a checkpoint
    (tmp_path / "checkpoints" / "ckpt-000003.json").unlink()
    (tmp_path / "checkpoints" / "ckpt-000004.json").unlink()
    assert ck.load_latest() is None
    with pytest.raises(ValueError, match="keep"):
        Checkpointer(tmp_path, keep=0)


def _round(r, acc):
    return {"round": r, "accuracy": acc, "loss": 1.0 / r, "flops": 1e6 * r, "energy_j": 2.0 * r,
            "round_time_s": 0.5, "uplink_bytes": 1000 * r, "downlink_bytes": 4000,
            "clients_ok": 2, "clients_failed": 0, "clients_dropped": 1}


def _clients(r):
    return [{"round": r, "client_id": "c0", "device": "rpi4", "status": "ok", "reason": "",
             "num_samples": 10, "energy_j": 1.5 * r, "energy_provenance": "estimated",
             "time_s": 0.5, "time_provenance": "estimated", "uplink_bytes": 500 * r,
             "bytes_provenance": "measured", "downlink_bytes": 2000},
            {"round": r, "client_id": "c1", "device": "pixel4", "status": "ok", "reason": "",
             "num_samples": 12, "energy_j": 0.5 * r, "energy_provenance": "estimated",
             "time_s": 0.25, "time_provenance": "estimated", "uplink_bytes": 500 * r,
             "bytes_provenance": "measured", "downlink_bytes": 2000},
            {"round": r, "client_id": "c2", "device": "pixel4", "status": "dropped",
             "reason": "unavailable (availability 0.5)", "num_samples": 9}]


def test_runlog_append_and_truncate(tmp_path):
    log = RunLog(tmp_path)
    log.start()
    for r in (1, 2, 3):
        log.append(_round(r, 0.1 * r), _clients(r))
    rows = read_csv(tmp_path / "rounds.csv")
    assert [int(x["round"]) for x in rows] == [1, 2, 3]
    assert list(rows[0]) == list(ROUND_COLUMNS)
    crow = read_csv(tmp_path / "clients.csv")
    assert len(crow) == 9 and list(crow[0]) == list(CLIENT_COLUMNS)
    assert crow[2]["status"] == "dropped" and "availability" in crow[2]["reason"]
    # floats are written round-trip exactly
    assert float(rows[2]["accuracy"]) == 0.1 * 3
    # truncate to round 2 (what resume does from a checkpoint's rows)
    log2 = RunLog(tmp_path)
    log2.start(log.rounds[:2], log.clients[:6])
    assert [int(x["round"]) for x in read_csv(tmp_path / "rounds.csv")] == [1, 2]
    assert len(read_csv(tmp_path / "clients.csv")) == 6
    with pytest.raises(KeyError, match="bogus"):
        log2.append(dict(_round(3, 0.3), bogus=1), [])


def _fake_run(path, seed, accs, energy_scale=1.0, strategy="zerofl"):
    log = RunLog(path)
    log.start()
    for r, a in enumerate(accs, 1):
        row = _round(r, a)
        row["energy_j"] *= energy_scale
        log.append(row, _clients(r))
    cfg = {"strategy": {"name": strategy}, "seed": seed, "output": {"dir": str(path)},
           "rounds": len(accs)}
    summary = {"status": "completed", "strategy": strategy, "strategy_params": {},
               "seed": seed, "final_accuracy": accs[-1], "final_loss": 0.5,
               "rounds": len(accs), "config": cfg,
               "totals": {"energy_j": sum(r["energy_j"] for r in log.rounds),
                          "uplink_bytes": sum(r["uplink_bytes"] for r in log.rounds),
                          "downlink_bytes": 0, "flops": 0, "clients_ok": 0,
                          "clients_failed": 0, "clients_dropped": 0}}
    (path / "summary.json").write_text(json.dumps(summary))
    return summary


PNG = b"\x89PNG\r\n\x1a\n"


def test_write_report_makes_markdown_and_plots(tmp_path):
    _fake_run(tmp_path, 0, [0.2, 0.5, 0.7])
    md = write_report(tmp_path).read_text()
    assert "final accuracy: 0.7" in md
    assert "unavailable (availability 0.5)" in md      # dropouts are listed with the reason
    assert "energy: estimated" in md and "bytes: measured" in md
    for name in ("accuracy_vs_rounds", "accuracy_vs_energy", "accuracy_vs_uplink",
                 "energy_by_device"):
        png = tmp_path / f"{name}.png"
        assert png.read_bytes()[:8] == PNG
        assert f"({name}.png)" in md


def test_energy_by_device_sums_clients(tmp_path):
    from fl_core.report import energy_by_device

    _fake_run(tmp_path, 0, [0.2, 0.5])
    rounds, by_dev = energy_by_device(load_run(tmp_path))
    assert rounds == [1, 2]
    assert np.allclose(by_dev["rpi4"], [1.5, 3.0])
    assert np.allclose(by_dev["pixel4"], [0.5, 1.0])  # the dropped client adds nothing


def test_compare_groups_seeds_mean_std_and_pareto(tmp_path):
    dirs = []
    for seed, acc in ((0, 0.6), (1, 0.7), (2, 0.8)):
        d = tmp_path / f"z{seed}"
        d.mkdir()
        _fake_run(d, seed, [0.1, acc])
        dirs.append(d)
    d = tmp_path / "fedavg"
    d.mkdir()
    _fake_run(d, 0, [0.1, 0.65], energy_scale=3.0, strategy="fedavg")
    dirs.append(d)
    runs = [load_run(x) for x in dirs]
    groups = group_runs(runs)
    assert [len(g) for g in groups] == [3, 1]
    table, plot = compare(dirs, tmp_path / "cmp")
    # mean of 0.6, 0.7, 0.8 is 0.7, the sample std is 0.1
    assert "0.7 ± 0.1 |" in table
    assert plot.read_bytes()[:8] == PNG
    lines = table.splitlines()
    assert lines[2].endswith("yes |")      # zerofl: less energy and higher accuracy
    assert not lines[3].endswith("yes |")  # fedavg is dominated
    assert (tmp_path / "cmp" / "comparison.md").is_file()


def test_pareto_front_by_hand():
    pts = [(1.0, 0.5), (2.0, 0.7), (3.0, 0.6), (1.0, 0.4), (4.0, 0.9)]
    assert pareto_front(pts) == [0, 1, 4]


def test_load_run_missing_files_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="rounds.csv"):
        load_run(tmp_path)


def test_report_command_single_and_compare(tmp_path, capsys):
    from fl_core.cli import main

    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    _fake_run(a, 0, [0.3, 0.6])
    _fake_run(b, 1, [0.3, 0.8])
    assert main(["report", str(a)]) == 0
    assert (a / "report.md").is_file() and "report:" in capsys.readouterr().out
    assert main(["report", str(a), str(b), "--out", str(tmp_path / "cmp")]) == 0
    out = capsys.readouterr().out
    assert "| zerofl | 2 | 0.7 ± 0.1414 |" in out      # mean and sample std of 0.6, 0.8
    assert (tmp_path / "cmp" / "pareto.png").read_bytes()[:8] == PNG
    assert main(["report", str(tmp_path / "nope"), str(a)]) == 2
    assert "not a run directory" in capsys.readouterr().err
