"""An ``nbd:`` replica that is the traced export itself is refused (issue #10 item 12).

Whatever name reaches it (the server's own Unix socket, a symlink to it, its TCP address),
the kernel says the peer is this process (``blocktrace.block.peer``), and the export name is
the traced one: ``block-trace`` fails with one line, and the export is left serving and
stopping as before.  Before, the replica echoed records into its own trace, then deadlocked.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
from pathlib import Path

import pytest
from replica_helpers import QMP, QemuNBD, free_port

from blocktrace.service import Service, ServiceConfig
from blocktrace.trace import TraceOptions
from support import ServerProcess, make_image, require, run

nbd = pytest.importorskip("nbd", reason="machine lacks python3-libnbd")

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


def test_stop_is_bounded_when_the_nbd_target_stops_answering(tmp_path: Path) -> None:
    """#10 item 12, the other half: a target that never answers again (qemu-nbd stopped with
    SIGSTOP, so its socket stays open) cannot hold the server's stop forever.  The write that
    waits on it fails; the trace concludes with the reason; the replica is left unclean."""
    require("qemu-nbd")
    src = make_image(tmp_path / "src.img", 4 * MiB, seed=6)
    rep = tmp_path / "rep.img"
    rep.write_bytes(b"")
    os.truncate(rep, 4 * MiB)
    q = QemuNBD(rep, sock=tmp_path / "rep.sock").start()
    assert q.proc is not None
    service = Service(
        ServiceConfig(images=[("src", str(src))], socket=str(tmp_path / "s.sock"), stop_timeout=1)
    )
    outcome: list[BaseException | None] = []

    async def main() -> None:
        await service.start()
        opts = TraceOptions.from_dict({"sync": "full", "copy-mode": "write-blocking"})
        trace = await service.traces.start("r", "src", {"type": "nbd", "uri": q.uri}, opts)
        await asyncio.wait_for(trace.wait_ready(), 30)
        q.proc.send_signal(signal.SIGSTOP)  # type: ignore[union-attr]

        def client() -> None:
            h = nbd.NBD()
            h.connect_uri(f"nbd+unix:///src?socket={tmp_path / 's.sock'}")
            try:
                h.pwrite(b"\x44" * 4096, 0)  # write-blocking: waits for the stopped replica
                outcome.append(None)
            except nbd.Error as exc:
                outcome.append(exc)

        t = threading.Thread(target=client, daemon=True)
        t.start()
        await asyncio.sleep(0.3)  # the write reaches the stuck target (not a timing assertion)
        await asyncio.wait_for(service.stop(), 60)  # bound against a hang: main never returned
        assert trace.concluded and trace.error is not None, trace.error
        await asyncio.to_thread(t.join, 30)

    try:
        asyncio.run(main())
    finally:
        q.proc.send_signal(signal.SIGCONT)
        q.stop()
    assert outcome and outcome[0] is not None, "the write was acknowledged by a stuck replica"
