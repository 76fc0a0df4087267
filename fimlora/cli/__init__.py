"""Command line: ``fimlora calibrate``, ``fimlora show``, ``fimlora env``.

    parser    the arguments, their choices taken from the library's constants
    commands  what each command does (calibrate is a thin shell over fimlora.pipeline)
    output    the --out directory, checked first and cleaned up after a failure
    launch    joining the process group of torchrun / accelerate / MPI launches
"""

from __future__ import annotations

import logging
import sys

from .parser import build_parser

__all__ = ["build_parser", "main"]


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as stop:  # --help (0) or an argument error (1, one line already printed)
        return int(stop.code or 0)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="fimlora: %(message)s")
    from .commands import COMMANDS

    try:
        return COMMANDS[args.command](args)
    except (ValueError, OSError, RuntimeError, ImportError) as error:
        if args.verbose:
            raise
        print(f"fimlora: error: {error}", file=sys.stderr)
        return 1
