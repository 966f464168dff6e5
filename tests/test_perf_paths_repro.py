"""The faster SWAT paths (parallel top-K candidate pass, branch-free sparse build, conv
gradient transposes for few and many channels, linear weight gradient grouped by feature):
exact against independent references and bitwise the same on 1 and 2 threads."""

from __future__ import annotations

import numba
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from embedded.kernels import sparse
from embedded.kernels.topk import kth_largest_abs
from embedded.layers.conv import Conv2d
from embedded.layers.linear import Linear
from hwmodel.plan import LayerSparsity
from hwmodel.spec import make_node


def _mask(a: np.ndarray, density: float) -> np.ndarray:
    """Exact top-K by magnitude (numpy sort), the rule of the layers: |a| >= k-th, a != 0."""
    k = max(1, min(a.size, int(np.floor(density * a.size + 0.5))))
    t = np.sort(np.abs(a).reshape(-1))[::-1][k - 1]
    return (np.abs(a) >= t) & (a != 0)


def _threads(n: int) -> int:
    return min(n, numba.config.NUMBA_NUM_THREADS)


@pytest.mark.parametrize("size", [1_500_000, 1001])
def test_kth_largest_abs_exact_and_thread_independent(size, monkeypatch):
    monkeypatch.setattr(sparse, "PAR_MIN_WORK", 0)
    rng = np.random.default_rng(7)
    a = np.maximum(rng.standard_normal(size), 0).astype(np.float32)  # ReLU-like: half zeros
    a[::97] = -a[::97] * 3
    before = numba.get_num_threads()
    try:
        got = []
        for t in (1, _threads(2)):
            numba.set_num_threads(t)
            got.append([kth_largest_abs(a, k) for k in (1, size // 10, size // 3, size)])
    finally:
        numba.set_num_threads(before)
    srt = np.sort(np.abs(a))[::-1]
    nz = int(np.count_nonzero(a))
    want = [float(srt[k - 1]) if k <= nz else None for k in (1, size // 10, size // 3, size)]
    assert got[0] == got[1]
    for g, w in zip(got[0], want, strict=True):
        if w is None:  # fewer than k non-zero: the smallest positive float (keep them all)
            assert 0 < g <= np.finfo(np.float32).tiny
        else:
            assert g == w


def _conv(cin, cout, h, w, k, s, p, n):
    node = make_node("c", "conv2d", "input", out_channels=cout, kernel=k, stride=s, padding=p,
                     groups=1, bias=True)
    oh = (h + 2 * p[0] - k[0]) // s[0] + 1
    ow = (w + 2 * p[1] - k[1]) // s[1] + 1
    layer = Conv2d(node, ((cin, h, w),), (cout, oh, ow))
    layer.init_params(np.random.default_rng(1))
    layer.setup(n)
    rng = np.random.default_rng(2)
    x = np.maximum(rng.standard_normal((n, cin, h, w)), 0).astype(np.float32)
    gy = rng.standard_normal((n, cout, oh, ow)).astype(np.float32)
    return layer, x, gy


def _run(layer, x, gy):
    y = layer.forward(x, training=True).copy()
    gx = layer.backward(gy).copy()
    return [y, gx] + [g.copy() for g in layer.grads.values()]


def _run_at_1_and_2_threads(layer, x, gy):
    """One step's outputs and gradients at 1 thread, then at 2 (thread count restored)."""
    before = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        a = _run(layer, x, gy)
        numba.set_num_threads(_threads(2))
        b = _run(layer, x, gy)
    finally:
        numba.set_num_threads(before)
    return a, b


# (cin, cout, h, w, kernel, stride, padding, batch): many output channels (the channels-last
# gradient transpose's other branch), 3x3 stride 2 (every phase plane packed), 5x5, and
# stride 2 on 8-wide maps with 9 samples (the 8 x 4 phase-row blocks, then one sample alone)
@pytest.mark.parametrize("case", [
    (6, 40, 9, 8, (3, 3), (1, 1), (1, 1), 3),
    (5, 8, 11, 10, (3, 3), (2, 2), (1, 1), 2),
    (3, 34, 7, 7, (5, 5), (1, 1), (2, 2), 2),
    (5, 8, 8, 8, (3, 3), (2, 2), (1, 1), 9),
    (6, 9, 8, 8, (1, 1), (2, 2), (0, 0), 9),
])
def test_conv_swat_matches_torch_and_threads(case, monkeypatch):
    cin, cout, h, w, k, s, p, n = case
    monkeypatch.setattr(sparse, "PAR_MIN_WORK", 0)
    layer, x, gy = _conv(cin, cout, h, w, k, s, p, n)
    layer.set_sparsity("swat", LayerSparsity(0.15, 0.2, 1))
    wt = layer.params["weight"].copy()
    mw, mx = _mask(wt, 0.15), _mask(x, 0.2)
    a, b = _run_at_1_and_2_threads(layer, x, gy)
    for u, v in zip(a, b, strict=True):
        assert np.array_equal(u, v)
    xt = torch.from_numpy(x).requires_grad_(True)
    ws = torch.from_numpy(wt * mw).requires_grad_(True)
    bt = torch.from_numpy(layer.params["bias"].copy()).requires_grad_(True)
    y = F.conv2d(xt, ws, bt, s, p)
    y.backward(torch.from_numpy(gy))
    xs = torch.from_numpy(x * mx).requires_grad_(True)
    wd = torch.from_numpy(wt).requires_grad_(True)
    F.conv2d(xs, wd, None, s, p).backward(torch.from_numpy(gy))
    np.testing.assert_allclose(a[0], y.detach().numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(a[1], xt.grad.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(a[2], wd.grad.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(a[3], bt.grad.numpy(), rtol=1e-4, atol=1e-5)
    assert layer.measured_act_density == pytest.approx(mx.mean())


@pytest.mark.parametrize("case", [
    (6, 12, 9, 8, (3, 3), (1, 1), (1, 1), 2),   # rows of 16 floats: the block passes
    (6, 12, 9, 8, (3, 3), (1, 1), (1, 1), 3),   # rows of 24: one long axpy a tile
    (3, 34, 7, 7, (5, 5), (1, 1), (2, 2), 2),
])
def test_conv_row_tiles_give_the_same_floats(case, monkeypatch):
    """The forward and the stride-1 input gradient walk output/input rows in tiles when their
    source outgrows conv.TILE_BYTES: any tile height gives one tile's floats bit for bit, and
    torch's."""
    from embedded.layers import conv as conv_mod

    cin, cout, h, w, k, s, p, n = case
    monkeypatch.setattr(sparse, "PAR_MIN_WORK", 0)
    outs = {}
    for budget in (1 << 30, 1, 2 * 4 * cin * (w + 2 * p[1]) * n * (k[0] + 1)):
        monkeypatch.setattr(conv_mod, "TILE_BYTES", budget)
        layer, x, gy = _conv(cin, cout, h, w, k, s, p, n)
        layer.set_sparsity("swat", LayerSparsity(0.15, 0.2, 1))
        a, b = _run_at_1_and_2_threads(layer, x, gy)
        bufs = layer._bufs
        assert bufs.taps_in
        outs[budget] = (a, b, bufs.fwd_tr, bufs.bwd_in_tr)
    (whole, _, tr_f, tr_b), *tiled = outs.values()
    assert (tr_f, tr_b) == (layer.oh, h)
    for a, b, tr_f, tr_b in tiled:
        assert 1 <= tr_f < layer.oh and 1 <= tr_b < h  # really tiled
        for u, v, z in zip(a, b, whole, strict=True):
            assert np.array_equal(u, z) and np.array_equal(v, z)
    xt = torch.from_numpy(x).requires_grad_(True)
    F.conv2d(xt, torch.from_numpy(layer.params["weight"] * _mask(layer.params["weight"], 0.15)),
             torch.from_numpy(layer.params["bias"]), s, p).backward(torch.from_numpy(gy))
    np.testing.assert_allclose(tiled[0][0][1], xt.grad.numpy(), rtol=1e-4, atol=1e-5)


def test_conv_swat_saved_activations_grow_when_a_region_overflows(monkeypatch):
    """The forward's compacted activations (compact_acts): with regions too small for the
    kept entries the arrays grow and the forward retries; the weight gradient still matches
    torch's on the exact top-K input."""
    monkeypatch.setattr(sparse, "PAR_MIN_WORK", 0)
    layer, x, gy = _conv(6, 8, 9, 9, (3, 3), (1, 1), (1, 1), 3)
    layer.set_sparsity("swat", LayerSparsity(0.3, 0.5, 1))
    layer.forward(x, training=True)
    rs = layer.wq * x.shape[0]
    nb = layer._abounds.size
    layer._abounds = np.arange(nb, dtype=np.int64) * rs  # one row's room per chunk
    layer._aoff = np.zeros(rs * (nb - 1), np.int32)
    layer._aval = np.zeros(rs * (nb - 1), np.float32)
    layer.forward(x, training=True)
    assert layer._aoff.size > rs * (nb - 1)  # grown
    layer.backward(gy)
    xs = torch.from_numpy(x * _mask(x, 0.5))
    wd = torch.from_numpy(layer.params["weight"].copy()).requires_grad_(True)
    F.conv2d(xs, wd, None, 1, 1).backward(torch.from_numpy(gy))
    np.testing.assert_allclose(layer.grads["weight"], wd.grad.numpy(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("fin,fout,n", [(70, 37, 5), (33, 16, 1)])
def test_linear_swat_weight_grad_by_feature(fin, fout, n, monkeypatch):
    monkeypatch.setattr(sparse, "PAR_MIN_WORK", 0)
    node = make_node("fc", "linear", "input", out_features=fout, bias=False)
    layer = Linear(node, ((fin,),), (fout,))
    layer.init_params(np.random.default_rng(3))
    layer.setup(n)
    rng = np.random.default_rng(4)
    x = np.maximum(rng.standard_normal((n, fin)), 0).astype(np.float32)
    gy = rng.standard_normal((n, fout)).astype(np.float32)
    layer.set_sparsity("swat", LayerSparsity(0.2, 0.25, 1))
    wt = layer.params["weight"].copy()
    a, b = _run_at_1_and_2_threads(layer, x, gy)
    # output and weight gradient: bitwise across thread counts; the input gradient sums one
    # private accumulator per worker, so it is bitwise only for a given thread count
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[2], b[2])
    before = numba.get_num_threads()
    try:
        numba.set_num_threads(_threads(2))
        c = _run(layer, x, gy)
    finally:
        numba.set_num_threads(before)
    for u, v in zip(b, c, strict=True):
        assert np.array_equal(u, v)
    xs = (x * _mask(x, 0.25)).astype(np.float64)
    ws = (wt * _mask(wt, 0.2)).astype(np.float64)
    np.testing.assert_allclose(a[0], x @ ws.T, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(a[1], gy @ ws, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(a[2], gy.T.astype(np.float64) @ xs, rtol=1e-4, atol=1e-5)
