"""dm-log-writes log target: a trace's stream as a log replay-log, QEMU and blocktrace read.

A thin adapter over the log engineer's :class:`~blocktrace.logwrites.writer.LogWriter`: each
record becomes one entry (WRITE -> data entry, ZERO -> the writer's zeroes representation,
TRIM -> DISCARD, FLUSH -> FLUSH, MARK -> MARK, FUA flagged), in stream order.
``make_durable`` is the writer's ``sync`` (entries fdatasync'ed, then the super block's
``nr_entries`` rewritten and fdatasync'ed), so after a crash the super counts every record a
client saw acknowledged as durable.

Where the work runs (measured, docs/trace.md PERFORMANCE): no log I/O on the event loop.
A batch of small records is *packed* on the loop (runs of WRITE records go to
``LogWriter.append_writes``: header and payload copied into one reusable page-aligned
buffer, CRC by libdeflate; about 2-3 us per 4 KiB entry, less than a thread hand-off);
the packed bytes are written out in a thread once :data:`WRITE_OUT_BYTES` are pending.  A
batch carrying more than :data:`THREAD_THRESHOLD` payload bytes is appended in a thread
entirely (its CRCs and copies release the GIL).  Syncs run in a thread.  The log is O_DIRECT
by default (``direct=on``): the page-aligned packing buffer is written without a copy, and
the page cache and its write-back stay out of the way.

Still correct: the delivery worker calls one method at a time, so records reach the writer
in stream order; ``deliver`` returns once the writer holds them (packed or written), as
before; ``make_durable`` writes out whatever is packed before its fdatasync + super update.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Mapping, Sequence
from typing import Any

from blocktrace.errors import TargetError, UsageError
from blocktrace.logwrites.format import LogFlag, validate_mark
from blocktrace.logwrites.writer import DIRECT_THRESHOLD, LogWriter, ZeroesMode
from blocktrace.outfile import output_mode
from blocktrace.stream import Record, RecordKind, Target, TargetInfo
from blocktrace.stream.contract import served_images
from blocktrace.stream.schema import Choice, Flag, Integer, Option, TargetType, Text

_FUA = int(LogFlag.FUA)

#: batches with more payload than this are appended (CRC included) in a thread
THREAD_THRESHOLD = 256 * 1024
#: pending log bytes at which the packed entries are written out, in a thread
WRITE_OUT_BYTES = 4 * 1024 * 1024

_WRITER_BATCH_BYTES = 64 * 1024 * 1024
#: marks whose entry index is kept until ``trace mark`` asks for it
_MARKS_REMEMBERED = 1024


class LogTarget(Target):
    """Write the stream to a new dm-log-writes log at ``filename``.

    The file is opened by :func:`blocktrace.outfile.open_output`: an existing file is
    replaced only with ``force`` (``force=on``), a symlink is never followed, a served image
    (compared by device and inode) or another trace's live log (locked) is refused, and a new
    log is created no more readable than the image (0600 at most)."""

    def __init__(
        self,
        filename: str,
        *,
        sector_size: int | None = None,
        zeroes: ZeroesMode = "discard",
        direct: bool = True,
        force: bool = False,
    ) -> None:
        self.filename = os.path.abspath(filename)
        self.force = force
        self.name = f"log:{filename}"
        self._sector_size = sector_size
        self._zeroes: ZeroesMode = zeroes
        # O_DIRECT by default: write-outs run in a thread, so the disk's latency stalls no
        # client, and the log skips the page cache (no copy there, no write-back burst
        # competing for the CPU): measured 1.3-1.6x faster for 1 MiB writes, same for 4 KiB.
        self._direct = direct
        self._writer: LogWriter | None = None
        self._mark_entries: dict[int, int] = {}  # mark record's seq -> its log entry index

    @property
    def alignment(self) -> int:
        return self._sector_size or 512

    @property
    def writer(self) -> LogWriter:
        if self._writer is None:
            raise TargetError(self.name, "log is not open")
        return self._writer

    async def open(self, info: TargetInfo) -> None:
        if self._sector_size is None:
            self._sector_size = max(512, info.block_size)
        if os.path.isdir(self.filename):
            raise UsageError(f"{self.filename}: is a directory")
        if not os.path.isdir(os.path.dirname(self.filename)):
            raise UsageError(f"{self.filename}: no such directory")
        self._writer = await asyncio.to_thread(
            LogWriter.create,
            self.filename,
            sector_size=self._sector_size,
            zeroes=self._zeroes,
            direct=self._direct,
            overwrite=self.force,
            protected=served_images(info),
            mode=output_mode(info.filename),
            # write-outs are ours (in a thread), not triggered by small appends on the loop
            batch_bytes=_WRITER_BATCH_BYTES,
        )

    async def deliver(self, records: Sequence[Record]) -> None:
        w = self.writer
        nbytes = 0
        for rec in records:
            if rec.data is not None:
                nbytes += len(rec.data)
        if nbytes > THREAD_THRESHOLD:
            # large payloads: CRC and write-out in a thread (both release the GIL)
            await asyncio.to_thread(self._append_and_write, records)
        else:
            self._append(records)  # packing only: no I/O on the event loop
            if w.pending_bytes >= WRITE_OUT_BYTES:
                await asyncio.to_thread(w.write_out)

    def _append_and_write(self, records: Sequence[Record]) -> None:
        self._append(records, in_thread=True)
        self.writer.write_out()

    def _append(self, records: Sequence[Record], *, in_thread: bool = False) -> None:
        """Hand ``records`` to the writer.  ``in_thread``: I/O is allowed here, so write out
        whenever the writer's packing buffer would overflow (it then stays the one aligned
        buffer O_DIRECT writes without a copy)."""
        w = self.writer
        run: list[tuple[int, int, bytes]] = []
        S = self.alignment
        room = w.pack_room if in_thread else -1
        packed = 0
        try:
            for rec in records:
                kind = rec.kind
                if kind is RecordKind.WRITE:
                    # the hot path: runs of writes go to the writer in one call (it checks
                    # alignment: records are aligned by the filter, checked, never assumed)
                    data = rec.data
                    assert data is not None
                    if room >= 0 and len(data) < DIRECT_THRESHOLD:
                        packed += S + len(data)
                        if packed > room:
                            if run:
                                w.append_writes(run)
                                run = []
                            w.write_out()
                            room = w.pack_room
                            packed = S + len(data)
                    run.append((_FUA if rec.fua else 0, rec.offset, data))
                    continue
                if run:
                    w.append_writes(run)
                    run = []
                if kind is RecordKind.FLUSH:
                    w.flush()
                elif kind is RecordKind.ZERO:
                    w.write_zeroes(rec.offset, rec.length, fua=rec.fua)
                elif kind is RecordKind.TRIM:
                    w.discard(rec.offset, rec.length, fua=rec.fua)
                elif kind is RecordKind.MARK:
                    self._remember_mark(rec.seq, w.mark(rec.name))
            if run:
                w.append_writes(run)
        except ValueError as exc:  # a record the log cannot express: a bug, but not silent
            raise TargetError(self.name, str(exc)) from exc

    def _remember_mark(self, seq: int, index: int) -> None:
        # bounded: a mark's index is asked for once, right after it is held; marks put while
        # the trace is paused are never asked for, so the oldest are forgotten past the cap
        self._mark_entries[seq] = index
        if len(self._mark_entries) > _MARKS_REMEMBERED:
            del self._mark_entries[next(iter(self._mark_entries))]

    def mark_entry(self, seq: int) -> int | None:
        return self._mark_entries.pop(seq, None)

    async def make_durable(self) -> None:
        await asyncio.to_thread(self.writer.sync)

    async def close(self, *, clean: bool) -> None:
        w = self._writer
        if w is None:
            return
        await asyncio.to_thread(w.close, end_mark=clean, sync=True)

    def check_mark(self, name: str) -> None:
        try:
            validate_mark(name, self.alignment, checksums=True)
        except ValueError as exc:
            raise UsageError(str(exc)) from None

    def settings(self) -> dict[str, Any]:
        return {
            **super().settings(),
            "type": "log",
            "filename": self.filename,
            "sector-size": self.alignment,
            "zeroes": self._zeroes,
            "direct": self._direct,
        }


def _create(values: Mapping[str, Any]) -> LogTarget:
    return LogTarget(
        values["filename"],
        sector_size=values["sector-size"],
        zeroes=values["zeroes"],
        direct=values["direct"],
        force=bool(values["force"]),
    )


TARGET_TYPE = TargetType(
    name="log",
    doc="a dm-log-writes log (replay-log, QEMU, blocktrace read it)",
    order=10,
    options=(
        Option(
            "filename",
            Text("PATH"),
            "the dm-log-writes log file (created; an existing one only with force=on)",
            main=True,
        ),
        Option(
            "sector-size",
            Integer(512, 65536, kind="uint32", size=True, power_of_two=True),
            "log sector size; default: the export's block size (at least 512)",
        ),
        Option(
            "zeroes",
            Choice(("discard", "data")),
            "how WRITE_ZEROES is logged: a DISCARD entry or zero data",
            default="discard",
        ),
        Option(
            "direct",
            Flag(),
            "write the log with O_DIRECT (off: through the page cache)",
            default=True,
        ),
        Option(
            "force",
            Flag(),
            "overwrite an existing file (not a symlink; default off)",
        ),
    ),
    factory=_create,
)
