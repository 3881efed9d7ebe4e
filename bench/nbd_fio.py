#!/usr/bin/env python3
"""Side-by-side NBD benchmark: fio's nbd engine against blocktrace and its peers, same run.

Every contender serves the same raw image over a Unix socket; fio (ioengine=nbd, one
connection) drives each workload against each contender in turn, with a fresh server (and a
fresh log, for the tracing contenders) per measurement.  The report gives absolute figures,
ratios against the named baseline, and each server's peak RSS (VmHWM).  Timings are only ever
reported here, never asserted by tests.

Usage:
    .venv/bin/python bench/nbd_fio.py [--runtime S] [--size MiB] [--only NAME,...]
                                      [--repeat N] [--markdown FILE] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

MiB = 1024 * 1024
EXPORT = "disk"
PYTHON = sys.executable


@dataclass(frozen=True)
class Workload:
    name: str
    rw: str
    bs: str
    iodepth: int
    metric: str  # "iops", "MB/s", "p50 us" or "p99 us" (completion latency percentiles)
    direction: str  # fio JSON section: "read" or "write"
    default: bool = True  # run unless --workloads names others


WORKLOADS = [
    Workload("4k randwrite QD16", "randwrite", "4k", 16, "iops", "write"),
    Workload("4k randread QD16", "randread", "4k", 16, "iops", "read"),
    Workload("1M seqwrite QD8", "write", "1M", 8, "MB/s", "write"),
    Workload("4k randwrite QD1 p50", "randwrite", "4k", 1, "p50 us", "write", default=False),
    Workload("4k randwrite QD1 p99", "randwrite", "4k", 1, "p99 us", "write", default=False),
]


@dataclass
class Contender:
    """A server to measure: ``command(image, socket, workdir)`` returns its argv."""

    name: str
    command: Callable[[Path, Path, Path], list[str]]
    #: a helper process started first (e.g. the qemu-nbd a replica target writes to)
    sidecar: Callable[[Path, Path], list[str]] | None = None
    peak_rss: int = 0
    #: workload -> one figure per round (rounds interleave contenders: see --repeat)
    samples: dict[str, list[float]] = field(default_factory=dict)
    #: workload -> median of the samples
    results: dict[str, float] = field(default_factory=dict)
    #: workload -> server CPU microseconds per I/O, one per round (includes fio's 1 s ramp)
    cpu_us: dict[str, list[float]] = field(default_factory=dict)
    #: environment for the server (``--baseline``: PYTHONPATH of the old tree)
    env: dict[str, str] | None = None


def qemu_nbd(image: Path, sock: Path, workdir: Path) -> list[str]:
    return [
        "qemu-nbd",
        "-t",
        "-f",
        "raw",
        "-x",
        EXPORT,
        "-k",
        str(sock),
        "--cache=writeback",
        "--discard=unmap",
        str(image),
    ]


def qemu_nbd_uring(image: Path, sock: Path, workdir: Path) -> list[str]:
    return [*qemu_nbd(image, sock, workdir)[:-1], "--aio=io_uring", str(image)]


def qemu_nbd_blklogwrites(image: Path, sock: Path, workdir: Path) -> list[str]:
    log = workdir / "qemu.log"
    log.write_bytes(b"")
    opts = (
        f"driver=blklogwrites,file.driver=file,file.filename={image},"
        f"log.driver=file,log.filename={log},log-sector-size=512"
    )
    return [
        "qemu-nbd",
        "-t",
        "--image-opts",
        opts,
        "-x",
        EXPORT,
        "-k",
        str(sock),
        "--cache=writeback",
        "--discard=unmap",
    ]


def blocktrace(*extra: str) -> Callable[[Path, Path, Path], list[str]]:
    def command(image: Path, sock: Path, workdir: Path) -> list[str]:
        args = [
            a.replace("{log}", str(workdir / "trace.log")).replace("{workdir}", str(workdir))
            for a in extra
        ]
        return [
            PYTHON,
            "-m",
            "blocktrace",
            "serve",
            f"{EXPORT}={image}",
            "--socket",
            str(sock),
            *args,
        ]

    return command


def replica_qemu_nbd(workdir: Path, image: Path) -> list[str]:
    """The replica's server: qemu-nbd on a copy of the image (the replica starts in sync, so
    ``sync=none`` is truthful and the figures measure streaming, not the initial copy)."""
    replica = workdir / "replica.img"
    shutil.copyfile(image, replica)
    return ["qemu-nbd", "-t", "-f", "raw", "-x", "r", "-k", str(workdir / "replica.sock"),
            "--cache=writeback", str(replica)]  # fmt: skip


def replica_qemu_nbd_uring(workdir: Path, image: Path) -> list[str]:
    """The same, with qemu-nbd's io_uring AIO (no thread-pool hop per write)."""
    return [*replica_qemu_nbd(workdir, image)[:-1], "--aio=io_uring", str(workdir / "replica.img")]


def replica_blocktrace(workdir: Path, image: Path) -> list[str]:
    """Another ``blocktrace serve`` as the replica's server (docs/replica.md: any NBD export)."""
    replica = workdir / "replica.img"
    shutil.copyfile(image, replica)
    return [PYTHON, "-m", "blocktrace", "serve", f"r={replica}", "--socket",
            str(workdir / "replica.sock")]  # fmt: skip


def replica_trace(mode: str) -> list[str]:
    uri = "nbd+unix:///r?socket={workdir}/replica.sock"
    return ["--trace", f"{EXPORT}=nbd:{uri},sync=none,copy-mode={mode}"]


def replica_file(mode: str) -> Callable[[Path, Path, Path], list[str]]:
    """A local ``replica:`` image, a copy of the source made first (``sync=none`` is then
    truthful, as for the qemu-nbd replica: the figures measure streaming)."""
    traced = blocktrace(
        "--trace", f"{EXPORT}=replica:{{workdir}}/replica.img,sync=none,copy-mode={mode}"
    )

    def command(image: Path, sock: Path, workdir: Path) -> list[str]:
        shutil.copyfile(image, workdir / "replica.img")
        return traced(image, sock, workdir)

    return command


CONTENDERS = [
    Contender("qemu-nbd", qemu_nbd),
    Contender("blocktrace", blocktrace()),
    Contender("qemu-nbd+blklogwrites", qemu_nbd_blklogwrites),
    Contender(
        "blocktrace+log background",
        blocktrace("--trace", f"{EXPORT}=log:{{log}},copy-mode=background"),
    ),
    Contender(
        "blocktrace+log write-blocking",
        blocktrace("--trace", f"{EXPORT}=log:{{log}},copy-mode=write-blocking"),
    ),
    Contender(  # the log through the page cache, as blklogwrites writes its log
        "blocktrace+log background buffered",
        blocktrace("--trace", f"{EXPORT}=log:{{log}},copy-mode=background,direct=off"),
    ),
    Contender(
        "blocktrace+replica background",
        blocktrace(*replica_trace("background")),
        sidecar=replica_qemu_nbd,
    ),
    Contender(
        "blocktrace+replica write-blocking",
        blocktrace(*replica_trace("write-blocking")),
        sidecar=replica_qemu_nbd,
    ),
    Contender("qemu-nbd io_uring", qemu_nbd_uring),
    Contender(
        "blocktrace+replica(io_uring) background",
        blocktrace(*replica_trace("background")),
        sidecar=replica_qemu_nbd_uring,
    ),
    Contender(
        "blocktrace+replica(io_uring) write-blocking",
        blocktrace(*replica_trace("write-blocking")),
        sidecar=replica_qemu_nbd_uring,
    ),
    Contender(
        "blocktrace+replica(blocktrace) background",
        blocktrace(*replica_trace("background")),
        sidecar=replica_blocktrace,
    ),
    Contender(
        "blocktrace+replica(blocktrace) write-blocking",
        blocktrace(*replica_trace("write-blocking")),
        sidecar=replica_blocktrace,
    ),
    Contender("blocktrace+replica(file) background", replica_file("background")),
    Contender("blocktrace+replica(file) write-blocking", replica_file("write-blocking")),
]

#: (row name, contender, baseline, goal) printed as ratios
RATIOS = [
    ("blocktrace / qemu-nbd", "blocktrace", "qemu-nbd", 1.0),
    (
        "traced background / qemu-nbd+blklogwrites",
        "blocktrace+log background",
        "qemu-nbd+blklogwrites",
        None,
    ),
    (
        "traced write-blocking / qemu-nbd+blklogwrites",
        "blocktrace+log write-blocking",
        "qemu-nbd+blklogwrites",
        None,
    ),
    ("traced background / untraced blocktrace", "blocktrace+log background", "blocktrace", 0.8),
    (
        "traced background buffered / qemu-nbd+blklogwrites",
        "blocktrace+log background buffered",
        "qemu-nbd+blklogwrites",
        None,
    ),
    (
        "replica background / untraced blocktrace",
        "blocktrace+replica background",
        "blocktrace",
        0.8,
    ),
    (
        "replica write-blocking / untraced blocktrace",
        "blocktrace+replica write-blocking",
        "blocktrace",
        None,
    ),
    *(
        (
            f"replica{kind} {mode} / untraced blocktrace",
            f"blocktrace+replica{kind} {mode}",
            "blocktrace",
            0.8 if mode == "background" else None,
        )
        for kind in ("(io_uring)", "(blocktrace)", "(file)")
        for mode in ("background", "write-blocking")
    ),
    ("replica background / qemu-nbd alone", "blocktrace+replica background", "qemu-nbd", None),
    (
        "replica(io_uring) background / qemu-nbd io_uring alone",
        "blocktrace+replica(io_uring) background",
        "qemu-nbd io_uring",
        None,
    ),
]


def wait_listening(sock: Path, proc: subprocess.Popen[bytes], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited {proc.returncode}: {proc.args!r}")
        if sock.exists():
            with socket.socket(socket.AF_UNIX) as s:
                try:
                    s.connect(str(sock))
                    return
                except OSError:
                    pass
        time.sleep(0.05)
    raise RuntimeError(f"server did not listen on {sock}")


def peak_rss(pid: int) -> int:
    """VmHWM of a live process, in bytes."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def run_fio(uri: str, w: Workload, size: int, runtime: int) -> tuple[float, int]:
    """The workload's figure and the number of I/Os fio completed (after its ramp)."""
    cmd = [
        "fio",
        "--name=bench",
        "--ioengine=nbd",
        f"--uri={uri}",
        f"--rw={w.rw}",
        f"--bs={w.bs}",
        f"--iodepth={w.iodepth}",
        f"--size={size}",
        "--time_based",
        f"--runtime={runtime}",
        "--ramp_time=1",
        "--norandommap",
        "--randrepeat=0",
        "--output-format=json",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=runtime + 120, check=True)
    job = json.loads(out.stdout[out.stdout.index("{") :])["jobs"][0][w.direction]
    ios = int(job.get("total_ios", 0))
    if w.metric == "iops":
        return float(job["iops"]), ios
    if w.metric == "MB/s":
        return float(job["bw"]) * 1024 / 1e6, ios
    pct = "50.000000" if w.metric == "p50 us" else "99.000000"
    return float(job["clat_ns"]["percentile"][pct]) / 1000, ios


def cpu_seconds(pid: int) -> float:
    """User + system CPU the process used so far (``/proc/PID/stat``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(c: Contender, image: Path, w: Workload, size: int, runtime: int) -> float:
    with tempfile.TemporaryDirectory(prefix="bench-", dir=image.parent) as tmp:
        workdir = Path(tmp)
        sock = workdir / "nbd.sock"
        procs: list[subprocess.Popen[bytes]] = []
        with open(workdir / "stderr", "wb") as err:
            try:
                if c.sidecar is not None:
                    side = subprocess.Popen(c.sidecar(workdir, image), stderr=err)
                    procs.append(side)
                    wait_listening(workdir / "replica.sock", side)
                proc = subprocess.Popen(
                    c.command(image, sock, workdir),
                    stdout=subprocess.DEVNULL,
                    stderr=err,
                    env=c.env,
                )
                procs.insert(0, proc)
                wait_listening(sock, proc)
                cpu = cpu_seconds(proc.pid)
                value, ios = run_fio(f"nbd+unix:///{EXPORT}?socket={sock}", w, size, runtime)
                cpu = cpu_seconds(proc.pid) - cpu
                if ios:  # less sensitive to the neighbours' load than throughput
                    c.cpu_us.setdefault(w.name, []).append(cpu * 1e6 / ios)
                c.peak_rss = max(c.peak_rss, peak_rss(proc.pid))
            finally:
                for p in procs:  # the server first: it flushes to its sidecar on the way out
                    p.send_signal(signal.SIGTERM)
                    try:
                        p.wait(60)
                    except subprocess.TimeoutExpired:
                        p.kill()
                        p.wait()
        return value


def machine() -> str:
    cpu = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    qemu = subprocess.run(["qemu-nbd", "--version"], capture_output=True, text=True)
    return (
        f"{os.cpu_count()} cores ({cpu}), {platform.platform()}, Python "
        f"{platform.python_version()}, {qemu.stdout.splitlines()[0]}, "
        f"{subprocess.run(['fio', '--version'], capture_output=True, text=True).stdout.strip()}"
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runtime", type=int, default=8, help="seconds per measurement")
    ap.add_argument("--size", type=int, default=512, help="image size in MiB")
    ap.add_argument("--only", help="comma-separated contender names")
    ap.add_argument(
        "--workloads", help="comma-separated workload names (default: the throughput ones)"
    )
    ap.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="rounds; each round measures every contender once, so a ratio pairs figures "
        "taken minutes apart, not a whole run apart; medians are reported",
    )
    ap.add_argument(
        "--baseline",
        type=Path,
        metavar="TREE",
        help="also run every blocktrace contender from another source tree (e.g. `git "
        "archive main | tar -x -C /tmp/base`), as 'base:NAME', interleaved in the same "
        "rounds, and report NAME / base:NAME",
    )
    ap.add_argument("--dir", type=Path, help="where to put the image (default: a temp dir)")
    ap.add_argument("--markdown", type=Path, help="write the report as Markdown here")
    ap.add_argument("--json", type=Path, help="write raw results as JSON here")
    ap.add_argument(
        "--compare",
        metavar="PYTHON",
        help="also run every selected blocktrace contender with this interpreter (another "
        "tree's venv, e.g. a scratch worktree of an older commit), interleaved in the same "
        "rounds, and print this tree / that tree ratios",
    )
    ap.add_argument(
        "--compare-label", default="other tree", help="what --compare's contenders are called"
    )
    args = ap.parse_args()
    for tool in ("fio", "qemu-nbd"):
        if shutil.which(tool) is None:
            print(f"bench: {tool} is not installed (run scripts/setup.sh)", file=sys.stderr)
            return 2
    contenders = CONTENDERS
    if args.only:
        wanted = set(args.only.split(","))
        contenders = [c for c in CONTENDERS if c.name in wanted]
    ratios = list(RATIOS)
    if args.compare:
        paired: list[Contender] = []
        for c in contenders:
            paired.append(c)
            if c.name.startswith("blocktrace"):
                other = with_python(c, args.compare, f"{c.name} @{args.compare_label}")
                paired.append(other)
                ratios.append((f"{c.name}: this / {args.compare_label}", c.name, other.name, None))
        contenders = paired
    if args.baseline:
        env = dict(os.environ, PYTHONPATH=os.fspath(args.baseline.resolve() / "src"))
        based = []
        for c in contenders:
            based.append(c)
            if c.name.startswith("blocktrace"):
                based.append(Contender(f"base:{c.name}", c.command, c.sidecar, env=env))
                ratios.append((f"{c.name} / base:{c.name}", c.name, f"base:{c.name}", None))
        contenders = based
    workloads = [w for w in WORKLOADS if w.default]
    if args.workloads:
        names = args.workloads.split(",")
        workloads = [w for w in WORKLOADS if w.name in names]
    size = args.size * MiB
    base = Path(tempfile.mkdtemp(prefix="blocktrace-bench-", dir=args.dir))
    try:
        image = base / "disk.img"
        with open(image, "wb") as f:  # written, not sparse: reads hit real data
            chunk = os.urandom(MiB)
            for _ in range(args.size):
                f.write(chunk)
        for _round in range(args.repeat):
            for w in workloads:
                for c in contenders:
                    value = float("nan")
                    try:
                        value = measure(c, image, w, size, args.runtime)
                    except (RuntimeError, subprocess.SubprocessError) as exc:
                        print(f"bench: {c.name} / {w.name}: {exc}", file=sys.stderr)
                    c.samples.setdefault(w.name, []).append(value)
                    print(f"  {w.name:<20} {c.name:<32} {value:>12.1f} {w.metric}", file=sys.stderr)
        for c in contenders:
            for name, values in c.samples.items():
                ok = [v for v in values if v == v]  # not NaN
                if ok:
                    c.results[name] = statistics.median(ok)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    report = render(contenders, workloads, args, ratios)
    print(report)
    if args.markdown:
        args.markdown.write_text(report)
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    c.name: {
                        "results": c.results,
                        "samples": c.samples,
                        "cpu_us": c.cpu_us,
                        "peak_rss": c.peak_rss,
                    }
                    for c in contenders
                },
                indent=2,
            )
        )
    return 0


def with_python(c: Contender, python: str, name: str) -> Contender:
    """``c`` served by another interpreter (its own venv and tree); the sidecar is unchanged."""

    def command(image: Path, sock: Path, workdir: Path) -> list[str]:
        return [python if a == PYTHON else a for a in c.command(image, sock, workdir)]

    return Contender(name, command, c.sidecar)


def render(
    contenders: list[Contender],
    workloads: list[Workload],
    args: argparse.Namespace,
    ratios: list[tuple[str, str, str, float | None]],
) -> str:
    by_name = {c.name: c for c in contenders}
    command = f".venv/bin/python bench/nbd_fio.py --runtime {args.runtime} --size {args.size}"
    if args.repeat != 1:
        command += f" --repeat {args.repeat}"
    if args.only:
        command += f" --only '{args.only}'"
    if args.workloads:
        command += f" --workloads '{args.workloads}'"
    if args.compare:
        command += f" --compare {args.compare} --compare-label '{args.compare_label}'"
    if args.baseline:
        command += f" --baseline {args.baseline}"
    lines = [
        f"Machine: {machine()}",
        "",
        f"Command: `{command}`",
        "",
        "| contender | "
        + " | ".join(f"{w.name} ({w.metric})" for w in workloads)
        + " | peak RSS (MiB) |",
        "|---|" + "---:|" * (len(workloads) + 1),
    ]
    for c in contenders:
        cells = [f"{c.results[w.name]:,.0f}" if w.name in c.results else "n/a" for w in workloads]
        lines.append(f"| {c.name} | " + " | ".join(cells) + f" | {c.peak_rss / MiB:.0f} |")
    lines += [
        "",
        "Server CPU per I/O (us, median over rounds, range in brackets; user + system from "
        "/proc/PID/stat around the fio run, which includes its 1 s ramp):",
        "",
        "| contender | " + " | ".join(w.name for w in workloads) + " |",
        "|---|" + "---:|" * len(workloads),
    ]
    for c in contenders:
        cells = []
        for w in workloads:
            vals = sorted(c.cpu_us.get(w.name, []))
            cell = f"{statistics.median(vals):,.1f}" if vals else "n/a"
            if len(vals) > 1:
                cell += f" ({vals[0]:,.1f}..{vals[-1]:,.1f})"
            cells.append(cell)
        lines.append(f"| {c.name} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Ratios (throughput: contender / baseline; latency: microseconds added over the baseline):",
        "",
        "| ratio | " + " | ".join(w.name for w in workloads) + " | goal |",
        "|---|" + "---:|" * (len(workloads) + 1),
    ]
    for label, num, den, goal in ratios:
        if num not in by_name or den not in by_name:
            continue
        cells = []
        for w in workloads:
            pairs = [
                (a, b)
                for a, b in zip(
                    by_name[num].samples.get(w.name, []),
                    by_name[den].samples.get(w.name, []),
                    strict=False,
                )
                if a == a and b == b and b  # measured (not NaN) and nonzero
            ]
            if not pairs:
                cells.append("n/a")
                continue
            latency = w.metric.endswith(" us")
            values = sorted(a - b if latency else a / b for a, b in pairs)
            fmt = "{:+,.0f} us" if latency else "{:.2f}x"
            cell = fmt.format(statistics.median(values))
            if len(values) > 1:  # the spread over rounds: how far to trust the median
                cell += f" ({fmt.format(values[0])}..{fmt.format(values[-1])})"
            cells.append(cell)
        throughput = any(not w.metric.endswith(" us") for w in workloads)  # goals are ratios
        shown = f">= {goal}x" if goal and throughput else ""
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {shown} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
