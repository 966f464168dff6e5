"""``sparsefl run [CONFIG] [--out DIR] [--resume DIR] [--force]``: run a federation.

Without CONFIG it runs the main job, the bundled hybrid demo (fl_core/examples/demo.toml): two
emulated boards beside 48 simulated clients, FedAvg vs ZeroFL, FedDST and FLASH. A config with
``[[compare]]`` entries runs one federation per entry (:mod:`fl_core.compare`).
"""

from __future__ import annotations

import argparse
import os
import sys


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``run`` on the ``sparsefl`` subparsers."""
    p = subparsers.add_parser(
        "run",
        help="run a federation from a TOML config (no config: the bundled hybrid demo)",
        description="Run a federated-learning experiment described by a TOML config: data and "
        "partition, model, strategy, fleet of simulated devices, rounds. Writes the run "
        "directory (config.toml, rounds.csv, clients.csv, summary.json, final_model.npz, "
        "report.md, plots) and a checkpoint after every round. Without CONFIG it runs the "
        "main job, the bundled hybrid demo (fl_core/examples/demo.toml): 2 emulated boards "
        "(the real agent on pseudo-terminals, started and stopped here) beside 48 simulated "
        "clients, comparing fedavg, zerofl, feddst and flash at 90%% sparsity on the bundled "
        "MNIST subset; a config with [[compare]] entries runs one federation per entry.",
    )
    p.add_argument("config", nargs="?", default=None, metavar="CONFIG",
                   help="run config (.toml); default: the bundled hybrid demo")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="run directory; an existing one is an error unless --force (default: [output] dir "
                   "of the config, else runs/<name>; if taken, the first free <dir>-2, <dir>-3, ...)")
    p.add_argument("--resume", default=None, metavar="DIR",
                   help="continue the run in DIR from its last checkpoint (its config.toml)")
    p.add_argument("--force", action="store_true",
                   help="replace an existing run directory")
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="client worker processes (0 = in-process; default: [fleet] workers)")
    p.add_argument("--rounds", type=int, default=None, metavar="N",
                   help="override the config's rounds (e.g. a quick look at the demo)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _table(summary: dict) -> str:
    t = summary["totals"]
    acc = summary.get("final_accuracy")
    return "\n".join([
        f"  final accuracy   {'-' if acc is None else f'{acc:.4f}'}",
        f"  client energy    {t['energy_j']:.4g} J",
        f"  uplink           {t['uplink_bytes'] / 1e6:.4g} MB",
        f"  clients ok/failed/dropped  {t['clients_ok']}/{t['clients_failed']}/"
        f"{t['clients_dropped']}",
        f"  wall time        {summary['wall_time_s']:.1f} s",
    ])


def _free_dir(path: str, force: bool) -> str:
    """The config's output dir, or (when it is taken and no --force) the first free
    ``<dir>-2``, ``<dir>-3``, ...: an existing run is never overwritten."""
    import os

    if force or not os.path.exists(path):
        return path
    i = 2
    while os.path.exists(f"{path}-{i}"):
        i += 1
    print(f"{path} exists; writing this run to {path}-{i}", file=sys.stderr)
    return f"{path}-{i}"


def _is_comparison(path: str) -> bool:
    from ..config import load_config

    return bool(load_config(os.path.join(path, "config.toml")).compare)


def run(args: argparse.Namespace) -> int:
    # errors are ValueErrors (ConfigError, RunDirError, BoardError's message): the CLI prints
    # them without a traceback (not CLIError: under ``python -m fl_core.cli`` that class
    # exists twice)
    from ..board_client import BoardError
    from ..config import BUNDLED_DEMO, load_config
    from ..federation import open_run

    out = args.resume or args.out or "?"
    progress = not args.no_progress
    try:
        if args.resume is not None:
            if args.config is not None or args.out is not None or args.force or args.rounds:
                raise ValueError("--resume DIR takes the config and output from DIR; do not "
                                 "also give CONFIG, --out, --rounds or --force")
            if not os.path.isfile(os.path.join(args.resume, "config.toml")):
                raise ValueError(f"{args.resume}: not a run directory (no config.toml) to "
                                 "resume")
            if _is_comparison(args.resume):
                return _comparison(None, args.resume, args, resume=True)
            fed = open_run(None, args.resume, resume=True, progress=progress,
                           workers=args.workers)
            summary = fed.run(resume=True)
        else:
            cfg = load_config(args.config if args.config is not None else BUNDLED_DEMO)
            if args.rounds is not None:
                if args.rounds < 1:
                    raise ValueError(f"--rounds: expected an integer >= 1, got {args.rounds}")
                cfg.rounds = args.rounds
            out = args.out or _free_dir(cfg.output_dir(), args.force)
            if cfg.compare:
                return _comparison(cfg, out, args, resume=False)
            fed = open_run(cfg, out, force=args.force, progress=progress,
                           workers=args.workers)
            summary = fed.run(force=args.force)
    except KeyboardInterrupt:
        print(f"\ninterrupted: checkpoint and partial report in {out}; continue with "
              f"`sparsefl run --resume {out}`", file=sys.stderr)
        return 130
    except BoardError as e:
        raise ValueError(str(e)) from None
    print(f"run finished: {out}")
    print(_table(summary))
    print(f"report: {out}/report.md")
    return 0


def _comparison(cfg, out: str, args: argparse.Namespace, resume: bool) -> int:
    from ..compare import run_comparison

    res = run_comparison(cfg, out, resume=resume, force=args.force, workers=args.workers,
                         progress=not args.no_progress)
    print(f"comparison finished: {out}")
    if res.table:
        print(res.table)
    for lab in res.summaries:
        print(f"  {lab}: {out}/{lab}/report.md")
    if (res.out / "comparison.md").is_file():
        print(f"comparison: {out}/comparison.md")
    return 0
