"""Estimates: the JSON contract, the roofline by hand, round roll-up, wire bytes, budgets, fleets."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest

import hwmodel
from hwmodel.counts import count
from hwmodel.estimator import budget, estimate, estimate_fleet
from hwmodel.plan import LayerSparsity, SparsityPlan
from hwmodel.profile import Cluster, DeviceProfile, Radio, SparseEfficiency, SparseKernel
from hwmodel.profiles import load_profile

CONTRACT_TOP = {"model", "device", "sparsity", "layers", "totals", "dense_totals"}
CONTRACT_LAYER = {"name", "type", "params", "forward_macs", "train_flops", "time_s", "energy_j"}
CONTRACT_TOTALS = {"forward_macs", "train_flops", "params", "peak_memory_bytes", "time_s",
                   "energy_j", "uplink_bytes", "downlink_bytes"}


def make_profile(**kw) -> DeviceProfile:
    d = dict(
        name="testdev", description="hand-made", clusters=[Cluster("big", 4, 1.5, 48.0)],
        train_cluster="big", ram_bytes=4 * 2**30, mem_bandwidth_gbs=5.0,
        efficiency={"conv": 0.3, "gemm": 0.4, "elementwise": 0.1},
        sparse_efficiency=SparseEfficiency((0.05, 0.1, 0.2, 0.5), (0.1, 0.2, 0.3, 0.6)),
        overhead_s=2e-5, idle_w=1.6, busy_w=5.0,
        radios={"wifi": Radio("wifi", 1e-7, 5e-8, 0.1, 20.0, 50.0)}, battery_wh=10.0)
    d.update(kw)
    return DeviceProfile(**d)


# ----------------------------------------------------------------------------- the contract
def test_json_has_exactly_the_contract_keys():
    est = estimate("femnist_cnn", make_profile(), sparsity=0.9, batch=16, samples=100)
    d = json.loads(json.dumps(est.to_dict()))
    assert set(d) == CONTRACT_TOP | {"provenance", "flops_convention"}
    assert set(d["totals"]) == CONTRACT_TOTALS
    assert set(d["dense_totals"]) == CONTRACT_TOTALS
    assert d["layers"] and all(set(x) == CONTRACT_LAYER for x in d["layers"])
    assert [x["name"] for x in d["layers"]][:-1] == [n.name for n in hwmodel.build("femnist_cnn")]
    assert d["model"] == "femnist_cnn" and d["device"] == "testdev" and d["sparsity"] == 0.9
    assert d["provenance"] == "estimated"
    assert "2 x MACs" in d["flops_convention"]
    for key in ("forward_macs", "train_flops", "time_s", "energy_j"):
        assert d["totals"][key] == pytest.approx(sum(x[key] for x in d["layers"]))
        assert d["totals"][key] < d["dense_totals"][key]
    # the dense side equals a dense estimate
    dense = estimate("femnist_cnn", make_profile(), sparsity=0.0, batch=16, samples=100)
    assert dense.to_dict()["totals"] == d["dense_totals"]


def test_calibrated_profile_gives_calibrated_estimate():
    prof = make_profile(fitted=("efficiency.conv",))
    assert estimate("mlp", prof).to_dict()["provenance"] == "calibrated-estimate"


def test_forward_macs_per_round():
    est = estimate("lenet5", make_profile(), 0.0, batch=10, samples=25, epochs=3)
    assert est.totals.forward_macs == 416_520 * 25 * 3
    assert est.steps == 9


# ----------------------------------------------------------------------------- the roofline
def test_roofline_by_hand_for_every_row():
    prof = make_profile()
    spec = hwmodel.build("mlp")
    est = estimate(spec, prof, 0.0, batch=8, samples=8)
    rows = count(spec, batch=8)
    peak = 48e9
    eff = {"conv": 0.3, "gemm": 0.4, "elementwise": 0.1}
    want = 0.0
    for r in rows.itertuples():
        compute = 2 * r.macs / (eff[r.op_class] * peak) + r.elem_flops / (0.1 * peak)
        mem = (r.bytes_read + r.bytes_written) / 5e9
        if compute + mem > 0:
            want += max(compute, mem) + 2e-5
    assert est.totals.time_s == pytest.approx(want, rel=1e-12)
    assert est.totals.energy_j == pytest.approx(5.0 * want, rel=1e-12)


def test_sparse_time_is_dense_time_times_density_over_efficiency():
    # compute-bound device without overhead: the backward-input row of a sparse layer
    # (no top-K, no bias add there) takes dense time x d / eff(d); at d = 0.2, eff = 0.3 (a table point)
    prof = make_profile(mem_bandwidth_gbs=1e9, overhead_s=0.0)
    spec = hwmodel.build("femnist_cnn")
    plan = SparsityPlan("swat", {"fc1": LayerSparsity(0.2, 0.2)})
    sp = estimate(spec, prof, plan=plan, batch=4, samples=4)
    rows = sp.sparse.rows.set_index(["layer", "phase"])["time_s"]
    dense_rows = sp.dense.rows.set_index(["layer", "phase"])["time_s"]
    assert rows[("fc1", "backward_input")] == pytest.approx(
        dense_rows[("fc1", "backward_input")] * 0.2 / 0.3, rel=1e-9)
    # between table points: linear in log-density (d = 0.3 between (0.2, 0.3) and (0.5, 0.6))
    plan = SparsityPlan("swat", {"fc1": LayerSparsity(0.3, 0.3)})
    eff = 0.3 + (0.6 - 0.3) * (math.log(0.3) - math.log(0.2)) / (math.log(0.5) - math.log(0.2))
    rows = estimate(spec, prof, plan=plan, batch=4, samples=4).sparse.rows.set_index(
        ["layer", "phase"])["time_s"]
    assert rows[("fc1", "backward_input")] == pytest.approx(
        dense_rows[("fc1", "backward_input")] * 0.3 / eff, rel=1e-9)


def test_round_rolls_up_full_and_remainder_steps():
    prof = make_profile()
    spec = hwmodel.build("lenet5")
    t32 = estimate(spec, prof, 0.5, batch=32, samples=32).totals.time_s
    t4 = estimate(spec, prof, 0.5, batch=4, samples=4).totals.time_s
    est = estimate(spec, prof, 0.5, batch=32, samples=100, epochs=2)
    assert est.totals.time_s == pytest.approx(2 * (3 * t32 + t4), rel=1e-12)


# ----------------------------------------------------------------------------- wire bytes
def _frame(name, shape, body):
    return 2 + len(name) + 4 + 8 + 4 * len(shape) + body


def test_uplink_and_downlink_bytes_by_hand():
    spec = hwmodel.build("mlp")  # fc1 784x200, fc2 200x200, fc3 200x10, with biases
    est = estimate(spec, make_profile(), sparsity=0.9, batch=10, samples=10)
    shapes = spec.param_shapes()
    down = 8 + sum(_frame(k, s, 4 * math.prod(s)) for k, s in shapes.items())
    assert est.totals.downlink_bytes == down
    # swat layers: all but the first and the classifier -> only fc2.weight is sparse, coo32
    nnz = round(0.1 * 200 * 200)
    up = 8 + sum(_frame(k, s, 4 * math.prod(s)) for k, s in shapes.items() if k != "fc2.weight")
    up += _frame("fc2.weight", (200, 200), 4 + nnz * 8)
    assert est.totals.uplink_bytes == up
    assert est.dense_totals.uplink_bytes == down
    total = sum(math.prod(s) for s in shapes.values())
    assert est.sparse.uplink_paper_csr_bytes == 8 * (total - 200 * 200 + nnz)


def test_batchnorm_buffers_travel_down_not_the_counter_up():
    spec = hwmodel.build("resnet8")
    est = estimate(spec, make_profile(), 0.0, batch=8, samples=8)
    n_bn = sum(1 for n in spec if n.op == "batchnorm2d")
    counter = len("bn1.num_batches_tracked")  # one example of the name lengths
    assert counter > 0
    diff = est.totals.downlink_bytes - est.totals.uplink_bytes
    names = [k for k in spec.buffer_shapes() if k.endswith("num_batches_tracked")]
    assert len(names) == n_bn
    assert diff == sum(2 + len(k) + 4 + 8 + 8 for k in names)  # 0-d int64 frames


# ----------------------------------------------------------------------------- budgets
def test_budget_rounds_energy_and_ram_verdict():
    prof = make_profile()
    b = budget("resnet8", prof, 0.9, samples=200, battery_pct=10)
    est = estimate("resnet8", prof, 0.9, samples=200)
    radio_time = 8 * est.totals.uplink_bytes / 20e6 + 8 * est.totals.downlink_bytes / 50e6
    radio_j = est.totals.uplink_bytes * 1e-7 + est.totals.downlink_bytes * 5e-8 + 0.1
    assert b.compute_energy_per_round_j == pytest.approx(est.totals.energy_j)
    assert b.radio_energy_per_round_j == pytest.approx(radio_j)
    assert b.idle_energy_per_round_j == pytest.approx(1.6 * radio_time)
    assert b.energy_per_round_j == pytest.approx(est.totals.energy_j + radio_j + 1.6 * radio_time)
    assert b.time_per_round_s == pytest.approx(est.totals.time_s + radio_time)
    assert b.budget_j == pytest.approx(3600.0)
    assert b.rounds_within_budget == math.floor(3600.0 / b.energy_per_round_j)
    assert b.fits_ram and "fits" in b.ram_verdict
    d = b.to_dict()
    for key in ("energy_per_round_j", "time_per_round_s", "rounds_within_budget"):
        assert key in d
    assert 0.9 in [o["sparsity"] for o in d["sparsity_options"]]
    # with a budget of one dense round, only the sparsities cheaper than dense fit... and dense
    dense = next(o for o in d["sparsity_options"] if o["sparsity"] == 0.0)
    tight = budget("resnet8", prof, 0.0, samples=200, joules=dense["energy_per_round_j"] * 1.5,
                   min_rounds=2)
    assert 0.0 not in tight.sparsities_that_fit
    for o in tight.sparsity_options:
        assert o["fits"] == (o["rounds_within_budget"] >= 2)


def test_budget_errors_and_small_ram():
    no_battery = make_profile(battery_wh=None)
    with pytest.raises(ValueError, match="no battery"):
        budget("mlp", no_battery, battery_pct=5)
    b = budget("mlp", no_battery, joules=100.0)
    assert b.rounds_within_budget == math.floor(100.0 / b.energy_per_round_j)
    with pytest.raises(ValueError, match="radio 'lte'.*wifi"):
        budget("mlp", make_profile(), radio="lte")
    tiny = make_profile(ram_bytes=1_000_000)
    b = budget("resnet8", tiny, 0.0, joules=1e6)
    assert not b.fits_ram and "does not fit" in b.ram_verdict
    assert b.sparsities_that_fit == []


def test_unknown_names_list_known_ones():
    with pytest.raises(ValueError, match="rpi4"):
        estimate("mlp", "no-such-device")
    with pytest.raises(ValueError, match="femnist_cnn"):
        estimate("no_such_model", make_profile())


def test_shipped_profiles_estimate():
    for name in ("rpi4", "generic-x86", "pixel4"):
        d = estimate("femnist_cnn", name, 0.9).to_dict()
        assert d["device"] == name and d["totals"]["time_s"] > 0


# ----------------------------------------------------------------------------- fleets
def test_fleet_agrees_with_per_client_estimates():
    rng = np.random.default_rng(1)
    profs = [make_profile(), load_profile("rpi4"),
             dataclasses.replace(make_profile(), name="slow", busy_w=2.0, overhead_s=1e-3)]
    n = 300
    dev_idx = rng.integers(0, 3, n)
    devices = [profs[i] for i in dev_idx]
    sparsity = rng.choice([0.0, 0.5, 0.9, 0.95, 0.37], n)
    samples = rng.integers(1, 400, n)
    epochs = rng.integers(1, 3, n)
    fleet = estimate_fleet("resnet8", devices, sparsity, samples, epochs, batch=16)
    assert len(fleet) == n
    for i in rng.choice(n, 12, replace=False):
        prof = devices[i]
        est = estimate("resnet8", prof, float(sparsity[i]), batch=16, samples=int(samples[i]),
                       epochs=int(epochs[i]))
        t = est.totals
        assert fleet.compute_time_s[i] == pytest.approx(t.time_s, rel=1e-6)
        assert fleet.compute_energy_j[i] == pytest.approx(t.energy_j, rel=1e-6)
        assert fleet.train_flops[i] == pytest.approx(t.train_flops, rel=1e-6)
        assert fleet.forward_macs[i] == pytest.approx(t.forward_macs, rel=1e-6)
        assert fleet.peak_memory_bytes[i] == pytest.approx(t.peak_memory_bytes, rel=1e-5)
        assert fleet.uplink_bytes[i] == t.uplink_bytes
        assert fleet.downlink_bytes[i] == t.downlink_bytes
        assert fleet.uplink_paper_csr_bytes[i] == est.sparse.uplink_paper_csr_bytes
        assert fleet.devices[i] == prof.name
        b = budget("resnet8", prof, float(sparsity[i]), batch=16, samples=int(samples[i]),
                   epochs=int(epochs[i]), joules=1e9, sparsities=())
        assert fleet.energy_j[i] == pytest.approx(b.energy_per_round_j, rel=1e-6)
        assert fleet.time_s[i] == pytest.approx(b.time_per_round_s, rel=1e-6)
    df = fleet.to_frame()
    assert len(df) == n and "energy_j" in df.columns


def test_fleet_masked_mode_and_names():
    fleet = estimate_fleet("femnist_cnn", ["generic-x86", "rpi4"], [0.8, 0.0], [50, 70],
                           mode="masked", batch=8)
    for i, (dev, s, n) in enumerate((("generic-x86", 0.8, 50), ("rpi4", 0.0, 70))):
        est = estimate("femnist_cnn", dev, s, mode="masked", batch=8, samples=n)
        assert fleet.compute_time_s[i] == pytest.approx(est.totals.time_s, rel=1e-6)
        assert fleet.provenance[i] == est.provenance.value
    with pytest.raises(ValueError, match="sparsity"):
        estimate_fleet("mlp", ["rpi4"] * 2, [0.5, 0.5, 0.5])
    with pytest.raises(TypeError, match="one device per client"):
        estimate_fleet("mlp", "rpi4")


def test_default_sparse_layers_follow_the_method():
    prof = make_profile()
    swat = estimate("lenet5", prof, 0.5, mode="swat", batch=4, samples=4).sparse.rows
    masked = estimate("lenet5", prof, 0.5, mode="masked", batch=4, samples=4).sparse.rows

    def dens(rows, layer):
        return rows[(rows.layer == layer) & (rows.phase == "forward")].density.item()

    # SWAT keeps the first layer and the classifier dense; FedDST-style masked sparsifies all
    assert dens(swat, "conv1") == 1.0 and dens(swat, "fc3") == 1.0 and dens(swat, "fc1") == 0.5
    assert dens(masked, "conv1") == 0.5 and dens(masked, "fc3") == 0.5


# ----------------------------------------------------------------------------- the richer model
def _table_eff(densities, effs, d):
    """Sparse-efficiency curve by hand: linear in log-density, clamped below, towards (1, 1)."""
    xs, ys = list(densities), list(effs)
    if xs[-1] < 1.0:
        xs, ys = xs + [1.0], ys + [1.0]
    if d >= 1.0:
        return 1.0
    d = max(d, xs[0])
    for x0, y0, x1, y1 in zip(xs, ys, xs[1:], ys[1:], strict=False):
        if x0 <= d <= x1:
            return y0 + (y1 - y0) * (math.log(d) - math.log(x0)) / (math.log(x1) - math.log(x0))
    raise AssertionError(d)


@pytest.mark.parametrize("name", ["rpi4", "pixel4", "generic-x86"])
def test_shipped_profile_estimate_is_the_plain_roofline(name):
    """A shipped (old-format) profile: every row is max(compute, memory) + overhead_s with the
    op-class efficiencies and the sparse curve, as before the optional fields existed."""
    prof = load_profile(name)
    peak = prof.cluster.peak_gflops * 1e9
    spec = hwmodel.build("lenet5")
    plan = SparsityPlan.uniform(spec, 0.7, mode="swat")
    est = estimate(spec, prof, plan=plan, batch=8, samples=8)
    se = prof.sparse_efficiency
    want = 0.0
    for r in count(spec, plan, batch=8).itertuples():
        cls = {"conv2d": "conv", "linear": "gemm"}.get(r.type, "elementwise")
        e = prof.efficiency[cls]
        compute = (2 * r.dense_macs * r.density / _table_eff(se.densities, se.efficiency, r.density)
                   / (e * peak) + r.elem_flops / (prof.efficiency["elementwise"] * peak))
        mem = (r.bytes_read + r.bytes_written) / (prof.mem_bandwidth_gbs * 1e9)
        if compute + mem > 0:
            want += max(compute, mem) + prof.overhead_s
    assert est.totals.time_s == pytest.approx(want, rel=1e-12)


def test_refined_model_by_hand_for_every_row():
    eff = {"conv": 0.3, "gemm": 0.4, "elementwise": 0.1, "conv_backward_weight": 0.2,
           "gemm_forward": 0.35, "pool_forward": 0.01, "pool": 0.02, "activation": 0.05,
           "update": 0.25, "topk": 0.03, "compress": 0.04}
    kernels = {"conv_forward": SparseKernel(0.5, 0.1), "gemm_backward_weight": SparseKernel(0.3, 0.2)}
    prof = make_profile(efficiency=eff, sparse_kernels=kernels, compress_nnz_s=3e-9,
                        overheads={"conv": 1e-5, "pool": 7e-6, "update": 2e-6},
                        cache_bytes=200_000, cache_bandwidth_gbs=20.0, overlap=0.25)
    spec = hwmodel.build("lenet5")
    plan = SparsityPlan("swat", {"conv2": LayerSparsity(0.2, 0.3), "fc1": LayerSparsity(0.1, 0.4)})
    est = estimate(spec, prof, plan=plan, batch=8, samples=8)
    peak = 48e9
    se = prof.sparse_efficiency
    kinds = {"conv2d": "conv", "linear": "gemm", "maxpool2d": "pool", "relu": "activation",
             "flatten": "activation", "cross_entropy": "loss"}
    want = 0.0
    for r in count(spec, plan, batch=8).itertuples():
        kind = "update" if r.phase == "update" else kinds[r.type]
        half = "forward" if r.phase == "forward" else "backward"
        if kind in ("conv", "gemm"):
            e_mac = eff.get(f"{kind}_{r.phase}", eff[kind])
            e_el = eff["elementwise"]
        else:
            e_mac = 1.0
            e_el = eff.get(f"{kind}_{half}", eff.get(kind, eff["elementwise"]))
        d = r.density
        if d < 1:
            sk = kernels.get(f"{kind}_{r.phase}")
            phi = d / sk.efficiency + sk.fixed if sk else d / _table_eff(se.densities, se.efficiency, d)
        else:
            phi = 1.0
        compute = (2 * r.dense_macs / (e_mac * peak) * phi
                   + (r.elem_flops - r.topk_flops - r.compress_flops) / (e_el * peak)
                   + r.topk_flops / (0.03 * peak) + r.compress_flops / (0.04 * peak)
                   + r.compress_nnz * 3e-9)
        nbytes = r.bytes_read + r.bytes_written
        mem = nbytes / ((20.0 if nbytes <= 200_000 else 5.0) * 1e9)
        overhead = {"conv": 1e-5, "pool": 7e-6, "update": 2e-6}.get(kind, 2e-5)
        if compute + mem > 0:
            want += max(compute, mem) + 0.75 * min(compute, mem) + overhead
    assert est.totals.time_s == pytest.approx(want, rel=1e-12)
    plain = estimate(spec, make_profile(), plan=plan, batch=8, samples=8)
    assert abs(plain.totals.time_s / est.totals.time_s - 1) > 0.05  # the refinements matter
    # the sparse rows really took the kernel path and the book-keeping was charged
    rows = count(spec, plan, batch=8).set_index(["layer", "phase"])
    assert rows.loc[("conv2", "forward"), "compress_nnz"] > 0
    # the fleet agrees with the per-client estimate under the refinements too
    fleet = estimate_fleet(spec, [prof, prof], sparsity=[0.0, 0.8], samples=40, radio=None)
    one = estimate(spec, prof, 0.8, batch=32, samples=40)
    assert fleet.compute_time_s[1] == pytest.approx(one.totals.time_s, rel=1e-6)
    zero = estimate(spec, prof, 0.0, batch=32, samples=40)
    assert fleet.compute_time_s[0] == pytest.approx(zero.totals.time_s, rel=1e-6)
