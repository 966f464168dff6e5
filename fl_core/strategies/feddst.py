"""FedDST (Bibikar et al., AAAI 2022): federated dynamic sparse training.

* Init (server): the random init magnitude-pruned to sparsity ``S`` with ERK budgets over
  ``layers`` (default ``all``: every conv/linear layer, as the reference code; ERK capped at 1).
* Local training: masked SGD (``plan`` mode ``masked``), ``MaskSchedule.fixed`` except in
  readjustment rounds: ``rnd % readjust_interval == 0`` and ``rnd < readjust_until · rounds``
  (default: half the rounds), where clients run ``MaskSchedule.feddst(α_r)`` with the cosine
  decay ``α_r = α · ½(1 + cos(π · rnd / (readjust_until · rounds)))`` (0 at the stop point).
* Uplink: ``masked`` (values under the mask; the mask only when it changed).
* Server: per element ``Σ n_k w_k m_k / Σ n_k m_k`` over the clients whose mask holds it (0
  where none does); the new mask is the union of the client masks, magnitude-pruned back to the
  layer's ERK count ``round(d_l · N_l)`` if the union is denser; weights outside it are 0.
  Every other tensor: the sample-weighted mean (BN running stats too; ``num_batches_tracked``
  is the server's).
Defaults are the reference's CIFAR-10 command (S 0.8, α 0.01, R_adj 15); local
hyper-parameters (lr 0.01, momentum 0.9, l2 1e-3, batch 32, 10 epochs) come from ``train``.
"""

from __future__ import annotations

import math
from typing import ClassVar

import numpy as np

from embedded.mask_schedule import MaskSchedule
from embedded.task import ClientResult
from hwmodel.plan import erk_densities, sparse_layer_names

from .aggregation import density_count, masked_mean, sample_weights, topk_mask, union_masks
from .base import ClientInfo, check_int, check_number
from .sparse_base import MaskedStrategy


class FedDST(MaskedStrategy):
    """FedDST's server half."""

    name: ClassVar[str] = "feddst"

    def __init__(self, spec, *, rounds: int, seed: int = 0, train=None,
                 downlink_dtype: str = "f32", sparsity: float = 0.8, alpha: float = 0.01,
                 readjust_interval: int = 15, readjust_until: float = 0.5,
                 grad_batches: int = 1, layers: str | list[str] = "all",
                 uplink_dtype: str = "f32") -> None:
        super().__init__(spec, rounds=rounds, seed=seed, train=train,
                         downlink_dtype=downlink_dtype)
        n = self.name
        self.sparsity = check_number(n, "sparsity", sparsity, 0.0, 1.0, lo_open=True,
                                     hi_open=True)
        self.alpha = check_number(n, "alpha", alpha, 0.0, 1.0)
        self.readjust_interval = check_int(n, "readjust_interval", readjust_interval, 1)
        self.readjust_until = check_number(n, "readjust_until", readjust_until, 0.0, 1.0,
                                           lo_open=True)
        self.grad_batches = check_int(n, "grad_batches", grad_batches, 1)
        if uplink_dtype not in ("f32", "f16"):
            raise ValueError(f"{n}: parameter 'uplink_dtype' expected 'f32' or 'f16', "
                             f"got {uplink_dtype!r}")
        self.uplink_dtype = uplink_dtype
        try:
            names = sparse_layer_names(spec, layers)
        except ValueError as e:
            raise ValueError(f"{n}: parameter 'layers': {e}") from None
        self.densities = erk_densities(spec, names, 1.0 - self.sparsity)

    def initialize(self) -> None:
        super().initialize()
        self.masks = self.magnitude_masks(self.weights, self.densities)
        self.weights = self.apply_masks(self.weights, self.masks)

    # ------------------------------------------------------------------ schedule
    def alpha_at(self, rnd: int) -> float:
        """The readjustment ratio of round ``rnd`` (0 when the round does not readjust)."""
        stop = self.readjust_until * self.rounds
        if rnd % self.readjust_interval != 0 or rnd >= stop:
            return 0.0
        return 0.5 * self.alpha * (1.0 + math.cos(math.pi * rnd / stop))

    def schedule_for(self, rnd: int, client: ClientInfo) -> MaskSchedule:
        a = self.alpha_at(rnd)
        if a <= 0.0:
            return MaskSchedule.fixed()
        return MaskSchedule.feddst(a, readjust=True, grad_batches=self.grad_batches)

    # ------------------------------------------------------------------ aggregation
    def aggregate_fit(self, rnd: int,
                      results: list[tuple[ClientInfo, ClientResult]]) -> dict[str, float]:
        if not self.weights:
            self.initialize()
        if not results:
            return {"clients": 0.0}
        dec, ups, ns = self.absolute_updates(results)
        w = sample_weights(ns)
        layers = list(self.masks or {})
        out = self.mean_state(ups, ns, skip={f"{n}.weight" for n in layers})
        new_masks, pruned = {}, 0
        for n in layers:
            key = f"{n}.weight"
            cm = [u.masks[n] if u.masks is not None and n in u.masks else self.masks[n]
                  for _, _, u in dec]
            agg = masked_mean([s[key] for s in ups], cm, w, empty=0.0)
            union = union_masks(cm)
            k = density_count(self.densities[n], union.size)
            if int(union.sum()) > k:
                pruned += int(union.sum()) - k
                m = topk_mask(agg, k, within=union)
            else:
                m = union
            new_masks[n] = m
            out[key] = np.where(m, agg, 0.0).astype(np.float32)
        changed = sum(int((new_masks[n] != self.masks[n]).sum()) for n in layers)
        self.masks = new_masks
        self.weights = out
        return {"clients": float(len(dec)), "alpha": float(self.alpha_at(rnd)),
                "mask_changed": float(changed), "server_pruned": float(pruned),
                "density": self.mask_density()}
