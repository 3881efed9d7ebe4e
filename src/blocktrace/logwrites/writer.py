"""A fast, crash-safe dm-log-writes log writer (synchronous core; call it inline or in a thread).

Design
------
Appending and durability are separate steps, like a database log:

* ``write``/``discard``/``write_zeroes``/``flush``/``mark`` *append* entries.  Small entries are
  gathered in memory and written out per batch; a large entry (>= 256 KiB of data) is
  written at once together with the pending batch.  Writing a batch is the I/O layer's job
  (:mod:`blocktrace.logwrites.fileio`: O_DIRECT through a page-aligned staging buffer where
  the file system allows it, ``direct=True`` by default; else buffered ``pwritev``).  When an
  append method returns, the caller may reuse its buffer.  Appending makes nothing durable
  and does not change the super block.
* :meth:`LogWriter.sync` is the durability point: write out the batch, ``fdatasync``, rewrite
  the super block with ``nr_entries`` = every entry appended before ``sync`` was called, and
  ``fdatasync`` again.  When it returns, every entry appended before the call is durable *and
  counted*: after a crash (kill -9 or power loss) a reader sees at least those entries, and
  never a counted entry that is not fully on disk.  Concurrent ``sync`` calls coalesce (group
  commit): a caller whose entries a running sync already covered returns without I/O.

* :meth:`LogWriter.append_writes` is the batch fast path (the trace log target's): many plain
  data entries in one call, each header packed with one ``struct`` call into a reusable
  page-aligned buffer right before its data, so one CRC call covers the entry (fileio's
  ``fast_crc32``, libdeflate, where installed), and nothing is written out: the caller
  chooses the thread for :meth:`write_out`.  O_DIRECT writes that buffer as is (no staging
  copy).  It writes exactly the bytes ``write`` would (tests/unit/test_logwrites_fastpath.py).

A FLUSH or FUA entry is only a record in the stream; the *caller* decides when to ``sync``
(write-blocking tracing: before acknowledging a client's FUA write or FLUSH).

Entries beyond ``nr_entries`` (appended but not yet synced when the writer died) are ignored
by every reader; ours reports them as an uncounted tail, and each carries a CRC so a torn one is
detected, never misread.  Reopening a log for appending (:meth:`LogWriter.open`) cuts that tail.

WRITE_ZEROES: dm-log-writes has no zero flag.  By default (``zeroes="discard"``) a zeroed range
is logged as DISCARD entries of at most 128 MiB each, tagged ``ZEROES`` in our trailer.  Every
replayer we support turns them into zeroes: ours always zeroes discards, replay-log onto a
regular file falls back to writing zeroes (it skips discards > 128 MiB, hence the split), and
onto a block device it issues BLKDISCARD, which zeroes on devices with deterministic zeroing
(dm-thin, as xfstests uses).  ``zeroes="data"`` logs data entries full of zero bytes instead
(QEMU's choice: replays as zeroes anywhere, costs log space).

Thread safety: every public method may be called from any thread.  Appends are serialized by
one lock and never wait for a disk flush; ``sync`` holds the append lock only to take the batch
and the entry count, so appends proceed while it waits for ``fdatasync``.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import os
import random
import stat
import struct
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal
from zlib import crc32

from blocktrace.block.file import fsync_dir
from blocktrace.block.locking import lock_output
from blocktrace.errors import StateError, TargetError, UsageError
from blocktrace.logwrites.fileio import MAX_IOV as _MAX_IOV
from blocktrace.logwrites.fileio import Buffer, LogFile, OpenHeader, PackBuffer
from blocktrace.logwrites.fileio import fast_crc32 as _fast_crc32
from blocktrace.logwrites.format import (
    _CRC_FIELD,
    REPLAY_LOG_MAX_ZERO_SIZE,
    TRAILER_SIZE,
    TRAILER_TAG,
    ExtFlag,
    LogFlag,
    SuperBlock,
    check_sector_size,
    header_sector_struct,
    pack_entry_header,
    seal_entry_header,
    validate_mark,
)
from blocktrace.outfile import DEFAULT_MODE, Protected, open_output

log = logging.getLogger(__name__)

ZeroesMode = Literal["discard", "data"]

#: Data at least this large is written immediately instead of being copied into the batch.
DIRECT_THRESHOLD = 256 * 1024
#: Pending batch limit before it is written out (bytes / iovecs).
DEFAULT_BATCH_BYTES = 4 * 1024 * 1024
_FUA, _METADATA, _DISCARD = int(LogFlag.FUA), int(LogFlag.METADATA), int(LogFlag.DISCARD)
_ZERO_CHUNK = 8 * 1024 * 1024  # max bytes per zero-data entry in zeroes="data" mode
#: Mark appended by :meth:`LogWriter.close` with ``end_mark=True`` (the kernel's teardown mark).
END_MARK = "dm-log-writes-end"


class LogWriteError(TargetError):
    """Writing the log failed; ``errno`` (ENOSPC, EIO...) says why.  Sticky per writer."""

    def __init__(self, target: str, message: str, errno: int) -> None:
        super().__init__(target, message, errno)


@dataclass(slots=True)
class WriterStats:
    """Counters for benchmarks and ``trace`` status."""

    entries: int = 0
    data_bytes: int = 0
    log_bytes: int = 0
    writes: int = 0  # pwritev calls
    syncs: int = 0  # completed sync() calls that did I/O


class LogWriter:
    """Append dm-log-writes entries to a log file or device (see :meth:`create`, :meth:`open`).

    All offsets and lengths are in **bytes** and must be multiples of :attr:`sector_size`
    (``ValueError`` otherwise: dm-log-writes cannot express partial sectors; callers
    read-modify-write, as QEMU does).  Every append returns the index of the (last) entry it
    appended.  After an I/O error the writer is *failed*: every later call raises the same
    :class:`~blocktrace.errors.TargetError`, since the on-disk position is no longer known.
    """

    def __init__(
        self,
        fd: int,
        path: str,
        sector_size: int,
        *,
        nr_entries: int,
        position: int,
        log_id: int,
        checksums: bool,
        zeroes: ZeroesMode,
        batch_bytes: int,
        direct: bool = False,
    ) -> None:
        """Private: use :meth:`create` or :meth:`open`."""
        self._fd = fd
        self.path = path
        self.sector_size = sector_size
        self.log_id = log_id
        self.checksums = checksums
        self.zeroes: ZeroesMode = zeroes
        self._batch_bytes = batch_bytes
        self._lock = threading.Lock()  # appends, batch, counters
        self._sync_lock = threading.Lock()  # one fdatasync/super update at a time
        self._nr_entries = nr_entries  # appended (including the pending batch)
        self._durable = nr_entries  # counted by the on-disk super and durable
        self._pos = position  # where the next pending byte goes
        self._pending: list[Buffer] = []
        self._pending_bytes = 0
        self._pack = PackBuffer()  # append_writes' reusable, page-aligned packing buffer
        self._failed: TargetError | None = None
        self._closed = False
        self.stats = WriterStats()
        # the I/O layer: O_DIRECT through a staging buffer where possible (fileio.py)
        self._file = LogFile(fd, path, sector_size, self.stats, direct=direct)

    @property
    def direct(self) -> bool:
        """True while appends go through O_DIRECT (falls back to buffered on EINVAL)."""
        return self._file.direct

    # -- construction -----------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        path: str | os.PathLike[str],
        *,
        sector_size: int = 512,
        checksums: bool = True,
        zeroes: ZeroesMode = "discard",
        batch_bytes: int = DEFAULT_BATCH_BYTES,
        direct: bool = True,
        overwrite: bool = False,
        protected: Iterable[Protected] = (),
        mode: int = DEFAULT_MODE,
    ) -> LogWriter:
        """Start a new, empty log at ``path``.

        ``sector_size``: the recorded device's logical block size (512 default; the kernel and
        QEMU both count ``sector``/``nr_sectors`` in this unit).  ``checksums``: add our CRC
        trailer to every header (ignored by the kernel, QEMU and replay-log).  ``direct``:
        append with O_DIRECT through an aligned staging buffer where the file system allows
        it (no page-cache copy or write-back storm at ``sync``; silently buffered otherwise).
        The empty super is written and made durable (with the directory entry) before this
        returns.

        The file is opened by :func:`blocktrace.outfile.open_output`: never through a symlink,
        created ``O_EXCL`` with ``mode`` (at most 0600), an existing file (or block device)
        only with ``overwrite`` (a regular file is then truncated), never one of
        ``protected`` (the served images), and locked while the writer is open so a second
        writer on a live log is refused (:class:`~blocktrace.errors.UsageError`), as is a log
        naming an image something else is writing (QEMU's image locks,
        :func:`~blocktrace.block.locking.lock_output`).
        """
        check_sector_size(sector_size, for_writing=True)
        if zeroes not in ("discard", "data"):
            raise ValueError(f"zeroes must be 'discard' or 'data', not {zeroes!r}")
        p = os.fspath(path)
        fd = open_output(
            p,
            overwrite=overwrite,
            protected=protected,
            mode=mode,
            what="log",
            allow_block_device=True,
            lock=lock_output,
        )
        try:
            log_id = random.getrandbits(32) if checksums else 0
            self = cls(
                fd,
                p,
                sector_size,
                nr_entries=0,
                position=sector_size,
                log_id=log_id,
                checksums=checksums,
                zeroes=zeroes,
                batch_bytes=batch_bytes,
                direct=direct,
            )
            os.pwrite(fd, self._super_bytes(0), 0)
            os.fdatasync(fd)
            fsync_dir(os.path.dirname(os.path.abspath(p)) or ".")
        except OSError as exc:
            os.close(fd)
            raise TargetError(p, f"cannot create log: {exc.strerror}") from exc
        return self

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        *,
        checksums: bool = True,
        zeroes: ZeroesMode = "discard",
        batch_bytes: int = DEFAULT_BATCH_BYTES,
        direct: bool = True,
    ) -> LogWriter:
        """Reopen an existing log (ours, QEMU's or the kernel's) to append after its last
        counted entry.  Uncounted bytes after it (a tail left by a crash) are cut off."""
        from blocktrace.logwrites.reader import LogReader

        p = os.fspath(path)
        with LogReader(p) as reader:
            end = reader.end_of_entries()  # validates every counted entry
            sup = reader.super
            last_id = reader.last_log_id()
        log_id = sup.log_id if sup.log_id is not None else last_id
        if log_id is None:
            log_id = random.getrandbits(32) if checksums else 0
        try:
            fd = os.open(p, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise TargetError(p, f"cannot open log: {exc.strerror}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise UsageError(f"log {p}: in use by a running trace (locked)") from None
        try:
            lock_output(fd, f"log {p}")  # not the image of a live replica, replay or VM
        except BaseException:
            os.close(fd)
            raise
        try:
            if stat.S_ISREG(os.fstat(fd).st_mode) and os.fstat(fd).st_size > end:
                log.info(
                    "%s: cutting %d uncounted bytes after entry %d",
                    p,
                    os.fstat(fd).st_size - end,
                    sup.nr_entries,
                )
                os.ftruncate(fd, end)
                os.fdatasync(fd)
        except OSError as exc:
            os.close(fd)
            raise TargetError(p, f"cannot open log: {exc.strerror}") from exc
        return cls(
            fd,
            p,
            sup.sector_size,
            nr_entries=sup.nr_entries,
            position=end,
            log_id=log_id,
            checksums=checksums,
            zeroes=zeroes,
            batch_bytes=batch_bytes,
            direct=direct,
        )

    # -- state --------------------------------------------------------------------------------

    @property
    def nr_entries(self) -> int:
        """Entries appended so far (counted on disk only after :meth:`sync`)."""
        return self._nr_entries

    @property
    def durable_entries(self) -> int:
        """Entries covered by the on-disk super block and durable."""
        return self._durable

    @property
    def end_offset(self) -> int:
        """Byte offset just past the last appended entry."""
        return self._pos + self._pending_bytes

    @property
    def failed(self) -> TargetError | None:
        return self._failed

    # -- appending ---------------------------------------------------------------------------

    def write(self, offset: int, data: Buffer, *, fua: bool = False, metadata: bool = False) -> int:
        """Log a data write of ``data`` at byte ``offset`` (flags FUA/METADATA if asked)."""
        mv = memoryview(data).cast("B")
        nbytes = mv.nbytes
        self._check_range(offset, nbytes)
        if nbytes == 0:
            raise ValueError("a write entry needs data (use flush() for an empty flush)")
        # Plain ints: IntFlag arithmetic costs microseconds on this hot path.
        flags = (_FUA if fua else 0) | (_METADATA if metadata else 0)
        return self.append(flags, offset // self.sector_size, nbytes // self.sector_size, mv)

    def discard(self, offset: int, length: int, *, fua: bool = False) -> int:
        """Log a TRIM.  Split into entries of <= 128 MiB so replay-log's zero fallback applies;
        FUA (if asked) goes on the last entry."""
        return self._discard(offset, length, fua=fua, ext=ExtFlag.NONE)

    def write_zeroes(self, offset: int, length: int, *, fua: bool = False) -> int:
        """Log a WRITE_ZEROES in the writer's :attr:`zeroes` representation (module docstring)."""
        if self.zeroes == "discard":
            return self._discard(offset, length, fua=fua, ext=ExtFlag.ZEROES)
        self._check_range(offset, length)
        if length == 0:
            raise ValueError("empty write_zeroes")
        zero = memoryview(bytes(min(length, _ZERO_CHUNK)))
        index = -1
        pos, end = offset, offset + length
        while pos < end:
            n = min(len(zero), end - pos)
            last = pos + n == end
            flags = LogFlag.FUA if fua and last else LogFlag.NONE
            ext = ExtFlag.NONE if last else ExtFlag.SPLIT
            index = self.append(
                flags, pos // self.sector_size, n // self.sector_size, zero[:n], ext_flags=int(ext)
            )
            pos += n
        return index

    def flush(self) -> int:
        """Log a FLUSH entry ``(sector 0, nr_sectors 0, FLUSH)``; nothing is synced."""
        return self.append(LogFlag.FLUSH, 0, 0)

    def mark(self, text: str | bytes) -> int:
        """Log a MARK entry.  Printable ASCII without spaces; see ``format.max_mark_len``."""
        raw = validate_mark(text, self.sector_size, checksums=self.checksums)
        return self.append(LogFlag.MARK, 0, 0, mark=raw)

    def append(
        self,
        flags: int,
        sector: int,
        nr_sectors: int,
        data: Buffer | None = None,
        *,
        mark: bytes = b"",
        ext_flags: int = 0,
    ) -> int:
        """Append one raw entry (sector units).  ``data`` must be ``nr_sectors`` sectors unless
        the entry is a DISCARD or has no sectors.  The typed methods above are preferred."""
        S = self.sector_size
        flags = int(flags)
        if flags == 0 and nr_sectors == 0:
            raise ValueError("an entry with no flags and no sectors is malformed")
        mv = memoryview(data).cast("B") if data is not None else None
        expect = 0 if flags & _DISCARD else nr_sectors * S
        if (mv.nbytes if mv is not None else 0) != expect:
            raise ValueError(f"entry needs {expect} data bytes")
        with self._lock:
            self._check_usable()
            index = self._nr_entries
            header = pack_entry_header(S, sector, nr_sectors, flags, mark)
            if self.checksums:
                seal_entry_header(header, mv, log_id=self.log_id, index=index, ext_flags=ext_flags)
            if mv is None or expect == 0:
                self._queue(header)
            elif expect >= DIRECT_THRESHOLD:
                self._pending.append(header)
                self._pending.append(mv)
                self._pending_bytes += S + expect
                self._write_pending()
            else:
                self._queue(header)
                self._queue(
                    mv.obj if type(mv.obj) is bytes and mv.nbytes == len(mv.obj) else mv.tobytes()
                )
            self._nr_entries = index + 1
            self.stats.entries += 1
            self.stats.data_bytes += expect
            if self._pending_bytes >= self._batch_bytes or len(self._pending) >= _MAX_IOV:
                self._write_pending()
            return index

    def append_writes(self, entries: Sequence[tuple[int, int, bytes]]) -> int:
        """Append plain data entries ``(flags, offset, data)`` in one go: the trace hot path.

        ``flags`` is 0, FUA and/or METADATA; ``offset`` and ``len(data)`` are sector-aligned
        bytes and ``data`` is immutable ``bytes`` (large payloads are kept by reference until
        written out, small ones are copied).  Unlike :meth:`append`, nothing is written out
        here, so the caller chooses the thread that does the I/O (:meth:`write_out` when
        :attr:`pending_bytes` says so; :meth:`sync` writes out too).  Small entries are packed
        contiguously into one buffer, header then data, so one CRC call covers each entry and
        one write covers the batch.  Returns the index of the last entry appended.
        """
        S = self.sector_size
        mask = S - 1
        shift = S.bit_length() - 1
        pack = header_sector_struct(S).pack_into
        pack_crc = _CRC.pack_into
        crc_at = S - TRAILER_SIZE + _CRC_FIELD
        checksums = self.checksums
        # without checksums the trailer bytes stay zero, as in pack_entry_header
        tag, log_id = (TRAILER_TAG, self.log_id) if checksums else (_NO_TAG, 0)
        total = 0
        for flags, offset, data in entries:
            n = len(data)
            if offset & mask or n & mask or not n or offset < 0 or flags & ~_PLAIN_FLAGS:
                raise ValueError(f"bad data entry at offset {offset}, {n} bytes, flags {flags}")
            if n < DIRECT_THRESHOLD:
                total += S + n
        with self._lock:
            self._check_usable()
            first = index = self._nr_entries
            # Pack into the reusable buffer (no allocation, no zero-fill: the header struct
            # writes every header byte and the data fills the rest); it is free again once
            # everything pending is written out.
            chunk, view, pos = self._pack.reserve(total)
            seg = pos  # start of the packed bytes not yet handed to _pending
            start = pos
            pending = self._pending
            add_packed = self._pack.add_to
            data_bytes = 0
            fast = _fast_crc32 if checksums else None
            direct = self._file.direct
            # the chunk's address for fast_crc32 (the anchor keeps it exported meanwhile)
            anchor = ctypes.c_char.from_buffer(chunk) if fast is not None and total else None
            base = ctypes.addressof(anchor) if anchor is not None else 0
            for flags, offset, data in entries:
                n = len(data)
                data_bytes += n
                idx = index if checksums else 0
                if n < DIRECT_THRESHOLD:
                    end = pos + S + n
                    pack(chunk, pos, offset >> shift, n >> shift, flags, 0, tag, 0, log_id, 0, idx)
                    chunk[pos + S : end] = data
                    if fast is not None:
                        pack_crc(chunk, pos + crc_at, fast(0, base + pos, S + n))
                    elif checksums:
                        pack_crc(chunk, pos + crc_at, crc32(view[pos:end]))
                    pos = end
                else:
                    if pos > seg:  # stream order: the entries packed so far go first
                        add_packed(pending, view, seg, pos, chunk)
                        seg = pos
                    header: bytearray
                    if checksums and direct and type(data) is bytes:
                        # O_DIRECT stages it: its CRC is computed in the same pass (fileio)
                        header = OpenHeader(S, crc_at)
                        pack(
                            header, 0, offset >> shift, n >> shift, flags, 0, tag, 0, log_id, 0, idx
                        )
                    else:
                        header = bytearray(S)
                        pack(
                            header, 0, offset >> shift, n >> shift, flags, 0, tag, 0, log_id, 0, idx
                        )
                        if fast is not None and type(data) is bytes:
                            pack_crc(header, crc_at, fast(crc32(header), data, n))
                        elif checksums:
                            pack_crc(header, crc_at, crc32(data, crc32(header)))
                    pending.append(header)
                    pending.append(data)
                    self._pending_bytes += S + n
                index += 1
            if pos > seg:
                add_packed(pending, view, seg, pos, chunk)
            del anchor
            self._pending_bytes += pos - start
            self._nr_entries = index
            self.stats.entries += index - first
            self.stats.data_bytes += data_bytes
            return index - 1

    @property
    def pack_room(self) -> int:
        """Bytes :meth:`append_writes` can still pack (header + data of entries under
        ``DIRECT_THRESHOLD``) before the packing buffer overflows; :meth:`write_out` frees it."""
        return self._pack.room

    @property
    def pending_bytes(self) -> int:
        """Bytes appended but not yet written out (see :meth:`append_writes`)."""
        return self._pending_bytes

    def write_out(self) -> None:
        """Write the pending batch to the log (blocking; does not sync or count anything)."""
        with self._lock:
            self._check_usable()
            self._write_pending()

    # -- durability ------------------------------------------------------------------------

    def sync(self) -> int:
        """Make every entry appended before this call durable and counted; return the count.

        Blocking (two ``fdatasync``); run it in a thread from asyncio.  Safe to call
        concurrently with appends and with other ``sync`` calls (group commit).
        """
        with self._lock:
            self._check_usable()
            target = self._nr_entries
        with self._sync_lock:
            if self._durable >= target:
                return self._durable
            with self._lock:
                self._check_usable()
                self._write_pending()
                target = self._nr_entries  # cover whatever else is written out by now
            try:
                os.fdatasync(self._fd)  # 1. the entries reach stable storage...
                os.pwrite(self._fd, self._super_bytes(target), 0)
                os.fdatasync(self._fd)  # 2. ...before the super that counts them
            except OSError as exc:
                with self._lock:
                    raise self._fail(exc, "sync") from exc
            self._durable = target
            self.stats.syncs += 1
            return target

    def close(self, *, end_mark: bool = False, sync: bool = True) -> None:
        """Optionally append the kernel's ``dm-log-writes-end`` mark, sync, close.  Idempotent.
        ``sync=False`` writes the batch out but neither syncs nor counts it (what a writer
        killed after its last append leaves behind; used by crash tests)."""
        if self._closed:
            return
        try:
            if self._failed is None:
                if end_mark:
                    self.mark(END_MARK)
                if sync:
                    self.sync()
                else:
                    with self._lock:
                        self._write_pending()
        finally:
            self._closed = True
            self._file.close()

    def __enter__(self) -> LogWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals ---------------------------------------------------------------------------

    def _discard(self, offset: int, length: int, *, fua: bool, ext: ExtFlag) -> int:
        self._check_range(offset, length)
        if length == 0:
            raise ValueError("empty discard")
        S = self.sector_size
        index = -1
        pos, end = offset, offset + length
        while pos < end:
            n = min(REPLAY_LOG_MAX_ZERO_SIZE, end - pos)
            flags = LogFlag.DISCARD
            last = pos + n == end
            if fua and last:
                flags |= LogFlag.FUA
            index = self.append(
                flags, pos // S, n // S, ext_flags=int(ext if last else ext | ExtFlag.SPLIT)
            )
            pos += n
        return index

    def _check_range(self, offset: int, length: int) -> None:
        S = self.sector_size
        if offset < 0 or length < 0 or offset % S or length % S:
            raise ValueError(
                f"offset {offset} / length {length} not aligned to the log sector size {S}"
            )

    def _check_usable(self) -> None:
        if self._failed is not None:
            raise self._failed
        if self._closed:
            raise StateError(f"{self.path}: log writer is closed")

    def _queue(self, buf: Buffer) -> None:
        self._pending.append(buf)
        self._pending_bytes += len(buf)

    def _write_pending(self) -> None:
        """Write the batch at ``_pos`` (caller holds ``_lock``); short writes are continued."""
        bufs, self._pending = self._pending, []
        total, self._pending_bytes = self._pending_bytes, 0
        try:
            self._write_bufs(bufs, total)
        finally:
            del bufs  # nothing references the packing buffer any more: reuse it
            self._pack.reset()

    def _write_bufs(self, bufs: list[Buffer], total: int) -> None:
        if not bufs:
            return
        try:
            self._pos = self._file.write(bufs, self._pos, aligned=self._pack.mem)
        except OSError as exc:
            raise self._fail(exc, "append") from exc
        self.stats.log_bytes += total

    def _fail(self, exc: OSError, what: str) -> TargetError:
        """Enter the failed state (sticky); return the error every later call raises."""
        if self._failed is None:
            self._failed = LogWriteError(
                self.path, f"log {what} failed: {exc.strerror or exc}", exc.errno or errno.EIO
            )
            self._failed.__cause__ = exc
        return self._failed

    def _super_bytes(self, nr_entries: int) -> bytes:
        return SuperBlock(
            nr_entries, self.sector_size, log_id=self.log_id if self.checksums else None
        ).pack()


_CRC = struct.Struct("<I")
_NO_TAG = bytes(4)
_PLAIN_FLAGS = _FUA | _METADATA


__all__ = ["END_MARK", "LogWriteError", "LogWriter", "WriterStats", "ZeroesMode"]
