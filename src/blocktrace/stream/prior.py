"""PriorContents: a live image as it was at the last record a consumer has processed.

A trace changes the image *before* it queues the record (docs/trace.md: the order records are
appended is the order the image was changed), so a consumer that reads the image itself while
it works through the queue reads the future: by the time it processes record *s*, records
*s+1...* may already be in the file.  The ext4 engine of the live ``introspect`` target is such
a consumer: it reads a metadata block's previous contents from the image when the stream writes
it, and the crawl reads the base while clients write.  When the new bytes are already there,
old and new compare equal and the change is silently lost (issue: a debugfs workload, whose
metadata is written in place rather than through the journal, gave no events at all).

This layer makes such reads exact.  Before the trace filter applies an operation, it calls
:meth:`PriorContents.capture`, which saves the image's current bytes of every 4 KiB granule the
operation touches that has no saved copy yet (read inline, with no suspension between the save
and the change: the same argument as the filter's ordering rule).  The consumer calls
:meth:`advance` after each record it processed; that brings the saved copies up to the record
and drops those no queued record touches any more.  :meth:`pread` is the image with the saved
copies over it: exactly the disk as of the last processed record.

Memory is bounded: a saved copy lives only while a record touching it is queued, so the copies
follow the trace's own queue bound, and in total they never exceed ``max_bytes``.  Beyond that
(a huge WRITE_ZEROES or TRIM, or a consumer far behind) the operation's granules are *lost*:
reading them gives the image's current bytes, and :meth:`take_stale` tells the consumer which
reads those were, so it can say so (the introspect target turns them into ``error`` events:
never a silent divergence).
"""

from __future__ import annotations

import heapq
import os
import threading
from dataclasses import dataclass, field

from blocktrace.block.source import FileSource
from blocktrace.stream.records import Record, RecordKind

#: unit of the saved copies (every ext4 block size up to 4 KiB fits; larger ones span several)
GRANULE = 4096
#: default bound of the saved copies' bytes
DEFAULT_MAX_PRIOR_BYTES = 64 << 20
#: an operation lost over more granules than this is remembered as one range, not per granule
#: (a TRIM of the whole disk must not cost an entry per 4 KiB)
WIDE = 4096

_CHANGES = (RecordKind.WRITE, RecordKind.ZERO, RecordKind.TRIM)


@dataclass(slots=True)
class _Saved:
    """One granule as of the consumer's position; ``data`` None: lost (over the bound)."""

    data: bytearray | None
    last: int = 0  #: sequence number of the last record that changes the granule
    inflight: int = 1  #: captured operations not yet recorded


@dataclass(slots=True)
class _Wide:
    """Granules ``[start, end)`` of one wide operation made while over the bound: lost."""

    start: int
    end: int
    last: int = 0
    inflight: int = 1


@dataclass(slots=True)
class Capture:
    """What :meth:`PriorContents.capture` marked in flight, for :meth:`~PriorContents.recorded`."""

    granules: list[tuple[int, _Saved]] = field(default_factory=list)
    wide: _Wide | None = None


class PriorContents:
    """The image ``path`` as of the last record :meth:`advance` was given (a ``ByteSource``).

    Thread-safe: the trace filter captures on the event loop while the consumer reads and
    advances in a worker thread; each call holds the lock for a few dictionary operations
    (the file itself is read outside it)."""

    def __init__(self, path: str | os.PathLike[str], *, max_bytes: int = DEFAULT_MAX_PRIOR_BYTES):
        self.file = FileSource(path)
        self._fd = self.file.fd
        self.name = self.file.name
        self.length = self.file.length
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._saved: dict[int, _Saved] = {}
        self._wide: list[_Wide] = []
        self._due: list[tuple[int, int]] = []  #: (last, granule), a heap
        self._stale: list[tuple[int, int]] = []
        self._processed = 0
        self.bytes = 0  #: saved bytes now
        self.peak_bytes = 0
        self.lost_granules = 0  #: granules changed while over the bound (count over the run)

    def close(self) -> None:
        self.file.close()

    # -- the producer side (the trace filter, on the event loop) -----------------------------

    def capture(self, offset: int, length: int) -> Capture:
        """Save the bytes ``[offset, offset+length)`` will lose, before they are changed.

        Must be followed by :meth:`recorded` once the operation's records are queued (or it
        failed): until then its granules are kept whatever the consumer processes.  The old
        bytes are read before the lock is taken: only this thread changes the file, so they
        are still the image's bytes when the copies are made."""
        cap = Capture()
        if length <= 0:
            return cap
        g0, g1 = offset // GRANULE, -(-(offset + length) // GRANULE)
        n = g1 - g0
        old: bytes | None = None
        if n * GRANULE <= self.max_bytes - self.bytes:  # (read unlocked: only we add)
            old = os.pread(self._fd, n * GRANULE, g0 * GRANULE)
            if len(old) < n * GRANULE:  # past the end of the file: zeroes
                old += bytes(n * GRANULE - len(old))
        with self._lock:
            saved = self._saved
            processed = self._processed
            wide = self._wide
            if wide and any(
                w.start < g1 and g0 < w.end and (w.inflight or w.last > processed) for w in wide
            ):
                old = None  # the image there is already ahead of the consumer
            if old is None and n > WIDE:
                cap.wide = _Wide(g0, g1)
                wide.append(cap.wide)
                cap.granules = [(g, x) for g, x in saved.items() if g0 <= g < g1]
                for _, held in cap.granules:
                    held.inflight += 1
                self.lost_granules += n
                return cap
            granules = cap.granules
            if n == 1 and g0 not in saved and old is not None:  # the common case
                new = saved[g0] = _Saved(bytearray(old))
                self.bytes += GRANULE
                granules.append((g0, new))
                self.peak_bytes = max(self.peak_bytes, self.bytes)
                return cap
            for i in range(n):
                g = g0 + i
                s = saved.get(g)
                if s is not None:
                    s.inflight += 1
                elif old is not None:
                    s = saved[g] = _Saved(bytearray(old[i * GRANULE : (i + 1) * GRANULE]))
                    self.bytes += GRANULE
                else:
                    s = saved[g] = _Saved(None)
                    self.lost_granules += 1
                granules.append((g, s))
            self.peak_bytes = max(self.peak_bytes, self.bytes)
        return cap

    def recorded(self, cap: Capture, last_seq: int) -> None:
        """The captured operation's records are queued, the last numbered ``last_seq`` (or
        it failed and ``last_seq`` is the stream's position then)."""
        with self._lock:
            due = self._due
            for g, s in cap.granules:
                s.inflight -= 1
                if last_seq > s.last:
                    s.last = last_seq
                if not s.inflight:
                    heapq.heappush(due, (s.last, g))
            if cap.wide is not None:
                cap.wide.inflight -= 1
                cap.wide.last = max(cap.wide.last, last_seq)
            self._drop(self._processed)

    # -- the consumer side (a worker thread) -------------------------------------------------

    def advance(self, rec: Record) -> None:
        """The consumer has processed ``rec``: the view moves past it."""
        with self._lock:
            self._processed = rec.seq
            if rec.kind in _CHANGES and rec.length > 0 and self._saved:
                self._apply(rec)
            self._drop(rec.seq)

    def _apply(self, rec: Record) -> None:
        start, end = rec.offset, rec.offset + rec.length
        g0, g1 = start // GRANULE, -(-end // GRANULE)
        saved = self._saved
        if g1 - g0 <= len(saved):
            items = [(g, saved[g]) for g in range(g0, g1) if g in saved]
        else:
            items = [(g, s) for g, s in saved.items() if g0 <= g < g1]
        data = memoryview(rec.data) if rec.kind is RecordKind.WRITE and rec.data else None
        seq = rec.seq
        for g, s in items:
            if s.data is None:
                continue  # lost: stays so until no queued record touches it
            if not s.inflight and s.last <= seq:
                continue  # no later record touches it: dropped right after this
            base = g * GRANULE
            lo, hi = max(start, base), min(end, base + GRANULE)
            if data is not None:
                s.data[lo - base : hi - base] = data[lo - start : hi - start]
            else:  # zeroed, or trimmed (a file image's punched hole reads as zeroes)
                s.data[lo - base : hi - base] = bytes(hi - lo)

    def _drop(self, processed: int) -> None:
        """Forget what no queued record changes any more (the image holds it now)."""
        due, saved = self._due, self._saved
        while due and due[0][0] <= processed:
            _, g = heapq.heappop(due)
            s = saved.get(g)
            if s is not None and not s.inflight and s.last <= processed:
                del saved[g]
                if s.data is not None:
                    self.bytes -= GRANULE
        if self._wide:
            self._wide = [w for w in self._wide if w.inflight or w.last > processed]

    def pread(self, offset: int, length: int) -> bytes:
        """``length`` bytes at ``offset`` as of the last processed record (past the end:
        zeroes).  Granules lost to the bound read as the image is now, and are noted."""
        data = self.file.pread(offset, length)  # first the file, then the copies (see capture)
        if length <= 0:
            return data
        with self._lock:
            saved, wide = self._saved, self._wide
            if not saved and not wide:
                return data
            end = offset + length
            out: bytearray | None = None
            for g in range(offset // GRANULE, -(-end // GRANULE)):
                s = saved.get(g)
                if s is None:
                    if wide and any(w.start <= g < w.end for w in wide):
                        self._stale.append((g * GRANULE, GRANULE))
                    continue
                if s.data is None:
                    self._stale.append((g * GRANULE, GRANULE))
                    continue
                if out is None:
                    out = bytearray(data)
                lo, hi = max(offset, g * GRANULE), min(end, (g + 1) * GRANULE)
                out[lo - offset : hi - offset] = s.data[lo - g * GRANULE : hi - g * GRANULE]
        return data if out is None else bytes(out)

    def take_stale(self) -> list[tuple[int, int]]:
        """Byte ranges read since the last call whose prior contents were lost (merged)."""
        with self._lock:
            stale, self._stale = self._stale, []
        merged: list[tuple[int, int]] = []
        for off, n in sorted(set(stale)):
            if merged and merged[-1][0] + merged[-1][1] >= off:
                o, m = merged[-1]
                merged[-1] = (o, max(m, off + n - o))
            else:
                merged.append((off, n))
        return merged
