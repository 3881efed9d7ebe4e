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
from concurrent.futures import Future, ThreadPoolExecutor
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
        self._executor: ThreadPoolExecutor | None = None  # writes one half of the stage
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
            self._dfd = os.open(self.path, os.O_WRONLY | os.O_DIRECT | os.O_CLOEXEC)
        except OSError:
            return  # tmpfs and friends: buffered appends
        self._stage = mmap.mmap(-1, STAGE_BYTES)
        # its address, for GIL-free copies (valid while the mapping is open)
        self._stage_addr = ctypes.addressof(ctypes.c_char.from_buffer(self._stage))

    def _close_direct(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        if self._dfd is not None:
            os.close(self._dfd)
            self._dfd = None
        if self._stage is not None:
            self._stage_addr = 0
            self._stage.close()
            self._stage = None

    def _write_direct(self, bufs: list[Buffer], pos: int, aligned: mmap.mmap | None) -> int:
        """Copy the batch through the aligned staging buffer into O_DIRECT writes.

        Every buffer is a whole number of sectors and so is each half of the stage, so every
        write starts and ends on a sector boundary.  Returns the new end position; every
        write has completed when this returns or raises."""
        st = _Stager(self, pos)
        try:
            i = 0
            count = len(bufs)
            while i < count:
                b = bufs[i]
                i += 1
                if type(b) is OpenHeader:
                    data = bufs[i]
                    if type(data) is bytes and len(b) + len(data) <= st.half:
                        st.entry(b, data)
                        i += 1
                        continue
                    b.seal(data)  # staged below as ordinary buffers
                if aligned is not None and isinstance(b, memoryview) and b.obj is aligned:
                    # packed entries already sit in page-aligned memory: no staging copy
                    st.write_aligned(b)
                elif type(b) is bytes and len(b) >= MEMMOVE_MIN:
                    st.copy_bytes(b)
                else:
                    st.copy(memoryview(b).cast("B") if isinstance(b, memoryview) else memoryview(b))
            return st.finish()
        except BaseException:
            st.drain()
            raise

    def _io(self) -> ThreadPoolExecutor:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="log-io")
        return self._executor

    def _write_stage(self, start: int, nbytes: int, pos: int) -> None:
        """Write ``stage[start:start+nbytes]`` at ``pos`` (runs in the I/O thread)."""
        assert self._stage is not None
        with memoryview(self._stage) as whole, whole[start : start + nbytes] as view:
            self._pwrite_direct(view, pos)

    def _direct_write(self, view: memoryview, pos: int) -> int:
        """One O_DIRECT write of aligned memory at ``pos``; returns the new end position."""
        self.stats.writes += 1
        return self._pwrite_direct(view, pos)

    def _pwrite_direct(self, view: memoryview, pos: int) -> int:
        assert self._dfd is not None
        size = view.nbytes
        n = os.pwrite(self._dfd, view, pos)
        while n < size:  # a short direct write: finish through the page cache
            m = os.pwrite(self.fd, view[n:], pos + n)
            if m <= 0:
                raise OSError(errno.EIO, "pwrite wrote nothing")
            n += m
        return pos + size


class _Stager:
    """One batch's trip through the O_DIRECT stage, in two halves: while the I/O thread writes
    a full half, the caller fills the other one (copies and CRCs overlap the disk's work; the
    log's appends are otherwise strictly copy, write, copy, write).

    A large entry whose CRC is still open (:class:`OpenHeader`) is CRC'd while it is copied;
    it is at most a half long, so it spans at most two halves, and the half holding its
    header is written only once the CRC is patched in.  Every write is waited for before the
    batch returns (or raises), so the caller's durability logic sees a plain synchronous
    write of the batch."""

    def __init__(self, f: LogFile, pos: int) -> None:
        assert f._stage is not None and f._dfd is not None
        self.f = f
        self.stage = f._stage
        self.addr = f._stage_addr
        self.half = len(self.stage) // 2
        self.cur = 0  # the half being filled
        self.fill = 0  # bytes in it
        self.start = pos  # file position of its first byte
        self.futs: list[Future[None] | None] = [None, None]  # each half's write in flight
        self.held: tuple[int, int, int] | None = None  # (half, bytes, pos) awaiting a CRC

    def _submit(self, h: int, nbytes: int, pos: int) -> None:
        self.futs[h] = self.f._io().submit(self.f._write_stage, h * self.half, nbytes, pos)
        self.f.stats.writes += 1

    def next_half(self, *, hold: bool = False) -> None:
        """The current half is complete: write it (``hold``: later, once the open entry's CRC
        is in) and continue in the other half, once that one's previous write is done."""
        if self.fill:
            if hold:
                self.held = (self.cur, self.fill, self.start)
            else:
                self._submit(self.cur, self.fill, self.start)
        self.start += self.fill
        self.cur ^= 1
        self.fill = 0
        fut, self.futs[self.cur] = self.futs[self.cur], None
        if fut is not None:
            fut.result()

    def copy_bytes(self, b: bytes) -> None:
        """Stage a large payload, copied without the GIL (ctypes releases it)."""
        src = bytes_address(b)
        off, n = 0, len(b)
        while off < n:
            if self.fill == self.half:
                self.next_half()
            take = min(self.half - self.fill, n - off)
            _memmove(self.addr + self.cur * self.half + self.fill, src + off, take)
            self.fill += take
            off += take

    def copy(self, mv: memoryview) -> None:
        off, n = 0, len(mv)
        while off < n:
            if self.fill == self.half:
                self.next_half()
            take = min(self.half - self.fill, n - off)
            at = self.cur * self.half + self.fill
            self.stage[at : at + take] = mv[off : off + take]
            self.fill += take
            off += take

    def entry(self, header: OpenHeader, data: bytes) -> None:
        """Stage an entry (it fits a half), computing its CRC in the same pass over the data,
        in cache-sized pieces."""
        S = len(header)
        if self.half - self.fill < S:
            self.next_half()
        hhalf = self.cur
        hpos = hhalf * self.half + self.fill
        _pack_crc(header, header.crc_at, 0)
        self.stage[hpos : hpos + S] = header
        self.fill += S
        crc = crc32(header)
        fast = fast_crc32
        if fast is None:
            crc = crc32(data, crc)
        src = bytes_address(data)
        off, n = 0, len(data)
        while off < n:
            if self.fill == self.half:
                assert self.cur == hhalf  # the entry fits a half: it spans two at most
                self.next_half(hold=True)
            k = min(FUSE_CHUNK, n - off, self.half - self.fill)
            if fast is not None:
                crc = fast(crc, src + off, k)
            _memmove(self.addr + self.cur * self.half + self.fill, src + off, k)
            self.fill += k
            off += k
        _pack_crc(self.stage, hpos + header.crc_at, crc)
        if self.held is not None:
            h, nbytes, pos = self.held
            self.held = None
            self._submit(h, nbytes, pos)

    def write_aligned(self, view: memoryview) -> None:
        """Write page-aligned memory in place, after what is staged so far."""
        if self.fill:
            self.next_half()
        self.start = self.f._direct_write(view, self.start)

    def finish(self) -> int:
        """Write the rest, wait for every write; return the end position."""
        if self.fill:
            self._submit(self.cur, self.fill, self.start)
            self.start += self.fill
            self.fill = 0
        for h in (0, 1):
            fut, self.futs[h] = self.futs[h], None
            if fut is not None:
                fut.result()
        return self.start

    def drain(self) -> None:
        """After an error: wait for the writes in flight (their errors are secondary)."""
        for h in (0, 1):
            fut, self.futs[h] = self.futs[h], None
            if fut is not None:
                try:
                    fut.result()
                except BaseException:
                    log.debug("log write failed after an earlier error", exc_info=True)


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
