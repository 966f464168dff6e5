"""Framing (COBS, header, CRC32, resynchronisation) and the typed payload encoding."""

from __future__ import annotations

import random
import struct
import zlib

import pytest

from embedded.protocol.framing import (
    HEADER_SIZE,
    MAX_PAYLOAD,
    FrameDecoder,
    FrameError,
    cobs_decode,
    cobs_encode,
    decode_frame,
    encode_frame,
    max_encoded_size,
    pack_frame,
    parse_frame,
)
from embedded.protocol.messages import (
    MSG,
    PayloadError,
    check_fields,
    decode_message,
    decode_payload,
    encode_payload,
)

# Reference vectors from the COBS paper / Wikipedia "Consistent Overhead Byte Stuffing" examples
COBS_VECTORS = [
    (b"\x00", b"\x01\x01"),
    (b"\x00\x00", b"\x01\x01\x01"),
    (b"\x00\x11\x00", b"\x01\x02\x11\x01"),
    (b"\x11\x22\x00\x33", b"\x03\x11\x22\x02\x33"),
    (b"\x11\x22\x33\x44", b"\x05\x11\x22\x33\x44"),
    (b"\x11\x00\x00\x00", b"\x02\x11\x01\x01\x01"),
    (bytes(range(1, 255)), b"\xff" + bytes(range(1, 255))),
    (bytes(range(0, 255)), b"\x01\xff" + bytes(range(1, 255))),
    (bytes(range(1, 256)), b"\xff" + bytes(range(1, 255)) + b"\x02\xff"),
    (bytes(range(2, 256)) + b"\x00", b"\xff" + bytes(range(2, 256)) + b"\x01\x01"),
    (bytes(range(3, 256)) + b"\x00\x01", b"\xfe" + bytes(range(3, 256)) + b"\x02\x01"),
]


@pytest.mark.parametrize("raw,enc", COBS_VECTORS)
def test_cobs_reference_vectors(raw, enc):
    assert cobs_encode(raw) == enc
    assert cobs_decode(enc) == raw


def test_cobs_roundtrip_random_has_no_zero():
    rng = random.Random(1)
    for n in list(range(0, 600)) + [4096, 65536]:
        # zero-heavy and zero-free data both
        data = bytes(rng.choice((0, 0, rng.randrange(256))) for _ in range(n))
        enc = cobs_encode(data)
        assert b"\x00" not in enc
        assert len(enc) <= len(data) + len(data) // 254 + 1
        assert cobs_decode(enc) == data


def test_cobs_decode_rejects_malformed():
    with pytest.raises(FrameError, match="runs past"):
        cobs_decode(b"\x05\x11\x22")
    with pytest.raises(FrameError, match="zero byte"):
        cobs_decode(b"\x02\x11\x00")


def test_frame_layout_matches_the_documented_bytes():
    raw = pack_frame(MSG.PING, 0x01020304, b"hi", flags=1)
    # version, type, flags, reserved, seq (LE u32), length (LE u32), payload, crc32 (LE)
    head = bytes([1, 0x04, 1, 0]) + bytes([4, 3, 2, 1]) + bytes([2, 0, 0, 0])
    assert raw[:HEADER_SIZE] == head
    assert raw[HEADER_SIZE:-4] == b"hi"
    assert raw[-4:] == struct.pack("<I", zlib.crc32(head + b"hi"))
    wire = encode_frame(MSG.PING, 0x01020304, b"hi", flags=1)
    assert wire.endswith(b"\x00") and wire.count(b"\x00") == 1
    f = decode_frame(wire[:-1])
    assert (f.type, f.seq, f.payload, f.flags, f.version, f.is_reply) == \
        (MSG.PING, 0x01020304, b"hi", 1, 1, True)


def test_every_single_bit_flip_is_rejected():
    wire = encode_frame(MSG.ECHO, 77, bytes(range(40)) + b"\x00\x00payload")
    for i in range(len(wire) - 1):
        for bit in range(8):
            bad = bytearray(wire)
            bad[i] ^= 1 << bit
            items = FrameDecoder().feed(bytes(bad))
            assert not any(not isinstance(x, FrameError) for x in items), (i, bit)


def test_header_checks():
    good = pack_frame(MSG.PING, 1, b"abc")
    with pytest.raises(FrameError) as e:
        parse_frame(good[:10])
    assert e.value.reason == "short"

    def recrc(body: bytes) -> bytes:
        return body + struct.pack("<I", zlib.crc32(body))

    body = bytearray(good[:-4])
    body[3] = 1  # reserved byte
    with pytest.raises(FrameError) as e:
        parse_frame(recrc(bytes(body)))
    assert e.value.reason == "header"
    body = bytearray(good[:-4])
    body[8:12] = struct.pack("<I", 4)  # length says 4, there are 3
    with pytest.raises(FrameError) as e:
        parse_frame(recrc(bytes(body)))
    assert e.value.reason == "length"
    with pytest.raises(FrameError) as e:
        parse_frame(pack_frame(MSG.ECHO, 1, bytes(200)), max_payload=100)
    assert e.value.reason == "too-large"
    with pytest.raises(FrameError) as e:
        parse_frame(good[:-1] + bytes([good[-1] ^ 0xFF]))
    assert e.value.reason == "crc"


def test_decoder_resynchronises_after_garbage():
    rng = random.Random(2)
    frames = [encode_frame(MSG.PING, i, bytes([i]) * i) for i in range(1, 30)]
    stream = bytearray()
    for f in frames:
        stream += bytes(rng.randrange(256) for _ in range(rng.randrange(0, 50)))
        stream += b"\x00"  # garbage ends at a delimiter at the latest
        stream += f
    dec = FrameDecoder()
    got = []
    # feed in random slices, including single bytes
    pos = 0
    while pos < len(stream):
        k = rng.choice((1, 2, 7, 100, 1000))
        got += dec.feed(bytes(stream[pos:pos + k]))
        pos += k
    ok = [x for x in got if not isinstance(x, FrameError)]
    assert [(f.seq, f.payload) for f in ok] == [(i, bytes([i]) * i) for i in range(1, 30)]


def test_decoder_memory_is_bounded_without_delimiter():
    dec = FrameDecoder(max_payload=1024)
    errors = []
    for _ in range(100):
        errors += dec.feed(b"\x01" * 10_000)
        assert dec.pending <= max_encoded_size(1024)
    assert len(errors) == 1 and errors[0].reason == "too-large"
    # and it recovers at the next delimiter
    out = dec.feed(b"\x00" + encode_frame(MSG.PING, 5, b"x"))
    assert [f.seq for f in out if not isinstance(f, FrameError)] == [5]


def test_max_size_frame_passes_and_one_more_byte_fails():
    dec = FrameDecoder()
    out = dec.feed(encode_frame(MSG.ECHO, 1, bytes(MAX_PAYLOAD)))
    assert len(out) == 1 and len(out[0].payload) == MAX_PAYLOAD
    out = dec.feed(encode_frame(MSG.ECHO, 2, b"\x01" * (MAX_PAYLOAD + 1)))
    assert len(out) == 1 and isinstance(out[0], FrameError)


# --- typed payloads --------------------------------------------------------------------------
def test_payload_known_layout():
    # dict of 1 item: tag 8, count 1, key len 1, "a", tag 3 (int), i64 1
    assert encode_payload({"a": 1}) == (b"\x08" + struct.pack("<I", 1) + struct.pack("<I", 1)
                                        + b"a" + b"\x03" + struct.pack("<q", 1))
    assert encode_payload([None, True, False, 1.5, "é", b"\x00"]) == (
        b"\x07" + struct.pack("<I", 6) + b"\x00\x02\x01" + b"\x04" + struct.pack("<d", 1.5)
        + b"\x05" + struct.pack("<I", 2) + "é".encode() + b"\x06" + struct.pack("<I", 1) + b"\x00")


def test_payload_roundtrip():
    v = {"n": -(2 ** 63), "m": 2 ** 63 - 1, "f": -0.25, "s": "ünïcode", "b": bytes(range(256)),
         "l": [1, [2, [3, {"x": None}]]], "t": True, "e": {}, "el": []}
    assert decode_payload(encode_payload(v)) == v


def test_payload_every_truncation_is_rejected():
    enc = encode_payload({"a": [1, "xyz", b"\x00\x01", {"k": 2.0}], "b": None})
    for k in range(len(enc)):
        with pytest.raises(PayloadError):
            decode_payload(enc[:k])
    with pytest.raises(PayloadError, match="trailing"):
        decode_payload(enc + b"\x00")


def test_payload_huge_declared_sizes_fail_before_allocating():
    for tag in (5, 6, 7, 8):
        with pytest.raises(PayloadError):
            decode_payload(bytes([tag]) + struct.pack("<I", 0xFFFFFFFF) + b"abc")
    with pytest.raises(PayloadError, match="nesting"):
        decode_payload(b"\x07\x01\x00\x00\x00" * 40 + b"\x00")
    with pytest.raises(PayloadError, match="unknown tag"):
        decode_payload(b"\x09")
    with pytest.raises(PayloadError, match="UTF-8"):
        decode_payload(b"\x05\x01\x00\x00\x00\xff")
    dup = b"\x08\x02\x00\x00\x00" + (b"\x01\x00\x00\x00a\x00") * 2
    with pytest.raises(PayloadError, match="duplicate"):
        decode_payload(dup)
    with pytest.raises(PayloadError):
        encode_payload({1: 2})
    with pytest.raises(PayloadError):
        encode_payload(2 ** 64)
    with pytest.raises(PayloadError):
        encode_payload(object())


def test_schema_errors_name_the_field():
    with pytest.raises(PayloadError, match="HELLO: missing field 'max_version'"):
        check_fields(MSG.HELLO, False, {"min_version": 1})
    with pytest.raises(PayloadError, match="ECHO: field 'data' must be bytes, got str"):
        decode_message(MSG.ECHO, False, encode_payload({"data": "text"}))
    with pytest.raises(PayloadError, match="bool"):
        check_fields(MSG.HELLO, False, {"min_version": True, "max_version": 1})
    with pytest.raises(PayloadError, match="must be a dict"):
        decode_message(MSG.PING, False, encode_payload([1]))
    assert decode_message(MSG.PING, False, b"") == {}
