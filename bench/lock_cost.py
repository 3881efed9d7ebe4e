"""What the write locks cost (docs/performance.md, "Write locks").

* ``lock_image(WRITABLE)``: the five ``fcntl`` calls every export, replica image, replay
  target, log and events file now takes once when it is opened;
* ``lock_holders``: the ``/proc/PID/fdinfo`` scan a *refusal* runs to name the holder (never
  on a successful open), reported with the number of descriptors this machine had.

    .venv/bin/python bench/lock_cost.py --rounds 5
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import tempfile
import time

from blocktrace.block.locking import WRITABLE, lock_holders, lock_image


def descriptors() -> int:
    n = 0
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            with contextlib.suppress(OSError):  # gone, or not ours to read
                n += len(os.listdir(f"/proc/{pid}/fdinfo"))
    return n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        held, other = os.path.join(d, "held"), os.path.join(d, "other")
        for p in (held, other):
            open(p, "wb").close()
        a, b = os.open(held, os.O_RDWR), os.open(held, os.O_RDWR)
        lock_image(a, held, WRITABLE)
        scans, takes = [], []
        for _ in range(args.rounds):
            t = time.perf_counter()
            found = lock_holders(b)
            scans.append(time.perf_counter() - t)
            assert found, "the holder was not found"
            t = time.perf_counter()
            for _ in range(1000):
                fd = os.open(other, os.O_RDWR)
                lock_image(fd, other, WRITABLE)
                os.close(fd)
            takes.append((time.perf_counter() - t) / 1000)
        base = []
        for _ in range(args.rounds):
            t = time.perf_counter()
            for _ in range(1000):
                os.close(os.open(other, os.O_RDWR))
            base.append((time.perf_counter() - t) / 1000)
    print(
        f"open+lock+close {statistics.median(takes) * 1e6:.1f} us "
        f"(open+close alone {statistics.median(base) * 1e6:.1f} us); "
        f"holder scan {statistics.median(scans) * 1e3:.1f} ms "
        f"(min {min(scans) * 1e3:.1f}, max {max(scans) * 1e3:.1f}) over {descriptors()} "
        f"descriptors; found {found}"
    )


if __name__ == "__main__":
    main()
