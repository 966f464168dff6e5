"""Counts: MACs, FLOPs, bytes and memory per layer and training phase, dense and sparse.

``count(spec, plan=None, batch=1)`` returns a pandas DataFrame with one row per node of the
ModelSpec and phase (``forward``, ``backward_input``, ``backward_weight``, ``update``; see
:data:`hwmodel.measure.PHASES`), plus one ``loss`` row (softmax cross-entropy) per phase.

Conventions (printed beside numbers by the CLI, see :data:`FLOPS_CONVENTION`)
-------------------------------------------------------------------------------
* ``macs`` are the multiply-accumulates of conv2d/linear layers (what fvcore and ptflops
  report, and what the builders are pinned by). One MAC = 2 FLOPs.
* ``elem_flops`` are elementwise operations (one FLOP per add, multiply, compare or select):
  batch norm, group norm, relu, pools, add, dropout, bias adds, the loss, the optimizer update,
  and the sparse book-keeping (top-K selection, building compressed weights/activations).
  ``topk_flops`` and ``compress_flops`` (one per element scanned) are the book-keeping part of
  ``elem_flops``; ``compress_nnz`` counts the non-zeros the compression writes (the kept
  weights of ``W_s`` plus the kept saved-input values), which the cost model may charge apart.
* ``flops = 2 * macs + elem_flops``. For a conv/linear row without bias and without sparse
  book-keeping this is exactly ``2 * macs``.
* Bytes assume fp32 tensors (4 bytes) and int32 indices; each phase reads its inputs once and
  writes its outputs once (no cache model: the roofline in :mod:`hwmodel.estimator` uses these).

Sparse modes (see ../shared/ALGORITHMS.md and :mod:`hwmodel.plan`), per sparse conv/linear layer
with weight density ``d_w`` and activation density ``d_a``:

* ``swat`` — forward and backward-input MACs scale with ``d_w`` (they use the top-K weights
  ``W_s``), backward-weight MACs with ``d_a`` (top-K of the saved input); the weight gradient,
  the momentum and the update stay dense (SGD updates the dense ``W``). Per step the layer pays
  the threshold pass that builds ``W_s`` in CSR from the dense ``W`` and the compressed saved
  input; every ``topk_period`` steps it pays an exact top-K selection (amortised per step:
  :data:`TOPK_FLOPS_PER_ELEMENT` × elements / ``topk_period``).
* ``masked`` — a fixed mask (FedDST, FLASH): the weights live in CSR, all three phases scale
  with ``d_w`` (the weight gradient is only computed inside the mask), gradients, momentum
  and the update are ``nnz``-sized; no top-K; activations are saved dense.
* A layer at density 1 is dense: no selection, no compression, dense storage. So sparse counts
  at density 1 equal dense counts.

A ReLU the trainer folds into the batch norm or residual add before it
(:meth:`hwmodel.spec.ModelSpec.fused_relus`) has rows without work: its compare rides on that
node's own pass and its mask is that node's output.

Where memory sits: every memory column is attributed to the phase that creates it, so a column
summed over the frame is the model total: ``param_bytes``, ``compressed_weight_bytes``,
``saved_act_bytes`` and ``buffer_bytes`` on ``forward`` rows, ``grad_bytes`` on
``backward_weight`` rows, ``optim_bytes`` on ``update`` rows. ``work_bytes`` is the transient
working set of the phase (its dense input and output tensors); the peak takes its maximum.
``params``, ``weight_density``, ``act_density``, ``csr_bytes`` and ``bitmap_bytes`` describe the
layer and repeat on each of its rows (sum them over one phase only).

Sparse storage of a weight with ``nnz`` non-zeros: CSR with rows = output channels/features,
``(rows + 1)`` int32 row pointers + ``nnz`` int32 column indices + ``nnz`` fp32 values (what
``scipy.sparse.csr_matrix(..., dtype=float32)`` with int32 indices holds); bitmap = one bit per
weight (``ceil(numel / 8)`` bytes, ``numpy.packbits``) + ``nnz`` fp32 values. Saved activations
under SWAT are stored as bitmap + values. Below density 1, ``nnz = floor(density * numel + 0.5)``
clipped to [1, numel], as the trainer's top-K counts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd

from .measure import PHASES
from .models import load_model
from .plan import SparsityPlan
from .spec import INPUT, ModelSpec, Node

FLOPS_CONVENTION = (
    "FLOPs = 2 x MACs (fvcore/ptflops report MACs); conv/linear MACs x 2 plus elementwise "
    "ops (BN, relu, pool, add, bias, loss, optimizer, top-K) at 1 FLOP each"
)

F32 = 4  # bytes per fp32 value
IDX = 4  # bytes per int32 index

#: Exact top-K (introselect on |x|) costs about this many FLOPs per element per refresh.
TOPK_FLOPS_PER_ELEMENT = 4.0

#: Optimizer: FLOPs per updated parameter, and state buffers per parameter.
OPTIMIZERS: dict[str, tuple[float, int]] = {
    # g += wd*w; w -= lr*g
    "sgd": (4.0, 0),
    # g += wd*w; v = mu*v + g; w -= lr*v
    "sgd_momentum": (6.0, 1),
    # m, v moments, bias correction, sqrt, divide
    "adam": (12.0, 2),
}

#: Elementwise ops: FLOPs per element of (forward, backward_input, backward_weight) and which
#: tensor the element count refers to ("in" or "out").
_ELEM = {
    "relu": (1.0, 1.0, 0.0),
    "dropout": (2.0, 1.0, 0.0),
    # batch statistics (sum, sum of squares), normalise, scale and shift
    "batchnorm2d": (7.0, 7.0, 3.0),
    "groupnorm": (7.0, 7.0, 3.0),
    "add": (1.0, 1.0, 0.0),  # backward: the fan-out gradient sum
    "global_avgpool": (1.0, 1.0, 0.0),
    "flatten": (0.0, 0.0, 0.0),
}

#: Columns of the frame, in order.
COLUMNS = (
    "layer", "type", "phase", "op_class", "macs", "dense_macs", "density", "elem_flops",
    "topk_flops", "compress_flops", "compress_nnz", "flops", "bytes_read", "bytes_written", "params",
    "weight_density", "act_density", "param_bytes", "compressed_weight_bytes", "grad_bytes",
    "optim_bytes", "saved_act_bytes", "buffer_bytes", "work_bytes", "csr_bytes", "bitmap_bytes",
)


def op_class(op: str) -> str:
    """The profile efficiency class of an op: conv, gemm or elementwise."""
    return {"conv2d": "conv", "linear": "gemm"}.get(op, "elementwise")


def nnz_at(numel: int, density: float) -> int:
    """Non-zeros kept at ``density``: ``floor(density * numel + 0.5)`` clipped to [1, numel],
    the count the trainer's top-K keeps (``embedded.kernels.topk.count_for_density``)."""
    if density >= 1.0:
        return int(numel)
    return max(1, min(int(numel), int(math.floor(density * numel + 0.5))))


def csr_nbytes(rows: int, nnz: int) -> int:
    """CSR bytes: (rows + 1) int32 pointers, nnz int32 column indices, nnz fp32 values."""
    return (rows + 1) * IDX + nnz * (IDX + F32)


def bitmap_nbytes(numel: int, nnz: int) -> int:
    """Bitmap bytes: one bit per element plus nnz fp32 values."""
    return (numel + 7) // 8 + nnz * F32


@dataclass(frozen=True)
class _Layer:
    """Per-sample sizes of one node."""

    node: Node
    n_in: int
    n_out: int
    weight: int  # numel of the weight (conv/linear), 0 otherwise
    rows: int  # weight rows (output channels/features)
    bias: int
    other_params: int  # BN/GN affine
    buffers: int  # BN running stats (elements)
    macs: int  # forward MACs per sample (conv/linear)
    reads_input: bool  # the node reads the network input (no backward-input needed)


def _layer(spec: ModelSpec, node: Node) -> _Layer:
    ins = spec.in_shapes[node.name]
    n_in = math.prod(ins[0]) * (2 if node.op == "add" else 1)
    out = spec.shapes[node.name]
    n_out = math.prod(out)
    pshapes = spec.param_shapes(node.name)
    weight = rows = bias = other = macs = buffers = 0
    if node.op in ("conv2d", "linear"):
        w = pshapes[f"{node.name}.weight"]
        weight, rows = math.prod(w), w[0]
        bias = math.prod(pshapes.get(f"{node.name}.bias", (0,)))
        # each output element: one MAC per weight of its filter (in/groups x kh x kw)
        macs = n_out * (weight // rows) if node.op == "conv2d" else weight
    else:
        other = sum(math.prod(s) for s in pshapes.values())
        if node.op == "batchnorm2d":
            buffers = 2 * ins[0][0] + 2  # running mean/var + an int64 counter (2 words)
    return _Layer(node, n_in, n_out, weight, rows, bias, other, buffers, macs,
                  INPUT in node.inputs)


def _empty(name: str, typ: str, phase: str, params: int, wd: float, ad: float) -> dict:
    row = dict.fromkeys(COLUMNS, 0.0)
    row.update(layer=name, type=typ, phase=phase, op_class=op_class(typ), density=1.0,
               params=params, weight_density=wd, act_density=ad)
    return row


def _weighted_rows(L: _Layer, plan: SparsityPlan, B: int, opt: str) -> list[dict]:
    node = L.node
    name = node.name
    mode = plan.mode
    sparse = plan.is_sparse(name) and mode in ("swat", "masked")
    wd = plan.weight_density(name) if sparse else 1.0
    ad = plan.act_density(name) if sparse else 1.0
    if mode == "masked":
        ad = 1.0  # masked training saves dense activations
    period = plan.layers[name].topk_period if sparse else 1
    params = L.weight + L.bias
    nnz_w = nnz_at(L.weight, wd)
    csr = csr_nbytes(L.rows, nnz_w)
    bmp = bitmap_nbytes(L.weight, nnz_w)
    w_sparse = wd < 1.0
    # weights as the kernels read them: CSR when sparse, dense otherwise
    w_read = (csr if w_sparse else L.weight * F32) + L.bias * F32
    x = B * L.n_in  # input elements of the batch
    y = B * L.n_out
    a_sparse = mode == "swat" and ad < 1.0
    nnz_a = nnz_at(x, ad)
    saved = bitmap_nbytes(x, nnz_a) if a_sparse else x * F32
    bw_density = ad if mode == "swat" else wd
    rows = {p: _empty(name, node.op, p, params, wd, ad) for p in PHASES}
    for r in rows.values():
        r["csr_bytes"], r["bitmap_bytes"] = float(csr), float(bmp)

    # ---- forward (with the sparse book-keeping that precedes and follows it)
    f = rows["forward"]
    topk = compress = compress_nnz = 0.0
    extra_read = extra_written = 0.0
    if mode == "swat" and w_sparse:
        topk += TOPK_FLOPS_PER_ELEMENT * L.weight / period
        compress += L.weight  # threshold pass over the dense W, writes W_s in CSR
        compress_nnz += nnz_w
        extra_read += L.weight * F32 * (1.0 + 1.0 / period)
        extra_written += csr
    if a_sparse:
        topk += TOPK_FLOPS_PER_ELEMENT * x / period
        compress += x  # threshold pass over the input, writes the compressed saved copy
        compress_nnz += nnz_a
        extra_read += x * F32 * (1.0 + 1.0 / period)
        extra_written += saved
    f["dense_macs"] = float(B * L.macs)
    f["density"] = wd
    f["macs"] = B * L.macs * wd
    f["topk_flops"], f["compress_flops"], f["compress_nnz"] = topk, compress, compress_nnz
    f["elem_flops"] = (y if L.bias else 0) + topk + compress
    f["bytes_read"] = x * F32 + w_read + extra_read
    f["bytes_written"] = y * F32 + extra_written
    if mode == "masked" and w_sparse:
        f["param_bytes"] = float(csr + L.bias * F32)
    else:
        f["param_bytes"] = float(params * F32)
    f["compressed_weight_bytes"] = float(csr) if (mode == "swat" and w_sparse) else 0.0
    f["saved_act_bytes"] = float(saved)
    f["work_bytes"] = float((x + y) * F32)

    # ---- backward-input: grad_x = layer_bwd_input(grad_y, W_s); none for the first layer
    bi = rows["backward_input"]
    if not L.reads_input:
        bi["dense_macs"] = float(B * L.macs)
        bi["density"] = wd
        bi["macs"] = B * L.macs * wd
        bi["bytes_read"] = y * F32 + w_read
        bi["bytes_written"] = x * F32
        bi["work_bytes"] = float((x + y) * F32)

    # ---- backward-weight: grad_W from grad_y and the saved (possibly sparse) input
    bw = rows["backward_weight"]
    bw["dense_macs"] = float(B * L.macs)
    bw["density"] = bw_density
    bw["macs"] = B * L.macs * bw_density
    bw["elem_flops"] = float(y if L.bias else 0)
    grad_w = nnz_w if mode == "masked" else L.weight
    bw["bytes_read"] = y * F32 + saved
    bw["bytes_written"] = (grad_w + L.bias) * F32
    bw["grad_bytes"] = float((grad_w + L.bias) * F32)
    bw["work_bytes"] = float(y * F32 + saved)

    _update_row(rows["update"], grad_w + L.bias, opt)
    return list(rows.values())


def _update_row(u: dict, n: int, opt: str) -> None:
    flops_per, nbuf = OPTIMIZERS[opt]
    u["elem_flops"] = flops_per * n
    u["bytes_read"] = float(n * F32 * (2 + nbuf))  # w, g, state
    u["bytes_written"] = float(n * F32 * (1 + nbuf))
    u["optim_bytes"] = float(n * F32 * nbuf)


def node_channels(L: _Layer) -> int:
    """Channels of a norm layer (its affine parameters are 2 x channels)."""
    return L.other_params // 2


def _elementwise_rows(L: _Layer, B: int, opt: str) -> list[dict]:
    node = L.node
    op = node.op
    params = L.other_params
    rows = {p: _empty(node.name, op, p, params, 1.0, 1.0) for p in PHASES}
    x, y = B * L.n_in, B * L.n_out
    f, bi, bw = rows["forward"], rows["backward_input"], rows["backward_weight"]
    if op in ("maxpool2d", "avgpool2d"):
        kh, kw = node.attrs["kernel"]
        f["elem_flops"] = float(y * kh * kw)
        bi["elem_flops"] = float(x + y)  # zero-fill grad_x, scatter/spread grad_y
        # maxpool keeps the argmax (int32) per output; avgpool keeps nothing
        saved = y * IDX if op == "maxpool2d" else 0
    else:
        ef, eb, ew = _ELEM[op]
        n = y if op == "add" else x  # add: one op per output element
        f["elem_flops"], bi["elem_flops"], bw["elem_flops"] = ef * n, eb * n, ew * n
        if op == "batchnorm2d":
            saved = x * F32 + 2 * node_channels(L) * F32  # x, per-channel mean and invstd
        elif op == "groupnorm":
            saved = x * F32 + 2 * B * node.attrs["num_groups"] * F32
        elif op in ("relu", "dropout"):
            saved = x  # one byte per element (mask)
        else:
            saved = 0
    if op == "flatten":  # a view: no work, no bytes
        return list(rows.values())
    bn = op in ("batchnorm2d", "groupnorm")
    f["bytes_read"] = float(x * F32 * (2 if bn else 1) + params * F32)
    # BN/GN keep their input (already in memory) and write only the statistics
    f["bytes_written"] = float(y * F32 + (saved - x * F32 if bn else saved))
    f["saved_act_bytes"] = float(saved)
    f["param_bytes"] = float(params * F32)
    f["buffer_bytes"] = float(L.buffers * F32)
    f["work_bytes"] = float((x + y) * F32)
    if op == "add":  # the gradient passes to both inputs; the fan-out sum reads/writes y
        bi["bytes_read"] = float(2 * y * F32)
        bi["bytes_written"] = float(y * F32)
        bi["work_bytes"] = float(2 * y * F32)
    else:
        bi["bytes_read"] = float(y * F32 + saved + params * F32)
        bi["bytes_written"] = float(x * F32)
        bi["work_bytes"] = float((x + y) * F32)
    if L.reads_input:
        bi["elem_flops"] = 0.0
        bi["bytes_read"] = bi["bytes_written"] = bi["work_bytes"] = 0.0
    if bn:
        bw["bytes_read"] = float(y * F32 + saved)
        bw["bytes_written"] = float(params * F32)
        bw["grad_bytes"] = float(params * F32)
        bw["work_bytes"] = float(y * F32 + saved)
        _update_row(rows["update"], params, opt)
    return list(rows.values())


def _loss_rows(spec: ModelSpec, B: int) -> list[dict]:
    k = B * spec.num_classes
    rows = {p: _empty("loss", "cross_entropy", p, 0, 1.0, 1.0) for p in PHASES}
    f, bi = rows["forward"], rows["backward_input"]
    f["elem_flops"] = 5.0 * k  # max, subtract, exp, sum, log/pick
    f["bytes_read"] = float(k * F32 + B * 8)  # logits + int64 labels
    f["bytes_written"] = float(k * F32)
    f["saved_act_bytes"] = float(k * F32)  # softmax probabilities
    f["work_bytes"] = float(2 * k * F32)
    bi["elem_flops"] = 2.0 * k  # (p - onehot) / B
    bi["bytes_read"] = float(k * F32 + B * 8)
    bi["bytes_written"] = float(k * F32)
    bi["work_bytes"] = float(2 * k * F32)
    return list(rows.values())


def _resolve(spec: ModelSpec | str, plan: SparsityPlan | None, batch: int,
             optimizer: str) -> tuple[ModelSpec, SparsityPlan]:
    if isinstance(spec, str):
        spec = load_model(spec)
    if not isinstance(spec, ModelSpec):
        raise TypeError(f"spec: expected a ModelSpec or a model name, got {type(spec).__name__}")
    plan = SparsityPlan.dense() if plan is None else plan
    if not isinstance(plan, SparsityPlan):
        raise TypeError(f"plan: expected a SparsityPlan or None, got {type(plan).__name__}")
    plan.check(spec)
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch: expected an integer >= 1, got {batch!r}")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer: expected one of {', '.join(OPTIMIZERS)}, got {optimizer!r}")
    return spec, plan


def count_rows(spec: ModelSpec | str, plan: SparsityPlan | None = None, batch: int = 1,
               optimizer: str = "sgd_momentum") -> list[dict]:
    """The rows of :func:`count` as plain dicts (cheaper than a DataFrame)."""
    spec, plan = _resolve(spec, plan, batch, optimizer)
    rows: list[dict] = []
    fused = set(spec.fused_relus())
    for node in spec.nodes:
        L = _layer(spec, node)
        if node.name in fused:
            rows.extend(_empty(node.name, node.op, p, 0, 1.0, 1.0) for p in PHASES)
        elif node.op in ("conv2d", "linear"):
            rows.extend(_weighted_rows(L, plan, batch, optimizer))
        else:
            rows.extend(_elementwise_rows(L, batch, optimizer))
    rows.extend(_loss_rows(spec, batch))
    for r in rows:
        r["flops"] = 2.0 * r["macs"] + r["elem_flops"]
    return rows


def count(spec: ModelSpec | str, plan: SparsityPlan | None = None, batch: int = 1,
          optimizer: str = "sgd_momentum") -> pd.DataFrame:
    """Per layer and phase counts of one training step at ``batch`` (see the module docstring).

    ``spec`` is a ModelSpec or a builder name; ``plan`` a SparsityPlan (``None``: dense).
    FLOPs = 2 x MACs for conv/linear (fvcore/ptflops report MACs); ``flops = 2*macs + elem_flops``.
    """
    df = pd.DataFrame(count_rows(spec, plan, batch, optimizer), columns=list(COLUMNS))
    df.attrs["flops_convention"] = FLOPS_CONVENTION
    df.attrs["batch"] = batch
    return df


def memory_breakdown(rows: list[dict] | pd.DataFrame, input_bytes: float) -> dict[str, float]:
    """Resident memory of a training step from count rows: the parts and the peak.

    peak = parameters + compressed weight copies + gradients + optimizer state + buffers
    + activations saved for backward + the input batch + the largest transient working set.
    """
    if isinstance(rows, pd.DataFrame):
        rows = rows.to_dict("records")
    keys = ("param_bytes", "compressed_weight_bytes", "grad_bytes", "optim_bytes",
            "buffer_bytes", "saved_act_bytes")
    out = {k: float(sum(r[k] for r in rows)) for k in keys}
    out["input_bytes"] = float(input_bytes)
    out["work_bytes"] = float(max((r["work_bytes"] for r in rows), default=0.0))
    out["peak_memory_bytes"] = float(sum(out.values()))
    return out


def peak_memory_bytes(spec: ModelSpec | str, plan: SparsityPlan | None = None, batch: int = 1,
                      optimizer: str = "sgd_momentum") -> int:
    """Peak working memory (bytes) of one training step at ``batch``; see :func:`memory_breakdown`."""
    spec, plan = _resolve(spec, plan, batch, optimizer)
    rows = count_rows(spec, plan, batch, optimizer)
    # the input batch (fp32) and its int64 labels
    input_bytes = batch * (math.prod(spec.input_shape) * F32 + 8)
    return int(round(memory_breakdown(rows, input_bytes)["peak_memory_bytes"]))
