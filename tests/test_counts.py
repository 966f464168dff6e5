"""Counts: hand-derived MACs, phase scaling under sparse plans, memory vs real sparse arrays."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sps

import hwmodel
from hwmodel.counts import (
    FLOPS_CONVENTION,
    TOPK_FLOPS_PER_ELEMENT,
    count,
    peak_memory_bytes,
)
from hwmodel.measure import PHASES
from hwmodel.plan import LayerSparsity, PlanError, SparsityPlan

NUMERIC = ["macs", "dense_macs", "elem_flops", "topk_flops", "compress_flops", "compress_nnz", "flops",
           "bytes_read", "bytes_written", "params", "param_bytes", "compressed_weight_bytes",
           "grad_bytes", "optim_bytes", "saved_act_bytes", "buffer_bytes", "work_bytes",
           "csr_bytes", "bitmap_bytes"]


def _conv_macs(cin, cout, k, h_out, w_out):
    return cout * h_out * w_out * cin * k * k


def _fwd(df: pd.DataFrame) -> pd.Series:
    return df[df.phase == "forward"].set_index("layer")["macs"]


# ----------------------------------------------------------------------------- MACs by hand
def test_lenet5_forward_macs_by_hand():
    # 28x28 padded by 2 -> conv5 6ch 28x28 -> pool 14 -> conv5 16ch 10x10 -> pool 5 -> 400
    want = {
        "conv1": _conv_macs(1, 6, 5, 28, 28),
        "conv2": _conv_macs(6, 16, 5, 10, 10),
        "fc1": 16 * 5 * 5 * 120,
        "fc2": 120 * 84,
        "fc3": 84 * 10,
    }
    fwd = _fwd(count("lenet5"))
    for layer, macs in want.items():
        assert fwd[layer] == macs, layer
    assert fwd.sum() == sum(want.values()) == 416_520


def test_femnist_forward_macs_by_hand_and_batch_scaling():
    want = {
        "conv1": _conv_macs(1, 32, 5, 28, 28),
        "conv2": _conv_macs(32, 64, 5, 14, 14),
        "fc1": 64 * 7 * 7 * 2048,
        "fc2": 2048 * 62,
    }
    assert sum(want.values()) == 17_211_904
    df = count(hwmodel.build("femnist_cnn"), batch=8)
    fwd = _fwd(df)
    for layer, macs in want.items():
        assert fwd[layer] == 8 * macs
    # backward: the weight gradient repeats every forward MAC; the input gradient too, except
    # for the first layer, whose input is the data (no gradient needed)
    bi = df[df.phase == "backward_input"].set_index("layer")["macs"]
    bw = df[df.phase == "backward_weight"].set_index("layer")["macs"]
    assert bi["conv1"] == 0
    for layer in ("conv2", "fc1", "fc2"):
        assert bi[layer] == 8 * want[layer]
    for layer in want:
        assert bw[layer] == 8 * want[layer]
    # elementwise layers hold no MACs
    assert (df[~df.type.isin(["conv2d", "linear"])]["macs"] == 0).all()


def test_frame_shape_columns_and_convention():
    spec = hwmodel.build("resnet8")
    df = count(spec, batch=4)
    for col in ("layer", "type", "phase", "macs", "flops", "bytes_read", "bytes_written", "params",
                "weight_density", "act_density", "param_bytes", "grad_bytes", "optim_bytes",
                "saved_act_bytes"):
        assert col in df.columns
    assert len(df) == (len(spec.nodes) + 1) * len(PHASES)  # every node and the loss
    assert set(df.phase) == set(PHASES)
    assert df.attrs["flops_convention"] == FLOPS_CONVENTION
    assert "FLOPs = 2 x MACs" in FLOPS_CONVENTION
    # resnet8's convs have no bias: their compute rows are exactly 2 x MACs
    convs = df[(df.type == "conv2d") & (df.phase != "update")]
    assert (convs.flops == 2 * convs.macs).all()
    assert (df.flops == 2 * df.macs + df.elem_flops).all()
    # parameters per layer agree with the spec
    p = df[df.phase == "forward"].set_index("layer")["params"]
    assert p.drop("loss").sum() == spec.num_params()


def test_elementwise_counts_by_hand():
    spec = hwmodel.build("lenet5")
    df = count(spec, batch=2).set_index(["layer", "phase"])
    # relu1 sees 6x28x28 per sample: one compare per element forward and backward
    assert df.loc[("relu1", "forward"), "elem_flops"] == 2 * 6 * 28 * 28
    assert df.loc[("relu1", "backward_input"), "elem_flops"] == 2 * 6 * 28 * 28
    # pool1: a 2x2 window per output (6x14x14)
    assert df.loc[("pool1", "forward"), "elem_flops"] == 2 * 6 * 14 * 14 * 4
    # flatten is a view
    assert df.loc[("flatten", "forward"), ["flops", "bytes_read", "bytes_written"]].sum() == 0
    # conv1 bias add: one add per output element
    assert df.loc[("conv1", "forward"), "elem_flops"] == 2 * 6 * 28 * 28
    # sgd with momentum: 6 flops per parameter, one fp32 buffer per parameter
    assert df.loc[("fc1", "update"), "elem_flops"] == 6 * (400 * 120 + 120)
    assert df.loc[("fc1", "update"), "optim_bytes"] == 4 * (400 * 120 + 120)


# ----------------------------------------------------------------------------- sparse plans
@pytest.mark.parametrize("mode", ["swat", "masked"])
@pytest.mark.parametrize("model", ["resnet8", "femnist_cnn", "mlp"])
def test_sparse_counts_at_density_one_equal_dense(model, mode):
    spec = hwmodel.build(model)
    plan = SparsityPlan(mode, {n: LayerSparsity(1.0, 1.0, topk_period=7)
                               for n in spec.weighted_layers()})
    dense = count(spec, batch=3)
    sparse = count(spec, plan, batch=3)
    pd.testing.assert_frame_equal(dense[NUMERIC], sparse[NUMERIC])
    assert peak_memory_bytes(spec, plan, 3) == peak_memory_bytes(spec, None, 3)


def test_swat_phase_scaling():
    spec = hwmodel.build("femnist_cnn")
    plan = SparsityPlan("swat", {"conv2": LayerSparsity(0.25, 0.5), "fc1": LayerSparsity(0.1, 0.2)})
    dense = count(spec, batch=4).set_index(["layer", "phase"])["macs"]
    sp = count(spec, plan, batch=4).set_index(["layer", "phase"])["macs"]
    for layer, wd, ad in (("conv2", 0.25, 0.5), ("fc1", 0.1, 0.2)):
        assert sp[(layer, "forward")] == pytest.approx(wd * dense[(layer, "forward")])
        assert sp[(layer, "backward_input")] == pytest.approx(wd * dense[(layer, "backward_input")])
        assert sp[(layer, "backward_weight")] == pytest.approx(ad * dense[(layer, "backward_weight")])
    for layer in ("conv1", "fc2"):  # not in the plan: dense
        for ph in PHASES:
            assert sp[(layer, ph)] == dense[(layer, ph)]


def test_masked_phase_scaling_and_nnz_sized_state():
    spec = hwmodel.build("lenet5")
    plan = SparsityPlan.uniform(spec, 0.75, mode="masked", layers="all")
    dense = count(spec, batch=4).set_index(["layer", "phase"])
    sp = count(spec, plan, batch=4).set_index(["layer", "phase"])
    for layer in spec.weighted_layers():
        for ph in ("forward", "backward_input", "backward_weight"):
            assert sp.loc[(layer, ph), "macs"] == pytest.approx(0.25 * dense.loc[(layer, ph), "macs"])
        w = math.prod(spec.param_shapes(layer)[f"{layer}.weight"])
        b = math.prod(spec.param_shapes(layer)[f"{layer}.bias"])
        nnz = max(1, round(0.25 * w))
        assert sp.loc[(layer, "backward_weight"), "grad_bytes"] == 4 * (nnz + b)
        assert sp.loc[(layer, "update"), "optim_bytes"] == 4 * (nnz + b)
        assert sp.loc[(layer, "forward"), "topk_flops"] == 0  # a fixed mask needs no top-K
        assert sp.loc[(layer, "forward"), "saved_act_bytes"] == dense.loc[(layer, "forward"), "saved_act_bytes"]


def test_topk_cost_amortised_by_period():
    spec = hwmodel.build("lenet5")
    batch = 5

    def plan(period):
        return SparsityPlan("swat", {"conv2": LayerSparsity(0.2, 0.5, period)})

    one = count(spec, plan(1), batch).set_index(["layer", "phase"])
    ten = count(spec, plan(10), batch).set_index(["layer", "phase"])
    w = 16 * 6 * 25
    x = batch * 6 * 14 * 14  # conv2's input, the activation that is top-K'd
    assert one.loc[("conv2", "forward"), "topk_flops"] == TOPK_FLOPS_PER_ELEMENT * (w + x)
    assert ten.loc[("conv2", "forward"), "topk_flops"] == pytest.approx(
        one.loc[("conv2", "forward"), "topk_flops"] / 10)
    # the threshold pass that builds W_s and the compressed input runs every step
    assert one.loc[("conv2", "forward"), "compress_flops"] == w + x
    assert ten.loc[("conv2", "forward"), "compress_flops"] == w + x
    # the non-zeros those passes write: floor(d * n + 0.5) kept weights and saved inputs
    assert one.loc[("conv2", "forward"), "compress_nnz"] == math.floor(0.2 * w + 0.5) + math.floor(0.5 * x + 0.5)
    assert one.loc[("conv2", "backward_input"), "compress_nnz"] == 0
    dense = count(spec, None, batch)
    assert dense.topk_flops.sum() == 0 and dense.compress_flops.sum() == 0
    assert dense.compress_nnz.sum() == 0


def test_sparse_memory_matches_real_csr_and_bitmap_arrays():
    """Build the compressed arrays a sparse trainer holds and compare their nbytes."""
    rng = np.random.default_rng(0)
    spec = hwmodel.build("lenet5")
    batch = 3
    plan = SparsityPlan("swat", {"conv2": LayerSparsity(0.3, 0.4), "fc1": LayerSparsity(0.1, 0.25),
                                 "fc2": LayerSparsity(0.5, 0.5)})
    df = count(spec, plan, batch).set_index(["layer", "phase"])
    for layer in plan.layers:
        shape = spec.param_shapes(layer)[f"{layer}.weight"]
        w = rng.standard_normal(shape).astype(np.float32).reshape(shape[0], -1)
        k = round(plan.weight_density(layer) * w.size)
        thresh = np.sort(np.abs(w).ravel())[-k]
        mask = np.abs(w) >= thresh
        assert mask.sum() == k
        csr = sps.csr_matrix(np.where(mask, w, 0).astype(np.float32))
        assert csr.indices.dtype == np.int32 and csr.nnz == k
        csr_nbytes = csr.data.nbytes + csr.indices.nbytes + csr.indptr.nbytes
        bitmap_nbytes = np.packbits(mask.ravel()).nbytes + w[mask].nbytes
        row = df.loc[(layer, "forward")]
        assert row["csr_bytes"] == csr_nbytes
        assert row["bitmap_bytes"] == bitmap_nbytes
        assert row["compressed_weight_bytes"] == csr_nbytes  # SWAT keeps W_s in CSR
        # the dense master copy stays: weight + bias, fp32
        bias = np.zeros(shape[0], np.float32)
        assert row["param_bytes"] == w.nbytes + bias.nbytes
        # the saved input: bitmap + values of the top-K activations of the batch
        x = rng.standard_normal((batch, *spec.in_shapes[layer][0])).astype(np.float32)
        ka = round(plan.act_density(layer) * x.size)
        amask = np.zeros(x.size, bool)
        amask[np.argsort(np.abs(x).ravel())[-ka:]] = True
        saved = np.packbits(amask).nbytes + x.ravel()[amask].nbytes
        assert row["saved_act_bytes"] == saved


def test_masked_parameters_stored_as_csr():
    spec = hwmodel.build("mlp")
    plan = SparsityPlan("masked", {"fc2": LayerSparsity(0.2, 1.0)})
    row = count(spec, plan).set_index(["layer", "phase"]).loc[("fc2", "forward")]
    w = np.zeros((200, 200), np.float32)
    w.ravel()[: round(0.2 * w.size)] = 1.0
    csr = sps.csr_matrix(w)
    assert row["param_bytes"] == csr.data.nbytes + csr.indices.nbytes + csr.indptr.nbytes + 200 * 4


def test_peak_memory_dense_parts_and_monotonic():
    spec = hwmodel.build("resnet8")
    p = spec.num_params()
    df = count(spec, batch=16)
    # parameters, gradients and one momentum buffer, fp32
    assert df.param_bytes.sum() == 4 * p
    assert df.grad_bytes.sum() == 4 * p
    assert df.optim_bytes.sum() == 4 * p
    assert count(spec, batch=16, optimizer="sgd").optim_bytes.sum() == 0
    peak16 = peak_memory_bytes(spec, None, 16)
    assert peak16 > 12 * p + df.saved_act_bytes.sum()
    assert peak_memory_bytes(spec, None, 32) > peak16
    swat = SparsityPlan.uniform(spec, 0.9)
    assert peak_memory_bytes(spec, swat, 16) < peak16  # sparse saved activations


def test_bad_input_errors():
    spec = hwmodel.build("mlp")
    with pytest.raises(ValueError, match="batch"):
        count(spec, batch=0)
    with pytest.raises(ValueError, match="optimizer"):
        count(spec, optimizer="lbfgs")
    with pytest.raises(PlanError, match="conv1"):
        count(spec, SparsityPlan("swat", {"conv1": LayerSparsity(0.5, 0.5)}))
    with pytest.raises(ValueError, match="known models"):
        count("no_such_model")


def test_lazy_export():
    import hwmodel.calibration as calibrate_module
    import hwmodel.estimator as estimate_module

    assert hwmodel.count is count
    # the submodules stay modules and the package names stay callable
    assert callable(calibrate_module.leave_one_model_out)
    assert callable(estimate_module.estimate_fleet)
    assert hwmodel.estimate("mlp", "rpi4").to_dict()["model"] == "mlp"
    assert callable(hwmodel.calibrate)


def test_nnz_matches_the_trainers_topk_count():
    topk = pytest.importorskip("embedded.kernels.topk")
    from hwmodel.counts import nnz_at

    for n in (1, 2, 3, 10, 101, 2400, 6_422_528):
        for d in (0.001, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 1.0):
            assert nnz_at(n, d) == topk.count_for_density(d, n), (n, d)
    assert nnz_at(10, 0.25) == 3  # 2.5 rounds half up, as the trainer does


@pytest.mark.parametrize("name", sorted(hwmodel.BUILDERS))
def test_forward_macs_equal_fvcore_on_the_torch_twin(name):
    """Issue 2: every builder's forward MACs (conv + linear) within 0.5 % of fvcore's count."""
    torch = pytest.importorskip("torch")
    fvcore_nn = pytest.importorskip("fvcore.nn")
    spec = hwmodel.build(name)
    twin = hwmodel.to_torch(spec).eval()
    fca = fvcore_nn.FlopCountAnalysis(twin, (torch.zeros(1, *spec.input_shape),))
    fca.unsupported_ops_warnings(False)
    fca.uncalled_modules_warnings(False)
    # fvcore counts one fused multiply-add as one "flop": MACs
    theirs = sum(v for k, v in fca.by_operator().items() if k in ("conv", "linear", "addmm", "matmul"))
    df = count(spec)
    ours = df[(df.phase == "forward") & df.type.isin(["conv2d", "linear"])].macs.sum()
    assert abs(ours - theirs) <= 0.005 * theirs


def test_relus_the_trainer_folds_count_no_pass():
    """resnet8's ReLUs after a batch norm or a residual add ride on that node's pass (the
    trainer fuses them: embedded.Network uses the same rule): no FLOPs, no bytes. A ReLU after
    a conv (lenet5) keeps its own pass."""
    spec = hwmodel.build("resnet8")
    fused = spec.fused_relus()
    assert fused == [n.name for n in spec.nodes if n.op == "relu"]
    df = count(spec, batch=4)
    for name in fused:
        rows = df[df["layer"] == name]
        assert len(rows) == len(PHASES)
        assert (rows[["flops", "bytes_read", "bytes_written"]].to_numpy() == 0).all()
    assert hwmodel.build("lenet5").fused_relus() == []
