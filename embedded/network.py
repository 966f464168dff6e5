"""The Numba network: a ModelSpec's DAG of layers, run forward and backward.

``Network.from_spec(spec, seed)`` builds one layer object per node (conv2d/linear from
``embedded.layers.conv``/``linear``, the rest from H4's layer modules), initialises the
parameters like torch, and preallocates every buffer for the largest batch seen
(:meth:`Network.setup`). A step allocates nothing: layers return views of their buffers, a
smaller batch uses leading slices, and gradients of a node read by several consumers (a
ResNet block input feeds both the block and its shortcut) are summed into a preallocated
buffer in a fixed order. Results are bitwise reproducible for a seed and thread count.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

import numpy as np

from hwmodel.plan import SparsityPlan
from hwmodel.spec import INPUT, ModelSpec

from .kernels.elementwise import ACC, ADD_FWD, all_finite, pick
from .kernels.loss import softmax_xent, xent_and_correct
from .layers.activation import ReLU
from .layers.norm import BatchNorm2d, GroupNorm
from .layers.pool import AvgPool2d, GlobalAvgPool, MaxPool2d
from .layers.shape import Add, Dropout, Flatten

_H4_LAYERS = {
    "batchnorm2d": BatchNorm2d,
    "groupnorm": GroupNorm,
    "relu": ReLU,
    "maxpool2d": MaxPool2d,
    "avgpool2d": AvgPool2d,
    "global_avgpool": GlobalAvgPool,
    "flatten": Flatten,
    "add": Add,
    "dropout": Dropout,
}


class TrainingDiverged(FloatingPointError):
    """The loss became NaN or infinite; the message names the step and the first layer
    whose output was non-finite."""


def layer_class(op: str):
    """The layer class of a node op (conv2d/linear imported lazily from H5's modules)."""
    if op == "conv2d":
        from .layers.conv import Conv2d

        return Conv2d
    if op == "linear":
        from .layers.linear import Linear

        return Linear
    try:
        return _H4_LAYERS[op]
    except KeyError:
        raise ValueError(f"no Numba layer for op {op!r}") from None


def _owner(a: np.ndarray) -> np.ndarray:
    while isinstance(a.base, np.ndarray):
        a = a.base
    return a


class Network:
    """A trainable Numba network built from a :class:`hwmodel.ModelSpec`."""

    def __init__(self, spec: ModelSpec, layers: dict, seed: int = 0, fuse_relu: bool = True):
        self.spec = spec
        self.layers = layers
        self.seed = seed
        self.training = True
        self.timing = True
        self.plan: SparsityPlan = SparsityPlan.dense()
        self.modes: dict[str, str] = {n: "dense" for n in spec.weighted_layers()}
        self.max_batch = 0
        self.nodes = list(spec.nodes)
        consumers = spec.consumers()
        self._n_consumers = {k: len(v) for k, v in consumers.items()}
        # A node needs backward if it or any ancestor holds parameters.
        req: dict[str, bool] = {INPUT: False}
        for node in self.nodes:
            req[node.name] = bool(layers[node.name].params) or any(req[s] for s in node.inputs)
        self._requires_grad = req
        self._need_in = {n.name: any(req[s] for s in n.inputs) for n in self.nodes}
        self._backward_walk = self._walk_backward()
        self._outs: dict[str, np.ndarray] = {}
        self._gacc: dict[str, np.ndarray] = {}
        # last step's per-node timings: name -> {phase: seconds}
        self.times: dict[str, dict[str, float]] = {n.name: {} for n in self.nodes}
        self.loss_time = 0.0  # seconds of the fused loss + gradient of the last step
        self.fused_relus = self._fuse_relus() if fuse_relu else []
        self.reseed(seed)

    def _fuse_relus(self) -> list[str]:
        """Fold the ReLUs of :meth:`hwmodel.spec.ModelSpec.fused_relus` (input from a batch
        norm or a residual add that nothing else reads) into that layer: it writes max(y, 0)
        and masks its own backward by y > 0 (the same floats, one pass fewer each way; the
        cost model counts no pass for them either). Returns the fused ReLUs' names."""
        fused = self.spec.fused_relus()
        for name in fused:
            producer = self.layers[self.spec[name].inputs[0]]
            assert isinstance(producer, (BatchNorm2d, Add)), name
            producer.relu = True
            self.layers[name].fused = True
        return fused

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_spec(cls, spec: ModelSpec, seed: int = 0, fuse_relu: bool = True) -> Network:
        """Build layers for every node and initialise parameters (torch's default init) from
        ``np.random.default_rng(seed)``, node by node in spec order. ``fuse_relu``: fold
        ReLUs into the batch norm / residual add before them (:meth:`_fuse_relus`; results
        are bit-for-bit the same either way)."""
        if not isinstance(spec, ModelSpec):
            raise TypeError(f"Network.from_spec: expected a hwmodel.ModelSpec, got "
                            f"{type(spec).__name__}")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"Network.from_spec: seed must be a non-negative int, got {seed!r}")
        layers = {}
        rng = np.random.default_rng(int(seed))
        for node in spec.nodes:
            layer = layer_class(node.op)(node, spec.in_shapes[node.name], spec.shapes[node.name])
            layer.init_params(rng)
            layers[node.name] = layer
        return cls(spec, layers, int(seed), fuse_relu=bool(fuse_relu))

    def reseed(self, seed: int) -> None:
        """Restart the random streams of dropout layers (one independent stream per node)."""
        ss = np.random.SeedSequence(int(seed))
        kids = ss.spawn(len(self.nodes))
        for node, kid in zip(self.nodes, kids, strict=True):
            layer = self.layers[node.name]
            if isinstance(layer, Dropout):
                layer.reseed(kid)

    def setup(self, max_batch: int) -> None:
        """Preallocate every layer's and the network's buffers for batches up to ``max_batch``;
        the layers' outputs and input gradients end up in buffers shared by liveness
        (``out_slots`` and ``grad_slots`` of them: :meth:`_share_out_buffers`,
        :meth:`_share_grad_buffers`)."""
        max_batch = int(max_batch)
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        for node in self.nodes:
            self.layers[node.name].setup(max_batch)
        self._gacc = {
            name: np.empty((max_batch, *self.spec.shapes[name]), np.float32)
            for name, k in self._n_consumers.items()
            if name != INPUT and k > 1 and self._requires_grad[name]
        }
        self._glogits = np.empty((max_batch, self.spec.num_classes), np.float32)
        self.max_batch = max_batch
        self.out_slots = self._share_out_buffers()
        self.grad_slots = self._share_grad_buffers()

    def _walk_backward(self) -> list[tuple[str, list[str | None]]]:
        """The backward's walk, fixed by the graph: in order, each node whose backward runs
        and the nodes whose input gradients it receives, in the order they were produced
        (``None``: the loss gradient; a consumer reading the node twice appears twice)."""
        walk = []
        feeders: dict[str, list[str | None]] = {self.nodes[-1].name: [None]}
        for node in reversed(self.nodes):
            name = node.name
            if not self._requires_grad[name] or name not in feeders:
                continue
            walk.append((name, feeders.pop(name)))
            if not self._need_in[name]:
                continue
            for src in node.inputs:
                if src != INPUT and self._requires_grad[src]:
                    feeders.setdefault(src, []).append(name)
        return walk

    def _grad_spans(self) -> dict[str, list[int]]:
        """For each layer whose backward writes its own input-gradient buffer: [the backward
        call (position in :meth:`_walk_backward`) that writes it, the last one that reads
        it] (a gradient passed through a flatten or a fused ReLU stays the same buffer; two
        contributions are summed into the network's own buffer first)."""
        spans: dict[str, list[int]] = {}
        owner: dict[str | None, str | None] = {None: None}  # node -> whose buffer its gx is
        for t, (name, feeders) in enumerate(self._backward_walk):
            for f in feeders:
                if owner[f] is not None:
                    spans[owner[f]][1] = t
            if not self._need_in[name]:
                continue
            if not self.layers[name].passes_grad:
                owner[name] = name
                spans[name] = [t, t]
            else:
                owner[name] = owner[feeders[0]] if len(feeders) == 1 else None
        return spans

    def _out_spans(self) -> dict[str, list[int]]:
        """For each layer whose output can live in a shared buffer: [its forward (position in
        DAG order), the last forward that reads it] (through layers that may return their
        input itself: a flatten, a fused ReLU, dropout). Outputs read again after the forward
        keep their own buffer: by the layer's own backward (``keeps_output``), by a consumer's
        (``keeps_input``, a batch norm's input), and the logits."""
        root: dict[str, str] = {INPUT: INPUT}  # node -> whose buffer its output is
        spans: dict[str, list[int]] = {}
        kept = {INPUT}
        for t, node in enumerate(self.nodes):
            layer = self.layers[node.name]
            for src in node.inputs:
                r = root[src]
                if r in spans:
                    spans[r][1] = t
                if layer.keeps_input:
                    kept.add(r)
            if layer.aliases_input:
                root[node.name] = root[node.inputs[0]]  # (its own buffer, if any, unshared)
                continue
            root[node.name] = node.name
            spans[node.name] = [t, t]
            if layer.keeps_output or not hasattr(layer, "_y"):
                kept.add(node.name)
        kept.add(root[self.nodes[-1].name])
        return {k: v for k, v in spans.items() if k not in kept}

    @staticmethod
    def _slots(spans: dict[str, list[int]]) -> list[list[str]]:
        """Greedy interval colouring: spans [first, last] taken in order of ``first``, each
        into the first slot whose members all ended before it starts (never into the slot of
        a span that ends where it starts: a layer never writes the buffer it reads)."""
        slots: list[list] = []  # [last reader so far, members]
        for name in sorted(spans, key=lambda n: spans[n][0]):
            first, last = spans[name]
            for slot in slots:
                if slot[0] < first:
                    slot[0] = last
                    slot[1].append(name)
                    break
            else:
                slots.append([last, [name]])
        return [members for _, members in slots]

    def _share_out_buffers(self) -> int:
        """Point the outputs no backward reads (:meth:`_out_spans`) into a few shared buffers:
        such an output lives only from its forward to its last reader's, so layers whose spans
        do not overlap take turns, and the forward writes into buffers it touched moments
        before instead of one fresh buffer per layer (ReLUs, fused or not, keep a byte mask
        for their backward instead of their output). At batch 16, SWAT 0.95, after a step:
        resnet8's 13 free outputs (batch-norm outputs, residual sums, the pooled features) in
        3 buffers, the network's arrays 30.6 -> 27.6 MB; resnet18_cifar 29 in 3, 283.5 ->
        249.9 MB. resnet8's step, interleaved with torch's: 0.97-1.03x in 5 A/B runs (no
        faster: its time is not in these bytes). Returns the shared buffers' count."""
        return self._point_into_slots(self._out_spans(), "_y", "use_out_buffer")

    def _share_grad_buffers(self) -> int:
        """Point the layers' input-gradient buffers into a few shared ones: a layer's gradient
        is live only from its backward to its consumers' (:meth:`_grad_spans`), so layers
        whose spans do not overlap take turns (greedy, in backward order; a buffer is never
        written by the backward that reads it). The step then writes its gradients into
        buffers it touched moments before (in cache) instead of one fresh buffer per layer.
        Measured at batch 16: resnet8 22 buffers -> 3 (the network's arrays 37.9 -> 27.9 MB),
        resnet18_cifar 49 -> 3 (343.7 -> 262.1 MB); resnet8's SWAT-0.95 step on 2 threads,
        interleaved with torch's, 1.01-1.05x (6 A/B runs). Returns the shared buffers'
        count."""
        return self._point_into_slots(self._grad_spans(), "_gx", "use_grad_buffer")

    def _point_into_slots(self, spans: dict[str, list[int]], attr: str, use: str) -> int:
        """Allocate one buffer per slot of :meth:`_slots` (as large as its largest member's
        ``attr`` array) and hand it to each member's ``use`` method; returns the slots'
        count."""
        slots = self._slots(spans)
        for members in slots:
            flat = np.empty(max(getattr(self.layers[m], attr).size for m in members),
                            np.float32)
            for m in members:
                getattr(self.layers[m], use)(flat)
        return len(slots)

    def _ensure(self, n: int) -> None:
        if n > self.max_batch:
            self.setup(n)

    # ------------------------------------------------------------------ modes
    def train(self) -> Network:
        self.training = True
        return self

    def eval(self) -> Network:
        self.training = False
        return self

    def set_plan(self, plan: SparsityPlan | None) -> None:
        """Apply a SparsityPlan (None = dense) to the conv/linear layers; validated first."""
        if plan is None:
            plan = SparsityPlan.dense()
        if not isinstance(plan, SparsityPlan):
            raise TypeError(f"set_plan: expected a hwmodel.SparsityPlan or None, got "
                            f"{type(plan).__name__}")
        plan.check(self.spec)
        for name in self.spec.weighted_layers():
            ls = plan.layers.get(name)
            mode = plan.mode if ls is not None else "dense"
            self.layers[name].set_sparsity(mode, ls)
            self.modes[name] = mode
        self.plan = plan

    # ------------------------------------------------------------------ state
    def _state_arrays(self) -> dict[str, np.ndarray]:
        out = {}
        for key in self.spec.state_shapes():
            node, _, attr = key.rpartition(".")
            layer = self.layers[node]
            out[key] = layer.params[attr] if attr in layer.params else layer.buffers[attr]
        return out

    def state_dict(self) -> dict[str, np.ndarray]:
        """Copies of parameters and buffers, named and ordered like torch's ``state_dict``."""
        return {k: v.copy() for k, v in self._state_arrays().items()}

    def load_state_dict(self, d: Mapping) -> None:
        """Copy values in; names and shapes must match ``spec.state_shapes()`` exactly."""
        if not isinstance(d, Mapping):
            raise TypeError(f"load_state_dict: expected a mapping name -> array, got "
                            f"{type(d).__name__}")
        target = self._state_arrays()
        missing = [k for k in target if k not in d]
        unexpected = [k for k in d if k not in target]
        if missing or unexpected:
            raise KeyError(f"load_state_dict({self.spec.name}): missing keys {missing}, "
                           f"unexpected keys {unexpected}")
        vals = {}
        for k, dst in target.items():
            v = np.asarray(d[k])
            if v.shape != dst.shape:
                raise ValueError(f"load_state_dict: {k!r} has shape {v.shape}, expected "
                                 f"{dst.shape}")
            if not (np.issubdtype(v.dtype, np.floating) or np.issubdtype(v.dtype, np.integer)):
                raise TypeError(f"load_state_dict: {k!r} has dtype {v.dtype}, expected a number")
            if dst.dtype == np.int64 and not np.issubdtype(v.dtype, np.integer):
                raise TypeError(f"load_state_dict: {k!r} must be an integer counter, got "
                                f"{v.dtype}")
            vals[k] = v
        for k, v in vals.items():  # all validated: now write
            target[k][...] = v

    @property
    def params(self) -> dict[str, np.ndarray]:
        """Trainable parameters (live arrays), keyed like ``state_dict``."""
        return {f"{n.name}.{k}": v for n in self.nodes for k, v in self.layers[n.name].params.items()}

    @property
    def grads(self) -> dict[str, np.ndarray]:
        """Gradients of the last backward (live arrays), keyed like ``params``."""
        return {f"{n.name}.{k}": v for n in self.nodes for k, v in self.layers[n.name].grads.items()}

    def get_masks(self) -> dict[str, np.ndarray]:
        """Masks of the conv/linear layers that have one (bool copies)."""
        out = {}
        for name in self.spec.weighted_layers():
            m = getattr(self.layers[name], "mask", None)
            if m is not None:
                out[name] = np.asarray(m).astype(bool)
        return out

    def set_masks(self, masks: Mapping) -> None:
        """Give layers their masks (weights outside a mask are zeroed by the layer)."""
        if not isinstance(masks, Mapping):
            raise TypeError(f"set_masks: expected a mapping layer -> mask, got {type(masks).__name__}")
        weighted = self.spec.weighted_layers()
        for name, m in masks.items():
            if name not in weighted:
                raise KeyError(f"set_masks: {name!r} is not a conv/linear layer of "
                               f"{self.spec.name!r}; known: {', '.join(weighted)}")
            if m is None:
                continue
            shape = self.layers[name].params["weight"].shape
            m = np.asarray(m)
            if m.shape != shape:
                raise ValueError(f"set_masks: mask of {name!r} has shape {m.shape}, expected "
                                 f"{shape}")
        for name, m in masks.items():
            self.layers[name].set_mask(None if m is None else np.ascontiguousarray(m))

    # ------------------------------------------------------------------ input checks
    def check_x(self, x, what: str = "input batch") -> np.ndarray:
        """float32 C-contiguous (N, *input_shape); float64/float16 converted, else an error."""
        want = self.spec.input_shape
        if not isinstance(x, np.ndarray):
            raise TypeError(f"{what}: expected a numpy array of shape (N, {', '.join(map(str, want))}), "
                            f"got {type(x).__name__}")
        if x.ndim != 1 + len(want) or tuple(x.shape[1:]) != want or x.shape[0] < 1:
            layout = "NCHW" if len(want) == 3 else "NF"
            raise ValueError(f"{what}: expected float32 {layout} shape (N, "
                             f"{', '.join(map(str, want))}) with N >= 1, got shape {x.shape}")
        if x.dtype != np.float32:
            if not np.issubdtype(x.dtype, np.floating):
                raise TypeError(f"{what}: expected float32 values, got dtype {x.dtype}")
            x = x.astype(np.float32)
        return np.ascontiguousarray(x)

    def check_y(self, y, n: int, what: str = "labels") -> np.ndarray:
        """int64 (n,) labels in [0, num_classes)."""
        k = self.spec.num_classes
        if not isinstance(y, np.ndarray):
            raise TypeError(f"{what}: expected a numpy integer array, got {type(y).__name__}")
        if not np.issubdtype(y.dtype, np.integer) or y.dtype == np.bool_:
            raise TypeError(f"{what}: expected integer class labels, got dtype {y.dtype}")
        if y.shape != (n,):
            raise ValueError(f"{what}: expected shape ({n},) to match the batch, got {y.shape}")
        if n and (int(y.min()) < 0 or int(y.max()) >= k):
            bad = y[(y < 0) | (y >= k)][0]
            raise ValueError(f"{what}: label {int(bad)} out of range [0, {k}) for "
                             f"{self.spec.name!r}")
        return np.ascontiguousarray(y, dtype=np.int64)

    # ------------------------------------------------------------------ forward / backward
    def forward(self, x: np.ndarray, training: bool, observe=None) -> np.ndarray:
        """Run the DAG on a checked float32 batch; returns a view of the logits buffer.
        ``observe(name, output)``, if given, sees each node's output as soon as it is made
        (outputs share buffers: most are overwritten by later layers of the same forward)."""
        outs = self._outs
        outs[INPUT] = x
        timing = self.timing
        for node in self.nodes:
            layer = self.layers[node.name]
            t0 = time.perf_counter() if timing else 0.0
            if node.op == "add":
                y = layer.forward(outs[node.inputs[0]], outs[node.inputs[1]], training)
            else:
                y = layer.forward(outs[node.inputs[0]], training)
            outs[node.name] = y
            if observe is not None:
                observe(node.name, y)
            if timing:
                self.times[node.name]["forward"] = time.perf_counter() - t0
        return outs[self.nodes[-1].name]

    def backward(self, glogits: np.ndarray) -> None:
        """Backpropagate d loss / d logits; parameter gradients land in ``layer.grads``.

        Gradients reaching a node from several consumers are collected and summed just
        before that node's backward (all its consumers come later in DAG order), in the fixed
        order the consumers were visited (:meth:`_walk_backward`): one pass for two
        contributions, none for one.
        """
        gxs: dict[str | None, np.ndarray] = {None: glogits}  # node -> its input gradient
        timing = self.timing
        for name, feeders in self._backward_walk:
            parts = [gxs[f] for f in feeders]
            if len(parts) == 1:
                gy = parts[0]
            else:
                gy = self._gacc[name][: parts[0].shape[0]]
                pick(ADD_FWD, gy.size)(parts[0].reshape(-1), parts[1].reshape(-1),
                                       gy.reshape(-1))
                for extra in parts[2:]:
                    pick(ACC, gy.size)(gy.reshape(-1), extra.reshape(-1))
            layer = self.layers[name]
            need_in = self._need_in[name]
            t0 = time.perf_counter() if timing else 0.0
            gx = layer.backward(gy, need_input_grad=need_in)
            if timing:
                self.times[name]["backward"] = time.perf_counter() - t0
            gxs[name] = gx

    def backward_phase(self, name: str) -> str:
        """The measurement phase a node's (whole) backward call counts as: layers with
        parameters compute their input and parameter gradients in one fused pass."""
        if not self.layers[name].params:
            return "backward_input"
        return "backward_input+backward_weight" if self._need_in[name] else "backward_weight"

    def first_nonfinite(self) -> str | None:
        """Name of the first node (in DAG order) whose output holds NaN/inf on the last
        forward's batch, or None ('input' if the batch itself is non-finite). Most outputs
        share buffers, so the forward runs again on that batch, each output checked as it is
        made; batch-norm running statistics and dropout streams are put back as they were
        (sparse layers' top-K refresh counters advance: the run it diagnoses has stopped)."""
        x = self._outs.get(INPUT)
        if x is None:
            return None
        if not all_finite(np.ascontiguousarray(x).reshape(-1)):
            return INPUT
        found: list[str] = []

        def check(name: str, out: np.ndarray) -> None:
            if not found and not all_finite(np.ascontiguousarray(out).reshape(-1)):
                found.append(name)

        state = self._stream_state()
        try:
            self.forward(x, self.training, observe=check)
        finally:
            self._restore_stream_state(state)
        return found[0] if found else None

    def _stream_state(self, dropout: bool = True) -> dict:
        """Copies of what a forward changes besides outputs: batch-norm buffers and (if
        ``dropout``) dropout generators' states."""
        state = {(n, k): v.copy() for n, layer in self.layers.items()
                 for k, v in layer.buffers.items()}
        for n, layer in self.layers.items():
            if dropout and isinstance(layer, Dropout):
                state[(n, None)] = layer.rng.bit_generator.state
        return state

    def _restore_stream_state(self, state: dict) -> None:
        for (n, k), v in state.items():
            if k is None:
                self.layers[n].rng.bit_generator.state = v
            else:
                self.layers[n].buffers[k][...] = v

    def step_loss(self, x: np.ndarray, y: np.ndarray) -> float:
        """Forward + loss + backward on checked arrays (the training hot path)."""
        n = x.shape[0]
        logits = self.forward(x, self.training)
        g = self._glogits[:n]
        t0 = time.perf_counter()
        loss = softmax_xent(logits, y, g)
        self.loss_time = time.perf_counter() - t0
        if not np.isfinite(loss):
            return float(loss)
        self.backward(g)
        return float(loss)

    # ------------------------------------------------------------------ public API
    def loss_and_grads(self, x: np.ndarray, y: np.ndarray, plan: SparsityPlan | None = None,
                       *, update_stats: bool = True) -> tuple[float, dict[str, np.ndarray]]:
        """Mean cross-entropy of batch ``x`` against ``y`` and copies of all parameter
        gradients keyed like ``state_dict``. ``plan`` (if given) is applied first; without it
        the network's current plan is used. Runs in the current train/eval mode;
        ``update_stats=False`` leaves batch-norm running statistics and counters as they were
        (e.g. for an extra gradient pass that is not a training step)."""
        if plan is not None:
            self.set_plan(plan)
        x = self.check_x(x)
        y = self.check_y(y, x.shape[0])
        self._ensure(x.shape[0])
        saved = None if update_stats else self._stream_state(dropout=False)
        loss = self.step_loss(x, y)
        if saved is not None:
            self._restore_stream_state(saved)
        if not np.isfinite(loss):
            return loss, {k: np.full_like(v, np.nan) for k, v in self.grads.items()}
        return loss, {k: v.copy() for k, v in self.grads.items()}

    def predict(self, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """Logits (N, classes) in inference mode (BN running stats, no dropout)."""
        x = self.check_x(x)
        n = x.shape[0]
        bs = max(1, min(n, max(batch_size, self.max_batch)))
        self._ensure(bs)
        out = np.empty((n, self.spec.num_classes), np.float32)
        for s in range(0, n, bs):
            out[s:s + bs] = self.forward(x[s:s + bs], False)
        return out

    def evaluate(self, x: np.ndarray, y: np.ndarray, batch_size: int = 256) -> dict:
        """Mean loss, accuracy and sample count in inference mode."""
        x = self.check_x(x)
        y = self.check_y(y, x.shape[0])
        n = x.shape[0]
        bs = max(1, min(n, max(batch_size, self.max_batch)))
        self._ensure(bs)
        total, correct = 0.0, 0
        for s in range(0, n, bs):
            t, c = xent_and_correct(self.forward(x[s:s + bs], False), y[s:s + bs])
            total += t
            correct += c
        return {"loss": total / n, "accuracy": correct / n, "n": int(n)}

    def memory_bytes(self) -> int:
        """Bytes of every array the network holds (params, grads, buffers, activations),
        each underlying allocation counted once."""
        seen: dict[int, int] = {}

        def visit(obj) -> None:
            if isinstance(obj, np.ndarray):
                o = _owner(obj)
                seen[id(o)] = o.nbytes
            elif isinstance(obj, dict):
                for v in obj.values():
                    visit(v)
            elif isinstance(obj, (list, tuple)):
                for v in obj:
                    visit(v)

        for layer in self.layers.values():
            for v in vars(layer).values():
                visit(v)
        visit(self._gacc)
        visit(getattr(self, "_glogits", None))
        return int(sum(seen.values()))
