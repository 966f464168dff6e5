"""MNIST / Fashion-MNIST from the standard IDX files (``.gz`` or uncompressed).

IDX layout: 2 zero bytes, a type byte (``0x08`` = unsigned byte, the only type these datasets
use), a byte with the number of dimensions ``d``, then ``d`` big-endian uint32 sizes, then the
data in C order. Images: magic ``0x00000803`` (N, rows, cols); labels: ``0x00000801`` (N,).

Before anything is allocated the header is checked against the file: an uncompressed file must
be exactly header + data long; for a gzip file the declared size must match the gzip footer
(ISIZE, the uncompressed length mod 2**32) and be at most what deflate could expand the
compressed bytes to (1032:1), so a corrupt header cannot make us allocate gigabytes.
"""

from __future__ import annotations

import gzip
import os
import struct
import zlib
from math import prod

import numpy as np

from .base import DataError, Dataset, normalize_images

IMAGES_MAGIC = 0x00000803
LABELS_MAGIC = 0x00000801
_DEFLATE_MAX_RATIO = 1032
_CHUNK = 1 << 22

#: file stems of the four IDX files (MNIST and Fashion-MNIST use the same names)
IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
LAYOUT = (
    "a directory holding train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
    "t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz (IDX format, gzip-compressed or not)"
)

FASHION_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)


def read_idx(path: str, magic: int) -> np.ndarray:
    """Read one unsigned-byte IDX file (optionally gzip-compressed), validating it first.

    Raises DataError naming ``path`` on a missing, truncated or corrupt file, a wrong magic
    number, or a header whose declared size does not match the file.
    """
    if not os.path.isfile(path):
        raise DataError(f"IDX file missing: {path}. Expected layout: {LAYOUT}")
    file_size = os.path.getsize(path)
    is_gz = path.endswith(".gz")
    isize = None
    if is_gz:
        with open(path, "rb") as raw:
            head = raw.read(2)
            if head != b"\x1f\x8b":
                raise DataError(f"{path}: not a gzip file (starts with {head!r}, expected 1f 8b)")
            if file_size < 18:
                raise DataError(f"{path}: truncated gzip file ({file_size} bytes)")
            raw.seek(-4, os.SEEK_END)
            (isize,) = struct.unpack("<I", raw.read(4))
    try:
        opener = gzip.open if is_gz else open
        with opener(path, "rb") as f:
            m = f.read(4)
            if len(m) < 4:
                raise DataError(f"{path}: truncated IDX header ({len(m)} of 4 magic bytes)")
            (got,) = struct.unpack(">I", m)
            if got != magic:
                raise DataError(
                    f"{path}: wrong IDX magic number 0x{got:08x}, expected 0x{magic:08x} "
                    f"({'images' if magic == IMAGES_MAGIC else 'labels'}, unsigned byte)"
                )
            ndim = magic & 0xFF
            dims_b = f.read(4 * ndim)
            if len(dims_b) < 4 * ndim:
                raise DataError(f"{path}: truncated IDX header (dimension sizes)")
            dims = struct.unpack(f">{ndim}I", dims_b)
            nbytes = prod(dims)
            total = 4 + 4 * ndim + nbytes
            if is_gz:
                limit = file_size * _DEFLATE_MAX_RATIO + 1024
                if total > limit:
                    raise DataError(
                        f"{path}: header declares shape {dims} ({total} bytes uncompressed) but a "
                        f"{file_size}-byte gzip file can hold at most {limit}; file is corrupt"
                    )
                if total % (1 << 32) != isize:
                    raise DataError(
                        f"{path}: header declares shape {dims} ({total} bytes uncompressed) but "
                        f"the gzip footer says {isize} bytes; truncated or corrupt file"
                    )
            elif total != file_size:
                raise DataError(
                    f"{path}: header declares shape {dims} ({total} bytes) but the file has "
                    f"{file_size} bytes"
                )
            out = np.empty(nbytes, dtype=np.uint8)
            view = memoryview(out)
            pos = 0
            while pos < nbytes:
                n = f.readinto(view[pos : pos + _CHUNK])
                if not n:
                    raise DataError(
                        f"{path}: truncated: {pos} of {nbytes} data bytes declared by the header"
                    )
                pos += n
            if f.read(1):
                raise DataError(f"{path}: trailing bytes after the {nbytes} declared data bytes")
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise DataError(f"{path}: corrupt or truncated gzip stream ({e})") from e
    return out.reshape(dims)


def _find(directory: str, stem: str) -> str:
    for cand in (stem + ".gz", stem):
        p = os.path.join(directory, cand)
        if os.path.isfile(p):
            return p
    raise DataError(
        f"IDX file missing: {os.path.join(directory, stem + '.gz')} (or uncompressed {stem}). "
        f"Expected layout: {LAYOUT}"
    )


def _read_split(directory: str, images: str, labels: str, num_classes: int):
    ip, lp = _find(directory, images), _find(directory, labels)
    x = read_idx(ip, IMAGES_MAGIC)
    y = read_idx(lp, LABELS_MAGIC)
    if x.shape[0] != y.shape[0]:
        raise DataError(f"{ip} holds {x.shape[0]} images but {lp} holds {y.shape[0]} labels")
    if y.size and int(y.max()) >= num_classes:
        raise DataError(f"{lp}: label {int(y.max())} outside [0, {num_classes})")
    return x, y


def load_idx(
    path: str,
    name: str = "fashion_mnist",
    *,
    num_classes: int = 10,
    normalize: str = "standard",
    class_names: tuple[str, ...] | None = None,
) -> Dataset:
    """Load an MNIST-format dataset (official 60k/10k train/test split) from ``path``."""
    if not os.path.isdir(path):
        raise DataError(f"{name}: directory {path} does not exist. Expected layout: {LAYOUT}")
    x, y = _read_split(path, IDX_FILES["train_images"], IDX_FILES["train_labels"], num_classes)
    xt, yt = _read_split(path, IDX_FILES["test_images"], IDX_FILES["test_labels"], num_classes)
    if x.shape[1:] != xt.shape[1:]:
        raise DataError(f"{path}: train images {x.shape[1:]} and test images {xt.shape[1:]} differ")
    xf = x[:, None].astype(np.float32)
    xf /= np.float32(255.0)
    xtf = xt[:, None].astype(np.float32)
    xtf /= np.float32(255.0)
    xf, xtf, meta = normalize_images(xf, xtf, normalize)
    meta["source"] = os.path.abspath(path)
    return Dataset(
        name=name, x=xf, y=y.astype(np.int64), x_test=xtf, y_test=yt.astype(np.int64),
        num_classes=num_classes, input_shape=xf.shape[1:], class_names=class_names, meta=meta,
    )
