#!/usr/bin/env python3
"""Where a JetStream trace spends its time: cProfile of the publishing server and of a replay.

One nats-server (R1) on loopback; ``blocktrace serve`` runs under cProfile with a ``stream``
trace in ``background`` mode while fio writes (``--workload``, as bench/jetstream.py); after
the server stopped (its trace drained), ``blocktrace replay`` from the stream runs under cProfile
too.  Prints, for each process, the CPU seconds of the process, the records (or megabytes) per
second, and the functions with the most internal time and the most cumulative time, so the
split between blocktrace, nats-py and the interpreter's asyncio is visible.  A profile costs
time itself: read proportions, not absolute figures (those are bench/jetstream.py's).

Usage:
    .venv/bin/python bench/jetstream_profile.py [--workload '4k randwrite QD16'|'1M seqwrite QD8']
        [--runtime S] [--size MiB] [--top N] [--baseline TREE]

``--baseline TREE`` runs the same with another source tree's ``src`` on PYTHONPATH.
"""

from __future__ import annotations

import argparse
import io
import os
import pstats
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))

from nbd_fio import EXPORT, PYTHON, WORKLOADS, run_fio, wait_listening  # noqa: E402

from nats_helpers import NatsCluster  # noqa: E402

MiB = 1024 * 1024
SUBJECT = "prof.disk"


def report(prof: Path, top: int) -> str:
    out = io.StringIO()
    stats = pstats.Stats(str(prof), stream=out)
    stats.strip_dirs().sort_stats("tottime").print_stats(top)
    stats.sort_stats("cumulative").print_stats(top)
    return out.getvalue()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workload", default="4k randwrite QD16")
    ap.add_argument("--runtime", type=int, default=8)
    ap.add_argument("--size", type=int, default=256, help="image size, MiB")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--baseline", type=Path, help="profile this source tree instead")
    args = ap.parse_args()
    env = dict(os.environ)
    if args.baseline:
        env["PYTHONPATH"] = os.fspath(args.baseline.resolve() / "src")
    w = next(w for w in WORKLOADS if w.name == args.workload)
    workdir = Path(tempfile.mkdtemp(prefix="bt-prof-js-"))
    try:
        image = workdir / "disk.img"
        with open(image, "wb") as f:
            for _ in range(args.size):
                f.write(os.urandom(MiB))
        base = workdir / "base.img"
        shutil.copyfile(image, base)
        with NatsCluster(workdir / "nats", 1) as cluster:
            url = cluster.url(0, SUBJECT)
            sock = workdir / "s.sock"
            prof = workdir / "serve.prof"
            spec = f"{EXPORT}=stream:{url},copy-mode=background"
            proc = subprocess.Popen(
                [PYTHON, "-m", "cProfile", "-o", str(prof), "-m", "blocktrace", "serve",
                 f"{EXPORT}={image}", "--socket", str(sock), "--trace", spec],
                env=env, stderr=subprocess.DEVNULL,
            )  # fmt: skip
            wait_listening(sock, proc)
            figure, ios = run_fio(f"nbd+unix:///{EXPORT}?socket={sock}", w, args.size * MiB,
                                  args.runtime)  # fmt: skip
            t0 = time.monotonic()
            proc.terminate()  # the trace drains before the server exits
            proc.wait(600)
            drain = time.monotonic() - t0
            print(f"== serve: fio {w.name}: {figure:,.0f} {w.metric} ({ios} I/Os); "
                  f"drain after fio {drain:.1f} s")  # fmt: skip
            print(report(prof, args.top))
            copy = workdir / "copy.img"
            shutil.copyfile(base, copy)
            prof = workdir / "replay.prof"
            t0 = time.monotonic()
            rp = subprocess.Popen(
                [PYTHON, "-m", "cProfile", "-o", str(prof), "-m", "blocktrace", "replay", url,
                 str(copy)],
                env=env, stderr=subprocess.PIPE, text=True,
            )  # fmt: skip
            _, err = rp.communicate(timeout=1800)
            took = time.monotonic() - t0
            if rp.returncode != 0:
                raise RuntimeError(f"replay exited {rp.returncode}: {err[-2000:]}")
            print(f"== replay: {took:.1f} s wall; {err.strip()}")
            print(report(prof, args.top))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
