#!/usr/bin/env python3
"""Guest I/O inside a running VM: untraced, attached with blocktrace, and on blklogwrites.

One TCG guest (Debian kernel, busybox + fio initramfs from ``scripts/build-guest.sh
--with-fio``) per contender, a raw disk on virtio-blk, fio inside the guest with
``direct=1``: 4 KiB random writes (iodepth 1, psync) and 1 MiB sequential writes, each
``--seconds`` long.  Contenders, in one run:

* ``untraced``: the disk as QEMU opened it;
* ``pivot``: the same VM after ``blocktrace attach`` (log target, sync=full), measured once
  the trace is ready;
* ``filter``: the same VM after ``blocktrace attach --mechanism filter`` (QEMU's
  blklogwrites logging into blocktrace's sink, which applies to a shadow traced to a log);
* ``blklogwrites``: QEMU's own blklogwrites filter configured at start with a plain file
  log (the nearest peer: a precise log, but set at open time only).

Also printed: the switch time of each pivot attach and detach (``block-job-complete`` until
the device runs on the new node; the guest is never stopped), the filter's guest pauses
(QEMU's drains: the QMP commands inserting blklogwrites, the settle after the base copy,
the removal; the base copy itself runs with the VM running and is printed with its time),
and the sink's decode rate in process (4 KiB
entries, decoder alone and decoder + shadow TraceFilter on a file with a log trace), to set
against the entries per second QEMU logged in the ``filter`` contender.  Guest figures under
TCG are far below hardware speed: the ratios are the point.

``--fill-mib N`` writes N MiB of random data into the disk first (the filter's base copy
then has that much to copy; the default disk is all holes).

Usage: .venv/bin/python bench/attach.py [--seconds N] [--size-mib N] [--fill-mib N]
[--dir DIR] [--sink-only]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "integration")]


def fio(g: object, name: str, bs: str, rw: str, seconds: int, size_mib: int) -> float:
    """MiB/s of one fio job in the guest."""
    from guest import Guest

    assert isinstance(g, Guest)
    out = g.sh(
        f"fio --name={name} --filename=/dev/vda --direct=1 --ioengine=psync --rw={rw} "
        f"--bs={bs} --size={size_mib}M --time_based --runtime={seconds} "
        "--output-format=json 2>/dev/null",
        timeout=seconds * 20 + 300,
    )
    data = json.loads(out[out.index("{") :])
    return float(data["jobs"][0]["write"]["bw_bytes"]) / (1 << 20)


def measure(g: object, seconds: int, size_mib: int) -> dict[str, float]:
    return {
        "4k-randwrite": fio(g, "r", "4k", "randwrite", seconds, size_mib),
        "1m-seqwrite": fio(g, "s", "1M", "write", seconds, size_mib),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=int, default=15)
    ap.add_argument("--size-mib", type=int, default=128)
    ap.add_argument("--fill-mib", type=int, default=0)
    ap.add_argument("--dir", type=Path)
    ap.add_argument("--sink-only", action="store_true", help="only the in-process sink rates")
    args = ap.parse_args()
    if args.sink_only:
        for name, rate in sink_rates().items():
            print(f"sink {name}: {rate:,.0f} entries/s")
        return 0
    from test_attach_guest import AttachProcess

    from guest import Guest, GuestDisk

    os.environ["BLOCKTRACE_GUEST_FIO"] = "1"
    work = Path(tempfile.mkdtemp(prefix="blocktrace-attach-bench-", dir=args.dir))
    size = args.size_mib << 20
    results: dict[str, dict[str, float]] = {}
    switches: list[str] = []
    try:
        disk = work / "vm.raw"
        with open(disk, "wb") as f:
            f.truncate(size)
            for _ in range(min(args.fill_mib, args.size_mib)):
                f.write(os.urandom(1 << 20))
        with Guest(work, [GuestDisk(disk, "raw")], memory=768) as g:
            results["untraced"] = measure(g, args.seconds, args.size_mib // 2)
            att = AttachProcess(work, g.qmp, [f"disk0={work / 'bt.img'}"],
                                [f"log:{work / 'pivot.log'}"])  # fmt: skip
            att.wait_ready(1)
            results["pivot"] = measure(g, args.seconds, args.size_mib // 2)
            att.proc.send_signal(signal.SIGTERM)
            att.wait()
            switches += re.findall(r"(attach|detach) \S+: .*\(switch ([0-9.]+ ms)\)", att.stderr())
            att = AttachProcess(work, g.qmp, [f"disk0={work / 'shadow.img'}"],
                                [f"log:{work / 'filter.log'}"], name="filter",
                                extra=("--mechanism", "filter"))  # fmt: skip
            att.wait_ready(1)
            results["filter"] = measure(g, args.seconds, args.size_mib // 2)
            att.proc.send_signal(signal.SIGTERM)
            att.wait()
            for what, ms, how in re.findall(
                r"(attach|detach) \S+: .*?guest paused ([0-9.]+ ms)(?:: ([^)]*))?\)", att.stderr()
            ):
                switches.append((f"filter {what} pause ({how})", ms))
            switches += [
                ("filter base copy (VM running)", m)
                for m in re.findall(r"base copied in ([0-9.]+ s \([0-9.]+ MiB) read", att.stderr())
            ]
        blw = work / "blw"
        blw.mkdir()
        log = blw / "blw.log"
        with open(log, "wb") as f:
            f.truncate(4 * size)
        with Guest(blw, [GuestDisk(disk, "raw")], memory=768, blklogwrites_log=log) as g:
            results["blklogwrites"] = measure(g, args.seconds, args.size_mib // 2)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    base = results["untraced"]
    print(f"{'contender':<14} {'4k randwrite MiB/s':>20} {'1M seqwrite MiB/s':>20}")
    for name, r in results.items():
        ratios = [r[k] / base[k] if base[k] else 0.0 for k in ("4k-randwrite", "1m-seqwrite")]
        print(
            f"{name:<14} {r['4k-randwrite']:>12.2f} ({ratios[0]:.2f}x) "
            f"{r['1m-seqwrite']:>12.2f} ({ratios[1]:.2f}x)"
        )
    for what, ms in switches:
        print(f"{what}: {ms}")
    ent = results["filter"]["4k-randwrite"] * 256
    print(f"filter contender: QEMU logged about {ent:.0f} 4 KiB entries/s")
    for name, rate in sink_rates().items():
        print(f"sink {name}: {rate:,.0f} entries/s")
    return 0


def sink_rates(n: int = 20000) -> dict[str, float]:
    """In-process rates of 4 KiB entries, in CPU time (``time.process_time``: the machine is
    shared, wall time would measure the neighbours), best of 5: the decoder alone with
    entries in order and delivered out of order in swapped pairs, then the decoder applying
    to a shadow ``TraceFilter`` with a log trace (swapped pairs)."""
    import asyncio
    import time

    from blocktrace.attach.sink import LogSinkDecoder, LogSinkDevice
    from blocktrace.exports import ExportRegistry, open_export
    from blocktrace.logwrites.format import LOG_WRITE_ENTRY
    from blocktrace.trace.manager import TraceManager
    from blocktrace.trace.options import TraceOptions

    s = 512
    data = os.urandom(4096)
    pieces = []
    pos = s
    for i in range(n):
        sector = (i * 8) % (64 << 11)
        pieces.append((pos, LOG_WRITE_ENTRY.pack(sector, 8, 0, 0).ljust(s, b"\0") + data))
        pos += s + 4096
    out: dict[str, float] = {}
    for order in ("in order", "swapped pairs"):
        if order == "swapped pairs":
            for i in range(0, n - 1, 2):
                pieces[i], pieces[i + 1] = pieces[i + 1], pieces[i]
        best = float("inf")
        for _ in range(5):
            dec = LogSinkDecoder(s)
            t0 = time.process_time()
            for off, b in pieces:
                dec.feed_write(off, b)
                dec.ops.clear()
            best = min(best, time.process_time() - t0)
        out[f"decoder alone, {order}"] = n / best

    async def with_trace() -> float:
        work = Path(tempfile.mkdtemp(prefix="blocktrace-sink-"))
        try:
            img = work / "shadow.img"
            with open(img, "wb") as f:
                f.truncate(64 << 20)
            reg = ExportRegistry()
            exp = open_export("shadow", img)
            reg.add(exp)
            traces = TraceManager(reg)
            await traces.start("t", "shadow", {"type": "log", "filename": str(work / "s.log")},
                               TraceOptions())  # fmt: skip
            sink = LogSinkDevice(exp.device, s)
            t0 = time.process_time()
            for off, b in pieces:
                await sink.write(off, b)
            await sink.flush()
            rate = n / (time.process_time() - t0)
            await traces.close()
            await exp.device.close()
            return rate
        finally:
            shutil.rmtree(work, ignore_errors=True)

    out["decoder + shadow + log trace, swapped pairs"] = max(
        asyncio.run(with_trace()) for _ in range(5)
    )
    return out


if __name__ == "__main__":
    sys.exit(main())
