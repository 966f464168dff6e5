"""Message types, error codes, and the typed payload encoding (no pickle, no eval).

A payload is one *value* in a small tagged encoding (little-endian)::

    tag  value      body
    0x00 None       -
    0x01 False      -
    0x02 True       -
    0x03 int        i64
    0x04 float      f64
    0x05 str        u32 n, n bytes UTF-8
    0x06 bytes      u32 n, n bytes
    0x07 list       u32 count, count values
    0x08 dict       u32 count, count x (u32 n + n bytes UTF-8 key, value)

Every length and count is checked against the bytes that remain before anything is sliced or
allocated (a count can never exceed the remaining bytes, since every value takes at least one
byte); nesting is limited to :data:`MAX_DEPTH`. Each message type's payload is a dict whose
fields are checked against :data:`SCHEMAS` (name, type, required) with errors naming the field.

The transport messages (BULK_BEGIN, BULK_CHUNK, BULK_ACK) use fixed ``struct`` layouts instead,
documented in ``docs/protocol.md`` and :mod:`embedded.protocol.transport`.
"""

from __future__ import annotations

import struct
from enum import IntEnum
from typing import Any


class MSG(IntEnum):
    """Message type numbers (frame header byte 1)."""

    HELLO = 0x01
    AUTH = 0x02
    INFO = 0x03
    PING = 0x04
    ECHO = 0x05
    LOAD = 0x06
    ABORT = 0x07
    RESET = 0x08
    # Training and measurement (dispatch table entries; handlers plug in later)
    TRAIN = 0x10
    EVAL = 0x11
    BENCH = 0x12
    LOAD_MODEL = 0x13
    LOAD_DATA = 0x14
    INFER_BENCH = 0x15
    # Transport
    BULK_BEGIN = 0x70
    BULK_CHUNK = 0x71
    BULK_ACK = 0x72
    ERROR = 0x7F


class ERR(IntEnum):
    """Error codes carried by ERROR frames."""

    BAD_FRAME = 1          # undecodable frame (COBS, CRC, header)
    BAD_VERSION = 2        # frame version not negotiated / no common version
    UNKNOWN_TYPE = 3       # message type unknown
    MALFORMED = 4          # payload does not decode or fails its schema
    UNAUTHORIZED = 5       # command needs pairing (HELLO + AUTH) first
    AUTH_FAILED = 6        # wrong HMAC
    TOO_LARGE = 7          # a declared size exceeds a limit
    NOT_IMPLEMENTED = 8    # known command, not implemented by this agent yet
    BUSY = 9               # a long command is running
    ABORTED = 10           # the command was aborted
    TRANSFER = 11          # chunked transfer failed (checksum, sequence)
    INTERNAL = 12          # handler raised; the agent keeps running
    REFUSED = 13           # request refused (e.g. path outside the data root)


#: Reply of a request has the same type with the REPLY flag set; ERROR replaces it on failure.
MAX_DEPTH = 16
MAX_ITEMS = 1 << 20

_T_NONE, _T_FALSE, _T_TRUE, _T_INT, _T_FLOAT, _T_STR, _T_BYTES, _T_LIST, _T_DICT = range(9)
_I64 = struct.Struct("<q")
_F64 = struct.Struct("<d")
_U32 = struct.Struct("<I")


class PayloadError(ValueError):
    """A payload that does not decode or does not match its message schema."""


def encode_payload(value: Any) -> bytes:
    """Encode a value (None, bool, int, float, str, bytes, list/tuple, dict[str, ...])."""
    out = bytearray()
    _enc(value, out, 0)
    return bytes(out)


def _enc(v: Any, out: bytearray, depth: int) -> None:
    if depth > MAX_DEPTH:
        raise PayloadError(f"payload: nesting deeper than {MAX_DEPTH}")
    if v is None:
        out.append(_T_NONE)
    elif v is True:
        out.append(_T_TRUE)
    elif v is False:
        out.append(_T_FALSE)
    elif isinstance(v, int):
        if not -(1 << 63) <= v < (1 << 63):
            raise PayloadError(f"payload: integer {v} does not fit in i64")
        out.append(_T_INT)
        out += _I64.pack(v)
    elif isinstance(v, float):
        out.append(_T_FLOAT)
        out += _F64.pack(v)
    elif isinstance(v, str):
        b = v.encode("utf-8")
        out.append(_T_STR)
        out += _U32.pack(len(b))
        out += b
    elif isinstance(v, (bytes, bytearray, memoryview)):
        b = bytes(v)
        out.append(_T_BYTES)
        out += _U32.pack(len(b))
        out += b
    elif isinstance(v, (list, tuple)):
        out.append(_T_LIST)
        out += _U32.pack(len(v))
        for x in v:
            _enc(x, out, depth + 1)
    elif isinstance(v, dict):
        out.append(_T_DICT)
        out += _U32.pack(len(v))
        for k, x in v.items():
            if not isinstance(k, str):
                raise PayloadError(f"payload: dict keys must be str, got {type(k).__name__}")
            kb = k.encode("utf-8")
            out += _U32.pack(len(kb))
            out += kb
            _enc(x, out, depth + 1)
    else:
        # numpy scalars and the like: accept plain int/float conversions only
        if hasattr(v, "item") and not hasattr(v, "__len__"):
            _enc(v.item(), out, depth)
            return
        raise PayloadError(f"payload: cannot encode {type(v).__name__}")


def decode_payload(data: bytes) -> Any:
    """Decode a payload; raises :class:`PayloadError` on anything malformed or trailing."""
    mv = memoryview(bytes(data))
    value, pos = _dec(mv, 0, 0)
    if pos != len(mv):
        raise PayloadError(f"payload: {len(mv) - pos} trailing bytes")
    return value


def _need(mv: memoryview, pos: int, n: int, what: str) -> None:
    if n < 0 or pos + n > len(mv):
        raise PayloadError(f"payload: {what} needs {n} bytes at offset {pos}, "
                           f"{len(mv) - pos} remain")


def _dec(mv: memoryview, pos: int, depth: int) -> tuple[Any, int]:
    if depth > MAX_DEPTH:
        raise PayloadError(f"payload: nesting deeper than {MAX_DEPTH}")
    _need(mv, pos, 1, "tag")
    tag = mv[pos]
    pos += 1
    if tag == _T_NONE:
        return None, pos
    if tag == _T_FALSE:
        return False, pos
    if tag == _T_TRUE:
        return True, pos
    if tag == _T_INT:
        _need(mv, pos, 8, "int")
        return _I64.unpack_from(mv, pos)[0], pos + 8
    if tag == _T_FLOAT:
        _need(mv, pos, 8, "float")
        return _F64.unpack_from(mv, pos)[0], pos + 8
    if tag in (_T_STR, _T_BYTES):
        _need(mv, pos, 4, "length")
        (n,) = _U32.unpack_from(mv, pos)
        pos += 4
        _need(mv, pos, n, "string" if tag == _T_STR else "bytes")
        raw = bytes(mv[pos:pos + n])
        if tag == _T_STR:
            try:
                return raw.decode("utf-8"), pos + n
            except UnicodeDecodeError as e:
                raise PayloadError(f"payload: invalid UTF-8 string at offset {pos}") from e
        return raw, pos + n
    if tag in (_T_LIST, _T_DICT):
        _need(mv, pos, 4, "count")
        (count,) = _U32.unpack_from(mv, pos)
        pos += 4
        if count > len(mv) - pos or count > MAX_ITEMS:
            raise PayloadError(f"payload: count {count} exceeds the {len(mv) - pos} bytes left")
        if tag == _T_LIST:
            items = []
            for _ in range(count):
                x, pos = _dec(mv, pos, depth + 1)
                items.append(x)
            return items, pos
        d: dict[str, Any] = {}
        for _ in range(count):
            _need(mv, pos, 4, "key length")
            (kn,) = _U32.unpack_from(mv, pos)
            pos += 4
            _need(mv, pos, kn, "key")
            try:
                key = bytes(mv[pos:pos + kn]).decode("utf-8")
            except UnicodeDecodeError as e:
                raise PayloadError(f"payload: invalid UTF-8 key at offset {pos}") from e
            pos += kn
            if key in d:
                raise PayloadError(f"payload: duplicate key {key!r}")
            d[key], pos = _dec(mv, pos, depth + 1)
        return d, pos
    raise PayloadError(f"payload: unknown tag {tag:#04x} at offset {pos - 1}")


# --- schemas: message type -> {field: (types, required)} ------------------------------------
_NUM = (int, float)
_S = {
    "hello": {"min_version": (int, True), "max_version": (int, True), "client": (str, False)},
    "hello_reply": {"version": (int, True), "nonce": (bytes, True), "board_uuid": (str, True),
                    "agent": (str, True), "paired": (bool, True), "max_payload": (int, True),
                    "max_transfer": (int, True)},
    "auth": {"nonce": (bytes, True), "mac": (bytes, True)},
    "auth_reply": {"mac": (bytes, True)},
    "ping": {"t": (_NUM, False)},
    "echo": {"data": (bytes, True)},
    "load": {"name": (str, True), "data": (bytes, True)},
    "load_reply": {"name": (str, True), "size": (int, True), "sha256": (bytes, True)},
    "abort": {},
    "error": {"code": (int, True), "name": (str, True), "message": (str, True),
              "ref_type": (int, False)},
}

#: (message type, is_reply) -> schema. Types missing here take any dict payload.
SCHEMAS: dict[tuple[int, bool], dict[str, tuple[Any, bool]]] = {
    (MSG.HELLO, False): _S["hello"],
    (MSG.HELLO, True): _S["hello_reply"],
    (MSG.AUTH, False): _S["auth"],
    (MSG.AUTH, True): _S["auth_reply"],
    (MSG.PING, False): _S["ping"],
    (MSG.ECHO, False): _S["echo"],
    (MSG.ECHO, True): _S["echo"],
    (MSG.LOAD, False): _S["load"],
    (MSG.LOAD, True): _S["load_reply"],
    (MSG.ABORT, False): _S["abort"],
    (MSG.ERROR, True): _S["error"],
    (MSG.ERROR, False): _S["error"],
}


def check_fields(msg_type: int, is_reply: bool, obj: Any) -> dict:
    """Check a decoded payload against its schema; return it (a dict) or raise PayloadError."""
    try:
        name = MSG(msg_type).name
    except ValueError:
        name = f"type {msg_type:#04x}"
    what = f"{name}{' reply' if is_reply else ''}"
    if not isinstance(obj, dict):
        raise PayloadError(f"{what}: payload must be a dict, got {type(obj).__name__}")
    schema = SCHEMAS.get((msg_type, is_reply))
    if schema is None:
        return obj
    for field, (types, required) in schema.items():
        if field not in obj:
            if required:
                raise PayloadError(f"{what}: missing field {field!r}")
            continue
        v = obj[field]
        ok = isinstance(v, types) and not (isinstance(v, bool) and types in (int, _NUM))
        if not ok:
            tn = types.__name__ if isinstance(types, type) else "/".join(t.__name__ for t in types)
            raise PayloadError(f"{what}: field {field!r} must be {tn}, got {type(v).__name__}")
    return obj


def decode_message(msg_type: int, is_reply: bool, payload: bytes) -> dict:
    """Decode and schema-check one message payload (empty payload = empty dict)."""
    obj = decode_payload(payload) if payload else {}
    return check_fields(msg_type, is_reply, obj)


def error_payload(code: ERR | int, message: str, ref_type: int | None = None) -> bytes:
    """Payload of an ERROR frame."""
    try:
        name = ERR(code).name
    except ValueError:
        name = f"E{int(code)}"
    d: dict[str, Any] = {"code": int(code), "name": name, "message": message[:1000]}
    if ref_type is not None:
        d["ref_type"] = int(ref_type)
    return encode_payload(d)
