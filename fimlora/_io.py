"""Small helpers for atomic file and directory writes.

A run that crashes (or is interrupted) half way through writing should never
leave a truncated plan or a half-populated adapter directory behind, because a
later run or a user would happily load it.  Everything here writes to a
temporary sibling first and then renames, which is atomic on POSIX filesystems
when source and destination share a directory.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["atomic_write_bytes", "atomic_write_text", "atomic_directory"]


def _umask() -> int:
    """The process umask (read by setting it and putting it back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _publish(path: Path, mode: int) -> None:
    """Give a temporary file (mkstemp: 0600) or directory (mkdtemp: 0700) the mode an ordinary
    ``open``/``mkdir`` would have given it: ``mode`` (0666 / 0777) less the umask."""
    os.chmod(path, mode & ~_umask())


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically and return the path.

    The bytes go to a temporary file in the same directory, are fsynced, and
    the file is then moved over ``path`` with :func:`os.replace`.  On any error
    the temporary file is removed and ``path`` is left as it was.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Same directory as the target so os.replace never crosses filesystems.
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        _publish(Path(tmp_name), 0o666)
        os.replace(tmp_name, target)
    except BaseException:
        # BaseException: a KeyboardInterrupt must not leave litter behind either.
        try:
            os.unlink(tmp_name)
        except FileNotFoundError:
            pass
        raise
    return target


def atomic_write_text(path: str | os.PathLike[str], text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_write_bytes`)."""
    return atomic_write_bytes(path, text.encode(encoding))


@contextmanager
def atomic_directory(path: str | os.PathLike[str], overwrite: bool = False) -> Iterator[Path]:
    """Build a directory in a temporary sibling and move it into place on success.

    Yields a fresh, empty directory named ``.{name}.tmp-XXXX`` next to ``path``.
    When the ``with`` block finishes normally the temporary directory becomes
    ``path``.  If the block raises, the temporary directory is deleted and the
    exception propagates, so a failed run leaves nothing behind.

    If ``path`` already exists and ``overwrite`` is False, :class:`FileExistsError`
    is raised (before any work is thrown away, and again at commit time in case
    something appeared meanwhile).  With ``overwrite`` the old directory is moved
    aside, the new one renamed into place, and only then the old one deleted.
    """
    target = Path(path)
    if target.exists() and not overwrite:
        raise _exists_error(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        _publish(tmp, 0o777)
        # what was written inside, by whatever means, gets ordinary modes; links (and what they point to) are left alone
        for root, dirs, files in os.walk(tmp):  # followlinks=False: never walks into a linked directory
            for name in dirs + files:
                entry = Path(root, name)
                if not entry.is_symlink():
                    _publish(entry, 0o777 if entry.is_dir() else 0o666)
        _commit(tmp, target, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _exists_error(target: Path) -> FileExistsError:
    return FileExistsError(
        f"{target} already exists; pass overwrite=True (--overwrite on the command line) "
        "to replace it, or choose another --out"
    )


def _commit(tmp: Path, target: Path, overwrite: bool) -> None:
    """Move ``tmp`` to ``target``, replacing an existing ``target`` if allowed."""
    if not (target.exists() or target.is_symlink()):
        os.replace(tmp, target)
        return
    if not overwrite:
        raise _exists_error(target)
    # Move the old one aside first: if the final rename fails we can put it back,
    # and at no point is ``target`` a mix of old and new files.
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    aside = old / target.name
    os.replace(target, aside)
    try:
        os.replace(tmp, target)
    except BaseException:
        os.replace(aside, target)
        shutil.rmtree(old, ignore_errors=True)
        raise
    # rmtree on the holder removes ``aside`` whether it was a file, dir or link.
    shutil.rmtree(old, ignore_errors=True)
