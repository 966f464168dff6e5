"""MaskSchedule: the client half of how a sparse mask changes during local training.

Kinds (see ../shared/ALGORITHMS.md):

* ``fixed`` — the mask given by the server stays as it is (SWAT/ZeroFL have no mask, FLASH
  ``spdst`` and FedDST rounds without readjustment use it).
* ``feddst`` — FedDST's readjustment. When the server sets ``readjust=True`` for the round, at
  the steps ``at_steps`` (default ``(-1,)``: after the last optimizer step of the round), each
  masked layer with ``n`` active weights first drops its ``n - floor(n·(1-α))`` smallest-|w|
  active weights (prune to sparsity ``S + (1-S)·α`` where ``1-S = n/N`` is the layer's current
  density), then grows the same count at the largest ``|grad|`` positions outside the pruned
  mask's *old* support (positions just pruned are not eligible), so the layer's density is
  preserved exactly (the count is capped at ``N - n``, what can grow outside the mask). The gradient is the dense weight gradient of the mean loss over the last
  ``grad_batches`` minibatches (default 1, as the reference code), computed with the current
  weights. Regrown weights start at exactly 0.

  Where the reference code readjusts: ``dst.py`` checks
  ``(curr_epoch - pruning_begin) % pruning_interval == 0`` *after* each local epoch, with
  defaults ``pruning_begin=9``, ``pruning_interval=10`` and 10 local epochs, i.e. after the
  last minibatch of the last local epoch, recomputing the gradient on that last minibatch.
  That is our default ``at_steps=(-1,)``. Other points (e.g. the first step of the last epoch)
  are given as explicit step indices (negative ones count from the end: ``-1`` is the last).
  α is set by the server for the round (it owns the cosine decay and the stop after half the
  rounds).
* ``flash_dst`` — FLASH's local dynamic sparse training (the ``sparselearning`` style used by
  its reference): every ``interval`` optimizer steps, each masked layer drops
  ``round(rate·n)`` of its ``n`` active weights by smallest magnitude, with
  ``rate = prune_rate · ½(1 + cos(π·t/T))`` (``t`` = steps done, ``T`` = total steps of the
  round; ``decay="constant"`` keeps ``prune_rate``), then regrows the same count uniformly at
  random among the inactive positions (a seeded ``numpy`` generator; positions just pruned
  are eligible, as in the reference). Regrown weights start at 0.

Ties in magnitude or gradient are broken by the lower flat index (stable sort), so a schedule
is deterministic for a seed. Masks are per weighted layer (bool arrays of the weight's shape)
and go through ``net.get_masks()`` / ``net.set_masks()``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np

KINDS = ("fixed", "feddst", "flash_dst")
DECAYS = ("cosine", "constant")


class ScheduleError(ValueError):
    """A MaskSchedule is malformed or does not fit the network it runs on."""


# ---------------------------------------------------------------------------------- pure steps
def _stable_order_desc(score: np.ndarray) -> np.ndarray:
    """Flat indices sorted by decreasing score, ties by increasing index."""
    return np.argsort(-score, kind="stable")


def prune_count(n_active: int, alpha: float) -> int:
    """FedDST: how many of ``n_active`` weights are pruned (then regrown) at ratio ``alpha``."""
    keep = int(math.floor(n_active * (1.0 - alpha) + 1e-9))
    return n_active - max(0, min(n_active, keep))


def magnitude_prune(weight: np.ndarray, mask: np.ndarray, n_prune: int) -> np.ndarray:
    """Mask with the ``n_prune`` smallest-|w| active entries of ``mask`` switched off."""
    m = np.asarray(mask, dtype=bool).ravel()
    active = np.flatnonzero(m)
    n_prune = min(int(n_prune), active.size)
    out = m.copy()
    if n_prune > 0:
        mag = np.abs(np.asarray(weight, dtype=np.float64).ravel()[active])
        order = np.argsort(mag, kind="stable")  # smallest first, ties by lower index
        out[active[order[:n_prune]]] = False
    return out.reshape(np.shape(mask))


def grow_by_score(mask: np.ndarray, score: np.ndarray, n_grow: int,
                  exclude: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Switch on the ``n_grow`` inactive positions with the largest ``score``.

    ``exclude`` (bool, same shape) marks positions that may not grow. Returns the new mask and
    the grown flat indices.
    """
    m = np.asarray(mask, dtype=bool).ravel()
    eligible = ~m if exclude is None else ~m & ~np.asarray(exclude, dtype=bool).ravel()
    cand = np.flatnonzero(eligible)
    n_grow = min(int(n_grow), cand.size)
    s = np.abs(np.asarray(score, dtype=np.float64).ravel()[cand])
    grown = cand[_stable_order_desc(s)[:n_grow]]
    out = m.copy()
    out[grown] = True
    return out.reshape(np.shape(mask)), np.sort(grown)


def grow_random(mask: np.ndarray, n_grow: int, rng: np.random.Generator) -> tuple[np.ndarray,
                                                                                  np.ndarray]:
    """Switch on ``n_grow`` inactive positions drawn uniformly without replacement."""
    m = np.asarray(mask, dtype=bool).ravel()
    cand = np.flatnonzero(~m)
    n_grow = min(int(n_grow), cand.size)
    grown = np.sort(rng.choice(cand, size=n_grow, replace=False)) if n_grow else cand[:0]
    out = m.copy()
    out[grown] = True
    return out.reshape(np.shape(mask)), grown


def feddst_readjust(weight: np.ndarray, mask: np.ndarray, grad: np.ndarray,
                    alpha: float) -> tuple[np.ndarray, np.ndarray, int]:
    """One FedDST readjustment of one layer: returns (new mask, grown flat indices, n pruned)."""
    m = np.asarray(mask, dtype=bool)
    n = int(m.sum())
    k = min(prune_count(n, alpha), m.size - n)  # never more than can regrow outside the mask
    pruned = magnitude_prune(weight, m, k)
    new, grown = grow_by_score(pruned, grad, k, exclude=m)
    return new, grown, k


def cosine_rate(rate0: float, t: int, total: int) -> float:
    """``rate0 · ½(1 + cos(π·t/T))``, 0 once ``t >= T``."""
    if total <= 0 or t >= total:
        return 0.0
    return 0.5 * rate0 * (1.0 + math.cos(math.pi * t / total))


def flash_prune_regrow(weight: np.ndarray, mask: np.ndarray, rate: float,
                       rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, int]:
    """One FLASH DST update of one layer: returns (new mask, grown flat indices, n pruned)."""
    m = np.asarray(mask, dtype=bool)
    k = int(round(rate * int(m.sum())))
    pruned = magnitude_prune(weight, m, k)
    new, grown = grow_random(pruned, k, rng)
    return new, grown, k


# ---------------------------------------------------------------------------------- schedule
@dataclass
class MaskSchedule:
    """The mask's behaviour during one client's local training (JSON-serialisable).

    ``kind``: ``fixed`` | ``feddst`` | ``flash_dst``. FedDST: ``readjust`` (the server's
    decision for this round), ``alpha``, ``at_steps``, ``grad_batches``. FLASH:
    ``prune_rate``, ``interval``, ``decay``, ``seed`` (``None``: the task's seed).
    """

    kind: str = "fixed"
    readjust: bool = False
    alpha: float = 0.0
    at_steps: tuple[int, ...] = (-1,)
    grad_batches: int = 1
    prune_rate: float = 0.25
    interval: int = 100
    decay: str = "cosine"
    seed: int | None = None
    #: what happened, filled while training: one dict per (step, layer) update
    events: list[dict[str, Any]] = field(default_factory=list, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ScheduleError(f"kind: expected one of {KINDS}, got {self.kind!r}")
        if not isinstance(self.readjust, bool):
            raise ScheduleError(f"readjust: expected true or false, got {self.readjust!r}")
        _check_unit(self.alpha, "alpha", closed_top=True)
        _check_unit(self.prune_rate, "prune_rate", closed_top=False)
        self.at_steps = tuple(self.at_steps)
        if not self.at_steps or not all(isinstance(s, int) and not isinstance(s, bool)
                                        for s in self.at_steps):
            raise ScheduleError(f"at_steps: expected a non-empty list of step indices, "
                                f"got {self.at_steps!r}")
        for key in ("grad_batches", "interval"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ScheduleError(f"{key}: expected an integer >= 1, got {v!r}")
        if self.decay not in DECAYS:
            raise ScheduleError(f"decay: expected one of {DECAYS}, got {self.decay!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)
                                      or self.seed < 0):
            raise ScheduleError(f"seed: expected a non-negative integer or null, got {self.seed!r}")
        self._layers: list[str] = []
        self._steps: set[int] = set()
        self._total = 0
        self._rng: np.random.Generator | None = None
        self._recent: list[tuple[np.ndarray, np.ndarray]] = []
        self._record: set[int] = set()

    # ------------------------------------------------------------------ builders
    @classmethod
    def fixed(cls) -> MaskSchedule:
        return cls("fixed")

    @classmethod
    def feddst(cls, alpha: float, readjust: bool = True, at_steps: tuple[int, ...] = (-1,),
               grad_batches: int = 1) -> MaskSchedule:
        return cls("feddst", readjust=readjust, alpha=alpha, at_steps=tuple(at_steps),
                   grad_batches=grad_batches)

    @classmethod
    def flash_dst(cls, prune_rate: float = 0.25, interval: int = 100, decay: str = "cosine",
                  seed: int | None = None) -> MaskSchedule:
        return cls("flash_dst", prune_rate=prune_rate, interval=interval, decay=decay, seed=seed)

    # ------------------------------------------------------------------ hooks
    @property
    def active(self) -> bool:
        """Whether this schedule may change the mask at all."""
        if self.kind == "feddst":
            return self.readjust and self.alpha > 0.0
        return self.kind == "flash_dst" and self.prune_rate > 0.0

    def begin(self, net: Any, plan: Any, total_steps: int, seed: int | None = None) -> None:
        """Called once before training: which layers are masked, which steps act."""
        self.events = []
        self._recent = []
        self._total = int(total_steps)
        self._layers = []
        self._steps = set()
        self._record = set()
        if not self.active:
            return
        masks = net.get_masks()
        names = list(plan.layers) if plan is not None else list(masks)
        missing = [n for n in names if masks.get(n) is None]
        if missing:
            raise ScheduleError(f"{self.kind}: layer(s) {missing} have no mask; the plan must be "
                                "in 'masked' mode and the global masks set before training")
        self._layers = names
        if self.kind == "feddst":
            for s in self.at_steps:
                step = s + self._total if s < 0 else s
                if not 0 <= step < self._total:
                    raise ScheduleError(f"at_steps: step {s} is outside the round's "
                                        f"{self._total} steps")
                self._steps.add(step)
            # the batches the readjustment gradients are taken on: the last grad_batches ones
            self._record = {t for s in self._steps for t in range(s - self.grad_batches + 1, s + 1)}
        else:
            s = self.seed if self.seed is not None else (seed or 0)
            self._rng = np.random.default_rng([int(s), 0x464C4153])  # "FLAS"

    def after_step(self, net: Any, step: int, xb: np.ndarray, yb: np.ndarray) -> None:
        """Called after every optimizer step (``step`` counts from 0)."""
        if not self._layers:
            return
        if self.kind == "feddst":
            if step in self._record:
                self._recent.append((np.array(xb, copy=True), np.array(yb, copy=True)))
                del self._recent[:-self.grad_batches]
            if step in self._steps:
                self._readjust(net, step)
        elif (step + 1) % self.interval == 0:
            rate = (self.prune_rate if self.decay == "constant"
                    else cosine_rate(self.prune_rate, step + 1, self._total))
            self._flash(net, step, rate)

    # ------------------------------------------------------------------ internals
    def _dense_grads(self, net: Any) -> dict[str, np.ndarray]:
        """Dense weight gradients of the mean loss over the remembered batches."""
        layers = {n: net.layers[n] for n in self._layers}
        old = {n: getattr(lay, "want_dense_grad", False) for n, lay in layers.items()}
        acc = {n: None for n in self._layers}
        total = sum(len(y) for _, y in self._recent)
        try:
            for lay in layers.values():
                lay.want_dense_grad = True
            for xb, yb in self._recent:
                net.loss_and_grads(xb, yb)
                w = len(yb) / total
                for n, lay in layers.items():
                    g = np.asarray(lay.dense_grad, dtype=np.float64) * w
                    acc[n] = g if acc[n] is None else acc[n] + g
        finally:
            for n, lay in layers.items():
                lay.want_dense_grad = old[n]
        return acc

    def _readjust(self, net: Any, step: int) -> None:
        grads = self._dense_grads(net)
        masks = net.get_masks()
        new_masks = dict(masks)
        for n in self._layers:
            w = net.layers[n].params["weight"]
            new, grown, k = feddst_readjust(w, masks[n], grads[n], self.alpha)
            w.reshape(-1)[grown] = 0.0
            new_masks[n] = new
            self.events.append({"step": step, "layer": n, "pruned": k, "grown": int(grown.size)})
        net.set_masks(new_masks)

    def _flash(self, net: Any, step: int, rate: float) -> None:
        masks = net.get_masks()
        new_masks = dict(masks)
        for n in self._layers:
            w = net.layers[n].params["weight"]
            new, grown, k = flash_prune_regrow(w, masks[n], rate, self._rng)
            w.reshape(-1)[grown] = 0.0
            new_masks[n] = new
            self.events.append({"step": step, "layer": n, "pruned": k, "grown": int(grown.size)})
        net.set_masks(new_masks)

    # ------------------------------------------------------------------ JSON
    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "events"}
        d["at_steps"] = list(self.at_steps)
        return {"format": "sparsefl.maskschedule/1", **d}

    @classmethod
    def from_dict(cls, d: Any, source: str = "mask schedule") -> MaskSchedule:
        if not isinstance(d, dict):
            raise ScheduleError(f"{source}: expected a JSON object")
        d = dict(d)
        fmt = d.pop("format", "sparsefl.maskschedule/1")
        if fmt != "sparsefl.maskschedule/1":
            raise ScheduleError(f"{source}: unknown format {fmt!r}")
        known = {f.name for f in fields(cls)} - {"events"}
        unknown = set(d) - known
        if unknown:
            raise ScheduleError(f"{source}: unknown field(s) {sorted(unknown)}")
        if "at_steps" in d:
            if not isinstance(d["at_steps"], (list, tuple)):
                raise ScheduleError(f"{source}: at_steps must be a list of integers")
            d["at_steps"] = tuple(d["at_steps"])
        try:
            return cls(**d)
        except ScheduleError as e:
            raise ScheduleError(f"{source}: {e}") from None


def _check_unit(v: Any, what: str, closed_top: bool) -> None:
    ok = isinstance(v, (int, float)) and not isinstance(v, bool)
    if ok:
        v = float(v)
        ok = 0.0 <= v <= 1.0 if closed_top else 0.0 <= v < 1.0
    if not ok:
        top = "]" if closed_top else ")"
        raise ScheduleError(f"{what}: expected a number in [0, 1{top}, got {v!r}")


__all__ = ["MaskSchedule", "ScheduleError", "cosine_rate", "feddst_readjust",
           "flash_prune_regrow", "grow_by_score", "grow_random", "magnitude_prune",
           "prune_count"]
