"""JBD2 transaction parsing from journal blocks as they are written."""

from __future__ import annotations

import struct
import tracemalloc

from blocktrace.ext4 import constants as C
from blocktrace.ext4.jbd2csum import crc32c
from blocktrace.ext4.journal import MAX_OPEN_REVOKES, MAX_OPEN_TRANSACTIONS, Journal
from blocktrace.ext4.structs import parse_descriptor_tags

BS = 1024
MAXLEN = 64
INCOMPAT = (
    C.JBD2FeatureIncompat.REVOKE | C.JBD2FeatureIncompat.BIT64 | C.JBD2FeatureIncompat.CSUM_V3
)


def jsb(first: int = 1, incompat: int = INCOMPAT) -> bytes:
    b = bytearray(BS)
    struct.pack_into(">IIIIIIII", b, 0, C.JBD2_MAGIC_NUMBER, 4, 0, BS, MAXLEN, first, 1, 0)
    struct.pack_into(">I", b, 0x28, incompat)
    return bytes(b)


def descriptor(seq: int, homes: list[int], escape: int | None = None) -> bytes:
    b = bytearray(BS)
    struct.pack_into(">III", b, 0, C.JBD2_MAGIC_NUMBER, 1, seq)
    pos = 12
    for i, home in enumerate(homes):
        flags = C.JBD2TagFlags.SAME_UUID if i else 0
        if i == len(homes) - 1:
            flags |= C.JBD2TagFlags.LAST_TAG
        if home == escape:
            flags |= C.JBD2TagFlags.ESCAPE
        struct.pack_into(">IIII", b, pos, home & 0xFFFFFFFF, flags, home >> 32, 0)
        pos += 16 + (0 if i else 16)
    return bytes(b)


def commit(seq: int, sec: int = 1700000000) -> bytes:
    b = bytearray(BS)
    struct.pack_into(">III", b, 0, C.JBD2_MAGIC_NUMBER, 2, seq)
    struct.pack_into(">QI", b, 0x30, sec, 500_000_000)
    return bytes(b)


def revoke(seq: int, blocks: list[int]) -> bytes:
    b = bytearray(BS)
    struct.pack_into(">IIII", b, 0, C.JBD2_MAGIC_NUMBER, 5, seq, 16 + 8 * len(blocks))
    for i, blk in enumerate(blocks):
        struct.pack_into(">Q", b, 16 + 8 * i, blk)
    return bytes(b)


SEED = crc32c(0xFFFFFFFF, bytes(16))  # the test superblocks' UUID is all zeroes


def sign(blocks: dict[int, bytes], jblk: int, first: int = 1) -> None:
    """Give the JBD2 block at ``jblk`` its csum v3 checksums, as the kernel writes them: a
    descriptor's tags (CRC32C of sequence + logged block, read from ``blocks``) and tail, a
    revoke block's tail, a commit block's h_chksum[0]."""
    b = bytearray(blocks[jblk])
    magic, btype, seq = struct.unpack_from(">III", b)
    assert magic == C.JBD2_MAGIC_NUMBER
    if btype == C.JBD2BlockType.DESCRIPTOR_BLOCK:
        pos, jpos = 12, jblk
        for tag in parse_descriptor_tags(bytes(b), INCOMPAT):
            jpos = jpos + 1 if jpos + 1 < MAXLEN else first
            data = blocks.get(jpos, bytes(BS))
            struct.pack_into(">I", b, pos + 12, crc32c(crc32c(SEED, seq.to_bytes(4, "big")), data))
            pos += 16 + (0 if tag.flags & C.JBD2TagFlags.SAME_UUID else 16)
    if btype in (C.JBD2BlockType.DESCRIPTOR_BLOCK, C.JBD2BlockType.REVOKE_BLOCK):
        b[-4:] = bytes(4)
        b[-4:] = crc32c(SEED, b).to_bytes(4, "big")
    elif btype == C.JBD2BlockType.COMMIT_BLOCK:
        b[0x10:0x14] = bytes(4)
        b[0x10:0x14] = crc32c(SEED, b).to_bytes(4, "big")
    blocks[jblk] = bytes(b)


def sign_all(blocks: dict[int, bytes]) -> None:
    for jblk in sorted(blocks):
        if blocks[jblk][:4] == struct.pack(">I", C.JBD2_MAGIC_NUMBER):
            sign(blocks, jblk)


class Ring:
    """A journal written block by block; JBD2 blocks are signed as the kernel would: revoke
    blocks when written, a commit's open descriptors (then the commit) at the commit."""

    def __init__(self) -> None:
        self.blocks: dict[int, bytes] = {0: jsb()}
        self.j = Journal(self.blocks[0], MAXLEN, lambda j: self.blocks.get(j, bytes(BS)))
        self.unsigned: set[int] = set()

    def sign_descriptors(self) -> None:
        for jblk in sorted(self.unsigned):
            sign(self.blocks, jblk)
        self.unsigned.clear()

    def write(self, jblk: int, data: bytes, *, signed: bool = True):  # type: ignore[no-untyped-def]
        self.blocks[jblk] = data
        self.unsigned.discard(jblk)
        header = struct.unpack_from(">II", data) if len(data) >= 8 else (0, 0)
        if signed and header[0] == C.JBD2_MAGIC_NUMBER and header[1] != 4:
            if header[1] == C.JBD2BlockType.DESCRIPTOR_BLOCK:
                self.unsigned.add(jblk)
            else:
                if header[1] == C.JBD2BlockType.COMMIT_BLOCK:
                    self.sign_descriptors()
                sign(self.blocks, jblk)
        return self.j.block_written(jblk, self.blocks[jblk])


def test_commit_yields_logged_blocks_in_order() -> None:
    r = Ring()
    assert r.write(1, descriptor(5, [100, 7 << 32, 300], escape=300)) is None
    for i in range(3):
        assert r.write(2 + i, bytes([i]) * BS) is None
    assert r.write(5, revoke(5, [42])) is None
    tx = r.write(6, commit(5))
    assert tx is not None and tx.sequence == 5
    assert tx.blocks == [(100, 2, False), (7 << 32, 3, False), (300, 4, True)]
    assert tx.revoked == [42]
    assert tx.commit_time == 1700000000.5
    assert r.j.stats.commits == 1 and r.j.stats.logged_blocks == 3


def test_transaction_wraps_round_the_ring() -> None:
    r = Ring()
    r.write(MAXLEN - 2, descriptor(9, [10, 11, 12]))
    tx = r.write(3, commit(9))
    assert tx is not None
    assert [jblk for _, jblk, _ in tx.blocks] == [MAXLEN - 1, 1, 2]


def test_commit_without_descriptor_and_other_sequences() -> None:
    r = Ring()
    r.write(1, descriptor(3, [100]))
    r.write(3, descriptor(5, [200]))
    tx = r.write(5, commit(4))  # a different sequence: nothing of 3 or 5 is applied...
    assert tx is not None and tx.blocks == []
    assert r.j.in_transaction  # ...5 is still open, 3 (older, never committed) is dropped
    tx3 = r.write(6, commit(3))
    assert tx3 is not None and tx3.blocks == []
    tx5 = r.write(7, commit(5))
    assert tx5 is not None and tx5.blocks == [(200, 4, False)]
    assert r.write(8, commit(5)) is not None  # a repeated commit applies nothing twice
    assert r.j.stats.logged_blocks == 1 and not r.j.in_transaction


def test_garbage_and_hostile_blocks_do_not_raise() -> None:
    r = Ring()
    assert r.write(1, b"\xff" * BS) is None
    bad = bytearray(revoke(2, [1]))
    struct.pack_into(">I", bad, 12, 10_000)  # r_count beyond the block
    assert r.write(2, bytes(bad)) is None
    assert r.write(0, b"\0" * BS) is None  # a torn superblock rewrite is ignored
    assert r.j.stats.errors == 2
    for seq in range(MAX_OPEN_TRANSACTIONS + 10):
        r.write(3, descriptor(1000 + seq, [5]))
    assert r.j.stats.dropped_transactions == 10


def test_superblock_rewrite_updates_features() -> None:
    r = Ring()
    r.write(0, jsb(first=2, incompat=C.JBD2FeatureIncompat.REVOKE))
    assert r.j.jsb.s_first == 2 and r.j.incompat == C.JBD2FeatureIncompat.REVOKE
    b = bytearray(BS)  # 8-byte tags without csum or 64bit
    struct.pack_into(">III", b, 0, C.JBD2_MAGIC_NUMBER, 1, 1)
    struct.pack_into(">II", b, 12, 77, C.JBD2TagFlags.LAST_TAG)
    r.write(5, bytes(b))
    tx = r.write(7, commit(1))
    assert tx is not None and tx.blocks == [(77, 6, False)]


def test_recover_replays_committed_unrevoked_blocks() -> None:
    from blocktrace.ext4.journal import recover
    from blocktrace.ext4.structs import JournalSuperblock

    blocks: dict[int, bytes] = {}
    blocks[1] = descriptor(7, [100, 200])
    blocks[2], blocks[3] = b"a" * BS, b"b" * BS
    blocks[4] = commit(7)
    blocks[5] = revoke(8, [100])
    blocks[6] = descriptor(8, [300])
    blocks[7] = b"c" * BS
    blocks[8] = commit(8)
    blocks[9] = descriptor(9, [400])  # never committed: not replayed
    blocks[10] = b"d" * BS
    sign_all(blocks)
    jsb = JournalSuperblock.parse(jsb_bytes(start=1, sequence=7))
    replay, found = recover(jsb, lambda j: blocks.get(j, bytes(BS)))
    assert found == 2
    assert replay == [(200, b"b" * BS), (300, b"c" * BS)]
    clean = JournalSuperblock.parse(jsb_bytes(start=0, sequence=7))
    assert recover(clean, lambda j: blocks.get(j, bytes(BS))) == ([], 0)


def jsb_bytes(start: int, sequence: int) -> bytes:
    b = bytearray(jsb())
    struct.pack_into(">II", b, 0x18, sequence, start)
    return bytes(b)


def test_crc_implementations_agree_with_reference_values() -> None:
    import ctypes.util

    from blocktrace.ext4 import jbd2csum

    if ctypes.util.find_library("ext2fs"):  # e2fsprogs installed: its CRCs, not Python's
        assert jbd2csum.implementation() == "libext2fs"
    assert jbd2csum.crc32c(0xFFFFFFFF, b"123456789") ^ 0xFFFFFFFF == 0xE3069283
    assert jbd2csum.crc32_be(0xFFFFFFFF, b"123456789") ^ 0xFFFFFFFF == 0xFC891918  # bzip2
    data = bytes(range(256)) * 5
    for seed in (0, 1, 0xFFFFFFFF):
        assert jbd2csum.crc32c(seed, data) == jbd2csum.py_crc32c(seed, data)
        assert jbd2csum.crc32_be(seed, data) == jbd2csum.py_crc32_be(seed, data)


def _v1_transaction(r: Ring, seq: int, at: int, *, good: bool):  # type: ignore[no-untyped-def]
    from blocktrace.ext4.jbd2csum import crc32_be

    desc = bytearray(BS)  # 8-byte tags (no csum v2/v3, no 64bit), one tag, a UUID follows
    struct.pack_into(">III", desc, 0, C.JBD2_MAGIC_NUMBER, 1, seq)
    struct.pack_into(">II", desc, 12, 77, C.JBD2TagFlags.LAST_TAG)
    data = bytes([seq]) * BS
    r.write(at, bytes(desc), signed=False)
    r.write(at + 1, data, signed=False)
    crc = crc32_be(crc32_be(0xFFFFFFFF, bytes(desc)), data) ^ (0 if good else 1)
    commit_block = bytearray(commit(seq))
    struct.pack_into(">BBxxI", commit_block, 0x0C, 1, 4, crc)  # JBD2_CRC32_CHKSUM, 4 bytes
    return r.write(at + 2, bytes(commit_block), signed=False)


def test_v1_commit_checksum_covers_descriptor_and_logged_blocks() -> None:
    r = Ring()
    sb = bytearray(jsb(incompat=C.JBD2FeatureIncompat.REVOKE))
    struct.pack_into(">I", sb, 0x24, C.JBD2FeatureCompat.CHECKSUM)
    r.write(0, bytes(sb), signed=False)
    assert r.j.csum.v1 and not r.j.csum.v23
    tx = _v1_transaction(r, 1, 1, good=True)
    assert tx is not None and tx.error is None and tx.blocks == [(77, 2, False)]
    bad = _v1_transaction(r, 2, 4, good=False)
    assert bad is not None and bad.blocks == [] and "CRC32" in (bad.error or "")
    assert r.j.stats.bad_transactions == 1 and r.j.stats.checksum_errors == 1


def test_v3_corrupt_logged_block_or_commit_is_not_applied() -> None:
    for broken in ("logged", "commit", "descriptor"):
        r = Ring()
        r.write(1, descriptor(5, [100, 200]))
        r.write(2, b"a" * BS)
        r.write(3, b"b" * BS)
        r.sign_descriptors()
        if broken == "logged":
            r.write(3, b"B" * BS)  # torn: not the block the descriptor was signed for
        elif broken == "descriptor":
            r.blocks[1] = r.blocks[1][:100] + b"\xff" + r.blocks[1][101:]
        if broken == "commit":
            tx = r.write(4, commit(5)[:100] + b"\xff" + commit(5)[101:], signed=False)
        else:
            tx = r.write(4, commit(5))
        assert tx is not None and tx.blocks == [] and "checksum" in (tx.error or ""), broken
        assert r.j.stats.bad_transactions == 1, broken


def test_rewritten_revoke_blocks_of_an_open_transaction_are_bounded() -> None:
    """A guest rewriting revoke blocks of a transaction it never commits (on main: every
    record appended, 150 MiB of such writes took the live server from 27 MB to 1.6 GB):
    de-duplicated, at most MAX_OPEN_REVOKES remembered, the rest counted."""
    r = Ring()
    per_block = (BS - 16 - 4) // 8
    tracemalloc.start()
    try:
        for i in range(2500):  # 625,000 revoke records, 5 MB of revoke blocks
            base = i * per_block
            r.write(2 + i % 8, revoke(7, list(range(base, base + per_block))))
            r.write(10 + i % 8, revoke(7, list(range(base, base + per_block))))  # repeated
        grown = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert grown < 10 << 20, grown
    assert r.j.stats.revokes_dropped >= 2500 * per_block - MAX_OPEN_REVOKES
    tx = r.write(20, commit(7))
    assert tx is not None and tx.error is None
    assert len(tx.revoked) == len(set(tx.revoked)) == MAX_OPEN_REVOKES


def test_transaction_with_more_tags_than_the_journal_is_refused() -> None:
    """Descriptors of one transaction listing more logged blocks than the journal holds: the
    transaction is reported bad, not applied, and reading its tags stops at the journal's
    length (each tag's logged copy is read for its checksum)."""
    r = Ring()
    homes = list(range(100, 100 + 60))
    for jblk in range(1, 4):  # three descriptors of 60 tags in a 64-block journal
        r.write(jblk, descriptor(9, homes))
    tx = r.write(50, commit(9))
    assert tx is not None
    assert tx.blocks == [] and tx.error is not None
    assert tx.tags == MAXLEN  # stopped at the journal's length


def test_recover_ignores_revokes_of_an_uncommitted_transaction() -> None:
    """As the kernel's PASS_REVOKE: only committed transactions' revoke records count (on
    main a revoke block of the uncommitted tail cancelled the replay of a committed block).
    The revoke table keeps only blocks some transaction logged, so revoke blocks full of
    other numbers cost no memory."""
    from blocktrace.ext4.journal import recover
    from blocktrace.ext4.structs import JournalSuperblock

    blocks: dict[int, bytes] = {}
    blocks[1] = descriptor(7, [100])
    blocks[2] = b"a" * BS
    blocks[3] = commit(7)
    blocks[4] = revoke(8, [100, *range(5000, 5100)])  # transaction 8 never commits
    blocks[5] = descriptor(8, [300])
    blocks[6] = b"c" * BS
    sign_all(blocks)
    jsb = JournalSuperblock.parse(jsb_bytes(start=1, sequence=7))
    replay, found = recover(jsb, lambda j: blocks.get(j, bytes(BS)))
    assert found == 1
    assert replay == [(100, b"a" * BS)]
