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
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from blocktrace.errors import FormatError
from blocktrace.ext4 import constants as C
from blocktrace.ext4.events import FileEvent
from blocktrace.ext4.fs import InodeMap
from blocktrace.ext4.ownership import OwnerKind
from blocktrace.ext4.structs import Extent, Inode

if TYPE_CHECKING:
    from blocktrace.ext4.engine import Ext4Engine

Triple = tuple[int, str, int]  # (directory inode, name, inode)
_NO_MAP = InodeMap()  #: the (never mutated) map of an inode not known before


@dataclass(slots=True)
class IState:
    """What the engine remembers of a live inode: decoded, mapped, and its raw bytes."""

    inode: Inode
    map: InodeMap
    raw: bytes


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


def infer(eng: Ext4Engine, record: int, *, emit_writes: bool = True) -> list[FileEvent]:
    fs = eng.fs
    bs = fs.block_size
    isz = fs.inode_size
    dirty, eng.dirty = eng.dirty, {}

    # 1. classify -----------------------------------------------------------------------------
    old_raw: dict[int, bytes] = {}
    remap: set[int] = set()
    dir_blocks: set[int] = set()
    xattr_changed: set[int] = set()
    for b, old in dirty.items():
        new = eng.read_block(b)
        if new == old:
            continue
        owner = eng.owners.lookup(b)
        if owner is None:
            continue
        okind = owner.kind
        if okind is OwnerKind.INODE_TABLE:
            for off in range(0, bs - isz + 1, isz):
                if old[off : off + isz] != new[off : off + isz]:
                    old_raw.setdefault(fs.inode_at(b, off), old[off : off + isz])
        elif okind in (OwnerKind.EXTENT, OwnerKind.INDIRECT):
            remap.add(owner.ino)
        elif okind is OwnerKind.DIR:
            dir_blocks.add(b)
        elif okind is OwnerKind.XATTR:
            xattr_changed.add(owner.ino)

    # 2. inodes and block maps ------------------------------------------------------------------
    changes: dict[int, tuple[Inode | None, Inode, bytes]] = {}  # ino -> (old, new, old raw)
    newly: dict[int, list[tuple[int, int, int]]] = {}
    for ino in sorted(set(old_raw) | remap):
        if ino != C.EXT4_ROOT_INO and ino < fs.first_ino:
            continue
        prev = eng.istate.get(ino)
        before_raw = prev.raw if prev else old_raw.get(ino, b"")
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
            eng._error(record, f"inode {ino}: {exc}", ino)
            continue
        old_map = prev.map if prev else _NO_MAP
        if prev is not None:
            eng._release(ino, prev)
        if after.in_use:
            try:
                new_map = eng.fs.map_inode(after)
            except FormatError as exc:
                eng._error(record, f"inode {ino} block map: {exc}", ino)
                new_map = old_map if prev else InodeMap()
            eng.istate[ino] = IState(after, new_map, raw)
            eng._claim(ino, after, new_map)
            runs = _new_runs(old_map.extents, new_map.extents)
            newly[ino] = runs
            if after.is_dir or (prev is not None and prev.inode.is_dir):
                dir_blocks.update(_blocks(runs))
                dir_blocks.update(_blocks(_new_runs(new_map.extents, old_map.extents)))
            elif after.is_reg:
                for lblk, pblk, n in runs:
                    _attribute(eng, ino, lblk, pblk, n)
        else:
            if prev is not None:
                eng.istate.pop(ino, None)
                if prev.inode.is_dir:
                    dir_blocks.update(
                        p for e in prev.map.extents for p in range(e.pblk, e.pblk + e.length)
                    )
        changes[ino] = (before, after, before_raw)

    # 3. directory entries, netted over the settle -------------------------------------------
    old_set: set[Triple] = set()
    new_set: set[Triple] = set()
    for b in sorted(dir_blocks):
        known = eng.dir_entries.pop(b, None)
        if known is not None:
            d, entries = known
            old_set.update((d, e.name, e.inode) for e in entries if e.name not in (".", ".."))
        owner = eng.owners.lookup(b)
        if owner is not None and owner.kind is OwnerKind.DIR:
            entries = eng._read_dir_block(b)
            eng.dir_entries[b] = (owner.ino, entries)
            new_set.update(
                (owner.ino, e.name, e.inode) for e in entries if e.name not in (".", "..")
            )
    removed = sorted(old_set - new_set)
    added = sorted(new_set - old_set)

    def alive(ino: int) -> Inode | None:
        st = eng.istate.get(ino)
        return st.inode if st else None

    allocated = {
        ino
        for ino, (o, n, _) in changes.items()
        if n.in_use and (o is None or not o.in_use or o.i_generation != n.i_generation)
    }
    freed = {
        ino for ino, (o, n, _) in changes.items() if o is not None and o.in_use and not n.in_use
    }
    for ino in freed:
        eng.remember_freed(ino, changes[ino][0])
        eng.nameless.pop(ino, None)
    # names written before their inode (writers without a journal, flushing in between)
    for ino in sorted(allocated):
        for t in eng.unborn.pop(ino, []):
            if t not in added and eng.ns.children.get(t[0], {}).get(t[1]) == ino:
                added.append(t)
    old_modes: dict[int, int] = {}
    for _, _, ino in removed:
        was = changes[ino][0] or changes[ino][1] if ino in changes else alive(ino)
        old_modes[ino] = was.i_mode if was is not None else eng.freed_modes.get(ino, 0)
    rem_paths = {t: eng.ns.join(t[0], t[1]) for t in removed}
    freed_paths = {ino: eng.ns.path(ino) for ino in freed}

    # 4. namespace events ---------------------------------------------------------------------
    # inodes initialised before their first name (same writers): born when named
    named = {t[2] for t in added}
    for ino in named & set(eng.nameless):
        del eng.nameless[ino]
        allocated.add(ino)
    for ino in allocated - named:
        eng.note_nameless(ino)
    deferred: set[Triple] = set()
    for d, name, ino in removed:
        eng.ns.remove(d, name, ino)
        if ino in eng.unborn:
            eng.unborn[ino] = [t for t in eng.unborn[ino] if t != (d, name, ino)]
    for d, name, ino in added:
        if ino not in eng.istate:
            eng._track(ino)
        eng.ns.add(d, name, ino)
        if ino not in eng.istate:
            eng.note_unborn((d, name, ino))
            deferred.add((d, name, ino))
    for ino in freed:
        eng.ns.forget(ino)

    def dir_time(d: int) -> float | None:
        inode = alive(d)
        return float(inode.i_mtime) if inode else None

    creates: list[FileEvent] = []
    links: list[FileEvent] = []
    renames: list[FileEvent] = []
    deletes: list[FileEvent] = []
    name = eng.name
    rem_by: dict[int, list[Triple]] = {}
    for t in removed:
        rem_by.setdefault(t[2], []).append(t)
    add_by: dict[int, list[Triple]] = {}
    for t in added:
        if t not in deferred:
            add_by.setdefault(t[2], []).append(t)
    for ino, adds in add_by.items():
        rems = rem_by.pop(ino, [])
        inode = alive(ino)
        paths = [eng.ns.join(d, nm) for d, nm, _ in adds]
        if ino in allocated and not rems and inode is not None:
            ekind = "mkdir" if inode.is_dir else "symlink" if inode.is_symlink else "create"
            target = None
            if inode.is_symlink:
                try:
                    target = fs.symlink_target(inode)
                except FormatError as exc:
                    eng._error(record, f"symlink {ino}: {exc}", ino)
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
            continue
        pairs = _pair(eng, rems, adds)
        for gone, nt in pairs:
            renames.append(
                FileEvent(
                    "rename",
                    eng.ns.join(nt[0], nt[1]),
                    ino,
                    record,
                    dir_time(nt[0]),
                    name,
                    old_path=rem_paths[gone],
                )
            )
        paired = {t for pair in pairs for t in pair}
        for d, nm, _ in adds:
            if (d, nm, ino) in paired:
                continue
            p = eng.ns.join(d, nm)
            existing = [q for q in (eng.ns.join(*lk) for lk in eng.ns.links(ino)) if q != p]
            links.append(
                FileEvent(
                    "link",
                    p,
                    ino,
                    record,
                    dir_time(d),
                    name,
                    target=existing[0] if existing else None,
                )
            )
        rem_by[ino] = [t for t in rems if t not in paired]
    for ino, rems in rem_by.items():
        mode = old_modes.get(ino, 0)
        dkind = "rmdir" if mode & C.S_IFMT == C.S_IFDIR else "delete"
        gone_inode = changes[ino][1] if ino in changes else alive(ino)
        when = None
        if gone_inode is not None:
            when = float(gone_inode.i_dtime or gone_inode.i_ctime)
        for tr in rems:
            deletes.append(FileEvent(dkind, rem_paths[tr], ino, record, when, name))

    # 5. attribute changes ----------------------------------------------------------------------
    attrs: list[FileEvent] = []
    zeroed_tail: dict[int, int] = {}  # ino -> block a truncate zeroed the tail of
    for ino, (bi, ai, before_raw) in changes.items():
        if bi is None or ino in allocated or ino in freed or not (bi.in_use and ai.in_use):
            continue
        path = eng.ns.path(ino)
        ts = float(ai.i_ctime)
        if bi.i_mode & 0o7777 != ai.i_mode & 0o7777:
            attrs.append(FileEvent("chmod", path, ino, record, ts, name, mode=ai.i_mode))
        if (bi.uid, bi.gid) != (ai.uid, ai.gid):
            attrs.append(FileEvent("chown", path, ino, record, ts, name, uid=ai.uid, gid=ai.gid))
        if (
            ai.is_reg
            and ai.size != bi.size
            and (ai.size < bi.size or not _explained(eng, ino, ai.size, newly.get(ino, [])))
        ):
            attrs.append(FileEvent("truncate", path, ino, record, ts, name, size=ai.size))
            # the kernel zeroes the tail of the block holding the old (growing) or the new
            # (shrinking) end of file: that block write is part of the truncate
            eof = min(ai.size, bi.size)
            if eof % bs:
                zeroed_tail[ino] = eof // bs
        if ai.size != bi.size:
            eng.written_upto.pop(ino, None)
        st = eng.istate.get(ino)
        if bi.file_acl != ai.file_acl or (
            st is not None and _xattr_area(before_raw) != _xattr_area(st.raw)
        ):
            xattr_changed.add(ino)
    for ino in sorted(xattr_changed - allocated - freed):
        inode = alive(ino)
        if inode is not None and (ino == C.EXT4_ROOT_INO or ino >= fs.first_ino):
            attrs.append(
                FileEvent("xattr", eng.ns.path(ino), ino, record, float(inode.i_ctime), name)
            )

    # 6. data writes ----------------------------------------------------------------------------
    writes: list[FileEvent] = []
    for ino, ranges in sorted(eng.writes.items() if emit_writes else ()):
        inode = alive(ino)
        path = freed_paths.get(ino) or eng.ns.path(ino)
        for lstart, lend, drec in _merged(ranges):
            if zeroed_tail.get(ino) == lstart and lend == lstart + 1:
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
    if emit_writes:
        eng.writes.clear()

    creates.sort(key=lambda e: e.path.count("/"))
    deletes.sort(key=lambda e: -e.path.count("/"))
    return creates + links + renames + writes + attrs + deletes


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


def _attribute(eng: Ext4Engine, ino: int, lblk: int, pblk: int, n: int) -> None:
    """Newly mapped blocks claim their pending writes (one range per contiguous stretch)."""
    for i, j, first_rec in eng.claim_pending(pblk, n):
        eng._note_write(ino, lblk + i, lblk + j, first_rec)


def _mtime_ns(eng: Ext4Engine, ino: int) -> int:
    """A directory's mtime in nanoseconds (the extra field when the inode has one)."""
    st = eng.istate.get(ino)
    if st is None:
        return 0
    ns = 0
    raw = st.raw
    if len(raw) >= 0x8C and int.from_bytes(raw[0x80:0x82], "little") >= 0x0C:
        ns = int.from_bytes(raw[0x88:0x8C], "little") >> 2
    return st.inode.i_mtime * 1_000_000_000 + ns


def _pair(eng: Ext4Engine, rems: list[Triple], adds: list[Triple]) -> list[tuple[Triple, Triple]]:
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


def _explained(eng: Ext4Engine, ino: int, size: int, runs: list[tuple[int, int, int]]) -> bool:
    """Did data reach the new end of file in this settle (so growth is a write, not truncate)?"""
    last = (size - 1) // eng.fs.block_size
    if any(lblk <= last < lblk + n for lblk, _, n in runs):
        return True
    return eng.written_upto.get(ino, 0) > last
