"""Trace faults in process, exact and timing-free (issue #10): what shutdown does to writes
that wait behind a stuck trace, and what a failed start leaves behind.

The stack is the real TraceFilter and TraceManager over a MemoryDevice, with MemoryTarget
(whose ``gate`` holds delivery, as a stuck or paused target would).
"""

from __future__ import annotations

import asyncio
import errno
from collections.abc import Awaitable, Callable

import pytest

from blocktrace.block.memory import MemoryDevice
from blocktrace.errors import BlockDeviceError, TargetError
from blocktrace.exports import Export, ExportRegistry
from blocktrace.stream.contract import TargetInfo
from blocktrace.targets.memory import MemoryTarget, replay
from blocktrace.trace import TraceFilter, TraceManager, TraceOptions

MiB = 1024 * 1024
SIZE = 8 * MiB


def stack() -> tuple[MemoryDevice, TraceFilter, TraceManager]:
    child = MemoryDevice(SIZE)
    filt = TraceFilter(child)
    reg = ExportRegistry()
    reg.add(Export("disk", filt))
    return child, filt, TraceManager(reg)


def run(coro: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(coro())  # type: ignore[arg-type]


async def settle() -> None:
    for _ in range(50):
        await asyncio.sleep(0)


def test_shutdown_refuses_writes_waiting_behind_a_stuck_trace() -> None:
    """#10 item 11: a write waiting for queue space when shutdown gives up fails with
    ESHUTDOWN and never reaches the image, even once its trace is stopped and detached
    (before the fix, the space granted after the detach let it through, untraced)."""

    async def main() -> None:
        child, filt, mgr = stack()
        target = MemoryTarget()
        opts = TraceOptions.from_dict({"copy-mode": "background", "queue-size": "1M"})
        trace = await mgr.start("t", "disk", target, opts)
        target.gate.clear()  # the target is stuck
        await filt.write(0, b"\x01" * (1 * MiB))  # fills the queue
        blocked = asyncio.create_task(filt.write(2 * MiB, b"\x02" * 65536))
        await settle()
        assert not blocked.done()  # backpressure: waiting for space, not applied
        mgr.refuse_unapplied()
        with pytest.raises(BlockDeviceError) as info:
            await blocked
        assert info.value.errno == errno.ESHUTDOWN
        with pytest.raises(BlockDeviceError):  # and so is anything after it
            await filt.write(4 * MiB, b"\x03" * 4096)
        target.gate.set()
        await trace.stop()
        assert child.buf[2 * MiB : 2 * MiB + 65536] == bytes(65536)
        img = MemoryDevice(SIZE)
        await replay(target.records, img)
        assert img.buf == child.buf  # the log and the image agree

    run(main)


class FailsOnceAttached(MemoryTarget):
    """A target whose start fails after the filter attached it (as introspect's watcher)."""

    def attached(self) -> None:
        raise TargetError(self.name, "not an ext4 file system")


class FailsToOpen(MemoryTarget):
    async def open(self, info: TargetInfo) -> None:
        raise TargetError(self.name, "cannot open")


@pytest.mark.parametrize("target_type", [FailsOnceAttached, FailsToOpen])
def test_failed_start_leaves_the_filter_as_before(target_type: type[MemoryTarget]) -> None:
    """#10 item 13, in process: writes and FLUSH are answered, no sink stays attached."""

    async def main() -> None:
        child, filt, mgr = stack()
        with pytest.raises(TargetError):
            await mgr.start("bad", "disk", target_type())
        assert filt.sinks == () and mgr.list() == []
        await filt.write(0, b"x" * 4096)
        await asyncio.wait_for(filt.flush(), 10)  # a dead sink never answered this
        assert child.buf[:4096] == b"x" * 4096

    run(main)


@pytest.mark.parametrize("policy", ["report", "break"])
def test_close_abandons_a_target_that_does_not_answer(policy: str) -> None:
    """#10 item 12: shutdown's trace stop is bounded; a stuck target is abandoned, its trace
    concludes with the reason, and the client waiting on it gets an error, not a hang."""

    async def main() -> None:
        _, filt, mgr = stack()
        target = MemoryTarget()
        opts = TraceOptions.from_dict({"copy-mode": "write-blocking", "on-target-error": policy})
        trace = await mgr.start("t", "disk", target, opts)
        target.gate.clear()  # the target stops answering
        waiting = asyncio.create_task(filt.write(0, b"\x01" * 4096))
        await settle()
        assert not waiting.done()
        await asyncio.wait_for(mgr.close(timeout=0.05), 30)  # bound against a hang
        assert trace.concluded and mgr.list() == [] and filt.sinks == ()
        assert trace.error is not None and "did not stop" in trace.error
        if policy == "report":
            with pytest.raises(BlockDeviceError):
                await waiting
        else:  # break: target errors never reach clients; the write was applied, answered
            await asyncio.wait_for(waiting, 10)

    run(main)


class HalfWrites(MemoryDevice):
    """Writes the first half of each write, then fails ENOSPC; reads fail EIO when asked."""

    unreadable = False

    async def write(self, offset: int, data: object, *, fua: bool = False) -> None:
        half = bytes(data)[: len(bytes(data)) // 2]  # type: ignore[call-overload]
        await super().write(offset, half)
        raise BlockDeviceError(errno.ENOSPC, "No space left on device")

    async def read(self, offset: int, length: int) -> bytes:
        if self.unreadable:
            raise BlockDeviceError(errno.EIO, "Input/output error")
        return bytes(await super().read(offset, length))


@pytest.mark.parametrize("unreadable", [False, True])
@pytest.mark.parametrize("policy", ["break", "report"])
def test_write_failing_part_way_is_recorded_or_breaks_the_trace(
    policy: str, unreadable: bool
) -> None:
    """#10 item 9: the part-written range is recorded as the image now holds it; when it
    cannot be read back, the trace breaks per on-target-error, evented, never silently."""

    async def main() -> None:
        child = HalfWrites(SIZE)
        child.unreadable = unreadable
        filt = TraceFilter(child)
        reg = ExportRegistry()
        reg.add(Export("disk", filt))
        mgr = TraceManager(reg)
        events: list[tuple[str, str | None]] = []
        mgr.add_listener(lambda t, ev: events.append((ev.kind.value, ev.error)))
        target = MemoryTarget()
        opts = TraceOptions.from_dict({"on-target-error": policy})
        trace = await mgr.start("t", "disk", target, opts)
        with pytest.raises(BlockDeviceError) as info:
            await filt.write(4096, b"\x07" * 8192)
        assert info.value.errno == errno.ENOSPC
        assert child.buf[4096 : 4096 + 4096] == b"\x07" * 4096  # what reached the image
        if not unreadable:
            assert trace.error is None
            await trace.stop()
            img = MemoryDevice(SIZE)
            await replay(target.records, img)
            assert img.buf == child.buf
            return
        assert ("BLOCK_JOB_ERROR", trace.error) in events and "unknown" in (trace.error or "")
        if policy == "report":
            with pytest.raises(BlockDeviceError):  # writes fail until the trace is stopped
                await filt.write(0, b"x" * 512)
            await trace.stop()
        else:
            await asyncio.wait_for(trace.wait_concluded(), 10)
        assert trace.concluded and target.closed is False  # closed unclean: no end mark
        assert events[-3][0] == "BLOCK_JOB_COMPLETED" and events[-3][1] == trace.error

    run(main)
