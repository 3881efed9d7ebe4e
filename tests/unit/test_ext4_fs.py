"""The ext4 model against independent oracles: the source tree given to ``mke2fs -d``, and
``debugfs icheck`` for which inode owns every block."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from blocktrace.block.source import FileSource
from blocktrace.ext4.engine import Ext4Engine
from blocktrace.ext4.fs import Ext4FS
from blocktrace.ext4.ownership import OwnerKind
from support import require, run

STATIC = {
    OwnerKind.SUPERBLOCK,
    OwnerKind.GROUP_DESC,
    OwnerKind.BLOCK_BITMAP,
    OwnerKind.INODE_BITMAP,
    OwnerKind.INODE_TABLE,
}


def populate(root: Path) -> set[str]:
    """A tree with every shape the model must handle; returns its paths."""
    (root / "a/b/c").mkdir(parents=True)
    (root / "empty").write_bytes(b"")
    (root / "one").write_bytes(b"1")
    (root / "a/medium").write_bytes(os.urandom(100_000))
    (root / "a/b/big").write_bytes(os.urandom(3 << 20))
    (root / "many").mkdir()
    for i in range(300):  # more than one directory block
        (root / "many" / f"file-with-a-longish-name-{i:04d}").write_bytes(b"x" * (i % 3))
    os.symlink("one", root / "fast-link")
    os.symlink("t" * 200, root / "slow-link")
    paths = set()
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            paths.add("/" + os.path.relpath(os.path.join(dirpath, n), root))
    return paths


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, set[str]]:
    root = tmp_path_factory.mktemp("tree")
    return root, populate(root)


VARIANTS = {
    "ext4-4k": ["-t", "ext4", "-b", "4096"],
    "ext4-1k-64bit": ["-t", "ext4", "-b", "1024", "-O", "64bit"],
    "ext3-blockmap": ["-t", "ext3", "-b", "1024"],
    "ext4-nojournal-nocsum": ["-t", "ext4", "-O", "^has_journal,^metadata_csum"],
}


def make(tmp_path: Path, tree: Path, opts: list[str]) -> Path:
    require("mkfs.ext4", "debugfs")
    img = tmp_path / "img"
    with open(img, "wb") as f:
        f.truncate(16 << 20)
    run(["mke2fs", "-q", "-F", *opts, "-d", str(tree), str(img)], timeout=60)
    return img


def all_paths(engine: Ext4Engine) -> set[str]:
    out = set()
    for _ino, links in engine.ns.parents.items():
        for parent, name in links:
            out.add(engine.ns.join(parent, name))
    return out


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_crawl_finds_every_path(tmp_path: Path, tree: tuple[Path, set[str]], variant: str) -> None:
    img = make(tmp_path, tree[0], VARIANTS[variant])
    engine = Ext4Engine(FileSource(img))
    assert engine.take_errors() == []
    assert all_paths(engine) == tree[1] | {"/lost+found"}
    link = next(ino for ino, ls in engine.ns.parents.items() if ls[0][1] == "slow-link")
    assert engine.fs.symlink_target(engine.istate[link].inode) == "t" * 200


@pytest.mark.parametrize("variant", ["ext4-1k-64bit", "ext3-blockmap"])
def test_ownership_matches_debugfs_icheck(
    tmp_path: Path, tree: tuple[Path, set[str]], variant: str
) -> None:
    img = make(tmp_path, tree[0], VARIANTS[variant])
    engine = Ext4Engine(FileSource(img))
    nblocks = engine.fs.blocks_count
    out = run(
        ["debugfs", "-R", "icheck " + " ".join(map(str, range(nblocks))), str(img)], timeout=60
    ).stdout
    icheck: dict[int, int | None] = {}
    for line in out.splitlines()[1:]:
        m = re.match(r"(\d+)\s+(\d+|<block not found>)", line)
        if m:
            icheck[int(m[1])] = None if m[2].startswith("<") else int(m[2])
    assert len(icheck) == nblocks
    owned_by_inode = 0
    for b, ino in icheck.items():
        owner = engine.owner_of(b)
        if ino is None:
            assert owner is None or owner.kind in STATIC, (b, owner)
        elif ino == 7:  # the resize inode holds the reserved GDT blocks
            assert owner is None or owner.kind is OwnerKind.GROUP_DESC, (b, owner)
        else:
            assert owner is not None and owner.ino == ino, (b, ino, owner)
            owned_by_inode += 1
    assert owned_by_inode > (3 << 20) // engine.block_size  # the big file at least
    kinds = {o.kind for _, _, o in engine.owners.runs()}
    assert {OwnerKind.DIR, OwnerKind.DATA, OwnerKind.JOURNAL, OwnerKind.SYMLINK} <= kinds
    if variant == "ext3-blockmap":
        assert OwnerKind.INDIRECT in kinds


def test_fs_layout_matches_dumpe2fs(tmp_path: Path, tree: tuple[Path, set[str]]) -> None:
    img = make(tmp_path, tree[0], VARIANTS["ext4-1k-64bit"])
    fs = Ext4FS.open(FileSource(img))
    out = run(["dumpe2fs", str(img)], timeout=30).stdout
    tables = [int(m) for m in re.findall(r"Inode table at (\d+)-", out)]
    bitmaps = [int(m) for m in re.findall(r"Block bitmap at (\d+)", out)]
    assert tables == [g.inode_table for g in fs.groups]
    assert bitmaps == [g.block_bitmap for g in fs.groups]
    assert fs.desc_size == 64 and fs.block_size == 1024
