"""Max pool, average pool and global average pool (torch semantics), forward and backward.

Work is split over (sample, channel) planes; each plane is handled by one thread in a fixed
order, so results (including the overlapping-window scatter of backward) are bitwise
independent of the thread count.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from embedded.kernels.elementwise import dual, pick
from embedded.layers.base import BufferedLayer


@njit(cache=True, nogil=True, inline="always")
def _better(val, best):
    """torch's rule: the candidate wins if larger or NaN (first maximum wins on ties)."""
    return (val > best) | (val != val)


@njit(cache=True, nogil=True)
def _maxpool2x2_plane(xp, yp, ip):
    """One (H, W) plane, 2x2 stride-2 max pool without padding: the four taps unrolled into
    selects (which input wins is a coin flip on real activations: no branch to mispredict),
    row slices indexed from 0. femnist_cnn's first pool (16x32x28x28), 2 threads:
    0.67 -> 0.29 ms."""
    w = xp.shape[1]
    for a in range(yp.shape[0]):
        r0 = xp[2 * a]
        r1 = xp[2 * a + 1]
        yr = yp[a]
        ir = ip[a]
        for b in range(yp.shape[1]):
            best = r0[2 * b]
            bi = 2 * a * w + 2 * b
            v = r0[2 * b + 1]
            t = _better(v, best)
            best = v if t else best
            bi = bi + 1 if t else bi
            v = r1[2 * b]
            t = _better(v, best)
            best = v if t else best
            bi = (2 * a + 1) * w + 2 * b if t else bi
            v = r1[2 * b + 1]
            t = _better(v, best)
            best = v if t else best
            bi = (2 * a + 1) * w + 2 * b + 1 if t else bi
            yr[b] = best
            ir[b] = bi


def _maxpool_fwd(x, kh, kw, sh, sw, ph, pw, y, idx):
    n, c, h, w = x.shape
    oh, ow = y.shape[2], y.shape[3]
    fast = kh == 2 and kw == 2 and sh == 2 and sw == 2 and ph == 0 and pw == 0
    for p in prange(n * c):
        i = p // c
        ch = p % c
        if fast:
            _maxpool2x2_plane(x[i, ch], y[i, ch], idx[i, ch])
            continue
        for a in range(oh):
            h0 = a * sh - ph
            for b in range(ow):
                w0 = b * sw - pw
                # torch: start at -inf with the first valid position; take val if
                # val > best or val is NaN (first maximum wins on ties).
                best = np.float32(-np.inf)
                bi = max(h0, 0) * w + max(w0, 0)
                for u in range(kh):
                    hh = h0 + u
                    if hh < 0 or hh >= h:
                        continue
                    for v in range(kw):
                        ww = w0 + v
                        if ww < 0 or ww >= w:
                            continue
                        val = x[i, ch, hh, ww]
                        if _better(val, best):
                            best = val
                            bi = hh * w + ww
                y[i, ch, a, b] = best
                idx[i, ch, a, b] = bi


def _maxpool_bwd(gy, idx, gx):
    n, c, h, w = gx.shape
    oh, ow = gy.shape[2], gy.shape[3]
    for p in prange(n * c):
        i = p // c
        ch = p % c
        plane = gx[i, ch].reshape(h * w)
        for j in range(h * w):
            plane[j] = 0.0
        for a in range(oh):
            for b in range(ow):
                plane[idx[i, ch, a, b]] += gy[i, ch, a, b]


def _avgpool_fwd(x, kh, kw, sh, sw, ph, pw, y):
    n, c, h, w = x.shape
    oh, ow = y.shape[2], y.shape[3]
    # count_include_pad=True, ceil_mode=False: every window counts kh*kw positions.
    inv = 1.0 / (kh * kw)
    for p in prange(n * c):
        i = p // c
        ch = p % c
        for a in range(oh):
            h0 = a * sh - ph
            for b in range(ow):
                w0 = b * sw - pw
                s = np.float32(0.0)
                for u in range(kh):
                    hh = h0 + u
                    if hh < 0 or hh >= h:
                        continue
                    for v in range(kw):
                        ww = w0 + v
                        if ww < 0 or ww >= w:
                            continue
                        s += x[i, ch, hh, ww]
                y[i, ch, a, b] = np.float32(s * inv)


def _avgpool_bwd(gy, kh, kw, sh, sw, ph, pw, gx):
    n, c, h, w = gx.shape
    oh, ow = gy.shape[2], gy.shape[3]
    inv = np.float32(1.0 / (kh * kw))
    for p in prange(n * c):
        i = p // c
        ch = p % c
        for a in range(h):
            for b in range(w):
                gx[i, ch, a, b] = 0.0
        for a in range(oh):
            h0 = a * sh - ph
            for b in range(ow):
                w0 = b * sw - pw
                g = gy[i, ch, a, b] * inv
                for u in range(kh):
                    hh = h0 + u
                    if hh < 0 or hh >= h:
                        continue
                    for v in range(kw):
                        ww = w0 + v
                        if ww < 0 or ww >= w:
                            continue
                        gx[i, ch, hh, ww] += g


@njit(cache=True, nogil=True, fastmath={"reassoc", "nsz"})
def _fsum(r):
    """float32 sum of a 1-D block, vectorised (reassociation only here)."""
    a = np.float32(0.0)
    for j in range(r.size):
        a += r[j]
    return a


def _gap_fwd(x, y):
    n, c, hw = x.shape
    for p in prange(n * c):
        i = p // c
        ch = p % c
        r = x[i, ch]
        s = 0.0
        for lo in range(0, hw, 1024):  # float32 blocks, float64 across blocks
            s += np.float64(_fsum(r[lo:min(lo + 1024, hw)]))
        y[i, ch] = np.float32(s / hw)


def _gap_bwd(gy, gx):
    n, c, hw = gx.shape
    for p in prange(n * c):
        i = p // c
        ch = p % c
        g = np.float32(gy[i, ch] / hw)
        for j in range(hw):
            gx[i, ch, j] = g


MAXPOOL_FWD = dual(_maxpool_fwd)
MAXPOOL_BWD = dual(_maxpool_bwd)
AVGPOOL_FWD = dual(_avgpool_fwd)
AVGPOOL_BWD = dual(_avgpool_bwd)
GAP_FWD = dual(_gap_fwd)
GAP_BWD = dual(_gap_bwd)


class _Pool2d(BufferedLayer):
    keeps_input = False  # (max pooling saves its argmax)
    keeps_output = False

    def __init__(self, node, in_shapes, out_shape):
        super().__init__(node, in_shapes, out_shape)
        self.kernel = tuple(node.attrs["kernel"])
        self.stride = tuple(node.attrs["stride"])
        self.padding = tuple(node.attrs["padding"])

    def _geom(self):
        return (*self.kernel, *self.stride, *self.padding)


class MaxPool2d(_Pool2d):
    """``torch.nn.MaxPool2d(kernel, stride, padding)``; argmax saved for backward."""

    def setup(self, max_batch: int) -> None:
        super().setup(max_batch)
        self._idx = np.empty((max_batch, *self.out_shape), np.int32)

    def forward(self, x: np.ndarray, training: bool) -> np.ndarray:
        n = x.shape[0]
        y = self._y[:n]
        pick(MAXPOOL_FWD, y.size * self.kernel[0] * self.kernel[1])(x, *self._geom(), y, self._idx[:n])
        self._n = n
        return y

    def backward(self, gy: np.ndarray, need_input_grad: bool = True) -> np.ndarray | None:
        if not need_input_grad:
            return None
        n = self._n
        gx = self._gx[:n]
        pick(MAXPOOL_BWD, gx.size + gy.size)(gy, self._idx[:n], gx)
        return gx


class AvgPool2d(_Pool2d):
    """``torch.nn.AvgPool2d(kernel, stride, padding)`` with count_include_pad=True."""

    def forward(self, x: np.ndarray, training: bool) -> np.ndarray:
        n = x.shape[0]
        y = self._y[:n]
        pick(AVGPOOL_FWD, y.size * self.kernel[0] * self.kernel[1])(x, *self._geom(), y)
        self._n = n
        return y

    def backward(self, gy: np.ndarray, need_input_grad: bool = True) -> np.ndarray | None:
        if not need_input_grad:
            return None
        gx = self._gx[: self._n]
        pick(AVGPOOL_BWD, gx.size + gy.size * self.kernel[0] * self.kernel[1])(gy, *self._geom(), gx)
        return gx


class GlobalAvgPool(BufferedLayer):
    """Mean over H and W: (N, C, H, W) -> (N, C) (``adaptive_avg_pool2d(1)`` + flatten)."""

    keeps_input = False
    keeps_output = False

    def forward(self, x: np.ndarray, training: bool) -> np.ndarray:
        n, c = x.shape[0], x.shape[1]
        y = self._y[:n]
        pick(GAP_FWD, x.size)(x.reshape(n, c, -1), y)
        self._n = n
        return y

    def backward(self, gy: np.ndarray, need_input_grad: bool = True) -> np.ndarray | None:
        if not need_input_grad:
            return None
        n = self._n
        gx = self._gx[:n]
        pick(GAP_BWD, gx.size)(gy, gx.reshape(n, gx.shape[1], -1))
        return gx
