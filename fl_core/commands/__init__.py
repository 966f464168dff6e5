"""CLI subcommands. Each module exposes ``add_parser(subparsers)`` and ``run(args) -> int``."""


class CLIError(ValueError):
    """A user-facing error: printed without a traceback, exit code 2.

    Defined here, not in ``fl_core.cli``: under ``python -m fl_core.cli`` that module is loaded
    twice (as ``__main__`` and as ``fl_core.cli``), which would make two distinct classes.
    """
