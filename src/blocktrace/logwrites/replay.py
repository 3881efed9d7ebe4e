"""Replay a dm-log-writes log onto an image file, a block device or a BlockDevice.

Design: entry *selection* is separated from *applying*.  :func:`select_entries` reproduces
xfstests' ``replay-log`` walk exactly (``--start-entry``/``--start-mark`` positioning, then
``--limit``/``--next-flush``/``--next-fua``/``--end-mark`` stop tests, each inclusive of the
entry that triggers it, including replay-log's quirk that ``--end-mark`` disables the FLUSH/FUA
stops); applying is the stream's one applier (:mod:`blocktrace.stream.apply`) on the log's
records (:mod:`blocktrace.logwrites.records`): synchronously on a file or block device
(:func:`replay`, a :class:`~blocktrace.block.file.FileDevice`), awaited on any
:class:`BlockDevice` (:func:`replay_to_device`).

Deliberate difference from replay-log: a DISCARD always makes its range read as zeroes (the
applier's ``write_zeroes``: hole punch or zero range, on files and block devices alike),
whatever its size, because blocktrace logs WRITE_ZEROES as discards and every blocktrace backend
reads trimmed ranges back as zeroes.  replay-log zero-fills on regular files too but skips
discards over 128 MiB (blocktrace's writer never emits those) and uses BLKDISCARD on devices.
Also, an empty log replays nothing successfully, where replay-log fails "Invalid entry number".
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from blocktrace.block.device import BlockDevice
from blocktrace.block.file import FileDevice
from blocktrace.errors import UsageError
from blocktrace.logwrites.format import LogFlag, LogFormatError
from blocktrace.logwrites.reader import LogEntry, LogReader
from blocktrace.logwrites.records import entry_records
from blocktrace.stream.apply import apply_inline, apply_record

#: replay-log truncates ``--start-mark``/``--end-mark`` to ``4097 - sizeof(entry)`` characters.
MARK_ARG_MAX = 4097 - 40


@dataclass(frozen=True, slots=True)
class ReplayOptions:
    """replay-log's selection options (``limit=0``: no limit, as in replay-log)."""

    limit: int = 0
    start_entry: int = 0
    start_mark: str | None = None
    end_mark: str | None = None
    next_flush: bool = False
    next_fua: bool = False
    no_discard: bool = False
    #: Stop quietly at the first corrupt entry instead of failing (and include uncounted
    #: entries whose checksum proves them whole).
    salvage: bool = False

    @property
    def stop_flags(self) -> int:
        flags = 0
        if self.next_flush:
            flags |= LogFlag.FLUSH
        if self.next_fua:
            flags |= LogFlag.FUA
        if self.end_mark is not None:
            flags |= LogFlag.MARK
        return flags


@dataclass(slots=True)
class ReplayResult:
    """What a replay (or a ``--find``) did."""

    entries: int = 0  # entries walked from the start point (what --limit counts)
    applied: int = 0  # entries that changed the image
    bytes_written: int = 0
    bytes_zeroed: int = 0
    last: LogEntry | None = None  # the last entry walked
    stopped_by: str = "end"  # "limit", "flush", "fua", "mark" or "end" (of the log)
    salvage_error: LogFormatError | None = None


def _mark_arg(mark: str | None) -> str | None:
    return None if mark is None else mark[:MARK_ARG_MAX]


def should_stop(entry: LogEntry, stop_flags: int, mark: str | None) -> bool:
    """replay-log's ``should_stop``: with MARK in ``stop_flags`` only a matching mark stops."""
    flags = entry.flags
    if not flags & stop_flags:
        return False
    if not stop_flags & LogFlag.MARK:
        return True
    return bool(flags & LogFlag.MARK) and mark is not None and entry.mark == mark


def _start(reader: LogReader, opts: ReplayOptions, *, with_data: bool) -> Iterator[LogEntry]:
    """Position like replay-log: after ``--start-mark``, else at ``--start-entry``."""
    it = reader.entries(with_data=with_data, salvage=opts.salvage)
    start_mark = _mark_arg(opts.start_mark)
    if start_mark is not None:
        for entry in reader.entries(salvage=opts.salvage):
            if should_stop(entry, LogFlag.MARK, start_mark):
                return reader.entries(entry.index + 1, with_data=with_data, salvage=opts.salvage)
        if reader.salvage_error is not None:
            raise reader.salvage_error
        raise UsageError(f"{reader.path}: couldn't find starting mark {opts.start_mark!r}")
    if opts.start_entry and opts.start_entry >= reader.nr_entries:
        raise UsageError(
            f"{reader.path}: invalid entry number {opts.start_entry} "
            f"(the log has {reader.nr_entries} entries)"
        )
    if opts.start_entry:
        it = reader.entries(opts.start_entry, with_data=with_data, salvage=opts.salvage)
    return it


def select_entries(
    reader: LogReader, opts: ReplayOptions, result: ReplayResult, *, with_data: bool = True
) -> Iterator[LogEntry]:
    """Yield the entries replay-log would walk, in order, the stopping entry included."""
    stop_flags = opts.stop_flags
    end_mark = _mark_arg(opts.end_mark)
    for entry in _start(reader, opts, with_data=with_data):
        result.entries += 1
        result.last = entry
        yield entry
        if opts.limit and result.entries == opts.limit:
            result.stopped_by = "limit"
            return
        if should_stop(entry, stop_flags, end_mark):
            result.stopped_by = (
                "mark"
                if entry.flags & LogFlag.MARK and end_mark is not None
                else "flush"
                if entry.flags & stop_flags & LogFlag.FLUSH
                else "fua"
            )
            return
    result.salvage_error = reader.salvage_error


def find(reader: LogReader, opts: ReplayOptions) -> LogEntry | None:
    """``replay-log --find``: the entry where a replay with ``opts`` would stop, or None if
    it would run to the end of the log without a stop condition triggering."""
    result = ReplayResult()
    for _entry in select_entries(reader, opts, result, with_data=False):
        pass
    return result.last if result.stopped_by != "end" else None


def open_target(path: str | os.PathLike[str]) -> FileDevice:
    """The replay target, an existing file or block device, as the stream's block device."""
    try:
        return FileDevice(path)
    except UsageError as exc:
        raise UsageError(f"cannot open replay target {os.fspath(path)}: {exc}") from None


def _close_target(device: FileDevice) -> None:
    """Make the replayed image durable (``fsync``), then close it."""
    try:
        os.fsync(device.fd)
    finally:
        os.close(device.fd)


Progress = Callable[[LogEntry], None]


def replay(
    log: str | os.PathLike[str] | LogReader,
    image: str | os.PathLike[str],
    options: ReplayOptions | None = None,
    *,
    progress: Progress | None = None,
) -> ReplayResult:
    """Replay ``log`` onto the file or block device ``image`` (which must exist)."""
    opts = options or ReplayOptions()
    reader = log if isinstance(log, LogReader) else LogReader(log)
    device = open_target(image)
    result = ReplayResult()
    try:
        for entry in select_entries(reader, opts, result):
            _apply_sync(device, entry, opts, result)
            if progress is not None:
                progress(entry)
    finally:
        _close_target(device)
        if not isinstance(log, LogReader):
            reader.close()
    return result


def _apply_sync(
    device: FileDevice, entry: LogEntry, opts: ReplayOptions, result: ReplayResult
) -> None:
    """One entry through the stream's applier, synchronously (a file applies inline)."""
    if not entry.is_data or (entry.is_discard and opts.no_discard):
        return
    for rec in entry_records(entry):
        apply_inline(device, rec)
    if entry.is_discard:
        result.bytes_zeroed += entry.length
    else:
        result.bytes_written += entry.length
    result.applied += 1


async def replay_to_device(
    log: str | os.PathLike[str] | LogReader,
    device: BlockDevice,
    options: ReplayOptions | None = None,
) -> ReplayResult:
    """Replay onto any :class:`BlockDevice` (discards become ``write_zeroes(may_trim=True)``),
    then flush it."""
    opts = options or ReplayOptions()
    reader = log if isinstance(log, LogReader) else LogReader(log)
    result = ReplayResult()
    try:
        for entry in select_entries(reader, opts, result):
            if not entry.is_data or (entry.is_discard and opts.no_discard):
                continue
            for rec in entry_records(entry):
                if rec.kind.is_data:
                    await apply_record(device, rec, fua=False)
            if entry.is_discard:
                result.bytes_zeroed += entry.length
            else:
                result.bytes_written += entry.length
            result.applied += 1
        await device.flush()
    finally:
        if not isinstance(log, LogReader):
            reader.close()
    return result


def entries_for_records(reader: LogReader, n: int) -> int:
    """How many entries (from the start) hold the first ``n`` data records; ``limit`` value."""
    if n <= 0:
        return 0
    seen = 0
    for entry in reader.entries():
        if entry.ends_record:
            seen += 1
            if seen == n:
                return entry.index + 1
    raise UsageError(f"{reader.path}: the log holds only {seen} data records, not {n}")


def replay_records(
    log: str | os.PathLike[str],
    image: str | os.PathLike[str],
    n: int,
    *,
    base: str | os.PathLike[str] | None = None,
) -> ReplayResult:
    """Replay the first ``n`` data records (writes, zeroes, trims; a request split into
    several entries counts once) onto ``image``; with ``base``, ``image`` is first made a copy
    of it.  This is the trace guarantee's check: the result equals the traced image after
    its first ``n`` write-class operations."""
    if base is not None:
        shutil.copyfile(base, image)
    with LogReader(log) as reader:
        limit = entries_for_records(reader, n)
        if limit == 0:
            return ReplayResult()
        return replay(reader, image, ReplayOptions(limit=limit))


def count_records(log: str | os.PathLike[str]) -> int:
    """Number of data records in a log (see :func:`replay_records`)."""
    with LogReader(log) as reader:
        return sum(1 for e in reader.entries() if e.ends_record)


__all__ = [
    "ReplayOptions",
    "ReplayResult",
    "count_records",
    "entries_for_records",
    "find",
    "open_target",
    "replay",
    "replay_records",
    "replay_to_device",
    "select_entries",
    "should_stop",
]
