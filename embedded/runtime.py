"""Numba's thread pool: start it on purpose, and say which threading layer runs it.

``import embedded`` picks the layer (GNU OpenMP first, see :mod:`embedded`); the threads start
at the first parallel kernel. In a process that also uses torch, call :func:`start_threads`
before torch is imported: torch's bundled ``libgomp.so.1`` then resolves to the OpenMP runtime
Numba already loaded, so the process holds one OpenMP thread pool instead of two.
"""

from __future__ import annotations

import numba
from numba.np.ufunc import parallel as _parallel


def start_threads() -> str:
    """Start Numba's threading layer now; returns its name (``omp``, ``workqueue``, ``tbb``)."""
    _parallel._launch_threads()  # what Numba runs at the first parallel kernel launch
    return numba.threading_layer()


def threads() -> int:
    """This thread's Numba thread count, as :func:`numba.get_num_threads` (which takes the
    pool's start-up lock on every call: ~1 us, paid by every kernel choice of a step, against
    0.13 us for the pool's own getter once the pool runs)."""
    if getattr(_parallel, "_is_initialized", False):
        getter = getattr(_parallel, "_get_num_threads", None)
        if getter is not None:
            return getter()
    return numba.get_num_threads()
