"""Wire sizes of the tensor codecs: the byte layouts ``embedded.codec`` writes, as formulas.

Estimates use these; ``embedded.codec`` encodes with exactly these layouts and a test holds
``len(encode(x)) == tensor_bytes(...)``. All integers are little-endian.

Tensor frame::

    0  magic   b"ST"            2 bytes
    2  version u8 (= 1)
    3  codec   u8               CODECS index: dense32, coo32, csr32, bitmap, delta8
    4  dtype   u8               DTYPES index: f32, f16, i64, i32
    5  ndim    u8               0..8
    6  flags   u16 (= 0)
    8  dims    u32 × ndim
       nnz     u32              sparse codecs only
       body:
         dense32  numel × value bytes
         coo32    nnz × int32 flat index, then nnz values
         csr32    (rows + 1) × int32 row pointers, nnz × int32 column indices, nnz values
                  (rows = dims[0], cols = numel / rows; a 0-d tensor is 1 × 1)
         bitmap   ceil(numel / 8) bytes, bit i = element i (LSB first), then nnz values
         delta8   one gap per non-zero, gap = index − previous index − 1 (previous = −1):
                  a byte < 255, or 255 followed by the gap as u32 (5 bytes); then nnz values

State frame (many named tensors)::

    0  magic b"SD", version u8 (= 1), reserved u8, count u32           8 bytes
       per tensor: name length u16, name (UTF-8), frame length u32, tensor frame

The papers' own upload count ("CSR" of the vectorised weights) is one fp32 value plus one
int32 index per non-zero: ``paper_csr_bytes(nnz) = 8 * nnz``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np

CODECS = ("dense32", "coo32", "csr32", "bitmap", "delta8")
DTYPES = ("f32", "f16", "i64", "i32")
VALUE_BYTES = {"f32": 4, "f16": 2, "i64": 8, "i32": 4}
MAX_NDIM = 8
TENSOR_MAGIC = b"ST"
STATE_MAGIC = b"SD"
VERSION = 1
DELTA8_ESCAPE = 255


class WireError(ValueError):
    """Unknown codec or dtype, or an impossible size."""


def header_bytes(codec: str, ndim: int) -> int:
    """Bytes before the body: fixed header, dims, and ``nnz`` for sparse codecs."""
    _check_codec(codec)
    if not 0 <= ndim <= MAX_NDIM:
        raise WireError(f"ndim: expected 0..{MAX_NDIM}, got {ndim}")
    return 8 + 4 * ndim + (0 if codec == "dense32" else 4)


def delta8_gap_bytes(indices: np.ndarray) -> int:
    """Exact bytes of the delta8 gap stream for sorted flat ``indices``."""
    idx = np.asarray(indices, dtype=np.int64)
    if idx.size == 0:
        return 0
    gaps = np.diff(idx, prepend=-1) - 1
    return int(idx.size + 4 * np.count_nonzero(gaps >= DELTA8_ESCAPE))


def delta8_expected_gap_bytes(numel: int, nnz: int) -> float:
    """Expected delta8 gap-stream bytes when the ``nnz`` positions are uniformly random."""
    if nnz <= 0:
        return 0.0
    d = min(1.0, nnz / max(numel, 1))
    p_escape = (1.0 - d) ** DELTA8_ESCAPE
    return nnz * (1.0 + 4.0 * p_escape)


def tensor_bytes(codec: str, shape: tuple[int, ...], nnz: int | None = None,
                 dtype: str = "f32", indices: np.ndarray | None = None) -> int:
    """Exact size of one encoded tensor.

    ``nnz`` defaults to all elements; ``delta8`` needs the sorted flat ``indices`` for an exact
    count (without them the expected size under uniformly random positions is rounded).
    """
    _check_codec(codec)
    if dtype not in VALUE_BYTES:
        raise WireError(f"dtype: expected one of {DTYPES}, got {dtype!r}")
    vb = VALUE_BYTES[dtype]
    numel = math.prod(shape)
    if nnz is None:
        nnz = numel if indices is None else len(indices)
    if not 0 <= nnz <= numel:
        raise WireError(f"nnz={nnz} outside [0, {numel}] for shape {tuple(shape)}")
    h = header_bytes(codec, len(shape))
    if codec == "dense32":
        return h + numel * vb
    if codec == "coo32":
        return h + nnz * (4 + vb)
    if codec == "csr32":
        rows = shape[0] if len(shape) else 1
        return h + (rows + 1) * 4 + nnz * (4 + vb)
    if codec == "bitmap":
        return h + (numel + 7) // 8 + nnz * vb
    # delta8
    if indices is not None:
        gap = delta8_gap_bytes(indices)
    else:
        gap = round(delta8_expected_gap_bytes(numel, nnz))
    return h + gap + nnz * vb


def tensor_bytes_vec(codec: str, numel: np.ndarray, nnz: np.ndarray, ndim: np.ndarray,
                     rows: np.ndarray | None = None, dtype: str = "f32") -> np.ndarray:
    """Vectorised :func:`tensor_bytes` (delta8 by expectation) for fleet-scale estimates."""
    _check_codec(codec)
    vb = VALUE_BYTES[dtype]
    numel = np.asarray(numel, dtype=np.float64)
    nnz = np.asarray(nnz, dtype=np.float64)
    h = 8 + 4 * np.asarray(ndim, dtype=np.float64) + (0 if codec == "dense32" else 4)
    if codec == "dense32":
        return h + numel * vb
    if codec == "coo32":
        return h + nnz * (4 + vb)
    if codec == "csr32":
        r = np.ones_like(numel) if rows is None else np.asarray(rows, dtype=np.float64)
        return h + (r + 1) * 4 + nnz * (4 + vb)
    if codec == "bitmap":
        return h + np.ceil(numel / 8) + nnz * vb
    d = np.minimum(1.0, nnz / np.maximum(numel, 1))
    return h + np.rint(nnz * (1.0 + 4.0 * (1.0 - d) ** DELTA8_ESCAPE)) + nnz * vb


def state_entry_overhead(name: str) -> int:
    """Bytes a state frame adds around one tensor frame: name length, name, frame length."""
    return 2 + len(name.encode("utf-8")) + 4


def state_bytes(entries: Iterable[tuple[str, int]]) -> int:
    """Size of a state frame from ``(name, tensor frame bytes)`` pairs."""
    return 8 + sum(state_entry_overhead(n) + b for n, b in entries)


def paper_csr_bytes(nnz: int) -> int:
    """The papers' upload count: one fp32 value + one int32 index per non-zero."""
    return 8 * int(nnz)


def _check_codec(codec: str) -> None:
    if codec not in CODECS:
        raise WireError(f"codec: expected one of {', '.join(CODECS)}, got {codec!r}")
