"""Training-step benchmark: sparsefl's Numba conv/linear layers vs torch dense, same threads.

    python benchmarks/train_step.py [--quick] [--json OUT] [--threads 1,2] [--batch 16,32]

One process; for each thread count, torch.set_num_threads, numba.set_num_threads and the
BLAS pool (threadpoolctl) get the same count. Measured, interleaved (ours, torch, ours, ...),
median of repeats:

(a) every conv/linear layer of femnist_cnn, resnet8 and resnet18_cifar, forward + backward
    (input gradient included) at sparsity 0 (dense mode), 0.9 and 0.95 (swat: top-K weights
    and activations at the same density); our time includes the top-K selection, building the
    compressed weights and the sparse activations;
(b) the whole training step (forward, loss, backward, SGD update) of femnist_cnn and resnet8
    with the SWAT plan (first layer and classifier dense), against a torch twin of the model.
    Our steps run as ``train_local`` runs them: with its ThreadGovernor, which drops to 1
    thread while the step times say the second core is taken (``--fixed-threads``: never);
    ``ours_one_thread_steps`` counts those steps of a row (warm-up included).

SWAT's ``topk_period`` (``--topk-period 1,10``: each listed period is measured; sparsity 0 once):
period 1 is the exact top-K every step (the costliest). With a period p > 1 the exact top-K
runs on one step in p and the other steps reuse its threshold (ALGORITHMS.md; the compressed
weights are still rebuilt from the current dense weights at that threshold every step, so
the kept set drifts as in SWAT). Such a row's time is AMORTISED: each timed sample is p
consecutive steps (exactly one of them the refresh) divided by p, and torch's sample is p
steps too.

Records: model, layer (or "step"), sparse (is the layer sparse in the SWAT plan), sparsity,
threads, batch, ours_ms, torch_ms, speedup (torch_ms / ours_ms), density (measured weight
density), act_density, topk_period, amortised_over (steps per timed sample), pred_speedup
(hwmodel's predicted sparse-vs-dense speed-up of our trainer with the calibrated host profile,
benchmarks/results/generic-x86-calibrated.toml, when it loads) and ours_dense_over_sparse
(our own dense time / our sparse time, the measured quantity the prediction models); step
records also carry each side's page faults and involuntary context switches per step
(``ours_faults_per_call``, ``torch_preempted_per_call``, ...: getrusage around the timed calls;
torch's CPU allocator hands memory back and faults it in again every step). Also
prints per-layer median speedups, the peak memory of a step (fresh subprocesses, RSS
high-water mark above the post-warm-up level) and the JIT compile time of the first step in a
fresh process with an empty Numba cache.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402

from embedded.runtime import start_threads  # noqa: E402

# Numba's threads first, so torch (imported later) reuses their OpenMP runtime: one pool
LAYER = start_threads()

MODELS_LAYERS = ("femnist_cnn", "resnet8", "resnet18_cifar")
MODELS_STEP = ("femnist_cnn", "resnet8")


def set_threads(n: int) -> None:
    import numba
    import torch
    torch.set_num_threads(n)  # torch's GEMMs: its own MKL / oneDNN on the OpenMP threads
    numba.set_num_threads(n)
    # OpenBLAS (NumPy's, SciPy's) held to one thread: our dense GEMMs call SciPy's sgemm once
    # per block over Numba's n threads (embedded.kernels.gemm), as train_local does
    global _BLAS_HOLD
    if _BLAS_HOLD is None:
        from embedded.kernels.gemm import single_threaded_blas
        _BLAS_HOLD = single_threaded_blas().__enter__()  # for the whole run


_BLAS_HOLD = None


def steady_allocator() -> bool:
    """Raise glibc malloc's mmap and trim thresholds (32 and 64 MB) for this process, so torch
    is measured in its steady state whatever ran before it. At glibc's defaults a block of
    128 KB or more is mapped and unmapped on every allocation until the first large free
    raises the thresholds, so each of torch's per-call tensors page-faults in a fresh
    process: measured, resnet8 layer1.0.conv1 (16 -> 16, 32 x 32, batch 16) fwd+bwd, 2
    threads, 3.6-4.4 ms a call alone, 2.2 ms with the thresholds raised or after femnist_cnn's
    layers ran first (the quick run's order). Our side allocates nothing per step. True if
    set (False off glibc)."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3   # glibc's malloc.h
    return bool(mallopt(m_mmap_threshold, 32 << 20)) and bool(mallopt(m_trim_threshold,
                                                                      64 << 20))


#: Untimed calls of each side before a configuration is measured. Setting a sparsity restarts
#: our top-K state (the first select is the full histogram one, and the windows around the last
#: threshold start wide: the activations' at 10 %, narrowing by 0.7x a step to 1 %), so the
#: first steps are a transient a training run pays once: measured, a fresh SWAT-0.9 layer's first
#: 3-4 steps take 10-15 % longer (resnet8 layer1.0.conv1 1.06-1.22 ms, then 0.86-0.98 ms).
WARMUP = 8
#: untimed calls of a whole step under the ThreadGovernor: past its first check (step 11)
GOVERNED_WARMUP = 16


def _median_interleaved(fa, fb, reps: int, budget_s: float, block: int = 1,
                        host: dict | None = None) -> tuple[float, float]:
    """Median ms per call of ``fa`` and ``fb``, interleaved; each timed sample runs ``block``
    consecutive calls and is divided by ``block`` (an amortised per-step time over a whole
    top-K period when ``block`` is the period). ``host``, if given, receives each side's
    page faults and involuntary context switches per call (``getrusage`` around the timed
    calls): what the host does to a side besides its own work."""
    import resource

    ta, tb = [], []
    ca, cb = [0, 0], [0, 0]  # (page faults, involuntary switches) of each side
    t_end = time.perf_counter() + budget_s
    for r in range(reps):
        pair = ((fa, ta, ca), (fb, tb, cb)) if r % 2 == 0 else ((fb, tb, cb), (fa, ta, ca))
        for f, acc, cnt in pair:
            u0 = resource.getrusage(resource.RUSAGE_SELF)
            t0 = time.perf_counter()
            for _ in range(block):
                f()
            acc.append((time.perf_counter() - t0) / block)
            u1 = resource.getrusage(resource.RUSAGE_SELF)
            cnt[0] += u1.ru_minflt - u0.ru_minflt + u1.ru_majflt - u0.ru_majflt
            cnt[1] += u1.ru_nivcsw - u0.ru_nivcsw
        if r >= 2 and time.perf_counter() > t_end:
            break
    if host is not None:
        for side, acc, cnt in (("ours", ta, ca), ("torch", tb, cb)):
            calls = len(acc) * block
            host[f"{side}_faults_per_call"] = round(cnt[0] / calls, 2)
            host[f"{side}_preempted_per_call"] = round(cnt[1] / calls, 3)
    return statistics.median(ta) * 1e3, statistics.median(tb) * 1e3


# ----------------------------------------------------------------------------- hwmodel
PROFILE = os.path.join(ROOT, "benchmarks", "results", "generic-x86-calibrated.toml")
_PRED_CACHE: dict[tuple, dict] = {}


def predicted(model: str, batch: int, s: float, period: int, layers: str) -> dict:
    """hwmodel's predicted speed-up of our sparse step over our dense step (calibrated host
    profile): {layer: ratio of forward+backward times, "step": ratio of the whole step}.
    Empty if the profile or the estimator is unavailable."""
    key = (model, batch, s, period, layers)
    if key in _PRED_CACHE:
        return _PRED_CACHE[key]
    out: dict = {}
    try:
        from hwmodel import SparsityPlan, build
        from hwmodel.estimator import estimate
        from hwmodel.profiles import load_profile
        prof = load_profile(PROFILE)
        spec = build(model)
        plan = SparsityPlan.uniform(spec, s, mode="swat", layers=layers, topk_period=period)
        est = estimate(spec, prof, plan=plan, batch=batch, samples=batch, radio=None)
        phases = ("forward", "backward_input", "backward_weight")
        sp = est.sparse.rows[est.sparse.rows["phase"].isin(phases)].groupby("layer")["time_s"].sum()
        de = est.dense.rows[est.dense.rows["phase"].isin(phases)].groupby("layer")["time_s"].sum()
        for name in sp.index:
            if sp[name] > 0:
                out[name] = float(de[name] / sp[name])
        out["step"] = float(est.dense_totals.time_s / est.totals.time_s)
    except Exception as e:  # noqa: BLE001  (the benchmark still runs without a profile)
        print(f"(no hwmodel prediction: {type(e).__name__}: {e})", flush=True)
    _PRED_CACHE[key] = out
    return out


# ----------------------------------------------------------------------------- (a) layers
def _configs(sparsities, periods):
    """(sparsity, period) pairs: sparsity 0 once (period irrelevant), each sparse one per
    period."""
    return [(s, None) if s == 0 else (s, p) for s in sparsities
            for p in ([None] if s == 0 else periods)]


def bench_layers(model: str, threads: int, batch: int, sparsities, reps: int, periods,
                 budget_s: float, only=None, dedupe: bool = False) -> list[dict]:
    import torch
    from torch import nn

    from embedded.layers.conv import Conv2d
    from embedded.layers.linear import Linear
    from hwmodel import LayerSparsity, build
    from hwmodel.plan import sparse_layer_names

    spec = build(model)
    sparse_names = set(sparse_layer_names(spec, "swat"))
    rng = np.random.default_rng(0)
    out = []
    seen: dict[tuple, list[dict]] = {}
    for name in spec.weighted_layers():
        if only and name not in only:
            continue
        node = spec[name]
        sig = (node.op, spec.in_shapes[name], tuple(sorted(node.attrs.items())),
               name in sparse_names)
        if dedupe and sig in seen:
            for rec in seen[sig]:  # quick mode: one of each shape
                rec["same_shape_layers"].append(name)
            continue
        in_shape = spec.in_shapes[name][0]
        oshape = spec.shapes[name]
        cls = Conv2d if node.op == "conv2d" else Linear
        ours = cls(node, spec.in_shapes[name], oshape)
        ours.init_params(rng)
        ours.setup(batch)
        ours.timing = False
        a = node.attrs
        if node.op == "conv2d":
            tm = nn.Conv2d(in_shape[0], a["out_channels"], a["kernel"], a["stride"],
                           a["padding"], groups=a["groups"], bias=a["bias"])
        else:
            tm = nn.Linear(in_shape[0], a["out_features"], bias=a["bias"])
        with torch.no_grad():
            tm.weight.copy_(torch.from_numpy(ours.params["weight"]))
            if a["bias"]:
                tm.bias.copy_(torch.from_numpy(ours.params["bias"]))
        x = rng.standard_normal((batch, *in_shape)).astype(np.float32)
        if name != spec.first_layer():
            x = np.maximum(x, 0)  # post-ReLU activations, as in the network
        gy = rng.standard_normal((batch, *oshape)).astype(np.float32) * 0.01
        xt = torch.from_numpy(x.copy()).requires_grad_(True)
        gyt = torch.from_numpy(gy.copy())

        def run_torch(xt=xt, tm=tm, gyt=gyt):
            xt.grad = None
            for p in tm.parameters():
                p.grad = None
            tm(xt).backward(gyt)

        def run_ours(ours=ours, x=x, gy=gy):
            ours.forward(x, True)
            ours.backward(gy, True)

        dense_ms = None
        for s, period in _configs(sparsities, periods):
            if s == 0:
                ours.set_sparsity("dense", None)
            else:
                ours.set_sparsity("swat", LayerSparsity(1 - s, 1 - s, period))
            blk = period or 1
            for _ in range(WARMUP):  # (any blk consecutive steps hold exactly one refresh)
                run_ours()
                run_torch()
            to, tt = _median_interleaved(run_ours, run_torch, reps, budget_s, blk)
            if s == 0:
                dense_ms = to
            pred = predicted(model, batch, s, period, "all").get(name) if s else None
            out.append({"model": model, "layer": name, "sparse": name in sparse_names,
                        "op": node.op, "sparsity": s, "threads": threads, "batch": batch,
                        "ours_ms": round(to, 4), "torch_ms": round(tt, 4),
                        "speedup": round(tt / to, 4),
                        "density": round(float(ours.measured_density), 5),
                        "act_density": round(float(ours.measured_act_density), 5),
                        "topk_period": period, "amortised_over": blk,
                        "pred_speedup": None if pred is None else round(pred, 3),
                        "ours_dense_over_sparse": (round(dense_ms / to, 3)
                                                   if s and dense_ms else None),
                        "same_shape_layers": []})
            r = out[-1]
            seen.setdefault(sig, []).append(r)
            extra = ""
            if s:
                extra = (f" p={period}{'(amortised)' if blk > 1 else ''}"
                         f" own-dense/sparse x{r['ours_dense_over_sparse'] or 0:4.2f}"
                         + (f" hwmodel-pred x{pred:4.2f}" if pred else ""))
            print(f"{model:15s} {name:22s} s={s:<5} t={threads} b={batch:<3} "
                  f"ours {to:8.3f} ms  torch {tt:8.3f} ms  x{tt / to:5.2f}  "
                  f"d={r['density']:.3f} da={r['act_density']:.3f}{extra}", flush=True)
    return out


# ----------------------------------------------------------------------------- (b) steps
def _plan(spec, s, period):
    from hwmodel import SparsityPlan
    if s == 0:
        return SparsityPlan.dense()
    return SparsityPlan.uniform(spec, s, mode="swat", layers="swat", topk_period=period)


def step_batch(spec, batch: int) -> tuple[np.ndarray, np.ndarray]:
    """The fixed random batch every step benchmark trains on."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, *spec.input_shape)).astype(np.float32)
    y = rng.integers(0, spec.num_classes, batch).astype(np.int64)
    return x, y


def our_step(spec, x: np.ndarray, y: np.ndarray, s: float, period: int,
             adaptive: bool = False):
    """(network, a callable running one SGD step of it on x, y) with the SWAT plan at sparsity
    ``s`` (dense at 0), timing off. ``adaptive``: each step at the thread count of a
    :class:`~embedded.runtime.ThreadGovernor` over the current count, as ``train_local`` runs
    (the callable's ``governor``; None when fixed)."""
    import numba

    from embedded.network import Network
    from embedded.optim import SGD
    from embedded.runtime import ThreadGovernor, threads

    net = Network.from_spec(spec, seed=0)
    net.timing = False
    for layer in net.layers.values():
        layer.timing = False
    net.setup(x.shape[0])
    net.set_plan(_plan(spec, s, period))
    opt = SGD(net, momentum=0.9, weight_decay=5e-4)
    gov = ThreadGovernor(threads()) if adaptive and threads() > 1 else None

    def step() -> None:
        net.step_loss(x, y)
        opt.step(0.01)

    def governed() -> None:
        numba.set_num_threads(gov.threads)
        t = time.perf_counter()
        step()
        gov.record(time.perf_counter() - t)
        numba.set_num_threads(gov.max_threads)

    run = step if gov is None else governed
    run.governor = gov
    return net, run


def torch_step(spec, net, x: np.ndarray, y: np.ndarray):
    """A callable running one SGD step of ``spec``'s torch twin (starting from ``net``'s
    weights, same optimiser settings) on x, y."""
    import torch

    from hwmodel.torch_twin import to_torch

    tw = to_torch(spec)
    tw.load_state_dict({k: torch.from_numpy(v) for k, v in net.state_dict().items()})
    tw.train()
    topt = torch.optim.SGD(tw.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    lossf = torch.nn.CrossEntropyLoss()

    def run() -> None:
        topt.zero_grad(set_to_none=True)
        lossf(tw(xt), yt).backward()
        topt.step()
    return run


def bench_steps(model: str, threads: int, batch: int, sparsities, reps: int, periods,
                budget_s: float, adaptive: bool = True) -> list[dict]:
    from hwmodel import build

    spec = build(model)
    x, y = step_batch(spec, batch)
    out = []
    dense_ms = None
    for s, period in _configs(sparsities, periods):
        net, run_ours = our_step(spec, x, y, s, period or 1, adaptive)
        run_torch = torch_step(spec, net, x, y)
        blk = period or 1
        # (any blk consecutive steps hold exactly one refresh); a governed step also gets
        # past its first 1-thread check (after 10 steps), as a training run does at once
        for _ in range(GOVERNED_WARMUP if run_ours.governor else WARMUP):
            run_ours()
            run_torch()
        host: dict = {}
        to, tt = _median_interleaved(run_ours, run_torch, reps, budget_s, blk, host)
        if s == 0:
            dense_ms = to
        dens = [net.layers[n].measured_density for n in net.plan.layers] or [1.0]
        pred = predicted(model, batch, s, period, "swat").get("step") if s else None
        out.append({"model": model, "layer": "step", "sparse": s > 0, "op": "step",
                    "sparsity": s, "threads": threads, "batch": batch,
                    "ours_ms": round(to, 4), "torch_ms": round(tt, 4),
                    "speedup": round(tt / to, 4),
                    "density": round(float(np.mean(dens)), 5), "act_density": None,
                    "topk_period": period, "amortised_over": blk,
                    "pred_speedup": None if pred is None else round(pred, 3),
                    "ours_dense_over_sparse": (round(dense_ms / to, 3)
                                               if s and dense_ms else None),
                    "adaptive_threads": run_ours.governor is not None,
                    "ours_one_thread_steps": (run_ours.governor.steps_at_one
                                              if run_ours.governor else 0), **host})
        extra = ""
        if s:
            extra = (f" p={period}{'(amortised)' if blk > 1 else ''}"
                     f" own-dense/sparse x{out[-1]['ours_dense_over_sparse'] or 0:4.2f}"
                     + (f" hwmodel-pred x{pred:4.2f}" if pred else ""))
        print(f"{model:15s} {'STEP':22s} s={s:<5} t={threads} b={batch:<3} "
              f"ours {to:8.3f} ms  torch {tt:8.3f} ms  x{tt / to:5.2f}{extra}; a step: page "
              f"faults ours {host['ours_faults_per_call']:g} torch "
              f"{host['torch_faults_per_call']:g}, preempted ours "
              f"{host['ours_preempted_per_call']:g} torch {host['torch_preempted_per_call']:g}"
              f"; our steps at 1 thread {out[-1]['ours_one_thread_steps']}", flush=True)
    return out


# ----------------------------------------------------------------------------- memory / JIT
_CHILD = r"""
import os, sys, time, json, resource
sys.path.insert(0, {root!r})
import numpy as np
side, model, batch, s, period, threads = {args!r}
from hwmodel import build, SparsityPlan
spec = build(model)
rng = np.random.default_rng(0)
x = rng.standard_normal((batch, *spec.input_shape)).astype(np.float32)
y = rng.integers(0, spec.num_classes, batch).astype(np.int64)
def status(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0
if side == "ours":
    import numba
    numba.set_num_threads(threads)
    from embedded.network import Network
    from embedded.optim import SGD
    import gc
    # load the compiled kernels (a throw-away copy at batch 2), so the baseline holds the code
    warm = Network.from_spec(spec, seed=1); warm.setup(2)
    if s:
        warm.set_plan(SparsityPlan.uniform(spec, s, mode="swat", layers="swat"))
    t0 = time.perf_counter()
    warm.step_loss(x[:2], y[:2])  # the process's first step: compiles (or loads) the kernels
    jit = time.perf_counter() - t0
    del warm; gc.collect()
    base = status("VmRSS")  # after imports and code loading, before the model exists
    net = Network.from_spec(spec, seed=0)
    net.setup(batch)
    if s:
        net.set_plan(SparsityPlan.uniform(spec, s, mode="swat", layers="swat", topk_period=period))
    opt = SGD(net, momentum=0.9, weight_decay=5e-4)
    def step():
        net.step_loss(x, y); opt.step(0.01)
else:
    import torch
    torch.set_num_threads(threads)
    from hwmodel.torch_twin import to_torch
    import gc
    warm = to_torch(spec); warm.train()  # same warm-up as ours: one step of a throw-away copy
    t0 = time.perf_counter()
    torch.nn.functional.cross_entropy(warm(torch.from_numpy(x[:2])),
                                      torch.from_numpy(y[:2])).backward()
    jit = time.perf_counter() - t0
    del warm; gc.collect()
    base = status("VmRSS")  # after imports and warm-up, before the model exists
    tw = to_torch(spec); tw.train()
    opt = torch.optim.SGD(tw.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    xt = torch.from_numpy(x); yt = torch.from_numpy(y); lf = torch.nn.CrossEntropyLoss()
    def step():
        opt.zero_grad(set_to_none=True); lf(tw(xt), yt).backward(); opt.step()
step()
t0 = time.perf_counter(); step(); second = time.perf_counter() - t0
for _ in range(3):
    step()
peak = status("VmHWM")  # per address space: not inherited from the parent
mem = getattr(net, "memory_bytes", lambda: 0)() if side == "ours" else 0
print(json.dumps(dict(first_s=jit, second_s=second, base_rss=base, peak_rss=peak,
                      step_peak=peak - base, arrays_bytes=mem)))
"""


def child(side: str, model: str, batch: int, s: float, period: int, threads: int,
          fresh_cache: bool) -> dict:
    env = dict(os.environ)
    code = _CHILD.format(root=ROOT, args=(side, model, batch, s, period, threads))
    with tempfile.TemporaryDirectory(prefix="numba_cache_") as tmp:  # removed afterwards
        if fresh_cache:
            env["NUMBA_CACHE_DIR"] = tmp
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           env=env, timeout=900)
    if r.returncode != 0:
        raise RuntimeError(f"child {side} {model} failed: {r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def bench_memory_jit(models, batch: int, s: float, period: int, threads: int,
                     jit: bool, jit_models=None) -> list[dict]:
    out = []
    for model in models:
        jit_this = jit and (jit_models is None or model in jit_models)
        o = child("ours", model, batch, s, period, threads, fresh_cache=False)
        t = child("torch", model, batch, s, period, threads, fresh_cache=False)
        rec = {"model": model, "layer": "memory", "sparsity": s, "threads": threads,
               "batch": batch, "ours_step_peak_mb": round(o["step_peak"] / 2**20, 1),
               "torch_step_peak_mb": round(t["step_peak"] / 2**20, 1),
               "ours_process_peak_mb": round(o["peak_rss"] / 2**20, 1),
               "torch_process_peak_mb": round(t["peak_rss"] / 2**20, 1),
               "ours_arrays_mb": round(o["arrays_bytes"] / 2**20, 2)}
        if jit_this:
            f = child("ours", model, batch, s, period, threads, fresh_cache=True)
            rec["jit_first_step_s"] = round(f["first_s"], 2)  # incl. compiling every kernel
            rec["steady_step_s"] = round(f["second_s"], 4)
        out.append(rec)
        print(f"{model:15s} MEMORY s={s} b={batch}: peak memory of training (model + steps, "
              f"above the post-import RSS) ours {rec['ours_step_peak_mb']} MB vs torch "
              f"{rec['torch_step_peak_mb']} MB; process peaks {rec['ours_process_peak_mb']} vs "
              f"{rec['torch_process_peak_mb']} MB; our training arrays "
              f"{rec['ours_arrays_mb']} MB"
              + (f"; first step in a fresh process (empty Numba cache) "
                 f"{rec['jit_first_step_s']} s vs steady {rec['steady_step_s']} s"
                 if jit_this else ""),
              flush=True)
    return out


# ----------------------------------------------------------------------------- main
def _per_layer(sel: list[dict], key: str) -> list[float]:
    """``key`` of each record once per layer it stands for: --quick measures one layer of
    each shape and lists the others in ``same_shape_layers``, so medians stay medians over
    layers, as in a full run."""
    return [r[key] for r in sel if r.get(key)
            for _ in range(1 + len(r.get("same_shape_layers", ())))]


def _over(sp: list[float], sel: list[dict]) -> str:
    return f"over {len(sp)} layers" + (f" ({len(sel)} shapes measured)" if len(sel) < len(sp)
                                        else "")


def _reference_period_lines(lay: list[dict]) -> list[str]:
    """Per-layer medians at ALGORITHMS.md's reference top-K periods: convs at the benchmark's
    period > 1 (reference 10-20), linear layers every step."""
    out = []
    for t, b, s in sorted({(r["threads"], r["batch"], r["sparsity"]) for r in lay
                           if r["sparsity"]}):
        sel = [r for r in lay if (r["threads"], r["batch"], r["sparsity"]) == (t, b, s)
               and r["sparse"]]
        periods = sorted({r.get("topk_period") or 1 for r in sel})
        if len(periods) < 2:
            continue
        ref = [r for r in sel if (r.get("topk_period") or 1) == (
            periods[-1] if r["op"] == "conv2d" else 1)]
        sp = _per_layer(ref, "speedup")
        out.append(f"  threads={t} batch={b} sparsity={s} at the reference periods (convs "
                   f"{periods[-1]}, linear 1): median x{statistics.median(sp):.2f} "
                   f"min x{min(sp):.2f} {_over(sp, ref)}")
    return out


def summarise(records: list[dict]) -> list[str]:
    """Print (and return as lines) the per-layer medians and the whole-step speed-ups."""
    lines = ["Per-layer median speedup over the SWAT plan's sparse layers (torch_ms / ours_ms; "
             "p>1 rows are amortised over the whole top-K period, refresh step included; "
             "pred = hwmodel's predicted sparse-vs-dense speed-up of our trainer, "
             "own = our measured dense/sparse; --quick measures one layer of each shape and "
             "counts it once per layer of that shape):"]
    lay = [r for r in records if r.get("op") in ("conv2d", "linear")]
    keys = sorted({(r["threads"], r["batch"], r["sparsity"], r.get("topk_period") or 0)
                   for r in lay})
    for t, b, s, p in keys:
        sel = [r for r in lay if r["threads"] == t and r["batch"] == b and r["sparsity"] == s
               and (r.get("topk_period") or 0) == p and (r["sparse"] or s == 0)]
        if not sel:
            continue
        sp = _per_layer(sel, "speedup")
        own = _per_layer(sel, "ours_dense_over_sparse")
        pr = _per_layer(sel, "pred_speedup")
        worst = min(sel, key=lambda r: r["speedup"])
        lines.append(
            f"  threads={t} batch={b} sparsity={s}" + (f" topk_period={p}" if s else "")
            + f": median x{statistics.median(sp):.2f} min x{min(sp):.2f} "
            f"({worst['model']} {worst['layer']}) max x{max(sp):.2f} {_over(sp, sel)}"
            + (f"; own x{statistics.median(own):.2f}" if own else "")
            + (f"; pred x{statistics.median(pr):.2f}" if pr else ""))
    lines += _reference_period_lines(lay)
    for r in records:
        if r.get("op") == "step":
            lines.append(
                f"  step {r['model']} threads={r['threads']} batch={r['batch']} "
                f"sparsity={r['sparsity']}"
                + (f" topk_period={r['topk_period']}" if r["sparsity"] else "")
                + f": x{r['speedup']:.2f}"
                + (f" (own x{r['ours_dense_over_sparse']:.2f}" if r.get("ours_dense_over_sparse")
                   else "")
                + (f", pred x{r['pred_speedup']:.2f})" if r.get("pred_speedup") else
                   (")" if r.get("ours_dense_over_sparse") else "")))
    print("\n" + "\n".join(lines))
    return lines


def gemm_backends() -> dict:
    """What the dense rows compare: the BLAS our dense GEMMs call (SciPy's library, OpenBLAS
    in its wheels: which kernels it runs, which ``OPENBLAS_CORETYPE`` pins where the machine
    sets it; every BLAS loaded if SciPy's is not told apart) and torch's CPU capability (its
    oneDNN convolutions pick their own kernels)."""
    import torch
    from threadpoolctl import threadpool_info

    import embedded.kernels.gemm  # noqa: F401  (loads SciPy's BLAS)

    libs = [{k: i.get(k) for k in ("internal_api", "version", "architecture")}
            | {"file": os.path.basename(i.get("filepath", ""))}
            for i in threadpool_info() if i.get("user_api") == "blas"]
    return {"ours": [b for b in libs if "scipy_openblas-" in b["file"]] or libs,
            "OPENBLAS_CORETYPE": os.environ.get("OPENBLAS_CORETYPE"),
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability()}


def _backends_line(bk: dict) -> str:
    ours = ", ".join(f"{b['internal_api']} {b['version']} {b['architecture']} kernels"
                     for b in bk["ours"])
    pin = bk["OPENBLAS_CORETYPE"]
    return (f"Dense GEMMs (sparsity 0 rows, linear layers' GEMMs): {ours}"
            + (f" (OPENBLAS_CORETYPE={pin} in the environment)" if pin else "")
            + f"; torch CPU capability {bk['torch_cpu_capability']}")


def write_md(path: str, records: list[dict], lines: list[str], argv) -> None:
    """A short markdown summary beside the JSON."""
    rows = ["| model | layer | sparsity | topk_period | ours ms | torch ms | speedup | "
            "own dense/sparse | hwmodel pred | density |", "|" + "---|" * 10]
    for r in records:
        if r.get("op") not in ("conv2d", "linear", "step"):
            continue
        rows.append(f"| {r['model']} | {r['layer']} | {r['sparsity']} | "
                    f"{r.get('topk_period') or '-'} | {r['ours_ms']:.3f} | {r['torch_ms']:.3f} | "
                    f"{r['speedup']:.2f} | {r.get('ours_dense_over_sparse') or '-'} | "
                    f"{r.get('pred_speedup') or '-'} | {r['density']} |")
    mem = [r for r in records if r.get("layer") == "memory"]
    with open(path, "w", encoding="utf-8") as f:
        f.write("# train_step benchmark\n\n`python benchmarks/train_step.py "
                + " ".join(argv) + "`\n\n```\n" + "\n".join(lines) + "\n```\n\n")
        for m in mem:
            f.write(f"- {m['model']} memory (s={m['sparsity']}): step peak ours "
                    f"{m['ours_step_peak_mb']} MB vs torch {m['torch_step_peak_mb']} MB"
                    + (f"; first step with an empty Numba cache {m['jit_first_step_s']} s"
                       if "jit_first_step_s" in m else "") + "\n")
        f.write("\n" + "\n".join(rows) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer repeats, 2 threads, batch 16")
    ap.add_argument("--json", default=os.path.join(ROOT, "benchmarks", "results",
                                                   "train_step.json"))
    ap.add_argument("--threads", default=None, help="comma list (default 1,2; quick: 2)")
    ap.add_argument("--batch", default=None, help="comma list (default 16,32; quick: 16)")
    ap.add_argument("--sparsity", default="0,0.9,0.95")
    ap.add_argument("--models", default=",".join(MODELS_LAYERS))
    ap.add_argument("--layers", default=None, help="only these layer names")
    ap.add_argument("--topk-period", default="1,10",
                    help="comma list of SWAT top-K refresh periods (1 = exact every step, the "
                         "costliest; p > 1 rows are amortised over the period)")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--no-steps", action="store_true")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--fixed-threads", action="store_true",
                    help="our whole steps never leave the thread count (no ThreadGovernor)")
    args = ap.parse_args(argv)
    allocator = "glibc thresholds raised" if steady_allocator() else "default"
    threads = [int(v) for v in (args.threads or ("2" if args.quick else "1,2")).split(",")]
    batches = [int(v) for v in (args.batch or ("16" if args.quick else "16,32")).split(",")]
    sparsities = [float(v) for v in args.sparsity.split(",")]
    models = args.models.split(",")
    reps = args.reps or (5 if args.quick else 15)
    budget = 1.0 if args.quick else 6.0
    only = set(args.layers.split(",")) if args.layers else None
    periods = [int(v) for v in args.topk_period.split(",")]
    if any(p < 1 for p in periods):
        ap.error(f"--topk-period: expected integers >= 1, got {args.topk_period!r}")
    records: list[dict] = []
    for t in threads:
        set_threads(t)
        for b in batches:
            for m in models:
                records += bench_layers(m, t, b, sparsities, reps, periods, budget,
                                        only, dedupe=args.quick)
            if not args.no_steps and not only:
                for m in MODELS_STEP:
                    if m in models:
                        records += bench_steps(m, t, b, sparsities, reps, periods,
                                               budget * 2, not args.fixed_threads)
    if not args.no_memory and not only:
        b = batches[0]
        for s in ([0.0, 0.9] if not args.quick else [0.9]):
            records += bench_memory_jit([m for m in MODELS_STEP if m in models], b, s,
                                        periods[0], max(threads), jit=(s == 0.9),
                                        jit_models=["femnist_cnn"] if args.quick else None)
    lines = summarise(records)
    backends = gemm_backends()
    lines.append(_backends_line(backends))
    print(lines[-1])
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"format": "sparsefl.bench.train_step/1", "records": records,
                       "argv": sys.argv[1:], "cpu_count": os.cpu_count(),
                       "threading_layer": LAYER, "gemm_backends": backends,
                       "allocator": allocator}, f,
                      indent=1)
        print(f"wrote {args.json}")
        md = os.path.splitext(args.json)[0] + ".md"
        write_md(md, records, lines, sys.argv[1:])
        print(f"wrote {md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
