"""Command line: ``fimlora calibrate``, ``fimlora show``, ``fimlora env``.

    parser    the arguments, their choices taken from the library's constants
    commands  what each command does (calibrate is a thin shell over fimlora.pipeline)
    output    the --out directory, checked first and cleaned up after a failure
    launch    joining the process group of torchrun / accelerate / MPI launches
"""

from __future__ import annotations

import contextlib
import logging
import sys
import warnings
from pathlib import Path

from .parser import build_parser

__all__ = ["build_parser", "main"]

_PACKAGE_DIR = str(Path(__file__).resolve().parent.parent)
_logger = logging.getLogger("fimlora")


@contextlib.contextmanager
def _messages(verbose: bool):
    """For one command: fimlora's own log lines and warnings as ``fimlora: ...`` on stderr; other
    libraries' log records and warnings (transformers' deprecations, bitsandbytes' kernel probes,
    NumPy's start-up notes) only with -v, under their own names. Restored afterwards."""
    own = logging.StreamHandler(sys.stderr)
    own.setFormatter(logging.Formatter("fimlora: %(message)s"))
    others = logging.StreamHandler(sys.stderr) if verbose else logging.NullHandler()
    others.setFormatter(logging.Formatter("%(name)s: %(levelname)s: %(message)s"))
    root = logging.getLogger()
    saved = (_logger.level, _logger.propagate, root.level)
    _logger.addHandler(own)
    _logger.setLevel(logging.INFO if verbose else logging.WARNING)
    _logger.propagate = False  # the root's handler is for the others only
    root.addHandler(others)  # without one, Python's last-resort handler would print their warnings
    root.setLevel(logging.INFO if verbose else logging.WARNING)

    def show(message, category, filename, lineno, file=None, line=None):
        if str(Path(filename).resolve()).startswith(_PACKAGE_DIR):
            _logger.warning("warning: %s", message)
        else:
            logging.getLogger("warnings").info("%s: %s (%s:%s)", category.__name__, message, filename, lineno)

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("default")
            warnings.showwarning = show
            yield
    finally:
        _logger.removeHandler(own)
        root.removeHandler(others)
        _logger.setLevel(saved[0])
        _logger.propagate = saved[1]
        root.setLevel(saved[2])


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as stop:  # --help, --version (0) or an argument error (1, one line already printed)
        return int(stop.code or 0)
    from .commands import COMMANDS

    with _messages(args.verbose):
        try:
            return COMMANDS[args.command](args)
        except (ValueError, OSError, RuntimeError, ImportError) as error:
            if args.verbose:
                raise
            print(f"fimlora: error: {error}", file=sys.stderr)
            return 1
