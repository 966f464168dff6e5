"""``sparsefl export``: write a ``.tflite`` model (fp32 or full-integer int8) without TensorFlow."""

from __future__ import annotations

import argparse
import os

import numpy as np


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``export`` on the ``sparsefl`` subparsers."""
    p = subparsers.add_parser(
        "export",
        help="write a .tflite model (fp32 or int8) from a model and its weights",
        description="Export a ModelSpec and its weights to a TFLite flatbuffer (no TensorFlow "
        "needed). The model's input tensor 'input' is NHWC float32 (batch, H, W, C): transpose "
        "NCHW data with x.transpose(0, 2, 3, 1); the output 'logits' is (batch, classes), no "
        "softmax. --int8 quantises weights (per output channel for conv) and activations (per "
        "tensor) from a calibration set; the interface stays float32 unless --int8-io.",
    )
    p.add_argument("--model", required=True, metavar="NAME|SPEC",
                   help="a builder name (femnist_cnn, resnet8, ...) or a ModelSpec .json file")
    p.add_argument("--weights", metavar="NPZ",
                   help="an .npz of the state_dict with torch names (e.g. np.savez(path, "
                   "**net.state_dict())); default: the Numba network's seeded init")
    p.add_argument("--seed", type=int, default=0,
                   help="init seed when no --weights are given (default: 0)")
    p.add_argument("--out", required=True, metavar="PATH", help="the .tflite file to write")
    p.add_argument("--int8", action="store_true",
                   help="full-integer post-training quantisation (needs --calib)")
    p.add_argument("--calib", metavar="NPZ",
                   help="calibration inputs: an .npz whose array 'x' (or only array) is NCHW "
                   "float (N, C, H, W) like the training data; a few hundred samples suffice")
    p.add_argument("--calib-samples", type=int, default=512,
                   help="use at most this many calibration samples (default: 512)")
    p.add_argument("--int8-io", action="store_true",
                   help="with --int8: int8 input/output tensors instead of float32")
    p.add_argument("--batch", type=int, default=1,
                   help="batch dimension written into the model (resizable; default: 1)")
    return p


def _calib(path: str, limit: int) -> np.ndarray:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--calib: no such file {path!r}")
    try:
        with np.load(path, allow_pickle=False) as z:
            names = z.files
            if "x" in names:
                key = "x"
            elif len(names) == 1:
                key = names[0]
            else:
                raise ValueError(f"--calib {path}: expected an array named 'x' (or a single "
                               f"array), found {names}")
            x = np.asarray(z[key])
    except (OSError, ValueError) as e:
        raise ValueError(f"--calib {path}: not a readable .npz ({e})") from None
    if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"--calib {path}: array {key!r} has dtype {x.dtype}, expected float")
    if limit < 1:
        raise ValueError(f"--calib-samples: expected >= 1, got {limit}")
    return x[:limit].astype(np.float32)


def run(args: argparse.Namespace) -> int:
    from embedded.tflite_export import export_tflite, load_state, write_tflite
    from hwmodel.models import load_model

    spec = load_model(args.model)
    if args.weights:
        if not os.path.isfile(args.weights):
            raise FileNotFoundError(f"--weights: no such file {args.weights!r}")
        state = load_state(args.weights)
    else:
        from embedded.network import Network

        state = Network.from_spec(spec, seed=args.seed).state_dict()
    if args.int8_io and not args.int8:
        raise ValueError("--int8-io needs --int8")
    calib = None
    if args.int8:
        if not args.calib:
            raise ValueError("--int8 needs --calib NPZ (NCHW calibration inputs)")
        calib = _calib(args.calib, args.calib_samples)
    elif args.calib:
        raise ValueError("--calib is only used with --int8")
    data = export_tflite(spec, state, int8=args.int8, calib=calib, int8_io=args.int8_io,
                         batch=args.batch)
    write_tflite(args.out, data)
    c = spec.input_shape
    shape = f"({args.batch}, {c[1]}, {c[2]}, {c[0]}) NHWC" if len(c) == 3 else \
        f"({args.batch}, {c[0]})"
    kind = "int8" + (" (int8 I/O)" if args.int8_io else " (float I/O)") if args.int8 else "fp32"
    print(f"wrote {args.out}: {spec.name} {kind}, {len(data):,} bytes; input 'input' {shape}, "
          f"output 'logits' ({args.batch}, {spec.num_classes})")
    return 0
