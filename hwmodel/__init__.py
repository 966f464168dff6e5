"""hwmodel — the cost side of sparsefl: model description, counts, device profiles, estimates.

Depends on numpy/scipy/pandas only and imports on a board. torch is needed only by
``to_torch``/``from_torch`` and imported there, lazily.
"""

from __future__ import annotations

import importlib

from .measure import PHASES, Measurement
from .models import BUILDERS, build, load_model
from .plan import LayerSparsity, PlanError, SparsityPlan, erk_densities
from .profile import DeviceProfile
from .provenance import Provenance, Tagged
from .spec import INPUT, ModelSpec, Node, SpecError, make_node

_LAZY = {
    "count": "hwmodel.counts",
    "estimate": "hwmodel.estimator",
    "estimate_fleet": "hwmodel.estimator",
    "budget": "hwmodel.estimator",
    "load_profile": "hwmodel.profiles",
    "list_profiles": "hwmodel.profiles",
    "ProfileError": "hwmodel.profiles",
    "calibrate": "hwmodel.calibration",
    "to_torch": "hwmodel.torch_twin",
    "from_torch": "hwmodel.torch_twin",
}

__all__ = [
    "BUILDERS", "INPUT", "PHASES", "DeviceProfile", "LayerSparsity", "Measurement", "ModelSpec",
    "Node", "PlanError", "Provenance", "SparsityPlan", "SpecError", "Tagged", "build",
    "erk_densities", "load_model", "make_node", *_LAZY,
]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'hwmodel' has no attribute {name!r}")
