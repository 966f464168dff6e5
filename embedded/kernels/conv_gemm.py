"""Dense convolution as GEMMs over an implicit im2col matrix, on the vector microkernel.

im2col's matrix of a packed batch-last input is ``col[r, oh*L + t] = xq[codes[r]*N + oh*rs +
t]`` (see :func:`~embedded.kernels.conv_kernels.im2col`). These kernels never write it: each
thread gathers the piece one call of the :mod:`~embedded.kernels.microkernel` needs into a
panel that stays in cache. For resnet18's 64 -> 64 convs on 32 x 32 maps at batch 16, ``col``
is 9.4 M floats (37 MB, more than L3); im2col + BLAS wrote it and read it back, twice a step.

* :func:`conv_gemm`: ``c = A @ col``, 32 columns of ``col`` at a time. The forward (A: the
  weight); and the input gradient of a stride-1 conv, a convolution of gy zero-padded by
  ``k - 1 - p`` with the flipped weight (A: the weight read transposed in place, the flip in
  the gather's tap codes).
* :func:`conv_gemm_wgrad`: the weight gradient ``gy @ col^T``, 32 rows of ``col`` at a time,
  transposed as they are gathered.

A is read in place (no packing: a weight of resnet18's last block is 9.4 MB, and packing it
cost more than it saved); it needs >= 6 rows (the callers pad smaller ones): a last partial
6-row panel is computed shifted up to stay inside A, into a scratch tile. Work is split
statically over the threads (by column tiles, or by row panels when there are more of those),
and every output is one sum in a fixed order whichever thread computes it: results are bitwise
equal across thread counts.
"""

from __future__ import annotations

from numba import njit, prange

from .microkernel import MR, NR, copy_row, gather_t16, mk, mk_set
from .sparse import dual

#: k values per microkernel call (a 32 KB B chunk stays in L1 across the row panels)
KC = 256


def panels(m: int) -> int:
    """6-row panels of an ``m``-row A."""
    return (m + MR - 1) // MR


@njit(cache=True, nogil=True, inline="always")
def _part(ntile, npan, t, nt):
    """Part t of nt: its column tiles [t0, t1) and row panels [p0, p1) (the longer of the
    two split, the other whole)."""
    if ntile >= npan:
        return ntile * t // nt, ntile * (t + 1) // nt, 0, npan
    return 0, ntile, npan * t // nt, npan * (t + 1) // nt


@njit(cache=True, nogil=True, inline="always")
def _tile(first, a, a0, lda, aout, nin, kc, b, b0, c, c0, ldc):
    """One microkernel call: the tile set (``first`` k block) or accumulated."""
    if first:
        mk_set(a, a0, lda, aout, nin, kc, b, b0, c, c0, ldc)
    else:
        mk(a, a0, lda, aout, nin, kc, b, b0, c, c0, ldc)


@njit(cache=True, nogil=True, inline="always")
def _edge_out(sc, so, i0, i1, M, w, c, ldc, col0):
    """An edge tile's rows i0.. (below M; computed from row i1 <= i0 on) and first w columns
    from the scratch ``sc[so:]`` into ``c`` at column col0."""
    for i in range(i0, min(i0 + MR, M)):
        for q in range(w):
            c[i * ldc + col0 + q] = sc[so + (i - i1) * NR + q]


@dual
def conv_gemm(a, lda, aout, nin, ma, xq, codes, c, M, L, rs, N, kstep, bp, tile):
    """``c[:M, :] = A @ col`` (``c`` row-major (M, OH*L)) with ``A[i, k] = a[i*lda +
    (k // nin)*aout + k % nin]`` read in place (``ma`` >= 6 rows of it exist). ``kstep``: k per
    microkernel call (a multiple of ``nin`` if ``nin`` < R). ``bp`` (parts, R*NR) and
    ``tile`` (parts, panels*MR*NR) are per-part scratch, ``bp.shape[0]`` static parts."""
    R = codes.size
    NC = c.shape[1]
    cf = c.reshape(c.size)
    nt = bp.shape[0]
    ntile = (NC + NR - 1) // NR
    npan = (M + MR - 1) // MR
    for t in prange(nt):
        t0, t1, p0, p1 = _part(ntile, npan, t, nt)
        b = bp[t]
        sc = tile[t]
        for jt in range(t0, t1):
            j0 = jt * NR
            w = min(NR, NC - j0)
            oh = j0 // L
            s0 = j0 - oh * L
            if w == NR and s0 + NR <= L:  # the tile lies in one output row: contiguous runs
                base = oh * rs + s0
                for r in range(R):
                    copy_row(xq, codes[r] * N + base, b, r * NR)
            else:
                for r in range(R):
                    base = codes[r] * N
                    for q in range(NR):
                        j = j0 + q
                        if q < w:
                            o = j // L
                            b[r * NR + q] = xq[base + o * rs + j - o * L]
                        else:
                            b[r * NR + q] = 0.0
            for k0 in range(0, R, kstep):
                kc = min(kstep, R - k0)
                ka = (k0 // nin) * aout + k0 % nin
                for p in range(p0, p1):
                    i0 = p * MR
                    if w == NR and i0 + MR <= M:
                        _tile(k0 == 0, a, i0 * lda + ka, lda, aout, nin, kc, b, k0 * NR, cf,
                              i0 * NC + j0, NC)
                    else:  # an edge: into the scratch (rows shifted to stay inside A)
                        i1 = min(i0, ma - MR)
                        _tile(k0 == 0, a, i1 * lda + ka, lda, aout, nin, kc, b, k0 * NR, sc,
                              (p - p0) * MR * NR, NR)
            for p in range(p0, p1):
                i0 = p * MR
                if not (w == NR and i0 + MR <= M):
                    _edge_out(sc, (p - p0) * MR * NR, i0, min(i0, ma - MR), M, w, cf, NC, j0)


@dual
def conv_gemm_wgrad(a, ma, xq, codes, c, M, J, L, rs, N, bp, tile):
    """The weight gradient ``c[:M, :R] = A @ col^T`` (``c`` row-major (M, R)) with ``A[i, k] =
    a[i*J + k]`` (gy batch-last, row-major (ma >= 6, J)) and ``col`` the implicit im2col
    (``col[r, oh*L + t] = xq[codes[r]*N + oh*rs + t]``): for each k block of KC columns each
    part gathers its 32-row tiles of ``col`` transposed into ``bp`` (parts, KC*NR) and runs
    the microkernel for every 6-row panel; edge results accumulate in ``tile`` (parts,
    (panels + tiles)*MR*NR)."""
    R = codes.size
    cf = c.reshape(c.size)
    nt = bp.shape[0]
    ntile = (R + NR - 1) // NR
    npan = (M + MR - 1) // MR
    for t in prange(nt):
        t0, t1, p0, p1 = _part(ntile, npan, t, nt)
        b = bp[t]
        sc = tile[t]
        for k0 in range(0, J, KC):
            kc = min(KC, J - k0)
            for jt in range(t0, t1):
                r0 = jt * NR
                w = min(NR, R - r0)
                # col's rows r0.., columns k0.. transposed into b, one output row's run at a
                # time: 16 x 16 blocks in registers, the rest one by one
                k = k0
                while k < k0 + kc:
                    oh = k // L
                    s = k - oh * L
                    run = min(L - s, k0 + kc - k)
                    base = oh * rs + s
                    d = (k - k0) * NR
                    u = 0
                    if w == NR:
                        while u + 16 <= run:
                            gather_t16(xq, codes, r0, N, base + u, b, d + u * NR, NR)
                            gather_t16(xq, codes, r0 + 16, N, base + u, b, d + u * NR + 16, NR)
                            u += 16
                    for q in range(NR):
                        if q < w:
                            src = xq[codes[r0 + q] * N + base:]
                            for v in range(u, run):
                                b[d + v * NR + q] = src[v]
                        else:
                            for v in range(u, run):
                                b[d + v * NR + q] = 0.0
                    k += run
                for p in range(p0, p1):
                    i0 = p * MR
                    if w == NR and i0 + MR <= M:
                        _tile(k0 == 0, a, i0 * J + k0, J, 0, J, kc, b, 0, cf, i0 * R + r0, R)
                    else:  # an edge: its slot in the scratch (rows shifted to stay inside A)
                        slot = p - p0 if w < NR else npan + jt - t0
                        i1 = min(i0, ma - MR)
                        _tile(k0 == 0, a, i1 * J + k0, J, 0, J, kc, b, 0, sc, slot * MR * NR,
                              NR)
        for jt in range(t0, t1):
            r0 = jt * NR
            w = min(NR, R - r0)
            for p in range(p0, p1):
                i0 = p * MR
                if not (w == NR and i0 + MR <= M):
                    slot = p - p0 if w < NR else npan + jt - t0
                    _edge_out(sc, slot * MR * NR, i0, min(i0, ma - MR), M, w, cf, R, r0)
