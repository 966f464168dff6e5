"""Local training: ``train_local(net, x, y, config, plan, mask_schedule) -> TrainStats`` and
``evaluate(net, x, y)``.

Batch order: for every epoch ``np.random.default_rng(config.seed).permutation(n)`` (one
generator for the run, one permutation per epoch), batches are consecutive slices of it, the
last one smaller unless ``drop_last``. Dropout streams restart from ``config.seed``. With the
same seed, data, thread count and starting weights two runs give bitwise equal weights.

Threads: ``numba.set_num_threads(config.threads or all cores)``; the threading layer is the
one ``embedded/__init__`` selects (GNU OpenMP, else ``workqueue``). BLAS's own pools are held
to one thread while training: dense GEMMs split over Numba's threads (``kernels.gemm``).
With ``adaptive_threads`` (the default) a :class:`~embedded.runtime.ThreadGovernor` runs a
step at 1 thread while the step times say the other cores are taken; results do not depend
on the thread count, so this changes no weight. Per-layer measurements come from the steps
at the configured count (``TrainStats.steps_at_one_thread`` counts the others).
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numba
import numpy as np

from hwmodel.measure import Measurement
from hwmodel.plan import SparsityPlan

from .kernels.gemm import single_threaded_blas
from .network import Network, TrainingDiverged
from .optim import SGD, schedule_lr, total_steps
from .runtime import ThreadGovernor

_SCHEDULES = ("constant", "step", "exp")


@dataclass
class TrainConfig:
    """Local training hyper-parameters (torch.optim.SGD semantics).

    ``lr_schedule``: ``constant``; ``step`` (lr × lr_gamma every ``lr_step_size`` optimizer
    steps); ``exp`` (exponential decay from ``lr`` to ``lr_end`` over the run).
    ``threads``: Numba threads (None = all cores); ``adaptive_threads``: drop to 1 thread
    while that is measured faster (:class:`~embedded.runtime.ThreadGovernor`). ``max_steps``
    caps the run.
    """

    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = False
    batch_size: int = 32
    epochs: int = 1
    max_steps: int | None = None
    lr_schedule: str = "constant"
    lr_end: float | None = None
    lr_step_size: int = 0
    lr_gamma: float = 0.1
    threads: int | None = None
    seed: int = 0
    drop_last: bool = False
    adaptive_threads: bool = True

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> TrainConfig:
        """Raise ValueError naming the field if a value is out of range or of the wrong type."""
        def num(name: str, lo: float, lo_open: bool = False) -> None:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
                    or v < lo or (lo_open and v == lo):
                raise ValueError(f"TrainConfig.{name}: expected a number "
                                 f"{'>' if lo_open else '>='} {lo}, got {v!r}")

        def integer(name: str, lo: int, optional: bool = False) -> None:
            v = getattr(self, name)
            if optional and v is None:
                return
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
                raise ValueError(f"TrainConfig.{name}: expected an integer >= {lo}"
                                 f"{' or null' if optional else ''}, got {v!r}")

        num("lr", 0.0, lo_open=True)
        num("momentum", 0.0)
        num("weight_decay", 0.0)
        num("lr_gamma", 0.0, lo_open=True)
        integer("batch_size", 1)
        integer("epochs", 1)
        integer("max_steps", 1, optional=True)
        integer("lr_step_size", 0)
        integer("threads", 1, optional=True)
        integer("seed", 0)
        for name in ("nesterov", "drop_last", "adaptive_threads"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"TrainConfig.{name}: expected true or false, got "
                                 f"{getattr(self, name)!r}")
        if self.lr_schedule not in _SCHEDULES:
            raise ValueError(f"TrainConfig.lr_schedule: expected one of {_SCHEDULES}, got "
                             f"{self.lr_schedule!r}")
        if self.lr_schedule == "exp":
            if self.lr_end is None:
                raise ValueError("TrainConfig.lr_end: required when lr_schedule is 'exp'")
            num("lr_end", 0.0, lo_open=True)
        elif self.lr_end is not None:
            num("lr_end", 0.0, lo_open=True)
        if self.lr_schedule == "step" and self.lr_step_size < 1:
            raise ValueError("TrainConfig.lr_step_size: expected >= 1 when lr_schedule is 'step'")
        if self.nesterov and self.momentum <= 0:
            raise ValueError("TrainConfig.nesterov: Nesterov needs momentum > 0")
        return self

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Any, source: str = "train config") -> TrainConfig:
        """Build from a dict (e.g. JSON); unknown keys and bad values raise ValueError."""
        if not isinstance(d, dict):
            raise ValueError(f"{source}: expected an object, got {type(d).__name__}")
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"{source}: unknown field(s) {sorted(unknown)}; known: {sorted(names)}")
        kw = dict(d)
        for key in ("lr", "momentum", "weight_decay", "lr_gamma", "lr_end"):
            if isinstance(kw.get(key), int) and not isinstance(kw.get(key), bool):
                kw[key] = float(kw[key])
        try:
            return cls(**kw)
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from None


@dataclass
class TrainStats:
    """What a local training run did and what it measured."""

    steps: int = 0
    samples: int = 0
    epochs: float = 0.0
    losses: list[float] = field(default_factory=list)
    wall_s: float = 0.0
    samples_per_s: float = 0.0
    measurements: list[Measurement] = field(default_factory=list)
    density: dict[str, float] = field(default_factory=dict)
    act_density: dict[str, float] = field(default_factory=dict)
    peak_bytes: int = 0
    steps_at_one_thread: int = 0        # run at 1 thread by the ThreadGovernor

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["measurements"] = [m.to_dict() for m in self.measurements]
        return d

    @classmethod
    def from_dict(cls, d: Any) -> TrainStats:
        if not isinstance(d, dict):
            raise ValueError(f"train stats: expected an object, got {type(d).__name__}")
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"train stats: unknown field(s) {sorted(unknown)}")
        kw = dict(d)
        kw["measurements"] = [Measurement.from_dict(m) for m in d.get("measurements", [])]
        kw["losses"] = [float(v) for v in d.get("losses", [])]
        for key in ("density", "act_density"):
            kw[key] = {str(k): float(v) for k, v in d.get(key, {}).items()}
        try:
            return cls(**kw)
        except TypeError as e:
            raise ValueError(f"train stats: {e}") from None


#: measurement phases (columns of the per-step timing table); the joined one is a fused
#: backward (batch norm: input and parameter gradients in one pass), as hwmodel.calibration reads
_PHASES = ("forward", "backward_input", "backward_weight", "update",
           "backward_input+backward_weight", "forward+backward_input")


@contextmanager
def _threads_restored(threads: int):
    """Numba's thread count set back to ``threads`` on leaving the block."""
    try:
        yield
    finally:
        numba.set_num_threads(threads)


def _set_threads(threads: int | None) -> int:
    limit = numba.config.NUMBA_NUM_THREADS
    n = limit if threads is None else int(threads)
    if not 1 <= n <= limit:
        raise ValueError(f"TrainConfig.threads: expected 1..{limit} (this machine's Numba "
                         f"thread limit), got {threads}")
    numba.set_num_threads(n)
    return n


class TrainingStopped(RuntimeError):
    """``should_stop()`` returned true between two steps; ``steps`` were done of ``total``."""

    def __init__(self, steps: int, total: int) -> None:
        super().__init__(f"training stopped on request after {steps} of {total} steps")
        self.steps = steps
        self.total = total


def train_local(net: Network, x: np.ndarray, y: np.ndarray, config: TrainConfig,
                plan: SparsityPlan | None = None, mask_schedule=None,
                device: str = "", should_stop=None) -> TrainStats:
    """Train ``net`` in place with SGD over ``(x, y)``; see the module docstring.

    ``plan`` (if given) is applied with ``net.set_plan``; without it the network's current
    plan stays. ``mask_schedule.begin(net, plan, total_steps)`` is called once and
    ``mask_schedule.after_step(net, step, xb, yb)`` after every optimizer step.
    A non-finite loss raises :class:`~embedded.network.TrainingDiverged` naming the step and
    the first layer whose output went non-finite.
    ``should_stop`` (optional, no argument) is called before every step; when it returns true
    :class:`TrainingStopped` is raised (the board agent's ABORT polls its event this way).
    """
    if not isinstance(net, Network):
        raise TypeError(f"train_local: expected an embedded.Network, got {type(net).__name__}")
    if not isinstance(config, TrainConfig):
        raise TypeError(f"train_local: config must be a TrainConfig, got {type(config).__name__}")
    config.validate()
    x = net.check_x(x, "training data x")
    n = x.shape[0]
    y = net.check_y(y, n, "training labels y")
    if plan is not None:
        net.set_plan(plan)
    threads = _set_threads(config.threads)
    bs = min(config.batch_size, n)
    if config.drop_last and n < config.batch_size:
        raise ValueError(f"train_local: drop_last with batch_size {config.batch_size} > "
                         f"{n} samples leaves no step")
    total = total_steps(n, bs, config.epochs, config.drop_last, config.max_steps)
    net._ensure(bs)
    net.train()
    net.reseed(config.seed)
    opt = _optimizer(net, config)
    xb_buf = np.empty((bs, *x.shape[1:]), np.float32)
    yb_buf = np.empty(bs, np.int64)
    rng = np.random.default_rng(config.seed)
    nodes = [nd.name for nd in net.nodes]
    # per-step timings: (step, node, phase); NaN where a phase did not run
    tm = np.full((total, len(nodes) + 1, len(_PHASES)), np.nan)  # last row: the loss
    weighted = net.spec.weighted_layers()
    dens = {k: np.zeros(total) for k in weighted}
    adens = {k: np.zeros(total) for k in weighted}
    step_t = np.zeros(total)
    step_threads = np.full(total, threads, np.int64)
    governor = ThreadGovernor(threads) if config.adaptive_threads and threads > 1 else None
    losses: list[float] = []
    if mask_schedule is not None:
        mask_schedule.begin(net, net.plan, total)
    step = 0
    samples = 0
    # dense GEMMs split over Numba's threads (kernels.gemm); the configured thread count
    # back however the run ends (the governor may have left 1)
    with single_threaded_blas(), _threads_restored(threads):
        t_start = time.perf_counter()
        while step < total:
            perm = rng.permutation(n)
            stop = n - n % bs if config.drop_last else n
            for s in range(0, stop, bs):
                if step >= total:
                    break
                if should_stop is not None and should_stop():
                    raise TrainingStopped(step, total)
                idx = perm[s:s + bs]
                m = idx.shape[0]
                xb = xb_buf[:m]
                yb = yb_buf[:m]
                t_step = time.perf_counter()
                np.take(x, idx, axis=0, out=xb)
                np.take(y, idx, axis=0, out=yb)
                loss = net.step_loss(xb, yb)
                if not math.isfinite(loss):
                    where = net.first_nonfinite()
                    what = ("the input batch" if where == "input" else
                            f"layer {where!r}" if where else "the loss (all layer outputs finite)")
                    raise TrainingDiverged(f"training diverged at step {step}: loss is {loss}; "
                                           f"first non-finite output: {what}")
                lr = schedule_lr(config.lr_schedule, config.lr, step, total, config.lr_end,
                                 config.lr_step_size, config.lr_gamma)
                opt.step(lr)
                step_t[step] = time.perf_counter() - t_step
                if governor is not None:
                    step_threads[step] = governor.threads
                    nxt = governor.record(step_t[step])
                    if nxt != step_threads[step]:
                        numba.set_num_threads(nxt)
                if net.timing:
                    _record_times(net, opt, nodes, tm[step])
                for k in weighted:
                    layer = net.layers[k]
                    dens[k][step] = float(getattr(layer, "measured_density", 1.0))
                    adens[k][step] = float(getattr(layer, "measured_act_density", 1.0))
                losses.append(loss)
                if mask_schedule is not None:
                    mask_schedule.after_step(net, step, xb, yb)
                step += 1
                samples += m
    wall = time.perf_counter() - t_start
    keep = step_threads[:step] == threads   # the steps at the configured count
    stats = TrainStats(
        steps=step, samples=samples, epochs=samples / n, losses=losses, wall_s=wall,
        samples_per_s=samples / wall if wall > 0 else 0.0,
        density={k: float(v[:step].mean()) if step else 1.0 for k, v in dens.items()},
        act_density={k: float(v[:step].mean()) if step else 1.0 for k, v in adens.items()},
        peak_bytes=(net.memory_bytes() + opt.memory_bytes() + xb_buf.nbytes + yb_buf.nbytes
                    + _shared_workspace_bytes()),
        steps_at_one_thread=step - int(keep.sum()),
    )
    if net.timing and step:
        # measured at the configured count only (the governor starts there: never none)
        stats.measurements = _summarise(net, tm[:step][keep], nodes, stats, bs, threads, device)
        med, iqr = Measurement.summarise(step_t[:step][keep])
        stats.measurements.append(Measurement(
            model=net.spec.name, layer="step", layer_type="step", phase="step",
            density=net.plan.total_density(net.spec) if net.spec.weighted_layers() else 1.0,
            act_density=1.0, batch=bs, threads=threads, median_s=med, iqr_s=iqr,
            repeats=int(keep.sum()), device=device, provenance="measured"))
    return stats


def _shared_workspace_bytes() -> int:
    """Scratch shared by all conv layers (im2col columns), if the conv module keeps one."""
    try:
        from .layers import conv
    except ImportError:
        return 0
    fn = getattr(conv, "workspace_bytes", None)
    return int(fn()) if callable(fn) else 0


def _optimizer(net: Network, config: TrainConfig) -> SGD:
    """The network's SGD (buffers allocated once per network), momentum zeroed."""
    opt = getattr(net, "_sgd", None)
    if opt is None:
        opt = SGD(net)
        net._sgd = opt
    opt.momentum = float(config.momentum)
    opt.weight_decay = float(config.weight_decay)
    opt.nesterov = bool(config.nesterov)
    opt.zero_state()
    return opt


def _record_times(net: Network, opt: SGD, nodes: list[str], row: np.ndarray) -> None:
    for j, name in enumerate(nodes):
        t = net.times[name]
        layer = net.layers[name]
        pt = getattr(layer, "phase_times", None)
        if pt:  # conv/linear time their own phases
            for i, ph in enumerate(_PHASES[:3]):
                if ph in pt and pt[ph] is not None:
                    row[j, i] = pt[ph]
        else:
            if "forward" in t:
                row[j, 0] = t["forward"]
            if "backward" in t:
                row[j, _PHASES.index(net.backward_phase(name))] = t["backward"]
        t.pop("backward", None)
        if name in opt.times:
            row[j, 3] = opt.times[name]
    row[len(nodes), 5] = net.loss_time


def _summarise(net: Network, tm: np.ndarray, nodes: list[str], stats: TrainStats, batch: int,
               threads: int, device: str) -> list[Measurement]:
    out = []
    ops = {nd.name: nd.op for nd in net.nodes}
    ops["loss"] = "cross_entropy"
    for j, name in enumerate([*nodes, "loss"]):
        dens = stats.density.get(name, 1.0)
        # hwmodel.calibration's convention: a masked layer's weight gradient is computed only
        # inside the mask, so its record carries act_density = density
        adens = dens if net.modes.get(name) == "masked" else stats.act_density.get(name, 1.0)
        for i, ph in enumerate(_PHASES):
            col = tm[:, j, i]
            col = col[~np.isnan(col)]
            if col.size == 0:
                continue
            med, iqr = Measurement.summarise(col)
            out.append(Measurement(
                model=net.spec.name, layer=name, layer_type=ops[name], phase=ph,
                density=dens, act_density=adens, batch=batch, threads=threads, median_s=med,
                iqr_s=iqr, repeats=int(col.size), device=device, provenance="measured"))
    return out


def evaluate(net: Network, x: np.ndarray, y: np.ndarray, batch_size: int = 256) -> dict:
    """``dict(loss=mean cross-entropy, accuracy=fraction correct, n=samples)`` in inference
    mode (BN running statistics, no dropout); the network's train/eval flag is unchanged."""
    return net.evaluate(x, y, batch_size)


__all__ = ["TrainConfig", "TrainStats", "TrainingDiverged", "TrainingStopped", "evaluate",
           "train_local"]
