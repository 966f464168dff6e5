"""A ModelSpec's torch twin, and importing a user's ``torch.nn.Module`` into a ModelSpec.

* :func:`to_torch` builds an ``nn.Module`` whose ``state_dict`` keys are exactly
  ``spec.state_shapes()`` (``layer1.0.conv1.weight``). Every node, parameter-free ones included,
  is its own sub-module at the node's dotted path, so a ``torch.fx`` trace of the twin calls
  modules whose targets are the node names.
* :func:`from_torch` traces a module with ``torch.fx`` (symbolic: no tensor is created, so a
  module built on the ``meta`` device or an absurd input shape costs nothing) and maps its
  modules and functional calls onto the ModelSpec ops. Layers take their module's path as name,
  so weights map one to one; parameter-free functional calls (``F.relu``, ``+``) are named
  ``<enclosing module path>.<op>``. Anything else raises :class:`~hwmodel.spec.SpecError`
  naming the layer type and its path.

torch is imported lazily, inside the functions: ``hwmodel`` itself never needs it.
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Callable
from typing import Any

from .spec import (
    _NAME_RE,
    INPUT,
    ModelSpec,
    Node,
    Shape,
    SpecError,
    _infer_shape,
    make_node,
)

_CLASSES: dict[str, Any] = {}


def _classes() -> dict[str, Any]:
    """The twin's own module classes, created once per process (torch imported here)."""
    if _CLASSES:
        return _CLASSES
    import torch
    from torch import nn

    class Add(nn.Module):
        """The ``add`` node: element-wise sum of two inputs (a residual join)."""

        def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return a + b

    class GlobalAvgPool(nn.Module):
        """The ``global_avgpool`` node: mean over H and W, ``(N, C, H, W) -> (N, C)``."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.mean(dim=(2, 3))

    class SpecTwin(nn.Module):
        """The torch twin of a ModelSpec; runs the DAG in node order."""

        def __init__(self, spec: ModelSpec):
            super().__init__()
            self.spec_name = spec.name
            self.input_shape = tuple(spec.input_shape)
            self.output_name = spec.output
            # Plain list (not registered): the modules are registered at their node paths.
            plan = []
            last_use: dict[str, int] = {}
            for i, node in enumerate(spec.nodes):
                for src in node.inputs:
                    last_use[src] = i
            for i, node in enumerate(spec.nodes):
                mod = _make_module(node, spec.in_shapes[node.name])
                _attach(self, node.name, mod)
                free = tuple(s for s in dict.fromkeys(node.inputs) if last_use.get(s) == i)
                plan.append((node.name, node.inputs, mod, free))
            self._plan = plan

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            vals = {INPUT: x}
            for name, inputs, mod, free in self._plan:
                vals[name] = mod(*[vals[s] for s in inputs])
                for s in free:  # drop activations nobody reads any more
                    del vals[s]
            return vals[self.output_name]

        @staticmethod
        def loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            """The spec's loss: softmax cross-entropy, mean over the batch."""
            return torch.nn.functional.cross_entropy(logits, target)

    _CLASSES.update(Add=Add, GlobalAvgPool=GlobalAvgPool, SpecTwin=SpecTwin)
    return _CLASSES


def _make_module(node: Node, ins: tuple[Shape, ...]) -> Any:
    from torch import nn

    a = node.attrs
    op = node.op
    if op == "conv2d":
        return nn.Conv2d(ins[0][0], a["out_channels"], a["kernel"], stride=a["stride"],
                         padding=a["padding"], groups=a["groups"], bias=a["bias"])
    if op == "linear":
        return nn.Linear(ins[0][0], a["out_features"], bias=a["bias"])
    if op == "batchnorm2d":
        return nn.BatchNorm2d(ins[0][0], eps=a["eps"], momentum=a["momentum"])
    if op == "groupnorm":
        return nn.GroupNorm(a["num_groups"], ins[0][0], eps=a["eps"])
    if op == "relu":
        return nn.ReLU()
    if op == "maxpool2d":
        return nn.MaxPool2d(a["kernel"], stride=a["stride"], padding=a["padding"])
    if op == "avgpool2d":
        return nn.AvgPool2d(a["kernel"], stride=a["stride"], padding=a["padding"])
    if op == "global_avgpool":
        return _classes()["GlobalAvgPool"]()
    if op == "flatten":
        return nn.Flatten()
    if op == "add":
        return _classes()["Add"]()
    if op == "dropout":
        return nn.Dropout(a["p"])
    raise SpecError(f"node {node.name!r}: op {op!r} has no torch twin")  # pragma: no cover


def _attach(root: Any, path: str, mod: Any) -> None:
    """Register ``mod`` at dotted ``path``, creating plain container modules on the way."""
    from torch import nn

    parts = path.split(".")
    parent = root
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        child = parent._modules.get(part)
        if child is not None and not last:
            parent = child
            continue
        if child is not None:  # a container made earlier for a deeper node: adopt its children
            for k, v in child._modules.items():
                mod.add_module(k, v)
        elif hasattr(parent, part):
            raise SpecError(
                f"node {path!r}: segment {part!r} clashes with an attribute of torch.nn.Module; "
                "rename the node"
            )
        new = mod if last else nn.Module()
        parent._modules[part] = new
        parent = new


def to_torch(spec: ModelSpec) -> Any:
    """The exact torch twin of ``spec``: same DAG, parameter and buffer names, and shapes.

    The returned module has ``forward(x)`` (``x`` is ``(N, *spec.input_shape)``) returning the
    logits, and ``loss(logits, y)`` = mean softmax cross-entropy, the spec's loss.
    """
    if not isinstance(spec, ModelSpec):
        raise SpecError(f"to_torch: expected a ModelSpec, got {type(spec).__name__}")
    return _classes()["SpecTwin"](spec)


# ====================================================================== from_torch
_BASE_RE = re.compile(r"_\d+$")


def _bind(fn_name: str, args: tuple, kwargs: dict, names: tuple[str, ...],
          defaults: dict[str, Any], where: str) -> dict[str, Any]:
    """Bind positional and keyword arguments of a traced call to parameter names."""
    if len(args) > len(names):
        raise SpecError(f"{where}: {fn_name} called with too many arguments")
    out = dict(defaults)
    out.update(zip(names, args, strict=False))
    for k, v in kwargs.items():
        if k not in names:
            raise SpecError(f"{where}: {fn_name} got an unsupported argument {k!r}")
        out[k] = v
    missing = [n for n in names if n not in out]
    if missing:
        raise SpecError(f"{where}: {fn_name} is missing argument(s) {missing}")
    return out


class _Importer:
    """Walks an fx graph and emits ModelSpec nodes."""

    def __init__(self, root: Any, input_shape: Shape):
        import torch
        import torch.nn.functional as F  # noqa: N812
        from torch import nn

        self.torch, self.F, self.nn = torch, F, nn
        self.root = root
        self.input_shape = input_shape
        self.nodes: list[Node] = []
        self.shapes: dict[str, Shape] = {INPUT: input_shape}
        # fx value name -> ("tensor", spec name) | ("batch",) | ("shape", spec name) | ...
        self.val: dict[str, tuple] = {}
        # spec names whose torch tensor is (N, C, 1, 1) while the spec keeps (C,)
        self.squeezed: set[str] = set()
        self.used: set[str] = {INPUT}
        self.module_calls: dict[str, int] = {}
        self.reserved: set[str] = set()  # module paths, kept for the modules themselves

    # ---------------------------------------------------------------- helpers
    def where(self, n: Any) -> str:
        if n.op == "call_module":
            return f"{n.target!r}"
        stack = n.meta.get("nn_module_stack") or {}
        path = next(reversed(stack)) if stack else ""
        return f"{path!r}" if path else "the top-level forward"

    def fn_name(self, n: Any) -> str:
        """Spec name of a functional call: ``<module path>.<op>``, made unique."""
        stack = n.meta.get("nn_module_stack") or {}
        path = next(reversed(stack)) if stack else ""
        base = _BASE_RE.sub("", n.name) or "op"
        return self.unique(f"{path}.{base}" if path else base)

    def unique(self, cand: str) -> str:
        name, k = cand, 1
        while name in self.used or name in self.reserved:
            name = f"{cand}_{k}"
            k += 1
        return name

    def tensor(self, arg: Any, n: Any) -> str:
        """Spec name of a tensor argument, or an error."""
        from torch.fx import Node as FxNode

        if isinstance(arg, FxNode) and arg.name in self.val and self.val[arg.name][0] == "tensor":
            return self.val[arg.name][1]
        raise SpecError(
            f"{self.where(n)}: {self.describe(n)} takes {arg!r}, which is not a tensor of the "
            "network (constants and shape arithmetic are not supported here)"
        )

    def describe(self, n: Any) -> str:
        if n.op == "call_module":
            return type(self.root.get_submodule(n.target)).__name__
        if n.op == "call_method":
            return f"method .{n.target}()"
        t = n.target
        mod = getattr(t, "__module__", None) or ""
        return f"function {mod + '.' if mod else ''}{getattr(t, '__name__', repr(t))}"

    def emit(self, name: str, op: str, inputs: tuple[str, ...], fx_node: Any, **attrs: Any) -> str:
        if not _NAME_RE.match(name) or name == INPUT:
            raise SpecError(
                f"from_torch: {self.describe(fx_node)} at {name!r}: the module path is not a valid "
                "node name (a dotted identifier whose first part starts with a letter); a bare "
                "nn.Sequential names its layers '0', '1', ...: make it an attribute of a module"
            )
        node = make_node(name, op, inputs, **attrs)
        ins = tuple(self.shapes[s] for s in inputs)
        for s in inputs:
            if s in self.squeezed and op not in ("relu", "dropout", "add", "flatten"):
                raise SpecError(
                    f"{self.where(fx_node)}: {self.describe(fx_node)} reads the (N, C, 1, 1) output "
                    "of a global average pool; only flatten/linear/elementwise ops may follow it"
                )
        out = _infer_shape(node, ins)
        if any(v < 1 for v in out):
            raise SpecError(f"{self.where(fx_node)}: output shape {out} is empty for input {ins[0]}")
        self.nodes.append(node)
        self.shapes[name] = out
        self.used.add(name)
        self.val[fx_node.name] = ("tensor", name)
        if op in ("relu", "dropout", "add") and any(s in self.squeezed for s in inputs):
            self.squeezed.add(name)
        return name

    def alias(self, fx_node: Any, src: str) -> None:
        self.val[fx_node.name] = ("tensor", src)

    # ---------------------------------------------------------------- per fx op
    def run(self, graph: Any) -> str:
        needed = _live_nodes(graph)
        placeholders = [n for n in graph.nodes if n.op == "placeholder"]
        if not placeholders:
            raise SpecError("from_torch: the module's forward takes no input")
        for p in placeholders[1:]:
            if p in needed:
                raise SpecError(
                    f"from_torch: forward uses a second input {p.target!r}; only one input tensor "
                    "is supported"
                )
        self.val[placeholders[0].name] = ("tensor", INPUT)
        self.reserved = {n.target for n in graph.nodes if n.op == "call_module"}
        out_name = None
        for n in graph.nodes:
            if n.op == "placeholder" or n not in needed:
                continue
            if n.op == "output":
                arg = n.args[0]
                out_name = self.tensor(arg, n) if not isinstance(arg, (tuple, list)) else None
                if out_name is None:
                    raise SpecError("from_torch: forward must return one tensor (the logits)")
                continue
            if n.op == "call_module":
                self.call_module(n)
            elif n.op == "call_function":
                self.call_function(n)
            elif n.op == "call_method":
                self.call_method(n)
            elif n.op == "get_attr":
                raise SpecError(
                    f"from_torch: forward reads parameter/buffer {n.target!r} directly (functional "
                    "use of weights is not supported; use nn.Conv2d/nn.Linear modules)"
                )
            else:  # pragma: no cover - fx has no other ops
                raise SpecError(f"from_torch: unexpected fx node {n.op} {n.target}")
        if out_name is None or out_name == INPUT:
            raise SpecError("from_torch: forward returns no computed tensor")
        if not self.nodes or self.nodes[-1].name != out_name:
            raise SpecError(f"from_torch: the output {out_name!r} is not the last layer")
        return out_name

    def call_module(self, n: Any) -> None:
        nn = self.nn
        m = self.root.get_submodule(n.target)
        path = n.target
        tname = type(m).__name__
        where = f"{tname} at {path!r}"
        calls = self.module_calls.get(path, 0)
        self.module_calls[path] = calls + 1
        has_state = any(True for _ in m.parameters(recurse=False)) or any(
            True for _ in m.buffers(recurse=False))
        if calls and has_state:
            raise SpecError(
                f"from_torch: {where} is called more than once; shared weights are not supported"
            )
        if not calls and path not in self.used:
            name = path
        else:  # a parameter-free module called again (e.g. one shared nn.ReLU)
            self.reserved.discard(path)
            name = self.unique(f"{path}_{calls}")
            self.reserved.add(path)
        if n.kwargs or len(n.args) != (2 if isinstance(m, _classes()["Add"]) else 1):
            raise SpecError(f"from_torch: {where} is called with unsupported arguments")
        ins = tuple(self.tensor(a, n) for a in n.args)
        x = self.shapes[ins[0]]

        def exact(cls: type) -> bool:
            return isinstance(m, cls) and type(m).forward is cls.forward

        def fail(why: str) -> SpecError:
            return SpecError(f"from_torch: {where}: {why}")

        cls_ = _classes()
        if exact(nn.Conv2d):
            if tuple(m.dilation) != (1, 1):
                raise fail(f"dilation {m.dilation} is not supported (only 1)")
            if m.padding_mode != "zeros":
                raise fail(f"padding_mode {m.padding_mode!r} is not supported (only 'zeros')")
            padding = m.padding
            if isinstance(padding, str):
                if padding == "valid":
                    padding = (0, 0)
                elif all(k % 2 == 1 for k in m.kernel_size):
                    padding = tuple(k // 2 for k in m.kernel_size)
                else:
                    raise fail("padding='same' with an even kernel is asymmetric; not supported")
            self.check_in(fail, x, m.in_channels, "in_channels", chw=True)
            self.emit(name, "conv2d", ins, n, out_channels=m.out_channels,
                      kernel=tuple(m.kernel_size), stride=tuple(m.stride), padding=tuple(padding),
                      groups=m.groups, bias=m.bias is not None)
        elif exact(nn.Linear):
            if len(x) != 1 or x[0] != m.in_features:
                raise fail(f"in_features={m.in_features} but its input has per-sample shape {x}")
            self.emit(name, "linear", ins, n, out_features=m.out_features, bias=m.bias is not None)
        elif exact(nn.BatchNorm2d):
            if not m.affine or not m.track_running_stats:
                raise fail("affine=False or track_running_stats=False is not supported")
            if m.momentum is None:
                raise fail("momentum=None (cumulative average) is not supported")
            self.check_in(fail, x, m.num_features, "num_features", chw=True)
            self.emit(name, "batchnorm2d", ins, n, eps=float(m.eps), momentum=float(m.momentum))
        elif exact(nn.GroupNorm):
            if not m.affine:
                raise fail("affine=False is not supported")
            self.check_in(fail, x, m.num_channels, "num_channels", chw=True)
            self.emit(name, "groupnorm", ins, n, num_groups=m.num_groups, eps=float(m.eps))
        elif exact(nn.ReLU):
            self.emit(name, "relu", ins, n)
        elif exact(nn.MaxPool2d):
            if _pair(m.dilation) != (1, 1) or m.ceil_mode or m.return_indices:
                raise fail("dilation, ceil_mode and return_indices are not supported")
            self.emit(name, "maxpool2d", ins, n, kernel=_pair(m.kernel_size),
                      stride=_pair(m.stride if m.stride is not None else m.kernel_size),
                      padding=_pair(m.padding))
        elif exact(nn.AvgPool2d):
            self.avgpool(fail, name, ins, n, m.kernel_size, m.stride, m.padding, m.ceil_mode,
                         m.count_include_pad, m.divisor_override)
        elif exact(nn.AdaptiveAvgPool2d):
            self.adaptive(fail, name, ins, n, m.output_size)
        elif exact(nn.Flatten):
            self.flatten(fail, name, ins, n, m.start_dim, m.end_dim)
        elif exact(nn.Dropout):
            self.emit(name, "dropout", ins, n, p=float(m.p))
        elif exact(nn.Identity):
            self.alias(n, ins[0])
        elif exact(cls_["Add"]):
            self.emit(name, "add", ins, n)
        elif exact(cls_["GlobalAvgPool"]):
            self.emit(name, "global_avgpool", ins, n)
        else:
            raise SpecError(
                f"from_torch: unsupported layer {tname} at {path!r}; supported: Conv2d, Linear, "
                "BatchNorm2d, GroupNorm, ReLU, MaxPool2d, AvgPool2d, AdaptiveAvgPool2d(1), "
                "Flatten, Dropout, Identity"
            )

    @staticmethod
    def check_in(fail: Callable[[str], SpecError], x: Shape, want: int, what: str,
                 chw: bool) -> None:
        if chw and len(x) != 3:
            raise fail(f"expects a (C, H, W) input, got per-sample shape {x}")
        if x[0] != want:
            raise fail(f"{what}={want} but its input has {x[0]} channels")

    def avgpool(self, fail, name, ins, n, kernel, stride, padding, ceil_mode, include_pad,
                divisor) -> None:
        if ceil_mode or divisor is not None:
            raise fail("ceil_mode and divisor_override are not supported")
        padding = _pair(padding)
        if padding != (0, 0) and not include_pad:
            raise fail("count_include_pad=False with padding is not supported")
        stride = kernel if stride is None or stride == [] or stride == () else stride
        self.emit(name, "avgpool2d", ins, n, kernel=_pair(kernel), stride=_pair(stride),
                  padding=padding)

    def adaptive(self, fail, name, ins, n, output_size) -> None:
        if output_size not in (1, (1, 1), [1, 1]):
            raise fail(f"output_size {output_size!r} is not supported (only 1, i.e. global)")
        self.emit(name, "global_avgpool", ins, n)
        self.squeezed.add(name)

    def flatten(self, fail, name, ins, n, start_dim, end_dim) -> None:
        if start_dim != 1 or end_dim != -1:
            raise fail(f"flatten(start_dim={start_dim}, end_dim={end_dim}) is not supported; "
                       "only flattening everything but the batch dimension (start_dim=1)")
        self.emit(name, "flatten", ins, n)

    def mean(self, fail, name, ins, n, dim, keepdim) -> None:
        dims = tuple(dim) if isinstance(dim, (tuple, list)) else (dim,)
        x = self.shapes[ins[0]]
        if len(x) != 3 or sorted(d % 4 if isinstance(d, int) else -1 for d in dims) != [2, 3]:
            raise fail(f"mean over dims {dim!r} is not supported (only over H and W of NCHW)")
        self.emit(name, "global_avgpool", ins, n)
        if keepdim:
            self.squeezed.add(name)

    def call_function(self, n: Any) -> None:
        torch, F = self.torch, self.F  # noqa: N806
        t = n.target
        where = self.where(n)

        def fail(why: str) -> SpecError:
            return SpecError(f"from_torch: {self.describe(n)} at {where}: {why}")

        def bind(names, defaults):
            return _bind(self.describe(n), n.args, n.kwargs, names, defaults, f"at {where}")

        if t is operator.getitem:
            src = n.args[0]
            if self.val.get(getattr(src, "name", None), ("",))[0] == "shape" and n.args[1] == 0:
                self.val[n.name] = ("batch",)
                return
            raise fail("indexing tensors is not supported")
        if t is getattr:
            src = n.args[0]
            if n.args[1] == "shape" and self.val.get(getattr(src, "name", None), ("",))[0] == "tensor":
                self.val[n.name] = ("shape", self.tensor(src, n))
                return
            raise fail(f"attribute {n.args[1]!r} is not supported")
        if t in (F.relu, torch.relu, torch.relu_):
            a = bind(("input", "inplace"), {"inplace": False})
            self.emit(self.fn_name(n), "relu", (self.tensor(a["input"], n),), n)
        elif t in (operator.add, operator.iadd, torch.add):
            a = bind(("input", "other", "alpha"), {"alpha": 1})
            if a["alpha"] != 1:
                raise fail("alpha != 1 is not supported")
            self.emit(self.fn_name(n), "add",
                      (self.tensor(a["input"], n), self.tensor(a["other"], n)), n)
        elif t is F.max_pool2d:
            a = bind(("input", "kernel_size", "stride", "padding", "dilation", "ceil_mode",
                      "return_indices"), {"stride": None, "padding": 0, "dilation": 1,
                                          "ceil_mode": False, "return_indices": False})
            if _pair(a["dilation"]) != (1, 1) or a["ceil_mode"] or a["return_indices"]:
                raise fail("dilation, ceil_mode and return_indices are not supported")
            stride = a["stride"] if a["stride"] not in (None, [], ()) else a["kernel_size"]
            self.emit(self.fn_name(n), "maxpool2d", (self.tensor(a["input"], n),), n,
                      kernel=_pair(a["kernel_size"]), stride=_pair(stride),
                      padding=_pair(a["padding"]))
        elif t is F.avg_pool2d:
            a = bind(("input", "kernel_size", "stride", "padding", "ceil_mode",
                      "count_include_pad", "divisor_override"),
                     {"stride": None, "padding": 0, "ceil_mode": False,
                      "count_include_pad": True, "divisor_override": None})
            self.avgpool(fail, self.fn_name(n), (self.tensor(a["input"], n),), n,
                         a["kernel_size"], a["stride"], a["padding"], a["ceil_mode"],
                         a["count_include_pad"], a["divisor_override"])
        elif t is F.adaptive_avg_pool2d:
            a = bind(("input", "output_size"), {})
            self.adaptive(fail, self.fn_name(n), (self.tensor(a["input"], n),), n,
                          a["output_size"])
        elif t is torch.flatten:
            a = bind(("input", "start_dim", "end_dim"), {"start_dim": 0, "end_dim": -1})
            self.flatten(fail, self.fn_name(n), (self.tensor(a["input"], n),), n,
                         a["start_dim"], a["end_dim"])
        elif t is torch.mean:
            a = bind(("input", "dim", "keepdim"), {"keepdim": False})
            self.mean(fail, self.fn_name(n), (self.tensor(a["input"], n),), n, a["dim"],
                      a["keepdim"])
        elif t is F.dropout:
            a = bind(("input", "p", "training", "inplace"),
                     {"p": 0.5, "training": True, "inplace": False})
            self.emit(self.fn_name(n), "dropout", (self.tensor(a["input"], n),), n,
                      p=float(a["p"]))
        else:
            raise SpecError(f"from_torch: unsupported {self.describe(n)} at {where}")

    def call_method(self, n: Any) -> None:
        m = n.target
        where = self.where(n)

        def fail(why: str) -> SpecError:
            return SpecError(f"from_torch: method .{m}() at {where}: {why}")

        def bind(names, defaults):
            return _bind(f".{m}()", n.args[1:], n.kwargs, names, defaults, f"at {where}")

        src = self.tensor(n.args[0], n)
        if m == "size":
            a = bind(("dim",), {"dim": None})
            if a["dim"] is None:
                self.val[n.name] = ("shape", src)
            elif a["dim"] == 0:
                self.val[n.name] = ("batch",)
            else:
                raise fail("only x.size(0) (the batch size) is supported")
        elif m in ("relu", "relu_"):
            bind((), {})
            self.emit(self.fn_name(n), "relu", (src,), n)
        elif m in ("add", "add_"):
            a = bind(("other", "alpha"), {"alpha": 1})
            if a["alpha"] != 1:
                raise fail("alpha != 1 is not supported")
            self.emit(self.fn_name(n), "add", (src, self.tensor(a["other"], n)), n)
        elif m == "flatten":
            a = bind(("start_dim", "end_dim"), {"start_dim": 0, "end_dim": -1})
            self.flatten(fail, self.fn_name(n), (src,), n, a["start_dim"], a["end_dim"])
        elif m == "mean":
            a = bind(("dim", "keepdim"), {"keepdim": False})
            self.mean(fail, self.fn_name(n), (src,), n, a["dim"], a["keepdim"])
        elif m in ("view", "reshape"):
            shape = n.args[1:]
            if n.kwargs or not shape:
                raise fail("unsupported arguments")
            if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
                shape = tuple(shape[0])
            numel = math.prod(self.shapes[src])
            flat_ok = len(shape) == 2 and (
                (self.is_batch(shape[0]) and shape[1] in (-1, numel))
                or (shape[0] == -1 and shape[1] == numel)
            )
            if not flat_ok:
                raise fail(f"only flattening to (N, -1) is supported, got {tuple(shape)!r}")
            self.flatten(fail, self.fn_name(n), (src,), n, 1, -1)
        elif m == "contiguous":
            self.alias(n, src)
        else:
            raise SpecError(f"from_torch: unsupported method .{m}() at {where}")

    def is_batch(self, v: Any) -> bool:
        from torch.fx import Node as FxNode

        return isinstance(v, FxNode) and self.val.get(v.name, ("",))[0] == "batch"


def _pair(v: Any) -> tuple[int, int]:
    if isinstance(v, (tuple, list)):
        return (int(v[0]), int(v[1])) if len(v) == 2 else (int(v[0]), int(v[0]))
    return (int(v), int(v))


def _live_nodes(graph: Any) -> set:
    """fx nodes the output depends on (dead code, e.g. an unused branch, is ignored)."""
    live: set = set()
    stack = [n for n in graph.nodes if n.op == "output"]
    while stack:
        n = stack.pop()
        if n in live:
            continue
        live.add(n)
        stack.extend(n.all_input_nodes)
    return live


def from_torch(module: Any, input_shape: tuple[int, ...] | list[int],
               name: str | None = None) -> ModelSpec:
    """Import ``module`` (a ``torch.nn.Module`` of supported layers) as a ModelSpec.

    ``input_shape`` is per sample, ``(C, H, W)`` or ``(F,)``. Tracing is symbolic (``torch.fx``):
    nothing of the input's size is allocated and the module is not run. ``name`` defaults to the
    twin's spec name, else the module's class name. Unsupported layers, functions or methods raise
    :class:`SpecError` naming the type and the path in the module; so do parameters that the
    forward never uses (the weights would not map one to one).
    """
    import torch
    from torch import fx

    if not isinstance(module, torch.nn.Module):
        raise SpecError(f"from_torch: expected a torch.nn.Module, got {type(module).__name__}")
    if not isinstance(input_shape, (tuple, list)) or len(input_shape) not in (1, 3) or not all(
        isinstance(v, int) and not isinstance(v, bool) for v in input_shape
    ):
        raise SpecError(f"from_torch: input_shape: expected (C, H, W) or (F,), got {input_shape!r}")
    input_shape = tuple(input_shape)
    # The bounds check of ModelSpec, early: shape arithmetic below must stay cheap.
    try:
        ModelSpec("probe", input_shape, [make_node("probe", "flatten", INPUT)])
    except SpecError as e:
        raise SpecError(f"from_torch: {e}") from None
    cls_ = _classes()
    own = (cls_["Add"], cls_["GlobalAvgPool"])

    class _Tracer(fx.Tracer):
        def is_leaf_module(self, m: torch.nn.Module, qualname: str) -> bool:
            return isinstance(m, own) or super().is_leaf_module(m, qualname)

    try:
        graph = _Tracer().trace(module)
    except SpecError:
        raise
    except Exception as e:  # fx raises many kinds (TraceError, TypeError, ...)
        raise SpecError(
            f"from_torch: torch.fx could not trace {type(module).__name__} ({type(e).__name__}: "
            f"{e}); data-dependent control flow is not supported"
        ) from None
    imp = _Importer(module, input_shape)
    imp.run(graph)
    label = name if name is not None else getattr(module, "spec_name", type(module).__name__)
    spec = ModelSpec(label, input_shape, imp.nodes)
    want = spec.state_shapes()
    have = {k: tuple(v.shape) for k, v in module.state_dict(keep_vars=True).items()}
    unused = [k for k in have if k not in want]
    if unused:
        raise SpecError(
            f"from_torch: parameters/buffers not used by forward (weights would not map one to "
            f"one): {', '.join(unused[:8])}{' ...' if len(unused) > 8 else ''}"
        )
    for k, s in want.items():
        if have.get(k) != s:
            raise SpecError(f"from_torch: {k}: module has shape {have.get(k)}, spec expects {s}")
    return spec
