"""The board agent in its own process, over a real pseudo-terminal (through a clean relay) and
over TCP on 127.0.0.1: first start, pairing, commands, errors, and 10,000 hostile frames."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import random
import stat
import struct
import threading
import time

import pytest
import serial
from relay import Relay, spawn_agent, stop_agent

from embedded.protocol.framing import FLAG_REPLY, encode_frame, pack_frame
from embedded.protocol.framing import cobs_encode as cobs
from embedded.protocol.messages import ERR, MSG, decode_message, encode_payload
from embedded.protocol.transport import (
    BULK_BEGIN,
    Link,
    LinkError,
    RemoteError,
    open_link,
    pair_mac,
)

TOKEN = b"0123456789abcdef0123456789abcdef"


@pytest.fixture(scope="module")
def board(tmp_path_factory):
    """One agent on the agent end of a relayed pty pair; yields (host pty path, process)."""
    d = tmp_path_factory.mktemp("board")
    (d / "token").write_bytes(TOKEN + b"\n")
    relay = Relay().start()
    proc, line = spawn_agent(["--port", relay.a_path, "--token-file", str(d / "token"),
                              "--sensor", "none", "--max-transfer", str(1 << 20)],
                             str(d / "state"))
    assert line.startswith(f"serving {relay.a_path} board ")
    yield relay.b_path, proc
    stop_agent(proc)
    relay.close()


@pytest.fixture
def host(board):
    ser = serial.Serial(board[0], 921600, timeout=0.01, write_timeout=5)
    link = Link(ser, timeout=2.0, retries=3)
    yield link
    ser.close()


def wait_reply(link: Link, seq: int, timeout: float = 3.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        for m in list(link.inbox):
            if m.seq == seq and m.is_reply:
                link.inbox.remove(m)
                return m
        link.poll(0.02)
    raise AssertionError(f"no reply to seq {seq}")


def error_of(m) -> dict:
    assert m.type == MSG.ERROR, MSG(m.type).name
    return decode_message(MSG.ERROR, True, m.payload)


# --- first start, identity ------------------------------------------------------------------
def test_first_start_creates_uuid_and_token_once(tmp_path):
    state = tmp_path / "state"
    proc, line = spawn_agent(["--listen", "127.0.0.1:0", "--sensor", "none"], str(state))
    try:
        uuid1 = line.split()[-1]
        tok = (state / "token").read_text().strip()
        assert len(bytes.fromhex(tok)) == 32
        for f in ("token", "board_uuid"):
            assert stat.S_IMODE(os.stat(state / f).st_mode) == 0o600
        assert (state / "board_uuid").read_text().strip() == uuid1
    finally:
        stop_agent(proc)
    assert tok in (state / "agent.log").read_text()   # shown to the user on first start
    proc, line = spawn_agent(["--listen", "127.0.0.1:0", "--sensor", "none"], str(state))
    try:
        assert line.split()[-1] == uuid1
        assert (state / "token").read_text().strip() == tok
        port = int(line.split()[1].rsplit(":", 1)[1])
        ser = serial.serial_for_url(f"socket://127.0.0.1:{port}", timeout=0.01)
        link = Link(ser)
        rep = link.hello(tok.encode())
        assert rep["board_uuid"] == uuid1 and rep["paired"]
        assert link.request(MSG.PING, {"t": 2.5})["t"] == 2.5
        ser.close()
    finally:
        stop_agent(proc)
    assert tok not in (state / "agent.log").read_text().split("\n", 1)[1]   # shown once


def test_listen_refuses_non_loopback_without_allow_remote(tmp_path):
    with pytest.raises(RuntimeError, match="refusing to listen on non-loopback"):
        spawn_agent(["--listen", "0.0.0.0:0", "--sensor", "none"], str(tmp_path / "s"))


def test_open_link_errors_name_the_port():
    with pytest.raises(LinkError, match="cannot open /nonexistent/tty"):
        open_link("/nonexistent/tty")


def test_bad_token_file_is_a_clear_error(tmp_path):
    (tmp_path / "t").write_text("short")
    with pytest.raises(RuntimeError, match="too short"):
        spawn_agent(["--port", "/nonexistent", "--token-file", str(tmp_path / "t")],
                    str(tmp_path / "s"))


# --- pairing -----------------------------------------------------------------------------------
def test_unpaired_agent_answers_only_hello_and_info(host):
    rep = host.hello()
    assert rep["version"] == 1 and not rep["paired"] and len(rep["nonce"]) == 32
    info = host.request(MSG.INFO)
    assert info["board_uuid"] == rep["board_uuid"]
    assert info["cores"] == os.cpu_count()
    assert info["python"] == platform.python_version()
    assert info["numba"] == importlib.metadata.version("numba")
    assert info["memory"]["total_bytes"] > 0 and info["sensors"] == []
    assert info["cpu_model"]
    for t in (MSG.PING, MSG.RESET, MSG.ABORT, MSG.LOAD, MSG.TRAIN):
        with pytest.raises(RemoteError) as e:
            host.request(t, {"name": "x", "data": b"1"})
        assert e.value.code == ERR.UNAUTHORIZED
    with pytest.raises(LinkError, match="not paired"):   # refused before any chunk is sent
        host.request(MSG.ECHO, {"data": bytes(50_000)})
    assert host.stats.bulk_payload_out == 0


def test_wrong_token_fails_and_nonce_is_single_use(host):
    with pytest.raises(RemoteError) as e:
        host.hello(b"x" * 32)
    assert e.value.code == ERR.AUTH_FAILED
    with pytest.raises(RemoteError) as e:
        host.request(MSG.PING)
    assert e.value.code == ERR.UNAUTHORIZED
    # a correct AUTH works once per HELLO: replaying it is refused
    rep = host.hello()
    hn = os.urandom(32)
    auth = {"nonce": hn, "mac": pair_mac(TOKEN, b"host", rep["nonce"], hn)}
    out = host.request(MSG.AUTH, auth)
    assert out["mac"] == pair_mac(TOKEN, b"agent", hn, rep["nonce"])
    with pytest.raises(RemoteError) as e:
        host.request(MSG.AUTH, auth)
    assert e.value.code == ERR.AUTH_FAILED and "without a preceding HELLO" in str(e.value)


def test_version_negotiation(host):
    with pytest.raises(RemoteError) as e:
        host.request(MSG.HELLO, {"min_version": 2, "max_version": 9})
    assert e.value.code == ERR.BAD_VERSION
    assert host.request(MSG.HELLO, {"min_version": 0, "max_version": 9})["version"] == 1


# --- commands -------------------------------------------------------------------------------
def test_echo_load_reset(host):
    import hashlib
    host.hello(TOKEN)
    data = os.urandom(200_000)
    assert host.request(MSG.ECHO, {"data": data})["data"] == data
    rep = host.request(MSG.LOAD, {"name": "blob", "data": data})
    assert rep == {"name": "blob", "size": len(data), "sha256": hashlib.sha256(data).digest()}
    with pytest.raises(RemoteError) as e:   # resident limit (--max-transfer 1 MiB)
        for k in range(6):
            host.request(MSG.LOAD, {"name": f"b{k}", "data": data})
    assert e.value.code == ERR.TOO_LARGE
    r = host.request(MSG.RESET)
    assert r["reset"] and r["cleared_blobs"] >= 5
    assert host.request(MSG.PING, {"t": 1.0})["t"] == 1.0   # RESET keeps the pairing


@pytest.mark.parametrize("cmd", [MSG.TRAIN, MSG.EVAL, MSG.BENCH, MSG.LOAD_MODEL, MSG.LOAD_DATA,
                                 MSG.INFER_BENCH])
def test_training_commands_check_their_fields(host, cmd):
    """The training commands (embedded/agent_commands.py, tested in tests/test_board.py) refuse
    a request without its required fields, naming the command and the field."""
    host.hello(TOKEN)
    with pytest.raises(RemoteError) as e:
        host.request(cmd, {})
    assert e.value.code == ERR.MALFORMED and cmd.name in str(e.value)
    assert "missing field" in str(e.value)


def test_garbage_unknown_malformed_and_bad_version_get_error_frames(host):
    host.hello(TOKEN)
    host._write(b"\x13\x37garbage\xff\xfe\x00")
    m = wait_reply(host, 0)
    assert error_of(m)["code"] == ERR.BAD_FRAME
    host.send_frame(0x5A, 1001, b"")
    assert error_of(wait_reply(host, 1001))["code"] == ERR.UNKNOWN_TYPE
    host.send_frame(MSG.ECHO, 1002, encode_payload({"data": "not bytes"}))
    e = error_of(wait_reply(host, 1002))
    assert e["code"] == ERR.MALFORMED and "'data'" in e["message"]
    host.send_frame(MSG.PING, 1003, b"\x08\xff\xff\xff\xff")   # dict of 4 billion items
    assert error_of(wait_reply(host, 1003))["code"] == ERR.MALFORMED
    host._write(encode_frame(MSG.PING, 1004, b"", version=7))
    assert error_of(wait_reply(host, 1004))["code"] == ERR.BAD_VERSION
    host._write(cobs(pack_frame(MSG.PING, 1005, b"x")[:-1] + b"\x00") + b"\x00")  # bad CRC
    assert error_of(wait_reply(host, 0))["code"] == ERR.BAD_FRAME
    assert host.request(MSG.PING, {"t": 3.0})["t"] == 3.0


def test_retransmitted_request_is_answered_from_the_cache(host):
    host.hello(TOKEN)
    before = host.request(MSG.INFO)["counters"]
    payload = encode_payload({"name": "dup", "data": b"abc"})
    host.send_frame(MSG.LOAD, 2001, payload)
    first = wait_reply(host, 2001)
    host.send_frame(MSG.LOAD, 2001, payload)
    second = wait_reply(host, 2001)
    assert first.payload == second.payload and first.type == MSG.LOAD
    after = host.request(MSG.INFO)["counters"]
    assert after["replayed"] == before.get("replayed", 0) + 1
    assert after["requests"] == before["requests"] + 2   # the LOAD once, plus the first INFO


def test_abort_stops_a_long_command_and_the_agent_stays_responsive(host):
    host.hello(TOKEN)
    host.send_message(MSG.ECHO, 3001, encode_payload({"data": b"x", "delay_s": 30.0}))
    time.sleep(0.1)
    assert host.request(MSG.PING, {"t": 4.0})["t"] == 4.0     # main loop not blocked
    with pytest.raises(RemoteError) as e:
        host.request(MSG.ECHO, {"data": b"y"})
    assert e.value.code == ERR.BUSY
    t0 = time.monotonic()
    assert host.request(MSG.ABORT)["aborted"] is True
    m = wait_reply(host, 3001, timeout=2.0)
    assert error_of(m)["code"] == ERR.ABORTED
    assert time.monotonic() - t0 < 1.5
    assert host.request(MSG.ABORT)["aborted"] is False
    assert host.request(MSG.ECHO, {"data": b"z", "delay_s": 0.05})["data"] == b"z"


# --- 10,000 hostile frames ----------------------------------------------------------------
def _mutated_frames(rng: random.Random, n: int) -> list[bytes]:
    types = [int(t) for t in MSG] + [0, 0x09, 0x42, 0xFF]
    good_payloads = [
        {"min_version": 1, "max_version": 1}, {"t": 1.0}, {"data": b"abc"},
        {"name": "n", "data": b"\x00" * 10}, {}, {"nonce": b"n" * 32, "mac": b"m" * 32},
        {"data": b"q", "delay_s": 0.01},
    ]
    out = []
    for k in range(n):
        r = rng.random()
        t = rng.choice(types)
        seq = rng.randrange(1 << 32)
        flags = 0 if rng.random() < 0.9 else rng.randrange(256)
        version = 1 if rng.random() < 0.95 else rng.randrange(256)
        if r < 0.3:      # random bytes, sometimes with delimiters inside
            blob = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 300)))
            out.append(blob + (b"\x00" if rng.random() < 0.7 else b""))
            continue
        if r < 0.55:     # a schema payload with one field mutated
            d = dict(rng.choice(good_payloads))
            key = rng.choice(list(d) + ["extra"])
            d[key] = rng.choice([None, -1, 2 ** 62, 1e308, "s" * rng.randrange(50),
                                 b"b" * rng.randrange(2000), [1] * 5, {"x": {"y": [None]}},
                                 True, rng.random() * 0.05])
            if rng.random() < 0.2 and d:
                d.pop(rng.choice(list(d)))
            payload = encode_payload(d)
            if t == MSG.HELLO and k < n // 2:
                t = MSG.PING   # keep the session paired for the first half
        elif r < 0.65:   # TLV with a lying length or count
            payload = bytes([rng.choice([5, 6, 7, 8])]) + struct.pack(
                "<I", rng.choice([0xFFFFFFFF, 1 << 30, rng.randrange(1000)])) + b"xy"
        elif r < 0.8:    # BULK_BEGIN with mutated fields, sometimes consistent
            total = rng.choice([0, 1, 5000, 1 << 20, (1 << 20) + 1, 2 ** 64 - 1,
                                rng.randrange(1 << 40)])
            chunk = rng.choice([0, 1, 1024, 4096, 65532, 65533, 0xFFFFFFFF])
            nch = -(-total // chunk) if chunk and rng.random() < 0.6 else rng.randrange(1 << 32)
            nch = min(nch, 0xFFFFFFFF)
            inner = rng.choice([MSG.ECHO, MSG.LOAD, MSG.PING, MSG.BULK_ACK, 0x42])
            payload = BULK_BEGIN.pack(inner, flags & 1, 0, total, chunk, nch, bytes(32))
            t = MSG.BULK_BEGIN
            flags &= 1
        elif r < 0.9:    # BULK_CHUNK with random index and size
            payload = struct.pack("<I", rng.choice([0, 1, 5, 1 << 31, rng.randrange(1 << 32)]))
            payload += bytes(rng.choice([0, 1, 1024, 4096]))
            t = MSG.BULK_CHUNK
        else:            # BULK_ACK / anything with a random payload
            payload = bytes(rng.randrange(256) for _ in range(rng.randrange(0, 40)))
            t = rng.choice([MSG.BULK_ACK, t])
        raw = bytearray(pack_frame(t, seq, payload, 0, version))
        raw[2] = flags
        if flags or rng.random() < 0.05:   # sometimes a broken CRC or header
            body = bytes(raw[:-4])
            import zlib
            crc = zlib.crc32(body) ^ (0 if rng.random() < 0.5 else 1)
            raw = bytearray(body + struct.pack("<I", crc))
        out.append(cobs(bytes(raw)) + b"\x00")
    return out


def _rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_ten_thousand_hostile_frames(board):
    path, proc = board
    ser = serial.Serial(path, 921600, timeout=0.01, write_timeout=10)
    link = Link(ser, timeout=2.0, retries=3)
    link.hello(TOKEN)
    link.request(MSG.ECHO, {"data": os.urandom(300_000)})   # warm the allocator first
    rss0 = _rss_kb(proc.pid)
    info0 = link.request(MSG.INFO)["counters"]
    frames = _mutated_frames(random.Random(20261121), 10_000)
    assert sum(f.endswith(b"\x00") for f in frames) > 9_000
    stop = threading.Event()
    received = [0]

    def drain():
        while not stop.is_set():
            received[0] += len(ser.read(65536))

    th = threading.Thread(target=drain, daemon=True)
    th.start()
    try:
        for k in range(0, len(frames), 50):
            ser.write(b"".join(frames[k:k + 50]))
            assert proc.poll() is None, "agent died"
        time.sleep(0.5)
    finally:
        stop.set()
        th.join(timeout=5)
    assert received[0] > 0          # the agent answered (errors) while being flooded
    link2 = Link(ser, timeout=2.0, retries=5)
    link2.hello(TOKEN)
    assert link2.request(MSG.PING, {"t": 9.0})["t"] == 9.0
    info = link2.request(MSG.INFO)
    assert proc.poll() is None
    assert info["counters"]["bad_frames"] - info0.get("bad_frames", 0) > 1000
    assert info["counters"]["requests"] - info0["requests"] > 2000
    assert info["counters"].get("error_INTERNAL", 0) == 0, "a handler crashed on input"
    assert _rss_kb(proc.pid) - rss0 < 64 * 1024
    link2.request(MSG.ABORT)
    ser.close()


def test_transfer_time_is_reported_apart_from_compute_time(host):
    host.hello(TOKEN)
    data = os.urandom(100_000)
    assert host.request(MSG.ECHO, {"data": data, "delay_s": 0.3})["data"] == data
    t = host.last_timing
    # the agent waits 0.3 s between having the request and sending the first reply frame; the
    # host's clock only loses the one-way latency of the final acknowledgement
    assert t.wait_s > 0.25
    assert t.upload_s > 0 and t.download_s > 0 and t.attempts == 1
    assert t.total_s >= t.upload_s + t.wait_s + t.download_s - 1e-6
    assert t.bytes_sent > 100_000 and t.bytes_received > 100_000


def test_replies_use_the_reply_flag(host):
    host.hello(TOKEN)
    host.send_frame(MSG.PING, 4001, encode_payload({}))
    m = wait_reply(host, 4001)
    assert m.flags & FLAG_REPLY and m.type == MSG.PING


# --- TCP mode, sensors, data root ---------------------------------------------------------
def test_tcp_reconnect_and_sensor_in_info(tmp_path):
    from test_sensors import orin_tree

    orin_tree(tmp_path / "sysfs")
    (tmp_path / "token").write_bytes(TOKEN)
    proc, line = spawn_agent(["--listen", "127.0.0.1:0", "--token-file", str(tmp_path / "token"),
                              "--sensor", "jetson-ina3221", "--sysfs-root",
                              str(tmp_path / "sysfs")], str(tmp_path / "state"))
    try:
        port = int(line.split()[1].rsplit(":", 1)[1])
        for _ in range(2):    # the agent goes back to accept() when a host disconnects
            link = open_link(f"socket://127.0.0.1:{port}")
            ser = link.stream
            link.hello(TOKEN)
            info = link.request(MSG.INFO)
            assert [(s["kind"], s["driver"], s["rail"]) for s in info["sensors"]] == \
                [("jetson-ina3221", "hwmon", "VDD_IN")]
            data = os.urandom(100_000)
            assert link.request(MSG.ECHO, {"data": data})["data"] == data
            ser.close()
    finally:
        stop_agent(proc)


def test_requested_sensor_missing_is_a_clear_startup_error(tmp_path):
    with pytest.raises(RuntimeError, match="no intel-rapl zones"):
        spawn_agent(["--listen", "127.0.0.1:0", "--sensor", "rapl", "--sysfs-root",
                     str(tmp_path)], str(tmp_path / "s"))


def test_safe_data_path(tmp_path):
    from embedded.agent import AgentError, safe_data_path

    root = tmp_path / "data"
    (root / "shards").mkdir(parents=True)
    (root / "shards" / "c0.npz").write_bytes(b"x")
    (tmp_path / "secret").write_text("s")
    os.symlink(tmp_path / "secret", root / "link")
    assert safe_data_path(str(root), "shards/c0.npz") == str(root / "shards" / "c0.npz")
    for bad, why in [("../secret", "'..'"), ("shards/../../secret", "'..'"),
                     (str(tmp_path / "secret"), "relative"), ("link", "leaves the data root"),
                     ("", "relative"), ("a\x00b", "relative"), ("~/x", "relative")]:
        with pytest.raises(AgentError, match=why) as e:
            safe_data_path(str(root), bad)
        assert e.value.code == ERR.REFUSED
    with pytest.raises(AgentError, match="no --data-root"):
        safe_data_path(None, "x")
