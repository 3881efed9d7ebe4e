"""File systems behind MBR and GPT partition tables: found, followed, events named by
partition."""

from __future__ import annotations

import shutil
import struct
import uuid
from pathlib import Path

import pytest
from ext4_recording import debugfs, diff_records

from blocktrace.block.source import FileSource
from blocktrace.errors import FormatError
from blocktrace.ext4.partitions import discover
from blocktrace.ext4.watcher import Watcher
from stream_helpers import rec as stream_record
from support import require, run

MiB = 1 << 20
PARTS = [(1 * MiB, 12 * MiB), (14 * MiB, 12 * MiB)]  # (offset, length)
DISK = 28 * MiB


def mbr(entries: list[tuple[int, int, int]]) -> bytes:
    sector = bytearray(512)
    for i, (ptype, lba, count) in enumerate(entries):
        struct.pack_into("<B3xB3xII", sector, 446 + 16 * i, 0, ptype, lba, count)
    sector[510:512] = b"\x55\xaa"
    return bytes(sector)


def gpt(parts: list[tuple[int, int]]) -> bytes:
    hdr = bytearray(512)
    struct.pack_into("<8sIII", hdr, 0, b"EFI PART", 0x10000, 92, 0)
    struct.pack_into(
        "<QQQQ16sQII",
        hdr,
        24,
        1,
        DISK // 512 - 1,
        34,
        DISK // 512 - 34,
        uuid.uuid4().bytes,
        2,
        128,
        128,
    )
    table = bytearray(128 * 128)
    linux = uuid.UUID("0fc63daf-8483-4772-8e79-3d69d8477de4").bytes_le
    for i, (off, length) in enumerate(parts):
        struct.pack_into(
            "<16s16sQQ",
            table,
            128 * i,
            linux,
            uuid.uuid4().bytes,
            off // 512,
            (off + length) // 512 - 1,
        )
    return bytes(hdr) + bytes(table)


def build(tmp_path: Path, scheme: str) -> tuple[Path, Path]:
    """A disk with two ext4 partitions; returns (disk, partition 2's image)."""
    require("mkfs.ext4", "debugfs")
    disk = tmp_path / f"{scheme}.img"
    with open(disk, "wb") as f:
        f.truncate(DISK)
        if scheme == "mbr":
            f.write(mbr([(0x83, off // 512, n // 512) for off, n in PARTS]))
        else:
            f.write(mbr([(0xEE, 1, DISK // 512 - 1)]))
            f.write(gpt(PARTS))
    part_images = []
    for i, (off, length) in enumerate(PARTS, start=1):
        img = tmp_path / f"part{i}.img"
        with open(img, "wb") as f:
            f.truncate(length)
        run(["mkfs.ext4", "-q", "-F", "-L", f"part{i}", str(img)], timeout=60)
        with open(img, "rb") as src, open(disk, "r+b") as dst:
            dst.seek(off)
            shutil.copyfileobj(src, dst)
        part_images.append(img)
    return disk, part_images[1]


@pytest.mark.parametrize("scheme", ["mbr", "gpt"])
def test_partitions_found_and_followed(tmp_path: Path, scheme: str) -> None:
    disk, part2 = build(tmp_path, scheme)
    src = FileSource(disk)
    parts = discover(src, DISK)
    assert [(p.name, p.offset, p.length, p.scheme, p.ext4) for p in parts] == [
        ("p1", PARTS[0][0], PARTS[0][1], scheme, True),
        ("p2", PARTS[1][0], PARTS[1][1], scheme, True),
    ]
    changed = tmp_path / "changed.img"
    shutil.copy(part2, changed)
    debugfs(changed, "mkdir /in-p2\n")
    records = [
        stream_record(r.seq, r.kind, r.offset + PARTS[1][0], r.length, r.data)
        for r in diff_records(part2, changed)
    ]
    with Watcher(disk) as w:
        assert [p.name for p, _ in w.engines] == ["p1", "p2"]
        events = list(w.feed(records))
    assert [(e.kind, e.path, e.fs) for e in events] == [("mkdir", "/in-p2", "p2")]


def test_bare_disk_and_garbage(tmp_path: Path) -> None:
    junk = tmp_path / "junk"
    junk.write_bytes(b"\x02" * 4096)
    assert discover(FileSource(junk), 4096) == []
    with pytest.raises(FormatError):
        Watcher(junk)
    bad_gpt = tmp_path / "bad-gpt"
    bad_gpt.write_bytes(mbr([(0xEE, 1, 100)]) + b"NOT A GPT" + bytes(8192))
    with pytest.raises(FormatError):
        Watcher(bad_gpt)
