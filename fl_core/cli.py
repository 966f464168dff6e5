"""The ``sparsefl`` command line. Each subcommand lives in ``fl_core.commands.<name>``."""

from __future__ import annotations

import argparse
import importlib
import sys

#: subcommand -> module under fl_core.commands (imported only when needed, so
#: ``sparsefl profiles`` does not pay for numba or torch)
COMMANDS = {
    "estimate": "estimate",
    "budget": "budget",
    "profiles": "profiles",
    "board": "board",
    "export": "export",
    "run": "run",
    "report": "report",
}


from fl_core.commands import CLIError  # noqa: E402  (re-exported for subcommands)

__all__ = ["COMMANDS", "CLIError", "build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sparsefl",
        description="Sparse federated learning on edge devices: estimate, profile, run.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in COMMANDS.values():
        importlib.import_module(f"fl_core.commands.{module}").add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    module = importlib.import_module(f"fl_core.commands.{COMMANDS[args.command]}")
    try:
        return int(module.run(args) or 0)
    except BrokenPipeError:  # output piped into `head` and the like: not an error
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (ValueError, FileNotFoundError) as e:  # CLIError is a ValueError
        print(f"sparsefl {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
