"""The Link: requests, retries, chunked transfers with a sliding window, limits, pairing.

Both ends are real :class:`Link` objects over a connected socket pair (a byte stream like a
serial line); serial ptys and the agent process are covered in test_agent / test_link_faults.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import socket
import struct
import threading
import time

import pytest

from embedded.protocol.framing import FLAG_REPLY, FrameDecoder, FrameError, encode_frame
from embedded.protocol.messages import ERR, MSG, encode_payload, error_payload
from embedded.protocol.transport import (
    BULK_ACK,
    BULK_BEGIN,
    CHUNK_HEAD,
    Link,
    LinkError,
    RemoteError,
    SocketStream,
    pair_mac,
)


class Peer:
    """A Link in a thread answering requests with ``handler(msg) -> (type, payload) | None``."""

    def __init__(self, stream, handler, **kw):
        self.link = Link(stream, **kw)
        self.handler = handler
        self.stop = threading.Event()
        self.seen = []
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        while not self.stop.is_set():
            try:
                self.link.poll(0.01)
            except LinkError:
                return
            while self.link.inbox:
                m = self.link.inbox.popleft()
                self.seen.append(m)
                out = self.handler(m)
                if out is not None:
                    try:
                        self.link.send_message(out[0], m.seq, out[1], FLAG_REPLY)
                    except LinkError:
                        pass

    def close(self):
        self.stop.set()
        self.thread.join(timeout=5)


@pytest.fixture
def pair():
    a, b = socket.socketpair()
    sa, sb = SocketStream(a), SocketStream(b)
    yield sa, sb
    sa.close()
    sb.close()


def echo(m):
    return (m.type, m.payload)


@pytest.mark.parametrize("size", [0, 1, 4095, 4096, 4097, 8192, 3 * 4096 + 5, 1_000_003])
def test_echo_sizes_inline_and_chunked(pair, size):
    peer = Peer(pair[1], echo)
    host = Link(pair[0], timeout=2.0)
    data = os.urandom(size)
    try:
        reply = host.request_raw(MSG.ECHO, data)
        assert reply.payload == data
        chunked = size > host.chunk_size
        assert host.stats.bulk_payload_out == (size if chunked else 0)
        n = -(-size // 4096)
        # inline: one frame; chunked: BEGIN + n chunks, then acks (BEGIN + n) of the echoed reply
        assert host.stats.frames_out == (1 if not chunked else 2 * (1 + n))
        assert host.stats.retransmits == 0
    finally:
        peer.close()
    assert peer.link.stats.bulk_payload_out == (size if chunked else 0)


def test_remote_error_and_typed_reply(pair):
    def handler(m):
        if m.type == MSG.PING:
            return (MSG.PING, encode_payload({"t": 1.5}))
        return (MSG.ERROR, error_payload(ERR.NOT_IMPLEMENTED, "nope", m.type))

    peer = Peer(pair[1], handler)
    host = Link(pair[0])
    try:
        assert host.request(MSG.PING, {"t": 1.5}) == {"t": 1.5}
        with pytest.raises(RemoteError) as e:
            host.request(MSG.TRAIN, {})
        assert e.value.code == ERR.NOT_IMPLEMENTED and "nope" in str(e.value)
    finally:
        peer.close()


def test_request_is_retransmitted_with_the_same_seq(pair):
    calls = []

    def handler(m):
        calls.append(m.seq)
        if len(calls) == 1:
            return None  # "lost" reply
        return (m.type, m.payload)

    peer = Peer(pair[1], handler)
    host = Link(pair[0], timeout=0.3, retries=3)
    try:
        assert host.request_raw(MSG.PING, b"").type == MSG.PING
        assert len(calls) == 2 and calls[0] == calls[1]
    finally:
        peer.close()


def test_no_reply_fails_after_retries(pair):
    peer = Peer(pair[1], lambda m: None)
    host = Link(pair[0], timeout=0.2, retries=2)
    t0 = time.monotonic()
    try:
        with pytest.raises(LinkError, match=r"no reply to PING .* after 3 attempts"):
            host.request_raw(MSG.PING, b"")
        assert len(peer.seen) == 3
        assert time.monotonic() - t0 < 5
    finally:
        peer.close()


def test_transfer_over_the_receivers_limit_is_refused_before_any_chunk(pair):
    peer = Peer(pair[1], echo, max_transfer=100_000)
    host = Link(pair[0])
    try:
        with pytest.raises(LinkError, match=r"refused by the peer: total 100001 bytes outside"):
            host.request_raw(MSG.ECHO, bytes(100_001))
        assert peer.link._in is None
        assert host.stats.bulk_payload_out == 0
        assert host.request_raw(MSG.ECHO, bytes(100_000)).payload == bytes(100_000)
    finally:
        peer.close()


def raw_frames(sock_stream, seconds):
    """Read frames from a raw stream for ``seconds``."""
    dec, out = FrameDecoder(), []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for f in dec.feed(sock_stream.read(65536)):
            assert not isinstance(f, FrameError)
            out.append(f)
    return out


def test_sliding_window_then_timer_retransmission_then_failure(pair):
    """A receiver that accepts BEGIN but never acknowledges chunks sees exactly ``window``
    chunks back to back (not stop-and-wait), then retransmissions of the oldest chunk only, and
    the sender fails with a clear error after its retries."""
    host_stream, raw = pair
    host = Link(host_stream, window=5, chunk_size=1024, timeout=0.2, retries=3, min_rto=0.02)
    result = {}

    def send():
        try:
            host.send_message(MSG.ECHO, 9, bytes(50_000))
        except LinkError as e:
            result["error"] = str(e)

    th = threading.Thread(target=send)
    th.start()
    dec = FrameDecoder()
    frames = []
    deadline = time.monotonic() + 10
    while th.is_alive() and time.monotonic() < deadline:
        for f in dec.feed(raw.read(65536)):
            frames.append(f)
            if f.type == MSG.BULK_BEGIN:
                raw.write(encode_frame(MSG.BULK_ACK, f.seq, BULK_ACK.pack(0, 0, 0, 0, 0)))
    th.join(timeout=1)
    chunks = [CHUNK_HEAD.unpack_from(f.payload)[0] for f in frames if f.type == MSG.BULK_CHUNK]
    assert chunks[:5] == [0, 1, 2, 3, 4]
    assert set(chunks[5:]) == {0} and 2 <= len(chunks[5:]) <= 3   # the oldest only, backing off
    assert re.search(r"chunk 0 of 49 .* not acknowledged after 4 transmissions|stalled: no "
                     r"acknowledgement", result["error"]), result["error"]


def test_lost_chunk_is_retransmitted_selectively(pair):
    """Drop chunk 3 once at the receiver: the sender resends chunk 3 and nothing else."""
    host_stream, peer_stream = pair
    peer = Link(peer_stream)
    orig = peer._on_chunk
    dropped = []
    counts: dict[int, int] = {}

    def lossy(f):
        (i,) = CHUNK_HEAD.unpack_from(f.payload)
        counts[i] = counts.get(i, 0) + 1
        if i == 3 and not dropped:
            dropped.append(i)
            return
        orig(f)

    peer._on_chunk = lossy
    stop = threading.Event()

    def run():
        while not stop.is_set():
            peer.poll(0.01)

    th = threading.Thread(target=run, daemon=True)
    th.start()
    host = Link(host_stream, window=8, chunk_size=1024, timeout=1.0)
    data = os.urandom(20 * 1024)
    try:
        host.send_message(MSG.ECHO, 1, data)
        time.sleep(0.05)
        assert peer.inbox and peer.inbox[-1].payload == data
        assert counts[3] == 2
        assert all(c == 1 for i, c in counts.items() if i != 3)
    finally:
        stop.set()
        th.join(timeout=2)


def test_mutated_begin_fields_are_refused(pair):
    """Structure-level checks of BULK_BEGIN: every bad field gets a REFUSED ack naming it."""
    host_stream, raw = pair
    peer = Link(host_stream, max_transfer=1 << 20)
    sha = bytes(32)
    cases = {
        "total 0": BULK_BEGIN.pack(MSG.ECHO, 0, 0, 0, 1024, 0, sha),
        "total 18446744073709551615": BULK_BEGIN.pack(MSG.ECHO, 0, 0, 2 ** 64 - 1, 1024, 1, sha),
        "chunk size 0": BULK_BEGIN.pack(MSG.ECHO, 0, 0, 10, 0, 1, sha),
        "chunk count 7": BULK_BEGIN.pack(MSG.ECHO, 0, 0, 5000, 1024, 7, sha),
        "transport message": BULK_BEGIN.pack(MSG.BULK_ACK, 0, 0, 5000, 1024, 5, sha),
        "inner flags": BULK_BEGIN.pack(MSG.ECHO, 1, 0, 5000, 1024, 5, sha),
        "payload must be": BULK_BEGIN.pack(MSG.ECHO, 0, 0, 5000, 1024, 5, sha)[:-1],
    }
    for k, (what, payload) in enumerate(cases.items()):
        raw.write(encode_frame(MSG.BULK_BEGIN, 100 + k, payload))
        acks = []
        end = time.monotonic() + 2
        while not acks and time.monotonic() < end:
            peer.poll(0.01)
            acks = [f for f in raw_frames(raw, 0.02) if f.type == MSG.BULK_ACK]
        status = BULK_ACK.unpack_from(acks[0].payload)[0]
        reason = acks[0].payload[BULK_ACK.size:].decode()
        assert status == 2 and what in reason, (what, reason)
        assert peer._in is None


def test_corrupted_reassembly_is_detected_by_sha256(pair):
    """Chunks with valid CRCs whose concatenation does not match the announced SHA-256 (a
    sender bug or a CRC collision) are not delivered."""
    host_stream, raw = pair
    peer = Link(host_stream)
    data = os.urandom(3000)
    raw.write(encode_frame(MSG.BULK_BEGIN, 5, BULK_BEGIN.pack(
        MSG.ECHO, 0, 0, 3000, 1000, 3, hashlib.sha256(data).digest())))
    for i in range(3):
        part = bytearray(data[i * 1000:(i + 1) * 1000])
        if i == 1:
            part[10] ^= 1
        raw.write(encode_frame(MSG.BULK_CHUNK, 5, struct.pack("<I", i) + bytes(part)))
    statuses = []
    end = time.monotonic() + 2
    while 3 not in statuses and time.monotonic() < end:
        peer.poll(0.01)
        statuses += [BULK_ACK.unpack_from(f.payload)[0] for f in raw_frames(raw, 0.01)
                     if f.type == MSG.BULK_ACK]
    assert 3 in statuses   # FAILED
    assert not peer.inbox


def test_pair_mac_is_hmac_sha256_over_the_documented_message():
    tok, a, b = b"t" * 32, b"A" * 32, b"B" * 32
    want = hmac.new(tok, b"sparsefl-pair-v1|host|" + a + b"|" + b, hashlib.sha256).digest()
    assert pair_mac(tok, b"host", a, b) == want
    assert pair_mac(tok, b"agent", b, a) != want
    assert pair_mac(b"u" * 32, b"host", a, b) != want


def test_closed_peer_is_a_link_error(pair):
    host = Link(pair[0], timeout=0.2, retries=1)
    pair[1].close()
    with pytest.raises(LinkError):
        host.request_raw(MSG.PING, b"")
