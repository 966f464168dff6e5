"""Named model builders: ``hwmodel.build(name, **options) -> ModelSpec``.

Each builder is pinned by its forward MACs (conv + linear) and parameter count in the tests.
Node names follow the torch modules these models are usually written as (kuangliu's CIFAR
ResNet/MobileNetV2, the LEAF CNN), so a checkpoint's keys map one to one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .spec import INPUT, ModelSpec, Node, SpecError, make_node


class _Graph:
    """Tiny helper that appends nodes and remembers the last output."""

    def __init__(self) -> None:
        self.nodes: list[Node] = []
        self.last = INPUT

    def add(self, name: str, op: str, inputs: Any = None, **attrs: Any) -> str:
        self.nodes.append(make_node(name, op, inputs if inputs is not None else self.last, **attrs))
        self.last = name
        return name

    def conv_bn_relu(self, prefix: str, idx: str, cout: int, k: int, stride: int = 1,
                     groups: int = 1, relu: bool = True, pad: int | None = None) -> str:
        self.add(f"{prefix}conv{idx}", "conv2d", out_channels=cout, kernel=k, stride=stride,
                 padding=k // 2 if pad is None else pad, groups=groups, bias=False)
        self.add(f"{prefix}bn{idx}", "batchnorm2d")
        if relu:
            self.add(f"{prefix}relu{idx}", "relu")
        return self.last


def femnist_cnn(num_classes: int = 62, input_shape: tuple[int, ...] = (1, 28, 28)) -> ModelSpec:
    """The LEAF FEMNIST CNN: conv5x5 32 'same' → pool2 → conv5x5 64 'same' → pool2 → fc 2048."""
    g = _Graph()
    g.add("conv1", "conv2d", out_channels=32, kernel=5, padding=2)
    g.add("relu1", "relu")
    g.add("pool1", "maxpool2d", kernel=2)
    g.add("conv2", "conv2d", out_channels=64, kernel=5, padding=2)
    g.add("relu2", "relu")
    g.add("pool2", "maxpool2d", kernel=2)
    g.add("flatten", "flatten")
    g.add("fc1", "linear", out_features=2048)
    g.add("relu3", "relu")
    g.add("fc2", "linear", out_features=num_classes)
    return ModelSpec("femnist_cnn", input_shape, g.nodes)


def lenet5(num_classes: int = 10, input_shape: tuple[int, ...] = (1, 28, 28)) -> ModelSpec:
    """Classic LeNet-5 (max-pool variant) on 28×28 with padding 2 on conv1."""
    g = _Graph()
    g.add("conv1", "conv2d", out_channels=6, kernel=5, padding=2)
    g.add("relu1", "relu")
    g.add("pool1", "maxpool2d", kernel=2)
    g.add("conv2", "conv2d", out_channels=16, kernel=5)
    g.add("relu2", "relu")
    g.add("pool2", "maxpool2d", kernel=2)
    g.add("flatten", "flatten")
    g.add("fc1", "linear", out_features=120)
    g.add("relu3", "relu")
    g.add("fc2", "linear", out_features=84)
    g.add("relu4", "relu")
    g.add("fc3", "linear", out_features=num_classes)
    return ModelSpec("lenet5", input_shape, g.nodes)


def mlp(num_classes: int = 10, input_shape: tuple[int, ...] = (1, 28, 28),
        hidden: tuple[int, ...] = (200, 200)) -> ModelSpec:
    """The "2NN" of the FedAvg paper: 784-200-200-10 (input flattened first)."""
    g = _Graph()
    g.add("flatten", "flatten")
    for i, h in enumerate(hidden, start=1):
        g.add(f"fc{i}", "linear", out_features=h)
        g.add(f"relu{i}", "relu")
    g.add(f"fc{len(hidden) + 1}", "linear", out_features=num_classes)
    return ModelSpec("mlp", input_shape, g.nodes)


def _basic_block(g: _Graph, prefix: str, cin: int, cout: int, stride: int) -> None:
    """kuangliu's BasicBlock: conv-bn-relu-conv-bn (+ shortcut) then relu."""
    block_in = g.last
    g.conv_bn_relu(prefix, "1", cout, 3, stride)
    g.conv_bn_relu(prefix, "2", cout, 3, 1, relu=False)
    main = g.last
    shortcut = block_in
    if stride != 1 or cin != cout:
        g.add(f"{prefix}shortcut.0", "conv2d", block_in, out_channels=cout, kernel=1,
              stride=stride, bias=False)
        shortcut = g.add(f"{prefix}shortcut.1", "batchnorm2d")
    g.add(f"{prefix}add", "add", (main, shortcut))
    g.add(f"{prefix}relu2", "relu")


def _cifar_resnet(name: str, widths: tuple[int, ...], blocks: tuple[int, ...],
                  num_classes: int, input_shape: tuple[int, ...]) -> ModelSpec:
    g = _Graph()
    g.conv_bn_relu("", "1", widths[0], 3)
    cin = widths[0]
    for stage, (w, nb) in enumerate(zip(widths, blocks, strict=True), start=1):
        for b in range(nb):
            stride = 2 if (stage > 1 and b == 0) else 1
            _basic_block(g, f"layer{stage}.{b}.", cin, w, stride)
            cin = w
    g.add("avgpool", "global_avgpool")
    g.add("linear", "linear", out_features=num_classes)
    return ModelSpec(name, input_shape, g.nodes)


def resnet8(num_classes: int = 10, input_shape: tuple[int, ...] = (3, 32, 32)) -> ModelSpec:
    """CIFAR ResNet-8: 16/32/64 channels, one basic block per stage."""
    return _cifar_resnet("resnet8", (16, 32, 64), (1, 1, 1), num_classes, input_shape)


def resnet18_cifar(num_classes: int = 10, input_shape: tuple[int, ...] = (3, 32, 32)) -> ModelSpec:
    """ResNet-18 for CIFAR (kuangliu): 3×3 stem, no max-pool, 64/128/256/512, [2, 2, 2, 2]."""
    return _cifar_resnet("resnet18_cifar", (64, 128, 256, 512), (2, 2, 2, 2),
                         num_classes, input_shape)


_MBV2_CFG = [(1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2),
             (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]


def mobilenet_v2_cifar(num_classes: int = 10,
                       input_shape: tuple[int, ...] = (3, 32, 32)) -> ModelSpec:
    """MobileNetV2 with CIFAR strides (kuangliu): stride-1 stem and second stage."""
    g = _Graph()
    g.conv_bn_relu("", "1", 32, 3)
    cin, idx = 32, 0
    for expansion, cout, nb, first_stride in _MBV2_CFG:
        for b in range(nb):
            stride = first_stride if b == 0 else 1
            p = f"layers.{idx}."
            block_in = g.last
            planes = expansion * cin
            g.conv_bn_relu(p, "1", planes, 1, pad=0)
            g.conv_bn_relu(p, "2", planes, 3, stride, groups=planes)
            g.conv_bn_relu(p, "3", cout, 1, pad=0, relu=False)
            if stride == 1:
                main = g.last
                shortcut = block_in
                if cin != cout:
                    g.add(f"{p}shortcut.0", "conv2d", block_in, out_channels=cout, kernel=1,
                          bias=False)
                    shortcut = g.add(f"{p}shortcut.1", "batchnorm2d")
                g.add(f"{p}add", "add", (main, shortcut))
            cin, idx = cout, idx + 1
    g.conv_bn_relu("", "2", 1280, 1, pad=0)
    g.add("avgpool", "global_avgpool")
    g.add("linear", "linear", out_features=num_classes)
    return ModelSpec("mobilenet_v2_cifar", input_shape, g.nodes)


def kws_cnn(num_classes: int = 12, input_shape: tuple[int, ...] = (1, 40, 51)) -> ModelSpec:
    """cnn-trad-pool2 (Sainath & Parada 2015, as in Honk) on 40 MFCC × 51 frames.

    conv 64 @ 8×20 (freq × time) → relu → max-pool 2 → conv 64 @ 4×10 → relu → linear.
    Dropout sits where the reference puts it (no-op at inference).
    """
    g = _Graph()
    g.add("conv1", "conv2d", out_channels=64, kernel=(8, 20))
    g.add("relu1", "relu")
    g.add("dropout1", "dropout", p=0.5)
    g.add("pool1", "maxpool2d", kernel=2)
    g.add("conv2", "conv2d", out_channels=64, kernel=(4, 10))
    g.add("relu2", "relu")
    g.add("dropout2", "dropout", p=0.5)
    g.add("flatten", "flatten")
    g.add("output", "linear", out_features=num_classes)
    return ModelSpec("kws_cnn", input_shape, g.nodes)


BUILDERS: dict[str, Callable[..., ModelSpec]] = {
    "femnist_cnn": femnist_cnn,
    "lenet5": lenet5,
    "mlp": mlp,
    "resnet8": resnet8,
    "resnet18_cifar": resnet18_cifar,
    "mobilenet_v2_cifar": mobilenet_v2_cifar,
    "kws_cnn": kws_cnn,
}


def build(name: str, **options: Any) -> ModelSpec:
    """Build a named model; unknown names list the known ones."""
    if name not in BUILDERS:
        raise SpecError(f"unknown model {name!r}; known models: {', '.join(sorted(BUILDERS))}")
    try:
        return BUILDERS[name](**options)
    except TypeError as e:
        raise SpecError(f"model {name!r}: {e}") from None


def load_model(name_or_path: str) -> ModelSpec:
    """A builder name, or a path to a ModelSpec JSON file."""
    if name_or_path in BUILDERS:
        return build(name_or_path)
    if name_or_path.endswith(".json") or "/" in name_or_path:
        return ModelSpec.load(name_or_path)
    raise SpecError(
        f"unknown model {name_or_path!r}; known models: {', '.join(sorted(BUILDERS))} "
        "(or a path to a ModelSpec .json file)"
    )
