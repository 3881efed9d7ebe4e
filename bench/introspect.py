#!/usr/bin/env python3
"""Introspection throughput: ``blocktrace watch`` on a log recorded from a busy ext4 workload.

The real kernel writes the workload (thousands of small files, a large file, deletions and
renames: ``record_busy_workload`` in tests/integration/ext4_recording.py) to an image served by
QEMU's blklogwrites, mounted through nbdfuse + loop; the resulting log is then fed to
``blocktrace watch`` several times.  Reported: records/s, MB/s of stream, events/s and the
watcher's peak RSS.  The goal is to be faster than a trace records (introspection never falls
behind); compare with the traced 4 KiB write rate in docs/performance.md.

Needs root, /dev/fuse and loop devices.  Usage:
    .venv/bin/python bench/introspect.py [--rounds N] [--repeat N] [--dir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "integration")]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3, help="workload rounds")
    ap.add_argument("--repeat", type=int, default=3, help="timed watch runs")
    ap.add_argument("--dir", type=Path, help="work directory (default: a temp dir)")
    args = ap.parse_args()
    if os.geteuid() != 0 or not os.path.exists("/dev/fuse"):
        print("bench: needs root and /dev/fuse (mounts ext4 through nbdfuse)", file=sys.stderr)
        return 2
    from ext4_recording import record_busy_workload

    work = Path(tempfile.mkdtemp(prefix="blocktrace-introspect-", dir=args.dir))
    try:
        base, log = record_busy_workload(work, rounds=args.rounds)
        cmd = [sys.executable, "-m", "blocktrace", "watch", str(base), str(log), "--json"]
        times, events = [], 0
        for _ in range(args.repeat):
            start = time.perf_counter()
            out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=600)
            times.append(time.perf_counter() - start)
            events = sum(1 for line in out.stdout.splitlines() if line.strip())
        peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        info = subprocess.run(
            [sys.executable, "-m", "blocktrace", "log", "info", str(log)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        entries = int(next(ln for ln in info.splitlines() if ln.startswith("entries:")).split()[1])
        stream = log.stat().st_size
        best = min(times)
        report = {
            "records": entries,
            "stream_MB": round(stream / 1e6, 1),
            "events": events,
            "best_s": round(best, 2),
            "records_per_s": round(entries / best),
            "MB_per_s": round(stream / 1e6 / best, 1),
            "events_per_s": round(events / best),
            "peak_rss_MiB": round(peak_kib / 1024, 1),
        }
        print(json.dumps(report, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
