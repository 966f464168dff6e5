"""Flatten, add (residual join) and dropout, forward and backward."""

from __future__ import annotations

import numpy as np

from embedded.kernels.elementwise import (
    ADD_FWD,
    ADD_RELU_FWD,
    DROPOUT_BWD,
    DROPOUT_FWD,
    RELU_BWD,
    pick,
)
from embedded.layers.base import Layer


class Flatten(Layer):
    """(N, C, H, W) -> (N, C·H·W) as a view (inputs are C-contiguous), no copy."""

    passes_grad = True
    aliases_input = True
    keeps_input = False
    keeps_output = False

    def __init__(self, node, in_shapes, out_shape):
        super().__init__(node.name, in_shapes[0], out_shape)
        self._n = 0

    def forward(self, x: np.ndarray, training: bool) -> np.ndarray:
        self._n = x.shape[0]
        return x.reshape(self._n, *self.out_shape)

    def backward(self, gy: np.ndarray, need_input_grad: bool = True) -> np.ndarray | None:
        if not need_input_grad:
            return None
        return gy.reshape(self._n, *self.in_shape)


class Add(Layer):
    """y = a + b. ``backward`` returns the one gradient both inputs receive. With ``relu``
    (set by the Network when a ReLU alone reads the sum), y = max(a + b, 0) in the same pass,
    its keep mask saved, and the gradient masked by it (the ReLU's backward)."""

    keeps_input = False
    keeps_output = False

    def __init__(self, node, in_shapes, out_shape):
        super().__init__(node.name, in_shapes[0], out_shape)
        self.relu = False

    @property
    def passes_grad(self) -> bool:
        return not self.relu

    def setup(self, max_batch: int) -> None:
        super().setup(max_batch)
        self._y = np.empty((max_batch, *self.out_shape), np.float32)
        if self.relu:
            self._gx = np.empty((max_batch, *self.out_shape), np.float32)
            self._keep = np.empty(self._y.size, np.uint8)

    def forward(self, a: np.ndarray, b: np.ndarray, training: bool = True) -> np.ndarray:
        n = a.shape[0]
        y = self._y[:n]
        if self.relu:
            pick(ADD_RELU_FWD, a.size)(a.reshape(-1), b.reshape(-1), y.reshape(-1),
                                       self._keep[:a.size])
        else:
            pick(ADD_FWD, a.size)(a.reshape(-1), b.reshape(-1), y.reshape(-1))
        return y

    def backward(self, gy: np.ndarray, need_input_grad: bool = True) -> np.ndarray | None:
        if not need_input_grad:
            return None
        if not self.relu:
            return gy
        n = gy.shape[0]
        gx = self._gx[:n]
        pick(RELU_BWD, gy.size)(gy.reshape(-1), self._keep[:gy.size], gx.reshape(-1))
        return gx


class Dropout(Layer):
    """Inverted dropout (``torch.nn.Dropout``): in training, zero with probability p and scale
    the rest by 1/(1-p); identity in eval. The keep decision comes from a seeded numpy
    Generator filled in place (outside any parallel kernel), so runs are reproducible; the
    random stream differs from torch's, so tests compare with torch through the same mask."""

    aliases_input = True  # (in eval, or at p = 0)
    keeps_input = False
    keeps_output = False

    def __init__(self, node, in_shapes, out_shape):
        super().__init__(node.name, in_shapes[0], out_shape)
        self.p = float(node.attrs["p"])
        self.rng = np.random.default_rng(0)
        self._n = 0
        self._training = False

    def reseed(self, seed_seq) -> None:
        """Restart the dropout stream from a seed (int or numpy SeedSequence)."""
        self.rng = np.random.default_rng(seed_seq)

    def setup(self, max_batch: int) -> None:
        super().setup(max_batch)
        self._y = np.empty((max_batch, *self.out_shape), np.float32)
        self._gx = np.empty((max_batch, *self.in_shape), np.float32)
        self._u = np.empty(max_batch * int(np.prod(self.in_shape)), np.float32)

    def keep_mask(self) -> np.ndarray:
        """The keep decisions of the last training forward (bool, input-shaped; a copy)."""
        n = self._n
        return (self._u[: n * int(np.prod(self.in_shape))] >= self.p).reshape(n, *self.in_shape)

    def forward(self, x: np.ndarray, training: bool) -> np.ndarray:
        n = x.shape[0]
        self._n = n
        self._training = training and self.p > 0.0
        if not self._training:
            return x
        u = self._u[: x.size]
        self.rng.random(dtype=np.float32, out=u)
        y = self._y[:n]
        scale = np.float32(1.0 / (1.0 - self.p))
        pick(DROPOUT_FWD, x.size)(x.reshape(-1), u, np.float32(self.p), scale, y.reshape(-1))
        return y

    def backward(self, gy: np.ndarray, need_input_grad: bool = True) -> np.ndarray | None:
        if not need_input_grad:
            return None
        n = self._n
        gx = self._gx[:n]
        if not self._training:  # identity, into the own buffer all the same (the Network
            gx[...] = gy        # plans gradient buffers on what a layer returns)
            return gx
        scale = np.float32(1.0 / (1.0 - self.p))
        pick(DROPOUT_BWD, gx.size)(gy.reshape(-1), self._u[: gx.size], np.float32(self.p),
                                   scale, gx.reshape(-1))
        return gx
