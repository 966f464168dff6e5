"""Parallel client workers vs in-process training: one round of 10 simulated clients.

LeNet-5 on the bundled MNIST subset (IID, 400 samples per client, batch 32, one epoch, dense
FedAvg tasks). Variants, interleaved over ``--repeats`` rounds after one warm-up round each:

* ``inproc-t1``  — the clients one after another in this process, 1 Numba thread;
* ``inproc-t2``  — the same with 2 Numba threads (the kernels' own parallelism);
* ``workers-2``  — a WorkerPool of 2 spawned processes, 1 Numba thread each.

    python benchmarks/client_pool.py [--repeats 3] [--clients 10]

Prints the median seconds per round of each variant (and all samples). The default of
``fl_core.clients.DEFAULT_WORKERS`` follows this measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--clients", type=int, default=10)
    ap.add_argument("--model", default="lenet5")
    args = ap.parse_args()

    from embedded.train import TrainConfig
    from fl_core.clients import SimulatedClient, WorkerPool, run_clients
    from fl_core.data import load_dataset, make_partition
    from fl_core.strategies import make_strategy
    from fl_core.strategies.base import ClientInfo
    from hwmodel.models import build

    ds = load_dataset("mnist_small")
    parts = make_partition("iid", ds.y, args.clients, seed=0)
    spec = build(args.model, num_classes=10, input_shape=ds.input_shape)
    pool = WorkerPool(2)

    def round_time(threads: int, use_pool: bool) -> float:
        st = make_strategy("fedavg", spec, rounds=1, seed=0,
                           train=TrainConfig(lr=0.05, batch_size=32, threads=threads))
        st.initialize()
        clients = [SimulatedClient(f"c{i}", "rpi4", ds.x[p], ds.y[p],
                                   pool=pool if use_pool else None)
                   for i, p in enumerate(parts)]
        tasks = st.configure_fit(1, [ClientInfo(c.client_id, c.device, c.num_samples)
                                     for c in clients])
        t0 = time.perf_counter()
        res = run_clients(clients, tasks, pool if use_pool else None)
        dt = time.perf_counter() - t0
        assert all(r.ok for r in res), [r.error for r in res if not r.ok]
        return dt

    variants = {"inproc-t1": (1, False), "inproc-t2": (2, False), "workers-2": (1, True)}
    samples: dict[str, list[float]] = {k: [] for k in variants}
    warm = {k: round_time(*v) for k, v in variants.items()}   # compile / spawn / cache load
    for _ in range(args.repeats):
        for k, v in variants.items():
            samples[k].append(round_time(*v))
    pool.close()
    out = {k: {"median_s": statistics.median(v), "samples_s": v, "warmup_s": warm[k]}
           for k, v in samples.items()}
    out["load_avg"] = os.getloadavg()
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
