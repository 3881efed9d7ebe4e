"""Read dm-log-writes logs from the kernel, QEMU's blklogwrites and blocktrace.

Design: identify, then iterate.  :class:`LogReader` reads and checks the super block when it is
opened (so "not a log" is reported before anything else), then :meth:`LogReader.entries` walks
entries lazily with ``pread``: headers are decoded as they are reached, data is read only when
asked (:meth:`LogEntry.read_data`) or when a checksum must be verified.

Errors are :class:`~blocktrace.logwrites.format.LogFormatError` subclasses naming the log, the
entry index and the byte offset of its header.  The rules are replay-log's (``log_entry_valid``)
plus bounds checks (a counted entry must lie inside the log) plus, for entries carrying our
trailer, the CRC and the entry index (so a stale entry from an older log is not misread).

Past ``nr_entries`` a log may hold entries that were appended but never counted (a writer
killed between append and sync, a kernel target not torn down).  :meth:`LogReader.tail`
describes them; ``salvage=True`` iteration also yields those whose checksum proves them whole.
"""

from __future__ import annotations

import ctypes
import os
import stat
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal

from blocktrace.errors import StateError
from blocktrace.logwrites.format import (
    KNOWN_FLAGS,
    SUPER_EXT,
    SUPER_EXT_OFFSET,
    BadSuperBlock,
    ChecksumMismatch,
    EntryHeader,
    ExtFlag,
    LogFlag,
    LogFormatError,
    SuperBlock,
    TruncatedLog,
    entry_crc,
    unpack_entry_header,
)
from blocktrace.outfile import FileId


def _continue_crc(crc: int, data: bytes) -> int:
    """Continue ``crc`` over a loaded payload: libdeflate's CRC-32 where installed (the same
    CRC as zlib's, 5-10x faster per MiB: zlib's bounded reading a checksummed bulk log)."""
    from blocktrace.logwrites.fileio import fast_crc32  # only logs with checksums need it

    if fast_crc32 is not None and data:
        return int(fast_crc32(crc, data, len(data)))
    return zlib.crc32(data, crc)


#: Bytes of log data held in memory at once: entry data up to this size is loaded with its
#: header (replay reads the log once); larger entries are verified and applied in chunks of
#: this size, so a hostile entry of any size costs at most this much memory.
CHUNK_BYTES = 8 * 1024 * 1024
_MAX_INLINE = CHUNK_BYTES
_CHUNK = CHUNK_BYTES


@dataclass(frozen=True, slots=True, eq=False)
class LogEntry:
    """One entry; ``offset`` is the byte offset of its header sector in the log."""

    index: int
    offset: int
    header: EntryHeader
    sector_size: int
    counted: bool
    _reader: LogReader = field(repr=False)
    _data: bytes | None = field(default=None, repr=False)

    @property
    def sector(self) -> int:
        return self.header.sector

    @property
    def log_path(self) -> str:
        """The log this entry was read from (for error messages)."""
        return self._reader.path

    @property
    def nr_sectors(self) -> int:
        return self.header.nr_sectors

    @property
    def flags(self) -> int:
        return self.header.flags

    @property
    def target_offset(self) -> int:
        """Byte offset on the recorded device."""
        return self.header.sector * self.sector_size

    @property
    def length(self) -> int:
        """Bytes of the device this entry covers (0 for flush/mark)."""
        return self.header.nr_sectors * self.sector_size

    @property
    def data_offset(self) -> int:
        return self.offset + self.sector_size

    @property
    def end_offset(self) -> int:
        """Byte offset of the next entry's header."""
        return self.data_offset + self.header.data_bytes(self.sector_size)

    @property
    def pos_after_header(self) -> int:
        """replay-log's ``-v`` position (log sectors)."""
        return self.data_offset // self.sector_size

    @property
    def pos_after_data(self) -> int:
        """replay-log's ``--find`` position (log sectors)."""
        return self.end_offset // self.sector_size

    @property
    def mark(self) -> str | None:
        return self.header.mark.decode("ascii", "replace") if self.header.is_mark else None

    @property
    def is_discard(self) -> bool:
        return bool(self.flags & LogFlag.DISCARD)

    @property
    def is_zeroes(self) -> bool:
        """A DISCARD that blocktrace wrote for a WRITE_ZEROES (our trailer says so)."""
        t = self.header.trailer
        return self.is_discard and t is not None and bool(t.ext_flags & ExtFlag.ZEROES)

    @property
    def is_data(self) -> bool:
        """Changes the device: a write or discard with sectors (what replay applies)."""
        return self.header.nr_sectors > 0

    @property
    def ends_record(self) -> bool:
        """A data entry that completes one recorded request (not a SPLIT piece).  Counting
        these counts a trace's data records; logs without our trailer: every data entry."""
        t = self.header.trailer
        return self.is_data and (t is None or not t.ext_flags & ExtFlag.SPLIT)

    @property
    def checksummed(self) -> bool:
        return self.header.trailer is not None

    def read_data(self) -> bytes:
        """The entry's whole payload (empty for discards, flushes and marks).  Holds it all in
        memory: callers facing untrusted logs use :meth:`data_chunks`."""
        if self._data is not None:
            return self._data
        n = self.header.data_bytes(self.sector_size)
        return self._reader._pread_exact(n, self.data_offset, self.index) if n else b""

    def data_chunks(self, *, reuse: bool = False) -> Iterator[tuple[int, bytes | memoryview]]:
        """The payload as ``(offset in the payload, piece)`` pieces of at most
        :data:`CHUNK_BYTES` (one piece if it was loaded with the header): memory stays bounded
        whatever the entry's size claims.  ``reuse``: each piece is a view of one buffer the
        reader reuses, valid only until the next piece (no allocation per chunk; for callers
        that consume a piece at once, like a ``pwrite``)."""
        if self._data is not None:
            if self._data:
                yield 0, self._data
            return
        n = self.header.data_bytes(self.sector_size)
        done = 0
        reader = self._reader
        while done < n:
            k = min(CHUNK_BYTES, n - done)
            offset = self.data_offset + done
            piece = (
                reader._read_scratch(k, offset, self.index)
                if reuse
                else reader._pread_exact(k, offset, self.index)
            )
            yield done, piece
            done += k


@dataclass(frozen=True, slots=True)
class TailInfo:
    """What follows the counted entries.  ``state``:

    * ``clean``: nothing (the log ends where the counted entries end, or only zeroes follow);
    * ``uncounted``: ``entries`` whole entries follow (checksum-verified ones, or plausible
      headers for logs without checksums), then possibly a torn remainder at ``torn_offset``;
    * ``torn``: bytes follow that are not a whole valid entry (a write cut short).
    """

    state: Literal["clean", "uncounted", "torn"]
    entries: int
    verified: bool
    end_offset: int  # end of the last counted or salvageable entry
    torn_offset: int | None
    trailing_bytes: int


def file_kind(mode: int) -> str:
    """What ``mode`` (``st_mode``) is, in words, for "not a regular file" errors."""
    for test, name in (
        (stat.S_ISREG, "a regular file"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISLNK, "a symbolic link"),
    ):
        if test(mode):
            return name
    return f"file type {stat.S_IFMT(mode):#o}"


class LogReader:
    """An open log.  ``LogReader(path)`` raises :class:`BadSuperBlock` unless it is a log."""

    def __init__(self, path: str | os.PathLike[str], *, verify: bool = True) -> None:
        self.path = os.fspath(path)
        self.verify = verify
        try:
            # O_NONBLOCK: opening a FIFO must not wait for a writer; the type is checked next
            self._fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError as exc:
            raise LogFormatError(f"cannot open: {exc.strerror}", path=self.path) from exc
        try:
            st = os.fstat(self._fd)
            #: the log's identity (a replay must not write onto the log it reads)
            self.file_id = FileId.of(st)
            if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
                raise LogFormatError(
                    f"not a regular file or block device ({file_kind(st.st_mode)})",
                    path=self.path,
                )
            self.size = (
                st.st_size if stat.S_ISREG(st.st_mode) else os.lseek(self._fd, 0, os.SEEK_END)
            )
            head = os.pread(self._fd, SUPER_EXT_OFFSET + SUPER_EXT.size, 0)
            if len(head) < 28:
                raise BadSuperBlock(
                    f"too short for a super block ({len(head)} bytes)", offset=0, path=self.path
                )
            try:
                self.super = SuperBlock.unpack(head)
            except LogFormatError as exc:
                reason = exc.reason
                if head[:8] == bytes(8) and self.size > 512:
                    reason += (
                        " (no super block yet: QEMU's blklogwrites writes it only at a"
                        " flush or every log-super-update-interval entries)"
                    )
                raise BadSuperBlock(reason, offset=exc.offset, path=self.path) from None
        except BaseException:
            os.close(self._fd)
            raise
        self.sector_size = self.super.sector_size
        self.nr_entries = self.super.nr_entries
        #: the error a ``salvage=True`` walk stopped at (set by :meth:`entries`)
        self.salvage_error: LogFormatError | None = None
        self._scratch: bytearray | None = None  # _crc_range's reused chunk buffer
        self._scratch_addr = 0

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> LogReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- iteration ---------------------------------------------------------------------------

    def entries(
        self, start: int = 0, *, with_data: bool = False, salvage: bool = False
    ) -> Iterator[LogEntry]:
        """Yield counted entries from index ``start`` (entries before it are walked, headers
        only).  ``with_data`` loads each payload (verified against its checksum) so replay
        reads the log once.  ``salvage``: stop quietly at the first bad counted entry (the
        error is kept in :attr:`salvage_error`) and go on past ``nr_entries`` with entries whose
        checksum proves them whole."""
        self.salvage_error = None
        pos = self.sector_size
        index = 0
        try:
            while index < self.nr_entries:
                entry = self._entry_at(
                    index,
                    pos,
                    counted=True,
                    load=with_data and index >= start,
                    check=self.verify and index >= start,
                )
                if index >= start:
                    yield entry
                pos = entry.end_offset
                index += 1
        except LogFormatError as exc:
            if not salvage:
                raise
            self.salvage_error = exc
            return
        if salvage:
            for entry in self._uncounted(index, pos, load=with_data):
                if entry.index >= start:
                    yield entry

    def entry_list(self) -> list[LogEntry]:
        return list(self.entries())

    def end_of_entries(self) -> int:
        """Byte offset after the last counted entry (validates every counted header)."""
        pos = self.sector_size
        for index in range(self.nr_entries):
            pos = self._entry_at(index, pos, counted=True, load=False, check=False).end_offset
        return pos

    def last_log_id(self) -> int | None:
        """``log_id`` of the last counted entry that carries our trailer."""
        last = None
        for entry in self.entries():
            if entry.header.trailer is not None:
                last = entry.header.trailer.log_id
        return last

    def tail(self) -> TailInfo:
        """Describe what follows the counted entries (see :class:`TailInfo`)."""
        end = self.end_of_entries()
        count = 0
        verified = True
        for entry in self._uncounted(self.nr_entries, end, load=False, plausible=True):
            count += 1
            verified = verified and entry.checksummed
            end = entry.end_offset
        trailing = max(0, self.size - end)
        if trailing and not self._all_zero(end, trailing):
            return TailInfo(
                "torn" if not count else "uncounted", count, verified, end, end, trailing
            )
        return TailInfo("uncounted" if count else "clean", count, verified, end, None, trailing)

    # -- internals ---------------------------------------------------------------------------

    def _entry_at(
        self, index: int, pos: int, *, counted: bool, load: bool, check: bool
    ) -> LogEntry:
        S = self.sector_size
        if pos + S > self.size:
            raise TruncatedLog(
                f"log ends at byte {self.size}, inside the entry header",
                entry=index,
                offset=pos,
                path=self.path,
            )
        buf = os.pread(self._fd, S, pos)
        try:
            hdr = unpack_entry_header(buf, S, entry=index, offset=pos)
        except LogFormatError as exc:
            raise type(exc)(exc.reason, entry=index, offset=pos, path=self.path) from None
        nbytes = hdr.data_bytes(S)
        if pos + S + nbytes > self.size:
            raise TruncatedLog(
                f"log ends at byte {self.size}, inside the entry's {nbytes} data bytes",
                entry=index,
                offset=pos,
                path=self.path,
            )
        data = None
        trailer = hdr.trailer
        if trailer is not None and trailer.index != index:
            raise ChecksumMismatch(
                f"stale entry: its trailer says entry {trailer.index}",
                entry=index,
                offset=pos,
                path=self.path,
            )
        if load and nbytes <= _MAX_INLINE:
            data = self._pread_exact(nbytes, pos + S, index) if nbytes else b""
        if trailer is not None and (check or not counted):
            # incremental: a chunk at a time, never the whole entry in memory
            crc = entry_crc(buf)
            if data is not None:
                crc = _continue_crc(crc, data)
            else:
                crc = self._crc_range(crc, pos + S, nbytes, index)
            if crc != trailer.crc:
                raise ChecksumMismatch(
                    f"checksum mismatch (stored {trailer.crc:#010x}, computed {crc:#010x})",
                    entry=index,
                    offset=pos,
                    path=self.path,
                )
        return LogEntry(index, pos, hdr, S, counted, self, data)

    def _uncounted(
        self, index: int, pos: int, *, load: bool, plausible: bool = False
    ) -> Iterator[LogEntry]:
        """Entries after the count: checksum-verified ones always; with ``plausible``, also
        trailer-less headers that look valid (reported, never replayed)."""
        expect_id = self.super.log_id
        while True:
            try:
                entry = self._entry_at(index, pos, counted=False, load=load, check=True)
            except LogFormatError:
                return
            t = entry.header.trailer
            if t is None:
                if not plausible or entry.flags & ~KNOWN_FLAGS:
                    return
            elif expect_id is not None and t.log_id != expect_id:
                return
            yield entry
            pos = entry.end_offset
            index += 1

    def _crc_range(self, crc: int, offset: int, length: int, index: int) -> int:
        """Continue ``crc`` over ``length`` log bytes at ``offset``, a chunk at a time through
        the reused buffer (a large entry is read once more to be verified before it is
        applied, so this pass must be cheap: no allocation or page faults per chunk)."""
        from blocktrace.logwrites.fileio import fast_crc32

        while length:
            n = min(_CHUNK, length)
            view = self._read_scratch(n, offset, index)
            if fast_crc32 is not None:
                crc = int(fast_crc32(crc, self._scratch_addr, n))
            else:
                crc = zlib.crc32(view, crc)
            offset += n
            length -= n
        return crc

    def _read_scratch(self, n: int, offset: int, index: int) -> memoryview:
        """Read ``n <= CHUNK_BYTES`` bytes at ``offset`` into the reader's one reused buffer;
        the view is valid until the next call."""
        if self._fd < 0:
            raise StateError(f"{self.path}: log reader is closed")
        if self._scratch is None:
            self._scratch = bytearray(_CHUNK)
            self._scratch_addr = ctypes.addressof(ctypes.c_char.from_buffer(self._scratch))
        view = memoryview(self._scratch)[:n]
        if os.preadv(self._fd, [view], offset) != n:
            raise TruncatedLog(
                f"short read of {n} bytes at byte {offset}",
                entry=index,
                offset=offset,
                path=self.path,
            )
        return view

    def _pread_exact(self, n: int, offset: int, index: int) -> bytes:
        if self._fd < 0:
            raise StateError(f"{self.path}: log reader is closed")
        data = os.pread(self._fd, n, offset)
        if len(data) != n:
            raise TruncatedLog(
                f"short read of {n} bytes at byte {offset}",
                entry=index,
                offset=offset,
                path=self.path,
            )
        return data

    def _all_zero(self, offset: int, length: int) -> bool:
        while length:
            n = min(_CHUNK, length)
            chunk = os.pread(self._fd, n, offset)
            if not chunk:
                return True
            if chunk.count(0) != len(chunk):
                return False
            offset += len(chunk)
            length -= len(chunk)
        return True
