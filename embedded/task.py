"""ClientTask / ClientResult: one client's round, serialisable without pickle; ``run_task`` runs it.

Container (both records)::

    0   magic        4 bytes: b"SFCT" (task) or b"SFCR" (result)
    4   version      u16 (= 1)
    6   reserved     u16 (= 0)
    8   header_len   u32   JSON header, UTF-8, at most MAX_HEADER bytes
    12  header       the JSON object (fields below; "blobs": list of blob names in order)
        per blob:    u64 length, then the bytes (at most MAX_BLOB each)

Every length is checked against the limit and the bytes remaining before anything is sliced,
so a malformed or truncated record raises :class:`TaskError` naming the field, never reads out
of bounds and never allocates more than the record's own size.

``run_task`` is the one function a simulated client and the board agent both call. The
task's ``seed`` seeds everything random on the client: the shuffling (``TrainConfig.seed`` is
replaced by it) and the mask schedule's generator (unless the schedule fixes its own seed).
The same task gives bitwise the same update bytes and losses (the timing fields differ).
"""

from __future__ import annotations

import json
import struct
import time
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from hwmodel import ModelSpec, SparsityPlan
from hwmodel.provenance import Provenance
from hwmodel.provenance import tag as _tag

from .mask_schedule import MaskSchedule
from .uplink import UplinkRule, decode_masks

TASK_MAGIC = b"SFCT"
RESULT_MAGIC = b"SFCR"
VERSION = 1
MAX_HEADER = 16 * 1024 * 1024      # a ResNet-18 spec is ~20 kB, TrainStats a few kB
MAX_BLOB = 1 << 31                 # 2 GiB: far above any edge model's state
MAX_BLOBS = 16
_PREFIX = struct.Struct("<4sHHI")


class TaskError(ValueError):
    """A ClientTask / ClientResult record is malformed; the message names the field."""


# ---------------------------------------------------------------------------------- container
def _pack(magic: bytes, header: dict[str, Any], blobs: dict[str, bytes]) -> bytes:
    header = dict(header, blobs=list(blobs))
    hb = json.dumps(header, separators=(",", ":"), sort_keys=True).encode("utf-8")
    if len(hb) > MAX_HEADER:
        raise TaskError(f"header: {len(hb)} bytes exceeds the limit of {MAX_HEADER}")
    parts = [_PREFIX.pack(magic, VERSION, 0, len(hb)), hb]
    for name, b in blobs.items():
        if len(b) > MAX_BLOB:
            raise TaskError(f"blob {name!r}: {len(b)} bytes exceeds the limit of {MAX_BLOB}")
        parts.append(struct.pack("<Q", len(b)))
        parts.append(bytes(b))
    return b"".join(parts)


def _unpack(data: bytes, magic: bytes, what: str) -> tuple[dict[str, Any], dict[str, bytes]]:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TaskError(f"{what}: expected bytes, got {type(data).__name__}")
    mv = memoryview(data).cast("B")
    if len(mv) < _PREFIX.size:
        raise TaskError(f"{what}: {len(mv)} bytes is shorter than the {_PREFIX.size}-byte prefix")
    m, ver, _res, hlen = _PREFIX.unpack_from(mv, 0)
    if m != magic:
        raise TaskError(f"{what}: bad magic {bytes(m)!r}, expected {magic!r}")
    if ver != VERSION:
        raise TaskError(f"{what}: version {ver} is not supported (expected {VERSION})")
    if hlen > MAX_HEADER:
        raise TaskError(f"{what}: header length {hlen} exceeds the limit of {MAX_HEADER}")
    pos = _PREFIX.size
    if pos + hlen > len(mv):
        raise TaskError(f"{what}: header length {hlen} runs past the end ({len(mv)} bytes)")
    try:
        header = json.loads(bytes(mv[pos:pos + hlen]).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TaskError(f"{what}: header is not valid UTF-8 JSON ({e})") from None
    if not isinstance(header, dict):
        raise TaskError(f"{what}: header must be a JSON object")
    pos += hlen
    names = header.pop("blobs", None)
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names) \
            or len(names) > MAX_BLOBS or len(set(names)) != len(names):
        raise TaskError(f"{what}: header field 'blobs' must list at most {MAX_BLOBS} distinct "
                        "blob names")
    blobs: dict[str, bytes] = {}
    for name in names:
        if pos + 8 > len(mv):
            raise TaskError(f"{what}: truncated before the length of blob {name!r}")
        (n,) = struct.unpack_from("<Q", mv, pos)
        pos += 8
        if n > MAX_BLOB:
            raise TaskError(f"{what}: blob {name!r} declares {n} bytes, over the limit "
                            f"{MAX_BLOB}")
        if pos + n > len(mv):
            raise TaskError(f"{what}: blob {name!r} declares {n} bytes but only "
                            f"{len(mv) - pos} remain")
        blobs[name] = bytes(mv[pos:pos + n])
        pos += n
    if pos != len(mv):
        raise TaskError(f"{what}: {len(mv) - pos} trailing bytes after the last blob")
    return header, blobs


def _field(header: dict, key: str, types: type | tuple, what: str, optional: bool = False):
    if key not in header:
        if optional:
            return None
        raise TaskError(f"{what}: missing field {key!r}")
    v = header[key]
    if v is None and optional:
        return None
    if isinstance(v, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise TaskError(f"{what}: field {key!r} has the wrong type (bool)")
    if not isinstance(v, types):
        raise TaskError(f"{what}: field {key!r} has type {type(v).__name__}, expected "
                        f"{getattr(types, '__name__', types)}")
    return v


def _sub(what: str, key: str, fn, value):
    try:
        return fn(value)
    except (ValueError, TypeError, KeyError) as e:
        raise TaskError(f"{what}: field {key!r}: {e}") from None


# ---------------------------------------------------------------------------------- records
@dataclass
class ClientTask:
    """Everything one client needs for one round (see ../shared/ARCHITECTURE.md)."""

    round: int
    client_id: str
    seed: int
    spec: ModelSpec
    global_state: bytes                 # embedded.codec state frame
    train: Any                          # embedded.train.TrainConfig
    plan: SparsityPlan = field(default_factory=SparsityPlan.dense)
    uplink: UplinkRule = field(default_factory=UplinkRule)
    schedule: MaskSchedule = field(default_factory=MaskSchedule)
    global_masks: bytes | None = None   # uplink.encode_masks frame
    data_ref: str | None = None         # a shard name/path on a board; None when x, y are given

    def to_bytes(self) -> bytes:
        header = {"kind": "sparsefl.clienttask", "round": int(self.round),
                  "client_id": str(self.client_id), "seed": int(self.seed),
                  "spec": self.spec.to_dict(), "train": self.train.to_dict(),
                  "plan": self.plan.to_dict(), "uplink": self.uplink.to_dict(),
                  "schedule": self.schedule.to_dict(), "data_ref": self.data_ref}
        blobs = {"global_state": self.global_state}
        if self.global_masks is not None:
            blobs["global_masks"] = self.global_masks
        return _pack(TASK_MAGIC, header, blobs)

    @classmethod
    def from_bytes(cls, data: bytes) -> ClientTask:
        from .train import TrainConfig

        what = "client task"
        h, blobs = _unpack(data, TASK_MAGIC, what)
        if h.get("kind") != "sparsefl.clienttask":
            raise TaskError(f"{what}: header kind {h.get('kind')!r} is not 'sparsefl.clienttask'")
        if "global_state" not in blobs:
            raise TaskError(f"{what}: missing blob 'global_state'")
        unknown = set(blobs) - {"global_state", "global_masks"}
        if unknown:
            raise TaskError(f"{what}: unknown blob(s) {sorted(unknown)}")
        for key in ("spec", "train", "plan", "uplink", "schedule"):
            _field(h, key, dict, what)
        data_ref = _field(h, "data_ref", str, what, optional=True)
        return cls(
            round=_nonneg(_field(h, "round", int, what), "round", what),
            client_id=_field(h, "client_id", str, what),
            seed=_nonneg(_field(h, "seed", int, what), "seed", what),
            spec=_sub(what, "spec", lambda d: ModelSpec.from_dict(d, "task spec"), h["spec"]),
            global_state=blobs["global_state"],
            train=_sub(what, "train", TrainConfig.from_dict, h["train"]),
            plan=_sub(what, "plan", lambda d: SparsityPlan.from_dict(d, "task plan"), h["plan"]),
            uplink=_sub(what, "uplink", UplinkRule.from_dict, h["uplink"]),
            schedule=_sub(what, "schedule", MaskSchedule.from_dict, h["schedule"]),
            global_masks=blobs.get("global_masks"),
            data_ref=data_ref,
        )


@dataclass
class ClientResult:
    """What a client returns: the encoded update, its sample count, stats and tagged costs.

    ``costs``: quantity -> ``{"value", "unit", "provenance"}`` (``time_s``, ``uplink_bytes``,
    ``downlink_bytes``, optionally ``energy_j``). ``error`` is set (and ``update`` empty) when
    the client failed.
    """

    round: int
    client_id: str
    update: bytes = b""
    num_samples: int = 0
    stats: Any = None                   # embedded.train.TrainStats or None
    costs: dict[str, dict[str, Any]] = field(default_factory=dict)
    error: str | None = None
    mask_events: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_bytes(self) -> bytes:
        header = {"kind": "sparsefl.clientresult", "round": int(self.round),
                  "client_id": str(self.client_id), "num_samples": int(self.num_samples),
                  "stats": None if self.stats is None else self.stats.to_dict(),
                  "costs": self.costs, "error": self.error, "mask_events": self.mask_events}
        return _pack(RESULT_MAGIC, header, {"update": self.update})

    @classmethod
    def from_bytes(cls, data: bytes) -> ClientResult:
        what = "client result"
        h, blobs = _unpack(data, RESULT_MAGIC, what)
        if h.get("kind") != "sparsefl.clientresult":
            raise TaskError(f"{what}: header kind {h.get('kind')!r} is not "
                            "'sparsefl.clientresult'")
        if set(blobs) != {"update"}:
            raise TaskError(f"{what}: expected exactly the blob 'update', got {sorted(blobs)}")
        costs = _field(h, "costs", dict, what)
        for q, c in costs.items():
            if not isinstance(c, dict) or set(c) != {"value", "unit", "provenance"} \
                    or not isinstance(c["value"], (int, float)) or isinstance(c["value"], bool):
                raise TaskError(f"{what}: costs[{q!r}] must be {{value, unit, provenance}} "
                                "with a numeric value")
            _sub(what, f"costs[{q!r}].provenance", Provenance.parse, c["provenance"])
        stats = _field(h, "stats", dict, what, optional=True)
        if stats is not None:
            from .train import TrainStats

            stats = _sub(what, "stats", TrainStats.from_dict, stats)
        events = _field(h, "mask_events", list, what, optional=True) or []
        return cls(round=_nonneg(_field(h, "round", int, what), "round", what),
                   client_id=_field(h, "client_id", str, what), update=blobs["update"],
                   num_samples=_nonneg(_field(h, "num_samples", int, what), "num_samples", what),
                   stats=stats, costs=costs,
                   error=_field(h, "error", str, what, optional=True), mask_events=events)


def _nonneg(v: int, key: str, what: str) -> int:
    if v < 0:
        raise TaskError(f"{what}: field {key!r} must be >= 0, got {v}")
    return v


# ---------------------------------------------------------------------------------- running
_NET_CACHE: OrderedDict[str, tuple[Any, dict[str, np.ndarray]]] = OrderedDict()
NET_CACHE_SIZE = 2


def _network_for(spec: ModelSpec) -> tuple[Any, dict[str, np.ndarray]]:
    """The process's Network for ``spec`` (built once; Numba compiles once) + its init state."""
    from .network import Network

    key = spec.to_json()
    hit = _NET_CACHE.get(key)
    if hit is not None:
        _NET_CACHE.move_to_end(key)
        return hit
    net = Network.from_spec(spec, seed=0)
    entry = (net, net.state_dict())
    _NET_CACHE[key] = entry
    while len(_NET_CACHE) > NET_CACHE_SIZE:
        _NET_CACHE.popitem(last=False)
    return entry


def run_task(task: ClientTask, x: np.ndarray, y: np.ndarray,
             provenance: str | Provenance = Provenance.MEASURED_EMULATED,
             raise_errors: bool = False, should_stop=None) -> ClientResult:
    """Run one client's round: load the global model, train, and encode the update.

    ``provenance`` tags ``time_s`` (``measured-emulated`` on a host; the board agent passes
    ``measured``). Byte counts are the real lengths of the payloads (``measured``). A failure
    (bad input, a diverged loss) returns a result with ``error`` set unless ``raise_errors``.
    """
    from embedded import codec as _codec

    from .train import train_local

    prov = Provenance.parse(provenance)
    t0 = time.perf_counter()
    down = len(task.global_state) + len(task.global_masks or b"")
    try:
        net, init_state = _network_for(task.spec)
        shapes = task.spec.param_shapes()
        state = dict(init_state)
        received = _codec.decode_state(task.global_state)
        unknown = set(received) - set(state)
        if unknown:
            raise TaskError(f"global_state: tensor(s) {sorted(unknown)} are not in model "
                            f"{task.spec.name!r}")
        state.update(received)
        net.set_masks({n: None for n in task.spec.weighted_layers()})
        net.load_state_dict(state)
        net.set_plan(task.plan)
        global_masks = None
        if task.global_masks is not None:
            global_masks = decode_masks(task.global_masks,
                                        {n: shapes[f"{n}.weight"]
                                         for n in task.spec.weighted_layers()})
            net.set_masks(global_masks)
        if task.plan.mode == "masked":
            missing = [n for n in task.plan.layers if global_masks is None or n not in global_masks]
            if missing:
                raise TaskError(f"plan mode 'masked' needs a global mask for every sparse layer; "
                                f"missing: {missing}")
        global_state = net.state_dict()  # what training starts from (masked, complete)
        # a fresh copy per run (its events are this run's), seeded from the task by default
        schedule = replace(task.schedule, seed=int(task.seed) if task.schedule.seed is None
                           else task.schedule.seed)
        config = replace(task.train, seed=int(task.seed))
        net.train()
        # the plan and masks are set above: plan=None keeps them (set_plan may reset masks)
        stats = train_local(net, x, y, config, plan=None, mask_schedule=schedule,
                            should_stop=should_stop)
        local_masks = net.get_masks() if task.plan.mode == "masked" else None
        update = task.uplink.make_update(net.state_dict(), global_state, task.plan,
                                         global_masks=global_masks, local_masks=local_masks)
    except Exception as e:  # noqa: BLE001 - a client reports its failure, it does not crash
        if raise_errors:
            raise
        wall = time.perf_counter() - t0
        return ClientResult(task.round, task.client_id, b"", 0, None,
                            {"time_s": _tag(wall, "s", prov),
                             "uplink_bytes": _tag(0, "B", Provenance.MEASURED),
                             "downlink_bytes": _tag(down, "B", Provenance.MEASURED)},
                            error=f"{type(e).__name__}: {e}")
    wall = time.perf_counter() - t0
    costs = {"time_s": _tag(wall, "s", prov),
             "uplink_bytes": _tag(len(update), "B", Provenance.MEASURED),
             "downlink_bytes": _tag(down, "B", Provenance.MEASURED)}
    return ClientResult(task.round, task.client_id, update, int(len(y)), stats, costs,
                        mask_events=list(schedule.events))


__all__ = ["ClientResult", "ClientTask", "TaskError", "run_task"]
