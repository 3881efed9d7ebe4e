#!/usr/bin/env python3
"""Microbenchmark of the trace filter's write path alone: aligned writes through
``TraceFilter(MemoryDevice)`` with one attached trace whose target drops what it gets.

The NBD benchmark (bench/nbd_fio.py) measures the whole server, and on a shared machine its
rounds move by 2x; this isolates the funnel (reserve, apply, record, acknowledge), so a change
to the filter can be compared before/after on the same machine minutes apart.  Run it against
two trees with PYTHONPATH (see docs/performance.md).  Timings are reported, never asserted.

Usage:
    .venv/bin/python bench/trace_filter_micro.py [--writes N] [--repeat R]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import Sequence
from typing import Any

from blocktrace.block.memory import MemoryDevice
from blocktrace.exports import Export, ExportRegistry
from blocktrace.stream.contract import Target, TargetInfo
from blocktrace.stream.records import Record
from blocktrace.trace import TraceFilter, TraceManager, TraceOptions

MiB = 1024 * 1024
SIZE = 64 * MiB


class NullTarget(Target):
    name = "null"

    async def open(self, info: TargetInfo) -> None:
        pass

    async def deliver(self, records: Sequence[Record]) -> None:
        pass

    async def make_durable(self) -> None:
        pass

    async def close(self, *, clean: bool) -> None:
        pass

    def describe(self) -> dict[str, Any]:
        return {"type": "null"}


async def one(mode: str, bs: int, n: int) -> float:
    """Microseconds per aligned write of ``bs`` bytes, ``n`` writes, QD1 from one task."""
    filt = TraceFilter(MemoryDevice(SIZE))
    reg = ExportRegistry()
    reg.add(Export("disk", filt))
    mgr = TraceManager(reg)
    await mgr.start("t", "disk", NullTarget(), TraceOptions.from_dict({"copy-mode": mode}))
    data = bytes(bs)
    slots = SIZE // bs
    t0 = time.perf_counter()
    for i in range(n):
        await filt.write((i % slots) * bs, data)
    elapsed = time.perf_counter() - t0
    await mgr.close()
    return elapsed / n * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--writes", type=int, default=200_000, help="4k writes per measurement")
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    rows = [("background", 4096, args.writes), ("write-blocking", 4096, args.writes // 4),
            ("background", MiB, args.writes // 200)]  # fmt: skip
    for mode, bs, n in rows:
        runs = [asyncio.run(one(mode, bs, n)) for _ in range(args.repeat)]
        print(f"{bs // 1024:>5}k {mode:<15} median {statistics.median(runs):7.2f} us/write "
              f"(min {min(runs):.2f}, max {max(runs):.2f}, {args.repeat} runs of {n})")  # fmt: skip


if __name__ == "__main__":
    main()
