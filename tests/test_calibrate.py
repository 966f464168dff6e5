"""Calibration recovers a known profile from noisy synthetic measurements; LOMO runs."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import hwmodel
from hwmodel.calibration import (
    CalibrationError,
    calibrate,
    calibration_error,
    leave_one_model_out,
    predict,
)
from hwmodel.measure import PHASES, Measurement
from hwmodel.profile import SparseKernel
from hwmodel.profiles import load_profile, save_profile

DENS = (0.05, 0.1, 0.3, 1.0)
CACHE = 256 * 1024


@pytest.fixture(scope="module")
def profiles():
    """A start profile (the shipped generic-x86) and a known 'true' profile of the rich model:
    efficiencies per class and phase and per elementwise kind, sparse kernels, book-keeping
    costs, per-kind overheads, a cache term and additive compute + memory time."""
    start = load_profile("generic-x86")
    eff = {"conv": 0.2, "gemm": 0.35, "elementwise": 0.05, "conv_forward": 0.25,
           "conv_backward_input": 0.3, "conv_backward_weight": 0.15, "gemm_forward": 0.4,
           "gemm_backward_input": 0.45, "gemm_backward_weight": 0.3, "pool_forward": 0.004,
           "pool_backward": 0.03, "activation_forward": 0.2, "activation_backward": 0.05,
           "loss_forward": 0.004, "loss_backward": 0.002, "update": 0.3, "topk": 0.015,
           "compress": 0.005}
    kernels = {f"{c}_{p}": SparseKernel(e, f) for (c, p), (e, f) in {
        ("conv", "forward"): (0.6, 0.05), ("conv", "backward_input"): (0.5, 0.1),
        ("conv", "backward_weight"): (0.3, 0.2), ("gemm", "forward"): (0.5, 0.05),
        ("gemm", "backward_input"): (0.4, 0.08), ("gemm", "backward_weight"): (0.25, 0.3)}.items()}
    true = dataclasses.replace(
        start, efficiency=eff, sparse_kernels=kernels, compress_nnz_s=2e-9, overhead_s=3e-6,
        overheads={"conv": 1e-5, "gemm": 5e-6, "pool": 8e-6, "activation": 2e-6, "loss": 4e-6,
                   "update": 3e-6},
        mem_bandwidth_gbs=8.0, cache_bytes=CACHE, cache_bandwidth_gbs=30.0, overlap=0.0)
    return start, true


def synthetic(true, models=("lenet5", "femnist_cnn", "mlp"), noise=0.05, seed=0):
    """Measurements whose times the true profile predicts, times log-normal noise."""
    rng = np.random.default_rng(seed)
    ms = []
    for model in models:
        spec = hwmodel.build(model)
        for batch in (8, 32):
            for d in (1.0, 0.3, 0.1, 0.05):
                for node in spec.nodes:
                    if d < 1 and node.op not in ("conv2d", "linear"):
                        continue
                    for ph in PHASES:
                        ms.append(Measurement(model, node.name, node.op, ph, d, d, batch, 1,
                                              1.0, 0.0, 5))
    pred = predict(true, ms)
    out = []
    for m, p in zip(ms, pred, strict=True):
        if p > 0:  # phases without work (flatten, relu's weight gradient) are not measured
            out.append(dataclasses.replace(m, median_s=float(p * np.exp(rng.normal(0, noise)))))
    return out


def test_calibration_recovers_known_parameters(profiles, tmp_path):
    start, true = profiles
    ms = synthetic(true)
    before = calibration_error(start, ms)
    fit = calibrate(start, ms, date="2026-01-02", cache_bytes=CACHE, mac_per_phase=True,
                    kind_overheads=True)
    # the MAC-heavy and streaming terms are well determined by the data
    for k in ("conv_forward", "conv_backward_input", "conv_backward_weight", "gemm_forward",
              "gemm_backward_input", "gemm_backward_weight", "pool_forward"):
        assert fit.efficiency[k] == pytest.approx(true.efficiency[k], rel=0.1), k
    for k in ("conv_forward", "conv_backward_weight", "gemm_backward_weight"):
        assert fit.sparse_kernels[k].efficiency == pytest.approx(
            true.sparse_kernels[k].efficiency, rel=0.15), k
    assert fit.mem_bandwidth_gbs == pytest.approx(8.0, rel=0.1)
    assert fit.cache_bytes == CACHE and fit.overlap == 0.0
    assert fit.compress_nnz_s == pytest.approx(2e-9, rel=0.3)
    after = calibration_error(fit, ms)
    assert before["median_ape_pct"] > 30
    assert after["median_ape_pct"] < 6  # the noise is 5% (median |error| ~3.4%)
    assert after["n"] == len(ms)
    # bookkeeping: fitted paths, sources, and the file round trip
    for p in ("efficiency.conv_forward", "efficiency.pool_forward", "sparse_kernels.conv_forward",
              "overheads.conv", "memory.bandwidth_gbs", "memory.cache_bandwidth_gbs",
              "memory.overlap", "sparse_kernels.compress_nnz_s"):
        assert p in fit.fitted, p
    for p in fit.fitted:
        assert fit.sources[p].startswith(f"measured: calibrated from {len(ms)} measurements on 2026-01-02")
    assert start.fitted == ()  # the input is not modified
    path = save_profile(fit, tmp_path / "fitted.toml")
    again = load_profile(str(path))
    assert again.fitted and again.efficiency["conv"] == pytest.approx(fit.efficiency["conv"])
    assert again.sparse_kernels == fit.sparse_kernels and again.overheads == fit.overheads
    assert calibration_error(again, ms)["median_ape_pct"] == pytest.approx(after["median_ape_pct"])
    est = hwmodel.estimate("mlp", again)
    assert est.to_dict()["provenance"] == "calibrated-estimate"


def test_dense_only_measurements_fit_no_sparse_kernels(profiles):
    start, true = profiles
    ms = [m for m in synthetic(true, models=("lenet5", "mlp")) if m.density == 1.0]
    fit = calibrate(start, ms)
    assert fit.sparse_kernels == {} and fit.sparse_efficiency == start.sparse_efficiency
    assert not any(p.startswith("sparse_kernels.") for p in fit.fitted)
    # by default one MAC efficiency per class and one overhead
    assert "efficiency.conv" in fit.fitted and "overhead_s" in fit.fitted
    assert "efficiency.conv_forward" not in fit.fitted and fit.overheads == {}


def test_unexercised_kind_backs_off_to_the_coarser_fit(profiles):
    start, true = profiles
    ms = synthetic(true, models=("lenet5",), noise=0.0)
    fit = calibrate(start, ms)
    # lenet5 has no batch norm: no norm key is written, so norm rows use the fitted elementwise
    assert "norm_forward" not in fit.efficiency and "norm" not in fit.overheads
    assert "efficiency.elementwise" in fit.fitted


def test_fit_subset_keeps_the_rest(profiles):
    start, true = profiles
    ms = synthetic(true, models=("lenet5", "mlp"), noise=0.0)
    fit = calibrate(start, ms, fit=("bandwidth",))
    assert fit.efficiency == start.efficiency and fit.overhead_s == start.overhead_s
    assert "memory.bandwidth_gbs" in fit.fitted
    assert not any(p.startswith("efficiency.") for p in fit.fitted)
    with pytest.raises(CalibrationError, match="unknown"):
        calibrate(start, ms, fit=("magic",))


def test_leave_one_model_out_runs(profiles):
    start, true = profiles
    ms = synthetic(true, models=("lenet5", "femnist_cnn", "mlp"), noise=0.03, seed=3)
    rep = leave_one_model_out(start, ms, cache_bytes=CACHE, mac_per_phase=True,
                              kind_overheads=True)
    assert set(rep["models"]) == {"lenet5", "femnist_cnn", "mlp"}
    assert rep["n"] == len(ms)
    assert rep["p90_ape_pct"] >= rep["median_ape_pct"] > 0
    assert len(rep["predictions"]) == len(ms) and np.all(np.isfinite(rep["predictions"]))
    # the three models share every kind of work: held out, each is predicted near the noise
    assert rep["median_ape_pct"] < 10
    assert rep["in_sample"]["median_ape_pct"] < 5


def test_bad_measurements():
    prof = load_profile("generic-x86")
    m = Measurement("lenet5", "conv9", "conv2d", "forward", 1.0, 1.0, 8, 1, 1e-3, 0.0, 3)
    with pytest.raises(CalibrationError, match="conv9"):
        calibrate(prof, [m])
    with pytest.raises(CalibrationError, match="model"):
        calibrate(prof, [dataclasses.replace(m, model="nope", layer="conv1")])
    with pytest.raises(CalibrationError, match="phase"):
        calibrate(prof, [dataclasses.replace(m, layer="conv1", phase="sideways")])
    with pytest.raises(CalibrationError, match="no per-layer"):
        calibrate(prof, [dataclasses.replace(m, layer="step")])
    with pytest.raises(CalibrationError, match=">= 2 models"):
        leave_one_model_out(prof, [dataclasses.replace(m, layer="conv1")])


def test_joined_phases_predict_the_sum(profiles):
    _, true = profiles
    base = Measurement("resnet8", "bn1", "batchnorm2d", "backward_input", 1.0, 1.0, 16, 1, 1e-3,
                       0.0, 3)
    parts = [base, dataclasses.replace(base, phase="backward_weight"),
             dataclasses.replace(base, phase="backward_input+backward_weight"),
             dataclasses.replace(base, model="lenet5", layer="flatten", layer_type="flatten",
                                 phase="forward"),
             dataclasses.replace(base, layer="step")]
    p = predict(true, parts)
    assert p[2] == pytest.approx(p[0] + p[1])
    assert np.isnan(p[3]) and np.isnan(p[4])  # no work / whole steps: not used
    with pytest.raises(CalibrationError, match="joined by"):
        predict(true, [dataclasses.replace(base, phase="forward+sideways")])
