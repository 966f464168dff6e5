"""hetero-FLASH: FLASH with a per-client density budget chosen from the client's hardware.

The reference code hard-codes the budgets ``(d, 0.75d, 0.5d)`` by client position. Here each
client gets the largest candidate density ``f · d`` (``f`` in ``budget_factors``, default
``(1.0, 0.75, 0.5)``) whose **estimated round energy** on its device profile fits its
``energy_budget_j`` (``ClientInfo.device``, ``ClientInfo.energy_budget_j``): the estimate is
``hwmodel.estimator.estimate`` of one local round of the client's masked plan
(``train.epochs`` × ``num_samples`` — ``hwmodel.estimator.DEFAULT_SAMPLES`` when unknown — at
``train.batch_size``) and the round's energy is compute + radio (``radio``) + the idle draw
while the radio is busy (the same sum as ``hwmodel.estimator.budget``). A client with no energy
budget gets ``d``; one whose budget no candidate fits gets the smallest (counted in the
metrics as ``over_budget``). An explicit ``ClientInfo.density_budget`` overrides the estimate
(capped at ``d``).

Masks for lower budgets are nested inside the global one: per layer, a client at density
``d_c`` keeps the top ``round(d_l · d_c/d · N_l)`` ``|w|`` of the global (aggregated) weights
inside the global mask — the same scores with index tie-breaking, so lower budgets are subsets
of higher ones. Layers whose budget is 1 (ERK caps small layers) stay dense for every client. Aggregation defaults to ``masked_mean`` (positions only high-budget clients
train are averaged over those clients, not diluted by zeros); ``mean`` is available. Stage 1
(hunting) and stage 2 (``spdst``/``jmwst``) are FLASH's (:mod:`.flash`), including its
sparse-aware init scale (``sparse_init``); hunting clients hunt at ``d``.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from embedded.task import ClientResult, ClientTask
from embedded.uplink import encode_masks
from hwmodel import SparsityPlan
from hwmodel.estimator import DEFAULT_SAMPLES, estimate, radio_cost, resolve_device

from .aggregation import density_count, topk_mask
from .base import ClientInfo, check_number
from .flash import _AUTO, Flash


class HeteroFlash(Flash):
    """FLASH with nested per-client masks at budgets chosen from device profiles."""

    name: ClassVar[str] = "hetero_flash"
    default_aggregation: ClassVar[str] = "masked_mean"

    def __init__(self, spec, *, rounds: int, seed: int = 0, train=None,
                 downlink_dtype: str = "f32", density: float = 0.05, mode: str = "spdst",
                 hunt_fraction: float = 0.1, hunt_epochs: int = 10,
                 hunt_prune_rate: float = 0.25, prune_rate: float = 0.25,
                 dst_interval: int = 100, update_interval: int = 1,
                 aggregation: str | None = None, init: str = "erk",
                 layers: str | list[str] = "flash", lr_start: float | None = None,
                 lr_end: float | str | None = _AUTO, lr_horizon: int | None = None,
                 uplink_dtype: str = "f32", sparse_init: str = "fan_in",
                 budget_factors: tuple[float, ...] | list[float] = (1.0, 0.75, 0.5),
                 radio: str = "wifi") -> None:
        super().__init__(spec, rounds=rounds, seed=seed, train=train,
                         downlink_dtype=downlink_dtype, density=density, mode=mode,
                         hunt_fraction=hunt_fraction, hunt_epochs=hunt_epochs,
                         hunt_prune_rate=hunt_prune_rate, prune_rate=prune_rate,
                         dst_interval=dst_interval, update_interval=update_interval,
                         aggregation=aggregation, init=init, layers=layers, lr_start=lr_start,
                         lr_end=lr_end, lr_horizon=lr_horizon, uplink_dtype=uplink_dtype,
                         sparse_init=sparse_init)
        if isinstance(budget_factors, (str, bytes)) or not hasattr(budget_factors, "__iter__") \
                or not list(budget_factors):
            raise ValueError(f"{self.name}: parameter 'budget_factors' expected a non-empty "
                             f"list of numbers in (0, 1], got {budget_factors!r}")
        self.budget_factors = tuple(sorted(
            (check_number(self.name, "budget_factors", f, 0.0, 1.0, lo_open=True)
             for f in budget_factors), reverse=True))
        if not isinstance(radio, str):
            raise ValueError(f"{self.name}: parameter 'radio' expected a radio name, "
                             f"got {radio!r}")
        self.radio = radio
        self._energy_cache: dict[tuple, float] = {}
        self._round_masks: dict[str, dict[str, np.ndarray]] = {}
        self._round_density: dict[str, float] = {}
        self._over_budget = 0

    # ------------------------------------------------------------------ budgets
    def client_plan(self, density: float) -> SparsityPlan:
        """The masked plan of a client at ``density``: every masked layer's budget scaled by
        ``density / d`` (layers the budgets keep dense stay dense)."""
        f = density / self.density
        return self.plan_from({n: min(1.0, d * f) for n, d in self.densities.items()
                               if d < 1.0})

    def round_energy(self, client: ClientInfo, density: float) -> float:
        """Estimated energy (J) of one local round of ``client`` at ``density``."""
        samples = client.num_samples or DEFAULT_SAMPLES
        key = (client.device, round(density, 12), samples, self.train.epochs,
               self.train.batch_size, tuple(sorted(self.densities.items())))
        if key not in self._energy_cache:
            try:
                profile = resolve_device(client.device)
            except (ValueError, KeyError, FileNotFoundError) as e:
                raise ValueError(f"{self.name}: client {client.client_id!r}: unknown device "
                                 f"profile {client.device!r} ({e})") from None
            if self.radio not in profile.radios:
                raise ValueError(f"{self.name}: client {client.client_id!r}: device "
                                 f"{profile.name!r} has no radio {self.radio!r}; its radios: "
                                 f"{', '.join(sorted(profile.radios)) or 'none'}")
            est = estimate(self.spec, profile, plan=self.client_plan(density),
                           batch=self.train.batch_size, samples=samples,
                           epochs=self.train.epochs, radio=self.radio)
            t = est.totals
            e_radio, t_radio = radio_cost(profile, self.radio, t.uplink_bytes, t.downlink_bytes)
            self._energy_cache[key] = float(t.energy_j + e_radio + profile.idle_w * t_radio)
        return self._energy_cache[key]

    def client_density(self, client: ClientInfo) -> tuple[float, bool]:
        """(density budget, fits its energy budget) for ``client``."""
        if client.density_budget is not None:
            d = check_number(self.name, f"density_budget of client {client.client_id!r}",
                             client.density_budget, 0.0, 1.0, lo_open=True)
            return min(d, self.density), True
        if client.energy_budget_j is None:
            return self.density, True
        for f in self.budget_factors:
            d = f * self.density
            if self.round_energy(client, d) <= float(client.energy_budget_j):
                return d, True
        return self.budget_factors[-1] * self.density, False

    def nested_masks(self, density: float) -> dict[str, np.ndarray]:
        """Masks at ``density`` (≤ d) nested inside the global mask, by |w| of the global
        weights."""
        if self.masks is None:
            return {}
        f = density / self.density
        out = {}
        for n, g in self.masks.items():
            if f >= 1.0:
                out[n] = g.copy()
                continue
            k = density_count(self.densities[n] * f, g.size)
            out[n] = topk_mask(self.weights[f"{n}.weight"], min(k, int(g.sum())), within=g)
        return out

    # ------------------------------------------------------------------ round
    def masks_for(self, client: ClientInfo) -> dict[str, np.ndarray] | None:
        m = self._round_masks.get(client.client_id)
        if m is not None:
            return m
        if not self.hunted:
            return self.masks
        return self.nested_masks(self.client_density(client)[0])

    def configure_fit(self, rnd: int, clients: list[ClientInfo]) -> list[ClientTask]:
        if not self.weights:
            self.initialize()
        if self.is_hunting(rnd):
            self._round_masks, self._round_density = {}, {}
            return super().configure_fit(rnd, clients)
        state, _ = self.encode_global()
        tasks, cache = [], {}
        self._round_masks, self._round_density, self._over_budget = {}, {}, 0
        for c in clients:
            d, fits = self.client_density(c)
            self._over_budget += int(not fits)
            key = round(d, 12)
            if key not in cache:
                m = self.nested_masks(d)
                cache[key] = (m, encode_masks(m) if m else None, self.client_plan(d))
            m, mbytes, plan = cache[key]
            self._round_masks[c.client_id] = m
            self._round_density[c.client_id] = d
            tasks.append(ClientTask(round=rnd, client_id=c.client_id,
                                    seed=self.client_seed(rnd, c), spec=self.spec,
                                    global_state=state, train=self.train_config(rnd, c),
                                    plan=plan, uplink=self.uplink_for(rnd, c),
                                    schedule=self.schedule_for(rnd, c), global_masks=mbytes))
        return tasks

    def aggregate_fit(self, rnd: int,
                      results: list[tuple[ClientInfo, ClientResult]]) -> dict[str, float]:
        dens = [self._round_density.get(c.client_id, self.density) for c, _ in results]
        out = super().aggregate_fit(rnd, results)
        self._round_masks = {}
        if results and "hunting" not in out:
            out.update(mean_client_density=float(np.mean(dens)),
                       min_client_density=float(np.min(dens)),
                       over_budget=float(self._over_budget))
        return out
