"""Clients: the ``Client`` protocol and ``SimulatedClient`` (the embedded trainer on a shard).

A client turns an ``embedded.ClientTask`` into an ``embedded.ClientResult``. A
:class:`SimulatedClient` runs :func:`embedded.run_task` on its shard — in a reusable worker
process of a :class:`WorkerPool` (spawned, so Numba compiles once per worker; a task that hangs
past the timeout gets its worker killed and replaced) or in-process — and replaces the host's
timing by the cost model: ``time_s`` and ``energy_j`` are the hwmodel estimate for the client's
device profile (provenance ``estimated``, or ``calibrated-estimate`` for a fitted profile), the
host wall time is kept as ``host_wall_s`` (``measured-emulated``). Bytes are the real payload
lengths (``measured``); the radio energy and time of those bytes come from the profile.

Only bytes cross the process boundary: the task (``ClientTask.to_bytes``) and the shard (raw
array bytes with a JSON header) go to the worker, the ``ClientResult.to_bytes`` record comes
back. Nothing from a worker is unpickled.

Parallel workers or in-process? ``benchmarks/client_pool.py`` times one round of 10 LeNet-5
clients (400 MNIST samples each, one epoch) on this 2-core machine, interleaved, 5 repeats
after a warm-up. Quiet host, OpenMP threading layer: 2 workers median 0.24 s, in-process with
2 Numba threads 0.29 s, with 1 thread 0.42 s (earlier, with the workqueue layer on a host
shared with other jobs: 0.78 / 4.6 / 7.7 s). Hence :data:`DEFAULT_WORKERS` = 2. Workers start
with one BLAS thread each: without that, two workers' spin-waiting BLAS threads made every
job ~3x slower.
"""

from __future__ import annotations

import json
import math
import multiprocessing as mp
import os
import struct
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any, Protocol, runtime_checkable

import numpy as np

from embedded.task import ClientResult, ClientTask
from hwmodel.provenance import Provenance
from hwmodel.provenance import tag as _tag

#: Worker processes when a config does not say (``0`` = in-process). Chosen by measurement:
#: see ``benchmarks/client_pool.py`` and the module docstring.
DEFAULT_WORKERS = 2
#: Seconds a single client task may run in a worker before the worker is killed.
DEFAULT_TIMEOUT_S = 600.0
_HDR = struct.Struct("<I")
_BLAS_VARS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


@runtime_checkable
class Client(Protocol):
    """What the federation loop needs from a client (simulated or a real board)."""

    client_id: str
    device: str

    def fit(self, task: ClientTask) -> ClientResult:
        """Train for one round and return the encoded update with tagged costs."""
        ...

    def evaluate(self, state: dict[str, np.ndarray], spec: Any) -> dict[str, float]:
        """Loss and accuracy of the model ``state`` on the client's own data."""
        ...


# ------------------------------------------------------------------------------ wire
def pack_job(task: bytes, x: np.ndarray, y: np.ndarray, provenance: str) -> bytes:
    """One request for a worker: JSON header, then the task record, x and y as raw bytes."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    y = np.ascontiguousarray(y, dtype=np.int64)
    head = json.dumps({"task": len(task), "x_shape": list(x.shape), "y_len": int(y.shape[0]),
                       "provenance": provenance}).encode()
    return b"".join([_HDR.pack(len(head)), head, task, x.tobytes(), y.tobytes()])


def unpack_job(data: bytes) -> tuple[bytes, np.ndarray, np.ndarray, str]:
    """Inverse of :func:`pack_job`; every length is checked before slicing."""
    mv = memoryview(data)
    if len(mv) < _HDR.size:
        raise ValueError("worker job: shorter than its header length")
    (hl,) = _HDR.unpack_from(mv, 0)
    pos = _HDR.size
    if pos + hl > len(mv):
        raise ValueError("worker job: header runs past the end")
    h = json.loads(bytes(mv[pos:pos + hl]))
    pos += hl
    shape = tuple(int(d) for d in h["x_shape"])
    nt, nx, ny = int(h["task"]), 4 * math.prod(shape), 8 * int(h["y_len"])
    if pos + nt + nx + ny != len(mv) or shape[0] != int(h["y_len"]):
        raise ValueError("worker job: declared sizes do not match the payload")
    task = bytes(mv[pos:pos + nt])
    # writable copies: Numba compiles read-only arrays as a separate (slower to warm) type
    x = np.frombuffer(mv[pos + nt:pos + nt + nx], dtype=np.float32).reshape(shape).copy()
    y = np.frombuffer(mv[pos + nt + nx:], dtype=np.int64).copy()
    return task, x, y, str(h["provenance"])


def _worker_main(conn: Connection) -> None:  # pragma: no cover - runs in a child process
    """A worker: receive job bytes, run the task, send the result bytes; repeat until EOF."""
    import signal

    from embedded.task import run_task

    signal.signal(signal.SIGINT, signal.SIG_IGN)   # Ctrl-C is the server's to handle
    while True:
        try:
            data = conn.recv_bytes()
        except (EOFError, OSError):
            return
        try:
            tb, x, y, prov = unpack_job(data)
            task = ClientTask.from_bytes(tb)
            res = run_task(task, x, y, provenance=prov)
        except Exception as e:  # noqa: BLE001 - reported as the client's failure
            res = ClientResult(0, "?", error=f"worker: {type(e).__name__}: {e}")
        try:
            conn.send_bytes(res.to_bytes())
        except (EOFError, OSError):
            return


# ------------------------------------------------------------------------------ pool
@dataclass
class _Worker:
    proc: Any
    conn: Connection


class WorkerPool:
    """``size`` spawned worker processes, reused across rounds (Numba compiles once each).

    :meth:`run` sends jobs (bytes) to idle workers and collects result bytes; a job that takes
    longer than ``timeout_s`` has its worker killed (and replaced), and its slot holds ``None``.
    """

    def __init__(self, size: int, timeout_s: float = DEFAULT_TIMEOUT_S,
                 context: str = "spawn") -> None:
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"WorkerPool.size: expected an integer >= 1, got {size!r}")
        if not timeout_s > 0:
            raise ValueError(f"WorkerPool.timeout_s: expected > 0, got {timeout_s!r}")
        self.size = size
        self.timeout_s = float(timeout_s)
        self._ctx = mp.get_context(context)
        self._workers: list[_Worker] = []
        self.restarts = 0

    def _spawn(self) -> _Worker:
        parent, child = self._ctx.Pipe(duplex=True)
        p = self._ctx.Process(target=_worker_main, args=(child,), daemon=True,
                              name="sparsefl-client-worker")
        # one BLAS thread per worker (a spawned child reads the environment at start-up):
        # several workers each running a multi-threaded, spin-waiting BLAS oversubscribe the
        # cores (measured: 3x slower jobs with stalls of many seconds on 2 cores)
        saved = {k: os.environ.get(k) for k in _BLAS_VARS}
        for k in _BLAS_VARS:
            os.environ.setdefault(k, "1")
        try:
            p.start()
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        child.close()
        return _Worker(p, parent)

    def _ensure(self) -> None:
        self._workers = [w for w in self._workers if w.proc.is_alive()]
        while len(self._workers) < self.size:
            self._workers.append(self._spawn())

    def _kill(self, w: _Worker) -> None:
        try:
            w.proc.kill()
            w.proc.join(5)
        finally:
            w.conn.close()
        if w in self._workers:
            self._workers.remove(w)
        self.restarts += 1

    def run(self, jobs: list[bytes]) -> list[tuple[bytes | None, float, str | None]]:
        """Run every job; per job (result bytes or None, wall seconds, error or None)."""
        self._ensure()
        out: list[tuple[bytes | None, float, str | None]] = [(None, 0.0, None)] * len(jobs)
        pending = list(range(len(jobs)))[::-1]
        busy: dict[int, tuple[_Worker, float]] = {}   # job index -> (worker, start)
        idle = list(self._workers)
        while pending or busy:
            while pending and idle:
                j, w = pending.pop(), idle.pop()
                try:
                    w.conn.send_bytes(jobs[j])
                except (OSError, ValueError):
                    self._kill(w)
                    self._ensure()
                    idle = [x for x in self._workers if x not in [b[0] for b in busy.values()]]
                    pending.append(j)
                    continue
                busy[j] = (w, time.perf_counter())
            now = time.perf_counter()
            next_deadline = min(s + self.timeout_s for _, s in busy.values())
            ready = wait([w.conn for w, _ in busy.values()], timeout=max(0.0, next_deadline - now))
            now = time.perf_counter()
            for j, (w, start) in list(busy.items()):
                if w.conn in ready:
                    try:
                        data = w.conn.recv_bytes()
                        out[j] = (data, now - start, None)
                        idle.append(w)
                    except (EOFError, OSError):
                        out[j] = (None, now - start, "worker process died")
                        self._kill(w)
                    del busy[j]
                elif now - start >= self.timeout_s:
                    out[j] = (None, now - start,
                              f"timeout: no result after {self.timeout_s:g} s (worker killed)")
                    self._kill(w)
                    del busy[j]
            if len(self._workers) < self.size and (pending or busy):
                self._ensure()
                used = {id(b[0]) for b in busy.values()} | {id(w) for w in idle}
                idle += [w for w in self._workers if id(w) not in used]
        return out

    def close(self) -> None:
        """Stop every worker (EOF, then kill if it does not exit)."""
        for w in self._workers:
            try:
                w.conn.close()
            except OSError:
                pass
        for w in self._workers:
            w.proc.join(2)
            if w.proc.is_alive():
                w.proc.kill()
                w.proc.join(2)
        self._workers = []

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# ------------------------------------------------------------------------------ costs
def _radio_of(profile: Any, radio: str | None) -> str | None:
    if radio is not None and radio in profile.radios:
        return radio
    return next(iter(profile.radios), None) if radio is None else None


def estimate_task(task: ClientTask, device: str, samples: int, radio: str | None = "wifi",
                  up_bytes: int | None = None, down_bytes: int | None = None,
                  steps: int | None = None, profile: Any = None) -> dict[str, Any]:
    """The cost model's figures for ``task`` on ``device`` with ``samples`` local samples.

    ``profile`` (a DeviceProfile, e.g. the class's calibration in a hybrid run) replaces the
    shipped profile named ``device``; its provenance follows (``calibrated-estimate``).

    Compute time/energy/FLOPs come from :func:`hwmodel.estimator.estimate` under the task's
    plan, scaled to ``steps`` optimizer steps when given (``max_steps`` caps a round). The
    radio is charged for ``up_bytes``/``down_bytes`` (the real payloads; the wire-size
    formulas when ``None``) plus the idle draw while transferring, as ``hwmodel.budget`` does.
    """
    from hwmodel.estimator import estimate, provenance_of, radio_cost

    prof = _cached_profile(device) if profile is None else profile
    cfg = task.train
    est = _cached_estimate(task, prof, device, max(1, int(samples)), cfg.batch_size,
                           cfg.epochs, estimate)
    t = est.sparse.totals
    scale = 1.0
    if steps is not None and est.steps > 0:
        scale = steps / est.steps
    elif cfg.max_steps is not None and est.steps > cfg.max_steps:
        scale = cfg.max_steps / est.steps
    up = t.uplink_bytes if up_bytes is None else up_bytes
    down = t.downlink_bytes if down_bytes is None else down_bytes
    r = _radio_of(prof, radio)
    e_radio, t_radio = radio_cost(prof, r, up, down) if r is not None else (0.0, 0.0)
    compute_t, compute_e = t.time_s * scale, t.energy_j * scale
    return {"time_s": compute_t + t_radio, "energy_j": compute_e + e_radio + prof.idle_w * t_radio,
            "compute_time_s": compute_t, "compute_energy_j": compute_e,
            "radio_time_s": t_radio, "radio_energy_j": e_radio,
            "flops": float(t.train_flops) * scale, "uplink_bytes": int(up),
            "downlink_bytes": int(down), "provenance": provenance_of(prof).value,
            "radio": r}


_PROFILES: dict[str, Any] = {}
_ESTIMATES: dict[tuple, Any] = {}


def _cached_profile(device: str) -> Any:
    from hwmodel.estimator import resolve_device

    if device not in _PROFILES:
        _PROFILES[device] = resolve_device(device)
    return _PROFILES[device]


def _cached_estimate(task: ClientTask, prof: Any, device: str, samples: int, batch: int,
                     epochs: int, estimate: Any) -> Any:
    # keyed by the profile object's id; the entry holds the profile, so the id stays its own
    key = (task.spec.to_json(), task.plan.to_json(), device, id(prof), samples, batch, epochs)
    hit = _ESTIMATES.get(key)
    if hit is None or hit[0] is not prof:
        if len(_ESTIMATES) > 4096:
            _ESTIMATES.clear()
        hit = _ESTIMATES[key] = (prof, estimate(task.spec, prof, plan=task.plan, batch=batch,
                                                samples=samples, epochs=epochs, radio=None))
    return hit[1]


# ------------------------------------------------------------------------------ client
class SimulatedClient:
    """A client whose training runs on the host and whose costs come from its device profile.

    With a ``pool`` its task runs in a worker process (killed after the pool's timeout);
    without one it runs in this process, where a hang cannot be interrupted.
    """

    def __init__(self, client_id: str, device: str, x: np.ndarray, y: np.ndarray,
                 pool: WorkerPool | None = None, radio: str | None = "wifi",
                 profile: Any = None) -> None:
        if len(x) != len(y):
            raise ValueError(f"client {client_id}: x has {len(x)} samples but y has {len(y)}")
        self.client_id = str(client_id)
        self.device = str(device)
        self.x = np.ascontiguousarray(x, dtype=np.float32)
        self.y = np.ascontiguousarray(y, dtype=np.int64)
        self.pool = pool
        self.radio = radio
        #: a DeviceProfile replacing the shipped one of ``device`` (a hybrid run's calibration)
        self.profile = profile
        _cached_profile(self.device)   # fail early on an unknown device

    @property
    def num_samples(self) -> int:
        return int(len(self.y))

    def job(self, task: ClientTask) -> bytes:
        """The worker request for ``task`` (see :func:`pack_job`)."""
        return pack_job(task.to_bytes(), self.x, self.y, Provenance.MEASURED_EMULATED.value)

    def fit(self, task: ClientTask) -> ClientResult:
        """Run the task (in the pool if there is one, else in-process) and attach the costs."""
        if self.pool is not None:
            data, wall, err = self.pool.run([self.job(task)])[0]
            return self.finish(task, data, wall, err)
        from embedded.task import run_task

        t0 = time.perf_counter()
        res = run_task(task, self.x, self.y, provenance=Provenance.MEASURED_EMULATED)
        return self.finish(task, res, time.perf_counter() - t0, None)

    def finish(self, task: ClientTask, data: bytes | ClientResult | None, wall: float,
               err: str | None) -> ClientResult:
        """Turn a worker's bytes (or an in-process result) into the client's tagged result."""
        if data is None:
            res = ClientResult(task.round, self.client_id, error=err or "no result")
        elif isinstance(data, ClientResult):
            res = data
        else:
            try:
                res = ClientResult.from_bytes(data)
            except ValueError as e:
                res = ClientResult(task.round, self.client_id, error=f"bad result record: {e}")
        if res.ok and (res.client_id != self.client_id or res.round != task.round):
            res = ClientResult(task.round, self.client_id,
                               error=f"result is for client {res.client_id!r} round {res.round}, "
                               f"expected {self.client_id!r} round {task.round}")
        host = res.costs.get("time_s", {}).get("value", wall)
        up = int(len(res.update))
        down = len(task.global_state) + len(task.global_masks or b"")
        steps = res.stats.steps if (res.ok and res.stats is not None) else None
        est = estimate_task(task, self.device, self.num_samples, self.radio, up, down,
                            steps=steps, profile=self.profile)
        prov = est["provenance"]
        if res.ok:
            res.costs = {"time_s": _tag(est["time_s"], "s", prov),
                         "energy_j": _tag(est["energy_j"], "J", prov),
                         "flops": _tag(est["flops"], "FLOP", prov),
                         "uplink_bytes": _tag(up, "B", Provenance.MEASURED),
                         "downlink_bytes": _tag(down, "B", Provenance.MEASURED),
                         "host_wall_s": _tag(host, "s", Provenance.MEASURED_EMULATED)}
        else:
            res.costs = {"downlink_bytes": _tag(down, "B", Provenance.MEASURED),
                         "uplink_bytes": _tag(0, "B", Provenance.MEASURED),
                         "host_wall_s": _tag(host, "s", Provenance.MEASURED_EMULATED)}
        return res

    def evaluate(self, state: dict[str, np.ndarray], spec: Any) -> dict[str, float]:
        """Loss and accuracy of ``state`` on this client's shard (in-process)."""
        return evaluate_state(spec, state, self.x, self.y)


def evaluate_state(spec: Any, state: dict[str, np.ndarray], x: np.ndarray,
                   y: np.ndarray, masks: dict[str, np.ndarray] | None = None) -> dict[str, float]:
    """Evaluate a global model (a state dict, optional masks) on ``x``, ``y``."""
    from embedded.task import _network_for
    from hwmodel import SparsityPlan

    net, init = _network_for(spec)
    net.set_plan(SparsityPlan.dense())
    full = dict(init)
    full.update(state)
    net.set_masks({n: None for n in spec.weighted_layers()})
    net.load_state_dict(full)
    if masks is not None:
        net.set_masks(masks)
    net.eval()
    r = net.evaluate(x, y)
    return {"loss": float(r["loss"]), "accuracy": float(r["accuracy"]), "n": int(r["n"])}


def run_clients(clients: list[Client], tasks: list[ClientTask],
                pool: WorkerPool | None) -> list[ClientResult]:
    """Run one round's tasks: clients that say they are ``concurrent`` (real boards) in
    threads, simulated clients of ``pool`` in parallel meanwhile, then the rest one by one.

    A client that raises is reported as a failed result (the exception text), never raised.
    """
    import threading

    out: list[ClientResult | None] = [None] * len(tasks)

    def fit(i: int) -> None:
        c = clients[i]
        try:
            out[i] = c.fit(tasks[i])
        except Exception as e:  # noqa: BLE001 - a client's exception is its failure
            out[i] = ClientResult(tasks[i].round, c.client_id,
                                  error=f"{type(e).__name__}: {e}")

    running = {i for i, c in enumerate(clients) if getattr(c, "concurrent", False)}
    threads = [threading.Thread(target=fit, args=(i,), daemon=True,
                                name=f"client-{clients[i].client_id}") for i in sorted(running)]
    for t in threads:
        t.start()
    batch = [i for i, c in enumerate(clients)
             if isinstance(c, SimulatedClient) and pool is not None and c.pool is pool]
    if batch:
        jobs = [clients[i].job(tasks[i]) for i in batch]  # type: ignore[union-attr]
        for i, (data, wall, err) in zip(batch, pool.run(jobs), strict=True):
            out[i] = clients[i].finish(tasks[i], data, wall, err)  # type: ignore[union-attr]
    for i in range(len(clients)):
        if out[i] is None and i not in running:
            fit(i)
    for t in threads:
        t.join()
    return out  # type: ignore[return-value]


def default_workers() -> int:
    """Workers for this machine: :data:`DEFAULT_WORKERS`, at most the CPU count (0 if 1 CPU)."""
    n = os.cpu_count() or 1
    return 0 if n < 2 else min(DEFAULT_WORKERS, n)


def worker_count(workers: int | None, configured: int | None) -> int:
    """The workers a run uses: the caller's ``workers``, else the config's ``[fleet] workers``,
    else :func:`default_workers`."""
    if workers is not None:
        return workers
    return configured if configured is not None else default_workers()


__all__ = ["DEFAULT_TIMEOUT_S", "DEFAULT_WORKERS", "Client", "SimulatedClient", "WorkerPool",
           "default_workers", "estimate_task", "evaluate_state", "pack_job", "run_clients",
           "unpack_job", "worker_count"]
