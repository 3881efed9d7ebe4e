"""CPU cost of the traced write path, in-process: compares trees without fio's noise.

The real export stack (``exports.open_export``: ``TraceFilter(FileDevice)``) with a real
``log`` trace, driven by 16 concurrent writers of random aligned 4 KiB writes and a final
FLUSH, on uvloop as ``blocktrace serve`` runs.  Reports the process's CPU time per write
(``time.process_time``: every thread, so the log's write-out threads count too) and writes/s.
CPU time moves far less than throughput on a shared machine, so two trees can be compared
in one run by alternating interpreters (another tree's venv runs this same file):

    for i in 1 2 3; do for py in .venv/bin/python /tmp/old/.venv/bin/python; do
        $py bench/trace_cpu.py --writes 100000 --copy-mode background; done; done

Uses only the API both trees share (``TraceManager.start`` with a QMP-shaped target).
``--target introspect`` traces into a live ``introspect`` target instead of a log: the image
gets an ext4 file system holding one file of half its size, and the writes overwrite that
file's blocks (``write`` events); its CPU includes the engine's, and the saving of prior
contents the filter does for it (docs/introspection.md, *Live: the image as of each record*).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from blocktrace.exports import ExportRegistry, open_export
from blocktrace.trace import TraceManager, TraceOptions

MiB = 1024 * 1024


async def run(n: int, mode: str, size: int, workdir: Path, kind: str) -> dict[str, float]:
    img = workdir / "disk.img"
    with open(img, "wb") as f:
        f.truncate(size)
    target = {"type": "log", "filename": str(workdir / "t.log")}
    rng = random.Random(1)
    offsets = [rng.randrange(size // 4096) * 4096 for _ in range(n)]
    if kind == "introspect":
        offsets = file_blocks(img, size, workdir, n)
        target = {"type": "introspect", "filename": str(workdir / "events.jsonl")}
    reg = ExportRegistry()
    exp = open_export("disk", img)
    reg.add(exp)
    mgr = TraceManager(reg)
    if mode != "untraced":
        await mgr.start("j", "disk", target, TraceOptions.from_dict({"copy-mode": mode}))
    dev = exp.device
    payloads = [os.urandom(4096) for _ in range(64)]

    async def writer(k: int) -> None:
        for i in range(k, n, 16):
            await dev.write(offsets[i], payloads[i % 64])

    cpu, wall = time.process_time(), time.perf_counter()
    await asyncio.gather(*(writer(k) for k in range(16)))
    await dev.flush()
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    if mode != "untraced":
        await mgr.stop("j")
    await dev.close()
    return {"cpu_us_per_write": cpu / n * 1e6, "writes_per_s": n / wall}


def file_blocks(img: Path, size: int, workdir: Path, n: int) -> list[int]:
    """Make ``img`` an ext4 file system holding one file of half its size; ``n`` random
    offsets of that file's data blocks (overwrites the engine turns into ``write`` events,
    the same work for every tree)."""
    from blocktrace.ext4.watcher import Watcher

    content = workdir / "content"
    content.mkdir()
    with open(content / "big", "wb") as f:
        f.truncate(size // 2)
        f.write(b"x")  # not sparse: real blocks
        for off in range(0, size // 2, 1 << 20):
            f.seek(off)
            f.write(b"x")
    cmd = ["mkfs.ext4", "-q", "-F", "-b", "4096", "-d", str(content), str(img)]
    subprocess.run(cmd, check=True)
    with Watcher(str(img)) as w:
        eng = w.engines[0][1]
        ino = eng.ns.children[2]["big"]
        blocks = [e.pblk + i for e in eng.istate[ino].map.extents for i in range(e.length)]
    rng = random.Random(1)
    return [rng.choice(blocks) * 4096 for _ in range(n)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--writes", type=int, default=100_000)
    ap.add_argument(
        "--copy-mode", default="background", help="background | write-blocking | untraced"
    )
    ap.add_argument("--size", type=int, default=256, help="image MiB")
    ap.add_argument("--dir", type=Path, default=None)
    ap.add_argument("--target", default="log", help="log | introspect")
    args = ap.parse_args()
    try:
        import uvloop

        loop_factory = uvloop.new_event_loop
    except ImportError:
        loop_factory = asyncio.new_event_loop
    workdir = Path(tempfile.mkdtemp(prefix="blocktrace-cpu-", dir=args.dir))
    try:
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            job = run(args.writes, args.copy_mode, args.size * MiB, workdir, args.target)
            result = runner.run(job)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    import blocktrace

    result["tree"] = os.path.dirname(os.path.dirname(os.path.dirname(blocktrace.__file__)))
    result["copy_mode"] = args.copy_mode  # type: ignore[assignment]
    result["target"] = args.target  # type: ignore[assignment]
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
