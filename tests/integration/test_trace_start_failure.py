"""A ``block-trace`` that fails to start leaves the export exactly as it was (issue #10 item 13).

Each target type fails at its own point: a log whose directory is missing and replicas that
cannot be opened fail in ``open``; an ``introspect`` target on an image that is not ext4
fails only once the trace is attached (its watcher reads the live image).  After each failure
a real client (qemu-io through QEMU's nbd driver) writes and flushes: both must be answered,
no job may be listed, the filter must hold no trace, and a later trace must start and record.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp import ExecuteError, QMPClient

from qmp_helpers import ServerThread
from support import blocktrace, make_image, require, run

MiB = 1024 * 1024


def failing_targets(tmp: Path, nbd_sock: Path) -> dict[str, dict[str, Any]]:
    small = tmp / "small.img"
    small.write_bytes(b"")  # a replica smaller than the source is refused at open
    return {
        "log": {"type": "log", "filename": str(tmp / "missing-dir" / "t.log")},
        "replica": {"type": "replica", "filename": str(small)},
        "nbd": {"type": "nbd", "uri": f"nbd+unix:///nope?socket={tmp / 'absent.sock'}"},
        # the image is random bytes, not ext4: the watcher fails once attached
        "introspect": {"type": "introspect", "filename": str(tmp / "events.jsonl")},
    }


@pytest.mark.parametrize("kind", ["log", "replica", "nbd", "introspect"])
def test_failed_block_trace_leaves_the_export_as_before(tmp_path: Path, kind: str) -> None:
    require("qemu-io")
    image = make_image(tmp_path / "disk.img", 4 * MiB, seed=3)
    with ServerThread(tmp_path, [("disk", os.fspath(image))]) as st:
        target = failing_targets(tmp_path, st.nbd)[kind]

        async def start(job: str, tgt: dict[str, Any]) -> Any:
            qmp = QMPClient("test")
            await qmp.connect(os.fspath(st.path))
            try:
                return await qmp.execute(
                    "block-trace", {"job-id": job, "device": "disk", "target": tgt}
                )
            finally:
                await qmp.disconnect()

        with pytest.raises(ExecuteError):
            asyncio.run(start("bad", target))
        filt = st.service.registry.get("disk").device  # type: ignore[union-attr]
        assert st.run(lambda: filt.sinks) == ()
        assert st.run(lambda: st.control.jobs.manager.list()) == []  # type: ignore[union-attr]
        # a write and a FLUSH are both answered (a dead sink answered the write only)
        uri = f"nbd+unix:///disk?socket={st.nbd}"
        run(
            ["qemu-io", "-f", "raw", uri, "-c", "write -P 0x5a 0 64k", "-c", "flush"],
            timeout=30,
        )
        assert image.read_bytes()[: 64 * 1024] == b"\x5a" * 64 * 1024
        # and the export still traces: a new trace records the next write
        log = tmp_path / "ok.log"
        asyncio.run(start("good", {"type": "log", "filename": str(log)}))
        run(["qemu-io", "-f", "raw", uri, "-c", "write -P 0x6b 0 4k", "-c", "flush"], timeout=30)
        st.call(st.control.jobs.manager.stop("good"))  # type: ignore[union-attr]
    out = blocktrace("log", "list", log)
    assert out.returncode == 0 and "write" in out.stdout.lower(), out
