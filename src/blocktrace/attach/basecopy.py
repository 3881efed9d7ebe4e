"""The filter's base copy, taken while the VM runs: the shadow becomes the disk, exactly.

The *filter* mechanism (:mod:`.filter`) inserts QEMU's blklogwrites first; from the
``blockdev-reopen`` that inserts it (QEMU drains the node there) every guest write is in
the VM's file *and* logged, and every write before it is in the file.  The base is then
copied from the file into the shadow with the VM running, while the log sink
(:mod:`.sink`) applies the logged entries to the same shadow.  Two writers of one shadow;
:class:`CopyMap` is what keeps them from undoing each other.

The rule, per *granule* (64 KiB or more, see :class:`CopyMap`): **a granule receives bytes
from the file at most once, and before any entry is applied to it**.

* The copy reads a chunk of the file (in a thread: the event loop, and so the sink, keep
  running meanwhile), then, in one event-loop step, writes only the granules nobody has
  marked yet and marks them (:meth:`CopyMap.claim`).  A granule an entry reached while the
  chunk was being read is skipped: the copy never writes over a newer entry.
* The sink, before applying an entry (:meth:`BaseCopy.before`), marks every granule the
  entry touches; one it touches only in part and that holds no base yet is first *filled*
  from the file (read and written inline, one step), so the entry lands on the base and the
  granule's other bytes are not left as zeroes.
* A granule wholly inside a hole of the file when the copy scans it is marked without a
  write (the shadow is a new sparse file: zeroes already; holes stay holes), and zero blocks
  of copied data are not written either.

Why no interleaving leaves the shadow stale: blklogwrites writes a request's data to the
file *before* its entry to the log, so whatever the file held when a granule's base was
read, every write that reached the file after that read has an entry still to come, which
the sink applies after the base (the granule was marked in the same step the base was
written).  A base read that already holds a write whose entry comes later (the file write
happened, the log write had not reached the sink) is fine too: the entry rewrites the same
bytes.  So every byte of the shadow is, in the end, its last entry in log order, or, when
no entry touched it, the file's byte at the reopen.  The one thing a copy cannot give at
its end is *when* that holds: an entry still in flight may already be in the base (its
data, not yet its place in the order).  The filter therefore drains once more (a no-op
``blockdev-reopen``) after the copy: every entry of every write the copy could have seen
is applied when it returns, and from then on the shadow is the disk as of its last applied
entry, which is when the traces may start (docs/attach.md, "A base that matches the
stream").

Memory: the map is one byte per granule, at most :data:`MAX_GRANULES` (4 MiB: the granule
grows past 64 KiB for disks over 256 GiB), plus one chunk (:data:`COPY_CHUNK`) in flight.

:class:`CopyMap` is the sans-IO core (offsets in, ranges to write out);
:class:`BaseCopy` drives it from a :class:`BaseSource` (the VM's raw file,
:class:`RawFileSource`) into a shadow device that applies inline.
"""

from __future__ import annotations

import asyncio
import errno
import os
import time
from dataclasses import dataclass
from typing import Protocol

from blocktrace.block.device import BlockDevice, ReadableBuffer
from blocktrace.stream.apply import write_inline

#: smallest granule of the copy map (QEMU's mirror uses the same by default)
GRANULE = 64 * 1024
#: the map never has more granules than this (one byte each)
MAX_GRANULES = 4 << 20
#: bytes read from the file per copy step (rounded up to a granule)
COPY_CHUNK = 4 * 1024 * 1024
#: zero blocks of copied data are not written (the shadow reads zeroes there already)
ZERO_BLOCK = 4096
_ZEROES = bytes(ZERO_BLOCK)


def granule_for(size: int) -> int:
    """64 KiB, doubled until ``size`` needs at most :data:`MAX_GRANULES` granules."""
    g = GRANULE
    while -(-size // g) > MAX_GRANULES:
        g *= 2
    return g


class CopyMap:
    """Which granules of the shadow already hold their base (or an entry over one)."""

    def __init__(self, size: int, granule: int | None = None) -> None:
        self.size = size
        self.granule = granule or granule_for(size)
        #: one byte per granule: 1 once the granule's base is in (or needs none)
        self._done = bytearray(-(-size // self.granule))

    def _span(self, start: int, end: int) -> tuple[int, int]:
        g = self.granule
        return start // g, -(-end // g)

    def _bytes(self, i: int, j: int) -> tuple[int, int]:
        return i * self.granule, min(j * self.granule, self.size)

    def claim(self, start: int, end: int) -> list[tuple[int, int]]:
        """The copy read ``[start, end)`` (granule-aligned start): the byte ranges of it to
        write, granules nobody marked yet, now marked.  Call in the same event-loop step as
        the writes."""
        i, j = self._span(start, end)
        done = self._done
        out: list[tuple[int, int]] = []
        while i < j:
            i = done.find(0, i, j)
            if i < 0:
                break
            k = done.find(1, i, j)
            k = j if k < 0 else k
            done[i:k] = b"\x01" * (k - i)
            s, e = self._bytes(i, k)
            out.append((max(s, start), min(e, end)))
            i = k
        return out

    def touch(self, offset: int, length: int) -> list[tuple[int, int]]:
        """An entry is about to change ``[offset, offset+length)``: mark every granule it
        touches; return those that must be filled from the file first (no base yet, only
        part of them covered by the entry)."""
        if length <= 0:
            return []
        end = min(offset + length, self.size)
        i, j = self._span(offset, end)
        done = self._done
        if done.find(0, i, j) < 0:
            return []
        fills: list[tuple[int, int]] = []
        for n in (i, j - 1) if j - i > 1 else (i,):
            s, e = self._bytes(n, n + 1)
            if not done[n] and (s < offset or e > end):
                fills.append((s, e))
        done[i:j] = b"\x01" * (j - i)
        return fills

    def skip(self, start: int, end: int) -> None:
        """``[start, end)`` was a hole of the file when the copy scanned it: the granules
        wholly inside need no base (the shadow reads zeroes)."""
        i = -(-start // self.granule)
        j = len(self._done) if end >= self.size else end // self.granule
        if i < j:
            self._done[i:j] = b"\x01" * (j - i)

    @property
    def missing(self) -> int:
        """Granules still without a base."""
        return self._done.count(0)


class BaseSource(Protocol):
    """The VM's disk as blocktrace reads it while QEMU writes it."""

    size: int

    def next_data(self, pos: int) -> tuple[int, int] | None:
        """The first data extent ``[start, end)`` at or after ``pos``; None: only a hole."""
        ...

    def read_now(self, offset: int, length: int) -> bytes:
        """Read on the calling thread (a fill: atomic with the entry that needs it)."""
        ...

    async def read(self, offset: int, length: int) -> bytes:
        """Read without holding the event loop (the copy: entries keep being applied)."""
        ...


class RawFileSource:
    """A raw image file opened read-only (never following a symlink)."""

    def __init__(self, path: str, size: int) -> None:
        self.path = path
        self.size = size
        self.fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)

    def next_data(self, pos: int) -> tuple[int, int] | None:
        try:
            start = os.lseek(self.fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # only a hole is left
                return None
            raise
        if start >= self.size:
            return None
        end = os.lseek(self.fd, start, os.SEEK_HOLE)
        return start, min(end, self.size)

    def read_now(self, offset: int, length: int) -> bytes:
        data = os.pread(self.fd, length, offset)
        return data.ljust(length, b"\0")  # a file shorter than the disk reads as zeroes

    async def read(self, offset: int, length: int) -> bytes:
        return await asyncio.to_thread(self.read_now, offset, length)

    def close(self) -> None:
        os.close(self.fd)


@dataclass
class CopyStats:
    """What a base copy did, for the log line and the benchmark."""

    read: int = 0  # bytes read from the file by the copy
    written: int = 0  # bytes written into the shadow by the copy and by fills
    skipped: int = 0  # bytes the copy read but an entry had reached first
    #: entries applied to a chunk while the copy was reading it (the race the map is for:
    #: the chunk's bytes may be older than the entry)
    raced: int = 0
    filled: int = 0  # granules filled for an entry before the copy reached them
    seconds: float = 0.0


class BaseCopy:
    """Copies ``source`` into ``shadow`` (a device that applies inline) by the map's rule.

    The log sink calls :meth:`before` for every operation it applies while the copy runs;
    :meth:`run` is the copy.  Nothing else may write the shadow meanwhile (no trace is
    attached to it yet: the filter starts traces after the copy).
    """

    def __init__(self, source: BaseSource, shadow: BlockDevice, *, chunk: int = COPY_CHUNK):
        if not shadow.applies_inline:
            raise TypeError(f"{type(shadow).__name__} does not apply operations inline")
        self.source = source
        self.shadow = shadow
        self.map = CopyMap(source.size)
        self.chunk = max(chunk - chunk % self.map.granule, self.map.granule)
        self.stats = CopyStats()
        #: set to stop :meth:`run` at its next step (the disk was detached meanwhile)
        self.cancelled = False
        self._reading = (0, 0)  # the chunk being read

    def before(self, offset: int, length: int) -> None:
        """An entry is about to be applied to ``[offset, offset+length)`` (raises OSError
        when the file cannot be read for a fill: the sink then fails)."""
        if offset < self._reading[1] and offset + length > self._reading[0]:
            self.stats.raced += 1
        for start, end in self.map.touch(offset, length):
            self._put(start, self.source.read_now(start, end - start))
            self.stats.filled += 1

    async def run(self) -> None:
        """Copy every data extent of the source; mark every hole.  Returns when each
        granule holds its base (or an entry that came first)."""
        t0 = time.perf_counter()
        g = self.map.granule
        size = self.source.size
        pos = 0
        while pos < size and not self.cancelled:
            ext = self.source.next_data(pos)
            if ext is None:
                self.map.skip(pos, size)
                break
            start, end = ext
            self.map.skip(pos, start)
            off = start - start % g
            stop = min(-(-end // g) * g, size)
            while off < stop and not self.cancelled:
                n = min(self.chunk, stop - off)
                self._reading = (off, off + n)
                try:
                    data = memoryview(await self.source.read(off, n))
                finally:
                    self._reading = (0, 0)
                self.stats.read += n
                kept = 0
                # one step: no await between the claim and the writes
                for s, e in self.map.claim(off, off + n):
                    self._put(s, data[s - off : e - off])
                    kept += e - s
                self.stats.skipped += n - kept
                off += n
            pos = stop
        self.stats.seconds = time.perf_counter() - t0

    def _put(self, offset: int, data: ReadableBuffer) -> None:
        """Write ``data``'s non-zero blocks (the shadow reads zeroes elsewhere already)."""
        mv = memoryview(data)
        n = len(mv)
        s = 0
        while s < n:
            while s < n and mv[s : s + ZERO_BLOCK] == _ZEROES[: min(ZERO_BLOCK, n - s)]:
                s += ZERO_BLOCK
            e = s
            while e < n and mv[e : e + ZERO_BLOCK] != _ZEROES[: min(ZERO_BLOCK, n - e)]:
                e += ZERO_BLOCK
            e = min(e, n)
            if e > s:
                write_inline(self.shadow, offset + s, mv[s:e])
                self.stats.written += e - s
            s = e
