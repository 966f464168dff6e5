"""SparsityPlan: layer rules of each method, uniform and ERK budgets, JSON, validation."""

import math

import numpy as np
import pytest

import hwmodel
from hwmodel import PlanError, SparsityPlan


def test_swat_rule_keeps_first_layer_and_classifier_dense():
    spec = hwmodel.build("resnet8")
    plan = SparsityPlan.uniform(spec, 0.9, mode="swat")
    assert "conv1" not in plan.layers and "linear" not in plan.layers
    assert set(plan.layers) == set(spec.weighted_layers()) - {"conv1", "linear"}
    assert plan.weight_density("layer1.0.conv1") == pytest.approx(0.1)
    assert plan.act_density("layer1.0.conv1") == pytest.approx(0.1)
    assert plan.weight_density("conv1") == 1.0


def test_mlp_first_layer_is_its_first_linear():
    spec = hwmodel.build("mlp")
    plan = SparsityPlan.uniform(spec, 0.5, layers="swat")
    assert list(plan.layers) == ["fc2"]
    assert list(SparsityPlan.uniform(spec, 0.5, layers="flash").layers) == ["fc1", "fc2"]
    assert list(SparsityPlan.uniform(spec, 0.5, layers="all").layers) == ["fc1", "fc2", "fc3"]


def test_masked_mode_has_dense_activations():
    spec = hwmodel.build("lenet5")
    plan = SparsityPlan.uniform(spec, 0.8, mode="masked", layers="all")
    assert all(ls.act_density == 1.0 for ls in plan.layers.values())


def reference_erk(shapes: dict[str, tuple], density: float) -> dict[str, float]:
    """Independent ERK: RigL's loop written plainly."""
    sizes = {n: math.prod(s) for n, s in shapes.items()}
    score = {n: sum(s) / math.prod(s) for n, s in shapes.items()}
    dense = set()
    while True:
        rest = [n for n in shapes if n not in dense]
        budget = density * sum(sizes.values()) - sum(sizes[n] for n in dense)
        eps = budget / sum(score[n] * sizes[n] for n in rest)
        bad = [n for n in rest if eps * score[n] > 1]
        if not bad:
            return {n: (1.0 if n in dense else eps * score[n]) for n in shapes}
        dense |= set(bad)


@pytest.mark.parametrize("name, s", [("resnet8", 0.9), ("femnist_cnn", 0.8), ("lenet5", 0.5)])
def test_erk_total_density_and_capping(name, s):
    spec = hwmodel.build(name)
    plan = SparsityPlan.erk(spec, s, layers="all")
    assert plan.total_density(spec) == pytest.approx(1 - s, rel=1e-9)
    shapes = {n: spec.param_shapes(n)[f"{n}.weight"] for n in spec.weighted_layers()}
    ref = reference_erk(shapes, 1 - s)
    for n in spec.weighted_layers():
        assert plan.weight_density(n) == pytest.approx(ref[n], rel=1e-12)
        assert plan.weight_density(n) <= 1.0


def test_erk_caps_small_layers_at_one():
    spec = hwmodel.build("lenet5")
    plan = SparsityPlan.erk(spec, 0.5, layers="all")
    assert plan.weight_density("conv1") == 1.0  # 150 weights: ERK score far above 1
    assert np.isclose(plan.total_density(spec), 0.5)


def test_json_round_trip():
    spec = hwmodel.build("femnist_cnn")
    plan = SparsityPlan.erk(spec, 0.9, mode="swat", topk_period=10)
    assert SparsityPlan.from_json(plan.to_json()) == plan


@pytest.mark.parametrize(
    "text, match",
    [
        ('{"mode": "sparse"}', "mode: expected one of"),
        ('{"mode": "swat", "layers": {"fc1": {"weight_density": 1.5, "act_density": 1}}}', "weight_density"),
        ('{"mode": "swat", "layers": {"fc1": {"weight_density": 0.1, "act_density": 1, "k": 3}}}', "unknown key"),
        ("[1, 2]", "expected a JSON object"),
    ],
)
def test_bad_plans_raise_clear_errors(text, match):
    with pytest.raises(PlanError, match=match):
        SparsityPlan.from_json(text, source="plan.json")


def test_plan_naming_missing_layer_is_rejected():
    spec = hwmodel.build("lenet5")
    plan = SparsityPlan("swat", {"conv9": hwmodel.LayerSparsity(0.1, 0.1)})
    with pytest.raises(PlanError, match="conv9.*sparse-able layers are: conv1"):
        plan.check(spec)


def test_sparsity_out_of_range():
    with pytest.raises(PlanError, match="sparsity"):
        SparsityPlan.uniform(hwmodel.build("mlp"), 1.0)
