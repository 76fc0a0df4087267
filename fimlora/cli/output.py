"""The --out directory: checked before any model is loaded, and nothing created left behind."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def check_out(out: Path, overwrite: bool) -> list[Path]:
    """Raise now if ``out`` cannot be written; return the missing directories above it, which
    writing will create (``remove_created`` takes them away again if the run fails)."""
    if (out.exists() or out.is_symlink()) and not overwrite:
        raise FileExistsError(f"--out {out} already exists; pass --overwrite or choose another --out")
    missing = []
    parent = out.absolute().parent
    while not parent.exists():
        missing.append(parent)
        parent = parent.parent
    if not parent.is_dir():
        raise NotADirectoryError(f"--out {out}: {parent} is not a directory; choose another --out")
    try:  # the one reliable test: read-only mounts, permissions, ACLs and quotas all show here
        os.rmdir(tempfile.mkdtemp(prefix=".fimlora-write-check-", dir=parent))
    except OSError as error:
        raise PermissionError(f"--out {out}: cannot create a directory in {parent} ({error.strerror}); "
                              "choose a writable --out") from None
    return missing[::-1]


def remove_created(directories: list[Path]) -> None:
    """Remove the directories ``check_out`` listed, deepest first, where they are (still) empty."""
    for directory in reversed(directories):
        try:
            directory.rmdir()
        except OSError:
            return  # not empty (something else wrote there) or already gone: leave the rest
