"""Helpers for the ext4 tests: record the real kernel's writes to an image as a dm-log-writes log.

The image is served by ``qemu-nbd`` through QEMU's ``blklogwrites`` filter (the log is made by
QEMU, independently of blocktrace), exposed as a file by ``nbdfuse`` and mounted with
``mount -o loop``: the Linux ext4 driver does the writing.  ``log-super-update-interval=1``
keeps the log's entry count current, so the log is complete once ``qemu-nbd`` has exited.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from blocktrace.stream.records import RecordKind
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
def qemu_nbd(sock: Path, args: list[str]) -> Iterator[Path]:
    """``qemu-nbd -k SOCK ARGS`` until it exits by itself (its last client gone, as qemu-nbd
    does without ``--persistent``), or is stopped after 30 s; yields the socket."""
    qemu = subprocess.Popen(
        ["qemu-nbd", "-k", str(sock), *args],
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
def logged_nbd(workdir: Path, image: Path, log: Path) -> Iterator[Path]:
    """Serve ``image`` through blklogwrites (log to ``log``); yields the NBD Unix socket."""
    log.write_bytes(b"")
    opts = (
        f"driver=blklogwrites,file.driver=file,file.filename={image},"
        f"log.driver=file,log.filename={log},log-sector-size=512,"
        f"log-super-update-interval=1"
    )
    with qemu_nbd(workdir / "qnbd.sock", ["--image-opts", opts, "--cache=none"]) as sock:
        yield sock


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
def kernel_mount(workdir: Path, image: Path, log: Path, options: str = "") -> Iterator[Path]:
    """Mount ``image`` with the real ext4 driver while QEMU logs every write to ``log``
    (``options``: extra mount options, e.g. ``journal_checksum``)."""
    mnt = workdir / "mnt"
    mnt.mkdir(exist_ok=True)
    opts = "loop" + (f",{options}" if options else "")
    with logged_nbd(workdir, image, log) as sock, nbd_file(workdir, sock) as dev:
        run(["mount", "-t", "ext4", "-o", opts, str(dev), str(mnt)], timeout=30)
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
    from stream_helpers import rec as stream_record

    records: list[Any] = []
    with open(base, "rb") as a, open(new, "rb") as b:
        offset = 0
        while True:
            x, y = a.read(chunk), b.read(chunk)
            if not y:
                break
            if x != y:
                records.append(stream_record(start + len(records), "write", offset, len(y), y))
            offset += len(y)
    records.append(stream_record(start + len(records), "flush"))
    return records


def qemu_io_commands(workdir: Path, base: Path, new: Path) -> list[str]:
    """qemu-io commands that write, block by block and then flush, what turns ``base`` into
    ``new`` (each block's bytes in a file under ``workdir``): how a debugfs-made change is sent
    through an NBD export."""
    cmds = []
    for i, rec in enumerate(diff_records(base, new)):
        if rec.kind is RecordKind.WRITE:
            chunk = workdir / f"chunk{i}"
            chunk.write_bytes(bytes(rec.data))
            cmds.append(f"write -s {chunk} {rec.offset} {len(rec.data)}")
        else:
            cmds.append("flush")
    return cmds


def qemu_log(workdir: Path, image: Path, log: Path, records: list[Any]) -> None:
    """Write ``records`` to ``image`` through QEMU's blklogwrites with qemu-io, so QEMU itself
    makes the log (no FUSE or mount needed)."""
    cmds: list[str] = []
    for i, rec in enumerate(records):
        if rec.kind is RecordKind.WRITE:
            chunk = workdir / f"chunk{i}"
            chunk.write_bytes(bytes(rec.data))
            cmds += ["-c", f"write -s {chunk} {rec.offset} {len(rec.data)}"]
        elif rec.kind is RecordKind.FLUSH:
            cmds += ["-c", "flush"]
    log.write_bytes(b"")
    opts = (
        f"driver=blklogwrites,file.driver=file,file.filename={image},"
        f"log.driver=file,log.filename={log},log-sector-size=512,"
        f"log-super-update-interval=1"
    )
    run(["qemu-io", "--image-opts", opts, *cmds], timeout=60)


def record_busy_workload(
    workdir: Path,
    *,
    rounds: int = 3,
    dirs: int = 20,
    files: int = 100,
    big_mib: int = 32,
    size_mib: int = 512,
) -> tuple[Path, Path]:
    """The benchmark workload (docs/introspection.md): per round, ``dirs`` x ``files`` files of
    100 B-20 KB and one ``big_mib`` file, sync, then delete half the directories and rename
    the rest, sync.  Returns (base image, QEMU blklogwrites log)."""
    import shutil

    img = mkfs(workdir / "disk.img", size_mib, options=("-b", "4096"))
    base = workdir / "base.img"
    shutil.copy(img, base)
    log = workdir / "disk.log"
    with kernel_mount(workdir, img, log) as m:
        for r in range(rounds):
            for d in range(dirs):
                p = m / f"r{r}" / f"dir{d}"
                p.mkdir(parents=True)
                for i in range(files):
                    (p / f"file{i}").write_bytes(os.urandom(100 + (i * 997) % 20000))
            (m / f"big{r}").write_bytes(os.urandom(big_mib << 20))
            os.sync()
            for d in range(0, dirs, 2):
                shutil.rmtree(m / f"r{r}" / f"dir{d}")
            for d in range(1, dirs, 2):
                os.rename(m / f"r{r}" / f"dir{d}", m / f"r{r}" / f"moved{d}")
            os.sync()
    return base, log


def record_bulk_workload(
    workdir: Path, *, files: int = 3, file_mib: int = 256, size_mib: int = 1280
) -> tuple[Path, Path]:
    """Bulk sequential data, the stream that stresses introspection's data path: ``files``
    new files of ``file_mib`` MiB written in 1 MiB writes (delayed allocation: data before its
    extent), sync, a quarter of the first file overwritten in place (data blocks the model
    already owns), one file deleted, sync.  Returns (base image, QEMU blklogwrites log)."""
    import shutil

    img = mkfs(workdir / "disk.img", size_mib, options=("-b", "4096"))
    base = workdir / "base.img"
    shutil.copy(img, base)
    log = workdir / "disk.log"
    chunk = os.urandom(MiB)
    with kernel_mount(workdir, img, log) as m:
        for n in range(files):
            with open(m / f"bulk{n}", "wb") as f:
                for i in range(file_mib):
                    f.write(chunk[i % 7 :] + chunk[: i % 7])  # not a repeated block
        os.sync()
        with open(m / "bulk0", "r+b") as f:
            f.seek(file_mib * MiB // 4)
            for _ in range(file_mib // 4):
                f.write(chunk)
        os.unlink(m / f"bulk{files - 1}")
        os.sync()
    return base, log


# ---- the kernel scenario shared by test_ext4_kernel.py and test_watch_live.py: each phase
# ---- is (name, action on the mount point, the exact (kind, path) events it must produce)
MiB = 1 << 20
Phase = tuple[str, Callable[[Path], None], set[tuple[str, str]]]


def phase_create(m: Path) -> None:
    os.makedirs(m / "d1/d2/d3")
    (m / "d1/empty").write_bytes(b"")
    (m / "d1/small").write_bytes(b"s" * 100)
    (m / "d1/d2/medium").write_bytes(os.urandom(100_000))
    (m / "big").write_bytes(os.urandom(4 * MiB))


def phase_modify(m: Path) -> None:
    with open(m / "d1/small", "ab") as f:
        f.write(b"a" * 50)
    with open(m / "big", "r+b") as f:
        f.seek(MiB)
        f.write(b"o" * 10_000)
    os.truncate(m / "d1/d2/medium", 10_000)


def phase_rename(m: Path) -> None:
    os.rename(m / "d1/small", m / "d1/small2")
    os.rename(m / "d1/d2/medium", m / "d1/medium")


def phase_links(m: Path) -> None:
    os.link(m / "big", m / "d1/big-link")
    os.symlink("big", m / "fast-sym")
    os.symlink("/" + "long-target/" * 10, m / "slow-sym")
    os.chmod(m / "d1/small2", 0o640)
    os.chown(m / "d1/empty", 1234, 5678)
    os.setxattr(m / "d1/d2/d3", "user.colour", b"blue")


def phase_htree(m: Path) -> None:
    os.mkdir(m / "many")
    for i in range(400):
        (m / "many" / f"a-fairly-long-file-name-to-fill-blocks-{i:04d}").write_bytes(b"")


def phase_delete(m: Path) -> None:
    os.unlink(m / "fast-sym")
    shutil.rmtree(m / "d1")


def phase_prepare(m: Path) -> None:
    (m / "x1").write_bytes(b"1" * 5000)
    (m / "x2").write_bytes(b"2" * 7000)
    os.makedirs(m / "mv/d")
    (m / "mv/d/inner").write_bytes(b"i")


def phase_replace(m: Path) -> None:
    os.rename(m / "x1", m / "x2")  # replaces x2: its old inode is deleted
    os.rename(m / "mv/d", m / "d2")  # a directory moves across directories
    os.link(m / "d2/inner", m / "inner2")


def phase_sparse(m: Path) -> None:
    with open(m / "sparse", "wb") as f:  # 40 separate extents: a depth-1 extent tree
        for i in range(40):
            f.seek(i * (1 << 20))
            f.write(b"s" * 4096)


def phase_fallocate(m: Path) -> None:
    with open(m / "falloc", "wb") as f:
        os.posix_fallocate(f.fileno(), 0, 1 << 20)  # unwritten extents, no data
    with open(m / "sparse", "r+b") as f:  # a block mapped through the extent index block
        f.seek(20 * (1 << 20) + 1000)
        f.write(b"t" * 10)
    os.utime(m / "sparse")  # times only: no event


def phase_fill(m: Path) -> None:
    with open(m / "falloc", "r+b") as f:  # into the unwritten extent
        f.seek(8192)
        f.write(b"w" * 4096)
    os.truncate(m / "sparse", 0)


def phase_extend(m: Path) -> None:
    os.unlink(m / "d2/inner")  # one of two names: the inode lives on as /inner2
    os.truncate(m / "inner2", 100_000)  # grows: the kernel zeroes the old last block's tail
    with open(m / "x2", "ab") as f:
        f.write(b"q" * 10_000)


PHASES: list[Phase] = [
    (
        "create",
        phase_create,
        {
            ("mkdir", "/d1"),
            ("mkdir", "/d1/d2"),
            ("mkdir", "/d1/d2/d3"),
            ("create", "/d1/empty"),
            ("create", "/d1/small"),
            ("create", "/d1/d2/medium"),
            ("create", "/big"),
            ("write", "/d1/small"),
            ("write", "/d1/d2/medium"),
            ("write", "/big"),
        },
    ),
    (
        "modify",
        phase_modify,
        {("write", "/d1/small"), ("write", "/big"), ("truncate", "/d1/d2/medium")},
    ),
    ("rename", phase_rename, {("rename", "/d1/small2"), ("rename", "/d1/medium")}),
    (
        "links",
        phase_links,
        {
            ("link", "/d1/big-link"),
            ("symlink", "/fast-sym"),
            ("symlink", "/slow-sym"),
            ("chmod", "/d1/small2"),
            ("chown", "/d1/empty"),
            ("xattr", "/d1/d2/d3"),
        },
    ),
    (
        "htree",
        phase_htree,
        {("mkdir", "/many")}
        | {("create", f"/many/a-fairly-long-file-name-to-fill-blocks-{i:04d}") for i in range(400)},
    ),
    (
        "delete",
        phase_delete,
        {
            ("delete", "/fast-sym"),
            ("delete", "/d1/empty"),
            ("delete", "/d1/small2"),
            ("delete", "/d1/medium"),
            ("delete", "/d1/big-link"),
            ("rmdir", "/d1/d2/d3"),
            ("rmdir", "/d1/d2"),
            ("rmdir", "/d1"),
        },
    ),
    (
        "prepare",
        phase_prepare,
        {
            ("create", "/x1"),
            ("create", "/x2"),
            ("mkdir", "/mv"),
            ("mkdir", "/mv/d"),
            ("create", "/mv/d/inner"),
            ("write", "/x1"),
            ("write", "/x2"),
            ("write", "/mv/d/inner"),
        },
    ),
    (
        "replace",
        phase_replace,
        {("rename", "/x2"), ("delete", "/x2"), ("rename", "/d2"), ("link", "/inner2")},
    ),
    (
        "extend",
        phase_extend,
        {("delete", "/d2/inner"), ("truncate", "/inner2"), ("write", "/x2")},
    ),
    ("sparse", phase_sparse, {("create", "/sparse"), ("write", "/sparse")}),
    ("fallocate", phase_fallocate, {("create", "/falloc"), ("write", "/sparse")}),
    ("fill", phase_fill, {("write", "/falloc"), ("truncate", "/sparse")}),
]
