"""The dataset record, the data error, and helpers shared by every loader.

Normalisation (the same for every image loader, recorded in ``Dataset.meta``):

1. pixels are scaled to ``[0, 1]`` (``uint8 / 255``; FEMNIST's LEAF JSON already holds
   ``[0, 1]`` floats);
2. ``normalize="standard"`` (the default) then subtracts the per-channel mean and divides by
   the per-channel standard deviation, both computed on the **training split only** and applied
   to train and test alike (``meta["mean"]``, ``meta["std"]``, one value per channel);
   ``normalize="unit"`` stops after step 1.

Speech features are standardised per MFCC/mel coefficient instead (see ``speech.py``); the
synthetic benchmark is left as generated.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

NORMALIZE_CHOICES = ("standard", "unit")


class DataError(ValueError):
    """A dataset file is missing, truncated, corrupt or not in the expected layout."""


@dataclass
class Dataset:
    """A loaded dataset: training and held-out test split, images NCHW float32.

    ``groups`` (natural partitions only) holds, per training sample, the index of its writer /
    speaker / device in ``group_names``.
    """

    name: str
    x: np.ndarray
    y: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    input_shape: tuple[int, ...]
    groups: np.ndarray | None = None
    group_names: tuple[str, ...] | None = None
    class_names: tuple[str, ...] | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.input_shape = tuple(int(d) for d in self.input_shape)
        for split, xs, ys in (("train", self.x, self.y), ("test", self.x_test, self.y_test)):
            if xs.dtype != np.float32:
                raise TypeError(f"Dataset {self.name}: {split} x must be float32, got {xs.dtype}")
            if ys.dtype != np.int64:
                raise TypeError(f"Dataset {self.name}: {split} y must be int64, got {ys.dtype}")
            if xs.shape[1:] != self.input_shape or ys.shape != (xs.shape[0],):
                raise ValueError(
                    f"Dataset {self.name}: {split} x {xs.shape} / y {ys.shape} do not match "
                    f"input_shape {self.input_shape}"
                )
            if ys.size and (ys.min() < 0 or ys.max() >= self.num_classes):
                raise ValueError(
                    f"Dataset {self.name}: {split} labels outside [0, {self.num_classes})"
                )
        if self.groups is not None:
            if self.groups.shape != self.y.shape or self.groups.dtype != np.int64:
                raise ValueError(
                    f"Dataset {self.name}: groups must be int64 with one entry per training sample"
                )

    @property
    def num_train(self) -> int:
        """Number of training samples."""
        return int(self.y.shape[0])

    @property
    def num_test(self) -> int:
        """Number of test samples."""
        return int(self.y_test.shape[0])

    def __repr__(self) -> str:  # arrays are too big for the default repr
        g = "" if self.groups is None else f", groups={len(self.group_names or ())}"
        return (
            f"Dataset({self.name!r}, train={self.num_train}, test={self.num_test}, "
            f"input_shape={self.input_shape}, num_classes={self.num_classes}{g})"
        )


def require_file(path: str, what: str, layout: str) -> str:
    """Return ``path`` if it is a readable file, else raise DataError naming it and the layout."""
    if not os.path.isfile(path):
        raise DataError(f"{what}: missing file {path}. Expected layout: {layout}")
    return path


def stratified_split(
    y: np.ndarray, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Seeded stratified split: per class, ``round(test_fraction * n_c)`` samples go to test.

    Returns sorted (train_idx, test_idx) int64 arrays.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    rng = np.random.default_rng(seed)
    test = []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        rng.shuffle(idx)
        test.append(idx[: int(round(test_fraction * idx.size))])
    test_idx = np.sort(np.concatenate(test)).astype(np.int64)
    mask = np.ones(y.shape[0], dtype=bool)
    mask[test_idx] = False
    return np.flatnonzero(mask).astype(np.int64), test_idx


def normalize_images(
    x: np.ndarray, x_test: np.ndarray, mode: str
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Standardise NCHW images in [0, 1] in place per channel with training statistics.

    ``mode`` is ``"standard"`` or ``"unit"`` (leave in [0, 1]). Returns (x, x_test, meta).
    """
    if mode not in NORMALIZE_CHOICES:
        raise ValueError(f"normalize must be one of {NORMALIZE_CHOICES}, got {mode!r}")
    if mode == "unit":
        return x, x_test, {"normalize": "unit: pixel / 255 in [0, 1]"}
    c = x.shape[1]
    # float64 accumulation per channel, without a float64 copy of the whole array
    mean = np.array([x[:, i].mean(dtype=np.float64) for i in range(c)])
    std = np.array([x[:, i].std(dtype=np.float64) for i in range(c)])
    std = np.where(std > 0, std, 1.0)
    shape = (1, c) + (1,) * (x.ndim - 2)
    m32 = mean.astype(np.float32).reshape(shape)
    s32 = std.astype(np.float32).reshape(shape)
    for arr in (x, x_test):
        arr -= m32
        arr /= s32
    meta = {
        "normalize": "standard: (pixel/255 - mean_c) / std_c, train-split statistics per channel",
        "mean": mean.tolist(),
        "std": std.tolist(),
    }
    return x, x_test, meta
