"""Numba kernels of the conv layer on a batch-last, phase-split, padded internal layout.

Layout ``xq`` (the packed input): shape ``(C_in * sh * sw, Hq, Wq, N)`` flattened, where
plane ``cq = (ci * sh + ph) * sw + pw`` holds ``xpad[ci, i*sh + ph, j*sw + pw, n]`` (zero
padded). A stride-s convolution becomes a stride-1 one over these phase planes: kernel tap
``(kh, kw)`` of input channel ``ci`` reads plane ``(ci, kh % sh, kw % sw)`` shifted by
``(kh // sh, kw // sw)``. Such a tap is encoded as ``code = ((cq * Hq) + kh//sh) * Wq + kw//sw``
and output row ``oh`` of it is the contiguous run ``xq[code*N + oh*Wq*N : ... + OW*N]``.
So every inner loop runs over a contiguous 1-D slice indexed from 0 (what vectorises in Numba,
on x86 and on ARM NEON alike), and small feature maps still get long runs (OW * N).

Output ``yb``: ``(C_out, OH, OW, N)`` flattened (batch last). ``gyT``: ``(OH, OW, N, C_out)``
for the weight gradient from sparse activations.

All parallel loops are over output rows/channels with a fixed order inside, so results are
bitwise reproducible for any thread count.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange


# ----------------------------------------------------------------------------- layout
@njit(cache=True, nogil=True, parallel=True)
def pack_input(x, xq, sh, sw, ph, pw, Hq, Wq):
    """NCHW x -> packed phase planes xq (flat), zero padding included."""
    N, C, H, W = x.shape
    s2 = sh * sw
    rs = Wq * N
    for cq in prange(C * s2):
        ci = cq // s2
        phs = (cq // sw) % sh
        pws = cq % sw
        for i in range(Hq):
            ih = i * sh + phs - ph
            row = xq[(cq * Hq + i) * rs:(cq * Hq + i + 1) * rs]
            if ih < 0 or ih >= H:
                row[:] = 0.0
                continue
            for j in range(Wq):
                iw = j * sw + pws - pw
                if iw < 0 or iw >= W:
                    for n in range(N):
                        row[j * N + n] = 0.0
            for n in range(N):
                src = x[n, ci, ih]
                for j in range(Wq):
                    iw = j * sw + pws - pw
                    if 0 <= iw < W:
                        row[j * N + n] = src[iw]


@njit(cache=True, nogil=True, parallel=True)
def unpack_output(yb, y, bias, has_bias):
    """Batch-last yb (Co, OH, OW, N) flat -> NCHW y, adding the bias."""
    N, Co, OH, OW = y.shape
    L = OW * N
    for co in prange(Co):
        b = bias[co] if has_bias else np.float32(0.0)
        for oh in range(OH):
            src = yb[(co * OH + oh) * L:(co * OH + oh + 1) * L]
            for n in range(N):
                dst = y[n, co, oh]
                for ow in range(OW):
                    dst[ow] = src[ow * N + n] + b


@njit(cache=True, nogil=True, parallel=True)
def pack_grad_out(gy, gyb, gbias, want_bias):
    """NCHW gy -> batch-last gyb (Co, OH, OW, N) flat; gbias[co] = sum of gy[:, co]."""
    N, Co, OH, OW = gy.shape
    L = OW * N
    for co in prange(Co):
        s = np.float32(0.0)
        for oh in range(OH):
            dst = gyb[(co * OH + oh) * L:(co * OH + oh + 1) * L]
            for n in range(N):
                src = gy[n, co, oh]
                for ow in range(OW):
                    dst[ow * N + n] = src[ow]
            if want_bias:
                for t in range(L):
                    s += dst[t]
        if want_bias:
            gbias[co] = s


@njit(cache=True, nogil=True, parallel=True)
def pack_grad_out_T(gy, gyT):
    """NCHW gy -> (OH, OW, N, Co) flat (channels last) for the sparse-activation weight grad."""
    N, Co, OH, OW = gy.shape
    for oh in prange(OH):
        for n in range(N):
            for co in range(Co):
                src = gy[n, co, oh]
                for ow in range(OW):
                    gyT[((oh * OW + ow) * N + n) * Co + co] = src[ow]


@njit(cache=True, nogil=True, parallel=True)
def unpack_grad_input(gxq, gx, sh, sw, ph, pw, Hq, Wq):
    """Packed gradient gxq (same layout as xq) -> NCHW gx (padding dropped)."""
    N, C, H, W = gx.shape
    s2 = sh * sw
    rs = Wq * N
    for ci in prange(C):
        for ih in range(H):
            t = ih + ph
            phs = t % sh
            i = t // sh
            for n in range(N):
                dst = gx[n, ci, ih]
                for iw in range(W):
                    u = iw + pw
                    pws = u % sw
                    j = u // sw
                    cq = ci * s2 + phs * sw + pws
                    dst[iw] = gxq[(cq * Hq + i) * rs + j * N + n]


# ----------------------------------------------------------------------------- codes
@njit(cache=True, nogil=True, parallel=True)
def weight_codes(widx, nnz, Cog, Cig, KH, KW, sh, sw, Hq, Wq, code, col, rowco):
    """For kept entries (flat weight index widx) compute their tap code, input channel, co."""
    kk = KH * KW
    rl = Cig * kk
    nch = 16
    for c in prange(nch):
        lo = nnz * c // nch
        hi = nnz * (c + 1) // nch
        for p in range(lo, hi):
            f = widx[p]
            co = f // rl
            r = f - co * rl
            cig = r // kk
            r2 = r - cig * kk
            kh = r2 // KW
            kw = r2 - kh * KW
            ci = (co // Cog) * Cig + cig
            cq = (ci * sh + kh % sh) * sw + kw % sw
            code[p] = (cq * Hq + kh // sh) * Wq + kw // sw
            col[p] = ci
            rowco[p] = co


@njit(cache=True, nogil=True)
def permute_csc(perm, nnz, code, rowco, widx, val, c_code, c_co, c_widx, c_val):
    for j in range(nnz):
        p = perm[j]
        c_code[j] = code[p]
        c_co[j] = rowco[p]
        c_widx[j] = widx[p]
        c_val[j] = val[p]


# ----------------------------------------------------------------------------- compute
@njit(cache=True, nogil=True, parallel=True)
def fwd_csr(rowptr, code, val, xq, yb, Co, OH, L, rs, N):
    """yb[co, oh, :] = sum over kept (code, v) of row co: v * xq[code*N + oh*rs : +L]."""
    for co in prange(Co):
        p0 = rowptr[co]
        p1 = rowptr[co + 1]
        for oh in range(OH):
            out = yb[(co * OH + oh) * L:(co * OH + oh + 1) * L]
            out[:] = 0.0
            off = oh * rs
            p = p0
            while p + 4 <= p1:
                a0 = code[p] * N + off
                a1 = code[p + 1] * N + off
                a2 = code[p + 2] * N + off
                a3 = code[p + 3] * N + off
                s0 = xq[a0:a0 + L]
                s1 = xq[a1:a1 + L]
                s2 = xq[a2:a2 + L]
                s3 = xq[a3:a3 + L]
                v0 = val[p]
                v1 = val[p + 1]
                v2 = val[p + 2]
                v3 = val[p + 3]
                for t in range(L):
                    out[t] += v0 * s0[t] + v1 * s1[t] + v2 * s2[t] + v3 * s3[t]
                p += 4
            while p < p1:
                a0 = code[p] * N + off
                s0 = xq[a0:a0 + L]
                v0 = val[p]
                for t in range(L):
                    out[t] += v0 * s0[t]
                p += 1


@njit(cache=True, nogil=True, parallel=True)
def bwd_input_csc(colptr, c_code, c_co, c_val, gyb, gxq, Ci, s2, plane, OH, L, rs, N):
    """gxq planes of input channel ci += v * gyb[co, oh, :] at code offsets (scatter by ci)."""
    for ci in prange(Ci):
        blk = gxq[ci * s2 * plane:(ci + 1) * s2 * plane]
        blk[:] = 0.0
        for p in range(colptr[ci], colptr[ci + 1]):
            v = c_val[p]
            co = c_co[p]
            t0 = c_code[p] * N
            for oh in range(OH):
                a = t0 + oh * rs
                dst = gxq[a:a + L]
                src = gyb[(co * OH + oh) * L:(co * OH + oh + 1) * L]
                for t in range(L):
                    dst[t] += v * src[t]


@njit(cache=True, nogil=True, parallel=True, fastmath=True)
def bwd_weight_sddmm(rowptr, code, widx, gyb, xq, gflat, Co, OH, L, rs, N):
    """gflat[widx[p]] = sum_oh dot(gyb[co, oh, :], xq[code*N + oh*rs : +L]) (masked grad)."""
    for co in prange(Co):
        for p in range(rowptr[co], rowptr[co + 1]):
            c0 = code[p] * N
            s = np.float32(0.0)
            for oh in range(OH):
                g = gyb[(co * OH + oh) * L:(co * OH + oh + 1) * L]
                a = c0 + oh * rs
                xs = xq[a:a + L]
                for t in range(L):
                    s += g[t] * xs[t]
            gflat[widx[p]] = s


@njit(cache=True, nogil=True, parallel=True)
def bwd_weight_sparse_act(aptr, apos, aval, gyT, gWt, H, W, KH, KW, sh, sw, ph, pw,
                          OH, OW, N, Co, Cig, Cog):
    """Dense weight gradient from channel-grouped sparse activations.

    gWt: (C_in, KH, KW, Cog) flat. For each kept activation a at (n, ci, ih, iw) and each tap
    (kh, kw) landing on an output (oh, ow): gWt[ci, kh, kw, :] += a * gyT[oh, ow, n, group].
    """
    Ci = aptr.size - 1
    hw = H * W
    blk = KH * KW * Cog
    for ci in prange(Ci):
        co0 = (ci // Cig) * Cog
        g = gWt[ci * blk:(ci + 1) * blk]
        g[:] = 0.0
        for e in range(aptr[ci], aptr[ci + 1]):
            a = aval[e]
            pos = apos[e]
            n = pos // hw
            r = pos - n * hw
            ih = r // W
            iw = r - ih * W
            for kh in range(KH):
                th = ih + ph - kh
                if th < 0:
                    break
                if th % sh != 0:
                    continue
                oh = th // sh
                if oh >= OH:
                    continue
                for kw in range(KW):
                    tw = iw + pw - kw
                    if tw < 0:
                        break
                    if tw % sw != 0:
                        continue
                    ow = tw // sw
                    if ow >= OW:
                        continue
                    s0 = ((oh * OW + ow) * N + n) * Co + co0
                    src = gyT[s0:s0 + Cog]
                    d0 = (kh * KW + kw) * Cog
                    dst = g[d0:d0 + Cog]
                    for c in range(Cog):
                        dst[c] += a * src[c]


@njit(cache=True, nogil=True, parallel=True)
def gwt_to_weight(gWt, gw, Cig, Cog, KH, KW):
    """(C_in, KH, KW, Cog) -> torch layout (C_out, Cig, KH, KW)."""
    Co = gw.shape[0]
    for co in prange(Co):
        g = co // Cog
        cl = co - g * Cog
        for cig in range(Cig):
            ci = g * Cig + cig
            for kh in range(KH):
                for kw in range(KW):
                    gw[co, cig, kh, kw] = gWt[((ci * KH + kh) * KW + kw) * Cog + cl]


@njit(cache=True, nogil=True, parallel=True)
def im2col(xq, codes, col, OH, L, rs, N):
    """col[r, oh*L:(oh+1)*L] = xq[codes[r]*N + oh*rs : +L] (dense taps, groups == 1)."""
    R = codes.size
    for r in prange(R):
        c0 = codes[r] * N
        for oh in range(OH):
            a = c0 + oh * rs
            col[r, oh * L:(oh + 1) * L] = xq[a:a + L]


@njit(cache=True, nogil=True, parallel=True)
def col2im(gcol, codes, gxq, Ci, kk, s2, plane, OH, L, rs, N):
    """gxq planes of ci = sum of gcol rows of ci's taps (scatter by ci; fixed tap order)."""
    for ci in prange(Ci):
        blk = gxq[ci * s2 * plane:(ci + 1) * s2 * plane]
        blk[:] = 0.0
        for r in range(ci * kk, (ci + 1) * kk):
            c0 = codes[r] * N
            for oh in range(OH):
                a = c0 + oh * rs
                dst = gxq[a:a + L]
                src = gcol[r, oh * L:(oh + 1) * L]
                for t in range(L):
                    dst[t] += src[t]
