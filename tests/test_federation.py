"""The federation loop on a tiny real setup (sklearn digits, the 2NN MLP): failing clients are
rejected and recorded, dropouts have reasons, costs come from the device profiles, workers give
the same model as in-process training, a hung worker is killed, Ctrl-C checkpoints and a resumed
run ends bitwise equal to an uninterrupted one."""

from __future__ import annotations

import numpy as np
import pytest

from embedded import codec
from embedded.task import ClientResult, run_task
from embedded.uplink import decode_update
from fl_core.clients import SimulatedClient, WorkerPool, pack_job
from fl_core.config import parse_config
from fl_core.federation import Federation, build_spec, load_data, make_strategy
from fl_core.fleet import assign_devices
from fl_core.runlog import load_npz, read_csv
from fl_core.strategies.base import ClientInfo

BASE = {"rounds": 1, "clients_per_round": 4, "min_clients": 1, "seed": 5, "threads": 1,
        "data": {"name": "digits", "partition": "iid", "num_clients": 4},
        "model": {"name": "mlp"}, "strategy": {"name": "fedavg"},
        "train": {"lr": 0.05, "batch_size": 32},
        "fleet": {"devices": {"rpi4": 0.5, "pixel4": 0.5}, "workers": 0}}


def cfg_of(**top):
    import copy

    doc = copy.deepcopy(BASE)
    for k, v in top.items():
        if isinstance(v, dict):
            doc.setdefault(k, {}).update(v)
        else:
            doc[k] = v
    return parse_config(doc, "test")


@pytest.fixture(scope="module")
def data():
    cfg = cfg_of()
    ds, parts = load_data(cfg)
    return ds, parts, build_spec(cfg, ds)


@pytest.fixture(scope="module")
def pool():
    with WorkerPool(2, timeout_s=120) as p:
        yield p


def fed(cfg, out, data, **kw):
    ds, parts, spec = data
    kw.setdefault("write_report", False)
    return Federation(cfg, out, dataset=ds, parts=parts, **kw)


def sim_clients(cfg, data, kind=SimulatedClient):
    """In-process clients on the devices the fleet assigns (kind: one class or one per client)."""
    ds, parts, _ = data
    devs = assign_devices(cfg.fleet.devices, len(parts), cfg.seed)
    kinds = kind if isinstance(kind, list) else [kind] * len(parts)
    return [k(f"c{i:04d}", devs[i], ds.x[p], ds.y[p])
            for i, (k, p) in enumerate(zip(kinds, parts, strict=True))]


# ------------------------------------------------------------------ clients that fail
class Raising(SimulatedClient):
    def fit(self, task):
        raise RuntimeError("boom: the board fell off the desk")


def _reencode(update: bytes, change) -> bytes:
    """Decode a dense update, change its tensors, encode it in the same wire format."""
    upd = decode_update(update)
    tensors = {"@uplink": np.array([1, 0], dtype=np.int32)}
    tensors.update(change(dict(upd.tensors)))
    return codec.encode_state(tensors, "dense32")


class NaNUpdate(SimulatedClient):
    def fit(self, task):
        res = super().fit(task)

        def poison(t):
            k = next(iter(t))
            t[k] = t[k].copy()
            t[k].flat[3] = np.nan
            return t
        res.update = _reencode(res.update, poison)
        return res


class WrongShape(SimulatedClient):
    def fit(self, task):
        res = super().fit(task)

        def reshape(t):
            k = next(n for n in t if n.endswith(".weight"))
            t[k] = np.zeros((3, 3), np.float32)
            return t
        res.update = _reencode(res.update, reshape)
        return res


def test_failing_clients_are_rejected_and_the_round_goes_on(tmp_path, data):
    ds, parts, spec = data
    cfg = cfg_of()
    good = sim_clients(cfg, data)
    clients = sim_clients(cfg, data, [SimulatedClient, Raising, NaNUpdate, WrongShape])
    fed(cfg, tmp_path / "run", data, clients=clients).run()
    rows = {r["client_id"]: r for r in read_csv(tmp_path / "run" / "clients.csv")}
    assert rows["c0000"]["status"] == "ok" and rows["c0000"]["reason"] == ""
    assert rows["c0001"]["status"] == "failed" and "RuntimeError: boom" in rows["c0001"]["reason"]
    assert rows["c0002"]["status"] == "failed" and "NaN" in rows["c0002"]["reason"]
    assert rows["c0003"]["status"] == "failed" and "shape" in rows["c0003"]["reason"]
    rnd = read_csv(tmp_path / "run" / "rounds.csv")
    assert len(rnd) == 1
    assert (rnd[0]["clients_ok"], rnd[0]["clients_failed"], rnd[0]["clients_dropped"]) == \
        ("1", "3", "0")
    assert float(rnd[0]["accuracy"]) > 0.1
    # independently: the only accepted client's own training is the new global model
    ref = make_strategy(cfg, spec)
    ref.initialize()
    c0 = good[0]
    info = ClientInfo(c0.client_id, c0.device, c0.num_samples)
    task = ref.configure_fit(1, [info])[0]
    mine = decode_update(run_task(task, c0.x, c0.y).update).absolute(ref.weights)
    final = load_npz(tmp_path / "run" / "final_model.npz")
    for k, v in mine.items():
        np.testing.assert_allclose(final[k], v, rtol=0, atol=1e-7, err_msg=k)


def test_error_result_and_too_few_clients_keep_the_model(tmp_path, data):
    ds, parts, spec = data
    cfg = cfg_of(min_clients=2)
    good = sim_clients(cfg, data)
    # a shard of the wrong image size: run_task reports the error in its result
    bad = [SimulatedClient(c.client_id, c.device, np.zeros((5, 1, 4, 4), np.float32),
                           np.zeros(5, np.int64)) for c in good[1:]]
    fed(cfg, tmp_path / "run", data, clients=[good[0]] + bad).run()
    rows = {r["client_id"]: r for r in read_csv(tmp_path / "run" / "clients.csv")}
    assert all(rows[c.client_id]["status"] == "failed" for c in bad)
    assert all(rows[c.client_id]["reason"] for c in bad)
    assert rows["c0000"]["status"] == "ok"
    assert "not aggregated: 1 ok < min_clients 2" in rows["c0000"]["reason"]
    init = make_strategy(cfg, spec)
    init.initialize()
    final = load_npz(tmp_path / "run" / "final_model.npz")
    for k, v in init.weights.items():
        assert np.array_equal(final[k], v), k


def test_dropouts_have_reasons_and_costs_follow_the_profiles(tmp_path, data):
    from hwmodel.estimator import budget

    ds, parts, spec = data
    cfg = cfg_of(rounds=2, fleet={"availability": 0.5})
    f = fed(cfg, tmp_path / "run", data)
    f.run()
    rows = read_csv(tmp_path / "run" / "clients.csv")
    assert len(rows) == 8      # every sampled client of every round has its row
    dropped = [r for r in rows if r["status"] == "dropped"]
    assert dropped and all(r["reason"] == "unavailable (availability 0.5)" for r in dropped)
    for r in rows:
        if r["status"] != "ok":
            continue
        assert r["time_provenance"] == r["energy_provenance"] == "estimated"
        assert r["bytes_provenance"] == "measured"
        assert r["host_wall_provenance"] == "measured-emulated" and float(r["host_wall_s"]) > 0
        # the cost model's round (compute + radio + idle while transferring), from hwmodel
        b = budget(spec, r["device"], sparsity=0.0, mode="dense", batch=32,
                   samples=int(r["num_samples"]), epochs=1, radio="wifi")
        assert float(r["energy_j"]) == pytest.approx(b.energy_per_round_j, rel=0.02)
        assert float(r["time_s"]) == pytest.approx(b.time_per_round_s, rel=0.02)
    rounds = read_csv(tmp_path / "run" / "rounds.csv")
    for rr in rounds:
        mine = [r for r in rows if r["round"] == rr["round"]]
        ok = [r for r in mine if r["status"] == "ok"]
        assert int(rr["clients_dropped"]) == sum(r["status"] == "dropped" for r in mine)
        assert float(rr["energy_j"]) == pytest.approx(sum(float(r["energy_j"]) for r in ok))
        assert int(rr["uplink_bytes"]) == sum(int(r["uplink_bytes"]) for r in ok)
        assert float(rr["round_time_s"]) == max((float(r["time_s"]) for r in ok), default=0.0)
    # a deadline no client can meet: all stragglers, nothing aggregated, still evaluated
    cfg2 = cfg_of(fleet={"deadline_s": 1e-6})
    f2 = fed(cfg2, tmp_path / "late", data)
    f2.run()
    rows2 = read_csv(tmp_path / "late" / "clients.csv")
    assert all(r["status"] == "dropped" and r["reason"].startswith("straggler")
               for r in rows2)
    assert read_csv(tmp_path / "late" / "rounds.csv")[0]["accuracy"] != ""


def test_existing_run_dir_is_not_overwritten(tmp_path, data):
    from fl_core.federation import RunDirError

    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(RunDirError, match="already exists"):
        fed(cfg_of(), out, data).run()
    assert (out / "keep.txt").read_text() == "precious"
    fed(cfg_of(), out, data).run(force=True)
    assert not (out / "keep.txt").exists() and (out / "summary.json").is_file()


class CtrlC(SimulatedClient):
    def fit(self, task):
        if task.round == 2:
            raise KeyboardInterrupt
        return super().fit(task)


def test_workers_equal_in_process_and_ctrl_c_then_resume_is_exact(tmp_path, data, pool):
    """zerofl for 3 rounds in worker processes; the same run in-process interrupted by Ctrl-C
    in round 2 and resumed from its checkpoint: bitwise the same final model and metrics."""
    import json

    cfg = cfg_of(rounds=3, clients_per_round=3, strategy={"name": "zerofl", "sparsity": 0.8},
                 fleet={"availability": 0.8})
    a = fed(cfg, tmp_path / "a", data, pool=pool)
    assert all(c.pool is pool for c in a.clients)
    a.run()
    b = fed(cfg, tmp_path / "b", data, clients=sim_clients(cfg, data, CtrlC))
    with pytest.raises(KeyboardInterrupt):
        b.run()
    summ = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert summ["status"] == "interrupted" and summ["rounds_completed"] == 1
    assert not (tmp_path / "b" / "final_model.npz").exists()
    assert b.ckpt.rounds() == [1]
    fed(cfg, tmp_path / "b", data, clients=sim_clients(cfg, data)).run(resume=True)
    fa, fc = load_npz(tmp_path / "a" / "final_model.npz"), load_npz(tmp_path / "b" /
                                                                    "final_model.npz")
    assert fa.keys() == fc.keys()
    for k in fa:
        assert fa[k].tobytes() == fc[k].tobytes(), k
    ra, rc = read_csv(tmp_path / "a" / "rounds.csv"), read_csv(tmp_path / "b" / "rounds.csv")
    assert [r["round"] for r in rc] == ["1", "2", "3"]
    for col in ("accuracy", "loss", "energy_j", "uplink_bytes", "clients_ok", "clients_dropped"):
        assert [r[col] for r in ra] == [r[col] for r in rc], col
    keys = [(r["round"], r["client_id"]) for r in read_csv(tmp_path / "b" / "clients.csv")]
    assert len(keys) == len(set(keys)) == 9


def test_hung_worker_is_killed_and_replaced(data, pool):
    ds, parts, spec = data
    cfg = cfg_of(train={"epochs": 2000})
    st = make_strategy(cfg, spec)
    st.initialize()
    task = st.configure_fit(1, [ClientInfo("slow", "rpi4", len(parts[0]))])[0]
    job = pack_job(task.to_bytes(), ds.x[parts[0]], ds.y[parts[0]], "measured-emulated")
    before = pool.restarts
    pool.timeout_s = 0.5
    try:
        (data_, wall, err), = pool.run([job])
    finally:
        pool.timeout_s = 120
    assert data_ is None and "timeout" in err and wall >= 0.5
    assert pool.restarts == before + 1
    # the pool carries on with a fresh worker
    st2 = make_strategy(cfg_of(), spec)
    st2.initialize()
    quick = st2.configure_fit(1, [ClientInfo("quick", "rpi4", len(parts[0]))])[0]
    (res, _, err2), = pool.run([pack_job(quick.to_bytes(), ds.x[parts[0]], ds.y[parts[0]],
                                         "measured-emulated")])
    assert err2 is None and ClientResult.from_bytes(res).ok


def test_strategy_may_train_a_subset_and_budgets_reach_the_strategy(tmp_path, data):
    """A strategy that configures fewer clients than sampled (as FLASH's hunting round does):
    the others are recorded as not selected, and the round aggregates what was chosen."""
    from fl_core.strategies import FedAvg

    ds, parts, spec = data
    seen = []

    class FirstOnly(FedAvg):
        def configure_fit(self, rnd, clients):
            seen.append([(c.client_id, c.energy_budget_j) for c in clients])
            return super().configure_fit(rnd, clients[:1])

    cfg = cfg_of(rounds=2, min_clients=3, fleet={"round_energy_budget_j": 50.0})
    st = FirstOnly(spec, rounds=2, seed=cfg.seed, train=cfg.train_config())
    f = fed(cfg, tmp_path / "run", data, strategy=st)
    f.run()
    rows = read_csv(tmp_path / "run" / "clients.csv")
    r1 = [r for r in rows if r["round"] == "1"]
    assert [r["status"] for r in r1] == ["ok", "dropped", "dropped", "dropped"]
    assert all(r["reason"] == "not selected by the strategy (fedavg) this round" for r in r1[1:])
    assert r1[0]["reason"] == ""        # aggregated although min_clients is 3
    assert all(b == 50.0 for rnd in seen for _, b in rnd)
    init = make_strategy(cfg, spec)
    init.initialize()
    final = load_npz(tmp_path / "run" / "final_model.npz")
    assert any(not np.array_equal(final[k], v) for k, v in init.weights.items())


def test_battery_share_is_the_round_budget():
    cfg = cfg_of(rounds=4, fleet={"devices": {"pixel4": 1.0}, "battery_pct": 1.0,
                                  "round_energy_budget_j": 1e6})
    from fl_core.fleet import Fleet

    f = Federation.__new__(Federation)
    f.cfg, f.fleet = cfg, Fleet(cfg.fleet, 4, cfg.seed)
    left = f.fleet.battery_left_j[0]
    assert f.energy_budget(1, 0) == pytest.approx(left / 4)
    f.fleet.spend(0, left / 2)
    assert f.energy_budget(3, 0) == pytest.approx(left / 2 / 2)
