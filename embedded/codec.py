"""The wire codec: tensors and named tensor sets to bytes and back, in hwmodel.wire's layouts.

``len(encode(x, codec, dtype)) == hwmodel.wire.tensor_bytes(codec, x.shape, nnz, dtype,
indices=np.flatnonzero(x))`` for every codec, and a state frame's length is
``hwmodel.wire.state_bytes``. All integers little-endian; no pickle; everything vectorised.

Values
    Float tensors (any float dtype) are sent as ``f32`` (default) or ``f16`` and decode to
    float32 (``f16`` payloads too, unless ``upcast=False``). Integer tensors (BN's
    ``num_batches_tracked``, packed masks) stay exact: int64/uint32 -> ``i64``, narrower ints ->
    ``i32`` (an int64 tensor may be sent as ``i32`` when its values fit); they decode to
    int64/int32. Integer tensors may use every codec (the sparse ones store integer values).
    bool and complex tensors are rejected: send masks as packed int32 words or as 0/1 floats.
Sparse codecs
    store the non-zeros of ``x`` (``x != 0``); zeros are implicit. So ``-0.0`` decodes as
    ``+0.0`` (value-equal; a masked weight ``w * 0`` of a negative ``w`` is ``-0.0`` and must not
    count as a non-zero). NaNs are non-zeros and survive. Sparse codecs need ``numel < 2**31``
    (int32 indices).
Safety
    :func:`decode` checks magic, version, tags, ndim, flags, the declared size against
    ``max_elements`` and every length against the buffer *before* allocating anything, then
    validates indices (in range, strictly increasing), row pointers, bitmap popcount and
    delta8 escapes; any problem raises :class:`CodecError` naming the field.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping

import numpy as np

from hwmodel import wire
from hwmodel.wire import CODECS, DELTA8_ESCAPE, DTYPES, MAX_NDIM, VALUE_BYTES

#: Default bound on a decoded tensor's elements (64 Mi: 256 MiB of float32).
MAX_ELEMENTS = 1 << 26
#: Default bound on the elements of all tensors of a decoded state frame.
MAX_TOTAL_ELEMENTS = 1 << 27
#: Most tensors one state frame may hold.
MAX_STATE_ENTRIES = 65536

_WIRE_DTYPE = {"f32": np.dtype("<f4"), "f16": np.dtype("<f2"), "i64": np.dtype("<i8"),
               "i32": np.dtype("<i4")}
_HEAD = struct.Struct("<2sBBBBH")  # magic, version, codec, dtype, ndim, flags
_STATE_HEAD = struct.Struct("<2sBBI")  # magic, version, reserved, count
_INT32_MAX = (1 << 31) - 1
_U32_MAX = (1 << 32) - 1
_F16_MAX = 65504.0


class CodecError(ValueError):
    """Bytes that are not a valid frame, or a tensor/codec/dtype that cannot be encoded."""


# ====================================================================== encoding
def _value_dtype(x: np.ndarray, dtype: str | None) -> str:
    """The wire dtype tag for ``x`` (``dtype`` None = automatic)."""
    kind = x.dtype.kind
    if kind == "f":
        if dtype is None:
            return "f32"
        if dtype not in ("f32", "f16"):
            raise CodecError(f"dtype: a float tensor is sent as 'f32' or 'f16', got {dtype!r}")
        return dtype
    if kind in "iu":
        if dtype is None:
            if x.dtype.itemsize >= 8 or x.dtype == np.uint32:
                return "i64"
            return "i32"
        if dtype not in ("i64", "i32"):
            raise CodecError(
                f"dtype: an integer tensor ({x.dtype}) stays exact as 'i64' or 'i32', got {dtype!r}"
            )
        return dtype
    raise CodecError(
        f"dtype: cannot encode a {x.dtype} tensor; floats and integers only "
        "(send masks as packed int32 words or as 0/1 floats)"
    )


def _as_wire(vals: np.ndarray, tag: str) -> np.ndarray:
    """``vals`` cast to the wire dtype; a lossy integer or fp16 overflow is an error."""
    want = _WIRE_DTYPE[tag]
    if tag in ("i64", "i32") and vals.size:
        info = np.iinfo(want)
        lo, hi = vals.min(), vals.max()
        if int(lo) < info.min or int(hi) > info.max:
            raise CodecError(f"dtype {tag!r}: values in [{lo}, {hi}] do not fit")
    out = vals.astype(want, copy=False)
    if tag == "f16" and vals.size:
        bad_in = np.count_nonzero(~np.isfinite(vals))
        if np.count_nonzero(~np.isfinite(out)) != bad_in:
            raise CodecError(f"dtype 'f16': values beyond ±{_F16_MAX:g} would become inf")
    return out


def _check_array(x: object) -> np.ndarray:
    if not isinstance(x, np.ndarray):
        if isinstance(x, (int, float, np.generic)) and not isinstance(x, bool):
            x = np.asarray(x)
        else:
            raise CodecError(f"encode: expected a numpy array, got {type(x).__name__}")
    if x.ndim > MAX_NDIM:
        raise CodecError(f"encode: ndim {x.ndim} > {MAX_NDIM}")
    for d in x.shape:
        if d > _U32_MAX:
            raise CodecError(f"encode: dimension {d} does not fit in u32")
    return x


def _header(codec: str, tag: str, shape: tuple[int, ...], nnz: int | None) -> bytes:
    head = _HEAD.pack(wire.TENSOR_MAGIC, wire.VERSION, CODECS.index(codec), DTYPES.index(tag),
                      len(shape), 0)
    dims = struct.pack(f"<{len(shape)}I", *shape)
    return head + dims + (b"" if nnz is None else struct.pack("<I", nnz))


def _delta8_gaps(idx: np.ndarray) -> bytes:
    """The delta8 gap stream of sorted flat indices, vectorised."""
    if idx.size == 0:
        return b""
    gaps = np.diff(idx, prepend=-1) - 1
    esc = gaps >= DELTA8_ESCAPE
    if not esc.any():
        return gaps.astype(np.uint8).tobytes()
    # each escaped gap takes 4 extra bytes: its token starts 4·(escapes before it) later
    off = np.arange(idx.size, dtype=np.int64)
    off[1:] += 4 * np.cumsum(esc[:-1], dtype=np.int64)
    out = np.empty(idx.size + 4 * int(np.count_nonzero(esc)), dtype=np.uint8)
    out[off[~esc]] = gaps[~esc]
    eoff = off[esc]
    out[eoff] = DELTA8_ESCAPE
    payload = gaps[esc].astype("<u4").view(np.uint8).reshape(-1, 4)
    out[eoff[:, None] + np.arange(1, 5)] = payload
    return out.tobytes()


def encode(x: np.ndarray, codec: str = "dense32", dtype: str | None = None) -> bytes:
    """Encode one tensor as a tensor frame (hwmodel.wire layout).

    ``codec``: one of ``hwmodel.wire.CODECS`` or ``"best"`` (:func:`best_codec`).
    ``dtype``: ``"f32"``/``"f16"`` for float tensors (default f32), ``"i64"``/``"i32"`` for
    integer tensors (default by width); None picks the default.
    """
    x = _check_array(x)
    tag = _value_dtype(x, dtype)
    if codec == "best":
        codec = best_codec(x, tag)
    if codec not in CODECS:
        raise CodecError(f"codec: expected one of {', '.join(CODECS)} or 'best', got {codec!r}")
    shape = tuple(int(d) for d in x.shape)
    flat = x.reshape(-1)
    if codec == "dense32":
        return _header(codec, tag, shape, None) + _as_wire(flat, tag).tobytes()
    numel = flat.size
    if numel > _INT32_MAX:
        raise CodecError(f"codec {codec!r}: {numel} elements exceed int32 indices")
    idx = np.flatnonzero(flat)
    vals = _as_wire(flat[idx], tag).tobytes()
    head = _header(codec, tag, shape, idx.size)
    if codec == "coo32":
        return head + idx.astype("<i4").tobytes() + vals
    if codec == "csr32":
        rows = shape[0] if shape else 1
        cols = numel // rows if rows else 0
        if cols:
            r, c = np.divmod(idx, cols)
            counts = np.bincount(r, minlength=rows)
        else:
            c = idx
            counts = np.zeros(rows, dtype=np.int64)
        indptr = np.zeros(rows + 1, dtype="<i4")
        np.cumsum(counts, out=indptr[1:])
        return head + indptr.tobytes() + c.astype("<i4").tobytes() + vals
    if codec == "bitmap":
        bits = np.packbits(flat != 0, bitorder="little")
        return head + bits.tobytes() + vals
    return head + _delta8_gaps(idx) + vals  # delta8


def best_codec(x: np.ndarray, dtype: str | None = None) -> str:
    """The codec with the smallest ``hwmodel.wire.tensor_bytes`` for ``x`` (ties: CODECS order).

    ``dtype`` applies to float tensors; an integer tensor keeps its integer tag whatever the
    float tag asked for (so ``best_codec(state[k], "f16")`` works on every state tensor).
    """
    x = _check_array(x)
    if x.dtype.kind in "iu" and dtype in ("f32", "f16"):
        dtype = None
    tag = _value_dtype(x, dtype)
    shape = tuple(int(d) for d in x.shape)
    if x.size > _INT32_MAX:
        return "dense32"
    idx = np.flatnonzero(x.reshape(-1))
    sizes = [wire.tensor_bytes(c, shape, idx.size, tag, indices=idx) for c in CODECS]
    return CODECS[int(np.argmin(sizes))]


# ====================================================================== decoding
def _buffer(b: object, what: str) -> np.ndarray:
    if isinstance(b, np.ndarray):
        raise CodecError(f"{what}: expected bytes, bytearray or memoryview, got a numpy array")
    try:
        mv = memoryview(b)  # type: ignore[arg-type]
    except TypeError:
        raise CodecError(f"{what}: expected bytes, got {type(b).__name__}") from None
    if not mv.c_contiguous:
        raise CodecError(f"{what}: the buffer is not contiguous")
    return np.frombuffer(mv.cast("B"), dtype=np.uint8)


class _Parts:
    """A parsed tensor frame: shape, wire dtype tag, codec, flat indices (None = dense), values."""

    __slots__ = ("codec", "tag", "shape", "indices", "values")

    def __init__(self, codec: str, tag: str, shape: tuple[int, ...],
                 indices: np.ndarray | None, values: np.ndarray):
        self.codec, self.tag, self.shape = codec, tag, shape
        self.indices, self.values = indices, values


def _parse(buf: np.ndarray, max_elements: int, what: str) -> _Parts:
    n = buf.size
    if n < _HEAD.size:
        raise CodecError(f"{what}: {n} bytes is shorter than the {_HEAD.size}-byte header")
    magic, version, ci, di, ndim, flags = _HEAD.unpack_from(buf, 0)
    if magic != wire.TENSOR_MAGIC:
        raise CodecError(f"{what}: magic {magic!r} is not {wire.TENSOR_MAGIC!r}")
    if version != wire.VERSION:
        raise CodecError(f"{what}: version {version} is not {wire.VERSION}")
    if ci >= len(CODECS):
        raise CodecError(f"{what}: unknown codec tag {ci} (known 0..{len(CODECS) - 1})")
    if di >= len(DTYPES):
        raise CodecError(f"{what}: unknown dtype tag {di} (known 0..{len(DTYPES) - 1})")
    if ndim > MAX_NDIM:
        raise CodecError(f"{what}: ndim {ndim} > {MAX_NDIM}")
    if flags != 0:
        raise CodecError(f"{what}: flags {flags:#06x} are not 0")
    codec, tag = CODECS[ci], DTYPES[di]
    head = wire.header_bytes(codec, ndim)
    if n < head:
        raise CodecError(f"{what}: {n} bytes is shorter than the {head}-byte header of "
                         f"a {ndim}-d {codec} frame (truncated)")
    shape = struct.unpack_from(f"<{ndim}I", buf, 8)
    numel = math.prod(shape)
    if numel > max_elements:
        raise CodecError(f"{what}: shape {shape} has {numel:,} elements, more than "
                         f"max_elements={max_elements:,}")
    vdt = _WIRE_DTYPE[tag]
    vb = VALUE_BYTES[tag]
    body = n - head
    if codec == "dense32":
        if body != numel * vb:
            raise CodecError(f"{what}: dense32 body is {body} bytes, expected {numel} × {vb} = "
                             f"{numel * vb} (wrong length)")
        return _Parts(codec, tag, shape, None, np.frombuffer(buf, vdt, numel, head))
    (nnz,) = struct.unpack_from("<I", buf, head - 4)
    if nnz > numel:
        raise CodecError(f"{what}: nnz {nnz} > numel {numel} of shape {shape}")
    vals_at = n - nnz * vb
    if codec == "coo32":
        _expect(body, nnz * (4 + vb), codec, what)
        idx = np.frombuffer(buf, "<i4", nnz, head).astype(np.int64)
        _check_indices(idx, numel, "coo32 index", what)
    elif codec == "csr32":
        rows = shape[0] if shape else 1
        cols = numel // rows if rows else 0
        _expect(body, (rows + 1) * 4 + nnz * (4 + vb), codec, what)
        indptr = np.frombuffer(buf, "<i4", rows + 1, head).astype(np.int64)
        if indptr[0] != 0 or indptr[-1] != nnz:
            raise CodecError(f"{what}: csr32 row pointers run {indptr[0]}..{indptr[-1]}, "
                             f"expected 0..nnz={nnz}")
        counts = np.diff(indptr)
        if counts.size and counts.min() < 0:
            raise CodecError(f"{what}: csr32 row pointers are not monotone (row "
                             f"{int(np.argmax(counts < 0))})")
        col = np.frombuffer(buf, "<i4", nnz, head + (rows + 1) * 4).astype(np.int64)
        if nnz and (col.min() < 0 or col.max() >= cols):
            raise CodecError(f"{what}: csr32 column index outside [0, {cols})")
        idx = np.repeat(np.arange(rows, dtype=np.int64), counts) * cols + col
        if nnz > 1 and np.diff(idx).min() <= 0:
            raise CodecError(f"{what}: csr32 column indices not strictly increasing within a row")
    elif codec == "bitmap":
        nbits = (numel + 7) // 8
        _expect(body, nbits + nnz * vb, codec, what)
        bits = buf[head:head + nbits]
        pop = int(np.bitwise_count(bits).sum(dtype=np.int64))
        if pop != nnz:
            raise CodecError(f"{what}: bitmap has {pop} bits set but nnz is {nnz}")
        if numel % 8 and int(bits[-1]) >> (numel % 8):
            raise CodecError(f"{what}: bitmap sets padding bits beyond element {numel}")
        idx = np.flatnonzero(np.unpackbits(bits, count=numel, bitorder="little"))
    else:  # delta8
        glen = body - nnz * vb
        if glen < nnz or glen > 5 * nnz:
            raise CodecError(f"{what}: delta8 gap stream of {glen} bytes cannot hold {nnz} gaps "
                             f"(needs {nnz}..{5 * nnz}; wrong length)")
        idx = _delta8_decode(buf[head:head + glen], nnz, numel, what)
    return _Parts(codec, tag, shape, idx, np.frombuffer(buf, vdt, nnz, vals_at))


def _expect(body: int, want: int, codec: str, what: str) -> None:
    if body != want:
        raise CodecError(f"{what}: {codec} body is {body} bytes, expected {want} (wrong length)")


def _check_indices(idx: np.ndarray, numel: int, name: str, what: str) -> None:
    if idx.size == 0:
        return
    if idx[0] < 0 or idx[-1] >= numel or idx.min() < 0 or idx.max() >= numel:
        raise CodecError(f"{what}: {name} outside [0, {numel})")
    if idx.size > 1 and np.diff(idx).min() <= 0:
        raise CodecError(f"{what}: {name}s are not strictly increasing")


def _delta8_decode(g: np.ndarray, nnz: int, numel: int, what: str) -> np.ndarray:
    """Parse a delta8 gap stream into flat indices, vectorised.

    A byte 255 is either an escape (a token start, followed by a u32 gap) or a byte of an
    escape's payload. The first 255 is always an escape; after an escape at ``c`` the next
    escape is the first 255 at or after ``c + 5`` (everything between is one-byte gaps). The
    escapes are the orbit of the first candidate under that map: found by pointer doubling.
    """
    cand = np.flatnonzero(g == DELTA8_ESCAPE)
    m = cand.size
    orbit = np.zeros(min(m, 1), dtype=np.int64)  # candidate 0 is an escape, if any
    if m:
        jump = np.append(np.searchsorted(cand, cand + 5), m)  # slot m: past the end
        while True:  # orbit = f^t(0) for t < 2^k; jump = f^(2^k)
            img = jump[orbit]
            img = img[img < m]  # the orbit is strictly increasing until it leaves
            orbit = np.concatenate([orbit, img])
            if img.size < orbit.size - img.size:
                break
            jump = jump[jump]
    esc = cand[orbit]
    if esc.size and esc[-1] + 4 >= g.size:
        raise CodecError(f"{what}: delta8 escape at byte {int(esc[-1])} is truncated")
    ntok = g.size - 4 * esc.size
    if ntok != nnz:
        raise CodecError(f"{what}: delta8 gap stream holds {ntok} gaps, nnz is {nnz}")
    if esc.size == 0:
        gaps = g.astype(np.int64)
    else:
        payload_mask = np.ones(g.size, dtype=bool)
        payload_mask[(esc[:, None] + np.arange(1, 5)).ravel()] = False
        starts = np.flatnonzero(payload_mask)
        gaps = g[starts].astype(np.int64)
        pay = g[esc[:, None] + np.arange(1, 5)].copy().view("<u4").ravel().astype(np.int64)
        if pay.min() < DELTA8_ESCAPE:
            raise CodecError(f"{what}: delta8 escaped gap {int(pay.min())} < {DELTA8_ESCAPE} "
                             "(not canonical)")
        gaps[np.searchsorted(starts, esc)] = pay
    gaps += 1
    idx = np.cumsum(gaps, out=gaps)
    idx -= 1
    if nnz and idx[-1] >= numel:
        raise CodecError(f"{what}: delta8 index {int(idx[-1])} outside [0, {numel})")
    return idx


def _densify(p: _Parts, upcast: bool) -> np.ndarray:
    out_dt = np.dtype(np.float32) if p.tag == "f32" or (p.tag == "f16" and upcast) else \
        np.dtype(np.float16) if p.tag == "f16" else \
        np.dtype(np.int64) if p.tag == "i64" else np.dtype(np.int32)
    numel = math.prod(p.shape)
    if p.indices is None:
        out = p.values.astype(out_dt)  # always a fresh, writable, native-endian copy
    else:
        out = np.zeros(numel, dtype=out_dt)
        out[p.indices] = p.values
    return out.reshape(p.shape)


def decode(b: bytes | bytearray | memoryview, max_elements: int = MAX_ELEMENTS,
           upcast: bool = True) -> np.ndarray:
    """Decode one tensor frame into a dense array (float32, int64 or int32).

    ``f16`` payloads decode to float32 unless ``upcast=False``. Raises :class:`CodecError`
    for any malformed input, before allocating more than ``max_elements`` elements.
    """
    return _densify(_parse(_buffer(b, "tensor frame"), max_elements, "tensor frame"), upcast)


def decode_sparse(b: bytes | bytearray | memoryview, max_elements: int = MAX_ELEMENTS
                  ) -> tuple[tuple[int, ...], np.ndarray | None, np.ndarray]:
    """``(shape, flat indices or None for dense32, values)`` without densifying."""
    p = _parse(_buffer(b, "tensor frame"), max_elements, "tensor frame")
    return p.shape, p.indices, p.values.copy()


# ====================================================================== state frames
def encode_state(tensors: Mapping[str, np.ndarray], codecs: Mapping[str, str] | str = "dense32",
                 dtype: Mapping[str, str] | str | None = None) -> bytes:
    """Encode named tensors as a state frame.

    ``codecs``: one codec (or ``"best"``) for all, or a per-name mapping (missing names:
    dense32). ``dtype``: ``"f32"``/``"f16"`` (or a per-name mapping) applied to float tensors;
    integer tensors always stay exact.
    """
    if not isinstance(tensors, Mapping):
        raise CodecError(f"encode_state: expected a mapping of name -> array, got "
                         f"{type(tensors).__name__}")
    if len(tensors) > MAX_STATE_ENTRIES:
        raise CodecError(f"encode_state: {len(tensors)} tensors > {MAX_STATE_ENTRIES}")
    if isinstance(codecs, Mapping):
        unknown = set(codecs) - set(tensors)
        if unknown:
            raise CodecError(f"encode_state: codecs name unknown tensors {sorted(unknown)}")
    parts = [_STATE_HEAD.pack(wire.STATE_MAGIC, wire.VERSION, 0, len(tensors))]
    for name, x in tensors.items():
        if not isinstance(name, str) or not name:
            raise CodecError(f"encode_state: tensor names must be non-empty strings, got {name!r}")
        nb = name.encode("utf-8")
        if len(nb) > 0xFFFF:
            raise CodecError(f"encode_state: name {name[:40]!r}... longer than 65535 bytes")
        codec = codecs.get(name, "dense32") if isinstance(codecs, Mapping) else codecs
        dt = dtype.get(name) if isinstance(dtype, Mapping) else dtype
        x = _check_array(x)
        if x.dtype.kind in "iu" and dt in ("f32", "f16"):
            dt = None
        try:
            frame = encode(x, codec, dt)
        except CodecError as e:
            raise CodecError(f"encode_state: tensor {name!r}: {e}") from None
        if len(frame) > _U32_MAX:
            raise CodecError(f"encode_state: tensor {name!r} frame exceeds 4 GiB")
        parts.append(struct.pack("<H", len(nb)) + nb + struct.pack("<I", len(frame)))
        parts.append(frame)
    return b"".join(parts)


def decode_state(b: bytes | bytearray | memoryview,
                 max_total_elements: int = MAX_TOTAL_ELEMENTS,
                 upcast: bool = True) -> dict[str, np.ndarray]:
    """Decode a state frame into ``{name: array}`` (in frame order).

    Every entry is validated before its tensor is allocated; the elements of all tensors
    together may not exceed ``max_total_elements``.
    """
    buf = _buffer(b, "state frame")
    n = buf.size
    if n < _STATE_HEAD.size:
        raise CodecError(f"state frame: {n} bytes is shorter than the 8-byte header")
    magic, version, reserved, count = _STATE_HEAD.unpack_from(buf, 0)
    if magic != wire.STATE_MAGIC:
        raise CodecError(f"state frame: magic {magic!r} is not {wire.STATE_MAGIC!r}")
    if version != wire.VERSION:
        raise CodecError(f"state frame: version {version} is not {wire.VERSION}")
    if reserved != 0:
        raise CodecError(f"state frame: reserved byte is {reserved}, expected 0")
    min_entry = 2 + 1 + 4 + 8  # name length, a 1-byte name, frame length, smallest frame
    if count > MAX_STATE_ENTRIES or count * min_entry > n - _STATE_HEAD.size:
        raise CodecError(f"state frame: count {count} cannot fit in {n} bytes "
                         f"(or exceeds {MAX_STATE_ENTRIES})")
    # pass 1: locate and parse every entry (no dense tensor allocated yet)
    entries: list[tuple[str, _Parts]] = []
    seen: set[str] = set()
    pos, total = _STATE_HEAD.size, 0
    for i in range(count):
        where = f"state frame entry {i}"
        if pos + 2 > n:
            raise CodecError(f"{where}: truncated before the name length")
        (ln,) = struct.unpack_from("<H", buf, pos)
        pos += 2
        if ln == 0 or pos + ln + 4 > n:
            raise CodecError(f"{where}: name length {ln} is empty or runs past the end")
        try:
            name = buf[pos:pos + ln].tobytes().decode("utf-8")
        except UnicodeDecodeError:
            raise CodecError(f"{where}: name is not valid UTF-8") from None
        pos += ln
        if name in seen:
            raise CodecError(f"{where}: duplicate tensor name {name!r}")
        seen.add(name)
        (fl,) = struct.unpack_from("<I", buf, pos)
        pos += 4
        if pos + fl > n:
            raise CodecError(f"{where} ({name!r}): frame of {fl} bytes runs past the end "
                             "(truncated)")
        parts = _parse(buf[pos:pos + fl], max_total_elements - total, f"{where} ({name!r})")
        total += math.prod(parts.shape)
        entries.append((name, parts))
        pos += fl
    if pos != n:
        raise CodecError(f"state frame: {n - pos} trailing bytes after {count} entries")
    return {name: _densify(p, upcast) for name, p in entries}
