"""Calibration: fit a DeviceProfile's time model to per-layer, per-phase timings; report the error.

Each :class:`~hwmodel.measure.Measurement` names a builder model, a layer, a phase, the weight
density and saved-activation density the kernel ran at, and the batch. Its predicted time is
:func:`hwmodel.estimator.time_rows` for that row of :func:`hwmodel.counts.count`, with the
layer alone at the measured densities in SWAT's convention (forward and backward-input at
``density``, backward-weight at ``act_density``; a masked trainer reports
``act_density = density``). A layer that times several phases in one call (batch norm's
backward, the loss's fused forward and gradient) gives them joined by ``+``
(``"backward_input+backward_weight"``): the prediction is the sum of those rows.
``layer="step"`` records (whole steps) and phases the count says do no work (a flatten, relu's
weight gradient) are not used for fitting; ``layer="loss"`` is the softmax cross-entropy.

The fitted model is the estimator's with compute and memory time added (``memory.overlap = 0``):
then every term is a count times an unknown (1/efficiency, seconds per byte, seconds per
non-zero, seconds of overhead), so the fit is a **linear** least squares on relative error
(each measurement's row divided by its time; bounded, ``scipy.optimize.lsq_linear``; a few
iterations of Cauchy re-weighting, scale 0.3, against outliers). The unknowns, named by the
profile value paths they set:

* ``efficiency.<class>`` (conv/gemm MACs; per phase, ``efficiency.<class>_<phase>``, with
  ``mac_per_phase``) and elementwise efficiencies per
  kind and forward/backward (``efficiency.pool_forward``, ``efficiency.norm_backward``, ...),
  ``efficiency.update``, ``efficiency.elementwise`` (bias adds), ``efficiency.topk`` and
  ``efficiency.compress`` (book-keeping passes);
* ``sparse_kernels.<class>_<phase>``: a sparse row's MAC time is ``dense × (d/es + f)``, fitted
  as two coefficients (on ``d × dense MACs`` and on dense MACs); ``sparse_kernels.compress_nnz_s``;
* ``overhead_s`` (per kind, ``overheads.<kind>``, with ``kind_overheads``); ``memory.bandwidth_gbs`` and, with ``cache_bytes``,
  ``memory.cache_bandwidth_gbs`` (rows moving at most ``cache_bytes``).

**Back-off** (no leak, no wild guesses): unknowns form a tree (``efficiency.pool_forward`` →
``efficiency.pool`` → ``efficiency.elementwise``; ``efficiency.conv_forward`` →
``efficiency.conv``; ``sparse_kernels.conv_forward`` → ``sparse_kernels.conv`` →
``sparse_kernels.all``; ``overheads.pool`` → ``overhead_s``; cache → DRAM bandwidth). The fit
runs from the coarsest level (children merged into their root) to the finest; an unknown with
no measurement that exercises it keeps the value of its nearest fitted ancestor, so a model
held out with an op no other model has (ResNet's batch norm) is predicted from the coarser fit.
The profile keeps the fields no measurement touches. The fitted paths go into
``profile.fitted`` and their sources say ``measured: calibrated from N measurements on DATE``.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy.optimize import lsq_linear

from .counts import count_rows
from .estimator import (
    elem_efficiency_keys,
    kind_of,
    row_params,
    sparse_efficiency_vec,
    time_rows,
)
from .measure import PHASES, Measurement
from .models import build
from .plan import LayerSparsity, SparsityPlan
from .profile import EFFICIENCY_KEYS, DeviceProfile, SparseKernel
from .spec import ModelSpec

#: What calibrate fits by default.
DEFAULT_FIT = ("efficiency", "sparse_efficiency", "overhead_s", "bandwidth")
#: Cauchy re-weighting scale (relative error) and iterations.
ROBUST_SCALE = 0.3
ROBUST_ITERATIONS = 4
_MAX_BW_GBS = 1000.0


class CalibrationError(ValueError):
    """Measurements that cannot be used (unknown model or layer, bad phase, nothing to fit)."""


def _phases(phase: str, i: int) -> list[str]:
    parts = phase.split("+")
    for p in parts:
        if p not in PHASES:
            raise CalibrationError(f"measurements[{i}].phase: expected one of {PHASES} (or several "
                                   f"joined by '+'), got {phase!r}")
    return parts


_COLS = ("kind", "phase", "dense_macs", "density", "elem_flops", "topk", "compress", "nnz",
         "bytes", "midx")


def _features(measurements: Sequence[Measurement]) -> dict[str, np.ndarray]:
    """The count rows of each measurement, as arrays; ``midx`` maps rows to measurements."""
    specs: dict[str, ModelSpec] = {}
    cache: dict[tuple, dict] = {}
    cols: dict[str, list] = {k: [] for k in _COLS}
    measured, models, src = [], [], []
    for i, m in enumerate(measurements):
        if m.layer == "step":
            continue
        phases = _phases(m.phase, i)
        if not (m.median_s > 0 and np.isfinite(m.median_s)):
            raise CalibrationError(f"measurements[{i}].median_s: expected a positive time, got {m.median_s!r}")
        if m.model not in specs:
            try:
                specs[m.model] = build(m.model)
            except ValueError as e:
                raise CalibrationError(f"measurements[{i}].model: {e}") from None
        spec = specs[m.model]
        if m.layer not in spec and m.layer != "loss":
            raise CalibrationError(f"measurements[{i}].layer: {m.layer!r} is not a node of "
                                   f"{m.model!r} (nor 'loss' or 'step')")
        key = (m.model, m.layer, float(m.density), float(m.act_density), int(m.batch))
        rows = cache.get(key)
        if rows is None:
            weighted = m.layer != "loss" and spec[m.layer].op in ("conv2d", "linear")
            if weighted and (m.density < 1.0 or m.act_density < 1.0):
                plan = SparsityPlan("swat", {m.layer: LayerSparsity(float(m.density),
                                                                    float(m.act_density))})
            else:
                plan = SparsityPlan.dense()
            rows = {(r["layer"], r["phase"]): r for r in count_rows(spec, plan, int(m.batch))
                    if r["layer"] == m.layer}
            cache[key] = rows
        picked = [rows[(m.layer, p)] for p in phases]
        picked = [r for r in picked
                  if r["dense_macs"] or r["elem_flops"] or r["bytes_read"] + r["bytes_written"]]
        if not picked:
            continue  # phases the model says do no work (flatten, relu's weight gradient)
        j = len(measured)
        for r in picked:
            cols["kind"].append(kind_of(r["type"], r["phase"]))
            cols["phase"].append(r["phase"])
            cols["dense_macs"].append(r["dense_macs"])
            cols["density"].append(r["density"])
            cols["elem_flops"].append(r["elem_flops"])
            cols["topk"].append(r["topk_flops"])
            cols["compress"].append(r["compress_flops"])
            cols["nnz"].append(r["compress_nnz"])
            cols["bytes"].append(r["bytes_read"] + r["bytes_written"])
            cols["midx"].append(j)
        measured.append(float(m.median_s))
        models.append(m.model)
        src.append(i)
    out = {k: np.asarray(v) for k, v in cols.items()}
    for k in ("dense_macs", "density", "elem_flops", "topk", "compress", "nnz", "bytes"):
        out[k] = out[k].astype(np.float64)
    out["midx"] = out["midx"].astype(np.int64)
    out["measured"] = np.asarray(measured, dtype=np.float64)
    out["model"] = np.asarray(models)
    out["src"] = np.asarray(src, dtype=np.int64)
    return out


def predict(profile: DeviceProfile, measurements: Sequence[Measurement]) -> np.ndarray:
    """Predicted seconds of each measurement under ``profile`` (NaN for those not used:
    whole steps and phases without work)."""
    f = _features(measurements)
    out = np.full(len(measurements), np.nan)
    out[f["src"]] = _predict(profile, f)
    return out


def _predict(profile: DeviceProfile, f: dict[str, np.ndarray]) -> np.ndarray:
    if f["kind"].size == 0:
        return np.zeros(f["measured"].size)
    t = time_rows(profile, f["kind"], f["phase"], f["dense_macs"], f["density"], f["elem_flops"],
                  f["bytes"], f["topk"], f["compress"], f["nnz"])
    return np.bincount(f["midx"], weights=t, minlength=f["measured"].size)


def _ape(pred: np.ndarray, meas: np.ndarray) -> np.ndarray:
    return 100.0 * np.abs(pred - meas) / meas


def _summary(ape: np.ndarray) -> dict[str, Any]:
    if ape.size == 0:
        return {"n": 0, "median_ape_pct": None, "p90_ape_pct": None}
    return {"n": int(ape.size), "median_ape_pct": float(np.median(ape)),
            "p90_ape_pct": float(np.percentile(ape, 90))}


def calibration_error(profile: DeviceProfile, measurements: Sequence[Measurement]) -> dict[str, Any]:
    """Median and p90 absolute percentage error of ``profile``'s predictions (``n`` used)."""
    f = _features(measurements)
    return _summary(_ape(_predict(profile, f), f["measured"]))


# ---------------------------------------------------------------------------- the linear system
_ELEM_KINDS = ("pool", "global_avgpool", "norm", "activation", "add", "loss")


def _parent(name: str) -> str | None:
    """The back-off parent of an unknown (see the module docstring)."""
    if name.startswith("efficiency."):
        key = name.split(".", 1)[1]
        if key in ("conv", "gemm", "elementwise", "conv_bias", "gemm_bias"):
            return None
        if key.startswith(("conv_", "gemm_")):
            return "efficiency." + key.split("_", 1)[0]
        for k in _ELEM_KINDS:
            if key.startswith(k + "_"):
                return "efficiency." + k
        return "efficiency.elementwise"
    if name.startswith("sparse_a.") or name.startswith("sparse_b."):
        head, key = name.split(".", 1)
        if key == "all":
            return None
        if "_" in key:
            return f"{head}.{key.split('_', 1)[0]}"
        return f"{head}.all"
    if name.startswith("overheads."):
        return "overhead_s"
    if name == "memory.cache_bandwidth_gbs":
        return "memory.bandwidth_gbs"
    return None


def _group(name: str) -> str:
    if name.startswith("efficiency."):
        return "efficiency"
    if name.startswith(("sparse_a.", "sparse_b.", "sparse_kernels.")):
        return "sparse_efficiency"
    if name.startswith(("overheads.", "overhead_s")):
        return "overhead_s"
    return "bandwidth"


def _lower_bound(name: str) -> float:
    if name.startswith(("efficiency.", "sparse_a.")):
        return 1.0  # 1/efficiency (an efficiency is at most 1); sparse: 1/(e·es) with es <= 1/e
    if name.startswith("memory."):
        return 1.0 / _MAX_BW_GBS
    return 0.0


def _design(f: dict[str, np.ndarray], peak: float, cache_bytes: int, mac_per_phase: bool = False,
            kind_overheads: bool = False) -> tuple[np.ndarray, list[str]]:
    """Per-row columns of the linear model (time = columns · unknowns), and their names."""
    n_rows = f["kind"].size
    cols: dict[str, np.ndarray] = {}

    def add(name: str, i: int, v: float) -> None:
        if v:
            cols.setdefault(name, np.zeros(n_rows))[i] += v

    for i in range(n_rows):
        k, ph, d = str(f["kind"][i]), str(f["phase"][i]), float(f["density"][i])
        dm = 2.0 * f["dense_macs"][i] / peak
        if dm > 0:
            if d < 1.0:
                add(f"sparse_a.{k}_{ph}", i, dm * d)
                add(f"sparse_b.{k}_{ph}", i, dm)
            else:
                add(f"efficiency.{k}_{ph}" if mac_per_phase else f"efficiency.{k}", i, dm)
        el = (f["elem_flops"][i] - f["topk"][i] - f["compress"][i]) / peak
        add("efficiency." + elem_efficiency_keys(k, ph)[0], i, el)
        add("efficiency.topk", i, f["topk"][i] / peak)
        add("efficiency.compress", i, f["compress"][i] / peak)
        add("sparse_kernels.compress_nnz_s", i, f["nnz"][i])
        cls = k if k in ("conv", "gemm") else "elementwise"
        add(f"overheads.{k if k != 'elementwise' else cls}" if kind_overheads else "overhead_s", i, 1.0)
        gb = f["bytes"][i] / 1e9
        if cache_bytes > 0 and f["bytes"][i] <= cache_bytes:
            add("memory.cache_bandwidth_gbs", i, gb)
        else:
            add("memory.bandwidth_gbs", i, gb)
    names = sorted(cols)
    a = np.stack([cols[n] for n in names], axis=1) if names else np.zeros((n_rows, 0))
    return a, names


def _ancestors(name: str) -> list[str]:
    out = [name]
    while (p := _parent(out[-1])) is not None:
        out.append(p)
    return out


def _solve(x: np.ndarray, y: np.ndarray, offset: np.ndarray, lb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Bounded linear least squares on relative error with Cauchy re-weighting; returns the
    unknowns and which columns had data."""
    rel = x / y[:, None]
    target = 1.0 - offset / y
    support = np.abs(rel).sum(axis=0) > 0
    theta = np.where(support, lb, 0.0)
    if not support.any():
        return theta, support
    w = np.ones(len(y))
    a = rel[:, support]
    for _ in range(ROBUST_ITERATIONS):
        aw = a * w[:, None]
        scale = np.maximum(np.abs(aw).max(axis=0), 1e-300)
        res = lsq_linear(aw / scale, target * w, bounds=(lb[support] * scale, np.inf),
                         method="bvls")
        # bvls may return a value an ulp past its bound (seen: an overhead of -7.7e-21)
        theta[support] = np.maximum(res.x / scale, lb[support])
        r = rel @ theta - target
        w = 1.0 / np.sqrt(1.0 + (r / ROBUST_SCALE) ** 2)
    return theta, support


def _fit_theta(x: np.ndarray, names: list[str], y: np.ndarray, offset: np.ndarray,
               free: np.ndarray) -> tuple[dict[str, float], set[str]]:
    """Coarse-to-fine fit (see the module docstring): the value of every unknown and its ancestors,
    and the set of names some measurement exercised (directly or through a descendant)."""
    anc = [_ancestors(n) for n in names]
    depth = max((len(a) for a in anc), default=0)
    values: dict[str, float] = {}
    supported: set[str] = set()
    for level in range(depth):
        mapped = [a[max(0, len(a) - 1 - level)] for a in anc]
        uniq = sorted(set(m for m, fr in zip(mapped, free, strict=True) if fr))
        if not uniq:
            break
        pos = {m: j for j, m in enumerate(uniq)}
        xl = np.zeros((x.shape[0], len(uniq)))
        for j, (m, fr) in enumerate(zip(mapped, free, strict=True)):
            if fr:
                xl[:, pos[m]] += x[:, j]
        lb = np.array([_lower_bound(m) for m in uniq])
        theta, sup = _solve(xl, y, offset, lb)
        for m, t, s in zip(uniq, theta, sup, strict=True):
            if s:
                values[m] = float(t)
                supported.add(m)
    return values, supported


def _value_of(name: str, values: dict[str, float]) -> float | None:
    for a in _ancestors(name):
        if a in values:
            return values[a]
    return None


def _group_times(profile: DeviceProfile, f: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per-row time of each term group under ``profile`` (for the groups not being fitted)."""
    p = row_params(profile, f["kind"], f["phase"])
    peak = profile.peak_gflops * 1e9
    d = f["density"]
    se = sparse_efficiency_vec(profile.sparse_efficiency, np.minimum(d, 1.0))
    has = np.isfinite(p.sk_eff)
    phi = np.where(d < 1.0, np.where(has, d / np.where(has, p.sk_eff, 1.0) + p.sk_fixed, d / se), 1.0)
    mac = 2.0 * f["dense_macs"] / (p.e_mac * peak)
    eff = profile.efficiency
    e_t = eff.get("topk", eff["elementwise"])
    e_c = eff.get("compress", eff["elementwise"])
    el = ((f["elem_flops"] - f["topk"] - f["compress"]) / (p.e_el * peak) + f["topk"] / (e_t * peak)
          + f["compress"] / (e_c * peak) + f["nnz"] * profile.compress_nnz_s)
    bw = np.full(d.shape, profile.mem_bandwidth_gbs * 1e9)
    if profile.cache_bytes > 0:
        cbw = (profile.cache_bandwidth_gbs or profile.mem_bandwidth_gbs) * 1e9
        bw = np.where(f["bytes"] <= profile.cache_bytes, cbw, bw)
    return {"efficiency": np.where(d < 1.0, 0.0, mac) + el,
            "sparse_efficiency": np.where(d < 1.0, mac * phi, 0.0),
            "overhead_s": p.overhead, "bandwidth": f["bytes"] / bw}


def _apply(profile: DeviceProfile, values: dict[str, float], names: list[str],
           supported: set[str], fit: Sequence[str], cache_bytes: int) -> tuple[DeviceProfile, list[str]]:
    """The profile with the fitted unknowns written in; the value paths set."""
    eff = dict(profile.efficiency)
    overheads = dict(profile.overheads)
    kernels = dict(profile.sparse_kernels)
    changes: dict[str, Any] = {}
    paths: list[str] = []
    touched = set(names)  # columns some measurement exercises (value: nearest fitted ancestor)
    if "efficiency" in fit:
        for c in ("conv", "gemm", "elementwise"):
            v = values.get(f"efficiency.{c}")
            if v is not None:
                eff[c] = min(1.0, 1.0 / v)
                paths.append(f"efficiency.{c}")
        for key in EFFICIENCY_KEYS:
            n = f"efficiency.{key}"
            if n in touched:
                v = _value_of(n, values)
                if v is not None:
                    eff[key] = min(1.0, 1.0 / v)
                    paths.append(n)
    if "sparse_efficiency" in fit:
        for n in names:
            if not n.startswith("sparse_a."):
                continue
            key = n.split(".", 1)[1]
            a, b = _value_of(n, values), _value_of("sparse_b." + key, values)
            if a is None or n not in touched:
                continue
            b = b or 0.0
            e_dense = eff.get(key, eff[key.split("_", 1)[0]])
            kernels[key] = SparseKernel(1.0 / (a * e_dense), b * e_dense)
            paths.append(f"sparse_kernels.{key}")
        v = values.get("sparse_kernels.compress_nnz_s")
        if v is not None:
            changes["compress_nnz_s"] = v
            paths.append("sparse_kernels.compress_nnz_s")
    if "overhead_s" in fit:
        if "overhead_s" in values:
            changes["overhead_s"] = values["overhead_s"]
            paths.append("overhead_s")
        for n in names:
            if n.startswith("overheads.") and n in touched:
                v = _value_of(n, values)
                if v is not None:
                    overheads[n.split(".", 1)[1]] = v
                    paths.append(n)
    if "bandwidth" in fit:
        if "memory.bandwidth_gbs" in values:
            changes["mem_bandwidth_gbs"] = 1.0 / values["memory.bandwidth_gbs"]
            paths.append("memory.bandwidth_gbs")
        if cache_bytes > 0:
            v = _value_of("memory.cache_bandwidth_gbs", values)
            if v is not None:
                changes["cache_bandwidth_gbs"] = 1.0 / v
                changes["cache_bytes"] = int(cache_bytes)
                paths += ["memory.cache_bandwidth_gbs", "memory.cache_bytes"]
    changes["overlap"] = 0.0
    paths.append("memory.overlap")
    new = dataclasses.replace(profile, efficiency=eff, overheads=overheads,
                              sparse_kernels=kernels, **changes)
    return new, paths


def calibrate(profile: DeviceProfile, measurements: Sequence[Measurement],
              fit: Sequence[str] = DEFAULT_FIT, date: str | None = None,
              cache_bytes: int | None = None, mac_per_phase: bool = False,
              kind_overheads: bool = False) -> DeviceProfile:
    """A new profile fitted to ``measurements`` (see the module docstring).

    ``fit`` chooses among ``efficiency``, ``sparse_efficiency`` (the sparse kernels and the
    per-non-zero compression cost), ``overhead_s`` (with the per-kind overheads) and
    ``bandwidth`` (with the cache bandwidth); the others keep the profile's values.
    ``cache_bytes`` (default: the profile's; 0 turns the cache term off) is the working-set
    size below which rows move at the cache bandwidth. ``mac_per_phase`` fits a conv/gemm MAC
    efficiency per phase (else one per class) and ``kind_overheads`` an overhead per kind (else
    one ``overhead_s``): both off by default, because on the host data they lower the in-sample
    error but raise the held-out-model error (more unknowns than the models pin down). The result adds compute and memory time
    (``memory.overlap = 0``). Raises :class:`CalibrationError` when nothing can be fitted.
    """
    unknown = set(fit) - set(DEFAULT_FIT)
    if unknown:
        raise CalibrationError(f"fit: unknown item(s) {sorted(unknown)}; expected some of {DEFAULT_FIT}")
    if not fit:
        raise CalibrationError("nothing to fit: fit is empty")
    cache = int(profile.cache_bytes if cache_bytes is None else cache_bytes)
    if cache < 0:
        raise CalibrationError(f"cache_bytes: expected an integer >= 0, got {cache_bytes!r}")
    f = _features(measurements)
    n = int(f["measured"].size)
    if n == 0:
        raise CalibrationError("no per-layer measurements to calibrate from")
    peak = profile.peak_gflops * 1e9
    rows, names = _design(f, peak, cache, mac_per_phase, kind_overheads)
    x = np.zeros((n, len(names)))
    np.add.at(x, f["midx"], rows)
    free = np.array([_group(nm) in fit for nm in names])
    fixed_groups = [g for g in DEFAULT_FIT if g not in fit]
    offset = np.zeros(n)
    if fixed_groups:
        gt = _group_times(profile, f)
        for g in fixed_groups:
            offset += np.bincount(f["midx"], weights=gt[g], minlength=n)
    values, supported = _fit_theta(x, names, f["measured"], offset, free)
    if not values:
        raise CalibrationError("nothing to fit: no parameter is exercised by the measurements")
    fitted_profile, paths = _apply(profile, values, names, supported, fit, cache)
    when = date or _dt.date.today().isoformat()
    note = f"measured: calibrated from {n} measurements on {when}"
    sources = dict(profile.sources)
    for p in paths:
        sources[p] = note
    sources["memory.overlap"] = (f"measured: calibrated from {n} measurements on {when}; "
                                 "compute and memory time add (overlap 0), the form the fit uses")
    return dataclasses.replace(fitted_profile, sources=sources,
                               fitted=tuple(sorted(set(profile.fitted) | set(paths))))


def leave_one_model_out(profile: DeviceProfile, measurements: Sequence[Measurement],
                        fit: Sequence[str] = DEFAULT_FIT, cache_bytes: int | None = None,
                        **options: bool) -> dict[str, Any]:
    """Fit on every model but one, test on that one, for each model; pooled held-out error too.

    Returns ``{"models": {name: {n, median_ape_pct, p90_ape_pct}}, "n", "median_ape_pct",
    "p90_ape_pct", "in_sample": {...}, "predictions": [...]}`` (percentages; ``predictions``
    holds each measurement's held-out prediction in seconds, NaN where it was not used).
    ``options`` (``mac_per_phase``, ``kind_overheads``) pass to :func:`calibrate`.
    """
    measurements = list(measurements)
    models = sorted({m.model for m in measurements if m.layer != "step"})
    if len(models) < 2:
        raise CalibrationError(f"leave-one-model-out needs measurements of >= 2 models, got {models}")
    report: dict[str, Any] = {"models": {}}
    pooled = []
    held_out = np.full(len(measurements), np.nan)
    for held in models:
        train = [m for m in measurements if m.model != held and m.layer != "step"]
        idx = [i for i, m in enumerate(measurements) if m.model == held]
        test = [measurements[i] for i in idx]
        prof = calibrate(profile, train, fit, cache_bytes=cache_bytes, **options)
        f = _features(test)
        pred = _predict(prof, f)
        held_out[np.asarray(idx)[f["src"]]] = pred
        ape = _ape(pred, f["measured"])
        pooled.append(ape)
        report["models"][held] = _summary(ape)
    report.update(_summary(np.concatenate(pooled)))
    per = [m for m in measurements if m.layer != "step"]
    report["in_sample"] = calibration_error(
        calibrate(profile, per, fit, cache_bytes=cache_bytes, **options), per)
    report["predictions"] = held_out.tolist()
    return report
