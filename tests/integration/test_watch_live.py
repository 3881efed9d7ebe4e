"""Live introspection: ``blocktrace serve --trace introspect:EVENTS`` follows a real kernel
mount through blocktrace's own NBD server, alongside a log trace of the same export.

The introspect trace runs with ``copy-mode=write-blocking``: a guest write completes only once
the target has processed it, so after each phase's ``sync`` returns, the events file must
already hold exactly that phase's events.  ``blocktrace watch`` replayed from the recorded log
must produce the same events.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from ext4_recording import PHASES, mkfs, nbd_file

from support import ServerProcess, blocktrace, require_fuse_and_loop, run


def read_events(path: Path) -> list[dict[str, object]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def kinds_paths(events: list[dict[str, object]]) -> set[tuple[str, str]]:
    return {(str(e["kind"]), str(e["path"])) for e in events}


def live_setup(tmp_path: Path, mib: int) -> tuple[Path, Path, Path, Path, Path]:
    """A fresh ext4 image of ``mib`` MiB and its pristine copy (the trace's base), plus where
    the live events, the log trace and the mount point go (skips without FUSE and loop)."""
    require_fuse_and_loop()
    img = mkfs(tmp_path / "disk.img", mib, options=("-b", "4096"))
    base = tmp_path / "base.img"
    shutil.copy(img, base)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    return img, base, tmp_path / "events.jsonl", tmp_path / "trace.log", mnt


def test_live_events_by_each_sync_and_replay_agrees(tmp_path: Path) -> None:
    img, base, events, log, mnt = live_setup(tmp_path, 64)
    args = ["--trace", f"introspect:{events},copy-mode=write-blocking", "--trace", f"log:{log}"]
    seen: list[set[tuple[str, str]]] = []
    with ServerProcess(tmp_path, [img], args) as srv, nbd_file(tmp_path, srv.socket) as dev:
        run(["mount", "-t", "ext4", "-o", "loop", str(dev), str(mnt)], timeout=30)
        try:
            os.sync()
            done = len(read_events(events))
            seen.append(kinds_paths(read_events(events)))
            for _, action, _ in PHASES:
                action(mnt)
                os.sync()  # returns only after the target processed the commit
                now = read_events(events)
                seen.append(kinds_paths(now[done:]))
                done = len(now)
        finally:
            run(["umount", str(mnt)], timeout=60)
    assert seen[0] == set(), "mounting is not a file operation"
    for (name, _, expected), got in zip(PHASES, seen[1:], strict=True):
        assert got == expected, name
    live = read_events(events)
    replayed = [json.loads(line) for line in blocktrace("watch", base, log).stdout.splitlines()]
    assert kinds_paths(replayed) == kinds_paths(live)
    assert len(replayed) == len(live)


def test_live_background_small_queue_loses_nothing(tmp_path: Path) -> None:
    """A bulk copy through a background introspect trace whose queue (1 MiB) is far smaller
    than the data: when inference is slower than the guest, the trace makes writers wait
    (backpressure) instead of dropping records, so every file's create and its whole write
    still appear, exactly as ``watch`` infers them from the log trace of the same export."""
    img, base, events, log, mnt = live_setup(tmp_path, 128)
    args = ["--trace", f"introspect:{events},queue-size=1M", "--trace", f"log:{log}"]
    sizes = {f"/bulk{i}": (8 + 4 * i) << 20 for i in range(3)}
    sizes.update({f"/small/f{i}": 100 + 997 * i for i in range(200)})
    with ServerProcess(tmp_path, [img], args) as srv, nbd_file(tmp_path, srv.socket) as dev:
        run(["mount", "-t", "ext4", "-o", "loop", str(dev), str(mnt)], timeout=30)
        try:
            (mnt / "small").mkdir()
            for path, size in sizes.items():
                (mnt / path.lstrip("/")).write_bytes(os.urandom(size))
            os.sync()
        finally:
            run(["umount", str(mnt)], timeout=60)
    live = read_events(events)  # the server has stopped: the target finished its queue
    for path, size in sizes.items():
        assert ("create", path) in kinds_paths(live), path
        written = sorted(
            (int(str(e["offset"])), int(str(e["length"])))
            for e in live
            if e["kind"] == "write" and e["path"] == path
        )
        end = 0
        for offset, length in written:  # the writes cover the file without a gap
            assert offset <= end, (path, written)
            end = max(end, offset + length)
        assert end == size, (path, written)
    replayed = [json.loads(line) for line in blocktrace("watch", base, log).stdout.splitlines()]

    def numbered_apart(evs: list[dict[str, object]]) -> list[dict[str, object]]:
        # live records are the trace's sequence numbers, replayed ones log entry indexes
        return [{k: v for k, v in e.items() if k not in ("record", "data_record")} for e in evs]

    assert numbered_apart(replayed) == numbered_apart(live)
