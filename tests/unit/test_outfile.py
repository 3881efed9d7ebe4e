"""``open_output``: the rules every file blocktrace writes for a trace is opened under.

Also the Python API users of it: ``LogWriter.create`` (a live log is locked against a second
writer, in this process or another) and ``replay_records(base=...)``, which creates its image.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from blocktrace.block.locking import lock_output
from blocktrace.errors import UsageError
from blocktrace.logwrites.replay import replay_records
from blocktrace.logwrites.writer import LogWriter
from blocktrace.outfile import open_output, output_mode, protect_path


def test_new_file_is_created_exclusively_and_owner_only(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        fd = open_output(str(tmp_path / "new"), overwrite=False, lock=lock_output)
    finally:
        os.umask(old)
    os.close(fd)
    assert stat.S_IMODE((tmp_path / "new").stat().st_mode) == 0o600


def test_existing_file_needs_overwrite_then_is_truncated_and_narrowed(tmp_path: Path) -> None:
    f = tmp_path / "f"
    f.write_bytes(b"data")
    f.chmod(0o644)
    with pytest.raises(UsageError, match=r"exists \(4 bytes\); refusing to overwrite"):
        open_output(str(f), overwrite=False, lock=lock_output)
    assert f.read_bytes() == b"data"
    os.close(open_output(str(f), overwrite=True, lock=lock_output))
    assert f.read_bytes() == b"" and stat.S_IMODE(f.stat().st_mode) == 0o600


def test_symlinks_are_never_followed(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"v")
    for target in (victim, tmp_path / "dangling"):
        link = tmp_path / f"link-{target.name}"
        link.symlink_to(target)
        with pytest.raises(UsageError, match="symbolic link; refusing to follow it"):
            open_output(str(link), overwrite=True, lock=lock_output)
    assert victim.read_bytes() == b"v" and not (tmp_path / "dangling").exists()


def test_protected_files_are_refused_by_identity(tmp_path: Path) -> None:
    img = tmp_path / "disk.img"
    img.write_bytes(b"i" * 4096)
    hard = tmp_path / "hard"
    os.link(img, hard)
    protected = protect_path(str(img), "a served image")
    for name in (img, hard, tmp_path / "." / "disk.img"):
        with pytest.raises(UsageError, match="refusing to write to a served image"):
            open_output(str(name), overwrite=True, lock=lock_output, protected=protected)
    assert img.read_bytes() == b"i" * 4096


def test_fifo_and_character_device_are_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for path in (str(fifo), "/dev/null"):
        with pytest.raises(UsageError, match="not a regular file"):
            open_output(path, overwrite=True, lock=lock_output)


def test_output_mode_follows_the_image(tmp_path: Path) -> None:
    img = tmp_path / "i"
    img.write_bytes(b"")
    for mode, expect in ((0o600, 0o600), (0o644, 0o600), (0o400, 0o600), (0o200, 0o200)):
        img.chmod(mode)
        assert output_mode(str(img)) == expect
    assert output_mode(None) == 0o600


def test_a_live_log_is_locked_against_a_second_writer(tmp_path: Path) -> None:
    log = tmp_path / "live.log"
    with LogWriter.create(log) as w:
        w.write(0, b"x" * 512)
        w.sync()
        with pytest.raises(UsageError, match="in use by a running trace"):
            LogWriter.create(log, overwrite=True)
        with pytest.raises(UsageError, match="in use by a running trace"):
            LogWriter.open(log)
        # another process too (flock is per open file, across processes)
        code = (
            "import sys\n"
            "from blocktrace.logwrites.writer import LogWriter\n"
            "from blocktrace.errors import UsageError\n"
            "try:\n"
            f"    LogWriter.create({str(log)!r}, overwrite=True)\n"
            "except UsageError as e:\n"
            "    print(e); sys.exit(3)\n"
        )
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert r.returncode == 3 and "in use by a running trace" in r.stdout, r
        assert w.durable_entries == 1
    with LogWriter.open(log) as w2:  # closed: free again
        assert w2.nr_entries >= 1


def test_replay_records_creates_its_image_under_the_same_rules(tmp_path: Path) -> None:
    log = tmp_path / "log"
    base = tmp_path / "base.img"
    base.write_bytes(b"\x07" * 65536)
    base.chmod(0o600)
    with LogWriter.create(log) as w:
        w.write(0, b"\x01" * 4096)
    out = tmp_path / "out.img"
    out.write_bytes(b"precious")
    with pytest.raises(UsageError, match="refusing to overwrite"):
        replay_records(log, out, 1, base=base)
    link = tmp_path / "link.img"
    link.symlink_to(out)
    with pytest.raises(UsageError, match="symbolic link"):
        replay_records(log, link, 1, base=base, overwrite=True)
    assert out.read_bytes() == b"precious"
    replay_records(log, out, 1, base=base, overwrite=True)
    assert out.read_bytes() == b"\x01" * 4096 + b"\x07" * (65536 - 4096)
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
