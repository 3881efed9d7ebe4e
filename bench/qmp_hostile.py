"""Server memory under QMP clients that send large commands and never read the replies.

Each client completes the QMP handshake, then sends up to ``--messages`` commands of just
under 1 MiB (the largest message QMP accepts) whose ``id`` is non-ASCII UTF-8, echoed back
escaped (``\\u00e9``: 3x larger), and never reads.  Prints the server's RSS before, while
the clients are connected, and after they disconnected, and how many commands each client got
in before the server stopped reading it or dropped it.  Issue #10 item 2 measured 27 MB ->
953 MB, kept after the clients left.

    .venv/bin/python bench/qmp_hostile.py [--clients 4] [--messages 300]
        [--src OTHER_TREE/src]        # the same against another tree (PYTHONPATH)
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def hostile_client(path: str, messages: int, seconds: float) -> tuple[socket.socket, int]:
    """Send until ``messages`` are in, the server stops reading for ``seconds``, or drops us."""
    s = socket.socket(socket.AF_UNIX)
    s.connect(path)
    f = s.makefile("rb")
    f.readline()  # greeting
    s.sendall(b'{"execute": "qmp_capabilities"}\n')
    f.readline()
    s.setblocking(False)
    body = {"execute": "query-version", "id": "\u00e9" * ((1 << 19) - 64)}
    msg = json.dumps(body, ensure_ascii=False).encode() + b"\n"
    done = 0
    while done < messages:
        view = memoryview(msg)
        stalled = time.monotonic() + seconds
        while view:
            try:
                n = s.send(view)
            except BlockingIOError:
                if time.monotonic() > stalled:
                    return s, done  # the server stopped reading us
                time.sleep(0.01)
                continue
            except OSError:
                return s, done  # the server dropped us
            view = view[n:]
            stalled = time.monotonic() + seconds
        done += 1
    return s, done


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--messages", type=int, default=300)
    ap.add_argument("--stall", type=float, default=3.0, help="seconds of no progress = stopped")
    ap.add_argument("--src", default=None, help="PYTHONPATH for the server (another tree's src)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        img = Path(tmp) / "d.img"
        img.write_bytes(b"\0" * (1 << 20))
        qmp = os.path.join(tmp, "q.sock")
        env = dict(os.environ)
        if args.src:
            env["PYTHONPATH"] = args.src
        cmd = [sys.executable, "-m", "blocktrace", "serve", str(img)]
        cmd += ["--socket", os.path.join(tmp, "n.sock"), "--qmp", qmp]
        srv = subprocess.Popen(cmd, stderr=subprocess.DEVNULL, env=env)
        try:
            for _ in range(200):
                if os.path.exists(qmp):
                    break
                time.sleep(0.05)
            time.sleep(0.5)
            before = rss_mib(srv.pid)
            clients = [hostile_client(qmp, args.messages, args.stall) for _ in range(args.clients)]
            peak = rss_mib(srv.pid)
            counts = [n for _, n in clients]
            for c, _ in clients:
                c.close()
            time.sleep(2)
            after = rss_mib(srv.pid)
            alive = srv.poll() is None
        finally:
            srv.terminate()
            srv.wait(30)
    print(
        f"clients={args.clients}: server RSS before {before:.0f} MiB, with the clients "
        f"{peak:.0f} MiB, after they left {after:.0f} MiB, alive={alive}; "
        f"commands each client got in: {counts}"
    )


if __name__ == "__main__":
    main()
