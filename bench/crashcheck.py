#!/usr/bin/env python3
"""Crash points checked per minute: ``blocktrace crashcheck`` against the plain approach.

Workload (``blocktrace record``, the real kernel's ext4 on a ``--size`` GiB disk through
blocktrace's traced NBD server, nbdfuse and loop): ``--files`` rounds of "write a file of
64 KiB-1 MiB, make a directory, sync", a few hundred FLUSH entries in all.  Then, same run:

* ``crashcheck -j N``: ``blocktrace crashcheck LOG BASE`` (every flush point: one replay,
  copy-on-write views, mount/umount + e2fsck -fn per point through NBD + nbdfuse + loop);
* ``plain (full copy)``: per point, copy the base (``cp --sparse=never``: one full copy per
  point, as a script around replay-log does), ``blocktrace replay --limit P+1`` onto it,
  mount/umount it through a loop device (the kernel's journal recovery), ``e2fsck -fn``;
* ``plain (sparse copy)``: the same with ``cp --sparse=always`` (a generous baseline: the
  copy skips the base's holes).

The plain approaches are timed on ``--sample`` points spread over the log (each point costs
the same), and their rate is points / time.  Disk space: crashcheck's peak (replay layer plus
open views, from its JSON) plus base and log; plain: one copy at a time (what it needs at
least; keeping a copy per point, as the issue's 410-copy example, multiplies it).

Needs root, /dev/fuse and loop devices.  Usage:
    .venv/bin/python bench/crashcheck.py [--size 2] [--files 150] [--sample 8] [--jobs 1,2]
        [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BT = [sys.executable, "-m", "blocktrace"]


def sh(*argv: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in argv], capture_output=True, text=True, check=check)


def record(work: Path, size_gib: int, files: int) -> tuple[Path, Path]:
    out = work / "rec"
    script = work / "workload.sh"
    script.write_text(
        "set -e\n"
        f"for i in $(seq 1 {files}); do\n"
        "  head -c $(( (i % 16 + 1) * 65536 )) /dev/urandom > f$i; mkdir d$i; sync\n"
        "done\n"
    )
    t = time.monotonic()
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    subprocess.run(
        [
            *BT,
            "record",
            "-o",
            str(out),
            "--size",
            f"{size_gib}G",
            "--no-check",
            "--",
            "sh",
            str(script),
        ],
        check=True,
        env=env,
    )
    print(f"recorded in {time.monotonic() - t:.1f}s", file=sys.stderr)
    return out / "trace.log", out / "base.img"


def flush_points(log: Path) -> list[int]:
    sys.path.insert(0, str(ROOT / "src"))
    from blocktrace.logwrites.format import LogFlag
    from blocktrace.logwrites.reader import LogReader

    with LogReader(log) as r:
        return [e.index for e in r.entries() if e.flags & LogFlag.FLUSH]


def crashcheck(log: Path, base: Path, jobs: int, work: Path) -> dict[str, object]:
    t = time.monotonic()
    proc = subprocess.run(
        [*BT, "crashcheck", str(log), str(base), "--json", "-j", str(jobs), "--tmpdir", str(work)],
        capture_output=True,
        text=True,
    )
    elapsed = time.monotonic() - t
    doc = json.loads(proc.stdout)
    assert doc["failed"] == 0, "the healthy workload must pass"
    return {
        "points": doc["checked"],
        "seconds": elapsed,
        "per_min": doc["checked"] / elapsed * 60,
        "space": doc["peak_space_bytes"],
    }


def plain(log: Path, base: Path, points: list[int], sparse: bool, work: Path) -> dict[str, object]:
    copy, mnt = work / "copy.img", work / "mnt"
    mnt.mkdir(exist_ok=True)
    peak = 0
    t = time.monotonic()
    for p in points:
        sh("cp", f"--sparse={'always' if sparse else 'never'}", base, copy)
        sh(*BT, "replay", "--limit", str(p + 1), log, copy)
        sh("mount", "-t", "ext4", "-o", "loop", copy, mnt)
        sh("umount", mnt)
        assert sh("e2fsck", "-fn", copy, check=False).returncode == 0
        peak = max(peak, os.stat(copy).st_blocks * 512)
        copy.unlink()
    elapsed = time.monotonic() - t
    return {
        "points": len(points),
        "seconds": elapsed,
        "per_min": len(points) / elapsed * 60,
        "space": peak,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--size", type=int, default=2, help="disk size, GiB")
    ap.add_argument("--files", type=int, default=150)
    ap.add_argument("--sample", type=int, default=8, help="points timed for the plain approach")
    ap.add_argument("--jobs", default="1,2")
    ap.add_argument("--keep", type=Path, help="work directory to keep (reused if it has rec/)")
    args = ap.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="bench-crashcheck-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        if (work / "rec" / "trace.log").exists():
            log, base = work / "rec" / "trace.log", work / "rec" / "base.img"
        else:
            log, base = record(work, args.size, args.files)
        flushes = flush_points(log)
        step = max(1, len(flushes) // args.sample)
        sample = flushes[step // 2 :: step][: args.sample]
        fixed = os.stat(base).st_blocks * 512 + os.stat(log).st_blocks * 512
        rows = []
        for jobs in (int(j) for j in args.jobs.split(",")):
            rows.append((f"crashcheck -j {jobs}", crashcheck(log, base, jobs, work)))
        rows.append(("plain (full copy)", plain(log, base, sample, False, work)))
        rows.append(("plain (sparse copy)", plain(log, base, sample, True, work)))
        print(
            f"disk {args.size} GiB ext4; log {os.stat(log).st_size / 2**20:.1f} MiB, "
            f"{len(flushes)} flush points; base uses {os.stat(base).st_blocks / 2048:.1f} MiB"
        )
        print("| approach | points timed | seconds | points/min | extra disk space (MiB) |")
        print("|---|---:|---:|---:|---:|")
        for name, r in rows:
            print(
                f"| {name} | {r['points']} | {r['seconds']:.1f} | {r['per_min']:.1f} | "
                f"{int(r['space']) / 2**20:.1f} |"
            )
        best_plain = max(float(r["per_min"]) for n, r in rows if n.startswith("plain"))
        for name, r in rows:
            if name.startswith("crashcheck"):
                print(f"{name} / best plain: {float(r['per_min']) / best_plain:.1f}x")
        print(f"base + log on disk: {fixed / 2**20:.1f} MiB")
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
