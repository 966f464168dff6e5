"""Cost of a Numba parallel region under each threading layer (why ``import embedded`` picks
GNU OpenMP).

    python benchmarks/threading_layers.py [--threads 2] [--json OUT]

Each layer runs in a fresh process (a process holds one layer): the median time of an empty
``prange`` region launched back to back, and of a small axpy-like kernel (64k float32, 1 and
16 sweeps) serial vs parallel. Prints the ratio to ``omp`` measured in the same run and
writes the records to ``benchmarks/results/threading_layers.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_CHILD = r"""
import json, os, statistics, sys, time
os.environ["NUMBA_THREADING_LAYER"] = sys.argv[1]
import numba
import numpy as np
from numba import njit, prange

@njit(parallel=True, nogil=True)
def empty(a):
    for i in prange(a.size):
        a[i] += 1.0

@njit(parallel=True, nogil=True)
def sweep_par(a, reps, nt):
    n = a.size
    for c in prange(nt):
        s = a[n * c // nt:n * (c + 1) // nt]
        for _ in range(reps):
            for i in range(s.size):
                s[i] = s[i] * np.float32(0.999) + np.float32(0.001)

@njit(nogil=True)
def sweep_ser(a, reps):
    for _ in range(reps):
        for i in range(a.size):
            a[i] = a[i] * np.float32(0.999) + np.float32(0.001)

threads = int(sys.argv[2])
numba.set_num_threads(threads)
tiny = np.zeros(threads)
empty(tiny)
def med(f, n):
    ts = []
    for _ in range(n):
        t0 = time.perf_counter(); f(); ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e6
out = {"layer": numba.threading_layer(), "threads": threads,
       "empty_region_us": med(lambda: empty(tiny), 2000)}
b = np.zeros(1 << 16, np.float32)
sweep_par(b, 1, threads); sweep_ser(b, 1)
for reps in (1, 16):
    ser = med(lambda: sweep_ser(b, reps), 300)
    par = med(lambda: sweep_par(b, reps, threads), 300)
    out[f"sweep{reps}_serial_us"] = ser
    out[f"sweep{reps}_parallel_us"] = par
print(json.dumps(out))
"""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--layers", default="omp,workqueue,tbb")
    ap.add_argument("--json", default=os.path.join(ROOT, "benchmarks", "results",
                                                   "threading_layers.json"))
    args = ap.parse_args(argv)
    recs = []
    for layer in args.layers.split(","):
        p = subprocess.run([sys.executable, "-c", _CHILD, layer, str(args.threads)],
                           capture_output=True, text=True, timeout=600)
        if p.returncode != 0:
            print(f"{layer:10s} unavailable: {p.stderr.strip().splitlines()[-1:]}")
            continue
        recs.append(json.loads(p.stdout.strip().splitlines()[-1]))
    base = next((r for r in recs if r["layer"] == "omp"), None)
    for r in recs:
        ratio = (f"  x{r['empty_region_us'] / base['empty_region_us']:.0f} omp's"
                 if base else "")
        print(f"{r['layer']:10s} empty region {r['empty_region_us']:8.1f} us{ratio}; 64k sweep "
              f"x1 serial {r['sweep1_serial_us']:.1f} us / parallel "
              f"{r['sweep1_parallel_us']:.1f} us, x16 {r['sweep16_serial_us']:.1f} / "
              f"{r['sweep16_parallel_us']:.1f} us")
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w", encoding="utf-8") as f:
        json.dump({"format": "sparsefl.bench.threading_layers/1", "records": recs,
                   "cpu_count": os.cpu_count()}, f, indent=1)
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
