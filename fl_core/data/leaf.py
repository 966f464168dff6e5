"""FEMNIST from LEAF's JSON files, with its natural partition by writer.

LEAF layout (``leaf/data/femnist/data/``): ``train/*.json`` and ``test/*.json`` (LEAF's own
per-writer sample split), or only ``all_data/*.json`` (unsplit; then ``test_fraction`` of each
writer's samples, seeded, go to test, as LEAF's ``--split sample`` does). Every JSON file is::

    {"users": [writer, ...], "num_samples": [n, ...],
     "user_data": {writer: {"x": [[784 floats in [0, 1]], ...], "y": [label, ...]}, ...}}

with labels 0..61 (digits, upper case, lower case) and 28x28 images flattened row-major.
Each file is validated (keys, declared ``num_samples`` against the lists, row lengths, label
range, pixel range) before its arrays are built. Parsing a LEAF file needs several times its
size in memory for Python objects; files are processed one at a time.
"""

from __future__ import annotations

import glob
import json
import os
import string

import numpy as np

from .base import DataError, Dataset, normalize_images

NUM_CLASSES = 62
PIXELS = 28 * 28
CLASS_NAMES = tuple(string.digits + string.ascii_uppercase + string.ascii_lowercase)
LAYOUT = (
    "LEAF's femnist data directory holding train/*.json and test/*.json (or all_data/*.json); "
    'each file {"users": [...], "num_samples": [...], "user_data": {user: {"x": [[784 floats]], '
    '"y": [int 0..61]}}}'
)


def read_leaf_json(path: str, pixels: int = PIXELS, num_classes: int = NUM_CLASSES):
    """Read and validate one LEAF JSON file -> list of (writer, x float32 (n, pixels), y int64)."""
    if not os.path.isfile(path):
        raise DataError(f"LEAF file missing: {path}. Expected layout: {LAYOUT}")
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not valid JSON ({e}); truncated or corrupt LEAF file") from e
    if not isinstance(doc, dict) or not {"users", "num_samples", "user_data"} <= doc.keys():
        raise DataError(f"{path}: expected keys users, num_samples, user_data. Layout: {LAYOUT}")
    users, counts, data = doc["users"], doc["num_samples"], doc["user_data"]
    if not (isinstance(users, list) and isinstance(counts, list) and isinstance(data, dict)):
        raise DataError(f"{path}: users and num_samples must be lists, user_data an object")
    if len(users) != len(counts):
        raise DataError(f"{path}: {len(users)} users but {len(counts)} num_samples entries")
    out = []
    for user, n in zip(users, counts, strict=True):
        ud = data.get(user)
        if not isinstance(ud, dict) or "x" not in ud or "y" not in ud:
            raise DataError(f"{path}: user_data has no x/y for writer {user!r}")
        xs, ys = ud["x"], ud["y"]
        if not isinstance(n, int) or not isinstance(xs, list) or not isinstance(ys, list) \
                or len(xs) != n or len(ys) != n:
            raise DataError(
                f"{path}: writer {user!r} declares num_samples={n!r} but has "
                f"{len(xs) if isinstance(xs, list) else '?'} x and "
                f"{len(ys) if isinstance(ys, list) else '?'} y entries"
            )
        if any(not isinstance(r, list) or len(r) != pixels for r in xs):
            raise DataError(f"{path}: writer {user!r} has an image that is not {pixels} values")
        try:
            x = np.asarray(xs, dtype=np.float32).reshape(n, pixels)
            y = np.asarray(ys, dtype=np.int64).reshape(n)
        except (TypeError, ValueError) as e:
            raise DataError(f"{path}: writer {user!r} has non-numeric x or y ({e})") from e
        if n and (not np.isfinite(x).all() or x.min() < 0.0 or x.max() > 1.0):
            raise DataError(f"{path}: writer {user!r} has pixel values outside [0, 1]")
        if n and (y.min() < 0 or y.max() >= num_classes):
            raise DataError(f"{path}: writer {user!r} has labels outside 0..{num_classes - 1}")
        out.append((str(user), x, y))
    return out


def _json_files(directory: str) -> list[str]:
    files = sorted(glob.glob(os.path.join(directory, "*.json")))
    if not files:
        raise DataError(f"femnist: no *.json files in {directory}. Expected layout: {LAYOUT}")
    return files


def _resolve(path: str) -> tuple[str | None, str | None, str | None]:
    for base in (path, os.path.join(path, "data")):
        tr, te, al = (os.path.join(base, d) for d in ("train", "test", "all_data"))
        if os.path.isdir(tr) or os.path.isdir(te):
            if not (os.path.isdir(tr) and os.path.isdir(te)):
                missing = te if os.path.isdir(tr) else tr
                raise DataError(f"femnist: missing directory {missing}. Expected layout: {LAYOUT}")
            return tr, te, None
        if os.path.isdir(al):
            return None, None, al
    raise DataError(f"femnist: no train/, test/ or all_data/ under {path}. Expected layout: {LAYOUT}")


def _collect(files: list[str]) -> list[tuple[str, np.ndarray, np.ndarray]]:
    rows = []
    for f in files:
        rows.extend(read_leaf_json(f))
    return rows


def load_femnist(
    path: str, *, test_fraction: float = 0.1, seed: int = 0, normalize: str = "standard"
) -> Dataset:
    """Load FEMNIST from LEAF JSON files; ``groups`` holds each training sample's writer."""
    tr_dir, te_dir, all_dir = _resolve(path)
    if all_dir is not None:
        rng = np.random.default_rng(seed)
        train, test = [], []
        for user, x, y in _collect(_json_files(all_dir)):
            perm = rng.permutation(y.size)
            k = int(round(test_fraction * y.size))
            test.append((user, x[perm[:k]], y[perm[:k]]))
            train.append((user, x[perm[k:]], y[perm[k:]]))
        split = f"per-writer test_fraction={test_fraction} seed={seed} from all_data"
    else:
        train, test = _collect(_json_files(tr_dir)), _collect(_json_files(te_dir))
        split = "LEAF train/ and test/ files"
    writers = sorted({u for u, _, y in train if y.size})
    if not writers:
        raise DataError(f"femnist: no training samples under {path}")
    wid = {w: i for i, w in enumerate(writers)}
    x = np.concatenate([a for _, a, _ in train]).reshape(-1, 1, 28, 28)
    y = np.concatenate([b for _, _, b in train])
    groups = np.concatenate([np.full(b.size, wid.get(u, -1), np.int64) for u, _, b in train])
    xt = np.concatenate([a for _, a, _ in test]).reshape(-1, 1, 28, 28) if test else \
        np.empty((0, 1, 28, 28), np.float32)
    yt = np.concatenate([b for _, _, b in test]) if test else np.empty(0, np.int64)
    del train, test
    x, xt, meta = normalize_images(x, xt, normalize)
    meta.update(source=os.path.abspath(path), split=split)
    return Dataset(
        name="femnist", x=x, y=y, x_test=xt, y_test=yt, num_classes=NUM_CLASSES,
        input_shape=(1, 28, 28), groups=groups, group_names=tuple(writers),
        class_names=CLASS_NAMES, meta=meta,
    )
