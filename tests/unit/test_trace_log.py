"""Traces into real dm-log-writes logs, in process on raw image files.

* prefix replays at every FLUSH entry, with the log engineer's replay (replay-log's
  ``--limit`` semantics), equal the image snapshotted exactly when that flush arrived;
* the whole log replays to the final image; with xfstests' ``replay-log`` too when installed;
* ``sync=full``: the log alone rebuilds the image from an all-zero one, holes as DISCARDs;
* ``serve --trace`` option parsing.
"""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import subprocess
from pathlib import Path

import pytest

from blocktrace.block.file import FileDevice
from blocktrace.errors import UsageError
from blocktrace.exports import ExportRegistry, open_export
from blocktrace.logwrites.format import LogFlag
from blocktrace.logwrites.reader import LogReader
from blocktrace.logwrites.replay import ReplayOptions, replay
from blocktrace.trace import TraceManager, TraceOptions, parse_trace_spec
from blocktrace.trace.filter import TraceFilter

SIZE = 4 * 1024 * 1024


def make_base(path: Path, seed: int) -> bytes:
    rng = random.Random(seed)
    data = bytearray(SIZE)
    for _ in range(20):  # some data, the rest holes
        off = rng.randrange(0, SIZE // 65536) * 65536
        data[off : off + 65536] = rng.randbytes(65536)
    with open(path, "wb") as f:
        f.truncate(SIZE)
        for off in range(0, SIZE, 65536):
            if any(data[off : off + 65536]):
                f.seek(off)
                f.write(data[off : off + 65536])
    return bytes(data)


async def clients(
    filt: TraceFilter,
    dev: FileDevice,
    seed: int,
    ops: int,
    snapshots: list[bytes] | None = None,
    n: int = 4,
) -> None:
    async def client(i: int) -> None:
        rng = random.Random(seed * 100 + i)
        for _ in range(ops):
            off = rng.randrange(0, SIZE - 1)
            ln = rng.randrange(1, min(70000, SIZE - off) + 1)
            r = rng.random()
            if r < 0.6:
                await filt.write(off, rng.randbytes(ln), fua=rng.random() < 0.1)
            elif r < 0.72:
                await filt.write_zeroes(off, ln, may_trim=rng.random() < 0.5)
            elif r < 0.84:
                await filt.trim(off, ln)
            else:
                if snapshots is not None:
                    # the FLUSH record is queued synchronously inside flush(): no await
                    # between this snapshot and it, so the snapshot is exact
                    snapshots.append(os.pread(dev.fd, SIZE, 0))
                await filt.flush()
            await asyncio.sleep(0)

    await asyncio.gather(*(client(i) for i in range(n)))


@pytest.mark.parametrize("mode", ["background", "write-blocking"])
def test_prefix_at_every_flush_equals_snapshot(tmp_path: Path, mode: str) -> None:
    img, log = tmp_path / "disk.img", tmp_path / "disk.log"
    make_base(img, 1)
    base = tmp_path / "base.img"
    shutil.copyfile(img, base)
    snapshots: list[bytes] = []

    async def main() -> None:
        exp = open_export("disk", img)
        reg = ExportRegistry()
        reg.add(exp)
        mgr = TraceManager(reg)
        assert isinstance(exp.device, TraceFilter)
        dev = exp.device.child
        assert isinstance(dev, FileDevice)
        trace = await mgr.start(
            "t",
            "disk",
            {"type": "log", "filename": str(log)},
            TraceOptions.from_dict({"copy-mode": mode}),
        )
        await clients(exp.device, dev, 3, 60, snapshots)
        await trace.stop()
        await exp.device.close()

    asyncio.run(main())
    final = img.read_bytes()
    with LogReader(log) as reader:
        entries = reader.entry_list()
    flush_idx = [e.index for e in entries if e.flags & LogFlag.FLUSH]
    assert len(flush_idx) == len(snapshots) >= 10
    work = tmp_path / "work.img"
    for idx, snap in zip(flush_idx, snapshots, strict=True):
        shutil.copyfile(base, work)
        replay(log, work, ReplayOptions(limit=idx + 1))
        assert work.read_bytes() == snap, f"replay up to FLUSH entry {idx} differs"
    shutil.copyfile(base, work)
    replay(log, work)
    assert work.read_bytes() == final
    if shutil.which("replay-log"):  # the independent replayer agrees
        shutil.copyfile(base, work)
        subprocess.run(
            ["replay-log", "--log", str(log), "--replay", str(work)],
            check=True,
            capture_output=True,
            timeout=60,
        )
        assert work.read_bytes() == final


def test_sync_full_log_rebuilds_from_empty_image(tmp_path: Path) -> None:
    img, log, log2 = tmp_path / "disk.img", tmp_path / "full.log", tmp_path / "quiet.log"
    make_base(img, 2)

    async def main() -> None:
        exp = open_export("disk", img)
        reg = ExportRegistry()
        reg.add(exp)
        mgr = TraceManager(reg)
        assert isinstance(exp.device, TraceFilter)
        dev = exp.device.child
        assert isinstance(dev, FileDevice)
        running = asyncio.ensure_future(clients(exp.device, dev, 4, 40))
        await asyncio.sleep(0)
        trace = await mgr.start(
            "full",
            "disk",
            {"type": "log", "filename": str(log)},
            TraceOptions.from_dict({"sync": "full"}),
        )
        assert not running.done()
        await running
        await trace.wait_ready()
        await trace.stop()
        # a second sync=full trace of the now quiet image: holes cost no log space
        quiet = await mgr.start(
            "quiet",
            "disk",
            {"type": "log", "filename": str(log2)},
            TraceOptions.from_dict({"sync": "full"}),
        )
        await quiet.wait_ready()
        await quiet.stop()
        await exp.device.close()

    asyncio.run(main())
    empty = tmp_path / "empty.img"
    with open(empty, "wb") as f:
        f.truncate(SIZE)
    replay(log, empty)
    assert empty.read_bytes() == img.read_bytes()
    with LogReader(log) as reader:
        copy_discards = sum(1 for e in reader.entries() if e.flags & LogFlag.DISCARD)
    assert copy_discards > 0
    # holes and zero ranges are not logged as data: the log holds about the data only
    used = sum(1 for off in range(0, SIZE, 65536) if any(img.read_bytes()[off : off + 65536]))
    assert log2.stat().st_size < used * 65536 + 256 * 1024 < SIZE
    with open(empty, "wb") as f:
        f.truncate(0)
        f.truncate(SIZE)
    replay(log2, empty)
    assert empty.read_bytes() == img.read_bytes()


def test_trace_spec_parsing() -> None:
    s = parse_trace_spec(
        "disk=log:/tmp/a,,b.log,sync=full,copy-mode=write-blocking,"
        "sector-size=4096,queue-size=8M,job-id=j1"
    )
    assert s.export == "disk" and s.job_id == "j1"
    assert s.target == {"type": "log", "filename": "/tmp/a,b.log", "sector-size": "4096"}
    assert s.options.to_dict() == {
        "sync": "full",
        "copy-mode": "write-blocking",
        "on-target-error": "report",
        "queue-size": 8 << 20,
    }
    assert parse_trace_spec("log:/x.log").export == ""
    for bad in (
        "disk=log",
        "disk=tape:/x",
        "disk=log:/x,sync=half",
        "log:/x,queue-size=1K",
        "log:/x,on-target-error",
        "disk=log:/x,copy-mode=sideways",
    ):
        with pytest.raises(UsageError):
            parse_trace_spec(bad)
