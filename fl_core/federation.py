"""The federation loop: sample, configure, train, validate, aggregate, evaluate, checkpoint.

Per round ``r`` (1-based):

1. sample ``clients_per_round`` of the N clients without replacement (the run's generator);
2. drop the sampled clients that are offline (:meth:`Fleet.availability`, same generator);
3. ``strategy.configure_fit`` the rest; estimate each task on its device and drop stragglers
   and clients over their energy or battery budget (:meth:`Fleet.budget_check`);
4. run the tasks (simulated clients in parallel workers); a result that is an error, raises,
   holds a non-finite value, a tensor of the wrong shape or an unknown tensor is **failed**
   and rejected; the others are **ok**;
5. if at least ``min_clients`` are ok (or all the strategy chose, when it trains a subset
   on purpose, like FLASH's hunting round), ``strategy.aggregate_fit`` folds them in (else
   the global model is kept and the round says so in ``clients.csv``);
6. evaluate the global model on the held-out test set every ``eval_every`` rounds and at the
   last round; append the round to ``rounds.csv`` / ``clients.csv``;
7. checkpoint atomically: strategy state (weights, masks, momentum, ...), the generator state,
   the fleet's battery state and the log rows so far.

``resume`` reloads the newest intact checkpoint, rewrites the CSVs to its rows and continues;
since everything random is drawn from checkpointed generators or seeded per (seed, round,
client), a resumed run ends bitwise equal to an uninterrupted one (same seed and threads).
Ctrl-C keeps the last round's checkpoint and writes a partial summary and report.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from embedded.task import ClientResult, ClientTask
from hwmodel.provenance import Provenance

from .clients import (
    Client,
    SimulatedClient,
    WorkerPool,
    estimate_task,
    evaluate_state,
    run_clients,
    worker_count,
)
from .config import ConfigError, RunConfig, resolved_toml
from .fleet import Fleet
from .hybrid import BoardSet, parse_boards, sparsities_of
from .runlog import (
    Checkpointer,
    RunLog,
    atomic_write_text,
    fresh_dir,
    machine,
    versions,
    write_final_model,
    write_summary,
)
from .strategies.base import ClientInfo, Strategy

CHECKPOINT_VERSION = 1


class RunDirError(ValueError):
    """The output directory cannot be used (exists without --force, or nothing to resume)."""


@dataclass
class RoundOutcome:
    """What one round produced (also the progress bar's figures)."""

    round: int
    row: dict[str, Any]
    clients: list[dict[str, Any]] = field(default_factory=list)


# ------------------------------------------------------------------------------ set-up
def build_spec(cfg: RunConfig, dataset: Any) -> Any:
    """The model for the dataset (builder options num_classes / input_shape from the data)."""
    from hwmodel.models import BUILDERS, build, load_model

    name = cfg.model["name"]
    if name in BUILDERS:
        try:
            return build(name, num_classes=dataset.num_classes,
                         input_shape=tuple(dataset.input_shape))
        except ValueError as e:
            raise ConfigError(f"[model] name {name!r} does not fit dataset "
                              f"{dataset.name!r}: {e}") from None
    return load_model(name)


def make_strategy(cfg: RunConfig, spec: Any) -> Strategy:
    """The configured strategy from the registry in :mod:`fl_core.strategies`."""
    try:
        from .strategies import make_strategy as _make  # type: ignore[attr-defined]
    except ImportError:
        raise ConfigError("the strategy registry (fl_core.strategies.make_strategy) is not "
                          "available") from None
    try:
        return _make(cfg.strategy_name, spec, rounds=cfg.rounds, seed=cfg.seed,
                     train=cfg.train_config(), **cfg.strategy_params)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"[strategy] {cfg.strategy_name}: {e}") from None


def load_data(cfg: RunConfig) -> tuple[Any, list[np.ndarray]]:
    """The dataset and its partition over ``[data] num_clients`` clients."""
    from .data import load_dataset, make_partition

    d = cfg.data
    ds = load_dataset(d.name, d.path or None, **d.options)
    parts = make_partition(d.partition, ds.y, d.num_clients, seed=cfg.seed, alpha=d.alpha,
                           k=d.k, groups=ds.groups)
    if len(parts) != d.num_clients:
        raise ConfigError(f"[data] num_clients: the {d.partition!r} partition made "
                          f"{len(parts)} clients, not {d.num_clients}")
    empty = [i for i, p in enumerate(parts) if len(p) == 0]
    if empty:
        raise ConfigError(f"[data] partition {d.partition!r} left client(s) {empty[:5]} "
                          "without samples; use fewer clients or a larger alpha")
    return ds, parts


def _value(res: ClientResult, q: str) -> float | None:
    c = res.costs.get(q)
    return None if c is None else float(c["value"])


def _prov(res: ClientResult, q: str) -> str:
    c = res.costs.get(q)
    return "" if c is None else str(c["provenance"])


# ------------------------------------------------------------------------------ validation
def check_result(res: ClientResult, task: ClientTask, strategy: Strategy,
                 info: ClientInfo | None = None) -> str | None:
    """Why a client's result must be rejected (None if it is acceptable).

    Uses the strategy's own ``check_result(client, result)`` when it has one (it decodes
    against each client's masks); otherwise decodes the update against the global masks.
    """
    from embedded.uplink import decode_update

    if not res.ok:
        return res.error or "error"
    if res.client_id != task.client_id or res.round != task.round:
        return (f"result is for client {res.client_id!r} round {res.round}, expected "
                f"{task.client_id!r} round {task.round}")
    if res.num_samples <= 0:
        return f"num_samples {res.num_samples} (expected > 0)"
    own = getattr(strategy, "check_result", None)
    if own is not None and info is not None:   # the strategy knows its clients' masks
        return own(info, res)
    try:
        upd = decode_update(res.update, shapes=task.spec.param_shapes(),
                            global_masks=strategy.masks)
    except ValueError as e:
        return f"undecodable update: {e}"
    state = strategy.weights
    for name, t in upd.tensors.items():
        if name not in state:
            return f"update holds unknown tensor {name!r}"
        if tuple(np.shape(t)) != tuple(np.shape(state[name])):
            return (f"update tensor {name!r} has shape {tuple(np.shape(t))}, expected "
                    f"{tuple(np.shape(state[name]))}")
        a = np.asarray(t)
        if a.dtype.kind == "f" and not np.isfinite(a).all():
            return f"update tensor {name!r} holds non-finite values (NaN/inf)"
    return None


# ------------------------------------------------------------------------------ the loop
class Federation:
    """One run: data, fleet, clients, strategy, log and checkpoints in ``out_dir``.

    ``strategy``, ``clients`` and ``dataset``/``parts`` may be given (tests, hybrid runs);
    otherwise they are built from ``cfg``. ``pool`` is a shared :class:`WorkerPool` (not
    closed here); without one, a pool of ``[fleet] workers`` processes is started and closed.
    """

    def __init__(self, cfg: RunConfig, out_dir: str | Path, *, strategy: Strategy | None = None,
                 clients: list[Client] | None = None, dataset: Any = None,
                 parts: list[np.ndarray] | None = None, pool: WorkerPool | None = None,
                 workers: int | None = None, progress: bool = False,
                 write_report: bool = True, boards: BoardSet | None = None,
                 label: str | None = None) -> None:
        self.cfg = cfg
        #: the run's name in comparisons (default: the strategy and its parameters)
        self.label = label
        self.out = Path(out_dir)
        self.progress = progress
        self.write_report = write_report
        self._own_pool = False
        self._own_boards = False
        self.pool = pool
        self.boards = boards
        try:
            self._setup(strategy, clients, dataset, parts, workers)
        except BaseException:
            self.close()
            raise

    def _setup(self, strategy: Strategy | None, clients: list[Client] | None, dataset: Any,
               parts: list[np.ndarray] | None, workers: int | None) -> None:
        cfg = self.cfg
        if dataset is None:
            dataset, parts = load_data(cfg)
        elif parts is None:
            raise ValueError("Federation: give parts= with dataset=")
        self.dataset = dataset
        self.spec = strategy.spec if strategy is not None else build_spec(cfg, dataset)
        n_test = cfg.data.test_samples or dataset.num_test
        self.x_test, self.y_test = dataset.x_test[:n_test], dataset.y_test[:n_test]
        if self.boards is None and cfg.fleet.boards and clients is None:
            self.boards = BoardSet(parse_boards(cfg.fleet.boards),
                                   calibration_repeats=cfg.fleet.calibration_repeats)
            self._own_boards = True
        #: the boards are clients 0 .. nb-1
        self.nb = nb = len(self.boards) if self.boards is not None else 0
        if self.boards is not None:
            self.boards.start([f"board{i}" for i in range(nb)])
        self.fleet = Fleet(cfg.fleet, cfg.data.num_clients, cfg.seed,
                           fixed_devices=self.boards.devices if self.boards is not None else ())
        #: client indices that train every round (boards with every_round), and the clients
        #: the rest of a round is sampled from
        self.always = [i for i, b in enumerate(self.boards.configs) if b.every_round] \
            if nb else []
        self._sample_from = np.array([i for i in range(cfg.data.num_clients)
                                      if i not in self.always])
        nw = worker_count(workers, cfg.fleet.workers)
        if self.pool is None and nw > 0 and clients is None:
            self.pool = WorkerPool(nw, timeout_s=cfg.fleet.timeout_s)
            self._own_pool = True
        pool = self.pool
        if clients is None:
            clients = []
            if self.boards is not None:
                clients += self.boards.attach([(dataset.x[p], dataset.y[p]) for p in parts[:nb]])
            clients += [SimulatedClient(f"c{i:04d}", self.fleet.devices[i], dataset.x[p],
                                        dataset.y[p], pool=pool, radio=cfg.fleet.radio)
                        for i, p in enumerate(parts) if i >= nb]
        if len(clients) != cfg.data.num_clients:
            raise ValueError(f"Federation: {len(clients)} clients for [data] num_clients "
                             f"{cfg.data.num_clients}")
        self.clients = clients
        self.strategy = strategy if strategy is not None else make_strategy(cfg, self.spec)
        self.rng = np.random.default_rng(cfg.seed)
        self.log = RunLog(self.out)
        self.ckpt = Checkpointer(self.out, keep=cfg.keep_checkpoints)
        self.start_round = 1
        self.elapsed_before = 0.0
        self.last_eval: dict[str, float] = {}

    def close(self) -> None:
        """Release what this run started: its worker pool and its boards (safe twice)."""
        if self._own_pool and self.pool is not None:
            self.pool.close()
            self.pool = None
        if self._own_boards and self.boards is not None:
            self.boards.close()

    # ------------------------------------------------------------------ boards
    def _calibrate_boards(self, resume: bool) -> None:
        """Calibrate each board class before round 1 (or reload it on resume) and price the
        simulated clients of a calibrated class with its profile."""
        if self.boards is None:
            return
        if resume and (self.out / "calibration").is_dir():
            profiles = self.boards.load(self.out)
        elif self.boards.profiles and not self._own_boards:
            profiles = self.boards.profiles      # calibrated by whoever shares the boards
        else:
            tc = self.cfg.train_config()
            profiles = self.boards.calibrate(self.spec, sparsities_of(self.cfg.strategy),
                                             batch=tc.batch_size, threads=tc.threads)
        self.boards.save(self.out)
        for cl in self.clients:
            prof = profiles.get(cl.device)
            if prof is not None and hasattr(cl, "profile"):
                cl.profile = prof

    def profile_of(self, c: int) -> Any:
        """The DeviceProfile object pricing client ``c`` (None: its shipped device profile)."""
        p = getattr(self.clients[c], "profile", None)
        return None if p is None or isinstance(p, str) else p

    # ------------------------------------------------------------------ run dir
    def prepare(self, resume: bool = False, force: bool = False) -> None:
        """Create the run directory (or reload it on resume); calibrate the boards."""
        self._prepare(resume, force)
        self._calibrate_boards(resume)

    def _prepare(self, resume: bool, force: bool) -> None:
        if resume:
            if not (self.out / "config.toml").is_file():
                raise RunDirError(f"{self.out}: not a run directory (no config.toml) to resume")
            ck = self.ckpt.load_latest()
            if ck is None:
                self.strategy.initialize()
                self.log.start()
                return
            self.restore(ck.meta, ck.arrays)
            return
        check_out_dir(self.out, force)
        fresh_dir(self.out)
        atomic_write_text(self.out / "config.toml", resolved_toml(self.cfg))
        self.strategy.initialize()
        self.log.start()

    # ------------------------------------------------------------------ checkpoints
    def checkpoint(self, rnd: int, elapsed: float) -> None:
        meta, arrays = self.strategy.state_dict()
        doc = {"version": CHECKPOINT_VERSION, "strategy_meta": meta,
               "rng": self.rng.bit_generator.state, "fleet": self.fleet.state_dict(),
               "log": {"rounds": self.log.rounds, "clients": self.log.clients},
               "last_eval": self.last_eval, "elapsed_s": elapsed}
        self.ckpt.save(rnd, doc, {f"s/{k}": v for k, v in arrays.items()})

    def restore(self, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        if meta.get("version") != CHECKPOINT_VERSION:
            raise RunDirError(f"checkpoint version {meta.get('version')!r} is not "
                              f"{CHECKPOINT_VERSION}")
        self.strategy.load_state_dict(meta["strategy_meta"],
                                      {k[2:]: v for k, v in arrays.items() if k.startswith("s/")})
        self.rng.bit_generator.state = meta["rng"]
        self.fleet.load_state_dict(meta["fleet"])
        self.log.start(meta["log"]["rounds"], meta["log"]["clients"])
        self.last_eval = dict(meta.get("last_eval") or {})
        self.elapsed_before = float(meta.get("elapsed_s", 0.0))
        self.start_round = int(meta["round"]) + 1

    # ------------------------------------------------------------------ one round
    def energy_budget(self, rnd: int, client: int) -> float | None:
        """The energy a client may spend in round ``rnd`` (told to the strategy, e.g. for
        hetero-FLASH's densities): the per-round budget, and with a battery budget an equal
        share of what is left over the remaining rounds; the smaller of the two."""
        budgets = []
        if self.cfg.fleet.round_energy_budget_j is not None:
            budgets.append(float(self.cfg.fleet.round_energy_budget_j))
        left = self.fleet.battery_left_j[client]
        if left is not None:
            budgets.append(max(0.0, left) / (self.cfg.rounds - rnd + 1))
        return min(budgets) if budgets else None

    def run_round(self, rnd: int) -> RoundOutcome:
        cfg = self.cfg
        if self.always:
            picked = self.rng.choice(self._sample_from,
                                     size=cfg.clients_per_round - len(self.always),
                                     replace=False)
            sampled = sorted(self.always + [int(i) for i in picked])
        else:
            sampled = sorted(int(i) for i in self.rng.choice(cfg.data.num_clients,
                                                             size=cfg.clients_per_round,
                                                             replace=False))
        nb = self.nb
        rows: dict[int, dict[str, Any]] = {}

        def base_row(c: int) -> dict[str, Any]:
            cl = self.clients[c]
            return {"round": rnd, "client_id": cl.client_id, "device": cl.device,
                    "num_samples": int(getattr(cl, "num_samples", 0))}

        avail = [c for c in sampled if c < nb]     # boards are plugged in: no availability draw
        for d in self.fleet.availability(rnd, [c for c in sampled if c >= nb], self.rng):
            if d.ok:
                avail.append(d.client)
            else:
                rows[d.client] = dict(base_row(d.client), status="dropped", reason=d.reason)
        infos = [ClientInfo(self.clients[c].client_id, self.clients[c].device,
                            int(getattr(self.clients[c], "num_samples", 0)),
                            energy_budget_j=self.energy_budget(rnd, c)) for c in avail]
        tasks = self.strategy.configure_fit(rnd, infos) if infos else []
        by_id = {t.client_id: t for t in tasks}
        unknown = sorted(set(by_id) - {i.client_id for i in infos})
        if unknown or len(by_id) != len(tasks):
            raise RuntimeError(f"strategy {self.strategy.name!r} configured tasks for clients "
                               f"it was not given or twice: {unknown or 'duplicates'}")
        run_c, run_t, run_i = [], [], []
        for c, info in zip(avail, infos, strict=True):
            task = by_id.get(info.client_id)
            if task is not None and c < nb and self.boards.data_ref(c):
                task = dataclasses.replace(task, data_ref=self.boards.data_ref(c))
            if task is None:   # e.g. FLASH's hunting rounds train a fraction of the clients
                rows[c] = dict(base_row(c), status="dropped",
                               reason=f"not selected by the strategy ({self.strategy.name}) "
                               "this round")
                continue
            # a board's round is measured, not predicted: it is not dropped on an estimate
            if c >= nb:
                down = len(task.global_state) + len(task.global_masks or b"")
                est = estimate_task(task, self.clients[c].device, max(1, info.num_samples),
                                    cfg.fleet.radio, down_bytes=down, profile=self.profile_of(c))
                dec = self.fleet.budget_check(c, est)
                if not dec.ok:
                    rows[c] = dict(base_row(c), status="dropped", reason=dec.reason,
                                   time_s=est["time_s"], time_provenance=est["provenance"],
                                   energy_j=est["energy_j"], energy_provenance=est["provenance"])
                    continue
            run_c.append(c)
            run_t.append(task)
            run_i.append(info)
        results = run_clients([self.clients[c] for c in run_c], run_t, self.pool)
        ok: list[tuple[ClientInfo, ClientResult]] = []
        for c, info, task, res in zip(run_c, run_i, run_t, results, strict=True):
            why = check_result(res, task, self.strategy, info)
            row = dict(base_row(c), status="ok" if why is None else "failed", reason=why or "")
            if res.stats is not None and getattr(res.stats, "losses", None):
                row["train_loss"] = float(np.mean(res.stats.losses))
            for q, col in (("flops", "flops"), ("time_s", "time"), ("energy_j", "energy"),
                           ("host_wall_s", "host_wall")):
                v = _value(res, q)
                if v is not None:
                    row[q] = v
                    row[f"{col}_provenance"] = _prov(res, q)
            row["uplink_bytes"] = int(_value(res, "uplink_bytes") or 0) if why is None else 0
            row["bytes_provenance"] = _prov(res, "uplink_bytes") or Provenance.MEASURED.value
            row["downlink_bytes"] = int(_value(res, "downlink_bytes") or
                                        len(task.global_state) + len(task.global_masks or b""))
            if c < nb:
                row.update(self._board_columns(c, task, res, info))
            rows[c] = row
            self.fleet.spend(c, _value(res, "energy_j") or 0.0)
            if why is None:
                ok.append((info, res))
        n_ok = len(ok)
        # a strategy that trains only a subset on purpose (FLASH's hunting round) needs only
        # that many; otherwise min_clients holds
        need = min(cfg.min_clients, len(tasks)) if len(tasks) < len(infos) else cfg.min_clients
        if n_ok >= need:
            self.strategy.aggregate_fit(rnd, ok)
        else:
            for c in run_c:
                if rows[c]["status"] == "ok":
                    rows[c]["reason"] = (f"round not aggregated: {n_ok} ok < min_clients "
                                         f"{need}")
        if rnd % cfg.eval_every == 0 or rnd == cfg.rounds:
            self.last_eval = evaluate_state(self.spec, self.strategy.weights, self.x_test,
                                            self.y_test, masks=self.strategy.masks)
            acc, loss = self.last_eval["accuracy"], self.last_eval["loss"]
        else:
            acc = loss = None
        client_rows = [rows[c] for c in sampled]
        okr = [r for r in client_rows if r["status"] == "ok"]
        ran = [r for r in client_rows if r["status"] != "dropped"]
        round_row = {
            "round": rnd, "accuracy": acc, "loss": loss,
            "flops": float(sum(r.get("flops", 0.0) for r in okr)),
            "energy_j": float(sum(r.get("energy_j", 0.0) for r in ran)),
            "round_time_s": float(max((r.get("time_s", 0.0) for r in okr), default=0.0)),
            "uplink_bytes": int(sum(r.get("uplink_bytes", 0) for r in okr)),
            "downlink_bytes": int(sum(r.get("downlink_bytes", 0) for r in ran)),
            "clients_ok": len(okr),
            "clients_failed": sum(r["status"] == "failed" for r in client_rows),
            "clients_dropped": sum(r["status"] == "dropped" for r in client_rows),
        }
        return RoundOutcome(rnd, round_row, client_rows)

    def _board_columns(self, c: int, task: ClientTask, res: ClientResult,
                       info: ClientInfo) -> dict[str, Any]:
        """A board's extra columns: its link and compute time (measured) and the cost model's
        estimate of the same task's compute on its class's (calibrated) profile."""
        bc = self.clients[c]
        out: dict[str, Any] = {"board": str(getattr(bc, "board_uuid", "") or "")}
        if _value(res, "compute_s") is not None:
            out["compute_s"] = _value(res, "compute_s")
        if _value(res, "transfer_s") is not None:
            out["transfer_s"] = _value(res, "transfer_s")
            out["transfer_provenance"] = _prov(res, "transfer_s")
        steps = res.stats.steps if (res.ok and res.stats is not None) else None
        if steps:
            est = estimate_task(task, bc.device, max(1, info.num_samples), None, 0, 0,
                                steps=steps, profile=self.profile_of(c))
            out.update(est_time_s=est["compute_time_s"], est_energy_j=est["compute_energy_j"],
                       est_provenance=est["provenance"])
        return out

    # ------------------------------------------------------------------ whole run
    def run(self, resume: bool = False, force: bool = False) -> dict[str, Any]:
        """Run (or resume) to the last round; returns the summary."""
        self.prepare(resume=resume, force=force)
        t0 = time.perf_counter()
        bar = None
        if self.progress:
            from tqdm import tqdm

            bar = tqdm(total=self.cfg.rounds, initial=self.start_round - 1, unit="round",
                       desc=f"{self.cfg.strategy_name}", dynamic_ncols=True)
        status = "completed"
        try:
            for rnd in range(self.start_round, self.cfg.rounds + 1):
                out = self.run_round(rnd)
                self.log.append(out.row, out.clients)
                self.checkpoint(rnd, self.elapsed_before + time.perf_counter() - t0)
                if bar is not None:
                    acc = self.last_eval.get("accuracy")
                    bar.set_postfix(clients=f"{out.row['clients_ok']}/"
                                    f"{self.cfg.clients_per_round}",
                                    acc="-" if acc is None else f"{acc:.3f}")
                    bar.update(1)
        except KeyboardInterrupt:
            status = "interrupted"
        finally:
            if bar is not None:
                bar.close()
            self.close()
        wall = self.elapsed_before + time.perf_counter() - t0
        summary = self.summary(status, wall)
        if status == "completed":
            write_final_model(self.out, self.strategy.weights, self.strategy.masks)
        write_summary(self.out, summary)
        if self.write_report:
            from .report import write_report

            try:
                write_report(self.out)
            except Exception as e:  # noqa: BLE001 - the run's data is safe; say why
                print(f"sparsefl: report not written: {type(e).__name__}: {e}")
        if status == "interrupted":
            raise KeyboardInterrupt
        return summary

    def summary(self, status: str, wall_s: float) -> dict[str, Any]:
        rounds, clients = self.log.rounds, self.log.clients
        by_dev: dict[str, float] = {}
        for r in clients:
            if r["status"] != "dropped":
                by_dev[r["device"]] = by_dev.get(r["device"], 0.0) + float(r.get("energy_j") or 0)
        evals = [r for r in rounds if r.get("accuracy") is not None]
        return {
            "status": status, "name": self.cfg.name, **({"label": self.label} if self.label else {}),
            "strategy": self.cfg.strategy_name,
            "strategy_params": self.cfg.strategy_params, "model": self.spec.name,
            "dataset": self.cfg.data.name, "seed": self.cfg.seed, "threads": self.cfg.threads,
            "rounds": self.cfg.rounds, "rounds_completed": len(rounds),
            "final_accuracy": evals[-1]["accuracy"] if evals else None,
            "final_loss": evals[-1]["loss"] if evals else None,
            "best_accuracy": max((r["accuracy"] for r in evals), default=None),
            "totals": {
                "energy_j": float(sum(r["energy_j"] for r in rounds)),
                "flops": float(sum(r["flops"] for r in rounds)),
                "uplink_bytes": int(sum(r["uplink_bytes"] for r in rounds)),
                "downlink_bytes": int(sum(r["downlink_bytes"] for r in rounds)),
                "clients_ok": int(sum(r["clients_ok"] for r in rounds)),
                "clients_failed": int(sum(r["clients_failed"] for r in rounds)),
                "clients_dropped": int(sum(r["clients_dropped"] for r in rounds)),
                "time_s": float(sum(r["round_time_s"] for r in rounds)),
            },
            "energy_j_by_device": by_dev,
            "boards": [dataclasses.asdict(r) for r in self.boards.records()]
            if self.boards is not None else [],
            "wall_time_s": wall_s,
            "versions": versions(), "machine": machine(),
            "config": json.loads(json.dumps(self.cfg.to_dict(), default=str)),
        }


def check_out_dir(out_dir: str | Path, force: bool = False) -> None:
    """Refuse an existing, non-empty run directory unless ``force`` (checked before any work)."""
    p = Path(out_dir)
    if p.exists() and (not p.is_dir() or any(p.iterdir())) and not force:
        raise RunDirError(f"{p} already exists; choose another --out, resume it with "
                          "--resume, or pass --force to replace it")


def open_run(cfg: RunConfig | None, out_dir: str | Path, resume: bool = False,
             force: bool = False, **kw: Any) -> Federation:
    """A Federation for a new run (``cfg``) or for resuming ``out_dir`` (its config.toml)."""
    from .config import load_config

    if not resume:
        check_out_dir(out_dir, force)

    if resume:
        path = Path(out_dir) / "config.toml"
        if not path.is_file():
            raise RunDirError(f"{out_dir}: not a run directory (no config.toml) to resume")
        cfg = load_config(path)
    if cfg is None:
        raise ValueError("open_run: a config is needed for a new run")
    return Federation(cfg, out_dir, **kw)


__all__ = ["Federation", "RoundOutcome", "RunDirError", "build_spec", "check_out_dir",
           "check_result",
           "load_data", "make_strategy", "open_run"]
