#!/usr/bin/env python3
"""Server memory under hostile NBD clients: RSS of ``blocktrace serve`` with N connections of
one hostile kind open at once (issue 10 item 1).

Kinds:

* ``idle``: connect and never negotiate (until the handshake deadline closes them);
* ``write-header``: negotiate, send a WRITE header announcing 32 MiB plus 1 KiB of it, stall;
* ``unread-reads``: negotiate, send four 32 MiB READs, never read a reply.

For each kind and count a fresh server (``--baseline TREE``: also one from another source
tree, e.g. the old main) serves a sparse 1 GiB image over a Unix socket on loopback; the
clients connect, the script waits for the server to settle, and reports its VmRSS then (the
memory the hostile clients hold) and VmHWM (the peak).  Nothing is asserted: figures go to
docs/nbd-server.md and docs/performance.md with the command.

Usage:
    .venv/bin/python bench/nbd_hostile.py [--counts 40,120] [--kinds idle,write-header,...]
                                          [--baseline TREE] [--settle S]
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from blocktrace.nbd import wire
from blocktrace.nbd.constants import Cmd
from blocktrace.nbd.events import NEED_DATA
from blocktrace.nbd.handshake import ClientHandshake

MiB = 1024 * 1024
KINDS = ("idle", "write-header", "unread-reads")


def status(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def negotiate(sock: socket.socket) -> bool:
    hs = ClientHandshake("disk")
    while True:
        out = hs.data_to_send()
        if out:
            sock.sendall(out)
        if hs.next_event() is not NEED_DATA:
            return True
        data = sock.recv(65536)
        if not data:
            return False  # refused (over --max-connections)
        hs.receive_data(data)


def hostile(path: Path, kind: str) -> socket.socket | None:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(os.fspath(path))
    if kind == "idle":
        return s
    try:
        if not negotiate(s):
            s.close()
            return None
    except OSError:
        s.close()
        return None
    if kind == "write-header":
        s.sendall(wire.pack_request(Cmd.WRITE, 1, 0, 32 * MiB, 0) + bytes(1024))
    else:
        for i in range(4):
            s.sendall(wire.pack_request(Cmd.READ, i, 0, 32 * MiB, 0))
    return s


def measure(tree: Path | None, kind: str, count: int, settle: float) -> tuple[int, int, int]:
    """(RSS before clients, RSS with them, peak RSS) of one fresh server."""
    with tempfile.TemporaryDirectory(prefix="bench-hostile-") as tmp:
        work = Path(tmp)
        image = work / "disk.img"
        with open(image, "wb") as f:
            f.truncate(1024 * MiB)
        sock = work / "nbd.sock"
        env = dict(os.environ)
        if tree is not None:
            env["PYTHONPATH"] = os.fspath(tree.resolve() / "src")
        proc = subprocess.Popen(
            [sys.executable, "-m", "blocktrace", "serve", f"disk={image}", "--socket", sock],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=env,
        )
        clients: list[socket.socket] = []
        try:
            deadline = time.monotonic() + 30
            while not sock.exists():
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("server did not start")
                time.sleep(0.05)
            time.sleep(0.5)
            before = status(proc.pid, "VmRSS")
            for _ in range(count):
                try:
                    c = hostile(sock, kind)
                except OSError:
                    c = None
                if c is not None:
                    clients.append(c)
            time.sleep(settle)
            return before, status(proc.pid, "VmRSS"), status(proc.pid, "VmHWM")
        finally:
            for c in clients:
                c.close()
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--counts", default="40,120", help="hostile connections (comma-separated)")
    ap.add_argument("--kinds", default=",".join(KINDS))
    ap.add_argument("--baseline", type=Path, metavar="TREE", help="also measure this tree")
    ap.add_argument(
        "--baseline-max", type=int, default=40, help="largest count run against --baseline"
    )
    ap.add_argument("--settle", type=float, default=3.0, help="seconds before measuring")
    args = ap.parse_args()
    trees: list[tuple[str, Path | None]] = [("this tree", None)]
    if args.baseline:
        trees.append((f"baseline ({args.baseline})", args.baseline))
    command = (
        f".venv/bin/python bench/nbd_hostile.py --counts {args.counts} --kinds {args.kinds} "
        f"--settle {args.settle}"
        + (
            f" --baseline {args.baseline} --baseline-max {args.baseline_max}"
            if args.baseline
            else ""
        )
    )
    print(f"Command: `{command}`\n")
    print(
        "| server | hostile clients | count | RSS before (MiB) | RSS with them (MiB) | peak (MiB) |"
    )
    print("|---|---|---:|---:|---:|---:|")
    for kind in args.kinds.split(","):
        for count in (int(c) for c in args.counts.split(",")):
            for label, tree in trees:
                if tree is not None and count > args.baseline_max:
                    continue
                before, during, peak = measure(tree, kind, count, args.settle)
                print(
                    f"| {label} | {kind} | {count} | {before / MiB:.0f} | {during / MiB:.0f} "
                    f"| {peak / MiB:.0f} |",
                    flush=True,
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
