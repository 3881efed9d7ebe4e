"""Settling: turn the metadata blocks changed since the last settle into file-level events.

Called by :class:`~blocktrace.ext4.engine.Ext4Engine` at each JBD2 commit, each flush and at the
end of the stream.  Steps, in order (each depends on the one before):

1. classify every dirty block by its owner *before* the change: changed inode slots (inode
   tables), trees to re-map (extent/indirect blocks), directory blocks, xattr blocks;
2. re-decode each changed inode and re-map it: ownership follows the new block map; newly
   mapped data blocks claim their pending writes; directories gain/lose blocks to re-read;
3. re-read the changed directory blocks and net the entries over the whole settle:
   ``(dir, name, ino)`` triples that disappeared and appeared;
4. pair them per inode: appeared on a new inode = create/mkdir/symlink, extra names = link,
   disappeared + appeared on the same inode = rename, only disappeared = delete/rmdir;
5. attribute changes of inodes alive before and after: chmod, chown, truncate, xattr;
6. the coalesced data writes, clipped to the file size.

Inode generation numbers tell a reused inode number from the old one.  Reserved inodes (below
``s_first_ino``, except the root) never produce events.

Structure: :class:`Settle` is one settle, one method per step, its intermediate results held
as named attributes (what each step hands the next).  It reaches the engine only through
:class:`Model`, the part of the engine settling reads and updates (the model of the file
system: view, ownership, namespace, inode states, pending data), so what a settle may touch is
declared, and checked by mypy, rather than reached through private attributes.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Protocol

from blocktrace.errors import FormatError
from blocktrace.ext4 import constants as C
from blocktrace.ext4.events import FileEvent
from blocktrace.ext4.fs import DirEntry, Ext4FS, InodeMap
from blocktrace.ext4.namespace import Namespace
from blocktrace.ext4.ownership import OwnerKind, OwnershipMap
from blocktrace.ext4.structs import Extent, Inode

Triple = tuple[int, str, int]  # (directory inode, name, inode)
_NO_MAP = InodeMap()  #: the (never mutated) map of an inode not known before


@dataclass(slots=True)
class IState:
    """What the engine remembers of a live inode: decoded, mapped, and its raw bytes."""

    inode: Inode
    map: InodeMap
    raw: bytes


class Model(Protocol):
    """What a settle reads and updates of the engine (:class:`~.engine.Ext4Engine`)."""

    name: str  #: the file system's name in events ("" or "p1"...)
    fs: Ext4FS
    owners: OwnershipMap
    ns: Namespace
    istate: dict[int, IState]  #: live inodes
    dir_entries: dict[int, tuple[int, list[DirEntry]]]  #: block -> (directory, entries)
    writes: dict[int, list[list[int]]]  #: ino -> [[lstart, lend, first record]] to report
    written_upto: OrderedDict[int, int]  #: ino -> end of data written since its size changed
    unborn: OrderedDict[int, list[Triple]]  #: names seen before their inode was initialised
    nameless: OrderedDict[int, None]  #: initialised inodes not named yet
    freed_modes: OrderedDict[int, int]  #: i_mode of freed inodes

    def read_block(self, n: int) -> bytes: ...
    def read_dir_block(self, pblk: int) -> list[DirEntry]: ...
    def error(self, record: int, message: str, ino: int = 0) -> None: ...
    def track(self, ino: int) -> bool: ...
    def claim(self, ino: int, inode: Inode, imap: InodeMap) -> None: ...
    def release(self, ino: int, st: IState) -> None: ...
    def claim_pending(self, pblk: int, n: int) -> list[tuple[int, int, int]]: ...
    def note_write(self, ino: int, lstart: int, lend: int, record: int) -> None: ...
    def note_unborn(self, triple: Triple) -> None: ...
    def note_nameless(self, ino: int) -> None: ...
    def remember_freed(self, ino: int, inode: Inode | None) -> None: ...


def _new_runs(old: list[Extent], new: list[Extent]) -> list[tuple[int, int, int]]:
    """(lblk, pblk, count) runs mapped in ``new`` but not (identically) in ``old``."""
    out: list[tuple[int, int, int]] = []
    for e in new:
        pieces = [(e.lblk, e.lblk + e.length)]
        for o in old:
            if o.pblk - o.lblk != e.pblk - e.lblk:
                continue
            nxt = []
            for s, t in pieces:
                lo, hi = max(s, o.lblk), min(t, o.lblk + o.length)
                if lo >= hi:
                    nxt.append((s, t))
                    continue
                if s < lo:
                    nxt.append((s, lo))
                if hi < t:
                    nxt.append((hi, t))
            pieces = nxt
        out += [(s, e.pblk + s - e.lblk, t - s) for s, t in pieces]
    return out


def _blocks(runs: list[tuple[int, int, int]]) -> list[int]:
    return [p + i for _, p, n in runs for i in range(n)]


def _xattr_area(raw: bytes) -> bytes:
    if len(raw) <= C.EXT4_GOOD_OLD_INODE_SIZE + 2:
        return b""
    extra = int.from_bytes(raw[128:130], "little")
    return raw[C.EXT4_GOOD_OLD_INODE_SIZE + extra :]


def infer(
    model: Model, dirty: dict[int, bytes], record: int, *, emit_writes: bool = True
) -> list[FileEvent]:
    """The events of the metadata blocks changed since the last settle (``dirty``: block ->
    its content before), revealed by record ``record``.  ``emit_writes`` False keeps the file
    writes noted so far for the next settle."""
    settle = Settle(model, record)
    if not dirty:  # no metadata changed (a flush between data writes): only the writes
        return settle.write_events() if emit_writes and model.writes else []
    return settle.run(dirty, emit_writes=emit_writes)


Change = tuple[Inode | None, Inode, bytes]  #: (old inode, new inode, old raw bytes)


class Settle:
    """One settle.  Attributes are what the steps hand each other, in step order."""

    def __init__(self, model: Model, record: int) -> None:
        self.m = model
        self.record = record
        # 1. classify
        self.old_raw: dict[int, bytes] = {}  #: changed inode slots: ino -> old raw bytes
        self.remap: set[int] = set()  #: inodes whose extent/indirect blocks changed
        self.dir_blocks: set[int] = set()  #: directory blocks to re-read
        self.xattr_changed: set[int] = set()
        # 2. inodes
        self.changes: dict[int, Change] = {}
        self.newly: dict[int, list[tuple[int, int, int]]] = {}  #: ino -> newly mapped runs
        # 3. directories
        self.removed: list[Triple] = []
        self.added: list[Triple] = []
        # 4. life cycle
        self.allocated: set[int] = set()
        self.freed: set[int] = set()
        self.old_modes: dict[int, int] = {}
        self.rem_paths: dict[Triple, str] = {}
        self.freed_paths: dict[int, str] = {}
        self.deferred: set[Triple] = set()  #: names whose inode is not initialised yet
        self.zeroed_tail: dict[int, int] = {}  #: ino -> block a truncate zeroed the tail of

    def run(self, dirty: dict[int, bytes], *, emit_writes: bool) -> list[FileEvent]:
        self.classify(dirty)
        self.remap_inodes()
        self.diff_directories()
        self.life_cycle()
        self.apply_names()
        creates, links, renames, deletes = self.namespace_events()
        attrs = self.attribute_events()
        writes = self.write_events() if emit_writes else []
        creates.sort(key=lambda e: e.path.count("/"))
        deletes.sort(key=lambda e: -e.path.count("/"))
        return creates + links + renames + writes + attrs + deletes

    def alive(self, ino: int) -> Inode | None:
        st = self.m.istate.get(ino)
        return st.inode if st else None

    # 1. ----------------------------------------------------------------------------------
    def classify(self, dirty: dict[int, bytes]) -> None:
        """Every changed dirty block by its owner before the change."""
        m = self.m
        fs = m.fs
        bs, isz = fs.block_size, fs.inode_size
        old_raw, owners = self.old_raw, m.owners
        for b, old in dirty.items():
            new = m.read_block(b)
            if new == old:
                continue
            owner = owners.lookup(b)
            if owner is None:
                continue
            okind = owner.kind
            if okind is OwnerKind.INODE_TABLE:
                for off in range(0, bs - isz + 1, isz):
                    if old[off : off + isz] != new[off : off + isz]:
                        old_raw.setdefault(fs.inode_at(b, off), old[off : off + isz])
            elif okind in (OwnerKind.EXTENT, OwnerKind.INDIRECT):
                self.remap.add(owner.ino)
            elif okind is OwnerKind.DIR:
                self.dir_blocks.add(b)
            elif okind is OwnerKind.XATTR:
                self.xattr_changed.add(owner.ino)

    # 2. ----------------------------------------------------------------------------------
    def remap_inodes(self) -> None:
        """Re-decode and re-map each changed inode; ownership follows, newly mapped data blocks
        claim their pending writes, directories gain/lose blocks to re-read."""
        m, record = self.m, self.record
        fs = m.fs
        for ino in sorted(set(self.old_raw) | self.remap):
            if ino != C.EXT4_ROOT_INO and ino < fs.first_ino:
                continue
            prev = m.istate.get(ino)
            before_raw = prev.raw if prev else self.old_raw.get(ino, b"")
            before: Inode | None = prev.inode if prev else None
            if before is None and before_raw:
                try:
                    before = Inode.parse(before_raw)
                except FormatError:
                    before = None
            try:
                raw = fs.read_inode_bytes(ino)
                after = Inode.parse(raw)
            except FormatError as exc:
                m.error(record, f"inode {ino}: {exc}", ino)
                continue
            old_map = prev.map if prev else _NO_MAP
            if prev is not None:
                m.release(ino, prev)
            if after.in_use:
                self._remap_live(ino, prev, after, raw, old_map)
            elif prev is not None:
                m.istate.pop(ino, None)
                if prev.inode.is_dir:
                    self.dir_blocks.update(
                        p for e in prev.map.extents for p in range(e.pblk, e.pblk + e.length)
                    )
            self.changes[ino] = (before, after, before_raw)

    def _remap_live(
        self, ino: int, prev: IState | None, after: Inode, raw: bytes, old_map: InodeMap
    ) -> None:
        m = self.m
        try:
            new_map = m.fs.map_inode(after)
        except FormatError as exc:
            m.error(self.record, f"inode {ino} block map: {exc}", ino)
            new_map = old_map if prev else InodeMap()
        m.istate[ino] = IState(after, new_map, raw)
        m.claim(ino, after, new_map)
        runs = _new_runs(old_map.extents, new_map.extents)
        self.newly[ino] = runs
        if after.is_dir or (prev is not None and prev.inode.is_dir):
            self.dir_blocks.update(_blocks(runs))
            self.dir_blocks.update(_blocks(_new_runs(new_map.extents, old_map.extents)))
        elif after.is_reg:
            for lblk, pblk, n in runs:
                for i, j, first_rec in m.claim_pending(pblk, n):
                    m.note_write(ino, lblk + i, lblk + j, first_rec)

    # 3. ----------------------------------------------------------------------------------
    def diff_directories(self) -> None:
        """Re-read the changed directory blocks; net the entries over the whole settle."""
        m = self.m
        old_set: set[Triple] = set()
        new_set: set[Triple] = set()
        for b in sorted(self.dir_blocks):
            known = m.dir_entries.pop(b, None)
            if known is not None:
                d, entries = known
                old_set.update((d, e.name, e.inode) for e in entries if e.name not in (".", ".."))
            owner = m.owners.lookup(b)
            if owner is not None and owner.kind is OwnerKind.DIR:
                entries = m.read_dir_block(b)
                m.dir_entries[b] = (owner.ino, entries)
                new_set.update(
                    (owner.ino, e.name, e.inode) for e in entries if e.name not in (".", "..")
                )
        self.removed = sorted(old_set - new_set)
        self.added = sorted(new_set - old_set)

    # 4. ----------------------------------------------------------------------------------
    def life_cycle(self) -> None:
        """Which inodes were born and which died, and what the vanished names were."""
        m, changes = self.m, self.changes
        self.allocated = {
            ino
            for ino, (o, n, _) in changes.items()
            if n.in_use and (o is None or not o.in_use or o.i_generation != n.i_generation)
        }
        self.freed = {
            ino for ino, (o, n, _) in changes.items() if o is not None and o.in_use and not n.in_use
        }
        for ino in self.freed:
            m.remember_freed(ino, changes[ino][0])
            m.nameless.pop(ino, None)
        # names written before their inode (writers without a journal, flushing in between)
        added = self.added
        for ino in sorted(self.allocated):
            for t in m.unborn.pop(ino, []):
                if t not in added and m.ns.children.get(t[0], {}).get(t[1]) == ino:
                    added.append(t)
        for _, _, ino in self.removed:
            was = changes[ino][0] or changes[ino][1] if ino in changes else self.alive(ino)
            self.old_modes[ino] = was.i_mode if was is not None else m.freed_modes.get(ino, 0)
        self.rem_paths = {t: m.ns.join(t[0], t[1]) for t in self.removed}
        self.freed_paths = {ino: m.ns.path(ino) for ino in self.freed}

    def apply_names(self) -> None:
        """Update the namespace; inodes initialised before their first name are born when
        named (same writers)."""
        m = self.m
        named = {t[2] for t in self.added}
        for ino in named & set(m.nameless):
            del m.nameless[ino]
            self.allocated.add(ino)
        for ino in self.allocated - named:
            m.note_nameless(ino)
        for d, name, ino in self.removed:
            m.ns.remove(d, name, ino)
            if ino in m.unborn:
                m.unborn[ino] = [t for t in m.unborn[ino] if t != (d, name, ino)]
        for d, name, ino in self.added:
            if ino not in m.istate:
                m.track(ino)
            m.ns.add(d, name, ino)
            if ino not in m.istate:
                m.note_unborn((d, name, ino))
                self.deferred.add((d, name, ino))
        for ino in self.freed:
            m.ns.forget(ino)

    # 5. ----------------------------------------------------------------------------------
    def namespace_events(
        self,
    ) -> tuple[list[FileEvent], list[FileEvent], list[FileEvent], list[FileEvent]]:
        """(creates, links, renames, deletes): names paired per inode."""
        creates: list[FileEvent] = []
        links: list[FileEvent] = []
        renames: list[FileEvent] = []
        deletes: list[FileEvent] = []
        rem_by: dict[int, list[Triple]] = {}
        for t in self.removed:
            rem_by.setdefault(t[2], []).append(t)
        add_by: dict[int, list[Triple]] = {}
        for t in self.added:
            if t not in self.deferred:
                add_by.setdefault(t[2], []).append(t)
        for ino, adds in add_by.items():
            rems = rem_by.pop(ino, [])
            inode = self.alive(ino)
            if ino in self.allocated and inode is not None and (not rems or self._reborn(ino)):
                self._created(ino, inode, adds, creates, links)
                if rems:  # the old file's names: deleted, not renamed to the new file
                    rem_by[ino] = rems
                continue
            rem_by[ino] = self._moved(ino, rems, adds, renames, links)
        for ino, rems in rem_by.items():
            deletes += self._deleted(ino, rems)
        return creates, links, renames, deletes

    def _reborn(self, ino: int) -> bool:
        """The inode number was freed and given to a new file in this record (its old
        contents were in use and the new ones carry another generation).  The kernel reuses
        a freed inode number at once, so ``rm a; echo > b`` in one transaction removes a name
        of ``ino`` and adds one: that is a delete and a create, not a rename."""
        old, new, _ = self.changes.get(ino, (None, None, b""))
        if old is None or new is None:
            return False
        return old.in_use and new.in_use and old.i_generation != new.i_generation

    def _created(
        self,
        ino: int,
        inode: Inode,
        adds: list[Triple],
        creates: list[FileEvent],
        links: list[FileEvent],
    ) -> None:
        m, record, name = self.m, self.record, self.m.name
        paths = [m.ns.join(d, nm) for d, nm, _ in adds]
        ekind = "mkdir" if inode.is_dir else "symlink" if inode.is_symlink else "create"
        target = None
        if inode.is_symlink:
            try:
                target = m.fs.symlink_target(inode)
            except FormatError as exc:
                m.error(record, f"symlink {ino}: {exc}", ino)
        creates.append(
            FileEvent(
                ekind,
                paths[0],
                ino,
                record,
                float(inode.i_ctime),
                name,
                target=target,
                mode=inode.i_mode,
                size=inode.size,
                uid=inode.uid,
                gid=inode.gid,
            )
        )
        links += [
            FileEvent("link", p, ino, record, float(inode.i_ctime), name, target=paths[0])
            for p in paths[1:]
        ]

    def _moved(
        self,
        ino: int,
        rems: list[Triple],
        adds: list[Triple],
        renames: list[FileEvent],
        links: list[FileEvent],
    ) -> list[Triple]:
        """Renames and new links of an inode that had names; returns its unpaired vanished
        names (deletes)."""
        m, record, name = self.m, self.record, self.m.name
        pairs = _pair(m, rems, adds)
        for gone, nt in pairs:
            renames.append(
                FileEvent(
                    "rename",
                    m.ns.join(nt[0], nt[1]),
                    ino,
                    record,
                    self.dir_time(nt[0]),
                    name,
                    old_path=self.rem_paths[gone],
                )
            )
        paired = {t for pair in pairs for t in pair}
        for d, nm, _ in adds:
            if (d, nm, ino) in paired:
                continue
            p = m.ns.join(d, nm)
            existing = [q for q in (m.ns.join(*lk) for lk in m.ns.links(ino)) if q != p]
            links.append(
                FileEvent(
                    "link",
                    p,
                    ino,
                    record,
                    self.dir_time(d),
                    name,
                    target=existing[0] if existing else None,
                )
            )
        return [t for t in rems if t not in paired]

    def _deleted(self, ino: int, rems: list[Triple]) -> list[FileEvent]:
        mode = self.old_modes.get(ino, 0)
        dkind = "rmdir" if mode & C.S_IFMT == C.S_IFDIR else "delete"
        gone_inode = self.changes[ino][1] if ino in self.changes else self.alive(ino)
        when = None
        if gone_inode is not None:
            when = float(gone_inode.i_dtime or gone_inode.i_ctime)
        return [
            FileEvent(dkind, self.rem_paths[tr], ino, self.record, when, self.m.name) for tr in rems
        ]

    def dir_time(self, d: int) -> float | None:
        inode = self.alive(d)
        return float(inode.i_mtime) if inode else None

    # 6. ----------------------------------------------------------------------------------
    def attribute_events(self) -> list[FileEvent]:
        """chmod, chown, truncate, xattr of inodes alive before and after."""
        m, record, name = self.m, self.record, self.m.name
        attrs: list[FileEvent] = []
        for ino, (bi, ai, before_raw) in self.changes.items():
            if (
                bi is None
                or ino in self.allocated
                or ino in self.freed
                or not (bi.in_use and ai.in_use)
            ):
                continue
            path = m.ns.path(ino)
            ts = float(ai.i_ctime)
            if bi.i_mode & 0o7777 != ai.i_mode & 0o7777:
                attrs.append(FileEvent("chmod", path, ino, record, ts, name, mode=ai.i_mode))
            if (bi.uid, bi.gid) != (ai.uid, ai.gid):
                attrs.append(
                    FileEvent("chown", path, ino, record, ts, name, uid=ai.uid, gid=ai.gid)
                )
            if (
                ai.is_reg
                and ai.size != bi.size
                and (ai.size < bi.size or not _explained(m, ino, ai.size, self.newly.get(ino, [])))
            ):
                attrs.append(FileEvent("truncate", path, ino, record, ts, name, size=ai.size))
                # the kernel zeroes the tail of the block holding the old (growing) or the new
                # (shrinking) end of file: that block write is part of the truncate
                eof = min(ai.size, bi.size)
                if eof % m.fs.block_size:
                    self.zeroed_tail[ino] = eof // m.fs.block_size
            if ai.size != bi.size:
                m.written_upto.pop(ino, None)
            st = m.istate.get(ino)
            if bi.file_acl != ai.file_acl or (
                st is not None and _xattr_area(before_raw) != _xattr_area(st.raw)
            ):
                self.xattr_changed.add(ino)
        for ino in sorted(self.xattr_changed - self.allocated - self.freed):
            inode = self.alive(ino)
            if inode is not None and (ino == C.EXT4_ROOT_INO or ino >= m.fs.first_ino):
                attrs.append(
                    FileEvent("xattr", m.ns.path(ino), ino, record, float(inode.i_ctime), name)
                )
        return attrs

    # 7. ----------------------------------------------------------------------------------
    def write_events(self) -> list[FileEvent]:
        """The coalesced data writes noted since the last settle, clipped to the file size."""
        m, record, name = self.m, self.record, self.m.name
        bs = m.fs.block_size
        writes: list[FileEvent] = []
        for ino, ranges in sorted(m.writes.items()):
            inode = self.alive(ino)
            path = self.freed_paths.get(ino) or m.ns.path(ino)
            for lstart, lend, drec in _merged(ranges):
                if self.zeroed_tail.get(ino) == lstart and lend == lstart + 1:
                    continue  # truncate's zeroing of the tail of the new last block
                offset, end = lstart * bs, lend * bs
                if inode is not None and offset < inode.size < end:
                    end = inode.size
                writes.append(
                    FileEvent(
                        "write",
                        path,
                        ino,
                        record,
                        float(inode.i_mtime) if inode else None,
                        name,
                        offset=offset,
                        length=end - offset,
                        data_record=drec,
                        size=inode.size if inode else None,
                    )
                )
        m.writes.clear()
        return writes


def _merged(ranges: list[list[int]]) -> list[tuple[int, int, int]]:
    """Sorted ``[start, end, first record]`` ranges with overlapping/adjacent ones joined."""
    out: list[tuple[int, int, int]] = []
    for s, e, rec in sorted(ranges):
        if out and s <= out[-1][1]:
            ps, pe, prec = out[-1]
            out[-1] = (ps, max(pe, e), min(prec, rec))
        else:
            out.append((s, e, rec))
    return out


def _mtime_ns(eng: Model, ino: int) -> int:
    """A directory's mtime in nanoseconds (the extra field when the inode has one)."""
    st = eng.istate.get(ino)
    if st is None:
        return 0
    ns = 0
    raw = st.raw
    if len(raw) >= 0x8C and int.from_bytes(raw[0x80:0x82], "little") >= 0x0C:
        ns = int.from_bytes(raw[0x88:0x8C], "little") >> 2
    return st.inode.i_mtime * 1_000_000_000 + ns


def _pair(eng: Model, rems: list[Triple], adds: list[Triple]) -> list[tuple[Triple, Triple]]:
    """Match vanished and new names of one inode into renames.

    Within one transaction a rename and a hard link (or an unlink) of the same inode are
    indistinguishable by content; the best evidence, in order: the same name (``mv a/x b/x``),
    the same directory, then directory mtimes closest in nanoseconds (a rename stamps both its
    directories with the same clock reading)."""
    scored = sorted(
        (
            r[1] != a[1],
            r[0] != a[0],
            abs(_mtime_ns(eng, r[0]) - _mtime_ns(eng, a[0])),
            r,
            a,
        )
        for r in rems
        for a in adds
    )
    pairs: list[tuple[Triple, Triple]] = []
    used: set[Triple] = set()
    for *_, r, a in scored:
        if r not in used and a not in used:
            pairs.append((r, a))
            used.update((r, a))
    return pairs


def _explained(eng: Model, ino: int, size: int, runs: list[tuple[int, int, int]]) -> bool:
    """Did data reach the new end of file in this settle (so growth is a write, not truncate)?"""
    last = (size - 1) // eng.fs.block_size
    if any(lblk <= last < lblk + n for lblk, _, n in runs):
        return True
    return eng.written_upto.get(ino, 0) > last
