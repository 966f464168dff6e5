"""Smoke tests of the two paper-direction benchmarks (tiny settings: digits, mlp, 2 rounds).

They run the scripts' own ``main`` end to end with ``--smoke`` (no Flower: Ray's start-up
alone takes ~20 s here) and check the records, not timings.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "benchmarks" /
                                                  f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod   # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def test_fl_tradeoff_smoke_records_and_resumes(tmp_path: Path) -> None:
    ft = _load("fl_tradeoff")
    out = tmp_path / "ft.json"
    argv = ["--smoke", "--only", "fedavg,zerofl-topk_weights-m0.1-s0.9", "--out", str(out),
            "--runs-dir", str(tmp_path / "runs")]
    doc = ft.main(argv)
    res = doc["results"]
    assert set(res) == {"fedavg|alpha=1|seed=0", "zerofl-topk_weights-m0.1-s0.9|alpha=1|seed=0"}
    for r in res.values():
        assert r["status"] == "completed" and r["rounds"] == 2
        assert 0.0 <= r["final_accuracy"] <= 1.0
        assert set(r["energy_j"]) == {"rpi4", "pixel4"}
        assert all(v > 0 for v in r["energy_j"].values())
        # rpi4 is the run's own fleet: the per-class pricing must reproduce the loop's total
        assert r["energy_check_rel"] < 1e-9
        assert r["energy_j"]["rpi4"] != r["energy_j"]["pixel4"]
        assert (Path(r["run_dir"]) / "rounds.csv").is_file()
    dense = res["fedavg|alpha=1|seed=0"]
    sparse = res["zerofl-topk_weights-m0.1-s0.9|alpha=1|seed=0"]
    assert sparse["uplink_mb"] < dense["uplink_mb"]   # a 90 %-sparse update is smaller
    on_disk = json.loads(out.read_text())
    assert on_disk["results"].keys() == res.keys()
    md = out.with_suffix(".md").read_text()
    assert "| 1 | fedavg | 0 |" in md and "zerofl-topk_weights-m0.1-s0.9" in md
    # resumable: a second call finds both results and runs nothing
    again = ft.main(argv)
    assert again["results"] == on_disk["results"]
    # other settings into the same file are refused rather than mixed
    with pytest.raises(SystemExit, match="other settings"):
        ft.main(argv + ["--epochs", "2"])


def test_fl_tradeoff_configs_and_bad_only() -> None:
    ft = _load("fl_tradeoff")
    keys = [m.key for m in ft.methods()]
    # fedavg + swat_fl x2 + zerofl (5 variants) x2 + feddst x2 + flash x2
    assert len(keys) == 17 and len(set(keys)) == 17
    flash = [m for m in ft.methods() if m.strategy == "flash"]
    assert sorted(m.params["density"] for m in flash) == [0.05, 0.1]
    with pytest.raises(SystemExit, match="unknown config"):
        ft.select(ft.parse_args(["--only", "nosuch"]))


def test_sim_throughput_smoke_ours(tmp_path: Path) -> None:
    st = _load("sim_throughput")
    out = tmp_path / "st.json"
    doc = st.main(["--smoke", "--no-flower", "--threads", "1", "--out", str(out),
                   "--runs-dir", str(tmp_path / "runs")])
    rows = doc["results"]
    assert [(r["side"], r["strategy"]) for r in rows] == [("ours", "fedavg"), ("ours", "zerofl")]
    for r in rows:
        assert r["rounds"] == 2
        assert r["rounds_per_hour"] > 0 and r["rounds_per_hour_end_to_end"] > 0
        assert r["end_to_end_s"] >= r["rounds_wall_s"]
        assert 0.0 <= r["final_accuracy"] <= 1.0
    assert "ratio_fedavg" not in doc
    assert json.loads(out.read_text())["workload"]["model"] == "mlp"


def test_train_step_quick_medians_count_every_layer_of_a_shape() -> None:
    """--quick measures one layer per shape; its medians still count layers, like a full run
    (a shape standing for three layers weighs three)."""
    ts = _load("train_step")

    def rec(layer, speedup, same=()):
        return {"op": "conv2d", "model": "m", "layer": layer, "threads": 2, "batch": 16,
                "sparsity": 0.95, "topk_period": 1, "sparse": True, "speedup": speedup,
                "same_shape_layers": list(same)}

    lines = ts.summarise([rec("a", 1.0), rec("b", 3.0, ["b2", "b3"]), rec("c", 2.0)])
    row = next(line for line in lines if "sparsity=0.95" in line)
    assert "median x3.00" in row and "min x1.00 (m a)" in row
    assert "over 5 layers (3 shapes measured)" in row
    full = ts.summarise([rec("a", 1.0), rec("b", 3.0), rec("c", 2.0)])
    assert "median x2.00" in full[1] and full[1].endswith("over 3 layers")


def test_train_step_counts_each_sides_page_faults() -> None:
    """The step rows' host counters: a side that maps and touches fresh memory every call (as
    torch's CPU allocator does) shows its page faults, a side that reuses its buffers none."""
    import numpy as np

    ts = _load("train_step")
    buf = np.ones(1 << 20, np.float32)  # (touched: its pages are in)

    def fresh():  # 64 MB: above glibc's largest mmap threshold, so mapped anew each call
        np.ones(16 << 20, np.float32)

    def reuse():
        buf.fill(1.0)

    host: dict = {}
    ts._median_interleaved(fresh, reuse, 4, 0.0, 1, host)
    assert host["ours_faults_per_call"] >= 10 > host["torch_faults_per_call"]
    assert host["ours_preempted_per_call"] >= 0 and host["torch_preempted_per_call"] >= 0


_FAULTS = """
import resource, sys
import numpy as np
sys.path.insert(0, {root!r})
if {steady}:
    from benchmarks.train_step import steady_allocator
    assert steady_allocator()
def call():   # three 1 MB blocks live at once, then freed
    blocks = [np.ones(1 << 18, np.float32) for _ in range(3)]
    del blocks
call()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(50):
    call()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_steady_allocator_stops_torch_style_blocks_faulting() -> None:
    """1 MB blocks allocated and freed per call (what torch's tensors do) fault their pages
    in on every call at glibc's defaults and not once the thresholds are raised (each in a
    fresh process: the setting is process-wide)."""
    import subprocess

    faults = {}
    for steady in (False, True):
        r = subprocess.run([sys.executable, "-c", _FAULTS.format(root=str(ROOT), steady=steady)],
                           capture_output=True, text=True, timeout=120, check=True)
        faults[steady] = int(r.stdout.split()[-1])
    assert faults[False] >= 50 * 10 and faults[True] < 50, faults


def test_slow_periods_summary_separates_slow_windows() -> None:
    """A window is slow when our 2-thread step exceeds 1.5x its fastest quartile's median;
    the summary's medians come from each group alone."""
    sp = _load("slow_periods")
    fast = {"ours_2t": 6.0, "ours_1t": 8.5, "ours_auto": 6.1, "torch_2t": 18.0,
            "copy_32mb": 3.0, "compute": 0.6}
    slow = dict(fast, ours_2t=11.0, ours_auto=8.6, torch_2t=21.0)
    s = sp.summarise([fast] * 6 + [slow] * 2)
    assert s["windows"] == 8 and s["slow_windows"] == 2 and s["base_ours_2t_ms"] == 6.0
    assert s["normal"]["ours_2t"] == 6.0 and s["slow"]["ours_2t"] == 11.0
    assert s["slow"]["torch_over_ours_2t"] == round(21.0 / 11.0, 3)
    assert s["slow"]["torch_over_ours_auto"] == round(21.0 / 8.6, 3)
    assert "slow" not in sp.summarise([fast] * 4)
    with pytest.raises(SystemExit):
        sp.main(["--seconds", "0"])


def test_thread_governor_summary_and_arguments() -> None:
    """Per side and phase medians and means in ms, and the fixed-2-thread / governed ratios;
    a phase a side did not run is left out."""
    tg = _load("thread_governor")
    times = {"fixed_2t": {"quiet": [5e-3, 6e-3, 7e-3], "hog": [12e-3, 30e-3]},
             "governor": {"quiet": [5e-3, 6e-3, 7e-3], "hog": [8e-3, 10e-3]},
             "fixed_1t": {"quiet": [8e-3], "hog": []}}
    s = tg.summarise(times)
    assert s["fixed_2t"]["hog"] == {"median_ms": 21.0, "mean_ms": 21.0, "steps": 2}
    assert s["fixed_2t_over_governor_hog"] == {"median": round(21 / 9, 3),
                                               "mean": round(21 / 9, 3)}
    assert s["fixed_2t_over_governor_quiet"]["median"] == 1.0
    assert "hog" not in s["fixed_1t"]
    for bad in (["--windows", "2"], ["--steps", "0"], ["--sparsity", "1"]):
        with pytest.raises(SystemExit):
            tg.main(bad)
