"""``block.locking``: who holds a lock is named, from ``/proc/PID/fdinfo`` (OFD locks have no
owner pid in ``/proc/locks``), and only QEMU's lock bytes of the very file count."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from blocktrace.block.locking import (
    WRITABLE,
    ImageLockedError,
    _holds_lock_bytes,
    lock_holders,
    lock_image,
    lock_output,
)


def test_a_second_open_in_this_process_is_refused_naming_this_process(tmp_path: Path) -> None:
    img = tmp_path / "img"
    img.write_bytes(bytes(4096))
    first = os.open(img, os.O_RDWR)
    second = os.open(img, os.O_RDWR)
    try:
        lock_image(first, str(img), WRITABLE)
        with pytest.raises(ImageLockedError) as info:
            lock_output(second, f"log {img}")
        comm = Path("/proc/self/comm").read_text().strip()
        assert info.value.holders == (f"{comm} (pid {os.getpid()}, this process)",)
        msg = str(info.value)
        assert msg.startswith(f"log {img}: failed to get") and msg.endswith("name another file")
        assert "\n" not in msg
    finally:
        os.close(second)
        os.close(first)
    # the locks went with the descriptors
    fd = os.open(img, os.O_RDWR)
    try:
        lock_image(fd, str(img), WRITABLE)
        assert lock_holders(fd) == []
    finally:
        os.close(fd)


def test_only_qemu_lock_bytes_of_the_same_file_count() -> None:
    key = "fe:00:1234"
    line = "lock:\t1: OFDLCK ADVISORY  READ -1 {} {} {}"
    assert _holds_lock_bytes(line.format(key, 100, 100), key)
    assert _holds_lock_bytes(line.format(key, 0, "EOF"), key)  # a whole-file lock covers them
    assert not _holds_lock_bytes(line.format(key, 4096, 8191), key)  # elsewhere in the file
    assert not _holds_lock_bytes(line.format("fe:00:1235", 100, 100), key)  # another file
    assert not _holds_lock_bytes("pos:\t0\nflags:\t02\nlock:\tgarbage", key)


def test_holders_from_a_proc_tree(tmp_path: Path) -> None:
    """The search reads only fdinfo and comm (a fake /proc): holders named once per process,
    processes without a lock on the file left out."""
    img = tmp_path / "img"
    img.write_bytes(b"")
    st = img.stat()
    key = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    proc = tmp_path / "proc"
    for pid, comm, lines in [
        ("10", "qemu-nbd", [f"lock:\t1: OFDLCK ADVISORY  READ -1 {key} 101 101"] * 2),
        ("11", "cat", ["pos:\t0"]),
        ("12", "qemu-storage-da", [f"lock:\t1: OFDLCK ADVISORY  READ -1 {key} 201 201"]),
    ]:
        (proc / pid / "fdinfo").mkdir(parents=True)
        (proc / pid / "comm").write_text(comm + "\n")
        for n, text in enumerate(lines):
            (proc / pid / "fdinfo" / str(n)).write_text(text + "\n")
    (proc / "self").mkdir()
    fd = os.open(img, os.O_RDONLY)
    try:
        holders = sorted(lock_holders(fd, proc=str(proc)))
    finally:
        os.close(fd)
    assert holders == ["qemu-nbd (pid 10)", "qemu-storage-da (pid 12)"]
