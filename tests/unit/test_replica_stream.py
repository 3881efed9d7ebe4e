"""The replica's write-blocking fast path (``start_direct``) against a device whose direct
writes complete only when the test says so: nothing after a direct write may reach the
replica while it is in flight (stream order), a failed direct write leaves its region dirty
and is resynchronised, and the record numbers stay exact."""

from __future__ import annotations

import asyncio
import errno
import os
from collections.abc import Callable
from pathlib import Path

from test_replica_target import SIZE, aio, same, setup

from blocktrace.block.device import BlockDevice, PipelinedWrites, ReadableBuffer
from blocktrace.block.file import FileDevice
from blocktrace.block.filter import Filter
from blocktrace.errors import BlockDeviceError
from blocktrace.replica.meta import load_meta
from blocktrace.targets.replica import LocalReplicaTarget
from blocktrace.trace import TraceFilter, TraceOptions
from blocktrace.trace.manager import Trace

Callback = Callable[[BaseException | None], None]


class HeldDevice(Filter, PipelinedWrites):
    """An NBD-like replica device: ``start_write`` sends now and completes when released;
    every send (direct or not) is logged in order."""

    def __init__(self, child: FileDevice) -> None:
        super().__init__(child)
        self.file = child
        self.log: list[tuple[str, int, bytes]] = []
        self.held: list[tuple[int, bytes, Callback]] = []

    def start_write(self, offset: int, data: ReadableBuffer, callback: Callback) -> bool:
        self.log.append(("direct", offset, bytes(data)))
        self.held.append((offset, bytes(data), callback))
        return True

    def release(self, error: int = 0) -> None:
        held, self.held = self.held, []
        for offset, data, callback in held:
            if error:
                callback(BlockDeviceError(error, "injected"))
            else:
                os.pwrite(self.file.fd, data, offset)
                callback(None)

    async def write(self, offset: int, data: ReadableBuffer, *, fua: bool = False) -> None:
        self.log.append(("write", offset, bytes(data)))
        await self.child.write(offset, data, fua=fua)

    async def write_many(self, items: list[tuple[int, ReadableBuffer, bool]]) -> None:
        for offset, data, fua in items:
            await self.write(offset, data, fua=fua)

    async def flush(self) -> None:
        self.log.append(("flush", 0, b""))
        await self.child.flush()

    async def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        await self.child.trim(offset, length, fua=fua)

    async def write_zeroes(
        self, offset: int, length: int, *, may_trim: bool = False, fua: bool = False, **kw: object
    ) -> None:
        await self.child.write_zeroes(offset, length, may_trim=may_trim, fua=fua)


class HeldReplica(LocalReplicaTarget):
    async def open_device(self) -> BlockDevice:
        await super().open_device()
        return HeldDevice(FileDevice(self.filename))


async def start(tmp_path: Path) -> tuple[HeldReplica, HeldDevice, TraceFilter, Trace, Path, Path]:
    filt, mgr, src = await setup(tmp_path)
    rep = tmp_path / "rep.img"
    target = HeldReplica(str(rep), reconnect_max=0.05)
    opts = TraceOptions.from_dict({"sync": "full", "copy-mode": "write-blocking"})
    trace = await mgr.start("r", "disk", target, opts)
    async with asyncio.timeout(30):
        await trace.wait_ready()
    dev = target.device
    assert isinstance(dev, HeldDevice)
    dev.log.clear()
    return target, dev, filt, trace, src, rep


async def until(cond: Callable[[], bool]) -> None:
    async with asyncio.timeout(10):
        while not cond():
            await asyncio.sleep(0)


@aio
async def test_direct_write_in_flight_holds_back_every_later_record(tmp_path: Path) -> None:
    target, dev, filt, trace, src, rep = await start(tmp_path)
    a, b, c = b"A" * 4096, b"B" * 4096, b"C" * 4096
    wa = asyncio.create_task(filt.write(0, a))
    await until(lambda: bool(dev.log))
    assert dev.log == [("direct", 0, a)]  # sent from the client's request itself
    # an overlapping write, a disjoint one and a flush queue up behind it
    wb = asyncio.create_task(filt.write(0, b))
    wc = asyncio.create_task(filt.write(8192, c))
    fl = asyncio.create_task(filt.flush())
    for _ in range(100):  # the delivery worker has every chance to send them
        await asyncio.sleep(0)
    assert dev.log == [("direct", 0, a)]  # nothing overtakes a write in flight
    assert not (wa.done() or wb.done() or wc.done() or fl.done())  # none acknowledged yet
    dev.release()
    async with asyncio.timeout(10):
        await asyncio.gather(wa, wb, wc, fl)
    assert [(kind, off) for kind, off, _ in dev.log] == [
        ("direct", 0),
        ("write", 0),
        ("write", 8192),
        ("flush", 0),
    ]
    assert target.applied_seq == filt.seq
    await trace.stop()
    await filt.close()
    assert same(src, rep)
    got = load_meta(Path(str(rep) + ".btreplica"))
    assert got is not None and got[0].consistent and got[0].applied_seq == filt.seq


@aio
async def test_failed_direct_write_degrades_and_is_resynchronised(tmp_path: Path) -> None:
    target, dev, filt, trace, src, rep = await start(tmp_path)
    data = os.urandom(4096)
    w = asyncio.create_task(filt.write(SIZE // 2, data))
    await until(lambda: bool(dev.held))
    dev.release(errno.EIO)
    async with asyncio.timeout(10):
        await w  # the client's write succeeds: the source has it, the region is dirty
    assert target.state in ("degraded", "synchronizing", "ready")
    assert target.reconnects >= 0
    await until(lambda: target.state == "ready" and target.reconnects >= 1)
    new = target.device
    assert isinstance(new, HeldDevice) and new is not dev
    # after the resync, write-blocking streams again through the fast path
    w2 = asyncio.create_task(filt.write(0, data))
    await until(lambda: bool(new.held))
    new.release()
    async with asyncio.timeout(10):
        await w2
    await trace.stop()
    await filt.close()
    assert same(src, rep)
