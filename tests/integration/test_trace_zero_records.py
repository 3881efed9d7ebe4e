"""Zeroes and trims are recorded as what they are: payload-free entries, never as data.

The trace promise is "every WRITE, WRITE_ZEROES and TRIM becomes a record carrying its data
(zeroes and trims carry none)".  An aligned NBD_CMD_WRITE_ZEROES must therefore reach the log
as a zeroes entry and an aligned NBD_CMD_TRIM as a DISCARD entry, not as a data entry full of
zero bytes: the introspection engine and replicas rely on telling them apart, and logging
zero bytes as data would waste the log's bandwidth.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from blocktrace.logwrites.format import LogFlag
from blocktrace.logwrites.reader import LogReader
from blocktrace.logwrites.replay import replay
from support import ServerProcess, make_image

nbd = pytest.importorskip("nbd", reason="machine lacks python3-libnbd")

MiB = 1024 * 1024


@pytest.mark.parametrize("length", [4096, 256 * 1024, 1 * MiB, 3 * MiB])
def test_aligned_zero_and_trim_are_not_data(tmp_path: Path, length: int) -> None:
    image = make_image(tmp_path / "disk.img", 16 * MiB, seed=7)
    base = tmp_path / "base.img"
    base.write_bytes(image.read_bytes())
    log = tmp_path / "t.log"
    with ServerProcess(tmp_path, [image], ["--trace", f"disk=log:{log}"]) as srv:
        h = nbd.NBD()
        h.connect_uri(srv.uri("disk"))
        h.zero(length, 1 * MiB)
        h.trim(length, 8 * MiB)
        h.flush()
        h.shutdown()
    with LogReader(log) as reader:
        entries = [e for e in reader.entries() if e.length]
    assert entries, "nothing was recorded"
    for e in entries:
        assert e.flags & LogFlag.DISCARD, f"entry {e.index} logged {e.length} bytes as data"
    assert sum(e.length for e in entries) == 2 * length
    assert any(e.is_zeroes for e in entries), "the WRITE_ZEROES lost its zeroes tag"
    replay(log, base)
    assert base.read_bytes() == image.read_bytes()
