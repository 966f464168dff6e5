"""ModelSpec: a small DAG of layer nodes with shapes inferred from the input shape.

Everything else in sparsefl consumes it: cost counting (``hwmodel.counts``), the Numba
network (``embedded``), the TFLite exporter and the board protocol.

Conventions
-----------
* Shapes are *per sample*: ``(C, H, W)`` for feature maps, ``(F,)`` after ``flatten``.
* Node names are dot-separated identifiers that follow torch's module paths
  (``layer1.0.conv1``), so parameter names are ``<node>.weight`` / ``<node>.bias`` exactly as
  in the equivalent ``torch.nn.Module`` and weights map one to one.
* A node's ``inputs`` name earlier nodes, or ``"input"`` for the network input. The last node
  is the network output (logits); the loss is softmax cross-entropy over it.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

INPUT = "input"

#: Ops and the attributes each accepts (with defaults). ``None`` means required.
OPS: dict[str, dict[str, Any]] = {
    "conv2d": {
        "out_channels": None,
        "kernel": None,
        "stride": (1, 1),
        "padding": (0, 0),
        "groups": 1,
        "bias": True,
    },
    "linear": {"out_features": None, "bias": True},
    "batchnorm2d": {"eps": 1e-5, "momentum": 0.1},
    "groupnorm": {"num_groups": None, "eps": 1e-5},
    "relu": {},
    "maxpool2d": {"kernel": None, "stride": None, "padding": (0, 0)},
    "avgpool2d": {"kernel": None, "stride": None, "padding": (0, 0)},
    "global_avgpool": {},
    "flatten": {},
    "add": {},
    "dropout": {"p": 0.5},
}

#: Layer types that hold a weight matrix that sparsity applies to.
WEIGHTED_OPS = ("conv2d", "linear")

# Bounds that keep a spec (possibly received from a board or a file) from asking for absurd
# allocations. They are far above any edge model.
MAX_NODES = 4096
MAX_CHANNELS = 65536
MAX_SPATIAL = 16384
MAX_KERNEL = 64
MAX_PARAMS = 2_000_000_000
MAX_ACTIVATION_ELEMENTS = 500_000_000  # per sample, summed over nodes

_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*$")


class SpecError(ValueError):
    """A ModelSpec is malformed; the message names the node and the field."""


def _pair(v: Any, what: str) -> tuple[int, int]:
    if isinstance(v, bool):
        raise SpecError(f"{what}: expected an int or a pair of ints, got {v!r}")
    if isinstance(v, int):
        return (v, v)
    if isinstance(v, (list, tuple)) and len(v) == 2 and all(
        isinstance(x, int) and not isinstance(x, bool) for x in v
    ):
        return (int(v[0]), int(v[1]))
    raise SpecError(f"{what}: expected an int or a pair of ints, got {v!r}")


@dataclass(frozen=True)
class Node:
    """One layer of the DAG. ``attrs`` holds the op's attributes (normalised, with defaults)."""

    name: str
    op: str
    inputs: tuple[str, ...]
    attrs: dict[str, Any] = field(default_factory=dict)

    def attr(self, key: str) -> Any:
        return self.attrs[key]

    def to_dict(self) -> dict[str, Any]:
        attrs = {k: list(v) if isinstance(v, tuple) else v for k, v in self.attrs.items()}
        return {"name": self.name, "op": self.op, "inputs": list(self.inputs), "attrs": attrs}


def make_node(name: str, op: str, inputs: tuple[str, ...] | list[str] | str, **attrs: Any) -> Node:
    """Build a validated node: unknown op or attribute, missing attribute, bad value -> SpecError."""
    if not isinstance(name, str) or not _NAME_RE.match(name) or name == INPUT:
        raise SpecError(f"node name {name!r}: expected a dotted identifier such as 'layer1.0.conv1'")
    if op not in OPS:
        raise SpecError(f"node {name!r}: unknown op {op!r}; known ops: {', '.join(OPS)}")
    if isinstance(inputs, str):
        inputs = (inputs,)
    inputs = tuple(inputs)
    want = 2 if op == "add" else 1
    if len(inputs) != want:
        raise SpecError(f"node {name!r} ({op}): expected {want} input(s), got {len(inputs)}")
    allowed = OPS[op]
    unknown = set(attrs) - set(allowed)
    if unknown:
        raise SpecError(
            f"node {name!r} ({op}): unknown attribute(s) {sorted(unknown)}; "
            f"allowed: {sorted(allowed) or 'none'}"
        )
    full: dict[str, Any] = {}
    for key, default in allowed.items():
        val = attrs.get(key, default)
        if val is None and not (op in ("maxpool2d", "avgpool2d") and key == "stride"):
            raise SpecError(f"node {name!r} ({op}): missing attribute {key!r}")
        full[key] = val
    what = f"node {name!r} ({op})"
    if op == "conv2d":
        full["kernel"] = _pair(full["kernel"], f"{what}.kernel")
        full["stride"] = _pair(full["stride"], f"{what}.stride")
        full["padding"] = _pair(full["padding"], f"{what}.padding")
        for key in ("out_channels", "groups"):
            _check_int(full[key], 1, MAX_CHANNELS, f"{what}.{key}")
        full["bias"] = _check_bool(full["bias"], f"{what}.bias")
    elif op == "linear":
        _check_int(full["out_features"], 1, MAX_CHANNELS * 16, f"{what}.out_features")
        full["bias"] = _check_bool(full["bias"], f"{what}.bias")
    elif op in ("maxpool2d", "avgpool2d"):
        full["kernel"] = _pair(full["kernel"], f"{what}.kernel")
        stride = full["stride"] if full["stride"] is not None else full["kernel"]
        full["stride"] = _pair(stride, f"{what}.stride")
        full["padding"] = _pair(full["padding"], f"{what}.padding")
    elif op == "groupnorm":
        _check_int(full["num_groups"], 1, MAX_CHANNELS, f"{what}.num_groups")
    elif op == "dropout":
        p = full["p"]
        if not isinstance(p, (int, float)) or not 0.0 <= float(p) < 1.0:
            raise SpecError(f"{what}.p: expected a probability in [0, 1), got {p!r}")
        full["p"] = float(p)
    if op in ("conv2d", "maxpool2d", "avgpool2d"):
        for key in ("kernel", "stride"):
            for v in full[key]:
                _check_int(v, 1, MAX_KERNEL, f"{what}.{key}")
        for v in full["padding"]:
            _check_int(v, 0, MAX_KERNEL, f"{what}.padding")
    if op in ("batchnorm2d", "groupnorm"):
        eps = full["eps"]
        if not isinstance(eps, (int, float)) or not 0 < float(eps) < 1:
            raise SpecError(f"{what}.eps: expected a small positive number, got {eps!r}")
        full["eps"] = float(eps)
    return Node(name=name, op=op, inputs=inputs, attrs=full)


def _check_int(v: Any, lo: int, hi: int, what: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise SpecError(f"{what}: expected an integer in [{lo}, {hi}], got {v!r}")
    return v


def _check_bool(v: Any, what: str) -> bool:
    if not isinstance(v, bool):
        raise SpecError(f"{what}: expected true or false, got {v!r}")
    return v


Shape = tuple[int, ...]


class ModelSpec:
    """A validated model DAG with inferred shapes.

    Parameters
    ----------
    name: a label (the builder's name, or the imported module's class name).
    input_shape: per-sample input shape, ``(C, H, W)`` or ``(F,)``.
    nodes: the layers in topological order; the last one produces the logits.
    """

    def __init__(self, name: str, input_shape: Shape, nodes: list[Node]):
        if not isinstance(input_shape, (tuple, list)) or len(input_shape) not in (1, 3):
            raise SpecError(f"input_shape: expected (C, H, W) or (F,), got {input_shape!r}")
        for v in input_shape:
            _check_int(v, 1, MAX_SPATIAL * 16, "input_shape")
        if not nodes:
            raise SpecError("a ModelSpec needs at least one node")
        if len(nodes) > MAX_NODES:
            raise SpecError(f"too many nodes: {len(nodes)} > {MAX_NODES}")
        self.name = str(name)
        self.input_shape: Shape = tuple(int(v) for v in input_shape)
        self.nodes: list[Node] = list(nodes)
        self._by_name: dict[str, Node] = {}
        self.in_shapes: dict[str, tuple[Shape, ...]] = {}
        self.shapes: dict[str, Shape] = {}
        self._infer()

    # ------------------------------------------------------------------ inference
    def _infer(self) -> None:
        shapes: dict[str, Shape] = {INPUT: self.input_shape}
        act_total = math.prod(self.input_shape)
        params_total = 0
        for node in self.nodes:
            if node.name in shapes:
                raise SpecError(f"node {node.name!r}: duplicate name")
            for src in node.inputs:
                if src not in shapes:
                    raise SpecError(
                        f"node {node.name!r}: input {src!r} is not an earlier node or 'input'"
                    )
            ins = tuple(shapes[s] for s in node.inputs)
            out = _infer_shape(node, ins)
            for v in out:
                if v < 1:
                    raise SpecError(
                        f"node {node.name!r} ({node.op}): output shape {out} is empty "
                        f"for input {ins[0]}"
                    )
            act_total += math.prod(out)
            if act_total > MAX_ACTIVATION_ELEMENTS:
                raise SpecError(
                    f"node {node.name!r}: activations exceed {MAX_ACTIVATION_ELEMENTS:,} "
                    "elements per sample; this is not an edge model"
                )
            self._by_name[node.name] = node
            self.in_shapes[node.name] = ins
            self.shapes[node.name] = out
            shapes[node.name] = out
            params_total += sum(math.prod(s) for s in _param_shapes(node, ins).values())
            if params_total > MAX_PARAMS:
                raise SpecError(f"node {node.name!r}: more than {MAX_PARAMS:,} parameters")
        if len(self.shapes[self.nodes[-1].name]) != 1:
            raise SpecError(
                f"the last node {self.nodes[-1].name!r} must produce a vector of logits, "
                f"got shape {self.shapes[self.nodes[-1].name]}"
            )

    # ------------------------------------------------------------------ queries
    def __getitem__(self, name: str) -> Node:
        try:
            return self._by_name[name]
        except KeyError:
            raise KeyError(f"no node {name!r} in spec {self.name!r}") from None

    def __contains__(self, name: str) -> bool:
        return name in self._by_name

    def __len__(self) -> int:
        return len(self.nodes)

    def __iter__(self):
        return iter(self.nodes)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ModelSpec) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return (
            f"ModelSpec({self.name!r}, input_shape={self.input_shape}, nodes={len(self.nodes)}, "
            f"params={self.num_params():,})"
        )

    @property
    def output(self) -> str:
        """Name of the node that produces the logits."""
        return self.nodes[-1].name

    @property
    def num_classes(self) -> int:
        return self.shapes[self.output][0]

    def weighted_layers(self) -> list[str]:
        """Names of conv2d and linear nodes, in order: the layers sparsity applies to."""
        return [n.name for n in self.nodes if n.op in WEIGHTED_OPS]

    def first_layer(self) -> str:
        """The first conv or linear layer on the input path."""
        return self.weighted_layers()[0]

    def classifier(self) -> str:
        """The last linear (or conv) layer: the classifier."""
        return self.weighted_layers()[-1]

    def param_shapes(self, node: str | None = None) -> dict[str, Shape]:
        """Trainable parameters, named like torch's ``state_dict`` (``conv1.weight``)."""
        nodes = [self[node]] if node is not None else self.nodes
        out: dict[str, Shape] = {}
        for n in nodes:
            for k, s in _param_shapes(n, self.in_shapes[n.name]).items():
                out[f"{n.name}.{k}"] = s
        return out

    def buffer_shapes(self) -> dict[str, Shape]:
        """Non-trainable state (batch-norm running stats and counter), named like torch."""
        out: dict[str, Shape] = {}
        for n in self.nodes:
            if n.op == "batchnorm2d":
                c = self.in_shapes[n.name][0][0]
                out[f"{n.name}.running_mean"] = (c,)
                out[f"{n.name}.running_var"] = (c,)
                out[f"{n.name}.num_batches_tracked"] = ()
        return out

    def state_shapes(self) -> dict[str, Shape]:
        """Parameters then buffers, in torch's ``state_dict`` order (per module)."""
        out: dict[str, Shape] = {}
        buffers = self.buffer_shapes()
        for n in self.nodes:
            for k, s in self.param_shapes(n.name).items():
                out[k] = s
            for suffix in ("running_mean", "running_var", "num_batches_tracked"):
                key = f"{n.name}.{suffix}"
                if key in buffers:
                    out[key] = buffers[key]
        return out

    def num_params(self) -> int:
        return sum(math.prod(s) for s in self.param_shapes().values())

    def fused_relus(self) -> list[str]:
        """The ReLU nodes sparsefl's trainer folds into the node before them: a batch norm or
        a residual add whose output only the ReLU reads (that node writes max(y, 0) and masks
        its own backward by y > 0). The cost model counts no separate pass for them."""
        consumers = self.consumers()
        return [n.name for n in self.nodes
                if n.op == "relu" and n.inputs[0] != INPUT
                and self[n.inputs[0]].op in ("batchnorm2d", "add")
                and len(consumers[n.inputs[0]]) == 1]

    def consumers(self) -> dict[str, list[str]]:
        """For each node (and 'input'), the nodes that read its output."""
        out: dict[str, list[str]] = {INPUT: []}
        for n in self.nodes:
            out.setdefault(n.name, [])
            for src in n.inputs:
                out[src].append(n.name)
        return out

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": "sparsefl.modelspec/1",
            "name": self.name,
            "input_shape": list(self.input_shape),
            "nodes": [n.to_dict() for n in self.nodes],
        }

    def to_json(self, indent: int | None = None) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, d: Any, source: str = "model spec") -> ModelSpec:
        """Validate and build a spec from its dict form; errors name ``source`` and the field."""
        if not isinstance(d, dict):
            raise SpecError(f"{source}: expected a JSON object, got {type(d).__name__}")
        fmt = d.get("format", "sparsefl.modelspec/1")
        if fmt != "sparsefl.modelspec/1":
            raise SpecError(f"{source}: format {fmt!r} is not 'sparsefl.modelspec/1'")
        for key in ("name", "input_shape", "nodes"):
            if key not in d:
                raise SpecError(f"{source}: missing field {key!r}")
        if not isinstance(d["nodes"], list):
            raise SpecError(f"{source}: field 'nodes' must be a list")
        if len(d["nodes"]) > MAX_NODES:
            raise SpecError(f"{source}: too many nodes ({len(d['nodes'])} > {MAX_NODES})")
        nodes = []
        for i, nd in enumerate(d["nodes"]):
            if not isinstance(nd, dict) or not {"name", "op", "inputs"} <= set(nd):
                raise SpecError(f"{source}: nodes[{i}] needs 'name', 'op' and 'inputs'")
            attrs = nd.get("attrs", {})
            if not isinstance(attrs, dict):
                raise SpecError(f"{source}: nodes[{i}].attrs must be an object")
            inputs = nd["inputs"]
            if not isinstance(inputs, list) or not all(isinstance(s, str) for s in inputs):
                raise SpecError(f"{source}: nodes[{i}].inputs must be a list of node names")
            try:
                nodes.append(make_node(nd["name"], nd["op"], tuple(inputs), **attrs))
            except SpecError as e:
                raise SpecError(f"{source}: nodes[{i}]: {e}") from None
        try:
            return cls(d["name"], tuple(d["input_shape"]), nodes)
        except (SpecError, TypeError) as e:
            raise SpecError(f"{source}: {e}") from None

    @classmethod
    def from_json(cls, text: str | bytes, source: str = "model spec") -> ModelSpec:
        if len(text) > 16 * 1024 * 1024:
            raise SpecError(f"{source}: larger than 16 MiB; not a model spec")
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise SpecError(f"{source}: not valid JSON ({e})") from None
        return cls.from_dict(d, source)

    def save(self, path: str) -> None:
        with open(path, "w", encoding="utf-8") as f:
            f.write(self.to_json(indent=1))

    @classmethod
    def load(cls, path: str) -> ModelSpec:
        with open(path, "rb") as f:
            return cls.from_json(f.read(16 * 1024 * 1024 + 1), source=str(path))


# ---------------------------------------------------------------------- shape rules
def _out_len(n: int, k: int, s: int, p: int) -> int:
    return (n + 2 * p - k) // s + 1


def _infer_shape(node: Node, ins: tuple[Shape, ...]) -> Shape:
    op, a, x = node.op, node.attrs, ins[0]
    what = f"node {node.name!r} ({op})"

    def need_chw() -> tuple[int, int, int]:
        if len(x) != 3:
            raise SpecError(f"{what}: expects a (C, H, W) input, got {x}")
        return x  # type: ignore[return-value]

    if op == "conv2d":
        c, h, w = need_chw()
        g = a["groups"]
        if c % g or a["out_channels"] % g:
            raise SpecError(
                f"{what}: groups={g} must divide in_channels={c} and out_channels={a['out_channels']}"
            )
        (kh, kw), (sh, sw), (ph, pw) = a["kernel"], a["stride"], a["padding"]
        return (a["out_channels"], _out_len(h, kh, sh, ph), _out_len(w, kw, sw, pw))
    if op == "linear":
        if len(x) != 1:
            raise SpecError(f"{what}: expects a flat (F,) input, got {x}; add a 'flatten' node")
        return (a["out_features"],)
    if op in ("maxpool2d", "avgpool2d"):
        c, h, w = need_chw()
        (kh, kw), (sh, sw), (ph, pw) = a["kernel"], a["stride"], a["padding"]
        if 2 * ph > kh or 2 * pw > kw:
            raise SpecError(f"{what}: padding must be at most half the kernel")
        return (c, _out_len(h, kh, sh, ph), _out_len(w, kw, sw, pw))
    if op == "global_avgpool":
        c, _, _ = need_chw()
        return (c,)
    if op == "flatten":
        return (math.prod(x),)
    if op == "batchnorm2d":
        need_chw()
        return x
    if op == "groupnorm":
        c, _, _ = need_chw()
        if c % a["num_groups"]:
            raise SpecError(f"{what}: num_groups={a['num_groups']} must divide channels={c}")
        return x
    if op == "add":
        if ins[0] != ins[1]:
            raise SpecError(f"{what}: input shapes differ: {ins[0]} vs {ins[1]}")
        return x
    if op in ("relu", "dropout"):
        return x
    raise SpecError(f"{what}: no shape rule")  # pragma: no cover - OPS and rules agree


def _param_shapes(node: Node, ins: tuple[Shape, ...]) -> dict[str, Shape]:
    a = node.attrs
    if node.op == "conv2d":
        c = ins[0][0]
        kh, kw = a["kernel"]
        out = {"weight": (a["out_channels"], c // a["groups"], kh, kw)}
        if a["bias"]:
            out["bias"] = (a["out_channels"],)
        return out
    if node.op == "linear":
        out = {"weight": (a["out_features"], ins[0][0])}
        if a["bias"]:
            out["bias"] = (a["out_features"],)
        return out
    if node.op in ("batchnorm2d", "groupnorm"):
        c = ins[0][0]
        return {"weight": (c,), "bias": (c,)}
    return {}
