"""A write that fails part-way on the image (issue #10 item 9).

The served image lives on a 1 MiB tmpfs (a real full file system); a client's 2 MiB write
gets ENOSPC after the file system's free space was written.  Those bytes are in the image:
the trace must carry them (the filter records what the range holds after the failure), so
that replaying the log onto the base gives the image exactly.  Before, the log lacked them
and the trace ended as if clean.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from blocktrace.logwrites.reader import LogReader
from blocktrace.logwrites.replay import replay
from support import ServerProcess, small_tmpfs

nbd = pytest.importorskip("nbd", reason="machine lacks python3-libnbd")

MiB = 1024 * 1024


@pytest.fixture
def tiny_fs(tmp_path: Path) -> Iterator[Path]:
    with small_tmpfs(tmp_path / "tiny", "1m") as mnt:
        yield mnt


def test_write_failing_part_way_is_in_the_log(tmp_path: Path, tiny_fs: Path) -> None:
    image = tiny_fs / "disk.img"
    with open(image, "wb") as f:
        f.truncate(8 * MiB)  # sparse: the file system fills as blocks are written
    base = tmp_path / "base.img"
    shutil.copyfile(image, base)
    log = tmp_path / "disk.log"
    with ServerProcess(tmp_path, [image], ["--trace", f"disk=log:{log}"]) as srv:
        h = nbd.NBD()
        h.connect_uri(srv.uri("disk"))
        with pytest.raises(nbd.Error) as info:
            h.pwrite(b"\xab" * (2 * MiB), 0)
        assert "No space left" in str(info.value), info.value  # ENOSPC, told to the client
        h.pwrite(b"\xcd" * 4096, 0)  # the trace goes on: a later write lands after it
        h.flush()
        h.shutdown()
    data = image.read_bytes()
    assert b"\xab" in data, "the file system took none of the write: the test proves nothing"
    with LogReader(log) as reader:
        assert reader.tail().state == "clean"
    replay(log, base)
    assert base.read_bytes() == data, "bytes in the image that no log entry carries"
