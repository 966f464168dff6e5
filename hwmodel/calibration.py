"""Calibration: fit a DeviceProfile's efficiencies, sparse-efficiency curve, per-layer overhead
(and memory bandwidth) to per-layer per-phase timings, and report the error.

Each :class:`~hwmodel.measure.Measurement` names a builder model, a layer, a phase, the weight
density and saved-activation density the kernel ran at, and the batch. Its predicted time is
the roofline of :mod:`hwmodel.estimator` for that row of :func:`hwmodel.counts.count`, with the
layer alone at the measured densities in SWAT's convention (forward and backward-input at
``density``, backward-weight at ``act_density``; a masked trainer reports
``act_density = density``). A layer that times several phases in one call (batch norm's
backward, the loss's fused forward and gradient) gives them joined by ``+``
(``"backward_input+backward_weight"``): the prediction is the sum of those rows.
``layer="step"`` records (whole steps) and phases the count says do no work (a flatten, relu's
weight gradient) are not used for fitting; ``layer="loss"`` is the softmax cross-entropy.

The fit is ``scipy.optimize.least_squares`` on ``log(predicted) - log(measured)`` with the
parameters in log space and bounded (efficiencies in (1e-4, 1], overhead in (1e-9, 0.1] s,
bandwidth in (0.1, 1000] GB/s), a Cauchy loss (scale 0.3 in log time) against outliers. The
measured densities (2 significant digits) join the sparse-efficiency table; its entries are fitted only where a
measurement at density < 1 falls within their interpolation reach; an op
class is fitted only if some measurement exercises it. The fitted paths go into
``profile.fitted`` and their sources say ``measured: calibrated from N measurements on DATE``.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy.optimize import least_squares

from .counts import count_rows
from .estimator import roofline_time, sparse_efficiency_vec
from .measure import PHASES, Measurement
from .models import build
from .plan import LayerSparsity, SparsityPlan
from .profile import OP_CLASSES, DeviceProfile, SparseEfficiency
from .spec import ModelSpec

#: What calibrate fits by default.
DEFAULT_FIT = ("efficiency", "sparse_efficiency", "overhead_s", "bandwidth")
_EFF_BOUNDS = (1e-4, 1.0)
_OVH_BOUNDS = (1e-9, 0.1)
_BW_BOUNDS = (0.1, 1000.0)


class CalibrationError(ValueError):
    """Measurements that cannot be used (unknown model or layer, bad phase, nothing to fit)."""


def _phases(phase: str, i: int) -> list[str]:
    parts = phase.split("+")
    for p in parts:
        if p not in PHASES:
            raise CalibrationError(f"measurements[{i}].phase: expected one of {PHASES} (or several "
                                   f"joined by '+'), got {phase!r}")
    return parts


def _features(measurements: Sequence[Measurement]) -> dict[str, np.ndarray]:
    """The count rows of each measurement, as arrays; ``midx`` maps rows to measurements."""
    specs: dict[str, ModelSpec] = {}
    cache: dict[tuple, dict] = {}
    cols: dict[str, list] = {k: [] for k in ("op_class", "dense_macs", "density", "elem_flops",
                                             "bytes", "midx")}
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
            cols["op_class"].append(r["op_class"])
            cols["dense_macs"].append(r["dense_macs"])
            cols["density"].append(r["density"])
            cols["elem_flops"].append(r["elem_flops"])
            cols["bytes"].append(r["bytes_read"] + r["bytes_written"])
            cols["midx"].append(j)
        measured.append(float(m.median_s))
        models.append(m.model)
        src.append(i)
    out = {k: np.asarray(v) for k, v in cols.items()}
    out["dense_macs"] = out["dense_macs"].astype(np.float64)
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
    t = roofline_time(profile, f["op_class"], f["dense_macs"], f["density"], f["elem_flops"],
                      f["bytes"])
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


def _free_sparse_entries(se: SparseEfficiency, densities: np.ndarray) -> list[int]:
    xs = list(se.densities)
    free = set()
    for d in densities[densities < 1.0]:
        for i, x in enumerate(xs):
            if x >= 1.0:
                continue
            lo = xs[i - 1] if i > 0 else 0.0
            hi = xs[i + 1] if i + 1 < len(xs) else 1.0
            if lo < d < hi or (i == 0 and d <= x):
                free.add(i)
    return sorted(free)


def _refine_grid(profile: DeviceProfile, densities: np.ndarray) -> DeviceProfile:
    """Add the measured densities (2 significant digits) to the sparse-efficiency table, each
    starting at the profile's current interpolated value, so the fit can shape the curve where
    the data are."""
    se = profile.sparse_efficiency
    measured = {float(f"{d:.2g}") for d in densities[densities < 1.0]}
    new = sorted(set(float(x) for x in se.densities) | measured)
    if len(new) == len(se.densities):
        return profile
    eff = [float(sparse_efficiency_vec(se, d)) for d in new]
    return dataclasses.replace(profile, sparse_efficiency=SparseEfficiency(tuple(new), tuple(eff)))


def _with(profile: DeviceProfile, eff: dict[str, float], sp: list[float], overhead: float,
          bw: float) -> DeviceProfile:
    return dataclasses.replace(
        profile, efficiency=dict(eff),
        sparse_efficiency=SparseEfficiency(tuple(profile.sparse_efficiency.densities), tuple(sp)),
        overhead_s=overhead, mem_bandwidth_gbs=bw)


def calibrate(profile: DeviceProfile, measurements: Sequence[Measurement],
              fit: Sequence[str] = DEFAULT_FIT, date: str | None = None) -> DeviceProfile:
    """A new profile fitted to ``measurements`` (see the module docstring).

    ``fit`` chooses among ``efficiency``, ``sparse_efficiency``, ``overhead_s`` and
    ``bandwidth``. Raises :class:`CalibrationError` when nothing can be fitted.
    """
    unknown = set(fit) - set(DEFAULT_FIT)
    if unknown:
        raise CalibrationError(f"fit: unknown item(s) {sorted(unknown)}; expected some of {DEFAULT_FIT}")
    f = _features(measurements)
    n = int(f["measured"].size)
    if n == 0:
        raise CalibrationError("no per-layer measurements to calibrate from")
    # parameters: (path, getter start value, bounds)
    params: list[tuple[str, float, tuple[float, float]]] = []
    sp_free: list[int] = []
    if "efficiency" in fit:
        present = set(f["op_class"].tolist())
        # elementwise efficiency also times the sparse book-keeping of conv/linear rows
        if np.any(f["elem_flops"] > 0):
            present.add("elementwise")
        for c in OP_CLASSES:
            if c in present:
                params.append((f"efficiency.{c}", float(profile.efficiency[c]), _EFF_BOUNDS))
    if "sparse_efficiency" in fit:
        profile = _refine_grid(profile, f["density"])
        sp_free = _free_sparse_entries(profile.sparse_efficiency, f["density"])
        for i in sp_free:
            params.append((f"sparse_efficiency.efficiency[{i}]",
                           float(profile.sparse_efficiency.efficiency[i]), _EFF_BOUNDS))
    if "overhead_s" in fit:
        params.append(("overhead_s", max(float(profile.overhead_s), 1e-6), _OVH_BOUNDS))
    if "bandwidth" in fit:
        params.append(("memory.bandwidth_gbs", float(profile.mem_bandwidth_gbs), _BW_BOUNDS))
    if not params:
        raise CalibrationError("nothing to fit: no parameter is exercised by the measurements")

    lo = np.log([p[2][0] for p in params])
    hi = np.log([p[2][1] for p in params])
    x0 = np.clip(np.log([p[1] for p in params]), lo + 1e-9, hi - 1e-9)
    log_meas = np.log(f["measured"])

    def unpack(x: np.ndarray) -> DeviceProfile:
        eff = dict(profile.efficiency)
        sp = list(profile.sparse_efficiency.efficiency)
        ovh, bw = profile.overhead_s, profile.mem_bandwidth_gbs
        for (path, _, _), v in zip(params, np.exp(x), strict=True):
            if path.startswith("efficiency."):
                eff[path.split(".", 1)[1]] = float(v)
            elif path.startswith("sparse_efficiency."):
                sp[int(path[path.index("[") + 1:-1])] = float(v)
            elif path == "overhead_s":
                ovh = float(v)
            else:
                bw = float(v)
        return _with(profile, eff, sp, ovh, bw)

    def resid(x: np.ndarray) -> np.ndarray:
        pred = _predict(unpack(x), f)
        return np.log(np.maximum(pred, 1e-15)) - log_meas

    res = least_squares(resid, x0, bounds=(lo, hi), loss="cauchy", f_scale=0.3,
                        x_scale=1.0, diff_step=1e-4, max_nfev=2000)
    fitted_profile = unpack(res.x)
    when = date or _dt.date.today().isoformat()
    note = f"measured: calibrated from {n} measurements on {when}"
    paths = sorted({p[0] for p in params if not p[0].startswith("sparse_efficiency.")}
                   | ({"sparse_efficiency.efficiency"} if sp_free else set()))
    sources = dict(profile.sources)
    for p in paths:
        sources[p] = note
    return dataclasses.replace(fitted_profile, sources=sources,
                               fitted=tuple(sorted(set(profile.fitted) | set(paths))))


def leave_one_model_out(profile: DeviceProfile, measurements: Sequence[Measurement],
                        fit: Sequence[str] = DEFAULT_FIT) -> dict[str, Any]:
    """Fit on every model but one, test on that one, for each model; pooled held-out error too.

    Returns ``{"models": {name: {n, median_ape_pct, p90_ape_pct}}, "n", "median_ape_pct",
    "p90_ape_pct", "in_sample": {...}, "predictions": [...]}`` (percentages; ``predictions``
    holds each measurement's held-out prediction in seconds, NaN where it was not used).
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
        prof = calibrate(profile, train, fit)
        f = _features(test)
        pred = _predict(prof, f)
        held_out[np.asarray(idx)[f["src"]]] = pred
        ape = _ape(pred, f["measured"])
        pooled.append(ape)
        report["models"][held] = _summary(ape)
    report.update(_summary(np.concatenate(pooled)))
    per = [m for m in measurements if m.layer != "step"]
    report["in_sample"] = calibration_error(calibrate(profile, per, fit), per)
    report["predictions"] = held_out.tolist()
    return report
