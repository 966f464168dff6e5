"""Estimates: time and energy of a local round on a device, budgets, and fleet-scale estimates.

Time model, per layer and phase (one row of :func:`hwmodel.counts.count`)::

    compute = 2·dense_macs / (eff_mac · peak) · phi(d)
              + other_elem_flops / (eff_el · peak) + topk_flops / (eff[topk] · peak)
              + compress_flops / (eff[compress] · peak) + compress_nnz · compress_nnz_s
    memory  = (bytes_read + bytes_written) / bw      (bw = cache_bandwidth if bytes <= cache_bytes)
    time    = max(compute, memory) + (1 - overlap) · min(compute, memory) + overhead[kind]
              (rows that do work; 0 otherwise)

``peak`` is the FP32 peak of the cluster the trainer runs on. Efficiencies are looked up from
the most specific key the profile has (:func:`kind_of` names a row's kind):
``eff_mac``: ``<class>_<phase>`` (``conv_backward_weight``) then the class (``conv``/``gemm``);
``eff_el`` of an elementwise row: ``<kind>_<forward|backward>``, ``<kind>``, ``elementwise``
(``update`` rows: ``update``, ``elementwise``; a conv/gemm row's bias: ``<class>_bias``,
``elementwise``);
``topk`` and ``compress`` fall back to ``elementwise``. ``phi(d)`` is 1 for dense rows; for a
sparse row ``d / es + f`` when the profile has a :class:`~hwmodel.profile.SparseKernel` for
``<class>_<phase>`` and ``d / sparse_eff(d)`` (the profile's sparse-efficiency curve, see
:class:`hwmodel.profile.SparseEfficiency`) otherwise. ``overhead[kind]`` falls back to
``overhead_s``. With none of the optional fields (no finer keys, no sparse kernels,
``compress_nnz_s = 0``, no cache, ``overlap = 1``) this is the plain roofline
``max(2·dense_macs·d/sparse_eff(d) / (eff[class]·peak) + elem_flops / (eff[elementwise]·peak),
bytes / bandwidth) + overhead_s``.

Energy: ``energy = busy_w × time`` for compute (``busy_w`` is the whole device under load, so
it already holds the idle floor). The *idle share* is the time the device is awake but not
computing: while the radio transfers, the device draws ``idle_w``; so a round's energy is
``busy_w × compute time + radio energy + idle_w × radio time`` (:func:`budget`). The radio
energy is the profile's Radio model ``up·J/B_up + down·J/B_down + session_j`` and the radio
time ``8·bytes / rate``.

A local round is ``epochs`` passes over ``samples`` samples in steps of ``batch`` (the last
step of each epoch holds the remainder). Wire bytes per round use :mod:`hwmodel.wire`: the
downlink is the whole state (``dense32``), the uplink sends each sparse layer's weight with
``uplink_codec`` (``coo32`` by default) at its density and every other tensor ``dense32``
(BN counters stay on the device). The papers' CSR count (8 bytes per non-zero of everything
sent) is reported beside it.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from .counts import FLOPS_CONVENTION, count_rows, memory_breakdown, nnz_at
from .models import load_model
from .plan import SparsityPlan, sparse_layer_names
from .profile import DeviceProfile, SparseEfficiency
from .provenance import Provenance
from .spec import ModelSpec
from .wire import (
    VALUE_BYTES,
    paper_csr_bytes,
    state_bytes,
    state_entry_overhead,
    tensor_bytes,
    tensor_bytes_vec,
)

#: Samples per client when not given (CIFAR-10's 50,000 over 100 clients, the ZeroFL setup).
DEFAULT_SAMPLES = 500
#: Sparsities ``budget`` tries when it lists the ones that fit.
DEFAULT_SPARSITIES = (0.0, 0.5, 0.8, 0.9, 0.95, 0.98)

_CONTRACT_TOTALS = ("forward_macs", "train_flops", "params", "peak_memory_bytes", "time_s",
                    "energy_j", "uplink_bytes", "downlink_bytes")


# ---------------------------------------------------------------------------- device & model
def resolve_device(device: DeviceProfile | str) -> DeviceProfile:
    """A DeviceProfile as given, or loaded by name or path with :func:`hwmodel.profiles.load_profile`."""
    if isinstance(device, DeviceProfile):
        return device
    if not isinstance(device, str):
        raise TypeError(f"device: expected a DeviceProfile, a name or a path, got {device!r}")
    from .profiles import load_profile  # lazy: profiles reads TOML files

    return load_profile(device)


def resolve_model(spec_or_name: ModelSpec | str) -> ModelSpec:
    if isinstance(spec_or_name, ModelSpec):
        return spec_or_name
    if isinstance(spec_or_name, str):
        return load_model(spec_or_name)
    raise TypeError(f"model: expected a ModelSpec, a name or a path, got {spec_or_name!r}")


def provenance_of(profile: DeviceProfile) -> Provenance:
    """``calibrated-estimate`` when the profile was fitted to measurements, else ``estimated``."""
    return Provenance.CALIBRATED_ESTIMATE if profile.fitted else Provenance.ESTIMATED


def sparse_efficiency_vec(se: SparseEfficiency, density: np.ndarray | float) -> np.ndarray:
    """Sparse efficiency at ``density`` as an array (:func:`hwmodel.profiles.efficiency_at`:
    linear in log-density, clamped below, towards (1, 1) above the table, 1 at density 1)."""
    from .profiles import efficiency_at

    return np.asarray(efficiency_at(se, np.asarray(density, dtype=np.float64)), dtype=np.float64)


def _eff(profile: DeviceProfile, cls: str) -> float:
    try:
        return float(profile.efficiency[cls])
    except KeyError:
        raise ValueError(f"profile {profile.name!r}: no efficiency for op class {cls!r}") from None


_KIND = {"conv2d": "conv", "linear": "gemm", "maxpool2d": "pool", "avgpool2d": "pool",
         "global_avgpool": "global_avgpool", "batchnorm2d": "norm", "groupnorm": "norm",
         "relu": "activation", "dropout": "activation", "flatten": "activation", "add": "add",
         "cross_entropy": "loss"}


def kind_of(layer_type: str, phase: str) -> str:
    """The kind of work of a count row: ``update`` for optimizer rows, else by op (``conv``,
    ``gemm``, ``pool``, ``global_avgpool``, ``norm``, ``activation``, ``add``, ``loss``;
    ``elementwise`` for an op not listed)."""
    if phase == "update":
        return "update"
    return _KIND.get(layer_type, "elementwise")


def mac_efficiency_keys(kind: str, phase: str) -> tuple[str, ...]:
    """Lookup order of the MAC efficiency of a conv/gemm row."""
    return (f"{kind}_{phase}", kind)


def elem_efficiency_keys(kind: str, phase: str) -> tuple[str, ...]:
    """Lookup order of the elementwise efficiency of a row (a conv/gemm row's bias adds:
    ``<class>_bias``, then ``elementwise``)."""
    if kind in ("conv", "gemm"):
        return (f"{kind}_bias", "elementwise")
    if kind == "elementwise":
        return ("elementwise",)
    if kind == "update":
        return ("update", "elementwise")
    half = "forward" if phase == "forward" else "backward"
    return (f"{kind}_{half}", kind, "elementwise")


def _lookup(table: dict[str, float], keys: tuple[str, ...], default: float) -> float:
    for k in keys:
        if k in table:
            return float(table[k])
    return default


@dataclass(frozen=True)
class _RowParams:
    """Profile constants per row (arrays aligned with the rows)."""

    e_mac: np.ndarray
    e_el: np.ndarray
    overhead: np.ndarray
    sk_eff: np.ndarray  # sparse kernel: efficiency per kept MAC (NaN: use the curve)
    sk_fixed: np.ndarray


def row_params(profile: DeviceProfile, kinds: Any, phases: Any) -> _RowParams:
    """Look up each row's efficiencies, overhead and sparse kernel (see the module docstring)."""
    kinds = np.asarray(kinds)
    phases = np.broadcast_to(np.asarray(phases), kinds.shape)
    eff = profile.efficiency
    base_el = _eff(profile, "elementwise")
    cache: dict[tuple[str, str], tuple[float, ...]] = {}
    out = np.empty(kinds.shape + (5,))
    for idx in np.ndindex(kinds.shape):
        key = (str(kinds[idx]), str(phases[idx]))
        v = cache.get(key)
        if v is None:
            k, ph = key
            cls = k if k in ("conv", "gemm") else "elementwise"
            e_mac = _lookup(eff, mac_efficiency_keys(k, ph), _eff(profile, cls)) if cls != "elementwise" else 1.0
            e_el = _lookup(eff, elem_efficiency_keys(k, ph), base_el)
            ovh = _lookup(profile.overheads, (k, cls), profile.overhead_s)
            sk = profile.sparse_kernels.get(f"{k}_{ph}")
            v = cache[key] = (e_mac, e_el, ovh, np.nan if sk is None else sk.efficiency,
                              0.0 if sk is None else sk.fixed)
        out[idx] = v
    return _RowParams(*(out[..., i] for i in range(5)))


def time_rows(profile: DeviceProfile, kind: Any, phase: Any, dense_macs: Any, density: Any,
              elem_flops: Any, bytes_moved: Any, topk_flops: Any = 0.0, compress_flops: Any = 0.0,
              compress_nnz: Any = 0.0, params: _RowParams | None = None,
              sparse_eff: Any = None) -> np.ndarray:
    """Seconds per row (the module docstring's model); numeric arrays broadcast against the
    rows' ``kind``/``phase``. ``elem_flops`` includes ``topk_flops`` and ``compress_flops``
    (as in :func:`hwmodel.counts.count`). Rows without work take 0. ``params`` (from
    :func:`row_params`) and ``sparse_eff`` (the curve at ``density``) may be precomputed."""
    p = row_params(profile, kind, phase) if params is None else params
    peak = profile.peak_gflops * 1e9
    d = np.asarray(density, dtype=np.float64)
    dm = np.asarray(dense_macs, dtype=np.float64)
    topk = np.asarray(topk_flops, dtype=np.float64)
    comp = np.asarray(compress_flops, dtype=np.float64)
    el_all = np.asarray(elem_flops, dtype=np.float64)
    sparse = d < 1.0
    if sparse_eff is None:
        sparse_eff = sparse_efficiency_vec(profile.sparse_efficiency, np.minimum(d, 1.0))
    has_sk = np.isfinite(p.sk_eff)
    sk_eff = np.where(has_sk, p.sk_eff, 1.0)
    phi = np.where(sparse, np.where(has_sk, d / sk_eff + p.sk_fixed, d / sparse_eff), 1.0)
    mac = 2.0 * dm / (p.e_mac * peak) * phi
    e_topk = _lookup(profile.efficiency, ("topk", "elementwise"), 1.0)
    e_comp = _lookup(profile.efficiency, ("compress", "elementwise"), 1.0)
    el = ((el_all - topk - comp) / (p.e_el * peak) + topk / (e_topk * peak)
          + comp / (e_comp * peak) + np.asarray(compress_nnz, dtype=np.float64) * profile.compress_nnz_s)
    by = np.asarray(bytes_moved, dtype=np.float64)
    bw = profile.mem_bandwidth_gbs * 1e9
    if profile.cache_bytes > 0:
        cbw = (profile.cache_bandwidth_gbs or profile.mem_bandwidth_gbs) * 1e9
        mem = by / np.where(by <= profile.cache_bytes, cbw, bw)
    else:
        mem = by / bw
    comp_t = mac + el
    t = np.maximum(comp_t, mem)
    if profile.overlap != 1.0:
        t = t + (1.0 - profile.overlap) * np.minimum(comp_t, mem)
    work = (comp_t + mem) > 0
    return np.where(work, t + p.overhead, 0.0)


def rows_time(profile: DeviceProfile, rows: list[dict]) -> np.ndarray:
    """Seconds of count rows (dicts or a DataFrame's records), per :func:`time_rows`."""
    return time_rows(
        profile,
        np.array([kind_of(r["type"], r["phase"]) for r in rows]),
        np.array([r["phase"] for r in rows]),
        np.array([r["dense_macs"] for r in rows], dtype=np.float64),
        np.array([r["density"] for r in rows], dtype=np.float64),
        np.array([r["elem_flops"] for r in rows], dtype=np.float64),
        np.array([r["bytes_read"] + r["bytes_written"] for r in rows], dtype=np.float64),
        np.array([r["topk_flops"] for r in rows], dtype=np.float64),
        np.array([r["compress_flops"] for r in rows], dtype=np.float64),
        np.array([r.get("compress_nnz", 0.0) for r in rows], dtype=np.float64),
    )


# ---------------------------------------------------------------------------- wire and radio
def _state_entries(spec: ModelSpec) -> list[tuple[str, tuple[int, ...], str]]:
    params = spec.param_shapes()
    return [(k, s, "f32" if k in params or not k.endswith("num_batches_tracked") else "i64")
            for k, s in spec.state_shapes().items()]


def wire_bytes(spec: ModelSpec, plan: SparsityPlan, uplink_codec: str = "coo32") -> dict[str, int]:
    """Bytes of one round's downlink (dense32 state) and uplink (sparse weights with the codec)."""
    down = state_bytes((k, tensor_bytes("dense32", s, dtype=dt)) for k, s, dt in _state_entries(spec))
    up_entries, nnz_total = [], 0
    for k, s, dt in _state_entries(spec):
        if k.endswith("num_batches_tracked"):
            continue
        layer = k.rsplit(".", 1)[0]
        numel = math.prod(s)
        if k.endswith(".weight") and plan.is_sparse(layer) and plan.weight_density(layer) < 1.0:
            nnz = nnz_at(numel, plan.weight_density(layer))
            up_entries.append((k, tensor_bytes(uplink_codec, s, nnz=nnz, dtype=dt)))
        else:
            nnz = numel
            up_entries.append((k, tensor_bytes("dense32", s, dtype=dt)))
        nnz_total += nnz
    return {"uplink_bytes": state_bytes(up_entries), "downlink_bytes": down,
            "uplink_paper_csr_bytes": paper_csr_bytes(nnz_total)}


def radio_cost(profile: DeviceProfile, radio: str | None, up_bytes: Any,
               down_bytes: Any) -> tuple[Any, Any]:
    """(energy J, time s) of sending ``up_bytes`` and receiving ``down_bytes`` with the radio."""
    if radio is None:
        return 0.0, 0.0
    if radio not in profile.radios:
        known = ", ".join(sorted(profile.radios)) or "none"
        raise ValueError(f"device {profile.name!r} has no radio {radio!r}; its radios: {known}")
    r = profile.radios[radio]
    energy = up_bytes * r.up_j_per_byte + down_bytes * r.down_j_per_byte + r.session_j
    time = 8.0 * up_bytes / (r.up_mbps * 1e6) + 8.0 * down_bytes / (r.down_mbps * 1e6)
    return energy, time


# ---------------------------------------------------------------------------- one client
@dataclass
class LayerEstimate:
    """One node (or the loss) over a local round."""

    name: str
    type: str
    params: int
    forward_macs: float
    train_flops: float
    time_s: float
    energy_j: float


@dataclass
class Totals:
    """Totals of a local round (peak memory: of one training step at the batch size)."""

    forward_macs: float
    train_flops: float
    params: int
    peak_memory_bytes: int
    time_s: float
    energy_j: float
    uplink_bytes: int
    downlink_bytes: int


@dataclass
class RoundCost:
    """Everything computed for one plan: per-layer results, totals and the extras."""

    layers: list[LayerEstimate]
    totals: Totals
    uplink_paper_csr_bytes: int
    memory: dict[str, float]
    rows: pd.DataFrame  # per layer and phase, one step at ``batch``, with time_s


@dataclass
class Estimate:
    """The estimate of one local round; ``to_dict()`` is the CLI's JSON contract."""

    model: str
    device: str
    sparsity: float
    mode: str
    batch: int
    samples: int
    epochs: int
    steps: int
    provenance: Provenance
    sparse: RoundCost
    dense: RoundCost
    radio: str | None = None
    radio_energy_j: float | None = None
    radio_time_s: float | None = None
    dense_radio_energy_j: float | None = None
    dense_radio_time_s: float | None = None
    ram_bytes: int = 0
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def layers(self) -> list[LayerEstimate]:
        return self.sparse.layers

    @property
    def totals(self) -> Totals:
        return self.sparse.totals

    @property
    def dense_totals(self) -> Totals:
        return self.dense.totals

    def to_dict(self) -> dict[str, Any]:
        """The JSON contract (issue 2 §7) plus ``provenance`` and ``flops_convention``."""
        return {
            "model": self.model,
            "device": self.device,
            "sparsity": self.sparsity,
            "layers": [asdict(x) for x in self.sparse.layers],
            "totals": asdict(self.sparse.totals),
            "dense_totals": asdict(self.dense.totals),
            "provenance": self.provenance.value,
            "flops_convention": FLOPS_CONVENTION,
        }


def _round_cost(spec: ModelSpec, plan: SparsityPlan, profile: DeviceProfile, batch: int,
                samples: int, epochs: int, optimizer: str, uplink_codec: str) -> RoundCost:
    n_full, rem = divmod(samples, batch)
    full = count_rows(spec, plan, batch, optimizer)
    t_full = rows_time(profile, full)
    parts = [(full, t_full, n_full * epochs)]
    if rem:
        part = count_rows(spec, plan, rem, optimizer)
        parts.append((part, rows_time(profile, part), epochs))
    order: list[str] = []
    agg: dict[str, dict[str, Any]] = {}
    for rows, times, mult in parts:
        for r, t in zip(rows, times, strict=True):
            a = agg.get(r["layer"])
            if a is None:
                order.append(r["layer"])
                a = agg[r["layer"]] = {"type": r["type"], "params": r["params"], "wd": r["weight_density"],
                                       "fwd": 0.0, "flops": 0.0, "time": 0.0}
            if r["phase"] == "forward":
                a["fwd"] += mult * r["macs"]
            a["flops"] += mult * r["flops"]
            a["time"] += mult * float(t)
    layers = []
    for name in order:
        a = agg[name]
        node_params = a["params"]
        if name in spec and spec[name].op in ("conv2d", "linear"):
            w = math.prod(spec.param_shapes(name)[f"{name}.weight"])
            node_params = nnz_at(w, plan.weight_density(name)) + (a["params"] - w)
        layers.append(LayerEstimate(name, a["type"], int(node_params), a["fwd"], a["flops"],
                                    a["time"], a["time"] * profile.busy_w))
    input_bytes = batch * (math.prod(spec.input_shape) * 4 + 8)
    memory = memory_breakdown(full, input_bytes)
    wire = wire_bytes(spec, plan, uplink_codec)
    totals = Totals(
        forward_macs=sum(x.forward_macs for x in layers),
        train_flops=sum(x.train_flops for x in layers),
        params=sum(x.params for x in layers),
        peak_memory_bytes=int(round(memory["peak_memory_bytes"])),
        time_s=sum(x.time_s for x in layers),
        energy_j=sum(x.energy_j for x in layers),
        uplink_bytes=wire["uplink_bytes"],
        downlink_bytes=wire["downlink_bytes"],
    )
    df = pd.DataFrame(full)
    df["time_s"] = t_full
    return RoundCost(layers, totals, wire["uplink_paper_csr_bytes"], memory, df)


def _check_round(batch: int, samples: int, epochs: int) -> None:
    for key, v in (("batch", batch), ("samples", samples), ("epochs", epochs)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"{key}: expected an integer >= 1, got {v!r}")


def default_layers(mode: str) -> str:
    """Which layers are sparse by default (ALGORITHMS.md): SWAT's rule (first layer and
    classifier dense) for ``swat``, every conv/linear layer (FedDST) for ``masked``."""
    return "all" if mode == "masked" else "swat"


def make_plan(spec: ModelSpec, sparsity: float, mode: str,
              layers: str | list[str] | None = None) -> SparsityPlan:
    """The uniform plan ``estimate`` uses (``mode='dense'`` or sparsity 0 gives a dense plan)."""
    if mode not in ("dense", "swat", "masked"):
        raise ValueError(f"mode: expected dense, swat or masked, got {mode!r}")
    layers = default_layers(mode) if layers is None else layers
    return SparsityPlan.uniform(spec, float(sparsity), mode=mode, layers=layers)


def estimate(spec_or_name: ModelSpec | str, device: DeviceProfile | str, sparsity: float = 0.0,
             mode: str = "swat", batch: int = 32, samples: int = DEFAULT_SAMPLES, epochs: int = 1,
             radio: str | None = "wifi", uplink_codec: str = "coo32",
             plan: SparsityPlan | None = None, layers: str | list[str] | None = None,
             optimizer: str = "sgd_momentum") -> Estimate:
    """Estimate one local round (``epochs`` × ``samples`` at ``batch``) on ``device``.

    The sparse side uses ``plan`` if given, else a uniform plan at ``sparsity`` over the
    ``layers`` rule (default: ``swat`` for mode swat, ``all`` for masked); the dense side is the same round without sparsity. Radio figures are
    ``None`` when the device has no such radio. FLOPs = 2 x MACs (fvcore/ptflops report MACs).
    """
    spec = resolve_model(spec_or_name)
    profile = resolve_device(device)
    _check_round(batch, samples, epochs)
    if plan is None:
        plan = make_plan(spec, sparsity, mode, layers)
    else:
        plan.check(spec)
        mode = plan.mode
        sparsity = 1.0 - plan.total_density(spec)
    dense = SparsityPlan.dense()
    sp = _round_cost(spec, plan, profile, batch, samples, epochs, optimizer, uplink_codec)
    de = _round_cost(spec, dense, profile, batch, samples, epochs, optimizer, uplink_codec)
    n_full, rem = divmod(samples, batch)
    est = Estimate(model=spec.name, device=profile.name, sparsity=float(sparsity), mode=mode,
                   batch=batch, samples=samples, epochs=epochs,
                   steps=epochs * (n_full + (1 if rem else 0)), provenance=provenance_of(profile),
                   sparse=sp, dense=de, ram_bytes=int(profile.ram_bytes))
    if radio is not None and radio in profile.radios:
        est.radio = radio
        est.radio_energy_j, est.radio_time_s = radio_cost(
            profile, radio, sp.totals.uplink_bytes, sp.totals.downlink_bytes)
        est.dense_radio_energy_j, est.dense_radio_time_s = radio_cost(
            profile, radio, de.totals.uplink_bytes, de.totals.downlink_bytes)
    return est


# ---------------------------------------------------------------------------- budgets
@dataclass
class Budget:
    """Energy and time of a federated round on one device, and what a budget affords."""

    model: str
    device: str
    sparsity: float
    mode: str
    radio: str
    samples: int
    epochs: int
    batch: int
    compute_time_per_round_s: float
    radio_time_per_round_s: float
    time_per_round_s: float
    compute_energy_per_round_j: float
    radio_energy_per_round_j: float
    idle_energy_per_round_j: float
    energy_per_round_j: float
    uplink_bytes: int
    downlink_bytes: int
    uplink_paper_csr_bytes: int
    budget_j: float | None
    budget_source: str
    rounds_within_budget: int | None
    affordable: bool | None
    peak_memory_bytes: int
    ram_bytes: int
    fits_ram: bool
    ram_verdict: str
    sparsity_options: list[dict[str, Any]]
    sparsities_that_fit: list[float]
    provenance: str
    flops_convention: str = FLOPS_CONVENTION

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _round_energy(est: Estimate, profile: DeviceProfile, radio: str) -> dict[str, float]:
    t = est.sparse.totals
    e_radio, t_radio = radio_cost(profile, radio, t.uplink_bytes, t.downlink_bytes)
    idle = profile.idle_w * t_radio
    return {"compute_time": t.time_s, "radio_time": t_radio, "time": t.time_s + t_radio,
            "compute_energy": t.energy_j, "radio_energy": e_radio, "idle_energy": idle,
            "energy": t.energy_j + e_radio + idle}


def _ram_verdict(peak: int, ram: int) -> tuple[bool, str]:
    frac = peak / ram if ram else float("inf")
    if frac <= 0.5:
        return True, f"fits: peak {peak / 2**20:.1f} MiB is {100 * frac:.1f}% of {ram / 2**30:.2f} GiB RAM"
    if frac <= 1.0:
        return True, (f"tight: peak {peak / 2**20:.1f} MiB is {100 * frac:.1f}% of "
                      f"{ram / 2**30:.2f} GiB RAM (OS and runtime need the rest)")
    return False, f"does not fit: peak {peak / 2**20:.1f} MiB exceeds {ram / 2**30:.2f} GiB RAM"


def budget(spec_or_name: ModelSpec | str, device: DeviceProfile | str, sparsity: float = 0.0,
           mode: str = "swat", batch: int = 32, samples: int = DEFAULT_SAMPLES, epochs: int = 1,
           radio: str = "wifi", battery_pct: float | None = None, joules: float | None = None,
           uplink_codec: str = "coo32", sparsities: tuple[float, ...] = DEFAULT_SPARSITIES,
           min_rounds: int = 1, plan: SparsityPlan | None = None) -> Budget:
    """Energy/time per federated round (compute and radio apart) and the rounds a budget affords.

    The budget is ``battery_pct`` % of the battery (devices without a battery: an error) or
    ``joules`` J; with neither, a battery device uses its full charge and others report no
    round count. ``sparsity_options`` repeats the figures for each of ``sparsities`` (and the
    requested one); ``sparsities_that_fit`` are those that fit the RAM and afford at least
    ``min_rounds`` rounds. ``plan`` (optional, e.g. a strategy's per-layer plan) replaces the
    uniform plan at ``sparsity`` for the requested figures (its mode is the mode); ``sparsity``
    then only labels it, and the other options use uniform plans of that mode.
    """
    spec = resolve_model(spec_or_name)
    if plan is not None:
        plan.check(spec)
        mode = plan.mode
    profile = resolve_device(device)
    if battery_pct is not None and joules is not None:
        raise ValueError("give either battery_pct or joules, not both")
    if radio not in profile.radios:
        known = ", ".join(sorted(profile.radios)) or "none"
        raise ValueError(f"device {profile.name!r} has no radio {radio!r}; its radios: {known}")
    if battery_pct is not None:
        if profile.battery_wh is None:
            raise ValueError(f"device {profile.name!r} has no battery (battery_wh is not set); "
                             "give a budget in joules instead (--joules J)")
        if not 0.0 < float(battery_pct) <= 100.0:
            raise ValueError(f"battery_pct: expected a percentage in (0, 100], got {battery_pct!r}")
        budget_j: float | None = profile.battery_wh * 3600.0 * float(battery_pct) / 100.0
        source = f"{float(battery_pct):g}% of a {profile.battery_wh:g} Wh battery"
    elif joules is not None:
        if not float(joules) > 0.0:
            raise ValueError(f"joules: expected a positive energy, got {joules!r}")
        budget_j, source = float(joules), f"{float(joules):g} J"
    elif profile.battery_wh is not None:
        budget_j = profile.battery_wh * 3600.0
        source = f"a full {profile.battery_wh:g} Wh battery"
    else:
        budget_j, source = None, "none (device has no battery; give joules)"

    def rounds(e: float) -> int | None:
        return None if budget_j is None else int(math.floor(budget_j / e)) if e > 0 else None

    est = estimate(spec, profile, sparsity, mode, batch, samples, epochs, radio, uplink_codec,
                   plan=plan)
    r = _round_energy(est, profile, radio)
    fits, verdict = _ram_verdict(est.totals.peak_memory_bytes, profile.ram_bytes)
    options, fit = [], []
    for s in sorted(set(float(x) for x in sparsities) | {float(sparsity)}):
        e = est if s == float(sparsity) else estimate(spec, profile, s, mode, batch, samples,
                                                      epochs, radio, uplink_codec)
        rs = _round_energy(e, profile, radio)
        f_ram, _ = _ram_verdict(e.totals.peak_memory_bytes, profile.ram_bytes)
        n = rounds(rs["energy"])
        ok = f_ram and (n is None or n >= min_rounds)
        options.append({"sparsity": s, "energy_per_round_j": rs["energy"],
                        "time_per_round_s": rs["time"], "rounds_within_budget": n,
                        "peak_memory_bytes": e.totals.peak_memory_bytes, "fits_ram": f_ram,
                        "fits": ok})
        if ok:
            fit.append(s)
    n_rounds = rounds(r["energy"])
    return Budget(
        model=spec.name, device=profile.name, sparsity=float(sparsity), mode=mode,
        radio=radio, samples=samples, epochs=epochs, batch=batch,
        compute_time_per_round_s=r["compute_time"], radio_time_per_round_s=r["radio_time"],
        time_per_round_s=r["time"], compute_energy_per_round_j=r["compute_energy"],
        radio_energy_per_round_j=r["radio_energy"], idle_energy_per_round_j=r["idle_energy"],
        energy_per_round_j=r["energy"], uplink_bytes=est.totals.uplink_bytes,
        downlink_bytes=est.totals.downlink_bytes,
        uplink_paper_csr_bytes=est.sparse.uplink_paper_csr_bytes, budget_j=budget_j,
        budget_source=source, rounds_within_budget=n_rounds,
        affordable=None if n_rounds is None else n_rounds >= 1,
        peak_memory_bytes=est.totals.peak_memory_bytes, ram_bytes=int(profile.ram_bytes),
        fits_ram=fits, ram_verdict=verdict, sparsity_options=options, sparsities_that_fit=fit,
        provenance=est.provenance.value,
    )


# ---------------------------------------------------------------------------- fleets
_Q = ("dense_macs", "elem_flops", "bytes", "topk", "compress", "nnz", "fwd_macs", "flops")
_MEM = ("param_bytes", "compressed_weight_bytes", "grad_bytes", "optim_bytes", "buffer_bytes",
        "saved_act_bytes")


def _row_quantities(rows: list[dict]) -> dict[str, np.ndarray]:
    q = {
        "dense_macs": np.array([r["dense_macs"] for r in rows]),
        "elem_flops": np.array([r["elem_flops"] for r in rows]),
        "bytes": np.array([r["bytes_read"] + r["bytes_written"] for r in rows]),
        "topk": np.array([r["topk_flops"] for r in rows]),
        "compress": np.array([r["compress_flops"] for r in rows]),
        "nnz": np.array([r["compress_nnz"] for r in rows]),
        "fwd_macs": np.array([r["macs"] if r["phase"] == "forward" else 0.0 for r in rows]),
        "flops": np.array([r["flops"] for r in rows]),
        "work": np.array([r["work_bytes"] for r in rows]),
        "mem": np.array([sum(r[k] for k in _MEM) for r in rows]),
    }
    return q


@dataclass
class _Branch:
    """Per-row coefficients: q(B, d) = c0 + c1·B + c2·d + c3·B·d (c2 = c3 = 0 when dense)."""

    op_class: np.ndarray  # the rows' kinds (hwmodel.estimator.kind_of)
    sparse_row: np.ndarray  # rows whose MACs scale with d
    coef: dict[str, np.ndarray]  # quantity -> (4, R)

    @property
    def static(self) -> np.ndarray:
        """Rows whose time does not depend on the density."""
        dep = ~self.sparse_row
        for k in ("dense_macs", "elem_flops", "bytes", "topk", "compress", "nnz"):
            dep &= (self.coef[k][2] == 0) & (self.coef[k][3] == 0)
        return dep

    def at(self, key: str, b: np.ndarray, d: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
        """(N, R) values of a quantity for N clients at batch ``b`` and density ``d``."""
        c = self.coef[key] if rows is None else self.coef[key][:, rows]
        b = b[:, None]
        out = c[0] + c[1] * b
        if c[2].any() or c[3].any():  # most quantities do not depend on the density
            d = d[:, None]
            out = out + (c[2] + c[3] * b) * d
        return out

    def sum_at(self, key: str, b: np.ndarray, d: np.ndarray) -> np.ndarray:
        """Sum over rows (the coefficients are summed first: the quantity is bilinear)."""
        c = self.coef[key].sum(axis=1)
        return c[0] + c[1] * b + c[2] * d + c[3] * b * d


class _ModelTables:
    """Count coefficients of one model and mode, derived from :func:`count_rows` evaluations."""

    def __init__(self, spec: ModelSpec, mode: str, batch: int, optimizer: str, layers: str | list[str]):
        self.spec = spec
        dense = count_rows(spec, SparsityPlan.dense(), 1, optimizer)
        self.op_class = np.array([kind_of(r["type"], r["phase"]) for r in dense])
        self.phase = np.array([r["phase"] for r in dense])
        qd1 = _row_quantities(dense)
        qd2 = _row_quantities(count_rows(spec, SparsityPlan.dense(), 2, optimizer))
        zero = {k: np.zeros_like(v) for k, v in qd1.items()}
        self.dense = _Branch(self.op_class, np.zeros(len(dense), bool),
                             {k: np.stack([2 * qd1[k] - qd2[k], qd2[k] - qd1[k], zero[k], zero[k]])
                              for k in qd1})
        self.mode = mode
        if mode == "dense":
            self.sparse = self.dense
        else:
            d1, d2 = 0.5, 0.25
            ev = {}
            for b in (1, 2):
                for d in (d1, d2):
                    plan = SparsityPlan.uniform(spec, 1.0 - d, mode=mode, layers=layers)
                    rows = count_rows(spec, plan, b, optimizer)
                    ev[b, d] = _row_quantities(rows)
                    if b == 1 and d == d1:
                        sparse_row = np.array([r["density"] == d1 for r in rows])
            coef = {}
            for k in qd1:
                # bilinear fit through the four corners
                e = (ev[2, d1][k] - ev[1, d1][k] - ev[2, d2][k] + ev[1, d2][k]) / (d1 - d2)
                cd = (ev[1, d1][k] - ev[1, d2][k]) / (d1 - d2) - e
                cb = ev[2, d1][k] - ev[1, d1][k] - e * d1
                c0 = ev[1, d1][k] - cb - cd * d1 - e * d1
                coef[k] = np.stack([c0, cb, cd, e])
            self.sparse = _Branch(self.op_class, sparse_row, coef)
        self.layers = layers
        self.batch = batch
        # wire: dense32 parts and the sparse weights (numel, ndim, rows, name overhead)
        entries = _state_entries(spec)
        self.down = state_bytes((k, tensor_bytes("dense32", s, dtype=dt)) for k, s, dt in entries)
        sparse_names = set(sparse_layer_names(spec, layers)) if mode != "dense" else set()
        up_fixed = 8
        nnz_fixed = 0
        sw = []
        for k, s, dt in entries:
            if k.endswith("num_batches_tracked"):
                continue
            layer = k.rsplit(".", 1)[0]
            if k.endswith(".weight") and layer in sparse_names:
                sw.append((math.prod(s), len(s), s[0], state_entry_overhead(k), VALUE_BYTES[dt]))
            else:
                up_fixed += state_entry_overhead(k) + tensor_bytes("dense32", s, dtype=dt)
                nnz_fixed += math.prod(s)
        self.up_fixed, self.nnz_fixed = up_fixed, nnz_fixed
        self.sw = np.array(sw, dtype=np.float64).reshape(-1, 5)
        self.input_bytes_per_sample = math.prod(spec.input_shape) * 4 + 8

    def uplink(self, d: np.ndarray, codec: str) -> tuple[np.ndarray, np.ndarray]:
        """Uplink bytes and the paper CSR bytes for densities ``d`` (dense32 where d == 1)."""
        numel, ndim, rows, over = (self.sw[:, i] for i in range(4))
        dd = d[:, None]
        nnz = np.where(dd >= 1.0, numel, np.clip(np.floor(dd * numel + 0.5), 1.0, numel))
        sparse = tensor_bytes_vec(codec, numel, nnz, ndim, rows)
        dense = tensor_bytes_vec("dense32", numel, numel, ndim)
        body = np.where(dd >= 1.0, dense, sparse) + over
        up = self.up_fixed + body.sum(axis=1)
        return up, 8.0 * (self.nnz_fixed + nnz.sum(axis=1))


@dataclass
class FleetEstimate:
    """Per-client arrays of a fleet estimate (one local round each, plus the radio)."""

    model: str
    devices: np.ndarray
    sparsity: np.ndarray
    samples: np.ndarray
    epochs: np.ndarray
    compute_time_s: np.ndarray
    compute_energy_j: np.ndarray
    radio_time_s: np.ndarray
    radio_energy_j: np.ndarray
    idle_energy_j: np.ndarray
    time_s: np.ndarray
    energy_j: np.ndarray
    train_flops: np.ndarray
    forward_macs: np.ndarray
    uplink_bytes: np.ndarray
    downlink_bytes: np.ndarray
    uplink_paper_csr_bytes: np.ndarray
    peak_memory_bytes: np.ndarray
    fits_ram: np.ndarray
    provenance: np.ndarray

    def __len__(self) -> int:
        return len(self.time_s)

    def to_frame(self) -> pd.DataFrame:
        cols = {k: v for k, v in self.__dict__.items() if isinstance(v, np.ndarray)}
        df = pd.DataFrame(cols)
        df.attrs["flops_convention"] = FLOPS_CONVENTION
        return df


_TABLE_CACHE: dict[tuple, _ModelTables] = {}


def _tables(spec: ModelSpec, mode: str, batch: int, optimizer: str, layers: Any) -> _ModelTables:
    key = (spec.to_json(), mode, batch, optimizer, str(layers))
    t = _TABLE_CACHE.get(key)
    if t is None:
        if len(_TABLE_CACHE) > 32:
            _TABLE_CACHE.clear()
        t = _TABLE_CACHE[key] = _ModelTables(spec, mode, batch, optimizer, layers)
    return t


_PROFILE_CACHE: dict[str, tuple[DeviceProfile, int]] = {}


def _cached_device(device: DeviceProfile | str) -> DeviceProfile:
    """resolve_device, remembering profiles loaded by name/path while their file is unchanged."""
    if not isinstance(device, str):
        return resolve_device(device)
    hit = _PROFILE_CACHE.get(device)
    if hit is not None:
        try:
            if os.stat(hit[0].path).st_mtime_ns == hit[1]:
                return hit[0]
        except OSError:
            pass
    prof = resolve_device(device)
    try:
        _PROFILE_CACHE[device] = (prof, os.stat(prof.path).st_mtime_ns)
    except OSError:
        pass
    return prof


def _broadcast(x: Any, n: int, what: str, dtype: Any) -> np.ndarray:
    a = np.asarray(x, dtype=dtype)
    if a.ndim == 0:
        return np.full(n, a, dtype=dtype)
    if a.shape != (n,):
        raise ValueError(f"{what}: expected a scalar or {n} values, got shape {a.shape}")
    return a


def estimate_fleet(spec_or_name: ModelSpec | str, devices: Any, sparsity: Any = 0.0,
                   samples: Any = DEFAULT_SAMPLES, epochs: Any = 1, mode: str = "swat",
                   batch: int = 32, radio: str | None = "wifi", uplink_codec: str = "coo32",
                   layers: str | list[str] | None = None,
                   optimizer: str = "sgd_momentum") -> FleetEstimate:
    """Vectorised estimates for N clients of one model with mixed devices, sparsities, samples.

    ``devices`` is a sequence of profile names/paths/DeviceProfiles (one per client);
    ``sparsity``, ``samples`` and ``epochs`` are scalars or arrays of N. Per model the count
    rows are reduced once to coefficients bilinear in (batch, density) and per device the
    profile constants are looked up once; all clients are then combined with numpy. Agrees with
    :func:`estimate` (plus radio, as :func:`budget` counts it) up to rounding of non-zero counts.
    """
    spec = resolve_model(spec_or_name)
    if isinstance(devices, (str, DeviceProfile)):
        raise TypeError("devices: expected one device per client (a list), got a single device")
    dev_list = list(devices)
    n = len(dev_list)
    if n == 0:
        raise ValueError("devices: the fleet is empty")
    s = _broadcast(sparsity, n, "sparsity", np.float64)
    if np.any((s < 0) | (s >= 1)):
        raise ValueError("sparsity: expected values in [0, 1)")
    smp = _broadcast(samples, n, "samples", np.int64)
    ep = _broadcast(epochs, n, "epochs", np.int64)
    if np.any(smp < 1) or np.any(ep < 1):
        raise ValueError("samples and epochs: expected integers >= 1")
    _check_round(batch, 1, 1)
    layers = default_layers(mode) if layers is None else layers
    tab = _tables(spec, mode, batch, optimizer, layers)
    d = np.where(mode == "dense", 1.0, 1.0 - s)
    n_full, rem = np.divmod(smp, batch)
    full_b = np.full(n, float(batch))
    rem_b = rem.astype(np.float64)

    keys = [dv if isinstance(dv, str) else id(dv) for dv in dev_list]
    uniq: dict[Any, DeviceProfile] = {}
    for k, dv in zip(keys, dev_list, strict=True):
        if k not in uniq:
            uniq[k] = _cached_device(dv)
    key_arr = np.empty(n, dtype=object)
    key_arr[:] = keys

    out = {k: np.zeros(n) for k in ("ct", "ce", "rt", "re", "ie", "peak", "ram", "flops", "fwd")}
    names = np.empty(n, dtype=object)
    prov = np.empty(n, dtype=object)
    is_dense = d >= 1.0
    for k, prof in uniq.items():
        m = key_arr == k
        names[m], prov[m] = prof.name, provenance_of(prof).value
        out["ram"][m] = prof.ram_bytes
        for branch, bm in ((tab.dense, m & is_dense), (tab.sparse, m & ~is_dense)):
            if not bm.any():
                continue
            dd = d[bm]
            nf, ee = n_full[bm], ep[bm]
            bf, br = full_b[bm], rem_b[bm]
            # rows that do not depend on the density: one table over batch sizes 0..batch
            st = branch.static
            bs = np.arange(batch + 1, dtype=np.float64)
            zero = np.zeros(batch + 1)
            t_st = time_rows(prof, tab.op_class[st][None, :], tab.phase[st][None, :],
                             branch.at("dense_macs", bs, zero)[:, st], 1.0,
                             branch.at("elem_flops", bs, zero)[:, st],
                             branch.at("bytes", bs, zero)[:, st],
                             branch.at("topk", bs, zero)[:, st],
                             branch.at("compress", bs, zero)[:, st],
                             branch.at("nnz", bs, zero)[:, st])
            t_st = np.where(bs[:, None] > 0, t_st, 0.0).sum(axis=1)
            ct = ee * (nf * t_st[batch] + t_st[rem[bm]])
            dy = ~st
            if dy.any():
                se = sparse_efficiency_vec(prof.sparse_efficiency, dd)[:, None]
                sr = branch.sparse_row[dy][None, :]
                dens = np.where(sr, dd[:, None], 1.0)
                sef = np.where(sr, se, 1.0)
                rp = row_params(prof, tab.op_class[dy][None, :], tab.phase[dy][None, :])

                def step(b: np.ndarray, dd=dd, dens=dens, sef=sef, branch=branch, dy=dy,
                         prof=prof, rp=rp) -> np.ndarray:
                    t = time_rows(prof, None, None, branch.at("dense_macs", b, dd, dy), dens,
                                  branch.at("elem_flops", b, dd, dy),
                                  branch.at("bytes", b, dd, dy), branch.at("topk", b, dd, dy),
                                  branch.at("compress", b, dd, dy), branch.at("nnz", b, dd, dy),
                                  params=rp, sparse_eff=sef)
                    return np.where(b[:, None] > 0, t, 0.0).sum(axis=1)

                ct = ct + ee * (nf * step(bf) + step(br))
            out["ct"][bm] = ct
            out["ce"][bm] = ct * prof.busy_w
            br_on = (br > 0).astype(np.float64)  # no remainder step: nothing (not the constants)
            fl = branch.sum_at("flops", bf, dd) * nf + branch.sum_at("flops", br, dd) * br_on
            fw = branch.sum_at("fwd_macs", bf, dd) * nf + branch.sum_at("fwd_macs", br, dd) * br_on
            out["flops"][bm], out["fwd"][bm] = ee * fl, ee * fw
            work = np.full(len(dd), branch.at("work", bf[:1], dd[:1], st).max(initial=0.0))
            if dy.any():
                work = np.maximum(work, branch.at("work", bf, dd, dy).max(1))
            mem = branch.sum_at("mem", bf, dd) + work
            out["peak"][bm] = np.rint(mem + batch * tab.input_bytes_per_sample)
    up, paper = tab.uplink(d, uplink_codec)
    down = np.full(n, float(tab.down))
    for k, prof in uniq.items():
        m = key_arr == k
        if radio is not None:
            e, t = radio_cost(prof, radio, up[m], down[m])
            out["re"][m], out["rt"][m] = e, t
            out["ie"][m] = prof.idle_w * t
    return FleetEstimate(
        model=spec.name, devices=names, sparsity=s, samples=smp, epochs=ep,
        compute_time_s=out["ct"], compute_energy_j=out["ce"], radio_time_s=out["rt"],
        radio_energy_j=out["re"], idle_energy_j=out["ie"], time_s=out["ct"] + out["rt"],
        energy_j=out["ce"] + out["re"] + out["ie"], train_flops=out["flops"],
        forward_macs=out["fwd"], uplink_bytes=up, downlink_bytes=down,
        uplink_paper_csr_bytes=paper, peak_memory_bytes=out["peak"],
        fits_ram=out["peak"] <= out["ram"], provenance=prov,
    )
