"""The 64-entry keep-bitmask blocks against numpy's element-wise tests (NaN, -0.0, ties)."""

import numpy as np
from numba import njit

from embedded.kernels.bitmask import kept_mask64, window_mask64


@njit
def _kept(a, thr):
    return np.array([kept_mask64(a, b * 64, thr) for b in range(a.size // 64)], np.uint64)


@njit
def _window(bits, lo, hi):
    out = np.zeros((bits.size // 64, 2), np.uint64)
    for b in range(bits.size // 64):
        out[b, 0], out[b, 1] = window_mask64(bits, b * 64, lo, hi)
    return out


def _pack(flags: np.ndarray) -> np.ndarray:
    """64 booleans a row -> the uint64 with bit i = flag i."""
    w = (np.uint64(1) << np.arange(64, dtype=np.uint64))
    return (flags.reshape(-1, 64).astype(np.uint64) * w).sum(axis=1, dtype=np.uint64)


def _data(n=64 * 40, seed=0):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal(n).astype(np.float32)
    a[::9] = 0.0
    a[::13] = -0.0
    a[5] = np.nan
    a[70] = -np.nan
    a[100:110] = 1.25  # ties at the threshold
    a[200:205] = -1.25
    return a


def test_kept_mask_matches_numpy():
    a = _data()
    for thr in (np.float32(1.25), np.float32(0.0), np.float32(3.0), np.float32(1e-30)):
        with np.errstate(invalid="ignore"):
            want = _pack((a != 0) & (np.abs(a) >= thr))
        assert np.array_equal(_kept(a, thr), want), thr


def test_window_mask_matches_numpy():
    a = _data(seed=1)
    bits = a.view(np.uint32)
    mag = bits & np.uint32(0x7FFFFFFF)
    lo_hi = [(np.float32(1.25), np.float32(1.25)), (np.float32(0.5), np.float32(2.0)),
             (np.float32(1e-45), np.float32(np.inf))]
    for lo_f, hi_f in lo_hi:
        lo = np.array(lo_f).view(np.uint32)[()]
        hi = np.array(hi_f).view(np.uint32)[()]
        got = _window(bits, lo, hi)
        assert np.array_equal(got[:, 0], _pack((mag >= lo) & (mag <= hi))), (lo_f, hi_f)
        assert np.array_equal(got[:, 1], (mag > hi).reshape(-1, 64).sum(axis=1)), (lo_f, hi_f)
