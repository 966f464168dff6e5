"""Strategy: the server half of a method — a small abstract base with a few hooks (Flower-style).

A strategy owns the global model (weights, masks) and its own state (momentum, schedules).
Each round the federation loop asks it to ``configure_fit`` the sampled clients (one
``embedded.ClientTask`` each, built from the hooks ``plan_for``, ``uplink_for``,
``schedule_for``, ``train_config``), runs the tasks, and hands the successful results to
``aggregate_fit``. Subclasses override the hooks and ``aggregate_fit``; everything a checkpoint
needs comes out of ``state_dict()`` and goes back in through ``load_state_dict()`` (JSON-able
metadata plus named numpy arrays — never pickle).

Additions over the first sketch (all additive; the hooks and signatures above are unchanged):

* ``configure_fit`` may return tasks for a *subset* of the clients it is given (FLASH's
  sparsity-hunting round trains only a fraction of them); each task names its client, and the
  tasks come in the order of ``participants(rnd, clients)`` — the hook a loop calls first to
  know who trains (the base returns every client), so it can pair clients and tasks.
  ``initialize()`` is called lazily by ``configure_fit`` if the loop did not call it.
* Rounds are counted from 1 (``FIRST_ROUND``); round-level schedules use ``t = rnd - 1``.
* ``check_result(client, result)`` -> ``None`` or the reason an update is rejected (failed,
  undecodable, wrong tensor names or shapes, non-finite values): the loop records such a client
  as failed and leaves it out of ``aggregate_fit``, which raises :class:`UpdateRejected` on a bad
  one. Loops should use it rather than decoding themselves: hetero-FLASH clients decode against
  their own nested masks (``masks_for(client)``), not ``self.masks``.
* ``decode_result`` / ``decode_results`` give ``embedded.uplink.Update`` objects checked against
  the model; ``reference_state()`` is the global state exactly as clients decode it (diff
  updates are relative to it).
* ``lr_at(rnd)``: the per-round exponential LR of ZeroFL/FLASH (``embedded.optim.exp_decay_lr``).
* ``params()``: the keyword parameters a strategy accepts (``make_strategy`` validates against it).
* ``state_dict`` carries subclass state through ``_extra_state`` / ``_load_extra_state``
  (JSON metadata under ``"extra"``, arrays under ``"x/<name>"``).
"""

from __future__ import annotations

import inspect
import math
import zlib
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import numpy as np

from embedded import codec
from embedded.mask_schedule import MaskSchedule
from embedded.optim import exp_decay_lr
from embedded.task import ClientResult, ClientTask
from embedded.train import TrainConfig
from embedded.uplink import Update, UplinkRule, decode_update, encode_masks
from hwmodel import ModelSpec, SparsityPlan

from .aggregation import is_running_stat, is_server_owned, sample_weights, weighted_mean

FIRST_ROUND = 1
DOWNLINK_DTYPES = ("f32", "f16")


class UpdateRejected(ValueError):
    """A client's update cannot be aggregated (the message names the client and the reason)."""


@dataclass(frozen=True)
class ClientInfo:
    """What the server knows about a client when it configures a round."""

    client_id: str
    device: str = "generic-x86"          # device profile name
    num_samples: int = 0
    density_budget: float | None = None  # hetero-FLASH: this client's weight-density budget
    energy_budget_j: float | None = None


class Strategy(ABC):
    """Base of every method. Parameters are validated in ``__init__`` (clear errors)."""

    name: ClassVar[str] = "base"

    def __init__(self, spec: ModelSpec, *, rounds: int, seed: int = 0,
                 train: TrainConfig | None = None, downlink_dtype: str = "f32") -> None:
        if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
            raise ValueError(f"{self.name}: rounds must be a positive integer, got {rounds!r}")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"{self.name}: seed must be a non-negative integer, got {seed!r}")
        if train is not None and not isinstance(train, TrainConfig):
            raise ValueError(f"{self.name}: train must be an embedded.train.TrainConfig, "
                             f"got {type(train).__name__}")
        if downlink_dtype not in DOWNLINK_DTYPES:
            raise ValueError(f"{self.name}: downlink_dtype must be one of {DOWNLINK_DTYPES}, "
                             f"got {downlink_dtype!r}")
        self.spec = spec
        self.rounds = rounds
        self.seed = int(seed)
        self.train = train if train is not None else TrainConfig()
        self.downlink_dtype = downlink_dtype
        self.weights: dict[str, np.ndarray] = {}
        self.masks: dict[str, np.ndarray] | None = None

    # ------------------------------------------------------------------ lifecycle
    def initialize(self) -> None:
        """Initial global weights (the Numba network's init for ``seed``) and masks."""
        from embedded.network import Network

        self.weights = Network.from_spec(self.spec, seed=self.seed).state_dict()
        self.masks = None

    @classmethod
    def params(cls) -> dict[str, Any]:
        """Keyword parameters this strategy accepts beyond the base ones, with defaults."""
        out: dict[str, Any] = {}
        for klass in reversed(cls.__mro__):
            init = klass.__dict__.get("__init__")
            if init is None or klass is Strategy or klass is object:
                continue
            for p in inspect.signature(init).parameters.values():
                if p.kind is p.KEYWORD_ONLY and p.name not in _BASE_PARAMS:
                    out[p.name] = p.default
        return out

    # ------------------------------------------------------------------ hooks
    def plan_for(self, rnd: int, client: ClientInfo) -> SparsityPlan:
        """The SparsityPlan this client trains under in round ``rnd``."""
        return SparsityPlan.dense()

    def uplink_for(self, rnd: int, client: ClientInfo) -> UplinkRule:
        return UplinkRule("dense")

    def schedule_for(self, rnd: int, client: ClientInfo) -> MaskSchedule:
        return MaskSchedule()

    def train_config(self, rnd: int, client: ClientInfo) -> TrainConfig:
        """Local hyper-parameters for round ``rnd`` (round-level LR schedules live here)."""
        return self.train

    def lr_at(self, rnd: int, lr_start: float, lr_end: float | None,
              horizon: int | None = None) -> float:
        """``lr_start · (lr_end/lr_start) ** (t/T)`` with ``t = rnd - 1``, ``T = horizon or
        rounds``; constant ``lr_start`` when ``lr_end`` is None."""
        if lr_end is None:
            return float(lr_start)
        t = max(0, rnd - FIRST_ROUND)
        return exp_decay_lr(lr_start, lr_end, t, horizon if horizon is not None else self.rounds)

    def client_seed(self, rnd: int, client: ClientInfo) -> int:
        """A seed per (run seed, round, client), stable across processes and restarts."""
        return zlib.crc32(f"{self.seed}/{rnd}/{client.client_id}".encode()) & 0x7FFFFFFF

    # ------------------------------------------------------------------ round
    def encode_global(self) -> tuple[bytes, bytes | None]:
        """The downlink: global state frame and (if any) the 1-bit mask frame."""
        state = codec.encode_state(self.weights, "best", dtype=self.downlink_dtype)
        masks = encode_masks(self.masks) if self.masks is not None else None
        return state, masks

    def reference_state(self) -> dict[str, np.ndarray]:
        """The global state as the clients decode it (f16 downlinks round the weights)."""
        if self.downlink_dtype == "f32":
            return self.weights
        return codec.decode_state(codec.encode_state(self.weights, "dense32",
                                                     dtype=self.downlink_dtype))

    def participants(self, rnd: int, clients: list[ClientInfo]) -> list[ClientInfo]:
        """The clients (of those offered) that get a task in round ``rnd``, in task order."""
        return list(clients)

    def configure_fit(self, rnd: int, clients: list[ClientInfo]) -> list[ClientTask]:
        """One task per sampled client."""
        if not self.weights:
            self.initialize()
        state, masks = self.encode_global()
        return [
            ClientTask(round=rnd, client_id=c.client_id, seed=self.client_seed(rnd, c),
                       spec=self.spec, global_state=state, train=self.train_config(rnd, c),
                       plan=self.plan_for(rnd, c), uplink=self.uplink_for(rnd, c),
                       schedule=self.schedule_for(rnd, c), global_masks=masks)
            for c in clients
        ]

    # ------------------------------------------------------------------ decoding
    def masks_for(self, client: ClientInfo) -> dict[str, np.ndarray] | None:
        """The masks this client received this round (hetero-FLASH: its nested masks)."""
        return self.masks

    def decode_result(self, client: ClientInfo, result: ClientResult) -> Update:
        """Decode a result's update and check it against the model; raise UpdateRejected."""
        who = f"client {client.client_id!r}"
        if not result.ok:
            raise UpdateRejected(f"{who}: the client failed ({result.error})")
        try:
            upd = decode_update(result.update, shapes=self.spec.state_shapes(),
                                global_masks=self.masks_for(client))
        except ValueError as e:
            raise UpdateRejected(f"{who}: undecodable update ({e})") from None
        shapes = {k: np.shape(v) for k, v in self.weights.items()}
        extra = sorted(set(upd.tensors) - set(shapes))
        if extra:
            raise UpdateRejected(f"{who}: update has tensor(s) not in the model: {extra}")
        missing = sorted(k for k in shapes if not is_server_owned(k) and k not in upd.tensors)
        if missing:
            raise UpdateRejected(f"{who}: update lacks tensor(s) {missing}")
        for k, t in upd.tensors.items():
            if tuple(np.shape(t)) != tuple(shapes[k]):
                raise UpdateRejected(f"{who}: {k!r} has shape {tuple(np.shape(t))}, "
                                     f"expected {tuple(shapes[k])}")
            if np.asarray(t).dtype.kind == "f" and not np.isfinite(t).all():
                raise UpdateRejected(f"{who}: {k!r} holds NaN or infinite values")
        if upd.masks is not None:
            for layer, m in upd.masks.items():
                if tuple(m.shape) != tuple(shapes.get(f"{layer}.weight", ())):
                    raise UpdateRejected(f"{who}: mask of {layer!r} has shape {m.shape}")
        return upd

    def check_result(self, client: ClientInfo, result: ClientResult) -> str | None:
        """``None`` if the result can be aggregated, else the reason it is rejected."""
        try:
            self.decode_result(client, result)
        except UpdateRejected as e:
            return str(e)
        return None

    def decode_results(self, results: list[tuple[ClientInfo, ClientResult]]
                       ) -> list[tuple[ClientInfo, ClientResult, Update]]:
        """Decode every result (raises UpdateRejected on the first bad one)."""
        return [(c, r, self.decode_result(c, r)) for c, r in results]

    def absolute_updates(self, results: list[tuple[ClientInfo, ClientResult]]
                         ) -> tuple[list[tuple[ClientInfo, ClientResult, Update]],
                                    list[dict[str, np.ndarray]], list[int]]:
        """Decoded results, each update as absolute local weights, and their sample counts."""
        dec = self.decode_results(results)
        ref = self.reference_state()
        return dec, [u.absolute(ref) for _, _, u in dec], [r.num_samples for _, r, _ in dec]

    def mean_state(self, updates: list[dict[str, np.ndarray]], num_samples: list[int],
                   param_weights: np.ndarray | None = None,
                   skip: frozenset[str] | set[str] = frozenset()) -> dict[str, np.ndarray]:
        """FedAvg of absolute client states: running stats by the sample-weighted mean, every
        other float tensor by ``param_weights`` (default: sample weights), server-owned tensors
        and ``skip`` kept as the server has them."""
        w_samples = sample_weights(num_samples)
        w_params = w_samples if param_weights is None else param_weights
        out = dict(self.weights)
        for name, cur in self.weights.items():
            if is_server_owned(name) or name in skip or np.asarray(cur).dtype.kind != "f":
                continue
            arrs = [u[name] for u in updates]
            out[name] = weighted_mean(arrs, w_samples if is_running_stat(name) else w_params)
        return out

    @abstractmethod
    def aggregate_fit(self, rnd: int,
                      results: list[tuple[ClientInfo, ClientResult]]) -> dict[str, float]:
        """Fold the successful results of round ``rnd`` into the global model; return metrics."""

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """(JSON-able metadata, named arrays): everything needed to resume bit-exactly."""
        arrays = {f"w/{k}": v for k, v in self.weights.items()}
        if self.masks is not None:
            arrays.update({f"m/{k}": v for k, v in self.masks.items()})
        extra_meta, extra_arrays = self._extra_state()
        arrays.update({f"x/{k}": v for k, v in extra_arrays.items()})
        return {"strategy": self.name, "has_masks": self.masks is not None,
                "extra": extra_meta}, arrays

    def load_state_dict(self, meta: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> None:
        if meta.get("strategy") != self.name:
            raise ValueError(f"checkpoint is for strategy {meta.get('strategy')!r}, "
                             f"not {self.name!r}")
        self.weights = {k[2:]: np.array(v) for k, v in arrays.items() if k.startswith("w/")}
        self.masks = ({k[2:]: np.array(v, dtype=bool) for k, v in arrays.items()
                       if k.startswith("m/")} if meta.get("has_masks") else None)
        self._load_extra_state(dict(meta.get("extra") or {}),
                               {k[2:]: np.array(v) for k, v in arrays.items()
                                if k.startswith("x/")})

    def _extra_state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """Subclass state for checkpoints: (JSON-able metadata, named arrays)."""
        return {}, {}

    def _load_extra_state(self, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        """Inverse of :meth:`_extra_state` (the base has nothing more to restore)."""
        return None

    def with_train(self, **changes: Any) -> TrainConfig:
        """A copy of the base TrainConfig with some fields changed (validated)."""
        return replace(self.train, **changes).validate()


_BASE_PARAMS = ("rounds", "seed", "train", "downlink_dtype")


# ---------------------------------------------------------------------- parameter checks
def check_number(strategy: str, name: str, v: Any, lo: float, hi: float,
                 lo_open: bool = False, hi_open: bool = False) -> float:
    """``v`` as a float in the interval, else a ValueError naming the parameter."""
    ok = isinstance(v, (int, float, np.floating, np.integer)) and not isinstance(v, bool) \
        and math.isfinite(float(v))
    if ok:
        x = float(v)
        ok = (x > lo if lo_open else x >= lo) and (x < hi if hi_open else x <= hi)
    if not ok:
        raise ValueError(f"{strategy}: parameter {name!r} expected a number in "
                         f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}, "
                         f"got {v!r}")
    return float(v)


def check_int(strategy: str, name: str, v: Any, lo: int) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
        raise ValueError(f"{strategy}: parameter {name!r} expected an integer >= {lo}, got {v!r}")
    return int(v)


def check_choice(strategy: str, name: str, v: Any, choices: tuple[str, ...]) -> str:
    if v not in choices:
        raise ValueError(f"{strategy}: parameter {name!r} expected one of {choices}, got {v!r}")
    return str(v)
