"""SIGTERM while a trace is paused with a full queue (issue #10 item 11).

A client's write waits for queue space behind the paused trace when the server is told to
stop.  The stop must neither hang until it gives up on the connection, nor apply that write
to the image without a record: after the stop, replaying the log onto the base gives the
image exactly, and every write the client saw acknowledged is in both.
"""

from __future__ import annotations

import shutil
import signal
import threading
import time
from pathlib import Path

import pytest
from replica_helpers import QMP

from blocktrace.logwrites.replay import replay
from support import ServerProcess, make_image

nbd = pytest.importorskip("nbd", reason="machine lacks python3-libnbd")

MiB = 1024 * 1024
SIZE = 16 * MiB
CHUNK = 64 * 1024


def test_sigterm_with_paused_full_trace_neither_hangs_nor_applies_untraced(
    tmp_path: Path,
) -> None:
    image = make_image(tmp_path / "disk.img", SIZE, seed=4)
    base = tmp_path / "base.img"
    shutil.copyfile(image, base)
    log = tmp_path / "disk.log"
    spec = f"disk=log:{log},job-id=t,copy-mode=background,queue-size=1M"
    srv = ServerProcess(tmp_path, [image], ["--trace", spec, "--qmp", str(tmp_path / "q.sock")])
    srv.start()
    acked: list[int] = []
    try:
        qmp = QMP(tmp_path / "q.sock")
        qmp.q.cmd("block-job-pause", device="t")
        h = nbd.NBD()
        h.connect_uri(srv.uri("disk"))

        def writer() -> None:
            try:
                for i in range(64):  # 4 MiB: far more than the 1 MiB queue holds
                    h.pwrite(bytes([i + 1]) * CHUNK, i * CHUNK)
                    acked.append(i)
            except nbd.Error:
                pass  # the server stopped: the rest were never acknowledged

        t = threading.Thread(target=writer, daemon=True)
        t.start()
        # wait until the writer is stuck behind the full queue (bounded wait, no timing)
        last, still = -1, 0
        for _ in range(2000):
            n = qmp.job("t")["queued-records"]
            still = still + 1 if n == last and n > 0 else 0
            last = n
            if still >= 20:
                break
            time.sleep(0.01)
        assert t.is_alive() and len(acked) < 64, "the paused trace did not hold the writer"
        qmp.close()
        assert srv.proc is not None
        srv.proc.send_signal(signal.SIGTERM)
        # a bound against a hang, not a timing assertion: main waited 30 s, then aborted
        rc = srv.proc.wait(20)
        t.join(20)
    finally:
        srv.kill()
    assert rc == 0, srv.stderr()
    data = image.read_bytes()
    for i in acked:
        assert data[i * CHUNK : (i + 1) * CHUNK] == bytes([i + 1]) * CHUNK
    replay(log, base)
    assert base.read_bytes() == data, "the image holds a write that the log does not"
