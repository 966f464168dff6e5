"""Server halves of the methods: one strategy per module, a small common base.

``STRATEGIES`` maps a name to its class; ``make_strategy(name, spec, rounds=..., seed=...,
train=..., **params)`` builds one, rejecting unknown names and parameters with the allowed
ones listed (each class validates its values). ``Strategy.params()`` lists a strategy's
parameters with their defaults (the reference defaults of ../shared/ALGORITHMS.md).
"""

from __future__ import annotations

from typing import Any

from hwmodel import ModelSpec

from .base import ClientInfo, Strategy, UpdateRejected
from .fedavg import FedAvg
from .fedavgm import FedAvgM
from .feddst import FedDST
from .flash import Flash
from .hetero_flash import HeteroFlash
from .swat_fl import SwatFL
from .zerofl import ZeroFL

STRATEGIES: dict[str, type[Strategy]] = {
    c.name: c for c in (FedAvg, FedAvgM, SwatFL, ZeroFL, FedDST, Flash, HeteroFlash)
}


def make_strategy(name: str, spec: ModelSpec, *, rounds: int, seed: int = 0, train: Any = None,
                  downlink_dtype: str = "f32", **params: Any) -> Strategy:
    """Build strategy ``name`` for ``spec``; clear ValueErrors for unknown names/parameters."""
    cls = STRATEGIES.get(name)
    if cls is None:
        raise ValueError(f"unknown strategy {name!r}; known strategies: "
                         f"{', '.join(sorted(STRATEGIES))}")
    if not isinstance(spec, ModelSpec):
        raise ValueError(f"strategy {name!r}: spec must be a hwmodel.ModelSpec, "
                         f"got {type(spec).__name__}")
    allowed = cls.params()
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        listing = ", ".join(f"{k} (default {v!r})" for k, v in allowed.items()) or "none"
        raise ValueError(f"strategy {name!r}: unknown parameter(s) {unknown}; "
                         f"allowed: {listing}")
    return cls(spec, rounds=rounds, seed=seed, train=train, downlink_dtype=downlink_dtype,
               **params)


__all__ = ["STRATEGIES", "ClientInfo", "FedAvg", "FedAvgM", "FedDST", "Flash", "HeteroFlash",
           "Strategy", "SwatFL", "UpdateRejected", "ZeroFL", "make_strategy"]
