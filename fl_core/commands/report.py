"""``sparsefl report DIR [DIR ...]``: a run's report, or a comparison of several runs."""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``report`` on the ``sparsefl`` subparsers."""
    p = subparsers.add_parser(
        "report",
        help="write report.md and plots for a run, or compare runs (table + Pareto plot)",
        description="With one run directory: (re)write its report.md and PNG plots. With a "
        "directory of runs (sparsefl run's runs/<name>/ holding one run per strategy): rewrite "
        "each run's report and write the comparison into that directory. With several "
        "directories: print a table of final accuracy, client energy and uplink per run (runs "
        "of one config with different seeds as mean ± std) and write comparison.md, the "
        "accuracy-energy Pareto plot and accuracy vs energy / uplink plots.",
    )
    p.add_argument("dirs", nargs="+", metavar="DIR", help="run directories (or directories of runs)")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="where a comparison writes comparison.md and its plots (default: the "
                   "directory of runs when one is given, else the current directory)")
    return p


def run(args: argparse.Namespace) -> int:
    from ..report import compare, find_runs, is_run_dir, write_report

    if len(args.dirs) == 1 and args.out is None and is_run_dir(args.dirs[0]):
        path = write_report(args.dirs[0])
        print(f"report: {path}")
        return 0
    out = args.out
    if len(args.dirs) == 1 and not is_run_dir(args.dirs[0]):
        runs = find_runs(args.dirs[0])          # a directory of runs: their reports too
        for r in runs:
            print(f"report: {write_report(r)}")
        out = out or args.dirs[0]
    table, plot = compare(args.dirs, out or ".")
    print(table)
    print(f"comparison: {plot.parent / 'comparison.md'} (Pareto plot {plot})")
    return 0
