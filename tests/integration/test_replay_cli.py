"""``blocktrace replay`` and ``blocktrace log``: errors name entry and offset; --salvage works."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

from blocktrace.block.memory import MemoryDevice
from blocktrace.logwrites.replay import count_records, replay_records, replay_to_device
from blocktrace.logwrites.writer import LogWriter
from support import blocktrace

MiB = 1024 * 1024


def make_log(tmp_path: Path) -> tuple[Path, Path, list[bytes]]:
    """A log of 6 writes (4 KiB each) with a flush and marks; returns snapshots per write."""
    log = tmp_path / "log"
    img = bytearray(MiB)
    snaps = [bytes(img)]
    with LogWriter.create(log) as w:
        w.mark("begin")
        for i in range(6):
            data = bytes([i + 1]) * 4096
            w.write(i * 8192, data)
            img[i * 8192 : i * 8192 + 4096] = data
            snaps.append(bytes(img))
            if i == 2:
                w.flush()
                w.mark("half")
    empty = tmp_path / "empty.img"
    empty.write_bytes(bytes(MiB))
    return log, empty, snaps


def entry_offset(index_of_write: int) -> int:
    """Byte offset of the header of the write entry ``index_of_write`` (0-based) in make_log."""
    off = 512 + 512  # super, mark "begin"
    for i in range(index_of_write):
        off += 512 + 4096
        if i == 2:
            off += 512 + 512  # flush, mark
    return off


def test_replay_end_mark_and_summary(tmp_path: Path) -> None:
    log, empty, snaps = make_log(tmp_path)
    out = tmp_path / "out.img"
    shutil.copyfile(empty, out)
    res = blocktrace("replay", "--end-mark", "half", log, out)
    assert out.read_bytes() == snaps[3]
    assert "stopped after entry 5 (mark)" in res.stderr
    shutil.copyfile(empty, out)
    blocktrace("replay", "--start-mark", "half", log, out)
    expect = bytearray(MiB)
    for i in range(3, 6):
        expect[i * 8192 : i * 8192 + 4096] = bytes([i + 1]) * 4096
    assert out.read_bytes() == bytes(expect)
    assert blocktrace("replay", "--find", "--end-mark", "half", log).stdout.strip() == "5@31"


def test_corrupt_log_fails_naming_entry_and_offset_then_salvage(tmp_path: Path) -> None:
    log, empty, snaps = make_log(tmp_path)
    bad = entry_offset(4)
    with open(log, "r+b") as f:
        f.seek(bad + 512 + 100)
        f.write(b"\x00\xff")
    out = tmp_path / "out.img"
    shutil.copyfile(empty, out)
    res = blocktrace("replay", log, out, check=False)
    assert res.returncode == 1
    assert res.stderr.count("\n") == 1 and "Traceback" not in res.stderr
    assert f"entry 7 at byte {bad}: checksum mismatch" in res.stderr
    info = blocktrace("log", "info", log, check=False)
    assert info.returncode == 1 and f"entry 7 at byte {bad}" in info.stderr
    res = blocktrace("replay", "--salvage", log, out)
    assert out.read_bytes() == snaps[4]  # the 4 writes before the bad entry
    assert "warning" in res.stderr and "entry 7" in res.stderr
    listed = blocktrace("log", "list", "--salvage", log)
    assert len(listed.stdout.splitlines()) == 7


def test_truncated_log(tmp_path: Path) -> None:
    log, empty, snaps = make_log(tmp_path)
    cut = entry_offset(5) + 512 + 1000
    with open(log, "r+b") as f:
        f.truncate(cut)
    out = tmp_path / "out.img"
    shutil.copyfile(empty, out)
    res = blocktrace("replay", log, out, check=False)
    assert res.returncode == 1
    assert f"entry 8 at byte {entry_offset(5)}: log ends at byte {cut}" in res.stderr
    blocktrace("replay", "--salvage", log, out)
    assert out.read_bytes() == snaps[5]


def test_operator_errors_are_one_line(tmp_path: Path) -> None:
    log, empty, _ = make_log(tmp_path)
    for args in (
        ["replay", tmp_path / "missing", empty],
        ["replay", empty, empty],
        ["replay", log, tmp_path / "missing.img"],
        ["replay", "--start-entry", "99", log, empty],
        ["replay", "--start-mark", "nope", log, empty],
        ["replay", log],
        ["log", "find", "--end-mark", "nope", log],
        ["log", "info", empty],
    ):
        res = blocktrace(*args, check=False)
        assert res.returncode != 0, args
        assert len(res.stderr.strip().splitlines()) == 1, (args, res.stderr)
        assert res.stderr.startswith("blocktrace: "), (args, res.stderr)


def test_log_info_and_list(tmp_path: Path) -> None:
    log, _, _ = make_log(tmp_path)
    info = blocktrace("log", "info", log).stdout
    assert "entries: 9" in info and "writes: 6" in info and "marks: begin, half" in info
    assert "checksums: 9 of 9 entries verified" in info and "tail: clean" in info
    lines = blocktrace("log", "list", log).stdout.splitlines()
    assert lines[0] == "entry 0@2: sector 0, size 0, flags 0x8(MARK) mark begin"
    assert lines[1] == "entry 1@3: sector 0, size 4096, flags 0x0(NONE)"


def test_python_api_record_prefixes_and_device(tmp_path: Path) -> None:
    log = tmp_path / "log"
    base = tmp_path / "base.img"
    base.write_bytes(b"\x07" * MiB)
    img = bytearray(base.read_bytes())
    snaps = [bytes(img)]
    with LogWriter.create(log) as w:
        w.write(0, b"\x01" * 8192)
        img[0:8192] = b"\x01" * 8192
        snaps.append(bytes(img))
        w.flush()
        w.mark("m")
        w.write_zeroes(4096, 512 * 1024)
        img[4096 : 4096 + 512 * 1024] = bytes(512 * 1024)
        snaps.append(bytes(img))
        w.discard(65536, 4096)
        img[65536:69632] = bytes(4096)
        snaps.append(bytes(img))
    assert count_records(log) == 3
    for n_rec, snap in enumerate(snaps):
        out = tmp_path / f"out{n_rec}.img"
        replay_records(log, out, n_rec, base=base)
        assert out.read_bytes()[:MiB] == snap, n_rec
    dev = MemoryDevice(2 * MiB)
    asyncio.run(replay_to_device(log, dev))
    got = asyncio.run(dev.read(0, MiB))
    expect = bytearray(snaps[-1])
    expect[8192:] = bytes(MiB - 8192)  # the device started empty, not from base
    expect[4096:8192] = bytes(4096)
    assert bytes(got) == bytes(expect)
