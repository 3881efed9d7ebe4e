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

Checksums are verified as the kernel's recovery does (:class:`Checksums`): csum v2/v3 (CRC32C
seeded with the journal UUID) of the commit block, of descriptor and revoke block tails, and of
every logged block (its tag's checksum, seeded with the sequence); v1 (``COMPAT_CHECKSUM``, also
used with ``ASYNC_COMMIT``) as the big-endian CRC32 of the descriptors and logged blocks that the
commit block carries.  A committed transaction that fails any of them is torn or corrupt: it is
returned with ``error`` set and no blocks, so the engine reports it and applies nothing (the
home-location writes of the checkpoint bring those changes later).  Fast commit blocks
(``fast_commit`` feature) are recognised and counted but not decoded.
"""

from __future__ import annotations

import contextlib
import itertools
import struct
from collections.abc import Callable
from dataclasses import dataclass, field

from blocktrace.ext4 import constants as C
from blocktrace.ext4.jbd2csum import crc32_be, crc32c
from blocktrace.ext4.structs import (
    JBD2_COMMIT,
    JBD2_HEADER,
    Ext4FormatError,
    JournalSuperblock,
    JournalTag,
    parse_descriptor_tags,
    parse_revoke_blocks,
)

MAX_OPEN_TRANSACTIONS = 64  #: uncommitted sequences remembered (hostile streams cannot grow it)
#: revoked block numbers remembered over all open transactions (distinct per transaction).  The
#: live engine applies each transaction at its commit, in stream order, so revocation changes
#: nothing there: the list is informational and a guest rewriting revoke blocks must not grow it
MAX_OPEN_REVOKES = 1 << 16
JBD2_CRC32_CHKSUM, JBD2_CRC32_CHKSUM_SIZE = 1, 4  #: v1 commit block h_chksum_type / size
_V23 = int(C.JBD2FeatureIncompat.CSUM_V2 | C.JBD2FeatureIncompat.CSUM_V3)
_V3 = int(C.JBD2FeatureIncompat.CSUM_V3)
_V1 = int(C.JBD2FeatureCompat.CHECKSUM)
#: plain ints: ``int & IntFlag`` goes through enum's Python ``__and__`` (per logged block)
_DELETED, _ESCAPE = int(C.JBD2TagFlags.DELETED), int(C.JBD2TagFlags.ESCAPE)
_TAIL = slice(-4, None)
_ZERO4 = bytes(4)


class Checksums:
    """The checksum rules of one journal superblock (``fs/jbd2/recovery.c``)."""

    def __init__(self, jsb: JournalSuperblock) -> None:
        incompat = jsb.s_feature_incompat
        self.v23 = bool(incompat & _V23)
        self.v3 = bool(incompat & _V3)
        self.v1 = bool(jsb.s_feature_compat & _V1) and not self.v23
        self.seed = crc32c(0xFFFFFFFF, jsb.s_uuid) if self.v23 else 0

    def tail_ok(self, block: bytes) -> bool:
        """Descriptor and revoke blocks: ``jbd2_descriptor_block_csum_verify``."""
        if not self.v23 or len(block) < 8:
            return True
        calc = crc32c(self.seed, block[:-4] + _ZERO4)
        return int.from_bytes(block[_TAIL], "big") == calc

    def commit_ok(self, block: bytes) -> bool:
        """``jbd2_commit_block_csum_verify`` (v2/v3; v1 is :meth:`commit_v1_ok`)."""
        if not self.v23 or len(block) < 0x14:
            return True
        calc = crc32c(self.seed, block[:0x10] + _ZERO4 + block[0x14:])
        return int.from_bytes(block[0x10:0x14], "big") == calc

    def tag_ok(self, tag: JournalTag, data: bytes, sequence: int) -> bool:
        """``jbd2_block_tag_csum_verify``: the logged block as it sits in the journal."""
        if not self.v23:
            return True
        calc = crc32c(crc32c(self.seed, sequence.to_bytes(4, "big")), data)
        return tag.checksum == (calc if self.v3 else calc & 0xFFFF)

    @staticmethod
    def commit_v1_ok(commit_block: bytes, crc32_sum: int) -> bool:
        """v1: ``crc32_be`` over the transaction's descriptor and logged blocks, or unused."""
        try:
            ctype, csize, found, *_ = JBD2_COMMIT.unpack(commit_block)
        except Ext4FormatError:
            return False
        if ctype == 0 and csize == 0 and found == 0:
            return True
        return bool(
            ctype == JBD2_CRC32_CHKSUM and csize == JBD2_CRC32_CHKSUM_SIZE and found == crc32_sum
        )


@dataclass(slots=True)
class Transaction:
    """A committed transaction: (home block, journal block, escaped) for each logged block."""

    sequence: int
    commit_time: float = 0.0
    blocks: list[tuple[int, int, bool]] = field(default_factory=list)
    revoked: list[int] = field(default_factory=list)
    descriptors: list[int] = field(default_factory=list)  #: journal blocks of the descriptors
    #: why the transaction must not be applied (a checksum failed: torn or corrupt); then
    #: ``blocks`` is empty
    error: str | None = None
    tags: int = 0  #: descriptor tags read (bounded by the journal's length)


@dataclass(slots=True)
class JournalStats:
    descriptors: int = 0
    commits: int = 0
    revokes: int = 0
    logged_blocks: int = 0
    fast_commit_blocks: int = 0
    errors: int = 0
    dropped_transactions: int = 0
    revokes_dropped: int = 0  #: revoke records not remembered (the table was full)
    checksum_errors: int = 0  #: blocks whose JBD2 checksum did not match
    bad_transactions: int = 0  #: committed transactions not applied (a checksum failed)


class Journal:
    """Follows one internal JBD2 journal of ``maxlen`` blocks."""

    def __init__(
        self, superblock: bytes, maxlen_blocks: int, read_jblock: Callable[[int], bytes]
    ) -> None:
        self.read_jblock = read_jblock  #: reads journal block ``jblk`` from the current view
        self.stats = JournalStats()
        self.nblocks = maxlen_blocks
        self.jsb = self._parse_sb(superblock)
        self.csum = Checksums(self.jsb)
        #: open sequence -> its descriptor blocks (an ordered set: a rewrite is not a new one)
        self._descriptors: dict[int, dict[int, None]] = {}
        self._revoked: dict[int, dict[int, None]] = {}  #: open sequence -> revoked blocks
        self._revoked_total = 0
        self._bad: dict[int, str] = {}  #: open sequences already known corrupt (revoke tail)

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
                self.csum = Checksums(self.jsb)  # the kernel sets csum features at mount
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
            self._open(seq, self._descriptors)[jblk] = None
        elif btype == C.JBD2BlockType.REVOKE_BLOCK:
            self.stats.revokes += 1
            if not self.csum.tail_ok(data):
                self.stats.checksum_errors += 1
                if len(self._bad) < MAX_OPEN_TRANSACTIONS:
                    self._bad[seq] = f"revoke block {jblk}: checksum mismatch"
                return None
            try:
                blocks = parse_revoke_blocks(data, self.incompat)
            except Ext4FormatError:
                self.stats.errors += 1
                return None
            self._note_revoked(seq, blocks)
        elif btype == C.JBD2BlockType.COMMIT_BLOCK:
            self.stats.commits += 1
            return self._commit(seq, data)
        elif btype == C.JBD2BlockType.FC_BLOCK:
            self.stats.fast_commit_blocks += 1
        return None

    def _open(self, seq: int, table: dict[int, dict[int, None]]) -> dict[int, None]:
        if seq not in table and len(table) >= MAX_OPEN_TRANSACTIONS:
            self._drop(table, next(iter(table)))
            self.stats.dropped_transactions += 1
        return table.setdefault(seq, {})

    def _drop(self, table: dict[int, dict[int, None]], seq: int) -> dict[int, None]:
        gone = table.pop(seq, {})
        if table is self._revoked:
            self._revoked_total -= len(gone)
        return gone

    def _note_revoked(self, seq: int, blocks: list[int]) -> None:
        """Remember ``blocks`` as revoked by ``seq``: de-duplicated, at most MAX_OPEN_REVOKES
        over all open transactions (beyond: counted in ``stats.revokes_dropped``)."""
        revoked = self._open(seq, self._revoked)
        if self._revoked_total >= MAX_OPEN_REVOKES:  # full: not even compared (CPU bound)
            self.stats.revokes_dropped += len(blocks)
            return
        fresh = dict.fromkeys(blocks)  # de-duplicated, in order
        if revoked:  # (``keys() & keys()`` would walk the whole table)
            for blk in [b for b in fresh if b in revoked]:
                del fresh[blk]
        room = max(0, MAX_OPEN_REVOKES - self._revoked_total)
        if len(fresh) > room:
            self.stats.revokes_dropped += len(fresh) - room
            fresh = dict(itertools.islice(fresh.items(), room))
        revoked.update(fresh)
        self._revoked_total += len(fresh)

    def _commit(self, seq: int, commit_block: bytes) -> Transaction:
        tx = Transaction(seq)
        try:
            *_, sec, nsec = JBD2_COMMIT.unpack(commit_block)
            tx.commit_time = sec + nsec / 1e9
        except Ext4FormatError:
            pass
        tx.revoked = list(self._drop(self._revoked, seq))
        tx.error = self._bad.pop(seq, None)
        descriptors = list(self._drop(self._descriptors, seq))
        for table in (self._descriptors, self._revoked):  # older, never committed
            for old in [s for s in table if 0 < (seq - s) % (1 << 32) < 1 << 31]:
                self._drop(table, old)
        for old in [s for s in self._bad if 0 < (seq - s) % (1 << 32) < 1 << 31]:
            del self._bad[old]
        if tx.error is None and not self.csum.commit_ok(commit_block):
            tx.error = f"commit block of transaction {seq}: checksum mismatch"
            self.stats.checksum_errors += 1
        crc32_sum = 0xFFFFFFFF
        for desc_jblk in descriptors:
            tx.descriptors.append(desc_jblk)
            crc32_sum = self._tags_of(desc_jblk, tx, crc32_sum)
        if (
            self.csum.v1
            and tx.error is None
            and not Checksums.commit_v1_ok(commit_block, crc32_sum)
        ):
            tx.error = f"commit block of transaction {seq}: CRC32 of its blocks, checksum mismatch"
            self.stats.checksum_errors += 1
        if tx.error is not None:
            self.stats.bad_transactions += 1
            self.stats.logged_blocks -= len(tx.blocks)
            tx.blocks = []
        return tx

    def _tags_of(self, desc_jblk: int, tx: Transaction, crc32_sum: int) -> int:
        """Add the tags of one descriptor to ``tx``, checking its tail and each logged block's
        checksum (``tx.error`` on a mismatch); returns the v1 running CRC32."""
        try:
            block = self.read_jblock(desc_jblk)
            tags = parse_descriptor_tags(block, self.incompat)
        except (Ext4FormatError, struct.error):
            self.stats.errors += 1
            return crc32_sum
        csum = self.csum
        if not csum.tail_ok(block):
            self.stats.checksum_errors += 1
            tx.error = tx.error or f"descriptor block {desc_jblk}: checksum mismatch"
        if csum.v1:
            crc32_sum = crc32_be(crc32_sum, block)
        pos = desc_jblk
        for tag in tags:
            if tx.tags >= self.nblocks:  # each tag's logged copy takes a journal block
                tx.error = (
                    tx.error or f"transaction {tx.sequence} logs more blocks than the journal"
                )
                break
            tx.tags += 1
            pos = self._next(pos)
            if csum.v23 or csum.v1:
                try:
                    data = self.read_jblock(pos)
                except Ext4FormatError:
                    data = b""
                if csum.v1:
                    crc32_sum = crc32_be(crc32_sum, data)
                elif tx.error is None and not csum.tag_ok(tag, data, tx.sequence):
                    self.stats.checksum_errors += 1
                    tx.error = (
                        f"logged copy of block {tag.blocknr} (journal block {pos}):"
                        " checksum mismatch"
                    )
            if tag.flags & _DELETED:
                continue
            tx.blocks.append((tag.blocknr, pos, bool(tag.flags & _ESCAPE)))
            self.stats.logged_blocks += 1
        return crc32_sum


def recover(
    jsb: JournalSuperblock,
    read_jblock: Callable[[int], bytes],
    problems: list[str] | None = None,
) -> tuple[list[tuple[int, bytes]], int]:
    """The committed-but-not-checkpointed state of a journal, as ``jbd2_journal_recover`` would
    replay it: ``([(home block, contents)...] in replay order, transactions found)``.

    Why: a base image taken while the file system is mounted (a live trace attaching to a
    running guest) has recent metadata only in the journal.  Scan from ``s_start`` while the
    blocks carry the expected sequence; keep transactions that have their commit block; a
    block revoked by a transaction at or after the one that logged it is not replayed.

    Checksums as the kernel: a descriptor, revoke or commit block that fails its checksum ends
    the scan there (that transaction and later ones are not replayed); a logged block that fails
    its tag's checksum is skipped.  Each failure is described in ``problems``.
    """
    csum = Checksums(jsb)
    problems = problems if problems is not None else []
    if jsb.s_start == 0:
        return [], 0
    incompat = jsb.s_feature_incompat
    pos, seq = jsb.s_start, jsb.s_sequence
    logged: list[tuple[int, int, bool, int, JournalTag]] = []  # (home, jblk, escaped, seq, tag)
    pending: list[tuple[int, int, bool, int, JournalTag]] = []
    crc32_sum = 0xFFFFFFFF
    # revoke blocks (journal block, sequence) of committed transactions: parsed after the scan,
    # keeping only blocks some transaction logged, so the table is bounded by the journal's
    # length whatever a guest writes into revoke blocks
    revokes: list[tuple[int, int]] = []
    pending_revokes: list[tuple[int, int]] = []
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
            if not csum.tail_ok(block):
                problems.append(f"journal recovery: descriptor block {pos}: checksum mismatch")
                break
            if csum.v1:
                crc32_sum = crc32_be(crc32_sum, block)
            for tag in tags:
                pos = advance(pos)
                steps += 1
                if csum.v1:
                    with contextlib.suppress(Ext4FormatError):
                        crc32_sum = crc32_be(crc32_sum, read_jblock(pos))
                if not tag.flags & _DELETED:
                    escaped = bool(tag.flags & _ESCAPE)
                    pending.append((tag.blocknr, pos, escaped, seq, tag))
        elif btype == C.JBD2BlockType.REVOKE_BLOCK:
            if not csum.tail_ok(block):
                problems.append(f"journal recovery: revoke block {pos}: checksum mismatch")
                break
            try:
                parse_revoke_blocks(block, incompat)
            except Ext4FormatError:
                break
            pending_revokes.append((pos, seq))
        elif btype == C.JBD2BlockType.COMMIT_BLOCK:
            if not csum.commit_ok(block) or (
                csum.v1 and not Checksums.commit_v1_ok(block, crc32_sum)
            ):
                problems.append(f"journal recovery: commit block of {seq}: checksum mismatch")
                break
            crc32_sum = 0xFFFFFFFF
            logged += pending
            pending = []
            revokes += pending_revokes
            pending_revokes = []
            found += 1
            seq = (seq + 1) & 0xFFFFFFFF
        else:
            break
        pos = advance(pos)
    homes = {entry[0] for entry in logged}
    revoked: dict[int, int] = {}
    for rpos, by_seq in revokes:
        with contextlib.suppress(Ext4FormatError):
            for blk in parse_revoke_blocks(read_jblock(rpos), incompat):
                if blk in homes:
                    revoked[blk] = by_seq
    magic_bytes = struct.pack(">I", C.JBD2_MAGIC_NUMBER)
    out: list[tuple[int, bytes]] = []
    for home, jblk, escaped, tseq, tag in logged:
        rseq = revoked.get(home)
        if rseq is not None and (rseq - tseq) % (1 << 32) < 1 << 31:
            continue  # revoked at or after the transaction that logged it
        try:
            data = read_jblock(jblk)
        except Ext4FormatError:
            continue
        if not csum.tag_ok(tag, data, tseq):
            problems.append(
                f"journal recovery: logged copy of block {home} (journal block {jblk}):"
                " checksum mismatch, not replayed"
            )
            continue
        out.append((home, magic_bytes + data[4:] if escaped else data))
    return out, found
