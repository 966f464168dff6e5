"""hwmodel.to_torch / from_torch: exact twins, fvcore MAC agreement, importing user modules."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")
nn = torch.nn
F = torch.nn.functional

import hwmodel  # noqa: E402
from hwmodel import BUILDERS, SpecError  # noqa: E402
from hwmodel.torch_twin import from_torch, to_torch  # noqa: E402


def spec_macs(spec, skip=lambda name: False) -> int:
    """Forward MACs of conv2d and linear nodes from the spec's shapes (bias not counted).

    conv: every output element (Cout·Ho·Wo) takes Cin/groups·kh·kw multiply-adds, which is
    prod(weight.shape[1:]); linear: out_features · in_features. Written independently of
    hwmodel.counts (another module) so both can be checked against fvcore.
    """
    total = 0
    for node in spec.nodes:
        if node.op in ("conv2d", "linear") and not skip(node.name):
            w = spec.param_shapes(node.name)[f"{node.name}.weight"]
            total += math.prod(spec.shapes[node.name]) * math.prod(w[1:])
    return total


def fvcore_macs(module, input_shape) -> int:
    from fvcore.nn import FlopCountAnalysis

    fca = FlopCountAnalysis(module.eval(), (torch.zeros(1, *input_shape),))
    fca.unsupported_ops_warnings(False)
    fca.uncalled_modules_warnings(False)
    ops = fca.by_operator()
    # fvcore counts one fused multiply-add as one "flop": these are MACs.
    return int(sum(v for k, v in ops.items() if k in ("conv", "linear", "addmm", "matmul")))


@pytest.fixture(scope="module")
def twins():
    torch.manual_seed(0)
    return {name: (b(), to_torch(b())) for name, b in BUILDERS.items()}


# ---------------------------------------------------------------------- twins
@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_twin_state_and_round_trip(twins, name):
    spec, twin = twins[name]
    got = [(k, tuple(v.shape)) for k, v in twin.state_dict().items()]
    assert got == list(spec.state_shapes().items())
    back = from_torch(twin, spec.input_shape)
    assert back == spec
    assert back.to_json() == spec.to_json()


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_twin_fx_trace_reproduces_node_names(twins, name):
    spec, twin = twins[name]
    from hwmodel.torch_twin import _classes

    # the default tracer would inline the twin's own Add/GlobalAvgPool modules

    own = (_classes()["Add"], _classes()["GlobalAvgPool"])

    class T(torch.fx.Tracer):
        def is_leaf_module(self, m, qn):
            return isinstance(m, own) or super().is_leaf_module(m, qn)

    graph = T().trace(twin)
    targets = [n.target for n in graph.nodes if n.op == "call_module"]
    assert targets == [n.name for n in spec.nodes]
    ops = {n.op for n in graph.nodes}
    assert ops == {"placeholder", "call_module", "output"}


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_fvcore_macs_equal_spec_macs(twins, name):
    spec, twin = twins[name]
    ours = spec_macs(spec)
    theirs = fvcore_macs(twin, spec.input_shape)
    assert abs(theirs - ours) <= 0.005 * ours, (name, ours, theirs)


def test_pinned_absolute_counts():
    """The numbers issue 2 pins (derived there by hand)."""
    s = hwmodel.build("femnist_cnn")
    assert spec_macs(s) == 17_211_904 and s.num_params() == 6_603_710
    s = hwmodel.build("lenet5")
    assert round(spec_macs(s) / 1e3, 1) == 416.5 and round(s.num_params() / 1e3, 1) == 61.7
    s = hwmodel.build("resnet8")
    assert round(spec_macs(s) / 1e6, 1) == 12.5 and round(s.num_params() / 1e3) == 78
    s = hwmodel.build("resnet18_cifar")
    assert round(spec_macs(s) / 1e6, 1) == 555.4 and round(s.num_params() / 1e6, 2) == 11.17


def test_mobilenet_v2_counts_and_the_shortcut_discrepancy(twins):
    """Issue 2 says "about 88 M MACs, 2.24 M params" for mobilenet_v2_cifar.

    That hand count (shared/PROFILE_SOURCES.md) leaves out the four 1x1 shortcut projections
    kuangliu's MobileNetV2 has in stride-1 blocks whose channels change (layers.0, .1, .10, .16):
    58,240 weights and 2.13 M MACs. Our builder is faithful to kuangliu, so it has 91.15 M MACs and
    2.297 M params; fvcore on the twin agrees with that. Without the shortcut convs the params are
    the issue's 2.24 M, and the MACs 89.0 M (the issue's "about 88 M" is within 1.5 %).
    """
    spec, twin = twins["mobilenet_v2_cifar"]
    ours = spec_macs(spec)
    assert ours == fvcore_macs(twin, spec.input_shape)
    assert round(ours / 1e6, 2) == 91.15
    assert round(spec.num_params() / 1e6, 3) == 2.297

    def is_sc(name: str) -> bool:
        return ".shortcut.0" in name

    sc = [n.name for n in spec.nodes if n.op == "conv2d" and is_sc(n.name)]
    assert sc == [f"layers.{i}.shortcut.0" for i in (0, 1, 10, 16)]
    sc_params = sum(math.prod(spec.param_shapes(n)[f"{n}.weight"]) for n in sc)
    # 32·16 + 16·24 + 64·96 + 160·320 weights of 1x1 convs
    assert sc_params == 32 * 16 + 16 * 24 + 64 * 96 + 160 * 320 == 58_240
    assert round((spec.num_params() - sc_params) / 1e6, 2) == 2.24
    assert abs(spec_macs(spec, skip=is_sc) - 88e6) / 88e6 < 0.015


def test_twin_loss_is_mean_cross_entropy(twins):
    spec, twin = twins["lenet5"]
    logits = torch.randn(5, 10)
    y = torch.tensor([0, 3, 9, 1, 1])
    want = -torch.log_softmax(logits, 1)[torch.arange(5), y].mean()
    assert torch.allclose(twin.loss(logits, y), want)


# ---------------------------------------------------------------------- importing user modules
class BasicBlock(nn.Module):
    """kuangliu/pytorch-cifar's BasicBlock, verbatim in structure."""

    expansion = 1

    def __init__(self, in_planes, planes, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += self.shortcut(x)
        out = F.relu(out)
        return out


class TinyKuangliuResNet(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.layer1 = nn.Sequential(BasicBlock(8, 8, 1))
        self.layer2 = nn.Sequential(BasicBlock(8, 16, 2))
        self.linear = nn.Linear(16, num_classes)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer1(out)
        out = self.layer2(out)
        out = F.avg_pool2d(out, 4)
        out = out.view(out.size(0), -1)
        return self.linear(out)


def _randomise_bn(module):
    g = torch.Generator().manual_seed(1)
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)


def _assert_same_function(user, spec, batch=3):
    """The spec's twin, loaded with the user's weights, computes what the user's module does."""
    twin = to_torch(spec)
    twin.load_state_dict(user.state_dict(), strict=True)
    x = torch.randn(batch, *spec.input_shape, generator=torch.Generator().manual_seed(2))
    user.eval()
    twin.eval()
    with torch.no_grad():
        torch.testing.assert_close(twin(x), user(x), rtol=1e-5, atol=1e-6)
    # training mode (batch statistics) and gradients too
    user.train()
    twin.train()
    y = torch.arange(batch) % spec.num_classes
    torch.manual_seed(3)  # the same dropout masks on both sides
    F.cross_entropy(user(x), y).backward()
    torch.manual_seed(3)
    twin.loss(twin(x), y).backward()
    ug = dict(user.named_parameters())
    for k, p in twin.named_parameters():
        torch.testing.assert_close(p.grad, ug[k].grad, rtol=1e-4, atol=1e-6)


def test_import_kuangliu_basicblock_resnet():
    torch.manual_seed(0)
    user = TinyKuangliuResNet()
    _randomise_bn(user)
    spec = from_torch(user, (3, 8, 8))
    assert spec.name == "TinyKuangliuResNet"
    assert set(spec.state_shapes()) == set(user.state_dict())
    names = [n.name for n in spec.nodes]
    for want in ("conv1", "bn1", "layer1.0.conv1", "layer2.0.shortcut.0", "layer2.0.shortcut.1",
                 "linear"):
        assert want in names
    adds = [n for n in spec.nodes if n.op == "add"]
    assert [n.name for n in adds] == ["layer1.0.add", "layer2.0.add"]
    # identity shortcut: the add reads the block input (the stem's relu) directly
    assert adds[0].inputs == ("layer1.0.bn2", "relu")
    assert adds[1].inputs == ("layer2.0.bn2", "layer2.0.shortcut.1")
    assert [n.op for n in spec.nodes[-3:]] == ["avgpool2d", "flatten", "linear"]
    _assert_same_function(user, spec)


class Mixed(nn.Module):
    """Every other supported form: depthwise conv, bias off, GroupNorm, module pools,
    AdaptiveAvgPool2d(1) + torch.flatten, mean over H,W, torch.add, Dropout, shared nn.ReLU."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(2, 6, (3, 5), stride=(1, 2), padding=(1, 2))
        self.relu = nn.ReLU(inplace=True)
        self.dw = nn.Conv2d(6, 6, 3, padding="same", groups=6, bias=False)
        self.gn = nn.GroupNorm(3, 6)
        self.pool = nn.MaxPool2d(2)
        self.apool = nn.AvgPool2d(3, stride=1, padding=1)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.drop = nn.Dropout(0.25)
        self.fc = nn.Linear(6, 4, bias=False)

    def forward(self, x):
        x = self.relu(self.stem(x))
        y = self.relu(self.gn(self.dw(x)))
        x = torch.add(x, y)
        x = self.apool(self.pool(x))
        a = torch.flatten(self.gap(x), 1)
        b = x.mean(dim=(2, 3))
        x = F.relu(a) + b
        return self.fc(self.drop(x))


def test_import_mixed_layers():
    torch.manual_seed(0)
    user = Mixed()
    spec = from_torch(user, (2, 9, 12))
    ops = [n.op for n in spec.nodes]
    assert ops == ["conv2d", "relu", "conv2d", "groupnorm", "relu", "add", "maxpool2d",
                   "avgpool2d", "global_avgpool", "flatten", "global_avgpool", "relu", "add",
                   "dropout", "linear"]
    assert spec["dw"].attrs["groups"] == 6 and spec["dw"].attrs["padding"] == (1, 1)
    assert spec["dw"].attrs["bias"] is False and spec["fc"].attrs["bias"] is False
    assert spec["stem"].attrs["kernel"] == (3, 5) and spec["stem"].attrs["stride"] == (1, 2)
    assert spec["drop"].attrs["p"] == 0.25
    relus = [n.name for n in spec.nodes if n.op == "relu"]
    assert relus[:2] == ["relu", "relu_1"]  # the shared nn.ReLU, called twice
    _assert_same_function(user, spec)


def test_import_sequential_and_flatten_forms():
    seq = nn.Sequential(nn.Flatten(), nn.Linear(12, 5), nn.ReLU(), nn.Linear(5, 3))
    with pytest.raises(SpecError, match="bare nn.Sequential"):  # '0.weight' is no node name
        from_torch(seq, (3, 2, 2))

    class Wrap(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = seq

        def forward(self, x):
            return self.net(x)

    user = Wrap()
    spec = from_torch(user, (3, 2, 2))
    assert [n.name for n in spec.nodes] == ["net.0", "net.1", "net.2", "net.3"]
    assert spec.input_shape == (3, 2, 2)
    _assert_same_function(user, spec)

    class View(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(12, 2)

        def forward(self, x):
            return self.fc(x.reshape(-1, 12))

    spec = from_torch(View(), (3, 2, 2))
    assert [n.op for n in spec.nodes] == ["flatten", "linear"]


# ---------------------------------------------------------------------- errors
class Wrapped(nn.Module):
    """``self.net = nn.Sequential(*layers)``: layer paths ``net.0``, ``net.1``, ..."""

    def __init__(self, *layers):
        super().__init__()
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


def test_unsupported_module_names_type_and_path():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Sigmoid())
            self.fc = nn.Linear(2 * 4 * 4, 2)

        def forward(self, x):
            return self.fc(torch.flatten(self.features(x), 1))

    with pytest.raises(SpecError, match=r"Sigmoid at 'features\.1'"):
        from_torch(Net(), (1, 6, 6))

    class Rnn(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = nn.Module()
            self.enc.rnn = nn.LSTM(4, 4)
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            out, _ = self.enc.rnn(x)
            return self.fc(out)

    with pytest.raises(SpecError, match=r"LSTM at 'enc\.rnn'"):
        from_torch(Rnn(), (4,))


def test_unsupported_function_and_method_named_with_path():
    class Act(nn.Module):
        def forward(self, x):
            return torch.sigmoid(x)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = nn.Sequential(nn.Linear(4, 4), Act())
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(self.block(x))

    with pytest.raises(SpecError, match=r"sigmoid at 'block\.1'"):
        from_torch(Net(), (4,))

    class Perm(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(x.permute(0, 1))

    with pytest.raises(SpecError, match=r"permute"):
        from_torch(Perm(), (4,))


def test_unsupported_attributes_are_rejected():
    with pytest.raises(SpecError, match="dilation"):
        from_torch(Wrapped(nn.Conv2d(1, 2, 3, dilation=2), nn.Flatten(),
                           nn.Linear(2 * 4 * 4, 2)), (1, 8, 8))
    with pytest.raises(SpecError, match="in_channels=3 but its input has 1"):
        from_torch(Wrapped(nn.Conv2d(3, 2, 3), nn.Flatten(), nn.Linear(2, 2)), (1, 3, 3))
    with pytest.raises(SpecError, match=r"flatten\(start_dim=0"):
        class All(nn.Module):
            def forward(self, x):
                return torch.flatten(x)

        from_torch(All(), (4,))


def test_unused_and_shared_weights_are_rejected():
    class Unused(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 2)
            self.aux = nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(x)

    with pytest.raises(SpecError, match=r"not used by forward.*aux\.weight"):
        from_torch(Unused(), (4,))

    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(self.fc(x))

    with pytest.raises(SpecError, match="called more than once"):
        from_torch(Shared(), (4,))


def test_absurd_sizes_rejected_without_allocating():
    # meta-device modules hold no storage; tracing is symbolic, so nothing of these sizes is ever
    # allocated: a real forward on the huge input below would need hundreds of GB.
    big = Wrapped(nn.Conv2d(3, 100_000, 3, device="meta"), nn.Flatten())
    with pytest.raises(SpecError, match="out_channels"):
        from_torch(big, (3, 32, 32))
    net = Wrapped(nn.Conv2d(3, 64, 3, padding=1, device="meta"), nn.Flatten())
    with pytest.raises(SpecError, match="input_shape|activations exceed"):
        from_torch(net, (3, 200_000, 200_000))
    with pytest.raises(SpecError, match="activations exceed"):
        from_torch(Wrapped(nn.Conv2d(3, 4096, 3, padding=1, device="meta"), nn.Flatten()),
                   (3, 512, 512))


def test_bad_arguments():
    with pytest.raises(SpecError, match="input_shape"):
        from_torch(nn.Linear(2, 2), (2, 2))
    with pytest.raises(SpecError, match="expected a torch.nn.Module"):
        from_torch("not a module", (2,))
    with pytest.raises(SpecError, match="expected a ModelSpec"):
        to_torch("resnet8")
