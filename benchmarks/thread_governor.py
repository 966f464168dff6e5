"""The ThreadGovernor against fixed thread counts while another process takes a core.

    python benchmarks/thread_governor.py [--model resnet8] [--sparsity 0.95] [--windows 18]
        [--steps 25] [--json benchmarks/results/thread_governor.json]

One process, three networks trained in turn, ``--steps`` steps each per window: our SWAT step
(batch 16) at a fixed 2 threads, at a fixed 1 thread, and under the
:class:`~embedded.runtime.ThreadGovernor` that ``train_local`` runs by default. During the
middle third of the windows a second process spins on the CPU (``while True: pass``), as
another program on a board, or the hypervisor lending a VM's second vCPU elsewhere, would take
a core. Medians and means per side and phase (quiet / hog) are printed and written out, with
the ratio of the fixed 2-thread time to the governed one.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402

from embedded.runtime import start_threads  # noqa: E402

LAYER = start_threads()

SIDES = ("fixed_2t", "governor", "fixed_1t")
PHASES = ("quiet", "hog")


def summarise(times: dict[str, dict[str, list[float]]]) -> dict:
    """Median and mean ms per side and phase, and fixed-2-thread over governed per phase."""
    out: dict = {}
    for side in SIDES:
        for phase in PHASES:
            v = times[side][phase]
            if v:
                out.setdefault(side, {})[phase] = {
                    "median_ms": round(1e3 * float(np.median(v)), 3),
                    "mean_ms": round(1e3 * float(np.mean(v)), 3), "steps": len(v)}
    for phase in PHASES:
        if phase in out.get("fixed_2t", {}) and phase in out.get("governor", {}):
            f, g = out["fixed_2t"][phase], out["governor"][phase]
            out[f"fixed_2t_over_governor_{phase}"] = {
                "median": round(f["median_ms"] / g["median_ms"], 3),
                "mean": round(f["mean_ms"] / g["mean_ms"], 3)}
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet8")
    ap.add_argument("--sparsity", type=float, default=0.95)
    ap.add_argument("--windows", type=int, default=18, help="the middle third with the hog")
    ap.add_argument("--steps", type=int, default=25, help="steps per side and window")
    ap.add_argument("--json", default=os.path.join(ROOT, "benchmarks", "results",
                                                   "thread_governor.json"))
    args = ap.parse_args(argv)
    if args.windows < 3 or args.steps < 1:
        ap.error("--windows must be >= 3 and --steps >= 1")
    if not 0.0 <= args.sparsity < 1.0:
        ap.error(f"--sparsity: expected 0 <= s < 1, got {args.sparsity}")
    import numba

    from benchmarks.train_step import our_step, set_threads, step_batch
    from hwmodel import build

    if numba.config.NUMBA_NUM_THREADS < 2:
        ap.error("needs 2 Numba threads")
    set_threads(2)
    spec = build(args.model)
    x, y = step_batch(spec, 16)
    runs = {"fixed_2t": our_step(spec, x, y, args.sparsity, 1)[1],
            "governor": our_step(spec, x, y, args.sparsity, 1, adaptive=True)[1]}
    numba.set_num_threads(1)
    runs["fixed_1t"] = our_step(spec, x, y, args.sparsity, 1)[1]
    counts = {"fixed_2t": 2, "fixed_1t": 1}

    def step(side: str) -> None:
        if side in counts:
            numba.set_num_threads(counts[side])
        runs[side]()   # the governed step sets its own count

    for _ in range(8):                       # warm-up (and the first compile)
        for side in SIDES:
            step(side)
    gov = runs["governor"].governor
    times = {s: {p: [] for p in PHASES} for s in SIDES}
    hog = None
    lo, hi = args.windows // 3, 2 * args.windows // 3
    try:
        for w in range(args.windows):
            phase = "hog" if lo <= w < hi else "quiet"
            if phase == "hog" and hog is None:
                hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
                time.sleep(0.2)
            elif phase == "quiet" and hog is not None:
                hog.kill()
                hog.wait()
                hog = None
            for side in SIDES:
                for _ in range(args.steps):
                    t = time.perf_counter()
                    step(side)
                    times[side][phase].append(time.perf_counter() - t)
            print(f"window {w + 1}/{args.windows} ({phase}): "
                  + "  ".join(f"{s} {1e3 * np.median(times[s][phase][-args.steps:]):6.2f} ms"
                              for s in SIDES), flush=True)
    finally:
        if hog is not None:
            hog.kill()
            hog.wait()
    summary = summarise(times)
    summary["governor_one_thread_steps"] = gov.steps_at_one
    summary["governor_fallbacks"] = gov.switches
    doc = {"format": "sparsefl.bench.thread_governor/1", "argv": sys.argv[1:] if argv is None
           else list(argv), "threading_layer": LAYER, "model": args.model,
           "sparsity": args.sparsity, "batch": 16, "summary": summary}
    print(json.dumps(summary, indent=1))
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(doc, f, indent=1)
    print(f"wrote {args.json}")
    return doc


if __name__ == "__main__":
    main()
