"""Boards end to end: `sparsefl board emulate` (the real agent in its own process on a pty pair),
BoardClient and the `sparsefl board` commands against it.

The emulated agent shares Numba's on-disk cache with the rest of the suite (NUMBA_CACHE_DIR=""
= beside the sources), so the kernels compile once. Models are tiny (mlp)."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from dataclasses import replace

import numpy as np
import pytest

import hwmodel
from embedded import codec
from embedded.network import Network
from embedded.protocol import MSG
from embedded.protocol.messages import ERR, decode_message, encode_payload
from embedded.protocol.transport import RemoteError
from embedded.task import ClientResult, ClientTask, run_task
from embedded.train import TrainConfig
from fl_core import cli
from fl_core.board_client import BoardClient, EmulatedBoard, board_dir

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPEC = hwmodel.build("mlp", hidden=(32,))


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """SPARSEFL_HOME for this module (where tokens, calibrations and windows go)."""
    d = tmp_path_factory.mktemp("sparsefl-home")
    old = {k: os.environ.get(k) for k in ("SPARSEFL_HOME", "NUMBA_CACHE_DIR")}
    os.environ["SPARSEFL_HOME"] = str(d)
    os.environ["NUMBA_CACHE_DIR"] = ""       # Numba's default cache, shared with the suite
    yield d
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="module")
def emu(home, tmp_path_factory):
    """`sparsefl board emulate` in its own process: yields (host path, board uuid, agent pid)."""
    root = tmp_path_factory.mktemp("data-root")
    env = dict(os.environ, PYTHONPATH=REPO)
    proc = subprocess.Popen([sys.executable, "-m", "fl_core.cli", "board", "emulate",
                             "--data-root", str(root)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        r, _, _ = select.select([proc.stdout], [], [], 60)
        assert r, "sparsefl board emulate printed nothing"
        # both lines are printed together (readline buffers: no select between them)
        lines = [proc.stdout.readline().decode().strip() for _ in range(2)]
        path = lines[0]
        assert path.startswith("/dev/"), lines
        uuid = lines[1].split()[2]
        pid = int(lines[1].split("agent pid ")[1].split(")")[0].split(",")[0])
        yield path, uuid, pid, root
        proc.terminate()                      # SIGTERM: emulate stops its agent and exits 0
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:           # its agent gets SIGTERM from PR_SET_PDEATHSIG
            proc.kill()
            proc.wait(timeout=10)
        for s in (proc.stdout, proc.stderr):
            s.close()


def run_cli(capsys, *argv: str) -> tuple[int, str]:
    capsys.readouterr()
    code = cli.main(["board", *argv])
    return code, capsys.readouterr().out


def make_task(steps: int = 4, seed: int = 3, rnd: int = 1, spec=SPEC) -> ClientTask:
    net = Network.from_spec(spec, seed=1)
    return ClientTask(round=rnd, client_id="c0", seed=seed, spec=spec,
                      global_state=codec.encode_state(net.state_dict()),
                      train=TrainConfig(lr=0.05, batch_size=8, max_steps=steps, threads=1,
                                        epochs=1 + steps // 4))


def shard(n: int = 48, spec=SPEC) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return (rng.standard_normal((n, *spec.input_shape)).astype(np.float32),
            (np.arange(n) % 10).astype(np.int64))


def wait_reply(link, seq: int, payload: bytes, msg_type: int, timeout: float = 15.0):
    """Wait for the reply to ``seq``, re-asking every second (the agent's reply cache answers)."""
    end = time.monotonic() + timeout
    nxt = time.monotonic() + 1.0
    while time.monotonic() < end:
        for m in list(link.inbox):
            if m.seq == seq and m.is_reply and not m.duplicate:
                link.inbox.remove(m)
                return m
        if time.monotonic() > nxt:
            link.send_message(msg_type, seq, payload, 0)
            nxt = time.monotonic() + 1.0
        link.poll(0.05)
    raise AssertionError(f"no reply to seq {seq} within {timeout} s")


# --- probe / list ---------------------------------------------------------------------------------
def test_probe_pairs_with_no_further_step(emu, capsys):
    path, uuid, _, _ = emu
    code, out = run_cli(capsys, "probe", path, "--format", "json")
    info = json.loads(out)
    assert code == 0
    assert info["board_uuid"] == uuid and info["paired"] and info["emulated"] is True
    assert info["cores"] == os.cpu_count()
    # the token emulate registered is where the host looks, by UUID (mode 0600)
    tok = board_dir(uuid) / "token"
    assert tok.exists() and (tok.stat().st_mode & 0o777) == 0o600
    code, out = run_cli(capsys, "probe", path)
    assert code == 0 and uuid in out and "none (energy estimated)" in out
    assert json.loads(run_cli(capsys, "probe", path, "--format", "json")[1])["board_changed"] \
        is False


def test_a_different_board_behind_the_same_port_is_noticed(emu, capsys):
    from fl_core.board_client import remember_port
    path, uuid, _, _ = emu
    remember_port(path, "00000000-0000-4000-8000-000000000000")   # another board was here
    info = json.loads(run_cli(capsys, "probe", path, "--format", "json")[1])
    assert info["board_changed"] is True and info["board_uuid"] == uuid
    info = json.loads(run_cli(capsys, "probe", path, "--format", "json")[1])
    assert info["board_changed"] is False                           # now remembered


def test_pair_stores_the_token_where_commands_look(emu, capsys, tmp_path):
    path, uuid, _, _ = emu
    stored = board_dir(uuid) / "token"
    given = tmp_path / "board.token"
    given.write_bytes(stored.read_bytes())
    stored.unlink()
    assert cli.main(["board", "probe", path]) == 2
    assert f"no pairing token for board {uuid}" in capsys.readouterr().err
    code, out = run_cli(capsys, "pair", path, "--token-file", str(given))
    assert code == 0 and uuid in out
    assert stored.read_bytes().strip() == given.read_bytes().strip()
    assert (stored.stat().st_mode & 0o777) == 0o600
    assert run_cli(capsys, "probe", path)[0] == 0


def test_list_runs(capsys):
    code, out = run_cli(capsys, "list", "--format", "json")
    assert code == 0 and isinstance(json.loads(out), list)


def test_wrong_token_is_a_clear_error(emu, capsys, tmp_path):
    bad = tmp_path / "tok"
    bad.write_text("y" * 64)
    code = cli.main(["board", "probe", emu[0], "--token-file", str(bad)])
    assert code == 2
    assert "rejected the pairing token" in capsys.readouterr().err


# --- bench ------------------------------------------------------------------------------------------
def test_bench_measures_every_layer_beside_the_estimate(emu, capsys):
    code, out = run_cli(capsys, "bench", emu[0], "--model", "mlp", "--sparsity", "0.5",
                        "--batch", "8", "--repeats", "3", "--profile", "rpi4",
                        "--format", "json")
    assert code == 0
    rep = json.loads(out)
    assert rep["measured_provenance"] == "measured-emulated"   # host timings, never "measured"
    assert rep["profile"] == "rpi4" and rep["estimate_provenance"] == "estimated"
    rows = {(r["layer"], r["phase"]): r for r in rep["rows"]}
    spec = hwmodel.build("mlp")
    for layer in spec.weighted_layers():
        for ph in ("forward", "backward_weight", "update"):
            assert rows[(layer, ph)]["measured_s"] > 0 and rows[(layer, ph)]["repeats"] == 3
    # SWAT keeps the first layer and the classifier dense; fc2 ran at density ~0.5
    assert rows[("fc1", "forward")]["density"] == 1.0
    assert abs(rows[("fc2", "forward")]["density"] - 0.5) < 0.02
    # the estimate is hwmodel's prediction for that row under the profile; error = est/meas - 1
    from hwmodel.calibration import predict
    from hwmodel.measure import Measurement
    r = rows[("fc2", "forward")]
    m = Measurement("mlp", "fc2", "linear", "forward", r["density"], r["act_density"], 8, 1,
                    r["measured_s"], r["iqr_s"], 3)
    want = float(predict(hwmodel.load_profile("rpi4"), [m])[0])
    assert r["estimated_s"] == pytest.approx(want, rel=1e-9)
    assert r["error_pct"] == pytest.approx(100 * (want - r["measured_s"]) / r["measured_s"])
    used = [r for r in rep["rows"] if r["estimated_s"] is not None]
    assert rep["total"]["measured_s"] == pytest.approx(sum(r["measured_s"] for r in used))
    assert rep["total"]["estimated_s"] == pytest.approx(sum(r["estimated_s"] for r in used))
    code, out = run_cli(capsys, "bench", emu[0], "--model", "mlp", "--sparsity", "0",
                        "--batch", "4", "--repeats", "2")
    assert code == 0 and "fc2" in out and "estimate us" in out


# --- TRAIN ------------------------------------------------------------------------------------------
def test_train_is_bitwise_run_task_and_a_repeated_task_is_served_from_cache(emu):
    task = make_task()
    x, y = shard()
    bc = BoardClient(emu[0], timeout=1.0, train_timeout=60, profile="rpi4")
    try:
        runs0 = bc.request(MSG.INFO)["counters"].get("train_runs", 0)
        res = bc.fit(task, x, y)
        assert res.ok, res.error
        ref = run_task(task, x, y)
        assert res.update == ref.update and res.stats.losses == ref.stats.losses
        assert res.num_samples == ref.num_samples
        c = res.costs
        assert c["time_s"]["provenance"] == "measured-emulated"
        assert c["transfer_s"]["provenance"] == "measured" and c["transfer_s"]["value"] > 0
        assert c["transfer_s"]["value"] == pytest.approx(c["upload_s"]["value"]
                                                         + c["download_s"]["value"])
        assert c["energy_j"]["provenance"] == "estimated" and c["energy_j"]["value"] > 0
        # the federation's Client protocol; evaluate runs on the board, equal to in-process
        from fl_core.clients import Client
        assert isinstance(bc, Client)
        state = codec.decode_state(task.global_state)
        net = Network.from_spec(SPEC, seed=0)
        net.load_state_dict(state)
        assert bc.evaluate(state, SPEC) == net.evaluate(x, y, 256)
        # the same task again (a retransmitted TRAIN after a reconnect): the cached result
        # the board forgot everything (as after an agent restart): fit uploads again, once
        bc.request(MSG.RESET)
        again = bc.fit(task)
        assert again.ok and again.update == ref.update
        task_bytes = task.to_bytes()
        tid = "retransmitted-task"
        f = {"task_id": tid, "task": replace(task, data_ref=bc._uploaded["c0"]).to_bytes()}
        first = bc.request(MSG.TRAIN, f, timeout=30)
        bc.connect()                      # a new session: the agent's per-seq cache is gone
        again = bc.request(MSG.TRAIN, f, timeout=30)
        assert not first["cached"] and again["cached"]
        assert again["result"] == first["result"]
        assert ClientResult.from_bytes(first["result"]).update == ref.update
        runs = bc.request(MSG.INFO)["counters"]["train_runs"]
        assert runs == runs0 + 3   # fit, fit after RESET, the first TRAIN; the repeat trained nothing
        assert task.to_bytes() == task_bytes
    finally:
        bc.close()


def test_later_rounds_send_only_changed_tensors(emu):
    x, y = shard()
    bc = BoardClient(emu[0], timeout=1.0, train_timeout=60)
    try:
        t1 = make_task(rnd=1)
        r1 = bc.fit(t1, x, y)
        down1 = r1.costs["link_bytes_down"]["value"]
        # round 2: the server changed one tensor only
        st = codec.decode_state(t1.global_state)
        st["fc2.bias"] = st["fc2.bias"] + 0.5
        t2 = replace(t1, round=2, global_state=codec.encode_state(st))
        r2 = bc.fit(t2)
        assert r2.ok, r2.error
        ref = run_task(t2, x, y)
        assert r2.update == ref.update             # the board merged the change correctly
        assert r2.costs["link_bytes_down"]["value"] < down1 / 4
        # the board lost its resident model (RESET): the client falls back to the full state
        bc.request(MSG.RESET)
        st["fc1.bias"] = st["fc1.bias"] - 0.25
        t3 = replace(t1, round=3, global_state=codec.encode_state(st))
        bc._uploaded.clear()
        r3 = bc.fit(t3)
        assert r3.ok, r3.error
        assert r3.update == run_task(t3, x, y).update
    finally:
        bc.close()


def test_masked_feddst_rounds_with_resident_deltas_equal_run_task(emu):
    """A masked plan with a FedDST schedule: masks travel with every task, weights as deltas."""
    from embedded.mask_schedule import MaskSchedule
    from embedded.uplink import UplinkRule, encode_masks
    from hwmodel import SparsityPlan
    x, y = shard()
    g = Network.from_spec(SPEC, seed=1).state_dict()
    plan = SparsityPlan.erk(SPEC, 0.6, mode="masked", layers="all")
    masks = {}
    for n in plan.layers:
        w = g[f"{n}.weight"]
        k = round(plan.weight_density(n) * w.size)
        masks[n] = np.abs(w) >= np.sort(np.abs(w).ravel())[::-1][k - 1]
        g[f"{n}.weight"] = w * masks[n]
    t1 = replace(make_task(steps=5), plan=plan, uplink=UplinkRule("masked"),
                 schedule=MaskSchedule.feddst(0.3), global_state=codec.encode_state(g),
                 global_masks=encode_masks(masks))
    bc = BoardClient(emu[0], timeout=1.0, train_timeout=60)
    try:
        r1 = bc.fit(t1, x, y)
        assert r1.ok, r1.error
        assert r1.update == run_task(t1, x, y).update and r1.mask_events
        g2 = dict(g)
        g2["fc2.bias"] = g2["fc2.bias"] * 0.5
        m2 = {n: np.roll(m, 1) for n, m in masks.items()}
        t2 = replace(t1, round=2, global_state=codec.encode_state(g2),
                     global_masks=encode_masks(m2))
        r2 = bc.fit(t2)
        assert r2.ok, r2.error
        assert r2.update == run_task(t2, x, y).update
        assert r2.costs["link_bytes_down"]["value"] < r1.costs["link_bytes_down"]["value"] / 2
    finally:
        bc.close()


def test_abort_stops_a_running_train(emu):
    x, y = shard()
    bc = BoardClient(emu[0], timeout=1.0)
    try:
        bc.load_data("big", x, y)
        task = replace(make_task(steps=200_000), data_ref="big")
        link = bc.link
        seq = link.next_seq()
        payload = encode_payload({"task_id": "long-one", "task": task.to_bytes()})
        link.send_message(MSG.TRAIN, seq, payload, 0)
        time.sleep(1.5)                               # training has started
        rep = bc.request(MSG.ABORT)
        assert rep["aborted"] and rep["type"] == "TRAIN"
        m = wait_reply(link, seq, payload, MSG.TRAIN)
        err = decode_message(MSG.ERROR, True, m.payload)
        assert err["code"] == ERR.ABORTED
        done, total = (int(v) for v in err["message"].split("after ")[1].split(" steps")[0]
                       .split(" of "))
        assert 0 < done < total == 200_000
        assert bc.ping()["agent_time"] > 0            # the agent serves on
        # an aborted task left no cached result: the same task id trains again
        short = replace(task, train=replace(task.train, max_steps=2))
        rep = bc.request(MSG.TRAIN, {"task_id": "long-one", "task": short.to_bytes()},
                         timeout=30)
        assert not rep["cached"] and ClientResult.from_bytes(rep["result"]).stats.steps == 2
    finally:
        bc.close()


# --- LOAD_DATA ---------------------------------------------------------------------------------------
def test_load_data_from_the_data_root_and_path_traversal_refused(emu, tmp_path):
    path, _, _, root = emu
    x, y = shard(16)
    np.savez(root / "shard.npz", x=x, y=y)
    secret = tmp_path / "secret.npz"
    np.savez(secret, x=x, y=y)
    os.symlink(secret, root / "link.npz")
    bc = BoardClient(path, timeout=1.0)
    try:
        rep = bc.load_data_file("s", "shard.npz")
        assert rep["n"] == 16 and rep["x_shape"] == list(SPEC.input_shape)
        for bad in ("../secret.npz", "sub/../../secret.npz", str(secret), "link.npz",
                    "~/secret.npz"):
            with pytest.raises(RemoteError) as e:
                bc.load_data_file("s2", bad)
            assert e.value.code == ERR.REFUSED, bad
        with pytest.raises(RemoteError) as e:          # a pickled object array is refused
            np.save(root / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
            os.replace(root / "obj.npy", root / "obj.npz")
            bc.load_data_file("s3", "obj.npz")
        assert e.value.code == ERR.MALFORMED
        # a TRAIN can name the file directly as its data_ref
        task = replace(make_task(steps=2), data_ref="shard.npz")
        r = bc.fit(task)
        assert r.ok and r.update == run_task(replace(task, data_ref=None), x, y).update
    finally:
        bc.close()


def test_declared_sizes_are_checked_before_allocating(emu):
    bc = BoardClient(emu[0], timeout=1.0)
    try:
        from embedded.sensors.system import memory
        # 1.8e9 parameters: 29 GB for weights, gradients, momentum and masks
        huge = hwmodel.ModelSpec("huge", (60_000,),
                                 [hwmodel.make_node("fc", "linear", "input",
                                                    out_features=30_000)])
        if (memory()["available_bytes"] or 0) < 16 * huge.num_params():
            with pytest.raises(RemoteError) as e:
                bc.request(MSG.LOAD_MODEL, {"spec": huge.to_json(), "state": b""})
            assert e.value.code == ERR.TOO_LARGE and "free" in str(e.value)
        with pytest.raises(RemoteError) as e:
            bc.request(MSG.BENCH, {"model": "mlp", "sparsities": [1.5]})
        assert e.value.code == ERR.MALFORMED and "sparsities[0]" in str(e.value)
        with pytest.raises(RemoteError) as e:
            bc.request(MSG.TRAIN, {"task_id": "x", "task": b"SFCT" + bytes(20)})
        assert e.value.code == ERR.MALFORMED
    finally:
        bc.close()


# --- INFER_BENCH ---------------------------------------------------------------------------------
def test_infer_bench_times_a_tflite_model(emu):
    pytest.importorskip("ai_edge_litert")
    from embedded.tflite_export import export_tflite
    net = Network.from_spec(SPEC, seed=0)
    blob = export_tflite(SPEC, net.state_dict())
    bc = BoardClient(emu[0], timeout=1.0)
    try:
        rep = bc.infer_bench(blob, repeats=5)
        assert rep["status"] == "OK" and rep["median_s"] > 0 and rep["repeats"] == 5
        with pytest.raises(RemoteError) as e:
            bc.infer_bench(b"not a flatbuffer", repeats=1)
        assert e.value.code == ERR.MALFORMED and "TFL3" in str(e.value)
    finally:
        bc.close()


# --- calibrate, import-power -------------------------------------------------------------------
def test_calibrate_writes_a_loadable_measured_profile(emu, capsys, tmp_path):
    out = tmp_path / "my-board.toml"
    code, text = run_cli(capsys, "calibrate", emu[0], "--out", str(out), "--models", "mlp",
                         "--sparsities", "0,0.9", "--batch", "8", "--repeats", "3",
                         "--base", "rpi4")
    assert code == 0, text
    prof = hwmodel.load_profile(str(out))
    assert prof.calibrated and "efficiency.gemm" in prof.fitted
    for path in prof.fitted:
        assert prof.sources[path].startswith("measured:")
    assert prof.name.startswith("rpi4-board-")
    from hwmodel.measure import from_csv
    raw = from_csv((board_dir(emu[1]) / "calibration-measurements.csv").read_text())
    assert {m.model for m in raw} == {"mlp"} and {m.batch for m in raw} == {8}
    assert all(m.provenance == "measured-emulated" and m.repeats == 3 for m in raw)
    # cached per board: a BoardClient's energy estimate is now a calibrated estimate
    bc = BoardClient(emu[0], timeout=1.0, train_timeout=60)
    try:
        bc.connect()
        assert bc.cached_calibration() == prof
        x, y = shard()
        r = bc.fit(make_task(seed=11), x, y)
        assert r.costs["energy_j"]["provenance"] == "calibrated-estimate"
    finally:
        bc.close()


def test_import_power_attaches_measured_energy_to_windows(emu, capsys, tmp_path):
    path, uuid, _, _ = emu
    bc = BoardClient(path, timeout=1.0)
    try:
        bc.bench("mlp", [0.0], batch=4, repeats=2)
    finally:
        bc.close()
    wfile = board_dir(uuid) / "windows.jsonl"
    windows = [json.loads(s) for s in wfile.read_text().splitlines()]
    w = windows[-1]
    assert w["kind"] == "BENCH" and w["t_end"] > w["t_start"]
    # a synthetic meter log at 100 Hz: 5 V x 0.4 A idle, 5 V x 1.0 A inside the last window
    t = np.arange(w["t_start"] - 2.0, w["t_end"] + 2.0, 0.01)
    inside = (t >= w["t_start"]) & (t <= w["t_end"])
    for other in windows[:-1]:
        inside |= (t >= other["t_start"]) & (t <= other["t_end"])
    amps = np.where(inside, 1.0, 0.4)
    csv = tmp_path / "meter.csv"
    # times written exactly (repr): rounded to 0.1 ms, a sample within 0.05 ms of a window's
    # edge could land on the other side of it than its current says (a flaky idle power)
    csv.write_text("Time,Volts,Amps\n" + "".join(f"{a!r},5.0,{b}\n" for a, b in zip(t.tolist(), amps, strict=True)))
    code, out = run_cli(capsys, "import-power", str(csv), "--board", uuid, "--format", "json")
    assert code == 0
    got = [m for m in json.loads(out) if m["id"] == w["id"] and m["t_start"] == w["t_start"]][0]
    dur = w["t_end"] - w["t_start"]
    # 5 W over the window, 2 W idle; sampling at 10 ms blurs each edge by at most 3 W x 10 ms
    assert got["energy_j"] == pytest.approx(5.0 * dur, abs=0.07)
    assert got["idle_power_w"] == pytest.approx(2.0)
    assert got["dynamic_energy_j"] == pytest.approx(3.0 * dur, abs=0.07)
    assert got["energy_provenance"] == "measured"
    stored = [json.loads(s) for s in wfile.read_text().splitlines()][-1]
    assert stored["energy_provenance"] == "measured" and stored["energy_j"] == got["energy_j"]
    bad = tmp_path / "bad.csv"
    bad.write_text("time,volts,amps\n1,5,x\n")
    assert cli.main(["board", "import-power", str(bad), "--board", uuid]) == 2
    assert "bad.csv line 2" in capsys.readouterr().err


# --- a board that dies ---------------------------------------------------------------------------
def test_warmup_sensor_slowdown_and_agent_killed_mid_train(home, tmp_path):
    """One emulated board with --warmup, a fake Jetson INA3221 sysfs tree (real layout) and a
    slow-down profile: INFO says compiled, TRAIN energy is the sensor's, time is the profile's;
    then its agent is killed mid-TRAIN and the client fails within its timeout."""
    from test_sensors import orin_tree
    orin_tree(tmp_path)                                # VDD_IN: 5056 mV x 1232 mA, constant
    watts = 5.056 * 1.232
    x, y = shard()
    args = ["--warmup", "--warmup-models", "mlp", "--sensor", "jetson-ina3221",
            "--sysfs-root", str(tmp_path)]
    # neither TFLite runtime importable on this board: INFER_BENCH answers NOT_AVAILABLE
    shadow = tmp_path / "shadow"
    for mod in ("ai_edge_litert", "tflite_runtime"):
        (shadow / mod).mkdir(parents=True)
        (shadow / mod / "__init__.py").write_text(f"raise ImportError('no {mod} here')\n")
    with EmulatedBoard(profile="rpi4", agent_args=args, start_timeout=300,
                       env={"PYTHONPATH": str(shadow)}) as board:
        bc = BoardClient(board.path, timeout=0.5, retries=2, train_timeout=60.0)
        info = bc.connect()
        assert info["kernels_compiled"] is True
        assert [s["kind"] for s in info["sensors"]] == ["jetson-ina3221"]
        rep = bc.infer_bench(b"\x1c\0\0\0TFL3" + bytes(32), repeats=1)
        assert rep["status"] == "NOT_AVAILABLE" and "ai_edge_litert" in rep["reason"]
        # the profile slows TRAIN down to hwmodel's estimate on it: still measured-emulated
        small = make_task(steps=40)
        r = bc.fit(small, x, y)
        assert r.ok, r.error
        est = hwmodel.estimate(SPEC, "rpi4", plan=small.plan, batch=8,
                               samples=r.stats.samples, epochs=1, radio=None).totals.time_s
        assert r.costs["time_s"]["provenance"] == "measured-emulated"
        assert r.costs["time_s"]["value"] == pytest.approx(max(est, r.costs["compute_s"]["value"]))
        # energy from the board's sensor: constant power x the window
        w = json.loads((board_dir(board.board_uuid) / "windows.jsonl").read_text()
                       .splitlines()[-1])
        assert r.costs["energy_j"]["provenance"] == "measured"
        assert r.costs["energy_j"]["value"] == pytest.approx(watts * w["energy_window_s"],
                                                             rel=1e-6)
        assert w["energy_window_s"] == pytest.approx(w["t_end_board"] - w["t_start_board"],
                                                     abs=0.05)
        bc.train_timeout = 4.0
        box: dict = {}
        task = make_task(steps=200_000)

        def fit() -> None:
            box["result"] = bc.fit(task, x, y)

        th = threading.Thread(target=fit, daemon=True)
        th.start()
        time.sleep(2.0)
        os.kill(board.proc.pid, signal.SIGKILL)
        th.join(timeout=30)
        assert not th.is_alive(), "fit hung after the agent died"
        r = box["result"]
        assert not r.ok and "failed" in r.error and r.update == b""
        assert r.costs["time_s"]["value"] < 30
        bc.close()


# --- hostile payloads -----------------------------------------------------------------------------
def test_mutated_training_payloads_never_crash_the_agent(emu):
    """Structure-aware fuzzing of the training commands: valid payloads with flipped bytes
    (the frames themselves are valid). Every request gets a reply; the agent serves on."""
    import random
    rnd = random.Random(7)
    x, y = shard(16)
    task = replace(make_task(steps=2), data_ref="fz")
    seeds = {
        MSG.TRAIN: {"task_id": "fuzz", "task": task.to_bytes()},
        MSG.LOAD_DATA: {"name": "fz", "data": codec.encode_state({"x": x, "y": y})},
        MSG.LOAD_MODEL: {"spec": SPEC.to_json(),
                         "state": codec.encode_state(Network.from_spec(SPEC).state_dict())},
        MSG.BENCH: {"model": "mlp", "sparsities": [0.5], "batch": 2, "repeats": 1},
        MSG.EVAL: {"data": "fz", "batch_size": 8},
    }
    bc = BoardClient(emu[0], timeout=1.0)
    try:
        bc.load_data("fz", x, y)
        outcomes: dict[str, int] = {}
        internal: list[str] = []
        for i in range(120):
            typ = rnd.choice(list(seeds))
            f = dict(seeds[typ])
            key = rnd.choice(list(f))
            v = f[key]
            if isinstance(v, (bytes, str)):
                b = bytearray(v.encode() if isinstance(v, str) else v)
                for _ in range(rnd.randint(1, 4)):
                    b[rnd.randrange(len(b))] = rnd.randrange(256)
                v = bytes(b) if isinstance(v, bytes) else b.decode("utf-8", "replace")
            else:
                v = rnd.choice([-1, 1 << 40, "x", None, [1.5], 0.0])
            f[key] = v
            if typ == MSG.TRAIN:
                f["task_id"] = f"fuzz-{i}"
            try:
                bc.request(typ, f, timeout=20)
                outcomes["ok"] = outcomes.get("ok", 0) + 1
            except RemoteError as e:
                internal.append(str(e)) if e.code == ERR.INTERNAL else None
                outcomes[e.name] = outcomes.get(e.name, 0) + 1
            bc.request(MSG.ABORT)
        assert not internal, internal           # every refusal is a named, checked error
        assert outcomes.get("MALFORMED", 0) > 10 and outcomes.get("ok", 0) > 10, outcomes
        assert bc.ping()["agent_time"] > 0
        r = bc.fit(make_task(steps=2, seed=99), x, y)     # and still trains correctly
        assert r.ok and r.update == run_task(make_task(steps=2, seed=99), x, y).update
    finally:
        bc.close()


def test_train_over_a_faulty_line_is_bit_exact(home, tmp_path):
    """BoardClient through the fault-injecting relay (bit flips, drops, duplicates, latency, a
    921,600-baud line): the round's result is bitwise the in-process one, or the client fails
    cleanly — never a silently corrupted update."""
    from relay import Faults, Relay, spawn_agent, stop_agent
    token = b"f" * 32
    (tmp_path / "token").write_bytes(token)
    small = hwmodel.build("mlp", input_shape=(1, 8, 8), hidden=(16,))
    x, y = shard(32, small)
    # 3e-4 faults per byte: with 512-byte chunks (both sides) ~1 chunk in 7 needs a resend
    f = {"flip": 1e-4, "drop": 1e-4, "dup": 1e-4, "latency": 0.002, "baud": 921600}
    with Relay(Faults(**f), Faults(**f), seed=3) as relay:
        proc, line = spawn_agent(["--port", relay.a_path, "--token-file", str(tmp_path / "token"),
                                  "--sensor", "none", "--emulated", "--chunk-size", "512"],
                                 str(tmp_path / "state"))
        try:
            bc = BoardClient(relay.b_path, token=token, timeout=1.0, retries=8,
                             train_timeout=120, chunk_size=512)
            task = make_task(steps=4, seed=21, spec=small)
            results = [bc.fit(task, x, y), bc.fit(replace(task, seed=22))]
            ref = [run_task(task, x, y), run_task(replace(task, seed=22), x, y)]
            for r, want in zip(results, ref, strict=True):
                assert r.ok, r.error
                assert r.update == want.update
            d = (relay.down, relay.up)                 # the line really was faulty
            assert sum(x.flipped + x.dropped + x.duplicated for x in d) > 5
            bc.close()
        finally:
            stop_agent(proc)
