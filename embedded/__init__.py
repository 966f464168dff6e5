"""embedded — the device side of sparsefl: Numba sparse trainer, codec, client tasks, board agent.

Never imports torch or fl_core. Public names are imported lazily so ``import embedded`` is cheap
on a board (Numba compiles only what a command uses).
"""

from __future__ import annotations

import importlib
import os

# One threading layer, chosen deliberately: Numba's 'omp' layer can load a second OpenMP
# runtime beside torch's in the same process. 'workqueue' ships with Numba on every platform
# (ARM boards included). A user may override it with NUMBA_THREADING_LAYER.
os.environ.setdefault("NUMBA_THREADING_LAYER", "workqueue")

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
