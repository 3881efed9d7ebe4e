"""A replica never says ``consistent`` when it is not (issue #10 item 10).

The source server is killed with -9 while records for the replica are still queued (the trace
is paused, so they are guaranteed to be), and restarted with ``sync=none``.  The bitmap on
disk misses those records; docs/replica.md's decision table says an unclean stop means
compare, whatever the sync mode.  Once the job reports the replica ``consistent``, the two
files must be equal, checked while the server still runs.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from replica_helpers import QMP, Workload, random_image, same_files, sparse

from support import ServerProcess

MiB = 1024 * 1024
SIZE = 32 * MiB

pytestmark = pytest.mark.timeout(120)


def server(tmp: Path, src: Path, rep: Path, sync: str) -> ServerProcess:
    target = f"src=replica:{rep},job-id=r,sync={sync},copy-mode=background"
    return ServerProcess(tmp, [src], ["--trace", target, "--qmp", str(tmp / "qmp.sock")])


@pytest.mark.parametrize("sync", ["none", "full"])
def test_restart_after_kill9_with_queued_records_compares(tmp_path: Path, sync: str) -> None:
    src = random_image(tmp_path / "src.img", SIZE, 5)
    rep = sparse(tmp_path / "rep.img", SIZE)
    srv = server(tmp_path, src, rep, "full").start()
    try:
        qmp = QMP(tmp_path / "qmp.sock")
        qmp.wait_caught_up()
        wl = Workload(srv.uri("src"), src, 11)
        wl.run(100)  # delivered: in the replica and (mostly) in its saved state
        qmp.q.cmd("block-job-pause", device="r")
        # queued behind the paused trace: in no bitmap, not on the replica (no FLUSH or FUA:
        # those wait for the paused target)
        for _ in range(300):
            off = wl.rng.randrange(0, SIZE // 4096) * 4096
            data = wl.rng.randbytes(4096)
            wl.h.pwrite(data, off)
            wl.model[off : off + 4096] = data
        assert qmp.job()["queued-records"] >= 300
        qmp.close()
    finally:
        srv.kill()  # kill -9: the queued records die with the process
    wl.check_source(src)
    assert not same_files(src, rep, SIZE)
    with server(tmp_path, src, rep, sync) as srv:
        qmp = QMP(tmp_path / "qmp.sock")
        job = qmp.wait_caught_up()
        assert job["target"]["consistent"] is True
        # consistent means equal: the server runs, nothing is in flight
        assert same_files(src, rep, SIZE), "replica reported consistent but differs"
        assert job["target"]["sync-mode"] == "compare", job["target"]
        qmp.close()
    assert same_files(src, rep, SIZE)
