"""fl_core.flower — run sparsefl's strategies under Flower (message API, flwr >= 1.21).

Thin adapters, never a second implementation: the server half stays our
:class:`fl_core.strategies.Strategy` (sampling of tasks, aggregation, masks), the client half
stays :func:`embedded.run_task`; Flower only carries the bytes.

* :class:`FlowerStrategy` — a ``flwr.serverapp.strategy.Strategy`` wrapping any of our
  strategies. ``configure_train`` builds our ``ClientTask``s (``participants`` /
  ``configure_fit``) and sends each to the node holding that client's shard;
  ``aggregate_train`` decodes the ``ClientResult``s, validates them with the strategy's
  ``check_result``, sorts them by client id and calls ``aggregate_fit``.
* :func:`make_client_app` — a ``ClientApp`` whose ``query`` handler tells the server which
  client a node is (partition id, shard size, device) and whose ``train`` handler decodes the
  task, loads the node's shard and calls ``embedded.run_task``.
* :func:`run_flower_simulation` — the whole experiment under ``flwr.simulation.run_simulation``
  (Ray backend, CPU only) → final weights, masks and per-round metrics.

Wire format (what travels inside a Flower ``Message``):

* ``RecordDict["sparsefl.task"]`` (server → node, ``train``): an ``ArrayRecord`` with one
  ``Array`` ``"bytes"`` of ``dtype="uint8"``, ``shape=(len,)``, ``stype="sparsefl.clienttask"``
  whose ``data`` is ``ClientTask.to_bytes()`` verbatim (our pickle-free container, validated on
  decode). An ``ArrayRecord`` rather than a ``bytes`` entry of a ``ConfigRecord`` because Flower
  splits ``Array`` payloads into chunks on the wire (large models pass gRPC's message limit).
* ``RecordDict["sparsefl.result"]`` (node → server): the same with
  ``stype="sparsefl.clientresult"`` and ``ClientResult.to_bytes()``, plus a ``MetricRecord``
  ``"metrics"`` (``num-examples``, ``train-loss``) for Flower's own tooling.
* ``RecordDict["sparsefl.data"]`` (server → node, ``query`` and ``train``): a ``ConfigRecord``
  with one string ``"json"``: the :class:`DataSpec` (dataset, partition scheme, number of
  clients, seed, ...), so every node derives its shard exactly as our own loop does
  (``fl_core.data.load_dataset`` + ``make_partition``; client ``i`` is ``"c%04d" % i`` and holds
  part ``i``). A node's ``node_config`` gives its ``partition-id`` (Flower's simulation sets
  it; on a real SuperNode pass ``--node-config "partition-id=3 data-path='/data/fmnist'"``),
  and optionally ``data-path`` (overrides the spec's path) and ``device`` (profile name).
* ``RecordDict["sparsefl.info"]`` (node → server, ``query``): ``ConfigRecord`` with
  ``partition-id``, ``client-id``, ``num-samples``, ``device``.

Real SuperNodes (``flwr run`` with the Deployment Runtime): point a Flower app's
``pyproject.toml`` at the module-level apps and describe the run in its config, e.g.::

    [tool.flwr.app.components]
    serverapp = "fl_core.flower:server_app"
    clientapp = "fl_core.flower:client_app"

    [tool.flwr.app.config]
    strategy = "zerofl"
    strategy-params = '{"sparsity": 0.9, "mask_ratio": 0.1}'
    model = "lenet5"
    model-options = '{"num_classes": 10, "input_shape": [1, 28, 28]}'
    dataset = "fashion_mnist"
    partition = "lda"
    alpha = 1.0
    num-clients = 10
    clients-per-round = 10
    num-server-rounds = 20
    seed = 0
    out-dir = "runs/flower-zerofl"

and start each SuperNode with ``--node-config "partition-id=<i> data-path='/data/fmnist'"``
(and ``device='rpi4'`` for hetero-FLASH's budgets). Keys: :data:`RUN_CONFIG_KEYS`.

Nothing received is unpickled by this module (the Ray simulation backend ships the
``ClientApp`` object to its actors with cloudpickle: that is Flower's own machinery, in-process
on one machine, not data from the network).

Notes and limits:

* ``flwr.simulation.run_simulation`` is marked deprecated in flwr 1.41 in favour of
  ``flwr run``; it is still the in-process Python API (no installed app, no SuperLink) and
  works; Ray is its only backend. On this 2-core box Ray's start-up dominates a small run
  (about 17 s for ``ray.init`` under load; the rounds of the test take ~1.5 s).
* Same seed, same ``TrainConfig.threads`` ⇒ bitwise the same model as ``fl_core.federation``
  (tests/test_flower.py). With ``threads=None`` each Ray actor uses every core; set
  ``threads`` to ``client_cpus`` to avoid oversubscription.
* A Flower run is not checkpointed/resumable here (``FlowerStrategy.inner.state_dict()`` is
  available); device costs (energy, estimated time) are not attached — use our loop for
  accuracy-vs-energy reports; Flower is the scale-out engine.

flwr is optional: this module is the only one in sparsefl that imports it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from logging import INFO
from typing import Any

import numpy as np

try:
    from flwr.app import (
        Array,
        ArrayRecord,
        ConfigRecord,
        Context,
        Message,
        MessageType,
        MetricRecord,
        RecordDict,
    )
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import Strategy as _FlwrStrategy
except ImportError as _e:  # pragma: no cover - exercised only without flwr
    raise ImportError("fl_core.flower needs Flower: pip install 'flwr[simulation]>=1.21' "
                      f"({_e})") from None

from embedded.task import ClientResult, ClientTask, run_task
from hwmodel import ModelSpec

from .strategies import Strategy, make_strategy
from .strategies.base import ClientInfo

TASK_KEY = "sparsefl.task"
RESULT_KEY = "sparsefl.result"
DATA_KEY = "sparsefl.data"
INFO_KEY = "sparsefl.info"
TASK_STYPE = "sparsefl.clienttask"
RESULT_STYPE = "sparsefl.clientresult"
DEFAULT_DEVICE = "generic-x86"


class FlowerAdapterError(ValueError):
    """A message between the Flower server and a node is not what sparsefl expects."""


def client_id_for(partition_id: int) -> str:
    """The client id of partition ``i`` — the same naming as ``fl_core.federation``."""
    return f"c{int(partition_id):04d}"


# ------------------------------------------------------------------------------ payloads
def pack_bytes(data: bytes, stype: str) -> ArrayRecord:
    """Wrap a record's bytes as a one-``Array`` ``ArrayRecord`` (uint8, chunked by Flower)."""
    return ArrayRecord({"bytes": Array(dtype="uint8", shape=(len(data),), stype=stype,
                                       data=bytes(data))})


def unpack_bytes(content: RecordDict, key: str, stype: str) -> bytes:
    """The bytes :func:`pack_bytes` wrapped, checked (record key, stype, dtype, length)."""
    if key not in content.array_records:
        raise FlowerAdapterError(f"message has no ArrayRecord {key!r} "
                                 f"(has {sorted(content.array_records)})")
    rec = content.array_records[key]
    if set(rec.keys()) != {"bytes"}:
        raise FlowerAdapterError(f"ArrayRecord {key!r} must hold exactly the Array 'bytes', "
                                 f"has {sorted(rec.keys())}")
    arr = rec["bytes"]
    if arr.stype != stype or arr.dtype != "uint8" or tuple(arr.shape) != (len(arr.data),):
        raise FlowerAdapterError(f"ArrayRecord {key!r}: expected stype {stype!r}, dtype uint8, "
                                 f"shape (len(data),); got stype {arr.stype!r}, dtype "
                                 f"{arr.dtype!r}, shape {tuple(arr.shape)} for "
                                 f"{len(arr.data)} bytes")
    return arr.data


def state_record(weights: Mapping[str, np.ndarray],
                 masks: Mapping[str, np.ndarray] | None = None) -> ArrayRecord:
    """Global weights (torch-style names) and masks (``"mask/<layer>"``) as an ArrayRecord."""
    rec = {k: Array(np.ascontiguousarray(v)) for k, v in weights.items()}
    if masks is not None:
        rec.update({f"mask/{k}": Array(np.ascontiguousarray(v, dtype=bool))
                    for k, v in masks.items()})
    return ArrayRecord(rec)


# ------------------------------------------------------------------------------ data
@dataclass(frozen=True)
class DataSpec:
    """How every node derives its shard: ``load_dataset(dataset, path, **options)`` then
    ``make_partition(partition, y, num_clients, seed=seed, alpha=alpha, k=k, groups=...)``
    — exactly ``fl_core.federation.load_data``."""

    dataset: str
    partition: str
    num_clients: int
    seed: int = 0
    alpha: float | None = None
    k: int | None = None
    path: str | None = None
    options: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> DataSpec:
        try:
            d = json.loads(text)
        except (TypeError, json.JSONDecodeError) as e:
            raise FlowerAdapterError(f"data spec is not valid JSON ({e})") from None
        if not isinstance(d, dict):
            raise FlowerAdapterError("data spec must be a JSON object")
        allowed = set(cls.__dataclass_fields__)
        unknown = sorted(set(d) - allowed)
        missing = sorted({"dataset", "partition", "num_clients"} - set(d))
        if unknown or missing:
            raise FlowerAdapterError(f"data spec: unknown field(s) {unknown}, missing "
                                     f"field(s) {missing}; allowed: {sorted(allowed)}")
        if not isinstance(d.get("options", {}), dict):
            raise FlowerAdapterError("data spec: 'options' must be an object")
        n = d["num_clients"]
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise FlowerAdapterError(f"data spec: num_clients must be a positive integer, "
                                     f"got {n!r}")
        return cls(**d)


_SHARDS: dict[str, tuple[Any, list[np.ndarray]]] = {}


def load_partition(data: DataSpec) -> tuple[Any, list[np.ndarray]]:
    """The dataset and its partition (cached per process: a Ray actor serves many rounds)."""
    from .data import load_dataset, make_partition

    key = data.to_json()
    hit = _SHARDS.get(key)
    if hit is None:
        ds = load_dataset(data.dataset, data.path or None, **data.options)
        parts = make_partition(data.partition, ds.y, data.num_clients, seed=data.seed,
                               alpha=data.alpha, k=data.k, groups=ds.groups)
        if len(parts) != data.num_clients:
            raise FlowerAdapterError(f"partition {data.partition!r} made {len(parts)} parts, "
                                     f"not num_clients={data.num_clients}")
        _SHARDS.clear()
        hit = _SHARDS[key] = (ds, parts)
    return hit


def shard(data: DataSpec, partition_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Training samples of client ``partition_id`` (``x[part]``, ``y[part]``)."""
    if not 0 <= partition_id < data.num_clients:
        raise FlowerAdapterError(f"partition-id {partition_id} is outside "
                                 f"[0, {data.num_clients})")
    ds, parts = load_partition(data)
    p = parts[partition_id]
    return ds.x[p], ds.y[p]


# ------------------------------------------------------------------------------ client side
def _node_data(message: Message, context: Context) -> tuple[DataSpec, int, str]:
    cfg = message.content.config_records.get(DATA_KEY)
    if cfg is None or "json" not in cfg:
        raise FlowerAdapterError(f"message has no ConfigRecord {DATA_KEY!r} with 'json'")
    data = DataSpec.from_json(cfg["json"])
    nc = context.node_config
    if "partition-id" not in nc:
        raise FlowerAdapterError("node_config has no 'partition-id' (start the SuperNode with "
                                 "--node-config \"partition-id=<i>\")")
    pid = nc["partition-id"]
    if isinstance(pid, bool) or not isinstance(pid, int):
        raise FlowerAdapterError(f"node_config 'partition-id' must be an integer, got {pid!r}")
    if nc.get("data-path"):
        data = DataSpec(**{**asdict(data), "path": str(nc["data-path"])})
    return data, int(pid), str(nc.get("device", DEFAULT_DEVICE))


def make_client_app() -> ClientApp:
    """A ClientApp running sparsefl tasks: ``query`` (who am I) and ``train`` (run_task)."""
    app = ClientApp()

    @app.query()
    def query(message: Message, context: Context) -> Message:
        data, pid, device = _node_data(message, context)
        _, y = shard(data, pid)
        info = ConfigRecord({"partition-id": pid, "client-id": client_id_for(pid),
                             "num-samples": int(len(y)), "device": device})
        return Message(RecordDict({INFO_KEY: info}), reply_to=message)

    @app.train()
    def train(message: Message, context: Context) -> Message:
        data, pid, _ = _node_data(message, context)
        task = ClientTask.from_bytes(unpack_bytes(message.content, TASK_KEY, TASK_STYPE))
        if task.client_id != client_id_for(pid):
            raise FlowerAdapterError(f"task for client {task.client_id!r} reached the node "
                                     f"holding partition {pid} ({client_id_for(pid)!r})")
        x, y = shard(data, pid)
        res = run_task(task, x, y)
        metrics = {"num-examples": int(res.num_samples)}
        if res.stats is not None and getattr(res.stats, "losses", None):
            metrics["train-loss"] = float(np.mean(res.stats.losses))
        return Message(RecordDict({RESULT_KEY: pack_bytes(res.to_bytes(), RESULT_STYPE),
                                   "metrics": MetricRecord(metrics)}), reply_to=message)

    return app


# ------------------------------------------------------------------------------ server side
class FlowerStrategy(_FlwrStrategy):
    """A Flower message-API strategy that delegates every decision to one of ours.

    The wrapped strategy owns the global model: the ``arrays`` Flower passes to
    ``configure_train`` are what this adapter returned the round before (ignored); the
    ``ArrayRecord`` returned by ``aggregate_train`` is the wrapped strategy's weights and masks.
    Sampling: ``clients_per_round`` of the ``data.num_clients`` clients, drawn (sorted) from
    ``np.random.default_rng(seed)`` like our loop; ``None`` = all. ``devices`` (one profile name
    per partition id) overrides what the nodes report. ``history`` holds one dict per round:
    the strategy's metrics, clients ok / failed (each failure with its reason), bytes.
    """

    def __init__(self, strategy: Strategy, data: DataSpec, *,
                 clients_per_round: int | None = None, seed: int | None = None,
                 min_clients: int = 1, devices: Sequence[str] | None = None,
                 energy_budget_j: float | None = None, query_timeout_s: float = 600.0) -> None:
        if not isinstance(strategy, Strategy):
            raise ValueError(f"FlowerStrategy: strategy must be a fl_core Strategy, got "
                             f"{type(strategy).__name__}")
        n = data.num_clients
        if clients_per_round is not None and not 1 <= clients_per_round <= n:
            raise ValueError(f"FlowerStrategy: clients_per_round must be in [1, {n}], "
                             f"got {clients_per_round!r}")
        if devices is not None and len(devices) != n:
            raise ValueError(f"FlowerStrategy: devices lists {len(devices)} profiles for "
                             f"{n} clients")
        if min_clients < 1:
            raise ValueError(f"FlowerStrategy: min_clients must be >= 1, got {min_clients!r}")
        self.inner = strategy
        self.data = data
        self.clients_per_round = clients_per_round or n
        self.rng = np.random.default_rng(strategy.seed if seed is None else seed)
        self.min_clients = min_clients
        self.devices = list(devices) if devices is not None else None
        self.energy_budget_j = energy_budget_j
        self.query_timeout_s = query_timeout_s
        self.infos: dict[int, ClientInfo] = {}      # partition id -> what the server knows
        self.nodes: dict[int, int] = {}             # partition id -> Flower node id
        self.history: list[dict[str, Any]] = []
        self._pending: dict[int, tuple[int, ClientInfo, ClientTask]] = {}  # node -> (pid,..)

    # ---------------------------------------------------------------- discovery
    def _data_record(self) -> ConfigRecord:
        return ConfigRecord({"json": self.data.to_json()})

    def discover(self, grid: Grid) -> None:
        """Ask every node which client it is (a ``query`` message); waits for all clients."""
        n = self.data.num_clients
        t0 = time.monotonic()
        while len(ids := list(grid.get_node_ids())) < n:
            if time.monotonic() - t0 > self.query_timeout_s:
                raise FlowerAdapterError(f"only {len(ids)} of {n} nodes connected after "
                                         f"{self.query_timeout_s:.0f} s")
            time.sleep(0.2)
        msgs = [Message(RecordDict({DATA_KEY: self._data_record()}), dst_node_id=i,
                        message_type=MessageType.QUERY) for i in ids]
        replies = list(grid.send_and_receive(msgs, timeout=self.query_timeout_s))
        for r in replies:
            node = r.metadata.src_node_id
            if r.has_error():
                raise FlowerAdapterError(f"node {node} failed the query: {r.error.reason}")
            info = r.content.config_records.get(INFO_KEY)
            if info is None:
                raise FlowerAdapterError(f"node {node}: query reply has no {INFO_KEY!r}")
            pid = int(info["partition-id"])
            if pid in self.nodes:
                raise FlowerAdapterError(f"nodes {self.nodes[pid]} and {node} both hold "
                                         f"partition {pid}")
            device = self.devices[pid] if self.devices is not None else str(info["device"])
            self.nodes[pid] = node
            self.infos[pid] = ClientInfo(client_id_for(pid), device, int(info["num-samples"]),
                                         energy_budget_j=self.energy_budget_j)
        missing = sorted(set(range(n)) - set(self.nodes))
        if missing:
            raise FlowerAdapterError(f"no node answered for partition(s) {missing[:10]}")

    # ---------------------------------------------------------------- train
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        if not self.nodes:
            self.discover(grid)
        n = self.data.num_clients
        sampled = sorted(int(i) for i in self.rng.choice(n, size=self.clients_per_round,
                                                         replace=False))
        infos = [self.infos[i] for i in sampled]
        tasks = self.inner.configure_fit(server_round, infos)
        by_cid = {client_id_for(i): i for i in sampled}
        self._pending = {}
        data = self._data_record()
        msgs = []
        for t in tasks:
            pid = by_cid[t.client_id]
            node = self.nodes[pid]
            self._pending[node] = (pid, self.infos[pid], t)
            content = RecordDict({TASK_KEY: pack_bytes(t.to_bytes(), TASK_STYPE),
                                  DATA_KEY: data})
            msgs.append(Message(content, dst_node_id=node, message_type=MessageType.TRAIN,
                                group_id=str(server_round)))
        return msgs

    def _validate(self, node: int, msg: Message) -> tuple[ClientInfo | None, ClientResult |
                                                          None, str | None]:
        entry = self._pending.get(node)
        if entry is None:
            return None, None, f"reply from node {node}, which was sent no task"
        _, info, task = entry
        if msg.has_error():
            return info, None, f"node error: {msg.error.reason}"
        try:
            res = ClientResult.from_bytes(unpack_bytes(msg.content, RESULT_KEY, RESULT_STYPE))
        except ValueError as e:
            return info, None, f"undecodable reply: {e}"
        if res.client_id != task.client_id or res.round != task.round:
            return info, res, (f"result is for client {res.client_id!r} round {res.round}, "
                               f"expected {task.client_id!r} round {task.round}")
        if res.ok and res.num_samples <= 0:
            return info, res, f"num_samples {res.num_samples} (expected > 0)"
        return info, res, self.inner.check_result(info, res)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        ok: list[tuple[ClientInfo, ClientResult]] = []
        failed: dict[str, str] = {}
        seen = set()
        up = down = 0
        for msg in replies:
            node = msg.metadata.src_node_id
            seen.add(node)
            info, res, why = self._validate(node, msg)
            cid = info.client_id if info is not None else f"node-{node}"
            if res is not None:
                c = res.costs
                down += int(c.get("downlink_bytes", {}).get("value", 0))
                if why is None:
                    up += int(c.get("uplink_bytes", {}).get("value", 0))
            if why is None:
                ok.append((info, res))
            else:
                failed[cid] = why
        for node, (_, info, _) in self._pending.items():
            if node not in seen:
                failed[info.client_id] = "no reply (timeout)"
        ok.sort(key=lambda p: p[0].client_id)      # deterministic aggregation order
        metrics: dict[str, float] = {}
        aggregated = len(ok) >= self.min_clients
        if aggregated:
            metrics = dict(self.inner.aggregate_fit(server_round, ok))
        row = {"round": server_round, "clients_ok": len(ok), "clients_failed": len(failed),
               "failures": failed, "aggregated": aggregated, "uplink_bytes": up,
               "downlink_bytes": down, "metrics": metrics}
        losses = [float(np.mean(r.stats.losses)) for _, r in ok
                  if r.stats is not None and getattr(r.stats, "losses", None)]
        if losses:
            row["train_loss"] = float(np.mean(losses))
        self.history.append(row)
        self._pending = {}
        mrec = {k: float(v) for k, v in metrics.items()
                if isinstance(v, (int, float, np.floating, np.integer))}
        mrec.update({"clients-ok": len(ok), "clients-failed": len(failed),
                     "uplink-bytes": up, "downlink-bytes": down})
        if losses:
            mrec["train-loss"] = row["train_loss"]
        return state_record(self.inner.weights, self.inner.masks), MetricRecord(mrec)

    # ---------------------------------------------------------------- evaluate
    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        """No federated evaluation: the global model is evaluated on the server
        (``evaluate_fn`` of :meth:`start`, see :func:`make_server_app`)."""
        return []

    def aggregate_evaluate(self, server_round: int,
                           replies: Iterable[Message]) -> MetricRecord | None:
        return None

    def summary(self) -> None:
        from flwr.supercore import log

        log(INFO, "\t├──> sparsefl strategy %r (%s), %d clients, %d per round",
            self.inner.name, self.inner.spec.name, self.data.num_clients,
            self.clients_per_round)
        log(INFO, "\t└──> data %s / %s, seed %d", self.data.dataset, self.data.partition,
            self.data.seed)


def make_server_app(strategy: FlowerStrategy, rounds: int, *,
                    test: tuple[np.ndarray, np.ndarray] | None = None,
                    eval_every: int = 1, out: dict[str, Any] | None = None,
                    timeout_s: float = 3600.0) -> ServerApp:
    """A ServerApp running ``rounds`` rounds of ``strategy``; with ``test`` the global model is
    evaluated on the server every ``eval_every`` rounds and at the last. ``out`` (a dict)
    receives the flwr ``Result`` under ``"result"`` and the evaluations under ``"evals"``."""
    app = ServerApp()
    sink = out if out is not None else {}

    def evaluate_fn(rnd: int, _arrays: ArrayRecord) -> MetricRecord | None:
        if test is None or rnd == 0 or (rnd % eval_every and rnd != rounds):
            return None
        from .clients import evaluate_state

        r = evaluate_state(strategy.inner.spec, strategy.inner.weights, test[0], test[1],
                           masks=strategy.inner.masks)
        sink.setdefault("evals", {})[rnd] = r
        return MetricRecord({"accuracy": r["accuracy"], "loss": r["loss"]})

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        if not strategy.inner.weights:
            strategy.inner.initialize()
        sink["result"] = strategy.start(
            grid, state_record(strategy.inner.weights, strategy.inner.masks),
            num_rounds=rounds, timeout=timeout_s, evaluate_fn=evaluate_fn)

    return app


# ------------------------------------------------------------------------------ simulation
@dataclass
class FlowerRun:
    """What :func:`run_flower_simulation` returns."""

    weights: dict[str, np.ndarray]
    masks: dict[str, np.ndarray] | None
    rounds: list[dict[str, Any]]          # FlowerStrategy.history, plus accuracy/loss
    wall_s: float
    strategy: Strategy


def backend_config(num_cpus: int | None = None, client_cpus: float = 1.0) -> dict[str, Any]:
    """A small CPU-only Ray backend config: ``num_cpus`` for Ray (default: all cores),
    ``client_cpus`` per ClientApp actor (so ``num_cpus // client_cpus`` clients train at once),
    no GPUs, no dashboard."""
    import os

    n = int(num_cpus or os.cpu_count() or 1)
    return {"client_resources": {"num_cpus": float(client_cpus), "num_gpus": 0.0},
            "init_args": {"num_cpus": n, "num_gpus": 0, "include_dashboard": False}}


def run_flower_simulation(strategy_name: str, spec: ModelSpec | str, num_clients: int,
                          rounds: int, clients_per_round: int | None, dataset: str,
                          partition: str, seed: int = 0, *, alpha: float | None = None,
                          k: int | None = None, dataset_path: str | None = None,
                          dataset_options: Mapping[str, Any] | None = None, train: Any = None,
                          evaluate: bool = True, eval_every: int = 1, min_clients: int = 1,
                          devices: Sequence[str] | None = None, num_cpus: int | None = None,
                          client_cpus: float = 1.0, verbose: bool = False,
                          **params: Any) -> FlowerRun:
    """Run ``strategy_name`` on ``num_clients`` simulated SuperNodes (Flower's Ray backend).

    ``spec`` is a ModelSpec or a model name (built for the dataset's classes and input shape).
    Partition and client seeds follow our loop (``fl_core.federation``) for the same ``seed``;
    ``params`` go to ``make_strategy``. Ray is started here (CPU only) unless already running,
    and shut down afterwards if it was started here.
    """
    import ray
    from flwr.simulation import run_simulation

    data = DataSpec(dataset=dataset, partition=partition, num_clients=int(num_clients),
                    seed=int(seed), alpha=alpha, k=k, path=dataset_path,
                    options=dict(dataset_options or {}))
    ds = None
    if isinstance(spec, str) or evaluate:
        ds, _ = load_partition(data)
    if isinstance(spec, str):
        from hwmodel.models import build

        spec = build(spec, num_classes=ds.num_classes, input_shape=tuple(ds.input_shape))
    inner = make_strategy(strategy_name, spec, rounds=rounds, seed=seed, train=train, **params)
    fs = FlowerStrategy(inner, data, clients_per_round=clients_per_round, seed=seed,
                        min_clients=min_clients, devices=devices)
    out: dict[str, Any] = {}
    test = (ds.x_test, ds.y_test) if evaluate else None
    server = make_server_app(fs, rounds, test=test, eval_every=eval_every, out=out)
    started_ray = not ray.is_initialized()
    t0 = time.perf_counter()
    try:
        run_simulation(server, make_client_app(), num_supernodes=int(num_clients),
                       backend_config=backend_config(num_cpus, client_cpus),
                       verbose_logging=verbose)
    finally:
        if started_ray and ray.is_initialized():
            ray.shutdown()
    wall = time.perf_counter() - t0
    if len(fs.history) != rounds:
        raise RuntimeError(f"Flower simulation ended after {len(fs.history)} of {rounds} "
                           "rounds (see the flwr log above)")
    rows = []
    for row in fs.history:
        ev = out.get("evals", {}).get(row["round"])
        rows.append(dict(row, accuracy=None if ev is None else ev["accuracy"],
                         loss=None if ev is None else ev["loss"]))
    return FlowerRun(dict(inner.weights), None if inner.masks is None else dict(inner.masks),
                     rows, wall, inner)


# ------------------------------------------------------------------------------ flwr run
RUN_CONFIG_KEYS = {
    "strategy": "strategy name (fl_core.strategies.STRATEGIES)",
    "model": "builder name or path to a ModelSpec .json",
    "model-options": "JSON object of builder options (else num_classes/input_shape from data)",
    "dataset": "dataset name (fl_core.data.DATASETS)",
    "dataset-path": "path to the dataset files (nodes may override with node_config data-path)",
    "dataset-options": "JSON object of load_dataset options",
    "partition": "partition scheme (fl_core.data.SCHEMES)",
    "alpha": "Dirichlet alpha (lda, per_class)", "k": "classes per client (pathological)",
    "num-clients": "number of clients = SuperNodes", "clients-per-round": "sampled per round",
    "num-server-rounds": "rounds", "seed": "run seed",
    "strategy-params": "JSON object of strategy parameters",
    "train": "JSON object of TrainConfig fields",
    "server-eval": "evaluate the global model on the test split on the server (bool)",
    "out-dir": "where to write final_model.npz and rounds.json (optional)",
}


def _json_obj(rc: Mapping[str, Any], key: str) -> dict[str, Any]:
    v = rc.get(key, "{}")
    try:
        d = json.loads(v) if isinstance(v, str) else None
    except json.JSONDecodeError as e:
        raise ValueError(f"run config {key!r}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise ValueError(f"run config {key!r}: expected a JSON object string, got {v!r}")
    return d


def strategy_from_run_config(rc: Mapping[str, Any]
                             ) -> tuple[FlowerStrategy, int, tuple[np.ndarray, np.ndarray] | None]:
    """(FlowerStrategy, rounds, test split or None) from a ``flwr run`` run config
    (``[tool.flwr.app.config]``; keys in :data:`RUN_CONFIG_KEYS`)."""
    from embedded.train import TrainConfig
    from hwmodel.models import BUILDERS, build, load_model

    unknown = sorted(set(rc) - set(RUN_CONFIG_KEYS))
    if unknown:
        raise ValueError(f"run config: unknown key(s) {unknown}; allowed: "
                         f"{', '.join(RUN_CONFIG_KEYS)}")
    missing = sorted({"strategy", "model", "dataset", "partition", "num-clients",
                      "num-server-rounds"} - set(rc))
    if missing:
        raise ValueError(f"run config: missing key(s) {missing}")
    data = DataSpec(dataset=str(rc["dataset"]), partition=str(rc["partition"]),
                    num_clients=int(rc["num-clients"]), seed=int(rc.get("seed", 0)),
                    alpha=None if "alpha" not in rc else float(rc["alpha"]),
                    k=None if "k" not in rc else int(rc["k"]),
                    path=str(rc["dataset-path"]) if rc.get("dataset-path") else None,
                    options=_json_obj(rc, "dataset-options"))
    server_eval = bool(rc.get("server-eval", False))
    name, opts = str(rc["model"]), _json_obj(rc, "model-options")
    ds = load_partition(data)[0] if server_eval or (name in BUILDERS and not opts) else None
    if name in BUILDERS:
        if not opts:
            opts = {"num_classes": ds.num_classes, "input_shape": tuple(ds.input_shape)}
        spec = build(name, **{k: tuple(v) if isinstance(v, list) else v
                              for k, v in opts.items()})
    else:
        spec = load_model(name)
    rounds = int(rc["num-server-rounds"])
    train = TrainConfig.from_dict(_json_obj(rc, "train"), "run config 'train'")
    inner = make_strategy(str(rc["strategy"]), spec, rounds=rounds, seed=data.seed, train=train,
                          **_json_obj(rc, "strategy-params"))
    cpr = rc.get("clients-per-round")
    fs = FlowerStrategy(inner, data, clients_per_round=None if cpr is None else int(cpr))
    return fs, rounds, ((ds.x_test, ds.y_test) if server_eval else None)


server_app = ServerApp()
"""A module-level ServerApp for ``flwr run`` (``fl_core.flower:server_app``), configured by the
run config (``[tool.flwr.app.config]``, keys in :data:`RUN_CONFIG_KEYS`)."""


@server_app.main()
def _server_main(grid: Grid, context: Context) -> None:
    fs, rounds, test = strategy_from_run_config(dict(context.run_config))
    out: dict[str, Any] = {}
    make_server_app(fs, rounds, test=test, out=out)(grid, context)
    out_dir = context.run_config.get("out-dir")
    if out_dir:
        import os

        os.makedirs(str(out_dir), exist_ok=True)
        arrays = {f"w/{k}": v for k, v in fs.inner.weights.items()}
        arrays.update({f"m/{k}": v for k, v in (fs.inner.masks or {}).items()})
        np.savez(os.path.join(str(out_dir), "final_model.npz"), **arrays)
        rows = [dict(r, **(out.get("evals", {}).get(r["round"]) or {})) for r in fs.history]
        with open(os.path.join(str(out_dir), "rounds.json"), "w") as f:
            json.dump(rows, f, indent=1)


client_app = make_client_app()
"""A module-level ClientApp for ``flwr run`` / SuperNodes (``fl_core.flower:client_app``)."""

__all__ = ["DATA_KEY", "INFO_KEY", "RESULT_KEY", "TASK_KEY", "DataSpec", "FlowerAdapterError",
           "FlowerRun", "FlowerStrategy", "RUN_CONFIG_KEYS", "backend_config", "client_app",
           "client_id_for", "load_partition", "make_client_app", "make_server_app",
           "pack_bytes", "run_flower_simulation", "server_app", "shard", "state_record",
           "strategy_from_run_config", "unpack_bytes"]
