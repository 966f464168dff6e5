"""MaskSchedule: FedDST readjustment and FLASH local DST against hand-made numpy references."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from embedded.mask_schedule import (
    MaskSchedule,
    ScheduleError,
    cosine_rate,
    feddst_readjust,
    flash_prune_regrow,
    magnitude_prune,
    prune_count,
)


# ------------------------------------------------------------------------------ pure functions
def test_prune_count_by_hand():
    # keep floor(n * (1 - alpha)); prune the rest
    assert prune_count(10, 0.25) == 3      # keep floor(7.5) = 7
    assert prune_count(10, 0.0) == 0
    assert prune_count(10, 1.0) == 10
    assert prune_count(100, 0.01) == 1
    assert prune_count(7, 0.5) == 4        # keep floor(3.5) = 3


def test_feddst_readjust_hand_made():
    # 3x4 layer, 6 active weights; alpha = 0.5 -> keep floor(3) = 3, prune 3, regrow 3.
    w = np.array([[0.9, -0.1, 0.0, 0.0],
                  [0.0, 0.5, -0.05, 0.0],
                  [0.3, 0.0, 0.0, -0.7]], dtype=np.float32)
    m = w != 0                                   # active: 0.9, -0.1, 0.5, -0.05, 0.3, -0.7
    g = np.array([[5.0, 9.0, 0.2, -4.0],         # outside the mask: 0.2, -4.0,
                  [-3.0, 8.0, 7.0, 0.1],         #   -3.0, 0.1,
                  [1.0, -6.0, 2.0, 0.5]])        #   -6.0, 2.0
    new, grown, k = feddst_readjust(w, m, g, 0.5)
    assert k == 3
    # pruned: the 3 smallest |w| among the active: -0.05, -0.1, 0.3 -> kept 0.9, 0.5, -0.7
    # grown: the 3 largest |g| outside the old mask: -6.0 (2,1), -4.0 (0,3), -3.0 (1,0)
    expect = np.zeros((3, 4), bool)
    for pos in [(0, 0), (1, 1), (2, 3), (2, 1), (0, 3), (1, 0)]:
        expect[pos] = True
    np.testing.assert_array_equal(new, expect)
    np.testing.assert_array_equal(grown, np.sort([9, 3, 4]))
    assert new.sum() == m.sum()


def _feddst_reference(w, m, g, alpha):
    """Independent reference: python sorts over (value, index) tuples."""
    wf, mf, gf = w.ravel(), m.ravel(), g.ravel()
    active = [i for i in range(wf.size) if mf[i]]
    n = len(active)
    k = n - math.floor(n * (1 - alpha) + 1e-9)
    k = min(k, wf.size - n)
    pruned = sorted(active, key=lambda i: (abs(float(wf[i])), i))[:k]
    outside = [i for i in range(wf.size) if not mf[i]]
    grown = sorted(outside, key=lambda i: (-abs(float(gf[i])), i))[:k]
    out = mf.copy()
    out[pruned] = False
    out[grown] = True
    return out.reshape(m.shape), sorted(grown)


@pytest.mark.parametrize("alpha", [0.01, 0.2, 0.5, 1.0])
def test_feddst_readjust_matches_reference_random(alpha):
    rng = np.random.default_rng(7)
    for shape in [(8, 5), (4, 3, 3, 3), (1, 30)]:
        m = rng.random(shape) < 0.3
        w = (rng.standard_normal(shape) * m).astype(np.float32)
        g = rng.standard_normal(shape)
        g[rng.random(shape) < 0.2] = 0.5  # ties: lower flat index wins
        new, grown, _ = feddst_readjust(w, m, g, alpha)
        ref, ref_grown = _feddst_reference(w, m, g, alpha)
        np.testing.assert_array_equal(new, ref)
        assert list(grown) == ref_grown
        assert new.sum() == m.sum()             # total density preserved
        assert not (new & ~m & ~np.isin(np.arange(m.size), grown).reshape(shape)).any()


def test_feddst_full_mask_cannot_regrow_so_nothing_moves():
    w = np.arange(1, 7, dtype=np.float32).reshape(2, 3)
    m = np.ones((2, 3), bool)
    new, grown, k = feddst_readjust(w, m, np.ones((2, 3)), 0.5)
    assert k == 0 and grown.size == 0 and new.all()


def test_magnitude_prune_ignores_inactive():
    w = np.array([0.0, 0.2, -0.1, 3.0, 0.0], dtype=np.float32)
    m = np.array([True, True, True, True, False])
    # active |w|: 0.0 (idx0), 0.2, 0.1, 3.0 -> two smallest: idx0, idx2
    np.testing.assert_array_equal(magnitude_prune(w, m, 2), [False, True, False, True, False])


def test_cosine_rate_by_hand():
    assert cosine_rate(0.25, 0, 100) == pytest.approx(0.25)
    assert cosine_rate(0.25, 50, 100) == pytest.approx(0.125)
    assert cosine_rate(0.25, 25, 100) == pytest.approx(0.125 * (1 + math.sqrt(0.5)))
    assert cosine_rate(0.25, 100, 100) == 0.0


def test_flash_prune_regrow_counts_and_positions():
    rng = np.random.default_rng(0)
    m = rng.random((10, 10)) < 0.2
    w = (rng.standard_normal((10, 10)) * m).astype(np.float32)
    new, grown, k = flash_prune_regrow(w, m, 0.25, np.random.default_rng(3))
    n = int(m.sum())
    assert k == round(0.25 * n)
    assert new.sum() == n                            # density preserved
    pruned = magnitude_prune(w, m, k)                # smallest-|w| removed first
    assert not pruned[np.unravel_index(grown, m.shape)].any()  # grown where inactive after prune
    np.testing.assert_array_equal(new & ~np.isin(np.arange(100), grown).reshape(10, 10), pruned)
    # deterministic for a seed, different for another
    again, g2, _ = flash_prune_regrow(w, m, 0.25, np.random.default_rng(3))
    np.testing.assert_array_equal(again, new)
    other, g3, _ = flash_prune_regrow(w, m, 0.25, np.random.default_rng(4))
    assert not np.array_equal(g3, grown)


def test_flash_regrow_is_uniform_over_inactive_positions():
    # 12 positions, 4 active; prune 2 -> 10 candidates, 2 drawn: each has p = 0.2 per draw.
    w = np.zeros(12, dtype=np.float32)
    w[:4] = [1.0, 2.0, 3.0, 4.0]
    m = w != 0
    rng = np.random.default_rng(11)
    counts = np.zeros(12)
    trials = 4000
    for _ in range(trials):
        _, grown, k = flash_prune_regrow(w, m, 0.5, rng)
        assert k == 2
        counts[grown] += 1
    assert counts[2:4].sum() == 0                   # the kept weights are never "grown"
    freq = counts[[0, 1, *range(4, 12)]] / trials   # pruned 0, 1 are eligible as in reference
    assert np.all(np.abs(freq - 0.2) < 0.035)       # ~5 sigma of a binomial(4000, 0.2)


# ------------------------------------------------------------------------------ the record
def test_schedule_json_roundtrip_and_validation():
    for s in [MaskSchedule.fixed(), MaskSchedule.feddst(0.3, at_steps=(2, -1), grad_batches=2),
              MaskSchedule.flash_dst(0.25, interval=5, seed=9)]:
        d = json.loads(json.dumps(s.to_dict()))
        assert MaskSchedule.from_dict(d) == s
    with pytest.raises(ScheduleError, match="kind"):
        MaskSchedule("rigl")
    with pytest.raises(ScheduleError, match="alpha"):
        MaskSchedule.feddst(1.5)
    with pytest.raises(ScheduleError, match="interval"):
        MaskSchedule.flash_dst(interval=0)
    with pytest.raises(ScheduleError, match="unknown field"):
        MaskSchedule.from_dict({"kind": "fixed", "beta": 1})
    with pytest.raises(ScheduleError, match="at_steps"):
        MaskSchedule.from_dict({"kind": "feddst", "at_steps": "last"})


# ------------------------------------------------------------------------------ on a real network
def _digits(n: int):
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    return (x[:n] / 16.0).astype(np.float32).reshape(-1, 1, 8, 8), y[:n].astype(np.int64)


def _masked_net(seed: int = 1):
    import hwmodel
    from embedded.network import Network

    spec = hwmodel.build("mlp", input_shape=(1, 8, 8), hidden=(24, 16), num_classes=10)
    net = Network.from_spec(spec, seed=seed)
    plan = hwmodel.SparsityPlan.uniform(spec, 0.6, mode="masked", layers="all")
    net.set_plan(plan)
    masks = {}
    for name in plan.layers:
        w = net.layers[name].params["weight"]
        k = int(round(plan.weight_density(name) * w.size))
        keep = np.argsort(-np.abs(w).ravel(), kind="stable")[:k]
        m = np.zeros(w.size, bool)
        m[keep] = True
        masks[name] = m.reshape(w.shape)
    net.set_masks(masks)
    return spec, net, plan, masks


def test_feddst_hook_regrows_at_largest_dense_gradient_of_the_network():
    from embedded.network import Network

    spec, net, plan, masks = _masked_net()
    xb, yb = _digits(32)
    # independent reference gradient: a dense twin holding the same (masked) weights
    twin = Network.from_spec(spec, seed=5)
    twin.load_state_dict(net.state_dict())
    twin.set_plan(None)
    _, g = twin.loss_and_grads(xb, yb)
    before = net.state_dict()

    sched = MaskSchedule.feddst(0.25)                # default: after the last step
    sched.begin(net, plan, total_steps=4)
    for step in range(3):
        sched.after_step(net, step, xb, yb)
        for n, m in net.get_masks().items():
            np.testing.assert_array_equal(m, masks[n])  # nothing before the readjust step
    sched.after_step(net, 3, xb, yb)
    new = net.get_masks()
    after = net.state_dict()
    assert {e["layer"] for e in sched.events} == set(plan.layers)
    for n in plan.layers:
        ref, grown = _feddst_reference(before[f"{n}.weight"], masks[n], g[f"{n}.weight"], 0.25)
        np.testing.assert_array_equal(new[n], ref)
        assert new[n].sum() == masks[n].sum()         # density preserved
        w = after[f"{n}.weight"]
        assert np.all(w.ravel()[grown] == 0)          # regrown weights start at 0
        assert np.all(w[~new[n]] == 0)                # pruned weights are gone
        kept = new[n] & masks[n]
        np.testing.assert_array_equal(w[kept], before[f"{n}.weight"][kept])
        assert not net.layers[n].want_dense_grad      # restored


def test_feddst_without_readjust_and_fixed_do_nothing():
    _, net, plan, masks = _masked_net()
    xb, yb = _digits(16)
    for sched in [MaskSchedule.feddst(0.3, readjust=False), MaskSchedule.fixed()]:
        sched.begin(net, plan, 2)
        sched.after_step(net, 0, xb, yb)
        sched.after_step(net, 1, xb, yb)
        assert sched.events == []
        for n, m in net.get_masks().items():
            np.testing.assert_array_equal(m, masks[n])


def test_schedule_needs_masks_and_valid_steps():
    from embedded.network import Network

    spec, net, plan, _ = _masked_net()
    bare = Network.from_spec(spec, seed=0)
    bare.set_plan(plan)
    with pytest.raises(ScheduleError, match="no mask"):
        MaskSchedule.flash_dst().begin(bare, plan, 10)
    with pytest.raises(ScheduleError, match="outside"):
        MaskSchedule.feddst(0.2, at_steps=(10,)).begin(net, plan, 10)


def test_flash_dst_inside_train_local_keeps_density_and_zeros():
    from embedded.train import TrainConfig, train_local

    _, net, plan, masks = _masked_net()
    x, y = _digits(192)
    sched = MaskSchedule.flash_dst(0.25, interval=2, seed=3)
    train_local(net, x, y, TrainConfig(lr=0.05, batch_size=32, seed=0), mask_schedule=sched)
    # 6 steps: updates after steps 1, 3, 5 at rate 0.25 * (1 + cos(pi * t / 6)) / 2, t = 2, 4, 6
    steps = sorted({e["step"] for e in sched.events})
    assert steps == [1, 3, 5]
    for e in sched.events:
        n = int(masks[e["layer"]].sum())
        t = e["step"] + 1
        assert e["pruned"] == e["grown"] == round(cosine_rate(0.25, t, 6) * n)
    new = net.get_masks()
    state = net.state_dict()
    for n in plan.layers:
        assert new[n].sum() == masks[n].sum()
        assert np.all(state[f"{n}.weight"][~new[n]] == 0)
        assert not np.array_equal(new[n], masks[n])
