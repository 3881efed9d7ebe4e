"""An in-memory target: keeps every record in a list.

For unit tests and for consumers inside the process (tests replay it onto a MemoryDevice and
compare).  ``fail_after`` injects a target failure after that many records, as QEMU's blkdebug
does for the copy-before-write iotest; ``gate`` lets a test hold delivery until it opens.
"""

from __future__ import annotations

import asyncio
import errno
import os
from collections.abc import Sequence
from typing import Any

from blocktrace.block.device import BlockDevice
from blocktrace.errors import TargetError
from blocktrace.stream.apply import apply_records
from blocktrace.stream.contract import Target, TargetInfo
from blocktrace.stream.records import Record


class MemoryTarget(Target):
    """Records in a list; ``durable_count`` tells how many a "crash" would keep."""

    def __init__(
        self, *, alignment: int = 1, fail_after: int | None = None, fail_errno: int = errno.ENOSPC
    ) -> None:
        self.name = "memory"
        self._alignment = alignment
        self.records: list[Record] = []
        self.durable_count = 0
        self.fail_after = fail_after
        self.fail_errno = fail_errno
        self.info: TargetInfo | None = None
        self.closed: bool | None = None  # None: open; else the ``clean`` flag of close
        self.gate = asyncio.Event()
        self.gate.set()
        self.deliveries = 0

    @property
    def alignment(self) -> int:
        return self._alignment

    async def open(self, info: TargetInfo) -> None:
        self.info = info

    async def deliver(self, records: Sequence[Record]) -> None:
        await self.gate.wait()
        self.deliveries += 1
        for rec in records:
            if self.fail_after is not None and len(self.records) >= self.fail_after:
                raise TargetError(self.name, os.strerror(self.fail_errno)) from OSError(
                    self.fail_errno, os.strerror(self.fail_errno)
                )
            self.records.append(rec)

    async def make_durable(self) -> None:
        self.durable_count = len(self.records)

    async def close(self, *, clean: bool) -> None:
        self.closed = clean

    def settings(self) -> dict[str, Any]:
        return super().settings() or {"type": "memory"}

    def status(self) -> dict[str, Any]:
        return {"records": len(self.records)}


async def replay(records: Sequence[Record], device: BlockDevice) -> int:
    """Apply the data records to ``device`` in order (the stream's one applier, FLUSH records
    skipped: nothing here is durable); returns how many were applied."""
    return await apply_records(device, (r for r in records if r.kind.is_data))
