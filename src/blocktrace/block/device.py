"""The block-device interface every backend and filter implements.

A device is a flat array of ``size`` bytes with the operations NBD (and QEMU's block layer) need:
read, write with FUA, flush, trim, write-zeroes, block status and cache.  The NBD server serves
any device; the trace filter wraps one; the replica target writes to one.  Keeping the interface
this small is what lets a filter be one short module.

Contract, relied on by the NBD server and the trace filter:

* Callers validate ranges (``0 <= offset``, ``offset + length <= size``) before calling; a device
  may assert, but need not re-check.
* An operation that returns has been *applied*: a read issued afterwards (on any connection)
  sees it.  ``fua=True`` means it is also *durable* when it returns.  ``flush()`` makes every
  operation that returned before ``flush()`` was called durable.
* Failures raise :class:`~blocktrace.errors.BlockDeviceError` with the errno to report.
* Methods are coroutines so that remote backends and blocking trace targets fit; local backends
  complete without suspending wherever they can, which keeps the hot path cheap.
"""

from __future__ import annotations

import abc
import errno
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import IntFlag

from blocktrace.errors import BlockDeviceError

ReadableBuffer = bytes | bytearray | memoryview

MiB = 1024 * 1024


class ExtentFlags(IntFlag):
    """Allocation state of a range, with the values of NBD's ``base:allocation`` context."""

    DATA = 0
    HOLE = 1  # NBD_STATE_HOLE: unallocated
    ZERO = 2  # NBD_STATE_ZERO: reads as zeroes


@dataclass(frozen=True, slots=True)
class Extent:
    """``length`` bytes in one allocation state; extents are returned in offset order."""

    length: int
    flags: ExtentFlags


#: ``callback(None)`` once a started write completed, ``callback(exc)`` if it failed
WriteCallback = Callable[[BaseException | None], None]


class BlockDevice(abc.ABC):
    """A flat, byte-addressed disk.  Subclasses set the attributes in ``__init__``."""

    size: int
    read_only: bool = False
    #: Smallest I/O the device handles efficiently (NBD_INFO_BLOCK_SIZE minimum).
    min_block_size: int = 1
    #: I/O size that avoids read-modify-write (NBD_INFO_BLOCK_SIZE preferred).
    preferred_block_size: int = 4096
    #: Largest single request accepted (NBD_INFO_BLOCK_SIZE maximum).
    max_block_size: int = 32 * MiB
    can_flush: bool = True
    can_fua: bool = True
    can_trim: bool = True
    can_zero: bool = True
    can_fast_zero: bool = False
    can_cache: bool = True
    can_extents: bool = True
    #: Every connection shares this one object, so FLUSH on one covers writes on all.
    can_multi_conn: bool = True
    #: write, write_zeroes and trim are applied before their coroutine first suspends (a
    #: ``pwrite`` on the loop thread): nothing else runs between the call and the change,
    #: which the trace filter's ordering and the synchronous applier rely on.  FUA and
    #: ``flush`` may still suspend.
    applies_inline: bool = False

    @property
    def keeps_payloads(self) -> bool:
        """True if ``write`` keeps its data beyond returning (a traced export keeps it in a
        record): the NBD server then receives large payloads into fresh immutable ``bytes``
        the device may keep without copying, instead of a buffer it reuses."""
        return False

    @abc.abstractmethod
    async def read(self, offset: int, length: int) -> ReadableBuffer:
        """Return exactly ``length`` bytes at ``offset``."""

    @abc.abstractmethod
    async def write(self, offset: int, data: ReadableBuffer, *, fua: bool = False) -> None:
        """Write ``data`` at ``offset``; durable on return if ``fua``."""

    @abc.abstractmethod
    async def flush(self) -> None:
        """Make every operation that completed before this call durable."""

    async def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        """Discard a range (contents afterwards unspecified; backends here read back zeroes)."""
        raise BlockDeviceError(errno.EOPNOTSUPP, "trim not supported")

    async def write_zeroes(
        self,
        offset: int,
        length: int,
        *,
        may_trim: bool = False,
        fua: bool = False,
        fast: bool = False,
    ) -> None:
        """Make a range read as zeroes.

        ``may_trim`` allows deallocation (NBD: no ``NO_HOLE`` flag).  ``fast`` (NBD
        ``FAST_ZERO``) asks to fail with ENOTSUP rather than fall back to writing zeroes.
        """
        if fast:
            raise BlockDeviceError(errno.ENOTSUP, "fast zero not supported")
        chunk = bytes(min(length, 1 * MiB))
        end = offset + length
        pos = offset
        while pos < end:
            n = min(len(chunk), end - pos)
            await self.write(pos, memoryview(chunk)[:n])
            pos += n
        if fua:
            await self.flush()

    async def block_status(self, offset: int, length: int) -> list[Extent]:
        """Allocation state of ``[offset, offset+length)``; may cover less, never more."""
        return [Extent(length, ExtentFlags.DATA)]

    async def cache(self, offset: int, length: int) -> None:  # noqa: B027 - optional hint
        """Hint that a range will be read soon (NBD_CMD_CACHE); a no-op unless overridden."""

    async def close(self) -> None:  # noqa: B027 - nothing to release by default
        """Release resources.  Called once, after the last request completed."""


class PipelinedWrites(BlockDevice):
    """A device that can have many writes in flight without a task each (an NBD client: one
    send, completions from the reply handler).  A capability, declared by inheriting it."""

    @abc.abstractmethod
    async def write_many(self, items: Sequence[tuple[int, ReadableBuffer, bool]]) -> None:
        """Several non-overlapping writes ``(offset, data, fua)``, in flight together."""

    @abc.abstractmethod
    def start_write(self, offset: int, data: ReadableBuffer, callback: WriteCallback) -> bool:
        """Start one plain WRITE now, without a task or a future; ``callback`` reports its
        completion.  False, with nothing started, when it cannot go this way (use ``write``)."""
