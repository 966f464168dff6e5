"""Per-layer, per-phase timing of training steps: the calibration data.

One implementation serves the board agent's BENCH command and the host calibration benchmark
(``benchmarks/calibrate_host.py``), so a board and the host label phases identically.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

from hwmodel.measure import Measurement
from hwmodel.plan import SparsityPlan
from hwmodel.spec import ModelSpec

from .kernels.loss import softmax_xent
from .network import Network
from .optim import SGD


class StepBench:
    """A network under a SWAT plan at ``sparsity``, stepped by SGD on fixed random data.

    ``step(record)`` runs one training step; recorded steps add every layer's phase times
    (conv/linear: their own ``phase_times``; other nodes: the network's timers; the loss;
    the optimizer update). ``measurements(...)`` summarises them as median and IQR.
    """

    def __init__(self, spec: ModelSpec, sparsity: float, batch: int, seed: int = 0,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        rng = np.random.default_rng(seed)
        self.spec, self.batch, self.clock = spec, batch, clock
        self.net = Network.from_spec(spec, seed=seed)
        self.net.setup(batch)
        self.net.set_plan(SparsityPlan.uniform(spec, sparsity, mode="swat")
                          if sparsity > 0 else None)
        self.net.train()
        self.opt = SGD(self.net, momentum=0.9, weight_decay=5e-4)
        self.x = rng.standard_normal((batch, *spec.input_shape)).astype(np.float32)
        self.y = rng.integers(0, spec.num_classes, batch).astype(np.int64)
        self.g = np.zeros((batch, spec.num_classes), np.float32)
        self.weighted = set(spec.weighted_layers())
        self.samples: dict[tuple[str, str, str], list[float]] = {}
        self.density: dict[str, tuple[float, float]] = {}

    def _add(self, layer: str, typ: str, phase: str, t: float) -> None:
        self.samples.setdefault((layer, typ, phase), []).append(t)

    def step(self, record: bool = True) -> None:
        net, opt = self.net, self.opt
        logits = net.forward(self.x, True)
        t0 = self.clock()
        softmax_xent(logits, self.y, self.g)
        t_loss = self.clock() - t0
        net.backward(self.g)
        opt.step(0.01)
        if not record:  # warm-up (JIT compile, caches)
            return
        self._add("loss", "cross_entropy", "forward+backward_input", t_loss)
        for node in self.spec.nodes:
            layer = net.layers[node.name]
            if node.name in self.weighted:
                for ph, t in layer.phase_times.items():
                    self._add(node.name, node.op, ph, t)
                self.density[node.name] = (float(layer.measured_density),
                                           float(getattr(layer, "measured_act_density", 1.0)))
            else:
                times = net.times[node.name]
                if "forward" in times:
                    self._add(node.name, node.op, "forward", times["forward"])
                # an add passes its gradient through; the fan-out sum happens in the network,
                # outside any node's timer: its backward is not a measurement of the add
                if "backward" in times and node.op != "add":
                    self._add(node.name, node.op, net.backward_phase(node.name),
                              times["backward"])
            if node.name in opt.times and layer.params:
                self._add(node.name, node.op, "update", opt.times[node.name])

    def measurements(self, threads: int, device: str = "", provenance: str = "measured",
                     temperature_c: float | None = None,
                     freq_mhz: float | None = None) -> list[Measurement]:
        out = []
        for (layer, typ, phase), ts in self.samples.items():
            med, iqr = Measurement.summarise(ts)
            d, a = self.density.get(layer, (1.0, 1.0))
            out.append(Measurement(self.spec.name, layer, typ, phase, d, a, self.batch, threads,
                                   med, iqr, len(ts), device=device, provenance=provenance,
                                   temperature_c=temperature_c, freq_mhz=freq_mhz))
        return out
