"""Replica targets in process: real image files, the real trace manager and filter.

Each test drives client-like operations through the export's TraceFilter while the replica
synchronises, then checks the replica file byte for byte against the source.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import os
import random
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest

from blocktrace.block.device import BlockDevice, ReadableBuffer
from blocktrace.block.file import FileDevice
from blocktrace.block.filter import Filter
from blocktrace.errors import BlockDeviceError, TargetError
from blocktrace.exports import ExportRegistry, open_export
from blocktrace.qmp.jobs import job_info
from blocktrace.replica.meta import SourceRecord, load_meta
from blocktrace.targets.replica import LocalReplicaTarget
from blocktrace.trace import TraceFilter, TraceManager, TraceOptions

MiB = 1024 * 1024
SIZE = 4 * MiB


def aio(fn: Callable[[Path], Coroutine[Any, Any, None]]) -> Callable[[Path], None]:
    """Run an async test in a fresh event loop (no pytest-asyncio here)."""

    @functools.wraps(fn)
    def wrapper(tmp_path: Path) -> None:
        asyncio.run(fn(tmp_path))

    return wrapper


def make_source(path: Path, seed: int = 1) -> Path:
    rng = random.Random(seed)
    with open(path, "wb") as f:
        f.truncate(SIZE)
        for _ in range(6):  # some data, some holes
            f.seek(rng.randrange(0, SIZE - 256 * 1024))
            f.write(rng.randbytes(rng.randrange(1, 256 * 1024)))
    return path


async def workload(filt: TraceFilter, seed: int, n: int) -> None:
    """Overlapping writes, zeroes, trims, FUA and flushes, a few clients at once."""
    rng = random.Random(seed)
    for _ in range(n):
        op = rng.random()
        off = rng.randrange(0, SIZE - 70000)
        if op < 0.7:
            await filt.write(off, rng.randbytes(rng.randrange(1, 65536)), fua=rng.random() < 0.1)
        elif op < 0.8:
            await filt.write_zeroes(off, rng.randrange(1, 65536), may_trim=rng.random() < 0.5)
        elif op < 0.9:
            await filt.trim(off, rng.randrange(1, 65536))
        else:
            await filt.flush()


async def setup(tmp_path: Path) -> tuple[TraceFilter, TraceManager, Path]:
    src = tmp_path / "src.img"
    if not src.exists():
        make_source(src)
    reg = ExportRegistry()
    exp = open_export("disk", src)
    reg.add(exp)
    assert isinstance(exp.device, TraceFilter)
    return exp.device, TraceManager(reg), src


def same(a: Path, b: Path) -> bool:
    return a.read_bytes()[:SIZE] == b.read_bytes()[:SIZE]


async def replicate(
    tmp_path: Path, spec: dict[str, Any], seed: int, *, sync: str = "full", n: int = 150
) -> dict[str, Any]:
    """Start a replica trace, run a workload during and after its sync, stop; return info."""
    filt, mgr, _ = await setup(tmp_path)
    opts = TraceOptions.from_dict({"sync": sync, "copy-mode": "background"})
    trace = await mgr.start("r", "disk", spec, opts)
    await asyncio.gather(*(workload(filt, seed + i, n) for i in range(3)))
    async with asyncio.timeout(30):
        await trace.wait_ready()
    await workload(filt, seed + 10, 20)
    # after ready every kind must stream: data, then trim and zero over data
    await filt.write(MiB, os.urandom(256 * 1024))
    await filt.write(2 * MiB, os.urandom(256 * 1024), fua=True)
    await filt.flush()
    # (over 1 MiB, so that the filter records them as TRIM/ZERO rather than as data)
    await filt.trim(MiB, 1536 * 1024)
    await filt.write_zeroes(2 * MiB + 4096, 1280 * 1024)
    info = job_info(trace)
    await trace.stop()
    await filt.close()
    return {**info["target"], "status": info["status"], "seq": filt.seq}


@aio
async def test_metadata_claims_consistent_only_after_a_clean_close(tmp_path: Path) -> None:
    """Issue #10 item 10: during a session the saved metadata never says ``consistent``
    (a kill -9 leaves the replica past its saved applied-seq); the clean close does."""
    filt, mgr, src = await setup(tmp_path)
    rep = tmp_path / "rep.img"
    opts = TraceOptions.from_dict({"sync": "full", "copy-mode": "background"})
    trace = await mgr.start("r", "disk", {"type": "replica", "filename": str(rep)}, opts)
    async with asyncio.timeout(30):
        await trace.wait_ready()
    await workload(filt, 3, 50)
    assert job_info(trace)["target"]["consistent"]  # live: equal as of applied-seq
    target = trace.target
    assert isinstance(target, LocalReplicaTarget)
    target._save(force=True)  # what a periodic save writes, as a kill -9 would find it
    got = load_meta(Path(str(rep) + ".btreplica"))
    assert got is not None and not got[0].clean and not got[0].consistent
    await trace.stop()
    await filt.close()
    got = load_meta(Path(str(rep) + ".btreplica"))
    assert got is not None and got[0].clean and got[0].consistent
    assert same(src, rep)


@aio
async def test_full_sync_under_load_then_identical(tmp_path: Path) -> None:
    rep = tmp_path / "rep.img"
    info = await replicate(tmp_path, {"type": "replica", "filename": str(rep)}, 10)
    assert info["sync-mode"] == "full"
    assert same(tmp_path / "src.img", rep)
    got = load_meta(Path(str(rep) + ".btreplica"))
    assert got is not None
    meta, bitmap = got
    assert meta.clean and meta.consistent and not bitmap
    assert meta.applied_seq == info["seq"]  # the replica equals the source as of this record


@aio
async def test_restart_resumes_without_copy_and_catches_untracked_writes(tmp_path: Path) -> None:
    rep = tmp_path / "rep.img"
    spec = {"type": "replica", "filename": str(rep)}
    await replicate(tmp_path, spec, 20)
    info = await replicate(tmp_path, spec, 30)  # restart: nothing changed in between
    assert info["sync-mode"] == "bitmap" and info["synced-bytes"] == 0
    assert same(tmp_path / "src.img", rep)
    src = tmp_path / "src.img"
    record = SourceRecord.load(Path(str(src) + ".btsource"))
    closed_at = record.replicas[os.path.realpath(rep)]["fingerprint"][1]
    for _ in range(10_000):  # written while no trace was attached, in a later clock tick
        with open(src, "r+b") as f:
            f.seek(12345)
            f.write(b"untracked" * 100)
        if os.stat(src).st_mtime_ns != closed_at:
            break
        await asyncio.sleep(0.001)
    info = await replicate(tmp_path, spec, 40, n=10)
    assert info["sync-mode"] == "compare"
    assert info["synced-bytes"] < SIZE // 2
    assert same(tmp_path / "src.img", rep)
    rep.unlink()  # the replica image is lost: its metadata must not be trusted
    info = await replicate(tmp_path, spec, 45, n=10)
    assert info["sync-mode"] == "full"
    assert same(tmp_path / "src.img", rep)


@aio
async def test_split_brain_refused_unless_forced(tmp_path: Path) -> None:
    rep = tmp_path / "rep.img"
    spec: dict[str, Any] = {"type": "replica", "filename": str(rep)}
    await replicate(tmp_path, spec, 50)
    got = load_meta(Path(str(rep) + ".btreplica"))
    assert got is not None and got[0].fingerprint is not None
    closed_at = got[0].fingerprint[1]
    # the replica is written behind our back (promoted, say), in a later file-system clock
    # tick than the clean close (timestamps are coarse: a write in the same tick is unseen)
    for _ in range(10_000):
        with open(rep, "r+b") as f:
            f.seek(4096)
            f.write(b"diverged")
        if os.stat(rep).st_mtime_ns != closed_at:
            break
        await asyncio.sleep(0.001)
    filt, mgr, _ = await setup(tmp_path)
    with pytest.raises(TargetError, match="split brain"):
        await mgr.start("r", "disk", spec, TraceOptions())
    assert rep.read_bytes()[4096:4104] == b"diverged"  # refused means untouched
    await filt.close()
    info = await replicate(tmp_path, {**spec, "force": "on"}, 60)
    assert info["sync-mode"] == "compare"
    assert same(tmp_path / "src.img", rep)


@aio
async def test_replica_of_another_source_refused(tmp_path: Path) -> None:
    rep = tmp_path / "rep.img"
    spec = {"type": "replica", "filename": str(rep)}
    a = tmp_path / "a"
    b = tmp_path / "b"
    a.mkdir()
    b.mkdir()
    await replicate(a, spec, 70)
    make_source(b / "src.img", seed=2)
    filt, mgr, _ = await setup(b)
    with pytest.raises(TargetError, match="belongs to source"):
        await mgr.start("r", "disk", spec, TraceOptions())
    await filt.close()


class Flaky(Filter):
    """A replica device that fails every write-class call while ``broken`` (EIO/ENOSPC)."""

    broken: int = 0

    def _check(self) -> None:
        if Flaky.broken:
            raise BlockDeviceError(Flaky.broken, "injected")

    async def write(self, offset: int, data: ReadableBuffer, *, fua: bool = False) -> None:
        self._check()
        await self.child.write(offset, data, fua=fua)

    async def flush(self) -> None:
        self._check()
        await self.child.flush()

    async def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        self._check()
        await self.child.trim(offset, length, fua=fua)

    async def write_zeroes(
        self, offset: int, length: int, *, may_trim: bool = False, fua: bool = False, **kw: Any
    ) -> None:
        self._check()
        await self.child.write_zeroes(offset, length, may_trim=may_trim, fua=fua)


class VolatileCache(Flaky):
    """A replica with a volatile write cache: writes are held in memory until a flush (or a
    FUA), and lost when the device fails, as a power cut would lose them."""

    def __init__(self, child: BlockDevice) -> None:
        super().__init__(child)
        self.pending: list[tuple[int, bytes]] = []

    def _check(self) -> None:
        if Flaky.broken:
            self.pending.clear()  # the cache's content is gone with the device
        super()._check()

    async def read(self, offset: int, length: int) -> ReadableBuffer:
        data = bytearray(await self.child.read(offset, length))
        for off, buf in self.pending:
            lo, hi = max(off, offset), min(off + len(buf), offset + length)
            if lo < hi:
                data[lo - offset : hi - offset] = buf[lo - off : hi - off]
        return bytes(data)

    async def write(self, offset: int, data: ReadableBuffer, *, fua: bool = False) -> None:
        self._check()
        self.pending.append((offset, bytes(data)))
        if fua:
            await self.flush()

    async def write_zeroes(
        self, offset: int, length: int, *, may_trim: bool = False, fua: bool = False, **kw: Any
    ) -> None:
        await self.write(offset, bytes(length), fua=fua)

    async def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        await self.write(offset, bytes(length), fua=fua)

    async def flush(self) -> None:
        self._check()
        for off, buf in self.pending:
            await self.child.write(off, buf)
        self.pending.clear()
        await self.child.flush()


class FlakyReplica(LocalReplicaTarget):
    volatile = False

    async def open_device(self) -> BlockDevice:
        if Flaky.broken:
            raise BlockDeviceError(errno.ECONNREFUSED, "injected")
        await super().open_device()
        cls = VolatileCache if self.volatile else Flaky
        return cls(FileDevice(self.filename))


@aio
async def test_failure_degrades_then_resyncs_only_dirty(tmp_path: Path) -> None:
    rep = tmp_path / "rep.img"
    filt, mgr, src = await setup(tmp_path)
    target = FlakyReplica(str(rep), reconnect_max=0.05)
    states: list[str] = []
    target.add_listener(lambda t, state, d: states.append(state))
    opts = TraceOptions.from_dict({"sync": "full", "copy-mode": "write-blocking"})
    trace = await mgr.start("r", "disk", target, opts)
    async with asyncio.timeout(30):
        await trace.wait_ready()
    copied = target.describe()["synced-bytes"]
    Flaky.broken = errno.ENOSPC
    try:
        # clients keep writing (and flushing) while the replica is failed: nothing fails
        await workload(filt, 80, 40)
        await filt.write(0, b"x" * 4096)
        await filt.flush()
        assert target.state == "degraded"
        assert 0 < target.dirty_bytes < SIZE
        assert target.describe()["lag-bytes"] == target.dirty_bytes
    finally:
        Flaky.broken = 0
    dirty = target.dirty_bytes
    async with asyncio.timeout(30):
        while target.state != "ready":
            await asyncio.sleep(0.01)
    assert target.reconnects >= 1
    assert target.describe()["synced-bytes"] - copied <= dirty  # only dirty regions were copied
    await workload(filt, 81, 20)
    await trace.stop()
    await filt.close()
    assert same(src, rep)
    assert states[:2] == ["synchronizing", "ready"] and "degraded" in states


@aio
async def test_fail_policy_fails_the_trace(tmp_path: Path) -> None:
    rep = tmp_path / "rep.img"
    filt, mgr, _ = await setup(tmp_path)
    target = FlakyReplica(str(rep), on_disconnect="fail")
    opts = TraceOptions.from_dict({"copy-mode": "write-blocking", "on-target-error": "report"})
    trace = await mgr.start("r", "disk", target, opts)
    async with asyncio.timeout(30):
        await trace.wait_ready()
    Flaky.broken = errno.EIO
    try:
        with pytest.raises(BlockDeviceError):
            for i in range(10):
                await filt.write(i * 4096, os.urandom(4096))
    finally:
        Flaky.broken = 0
    assert target.state == "failed"
    await trace.stop()
    await filt.close()


@pytest.mark.parametrize("seed", range(6))
def test_random_faults_converge(tmp_path: Path, seed: int) -> None:
    """Faults injected at random points of a random workload (both copy modes, overlapping
    writes, zeroes, trims, flushes; half the seeds with a replica whose volatile cache loses
    unflushed writes when it fails): once the replica is back, it is identical."""

    async def main() -> None:
        rng = random.Random(seed)
        rep = tmp_path / "rep.img"
        filt, mgr, src = await setup(tmp_path)
        target = FlakyReplica(str(rep), reconnect_max=0.05)
        target.volatile = seed >= 3
        mode = "write-blocking" if seed % 2 else "background"
        trace = await mgr.start(
            "r", "disk", target, TraceOptions.from_dict({"sync": "full", "copy-mode": mode})
        )
        try:
            for step in range(12):
                Flaky.broken = rng.choice((0, 0, errno.EIO, errno.ENOSPC))
                await asyncio.gather(
                    *(workload(filt, seed * 100 + step * 10 + c, 15) for c in range(2))
                )
        finally:
            Flaky.broken = 0
        async with asyncio.timeout(30):
            await trace.wait_ready()
            while target.state != "ready":
                await asyncio.sleep(0.01)
        await trace.stop()
        await filt.close()
        assert same(src, rep), target.describe()

    asyncio.run(main())
