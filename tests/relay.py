"""A fault-injecting relay between two pseudo-terminals, for link tests and benchmarks.

    agent ── pty A (slave path ``a_path``) ══ relay ══ pty B (slave path ``b_path``) ── host

The relay owns both masters and copies bytes between them, per direction applying: bit flips,
dropped and duplicated bytes (rates per byte), a one-way latency, a line-rate throttle (bytes/s
of an 8N1 UART at ``baud``: baud / 10) and a disconnect after N bytes (the direction becomes a
black hole, like a pulled cable). Both slaves are set raw and kept open by the relay, so a peer
closing its end never makes the other side see EOF — only silence, as on a real serial line.

Run as a thread (``Relay(...).start()``) or as a process:
``python tests/relay.py [--baud 921600] [--latency 0.005] [--seed 1]`` prints
``A_PATH B_PATH`` on its first stdout line and relays until terminated.
"""

from __future__ import annotations

import argparse
import collections
import os
import random
import select
import sys
import threading
import time
import tty
from dataclasses import dataclass


@dataclass
class Faults:
    """Faults of one direction. Rates are per byte."""

    flip: float = 0.0          # probability a byte gets one random bit flipped
    drop: float = 0.0          # probability a byte is dropped
    dup: float = 0.0           # probability a byte is sent twice
    latency: float = 0.0       # one-way delay (s)
    baud: int | None = None    # throttle to baud/10 bytes/s (8N1); None = unthrottled
    disconnect_after: int | None = None   # stop forwarding after this many bytes


class _Direction:
    def __init__(self, src: int, dst: int, faults: Faults, rng: random.Random) -> None:
        self.src, self.dst, self.f, self.rng = src, dst, faults, rng
        self.queue: collections.deque[list] = collections.deque()   # [release_time, bytearray]
        self.credit = 0.0
        self.last = time.monotonic()
        self.bytes_in = 0
        self.bytes_out = 0
        self.flipped = self.dropped = self.duplicated = 0
        self.lock = threading.Lock()

    @property
    def rate(self) -> float | None:
        return None if not self.f.baud else self.f.baud / 10.0

    def mutate(self, data: bytes) -> bytes:
        f, rng = self.f, self.rng
        if f.disconnect_after is not None:
            room = max(0, f.disconnect_after - self.bytes_in)
            self.bytes_in += len(data)
            data = data[:room]
        else:
            self.bytes_in += len(data)
        if not (f.flip or f.drop or f.dup):
            return data
        out = bytearray()
        for b in data:
            r = rng.random()
            if r < f.drop:
                self.dropped += 1
                continue
            if r < f.drop + f.flip:
                b ^= 1 << rng.randrange(8)
                self.flipped += 1
            out.append(b)
            if rng.random() < f.dup:
                out.append(b)
                self.duplicated += 1
        return bytes(out)

    def push(self, data: bytes, now: float) -> None:
        data = self.mutate(data)
        if data:
            self.queue.append([now + self.f.latency, bytearray(data)])

    def pump(self, now: float) -> float:
        """Write what may leave now; return seconds until something more may leave."""
        rate = self.rate
        if rate:
            # a UART with bytes waiting keeps sending even when this process is descheduled;
            # an idle line saves up no more than a small burst
            busy = bool(self.queue) and self.queue[0][0] <= self.last
            self.credit += (now - self.last) * rate
            if not busy:
                self.credit = min(self.credit, max(64.0, rate * 0.002))
        self.last = now
        out = bytearray()
        while self.queue and self.queue[0][0] <= now:
            chunk = self.queue[0][1]
            k = len(chunk) if not rate else min(len(chunk), int(self.credit))
            if k <= 0:
                break
            out += chunk[:k]
            del chunk[:k]
            if rate:
                self.credit -= k
            if not chunk:
                self.queue.popleft()
        if out:
            try:
                n = os.write(self.dst, out)
            except BlockingIOError:
                n = 0
            except OSError:
                n = len(out)   # destination gone: the bytes are lost, as on a cut line
            self.bytes_out += n
            if n < len(out):   # keep what did not fit, in order, at the front
                self.queue.appendleft([now, bytearray(out[n:])])
                if rate:
                    self.credit += len(out) - n
        if not self.queue:
            return 0.05
        wait = self.queue[0][0] - now
        if rate and wait <= 0:
            wait = max(0.0, (1 - self.credit) / rate)
        return max(wait, 0.0005)


class Relay:
    """Two pseudo-terminals joined by a faulty line. ``a_path`` for the agent, ``b_path`` for the
    host; ``to_host`` / ``to_agent`` hold the faults of each direction (mutable while running)."""

    def __init__(self, to_agent: Faults | None = None, to_host: Faults | None = None,
                 seed: int = 0) -> None:
        rng = random.Random(seed)
        self.a_master, self.a_slave = os.openpty()
        self.b_master, self.b_slave = os.openpty()
        for fd in (self.a_slave, self.b_slave):
            tty.setraw(fd)
        for fd in (self.a_master, self.b_master):
            os.set_blocking(fd, False)
        self.a_path = os.ttyname(self.a_slave)
        self.b_path = os.ttyname(self.b_slave)
        self.down = _Direction(self.b_master, self.a_master, to_agent or Faults(),
                               random.Random(rng.random()))
        self.up = _Direction(self.a_master, self.b_master, to_host or Faults(),
                             random.Random(rng.random()))
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def run(self) -> None:
        fds = {self.b_master: self.down, self.a_master: self.up}
        wait = 0.01
        while not self._stop.is_set():
            try:
                r, _, _ = select.select(list(fds), [], [], wait)
            except (OSError, ValueError):
                return
            now = time.monotonic()
            for fd in r:
                try:
                    data = os.read(fd, 65536)
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:
                    data = b""
                if data:
                    fds[fd].push(data, now)
            wait = min(self.down.pump(now), self.up.pump(now))

    def start(self) -> Relay:
        self._thread = threading.Thread(target=self.run, name="relay", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
        for fd in (self.a_master, self.b_master, self.a_slave, self.b_slave):
            try:
                os.close(fd)
            except OSError:
                pass

    def __enter__(self) -> Relay:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baud", type=int, default=None)
    ap.add_argument("--latency", type=float, default=0.0)
    ap.add_argument("--flip", type=float, default=0.0)
    ap.add_argument("--drop", type=float, default=0.0)
    ap.add_argument("--dup", type=float, default=0.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--stats-file", default=None, help="write byte counters here on SIGTERM")
    a = ap.parse_args(argv)
    f = dict(flip=a.flip, drop=a.drop, dup=a.dup, latency=a.latency, baud=a.baud)
    relay = Relay(Faults(**f), Faults(**f), seed=a.seed)
    print(relay.a_path, relay.b_path, flush=True)
    import json
    import signal

    def stop(*_: object) -> None:
        relay._stop.set()

    signal.signal(signal.SIGTERM, stop)
    relay.run()
    if a.stats_file:
        with open(a.stats_file, "w") as fh:
            json.dump({"to_agent_in": relay.down.bytes_in, "to_agent_out": relay.down.bytes_out,
                       "to_host_in": relay.up.bytes_in, "to_host_out": relay.up.bytes_out}, fh)
    return 0


if __name__ == "__main__":
    sys.exit(main())


# --- helpers shared by the link tests and the benchmark -----------------------------------
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def spawn_agent(args: list[str], state_dir: str, timeout: float = 30.0):
    """Start ``python -m embedded.agent ARGS --state-dir STATE_DIR`` in its own process.

    Returns ``(process, first stdout line)``; stderr goes to ``STATE_DIR/agent.log``.
    """
    import subprocess

    os.makedirs(state_dir, exist_ok=True)
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    log = open(os.path.join(state_dir, "agent.log"), "ab")  # noqa: SIM115 - owned by the child
    proc = subprocess.Popen([sys.executable, "-m", "embedded.agent", *args,
                             "--state-dir", state_dir], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=log)
    log.close()
    r, _, _ = select.select([proc.stdout], [], [], timeout)
    line = proc.stdout.readline().decode() if r else ""
    if not line:
        proc.kill()
        with open(os.path.join(state_dir, "agent.log")) as f:
            raise RuntimeError(f"agent did not start: {f.read()[-2000:]}")
    return proc, line.strip()


def stop_agent(proc) -> None:
    """Terminate an agent started by :func:`spawn_agent` (by its own pid)."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except Exception:  # noqa: BLE001
            proc.kill()
            proc.wait(timeout=5)
    if proc.stdout:
        proc.stdout.close()
