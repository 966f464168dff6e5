"""The board agent: ``python -m embedded.agent --port /dev/ttyGS0`` (or ``--listen HOST:PORT``).

Speaks the protocol of :mod:`embedded.protocol` (docs/protocol.md). Needs only the base install
(no torch). Without pairing (HELLO + AUTH with the shared token) it executes only HELLO and INFO.
It never crashes on input: every frame or payload problem becomes an ERROR frame, every handler
exception an ``INTERNAL`` error, and no declared size is allocated before it is checked against
the frame and transfer limits.

Long commands (TRAIN, BENCH, ...) run in one worker thread so the main loop keeps answering PING
and ABORT; their handlers receive an abort :class:`threading.Event` to poll.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import hmac
import ipaddress
import os
import queue
import socket
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .protocol.framing import FLAG_REPLY, MAX_PAYLOAD, SUPPORTED_VERSIONS, FrameError
from .protocol.messages import ERR, MSG, PayloadError, decode_message, encode_payload, error_payload
from .protocol.transport import Link, LinkError, Message, SocketStream, pair_mac

AGENT_VERSION = "sparsefl-agent/0.1"
DEFAULT_BAUD = 921600
REPLY_CACHE_BYTES = 32 << 20


class AgentError(Exception):
    """A handler's refusal: becomes an ERROR frame with ``code``."""

    def __init__(self, code: ERR, message: str) -> None:
        super().__init__(message)
        self.code = code


class Aborted(AgentError):
    def __init__(self, message: str = "aborted by ABORT") -> None:
        super().__init__(ERR.ABORTED, message)


@dataclass
class Command:
    """One dispatch-table entry."""

    handler: Callable[..., dict]
    needs_pairing: bool = True
    long: bool = False        # runs in the worker thread; handler(fields, abort_event)


def default_state_dir() -> str:
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local",
                                                            "state")
    return os.path.join(base, "sparsefl-agent")


def _write_private(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def load_or_create(path: str, make: Callable[[], str]) -> tuple[str, bool]:
    """Read a small private file, creating it (mode 0600) on first start."""
    try:
        with open(path) as f:
            v = f.read().strip()
        if v:
            return v, False
    except FileNotFoundError:
        pass
    v = make()
    try:
        _write_private(path, v + "\n")
    except FileExistsError:  # raced with another start: use what is there
        with open(path) as f:
            return f.read().strip(), False
    return v, True


def read_token(path: str) -> bytes:
    """The pairing token from a file (hex or any text; surrounding whitespace ignored)."""
    try:
        with open(path, "rb") as f:
            tok = f.read().strip()
    except OSError as e:
        raise SystemExit(f"agent: cannot read --token-file {path}: {e}") from e
    if len(tok) < 16:
        raise SystemExit(f"agent: token in {path} is too short ({len(tok)} bytes, need >= 16)")
    return tok


class Agent:
    """Protocol state machine of one board (one host connection at a time)."""

    def __init__(self, token: bytes, state_dir: str, *, data_root: str | None = None,
                 sensor: Any = None, max_payload: int = MAX_PAYLOAD,
                 max_transfer: int | None = None, chunk_size: int = 4096, window: int = 8,
                 log: Callable[[str], None] | None = None, emulated: bool = False,
                 slowdown_profile: str | None = None) -> None:
        from .sensors import EnergyMeter, NullSensor
        self.token = token
        self.state_dir = state_dir
        self.data_root = os.path.realpath(data_root) if data_root else None
        self.sensor = sensor or NullSensor()
        #: background power sampling for BENCH/TRAIN windows (``meter.begin()``/``end()``,
        #: ``measure_idle()`` before a run); started by ``main`` when a sensor is present
        self.meter = EnergyMeter(self.sensor)
        self.max_payload = max_payload
        self.chunk_size = chunk_size
        self.window = window
        mem = _available_ram()
        self.max_transfer = max_transfer or int(min(256 << 20, (mem or 1 << 30) // 4))
        self.log = log or (lambda s: print(f"agent: {s}", file=sys.stderr, flush=True))
        self.board_uuid, _ = load_or_create(os.path.join(state_dir, "board_uuid"),
                                            lambda: str(uuid.uuid4()))
        self.link: Link | None = None
        self.paired = False
        self.version = max(SUPPORTED_VERSIONS)
        self.nonce: bytes | None = None
        self.blobs: dict[str, bytes] = {}
        self.replies: collections.OrderedDict[tuple[int, int], tuple[int, bytes]] = \
            collections.OrderedDict()
        self.job: tuple[int, int, threading.Thread, threading.Event] | None = None
        self.finished: queue.Queue = queue.Queue()
        self.counters = collections.Counter()
        self._err_tokens = 50.0
        self._err_time = time.monotonic()
        #: True once --warmup compiled every kernel (INFO ``kernels_compiled``)
        self.kernels_compiled: bool | None = None
        #: an emulated board (``sparsefl board emulate``): times are ``measured-emulated``
        self.emulated = emulated
        self.commands: dict[int, Command] = {
            MSG.HELLO: Command(self.cmd_hello, needs_pairing=False),
            MSG.AUTH: Command(self.cmd_auth, needs_pairing=False),
            MSG.INFO: Command(self.cmd_info, needs_pairing=False),
            MSG.PING: Command(self.cmd_ping),
            MSG.ECHO: Command(self.cmd_echo, long=True),
            MSG.LOAD: Command(self.cmd_load),
            MSG.ABORT: Command(self.cmd_abort),
            MSG.RESET: Command(self.cmd_reset),
        }
        from .agent_commands import install  # TRAIN, EVAL, BENCH, LOAD_MODEL, LOAD_DATA, ...
        self.board = install(self, emulated=emulated, slowdown_profile=slowdown_profile)

    # --- connection ------------------------------------------------------------------------
    def attach(self, stream: Any) -> Link:
        """Start a session on a new stream (pairing is per connection)."""
        link = Link(stream, max_payload=self.max_payload, max_transfer=self.max_transfer,
                    chunk_size=self.chunk_size, window=self.window, timeout=2.0, retries=8)
        link.accept_transfer = self._accept_transfer
        link.on_bad_frame = self._on_bad_frame
        self.link = link
        self.paired = False
        self.nonce = None
        self.replies.clear()
        return link

    def _accept_transfer(self, inner_type: int, total: int) -> str | None:
        cmd = self.commands.get(inner_type)
        if cmd is None:
            return f"unknown message type {inner_type:#04x}"
        if cmd.needs_pairing and not self.paired:
            return "not paired: HELLO + AUTH first"
        avail = _available_ram()
        if avail is not None and total * 3 > avail:
            return f"{total} bytes does not fit the board's free RAM ({avail} bytes)"
        return None

    def _on_bad_frame(self, err: FrameError) -> None:
        self.counters["bad_frames"] += 1
        now = time.monotonic()  # token bucket: at most ~100 garbage errors/s, burst 50
        self._err_tokens = min(50.0, self._err_tokens + (now - self._err_time) * 100)
        self._err_time = now
        if self._err_tokens >= 1:
            self._err_tokens -= 1
            self._send(MSG.ERROR, 0, error_payload(ERR.BAD_FRAME, str(err)))

    def _send(self, msg_type: int, seq: int, payload: bytes) -> bool:
        try:
            self.link.send_message(msg_type, seq, payload, FLAG_REPLY)
            return True
        except LinkError as e:
            self.counters["send_failures"] += 1
            self.log(f"could not send {msg_type:#04x} seq {seq}: {e}")
            return False

    def _reply(self, m: Message, msg_type: int, payload: bytes) -> None:
        # cache for retransmitted requests: the last 8 replies, at most REPLY_CACHE_BYTES
        # (the newest is always kept, so a retransmitted TRAIN never trains twice)
        self.replies[(m.seq, m.type)] = (msg_type, payload)
        while len(self.replies) > 8 or (len(self.replies) > 1 and sum(
                len(p) for _, p in self.replies.values()) > REPLY_CACHE_BYTES):
            self.replies.popitem(last=False)
        self._send(msg_type, m.seq, payload)

    def _error(self, m: Message, code: ERR, text: str) -> None:
        self.counters[f"error_{code.name}"] += 1
        self._reply(m, MSG.ERROR, error_payload(code, text, m.type))

    # --- main loop -------------------------------------------------------------------------
    def step(self, wait: float = 0.05) -> None:
        """Poll the link once and handle what arrived and what finished."""
        self.link.poll(wait)
        while True:
            try:
                m, msg_type, payload = self.finished.get_nowait()
            except queue.Empty:
                break
            self.job = None
            self._reply(m, msg_type, payload)
        while self.link.inbox:
            self.dispatch(self.link.inbox.popleft())

    def dispatch(self, m: Message) -> None:
        """Handle one incoming message; never raises."""
        if m.is_reply:
            return  # the agent sends no requests; a stray reply is ignored
        cached = self.replies.get((m.seq, m.type))
        if cached is not None:
            self.counters["replayed"] += 1
            self._send(cached[0], m.seq, cached[1])   # retransmitted request: same answer
            return
        if m.duplicate or (self.job and (self.job[0], self.job[1]) == (m.seq, m.type)):
            return  # a duplicate of something still running
        self.counters["requests"] += 1
        cmd = self.commands.get(m.type)
        if cmd is None:
            return self._error(m, ERR.UNKNOWN_TYPE, f"unknown message type {m.type:#04x}")
        if m.type != MSG.HELLO and m.version != self.version:
            return self._error(m, ERR.BAD_VERSION, f"frame version {m.version}, session speaks "
                               f"{self.version}")
        if cmd.needs_pairing and not self.paired:
            return self._error(m, ERR.UNAUTHORIZED, f"{MSG(m.type).name} needs pairing "
                               "(HELLO + AUTH with the board's token) first")
        try:
            fields = decode_message(m.type, False, m.payload)
        except PayloadError as e:
            return self._error(m, ERR.MALFORMED, str(e))
        if cmd.long:
            if self.job is not None:
                return self._error(m, ERR.BUSY, f"{MSG(self.job[1]).name} (seq {self.job[0]}) "
                                   "is running; ABORT it or wait")
            ev = threading.Event()
            th = threading.Thread(target=self._run_job, args=(m, cmd, fields, ev), daemon=True,
                                  name=f"job-{MSG(m.type).name}")
            self.job = (m.seq, m.type, th, ev)
            th.start()
            return
        msg_type, payload = self._call(m, cmd, fields)
        self._reply(m, msg_type, payload)

    def _call(self, m: Message, cmd: Command, fields: dict,
              abort: threading.Event | None = None) -> tuple[int, bytes]:
        try:
            out = cmd.handler(fields, abort) if cmd.long else cmd.handler(fields)
            return m.type, encode_payload(out)
        except AgentError as e:
            self.counters[f"error_{e.code.name}"] += 1
            return MSG.ERROR, error_payload(e.code, str(e), m.type)
        except Exception as e:  # noqa: BLE001 - the agent must survive any handler bug
            self.counters["error_INTERNAL"] += 1
            self.log("handler failed:\n" + traceback.format_exc())
            return MSG.ERROR, error_payload(ERR.INTERNAL, f"{type(e).__name__}: {e}", m.type)

    def _run_job(self, m: Message, cmd: Command, fields: dict, ev: threading.Event) -> None:
        self.finished.put((m, *self._call(m, cmd, fields, ev)))

    # --- commands --------------------------------------------------------------------------
    def cmd_hello(self, f: dict) -> dict:
        lo, hi = f["min_version"], f["max_version"]
        common = [v for v in SUPPORTED_VERSIONS if lo <= v <= hi]
        if not common:
            raise AgentError(ERR.BAD_VERSION, f"no common protocol version: host speaks "
                             f"{lo}..{hi}, agent {list(SUPPORTED_VERSIONS)}")
        self.version = max(common)
        self.paired = False            # a new HELLO starts a new session
        self.nonce = os.urandom(32)
        self.link.reset_session()
        self.replies.clear()
        return {"version": self.version, "nonce": self.nonce, "board_uuid": self.board_uuid,
                "agent": AGENT_VERSION, "paired": False, "max_payload": self.max_payload,
                "max_transfer": self.max_transfer}

    def cmd_auth(self, f: dict) -> dict:
        nonce, self.nonce = self.nonce, None      # single use, success or not
        if nonce is None:
            raise AgentError(ERR.AUTH_FAILED, "AUTH without a preceding HELLO")
        host_nonce = f["nonce"]
        if not 16 <= len(host_nonce) <= 64:
            raise AgentError(ERR.MALFORMED, f"AUTH: nonce must be 16..64 bytes, got "
                             f"{len(host_nonce)}")
        want = pair_mac(self.token, b"host", nonce, host_nonce)
        if not hmac.compare_digest(f["mac"], want):
            self.counters["auth_failures"] += 1  # the nonce is spent: guessing needs a HELLO each
            raise AgentError(ERR.AUTH_FAILED, "wrong pairing token (HMAC mismatch)")
        self.paired = True
        return {"mac": pair_mac(self.token, b"agent", host_nonce, nonce)}

    def cmd_info(self, f: dict) -> dict:
        from .sensors.system import system_info
        info = system_info()
        try:
            sensor = self.sensor.describe()
        except Exception as e:  # noqa: BLE001
            sensor = {"kind": getattr(self.sensor, "kind", "?"), "error": str(e)}
        info.update({
            "board_uuid": self.board_uuid, "agent": AGENT_VERSION,
            "protocol_versions": list(SUPPORTED_VERSIONS), "paired": self.paired,
            "sensors": [sensor] if sensor.get("kind") != "none" else [],
            "max_payload": self.max_payload, "max_transfer": self.max_transfer,
            "data_root": self.data_root is not None,
            "kernels_compiled": self.kernels_compiled,   # True after --warmup
            "emulated": self.emulated,
            "counters": dict(self.counters),
            "link": self.link.stats.to_dict() if self.link else {},
        })
        return _plain(info)

    def cmd_ping(self, f: dict) -> dict:
        return {"t": f.get("t", 0.0), "agent_time": time.time()}

    def cmd_echo(self, f: dict, abort: threading.Event) -> dict:
        delay = f.get("delay_s", 0)
        if not isinstance(delay, (int, float)) or not 0 <= delay <= 60:
            raise AgentError(ERR.MALFORMED, f"ECHO: delay_s must be a number in 0..60, got "
                             f"{delay!r}")
        if abort.wait(delay):  # stands in for compute between download and upload
            raise Aborted()
        return {"data": f["data"]}

    def cmd_load(self, f: dict) -> dict:
        name, data = f["name"], f["data"]
        if not 1 <= len(name) <= 128:
            raise AgentError(ERR.MALFORMED, "LOAD: name must be 1..128 characters")
        resident = sum(len(v) for k, v in self.blobs.items() if k != name)
        if resident + len(data) > self.max_transfer:
            raise AgentError(ERR.TOO_LARGE, f"LOAD: {len(data)} more bytes exceed the resident "
                             f"limit of {self.max_transfer} (RESET clears)")
        self.blobs[name] = data
        return {"name": name, "size": len(data), "sha256": hashlib.sha256(data).digest()}

    def cmd_abort(self, f: dict) -> dict:
        if self.job is None:
            return {"aborted": False}
        seq, typ, _, ev = self.job
        ev.set()
        return {"aborted": True, "seq": seq, "type": MSG(typ).name}

    def cmd_reset(self, f: dict) -> dict:
        aborted = self.cmd_abort({})["aborted"]
        if self.job is not None:
            self.job[2].join(timeout=2.0)
        n = len(self.blobs) + self.board.clear()
        self.blobs.clear()
        self.link.reset_session()
        return {"reset": True, "aborted": aborted, "cleared_blobs": n}


def safe_data_path(root: str | None, name: str) -> str:
    """Resolve ``name`` under the data root the user gave the agent, or raise AgentError.

    Refused: no data root, absolute paths, any ``..`` component, NUL bytes, and anything whose
    real path (symlinks resolved) leaves the root. For LOAD_DATA's "file on the board" form.
    """
    if root is None:
        raise AgentError(ERR.REFUSED, "no --data-root was given to the agent")
    if not name or "\x00" in name or os.path.isabs(name) or name.startswith("~"):
        raise AgentError(ERR.REFUSED, f"data path {name!r} must be relative to the data root")
    parts = name.replace("\\", "/").split("/")
    if ".." in parts:
        raise AgentError(ERR.REFUSED, f"data path {name!r} contains '..'")
    real_root = os.path.realpath(root)
    full = os.path.realpath(os.path.join(real_root, name))
    if os.path.commonpath([full, real_root]) != real_root:
        raise AgentError(ERR.REFUSED, f"data path {name!r} leaves the data root")
    return full


def _plain(v: Any) -> Any:
    """Drop None values from dicts (the payload encoding has None, but keep INFO compact)."""
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v


def _available_ram() -> int | None:
    from .sensors.system import memory
    return memory()["available_bytes"]


# --- serving ------------------------------------------------------------------------------
def serve_stream(agent: Agent, stream: Any, stop: threading.Event) -> None:
    """Run the agent on one stream until it fails or ``stop`` is set."""
    agent.attach(stream)
    while not stop.is_set():
        try:
            agent.step(0.05)
        except LinkError as e:
            agent.log(f"link closed: {e}")
            return


def parse_listen(s: str) -> tuple[str, int]:
    host, _, port = s.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    try:
        p = int(port)
    except ValueError:
        raise SystemExit(f"agent: --listen expects HOST:PORT or PORT, got {s!r}") from None
    if not 0 <= p <= 65535:
        raise SystemExit(f"agent: --listen port must be 0..65535, got {p}")
    return host, p


def main(argv: list[str] | None = None) -> int:
    from .sensors import KINDS, SensorError, detect

    ap = argparse.ArgumentParser(prog="python -m embedded.agent",
                                 description="sparsefl board agent (docs/protocol.md)")
    where = ap.add_mutually_exclusive_group(required=True)
    where.add_argument("--port", help="serial device, e.g. /dev/ttyGS0 or /dev/ttyUSB0")
    where.add_argument("--listen", help="listen on TCP HOST:PORT instead (default host "
                       "127.0.0.1; another address needs --allow-remote)")
    ap.add_argument("--baud", type=int, default=DEFAULT_BAUD)
    ap.add_argument("--allow-remote", action="store_true",
                    help="allow --listen on a non-loopback address")
    ap.add_argument("--sensor", choices=KINDS, default="auto")
    ap.add_argument("--sysfs-root", default="/", help=argparse.SUPPRESS)
    ap.add_argument("--i2c-bus", type=int, default=1, help="ina219/ina260: I2C bus number")
    ap.add_argument("--i2c-address", type=lambda v: int(v, 0), default=0x40,
                    help="ina219/ina260: device address (default 0x40)")
    ap.add_argument("--shunt-ohms", type=float, default=0.1, help="ina219: shunt resistor")
    ap.add_argument("--token-file", help="pairing token file (default: STATE_DIR/token, "
                    "generated on first start)")
    ap.add_argument("--state-dir", default=None, help="board UUID, token and Numba cache "
                    f"(default {default_state_dir()})")
    ap.add_argument("--data-root", default=None, help="the only directory LOAD_DATA may read")
    ap.add_argument("--max-transfer", type=int, default=None, help="largest accepted transfer "
                    "(bytes; default min(256 MiB, free RAM / 4))")
    ap.add_argument("--chunk-size", type=int, default=4096,
                    help="chunk size of replies sent as transfers (smaller on noisy lines)")
    ap.add_argument("--window", type=int, default=8, help="chunks in flight")
    ap.add_argument("--warmup", action="store_true", help="compile every trainer kernel before "
                    "serving (minutes on a Pi's A72; cached under STATE_DIR/numba-cache)")
    ap.add_argument("--warmup-models", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--emulated", action="store_true", help="this is an emulated board (host "
                    "process): times are reported as measured-emulated, never measured")
    ap.add_argument("--slowdown-profile", default=None, help="with --emulated: a TRAIN lasts at "
                    "least as long as hwmodel estimates on this device profile")
    args = ap.parse_args(argv)
    if args.slowdown_profile and not args.emulated:
        raise SystemExit("agent: --slowdown-profile is only for an --emulated board")

    state_dir = args.state_dir or default_state_dir()
    os.makedirs(state_dir, mode=0o700, exist_ok=True)
    os.environ.setdefault("NUMBA_CACHE_DIR", os.path.join(state_dir, "numba-cache"))
    if args.token_file:
        token = read_token(args.token_file)
    else:
        tok, created = load_or_create(os.path.join(state_dir, "token"),
                                      lambda: os.urandom(32).hex())
        token = tok.encode()
        if created:
            print(f"agent: new pairing token (also in {os.path.join(state_dir, 'token')}): "
                  f"{tok}", file=sys.stderr, flush=True)
    if args.data_root and not os.path.isdir(args.data_root):
        raise SystemExit(f"agent: --data-root {args.data_root} is not a directory")
    try:
        kw: dict[str, Any] = {}
        if args.sensor in ("ina219", "ina260"):
            kw = {"bus": args.i2c_bus, "address": args.i2c_address}
            if args.sensor == "ina219":
                kw["shunt_ohms"] = args.shunt_ohms
        sensor = detect(args.sensor, root=args.sysfs_root, **kw)
    except SensorError as e:
        raise SystemExit(f"agent: {e}") from e
    agent = Agent(token, state_dir, data_root=args.data_root, sensor=sensor,
                  max_transfer=args.max_transfer, chunk_size=args.chunk_size,
                  window=args.window, emulated=args.emulated,
                  slowdown_profile=args.slowdown_profile)
    if args.warmup:
        from .agent_commands import warmup
        agent.log("warm-up: compiling every kernel (NUMBA_CACHE_DIR="
                  f"{os.environ.get('NUMBA_CACHE_DIR')})")
        models = tuple(args.warmup_models.split(",")) if args.warmup_models else None
        took = warmup(agent.log, models) if models else warmup(agent.log)
        agent.log(f"warm-up done in {took:.1f} s")
        agent.kernels_compiled = True
    agent.meter.start()
    if agent.meter.available:   # idle baseline before any work: dynamic energy = total - idle
        idle = agent.meter.measure_idle(1.0)
        agent.log(f"idle power {idle if idle is None else round(idle, 3)} W")
    stop = threading.Event()
    if args.listen:
        host, port = parse_listen(args.listen)
        if not ipaddress.ip_address(host).is_loopback and not args.allow_remote:
            raise SystemExit(f"agent: refusing to listen on non-loopback {host} without "
                             "--allow-remote")
        srv = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind((host, port))
        srv.listen(1)
        print(f"listening {host}:{srv.getsockname()[1]} board {agent.board_uuid}", flush=True)
        while not stop.is_set():
            conn, peer = srv.accept()
            agent.log(f"connection from {peer[0]}:{peer[1]}")
            stream = SocketStream(conn)
            serve_stream(agent, stream, stop)
            stream.close()
        return 0
    import serial
    print(f"serving {args.port} board {agent.board_uuid}", flush=True)
    while not stop.is_set():
        try:
            ser = serial.Serial(args.port, args.baud, timeout=0.01, write_timeout=2.0)
        except (serial.SerialException, OSError) as e:
            agent.log(f"cannot open {args.port}: {e}; retrying")
            time.sleep(1.0)
            continue
        serve_stream(agent, ser, stop)
        try:
            ser.close()
        except Exception:  # noqa: BLE001
            pass
        time.sleep(0.2)
    return 0


if __name__ == "__main__":
    # run the importable module, not __main__: the command handlers (embedded.agent_commands)
    # raise embedded.agent's AgentError, which must be the class main()'s agent catches
    from embedded import agent as _agent_module
    sys.exit(_agent_module.main())
