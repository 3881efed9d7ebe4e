"""Replay a dm-log-writes log onto an image file, a block device or a BlockDevice.

Design: entry *selection* is separated from *applying*.  :func:`select_entries` reproduces
xfstests' ``replay-log`` walk exactly (``--start-entry``/``--start-mark`` positioning, then
``--limit``/``--next-flush``/``--next-fua``/``--end-mark`` stop tests, each inclusive of the
entry that triggers it, including replay-log's quirk that ``--end-mark`` disables the FLUSH/FUA
stops); applying is the stream's one applier (:mod:`blocktrace.stream.apply`) on the log's
records (:mod:`blocktrace.logwrites.records`): synchronously on a file or block device
(:func:`replay`, a :class:`~blocktrace.block.file.FileDevice`), awaited on any
:class:`BlockDevice` (:func:`replay_to_device`).  A log is untrusted input: every entry's range
is admitted by :func:`check_entry_bounds` before anything is applied (the target is never
written outside nor grown unless ``grow``), and a WRITE's payload reaches the applier in
pieces of at most ``CHUNK_BYTES`` (:func:`entry_data_records`; on a file, straight from the
reader's one reused buffer with :func:`~blocktrace.stream.apply.write_inline`), so memory
stays bounded whatever an entry claims.

Deliberate difference from replay-log: a DISCARD always makes its range read as zeroes (the
applier's ``write_zeroes``: hole punch or zero range, on files and block devices alike),
whatever its size, because blocktrace logs WRITE_ZEROES as discards and every blocktrace backend
reads trimmed ranges back as zeroes.  replay-log zero-fills on regular files too but skips
discards over 128 MiB (blocktrace's writer never emits those) and uses BLKDISCARD on devices.
Also, an empty log replays nothing successfully, where replay-log fails "Invalid entry number".
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Literal

from blocktrace.block.device import BlockDevice
from blocktrace.block.file import FileDevice
from blocktrace.block.locking import ImageLockedError, lock_output
from blocktrace.errors import BlockDeviceError, UsageError
from blocktrace.logwrites.format import LogFlag, LogFormatError
from blocktrace.logwrites.reader import LogEntry, LogReader, file_kind
from blocktrace.logwrites.records import entry_records
from blocktrace.outfile import FileId, open_output, output_mode
from blocktrace.stream.apply import apply_inline, apply_record, write_inline
from blocktrace.stream.records import Record, RecordKind

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
    #: A well-formed entry whose range does not fit the target: ``stop`` the replay with an
    #: error naming it (default), or ``skip`` it and go on (replay-log skips what it cannot
    #: apply); skipped entries are listed in :attr:`ReplayResult.skipped`.
    on_bad_entry: Literal["stop", "skip"] = "stop"
    #: Let writes and discards past the end extend a regular-file target (never a device).
    grow: bool = False

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
    skipped_count: int = 0  # entries not applied because their range did not fit
    skipped: list[BadEntry] = field(default_factory=list)  # the first MAX_SKIPPED_KEPT


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


#: Largest byte offset a file can have (``off_t`` is signed 64-bit): ranges ending past it
#: cannot be written anywhere, with or without ``grow``.
MAX_OFFSET = (1 << 63) - 1
#: At most this many skipped entries are kept in :attr:`ReplayResult.skipped` (all are counted).
MAX_SKIPPED_KEPT = 100


class BadEntry(LogFormatError):
    """A well-formed entry that cannot be applied to this target (its range lies outside it).
    The message names the entry, its byte offset in the log and what is wrong, in one line."""


class ReplayIOError(BlockDeviceError):
    """Applying an entry failed on the target (EFBIG, ENOSPC, EIO...): one line naming the
    entry; ``errno`` says why (EOVERFLOW for an offset no system call takes)."""

    def __init__(self, message: str, errno: int) -> None:
        super().__init__(errno, message)


def check_entry_bounds(entry: LogEntry, target_size: int, *, grow: bool = False) -> None:
    """Raise :class:`BadEntry` unless ``entry``'s range fits the target.

    The one place replay decides what an untrusted entry may touch: ``[offset, offset +
    length)`` must end within ``target_size`` bytes, or, with ``grow`` (regular files only,
    the caller decides), within the largest file offset.  A log is input from anyone, its
    ranges are not trusted: a DISCARD of 4 TiB or a write past the end is refused whole,
    never clipped, so the target is never written outside (nor grown) unless asked.
    """
    start = entry.target_offset
    end = start + entry.length
    kind = "DISCARD" if entry.is_discard else "write"
    what = f"{kind} of {entry.length} bytes at byte {start}"
    problem = None
    if end > MAX_OFFSET:
        problem = f"{what} ends past the largest file offset"
    elif end > target_size and not grow:
        problem = f"{what} ends past the target's {target_size} bytes (--grow extends a file)"
    if problem is not None:
        raise BadEntry(problem, entry=entry.index, offset=entry.offset, path=entry.log_path)


#: how a refused replay target ends its error line
REPLAY_ADVICE = "stop it first: this writes the whole image"


def open_target(path: str | os.PathLike[str], *, what: str = "replay target") -> FileDevice:
    """The replay target, an existing file or block device, as the stream's block device.

    Only regular files and block devices (loop devices, real disks) are replay targets: a
    character device (``/dev/zero``) accepts writes it does not keep, and a FIFO would take
    the data away.  The open does not block on a FIFO (``O_RDWR``), and the type is checked
    on the opened descriptor (``fstat``) before anything is written.

    The target is locked like a writable export (QEMU's image locks,
    :mod:`blocktrace.block.locking`) until it is closed: a replay (of a log or a JetStream
    trace, or ``follow``) onto an image QEMU, a blocktrace export, a live replica, a live log
    or another replay holds is refused before anything is written, and they are refused
    while it runs.  ``what`` names the target in errors (``follow target``).
    """
    try:
        device = FileDevice(path, lock=True, lock_advice=REPLAY_ADVICE)
    except ImageLockedError as exc:
        raise UsageError(f"{what} {exc}") from None
    except UsageError as exc:
        raise UsageError(f"cannot open {what} {os.fspath(path)}: {exc}") from None
    mode = os.fstat(device.fd).st_mode
    if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
        os.close(device.fd)
        raise UsageError(
            f"{what} {os.fspath(path)} is {file_kind(mode)}, not a regular file or block device"
        )
    return device


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
    """Replay ``log`` onto the file or block device ``image`` (which must exist).

    Every entry's range is checked against the target before it is applied (see
    :func:`check_entry_bounds` and ``ReplayOptions.on_bad_entry``/``grow``); I/O errors
    become one-line :class:`ReplayIOError`.
    """
    opts = options or ReplayOptions()
    reader = log if isinstance(log, LogReader) else LogReader(log)
    result = ReplayResult()
    try:
        device = open_target(image)
    except BaseException:
        if not isinstance(log, LogReader):
            reader.close()
        raise
    size = device.size
    can_grow = not device.is_block_device
    try:
        if FileId.of(os.fstat(device.fd)) == reader.file_id:
            raise UsageError(f"replay target {device.path} is the log being replayed")
        for entry in select_entries(reader, opts, result):
            if _admit(entry, size, opts, result, can_grow=can_grow):
                with _io_errors(entry, device.path):
                    size = _apply_sync(device, entry, opts, result, size)
            if progress is not None:
                progress(entry)
    finally:
        try:
            with _io_errors(None, device.path):
                _close_target(device)
        finally:
            if not isinstance(log, LogReader):
                reader.close()
    return result


def _admit(
    entry: LogEntry, size: int, opts: ReplayOptions, result: ReplayResult, *, can_grow: bool
) -> bool:
    """Whether to apply ``entry``: flushes and marks always pass; a data entry whose range
    does not fit the target stops the replay (``on_bad_entry="stop"``) or is skipped and
    recorded (``"skip"``, replay-log's behaviour for discards it cannot apply)."""
    if not entry.is_data or (entry.is_discard and opts.no_discard):
        return True
    try:
        check_entry_bounds(entry, size, grow=opts.grow and can_grow)
    except BadEntry as exc:
        if opts.on_bad_entry == "stop":
            raise
        result.skipped_count += 1
        if len(result.skipped) < MAX_SKIPPED_KEPT:
            result.skipped.append(exc)
        return False
    return True


@contextmanager
def _io_errors(entry: LogEntry | None, path: str) -> Iterator[None]:
    """Turn an I/O error from the target (the device's ``BlockDeviceError``, an ``OSError``
    or ``OverflowError``) into one line naming the entry, keeping its errno."""
    where = f"entry {entry.index} (log byte {entry.offset}): " if entry is not None else ""
    try:
        yield
    except BlockDeviceError as exc:
        cause = exc.__cause__
        why = cause.strerror if isinstance(cause, OSError) and cause.strerror else str(exc)
        raise ReplayIOError(f"replay target {path}: {where}{why}", exc.errno) from exc
    except OSError as exc:
        raise ReplayIOError(
            f"replay target {path}: {where}{exc.strerror or exc}", exc.errno or errno.EIO
        ) from exc
    except OverflowError as exc:
        raise ReplayIOError(f"replay target {path}: {where}{exc}", errno.EOVERFLOW) from exc


def entry_data_records(entry: LogEntry) -> Iterator[Record]:
    """The data records of one entry, a WRITE's payload streamed: one WRITE record per piece
    of at most :data:`~blocktrace.logwrites.reader.CHUNK_BYTES` (whatever size the entry
    claims, memory stays bounded); a DISCARD is its one ZERO or TRIM record."""
    if entry.is_discard:
        yield from (rec for rec in entry_records(entry) if rec.kind.is_data)
        return
    base = entry.target_offset
    fua = bool(entry.flags & LogFlag.FUA)
    for off, piece in entry.data_chunks():
        data = piece if isinstance(piece, bytes) else bytes(piece)
        yield Record(entry.index, RecordKind.WRITE, base + off, len(data), fua, data)


def _apply_sync(
    device: FileDevice, entry: LogEntry, opts: ReplayOptions, result: ReplayResult, size: int
) -> int:
    """One entry through the stream's applier, synchronously (a file applies inline), its
    range already admitted; returns the target's size after it (a file grows only when
    ``grow`` admitted a range past its end)."""
    if not entry.is_data or (entry.is_discard and opts.no_discard):
        return size
    base = entry.target_offset
    if entry.is_discard:
        for rec in entry_data_records(entry):
            apply_inline(device, rec)
    else:  # pieces of the reader's one reused buffer, each written before the next is read
        for off, piece in entry.data_chunks(reuse=True):
            write_inline(device, base + off, piece)
    end = base + entry.length
    if entry.is_discard:
        if end > size:  # zeroes past the end of a growing file: extend it, like zero-fill
            os.ftruncate(device.fd, end)
        result.bytes_zeroed += entry.length
    else:
        result.bytes_written += entry.length
    result.applied += 1
    return max(size, end)


async def replay_to_device(
    log: str | os.PathLike[str] | LogReader,
    device: BlockDevice,
    options: ReplayOptions | None = None,
) -> ReplayResult:
    """Replay onto any :class:`BlockDevice` (discards become ``write_zeroes(may_trim=True)``),
    then flush it.  Ranges are checked against ``device.size`` (a device never grows)."""
    opts = options or ReplayOptions()
    reader = log if isinstance(log, LogReader) else LogReader(log)
    result = ReplayResult()
    try:
        for entry in select_entries(reader, opts, result):
            if not entry.is_data or (entry.is_discard and opts.no_discard):
                continue
            if not _admit(entry, device.size, opts, result, can_grow=False):
                continue
            for rec in entry_data_records(entry):
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
    overwrite: bool = False,
) -> ReplayResult:
    """Replay the first ``n`` data records (writes, zeroes, trims; a request split into
    several entries counts once) onto ``image``; with ``base``, ``image`` is first created as
    a copy of it (by :func:`blocktrace.outfile.open_output`: not through a symlink, no more
    readable than ``base``, an existing file only with ``overwrite``).  This is the trace
    guarantee's check: the result equals the traced image after its first ``n`` write-class
    operations."""
    if base is not None:
        fd = open_output(
            os.fspath(image),
            overwrite=overwrite,
            mode=output_mode(os.fspath(base)),
            what="image",
            lock=lock_output,
        )
        with open(base, "rb") as src, os.fdopen(fd, "wb") as dst:
            shutil.copyfileobj(src, dst)
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
    "BadEntry",
    "ReplayIOError",
    "ReplayOptions",
    "ReplayResult",
    "check_entry_bounds",
    "count_records",
    "entries_for_records",
    "entry_data_records",
    "find",
    "open_target",
    "replay",
    "replay_records",
    "replay_to_device",
    "select_entries",
    "should_stop",
]
