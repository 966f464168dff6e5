"""Hybrid fleets: real boards (or emulated ones) training beside simulated clients.

A run config lists its boards as an array of tables::

    [[fleet.boards]]
    port = "/dev/ttyUSB0"      # a serial port, "socket://HOST:PORT", or "emulate"
    device = "rpi4"            # the board's device class ("" = guessed from its INFO)
    every_round = true         # train every round (else sampled like any client)
    data = ""                  # a shard already on the board (LOAD_DATA'd or under the
                               # agent's --data-root); "" = the host sends its partition

``port = "emulate"`` starts the real board agent on a pseudo-terminal on this host, without
any profile-driven slow-down: its times are the host's (``measured-emulated``) and its class
defaults to what its INFO says (``generic-x86`` on a PC), so a calibration from it describes
this host, never a board it is not.

Before round 1, :class:`BoardSet` probes every board (HELLO, pairing, INFO) and BENCHes the
run's model on it layer by layer (the per-layer micro-benchmarks of ``sparsefl board
bench``), then fits one profile per device class to the measurements of that class's boards
(:func:`hwmodel.calibration.calibrate`). That profile prices the simulated clients of the same
class (``calibrated-estimate``) and each board's own rounds (``est_time_s``), which the report
sets beside the time **measured** on the board for whole TRAIN rounds: the estimate comes
from micro-benchmarks, the measurement from training, so the comparison is not circular.
The calibrated profiles are written to ``calibration/<device>.toml`` (the raw BENCH
measurements beside them, ``<device>-measurements.csv``) and the boards to
``boards.json`` in the run directory; a resumed run reloads the profiles instead of
re-benchmarking, so its estimates are the same numbers.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

EMULATE = "emulate"
#: the keys of a ``[[fleet.boards]]`` table and their types
BOARD_KEYS: dict[str, type] = {"port": str, "device": str, "baud": int, "token_file": str,
                               "every_round": bool, "train_timeout_s": float, "data": str}
_TYPE_NAMES = {str: "a string", int: "an integer", bool: "true or false", float: "a number"}


@dataclass
class BoardConfig:
    """One ``[[fleet.boards]]`` entry."""

    port: str
    device: str = ""
    baud: int = 921600
    token_file: str = ""
    every_round: bool = True
    train_timeout_s: float = 600.0
    data: str = ""

    @property
    def emulate(self) -> bool:
        return self.port == EMULATE


def parse_boards(entries: Any, where: str = "fleet.boards") -> list[BoardConfig]:
    """Validate the ``[[fleet.boards]]`` tables; a ValueError names the entry and the key."""
    from hwmodel.profiles import list_profiles

    if not isinstance(entries, list):
        raise ValueError(f"{where}: expected an array of tables ([[fleet.boards]]), got "
                         f"{type(entries).__name__}")
    out = []
    for i, e in enumerate(entries):
        w = f"{where}[{i}]"
        if not isinstance(e, dict):
            raise ValueError(f"{w}: expected a table with port = ..., got {type(e).__name__}")
        unknown = sorted(set(e) - set(BOARD_KEYS))
        if unknown:
            raise ValueError(f"{w}: unknown key(s) {unknown}; allowed: {', '.join(BOARD_KEYS)}")
        if "port" not in e:
            raise ValueError(f"{w}: missing key 'port' (a serial port such as /dev/ttyUSB0, "
                             f"socket://HOST:PORT, or \"{EMULATE}\")")
        vals = {}
        for k, v in e.items():
            t = BOARD_KEYS[k]
            if t is float and isinstance(v, int) and not isinstance(v, bool):
                v = float(v)
            if not isinstance(v, t) or (t is not bool and isinstance(v, bool)):
                raise ValueError(f"{w}.{k}: expected {_TYPE_NAMES[t]}, got {v!r}")
            vals[k] = v
        b = BoardConfig(**vals)
        if not b.port:
            raise ValueError(f"{w}.port: empty")
        if b.device and b.device not in list_profiles() and not b.device.endswith(".toml"):
            raise ValueError(f"{w}.device: unknown device class {b.device!r}; allowed: "
                             f"{', '.join(list_profiles())}")
        if b.baud <= 0 or b.train_timeout_s <= 0:
            raise ValueError(f"{w}: baud and train_timeout_s must be positive")
        out.append(b)
    ports = [b.port for b in out if not b.emulate]
    dup = sorted({p for p in ports if ports.count(p) > 1})
    if dup:
        raise ValueError(f"{where}: port(s) {dup} listed twice")
    return out


@dataclass
class BoardRecord:
    """What ``boards.json`` says about one board of the run."""

    client_id: str
    board_uuid: str
    port: str
    device: str
    emulated: bool
    sensor: str | None
    calibrated_profile: str | None = None
    calibration: dict[str, Any] = field(default_factory=dict)


def sparsities_of(strategy: dict[str, Any]) -> list[float]:
    """The sparsities a calibration should cover for a strategy table (dense always)."""
    s = {0.0}
    if "sparsity" in strategy:
        s.add(float(strategy["sparsity"]))
    if "density" in strategy:
        s.add(round(1.0 - float(strategy["density"]), 6))
    return sorted(s)


class BoardSet:
    """The boards of a run: started (emulated ones), probed, calibrated, and released.

    ``start()`` raises :class:`~fl_core.board_client.BoardError` naming the board when one
    cannot be reached before round 1 (a run should not start without a board it lists);
    afterwards a board that fails is a failed client of that round and is reconnected on the
    next. ``close()`` stops the emulated agents and closes every link.
    """

    def __init__(self, configs: list[BoardConfig], *, log: Any = None,
                 calibration_repeats: int = 5) -> None:
        self.configs = list(configs)
        self.log = log or (lambda s: print(f"sparsefl: {s}", file=sys.stderr, flush=True))
        self.calibration_repeats = int(calibration_repeats)
        self.emulators: list[Any] = []
        self.clients: list[Any] = []
        self.devices: list[str] = []
        self.profiles: dict[str, Any] = {}      # device class -> calibrated DeviceProfile
        self.calibration: dict[str, dict[str, Any]] = {}
        #: the raw BENCH measurements per device class (kept beside the fitted profile)
        self.measurements: dict[str, list[Any]] = {}
        self._calibrated_for: tuple | None = None
        self.started = False

    def __len__(self) -> int:
        return len(self.configs)

    # ------------------------------------------------------------------ lifecycle
    def start(self, client_ids: list[str] | None = None) -> None:
        """Start the emulated agents, then connect (probe) every board."""
        from .board_client import BoardClient, BoardError, EmulatedBoard, guess_profile

        if self.started:
            return
        ids = client_ids or [f"board{i}" for i in range(len(self.configs))]
        try:
            for i, b in enumerate(self.configs):
                port = b.port
                if b.emulate:
                    emu = EmulatedBoard(profile=None)
                    self.emulators.append(emu)
                    port = emu.path
                bc = BoardClient(port, client_id=ids[i], baud=b.baud,
                                 token_file=b.token_file or None,
                                 train_timeout=b.train_timeout_s, log=self.log)
                try:
                    info = bc.connect()
                except BoardError as e:
                    raise BoardError(f"[fleet.boards][{i}] port {b.port!r}: {e}") from None
                dev = b.device or guess_profile(info)
                bc.device = dev
                self.clients.append(bc)
                self.devices.append(dev)
                kind = "emulated board" if bc.emulated else "board"
                self.log(f"{kind} {bc.board_uuid} on {port}: {info.get('board_model') or '?'}, "
                         f"class {dev}, sensor {_sensor(info) or 'none'}")
        except BaseException:
            self.close()
            raise
        self.started = True

    def close(self) -> None:
        """Close every link and stop the emulated agents (safe to call twice)."""
        for bc in self.clients:
            try:
                bc.close()
            except Exception:  # noqa: BLE001 - releasing: keep going
                pass
        for emu in self.emulators:
            try:
                emu.close()
            except Exception:  # noqa: BLE001
                pass
        self.emulators.clear()
        self.started = False

    def __enter__(self) -> BoardSet:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ calibration
    def calibrate(self, spec: Any, sparsities: list[float], batch: int,
                  threads: int) -> dict[str, Any]:
        """BENCH ``spec`` on every board and fit one profile per device class.

        Done once per (model, sparsities, batch, threads): runs that share this BoardSet (a
        comparison of strategies) share the calibration."""
        from hwmodel.calibration import calibrate
        from hwmodel.profiles import load_profile

        key = (spec.to_json(), tuple(sparsities), int(batch), int(threads))
        if self._calibrated_for == key:
            return self.profiles
        by_class: dict[str, list[Any]] = {}
        uuids: dict[str, list[str]] = {}
        for bc, dev in zip(self.clients, self.devices, strict=True):
            self.log(f"calibrating class {dev}: BENCH {spec.name} on board {bc.board_uuid} at "
                     f"sparsities {', '.join(f'{s:g}' for s in sparsities)}")
            rep = bc.bench(spec, list(sparsities), batch=batch,
                           repeats=self.calibration_repeats, threads=threads)
            by_class.setdefault(dev, []).extend(rep["measurements"])
            uuids.setdefault(dev, []).append(str(bc.board_uuid))
        profiles = {}
        self.measurements = by_class
        for dev, ms in by_class.items():
            base = load_profile(dev)
            emulated = any(bc.emulated for bc, d in zip(self.clients, self.devices, strict=True)
                           if d == dev)
            fitted = calibrate(base, ms)
            how = " (emulated boards: this host's timings)" if emulated else ""
            profiles[dev] = dataclasses.replace(
                fitted, name=f"{base.name}-calibrated",
                description=f"{base.description} — calibrated on board(s) "
                f"{', '.join(uuids[dev])}{how} from {len(ms)} per-layer BENCH measurements of "
                f"{spec.name}")
            self.calibration[dev] = {"n_measurements": len(ms), "models": [spec.name],
                                     "sparsities": [float(s) for s in sparsities],
                                     "batch": int(batch), "threads": int(threads),
                                     "boards": uuids[dev]}
        self.profiles = profiles
        self._calibrated_for = key
        return profiles

    def save(self, out_dir: str | Path) -> None:
        """Write ``calibration/<device>.toml`` and ``boards.json`` into the run directory."""
        from hwmodel.measure import to_csv
        from hwmodel.profiles import profile_to_toml

        from .runlog import atomic_write_text

        out = Path(out_dir)
        (out / "calibration").mkdir(parents=True, exist_ok=True)
        for dev, prof in self.profiles.items():
            atomic_write_text(out / "calibration" / f"{_safe(dev)}.toml", profile_to_toml(prof))
            if self.measurements.get(dev):
                atomic_write_text(out / "calibration" / f"{_safe(dev)}-measurements.csv",
                                  to_csv(self.measurements[dev]))
        atomic_write_text(out / "boards.json", json.dumps(
            [dataclasses.asdict(r) for r in self.records()], indent=1) + "\n")

    def load(self, out_dir: str | Path) -> dict[str, Any]:
        """Reload the calibrated profiles of a run directory (resume: no new BENCH)."""
        from hwmodel.profiles import load_profile

        out = Path(out_dir)
        profiles = {}
        for dev in sorted(set(self.devices)):
            p = out / "calibration" / f"{_safe(dev)}.toml"
            if not p.is_file():
                raise FileNotFoundError(f"{p}: the calibration of device class {dev!r} is "
                                        "missing from the run directory")
            profiles[dev] = load_profile(p)
        try:
            old = json.loads((out / "boards.json").read_text())
            self.calibration = {r["device"]: r.get("calibration", {}) for r in old}
        except (OSError, ValueError, KeyError, TypeError):
            self.calibration = {}
        self.profiles = profiles
        return profiles

    def data_ref(self, i: int) -> str | None:
        """The on-board shard board ``i`` trains on (None: the host's partition is sent)."""
        return self.configs[i].data or None

    def records(self) -> list[BoardRecord]:
        return [BoardRecord(bc.client_id, str(bc.board_uuid), bc.port, dev, bool(bc.emulated),
                            _sensor(bc.info),
                            f"calibration/{_safe(dev)}.toml" if dev in self.profiles else None,
                            dict(self.calibration.get(dev, {})))
                for bc, dev in zip(self.clients, self.devices, strict=True)]

    # ------------------------------------------------------------------ clients
    def attach(self, shards: list[tuple[np.ndarray, np.ndarray]]) -> list[Any]:
        """Give each board its shard (uploaded at its first round) and its calibrated profile;
        returns the board clients in config order."""
        for bc, dev, b, (x, y) in zip(self.clients, self.devices, self.configs, shards,
                                      strict=True):
            if not b.data:
                bc.set_data(bc.client_id, x, y)
            bc.profile = self.profiles.get(dev, dev)
        return list(self.clients)


def _sensor(info: dict) -> str | None:
    """The kind of the board's power sensor from its INFO (None without one)."""
    ss = [s for s in info.get("sensors") or [] if isinstance(s, dict)]
    return str(ss[0].get("kind")) if ss else None


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)


__all__ = ["BOARD_KEYS", "EMULATE", "BoardConfig", "BoardRecord", "BoardSet", "parse_boards",
           "sparsities_of"]
