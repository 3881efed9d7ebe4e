"""An ``nbd:`` replica that is the traced export itself is refused (issue #10 item 12).

Whatever name reaches it (the server's own Unix socket, a symlink to it, its TCP address),
the kernel says the peer is this process (``blocktrace.block.peer``), and the export name is
the traced one: ``block-trace`` fails with one line, and the export is left serving and
stopping as before.  Before, the replica echoed records into its own trace, then deadlocked.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from replica_helpers import QMP, free_port

from support import ServerProcess, make_image, require, run

MiB = 1024 * 1024

pytestmark = pytest.mark.timeout(120)


def test_nbd_replica_of_the_traced_export_itself_is_refused(tmp_path: Path) -> None:
    require("qemu-io")
    image = make_image(tmp_path / "disk.img", 4 * MiB, seed=2)
    port = free_port()
    args = ["--listen", f"127.0.0.1:{port}", "--qmp", str(tmp_path / "qmp.sock")]
    with ServerProcess(tmp_path, [image], args) as srv:
        alias = tmp_path / "alias.sock"
        alias.symlink_to(srv.socket)
        qmp = QMP(tmp_path / "qmp.sock")
        uris = [
            f"nbd+unix:///disk?socket={srv.socket}",
            f"nbd+unix:///disk?socket={alias}",
            f"nbd+unix:///?socket={srv.socket}",  # the default export: the traced one
            f"nbd://127.0.0.1:{port}/disk",
        ]
        for n, uri in enumerate(uris):
            reply = qmp.q.cmd_raw(
                "block-trace",
                {"job-id": f"r{n}", "device": "disk", "target": {"type": "nbd", "uri": uri}},
            )
            assert "error" in reply, (uri, reply)
            assert "own export" in reply["error"]["desc"], reply
        assert qmp.q.cmd("query-block-jobs") == []
        qmp.close()
        uri = srv.uri("disk")
        run(["qemu-io", "-f", "raw", uri, "-c", "write -P 0x33 0 64k", "-c", "flush"], timeout=30)
    # (ServerProcess asserts the SIGTERM stop exits 0)
    assert image.read_bytes()[: 64 * 1024] == b"\x33" * 64 * 1024
    assert not os.path.exists(srv.socket)
