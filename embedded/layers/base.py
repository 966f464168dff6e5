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

    def setup(self, max_batch: int) -> None:
        """Allocate every buffer a step needs for batches up to ``max_batch``."""
        self.max_batch = max_batch

    def forward(self, x: np.ndarray, training: bool) -> np.ndarray:
        raise NotImplementedError

    def backward(self, gy: np.ndarray, need_input_grad: bool = True) -> np.ndarray | None:
        """Write parameter gradients into ``self.grads`` (overwrite, not accumulate) and
        return the gradient w.r.t. the input (``None`` if not needed)."""
        raise NotImplementedError
