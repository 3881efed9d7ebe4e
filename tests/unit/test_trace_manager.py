"""Trace jobs: delivery modes, backpressure, failure policies, marks, events, start/stop mid
workload, several traces at once, sync=full.  In process, with MemoryTarget (records in a
list, fault injection), so every check is exact and needs no timing."""

from __future__ import annotations

import asyncio
import errno
import random
from collections.abc import Awaitable, Callable

import pytest

from blocktrace.block.memory import MemoryDevice
from blocktrace.errors import BlockDeviceError, StateError, UsageError
from blocktrace.exports import Export, ExportRegistry
from blocktrace.qmp.jobs import job_info
from blocktrace.stream.records import RECORD_OVERHEAD
from blocktrace.targets.memory import MemoryTarget, replay
from blocktrace.trace import (
    EventKind,
    JobStatus,
    RecordKind,
    Trace,
    TraceEvent,
    TraceFilter,
    TraceManager,
    TraceOptions,
)

SIZE = 1024 * 1024
MiB = 1024 * 1024


def stack(data: bytes | None = None) -> tuple[MemoryDevice, TraceFilter, TraceManager]:
    child = MemoryDevice(SIZE, data=data)
    filt = TraceFilter(child)
    reg = ExportRegistry()
    reg.add(Export("disk", filt))
    return child, filt, TraceManager(reg)


async def replayed(base: bytes, records: list) -> bytearray:
    img = MemoryDevice(SIZE, data=base)
    await replay(records, img)
    return img.buf


async def until(cond: Callable[[], bool], limit: int = 100000) -> None:
    """Let the loop run until ``cond()`` holds (bounded, no wall-clock timing)."""
    for _ in range(limit):
        if cond():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition not reached")


OPS = [0]  # operations completed by random_writes, all clients together


async def random_writes(filt: TraceFilter, seed: int, n: int, size: int = 8192) -> None:
    rng = random.Random(seed)
    for _ in range(n):
        await asyncio.sleep(0)  # let the other clients (and the trace control) interleave
        OPS[0] += 1
        off = rng.randrange(0, SIZE - size)
        r = rng.random()
        if r < 0.8:
            await filt.write(off, rng.randbytes(rng.randrange(1, size)), fua=r < 0.08)
        elif r < 0.9:
            await filt.write_zeroes(off, rng.randrange(1, size))
        else:
            await filt.flush()


def run(coro: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(coro())


def test_events_follow_qemu_job_life() -> None:
    async def main() -> None:
        _, _filt, mgr = stack()
        seen: list[tuple[str, str]] = []
        mgr.add_listener(lambda t, e: seen.append((e.kind.value, e.status.value)))
        tr = await mgr.start("j1", "disk", MemoryTarget())
        assert mgr.get("j1") is tr and tr.ready and job_info(tr)["status"] == "ready"
        tr.pause()
        assert tr.status is JobStatus.STANDBY and job_info(tr)["paused"]
        tr.resume()
        await tr.stop()
        assert mgr.find("j1") is None and tr.status is JobStatus.NULL
        assert seen == [
            ("JOB_STATUS_CHANGE", "created"),
            ("JOB_STATUS_CHANGE", "running"),
            ("JOB_STATUS_CHANGE", "ready"),
            ("BLOCK_JOB_READY", "ready"),
            ("JOB_STATUS_CHANGE", "standby"),
            ("JOB_STATUS_CHANGE", "ready"),
            ("JOB_STATUS_CHANGE", "waiting"),
            ("JOB_STATUS_CHANGE", "pending"),
            ("BLOCK_JOB_COMPLETED", "pending"),  # QEMU: the end event before "concluded"
            ("JOB_STATUS_CHANGE", "concluded"),
            ("JOB_STATUS_CHANGE", "null"),
        ]

    run(main)


def test_start_errors_leave_nothing_behind() -> None:
    async def main() -> None:
        _, filt, mgr = stack()
        await mgr.start("j", "disk", MemoryTarget())
        with pytest.raises(UsageError, match="Job ID 'j' already in use"):
            await mgr.start("j", "disk", MemoryTarget())
        with pytest.raises(UsageError, match="no export"):
            await mgr.start("k", "nope", MemoryTarget())
        with pytest.raises(UsageError, match="not supported"):
            await mgr.start("k", "disk", {"type": "floppy"})
        with pytest.raises(UsageError, match="not found"):
            mgr.get("k")
        with pytest.raises(UsageError, match="not a multiple"):
            await mgr.start("k", "disk", MemoryTarget(alignment=3 * 512))
        assert [t.job_id for t in mgr.list()] == ["j"] and len(filt.sinks) == 1
        await mgr.close()
        assert filt.sinks == () and mgr.list() == []

    run(main)


def test_write_blocking_acknowledges_only_after_the_target_holds_the_record() -> None:
    async def main() -> None:
        child, filt, mgr = stack()
        target = MemoryTarget()
        target.gate.clear()  # the target accepts nothing until the gate opens
        await mgr.start(
            "j", "disk", target, TraceOptions.from_dict({"copy-mode": "write-blocking"})
        )
        w = asyncio.ensure_future(filt.write(0, b"a" * 4096))
        await until(lambda: child.buf[0] == ord("a"))  # applied to the image...
        for _ in range(50):
            await asyncio.sleep(0)
        assert not w.done() and target.records == []  # ...but not acknowledged
        target.gate.set()
        await w
        assert [r.data for r in target.records] == [b"a" * 4096]

    run(main)


def test_background_acknowledges_before_delivery_and_flush_waits_for_durability() -> None:
    async def main() -> None:
        _, filt, mgr = stack()
        target = MemoryTarget()
        target.gate.clear()
        tr = await mgr.start("j", "disk", target)
        await filt.write(0, b"b" * 4096)  # returns although the target holds nothing
        assert target.records == [] and tr.stats().queued_records == 1
        f = asyncio.ensure_future(filt.flush())
        for _ in range(50):
            await asyncio.sleep(0)
        assert not f.done()  # a FLUSH is acknowledged only once durable in the trace
        target.gate.set()
        await f
        assert target.durable_count == 2
        assert [r.kind for r in target.records] == [RecordKind.WRITE, RecordKind.FLUSH]
        await filt.write(4096, b"c" * 512, fua=True)
        assert target.durable_count == 3 and target.records[-1].fua

    run(main)


def test_full_queue_applies_backpressure_and_drops_nothing() -> None:
    async def main() -> None:
        child, filt, mgr = stack()
        target = MemoryTarget()
        tr = await mgr.start("j", "disk", target, TraceOptions.from_dict({"queue-size": "1M"}))
        tr.pause()
        written: list[int] = []

        async def writer() -> None:
            for i in range(40):  # 40 x 64 KiB = 2.5 MiB through a 1 MiB queue
                await filt.write(i * 16384, bytes([i + 1]) * 65536)
                written.append(i)

        w = asyncio.ensure_future(writer())
        await until(lambda: bool(tr.delivery._space_waiters))
        blocked_at = len(written)
        assert 10 <= blocked_at < 40
        assert tr.stats().queued_bytes <= 1 * MiB
        assert child.buf[blocked_at * 16384 + 65535] == 0  # the waiting write is not applied
        tr.resume()
        await w
        await tr.stop()
        assert len(target.records) == 40
        assert child.buf == await replayed(bytes(SIZE), target.records)

    run(main)


def test_a_batch_in_delivery_still_counts_against_the_cap() -> None:
    """Records the target is busy with (taken off the queue, not yet held) keep their queue
    space until the target returns: the cap bounds queued + in-flight payload, so the
    server's memory for the trace stays the cap plus fixed buffers."""

    async def main() -> None:
        child, filt, mgr = stack()
        target = MemoryTarget()
        tr = await mgr.start("j", "disk", target, TraceOptions.from_dict({"queue-size": "1M"}))
        target.gate.clear()  # the worker takes a batch and then waits inside deliver
        await filt.write(0, b"\1" * 65536)
        await until(lambda: tr.delivery.queued_records == 0)  # the batch is in flight
        assert tr.stats().delivered_records == 0
        written: list[int] = []

        async def writer() -> None:
            for i in range(1, 40):
                await filt.write(i * 16384, bytes([i + 1]) * 65536)
                written.append(i)

        w = asyncio.ensure_future(writer())
        await until(lambda: bool(tr.delivery._space_waiters))
        # the in-flight 64 KiB (+ overhead) is still counted: fewer writes fit than in an
        # empty 1 MiB queue
        assert 1 + len(written) < 16
        assert tr.stats().queued_bytes == (1 + len(written)) * (65536 + RECORD_OVERHEAD)
        assert tr.stats().queued_bytes <= 1 * MiB
        target.gate.set()
        await w
        await tr.stop()
        assert len(target.records) == 40
        assert child.buf == await replayed(bytes(SIZE), target.records)

    run(main)


@pytest.mark.parametrize("mode", ["background", "write-blocking"])
def test_on_target_error_report_fails_writes_until_stopped(mode: str) -> None:
    async def main() -> None:
        child, filt, mgr = stack()
        events: list[TraceEvent] = []
        mgr.add_listener(lambda t, e: events.append(e))
        target = MemoryTarget(fail_after=5)
        opts = TraceOptions.from_dict({"copy-mode": mode, "on-target-error": "report"})
        tr = await mgr.start("j", "disk", target, opts)
        errors = 0
        for i in range(30):
            try:
                await filt.write(i * 4096, b"x" * 4096)
                await filt.flush()
            except BlockDeviceError as exc:
                assert exc.errno == errno.EIO
                errors += 1
        assert errors >= 20 and tr.error and "No space" in tr.error
        assert tr.io_status == "nospace" and job_info(tr)["io-status"] == "nospace"
        err = [e for e in events if e.kind is EventKind.ERROR]
        assert len(err) == 1 and err[0].action == "report"
        with pytest.raises(BlockDeviceError):  # the image cannot run ahead of the stream
            await filt.write(SIZE - 4096, b"y" * 4096)
        assert child.buf[SIZE - 1] == 0
        await tr.stop()
        assert [e.status.value for e in events[-3:]] == ["aborting", "concluded", "null"]
        done = [e for e in events if e.kind is EventKind.COMPLETED]
        assert len(done) == 1 and done[0].error and "No space" in done[0].error
        await filt.write(SIZE - 4096, b"y" * 4096)  # untraced again: clients carry on
        assert target.closed is False

    run(main)


def test_on_target_error_break_ends_the_trace_and_clients_carry_on() -> None:
    async def main() -> None:
        child, filt, mgr = stack()
        events: list[TraceEvent] = []
        mgr.add_listener(lambda t, e: events.append(e))
        target = MemoryTarget(fail_after=3, fail_errno=errno.EIO)
        opts = TraceOptions.from_dict({"copy-mode": "write-blocking", "on-target-error": "break"})
        tr = await mgr.start("j", "disk", target, opts)
        for i in range(20):
            await filt.write(i * 4096, b"z" * 4096, fua=i % 3 == 0)
            await filt.flush()
        await tr.wait_concluded()
        assert child.buf[19 * 4096] == ord("z") and filt.sinks == ()
        assert tr.error and "Input/output error" in tr.error and tr.io_status == "failed"
        kinds = [e.kind for e in events if e.kind is not EventKind.STATUS_CHANGE]
        assert kinds == [EventKind.READY, EventKind.ERROR, EventKind.COMPLETED]
        completed = [e for e in events if e.kind is EventKind.COMPLETED]
        assert completed[0].error == tr.error and mgr.list() == []
        assert [e.status.value for e in events[-2:]] == ["concluded", "null"]

    run(main)


def test_start_and_stop_in_the_middle_of_a_workload() -> None:
    """Base = the image at the attach, end = the image at the detach, both taken exactly."""

    async def main() -> None:
        child, filt, mgr = stack(random.Random(3).randbytes(SIZE))
        snaps: dict[str, bytes] = {}
        orig_detach = filt.detach_now

        def detach_now(sink: object) -> None:
            orig_detach(sink)  # type: ignore[arg-type]
            snaps["end"] = bytes(child.buf)

        filt.detach_now = detach_now  # type: ignore[method-assign]

        def on_event(trace: Trace, e: TraceEvent) -> None:
            if e.kind is EventKind.STATUS_CHANGE and e.status is JobStatus.RUNNING:
                snaps["base"] = bytes(child.buf)

        mgr.add_listener(on_event)
        target = MemoryTarget(alignment=512)
        clients = [asyncio.ensure_future(random_writes(filt, s, 300)) for s in range(4)]
        OPS[0] = 0
        await until(lambda: OPS[0] >= 200)
        tr = await mgr.start("mid", "disk", target)
        await until(lambda: OPS[0] >= 700)
        await tr.stop()
        assert not all(c.done() for c in clients), "workload ended before the stop"
        await asyncio.gather(*clients)
        assert len(target.records) > 50
        assert snaps["base"] != snaps["end"] != bytes(child.buf)
        assert await replayed(snaps["base"], target.records) == snaps["end"]

    run(main)


def test_several_traces_marks_and_sync_full_on_one_export() -> None:
    async def main() -> None:
        base = random.Random(9).randbytes(SIZE // 2) + bytes(SIZE // 2)
        child, filt, mgr = stack(base)
        t_none, t_full = MemoryTarget(alignment=512), MemoryTarget(alignment=4096)
        a = await mgr.start("a", "disk", t_none)
        clients = [asyncio.ensure_future(random_writes(filt, s, 200)) for s in range(3)]
        b = await mgr.start(
            "b",
            "disk",
            t_full,
            TraceOptions.from_dict({"sync": "full", "copy-mode": "write-blocking"}),
        )
        assert filt.alignment == 4096
        await asyncio.sleep(0)
        assert (await a.mark("middle")).position > 0
        with pytest.raises(UsageError):
            await b.mark("")
        await b.wait_ready()
        await asyncio.gather(*clients)
        await b.mark("end")
        await b.stop()
        await a.stop()
        with pytest.raises(StateError):
            await a.mark("late")
        # trace a: base + stream; trace b: zeroes + stream (sync=full)
        assert child.buf == await replayed(base, t_none.records)
        assert child.buf == await replayed(bytes(SIZE), t_full.records)
        assert all(
            r.offset % 4096 == 0 and r.length % 4096 == 0 for r in t_full.records if r.kind.is_data
        )
        copies = [r for r in t_full.records if r.copy]
        assert sum(r.length for r in copies) == SIZE
        assert any(r.kind is RecordKind.ZERO for r in copies)  # zero ranges carry no data
        assert [r.name for r in t_none.records if r.kind is RecordKind.MARK] == ["middle"]
        assert [r.name for r in t_full.records if r.kind is RecordKind.MARK] == ["end"]

    run(main)


def test_stop_before_ready_is_cancelled() -> None:
    async def main() -> None:
        _, _, mgr = stack()
        target = MemoryTarget()
        target.gate.clear()
        events: list[EventKind] = []
        mgr.add_listener(lambda t, e: events.append(e.kind))
        tr = await mgr.start("c", "disk", target, TraceOptions.from_dict({"sync": "full"}))
        assert tr.status is JobStatus.RUNNING and not tr.ready
        tr.pause()  # the copy has not run yet (start returned without yielding)
        assert tr.status is JobStatus.PAUSED
        stop = asyncio.ensure_future(tr.stop())
        await asyncio.sleep(0)
        target.gate.set()
        await stop
        assert EventKind.CANCELLED in events and EventKind.COMPLETED not in events
        assert target.closed is False  # an unfinished sync: the target is not a clean trace

    run(main)
