"""Power sensors and the background energy meter.

A sensor reports either instantaneous power (:meth:`PowerSensor.read_power_w`, INA3221/INA219)
or a cumulative energy counter (:meth:`PowerSensor.read_energy_j`, RAPL). :class:`EnergyMeter`
samples a sensor in a background thread, integrates energy over a window (trapezoid for power,
wrap-corrected counter differences for energy), and subtracts an idle baseline measured before.
"""

from __future__ import annotations

import bisect
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass


class SensorError(RuntimeError):
    """A sensor is missing, unreadable (permissions) or returned nonsense."""


class PowerSensor:
    """Base class. Subclasses set ``kind`` and implement one of the two readers."""

    kind = "none"
    #: True when the sensor exposes a cumulative energy counter instead of power.
    cumulative = False

    def read_power_w(self) -> float:
        raise NotImplementedError

    def read_energy_j(self) -> float:
        """Cumulative energy in joules since an arbitrary origin, wrap-corrected."""
        raise NotImplementedError

    def describe(self) -> dict:
        """What INFO reports about this sensor."""
        return {"kind": self.kind}


class NullSensor(PowerSensor):
    """No power sensor: energy comes from hwmodel and is marked ``estimated``."""

    kind = "none"


@dataclass
class EnergyReading:
    """Energy over one measured window. ``energy_j`` is None without a sensor."""

    sensor: str
    duration_s: float
    energy_j: float | None
    idle_power_w: float | None
    idle_energy_j: float | None
    dynamic_energy_j: float | None
    mean_power_w: float | None
    samples: int
    provenance: str

    def to_dict(self) -> dict:
        return asdict(self)


def integrate_power(times: list[float], powers: list[float], t0: float, t1: float) -> float:
    """Energy (J) of a piecewise-linear power trace over [t0, t1] (trapezoid rule).

    The trace is interpolated linearly at the window edges and held constant beyond its first
    and last sample.
    """
    if t1 < t0:
        raise ValueError(f"integrate_power: t1 ({t1}) < t0 ({t0})")
    if len(times) != len(powers) or not times:
        raise ValueError("integrate_power: need equally long, non-empty times and powers")

    def at(t: float) -> float:
        if t <= times[0]:
            return powers[0]
        if t >= times[-1]:
            return powers[-1]
        k = bisect.bisect_right(times, t)
        ta, tb = times[k - 1], times[k]
        pa, pb = powers[k - 1], powers[k]
        return pa if tb == ta else pa + (pb - pa) * (t - ta) / (tb - ta)

    lo = bisect.bisect_right(times, t0)
    hi = bisect.bisect_left(times, t1)
    pts_t = [t0] + list(times[lo:hi]) + [t1]
    pts_p = [at(t0)] + list(powers[lo:hi]) + [at(t1)]
    e = 0.0
    for i in range(1, len(pts_t)):
        e += 0.5 * (pts_p[i] + pts_p[i - 1]) * (pts_t[i] - pts_t[i - 1])
    return e


def counter_delta(prev: int, cur: int, max_range: int) -> int:
    """Difference of a counter in ``[0, max_range)`` that wraps to 0 (at most one wrap)."""
    if cur >= prev:
        return cur - prev
    return cur + max_range - prev


class EnergyMeter:
    """Samples a sensor every ``period_s`` in a background thread and integrates windows.

    Usage::

        meter = EnergyMeter(sensor).start()
        meter.measure_idle(1.0)          # idle baseline, before the work
        w = meter.begin(); work(); reading = meter.end(w)
        meter.stop()

    For tests, :meth:`sample` may be called directly with an injected ``clock``.
    """

    def __init__(self, sensor: PowerSensor, period_s: float = 0.01,
                 clock: Callable[[], float] = time.monotonic, max_samples: int = 1_000_000) -> None:
        self.sensor = sensor
        self.period_s = period_s
        self.clock = clock
        self.max_samples = max_samples
        self.times: list[float] = []
        self.values: list[float] = []   # W for power sensors, cumulative J for counters
        self.idle_power_w: float | None = None
        self.errors = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def available(self) -> bool:
        return not isinstance(self.sensor, NullSensor)

    def sample(self) -> None:
        """Take one sample now (the background thread calls this)."""
        if not self.available:
            return
        try:
            v = (self.sensor.read_energy_j() if self.sensor.cumulative
                 else self.sensor.read_power_w())
        except (OSError, ValueError, SensorError):
            self.errors += 1
            return
        t = self.clock()
        with self._lock:
            self.times.append(t)
            self.values.append(v)
            if len(self.times) > self.max_samples:  # bounded: drop the oldest half
                half = self.max_samples // 2
                del self.times[:half]
                del self.values[:half]

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.period_s)

    def start(self) -> EnergyMeter:
        if self.available and self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="energy-meter", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2.0)
            self._thread = None

    def begin(self) -> float:
        """Start a window; returns its start time."""
        self.sample()
        return self.clock()

    def energy_between(self, t0: float, t1: float) -> float | None:
        """Energy (J) in [t0, t1] from the samples taken so far."""
        with self._lock:
            ts, vs = list(self.times), list(self.values)
        if not ts:
            return None
        if self.sensor.cumulative:
            # counters are already wrap-corrected cumulative joules: interpolate the ends
            return integrate_counter(ts, vs, t0, t1)
        return integrate_power(ts, vs, t0, t1)

    def measure_idle(self, duration_s: float = 1.0, sleep: Callable[[float], None] = time.sleep,
                     ) -> float | None:
        """Measure the idle baseline power (W) over ``duration_s`` of doing nothing."""
        if not self.available:
            return None
        t0 = self.begin()
        sleep(duration_s)
        self.sample()
        t1 = self.clock()
        e = self.energy_between(t0, t1)
        self.idle_power_w = None if e is None or t1 <= t0 else e / (t1 - t0)
        return self.idle_power_w

    def end(self, t0: float) -> EnergyReading:
        """Close a window started by :meth:`begin` and report its energy."""
        self.sample()
        t1 = self.clock()
        dur = t1 - t0
        if not self.available:
            return EnergyReading(self.sensor.kind, dur, None, None, None, None, None, 0,
                                 "estimated")
        e = self.energy_between(t0, t1)
        with self._lock:
            n = sum(1 for t in self.times if t0 <= t <= t1)
        idle_e = None if self.idle_power_w is None else self.idle_power_w * dur
        dyn = None if e is None or idle_e is None else e - idle_e
        mean = None if e is None or dur <= 0 else e / dur
        return EnergyReading(self.sensor.kind, dur, e, self.idle_power_w, idle_e, dyn, mean, n,
                             "measured")


def integrate_counter(times: list[float], joules: list[float], t0: float, t1: float) -> float:
    """Energy (J) in [t0, t1] from cumulative readings, interpolated linearly at the ends."""

    def at(t: float) -> float:
        if t <= times[0]:
            return joules[0]
        if t >= times[-1]:
            return joules[-1]
        k = bisect.bisect_right(times, t)
        ta, tb = times[k - 1], times[k]
        ja, jb = joules[k - 1], joules[k]
        return ja if tb == ta else ja + (jb - ja) * (t - ta) / (tb - ta)

    return at(t1) - at(t0)
