"""Cheap exact top-K by magnitude: a radix select over the float32 bit patterns of |a|.

The bit pattern of a non-negative float32, read as an unsigned integer, orders like the float.
So the k-th largest magnitude is found by three histogram passes over 11, 11 and 9 bits
(2048/2048/512 bins): each pass narrows the prefix of the answer. No sort, no argpartition,
no allocation beyond two small per-chunk histograms; the passes run in parallel over static
chunks, and integer counts make the result independent of the thread count.

Selection rule used by the layers (``count_for_density`` gives K): keep every element with
``|a| >= t`` where ``t`` is the K-th largest magnitude, and never keep an exact zero.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

NCHUNK = 16  # static partition of the histogram passes (independent of the thread count)


def count_for_density(density: float, n: int) -> int:
    """K kept out of ``n`` at ``density``: ``round(density * n)`` clipped to [1, n]."""
    return max(1, min(n, int(math.floor(density * n + 0.5))))


@njit(cache=True, nogil=True, parallel=True)
def _hist(bits, shift, width, prefix, pshift, hist):
    n = bits.size
    nb = hist.shape[1]
    mask = np.uint32(nb - 1)
    for c in prange(NCHUNK):
        h = hist[c]
        h[:] = 0
        lo = n * c // NCHUNK
        hi = n * (c + 1) // NCHUNK
        for i in range(lo, hi):
            b = bits[i] & np.uint32(0x7FFFFFFF)
            if pshift >= 32 or (b >> np.uint32(pshift)) == prefix:
                h[(b >> np.uint32(shift)) & mask] += 1
    return width


@njit(cache=True, nogil=True)
def _pick(hist, k):
    """Bin (from the top) where the cumulative count reaches k; returns (bin, count above)."""
    nb = hist.shape[1]
    above = 0
    for b in range(nb - 1, -1, -1):
        s = 0
        for c in range(hist.shape[0]):
            s += hist[c, b]
        if above + s >= k:
            return b, above
        above += s
    return 0, above


@njit(cache=True, nogil=True)
def kth_largest_abs_bits(bits, k, hist):
    """Bit pattern (uint32) of the k-th largest |value| of a float32 array viewed as uint32.

    ``hist`` is an int64 scratch of shape (NCHUNK, 2048). ``1 <= k <= bits.size``.
    """
    # pass 1: bits 20..30 (11 bits)
    _hist(bits, 20, 11, np.uint32(0), 32, hist)
    b1, above = _pick(hist, k)
    k -= above
    prefix = np.uint32(b1)
    # pass 2: bits 9..19 among those whose bits 20..30 equal b1
    _hist(bits, 9, 11, prefix, 20, hist)
    b2, above = _pick(hist, k)
    k -= above
    prefix = (prefix << np.uint32(11)) | np.uint32(b2)
    # pass 3: bits 0..8 among those whose bits 9..30 match
    _hist(bits, 0, 9, prefix, 9, hist[:, :512])
    b3, above = _pick(hist[:, :512], k)
    return (prefix << np.uint32(9)) | np.uint32(b3)


def new_hist() -> np.ndarray:
    """Scratch for :func:`kth_largest_abs_bits`."""
    return np.zeros((NCHUNK, 2048), dtype=np.int64)


def kth_largest_abs(a: np.ndarray, k: int, hist: np.ndarray | None = None) -> float:
    """The k-th largest magnitude of float32 array ``a`` (exact), 1 <= k <= a.size."""
    a = np.ascontiguousarray(a, dtype=np.float32).reshape(-1)
    if not 1 <= k <= a.size:
        raise ValueError(f"k: expected 1 <= k <= {a.size}, got {k}")
    if hist is None:
        hist = new_hist()
    b = kth_largest_abs_bits(a.view(np.uint32), k, hist)
    return float(np.array([b], dtype=np.uint32).view(np.float32)[0])


def topk_threshold(a: np.ndarray, density: float, hist: np.ndarray | None = None) -> float:
    """Magnitude threshold ``t`` such that ``|a| >= t`` keeps the top ``count_for_density`` entries."""
    return kth_largest_abs(a, count_for_density(density, a.size), hist)


@njit(cache=True, nogil=True)
def bits_to_float(b):
    """float32 value of a uint32 bit pattern (inside njit code)."""
    arr = np.empty(1, dtype=np.uint32)
    arr[0] = b
    return arr.view(np.float32)[0]
