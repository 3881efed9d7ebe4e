"""The filter's base copy racing the log sink (``attach/basecopy.py``).

The VM's file is a bytearray written the way blklogwrites does it: the data into the file
first, the entry to the log (here: the real :class:`LogSinkDevice`) after.  The copy's reads
are held open by the test, so the interleavings that matter are taken on purpose, and then
by a seeded scheduler; in every one the shadow must end equal to the file.  The first two
tests fail if the copy may write a granule an entry already reached, the third if a
granule an entry touched in part is not filled from the file first.
"""

from __future__ import annotations

import asyncio
import os
import random

import pytest

from blocktrace.attach.basecopy import (
    GRANULE,
    MAX_GRANULES,
    BaseCopy,
    CopyMap,
    granule_for,
)
from blocktrace.attach.sink import LogSinkDevice
from blocktrace.block.memory import MemoryDevice
from blocktrace.logwrites.format import LOG_WRITE_ENTRY

S = 512
G = GRANULE


class VMFile:
    """The VM's raw file plus QEMU's log writer: ``write`` puts the data in the file at
    once and returns the log entry (its position and bytes) to be delivered later."""

    def __init__(self, data: bytes) -> None:
        self.buf = bytearray(data)
        self.size = len(data)
        self.pos = S  # log position of the next entry
        #: reads in flight: (offset, length, snapshot at the start, future of the bytes)
        self.reads: list[tuple[int, int, bytes, asyncio.Future[bytes]]] = []
        self.holes: list[tuple[int, int]] = []

    def write(self, offset: int, data: bytes) -> tuple[int, bytes]:
        self.buf[offset : offset + len(data)] = data
        entry = LOG_WRITE_ENTRY.pack(offset // S, len(data) // S, 0, 0).ljust(S, b"\0") + data
        pos, self.pos = self.pos, self.pos + len(entry)
        return pos, entry

    # -- BaseSource ---------------------------------------------------------------------

    def next_data(self, pos: int) -> tuple[int, int] | None:
        for start, end in self.holes:
            if start <= pos < end:
                pos = end
        if pos >= self.size:
            return None
        stop = min([s for s, _ in self.holes if s > pos], default=self.size)
        return pos, stop

    def read_now(self, offset: int, length: int) -> bytes:
        return bytes(self.buf[offset : offset + length])

    async def read(self, offset: int, length: int) -> bytes:
        fut: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self.reads.append((offset, length, self.read_now(offset, length), fut))
        return await fut

    def finish_read(self, split: int | None = None) -> None:
        """Complete the oldest read: its first ``split`` bytes as they were when it began,
        the rest as they are now (a pread copies page after page); default: all old."""
        offset, length, old, fut = self.reads.pop(0)
        cut = length if split is None else split
        fut.set_result(old[:cut] + self.read_now(offset + cut, length - cut))


async def until(cond: object) -> None:
    for _ in range(1000):
        if callable(cond) and cond():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition never held")


def setup(data: bytes, **kw: int) -> tuple[VMFile, MemoryDevice, LogSinkDevice, BaseCopy]:
    vm = VMFile(data)
    shadow = MemoryDevice(len(data))
    sink = LogSinkDevice(shadow, S)
    base = BaseCopy(vm, shadow, **kw)
    sink.base = base
    return vm, shadow, sink, base


def test_copy_skips_a_granule_an_entry_reached_while_it_was_read() -> None:
    """The copy read granule 0 as X; the guest wrote Y there and its entry was applied
    before the read returned: the copy must not write X over Y."""

    async def main() -> None:
        vm, shadow, sink, base = setup(b"X" * (4 * G), chunk=4 * G)
        task = asyncio.create_task(base.run())
        await until(lambda: vm.reads)
        pos, entry = vm.write(0, b"Y" * G)  # the file first ...
        await sink.write(pos, entry)  # ... then the log: applied to the shadow
        vm.finish_read()  # the copy's bytes are from before the write
        await task
        assert shadow.buf == vm.buf
        assert base.stats.skipped == G and base.stats.raced == 1

    asyncio.run(main())


def test_copy_never_undoes_an_entry_applied_before_it_reached_the_granule() -> None:
    """Entries applied before the copy reached their granule (whole granules): the copy,
    reading the file later, skips them, and a later write's bytes it read early are
    rewritten by that write's entry."""

    async def main() -> None:
        vm, shadow, sink, base = setup(os.urandom(8 * G), chunk=2 * G)
        pos, entry = vm.write(5 * G, b"A" * G)
        await sink.write(pos, entry)
        task = asyncio.create_task(base.run())
        for _ in range(2):
            await until(lambda: vm.reads)
            vm.finish_read()
        await until(lambda: vm.reads)
        late = vm.write(5 * G, b"B" * G)  # in the file, entry not yet delivered
        vm.finish_read(split=0)  # the copy read granules 4-5 after it: sees B
        await until(lambda: vm.reads)
        vm.finish_read()
        await task
        assert shadow.buf[5 * G : 6 * G] == b"A" * G  # the copy skipped it
        await sink.write(*late)
        assert shadow.buf == vm.buf

    asyncio.run(main())


def test_an_entry_covering_part_of_a_granule_fills_it_from_the_file_first() -> None:
    async def main() -> None:
        data = os.urandom(4 * G)
        vm, shadow, sink, base = setup(data, chunk=G)
        pos, entry = vm.write(2 * G + 1024, b"P" * S)
        await sink.write(pos, entry)
        assert shadow.buf[2 * G : 3 * G] == vm.buf[2 * G : 3 * G]
        assert base.stats.filled == 1
        task = asyncio.create_task(base.run())
        while not task.done():
            await until(lambda: vm.reads or task.done())
            if vm.reads:
                vm.finish_read()
        await task
        assert shadow.buf == vm.buf

    asyncio.run(main())


def test_holes_and_zero_blocks_are_not_written() -> None:
    async def main() -> None:
        data = bytearray(8 * G)
        data[G + 4096 : G + 8192] = b"d" * 4096
        vm, shadow, _sink, base = setup(bytes(data), chunk=8 * G)
        vm.holes = [(2 * G, 8 * G)]
        task = asyncio.create_task(base.run())
        await until(lambda: vm.reads)
        assert vm.reads[0][:2] == (0, 2 * G)  # the hole is not read
        vm.finish_read()
        await task
        assert base.stats.written == 4096  # one non-zero 4 KiB block
        assert base.map.missing == 0
        assert shadow.buf == vm.buf

    asyncio.run(main())


@pytest.mark.parametrize("seed", range(40))
def test_random_interleavings_leave_the_shadow_equal_to_the_file(seed: int) -> None:
    """Guest writes (file first, entry later, entries delivered out of position order),
    copy reads that see the file as it was when they began, now, or torn in between: once
    every entry is in and the copy is done, shadow == file."""
    rng = random.Random(seed)

    async def main() -> None:
        size = 16 * G
        vm, shadow, sink, base = setup(rng.randbytes(size), chunk=rng.choice([G, 2 * G, 4 * G]))
        if rng.random() < 0.5:
            vm.holes = [(4 * G, 7 * G)]  # what the scan sees, even after a write there
            vm.buf[4 * G : 7 * G] = bytes(3 * G)
        task = asyncio.create_task(base.run())
        pending: list[tuple[int, bytes]] = []
        writes = 0
        while not task.done() or pending or vm.reads:
            step = rng.random()
            if step < 0.4 and writes < 120:
                writes += 1
                n = rng.choice([1, 8, 128, 256]) * S
                off = rng.randrange(0, (size - n) // S) * S
                pending.append(vm.write(off, rng.randbytes(n)))
            elif step < 0.7 and pending:
                await sink.write(*pending.pop(rng.randrange(len(pending))))
            elif vm.reads:
                length = vm.reads[0][1]
                vm.finish_read(rng.choice([0, length, rng.randrange(length + 1)]))
            await asyncio.sleep(0)
        assert base.map.missing == 0
        assert shadow.buf == vm.buf

    asyncio.run(main())


def test_copy_map_rules() -> None:
    m = CopyMap(10 * G + 100)
    assert m.granule == G and m.missing == 11
    assert m.touch(G + S, S) == [(G, 2 * G)]  # partial: fill first
    assert m.touch(3 * G, 2 * G) == []  # whole granules: nothing to fill
    assert m.touch(G, S) == []  # granule 1 holds its base now
    assert m.claim(0, 6 * G) == [(0, G), (2 * G, 3 * G), (5 * G, 6 * G)]
    assert m.touch(10 * G, 100) == []  # the short last granule, wholly covered
    m.skip(6 * G + 1, 10 * G + 100)  # granule 6 is only partly a hole
    assert m.claim(6 * G, 10 * G + 100) == [(6 * G, 7 * G)]
    assert m.missing == 0


def test_the_map_is_bounded() -> None:
    tib = 1 << 40
    g = granule_for(tib)
    assert -(-tib // g) <= MAX_GRANULES and g == 256 * 1024
    assert granule_for(256 << 30) == G
