"""Power sensors for the board agent, each sampled in a background thread.

``detect(kind, root)`` returns a sensor: ``jetson-ina3221`` (legacy IIO or mainline hwmon),
``rapl`` (Linux powercap), ``ina219``/``ina260`` (I²C, optional smbus2) or ``none``. Every
constructor takes a filesystem ``root`` so tests run against a fake sysfs tree.
"""

from __future__ import annotations

from typing import Any

from .base import (
    EnergyMeter,
    EnergyReading,
    NullSensor,
    PowerSensor,
    SensorError,
    counter_delta,
    integrate_counter,
    integrate_power,
)

KINDS = ("auto", "jetson-ina3221", "rapl", "ina219", "ina260", "none")

__all__ = [
    "KINDS", "EnergyMeter", "EnergyReading", "NullSensor", "PowerSensor", "SensorError",
    "counter_delta", "detect", "integrate_counter", "integrate_power",
]


def detect(kind: str = "auto", root: str = "/", **kw: Any) -> PowerSensor:
    """Open the requested sensor; ``auto`` tries Jetson INA3221 then RAPL, else ``none``.

    An explicitly requested sensor that cannot be opened raises :class:`SensorError`.
    """
    if kind not in KINDS:
        raise SensorError(f"sensor: expected one of {', '.join(KINDS)}, got {kind!r}")
    from .jetson import JetsonINA3221
    from .rapl import RaplSensor

    if kind == "none":
        return NullSensor()
    if kind == "jetson-ina3221":
        return JetsonINA3221(root=root, **kw)
    if kind == "rapl":
        return RaplSensor(root=root)
    if kind in ("ina219", "ina260"):
        from .ina219 import INA219Sensor
        return INA219Sensor(root=root, chip=kind, **kw)
    for cls in (JetsonINA3221, RaplSensor):
        try:
            return cls(root=root)
        except SensorError:
            continue
    return NullSensor()
