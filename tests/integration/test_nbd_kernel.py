"""The Linux kernel as a client: nbdfuse exposes the export as a file, a loop device turns it
into a block device, and ext4 is created, mounted, written, remounted, read and checked.

There is no kernel nbd module on these machines, so nbdfuse + loop is the kernel path.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import time
from pathlib import Path

from support import MiB, ServerProcess, make_image, require, require_fuse_and_loop, run


def wait_for_file(path: Path, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            return
        time.sleep(0.05)
    raise AssertionError(f"{path} did not appear")


def test_ext4_through_nbdfuse_and_loop(tmp_path: Path) -> None:
    require_fuse_and_loop()
    require("nbdfuse", "mkfs.ext4", "e2fsck", "fusermount3")
    image = make_image(tmp_path / "kdisk.img", 64 * MiB)
    fuse_dir = tmp_path / "fuse"
    mnt = tmp_path / "mnt"
    fuse_dir.mkdir()
    mnt.mkdir()
    payload = os.urandom(3 * MiB + 123)
    with ServerProcess(tmp_path, [image]) as srv:
        fuse = subprocess.Popen(
            ["nbdfuse", os.fspath(fuse_dir), srv.uri("kdisk")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        loop = ""
        mounted = False
        try:
            wait_for_file(fuse_dir / "nbd")
            loop = run(["losetup", "-f", "--show", fuse_dir / "nbd"]).stdout.strip()
            run(["mkfs.ext4", "-q", loop], timeout=60)
            run(["mount", loop, mnt])
            mounted = True
            (mnt / "hello.txt").write_text("hello through NBD\n")
            (mnt / "dir").mkdir()
            (mnt / "dir" / "blob.bin").write_bytes(payload)
            run(["sync"])
            run(["umount", mnt])
            mounted = False
            # drop the loop device's cache so the reread really goes through NBD
            run(["losetup", "-d", loop])
            loop = run(["losetup", "-f", "--show", fuse_dir / "nbd"]).stdout.strip()
            run(["mount", "-o", "ro", loop, mnt])
            mounted = True
            assert (mnt / "hello.txt").read_text() == "hello through NBD\n"
            got = (mnt / "dir" / "blob.bin").read_bytes()
            assert hashlib.sha256(got).digest() == hashlib.sha256(payload).digest()
        finally:
            if mounted:
                run(["umount", mnt], check=False)
            if loop:
                run(["losetup", "-d", loop], check=False)
            run(["fusermount3", "-u", fuse_dir], check=False)
            try:
                fuse.wait(15)
            except subprocess.TimeoutExpired:
                fuse.kill()
                fuse.wait(5)
        assert "connection" in srv.stderr()
    fsck = run(["e2fsck", "-fn", image], check=False)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
