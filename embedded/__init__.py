"""embedded — the device side of sparsefl: Numba sparse trainer, codec, client tasks, board agent.

Never imports torch or fl_core. Public names are imported lazily so ``import embedded`` is cheap
on a board (Numba compiles only what a command uses).
"""

from __future__ import annotations

import importlib
import os

# One threading layer, chosen deliberately: GNU OpenMP ('omp'), else 'workqueue' (always
# there). Measured on the 2-core VM (python benchmarks/threading_layers.py): an
# empty parallel region costs ~1.6 us with 'omp' (its idle threads spin briefly before they
# sleep) but ~150 us with 'workqueue' (every region wakes sleeping workers), which cost more
# than a small conv layer's whole work. 'tbb' (~2.5 us) needs libtbb on the loader path and
# has no ARM wheel. Beside torch (server side, tests): torch ships its own libgomp.so.1; if
# Numba's threads start first (:func:`embedded.runtime.start_threads`), torch reuses Numba's
# runtime, otherwise two OpenMP runtimes live in the process (used one after the other, each
# with its own threads). Override with NUMBA_THREADING_LAYER (or ..._PRIORITY).
if "NUMBA_THREADING_LAYER" not in os.environ:
    os.environ.setdefault("NUMBA_THREADING_LAYER_PRIORITY", "omp workqueue tbb")

_EXPORTS = {
    "Network": "embedded.network",
    "TrainConfig": "embedded.train",
    "TrainStats": "embedded.train",
    "train_local": "embedded.train",
    "evaluate": "embedded.train",
    "UplinkRule": "embedded.methods",
    "MaskSchedule": "embedded.methods",
    "ClientTask": "embedded.task",
    "ClientResult": "embedded.task",
    "run_task": "embedded.task",
}

__all__ = sorted(_EXPORTS) + ["codec"]


def __getattr__(name: str):
    if name == "codec":
        return importlib.import_module("embedded.codec")
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'embedded' has no attribute {name!r}")
