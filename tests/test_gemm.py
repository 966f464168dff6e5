"""kernels.gemm: the dense GEMM split over Numba's threads matches a float64 reference for every
transpose combination, odd shapes and 1 or 2 threads, and rejects bad operands clearly."""

import os

import numba
import numpy as np
import pytest

from embedded.kernels import gemm as G


@pytest.mark.parametrize("shape", [(3, 5, 7), (17, 33, 65), (64, 1030, 576), (16, 2048, 300)])
@pytest.mark.parametrize("ta", [False, True])
@pytest.mark.parametrize("tb", [False, True])
def test_matches_float64_reference(shape, ta, tb, monkeypatch):
    monkeypatch.setattr(G, "PAR_MIN_MACS", 1)  # split even the small products
    M, N, K = shape
    rng = np.random.default_rng(M * N + K)
    a = rng.standard_normal((K, M) if ta else (M, K)).astype(np.float32)
    b = rng.standard_normal((N, K) if tb else (K, N)).astype(np.float32)
    ref = (a.T if ta else a).astype(np.float64) @ (b.T if tb else b).astype(np.float64)
    before = numba.get_num_threads()
    try:
        outs = []
        for t in sorted({1, min(2, numba.config.NUMBA_NUM_THREADS)}):
            numba.set_num_threads(t)
            c = np.full((M, N), np.nan, np.float32)
            with G.single_threaded_blas():
                G.gemm(a, b, c, ta, tb)
            assert np.abs(c - ref).max() <= 1e-5 * np.abs(ref).max() * np.sqrt(K)
            with G.single_threaded_blas():
                again = G.gemm(a, b, np.empty_like(c), ta, tb)
            assert np.array_equal(c, again)  # same threads: bitwise the same
            outs.append(c)
            assert np.allclose(G.gemm(a, b, np.empty_like(c), ta, tb), c, rtol=1e-5, atol=1e-4)
    finally:
        numba.set_num_threads(before)


def test_bad_operands_are_named():
    a = np.ones((4, 5), np.float32)
    with pytest.raises(ValueError, match="do not match"):
        G.gemm(a, np.ones((6, 3), np.float32), np.ones((4, 3), np.float32))
    with pytest.raises(ValueError, match="b must be a C-contiguous 2-D float32"):
        G.gemm(a, np.ones((5, 3)), np.ones((4, 3), np.float32))
    with pytest.raises(ValueError, match="c must be a C-contiguous"):
        G.gemm(a, np.ones((5, 6), np.float32), np.ones((4, 6), np.float32)[:, ::2])


def test_one_openmp_runtime_beside_torch():
    """With Numba's threads started first (tests/conftest.py, embedded.runtime), importing torch
    maps no copy of torch's own libgomp: torch and Numba share one OpenMP thread pool. (Other
    packages may vendor theirs under another name, e.g. scikit-learn's.)"""
    import torch

    from embedded.runtime import start_threads

    if start_threads() != "omp":
        pytest.skip("Numba's omp layer is not available here")
    torch_lib = os.path.dirname(torch.__file__)
    with open("/proc/self/maps", encoding="utf-8") as f:
        gomp = {line.split()[-1] for line in f if "libgomp" in line and "r-xp" in line}
    assert not [p for p in gomp if p.startswith(torch_lib)], gomp


@pytest.mark.parametrize("shape", [(16, 62, 2048), (16, 2048, 3136), (32, 100, 500)])
def test_bitwise_equal_for_any_thread_count(shape):
    """The column blocks follow the product's shape, not the thread count: OpenBLAS picks its
    kernels (and summation order) by each call's size, so blocks that followed the threads
    gave femnist_cnn's fc2 (16 x 62 x 2048) different floats at 1 and 2 threads."""
    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("needs 2 Numba threads")
    M, N, K = shape
    rng = np.random.default_rng(0)
    a = rng.standard_normal((M, K)).astype(np.float32)
    b = rng.standard_normal((K, N)).astype(np.float32)
    assert G.column_blocks(M, N, K) > 1
    before = numba.get_num_threads()
    outs = []
    try:
        with G.single_threaded_blas():
            for th in (1, 2):
                numba.set_num_threads(th)
                outs.append(G.gemm(a, b, np.empty((M, N), np.float32)))
    finally:
        numba.set_num_threads(before)
    assert np.array_equal(outs[0], outs[1])
