"""The report of a hybrid (boards + simulated) run, and comparisons in the main job's layout.

The run directories are written by hand in the run-log format (fl_core.runlog's CSV writer and
columns, plus the hybrid columns of the run-directory contract), with numbers chosen so that
every median and relative error below is worked out by hand in the comments.
"""

from __future__ import annotations

import json
import math
import statistics

import pytest

from fl_core.report import (
    compare,
    energy_by_device,
    link_by_board,
    load_run,
    measured_vs_estimated,
    write_report,
)
from fl_core.runlog import CLIENT_COLUMNS, ROUND_COLUMNS, _csv_text, atomic_write_text

PNG = b"\x89PNG\r\n\x1a\n"
#: the hybrid columns of the run-directory contract (the lead adds them to CLIENT_COLUMNS)
HYBRID = ("board", "compute_s", "transfer_s", "transfer_provenance", "est_time_s",
          "est_energy_j", "est_provenance")
COLUMNS = tuple(CLIENT_COLUMNS) + tuple(c for c in HYBRID if c not in CLIENT_COLUMNS)
UUID_A = "a1a1a1a1-0000-4000-8000-000000000001"   # rpi4, real board with an INA219
UUID_B = "b2b2b2b2-0000-4000-8000-000000000002"   # rpi4, emulated board, no sensor
UUID_C = "c3c3c3c3-0000-4000-8000-000000000003"   # jetson nano, real, no sensor, uncalibrated


def _client(rnd, cid, device, status="ok", **kw):
    row = {"round": rnd, "client_id": cid, "device": device, "status": status, "reason": "",
           "num_samples": 100, "train_loss": 1.0, "flops": 1e9, "flops_provenance": "estimated",
           "uplink_bytes": 1000, "bytes_provenance": "measured", "downlink_bytes": 1000,
           "host_wall_s": 0.5, "host_wall_provenance": "measured"}
    row.update(kw)
    return row


def _board(rnd, cid, device, uuid, compute, est, transfer, time_prov="measured",
           energy=None, energy_prov="calibrated-estimate", est_energy=None,
           est_prov="calibrated-estimate", **kw):
    return _client(rnd, cid, device, board=uuid, compute_s=compute, transfer_s=transfer,
                   transfer_provenance="measured", time_s=compute + transfer, time_provenance=time_prov, est_time_s=est,
                   energy_j=energy if energy is not None else 3.0 * est,
                   energy_provenance=energy_prov, est_energy_j=est_energy,
                   est_provenance=est_prov, **kw)


def _sim(rnd, cid, device, energy, prov):
    return _client(rnd, cid, device, time_s=1.0, time_provenance=prov, energy_j=energy,
                   energy_provenance=prov)


# Board A (rpi4, sensor): compute 2, 4, 5 s, estimated 2.2, 3, 5.5 s
#   errors |2.2-2|/2 = 0.10, |3-4|/4 = 0.25, |5.5-5|/5 = 0.10 -> median 0.10, max 0.25
#   medians: measured 4, estimated 3
#   energy (measured): 10, 20, 25 J, estimated 9, 24, 25 J
#   errors 0.10, 0.20, 0 -> median 0.10, max 0.20; medians measured 20, estimated 24
#   link: transfer 0.5 + 0.25 + 0.25 = 1.0 s, compute 11 s -> share 1/12;
#   bytes: uplink 3 x 1000, downlink 5000 + 1000 + 1000 (weights stay resident)
# Board B (rpi4, emulated, no sensor): compute 1, 3 s, estimated 1.5, 2.4 s
#   errors 0.5, 0.2 -> median 0.35, max 0.5; medians measured 2, estimated 1.95
# Board C (jetson-nano-5w, no calibration): compute 8 s, estimated 6 s -> error 0.25
# Round 4: board A failed (unplugged): no costs, not counted.
def _client_rows():
    rows = []
    a = [(2.0, 2.2, 0.5, 10.0, 9.0, 5000), (4.0, 3.0, 0.25, 20.0, 24.0, 1000),
         (5.0, 5.5, 0.25, 25.0, 25.0, 1000)]
    b = [(1.0, 1.5, 0.1), (3.0, 2.4, 0.1)]
    for rnd in (1, 2, 3):
        comp, est, tr, e, ee, down = a[rnd - 1]
        rows.append(_board(rnd, "board0", "rpi4", UUID_A, comp, est, tr, energy=e,
                           energy_prov="measured", est_energy=ee, downlink_bytes=down))
        if rnd <= 2:
            comp, est, tr = b[rnd - 1]
            rows.append(_board(rnd, "board1", "rpi4", UUID_B, comp, est, tr,
                               time_prov="measured-emulated", est_energy=3.0 * est))
        if rnd == 1:
            rows.append(_board(1, "board2", "jetson-nano-5w", UUID_C, 8.0, 6.0, 2.0,
                               energy_prov="estimated", est_energy=30.0, est_prov="estimated"))
        rows.append(_sim(rnd, f"c{rnd:04d}", "rpi4", 2.0, "calibrated-estimate"))
        rows.append(_sim(rnd, f"p{rnd:04d}", "pixel4", 1.0, "estimated"))
    rows.append(_client(4, "board0", "rpi4", status="failed", reason="board unplugged",
                        board=UUID_A, time_provenance="measured"))
    rows.append(_sim(4, "c0004", "rpi4", 2.0, "calibrated-estimate"))
    rows.append(_client(4, "p0004", "pixel4", status="dropped", reason="unavailable"))
    return rows


BOARDS = [
    {"client_id": "board0", "board_uuid": UUID_A, "port": "/dev/ttyUSB0", "device": "rpi4",
     "emulated": False, "sensor": "ina219", "calibrated_profile": "calibration/rpi4.toml",
     "calibration": {"n_measurements": 96, "models": ["lenet5", "mlp"],
                     "sparsities": [0.0, 0.9]}},
    {"client_id": "board1", "board_uuid": UUID_B, "port": "/dev/pts/7", "device": "rpi4",
     "emulated": True, "sensor": None, "calibrated_profile": "calibration/rpi4.toml",
     "calibration": {"n_measurements": 96, "models": ["lenet5", "mlp"],
                     "sparsities": [0.0, 0.9]}},
    {"client_id": "board2", "board_uuid": UUID_C, "port": "/dev/ttyACM0",
     "device": "jetson-nano-5w", "emulated": False, "sensor": None, "calibrated_profile": None,
     "calibration": {"n_measurements": 0, "models": [], "sparsities": []}},
]


def write_run(path, client_rows, accs=(0.3, 0.5, 0.6, 0.7), strategy="zerofl", params=None,
              boards=None, uplink_scale=1):
    """A run directory as fl_core.runlog writes it (rounds.csv, clients.csv, summary.json)."""
    path.mkdir(parents=True, exist_ok=True)
    rounds = []
    for rnd, acc in enumerate(accs, 1):
        mine = [r for r in client_rows if r["round"] == rnd]
        rounds.append({"round": rnd, "accuracy": acc, "loss": 1.0 - acc, "flops": 1e9,
                       "energy_j": sum(float(r.get("energy_j") or 0) for r in mine),
                       "round_time_s": 1.0, "uplink_bytes": 1000 * uplink_scale * len(mine),
                       "downlink_bytes": 1000,
                       "clients_ok": sum(r["status"] == "ok" for r in mine),
                       "clients_failed": sum(r["status"] == "failed" for r in mine),
                       "clients_dropped": sum(r["status"] == "dropped" for r in mine)})
    atomic_write_text(path / "rounds.csv", _csv_text(ROUND_COLUMNS, rounds))
    atomic_write_text(path / "clients.csv", _csv_text(COLUMNS, client_rows))
    params = {"sparsity": 0.9} if params is None else params
    summary = {"status": "completed", "name": path.name, "strategy": strategy,
               "strategy_params": params, "model": "lenet5", "dataset": "mnist_small",
               "seed": 0, "threads": 1, "rounds": len(accs), "final_accuracy": accs[-1],
               "final_loss": 1.0 - accs[-1],
               "config": {"strategy": dict(params, name=strategy), "seed": 0,
                          "output": {"dir": str(path)}},
               "totals": {"energy_j": sum(r["energy_j"] for r in rounds),
                          "uplink_bytes": sum(r["uplink_bytes"] for r in rounds),
                          "downlink_bytes": 4000, "flops": 4e9, "clients_ok": 0,
                          "clients_failed": 0, "clients_dropped": 0}}
    atomic_write_text(path / "summary.json", json.dumps(summary))
    if boards is not None:
        atomic_write_text(path / "boards.json", json.dumps(boards))
    return summary


def _table(md, heading):
    """The first markdown table after ``heading``: {first cell: [cells]}."""
    lines = md[md.index(heading):].splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("|"))
    out = {}
    for ln in lines[start + 2:]:
        if not ln.startswith("|"):
            break
        cells = [c.strip() for c in ln.strip("|").split("|")]
        out[cells[0]] = cells
    return out


def _pct(cell):
    assert cell.endswith(" %"), cell
    return float(cell[:-2]) / 100


@pytest.fixture()
def hybrid(tmp_path):
    d = tmp_path / "hybrid"
    write_run(d, _client_rows(), boards=BOARDS)
    return d


def test_measured_vs_estimated_numbers(hybrid):
    cmp = {c.label: c for c in measured_vs_estimated(load_run(hybrid))}
    assert set(cmp) == {"rpi4", "rpi4 (emulated)", "jetson-nano-5w"}
    a = cmp["rpi4"]
    assert a.boards == [UUID_A] and a.est_provenance == ["calibrated-estimate"]
    assert (a.time.n, a.time.median_measured, a.time.median_estimated) == (3, 4.0, 3.0)
    assert a.time.median_rel_error == pytest.approx(0.10)
    assert a.time.max_rel_error == pytest.approx(0.25)
    assert (a.energy.n, a.energy.median_measured, a.energy.median_estimated) == (3, 20.0, 24.0)
    assert a.energy.median_rel_error == pytest.approx(0.10)
    assert a.energy.max_rel_error == pytest.approx(0.20)
    b = cmp["rpi4 (emulated)"]
    assert b.time.n == 2 and b.energy is None          # no sensor: energy is not compared
    assert b.time.median_measured == pytest.approx(2.0)
    assert b.time.median_estimated == pytest.approx(1.95)
    assert b.time.median_rel_error == pytest.approx(0.35)
    assert b.time.max_rel_error == pytest.approx(0.5)
    c = cmp["jetson-nano-5w"]
    assert c.est_provenance == ["estimated"] and c.time.max_rel_error == pytest.approx(0.25)


def test_report_section_link_table_and_plots(hybrid):
    md = write_report(hybrid).read_text()
    t = _table(md, "## Measured vs estimated, per device class")
    row = t["rpi4"]       # boards, rounds, median meas, median est, median err, max err
    assert int(row[1]) == 1 and int(row[2]) == 3
    assert float(row[3]) == pytest.approx(4.0) and float(row[4]) == pytest.approx(3.0)
    assert _pct(row[5]) == pytest.approx(0.10) and _pct(row[6]) == pytest.approx(0.25)
    row = t["rpi4 (emulated)"]
    assert int(row[2]) == 2 and _pct(row[5]) == pytest.approx(0.35)
    assert _pct(row[6]) == pytest.approx(0.5)
    e = _table(md, "Energy, where a sensor measured it")
    assert set(e) == {"rpi4"}
    assert float(e["rpi4"][2]) == pytest.approx(20.0) and float(e["rpi4"][3]) == pytest.approx(24)
    assert _pct(e["rpi4"][4]) == pytest.approx(0.10) and _pct(e["rpi4"][5]) == pytest.approx(0.2)
    # where the estimate comes from, and that the comparison is not circular
    assert "BENCH per-layer micro-benchmarks" in md and "whole TRAIN round" in md
    assert "without a profile-driven slow-down" in md
    assert "`calibration/rpi4.toml` calibrated on 96 BENCH" in md
    assert "jetson-nano-5w: estimate (estimated) from the shipped `jetson-nano-5w` profile" in md
    # the link, per board: transfer beside compute, bytes
    link = _table(md, "## Link")
    a = link["board0"]    # client, board, device, rounds, transfer, compute, share, up, down
    assert a[1] == UUID_A and int(a[3]) == 3
    assert float(a[4]) == pytest.approx(1.0) and float(a[5]) == pytest.approx(11.0)
    assert _pct(a[6]) == pytest.approx(1 / 12, abs=5e-4)
    assert (int(a[7]), int(a[8])) == (3000, 7000)
    assert set(link) == {"board0", "board1", "board2"}
    # boards.json is listed; provenance per quantity, boards and simulated apart
    boards = _table(md, "## Boards")
    assert boards["board1"][4] == "yes" and boards["board0"][5] == "ina219"
    assert "time: boards measured/measured-emulated, simulated calibrated-estimate/estimated" in md
    assert "transfer: boards measured" in md
    assert "board unplugged" in md                     # the failed board round is listed
    for name in ("accuracy_vs_rounds", "accuracy_vs_energy", "accuracy_vs_uplink",
                 "energy_by_device", "measured_vs_estimated"):
        assert (hybrid / f"{name}.png").read_bytes()[:8] == PNG, name
        assert f"({name}.png)" in md


def test_link_by_board_skips_failed_rounds(hybrid):
    links = {b.client_id: b for b in link_by_board(load_run(hybrid))}
    assert links["board0"].rounds == 3          # round 4 failed with no costs
    assert links["board2"].transfer_share == pytest.approx(2.0 / 10.0)


def test_energy_plot_keeps_boards_apart_from_their_class(hybrid):
    rounds, by = energy_by_device(load_run(hybrid))
    assert rounds == [1, 2, 3, 4]
    assert set(by) == {"rpi4", "rpi4 (board)", "jetson-nano-5w (board)", "pixel4"}
    # boards of rpi4: A's sensor energy + B's estimate (3 x its estimated time)
    assert by["rpi4 (board)"].tolist() == pytest.approx([10 + 4.5, 20 + 7.2, 25, 0])
    assert by["rpi4"].tolist() == pytest.approx([2, 2, 2, 2])
    assert by["pixel4"].tolist() == pytest.approx([1, 1, 1, 0])   # round 4: dropped


def test_all_simulated_run_has_no_hybrid_section(tmp_path):
    rows = [_sim(r, f"c{r}", "rpi4", 2.0, "estimated") for r in (1, 2, 3, 4)]
    write_run(tmp_path, rows)
    md = write_report(tmp_path).read_text()
    assert "Measured vs estimated" not in md and "## Link" not in md
    assert not (tmp_path / "measured_vs_estimated.png").exists()
    assert "time: estimated" in md


def test_board_rows_without_estimates_say_so(tmp_path):
    rows = [_board(1, "board0", "rpi4", UUID_A, 2.0, "", 0.5, energy=6.0),
            _sim(1, "c1", "rpi4", 1, "estimated")]
    write_run(tmp_path, rows, accs=(0.5,))
    md = write_report(tmp_path).read_text()
    assert "No board round has both a measured compute time and an estimate." in md
    assert not (tmp_path / "measured_vs_estimated.png").exists()
    assert "## Link" in md


def test_malformed_boards_json_is_a_clear_error(tmp_path):
    write_run(tmp_path, _client_rows(), boards=[{"client_id": "board0", "device": "rpi4"}])
    with pytest.raises(ValueError, match="boards.json: board 0: 'board_uuid'"):
        write_report(tmp_path)


# ------------------------------------------------------------------------------ main-job layout
def _main_job(tmp_path):
    """runs/<name>/<strategy>/ per strategy, as the default ``sparsefl run`` writes them."""
    root = tmp_path / "runs" / "demo"
    rows = _client_rows()
    # fedavg: dense uplink (3x the bytes), higher energy; zerofl: less of both
    write_run(root / "fedavg", [dict(r, energy_j=2 * float(r.get("energy_j") or 0))
                                for r in rows], accs=(0.4, 0.6, 0.7, 0.8), strategy="fedavg",
              params={}, boards=BOARDS, uplink_scale=3)
    write_run(root / "zerofl", rows, accs=(0.3, 0.5, 0.6, 0.7), boards=BOARDS)
    return root


def test_compare_main_job_layout(tmp_path):
    root = _main_job(tmp_path)
    table, plot = compare([root], root)
    rows = {r.split("|")[1].strip(): [c.strip() for c in r.strip("|").split("|")]
            for r in table.splitlines()[2:]}
    assert set(rows) == {"fedavg", "zerofl(sparsity=0.9)"}
    fed, zf = rows["fedavg"], rows["zerofl(sparsity=0.9)"]
    assert float(fed[2]) == pytest.approx(0.8) and float(zf[2]) == pytest.approx(0.7)
    s_f = json.loads((root / "fedavg" / "summary.json").read_text())
    s_z = json.loads((root / "zerofl" / "summary.json").read_text())
    assert float(fed[3]) == pytest.approx(s_f["totals"]["energy_j"], rel=1e-3)
    assert float(zf[4]) == pytest.approx(s_z["totals"]["uplink_bytes"] / 1e6, rel=1e-3)
    assert float(fed[4]) == pytest.approx(3 * float(zf[4]), rel=1e-3)
    # neither dominates (fedavg: more accurate, zerofl: less energy): both on the front
    assert fed[5] == "yes" and zf[5] == "yes"
    assert plot == root / "pareto.png"
    for name in ("pareto", "accuracy_vs_energy", "accuracy_vs_uplink"):
        assert (root / f"{name}.png").read_bytes()[:8] == PNG
    cmp_md = (root / "comparison.md").read_text()
    assert table in cmp_md and "(accuracy_vs_uplink.png)" in cmp_md


def test_report_command_on_a_directory_of_runs(tmp_path, capsys):
    from fl_core.cli import main

    root = _main_job(tmp_path)
    assert main(["report", str(root)]) == 0
    out = capsys.readouterr().out
    assert "| fedavg |" in out and "| zerofl(sparsity=0.9) |" in out
    for strat in ("fedavg", "zerofl"):
        md = (root / strat / "report.md").read_text()
        assert "## Measured vs estimated, per device class" in md
        assert (root / strat / "measured_vs_estimated.png").is_file()
    assert (root / "comparison.md").is_file() and (root / "accuracy_vs_uplink.png").is_file()
    assert main(["report", str(tmp_path / "runs")]) == 2      # neither a run nor runs
    assert "not a run directory" in capsys.readouterr().err


def test_error_statistics_by_an_independent_route():
    """ErrorStats against statistics.median on the per-round errors (even and odd counts)."""
    from fl_core.report import ErrorStats

    meas, est = [1.0, 2.0, 4.0, 8.0], [1.1, 1.0, 4.4, 9.0]
    errs = [abs(e - m) / m for m, e in zip(meas, est, strict=True)]   # .1 .5 .1 .125
    s = ErrorStats.of(meas, est)
    assert s.median_rel_error == pytest.approx(statistics.median(errs)) == pytest.approx(0.1125)
    assert s.max_rel_error == pytest.approx(0.5)
    assert s.median_measured == 3.0 and s.median_estimated == pytest.approx(2.75)
    assert not math.isnan(ErrorStats.of([2.0], [3.0]).median_rel_error)
