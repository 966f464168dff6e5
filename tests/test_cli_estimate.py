"""``sparsefl estimate`` and ``sparsefl budget`` through the real CLI entry point."""

from __future__ import annotations

import csv
import io
import json

import pytest

import hwmodel
from fl_core.cli import main

CONTRACT_TOTALS = {"forward_macs", "train_flops", "params", "peak_memory_bytes", "time_s",
                   "energy_j", "uplink_bytes", "downlink_bytes"}


def run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_estimate_json_is_the_contract(capsys):
    code, out, _ = run(capsys, "estimate", "--model", "femnist_cnn", "--device", "rpi4",
                       "--sparsity", "0.9", "--batch", "16", "--samples", "64", "--format", "json")
    assert code == 0
    d = json.loads(out)
    assert set(d) == {"model", "device", "sparsity", "layers", "totals", "dense_totals",
                      "provenance", "flops_convention"}
    assert set(d["totals"]) == CONTRACT_TOTALS == set(d["dense_totals"])
    assert d["model"] == "femnist_cnn" and d["device"] == "rpi4" and d["sparsity"] == 0.9
    # same numbers as the Python API
    api = hwmodel.estimate("femnist_cnn", "rpi4", 0.9, batch=16, samples=64).to_dict()
    assert d == json.loads(json.dumps(api))
    assert d["totals"]["forward_macs"] < d["dense_totals"]["forward_macs"]
    assert d["dense_totals"]["forward_macs"] == 17_211_904 * 64


def test_estimate_table_and_csv(capsys, tmp_path):
    spec_path = tmp_path / "net.json"
    hwmodel.build("lenet5").save(str(spec_path))
    code, out, _ = run(capsys, "estimate", "--model", str(spec_path), "--device", "generic-x86",
                       "--sparsity", "0.5")
    assert code == 0
    assert "FLOPs = 2 x MACs" in out
    assert "dense" in out and "TOTAL" in out and "conv2" in out
    code, out, _ = run(capsys, "estimate", "--model", "lenet5", "--device", "rpi5", "--format",
                       "csv", "--mode", "masked", "--sparsity", "0.8")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].startswith("# FLOPs = 2 x MACs")
    rows = list(csv.DictReader(io.StringIO("\n".join(lines[1:]))))
    assert rows[-1]["name"] == "TOTAL"
    conv2 = next(r for r in rows if r["name"] == "conv2")
    assert float(conv2["forward_macs"]) == pytest.approx(0.2 * float(conv2["dense_forward_macs"]))


def test_estimate_unknown_names_list_known_ones(capsys):
    code, _, err = run(capsys, "estimate", "--model", "resnet99", "--device", "rpi4")
    assert code == 2 and "resnet8" in err and "femnist_cnn" in err
    code, _, err = run(capsys, "estimate", "--model", "mlp", "--device", "toaster")
    assert code == 2 and "rpi4" in err and "pixel4" in err
    code, _, err = run(capsys, "estimate", "--model", "mlp", "--device", "rpi4", "--sparsity", "1.5")
    assert code == 2 and "sparsity" in err


def test_budget_json_and_battery_rules(capsys):
    code, out, _ = run(capsys, "budget", "--device", "pixel4", "--model", "femnist_cnn",
                       "--sparsity", "0.9", "--battery-pct", "5", "--format", "json")
    assert code == 0
    d = json.loads(out)
    for key in ("energy_per_round_j", "time_per_round_s", "rounds_within_budget",
                "compute_energy_per_round_j", "radio_energy_per_round_j", "fits_ram",
                "sparsities_that_fit"):
        assert key in d
    assert d["energy_per_round_j"] == pytest.approx(
        d["compute_energy_per_round_j"] + d["radio_energy_per_round_j"]
        + d["idle_energy_per_round_j"])
    battery_j = hwmodel.load_profile("pixel4").battery_wh * 3600 * 0.05
    assert d["budget_j"] == pytest.approx(battery_j)
    assert d["rounds_within_budget"] == int(battery_j // d["energy_per_round_j"])
    # a board without a battery: --battery-pct is an error, --joules works
    code, _, err = run(capsys, "budget", "--device", "rpi4", "--model", "mlp", "--battery-pct", "5")
    assert code == 2 and "battery" in err and "--joules" in err
    code, out, _ = run(capsys, "budget", "--device", "rpi4", "--model", "mlp", "--joules", "100")
    assert code == 0 and "rounds within budget" in out and "FLOPs = 2 x MACs" in out


def test_budget_lte_radio(capsys):
    code, out, _ = run(capsys, "budget", "--device", "pixel4", "--model", "mlp", "--radio", "lte",
                       "--format", "json")
    assert code == 0
    assert json.loads(out)["radio"] == "lte"
