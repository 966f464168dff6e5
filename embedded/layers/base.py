"""The layer protocol every Numba layer follows (micrograd style: backward beside forward).

Activations between layers are float32, C-contiguous, NCHW (or (N, F) after flatten). A layer
may use another layout internally. Buffers are allocated once in :meth:`Layer.setup` for the
largest batch and reused: ``forward``/``backward`` return views of those buffers sized to the
batch at hand, so a training step allocates nothing.
"""

from __future__ import annotations

import numpy as np


class Layer:
    """Base class. Subclasses set ``params`` and ``grads`` (same keys, float32 arrays)."""

    #: phase name -> seconds spent in the last step (filled by layers that time themselves)
    def __init__(self, name: str, in_shape: tuple[int, ...], out_shape: tuple[int, ...]):
        self.name = name
        self.in_shape = tuple(in_shape)
        self.out_shape = tuple(out_shape)
        self.params: dict[str, np.ndarray] = {}
        self.grads: dict[str, np.ndarray] = {}
        self.buffers: dict[str, np.ndarray] = {}  # non-trainable state (BN running stats)
        self.max_batch = 0

    def init_params(self, rng: np.random.Generator) -> None:
        """Initialise parameters (torch's defaults); layers without parameters keep this no-op."""

    def setup(self, max_batch: int) -> None:
        """Allocate every buffer a step needs for batches up to ``max_batch``."""
        self.max_batch = max_batch

    def forward(self, x: np.ndarray, training: bool) -> np.ndarray:
        raise NotImplementedError

    def backward(self, gy: np.ndarray, need_input_grad: bool = True) -> np.ndarray | None:
        """Write parameter gradients into ``self.grads`` (overwrite, not accumulate) and
        return the gradient w.r.t. the input (``None`` if not needed)."""
        raise NotImplementedError

    #: the input gradient ``backward`` returns is its incoming gradient itself (a view of
    #: it), not a view of the layer's own ``_gx`` (a flatten, a fused ReLU)
    passes_grad = False

    #: ``backward`` reads the input array ``forward`` was given (the Network keeps it
    #: intact until then); layers that copy what they need, or need nothing, say False
    keeps_input = True
    #: ``backward`` reads the array ``forward`` returned
    keeps_output = True
    #: ``forward`` may return its input itself (or a view of it) rather than its ``_y``
    aliases_input = False

    def use_out_buffer(self, flat: np.ndarray) -> None:
        """Write outputs into ``flat`` (a float32 buffer at least as large as this layer's
        own ``_y``, shared with layers whose outputs are never live at the same time:
        :meth:`embedded.network.Network.setup`) instead of the layer's own."""
        self._y = flat[:self._y.size].reshape(self._y.shape)

    def use_grad_buffer(self, flat: np.ndarray) -> None:
        """Write input gradients into ``flat`` (a float32 buffer at least as large as this
        layer's own ``_gx``, shared with layers whose gradients are never live at the same
        time: :meth:`embedded.network.Network.setup`) instead of the layer's own."""
        self._gx = flat[:self._gx.size].reshape(self._gx.shape)


class BufferedLayer(Layer):
    """A parameter-free layer with one output buffer ``_y`` and one input-gradient buffer
    ``_gx``, sized for ``max_batch``; ``_n`` is the batch of the last forward."""

    def __init__(self, node, in_shapes, out_shape):
        super().__init__(node.name, in_shapes[0], out_shape)
        self._n = 0

    def setup(self, max_batch: int) -> None:
        super().setup(max_batch)
        self._y = np.empty((max_batch, *self.out_shape), np.float32)
        self._gx = np.empty((max_batch, *self.in_shape), np.float32)


def init_weighted_state(layer: Layer, wshape: tuple[int, ...], nout: int, has_bias: bool) -> None:
    """The parameters and the sparse-mode state Conv2d and Linear share (see the trainer
    contract: mode, mask, dense gradient on demand, measured densities, phase times, the top-K
    refresh counter and threshold)."""
    layer.params = {"weight": np.zeros(wshape, np.float32)}
    layer.grads = {"weight": np.zeros(wshape, np.float32)}
    if has_bias:
        layer.params["bias"] = np.zeros(nout, np.float32)
        layer.grads["bias"] = np.zeros(nout, np.float32)
    layer._nobias = np.zeros(1, np.float32)
    layer.mode = "dense"
    layer.ls = None
    layer.mask = None
    layer.want_dense_grad = False
    layer.dense_grad = None
    layer.measured_density = 1.0
    layer.measured_act_density = 1.0
    layer.timing = True
    layer.phase_times = {}
    layer._steps = 0
    layer._thr = -1.0
    layer._win = None  # the weight top-K's window around the last threshold (topk.Window)
