"""The ext4 introspection engine: write records in, file-level events out (sans-IO).

Design
------
The engine keeps a *view* of the file system (base image + an overlay of the metadata blocks
the stream wrote) and a model derived from it: block ownership (:mod:`.ownership`), the
directory tree (:mod:`.namespace`), and each live inode's decoded form and block map.  Writes
are routed by the owner of each block they touch:

* **journal** blocks go to the :class:`~.journal.Journal`; a commit block applies the
  transaction's logged copies to their home blocks in the view and *settles* at once;
* **metadata** blocks (inode tables, directories, extent/indirect blocks, xattr blocks...) are
  stored in the view and remembered as dirty with their previous content;
* **data** blocks of a known file become ``write`` events (coalesced per inode);
* **unowned** blocks are *pending*: data written before the metadata that will own it
  (delayed allocation writes data, then commits the extent).

*Settling* (at a JBD2 commit, at a flush, and at the end of the stream) diffs every dirty block
against its previous content: changed inode slots, changed directory entries and re-mapped
block maps become events; newly mapped blocks claim their pending writes.  Directory changes
are netted per settle, so an entry that moved between htree blocks is not an event, and an entry
that left one name and appeared under another is a ``rename``.

Pending data (bounded memory: ``max_pending`` blocks, ``max_pending_bytes`` of contents) is
:class:`~.pending.PendingData`; the contents matter only if a block later turns out to be
metadata written outside the journal (e.g. a symlink target on an old kernel), attribution of
file writes needs only the number.  Settling is :mod:`.infer`, which sees the engine through
its :class:`~.infer.Model` protocol.
"""

from __future__ import annotations

import logging
import struct
from collections import OrderedDict
from dataclasses import dataclass

from blocktrace.errors import FormatError
from blocktrace.ext4 import constants as C
from blocktrace.ext4.events import FileEvent
from blocktrace.ext4.fs import (
    DEFAULT_WORK_BUDGET,
    ByteSource,
    DirEntry,
    Ext4FS,
    InodeMap,
    superblock_from_bytes,
)
from blocktrace.ext4.infer import IState, infer
from blocktrace.ext4.journal import Journal, Transaction, recover
from blocktrace.ext4.namespace import Namespace
from blocktrace.ext4.ownership import Owner, OwnerKind, OwnershipMap
from blocktrace.ext4.pending import PendingData
from blocktrace.ext4.structs import Ext4FormatError, Inode

log = logging.getLogger(__name__)

DEFAULT_MAX_PENDING = 1 << 18  #: unowned blocks remembered (about 25 MiB of bookkeeping)
DEFAULT_MAX_PENDING_BYTES = 64 << 20  #: contents of pending blocks kept
MAX_REMEMBERED = 1 << 16  #: names of unborn inodes / modes of freed inodes kept

_META_KINDS = {
    "superblock": OwnerKind.SUPERBLOCK,
    "group_desc": OwnerKind.GROUP_DESC,
    "block_bitmap": OwnerKind.BLOCK_BITMAP,
    "inode_bitmap": OwnerKind.INODE_BITMAP,
    "inode_table": OwnerKind.INODE_TABLE,
}
_TREE_KINDS = {"extent": OwnerKind.EXTENT, "indirect": OwnerKind.INDIRECT}


@dataclass(slots=True)
class EngineStats:
    records: int = 0
    bytes: int = 0
    settles: int = 0
    transactions: int = 0
    events: int = 0
    errors: int = 0
    pending_blocks: int = 0
    pending_bytes: int = 0
    pending_overflow: int = 0  #: unowned blocks forgotten (attribution lost)
    pending_data_dropped: int = 0  #: pending contents dropped (attribution kept)
    attributed: int = 0  #: pending blocks later claimed by a file
    recovered_transactions: int = 0  #: journal transactions replayed into the base at start
    bad_transactions: int = 0  #: committed journal transactions not applied (checksum failed)


class Ext4Engine:
    """Follows one ext4 file system through its write stream.  Not thread-safe."""

    def __init__(
        self,
        source: ByteSource,
        *,
        name: str = "",
        max_pending: int = DEFAULT_MAX_PENDING,
        max_pending_bytes: int = DEFAULT_MAX_PENDING_BYTES,
        work_budget: int = DEFAULT_WORK_BUDGET,
    ) -> None:
        """``work_budget``: decoding steps (tree nodes, extents, block pointers, directory
        entries) one record may cost, and the crawl per directory block or inode; beyond it the
        structures still to decode are reported as ``error`` events (hostile metadata)."""
        self.name = name
        self.work_budget = work_budget
        self.source = source
        self.stats = EngineStats()
        sb = superblock_from_bytes(source.pread(C.EXT4_SUPERBLOCK_OFFSET, 1024))
        self.block_size = 1024 << sb.s_log_block_size
        self.overlay: dict[int, bytes] = {}
        self.pend = PendingData(
            self.stats, self.block_size, max_pending, max_pending_bytes, self._block_bytes
        )
        self.pending = self.pend.blocks  #: block -> record that wrote it (the same dicts)
        self.pending_data = self.pend.data
        self.fs = Ext4FS(sb, self, device_bytes=source.length)
        self.owners = OwnershipMap()
        self.ns = Namespace()
        self.istate: dict[int, IState] = {}
        self.dir_entries: dict[int, tuple[int, list[DirEntry]]] = {}  # block -> (dir, entries)
        self.dirty: dict[int, bytes] = {}
        self.writes: dict[int, list[list[int]]] = {}  # ino -> [[lstart, lend, data_record]]
        self.journal: Journal | None = None
        self._journal_blocks: dict[int, int] = {}  # jblk -> physical block
        #: the last transaction replayed into the base at start (None: none was)
        self._recovered_last: int | None = None
        self._errors: list[FileEvent] = []
        #: names seen before their inode was initialised: ino -> [(dir, name, ino)]
        self.unborn: OrderedDict[int, list[tuple[int, str, int]]] = OrderedDict()
        self.freed_modes: OrderedDict[int, int] = OrderedDict()  # ino -> i_mode when freed
        self.nameless: OrderedDict[int, None] = OrderedDict()  # initialised, not yet named
        #: per inode, the end (in blocks) of data written since its size last changed
        self.written_upto: OrderedDict[int, int] = OrderedDict()
        self._crawl()

    # ------------------------------------------------------------------ view
    def read_block(self, n: int) -> bytes:
        data = self.overlay.get(n)
        if data is None:
            data = self.pend.contents(n)
            if data is None:
                data = self.source.pread(n * self.block_size, self.block_size)
        return data

    # ------------------------------------------------------------------ public API
    def write(self, record: int, offset: int, data: bytes | memoryview) -> list[FileEvent]:
        """A write of ``data`` at byte ``offset`` of the file system, record number ``record``."""
        self.stats.records += 1
        self.stats.bytes += len(data)
        self.fs.work_left = self.work_budget
        out: list[FileEvent] = []
        if not data or offset < 0:
            return out
        bs = self.block_size
        first, last = offset // bs, (offset + len(data) - 1) // bs
        last = min(last, self.fs.blocks_count - 1)
        mv = memoryview(data)
        for start, end, owner in self.owners.overlaps(first, last + 1):
            if owner is not None and owner.kind is OwnerKind.DATA:
                self.note_write(owner.ino, owner.lblk, owner.lblk + end - start, record)
                self.pend.forget_range(start, end)
                continue
            if owner is None:
                self.pend.run(start, end, record, offset, mv)
                continue
            for b in range(start, end):
                block = self._block_bytes(b, offset, mv)
                if owner.kind is OwnerKind.JOURNAL:
                    out += self._journal_write(record, owner.lblk + b - start, b, block)
                else:
                    self._meta_write(b, block)
        return out

    def zero(self, record: int, offset: int, length: int) -> list[FileEvent]:
        """A write of zeroes (no payload carried): as a write, without materialising it.

        Zeroes are data like any other: a guest's zero-filled file data reaches the disk as
        WRITE_ZEROES when QEMU's ``detect-zeroes`` turns it into one, so zeroed free space is
        pending (data before its extent) exactly as written free space is."""
        self.stats.records += 1
        self.fs.work_left = self.work_budget
        bs = self.block_size
        out: list[FileEvent] = []
        if offset < 0 or length <= 0:
            return out
        first, end = offset // bs, min(-(-(offset + length) // bs), self.fs.blocks_count)
        zero_block = bytes(bs)
        for start, stop, owner in self.owners.overlaps(first, end):
            if owner is not None and owner.kind is OwnerKind.DATA:
                self.note_write(owner.ino, owner.lblk, owner.lblk + stop - start, record)
                self.pend.forget_range(start, stop)
                continue
            if owner is None:
                self.pend.zeroed(start, stop, record)
                continue
            for b in range(start, stop):
                lo, hi = max(offset, b * bs), min(offset + length, (b + 1) * bs)
                out += self.write(record, lo, zero_block[: hi - lo])
                self.stats.records -= 1
                self.stats.bytes -= hi - lo
        return out

    def flush(self, record: int) -> list[FileEvent]:
        """A flush: everything written so far is durable, so every inference is due now.

        Exception: while a JBD2 transaction is being written (descriptor seen, commit not yet),
        this flush is the commit's pre-flush; file writes wait for the commit block (the next
        record or so) so that they are named with the metadata they go with."""
        self.stats.records += 1
        self.fs.work_left = self.work_budget
        hold = self.journal is not None and self.journal.in_transaction
        return self._settle(record, emit_writes=not hold)

    def discard(self, record: int, offset: int, length: int) -> list[FileEvent]:
        """A discard/trim.  ext4 discards free blocks (forget pending writes there); a trim of
        a live file's blocks changes what the file reads back, so it is a ``write`` of it."""
        self.stats.records += 1
        bs = self.block_size
        first, end = -(-offset // bs), min((offset + length) // bs, self.fs.blocks_count)
        if offset < 0 or first >= end:
            return []
        for start, stop, owner in self.owners.overlaps(first, end):
            if owner is not None and owner.kind is OwnerKind.DATA:
                self.note_write(owner.ino, owner.lblk, owner.lblk + stop - start, record)
        self.pend.forget_range(first, end)
        return []

    def finish(self, record: int) -> list[FileEvent]:
        """End of the stream: settle what is left."""
        self.fs.work_left = self.work_budget
        return self._settle(record)

    def owner_of(self, block: int) -> Owner | None:
        """Which structure owns file-system block ``block`` (None: free or unknown)."""
        return self.owners.lookup(block)

    def path_of(self, ino: int) -> str:
        return self.ns.path(ino)

    def take_errors(self) -> list[FileEvent]:
        errs, self._errors = self._errors, []
        return errs

    # ------------------------------------------------------------------ crawl
    def _crawl(self) -> None:
        """Build the model from the base image: static metadata, journal, tree from the root."""
        for start, count, kind, group in self.fs.static_metadata():
            self.owners.assign(start, count, Owner(_META_KINDS[kind], group=group))
        if self.fs.journal_inum:
            self._open_journal()
        if self.journal is not None:
            self._recover_journal()
        queue = [C.EXT4_ROOT_INO]
        fs = self.fs
        budget = self.work_budget
        fs.work_left = budget
        self.track(C.EXT4_ROOT_INO)
        while queue:
            d = queue.pop()
            st = self.istate.get(d)
            if st is None or not st.inode.is_dir:
                continue
            for ext in st.map.extents:
                for i in range(ext.length):
                    pblk = ext.pblk + i
                    fs.work_left = budget  # the crawl's budget: per directory block, per inode
                    entries = self.read_dir_block(pblk)
                    self.dir_entries[pblk] = (d, entries)
                    for e in entries:
                        if e.name in (".", ".."):
                            continue
                        known = e.inode in self.istate
                        self.ns.add(d, e.name, e.inode)
                        fs.work_left = budget
                        if not known and self.track(e.inode) and self.istate[e.inode].inode.is_dir:
                            queue.append(e.inode)

    def _open_journal(self) -> None:
        ino = self.fs.journal_inum
        try:
            inode = self.fs.read_inode(ino)
            jmap = self.fs.map_inode(inode)
            # the journal is as long as its inode says: mappings past i_size are not journal
            # blocks (the tree itself is already bounded: in order, no overlap, <= the fs)
            length = -(-inode.size // self.block_size)
            for ext in jmap.extents:
                n = min(ext.length, length - ext.lblk)
                if n <= 0:
                    continue
                self.owners.assign(ext.pblk, n, Owner(OwnerKind.JOURNAL, ino, ext.lblk))
                for i in range(n):
                    self._journal_blocks[ext.lblk + i] = ext.pblk + i
            for pblk, tree in jmap.meta:
                self.owners.assign(pblk, 1, Owner(_TREE_KINDS[tree], ino))
            sb_blk = self._journal_blocks.get(0)
            if sb_blk is None:
                raise Ext4FormatError("journal inode has no block 0")
            self.journal = Journal(
                self.read_block(sb_blk), len(self._journal_blocks), self._read_jblock
            )
        except FormatError as exc:
            self.error(-1, f"journal not followed: {exc}", ino)

    def _recover_journal(self) -> None:
        """A base image taken while mounted: replay its committed transactions into the view
        (not as events: they happened before the stream began)."""
        assert self.journal is not None
        problems: list[str] = []
        replay, found = recover(self.journal.jsb, self._read_jblock, problems)
        for problem in problems:
            self.journal.stats.checksum_errors += 1
            self.error(-1, problem)
        for home, data in replay:
            owner = self.owners.lookup(home)
            if home < self.fs.blocks_count and not (owner and owner.kind is OwnerKind.JOURNAL):
                self.overlay[home] = data
        self.stats.recovered_transactions = found
        if found:
            self._recovered_last = (self.journal.jsb.s_sequence + found - 1) & 0xFFFFFFFF
        if replay:  # group descriptors may have been logged too
            self.fs.groups = self.fs.read_group_descs()

    def _read_jblock(self, jblk: int) -> bytes:
        pblk = self._journal_blocks.get(jblk)
        if pblk is None:
            raise Ext4FormatError(f"journal block {jblk} outside the journal")
        return self.read_block(pblk)

    def track(self, ino: int) -> bool:
        """Decode inode ``ino`` from the view, map it and claim its blocks; False if unusable."""
        try:
            raw = self.fs.read_inode_bytes(ino)
            inode = Inode.parse(raw)
            if not inode.in_use:
                return False
            imap = self.fs.map_inode(inode)
        except FormatError as exc:
            self.error(-1, f"inode {ino}: {exc}", ino)
            return False
        self.istate[ino] = IState(inode, imap, raw)
        self.claim(ino, inode, imap)
        return True

    def claim(self, ino: int, inode: Inode, imap: InodeMap) -> None:
        ftype = inode.i_mode & C.S_IFMT
        kind = (
            OwnerKind.DIR
            if ftype == C.S_IFDIR
            else OwnerKind.SYMLINK
            if ftype == C.S_IFLNK
            else OwnerKind.DATA
        )
        assign = self.owners.assign
        for ext in imap.extents:
            assign(ext.pblk, ext.length, Owner(kind, ino, ext.lblk))
        for pblk, tree in imap.meta:
            assign(pblk, 1, Owner(_TREE_KINDS[tree], ino))
        acl = inode.file_acl
        if acl and acl < self.fs.blocks_count:
            assign(acl, 1, Owner(OwnerKind.XATTR, ino))
        if kind is not OwnerKind.DATA:
            for ext in imap.extents:
                for b in range(ext.pblk, ext.pblk + ext.length):
                    self._adopt(b)
        for pblk, _ in imap.meta:
            self._adopt(pblk)

    def release(self, ino: int, st: IState) -> None:
        for ext in st.map.extents:
            self.owners.release(ext.pblk, ext.length, ino)
        for pblk, _ in st.map.meta:
            self.owners.release(pblk, 1, ino)
        if st.inode.file_acl:
            self.owners.release(st.inode.file_acl, 1, ino)

    def read_dir_block(self, pblk: int) -> list[DirEntry]:
        try:
            return self.fs.parse_dir_block(self.read_block(pblk))
        except FormatError as exc:
            self.error(-1, f"directory block {pblk}: {exc}")
            return []

    # ------------------------------------------------------------------ write routing
    def _block_bytes(self, b: int, offset: int, mv: memoryview) -> bytes:
        bs = self.block_size
        lo = b * bs - offset
        if lo >= 0 and lo + bs <= len(mv):
            return bytes(mv[lo : lo + bs])
        block = bytearray(self.read_block(b))
        src_lo, dst_lo = max(lo, 0), max(-lo, 0)
        n = min(bs - dst_lo, len(mv) - src_lo)
        block[dst_lo : dst_lo + n] = mv[src_lo : src_lo + n]
        return bytes(block)

    def _meta_write(self, b: int, block: bytes) -> None:
        if b not in self.dirty:
            self.dirty[b] = self.read_block(b)
        self.overlay[b] = block
        self.pend.forget(b)

    def _journal_write(self, record: int, jblk: int, b: int, block: bytes) -> list[FileEvent]:
        self.overlay[b] = block
        if self.journal is None:
            return []
        tx = self.journal.block_written(jblk, block)
        if tx is None:
            return []
        self.overlay.pop(b, None)  # the commit block itself is not needed again
        return self._apply_transaction(record, tx)

    def _apply_transaction(self, record: int, tx: Transaction) -> list[FileEvent]:
        self.stats.transactions += 1
        last = self._recovered_last
        if last is not None and (last - tx.sequence) & 0xFFFFFFFF < 1 << 31:
            # the base already holds this commit (a base newer than the stream's start)
            self.error(
                record,
                f"journal transaction {tx.sequence} was already in the base image (committed "
                "while it was read): its changes are not reported",
            )
        if tx.error is not None:  # torn or corrupt: nothing of it becomes an event
            self.stats.bad_transactions += 1
            self.error(record, f"journal transaction {tx.sequence} not applied: {tx.error}")
            for jblk in tx.descriptors:
                self.overlay.pop(self._journal_blocks.get(jblk, -1), None)
            return self._settle(record)
        used: list[int] = []
        magic = struct.pack(">I", C.JBD2_MAGIC_NUMBER)
        for home, jblk, escaped in tx.blocks:
            pblk = self._journal_blocks.get(jblk)
            if pblk is None or home >= self.fs.blocks_count:
                continue
            data = self.read_block(pblk)
            if escaped:
                data = magic + data[4:]
            owner = self.owners.lookup(home)
            if owner is not None and owner.kind is OwnerKind.JOURNAL:
                continue  # hostile: a transaction may not overwrite the journal itself
            self._meta_write(home, data)
            used.append(pblk)
        events = self._settle(record)
        for jblk in tx.descriptors:
            used.append(self._journal_blocks.get(jblk, -1))
        for pblk in used:  # logged copies are no longer needed once applied
            self.overlay.pop(pblk, None)
        return events

    def note_write(self, ino: int, lstart: int, lend: int, record: int) -> None:
        if lend > self.written_upto.get(ino, 0):
            self.written_upto[ino] = lend
            self.written_upto.move_to_end(ino)
            while len(self.written_upto) > MAX_REMEMBERED:
                self.written_upto.popitem(last=False)
        ranges = self.writes.setdefault(ino, [])
        if ranges:  # sequential writes extend the last range; the rest merge at emission
            r = ranges[-1]
            if r[0] <= lend and lstart <= r[1]:
                r[0], r[1] = min(r[0], lstart), max(r[1], lend)
                r[2] = min(r[2], record)
                return
        ranges.append([lstart, lend, record])

    def claim_pending(self, pblk: int, n: int) -> list[tuple[int, int, int]]:
        """Unpend blocks ``[pblk, pblk+n)``: see :meth:`PendingData.claim`."""
        return self.pend.claim(pblk, n)

    def _adopt(self, b: int) -> None:
        """A pending block turned out to be metadata: keep its contents in the view."""
        data = self.pend.contents(b)
        if data is not None and b not in self.overlay:
            self.overlay[b] = data
        self.pend.forget(b)

    def note_unborn(self, triple: tuple[int, str, int]) -> None:
        self.unborn.setdefault(triple[2], []).append(triple)
        while len(self.unborn) > MAX_REMEMBERED:
            self.unborn.popitem(last=False)

    def note_nameless(self, ino: int) -> None:
        self.nameless[ino] = None
        while len(self.nameless) > MAX_REMEMBERED:
            self.nameless.popitem(last=False)

    def remember_freed(self, ino: int, inode: Inode | None) -> None:
        if inode is not None:
            self.freed_modes[ino] = inode.i_mode
            while len(self.freed_modes) > MAX_REMEMBERED:
                self.freed_modes.popitem(last=False)

    def error(self, record: int, message: str, ino: int = 0) -> None:
        """Report what could not be parsed (as an ``error`` event at the next settle); go on."""
        self.stats.errors += 1
        log.debug("%s: %s", self.name or "ext4", message)
        self._errors.append(
            FileEvent("error", "", ino=ino, record=record, fs=self.name, message=message)
        )

    # ------------------------------------------------------------------ settle
    def _settle(self, record: int, *, emit_writes: bool = True) -> list[FileEvent]:
        self.stats.settles += 1
        dirty, self.dirty = self.dirty, {}
        try:
            events = infer(self, dirty, record, emit_writes=emit_writes)
        except (
            FormatError,
            ValueError,
            IndexError,
            KeyError,
            struct.error,
            RecursionError,
        ) as exc:  # the watcher must survive any image
            self.error(record, f"inference failed: {exc!r}")
            events = []
        events = self.take_errors() + events
        self.stats.events += len(events)
        return events
