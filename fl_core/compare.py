"""Compare strategies in one job: a run per ``[[compare]]`` entry, sharing data and boards.

A config with ``[[compare]]`` tables (each a ``[strategy]`` table) runs one federation per
entry into ``<out>/<label>/`` (a complete run directory each), all on the same data
partition, fleet, seed and boards; the boards are started and calibrated once
(``<out>/calibration/``, ``<out>/boards.json``) and released at the end. The comparison —
``<out>/comparison.md`` with the accuracy / energy / uplink table and the Pareto plots — is
written by :func:`fl_core.report.compare`.

Resuming (``sparsefl run --resume <out>``) skips the finished runs, resumes the interrupted
one from its checkpoint and starts the rest, reusing the saved calibration.
"""

from __future__ import annotations

import copy
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import ConfigError, RunConfig, resolved_toml
from .runlog import atomic_write_text, fresh_dir


def label_of(entry: dict[str, Any]) -> str:
    """A run's directory name: the strategy and its sparsity (e.g. ``zerofl-0.9``)."""
    lab = str(entry["name"])
    if "sparsity" in entry:
        lab += f"-{float(entry['sparsity']):g}"
    elif "density" in entry:
        lab += f"-{1.0 - float(entry['density']):g}"
    if "rule" in entry and entry["name"] == "zerofl" and entry["rule"] != "topk_weights":
        lab += f"-{entry['rule']}"
    return lab


def variants(cfg: RunConfig) -> list[tuple[str, RunConfig]]:
    """``(label, config)`` per ``[[compare]]`` entry (labels made unique)."""
    out: list[tuple[str, RunConfig]] = []
    seen: dict[str, int] = {}
    for entry in cfg.compare:
        lab = label_of(entry)
        seen[lab] = seen.get(lab, 0) + 1
        if seen[lab] > 1:
            lab = f"{lab}-{seen[lab]}"
        v = copy.deepcopy(cfg)
        v.compare = []
        v.strategy = dict(entry)
        v.name = f"{cfg.name}-{lab}"
        out.append((lab, v))
    return out


@dataclass
class ComparisonResult:
    """What a comparison job produced."""

    out: Path
    summaries: dict[str, dict[str, Any]]
    table: str
    status: str


def _summary(d: Path) -> dict[str, Any] | None:
    """A run directory's summary.json (None when it has none yet or it is unreadable)."""
    try:
        return json.loads((d / "summary.json").read_text())
    except (OSError, ValueError):
        return None


def run_comparison(cfg: RunConfig | None, out: str | Path, *, resume: bool = False,
                   force: bool = False, progress: bool = True, workers: int | None = None,
                   log: Any = None) -> ComparisonResult:
    """Run (or resume) every ``[[compare]]`` entry of ``cfg`` into ``out``."""
    from .clients import WorkerPool, worker_count
    from .config import load_config
    from .federation import Federation, RunDirError, build_spec, check_out_dir, load_data
    from .federation import make_strategy as _strategy
    from .hybrid import BoardSet, parse_boards, sparsities_of
    from .report import compare

    say = log or (lambda s: print(f"sparsefl: {s}", file=sys.stderr, flush=True))
    root = Path(out)
    if resume:
        if not (root / "config.toml").is_file():
            raise RunDirError(f"{root}: not a comparison directory (no config.toml) to resume")
        cfg = load_config(root / "config.toml")
    elif cfg is None:
        raise ValueError("run_comparison: a config is needed for a new comparison")
    else:
        check_out_dir(root, force)
    if not cfg.compare:
        raise ConfigError(f"{cfg.source}: no [[compare]] entries to run")
    runs = variants(cfg)
    dataset, parts = load_data(cfg)
    spec = build_spec(cfg, dataset)
    for _lab, v in runs:                      # every strategy's parameters, before any work
        _strategy(v, spec)
    if not resume:
        fresh_dir(root)
        atomic_write_text(root / "config.toml", resolved_toml(cfg))
    nw = worker_count(workers, cfg.fleet.workers)
    pool = WorkerPool(nw, timeout_s=cfg.fleet.timeout_s) if nw > 0 else None
    boards = (BoardSet(parse_boards(cfg.fleet.boards),
                       calibration_repeats=cfg.fleet.calibration_repeats, log=say)
              if cfg.fleet.boards else None)
    summaries: dict[str, dict[str, Any]] = {}
    status = "completed"
    try:
        if boards is not None:
            boards.start([f"board{i}" for i in range(len(boards))])
            if resume and (root / "calibration").is_dir():
                boards.load(root)
            else:
                tc = cfg.train_config()
                cover = sorted({s for _, v in runs for s in sparsities_of(v.strategy)})
                boards.calibrate(spec, cover, batch=tc.batch_size, threads=tc.threads)
            boards.save(root)
        for i, (lab, v) in enumerate(runs, 1):
            d = root / lab
            done = _summary(d)
            if done is not None and done.get("status") == "completed":
                say(f"[{i}/{len(runs)}] {lab}: already finished")
                summaries[lab] = done
                continue
            again = (d / "config.toml").is_file()
            if d.exists() and not again:      # killed before its config was written: start over
                fresh_dir(d)
            say(f"[{i}/{len(runs)}] {lab}: {'resuming' if again else 'running'} -> {d}")
            fed = Federation(v if not again else load_config(d / "config.toml"), d,
                             dataset=dataset, parts=parts, pool=pool, boards=boards,
                             progress=progress, label=lab)
            try:
                summaries[lab] = fed.run(resume=again)
            finally:
                fed.close()
    except KeyboardInterrupt:
        status = "interrupted"
    finally:
        if boards is not None:
            boards.close()
        if pool is not None:
            pool.close()
    dirs = [root / lab for lab, _ in runs if (root / lab / "summary.json").is_file()]
    table = ""
    if dirs:
        try:
            table, _ = compare([str(x) for x in dirs], out=root)
        except Exception as e:  # noqa: BLE001 - the runs are safe; say why
            say(f"comparison not written: {type(e).__name__}: {e}")
    if status == "interrupted":
        raise KeyboardInterrupt
    return ComparisonResult(root, summaries, table, status)


__all__ = ["ComparisonResult", "label_of", "run_comparison", "variants"]
