"""Live introspection: ``blocktrace serve --trace introspect:EVENTS`` follows a real kernel
mount through blocktrace's own NBD server, alongside a log trace of the same export; the live
events and ``blocktrace watch`` replayed from the recorded log must both equal the operations,
and the live ones must be on disk by the time the guest's ``sync`` returns."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from ext4_recording import mkfs, nbd_file

from support import ServerProcess, blocktrace, require_fuse_and_loop, run

EXPECTED = {
    ("mkdir", "/live"),
    ("create", "/live/f"),
    ("write", "/live/f"),
    ("rename", "/live/g"),
    ("chmod", "/live/g"),
    ("symlink", "/s"),
}


def read_events(path: Path) -> list[dict[str, object]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_live_events_match_replayed_log(tmp_path: Path) -> None:
    require_fuse_and_loop()
    img = mkfs(tmp_path / "disk.img", 32, options=("-b", "4096"))
    base = tmp_path / "base.img"
    shutil.copy(img, base)
    events = tmp_path / "events.jsonl"
    log = tmp_path / "trace.log"
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    # write-blocking: a guest write completes only once the introspect target has processed
    # it, so the events of a transaction are in the file before the guest's sync returns
    args = ["--trace", f"introspect:{events},copy-mode=write-blocking", "--trace", f"log:{log}"]
    with ServerProcess(tmp_path, [img], args) as srv, nbd_file(tmp_path, srv.socket) as dev:
        run(["mount", "-t", "ext4", "-o", "loop", str(dev), str(mnt)], timeout=30)
        try:
            os.sync()
            mounted = {(str(e["kind"]), str(e["path"])) for e in read_events(events)}
            os.mkdir(mnt / "live")
            (mnt / "live/f").write_bytes(os.urandom(20_000))
            os.sync()
            first = {(str(e["kind"]), str(e["path"])) for e in read_events(events)}
            os.rename(mnt / "live/f", mnt / "live/g")
            os.chmod(mnt / "live/g", 0o600)
            os.symlink("live/g", mnt / "s")
            os.sync()
            live = {(str(e["kind"]), str(e["path"])) for e in read_events(events)}
        finally:
            run(["umount", str(mnt)], timeout=60)
    assert mounted == set()
    assert first == {("mkdir", "/live"), ("create", "/live/f"), ("write", "/live/f")}
    assert live == EXPECTED
    replayed = blocktrace("watch", base, log).stdout
    assert {(e["kind"], e["path"]) for e in map(json.loads, replayed.splitlines())} == EXPECTED
