"""ReLU, forward and backward (the gradient passes where the output is not <= 0: a uint8 keep
mask saved by the forward, a quarter of the output's bytes).

A ReLU whose input is produced by a batch norm or a residual add read by nothing else is
fused into that layer by the Network (the producer writes max(y, 0) and masks its own
backward): the ReLU layer then passes its input and gradient through untouched."""

from __future__ import annotations

import numpy as np

from embedded.kernels.elementwise import RELU_BWD, RELU_FWD, pick
from embedded.layers.base import BufferedLayer, Layer


class ReLU(BufferedLayer):
    """``torch.nn.ReLU``; the gradient at exactly 0 is 0, as torch's."""

    #: True when the producer of the input applies this ReLU (see the module docstring)
    fused = False

    keeps_input = False
    keeps_output = False  # (the keep mask instead)

    @property
    def passes_grad(self) -> bool:
        return self.fused

    @property
    def aliases_input(self) -> bool:
        return self.fused

    def setup(self, max_batch: int) -> None:
        """The output, keep-mask and gradient buffers; a fused ReLU touches none and holds
        none."""
        if self.fused:
            Layer.setup(self, max_batch)
        else:
            super().setup(max_batch)
            self._keep = np.empty(self._y.size, np.uint8)

    def forward(self, x: np.ndarray, training: bool) -> np.ndarray:
        if self.fused:
            return x
        n = x.shape[0]
        y = self._y[:n]
        pick(RELU_FWD, x.size)(x.reshape(-1), y.reshape(-1), self._keep[:x.size])
        self._n = n
        return y

    def backward(self, gy: np.ndarray, need_input_grad: bool = True) -> np.ndarray | None:
        if not need_input_grad:
            return None
        if self.fused:
            return gy
        n = self._n
        gx = self._gx[:n]
        pick(RELU_BWD, gx.size)(gy.reshape(-1), self._keep[:gx.size], gx.reshape(-1))
        return gx
