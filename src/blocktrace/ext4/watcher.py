"""The Python API of disk introspection: a disk image, a write stream, file-level events.

:class:`Watcher` finds the file systems on the base image (:mod:`.partitions`), gives each ext4
one an :class:`~blocktrace.ext4.engine.Ext4Engine`, and routes every record of the stream to
the engines whose partition it touches (offsets made partition-relative).  The stream is a
sequence of the stream's one record type, :class:`~blocktrace.stream.records.Record`, from a
dm-log-writes log (:func:`blocktrace.logwrites.records.log_records`) or from a live trace
(the ``introspect`` target), so the same watcher follows a recorded log and a live trace.

Example::

    from blocktrace.logwrites.records import log_records

    with Watcher("base.img") as w:
        for event in w.feed(log_records("trace.log")):
            print(event.to_json())
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from typing import Any, Protocol

from blocktrace.block.source import FileSource
from blocktrace.errors import FormatError
from blocktrace.ext4.engine import DEFAULT_MAX_PENDING, DEFAULT_MAX_PENDING_BYTES, Ext4Engine
from blocktrace.ext4.events import FileEvent
from blocktrace.ext4.partitions import Partition, discover, slice_source
from blocktrace.ext4.structs import Ext4FormatError
from blocktrace.stream.records import Record, RecordKind

WRITE, ZERO, TRIM, FLUSH = RecordKind.WRITE, RecordKind.ZERO, RecordKind.TRIM, RecordKind.FLUSH


class ImageSource(Protocol):
    """A base image already opened: :class:`~blocktrace.block.source.FileSource`, or a live
    image as of the records processed (:class:`~blocktrace.stream.prior.PriorContents`)."""

    name: str
    length: int

    def pread(self, offset: int, length: int) -> bytes: ...

    def close(self) -> None: ...


class Watcher:
    """Every ext4 file system of one disk, following one write stream."""

    def __init__(
        self,
        base: str | os.PathLike[str] | ImageSource,
        *,
        max_pending: int = DEFAULT_MAX_PENDING,
        max_pending_bytes: int = DEFAULT_MAX_PENDING_BYTES,
    ) -> None:
        """``base``: the image's path, or an opened source (closed with the watcher)."""
        self.source: ImageSource = (
            FileSource(base) if isinstance(base, (str, os.PathLike)) else base
        )
        name = self.source.name
        self.errors: list[FileEvent] = []
        self.engines: list[tuple[Partition, Ext4Engine]] = []
        try:
            self.partitions = discover(self.source, self.source.length)
        except FormatError as exc:
            self.source.close()
            raise Ext4FormatError(f"{name}: partition table: {exc}") from None
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
            raise Ext4FormatError(f"{name}: no ext4 file system to watch ({why})")
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

    def process(self, rec: Record) -> list[FileEvent]:
        """Feed one record; returns the events it revealed (reported under ``rec.seq``)."""
        out = self.errors
        self.errors = []
        index = self.last_record = rec.seq
        kind = rec.kind
        if kind is WRITE and rec.data is not None:
            mv = memoryview(rec.data)
            for lo, hi, engine in self._pieces(rec.offset, len(mv)):
                start = lo - rec.offset
                part_off = lo - self._offset_of(engine)
                out += engine.write(index, part_off, mv[start : start + hi - lo])
        elif kind is ZERO:
            for lo, hi, engine in self._pieces(rec.offset, rec.length):
                out += engine.zero(index, lo - self._offset_of(engine), hi - lo)
        elif kind is TRIM:
            for lo, hi, engine in self._pieces(rec.offset, rec.length):
                out += engine.discard(index, lo - self._offset_of(engine), hi - lo)
        elif kind is FLUSH:
            for _, engine in self.engines:
                out += engine.flush(index)
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

    def feed(self, records: Iterable[Record], *, finish: bool = True) -> Iterator[FileEvent]:
        for rec in records:
            yield from self.process(rec)
        if finish:
            yield from self.finish()

    def stats(self) -> dict[str, Any]:
        return {part.name or "disk": engine.stats for part, engine in self.engines}
