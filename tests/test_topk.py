"""Radix-select top-K threshold against numpy's sort."""

from __future__ import annotations

import numpy as np
import pytest

from embedded.kernels.topk import count_for_density, kth_largest_abs, topk_threshold


@pytest.mark.parametrize("n", [1, 7, 1000, 100_003])
def test_kth_largest_matches_sort(n):
    rng = np.random.default_rng(n)
    a = (rng.standard_normal(n) * rng.choice([1e-3, 1.0, 1e3], n)).astype(np.float32)
    ref = np.sort(np.abs(a))[::-1]
    for k in sorted({1, max(1, n // 10), max(1, n // 2), n}):
        assert kth_largest_abs(a, k) == ref[k - 1]


def test_ties_zeros_and_negative_values():
    a = np.array([0, -3, 3, 2, -2, 0, 0, 1, -5], np.float32)
    ref = np.sort(np.abs(a))[::-1]
    nonzero = int((a != 0).sum())
    for k in range(1, nonzero + 1):
        assert kth_largest_abs(a, k) == ref[k - 1]
    # asking for more than the non-zeros: the threshold keeps every non-zero entry (and, by
    # the layers' rule, never a zero)
    tiny = np.nextafter(np.float32(0), np.float32(1))
    for k in range(nonzero + 1, a.size + 1):
        t = kth_largest_abs(a, k)
        assert t == tiny
        assert int(((np.abs(a) >= t) & (a != 0)).sum()) == nonzero
    # subnormals and huge magnitudes still order by their bit patterns
    b = np.array([1e-45, -2e-45, 3e38, -1e38, 0.5], np.float32)
    assert kth_largest_abs(b, 1) == np.float32(3e38)
    assert kth_largest_abs(b, 5) == np.float32(1e-45)


def test_threshold_keeps_exactly_k_for_distinct_values():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((64, 32, 3, 3)).astype(np.float32)
    for d in (0.05, 0.1, 0.5, 1.0):
        t = topk_threshold(a, d)
        assert int((np.abs(a) >= t).sum()) == count_for_density(d, a.size)


def test_bad_k():
    with pytest.raises(ValueError, match="k: expected"):
        kth_largest_abs(np.ones(3, np.float32), 4)
    assert count_for_density(0.0001, 10) == 1


def test_windowed_select_is_exact_hit_or_miss():
    """The one-pass windowed select returns numpy's K-th magnitude whatever the guess: inside
    the window (a hit), above or below it (a miss falls back), with ties, zeros and ReLU-like
    data; the window narrows after hits and widens after misses."""
    from embedded.kernels import topk as T

    rng = np.random.default_rng(7)
    hist = T.new_hist()
    mc = np.zeros(T.NCHUNK, np.int64)
    above = np.zeros(T.NCHUNK, np.int64)
    hits = misses = 0
    for trial in range(120):
        n = int(rng.integers(1, 3000))
        a = rng.standard_normal(n).astype(np.float32)
        if trial % 3 == 0:
            a = np.maximum(a, 0)
        if trial % 4 == 0:
            a = np.round(a * 4) / 4  # many ties
        ref = np.sort(np.abs(a))[::-1]
        k = int(rng.integers(1, n + 1))
        want = kth_largest_abs(a, k)
        if ref[k - 1] > 0:
            assert want == ref[k - 1]
        guess = float(ref[k - 1]) * float(rng.choice([0.5, 0.995, 1.0, 1.004, 2.0]))
        win = T.Window(0.01, 0.001)
        got = T.kth_largest_abs_near(a, k, guess if guess > 0 else 1.0, win, hist,
                                     np.empty(n, np.uint32), mc, above)
        assert got == want
        hits += win.hits
        misses += win.misses
        rel = abs(float(want) / (guess if guess > 0 else 1.0) - 1.0)
        assert win.w == pytest.approx(min(1.0, max(0.001, 0.7 * 0.01, 3 * rel)))  # follows it
    assert hits > 20 and misses > 20  # both paths were taken


@pytest.mark.parametrize("ties", [False, True])
def test_window_select_small_and_large_candidate_sets(ties):
    """select_window's two ways to finish (a quickselect up to SMALL_SELECT candidates, radix
    levels beyond) give numpy's K-th magnitude and the count of entries at or above it."""
    from embedded.kernels import topk as T

    rng = np.random.default_rng(11)
    n = 60_000
    a = np.maximum(rng.standard_normal(n), 0).astype(np.float32)
    if ties:
        a = np.round(a * 8) / 8  # thousands of entries equal to the K-th
    mags = np.sort(np.abs(a))[::-1]
    sizes = set()
    for k in (1, 57, 3000, 9000):
        t = float(mags[k - 1])
        if t == 0:
            continue
        for w in (0.001, 0.3):
            win = T.Window(w, w)
            lo, hi = win.bounds(t)
            cand = np.zeros(n, np.uint32)
            mc = np.zeros(T.NCHUNK, np.int64)
            above = np.zeros(T.NCHUNK, np.int64)
            T.window_pass[0](a.view(np.uint32), lo, hi, cand, mc, above)
            b, kept = T.select_window(cand, n, mc, above, k, T.new_hist())
            assert np.uint32(b).view(np.float32) == mags[k - 1]
            assert kept == int((np.abs(a) >= mags[k - 1]).sum())
            sizes.add(int(mc.sum()) > T.SMALL_SELECT)
    assert sizes == {False, True}  # both ways were taken


def test_window_bounds_and_update_follow_their_rule():
    """The window's bounds are float32 bit patterns of thr (1 -/+ w) (width capped at 1 below,
    lo at least 1, inf past float32's range) and its width follows max(w_min, 0.7 w, 3 change)
    capped at w_max."""
    from embedded.kernels import topk as T

    rng = np.random.default_rng(3)
    for _ in range(200):
        w = float(rng.choice([1e-3, 0.05, 0.5, 1.0, 3.0]))
        thr = float(rng.choice([1e-44, 1e-3, 0.37, 2.5e38])) * float(rng.uniform(0.5, 1.5))
        win = T.Window(w, 1e-3, 2.0)
        lo, hi = win.bounds(thr)
        with np.errstate(over="ignore"):
            want_lo = np.float32(thr * (1.0 - min(w, 1.0))).view(np.uint32)
            want_hi = np.float32(thr * (1.0 + w)).view(np.uint32)
        assert (lo, hi) == (max(want_lo, np.uint32(1)), want_hi), (w, thr)
        assert lo.dtype == hi.dtype == np.uint32
        change = float(rng.choice([0.0, 1e-4, 0.02, 0.4, 2.0]))
        win.update(bool(rng.integers(2)), change)
        assert win.w == min(2.0, max(1e-3, 0.7 * w, 3.0 * change))


def test_swat_layer_refreshes_match_numpy_topk_over_training_steps():
    """A SWAT linear layer refreshing its weight threshold every step (the windowed select
    after the first) keeps exactly numpy's top-K of its current weights at every step."""
    from embedded.layers.linear import Linear
    from hwmodel import LayerSparsity
    from hwmodel.spec import Node

    node = Node("fc", "linear", ["x"], {"in_features": 300, "out_features": 200, "bias": True})
    layer = Linear(node, [(300,)], (200,))
    rng = np.random.default_rng(3)
    layer.init_params(rng)
    layer.setup(8)
    layer.set_sparsity("swat", LayerSparsity(0.1, 0.1, 1))
    w = layer.params["weight"]
    k = count_for_density(0.1, w.size)
    for _step in range(12):
        x = np.maximum(rng.standard_normal((8, 300)), 0).astype(np.float32)
        layer.forward(x, True)
        layer.backward(rng.standard_normal((8, 200)).astype(np.float32), True)
        t = np.sort(np.abs(w).ravel())[::-1][k - 1]
        assert layer._thr == t
        assert abs(layer.measured_density - ((np.abs(w) >= t) & (w != 0)).mean()) < 1e-12
        w -= np.float32(0.05) * layer.grads["weight"]  # an SGD step moves the K-th magnitude
    assert layer._win.hits + layer._win.misses == 11 and layer._win.hits >= 3


def test_swat_conv_activation_select_matches_numpy_over_batches():
    """A SWAT conv layer's activation top-K (windowed around the last batch's threshold after
    the first) equals numpy's K-th magnitude of every batch, including a batch whose scale
    jumps (a miss that must fall back)."""
    from embedded.layers.conv import Conv2d
    from hwmodel import LayerSparsity
    from hwmodel.spec import Node

    node = Node("c", "conv2d", ["x"], {"in_channels": 6, "out_channels": 8, "kernel": (3, 3),
                                       "stride": (2, 1), "padding": (1, 2), "groups": 1,
                                       "bias": True})
    layer = Conv2d(node, [(6, 11, 9)], (8, 6, 11))
    rng = np.random.default_rng(5)
    layer.init_params(rng)
    layer.setup(4)
    layer.set_sparsity("swat", LayerSparsity(0.2, 0.15, 1))
    for step in range(10):
        scale = 10.0 if step == 6 else 1.0
        x = (np.maximum(rng.standard_normal((4, 6, 11, 9)), 0) * scale).astype(np.float32)
        layer.forward(x, True)
        k = count_for_density(0.15, x.size)
        assert layer._thr_a == np.sort(np.abs(x).ravel())[::-1][k - 1]
        kept = int(((np.abs(x) >= layer._thr_a) & (x != 0)).sum())
        assert layer.measured_act_density == kept / x.size
        layer.backward(rng.standard_normal((4, 8, 6, 11)).astype(np.float32), True)
    assert layer._awin.misses >= 1 and layer._awin.hits >= 4


def test_float_bits_round_trip_like_numpy():
    """The struct-based bit casts of the select's Python side round like np.float32 (to
    nearest; beyond float32's range to inf) and invert each other."""
    from embedded.kernels.topk import bits_to_float, float_to_bits

    rng = np.random.default_rng(1)
    vals = list(rng.standard_normal(2000) * 10.0 ** rng.integers(-45, 39, 2000))
    vals += [0.0, -0.0, 1e-46, 3.4028235e38, 3.5e38, -1e300, float("inf"), 0.1, 1.0 / 3.0]
    for v in vals:
        with np.errstate(over="ignore"):
            want = int(np.float32(v).view(np.uint32))
        assert float_to_bits(v) == want, v
        assert bits_to_float(want) == float(np.uint32(want).view(np.float32))
