"""Rounds per hour: our federation loop against a Flower + torch simulation of the same FedAvg.

Workload (defaults): ``femnist_cnn`` on Fashion-MNIST, 100 clients (LDA alpha 1.0), 10 per
round, 5 rounds, one local epoch of SGD (lr 0.05, momentum 0.9, weight decay 5e-4, batch 32),
and one evaluation of the global model on the test set at the end, in one run:

* **ours, fedavg** — ``fl_core.federation.Federation`` (config built with our parser),
  ``--threads`` worker processes with 1 Numba thread each (checkpoints and CSVs written as in
  any run);
* **ours, zerofl 0.9** — the same with ZeroFL at sparsity 0.9 (topk_weights, mask ratio 0.1);
* **flower+torch, fedavg** — what a Flower user would write: a ``ClientApp`` whose ``train``
  loads its shard, builds the model (``hwmodel.to_torch`` twin of the same spec, torch's own
  initialisation), trains with ``torch.optim.SGD`` (same lr/momentum/weight decay/batch/
  epochs) and replies with its ``ArrayRecord``; a ``ServerApp`` running flwr's own message-API
  ``FedAvg`` (``fraction_train`` = per_round / clients, no federated evaluation, a server-side
  ``evaluate_fn`` at the last round); ``flwr.simulation.run_simulation`` on the Ray backend with
  ``num_cpus = --threads`` and 1 CPU per ClientApp (``torch.set_num_threads(1)`` in each).

Same thread budget on both sides: ``--threads`` clients train at once, one thread each.
Rounds/hour is reported three ways: ``rounds_per_hour`` (from the start of round 1 to the end
of the last round; our worker processes and Ray are started before the clock, but first-use
costs land in round 1 on both sides: our workers' imports and Numba cache loads, Ray's lazy
actor creation with its torch import and each actor's one-time ``load_data``),
``rounds_per_hour_steady`` (from the end of round 1 to the end of the last: those warm-up
costs excluded) and ``rounds_per_hour_end_to_end`` (everything from the call, data loading
and start-up included). The last round includes the one test-set evaluation on both sides.

    python benchmarks/sim_throughput.py                   # the issue's workload
    python benchmarks/sim_throughput.py --smoke           # seconds + Ray start: digits, mlp
    python benchmarks/sim_throughput.py --smoke --no-flower
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results" / "sim_throughput.json"
TRAIN = {"lr": 0.05, "momentum": 0.9, "weight_decay": 0.0005, "batch_size": 32, "epochs": 1}
ALPHA = 1.0


def run_config(args: argparse.Namespace, strategy: dict[str, Any], out_dir: str) -> Any:
    """The RunConfig of one of our runs (validated by our parser like a TOML file)."""
    from fl_core.config import parse_config

    doc = {"name": f"sim_throughput-{strategy['name']}", "rounds": args.rounds,
           "clients_per_round": args.per_round, "min_clients": 1,
           "eval_every": args.rounds, "seed": args.seed, "threads": 1, "keep_checkpoints": 1,
           "data": {"name": args.dataset, "partition": "lda", "alpha": ALPHA,
                    "num_clients": args.clients},
           "model": {"name": args.model}, "strategy": strategy, "train": dict(TRAIN),
           "fleet": {"devices": {"rpi4": 1.0}, "availability": 1.0, "workers": args.threads},
           "output": {"dir": out_dir}}
    return parse_config(doc, f"sim_throughput[{strategy['name']}]")


# ------------------------------------------------------------------------------ ours
def steady(stamps: list[float]) -> float | None:
    """Rounds/hour from the end of round 1 to the end of the last (warm-up excluded)."""
    if len(stamps) < 2 or stamps[-1] <= stamps[0]:
        return None
    return 3600.0 * (len(stamps) - 1) / (stamps[-1] - stamps[0])


def time_ours(args: argparse.Namespace, strategy: dict[str, Any], runs_dir: str) -> dict[str, Any]:
    """Run our loop once; wall times, rounds/hour and final accuracy."""
    from fl_core.clients import WorkerPool
    from fl_core.federation import Federation

    t_call = time.perf_counter()
    out_dir = os.path.join(runs_dir, f"ours-{strategy['name']}")
    cfg = run_config(args, strategy, out_dir)
    pool = WorkerPool(args.threads) if args.threads > 0 else None
    try:
        fed = Federation(cfg, out_dir, pool=pool, write_report=False)
        if pool is not None:   # start the workers before the clock (Ray's start is excluded too)
            pool._ensure()
        stamps: list[float] = []
        ckpt = fed.checkpoint

        def stamped(rnd: int, elapsed: float) -> None:
            stamps.append(time.perf_counter())   # the round (and its evaluation) is done
            ckpt(rnd, elapsed)

        fed.checkpoint = stamped  # type: ignore[method-assign]
        t0 = time.perf_counter()
        s = fed.run(force=True)
        t1 = time.perf_counter()
    finally:
        if pool is not None:
            pool.close()
    rounds_s, e2e = t1 - t0, time.perf_counter() - t_call
    return {"side": "ours", "strategy": strategy["name"], "params": {k: v for k, v in
                                                                   strategy.items()
                                                                   if k != "name"},
            "rounds": s["rounds_completed"], "rounds_wall_s": rounds_s, "end_to_end_s": e2e,
            "rounds_per_hour": 3600.0 * args.rounds / rounds_s,
            "rounds_per_hour_end_to_end": 3600.0 * args.rounds / e2e,
            "rounds_per_hour_steady": steady(stamps),
            "final_accuracy": s["final_accuracy"],
            "uplink_mb": s["totals"]["uplink_bytes"] / 1e6}


# ------------------------------------------------------------------------------ Flower
def flower_apps(args: argparse.Namespace, sink: dict[str, Any]) -> tuple[Any, Any]:
    """A standard Flower ClientApp (torch training) and ServerApp (flwr's FedAvg)."""
    import numpy as np
    import torch
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg

    from fl_core.data import load_dataset, make_partition
    from hwmodel.models import build
    from hwmodel.torch_twin import to_torch

    dataset, model_name, n_clients, seed = args.dataset, args.model, args.clients, args.seed
    cache: dict[str, Any] = {}

    def load_data() -> tuple[Any, list[Any], Any]:
        """Dataset, partition and model spec, once per process (a Ray actor)."""
        if "ds" not in cache:
            ds = load_dataset(dataset)
            cache["parts"] = make_partition("lda", ds.y, n_clients, seed=seed, alpha=ALPHA)
            cache["spec"] = build(model_name, num_classes=ds.num_classes,
                                  input_shape=tuple(ds.input_shape))
            cache["ds"] = ds
        return cache["ds"], cache["parts"], cache["spec"]

    client = ClientApp()

    @client.train()
    def train(msg: Message, context: Context) -> Message:
        torch.set_num_threads(1)
        ds, parts, spec = load_data()
        idx = parts[int(context.node_config["partition-id"])]
        x = torch.from_numpy(np.ascontiguousarray(ds.x[idx], dtype=np.float32))
        y = torch.from_numpy(np.ascontiguousarray(ds.y[idx], dtype=np.int64))
        model = to_torch(spec)
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        cfg = msg.content["config"]
        opt = torch.optim.SGD(model.parameters(), lr=float(cfg["lr"]),
                              momentum=float(cfg["momentum"]),
                              weight_decay=float(cfg["weight_decay"]))
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y),
                                             batch_size=int(cfg["batch_size"]), shuffle=True)
        model.train()
        total = 0.0
        for _ in range(int(cfg["epochs"])):
            for xb, yb in loader:
                opt.zero_grad()
                loss = model.loss(model(xb), yb)
                loss.backward()
                opt.step()
                total += loss.item()
        content = RecordDict({"arrays": ArrayRecord(model.state_dict()),
                              "metrics": MetricRecord({"num-examples": len(idx),
                                                       "train_loss": total / max(1,
                                                                                 len(loader))})})
        return Message(content=content, reply_to=msg)

    server = ServerApp()
    rounds, per_round = args.rounds, args.per_round

    def evaluate_fn(rnd: int, arrays: ArrayRecord) -> MetricRecord | None:
        if rnd != rounds:
            if rnd > 0:
                sink.setdefault("stamps", []).append(time.perf_counter())
            return None
        ds, _, spec = load_data()
        model = to_torch(spec)
        model.load_state_dict(arrays.to_torch_state_dict())
        model.eval()
        with torch.no_grad():
            logits = model(torch.from_numpy(np.asarray(ds.x_test, dtype=np.float32)))
        acc = float((logits.argmax(1).numpy() == ds.y_test).mean())
        sink["final_accuracy"] = acc
        sink.setdefault("stamps", []).append(time.perf_counter())
        return MetricRecord({"accuracy": acc})

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        _, _, spec = load_data()
        torch.manual_seed(seed)
        init = ArrayRecord(to_torch(spec).state_dict())
        strategy = FedAvg(fraction_train=per_round / n_clients, fraction_evaluate=0.0,
                          min_train_nodes=per_round, min_available_nodes=n_clients)
        sink["t_start"] = time.perf_counter()
        sink["result"] = strategy.start(grid=grid, initial_arrays=init, num_rounds=rounds,
                                        train_config=ConfigRecord(dict(TRAIN)),
                                        evaluate_fn=evaluate_fn)
        sink["t_end"] = time.perf_counter()

    return client, server


def time_flower(args: argparse.Namespace) -> dict[str, Any]:
    """Run the Flower + torch simulation once; wall times and rounds/hour."""
    import ray
    from flwr.simulation import run_simulation

    sink: dict[str, Any] = {}
    t_call = time.perf_counter()
    client, server = flower_apps(args, sink)
    backend = {"client_resources": {"num_cpus": 1.0, "num_gpus": 0.0},
               "init_args": {"num_cpus": max(1, args.threads), "num_gpus": 0,
                             "include_dashboard": False}}
    try:
        run_simulation(server_app=server, client_app=client, num_supernodes=args.clients,
                       backend_config=backend, verbose_logging=False)
    finally:
        if ray.is_initialized():
            ray.shutdown()
    e2e = time.perf_counter() - t_call
    if "t_end" not in sink:
        raise RuntimeError("the Flower simulation did not finish its rounds (see its log)")
    rounds_s = sink["t_end"] - sink["t_start"]
    return {"side": "flower+torch", "strategy": "fedavg", "params": {},
            "rounds": args.rounds, "rounds_wall_s": rounds_s, "end_to_end_s": e2e,
            "rounds_per_hour": 3600.0 * args.rounds / rounds_s,
            "rounds_per_hour_end_to_end": 3600.0 * args.rounds / e2e,
            "rounds_per_hour_steady": steady(sink.get("stamps", [])),
            "final_accuracy": sink.get("final_accuracy")}


# ------------------------------------------------------------------------------ main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--clients", type=int, default=100)
    ap.add_argument("--per-round", type=int, default=10)
    ap.add_argument("--model", default="femnist_cnn")
    ap.add_argument("--dataset", default="fashion_mnist")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                    help="clients training at once on each side, one thread each")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-flower", action="store_true", help="time only our loop")
    ap.add_argument("--runs-dir", default=None,
                    help="where our run directories go (default: a temporary directory)")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny settings: digits, mlp, 6 clients, 3 per round, 2 rounds")
    ap.add_argument("--out", default=None, help=f"result JSON (default {DEFAULT_OUT}; "
                    "with --smoke nothing is written unless given)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.rounds, args.clients, args.per_round = 2, 6, 3
        args.model, args.dataset = "mlp", "digits"
    elif args.out is None:
        args.out = str(DEFAULT_OUT)
    for name in ("rounds", "clients", "per_round", "threads"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')}: expected an integer >= 1")
    if args.per_round > args.clients:
        ap.error(f"--per-round ({args.per_round}) exceeds --clients ({args.clients})")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="sim_throughput-") as tmp:
        runs = args.runs_dir or tmp
        rows = [time_ours(args, {"name": "fedavg"}, runs),
                time_ours(args, {"name": "zerofl", "sparsity": 0.9, "rule": "topk_weights",
                                 "mask_ratio": 0.1}, runs)]
    if not args.no_flower:
        rows.append(time_flower(args))
    doc: dict[str, Any] = {
        "workload": {"model": args.model, "dataset": args.dataset, "clients": args.clients,
                     "per_round": args.per_round, "rounds": args.rounds, "alpha": ALPHA,
                     "threads": args.threads, "train": TRAIN, "seed": args.seed},
        "results": rows}
    flw = next((r for r in rows if r["side"] == "flower+torch"), None)
    if flw is not None:
        doc["ratio_fedavg"] = rows[0]["rounds_per_hour"] / flw["rounds_per_hour"]
        doc["ratio_fedavg_end_to_end"] = (rows[0]["rounds_per_hour_end_to_end"]
                                          / flw["rounds_per_hour_end_to_end"])
        a, b = rows[0]["rounds_per_hour_steady"], flw["rounds_per_hour_steady"]
        doc["ratio_fedavg_steady"] = a / b if a and b else None
    print(f"{'side':14s} {'strategy':22s} {'rounds/h':>10s} {'steady/h':>10s} "
          f"{'e2e rounds/h':>13s} {'rounds s':>9s} {'acc':>7s}")
    for r in rows:
        label = r["strategy"] + ("".join(f" {k}={v}" for k, v in r["params"].items()
                                         if k == "sparsity"))
        acc = r["final_accuracy"]
        st = r["rounds_per_hour_steady"]
        print(f"{r['side']:14s} {label:22s} {r['rounds_per_hour']:10.1f} "
              f"{'-' if st is None else f'{st:.1f}':>10s} "
              f"{r['rounds_per_hour_end_to_end']:13.1f} {r['rounds_wall_s']:9.2f} "
              f"{'-' if acc is None else f'{acc:.4f}':>7s}")
    if flw is not None:
        rs = doc["ratio_fedavg_steady"]
        print(f"ours / flower+torch (dense FedAvg): {doc['ratio_fedavg']:.2f}x rounds/hour "
              f"({'-' if rs is None else f'{rs:.2f}x'} after round 1, "
              f"{doc['ratio_fedavg_end_to_end']:.2f}x end to end); aim >= 1.5x")
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(doc, indent=1) + "\n", "utf-8")
        print(f"wrote {out}")
    return doc


if __name__ == "__main__":
    main()
