"""JBD2 checksums are verified: journals written by e2fsprogs' debugfs (``jo -c``: csum v3, the
kernel's format; ``-v 2``: csum v2), whole and deliberately corrupted.

A corrupt or torn transaction must not become events (live: reported as an ``error`` event, the
changes arrive later with the checkpoint's home writes) and must not be replayed into the base
at start (as ``jbd2_journal_recover``: a bad commit/descriptor/revoke ends the scan, a bad
logged block is skipped).  Every corrupted case fails if verification is skipped.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from ext4_recording import debugfs, diff_records, mkfs

from blocktrace.block.source import FileSource
from blocktrace.ext4.engine import Ext4Engine
from blocktrace.ext4.ownership import OwnerKind
from blocktrace.ext4.watcher import Watcher
from blocktrace.stream.records import Record, RecordKind
from stream_helpers import rec as stream_record
from support import require

BS = 4096


def _flip(image: Path, offset: int) -> None:
    with open(image, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))


def _journal_image(tmp_path: Path, version: int) -> tuple[Path, bytes, dict[int, int]]:
    """An image whose journal holds two committed transactions, not yet recovered: T1 logs
    blocks 300 and 301, T2 revokes 301.  Returns (image, T1's payload, jblk -> pblk)."""
    require("mkfs.ext4", "debugfs")
    img = mkfs(tmp_path / "j.img", 32, options=("-b", str(BS)))
    payload = os.urandom(2 * BS)
    (tmp_path / "payload").write_bytes(payload)
    out = debugfs(
        img,
        f"jo -c -v {version}\njw -b 300,301 {tmp_path / 'payload'}\njw -r 301\njc\n",
    )
    assert f"csum v{version}" in out, out
    engine = Ext4Engine(FileSource(tmp_path / "j.img"))
    return img, payload, dict(engine._journal_blocks)


@pytest.mark.parametrize("version", [2, 3])
def test_recovery_verifies_debugfs_journal(tmp_path: Path, version: int) -> None:
    img, payload, _ = _journal_image(tmp_path, version)
    engine = Ext4Engine(FileSource(img))
    assert engine.stats.recovered_transactions == 2
    assert engine.journal is not None and engine.journal.stats.checksum_errors == 0
    assert engine.take_errors() == []
    assert engine.read_block(300) == payload[:BS]  # replayed
    assert engine.read_block(301) != payload[BS:]  # revoked by T2


# journal blocks: 1 descriptor of T1, 2-3 its logged copies, 4 its commit, 5 T2's revoke block
@pytest.mark.parametrize(
    ("jblk", "replayed_300", "replayed_301", "found"),
    [
        (2, False, False, 2),  # a logged copy: that block alone is skipped
        (1, False, False, 0),  # T1's descriptor: the scan ends before T1
        (4, False, False, 0),  # T1's commit block: T1 is torn, nothing replayed
        (5, True, True, 1),  # T2's revoke block: T2 is not replayed, so 301 is not revoked
    ],
)
def test_recovery_rejects_corrupt_journal_blocks(
    tmp_path: Path, jblk: int, replayed_300: bool, replayed_301: bool, found: int
) -> None:
    img, payload, jblocks = _journal_image(tmp_path, 3)
    _flip(img, jblocks[jblk] * BS + 100)
    engine = Ext4Engine(FileSource(img))
    assert engine.stats.recovered_transactions == found
    errors = engine.take_errors()
    assert errors and all("checksum mismatch" in (e.message or "") for e in errors)
    assert engine.journal is not None and engine.journal.stats.checksum_errors == len(errors)
    assert (engine.read_block(300) == payload[:BS]) is replayed_300
    assert (engine.read_block(301) == payload[BS:]) is replayed_301


def _live_stream(tmp_path: Path) -> tuple[Path, list[Record], int, int]:
    """debugfs's changes as ext4 writes them, with a real csum v3 transaction: file data home,
    the journal blocks debugfs wrote for the metadata (superblock, descriptor, logged copies,
    commit), flush, then the checkpoint.  Returns (base, stream, index of the first logged
    copy's record, index of the first checkpoint record)."""
    require("mkfs.ext4", "debugfs")
    src = tmp_path / "src"
    src.mkdir()
    (src / "old").write_bytes(b"o" * 3000)
    base = mkfs(tmp_path / "base.img", 32, content=src, options=("-b", str(BS)))
    new = tmp_path / "new.img"
    shutil.copy(base, new)
    (tmp_path / "p").write_bytes(os.urandom(3 * BS + 10))
    debugfs(new, f"mkdir /sub\nwrite {tmp_path / 'p'} /sub/p\nrm /old\n")
    after = Ext4Engine(FileSource(new))
    changes = diff_records(base, new, chunk=BS)[:-1]
    data = [
        r
        for r in changes
        if (o := after.owner_of(r.offset // BS)) is not None and o.kind is OwnerKind.DATA
    ]
    meta = [r for r in changes if r not in data]
    homes = [r.offset // BS for r in meta]
    (tmp_path / "meta").write_bytes(b"".join(bytes(r.data) for r in meta))
    journaled = tmp_path / "journaled.img"
    shutil.copy(base, journaled)
    debugfs(journaled, f"jo -c\njw -b {','.join(map(str, homes))} {tmp_path / 'meta'}\njc\n")
    jwrites = diff_records(base, journaled, chunk=BS)[:-1]  # journal order = file order
    stream: list[Record] = []

    def add(kind: str, offset: int = 0, payload: bytes | None = None) -> None:
        stream.append(stream_record(len(stream), kind, offset, len(payload or b""), payload))

    for r in data:
        add("write", r.offset, bytes(r.data))
    first_logged = -1
    jstart = Ext4Engine(FileSource(base))._journal_blocks[1] * BS
    for r in jwrites:
        if r.offset == jstart + BS and first_logged < 0:
            first_logged = len(stream)
        add("write", r.offset, bytes(r.data))
    add("flush")
    checkpoint = len(stream)
    for r in meta:
        add("write", r.offset, bytes(r.data))
    add("flush")
    assert first_logged > 0
    return base, stream, first_logged, checkpoint


EXPECTED = {("mkdir", "/sub"), ("create", "/sub/p"), ("write", "/sub/p"), ("delete", "/old")}


@pytest.mark.parametrize("corrupt", [False, True])
def test_live_torn_transaction_is_reported_not_applied(tmp_path: Path, corrupt: bool) -> None:
    base, stream, first_logged, checkpoint = _live_stream(tmp_path)
    if corrupt:  # a logged copy that did not reach the disk as the commit says
        rec = stream[first_logged]
        assert rec.data is not None
        torn = bytearray(rec.data)
        torn[2000] ^= 0xFF
        stream[first_logged] = stream_record(rec.seq, rec.kind, rec.offset, rec.length, torn)
    before: list[tuple[str, str]] = []
    later: list[tuple[str, str]] = []
    with Watcher(base) as w:
        engine = w.engines[0][1]
        for rec in stream:
            got = [(e.kind, e.path) for e in w.process(rec) if e.kind != "error"]
            (later if rec.seq >= checkpoint else before).extend(got)
            if rec.seq < checkpoint and corrupt:
                assert got == [], "a torn transaction must not become events"
        later += [(e.kind, e.path) for e in w.finish()]
        assert engine.journal is not None
        stats = engine.journal.stats
        assert stats.commits == 1
    if corrupt:
        assert engine.stats.bad_transactions == 1 and stats.checksum_errors == 1
        assert engine.stats.errors == 1
        assert set(later) == EXPECTED  # carried on: the checkpoint's home writes reveal them
    else:
        assert engine.stats.bad_transactions == 0 and stats.checksum_errors == 0
        assert set(before) == EXPECTED and later == []


@pytest.mark.parametrize(
    ("mkfs_opts", "mount_opts", "kind"),
    [
        ((), "", "v3"),  # metadata_csum: the kernel's default csum v3
        (("-O", "^metadata_csum"), "journal_checksum", "v1"),
        (("-O", "^metadata_csum"), "journal_async_commit,data=writeback", "v1"),
    ],
)
@pytest.mark.parametrize("corrupt", [False, True])
def test_kernel_journals_verified(
    tmp_path: Path, mkfs_opts: tuple[str, ...], mount_opts: str, kind: str, corrupt: bool
) -> None:
    """The real ext4 driver's journals (csum v3; v1, with async commit too) verify clean, and
    a logged block corrupted in the recorded stream makes its transaction an error, not events;
    the same changes still arrive from the checkpoint at unmount."""
    from ext4_recording import kernel_mount

    from blocktrace.logwrites.records import log_records
    from support import require_fuse_and_loop

    require_fuse_and_loop()
    img = mkfs(tmp_path / "disk.img", 64, options=("-b", str(BS), *mkfs_opts))
    base = tmp_path / "base.img"
    shutil.copy(img, base)
    log = tmp_path / "disk.log"
    with kernel_mount(tmp_path, img, log, mount_opts) as m:
        os.makedirs(m / "a/b")
        (m / "a/b/f").write_bytes(os.urandom(50_000))
        os.sync()
    records = list(log_records(log))
    with Watcher(base) as w:
        engine = w.engines[0][1]
        jblocks = set(engine._journal_blocks.values()) - {engine._journal_blocks[0]}
        if corrupt:  # the first logged copy (a journal block without the JBD2 magic)
            for i, rec in enumerate(records):
                if rec.kind is not RecordKind.WRITE or rec.data is None:
                    continue
                data = bytearray(rec.data)
                hit = [
                    k
                    for k in range(0, len(data), BS)
                    if (rec.offset + k) // BS in jblocks and data[k : k + 4] != b"\xc0\x3b\x39\x98"
                ]
                if hit:
                    data[hit[0] + 2000] ^= 0xFF
                    records[i] = stream_record(rec.seq, rec.kind, rec.offset, rec.length, data)
                    break
            else:
                raise AssertionError("no logged journal block in the stream")
        events = list(w.feed(records))
        assert engine.journal is not None
        csum = engine.journal.csum
        assert (csum.v3, csum.v1) == (kind == "v3", kind == "v1")
        stats = engine.journal.stats
    errors = [e for e in events if e.kind == "error"]
    got = {(e.kind, e.path) for e in events if e.kind != "error"}
    assert {("mkdir", "/a"), ("mkdir", "/a/b"), ("create", "/a/b/f"), ("write", "/a/b/f")} <= got
    if corrupt:
        assert engine.stats.bad_transactions == 1 and stats.checksum_errors == 1
        assert len(errors) == 1 and "checksum" in (errors[0].message or "")
        (create,) = [e for e in events if e.kind == "create"]
        assert create.record > errors[0].record  # from the checkpoint, not the torn commit
    else:
        assert errors == [] and stats.checksum_errors == 0 and stats.commits >= 1
