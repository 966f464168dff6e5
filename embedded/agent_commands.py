"""The board agent's training and measurement commands (docs/protocol.md §3, docs/boards.md).

:func:`install` plugs these handlers into an :class:`embedded.agent.Agent`'s dispatch table:

* ``LOAD_MODEL`` — a spec + state frame (+ masks) kept resident; a later TRAIN may send only the
  tensors that changed (``base`` = the resident digest), the agent merges them.
* ``LOAD_DATA`` — a shard by name: sent as a codec state frame ``{x, y}`` or read from a file under
  the agent's ``--data-root`` (``.npz`` with arrays ``x`` and ``y``, loaded without pickle, or a
  codec state frame); paths outside the root or with ``..`` are refused.
* ``TRAIN`` (long) — a ``ClientTask.to_bytes()`` with a ``task_id``; the reply carries the
  ``ClientResult.to_bytes()``. A TRAIN whose task id already ran returns the cached result (it
  never trains twice). ``ABORT`` stops it between two steps (``train_local(should_stop=...)``).
* ``EVAL`` (long) — loss and accuracy of the resident (or given) model on a shard.
* ``BENCH`` (long) — per-layer, per-phase timings of a ModelSpec at given sparsities (SWAT plan),
  repeated: :class:`hwmodel.measure.Measurement` records (median, IQR) with the temperature and
  CPU frequency at the time — the calibration data.
* ``INFER_BENCH`` (long) — latency of a ``.tflite`` with LiteRT / tflite-runtime when installed,
  else a reply ``{"status": "NOT_AVAILABLE", "reason": ...}``.

Every declared size is checked before anything is allocated: a spec's parameter bytes and a
training step's peak memory (``hwmodel.counts.peak_memory_bytes``) against the board's free
RAM, tensor frames against the transfer limit (``codec.decode_state(max_total_elements=...)``),
list lengths and repeat counts against fixed caps. Handlers poll the abort event at least once
per step (well under a second for the models a board trains).

Heavy imports (numba, the trainer) happen inside the handlers, so ``python -m embedded.agent``
starts quickly and the first TRAIN pays the compile unless ``--warmup`` ran.
"""

from __future__ import annotations

import collections
import hashlib
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .agent import Aborted, AgentError, Command, _available_ram, safe_data_path
from .protocol.messages import ERR, MSG

MAX_SPEC_JSON = 1 << 20          # a ResNet-18 spec is ~20 kB
MAX_TASK_ID = 128
MAX_SHARD_NAME = 128
MAX_SPARSITIES = 16
MAX_REPEATS = 1000
MAX_BATCH = 4096
MAX_INFER_REPEATS = 10_000
TRAIN_CACHE = 4                  # results kept by task id
TRAIN_CACHE_BYTES = 64 << 20
#: models compiled by ``--warmup``: together they use every layer type the trainer has
WARMUP_MODELS = ("mlp", "lenet5", "resnet8")

_NUM = (int, float)


def _check(name: str, f: dict, schema: dict[str, tuple[Any, bool]]) -> dict:
    """Check fields against ``{field: (types, required)}``; AgentError(MALFORMED) names the field."""
    for key, (types, required) in schema.items():
        if key not in f or f[key] is None:
            if required:
                raise AgentError(ERR.MALFORMED, f"{name}: missing field {key!r}")
            f.pop(key, None)   # an optional field given as None = not given
            continue
        v = f[key]
        bad_bool = isinstance(v, bool) and bool not in (types if isinstance(types, tuple)
                                                        else (types,))
        if bad_bool or not isinstance(v, types):
            tn = types.__name__ if isinstance(types, type) else "/".join(t.__name__ for t in types)
            raise AgentError(ERR.MALFORMED, f"{name}: field {key!r} must be {tn}, got "
                             f"{type(v).__name__}")
    unknown = set(f) - set(schema)
    if unknown:
        raise AgentError(ERR.MALFORMED, f"{name}: unknown field(s) {sorted(unknown)}; expected "
                         f"some of {sorted(schema)}")
    return f


def _int_in(name: str, key: str, v: int, lo: int, hi: int) -> int:
    if not lo <= v <= hi:
        raise AgentError(ERR.MALFORMED, f"{name}: field {key!r} must be in {lo}..{hi}, got {v}")
    return v


def state_digest(state: dict[str, np.ndarray]) -> str:
    """SHA-256 (hex) of named tensors: name, dtype, shape and bytes, in name order.

    The host computes the same over what it sent, so both sides agree on the resident model.
    """
    h = hashlib.sha256()
    for k in sorted(state):
        a = np.ascontiguousarray(state[k])
        h.update(k.encode() + b"\0" + a.dtype.str.encode() + b"\0" + repr(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()


@dataclass
class Resident:
    """The model kept on the board between rounds."""

    spec_json: str
    state: dict[str, np.ndarray]
    masks: bytes | None
    digest: str


@dataclass
class BoardState:
    """What the training commands keep in memory (cleared by RESET)."""

    resident: Resident | None = None
    shards: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    results: collections.OrderedDict = field(default_factory=collections.OrderedDict)

    def shard_bytes(self, skip: str | None = None) -> int:
        return sum(x.nbytes + y.nbytes for k, (x, y) in self.shards.items() if k != skip)


class BoardCommands:
    """The handlers; ``install(agent)`` wires them into ``agent.commands``."""

    def __init__(self, agent: Any, emulated: bool = False,
                 slowdown_profile: str | None = None) -> None:
        self.agent = agent
        self.emulated = emulated
        self.slowdown_profile = slowdown_profile
        self.state = BoardState()
        self.lock = threading.Lock()

    # --- limits -------------------------------------------------------------------------
    @property
    def max_elements(self) -> int:
        return max(1, self.agent.max_transfer // 2)   # an f16 tensor is 2 bytes per element

    def _spec(self, name: str, text: str):
        from hwmodel.spec import ModelSpec

        if len(text) > MAX_SPEC_JSON:
            raise AgentError(ERR.TOO_LARGE, f"{name}: spec JSON of {len(text)} bytes exceeds "
                             f"{MAX_SPEC_JSON}")
        try:
            spec = ModelSpec.from_json(text, f"{name} spec")
        except ValueError as e:
            raise AgentError(ERR.MALFORMED, f"{name}: {e}") from None
        self._check_params(name, spec)
        return spec

    def _check_params(self, name: str, spec: Any) -> None:
        # weights, gradients, momentum and masks: 4 copies of every parameter, before building
        need = 16 * int(spec.num_params())
        avail = _available_ram()
        if avail is not None and need > avail:
            raise AgentError(ERR.TOO_LARGE, f"{name}: model {spec.name!r} needs {need} bytes "
                             f"for its parameters, the board has {avail} free")

    def _check_step_memory(self, name: str, spec: Any, plan: Any, batch: int,
                           extra: int = 0) -> int:
        """A training step's peak memory (hwmodel's count) against the board's free RAM."""
        from hwmodel.counts import peak_memory_bytes

        try:
            peak = int(peak_memory_bytes(spec, plan, batch)) + int(extra)
        except ValueError as e:
            raise AgentError(ERR.MALFORMED, f"{name}: {e}") from None
        avail = _available_ram()
        if avail is not None and peak > avail:
            raise AgentError(ERR.TOO_LARGE, f"{name}: a training step of {spec.name!r} at batch "
                             f"{batch} needs {peak} bytes (hwmodel peak memory), the board has "
                             f"{avail} free")
        return peak

    def _decode_state(self, name: str, key: str, blob: bytes) -> dict[str, np.ndarray]:
        from . import codec

        try:
            return codec.decode_state(blob, max_total_elements=self.max_elements)
        except (codec.CodecError, ValueError) as e:
            raise AgentError(ERR.MALFORMED, f"{name}: field {key!r}: {e}") from None

    # --- LOAD_MODEL ---------------------------------------------------------------------
    def cmd_load_model(self, f: dict) -> dict:
        _check("LOAD_MODEL", f, {"spec": (str, True), "state": (bytes, True),
                                 "masks": (bytes, False), "merge": (bool, False)})
        spec = self._spec("LOAD_MODEL", f["spec"])
        got = self._decode_state("LOAD_MODEL", "state", f["state"])
        shapes = spec.state_shapes()
        for k, a in got.items():
            if k not in shapes:
                raise AgentError(ERR.MALFORMED, f"LOAD_MODEL: tensor {k!r} is not in model "
                                 f"{spec.name!r}")
            if tuple(a.shape) != tuple(shapes[k]):
                raise AgentError(ERR.MALFORMED, f"LOAD_MODEL: tensor {k!r} has shape "
                                 f"{tuple(a.shape)}, model {spec.name!r} expects "
                                 f"{tuple(shapes[k])}")
        spec_json = spec.to_json()
        with self.lock:
            old = self.state.resident
            if f.get("merge") and old is not None and old.spec_json == spec_json:
                state = dict(old.state)
                state.update(got)
                masks = f.get("masks", old.masks)
            else:
                state, masks = got, f.get("masks")
            res = Resident(spec_json, state, masks, state_digest(state))
            self.state.resident = res
        return {"model": spec.name, "digest": res.digest, "tensors": len(res.state),
                "complete": set(res.state) >= set(shapes)}

    # --- LOAD_DATA ----------------------------------------------------------------------
    def cmd_load_data(self, f: dict) -> dict:
        _check("LOAD_DATA", f, {"name": (str, True), "data": (bytes, False),
                                "path": (str, False)})
        name = f["name"]
        _int_in("LOAD_DATA", "name (length)", len(name), 1, MAX_SHARD_NAME)
        if ("data" in f) == ("path" in f):
            raise AgentError(ERR.MALFORMED, "LOAD_DATA: give exactly one of 'data' (a codec "
                             "state frame {x, y}) or 'path' (a file under the data root)")
        if "data" in f:
            x, y = self._xy(self._decode_state("LOAD_DATA", "data", f["data"]), "data")
        else:
            x, y = self._load_file(f["path"])
        with self.lock:
            if self.state.shard_bytes(skip=name) + x.nbytes + y.nbytes > self.agent.max_transfer:
                raise AgentError(ERR.TOO_LARGE, f"LOAD_DATA: shard {name!r} ({x.nbytes + y.nbytes}"
                                 f" bytes) exceeds the resident data limit "
                                 f"{self.agent.max_transfer} (RESET clears)")
            self.state.shards[name] = (x, y)
        h = hashlib.sha256(np.ascontiguousarray(x).tobytes() + np.ascontiguousarray(y).tobytes())
        return {"name": name, "n": int(x.shape[0]), "x_shape": list(x.shape[1:]),
                "sha256": h.hexdigest()}

    def _xy(self, d: dict[str, np.ndarray], where: str) -> tuple[np.ndarray, np.ndarray]:
        if set(d) != {"x", "y"}:
            raise AgentError(ERR.MALFORMED, f"LOAD_DATA: {where} must hold exactly the tensors "
                             f"'x' and 'y', got {sorted(d)}")
        x, y = d["x"], d["y"]
        if x.ndim < 2 or y.ndim != 1 or x.shape[0] != y.shape[0] or x.shape[0] == 0:
            raise AgentError(ERR.MALFORMED, f"LOAD_DATA: {where}: x must be (n, ...) and y (n,) "
                             f"with n >= 1, got x {tuple(x.shape)}, y {tuple(y.shape)}")
        if y.dtype.kind not in "iu":
            raise AgentError(ERR.MALFORMED, f"LOAD_DATA: {where}: y must hold integer labels, "
                             f"got {y.dtype}")
        return np.ascontiguousarray(x, np.float32), np.ascontiguousarray(y, np.int64)

    def _load_file(self, rel: str) -> tuple[np.ndarray, np.ndarray]:
        path = safe_data_path(self.agent.data_root, rel)
        try:
            size = os.path.getsize(path)
        except OSError as e:
            raise AgentError(ERR.REFUSED, f"LOAD_DATA: cannot read {rel!r}: {e.strerror}") from None
        if size > self.agent.max_transfer:
            raise AgentError(ERR.TOO_LARGE, f"LOAD_DATA: {rel!r} is {size} bytes, over the limit "
                             f"{self.agent.max_transfer}")
        if path.endswith(".npz"):
            try:
                with np.load(path, allow_pickle=False) as z:
                    d = {k: z[k] for k in z.files}
            except (OSError, ValueError) as e:
                raise AgentError(ERR.MALFORMED, f"LOAD_DATA: {rel!r} is not a readable .npz "
                                 f"without pickled objects: {e}") from None
            return self._xy(d, rel)
        with open(path, "rb") as fh:
            blob = fh.read()
        return self._xy(self._decode_state("LOAD_DATA", rel, blob), rel)

    def _shard(self, name: str, ref: str | None) -> tuple[np.ndarray, np.ndarray]:
        key = ref or ""
        with self.lock:
            hit = self.state.shards.get(key)
        if hit is not None:
            return hit
        if ref and self.agent.data_root is not None:
            x, y = self._load_file(ref)
            with self.lock:
                self.state.shards[ref] = (x, y)
            return x, y
        raise AgentError(ERR.REFUSED, f"{name}: no shard {ref!r} on the board: LOAD_DATA it first"
                         + ("" if self.agent.data_root else " (the agent has no --data-root)"))

    # --- TRAIN --------------------------------------------------------------------------
    def cmd_train(self, f: dict, abort: threading.Event) -> dict:
        from hwmodel.provenance import Provenance

        from .task import ClientTask, TaskError, run_task

        _check("TRAIN", f, {"task_id": (str, True), "task": (bytes, True), "base": (str, False)})
        tid = f["task_id"]
        _int_in("TRAIN", "task_id (length)", len(tid), 1, MAX_TASK_ID)
        with self.lock:
            cached = self.state.results.get(tid)
        if cached is not None:
            self.agent.counters["train_cached"] += 1
            return dict(cached, cached=True)
        try:
            task = ClientTask.from_bytes(f["task"])
        except TaskError as e:
            raise AgentError(ERR.MALFORMED, f"TRAIN: {e}") from None
        self._check_params("TRAIN", task.spec)
        received = self._decode_state("TRAIN", "task.global_state", task.global_state)
        spec_json = task.spec.to_json()
        if "base" in f:
            with self.lock:
                res = self.state.resident
            if res is None or res.digest != f["base"] or res.spec_json != spec_json:
                raise AgentError(ERR.REFUSED, "TRAIN: base model "
                                 f"{f['base'][:16]}... is not resident on the board (resident: "
                                 f"{res.digest[:16] + '...' if res else 'none'}); send the full "
                                 "state or LOAD_MODEL first")
            full = dict(res.state)
            full.update(received)
        else:
            full = received
        masks = task.global_masks   # masks always travel with the task (only weights are deltas)
        x, y = self._shard("TRAIN", task.data_ref)
        if tuple(x.shape[1:]) != tuple(task.spec.input_shape):
            raise AgentError(ERR.MALFORMED, f"TRAIN: shard {task.data_ref!r} has samples of shape "
                             f"{tuple(x.shape[1:])}, model {task.spec.name!r} takes "
                             f"{tuple(task.spec.input_shape)}")
        batch = min(task.train.batch_size, int(x.shape[0]))
        self._check_step_memory("TRAIN", task.spec, task.plan, batch)
        if "base" in f:
            from . import codec
            task.global_state = codec.encode_state(full)
        prov = Provenance.MEASURED_EMULATED if self.emulated else Provenance.MEASURED
        meter = self.agent.meter
        self.agent.counters["train_runs"] += 1
        w0, t_start = meter.begin(), time.time()
        c0 = time.perf_counter()
        result = run_task(task, x, y, provenance=prov, should_stop=abort.is_set)
        if abort.is_set():
            raise Aborted(f"TRAIN aborted: {result.error or 'after the last step'}")
        compute_s = time.perf_counter() - c0
        padded = self._slowdown(task, result, compute_s, abort)
        reading = meter.end(w0)
        t_end = time.time()
        if padded is not None:
            result.costs["time_s"]["value"] = float(padded)
        if reading.energy_j is not None:
            result.costs["energy_j"] = {"value": float(reading.energy_j), "unit": "J",
                                        "provenance": str(Provenance.MEASURED)}
        digest = state_digest(full)
        with self.lock:
            self.state.resident = Resident(spec_json, full, masks, digest)
        out = {"task_id": tid, "result": result.to_bytes(), "compute_s": compute_s,
               "t_start": t_start, "t_end": t_end, "energy": reading.to_dict(),
               "emulated": self.emulated, "slowdown_s": 0.0 if padded is None
               else float(padded - compute_s), "resident": digest}
        with self.lock:
            self.state.results[tid] = out
            while len(self.state.results) > TRAIN_CACHE or (len(self.state.results) > 1 and sum(
                    len(v["result"]) for v in self.state.results.values()) > TRAIN_CACHE_BYTES):
                self.state.results.popitem(last=False)
        return dict(out, cached=False)

    def _slowdown(self, task: Any, result: Any, compute_s: float,
                  abort: threading.Event) -> float | None:
        """Emulation only: wait until the round took as long as ``--slowdown-profile`` says."""
        if not self.slowdown_profile or result.stats is None or not result.stats.steps:
            return None
        import hwmodel

        st = result.stats
        batch = max(1, round(st.samples / st.steps))
        est = hwmodel.estimate(task.spec, self.slowdown_profile, plan=task.plan, batch=batch,
                               samples=int(st.samples), epochs=1, radio=None)
        target = float(est.totals.time_s)
        if target > compute_s and abort.wait(target - compute_s):
            raise Aborted("TRAIN aborted during the emulated slow-down")
        return max(target, compute_s)

    # --- EVAL ---------------------------------------------------------------------------
    def cmd_eval(self, f: dict, abort: threading.Event) -> dict:
        from .task import _network_for

        _check("EVAL", f, {"data": (str, True), "spec": (str, False), "state": (bytes, False),
                           "batch_size": (int, False)})
        bs = _int_in("EVAL", "batch_size", f.get("batch_size", 256), 1, MAX_BATCH)
        if "spec" in f:
            spec = self._spec("EVAL", f["spec"])
            if "state" not in f:
                raise AgentError(ERR.MALFORMED, "EVAL: 'spec' needs 'state'")
            state = self._decode_state("EVAL", "state", f["state"])
        else:
            with self.lock:
                res = self.state.resident
            if res is None:
                raise AgentError(ERR.REFUSED, "EVAL: no resident model: LOAD_MODEL or give "
                                 "'spec' and 'state'")
            spec = self._spec("EVAL", res.spec_json)
            state = res.state
        x, y = self._shard("EVAL", f["data"])
        self._check_step_memory("EVAL", spec, None, min(bs, int(x.shape[0])))
        if abort.is_set():
            raise Aborted()
        net, init = _network_for(spec)
        full = dict(init)
        unknown = set(state) - set(full)
        if unknown:
            raise AgentError(ERR.MALFORMED, f"EVAL: tensor(s) {sorted(unknown)} are not in "
                             f"model {spec.name!r}")
        full.update(state)
        net.set_masks({n: None for n in spec.weighted_layers()})
        net.load_state_dict(full)
        t0 = time.perf_counter()
        try:
            out = net.evaluate(x, y, bs)
        except ValueError as e:
            raise AgentError(ERR.MALFORMED, f"EVAL: {e}") from None
        return {"loss": float(out["loss"]), "accuracy": float(out["accuracy"]),
                "n": int(out["n"]), "time_s": time.perf_counter() - t0}

    # --- BENCH --------------------------------------------------------------------------
    def cmd_bench(self, f: dict, abort: threading.Event) -> dict:
        _check("BENCH", f, {"spec": (str, False), "model": (str, False),
                            "sparsities": (list, True), "batch": (int, False),
                            "repeats": (int, False), "warmup": (int, False),
                            "threads": (int, False)})
        if ("spec" in f) == ("model" in f):
            raise AgentError(ERR.MALFORMED, "BENCH: give exactly one of 'spec' (ModelSpec JSON) "
                             "or 'model' (a builder name)")
        if "model" in f:
            import hwmodel
            try:
                spec = hwmodel.build(f["model"])
            except ValueError as e:
                raise AgentError(ERR.MALFORMED, f"BENCH: field 'model': {e}") from None
            self._check_params("BENCH", spec)
        else:
            spec = self._spec("BENCH", f["spec"])
        sps = f["sparsities"]
        _int_in("BENCH", "sparsities (count)", len(sps), 1, MAX_SPARSITIES)
        for i, s in enumerate(sps):
            if isinstance(s, bool) or not isinstance(s, _NUM) or not 0.0 <= s < 1.0:
                raise AgentError(ERR.MALFORMED, f"BENCH: sparsities[{i}] must be a number in "
                                 f"[0, 1), got {s!r}")
        batch = _int_in("BENCH", "batch", f.get("batch", 16), 1, MAX_BATCH)
        repeats = _int_in("BENCH", "repeats", f.get("repeats", 10), 1, MAX_REPEATS)
        warm = _int_in("BENCH", "warmup", f.get("warmup", 2), 0, 100)
        import numba
        threads = _int_in("BENCH", "threads", f.get("threads", 1), 1,
                          numba.config.NUMBA_NUM_THREADS)
        self._check_step_memory("BENCH", spec, None, batch)
        meter = self.agent.meter
        w0, t_start = meter.begin(), time.time()
        out: list[dict] = []
        for s in sps:
            out.extend(m.to_dict() for m in self._bench_one(spec, float(s), batch, repeats, warm,
                                                             threads, abort))
        reading = meter.end(w0)
        return {"model": spec.name, "measurements": out, "t_start": t_start, "t_end": time.time(),
                "energy": reading.to_dict(), "emulated": self.emulated,
                "device": self.agent.board_uuid}

    def _bench_one(self, spec: Any, sparsity: float, batch: int, repeats: int, warm: int,
                   threads: int, abort: threading.Event) -> list:
        """Time every layer's phases over ``repeats`` SGD steps of random data (SWAT plan)."""
        import numba

        from .bench import StepBench
        from .kernels.gemm import single_threaded_blas

        numba.set_num_threads(threads)
        bench = StepBench(spec, sparsity, batch)
        temps: list[float] = []
        freqs: list[float] = []
        with single_threaded_blas():  # as in training: GEMMs split over Numba's threads
            self._bench_steps(bench, warm, repeats, sparsity, abort, temps, freqs)
        return bench.measurements(
            threads, device=self.agent.board_uuid,
            provenance="measured-emulated" if self.emulated else "measured",
            temperature_c=max(temps) if temps else None,
            freq_mhz=float(np.mean(freqs)) if freqs else None)

    @staticmethod
    def _bench_steps(bench: Any, warm: int, repeats: int, sparsity: float,
                     abort: threading.Event, temps: list, freqs: list) -> None:
        from .sensors.system import cpu_freq_mhz, temperatures_c

        for step in range(warm + repeats):
            if abort.is_set():
                raise Aborted(f"BENCH aborted at sparsity {sparsity:g}, step {step}")
            bench.step(record=step >= warm)
            if step == warm or step == warm + repeats - 1:   # conditions at start and end
                tz = temperatures_c()
                if tz:
                    temps.append(max(tz.values()))
                fq = cpu_freq_mhz().get("cur_mhz")
                if fq:
                    freqs.append(float(fq))

    # --- INFER_BENCH --------------------------------------------------------------------
    def cmd_infer_bench(self, f: dict, abort: threading.Event) -> dict:
        _check("INFER_BENCH", f, {"model": (bytes, True), "repeats": (int, False),
                                  "threads": (int, False)})
        repeats = _int_in("INFER_BENCH", "repeats", f.get("repeats", 50), 1, MAX_INFER_REPEATS)
        threads = _int_in("INFER_BENCH", "threads", f.get("threads", 1), 1, 64)
        blob = f["model"]
        if len(blob) < 8 or blob[4:8] != b"TFL3":
            raise AgentError(ERR.MALFORMED, "INFER_BENCH: field 'model' is not a .tflite "
                             "flatbuffer (file identifier 'TFL3' missing at offset 4)")
        interp_cls, runtime = _tflite_interpreter()
        if interp_cls is None:
            return {"status": "NOT_AVAILABLE", "reason": "neither ai_edge_litert nor "
                    "tflite_runtime is installed on the board (pip install ai-edge-litert, or "
                    "tflite-runtime with numpy < 2)"}
        try:
            it = interp_cls(model_content=bytes(blob), num_threads=threads)
            it.allocate_tensors()
        except (ValueError, RuntimeError) as e:
            raise AgentError(ERR.MALFORMED, f"INFER_BENCH: the interpreter refused the model: "
                             f"{e}") from None
        rng = np.random.default_rng(0)
        for d in it.get_input_details():
            dt = np.dtype(d["dtype"])
            shape = tuple(int(v) for v in d["shape"])
            if dt.kind == "f":
                v = rng.standard_normal(shape).astype(dt)
            else:
                info = np.iinfo(dt)
                v = rng.integers(info.min, info.max, shape, endpoint=True).astype(dt)
            it.set_tensor(d["index"], v)
        it.invoke()   # warm-up
        ts = []
        for _ in range(repeats):
            if abort.is_set():
                raise Aborted("INFER_BENCH aborted")
            t0 = time.perf_counter()
            it.invoke()
            ts.append(time.perf_counter() - t0)
        q1, med, q3 = np.percentile(ts, [25, 50, 75])
        return {"status": "OK", "runtime": runtime, "median_s": float(med),
                "iqr_s": float(q3 - q1), "repeats": repeats, "threads": threads}

    # --- RESET hook ---------------------------------------------------------------------
    def clear(self) -> int:
        with self.lock:
            n = len(self.state.shards) + (self.state.resident is not None)
            self.state = BoardState()
        return n


def _tflite_interpreter() -> tuple[Any, str | None]:
    try:
        from ai_edge_litert.interpreter import Interpreter
        return Interpreter, "ai_edge_litert"
    except ImportError:
        pass
    try:
        from tflite_runtime.interpreter import Interpreter
        return Interpreter, "tflite_runtime"
    except ImportError:
        return None, None


def warmup(log: Any = print, models: tuple[str, ...] = WARMUP_MODELS) -> float:
    """Compile every kernel the trainer uses (Numba caches them under NUMBA_CACHE_DIR).

    Trains two tiny steps of each of ``models`` dense, SWAT-sparse and masked, and evaluates:
    together they reach every layer type and kernel variant. Returns the seconds it took.
    """
    import hwmodel
    from hwmodel.plan import SparsityPlan

    from .network import Network
    from .train import TrainConfig, train_local

    t0 = time.perf_counter()
    for name in models:
        spec = hwmodel.build(name)
        rng = np.random.default_rng(0)
        x = rng.standard_normal((4, *spec.input_shape)).astype(np.float32)
        y = (np.arange(4) % spec.num_classes).astype(np.int64)
        for plan in (None, SparsityPlan.uniform(spec, 0.9, mode="swat"),
                     SparsityPlan.uniform(spec, 0.9, mode="masked")):
            net = Network.from_spec(spec, seed=0)
            net.set_plan(plan)
            train_local(net, x, y, TrainConfig(lr=0.01, batch_size=2, max_steps=2))
            net.evaluate(x, y, 4)
        log(f"warm-up: {name} compiled ({time.perf_counter() - t0:.1f} s so far)")
    return time.perf_counter() - t0


def install(agent: Any, emulated: bool = False, slowdown_profile: str | None = None
            ) -> BoardCommands:
    """Plug the training and measurement handlers into ``agent.commands``."""
    bc = BoardCommands(agent, emulated=emulated, slowdown_profile=slowdown_profile)
    agent.commands.update({
        MSG.TRAIN: Command(bc.cmd_train, long=True),
        MSG.EVAL: Command(bc.cmd_eval, long=True),
        MSG.BENCH: Command(bc.cmd_bench, long=True),
        MSG.LOAD_MODEL: Command(bc.cmd_load_model),
        MSG.LOAD_DATA: Command(bc.cmd_load_data),
        MSG.INFER_BENCH: Command(bc.cmd_infer_bench, long=True),
    })
    return bc


__all__ = ["BoardCommands", "BoardState", "install", "state_digest", "warmup"]
