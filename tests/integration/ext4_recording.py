"""Helpers for the ext4 tests: record the real kernel's writes to an image as a dm-log-writes log.

The image is served by ``qemu-nbd`` through QEMU's ``blklogwrites`` filter (the log is made by
QEMU, independently of blocktrace), exposed as a file by ``nbdfuse`` and mounted with
``mount -o loop``: the Linux ext4 driver does the writing.  ``log-super-update-interval=1``
keeps the log's entry count current, so the log is complete once ``qemu-nbd`` has exited.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from support import run, wait_for_socket


def _wait_for(path: Path, proc: subprocess.Popen[bytes], timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            return
        if proc.poll() is not None:
            raise AssertionError(f"{proc.args} exited {proc.returncode} before {path} appeared")
        time.sleep(0.02)
    raise AssertionError(f"{path} did not appear within {timeout}s")


@contextlib.contextmanager
def logged_nbd(workdir: Path, image: Path, log: Path) -> Iterator[Path]:
    """Serve ``image`` through blklogwrites (log to ``log``); yields the NBD Unix socket."""
    sock = workdir / "qnbd.sock"
    log.write_bytes(b"")
    opts = (
        f"driver=blklogwrites,file.driver=file,file.filename={image},"
        f"log.driver=file,log.filename={log},log-sector-size=512,"
        f"log-super-update-interval=1"
    )
    qemu = subprocess.Popen(
        ["qemu-nbd", "--image-opts", opts, "-k", str(sock), "--cache=none"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        wait_for_socket(sock, qemu)
        yield sock
    finally:
        try:
            qemu.wait(30)
        except subprocess.TimeoutExpired:
            qemu.terminate()
            qemu.wait(10)


@contextlib.contextmanager
def nbd_file(workdir: Path, sock: Path) -> Iterator[Path]:
    """The NBD export as a local file (nbdfuse); unmounted and waited for on exit."""
    fdir = workdir / "fuse"
    fdir.mkdir(exist_ok=True)
    fuse = subprocess.Popen(
        ["nbdfuse", str(fdir), f"nbd+unix:///?socket={sock}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        _wait_for(fdir / "nbd", fuse)
        yield fdir / "nbd"
    finally:
        run(["fusermount3", "-u", str(fdir)], check=False, timeout=30)
        try:
            fuse.wait(30)
        except subprocess.TimeoutExpired:
            fuse.kill()
            fuse.wait(10)


@contextlib.contextmanager
def kernel_mount(workdir: Path, image: Path, log: Path) -> Iterator[Path]:
    """Mount ``image`` with the real ext4 driver while QEMU logs every write to ``log``."""
    mnt = workdir / "mnt"
    mnt.mkdir(exist_ok=True)
    with logged_nbd(workdir, image, log) as sock, nbd_file(workdir, sock) as dev:
        run(["mount", "-t", "ext4", "-o", "loop", str(dev), str(mnt)], timeout=30)
        try:
            yield mnt
        finally:
            os.sync()
            run(["umount", str(mnt)], timeout=60)


def mkfs(
    image: Path, size_mib: int, *, content: Path | None = None, options: tuple[str, ...] = ()
) -> Path:
    """A fresh ext4 image (``mke2fs -d content`` if given)."""
    with open(image, "wb") as f:
        f.truncate(size_mib << 20)
    extra = ["-d", str(content)] if content is not None else []
    run(["mkfs.ext4", "-q", "-F", *options, *extra, str(image)], timeout=60)
    return image


def debugfs(image: Path, commands: str) -> str:
    """Run debugfs -w commands on ``image`` (no mount: e2fsprogs writes the blocks itself)."""
    script = image.with_suffix(".debugfs")
    script.write_text(commands)
    proc = run(["debugfs", "-w", "-f", str(script), str(image)], timeout=60)
    return proc.stdout + proc.stderr


def diff_records(base: Path, new: Path, *, chunk: int = 1024, start: int = 0) -> list[Any]:
    """The writes that turn ``base`` into ``new``: one record per changed ``chunk`` (one fs
    block of a small image: a bigger chunk would rewrite unchanged file data), then a
    flush (a synthetic stream for tools, like debugfs, that write images directly)."""
    from blocktrace.ext4.watcher import StreamRecord

    records: list[Any] = []
    with open(base, "rb") as a, open(new, "rb") as b:
        offset = 0
        while True:
            x, y = a.read(chunk), b.read(chunk)
            if not y:
                break
            if x != y:
                records.append(StreamRecord(start + len(records), "write", offset, len(y), y))
            offset += len(y)
    records.append(StreamRecord(start + len(records), "flush"))
    return records


def qemu_log(workdir: Path, image: Path, log: Path, records: list[Any]) -> None:
    """Write ``records`` to ``image`` through QEMU's blklogwrites with qemu-io, so QEMU itself
    makes the log (no FUSE or mount needed)."""
    cmds: list[str] = []
    for i, rec in enumerate(records):
        if rec.kind == "write":
            chunk = workdir / f"chunk{i}"
            chunk.write_bytes(bytes(rec.data))
            cmds += ["-c", f"write -s {chunk} {rec.offset} {len(rec.data)}"]
        elif rec.kind == "flush":
            cmds += ["-c", "flush"]
    log.write_bytes(b"")
    opts = (
        f"driver=blklogwrites,file.driver=file,file.filename={image},"
        f"log.driver=file,log.filename={log},log-sector-size=512,"
        f"log-super-update-interval=1"
    )
    run(["qemu-io", "--image-opts", opts, *cmds], timeout=60)
