"""MaskedStrategy: the common half of the mask-based methods (FedDST, FLASH, hetero-FLASH).

The global model carries per-layer bool masks (``self.masks``, one per sparse layer, keyed by
layer name) and per-layer density budgets (``self.densities``). Clients train in the plan's
``masked`` mode (``SparsityPlan("masked", {layer: LayerSparsity(d_l, 1.0)})``) and send the
``masked`` uplink (values under their mask, plus the mask when it changed). Weights outside a
mask are kept at exactly 0 on the server.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from embedded.uplink import UplinkRule
from hwmodel import SparsityPlan
from hwmodel.plan import LayerSparsity

from .aggregation import density_count, topk_mask
from .base import ClientInfo, Strategy


class MaskedStrategy(Strategy):
    """Base of the strategies whose global model is masked."""

    densities: dict[str, float]

    def layer_size(self, layer: str) -> int:
        return math.prod(self.spec.param_shapes(layer)[f"{layer}.weight"])

    def plan_from(self, densities: dict[str, float]) -> SparsityPlan:
        """A masked plan over the layers of ``densities`` (layers at density 1 stay dense)."""
        return SparsityPlan("masked", {n: LayerSparsity(float(d), 1.0)
                                       for n, d in densities.items() if d < 1.0}).check(self.spec)

    def plan_for(self, rnd: int, client: ClientInfo) -> SparsityPlan:
        return self.plan_from(self.densities)

    def uplink_for(self, rnd: int, client: ClientInfo) -> UplinkRule:
        return UplinkRule("masked", codec="dense32", dtype=getattr(self, "uplink_dtype", "f32"))

    def magnitude_masks(self, weights: dict[str, np.ndarray],
                        densities: dict[str, float],
                        within: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        """Per layer the ``round(d_l · N_l)`` largest ``|w|`` (inside ``within`` if given)."""
        out = {}
        for n, d in densities.items():
            if d >= 1.0:
                continue
            w = weights[f"{n}.weight"]
            out[n] = topk_mask(w, density_count(d, w.size),
                               None if within is None else within.get(n))
        return out

    def apply_masks(self, weights: dict[str, np.ndarray],
                    masks: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Weights with every masked layer zeroed outside its mask (float32 copies)."""
        out = dict(weights)
        for n, m in masks.items():
            k = f"{n}.weight"
            out[k] = np.where(m, weights[k], 0.0).astype(np.float32)
        return out

    def mask_density(self) -> float:
        """Fraction of non-zeros over the masked layers' weights (1.0 without masks)."""
        if not self.masks:
            return 1.0
        return float(sum(int(m.sum()) for m in self.masks.values())
                     / sum(m.size for m in self.masks.values()))

    def _extra_state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        return {"densities": {k: float(v) for k, v in self.densities.items()}}, {}

    def _load_extra_state(self, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        if "densities" in meta:
            self.densities = {str(k): float(v) for k, v in meta["densities"].items()}
