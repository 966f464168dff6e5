"""Dense GEMM for the ``dense`` paths, run on Numba's own threads.

``gemm(a, b, c, ta, tb)`` computes the row-major ``c = op(a) @ op(b)`` (``op`` transposes when
``ta`` / ``tb``) by calling the single-threaded BLAS ``sgemm`` that SciPy exports
(``scipy.linalg.cython_blas``, a base dependency) once per static block of ``c``'s columns,
the blocks spread over Numba's threads (a ``dual`` pair: serial for small products).

Why not ``np.dot``: NumPy's OpenBLAS runs its own thread pool, and its idle threads keep
spinning after a call; beside Numba's OpenMP threads (which also spin briefly between parallel
regions) two pools then fight for the same cores. Measured on the 2-core VM, resnet8 dense step,
batch 16: 84 ms with ``np.dot`` + OpenMP layer vs 35 ms with the workqueue layer. Holding BLAS
to one thread (:func:`embedded.train.train_local` does) and splitting here keeps one pool.
Blocks are a fixed function of the product's shape, not of the thread count (OpenBLAS picks
its kernels, and so its summation order, by the size of each call: femnist_cnn's fc2 output
differed between 1 and 2 threads when the blocks followed the threads), so results are bitwise
equal for any thread count.
"""

from __future__ import annotations

import threading

import llvmlite.binding as llvm
import numpy as np
from numba import njit, prange, types
from numba.extending import get_cython_function_address

from ..runtime import threads as _threads
from .sparse import dual

# SciPy's sgemm, bound by symbol name (not by a ctypes pointer, which Numba cannot cache):
# the symbol is registered with LLVM at every import before any kernel is loaded
_SYM = "sparsefl_scipy_sgemm"
llvm.add_symbol(_SYM, get_cython_function_address("scipy.linalg.cython_blas", "sgemm"))
_sgemm = types.ExternalFunction(_SYM, types.void(*([types.voidptr] * 13)))

_N = np.int32(ord("N"))
_T = np.int32(ord("T"))
#: columns of c per block are a multiple of this (one 64-byte cache line of float32)
_ALIGN = 16


@njit(cache=True, nogil=True)
def _block(ta, tb, M, N, K, a, lda, b, ldb, c, ldc, ib, fb):
    """Row-major C (M x N, row stride ldc) = op(A) @ op(B) with one sgemm call: Fortran's
    column-major view of C is C^T = op(B)^T op(A)^T, so B goes first. ``ib`` (int32[8]) and
    ``fb`` (float32[2]) hold the by-reference arguments."""
    ib[0] = _T if tb else _N
    ib[1] = _T if ta else _N
    ib[2] = N
    ib[3] = M
    ib[4] = K
    ib[5] = ldb
    ib[6] = lda
    ib[7] = ldc
    fb[0] = 1.0
    fb[1] = 0.0
    _sgemm(ib[0:].ctypes, ib[1:].ctypes, ib[2:].ctypes, ib[3:].ctypes, ib[4:].ctypes,
           fb[0:].ctypes, b.ctypes, ib[5:].ctypes, a.ctypes, ib[6:].ctypes,
           fb[1:].ctypes, c.ctypes, ib[7:].ctypes)


@dual
def _gemm(a, b, c, ta, tb, ib, fb):
    """c = op(a) @ op(b), c's columns in ``ib.shape[0]`` blocks (one sgemm each) spread over
    the threads."""
    M, N = c.shape
    K = a.shape[0] if ta else a.shape[1]
    lda = a.shape[1]
    ldb = b.shape[1]
    af = a.reshape(-1)
    bf = b.reshape(-1)
    cf = c.reshape(-1)
    nt = ib.shape[0]
    for t in prange(nt):
        n0 = (N * t // nt) // _ALIGN * _ALIGN
        n1 = N if t == nt - 1 else (N * (t + 1) // nt) // _ALIGN * _ALIGN
        if n1 > n0:
            ob = n0 * ldb if tb else n0
            _block(ta, tb, M, n1 - n0, K, af, lda, bf[ob:], ldb, cf[n0:], N, ib[t], fb[t])


_TLS = threading.local()
_PINNED = 0  # > 0 while a single_threaded_blas() block is open
#: multiply-adds above which the product is split into column blocks (run over the threads)
PAR_MIN_MACS = 1 << 18
#: column blocks of a split product (at least _ALIGN columns each): a function of the shape
#: only, so every thread count computes the same sgemm calls
BLOCKS = 8


def column_blocks(M: int, N: int, K: int) -> int:
    """Column blocks :func:`gemm` splits a pinned M x N x K product into (1: one call)."""
    if M * N * K < PAR_MIN_MACS or N < 2 * _ALIGN:
        return 1
    return min(BLOCKS, N // _ALIGN)


def gemm(a: np.ndarray, b: np.ndarray, c: np.ndarray, ta: bool = False,
         tb: bool = False) -> np.ndarray:
    """``c[...] = op(a) @ op(b)`` (float32, C-contiguous as stored; ``op`` = transpose if
    ``ta`` / ``tb``); returns ``c``."""
    for name, arr in (("a", a), ("b", b), ("c", c)):
        if arr.ndim != 2 or arr.dtype != np.float32 or not arr.flags.c_contiguous:
            raise ValueError(f"gemm: {name} must be a C-contiguous 2-D float32 array, got "
                             f"{arr.dtype} {arr.shape}")
    M, N = c.shape
    K = a.shape[0] if ta else a.shape[1]
    if ((a.shape[1] if ta else a.shape[0]) != M or (b.shape[0] if tb else b.shape[1]) != N
            or (b.shape[1] if tb else b.shape[0]) != K):
        raise ValueError(f"gemm: shapes {a.shape}{'^T' if ta else ''} @ "
                         f"{b.shape}{'^T' if tb else ''} -> {c.shape} do not match")
    nt = column_blocks(M, N, K) if _PINNED > 0 else 1
    par = nt > 1 and _threads() > 1
    bufs = getattr(_TLS, "bufs", None)
    if bufs is None or bufs[0].shape[0] < nt:
        bufs = _TLS.bufs = (np.zeros((max(nt, 8), 8), np.int32),
                            np.zeros((max(nt, 8), 2), np.float32))
    _gemm[1 if par else 0](a, b, c, ta, tb, bufs[0][:nt], bufs[1][:nt])
    return c


class single_threaded_blas:  # noqa: N801 - used like a function: ``with single_threaded_blas():``
    """Hold the BLAS libraries' own thread pools to one thread (wrap a training loop or a
    benchmark). Only inside it does :func:`gemm` split a product over Numba's threads;
    outside, it makes one BLAS call (BLAS threads itself, as ``np.dot`` would): a threaded
    BLAS called from inside an OpenMP region warns that it may hang."""

    def __enter__(self):
        from threadpoolctl import threadpool_limits  # a base dependency

        global _PINNED
        self._limits = threadpool_limits(limits=1, user_api="blas")
        _PINNED += 1
        return self

    def __exit__(self, *exc):
        global _PINNED
        _PINNED -= 1
        self._limits.restore_original_limits()
        return False
