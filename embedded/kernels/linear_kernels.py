"""Numba kernels of the linear layer's sparse paths.

Batch-last copies (``xT``: (F, N), ``gyT``: (O, N)) make every inner loop a contiguous 1-D run
over the batch indexed from 0. Every kernel is a ``dual`` (serial, parallel) pair; parallel
loops are over output rows / input columns / static blocks with a fixed order inside (bitwise
reproducible for any thread count).
"""

from __future__ import annotations

import numpy as np
from numba import prange

from .layout import to_grid
from .sparse import dual, gather_axpy


@dual
def pack_x(x, xbits, xT, hist, want_hist):
    """xT (F, N) = x.T; if ``want_hist`` also pass 1 of the activation top-K (per chunk)."""
    N, F = x.shape
    nch = hist.shape[0] // 4
    for c in prange(nch):
        f0 = F * c // nch
        f1 = F * (c + 1) // nch
        for n in range(N):
            row = x[n]
            for f in range(f0, f1):
                xT[f, n] = row[f]
        if want_hist:
            hist[4 * c:4 * c + 4] = 0
            for n in range(N):
                h = hist[4 * c + (n & 3)]
                brow = xbits[n]
                for f in range(f0, f1):
                    h[(brow[f] & np.uint32(0x7FFFFFFF)) >> np.uint32(20)] += 1


@dual
def fwd_csr(rowptr, col, val, xT, yT, y, bias, has_bias):
    """y[:, o] = bias[o] + sum over kept (i, v) of row o: v * xT[i, :] (8, 4, then 1 entries
    per pass: :func:`~embedded.kernels.sparse.gather_axpy`)."""
    NO = rowptr.size - 1
    N = xT.shape[1]
    xTf = xT.reshape(-1)
    for o in prange(NO):
        out = yT[o]
        out[:] = 0.0
        gather_axpy(out, xTf, col, val, rowptr[o], rowptr[o + 1], N, 0)
        b = bias[o] if has_bias else np.float32(0.0)
        for n in range(N):
            y[n, o] = out[n] + b


@dual
def pack_gy(gy, gyT, gbias, want_bias):
    """gyT (O, N) = gy.T and gbias = gy.sum(0) (fixed order)."""
    N, NO = gy.shape
    nch = 16
    for c in prange(nch):
        o0 = NO * c // nch
        o1 = NO * (c + 1) // nch
        for n in range(N):
            row = gy[n]
            for o in range(o0, o1):
                gyT[o, n] = row[o]
        if want_bias:
            for o in range(o0, o1):
                s = np.float32(0.0)
                r = gyT[o]
                for n in range(N):
                    s += r[n]
                gbias[o] = s


@dual
def bwd_input_rows(rowptr, col, val, gyT, priv, gx):
    """gx = gy @ W_s from the CSR rows: worker c scatters rows o of its static chunk,
    ``priv[c][i, :] += v * gyT[o, :]`` (a private (F, N) accumulator: no race, no CSC to
    build), then gx[:, i] = sum over workers in a fixed order (bitwise reproducible for a
    given worker count: the caller fixes it, not the thread count)."""
    NO = rowptr.size - 1
    nw, F, N = priv.shape
    for c in prange(nw):
        acc = priv[c]
        acc[:, :] = 0.0
        for o in range(NO * c // nw, NO * (c + 1) // nw):
            g = gyT[o]
            for p in range(rowptr[o], rowptr[o + 1]):
                v = val[p]
                dst = acc[col[p]]
                for t in range(N):
                    dst[t] += v * g[t]
    nch = 16
    for c in prange(nch):
        for i in range(F * c // nch, F * (c + 1) // nch):
            for n in range(N):
                s = priv[0, i, n]
                for w in range(1, nw):
                    s += priv[w, i, n]
                gx[n, i] = s


@dual(fastmath=True)
def bwd_weight_sddmm(rowptr, col, widx, gyT, xT, gflat):
    """gflat[widx[p]] = dot(gyT[o, :], xT[i, :]) for kept entries only (masked grad)."""
    NO = rowptr.size - 1
    N = gyT.shape[1]
    for o in prange(NO):
        g = gyT[o]
        for p in range(rowptr[o], rowptr[o + 1]):
            xs = xT[col[p]]
            s = np.float32(0.0)
            for t in range(N):
                s += g[t] * xs[t]
            gflat[widx[p]] = s


@dual
def sparse_acts_by_feature(xT, thr, fptr, an, av):
    """Kept activations (``|x| >= thr``, ``x != 0``) grouped by feature: CSR over f of
    (sample, value), compacted without branches from the batch-last rows of xT."""
    F, N = xT.shape
    p = 0
    for f in range(F):
        fptr[f] = p
        r = xT[f]
        for n in range(N):
            a = r[n]
            an[p] = n
            av[p] = a
            p += (a != 0.0) & (abs(a) >= thr)
    fptr[F] = p
    return p


@dual
def bwd_weight_fblocks(fptr, an, av, gy, gw, tile):
    """Dense gw (O, F) = gy.T @ x_s from the kept activations only, grouped by feature.

    Features are taken in blocks of FB = tile.shape[1]: row t of the worker's tile (FB, O)
    accumulates ``a * gy[n, :]`` (one contiguous O-long axpy, 8, 4, then 1 kept samples per
    pass) for every kept (n, a) of feature f0 + t, then the tile is written to gw's columns
    f0..f0+FB. Blocks are split statically over ``tile.shape[0]`` workers; the summation
    order of each entry is fixed (results do not depend on the worker count).
    """
    NO = gy.shape[1]
    F = gw.shape[1]
    gyf = gy.reshape(-1)
    FB = tile.shape[1]
    nb = (F + FB - 1) // FB
    nw = tile.shape[0]
    gwf = gw.reshape(gw.size)
    for c in prange(nw):
        tl = tile[c]
        tlf = tl.reshape(tl.size)
        for fb in range(nb * c // nw, nb * (c + 1) // nw):
            f0 = fb * FB
            fw = min(FB, F - f0)
            for t in range(fw):
                dst = tl[t]
                dst[:] = 0.0
                gather_axpy(dst, gyf, an, av, fptr[f0 + t], fptr[f0 + t + 1], NO, 0)
            # tile (fw, O) -> gw[:, f0:f0 + fw]: 8 x 8 register-block transposes
            to_grid(tlf, 0, NO, fw, NO, 1, gwf, f0, 0, F, NO)
