"""Reading a replica's files the way an attacker or a failing disk would damage them.

The storage fault tests flip bits inside a chosen record, cut a journal mid-record or find the
last record; they need to know where records are without going through the journal's own
checks. This reads the record layout of :mod:`raftkv.raft.journal` directly.
"""

from __future__ import annotations

import struct
from pathlib import Path

from raftkv.raft.journal import HEADER_BYTES


def record_offsets(journal: Path) -> list[tuple[int, int]]:
    """(offset, payload length) of every record of a journal file, up to the first zeros."""
    data = journal.read_bytes()
    off, out = HEADER_BYTES, []
    while off + 8 <= len(data):
        size, crc = struct.unpack_from(">II", data, off)
        if size == 0 and crc == 0:
            break  # preallocated space
        out.append((off, size))
        off += 8 + size
    return out
