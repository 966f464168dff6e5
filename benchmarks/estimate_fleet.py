"""Fleet estimate benchmark: 10,000 clients with mixed devices, sparsities and data sizes.

    python benchmarks/estimate_fleet.py [--clients 10000] [--model resnet18_cifar] [--repeats 7]
                                        [--json benchmarks/results/estimate_fleet.json]

Prints the wall time of ``hwmodel.estimate_fleet`` for the fleet: the first call (which
reduces the model's count rows to coefficients and loads the profiles) and the median of the
repeats after it, plus a spot check against the per-client ``hwmodel.estimate``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402

from hwmodel.counts import FLOPS_CONVENTION  # noqa: E402
from hwmodel.estimator import estimate, estimate_fleet  # noqa: E402
from hwmodel.profiles import list_profiles  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=10_000)
    ap.add_argument("--model", default="resnet18_cifar")
    ap.add_argument("--mode", default="swat", choices=("swat", "masked", "dense"))
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=os.path.join(ROOT, "benchmarks", "results",
                                                   "estimate_fleet.json"))
    args = ap.parse_args(argv)

    rng = np.random.default_rng(args.seed)
    names = list_profiles()
    devices = [names[i] for i in rng.integers(0, len(names), args.clients)]
    sparsity = rng.choice([0.0, 0.5, 0.8, 0.9, 0.95], args.clients)
    sparsity = np.where(rng.random(args.clients) < 0.5, sparsity, rng.uniform(0, 0.99, args.clients))
    samples = rng.integers(20, 2000, args.clients)

    def go():
        return estimate_fleet(args.model, devices, sparsity, samples, mode=args.mode, radio=None)

    t0 = time.perf_counter()
    fleet = go()
    first = time.perf_counter() - t0
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        go()
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)

    check_idx = rng.choice(args.clients, 5, replace=False)
    worst = 0.0
    for i in check_idx:
        est = estimate(args.model, devices[i], float(sparsity[i]), mode=args.mode,
                       samples=int(samples[i]))
        worst = max(worst, abs(fleet.compute_time_s[i] / est.totals.time_s - 1.0))

    print(f"estimate_fleet: {args.clients:,} clients of {args.model} ({args.mode}) on "
          f"{len(names)} device profiles, sparsity mixed in [0, 0.99), 20-2000 samples each")
    print(f"  first call (builds the model's coefficient tables): {first * 1e3:.1f} ms")
    print(f"  later calls, median of {args.repeats}: {med * 1e3:.1f} ms "
          f"(min {min(times) * 1e3:.1f}, max {max(times) * 1e3:.1f})")
    print(f"  spot check vs per-client estimate() on {len(check_idx)} clients: max relative "
          f"difference {worst:.2e}")
    print(f"  fleet compute energy: median {np.median(fleet.compute_energy_j):.3g} J per round; "
          f"{FLOPS_CONVENTION}")
    result = {
        "benchmark": "estimate_fleet", "model": args.model, "mode": args.mode,
        "clients": args.clients, "devices": names, "first_call_s": first,
        "median_s": med, "times_s": times, "spotcheck_max_rel_diff": worst,
        "host": platform.platform(), "python": platform.python_version(),
        "cpu_count": os.cpu_count(), "provenance": "measured",
        "note": "wall time on a shared 2-core host; other jobs may have been running",
    }
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)
        print(f"  wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
