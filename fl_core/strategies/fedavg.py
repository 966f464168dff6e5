"""FedAvg (McMahan et al.): dense local training, dense uplink, sample-weighted mean.

Every float tensor is averaged with weights ``n_k / n``; batch-norm running statistics too;
``num_batches_tracked`` stays the server's own (see :mod:`.aggregation`).
"""

from __future__ import annotations

from typing import ClassVar

from embedded.task import ClientResult

from .base import ClientInfo, Strategy


class FedAvg(Strategy):
    """Dense FedAvg: the reference every trade-off is measured against."""

    name: ClassVar[str] = "fedavg"

    def aggregate_fit(self, rnd: int,
                      results: list[tuple[ClientInfo, ClientResult]]) -> dict[str, float]:
        if not self.weights:
            self.initialize()
        if not results:
            return {"clients": 0.0}
        dec, states, ns = self.absolute_updates(results)
        self.weights = self.mean_state(states, ns)
        return {"clients": float(len(dec)), "samples": float(sum(ns))}
