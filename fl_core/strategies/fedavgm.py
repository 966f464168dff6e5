"""FedAvgM (Hsu et al. 2019): FedAvg with server momentum.

With ``w̄`` the sample-weighted mean of the client states (FedAvg) and ``w`` the global
weights: pseudo-gradient ``Δ = w - w̄``, ``v ← β·v + Δ``, ``w ← w - η·v`` (``η`` =
``server_lr``, ``β`` = ``server_momentum``; Flower's FedAvgM). With ``β = 0`` and ``η = 1`` it is
FedAvg. Momentum applies to the trainable parameters only; batch-norm running statistics take
the plain sample-weighted mean (they are statistics, not parameters), ``num_batches_tracked``
stays the server's. The momentum vectors are checkpointed.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from embedded.task import ClientResult

from .aggregation import is_running_stat, is_server_owned
from .base import ClientInfo, Strategy, check_number


class FedAvgM(Strategy):
    """FedAvg with server-side momentum."""

    name: ClassVar[str] = "fedavgm"

    def __init__(self, spec, *, rounds: int, seed: int = 0, train=None,
                 downlink_dtype: str = "f32", server_lr: float = 1.0,
                 server_momentum: float = 0.9) -> None:
        super().__init__(spec, rounds=rounds, seed=seed, train=train,
                         downlink_dtype=downlink_dtype)
        self.server_lr = check_number(self.name, "server_lr", server_lr, 0.0, 1e6, lo_open=True)
        self.server_momentum = check_number(self.name, "server_momentum", server_momentum,
                                            0.0, 1.0, hi_open=True)
        self.momentum: dict[str, np.ndarray] = {}

    def aggregate_fit(self, rnd: int,
                      results: list[tuple[ClientInfo, ClientResult]]) -> dict[str, float]:
        if not self.weights:
            self.initialize()
        if not results:
            return {"clients": 0.0}
        dec, states, ns = self.absolute_updates(results)
        avg = self.mean_state(states, ns)
        new = dict(avg)
        norm = 0.0
        for name, w in self.weights.items():
            if is_server_owned(name) or is_running_stat(name) or np.asarray(w).dtype.kind != "f":
                continue
            delta = np.asarray(w, dtype=np.float64) - np.asarray(avg[name], dtype=np.float64)
            v = self.momentum.get(name)
            v = delta if v is None else self.server_momentum * v + delta
            self.momentum[name] = v
            new[name] = (np.asarray(w, dtype=np.float64) - self.server_lr * v).astype(np.float32)
            norm += float((v * v).sum())
        self.weights = new
        return {"clients": float(len(dec)), "momentum_norm": float(np.sqrt(norm))}

    def _extra_state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        return {}, {k: v for k, v in self.momentum.items()}

    def _load_extra_state(self, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        self.momentum = {k: np.asarray(v, dtype=np.float64) for k, v in arrays.items()}
