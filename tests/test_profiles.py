"""Device profiles: shipped data, schema validation errors, TOML round trip, sparse efficiency, CLI."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import math
from pathlib import Path

import numpy as np
import pytest

from fl_core.commands import profiles as profiles_cmd
from hwmodel.profile import OP_CLASSES, SparseEfficiency
from hwmodel.profiles import (
    ProfileError,
    efficiency_at,
    list_profiles,
    load_profile,
    profile_dir,
    profile_to_toml,
    save_profile,
    value_paths,
)

REQUIRED = ["rpi4", "rpi4-1.8ghz", "rpi5", "jetson-nano-5w", "jetson-nano-10w",
            "jetson-orin-nano", "pixel4", "galaxy-s23", "generic-x86"]
PHONES = {"pixel4", "galaxy-s23"}


# ----------------------------------------------------------------------------- shipped data

def test_required_profiles_are_shipped_in_the_package_dir():
    d = profile_dir()
    assert (d / "__init__.py").is_file()  # a package, so importlib.resources finds it in a wheel
    assert set(REQUIRED) <= set(list_profiles())
    assert list_profiles() == sorted(list_profiles())


@pytest.mark.parametrize("name", list_profiles())
def test_every_shipped_profile_loads_and_every_value_has_a_source(name):
    p = load_profile(name)
    assert p.name == name
    assert Path(p.path).name == f"{name}.toml"
    paths = [path for path, _, _ in value_paths(p)]
    assert set(p.sources) == set(paths)
    for path in paths:
        assert p.sources[path].strip(), f"{name}: {path} has an empty source"
    assert set(p.efficiency) == set(OP_CLASSES)
    assert p.cluster.name == p.train_cluster
    assert p.busy_w >= p.idle_w > 0
    assert not p.calibrated  # shipped profiles are literature profiles
    # the defaults that calibration replaces say so
    for path in ("efficiency.gemm", "sparse_efficiency.efficiency", "overhead_s"):
        assert "calibration" in p.sources[path]


@pytest.mark.parametrize("name", list_profiles())
def test_peaks_are_cores_times_clock_times_flops_per_cycle(name):
    # FP32 peak = cores x GHz x FLOP/cycle with 8 (one 128-bit FMA), 16 (two) or 32 (four / AVX2)
    for c in load_profile(name).clusters:
        per_cycle = c.peak_gflops / (c.cores * c.freq_ghz)
        assert min(abs(per_cycle - k) for k in (8, 16, 32)) < 1e-6, (name, c)


def test_phones_have_battery_and_lte_boards_only_wifi():
    for name in REQUIRED:
        p = load_profile(name)
        if name in PHONES:
            assert p.battery_wh is not None and p.battery_wh > 0
            assert set(p.radios) == {"wifi", "lte"}
        else:
            assert p.battery_wh is None
            assert set(p.radios) == {"wifi"}


def test_pixel4_clusters_and_default_big_cores():
    p = load_profile("pixel4")
    assert [c.name for c in p.clusters] == ["prime", "big", "little"]
    assert p.train_cluster == "big"
    assert (p.cluster.cores, p.cluster.freq_ghz) == (3, 2.42)  # 3x A76 at 2.42 GHz (WikiChip)
    # PROFILE_SOURCES: prime + big = "about 162 GFLOPS for all 4 big cores"
    prime = next(c for c in p.clusters if c.name == "prime")
    assert abs(prime.peak_gflops + p.cluster.peak_gflops - 162) < 1


def test_figures_match_the_collected_sources():
    # values re-derived by hand from shared/PROFILE_SOURCES.md
    assert load_profile("rpi4").mem_bandwidth_gbs == pytest.approx(5527 / 1000)  # STREAM Copy
    assert load_profile("rpi4-1.8ghz").busy_w == 7.2  # HPL at 1.8 GHz
    assert load_profile("rpi4-1.8ghz").efficiency["gemm"] == pytest.approx(11.889 / 28.8, abs=1e-3)
    assert load_profile("jetson-nano-10w").cluster.freq_ghz == pytest.approx(1.479)
    assert load_profile("jetson-nano-5w").cluster.cores == 2
    assert load_profile("pixel4").battery_wh == pytest.approx(2.8 * 3.85)  # 2800 mAh x 3.85 V
    assert load_profile("galaxy-s23").battery_wh == pytest.approx(3.9 * 3.85)


def test_radio_energy_follows_the_huang_model():
    # P[mW] = a_u*t_u + a_d*t_d + b with t in Mbit/s -> J per byte = 8e-9 * (a + b / t)
    huang = {"wifi": (283.17, 137.01, 132.86), "lte": (438.39, 51.97, 1288.04)}
    for name in ("pixel4", "rpi4"):
        for rname, r in load_profile(name).radios.items():
            a_u, a_d, b = huang[rname]
            assert r.up_j_per_byte == pytest.approx(8e-9 * (a_u + b / r.up_mbps), rel=1e-6)
            assert r.down_j_per_byte == pytest.approx(8e-9 * (a_d + b / r.down_mbps), rel=1e-6)
    lte = load_profile("pixel4").radios["lte"]
    assert (lte.up_mbps, lte.down_mbps) == (6.0, 13.0)  # medians in Huang et al.'s abstract
    assert lte.session_j == pytest.approx(1.28804 * (0.26 + 11.6), rel=1e-6)  # beta x (promo + tail)


def test_unconfirmed_marks_are_carried_over():
    # rows marked [U] in PROFILE_SOURCES.md: Huang's coefficients, the 3.85 V cell voltage
    p = load_profile("pixel4")
    assert "[U]" in p.sources["radios.lte.up_j_per_byte"]
    assert "[U]" in p.sources["power.battery_wh"]
    assert "[U]" in p.sources["power.busy_w"]  # "CPU power under load: not found [U]"
    assert "placeholder until benchmarks/calibrate_host.py" in load_profile("generic-x86").sources["power.busy_w"]


# ----------------------------------------------------------------------------- loading

def test_unknown_name_lists_the_known_names():
    with pytest.raises(ProfileError) as e:
        load_profile("rpi9")
    msg = str(e.value)
    assert "rpi9" in msg
    for name in REQUIRED:
        assert name in msg


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(ProfileError, match="nope.toml"):
        load_profile(tmp_path / "nope.toml")


def test_user_profile_by_path(tmp_path, monkeypatch):
    text = (profile_dir() / "rpi4.toml").read_text().replace('name = "rpi4"', 'name = "my-board"')
    (tmp_path / "my-board.toml").write_text(text)
    monkeypatch.chdir(tmp_path)
    p = load_profile("./my-board.toml")
    assert p.name == "my-board"
    assert p.cluster == load_profile("rpi4").cluster
    assert load_profile(p) is p


# ----------------------------------------------------------------------------- malformed profiles

BASE = (Path(__file__).resolve().parents[1] / "profiles" / "rpi4.toml").read_text()


def _write_bad(tmp_path: Path, old: str, new: str, name: str = "bad-board.toml") -> Path:
    assert old in BASE, old
    f = tmp_path / name
    f.write_text(BASE.replace(old, new, 1))
    return f


def _error(path: Path) -> str:
    with pytest.raises(ProfileError) as e:
        load_profile(path)
    return str(e.value)


def test_error_malformed_toml(tmp_path):
    f = _write_bad(tmp_path, 'train_cluster = "a72"', 'train_cluster = "a72')
    msg = _error(f)
    assert "bad-board.toml" in msg and "malformed TOML" in msg and "line" in msg


def test_error_missing_field(tmp_path):
    f = _write_bad(tmp_path, "busy_w = {", "# busy_w = {")
    msg = _error(f)
    assert "bad-board.toml" in msg and "power.busy_w" in msg and "missing" in msg


def test_error_missing_table(tmp_path):
    start = BASE.index("[efficiency]")
    end = BASE.index("[sparse_efficiency]")
    f = tmp_path / "bad-board.toml"
    f.write_text(BASE[:start] + BASE[end:])
    msg = _error(f)
    assert "bad-board.toml" in msg and "efficiency" in msg and "missing table" in msg


def test_error_misspelt_table(tmp_path):
    msg = _error(_write_bad(tmp_path, "[memory]\nram_bytes", "[memry]\nram_bytes"))
    assert "bad-board.toml" in msg and "memry" in msg and "unknown key" in msg


def test_error_unknown_key(tmp_path):
    f = _write_bad(tmp_path, "[power]\n", "[power]\nstandby_w = { value = 1.0, unit = \"W\", source = \"x\" }\n")
    msg = _error(f)
    assert "bad-board.toml" in msg and "power.standby_w" in msg and "unknown key" in msg
    assert "idle_w" in msg  # says what was expected


def test_error_unknown_key_inside_a_value(tmp_path):
    f = _write_bad(tmp_path, "idle_w = { value = 1.6, unit", "idle_w = { value = 1.6, note = \"x\", unit")
    msg = _error(f)
    assert "bad-board.toml" in msg and "power.idle_w.note" in msg and "unknown key" in msg


def test_error_wrong_unit(tmp_path):
    f = _write_bad(tmp_path, 'freq_ghz = { value = 1.5, unit = "GHz"', 'freq_ghz = { value = 1500, unit = "MHz"')
    msg = _error(f)
    assert "bad-board.toml" in msg and "clusters.a72.freq_ghz.unit" in msg
    assert "'GHz'" in msg and "'MHz'" in msg


@pytest.mark.parametrize("bad", ['"four"', "4.5", "true"])
def test_error_wrong_type(tmp_path, bad):
    f = _write_bad(tmp_path, "cores = { value = 4,", f"cores = {{ value = {bad},")
    msg = _error(f)
    assert "bad-board.toml" in msg and "clusters.a72.cores.value" in msg and "integer" in msg


def _replace_line(tmp_path: Path, prefix: str, new: str) -> Path:
    lines = BASE.splitlines()
    assert sum(ln.startswith(prefix) for ln in lines) == 1, prefix
    f = tmp_path / "bad-board.toml"
    f.write_text("\n".join(new if ln.startswith(prefix) else ln for ln in lines) + "\n")
    return f


def test_error_value_not_a_table(tmp_path):
    msg = _error(_replace_line(tmp_path, "idle_w", "idle_w = 1.6"))
    assert "bad-board.toml" in msg and "power.idle_w" in msg and "expected a table" in msg


@pytest.mark.parametrize("old,new,field", [
    ("busy_w = { value = 5.2", "busy_w = { value = -5.2", "power.busy_w.value"),
    ("idle_w = { value = 1.6", "idle_w = { value = 0", "power.idle_w.value"),
    ("freq_ghz = { value = 1.5", "freq_ghz = { value = 0.0", "clusters.a72.freq_ghz.value"),
    ("freq_ghz = { value = 1.5", "freq_ghz = { value = -1.5", "clusters.a72.freq_ghz.value"),
])
def test_error_negative_or_zero_power_or_frequency(tmp_path, old, new, field):
    msg = _error(_write_bad(tmp_path, old, new))
    assert "bad-board.toml" in msg and field in msg and "> 0" in msg


def test_error_busy_below_idle(tmp_path):
    msg = _error(_write_bad(tmp_path, "busy_w = { value = 5.2", "busy_w = { value = 1.0"))
    assert "bad-board.toml" in msg and "power.busy_w" in msg and "idle_w" in msg


@pytest.mark.parametrize("new", ['source = ""', 'source = "   "', 'sauce = "x"'])
def test_error_missing_source(tmp_path, new):
    old = 'source = "github.com/geerlingguy/top500-benchmark README [S]: CM4 (same BCM2711) at 1.5 GHz running HPL, 5.2 W; a CM4, not a Pi 4 B board, so the B\'s USB/Ethernet hub power is not included [U]"'
    msg = _error(_write_bad(tmp_path, old, new))
    assert "bad-board.toml" in msg and "power.busy_w" in msg


def test_error_missing_source_key_says_why(tmp_path):
    msg = _error(_replace_line(tmp_path, "idle_w", 'idle_w = { value = 1.6, unit = "W" }'))
    assert "bad-board.toml" in msg and "power.idle_w.source" in msg and "source" in msg


@pytest.mark.parametrize("bad", ["1.2", "0", "-0.1"])
def test_error_efficiency_outside_unit_interval(tmp_path, bad):
    msg = _error(_write_bad(tmp_path, "gemm = { value = 0.476", f"gemm = {{ value = {bad}"))
    assert "bad-board.toml" in msg and "efficiency.gemm.value" in msg and "(0, 1]" in msg


def test_error_sparse_table_not_sorted(tmp_path):
    msg = _error(_write_bad(tmp_path, "value = [0.05, 0.1, 1.0]", "value = [0.1, 0.05, 1.0]"))
    assert "bad-board.toml" in msg and "sparse_efficiency" in msg and "increasing" in msg


def test_error_sparse_table_mismatched_lengths(tmp_path):
    msg = _error(_write_bad(tmp_path, "value = [0.1025, 0.1175, 1.0]", "value = [0.1025, 1.0]"))
    assert "bad-board.toml" in msg and "sparse_efficiency" in msg and "lengths" in msg


def test_error_sparse_efficiency_below_one_at_density_one(tmp_path):
    msg = _error(_write_bad(tmp_path, "value = [0.1025, 0.1175, 1.0]", "value = [0.1025, 0.1175, 0.9]"))
    assert "bad-board.toml" in msg and "sparse_efficiency.efficiency" in msg and "density 1" in msg


def test_error_train_cluster_unknown(tmp_path):
    msg = _error(_write_bad(tmp_path, 'train_cluster = "a72"', 'train_cluster = "big"'))
    assert "bad-board.toml" in msg and "train_cluster" in msg and "a72" in msg


def test_error_fitted_needs_measured_source(tmp_path):
    msg = _error(_write_bad(tmp_path, "fitted = []", 'fitted = ["efficiency.gemm"]'))
    assert "bad-board.toml" in msg and "efficiency.gemm" in msg and "measured" in msg
    msg = _error(_write_bad(tmp_path, "fitted = []", 'fitted = ["efficiency.gemmm"]'))
    assert "efficiency.gemmm" in msg and "not a value path" in msg


def test_error_is_a_value_error():
    assert issubclass(ProfileError, ValueError)


# ----------------------------------------------------------------------------- round trip

@pytest.mark.parametrize("name", list_profiles())
def test_round_trip_of_every_shipped_profile(tmp_path, name):
    p = load_profile(name)
    q = load_profile(save_profile(p, tmp_path / f"{name}.toml"))
    assert q == p
    assert q.path == str(tmp_path / f"{name}.toml")


def test_round_trip_of_a_calibrated_profile(tmp_path):
    p = load_profile("rpi4")
    sources = dict(p.sources)
    sources["efficiency.gemm"] = 'measured: "fit" on 3 models\\ leave-one-model-out, 12 % \u2248 p90\nok'
    sources["sparse_efficiency.efficiency"] = "measured: benchmarks/calibrate_host.py"
    cal = dataclasses.replace(
        p, efficiency={**p.efficiency, "gemm": 0.1 + 0.2},  # a float with a long repr
        sparse_efficiency=SparseEfficiency((0.02, 0.05, 0.1, 0.5), (0.05, 0.1, 0.13, 0.6)),
        sources=sources, fitted=("efficiency.gemm", "sparse_efficiency.efficiency"),
        overhead_s=1.5e-5,
    )
    q = load_profile(save_profile(cal, tmp_path / "cal.toml"))
    assert q == cal
    assert q.calibrated and q.fitted == cal.fitted
    assert q.efficiency["gemm"] == 0.1 + 0.2


def test_save_refuses_a_value_without_source():
    p = load_profile("rpi5")
    sources = {k: v for k, v in p.sources.items() if k != "power.idle_w"}
    with pytest.raises(ProfileError, match="power.idle_w"):
        profile_to_toml(dataclasses.replace(p, sources=sources))
    with pytest.raises(ProfileError, match="power.battery_wh"):  # a stray source
        profile_to_toml(dataclasses.replace(p, sources={**p.sources, "power.battery_wh": "x"}))


def test_save_validates_values():
    p = load_profile("rpi5")
    with pytest.raises(ProfileError, match="power.busy_w"):
        profile_to_toml(dataclasses.replace(p, busy_w=-1.0))


# ----------------------------------------------------------------------------- efficiency_at

SE = SparseEfficiency(densities=(0.1, 0.4), efficiency=(0.2, 0.5))


def test_efficiency_at_table_points():
    p = load_profile("rpi4").sparse_efficiency
    for d, e in zip(p.densities, p.efficiency, strict=True):
        assert efficiency_at(p, d) == pytest.approx(e)
    assert efficiency_at(SE, 0.1) == pytest.approx(0.2)
    assert efficiency_at(SE, 0.4) == pytest.approx(0.5)


def test_efficiency_at_interpolates_in_log_density():
    # 0.2 is the geometric midpoint of 0.1 and 0.4 -> the arithmetic mean of 0.2 and 0.5
    assert efficiency_at(SE, 0.2) == pytest.approx(0.35)
    # not linear in density: the linear value at 0.2 would be 0.3
    # beyond the last point the curve runs to (1, 1): at 0.4**0.5 = 0.632..., halfway in log
    assert efficiency_at(SE, math.sqrt(0.4)) == pytest.approx(0.75)
    assert efficiency_at(SE, 1.0) == 1.0
    assert efficiency_at(SE, 3.0) == 1.0
    assert efficiency_at(SE, 0.01) == pytest.approx(0.2)  # clamped below the first point


def test_efficiency_at_is_vectorised():
    d = np.array([[0.01, 0.1, 0.2], [0.4, math.sqrt(0.4), 1.0]])
    out = efficiency_at(SE, d)
    assert isinstance(out, np.ndarray) and out.shape == d.shape
    np.testing.assert_allclose(out, [[0.2, 0.2, 0.35], [0.5, 0.75, 1.0]])
    assert np.isnan(efficiency_at(SE, np.array([np.nan])))[0]
    assert isinstance(efficiency_at(SE, 0.3), float)


def test_efficiency_at_rejects_a_bad_table():
    with pytest.raises(ProfileError, match="increasing"):
        efficiency_at(SparseEfficiency((0.4, 0.1), (0.5, 0.2)), 0.2)
    with pytest.raises(ProfileError, match="lengths"):
        efficiency_at(SparseEfficiency((0.1, 0.4), (0.5,)), 0.2)


# ----------------------------------------------------------------------------- CLI

def _run_cmd(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    profiles_cmd.add_parser(parser.add_subparsers(dest="command"))
    return profiles_cmd.run(parser.parse_args(["profiles", *argv]))


def _check_json(out: str) -> None:
    rows = json.loads(out)
    assert [r["name"] for r in rows] == list_profiles()
    for r in rows:
        for key in ("cores", "freq_ghz", "peak_gflops", "ram_bytes", "mem_bandwidth_gbs", "idle_w", "busy_w"):
            assert isinstance(r[key], (int, float)) and r[key] > 0
            assert r["sources"][key].strip()
        assert (r["battery_wh"] is not None) == (r["name"] in PHONES)
    pixel = next(r for r in rows if r["name"] == "pixel4")
    assert pixel["cores"] == 3 and pixel["train_cluster"] == "big"


def test_profiles_command_json(capsys):
    assert _run_cmd(["--format", "json"]) == 0
    _check_json(capsys.readouterr().out)


def test_profiles_command_table_and_path(capsys, tmp_path):
    assert _run_cmd([]) == 0
    out = capsys.readouterr().out
    for name in list_profiles():
        assert name in out
    f = tmp_path / "mine.toml"
    f.write_text(BASE.replace('name = "rpi4"', 'name = "mine"'))
    assert _run_cmd([str(f)]) == 0
    assert "mine" in capsys.readouterr().out
    with pytest.raises(ProfileError, match="known profiles"):
        _run_cmd(["nosuch"])


def _cli_main():
    from fl_core import cli
    for module in cli.COMMANDS.values():  # sibling subcommands are written in parallel
        try:
            importlib.import_module(f"fl_core.commands.{module}")
        except ModuleNotFoundError:
            pytest.skip(f"fl_core.commands.{module} does not exist yet")
    return cli.main


def test_sparsefl_profiles_via_cli_main(capsys):
    main = _cli_main()
    assert main(["profiles", "--format", "json"]) == 0
    _check_json(capsys.readouterr().out)
    assert main(["profiles", "nosuch"]) == 2
    assert "known profiles" in capsys.readouterr().err


# ----------------------------------------------------------------------------- optional refinements

@pytest.mark.parametrize("name", list_profiles())
def test_old_format_profiles_get_the_neutral_defaults(name):
    p = load_profile(name)
    assert set(p.efficiency) == set(OP_CLASSES)  # no finer keys: every row uses its op class
    assert p.sparse_kernels == {} and p.overheads == {}
    assert p.compress_nnz_s == 0.0 and p.cache_bytes == 0 and p.cache_bandwidth_gbs is None
    assert p.overlap == 1.0  # the roofline max


_EXTRA = '''
[sparse_kernels]
conv_forward = { value = [0.6, 0.05], unit = "ratio", source = "measured: test" }
compress_nnz_s = { value = 2e-09, unit = "s", source = "measured: test" }

[overheads]
pool = { value = 8e-06, unit = "s", source = "measured: test" }
'''


def _with_extras(tmp_path: Path, extra: str = _EXTRA, mem: str = "", eff: str = "") -> Path:
    text = BASE
    if mem:
        text = text.replace("[memory]\n", "[memory]\n" + mem + "\n", 1)
    if eff:
        text = text.replace("[efficiency]\n", "[efficiency]\n" + eff + "\n", 1)
    f = tmp_path / "rich-board.toml"
    f.write_text(text + extra)
    return f


def test_optional_fields_load_and_round_trip(tmp_path):
    mem = ('cache_bytes = { value = 1048576, unit = "B", source = "lscpu: L2" }\n'
           'cache_bandwidth_gbs = { value = 30.0, unit = "GB/s", source = "measured: test" }\n'
           'overlap = { value = 0.0, unit = "fraction", source = "measured: test" }')
    eff = ('conv_backward_weight = { value = 0.2, unit = "fraction", source = "measured: test" }\n'
           'pool_forward = { value = 0.004, unit = "fraction", source = "measured: test" }')
    p = load_profile(_with_extras(tmp_path, mem=mem, eff=eff))
    assert p.efficiency["conv_backward_weight"] == 0.2 and p.efficiency["pool_forward"] == 0.004
    assert p.sparse_kernels["conv_forward"].efficiency == 0.6
    assert p.sparse_kernels["conv_forward"].fixed == 0.05
    assert p.compress_nnz_s == 2e-9 and p.overheads == {"pool": 8e-6}
    assert p.cache_bytes == 1048576 and p.cache_bandwidth_gbs == 30.0 and p.overlap == 0.0
    assert p.sources["sparse_kernels.conv_forward"] == "measured: test"
    again = load_profile(save_profile(p, tmp_path / "again.toml"))
    again.path = p.path
    assert again == p


def test_error_sparse_kernel_needs_two_numbers(tmp_path):
    bad = _EXTRA.replace("[0.6, 0.05]", "[0.6]")
    msg = _error(_with_extras(tmp_path, bad))
    assert "sparse_kernels.conv_forward.value" in msg and "two numbers" in msg
    msg = _error(_with_extras(tmp_path, _EXTRA.replace("[0.6, 0.05]", "[0.0, 0.05]")))
    assert "sparse_kernels.conv_forward.value[0]" in msg and "> 0" in msg


def test_error_unknown_optional_keys_and_bounds(tmp_path):
    msg = _error(_with_extras(tmp_path, _EXTRA.replace("pool = {", "pooling = {")))
    assert "overheads.pooling" in msg and "unknown key" in msg
    msg = _error(_with_extras(tmp_path, eff='pool_fwd = { value = 0.1, unit = "fraction", source = "x" }'))
    assert "efficiency.pool_fwd" in msg and "unknown key" in msg
    msg = _error(_with_extras(tmp_path, mem='overlap = { value = 1.5, unit = "fraction", source = "x" }'))
    assert "memory.overlap.value" in msg and "[0, 1]" in msg
    msg = _error(_with_extras(tmp_path, _EXTRA.replace('value = 8e-06, unit = "s"', 'value = 8e-06, unit = "ms"')))
    assert "overheads.pool.unit" in msg
