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

Every kernel is a ``dual`` (serial, parallel) pair; parallel loops are over output or input
channels with a fixed order inside, so results are bitwise reproducible for any thread count.
Unpacking to NCHW is fused into the compute kernels (one dispatch per phase).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .layout import from_grid, from_pair, to_grid
from .sparse import compact_kept, dual, gather_axpy, gather_axpy_rows


# ----------------------------------------------------------------------------- layout
@dual
def pack_input(x, xbits, xq, sh, sw, ph, pw, Hq, Wq, KH, KW, hist, want_hist):
    """NCHW x -> packed phase planes xq (flat), zero padding included. Planes of a phase no
    kernel tap reads (a 1x1 stride-2 conv reads one of four) are skipped: no kernel reads them.

    If ``want_hist``: hist rows 4c..4c+3 count the top-11-bit patterns of |x| over the
    channels of static chunk c (pass 1 of the activation top-K, fused here).
    """
    N, C, H, W = x.shape
    nch = hist.shape[0] // 4
    rs = Wq * N
    xf = x.reshape(x.size)
    for c in prange(nch):
        if want_hist:
            hist[4 * c:4 * c + 4] = 0
        for ci in range(C * c // nch, C * (c + 1) // nch):
            for phs in range(min(sh, KH)):  # phase planes no tap reads are not packed
                for pws in range(min(sw, KW)):
                    cq = (ci * sh + phs) * sw + pws
                    # valid j: 0 <= j*sw + pws - pw < W
                    j0 = 0
                    while j0 < Wq and j0 * sw + pws - pw < 0:
                        j0 += 1
                    j1 = j0
                    while j1 < Wq and j1 * sw + pws - pw < W:
                        j1 += 1
                    iw0 = j0 * sw + pws - pw
                    cnt = j1 - j0
                    # stride 1 with every input row and column inside: the channel's plane is
                    # one transpose into the interior (rows ph.., columns pw..)
                    whole = sh == 1 and sw == 1 and cnt == W and Hq >= H + ph
                    for i in range(Hq):
                        ih = i * sh + phs - ph
                        row = xq[(cq * Hq + i) * rs:(cq * Hq + i + 1) * rs]
                        if ih < 0 or ih >= H:
                            row[:] = 0.0
                            continue
                        row[:j0 * N] = 0.0
                        row[j1 * N:] = 0.0
                        if not whole and cnt > 0:
                            to_grid(xf, (ci * H + ih) * W + iw0, C * H * W, N, cnt, sw,
                                    row, j0 * N, 0, N, cnt)
                    if whole:
                        to_grid(xf, ci * H * W, C * H * W, N, H * W, 1,
                                xq, ((cq * Hq + ph) * Wq + j0) * N, rs, N, W)
            if want_hist:
                # 4 sub-histograms taken in turn along the row: consecutive equal bins (the
                # zeros of ReLU inputs) do not form one serial chain of increments
                h0 = hist[4 * c]
                h1 = hist[4 * c + 1]
                h2 = hist[4 * c + 2]
                h3 = hist[4 * c + 3]
                m7 = np.uint32(0x7FFFFFFF)
                s20 = np.uint32(20)
                for n in range(N):
                    for ih in range(H):
                        brow = xbits[n, ci, ih]
                        iw = 0
                        while iw + 4 <= W:
                            h0[(brow[iw] & m7) >> s20] += 1
                            h1[(brow[iw + 1] & m7) >> s20] += 1
                            h2[(brow[iw + 2] & m7) >> s20] += 1
                            h3[(brow[iw + 3] & m7) >> s20] += 1
                            iw += 4
                        while iw < W:
                            h0[(brow[iw] & m7) >> s20] += 1
                            iw += 1


@dual
def pack_grad_out(gy, gyb, gyT, gbias, want_bias, want_T, rstride, lpad, OWp, cstride, lead):
    """NCHW gy -> batch-last gyb: row oh of channel co starts at ``lead + co*cstride +
    oh*rstride`` (rstride/N columns: ow >= OW zeroed), the ``lead`` floats before channel 0
    and the ``cstride - OH*rstride`` after each channel zeroed (rows of zeros around every
    channel: :func:`bwd_input_taps` reads taps shifted up and left into them).
    Also gbias[co] = sum of gy[:, co] and, if ``want_T``, the channels-last gyT (OH, N, OWp, Co):
    column ``lpad + ow`` holds ow, the ``OWp - OW`` others are zero (the weight-gradient scan
    reads every tap of a kernel row as one run, those landing outside the output on zeros)."""
    N, Co, OH, OW = gy.shape
    L = OW * N
    gyf = gy.reshape(gy.size)
    P = OH * OW
    gyb[:lead] = 0.0
    for co in prange(Co):
        c0 = lead + co * cstride
        to_grid(gyf, co * P, Co * P, N, P, 1, gyb, c0, rstride, N, OW)
        # bias sum: 4 interleaved partial sums (fixed order; a single chain is latency bound)
        s0 = np.float32(0.0)
        s1 = np.float32(0.0)
        s2 = np.float32(0.0)
        s3 = np.float32(0.0)
        for oh in range(OH):
            r0 = c0 + oh * rstride
            dst = gyb[r0:r0 + rstride]
            if want_bias:
                t = 0
                while t + 4 <= L:
                    s0 += dst[t]
                    s1 += dst[t + 1]
                    s2 += dst[t + 2]
                    s3 += dst[t + 3]
                    t += 4
                while t < L:
                    s0 += dst[t]
                    t += 1
            dst[L:] = 0.0
        gyb[c0 + OH * rstride:c0 + cstride] = 0.0
        if want_bias:
            gbias[co] = (s0 + s1) + (s2 + s3)
    if want_T:
        # channels-last gyT[oh, n, ow, :] = gy[n, :, oh, ow]: each sample's (Co, OH*OW) block
        # transposed in 8 x 8 register blocks (64x32x32 maps: 1.12 ms column by column,
        # 0.23 ms 8 channels at a time, 0.13 ms in blocks)
        for n in prange(N):
            to_grid(gyf, n * Co * P, P, Co, P, 1, gyT, (n * OWp + lpad) * Co, N * OWp * Co, Co,
                    OW)
            for oh in range(OH):
                r0 = (oh * N + n) * OWp * Co
                gyT[r0:r0 + lpad * Co] = 0.0
                gyT[r0 + (lpad + OW) * Co:r0 + OWp * Co] = 0.0


@njit(cache=True, nogil=True)
def _unpack_channel(gxq, gx, ci, cs, sh, sw, ph, pw, Hq, Wq, PH, PW, zoff):
    """gx[:, ci] (NCHW) from the packed planes of channel slot ``cs`` of ``gxq`` (padding
    dropped): ``cs == ci`` for a full packed buffer, 0 for a one-channel block.
    Each (row, phase) run is sliced first and indexed from 0 (no wrap-around checks).
    Only the phases (phs < PH, pws < PW) hold taps; the others (a 1x1 stride-2 conv: 3 of 4)
    are zeros written straight to gx, never read (``zoff``: a zero run of ``Wq*N`` floats in
    ``gxq``, the pair transpose's other source)."""
    N, Ci, H, W = gx.shape
    rs = Wq * N
    gxf = gx.reshape(gx.size)
    if sh == 1 and sw == 1 and Hq >= H + ph and Wq >= W + pw:  # one block transpose
        from_grid(gxq, ((cs * Hq + ph) * Wq + pw) * N, rs, N, W, N, H * W,
                  gxf, ci * H * W, Ci * H * W, np.float32(0.0))
        return
    for ih in range(H):
        tt = ih + ph
        phs = tt % sh
        i = tt // sh
        if phs >= PH:  # a row no tap reaches
            for n in range(N):
                gx[n, ci, ih, :] = 0.0
            continue
        if sw == 2 and W % 2 == 0 and W >= 8:
            # both column phases hold W/2 (>= 4) columns: the row is one interleaving
            # transpose (measured, 2 threads, whole layer: resnet18 layer2.0.shortcut.0
            # 2.08 -> 1.93 ms; the 4-pair block for 8-wide rows: resnet18
            # layer4.0.shortcut.0's input-gradient kernel 209 -> 142 us; narrower rows stay
            # element by element)
            pe = pw % 2  # the phase of the even columns
            ae = (((cs * sh + phs) * sw + pe) * Hq + i) * rs + (pw // 2) * N
            ao = (((cs * sh + phs) * sw + 1 - pe) * Hq + i) * rs + ((1 + pw) // 2) * N
            from_pair(gxq, ae if pe < PW else zoff, ao if 1 - pe < PW else zoff, N, W // 2,
                      gxf, (ci * H + ih) * W, Ci * H * W)
            continue
        for pws in range(sw):
            iw0 = (pws - pw) % sw  # first iw with (iw + pw) % sw == pws
            if iw0 >= W:
                continue
            j0 = (iw0 + pw) // sw
            cnt = (W - iw0 + sw - 1) // sw
            if pws >= PW:
                for n in range(N):
                    dst = gx[n, ci, ih, iw0:]
                    for q in range(cnt):
                        dst[q * sw] = 0.0
                continue
            cq = (cs * sh + phs) * sw + pws
            base = (cq * Hq + i) * rs + j0 * N
            src = gxq[base:base + cnt * N]  # (cnt, N) batch-last run
            for n in range(N):
                dst = gx[n, ci, ih, iw0:]
                for q in range(cnt):
                    dst[q * sw] = src[q * N + n]


# ----------------------------------------------------------------------------- compute
@dual
def fwd_csr(rowptr, code, val, xq, yb, y, bias, has_bias, OH, rs, nch, tr):
    """y[:, co] = bias + sum over kept (code, v) of row co: v * xq[code*N : code*N + RL].

    The whole output block of channel co is one run of RL = (OH-1)*rs + OW*N elements (row
    stride rs = Wq*N), so each kept tap is one axpy over it (8, 4, then 1 taps per pass:
    :func:`~embedded.kernels.sparse.gather_axpy_rows`: row by row, skipping the columns
    ow >= OW in between, when OW*N is a multiple of 16; else one long axpy that computes
    and ignores them). The block is then unpacked to NCHW ``y`` by
    the same iteration. Output channels go in ``nch`` static chunks, each computing its
    channels one after another in its own block ``yb[c*OH*rs:]`` (cache-resident: the
    step touches no batch-last copy of the whole output).

    ``tr``: output rows per tile (``>= OH``: one tile). A chunk walks the tiles, computing
    every one of its channels on a tile before the next, so the packed input rows a tile reads
    (every channel's) stay in cache across its channels instead of streaming from memory once
    per channel. The same sums in the same order, bit for bit, at any ``tr``.
    """
    N, Co, _, OW = y.shape
    yf = y.reshape(y.size)
    blk = OH * rs
    for c in prange(nch):
        for r0 in range(0, OH, tr):
            nr = min(OH, r0 + tr) - r0
            out = yb[c * blk:c * blk + (nr - 1) * rs + OW * N]
            for co in range(Co * c // nch, Co * (c + 1) // nch):
                out[:] = 0.0
                gather_axpy_rows(out, xq, code, val, rowptr[co], rowptr[co + 1], N, r0 * rs,
                                 nr, rs, OW * N)
                b = bias[co] if has_bias else np.float32(0.0)
                from_grid(out, 0, rs, N, OW, N, nr * OW, yf, co * OH * OW + r0 * OW,
                          Co * OH * OW, b)


@dual
def bwd_input_csc(colptr, col_code, c_row, c_val, gyb, gxq, gx, sh, sw, ph, pw, Hq, Wq, OH,
                  OW, KH, KW, nch):
    """Input gradient with the compressed weight: for input channel ci, its phase planes
    += v * gyb[co block] at each kept tap's code offset (CSC columns are (ci, tap):
    4 entries of one column per pass into the same run), one run of
    RL = (OH-1)*rs + OW*N per tap (gyb's columns ow >= OW are zero, so the run may cross
    them, or skip them: :func:`~embedded.kernels.sparse.gather_axpy_rows`; it never leaves
    ci's planes). Input channels go in ``nch`` static chunks, each
    accumulating its channels one after another in its own one-channel block
    ``gxq[c*(s2*plane + rs):]`` (cache-resident; its last ``rs`` floats a zero run), unpacked
    (padding dropped) into NCHW ``gx`` by the same iteration. Planes of a phase no tap
    reaches (a 1x1 stride-2 conv: 3 of 4) are neither zeroed nor read: their zeros go
    straight to gx. A scatter by ci: no race."""
    N, Ci, H, W = gx.shape
    s2 = sh * sw
    rs = Wq * N
    plane = Hq * rs
    RL = (OH - 1) * rs + OW * N
    blk = OH * rs
    KK = KH * KW
    PH = min(sh, KH)
    PW = min(sw, KW)
    step = s2 * plane + rs
    for c in prange(nch):
        planes = gxq[c * step:(c + 1) * step]
        planes[s2 * plane:] = 0.0
        for ci in range(Ci * c // nch, Ci * (c + 1) // nch):
            for phs in range(PH):
                for pws in range(PW):
                    q0 = (phs * sw + pws) * plane
                    planes[q0:q0 + plane] = 0.0
            for tap in range(ci * KK, (ci + 1) * KK):
                p = colptr[tap]
                p1 = colptr[tap + 1]
                if p == p1:
                    continue
                a = col_code[tap] * N - ci * s2 * plane  # the (ci, tap) column's offset
                gather_axpy_rows(planes[a:a + RL], gyb, c_row, c_val, p, p1, blk, 0, OH, rs,
                                 OW * N)
            _unpack_channel(planes, gx, ci, 0, sh, sw, ph, pw, Hq, Wq, PH, PW, s2 * plane)


@dual
def bwd_input_taps(colptr, c_row, c_val, gyb, gxq, gx, ph, pw, Hq, Wq, KH, KW, nch, cw, lead,
                   offs, vals, tr):
    """Stride-1 input gradient with ALL kept taps of input channel ci in one gather pass:
    gx[ci] at padded position (i, j) = sum over kept (co, kh, kw) of v * gy[co, i-kh, j-kw],
    i.e. one run over ci's plane (its rows ph.. and columns pw.. that unpack to gx, the
    padding columns between them skipped when W*N is a multiple of 16) reading,
    per entry, gy's channel block shifted up kh rows and left kw columns. gyb holds zero rows
    around every channel and zero columns ow >= OW (:func:`pack_grad_out`, channel co at
    ``lead + co*cw*N``: gaps of KH-1-ph rows, one more row before channel 0), so every
    shifted read outside the output lands on a zero (a read wrapping left lands on the zero
    columns of the row before). Against :func:`bwd_input_csc` (one pass per (ci, tap) column,
    ~1-3 kept entries each at 95 % sparsity): 8, then 4 entries per pass over the plane.
    ``offs``/``vals``: int32/float32 scratch of ``nch`` equal parts (each >= ci's entries),
    the entries' shifted block offsets (in units of N) and values, in CSC order. Input
    channels go in ``nch`` static chunks, each in its own one-plane block of ``gxq``
    (cache-resident), unpacked into NCHW ``gx`` by the same iteration. A scatter by ci: no
    race, a fixed summation order. ``tr``: input rows per tile (``>= H``: one tile), as in
    :func:`fwd_csr`: a chunk computes all its channels on a tile before the next, so the gy
    rows the tile reads stay in cache (bit for bit the same at any ``tr``)."""
    N, Ci, H, W = gx.shape
    rs = Wq * N
    plane = Hq * rs
    KK = KH * KW
    m = offs.size // nch
    gxf = gx.reshape(gx.size)
    for c in prange(nch):
        pl = gxq[c * plane:(c + 1) * plane]
        of = offs[c * m:(c + 1) * m]
        vl = vals[c * m:(c + 1) * m]
        for r0 in range(0, H, tr):
            nr = min(H, r0 + tr) - r0
            st = ((ph + r0) * Wq + pw) * N
            for ci in range(Ci * c // nch, Ci * (c + 1) // nch):
                j = 0
                for tap in range(KK):
                    sft = (tap // KW) * Wq + tap % KW
                    q = ci * KK + tap
                    for p in range(colptr[q], colptr[q + 1]):
                        of[j] = c_row[p] * cw - sft
                        vl[j] = c_val[p]
                        j += 1
                run = pl[st:st + ((nr - 1) * Wq + W) * N]
                run[:] = 0.0
                gather_axpy_rows(run, gyb, of, vl, 0, j, N, lead + st, nr, rs, W * N)
                from_grid(pl, st, rs, N, W, N, nr * W, gxf, ci * H * W + r0 * W, Ci * H * W,
                          np.float32(0.0))


@njit(cache=True, nogil=True)
def _phase_tap_offset(KW, sw, pws):
    """Slot of column phase ``pws``'s first tap in a kernel row of the weight-gradient scratch
    (the taps kw = pws + mw*sw of each phase are stored together, mw reversed)."""
    off = 0
    for p in range(pws):
        off += (KW - p + sw - 1) // sw
    return off


def tap_slots(KH: int, KW: int, sw: int) -> np.ndarray:
    """Slot of tap (kh, kw) (flat kh*KW + kw) in the weight-gradient scratch's kernel rows."""
    out = np.zeros(KH * KW, np.int64)
    for kh in range(KH):
        for kw in range(KW):
            pws, mw = kw % sw, kw // sw
            nw = (KW - pws + sw - 1) // sw
            out[kh * KW + kw] = kh * KW + _phase_tap_offset(KW, sw, pws) + nw - 1 - mw
    return out


@dual
def compact_acts(xq, thr, Cin, sh, sw, KH, KW, Hq, Wq, N, Co, lpad, OWp, eo, arow, acnt, aoff,
                 aval, bounds, full, nch):
    """SWAT's saved activation, taken in the forward while the packed input is in cache: the
    kept entries (``|a| >= thr``, ``a != 0``) of every packed row r = ((ci*sh + phs)*sw +
    pws)*Hq + i, in order, as ``aoff`` (the gyT offset of the entry's row position (j, n):
    column ``lpad + j`` of sample n, see :func:`pack_grad_out`) and ``aval``, row r's
    ``acnt[r]`` entries from ``arow[r]`` (rows of phases no tap reads hold none). Channel
    chunk c fills its rows one after the other into its region ``[bounds[c], bounds[c+1])``.
    Returns False, with nothing valid, when a region could overflow (the caller grows the
    arrays). ``eo``: an int32 scratch of Wq*N; ``full``: an int64 scratch of ``nch``. The
    backward's scan (:func:`bwd_weight_scan`) then reads these lists, never the dense
    input."""
    rs = Wq * N
    for e in range(rs):
        j = e // N
        eo[e] = (j + lpad) * Co + (e - j * N) * OWp * Co
    PH = min(sh, KH)
    PW = min(sw, KW)
    for c in prange(nch):
        full[c] = 0
        m = bounds[c]
        lim = bounds[c + 1]
        for ci in range(Cin * c // nch, Cin * (c + 1) // nch):
            for phs in range(sh):
                for pws in range(sw):
                    r0 = ((ci * sh + phs) * sw + pws) * Hq
                    for i in range(Hq):
                        r = r0 + i
                        arow[r] = m
                        k = 0
                        if phs < PH and pws < PW:
                            if m + rs > lim:
                                full[c] = 1
                            else:
                                k = compact_kept(xq[r * rs:(r + 1) * rs], thr, eo, 0,
                                                 aoff[m:m + rs], aval[m:m + rs])
                        acnt[r] = k
                        m += k
    for c in range(nch):
        if full[c]:
            return False
    return True


@dual
def bwd_weight_scan(arow, acnt, aoff, aval, gyT, gWt, gw, Cin, nch, cb, sh, sw, Hq, Wq, N, KH,
                    KW, OH, OW, slots, lpad, OWp):
    """Dense weight gradient from the top-K input activations only (SWAT).

    Every kept activation a (``|a| >= thr``, ``a != 0``) at plane (ci, phs, pws), position
    (i, j), sample n adds, for each tap kh = phs + mh*sh, kw = pws + mw*sw (landing on output
    (i - mh, j - mw)), ``a * gyT[oh, n, lpad + ow, group]`` to gWt's row of ci, kh at slot
    ``toff(pws) + nw-1-mw`` (gyT is (OH, N, OWp, Co), zero outside columns [lpad, lpad + OW):
    see :func:`pack_grad_out`; gWt stores the taps of each column phase together, mw
    reversed). With groups == 1 (any stride) the taps of one kernel row in one phase then form
    ONE contiguous axpy (nw*Co long) for every kept entry, taps landing left or right of the
    output reading zeros, and all entries of a row share that destination: 8 (then 4) entries
    are accumulated per pass. Input channels are split into ``nch`` static chunks (one per
    worker) walked in blocks of ``cb`` channels per input row, so the gyT rows around row i
    stay in cache. The kept entries of each packed row come from the forward
    (:func:`compact_acts`: ``arow``, ``acnt``, ``aoff``, ``aval``). The per-channel
    accumulation order does not depend on ``nch`` or ``cb``. Blocks are then written to the
    torch layout ``gw`` (``slots[kh*KW + kw]``: the tap's slot, :func:`tap_slots`;
    channel-major, so the writes are contiguous). ``Cin``: the input channels.
    """
    Co, Cig, _, _ = gw.shape
    Cog = Co // (Cin // Cig)
    blk = KH * KW * Cog
    fast = Cog == Co
    for c in prange(nch):
        ci0 = Cin * c // nch
        ci1 = Cin * (c + 1) // nch
        for cb0 in range(ci0, ci1, cb):
            cb1 = min(ci1, cb0 + cb)
            gWt[cb0 * blk:cb1 * blk] = 0.0
            for phs in range(min(sh, KH)):  # (other phases: no tap, not packed)
                nh = (KH - phs + sh - 1) // sh  # taps kh = phs + mh*sh land on oh = i - mh
                for pws in range(min(sw, KW)):
                    nw = (KW - pws + sw - 1) // sw
                    toff = _phase_tap_offset(KW, sw, pws)  # its taps' slot in a kernel row
                    for i in range(Hq):
                        for ci in range(cb0, cb1):
                            r = ((ci * sh + phs) * sw + pws) * Hq + i
                            m = acnt[r]
                            if m == 0:
                                continue
                            # the row's kept (j, n): gyT offset of column j (the first tap,
                            # mw = nw-1, reads nw-1 columns left of it) and value
                            p0 = arow[r]
                            kb = aoff[p0:p0 + m]
                            kv = aval[p0:p0 + m]
                            co0 = (ci // Cig) * Cog
                            g = gWt[ci * blk:(ci + 1) * blk]
                            for mh in range(nh):
                                oh = i - mh
                                if oh < 0:
                                    break
                                if oh >= OH:
                                    continue
                                kh = phs + mh * sh
                                ob = oh * N * OWp * Co
                                if fast:
                                    # the kernel row's taps: one contiguous axpy per entry
                                    d0 = (kh * KW + toff) * Co
                                    gather_axpy(g[d0:d0 + nw * Co], gyT, kb, kv, 0, m, 1,
                                                ob - (nw - 1) * Co)
                                    continue
                                for q in range(m):  # groups > 1: each tap's group slice
                                    a = kv[q]
                                    for mw in range(nw):
                                        s0 = ob + kb[q] - mw * Co + co0
                                        src = gyT[s0:s0 + Cog]
                                        d0 = (kh * KW + toff + nw - 1 - mw) * Cog
                                        dst = g[d0:d0 + Cog]
                                        for t in range(Cog):
                                            dst[t] += a * src[t]
            _write_out(gWt, gw, cb0, cb1, Cin, slots)


@njit(cache=True, nogil=True)
def _write_out(gWt, gw, ci0, ci1, Cin, slots):
    """Channels ci0..ci1 of the weight-gradient scratch (see :func:`bwd_weight_scan`) written
    to the torch layout ``gw`` right after their block is done (still in cache)."""
    Co, Cig, KH, KW = gw.shape
    Cog = Co // (Cin // Cig)
    blk = KH * KW * Cog
    if KH * KW == 1 and Cog == Co:
        # 1x1 kernel: gw (Co, Cin) is the transpose of the block's (Cin, Co) rows, in 8 x 8
        # register blocks (element by element, each write a cache line of its own:
        # resnet18 layer4.0.shortcut.0's 131k-entry write-out took ~150 us)
        to_grid(gWt, ci0 * Co, Co, ci1 - ci0, Co, 1, gw.reshape(gw.size), ci0, 0, Cin, Co)
        return
    if Cog == Co:
        # the scratch's rows (ci, kh, kw) are a grid: kernel row kh at +KW*Co, tap kw in slot
        # slots[kw] of its row (the same in every row): gw[co] (row stride Cin*KH*KW) is its
        # transpose, 8 output channels x 8 taps per register block (element by element
        # along ci, every store 18 KB from the last for 512 channels: resnet18
        # layer4.0.conv2's 2.4 M-entry write-out 1.89 -> 0.53 ms)
        from_grid(gWt, ci0 * blk, KW * Co, Co, KW, Co, (ci1 - ci0) * KH * KW,
                  gw.reshape(gw.size), ci0 * KH * KW, Cin * KH * KW, np.float32(0.0),
                  slots[:KW])
        return
    for ci in range(ci0, ci1):
        co0 = (ci // Cig) * Cog
        cig = ci - (ci // Cig) * Cig
        g = gWt[ci * blk:(ci + 1) * blk]
        for cl in range(Cog):  # gw[co, cig] is contiguous: write it tap after tap
            for kh in range(KH):
                for kw in range(KW):
                    gw[co0 + cl, cig, kh, kw] = g[slots[kh * KW + kw] * Cog + cl]


@dual(fastmath=True)
def bwd_weight_sddmm(rowptr, code, widx, gyb, xq, gflat, OH, OW, rs, N, cstride, lead):
    """gflat[widx[p]] = dot(gyb[co block], xq[code*N : +RL]) for the kept entries only (masked
    mode: the weight gradient inside the mask; dense direct convs: every entry); gyb's columns
    ow >= OW are zero, channel co at ``lead + co*cstride`` (:func:`pack_grad_out`). Four
    entries of a row at a time share each load of gy (1.25 loads a multiply-add, not 2)."""
    Co = rowptr.size - 1
    RL = (OH - 1) * rs + OW * N
    for co in prange(Co):
        g = gyb[lead + co * cstride:lead + co * cstride + RL]
        p = rowptr[co]
        p1 = rowptr[co + 1]
        while p + 4 <= p1:
            x0 = xq[code[p] * N:code[p] * N + RL]
            x1 = xq[code[p + 1] * N:code[p + 1] * N + RL]
            x2 = xq[code[p + 2] * N:code[p + 2] * N + RL]
            x3 = xq[code[p + 3] * N:code[p + 3] * N + RL]
            s0 = np.float32(0.0)
            s1 = np.float32(0.0)
            s2 = np.float32(0.0)
            s3 = np.float32(0.0)
            for t in range(RL):
                gt = g[t]
                s0 += gt * x0[t]
                s1 += gt * x1[t]
                s2 += gt * x2[t]
                s3 += gt * x3[t]
            gflat[widx[p]] = s0
            gflat[widx[p + 1]] = s1
            gflat[widx[p + 2]] = s2
            gflat[widx[p + 3]] = s3
            p += 4
        while p < p1:
            a = code[p] * N
            xs = xq[a:a + RL]
            s = np.float32(0.0)
            for t in range(RL):
                s += g[t] * xs[t]
            gflat[widx[p]] = s
            p += 1


@dual(fastmath=True)
def bwd_weight_dense(codes, gyb, xq, gflat, OH, OW, rs, N, cstride, lead):
    """The full weight gradient of a dense direct conv (groups 1): ``gflat[co*R + r] =
    dot(gyb[co block], xq[codes[r]*N : +RL])`` for every output channel and every (input
    channel, tap) r. Blocks of 4 output channels x 4 taps share their loads (8 loads for 16
    multiply-adds, against 5 for 4 in :func:`bwd_weight_sddmm`, which any mask can use);
    a last partial block recomputes its last channel (the same sums, so the same values).
    Each entry is one fixed-order dot product whichever thread computes it."""
    R = codes.size
    Co = gflat.size // R
    RL = (OH - 1) * rs + OW * N
    for q in prange((Co + 3) // 4):
        c0 = 4 * q
        c1 = min(c0 + 1, Co - 1)
        c2 = min(c0 + 2, Co - 1)
        c3 = min(c0 + 3, Co - 1)
        g0 = gyb[lead + c0 * cstride:lead + c0 * cstride + RL]
        g1 = gyb[lead + c1 * cstride:lead + c1 * cstride + RL]
        g2 = gyb[lead + c2 * cstride:lead + c2 * cstride + RL]
        g3 = gyb[lead + c3 * cstride:lead + c3 * cstride + RL]
        r = 0
        while r + 4 <= R:
            x0 = xq[codes[r] * N:codes[r] * N + RL]
            x1 = xq[codes[r + 1] * N:codes[r + 1] * N + RL]
            x2 = xq[codes[r + 2] * N:codes[r + 2] * N + RL]
            x3 = xq[codes[r + 3] * N:codes[r + 3] * N + RL]
            a00 = np.float32(0.0)
            a01 = np.float32(0.0)
            a02 = np.float32(0.0)
            a03 = np.float32(0.0)
            a10 = np.float32(0.0)
            a11 = np.float32(0.0)
            a12 = np.float32(0.0)
            a13 = np.float32(0.0)
            a20 = np.float32(0.0)
            a21 = np.float32(0.0)
            a22 = np.float32(0.0)
            a23 = np.float32(0.0)
            a30 = np.float32(0.0)
            a31 = np.float32(0.0)
            a32 = np.float32(0.0)
            a33 = np.float32(0.0)
            for t in range(RL):
                v0 = x0[t]
                v1 = x1[t]
                v2 = x2[t]
                v3 = x3[t]
                h = g0[t]
                a00 += h * v0
                a01 += h * v1
                a02 += h * v2
                a03 += h * v3
                h = g1[t]
                a10 += h * v0
                a11 += h * v1
                a12 += h * v2
                a13 += h * v3
                h = g2[t]
                a20 += h * v0
                a21 += h * v1
                a22 += h * v2
                a23 += h * v3
                h = g3[t]
                a30 += h * v0
                a31 += h * v1
                a32 += h * v2
                a33 += h * v3
            gflat[c0 * R + r] = a00
            gflat[c0 * R + r + 1] = a01
            gflat[c0 * R + r + 2] = a02
            gflat[c0 * R + r + 3] = a03
            gflat[c1 * R + r] = a10
            gflat[c1 * R + r + 1] = a11
            gflat[c1 * R + r + 2] = a12
            gflat[c1 * R + r + 3] = a13
            gflat[c2 * R + r] = a20
            gflat[c2 * R + r + 1] = a21
            gflat[c2 * R + r + 2] = a22
            gflat[c2 * R + r + 3] = a23
            gflat[c3 * R + r] = a30
            gflat[c3 * R + r + 1] = a31
            gflat[c3 * R + r + 2] = a32
            gflat[c3 * R + r + 3] = a33
            r += 4
        while r < R:
            xs = xq[codes[r] * N:codes[r] * N + RL]
            a0 = np.float32(0.0)
            a1 = np.float32(0.0)
            a2 = np.float32(0.0)
            a3 = np.float32(0.0)
            for t in range(RL):
                v = xs[t]
                a0 += g0[t] * v
                a1 += g1[t] * v
                a2 += g2[t] * v
                a3 += g3[t] * v
            gflat[c0 * R + r] = a0
            gflat[c1 * R + r] = a1
            gflat[c2 * R + r] = a2
            gflat[c3 * R + r] = a3
            r += 1


@dual
def im2col(xq, codes, col, OH, L, rs, N):
    """col[r, oh*L:(oh+1)*L] = xq[codes[r]*N + oh*rs : +L] (dense taps, groups == 1)."""
    R = codes.size
    for r in prange(R):
        c0 = codes[r] * N
        for oh in range(OH):
            a = c0 + oh * rs
            col[r, oh * L:(oh + 1) * L] = xq[a:a + L]


@dual
def unpack_output(yb, y, bias, has_bias):
    """Batch-last yb (Co, OH, OW, N) flat -> NCHW y, adding the bias."""
    N, Co, OH, OW = y.shape
    L = OW * N
    yf = y.reshape(y.size)
    for co in prange(Co):
        b = bias[co] if has_bias else np.float32(0.0)
        from_grid(yb, co * OH * L, L, N, OW, N, OH * OW, yf, co * OH * OW, Co * OH * OW, b)


@dual
def col2im(gcol, codes, gxq, gx, kk, sh, sw, ph, pw, Hq, Wq, OH, L):
    """gxq planes of ci = sum of gcol rows of ci's taps (scatter by ci; fixed tap order),
    then unpacked into NCHW ``gx``."""
    N, Ci, H, W = gx.shape
    s2 = sh * sw
    rs = Wq * N
    plane = Hq * rs
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
        _unpack_channel(gxq, gx, ci, ci, sh, sw, ph, pw, Hq, Wq, sh, sw, 0)
