"""The register-block transposes (embedded.kernels.layout) against numpy, on awkward shapes:
rows not a multiple of 8, maps narrower than a block (blocks crossing map rows), stride-2
reads, padded destination rows. Anything written outside the map would show in the guard
values around it."""

import numpy as np
import pytest
from numba import njit

from embedded.kernels.layout import from_grid, from_pair, to_grid


@njit(cache=True)
def _to(src, s, ss, R, P, step, dst, d0, rs, cs, W):
    to_grid(src, s, ss, R, P, step, dst, d0, rs, cs, W)


@njit(cache=True)
def _from(src, s0, rs, cs, W, R, P, dst, d, ds, b):
    from_grid(src, s0, rs, cs, W, R, P, dst, d, ds, b)


def _grid_index(d0, rs, cs, W, R, P):
    p = np.arange(P)
    return d0 + (p // W)[None, :] * rs + (p % W)[None, :] * cs + np.arange(R)[:, None]


@pytest.mark.parametrize("R", [1, 7, 8, 9, 16, 17])
@pytest.mark.parametrize("W", [1, 4, 5, 7, 8, 12, 14])
@pytest.mark.parametrize("step", [1, 2])
def test_to_grid_and_back_match_numpy(R, W, step):
    rng = np.random.default_rng(R * 100 + W * 10 + step)
    for H in (1, 3, 5):
        for s in (0, 1):
            P = H * W
            ss = P * step + s + 3  # source rows with slack between them
            src = rng.standard_normal(ss * R + 5).astype(np.float32)
            cs, d0 = R + 2, 4
            rs = W * cs + 3
            dst = np.full(d0 + H * rs + 10, 9.0, np.float32)
            _to(src, s, ss, R, P, step, dst, d0, rs, cs, W)
            idx = _grid_index(d0, rs, cs, W, R, P)
            want = np.full_like(dst, 9.0)
            want[idx] = src[s + np.arange(R)[:, None] * ss + np.arange(P)[None, :] * step]
            np.testing.assert_array_equal(dst, want)
            if step == 1:
                ds, d = P + 2, 1
                out = np.full(d + R * ds + 3, 5.0, np.float32)
                _from(dst, d0, rs, cs, W, R, P, out, d, ds, np.float32(0.25))
                back = np.full_like(out, 5.0)
                back[d + np.arange(R)[:, None] * ds + np.arange(P)[None, :]] = dst[idx] + np.float32(0.25)
                np.testing.assert_array_equal(out, back)


@njit(cache=True)
def _pair(src, a0, b0, N, cnt, dst, d, ds):
    from_pair(src, a0, b0, N, cnt, dst, d, ds)


@pytest.mark.parametrize("N", [1, 8, 9, 16, 17])
@pytest.mark.parametrize("cnt", [1, 4, 5, 7, 8, 9, 12, 13, 16])
def test_from_pair_interleaves_two_phase_runs(N, cnt):
    """A stride-2 row from its even- and odd-column batch-last runs."""
    rng = np.random.default_rng(N * 31 + cnt)
    src = rng.standard_normal(2 * cnt * N + 40).astype(np.float32)
    a0, b0 = 3, 3 + cnt * N + 5
    ds, d = 2 * cnt + 3, 2
    dst = np.full(d + N * ds + 4, 7.0, np.float32)
    _pair(src, a0, b0, N, cnt, dst, d, ds)
    want = np.full_like(dst, 7.0)
    q, i = np.meshgrid(np.arange(cnt), np.arange(N), indexing="ij")
    want[d + i * ds + 2 * q] = src[a0 + q * N + i]
    want[d + i * ds + 2 * q + 1] = src[b0 + q * N + i]
    np.testing.assert_array_equal(dst, want)


@njit(cache=True)
def _from_cols(src, s0, rs, cs, W, R, P, dst, d, ds, b, cols):
    from_grid(src, s0, rs, cs, W, R, P, dst, d, ds, b, cols)


@pytest.mark.parametrize("R", [3, 8, 17])
@pytest.mark.parametrize("W", [1, 3, 5])
def test_from_grid_with_a_column_table(R, W):
    """Rows whose columns are stored permuted (the weight-gradient scratch's taps): column c
    of each grid row read at cols[c]*cs."""
    rng = np.random.default_rng(R * 10 + W)
    cols = rng.permutation(W).astype(np.int64)
    for H in (1, 2, 7):
        P = H * W
        cs = R + 3
        rs = W * cs + 2
        s0 = 5
        src = rng.standard_normal(s0 + H * rs + 4).astype(np.float32)
        ds, d = P + 3, 2
        out = np.full(d + R * ds + 3, 5.0, np.float32)
        _from_cols(src, s0, rs, cs, W, R, P, out, d, ds, np.float32(0.5), cols)
        p = np.arange(P)
        idx = s0 + (p // W)[None, :] * rs + cols[p % W][None, :] * cs + np.arange(R)[:, None]
        want = np.full_like(out, 5.0)
        want[d + np.arange(R)[:, None] * ds + p[None, :]] = src[idx] + np.float32(0.5)
        np.testing.assert_array_equal(out, want)
