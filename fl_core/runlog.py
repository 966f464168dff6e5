"""The run directory contract, the run log and atomic checkpoints.

A run directory holds::

    config.toml        the resolved run config
    rounds.csv         a row per round (ROUND_COLUMNS)
    clients.csv        a row per client per round (CLIENT_COLUMNS): device, each cost with its
                       provenance in its own column, host wall time, status and reason
    summary.json       final accuracy, totals, wall time, seed, versions, machine
    final_model.npz    the global model (np.load(..., allow_pickle=False)); masks as "mask/<layer>"
    checkpoints/       ckpt-<round>.npz + ckpt-<round>.json (the JSON is written last: a
                       checkpoint exists only once its JSON does)
    report.md, *.png   fl_core.report

Every file that must survive a kill is written atomically: a temporary file in the same
directory, flushed and fsynced, then renamed over the target (and the directory fsynced).
The CSV logs are appended as rounds finish; on resume they are rewritten from the rows held
in the last checkpoint, so they end exactly at the checkpointed round.
"""

from __future__ import annotations

import csv
import io
import json
import os
import platform
import re
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROUND_COLUMNS = ("round", "accuracy", "loss", "flops", "energy_j", "round_time_s",
                 "uplink_bytes", "downlink_bytes", "clients_ok", "clients_failed",
                 "clients_dropped")
CLIENT_COLUMNS = ("round", "client_id", "device", "status", "reason", "num_samples",
                  "train_loss", "flops", "flops_provenance", "time_s", "time_provenance",
                  "energy_j", "energy_provenance", "uplink_bytes", "bytes_provenance",
                  "downlink_bytes", "host_wall_s", "host_wall_provenance",
                  # boards of a hybrid run (empty for simulated clients): measured compute and
                  # link time, and the (calibrated) estimate of the same task's compute
                  "board", "compute_s", "transfer_s", "transfer_provenance", "est_time_s",
                  "est_energy_j", "est_provenance")
STATUSES = ("ok", "failed", "dropped")
_CKPT = re.compile(r"^ckpt-(\d{6})\.json$")
_UMASK = os.umask(0)
os.umask(_UMASK)


# ------------------------------------------------------------------------------ atomic files
def fresh_dir(path: str | os.PathLike) -> Path:
    """``path`` as a new empty directory (whatever stood there, file or tree, removed)."""
    import shutil

    p = Path(path)
    if p.is_dir():
        shutil.rmtree(p)
    elif p.exists():
        p.unlink()
    p.mkdir(parents=True)
    return p


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file, fsync, rename, fsync the directory)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def npz_bytes(arrays: Mapping[str, np.ndarray]) -> bytes:
    """An uncompressed .npz of plain numeric/bool arrays (no object arrays: loads without pickle)."""
    buf = io.BytesIO()
    for k, v in arrays.items():
        if np.asarray(v).dtype == object:
            raise TypeError(f"npz: array {k!r} has dtype object (would need pickle)")
    np.savez(buf, **{k: np.asarray(v) for k, v in arrays.items()})
    return buf.getvalue()


def load_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every array of an .npz file, loaded with ``allow_pickle=False``."""
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


# ------------------------------------------------------------------------------ CSV log
def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return "" if v != v else repr(v)
    return str(v)


def _csv_text(columns: Iterable[str], rows: Iterable[Mapping[str, Any]],
              header: bool = True) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    cols = list(columns)
    if header:
        w.writerow(cols)
    for r in rows:
        w.writerow([_fmt(r.get(c)) for c in cols])
    return buf.getvalue()


class RunLog:
    """rounds.csv and clients.csv, appended as the run goes; rows also kept in memory."""

    def __init__(self, out_dir: str | os.PathLike) -> None:
        self.dir = Path(out_dir)
        self.rounds: list[dict[str, Any]] = []
        self.clients: list[dict[str, Any]] = []

    @property
    def rounds_path(self) -> Path:
        return self.dir / "rounds.csv"

    @property
    def clients_path(self) -> Path:
        return self.dir / "clients.csv"

    def start(self, rounds: list[dict[str, Any]] | None = None,
              clients: list[dict[str, Any]] | None = None) -> None:
        """(Re)write both CSVs holding exactly ``rounds`` and ``clients`` (empty: headers only)."""
        self.rounds = [dict(r) for r in rounds or []]
        self.clients = [dict(c) for c in clients or []]
        atomic_write_text(self.rounds_path, _csv_text(ROUND_COLUMNS, self.rounds))
        atomic_write_text(self.clients_path, _csv_text(CLIENT_COLUMNS, self.clients))

    def append(self, round_row: Mapping[str, Any], client_rows: list[Mapping[str, Any]]) -> None:
        """Append one round (its client rows first, then the round row)."""
        for r in client_rows:
            bad = set(r) - set(CLIENT_COLUMNS)
            if bad:
                raise KeyError(f"clients.csv: unknown column(s) {sorted(bad)}")
        bad = set(round_row) - set(ROUND_COLUMNS)
        if bad:
            raise KeyError(f"rounds.csv: unknown column(s) {sorted(bad)}")
        self.clients.extend(dict(r) for r in client_rows)
        self.rounds.append(dict(round_row))
        for path, cols, rows in ((self.clients_path, CLIENT_COLUMNS, client_rows),
                                 (self.rounds_path, ROUND_COLUMNS, [round_row])):
            with open(path, "a", encoding="utf-8", newline="") as f:
                f.write(_csv_text(cols, rows, header=False))
                f.flush()
                os.fsync(f.fileno())


def read_csv(path: str | os.PathLike) -> list[dict[str, str]]:
    """Rows of a run CSV as dicts of strings."""
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


# ------------------------------------------------------------------------------ checkpoints
@dataclass
class Checkpoint:
    """One checkpoint: the completed round, JSON metadata and named arrays."""

    round: int
    meta: dict[str, Any]
    arrays: dict[str, np.ndarray]


class Checkpointer:
    """Atomic checkpoints in ``DIR/checkpoints``; keeps the newest ``keep`` (>= 1)."""

    def __init__(self, out_dir: str | os.PathLike, keep: int = 2) -> None:
        if not isinstance(keep, int) or keep < 1:
            raise ValueError(f"checkpoint keep: expected an integer >= 1, got {keep!r}")
        self.dir = Path(out_dir) / "checkpoints"
        self.keep = keep

    def save(self, rnd: int, meta: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> Path:
        """Write ``ckpt-<rnd>.npz`` then ``ckpt-<rnd>.json`` (the commit), then prune."""
        import hashlib

        data = npz_bytes(arrays)
        stem = f"ckpt-{rnd:06d}"
        atomic_write_bytes(self.dir / f"{stem}.npz", data)
        doc = dict(meta, round=int(rnd), npz_sha256=hashlib.sha256(data).hexdigest())
        atomic_write_text(self.dir / f"{stem}.json", json.dumps(doc, sort_keys=True))
        self.prune()
        return self.dir / f"{stem}.json"

    def rounds(self) -> list[int]:
        """Rounds with a committed checkpoint, ascending."""
        if not self.dir.is_dir():
            return []
        return sorted(int(m.group(1)) for p in self.dir.iterdir()
                      if (m := _CKPT.match(p.name)))

    def prune(self) -> None:
        for r in self.rounds()[:-self.keep]:
            for ext in (".json", ".npz"):
                try:
                    (self.dir / f"ckpt-{r:06d}{ext}").unlink()
                except FileNotFoundError:
                    pass
        for p in self.dir.glob(".*.tmp"):   # temp files of an interrupted write
            try:
                p.unlink()
            except OSError:
                pass

    def load_latest(self) -> Checkpoint | None:
        """The newest checkpoint whose JSON and arrays are intact (older ones as fallback)."""
        import hashlib

        for r in reversed(self.rounds()):
            stem = self.dir / f"ckpt-{r:06d}"
            try:
                meta = json.loads((stem.with_suffix(".json")).read_text("utf-8"))
                data = stem.with_suffix(".npz").read_bytes()
                if hashlib.sha256(data).hexdigest() != meta.get("npz_sha256"):
                    continue
                with np.load(io.BytesIO(data), allow_pickle=False) as z:
                    arrays = {k: z[k] for k in z.files}
            except (OSError, ValueError):
                continue
            return Checkpoint(r, meta, arrays)
        return None


# ------------------------------------------------------------------------------ summary
def versions() -> dict[str, str]:
    """Versions of sparsefl and the libraries a result depends on."""
    from importlib import metadata

    out = {}
    for name in ("sparsefl", "numpy", "numba", "scipy", "pandas", "matplotlib"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    out["python"] = platform.python_version()
    return out


def machine() -> dict[str, Any]:
    """The host a run ran on."""
    return {"platform": platform.platform(), "machine": platform.machine(),
            "processor": platform.processor(), "cpu_count": os.cpu_count(),
            "node": platform.node()}


def write_summary(out_dir: str | os.PathLike, summary: Mapping[str, Any]) -> Path:
    path = Path(out_dir) / "summary.json"
    atomic_write_text(path, json.dumps(summary, indent=1, sort_keys=True, default=_json_default))
    return path


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def write_final_model(out_dir: str | os.PathLike, weights: Mapping[str, np.ndarray],
                      masks: Mapping[str, np.ndarray] | None) -> Path:
    arrays = dict(weights)
    if masks:
        arrays.update({f"mask/{k}": np.asarray(v, dtype=bool) for k, v in masks.items()})
    path = Path(out_dir) / "final_model.npz"
    atomic_write_bytes(path, npz_bytes(arrays))
    return path


__all__ = ["CLIENT_COLUMNS", "ROUND_COLUMNS", "STATUSES", "Checkpoint", "Checkpointer", "RunLog",
           "fresh_dir",
           "atomic_write_bytes", "atomic_write_text", "load_npz", "machine", "npz_bytes",
           "read_csv", "versions", "write_final_model", "write_summary"]
