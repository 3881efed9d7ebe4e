"""``block-trace`` with an ``introspect`` target, driven by qemu.qmp against a real server.

The QMP user's path to disk introspection: start a trace whose target turns the write stream
into ext4 file-level events, let the real kernel change the file system through blocktrace's
NBD export (nbdfuse + loop mount), cancel the job, and find the operations in the events file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from ext4_recording import mkfs, nbd_file

from support import ServerProcess, require_fuse_and_loop, run

legacy = pytest.importorskip("qemu.qmp.legacy", reason="qemu.qmp is not installed")


def test_block_trace_introspect_target_reports_file_events(tmp_path: Path) -> None:
    require_fuse_and_loop()
    img = mkfs(tmp_path / "disk.img", 32, options=("-b", "4096"))
    qmp_sock = tmp_path / "qmp.sock"
    events = tmp_path / "events.jsonl"
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with ServerProcess(tmp_path, [img], ["--qmp", str(qmp_sock)]) as srv:
        qmp = legacy.QEMUMonitorProtocol(str(qmp_sock))
        qmp.connect()
        try:
            reply = qmp.cmd_raw(
                "block-trace",
                {
                    "job-id": "look",
                    "device": "disk",
                    "target": {"type": "introspect", "filename": str(events)},
                    "copy-mode": "write-blocking",
                },
            )
            assert reply == {"return": {}}, reply
            jobs = qmp.cmd_raw("query-block-jobs")["return"]
            assert [j["device"] for j in jobs] == ["look"]
            assert jobs[0]["type"] == "trace"
            with nbd_file(tmp_path, srv.socket) as dev:
                run(["mount", "-t", "ext4", "-o", "loop", str(dev), str(mnt)], timeout=30)
                try:
                    (mnt / "docs").mkdir()
                    (mnt / "docs" / "hello.txt").write_bytes(b"hello, introspection\n" * 100)
                    os.sync()
                    (mnt / "docs" / "hello.txt").rename(mnt / "docs" / "renamed.txt")
                    os.sync()
                finally:
                    run(["umount", str(mnt)], timeout=60)
            assert qmp.cmd_raw("block-job-cancel", {"device": "look"}) == {"return": {}}
            ended = qmp.pull_event(wait=30.0)
            while ended is not None and ended["event"] not in (
                "BLOCK_JOB_COMPLETED",
                "BLOCK_JOB_CANCELLED",
            ):
                ended = qmp.pull_event(wait=30.0)
            assert ended is not None, "no end event for the job"
            assert "error" not in ended["data"], ended
        finally:
            qmp.close()
    got = [json.loads(line) for line in events.read_text().splitlines() if line.strip()]
    pairs = {(e["kind"], e["path"]) for e in got}
    assert ("mkdir", "/docs") in pairs, pairs
    assert ("create", "/docs/hello.txt") in pairs, pairs
    assert any(e["kind"] == "write" and e["path"] == "/docs/hello.txt" for e in got), pairs
    renames = [e for e in got if e["kind"] == "rename"]
    assert renames and renames[-1]["path"] == "/docs/renamed.txt", renames
