"""Guest-controlled ext4 metadata is bounded by the file system's geometry (issue #10 item 3).

Each image is made by mkfs.ext4 and then made hostile by patching bytes at the offsets of the
project's own layouts (``structs.py``): the watcher must refuse the impossible early with a
clear error (an ``error`` event, or Ext4FormatError when nothing can be followed), never with
another exception, and never spend memory or CPU in proportion to what the hostile structure
claims rather than to the file system's size.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import tracemalloc
from pathlib import Path

import pytest
from ext4_recording import diff_records

from blocktrace.ext4.engine import Ext4Engine
from blocktrace.ext4.fs import FileSource
from blocktrace.ext4.structs import EXTENT_HEADER, INODE, SUPERBLOCK, Ext4FormatError
from blocktrace.ext4.watcher import Watcher
from support import ServerProcess, require, run

SB = 1024  #: the superblock's byte offset
FIELD = {name: (off, code) for off, code, name in SUPERBLOCK.fields}
I_FLAGS = next(off for off, _, name in INODE.fields if name == "i_flags")
I_BLOCK = next(off for off, _, name in INODE.fields if name == "i_block")
EXTENTS_FL = 0x80000
EXT_MAGIC = 0xF30A
MiB = 1 << 20


def make_fs(path: Path, *options: str) -> Path:
    """A 16 MiB ext4 (1 KiB blocks, a 1 MiB journal) holding a file and a slow symlink."""
    require("mkfs.ext4")
    src = path.parent / f"{path.stem}-src"
    src.mkdir()
    (src / "f").write_bytes(os.urandom(5000))
    os.symlink("t" * 200, src / "sl")  # longer than 60 bytes: its target is in a block
    with open(path, "wb") as f:
        f.truncate(16 * MiB)
    run(["mkfs.ext4", "-q", "-F", *options, "-d", str(src), str(path)], timeout=60)
    return path


def patch_sb(img: Path, **fields: int) -> None:
    with open(img, "r+b") as f:
        for name, value in fields.items():
            off, code = FIELD[name]
            f.seek(SB + off)
            f.write(struct.pack("<" + code, value))


def free_blocks(engine: Ext4Engine, n: int) -> list[int]:
    """``n`` blocks nothing owns, from the end of the file system."""
    out = []
    for b in range(engine.fs.blocks_count - 1, 0, -1):
        if engine.owner_of(b) is None:
            out.append(b)
            if len(out) == n:
                return out
    raise AssertionError("no free blocks")


def hostile_tree(img: Path, engine: Ext4Engine, ino: int, pblk: int, length: int) -> int:
    """Give inode ``ino`` a depth-1 extent tree: 4 leaves (in free blocks) full of extents at
    distinct logical blocks that all map ``length`` blocks at ``pblk``.  Returns the blocks
    the tree claims to map."""
    bs = engine.block_size
    per_leaf = (bs - EXTENT_HEADER.size) // 12
    leaves = free_blocks(engine, 4)
    leaf = struct.pack("<HHHHI", EXT_MAGIC, per_leaf, per_leaf, 0, 0) + b"".join(
        struct.pack("<IHHI", i * 32768, length, 0, pblk) for i in range(per_leaf)
    )
    root = struct.pack("<HHHHI", EXT_MAGIC, 4, 4, 1, 0) + b"".join(
        struct.pack("<IIH2x", i * per_leaf * 32768, leaf_blk, 0)
        for i, leaf_blk in enumerate(leaves)
    )
    blk, off = engine.fs.inode_location(ino)
    with open(img, "r+b") as f:
        for leaf_blk in leaves:
            f.seek(leaf_blk * bs)
            f.write(leaf)
        f.seek(blk * bs + off + I_FLAGS)
        (flags,) = struct.unpack("<I", f.read(4))
        f.seek(blk * bs + off + I_FLAGS)
        f.write(struct.pack("<I", flags | EXTENTS_FL))
        f.seek(blk * bs + off + I_BLOCK)
        f.write(root.ljust(60, b"\0"))
    return 4 * per_leaf * length


def test_journal_tree_mapping_the_same_blocks_many_times(tmp_path: Path) -> None:
    """The journal inode's tree maps its own blocks ~2.7 M times over (on main: one journal
    map entry each, ~300 MB here, 1 GB with longer extents): refused, the rest followed."""
    img = make_fs(tmp_path / "j.img")
    engine = Ext4Engine(FileSource(img))
    j0 = engine._journal_blocks[0]
    length = min(8000, engine.fs.blocks_count - j0)
    claimed = hostile_tree(img, engine, 8, j0, length)
    assert claimed > 100 * engine.fs.blocks_count
    tracemalloc.start()
    try:
        hostile = Ext4Engine(FileSource(img))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    errors = [e.message or "" for e in hostile.take_errors()]
    assert any("journal not followed" in m for m in errors), errors
    assert len(hostile._journal_blocks) <= hostile.fs.blocks_count
    assert peak < 32 * MiB, peak
    assert hostile.path_of(hostile.ns.children[2]["f"]) == "/f"  # the rest is followed


def test_symlink_with_an_extent_tree_maps_one_block(tmp_path: Path) -> None:
    """A symlink given an extent tree claiming millions of blocks (on main: every one adopted
    as symlink metadata in the settle, 52 s with a deeper tree): a target is one block."""
    base = make_fs(tmp_path / "s.img")
    engine = Ext4Engine(FileSource(base))
    sl = engine.ns.children[2]["sl"]
    target = engine.istate[sl].map.extents[0].pblk
    new = tmp_path / "new.img"
    shutil.copy(base, new)
    hostile_tree(new, engine, sl, target, 8000)
    with Watcher(base) as w:
        events = list(w.feed(diff_records(base, new)))
        eng = w.engines[0][1]
        mapped = sum(e.length for e in eng.istate[sl].map.extents)
        assert mapped == 1, mapped
        assert eng.owner_of(target) is not None
    assert all(e.kind != "error" for e in events), events


def test_inflated_inodes_count_is_refused(tmp_path: Path) -> None:
    """``s_inodes_count`` beyond the groups' inodes, and a directory entry naming such an
    inode: on main an IndexError out of the crawl."""
    img = make_fs(tmp_path / "i.img")
    engine = Ext4Engine(FileSource(img))
    root_dir = engine.istate[2].map.extents[0].pblk
    bs = engine.block_size
    with open(img, "r+b") as f:  # "f"'s entry now names inode 0x00FFFFF0
        f.seek(root_dir * bs)
        block = bytearray(f.read(bs))
        pos = 0
        while block[pos + 6 : pos + 9] != b"\x01\x01f":  # name_len 1, regular file, "f"
            pos += struct.unpack_from("<H", block, pos + 4)[0]
        struct.pack_into("<I", block, pos, 0x00FFFFF0)
        f.seek(root_dir * bs)
        f.write(block)
    patch_sb(img, s_inodes_count=0xFFFFFFF0)
    with pytest.raises(Ext4FormatError, match="s_inodes_count"):
        Watcher(img)


def test_desc_size_0xffff_is_refused(tmp_path: Path) -> None:
    """A 64bit file system with ``s_desc_size`` 0xFFFF: no descriptor fits in a block (on
    main: no group read, then an IndexError)."""
    img = make_fs(tmp_path / "d.img", "-O", "64bit")
    patch_sb(img, s_desc_size=0xFFFF)
    with pytest.raises(Ext4FormatError, match="s_desc_size"):
        Watcher(img)


def test_millions_of_groups_are_refused_before_reading(tmp_path: Path) -> None:
    """16.7 M block groups claimed by a 16 MiB image (on main: 31 s and 1.2 GB reading their
    descriptors before giving up): the block count exceeds the device, refused at once."""
    img = make_fs(tmp_path / "g.img")
    patch_sb(img, s_blocks_count_lo=0xFFFFFFFF, s_blocks_per_group=256)
    tracemalloc.start()
    try:
        with pytest.raises(Ext4FormatError, match="exceeds the size of the device"):
            Watcher(img)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 * MiB, peak


def test_work_budget_per_record(tmp_path: Path) -> None:
    """The per-record work budget: a budget too small for one directory block makes the
    crawl report it (the error names the budget) instead of going on; the default does not."""
    img = make_fs(tmp_path / "w.img")
    assert not Ext4Engine(FileSource(img)).take_errors()
    starved = Ext4Engine(FileSource(img), work_budget=2)
    assert any("work budget" in (e.message or "") for e in starved.take_errors())


def test_live_server_with_a_hostile_journal_tree(tmp_path: Path) -> None:
    """The journal case served live with an ``introspect`` target (on main: the crawl on the
    event loop grew the server to GBs while NBD requests waited): the server stays small,
    answers, and the events file says why the journal is not followed."""
    nbd = pytest.importorskip("nbd", reason="machine lacks python3-libnbd")
    img = make_fs(tmp_path / "disk.img")
    engine = Ext4Engine(FileSource(img))
    j0 = engine._journal_blocks[0]
    hostile_tree(img, engine, 8, j0, min(8000, engine.fs.blocks_count - j0))
    events = tmp_path / "events.jsonl"
    with ServerProcess(tmp_path, [img], ["--trace", f"introspect:{events}"]) as srv:
        h = nbd.NBD()
        h.connect_uri(srv.uri("disk"))
        assert len(h.pread(4096, 0)) == 4096
        h.flush()  # waits for the target: the crawl is done
        h.shutdown()
        assert srv.proc is not None
        status = Path(f"/proc/{srv.proc.pid}/status").read_text()
        peak_kb = int(next(x for x in status.splitlines() if x.startswith("VmHWM")).split()[1])
    assert peak_kb < 150 << 10, peak_kb
    messages = [json.loads(line).get("message", "") for line in events.read_text().splitlines()]
    assert any("journal not followed" in m for m in messages), messages
