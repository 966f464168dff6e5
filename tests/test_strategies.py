"""Server halves of the methods (fl_core.strategies).

Aggregation rules are checked on hand-made client states whose update bytes come from
``UplinkRule.make_update`` (so the whole encode/decode path runs), against references written
here in plain numpy. A short end-to-end smoke per strategy runs ``embedded.run_task`` on
sklearn's digits.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from embedded.task import ClientResult, run_task
from embedded.train import TrainConfig
from embedded.uplink import UplinkRule, decode_masks
from fl_core.strategies import (
    STRATEGIES,
    ClientInfo,
    UpdateRejected,
    make_strategy,
)
from fl_core.strategies.aggregation import rescale_densities
from hwmodel.estimator import estimate, radio_cost, resolve_device
from hwmodel.spec import ModelSpec, make_node


def _spec() -> ModelSpec:
    nodes = [
        make_node("conv1", "conv2d", "input", out_channels=4, kernel=3, padding=1, bias=False),
        make_node("bn1", "batchnorm2d", "conv1"),
        make_node("relu1", "relu", "bn1"),
        make_node("conv2", "conv2d", "relu1", out_channels=8, kernel=3, padding=1),
        make_node("relu2", "relu", "conv2"),
        make_node("pool", "maxpool2d", "relu2", kernel=2),
        make_node("flat", "flatten", "pool"),
        make_node("fc1", "linear", "flat", out_features=32),
        make_node("relu3", "relu", "fc1"),
        make_node("fc2", "linear", "relu3", out_features=10),
    ]
    return ModelSpec("tiny", (1, 8, 8), nodes)


SPEC = _spec()
TRAIN = TrainConfig(lr=0.05, batch_size=32, epochs=1)
NS = [10, 30, 60]


def _clients(k: int = 3, **kw) -> list[ClientInfo]:
    return [ClientInfo(f"c{i}", num_samples=NS[i % 3], **kw) for i in range(k)]


def _local_states(s, k: int = 3, seed: int = 0, scale: float = 0.1) -> list[dict]:
    """Hand-made local states: the global state plus noise; BN counters differ per client."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(k):
        st = {}
        for name, v in s.weights.items():
            v = np.asarray(v)
            if v.dtype.kind != "f":
                st[name] = np.asarray(100 + 7 * i, dtype=v.dtype).reshape(v.shape)
            elif name.endswith("running_var"):
                st[name] = (v + rng.uniform(0.1, 1.0, v.shape)).astype(np.float32)
            else:
                st[name] = (v + scale * rng.standard_normal(v.shape)).astype(np.float32)
        out.append(st)
    return out


def _result(client: ClientInfo, rule: UplinkRule, local: dict, global_state: dict, plan,
            global_masks=None, local_masks=None, rnd: int = 1) -> tuple[ClientInfo, ClientResult]:
    upd = rule.make_update(local, global_state, plan, global_masks=global_masks,
                           local_masks=local_masks)
    return client, ClientResult(rnd, client.client_id, upd, client.num_samples)


def _p(ns) -> np.ndarray:
    n = np.asarray(ns, dtype=np.float64)
    return n / n.sum()


def _wmean(arrs, p) -> np.ndarray:
    return sum(pk * np.asarray(a, np.float64) for pk, a in zip(p, arrs, strict=True))


def _topk_ref(score: np.ndarray, k: int) -> np.ndarray:
    """Reference top-k by |score| (ties by lower index) as a bool mask."""
    a = np.abs(score).ravel()
    idx = np.argsort(-a, kind="stable")[:k]
    m = np.zeros(a.size, bool)
    m[idx] = True
    return m.reshape(score.shape)


def _is_float(name: str, s) -> bool:
    return np.asarray(s.weights[name]).dtype.kind == "f"


# ------------------------------------------------------------------------------ FedAvg
def test_fedavg_sample_weighted_mean_and_batchnorm_rules():
    s = make_strategy("fedavg", SPEC, rounds=3, seed=0, train=TRAIN)
    s.initialize()
    g = {k: v.copy() for k, v in s.weights.items()}
    clients = _clients()
    locs = _local_states(s)
    res = [_result(c, UplinkRule("dense"), st, g, s.plan_for(1, c))
           for c, st in zip(clients, locs, strict=True)]
    m = s.aggregate_fit(1, res)
    assert m["clients"] == 3
    p = _p(NS)
    for name in g:
        if name.endswith("num_batches_tracked"):
            np.testing.assert_array_equal(s.weights[name], g[name])  # the server's own counter
            continue
        ref = _wmean([st[name] for st in locs], p)
        np.testing.assert_allclose(s.weights[name], ref, rtol=1e-6, atol=1e-7, err_msg=name)
        assert s.weights[name].dtype == np.float32
    # weighting matters: the unweighted mean of running_var is clearly different
    unweighted = np.mean([st["bn1.running_var"] for st in locs], axis=0)
    assert np.abs(s.weights["bn1.running_var"] - unweighted).max() > 1e-3


def test_fedavgm_server_momentum_two_rounds():
    lr, beta = 0.7, 0.5
    s = make_strategy("fedavgm", SPEC, rounds=3, seed=0, train=TRAIN, server_lr=lr,
                      server_momentum=beta)
    s.initialize()
    w = {k: v.astype(np.float64) for k, v in s.weights.items()}
    v: dict[str, np.ndarray] = {}
    clients = _clients()
    p = _p(NS)
    for rnd in (1, 2):
        g = {k: x.copy() for k, x in s.weights.items()}
        locs = _local_states(s, seed=rnd)
        res = [_result(c, UplinkRule("dense"), st, g, s.plan_for(rnd, c))
               for c, st in zip(clients, locs, strict=True)]
        s.aggregate_fit(rnd, res)
        for name in g:
            if not _is_float(name, s):
                continue
            avg = _wmean([st[name] for st in locs], p)
            if "running" in name:
                w[name] = avg
            else:
                v[name] = (w[name] - avg) + (beta * v[name] if name in v else 0.0)
                w[name] = w[name] - lr * v[name]
            np.testing.assert_allclose(s.weights[name], w[name], rtol=1e-5, atol=1e-6,
                                       err_msg=f"round {rnd} {name}")
    # momentum really acts: round 2 is not plain FedAvg
    plain = _wmean([st["fc1.weight"] for st in locs], p)
    assert np.abs(s.weights["fc1.weight"] - plain).max() > 1e-3


# ------------------------------------------------------------------------------ ZeroFL
@pytest.mark.parametrize("convention", ["zeros_count", "nonzero_mean"])
@pytest.mark.parametrize("rule", ["topk_weights", "diff_topk_weights", "topk_diff"])
def test_zerofl_uplink_rules_and_zero_conventions(rule, convention):
    sp, mr = 0.8, 0.1
    s = make_strategy("zerofl", SPEC, rounds=5, seed=3, train=TRAIN, sparsity=sp, rule=rule,
                      mask_ratio=mr, zero_convention=convention)
    s.initialize()
    g = {k: v.copy() for k, v in s.weights.items()}
    plan = s.plan_for(1, ClientInfo("x"))
    assert sorted(plan.layers) == ["conv2", "fc1"]  # SWAT rule: not the first layer/classifier
    clients = _clients()
    locs = _local_states(s, seed=7)
    res = [_result(c, s.uplink_for(1, c), st, g, plan)
           for c, st in zip(clients, locs, strict=True)]
    s.aggregate_fit(1, res)
    p = _p(NS)
    for name in g:
        if not _is_float(name, s):
            np.testing.assert_array_equal(s.weights[name], g[name])
            continue
        layer = name.rsplit(".", 1)[0]
        if layer not in plan.layers or not name.endswith(".weight"):
            ref = _wmean([st[name] for st in locs], p)   # sent whole, absolute
        else:
            n = g[name].size
            k = int(math.floor((1 - sp + mr) * n + 0.5))
            sent = []
            for st in locs:
                d = st[name].astype(np.float64) - g[name]
                sel = _topk_ref(st[name] if rule != "topk_diff" else d, k)
                val = st[name] if rule == "topk_weights" else d
                sent.append(np.where(sel, val, 0.0))
            if convention == "zeros_count":
                agg = _wmean(sent, p)
            else:
                num = _wmean(sent, p)
                den = _wmean([(x != 0).astype(float) for x in sent], p)
                agg = np.where(den > 0, num / np.where(den > 0, den, 1), 0.0)
            ref = agg if rule == "topk_weights" else g[name] + agg
            if convention == "nonzero_mean":   # the convention changes the result
                zc = _wmean(sent, p) if rule == "topk_weights" else g[name] + _wmean(sent, p)
                assert np.abs(ref - zc).max() > 1e-4
        np.testing.assert_allclose(s.weights[name], ref, rtol=1e-5, atol=1e-6, err_msg=name)


def test_zerofl_learning_rate_decays_exponentially_per_round():
    s = make_strategy("zerofl", SPEC, rounds=10, train=TrainConfig(lr=0.1), lr_end=0.01)
    c = ClientInfo("a")
    for rnd in (1, 4, 10):
        assert s.train_config(rnd, c).lr == pytest.approx(0.1 * 0.1 ** ((rnd - 1) / 10))
    f = make_strategy("flash", SPEC, rounds=6, train=TrainConfig(lr=0.1), lr_horizon=1000)
    assert f.train_config(3, c).lr == pytest.approx(0.1 * 0.01 ** (2 / 1000))  # 0.1 -> 0.001


# ------------------------------------------------------------------------------ FedDST
def _erk_ref(spec, layers, density):
    """ERK densities written out here: raw ∝ sum(shape)/prod(shape), capped, rescaled."""
    shp = {n: spec.param_shapes(n)[f"{n}.weight"] for n in layers}
    size = {n: math.prod(v) for n, v in shp.items()}
    dense: set[str] = set()
    while True:
        free = [n for n in layers if n not in dense]
        eps = (density * sum(size.values()) - sum(size[n] for n in dense)) / \
            sum(sum(shp[n]) for n in free)
        over = [n for n in free if eps * sum(shp[n]) / size[n] > 1]
        if not over:
            return {n: 1.0 if n in dense else eps * sum(shp[n]) / size[n] for n in layers}
        dense.update(over)


def test_feddst_init_is_erk_magnitude_prune_of_random_init():
    s = make_strategy("feddst", SPEC, rounds=10, seed=5, train=TRAIN, sparsity=0.7)
    s.initialize()
    ref = _erk_ref(SPEC, SPEC.weighted_layers(), 0.3)
    assert set(s.masks) == {n for n, d in ref.items() if d < 1}
    from embedded.network import Network

    init = Network.from_spec(SPEC, seed=5).state_dict()
    for n, m in s.masks.items():
        w = init[f"{n}.weight"]
        assert int(m.sum()) == int(math.floor(ref[n] * w.size + 0.5))
        np.testing.assert_array_equal(m, _topk_ref(w, int(m.sum())))
        np.testing.assert_array_equal(s.weights[f"{n}.weight"], np.where(m, w, 0))


def test_feddst_alpha_cosine_decay_and_stop_after_half():
    s = make_strategy("feddst", SPEC, rounds=100, alpha=0.2, readjust_interval=10)
    assert s.alpha_at(10) == pytest.approx(0.1 * (1 + math.cos(math.pi * 10 / 50)))
    assert s.alpha_at(11) == 0 and s.alpha_at(50) == 0 and s.alpha_at(60) == 0
    assert s.schedule_for(20, ClientInfo("a")).kind == "feddst"
    assert s.schedule_for(20, ClientInfo("a")).alpha == pytest.approx(s.alpha_at(20))
    assert s.schedule_for(21, ClientInfo("a")).kind == "fixed"


def test_feddst_masked_mean_union_and_reprune_to_erk():
    s = make_strategy("feddst", SPEC, rounds=10, seed=2, train=TRAIN, sparsity=0.6)
    s.initialize()
    g = {k: v.copy() for k, v in s.weights.items()}
    gm = {k: v.copy() for k, v in s.masks.items()}
    plan = s.plan_for(1, ClientInfo("x"))
    clients = _clients()
    rng = np.random.default_rng(11)
    locs = _local_states(s, seed=3)
    lmasks = []
    for i, st in enumerate(locs):
        lm = {}
        for n, m in gm.items():
            flat = m.ravel().copy()
            on, off = np.flatnonzero(flat), np.flatnonzero(~flat)
            j = 2 + 3 * i   # client i swaps a few positions (density kept)
            flat[rng.choice(on, j, replace=False)] = False
            flat[rng.choice(off, j, replace=False)] = True
            lm[n] = flat.reshape(m.shape)
            st[f"{n}.weight"] = np.where(lm[n], st[f"{n}.weight"], 0).astype(np.float32)
        lmasks.append(lm)
    res = [_result(c, s.uplink_for(1, c), st, g, plan, global_masks=gm, local_masks=lm)
           for c, st, lm in zip(clients, locs, lmasks, strict=True)]
    m = s.aggregate_fit(1, res)
    p = _p(NS)
    erk = _erk_ref(SPEC, SPEC.weighted_layers(), 0.4)
    assert m["server_pruned"] > 0
    for name in g:
        layer = name.rsplit(".", 1)[0]
        if name.endswith(".weight") and layer in gm:
            num = _wmean([np.where(lm[layer], st[name], 0) for st, lm in
                          zip(locs, lmasks, strict=True)], p)
            den = _wmean([lm[layer].astype(float) for lm in lmasks], p)
            agg = np.where(den > 0, num / np.where(den > 0, den, 1), 0)
            union = np.logical_or.reduce([lm[layer] for lm in lmasks])
            k = int(math.floor(erk[layer] * union.size + 0.5))
            assert union.sum() > k   # the union is denser: the server re-prunes
            score = np.where(union, np.abs(agg), -1.0)
            ref_mask = np.zeros(union.size, bool)
            ref_mask[np.argsort(-score.ravel(), kind="stable")[:k]] = True
            ref_mask = ref_mask.reshape(union.shape)
            np.testing.assert_array_equal(s.masks[layer], ref_mask)
            assert int(s.masks[layer].sum()) == k
            np.testing.assert_allclose(s.weights[name], np.where(ref_mask, agg, 0), rtol=1e-5,
                                       atol=1e-7)
        elif _is_float(name, s):
            np.testing.assert_allclose(s.weights[name], _wmean([st[name] for st in locs], p),
                                       rtol=1e-5, atol=1e-7, err_msg=name)


# ------------------------------------------------------------------------------ FLASH
def test_rescale_densities_caps_at_one():
    d = rescale_densities({"a": 0.9, "b": 0.1}, {"a": 10, "b": 90}, 0.5)
    # a would be 0.9·(50/18) > 1: capped; b takes the rest: (50 - 10) / 90
    assert d["a"] == 1.0 and d["b"] == pytest.approx(40 / 90)


def test_flash_hunting_layer_budgets_and_consensus_mask():
    dens = 0.3
    s = make_strategy("flash", SPEC, rounds=5, seed=4, train=TRAIN, density=dens,
                      hunt_fraction=0.5, init="uniform")
    s.initialize()
    clients = _clients(4)
    tasks = s.configure_fit(1, clients)
    assert len(tasks) == 2 and tasks[0].train.epochs == 10
    assert [c.client_id for c in s.participants(1, clients)] == [t.client_id for t in tasks]
    assert tasks[0].schedule.kind == "flash_dst" and tasks[0].plan.mode == "masked"
    # the pick is seeded: a second strategy with the same seed picks the same clients
    s2 = make_strategy("flash", SPEC, rounds=5, seed=4, train=TRAIN, density=dens,
                       hunt_fraction=0.5, init="uniform")
    assert [t.client_id for t in s2.configure_fit(1, clients)] == [t.client_id for t in tasks]
    hunters = [c for c in clients if c.client_id in {t.client_id for t in tasks}]
    g = {k: v.copy() for k, v in s.weights.items()}
    gm = {k: v.copy() for k, v in s.masks.items()}
    plan = tasks[0].plan
    layers = sorted(gm)
    assert layers == ["conv1", "conv2", "fc1"]   # FLASH rule: the classifier stays dense
    # hand-made hunted masks whose layer densities differ between the clients
    want = [{"conv1": 0.5, "conv2": 0.4, "fc1": 0.2}, {"conv1": 0.7, "conv2": 0.2, "fc1": 0.3}]
    rng = np.random.default_rng(9)
    locs = _local_states(s, k=2, seed=5)
    lmasks = []
    for st, dd in zip(locs, want, strict=True):
        lm = {}
        for n in layers:
            size = gm[n].size
            flat = np.zeros(size, bool)
            flat[rng.choice(size, int(round(dd[n] * size)), replace=False)] = True
            lm[n] = flat.reshape(gm[n].shape)
            st[f"{n}.weight"] = np.where(lm[n], st[f"{n}.weight"], 0).astype(np.float32)
        lmasks.append(lm)
    res = [_result(c, UplinkRule("masked"), st, g, plan, global_masks=gm, local_masks=lm)
           for c, st, lm in zip(hunters, locs, lmasks, strict=True)]
    out = s.aggregate_fit(1, res)
    assert out["hunting"] == 1.0
    sizes = {n: gm[n].size for n in layers}
    avg = {n: np.mean([lm[n].mean() for lm in lmasks]) for n in layers}
    scale = dens * sum(sizes.values()) / sum(avg[n] * sizes[n] for n in layers)
    assert max(avg.values()) * scale < 1     # no cap in this example
    for n in layers:
        assert s.densities[n] == pytest.approx(avg[n] * scale)
        k = int(math.floor(avg[n] * scale * sizes[n] + 0.5))
        votes = sum(lm[n].astype(int) for lm in lmasks).ravel()
        mag = np.mean([np.abs(st[f"{n}.weight"]) for st in locs], axis=0).ravel()
        ref = np.zeros(votes.size, bool)
        ref[sorted(range(votes.size), key=lambda i: (-votes[i], -mag[i], i))[:k]] = True
        np.testing.assert_array_equal(s.masks[n].ravel(), ref)
        # re-initialised: kept weights are a fresh init, not the hunted or the first init
        kept = s.weights[f"{n}.weight"][s.masks[n]]
        assert not np.allclose(kept, g[f"{n}.weight"][s.masks[n]])
        assert np.all(s.weights[f"{n}.weight"][~s.masks[n]] == 0)
    total = sum(int(s.masks[n].sum()) for n in layers) / sum(sizes.values())
    assert total == pytest.approx(dens, abs=2 / sum(sizes.values()))
    # stage 2 configures every client, with the hunted budgets in the plan
    t2 = s.configure_fit(2, clients)
    assert len(t2) == 4 and t2[0].schedule.kind == "fixed"
    assert t2[0].plan.weight_density("fc1") == pytest.approx(s.densities["fc1"])


@pytest.mark.parametrize("aggregation", ["mean", "masked_mean"])
def test_flash_jmwst_top_abs_w_within_layer_budget(aggregation):
    s = make_strategy("flash", SPEC, rounds=5, seed=6, train=TRAIN, density=0.3,
                      hunt_fraction=0.0, mode="jmwst", aggregation=aggregation)
    s.initialize()
    g = {k: v.copy() for k, v in s.weights.items()}
    gm = {k: v.copy() for k, v in s.masks.items()}
    clients = _clients()
    plan = s.plan_for(1, clients[0])
    assert s.schedule_for(1, clients[0]).kind == "flash_dst"
    rng = np.random.default_rng(1)
    locs = _local_states(s, seed=8)
    lmasks = []
    for st in locs:   # each client's DST moved some positions
        lm = {}
        for n, m in gm.items():
            flat = m.ravel().copy()
            on, off = np.flatnonzero(flat), np.flatnonzero(~flat)
            j = max(1, on.size // 4)
            flat[rng.choice(on, j, replace=False)] = False
            flat[rng.choice(off, j, replace=False)] = True
            lm[n] = flat.reshape(m.shape)
            st[f"{n}.weight"] = np.where(lm[n], st[f"{n}.weight"], 0).astype(np.float32)
        lmasks.append(lm)
    res = [_result(c, s.uplink_for(1, c), st, g, plan, global_masks=gm, local_masks=lm)
           for c, st, lm in zip(clients, locs, lmasks, strict=True)]
    out = s.aggregate_fit(1, res)
    assert out["mask_updated"] == 1.0
    p = _p(NS)
    u = np.full(3, 1 / 3)
    for n, m in gm.items():
        key = f"{n}.weight"
        arrs = [st[key] for st in locs]
        if aggregation == "mean":
            agg = _wmean(arrs, u)
        else:
            num = _wmean(arrs, p)
            den = _wmean([lm[n].astype(float) for lm in lmasks], p)
            agg = np.where(den > 0, num / np.where(den > 0, den, 1), 0)
        k = int(math.floor(s.densities[n] * m.size + 0.5))
        ref = _topk_ref(agg, k)
        np.testing.assert_array_equal(s.masks[n], ref)
        np.testing.assert_allclose(s.weights[key], np.where(ref, agg, 0), rtol=1e-5, atol=1e-7)
    # biases: unweighted under "mean", sample-weighted under "masked_mean"
    ref_b = _wmean([st["fc1.bias"] for st in locs], u if aggregation == "mean" else p)
    np.testing.assert_allclose(s.weights["fc1.bias"], ref_b, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(s.weights["bn1.running_mean"],
                               _wmean([st["bn1.running_mean"] for st in locs], p), rtol=1e-5,
                               atol=1e-7)


def test_flash_spdst_keeps_the_mask():
    s = make_strategy("flash", SPEC, rounds=5, seed=6, train=TRAIN, density=0.3,
                      hunt_fraction=0.0)
    s.initialize()
    g = {k: v.copy() for k, v in s.weights.items()}
    gm = {k: v.copy() for k, v in s.masks.items()}
    clients = _clients()
    locs = _local_states(s, seed=2)
    for st in locs:
        for n, m in gm.items():
            st[f"{n}.weight"] = np.where(m, st[f"{n}.weight"], 0).astype(np.float32)
    res = [_result(c, s.uplink_for(1, c), st, g, s.plan_for(1, c), global_masks=gm,
                   local_masks=gm) for c, st in zip(clients, locs, strict=True)]
    out = s.aggregate_fit(1, res)
    assert out["mask_changed"] == 0
    for n, m in gm.items():
        np.testing.assert_array_equal(s.masks[n], m)
        np.testing.assert_allclose(s.weights[f"{n}.weight"],
                                   np.mean([st[f"{n}.weight"] for st in locs], axis=0),
                                   rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------------------ hetero-FLASH
def _energy_ref(spec, device, plan, samples, epochs, batch):
    prof = resolve_device(device)
    est = estimate(spec, prof, plan=plan, batch=batch, samples=samples, epochs=epochs,
                   radio="wifi")
    up, down = est.totals.uplink_bytes, est.totals.downlink_bytes
    e_r, t_r = radio_cost(prof, "wifi", up, down)
    return est.totals.energy_j + e_r + prof.idle_w * t_r


def test_hetero_flash_budgets_from_device_profiles_and_nested_masks():
    d = 0.4
    s = make_strategy("hetero_flash", SPEC, rounds=5, seed=8, train=TRAIN, density=d,
                      hunt_fraction=0.0)
    s.initialize()
    # the round energy is the estimator's compute + radio + idle-while-transferring
    e = {f: _energy_ref(SPEC, "pixel4", s.client_plan(f * d), 300, 1, 32)
         for f in (1.0, 0.75, 0.5)}
    phone = ClientInfo("phone", device="pixel4", num_samples=300,
                       energy_budget_j=e[0.5] * 1.0001)
    assert e[0.5] * 1.0001 < e[0.75]      # the budget affords only the smallest candidate
    for f in (1.0, 0.5):
        assert s.round_energy(phone, f * d) == pytest.approx(e[f], rel=1e-9)
    host = ClientInfo("host", device="generic-x86", num_samples=300, energy_budget_j=1e6)
    starved = ClientInfo("starved", device="pixel4", num_samples=300, energy_budget_j=1e-9)
    fixed = ClientInfo("fixed", device="pixel4", num_samples=300, density_budget=0.75 * d)
    assert s.client_density(phone) == (pytest.approx(0.5 * d), True)
    assert s.client_density(host) == (pytest.approx(d), True)
    assert s.client_density(starved) == (pytest.approx(0.5 * d), False)
    assert s.client_density(fixed)[0] == pytest.approx(0.75 * d)
    clients = [host, fixed, phone, starved]
    tasks = s.configure_fit(1, clients)
    shapes = {n: SPEC.param_shapes(n)[f"{n}.weight"] for n in SPEC.weighted_layers()}
    got = {t.client_id: decode_masks(t.global_masks, shapes) for t in tasks}
    for n, gmask in s.masks.items():
        w = np.abs(s.weights[f"{n}.weight"])
        np.testing.assert_array_equal(got["host"][n], gmask)
        assert np.all(got["fixed"][n] <= got["host"][n])      # nested
        assert np.all(got["phone"][n] <= got["fixed"][n])
        for cid, f in (("fixed", 0.75), ("phone", 0.5)):
            m = got[cid][n]
            assert int(m.sum()) == int(math.floor(s.densities[n] * f * m.size + 0.5))
            if (gmask & ~m).any():       # top |w| inside the global mask
                assert w[m].min() >= w[gmask & ~m].max()
        t_phone = next(t for t in tasks if t.client_id == "phone")
        assert t_phone.plan.weight_density(n) == pytest.approx(s.densities[n] * 0.5)
    # aggregation (masked mean by default) over the nested masks, decoded with each client's
    g = {k: v.copy() for k, v in s.weights.items()}
    locs = _local_states(s, k=4, seed=4)
    ns = [c.num_samples for c in clients]
    res = []
    for c, st in zip(clients, locs, strict=True):
        for n in s.masks:
            st[f"{n}.weight"] = np.where(got[c.client_id][n], st[f"{n}.weight"], 0)
        res.append(_result(c, UplinkRule("masked"), st, g, tasks[0].plan,
                           global_masks=got[c.client_id], local_masks=got[c.client_id]))
    out = s.aggregate_fit(1, res)
    assert out["over_budget"] == 1 and out["min_client_density"] == pytest.approx(0.5 * d)
    p = _p(ns)
    for n, gmask in s.masks.items():
        key = f"{n}.weight"
        num = _wmean([st[key] for st in locs], p)
        den = _wmean([got[c.client_id][n].astype(float) for c in clients], p)
        agg = np.where(den > 0, num / np.where(den > 0, den, 1), 0)
        np.testing.assert_allclose(s.weights[key], np.where(gmask, agg, 0), rtol=1e-5,
                                   atol=1e-7)


# ------------------------------------------------------------------------------ rejects, errors
def test_bad_results_are_rejected_with_reasons():
    s = make_strategy("fedavg", SPEC, rounds=2, train=TRAIN)
    s.initialize()
    c = ClientInfo("bad", num_samples=5)
    st = _local_states(s, k=1)[0]
    nan = dict(st, **{"fc1.bias": np.full(32, np.nan, np.float32)})
    r = _result(c, UplinkRule("dense"), nan, s.weights, s.plan_for(1, c))[1]
    assert "NaN" in s.check_result(c, r)
    wrong = dict(st, **{"fc1.bias": np.zeros(5, np.float32)})
    r2 = _result(c, UplinkRule("dense"), wrong, s.weights, s.plan_for(1, c))[1]
    assert "shape" in s.check_result(c, r2)
    failed = ClientResult(1, "bad", error="TrainingDiverged: NaN loss")
    assert "failed" in s.check_result(c, failed)
    assert "undecodable" in s.check_result(c, ClientResult(1, "bad", b"junk", 5))
    with pytest.raises(UpdateRejected, match="bad"):
        s.aggregate_fit(1, [(c, r)])
    good = _result(c, UplinkRule("dense"), st, s.weights, s.plan_for(1, c))[1]
    assert s.check_result(c, good) is None


def test_make_strategy_errors():
    with pytest.raises(ValueError, match="unknown strategy 'fedprox'.*fedavg.*zerofl"):
        make_strategy("fedprox", SPEC, rounds=2)
    with pytest.raises(ValueError, match=r"unknown parameter\(s\) \['ratio'\].*mask_ratio"):
        make_strategy("zerofl", SPEC, rounds=2, ratio=0.1)
    with pytest.raises(ValueError, match="unknown parameter.*allowed: none"):
        make_strategy("fedavg", SPEC, rounds=2, sparsity=0.9)
    bad = [("zerofl", {"rule": "topk"}, "rule"), ("zerofl", {"mask_ratio": 1.5}, "mask_ratio"),
           ("zerofl", {"zero_convention": "x"}, "zero_convention"),
           ("feddst", {"sparsity": 1.0}, "sparsity"),
           ("feddst", {"readjust_interval": 0}, "readjust_interval"),
           ("flash", {"mode": "dst"}, "mode"), ("flash", {"aggregation": "median"}, "aggregation"),
           ("fedavgm", {"server_momentum": 1.0}, "server_momentum"),
           ("swat_fl", {"layers": ["nope"]}, "layers"),
           ("hetero_flash", {"budget_factors": []}, "budget_factors")]
    for name, params, key in bad:
        with pytest.raises(ValueError, match=f"{name}: parameter '{key}'"):
            make_strategy(name, SPEC, rounds=4, **params)
    with pytest.raises(ValueError, match="rounds"):
        make_strategy("fedavg", SPEC, rounds=0)
    with pytest.raises(ValueError, match="rounds must be >= 2"):
        make_strategy("flash", SPEC, rounds=1)
    hf = make_strategy("hetero_flash", SPEC, rounds=2, hunt_fraction=0.0)
    hf.initialize()
    with pytest.raises(ValueError, match="unknown-phone"):
        hf.client_density(ClientInfo("z", device="unknown-phone", energy_budget_j=1.0))


# ------------------------------------------------------------------------------ end to end
def _digits(k: int = 3, n: int = 120):
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
    y = y.astype(np.int64)
    return [(x[i::k][:n], y[i::k][:n]) for i in range(k)]


SMOKE = {
    "fedavg": {}, "fedavgm": {},
    "swat_fl": {"sparsity": 0.5}, "zerofl": {"sparsity": 0.5, "mask_ratio": 0.1},
    "feddst": {"sparsity": 0.5, "readjust_interval": 1, "readjust_until": 1.0, "alpha": 0.2},
    "flash": {"density": 0.3, "hunt_fraction": 0.5, "hunt_epochs": 1, "dst_interval": 2,
              "mode": "jmwst"},
    "hetero_flash": {"density": 0.3, "hunt_fraction": 0.0, "dst_interval": 2, "mode": "jmwst"},
}


def _run_round(s, rnd, clients, shards):
    tasks = s.configure_fit(rnd, clients)
    by_id = {c.client_id: (c, shards[i]) for i, c in enumerate(clients)}
    res = []
    for t in tasks:
        c, (x, y) = by_id[t.client_id]
        res.append((c, run_task(t, x, y, raise_errors=True)))
    return s.aggregate_fit(rnd, res), tasks


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_end_to_end_smoke_on_digits(name):
    assert set(SMOKE) == set(STRATEGIES)
    shards = _digits()
    clients = [ClientInfo(f"c{i}", num_samples=len(shards[i][1])) for i in range(3)]
    if name == "hetero_flash":   # one phone on a tight budget, two hosts
        s0 = make_strategy(name, SPEC, rounds=2, seed=1, train=TRAIN, **SMOKE[name])
        s0.initialize()
        tight = s0.round_energy(ClientInfo("p", device="pixel4",
                                           num_samples=len(shards[0][1])), 0.5 * 0.3) * 1.0001
        clients[0] = ClientInfo("c0", device="pixel4", num_samples=len(shards[0][1]),
                                energy_budget_j=tight)
    s = make_strategy(name, SPEC, rounds=2, seed=1, train=TRAIN, **SMOKE[name])
    s.initialize()
    w0 = {k: v.copy() for k, v in s.weights.items()}
    for rnd in (1, 2):
        metrics, tasks = _run_round(s, rnd, clients, shards)
        assert metrics["clients"] == len(tasks) > 0
        assert all(math.isfinite(v) for v in metrics.values())
    changed = [k for k in w0 if w0[k].dtype.kind == "f" and not np.array_equal(w0[k],
                                                                              s.weights[k])]
    assert changed
    assert all(np.isfinite(v).all() for v in s.weights.values())
    if s.masks is not None:
        for n, m in s.masks.items():
            assert int(m.sum()) == int(math.floor(s.densities[n] * m.size + 0.5)), n
            assert np.all(s.weights[f"{n}.weight"][~m] == 0)
    if name == "hetero_flash":
        assert metrics["min_client_density"] == pytest.approx(0.15)


@pytest.mark.parametrize("name", ["fedavgm", "zerofl", "feddst", "flash", "hetero_flash"])
def test_state_dict_round_trip_restores_identical_behaviour(name):
    shards = _digits(n=60)
    clients = [ClientInfo(f"c{i}", num_samples=60) for i in range(3)]
    params = dict(SMOKE[name])
    a = make_strategy(name, SPEC, rounds=3, seed=2, train=TRAIN, **params)
    a.initialize()
    _run_round(a, 1, clients, shards)
    meta, arrays = a.state_dict()
    meta = json.loads(json.dumps(meta))                       # JSON-able
    b = make_strategy(name, SPEC, rounds=3, seed=2, train=TRAIN, **params)
    b.load_state_dict(meta, {k: np.array(v) for k, v in arrays.items()})
    ta = a.configure_fit(2, clients)
    tb = b.configure_fit(2, clients)
    assert [t.to_bytes() for t in ta] == [t.to_bytes() for t in tb]
    for s in (a, b):
        _run_round(s, 2, clients, shards)
    for k in a.weights:
        np.testing.assert_array_equal(a.weights[k], b.weights[k], err_msg=k)
    if name == "fedavgm":
        assert a.momentum and all(np.array_equal(a.momentum[k], b.momentum[k])
                                  for k in a.momentum)
    with pytest.raises(ValueError, match="checkpoint is for strategy"):
        make_strategy("fedavg", SPEC, rounds=3).load_state_dict(meta, arrays)


def test_downlink_masks_are_one_bit_frames_and_masked_weights_compress():
    s = make_strategy("feddst", SPEC, rounds=4, seed=1, sparsity=0.8)
    s.initialize()
    state, masks = s.encode_global()
    shapes = {n: SPEC.param_shapes(n)[f"{n}.weight"] for n in SPEC.weighted_layers()}
    back = decode_masks(masks, shapes)
    assert set(back) == set(s.masks)
    for n in s.masks:
        np.testing.assert_array_equal(back[n], s.masks[n])
    bits = sum(m.size for m in s.masks.values())
    assert len(masks) < bits / 8 + 64 * len(s.masks)          # ~1 bit per element + headers
    f = make_strategy("fedavg", SPEC, rounds=4, seed=1)
    f.initialize()
    dense, _ = f.encode_global()
    assert len(state) < 0.6 * len(dense)


def test_f16_downlink_diffs_are_relative_to_what_clients_decoded():
    s = make_strategy("zerofl", SPEC, rounds=3, seed=1, train=TRAIN, rule="topk_diff",
                      sparsity=0.5, mask_ratio=0.5, downlink_dtype="f16")
    s.initialize()
    from embedded import codec

    seen = codec.decode_state(s.encode_global()[0])          # what a client decodes
    exact = {k: v.copy() for k, v in s.weights.items()}
    assert any(not np.array_equal(seen[k], exact[k]) for k in exact)   # f16 rounded
    c = _clients(1)
    local = _local_states(s, k=1, seed=3)[0]
    plan = s.plan_for(1, c[0])
    s.aggregate_fit(1, [_result(c[0], s.uplink_for(1, c[0]), local, seen, plan)])
    # everything is sent (mask_ratio = sparsity): the client's local state comes back exactly
    for k in ("conv2.weight", "fc1.weight"):
        np.testing.assert_allclose(s.weights[k], local[k], rtol=0, atol=1e-6)
