"""Conv2d and Linear (dense, swat, masked) against torch autograd on awkward shapes.

For swat the reference builds its own masks with numpy's exact top-K (a full sort), so a
wrong selection in the Numba radix select or the compression cannot pass.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from embedded.layers.conv import Conv2d
from embedded.layers.linear import Linear
from hwmodel.plan import LayerSparsity
from hwmodel.spec import make_node

RTOL, ATOL = 1e-4, 1e-5

# (cin, cout, h, w, kernel, stride, padding, groups, bias, batch)
CONV_CASES = [
    (3, 5, 9, 7, (3, 3), (2, 2), (2, 2), 1, True, 2),     # stride 2, padding 2, non-square map
    (4, 6, 8, 11, (3, 2), (1, 1), (1, 0), 2, False, 3),   # non-square kernel, groups 2
    (5, 5, 7, 9, (3, 3), (1, 1), (1, 1), 5, True, 1),     # depthwise, batch 1
    (6, 12, 9, 9, (3, 3), (2, 2), (1, 1), 6, False, 2),   # depthwise x2 multiplier, stride 2
    (7, 9, 6, 5, (5, 5), (1, 1), (2, 2), 1, True, 3),     # odd channels, 5x5 'same'
    (6, 4, 10, 10, (1, 1), (2, 2), (0, 0), 1, False, 2),  # 1x1 stride 2 (shortcut)
    (19, 20, 6, 6, (1, 1), (2, 2), (0, 0), 1, False, 2),  # 1x1, 8x8 transpose blocks + rest
    # rows of OW * batch a multiple of 16: the kernels' row-by-row runs (padding columns
    # skipped), stride 2 (input gradient by column) and stride 1 (all taps of a channel)
    (5, 7, 9, 8, (3, 3), (2, 2), (1, 1), 1, False, 4),
    (6, 10, 5, 8, (3, 3), (1, 1), (1, 1), 1, True, 4),
]


def _conv(case):
    cin, cout, h, w, k, s, p, g, bias, n = case
    node = make_node("c", "conv2d", "input", out_channels=cout, kernel=k, stride=s, padding=p,
                     groups=g, bias=bias)
    oh = (h + 2 * p[0] - k[0]) // s[0] + 1
    ow = (w + 2 * p[1] - k[1]) // s[1] + 1
    layer = Conv2d(node, ((cin, h, w),), (cout, oh, ow))
    layer.init_params(np.random.default_rng(1))
    layer.setup(n + 1)
    rng = np.random.default_rng(2)
    x = rng.standard_normal((n, cin, h, w)).astype(np.float32)
    gy = rng.standard_normal((n, cout, oh, ow)).astype(np.float32)
    return layer, x, gy


def _linear(fin=37, fout=23, n=5, bias=True):
    node = make_node("fc", "linear", "input", out_features=fout, bias=bias)
    layer = Linear(node, ((fin,),), (fout,))
    layer.init_params(np.random.default_rng(3))
    layer.setup(n + 2)
    rng = np.random.default_rng(4)
    x = rng.standard_normal((n, fin)).astype(np.float32)
    gy = rng.standard_normal((n, fout)).astype(np.float32)
    return layer, x, gy


def topk_mask(a: np.ndarray, density: float) -> np.ndarray:
    """Exact top-K by magnitude via a full numpy sort (independent of the Numba code)."""
    k = max(1, min(a.size, int(np.floor(density * a.size + 0.5))))
    flat = np.abs(a).reshape(-1)
    order = np.argsort(-flat, kind="stable")
    m = np.zeros(a.size, dtype=bool)
    m[order[:k]] = True
    return m.reshape(a.shape)


def torch_ref(layer, x, gy, w_fwd, x_for_wgrad):
    """y and grad_x with weight w_fwd; grad_w from x_for_wgrad (torch autograd)."""
    is_conv = isinstance(layer, Conv2d)
    b = torch.tensor(layer.params["bias"]) if layer.has_bias else None

    def op(inp, wt):
        if is_conv:
            return F.conv2d(inp, wt, b, stride=(layer.sh, layer.sw),
                            padding=(layer.ph, layer.pw), groups=layer.groups)
        return F.linear(inp, wt, b)

    xt = torch.tensor(x, requires_grad=True)
    y = op(xt, torch.tensor(w_fwd))
    y.backward(torch.tensor(gy))
    wt = torch.tensor(w_fwd, requires_grad=True)
    op(torch.tensor(x_for_wgrad), wt).backward(torch.tensor(gy))
    gb = torch.tensor(gy).sum(dim=(0, 2, 3) if is_conv else 0).numpy()
    return y.detach().numpy(), xt.grad.numpy(), wt.grad.numpy(), gb


def _check(layer, x, gy, w_fwd, x_wgrad):
    # the output buffers are reused between steps: every entry must be written each step
    # (zeros included: a 1x1 stride-2 conv's input gradient is 3/4 zeros)
    layer._y.fill(np.nan)
    layer._gx.fill(np.nan)
    y = layer.forward(x, training=True).copy()
    gx = layer.backward(gy).copy()
    ry, rgx, rgw, rgb = torch_ref(layer, x, gy, w_fwd, x_wgrad)
    np.testing.assert_allclose(y, ry, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(gx, rgx, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(layer.grads["weight"], rgw, rtol=RTOL, atol=ATOL)
    if layer.has_bias:
        np.testing.assert_allclose(layer.grads["bias"], rgb, rtol=RTOL, atol=ATOL)
    return rgw


def _layers():
    for case in CONV_CASES:
        yield _conv(case)
    yield _linear()
    yield _linear(fin=64, fout=17, n=1, bias=False)


@pytest.mark.parametrize("idx", range(len(CONV_CASES) + 2))
def test_dense_matches_torch(idx):
    layer, x, gy = list(_layers())[idx]
    _check(layer, x, gy, layer.params["weight"], x)
    assert layer.measured_density == 1.0
    # a smaller batch through the same buffers
    if x.shape[0] > 1:
        _check(layer, x[:1].copy(), gy[:1].copy(), layer.params["weight"], x[:1].copy())


@pytest.mark.parametrize("idx", range(len(CONV_CASES) + 2))
@pytest.mark.parametrize("dw,da", [(0.1, 0.1), (0.3, 0.5)])
def test_swat_matches_torch(idx, dw, da):
    layer, x, gy = list(_layers())[idx]
    layer.set_sparsity("swat", LayerSparsity(dw, da, 1))
    w = layer.params["weight"]
    mw = topk_mask(w, dw)
    mx = topk_mask(x, da)
    _check(layer, x, gy, w * mw, x * mx)
    assert layer.measured_density == pytest.approx(mw.mean())
    assert layer.measured_act_density == pytest.approx(mx.mean())


def test_swat_threshold_reused_between_refreshes():
    layer, x, gy = _conv(CONV_CASES[0])
    layer.set_sparsity("swat", LayerSparsity(0.2, 0.2, 3))
    w = layer.params["weight"]
    thr = np.sort(np.abs(w).reshape(-1))[::-1][max(1, int(np.floor(0.2 * w.size + 0.5))) - 1]
    _check(layer, x, gy, w * topk_mask(w, 0.2), x * topk_mask(x, 0.2))
    rng = np.random.default_rng(9)
    w += 0.3 * rng.standard_normal(w.shape).astype(np.float32)  # weights drift
    keep = np.abs(w) >= thr
    _check(layer, x, gy, w * keep, x * topk_mask(x, 0.2))
    assert layer.measured_density == pytest.approx(keep.mean())
    assert layer.measured_density != pytest.approx(0.2)
    _check(layer, x, gy, w * keep, x * topk_mask(x, 0.2))
    # the 4th training step refreshes: exact top-K again
    _check(layer, x, gy, w * topk_mask(w, 0.2), x * topk_mask(x, 0.2))
    assert layer.measured_density == pytest.approx(topk_mask(w, 0.2).mean())


@pytest.mark.parametrize("idx", range(len(CONV_CASES) + 2))
def test_masked_matches_torch(idx):
    layer, x, gy = list(_layers())[idx]
    w = layer.params["weight"]
    mask = np.random.default_rng(5).random(w.shape) < 0.3
    layer.set_sparsity("masked", None)
    layer.set_mask(mask)
    assert np.all(w[~mask] == 0)
    dense_gw = _check_masked(layer, x, gy, mask)
    assert layer.measured_density == pytest.approx(mask.mean())
    # dense gradient on demand (FedDST regrow), masked grad unchanged
    layer.want_dense_grad = True
    _check_masked(layer, x, gy, mask)
    np.testing.assert_allclose(layer.dense_grad, dense_gw, rtol=RTOL, atol=ATOL)
    # the mask changes: the cached structure is rebuilt
    mask2 = np.random.default_rng(6).random(w.shape) < 0.5
    layer.want_dense_grad = False
    layer.set_mask(mask2)
    _check_masked(layer, x, gy, mask2)


def _check_masked(layer, x, gy, mask):
    w = layer.params["weight"].copy()
    y = layer.forward(x, training=True).copy()
    gx = layer.backward(gy).copy()
    ry, rgx, rgw, rgb = torch_ref(layer, x, gy, w * mask, x)
    np.testing.assert_allclose(y, ry, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(gx, rgx, rtol=RTOL, atol=ATOL)
    gw = layer.grads["weight"]
    assert np.all(gw[~mask] == 0)
    np.testing.assert_allclose(gw, rgw * mask, rtol=RTOL, atol=ATOL)
    return rgw


def test_first_layer_skips_input_grad_and_bad_input():
    layer, x, gy = _conv(CONV_CASES[0])
    layer.forward(x, training=True)
    assert layer.backward(gy, need_input_grad=False) is None
    assert set(layer.phase_times) == {"forward", "backward_weight"}
    with pytest.raises(ValueError, match="expected float32 input"):
        layer.forward(x.astype(np.float64), training=True)
    with pytest.raises(ValueError, match="max_batch"):
        layer.forward(np.zeros((10,) + x.shape[1:], np.float32), training=True)
    with pytest.raises(ValueError, match="mode must be one of"):
        layer.set_sparsity("sparse", None)
    with pytest.raises(ValueError, match="mask shape"):
        layer.set_mask(np.ones((2, 2), bool))


def test_eval_forward_does_not_advance_refresh():
    layer, x, gy = _linear()
    layer.set_sparsity("swat", LayerSparsity(0.25, 0.5, 2))
    w = layer.params["weight"]
    y_eval = layer.forward(x, training=False).copy()
    ref = x @ (w * topk_mask(w, 0.25)).T + layer.params["bias"]
    np.testing.assert_allclose(y_eval, ref, rtol=RTOL, atol=ATOL)
    assert layer._steps == 0


def _run(layer, x, gy):
    y = layer.forward(x, training=True).copy()
    gx = layer.backward(gy).copy()
    return y, gx, layer.grads["weight"].copy()


@pytest.mark.parametrize("mode", ["dense", "swat", "masked"])
def test_bitwise_reproducible(mode, monkeypatch):
    """Same inputs -> bit-identical outputs; for conv also across 1 and 2 threads (every
    parallel loop owns its outputs and keeps a fixed order inside)."""
    import numba

    from embedded.kernels import sparse

    monkeypatch.setattr(sparse, "PAR_MIN_WORK", 0)  # force the parallel kernels
    conv, x, gy = _conv((8, 16, 12, 12, (3, 3), (1, 1), (1, 1), 1, True, 4))
    lin, xl, gyl = _linear(fin=40, fout=24, n=4)
    for layer in (conv, lin):
        if mode == "swat":
            layer.set_sparsity("swat", LayerSparsity(0.2, 0.3, 1))
        elif mode == "masked":
            layer.set_sparsity("masked", None)
            layer.set_mask(np.random.default_rng(0).random(layer.params["weight"].shape) < 0.4)
    before = numba.get_num_threads()
    try:
        numba.set_num_threads(min(2, numba.config.NUMBA_NUM_THREADS))
        a = _run(conv, x, gy)
        b = _run(conv, x, gy)
        c = _run(lin, xl, gyl)
        d = _run(lin, xl, gyl)
        numba.set_num_threads(1)
        e = _run(conv, x, gy)
    finally:
        numba.set_num_threads(before)
    for u, v in zip(a + c, b + d, strict=True):
        assert np.array_equal(u, v)
    if mode != "masked" and mode != "dense":  # (masked: fastmath dot; dense: BLAS threads)
        for u, v in zip(a, e, strict=True):
            assert np.array_equal(u, v)


def test_sparse_weight_nbytes_counts_each_array_once_and_follows_growth():
    """SparseWeight.nbytes is the bytes of its arrays, none twice, and grows with nnz."""
    from embedded.kernels.sparse import SparseWeight

    sw = SparseWeight(4, 9, np.array([0] * 10, np.int64))
    base = sw.nbytes()
    staging = (sw._ends, sw._sval, sw._scode, sw._scol, sw.scounts)
    assert base == sum(a.nbytes for a in (sw.rowptr, sw.colptr, sw.counts, sw.wcnt, sw.ctab,
                                          sw.geo, sw.widx, sw.val, sw.code, sw.col, sw.col_code,
                                          sw.c_row, sw.c_widx, sw.c_val, *staging))
    sw.build(np.ones((4, 9), np.float32), 0.5)  # 36 kept: the value arrays grow
    assert sw.nnz == 36
    # widx, val, code, col grew; so did the staging arrays of the next one-read build
    grown = (sw.val.size - 1) * (4 + 4 + 4 + 4) + (sw._sval.size - 1) * (4 + 4)
    assert sw.nbytes() - base == grown + sw._bounds.nbytes


@pytest.mark.parametrize("geo,rows,rl", [
    ((0,) * 10, 50, 300),                       # linear
    ((1, 8, 3, 3, 3, 1, 1, 10, 10, 3), 8, 27),  # conv 3 -> 8, 3x3
    ((1, 4, 2, 3, 3, 2, 2, 6, 6, 4), 8, 18),    # grouped, stride 2
])
def test_staged_build_gives_the_two_pass_structure(geo, rows, rl):
    """The one-read (staged) rebuild yields the two-pass build's CSR/CSC bit for bit, also
    when the kept count jumps past its chunk regions (then it falls back to two passes)."""
    from embedded.kernels.sparse import SparseWeight

    geo = np.array(geo, np.int64)
    ncols = rl if geo[0] == 0 else int(geo[9] * geo[3] * geo[4])
    sw = SparseWeight(rows, ncols, geo)
    rng = np.random.default_rng(0)
    staged = 0
    for thr in (1.0, 1.0, 1.1, 0.3, 0.0, 1.0, 2.5, 1.0, 1.0):
        w = rng.standard_normal((rows, rl)).astype(np.float32)
        staged += sw._bounds is not None
        nnz = sw.build(w, thr)
        assert nnz == _assert_same_structure(sw, w, thr, rows, ncols, geo)
    assert staged == 8  # every build after the first tried the one-read path
    assert 4 <= sw.staged_builds < 8  # and took it unless the kept count jumped


@pytest.mark.parametrize("geo,rows,rl", [
    ((0, 0, 0, 0, 0, 0, 0, 0, 0, 0), 37, 200),  # linear
    ((1, 64, 3, 3, 3, 1, 1, 10, 10, 3), 64, 27),  # conv 3 -> 64, 3x3
    ((1, 32, 2, 3, 3, 2, 2, 6, 6, 4), 64, 18),  # grouped, stride 2
])
def test_fused_select_and_rebuild_matches_select_then_build(geo, rows, rl):
    """refresh_near (windowed select fused with the rebuild, one read of the weight) returns
    the exact K-th magnitude and the two-pass build's structure bit for bit: on a window hit,
    on a miss (the weights jump; histogram select), and when the staged entries outgrow their
    regions (None: nothing selected)."""
    from embedded.kernels import topk as T
    from embedded.kernels.select_build import refresh_near
    from embedded.kernels.sparse import SparseWeight

    geo = np.array(geo, np.int64)
    ncols = rl if geo[0] == 0 else int(geo[9] * geo[3] * geo[4])
    sw = SparseWeight(rows, ncols, geo)
    rng = np.random.default_rng(0)
    w = rng.standard_normal((rows, rl)).astype(np.float32)
    k = w.size // 10
    assert refresh_near(sw, w, k, 1.0, T.Window(0.01, 0.001), T.new_hist(),
                        np.zeros(w.size, np.uint32), *_counts()) is None  # no plan yet
    thr = T.kth_largest_abs(w, k)
    sw.build(w, thr)
    win = T.Window(0.05, 0.001)
    seen = set()
    for scale in (1.0, 1.001, 0.999, 0.2, 1.0, 5.0, 1.0):  # 0.2: a miss; 5.0 overflows
        w = (w * scale + rng.standard_normal(w.shape).astype(np.float32) * 0.002)
        w[0, :3] = 0.0
        misses = win.misses
        got = refresh_near(sw, w, k, thr, win, T.new_hist(), np.zeros(w.size, np.uint32),
                           *_counts())
        if got is None:  # the caller then selects and builds; the next regions are wider
            seen.add("overflow")
            slack = sw.slack_div
            thr = T.kth_largest_abs(w, k)
            sw.build(w, thr)
            assert slack < 8 and sw._bounds[-1] > sw.nnz * (1 + 1 / 8)
            continue
        seen.add("miss" if win.misses > misses else "hit")
        thr = got
        assert thr == T.kth_largest_abs(w, k)
        assert sw.nnz == _assert_same_structure(sw, w, thr, rows, ncols, geo)
    assert {"hit", "miss", "overflow"} <= seen


def _assert_same_structure(sw, w, thr, rows, ncols, geo) -> int:
    """``sw`` holds the two-pass build's CSR (and for conv CSC) of ``w`` at ``thr``, bit for
    bit; returns that build's nnz (checked against numpy's count)."""
    from embedded.kernels.sparse import SparseWeight

    ref = SparseWeight(rows, ncols, geo)
    nnz = ref.build(w, thr)
    assert nnz == int(((np.abs(w) >= thr) & (w != 0)).sum())
    assert np.array_equal(sw.rowptr, ref.rowptr)
    names = ["val", "code"] + (["col", "c_row", "c_val"] if geo[0] else [])
    for name in names:
        assert np.array_equal(getattr(sw, name)[:nnz], getattr(ref, name)[:nnz]), name
    if geo[0]:
        assert np.array_equal(sw.colptr, ref.colptr)
    return nnz


def _counts():
    from embedded.kernels import topk as T

    return np.zeros(T.NCHUNK, np.int64), np.zeros(T.NCHUNK, np.int64)


def test_step_buffers_follow_a_replaced_shared_scratch():
    """A conv's step views (worked out once per batch size) move to the shared scratch when a
    larger layer replaces it, and its results stay the same; a new batch size gets its own
    views."""
    from embedded.layers import conv as C

    C._WS.__dict__.pop("bufs", None)   # start from no shared scratch, whatever ran before
    small, x, gy = _conv((8, 16, 12, 12, (3, 3), (1, 1), (1, 1), 1, True, 4))
    big, xb, gyb = _conv((16, 24, 20, 20, (3, 3), (1, 1), (1, 1), 1, False, 4))
    for layer in (small, big):
        layer.set_sparsity("swat", LayerSparsity(0.2, 0.3, 1))
    first = _run(small, x, gy)
    before = small._bufs
    _run(big, xb, gyb)  # grows the shared "xq", "gyb", ... buffers
    again = _run(small, x, gy)  # (the top-K now from the windows around the first's)
    for u, v in zip(first, again, strict=True):
        assert np.array_equal(u, v)
    now = small._bufs
    assert now is not before
    for name, view in (("xq", now.xq), ("gyb", now.gyb), ("gyT", now.gyT), ("gxq", now.gxq)):
        assert np.shares_memory(view, C.workspace(name, 1)), name
    _run(small, x[:2], gy[:2])
    assert small._bufs.key[0] == 2 and small._bufs.y.shape[0] == 2
