"""Flower adapter (fl_core.flower): the same strategies and client code under Flower.

The reference for every check is our own path, run here in-process: ``configure_fit`` →
``embedded.run_task`` on the client's shard (``make_partition`` of the same dataset and seed)
→ ``aggregate_fit`` with the results sorted by client id. A Flower run must end with bitwise
the same global weights and masks.

* ``test_flower_simulation_matches_own_loop``: a real 3-node Ray simulation of ``zerofl``
  (``flwr.simulation.run_simulation``), 2 rounds, all clients each round, against our
  federation loop (``fl_core.federation.Federation``) on the same seed: same weights, bytes
  and accuracy.
* The other tests drive the same ``FlowerStrategy`` and ``ClientApp`` through Flower's
  ``Strategy.start`` over an in-process ``Grid`` (the Flower messages are built and decoded
  as in a deployment; only the transport is a function call), which is fast enough to cover
  more strategies, a failing node, and malformed payloads.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

flwr = pytest.importorskip("flwr", reason="flwr (the optional Flower extra) is not installed")
pytest.importorskip("ray", reason="flwr[simulation] (Ray) is not installed")

from flwr.app import Context, Error, Message, RecordDict  # noqa: E402
from flwr.serverapp import Grid  # noqa: E402

from embedded.task import ClientTask, run_task  # noqa: E402
from embedded.train import TrainConfig  # noqa: E402
from fl_core.flower import (  # noqa: E402
    TASK_KEY,
    DataSpec,
    FlowerAdapterError,
    FlowerStrategy,
    client_id_for,
    make_client_app,
    make_server_app,
    pack_bytes,
    run_flower_simulation,
    shard,
    unpack_bytes,
)
from fl_core.strategies import ClientInfo, make_strategy  # noqa: E402
from hwmodel.models import build  # noqa: E402

TRAIN = TrainConfig(lr=0.05, batch_size=32, epochs=1, threads=1)
SPEC = build("mlp", num_classes=10, input_shape=(1, 8, 8), hidden=(32, 32))  # fc2 is sparse
DATA = DataSpec("digits", "iid", 3, seed=7)
PARAMS = {
    "zerofl": {"sparsity": 0.5, "mask_ratio": 0.1},
    "feddst": {"sparsity": 0.5, "readjust_interval": 1, "readjust_until": 1.0, "alpha": 0.2},
    "flash": {"density": 0.3, "hunt_fraction": 0.5, "hunt_epochs": 1, "dst_interval": 2,
              "mode": "jmwst"},
}


def own_path(name: str, rounds: int, data: DataSpec = DATA, drop: frozenset[str] = frozenset()):
    """Our strategy driven directly: configure_fit, run_task, aggregate_fit (sorted by id)."""
    s = make_strategy(name, SPEC, rounds=rounds, seed=data.seed, train=TRAIN, **PARAMS[name])
    s.initialize()
    infos = [ClientInfo(client_id_for(i), num_samples=len(shard(data, i)[1]))
             for i in range(data.num_clients)]
    metrics = []
    for rnd in range(1, rounds + 1):
        tasks = s.configure_fit(rnd, infos)
        res = []
        for t in tasks:
            i = int(t.client_id[1:])
            if t.client_id not in drop:
                res.append((infos[i], run_task(t, *shard(data, i), raise_errors=True)))
        metrics.append(s.aggregate_fit(rnd, sorted(res, key=lambda p: p[0].client_id)))
    return s, metrics


def assert_same_model(a_weights, a_masks, b_weights, b_masks):
    assert set(a_weights) == set(b_weights)
    for k in a_weights:
        assert a_weights[k].dtype == b_weights[k].dtype, k
        assert np.array_equal(a_weights[k], b_weights[k]), k
    assert (a_masks is None) == (b_masks is None)
    if a_masks is not None:
        assert set(a_masks) == set(b_masks)
        for k in a_masks:
            assert np.array_equal(a_masks[k], b_masks[k]), k


# ------------------------------------------------------------------------------ Ray simulation
def own_loop(name: str, rounds: int, out_dir):
    """The same run through our federation loop (fl_core.federation, clients in-process)."""
    from fl_core.config import parse_config
    from fl_core.federation import Federation
    from fl_core.flower import load_partition

    cfg = parse_config({
        "rounds": rounds, "clients_per_round": DATA.num_clients, "seed": DATA.seed,
        "threads": 1, "data": {"name": DATA.dataset, "partition": DATA.partition,
                               "num_clients": DATA.num_clients},
        "model": {"name": "mlp"}, "strategy": {"name": name, **PARAMS[name]}})
    s = make_strategy(name, SPEC, rounds=rounds, seed=DATA.seed, train=TRAIN, **PARAMS[name])
    ds, parts = load_partition(DATA)
    fed = Federation(cfg, out_dir, strategy=s, dataset=ds, parts=parts, workers=0,
                     write_report=False)
    summary = fed.run()
    return s, fed.log.rounds, summary


def test_flower_simulation_matches_own_loop(tmp_path):
    run = run_flower_simulation("zerofl", SPEC, num_clients=3, rounds=2, clients_per_round=3,
                                dataset="digits", partition="iid", seed=7, train=TRAIN,
                                num_cpus=2, client_cpus=1, **PARAMS["zerofl"])
    print(f"\nFlower/Ray simulation wall time: {run.wall_s:.1f} s")
    ref, ref_rounds, summary = own_loop("zerofl", 2, tmp_path / "loop")
    assert_same_model(run.weights, run.masks, ref.weights, ref.masks)
    assert [r["round"] for r in run.rounds] == [1, 2]
    for row, lrow in zip(run.rounds, ref_rounds, strict=True):
        assert row["clients_ok"] == lrow["clients_ok"] == 3 and row["clients_failed"] == 0
        assert row["uplink_bytes"] == lrow["uplink_bytes"] > 0
        assert row["downlink_bytes"] == lrow["downlink_bytes"] > 0
        assert row["accuracy"] == lrow["accuracy"]
        # zerofl sparsified fc2's uplink: K = (1 - sparsity + mask_ratio) * 32*32 per client
        assert 0 < row["metrics"]["sent_nonzeros"] <= 3 * int(np.ceil(0.6 * 32 * 32))
    assert run.rounds[-1]["accuracy"] == summary["final_accuracy"]
    # and the same as driving the strategy by hand (so neither path is a no-op)
    direct, _ = own_path("zerofl", 2)
    assert_same_model(run.weights, run.masks, direct.weights, direct.masks)
    init = make_strategy("zerofl", SPEC, rounds=2, seed=7, train=TRAIN, **PARAMS["zerofl"])
    init.initialize()
    assert not np.array_equal(init.weights["fc2.weight"], run.weights["fc2.weight"])


# ------------------------------------------------------------------------------ in-process grid
class LocalGrid(Grid):
    """A Grid whose nodes are ClientApps called in-process (``fail``: node ids whose train
    replies are replaced by the error message Flower sends when a ClientApp raises)."""

    def __init__(self, num_nodes: int, fail: frozenset[int] = frozenset()) -> None:
        self.app = make_client_app()
        self.contexts = {
            1000 + i: Context(run_id=1, node_id=1000 + i,
                              node_config={"partition-id": i, "num-partitions": num_nodes},
                              state=RecordDict(), run_config={})
            for i in range(num_nodes)}
        self.fail = fail

    def set_run(self, run_id):  # pragma: no cover - not used in-process
        raise NotImplementedError

    @property
    def run(self):  # pragma: no cover
        raise NotImplementedError

    def create_message(self, *a, **k):  # pragma: no cover
        raise NotImplementedError

    def get_node_ids(self):
        return list(self.contexts)

    def push_messages(self, messages):  # pragma: no cover
        raise NotImplementedError

    def pull_messages(self, message_ids):  # pragma: no cover
        raise NotImplementedError

    def send_and_receive(self, messages, *, timeout=None):
        out = []
        for m in messages:
            node = m.metadata.dst_node_id
            if node in self.fail and m.metadata.message_type == "train":
                out.append(Message(Error(code=0, reason="ClientApp raised: boom"), reply_to=m))
                continue
            try:
                out.append(self.app(m, self.contexts[node]))
            except Exception as e:  # noqa: BLE001 - what Flower does with a raising ClientApp
                out.append(Message(Error(code=0, reason=f"{type(e).__name__}: {e}"),
                                   reply_to=m))
        return out


@pytest.fixture
def task_identity():
    """Messages take their run id from flwr's process-wide TaskIdentity (set by the SuperLink
    or run_simulation); set one for in-process runs and restore it afterwards."""
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


def run_local(name: str, rounds: int, fail: frozenset[int] = frozenset()):
    s = make_strategy(name, SPEC, rounds=rounds, seed=DATA.seed, train=TRAIN, **PARAMS[name])
    fs = FlowerStrategy(s, DATA, clients_per_round=3)
    out: dict = {}
    app = make_server_app(fs, rounds, out=out)
    grid = LocalGrid(3, fail)
    app(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={}))
    return fs, out


@pytest.mark.parametrize("name", ["feddst", "flash"])
def test_adapter_matches_own_path_with_masks(name, task_identity):
    """Masks (FedDST's prune/regrow, FLASH's hunting round with a subset) round-trip too."""
    fs, out = run_local(name, 2)
    ref, ref_metrics = own_path(name, 2)
    assert_same_model(fs.inner.weights, fs.inner.masks, ref.weights, ref.masks)
    assert ref.masks is not None
    assert [r["metrics"] for r in fs.history] == ref_metrics
    final = out["result"].arrays  # what Flower reports as the final global ArrayRecord
    for k, v in ref.weights.items():
        assert np.array_equal(final[k].numpy(), v)
    for k, v in ref.masks.items():
        assert np.array_equal(final[f"mask/{k}"].numpy(), v)


def test_failed_node_is_recorded_and_round_goes_on(task_identity):
    fs, _ = run_local("zerofl", 1, fail=frozenset({1002}))
    row = fs.history[0]
    assert row["clients_ok"] == 2 and row["clients_failed"] == 1
    assert "boom" in row["failures"]["c0002"]
    ref, _ = own_path("zerofl", 1, drop=frozenset({"c0002"}))
    assert_same_model(fs.inner.weights, fs.inner.masks, ref.weights, ref.masks)


def test_flwr_run_server_app_from_run_config(task_identity, tmp_path):
    """The module-level ServerApp (``flwr run``) reads the run config and writes the model."""
    from fl_core.flower import server_app

    rc = {"strategy": "zerofl", "strategy-params": json.dumps(PARAMS["zerofl"]),
          "model": "mlp", "model-options": '{"num_classes": 10, "input_shape": [1, 8, 8], '
          '"hidden": [32, 32]}', "dataset": "digits", "partition": "iid", "num-clients": 3,
          "clients-per-round": 3, "num-server-rounds": 1, "seed": DATA.seed,
          "train": json.dumps(TRAIN.to_dict()), "server-eval": True, "out-dir": str(tmp_path)}
    server_app(LocalGrid(3), Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                                     run_config=rc))
    ref, _ = own_path("zerofl", 1)
    with np.load(tmp_path / "final_model.npz") as z:
        got = {k[2:]: z[k] for k in z.files if k.startswith("w/")}
        assert not any(k.startswith("m/") for k in z.files)
    assert_same_model(got, None, ref.weights, ref.masks)
    rows = json.loads((tmp_path / "rounds.json").read_text())
    assert rows[0]["clients_ok"] == 3 and 0.0 <= rows[0]["accuracy"] <= 1.0
    with pytest.raises(ValueError, match="unknown key"):
        server_app(LocalGrid(3), Context(run_id=1, node_id=0, node_config={},
                                         state=RecordDict(), run_config=dict(rc, colour=1)))


# ------------------------------------------------------------------------------ payloads
def test_task_payload_round_trip_and_rejects_malformed():
    s = make_strategy("zerofl", SPEC, rounds=1, seed=1, train=TRAIN, **PARAMS["zerofl"])
    task = s.configure_fit(1, [ClientInfo("c0000", num_samples=10)])[0]
    raw = task.to_bytes()
    content = RecordDict({TASK_KEY: pack_bytes(raw, "sparsefl.clienttask")})
    assert unpack_bytes(content, TASK_KEY, "sparsefl.clienttask") == raw
    assert ClientTask.from_bytes(raw).to_bytes() == raw
    with pytest.raises(FlowerAdapterError, match="stype"):
        unpack_bytes(content, TASK_KEY, "sparsefl.clientresult")
    with pytest.raises(FlowerAdapterError, match="no ArrayRecord"):
        unpack_bytes(RecordDict({}), TASK_KEY, "sparsefl.clienttask")
    with pytest.raises(ValueError, match="magic"):
        ClientTask.from_bytes(b"XXXX" + raw[4:])


def test_data_spec_json_and_errors():
    d = DataSpec("digits", "lda", 5, seed=3, alpha=0.5)
    assert DataSpec.from_json(d.to_json()) == d
    with pytest.raises(FlowerAdapterError, match="unknown field"):
        DataSpec.from_json('{"dataset": "digits", "partition": "iid", "num_clients": 2, '
                           '"colour": 1}')
    with pytest.raises(FlowerAdapterError, match="num_clients"):
        DataSpec.from_json('{"dataset": "digits", "partition": "iid", "num_clients": 0}')
    with pytest.raises(FlowerAdapterError, match="partition-id"):
        shard(DATA, 3)


def test_flower_stays_optional():
    """Nothing in fl_core but fl_core.flower imports flwr."""
    import pathlib

    root = pathlib.Path(__file__).resolve().parents[1]
    users = [p.relative_to(root).as_posix() for p in (root / "fl_core").rglob("*.py")
             if "flwr" in p.read_text() and p.name != "flower.py"]
    assert users == []
