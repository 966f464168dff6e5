"""TFLite export without TensorFlow: a ModelSpec and its weights -> a ``.tflite`` flatbuffer.

``export_tflite(spec, state, int8=False, calib=None) -> bytes`` builds the model with the
``tflite`` package's generated schema code and ``flatbuffers.Builder`` (neither TensorFlow nor
torch is needed; both packages are pure Python: the optional ``export`` extra).

Layout and conventions of the exported model
--------------------------------------------
* The input tensor ``"input"`` is **NHWC** float32 ``(batch, H, W, C)`` (LiteRT's layout);
  transpose an NCHW batch with ``x.transpose(0, 2, 3, 1)``. A flat spec input ``(F,)`` stays
  ``(batch, F)``. The output tensor ``"logits"`` is ``(batch, classes)``: logits, no softmax.
  A signature ``serving_default`` maps the same names. The batch dimension is written as
  ``batch`` (default 1) and may be resized with ``Interpreter.resize_tensor_input``.
* conv2d -> CONV_2D (weights OHWI); groups == in_channels -> DEPTHWISE_CONV_2D (weights
  1HW(C*multiplier)); other group counts -> CONV_2D with block-diagonal (zero-filled) weights.
  A batchnorm2d whose input is a conv read by nothing else is folded into that conv; any other
  batchnorm2d becomes MUL + ADD. A relu right after a conv/linear/add/(folded) batch norm is
  fused into it; any other relu is a RELU op. Padding equal to TFLite's SAME rule uses SAME,
  zero padding VALID, anything else an explicit PAD (PADV2 with the lowest value before a
  max-pool, so padded cells never win). Average pooling counts padded cells like torch
  (count_include_pad=True). global_avgpool -> MEAN over H, W; add -> ADD; linear ->
  FULLY_CONNECTED; dropout is the identity. flatten keeps torch's NCHW order: when every
  reader is a linear layer its weight columns are permuted, otherwise the map is transposed to
  NCHW before the RESHAPE. groupnorm (fp32 only) becomes RESHAPE to (N, H*W, G, C/G), MEAN,
  SUB, MUL, MEAN, ADD eps, RSQRT, MUL, RESHAPE, MUL gamma, ADD beta; an int8 export of a model
  with groupnorm is refused with an error naming the node.
* ``int8=True``: full-integer post-training quantisation from a calibration batch (NCHW, like
  the training data): weights of conv / depthwise conv int8 symmetric **per output channel**,
  linear weights int8 symmetric per tensor (what tflite-runtime 2.14's FULLY_CONNECTED int8
  kernel takes), biases int32 with scale ``s_in * s_w``, activations int8 asymmetric **per
  tensor** from the calibration min/max of the same node in the Numba network. The interface
  stays float32 (a QUANTIZE op after ``input``, a DEQUANTIZE before ``logits``) unless
  ``int8_io=True``, in which case ``input`` and ``logits`` are int8 tensors carrying their
  scale and zero point.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from hwmodel.spec import INPUT, ModelSpec

#: The four-byte file identifier LiteRT checks.
FILE_IDENTIFIER = b"TFL3"
SCHEMA_VERSION = 3
_ALIGN = 16


class ExportError(ValueError):
    """The model or its weights cannot be exported; the message names the node or key."""


# ---------------------------------------------------------------------- graph records
@dataclass
class _Tensor:
    name: str
    shape: tuple[int, ...]
    kind: str  # "act" | "weight" | "bias" | "const" | "int32"
    data: np.ndarray | None = None
    range_of: str | None = None  # act: spec node (or "input") whose outputs give the range
    extra_range: str | None = None  # act: key into the calibration's extra ranges
    same_as: int | None = None  # act: copy the quantisation of this tensor
    axis: int | None = None  # weight: per-channel axis (None = per tensor)
    bias_of: tuple[int, int] | None = None  # bias: (input tensor, weight tensor)
    # filled by quantisation
    dtype: str = "float32"
    scale: np.ndarray | None = None
    zero_point: np.ndarray | None = None


@dataclass
class _Op:
    code: str
    inputs: list[int]
    outputs: list[int]
    options: tuple[str, dict[str, Any]] | None = None


@dataclass
class _Graph:
    tensors: list[_Tensor] = field(default_factory=list)
    ops: list[_Op] = field(default_factory=list)

    def tensor(self, t: _Tensor) -> int:
        self.tensors.append(t)
        return len(self.tensors) - 1

    def const(self, name: str, data: np.ndarray, kind: str = "const",
              axis: int | None = None) -> int:
        data = np.ascontiguousarray(data)
        return self.tensor(_Tensor(name, tuple(data.shape), kind, data=data, axis=axis,
                                   dtype="int32" if kind == "int32" else "float32"))

    def shape_const(self, name: str, values: list[int]) -> int:
        return self.const(name, np.asarray(values, np.int32), kind="int32")

    def op(self, code: str, inputs: list[int], outputs: list[int],
           options: tuple[str, dict[str, Any]] | None = None) -> None:
        self.ops.append(_Op(code, inputs, outputs, options))


# ---------------------------------------------------------------------- weights
def load_state(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read a state_dict saved with ``np.savez`` (torch parameter names); no pickle."""
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: np.asarray(z[k]) for k in z.files}
    except (OSError, ValueError) as e:
        raise ExportError(f"{path}: not a readable .npz of named arrays ({e})") from None


def check_state(spec: ModelSpec, state: Mapping[str, Any], source: str = "weights"
                ) -> dict[str, np.ndarray]:
    """Names and shapes must match ``spec.state_shapes()`` (the batch-norm counter may be
    missing); values are returned as float32 arrays."""
    want = spec.state_shapes()
    missing = [k for k in want if k not in state and not k.endswith(".num_batches_tracked")]
    unexpected = [k for k in state if k not in want]
    if missing or unexpected:
        raise ExportError(f"{source}: the keys do not match model {spec.name!r}: missing "
                          f"{missing[:8]}{'...' if len(missing) > 8 else ''}, unexpected "
                          f"{unexpected[:8]}{'...' if len(unexpected) > 8 else ''}")
    out = {}
    for k, shape in want.items():
        if k.endswith(".num_batches_tracked"):
            continue
        v = np.asarray(state[k])
        if tuple(v.shape) != tuple(shape):
            raise ExportError(f"{source}: {k!r} has shape {tuple(v.shape)}, expected {shape}")
        if not np.issubdtype(v.dtype, np.floating):
            raise ExportError(f"{source}: {k!r} has dtype {v.dtype}, expected floating point")
        if not np.all(np.isfinite(v)):
            raise ExportError(f"{source}: {k!r} holds NaN or infinite values")
        out[k] = v.astype(np.float32)
    return out


# ---------------------------------------------------------------------- padding rules
def _same_ok(n: int, k: int, s: int, p: int, out: int) -> bool:
    """TFLite's SAME padding equals torch's symmetric padding ``p`` for this dimension."""
    o = -(-n // s)
    total = max((o - 1) * s + k - n, 0)
    return o == out and total // 2 == p


def _padding(in_hw, k, s, p, out_hw) -> str:
    """'VALID', 'SAME' or 'EXPLICIT' for a window op."""
    if p == (0, 0):
        return "VALID"
    if all(_same_ok(in_hw[i], k[i], s[i], p[i], out_hw[i]) for i in range(2)):
        return "SAME"
    return "EXPLICIT"


# ---------------------------------------------------------------------- the float graph
class _Builder:
    """Turns a ModelSpec + weights into a float graph of TFLite ops (NHWC)."""

    def __init__(self, spec: ModelSpec, state: dict[str, np.ndarray], batch: int,
                 int8: bool = False):
        self.spec, self.state, self.batch, self.int8 = spec, state, batch, int8
        self.g = _Graph()
        self.cons = spec.consumers()
        # node -> (tensor index, flatten permutation (C, H, W) or None)
        self.t: dict[str, tuple[int, tuple[int, int, int] | None]] = {}
        self.fold_bn: dict[str, str] = {}  # conv -> batch norm folded into it
        self.fuse_relu: dict[str, str] = {}  # producer -> relu fused into it
        self.absorbed: set[str] = set()
        self.bn_extra: list[str] = []  # batch norms exported as MUL + ADD
        self._plan()

    # ------------------------------------------------------------------ fusion plan
    def _plan(self) -> None:
        spec, cons = self.spec, self.cons
        out = spec.output
        for n in spec.nodes:
            if n.op == "conv2d" and n.name != out and len(cons[n.name]) == 1:
                nxt = spec[cons[n.name][0]]
                if nxt.op == "batchnorm2d":
                    self.fold_bn[n.name] = nxt.name
                    self.absorbed.add(nxt.name)
        for n in spec.nodes:
            if n.op not in ("conv2d", "linear", "add", "batchnorm2d", "groupnorm") \
                    or n.name in self.absorbed:
                continue
            tail = self.fold_bn.get(n.name, n.name)
            if tail != out and len(cons[tail]) == 1 and spec[cons[tail][0]].op == "relu":
                self.fuse_relu[n.name] = cons[tail][0]
                self.absorbed.add(cons[tail][0])

    def _tail(self, name: str) -> str:
        """The last spec node whose output the op emitted for ``name`` produces."""
        tail = self.fold_bn.get(name, name)
        return self.fuse_relu.get(name, tail)

    def _act(self, node: str, shape: tuple[int, ...], name: str | None = None) -> int:
        return self.g.tensor(_Tensor(name or node, shape, "act", range_of=node))

    def _same(self, like: int, shape: tuple[int, ...], name: str) -> int:
        return self.g.tensor(_Tensor(name, shape, "act", same_as=like))

    def _nhwc(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        if len(shape) == 3:
            c, h, w = shape
            return (self.batch, h, w, c)
        return (self.batch, *shape)

    # ------------------------------------------------------------------ building
    def build(self) -> tuple[_Graph, int, int]:
        spec = self.spec
        x = self.g.tensor(_Tensor("input", self._nhwc(spec.input_shape), "act", range_of=INPUT))
        self.t[INPUT] = (x, None)
        for n in spec.nodes:
            if n.name in self.absorbed:
                continue
            emit = getattr(self, f"_emit_{n.op}")
            emit(n)
            tail = self._tail(n.name)
            if tail != n.name:
                self.t[tail] = self.t[n.name]
                if n.name in self.fold_bn:
                    self.t[self.fold_bn[n.name]] = self.t[n.name]
        y, perm = self.t[spec.output]
        if perm is not None:
            y = self._materialise(y, perm)
        if y == x:
            raise ExportError(f"model {spec.name!r}: the output is the input; nothing to export")
        self.g.tensors[y].name = "logits"
        return self.g, x, y

    def _input(self, n, i: int = 0, want_map: bool = True) -> tuple[int, Any]:
        t, perm = self.t[n.inputs[i]]
        if want_map and len(self.g.tensors[t].shape) != 4:
            raise ExportError(f"node {n.name!r} ({n.op}): expects a feature map")
        return t, perm

    def _materialise(self, t: int, perm: tuple[int, int, int]) -> int:
        """A flat NHWC-ordered vector -> torch's NCHW flatten order."""
        c, h, w = perm
        name = self.g.tensors[t].name
        r1 = self._same(t, (self.batch, h, w, c), f"{name}.nhwc")
        self.g.op("RESHAPE", [t, self.g.shape_const(f"{name}.nhwc_shape", [-1, h, w, c])], [r1],
                  ("Reshape", {}))
        tr = self._same(r1, (self.batch, c, h, w), f"{name}.nchw")
        self.g.op("TRANSPOSE", [r1, self.g.shape_const(f"{name}.perm", [0, 3, 1, 2])], [tr],
                  ("Transpose", {}))
        r2 = self._same(tr, (self.batch, c * h * w), f"{name}.flat_nchw")
        self.g.op("RESHAPE", [tr, self.g.shape_const(f"{name}.flat_shape", [-1, c * h * w])],
                  [r2], ("Reshape", {}))
        return r2

    def _explicit_pad(self, n, x: int, p: tuple[int, int], value: str = "zero") -> int:
        b, h, w, c = self.g.tensors[x].shape
        ph, pw = p
        out = self._same(x, (b, h + 2 * ph, w + 2 * pw, c), f"{n.name}.pad")
        pads = self.g.const(f"{n.name}.paddings",
                            np.asarray([[0, 0], [ph, ph], [pw, pw], [0, 0]], np.int32), "int32")
        if value == "zero":
            self.g.op("PAD", [x, pads], [out], ("Pad", {}))
        else:
            low = self.g.const(f"{n.name}.pad_value", np.asarray([np.finfo(np.float32).min],
                                                                 np.float32), "lowest")
            self.g.tensors[low].same_as = x
            self.g.op("PADV2", [x, pads, low], [out], ("PadV2", {}))
        return out

    def _act_fn(self, n) -> str:
        return "RELU" if n.name in self.fuse_relu else "NONE"

    def _emit_conv2d(self, n) -> None:
        a, st = n.attrs, self.state
        x, _ = self._input(n)
        cin = self.spec.in_shapes[n.name][0][0]
        cout, g = a["out_channels"], a["groups"]
        wt = st[f"{n.name}.weight"].astype(np.float64)
        b = st[f"{n.name}.bias"].astype(np.float64) if a["bias"] else np.zeros(cout)
        if n.name in self.fold_bn:
            bn = self.fold_bn[n.name]
            s = st[f"{bn}.weight"].astype(np.float64) / np.sqrt(
                st[f"{bn}.running_var"].astype(np.float64) + self.spec[bn].attrs["eps"])
            wt = wt * s[:, None, None, None]
            b = b * s + st[f"{bn}.bias"] - st[f"{bn}.running_mean"] * s
        in_hw = self.spec.in_shapes[n.name][0][1:]
        out_shape = self.spec.shapes[n.name]
        mode = _padding(in_hw, a["kernel"], a["stride"], a["padding"], out_shape[1:])
        if mode == "EXPLICIT":
            x = self._explicit_pad(n, x, a["padding"])
            mode = "VALID"
        kh, kw = a["kernel"]
        if g == cin and g > 1:
            w_t = wt[:, 0].transpose(1, 2, 0)[None].astype(np.float32)  # 1, kh, kw, cout
            wi = self.g.const(f"{n.name}.weight", w_t, "weight", axis=3)
            code, opt = "DEPTHWISE_CONV_2D", ("DepthwiseConv2D", {"depth_multiplier": cout // cin})
        else:
            if g > 1:  # block-diagonal dense weights
                full = np.zeros((cout, cin, kh, kw))
                og, ig = cout // g, cin // g
                for k in range(g):
                    full[k * og:(k + 1) * og, k * ig:(k + 1) * ig] = wt[k * og:(k + 1) * og]
                wt = full
            wi = self.g.const(f"{n.name}.weight", wt.transpose(0, 2, 3, 1).astype(np.float32),
                              "weight", axis=0)
            code, opt = "CONV_2D", ("Conv2D", {})
        bi = self.g.const(f"{n.name}.bias", b.astype(np.float32), "bias")
        self.g.tensors[bi].bias_of = (x, wi)
        opt[1].update(padding=mode, stride=a["stride"], act=self._act_fn(n))
        tail = self._tail(n.name)
        y = self._act(tail, self._nhwc(out_shape), n.name)
        self.g.op(code, [x, wi, bi], [y], opt)
        self.t[n.name] = (y, None)

    def _emit_linear(self, n) -> None:
        x, perm = self._input(n, want_map=False)
        wt = self.state[f"{n.name}.weight"]
        out_f = n.attrs["out_features"]
        if perm is not None:
            c, h, w = perm
            wt = wt.reshape(out_f, c, h, w).transpose(0, 2, 3, 1).reshape(out_f, -1)
        b = self.state[f"{n.name}.bias"] if n.attrs["bias"] else np.zeros(out_f, np.float32)
        wi = self.g.const(f"{n.name}.weight", wt.astype(np.float32), "weight")
        bi = self.g.const(f"{n.name}.bias", b.astype(np.float32), "bias")
        self.g.tensors[bi].bias_of = (x, wi)
        y = self._act(self._tail(n.name), (self.batch, out_f), n.name)
        self.g.op("FULLY_CONNECTED", [x, wi, bi], [y],
                  ("FullyConnected", {"act": self._act_fn(n)}))
        self.t[n.name] = (y, None)

    def _emit_batchnorm2d(self, n) -> None:
        x, _ = self._input(n)
        st, eps = self.state, n.attrs["eps"]
        s = st[f"{n.name}.weight"].astype(np.float64) / np.sqrt(
            st[f"{n.name}.running_var"].astype(np.float64) + eps)
        sh = st[f"{n.name}.bias"] - st[f"{n.name}.running_mean"] * s
        shape = self.g.tensors[x].shape
        si = self.g.const(f"{n.name}.scale", s.astype(np.float32))
        mid = self.g.tensor(_Tensor(f"{n.name}.scaled", shape, "act", extra_range=n.name))
        self.g.op("MUL", [x, si], [mid], ("Mul", {}))
        bi = self.g.const(f"{n.name}.shift", sh.astype(np.float32))
        y = self._act(self._tail(n.name), shape, n.name)
        self.g.op("ADD", [mid, bi], [y], ("Add", {"act": self._act_fn(n)}))
        self.bn_extra.append(n.name)
        self.t[n.name] = (y, None)

    def _emit_relu(self, n) -> None:
        x, perm = self._input(n, want_map=False)
        y = self._act(n.name, self.g.tensors[x].shape)
        self.g.op("RELU", [x], [y])
        self.t[n.name] = (y, perm)

    def _emit_pool(self, n, code: str) -> None:
        a = n.attrs
        x, _ = self._input(n)
        in_hw = self.spec.in_shapes[n.name][0][1:]
        out_shape = self.spec.shapes[n.name]
        mode = _padding(in_hw, a["kernel"], a["stride"], a["padding"], out_shape[1:])
        if mode == "EXPLICIT" or (mode == "SAME" and code == "AVERAGE_POOL_2D"):
            x = self._explicit_pad(n, x, a["padding"],
                                   "lowest" if code == "MAX_POOL_2D" else "zero")
            mode = "VALID"
        y = self._same(x, self._nhwc(out_shape), n.name)
        self.g.op(code, [x], [y], ("Pool2D", {"padding": mode, "stride": a["stride"],
                                               "kernel": a["kernel"]}))
        self.t[n.name] = (y, None)

    def _emit_maxpool2d(self, n) -> None:
        self._emit_pool(n, "MAX_POOL_2D")

    def _emit_avgpool2d(self, n) -> None:
        self._emit_pool(n, "AVERAGE_POOL_2D")

    def _emit_global_avgpool(self, n) -> None:
        x, _ = self._input(n)
        y = self._act(n.name, self._nhwc(self.spec.shapes[n.name]))
        axes = self.g.shape_const(f"{n.name}.axes", [1, 2])
        self.g.op("MEAN", [x, axes], [y], ("Reducer", {"keep_dims": False}))
        self.t[n.name] = (y, None)

    def _emit_flatten(self, n) -> None:
        x, perm = self.t[n.inputs[0]]
        shape = self.g.tensors[x].shape
        if len(shape) == 2:
            self.t[n.name] = (x, perm)
            return
        c, h, w = self.spec.in_shapes[n.name][0]
        y = self._same(x, (self.batch, c * h * w), n.name)
        self.g.op("RESHAPE", [x, self.g.shape_const(f"{n.name}.shape", [-1, c * h * w])], [y],
                  ("Reshape", {}))
        self.t[n.name] = (y, None if h * w == 1 else (c, h, w))

    def _emit_add(self, n) -> None:
        (a, pa), (b, pb) = self.t[n.inputs[0]], self.t[n.inputs[1]]
        if pa != pb:
            if pa is not None:
                a = self._materialise(a, pa)
            if pb is not None:
                b = self._materialise(b, pb)
            pa = None
        y = self._act(self._tail(n.name), self.g.tensors[a].shape, n.name)
        self.g.op("ADD", [a, b], [y], ("Add", {"act": self._act_fn(n)}))
        self.t[n.name] = (y, pa)

    def _emit_dropout(self, n) -> None:
        self.t[n.name] = self.t[n.inputs[0]]

    def _emit_groupnorm(self, n) -> None:
        """fp32 only: reshape to (N, H*W, G, C/G), normalise over axes 1 and 3, scale, shift."""
        if self.int8:
            raise ExportError(f"node {n.name!r} (groupnorm): int8 export of groupnorm is not "
                              "supported; export fp32 or use batchnorm2d")
        x, _ = self._input(n)
        g, gn = self.g, n.name
        b, h, w, c = g.tensors[x].shape
        groups, eps = n.attrs["num_groups"], n.attrs["eps"]
        grouped = (b, h * w, groups, c // groups)
        stat = (b, 1, groups, 1)

        def t(suffix, shape):
            return g.tensor(_Tensor(f"{gn}.{suffix}", shape, "act", range_of=gn))

        xr = t("grouped", grouped)
        g.op("RESHAPE", [x, g.shape_const(f"{gn}.grouped_shape", [-1, *grouped[1:]])], [xr],
             ("Reshape", {}))
        axes = g.shape_const(f"{gn}.axes", [1, 3])
        mean = t("mean", stat)
        g.op("MEAN", [xr, axes], [mean], ("Reducer", {"keep_dims": True}))
        d = t("centred", grouped)
        g.op("SUB", [xr, mean], [d], ("Sub", {}))
        d2 = t("squared", grouped)
        g.op("MUL", [d, d], [d2], ("Mul", {}))
        var = t("var", stat)
        g.op("MEAN", [d2, axes], [var], ("Reducer", {"keep_dims": True}))
        ve = t("var_eps", stat)
        g.op("ADD", [var, g.const(f"{gn}.eps", np.asarray([eps], np.float32))], [ve],
             ("Add", {}))
        inv = t("invstd", stat)
        g.op("RSQRT", [ve], [inv])
        nrm = t("normalised", grouped)
        g.op("MUL", [d, inv], [nrm], ("Mul", {}))
        back = t("ungrouped", (b, h, w, c))
        g.op("RESHAPE", [nrm, g.shape_const(f"{gn}.shape", [-1, h, w, c])], [back],
             ("Reshape", {}))
        sc = t("scaled", (b, h, w, c))
        g.op("MUL", [back, g.const(f"{gn}.weight", self.state[f"{gn}.weight"])], [sc],
             ("Mul", {}))
        y = self._act(self._tail(gn), (b, h, w, c), gn)
        g.op("ADD", [sc, g.const(f"{gn}.bias", self.state[f"{gn}.bias"])], [y],
             ("Add", {"act": self._act_fn(n)}))
        self.t[gn] = (y, None)


# ---------------------------------------------------------------------- calibration
def calibration_ranges(spec: ModelSpec, state: Mapping[str, np.ndarray], x: np.ndarray,
                       bn_extra: list[str] = (), batch_size: int = 64
                       ) -> dict[str, tuple[float, float]]:
    """Min/max of every node's output (and of ``x * scale`` of each batch norm named in
    ``bn_extra``, keyed ``"<bn>.scaled"``) over the calibration batch, from the Numba layers
    in inference mode."""
    from .network import Network

    net = Network.from_spec(spec, seed=0)
    full = dict(state)
    for k, shape in spec.state_shapes().items():
        if k not in full:
            full[k] = np.zeros(shape, np.int64)
    net.load_state_dict(full)
    net.eval()
    x = net.check_x(x, "calibration data")
    lo: dict[str, float] = {}
    hi: dict[str, float] = {}

    def see(key: str, a: np.ndarray) -> None:
        lo[key] = min(lo.get(key, math.inf), float(a.min()))
        hi[key] = max(hi.get(key, -math.inf), float(a.max()))

    scales = {}
    for bn in bn_extra:
        s = state[f"{bn}.weight"].astype(np.float64) / np.sqrt(
            state[f"{bn}.running_var"].astype(np.float64) + spec[bn].attrs["eps"])
        scales[bn] = s.astype(np.float32)
    def observe(name: str, out: np.ndarray) -> None:
        # (outputs share buffers: each is read as it is made; a batch norm's input is kept)
        see(name, out)
        if name in scales:
            see(f"{name}.scaled", net._outs[spec[name].inputs[0]]
                * scales[name][None, :, None, None])

    net.setup(min(batch_size, x.shape[0]))
    net.timing = False
    for s0 in range(0, x.shape[0], batch_size):
        xb = x[s0:s0 + batch_size]
        see(INPUT, xb)
        net.forward(xb, False, observe=observe)
    return {k: (lo[k], hi[k]) for k in lo}


def _act_qparams(lo: float, hi: float) -> tuple[float, int]:
    """int8 asymmetric scale and zero point for a range (widened to contain 0)."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    if hi - lo < 1e-8:
        hi = lo + 1e-8
    scale = (hi - lo) / 255.0
    zp = int(round(-128 - lo / scale))
    return scale, max(-128, min(127, zp))


def _quantise(g: _Graph, ranges: dict[str, tuple[float, float]]) -> None:
    """Give every tensor an int8/int32 type, quantisation parameters and quantised data."""
    for t in g.tensors:
        if t.kind == "act":
            if t.same_as is not None:
                src = g.tensors[t.same_as]
                t.scale, t.zero_point = src.scale, src.zero_point
            else:
                key = t.extra_range + ".scaled" if t.extra_range else t.range_of
                s, z = _act_qparams(*ranges[key])
                t.scale, t.zero_point = np.array([s]), np.array([z])
            t.dtype = "int8"
        elif t.kind == "weight":
            w = t.data.astype(np.float64)
            if t.axis is None:
                m = np.array([np.abs(w).max()])
            else:
                m = np.abs(np.moveaxis(w, t.axis, 0)).reshape(w.shape[t.axis], -1).max(axis=1)
            m = np.where(m > 0, m, 1.0)
            t.scale = m / 127.0
            t.zero_point = np.zeros(len(m), np.int64)
            shp = [1] * w.ndim
            if t.axis is not None:
                shp[t.axis] = -1
            t.data = np.clip(np.round(w / t.scale.reshape(shp)), -127, 127).astype(np.int8)
            t.dtype = "int8"
        elif t.kind == "bias":
            xi, wi = t.bias_of
            sc = g.tensors[xi].scale[0] * g.tensors[wi].scale
            sc = np.broadcast_to(sc, t.data.shape) if g.tensors[wi].axis is None else sc
            t.scale = np.asarray(sc, np.float64)
            t.zero_point = np.zeros(len(t.scale), np.int64)
            lim = 2 ** 31 - 1
            t.data = np.clip(np.round(t.data / t.scale), -lim, lim).astype(np.int32)
            if g.tensors[wi].axis is None:
                t.scale, t.zero_point = t.scale[:1], t.zero_point[:1]
            t.dtype = "int32"
        elif t.kind == "const":
            d = t.data.astype(np.float64)
            s, z = _act_qparams(float(d.min()), float(d.max()))
            t.scale, t.zero_point = np.array([s]), np.array([z])
            t.data = np.clip(np.round(d / s) + z, -128, 127).astype(np.int8)
            t.dtype = "int8"
        elif t.kind == "lowest":
            src = g.tensors[t.same_as]
            t.scale, t.zero_point = src.scale, src.zero_point
            t.data = np.array([-128], np.int8)
            t.dtype = "int8"
        elif t.kind == "int32":
            t.dtype = "int32"


# ---------------------------------------------------------------------- serialisation
_VERSIONS_INT8 = {"CONV_2D": 3, "DEPTHWISE_CONV_2D": 3, "FULLY_CONNECTED": 4, "ADD": 2,
                  "MUL": 2, "MAX_POOL_2D": 2, "AVERAGE_POOL_2D": 2, "MEAN": 2, "TRANSPOSE": 2,
                  "PAD": 2, "PADV2": 2, "RELU": 2, "QUANTIZE": 2, "DEQUANTIZE": 2}


def _tfl():
    try:
        import flatbuffers
        import tflite
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ExportError("TFLite export needs the 'flatbuffers' and 'tflite' packages "
                          "(pip install 'sparsefl[export]')") from e
    return flatbuffers, tflite


def _int_vector(b, start, values) -> int:
    start(b, len(values))
    for v in reversed(list(values)):
        b.PrependInt32(int(v))
    return b.EndVector()


def _bytes_vector(b, data: bytes) -> int:
    """A ubyte vector whose payload starts on a 16-byte boundary of the file."""
    b.StartVector(1, len(data), _ALIGN)
    b.head = b.head - len(data)
    b.Bytes[b.head:b.head + len(data)] = data
    b.vectorNumElems = len(data)
    return b.EndVector()


def _options(b, T, kind: str, o: dict[str, Any]) -> tuple[int, int]:
    act = getattr(T.ActivationFunctionType, o.get("act", "NONE"))
    pad = getattr(T.Padding, o.get("padding", "VALID"))
    if kind == "Conv2D":
        T.Conv2DOptionsStart(b)
        T.Conv2DOptionsAddPadding(b, pad)
        T.Conv2DOptionsAddStrideH(b, o["stride"][0])
        T.Conv2DOptionsAddStrideW(b, o["stride"][1])
        T.Conv2DOptionsAddFusedActivationFunction(b, act)
        T.Conv2DOptionsAddDilationHFactor(b, 1)
        T.Conv2DOptionsAddDilationWFactor(b, 1)
        off = T.Conv2DOptionsEnd(b)
    elif kind == "DepthwiseConv2D":
        T.DepthwiseConv2DOptionsStart(b)
        T.DepthwiseConv2DOptionsAddPadding(b, pad)
        T.DepthwiseConv2DOptionsAddStrideH(b, o["stride"][0])
        T.DepthwiseConv2DOptionsAddStrideW(b, o["stride"][1])
        T.DepthwiseConv2DOptionsAddDepthMultiplier(b, o["depth_multiplier"])
        T.DepthwiseConv2DOptionsAddFusedActivationFunction(b, act)
        T.DepthwiseConv2DOptionsAddDilationHFactor(b, 1)
        T.DepthwiseConv2DOptionsAddDilationWFactor(b, 1)
        off = T.DepthwiseConv2DOptionsEnd(b)
    elif kind == "Pool2D":
        T.Pool2DOptionsStart(b)
        T.Pool2DOptionsAddPadding(b, pad)
        T.Pool2DOptionsAddStrideH(b, o["stride"][0])
        T.Pool2DOptionsAddStrideW(b, o["stride"][1])
        T.Pool2DOptionsAddFilterHeight(b, o["kernel"][0])
        T.Pool2DOptionsAddFilterWidth(b, o["kernel"][1])
        T.Pool2DOptionsAddFusedActivationFunction(b, act)
        off = T.Pool2DOptionsEnd(b)
    elif kind == "FullyConnected":
        T.FullyConnectedOptionsStart(b)
        T.FullyConnectedOptionsAddFusedActivationFunction(b, act)
        T.FullyConnectedOptionsAddKeepNumDims(b, False)
        off = T.FullyConnectedOptionsEnd(b)
    elif kind in ("Add", "Mul", "Sub"):
        getattr(T, f"{kind}OptionsStart")(b)
        getattr(T, f"{kind}OptionsAddFusedActivationFunction")(b, act)
        off = getattr(T, f"{kind}OptionsEnd")(b)
    elif kind == "Reducer":
        T.ReducerOptionsStart(b)
        T.ReducerOptionsAddKeepDims(b, o["keep_dims"])
        off = T.ReducerOptionsEnd(b)
    else:  # option tables without fields
        getattr(T, f"{kind}OptionsStart")(b)
        off = getattr(T, f"{kind}OptionsEnd")(b)
    return getattr(T.BuiltinOptions, f"{kind}Options"), off


def _serialise(g: _Graph, inputs: list[int], outputs: list[int], description: str,
               int8: bool) -> bytes:
    flatbuffers, T = _tfl()
    b = flatbuffers.Builder(1 << 16)
    # buffers: 0 is the empty sentinel; every constant tensor gets its own
    buf_of: dict[int, int] = {}
    datas: list[bytes] = [b""]
    for i, t in enumerate(g.tensors):
        if t.data is not None:
            arr = t.data.astype({"float32": np.float32, "int8": np.int8,
                                 "int32": np.int32}[t.dtype])
            buf_of[i] = len(datas)
            datas.append(np.ascontiguousarray(arr).astype(arr.dtype.newbyteorder("<")).tobytes())
        else:
            buf_of[i] = 0  # activations point at the empty buffer 0
    buf_offs = []
    for d in datas:
        dv = _bytes_vector(b, d) if d else None
        T.BufferStart(b)
        if dv is not None:
            T.BufferAddData(b, dv)
        buf_offs.append(T.BufferEnd(b))
    # tensors
    ttype = {"float32": T.TensorType.FLOAT32, "int8": T.TensorType.INT8,
             "int32": T.TensorType.INT32}
    tens = []
    for i, t in enumerate(g.tensors):
        name = b.CreateString(t.name)
        shape = _int_vector(b, T.TensorStartShapeVector, t.shape)
        sig = None
        if i in inputs or i in outputs:
            sig = _int_vector(b, T.TensorStartShapeSignatureVector, (-1, *t.shape[1:]))
        q = None
        if t.scale is not None:
            sv = b.CreateNumpyVector(np.asarray(t.scale, np.float32))
            zv = b.CreateNumpyVector(np.asarray(t.zero_point, np.int64))
            T.QuantizationParametersStart(b)
            T.QuantizationParametersAddScale(b, sv)
            T.QuantizationParametersAddZeroPoint(b, zv)
            axis = t.axis if (t.kind == "weight" and t.axis is not None) else 0
            T.QuantizationParametersAddQuantizedDimension(b, axis)
            q = T.QuantizationParametersEnd(b)
        T.TensorStart(b)
        T.TensorAddShape(b, shape)
        if sig is not None:
            T.TensorAddShapeSignature(b, sig)
        T.TensorAddType(b, ttype[t.dtype])
        T.TensorAddBuffer(b, buf_of[i])
        T.TensorAddName(b, name)
        if q is not None:
            T.TensorAddQuantization(b, q)
        tens.append(T.TensorEnd(b))
    # operator codes
    codes = list(dict.fromkeys(op.code for op in g.ops))
    code_offs = []
    for c in codes:
        num = getattr(T.BuiltinOperator, c)
        T.OperatorCodeStart(b)
        T.OperatorCodeAddDeprecatedBuiltinCode(b, min(num, 127))
        T.OperatorCodeAddBuiltinCode(b, num)
        T.OperatorCodeAddVersion(b, _VERSIONS_INT8.get(c, 1) if int8 else 1)
        code_offs.append(T.OperatorCodeEnd(b))
    # operators
    op_offs = []
    for op in g.ops:
        iv = _int_vector(b, T.OperatorStartInputsVector, op.inputs)
        ov = _int_vector(b, T.OperatorStartOutputsVector, op.outputs)
        opt = _options(b, T, *op.options) if op.options else None
        T.OperatorStart(b)
        T.OperatorAddOpcodeIndex(b, codes.index(op.code))
        T.OperatorAddInputs(b, iv)
        T.OperatorAddOutputs(b, ov)
        if opt is not None:
            T.OperatorAddBuiltinOptionsType(b, opt[0])
            T.OperatorAddBuiltinOptions(b, opt[1])
        op_offs.append(T.OperatorEnd(b))

    def vec(start, offs):
        start(b, len(offs))
        for o in reversed(offs):
            b.PrependUOffsetTRelative(o)
        return b.EndVector()

    tv = vec(T.SubGraphStartTensorsVector, tens)
    iv = _int_vector(b, T.SubGraphStartInputsVector, inputs)
    ov = _int_vector(b, T.SubGraphStartOutputsVector, outputs)
    opv = vec(T.SubGraphStartOperatorsVector, op_offs)
    sname = b.CreateString("main")
    T.SubGraphStart(b)
    T.SubGraphAddTensors(b, tv)
    T.SubGraphAddInputs(b, iv)
    T.SubGraphAddOutputs(b, ov)
    T.SubGraphAddOperators(b, opv)
    T.SubGraphAddName(b, sname)
    sg = T.SubGraphEnd(b)

    def tmaps(idx):
        offs = []
        for i in idx:
            nm = b.CreateString(g.tensors[i].name)
            T.TensorMapStart(b)
            T.TensorMapAddName(b, nm)
            T.TensorMapAddTensorIndex(b, i)
            offs.append(T.TensorMapEnd(b))
        return offs

    sin = vec(T.SignatureDefStartInputsVector, tmaps(inputs))
    sout = vec(T.SignatureDefStartOutputsVector, tmaps(outputs))
    skey = b.CreateString("serving_default")
    T.SignatureDefStart(b)
    T.SignatureDefAddInputs(b, sin)
    T.SignatureDefAddOutputs(b, sout)
    T.SignatureDefAddSignatureKey(b, skey)
    T.SignatureDefAddSubgraphIndex(b, 0)
    sdef = T.SignatureDefEnd(b)

    codev = vec(T.ModelStartOperatorCodesVector, code_offs)
    sgv = vec(T.ModelStartSubgraphsVector, [sg])
    bufv = vec(T.ModelStartBuffersVector, buf_offs)
    sdv = vec(T.ModelStartSignatureDefsVector, [sdef])
    desc = b.CreateString(description)
    T.ModelStart(b)
    T.ModelAddVersion(b, SCHEMA_VERSION)
    T.ModelAddOperatorCodes(b, codev)
    T.ModelAddSubgraphs(b, sgv)
    T.ModelAddDescription(b, desc)
    T.ModelAddBuffers(b, bufv)
    T.ModelAddSignatureDefs(b, sdv)
    model = T.ModelEnd(b)
    b.Finish(model, file_identifier=FILE_IDENTIFIER)
    return bytes(b.Output())


# ---------------------------------------------------------------------- public API
def export_tflite(spec: ModelSpec, state: Mapping[str, Any], *, int8: bool = False,
                  calib: np.ndarray | None = None, int8_io: bool = False,
                  batch: int = 1) -> bytes:
    """The ``.tflite`` flatbuffer of ``spec`` with weights ``state`` (torch names).

    ``int8``: full-integer quantisation calibrated on ``calib`` (NCHW float, a few hundred
    representative training inputs). ``int8_io``: int8 input/output tensors instead of float.
    ``batch``: the batch dimension written into the model (resizable at run time).
    """
    if not isinstance(spec, ModelSpec):
        raise TypeError(f"export_tflite: expected a hwmodel.ModelSpec, got {type(spec).__name__}")
    if isinstance(batch, bool) or not isinstance(batch, int) or not 1 <= batch <= 65536:
        raise ExportError(f"batch: expected an integer in [1, 65536], got {batch!r}")
    if int8_io and not int8:
        raise ExportError("int8_io needs int8=True")
    st = check_state(spec, state)
    builder = _Builder(spec, st, batch, int8)
    g, x, y = builder.build()
    if not int8:
        return _serialise(g, [x], [y], f"sparsefl {spec.name} fp32", False)
    if calib is None:
        raise ExportError("int8 export needs calibration data (calib: NCHW inputs)")
    calib = np.asarray(calib)
    want = spec.input_shape
    if calib.ndim != 1 + len(want) or tuple(calib.shape[1:]) != want or calib.shape[0] < 1:
        raise ExportError(f"calibration data: expected shape (N, {', '.join(map(str, want))}) "
                          f"(NCHW, like the training data), got {calib.shape}")
    ranges = calibration_ranges(spec, st, calib, builder.bn_extra)
    _quantise(g, ranges)
    if int8_io:
        return _serialise(g, [x], [y], f"sparsefl {spec.name} int8", True)
    # float interface: input (float) -QUANTIZE-> input_int8 ... logits_int8 -DEQUANTIZE-> logits
    tx, ty = g.tensors[x], g.tensors[y]
    xq = len(g.tensors)
    g.tensors.append(_Tensor("input_int8", tx.shape, "act", dtype="int8", scale=tx.scale,
                             zero_point=tx.zero_point))
    for op in g.ops:
        op.inputs = [xq if i == x else i for i in op.inputs]
    tx.dtype, tx.scale, tx.zero_point = "float32", None, None
    ty.name = "logits_int8"
    yf = len(g.tensors)
    g.tensors.append(_Tensor("logits", ty.shape, "act", dtype="float32"))
    g.ops.insert(0, _Op("QUANTIZE", [x], [xq]))
    g.ops.append(_Op("DEQUANTIZE", [y], [yf]))
    return _serialise(g, [x], [yf], f"sparsefl {spec.name} int8", True)


def write_tflite(path: str | os.PathLike, data: bytes) -> None:
    """Write the flatbuffer atomically (a temporary file renamed into place)."""
    tmp = f"{os.fspath(path)}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
