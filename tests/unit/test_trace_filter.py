"""The trace guarantee, proved in process where the image can be snapshotted exactly.

Each test runs a randomized concurrent workload (several tasks standing for NBD connections,
overlapping ranges, unaligned writes, zeroes, trims, FUA, flushes) through a TraceFilter and
checks the stream against the image:

* every prefix: after the k-th operation was applied to the child, the image's hash is taken
  (inside the child, so nothing can run in between); replaying the first k data records onto
  the base must give exactly that hash;
* FLUSH placement: every write that returned before a flush was called precedes its record;
* the final image equals base + all records.
"""

from __future__ import annotations

import asyncio
import hashlib
import random

import pytest

from blocktrace.block.device import ReadableBuffer
from blocktrace.block.memory import MemoryDevice
from blocktrace.exports import Export, ExportRegistry
from blocktrace.targets.memory import MemoryTarget, replay
from blocktrace.trace import RecordKind, TraceFilter, TraceManager, TraceOptions

SIZE = 256 * 1024


class SnapshotDevice(MemoryDevice):
    """A MemoryDevice that hashes its content after every write-class operation it applies."""

    def __init__(self, size: int, *, data: bytes | None = None, suspend: int = 0) -> None:
        super().__init__(size, data=data)
        self.hashes: list[bytes] = []
        self.rng = random.Random(99)
        self.suspend = suspend  # >0: yield up to this many times before and after applying

    async def _maybe_yield(self) -> None:
        for _ in range(self.rng.randrange(self.suspend + 1) if self.suspend else 0):
            await asyncio.sleep(0)

    def _snap(self) -> None:
        self.hashes.append(hashlib.sha1(self.buf).digest())

    async def write(self, offset: int, data: ReadableBuffer, *, fua: bool = False) -> None:
        await self._maybe_yield()
        await super().write(offset, data, fua=fua)
        self._snap()
        await self._maybe_yield()  # applied, but not yet returned (a remote reply)

    async def write_zeroes(
        self,
        offset: int,
        length: int,
        *,
        may_trim: bool = False,
        fua: bool = False,
        fast: bool = False,
    ) -> None:
        await self._maybe_yield()
        await super().write_zeroes(offset, length, may_trim=may_trim, fua=fua, fast=fast)
        self._snap()
        await self._maybe_yield()  # applied, but not yet returned (a remote reply)

    async def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        await self._maybe_yield()
        await MemoryDevice.write_zeroes(self, offset, length, may_trim=True)  # one snapshot
        self._snap()
        await self._maybe_yield()  # applied, but not yet returned (a remote reply)


def make_stack(
    child: MemoryDevice, *, inline: bool | None = None
) -> tuple[TraceFilter, TraceManager]:
    filt = TraceFilter(child, inline=inline)
    reg = ExportRegistry()
    reg.add(Export("disk", filt))
    return filt, TraceManager(reg)


async def workload(
    filt: TraceFilter,
    seed: int,
    ops: int,
    *,
    tasks: int = 4,
    flushes: list[tuple[int, set[bytes]]] | None = None,
    done: set[bytes] | None = None,
    aligned_only: bool = False,
) -> None:
    """``tasks`` concurrent clients doing ``ops`` random operations each."""

    async def client(n: int) -> None:
        rng = random.Random(seed * 1000 + n)
        for _ in range(ops):
            r = rng.random()
            if aligned_only:
                off = rng.randrange(0, SIZE // 512) * 512
                ln = min(rng.randrange(1, 33) * 512, SIZE - off)
            else:
                off = rng.randrange(0, SIZE - 1)
                ln = rng.randrange(1, min(20000, SIZE - off) + 1)
            fua = rng.random() < 0.1
            if r < 0.65:
                data = rng.randbytes(ln)
                await filt.write(off, data, fua=fua)
                if done is not None:
                    done.add(data)
            elif r < 0.78:
                await filt.write_zeroes(off, ln, may_trim=rng.random() < 0.5, fua=fua)
            elif r < 0.9:
                await filt.trim(off, ln, fua=fua)
            else:
                if flushes is not None and done is not None:
                    flushes.append((filt.seq, set(done)))
                await filt.flush()
            if rng.random() < 0.3:
                await asyncio.sleep(0)

    await asyncio.gather(*(client(i) for i in range(tasks)))


async def check_prefixes(base: bytes, records: list, hashes: list[bytes]) -> None:
    """Replaying the first k data records onto base gives the image after k operations."""
    img = MemoryDevice(SIZE, data=base)
    data_records = [r for r in records if r.kind.is_data and not r.copy]
    assert len(data_records) == len(hashes)
    for k, rec in enumerate(data_records):
        await replay([rec], img)
        assert hashlib.sha1(img.buf).digest() == hashes[k], f"prefix of {k + 1} records differs"


@pytest.mark.parametrize("mode", ["background", "write-blocking"])
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_every_prefix_reproduces_the_image(mode: str, seed: int) -> None:
    async def main() -> None:
        base = random.Random(seed).randbytes(SIZE)
        child = SnapshotDevice(SIZE, data=base)
        filt, mgr = make_stack(child)
        target = MemoryTarget(alignment=512)
        trace = await mgr.start("t", "disk", target, TraceOptions.from_dict({"copy-mode": mode}))
        await workload(filt, seed, 150)
        await trace.stop()
        assert target.closed is True
        assert child.buf == await _replayed(base, target.records)
        await check_prefixes(base, target.records, child.hashes)
        assert all(r.offset % 512 == 0 and r.length % 512 == 0 for r in target.records)

    asyncio.run(main())


async def _replayed(base: bytes, records: list) -> bytearray:
    img = MemoryDevice(SIZE, data=base)
    await replay(records, img)
    return img.buf


def test_flush_record_follows_every_write_completed_before_it() -> None:
    async def main() -> None:
        child = MemoryDevice(SIZE)
        filt, mgr = make_stack(child)
        target = MemoryTarget(alignment=1)  # aligned 1: records carry the client's bytes
        trace = await mgr.start("t", "disk", target)
        flushes: list[tuple[int, set[bytes]]] = []
        done: set[bytes] = set()
        await workload(filt, 7, 200, flushes=flushes, done=done)
        await trace.stop()
        index = {r.data: i for i, r in enumerate(target.records) if r.kind is RecordKind.WRITE}
        flush_positions = [i for i, r in enumerate(target.records) if r.kind is RecordKind.FLUSH]
        assert len(flush_positions) == len(flushes) > 5
        for pos, (_, completed) in zip(flush_positions, flushes, strict=True):
            late = [d for d in completed if index[d] > pos]
            assert not late, f"{len(late)} completed writes recorded after their FLUSH"

    asyncio.run(main())


def test_suspending_child_overlapping_requests_get_one_order() -> None:
    """A child that yields before applying (like a remote device): the range lock orders
    overlapping requests; the final image still equals the replay."""

    async def main() -> None:
        base = random.Random(5).randbytes(SIZE)
        child = SnapshotDevice(SIZE, data=base, suspend=8)
        filt, mgr = make_stack(child, inline=False)
        assert not filt.inline
        target = MemoryTarget(alignment=512)
        trace = await mgr.start("t", "disk", target)
        await workload(filt, 11, 150, tasks=8, aligned_only=True)
        await trace.stop()
        assert child.buf == await _replayed(base, target.records)

    asyncio.run(main())


def test_idle_filter_forwards_and_records_nothing() -> None:
    async def main() -> None:
        child = MemoryDevice(SIZE)
        filt, _ = make_stack(child)
        await filt.write(0, b"x" * 100, fua=True)
        await filt.write_zeroes(10, 20)
        await filt.trim(4096, 4096)
        await filt.flush()
        assert filt.seq == 0 and filt.sinks == ()
        assert child.buf[:10] == b"x" * 10 and child.buf[10:30] == bytes(20)

    asyncio.run(main())
