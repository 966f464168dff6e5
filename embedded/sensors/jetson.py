"""Jetson on-module INA3221 power monitor: legacy ``ina3221x`` IIO sysfs and mainline hwmon.

Legacy (L4T 32, Nano/TX2/Xavier)::

    /sys/bus/i2c/drivers/ina3221x/6-0040/iio:device0/rail_name_{0,1,2}   e.g. POM_5V_IN
    .../in_power{N}_input (mW)  in_voltage{N}_input (mV)  in_current{N}_input (mA)

Mainline hwmon (JetPack 5/6, Orin)::

    /sys/bus/i2c/drivers/ina3221/1-0040/hwmon/hwmon*/in{1,2,3}_label     e.g. VDD_IN
    .../in{N}_input (mV, bus voltage)  curr{N}_input (mA)

The hwmon index varies between boots, so it is globbed. Only the *input* rail (VDD_IN /
POM_5V_IN) is read: it is the module's total; the other rails are sub-rails of it and are never
added to it.
"""

from __future__ import annotations

import glob
import os

from .base import PowerSensor, SensorError

#: Names of the input (total) rail, in order of preference.
INPUT_RAILS = ("VDD_IN", "POM_5V_IN")


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except PermissionError as e:
        raise SensorError(f"jetson-ina3221: cannot read {path}: permission denied "
                          "(see docs/boards.md, sensor permissions)") from e


def _read_num(path: str) -> float:
    s = _read(path)
    try:
        return float(s)
    except ValueError as e:
        raise SensorError(f"jetson-ina3221: {path}: expected a number, got {s!r}") from e


def _pick(rails: dict[str, str], rail: str | None, where: str) -> str:
    if rail is not None:
        if rail not in rails:
            raise SensorError(f"jetson-ina3221: rail {rail!r} not found under {where}; "
                              f"rails: {sorted(rails)}")
        return rail
    for name in INPUT_RAILS:
        if name in rails:
            return name
    ins = sorted(r for r in rails if r.upper().endswith("_IN"))
    if len(ins) == 1:
        return ins[0]
    raise SensorError(f"jetson-ina3221: no input rail ({'/'.join(INPUT_RAILS)}) under {where}; "
                      f"rails: {sorted(rails)}; pass rail=NAME")


class JetsonINA3221(PowerSensor):
    """Total module power from the INA3221 input rail (W)."""

    kind = "jetson-ina3221"

    def __init__(self, root: str = "/", rail: str | None = None) -> None:
        self.root = root
        found = self._find_hwmon(root) or self._find_legacy(root)
        if not found:
            raise SensorError(f"jetson-ina3221: no ina3221 (hwmon) or ina3221x (IIO) device "
                              f"under {os.path.join(root, 'sys/bus/i2c/drivers')}")
        self.driver, rails, where = found
        self.rail = _pick(rails, rail, where)
        self.rails = rails           # name -> channel
        self.path = where
        self._ch = rails[self.rail]
        self.read_power_w()          # fail now, not in the sampling thread

    @staticmethod
    def _find_hwmon(root: str) -> tuple[str, dict[str, str], str] | None:
        pattern = os.path.join(root, "sys/bus/i2c/drivers/ina3221/*/hwmon/hwmon*")
        best = None
        for d in sorted(glob.glob(pattern)):
            rails = {}
            for lab in glob.glob(os.path.join(d, "in*_label")):
                ch = os.path.basename(lab)[2:-len("_label")]
                if ch.isdigit() and os.path.exists(os.path.join(d, f"curr{ch}_input")):
                    rails[_read(lab)] = ch
            if rails and (best is None or any(r in rails for r in INPUT_RAILS)):
                best = ("hwmon", rails, d)
                if any(r in rails for r in INPUT_RAILS):
                    break
        return best

    @staticmethod
    def _find_legacy(root: str) -> tuple[str, dict[str, str], str] | None:
        pattern = os.path.join(root, "sys/bus/i2c/drivers/ina3221x/*/iio:device*")
        best = None
        for d in sorted(glob.glob(pattern)):
            rails = {}
            for f in glob.glob(os.path.join(d, "rail_name_*")):
                ch = os.path.basename(f)[len("rail_name_"):]
                if ch.isdigit():
                    rails[_read(f)] = ch
            if rails and (best is None or any(r in rails for r in INPUT_RAILS)):
                best = ("ina3221x", rails, d)
                if any(r in rails for r in INPUT_RAILS):
                    break
        return best

    def read_power_w(self) -> float:
        d, ch = self.path, self._ch
        if self.driver == "hwmon":
            mv = _read_num(os.path.join(d, f"in{ch}_input"))
            ma = _read_num(os.path.join(d, f"curr{ch}_input"))
            return mv * ma / 1e6
        p = os.path.join(d, f"in_power{ch}_input")
        if os.path.exists(p):
            return _read_num(p) / 1e3
        mv = _read_num(os.path.join(d, f"in_voltage{ch}_input"))
        ma = _read_num(os.path.join(d, f"in_current{ch}_input"))
        return mv * ma / 1e6

    def describe(self) -> dict:
        return {"kind": self.kind, "driver": self.driver, "rail": self.rail,
                "rails": sorted(self.rails), "path": self.path}
