#!/usr/bin/env python3
"""What one attach process per VM costs: N QEMUs attached at once, one process each.

Each "VM" is a ``qemu-system-x86_64 -S`` (devices and block graph, no CPU running: the cost
measured is blocktrace's, not the guests') with one raw disk on virtio-blk, all with the same
device name ``disk0``, as libvirt's VMs have.  N ``blocktrace attach`` processes (pivot, a
``log`` trace each) are started together; printed: the time until every trace is ready, and
each attach process's resident memory (``VmRSS``) once ready, then after 16 MiB of writes
through every VM's device (the human monitor's ``qemu-io``, all VMs at once).

Usage: .venv/bin/python bench/attach_multivm.py [--vms N] [--size-mib N] [--dir DIR]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "integration")]

from test_attach_guest import AttachProcess  # noqa: E402
from test_attach_multivm import stopped_vm, vm_write  # noqa: E402


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vms", type=int, default=4)
    ap.add_argument("--size-mib", type=int, default=64)
    ap.add_argument("--dir", default=None)
    args = ap.parse_args()
    import test_attach_multivm

    test_attach_multivm.SIZE = args.size_mib << 20
    with tempfile.TemporaryDirectory(dir=args.dir) as d, ExitStack() as stack:
        tmp = Path(d)
        vms = [stack.enter_context(stopped_vm(tmp, f"vm{i}")) for i in range(args.vms)]
        t0 = time.perf_counter()
        procs = [
            AttachProcess(
                tmp,
                qmp,
                [f"disk0={tmp / f'bt{i}.img'}"],
                [f"log:{tmp / f'{i}.log'}"],
                name=f"att{i}",
            )
            for i, (qmp, _, _) in enumerate(vms)
        ]
        for p in procs:
            p.wait_ready(1)
        ready = time.perf_counter() - t0
        idle = [rss_kib(p.proc.pid) for p in procs]

        def writes(test_qmp: Path) -> None:
            for k in range(16):
                vm_write(test_qmp, 0x40 + k, k << 20, 1 << 20)

        threads = [threading.Thread(target=writes, args=(t,)) for _, t, _ in vms]
        t1 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wrote = time.perf_counter() - t1
        busy = [rss_kib(p.proc.pid) for p in procs]
        for p in procs:
            p.proc.terminate()
        for p in procs:
            if p.wait() != 0:
                raise RuntimeError(p.stderr())
    print(f"{args.vms} VMs, one attach process each ({args.size_mib} MiB disks, pivot + log)")
    print(f"  all attached and traced in {ready:.1f} s")
    print(f"  RSS per attach process, idle: median {statistics.median(idle) / 1024:.1f} MiB "
          f"(min {min(idle) / 1024:.1f}, max {max(idle) / 1024:.1f})")  # fmt: skip
    print(f"  RSS after 16 MiB written through every VM at once ({wrote:.1f} s): median "
          f"{statistics.median(busy) / 1024:.1f} MiB (max {max(busy) / 1024:.1f})")  # fmt: skip


if __name__ == "__main__":
    main()
