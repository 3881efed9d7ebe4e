"""Corrupt and hostile file systems never crash the watcher: it reports what it cannot parse
(``error`` events, or a FormatError when nothing on the disk can be followed) and carries on."""

from __future__ import annotations

import os
import random
import shutil
import struct
from pathlib import Path

import pytest
from ext4_recording import debugfs, diff_records

from blocktrace.errors import FormatError
from blocktrace.ext4.engine import Ext4Engine
from blocktrace.ext4.fs import FileSource
from blocktrace.ext4.ownership import OwnerKind
from blocktrace.ext4.watcher import StreamRecord, Watcher
from support import require, run


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A populated base image and a debugfs-changed copy."""
    require("mkfs.ext4", "debugfs")
    work = tmp_path_factory.mktemp("hostile")
    src = work / "src"
    (src / "a/b").mkdir(parents=True)
    for i in range(60):
        (src / "a" / f"f{i}").write_bytes(os.urandom(i * 300))
    (src / "a/b/big").write_bytes(os.urandom(600_000))
    base = work / "base.img"
    with open(base, "wb") as f:
        f.truncate(16 << 20)
    run(["mkfs.ext4", "-q", "-F", "-d", str(src), str(base)], timeout=60)
    new = work / "new.img"
    shutil.copy(base, new)
    debugfs(new, "mkdir /x\nrm /a/f3\nln /a/f4 /a/f4b\nunlink /a/f4\nrmdir /a/b\n")
    return base, new


def metadata_blocks(base: Path) -> list[int]:
    engine = Ext4Engine(FileSource(base))
    return [
        b
        for s, e, o in engine.owners.runs()
        if o.kind is not OwnerKind.DATA
        for b in range(s, min(e, s + 64))
    ]


def survive(base: Path, records: list[StreamRecord]) -> list[str]:
    """Watch; only FormatError is allowed out (nothing followable); returns event kinds."""
    try:
        w = Watcher(base)
    except FormatError:
        return ["unfollowable"]
    with w:
        return [e.kind for e in w.feed(records)]


@pytest.mark.parametrize("seed", range(12))
def test_corrupt_base_image(tmp_path: Path, pair: tuple[Path, Path], seed: int) -> None:
    base, new = pair
    rng = random.Random(seed)
    bad = tmp_path / "bad.img"
    shutil.copy(base, bad)
    blocks = metadata_blocks(base)
    with open(bad, "r+b") as f:
        for b in rng.sample(blocks, 12):
            f.seek(b * 1024 + rng.randrange(0, 1024 - 64))
            f.write(rng.randbytes(rng.choice([4, 16, 64])))
    survive(bad, diff_records(base, new))


@pytest.mark.parametrize("seed", range(6))
def test_hostile_write_stream(pair: tuple[Path, Path], seed: int) -> None:
    base, _ = pair
    rng = random.Random(100 + seed)
    blocks = metadata_blocks(base)
    records = []
    for i in range(200):
        b = rng.choice(blocks)
        data = rng.randbytes(1024) if rng.random() < 0.5 else bytes(1024)
        if rng.random() < 0.2:  # forge JBD2 headers: descriptor/commit/revoke of random seqs
            data = (
                struct.pack(">III", 0xC03B3998, rng.choice([1, 2, 5]), rng.randrange(4)) + data[12:]
            )
        records.append(
            StreamRecord(
                i, "write", b * 1024 + rng.choice([0, 0, 512]), 1024 - 512 * rng.randrange(2), data
            )
        )
        if rng.random() < 0.2:
            records.append(StreamRecord(i, "flush"))
    kinds = survive(base, records)
    assert kinds != ["unfollowable"]


def test_extent_loop_and_directory_cycle(tmp_path: Path, pair: tuple[Path, Path]) -> None:
    base, _ = pair
    engine = Ext4Engine(FileSource(base))
    a = engine.ns.children[2]["a"]
    b = engine.ns.children[a]["b"]
    big = engine.ns.children[b]["big"]
    img = tmp_path / "loop.img"
    shutil.copy(base, img)
    blk, off = engine.fs.inode_location(big)
    with open(img, "r+b") as f:
        # big's root becomes a depth-1 index node pointing at block 900, which points at itself
        node = struct.pack("<HHHHI", 0xF30A, 1, 4, 1, 0) + struct.pack("<IIH2x", 0, 900, 0)
        f.seek(blk * 1024 + off + 0x28)
        f.write(node)
        f.seek(900 * 1024)
        f.write(node + bytes(1024 - len(node)))
    looped = Ext4Engine(FileSource(img))
    errors = looped.take_errors()
    assert any(e.ino == big and "extent" in (e.message or "") for e in errors), errors
    assert looped.path_of(a) == "/a"  # the rest is still followed
    # a directory entry that makes /a/b its own ancestor: paths stay finite
    looped.ns.add(b, "up", a)
    looped.ns.remove(2, "a", a)
    assert "<ino" in looped.path_of(b)


def test_huge_hostile_directory_is_refused(tmp_path: Path, pair: tuple[Path, Path]) -> None:
    """A directory whose extents claim over a million blocks (all the same ones) would make
    the crawl read them all: it is refused with an error event, the rest is followed."""
    base, _ = pair
    engine = Ext4Engine(FileSource(base))
    a = engine.ns.children[2]["a"]
    img = tmp_path / "huge.img"
    shutil.copy(base, img)
    blk, off = engine.fs.inode_location(a)
    per_leaf = (1024 - 12) // 12
    leaf = struct.pack("<HHHHI", 0xF30A, per_leaf, per_leaf, 0, 0) + b"".join(
        struct.pack("<IHHI", i * 16000, 16000, 0, 100) for i in range(per_leaf)
    )
    root = struct.pack("<HHHHI", 0xF30A, 1, 4, 1, 0) + struct.pack("<IIH2x", 0, 900, 0)
    with open(img, "r+b") as f:
        f.seek(blk * 1024 + off + 0x28)
        f.write(root)
        f.seek(900 * 1024)
        f.write(leaf)
    huge = Ext4Engine(FileSource(img))
    errors = huge.take_errors()
    # refused by the first bound it breaks: more blocks than the file system has, or than a
    # directory may have
    assert any(
        e.ino == a
        and (
            "directory of more than" in (e.message or "")
            or "more blocks than the file system" in (e.message or "")
        )
        for e in errors
    )
    assert huge.path_of(a) == "/a"
