"""One process per data dir: an exclusive lock taken before anything else touches it.

Two nodes on one data dir would interleave their journals and votes. Without a lock the
second one only failed later, on a port it could not bind, after it had opened the journals
and written into the first one's log. The lock (``flock`` on ``DATA_DIR/LOCK``, released by
the kernel when the process dies, even by SIGKILL) is taken first, and the file names the
pid that holds it, so the refusal can say who.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from raftkv.errors import Unavailable

LOCK_FILE = "LOCK"

# The held locks' file descriptors: open for the life of the process.
_held: dict[Path, int] = {}


class DataDirBusy(Unavailable):
    """Another live process holds the data dir."""


def lock_data_dir(data_dir: Path, owner: str) -> None:
    """Take ``data_dir``'s lock for this process, or raise :class:`DataDirBusy` naming the
    process that holds it. ``owner`` (the node id) is written into the lock file."""
    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "another process"
        os.close(fd)
        raise DataDirBusy(
            f"{data_dir} is in use: {holder} is running on it; stop it first, or give this "
            "node another --data-dir"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"node {owner} (pid {os.getpid()})\n".encode(), 0)
    _held[data_dir.resolve()] = fd
