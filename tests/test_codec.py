"""embedded.codec: exact round trips, sizes equal to hwmodel.wire, hand-checked layouts, and
malformed input (each kind, plus a mutation fuzz) raising only CodecError."""

from __future__ import annotations

import math
import struct
import tracemalloc

import numpy as np
import pytest

from embedded import codec as C
from embedded.codec import CodecError
from hwmodel import build, wire

CODECS = wire.CODECS
RNG = np.random.default_rng(1234)


def sparse_f32(shape, density, rng=RNG):
    x = rng.standard_normal(shape).astype(np.float32)
    x[rng.random(shape) >= density] = 0.0
    return x


SHAPES = [(), (1,), (7,), (5, 3), (4, 3, 3, 3), (16, 8, 3, 3), (0,), (3, 0), (2, 1, 1, 1, 1, 1, 1, 2)]


def cases():
    out = []
    for shape in SHAPES:
        for density in (0.0, 0.3, 1.0):
            x = sparse_f32(shape, density)
            if density == 1.0:
                x[x == 0] = 1.0  # all nonzero
            out.append(pytest.param(x, id=f"{shape}-{density}"))
    return out


def bits(a):
    return np.ascontiguousarray(a).view(np.uint32 if a.dtype == np.float32 else np.uint16)


# ---------------------------------------------------------------------- round trips and sizes
@pytest.mark.parametrize("x", cases())
@pytest.mark.parametrize("codec", CODECS)
def test_round_trip_f32_bit_exact_and_size(x, codec):
    b = C.encode(x, codec)
    idx = np.flatnonzero(x)
    assert len(b) == wire.tensor_bytes(codec, x.shape, idx.size, "f32", indices=idx)
    y = C.decode(b)
    assert y.dtype == np.float32 and y.shape == x.shape
    assert np.array_equal(bits(y), bits(x))
    y[...] = 0  # decoded arrays are writable and own their memory
    assert C.decode(memoryview(b)).shape == x.shape
    assert C.decode(bytearray(b)).shape == x.shape


@pytest.mark.parametrize("x", cases())
@pytest.mark.parametrize("codec", CODECS)
def test_round_trip_f16_within_rounding_and_size(x, codec):
    b = C.encode(x, codec, "f16")
    idx = np.flatnonzero(x)
    assert len(b) == wire.tensor_bytes(codec, x.shape, idx.size, "f16", indices=idx)
    y = C.decode(b)
    assert y.dtype == np.float32
    np.testing.assert_array_equal(y, x.astype(np.float16).astype(np.float32))
    np.testing.assert_allclose(y, x, rtol=2.0**-11, atol=2.0**-24)
    y16 = C.decode(b, upcast=False)
    assert y16.dtype == np.float16 and np.array_equal(y16, x.astype(np.float16))


@pytest.mark.parametrize("codec", CODECS)
def test_integer_tensors_exact(codec):
    cases_ = [
        np.array(123456789012345, dtype=np.int64),       # num_batches_tracked, 0-d
        np.array(0, dtype=np.int64),
        np.array([0, -(2**62), 0, 2**53 + 1, 7], dtype=np.int64),  # beyond float precision
        np.array([[0, 3], [-2**31, 2**31 - 1]], dtype=np.int32),
    ]
    for x in cases_:
        b = C.encode(x, codec)
        tag = "i64" if x.dtype == np.int64 else "i32"
        idx = np.flatnonzero(x)
        assert len(b) == wire.tensor_bytes(codec, x.shape, idx.size, tag, indices=idx)
        y = C.decode(b)
        assert y.dtype == x.dtype and np.array_equal(y, x)
    small = np.array([1, 0, 5], dtype=np.int64)
    assert C.decode(C.encode(small, codec, "i32")).dtype == np.int32
    with pytest.raises(CodecError, match="do not fit"):
        C.encode(np.array([2**40], dtype=np.int64), codec, "i32")


def test_dtype_rules():
    with pytest.raises(CodecError, match="stays exact"):
        C.encode(np.arange(3), "dense32", "f16")
    with pytest.raises(CodecError, match="'f32' or 'f16'"):
        C.encode(np.ones(3, np.float32), "dense32", "i32")
    with pytest.raises(CodecError, match="bool"):
        C.encode(np.ones(3, bool))
    with pytest.raises(CodecError, match="inf"):
        C.encode(np.array([1e6], np.float32), "coo32", "f16")
    with pytest.raises(CodecError, match="codec"):
        C.encode(np.ones(3, np.float32), "zip")
    with pytest.raises(CodecError, match="ndim"):
        C.encode(np.ones((1,) * 9, np.float32))
    # float64 is sent as f32; NaN and inf survive (NaN payload too) in every codec
    x = np.array([0.0, np.nan, -np.inf, 0.1], dtype=np.float64)
    for codec in CODECS:
        y = C.decode(C.encode(x, codec))
        assert np.array_equal(bits(y), bits(x.astype(np.float32)), equal_nan=False)


def test_negative_zero():
    """Sparse codecs store x != 0: -0.0 (a masked negative weight) is an implicit zero."""
    x = np.array([-0.0, 1.0, -0.0], dtype=np.float32)
    assert bits(C.decode(C.encode(x, "dense32")))[0] == bits(x)[0]
    for codec in CODECS[1:]:
        b = C.encode(x, codec)
        y = C.decode(b)
        assert np.array_equal(y, x) and bits(y)[0] == 0  # +0.0
        assert len(b) == wire.tensor_bytes(codec, x.shape, 1, "f32", indices=np.array([1]))


def test_delta8_escapes_against_reference_parser():
    """Gaps ≥ 255 escape to 255 + u32; payload bytes may themselves be 255."""
    special = [0, 1, 254, 255, 256, 0x1FF, 0xFF00, 0xFFFF, 0x2FF, 1000]  # payloads with 0xFF
    rng = np.random.default_rng(7)
    for trial in range(40):
        k = int(rng.integers(0, 40))
        gaps = rng.choice(special, size=k) if trial % 2 else rng.integers(0, 600, size=k)
        idx = np.cumsum(np.asarray(gaps, dtype=np.int64) + 1) - 1
        numel = int(idx[-1]) + 1 + int(rng.integers(0, 3)) if k else 5
        x = np.zeros(numel, np.float32)
        x[idx] = rng.standard_normal(k).astype(np.float32) + 3.0
        b = C.encode(x, "delta8")
        # an independent, sequential reading of the layout
        head = wire.header_bytes("delta8", 1)
        (nnz,) = struct.unpack_from("<I", b, head - 4)
        pos, got, prev = head, [], -1
        for _ in range(nnz):
            g = b[pos]
            pos += 1
            if g == 255:
                (g,) = struct.unpack_from("<I", b, pos)
                pos += 4
            prev = prev + g + 1
            got.append(prev)
        assert got == idx.tolist()
        assert len(b) - pos == 4 * nnz
        assert np.array_equal(C.decode(b), x)
        assert len(b) == wire.tensor_bytes("delta8", x.shape, k, "f32", indices=idx)


# ---------------------------------------------------------------------- hand-checked layouts
def test_layouts_by_hand():
    x = np.array([[0, 1.5, 0], [0, 0, 0], [2, 0, 3]], dtype=np.float32)
    vals = struct.pack("<3f", 1.5, 2, 3)
    head = b"ST\x01"

    def hdr(codec, dtype, nnz=None):
        h = head + bytes([CODECS.index(codec), wire.DTYPES.index(dtype), 2]) + b"\0\0"
        h += struct.pack("<2I", 3, 3)
        return h + (struct.pack("<I", nnz) if nnz is not None else b"")

    assert C.encode(x, "dense32") == hdr("dense32", "f32") + x.astype("<f4").tobytes()
    assert C.encode(x, "coo32") == hdr("coo32", "f32", 3) + struct.pack("<3i", 1, 6, 8) + vals
    assert C.encode(x, "csr32") == (hdr("csr32", "f32", 3) + struct.pack("<4i", 0, 1, 1, 3)
                                    + struct.pack("<3i", 1, 0, 2) + vals)
    # bits 1, 6, 8 (LSB first): byte0 = 0b01000010, byte1 = 0b00000001
    assert C.encode(x, "bitmap") == hdr("bitmap", "f32", 3) + bytes([0x42, 0x01]) + vals
    assert C.encode(x, "delta8") == hdr("delta8", "f32", 3) + bytes([1, 4, 1]) + vals
    y = np.zeros(300, np.float32)
    y[[0, 256]] = 1
    # gap 0, then gap 255 escaped: 255, u32 255
    want = (head + bytes([4, 1, 1]) + b"\0\0" + struct.pack("<I", 300) + struct.pack("<I", 2)
            + bytes([0, 255, 255, 0, 0, 0]) + struct.pack("<2e", 1, 1))
    assert C.encode(y, "delta8", "f16") == want
    # a 0-d tensor is 1 x 1 for csr32
    z = C.encode(np.float32(2.5), "csr32")
    assert z == b"ST\x01\x02\x00\x00\0\0" + struct.pack("<I3if", 1, 0, 1, 0, 2.5)


# ---------------------------------------------------------------------- best codec, ratios
def test_best_codec_is_the_smallest():
    for density in (0.0, 0.001, 0.02, 0.1, 0.5, 1.0):
        x = sparse_f32((64, 32, 3, 3), density)
        for dt in ("f32", "f16"):
            sizes = {c: len(C.encode(x, c, dt)) for c in CODECS}
            best = C.best_codec(x, dt)
            assert sizes[best] == min(sizes.values())
            assert C.encode(x, "best", dt) == C.encode(x, best, dt)
    assert C.best_codec(np.array(5, np.int64), "f16") == "dense32"


@pytest.mark.parametrize("density,ratio", [(0.1, 8), (0.05, 15)])
def test_sparse_ratio_at_1m_elements(density, ratio):
    x = sparse_f32((1_000_000,), density, np.random.default_rng(5))
    dense = len(C.encode(x, "dense32", "f32"))
    best = C.best_codec(x, "f16")
    b = C.encode(x, best, "f16")
    assert dense / len(b) >= ratio, (best, dense / len(b))
    np.testing.assert_array_equal(C.decode(b), x.astype(np.float16).astype(np.float32))


# ---------------------------------------------------------------------- state frames
def state_of(spec_name="resnet8"):
    rng = np.random.default_rng(3)
    spec = build(spec_name)
    out = {}
    for k, s in spec.state_shapes().items():
        if k.endswith("num_batches_tracked"):
            out[k] = np.array(int(rng.integers(0, 10**12)), dtype=np.int64)
        else:
            out[k] = sparse_f32(s, 0.2 if len(s) > 1 else 1.0, rng)
    return out


def test_state_round_trip_and_size():
    st = state_of()
    codecs = {k: CODECS[i % len(CODECS)] for i, k in enumerate(st)}
    for dtype in (None, "f32", "f16"):
        b = C.encode_state(st, codecs, dtype)
        tag = dtype or "f32"
        entries = []
        for k, x in st.items():
            t = "i64" if x.dtype == np.int64 else tag
            idx = np.flatnonzero(x)
            entries.append((k, wire.tensor_bytes(codecs[k], x.shape, idx.size, t, indices=idx)))
        assert len(b) == wire.state_bytes(entries)
        back = C.decode_state(b)
        assert list(back) == list(st)
        for k, x in st.items():
            want = x if x.dtype == np.int64 or tag == "f32" else \
                x.astype(np.float16).astype(np.float32)
            assert back[k].dtype == want.dtype and np.array_equal(back[k], want), k
    assert C.decode_state(C.encode_state({})) == {}
    b = C.encode_state(st, "best", "f16")
    assert len(b) < len(C.encode_state(st, "dense32", "f16"))
    with pytest.raises(CodecError, match="unknown tensors"):
        C.encode_state(st, {"nope": "coo32"})
    with pytest.raises(CodecError, match="'conv1.weight'"):
        C.encode_state(st, {"conv1.weight": "zip"})


# ---------------------------------------------------------------------- malformed input
def frame(codec="coo32", x=None, dtype="f32"):
    if x is None:
        x = np.zeros((4, 5), np.float32)
        x[0, 1], x[1, 0], x[3, 4] = 1.0, 2.0, 3.0
    return bytearray(C.encode(x, codec, dtype))


def put(b, off, fmt, *v):
    b = bytearray(b)
    struct.pack_into(fmt, b, off, *v)
    return bytes(b)


def raises(b, match, **kw):
    with pytest.raises(CodecError, match=match):
        C.decode(bytes(b), **kw)


def test_malformed_headers():
    f = frame("dense32")
    raises(f[:5], "shorter than the 8-byte header")
    raises(f[:10], "truncated")
    raises(b"XX" + f[2:], "magic")
    raises(put(f, 2, "<B", 2), "version")
    raises(put(f, 3, "<B", 5), "unknown codec tag 5")
    raises(put(f, 4, "<B", 4), "unknown dtype tag 4")
    raises(put(f, 5, "<B", 9), "ndim 9")
    raises(put(f, 6, "<H", 1), "flags")
    raises(f + b"\0", "wrong length")
    raises(f[:-1], "wrong length")
    with pytest.raises(CodecError, match="expected bytes"):
        C.decode("text")


def test_huge_declared_shape_rejected_before_allocating():
    f = frame("coo32", np.zeros((1, 1), np.float32))  # nnz 0: a dense decode would be zeros
    big = put(f, 8, "<2I", 100_000, 1_000)  # 10^8 elements
    tracemalloc.start()
    try:
        raises(big, "max_elements")
        raises(put(f, 8, "<2I", 0xFFFFFFFF, 0xFFFFFFFF), "max_elements", max_elements=2**62)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20  # numpy reports its buffers to tracemalloc; nothing big was made
    raises(big, "max_elements", max_elements=10**6)
    # a declared shape within the bound decodes (to zeros: nnz is 0)
    ok = C.decode(put(f, 8, "<2I", 1_000, 100), max_elements=10**5)
    assert ok.shape == (1_000, 100) and not ok.any()


def test_malformed_sparse_bodies():
    head = wire.header_bytes("coo32", 2)  # nnz at head-4
    f = frame("coo32")
    raises(put(f, head - 4, "<I", 21), "nnz 21 > numel 20")
    raises(put(f, head - 4, "<I", 2), "wrong length")
    raises(put(f, head, "<i", 20), "outside")
    raises(put(f, head, "<i", -1), "outside")
    raises(put(f, head + 4, "<i", 1), "not strictly increasing")
    raises(f[:-2], "wrong length")

    f = frame("csr32")  # rows 4: indptr 0,1,2,2,3; cols 1,0,4
    raises(put(f, head, "<i", 1), "row pointers run")
    raises(put(f, head + 16, "<i", 2), "row pointers run")
    raises(put(f, head + 4, "<i", 3), "not monotone")
    cols = head + 20
    raises(put(f, cols, "<i", 5), "column index outside")
    raises(put(f, cols, "<i", -1), "column index outside")
    g = put(put(f, head + 4, "<i", 2), head + 8, "<i", 2)  # row 0 holds cols 1, 0
    raises(g, "not strictly increasing")

    f = frame("bitmap")  # 20 bits = 3 bytes
    raises(put(f, head, "<B", f[head] | 0x80), "bits set but nnz")
    raises(put(put(f, head + 2, "<B", 0x80), head - 4, "<I", 4), "wrong length")
    x = np.zeros(20, np.float32)
    x[[0, 5]] = 1
    f2 = frame("bitmap", x)
    h1 = wire.header_bytes("bitmap", 1)
    moved = put(put(f2, h1 + 2, "<B", 0x10), h1, "<B", 0x01)  # element 20: a padding bit
    raises(moved, "padding bits")

    f = frame("delta8")  # gaps 1, 3, 13 (indices 1, 5, 19)
    raises(put(f, head, "<B", 200), "outside")
    raises(put(f, head + 2, "<B", 255), "truncated|holds")
    raises(put(f, head - 4, "<I", 2), "wrong length|holds")
    y = np.zeros(600, np.float32)
    y[[0, 500]] = 1.0
    f3 = frame("delta8", y)  # gaps 0, 499 escaped
    h1 = wire.header_bytes("delta8", 1)
    raises(put(f3, h1 + 2, "<I", 10), "not canonical")
    raises(put(f3, h1 + 2, "<I", 600), "outside")


def test_malformed_state_frames():
    st = {"a.weight": sparse_f32((3, 4), 0.5), "a.n": np.array(3, np.int64)}
    b = C.encode_state(st, "coo32")
    assert set(C.decode_state(b)) == set(st)

    def bad(data, match, **kw):
        with pytest.raises(CodecError, match=match):
            C.decode_state(bytes(data), **kw)

    bad(b[:6], "shorter than the 8-byte header")
    bad(b"SX" + b[2:], "magic")
    bad(put(b, 2, "<B", 9), "version")
    bad(put(b, 3, "<B", 1), "reserved")
    bad(put(b, 4, "<I", 3), "count 3 cannot fit|truncated|runs past")
    bad(put(b, 4, "<I", 0xFFFFFFFF), "count")
    bad(put(b, 4, "<I", 1), "trailing bytes")
    bad(b + b"\0", "trailing bytes")
    bad(b[:-1], "wrong length|runs past")
    bad(put(b, 8, "<H", 0), "name length 0")
    bad(put(b, 8, "<H", 60000), "runs past the end")
    bad(put(b, 10, "<B", 0xFF), "UTF-8")
    ln = len("a.weight")
    bad(put(b, 10 + ln, "<I", 10**6), "runs past the end")
    dup = C.encode_state({"x": np.ones(2, np.float32)})
    two = dup[:4] + struct.pack("<I", 2) + dup[8:] + dup[8:]
    bad(two, "duplicate tensor name 'x'")
    bad(b, "max_elements", max_total_elements=12)  # 12 + 1 elements
    assert C.decode_state(b, max_total_elements=13)["a.n"] == 3


def test_fuzz_mutations_raise_only_codec_error():
    """Random mutations of valid frames: decoding either succeeds or raises CodecError."""
    rng = np.random.default_rng(99)
    seeds = []
    for codec in CODECS:
        for dt in ("f32", "f16"):
            seeds.append((C.encode(sparse_f32((6, 5, 3), 0.2, rng), codec, dt), False))
        seeds.append((C.encode(np.array([0, 7, 0, 9], np.int64), codec), False))
    y = np.zeros(2000, np.float32)
    y[[3, 300, 301, 1500, 1999]] = 1.0
    seeds.append((C.encode(y, "delta8"), False))
    seeds.append((C.encode_state({"w": sparse_f32((4, 4), 0.3, rng),
                                  "b": np.ones(4, np.float32),
                                  "n": np.array(2, np.int64)}, "delta8"), True))
    ok = err = 0
    for i in range(3000):
        src, is_state = seeds[i % len(seeds)]
        b = bytearray(src)
        kind = rng.integers(0, 5)
        if kind == 0:  # flip some bytes
            for _ in range(int(rng.integers(1, 4))):
                b[int(rng.integers(0, len(b)))] = int(rng.integers(0, 256))
        elif kind == 1:  # a header byte set to an extreme
            b[int(rng.integers(0, min(len(b), 24)))] = int(rng.choice([0, 1, 8, 9, 254, 255]))
        elif kind == 2:  # truncate
            b = b[: int(rng.integers(0, len(b)))]
        elif kind == 3:  # insert bytes
            p = int(rng.integers(0, len(b) + 1))
            b[p:p] = bytes(rng.integers(0, 256, size=int(rng.integers(1, 6))).tolist())
        else:  # a random u32 written anywhere
            p = int(rng.integers(0, max(1, len(b) - 4)))
            b[p:p + 4] = struct.pack("<I", int(rng.integers(0, 2**32)))
        try:
            if is_state:
                C.decode_state(bytes(b), max_total_elements=10**5)
            else:
                C.decode(bytes(b), max_elements=10**5)
            ok += 1
        except CodecError:
            err += 1
    assert err > 1000 and ok + err == 3000


def test_decode_sparse_parts():
    x = sparse_f32((8, 9), 0.3)
    shape, idx, vals = C.decode_sparse(C.encode(x, "delta8"))
    assert shape == x.shape and np.array_equal(idx, np.flatnonzero(x))
    assert np.array_equal(vals, x.ravel()[idx])
    shape, idx, vals = C.decode_sparse(C.encode(x, "dense32"))
    assert idx is None and np.array_equal(vals, x.ravel())
    assert math.prod(shape) == x.size
