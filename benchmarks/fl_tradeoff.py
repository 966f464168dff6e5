"""The paper-direction table: accuracy vs client energy vs uplink for every method.

Fashion-MNIST (full: 60,000 train / 10,000 test), 100 clients, 10 per round, LDA alpha 1.0
(non-IID) and 1000 (about IID), 100 rounds, LeNet-5, one local epoch (SGD lr 0.05, momentum
0.9, weight decay 5e-4, batch 32) for:

* ``fedavg`` (dense);
* ``swat_fl`` at sparsity 0.9 and 0.95;
* ``zerofl`` at 0.9 and 0.95, each rule (topk_weights, diff_topk_weights, topk_diff) at mask
  ratio 0.1, and topk_weights also at mask ratio 0 and 0.2;
* ``feddst`` at 0.9 and 0.95; ``flash`` at density 0.1 and 0.05 (the same sparsities), with
  its sparse-aware init scale (``sparse_init = "fan_in"``, see ``fl_core.strategies.flash``;
  without it ``flash-s0.95`` stayed at chance on this BN-free LeNet-5).

Why LeNet-5 and not ``femnist_cnn``: at this size a round trains 10 x 600 samples; femnist_cnn
costs ~0.62 TFLOP a round (hwmodel's count: ~103 MFLOP per training sample), so 100 rounds x
34 runs would be ~2,100 TFLOP, days on 2 cores. LeNet-5 is ~2.3 MFLOP per training sample
(~0.014 TFLOP a round, 44x less), which keeps the whole table around an hour.

Energy, one run per configuration, re-estimated per device class (the cheaper honest way):
simulated training does not depend on the device a client is mapped to (no deadlines, no
energy budgets, availability 1), so every run uses a fleet of ``rpi4`` clients, and for each
successful client round the same cost function the loop uses
(:func:`fl_core.clients.estimate_task`: compute from the task's sparsity plan scaled to the
optimizer steps actually taken, plus the radio for the real up/down payloads) is evaluated for
every device class in ``--devices``. ``energy_j[rpi4]`` therefore equals the run's own
``totals.energy_j`` (checked and recorded as ``energy_check_rel``); ``energy_j[pixel4]`` is
what the same run would have cost on a fleet of Pixel 4s. Uplink MB is the encoded update
bytes actually produced (``totals.uplink_bytes``).

Resumable: results go to ``--out`` (JSON, rewritten atomically after each run) keyed by
``<config>|alpha=<a>|seed=<s>``; a key already present is skipped, so an interrupted hour is
not lost (the run in progress restarts from scratch), unless its recorded ``params`` differ
from the config's current ones (a stale row): then it is run again and replaced. A markdown table is printed and written
beside the JSON (``.md``). Each run's directory (config.toml, rounds.csv, clients.csv,
summary.json) is under ``--runs-dir``.

    python benchmarks/fl_tradeoff.py                       # the full table (~1 h on 2 cores)
    python benchmarks/fl_tradeoff.py --only fedavg,zerofl-topk_weights-m0.1-s0.9 --seeds 0,1
    python benchmarks/fl_tradeoff.py --smoke               # seconds: digits, mlp, 2 rounds
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results" / "fl_tradeoff.json"
ZEROFL_VARIANTS = (("topk_weights", 0.1), ("diff_topk_weights", 0.1), ("topk_diff", 0.1),
                   ("topk_weights", 0.0), ("topk_weights", 0.2))
SPARSITIES = (0.9, 0.95)


@dataclass(frozen=True)
class Method:
    """One row of the table: a strategy and its parameters."""

    key: str
    strategy: str
    params: dict[str, Any] = field(default_factory=dict)


def methods(sparsities: tuple[float, ...] = SPARSITIES) -> list[Method]:
    """Every configuration of the table, in table order."""
    out = [Method("fedavg", "fedavg")]
    for s in sparsities:
        out.append(Method(f"swat_fl-s{s:g}", "swat_fl", {"sparsity": s}))
    for s in sparsities:
        for rule, m in ZEROFL_VARIANTS:
            out.append(Method(f"zerofl-{rule}-m{m:g}-s{s:g}", "zerofl",
                              {"sparsity": s, "rule": rule, "mask_ratio": m}))
    for s in sparsities:
        out.append(Method(f"feddst-s{s:g}", "feddst", {"sparsity": s}))
    for s in sparsities:
        out.append(Method(f"flash-s{s:g}", "flash", {"density": round(1.0 - s, 6),
                                                     "sparse_init": "fan_in"}))
    return out


# ------------------------------------------------------------------------------ energy
def multi_device_client_class() -> type:
    """A SimulatedClient that also prices each successful round on other device classes."""
    from fl_core.clients import SimulatedClient, estimate_task

    class MultiDeviceClient(SimulatedClient):
        """Trains like a SimulatedClient; ``energy_by_device`` sums, per device class, the
        cost model's energy of every successful round (same inputs the loop uses)."""

        def __init__(self, *a: Any, price_on: tuple[str, ...] = (), **kw: Any) -> None:
            super().__init__(*a, **kw)
            self.price_on = tuple(price_on)
            self.energy_by_device = {d: 0.0 for d in self.price_on}

        def finish(self, task: Any, data: Any, wall: float, err: str | None) -> Any:
            res = super().finish(task, data, wall, err)
            if res.ok:
                up = int(len(res.update))
                down = len(task.global_state) + len(task.global_masks or b"")
                steps = res.stats.steps if res.stats is not None else None
                for d in self.price_on:
                    est = estimate_task(task, d, self.num_samples, self.radio, up, down,
                                        steps=steps)
                    self.energy_by_device[d] += float(est["energy_j"])
            return res

    return MultiDeviceClient


# ------------------------------------------------------------------------------ one run
def make_config(args: argparse.Namespace, m: Method, alpha: float, seed: int, out_dir: str) -> Any:
    """The RunConfig of one run, through our own config parser (validated like a TOML file)."""
    from fl_core.config import parse_config

    doc = {
        "name": f"{m.key}-a{alpha:g}-s{seed}", "rounds": args.rounds,
        "clients_per_round": args.per_round, "min_clients": 1, "eval_every": args.eval_every,
        "seed": seed, "threads": 1, "keep_checkpoints": 1,
        "data": {"name": args.dataset, "partition": "lda", "alpha": float(alpha),
                 "num_clients": args.clients},
        "model": {"name": args.model},
        "strategy": {"name": m.strategy, **m.params},
        "train": {"lr": 0.05, "momentum": 0.9, "weight_decay": 0.0005, "batch_size": 32,
                  "epochs": args.epochs},
        "fleet": {"devices": {args.devices[0]: 1.0}, "availability": 1.0, "radio": "wifi"},
        "output": {"dir": out_dir},
    }
    return parse_config(doc, f"fl_tradeoff[{m.key}]")


def run_one(args: argparse.Namespace, m: Method, alpha: float, seed: int, data: tuple,
            pool: Any) -> dict[str, Any]:
    """Run one configuration to the end; its result record."""
    from fl_core.federation import Federation

    ds, parts = data
    out_dir = os.path.join(args.runs_dir, f"{m.key}-a{alpha:g}-s{seed}")
    cfg = make_config(args, m, alpha, seed, out_dir)
    cls = multi_device_client_class()
    from fl_core.fleet import Fleet

    devices = Fleet(cfg.fleet, cfg.data.num_clients, cfg.seed).devices
    clients = [cls(f"c{i:04d}", devices[i], ds.x[p], ds.y[p], pool=pool, radio=cfg.fleet.radio,
                   price_on=tuple(args.devices)) for i, p in enumerate(parts)]
    fed = Federation(cfg, out_dir, clients=clients, dataset=ds, parts=parts, pool=pool,
                     progress=args.progress, write_report=False)
    t0 = time.perf_counter()
    s = fed.run(force=True)
    wall = time.perf_counter() - t0
    energy = {d: sum(c.energy_by_device[d] for c in clients) for d in args.devices}
    own = float(s["totals"]["energy_j"])
    check = abs(energy[args.devices[0]] - own) / own if own > 0 else 0.0
    return {
        "config": m.key, "strategy": m.strategy, "params": m.params, "alpha": float(alpha),
        "seed": seed, "status": s["status"], "rounds": s["rounds_completed"],
        "final_accuracy": s["final_accuracy"], "best_accuracy": s["best_accuracy"],
        "energy_j": energy, "energy_check_rel": check,
        "uplink_mb": s["totals"]["uplink_bytes"] / 1e6,
        "downlink_mb": s["totals"]["downlink_bytes"] / 1e6,
        "train_flops": s["totals"]["flops"], "clients_ok": s["totals"]["clients_ok"],
        "wall_s": wall, "run_dir": out_dir,
    }


# ------------------------------------------------------------------------------ estimate
def probe_client_seconds(args: argparse.Namespace, data: tuple) -> float:
    """Host seconds of one dense client round (median of 2 after a warm-up), in-process."""
    from embedded.task import run_task
    from fl_core.federation import build_spec
    from fl_core.strategies import make_strategy
    from fl_core.strategies.base import ClientInfo

    ds, parts = data
    cfg = make_config(args, Method("fedavg", "fedavg"), 1.0, 0, os.devnull)
    spec = build_spec(cfg, ds)
    strat = make_strategy("fedavg", spec, rounds=1, seed=0, train=cfg.train_config())
    strat.initialize()
    p = max(parts, key=len) if args.smoke else parts[0]
    task = strat.configure_fit(1, [ClientInfo("c0000", args.devices[0], len(p))])[0]
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        run_task(task, ds.x[p], ds.y[p])
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


# ------------------------------------------------------------------------------ output
def _fmt(vals: list[float], scale: float = 1.0, nd: int = 3, fmt: str = "f") -> str:
    vals = [v * scale for v in vals if v is not None and math.isfinite(v)]
    if not vals:
        return "-"
    if len(vals) == 1:
        return f"{vals[0]:.{nd}{fmt}}"
    mean, sd = statistics.mean(vals), statistics.stdev(vals)
    if sd <= 1e-9 * abs(mean):   # float summation noise of identical costs, not a spread
        sd = 0.0
    return f"{mean:.{nd}{fmt}} ± {sd:.2g}"


def markdown(results: dict[str, dict[str, Any]], devices: list[str], meta: dict[str, Any]) -> str:
    """The table: one row per (alpha, config), mean ± sd over the seeds present."""
    groups: dict[tuple[float, str], list[dict[str, Any]]] = {}
    order = {m.key: i for i, m in enumerate(methods())}
    for r in results.values():
        groups.setdefault((r["alpha"], r["config"]), []).append(r)
    lines = [f"# fl_tradeoff — {meta.get('dataset')} / {meta.get('model')}, "
             f"{meta.get('clients')} clients, {meta.get('per_round')} per round, "
             f"{meta.get('rounds')} rounds", "",
             "Energy: total client energy of the run, priced per device class with the cost "
             "model (see the script's docstring). Accuracy on the full test set after the "
             "last round; mean ± sd over seeds.", ""]
    head = ["alpha", "config", "seeds", "accuracy"] + [f"energy {d} (J)" for d in devices] + \
        ["uplink (MB)", "wall (s)"]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "---|" * len(head))
    for (alpha, key), rs in sorted(groups.items(), key=lambda kv: (kv[0][0],
                                                                    order.get(kv[0][1], 999),
                                                                    kv[0][1])):
        row = [f"{alpha:g}", key, ",".join(str(r["seed"]) for r in sorted(rs, key=lambda r:
                                                                          r["seed"])),
               _fmt([r["final_accuracy"] for r in rs])]
        row += [_fmt([r["energy_j"].get(d) for r in rs], 1.0, 4, "g") for d in devices]
        row += [_fmt([r["uplink_mb"] for r in rs], 1.0, 4, "g"), _fmt([r["wall_s"] for r in rs],
                                                                 1.0, 0)]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def save(out: Path, doc: dict[str, Any], devices: list[str]) -> None:
    """Write the JSON (atomically) and the markdown table beside it."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n", "utf-8")
    os.replace(tmp, out)
    out.with_suffix(".md").write_text(markdown(doc["results"], devices, doc["meta"]), "utf-8")


# ------------------------------------------------------------------------------ main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=100)
    ap.add_argument("--clients", type=int, default=100)
    ap.add_argument("--per-round", type=int, default=10)
    ap.add_argument("--epochs", type=int, default=1, help="local epochs per round")
    ap.add_argument("--alphas", default="1.0,1000", help="LDA alphas, comma-separated")
    ap.add_argument("--seeds", default="0", help="seeds, comma-separated (e.g. 0,1)")
    ap.add_argument("--only", default="", help="comma-separated config keys or strategy names "
                    "(default: all; --list shows them)")
    ap.add_argument("--list", action="store_true", help="list the config keys and exit")
    ap.add_argument("--workers", type=int, default=None,
                    help="client worker processes (default: fl_core.clients.default_workers())")
    ap.add_argument("--eval-every", type=int, default=10,
                    help="evaluate every k rounds (and always at the last)")
    ap.add_argument("--model", default="lenet5")
    ap.add_argument("--dataset", default="fashion_mnist")
    ap.add_argument("--devices", default="rpi4,pixel4",
                    help="device classes to price energy on (the first is the run's fleet)")
    ap.add_argument("--out", default=str(DEFAULT_OUT))
    ap.add_argument("--runs-dir", default="runs/fl_tradeoff")
    ap.add_argument("--progress", action="store_true", help="a progress bar per run")
    ap.add_argument("--estimate-only", action="store_true",
                    help="print the time estimate (one timed client round) and exit")
    ap.add_argument("--smoke", action="store_true",
                    help="seconds-long check: digits, mlp, 6 clients, 3 per round, 2 rounds, "
                    "one alpha; keeps any --only/--out/--runs-dir given")
    args = ap.parse_args(argv)
    if args.smoke:
        args.rounds, args.clients, args.per_round = 2, 6, 3
        args.alphas, args.model, args.dataset, args.eval_every = "1.0", "mlp", "digits", 1
        if args.workers is None:
            args.workers = 0
    try:
        args.alpha_list = [float(a) for a in args.alphas.split(",") if a.strip()]
        args.seed_list = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        ap.error("--alphas takes numbers and --seeds integers, comma-separated")
    args.devices = [d.strip() for d in args.devices.split(",") if d.strip()]
    if not args.alpha_list or not args.seed_list or not args.devices:
        ap.error("--alphas, --seeds and --devices need at least one value each")
    for name in ("rounds", "clients", "per_round", "epochs", "eval_every"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')}: expected an integer >= 1")
    if args.per_round > args.clients:
        ap.error(f"--per-round ({args.per_round}) exceeds --clients ({args.clients})")
    return args


def select(args: argparse.Namespace) -> list[Method]:
    """The configs chosen by ``--only`` (keys or strategy names); all by default."""
    all_m = methods()
    if not args.only:
        return all_m
    want = [w.strip() for w in args.only.split(",") if w.strip()]
    known = {m.key for m in all_m} | {m.strategy for m in all_m}
    bad = [w for w in want if w not in known]
    if bad:
        raise SystemExit(f"--only: unknown config(s) {bad}; known: "
                         f"{', '.join(m.key for m in all_m)} (or a strategy name)")
    return [m for m in all_m if m.key in want or m.strategy in want]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    chosen = select(args)
    if args.list:
        print("\n".join(m.key for m in chosen))
        return {}
    from fl_core.clients import WorkerPool, default_workers
    from fl_core.federation import load_data

    out = Path(args.out)
    meta = {"dataset": args.dataset, "model": args.model, "clients": args.clients,
            "per_round": args.per_round, "rounds": args.rounds, "epochs": args.epochs,
            "devices": args.devices, "eval_every": args.eval_every,
            "train": {"lr": 0.05, "momentum": 0.9, "weight_decay": 0.0005, "batch_size": 32}}
    doc: dict[str, Any] = {"meta": meta, "results": {}}
    if out.is_file():
        old = json.loads(out.read_text("utf-8"))
        if old.get("meta", {}) != meta:
            raise SystemExit(f"{out} holds results of other settings ({old.get('meta')}); "
                             "choose another --out or delete it")
        doc["results"] = dict(old.get("results", {}))
    def fresh(m: Method, a: float, s: int) -> bool:
        r = doc["results"].get(f"{m.key}|alpha={a:g}|seed={s}")
        return r is not None and r.get("params") == m.params

    todo = [(m, a, s) for a in args.alpha_list for s in args.seed_list for m in chosen
            if not fresh(m, a, s)]
    done = sum(1 for a in args.alpha_list for s in args.seed_list for m in chosen) - len(todo)
    workers = default_workers() if args.workers is None else args.workers
    print(f"fl_tradeoff: {len(todo)} run(s) to do, {done} already in {out}; "
          f"{args.rounds} rounds x {args.per_round} clients, {workers} worker(s)")
    if not todo:
        print(markdown(doc["results"], args.devices, meta))
        return doc
    data: dict[tuple[float, int], tuple] = {}

    def data_for(a: float, s: int) -> tuple:
        if (a, s) not in data:
            data.clear()   # runs come grouped by (alpha, seed): hold one copy of the data
            cfg = make_config(args, Method("fedavg", "fedavg"), a, s, os.devnull)
            data[(a, s)] = load_data(cfg)
        return data[(a, s)]

    t_client = probe_client_seconds(args, data_for(todo[0][1], todo[0][2]))
    par = max(1, min(workers, args.per_round))
    est = len(todo) * args.rounds * math.ceil(args.per_round / par) * t_client
    print(f"time estimate: {t_client:.2f} s per dense client round on this host -> about "
          f"{est / 60:.0f} min for {len(todo)} run(s) (dense client training only; worker "
          "transfer, evaluation and the sparse kernels' different speed come on top; the "
          "running estimate after each run is better)", flush=True)
    if args.estimate_only:
        return doc
    pool = WorkerPool(workers) if workers > 0 else None
    t_start = time.perf_counter()
    try:
        for i, (m, a, s) in enumerate(todo):
            key = f"{m.key}|alpha={a:g}|seed={s}"
            r = run_one(args, m, a, s, data_for(a, s), pool)
            doc["results"][key] = r
            save(out, doc, args.devices)
            spent = time.perf_counter() - t_start
            left = spent / (i + 1) * (len(todo) - i - 1)
            acc = r["final_accuracy"]
            print(f"[{i + 1}/{len(todo)}] {key}: acc {acc if acc is None else round(acc, 4)}, "
                  + ", ".join(f"{d} {r['energy_j'][d]:.4g} J" for d in args.devices)
                  + f", uplink {r['uplink_mb']:.4g} MB, {r['wall_s']:.0f} s "
                  f"(about {left / 60:.0f} min left)", flush=True)
    finally:
        if pool is not None:
            pool.close()
    table = markdown(doc["results"], args.devices, meta)
    print(table)
    print(f"wrote {out} and {out.with_suffix('.md')}")
    return doc


if __name__ == "__main__":
    main()
