"""SGD exactly as ``torch.optim.SGD`` (momentum, dampening 0, weight decay, Nesterov) and the
learning-rate schedules of the trainer (constant, step, exponential decay of ALGORITHMS.md).

Momentum buffers are allocated once per parameter and reused; an update allocates nothing.
Weights of a layer in ``masked`` mode are updated only inside the mask (outside it weight and
momentum are held at 0), so a mask that changed between rounds cannot leak stale momentum.
"""

from __future__ import annotations

import math
import time

import numpy as np

from .kernels.elementwise import SGD as _SGD_K
from .kernels.elementwise import SGD_MASKED as _SGD_MASKED_K
from .kernels.elementwise import pick


def exp_decay_lr(lr_start: float, lr_end: float, t: float, T: float) -> float:
    """``lr_start * (lr_end / lr_start) ** (t / T)`` (ZeroFL/FLASH per-round schedule);
    ``T <= 0`` gives ``lr_start``."""
    if lr_start <= 0 or lr_end <= 0:
        raise ValueError(f"exp_decay_lr: learning rates must be > 0, got {lr_start}, {lr_end}")
    if T <= 0:
        return float(lr_start)
    return float(lr_start * (lr_end / lr_start) ** (t / T))


def schedule_lr(kind: str, lr: float, step: int, total_steps: int, lr_end: float | None = None,
                step_size: int = 0, gamma: float = 0.1) -> float:
    """Learning rate at optimizer step ``step`` (from 0) of a run of ``total_steps``.

    * ``constant``: ``lr``;
    * ``step``: ``lr * gamma ** (step // step_size)`` (``step_size`` in optimizer steps);
    * ``exp``: :func:`exp_decay_lr` from ``lr`` to ``lr_end`` over the run, reaching
      ``lr_end`` at the last step.
    """
    if kind == "constant":
        return float(lr)
    if kind == "step":
        if step_size < 1:
            raise ValueError("lr_schedule 'step' needs lr_step_size >= 1")
        return float(lr * gamma ** (step // step_size))
    if kind == "exp":
        if lr_end is None:
            raise ValueError("lr_schedule 'exp' needs lr_end")
        return exp_decay_lr(lr, lr_end, step, max(total_steps - 1, 0))
    raise ValueError(f"lr_schedule: expected 'constant', 'step' or 'exp', got {kind!r}")


class SGD:
    """``torch.optim.SGD(params, lr, momentum, weight_decay=wd, nesterov=...)`` over a
    :class:`~embedded.network.Network`'s parameters (all of them, biases and BN included,
    as torch does when given ``model.parameters()``)."""

    def __init__(self, net, momentum: float = 0.9, weight_decay: float = 0.0,
                 nesterov: bool = False):
        if momentum < 0 or weight_decay < 0:
            raise ValueError(f"SGD: momentum and weight_decay must be >= 0, got {momentum}, "
                             f"{weight_decay}")
        if nesterov and momentum <= 0:
            raise ValueError("SGD: Nesterov momentum requires momentum > 0 (as torch)")
        self.net = net
        self.momentum = float(momentum)
        self.weight_decay = float(weight_decay)
        self.nesterov = bool(nesterov)
        # (layer name, key, param, grad, momentum buffer), the arrays flat: a step spends
        # ~2 us of Python on each (resnet8: 29), against ~1 us on the update itself
        self.groups = []
        for node in net.nodes:
            layer = net.layers[node.name]
            for key, p in layer.params.items():
                buf = np.zeros(p.size, np.float32)
                self.groups.append((node.name, key, p.reshape(-1),
                                    layer.grads[key].reshape(-1), buf))
        #: seconds spent updating each layer in the last step (when the network times itself)
        self.times: dict[str, float] = {}

    def zero_state(self) -> None:
        """Forget the momentum (a fresh optimizer, as each FL round builds)."""
        for g in self.groups:
            g[4][:] = 0.0

    def memory_bytes(self) -> int:
        return int(sum(g[4].nbytes for g in self.groups))

    def step(self, lr: float) -> None:
        """One update with learning rate ``lr`` using the gradients in the layers."""
        net = self.net
        modes = net.modes
        timing = net.timing
        times = self.times
        for name in times:
            times[name] = 0.0
        m, wd, nesterov = self.momentum, self.weight_decay, self.nesterov
        for name, key, pf, gf, buf in self.groups:
            t0 = time.perf_counter() if timing else 0.0
            mask = None
            if key == "weight" and modes.get(name) == "masked":
                mask = getattr(net.layers[name], "mask", None)
            if mask is None:
                pick(_SGD_K, 3 * pf.size)(pf, gf, buf, lr, m, wd, nesterov)
            else:
                pick(_SGD_MASKED_K, 3 * pf.size)(pf, gf, buf, mask.reshape(-1), lr, m, wd,
                                                 nesterov)
            if timing:
                times[name] = times.get(name, 0.0) + time.perf_counter() - t0


def total_steps(n: int, batch_size: int, epochs: int, drop_last: bool,
                max_steps: int | None) -> int:
    """Optimizer steps a run takes over ``n`` samples."""
    per_epoch = n // batch_size if drop_last else math.ceil(n / batch_size)
    total = per_epoch * epochs
    return total if max_steps is None else min(total, max_steps)
