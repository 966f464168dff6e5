"""train_local / evaluate / SGD / schedules: against torch on real data (sklearn's digits),
SWAT accuracy, reproducibility, hooks, measurements and bad input."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("embedded.layers.conv")
pytest.importorskip("embedded.layers.linear")
datasets = pytest.importorskip("sklearn.datasets")

from embedded.network import Network, TrainingDiverged  # noqa: E402
from embedded.optim import exp_decay_lr, schedule_lr  # noqa: E402
from embedded.train import TrainConfig, TrainStats, evaluate, train_local  # noqa: E402
from hwmodel import Measurement, ModelSpec, SparsityPlan, make_node  # noqa: E402
from hwmodel.plan import LayerSparsity, PlanError  # noqa: E402
from hwmodel.torch_twin import to_torch  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def _one_thread_pools():
    """torch's reference and BLAS run single-threaded here: their idle OpenMP/OpenBLAS threads
    spin and starve Numba's workers on a shared 2-core host (measured: 200 tiny steps took
    14-27 s in torch and 20-40 s in ours with 2 BLAS threads, ~1-3 s with 1)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - comes with scikit-learn
        yield
    else:
        with threadpool_limits(limits=1, user_api="blas"):
            yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def digits():
    """8x8 digits as (N, 1, 8, 8) float32 in [0, 1]; a fixed shuffled 1437/360 split."""
    d = datasets.load_digits()
    x = (d.images / 16.0).astype(np.float32)[:, None]
    y = d.target.astype(np.int64)
    p = np.random.default_rng(0).permutation(len(x))
    x, y = x[p], y[p]
    return x[:1437], y[:1437], x[1437:], y[1437:]


def digits_cnn(w: int = 8) -> ModelSpec:
    nodes = [
        make_node("conv1", "conv2d", "input", out_channels=w, kernel=3, padding=1),
        make_node("bn1", "batchnorm2d", "conv1"),
        make_node("relu1", "relu", "bn1"),
        make_node("conv2", "conv2d", "relu1", out_channels=2 * w, kernel=3, padding=1),
        make_node("relu2", "relu", "conv2"),
        make_node("pool1", "maxpool2d", "relu2", kernel=2),
        make_node("conv3", "conv2d", "pool1", out_channels=2 * w, kernel=3, padding=1),
        make_node("bn3", "batchnorm2d", "conv3"),
        make_node("relu3", "relu", "bn3"),
        make_node("pool2", "maxpool2d", "relu3", kernel=2),
        make_node("flatten", "flatten", "pool2"),
        make_node("fc1", "linear", "flatten", out_features=4 * w),
        make_node("relu4", "relu", "fc1"),
        make_node("fc2", "linear", "relu4", out_features=10),
    ]
    return ModelSpec("digits_cnn", (1, 8, 8), nodes)


def _torch_losses(spec, state, x, y, cfg: TrainConfig, steps: int):
    """torch.optim.SGD on the twin with the same weights, batch order and lr per step."""
    twin = to_torch(spec)
    twin.load_state_dict({k: torch.tensor(v) for k, v in state.items()})
    twin.train()
    opt = torch.optim.SGD(twin.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                          weight_decay=cfg.weight_decay, nesterov=cfg.nesterov)
    rng = np.random.default_rng(cfg.seed)  # train_local's documented batch order
    losses, step = [], 0
    while step < steps:
        perm = rng.permutation(len(x))
        for s in range(0, len(x), cfg.batch_size):
            if step >= steps:
                break
            idx = perm[s:s + cfg.batch_size]
            for g in opt.param_groups:
                g["lr"] = schedule_ref(cfg, step, steps)
            opt.zero_grad()
            loss = twin.loss(twin(torch.tensor(x[idx])), torch.tensor(y[idx]))
            loss.backward()
            opt.step()
            losses.append(loss.item())
            step += 1
    return np.array(losses), {k: v.numpy() for k, v in twin.state_dict().items()}


def schedule_ref(cfg: TrainConfig, step: int, total: int) -> float:
    """The schedules written out independently of embedded.optim."""
    if cfg.lr_schedule == "constant":
        return cfg.lr
    if cfg.lr_schedule == "step":
        return cfg.lr * cfg.lr_gamma ** math.floor(step / cfg.lr_step_size)
    return cfg.lr * (cfg.lr_end / cfg.lr) ** (step / (total - 1))


def test_200_sgd_steps_on_digits_track_torch(digits):
    """lr 0.01: at lr 0.05 the run is chaotic — torch float32 and torch float64 themselves
    drift apart by more than 100 % after ~150 steps (measured), so no float32 implementation
    could stay within 1e-3 there; at 0.01 all three agree to ~3e-6."""
    xtr, ytr, _, _ = digits
    spec = digits_cnn(8)
    net = Network.from_spec(spec, seed=3)
    state = net.state_dict()
    cfg = TrainConfig(lr=0.01, momentum=0.9, weight_decay=5e-4, batch_size=32, epochs=5,
                      max_steps=200, seed=7, threads=2)
    stats = train_local(net, xtr, ytr, cfg)
    ref, ref_state = _torch_losses(spec, state, xtr, ytr, cfg, 200)
    ours = np.array(stats.losses)
    assert stats.steps == 200 and ours.shape == (200,)
    rel = np.abs(ours - ref) / np.abs(ref)
    assert rel.max() < 1e-3, f"step {rel.argmax()}: ours {ours[rel.argmax()]} torch {ref[rel.argmax()]}"
    assert ours[-20:].mean() < 0.5 * ours[:20].mean()  # it learned
    final = net.state_dict()
    for k in ("bn1.running_mean", "bn1.running_var", "bn3.running_var"):
        np.testing.assert_allclose(final[k], ref_state[k], rtol=1e-2, atol=1e-3, err_msg=k)
    assert int(final["bn1.num_batches_tracked"]) == 200
    # evaluate / predict (inference mode: running stats) against the twin holding our weights
    _, _, xte, yte = digits
    twin = to_torch(spec)
    twin.load_state_dict({k: torch.tensor(v) for k, v in final.items()})
    twin.eval()
    with torch.no_grad():
        logits = twin(torch.tensor(xte))
        ref_loss = twin.loss(logits, torch.tensor(yte)).item()
    res = evaluate(net, xte, yte, batch_size=100)  # 360 = 3 full batches and a short one
    assert res["n"] == 360
    assert res["loss"] == pytest.approx(ref_loss, rel=1e-4)
    assert res["accuracy"] == pytest.approx(float((logits.argmax(1).numpy() == yte).mean()))
    np.testing.assert_allclose(net.predict(xte), logits.numpy(), rtol=1e-4, atol=1e-4)
    assert net.training  # evaluate/predict leave the mode alone


def test_nesterov_and_exp_schedule_track_torch(digits):
    xtr, ytr, _, _ = digits
    spec = digits_cnn(4)
    net = Network.from_spec(spec, seed=4)
    state = net.state_dict()
    cfg = TrainConfig(lr=0.1, momentum=0.8, weight_decay=1e-3, nesterov=True, batch_size=50, epochs=4,
                      max_steps=30, seed=1, lr_schedule="exp", lr_end=0.01, threads=1)
    stats = train_local(net, xtr[:400], ytr[:400], cfg)
    ref, ref_state = _torch_losses(spec, state, xtr[:400], ytr[:400], cfg, 30)
    np.testing.assert_allclose(stats.losses, ref, rtol=1e-3)
    np.testing.assert_allclose(net.state_dict()["fc2.weight"], ref_state["fc2.weight"],
                               rtol=1e-3, atol=1e-4)


def test_swat_at_0_9_reaches_dense_accuracy_within_2_points(digits):
    xtr, ytr, xte, yte = digits
    spec = digits_cnn(16)
    acc = {}
    for sparsity in (0.0, 0.9):
        net = Network.from_spec(spec, seed=0)
        plan = SparsityPlan.uniform(spec, sparsity, mode="swat", layers="swat")
        cfg = TrainConfig(lr=0.05, batch_size=32, epochs=8, lr_schedule="exp", lr_end=0.005,
                          threads=2)
        stats = train_local(net, xtr, ytr, cfg, plan=plan)
        acc[sparsity] = evaluate(net, xte, yte)["accuracy"]
        if sparsity:
            assert set(plan.layers) == {"conv2", "conv3", "fc1"}
            for k in plan.layers:
                assert stats.density[k] == pytest.approx(0.1, abs=0.01)
                assert stats.act_density[k] < 0.2
            assert stats.density["conv1"] == 1.0
    assert acc[0.0] > 0.95
    assert acc[0.9] >= acc[0.0] - 0.02, acc


@pytest.mark.parametrize("mode", ["dense", "swat"])
def test_same_seed_and_threads_give_bitwise_equal_weights(digits, mode):
    xtr, ytr, _, _ = digits
    spec = digits_cnn(8)
    plan = SparsityPlan.uniform(spec, 0.0 if mode == "dense" else 0.8, mode="swat")
    cfg = TrainConfig(batch_size=24, max_steps=25, seed=5, threads=2)
    states = []
    for _ in range(2):
        net = Network.from_spec(spec, seed=11)
        train_local(net, xtr[:300], ytr[:300], cfg, plan=plan)
        states.append(net.state_dict())
    for k in states[0]:
        assert np.array_equal(states[0][k], states[1][k]), k
    # a different seed changes the batch order, hence the weights
    net = Network.from_spec(spec, seed=11)
    train_local(net, xtr[:300], ytr[:300], TrainConfig(batch_size=24, max_steps=25, seed=6,
                                                       threads=2), plan=plan)
    assert not np.array_equal(net.state_dict()["fc2.weight"], states[0]["fc2.weight"])


def test_masked_training_keeps_pruned_weights_at_zero(digits):
    xtr, ytr, _, _ = digits
    spec = digits_cnn(8)
    net = Network.from_spec(spec, seed=0)
    plan = SparsityPlan.uniform(spec, 0.7, mode="masked", layers="all")
    rng = np.random.default_rng(0)
    masks = {n: rng.random(net.layers[n].params["weight"].shape) < 0.3 for n in plan.layers}
    net.set_plan(plan)
    net.set_masks(masks)
    cfg = TrainConfig(batch_size=32, max_steps=10, threads=2)
    train_local(net, xtr, ytr, cfg)
    # a new mask (as FedDST's readjustment makes) must not let stale momentum leak out
    masks2 = {n: rng.random(m.shape) < 0.3 for n, m in masks.items()}
    net.set_masks(masks2)
    net._sgd.zero_state = lambda: None  # keep the old momentum on purpose
    train_local(net, xtr, ytr, cfg)
    sd = net.state_dict()
    for n, m in masks2.items():
        w = sd[f"{n}.weight"]
        assert not w[~m].any(), n  # plain SGD would move these by the old momentum
        assert np.count_nonzero(w[m & ~masks[n]]) > 0  # newly allowed weights (from 0) train


class _Recorder:
    def __init__(self):
        self.calls = []

    def begin(self, net, plan, total_steps):
        self.calls.append(("begin", plan.mode, total_steps))

    def after_step(self, net, step, xb, yb):
        self.calls.append(("step", step, xb.shape, yb.copy()))


def test_mask_schedule_hooks_stats_and_measurements(digits):
    xtr, ytr, _, _ = digits
    spec = digits_cnn(4)
    net = Network.from_spec(spec)
    rec = _Recorder()
    cfg = TrainConfig(batch_size=40, epochs=2, seed=2, threads=1)
    n = 100
    stats = train_local(net, xtr[:n], ytr[:n], cfg, mask_schedule=rec, device="host")
    assert stats.steps == 6 and stats.samples == 200 and stats.epochs == 2.0  # 40+40+20, twice
    assert rec.calls[0] == ("begin", "dense", 6)
    assert [c[1] for c in rec.calls[1:]] == list(range(6))
    assert [c[2][0] for c in rec.calls[1:]] == [40, 40, 20, 40, 40, 20]
    perm = np.random.default_rng(2).permutation(n)
    assert np.array_equal(rec.calls[1][3], ytr[:n][perm[:40]])
    # measurements: every layer's forward, conv/linear's three phases, the update
    m = {(r.layer, r.phase): r for r in stats.measurements}
    for node in spec.nodes:
        assert (node.name, "forward") in m
    for layer in ("conv1", "fc1", "fc2"):
        assert (layer, "backward_weight") in m and (layer, "update") in m
    assert ("conv2", "backward_input") in m and ("conv1", "backward_input") not in m
    assert ("bn1", "update") in m and ("step", "step") in m
    assert ("bn1", "backward_input+backward_weight") in m  # fused pass, as calibration reads
    assert ("relu1", "backward_input") in m and ("loss", "forward+backward_input") in m
    r = m[("conv2", "forward")]
    assert r.provenance == "measured" and r.device == "host" and r.repeats == 6
    assert r.batch == 40 and r.threads == 1 and r.median_s > 0
    params = sum(v.nbytes for v in net.params.values())
    assert stats.peak_bytes > 3 * params  # params, grads, momentum, activations
    assert stats.samples_per_s > 0 and len(stats.losses) == 6
    # JSON round trip
    back = TrainStats.from_dict(json.loads(json.dumps(stats.to_dict())))
    assert back == stats and isinstance(back.measurements[0], Measurement)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy's overflow warnings on the way
def test_nan_loss_names_step_and_layer(digits):
    xtr, ytr, _, _ = digits
    net = Network.from_spec(digits_cnn(4))
    net.layers["bn3"].params["weight"][0] = np.nan
    with pytest.raises(TrainingDiverged, match="step 0.*layer 'bn3'"):
        train_local(net, xtr[:64], ytr[:64], TrainConfig(batch_size=32, threads=1))
    net = Network.from_spec(digits_cnn(4))
    x = xtr[:64].copy()
    x[:] = np.inf
    with pytest.raises(TrainingDiverged, match="step 0.*input batch"):
        train_local(net, x, ytr[:64], TrainConfig(batch_size=32, threads=1))
    # a huge learning rate diverges after some steps: the step number is reported
    net = Network.from_spec(digits_cnn(4))
    with pytest.raises(TrainingDiverged, match=r"step [1-9]\d*"):
        train_local(net, xtr, ytr, TrainConfig(lr=1e6, momentum=0.9, batch_size=32,
                                               threads=1, epochs=3))


def test_bad_input_is_named(digits):
    xtr, ytr, _, _ = digits
    net = Network.from_spec(digits_cnn(4))
    cfg = TrainConfig(max_steps=1, threads=1)
    with pytest.raises(ValueError, match=r"expected float32 NCHW shape \(N, 1, 8, 8\).*\(10, 8, 8\)"):
        train_local(net, xtr[:10, 0], ytr[:10], cfg)
    with pytest.raises(ValueError, match=r"training labels y: label 10 out of range \[0, 10\)"):
        train_local(net, xtr[:3], np.array([1, 10, 2]), cfg)
    with pytest.raises(TypeError, match="integer class labels"):
        train_local(net, xtr[:3], np.array([1.0, 0.0, 2.0]), cfg)
    with pytest.raises(PlanError, match="'conv9'"):
        train_local(net, xtr[:3], ytr[:3], cfg,
                    plan=SparsityPlan("swat", {"conv9": LayerSparsity(0.1, 0.1)}))
    with pytest.raises(ValueError, match="threads"):
        train_local(net, xtr[:3], ytr[:3], TrainConfig(threads=10_000))
    # float64 data is converted once and trains like float32
    a = Network.from_spec(digits_cnn(4))
    b = Network.from_spec(digits_cnn(4))
    train_local(a, xtr[:64].astype(np.float64), ytr[:64], TrainConfig(max_steps=2, threads=1))
    train_local(b, xtr[:64], ytr[:64], TrainConfig(max_steps=2, threads=1))
    assert np.array_equal(a.state_dict()["fc2.weight"], b.state_dict()["fc2.weight"])


def test_train_config_validation_and_round_trip():
    cfg = TrainConfig(lr=0.2, lr_schedule="exp", lr_end=0.01, max_steps=5, threads=2)
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError, match="unknown field.*'lrr'"):
        TrainConfig.from_dict({"lrr": 0.1})
    with pytest.raises(ValueError, match="TrainConfig.lr:"):
        TrainConfig(lr=-1)
    with pytest.raises(ValueError, match="lr_end: required"):
        TrainConfig(lr_schedule="exp")
    with pytest.raises(ValueError, match="lr_schedule"):
        TrainConfig(lr_schedule="cosine")
    with pytest.raises(ValueError, match="batch_size"):
        TrainConfig.from_dict({"batch_size": 0})
    with pytest.raises(ValueError, match="lr_step_size"):
        TrainConfig(lr_schedule="step")
    with pytest.raises(ValueError, match="nesterov"):
        TrainConfig(nesterov=True, momentum=0.0)


def test_schedules():
    # ALGORITHMS.md: lr_t = lr_start * (lr_end / lr_start) ** (t / T)
    assert exp_decay_lr(0.1, 0.001, 0, 100) == pytest.approx(0.1)
    assert exp_decay_lr(0.1, 0.001, 50, 100) == pytest.approx(0.01)
    assert exp_decay_lr(0.1, 0.001, 100, 100) == pytest.approx(0.001)
    assert schedule_lr("exp", 0.1, 9, 10, lr_end=0.01) == pytest.approx(0.01)
    assert schedule_lr("step", 0.1, 7, 100, step_size=3, gamma=0.5) == pytest.approx(0.025)
    assert schedule_lr("constant", 0.3, 99, 100) == 0.3
