"""Numba's thread pool: start it on purpose, and say which threading layer runs it.

``import embedded`` picks the layer (GNU OpenMP first, see :mod:`embedded`); the threads start
at the first parallel kernel. In a process that also uses torch, call :func:`start_threads`
before torch is imported: torch's bundled ``libgomp.so.1`` then resolves to the OpenMP runtime
Numba already loaded, so the process holds one OpenMP thread pool instead of two.
"""

from __future__ import annotations

from statistics import median

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


class ThreadGovernor:
    """Runs each training step at ``max_threads`` or at 1 thread, whichever the step times
    measured lately say is faster.

    Why: on a shared host (a VM whose second vCPU the hypervisor lends elsewhere, a board
    whose other core a process takes) a parallel region cannot end before every thread of it
    has run its static part, so a step of many short regions waits on the absent thread again
    and again: measured, our resnet8 SWAT-0.95 step at 2 threads took 10.9-11.9 ms in such
    periods against 5.5-6.1 ms otherwise and 8.4 ms at 1 thread, while the dense step (few,
    long regions) kept its time. The kernels' results do not depend on the thread count, so
    switching changes no float.

    Policy. At ``max_threads``: fall back to 1 thread when the median of the last ``window``
    steps exceeds ``slow`` times the fastest quarter of the last ``history`` such steps (the
    host changed), or when a single check step at 1 thread beats that median by ``margin``
    (a run that started slow has nothing better to compare with: one check after the first
    ``2 * window`` steps, then one every ``check_every``, ~1 % of the steps). At 1 thread: a
    probe step at ``max_threads`` after ``probe_every`` steps (twice as many after each probe
    that lost, up to ``max_probe_every``); back to ``max_threads`` once a probe is not slower
    than the 1-thread median. ``record(seconds)`` after every step; ``threads`` is the count
    the next step should run with."""

    def __init__(self, max_threads: int, window: int = 5, history: int = 64,
                 slow: float = 1.35, probe_every: int = 8, max_probe_every: int = 64,
                 check_every: int = 96, margin: float = 0.9) -> None:
        if isinstance(max_threads, bool) or not isinstance(max_threads, int) or max_threads < 1:
            raise ValueError(f"ThreadGovernor.max_threads: expected an integer >= 1, got "
                             f"{max_threads!r}")
        if not (isinstance(window, int) and 1 <= window <= history):
            raise ValueError(f"ThreadGovernor.window: expected 1..history ({history}), got "
                             f"{window!r}")
        if not slow > 1.0:
            raise ValueError(f"ThreadGovernor.slow: expected a factor > 1, got {slow!r}")
        for name, v in (("probe_every", probe_every), ("check_every", check_every)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 2:
                raise ValueError(f"ThreadGovernor.{name}: expected an integer >= 2, got {v!r}")
        if not 0.0 < margin <= 1.0:
            raise ValueError(f"ThreadGovernor.margin: expected 0 < margin <= 1, got {margin!r}")
        self.max_threads = max_threads
        self.window = window
        self.history = history
        self.slow = slow
        self.probe_every = probe_every
        self.max_probe_every = max(probe_every, max_probe_every)
        self.check_every = check_every
        self.margin = margin
        self._interval = probe_every
        self._full: list[float] = []     # recent step times at max_threads
        self._one: list[float] = []      # recent step times at 1 thread (this fallback)
        self._fallback = False
        self._checking = False           # the step just run was a check at 1 thread
        self._since_probe = 0
        self._next_check = 2 * window    # max_threads steps until the next check
        self.threads = max_threads
        self.steps_at_one = 0            # steps run at 1 thread (max_threads > 1 only)
        self.switches = 0                # fallbacks started

    def _fall_back(self, one: list[float]) -> int:
        self._fallback = True
        self.switches += 1
        self._one = one
        self._since_probe = 0
        self._interval = self.probe_every
        self.threads = 1
        return 1

    def record(self, seconds: float) -> int:
        """The time of the step just run at :attr:`threads`; returns the next step's count."""
        if self.max_threads == 1:
            return 1
        if self.threads == 1:
            self.steps_at_one += 1
            if self._checking:             # a check at 1 thread from max_threads
                self._checking = False
                self._next_check = self.check_every
                if seconds < self.margin * median(self._full[-self.window:]):
                    return self._fall_back([seconds])
                self.threads = self.max_threads
                return self.threads
            self._one = (self._one + [seconds])[-self.window:]
            self._since_probe += 1
            self.threads = self.max_threads if self._since_probe >= self._interval else 1
            return self.threads
        if self._fallback:                 # a probe at max_threads
            self._since_probe = 0
            if seconds <= median(self._one):
                self._fallback = False     # recovered: the probe's level is the new normal
                self._full = [seconds]
                self._next_check = self.check_every
                self.threads = self.max_threads
            else:
                self._interval = min(2 * self._interval, self.max_probe_every)
                self.threads = 1
            return self.threads
        full = self._full = (self._full + [seconds])[-self.history:]
        if len(full) >= 2 * self.window:
            recent = median(full[-self.window:])
            best = median(sorted(full)[:max(1, len(full) // 4)])
            if recent > self.slow * best:
                self._full = full[:-self.window]   # keep the good history, not the slow run
                return self._fall_back([])
        self._next_check -= 1
        if self._next_check <= 0 and len(full) >= self.window:
            self._checking = True
            self.threads = 1
        return self.threads
