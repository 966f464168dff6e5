"""Numba kernels of the linear layer's sparse paths.

Batch-last copies (``xT``: (F, N), ``gyT``: (O, N)) make every inner loop a contiguous 1-D run
over the batch indexed from 0. Parallel loops are over output rows / input columns with a
fixed order inside (bitwise reproducible for any thread count).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange


@njit(cache=True, nogil=True, parallel=True)
def transpose(a, out):
    """out (C, R) = a (R, C).T, blocked."""
    R, C = a.shape
    B = 32
    nb = (C + B - 1) // B
    for cb in prange(nb):
        c0 = cb * B
        c1 = min(C, c0 + B)
        for r in range(R):
            row = a[r]
            for c in range(c0, c1):
                out[c, r] = row[c]


@njit(cache=True, nogil=True, parallel=True)
def fwd_csr(rowptr, col, val, xT, yT):
    """yT[o, :] = sum over kept (i, v) of row o: v * xT[i, :]."""
    NO = yT.shape[0]
    N = yT.shape[1]
    for o in prange(NO):
        out = yT[o]
        out[:] = 0.0
        p = rowptr[o]
        p1 = rowptr[o + 1]
        while p + 4 <= p1:
            s0 = xT[col[p]]
            s1 = xT[col[p + 1]]
            s2 = xT[col[p + 2]]
            s3 = xT[col[p + 3]]
            v0 = val[p]
            v1 = val[p + 1]
            v2 = val[p + 2]
            v3 = val[p + 3]
            for t in range(N):
                out[t] += v0 * s0[t] + v1 * s1[t] + v2 * s2[t] + v3 * s3[t]
            p += 4
        while p < p1:
            s0 = xT[col[p]]
            v0 = val[p]
            for t in range(N):
                out[t] += v0 * s0[t]
            p += 1


@njit(cache=True, nogil=True, parallel=True)
def unpack_out(yT, y, bias, has_bias):
    """y (N, O) = yT.T + bias."""
    NO, N = yT.shape
    B = 32
    nb = (NO + B - 1) // B
    for ob in prange(nb):
        o0 = ob * B
        o1 = min(NO, o0 + B)
        for n in range(N):
            row = y[n]
            for o in range(o0, o1):
                row[o] = yT[o, n] + (bias[o] if has_bias else np.float32(0.0))


@njit(cache=True, nogil=True, parallel=True)
def bwd_input_csc(colptr, c_row, c_val, gyT, gxT):
    """gxT[i, :] = sum over kept (o, v) of column i: v * gyT[o, :]."""
    F = gxT.shape[0]
    N = gxT.shape[1]
    for i in prange(F):
        out = gxT[i]
        out[:] = 0.0
        p = colptr[i]
        p1 = colptr[i + 1]
        while p + 4 <= p1:
            s0 = gyT[c_row[p]]
            s1 = gyT[c_row[p + 1]]
            s2 = gyT[c_row[p + 2]]
            s3 = gyT[c_row[p + 3]]
            v0 = c_val[p]
            v1 = c_val[p + 1]
            v2 = c_val[p + 2]
            v3 = c_val[p + 3]
            for t in range(N):
                out[t] += v0 * s0[t] + v1 * s1[t] + v2 * s2[t] + v3 * s3[t]
            p += 4
        while p < p1:
            s0 = gyT[c_row[p]]
            v0 = c_val[p]
            for t in range(N):
                out[t] += v0 * s0[t]
            p += 1


@njit(cache=True, nogil=True, parallel=True, fastmath=True)
def bwd_weight_sddmm(rowptr, col, widx, gyT, xT, gflat):
    """gflat[widx[p]] = dot(gyT[o, :], xT[i, :]) for kept entries only (masked grad)."""
    NO = gyT.shape[0]
    N = gyT.shape[1]
    for o in prange(NO):
        g = gyT[o]
        for p in range(rowptr[o], rowptr[o + 1]):
            xs = xT[col[p]]
            s = np.float32(0.0)
            for t in range(N):
                s += g[t] * xs[t]
            gflat[widx[p]] = s


@njit(cache=True, nogil=True, parallel=True)
def bwd_weight_sparse_act(aptr, apos, aval, gy, gw):
    """Dense gw (O, F) = gy.T @ x_s with x_s sparse by sample (aptr over N, apos = feature).

    Work per output block: tile[f, :B] += a * gy[n, o0:o0+B] over kept (n, f, a), then the
    tile is written transposed into gw rows o0..o0+B (every row of gw written once).
    """
    N = gy.shape[0]
    NO, F = gw.shape
    B = 16
    nb = (NO + B - 1) // B
    for ob in prange(nb):
        o0 = ob * B
        o1 = min(NO, o0 + B)
        w = o1 - o0
        for o in range(o0, o1):
            gw[o, :] = 0.0
        for n in range(N):
            g = gy[n, o0:o1]
            for e in range(aptr[n], aptr[n + 1]):
                a = aval[e]
                f = apos[e]
                for t in range(w):
                    gw[o0 + t, f] += a * g[t]


@njit(cache=True, nogil=True, parallel=True)
def linear_codes(widx, nnz, F, col, rowo):
    nch = 16
    for c in prange(nch):
        lo = nnz * c // nch
        hi = nnz * (c + 1) // nch
        for p in range(lo, hi):
            f = widx[p]
            o = f // F
            rowo[p] = o
            col[p] = f - o * F


@njit(cache=True, nogil=True)
def permute_csc(perm, nnz, rowo, widx, val, c_row, c_widx, c_val):
    for j in range(nnz):
        p = perm[j]
        c_row[j] = rowo[p]
        c_widx[j] = widx[p]
        c_val[j] = val[p]
