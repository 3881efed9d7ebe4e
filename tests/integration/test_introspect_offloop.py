"""The live ``introspect`` target never crawls on the event loop (issue #10 item 3).

On main the crawl of the base image ran inside ``attached()`` on the event loop: O(files) for a
real disk, and with a hostile journal tree 4.3 GB in 8 s while NBD requests went unanswered.
Now ``attached()`` only starts the crawl in a worker thread; records wait for it.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import pytest
from ext4_recording import mkfs

from blocktrace.errors import TargetError
from blocktrace.trace.records import RecordKind, TraceRecord
from blocktrace.trace.targets.base import TargetInfo
from blocktrace.trace.targets.introspect import IntrospectTarget
from support import require


def test_attached_leaves_the_crawl_to_a_worker_thread(tmp_path: Path) -> None:
    require("mkfs.ext4")
    content = tmp_path / "content"
    content.mkdir()
    for i in range(50):
        (content / f"f{i}").write_bytes(os.urandom(100))
    img = mkfs(tmp_path / "disk.img", 16, content=content)
    events: list[Any] = []

    async def main() -> None:
        target = IntrospectTarget(sink=events.append)
        await target.open(TargetInfo("disk", img.stat().st_size, 512, filename=str(img)))
        target.attached()
        assert target.stats() == {}, "the crawl ran on the event loop"
        await target.deliver([TraceRecord(1, RecordKind.FLUSH, 0, 0, False, None)])
        assert target.stats(), "records were processed before the crawl"
        await target.close(clean=True)

    asyncio.run(main())
    assert not [e for e in events if e.kind == "error"]


def test_image_without_ext4_fails_at_open(tmp_path: Path) -> None:
    """The check that the image is followable stays before the trace starts (in a thread)."""
    img = tmp_path / "zero.img"
    with open(img, "wb") as f:
        f.truncate(4 << 20)

    async def main() -> None:
        target = IntrospectTarget(sink=lambda e: None)
        with pytest.raises(TargetError, match="no ext4 file system"):
            await target.open(TargetInfo("disk", 4 << 20, 512, filename=str(img)))

    asyncio.run(main())
