"""A real board as a federation client: ``BoardClient(port).fit(task) -> ClientResult``.

The board runs ``python -m embedded.agent`` (docs/protocol.md, docs/boards.md); this side opens
its serial port (or a ``socket://HOST:PORT`` URL), pairs with it and sends each round's
``ClientTask`` as a TRAIN. What comes back carries the time **measured on the board**
(provenance ``measured``, or ``measured-emulated`` when the agent says it is an emulated board),
the energy from the board's sensor when it has one (``measured``) or else hwmodel's estimate
(``calibrated-estimate`` from this board's cached calibration, else ``estimated``), and the link
time apart from the compute time (``transfer_s``, ``upload_s``, ``download_s``).

Boards are known by their UUID. Everything this host keeps about a board lives under
``$SPARSEFL_HOME/boards/<uuid>/`` (default ``~/.cache/sparsefl``): ``token`` (the pairing
token, mode 0600), ``calibration.toml`` (the profile ``sparsefl board calibrate`` fitted),
``info.json`` (its last INFO). ``boards/ports.json`` remembers which UUID answered on which port,
so a different board behind the same port is noticed at HELLO (``board_changed``; the
resident model and uploaded shards are then forgotten).

:class:`EmulatedBoard` starts the real agent on one end of a pseudo-terminal pair (for tests,
demos and ``sparsefl board emulate``) and registers its token, so a ``BoardClient`` on the
other end pairs with no further step.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import os
import select
import subprocess
import sys
import tempfile
import threading
import time
import tty
import uuid as _uuid
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from embedded.protocol import MSG
from embedded.protocol.framing import SUPPORTED_VERSIONS
from embedded.protocol.messages import ERR, encode_payload
from embedded.protocol.transport import Link, LinkError, RemoteError, open_link, pair_mac
from hwmodel.provenance import Provenance
from hwmodel.provenance import tag as _tag

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class BoardError(RuntimeError):
    """A board cannot be used (no token, wrong token, unreachable): the message says why."""


# --- where the host keeps what it knows about boards -------------------------------------------
def sparsefl_home() -> Path:
    """``$SPARSEFL_HOME`` or ``~/.cache/sparsefl``."""
    env = os.environ.get("SPARSEFL_HOME")
    return Path(env) if env else Path.home() / ".cache" / "sparsefl"


def boards_dir() -> Path:
    return sparsefl_home() / "boards"


def board_dir(board_uuid: str) -> Path:
    """Per-board directory (the UUID is checked: it names a directory)."""
    try:
        u = str(_uuid.UUID(board_uuid))
    except (ValueError, TypeError, AttributeError):
        raise BoardError(f"board UUID {board_uuid!r} is not a UUID") from None
    return boards_dir() / u


def calibration_path(board_uuid: str) -> Path:
    return board_dir(board_uuid) / "calibration.toml"


def save_token(board_uuid: str, token: bytes) -> Path:
    """Store a board's pairing token (mode 0600) where BoardClient looks by default."""
    d = board_dir(board_uuid)
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    p = d / "token"
    fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(token.strip() + b"\n")
    return p


def load_token(board_uuid: str) -> bytes | None:
    try:
        tok = (board_dir(board_uuid) / "token").read_bytes().strip()
    except OSError:
        return None
    return tok or None


def _port_key(port: str) -> str:
    return port if "://" in port else os.path.realpath(port) if os.path.exists(port) else port


def _ports() -> dict[str, str]:
    try:
        d = json.loads((boards_dir() / "ports.json").read_text())
        return {str(k): str(v) for k, v in d.items()} if isinstance(d, dict) else {}
    except (OSError, ValueError):
        return {}


def remember_port(port: str, board_uuid: str) -> str | None:
    """Record which board answered on ``port``; returns the UUID seen there before (or None)."""
    ports = _ports()
    key = _port_key(port)
    before = ports.get(key)
    if before != board_uuid:
        from .runlog import atomic_write_text

        ports[key] = board_uuid
        atomic_write_text(boards_dir() / "ports.json", json.dumps(ports, indent=1, sort_keys=True))
    return before


def _read_token_file(path: str) -> bytes:
    try:
        tok = Path(path).read_bytes().strip()
    except OSError as e:
        raise BoardError(f"cannot read token file {path}: {e.strerror}") from None
    if len(tok) < 16:
        raise BoardError(f"token in {path} is too short ({len(tok)} bytes, need >= 16)")
    return tok


def _digest(state: dict[str, np.ndarray]) -> str:
    from embedded.agent_commands import state_digest
    return state_digest(state)


class BoardClient:
    """The federation's ``Client`` for a board behind a serial port or ``socket://`` URL.

    ``fit(task)`` sends ``task`` as a TRAIN and returns the board's ``ClientResult``; it never
    raises for a board failure (unplugged, killed, timed out): the result then has ``error`` set
    and the next ``fit`` reconnects. ``train_timeout`` bounds the wait for one round.
    Data: ``task.data_ref`` names a shard already on the board (LOAD_DATA'd or under its
    ``--data-root``); otherwise ``set_data(client_id, x, y)`` (or ``fit(task, x, y)``) gives the
    shard, uploaded once per session.
    """

    def __init__(self, port: str, *, client_id: str | None = None, device: str | None = None,
                 x: np.ndarray | None = None, y: np.ndarray | None = None,
                 baud: int = 921600, token: bytes | None = None,
                 token_file: str | None = None, timeout: float = 2.0, retries: int = 5,
                 train_timeout: float = 600.0, profile: Any = None,
                 chunk_size: int = 4096, log: Any = None) -> None:
        self.port = port
        #: the federation's names for this client and its device class (``Client`` protocol)
        self.client_id = str(client_id) if client_id is not None else f"board:{port}"
        self.device = device or (profile if isinstance(profile, str) else None) or "board"
        self.baud = baud
        self._token = _read_token_file(token_file) if token_file else token
        self.timeout = timeout
        self.retries = retries
        self.train_timeout = train_timeout
        self.chunk_size = chunk_size      # smaller on a noisy line (fewer bytes per resend)
        self.profile = profile            # energy estimate without a sensor (name or profile)
        self.log = log or (lambda s: print(f"board {port}: {s}", file=sys.stderr, flush=True))
        self.link: Link | None = None
        self.hello_reply: dict = {}
        self.info: dict = {}
        self.board_uuid: str | None = None
        self.board_changed = False
        self._data: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._uploaded: dict[str, str] = {}          # client id -> shard name on the board
        self._resident: tuple[str, dict[str, np.ndarray], str] | None = None
        #: host time.time() minus the board's, measured by PING at connect (for import-power)
        self.clock_offset_s = 0.0
        if x is not None and y is not None:
            self.set_data(self.client_id, x, y)

    # --- connection ---------------------------------------------------------------------
    @property
    def emulated(self) -> bool:
        return bool(self.info.get("emulated"))

    @property
    def concurrent(self) -> bool:
        """A real board trains while the host runs the simulated clients; an emulated one
        waits for them (it would share the host's cores and time their contention)."""
        return not self.emulated

    @property
    def num_samples(self) -> int:
        """The size of this client's shard (0 when the shard lives only on the board)."""
        d = self._data.get(self.client_id)
        return 0 if d is None else int(len(d[1]))

    def connect(self) -> dict:
        """Open the port, HELLO, find the token by the board's UUID, AUTH, INFO."""
        self.close()
        try:
            self.link = open_link(self.port, self.baud, timeout=self.timeout,
                                  retries=self.retries, chunk_size=self.chunk_size)
        except LinkError as e:
            raise BoardError(str(e)) from None
        link = self.link
        try:
            rep = link.request(MSG.HELLO, {"min_version": min(SUPPORTED_VERSIONS),
                                           "max_version": max(SUPPORTED_VERSIONS),
                                           "client": "sparsefl-boardclient"})
        except LinkError as e:
            self.close()
            raise BoardError(f"no agent answers on {self.port} ({e}); is "
                             "`python -m embedded.agent` running on the board?") from None
        if rep["version"] not in SUPPORTED_VERSIONS:
            raise BoardError(f"agent chose protocol version {rep['version']}")
        link.version = rep["version"]
        uid = rep["board_uuid"]
        token = self._token or load_token(uid)
        if token is None:
            self.close()
            raise BoardError(
                f"no pairing token for board {uid}: copy the token the agent printed on its first "
                f"start (STATE_DIR/token on the board) into {board_dir(uid) / 'token'}, or run "
                f"`sparsefl board pair {self.port} --token-file FILE`")
        host_nonce = os.urandom(32)
        try:
            a = link.request(MSG.AUTH, {"nonce": host_nonce,
                                        "mac": pair_mac(token, b"host", rep["nonce"], host_nonce)})
        except RemoteError as e:
            self.close()
            if e.code == ERR.AUTH_FAILED:
                raise BoardError(f"board {uid} rejected the pairing token (wrong token for this "
                                 "board)") from None
            raise BoardError(str(e)) from None
        if not hmac.compare_digest(a["mac"], pair_mac(token, b"agent", host_nonce, rep["nonce"])):
            self.close()
            raise BoardError(f"board {uid} failed to prove it knows the pairing token")
        link.peer = dict(rep, paired=True)
        before = remember_port(self.port, uid)
        changed = (self.board_uuid is not None and self.board_uuid != uid) or \
            (before is not None and before != uid)
        if changed:
            self.board_changed = True
            self.log(f"a different board answers on {self.port}: {uid} (was "
                     f"{self.board_uuid or before}); its calibration and state are its own")
            self._resident = None
        self._uploaded.clear()   # a new session: the agent may have restarted
        self.board_uuid = uid
        self.hello_reply = dict(rep, paired=True)
        self.info = link.request(MSG.INFO)
        self.clock_offset_s = self._clock_offset()
        try:
            board_dir(uid).mkdir(parents=True, exist_ok=True, mode=0o700)
            (board_dir(uid) / "info.json").write_text(json.dumps(self.info, indent=1,
                                                                 default=str))
        except OSError:
            pass
        return self.info

    def _clock_offset(self) -> float:
        """Host clock minus board clock (s): the PING with the shortest round trip of three."""
        best = (math.inf, 0.0)
        for _ in range(3):
            t0 = time.time()
            rep = self.link.request(MSG.PING, {"t": t0})
            t1 = time.time()
            best = min(best, (t1 - t0, (t0 + t1) / 2 - float(rep["agent_time"])))
        return best[1]

    def record_window(self, kind: str, ident: str, rep: dict) -> dict:
        """Append a BENCH/TRAIN window (board and host clock) to the board's ``windows.jsonl``,
        which ``sparsefl board import-power`` matches against an external meter's log."""
        w = {"kind": kind, "id": ident, "board_uuid": self.board_uuid,
             "t_start_board": float(rep["t_start"]), "t_end_board": float(rep["t_end"]),
             "clock_offset_s": self.clock_offset_s,
             "t_start": float(rep["t_start"]) + self.clock_offset_s,
             "t_end": float(rep["t_end"]) + self.clock_offset_s,
             "energy_j": (rep.get("energy") or {}).get("energy_j"),
             "energy_window_s": (rep.get("energy") or {}).get("duration_s"),
             "energy_provenance": (rep.get("energy") or {}).get("provenance", "estimated")}
        try:
            p = board_dir(self.board_uuid) / "windows.jsonl"
            p.parent.mkdir(parents=True, exist_ok=True)
            with open(p, "a") as f:
                f.write(json.dumps(w) + "\n")
        except OSError as e:
            self.log(f"cannot record the window: {e}")
        return w

    def _ensure(self) -> Link:
        if self.link is None:
            self.connect()
        assert self.link is not None
        return self.link

    def close(self) -> None:
        if self.link is not None:
            self.link.close()
            self.link = None

    def __enter__(self) -> BoardClient:
        self._ensure()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(self, msg_type: int, fields: dict | None = None, **kw: Any) -> dict:
        """One request on the paired link (connects first if needed)."""
        return self._ensure().request(msg_type, fields or {}, **kw)

    def _long(self, msg_type: int, fields: dict, wait_s: float) -> dict:
        """A long command (TRAIN, BENCH, ...): sent once, then re-asked every ``timeout`` s while
        nothing arrives (the agent ignores a duplicate of a running request and answers a
        finished one from its cache) until ``wait_s`` has passed without the reply.

        Sets ``link.last_timing``: ``upload_s`` = sending the request (the transfer down),
        ``wait_s`` = until the reply's first frame, ``download_s`` = receiving the reply."""
        from embedded.protocol.framing import FLAG_REPLY
        from embedded.protocol.messages import PayloadError, decode_message
        from embedded.protocol.transport import RequestTiming

        link = self._ensure()
        payload = encode_payload(fields)
        name = MSG(msg_type).name
        seq = link.next_seq()
        out0, in0 = link.stats.bytes_out, link.stats.bytes_in
        t0 = time.monotonic()
        link.send_message(msg_type, seq, payload, 0)
        t_up = time.monotonic()
        deadline = t_up + wait_s
        resend = t_up + self.timeout
        attempts = 1
        while True:
            while link.inbox:
                m = link.inbox.popleft()
                if m.seq != seq or not m.is_reply or m.duplicate:
                    continue
                end = time.monotonic()
                first = min(max(m.first_at, t_up), end)
                link.last_timing = RequestTiming(t_up - t0, first - t_up, end - first, end - t0,
                                                 attempts, link.stats.bytes_out - out0,
                                                 link.stats.bytes_in - in0)
                try:
                    rep = decode_message(m.type, True, m.payload)
                except PayloadError as e:
                    raise LinkError(f"link: malformed reply to {name}: {e}") from e
                if m.type == MSG.ERROR:
                    raise RemoteError(rep["code"], rep["name"], rep["message"])
                if m.type == msg_type:
                    return rep
            now = time.monotonic()
            t = link._in
            arriving = t is not None and t.key == (seq, FLAG_REPLY)
            if arriving:
                deadline = max(deadline, t.last + max(self.timeout, 10.0))
            if now >= deadline:
                raise LinkError(f"no reply to {name} within {wait_s:g} s (board dead or "
                                "unplugged?)")
            if now >= resend and not arriving:
                link.send_message(msg_type, seq, payload, 0)   # answered from the agent's cache
                attempts += 1
                resend = time.monotonic() + self.timeout
            link.poll(0.05)

    # --- board calibration cache --------------------------------------------------------
    def cached_calibration(self) -> Any:
        """This board's calibrated DeviceProfile (from ``sparsefl board calibrate``) or None."""
        if self.board_uuid is None:
            return None
        p = calibration_path(self.board_uuid)
        if not p.exists():
            return None
        from hwmodel.profiles import load_profile
        return load_profile(str(p))

    def save_calibration(self, profile: Any) -> Path:
        from hwmodel.profiles import save_profile
        self._ensure()
        p = calibration_path(self.board_uuid)
        p.parent.mkdir(parents=True, exist_ok=True)
        save_profile(profile, p)
        return p

    # --- commands -----------------------------------------------------------------------
    def ping(self) -> dict:
        return self.request(MSG.PING, {"t": time.time()})

    def abort(self) -> dict:
        return self.request(MSG.ABORT)

    def reset(self) -> dict:
        self._resident = None
        self._uploaded.clear()
        return self.request(MSG.RESET)

    def load_data(self, name: str, x: np.ndarray, y: np.ndarray) -> dict:
        from embedded import codec
        blob = codec.encode_state({"x": np.ascontiguousarray(x, np.float32),
                                   "y": np.ascontiguousarray(y, np.int64)})
        return self.request(MSG.LOAD_DATA, {"name": name, "data": blob},
                            timeout=max(self.timeout, 10.0))

    def load_data_file(self, name: str, path: str) -> dict:
        """Load a shard from a file under the agent's --data-root (``path`` relative to it)."""
        return self.request(MSG.LOAD_DATA, {"name": name, "path": path})

    def load_model(self, spec: Any, state: dict[str, np.ndarray],
                   masks: bytes | None = None) -> dict:
        from embedded import codec
        f: dict[str, Any] = {"spec": spec.to_json(), "state": codec.encode_state(state)}
        if masks is not None:
            f["masks"] = masks
        rep = self.request(MSG.LOAD_MODEL, f, timeout=max(self.timeout, 10.0))
        self._resident = (spec.to_json(), dict(state), rep["digest"])
        return rep

    def bench(self, model: str | Any, sparsities: list[float], *, batch: int = 16,
              repeats: int = 10, warmup: int = 2, threads: int = 1,
              wait_s: float = 600.0) -> dict:
        """BENCH: ``{"measurements": [Measurement], "t_start", "t_end", "energy", ...}``."""
        from hwmodel.measure import Measurement
        f: dict[str, Any] = {"sparsities": [float(s) for s in sparsities], "batch": batch,
                             "repeats": repeats, "warmup": warmup, "threads": threads}
        if isinstance(model, str):
            f["model"] = model
        else:
            f["spec"] = model.to_json()
        rep = self._long(MSG.BENCH, f, wait_s)
        self.record_window("BENCH", f"{rep['model']}@{','.join(f'{s:g}' for s in sparsities)}",
                           rep)
        rep["measurements"] = [Measurement.from_dict(m) for m in rep["measurements"]]
        return rep

    def evaluate_on_board(self, data: str, spec: Any = None, state: dict | None = None,
                          batch_size: int = 256, wait_s: float = 120.0) -> dict:
        """EVAL of ``spec``/``state`` (default: the resident model) on shard ``data``."""
        from embedded import codec
        f: dict[str, Any] = {"data": data, "batch_size": batch_size}
        if spec is not None:
            f["spec"] = spec.to_json()
            f["state"] = codec.encode_state(state or {})
        return self._long(MSG.EVAL, f, wait_s)

    def infer_bench(self, tflite: bytes, repeats: int = 50, threads: int = 1) -> dict:
        return self._long(MSG.INFER_BENCH, {"model": tflite, "repeats": repeats,
                                            "threads": threads}, 600.0)

    # --- the Client protocol ------------------------------------------------------------
    def set_data(self, client_id: str, x: np.ndarray, y: np.ndarray) -> None:
        """The shard ``fit`` trains on for ``client_id`` when a task has no ``data_ref``."""
        self._data[str(client_id)] = (np.ascontiguousarray(x, np.float32),
                                      np.ascontiguousarray(y, np.int64))
        self._uploaded.pop(str(client_id), None)

    def fit(self, task: Any, x: np.ndarray | None = None, y: np.ndarray | None = None) -> Any:
        """Run ``task`` on the board; a failure comes back as a result with ``error`` set."""
        from embedded.task import ClientResult

        t0 = time.monotonic()
        if x is not None and y is not None:
            self.set_data(task.client_id, x, y)
        try:
            try:
                return self._fit(task)
            except RemoteError as e:
                # the agent restarted behind an open port (pairing and shards gone): pair and
                # upload again, once
                if e.code not in (ERR.UNAUTHORIZED, ERR.REFUSED):
                    raise
                self.log(f"{e.name}: {e.remote_message}; reconnecting and retrying once")
                self.connect()
                return self._fit(task)
        except (LinkError, BoardError, OSError) as e:
            self.close()          # the next fit reconnects (the board may be back)
            wall = time.monotonic() - t0
            return ClientResult(task.round, task.client_id, b"", 0, None,
                                {"time_s": _tag(wall, "s", Provenance.MEASURED),
                                 "uplink_bytes": _tag(0, "B", Provenance.MEASURED),
                                 "downlink_bytes": _tag(0, "B", Provenance.MEASURED)},
                                error=f"board {self.board_uuid or self.port} failed: "
                                f"{type(e).__name__}: {e}")

    def _shard_on_board(self, cid: str) -> str:
        """The board's name of client ``cid``'s shard, uploading it once per session."""
        if cid not in self._data:
            if len(self._data) == 1:
                cid = next(iter(self._data))      # the board's one shard
            else:
                raise BoardError(f"client {cid!r}: task has no data_ref and no shard was given "
                                 "(BoardClient(x=, y=), set_data or fit(task, x, y))")
        if cid not in self._uploaded:
            x, y = self._data[cid]
            h = hashlib.sha256(x.tobytes() + y.tobytes()).hexdigest()[:16]
            name = f"{cid[:100]}-{h}"
            self.load_data(name, x, y)
            self._uploaded[cid] = name
        return self._uploaded[cid]

    def evaluate(self, state: dict[str, np.ndarray], spec: Any) -> dict[str, float]:
        """Loss and accuracy of ``state`` on this client's shard, computed on the board
        (NaN with ``error`` when the board fails)."""
        try:
            self._ensure()
            name = self._shard_on_board(self.client_id)
            rep = self.evaluate_on_board(name, spec, state)
            return {"loss": rep["loss"], "accuracy": rep["accuracy"], "n": rep["n"]}
        except (LinkError, BoardError, OSError) as e:
            self.close()
            return {"loss": float("nan"), "accuracy": float("nan"), "n": 0,
                    "error": f"{type(e).__name__}: {e}"}

    def _fit(self, task: Any) -> Any:
        from embedded import codec
        from embedded.task import ClientResult

        self._ensure()
        if task.data_ref is None:
            task = replace(task, data_ref=self._shard_on_board(str(task.client_id)))
        full = codec.decode_state(task.global_state)
        spec_json = task.spec.to_json()
        task_id = hashlib.sha256(task.to_bytes()).hexdigest()[:32]
        send = task
        fields: dict[str, Any] = {"task_id": task_id}
        res = self._resident
        if res is not None and res[0] == spec_json and set(res[1]) <= set(full):
            changed = {k: v for k, v in full.items()
                       if k not in res[1] or v.dtype != res[1][k].dtype
                       or v.shape != res[1][k].shape or not np.array_equal(v, res[1][k])}
            if len(changed) < len(full):
                send = replace(task, global_state=codec.encode_state(changed))
                fields["base"] = res[2]
        try:
            rep = self._train(send, fields)
        except RemoteError as e:
            if e.code != ERR.REFUSED or "base" not in fields:
                raise
            fields.pop("base")      # the board lost its resident model: send everything
            send = task
            rep = self._train(send, fields)
        timing = self.link.last_timing
        result = ClientResult.from_bytes(rep["result"])
        if not rep.get("cached"):
            self.record_window("TRAIN", f"{task.round}:{task.client_id}:{task_id}", rep)
        self._resident = (spec_json, full, rep.get("resident") or _digest(full))
        if not result.ok:
            return result
        c = result.costs
        if timing is not None:
            c["upload_s"] = _tag(timing.upload_s, "s", Provenance.MEASURED)
            c["download_s"] = _tag(timing.download_s, "s", Provenance.MEASURED)
            c["transfer_s"] = _tag(timing.upload_s + timing.download_s, "s",
                                   Provenance.MEASURED)
            c["link_bytes_down"] = _tag(timing.bytes_sent, "B", Provenance.MEASURED)
            c["link_bytes_up"] = _tag(timing.bytes_received, "B", Provenance.MEASURED)
        c["compute_s"] = _tag(rep["compute_s"], "s", c["time_s"]["provenance"])
        if "energy_j" not in c:
            est = self._estimate_energy(task, result)
            if est is not None:
                c["energy_j"] = est
        return result

    def _train(self, task: Any, fields: dict) -> dict:
        return self._long(MSG.TRAIN, dict(fields, task=task.to_bytes()), self.train_timeout)

    def _estimate_energy(self, task: Any, result: Any) -> dict | None:
        """Energy of the round from hwmodel: this board's calibration if cached, else the
        profile given to the client (``estimated``)."""
        import hwmodel
        from hwmodel.estimator import provenance_of

        # a profile object given by the run (its calibration) wins over the host's cache
        prof = self.profile if (self.profile is not None and not isinstance(self.profile, str)) \
            else (self.cached_calibration() or self.profile)
        st = result.stats
        if prof is None or st is None or not st.steps:
            return None
        batch = max(1, round(st.samples / st.steps))
        try:
            p = hwmodel.load_profile(prof) if isinstance(prof, str) else prof
            est = hwmodel.estimate(task.spec, p, plan=task.plan, batch=batch,
                                   samples=int(st.samples), epochs=1, radio=None)
        except (ValueError, KeyError) as e:
            self.log(f"no energy estimate: {e}")
            return None
        return _tag(est.totals.energy_j, "J", provenance_of(p))


def guess_profile(info: dict) -> str:
    """The shipped profile closest to a board's INFO (a starting point for calibration)."""
    model = (info.get("board_model") or "").lower()
    for key, name in (("raspberry pi 5", "rpi5"), ("raspberry pi 4", "rpi4"),
                      ("orin", "jetson-orin-nano"), ("jetson nano", "jetson-nano-10w"),
                      ("jetson-nano", "jetson-nano-10w")):
        if key in model:
            return name
    return "generic-x86"


def calibrate_board(bc: BoardClient, models: list[str], sparsities: list[float], *,
                    base: str | None = None, name: str | None = None, batch: int = 16,
                    repeats: int = 10, threads: int = 1, log: Any = None) -> tuple[Any, list]:
    """BENCH ``models`` x ``sparsities`` on the board and fit a profile to them.

    Returns ``(profile, measurements)``; the profile's fitted values say ``measured`` (their
    sources: ``measured: calibrated from N measurements``) and it is cached for the board
    (``BoardClient.cached_calibration``); the measurements are kept beside it as
    ``calibration-measurements.csv``. ``base`` defaults to a guess from the board's INFO.
    """
    import dataclasses

    from hwmodel.calibration import calibrate
    from hwmodel.profiles import load_profile

    bc._ensure()
    ms: list = []
    for m in models:
        if log:
            log(f"BENCH {m} at sparsities {list(sparsities)} ...")
        ms.extend(bc.bench(m, list(sparsities), batch=batch, repeats=repeats,
                           threads=threads)["measurements"])
    from hwmodel.measure import to_csv
    # keep the raw BENCH data whatever the fit does (it is what a refit starts from)
    raw = board_dir(bc.board_uuid) / "calibration-measurements.csv"
    raw.parent.mkdir(parents=True, exist_ok=True)
    raw.write_text(to_csv(ms))
    base_p = load_profile(base or guess_profile(bc.info))
    fitted = calibrate(base_p, ms)
    emu = " (emulated board: host timings)" if bc.emulated else ""
    fitted = dataclasses.replace(
        fitted, name=name or f"{base_p.name}-board-{bc.board_uuid[:8]}",
        description=f"{base_p.description} — calibrated on board {bc.board_uuid}{emu} from "
                    f"{len(ms)} BENCH measurements of {', '.join(models)}")
    bc.save_calibration(fitted)
    return fitted, ms


# --- an emulated board: the real agent on a pseudo-terminal ----------------------------------
class _PtyBridge:
    """Two pseudo-terminals joined back to back: the agent opens ``agent_path``, the host
    ``host_path``; a thread copies bytes between the two masters."""

    def __init__(self) -> None:
        self.a_master, self.a_slave = os.openpty()
        self.b_master, self.b_slave = os.openpty()
        for fd in (self.a_slave, self.b_slave):
            tty.setraw(fd)
        for fd in (self.a_master, self.b_master):
            os.set_blocking(fd, False)
        self.agent_path = os.ttyname(self.a_slave)
        self.host_path = os.ttyname(self.b_slave)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pty-bridge", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        peer = {self.a_master: self.b_master, self.b_master: self.a_master}
        pending = {self.a_master: b"", self.b_master: b""}   # bytes waiting for peer[fd]
        while not self._stop.is_set():
            wfds = [peer[fd] for fd, buf in pending.items() if buf]
            try:
                r, w, _ = select.select(list(peer), wfds, [], 0.05)
            except (OSError, ValueError):
                return
            for fd in r:
                if len(pending[fd]) > (1 << 20):
                    continue   # back-pressure: the other side is not reading
                try:
                    data = os.read(fd, 65536)
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:
                    data = b""
                pending[fd] += data
            for src, buf in pending.items():
                if buf and peer[src] in w:
                    try:
                        n = os.write(peer[src], buf)
                    except (BlockingIOError, InterruptedError):
                        continue
                    except OSError:
                        n = len(buf)   # nobody on the other end: drop, as a cable would
                    pending[src] = buf[n:]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        for fd in (self.a_master, self.b_master, self.a_slave, self.b_slave):
            try:
                os.close(fd)
            except OSError:
                pass


def _die_with_parent() -> None:
    """In the agent's child process (Linux): SIGTERM when the process that started it dies, so
    a killed ``sparsefl board emulate`` / ``sparsefl run`` leaves no orphaned agent."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, 15)   # PR_SET_PDEATHSIG, SIGTERM
    except (OSError, AttributeError):
        pass


class EmulatedBoard:
    """The real agent in its own process, on a pty pair, paired with this host.

    ``path`` is the host end (give it to :class:`BoardClient` or ``sparsefl board ...``);
    ``board_uuid`` its UUID; ``proc`` the agent process. The token is written to
    ``$SPARSEFL_HOME/boards/<uuid>/token`` (removed by :meth:`close`). ``profile`` (a device
    profile name) makes TRAIN last as long as hwmodel estimates on that device: the times stay
    ``measured-emulated``. Numba's cache is ``$SPARSEFL_HOME/numba-cache`` unless
    ``NUMBA_CACHE_DIR`` is set, so kernels compile once per host.
    """

    def __init__(self, profile: str | None = None, state_dir: str | None = None,
                 agent_args: list[str] | None = None, start_timeout: float = 60.0,
                 env: dict[str, str] | None = None) -> None:
        self._tmp = None if state_dir else tempfile.TemporaryDirectory(prefix="sparsefl-emu-")
        self.state_dir = state_dir or self._tmp.name
        os.makedirs(self.state_dir, exist_ok=True)
        token = os.urandom(32).hex().encode()
        tok_path = os.path.join(self.state_dir, "token")
        fd = os.open(tok_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(token + b"\n")
        self.bridge = _PtyBridge()
        self.path = self.bridge.host_path
        self._args = ["--port", self.bridge.agent_path, "--token-file", tok_path, "--sensor",
                      "none", "--state-dir", self.state_dir, "--emulated"]
        if profile:
            self._args += ["--slowdown-profile", profile]
        self._args += list(agent_args or [])
        self._env = dict(os.environ, **(env or {}))
        self._env["PYTHONPATH"] = REPO + os.pathsep + self._env.get("PYTHONPATH", "")
        self._env.setdefault("NUMBA_CACHE_DIR", str(sparsefl_home() / "numba-cache"))
        self._start_timeout = start_timeout
        self._log = open(os.path.join(self.state_dir, "agent.log"), "ab")  # noqa: SIM115
        self.proc = None
        self._spawn()
        save_token(self.board_uuid, token)
        remember_port(self.path, self.board_uuid)

    def _spawn(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "embedded.agent", *self._args],
                                     cwd=REPO, env=self._env, stdout=subprocess.PIPE,
                                     stderr=self._log, stdin=subprocess.DEVNULL,
                                     preexec_fn=_die_with_parent)
        r, _, _ = select.select([self.proc.stdout], [], [], self._start_timeout)
        line = self.proc.stdout.readline().decode() if r else ""
        if not line.startswith("serving "):
            self.close()
            with open(os.path.join(self.state_dir, "agent.log"), errors="replace") as f:
                raise BoardError(f"emulated agent did not start: {line!r} {f.read()[-2000:]}")
        self.board_uuid = line.split()[-1]

    def kill(self) -> None:
        """Kill the agent (SIGKILL) as if the board were unplugged; the pty stays."""
        p = self.proc
        if p is not None and p.poll() is None:
            p.kill()
            p.wait(timeout=10)
        if p is not None and p.stdout:
            p.stdout.close()

    def restart(self) -> None:
        """Start the agent again on the same pty and state (same UUID and token): the board
        is plugged back in."""
        self.kill()
        self._spawn()

    @property
    def agent_log(self) -> str:
        return os.path.join(self.state_dir, "agent.log")

    def close(self) -> None:
        """Stop the agent (by its pid), the bridge, and remove the token."""
        p = self.proc
        if p is not None and p.poll() is None:
            p.terminate()
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=5)
        if p is not None and p.stdout:
            p.stdout.close()
        self._log.close()
        self.bridge.close()
        bu = getattr(self, "board_uuid", None)
        if bu:
            try:
                (board_dir(bu) / "token").unlink()
            except OSError:
                pass
        if self._tmp is not None:
            self._tmp.cleanup()

    def __enter__(self) -> EmulatedBoard:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["BoardClient", "BoardError", "EmulatedBoard", "board_dir", "boards_dir",
           "calibrate_board", "guess_profile",
           "calibration_path", "load_token", "remember_port", "save_token", "sparsefl_home"]
