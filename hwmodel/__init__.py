"""hwmodel — the cost side of sparsefl: model description, counts, device profiles, estimates."""
from .models import BUILDERS, build, load_model
from .spec import INPUT, ModelSpec, Node, SpecError, make_node

__all__ = ["BUILDERS", "INPUT", "ModelSpec", "Node", "SpecError", "build", "load_model", "make_node"]
