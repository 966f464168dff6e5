"""``sparsefl run [CONFIG] [--out DIR] [--resume DIR] [--force]``: run a federation."""

from __future__ import annotations

import argparse
import sys


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``run`` on the ``sparsefl`` subparsers."""
    p = subparsers.add_parser(
        "run",
        help="run a federation from a TOML config (no config: a small all-simulated demo)",
        description="Run a federated-learning experiment described by a TOML config: data and "
        "partition, model, strategy, fleet of simulated devices, rounds. Writes the run "
        "directory (config.toml, rounds.csv, clients.csv, summary.json, final_model.npz, "
        "report.md, plots) and a checkpoint after every round. Without CONFIG it runs the "
        "bundled quick example (fl_core/examples/quick.toml).",
    )
    p.add_argument("config", nargs="?", default=None, metavar="CONFIG",
                   help="run config (.toml); default: the bundled quick example")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="run directory; an existing one is an error unless --force (default: [output] dir "
                   "of the config, else runs/<name>; if taken, the first free <dir>-2, <dir>-3, ...)")
    p.add_argument("--resume", default=None, metavar="DIR",
                   help="continue the run in DIR from its last checkpoint (its config.toml)")
    p.add_argument("--force", action="store_true",
                   help="replace an existing run directory")
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="client worker processes (0 = in-process; default: [fleet] workers)")
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


def run(args: argparse.Namespace) -> int:
    # errors are ValueErrors (ConfigError, RunDirError): the CLI prints them without a
    # traceback (not CLIError: under ``python -m fl_core.cli`` that class exists twice)
    from ..config import load_config
    from ..federation import open_run

    try:
        if args.resume is not None:
            if args.config is not None or args.out is not None or args.force:
                raise ValueError("--resume DIR takes the config and output from DIR; do not "
                               "also give CONFIG, --out or --force")
            fed = open_run(None, args.resume, resume=True, progress=not args.no_progress,
                           workers=args.workers)
            out = args.resume
            summary = fed.run(resume=True)
        else:
            cfg = load_config(args.config)
            out = args.out or _free_dir(cfg.output_dir(), args.force)
            fed = open_run(cfg, out, force=args.force, progress=not args.no_progress,
                           workers=args.workers)
            summary = fed.run(force=args.force)
    except KeyboardInterrupt:
        print(f"\ninterrupted: checkpoint and partial report in {out}; continue with "
              f"`sparsefl run --resume {out}`", file=sys.stderr)
        return 130
    print(f"run finished: {out}")
    print(_table(summary))
    print(f"report: {out}/report.md")
    return 0
