"""An in-memory device: a bytearray.  For unit tests of filters and targets, and benchmarks
that want to take the disk out of the picture."""

from __future__ import annotations

import errno

from blocktrace.block.device import BlockDevice, Extent, ExtentFlags, ReadableBuffer
from blocktrace.errors import BlockDeviceError


class MemoryDevice(BlockDevice):
    """``size`` bytes of RAM, initially zero.  Flush is a no-op (nothing is ever durable)."""

    applies_inline = True

    def __init__(self, size: int, *, read_only: bool = False, data: bytes | None = None) -> None:
        self.size = size
        self.read_only = read_only
        self.buf = bytearray(size) if data is None else bytearray(data.ljust(size, b"\0"))
        self.can_fast_zero = True

    async def read(self, offset: int, length: int) -> ReadableBuffer:
        return bytes(self.buf[offset : offset + length])

    async def write(self, offset: int, data: ReadableBuffer, *, fua: bool = False) -> None:
        self._check_writable()
        self.buf[offset : offset + len(data)] = data

    async def flush(self) -> None:
        pass

    async def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        await self.write_zeroes(offset, length, may_trim=True)

    async def write_zeroes(
        self,
        offset: int,
        length: int,
        *,
        may_trim: bool = False,
        fua: bool = False,
        fast: bool = False,
    ) -> None:
        self._check_writable()
        self.buf[offset : offset + length] = bytes(length)

    async def block_status(self, offset: int, length: int) -> list[Extent]:
        return [Extent(length, ExtentFlags.DATA)]

    def _check_writable(self) -> None:
        if self.read_only:
            raise BlockDeviceError(errno.EROFS, "read-only device")
