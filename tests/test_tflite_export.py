"""TFLite export: every layer type and four builders load in LiteRT and match the Numba network;
int8 post-training quantisation keeps top-1 accuracy on real data (scikit-learn's digits).

Runs with whichever interpreter is importable: ``ai_edge_litert`` (numpy 2) or
``tflite_runtime`` 2.14 (``tox -e tflite-runtime``, numpy < 2). The exported input is NHWC, so
the Numba side's NCHW batch is transposed before it goes into the interpreter.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from embedded.network import Network
from embedded.tflite_export import ExportError, export_tflite
from hwmodel.models import build
from hwmodel.spec import ModelSpec, make_node

tflite = pytest.importorskip("tflite")


def _interpreter_cls():
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        try:
            from tflite_runtime.interpreter import Interpreter
        except ImportError:
            pytest.skip("neither ai_edge_litert nor tflite_runtime is installed")
    return Interpreter


def run_tflite(model: bytes, x_nchw: np.ndarray, int8_io: bool = False) -> np.ndarray:
    """Logits of the exported model for an NCHW (or flat) float batch."""
    it = _interpreter_cls()(model_content=model)
    inp, out = it.get_input_details()[0], it.get_output_details()[0]
    x = x_nchw.transpose(0, 2, 3, 1) if x_nchw.ndim == 4 else x_nchw
    it.resize_tensor_input(inp["index"], [x.shape[0], *inp["shape"][1:]])
    it.allocate_tensors()
    if int8_io:
        s, z = inp["quantization"]
        x = np.clip(np.round(x / s) + z, -128, 127).astype(np.int8)
    it.set_tensor(inp["index"], np.ascontiguousarray(x, dtype=inp["dtype"]))
    it.invoke()
    y = it.get_tensor(out["index"])
    if int8_io:
        s, z = out["quantization"]
        y = (y.astype(np.float32) - z) * s
    return y


def random_state(net: Network, seed: int) -> dict[str, np.ndarray]:
    """The network's init with non-trivial batch-norm affine parameters and running stats,
    and non-zero biases, so folding and MUL+ADD are really exercised."""
    rng = np.random.default_rng(seed)
    st = net.state_dict()
    bns = {n.name for n in net.spec.nodes if n.op == "batchnorm2d"}
    for k, v in st.items():
        node, _, attr = k.rpartition(".")
        if node in bns:
            if attr == "running_mean":
                st[k] = rng.normal(0, 0.5, v.shape).astype(np.float32)
            elif attr == "running_var":
                st[k] = rng.uniform(0.3, 2.0, v.shape).astype(np.float32)
            elif attr == "weight":
                st[k] = rng.uniform(0.5, 1.5, v.shape).astype(np.float32)
            elif attr == "bias":
                st[k] = rng.normal(0, 0.3, v.shape).astype(np.float32)
        elif attr == "bias":
            st[k] = rng.normal(0, 0.1, v.shape).astype(np.float32)
    net.load_state_dict(st)
    return st


def op_names(model: bytes) -> set[str]:
    m = tflite.Model.GetRootAsModel(model, 0)
    names = {v: k for k, v in vars(tflite.BuiltinOperator).items() if not k.startswith("_")}
    sg = m.Subgraphs(0)
    return {names[m.OperatorCodes(sg.Operators(i).OpcodeIndex()).BuiltinCode()]
            for i in range(sg.OperatorsLength())}


def _n(name, op, inputs, **attrs):
    return make_node(name, op, inputs, **attrs)


def every_layer_spec() -> ModelSpec:
    """One model with every supported op and each padding / grouping / flatten path."""
    nodes = [
        # 3x3 'same' conv with bias, BN folded into it, relu fused (SAME padding)
        _n("conv1", "conv2d", "input", out_channels=8, kernel=3, padding=1),
        _n("bn1", "batchnorm2d", "conv1"),
        _n("relu1", "relu", "bn1"),
        # stride 2, groups 2 (block-diagonal), no bias, padding that SAME cannot express
        _n("conv2", "conv2d", "relu1", out_channels=8, kernel=3, stride=2, padding=1, groups=2,
           bias=False),
        # depthwise with channel multiplier 2, rectangular kernel / stride
        _n("conv3", "conv2d", "conv2", out_channels=16, kernel=(3, 1), stride=(1, 1),
           padding=(1, 0), groups=8),
        _n("relu3", "relu", "conv3"),
        # max-pool with padding (explicit PADV2) and a 'same' max-pool
        _n("pool1", "maxpool2d", "relu3", kernel=3, stride=2, padding=1),
        _n("pool2", "maxpool2d", "pool1", kernel=3, stride=1, padding=1),
        _n("relu4", "relu", "pool2"),  # a relu that cannot be fused
        _n("bn4", "batchnorm2d", "relu4"),  # a batch norm that cannot be folded: MUL + ADD
        _n("conv5", "conv2d", "pool2", out_channels=16, kernel=1, bias=False),
        _n("add1", "add", ("bn4", "conv5")),
        _n("relu5", "relu", "add1"),
        _n("gap", "global_avgpool", "relu5"),
        # average pool counting padded zeros, dropout, flatten into linear (permuted columns)
        _n("avg", "avgpool2d", "relu5", kernel=2, stride=1, padding=1),
        _n("drop", "dropout", "avg", p=0.3),
        _n("flat", "flatten", "drop"),
        _n("fc1", "linear", "flat", out_features=16),
        _n("add2", "add", ("fc1", "gap")),
        _n("fc2", "linear", "add2", out_features=10, bias=False),
    ]
    return ModelSpec("every_layer", (3, 13, 12), nodes)


def flatten_out_spec() -> ModelSpec:
    """Flatten as the output and flatten feeding an add: the NHWC->NCHW transpose path."""
    nodes = [
        _n("conv", "conv2d", "input", out_channels=3, kernel=3),
        _n("pool", "avgpool2d", "conv", kernel=2),
        _n("flat", "flatten", "pool"),
        _n("relu", "relu", "flat"),
        _n("conv_b", "conv2d", "input", out_channels=3, kernel=3, stride=2, padding=1),
        _n("flat_b", "flatten", "conv_b"),
        _n("fc", "linear", "flat_b", out_features=12),
        _n("add", "add", ("relu", "fc")),  # NHWC-ordered + plain vector: transposed first
        _n("drop", "dropout", "add"),
        _n("flat2", "flatten", "drop"),
    ]
    return ModelSpec("flatten_out", (2, 6, 6), nodes)


def _check_fp32(spec: ModelSpec, n: int = 6, seed: int = 0) -> bytes:
    net = Network.from_spec(spec, seed=seed)
    st = random_state(net, seed + 1)
    net.eval()
    x = np.random.default_rng(seed + 2).normal(size=(n, *spec.input_shape)).astype(np.float32)
    ref = net.predict(x)
    model = export_tflite(spec, st)
    got = run_tflite(model, x)
    assert got.shape == ref.shape
    scale = max(1.0, float(np.abs(ref).max()))
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5 * scale)
    return model


def test_file_layout_identifier_buffer0_names_and_ohwi():
    spec = build("lenet5")
    net = Network.from_spec(spec, seed=3)
    model = export_tflite(spec, net.state_dict())
    assert model[4:8] == b"TFL3"
    m = tflite.Model.GetRootAsModel(model, 0)
    assert m.Version() == 3
    assert m.Buffers(0).DataLength() == 0
    for i in range(1, m.BuffersLength()):  # constant data starts on a 16-byte boundary
        tab = m.Buffers(i)._tab
        assert tab.Vector(tab.Offset(4)) % 16 == 0
    sg = m.Subgraphs(0)
    tensors = {sg.Tensors(i).Name().decode(): sg.Tensors(i) for i in range(sg.TensorsLength())}
    inp, out = sg.Tensors(sg.Inputs(0)), sg.Tensors(sg.Outputs(0))
    assert inp.Name() == b"input" and list(inp.ShapeAsNumpy()) == [1, 28, 28, 1]
    assert out.Name() == b"logits" and list(out.ShapeAsNumpy()) == [1, 10]
    # conv weights OHWI: torch (6, 1, 5, 5) -> (6, 5, 5, 1), values moved, not reshaped
    w = tensors["conv2.weight"]
    assert list(w.ShapeAsNumpy()) == [16, 5, 5, 6]
    data = m.Buffers(w.Buffer()).DataAsNumpy().view(np.float32).reshape(16, 5, 5, 6)
    np.testing.assert_array_equal(data, net.state_dict()["conv2.weight"].transpose(0, 2, 3, 1))
    assert op_names(model) == {"CONV_2D", "MAX_POOL_2D", "RESHAPE", "FULLY_CONNECTED"}


def test_every_layer_type_matches_numba():
    model = _check_fp32(every_layer_spec())
    assert {"CONV_2D", "DEPTHWISE_CONV_2D", "PAD", "PADV2", "MAX_POOL_2D", "AVERAGE_POOL_2D",
            "RELU", "MUL", "ADD", "MEAN", "RESHAPE", "FULLY_CONNECTED"} <= op_names(model)


def test_flatten_order_when_not_read_by_linear():
    model = _check_fp32(flatten_out_spec())
    assert "TRANSPOSE" in op_names(model)


@pytest.mark.parametrize("name", ["lenet5", "femnist_cnn", "resnet8", "mobilenet_v2_cifar"])
def test_builders_match_numba(name):
    _check_fp32(build(name), n=3 if name == "femnist_cnn" else 4)


@pytest.mark.parametrize("int8_io", [False, True])
def test_int8_every_layer_close_to_float(int8_io):
    spec = every_layer_spec()
    net = Network.from_spec(spec, seed=5)
    st = random_state(net, 6)
    net.eval()
    rng = np.random.default_rng(7)
    calib = rng.normal(size=(128, *spec.input_shape)).astype(np.float32)
    x = rng.normal(size=(64, *spec.input_shape)).astype(np.float32)
    ref = net.predict(x)
    model = export_tflite(spec, st, int8=True, calib=calib, int8_io=int8_io)
    ops = op_names(model)
    assert ("QUANTIZE" in ops) != int8_io and ("DEQUANTIZE" in ops) != int8_io
    m = tflite.Model.GetRootAsModel(model, 0)
    sg = m.Subgraphs(0)
    types = {sg.Tensors(i).Name().decode(): sg.Tensors(i).Type()
             for i in range(sg.TensorsLength())}
    assert types["conv1.weight"] == tflite.TensorType.INT8
    assert types["conv1.bias"] == tflite.TensorType.INT32
    assert types["input"] == (tflite.TensorType.INT8 if int8_io else tflite.TensorType.FLOAT32)
    # per-channel weight scales on conv, per-tensor on the activations
    q = {sg.Tensors(i).Name().decode(): sg.Tensors(i).Quantization()
         for i in range(sg.TensorsLength())}
    assert q["conv1.weight"].ScaleLength() == 8 and q["conv3.weight"].ScaleLength() == 16
    assert q["conv3.weight"].QuantizedDimension() == 3
    assert q["add1"].ScaleLength() == 1 and q["gap"].ScaleLength() == 1
    # full integer: every tensor between the interface and the logits is int8 (or int32 bias /
    # shape constants); no float op hides inside
    inner = {k: v for k, v in types.items() if k not in ("input", "logits")}
    assert set(inner.values()) <= {tflite.TensorType.INT8, tflite.TensorType.INT32}
    got = run_tflite(model, x, int8_io=int8_io)
    span = float(ref.max() - ref.min())
    err = np.abs(got - ref)
    assert err.mean() < 0.02 * span and err.max() < 0.1 * span
    assert (got.argmax(1) == ref.argmax(1)).mean() >= 0.85


def digits_cnn() -> ModelSpec:
    """A small CNN for 8x8 digits: conv-BN-relu-pool, conv-relu, linear."""
    return ModelSpec("digits_cnn", (1, 8, 8), [
        _n("conv1", "conv2d", "input", out_channels=16, kernel=3, padding=1, bias=False),
        _n("bn1", "batchnorm2d", "conv1"),
        _n("relu1", "relu", "bn1"),
        _n("pool1", "maxpool2d", "relu1", kernel=2),
        _n("conv2", "conv2d", "pool1", out_channels=32, kernel=3, padding=1),
        _n("relu2", "relu", "conv2"),
        _n("flat", "flatten", "relu2"),
        _n("fc", "linear", "flat", out_features=10),
    ])


def test_int8_top1_within_one_point_on_digits():
    """Real data: sklearn's digits, half held out (898 images, so one point is 9 images)."""
    from embedded.train import TrainConfig, train_local
    from fl_core.data import load_dataset

    ds = load_dataset("digits", test_fraction=0.5)
    spec = digits_cnn()
    net = Network.from_spec(spec, seed=0)
    train_local(net, ds.x, ds.y, TrainConfig(lr=0.05, momentum=0.9, batch_size=32, epochs=5,
                                             seed=0, threads=1))
    net.eval()
    st = net.state_dict()
    acc_numba = float((net.predict(ds.x_test).argmax(1) == ds.y_test).mean())
    fp32 = export_tflite(spec, st)
    int8 = export_tflite(spec, st, int8=True, calib=ds.x[:256])
    acc32 = float((run_tflite(fp32, ds.x_test).argmax(1) == ds.y_test).mean())
    acc8 = float((run_tflite(int8, ds.x_test).argmax(1) == ds.y_test).mean())
    assert acc32 > 0.9  # a trained model, so the comparison means something
    assert abs(acc32 - acc_numba) <= 1 / len(ds.y_test) + 1e-9
    assert abs(acc8 - acc32) <= 0.01, (acc32, acc8)
    assert len(int8) < len(fp32) / 2  # weights stored as int8


def groupnorm_spec() -> ModelSpec:
    return ModelSpec("gn", (4, 5, 6), [
        _n("conv", "conv2d", "input", out_channels=6, kernel=1),
        _n("gn1", "groupnorm", "conv", num_groups=3),
        _n("relu", "relu", "gn1"),
        _n("gn2", "groupnorm", "relu", num_groups=6, eps=1e-3),
        _n("flat", "flatten", "gn2"),
        _n("fc", "linear", "flat", out_features=3),
    ])


def test_exporter_needs_neither_torch_nor_tensorflow(tmp_path):
    code = ("import sys\n"
            "from embedded.tflite_export import export_tflite, check_state\n"
            "from hwmodel.models import build\n"
            "import numpy as np\n"
            "spec = build('lenet5')\n"
            "st = {k: np.zeros(s, np.float32) for k, s in spec.state_shapes().items()}\n"
            "assert export_tflite(spec, st)[4:8] == b'TFL3'\n"
            "bad = [m for m in ('torch', 'tensorflow', 'numba') if m in sys.modules]\n"
            "assert not bad, bad\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True,
                       timeout=120, env={**os.environ, "PYTHONPATH": root})
    assert r.returncode == 0, r.stderr


def test_groupnorm_fp32_matches_and_int8_is_refused_naming_the_node():
    spec = groupnorm_spec()
    rng = np.random.default_rng(12)
    net = Network.from_spec(spec, 0)
    st = net.state_dict()
    for k in ("gn1.weight", "gn1.bias", "gn2.weight", "gn2.bias"):
        st[k] = rng.normal(1.0 if k.endswith("weight") else 0.0, 0.5, st[k].shape).astype(
            np.float32)
    st["conv.bias"] = rng.normal(0, 2.0, st["conv.bias"].shape).astype(np.float32)
    net.load_state_dict(st)
    net.eval()
    x = rng.normal(size=(5, *spec.input_shape)).astype(np.float32)
    ref = net.predict(x)
    model = export_tflite(spec, st)
    assert {"RSQRT", "SUB", "MEAN"} <= op_names(model)
    np.testing.assert_allclose(run_tflite(model, x), ref, rtol=0,
                               atol=1e-5 * max(1.0, float(np.abs(ref).max())))
    with pytest.raises(ExportError, match="'gn1'.*groupnorm"):
        export_tflite(spec, st, int8=True, calib=x)


def test_bad_weights_and_calibration_are_named():
    spec = build("lenet5")
    st = Network.from_spec(spec, 0).state_dict()
    bad = dict(st)
    bad["fc1.weight"] = bad["fc1.weight"][:, :10]
    with pytest.raises(ExportError, match="fc1.weight.*shape"):
        export_tflite(spec, bad)
    missing = {k: v for k, v in st.items() if k != "conv1.bias"}
    with pytest.raises(ExportError, match="conv1.bias"):
        export_tflite(spec, missing)
    with pytest.raises(ExportError, match="calibration"):
        export_tflite(spec, st, int8=True)
    with pytest.raises(ExportError, match="calibration data.*NCHW"):
        export_tflite(spec, st, int8=True, calib=np.zeros((4, 28, 28, 1), np.float32))


def test_cli_export_writes_models(tmp_path, capsys):
    from fl_core.cli import main

    spec = build("lenet5")
    net = Network.from_spec(spec, seed=9)
    st = random_state(net, 10)
    net.eval()
    np.savez(tmp_path / "w.npz", **st)
    x = np.random.default_rng(11).normal(size=(8, 1, 28, 28)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", x=x)
    out = tmp_path / "m.tflite"
    assert main(["export", "--model", "lenet5", "--weights", str(tmp_path / "w.npz"),
                 "--out", str(out)]) == 0
    assert "NHWC" in capsys.readouterr().out
    np.testing.assert_allclose(run_tflite(out.read_bytes(), x), net.predict(x), rtol=0, atol=1e-5)
    out8 = tmp_path / "m8.tflite"
    assert main(["export", "--model", "lenet5", "--weights", str(tmp_path / "w.npz"),
                 "--out", str(out8), "--int8", "--calib", str(tmp_path / "calib.npz")]) == 0
    assert out8.stat().st_size < out.stat().st_size / 3
    assert main(["export", "--model", "lenet5", "--out", str(out8), "--int8"]) == 2
    assert "--calib" in capsys.readouterr().err
    assert main(["export", "--model", "lenet5", "--weights", str(tmp_path / "nope.npz"),
                 "--out", str(out)]) == 2
