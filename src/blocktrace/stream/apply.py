"""The one applier of records to a block device: replay, replicas, tests all use it.

Meaning of each kind on a :class:`~blocktrace.block.device.BlockDevice`:

=========  ==========================================================================
WRITE      ``write(offset, data, fua=fua)``
ZERO       ``write_zeroes(offset, length, fua=fua)``
TRIM       ``write_zeroes(offset, length, may_trim=True, fua=fua)``: every blocktrace
           source reads a trimmed range back as zeroes, so a copy must too (a plain
           discard could leave old data and the copy would silently differ)
FLUSH      ``flush()``
MARK       nothing
=========  ==========================================================================

Three ways in, one meaning:

* :func:`apply_record` / :func:`apply_records`: one at a time, in order (await each).
* :func:`apply_group`: records that do not overlap, applied together: one by one on devices
  that apply inline (no task would help), pipelined in one send on devices with
  :class:`~blocktrace.block.device.PipelinedWrites` (NBD), tasks otherwise.
* :func:`apply_inline`: synchronously, for devices that declare
  :attr:`~blocktrace.block.device.BlockDevice.applies_inline` (a raw file): used by the
  synchronous ``replay`` command.  FUA is left to the caller there (it syncs once at the end).
  :func:`write_inline` is its WRITE of a buffer the caller reuses (a log reader's chunk):
  written before it returns, so it needs no record owning a copy of the data.

Range checks are the caller's, as for every device call (the device contract).
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Iterable, Sequence
from typing import Any

from blocktrace.block.device import BlockDevice, PipelinedWrites, ReadableBuffer
from blocktrace.stream.records import Record, RecordKind

WRITE = RecordKind.WRITE
ZERO = RecordKind.ZERO
TRIM = RecordKind.TRIM
FLUSH = RecordKind.FLUSH


async def apply_record(dev: BlockDevice, rec: Record, *, fua: bool | None = None) -> bool:
    """Apply ``rec`` to ``dev``; True if it changed the device (a data record).  ``fua``
    overrides the record's flag (None: keep it)."""
    kind = rec.kind
    f = rec.fua if fua is None else fua
    if kind is WRITE:
        assert rec.data is not None
        await dev.write(rec.offset, rec.data, fua=f)
    elif kind is ZERO:
        await dev.write_zeroes(rec.offset, rec.length, fua=f)
    elif kind is TRIM:
        await dev.write_zeroes(rec.offset, rec.length, may_trim=True, fua=f)
    elif kind is FLUSH:
        await dev.flush()
        return False
    else:
        return False
    return True


async def apply_records(dev: BlockDevice, records: Iterable[Record]) -> int:
    """Apply ``records`` in order; returns how many data records were applied."""
    n = 0
    for rec in records:
        if await apply_record(dev, rec):
            n += 1
    return n


async def apply_group(dev: BlockDevice, group: Sequence[Record]) -> None:
    """Apply data records that do not overlap each other, as concurrently as ``dev`` allows.

    Raises the first failure (the others may or may not have been applied: the caller marks
    the whole group's ranges as unknown).
    """
    if len(group) == 1 or dev.applies_inline:
        # each write is applied before its coroutine returns: in order, and concurrency
        # would only add tasks
        for rec in group:
            await apply_record(dev, rec)
        return
    if isinstance(dev, PipelinedWrites) and all(r.kind is WRITE for r in group):
        # one send for the whole group: no task per record
        await dev.write_many([(r.offset, r.data or b"", r.fua) for r in group])
        return
    results = await asyncio.gather(*(apply_record(dev, r) for r in group), return_exceptions=True)
    for res in results:
        if isinstance(res, BaseException):
            raise res


def apply_inline(dev: BlockDevice, rec: Record) -> bool:
    """Apply a data record synchronously on a device that applies inline (FUA ignored: the
    caller makes the device durable).  True if it changed the device; FLUSH/MARK do nothing.

    Drives the device's coroutine by hand: a device declaring ``applies_inline`` finishes
    write/zero/trim without suspending, and a device that broke that promise is an error, not
    a hang.
    """
    if not rec.kind.is_data:
        return False
    if not dev.applies_inline:
        raise TypeError(f"{type(dev).__name__} does not apply operations inline")
    _run_inline(apply_record(dev, rec, fua=False))
    return True


def write_inline(dev: BlockDevice, offset: int, data: ReadableBuffer) -> None:
    """A WRITE applied synchronously on a device that applies inline, from a buffer the
    caller may reuse as soon as this returns (the device has written it by then).  What
    ``replay`` streams a large entry's payload through, one ``CHUNK_BYTES`` piece at a time,
    without a copy per piece."""
    if not dev.applies_inline:
        raise TypeError(f"{type(dev).__name__} does not apply operations inline")
    _run_inline(dev.write(offset, data))


def _run_inline(coro: Coroutine[Any, Any, Any]) -> None:
    try:
        coro.send(None)
    except StopIteration:
        return
    coro.close()
    raise RuntimeError("an inline device operation suspended")
