"""JBD2 transaction parser, fed journal blocks as the guest writes them (sans-IO).

Why: ext4 writes metadata to its journal first and to its home location much later (at
checkpoint, often only at unmount), so inference that waited for home writes would be late by
minutes.  A transaction is durable once its commit block is written (with FUA or before the
flush that follows it), so the engine learns every metadata change at the commit block, which is
always before the guest's sync returns.

How: every written journal block is classified by its big-endian header.  Descriptor and revoke
blocks are remembered under their transaction sequence; a commit block for sequence S closes S
and yields a :class:`Transaction` listing, for every tag of S's descriptors, the journal block
holding the logged copy (the blocks that follow the descriptor, wrapping from ``s_maxlen`` to
``s_first``) and its home block.  The engine reads those copies from its view (they were
written just before) and applies them.  Data blocks that look like journal blocks are escaped
by JBD2 (first four bytes zeroed, ESCAPE tag flag), so a written block carrying the magic is a
real descriptor, commit or revoke block.  Sequence numbers, not positions, tie blocks to
transactions, so stale blocks from an earlier pass round the ring are never replayed.

Checksums (v2/v3) change the tag size and add a 4-byte block tail; both layouts are parsed, but
the CRC32C values are not verified (no CRC32C in the standard library; the sequence check and
the commit-after-descriptor order are what protect against torn transactions here).  Fast
commit blocks (``fast_commit`` feature) are recognised and counted but not decoded.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, field

from blocktrace.ext4 import constants as C
from blocktrace.ext4.structs import (
    JBD2_COMMIT,
    JBD2_HEADER,
    Ext4FormatError,
    JournalSuperblock,
    parse_descriptor_tags,
    parse_revoke_blocks,
)

MAX_OPEN_TRANSACTIONS = 64  #: uncommitted sequences remembered (hostile streams cannot grow it)


@dataclass(slots=True)
class Transaction:
    """A committed transaction: (home block, journal block, escaped) for each logged block."""

    sequence: int
    commit_time: float = 0.0
    blocks: list[tuple[int, int, bool]] = field(default_factory=list)
    revoked: list[int] = field(default_factory=list)
    descriptors: list[int] = field(default_factory=list)  #: journal blocks of the descriptors


@dataclass(slots=True)
class JournalStats:
    descriptors: int = 0
    commits: int = 0
    revokes: int = 0
    logged_blocks: int = 0
    fast_commit_blocks: int = 0
    errors: int = 0
    dropped_transactions: int = 0


class Journal:
    """Follows one internal JBD2 journal of ``maxlen`` blocks."""

    def __init__(
        self, superblock: bytes, maxlen_blocks: int, read_jblock: Callable[[int], bytes]
    ) -> None:
        self.read_jblock = read_jblock  #: reads journal block ``jblk`` from the current view
        self.stats = JournalStats()
        self.nblocks = maxlen_blocks
        self.jsb = self._parse_sb(superblock)
        self._descriptors: dict[int, list[int]] = {}
        self._revoked: dict[int, list[int]] = {}

    def _parse_sb(self, block: bytes) -> JournalSuperblock:
        magic, btype, _ = JBD2_HEADER.unpack(block)
        if magic != C.JBD2_MAGIC_NUMBER or btype not in (
            C.JBD2BlockType.SUPERBLOCK_V1,
            C.JBD2BlockType.SUPERBLOCK_V2,
        ):
            raise Ext4FormatError("journal block 0 is not a JBD2 superblock")
        jsb = JournalSuperblock.parse(block)
        if btype == C.JBD2BlockType.SUPERBLOCK_V1:  # v1 has no feature fields
            jsb = JournalSuperblock(
                jsb.s_blocksize,
                jsb.s_maxlen,
                jsb.s_first,
                jsb.s_sequence,
                jsb.s_start,
                0,
                0,
                0,
                jsb.s_uuid,
                0,
                0,
            )
        if not 0 < jsb.s_first < jsb.s_maxlen <= max(self.nblocks, 1):
            raise Ext4FormatError(
                f"journal superblock s_first={jsb.s_first} "
                f"s_maxlen={jsb.s_maxlen} inconsistent with the journal inode"
            )
        return jsb

    @property
    def incompat(self) -> int:
        return self.jsb.s_feature_incompat

    @property
    def in_transaction(self) -> bool:
        """A descriptor was written whose commit block has not been seen yet."""
        return bool(self._descriptors)

    def _next(self, jblk: int) -> int:
        jblk += 1
        return self.jsb.s_first if jblk >= self.jsb.s_maxlen else jblk

    def block_written(self, jblk: int, data: bytes) -> Transaction | None:
        """Journal block ``jblk`` was written with ``data``; a commit yields its transaction."""
        if jblk == 0:
            try:
                self.jsb = self._parse_sb(data)
            except Ext4FormatError:
                self.stats.errors += 1
            return None
        if len(data) < JBD2_HEADER.size:
            return None
        magic, btype, seq = JBD2_HEADER.unpack(data)
        if magic != C.JBD2_MAGIC_NUMBER:
            return None  # a logged copy of a metadata block
        if btype == C.JBD2BlockType.DESCRIPTOR_BLOCK:
            self.stats.descriptors += 1
            descs = self._open(seq, self._descriptors)
            if jblk not in descs:
                descs.append(jblk)
        elif btype == C.JBD2BlockType.REVOKE_BLOCK:
            self.stats.revokes += 1
            try:
                self._open(seq, self._revoked).extend(parse_revoke_blocks(data, self.incompat))
            except Ext4FormatError:
                self.stats.errors += 1
        elif btype == C.JBD2BlockType.COMMIT_BLOCK:
            self.stats.commits += 1
            return self._commit(seq, data)
        elif btype == C.JBD2BlockType.FC_BLOCK:
            self.stats.fast_commit_blocks += 1
        return None

    def _open(self, seq: int, table: dict[int, list[int]]) -> list[int]:
        if seq not in table and len(table) >= MAX_OPEN_TRANSACTIONS:
            del table[next(iter(table))]
            self.stats.dropped_transactions += 1
        return table.setdefault(seq, [])

    def _commit(self, seq: int, commit_block: bytes) -> Transaction:
        tx = Transaction(seq)
        try:
            *_, sec, nsec = JBD2_COMMIT.unpack(commit_block)
            tx.commit_time = sec + nsec / 1e9
        except Ext4FormatError:
            pass
        tx.revoked = self._revoked.pop(seq, [])
        for table in (self._descriptors, self._revoked):  # older, never committed: stale
            for old in [s for s in table if 0 < (seq - s) % (1 << 32) < 1 << 31]:
                del table[old]
        for desc_jblk in self._descriptors.pop(seq, []):
            tx.descriptors.append(desc_jblk)
            self._tags_of(desc_jblk, tx)
        return tx

    def _tags_of(self, desc_jblk: int, tx: Transaction) -> None:
        try:
            block = self.read_jblock(desc_jblk)
            tags = parse_descriptor_tags(block, self.incompat)
        except (Ext4FormatError, struct.error):
            self.stats.errors += 1
            return
        pos = desc_jblk
        for tag in tags:
            pos = self._next(pos)
            if tag.flags & C.JBD2TagFlags.DELETED:
                continue
            tx.blocks.append((tag.blocknr, pos, bool(tag.flags & C.JBD2TagFlags.ESCAPE)))
            self.stats.logged_blocks += 1


def recover(
    jsb: JournalSuperblock, read_jblock: Callable[[int], bytes]
) -> tuple[list[tuple[int, bytes]], int]:
    """The committed-but-not-checkpointed state of a journal, as ``jbd2_journal_recover`` would
    replay it: ``([(home block, contents)...] in replay order, transactions found)``.

    Why: a base image taken while the file system is mounted (a live trace attaching to a
    running guest) has recent metadata only in the journal.  Scan from ``s_start`` while the
    blocks carry the expected sequence; keep transactions that have their commit block; a
    block revoked by a transaction at or after the one that logged it is not replayed.
    """
    if jsb.s_start == 0:
        return [], 0
    incompat = jsb.s_feature_incompat
    pos, seq = jsb.s_start, jsb.s_sequence
    logged: list[tuple[int, int, bool, int]] = []  # (home, jblk, escaped, seq)
    pending: list[tuple[int, int, bool, int]] = []
    revoked: dict[int, int] = {}
    found = 0
    steps = 0

    def advance(p: int) -> int:
        p += 1
        return jsb.s_first if p >= jsb.s_maxlen else p

    while steps < jsb.s_maxlen:
        steps += 1
        try:
            block = read_jblock(pos)
            magic, btype, bseq = JBD2_HEADER.unpack(block)
        except Ext4FormatError:
            break
        if magic != C.JBD2_MAGIC_NUMBER or bseq != seq:
            break
        if btype == C.JBD2BlockType.DESCRIPTOR_BLOCK:
            try:
                tags = parse_descriptor_tags(block, incompat)
            except Ext4FormatError:
                break
            for tag in tags:
                pos = advance(pos)
                steps += 1
                if not tag.flags & C.JBD2TagFlags.DELETED:
                    escaped = bool(tag.flags & C.JBD2TagFlags.ESCAPE)
                    pending.append((tag.blocknr, pos, escaped, seq))
        elif btype == C.JBD2BlockType.REVOKE_BLOCK:
            try:
                for blk in parse_revoke_blocks(block, incompat):
                    revoked[blk] = seq
            except Ext4FormatError:
                break
        elif btype == C.JBD2BlockType.COMMIT_BLOCK:
            logged += pending
            pending = []
            found += 1
            seq = (seq + 1) & 0xFFFFFFFF
        else:
            break
        pos = advance(pos)
    magic_bytes = struct.pack(">I", C.JBD2_MAGIC_NUMBER)
    out: list[tuple[int, bytes]] = []
    for home, jblk, escaped, tseq in logged:
        rseq = revoked.get(home)
        if rseq is not None and (rseq - tseq) % (1 << 32) < 1 << 31:
            continue  # revoked at or after the transaction that logged it
        try:
            data = read_jblock(jblk)
        except Ext4FormatError:
            continue
        out.append((home, magic_bytes + data[4:] if escaped else data))
    return out, found
