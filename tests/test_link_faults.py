"""Transfers through a faulty line (bit flips, dropped and duplicated bytes, latency, a cut
cable) and an agent killed mid-transfer: every transfer completes bit-exact or fails with a
clear LinkError after the configured retries — never silently corrupted, never hanging."""

from __future__ import annotations

import os
import threading
import time

import pytest
import serial
from relay import Faults, Relay, spawn_agent, stop_agent

from embedded.protocol.messages import MSG
from embedded.protocol.transport import Link, LinkError

TOKEN = b"fedcba9876543210fedcba9876543210"


def start(tmp_path, relay, *extra):
    (tmp_path / "token").write_bytes(TOKEN)
    return spawn_agent(["--port", relay.a_path, "--token-file", str(tmp_path / "token"),
                        "--sensor", "none", "--chunk-size", "1024", *extra],
                       str(tmp_path / "state"))


def connect(relay, **kw) -> tuple[serial.Serial, Link]:
    ser = serial.Serial(relay.b_path, 921600, timeout=0.01, write_timeout=5)
    kw = {"timeout": 0.5, "retries": 8, "chunk_size": 1024, "min_rto": 0.02, **kw}
    return ser, Link(ser, **kw)


@pytest.fixture(scope="module")
def faulty(tmp_path_factory):
    relay = Relay(seed=7).start()
    proc, _ = start(tmp_path_factory.mktemp("faulty"), relay)
    yield relay, proc
    stop_agent(proc)
    relay.close()


def set_faults(relay: Relay, **kw) -> None:
    relay.down.f = Faults(**kw)
    relay.up.f = Faults(**kw)


def test_noisy_line_transfers_are_bit_exact(faulty):
    relay, proc = faulty
    ser, link = connect(relay)
    link.hello(TOKEN)
    set_faults(relay, flip=2e-5, drop=2e-5, dup=2e-5, latency=0.002)
    try:
        done = 0
        for k in range(4):
            data = os.urandom(150_000 + 17 * k)
            try:
                echoed = link.request(MSG.ECHO, {"data": data}, timeout=1.0)["data"]
            except LinkError:
                continue                    # allowed: a loud failure
            assert echoed == data           # never a silently corrupted payload
            done += 1
        assert done >= 3
        assert link.stats.retransmits > 0 or relay.down.flipped + relay.up.flipped == 0
        faults = sum(getattr(d, a) for d in (relay.down, relay.up)
                     for a in ("flipped", "dropped", "duplicated"))
        assert faults > 10
        assert link.stats.frames_bad > 0    # the host saw corrupted frames and dropped them
    finally:
        set_faults(relay)
        ser.close()


def test_hopeless_line_fails_loudly_within_the_retry_budget(faulty):
    relay, proc = faulty
    ser, link = connect(relay, timeout=0.3, retries=3)
    link.hello(TOKEN)
    set_faults(relay, flip=5e-3)            # nearly every 1 KB frame is hit
    t0 = time.monotonic()
    try:
        with pytest.raises(LinkError, match=r"not acknowledged after|stalled|no answer|no reply"):
            link.request(MSG.ECHO, {"data": os.urandom(100_000)})
        assert time.monotonic() - t0 < 30
    finally:
        set_faults(relay)
        ser.close()
    # the agent survived the noise and answers on a clean line
    ser, link = connect(relay)
    link.hello(TOKEN)
    assert link.request(MSG.PING, {"t": 1.0})["t"] == 1.0
    ser.close()


def test_cable_cut_mid_transfer_fails_within_timeout(faulty):
    relay, proc = faulty
    ser, link = connect(relay, timeout=0.5, retries=3)
    link.hello(TOKEN)
    relay.down.f = Faults(disconnect_after=relay.down.bytes_in + 60_000)
    t0 = time.monotonic()
    try:
        with pytest.raises(LinkError):
            link.request(MSG.ECHO, {"data": os.urandom(300_000)})
        assert time.monotonic() - t0 < 20
        assert link.stats.bulk_payload_out == 0
    finally:
        set_faults(relay)
        ser.close()


def run_with_watchdog(fn, limit: float):
    """Run ``fn`` in a thread; fail the test if it is still running after ``limit`` s."""
    out: dict = {}

    def target():
        try:
            out["value"] = fn()
        except BaseException as e:  # noqa: BLE001
            out["error"] = e

    th = threading.Thread(target=target, daemon=True)
    th.start()
    th.join(limit)
    assert not th.is_alive(), f"host call still blocked after {limit} s"
    return out


def test_agent_killed_mid_transfer(tmp_path):
    relay = Relay(Faults(baud=921600), Faults(baud=921600)).start()
    proc, _ = start(tmp_path, relay)
    ser, link = connect(relay, timeout=0.5, retries=4)
    try:
        link.hello(TOKEN)
        killer = threading.Timer(0.5, proc.kill)   # the agent process we started
        killer.start()
        t0 = time.monotonic()
        out = run_with_watchdog(lambda: link.request(MSG.LOAD, {"name": "w",
                                                                "data": os.urandom(400_000)}),
                                limit=30)
        assert isinstance(out.get("error"), LinkError), out
        assert proc.wait(timeout=5) != 0
        assert 0.5 < time.monotonic() - t0 < 30
    finally:
        ser.close()
        stop_agent(proc)
        relay.close()


def test_agent_killed_while_computing(tmp_path):
    """The stand-in for TRAIN (ECHO with a delay): the host's wait ends in a LinkError."""
    relay = Relay().start()
    proc, _ = start(tmp_path, relay)
    ser, link = connect(relay)
    try:
        link.hello(TOKEN)
        threading.Timer(0.3, proc.kill).start()
        out = run_with_watchdog(lambda: link.request(MSG.ECHO, {"data": b"x", "delay_s": 20.0},
                                                     timeout=1.0, retries=2), limit=15)
        assert isinstance(out.get("error"), LinkError)
        assert "no reply to ECHO" in str(out["error"])
    finally:
        ser.close()
        stop_agent(proc)
        relay.close()
