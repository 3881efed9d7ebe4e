"""Block ownership: which structure owns file-system block B.

This is the question the whole introspection engine turns on, and the reason the ext4 model is
the project's own: a write to block B is a file's data, an extent-tree node, a directory block,
an inode table block, a bitmap or the journal, and each is handled differently.

Design: an interval map of disjoint ``[start, end)`` runs, each with one :class:`Owner`, kept in
sorted chunks searched with ``bisect`` (memory is per run, not per block, so a multi-GiB file
in a few extents costs a few entries; a change touches one chunk, so its cost does not grow
with the number of files).  Assigning a run cuts whatever it
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


#: runs per chunk before it is split: small enough that an insert or delete moves little
#: memory (a flat list made each assign O(runs), 50 us at 40,000 runs), large enough that the
#: chunk index stays short
CHUNK = 256


class OwnershipMap:
    """Disjoint runs ``[start, end) -> Owner``.

    Stored as a list of chunks, each three parallel sorted lists (starts, ends, owners) of at
    most ``2 * CHUNK`` runs, plus the first start of every chunk: a lookup is two bisects, an
    insert or delete touches one chunk (a sorted list of lists, as ``sortedcontainers`` does).
    """

    def __init__(self) -> None:
        self._firsts: list[int] = []  #: first start of each chunk
        self._starts: list[list[int]] = []
        self._ends: list[list[int]] = []
        self._owners: list[list[Owner]] = []
        self._len = 0

    def __len__(self) -> int:
        return self._len

    def _locate(self, block: int) -> tuple[int, int]:
        """(chunk, index) of the last run starting at or before ``block``; index -1: none."""
        c = bisect.bisect_right(self._firsts, block) - 1
        if c < 0:
            return 0, -1
        return c, bisect.bisect_right(self._starts[c], block) - 1

    def lookup(self, block: int) -> Owner | None:
        c, i = self._locate(block)
        if i >= 0 and block < self._ends[c][i]:
            return self._owners[c][i].at(block - self._starts[c][i])
        return None

    def _runs_from(self, block: int) -> Iterator[tuple[int, int, Owner]]:
        """The runs in order, from the one starting at or before ``block``."""
        c, i = self._locate(block)
        i = max(i, 0)
        while c < len(self._starts):
            starts, ends, owners = self._starts[c], self._ends[c], self._owners[c]
            while i < len(starts):
                yield starts[i], ends[i], owners[i]
                i += 1
            c += 1
            i = 0

    def overlaps(self, start: int, end: int) -> Iterator[tuple[int, int, Owner | None]]:
        """Cover ``[start, end)`` with consecutive pieces: owned runs and unowned gaps (None).

        Computed before the first piece is returned, so a caller may change the map while it
        walks the pieces (a journal commit met mid-write settles and assigns)."""
        return iter(self._pieces(start, end))

    def _pieces(self, start: int, end: int) -> list[tuple[int, int, Owner | None]]:
        out: list[tuple[int, int, Owner | None]] = []
        pos = start
        for s, e, owner in self._runs_from(start):
            if e <= pos:
                continue
            if s >= end:
                break
            if s > pos:
                out.append((pos, s, None))
                pos = s
            stop = min(e, end)
            out.append((pos, stop, owner.at(pos - s)))
            pos = stop
            if pos >= end:
                break
        if pos < end:
            out.append((pos, end, None))
        return out

    def assign(self, start: int, length: int, owner: Owner) -> None:
        if length <= 0:
            return
        end = start + length
        c, i = self._locate(start)
        if (i >= 0 and self._ends[c][i] > start) or self._next_start(c, i + 1) < end:
            self._cut(start, end)  # overlaps something (else the common case: a free gap)
            self._insert(start, end, owner)
        else:
            self._insert(start, end, owner, (c, i))

    def _next_start(self, c: int, i: int) -> float:
        """Start of the run at (chunk ``c``, index ``i``) or the first one after it."""
        if c < len(self._starts) and i < len(self._starts[c]):
            return self._starts[c][i]
        while c < len(self._starts):
            if i < len(self._starts[c]):
                return self._starts[c][i]
            c, i = c + 1, 0
        return float("inf")

    def _insert(
        self, start: int, end: int, owner: Owner, at: tuple[int, int] | None = None
    ) -> None:
        """Add a run where nothing is owned (``at``: ``_locate(start)`` if known)."""
        self._len += 1
        if not self._starts:
            self._firsts.append(start)
            self._starts.append([start])
            self._ends.append([end])
            self._owners.append([owner])
            return
        c, i = self._locate(start) if at is None else at
        i += 1
        starts = self._starts[c]
        starts.insert(i, start)
        self._ends[c].insert(i, end)
        self._owners[c].insert(i, owner)
        if i == 0:
            self._firsts[c] = start
        if len(starts) > 2 * CHUNK:  # split in halves
            ends, owners = self._ends[c], self._owners[c]
            self._starts.insert(c + 1, starts[CHUNK:])
            self._ends.insert(c + 1, ends[CHUNK:])
            self._owners.insert(c + 1, owners[CHUNK:])
            del starts[CHUNK:], ends[CHUNK:], owners[CHUNK:]
            self._firsts.insert(c + 1, self._starts[c + 1][0])

    def _delete(self, c: int, i: int) -> None:
        self._len -= 1
        del self._starts[c][i], self._ends[c][i], self._owners[c][i]
        if not self._starts[c]:
            del self._starts[c], self._ends[c], self._owners[c], self._firsts[c]
        elif i == 0:
            self._firsts[c] = self._starts[c][0]

    def release(self, start: int, length: int, ino: int | None = None) -> None:
        """Forget ``[start, start+length)``, or only the parts owned by inode ``ino``."""
        end = start + length
        if ino is None:
            self._cut(start, end)
            return
        c, i = self._locate(start)
        if i >= 0 and self._starts[c][i] == start and self._ends[c][i] == end:
            if self._owners[c][i].ino == ino:  # the common case: exactly the run it assigned
                self._delete(c, i)
            return
        for s, e, owner in self._pieces(start, end):
            if owner is not None and owner.ino == ino:
                self._cut(s, e)

    def _cut(self, start: int, end: int) -> None:
        hit = []
        for run in self._runs_from(start):  # in order: stop at the first past ``end``
            if run[0] >= end:
                break
            if run[1] > start:
                hit.append(run)
        for s, e, owner in hit:
            c, i = self._locate(s)
            self._delete(c, i)
            if s < start:
                self._insert(s, start, owner)
            if e > end:
                self._insert(end, e, owner.at(end - s))

    def runs(self) -> Iterator[tuple[int, int, Owner]]:
        for starts, ends, owners in zip(self._starts, self._ends, self._owners, strict=True):
            yield from zip(starts, ends, owners, strict=True)
