"""Numba's thread pool: start it on purpose, and say which threading layer runs it.

``import embedded`` picks the layer (GNU OpenMP first, see :mod:`embedded`); the threads start
at the first parallel kernel. In a process that also uses torch, call :func:`start_threads`
before torch is imported: torch's bundled ``libgomp.so.1`` then resolves to the OpenMP runtime
Numba already loaded, so the process holds one OpenMP thread pool instead of two.
"""

from __future__ import annotations

import numba


def start_threads() -> str:
    """Start Numba's threading layer now; returns its name (``omp``, ``workqueue``, ``tbb``)."""
    from numba.np.ufunc import parallel

    parallel._launch_threads()  # what Numba runs at the first parallel kernel launch
    return numba.threading_layer()
