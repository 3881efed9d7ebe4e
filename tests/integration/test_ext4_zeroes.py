"""A file's data written as zeroes is a ``write`` event, whatever command carried it (#10 item 14).

The real kernel writes a file of zeroes through loop + nbdfuse to a ``qemu-nbd`` whose
``--detect-zeroes=unmap`` turns each all-zero write into NBD_CMD_WRITE_ZEROES, as a QEMU VM
with ``detect-zeroes=unmap`` does; that qemu-nbd's image is blocktrace's own export (QEMU's nbd
driver as the client), traced to a log and, live, to the ``introspect`` target.  With delayed
allocation the zeroes land on free blocks before the extent that claims them commits, so they
are pending data exactly like written data: on main they were dropped, and the file got
``create`` and ``truncate`` but no ``write``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from ext4_recording import mkfs, nbd_file, qemu_nbd

from blocktrace.logwrites.format import LogFlag
from blocktrace.logwrites.reader import LogReader
from support import ServerProcess, blocktrace, require, require_fuse_and_loop, run

MiB = 1 << 20
DETECT_ZEROES = (
    "-f",
    "raw",
    "--cache=none",
    "--discard=unmap",
    "--detect-zeroes=unmap",
)


def test_zero_filled_file_is_written(tmp_path: Path) -> None:
    require("qemu-nbd", "nbdfuse")
    require_fuse_and_loop()
    img = mkfs(tmp_path / "disk.img", 64, options=("-b", "4096"))
    base = tmp_path / "base.img"
    shutil.copy(img, base)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    log, events = tmp_path / "trace.log", tmp_path / "events.jsonl"
    args = ["--trace", f"log:{log}", "--trace", f"introspect:{events},copy-mode=write-blocking"]
    size = 8 * MiB
    with (
        ServerProcess(tmp_path, [img], args) as srv,
        qemu_nbd(tmp_path / "dz.sock", [*DETECT_ZEROES, srv.uri("disk")]) as sock,
        nbd_file(tmp_path, sock) as dev,
    ):
        run(["mount", "-t", "ext4", "-o", "loop", str(dev), str(mnt)], timeout=30)
        try:
            (mnt / "data").write_bytes(b"x" * 4096)  # written data: the control
            with open(mnt / "zeros", "wb") as f:
                for _ in range(size // MiB):
                    f.write(bytes(MiB))
            run(["sync"], timeout=60)
        finally:
            run(["umount", str(mnt)], timeout=60)
    with LogReader(log) as reader:  # the zeroes reached the trace as zeroes, not data
        zeroed = sum(e.length for e in reader.entries() if e.flags & LogFlag.DISCARD)
    assert zeroed >= size, zeroed
    replayed = [json.loads(line) for line in blocktrace("watch", base, log).stdout.splitlines()]
    live = [json.loads(line) for line in events.read_text().splitlines()]
    for got in (replayed, live):
        writes = [(e["offset"], e["length"]) for e in got if e["kind"] == "write"]
        by_path = {e["path"]: e for e in got if e["kind"] == "write"}
        assert "/data" in by_path, got
        covered = sorted(
            (int(e["offset"]), int(e["length"]))
            for e in got
            if e["kind"] == "write" and e["path"] == "/zeros"
        )
        end = 0
        for offset, length in covered:  # the write events cover the whole file
            assert offset <= end, (covered, writes)
            end = max(end, offset + length)
        assert end == size, covered
        assert not [e for e in got if e["kind"] == "truncate"], got
