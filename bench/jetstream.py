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
wall time, the same numerator for log and stream; the consumer's CPU seconds (user + system)
are reported too, being what a loaded machine disturbs least.

``--baseline TREE`` measures another source tree (its ``src`` on PYTHONPATH) too, each row right
after this tree's, so both see the same load.  Figures are only reported, never asserted.

``--rounds N`` repeats every measurement N times (rows interleaved round by round) and reports
the median, with the range; ``--workloads``, ``--targets``, ``--modes`` select rows (comma
lists), ``--no-consumers`` skips the consumers.

Usage:
    .venv/bin/python bench/jetstream.py [--runtime S] [--size MiB] [--baseline TREE]
        [--rounds N] [--workloads W,..] [--targets log,R1,R3] [--modes background,write-blocking]
        [--no-consumers] [--markdown FILE]
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import shutil
import statistics
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


def timed(cmd: list[str], env: dict[str, str]) -> tuple[float, float, str]:
    """Run ``cmd``: its wall seconds, its CPU seconds (user + system: what a loaded machine
    disturbs least) and its stderr."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, env=env)
    took = time.monotonic() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr[-2000:]}")
    return took, cpu, proc.stderr


def written(stderr: str) -> int:
    """The data bytes a ``replay`` reported writing."""
    found = re.search(r"(\d+) bytes written", stderr)
    if found is None:
        raise RuntimeError(f"replay did not report its bytes: {stderr[-500:]}")
    return int(found.group(1))


def consumers(
    workdir: Path, base: Path, workload: str, size: int, runtime: int, env: dict[str, str]
) -> dict[str, tuple[float, float, float]]:
    """The same records in a log and an R1 stream; (seconds, MB/s, CPU seconds) per
    consumer."""
    w = next(w for w in WORKLOADS if w.name == workload)
    run_dir = Path(tempfile.mkdtemp(dir=workdir))
    image = run_dir / "disk.img"
    shutil.copyfile(base, image)
    log = run_dir / "trace.log"
    out: dict[str, tuple[float, float, float]] = {}
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
            took, cpu, err = timed([PYTHON, "-m", "blocktrace", "replay", src, str(copy)], env)
            if copy.read_bytes() != image.read_bytes():
                raise RuntimeError(f"{name}: the replayed copy differs from the image")
            out[name] = (took, written(err) / 1e6 / took, cpu)
        saved = run_dir / "saved.log"
        took, cpu, _ = timed([PYTHON, "-m", "blocktrace", "log", "save", url, str(saved)], env)
        out["log save from JetStream R1"] = (took, saved.stat().st_size / 1e6 / took, cpu)
    shutil.rmtree(run_dir, ignore_errors=True)
    return out


def median(values: list[float]) -> str:
    """``median [min..max]`` of a row's rounds (just the value for one round)."""
    text = f"{statistics.median(values):,.0f}"
    if len(values) > 1:
        text += f" [{min(values):,.0f}..{max(values):,.0f}]"
    return text


def ratio(
    figures: dict[tuple[str, str, str, str], list[float]],
    tree: str,
    workload: str,
    target: str,
    mode: str,
) -> float:
    """Median of ``target``'s rounds over the median of the log target's."""
    own = statistics.median(figures[(tree, workload, target, mode)])
    return own / statistics.median(figures[(tree, workload, "log", mode)])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runtime", type=int, default=8)
    ap.add_argument("--size", type=int, default=512, help="image size, MiB")
    ap.add_argument("--baseline", type=Path, metavar="TREE", help="also measure this tree")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--workloads", default=",".join(PRODUCER_WORKLOADS))
    ap.add_argument("--targets", default="log,R1,R3")
    ap.add_argument("--modes", default="background,write-blocking")
    ap.add_argument("--no-consumers", action="store_true")
    ap.add_argument("--markdown", type=Path)
    args = ap.parse_args()
    workloads = [w for w in args.workloads.split(",") if w]
    targets = [t for t in args.targets.split(",") if t]
    modes = [m for m in args.modes.split(",") if m]
    trees: list[tuple[str, dict[str, str]]] = [("this tree", tree_env(None))]
    if args.baseline:
        trees.append(("baseline", tree_env(args.baseline)))
    names = [t for t, _ in trees]
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
        figures: dict[tuple[str, str, str, str], list[float]] = {}
        rss: dict[tuple[str, str, str, str], int] = {}
        consumed: dict[tuple[str, str, str], list[tuple[float, float, float]]] = {}
        for _ in range(args.rounds):
            for workload in workloads:
                for target in targets:
                    for mode in modes:
                        for tree, env in trees:
                            key = (tree, workload, target, mode)
                            shutil.copyfile(base, image)
                            fig, peak = measure(
                                workdir, image, target, mode, workload, size, args.runtime, env
                            )
                            figures.setdefault(key, []).append(fig)
                            rss[key] = max(rss.get(key, 0), peak)
                            print(f"{tree}: {workload} {target} {mode}: {fig:,.0f} rss "
                                  f"{peak // MiB} MiB", flush=True)  # fmt: skip
            for workload in [] if args.no_consumers else workloads:
                for tree, env in trees:
                    got = consumers(workdir, base, workload, size, args.runtime, env)
                    for consumer, value in got.items():
                        consumed.setdefault((tree, workload, consumer), []).append(value)
                    print(f"{tree}: consumers of {workload}: {got}", flush=True)
        cols = [(t, m) for t in names for m in modes]
        head = " | ".join(f"{m} ({t})" for t, m in cols)
        rows.append(f"| workload | target | {head} | peak RSS {modes[0]}, this tree (MiB) |")
        rows.append("|---|---|" + "---:|" * (len(cols) + 1))
        for workload in workloads:
            unit = "IOPS" if workload.startswith("4k") else "MB/s"
            for target in targets:
                cells = " | ".join(median(figures[(t, workload, target, m)]) for t, m in cols)
                peak = rss[(names[0], workload, target, modes[0])]
                name = "log file" if target == "log" else f"JetStream {target}"
                rows.append(f"| {workload} ({unit}) | {name} | {cells} | {peak // MiB} |")
        if "log" in targets:
            rows.append("")
            rows.append(
                "| ratio of medians to the log file | mode | " + " | ".join(workloads) + " |"
            )
            rows.append("|---|---|" + "---:|" * len(workloads))
            for tree in names:
                for target in (t for t in targets if t != "log"):
                    for mode in modes:
                        ratios = " | ".join(
                            f"{ratio(figures, tree, wl, target, mode):.2f}" for wl in workloads
                        )
                        rows.append(f"| JetStream {target} ({tree}) | {mode} | {ratios} |")
        if consumed:
            rows.append("")
            rows.append(
                "| records of | consumer | "
                + " | ".join(f"time ({t}) | data MB/s ({t}) | CPU s ({t})" for t in names)
                + " |"
            )
            rows.append("|---|---|" + "---:|" * (3 * len(names)))
            for workload in workloads:
                for consumer in ("replay from the log file", "replay from JetStream R1",
                                 "log save from JetStream R1"):  # fmt: skip
                    cells = []
                    for t in names:
                        runs = consumed[(t, workload, consumer)]
                        cells.append(
                            f"{statistics.median(v[0] for v in runs):.1f} s | "
                            f"{median([v[1] for v in runs])} | "
                            f"{statistics.median(v[2] for v in runs):.2f}"
                        )
                    rows.append(f"| {workload} | {consumer} | {' | '.join(cells)} |")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    text = "\n".join(rows)
    print(text)
    if args.markdown:
        args.markdown.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
