"""Events for changes made by debugfs (e2fsprogs writes the image itself: no mount needed).

The write stream is the image difference (a synthetic stream), so these tests run on machines
without FUSE or loop devices; one test also routes it through QEMU's blklogwrites with qemu-io
so the log itself is QEMU's.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import pytest
from ext4_recording import debugfs, diff_records, qemu_log

from blocktrace.ext4.events import FileEvent
from blocktrace.ext4.watcher import StreamRecord, Watcher, log_records
from support import require

COMMANDS = """\
mkdir /new
write {local} /new/file
symlink /sl /new/file
ln /d1/f /d1/hard
unlink /d1/f
set_inode_field /keep mode 0100600
set_inode_field /keep uid 1234
rmdir /d1/d2
rm /gone
ln /keep /keeplink
set_inode_field /keep links_count 2
set_inode_field /trunc size 100
"""

EXPECTED = {
    ("mkdir", "/new"),
    ("create", "/new/file"),
    ("write", "/new/file"),
    ("symlink", "/sl"),
    ("rename", "/d1/hard"),
    ("chmod", "/keep"),
    ("chown", "/keep"),
    ("rmdir", "/d1/d2"),
    ("delete", "/gone"),
    ("link", "/keeplink"),
    ("truncate", "/trunc"),
}


@pytest.fixture
def images(tmp_path: Path) -> tuple[Path, Path, Path]:
    """(base, changed, local file written into it) for the COMMANDS above."""
    require("mkfs.ext4", "debugfs")
    src = tmp_path / "src"
    (src / "d1/d2").mkdir(parents=True)
    (src / "d1/f").write_bytes(b"hello" * 1000)
    (src / "keep").write_bytes(b"k" * 5000)
    (src / "gone").write_bytes(os.urandom(20000))
    (src / "trunc").write_bytes(b"t" * 8000)
    base = tmp_path / "base.img"
    with open(base, "wb") as f:
        f.truncate(16 << 20)
    from support import run

    run(["mkfs.ext4", "-q", "-F", "-d", str(src), str(base)], timeout=60)
    local = tmp_path / "local"
    local.write_bytes(os.urandom(50_000))
    new = tmp_path / "new.img"
    shutil.copy(base, new)
    debugfs(new, COMMANDS.format(local=local))
    return base, new, local


def kinds_paths(events: list[FileEvent]) -> set[tuple[str, str]]:
    return {(e.kind, e.path) for e in events}


def test_debugfs_changes_become_events(images: tuple[Path, Path, Path]) -> None:
    base, new, _local = images
    with Watcher(base) as w:
        events = list(w.feed(diff_records(base, new)))
    assert kinds_paths(events) == EXPECTED
    by_kind = {e.kind: e for e in events}
    assert by_kind["rename"].old_path == "/d1/f"
    assert by_kind["symlink"].target == "/new/file"
    assert by_kind["link"].target == "/keep"
    assert by_kind["chmod"].mode is not None and by_kind["chmod"].mode & 0o7777 == 0o600
    assert by_kind["chown"].uid == 1234
    assert by_kind["truncate"].size == 100
    write = by_kind["write"]
    assert (write.offset, write.length) == (0, 50_000)
    assert all(e.record == len(diff_records(base, new)) - 1 for e in events)  # at the flush


def test_shuffled_sub_block_writes_are_attributed(images: tuple[Path, Path, Path]) -> None:
    """Data before metadata, in pieces smaller than a block, in any order: same events."""
    base, new, _ = images
    pieces: list[StreamRecord] = []
    for rec in diff_records(base, new)[:-1]:
        assert rec.data is not None
        for off in range(0, len(rec.data), 512):
            pieces.append(
                StreamRecord(0, "write", rec.offset + off, 512, rec.data[off : off + 512])
            )
    random.Random(7).shuffle(pieces)
    stream = [StreamRecord(i, p.kind, p.offset, p.length, p.data) for i, p in enumerate(pieces)]
    stream.append(StreamRecord(len(stream), "flush"))
    with Watcher(base) as w:
        events = list(w.feed(stream))
        stats = w.stats()["disk"]
    assert kinds_paths(events) == EXPECTED
    assert stats.attributed > 0 and stats.pending_overflow == 0


def test_pending_overflow_is_counted_not_fatal(images: tuple[Path, Path, Path]) -> None:
    base, new, _ = images
    with Watcher(base, max_pending=2, max_pending_bytes=0) as w:
        events = list(w.feed(diff_records(base, new)))
        stats = w.stats()["disk"]
    assert stats.pending_overflow > 0
    assert stats.pending_blocks <= 2 and stats.pending_bytes == 0
    write = [e for e in events if e.kind == "write"]  # only the last blocks are still known
    assert all(e.offset is not None and e.offset > 0 for e in write)


def test_qemu_blklogwrites_log_of_debugfs_changes(
    tmp_path: Path, images: tuple[Path, Path, Path]
) -> None:
    require("qemu-io")
    base, new, _ = images
    target = tmp_path / "target.img"
    shutil.copy(base, target)
    log = tmp_path / "qemu.log"
    qemu_log(tmp_path, target, log, diff_records(base, new))
    assert target.read_bytes() == new.read_bytes()
    with Watcher(base) as w:
        events = list(w.feed(log_records(log)))
    assert kinds_paths(events) == EXPECTED


def test_zero_and_discard_records(images: tuple[Path, Path, Path]) -> None:
    """Write-zeroes over a file's blocks is a write of that file; a discard of free space
    forgets pending data there; write-zeroes over free space is pending data like a write (a
    file's zero-filled data may arrive that way: ``test_ext4_zeroes``)."""
    base, _, _ = images
    with Watcher(base) as w:
        engine = w.engines[0][1]
        keep = engine.ns.children[2]["keep"]
        first = engine.istate[keep].map.extents[0].pblk
        bs = engine.block_size
        free = next(
            b for b in range(engine.fs.blocks_count - 1, 0, -1) if engine.owner_of(b) is None
        )
        stream = [
            StreamRecord(0, "zero", first * bs, 2 * bs),
            StreamRecord(1, "write", free * bs, bs, b"x" * bs),
            StreamRecord(2, "discard", free * bs, bs),
            StreamRecord(3, "zero", free * bs, bs),
            StreamRecord(4, "flush"),
        ]
        events = list(w.feed(stream))
        assert engine.stats.pending_blocks == 1
        assert engine.pending == {free: 3}
    assert [(e.kind, e.path, e.offset, e.length) for e in events] == [("write", "/keep", 0, 2 * bs)]
