"""SparsityPlan: per-layer weight and activation density, and the sparse mode of each layer.

Modes (see ../shared/ALGORITHMS.md):

* ``dense``  — no sparsity;
* ``swat``   — SWAT: top-K weights in forward (dense input), top-K of the saved input for the
  weight gradient, dense weight gradient, exact top-K refreshed every ``topk_period`` steps;
* ``masked`` — a fixed mask travels with the weights (FedDST, FLASH): forward with W⊙M,
  updates kept inside the mask.

Which layers are sparse by default (``layers=``):

* ``"swat"`` — every conv and linear layer except the first layer and the classifier
  (SWAT, SWAT-FL, ZeroFL);
* ``"all"`` — every conv and linear layer (FedDST's reference code);
* ``"flash"`` — every conv layer and the hidden linear layers; classifier dense (FLASH);
* or an explicit list of layer names.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

from .spec import ModelSpec, SpecError

MODES = ("dense", "swat", "masked")
LAYER_RULES = ("swat", "all", "flash")


class PlanError(ValueError):
    """A SparsityPlan is malformed or does not fit its ModelSpec."""


@dataclass(frozen=True)
class LayerSparsity:
    """Sparsity of one conv/linear layer."""

    weight_density: float
    act_density: float
    topk_period: int = 1

    def __post_init__(self) -> None:
        for key in ("weight_density", "act_density"):
            v = getattr(self, key)
            if not isinstance(v, (int, float)) or not 0.0 < float(v) <= 1.0:
                raise PlanError(f"{key}: expected a density in (0, 1], got {v!r}")
        if not isinstance(self.topk_period, int) or self.topk_period < 1:
            raise PlanError(f"topk_period: expected an integer >= 1, got {self.topk_period!r}")


@dataclass
class SparsityPlan:
    """Per-layer densities for the sparse conv/linear layers; layers not listed stay dense."""

    mode: str = "dense"
    layers: dict[str, LayerSparsity] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise PlanError(f"mode: expected one of {MODES}, got {self.mode!r}")
        if self.mode == "dense" and self.layers:
            raise PlanError("mode 'dense' takes no sparse layers")

    # -------------------------------------------------------------- queries
    def is_sparse(self, layer: str) -> bool:
        return layer in self.layers

    def weight_density(self, layer: str) -> float:
        ls = self.layers.get(layer)
        return 1.0 if ls is None else float(ls.weight_density)

    def act_density(self, layer: str) -> float:
        ls = self.layers.get(layer)
        return 1.0 if ls is None else float(ls.act_density)

    def check(self, spec: ModelSpec) -> SparsityPlan:
        """Raise PlanError if a layer named here is not a conv/linear layer of ``spec``."""
        weighted = set(spec.weighted_layers())
        for name in self.layers:
            if name not in weighted:
                raise PlanError(
                    f"plan names layer {name!r}, which is not a conv/linear layer of "
                    f"{spec.name!r}; its sparse-able layers are: {', '.join(spec.weighted_layers())}"
                )
        return self

    def total_density(self, spec: ModelSpec) -> float:
        """Fraction of non-zero weights over all conv/linear weights of ``spec``."""
        nnz = tot = 0.0
        for name in spec.weighted_layers():
            n = math.prod(spec.param_shapes(name)[f"{name}.weight"])
            tot += n
            nnz += n * self.weight_density(name)
        return nnz / tot

    # -------------------------------------------------------------- builders
    @classmethod
    def dense(cls) -> SparsityPlan:
        return cls("dense", {})

    @classmethod
    def uniform(cls, spec: ModelSpec, sparsity: float, mode: str = "swat",
                layers: str | list[str] = "swat", act_sparsity: float | None = None,
                topk_period: int = 1) -> SparsityPlan:
        """Every sparse layer at ``sparsity`` (activations at ``act_sparsity``, default the same)."""
        _check_sparsity(sparsity, "sparsity")
        if mode == "dense" or sparsity == 0.0:
            return cls.dense()
        act = sparsity if act_sparsity is None else _check_sparsity(act_sparsity, "act_sparsity")
        names = sparse_layer_names(spec, layers)
        return cls(mode, {n: LayerSparsity(1.0 - sparsity, _act_density(mode, act), topk_period)
                          for n in names}).check(spec)

    @classmethod
    def erk(cls, spec: ModelSpec, sparsity: float, mode: str = "masked",
            layers: str | list[str] = "all", act_sparsity: float | None = None,
            topk_period: int = 1) -> SparsityPlan:
        """Erdős–Rényi-Kernel budgets (RigL), capped at density 1, total density ``1 - sparsity``.

        Dense layers outside the sparse set do not count towards the total (as in RigL).
        """
        _check_sparsity(sparsity, "sparsity")
        if mode == "dense" or sparsity == 0.0:
            return cls.dense()
        names = sparse_layer_names(spec, layers)
        dens = erk_densities(spec, names, 1.0 - sparsity)
        act = sparsity if act_sparsity is None else _check_sparsity(act_sparsity, "act_sparsity")
        return cls(mode, {n: LayerSparsity(dens[n], _act_density(mode, act), topk_period)
                          for n in names if dens[n] < 1.0}).check(spec)

    # -------------------------------------------------------------- JSON
    def to_dict(self) -> dict[str, Any]:
        return {"format": "sparsefl.sparsityplan/1", "mode": self.mode,
                "layers": {k: asdict(v) for k, v in self.layers.items()}}

    def to_json(self, indent: int | None = None) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, d: Any, source: str = "sparsity plan") -> SparsityPlan:
        if not isinstance(d, dict):
            raise PlanError(f"{source}: expected a JSON object")
        if d.get("format", "sparsefl.sparsityplan/1") != "sparsefl.sparsityplan/1":
            raise PlanError(f"{source}: unknown format {d.get('format')!r}")
        layers = d.get("layers", {})
        if not isinstance(layers, dict):
            raise PlanError(f"{source}: 'layers' must be an object of layer name -> densities")
        out = {}
        for name, ls in layers.items():
            if not isinstance(ls, dict):
                raise PlanError(f"{source}: layers[{name!r}] must be an object")
            unknown = set(ls) - {"weight_density", "act_density", "topk_period"}
            if unknown:
                raise PlanError(f"{source}: layers[{name!r}]: unknown key(s) {sorted(unknown)}")
            try:
                out[name] = LayerSparsity(**ls)
            except (PlanError, TypeError) as e:
                raise PlanError(f"{source}: layers[{name!r}]: {e}") from None
        try:
            return cls(d.get("mode", "dense"), out)
        except PlanError as e:
            raise PlanError(f"{source}: {e}") from None

    @classmethod
    def from_json(cls, text: str | bytes, source: str = "sparsity plan") -> SparsityPlan:
        if len(text) > 4 * 1024 * 1024:
            raise PlanError(f"{source}: larger than 4 MiB; not a sparsity plan")
        try:
            return cls.from_dict(json.loads(text), source)
        except json.JSONDecodeError as e:
            raise PlanError(f"{source}: not valid JSON ({e})") from None


def _check_sparsity(s: Any, what: str) -> float:
    if isinstance(s, bool) or not isinstance(s, (int, float)) or not 0.0 <= float(s) < 1.0:
        raise PlanError(f"{what}: expected a sparsity in [0, 1), got {s!r}")
    return float(s)


def _act_density(mode: str, act_sparsity: float) -> float:
    # Activation sparsity is a SWAT notion; masked training saves dense activations.
    return 1.0 - act_sparsity if mode == "swat" else 1.0


def sparse_layer_names(spec: ModelSpec, layers: str | list[str]) -> list[str]:
    """Resolve a layer rule (``swat``, ``all``, ``flash``) or an explicit list to layer names."""
    weighted = spec.weighted_layers()
    if isinstance(layers, str):
        if layers == "all":
            return weighted
        if layers == "swat":
            first, last = spec.first_layer(), spec.classifier()
            return [n for n in weighted if n not in (first, last)]
        if layers == "flash":
            last = spec.classifier()
            return [n for n in weighted if n != last]
        raise PlanError(f"layers: expected one of {LAYER_RULES} or a list of names, got {layers!r}")
    names = list(layers)
    for n in names:
        if n not in weighted:
            raise PlanError(f"layers: {n!r} is not a conv/linear layer of {spec.name!r}; "
                            f"known: {', '.join(weighted)}")
    return names


def erk_densities(spec: ModelSpec, names: list[str], density: float) -> dict[str, float]:
    """ERK per-layer densities over ``names`` with total density ``density``, capped at 1.

    Density of layer l ∝ (c_in + c_out + k_h + k_w) / (c_in·c_out·k_h·k_w) (linear: k = 1
    dropped from the sum as in RigL's ``erdos_renyi`` for 2-D weights); layers whose density
    would exceed 1 are fixed at 1 and the rest rescaled, repeatedly.
    """
    if not 0.0 < density <= 1.0:
        raise PlanError(f"density: expected (0, 1], got {density!r}")
    sizes, raw = {}, {}
    for n in names:
        try:
            shape = spec.param_shapes(n)[f"{n}.weight"]
        except (KeyError, SpecError):
            raise PlanError(f"layer {n!r} has no weight") from None
        sizes[n] = math.prod(shape)
        raw[n] = sum(shape) / math.prod(shape)
    dense: set[str] = set()
    while True:
        budget = density * sum(sizes.values()) - sum(sizes[n] for n in dense)
        free = [n for n in names if n not in dense]
        denom = sum(raw[n] * sizes[n] for n in free)
        eps = budget / denom if denom > 0 else 0.0
        over = [n for n in free if eps * raw[n] > 1.0]
        if not over:
            break
        dense.update(over)
    return {n: 1.0 if n in dense else eps * raw[n] for n in names}
