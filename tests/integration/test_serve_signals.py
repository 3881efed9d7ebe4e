"""A second SIGTERM during a clean stop must not turn it into a crash.

``timeout``, systemd and impatient operators signal a server more than once.  The first
SIGTERM starts the clean stop (queued records delivered, logs closed with their end mark
counted); later ones must be absorbed, not kill the process half way.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

from blocktrace.logwrites.reader import LogReader
from support import ServerProcess, make_image

nbd = pytest.importorskip("nbd", reason="machine lacks python3-libnbd")

MiB = 1024 * 1024


def test_repeated_sigterm_still_stops_cleanly(tmp_path: Path) -> None:
    image = make_image(tmp_path / "disk.img", 16 * MiB)
    log = tmp_path / "disk.log"
    srv = ServerProcess(tmp_path, [image], ["--trace", f"disk=log:{log}"]).start()
    try:
        h = nbd.NBD()
        h.connect_uri(srv.uri("disk"))
        for i in range(64):
            h.pwrite(bytes([i]) * 65536, i * 65536)
        h.shutdown()
        assert srv.proc is not None
        for _ in range(3):  # spaced so the later ones land while the stop is under way
            srv.proc.send_signal(signal.SIGTERM)
            time.sleep(0.01)
        rc = srv.proc.wait(30)
    finally:
        srv.kill()
    assert rc == 0, srv.stderr()
    with LogReader(log) as reader:
        entries = list(reader.entries())
        assert reader.tail().state == "clean"
    assert all(e.counted for e in entries)
    assert entries[-1].mark == "dm-log-writes-end"
    assert sum(1 for e in entries if e.length) == 64
