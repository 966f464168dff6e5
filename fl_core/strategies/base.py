"""Strategy: the server half of a method — a small abstract base with a few hooks (Flower-style).

A strategy owns the global model (weights, masks) and its own state (momentum, schedules).
Each round the federation loop asks it to ``configure_fit`` the sampled clients (one
``embedded.ClientTask`` each, built from the hooks ``plan_for``, ``uplink_for``,
``schedule_for``, ``train_config``), runs the tasks, and hands the successful results to
``aggregate_fit``. Subclasses override the hooks and ``aggregate_fit``; everything a checkpoint
needs comes out of ``state_dict()`` and goes back in through ``load_state_dict()`` (JSON-able
metadata plus named numpy arrays — never pickle).
"""

from __future__ import annotations

import zlib
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import numpy as np

from embedded import codec
from embedded.mask_schedule import MaskSchedule
from embedded.task import ClientResult, ClientTask
from embedded.train import TrainConfig
from embedded.uplink import UplinkRule, encode_masks
from hwmodel import ModelSpec, SparsityPlan


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
        if not isinstance(rounds, int) or rounds < 1:
            raise ValueError(f"{self.name}: rounds must be a positive integer, got {rounds!r}")
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

    def client_seed(self, rnd: int, client: ClientInfo) -> int:
        """A seed per (run seed, round, client), stable across processes and restarts."""
        return zlib.crc32(f"{self.seed}/{rnd}/{client.client_id}".encode()) & 0x7FFFFFFF

    # ------------------------------------------------------------------ round
    def encode_global(self) -> tuple[bytes, bytes | None]:
        """The downlink: global state frame and (if any) the 1-bit mask frame."""
        state = codec.encode_state(self.weights, "best", dtype=self.downlink_dtype)
        masks = encode_masks(self.masks) if self.masks is not None else None
        return state, masks

    def configure_fit(self, rnd: int, clients: list[ClientInfo]) -> list[ClientTask]:
        """One task per sampled client."""
        state, masks = self.encode_global()
        return [
            ClientTask(round=rnd, client_id=c.client_id, seed=self.client_seed(rnd, c),
                       spec=self.spec, global_state=state, train=self.train_config(rnd, c),
                       plan=self.plan_for(rnd, c), uplink=self.uplink_for(rnd, c),
                       schedule=self.schedule_for(rnd, c), global_masks=masks)
            for c in clients
        ]

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
        return {"strategy": self.name, "has_masks": self.masks is not None}, arrays

    def load_state_dict(self, meta: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> None:
        if meta.get("strategy") != self.name:
            raise ValueError(f"checkpoint is for strategy {meta.get('strategy')!r}, "
                             f"not {self.name!r}")
        self.weights = {k[2:]: np.array(v) for k, v in arrays.items() if k.startswith("w/")}
        self.masks = ({k[2:]: np.array(v, dtype=bool) for k, v in arrays.items()
                       if k.startswith("m/")} if meta.get("has_masks") else None)

    def with_train(self, **changes: Any) -> TrainConfig:
        """A copy of the base TrainConfig with some fields changed (validated)."""
        return replace(self.train, **changes).validate()
