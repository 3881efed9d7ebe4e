"""Helpers for the image-locking tests: what the kernel shows of QEMU's lock bytes on a file,
and QEMU processes that hold an image (tests/integration/test_nbd_image_lock.py,
tests/integration/test_write_locks.py)."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from support import BLOCKTRACE

#: QEMU's refusal of a writer (qemu-io, qemu-img, qemu-nbd, qemu-storage-daemon)
LOCKED = 'Failed to get "write" lock'


def locks_on(path: Path) -> set[int]:
    """Byte offsets of the OFD locks /proc/locks shows on ``path`` (any holder)."""
    ino = os.stat(path).st_ino
    found: set[int] = set()
    for line in Path("/proc/locks").read_text().splitlines():
        f = line.split()
        if "OFDLCK" in f and f[-3].endswith(f":{ino}"):
            found.update(range(int(f[-2]), int(f[-1]) + 1))
    return found


def wait_locked(path: Path, byte: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while byte not in locks_on(path):
        assert time.monotonic() < deadline, f"nobody took lock byte {byte} of {path}"
        time.sleep(0.05)


@contextmanager
def qemu_process(cmd: list[str], image: Path, byte: int) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``cmd`` (a QEMU tool that keeps ``image`` open) until it holds lock ``byte``."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_locked(image, byte)
        yield proc
    finally:
        proc.terminate()
        proc.wait(10)


def storage_daemon(img: Path, sock: Path) -> list[str]:
    """qemu-storage-daemon exporting ``img`` writable over NBD on ``sock`` (export ``f``,
    the node name)."""
    return [
        "qemu-storage-daemon",
        "--blockdev",
        f"driver=file,filename={img},node-name=f",
        "--nbd-server",
        f"addr.type=unix,addr.path={sock}",
        "--export",
        "type=nbd,id=e,node-name=f,writable=on",
    ]


def serve_once(
    workdir: Path, images: Sequence[str | os.PathLike[str]], trace: str
) -> subprocess.CompletedProcess[str]:
    """``blocktrace serve IMAGES --trace TRACE`` expected to stop at start-up (a refused
    trace); its result, for the caller to check."""
    return subprocess.run(
        [
            *BLOCKTRACE,
            "serve",
            *map(os.fspath, images),
            "--socket",
            os.fspath(workdir / "once.sock"),
            "--trace",
            trace,
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
