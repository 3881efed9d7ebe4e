"""``blocktrace watch`` on a QEMU blklogwrites log: JSON lines, the human form, and operator
errors as one line."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from ext4_recording import debugfs, diff_records, qemu_log

from blocktrace.stream.records import RecordKind
from support import BLOCKTRACE, ServerProcess, blocktrace, require, run


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    require("mkfs.ext4", "debugfs", "qemu-io")
    work = tmp_path_factory.mktemp("watchcli")
    src = work / "src"
    (src / "docs").mkdir(parents=True)
    (src / "docs/readme").write_bytes(b"r" * 3000)
    base = work / "base.img"
    with open(base, "wb") as f:
        f.truncate(16 << 20)
    run(["mkfs.ext4", "-q", "-F", "-d", str(src), str(base)], timeout=60)
    new = work / "new.img"
    shutil.copy(base, new)
    local = work / "payload"
    local.write_bytes(os.urandom(9000))
    debugfs(new, f"mkdir /docs/sub\nwrite {local} /docs/sub/payload\nrm /docs/readme\n")
    target = work / "target.img"
    shutil.copy(base, target)
    log = work / "trace.log"
    qemu_log(work, target, log, diff_records(base, new))
    return base, log


def test_json_lines(recorded: tuple[Path, Path]) -> None:
    base, log = recorded
    out = blocktrace("watch", base, log, "--stats").stdout
    events = [json.loads(line) for line in out.splitlines()]
    # qemu-io flushes after every write, so each block's write is its own settle
    assert {(e["kind"], e["path"]) for e in events} == {
        ("mkdir", "/docs/sub"),
        ("create", "/docs/sub/payload"),
        ("write", "/docs/sub/payload"),
        ("delete", "/docs/readme"),
    }
    kinds = [e["kind"] for e in events]
    assert kinds.index("mkdir") < kinds.index("create") < kinds.index("write")
    writes = sorted(
        (e["offset"], e["offset"] + e["length"]) for e in events if e["kind"] == "write"
    )
    assert writes[0][0] == 0 and writes[-1][1] == 9000
    assert all(a[1] == b[0] for a, b in itertools.pairwise(writes))
    assert all(isinstance(e["record"], int) and e["ino"] > 0 for e in events)
    records = [e["record"] for e in events]
    assert records == sorted(records)


def test_human_form_and_stats(recorded: tuple[Path, Path]) -> None:
    base, log = recorded
    proc = blocktrace("watch", base, log, "--human", "--stats")
    lines = proc.stdout.splitlines()
    assert "mkdir" in lines[0] and lines[0].endswith("/docs/sub")
    assert lines[-1].endswith("/docs/sub/payload [8192, 9000)")
    stats = json.loads(proc.stderr.strip().splitlines()[-1])
    assert stats["disk"]["events"] == len(lines) and stats["disk"]["pending_overflow"] == 0


@pytest.mark.parametrize("case", ["missing", "not-a-log", "not-ext4"])
def test_operator_errors_are_one_line(
    tmp_path: Path, recorded: tuple[Path, Path], case: str
) -> None:
    base, log = recorded
    junk = tmp_path / "junk"
    junk.write_bytes(b"\x01" * 8192)
    args = {
        "missing": (tmp_path / "nope", log),
        "not-a-log": (base, base),
        "not-ext4": (junk, log),
    }[case]
    proc = blocktrace("watch", *args, check=False)
    assert proc.returncode != 0
    assert proc.stdout == ""
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert proc.stderr.startswith("blocktrace: ") and "Traceback" not in proc.stderr


def test_follow_a_running_trace(tmp_path: Path) -> None:
    """``watch --follow`` tails the log of a trace running in another process: events appear
    while the server runs, and the command ends by itself at the log's end mark."""
    require("mkfs.ext4", "debugfs", "qemu-io")
    src = tmp_path / "src"
    src.mkdir()
    (src / "a").write_bytes(b"a" * 2000)
    img = tmp_path / "disk.img"
    with open(img, "wb") as f:
        f.truncate(16 << 20)
    run(["mkfs.ext4", "-q", "-F", "-d", str(src), str(img)], timeout=60)
    base = tmp_path / "base.img"
    shutil.copy(img, base)
    changed = tmp_path / "changed.img"
    shutil.copy(img, changed)
    debugfs(changed, "mkdir /followed\nrm /a\n")
    log = tmp_path / "trace.log"
    watcher = subprocess.Popen(
        [*BLOCKTRACE, "watch", str(base), str(log), "--follow", "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        with ServerProcess(tmp_path, [img], ["--trace", f"log:{log}"]) as srv:
            cmds: list[str] = []
            for i, rec in enumerate(diff_records(base, changed)):
                if rec.kind is RecordKind.WRITE:
                    chunk = tmp_path / f"c{i}"
                    chunk.write_bytes(bytes(rec.data))
                    cmds += ["-c", f"write -s {chunk} {rec.offset} {len(rec.data)}"]
            run(["qemu-io", "-f", "raw", *cmds, "-c", "flush", srv.uri()], timeout=60)
            assert watcher.stdout is not None
            first = json.loads(watcher.stdout.readline())  # arrives while the server runs
            assert watcher.poll() is None
        watcher.wait(timeout=30)  # the end mark stops it (output is a few lines: no pipe stall)
        out = watcher.stdout.read()  # the same buffered reader as readline() above
        err = watcher.stderr.read() if watcher.stderr else ""
    finally:
        if watcher.poll() is None:
            watcher.kill()
            watcher.wait(10)
    events = [first, *map(json.loads, out.splitlines())]
    assert {(e["kind"], e["path"]) for e in events} == {("mkdir", "/followed"), ("delete", "/a")}
    assert watcher.returncode == 0, err
