"""Bounded-time byte-flip fuzzing of the ext4 model (issue #10: a fuzz test per parser).

Each input is a small real file system (mkfs.ext4 + debugfs) with a few bytes flipped in one
structure: the superblock, the group descriptors, an inode, an extent tree node, a directory
block, or a JBD2 descriptor/commit/revoke block, both in the base image and in the write
stream.  A fixed number of inputs from fixed seeds (reproducible: the failing seed is in the
message).  Per input, only the documented errors may come out (``FormatError`` from opening a
disk that cannot be followed; everything later becomes ``error`` events), the memory traced
stays under a bound, and an interval timer turns a hang into a failure naming the seed.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import struct
import tracemalloc
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType

import pytest
from ext4_recording import debugfs, diff_records

from blocktrace.errors import FormatError
from blocktrace.ext4.engine import Ext4Engine
from blocktrace.ext4.fs import FileSource
from blocktrace.ext4.journal import Journal, recover
from blocktrace.ext4.ownership import OwnerKind
from blocktrace.ext4.watcher import StreamRecord, Watcher
from support import require, run

INPUTS = 40  #: inputs per structure kind (x 6 kinds, base and stream)
PER_INPUT_S = 20  #: far above what one input takes (~50 ms): only a hang reaches it
PER_INPUT_BYTES = 64 << 20
BS = 1024


class Hang(Exception):
    pass


@contextmanager
def bounded(what: str) -> Iterator[None]:
    """Fail (not hang) if the body runs past PER_INPUT_S; check the memory it traced."""

    def expire(signum: int, frame: FrameType | None) -> None:
        raise Hang(f"{what}: still running after {PER_INPUT_S} s")

    old = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, PER_INPUT_S)
    tracemalloc.reset_peak()
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    peak = tracemalloc.get_traced_memory()[1]
    assert peak < PER_INPUT_BYTES, f"{what}: {peak} bytes traced"


@pytest.fixture(scope="module")
def fs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[str, list[int]]]:
    """A base image, a debugfs-changed copy, and the blocks of each structure kind."""
    require("mkfs.ext4", "debugfs")
    work = tmp_path_factory.mktemp("fuzz")
    src = work / "src"
    (src / "d/e").mkdir(parents=True)
    for i in range(40):
        (src / "d" / f"f{i}").write_bytes(os.urandom(i * 97))
    (src / "big").write_bytes(os.urandom(300_000))
    with open(src / "sparse", "wb") as f:  # 64 extents: an extent tree with a leaf block
        for i in range(64):
            f.seek(i * 8192)
            f.write(os.urandom(1024))
    os.symlink("x" * 100, src / "sl")
    base = work / "base.img"
    with open(base, "wb") as f:
        f.truncate(8 << 20)
    run(["mkfs.ext4", "-q", "-F", "-b", "1024", "-d", str(src), str(base)], timeout=60)
    new = work / "new.img"
    shutil.copy(base, new)
    # a journal with transactions in it: debugfs's journal writer (jo/jw/jc), then changes
    debugfs(new, "jo -c\njw -b 300,301 /dev/zero\njc\nmkdir /x\nrm /d/f3\nln /d/f4 /d/f4b\n")
    engine = Ext4Engine(FileSource(base))
    kinds: dict[str, list[int]] = {"superblock": [1], "group_desc": [2]}
    for s, e, o in engine.owners.runs():
        if o.kind is OwnerKind.INODE_TABLE:
            kinds.setdefault("inode", []).extend(range(s, min(e, s + 8)))
        elif o.kind is OwnerKind.EXTENT:
            kinds.setdefault("extent", []).extend(range(s, e))
        elif o.kind is OwnerKind.DIR:
            kinds.setdefault("dir", []).extend(range(s, e))
        elif o.kind is OwnerKind.JOURNAL:
            kinds.setdefault("journal", []).extend(range(s, min(e, s + 16)))
    assert all(kinds.get(k) for k in ("inode", "extent", "dir", "journal")), kinds.keys()
    return base, new, kinds


def flip(rng: random.Random, block: bytes) -> bytes:
    b = bytearray(block)
    for _ in range(rng.choice([1, 2, 4, 8])):
        pos = rng.randrange(len(b))
        b[pos] = rng.choice([b[pos] ^ (1 << rng.randrange(8)), 0, 0xFF, rng.randrange(256)])
    return bytes(b)


KINDS = ["superblock", "group_desc", "inode", "extent", "dir", "journal"]


@pytest.fixture(autouse=True, scope="module")
def traced() -> Iterator[None]:
    tracemalloc.start()
    yield
    tracemalloc.stop()


@pytest.mark.parametrize("kind", KINDS)
def test_fuzz_base_image(
    tmp_path: Path, fs: tuple[Path, Path, dict[str, list[int]]], kind: str
) -> None:
    base, new, kinds = fs
    records = diff_records(base, new)
    img = tmp_path / "fuzzed.img"
    for seed in range(INPUTS):
        rng = random.Random(f"{kind}-{seed}")
        shutil.copy(base, img)
        with open(img, "r+b") as f:
            blk = rng.choice(kinds[kind])
            f.seek(blk * BS)
            block = f.read(BS)
            f.seek(blk * BS)
            f.write(flip(rng, block))
        with bounded(f"base {kind} seed {seed}"):
            try:
                w = Watcher(img)
            except FormatError:
                continue  # documented: nothing on the disk can be followed
            with w:
                for _ in w.feed(records):
                    pass


@pytest.mark.parametrize("kind", KINDS)
def test_fuzz_write_stream(fs: tuple[Path, Path, dict[str, list[int]]], kind: str) -> None:
    """The changes (journal blocks and home locations) arrive with bytes flipped."""
    base, new, kinds = fs
    records = diff_records(base, new)
    for seed in range(INPUTS):
        rng = random.Random(f"stream-{kind}-{seed}")
        fuzzed: list[StreamRecord] = []
        for rec in records:
            if rec.data is not None and rng.random() < 0.3:
                rec = StreamRecord(rec.index, rec.kind, rec.offset, rec.length, flip(rng, rec.data))
            fuzzed.append(rec)
        blk = rng.choice(kinds[kind])  # plus one flipped copy of a block of this kind
        with open(base, "rb") as f:
            f.seek(blk * BS)
            block = flip(rng, f.read(BS))
        fuzzed.insert(rng.randrange(len(fuzzed)), StreamRecord(-1, "write", blk * BS, BS, block))
        with bounded(f"stream {kind} seed {seed}"), Watcher(base) as w:
            for _ in w.feed(fuzzed):
                pass


def test_fuzz_jbd2_blocks(fs: tuple[Path, Path, dict[str, list[int]]]) -> None:
    """JBD2 descriptor, commit and revoke blocks with flipped bytes, fed to the live parser
    and to recovery: only Ext4FormatError-free results (bad blocks are counted, not raised)."""
    _, new, _ = fs
    engine = Ext4Engine(FileSource(new))
    assert engine.journal is not None
    jblocks = {j: engine.read_block(p) for j, p in engine._journal_blocks.items()}
    magic = struct.pack(">I", 0xC03B3998)
    headers = [j for j, b in jblocks.items() if j and b[:4] == magic]
    assert headers, "the journal holds no descriptor/commit/revoke block"
    for seed in range(INPUTS * 3):
        rng = random.Random(f"jbd2-{seed}")
        blocks = dict(jblocks)
        for j in rng.sample(headers, min(len(headers), rng.randint(1, 3))):
            blocks[j] = magic + flip(rng, blocks[j])[4:]

        def read(j: int, blocks: dict[int, bytes] = blocks) -> bytes:
            return blocks.get(j, bytes(BS))

        with bounded(f"jbd2 seed {seed}"):
            journal = Journal(blocks[0], len(blocks), read)
            for j in sorted(headers) + headers:
                journal.block_written(j, blocks[j])
            recover(journal.jsb, read, [])
