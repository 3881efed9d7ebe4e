#!/usr/bin/env python3
"""Introspection throughput: can ``blocktrace watch`` keep up with the stream a trace records?

Workloads, written by the real kernel to an image served by QEMU's blklogwrites (mounted
through nbdfuse + loop; tests/integration/ext4_recording.py):

* ``busy``: thousands of small files in many directories, a large file, deletions, renames
  (``record_busy_workload``): the metadata path (JBD2 transactions, inode/directory diffs);
* ``bulk``: several 256 MiB files in 1 MiB writes, an in-place overwrite, a delete
  (``record_bulk_workload``): the data path (data before its extent, then attribution).

Each QEMU log is also converted to a blocktrace log (CRC-checked on reading, the format a
trace's log target writes).  Reported per workload and log format, best of ``--repeat`` runs:

* ``start_s``: ``blocktrace watch`` on an empty log of the same base image (interpreter,
  imports, the crawl of the base image): paid once per process, not per record;
* ``e2e_s``/``e2e_MB_s``: ``blocktrace watch BASE LOG --json`` end to end;
* ``steady_MB_s``/``steady_records_s``: stream / (e2e - start), the rate once running, which is
  what must exceed the trace's recording rate; ``cpu_MB_s`` the same over CPU time (user+sys,
  less distorted by other jobs on a shared machine);
* ``peak_rss_MiB`` of the watch process;
* ``live``: the ``introspect`` trace target fed the same records as ``TraceRecord`` batches
  the way the delivery worker does (<= 16 MiB each, ``await deliver``), in an asyncio loop with
  a 1 ms ticker: MB/s and the worst event-loop stall seen while inference ran in its thread.

Needs root, /dev/fuse and loop devices.  Usage:
    .venv/bin/python bench/introspect.py [--workloads busy,bulk] [--rounds N] [--repeat N]
        [--keep DIR]    # keep (or reuse) DIR/<workload>/{base.img,disk.log,...} for profiling
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "integration"), str(ROOT / "src")]


BASELINE_SRC: str | None = None  #: --baseline-src: a source tree to run side by side
PYCACHE = Path(tempfile.gettempdir()) / "blocktrace-bench-pycache"


def run_watch(base: Path, log: Path, src: str | None = None) -> tuple[float, float, float, int]:
    """(wall s, cpu s, peak RSS MiB, JSON lines) of one ``blocktrace watch`` process (of the
    source tree ``src`` if given, e.g. an exported older commit)."""
    # through /usr/bin/time: a child forked from this (large) process would report our RSS
    rss_file = tempfile.NamedTemporaryFile(prefix="bench-rss-")  # noqa: SIM115
    cmd = ["/usr/bin/time", "-f", "%M", "-o", rss_file.name, sys.executable, "-m", "blocktrace"]
    cmd += ["watch", str(base), str(log), "--json"]
    # an installed blocktrace starts from cached bytecode: allow it (in a cache of ours), even
    # where the environment forbids writing it, or start-up would measure the compiler
    env = dict(os.environ, PYTHONPYCACHEPREFIX=str(PYCACHE))
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    if src:
        env["PYTHONPATH"] = src
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
    assert proc.stdout is not None
    lines = sum(1 for _ in proc.stdout)
    _, status, ru = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise RuntimeError(f"{cmd} exited {proc.returncode}")
    with rss_file:
        rss_mib = int(Path(rss_file.name).read_text().split()[-1]) / 1024
    return wall, ru.ru_utime + ru.ru_stime, rss_mib, lines


def convert(src: Path, dst: Path, empty: Path) -> None:
    """``src`` (any dm-log-writes log) as a checksummed blocktrace log, and an empty one."""
    from blocktrace.logwrites.format import LogFlag
    from blocktrace.logwrites.reader import LogReader
    from blocktrace.logwrites.writer import LogWriter

    # regenerated on purpose (--keep reuses the directory): replace what is there
    LogWriter.create(empty, direct=False, overwrite=True).close()
    with LogReader(src) as r, LogWriter.create(dst, sector_size=r.sector_size, overwrite=True) as w:
        for e in r.entries(with_data=True):
            if e.mark is not None:
                w.mark(e.mark)
            elif e.is_discard and e.length:
                w.discard(e.target_offset, e.length, fua=bool(e.flags & LogFlag.FUA))
            elif e.length:
                w.write(e.target_offset, e.read_data(), fua=bool(e.flags & LogFlag.FUA))
            if e.flags & LogFlag.FLUSH:
                w.flush()


def live(base: Path, log: Path) -> dict[str, Any]:
    """The introspect target fed ``log`` as trace batches; MB/s and the worst loop stall."""
    from blocktrace.logwrites.reader import LogReader
    from blocktrace.trace.records import RecordKind, TraceRecord
    from blocktrace.trace.targets.base import TargetInfo
    from blocktrace.trace.targets.introspect import IntrospectTarget

    kinds = {"write": RecordKind.WRITE, "zero": RecordKind.ZERO, "discard": RecordKind.TRIM}
    batches: list[list[TraceRecord]] = [[]]
    size = nbytes = 0
    from blocktrace.ext4.watcher import _entry_records

    with LogReader(log) as r:
        for e in r.entries(with_data=True):
            for s in _entry_records(e):
                k = kinds.get(s.kind, RecordKind.FLUSH if s.kind == "flush" else RecordKind.MARK)
                data = bytes(s.data) if s.data is not None else None
                batches[-1].append(TraceRecord(s.index, k, s.offset, s.length, s.fua, data))
                size += len(data) if data else 0
                nbytes += len(data) if data else 0
                if size >= 16 << 20 or len(batches[-1]) >= 4096:
                    batches.append([])
                    size = 0

    async def main() -> dict[str, Any]:
        events = 0

        def sink(_: Any) -> None:
            nonlocal events
            events += 1

        target = IntrospectTarget(sink=sink)
        await target.open(TargetInfo("bench", base.stat().st_size, 512, filename=str(base)))
        target.attached()
        late: list[float] = []
        running = True

        async def ticker() -> None:
            while running:
                t = time.perf_counter()
                await asyncio.sleep(0.001)
                late.append(time.perf_counter() - t - 0.001)

        tick = asyncio.get_running_loop().create_task(ticker())
        start = time.perf_counter()
        cpu = time.process_time()
        for batch in batches:
            await target.deliver(batch)
        await target.close(clean=True)
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu
        running = False
        await tick
        return {
            "MB_s": round(nbytes / 1e6 / wall, 1),
            "cpu_MB_s": round(nbytes / 1e6 / cpu, 1),
            "events": events,
            "loop_stall_p99_ms": round(sorted(late)[int(len(late) * 0.99)] * 1000, 1),
            "loop_stall_max_ms": round(max(late) * 1000, 1),
        }

    return asyncio.run(main())


def measure(name: str, base: Path, logs: dict[str, Path], empty: Path, repeat: int) -> Any:
    """Every timed run of the current tree alternates with the baseline's (if any), so that
    load from other jobs hits both alike."""
    from blocktrace.logwrites.reader import LogReader

    srcs: list[str | None] = [None, BASELINE_SRC] if BASELINE_SRC else [None]
    starts = {src: min(run_watch(base, empty, src)[:2] for _ in range(repeat)) for src in srcs}
    out: dict[str, Any] = {"workload": name}
    for fmt, log in logs.items():
        with LogReader(log) as r:
            records = r.nr_entries
            stream = sum(e.length for e in r.entries() if not e.is_discard)
        runs: dict[str | None, list[tuple[float, float, float, int]]] = {s: [] for s in srcs}
        for _ in range(repeat):
            for src in srcs:
                runs[src].append(run_watch(base, log, src))
        for src in srcs:
            start = starts[src]
            wall, cpu, _, lines = min(runs[src])
            steady = max(wall - start[0], 1e-9)
            out[f"{fmt} (baseline)" if src else fmt] = {
                "start_s": round(start[0], 3),
                "records": records,
                "stream_MB": round(stream / 1e6, 1),
                "events": lines,
                "e2e_s": round(wall, 3),
                "e2e_MB_s": round(stream / 1e6 / wall, 1),
                "steady_MB_s": round(stream / 1e6 / steady, 1),
                "steady_records_s": round(records / steady),
                "cpu_MB_s": round(stream / 1e6 / max(cpu - start[1], 1e-9), 1),
                "peak_rss_MiB": round(max(r[2] for r in runs[src]), 1),
            }
    out["live"] = live(base, logs["qemu_log"])
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workloads", default="busy,bulk", help="comma-separated: busy, bulk")
    ap.add_argument("--rounds", type=int, default=3, help="busy workload rounds")
    ap.add_argument("--bulk-files", type=int, default=3, help="bulk workload: 256 MiB files")
    ap.add_argument("--repeat", type=int, default=3, help="timed watch runs (best kept)")
    ap.add_argument("--dir", type=Path, help="work directory (default: a temp dir)")
    ap.add_argument(
        "--keep",
        type=Path,
        help="keep each workload's base image and logs in KEEP/<workload> (for profiling), and "
        "reuse them instead of recording when they are already there",
    )
    ap.add_argument(
        "--baseline-src",
        help="also time `watch` from this source tree (e.g. `git archive HEAD src | tar -x`)",
    )
    args = ap.parse_args()
    global BASELINE_SRC
    BASELINE_SRC = args.baseline_src
    if os.geteuid() != 0 or not os.path.exists("/dev/fuse"):
        print("bench: needs root and /dev/fuse (mounts ext4 through nbdfuse)", file=sys.stderr)
        return 2
    from ext4_recording import record_bulk_workload, record_busy_workload

    work = Path(tempfile.mkdtemp(prefix="blocktrace-introspect-", dir=args.dir))
    try:
        for name in args.workloads.split(","):
            wdir = args.keep / name if args.keep else work / name
            base, log = wdir / "base.img", wdir / "disk.log"
            btlog, empty = wdir / "blocktrace.log", wdir / "empty.log"
            if not (args.keep and all(p.exists() for p in (base, log, btlog, empty))):
                wdir.mkdir(parents=True, exist_ok=True)
                if name == "busy":
                    base, log = record_busy_workload(wdir, rounds=args.rounds)
                elif name == "bulk":
                    base, log = record_bulk_workload(wdir, files=args.bulk_files)
                else:
                    raise SystemExit(f"unknown workload {name!r}")
                (wdir / "disk.img").unlink()
                convert(log, btlog, empty)
            logs = {"qemu_log": log, "blocktrace_log": btlog}
            print(json.dumps(measure(name, base, logs, empty, args.repeat), indent=2), flush=True)
            if not args.keep:
                shutil.rmtree(wdir)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
