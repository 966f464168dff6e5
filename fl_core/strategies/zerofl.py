"""ZeroFL (Qiu et al., ICLR 2022): SWAT locally, sparsified uplink, FedAvg of what was sent.

Local training is SWAT-FL's (:class:`.swat_fl.SwatFL`: plan, exponential LR). Each client sends
``K = (1 - sp + mask_ratio) · N`` entries per sparse layer (``embedded.uplink``):

* ``topk_weights`` — top-K ``|w_E|``, absolute values. Server: ``w = Σ n_k/n · w_k`` (unsent
  entries count as zero);
* ``diff_topk_weights`` — positions of the top-K ``|w_E|``, values ``d = w_E - w_global``;
* ``topk_diff`` — the top-K ``|d|``. Server for both diff rules: ``w = w_global + Σ n_k/n · d_k``.

``zero_convention``: ``zeros_count`` (paper, Alg. 1; the default) or ``nonzero_mean``
(``Σ n_k x_k [x_k≠0] / Σ n_k [x_k≠0]`` over what each client sent, ``x`` = weights or diffs).
Where no client sent a non-zero, ``nonzero_mean`` falls back to the ``zeros_count`` value
(0 for ``topk_weights``, ``w_global`` for the diff rules). The convention applies only to the
sparsified tensors (the sparse layers' weights); biases, BN parameters and dense layers travel
whole and take the sample-weighted mean; BN running statistics always do.
``mask_ratio = sparsity`` sends everything (vanilla SWAT-FL).
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from embedded.task import ClientResult
from embedded.uplink import UplinkRule

from .aggregation import (
    is_running_stat,
    is_server_owned,
    nonzero_mean,
    sample_weights,
    weighted_mean,
)
from .base import ClientInfo, check_choice, check_number
from .swat_fl import _AUTO, SwatFL

RULES = ("topk_weights", "diff_topk_weights", "topk_diff")
ZERO_CONVENTIONS = ("zeros_count", "nonzero_mean")


class ZeroFL(SwatFL):
    """SWAT-FL with ZeroFL's local sparsification of the uplink."""

    name: ClassVar[str] = "zerofl"

    def __init__(self, spec, *, rounds: int, seed: int = 0, train=None,
                 downlink_dtype: str = "f32", sparsity: float = 0.9,
                 act_sparsity: float | None = None, topk_period: int = 1,
                 layers: str | list[str] = "swat", lr_start: float | None = None,
                 lr_end: float | str | None = _AUTO, lr_horizon: int | None = None,
                 rule: str = "topk_weights", mask_ratio: float = 0.1,
                 zero_convention: str = "zeros_count", uplink_codec: str = "best",
                 uplink_dtype: str = "f32") -> None:
        super().__init__(spec, rounds=rounds, seed=seed, train=train,
                         downlink_dtype=downlink_dtype, sparsity=sparsity,
                         act_sparsity=act_sparsity, topk_period=topk_period, layers=layers,
                         lr_start=lr_start, lr_end=lr_end, lr_horizon=lr_horizon)
        n = self.name
        self.rule = check_choice(n, "rule", rule, RULES)
        self.mask_ratio = check_number(n, "mask_ratio", mask_ratio, 0.0, 1.0)
        self.zero_convention = check_choice(n, "zero_convention", zero_convention,
                                            ZERO_CONVENTIONS)
        try:
            self.uplink = UplinkRule(self.rule, mask_ratio=self.mask_ratio, codec=uplink_codec,
                                     dtype=uplink_dtype)
        except ValueError as e:
            raise ValueError(f"{n}: uplink: {e}") from None

    def uplink_for(self, rnd: int, client: ClientInfo) -> UplinkRule:
        return self.uplink

    def aggregate_fit(self, rnd: int,
                      results: list[tuple[ClientInfo, ClientResult]]) -> dict[str, float]:
        if not self.weights:
            self.initialize()
        if not results:
            return {"clients": 0.0}
        dec = self.decode_results(results)
        ups = [u for _, _, u in dec]
        w = sample_weights([r.num_samples for _, r, _ in dec])
        ref = self.reference_state()
        sparsified = set().union(*(u.sparsified for u in ups))
        out = dict(self.weights)
        sent = 0
        for name, cur in self.weights.items():
            if is_server_owned(name) or np.asarray(cur).dtype.kind != "f":
                continue
            g = np.asarray(ref[name], dtype=np.float32)
            if name not in sparsified or is_running_stat(name):
                out[name] = weighted_mean([_absolute(u, name, g) for u in ups], w)
                continue
            if self.rule == "topk_weights":
                arrs = [_absolute(u, name, g) for u in ups]
                base = np.zeros_like(g)
            else:
                arrs = [_diff(u, name, g) for u in ups]
                base = g
            sent += sum(int(np.count_nonzero(a)) for a in arrs)
            if self.zero_convention == "zeros_count":
                agg = weighted_mean(arrs, w)
            else:
                agg = nonzero_mean(arrs, w, empty=0.0)
            out[name] = (base.astype(np.float64) + agg).astype(np.float32) \
                if self.rule != "topk_weights" else agg
        self.weights = out
        return {"clients": float(len(dec)), "sent_nonzeros": float(sent)}


def _absolute(u, name: str, g: np.ndarray) -> np.ndarray:
    t = np.asarray(u.tensors[name], dtype=np.float32)
    return (g + t).astype(np.float32) if name in u.diff else t


def _diff(u, name: str, g: np.ndarray) -> np.ndarray:
    t = np.asarray(u.tensors[name], dtype=np.float32)
    return t if name in u.diff else (t - g).astype(np.float32)
