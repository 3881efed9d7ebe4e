"""The log sink: QEMU's ``blklogwrites`` writes its dm-log-writes log into an export of ours.

The *filter* mechanism inserts QEMU's own ``blklogwrites`` filter under a running VM's disk;
its ``log`` child is an NBD export blocktrace serves with a :class:`LogSinkDevice`.  Nothing
is stored: each entry is decoded as it arrives and applied, as the guest operation it
describes, to a :class:`~blocktrace.trace.filter.TraceFilter` over a *shadow* image (a copy
of the disk made while the VM runs, :mod:`.basecopy`), so the traces of the shadow export see
exactly what they would see if blocktrace served the disk itself: every target,
``sync=full``, marks.

:class:`LogSinkDecoder` is the sans-IO core.  What QEMU 7.2 writes (reference notes,
dm-log-writes-format.md 5.3-5.6), and what the decoder does with it:

* the super block at byte 0, at intervals and on flush; several updates may race and land
  out of order (fixed in QEMU 9.0), so it is checked (magic, version, sector size) and
  otherwise ignored: entry order comes from positions, never from ``nr_entries``;
* entries from sector 1 on, each at the position QEMU reserved for it: header sector and data
  in one write, or, for a zero write, a header-only write followed by a separate
  write-zeroes of the data sectors.  Requests run concurrently, so writes arrive out of
  position order: they wait (bounded by :attr:`LogSinkDecoder.max_pending`) until every
  earlier position is filled, and are decoded in position order;
* QEMU < 9.0 reserves a zero write's data sectors only after the header write yielded, so a
  concurrent entry can be written where the zeroes were due: the decoder sees a data write
  where it expected zeroes and fails with :class:`LogSinkError` (never decodes on);
* no FUA flag and no marks exist in QEMU's entries (a guest FUA write is logged as a write
  and a FLUSH entry), so the records carry none.
"""

from __future__ import annotations

import asyncio
import errno
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Protocol

from blocktrace.block.device import BlockDevice, ReadableBuffer
from blocktrace.errors import BlockDeviceError, BlocktraceError
from blocktrace.logwrites.format import (
    LOG_WRITE_ENTRY,
    LOG_WRITE_SUPER,
    WRITE_LOG_MAGIC,
    WRITE_LOG_VERSION,
    LogFlag,
)

#: the log child's size as QEMU sees it: positions only grow, nothing is stored
SINK_SIZE = 1 << 50
_FLUSH = int(LogFlag.FLUSH)
_DISCARD = int(LogFlag.DISCARD)
_KNOWN_FLAGS = _FLUSH | _DISCARD


class LogSinkError(BlocktraceError):
    """The log QEMU wrote cannot be decoded safely (the message says why and where)."""


@dataclass(frozen=True, slots=True)
class SinkOp:
    """One guest operation decoded from an entry, in guest byte offsets."""

    kind: Literal["write", "zero", "trim", "flush"]
    offset: int = 0
    length: int = 0
    data: bytes = b""


@dataclass(frozen=True, slots=True)
class _Piece:
    zero: bool
    data: bytes
    length: int


class LogSinkDecoder:
    """Positions in, guest operations out (:attr:`ops`), in log order."""

    def __init__(self, sector_size: int = 512, *, max_pending: int = 256 << 20) -> None:
        self.sector_size = sector_size
        #: bytes of entries that arrived ahead of an unfilled earlier position
        self.max_pending = max_pending
        self.next_pos = sector_size  # entries start at sector 1
        self.entries = 0
        self.ops: deque[SinkOp] = deque()
        self._pending: dict[int, _Piece] = {}
        self._pending_bytes = 0
        #: a zero entry's (guest offset, length) whose zeroes are due at next_pos
        self._zero_due: tuple[int, int] | None = None

    def feed_write(self, offset: int, data: ReadableBuffer) -> None:
        """A log write; ``data`` may be a buffer the caller reuses (what is kept is copied).

        The common case, the next entry whole and plain (a data write, not a zero write,
        FLUSH or DISCARD), is decoded at once with one copy of its payload; everything else
        waits in position order (:meth:`_put`)."""
        s = self.sector_size
        n = len(data)
        if (
            offset == self.next_pos
            and self._zero_due is None
            and n > s
            and offset not in self._pending
        ):
            sector, nr, flags, _data_len = LOG_WRITE_ENTRY.unpack_from(data)
            if flags == 0 and n == s + nr * s:
                self.entries += 1
                self.next_pos = offset + n
                self.ops.append(SinkOp("write", sector * s, nr * s, bytes(memoryview(data)[s:])))
                if self._pending:
                    self._drain()
                return
        data = bytes(data)
        if offset == 0:
            self._check_super(data[:s])
            if n > s:
                self._put(s, _Piece(False, data[s:], n - s))
            return
        self._put(offset, _Piece(False, data, n))

    def feed_zeroes(self, offset: int, length: int) -> None:
        self._put(offset, _Piece(True, b"", length))

    def _check_super(self, sector: bytes) -> None:
        magic, version, _nr, sector_size = LOG_WRITE_SUPER.unpack_from(sector.ljust(28, b"\0"))
        if magic != WRITE_LOG_MAGIC or version != WRITE_LOG_VERSION:
            raise LogSinkError("log sink: super block written without dm-log-writes magic")
        if sector_size != self.sector_size:
            raise LogSinkError(
                f"log sink: QEMU logs {sector_size}-byte sectors, expected {self.sector_size}"
            )

    def _put(self, offset: int, piece: _Piece) -> None:
        if offset < self.next_pos or offset % self.sector_size or offset in self._pending:
            raise LogSinkError(f"log sink: write at log byte {offset} overlaps decoded entries")
        self._pending[offset] = piece
        self._pending_bytes += piece.length
        if self._pending_bytes > self.max_pending:
            raise LogSinkError(
                f"log sink: {self._pending_bytes} bytes wait behind log byte {self.next_pos}, "
                f"more than {self.max_pending}"
            )
        self._drain()

    def _take(self) -> _Piece | None:
        piece = self._pending.pop(self.next_pos, None)
        if piece is not None:
            self._pending_bytes -= piece.length
        return piece

    def _drain(self) -> None:
        s = self.sector_size
        while True:
            if self._zero_due is not None:
                guest_off, length = self._zero_due
                piece = self._pending.get(self.next_pos)
                if piece is None:
                    return
                if not piece.zero and any(piece.data):
                    raise LogSinkError(
                        f"log sink: data written at log byte {self.next_pos} where a zero "
                        "entry's zeroes were due: QEMU < 9.0 blklogwrites write-zeroes race "
                        "corrupted the log"
                    )
                if piece.length != length:
                    raise LogSinkError(
                        f"log sink: {piece.length} zero bytes at log byte {self.next_pos}, "
                        f"the entry needs {length}"
                    )
                self._take()
                self.next_pos += length
                self._zero_due = None
                self.ops.append(SinkOp("zero", guest_off, length))
                continue
            piece = self._take()
            if piece is None:
                return
            if piece.zero or piece.length < s:
                raise LogSinkError(f"log sink: no entry header at log byte {self.next_pos}")
            data = piece.data
            sector, nr, flags, _data_len = LOG_WRITE_ENTRY.unpack_from(data)
            pos = self.next_pos
            self.entries += 1
            if flags & ~_KNOWN_FLAGS:
                raise LogSinkError(f"log sink: entry at log byte {pos}: flags {flags:#x}")
            if flags & _FLUSH:
                self.ops.append(SinkOp("flush"))
                self._after(pos, piece, s)
            elif flags & _DISCARD:
                self.ops.append(SinkOp("trim", sector * s, nr * s))
                self._after(pos, piece, s)
            elif len(data) == s and nr > 0:
                self._zero_due = (sector * s, nr * s)
                self.next_pos = pos + s
            else:
                need = s + nr * s
                while len(data) < need:
                    more = self._pending.get(pos + len(data))
                    if more is None or more.zero:
                        # split by the NBD client: wait for the rest
                        self._pending[pos] = _Piece(False, data, len(data))
                        self._pending_bytes += len(data)
                        self.entries -= 1
                        return
                    self._pending.pop(pos + len(data))
                    self._pending_bytes -= more.length
                    data += more.data
                if len(data) != need:
                    raise LogSinkError(f"log sink: entry at log byte {pos}: length mismatch")
                self.ops.append(SinkOp("write", sector * s, nr * s, data[s:]))
                self.next_pos = pos + need

    def _after(self, pos: int, piece: _Piece, size: int) -> None:
        if piece.length != size:
            raise LogSinkError(f"log sink: entry at log byte {pos}: unexpected data")
        self.next_pos = pos + size


class ShadowBase(Protocol):
    """A base copy still running into the shadow (:class:`~.basecopy.BaseCopy`): told of
    every operation before the sink applies it, so the copy never writes over it."""

    def before(self, offset: int, length: int) -> None: ...


class LogSinkDevice(BlockDevice):
    """The NBD export QEMU's ``blklogwrites`` logs into; applies entries to ``shadow``.

    A log write is acknowledged once every operation it completed is applied to the shadow
    (and, for FLUSH entries, durable in every trace): so a guest flush, which QEMU completes
    only after its FLUSH entry is written, is acknowledged only when the traces hold it.

    A decoding failure applies what was decoded before it, fails that log write with EIO
    and calls ``on_error``: the traces stop at the last operation decoded, never diverge
    silently, and the session removes the filter.  Every later write is acknowledged and
    dropped (nothing is decoded or applied any more): removing the filter needs QEMU's
    ``blockdev-reopen``, which flushes through blklogwrites and so writes a FLUSH entry
    here; an EIO for it would leave the filter in place, and each guest write (whose data
    already reached the image) would fail too.
    """

    def __init__(
        self,
        shadow: BlockDevice,
        sector_size: int = 512,
        *,
        on_error: Callable[[LogSinkError], None] | None = None,
    ) -> None:
        self.size = SINK_SIZE
        #: told once, at the first decoding failure (the session then removes the filter)
        self.on_error = on_error
        self.shadow = shadow
        self.decoder = LogSinkDecoder(sector_size)
        self.min_block_size = 1
        self.can_trim = False
        self.can_fua = False
        self.can_extents = False
        self.error: LogSinkError | None = None
        #: the base copy while it runs (the filter sets and clears it)
        self.base: ShadowBase | None = None
        self._lock = asyncio.Lock()

    async def read(self, offset: int, length: int) -> ReadableBuffer:
        return bytes(length)

    async def write(self, offset: int, data: ReadableBuffer, *, fua: bool = False) -> None:
        await self._feed(lambda: self.decoder.feed_write(offset, data))

    async def write_zeroes(
        self,
        offset: int,
        length: int,
        *,
        may_trim: bool = False,
        fua: bool = False,
        fast: bool = False,
    ) -> None:
        await self._feed(lambda: self.decoder.feed_zeroes(offset, length))

    async def flush(self) -> None:
        if self.error is None:
            await self._apply()

    async def _feed(self, step: Callable[[], None]) -> None:
        if self.error is not None:
            return  # failed: dropped, see the class docstring
        try:
            step()
        except LogSinkError as exc:
            self.error = exc
            try:
                await self._apply()  # the operations decoded before the failure
            finally:
                if self.on_error is not None:
                    self.on_error(exc)
            raise BlockDeviceError(errno.EIO, str(exc)) from None
        await self._apply()

    def _before(self, base: ShadowBase, op: SinkOp) -> None:
        """Tell the base copy an operation is about to be applied (it may fill a granule
        from the disk's file first).  A file that cannot be read fails the sink as a
        decoding failure does: nothing is applied without its base."""
        try:
            base.before(op.offset, op.length)
        except OSError as exc:
            err = LogSinkError(
                f"log sink: reading the disk's base under [{op.offset}, +{op.length}): "
                f"{exc.strerror or exc}"
            )
            self.decoder.ops.clear()
            if self.error is None:
                self.error = err
                if self.on_error is not None:
                    self.on_error(err)
            raise BlockDeviceError(errno.EIO, str(err)) from None

    async def _apply(self) -> None:
        """Apply decoded operations in log order: whoever holds the lock drains the queue,
        so a caller that decoded later never applies before one that decoded earlier."""
        async with self._lock:
            ops = self.decoder.ops
            while ops:
                op = ops.popleft()
                if self.base is not None and op.kind != "flush":
                    self._before(self.base, op)
                if op.kind == "write":
                    await self.shadow.write(op.offset, op.data)
                elif op.kind == "zero":
                    await self.shadow.write_zeroes(op.offset, op.length)
                elif op.kind == "trim":
                    await self.shadow.trim(op.offset, op.length)
                else:
                    await self.shadow.flush()
