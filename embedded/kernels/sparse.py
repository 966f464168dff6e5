"""Compressed sparse weights and activations shared by the conv and linear layers.

A weight is viewed as a 2-D array ``(rows, row_len)`` (conv: ``(C_out, C_in/g * kh * kw)``,
linear: ``(out, in)``). The kept entries form a CSR structure: ``rowptr`` (rows + 1),
``widx`` (flat index of each kept entry in the weight, int32) and ``val`` (its value). Rows
are filled in index order, so the structure is deterministic. The layers add their own index
arrays (conv: offsets into the packed input) and the column-grouped copy (CSC) that the
backward-input kernels need.

Kept set: ``|w| >= thr`` and ``w != 0`` (swat), or ``mask != 0`` (masked).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange


@njit(cache=True, nogil=True, parallel=True)
def count_rows_thr(w2, thr, counts):
    """counts[r] = number of entries of row r with |w| >= thr and w != 0."""
    rows, rl = w2.shape
    for r in prange(rows):
        row = w2[r]
        c = 0
        for j in range(rl):
            a = abs(row[j])
            if a >= thr and a > 0.0:
                c += 1
        counts[r] = c


@njit(cache=True, nogil=True, parallel=True)
def count_rows_mask(m2, counts):
    rows, rl = m2.shape
    for r in prange(rows):
        row = m2[r]
        c = 0
        for j in range(rl):
            if row[j] != 0:
                c += 1
        counts[r] = c


@njit(cache=True, nogil=True)
def prefix(counts, rowptr):
    """rowptr[0] = 0, rowptr[r+1] = rowptr[r] + counts[r]; returns the total."""
    s = 0
    rowptr[0] = 0
    for r in range(counts.size):
        s += counts[r]
        rowptr[r + 1] = s
    return s


@njit(cache=True, nogil=True, parallel=True)
def fill_rows_thr(w2, thr, rowptr, widx, val):
    rows, rl = w2.shape
    for r in prange(rows):
        row = w2[r]
        p = rowptr[r]
        base = r * rl
        for j in range(rl):
            v = row[j]
            a = abs(v)
            if a >= thr and a > 0.0:
                widx[p] = base + j
                val[p] = v
                p += 1


@njit(cache=True, nogil=True, parallel=True)
def fill_rows_mask(m2, rowptr, widx):
    rows, rl = m2.shape
    for r in prange(rows):
        row = m2[r]
        p = rowptr[r]
        base = r * rl
        for j in range(rl):
            if row[j] != 0:
                widx[p] = base + j
                p += 1


@njit(cache=True, nogil=True, parallel=True)
def gather(wflat, widx, val, nnz):
    """val[p] = wflat[widx[p]] for p < nnz (refresh values of a cached structure)."""
    nch = 16
    for c in prange(nch):
        lo = nnz * c // nch
        hi = nnz * (c + 1) // nch
        for p in range(lo, hi):
            val[p] = wflat[widx[p]]


@njit(cache=True, nogil=True)
def csc_from_keys(keys, nnz, ncols, colptr, perm, counts):
    """Counting sort of entries 0..nnz-1 by ``keys`` (column id): colptr and perm (stable)."""
    counts[:ncols] = 0
    for p in range(nnz):
        counts[keys[p]] += 1
    s = 0
    for c in range(ncols):
        colptr[c] = s
        s += counts[c]
        counts[c] = colptr[c]
    colptr[ncols] = s
    for p in range(nnz):
        k = keys[p]
        perm[counts[k]] = p
        counts[k] += 1


def grow(arr: np.ndarray, need: int) -> np.ndarray:
    """Return ``arr`` if it holds ``need`` entries, else a larger array (1.5x headroom)."""
    if arr.size >= need:
        return arr
    return np.empty(max(need, int(need * 1.5) + 16), dtype=arr.dtype)


@njit(cache=True, nogil=True, parallel=True)
def act_count(x3, thr, counts):
    """x3: (N, C, S) activations; counts[c] = kept entries of channel c (|x| >= thr, x != 0)."""
    n, c_, s_ = x3.shape
    for c in prange(c_):
        k = 0
        for b in range(n):
            row = x3[b, c]
            for j in range(s_):
                a = abs(row[j])
                if a >= thr and a > 0.0:
                    k += 1
        counts[c] = k


@njit(cache=True, nogil=True, parallel=True)
def act_fill(x3, thr, ptr, pos, val):
    """Channel-grouped sparse activations: entry position = b * S + j (sample, spatial)."""
    n, c_, s_ = x3.shape
    for c in prange(c_):
        p = ptr[c]
        for b in range(n):
            row = x3[b, c]
            for j in range(s_):
                v = row[j]
                a = abs(v)
                if a >= thr and a > 0.0:
                    pos[p] = b * s_ + j
                    val[p] = v
                    p += 1
