"""H4's Numba layers and network against torch autograd (rtol 1e-4, atol 1e-5).

Each layer is checked forward and backward (input gradient and parameter gradients) on awkward
shapes: batch 1, odd channels, non-square maps, stride 2, padding, ties in max pooling; both the
serial and the parallel kernel variants. Whole networks (femnist_cnn, resnet8) are checked
through the torch twin of their ModelSpec (hwmodel.torch_twin) with the same weights loaded.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import embedded.kernels.elementwise as ew  # noqa: E402
from embedded.kernels.loss import softmax_xent, xent_and_correct  # noqa: E402
from embedded.network import Network, layer_class  # noqa: E402
from hwmodel import ModelSpec, SparsityPlan, build, make_node  # noqa: E402
from hwmodel.plan import PlanError  # noqa: E402
from hwmodel.torch_twin import to_torch  # noqa: E402

RTOL, ATOL = 1e-4, 1e-5


@pytest.fixture(scope="module", autouse=True)
def _one_thread_pools():
    """torch and BLAS single-threaded: their spinning pools starve Numba's on a busy host."""
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


def close(a, b, what=""):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=RTOL, atol=ATOL, err_msg=what)


@pytest.fixture(params=["serial", "parallel"])
def variant(request, monkeypatch):
    """Run a test with the serial kernels, then with the parallel ones forced on."""
    if request.param == "parallel":
        monkeypatch.setattr(ew, "PAR_MIN", 0)
    else:
        monkeypatch.setattr(ew, "PAR_MIN", 1 << 62)
    return request.param


def _one_layer(op: str, in_shape, inputs=("input",), **attrs):
    """A layer object for one node, with its torch twin module (same parameters)."""
    node = make_node("L", op, inputs if op == "add" else "input", **attrs)
    spec = ModelSpec("one", in_shape, [node, make_node("flat", "flatten", "L")]) \
        if op not in ("flatten", "global_avgpool") else ModelSpec("one", in_shape, [node])
    layer = layer_class(op)(node, spec.in_shapes["L"], spec.shapes["L"])
    layer.init_params(np.random.default_rng(0))
    twin = to_torch(spec)
    return layer, twin.L, spec


def _randomise(layer, tmod, rng):
    for k, p in layer.params.items():
        p[...] = rng.standard_normal(p.shape).astype(np.float32)
        getattr(tmod, k).data = torch.tensor(p.copy())


def _check(layer, tmod, x, rng, training=True):
    """Forward, then backward with a random upstream gradient, against torch."""
    n = x.shape[0]
    layer.setup(n + 2)  # a smaller batch than the buffers: views must work
    tmod.train(training)
    y = layer.forward(x, training).copy()
    xt = torch.tensor(x, requires_grad=True)
    yt = tmod(xt)
    close(y, yt.detach().numpy(), f"{layer.name} forward")
    gy = rng.standard_normal(y.shape).astype(np.float32)
    gx = layer.backward(gy, need_input_grad=True)
    (yt * torch.tensor(gy)).sum().backward()
    close(gx, xt.grad.numpy(), "input gradient")
    for k in layer.params:
        close(layer.grads[k], getattr(tmod, k).grad.numpy(), f"grad {k}")


BN_SHAPES = [((1, 3, 5, 7)), ((4, 5, 6, 6)), ((2, 1, 3, 9))]


@pytest.mark.parametrize("shape", BN_SHAPES)
def test_batchnorm_train_matches_torch(shape, variant):
    rng = np.random.default_rng(1)
    layer, tmod, _ = _one_layer("batchnorm2d", shape[1:], momentum=0.3)
    _randomise(layer, tmod, rng)
    for _ in range(3):  # running stats after several steps
        x = (rng.standard_normal(shape) * 3 + 1.5).astype(np.float32)
        _check(layer, tmod, x, rng, training=True)
        tmod.zero_grad()
    close(layer.buffers["running_mean"], tmod.running_mean.numpy(), "running_mean")
    close(layer.buffers["running_var"], tmod.running_var.numpy(), "running_var")
    assert int(layer.buffers["num_batches_tracked"]) == int(tmod.num_batches_tracked) == 3


def test_batchnorm_eval_uses_running_stats(variant):
    rng = np.random.default_rng(2)
    layer, tmod, _ = _one_layer("batchnorm2d", (5, 4, 3))
    _randomise(layer, tmod, rng)
    layer.buffers["running_mean"][:] = rng.standard_normal(5)
    layer.buffers["running_var"][:] = rng.uniform(0.5, 2, 5)
    tmod.running_mean.copy_(torch.tensor(layer.buffers["running_mean"]))
    tmod.running_var.copy_(torch.tensor(layer.buffers["running_var"]))
    _check(layer, tmod, rng.standard_normal((3, 5, 4, 3)).astype(np.float32), rng, training=False)
    assert int(layer.buffers["num_batches_tracked"]) == 0


@pytest.mark.parametrize("op,attrs", [("batchnorm2d", {}), ("groupnorm", {"num_groups": 2})])
def test_norm_statistics_stay_exact_when_mean_dwarfs_std(op, attrs):
    """Mean 1000, std 0.01: a naive E[x²] − E[x]² loses the variance; compare the output with
    torch in float64 on the same float32 input."""
    rng = np.random.default_rng(16)
    layer, tmod, _ = _one_layer(op, (4, 5, 6), **attrs)
    layer.setup(3)
    x = (1000 + 0.01 * rng.standard_normal((3, 4, 5, 6))).astype(np.float32)
    y = layer.forward(x, True)
    ref = tmod.double().train()(torch.tensor(x, dtype=torch.float64)).detach().numpy()
    close(y, ref)


def test_batchnorm_rejects_single_value_per_channel():
    layer, _, _ = _one_layer("batchnorm2d", (3, 1, 1))
    layer.setup(1)
    with pytest.raises(ValueError, match="more than one value per channel"):
        layer.forward(np.ones((1, 3, 1, 1), np.float32), True)


@pytest.mark.parametrize("relu", [False, True])
def test_batchnorm_kernels_stay_in_bounds(relu):
    """The batch-norm kernels compiled with Numba's bounds checks (as NUMBA_BOUNDSCHECK=1
    would) run without an IndexError: without a fused ReLU the keep mask is a (1, 1, 1)
    placeholder no kernel may index by sample or channel."""
    from numba import njit

    from embedded.layers import norm

    rng = np.random.default_rng(4)
    n, c, hw = 3, 4, 10
    x = rng.standard_normal((n, c, hw)).astype(np.float32)
    gy = rng.standard_normal((n, c, hw)).astype(np.float32)
    mk = np.ones((n, c, hw) if relu else (1, 1, 1), np.uint8)
    g, b = np.ones(c, np.float32), np.zeros(c, np.float32)
    mean, inv = np.zeros(c), np.ones(c)
    y, gx = np.empty_like(x), np.empty_like(x)
    rm, rv = np.zeros(c, np.float32), np.ones(c, np.float32)
    njit(boundscheck=True)(norm._bn_fwd_train)(x, g, b, 1e-5, y, mk, mean, inv, rm, rv, 0.1, relu)
    njit(boundscheck=True)(norm._bn_fwd_eval)(x, g, b, 1e-5, y, mk, mean, inv, rm, rv, relu)
    bwd = njit(boundscheck=True)(norm._bn_bwd)
    for training in (True, False):
        bwd(x, gy, mk, g, mean, inv, gx, g.copy(), b.copy(), training, True, relu)


@pytest.mark.parametrize("shape,groups", [((2, 6, 5, 3), 3), ((1, 5, 4, 7), 1), ((3, 4, 2, 2), 4)])
def test_groupnorm_matches_torch(shape, groups, variant):
    rng = np.random.default_rng(3)
    layer, tmod, _ = _one_layer("groupnorm", shape[1:], num_groups=groups)
    _randomise(layer, tmod, rng)
    _check(layer, tmod, (rng.standard_normal(shape) * 2 - 1).astype(np.float32), rng)


def test_relu_matches_torch(variant):
    rng = np.random.default_rng(4)
    layer, tmod, _ = _one_layer("relu", (3, 5, 7))
    x = rng.standard_normal((2, 3, 5, 7)).astype(np.float32)
    x[0, 0, 0, :3] = 0.0  # gradient at exactly 0 is 0 in torch
    x[1, 2, 3, 4] = np.nan  # NaN propagates forward and passes the gradient, as torch
    _check(layer, tmod, x, rng)


POOLS = [
    dict(kernel=2),
    dict(kernel=3, stride=2, padding=1),
    dict(kernel=(2, 3), stride=(1, 2), padding=(1, 1)),
    dict(kernel=3, stride=1, padding=0),
]


@pytest.mark.parametrize("attrs", POOLS)
@pytest.mark.parametrize("op", ["maxpool2d", "avgpool2d"])
def test_pools_match_torch(op, attrs, variant):
    rng = np.random.default_rng(5)
    layer, tmod, _ = _one_layer(op, (3, 7, 10), **attrs)
    for n in (1, 3):
        _check(layer, tmod, rng.standard_normal((n, 3, 7, 10)).astype(np.float32), rng)


def test_maxpool_ties_pick_first_maximum_like_torch(variant):
    rng = np.random.default_rng(6)
    layer, tmod, _ = _one_layer("maxpool2d", (2, 6, 6), kernel=3, stride=1, padding=1)
    # few distinct values: most windows hold ties; negative values meet the padding border
    x = rng.integers(-2, 1, size=(2, 2, 6, 6)).astype(np.float32)
    _check(layer, tmod, x, rng)


def test_global_avgpool_and_flatten_match_torch(variant):
    rng = np.random.default_rng(7)
    for op in ("global_avgpool", "flatten"):
        layer, tmod, _ = _one_layer(op, (5, 3, 4))
        _check(layer, tmod, rng.standard_normal((2, 5, 3, 4)).astype(np.float32), rng)


def test_add_backward_gives_same_gradient_to_both(variant):
    node = make_node("L", "add", ("input", "input"))
    layer = layer_class("add")(node, ((3, 4, 5), (3, 4, 5)), (3, 4, 5))
    layer.setup(2)
    rng = np.random.default_rng(8)
    a, b = (rng.standard_normal((2, 3, 4, 5)).astype(np.float32) for _ in range(2))
    close(layer.forward(a, b, True), a + b)
    gy = rng.standard_normal((2, 3, 4, 5)).astype(np.float32)
    assert np.array_equal(layer.backward(gy), gy)


@pytest.mark.parametrize("training", [True, False])
def test_batchnorm_with_fused_relu_matches_torch_bn_then_relu(training, variant):
    rng = np.random.default_rng(9)
    layer, tmod, _ = _one_layer("batchnorm2d", (4, 5, 6))
    _randomise(layer, tmod, rng)
    layer.relu = True
    tmod = torch.nn.Sequential(tmod, torch.nn.ReLU())
    layer.setup(5)
    warm = rng.standard_normal((3, 4, 5, 6)).astype(np.float32)
    layer.forward(warm, True)  # running statistics for the eval case
    tmod.train(True)
    tmod(torch.tensor(warm))
    x = rng.standard_normal((3, 4, 5, 6)).astype(np.float32)
    if training:
        x[1, 2, 3, 4] = np.nan  # NaN propagates through the ReLU, as torch's
    tmod.train(training)
    y = layer.forward(x, training).copy()
    xt = torch.tensor(x, requires_grad=True)
    yt = tmod(xt)
    close(y, yt.detach().numpy(), "forward")
    assert (y == 0).any()  # the ReLU cut something
    gy = rng.standard_normal(y.shape).astype(np.float32)
    gx = layer.backward(gy, need_input_grad=True)
    (yt * torch.tensor(gy)).sum().backward()
    close(gx, xt.grad.numpy(), "input gradient")
    close(layer.grads["weight"], tmod[0].weight.grad.numpy(), "grad weight")
    close(layer.grads["bias"], tmod[0].bias.grad.numpy(), "grad bias")


def test_add_with_fused_relu_masks_the_gradient(variant):
    node = make_node("L", "add", ("input", "input"))
    layer = layer_class("add")(node, ((3, 4, 5), (3, 4, 5)), (3, 4, 5))
    layer.relu = True
    layer.setup(2)
    rng = np.random.default_rng(10)
    a, b = (rng.standard_normal((2, 3, 4, 5)).astype(np.float32) for _ in range(2))
    y = layer.forward(a, b, True).copy()
    close(y, np.maximum(a + b, 0))
    gy = rng.standard_normal((2, 3, 4, 5)).astype(np.float32)
    np.testing.assert_array_equal(layer.backward(gy), np.where(y > 0, gy, 0))


@pytest.mark.parametrize("sparsity", [0.0, 0.9])
def test_fused_relus_give_bit_identical_steps(sparsity):
    """Folding ReLUs into the batch norm / residual add before them changes no float."""
    spec = build("resnet8")
    nets = [Network.from_spec(spec, seed=1), Network.from_spec(spec, seed=1, fuse_relu=False)]
    assert "layer1.0.relu2" in nets[0].fused_relus and nets[1].fused_relus == []
    rng = np.random.default_rng(11)
    x = rng.standard_normal((4, *spec.input_shape)).astype(np.float32)
    y = rng.integers(0, spec.num_classes, 4)
    plan = (SparsityPlan.uniform(spec, sparsity, mode="swat", layers="swat", topk_period=1)
            if sparsity else None)
    outs = [net.loss_and_grads(x, y, plan) for net in nets]
    assert outs[0][0] == outs[1][0]
    for k, g in outs[0][1].items():
        assert np.array_equal(g, outs[1][1][k]), k
    assert np.array_equal(nets[0].predict(x), nets[1].predict(x))


@pytest.mark.parametrize("model,train,sparsity", [("resnet8", True, 0.9), ("resnet8", True, 0.0),
                                                  ("kws_cnn", False, 0.0), ("h4", True, 0.0)])
def test_shared_buffers_change_no_float(model, train, sparsity, monkeypatch):
    """The layers' outputs and input gradients are shared by liveness (a few buffers instead
    of one per layer, :meth:`Network._share_out_buffers`, :meth:`Network._share_grad_buffers`):
    the same losses and gradients, bit for bit, as with every layer's own buffers, over
    residual joins, a node read twice, flatten, fused ReLUs and dropout in eval (its identity
    backward copies into its own buffer)."""
    spec = _resnet_like_spec() if model == "h4" else build(model)
    rng = np.random.default_rng(5)
    plan = (SparsityPlan.uniform(spec, sparsity, mode="swat", layers="swat", topk_period=1)
            if sparsity else None)
    shared = Network.from_spec(spec, seed=3)
    shared.setup(4)
    monkeypatch.setattr(Network, "_share_grad_buffers", lambda self: 0)
    monkeypatch.setattr(Network, "_share_out_buffers", lambda self: 0)
    own = Network.from_spec(spec, seed=3)
    own.setup(4)
    n_grads, n_outs = len(shared._grad_spans()), len(shared._out_spans())
    assert 1 < shared.grad_slots < n_grads and 1 < shared.out_slots < n_outs
    assert shared.memory_bytes() < own.memory_bytes()
    for net in (shared, own):
        net.train() if train else net.eval()
    for _ in range(2):  # the second step: SWAT's windowed selects, buffers reused
        x = rng.standard_normal((4, *spec.input_shape)).astype(np.float32)
        y = rng.integers(0, spec.num_classes, 4)
        (la, ga), (lb, gb) = (net.loss_and_grads(x, y, plan) for net in (shared, own))
        assert la == lb
        for k, g in ga.items():
            assert np.array_equal(g, gb[k]), k


@pytest.mark.parametrize("model", ["resnet8", "kws_cnn", "mobilenet_v2_cifar", "h4"])
@pytest.mark.parametrize("train", [True, False])
def test_outputs_the_forward_frees_are_not_read_by_the_backward(model, train, monkeypatch):
    """What the output-buffer plan relies on (each layer's ``keeps_input``/``keeps_output``):
    once the forward is done, every output :meth:`Network._out_spans` calls free can be
    overwritten (here with NaN) and the backward gives the same gradients bit for bit."""
    spec = _resnet_like_spec() if model == "h4" else build(model)
    monkeypatch.setattr(Network, "_share_out_buffers", lambda self: 0)  # own buffers
    rng = np.random.default_rng(6)
    x = rng.standard_normal((2, *spec.input_shape)).astype(np.float32)
    y = rng.integers(0, spec.num_classes, 2)
    grads = []
    for poison in (False, True):
        net = Network.from_spec(spec, seed=4)
        net.setup(2)
        net.train() if train else net.eval()
        logits = net.forward(x, train)
        free = net._out_spans()
        assert free and len(free) < len(net.nodes)
        if poison:
            for name in free:
                net.layers[name]._y.fill(np.nan)
        g = net._glogits[:2]
        softmax_xent(logits, y, g)
        net.backward(g)
        grads.append({k: v.copy() for k, v in net.grads.items()})
    for k, v in grads[0].items():
        assert np.array_equal(v, grads[1][k]), k


@pytest.mark.parametrize("model,bad", [("resnet8", "layer2.0.bn2"), ("kws_cnn", "conv2")])
def test_first_nonfinite_reruns_the_forward_and_puts_state_back(model, bad):
    """With outputs in shared buffers the last forward's outputs are mostly overwritten: the
    first non-finite layer is found by running the batch again (batch-norm statistics and
    dropout streams left as they were)."""
    spec = build(model)
    net = Network.from_spec(spec, seed=0)
    net.setup(2)
    assert bad in net._out_spans()
    net.layers[bad].params["weight"][1] = np.inf
    x = np.random.default_rng(0).standard_normal((2, *spec.input_shape)).astype(np.float32)
    loss = net.step_loss(x, np.array([1, 2]))
    assert not np.isfinite(loss)
    before = {k: v.copy() for k, v in net.state_dict().items()}
    streams = [layer.rng.bit_generator.state for layer in net.layers.values()
               if hasattr(layer, "rng")]
    assert net.first_nonfinite() == bad
    for k, v in net.state_dict().items():
        assert np.array_equal(v, before[k], equal_nan=True), k
    assert streams == [layer.rng.bit_generator.state for layer in net.layers.values()
                       if hasattr(layer, "rng")]


@pytest.mark.parametrize("model", ["resnet8", "kws_cnn", "mobilenet_v2_cifar", "h4"])
@pytest.mark.parametrize("train", [True, False])
def test_layers_return_their_own_gradient_buffer_unless_they_pass_it(model, train):
    """What the gradient-buffer plan relies on: every layer's backward returns a view of its
    own ``_gx`` (in any mode: dropout's eval identity included), or, when it declares
    ``passes_grad``, the very gradient it was given."""
    spec = _resnet_like_spec() if model == "h4" else build(model)
    net = Network.from_spec(spec, seed=0)
    net.setup(2)
    net.train() if train else net.eval()
    x = np.random.default_rng(0).standard_normal((2, *spec.input_shape)).astype(np.float32)
    net.forward(x, train)
    for node in reversed(net.nodes):
        layer = net.layers[node.name]
        gy = np.ones((2, *spec.shapes[node.name]), np.float32)
        gx = layer.backward(gy, need_input_grad=True)
        if gx is None:
            continue
        if layer.passes_grad:
            assert np.shares_memory(gx, gy), node.name
        else:
            assert np.shares_memory(gx, layer._gx) and not np.shares_memory(gx, gy), node.name


def test_dropout_scales_kept_units_and_is_identity_in_eval(variant):
    layer, _, _ = _one_layer("dropout", (4, 5, 6), p=0.25)
    layer.setup(3)
    rng = np.random.default_rng(9)
    x = rng.standard_normal((3, 4, 5, 6)).astype(np.float32)
    y = layer.forward(x, True).copy()
    keep = layer.keep_mask()
    assert 0.6 < keep.mean() < 0.9
    # torch reference with the same keep mask
    xt = torch.tensor(x, requires_grad=True)
    yt = xt * torch.tensor(keep) / 0.75
    close(y, yt.detach().numpy())
    gy = rng.standard_normal(y.shape).astype(np.float32)
    (yt * torch.tensor(gy)).sum().backward()
    close(layer.backward(gy), xt.grad.numpy())
    # deterministic for a seed, different for another
    layer.reseed(5)
    m1 = (layer.forward(x, True).copy(), layer.keep_mask())
    layer.reseed(5)
    m2 = (layer.forward(x, True).copy(), layer.keep_mask())
    assert np.array_equal(m1[0], m2[0]) and np.array_equal(m1[1], m2[1])
    assert layer.forward(x, False) is x


def test_softmax_xent_matches_torch():
    rng = np.random.default_rng(10)
    for scale in (1.0, 40.0):  # large logits: must not overflow
        logits = (rng.standard_normal((5, 7)) * scale).astype(np.float32)
        y = rng.integers(0, 7, 5)
        g = np.empty_like(logits)
        loss = softmax_xent(logits, y, g)
        lt = torch.tensor(logits, requires_grad=True)
        ref = torch.nn.functional.cross_entropy(lt, torch.tensor(y))
        ref.backward()
        assert abs(loss - ref.item()) <= 1e-5 * max(1.0, abs(ref.item()))
        close(g, lt.grad.numpy())
        tot, correct = xent_and_correct(logits, y)
        assert abs(tot / 5 - loss) < 1e-9
        assert correct == int((logits.argmax(1) == y).sum())


# ----------------------------------------------------------------------------- networks
def _resnet_like_spec():
    """A small DAG of H4 layers only, with fan-out (a node read by two consumers)."""
    nodes = [
        make_node("bn1", "batchnorm2d", "input"),
        make_node("relu1", "relu", "bn1"),
        make_node("pool1", "maxpool2d", "relu1", kernel=3, stride=2, padding=1),
        make_node("gn", "groupnorm", "pool1", num_groups=2),
        make_node("ap", "avgpool2d", "gn", kernel=3, stride=1, padding=1),
        make_node("add", "add", ("ap", "pool1")),     # pool1 fans out to gn and add
        make_node("bn2", "batchnorm2d", "add"),
        make_node("add2", "add", ("bn2", "bn2")),     # one node read twice by one consumer
        make_node("gap", "global_avgpool", "add2"),
    ]
    return ModelSpec("h4net", (4, 9, 7), nodes)


def _random_state(net, rng):
    sd = {}
    for k, v in net.state_dict().items():
        if k.endswith("num_batches_tracked"):
            sd[k] = v
        elif k.endswith("running_var"):
            sd[k] = rng.uniform(0.5, 2.0, v.shape).astype(np.float32)
        elif v.ndim > 1:  # conv/linear weights: torch's init scale, U(-1/sqrt(fan_in), ...)
            bound = 1.0 / np.sqrt(np.prod(v.shape[1:]))
            sd[k] = rng.uniform(-bound, bound, v.shape).astype(np.float32)
        else:
            sd[k] = rng.standard_normal(v.shape).astype(np.float32)
    return sd


def _compare_net(spec, x, y, rng, train=True, plan=None):
    net = Network.from_spec(spec, seed=0)
    sd = _random_state(net, rng)
    net.load_state_dict(sd)
    twin = to_torch(spec)
    twin.load_state_dict({k: torch.tensor(v) for k, v in sd.items()})
    twin.train(train)
    net.train() if train else net.eval()
    loss, grads = net.loss_and_grads(x, y, plan=plan)
    lt = twin.loss(twin(torch.tensor(x)), torch.tensor(y))
    lt.backward()
    assert abs(loss - lt.item()) <= 1e-4 * abs(lt.item()) + 1e-5
    named = dict(twin.named_parameters())
    assert set(grads) == set(named)
    for k, p in named.items():
        close(grads[k], p.grad.numpy(), k)
    ours = net.state_dict()
    for k, v in twin.state_dict().items():
        close(ours[k], v.numpy(), k)
    return net


@pytest.mark.parametrize("train", [True, False])
def test_h4_dag_with_fanout_matches_torch(train, variant):
    rng = np.random.default_rng(11)
    spec = _resnet_like_spec()
    x = rng.standard_normal((3, 4, 9, 7)).astype(np.float32)
    y = rng.integers(0, 4, 3)
    _compare_net(spec, x, y, rng, train)


def test_loss_and_grads_can_leave_running_stats_alone():
    spec = _resnet_like_spec()
    net = Network.from_spec(spec)
    rng = np.random.default_rng(17)
    x = rng.standard_normal((3, 4, 9, 7)).astype(np.float32)
    y = rng.integers(0, 4, 3)
    before = net.state_dict()
    l1, g1 = net.loss_and_grads(x, y, update_stats=False)
    after = net.state_dict()
    assert all(np.array_equal(before[k], after[k]) for k in before)
    l2, g2 = net.loss_and_grads(x, y)  # same batch statistics, so the same loss and grads
    assert l1 == l2 and all(np.array_equal(g1[k], g2[k]) for k in g1)
    assert int(net.state_dict()["bn1.num_batches_tracked"]) == 1
    assert not np.array_equal(net.state_dict()["bn1.running_mean"], before["bn1.running_mean"])


def test_state_dict_names_shapes_and_errors():
    spec = _resnet_like_spec()
    net = Network.from_spec(spec)
    sd = net.state_dict()
    assert list(sd) == list(spec.state_shapes())
    assert all(sd[k].shape == s for k, s in spec.state_shapes().items())
    assert sd["bn1.num_batches_tracked"].dtype == np.int64 and sd["bn1.weight"].dtype == np.float32
    sd["bn1.weight"][:] = 7  # a copy: the network is unchanged
    assert net.state_dict()["bn1.weight"][0] == 1.0
    bad = dict(sd)
    bad.pop("gn.bias")
    bad["nope.weight"] = np.zeros(3)
    with pytest.raises(KeyError, match="missing keys \\['gn.bias'\\].*unexpected keys \\['nope.weight'\\]"):
        net.load_state_dict(bad)
    bad = dict(sd)
    bad["gn.bias"] = np.zeros(5, np.float32)
    with pytest.raises(ValueError, match="'gn.bias' has shape \\(5,\\), expected \\(4,\\)"):
        net.load_state_dict(bad)
    bad = dict(sd)
    bad["bn1.num_batches_tracked"] = np.array(1.5)
    with pytest.raises(TypeError, match="integer counter"):
        net.load_state_dict(bad)


def test_bad_batches_and_labels_are_named():
    net = Network.from_spec(_resnet_like_spec())
    x = np.zeros((2, 4, 9, 7), np.float32)
    with pytest.raises(ValueError, match=r"expected float32 NCHW shape \(N, 4, 9, 7\).*got shape \(2, 4, 7, 9\)"):
        net.loss_and_grads(np.zeros((2, 4, 7, 9), np.float32), np.zeros(2, np.int64))
    with pytest.raises(TypeError, match="float32 values, got dtype int32"):
        net.predict(x.astype(np.int32))
    with pytest.raises(ValueError, match=r"label 4 out of range \[0, 4\)"):
        net.loss_and_grads(x, np.array([0, 4]))
    with pytest.raises(TypeError, match="integer class labels"):
        net.loss_and_grads(x, np.array([0.0, 1.0]))
    with pytest.raises(ValueError, match=r"expected shape \(2,\)"):
        net.loss_and_grads(x, np.array([0, 1, 2]))
    # float64 is accepted by converting once
    l64, _ = net.loss_and_grads(x.astype(np.float64) + 0.5, np.array([0, 1]))
    l32, _ = net.loss_and_grads(x + 0.5, np.array([0, 1]))
    assert l64 == l32


def test_plan_naming_unknown_layer_is_rejected():
    spec = build("mlp", hidden=(8,), input_shape=(1, 4, 4))
    plan = SparsityPlan("swat", {"fc9": __import__("hwmodel").LayerSparsity(0.5, 0.5)})
    pytest.importorskip("embedded.layers.linear")
    net = Network.from_spec(spec)
    with pytest.raises(PlanError, match="'fc9'"):
        net.set_plan(plan)


# ----------------------------------------------------------------------------- with H5's layers
def _need_conv_linear():
    pytest.importorskip("embedded.layers.conv")
    pytest.importorskip("embedded.layers.linear")


@pytest.mark.parametrize("name,shape,classes", [("femnist_cnn", (1, 28, 28), 62),
                                                 ("resnet8", (3, 32, 32), 10)])
def test_whole_network_dense_matches_torch(name, shape, classes):
    _need_conv_linear()
    rng = np.random.default_rng(12)
    spec = build(name)
    x = rng.standard_normal((3, *shape)).astype(np.float32)
    y = rng.integers(0, classes, 3)
    _compare_net(spec, x, y, rng, train=True)


# ----------------------------------------------------------------------------- sparse modes
def _kth_keep(a: np.ndarray, density: float) -> np.ndarray:
    """Exact top-K of |a| by numpy (K = round(density * size), at least 1); exact zeros are
    never kept (they contribute nothing)."""
    flat = np.abs(a).reshape(-1)
    k = max(1, min(flat.size, int(np.floor(density * flat.size + 0.5))))
    t = np.partition(flat, flat.size - k)[flat.size - k]
    return (np.abs(a) >= t) & (a != 0)


def _swat_twin(twin, spec, plan):
    """Patch the twin's sparse conv/linear modules with SWAT's forward/backward:
    y = layer(x, W_s) with dense x; grad_x through W_s; grad_W (dense) from the top-K input."""
    F = torch.nn.functional
    for name, ls in plan.layers.items():
        mod = twin.get_submodule(name)

        def fwd(x, mod=mod, ls=ls):
            w = mod.weight
            ws = w.detach() * torch.tensor(_kth_keep(w.detach().numpy(), ls.weight_density))
            xs = x.detach() * torch.tensor(_kth_keep(x.detach().numpy(), ls.act_density))
            if isinstance(mod, torch.nn.Conv2d):
                def op(a, b):
                    return F.conv2d(a, b, None, mod.stride, mod.padding, 1, mod.groups)
            else:
                def op(a, b):
                    return F.linear(a, b)
            y = op(x, ws) + (op(xs, w) - op(xs, w).detach())
            return y if mod.bias is None else y + mod.bias.view(1, -1, *([1] * (y.dim() - 2)))

        mod.forward = fwd


def _masked_twin(twin, masks):
    """Forward with W⊙M; the effective weights are kept (retain_grad) so the test can read
    the dense gradient w.r.t. W⊙M, which FedDST regrows by."""
    F = torch.nn.functional
    effective = {}
    for name, m in masks.items():
        mod = twin.get_submodule(name)
        mt = torch.tensor(m.astype(np.float32))

        def fwd(x, mod=mod, mt=mt, name=name):
            we = mod.weight * mt
            we.retain_grad()
            effective[name] = we
            if isinstance(mod, torch.nn.Conv2d):
                return F.conv2d(x, we, mod.bias, mod.stride, mod.padding, 1, mod.groups)
            return F.linear(x, we, mod.bias)

        mod.forward = fwd
    return effective


@pytest.mark.parametrize("name,shape,classes", [("femnist_cnn", (1, 28, 28), 62),
                                                 ("resnet8", (3, 32, 32), 10)])
def test_whole_network_swat_matches_torch_topk_reference(name, shape, classes):
    _need_conv_linear()
    rng = np.random.default_rng(13)
    spec = build(name)
    plan = SparsityPlan.uniform(spec, 0.7, mode="swat", act_sparsity=0.5)
    assert plan.layers
    net = Network.from_spec(spec, seed=1)
    sd = _random_state(net, rng)
    net.load_state_dict(sd)
    twin = to_torch(spec)
    twin.load_state_dict({k: torch.tensor(v) for k, v in sd.items()})
    _swat_twin(twin, spec, plan)
    x = rng.standard_normal((2, *shape)).astype(np.float32)
    y = rng.integers(0, classes, 2)
    loss, grads = net.loss_and_grads(x, y, plan=plan)
    lt = twin.loss(twin(torch.tensor(x)), torch.tensor(y))
    lt.backward()
    assert abs(loss - lt.item()) <= 1e-4 * abs(lt.item()) + 1e-5
    for k, p in twin.named_parameters():
        close(grads[k], p.grad.numpy(), k)
    for layer, ls in plan.layers.items():
        w = sd[f"{layer}.weight"]
        assert net.layers[layer].measured_density == pytest.approx(
            round(ls.weight_density * w.size) / w.size, abs=1e-9)


@pytest.mark.parametrize("name,shape,classes", [("femnist_cnn", (1, 28, 28), 62),
                                                 ("resnet8", (3, 32, 32), 10)])
def test_whole_network_masked_matches_torch(name, shape, classes):
    _need_conv_linear()
    rng = np.random.default_rng(14)
    spec = build(name)
    plan = SparsityPlan.uniform(spec, 0.8, mode="masked", layers="all")
    net = Network.from_spec(spec, seed=2)
    sd = _random_state(net, rng)
    masks = {n: rng.random(sd[f"{n}.weight"].shape) < 0.3 for n in plan.layers}
    net.load_state_dict(sd)
    net.set_plan(plan)
    net.set_masks(masks)
    got = net.get_masks()
    assert set(got) == set(masks) and all(np.array_equal(got[k], masks[k]) for k in masks)
    for n in masks:  # weights outside the mask are zeroed by set_masks
        assert not net.state_dict()[f"{n}.weight"][~masks[n]].any()
        net.layers[n].want_dense_grad = True
    twin = to_torch(spec)
    twin.load_state_dict({k: torch.tensor(v) for k, v in sd.items()})
    effective = _masked_twin(twin, masks)
    x = rng.standard_normal((2, *shape)).astype(np.float32)
    y = rng.integers(0, classes, 2)
    loss, grads = net.loss_and_grads(x, y)
    lt = twin.loss(twin(torch.tensor(x)), torch.tensor(y))
    lt.backward()
    assert abs(loss - lt.item()) <= 1e-4 * abs(lt.item()) + 1e-5
    for k, p in twin.named_parameters():
        close(grads[k], p.grad.numpy(), k)  # torch's grad of W through W*M is masked
    for n in masks:
        assert not grads[f"{n}.weight"][~masks[n]].any()
        close(net.layers[n].dense_grad, effective[n].grad.numpy(), f"{n} dense grad")


def test_serial_and_parallel_kernels_are_bitwise_equal(monkeypatch):
    """Each output element is computed by one thread in a fixed order, so the thread count
    (and the serial/parallel choice) cannot change a bit."""
    spec = _resnet_like_spec()
    rng = np.random.default_rng(15)
    x = (rng.standard_normal((5, 4, 9, 7)) * 3).astype(np.float32)
    y = rng.integers(0, 4, 5)
    out = []
    for par_min in (1 << 62, 0):
        monkeypatch.setattr(ew, "PAR_MIN", par_min)
        net = Network.from_spec(spec, seed=0)
        net.load_state_dict(_random_state(net, np.random.default_rng(0)))
        loss, grads = net.loss_and_grads(x, y)
        out.append((loss, grads, net.state_dict()))
    assert out[0][0] == out[1][0]
    for k in out[0][1]:
        assert np.array_equal(out[0][1][k], out[1][1][k]), k
    for k in out[0][2]:
        assert np.array_equal(out[0][2][k], out[1][2][k]), k


def test_maxpool_2x2_fast_path_matches_torch_on_nan_ties_and_odd_sizes():
    """The unrolled 2x2/stride-2 pool (serial and parallel) picks torch's value and index:
    NaN wins, the first maximum wins a tie, an odd last row/column is dropped."""
    import embedded.layers.pool as P

    x = np.random.default_rng(0).standard_normal((3, 4, 9, 7)).astype(np.float32)
    x[0, 0, 0, 1] = np.nan
    x[1, 1, 2:4, 2:4] = 1.5
    x[2, 2, 4, 4] = np.nan
    x[2, 2, 5, 5] = np.nan
    yt, it = torch.nn.functional.max_pool2d(torch.from_numpy(x), 2, 2, return_indices=True)
    for kern in P.MAXPOOL_FWD:
        y = np.zeros((3, 4, 4, 3), np.float32)
        idx = np.zeros(y.shape, np.int32)
        kern(x, 2, 2, 2, 2, 0, 0, y, idx)
        assert np.array_equal(y, yt.numpy(), equal_nan=True)
        assert np.array_equal(idx, it.numpy())
