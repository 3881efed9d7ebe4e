"""Getting a log writer's bytes onto the log file, fast and safely (the writer's I/O layer).

Design
------
:class:`~blocktrace.logwrites.writer.LogWriter` decides *what* goes into the log and *when*
it becomes durable; this module only writes a batch of buffers at a byte position, so the
entry and durability logic stays readable and the I/O tricks stay in one place:

* :class:`LogFile` writes a batch with O_DIRECT where the file system allows it: buffers are
  copied into one page-aligned staging buffer (a multiple of every sector size, so every write
  starts and ends on a sector boundary) and written in large pieces; no page-cache copy and no
  write-back burst at ``fdatasync`` (measured about 2x faster for 1 MiB entries here).  Memory
  that is already page-aligned (the writer's packing buffer) is written as is, and large
  ``bytes`` payloads are copied with ``ctypes.memmove``, which releases the GIL so the event
  loop runs on meanwhile.  Where O_DIRECT is refused (tmpfs, EINVAL on first write) it falls
  back for good to one buffered ``pwritev`` per ``IOV_MAX`` buffers, continuing short writes.
* :class:`PackBuffer` is that page-aligned packing memory: the writer's batch fast path packs
  small entries (header then data) into it, and pieces handed to one batch are coalesced so
  they go out as one large write.
* :data:`fast_crc32` is libdeflate's CRC-32 through ctypes where installed: the same CRC as
  zlib's, 3-10x faster and computed without the GIL; it is checked against zlib at load time.
* :func:`fsync_dir` makes a new log's directory entry durable.

Errors are raised as ``OSError``; the writer turns them into its sticky failed state.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import mmap
import os
import stat
import struct
from collections.abc import Callable
from typing import Protocol, cast
from zlib import crc32

log = logging.getLogger(__name__)

Buffer = bytes | bytearray | memoryview

MAX_IOV = 1024  # Linux IOV_MAX
#: O_DIRECT staging buffer (a multiple of every sector size; larger writes, fewer of them)
STAGE_BYTES = 8 * 1024 * 1024
#: payloads at least this large are copied into the O_DIRECT stage with the GIL released
MEMMOVE_MIN = 64 * 1024
#: :class:`PackBuffer` size (small entries, header + data contiguous)
PACK_BYTES = 8 * 1024 * 1024
#: a large payload is CRC'd and staged in pieces of this size, each copied while the CRC has
#: just brought it into the cache (fits the L2 of the CPUs measured)
FUSE_CHUNK = 256 * 1024
_memmove = ctypes.memmove
_pack_crc = struct.Struct("<I").pack_into


class OpenHeader(bytearray):
    """A large data entry's header sector whose CRC is not filled in yet.

    In a batch it is always followed by its entry's data.  The CRC covers this sector (CRC
    field zero) and then the data; :class:`LogFile` computes it while staging the data for
    O_DIRECT, piece by piece, so each piece is read from memory once (CRC) and copied from the
    cache (a separate CRC pass and copy read every payload twice: measured the writer's
    largest cost per MiB here, memory bandwidth being what a VM is short of).  Any other path
    seals it first (:meth:`seal`)."""

    __slots__ = ("crc_at",)

    def __init__(self, size: int, crc_at: int) -> None:
        super().__init__(size)
        self.crc_at = crc_at  #: offset of the CRC field in the sector

    def seal(self, data: Buffer) -> None:
        """Fill in the CRC of this sector + ``data`` (idempotent)."""
        _pack_crc(self, self.crc_at, 0)
        crc = crc32(self)
        if fast_crc32 is not None and type(data) is bytes:
            crc = fast_crc32(crc, data, len(data))
        else:
            crc = crc32(data, crc)
        _pack_crc(self, self.crc_at, crc)


class WriteCounter(Protocol):
    """Where :class:`LogFile` counts its write calls (the writer's ``WriterStats``)."""

    writes: int


class LogFile:
    """Write batches of sector-aligned buffers to an open log file descriptor.

    ``fd`` stays owned by the caller until :meth:`close`; with ``direct=True`` a second,
    O_DIRECT descriptor and the staging buffer are opened here if the file system allows it.
    """

    def __init__(
        self, fd: int, path: str, sector_size: int, stats: WriteCounter, *, direct: bool
    ) -> None:
        self.fd = fd
        self.path = path
        self.sector_size = sector_size
        self.stats = stats
        self._dfd: int | None = None  # O_DIRECT descriptor, if direct I/O works here
        self._stage: mmap.mmap | None = None  # page-aligned staging buffer for O_DIRECT
        self._stage_addr = 0
        if direct:
            self._open_direct()

    @property
    def direct(self) -> bool:
        """True while writes go through O_DIRECT (falls back to buffered on EINVAL)."""
        return self._dfd is not None

    def write(self, bufs: list[Buffer], pos: int, *, aligned: mmap.mmap | None = None) -> int:
        """Write ``bufs`` back to back at byte ``pos``; return the new end position.

        ``aligned`` is a page-aligned buffer (an ``mmap``) whose memoryviews are written
        without a staging copy.  Raises ``OSError``; a direct write refused with EINVAL is
        retried (idempotently) through the page cache, which is used from then on."""
        if self._dfd is not None:
            try:
                return self._write_direct(bufs, pos, aligned)
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                # This file system refuses our alignment: rewrite the batch (idempotent)
                # through the page cache from now on.
                log.info("%s: O_DIRECT refused (%s); using buffered appends", self.path, exc)
                self._close_direct()
        for i, b in enumerate(bufs):
            if type(b) is OpenHeader:
                b.seal(bufs[i + 1])
        for start in range(0, len(bufs), MAX_IOV):
            chunk: list[Buffer] = bufs[start : start + MAX_IOV]
            want = sum(len(b) for b in chunk)
            while want:
                n = os.pwritev(self.fd, chunk, pos)
                self.stats.writes += 1
                if n == 0:
                    raise OSError(errno.EIO, "pwritev wrote nothing")
                pos += n
                want -= n
                if want:
                    chunk = advance(chunk, n)
        return pos

    def close(self) -> None:
        """Close ``fd`` and the O_DIRECT machinery."""
        os.close(self.fd)
        self._close_direct()

    def _open_direct(self) -> None:
        if not hasattr(os, "O_DIRECT") or self.sector_size > STAGE_BYTES:
            return
        try:
            if not stat.S_ISREG(os.fstat(self.fd).st_mode):
                return
            # reopen the file ``fd`` is open on, not whatever ``path`` names by now (it may
            # have been replaced by a symlink since the checked open)
            self._dfd = os.open(
                f"/proc/self/fd/{self.fd}", os.O_WRONLY | os.O_DIRECT | os.O_CLOEXEC
            )
        except OSError:
            return  # tmpfs and friends: buffered appends
        self._stage = mmap.mmap(-1, STAGE_BYTES)
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

    def _write_direct(self, bufs: list[Buffer], pos: int, aligned: mmap.mmap | None) -> int:
        """Copy the batch through the aligned staging buffer into O_DIRECT writes.

        Every buffer is a whole number of sectors and the stage is too, so every write
        starts and ends on a sector boundary.  Returns the new end position."""
        stage = self._stage
        assert stage is not None and self._dfd is not None
        cap = len(stage)
        fill = 0
        i = 0
        count = len(bufs)
        while i < count:
            b = bufs[i]
            i += 1
            if type(b) is OpenHeader:
                data = bufs[i]
                need = len(b) + len(data)
                if type(data) is not bytes or need > cap:
                    b.seal(data)  # staged below as ordinary buffers
                else:
                    if fill + need > cap:  # the whole entry in one stage: its CRC goes in last
                        pos = self._direct_out(fill, pos)
                        fill = 0
                    fill = self._stage_sealed(b, data, fill)
                    i += 1
                    continue
            if aligned is not None and isinstance(b, memoryview) and b.obj is aligned:
                # packed entries already sit in page-aligned memory: no staging copy
                if fill:
                    pos = self._direct_out(fill, pos)
                    fill = 0
                pos = self._direct_write(b, pos)
                continue
            if type(b) is bytes and len(b) >= MEMMOVE_MIN:
                # a large payload: copy it without holding the GIL (ctypes releases it), so
                # the event loop runs on while this thread copies
                src = bytes_address(b)
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

    def _stage_sealed(self, header: OpenHeader, data: bytes, fill: int) -> int:
        """Stage ``header`` + ``data`` at ``fill`` (they fit), computing the header's CRC in
        the same pass over the data; returns the new fill."""
        stage = self._stage
        assert stage is not None
        hpos = fill
        S = len(header)
        _pack_crc(header, header.crc_at, 0)
        stage[fill : fill + S] = header
        fill += S
        crc = crc32(header)
        n = len(data)
        fast = fast_crc32
        if fast is None:
            crc = crc32(data, crc)
        src = bytes_address(data)
        dst = self._stage_addr
        off = 0
        while off < n:  # ctypes releases the GIL for each call
            k = min(FUSE_CHUNK, n - off)
            if fast is not None:
                crc = fast(crc, src + off, k)
            _memmove(dst + fill, src + off, k)
            fill += k
            off += k
        _pack_crc(stage, hpos + header.crc_at, crc)
        return fill

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
            m = os.pwrite(self.fd, view[n:], pos + n)
            if m <= 0:
                raise OSError(errno.EIO, "pwrite wrote nothing")
            n += m
        return pos + size


class PackBuffer:
    """A reusable page-aligned buffer that small entries are packed into (header then data).

    Being page-aligned, :meth:`LogFile.write` writes its pieces with O_DIRECT without a
    staging copy.  Pieces handed to a batch stay referenced until the batch is written out;
    then :meth:`reset` makes the whole buffer free again (no allocation, no zero-fill)."""

    def __init__(self) -> None:
        self.mem: mmap.mmap | None = None  # allocated on first use
        self._view = memoryview(b"")
        self.fill = 0  # bytes of mem referenced by the pending batch
        #: (index in the batch, start, end) of the last piece of mem handed to the batch
        self._last: tuple[int, int, int] | None = None

    @property
    def room(self) -> int:
        """Bytes that still fit before :meth:`reserve` falls back to a fresh buffer."""
        return PACK_BYTES - self.fill

    def reserve(self, total: int) -> tuple[mmap.mmap | bytearray, memoryview, int]:
        """Room for ``total`` bytes: ``(buffer, its view, start offset)``; a new ``bytearray``
        when the packing buffer is too full."""
        pos = self.fill
        if pos + total <= PACK_BYTES:
            if self.mem is None:
                self.mem = mmap.mmap(-1, PACK_BYTES)
                self._view = memoryview(self.mem)
            self.fill = pos + total
            return self.mem, self._view, pos
        chunk = bytearray(total)
        return chunk, memoryview(chunk), 0

    def add_to(
        self, pending: list[Buffer], view: memoryview, start: int, end: int, chunk: object
    ) -> None:
        """Hand packed bytes ``[start, end)`` of ``chunk`` to the batch ``pending``, extending
        the previous piece of the packing buffer when it ends at ``start`` (one large write
        instead of many)."""
        last = self._last
        if (
            chunk is self.mem
            and last is not None
            and last[0] == len(pending) - 1
            and last[2] == start
        ):
            pending[-1] = view[last[1] : end]
            self._last = (last[0], last[1], end)
            return
        pending.append(view[start:end])
        self._last = (len(pending) - 1, start, end) if chunk is self.mem else None

    def reset(self) -> None:
        """The batch was written out: nothing references the buffer any more."""
        self.fill = 0
        self._last = None


def load_fast_crc32() -> Callable[[int, int | bytes, int], int] | None:
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
fast_crc32 = None if os.environ.get("BLOCKTRACE_NO_LIBDEFLATE") else load_fast_crc32()


def bytes_address(b: bytes) -> int:
    """Address of a bytes object's data (valid while ``b`` is alive; it is never written)."""
    addr = ctypes.cast(ctypes.c_char_p(b), ctypes.c_void_p).value
    assert addr is not None
    return addr


def advance(bufs: list[Buffer], n: int) -> list[Buffer]:
    """Drop the first ``n`` bytes from a list of buffers (after a short ``pwritev``)."""
    out: list[Buffer] = []
    for b in bufs:
        if n >= len(b):
            n -= len(b)
            continue
        out.append(memoryview(b)[n:] if n else b)
        n = 0
    return out


def fsync_dir(path: str) -> None:
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


__all__ = [
    "MAX_IOV",
    "PACK_BYTES",
    "Buffer",
    "LogFile",
    "OpenHeader",
    "PackBuffer",
    "WriteCounter",
    "advance",
    "bytes_address",
    "fast_crc32",
    "fsync_dir",
    "load_fast_crc32",
]
