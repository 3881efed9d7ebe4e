#!/usr/bin/env python3
"""JetStream benchmark (issue 13): tracing to a log file vs publishing to JetStream, and
consumers reading a stream vs a log, in the same run.

Producers: fio (ioengine=nbd, one connection, as bench/nbd_fio.py) against ``blocktrace serve``
tracing to a dm-log-writes log, or to a JetStream stream (R1: one nats-server; R3: a 3-node
cluster on loopback), in ``background`` and ``write-blocking`` mode; a fresh server, log and
nats-server store per measurement.  Consumers: after a 1 MiB sequential run, the time
``blocktrace replay`` takes from the log and from the stream (R1) onto a copy of the base, and
``blocktrace log save`` from the stream.  Figures are only reported, never asserted.

Usage:
    .venv/bin/python bench/jetstream.py [--runtime S] [--size MiB] [--markdown FILE]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))

from nbd_fio import EXPORT, PYTHON, WORKLOADS, peak_rss, run_fio, wait_listening  # noqa: E402

from nats_helpers import NatsCluster  # noqa: E402

MiB = 1024 * 1024
SUBJECT = "bench.disk"


def serve(image: Path, sock: Path, trace: str) -> subprocess.Popen[bytes]:
    cmd = [PYTHON, "-m", "blocktrace", "serve", f"{EXPORT}={image}", "--socket", str(sock)]
    proc = subprocess.Popen([*cmd, "--trace", trace], stderr=subprocess.DEVNULL)
    wait_listening(sock, proc)
    return proc


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    proc.wait(120)


def measure(
    workdir: Path, image: Path, target: str, mode: str, workload: str, size: int, runtime: int
) -> tuple[float, int, Path | None, NatsCluster | None]:
    """One fio run; returns (figure, peak RSS, log path, live cluster for the consumers)."""
    w = next(w for w in WORKLOADS if w.name == workload)
    run_dir = Path(tempfile.mkdtemp(dir=workdir))
    sock = run_dir / "s.sock"
    cluster = None
    log = None
    if target == "log":
        log = run_dir / "trace.log"
        spec = f"{EXPORT}=log:{log},copy-mode={mode}"
    else:
        nodes = 3 if target == "R3" else 1
        cluster = NatsCluster(run_dir / "nats", nodes).start()
        spec = f"{EXPORT}=stream:{cluster.url(0, SUBJECT)},copy-mode={mode},replicas={nodes}"
    proc = serve(image, sock, spec)
    try:
        figure, _ios = run_fio(f"nbd+unix:///{EXPORT}?socket={sock}", w, size, runtime)
        rss = peak_rss(proc.pid)
    finally:
        stop(proc)  # the trace drains before the server exits: every record is published
    return figure, rss, log, cluster


def timed(cmd: list[str]) -> float:
    t0 = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr[-2000:]}")
    return time.monotonic() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runtime", type=int, default=8)
    ap.add_argument("--size", type=int, default=512, help="image size, MiB")
    ap.add_argument("--markdown", type=Path)
    args = ap.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="bt-bench-js-"))
    rows: list[str] = []
    try:
        image = workdir / "disk.img"
        with open(image, "wb") as f:  # random data, not sparse (as bench/nbd_fio.py)
            for _ in range(args.size):
                f.write(__import__("os").urandom(MiB))
        base = workdir / "base.img"
        shutil.copyfile(image, base)
        size = args.size * MiB
        results: dict[tuple[str, str, str], tuple[float, int]] = {}
        consumer_rows: list[str] = []
        for workload in ("4k randwrite QD16", "1M seqwrite QD8"):
            for target in ("log", "R1", "R3"):
                for mode in ("background", "write-blocking"):
                    shutil.copyfile(base, image)
                    fig, rss, log, cluster = measure(
                        workdir, image, target, mode, workload, size, args.runtime
                    )
                    results[(workload, target, mode)] = (fig, rss)
                    print(f"{workload} {target} {mode}: {fig:,.0f} rss {rss // MiB} MiB",
                          flush=True)  # fmt: skip
                    try:
                        if workload.startswith("1M") and mode == "background":
                            copy = workdir / "copy.img"
                            shutil.copyfile(base, copy)
                            if log is not None:
                                src = str(log)
                            else:
                                assert cluster is not None
                                src = cluster.url(0, SUBJECT)
                            t = timed([PYTHON, "-m", "blocktrace", "replay", src, str(copy)])
                            consumer_rows.append(
                                f"| replay from {target if cluster else 'log file'} | "
                                f"{t:.1f} s | {_data_mb(src, log) / t:,.0f}"
                                " MB/s |"
                            )
                            if cluster is not None:
                                out = workdir / f"saved-{target}.log"
                                t = timed([PYTHON, "-m", "blocktrace", "log", "save", src,
                                           str(out)])  # fmt: skip
                                consumer_rows.append(
                                    f"| log save from {target} | {t:.1f} s | "
                                    f"{out.stat().st_size / 1e6 / t:,.0f} MB/s |"
                                )
                                out.unlink()
                    finally:
                        if cluster is not None:
                            cluster.stop()
        rows.append("| workload | target | background | write-blocking | peak RSS bg (MiB) |")
        rows.append("|---|---|---:|---:|---:|")
        for workload in ("4k randwrite QD16", "1M seqwrite QD8"):
            unit = "IOPS" if workload.startswith("4k") else "MB/s"
            for target in ("log", "R1", "R3"):
                bg, rss = results[(workload, target, "background")]
                wb, _ = results[(workload, target, "write-blocking")]
                name = "log file" if target == "log" else f"JetStream {target}"
                rows.append(
                    f"| {workload} ({unit}) | {name} | {bg:,.0f} | {wb:,.0f} | {rss // MiB} |"
                )
        rows.append("")
        rows.append("| ratio, background | 4k randwrite | 1M seqwrite | goal |")
        rows.append("|---|---:|---:|---|")
        for target in ("R1", "R3"):
            r4 = (
                results[("4k randwrite QD16", target, "background")][0]
                / results[("4k randwrite QD16", "log", "background")][0]
            )
            r1 = (
                results[("1M seqwrite QD8", target, "background")][0]
                / results[("1M seqwrite QD8", "log", "background")][0]
            )
            goal = ">= 0.7x / >= 0.5x" if target == "R1" else "-"
            rows.append(f"| JetStream {target} / log file | {r4:.2f} | {r1:.2f} | {goal} |")
        rows.append("")
        rows.append("| consumer (stream of the 1M seqwrite run) | time | data rate |")
        rows.append("|---|---:|---:|")
        rows.extend(consumer_rows)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    text = "\n".join(rows)
    print(text)
    if args.markdown:
        args.markdown.write_text(text + "\n")
    return 0


def _data_mb(src: str, log: Path | None) -> float:
    """Megabytes of records the replay read: the log's size, or the stream's bytes."""
    if log is not None:
        return log.stat().st_size / 1e6
    import asyncio

    from blocktrace.jetstream.conn import NatsURL
    from blocktrace.jetstream.consumer import StreamSource

    async def nbytes() -> float:
        async with StreamSource(NatsURL.parse(src)) as s:
            return await s.stored_bytes() / 1e6

    return asyncio.run(nbytes())


if __name__ == "__main__":
    sys.exit(main())
