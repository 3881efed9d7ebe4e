"""Live introspection of metadata written in place, not through the journal (issue #13's
closing note: a debugfs workload gave no events through the ``introspect`` target).

The trace changes the image before it queues the record, and the engine read a metadata
block's "previous" bytes from that same image: for a block written in place they were already
the new ones, so nothing differed and nothing was reported.  The target now reads the image
as of the record it is at (``blocktrace.stream.prior``).  Real debugfs, real qemu-io through a
real traced export; the real kernel's ext4 without a journal through nbdfuse + loop.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from ext4_recording import debugfs, mkfs, nbd_file, qemu_io_commands

from support import ServerProcess, blocktrace, qemu_io, require, require_fuse_and_loop, run


def read_events(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def numbered_apart(events: list[dict[str, object]]) -> list[dict[str, object]]:
    """Live records are the trace's sequence numbers, replayed ones log entry indexes."""
    return [{k: v for k, v in e.items() if k not in ("record", "data_record")} for e in events]


def debugfs_workload(tmp_path: Path) -> tuple[Path, Path, list[str]]:
    """An ext4 image, its copy (the base) and the qemu-io commands that write, block by block
    and then a flush, what ``debugfs -w`` changed in a third copy: a directory made, a file
    written into it, another removed (all metadata in place: debugfs opens no transaction)."""
    require("mkfs.ext4", "debugfs", "qemu-io")
    content = tmp_path / "content"
    (content / "docs").mkdir(parents=True)
    (content / "docs/readme").write_bytes(b"r" * 3000)
    img = mkfs(tmp_path / "disk.img", 16, content=content)
    base, new = tmp_path / "base.img", tmp_path / "new.img"
    shutil.copyfile(img, base)
    shutil.copyfile(img, new)
    payload = tmp_path / "payload"
    payload.write_bytes(bytes(range(256)) * 40)
    debugfs(new, f"mkdir /docs/sub\nwrite {payload} /docs/sub/payload\nrm /docs/readme\n")
    cmds = qemu_io_commands(tmp_path, base, new)
    return img, base, cmds


@pytest.mark.parametrize("mode", ["background", "write-blocking"])
def test_debugfs_workload_gives_the_same_events_live_as_from_its_log(
    tmp_path: Path, mode: str
) -> None:
    """The events of the live target equal those ``watch`` infers from the log trace of the
    same export (fails on the previous tree: the live events file stayed empty)."""
    img, base, cmds = debugfs_workload(tmp_path)
    events, log = tmp_path / "events.jsonl", tmp_path / "t.log"
    args = ["--trace", f"introspect:{events},copy-mode={mode}", "--trace", f"log:{log}"]
    with ServerProcess(tmp_path, [img], args) as srv:
        qemu_io(srv.uri("disk"), *cmds)
    live = read_events(events)
    replayed = [json.loads(x) for x in blocktrace("watch", base, log, "--json").stdout.split()]
    kinds = [(e["kind"], e["path"]) for e in live]
    assert kinds == [
        ("mkdir", "/docs/sub"),
        ("create", "/docs/sub/payload"),
        ("write", "/docs/sub/payload"),
        ("delete", "/docs/readme"),
    ]
    assert numbered_apart(live) == numbered_apart(replayed)


def test_prior_contents_over_their_bound_are_an_error_event_not_silence(
    tmp_path: Path,
) -> None:
    """With ``max-prior-bytes`` smaller than one operation (the whole new image in one
    write), the bytes it overwrote cannot be kept: the engine's reads of them are reported as
    an ``error`` event naming the bound, instead of events silently missing."""
    img, _, _ = debugfs_workload(tmp_path)
    events = tmp_path / "events.jsonl"
    args = ["--trace", f"introspect:{events},max-prior-bytes=64K"]
    new = tmp_path / "new.img"
    with ServerProcess(tmp_path, [img], args) as srv:
        qemu_io(srv.uri("disk"), f"write -s {new} 0 {new.stat().st_size}", "flush")
    live = read_events(events)
    errors = [e for e in live if e["kind"] == "error"]
    assert errors, live
    assert "prior contents over their bound of 65536 bytes" in str(errors[0]["message"])
    assert not [e for e in live if e["kind"] == "mkdir"], "stale reads must not pose as events"


def test_kernel_ext4_without_a_journal_live_equals_its_log(tmp_path: Path) -> None:
    """The kernel's own in-place metadata: ext4 made without a journal, mounted through
    blocktrace (nbdfuse + loop) with a background introspect trace beside a log trace; the
    live events equal the log's (fails on the previous tree: creates and deletes missing)."""
    require_fuse_and_loop()
    img = mkfs(tmp_path / "disk.img", 32, options=("-b", "4096", "-O", "^has_journal"))
    base = tmp_path / "base.img"
    shutil.copyfile(img, base)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    events, log = tmp_path / "events.jsonl", tmp_path / "t.log"
    args = ["--trace", f"introspect:{events}", "--trace", f"log:{log}"]
    with ServerProcess(tmp_path, [img], args) as srv, nbd_file(tmp_path, srv.socket) as dev:
        run(["mount", "-t", "ext4", "-o", "loop", str(dev), str(mnt)], timeout=30)
        try:
            (mnt / "d").mkdir()
            for i in range(5):
                (mnt / "d" / f"f{i}").write_bytes(os.urandom(5000 + i))
            os.sync()
            os.rename(mnt / "d" / "f1", mnt / "g1")
            os.unlink(mnt / "d" / "f2")
            os.sync()
        finally:
            run(["umount", str(mnt)], timeout=60)
    live = read_events(events)
    replayed = [json.loads(x) for x in blocktrace("watch", base, log, "--json").stdout.split()]
    got = {(e["kind"], e["path"]) for e in live}
    assert {("mkdir", "/d"), ("create", "/d/f0"), ("rename", "/g1"), ("delete", "/d/f2")} <= got
    assert numbered_apart(live) == numbered_apart(replayed)
