"""Run configs: the examples load, the resolved TOML round-trips, bad configs fail clearly;
the fleet's device mix, availability, charging windows and budgets."""

from __future__ import annotations

import glob
import os

import numpy as np
import pytest
import tomllib

from fl_core.cli import main
from fl_core.config import BUNDLED_QUICK, ConfigError, load_config, parse_config, resolved_toml
from fl_core.fleet import Fleet, FleetConfig, assign_devices

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = sorted(glob.glob(os.path.join(ROOT, "examples", "*.toml")))

BASE = {"rounds": 2, "clients_per_round": 2,
        "data": {"name": "digits", "partition": "iid", "num_clients": 4},
        "model": {"name": "mlp"}, "strategy": {"name": "fedavg"},
        "fleet": {"devices": {"rpi4": 1.0}}}


def _with(**changes):
    import copy

    doc = copy.deepcopy(BASE)
    for path, v in changes.items():
        keys = path.split("__")
        d = doc
        for k in keys[:-1]:
            d = d.setdefault(k, {})
        d[keys[-1]] = v
    return doc


def test_examples_cover_every_strategy_and_round_trip():
    from fl_core.config import strategy_names

    assert len(EXAMPLES) >= 8
    names = set()
    for path in EXAMPLES + [str(BUNDLED_QUICK)]:
        cfg = load_config(path)
        names.add(cfg.strategy_name)
        again = parse_config(tomllib.loads(resolved_toml(cfg)), "resolved")
        assert again.to_dict() == cfg.to_dict(), path
    assert names == set(strategy_names())
    quick = load_config(None)
    assert quick.strategy_name == "zerofl" and quick.strategy["sparsity"] == 0.9
    assert quick.data.num_clients == 10 and quick.rounds == 3
    with open(os.path.join(ROOT, "examples", "quick.toml"), "rb") as f:
        assert tomllib.load(f) == tomllib.loads(BUNDLED_QUICK.read_text())


def test_resolved_config_fills_defaults():
    cfg = parse_config(BASE)
    d = tomllib.loads(resolved_toml(cfg))
    assert d["eval_every"] == 1 and d["seed"] == 0 and d["threads"] == 1
    assert d["train"]["batch_size"] == 32 and d["train"]["threads"] == 1
    assert d["fleet"]["availability"] == 1.0 and d["output"]["dir"] == "runs/run"
    assert cfg.train_config().threads == 1


@pytest.mark.parametrize("doc, words", [
    (_with(roundz=3), ["unknown key 'roundz'", "rounds", "clients_per_round"]),
    (_with(rounds="3"), ["rounds", "integer", "str"]),
    (_with(rounds=0), ["rounds", ">= 1"]),
    (_with(data__name="imagenet"), ["[data] name", "imagenet", "mnist_small", "fashion_mnist"]),
    (_with(data__partition="zipf"), ["partition", "zipf", "lda", "pathological"]),
    (_with(data__colour=1), ["[data]", "colour", "num_clients"]),
    (_with(data__options={"bogus": 1}), ["options", "bogus", "normalize"]),
    (_with(model__name="vgg99"), ["[model] name", "vgg99", "lenet5"]),
    (_with(strategy__name="fedsgd"), ["[strategy] name", "fedsgd", "zerofl", "feddst"]),
    ({**BASE, "strategy": {"sparsity": 0.9}}, ["[strategy]", "name"]),
    (_with(train__lr=-1.0), ["lr", "expected a number > 0"]),
    (_with(train__learning_rate=0.1), ["learning_rate", "batch_size"]),
    (_with(fleet__devices={"iphone99": 1.0}), ["unknown device 'iphone99'", "pixel4", "rpi4"]),
    (_with(fleet__devices={"rpi4": 0.5, "pixel4": 0.3}), ["fleet", "sum to 1"]),
    (_with(fleet__availability=1.5), ["availability", "(0, 1]"]),
    (_with(fleet__deadline_s="soon"), ["deadline_s", "a number", "str"]),
    (_with(fleet__charging_only=["pixel4"]), ["charging_only", "pixel4", "not in fleet.devices"]),
    (_with(fleet__warp=1), ["[fleet]", "warp", "availability"]),
    (_with(output__path="x"), ["[output]", "path", "dir"]),
    (_with(clients_per_round=9), ["clients_per_round (9)", "num_clients (4)"]),
    (_with(min_clients=3), ["min_clients (3)", "clients_per_round (2)"]),
    ({**BASE, "data": "digits"}, ["[data] must be a table"]),
])
def test_bad_configs_name_the_key_and_the_allowed_values(doc, words):
    with pytest.raises(ConfigError) as e:
        parse_config(doc, "cfg.toml")
    msg = str(e.value)
    for w in words:
        assert w in msg, (w, msg)


def test_cli_reports_config_errors_without_traceback(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text('rounds = 2\n[fleet]\ndevices = { "toaster" = 1.0 }\n')
    assert main(["run", str(bad), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "sparsefl run: error:" in err and "toaster" in err and "rpi4" in err
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists()
    broken = tmp_path / "broken.toml"
    broken.write_text("rounds = = 2\n")
    assert main(["run", str(broken)]) == 2
    assert "not valid TOML" in capsys.readouterr().err
    assert main(["run", str(tmp_path / "missing.toml")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_cli_resume_of_a_non_run_dir_is_clear(tmp_path, capsys):
    assert main(["run", "--resume", str(tmp_path)]) == 2
    assert "not a run directory" in capsys.readouterr().err


# ------------------------------------------------------------------------------ fleet
def test_device_mix_counts_and_seeded_shuffle():
    mix = {"pixel4": 0.4, "rpi4": 0.3, "jetson-nano-5w": 0.3}
    devs = assign_devices(mix, 10, seed=3)
    assert sorted(devs) == sorted(["pixel4"] * 4 + ["rpi4"] * 3 + ["jetson-nano-5w"] * 3)
    assert devs == assign_devices(mix, 10, seed=3)
    assert devs != assign_devices(mix, 10, seed=4)
    # largest remainder: 7 clients of 0.4/0.3/0.3 -> 2.8, 2.1, 2.1 -> 3, 2, 2
    d7 = assign_devices(mix, 7, seed=0)
    assert d7.count("pixel4") == 3 and d7.count("rpi4") == 2


def test_availability_probability_and_reasons():
    fleet = Fleet(FleetConfig(devices={"rpi4": 1.0}, availability=0.3), 400, seed=0)
    dec = fleet.availability(1, list(range(400)), np.random.default_rng(0))
    online = sum(d.ok for d in dec)
    # Binomial(400, 0.3): mean 120, sd 9.2 -> within 5 sd
    assert 74 < online < 166
    assert all(d.reason == "unavailable (availability 0.3)" for d in dec if not d.ok)


def test_charging_window_by_local_hour():
    cfg = FleetConfig(devices={"pixel4": 0.5, "rpi4": 0.5}, charging_only=["pixel4"],
                      charging_window=[22.0, 7.0], round_hours=1.0, start_hour=0.0)
    fleet = Fleet(cfg, 2, seed=0)
    phone = fleet.devices.index("pixel4")
    pi = 1 - phone
    fleet.tz_offset = [0, 0]
    rng = np.random.default_rng(0)
    # round r is at hour r - 1: hours 0..6 and 22, 23 charge; 7..21 do not
    ok = {r: {d.client: d for d in fleet.availability(r, [0, 1], rng)} for r in range(1, 25)}
    for r in range(1, 25):
        hour = r - 1
        assert ok[r][pi].ok
        assert ok[r][phone].ok == (hour < 7 or hour >= 22), hour
        if not ok[r][phone].ok:
            assert f"local hour {hour}" in ok[r][phone].reason
            assert "charging window [22, 7)" in ok[r][phone].reason


def test_budget_checks_deadline_energy_and_battery():
    cfg = FleetConfig(devices={"pixel4": 1.0}, deadline_s=2.0, round_energy_budget_j=5.0,
                      battery_pct=1.0)
    fleet = Fleet(cfg, 1, seed=0)
    d = fleet.budget_check(0, {"time_s": 2.5, "energy_j": 1.0})
    assert not d.ok and d.reason.startswith("straggler") and "deadline 2 s" in d.reason
    d = fleet.budget_check(0, {"time_s": 1.0, "energy_j": 6.0})
    assert not d.ok and d.reason.startswith("energy budget")
    # 1 % of the Pixel 4's battery: its Wh from the profile, independently loaded
    from hwmodel.profiles import load_profile

    budget = load_profile("pixel4").battery_wh * 3600 * 0.01
    assert fleet.battery_left_j[0] == pytest.approx(budget)
    n = int(budget // 4.0)
    for _ in range(n):
        assert fleet.budget_check(0, {"time_s": 1.0, "energy_j": 4.0}).ok
        fleet.spend(0, 4.0)
    d = fleet.budget_check(0, {"time_s": 1.0, "energy_j": 4.0})
    assert not d.ok and d.reason.startswith("battery exhausted")
    # devices without a battery are not limited by battery_pct
    f2 = Fleet(FleetConfig(devices={"rpi4": 1.0}, battery_pct=1.0), 1, seed=0)
    assert f2.battery_left_j == [None]
    assert f2.budget_check(0, {"time_s": 1.0, "energy_j": 1e9}).ok
