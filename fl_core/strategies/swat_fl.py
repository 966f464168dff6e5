"""SWAT-FL: SWAT locally at sparsity ``s`` (ZeroFL's baseline), dense uplink, FedAvg.

The plan is ``SparsityPlan.uniform(spec, sparsity, mode="swat", layers=...)`` (SWAT's rule:
every conv/linear layer except the first and the classifier). Learning rate per round:
ZeroFL's exponential decay ``lr_t = lr_start · (lr_end/lr_start) ** (t/T)`` (``lr_start``
defaults to the TrainConfig's ``lr``, ``lr_end`` to ``lr_start / 10`` — the CIFAR-10 reference
0.1 → 0.01; ``lr_end=None`` is a constant rate; ``T`` = ``lr_horizon`` or the run's rounds).
"""

from __future__ import annotations

from typing import ClassVar

from embedded.task import ClientResult
from embedded.train import TrainConfig
from hwmodel import SparsityPlan

from .base import ClientInfo, Strategy, check_int, check_number

_AUTO = "auto"


class SwatFL(Strategy):
    """SWAT local training with the dense (absolute) uplink of FedAvg."""

    name: ClassVar[str] = "swat_fl"

    def __init__(self, spec, *, rounds: int, seed: int = 0, train=None,
                 downlink_dtype: str = "f32", sparsity: float = 0.9,
                 act_sparsity: float | None = None, topk_period: int = 1,
                 layers: str | list[str] = "swat", lr_start: float | None = None,
                 lr_end: float | str | None = _AUTO, lr_horizon: int | None = None) -> None:
        super().__init__(spec, rounds=rounds, seed=seed, train=train,
                         downlink_dtype=downlink_dtype)
        n = self.name
        self.sparsity = check_number(n, "sparsity", sparsity, 0.0, 1.0, hi_open=True)
        self.act_sparsity = (None if act_sparsity is None else
                             check_number(n, "act_sparsity", act_sparsity, 0.0, 1.0, hi_open=True))
        self.topk_period = check_int(n, "topk_period", topk_period, 1)
        try:
            self.plan = SparsityPlan.uniform(spec, self.sparsity, mode="swat", layers=layers,
                                             act_sparsity=self.act_sparsity,
                                             topk_period=self.topk_period)
        except ValueError as e:
            raise ValueError(f"{n}: parameter 'layers': {e}") from None
        self.lr_start = (self.train.lr if lr_start is None else
                         check_number(n, "lr_start", lr_start, 0.0, 1e3, lo_open=True))
        if lr_end == _AUTO:
            lr_end = self.lr_start / 10.0
        self.lr_end = (None if lr_end is None else
                       check_number(n, "lr_end", lr_end, 0.0, 1e3, lo_open=True))
        self.lr_horizon = None if lr_horizon is None else check_int(n, "lr_horizon", lr_horizon, 1)

    def plan_for(self, rnd: int, client: ClientInfo) -> SparsityPlan:
        return self.plan

    def train_config(self, rnd: int, client: ClientInfo) -> TrainConfig:
        return self.with_train(lr=self.lr_at(rnd, self.lr_start, self.lr_end, self.lr_horizon))

    def aggregate_fit(self, rnd: int,
                      results: list[tuple[ClientInfo, ClientResult]]) -> dict[str, float]:
        if not self.weights:
            self.initialize()
        if not results:
            return {"clients": 0.0}
        dec, states, ns = self.absolute_updates(results)
        self.weights = self.mean_state(states, ns)
        return {"clients": float(len(dec))}
