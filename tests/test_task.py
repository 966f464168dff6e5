"""ClientTask / ClientResult containers and run_task end to end on a tiny model with digits."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

import hwmodel
from embedded import codec
from embedded.mask_schedule import MaskSchedule
from embedded.task import (
    _NET_CACHE,
    MAX_BLOB,
    RESULT_MAGIC,
    TASK_MAGIC,
    ClientResult,
    ClientTask,
    TaskError,
    run_task,
)
from embedded.train import TrainConfig, TrainStats, train_local
from embedded.uplink import UplinkRule, decode_update, encode_masks
from hwmodel import SparsityPlan

SPEC = hwmodel.build("mlp", input_shape=(1, 8, 8), hidden=(32, 32), num_classes=10)


def _task(**kw) -> ClientTask:
    base = dict(round=3, client_id="c7", seed=11, spec=SPEC, global_state=b"\x01\x02state",
                train=TrainConfig(lr=0.05, batch_size=16, epochs=1, seed=0),
                plan=SparsityPlan.uniform(SPEC, 0.5, mode="swat"),
                uplink=UplinkRule("topk_weights", mask_ratio=0.1),
                schedule=MaskSchedule.feddst(0.2, at_steps=(-2, -1)),
                global_masks=b"masks", data_ref="shard-7.npz")
    base.update(kw)
    return ClientTask(**base)


# ------------------------------------------------------------------------------ containers
def test_task_roundtrip():
    t = _task()
    b = t.to_bytes()
    assert b[:4] == TASK_MAGIC
    u = ClientTask.from_bytes(b)
    assert u == t
    t2 = _task(global_masks=None, data_ref=None)
    assert ClientTask.from_bytes(t2.to_bytes()) == t2


def test_result_roundtrip():
    stats = TrainStats(steps=3, samples=40, epochs=1.0, losses=[2.3, 2.1, 1.9], wall_s=0.5,
                       density={"fc2": 0.5})
    r = ClientResult(3, "c7", b"\x00update", 40, stats,
                     {"time_s": {"value": 0.6, "unit": "s", "provenance": "measured"},
                      "uplink_bytes": {"value": 8, "unit": "B", "provenance": "measured"}},
                     mask_events=[{"step": 2, "layer": "fc1", "pruned": 3, "grown": 3}])
    b = r.to_bytes()
    assert b[:4] == RESULT_MAGIC
    assert ClientResult.from_bytes(b) == r
    failed = ClientResult(3, "c7", error="TrainingDiverged: NaN loss at step 4")
    assert ClientResult.from_bytes(failed.to_bytes()) == failed


def _rebuild(header: dict, blobs: list[bytes], magic=TASK_MAGIC) -> bytes:
    hb = json.dumps(header).encode()
    out = magic + struct.pack("<HHI", 1, 0, len(hb)) + hb
    for b in blobs:
        out += struct.pack("<Q", len(b)) + b
    return out


def _header(b: bytes) -> dict:
    (n,) = struct.unpack_from("<I", b, 8)
    return json.loads(b[12:12 + n])


@pytest.mark.parametrize("mutate, match", [
    (lambda b: b"XXXX" + b[4:], "magic"),
    (lambda b: b[:4] + struct.pack("<H", 9) + b[6:], "version"),
    (lambda b: b[:8] + struct.pack("<I", 1 << 30) + b[12:], "header length"),
    (lambda b: b[:8] + struct.pack("<I", len(b)) + b[12:], "past the end"),
    (lambda b: b[:10], "shorter"),
    (lambda b: b[:-1], "remain"),
    (lambda b: b + b"\x00", "trailing"),
])
def test_malformed_task_bytes(mutate, match):
    with pytest.raises(TaskError, match=match):
        ClientTask.from_bytes(mutate(_task().to_bytes()))


def test_malformed_task_fields():
    good = _task().to_bytes()
    h = _header(good)
    blobs = [b"\x01\x02state", b"masks"]
    cases = [
        ({**h, "round": "3"}, "round"),
        ({**h, "seed": -1}, "seed"),
        ({**h, "client_id": True}, "client_id"),
        ({k: v for k, v in h.items() if k != "train"}, "train"),
        ({**h, "train": {**h["train"], "lr": -1}}, "lr"),
        ({**h, "spec": {**h["spec"], "nodes": "none"}}, "spec"),
        ({**h, "plan": {"mode": "masked", "layers": {"fc9": {"weight_density": 0.1,
                                                             "act_density": 1}}}}, None),
        ({**h, "uplink": {"kind": "gzip"}}, "uplink"),
        ({**h, "schedule": {"kind": "feddst", "alpha": 3}}, "alpha"),
        ({**h, "kind": "sparsefl.clientresult"}, "kind"),
        ({**h, "blobs": ["global_state", "global_state"]}, "blobs"),
        ({**h, "blobs": ["global_masks"]}, "global_state"),
    ]
    for header, match in cases:
        nb = len(header.get("blobs", []))
        data = _rebuild(header, blobs[:nb])
        if match is None:   # a plan naming an unknown layer parses; run_task rejects it
            ClientTask.from_bytes(data)
            continue
        with pytest.raises(TaskError, match=match):
            ClientTask.from_bytes(data)
    # a blob declaring a huge length is rejected before any allocation
    huge = _rebuild(h, []) + struct.pack("<Q", MAX_BLOB + 1)
    with pytest.raises(TaskError, match="over the limit"):
        ClientTask.from_bytes(huge)
    with pytest.raises(TaskError, match="expected bytes"):
        ClientTask.from_bytes("text")


def test_malformed_result_costs():
    r = ClientResult(1, "a", b"u", 3, None,
                     {"time_s": {"value": 1.0, "unit": "s", "provenance": "guessed"}})
    with pytest.raises(TaskError, match="provenance"):
        ClientResult.from_bytes(r.to_bytes())
    r.costs = {"time_s": {"value": "1", "unit": "s", "provenance": "measured"}}
    with pytest.raises(TaskError, match="numeric"):
        ClientResult.from_bytes(r.to_bytes())


# ------------------------------------------------------------------------------ run_task
def _digits():
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    return (x / 16.0).astype(np.float32).reshape(-1, 1, 8, 8), y.astype(np.int64)


def _global(seed: int = 0):
    from embedded.network import Network

    return Network.from_spec(SPEC, seed=seed).state_dict()


def _run(task, x, y):
    res = run_task(task, x, y)
    assert res.error is None, res.error
    return res


def test_run_task_fedavg_matches_direct_training_and_is_deterministic():
    from embedded.network import Network

    x, y = _digits()
    x, y = x[:160], y[:160]
    g = _global()
    cfg = TrainConfig(lr=0.05, batch_size=32, epochs=1)
    task = _task(plan=SparsityPlan.dense(), uplink=UplinkRule("dense"),
                 schedule=MaskSchedule.fixed(), global_masks=None,
                 global_state=codec.encode_state(g), train=cfg)
    res = ClientResult.from_bytes(_run(task, x, y).to_bytes())
    assert res.num_samples == 160 and res.stats.steps == 5
    upd = decode_update(res.update)
    # the same round by hand through the public training API
    net = Network.from_spec(SPEC, seed=42)
    net.load_state_dict(g)
    train_local(net, x, y, TrainConfig(lr=0.05, batch_size=32, epochs=1, seed=task.seed))
    for k, v in net.state_dict().items():
        if k in upd.tensors:
            np.testing.assert_array_equal(upd.tensors[k], v)
    # costs: real payload lengths, tagged
    assert res.costs["uplink_bytes"] == {"value": len(res.update), "unit": "B",
                                         "provenance": "measured"}
    assert res.costs["downlink_bytes"]["value"] == len(task.global_state)
    assert res.costs["time_s"]["provenance"] == "measured-emulated"
    assert run_task(task, x, y, provenance="measured").costs["time_s"]["provenance"] == "measured"
    # deterministic: same task -> same update bytes and losses (cached network reused)
    again = _run(ClientTask.from_bytes(task.to_bytes()), x, y)
    assert again.update == res.update and again.stats.losses == res.stats.losses
    assert len(_NET_CACHE) >= 1


def test_run_task_zerofl_topk_weights():
    x, y = _digits()
    plan = SparsityPlan.uniform(SPEC, 0.9, mode="swat")      # fc2 only (not first/classifier)
    assert list(plan.layers) == ["fc2"]
    task = _task(plan=plan, uplink=UplinkRule("topk_weights", mask_ratio=0.1),
                 schedule=MaskSchedule.fixed(), global_masks=None,
                 global_state=codec.encode_state(_global()),
                 train=TrainConfig(lr=0.05, batch_size=32, max_steps=4))
    res = _run(task, x[:200], y[:200])
    upd = decode_update(res.update)
    w = upd.tensors["fc2.weight"]
    assert np.count_nonzero(w) == round(0.2 * w.size)       # K = (1 - 0.9 + 0.1) * N
    assert upd.sparsified == {"fc2.weight"}
    assert np.count_nonzero(upd.tensors["fc1.weight"]) == upd.tensors["fc1.weight"].size


def _masked_task(schedule, **kw):
    g = _global()
    plan = SparsityPlan.erk(SPEC, 0.6, mode="masked", layers="all")
    masks = {}
    for n in plan.layers:
        w = g[f"{n}.weight"]
        k = round(plan.weight_density(n) * w.size)
        thr = np.sort(np.abs(w).ravel())[::-1][k - 1]
        masks[n] = np.abs(w) >= thr
        g[f"{n}.weight"] = w * masks[n]
    task = _task(plan=plan, uplink=UplinkRule("masked"), schedule=schedule,
                 global_state=codec.encode_state(g), global_masks=encode_masks(masks), **kw)
    return task, masks


def test_run_task_feddst_readjusts_and_sends_the_new_mask():
    x, y = _digits()
    task, masks = _masked_task(MaskSchedule.feddst(0.3),
                               train=TrainConfig(lr=0.05, batch_size=32, max_steps=5))
    res = _run(task, x[:300], y[:300])
    assert {e["layer"] for e in res.mask_events} == set(task.plan.layers)
    upd = decode_update(res.update, shapes=SPEC.param_shapes(), global_masks=masks)
    assert upd.mask_sent == set(task.plan.layers)
    for n in task.plan.layers:
        new = upd.masks[n]
        assert new.sum() == masks[n].sum() and not np.array_equal(new, masks[n])
        grown = new & ~masks[n]
        assert np.all(upd.tensors[f"{n}.weight"][grown] == 0)   # readjusted after the last step
        assert np.all(upd.tensors[f"{n}.weight"][~new] == 0)
    # no readjustment this round: the mask stays and does not travel
    fixed, _ = _masked_task(MaskSchedule.feddst(0.3, readjust=False),
                            train=TrainConfig(lr=0.05, batch_size=32, max_steps=5))
    res2 = _run(fixed, x[:300], y[:300])
    upd2 = decode_update(res2.update, global_masks=masks)
    assert upd2.mask_sent == frozenset() and len(res2.update) < len(res.update)


def test_run_task_reports_failures():
    x, y = _digits()
    task, _ = _masked_task(MaskSchedule.fixed(), train=TrainConfig(max_steps=2))
    no_masks = _task(plan=task.plan, global_state=task.global_state, global_masks=None,
                     uplink=UplinkRule("masked"), schedule=MaskSchedule.fixed(),
                     train=TrainConfig(max_steps=2))
    res = run_task(no_masks, x[:64], y[:64])
    assert not res.ok and "global mask" in res.error and res.update == b""
    bad = run_task(task, x[:64, :, :4], y[:64])
    assert not bad.ok and "shape" in bad.error
    with pytest.raises(Exception, match="shape"):
        run_task(task, x[:64, :, :4], y[:64], raise_errors=True)


def test_run_task_flash_dst_masked_uplink_is_seeded():
    x, y = _digits()
    task, masks = _masked_task(MaskSchedule.flash_dst(0.25, interval=2),
                               train=TrainConfig(lr=0.05, batch_size=32, max_steps=6))
    a = _run(task, x[:300], y[:300])
    b = _run(task, x[:300], y[:300])
    assert a.update == b.update                      # the task seed drives the random regrow
    other = _run(_masked_task(MaskSchedule.flash_dst(0.25, interval=2),
                              train=TrainConfig(lr=0.05, batch_size=32, max_steps=6),
                              seed=12)[0], x[:300], y[:300])
    assert other.update != a.update
    upd = decode_update(a.update, shapes=SPEC.param_shapes(), global_masks=masks)
    assert upd.mask_sent == set(task.plan.layers)
    for n in task.plan.layers:
        assert upd.masks[n].sum() == masks[n].sum()


def test_lazy_exports():
    import embedded

    assert embedded.UplinkRule is UplinkRule and embedded.run_task is run_task
    assert embedded.MaskSchedule is MaskSchedule and embedded.ClientTask is ClientTask
