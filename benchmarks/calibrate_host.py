"""Calibrate the ``generic-x86`` profile from per-layer, per-phase timings on this host.

    python benchmarks/calibrate_host.py [--backend numba|torch]
        [--models lenet5,femnist_cnn,resnet8,mlp] [--batches 16,32] [--sparsities 0,0.5,0.9,0.95]
        [--threads 1] [--repeats 20] [--clock cpu|wall] [--cache-bytes N] [--interleave 5]
        [--fine]
        [--json benchmarks/results/calibrate_host.json] [--write-profile PATH]
        [--from-json PATH]    # refit measurements saved by an earlier run (no timing)

For each model, batch and sparsity, every layer's phases (forward, backward-input,
backward-weight, SGD-momentum update) and the loss are timed (median and IQR over
``--repeats`` after warm-up), giving :class:`hwmodel.measure.Measurement` records. Then
``hwmodel.calibrate`` fits generic-x86 to all of them, and the leave-one-model-out error
(fit on the other models, predict the held-out one) is printed as median and p90 absolute
percentage error, per layer-phase and per whole training step (the sum of a step's
layer-phases, predicted against measured).

Measuring backends are pluggable (``BACKENDS``: name -> function(spec, batch, sparsity,
threads, repeats) -> list of Measurement):

* ``numba`` (default): sparsefl's own trainer (``embedded.Network`` + SGD) at each sparsity with
  the SWAT plan, step by step, from the timings the trainer records itself;
* ``torch``: each layer alone with torch's **dense** kernels (forward with grad mode on, as in
  training; the per-call cost of ``torch.autograd.grad``, measured on a one-element graph, is
  taken off the backward timings). Whatever sparsity is asked for, these are at density 1 (a
  dense kernel cannot show a sparse speed-up), so the sparse-efficiency curve is not fitted
  from them; the result's ``note`` says so.

Timings use process CPU time by default (``--clock cpu``; BLAS pools are capped to
``--threads``), because the development host is shared: other jobs preempt us and inflate wall
time, not CPU time. With one thread, CPU time is the busy time of the kernels. One thread is
the default (``--threads``); the noise of the run is reported (IQR / median of the repeats).

The time model fitted is :mod:`hwmodel.estimator`'s with the optional refinements (efficiency
per op class and phase, elementwise efficiency per op, sparse kernels per op class and phase,
top-K / compression costs, per-kind overheads, a cache bandwidth below ``--cache-bytes``,
default this core's L2 size from sysfs); see :mod:`hwmodel.calibration`. The held-out error is
also reported for the rows whose kind of work (pool, norm, add, ...) some other model exercises
("covered"): a kind only one model has can only be predicted from the coarser fit.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import time
from collections.abc import Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402

import hwmodel  # noqa: E402
from hwmodel.calibration import calibrate, calibration_error, leave_one_model_out  # noqa: E402
from hwmodel.calibration import predict as hwmodel_predict  # noqa: E402
from hwmodel.measure import Measurement  # noqa: E402
from hwmodel.profiles import load_profile, save_profile  # noqa: E402
from hwmodel.spec import INPUT, ModelSpec  # noqa: E402

Measurer = Callable[[ModelSpec, int, float, int, int], list]


#: The clock timings use: process CPU time by default (other jobs on a shared host preempt us,
#: which inflates wall time but not CPU time; with one thread, CPU time is the busy time).
CLOCK: dict[str, Callable[[], float]] = {"now": time.process_time}


def _time(fn: Callable[[], object], repeats: int, warmup: int = 2) -> tuple[float, float, int]:
    clock = CLOCK["now"]
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(repeats):
        t0 = clock()
        fn()
        ts.append(clock() - t0)
    med, iqr = Measurement.summarise(ts)
    return med, iqr, len(ts)


def torch_measure(spec: ModelSpec, batch: int, sparsity: float, threads: int,
                  repeats: int) -> list[Measurement]:
    """Time every node's phases with torch's dense kernels (density 1 whatever ``sparsity``)."""
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    out: list[Measurement] = []

    # torch.autograd.grad costs more per call than a forward op; measure that harness cost on
    # a one-element graph and take it off the backward timings (a trainer calls the backward
    # kernels directly)
    x0 = torch.randn(1, requires_grad=True)
    y0 = x0 * 2.0
    g0 = torch.ones(1)
    t_grad = _time(lambda: torch.autograd.grad(y0, [x0], g0, retain_graph=True), 50, 5)[0]
    t_fwd = _time(lambda: x0 * 2.0, 50, 5)[0]
    harness = max(0.0, t_grad - t_fwd)

    def rec(layer: str, typ: str, phase: str, fn: Callable[[], object]) -> None:
        med, iqr, n = _time(fn, repeats)
        if phase in ("backward_input", "backward_weight"):
            med = max(med - harness, 0.25 * med)
        out.append(Measurement(spec.name, layer, typ, phase, 1.0, 1.0, batch, threads, med, iqr,
                               n, device="generic-x86", provenance="measured"))

    def sgd(params: list) -> Callable[[], None]:
        bufs = [torch.zeros_like(p) for p in params]
        grads = [torch.randn_like(p) for p in params]

        def step() -> None:
            with torch.no_grad():
                for p, g, b in zip(params, grads, bufs, strict=True):
                    g.add_(p, alpha=5e-4)
                    b.mul_(0.9).add_(g)
                    p.add_(b, alpha=-0.01)
        return step

    for node in spec.nodes:
        a = node.attrs
        in_shape = spec.in_shapes[node.name][0]
        x = torch.randn(batch, *in_shape, requires_grad=node.inputs[0] != INPUT)
        params: list = []
        if node.op == "conv2d":
            w = torch.randn(*spec.param_shapes(node.name)[f"{node.name}.weight"], requires_grad=True)
            b = torch.randn(a["out_channels"], requires_grad=True) if a["bias"] else None
            params = [w] + ([b] if b is not None else [])

            def fwd(x=x, w=w, b=b, a=a):
                return F.conv2d(x, w, b, a["stride"], a["padding"], 1, a["groups"])
        elif node.op == "linear":
            w = torch.randn(*spec.param_shapes(node.name)[f"{node.name}.weight"], requires_grad=True)
            b = torch.randn(a["out_features"], requires_grad=True) if a["bias"] else None
            params = [w] + ([b] if b is not None else [])

            def fwd(x=x, w=w, b=b):
                return F.linear(x, w, b)
        elif node.op in ("batchnorm2d", "groupnorm"):
            c = in_shape[0]
            g = torch.ones(c, requires_grad=True)
            be = torch.zeros(c, requires_grad=True)
            params = [g, be]
            if node.op == "batchnorm2d":
                rm, rv = torch.zeros(c), torch.ones(c)

                def fwd(x=x, g=g, be=be, rm=rm, rv=rv):
                    return F.batch_norm(x, rm, rv, g, be, training=True)
            else:
                def fwd(x=x, g=g, be=be, ng=a["num_groups"]):
                    return F.group_norm(x, ng, g, be)
        elif node.op == "relu":
            def fwd(x=x):
                return F.relu(x)
        elif node.op == "dropout":
            def fwd(x=x, p=a["p"]):
                return F.dropout(x, p, training=True)
        elif node.op == "maxpool2d":
            def fwd(x=x, a=a):
                return F.max_pool2d(x, a["kernel"], a["stride"], a["padding"])
        elif node.op == "avgpool2d":
            def fwd(x=x, a=a):
                return F.avg_pool2d(x, a["kernel"], a["stride"], a["padding"])
        elif node.op == "global_avgpool":
            def fwd(x=x):
                return x.mean(dim=(2, 3))
        elif node.op == "add":
            x2 = torch.randn(batch, *in_shape)

            def fwd(x=x, x2=x2):
                return x + x2
        else:  # flatten: a view, no work
            continue
        # forward as in training: grad mode on (the graph is recorded, pools keep indices)
        rec(node.name, node.op, "forward", fwd)
        y = fwd()
        gy = torch.randn_like(y)
        # the add's gradient passes through unchanged in torch (the fan-out sum happens at the
        # producer, which single-layer timing does not see): not measured
        if x.requires_grad and node.op != "add":
            rec(node.name, node.op, "backward_input",
                lambda y=y, x=x, gy=gy: torch.autograd.grad(y, [x], gy, retain_graph=True))
        if params:
            rec(node.name, node.op, "backward_weight",
                lambda y=y, p=params, gy=gy: torch.autograd.grad(y, p, gy, retain_graph=True))
            rec(node.name, node.op, "update", sgd([p.detach().clone() for p in params]))
    # softmax cross-entropy over the logits
    logits = torch.randn(batch, spec.num_classes, requires_grad=True)
    target = torch.randint(0, spec.num_classes, (batch,))
    rec("loss", "cross_entropy", "forward", lambda: F.cross_entropy(logits, target))
    loss = F.cross_entropy(logits, target)
    rec("loss", "cross_entropy", "backward_input",
        lambda: torch.autograd.grad(loss, [logits], retain_graph=True))
    return out


def numba_measure(spec: ModelSpec, batch: int, sparsity: float, threads: int,
                  repeats: int) -> list[Measurement]:
    """Time sparsefl's own Numba trainer (embedded.Network + SGD) step by step.

    SWAT plan at ``sparsity`` (first layer and classifier dense); conv/linear layers time their
    three phases themselves, other nodes are timed by the network (batch norm's backward covers
    both of its gradients: ``backward_input+backward_weight``), the optimizer times each layer's
    update, and the fused softmax cross-entropy (loss and gradient) is ``forward+backward_input``
    of ``loss``. The densities recorded are the ones the kernels measured.
    """
    with _trainer_clock(threads):
        gen = _numba_steps(spec, batch, sparsity, threads, repeats)
        return _drive(gen, [False] * 3 + [True] * repeats)


class _trainer_clock:
    """The trainer times itself with time.perf_counter; point it at our clock meanwhile."""

    def __init__(self, threads: int):
        import numba

        import embedded.layers.conv as conv_mod
        import embedded.network as net_mod
        import embedded.optim as optim_mod

        numba.set_num_threads(threads)
        self.mods = (conv_mod, net_mod, optim_mod)

    def __enter__(self) -> None:
        self.saved = {m: m.time for m in self.mods}
        shim = type("Clock", (), {"perf_counter": staticmethod(CLOCK["now"])})
        for m in self.mods:
            m.time = shim

    def __exit__(self, *exc: object) -> None:
        for m, t in self.saved.items():
            m.time = t


def _drive(gen, plan: list[bool]) -> list[Measurement]:
    """Run a step generator: one step per entry of ``plan`` (True: record it), then finish."""
    next(gen)
    for rec in plan:
        gen.send(rec)
    try:
        gen.send(None)
    except StopIteration as stop:
        return stop.value
    raise RuntimeError("step generator did not finish")


def _numba_steps(spec: ModelSpec, batch: int, sparsity: float, threads: int, repeats: int):
    """A generator over training steps: ``send(True)`` runs a recorded step, ``send(False)`` a
    warm-up step, ``send(None)`` ends it and returns the measurements (StopIteration.value)."""
    from embedded.bench import StepBench

    bench = StepBench(spec, sparsity, batch, clock=CLOCK["now"])
    while True:
        record = yield
        if record is None:
            break
        bench.step(record)
    return bench.measurements(threads, device="generic-x86", provenance="measured")


BACKENDS: dict[str, Measurer] = {"numba": numba_measure, "torch": torch_measure}


def _collect_interleaved(models: list[str], batches: list[int], sparsities: list[float],
                         threads: int, repeats: int, rounds: int) -> tuple[list[Measurement], list[str]]:
    """Every configuration's network is built first; then ``rounds`` times round-robin over
    the configurations, each runs one warm-up step and ``repeats / rounds`` recorded steps, so
    a slow spell of the shared host spreads over all models instead of biasing one."""
    configs = [(m, b, s) for m in models for b in batches for s in sparsities]
    chunk = [repeats // rounds + (1 if i < repeats % rounds else 0) for i in range(rounds)]
    with _trainer_clock(threads):
        gens = []
        for model, batch, s in configs:
            g = _numba_steps(hwmodel.build(model), batch, s, threads, repeats)
            next(g)
            for _ in range(2):  # JIT compile and first-touch warm-up
                g.send(False)
            gens.append(g)
        for c in chunk:
            for g in gens:
                g.send(False)  # warm the caches for this configuration again
                for _ in range(c):
                    g.send(True)
        out: list[Measurement] = []
        runs: list[str] = []
        for (model, batch, s), g in zip(configs, gens, strict=True):
            try:
                g.send(None)
            except StopIteration as stop:
                out.extend(stop.value)
                runs.extend([f"{model}/{batch}/{s:g}"] * len(stop.value))
    return out, runs


def collect(models: list[str], batches: list[int], sparsities: list[float], threads: int,
            repeats: int, backend: str = "numba",
            interleave: int = 1) -> tuple[list[Measurement], list[str]]:
    """Measurements of every model x batch x sparsity with the chosen backend, and for each the
    run it came from (``model/batch/sparsity``: the layer-phases of one training step).
    ``interleave > 1`` (numba): round-robin over the configurations in that many rounds."""
    measure = BACKENDS[backend]
    out: list[Measurement] = []
    runs: list[str] = []
    if backend == "numba" and interleave > 1:
        return _collect_interleaved(models, batches, sparsities, threads, repeats, interleave)
    for model in models:
        spec = hwmodel.build(model)
        for batch in batches:
            for s in sparsities:
                if backend == "torch" and s != sparsities[0]:
                    continue  # dense kernels: one run per batch covers every sparsity
                got = measure(spec, batch, s, threads, repeats)
                out.extend(got)
                runs.extend([f"{model}/{batch}/{s:g}"] * len(got))
    return out, runs


def step_errors(ms: list[Measurement], runs: list[str], pred: list[float]) -> dict:
    """Whole-step error: per run, the sum of the predicted layer-phases against the sum of the
    measured ones (over the layer-phases the model predicts)."""
    tot: dict[str, list[float]] = {}
    for m, r, p in zip(ms, runs, pred, strict=True):
        if np.isfinite(p):
            t = tot.setdefault(r, [0.0, 0.0])
            t[0] += p
            t[1] += m.median_s
    ape = {r: 100.0 * abs(p - m) / m for r, (p, m) in tot.items()}
    vals = np.array(list(ape.values()))
    return {"n": len(vals), "median_ape_pct": float(np.median(vals)),
            "p90_ape_pct": float(np.percentile(vals, 90)), "runs": ape}


def l2_cache_bytes() -> int:
    """This host's per-core L2 size (sysfs), 0 if unknown."""
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for idx in sorted(os.listdir(base)):
            d = os.path.join(base, idx)
            with open(os.path.join(d, "level"), encoding="ascii") as f:
                if f.read().strip() != "2":
                    continue
            with open(os.path.join(d, "size"), encoding="ascii") as f:
                txt = f.read().strip().upper()
            mult = {"K": 1024, "M": 1024 ** 2}.get(txt[-1], 1)
            return int(txt.rstrip("KM")) * mult
    except (OSError, ValueError):
        pass
    return 0


def covered_error(ms: list[Measurement], pred: list[float]) -> dict:
    """Held-out error over the measurements whose layer type some other model also has."""
    types: dict[str, set[str]] = {}
    for m in ms:
        types.setdefault(m.layer_type, set()).add(m.model)
    ape = [100.0 * abs(p - m.median_s) / m.median_s for m, p in zip(ms, pred, strict=True)
           if np.isfinite(p) and len(types[m.layer_type] - {m.model}) > 0]
    a = np.array(ape)
    return {"n": int(a.size), "median_ape_pct": float(np.median(a)) if a.size else None,
            "p90_ape_pct": float(np.percentile(a, 90)) if a.size else None}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", default="numba", choices=sorted(BACKENDS))
    ap.add_argument("--models", default="lenet5,femnist_cnn,resnet8,mlp")
    ap.add_argument("--batches", default="16,32")
    ap.add_argument("--sparsities", default="0,0.5,0.9,0.95")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--clock", choices=("cpu", "wall"), default="cpu",
                    help="cpu: process CPU time (robust on a shared host); wall: perf_counter")
    ap.add_argument("--profile", default="generic-x86", help="profile to calibrate")
    ap.add_argument("--json", default=os.path.join(ROOT, "benchmarks", "results",
                                                   "calibrate_host.json"))
    ap.add_argument("--write-profile", default=None, metavar="PATH",
                    help="also save the calibrated profile TOML here")
    ap.add_argument("--fine", action="store_true",
                    help="also fit MAC efficiency per phase and overhead per kind (more unknowns: "
                         "lower in-sample, higher held-out error on this host's data)")
    ap.add_argument("--interleave", type=int, default=5, metavar="ROUNDS",
                    help="numba: round-robin over all configurations in this many rounds of "
                         "repeats/ROUNDS steps each (1: one configuration after another)")
    ap.add_argument("--cache-bytes", type=int, default=None,
                    help="working-set size of the cache term (default: this core's L2; 0: off)")
    ap.add_argument("--from-json", default=None, metavar="PATH",
                    help="refit the measurements of an earlier run's JSON instead of timing")
    args = ap.parse_args(argv)
    cache_bytes = l2_cache_bytes() if args.cache_bytes is None else args.cache_bytes
    CLOCK["now"] = time.process_time if args.clock == "cpu" else time.perf_counter
    # BLAS's own pools at one thread (spinning BLAS threads would count as our CPU time; the
    # trainer's dense GEMMs split over Numba's threads, embedded.kernels.gemm)
    from threadpoolctl import threadpool_limits
    threadpool_limits(limits=1, user_api="blas")
    models = args.models.split(",")
    batches = [int(b) for b in args.batches.split(",")]
    sparsities = [float(s) for s in args.sparsities.split(",")]

    t0 = time.perf_counter()
    if args.from_json:
        with open(args.from_json, encoding="utf-8") as f:
            old = json.load(f)
        ms = [Measurement.from_dict(m) for m in old["measurements"]]
        runs = old.get("runs") or [f"{m.model}/{m.batch}/?" for m in ms]
        models = sorted({m.model for m in ms}, key=[m.model for m in ms].index)
    else:
        ms, runs = collect(models, batches, sparsities, args.threads, args.repeats, args.backend,
                           args.interleave)
    t_measure = time.perf_counter() - t0
    noise = np.array([m.iqr_s / m.median_s for m in ms if m.median_s > 0])
    base = load_profile(args.profile)
    before = calibration_error(base, ms)
    t1 = time.perf_counter()
    opts = {"mac_per_phase": args.fine, "kind_overheads": args.fine}
    fitted = calibrate(base, ms, cache_bytes=cache_bytes, **opts)
    after = calibration_error(fitted, ms)
    lomo = leave_one_model_out(base, ms, cache_bytes=cache_bytes, **opts)
    t_fit = time.perf_counter() - t1
    preds = lomo.pop("predictions")
    steps = step_errors(ms, runs, preds)
    covered = covered_error(ms, preds)
    base_steps = step_errors(ms, runs, list(hwmodel_predict(base, ms)))
    in_steps = step_errors(ms, runs, list(hwmodel_predict(fitted, ms)))

    note = ("torch backend: dense kernels, every measurement at density 1; the sparse-efficiency "
            "curve is not fitted from them" if args.backend == "torch" else "")
    print(f"calibrate_host: {len(ms)} per-layer/phase measurements ({args.backend}, "
          f"{args.threads} thread(s), {args.clock} clock, batches {batches}) of {', '.join(models)} "
          f"in {t_measure:.1f} s; fits {t_fit:.1f} s; cache term below {cache_bytes} B")
    print(f"  noise: IQR/median of the repeats: median {100 * np.median(noise):.1f}%, "
          f"p90 {100 * np.percentile(noise, 90):.1f}% (shared host; load average "
          f"{os.getloadavg()[0]:.1f})")
    if note:
        print(f"  note: {note}")
    print(f"  uncalibrated {args.profile}: median {before['median_ape_pct']:.1f}%  "
          f"p90 {before['p90_ape_pct']:.1f}% absolute error")
    print(f"  calibrated, in sample:      median {after['median_ape_pct']:.1f}%  "
          f"p90 {after['p90_ape_pct']:.1f}%")
    print(f"  leave-one-model-out:        median {lomo['median_ape_pct']:.1f}%  "
          f"p90 {lomo['p90_ape_pct']:.1f}%  (aim: median <= 15%)")
    for m, r in lomo["models"].items():
        print(f"    held out {m:<12} n={r['n']:<4} median {r['median_ape_pct']:.1f}%  "
              f"p90 {r['p90_ape_pct']:.1f}%")
    print(f"  leave-one-model-out, rows whose layer type another model has (n={covered['n']}): "
          f"median {covered['median_ape_pct']:.1f}%  p90 {covered['p90_ape_pct']:.1f}%")
    print(f"  whole training steps ({steps['n']} runs): uncalibrated median "
          f"{base_steps['median_ape_pct']:.1f}% p90 {base_steps['p90_ape_pct']:.1f}%; in sample "
          f"median {in_steps['median_ape_pct']:.1f}% p90 {in_steps['p90_ape_pct']:.1f}%")
    print(f"  leave-one-model-out, whole training steps ({steps['n']} runs): median "
          f"{steps['median_ape_pct']:.1f}%  p90 {steps['p90_ape_pct']:.1f}%")
    for r, e in steps["runs"].items():
        print(f"    {r:<22} {e:.1f}%")
    fit_values = {
        "efficiency": fitted.efficiency, "overhead_s": fitted.overhead_s,
        "mem_bandwidth_gbs": fitted.mem_bandwidth_gbs, "overheads": fitted.overheads,
        "cache_bytes": fitted.cache_bytes, "cache_bandwidth_gbs": fitted.cache_bandwidth_gbs,
        "overlap": fitted.overlap, "compress_nnz_s": fitted.compress_nnz_s,
        "sparse_kernels": {k: [v.efficiency, v.fixed] for k, v in fitted.sparse_kernels.items()},
        "sparse_efficiency": {"densities": list(fitted.sparse_efficiency.densities),
                              "efficiency": list(fitted.sparse_efficiency.efficiency)},
        "fitted": list(fitted.fitted),
    }
    print(f"  fitted: efficiency {({k: round(v, 4) for k, v in fitted.efficiency.items()})}, "
          f"overhead {fitted.overhead_s * 1e6:.1f} us, bandwidth {fitted.mem_bandwidth_gbs:.1f} GB/s")
    result = {
        "benchmark": "calibrate_host", "date": dt.date.today().isoformat(),
        "backend": args.backend, "note": note, "clock": args.clock, "threads": args.threads, "batches": batches,
        "models": models, "sparsities": sparsities, "profile": args.profile,
        "error_uncalibrated": before, "error_in_sample": after, "leave_one_model_out": lomo,
        "leave_one_model_out_steps": steps, "leave_one_model_out_covered": covered,
        "steps_uncalibrated": base_steps, "steps_in_sample": in_steps,
        "noise_iqr_over_median": {"median": float(np.median(noise)),
                                  "p90": float(np.percentile(noise, 90))}, "cache_bytes": cache_bytes,
        "runs": runs,
        "fitted": fit_values, "host": platform.platform(), "cpu_count": os.cpu_count(),
        "load_average": os.getloadavg(), "measure_s": t_measure,
        "measurements": [m.to_dict() for m in ms],
    }
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1, default=float)
        print(f"  wrote {args.json}")
    if args.write_profile:
        save_profile(fitted, args.write_profile)
        print(f"  wrote {args.write_profile}")
    return 0 if np.isfinite(lomo["median_ape_pct"]) else 1


if __name__ == "__main__":
    sys.exit(main())
