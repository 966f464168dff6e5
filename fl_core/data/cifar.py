"""CIFAR-10 from its **binary** distribution (``cifar-10-batches-bin``).

Layout: ``data_batch_1.bin`` .. ``data_batch_5.bin`` (training) and ``test_batch.bin``, each a
sequence of 3,073-byte records: one label byte (0..9) then 3,072 pixel bytes — the 1,024 red,
then green, then blue values of a 32x32 image in row-major order — i.e. directly CHW.
``batches.meta.txt`` (optional) names the classes, one per line.

The python-pickle version of CIFAR-10 is deliberately not supported: nothing read from a file
is unpickled. Every file's size is checked to be a whole number of records before reading.
"""

from __future__ import annotations

import os

import numpy as np

from .base import DataError, Dataset, normalize_images

RECORD = 1 + 3 * 32 * 32
TRAIN_FILES = tuple(f"data_batch_{i}.bin" for i in range(1, 6))
TEST_FILE = "test_batch.bin"
LAYOUT = (
    "a directory cifar-10-batches-bin/ (or its parent) holding data_batch_1.bin .. "
    "data_batch_5.bin and test_batch.bin, each a sequence of 3073-byte records "
    "(1 label byte 0..9 + 3072 pixel bytes, R then G then B planes of 32x32)"
)
CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
)


def read_cifar_batch(path: str, num_classes: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Read one binary batch file -> (uint8 images (N, 3, 32, 32), uint8 labels (N,))."""
    if not os.path.isfile(path):
        raise DataError(f"CIFAR-10 file missing: {path}. Expected layout: {LAYOUT}")
    size = os.path.getsize(path)
    if size == 0 or size % RECORD:
        raise DataError(
            f"{path}: {size} bytes is not a whole number of {RECORD}-byte records "
            "(truncated or not a CIFAR-10 binary batch)"
        )
    raw = np.fromfile(path, dtype=np.uint8)
    if raw.size != size:
        raise DataError(f"{path}: read {raw.size} of {size} bytes")
    rec = raw.reshape(-1, RECORD)
    labels = rec[:, 0].copy()
    if int(labels.max()) >= num_classes:
        bad = int(np.flatnonzero(labels >= num_classes)[0])
        raise DataError(
            f"{path}: record {bad} has label {int(labels[bad])}, expected 0..{num_classes - 1} "
            "(corrupt file, or a CIFAR-100 batch?)"
        )
    return rec[:, 1:].reshape(-1, 3, 32, 32), labels


def _resolve(path: str) -> str:
    for d in (os.path.join(path, "cifar-10-batches-bin"), path):
        if os.path.isfile(os.path.join(d, TEST_FILE)) or os.path.isfile(
            os.path.join(d, TRAIN_FILES[0])
        ):
            return d
    if not os.path.isdir(path):
        raise DataError(f"cifar10: directory {path} does not exist. Expected layout: {LAYOUT}")
    if any(f.startswith("data_batch") and not f.endswith(".bin") for f in os.listdir(path)) or \
            os.path.isdir(os.path.join(path, "cifar-10-batches-py")):
        raise DataError(
            f"cifar10: {path} looks like the python-pickle version, which sparsefl does not "
            f"read (nothing is unpickled). Expected layout: {LAYOUT}"
        )
    return path  # the per-file check below names the first missing file


def load_cifar10(path: str, *, normalize: str = "standard") -> Dataset:
    """Load CIFAR-10 (official 50k/10k split) from the binary batches under ``path``."""
    d = _resolve(path)
    parts = [read_cifar_batch(os.path.join(d, f)) for f in TRAIN_FILES]
    xt_u8, yt = read_cifar_batch(os.path.join(d, TEST_FILE))
    n = sum(p[1].size for p in parts)
    x = np.empty((n, 3, 32, 32), dtype=np.float32)
    y = np.empty(n, dtype=np.int64)
    pos = 0
    for xi, yi in parts:
        x[pos : pos + yi.size] = xi
        y[pos : pos + yi.size] = yi
        pos += yi.size
    del parts
    x /= np.float32(255.0)
    xt = xt_u8.astype(np.float32)
    xt /= np.float32(255.0)
    x, xt, meta = normalize_images(x, xt, normalize)
    meta["source"] = os.path.abspath(d)
    names = CIFAR10_CLASSES
    meta_txt = os.path.join(d, "batches.meta.txt")
    if os.path.isfile(meta_txt) and os.path.getsize(meta_txt) < 4096:
        with open(meta_txt, encoding="utf-8", errors="replace") as f:
            lines = [ln.strip() for ln in f if ln.strip()]
        if len(lines) == 10:
            names = tuple(lines)
    return Dataset(
        name="cifar10", x=x, y=y, x_test=xt, y_test=yt.astype(np.int64), num_classes=10,
        input_shape=(3, 32, 32), class_names=names, meta=meta,
    )
