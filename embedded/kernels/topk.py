"""Cheap exact top-K by magnitude: a radix select over the float32 bit patterns of |a|.

The bit pattern of a non-negative float32, read as an unsigned integer, orders like the float.
Pass 1 histograms the top 11 bits of |a| (sign dropped: 2048 bins, a quarter-octave each) in
parallel over static chunks (integer counts: the result does not depend on the thread count);
it can be fused into another pass over the data (the conv layer does it while packing its
input). Pass 2 collects the non-zero entries of the bin holding the K-th magnitude into a
scratch buffer, and two small histogram passes over that buffer (11 then 9 bits) finish the
exact answer. No sort, no argpartition.

Selection rule used by the layers (``count_for_density`` gives K): keep every entry with
``|a| >= t`` where ``t`` is the K-th largest magnitude, and never keep an exact zero (if fewer
than K entries are non-zero, all non-zero entries are kept).
"""

from __future__ import annotations

import math
import struct

import numpy as np
from numba import njit, prange

from .bitmask import window_bits
from .sparse import dual, low_bit, pick

NCHUNK = 8  # static partition of the histogram pass (independent of the thread count)
NSUB = 4  # interleaved sub-histograms per chunk: breaks the increment dependency chains
#: a window's candidates up to this many are selected by a quickselect on a copy, more by
#: radix levels (three 2048-bin passes: ~5 us even for a handful, measured)
SMALL_SELECT = 4096


def count_for_density(density: float, n: int) -> int:
    """K kept out of ``n`` at ``density``: ``round(density * n)`` clipped to [1, n]."""
    return max(1, min(n, int(math.floor(density * n + 0.5))))


def new_hist() -> np.ndarray:
    """Per-chunk histogram scratch of pass 1 (NSUB interleaved rows per chunk)."""
    return np.zeros((NCHUNK * NSUB, 2048), dtype=np.int32)


@dual
def hist_top_bits(bits, hist):
    """hist rows 4c..4c+3 = counts of the top-11-bit values of |a| over chunk c (entry i of
    the chunk goes to sub-row i % 4, so consecutive equal bins do not serialise)."""
    n = bits.size
    nch = hist.shape[0] // 4
    for c in prange(nch):
        h0 = hist[4 * c]
        h1 = hist[4 * c + 1]
        h2 = hist[4 * c + 2]
        h3 = hist[4 * c + 3]
        h0[:] = 0
        h1[:] = 0
        h2[:] = 0
        h3[:] = 0
        src = bits[n * c // nch:n * (c + 1) // nch]  # indexed from 0: no wrap-around check
        hi = src.size
        i = 0
        m = np.uint32(0x7FFFFFFF)
        s = np.uint32(20)
        while i + 4 <= hi:
            h0[(src[i] & m) >> s] += 1
            h1[(src[i + 1] & m) >> s] += 1
            h2[(src[i + 2] & m) >> s] += 1
            h3[(src[i + 3] & m) >> s] += 1
            i += 4
        while i < hi:
            h0[(src[i] & m) >> s] += 1
            i += 1


@njit(cache=True, nogil=True, inline="always")
def _collect(src, lo, hi, dst, want_above):
    """Compact the |a| bit patterns of ``src`` with lo <= b <= hi into ``dst`` (in order, 64
    at a time through a keep-bitmask, :func:`~embedded.kernels.bitmask.window_bits`, then
    only its set bits, see :func:`~embedded.kernels.sparse.low_bit`); returns (how many, how
    many above hi if ``want_above`` else 0)."""
    m = 0
    a = 0
    for i0 in range(0, src.size, 64):
        keep, ab = window_bits(src, i0, min(64, src.size - i0), lo, hi)
        if want_above:  # a literal at each call site: compiled away where False
            a += ab
        while keep:
            i, low = low_bit(keep)
            keep ^= low
            dst[m] = src[i0 + i] & np.uint32(0x7FFFFFFF)
            m += 1
    return m, a


@njit(cache=True, nogil=True)
def _pick(hist, k):
    """Bin (from the top) where the cumulative count reaches k; returns (bin, count above).

    The rows are first summed into row 0 (row-wise adds vectorise; row 0 is overwritten):
    scanning ~1,500 empty top bins across 32 rows column by column cost ~80 us a select,
    more than a small layer's whole top-K."""
    rows, nb = hist.shape
    h = hist[0]
    for c in range(1, rows):
        r = hist[c]
        for b in range(nb):
            h[b] += r[b]
    above = 0
    for b in range(nb - 1, -1, -1):
        s = h[b]
        if above + s >= k:
            return b, above
        above += s
    return 0, above


@dual
def _resolve_count(hist, k, bits, cand):
    """Kernel of :func:`resolve_count`. Pass 2 (collecting the entries of the K-th bin) runs
    over NCHUNK static chunks, chunk c compacting into its own slice ``cand[lo:hi]``, so it is
    parallel without a race; the two small histogram passes walk the chunks in order
    (integer counts: the result does not depend on the thread count)."""
    b1, above = _pick(hist, k)
    total = above
    k -= above
    top = np.uint32(b1)
    n = bits.size
    mc = hist[2, :NCHUNK]  # pass 1's counts are no longer needed: reuse the scratch
    for c in prange(NCHUNK):
        lo = n * c // NCHUNK
        hi = n * (c + 1) // NCHUNK
        src = bits[lo:hi]  # 1-D slices indexed from 0: no wrap-around check per access
        dst = cand[lo:hi]
        m, _ = _collect(src, max(top << np.uint32(20), np.uint32(1)),
                        (top << np.uint32(20)) | np.uint32(0xFFFFF), dst, False)
        mc[c] = m
    m = 0
    for c in range(NCHUNK):
        m += mc[c]
    if m < k:
        return np.uint32(1), total + m  # fewer than k non-zero magnitudes: keep them all
    return _radix_levels(cand, n, mc, k, total, top, 1, hist)


@njit(cache=True, nogil=True)
def _radix_levels(cand, n, mc, k, total, pre, level0, hist):
    """Finish a select among candidates (chunk c's: ``cand[n*c//NCHUNK:][:mc[c]]``) by radix
    levels over bits 20..30, 9..19 and 0..8 of their |a| bit patterns, from ``level0`` (1 when
    the top 11 bits ``pre`` are already known): the K-th largest's pattern and ``total`` plus
    the candidates >= it (ties included). ``hist`` row 0 is the scratch."""
    for level in range(level0, 3):
        shift = np.uint32(20) if level == 0 else (np.uint32(9) if level == 1 else np.uint32(0))
        nb = 2048 if level < 2 else 512
        mask = np.uint32(nb - 1)
        h = hist[0:1, :nb]
        h[:] = 0
        for c in range(mc.size):
            for i in range(n * c // NCHUNK, n * c // NCHUNK + mc[c]):
                b = cand[i]
                if level == 0 or (b >> (shift + np.uint32(11 if level == 1 else 9))) == pre:
                    h[0, (b >> shift) & mask] += 1
        bsel, ab = _pick(h, k)
        total += ab
        k -= ab
        if level == 0:
            pre = np.uint32(bsel)
        elif level == 1:
            pre = (pre << np.uint32(11)) | np.uint32(bsel)
        else:
            total += h[0, bsel]  # the ties at the k-th value
            return (pre << np.uint32(9)) | np.uint32(bsel), total
    return np.uint32(0), -1  # pragma: no cover


def resolve_count(hist: np.ndarray, k: int, bits: np.ndarray, cand: np.ndarray):
    """Finish the select: (bit pattern of the k-th largest |a|, number of non-zero entries
    with |a| >= it). The bit pattern is 1 (keep every non-zero) if fewer than k are non-zero.

    ``hist`` is pass 1's histogram of ``bits`` (overwritten; extra exact zeros in ``bits``,
    such as padding, are ignored); ``cand`` a uint32 scratch as large as ``bits``.
    """
    return pick(_resolve_count, bits.size)(hist, k, bits, cand)


def resolve(hist: np.ndarray, k: int, bits: np.ndarray, cand: np.ndarray):
    """Bit pattern of the k-th largest |a| (see :func:`resolve_count`)."""
    b, _ = resolve_count(hist, k, bits, cand)
    return b


_F32 = struct.Struct("<f")
_U32 = struct.Struct("<I")
_F32X2 = struct.Struct("<2f")
_U32X2 = struct.Struct("<2I")


def bits_to_float(b: int) -> float:
    """The float32 with bit pattern ``b``, as a Python float (struct: 0.08 us, numpy 0.7)."""
    return _F32.unpack(_U32.pack(int(b)))[0]


def float_to_bits(v: float) -> int:
    """The bit pattern of ``v`` rounded to float32 (to nearest, as ``np.float32``)."""
    try:
        return _U32.unpack(_F32.pack(v))[0]
    except OverflowError:  # rounds beyond float32's range: inf, as numpy has it
        return 0xFF800000 if v < 0 else 0x7F800000


def kth_largest_abs(a: np.ndarray, k: int, hist: np.ndarray | None = None,
                    cand: np.ndarray | None = None) -> float:
    """The k-th largest magnitude of float32 array ``a`` (exact), 1 <= k <= a.size.

    If fewer than k entries are non-zero, returns the smallest positive float32 (so that the
    rule ``|a| >= t and a != 0`` keeps every non-zero entry).
    """
    a = np.ascontiguousarray(a, dtype=np.float32).reshape(-1)
    if not 1 <= k <= a.size:
        raise ValueError(f"k: expected 1 <= k <= {a.size}, got {k}")
    if hist is None:
        hist = new_hist()
    if cand is None or cand.size < a.size:
        cand = np.empty(a.size, np.uint32)
    bits = a.view(np.uint32)
    pick(hist_top_bits, a.size)(bits, hist)
    return bits_to_float(int(resolve(hist, k, bits, cand)))


def topk_threshold(a: np.ndarray, density: float, hist: np.ndarray | None = None) -> float:
    """Magnitude threshold ``t``: ``|a| >= t`` keeps the top ``count_for_density`` entries."""
    return kth_largest_abs(a, count_for_density(density, a.size), hist)


# ----------------------------------------------------------------------------- windowed select
# When the K-th magnitude is known to lie near a guess (the previous step's threshold: weights
# move little per SGD step, and a layer's activation statistics little from batch to batch),
# ONE pass finds it exactly: count the entries above a window [lo, hi] of bit patterns around
# the guess and compact the entries inside it; the K-th is then selected among those few
# candidates. A guess that misses (the K-th outside the window) is detected, never wrong: the
# caller falls back to the histogram select and widens its window (see :class:`Window`).

@dual
def window_pass(bits, lo, hi, cand, mc, above):
    """Over NCHUNK static chunks: ``above[c]`` = entries of chunk c with |a| > hi (bit
    patterns), its entries with lo <= |a| <= hi compacted into ``cand[chunk c]`` (``mc[c]``
    of them; a keep-bitmask per 64 entries, see :func:`~embedded.kernels.sparse.low_bit`).
    Integer counts: the result does not depend on the thread count."""
    n = bits.size
    for c in prange(NCHUNK):
        src = bits[n * c // NCHUNK:n * (c + 1) // NCHUNK]  # indexed from 0
        dst = cand[n * c // NCHUNK:n * (c + 1) // NCHUNK]
        mc[c], above[c] = _collect(src, lo, hi, dst, True)


@njit(cache=True, nogil=True)
def _kth_smallest(a, r):
    """The ``r``-th smallest (from 0) of ``a``, reordered in place: an iterative quickselect
    with a median-of-three pivot (np.partition's generic version added ~5 s to the first
    step's compile)."""
    lo = 0
    hi = a.size - 1
    while lo < hi:
        mid = (lo + hi) >> 1
        if a[mid] < a[lo]:
            a[mid], a[lo] = a[lo], a[mid]
        if a[hi] < a[lo]:
            a[hi], a[lo] = a[lo], a[hi]
        if a[hi] < a[mid]:
            a[hi], a[mid] = a[mid], a[hi]
        p = a[mid]
        i = lo
        j = hi
        while i <= j:
            while a[i] < p:
                i += 1
            while a[j] > p:
                j -= 1
            if i <= j:
                a[i], a[j] = a[j], a[i]
                i += 1
                j -= 1
        if r <= j:
            hi = j
        elif r >= i:
            lo = i
        else:
            return a[r]  # j < r < i: equal to the pivot
    return a[r]


@njit(cache=True, nogil=True)
def select_window(cand, n, mc, above, k, hist):
    """The K-th largest among all n entries from a window pass: (bit pattern, number of
    entries >= it), or (0, -1) if the K-th lies outside the window. Chunk c's candidates
    are ``cand[n*c//NCHUNK:][:mc[c]]``; ``hist`` a (>= 1, 2048) int32 scratch (its first
    SMALL_SELECT entries hold the quickselect's copy)."""
    n_above = 0
    m = 0
    for c in range(mc.size):
        n_above += above[c]
        m += mc[c]
    if n_above >= k or n_above + m < k:
        return np.uint32(0), -1
    if m > SMALL_SELECT or m > hist.size:
        return _radix_levels(cand, n, mc, k - n_above, n_above, np.uint32(0), 0, hist)
    # few candidates: a quickselect on their copy, in the histogram scratch (patterns with
    # the sign bit dropped fit its int32 entries)
    tmp = hist.reshape(hist.size)[:m].view(np.uint32)
    q = 0
    for c in range(mc.size):
        c0 = n * c // NCHUNK
        tmp[q:q + mc[c]] = cand[c0:c0 + mc[c]]
        q += mc[c]
    b = _kth_smallest(tmp, m - (k - n_above))
    kept = n_above
    for i in range(m):
        kept += tmp[i] >= b
    return b, kept


class Window:
    """The adaptive window of a layer's windowed top-K: relative half-width ``w`` around the
    last threshold. After each select it follows the threshold's own movement: ``w`` becomes
    the larger of 3x the last relative change and 0.7x its old value (at least ``w_min``), so
    it widens at once after a jump and narrows slowly while the threshold is steady. (A
    shrink-on-hit / double-on-miss rule missed 20-25 % of resnet8's weight selects.)"""

    def __init__(self, w: float, w_min: float, w_max: float = 1.0):
        self.w, self.w_min, self.w_max = w, w_min, w_max
        self.hits = 0
        self.misses = 0

    def bounds(self, thr: float) -> tuple[np.uint32, np.uint32]:
        """(lo, hi) bit patterns of [thr (1 - w), thr (1 + w)] (lo >= the smallest positive
        float: exact zeros are never candidates). Both converted in one struct round trip:
        run once or twice a layer step, mostly with the caches cold."""
        w = self.w
        a, b = thr * (1.0 - (w if w < 1.0 else 1.0)), thr * (1.0 + w)
        try:
            lo, hi = _U32X2.unpack(_F32X2.pack(a, b))
        except OverflowError:  # beyond float32's range: as float_to_bits has it
            lo, hi = float_to_bits(a), float_to_bits(b)
        return np.uint32(lo if lo > 1 else 1), np.uint32(hi)

    def update(self, hit: bool, rel_change: float) -> None:
        """Record a hit or miss and the threshold's relative change |new/guess - 1|
        (comparisons, not min/max calls: cheaper with the caches cold)."""
        if hit:
            self.hits += 1
        else:
            self.misses += 1
        w = 0.7 * self.w
        if w < self.w_min:
            w = self.w_min
        if 3.0 * rel_change > w:
            w = 3.0 * rel_change
        self.w = w if w < self.w_max else self.w_max


def select_count_near(bits: np.ndarray, k: int, guess: float, win: Window, hist: np.ndarray,
                      cand: np.ndarray, mc: np.ndarray, above: np.ndarray, kern=None):
    """:func:`resolve_count`'s answer (bit pattern of the K-th largest |a|, entries >= it) for
    the float32 bit patterns ``bits`` in one pass when the K-th lies in ``win``'s window
    around ``guess`` (> 0), else by the histogram select; ``win`` adapts. ``kern``: the
    :func:`window_pass` kernel picked for ``bits.size`` (picked here when None)."""
    lo, hi = win.bounds(guess)
    (kern or pick(window_pass, bits.size))(bits, lo, hi, cand, mc, above)
    b, kept = select_window(cand, bits.size, mc, above, k, hist)
    hit = kept >= 0
    if not hit:
        pick(hist_top_bits, bits.size)(bits, hist)
        b, kept = resolve_count(hist, k, bits, cand)
    win.update(hit, abs(bits_to_float(int(b)) / guess - 1.0))
    return b, kept


def kth_largest_abs_near(a: np.ndarray, k: int, guess: float, win: Window, hist: np.ndarray,
                         cand: np.ndarray, mc: np.ndarray, above: np.ndarray) -> float:
    """:func:`kth_largest_abs` (same exact answer) in one pass when the K-th magnitude lies in
    ``win``'s window around ``guess`` (> 0), else the histogram select; ``win`` adapts."""
    b, _ = select_count_near(a.reshape(-1).view(np.uint32), k, guess, win, hist, cand, mc,
                             above)
    return bits_to_float(int(b))
