"""Conv2d's dense implementations, each forced, against torch autograd: "direct" (every tap
through the compressed kernels), "gemm" (im2col + BLAS) and "igemm" (implicit im2col + the
vector microkernel, :mod:`embedded.kernels.conv_gemm`; forward, weight gradient and stride-1
input gradient).

The shapes put the microkernel's edges to work: output channels not a multiple of its 6 rows,
column tiles crossing an output row and the last tile short, a reduction longer than one
k block (KC), more row panels than column tiles (the split by rows) and fewer, and A with fewer
than 6 rows (zero-padded: 4 output channels, 4 input channels for the input gradient).
"""

from __future__ import annotations

import numba
import numpy as np
import pytest
from test_conv_linear import CONV_CASES, _check, _conv, _run

from embedded.kernels import sparse

# (cin, cout, h, w, kernel, stride, padding, groups, bias, batch)
CASES = [c for c in CONV_CASES if c[7] == 1] + [
    (32, 13, 7, 9, (3, 3), (1, 1), (1, 1), 1, True, 3),   # R = 288 > KC; 13 rows: an edge panel
    (8, 7, 6, 6, (1, 1), (1, 1), (1, 1), 1, False, 2),    # padding >= kernel: no flipped conv
    (4, 12, 6, 7, (3, 3), (1, 1), (1, 1), 1, True, 2),    # 4 input channels: A' padded
    (40, 70, 5, 5, (3, 3), (1, 1), (0, 0), 1, True, 2),   # 12 row panels, 1 column tile
    (6, 8, 11, 8, (3, 3), (1, 1), (2, 1), 1, False, 5),   # uneven padding, rows of 40 columns
    (16, 20, 8, 8, (3, 3), (1, 1), (1, 1), 1, True, 4),   # rows of 32 columns: whole tiles
]


def _impls(layer, impl: str) -> dict:
    if impl == "mixed":  # direct forward and weight gradient, gy packed again for igemm
        return {"forward": "direct", "backward_weight": "direct",
                "backward_input": "igemm" if layer._flip_ok else "direct"}
    if impl != "igemm":
        return dict.fromkeys(("forward", "backward_input", "backward_weight"), impl)
    return {"forward": "igemm", "backward_input": "igemm" if layer._flip_ok else "gemm",
            "backward_weight": "igemm"}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("impl", ["direct", "gemm", "igemm", "mixed"])
@pytest.mark.parametrize("parallel", [False, True])
def test_dense_impl_matches_torch(case, impl, parallel, monkeypatch):
    if parallel:
        monkeypatch.setattr(sparse, "PAR_MIN_WORK", 0)
    layer, x, gy = _conv(case)
    layer.dense_impl = _impls(layer, impl)
    _check(layer, x, gy, layer.params["weight"], x)
    # a smaller batch through the same buffers
    _check(layer, x[:1].copy(), gy[:1].copy(), layer.params["weight"], x[:1].copy())


def test_igemm_is_used_and_flipped_input_grad_where_allowed():
    """The default pick on this CPU, and the stride-1 input gradient by the flipped conv."""
    from embedded.kernels.microkernel import WIDE_VECTORS

    layer, _, _ = _conv((16, 24, 8, 8, (3, 3), (1, 1), (1, 1), 1, False, 2))
    strided, _, _ = _conv((16, 32, 8, 8, (3, 3), (2, 2), (1, 1), 1, False, 2))
    narrow, _, _ = _conv((16, 16, 8, 8, (3, 3), (1, 1), (1, 1), 1, False, 2))
    narrow_strided, _, _ = _conv((16, 16, 8, 8, (3, 3), (2, 2), (1, 1), 1, False, 2))
    first, _, _ = _conv((3, 64, 8, 8, (3, 3), (1, 1), (1, 1), 1, False, 2))  # 27 taps a row
    assert set(first.dense_impl.values()) == {"direct"}
    if WIDE_VECTORS:
        assert layer.dense_impl == {"forward": "igemm", "backward_input": "igemm",
                                    "backward_weight": "igemm"}
        assert strided.dense_impl == {"forward": "igemm", "backward_input": "gemm",
                                      "backward_weight": "igemm"}
        assert narrow.dense_impl == {"forward": "direct", "backward_input": "igemm",
                                     "backward_weight": "direct"}
        assert narrow_strided.dense_impl == strided.dense_impl
    else:
        assert set(layer.dense_impl.values()) == {"gemm"}
        assert set(narrow.dense_impl.values()) == {"direct"}


@pytest.mark.parametrize("impl", ["igemm", "direct", "mixed"])
def test_dense_impls_bitwise_equal_across_threads(impl, monkeypatch):
    """Each output of the microkernel path is one fixed-order sum, whichever thread (and
    whichever split, by columns or by rows) computes it; so is each entry of the direct
    weight gradient (blocks of 4 output channels, the last one partial: 13 and 70)."""
    monkeypatch.setattr(sparse, "PAR_MIN_WORK", 0)
    outs = []
    before = numba.get_num_threads()
    try:
        for th in (1, min(2, numba.config.NUMBA_NUM_THREADS)):
            numba.set_num_threads(th)
            for case in ((24, 13, 12, 12, (3, 3), (1, 1), (1, 1), 1, True, 4),
                         (40, 70, 5, 5, (3, 3), (1, 1), (0, 0), 1, True, 2)):
                layer, x, gy = _conv(case)
                layer.dense_impl = _impls(layer, impl)
                outs.append(_run(layer, x, gy))
    finally:
        numba.set_num_threads(before)
    for one, two in zip(outs[:2], outs[2:], strict=True):
        for u, v in zip(one, two, strict=True):  # y, gx, gw
            assert np.array_equal(u, v)


def test_bad_dense_impl_is_named():
    layer, x, gy = _conv((8, 7, 6, 6, (1, 1), (1, 1), (1, 1), 1, False, 2))
    layer.dense_impl = {"forward": "igemm", "backward_input": "igemm",
                        "backward_weight": "gemm"}
    with pytest.raises(ValueError, match=r"backward_input.*stride 1.*padding \(1, 1\)"):
        layer.forward(x)
    layer.dense_impl = {"forward": "fast", "backward_input": "gemm", "backward_weight": "gemm"}
    with pytest.raises(ValueError, match=r"dense_impl\['forward'\].*'fast'"):
        layer.forward(x)
    # a "gemm" input gradient reads gy packed in the GEMM layout, a direct weight gradient
    # packs it in the direct one
    layer, x, gy = _conv((8, 7, 6, 6, (3, 3), (1, 1), (1, 1), 1, False, 2))
    layer.dense_impl = {"forward": "direct", "backward_input": "gemm",
                        "backward_weight": "direct"}
    layer.forward(x)
    with pytest.raises(ValueError, match=r"backward_input'\] 'gemm' cannot follow "
                                         r"backward_weight 'direct'"):
        layer.backward(gy)
