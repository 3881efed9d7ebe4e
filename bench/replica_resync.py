#!/usr/bin/env python3
"""Replica resync after a short outage: how many bytes move, against the device size.

A 1 GiB source is replicated to a qemu-nbd export (``sync=full``).  After the initial copy and
500 random writes, the replica's qemu-nbd is killed with SIGKILL; 200 more writes land while
the trace is degraded (the dirty bitmap records them); qemu-nbd is restarted, the target
reconnects and copies only the dirty regions.  Reported: bytes resynced, the lag at reconnect,
and the share of the device that moved (goal: only the dirty regions, never a full copy).

Usage: .venv/bin/python bench/replica_resync.py [--size-mib N] [--dir DIR]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "integration")]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--dir", type=Path)
    args = ap.parse_args()
    from replica_helpers import QMP, QemuNBD, Workload, same_files, sparse

    from support import ServerProcess

    size = args.size_mib << 20
    work = Path(tempfile.mkdtemp(prefix="blocktrace-resync-", dir=args.dir))
    try:
        src, rep = sparse(work / "src.img", size), sparse(work / "rep.img", size)
        q = QemuNBD(rep, sock=work / "r.sock").start()
        trace = f"src=nbd:{q.uri},job-id=r,sync=full,reconnect-max=0.5"
        srv = ServerProcess(work, [src], ["--trace", trace, "--qmp", str(work / "qmp.sock")])
        srv.start()
        try:
            qmp = QMP(work / "qmp.sock")
            initial = qmp.wait_caught_up(120)["target"]["synced-bytes"]
            wl = Workload(srv.uri("src"), src, 1)
            wl.run(500)
            q.kill9()
            qmp.wait(lambda j: j["target"]["state"] == "degraded")
            wl.run(200)
            lag = qmp.job()["target"]["lag-bytes"]
            q.start()
            job = qmp.wait(
                lambda j: j["target"]["state"] == "ready" and j["target"]["reconnects"] >= 1, 60
            )
            wl.close()
            qmp.close()
            resynced = job["target"]["synced-bytes"] - initial
        finally:
            srv.stop()
            q.stop()
        identical = same_files(src, rep, size)
        print(
            f"device {size} bytes; initial sync {initial} bytes; lag at reconnect {lag} bytes; "
            f"resynced {resynced} bytes ({100 * resynced / size:.2f}% of the device); "
            f"replica identical after resync: {identical}"
        )
        return 0 if identical else 1
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
