"""The synthetic(alpha, beta) federated benchmark of FedProx (Li et al., 2020), also in LEAF.

For each device k (FedProx's generator, reproduced with a seeded ``numpy.random.Generator``):

- ``u_k ~ N(0, alpha)`` and ``B_k ~ N(0, beta)`` (normal with that standard deviation, as the
  reference code calls ``np.random.normal(0, alpha)``);
- ``W_k ~ N(u_k, 1)`` of shape (dim, classes), ``b_k ~ N(u_k, 1)`` of shape (classes,);
- ``v_k ~ N(B_k, 1)`` of shape (dim,); ``x ~ N(v_k, Sigma)`` with diagonal
  ``Sigma_jj = j ** -1.2`` (j = 1..dim);
- ``y = argmax(softmax(x W_k + b_k))``;
- the number of samples per device is ``int(lognormal(4, 2)) + 50``, capped at
  ``max_samples_per_device`` (no cap in the reference; a cap keeps scale tests bounded).

``iid=True`` is FedProx's synthetic_iid: one ``W, b ~ N(0, 1)`` for all devices and
``v_k = 0``. The first 90 % of each device's samples go to training, the rest
to test (the reference's 90/10 split; its shuffle before splitting changes nothing in
distribution, a device's samples being i.i.d.). Defaults: 30 devices, dim 60, 10 classes. ``groups`` holds the
device of each training sample, so ``natural`` partitioning gives the benchmark's devices.
"""

from __future__ import annotations

import numpy as np

from .base import Dataset


def load_synthetic(
    alpha: float = 1.0,
    beta: float = 1.0,
    *,
    num_devices: int = 30,
    dim: int = 60,
    num_classes: int = 10,
    iid: bool = False,
    seed: int = 0,
    train_fraction: float = 0.9,
    max_samples_per_device: int | None = None,
) -> Dataset:
    """Generate synthetic(alpha, beta); x has shape (N, dim), float32."""
    if alpha < 0 or beta < 0:
        raise ValueError(f"alpha and beta must be >= 0, got {alpha}, {beta}")
    if num_devices < 1 or dim < 1 or num_classes < 2:
        raise ValueError("num_devices, dim must be >= 1 and num_classes >= 2")
    if not 0.0 < train_fraction <= 1.0:
        raise ValueError(f"train_fraction must be in (0, 1], got {train_fraction}")
    rng = np.random.default_rng(seed)
    counts = rng.lognormal(4, 2, num_devices).astype(np.int64) + 50
    if max_samples_per_device is not None:
        counts = np.minimum(counts, max_samples_per_device)
    mean_w = rng.normal(0.0, alpha, num_devices)
    b_prior = rng.normal(0.0, beta, num_devices)
    sd = np.power(np.arange(1, dim + 1, dtype=np.float64), -1.2) ** 0.5
    if iid:
        w_g = rng.normal(0.0, 1.0, (dim, num_classes))
        b_g = rng.normal(0.0, 1.0, num_classes)
    xs, ys, gs, xts, yts = [], [], [], [], []
    for k in range(num_devices):
        if iid:
            w, b, v = w_g, b_g, np.zeros(dim)
        else:
            v = rng.normal(b_prior[k], 1.0, dim)
            w = rng.normal(mean_w[k], 1.0, (dim, num_classes))
            b = rng.normal(mean_w[k], 1.0, num_classes)
        x = v + rng.standard_normal((int(counts[k]), dim)) * sd
        y = np.argmax(x @ w + b, axis=1)  # softmax is monotone: argmax of logits
        n_tr = int(train_fraction * counts[k])
        xs.append(x[:n_tr])
        ys.append(y[:n_tr])
        gs.append(np.full(n_tr, k, np.int64))
        xts.append(x[n_tr:])
        yts.append(y[n_tr:])
    return Dataset(
        name="synthetic",
        x=np.concatenate(xs).astype(np.float32), y=np.concatenate(ys).astype(np.int64),
        x_test=np.concatenate(xts).astype(np.float32).reshape(-1, dim),
        y_test=np.concatenate(yts).astype(np.int64),
        num_classes=num_classes, input_shape=(dim,),
        groups=np.concatenate(gs), group_names=tuple(f"f_{k:05d}" for k in range(num_devices)),
        meta={"alpha": alpha, "beta": beta, "iid": iid, "seed": seed,
              "normalize": "none (features as generated)"},
    )
