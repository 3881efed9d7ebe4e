"""Damage a recorded log the way buggy file systems or devices would, for crashcheck's tests.

A log is loaded as a list of :class:`Op` (one per entry, flags and payload kept), edited (an
entry moved or dropped), and written back with blocktrace's own :class:`LogWriter`, so the
damaged log is a well-formed log whose *order* is wrong: exactly what crashcheck must catch.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

from blocktrace.logwrites.format import LogFlag
from blocktrace.logwrites.reader import LogReader
from blocktrace.logwrites.writer import LogWriter

JBD2_MAGIC = 0xC03B3998
JBD2_DESCRIPTOR, JBD2_COMMIT = 1, 2


@dataclass
class Op:
    flags: int
    sector: int
    nr_sectors: int
    data: bytes
    mark: str | None

    @property
    def is_flush(self) -> bool:
        return bool(self.flags & LogFlag.FLUSH)


def load(log: Path) -> tuple[int, list[Op]]:
    with LogReader(log) as r:
        ops = [
            Op(e.flags, e.sector, e.nr_sectors, e.read_data(), e.mark)
            for e in r.entries(with_data=True)
        ]
        return r.sector_size, ops


def save(path: Path, sector_size: int, ops: list[Op]) -> Path:
    w = LogWriter.create(path, sector_size=sector_size, direct=False)
    for op in ops:
        if op.mark is not None:
            w.mark(op.mark)
        else:
            w.append(op.flags, op.sector, op.nr_sectors, op.data or None)
    w.close()
    return path


def jbd2_blocks(op: Op, kind: int, block: int = 4096) -> list[int]:
    """Offsets within ``op.data`` of JBD2 blocks of ``kind`` (commit, descriptor)."""
    found = []
    for off in range(0, len(op.data) - 7, block):
        magic, btype = struct.unpack_from(">II", op.data, off)
        if magic == JBD2_MAGIC and btype == kind:
            found.append(off)
    return found


def next_flush(ops: list[Op], after: int) -> int:
    return next(i for i in range(after + 1, len(ops)) if ops[i].is_flush)


def xfs_log_sectors(base: Path) -> range:
    """The 512-byte sectors of the internal log of the XFS file system on ``base`` (from its
    primary superblock): a write there is a log write, anywhere else an in-place write."""
    with open(base, "rb") as f:
        sb = f.read(512)
    assert sb[:4] == b"XFSB", f"{base}: no XFS superblock"
    (blocksize,) = struct.unpack_from(">I", sb, 4)
    (logstart,) = struct.unpack_from(">Q", sb, 48)  # a file-system block number
    (agblocks,) = struct.unpack_from(">I", sb, 84)
    (logblocks,) = struct.unpack_from(">I", sb, 96)
    agblklog = sb[124]
    assert logstart != 0, f"{base}: external log"
    agno, agbno = logstart >> agblklog, logstart & ((1 << agblklog) - 1)
    per_block = blocksize // 512
    first = (agno * agblocks + agbno) * per_block
    return range(first, first + logblocks * per_block)
