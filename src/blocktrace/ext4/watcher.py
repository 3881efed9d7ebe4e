"""The Python API of disk introspection: a disk image, a write stream, file-level events.

:class:`Watcher` finds the file systems on the base image (:mod:`.partitions`), gives each ext4
one an :class:`~blocktrace.ext4.engine.Ext4Engine`, and routes every record of the stream to
the engines whose partition it touches (offsets made partition-relative).  The stream is a
sequence of :class:`StreamRecord` values; adapters make them from a dm-log-writes log
(:func:`log_records`) or from the trace engine's ``TraceRecord`` objects
(:func:`from_trace_record`), so the same watcher follows a recorded log and a live trace.

Example::

    with Watcher("base.img") as w:
        for event in w.feed(log_records("trace.log")):
            print(event.to_json())
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from blocktrace.errors import FormatError
from blocktrace.ext4.engine import DEFAULT_MAX_PENDING, DEFAULT_MAX_PENDING_BYTES, Ext4Engine
from blocktrace.ext4.events import FileEvent
from blocktrace.ext4.fs import FileSource
from blocktrace.ext4.partitions import Partition, discover, slice_source
from blocktrace.ext4.structs import Ext4FormatError
from blocktrace.logwrites.format import LogFlag

WRITE, ZERO, DISCARD, FLUSH, MARK = "write", "zero", "discard", "flush", "mark"
#: plain ints: ``int & IntFlag`` goes through enum's Python ``__and__`` (per record)
_FUA, _FLUSH, _DISCARD, _MARK = (
    int(f) for f in (LogFlag.FUA, LogFlag.FLUSH, LogFlag.DISCARD, LogFlag.MARK)
)


@dataclass(frozen=True, slots=True)
class StreamRecord:
    """One record of a write stream, whatever produced it."""

    index: int  #: record number reported in events (log entry index, trace sequence number)
    kind: str  #: write | zero | discard | flush | mark
    offset: int = 0
    length: int = 0
    data: bytes | memoryview | None = None
    fua: bool = False


def log_records(path: str | os.PathLike[str], *, verify: bool = True) -> Iterator[StreamRecord]:
    """The records of a dm-log-writes log (kernel, QEMU blklogwrites or blocktrace)."""
    from blocktrace.logwrites.reader import LogReader

    with LogReader(path, verify=verify) as reader:
        for entry in reader.entries(with_data=True):
            yield from _entry_records(entry)


def follow_log_records(
    path: str | os.PathLike[str],
    *,
    verify: bool = True,
    poll: float = 0.2,
    stop: Callable[[], bool] | None = None,
) -> Iterator[StreamRecord]:
    """Like :func:`log_records`, for a log still being written (``tail -f``): yields entries as
    the log's super block counts them (a writer counts entries when it syncs, i.e. at the
    guest's flushes), until the ``dm-log-writes-end`` mark or until ``stop()`` is true.

    Each refresh re-reads the super block and walks the entry headers from the start (the
    reader's public API), so a refresh costs O(entries); it happens only when the count grew.
    A log without a super block yet (QEMU writes it at the first flush) is waited for.
    """
    from blocktrace.logwrites.format import BadSuperBlock
    from blocktrace.logwrites.reader import LogReader
    from blocktrace.logwrites.writer import END_MARK

    done = 0
    while True:
        reader: LogReader | None = None
        if os.path.exists(path):
            with contextlib.suppress(BadSuperBlock):  # no super block yet: wait
                reader = LogReader(path, verify=verify)
        if reader is not None:
            with reader:
                if reader.nr_entries > done:
                    for entry in reader.entries(done, with_data=True):
                        yield from _entry_records(entry)
                        done = entry.index + 1
                        if entry.mark == END_MARK:
                            return
        if stop is not None and stop():
            return
        time.sleep(poll)


def _entry_records(e: Any) -> Iterator[StreamRecord]:
    header = e.header
    flags = header.flags
    if flags & _MARK:
        yield StreamRecord(e.index, MARK)
        return
    if header.nr_sectors:
        if flags & _DISCARD:
            kind = ZERO if e.is_zeroes else DISCARD
            yield StreamRecord(e.index, kind, e.target_offset, e.length)
        else:
            yield StreamRecord(
                e.index, WRITE, e.target_offset, e.length, e.read_data(), bool(flags & _FUA)
            )
    if flags & _FLUSH:
        yield StreamRecord(e.index, FLUSH)


def from_trace_record(rec: Any) -> StreamRecord:
    """Adapt a :class:`blocktrace.trace.records.TraceRecord` (duck-typed to avoid the import)."""
    kind = {"write": WRITE, "zero": ZERO, "trim": DISCARD, "flush": FLUSH}.get(rec.kind.value, MARK)
    return StreamRecord(rec.seq, kind, rec.offset, rec.length, rec.data, rec.fua)


class Watcher:
    """Every ext4 file system of one disk, following one write stream."""

    def __init__(
        self,
        base: str | os.PathLike[str],
        *,
        max_pending: int = DEFAULT_MAX_PENDING,
        max_pending_bytes: int = DEFAULT_MAX_PENDING_BYTES,
    ) -> None:
        self.source = FileSource(base)
        self.errors: list[FileEvent] = []
        self.engines: list[tuple[Partition, Ext4Engine]] = []
        try:
            self.partitions = discover(self.source, self.source.length)
        except FormatError as exc:
            self.source.close()
            raise Ext4FormatError(f"{os.fspath(base)}: partition table: {exc}") from None
        for part in self.partitions:
            if not part.ext4:
                continue
            try:
                engine = Ext4Engine(
                    slice_source(self.source, part.offset, part.length),
                    name=part.name,
                    max_pending=max_pending,
                    max_pending_bytes=max_pending_bytes,
                )
            except FormatError as exc:
                self.errors.append(
                    FileEvent("error", "", fs=part.name, message=f"file system not followed: {exc}")
                )
                continue
            self.engines.append((part, engine))
        if not self.engines:
            self.source.close()
            why = "; ".join(e.message or "" for e in self.errors) or "none found"
            raise Ext4FormatError(f"{os.fspath(base)}: no ext4 file system to watch ({why})")
        self.last_record = -1

    def close(self) -> None:
        self.source.close()

    def __enter__(self) -> Watcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _pieces(self, offset: int, length: int) -> Iterator[tuple[int, int, Ext4Engine]]:
        for part, engine in self.engines:
            lo, hi = max(offset, part.offset), min(offset + length, part.offset + part.length)
            if lo < hi:
                yield lo, hi, engine

    def process(self, rec: StreamRecord) -> list[FileEvent]:
        """Feed one record; returns the events it revealed."""
        out = self.errors
        self.errors = []
        self.last_record = rec.index
        if rec.kind == WRITE and rec.data is not None:
            mv = memoryview(rec.data)
            for lo, hi, engine in self._pieces(rec.offset, len(mv)):
                start = lo - rec.offset
                part_off = lo - self._offset_of(engine)
                out += engine.write(rec.index, part_off, mv[start : start + hi - lo])
        elif rec.kind == ZERO:
            for lo, hi, engine in self._pieces(rec.offset, rec.length):
                out += engine.zero(rec.index, lo - self._offset_of(engine), hi - lo)
        elif rec.kind == DISCARD:
            for lo, hi, engine in self._pieces(rec.offset, rec.length):
                out += engine.discard(rec.index, lo - self._offset_of(engine), hi - lo)
        elif rec.kind == FLUSH:
            for _, engine in self.engines:
                out += engine.flush(rec.index)
        return out

    def _offset_of(self, engine: Ext4Engine) -> int:
        for part, e in self.engines:
            if e is engine:
                return part.offset
        raise AssertionError("engine not attached")

    def finish(self) -> list[FileEvent]:
        """End of stream: settle every engine (events of writes never followed by a flush)."""
        out = self.errors
        self.errors = []
        for _, engine in self.engines:
            out += engine.finish(self.last_record)
        return out

    def feed(self, records: Iterable[StreamRecord], *, finish: bool = True) -> Iterator[FileEvent]:
        for rec in records:
            yield from self.process(rec)
        if finish:
            yield from self.finish()

    def stats(self) -> dict[str, Any]:
        return {part.name or "disk": engine.stats for part, engine in self.engines}
