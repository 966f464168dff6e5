"""A reliable message link over a pyserial-like byte stream.

The stream needs ``read(n)`` (returning after at most ``stream.timeout`` seconds), ``write(b)``
and, optionally, ``in_waiting``, ``flush()`` and ``close()``: ``serial.Serial``,
``serial.serial_for_url("socket://HOST:PORT")`` and :class:`SocketStream` all qualify.

A message (type, seq, flags, payload) whose payload fits in one chunk goes as one frame; a larger
one as a chunked transfer::

    sender                                   receiver
    BULK_BEGIN(seq, type, total, chunk, n, sha256) ─►   limits checked, nothing allocated yet
                                  ◄─ BULK_ACK(PROGRESS cum=0)   (or REFUSED + reason)
    BULK_CHUNK(i) x window ─►
                                  ◄─ BULK_ACK(cum, 64-bit selective bitmap) per chunk
    ... lost chunks: retransmitted when a later chunk is acknowledged (no reordering on a
        serial line) or after the retransmission timeout (RTT-estimated, exponential backoff)
                                  ◄─ BULK_ACK(COMPLETE) once sha256 of the whole matches

Every chunk has at most ``retries`` retransmissions; the sender raises :class:`LinkError` when
that or the idle timeout is exhausted — a transfer completes bit-exact or fails loudly.
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import os
import select
import socket
import struct
import time
from dataclasses import dataclass, field
from typing import Any

from .framing import (
    FLAG_REPLY,
    MAX_PAYLOAD,
    PROTOCOL_VERSION,
    SUPPORTED_VERSIONS,
    Frame,
    FrameDecoder,
    FrameError,
    encode_frame,
)
from .messages import MSG, PayloadError, decode_message, encode_payload

BULK_BEGIN = struct.Struct("<BBHQII32s")  # inner type, inner flags, reserved, total, chunk, n, sha
CHUNK_HEAD = struct.Struct("<I")          # chunk index
BULK_ACK = struct.Struct("<BBHIQ")        # status, reserved, reserved, cum, bitmap

ACK_PROGRESS, ACK_COMPLETE, ACK_REFUSED, ACK_FAILED, ACK_UNKNOWN = range(5)
ACK_NAMES = {0: "progress", 1: "complete", 2: "refused", 3: "checksum failed", 4: "unknown transfer"}

#: Default largest chunked transfer a link accepts (bytes).
MAX_TRANSFER = 256 * 1024 * 1024
PAIR_DOMAIN = b"sparsefl-pair-v1"


class LinkError(RuntimeError):
    """The link failed: timeout after retries, closed stream, transfer refused or corrupted."""


class RemoteError(LinkError):
    """The peer answered with an ERROR frame."""

    def __init__(self, code: int, name: str, message: str) -> None:
        super().__init__(f"remote error {name} ({code}): {message}")
        self.code = code
        self.name = name
        self.remote_message = message


@dataclass
class Message:
    """One complete message delivered by the link (a single frame or a finished transfer)."""

    type: int
    seq: int
    flags: int
    payload: bytes
    version: int = PROTOCOL_VERSION
    duplicate: bool = False   # a retransmitted BULK_BEGIN of a transfer already delivered
    first_at: float = 0.0     # time.monotonic() when its first frame arrived

    @property
    def is_reply(self) -> bool:
        return bool(self.flags & FLAG_REPLY)


@dataclass
class RequestTiming:
    """Where the time of one request went, seen from the host.

    ``upload_s``: sending the request until the peer acknowledged it all (transfer down);
    ``wait_s``: from there to the first frame of the reply (the board's compute plus one
    latency); ``download_s``: receiving the reply (transfer up).
    """

    upload_s: float
    wait_s: float
    download_s: float
    total_s: float
    attempts: int
    bytes_sent: int
    bytes_received: int

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class LinkStats:
    """Byte and frame counters of one link."""

    bytes_out: int = 0
    bytes_in: int = 0
    frames_out: int = 0
    frames_in: int = 0
    frames_bad: int = 0
    retransmits: int = 0
    write_failures: int = 0
    bulk_payload_out: int = 0
    bulk_payload_in: int = 0

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class _Incoming:
    key: tuple[int, int]
    inner_type: int
    total: int
    chunk_size: int
    n: int
    sha256: bytes
    chunks: dict[int, bytes] = field(default_factory=dict)
    cum: int = 0
    last: float = 0.0
    started: float = 0.0


@dataclass
class _Outgoing:
    key: tuple[int, int]
    n: int
    acked: bytearray
    sent_at: list[float]
    order: list[int]
    tx: list[int]
    cum: int = 0
    status: int = -1
    reason: str = ""
    progress_at: float = 0.0
    rtt_samples: list[float] = field(default_factory=list)


def _name(msg_type: int) -> str:
    try:
        return MSG(msg_type).name
    except ValueError:
        return f"type {msg_type:#04x}"


def open_link(port: str, baud: int = 921600, **kw: Any) -> Link:
    """A :class:`Link` on a serial device path or a pyserial URL (``socket://127.0.0.1:PORT``)."""
    import serial  # pyserial: a base dependency, imported only where a port is opened

    try:
        if "://" in port:
            stream = serial.serial_for_url(port, baudrate=baud, timeout=0.01, write_timeout=10)
        else:
            stream = serial.Serial(port, baud, timeout=0.01, write_timeout=10)
    except (serial.SerialException, OSError, ValueError) as e:
        raise LinkError(f"link: cannot open {port}: {e}") from e
    return Link(stream, **kw)


def pair_mac(token: bytes, role: bytes, first: bytes, second: bytes) -> bytes:
    """HMAC-SHA256 proof of the pairing token over both nonces (``role`` b"host" or b"agent")."""
    return hmac.new(token, PAIR_DOMAIN + b"|" + role + b"|" + first + b"|" + second,
                    hashlib.sha256).digest()


class Link:
    """Frames, messages and chunked transfers over one byte stream (single-threaded use)."""

    def __init__(self, stream: Any, *, max_payload: int = MAX_PAYLOAD,
                 max_transfer: int = MAX_TRANSFER, chunk_size: int = 4096, window: int = 8,
                 timeout: float = 2.0, retries: int = 8, min_rto: float = 0.2,
                 read_timeout: float = 0.01, inbox_size: int = 256) -> None:
        if not 16 <= chunk_size <= max_payload - CHUNK_HEAD.size:
            raise ValueError(f"link: chunk_size must be in 16..{max_payload - CHUNK_HEAD.size}, "
                             f"got {chunk_size}")
        if not 1 <= window <= 64:
            raise ValueError(f"link: window must be 1..64 (the ack bitmap), got {window}")
        self.stream = stream
        self.max_payload = max_payload
        self.max_transfer = max_transfer
        self.chunk_size = chunk_size
        self.window = window
        self.timeout = timeout
        self.retries = retries
        self.min_rto = min_rto
        self.version = PROTOCOL_VERSION
        self.decoder = FrameDecoder(max_payload)
        self.inbox: collections.deque[Message] = collections.deque(maxlen=inbox_size)
        self.errors: collections.deque[FrameError] = collections.deque(maxlen=64)
        self.stats = LinkStats()
        self.peer: dict = {}
        self.last_timing: RequestTiming | None = None
        self._seq = int.from_bytes(os.urandom(2), "little")
        self._in: _Incoming | None = None
        self._done: collections.OrderedDict[tuple[int, int], bool] = collections.OrderedDict()
        self._out: _Outgoing | None = None
        self._srtt: float | None = None
        self._rttvar = 0.0
        self._order = 0
        self.incoming_idle_s = max(30.0, 4 * timeout * (retries + 1))
        self.accept_transfer = None   # optional callable(inner_type, total) -> str | None
        self.on_bad_frame = None      # optional callable(FrameError)
        try:
            stream.timeout = read_timeout
        except Exception:  # noqa: BLE001 - a stream without a settable timeout keeps its own
            pass

    # --- raw I/O ----------------------------------------------------------------------------
    def _write(self, data: bytes) -> None:
        try:
            n = self.stream.write(data)
        except Exception as e:  # serial.SerialTimeoutException, OSError, ...
            self.stats.write_failures += 1
            raise LinkError(f"link: write failed: {e}") from e
        if n is not None and n != len(data):
            self.stats.write_failures += 1
            raise LinkError(f"link: short write ({n} of {len(data)} bytes)")
        self.stats.bytes_out += len(data)
        self.stats.frames_out += 1

    def send_frame(self, msg_type: int, seq: int, payload: bytes = b"", flags: int = 0) -> None:
        """Send one frame (payload must fit the frame limit)."""
        if len(payload) > self.max_payload:
            raise LinkError(f"link: frame payload of {len(payload)} bytes > {self.max_payload}")
        self._write(encode_frame(msg_type, seq, payload, flags, self.version))

    def _read_some(self) -> bytes:
        try:
            waiting = getattr(self.stream, "in_waiting", 0) or 0
            data = self.stream.read(min(max(1, waiting), 1 << 16))
        except Exception as e:  # serial.SerialException, OSError (EIO when the peer closes)
            raise LinkError(f"link: stream closed or failed: {e}") from e
        if data:
            self.stats.bytes_in += len(data)
        return data or b""

    def poll(self, max_wait: float = 0.0) -> bool:
        """Read what arrives within ``max_wait`` s and handle it; True if any frame came in."""
        deadline = time.monotonic() + max_wait
        t = self._in
        if t is not None and deadline - t.last > self.incoming_idle_s:
            self._in = None   # abandoned by the sender: free its chunks
        while True:
            data = self._read_some()
            if data:
                got = False
                for item in self.decoder.feed(data):
                    got = True
                    self._handle(item)
                if got:
                    return True
            if time.monotonic() >= deadline:
                return False

    def reset_session(self) -> None:
        """Forget the unfinished incoming transfer and the completed-transfer memory."""
        self._in = None
        self._done.clear()

    def next_seq(self) -> int:
        self._seq = (self._seq + 1) & 0xFFFFFFFF
        return self._seq

    # --- frame dispatch ---------------------------------------------------------------------
    def _handle(self, item: Frame | FrameError) -> None:
        if isinstance(item, FrameError):
            self.stats.frames_bad += 1
            self.errors.append(item)
            if self.on_bad_frame is not None:
                self.on_bad_frame(item)
            return
        self.stats.frames_in += 1
        f = item
        if f.type == MSG.BULK_BEGIN:
            self._on_begin(f)
        elif f.type == MSG.BULK_CHUNK:
            self._on_chunk(f)
        elif f.type == MSG.BULK_ACK:
            self._on_ack(f)
        else:
            self.inbox.append(Message(f.type, f.seq, f.flags, f.payload, f.version,
                                      first_at=time.monotonic()))

    def _ack(self, key: tuple[int, int], status: int, cum: int = 0, bitmap: int = 0,
             reason: str = "") -> None:
        payload = BULK_ACK.pack(status, 0, 0, cum, bitmap) + reason.encode()[:200]
        try:
            self.send_frame(MSG.BULK_ACK, key[0], payload, key[1])
        except LinkError:
            pass  # the sender retransmits; a failed ack write is not fatal here

    def _on_begin(self, f: Frame) -> None:
        key = (f.seq, f.flags)
        if len(f.payload) != BULK_BEGIN.size:
            self._ack(key, ACK_REFUSED, reason=f"BULK_BEGIN payload must be {BULK_BEGIN.size} "
                      f"bytes, got {len(f.payload)}")
            return
        inner, iflags, _, total, chunk, n, sha = BULK_BEGIN.unpack(f.payload)
        if key in self._done:
            self._ack(key, ACK_COMPLETE, n, 0)
            self.inbox.append(Message(inner, f.seq, f.flags, b"", f.version, duplicate=True))
            return
        if self._in is not None and self._in.key == key:
            self._ack(key, ACK_PROGRESS, self._in.cum, self._bitmap(self._in))
            return
        reason = None
        if iflags != f.flags:
            reason = "inner flags differ from the frame flags"
        elif inner in (MSG.BULK_BEGIN, MSG.BULK_CHUNK, MSG.BULK_ACK):
            reason = "a transfer cannot carry a transport message"
        elif total == 0 or total > self.max_transfer:
            reason = f"total {total} bytes outside 1..{self.max_transfer}"
        elif not 1 <= chunk <= self.max_payload - CHUNK_HEAD.size:
            reason = f"chunk size {chunk} outside 1..{self.max_payload - CHUNK_HEAD.size}"
        elif n != -(-total // chunk):
            reason = f"chunk count {n} != ceil({total} / {chunk})"
        elif self.accept_transfer is not None:
            reason = self.accept_transfer(inner, total)
        if reason:
            self._ack(key, ACK_REFUSED, reason=reason)
            return
        # a new transfer replaces an unfinished one (the peer gave up on it)
        now = time.monotonic()
        self._in = _Incoming(key, inner, total, chunk, n, sha, last=now, started=now)
        self._ack(key, ACK_PROGRESS, 0, 0)

    @staticmethod
    def _bitmap(t: _Incoming) -> int:
        bm = 0
        for i in range(64):
            if t.cum + 1 + i in t.chunks:
                bm |= 1 << i
        return bm

    def _on_chunk(self, f: Frame) -> None:
        key = (f.seq, f.flags)
        t = self._in
        if t is None or t.key != key:
            self._ack(key, ACK_COMPLETE if key in self._done else ACK_UNKNOWN)
            return
        if len(f.payload) < CHUNK_HEAD.size:
            return
        (idx,) = CHUNK_HEAD.unpack_from(f.payload)
        data = f.payload[CHUNK_HEAD.size:]
        want = t.chunk_size if idx < t.n - 1 else t.total - t.chunk_size * (t.n - 1)
        if idx >= t.n or len(data) != want:
            self._ack(key, ACK_PROGRESS, t.cum, self._bitmap(t))
            return
        t.last = time.monotonic()
        if idx >= t.cum and idx not in t.chunks:
            t.chunks[idx] = data
            while t.cum in t.chunks:
                t.cum += 1
        if t.cum < t.n:
            self._ack(key, ACK_PROGRESS, t.cum, self._bitmap(t))
            return
        payload = b"".join(t.chunks[i] for i in range(t.n))
        self._in = None
        if hashlib.sha256(payload).digest() != t.sha256:
            self._ack(key, ACK_FAILED, t.cum, 0, "sha256 of the reassembled payload differs")
            return
        self._done[key] = True
        while len(self._done) > 32:
            self._done.popitem(last=False)
        self.stats.bulk_payload_in += len(payload)
        self._ack(key, ACK_COMPLETE, t.n, 0)
        self.inbox.append(Message(t.inner_type, f.seq, f.flags, payload, f.version,
                                  first_at=t.started))

    def _on_ack(self, f: Frame) -> None:
        o = self._out
        if o is None or o.key != (f.seq, f.flags) or len(f.payload) < BULK_ACK.size:
            return
        status, _, _, cum, bitmap = BULK_ACK.unpack_from(f.payload)
        now = time.monotonic()
        if status in (ACK_COMPLETE, ACK_REFUSED, ACK_FAILED, ACK_UNKNOWN):
            o.status = status
            o.reason = f.payload[BULK_ACK.size:].decode("utf-8", "replace")
            if status == ACK_COMPLETE:
                cum, bitmap = o.n, 0
            else:
                return
        if o.status < 0:
            o.status = ACK_PROGRESS
        cum = min(cum, o.n)
        newly = [i for i in range(o.cum, cum) if not o.acked[i]]
        for i in range(64):
            j = cum + 1 + i
            if bitmap >> i & 1 and j < o.n and not o.acked[j]:
                newly.append(j)
        for i in newly:
            o.acked[i] = 1
            if o.tx[i] == 1 and o.sent_at[i] > 0:
                o.rtt_samples.append(now - o.sent_at[i])
        if newly:
            o.progress_at = now
        if cum > o.cum:
            o.cum = cum
            o.progress_at = now

    def _rto(self) -> float:
        if self._srtt is None:
            return max(self.min_rto, min(1.0, self.timeout / 2))
        return min(max(self.min_rto, self._srtt + 4 * self._rttvar), self.timeout)

    def _rtt_sample(self, r: float) -> None:
        if self._srtt is None:
            self._srtt, self._rttvar = r, r / 2
        else:
            self._rttvar = 0.75 * self._rttvar + 0.25 * abs(self._srtt - r)
            self._srtt = 0.875 * self._srtt + 0.125 * r

    # --- sending messages -------------------------------------------------------------------
    def send_message(self, msg_type: int, seq: int, payload: bytes, flags: int = 0) -> None:
        """Send one message: a single frame when it fits a chunk, else a chunked transfer."""
        if len(payload) <= self.chunk_size:
            self.send_frame(msg_type, seq, payload, flags)
        else:
            self._send_bulk(msg_type, seq, payload, flags)

    def _send_bulk(self, msg_type: int, seq: int, payload: bytes, flags: int) -> None:
        total = len(payload)
        cs = self.chunk_size
        n = -(-total // cs)
        key = (seq, flags)
        begin = BULK_BEGIN.pack(msg_type, flags, 0, total, cs, n,
                                hashlib.sha256(payload).digest())
        o = _Outgoing(key, n, bytearray(n), [0.0] * n, [0] * n, [0] * n)
        self._out = o
        mv = memoryview(payload)
        try:
            # 1. BEGIN until acknowledged (accepted, refused or already complete)
            for attempt in range(self.retries + 1):
                t0 = time.monotonic()
                self.send_frame(MSG.BULK_BEGIN, seq, begin, flags)
                wait_until = t0 + max(self._rto() * (2 ** attempt), self.min_rto)
                while o.status < 0 and time.monotonic() < wait_until:
                    self.poll(wait_until - time.monotonic())
                if o.status >= 0:
                    # no RTT sample from BEGIN: a small frame's round trip says nothing about a
                    # chunk's (serialisation dominates on a slow line); until the first chunk
                    # sample the timer is a conservative 1 s
                    break
                self.stats.retransmits += 1
            else:
                raise LinkError(f"link: no answer to BULK_BEGIN of {_name(msg_type)} "
                                f"({total} bytes) after {self.retries + 1} attempts")
            self._check_status(o, msg_type, total)
            # 2. chunks with a sliding window
            next_new = 0
            backoff = 1.0
            timer_at = 0.0
            o.progress_at = time.monotonic()
            while o.status != ACK_COMPLETE:
                now = time.monotonic()
                while next_new < n and next_new < o.cum + self.window:
                    self._send_chunk(o, next_new, mv, cs)
                    next_new += 1
                self.poll(0.0 if next_new < n and next_new < o.cum + self.window else 0.005)
                for r in o.rtt_samples:
                    self._rtt_sample(r)
                    backoff = 1.0
                o.rtt_samples.clear()
                self._check_status(o, msg_type, total)
                if o.status == ACK_COMPLETE:
                    break
                now = time.monotonic()
                if now - o.progress_at > self.timeout * (self.retries + 1):
                    raise LinkError(f"link: transfer of {total} bytes stalled: no acknowledgement "
                                    f"for {now - o.progress_at:.1f} s")
                # fast retransmit: an unacknowledged chunk sent before an acknowledged one was
                # lost (a serial line does not reorder)
                hi = max((o.order[i] for i in range(o.cum, next_new) if o.acked[i]), default=-1)
                for i in range(o.cum, next_new):
                    if not o.acked[i] and o.order[i] < hi:
                        self._retransmit(o, i, mv, cs, total)
                # retransmission timer (restarted by every acknowledgement): resend the oldest
                # unacknowledged chunk and back off
                if next_new > o.cum and now - max(o.progress_at, timer_at) > self._rto() * backoff:
                    i = next(i for i in range(o.cum, next_new) if not o.acked[i])
                    self._retransmit(o, i, mv, cs, total)
                    timer_at = now
                    backoff = min(backoff * 2, 64.0)
            self.stats.bulk_payload_out += total
        finally:
            self._out = None

    def _retransmit(self, o: _Outgoing, i: int, mv: memoryview, cs: int, total: int) -> None:
        if o.tx[i] > self.retries:
            raise LinkError(f"link: chunk {i} of {o.n} ({total} bytes) not acknowledged after "
                            f"{o.tx[i]} transmissions")
        self.stats.retransmits += 1
        self._send_chunk(o, i, mv, cs)

    def _send_chunk(self, o: _Outgoing, i: int, mv: memoryview, cs: int) -> None:
        self._order += 1
        o.order[i] = self._order
        o.tx[i] += 1
        o.sent_at[i] = time.monotonic()
        self.send_frame(MSG.BULK_CHUNK, o.key[0], CHUNK_HEAD.pack(i) + bytes(mv[i * cs:(i + 1) * cs]),
                        o.key[1])

    @staticmethod
    def _check_status(o: _Outgoing, msg_type: int, total: int) -> None:
        if o.status in (ACK_REFUSED, ACK_FAILED, ACK_UNKNOWN):
            raise LinkError(f"link: transfer of {total} bytes {ACK_NAMES[o.status]} by the peer"
                            + (f": {o.reason}" if o.reason else ""))

    # --- requests (host side) ---------------------------------------------------------------
    def request_raw(self, msg_type: int, payload: bytes = b"", *, timeout: float | None = None,
                    retries: int | None = None) -> Message:
        """Send a request and return the reply message; raise RemoteError on an ERROR reply."""
        timeout = self.timeout if timeout is None else timeout
        retries = self.retries if retries is None else retries
        seq = self.next_seq()
        name = _name(msg_type)
        t_start = time.monotonic()
        out0, in0 = self.stats.bytes_out, self.stats.bytes_in
        for attempt in range(retries + 1):
            t_try = time.monotonic()
            self.send_message(msg_type, seq, payload, 0)
            t_sent = time.monotonic()
            deadline = t_sent + timeout
            while True:
                while self.inbox:
                    m = self.inbox.popleft()
                    if m.seq != seq or not m.is_reply or m.duplicate:
                        continue
                    end = time.monotonic()
                    first = min(max(m.first_at, t_sent), end)
                    self.last_timing = RequestTiming(
                        t_sent - t_try, first - t_sent, end - first, end - t_start, attempt + 1,
                        self.stats.bytes_out - out0, self.stats.bytes_in - in0)
                    if m.type == MSG.ERROR:
                        try:
                            e = decode_message(MSG.ERROR, True, m.payload)
                        except PayloadError as ex:
                            raise LinkError(f"link: malformed ERROR reply to {name}: {ex}") from ex
                        raise RemoteError(e["code"], e["name"], e["message"])
                    if m.type == msg_type:
                        return m
                now = time.monotonic()
                t = self._in
                if t is not None and t.key == (seq, FLAG_REPLY):
                    deadline = max(deadline, t.last + timeout)  # a long reply is arriving
                if now >= deadline:
                    break
                self.poll(min(0.05, deadline - now))
            self.stats.retransmits += 1
        raise LinkError(f"link: no reply to {name} (seq {seq}) after {retries + 1} attempts "
                        f"of {timeout:g} s")

    def request(self, msg_type: int, fields: dict | None = None, **kw: Any) -> dict:
        """Send a request with a typed-dict payload; return the decoded reply fields."""
        m = self.request_raw(msg_type, encode_payload(fields or {}), **kw)
        try:
            return decode_message(msg_type, True, m.payload)
        except PayloadError as e:
            raise LinkError(f"link: malformed reply: {e}") from e

    def hello(self, token: bytes | None = None, client: str = "sparsefl-host",
              timeout: float | None = None) -> dict:
        """HELLO (version negotiation) and, with a token, AUTH (mutual HMAC pairing).

        Returns the agent's HELLO reply fields (board UUID, limits, ``paired``).
        """
        self.version = PROTOCOL_VERSION
        rep = self.request(MSG.HELLO, {"min_version": min(SUPPORTED_VERSIONS),
                                       "max_version": max(SUPPORTED_VERSIONS),
                                       "client": client}, timeout=timeout)
        if rep["version"] not in SUPPORTED_VERSIONS:
            raise LinkError(f"link: agent chose protocol version {rep['version']}, "
                            f"this host speaks {SUPPORTED_VERSIONS}")
        self.version = rep["version"]
        if token is not None:
            host_nonce = os.urandom(32)
            mac = pair_mac(token, b"host", rep["nonce"], host_nonce)
            a = self.request(MSG.AUTH, {"nonce": host_nonce, "mac": mac}, timeout=timeout)
            want = pair_mac(token, b"agent", host_nonce, rep["nonce"])
            if not hmac.compare_digest(a["mac"], want):
                raise LinkError("link: the agent failed to prove it knows the pairing token")
            rep = dict(rep, paired=True)
        self.peer = rep
        return rep

    def close(self) -> None:
        try:
            self.stream.close()
        except Exception:  # noqa: BLE001
            pass


class SocketStream:
    """A connected TCP socket with the pyserial subset the link uses."""

    def __init__(self, sock: socket.socket, timeout: float = 0.01,
                 write_timeout: float = 5.0) -> None:
        self.sock = sock
        self.timeout = timeout
        self.write_timeout = write_timeout
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass  # not TCP (e.g. a Unix socket pair)
        sock.setblocking(False)
        self.closed = False

    @property
    def in_waiting(self) -> int:
        return 0

    def read(self, n: int = 1) -> bytes:
        r, _, _ = select.select([self.sock], [], [], self.timeout)
        if not r:
            return b""
        try:
            data = self.sock.recv(max(n, 65536))
        except BlockingIOError:
            return b""
        if not data:
            self.closed = True
            raise ConnectionError("peer closed the connection")
        return data

    def write(self, data: bytes) -> int:
        mv = memoryview(data)
        deadline = time.monotonic() + self.write_timeout
        while mv:
            _, w, _ = select.select([], [self.sock], [], max(0.0, deadline - time.monotonic()))
            if not w:
                raise TimeoutError("socket write timed out")
            k = self.sock.send(mv)
            mv = mv[k:]
        return len(data)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True
        self.sock.close()
