"""Filter base class: a device that wraps exactly one child device.

As in QEMU's filter drivers and nbdkit's filters, reads and metadata queries pass through by
default.  Write-class operations (write, write-zeroes, trim, flush) do **not**: a filter must say
what it does with each of them.  This closes nbdkit's "a new method silently passes through the
filter" hazard, which for a trace filter would mean writes missing from the stream.
"""

from __future__ import annotations

import abc

from blocktrace.block.device import BlockDevice, Extent, ReadableBuffer


class Filter(BlockDevice):
    """A device layered on ``child``; properties are inherited from the child at construction."""

    def __init__(self, child: BlockDevice) -> None:
        self.child = child
        self.size = child.size
        self.read_only = child.read_only
        self.min_block_size = child.min_block_size
        self.preferred_block_size = child.preferred_block_size
        self.max_block_size = child.max_block_size
        self.can_flush = child.can_flush
        self.can_fua = child.can_fua
        self.can_trim = child.can_trim
        self.can_zero = child.can_zero
        self.can_fast_zero = child.can_fast_zero
        self.can_cache = child.can_cache
        self.can_extents = child.can_extents
        self.can_multi_conn = child.can_multi_conn

    async def read(self, offset: int, length: int) -> ReadableBuffer:
        return await self.child.read(offset, length)

    async def block_status(self, offset: int, length: int) -> list[Extent]:
        return await self.child.block_status(offset, length)

    async def cache(self, offset: int, length: int) -> None:
        await self.child.cache(offset, length)

    async def close(self) -> None:
        await self.child.close()

    # Write-class operations: deliberately abstract, never forwarded implicitly.
    @abc.abstractmethod
    async def write(self, offset: int, data: ReadableBuffer, *, fua: bool = False) -> None: ...

    @abc.abstractmethod
    async def flush(self) -> None: ...

    @abc.abstractmethod
    async def trim(self, offset: int, length: int, *, fua: bool = False) -> None: ...

    @abc.abstractmethod
    async def write_zeroes(
        self,
        offset: int,
        length: int,
        *,
        may_trim: bool = False,
        fua: bool = False,
        fast: bool = False,
    ) -> None: ...
