"""Element-wise Numba kernels (ReLU, add, dropout, accumulate, SGD update) and the dual
serial/parallel compilation helper the other H4 layers use.

Every kernel works on flat 1-D float32 views (a C-contiguous NCHW array ``a`` gives one with
``a.reshape(-1)`` without copying), writes into a caller-given output buffer and allocates
nothing. Each output element is computed by exactly one thread with a fixed formula, so the
result is bitwise independent of the thread count. Kernels release the GIL.

Numba's parallel launch costs a few microseconds per call, which is more than a small layer's
work on two cores; :func:`dual` therefore compiles each kernel twice (serial and parallel) and
:func:`pick` chooses by work size (threshold measured, see ``PAR_MIN``).
"""

from __future__ import annotations

import os
import types

import numpy as np
from numba import njit, prange

from ..runtime import threads as _threads

#: Work (elements touched x passes) above which a kernel runs its parallel variant (override
#: with SPARSEFL_PAR_MIN_ELEM). With the OpenMP layer an idle thread is still spinning when the
#: next region starts (~2 us a region, vs ~150 us with workqueue's sleeping workers), so maps
#: of 64k elements already pay: whole SWAT steps on 2 cores (resnet8 / femnist_cnn, batch 16,
#: 3 interleaved runs) 12.9 / 22.6 ms at 1M elements vs 11.8 / 18.3 ms at 64k.
PAR_MIN = int(os.environ.get("SPARSEFL_PAR_MIN_ELEM", str(1 << 16)))

_OPTS = {"cache": True, "nogil": True}


def dual(fn):
    """Compile ``fn`` as (serial, parallel) Numba kernels.

    The serial copy gets its own ``__qualname__`` so Numba's on-disk cache keeps the two
    compilations apart (the cache index is keyed by qualname and signature, not by flags).
    """
    par = njit(parallel=True, **_OPTS)(fn)
    g = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__ + "_serial",
                           fn.__defaults__, fn.__closure__)
    g.__qualname__ = fn.__qualname__ + "_serial"
    g.__module__ = fn.__module__
    ser = njit(**_OPTS)(g)
    return ser, par


def pick(pair, work: int):
    """The parallel variant of a ``dual`` pair when ``work`` is large enough and threads > 1."""
    if work >= PAR_MIN and _threads() > 1:
        return pair[1]
    return pair[0]


# A ReLU saves its keep mask (uint8: 1 where the output is not <= 0, NaN included) for its
# backward instead of reading its float output again: a quarter of the bytes, and the output
# is free once the next layers' forwards have read it (Network.setup shares it).
def _relu_fwd(x, y, mk):
    # written as torch's threshold (x <= 0 -> 0), so NaN propagates as in torch
    for i in prange(x.size):
        v = x[i]
        y[i] = np.float32(0.0) if v <= 0.0 else v
        mk[i] = np.uint8(0) if v <= 0.0 else np.uint8(1)


def _relu_bwd(gy, mk, gx):
    # torch's threshold_backward: the gradient passes where the output is not <= 0
    for i in prange(gy.size):
        gx[i] = np.float32(0.0) if mk[i] == 0 else gy[i]


def _add_fwd(a, b, y):
    for i in prange(a.size):
        y[i] = a[i] + b[i]


def _add_relu_fwd(a, b, y, mk):
    # a residual sum and the ReLU after it in one pass (the same floats as the two passes)
    for i in prange(a.size):
        v = a[i] + b[i]
        y[i] = np.float32(0.0) if v <= 0.0 else v
        mk[i] = np.uint8(0) if v <= 0.0 else np.uint8(1)


def _acc(dst, src):
    for i in prange(dst.size):
        dst[i] += src[i]


def _dropout_fwd(x, u, p, scale, y):
    for i in prange(x.size):
        y[i] = x[i] * scale if u[i] >= p else np.float32(0.0)


def _dropout_bwd(gy, u, p, scale, gx):
    for i in prange(gy.size):
        gx[i] = gy[i] * scale if u[i] >= p else np.float32(0.0)


def _sgd(p, g, buf, lr, momentum, wd, nesterov):
    # torch.optim.SGD (dampening 0): d = g + wd*p; buf = m*buf + d (buf starts at 0, which
    # equals torch's buf = d on the first step); d = d + m*buf (nesterov) or buf; p -= lr*d.
    lr32 = np.float32(lr)
    m32 = np.float32(momentum)
    wd32 = np.float32(wd)
    for i in prange(p.size):
        d = g[i] + wd32 * p[i]
        if m32 != 0.0:
            b = m32 * buf[i] + d
            buf[i] = b
            if nesterov:
                d = d + m32 * b
            else:
                d = b
        p[i] = p[i] - lr32 * d


def _sgd_masked(p, g, buf, mask, lr, momentum, wd, nesterov):
    # Same update, but entries outside the mask are held at exactly 0 (weights and momentum),
    # so a mask that changed between rounds cannot leak stale momentum into pruned weights.
    lr32 = np.float32(lr)
    m32 = np.float32(momentum)
    wd32 = np.float32(wd)
    for i in prange(p.size):
        if mask[i] == 0:
            p[i] = np.float32(0.0)
            buf[i] = np.float32(0.0)
            continue
        d = g[i] + wd32 * p[i]
        if m32 != 0.0:
            b = m32 * buf[i] + d
            buf[i] = b
            if nesterov:
                d = d + m32 * b
            else:
                d = b
        p[i] = p[i] - lr32 * d


def _all_finite(x):
    # Serial on purpose: a NaN check runs only after a non-finite loss.
    for i in range(x.size):
        v = x[i]
        if not (v - v == 0.0):
            return False
    return True


RELU_FWD = dual(_relu_fwd)
RELU_BWD = dual(_relu_bwd)
ADD_FWD = dual(_add_fwd)
ADD_RELU_FWD = dual(_add_relu_fwd)
ACC = dual(_acc)
DROPOUT_FWD = dual(_dropout_fwd)
DROPOUT_BWD = dual(_dropout_bwd)
SGD = dual(_sgd)
SGD_MASKED = dual(_sgd_masked)
all_finite = njit(**_OPTS)(_all_finite)
