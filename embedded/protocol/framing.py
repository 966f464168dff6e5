"""Frames on a byte stream: header + payload + CRC32, COBS-encoded, ``0x00``-delimited.

Layout of one frame before COBS (all integers little-endian)::

    offset size field
    0      1    version      protocol version of the sender (1)
    1      1    type         message type (embedded.protocol.messages.MSG)
    2      1    flags        bit 0 REPLY; other bits must be 0
    3      1    reserved     must be 0
    4      4    seq          sequence number (u32); a reply carries its request's seq
    8      4    length       payload length in bytes (u32), <= the receiver's max payload
    12     n    payload
    12+n   4    crc32        zlib.crc32 of bytes [0, 12+n)

On the wire: ``COBS(frame) + b"\\x00"``. COBS removes every zero byte from the frame, so a
``0x00`` always ends a frame: after garbage or a lost byte the decoder resynchronises at the
next delimiter. The decoder never buffers more than the largest legal encoded frame.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

PROTOCOL_VERSION = 1
#: Versions this implementation can speak (HELLO negotiates the highest common one).
SUPPORTED_VERSIONS = (1,)
#: Default maximum payload of one frame (bytes). Larger messages go as chunked transfers.
MAX_PAYLOAD = 64 * 1024

HEADER = struct.Struct("<BBBBII")
HEADER_SIZE = HEADER.size  # 12
CRC_SIZE = 4
FLAG_REPLY = 0x01
_KNOWN_FLAGS = FLAG_REPLY
DELIMITER = b"\x00"


class FrameError(ValueError):
    """A frame that cannot be decoded: bad COBS, bad CRC, bad header, too large."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"frame: {reason}" + (f": {detail}" if detail else ""))
        self.reason = reason


@dataclass(frozen=True)
class Frame:
    """One decoded frame."""

    type: int
    seq: int
    payload: bytes
    flags: int = 0
    version: int = PROTOCOL_VERSION

    @property
    def is_reply(self) -> bool:
        return bool(self.flags & FLAG_REPLY)


def max_encoded_size(max_payload: int) -> int:
    """Largest COBS-encoded frame (without delimiter) for a given max payload."""
    raw = HEADER_SIZE + max_payload + CRC_SIZE
    return raw + raw // 254 + 1


def cobs_encode(data: bytes) -> bytes:
    """Consistent-overhead byte stuffing: output has no ``0x00`` bytes."""
    out = bytearray()
    segs = bytes(data).split(b"\x00")
    last = len(segs) - 1
    for k, seg in enumerate(segs):
        mv = memoryview(seg)
        pos, n = 0, len(seg)
        while n - pos >= 254:
            out.append(0xFF)
            out += mv[pos:pos + 254]
            pos += 254
        if k == last and n and pos == n:
            break  # a final full block needs no trailing empty block (standard COBS)
        out.append(n - pos + 1)
        out += mv[pos:]
    return bytes(out)


def cobs_decode(enc: bytes) -> bytes:
    """Inverse of :func:`cobs_encode`; raises :class:`FrameError` on malformed input."""
    out = bytearray()
    i, n = 0, len(enc)
    while i < n:
        code = enc[i]
        if code == 0:
            raise FrameError("cobs", f"zero byte inside frame at {i}")
        j = i + code
        if j > n:
            raise FrameError("cobs", f"block at {i} runs past the end ({j} > {n})")
        out += enc[i + 1:j]
        i = j
        if code != 0xFF and i < n:
            out.append(0)
    return bytes(out)


def pack_frame(msg_type: int, seq: int, payload: bytes = b"", flags: int = 0,
               version: int = PROTOCOL_VERSION) -> bytes:
    """Raw (un-stuffed) frame bytes: header + payload + CRC32."""
    if not 0 <= msg_type <= 0xFF:
        raise ValueError(f"frame: type must be 0..255, got {msg_type}")
    if not 0 <= seq <= 0xFFFFFFFF:
        raise ValueError(f"frame: seq must be a u32, got {seq}")
    body = HEADER.pack(version, msg_type, flags, 0, seq, len(payload)) + bytes(payload)
    return body + struct.pack("<I", zlib.crc32(body))


def encode_frame(msg_type: int, seq: int, payload: bytes = b"", flags: int = 0,
                 version: int = PROTOCOL_VERSION) -> bytes:
    """Wire bytes of one frame: ``COBS(header + payload + crc) + 0x00``."""
    return cobs_encode(pack_frame(msg_type, seq, payload, flags, version)) + DELIMITER


def parse_frame(raw: bytes, max_payload: int = MAX_PAYLOAD) -> Frame:
    """Check and split raw (un-stuffed) frame bytes."""
    if len(raw) < HEADER_SIZE + CRC_SIZE:
        raise FrameError("short", f"{len(raw)} bytes, need at least {HEADER_SIZE + CRC_SIZE}")
    body, (crc,) = raw[:-CRC_SIZE], struct.unpack("<I", raw[-CRC_SIZE:])
    if zlib.crc32(body) != crc:
        raise FrameError("crc", "CRC32 mismatch")
    version, msg_type, flags, reserved, seq, length = HEADER.unpack_from(body)
    if reserved != 0 or flags & ~_KNOWN_FLAGS:
        raise FrameError("header", f"reserved bits set (flags={flags:#x}, reserved={reserved})")
    if length > max_payload:
        raise FrameError("too-large", f"payload length {length} > limit {max_payload}")
    if length != len(body) - HEADER_SIZE:
        raise FrameError("length", f"header says {length} bytes, frame has "
                         f"{len(body) - HEADER_SIZE}")
    return Frame(type=msg_type, seq=seq, payload=bytes(body[HEADER_SIZE:]), flags=flags,
                 version=version)


def decode_frame(enc: bytes, max_payload: int = MAX_PAYLOAD) -> Frame:
    """Decode one COBS-encoded frame (without its delimiter)."""
    if len(enc) > max_encoded_size(max_payload):
        raise FrameError("too-large", f"encoded frame of {len(enc)} bytes")
    return parse_frame(cobs_decode(enc), max_payload)


class FrameDecoder:
    """Incremental decoder: :meth:`feed` bytes, get frames and errors in arrival order.

    Memory is bounded: bytes without a delimiter beyond the largest legal encoded frame are
    dropped (one ``too-large`` error) and the decoder skips to the next ``0x00``.
    """

    def __init__(self, max_payload: int = MAX_PAYLOAD) -> None:
        self.max_payload = max_payload
        self.max_encoded = max_encoded_size(max_payload)
        self._buf = bytearray()
        self._discarding = False
        self.frames_ok = 0
        self.frames_bad = 0
        self.bytes_in = 0

    def feed(self, data: bytes) -> list[Frame | FrameError]:
        """Consume ``data``; return decoded frames and :class:`FrameError` s (in order)."""
        self.bytes_in += len(data)
        out: list[Frame | FrameError] = []
        start = 0
        n = len(data)
        while start < n:
            end = data.find(b"\x00", start)
            if end < 0:
                if not self._discarding:
                    self._buf += data[start:]
                    if len(self._buf) > self.max_encoded:
                        self._buf.clear()
                        self._discarding = True
                        self.frames_bad += 1
                        out.append(FrameError("too-large", "no delimiter within the frame limit"))
                break
            if self._discarding:
                self._discarding = False
                self._buf.clear()
            else:
                self._buf += data[start:end]
                if len(self._buf) > self.max_encoded:
                    self.frames_bad += 1
                    out.append(FrameError("too-large", f"encoded frame of {len(self._buf)} bytes"))
                elif self._buf:
                    try:
                        out.append(decode_frame(bytes(self._buf), self.max_payload))
                        self.frames_ok += 1
                    except FrameError as e:
                        self.frames_bad += 1
                        out.append(e)
                self._buf.clear()
            start = end + 1
        return out

    @property
    def pending(self) -> int:
        """Bytes buffered while waiting for a delimiter."""
        return len(self._buf)
