"""The study's append-only result CSV and the cell claims that let two workers share one grid."""

from __future__ import annotations

import csv
import fcntl
import os
from pathlib import Path

KEY = ("split", "task", "method", "budget", "seed", "recipe")


class ResultsFile:
    """One row per finished run; rows already there are skipped on a rerun (resume)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def rows(self) -> list[dict[str, str]]:
        if not self.path.exists():
            return []
        with self.path.open(newline="") as handle:
            return list(csv.DictReader(handle))

    def done(self) -> set[tuple[str, ...]]:
        return {tuple(row[k] for k in KEY) for row in self.rows()}

    def append(self, row: dict) -> None:
        """Write one row and fsync under a lock, so a killed run loses at most the run in progress."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", newline="") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            writer = csv.DictWriter(handle, fieldnames=list(row))
            if handle.tell() == 0:
                writer.writeheader()
            writer.writerow(row)
            handle.flush()
            os.fsync(handle.fileno())
            fcntl.flock(handle, fcntl.LOCK_UN)


def _claim_path(directory: Path, key: tuple[str, ...]) -> Path:
    return directory / ("__".join(key).replace("/", "_") + ".claim")


def release(directory: Path, key: tuple[str, ...]) -> None:
    _claim_path(directory, key).unlink(missing_ok=True)


def claim(directory: Path, key: tuple[str, ...]) -> bool:
    """Take a cell for this process; a claim whose process has died is taken over."""
    directory.mkdir(parents=True, exist_ok=True)
    path = _claim_path(directory, key)
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        try:
            owner = int(path.read_text() or "0")
            os.kill(owner, 0)
            return owner == os.getpid()
        except (ValueError, ProcessLookupError):
            path.unlink(missing_ok=True)
            return claim(directory, key)
        except PermissionError:
            return False
    with os.fdopen(fd, "w") as handle:
        handle.write(str(os.getpid()))
    return True
