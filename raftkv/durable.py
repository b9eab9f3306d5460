"""Files that must survive a crash and may hold secrets: written aside, then renamed.

Keys, certificates, secrets, term/vote files and snapshots all follow one recipe: write a
temporary file in the same directory with its final mode from the moment it exists
(``O_EXCL``: never through a file or link someone else put there), fsync it, rename it over the
target, and fsync the directory so the rename itself survives a power cut. A reader sees the
old file or the new one, never half of either.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

PRIVATE = 0o600


def fsync_dir(path: Path) -> None:
    """Make the renames and creations in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_temp(final: Path, data: bytes, mode: int) -> Path:
    """A fsynced temporary file next to ``final`` with ``data`` and exactly ``mode``."""
    temp = final.with_name(f".{final.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(temp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, mode)
    try:
        with os.fdopen(fd, "wb") as file:
            os.fchmod(file.fileno(), mode)  # the umask may only remove bits; be exact
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    return temp


def write_file(path: Path, data: bytes, *, mode: int = 0o644, overwrite: bool = False) -> None:
    """Replace ``path`` with ``data`` atomically and durably.

    Without ``overwrite`` an existing file is left alone and FileExistsError raised (losing a
    key or a CA silently invalidates everything made with it).
    """
    if not overwrite and (path.exists() or path.is_symlink()):
        raise FileExistsError(path)
    temp = write_temp(path, data, mode)
    try:
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
