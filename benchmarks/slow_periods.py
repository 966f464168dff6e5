"""Host slow periods: what slows down when the resnet8 step does (one process, interleaved).

    python benchmarks/slow_periods.py [--seconds 150] [--window 1.5] [--sparsity 0.95]
        [--json benchmarks/results/slow_periods.json]

Each window runs, in turn and repeatedly: our SWAT resnet8 step (batch 16) at 2 threads, at
1 thread and under the ThreadGovernor train_local uses ("auto": 2 threads, or 1 while the step
times say the second core is taken; three networks, so switching rebinds nothing), torch's
step at 2 threads, a 32 MB copy (memory bandwidth) and a small compute-bound loop (one core's
speed). The medians of every window are written out. A window is *slow* when our 2-thread step
takes more than 1.5x its fastest quartile's median; the summary compares slow and normal
windows, so a reader sees whether the host took memory bandwidth, clock speed or one of the two
cores away.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402

from embedded.runtime import start_threads  # noqa: E402

LAYER = start_threads()   # Numba's OpenMP runtime first: torch reuses it (one pool)

SIDES = ("ours_2t", "ours_1t", "ours_auto", "torch_2t", "copy_32mb", "compute")


def _sides(sparsity: float, batch: int):
    """The six timed callables of a window."""
    import numba
    import torch

    from benchmarks.train_step import our_step, set_threads, step_batch, torch_step
    from hwmodel import build

    set_threads(2)   # torch's and Numba's pools; NumPy's BLAS held to one thread
    spec = build("resnet8")
    x, y = step_batch(spec, batch)

    def ours(threads: int):
        numba.set_num_threads(threads)
        net, run = our_step(spec, x, y, sparsity, 1)

        def step():
            numba.set_num_threads(threads)
            run()
        return net, step

    net, ours_2t = ours(2)
    _, ours_1t = ours(1)
    numba.set_num_threads(2)
    _, ours_auto = our_step(spec, x, y, sparsity, 1, adaptive=True)   # sets its own count
    torch.set_num_threads(2)
    torch_2t = torch_step(spec, net, x, y)   # the twin starts from our (untrained) weights

    src = np.ones(8 << 20, np.float32)
    dst = np.empty_like(src)
    small = np.random.default_rng(1).random(4096)

    def copy():
        np.copyto(dst, src)

    def compute():
        acc = small
        for _ in range(200):
            acc = acc * 1.0001 + 1e-7   # 4096 doubles: stays in L1, bound by the core's speed
        return acc

    return dict(zip(SIDES, (ours_2t, ours_1t, ours_auto, torch_2t, copy, compute),
                    strict=True))


def summarise(windows: list[dict]) -> dict:
    """Medians of every side over normal and slow windows (slow: ours_2t > 1.5x the median of
    its fastest quartile)."""
    o2 = np.array([w["ours_2t"] for w in windows])
    base = float(np.median(np.sort(o2)[:max(1, len(o2) // 4)]))
    slow = o2 > 1.5 * base
    out: dict = {"windows": len(windows), "slow_windows": int(slow.sum()), "base_ours_2t_ms": base}
    for name, sel in (("normal", ~slow), ("slow", slow)):
        if sel.any():
            group = [w for w, s in zip(windows, sel, strict=True) if s]
            out[name] = {k: round(float(np.median([w[k] for w in group])), 4) for k in SIDES}
            for side in ("ours_2t", "ours_auto"):
                out[name][f"torch_over_{side}"] = round(out[name]["torch_2t"] /
                                                        out[name][side], 3)
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=150.0)
    ap.add_argument("--window", type=float, default=1.5)
    ap.add_argument("--sparsity", type=float, default=0.95)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--json", default=os.path.join(ROOT, "benchmarks", "results",
                                                   "slow_periods.json"))
    args = ap.parse_args(argv)
    if args.seconds <= 0 or args.window <= 0:
        ap.error("--seconds and --window must be > 0")
    if not 0.0 <= args.sparsity < 1.0:
        ap.error(f"--sparsity: expected 0 <= s < 1, got {args.sparsity}")
    from benchmarks.train_step import steady_allocator

    steady_allocator()   # torch measured in its allocator's steady state
    sides = _sides(args.sparsity, args.batch)
    for _ in range(10):                                   # warm-up (and the first compile)
        for f in sides.values():
            f()
    windows = []
    end = time.monotonic() + args.seconds
    while time.monotonic() < end:
        times: dict[str, list[float]] = {k: [] for k in SIDES}
        w_end = time.perf_counter() + args.window
        while time.perf_counter() < w_end:
            for k, f in sides.items():
                t = time.perf_counter()
                f()
                times[k].append(time.perf_counter() - t)
        w = {"t": time.strftime("%H:%M:%S"),
             **{k: round(1e3 * float(np.median(v)), 4) for k, v in times.items()}}
        windows.append(w)
        print(f"{w['t']} ours 2t {w['ours_2t']:6.2f} ms  1t {w['ours_1t']:6.2f}  auto "
              f"{w['ours_auto']:6.2f}  torch 2t "
              f"{w['torch_2t']:6.2f} (x{w['torch_2t'] / w['ours_2t']:4.2f})  copy 32 MB "
              f"{w['copy_32mb']:5.2f}  compute {w['compute']:6.3f}", flush=True)
    doc = {"format": "sparsefl.bench.slow_periods/1", "argv": sys.argv[1:] if argv is None
           else list(argv), "threading_layer": LAYER, "sparsity": args.sparsity,
           "batch": args.batch, "summary": summarise(windows), "windows": windows}
    print(json.dumps(doc["summary"], indent=1))
    with open(args.json, "w") as f:
        json.dump(doc, f, indent=1)
    print(f"wrote {args.json}")
    return doc


if __name__ == "__main__":
    main()
