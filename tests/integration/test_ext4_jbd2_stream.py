"""The engine's journal path without a kernel: debugfs's changes are replayed as ext4 would
write them (data home first, metadata as one JBD2 transaction, commit, checkpoint later), so
machines without FUSE or loop devices still exercise commit-time inference.

Events must appear at the commit block's record, before the flush and before any home write
of the metadata; the checkpoint writes that follow must add nothing.
"""

from __future__ import annotations

import os
import shutil
import struct
from pathlib import Path

import pytest
from ext4_recording import debugfs, diff_records

from blocktrace.block.source import FileSource
from blocktrace.ext4 import constants as C
from blocktrace.ext4.engine import Ext4Engine
from blocktrace.ext4.ownership import OwnerKind
from blocktrace.ext4.watcher import Watcher
from blocktrace.stream.records import Record
from stream_helpers import rec as stream_record
from support import require, run


def jbd2_transaction(seq: int, homes: list[int], bs: int, incompat: int) -> list[bytes]:
    """[descriptor listing ``homes``, commit block] of transaction ``seq`` (8/12-byte tags)."""
    desc = bytearray(bs)
    struct.pack_into(">III", desc, 0, C.JBD2_MAGIC_NUMBER, C.JBD2BlockType.DESCRIPTOR_BLOCK, seq)
    pos = 12
    bit64 = bool(incompat & C.JBD2FeatureIncompat.BIT64)
    for i, home in enumerate(homes):
        flags = (C.JBD2TagFlags.SAME_UUID if i else 0) | (
            C.JBD2TagFlags.LAST_TAG if i == len(homes) - 1 else 0
        )
        struct.pack_into(">IHH", desc, pos, home & 0xFFFFFFFF, 0, flags)
        if bit64:
            struct.pack_into(">I", desc, pos + 8, home >> 32)
        pos += (12 if bit64 else 8) + (0 if i else 16)
    commit = bytearray(bs)
    struct.pack_into(">III", commit, 0, C.JBD2_MAGIC_NUMBER, C.JBD2BlockType.COMMIT_BLOCK, seq)
    struct.pack_into(">QI", commit, 0x30, 1_700_000_000, 0)
    return [bytes(desc), bytes(commit)]


@pytest.mark.parametrize("block_size", [1024, 4096])
def test_commit_reveals_events_before_home_writes(tmp_path: Path, block_size: int) -> None:
    require("mkfs.ext4", "debugfs")
    src = tmp_path / "src"
    (src / "docs").mkdir(parents=True)
    (src / "docs/old").write_bytes(b"o" * 3000)
    base = tmp_path / "base.img"
    with open(base, "wb") as f:
        f.truncate(32 << 20)
    run(
        [
            "mkfs.ext4",
            "-q",
            "-F",
            "-b",
            str(block_size),
            "-O",
            "^metadata_csum,^64bit",
            "-d",
            str(src),
            str(base),
        ],
        timeout=60,
    )
    new = tmp_path / "new.img"
    shutil.copy(base, new)
    payload = tmp_path / "payload"
    payload.write_bytes(os.urandom(3 * block_size + 10))
    debugfs(new, f"mkdir /docs/sub\nwrite {payload} /docs/sub/p\nrm /docs/old\n")

    after = Ext4Engine(FileSource(new))  # classifies the changed blocks: data or metadata
    changes = diff_records(base, new, chunk=block_size)[:-1]
    data = [
        r
        for r in changes
        if (o := after.owner_of(r.offset // block_size)) is not None and o.kind is OwnerKind.DATA
    ]
    meta = [r for r in changes if r not in data]
    assert data and meta

    with Watcher(base) as w:
        engine = w.engines[0][1]
        assert engine.journal is not None
        jsb = engine.journal.jsb
        jblocks = engine._journal_blocks
        homes = [r.offset // block_size for r in meta]
        desc, commit = jbd2_transaction(jsb.s_sequence, homes, block_size, jsb.s_feature_incompat)
        stream: list[Record] = []

        def add(kind: str, offset: int = 0, payload: bytes | None = None) -> None:
            stream.append(
                stream_record(len(stream), kind, offset, len(payload) if payload else 0, payload)
            )

        for r in data:  # ordered mode: data home first
            add("write", r.offset, bytes(r.data))
        pos = jsb.s_first
        add("write", jblocks[pos] * block_size, desc)
        for r in meta:
            pos += 1
            add("write", jblocks[pos] * block_size, bytes(r.data))
        add("flush")  # the commit's pre-flush
        commit_record = len(stream)
        add("write", jblocks[pos + 1] * block_size, commit)
        add("flush")
        checkpoint_start = len(stream)
        for r in meta:  # much later: checkpoint to the home locations
            add("write", r.offset, bytes(r.data))
        add("flush")

        events = []
        for rec in stream:
            got = w.process(rec)
            if rec.seq >= checkpoint_start:
                assert got == [], "checkpoint writes must add nothing"
            events += got
        events += w.finish()
        assert engine.journal.stats.commits == 1
        assert engine.journal.stats.logged_blocks == len(meta)
    assert {(e.kind, e.path) for e in events} == {
        ("mkdir", "/docs/sub"),
        ("create", "/docs/sub/p"),
        ("write", "/docs/sub/p"),
        ("delete", "/docs/old"),
    }
    assert all(e.record == commit_record for e in events)
    (write,) = [e for e in events if e.kind == "write"]
    assert (write.offset, write.length) == (0, 3 * block_size + 10)
    assert write.data_record is not None and write.data_record < commit_record
