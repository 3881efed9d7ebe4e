"""The live ``introspect`` target's ``events-to=nats://...``: every event line also goes to a
NATS subject (the publisher of ``watch --events``), against a real nats-server.

The subject is captured by a JetStream stream (docs/jetstream.md, "Events out"), read back
after the trace, and must hold exactly the lines of the events file written alongside, in
order.  A server that is gone is a target error under the trace's ``on-target-error``.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from nats_helpers import NatsCluster, require_nats
from support import ServerProcess, require_fuse_and_loop, run

SUBJECT = "vm.events"


@pytest.fixture
def nats1(tmp_path: Path) -> Iterator[NatsCluster]:
    require_nats()
    with NatsCluster(tmp_path / "nats", 1) as cluster:
        asyncio.run(_capture(cluster.url(0)))
        yield cluster


async def _capture(server: str) -> None:
    import nats

    nc = await nats.connect(server)
    try:
        await nc.jetstream().add_stream(name="EVENTS", subjects=[SUBJECT], storage="memory")
    finally:
        await nc.close()


def captured(server: str) -> list[str]:
    async def read() -> list[str]:
        import nats

        nc = await nats.connect(server)
        try:
            js = nc.jetstream()
            n = (await js.stream_info("EVENTS")).state.messages
            return [(await js.get_msg("EVENTS", seq)).data.decode() for seq in range(1, n + 1)]
        finally:
            await nc.close()

    return asyncio.run(read())


def ext4_image(tmp_path: Path) -> Path:
    require_fuse_and_loop()
    from ext4_recording import mkfs

    return Path(mkfs(tmp_path / "disk.img", 32, options=("-b", "4096")))


def kernel_writes(tmp_path: Path, socket: Path) -> None:
    """The real ext4 driver changes the file system through the traced export."""
    from ext4_recording import nbd_file

    mnt = tmp_path / "mnt"
    mnt.mkdir(exist_ok=True)
    with nbd_file(tmp_path, socket) as dev:
        run(["mount", "-t", "ext4", "-o", "loop", str(dev), str(mnt)], timeout=30)
        try:
            (mnt / "docs").mkdir()
            (mnt / "docs" / "hello.txt").write_bytes(b"hello, subject\n" * 100)
            os.sync()
            (mnt / "docs" / "hello.txt").rename(mnt / "docs" / "renamed.txt")
            os.sync()
        finally:
            run(["umount", str(mnt)], timeout=60)


def check(lines: list[str], server: str) -> None:
    assert lines
    assert captured(server) == lines
    pairs = {(e["kind"], e["path"]) for e in map(json.loads, lines)}
    assert ("mkdir", "/docs") in pairs and ("create", "/docs/hello.txt") in pairs, pairs
    assert ("rename", "/docs/renamed.txt") in pairs, pairs


def test_serve_introspect_publishes_the_events_file_lines(
    tmp_path: Path, nats1: NatsCluster
) -> None:
    """``serve --trace disk=introspect:FILE,events-to=nats://...``: the subject gets the
    lines of FILE, in order."""
    img = ext4_image(tmp_path)
    events = tmp_path / "events.jsonl"
    spec = f"disk=introspect:{events},events-to={nats1.url(0, SUBJECT)}"
    with ServerProcess(tmp_path, [img], ["--trace", spec]) as srv:
        kernel_writes(tmp_path, srv.socket)
    assert srv.stop() == 0, srv.stderr()
    check(events.read_text().splitlines(), nats1.url(0))


def _block_trace(qmp: Any, target: dict[str, Any], **args: Any) -> None:
    spec = {"job-id": "look", "device": "disk", "target": target, **args}
    assert qmp.cmd_raw("block-trace", spec) == {"return": {}}


def _job_end(qmp: Any) -> dict[str, Any]:
    ended = qmp.pull_event(wait=60.0)
    while ended is not None and ended["event"] not in (
        "BLOCK_JOB_COMPLETED",
        "BLOCK_JOB_CANCELLED",
    ):
        ended = qmp.pull_event(wait=60.0)
    assert ended is not None, "no end event for the job"
    return dict(ended)


def test_block_trace_introspect_events_to(tmp_path: Path, nats1: NatsCluster) -> None:
    """QMP ``block-trace`` with ``"events-to"``: the same."""
    legacy = pytest.importorskip("qemu.qmp.legacy", reason="qemu.qmp is not installed")
    img = ext4_image(tmp_path)
    qmp_sock = tmp_path / "qmp.sock"
    events = tmp_path / "events.jsonl"
    with ServerProcess(tmp_path, [img], ["--qmp", str(qmp_sock)]) as srv:
        qmp = legacy.QEMUMonitorProtocol(str(qmp_sock))
        qmp.connect()
        try:
            target = {"type": "introspect", "filename": str(events)}
            target["events-to"] = nats1.url(0, SUBJECT)
            _block_trace(qmp, target, **{"copy-mode": "write-blocking"})
            kernel_writes(tmp_path, srv.socket)
            assert qmp.cmd_raw("block-job-cancel", {"device": "look"}) == {"return": {}}
            ended = _job_end(qmp)
            assert "error" not in ended["data"], ended
        finally:
            qmp.close()
    check(events.read_text().splitlines(), nats1.url(0))


def test_server_gone_is_a_target_error_under_the_policy(tmp_path: Path, nats1: NatsCluster) -> None:
    """nats-server stopped mid-trace: with ``on-target-error=break`` the job ends, bounded
    (the flush timeout), with an error naming events-to; clients carry on; never silent."""
    legacy = pytest.importorskip("qemu.qmp.legacy", reason="qemu.qmp is not installed")
    img = ext4_image(tmp_path)
    qmp_sock = tmp_path / "qmp.sock"
    with ServerProcess(tmp_path, [img], ["--qmp", str(qmp_sock)]) as srv:
        qmp = legacy.QEMUMonitorProtocol(str(qmp_sock))
        qmp.connect()
        try:
            target = {"type": "introspect", "filename": str(tmp_path / "events.jsonl")}
            target["events-to"] = nats1.url(0, SUBJECT)
            _block_trace(qmp, target, **{"on-target-error": "break"})
            nats1.stop()
            kernel_writes(tmp_path, srv.socket)
            ended = _job_end(qmp)
            assert "events-to" in str(ended["data"].get("error", "")), ended
        finally:
            qmp.close()
