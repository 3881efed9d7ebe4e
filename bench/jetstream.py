#!/usr/bin/env python3
"""JetStream benchmark (issue 13): tracing to a log file vs publishing to JetStream, and
consumers reading a stream vs a log, in the same run.

Producers: fio (ioengine=nbd, one connection, as bench/nbd_fio.py) against ``blocktrace serve``
tracing to a dm-log-writes log, or to a JetStream stream (R1: one nats-server; R3: a 3-node
cluster on loopback), in ``background`` and ``write-blocking`` mode; a fresh server, log and
nats-server store per measurement.

Consumers: one ``serve`` traces the same fio run to a log *and* to an R1 stream (two targets of
one trace filter, so both hold the same records); then the time ``blocktrace replay`` takes from
the log and from the stream onto a copy of the base, and ``blocktrace log save`` from the
stream.  Rates are the data the replay wrote (its "bytes written") per second of the command's
wall time, the same numerator for log and stream.

``--baseline TREE`` measures another source tree (its ``src`` on PYTHONPATH) too, each row right
after this tree's, so both see the same load.  Figures are only reported, never asserted.

Usage:
    .venv/bin/python bench/jetstream.py [--runtime S] [--size MiB] [--baseline TREE]
        [--markdown FILE]
"""

from __future__ import annotations

import argparse
import os
import re
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
PRODUCER_WORKLOADS = ("4k randwrite QD16", "1M seqwrite QD8")


def tree_env(tree: Path | None) -> dict[str, str]:
    env = dict(os.environ)
    if tree is not None:
        env["PYTHONPATH"] = os.fspath(tree.resolve() / "src")
    return env


def serve(
    image: Path, sock: Path, traces: list[str], env: dict[str, str]
) -> subprocess.Popen[bytes]:
    cmd = [PYTHON, "-m", "blocktrace", "serve", f"{EXPORT}={image}", "--socket", str(sock)]
    for spec in traces:
        cmd += ["--trace", spec]
    proc = subprocess.Popen(cmd, stderr=subprocess.DEVNULL, env=env)
    wait_listening(sock, proc)
    return proc


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    proc.wait(600)  # the trace drains before the server exits: every record is published


def measure(
    workdir: Path,
    image: Path,
    target: str,
    mode: str,
    workload: str,
    size: int,
    runtime: int,
    env: dict[str, str],
) -> tuple[float, int]:
    """One fio run; returns (figure, peak RSS of the server)."""
    w = next(w for w in WORKLOADS if w.name == workload)
    run_dir = Path(tempfile.mkdtemp(dir=workdir))
    sock = run_dir / "s.sock"
    cluster = None
    try:
        if target == "log":
            spec = f"{EXPORT}=log:{run_dir / 'trace.log'},copy-mode={mode}"
        else:
            nodes = 3 if target == "R3" else 1
            cluster = NatsCluster(run_dir / "nats", nodes).start()
            spec = f"{EXPORT}=stream:{cluster.url(0, SUBJECT)},copy-mode={mode},replicas={nodes}"
        proc = serve(image, sock, [spec], env)
        try:
            figure, _ios = run_fio(f"nbd+unix:///{EXPORT}?socket={sock}", w, size, runtime)
            rss = peak_rss(proc.pid)
        finally:
            stop(proc)
    finally:
        if cluster is not None:
            cluster.stop()
        shutil.rmtree(run_dir, ignore_errors=True)
    return figure, rss


def timed(cmd: list[str], env: dict[str, str]) -> tuple[float, str]:
    t0 = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, env=env)
    took = time.monotonic() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr[-2000:]}")
    return took, proc.stderr


def written(stderr: str) -> int:
    """The data bytes a ``replay`` reported writing."""
    found = re.search(r"(\d+) bytes written", stderr)
    if found is None:
        raise RuntimeError(f"replay did not report its bytes: {stderr[-500:]}")
    return int(found.group(1))


def consumers(
    workdir: Path, base: Path, workload: str, size: int, runtime: int, env: dict[str, str]
) -> dict[str, tuple[float, float]]:
    """The same records in a log and an R1 stream; (seconds, MB/s) per consumer."""
    w = next(w for w in WORKLOADS if w.name == workload)
    run_dir = Path(tempfile.mkdtemp(dir=workdir))
    image = run_dir / "disk.img"
    shutil.copyfile(base, image)
    log = run_dir / "trace.log"
    out: dict[str, tuple[float, float]] = {}
    with NatsCluster(run_dir / "nats", 1) as cluster:
        url = cluster.url(0, SUBJECT)
        traces = [f"{EXPORT}=log:{log}", f"{EXPORT}=stream:{url}"]
        proc = serve(image, run_dir / "s.sock", traces, env)
        try:
            run_fio(f"nbd+unix:///{EXPORT}?socket={run_dir / 's.sock'}", w, size, runtime)
        finally:
            stop(proc)
        copy = run_dir / "copy.img"
        for name, src in (
            ("replay from the log file", str(log)),
            ("replay from JetStream R1", url),
        ):
            shutil.copyfile(base, copy)
            took, err = timed([PYTHON, "-m", "blocktrace", "replay", src, str(copy)], env)
            if copy.read_bytes() != image.read_bytes():
                raise RuntimeError(f"{name}: the replayed copy differs from the image")
            out[name] = (took, written(err) / 1e6 / took)
        saved = run_dir / "saved.log"
        took, _ = timed([PYTHON, "-m", "blocktrace", "log", "save", url, str(saved)], env)
        out["log save from JetStream R1"] = (took, saved.stat().st_size / 1e6 / took)
    shutil.rmtree(run_dir, ignore_errors=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runtime", type=int, default=8)
    ap.add_argument("--size", type=int, default=512, help="image size, MiB")
    ap.add_argument("--baseline", type=Path, metavar="TREE", help="also measure this tree")
    ap.add_argument("--markdown", type=Path)
    args = ap.parse_args()
    trees: list[tuple[str, dict[str, str]]] = [("this tree", tree_env(None))]
    if args.baseline:
        trees.append(("baseline", tree_env(args.baseline)))
    workdir = Path(tempfile.mkdtemp(prefix="bt-bench-js-"))
    rows: list[str] = []
    try:
        image = workdir / "disk.img"
        with open(image, "wb") as f:  # random data, not sparse (as bench/nbd_fio.py)
            for _ in range(args.size):
                f.write(os.urandom(MiB))
        base = workdir / "base.img"
        shutil.copyfile(image, base)
        size = args.size * MiB
        results: dict[tuple[str, str, str, str], tuple[float, int]] = {}
        for workload in PRODUCER_WORKLOADS:
            for target in ("log", "R1", "R3"):
                for mode in ("background", "write-blocking"):
                    for tree, env in trees:
                        shutil.copyfile(base, image)
                        fig, rss = measure(
                            workdir, image, target, mode, workload, size, args.runtime, env
                        )
                        results[(tree, workload, target, mode)] = (fig, rss)
                        print(f"{tree}: {workload} {target} {mode}: {fig:,.0f} rss "
                              f"{rss // MiB} MiB", flush=True)  # fmt: skip
        consumed: dict[tuple[str, str], dict[str, tuple[float, float]]] = {}
        for workload in PRODUCER_WORKLOADS:
            for tree, env in trees:
                consumed[(tree, workload)] = got = consumers(
                    workdir, base, workload, size, args.runtime, env
                )
                print(f"{tree}: consumers of {workload}: {got}", flush=True)
        names = [t for t, _ in trees]
        head = " | ".join(f"{m} ({t})" for t in names for m in ("background", "write-blocking"))
        rows.append(f"| workload | target | {head} | peak RSS bg, this tree (MiB) |")
        rows.append("|---|---|" + "---:|" * (2 * len(names) + 1))
        for workload in PRODUCER_WORKLOADS:
            unit = "IOPS" if workload.startswith("4k") else "MB/s"
            for target in ("log", "R1", "R3"):
                cells = " | ".join(
                    f"{results[(t, workload, target, m)][0]:,.0f}"
                    for t in names
                    for m in ("background", "write-blocking")
                )
                rss = results[(names[0], workload, target, "background")][1]
                name = "log file" if target == "log" else f"JetStream {target}"
                rows.append(f"| {workload} ({unit}) | {name} | {cells} | {rss // MiB} |")
        rows.append("")
        rows.append("| ratio to the log file, background | 4k randwrite | 1M seqwrite | goal |")
        rows.append("|---|---:|---:|---|")
        for tree in names:
            for target in ("R1", "R3"):
                r4, r1 = (
                    results[(tree, wl, target, "background")][0]
                    / results[(tree, wl, "log", "background")][0]
                    for wl in PRODUCER_WORKLOADS
                )
                goal = ">= 0.7x / >= 0.5x" if target == "R1" else "-"
                rows.append(f"| JetStream {target} ({tree}) | {r4:.2f} | {r1:.2f} | {goal} |")
        rows.append("")
        rows.append(
            "| records of | consumer | "
            + " | ".join(f"time ({t}) | data MB/s ({t})" for t in names)
            + " |"
        )
        rows.append("|---|---|" + "---:|" * (2 * len(names)))
        for workload in PRODUCER_WORKLOADS:
            for consumer in consumed[(names[0], workload)]:
                cells = " | ".join(
                    f"{consumed[(t, workload)][consumer][0]:.1f} s | "
                    f"{consumed[(t, workload)][consumer][1]:,.0f}"
                    for t in names
                )
                rows.append(f"| {workload} | {consumer} | {cells} |")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    text = "\n".join(rows)
    print(text)
    if args.markdown:
        args.markdown.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
