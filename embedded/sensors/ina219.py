"""TI INA219 / INA260 current monitors over I²C (optional ``smbus2``, imported lazily).

Registers are big-endian 16-bit words:

* INA219: 0x01 shunt voltage (signed, LSB 10 µV), 0x02 bus voltage (bits 15..3, LSB 4 mV).
  Current = V_shunt / R_shunt (no calibration register needed), power = V_bus x I.
* INA260 (integrated 2 mΩ shunt): 0x01 current (signed, LSB 1.25 mA), 0x02 bus voltage
  (LSB 1.25 mV), 0x03 power (LSB 10 mW).

``auto`` detection never probes I²C (it could disturb other devices): choose ``--sensor ina219``
explicitly, with ``--i2c-bus``/``--i2c-address``/``--shunt-ohms`` as needed.
"""

from __future__ import annotations

import os
from typing import Any

from .base import PowerSensor, SensorError


class INA219Sensor(PowerSensor):
    """Power (W) from an INA219 or INA260 at ``address`` on I²C bus ``bus``."""

    kind = "ina219"

    def __init__(self, bus: int = 1, address: int = 0x40, shunt_ohms: float = 0.1,
                 chip: str = "ina219", root: str = "/", smbus: Any = None) -> None:
        if chip not in ("ina219", "ina260"):
            raise SensorError(f"ina219: chip must be 'ina219' or 'ina260', got {chip!r}")
        if shunt_ohms <= 0:
            raise SensorError(f"ina219: shunt_ohms must be > 0, got {shunt_ohms}")
        self.chip, self.bus_no, self.address, self.shunt_ohms = chip, bus, address, shunt_ohms
        self.kind = chip
        if smbus is None:
            dev = os.path.join(root, f"dev/i2c-{bus}")
            if not os.path.exists(dev):
                raise SensorError(f"ina219: {dev} does not exist (enable I2C; see docs/boards.md)")
            try:
                import smbus2  # optional dependency: pip install smbus2
            except ImportError as e:
                raise SensorError("ina219: the optional package smbus2 is not installed "
                                  "(pip install smbus2)") from e
            try:
                smbus = smbus2.SMBus(bus)
            except OSError as e:
                raise SensorError(f"ina219: cannot open I2C bus {bus}: {e}") from e
        self.smbus = smbus
        self.read_power_w()

    def _word(self, reg: int) -> int:
        try:
            hi, lo = self.smbus.read_i2c_block_data(self.address, reg, 2)
        except OSError as e:
            raise SensorError(f"{self.chip}: I2C read of register {reg:#04x} at "
                              f"{self.address:#04x} failed: {e}") from e
        return (hi << 8) | lo

    @staticmethod
    def _signed(w: int) -> int:
        return w - 0x10000 if w & 0x8000 else w

    def read_bus_voltage_v(self) -> float:
        w = self._word(0x02)
        return (w >> 3) * 4e-3 if self.chip == "ina219" else w * 1.25e-3

    def read_current_a(self) -> float:
        if self.chip == "ina219":
            return self._signed(self._word(0x01)) * 10e-6 / self.shunt_ohms
        return self._signed(self._word(0x01)) * 1.25e-3

    def read_power_w(self) -> float:
        if self.chip == "ina260":
            return self._word(0x03) * 10e-3
        return self.read_bus_voltage_v() * self.read_current_a()

    def describe(self) -> dict:
        return {"kind": self.chip, "bus": self.bus_no, "address": self.address,
                "shunt_ohms": self.shunt_ohms}
