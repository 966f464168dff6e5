"""FLASH (Babakniya et al., TMLR 2023): sparsity hunting, then sparse training at density ``d``.

**Stage 1 — sparsity hunting, modelled inside the strategy.** Round ``FIRST_ROUND`` (1) is the
hunting round when ``hunt_fraction > 0``: ``configure_fit`` returns tasks for only
``max(1, ceil(hunt_fraction · K))`` of the ``K`` clients it is given (picked by a generator
seeded from the run seed and the round; ``participants(rnd, clients)`` tells the loop which,
in task order). Each hunting client starts from the server's random
mask at density ``d`` (per-layer budgets ``init``: ``erk`` or ``uniform``) and runs
``MaskSchedule.flash_dst`` (magnitude prune at ``hunt_prune_rate``, cosine-decayed over its
steps, random regrow) for ``hunt_epochs`` local epochs, and uploads weights and mask
(``masked`` uplink). ``aggregate_fit`` then averages each layer's density over the hunting
clients, rescales to total density ``d`` (capped at 1), and builds the initial global mask per
layer from *mask consensus*: the positions held by the most hunting masks (ties by the mean
``|w|`` of the hunted weights, then by the lower index). The model is re-initialised (a fresh
init from a seed derived from the run seed) and masked. If the hunting round returns nothing,
the next round hunts again. ``hunt_fraction = 0`` skips stage 1: the budgets are ``init``'s
and the mask is the magnitude of the init.

  Note: ``embedded``'s ``flash_dst`` keeps every layer's active count (it regrows what it
  prunes), so the averaged hunted densities equal the initial budgets unless a client (e.g. a
  board's own DST) returns masks of other densities; the averaging is still done as the
  algorithm states, and the *positions* are what the hunt contributes.

**Stage 2** (every later round), ``mode``:

* ``spdst`` — the mask is fixed; clients train masked (``MaskSchedule.fixed``);
* ``jmwst`` — clients also run ``flash_dst`` (``prune_rate``, ``dst_interval``) and return
  weights and masks; every ``update_interval`` rounds the server takes, per layer, the top
  ``round(d_l · N_l)`` ``|w|`` of the aggregated weights as the next global mask (in between the
  global mask stays and the aggregate is masked by it).

**Sparse-aware scale of the masked init (``sparse_init``; a deviation, default on).** A mask
drawn independently of the init values — the hunting clients' random start and the stage-2
re-initialisation under the hunted mask — keeps each output unit's inputs at random, so with
torch's default (dense fan-in) init a unit's pre-activation variance falls to ``d_l`` of the
dense one and the biases (still at dense scale) dominate. In a network without batch-norm (e.g.
``lenet5``) the loss then cannot move: at ``d = 0.05`` the hunted stage-2 model's logits vary
across inputs by ~1e-4 (vs ~0.05 biases), about half the hidden ReLUs are dead for every input,
the gradients to the sparse layers vanish, and the run stayed at chance for 100 rounds
(``benchmarks/results/fl_tradeoff.md``, ``flash-s0.95``; ``flash-s0.9`` sat at chance for ~25
rounds). FedDST and ``hunt_fraction = 0`` escape because a *magnitude* mask of the init keeps
the largest weights (~10× the logit signal). With ``sparse_init = "fan_in"`` (default) the
kept weights of each output unit of a masked layer are multiplied by ``sqrt(fan_in /
kept_fan_in)`` right after such a random-w.r.t.-init mask is applied, so every unit starts with
the dense init's variance: the sparsity-aware initialisation of Evci et al., "Gradient Flow in
Sparse Neural Networks and How Lottery Tickets Win" (AAAI 2022). The FLASH reference code does
not rescale (``"dense"`` reproduces it): its main models are ResNets whose batch-norm undoes the
scale, and for its one BN-free model (MNISTNet) it leaves the first and last layers dense
(``remove_first_last``) — not enough here (tried: lenet5 with conv1 dense still sat at chance).
Magnitude masks of the init (``hunt_fraction = 0``) are not rescaled: their kept weights are
already the largest.

Aggregation of the masked layers' weights: ``mean`` — the unweighted mean over clients with
unsent entries as 0 (the reference default; biases and BN parameters unweighted too) — or
``masked_mean`` — ``Σ n_k w_k m_k / Σ n_k m_k`` (sample weights for everything). BN running
statistics always take the sample-weighted mean. LR per round: ``lr_t = lr_start ·
(lr_end/lr_start) ** (t/T)``, ``lr_end`` default ``lr_start/100`` (reference 0.1 → 0.001),
``T = lr_horizon`` (reference 1,000 for a 600-round run) or the run's rounds.
"""

from __future__ import annotations

import math
import zlib
from typing import Any, ClassVar

import numpy as np

from embedded.mask_schedule import MaskSchedule
from embedded.task import ClientResult, ClientTask
from embedded.train import TrainConfig
from hwmodel.plan import erk_densities, sparse_layer_names

from .aggregation import (
    density_count,
    masked_mean,
    rescale_densities,
    sample_weights,
    uniform_weights,
    weighted_mean,
)
from .base import FIRST_ROUND, ClientInfo, check_choice, check_int, check_number
from .sparse_base import MaskedStrategy

MODES = ("spdst", "jmwst")
AGGREGATIONS = ("mean", "masked_mean")
INITS = ("erk", "uniform")
SPARSE_INITS = ("fan_in", "dense")
_AUTO = "auto"


class Flash(MaskedStrategy):
    """FLASH's server half: sparsity hunting, then SPDST or JMWST."""

    name: ClassVar[str] = "flash"
    default_aggregation: ClassVar[str] = "mean"

    def __init__(self, spec, *, rounds: int, seed: int = 0, train=None,
                 downlink_dtype: str = "f32", density: float = 0.05, mode: str = "spdst",
                 hunt_fraction: float = 0.1, hunt_epochs: int = 10,
                 hunt_prune_rate: float = 0.25, prune_rate: float = 0.25,
                 dst_interval: int = 100, update_interval: int = 1,
                 aggregation: str | None = None, init: str = "erk",
                 layers: str | list[str] = "flash", lr_start: float | None = None,
                 lr_end: float | str | None = _AUTO, lr_horizon: int | None = None,
                 uplink_dtype: str = "f32", sparse_init: str = "fan_in") -> None:
        super().__init__(spec, rounds=rounds, seed=seed, train=train,
                         downlink_dtype=downlink_dtype)
        n = self.name
        self.density = check_number(n, "density", density, 0.0, 1.0, lo_open=True, hi_open=True)
        self.mode = check_choice(n, "mode", mode, MODES)
        self.hunt_fraction = check_number(n, "hunt_fraction", hunt_fraction, 0.0, 1.0)
        self.hunt_epochs = check_int(n, "hunt_epochs", hunt_epochs, 1)
        self.hunt_prune_rate = check_number(n, "hunt_prune_rate", hunt_prune_rate, 0.0, 1.0,
                                            hi_open=True)
        self.prune_rate = check_number(n, "prune_rate", prune_rate, 0.0, 1.0, hi_open=True)
        self.dst_interval = check_int(n, "dst_interval", dst_interval, 1)
        self.update_interval = check_int(n, "update_interval", update_interval, 1)
        self.aggregation = check_choice(n, "aggregation",
                                        self.default_aggregation if aggregation is None
                                        else aggregation, AGGREGATIONS)
        self.init = check_choice(n, "init", init, INITS)
        self.sparse_init = check_choice(n, "sparse_init", sparse_init, SPARSE_INITS)
        if uplink_dtype not in ("f32", "f16"):
            raise ValueError(f"{n}: parameter 'uplink_dtype' expected 'f32' or 'f16', "
                             f"got {uplink_dtype!r}")
        self.uplink_dtype = uplink_dtype
        try:
            self.layer_names = sparse_layer_names(spec, layers)
        except ValueError as e:
            raise ValueError(f"{n}: parameter 'layers': {e}") from None
        if not self.layer_names:
            raise ValueError(f"{n}: parameter 'layers' selects no layer of {spec.name!r}")
        self.lr_start = (self.train.lr if lr_start is None else
                         check_number(n, "lr_start", lr_start, 0.0, 1e3, lo_open=True))
        if lr_end == _AUTO:
            lr_end = self.lr_start / 100.0
        self.lr_end = (None if lr_end is None else
                       check_number(n, "lr_end", lr_end, 0.0, 1e3, lo_open=True))
        self.lr_horizon = None if lr_horizon is None else check_int(n, "lr_horizon", lr_horizon, 1)
        if self.hunt_fraction > 0 and rounds < 2:
            raise ValueError(f"{n}: sparsity hunting takes round 1; rounds must be >= 2 "
                             f"(or hunt_fraction = 0), got {rounds}")
        self.densities = self.initial_budgets()
        self.hunted = self.hunt_fraction == 0.0
        self.stage2_start = FIRST_ROUND if self.hunted else None

    # ------------------------------------------------------------------ budgets and masks
    def initial_budgets(self) -> dict[str, float]:
        if self.init == "erk":
            return erk_densities(self.spec, self.layer_names, self.density)
        return {n: self.density for n in self.layer_names}

    def sizes(self) -> dict[str, int]:
        return {n: self.layer_size(n) for n in self.layer_names}

    def scale_to_dense_variance(self, weights: dict[str, np.ndarray],
                                masks: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """``weights`` with each masked layer's kept weights of output unit ``j`` multiplied by
        ``sqrt(fan_in / kept_j)`` (``kept_j`` = its unmasked inputs; units with none are left
        as they are), when ``sparse_init == "fan_in"``; unchanged for ``"dense"``."""
        if self.sparse_init == "dense":
            return weights
        out = dict(weights)
        for n, m in masks.items():
            k = f"{n}.weight"
            w = np.asarray(weights[k])
            rows = np.asarray(m, dtype=bool).reshape(w.shape[0], -1)
            kept = rows.sum(axis=1)
            scale = np.sqrt(rows.shape[1] / np.maximum(kept, 1)).astype(np.float64)
            scale[kept == 0] = 1.0
            out[k] = (w * scale.reshape((-1,) + (1,) * (w.ndim - 1))).astype(np.float32)
        return out

    def _rng(self, tag: str, rnd: int = 0) -> np.random.Generator:
        return np.random.default_rng([self.seed, rnd, zlib.crc32(tag.encode())])

    def initialize(self) -> None:
        super().initialize()
        if self.hunted:  # no hunting: magnitude of the init at the initial budgets
            self.masks = self.magnitude_masks(self.weights, self.densities)
        else:            # the hunting clients' common random start
            rng = self._rng("flash-hunt-mask")
            self.masks = {}
            for n, d in self.densities.items():
                if d >= 1.0:
                    continue
                size = self.layer_size(n)
                m = np.zeros(size, dtype=bool)
                m[rng.choice(size, density_count(d, size), replace=False)] = True
                self.masks[n] = m.reshape(self.weights[f"{n}.weight"].shape)
            self.weights = self.scale_to_dense_variance(self.weights, self.masks)
        self.weights = self.apply_masks(self.weights, self.masks)

    def is_hunting(self, rnd: int) -> bool:
        return not self.hunted

    # ------------------------------------------------------------------ hooks
    def train_config(self, rnd: int, client: ClientInfo) -> TrainConfig:
        lr = self.lr_at(rnd, self.lr_start, self.lr_end, self.lr_horizon)
        if self.is_hunting(rnd):
            return self.with_train(lr=lr, epochs=self.hunt_epochs)
        return self.with_train(lr=lr)

    def schedule_for(self, rnd: int, client: ClientInfo) -> MaskSchedule:
        if self.is_hunting(rnd):
            return MaskSchedule.flash_dst(self.hunt_prune_rate, self.dst_interval)
        if self.mode == "jmwst":
            return MaskSchedule.flash_dst(self.prune_rate, self.dst_interval)
        return MaskSchedule.fixed()

    def participants(self, rnd: int, clients: list[ClientInfo]) -> list[ClientInfo]:
        """Hunting round: the seeded fraction of ``clients`` that hunts (order kept); else
        everyone."""
        if not self.is_hunting(rnd) or not clients:
            return list(clients)
        k = min(len(clients), max(1, math.ceil(self.hunt_fraction * len(clients))))
        pick = np.sort(self._rng("flash-hunters", rnd).permutation(len(clients))[:k])
        return [clients[i] for i in pick]

    def configure_fit(self, rnd: int, clients: list[ClientInfo]) -> list[ClientTask]:
        if not self.weights:
            self.initialize()
        return super().configure_fit(rnd, self.participants(rnd, clients))

    # ------------------------------------------------------------------ aggregation
    def aggregate_fit(self, rnd: int,
                      results: list[tuple[ClientInfo, ClientResult]]) -> dict[str, float]:
        if not self.weights:
            self.initialize()
        if not results:
            return {"clients": 0.0}
        if self.is_hunting(rnd):
            return self._aggregate_hunt(rnd, results)
        dec, ups, ns = self.absolute_updates(results)
        masks = {n: [u.masks[n] if u.masks is not None and n in u.masks else self.masks[n]
                     for _, _, u in dec] for n in self.masks}
        agg = self.aggregate_weights(ups, ns, masks)
        update = (self.mode == "jmwst"
                  and (rnd - (self.stage2_start or FIRST_ROUND) + 1) % self.update_interval == 0)
        old = self.masks
        if update:
            self.masks = self.magnitude_masks(agg, self.densities)
        self.weights = self.apply_masks(agg, self.masks)
        changed = sum(int((self.masks[n] != old[n]).sum()) for n in self.masks)
        return {"clients": float(len(dec)), "mask_updated": float(update),
                "mask_changed": float(changed), "density": self.mask_density()}

    def aggregate_weights(self, ups: list[dict[str, np.ndarray]], ns: list[int],
                          masks: dict[str, list[np.ndarray]]) -> dict[str, np.ndarray]:
        """Mean (unweighted) or masked mean of the clients' absolute states."""
        w = sample_weights(ns)
        pw = uniform_weights(len(ups)) if self.aggregation == "mean" else w
        out = self.mean_state(ups, ns, param_weights=pw, skip={f"{n}.weight" for n in masks})
        for n, cm in masks.items():
            key = f"{n}.weight"
            arrs = [s[key] for s in ups]
            out[key] = (weighted_mean(arrs, pw) if self.aggregation == "mean"
                        else masked_mean(arrs, cm, w, empty=0.0))
        return out

    def _aggregate_hunt(self, rnd: int,
                        results: list[tuple[ClientInfo, ClientResult]]) -> dict[str, float]:
        dec = self.decode_results(results)
        ref = self.reference_state()
        ups = [u.absolute(ref) for _, _, u in dec]
        hunted = {}
        for n in self.masks:
            cm = [u.masks[n] if u.masks is not None and n in u.masks else self.masks[n]
                  for _, _, u in dec]
            hunted[n] = cm
        sizes = self.sizes()
        avg = {n: (float(np.mean([m.mean() for m in hunted[n]])) if n in hunted else 1.0)
               for n in self.layer_names}
        budgets = rescale_densities(avg, sizes, self.density)
        from embedded.network import Network

        fresh = Network.from_spec(
            self.spec, seed=zlib.crc32(f"flash-reinit/{self.seed}".encode()) & 0x7FFFFFFF
        ).state_dict()
        masks = {}
        for n, d in budgets.items():
            if d >= 1.0 or n not in hunted:
                continue
            votes = np.sum([m.astype(np.int64) for m in hunted[n]], axis=0).ravel()
            mag = np.mean([np.abs(s[f"{n}.weight"]) for s in ups], axis=0).ravel()
            k = density_count(d, votes.size)
            order = np.lexsort((np.arange(votes.size), -mag, -votes))[:k]
            m = np.zeros(votes.size, dtype=bool)
            m[order] = True
            masks[n] = m.reshape(self.weights[f"{n}.weight"].shape)
        self.densities = budgets
        self.masks = masks
        self.weights = self.apply_masks(self.scale_to_dense_variance(fresh, masks), masks)
        self.hunted = True
        self.stage2_start = rnd + 1
        return {"clients": float(len(dec)), "hunting": 1.0, "density": self.mask_density()}

    # ------------------------------------------------------------------ checkpoints
    def _extra_state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        meta, arrays = super()._extra_state()
        meta.update(hunted=self.hunted, stage2_start=self.stage2_start)
        return meta, arrays

    def _load_extra_state(self, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        super()._load_extra_state(meta, arrays)
        self.hunted = bool(meta.get("hunted", self.hunted))
        self.stage2_start = meta.get("stage2_start", self.stage2_start)
