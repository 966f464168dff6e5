"""The fleet: N clients with a device mix, availability, energy budgets and a straggler deadline.

Every decision is seeded and every dropout has a reason (``clients.csv``):

* **availability** — each sampled client is online with probability ``availability``; a
  device named in ``charging_only`` (phones) is online only while charging: in its local
  charging window ``charging_window = [start_hour, end_hour)`` (wrapping midnight). Round
  ``r`` happens at hour ``start_hour + (r - 1) · round_hours`` of the run's clock; each client
  has a fixed seeded time-zone offset (whole hours, 0..23), so phones charge at different
  rounds.
* **energy** — ``round_energy_budget_j``: a client whose estimated round energy exceeds it
  drops out (``energy budget``); ``battery_pct``: a device with a battery may spend that
  share of its charge over the whole run; once the next round would exceed what is left it
  drops out (``battery exhausted``). Devices without a battery are not limited by it.
* **deadline** — ``deadline_s``: a client whose estimated round time (compute plus radio)
  exceeds it is a straggler and is dropped before training (its update would come too late;
  the energy it would have spent is not counted).

The device mix assigns ``round(fraction · N)`` clients per device (largest remainders first,
so the counts sum to N), then shuffles the assignment with the seed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class FleetConfig:
    """How the fleet behaves (the ``[fleet]`` table of a run config)."""

    devices: dict[str, float] = field(default_factory=lambda: {"rpi4": 1.0})
    availability: float = 1.0
    charging_only: list[str] = field(default_factory=list)
    charging_window: list[float] = field(default_factory=lambda: [22.0, 7.0])
    round_hours: float = 1.0
    start_hour: float = 0.0
    deadline_s: float | None = None
    round_energy_budget_j: float | None = None
    battery_pct: float | None = None
    radio: str = "wifi"
    workers: int | None = None
    timeout_s: float = 600.0
    boards: list[dict[str, Any]] = field(default_factory=list)
    calibration_repeats: int = 5

    def validate(self) -> FleetConfig:
        """Raise ValueError naming the field when a value is out of range."""
        from hwmodel.profiles import list_profiles

        if not isinstance(self.devices, dict) or not self.devices:
            raise ValueError("fleet.devices: expected a table profile name -> fraction")
        known = list_profiles()
        for name, frac in self.devices.items():
            if name not in known and not str(name).endswith(".toml"):
                raise ValueError(f"fleet.devices: unknown device {name!r}; allowed: "
                                 f"{', '.join(known)} (or a profile .toml path)")
            if isinstance(frac, bool) or not isinstance(frac, (int, float)) or frac < 0:
                raise ValueError(f"fleet.devices.{name}: expected a fraction >= 0, got {frac!r}")
        total = sum(float(f) for f in self.devices.values())
        if not math.isclose(total, 1.0, abs_tol=1e-6):
            raise ValueError(f"fleet.devices: fractions must sum to 1, got {total:g}")
        if not 0.0 < self.availability <= 1.0:
            raise ValueError(f"fleet.availability: expected a probability in (0, 1], got "
                             f"{self.availability!r}")
        for d in self.charging_only:
            if d not in self.devices:
                raise ValueError(f"fleet.charging_only: {d!r} is not in fleet.devices "
                                 f"({', '.join(self.devices)})")
        if len(self.charging_window) != 2 or not all(0 <= h <= 24 for h in self.charging_window):
            raise ValueError("fleet.charging_window: expected [start_hour, end_hour] in 0..24, "
                             f"got {self.charging_window!r}")
        if not self.round_hours > 0:
            raise ValueError(f"fleet.round_hours: expected > 0, got {self.round_hours!r}")
        for name in ("deadline_s", "round_energy_budget_j"):
            v = getattr(self, name)
            if v is not None and not v > 0:
                raise ValueError(f"fleet.{name}: expected a positive number, got {v!r}")
        if self.battery_pct is not None and not 0 < self.battery_pct <= 100:
            raise ValueError(f"fleet.battery_pct: expected a percentage in (0, 100], got "
                             f"{self.battery_pct!r}")
        if self.workers is not None and (isinstance(self.workers, bool) or self.workers < 0):
            raise ValueError(f"fleet.workers: expected an integer >= 0 (0 = in-process), got "
                             f"{self.workers!r}")
        if not self.timeout_s > 0:
            raise ValueError(f"fleet.timeout_s: expected > 0, got {self.timeout_s!r}")
        if isinstance(self.calibration_repeats, bool) or not 1 <= self.calibration_repeats <= 1000:
            raise ValueError(f"fleet.calibration_repeats: expected an integer in 1..1000, got "
                             f"{self.calibration_repeats!r}")
        from .hybrid import parse_boards

        parse_boards(self.boards, "fleet.boards")
        return self


def assign_devices(mix: dict[str, float], n: int, seed: int) -> list[str]:
    """``n`` device names in the proportions of ``mix`` (largest remainder), seeded shuffle."""
    names = list(mix)
    raw = np.array([float(mix[k]) * n for k in names])
    counts = np.floor(raw).astype(int)
    rest = n - counts.sum()
    order = sorted(range(len(names)), key=lambda i: (-(raw[i] - counts[i]), i))
    for i in order[:rest]:
        counts[i] += 1
    devs = [names[i] for i, c in enumerate(counts) for _ in range(c)]
    rng = np.random.default_rng([int(seed), 0xF1EE7])
    return [devs[i] for i in rng.permutation(n)]


@dataclass
class Decision:
    """Whether a sampled client takes part in a round, and why not."""

    client: int
    ok: bool
    reason: str = ""


class Fleet:
    """The clients' devices and the state that persists across rounds (battery left)."""

    def __init__(self, config: FleetConfig, num_clients: int, seed: int,
                 fixed_devices: list[str] = ()) -> None:
        """``fixed_devices``: the classes of the first clients (a hybrid run's boards); the
        device mix is assigned to the others."""
        self.config = config.validate()
        self.n = int(num_clients)
        self.seed = int(seed)
        fixed = list(fixed_devices)
        if len(fixed) > self.n:
            raise ValueError(f"fleet: {len(fixed)} boards for {self.n} clients")
        self.devices = fixed + assign_devices(config.devices, self.n - len(fixed), seed)
        rng = np.random.default_rng([self.seed, 0x7153])
        self.tz_offset = rng.integers(0, 24, size=self.n).tolist()
        self.battery_left_j: list[float | None] = [self._battery_j(d) for d in self.devices]

    def _battery_j(self, device: str) -> float | None:
        if self.config.battery_pct is None:
            return None
        from .clients import _cached_profile

        wh = _cached_profile(device).battery_wh
        return None if wh is None else float(wh) * 3600.0 * self.config.battery_pct / 100.0

    # ------------------------------------------------------------------ decisions
    def hour(self, rnd: int, client: int) -> float:
        """The client's local hour of day at round ``rnd``."""
        c = self.config
        return (c.start_hour + (rnd - 1) * c.round_hours + self.tz_offset[client]) % 24.0

    def charging(self, rnd: int, client: int) -> bool:
        a, b = self.config.charging_window
        h = self.hour(rnd, client)
        return (a <= h < b) if a <= b else (h >= a or h < b)

    def availability(self, rnd: int, sampled: list[int], rng: np.random.Generator) -> list[Decision]:
        """Online or not, for each sampled client (one uniform draw per client, in order)."""
        draws = rng.random(len(sampled))
        out = []
        for c, u in zip(sampled, draws, strict=True):
            dev = self.devices[c]
            if dev in self.config.charging_only and not self.charging(rnd, c):
                a, b = self.config.charging_window
                out.append(Decision(c, False, f"not charging: local hour {self.hour(rnd, c):g} "
                                    f"outside the charging window [{a:g}, {b:g})"))
            elif u >= self.config.availability:
                out.append(Decision(c, False, f"unavailable (availability "
                                    f"{self.config.availability:g})"))
            else:
                out.append(Decision(c, True))
        return out

    def budget_check(self, client: int, est: dict[str, Any]) -> Decision:
        """Deadline, per-round energy budget and battery for an estimated round."""
        c = self.config
        if c.deadline_s is not None and est["time_s"] > c.deadline_s:
            return Decision(client, False, f"straggler: estimated {est['time_s']:.3g} s > "
                            f"deadline {c.deadline_s:g} s")
        if c.round_energy_budget_j is not None and est["energy_j"] > c.round_energy_budget_j:
            return Decision(client, False, f"energy budget: estimated {est['energy_j']:.3g} J > "
                            f"{c.round_energy_budget_j:g} J per round")
        left = self.battery_left_j[client]
        if left is not None and est["energy_j"] > left:
            return Decision(client, False, f"battery exhausted: {left:.3g} J left of the "
                            f"{c.battery_pct:g}% budget, round needs {est['energy_j']:.3g} J")
        return Decision(client, True)

    def spend(self, client: int, energy_j: float) -> None:
        """Charge a client's battery budget for a round it trained."""
        if self.battery_left_j[client] is not None:
            self.battery_left_j[client] = float(self.battery_left_j[client]) - float(energy_j)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {"battery_left_j": list(self.battery_left_j)}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        b = d.get("battery_left_j")
        if not isinstance(b, list) or len(b) != self.n:
            raise ValueError(f"fleet state: battery_left_j must list {self.n} values")
        self.battery_left_j = [None if v is None else float(v) for v in b]


__all__ = ["Decision", "Fleet", "FleetConfig", "assign_devices"]
