"""ReLU, forward and backward (the mask comes from the saved output: y > 0)."""

from __future__ import annotations

import numpy as np

from embedded.kernels.elementwise import RELU_BWD, RELU_FWD, pick
from embedded.layers.base import BufferedLayer


class ReLU(BufferedLayer):
    """``torch.nn.ReLU``; the gradient at exactly 0 is 0, as torch's."""

    def forward(self, x: np.ndarray, training: bool) -> np.ndarray:
        n = x.shape[0]
        y = self._y[:n]
        pick(RELU_FWD, x.size)(x.reshape(-1), y.reshape(-1))
        self._n = n
        return y

    def backward(self, gy: np.ndarray, need_input_grad: bool = True) -> np.ndarray | None:
        if not need_input_grad:
            return None
        n = self._n
        gx = self._gx[:n]
        pick(RELU_BWD, gx.size)(gy.reshape(-1), self._y[:n].reshape(-1), gx.reshape(-1))
        return gx
