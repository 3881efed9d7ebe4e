"""Block ownership: which structure owns file-system block B.

This is the question the whole introspection engine turns on, and the reason the ext4 model is
the project's own: a write to block B is a file's data, an extent-tree node, a directory block,
an inode table block, a bitmap or the journal, and each is handled differently.

Design: an interval map of disjoint ``[start, end)`` runs, each with one :class:`Owner`, kept as
two parallel sorted lists searched with ``bisect`` (memory is per run, not per block, so a
multi-GiB file in a few extents costs a few entries).  Assigning a run cuts whatever it
overlaps (a cross-linked, hostile image cannot make two owners claim a block); releasing a run
removes only the parts still owned by the given inode, so a stale release after a reallocation
cannot drop the new owner.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator
from dataclasses import dataclass
from enum import Enum


class OwnerKind(Enum):
    SUPERBLOCK = "superblock"
    GROUP_DESC = "group_desc"
    BLOCK_BITMAP = "block_bitmap"
    INODE_BITMAP = "inode_bitmap"
    INODE_TABLE = "inode_table"
    JOURNAL = "journal"  #: a block of the journal inode (lblk = journal block number)
    EXTENT = "extent"  #: an extent-tree index or leaf block of ``ino``
    INDIRECT = "indirect"  #: an ext2/3 indirect block of ``ino``
    DIR = "dir"  #: a directory block of ``ino`` (lblk = logical block)
    SYMLINK = "symlink"  #: the target block of a slow symlink
    XATTR = "xattr"  #: an external extended-attribute block
    DATA = "data"  #: a regular file's data block (lblk = logical block)

    @property
    def is_metadata(self) -> bool:
        return self is not OwnerKind.DATA


@dataclass(frozen=True, slots=True)
class Owner:
    """Who owns a run of blocks; ``lblk`` is the logical block of the run's first block."""

    kind: OwnerKind
    ino: int = 0
    lblk: int = 0
    group: int = -1

    def at(self, delta: int) -> Owner:
        """The owner of the block ``delta`` blocks into the run."""
        return Owner(self.kind, self.ino, self.lblk + delta, self.group) if delta else self


class OwnershipMap:
    """Disjoint runs ``[start, end) -> Owner``."""

    def __init__(self) -> None:
        self._starts: list[int] = []
        self._ends: list[int] = []
        self._owners: list[Owner] = []

    def __len__(self) -> int:
        return len(self._starts)

    def lookup(self, block: int) -> Owner | None:
        i = bisect.bisect_right(self._starts, block) - 1
        if i >= 0 and block < self._ends[i]:
            owner = self._owners[i]
            return owner.at(block - self._starts[i])
        return None

    def overlaps(self, start: int, end: int) -> Iterator[tuple[int, int, Owner | None]]:
        """Cover ``[start, end)`` with consecutive pieces: owned runs and unowned gaps (None)."""
        i = max(0, bisect.bisect_right(self._starts, start) - 1)
        pos = start
        n = len(self._starts)
        while pos < end:
            while i < n and self._ends[i] <= pos:
                i += 1
            if i >= n or self._starts[i] >= end:
                yield pos, end, None
                return
            s = self._starts[i]
            if s > pos:
                yield pos, s, None
                pos = s
            e = min(self._ends[i], end)
            yield pos, e, self._owners[i].at(pos - s)
            pos = e

    def assign(self, start: int, length: int, owner: Owner) -> None:
        if length <= 0:
            return
        self._cut(start, start + length)
        i = bisect.bisect_left(self._starts, start)
        self._starts.insert(i, start)
        self._ends.insert(i, start + length)
        self._owners.insert(i, owner)

    def release(self, start: int, length: int, ino: int | None = None) -> None:
        """Forget ``[start, start+length)``, or only the parts owned by inode ``ino``."""
        end = start + length
        if ino is None:
            self._cut(start, end)
            return
        for s, e, owner in list(self.overlaps(start, end)):
            if owner is not None and owner.ino == ino:
                self._cut(s, e)

    def _cut(self, start: int, end: int) -> None:
        i = max(0, bisect.bisect_right(self._starts, start) - 1)
        while i < len(self._starts) and self._starts[i] < end:
            s, e, owner = self._starts[i], self._ends[i], self._owners[i]
            if e <= start:
                i += 1
                continue
            del self._starts[i], self._ends[i], self._owners[i]
            if s < start:
                self._starts.insert(i, s)
                self._ends.insert(i, start)
                self._owners.insert(i, owner)
                i += 1
            if e > end:
                self._starts.insert(i, end)
                self._ends.insert(i, e)
                self._owners.insert(i, owner.at(end - s))
                i += 1

    def runs(self) -> Iterator[tuple[int, int, Owner]]:
        yield from zip(self._starts, self._ends, self._owners, strict=True)
