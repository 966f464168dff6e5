"""Linux RAPL powercap energy counters (Intel, and AMD through the same interface).

Layout::

    /sys/class/powercap/intel-rapl:0/name                 package-0
    /sys/class/powercap/intel-rapl:0/energy_uj            cumulative µJ, wraps
    /sys/class/powercap/intel-rapl:0/max_energy_range_uj  wrap point
    /sys/class/powercap/intel-rapl:0:0/name               core   (sub-zone of package-0)
    /sys/class/powercap/intel-rapl:0:2/name               dram   (not part of the package)
    /sys/class/powercap/intel-rapl:1/name                 psys   (whole platform, if present)

The counter runs in [0, max_energy_range_uj) and wraps to 0, so a decrease means one
wrap: delta = cur + max_energy_range_uj - prev (sampled often enough for one wrap at most).

Total = ``psys`` when present (it covers everything), else the sum of the ``package-N`` zones
and their ``dram`` sub-zones; ``core``/``uncore`` are inside the package and never added.
Since Linux 5.10 ``energy_uj`` is readable by root only unless permissions are changed.
"""

from __future__ import annotations

import glob
import os
import re
import threading

from .base import PowerSensor, SensorError, counter_delta


def _read_int(path: str) -> int:
    try:
        with open(path) as f:
            s = f.read().strip()
    except PermissionError as e:
        raise SensorError(f"rapl: cannot read {path}: permission denied (energy_uj is root-only "
                          "since Linux 5.10; see docs/boards.md)") from e
    try:
        return int(s)
    except ValueError as e:
        raise SensorError(f"rapl: {path}: expected an integer, got {s!r}") from e


class RaplSensor(PowerSensor):
    """Cumulative energy (J) of the selected RAPL zones, corrected for counter wraparound."""

    kind = "rapl"
    cumulative = True

    def __init__(self, root: str = "/") -> None:
        base = os.path.join(root, "sys/class/powercap")
        zones = {}
        for d in sorted(glob.glob(os.path.join(base, "intel-rapl:*"))):
            m = re.fullmatch(r"intel-rapl:(\d+)(?::(\d+))?", os.path.basename(d))
            if not m or not os.path.exists(os.path.join(d, "energy_uj")):
                continue
            try:
                with open(os.path.join(d, "name")) as f:
                    name = f.read().strip()
            except OSError:
                continue
            zones[os.path.basename(d)] = (name, m.group(2) is not None, d)
        if not zones:
            raise SensorError(f"rapl: no intel-rapl zones under {base}")
        psys = [d for (name, sub, d) in zones.values() if name == "psys" and not sub]
        if psys:
            chosen = psys[:1]
        else:
            chosen = [d for (name, sub, d) in zones.values()
                      if (not sub and name.startswith("package")) or (sub and name == "dram")]
        if not chosen:
            raise SensorError(f"rapl: no package/psys zone under {base}: "
                              f"{sorted(n for n, _, _ in zones.values())}")
        self.zones = chosen
        self.names = [zones[os.path.basename(d)][0] for d in chosen]
        self._max = [_read_int(os.path.join(d, "max_energy_range_uj")) for d in chosen]
        self._last = [_read_int(os.path.join(d, "energy_uj")) for d in chosen]
        self._acc_uj = 0
        self._lock = threading.Lock()

    def read_energy_j(self) -> float:
        with self._lock:
            for k, d in enumerate(self.zones):
                cur = _read_int(os.path.join(d, "energy_uj"))
                prev, mx = self._last[k], self._max[k]
                self._acc_uj += counter_delta(prev, cur, mx)
                self._last[k] = cur
            return self._acc_uj / 1e6

    def describe(self) -> dict:
        return {"kind": self.kind, "zones": self.names}
