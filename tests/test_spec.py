"""ModelSpec: builders pinned by hand-derived MACs/params, validation, JSON round trip."""

import math

import pytest

import hwmodel
from hwmodel import ModelSpec, SpecError, make_node


def conv_linear_macs(spec: ModelSpec) -> int:
    """Forward MACs of conv and linear layers from the inferred shapes."""
    total = 0
    for node in spec.nodes:
        if node.op == "conv2d":
            w = spec.param_shapes(node.name)[f"{node.name}.weight"]
            _, ho, wo = spec.shapes[node.name]
            total += math.prod(w) * ho * wo
        elif node.op == "linear":
            total += math.prod(spec.param_shapes(node.name)[f"{node.name}.weight"])
    return total


def test_femnist_cnn_pinned_by_hand():
    spec = hwmodel.build("femnist_cnn")
    # conv1 28*28*32*25 + conv2 14*14*64*32*25 + fc1 3136*2048 + fc2 2048*62
    assert conv_linear_macs(spec) == 627_200 + 10_035_200 + 6_422_528 + 126_976 == 17_211_904
    assert spec.num_params() == 6_603_710
    assert spec.num_classes == 62


def test_lenet5_pinned_by_hand():
    spec = hwmodel.build("lenet5")
    assert conv_linear_macs(spec) == 117_600 + 240_000 + 48_000 + 10_080 + 840
    assert spec.num_params() == 61_706


@pytest.mark.parametrize(
    "name, macs, params, rel",
    [
        ("resnet8", 12.5e6, 78e3, 0.01),
        ("resnet18_cifar", 555.4e6, 11.17e6, 0.001),
        ("mlp", 784 * 200 + 200 * 200 + 200 * 10, 199_210, 0.0),
    ],
)
def test_builders_match_reference_counts(name, macs, params, rel):
    spec = hwmodel.build(name)
    assert conv_linear_macs(spec) == pytest.approx(macs, rel=rel)
    assert spec.num_params() == pytest.approx(params, rel=rel)


def test_mobilenet_v2_counts_without_shortcut_projections_match_hand_count():
    # shared/PROFILE_SOURCES.md hand-counts 2.24 M params; that count omits the four 1x1
    # shortcut projections kuangliu's block has when stride 1 and channels change.
    spec = hwmodel.build("mobilenet_v2_cifar")
    shortcut = sum(math.prod(s) for k, s in spec.param_shapes().items() if ".shortcut." in k)
    assert spec.num_params() - shortcut == pytest.approx(2.24e6, rel=0.005)


def test_resnet_parameter_names_follow_torch_paths():
    spec = hwmodel.build("resnet8")
    names = spec.state_shapes()
    assert names["conv1.weight"] == (16, 3, 3, 3)
    assert names["layer2.0.shortcut.0.weight"] == (32, 16, 1, 1)
    assert names["layer2.0.shortcut.1.running_var"] == (32,)
    assert names["layer1.0.bn1.num_batches_tracked"] == ()
    assert names["linear.weight"] == (10, 64)


def test_kws_cnn_shapes():
    spec = hwmodel.build("kws_cnn")
    assert spec.input_shape == (1, 40, 51)
    assert spec.shapes["conv1"] == (64, 33, 32)
    assert spec.num_classes == 12


@pytest.mark.parametrize("name", sorted(hwmodel.BUILDERS))
def test_json_round_trip(name):
    spec = hwmodel.build(name)
    again = ModelSpec.from_json(spec.to_json())
    assert again == spec
    assert again.shapes == spec.shapes


def test_unknown_model_lists_known_names():
    with pytest.raises(SpecError, match="known models: .*femnist_cnn"):
        hwmodel.build("alexnet")


def test_absurd_sizes_rejected_before_allocation():
    nodes = [make_node("conv1", "conv2d", "input", out_channels=60_000, kernel=3, padding=1),
             make_node("conv2", "conv2d", "conv1", out_channels=60_000, kernel=3, padding=1),
             make_node("flatten", "flatten", "conv2"),
             make_node("fc", "linear", "flatten", out_features=10)]
    with pytest.raises(SpecError, match="parameters|activations"):
        ModelSpec("huge", (3, 224, 224), nodes)
    with pytest.raises(SpecError, match="out_channels"):
        make_node("c", "conv2d", "input", out_channels=10**9, kernel=3)


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"name": "x", "input_shape": [1, 8, 8], "nodes": [{"name": "a", "op": "lstm", "inputs": ["input"]}]}, "unknown op 'lstm'"),
        ({"name": "x", "input_shape": [1, 8, 8], "nodes": [{"name": "a", "op": "relu", "inputs": ["nope"]}]}, "input 'nope'"),
        ({"name": "x", "input_shape": [1, 8, 8], "nodes": [{"name": "a", "op": "conv2d", "inputs": ["input"], "attrs": {"kernel": 3}}]}, "missing attribute 'out_channels'"),
        ({"name": "x", "input_shape": [1, 8, 8], "nodes": [{"name": "a", "op": "conv2d", "inputs": ["input"], "attrs": {"out_channels": 4, "kernel": 3, "colour": 1}}]}, "unknown attribute"),
        ({"name": "x", "input_shape": [1, 8, 8], "nodes": [{"name": "f", "op": "linear", "inputs": ["input"], "attrs": {"out_features": 3}}]}, "flat"),
        ({"name": "x", "nodes": []}, "missing field 'input_shape'"),
    ],
)
def test_malformed_spec_errors_name_the_field(bad, match):
    with pytest.raises(SpecError, match=match):
        ModelSpec.from_dict(bad, source="bad.json")


def test_bad_json_names_the_file(tmp_path):
    p = tmp_path / "m.json"
    p.write_text("{not json")
    with pytest.raises(SpecError, match="m.json.*not valid JSON"):
        ModelSpec.load(str(p))


def test_add_needs_equal_shapes():
    nodes = [make_node("c1", "conv2d", "input", out_channels=4, kernel=3),
             make_node("c2", "conv2d", "input", out_channels=4, kernel=1),
             make_node("sum", "add", ("c1", "c2")),
             make_node("f", "flatten", "sum"), make_node("fc", "linear", "f", out_features=2)]
    with pytest.raises(SpecError, match="input shapes differ"):
        ModelSpec("m", (1, 8, 8), nodes)
