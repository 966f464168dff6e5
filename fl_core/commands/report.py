"""``sparsefl report DIR [DIR ...]``: a run's report, or a comparison of several runs."""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``report`` on the ``sparsefl`` subparsers."""
    p = subparsers.add_parser(
        "report",
        help="write report.md and plots for a run, or compare runs (table + Pareto plot)",
        description="With one run directory: (re)write its report.md and PNG plots. With "
        "several: print a table (runs of one config with different seeds as mean ± std) and "
        "write the accuracy-energy Pareto plot.",
    )
    p.add_argument("dirs", nargs="+", metavar="DIR", help="run directories")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="where a comparison writes comparison.md and pareto.png "
                   "(default: the current directory)")
    return p


def run(args: argparse.Namespace) -> int:
    from ..report import compare, write_report

    if len(args.dirs) == 1 and args.out is None:
        path = write_report(args.dirs[0])
        print(f"report: {path}")
        return 0
    table, plot = compare(args.dirs, args.out or ".")
    print(table)
    print(f"Pareto plot: {plot}")
    return 0
