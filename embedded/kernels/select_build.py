"""A SWAT weight refresh in ONE read of the weight: the windowed top-K select and the
compressed rebuild fused.

A refresh step used to read the whole weight twice: the windowed select
(:func:`~embedded.kernels.topk.window_pass`: the K-th |w| near the last threshold) and then the
rebuild at the new threshold (:func:`~embedded.kernels.sparse.build_staged`). On a large layer
both are memory-bound (femnist fc1: 6.4 M weights, 25.7 MB, each pass ~0.9 ms on 2 cores).
Here the rebuild's staging pass keeps every entry at or above the window's LOW bound; the
select then runs on those staged values (the window's candidates and the count above it, a
small hot array) and a filtering copy moves the entries at or above the selected threshold
into place. Same threshold, same structure, bit for bit, as select-then-build.
"""

from __future__ import annotations

import numpy as np
from numba import prange

from .sparse import _NOIDX, SparseWeight, _csc, _prefix, dual, pick, stage_chunk
from .topk import NCHUNK, Window, _collect, bits_to_float, kth_largest_abs, select_window

#: statuses of :func:`build_window` besides nnz >= 0
STAGING_FULL = -1   # a chunk outgrew its staging region: nothing selected
WINDOW_MISS = -2    # the K-th magnitude lies outside the window
FINAL_FULL = -3     # selected (the bit pattern is valid) but the final arrays are too small


@dual
def build_window(w2, lof, lo, hi, k, geo, ctab, rowptr, counts, scounts, val, code, col,
                 colptr, c_row, c_val, wcnt, sval, sbits, scode, scol, bounds, ends, cand,
                 mc, above, hist):
    """Stage, select, filter: returns (status, bit pattern of the K-th largest |w|).

    Static row chunk t stages its rows' entries with ``|w| >= lof`` (the float of the window's
    low bit pattern ``lo >= 1``, so exact zeros never enter) into its region
    ``[bounds[t], bounds[t+1])`` of the staging arrays (``sbits``: ``sval`` viewed as uint32;
    ``scounts[r]``: row r's staged entries), then compacts its staged entries inside the window
    ``[lo, hi]`` into its slice of ``cand`` and counts those above ``hi`` (the layout
    :func:`~embedded.kernels.topk.select_window` reads: chunk t * NCHUNK/NB, the others empty).
    The K-th is selected among the candidates; the entries at or above it are copied, in row
    order, to the final CSR (and for conv the CSC, :func:`~embedded.kernels.sparse._csc`).
    Status: nnz, or :data:`STAGING_FULL`, :data:`WINDOW_MISS`, :data:`FINAL_FULL` (then nothing
    in the final arrays is valid). Integer counts and static chunks: the result does not
    depend on the thread count."""
    rows = w2.shape[0]
    n = w2.size
    NB = bounds.size - 1
    step = NCHUNK // NB
    mc[:] = 0
    above[:] = 0
    for t in prange(NB):
        m = stage_chunk(w2, lof, t, NB, geo, ctab, sval, scode, scol, bounds, scounts)
        ends[t] = m
        c = t * step
        c0 = n * c // NCHUNK
        if m >= 0 and m - bounds[t] <= n * (c + step) // NCHUNK - c0:
            mc[c], above[c] = _collect(sbits[bounds[t]:m], lo, hi, cand[c0:], True)
        else:
            ends[t] = -1
    for t in range(NB):
        if ends[t] < 0:
            return STAGING_FULL, np.uint32(0)
    b, kept = select_window(cand, n, mc, above, k, hist)
    if kept < 0:
        return WINDOW_MISS, np.uint32(0)
    mask = np.uint32(0x7FFFFFFF)
    for t in prange(NB):  # each row's entries at or above the K-th
        s = bounds[t]
        for r in range(rows * t // NB, rows * (t + 1) // NB):
            row = sbits[s:s + scounts[r]]  # indexed from 0: the count vectorises
            c = 0
            for p in range(row.size):
                c += (row[p] & mask) >= b
            counts[r] = c
            s += scounts[r]
    nnz = _prefix(counts[:rows], rowptr)
    if nnz > val.size:
        return FINAL_FULL, b
    conv = geo[0] == 1
    for t in prange(NB):  # the chunk's kept entries are consecutive in the final arrays
        s0 = bounds[t]
        e = ends[t]
        while e > s0 and (sbits[e - 1] & mask) < b:
            e -= 1
        d0 = rowptr[rows * t // NB]
        # branch-free: an entry below the K-th is written too but not counted, so the next
        # kept entry overwrites it (the last one written is kept: nothing lands outside the
        # chunk's own range); slices indexed from 0
        sb = sbits[s0:e]
        sv = sval[s0:e]
        sc = scode[s0:e]
        dv = val[d0:]
        dc = code[d0:]
        d = 0
        if conv:
            so = scol[s0:e]
            do = col[d0:]
            for p in range(sb.size):
                dv[d] = sv[p]
                dc[d] = sc[p]
                do[d] = so[p]
                d += (sb[p] & mask) >= b
        else:
            for p in range(sb.size):
                dv[d] = sv[p]
                dc[d] = sc[p]
                d += (sb[p] & mask) >= b
    if conv:
        _csc(rowptr, rows, geo[9] * geo[3] * geo[4], col, val, _NOIDX, False, colptr, c_row,
             _NOIDX, c_val, wcnt)
    return nnz, b


def refresh_near(sw: SparseWeight, w2: np.ndarray, k: int, guess: float, win: Window,
                 hist: np.ndarray, cand: np.ndarray, mc: np.ndarray,
                 above: np.ndarray) -> float | None:
    """Rebuild ``sw`` from ``w2`` at the exact K-th largest |w| found in ``win``'s window
    around ``guess`` (> 0), reading the weight once; returns that threshold (``win`` updated
    as by :func:`~embedded.kernels.topk.select_count_near`). On a window miss the threshold
    comes from the histogram select and ``sw`` is rebuilt at it; ``None`` when ``sw`` has no
    staging plan yet or a chunk outgrew its region (nothing selected: the caller selects and
    builds the usual way, and the regions planned then get more slack). ``cand``: a uint32
    scratch of ``w2.size``; ``mc``, ``above``: NCHUNK-long int64 scratch."""
    if sw._bounds is None or NCHUNK % (sw._bounds.size - 1):
        return None
    lo, hi = win.bounds(guess)
    status, b = pick(build_window, w2.size)(
        w2, lo.view(np.float32), lo, hi, k, sw.geo, sw.ctab, sw.rowptr, sw.counts, sw.scounts,
        sw.val, sw.code, sw.col, sw.colptr, sw.c_row, sw.c_val, sw.wcnt, sw._sval,
        sw._sval.view(np.uint32), sw._scode, sw._scol, sw._bounds, sw._ends, cand, mc, above,
        hist)
    if status == STAGING_FULL:
        # the window's entries below the K-th need room too: more slack from the caller's
        # rebuild on
        sw.slack_div = max(1, sw.slack_div // 2)
        return None
    if status == WINDOW_MISS:
        thr = kth_largest_abs(w2, k, hist, cand)
        win.update(False, abs(thr / guess - 1.0))
        sw.build(w2, thr)
        return thr
    thr = bits_to_float(int(b))
    win.update(True, abs(thr / guess - 1.0))
    if status == FINAL_FULL:
        sw.build(w2, thr)
        return thr
    sw.staged_builds += 1
    sw._built(status, True, staged=True)
    return thr
