"""A fast, crash-safe dm-log-writes log writer (synchronous core; call it inline or in a thread).

Design
------
Appending and durability are separate steps, like a database log:

* ``write``/``discard``/``write_zeroes``/``flush``/``mark`` *append* entries.  Small entries are
  gathered in memory and written with one ``pwritev`` per batch; a large entry (>= 256 KiB of
  data) is written at once together with the pending batch.  Where the file system allows
  it (``direct=True``, the default) batches go through a page-aligned staging buffer with
  O_DIRECT: one memcpy, no page-cache copy and no write-back burst at ``fdatasync`` (measured
  about 2x faster for 1 MiB entries here); otherwise one buffered ``pwritev`` per batch,
  without copying large buffers.  When an append method returns, the caller may reuse its
  buffer.  Appending makes nothing durable and does not change the super block.
* :meth:`LogWriter.sync` is the durability point: write out the batch, ``fdatasync``, rewrite
  the super block with ``nr_entries`` = every entry appended before ``sync`` was called, and
  ``fdatasync`` again.  When it returns, every entry appended before the call is durable *and
  counted*: after a crash (kill -9 or power loss) a reader sees at least those entries, and
  never a counted entry that is not fully on disk.  Concurrent ``sync`` calls coalesce (group
  commit): a caller whose entries a running sync already covered returns without I/O.

* :meth:`LogWriter.append_writes` is the batch fast path (the trace log target's): many plain
  data entries in one call, each header packed with one ``struct`` call into a reusable
  page-aligned buffer right before its data, so one CRC call covers the entry (libdeflate's
  CRC-32 through ctypes where installed: same value as zlib's, 3-10x faster, GIL released),
  and nothing is written out: the caller chooses the thread for :meth:`write_out`.  O_DIRECT
  writes that buffer as is (no staging copy); large payloads are copied into the staging
  buffer with the GIL released.  It writes exactly the bytes ``write`` would
  (tests/unit/test_logwrites_fastpath.py).

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
import logging
import mmap
import os
import random
import stat
import struct
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, cast
from zlib import crc32

from blocktrace.errors import StateError, TargetError
from blocktrace.logwrites.format import (
    _CRC_FIELD,
    ENTRY_SIZE,
    REPLAY_LOG_MAX_ZERO_SIZE,
    TRAILER_SIZE,
    TRAILER_TAG,
    ExtFlag,
    LogFlag,
    SuperBlock,
    check_sector_size,
    pack_entry_header,
    seal_entry_header,
    validate_mark,
)

log = logging.getLogger(__name__)

Buffer = bytes | bytearray | memoryview
ZeroesMode = Literal["discard", "data"]

#: Data at least this large is written immediately instead of being copied into the batch.
DIRECT_THRESHOLD = 256 * 1024
#: Pending batch limit before it is written out (bytes / iovecs).
DEFAULT_BATCH_BYTES = 4 * 1024 * 1024
_MAX_IOV = 1024  # Linux IOV_MAX
_FUA, _METADATA, _DISCARD = int(LogFlag.FUA), int(LogFlag.METADATA), int(LogFlag.DISCARD)
#: O_DIRECT staging buffer (a multiple of every sector size; larger writes, fewer of them)
_STAGE_BYTES = 8 * 1024 * 1024
_ZERO_CHUNK = 8 * 1024 * 1024  # max bytes per zero-data entry in zeroes="data" mode
#: Mark appended by :meth:`LogWriter.close` with ``end_mark=True`` (the kernel's teardown mark).
END_MARK = "dm-log-writes-end"


class LogWriteError(TargetError):
    """Writing the log failed; ``errno`` (ENOSPC, EIO...) says why.  Sticky per writer."""

    def __init__(self, target: str, message: str, errno: int) -> None:
        super().__init__(target, message)
        self.errno = errno


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
        self._pack: mmap.mmap | None = None  # append_writes' reusable packing buffer
        self._pack_view = memoryview(b"")
        self._pack_fill = 0  # bytes of _pack referenced by _pending
        #: (index in _pending, start, end) of the last piece of _pack handed to _pending
        self._pack_last: tuple[int, int, int] | None = None
        self._failed: TargetError | None = None
        self._closed = False
        self.stats = WriterStats()
        self._dfd: int | None = None  # O_DIRECT descriptor, if direct I/O works here
        self._stage: mmap.mmap | None = None  # page-aligned staging buffer for O_DIRECT
        self._stage_addr = 0
        if direct:
            self._open_direct()

    @property
    def direct(self) -> bool:
        """True while appends go through O_DIRECT (falls back to buffered on EINVAL)."""
        return self._dfd is not None

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
    ) -> LogWriter:
        """Start a new, empty log at ``path`` (a regular file is truncated; a device is not).

        ``sector_size``: the recorded device's logical block size (512 default; the kernel and
        QEMU both count ``sector``/``nr_sectors`` in this unit).  ``checksums``: add our CRC
        trailer to every header (ignored by the kernel, QEMU and replay-log).  ``direct``:
        append with O_DIRECT through an aligned staging buffer where the file system allows
        it (no page-cache copy or write-back storm at ``sync``; silently buffered otherwise).
        The empty super is written and made durable (with the directory entry) before this
        returns.
        """
        check_sector_size(sector_size, for_writing=True)
        if zeroes not in ("discard", "data"):
            raise ValueError(f"zeroes must be 'discard' or 'data', not {zeroes!r}")
        p = os.fspath(path)
        try:
            fd = os.open(p, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise TargetError(p, f"cannot create log: {exc.strerror}") from exc
        try:
            if stat.S_ISREG(os.fstat(fd).st_mode):
                os.ftruncate(fd, 0)
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
            _fsync_dir(p)
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
        pack = _header_struct(S).pack_into
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
            pos = self._pack_fill
            chunk: mmap.mmap | bytearray
            if pos + total <= _PACK_BYTES:
                if self._pack is None:
                    # page-aligned, so O_DIRECT writes it without a staging copy
                    self._pack = mmap.mmap(-1, _PACK_BYTES)
                    self._pack_view = memoryview(self._pack)
                chunk, view = self._pack, self._pack_view
                self._pack_fill = pos + total
            else:
                chunk = bytearray(total)
                view = memoryview(chunk)
                pos = 0
            seg = pos  # start of the packed bytes not yet handed to _pending
            start = pos
            pending = self._pending
            data_bytes = 0
            fast = _fast_crc32 if checksums else None
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
                        self._add_packed(view, seg, pos, chunk)
                        seg = pos
                    header = bytearray(S)
                    pack(header, 0, offset >> shift, n >> shift, flags, 0, tag, 0, log_id, 0, idx)
                    if fast is not None and type(data) is bytes:
                        pack_crc(header, crc_at, fast(crc32(header), data, n))
                    elif checksums:
                        pack_crc(header, crc_at, crc32(data, crc32(header)))
                    pending.append(header)
                    pending.append(data)
                    self._pending_bytes += S + n
                index += 1
            if pos > seg:
                self._add_packed(view, seg, pos, chunk)
            del anchor
            self._pending_bytes += pos - start
            self._nr_entries = index
            self.stats.entries += index - first
            self.stats.data_bytes += data_bytes
            return index - 1

    def _add_packed(self, view: memoryview, start: int, end: int, chunk: object) -> None:
        """Hand packed bytes ``[start, end)`` to the batch, extending the previous piece of
        the packing buffer when it ends at ``start`` (one large write instead of many)."""
        pending = self._pending
        last = self._pack_last
        if (
            chunk is self._pack
            and last is not None
            and last[0] == len(pending) - 1
            and last[2] == start
        ):
            pending[-1] = view[last[1] : end]
            self._pack_last = (last[0], last[1], end)
            return
        pending.append(view[start:end])
        self._pack_last = (len(pending) - 1, start, end) if chunk is self._pack else None

    @property
    def pack_room(self) -> int:
        """Bytes :meth:`append_writes` can still pack (header + data of entries under
        ``DIRECT_THRESHOLD``) before the packing buffer overflows; :meth:`write_out` frees it."""
        return _PACK_BYTES - self._pack_fill

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
            os.close(self._fd)
            self._close_direct()

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
            self._pack_fill = 0
            self._pack_last = None

    def _write_bufs(self, bufs: list[Buffer], total: int) -> None:
        if not bufs:
            return
        pos = self._pos
        if self._dfd is not None:
            try:
                self._pos = self._write_direct(bufs, pos)
                self.stats.log_bytes += total
                return
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise self._fail(exc, "append") from exc
                # This file system refuses our alignment: rewrite the batch (idempotent)
                # through the page cache from now on.
                log.info("%s: O_DIRECT refused (%s); using buffered appends", self.path, exc)
                self._close_direct()
        try:
            for start in range(0, len(bufs), _MAX_IOV):
                chunk: list[Buffer] = bufs[start : start + _MAX_IOV]
                want = sum(len(b) for b in chunk)
                while want:
                    n = os.pwritev(self._fd, chunk, pos)
                    self.stats.writes += 1
                    if n == 0:
                        raise OSError(errno.EIO, "pwritev wrote nothing")
                    pos += n
                    want -= n
                    if want:
                        chunk = _advance(chunk, n)
        except OSError as exc:
            raise self._fail(exc, "append") from exc
        self._pos = pos
        self.stats.log_bytes += total

    def _open_direct(self) -> None:
        if not hasattr(os, "O_DIRECT") or self.sector_size > _STAGE_BYTES:
            return
        try:
            if not stat.S_ISREG(os.fstat(self._fd).st_mode):
                return
            self._dfd = os.open(self.path, os.O_WRONLY | os.O_DIRECT | os.O_CLOEXEC)
        except OSError:
            return  # tmpfs and friends: buffered appends
        self._stage = mmap.mmap(-1, _STAGE_BYTES)
        # its address, for GIL-free copies (valid while the mapping is open)
        self._stage_addr = ctypes.addressof(ctypes.c_char.from_buffer(self._stage))

    def _close_direct(self) -> None:
        if self._dfd is not None:
            os.close(self._dfd)
            self._dfd = None
        if self._stage is not None:
            self._stage_addr = 0
            self._stage.close()
            self._stage = None

    def _write_direct(self, bufs: list[Buffer], pos: int) -> int:
        """Copy the batch through the aligned staging buffer into O_DIRECT writes.

        Every buffer is a whole number of sectors and the stage is too, so every write
        starts and ends on a sector boundary.  Returns the new end position."""
        stage = self._stage
        assert stage is not None and self._dfd is not None
        cap = len(stage)
        fill = 0
        pack = self._pack
        for b in bufs:
            if pack is not None and isinstance(b, memoryview) and b.obj is pack:
                # packed entries already sit in page-aligned memory: no staging copy
                if fill:
                    pos = self._direct_out(fill, pos)
                    fill = 0
                pos = self._direct_write(b, pos)
                continue
            if type(b) is bytes and len(b) >= _MEMMOVE_MIN:
                # a large payload: copy it without holding the GIL (ctypes releases it), so
                # the event loop runs on while this thread copies
                src = _bytes_address(b)
                off, n = 0, len(b)
                while off < n:
                    take = min(cap - fill, n - off)
                    _memmove(self._stage_addr + fill, src + off, take)
                    fill += take
                    off += take
                    if fill == cap:
                        pos = self._direct_out(fill, pos)
                        fill = 0
                continue
            mv = memoryview(b).cast("B") if isinstance(b, memoryview) else memoryview(b)
            off, n = 0, len(mv)
            while off < n:
                take = min(cap - fill, n - off)
                stage[fill : fill + take] = mv[off : off + take]
                fill += take
                off += take
                if fill == cap:
                    pos = self._direct_out(fill, pos)
                    fill = 0
        if fill:
            pos = self._direct_out(fill, pos)
        return pos

    def _direct_out(self, fill: int, pos: int) -> int:
        assert self._stage is not None
        with memoryview(self._stage) as whole, whole[:fill] as view:
            return self._direct_write(view, pos)

    def _direct_write(self, view: memoryview, pos: int) -> int:
        """One O_DIRECT write of aligned memory at ``pos``; returns the new end position."""
        assert self._dfd is not None
        size = view.nbytes
        n = os.pwrite(self._dfd, view, pos)
        self.stats.writes += 1
        while n < size:  # a short direct write: finish through the page cache
            m = os.pwrite(self._fd, view[n:], pos + n)
            if m <= 0:
                raise OSError(errno.EIO, "pwrite wrote nothing")
            n += m
        return pos + size

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


def _header_struct(sector_size: int) -> struct.Struct:
    """One whole header sector: entry fields, zero padding, our trailer.  ``pack_into`` zeroes
    the padding itself, so a header is packed with one call into any buffer."""
    st = _HEADER_STRUCTS.get(sector_size)
    if st is None:
        pad = sector_size - ENTRY_SIZE - TRAILER_SIZE
        st = _HEADER_STRUCTS[sector_size] = struct.Struct(f"<QQQQ{pad}x4sIIIQ")
    return st


_HEADER_STRUCTS: dict[int, struct.Struct] = {}
_CRC = struct.Struct("<I")
_NO_TAG = bytes(4)
_PLAIN_FLAGS = _FUA | _METADATA
#: append_writes' packing buffer (small entries, header + data contiguous)
_PACK_BYTES = 8 * 1024 * 1024


def _load_fast_crc32() -> Callable[[int, int | bytes, int], int] | None:
    """libdeflate's CRC-32 (the same CRC as zlib's, computed with carry-less multiply
    instructions: ~3x faster per 4 KiB entry, ~5-10x per MiB, and called through ctypes
    it runs without the GIL).  None where the library is missing or disagrees with zlib."""
    try:
        fn = ctypes.CDLL("libdeflate.so.0").libdeflate_crc32
    except (OSError, AttributeError):
        return None
    fn.restype = ctypes.c_uint32
    fn.argtypes = [ctypes.c_uint32, ctypes.c_void_p, ctypes.c_size_t]
    probe = bytes(range(256)) * 33
    if fn(crc32(probe[:7]), probe[7:], len(probe) - 7) != crc32(probe):
        return None
    return cast("Callable[[int, int | bytes, int], int]", fn)


#: ``fast_crc32(crc, address_or_bytes, length)``; None: use zlib.crc32
_fast_crc32 = None if os.environ.get("BLOCKTRACE_NO_LIBDEFLATE") else _load_fast_crc32()

#: payloads at least this large are copied into the O_DIRECT stage with the GIL released
_MEMMOVE_MIN = 64 * 1024
_memmove = ctypes.memmove


def _bytes_address(b: bytes) -> int:
    """Address of a bytes object's data (valid while ``b`` is alive; it is never written)."""
    addr = ctypes.cast(ctypes.c_char_p(b), ctypes.c_void_p).value
    assert addr is not None
    return addr


def _advance(bufs: list[Buffer], n: int) -> list[Buffer]:
    """Drop the first ``n`` bytes from a list of buffers (after a short ``pwritev``)."""
    out: list[Buffer] = []
    for b in bufs:
        if n >= len(b):
            n -= len(b)
            continue
        out.append(memoryview(b)[n:] if n else b)
        n = 0
    return out


def _fsync_dir(path: str) -> None:
    """Make a new file's directory entry durable (best effort: some filesystems refuse)."""
    try:
        dfd = os.open(os.path.dirname(os.path.abspath(path)) or ".", os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)


__all__ = ["END_MARK", "LogWriteError", "LogWriter", "WriterStats", "ZeroesMode"]
