"""Radix-select top-K threshold against numpy's sort."""

from __future__ import annotations

import numpy as np
import pytest

from embedded.kernels.topk import count_for_density, kth_largest_abs, topk_threshold


@pytest.mark.parametrize("n", [1, 7, 1000, 100_003])
def test_kth_largest_matches_sort(n):
    rng = np.random.default_rng(n)
    a = (rng.standard_normal(n) * rng.choice([1e-3, 1.0, 1e3], n)).astype(np.float32)
    ref = np.sort(np.abs(a))[::-1]
    for k in sorted({1, max(1, n // 10), max(1, n // 2), n}):
        assert kth_largest_abs(a, k) == ref[k - 1]


def test_ties_zeros_and_negative_values():
    a = np.array([0, -3, 3, 2, -2, 0, 0, 1, -5], np.float32)
    ref = np.sort(np.abs(a))[::-1]
    nonzero = int((a != 0).sum())
    for k in range(1, nonzero + 1):
        assert kth_largest_abs(a, k) == ref[k - 1]
    # asking for more than the non-zeros: the threshold keeps every non-zero entry (and, by
    # the layers' rule, never a zero)
    tiny = np.nextafter(np.float32(0), np.float32(1))
    for k in range(nonzero + 1, a.size + 1):
        t = kth_largest_abs(a, k)
        assert t == tiny
        assert int(((np.abs(a) >= t) & (a != 0)).sum()) == nonzero
    # subnormals and huge magnitudes still order by their bit patterns
    b = np.array([1e-45, -2e-45, 3e38, -1e38, 0.5], np.float32)
    assert kth_largest_abs(b, 1) == np.float32(3e38)
    assert kth_largest_abs(b, 5) == np.float32(1e-45)


def test_threshold_keeps_exactly_k_for_distinct_values():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((64, 32, 3, 3)).astype(np.float32)
    for d in (0.05, 0.1, 0.5, 1.0):
        t = topk_threshold(a, d)
        assert int((np.abs(a) >= t).sum()) == count_for_density(d, a.size)


def test_bad_k():
    with pytest.raises(ValueError, match="k: expected"):
        kth_largest_abs(np.ones(3, np.float32), 4)
    assert count_for_density(0.0001, 10) == 1
