"""An ext4 file system over a block reader: identify, then specialise; everything lazy.

Design: :class:`Ext4FS` reads and validates the superblock (magic 0xEF53 at byte 1024 + 0x38),
then decides every variant from its feature flags: 32- or 64-byte group descriptors, extents or
ext2/3 block maps, one- or two-byte name lengths.  Nothing else is read at open except the group
descriptor table (needed to place inode tables and bitmaps).  Inodes, extent trees and
directory blocks are decoded on request from a :class:`BlockReader`, which the introspection
engine points at its live view (base image + the write stream so far), so the same code reads a
static image and a changing one.

Hostile input: every structure is bounded by what the file system's geometry allows, and the
impossible is refused before it is walked (:class:`Ext4FormatError`, never ``struct.error`` or
``IndexError``): the superblock's geometry must fit the device (blocks, groups, descriptor and
inode sizes); an extent tree is at most 5 deep, each node holds at most what its block holds,
extents come in logical order without overlap (as the kernel's ``ext4_ext_check`` demands), and
a file maps at most as many blocks as the file system has; indirect blocks are read once each;
a symlink maps only its first block (a target is never longer than a block).  On top of the
per-structure bounds, every decoding step is charged to :attr:`Ext4FS.work_left`, a budget the
introspection engine refills per record, so no single record can make a settle run unbounded.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol

from blocktrace.ext4 import constants as C
from blocktrace.ext4.structs import (
    DIRENT_1,
    DIRENT_2,
    EXTENT_HEADER,
    Ext4FormatError,
    Extent,
    ExtentHeader,
    ExtentIdx,
    GroupDesc,
    Inode,
    Superblock,
)

MAX_EXTENT_DEPTH = 5  #: the kernel's EXT4_MAX_EXTENT_DEPTH
MAX_INDIRECT_BLOCKS = 1 << 16  #: budget of indirect blocks read per inode (hostile maps)
MAX_DIR_BLOCKS = 1 << 16  #: larger directories are refused (every block is read and parsed)
MAX_LBLK = 1 << 32  #: logical block numbers are 32-bit (ee_block, ei_block)
EXT4_MAX_DESC_SIZE = 1024  #: the kernel's EXT4_MAX_DESC_SIZE (EXT4_MIN_BLOCK_SIZE)
MIN_BLOCKS_PER_GROUP = 8  #: a group holds at least one byte of block bitmap
#: decoding steps (tree nodes, extents, block pointers, directory entries) allowed per record
#: by default: about a second of Python at worst, far above what real transactions need
DEFAULT_WORK_BUDGET = 1 << 22
#: plain ints: ``int & IntFlag`` goes through enum's Python ``__and__`` (hot in map_inode)
_INLINE_DATA = int(C.InodeFlags.INLINE_DATA)
_EXTENTS = int(C.InodeFlags.EXTENTS)
_EXT_HEADER4 = struct.Struct("<4H")  #: ext4_extent_header's magic, entries, max, depth
_EXT_LEAF = struct.Struct("<IHHI")  #: ext4_extent (the EXTENT layout)


class BlockReader(Protocol):
    """Anything that returns file-system block ``n`` (zero-filled past the end)."""

    def read_block(self, n: int) -> bytes: ...


class ByteSource(Protocol):
    """A read-only byte range: a base image, or a partition inside one."""

    #: bytes in the range (the device size the file system must fit in)
    length: int

    def pread(self, offset: int, length: int) -> bytes: ...


class FileSource:
    """A raw image file (or a slice of it, for a partition); reads past the end give zeroes."""

    def __init__(
        self, path: str | os.PathLike[str], offset: int = 0, length: int | None = None
    ) -> None:
        self._fd = os.open(path, os.O_RDONLY)
        self.offset = offset
        total = os.lseek(self._fd, 0, os.SEEK_END)  # also right for block devices
        self.length = max(0, total - offset) if length is None else length

    def pread(self, offset: int, length: int) -> bytes:
        if offset < 0 or length <= 0:
            return b""
        avail = max(0, min(length, self.length - offset))
        data = os.pread(self._fd, avail, self.offset + offset) if avail else b""
        return data + bytes(length - len(data)) if len(data) < length else data

    def close(self) -> None:
        os.close(self._fd)


class SourceBlocks:
    """Adapts a :class:`ByteSource` to a :class:`BlockReader` of a given block size."""

    def __init__(self, source: ByteSource, block_size: int) -> None:
        self.source = source
        self.block_size = block_size

    def read_block(self, n: int) -> bytes:
        return self.source.pread(n * self.block_size, self.block_size)


@dataclass(slots=True)  # not frozen: decoded per inode/entry (hot), never mutated
class DirEntry:
    inode: int
    name: str
    file_type: int


@dataclass(slots=True)
class InodeMap:
    """Where an inode's content lives: extents (logical -> physical) and the tree's own blocks."""

    extents: list[Extent] = field(default_factory=list)
    #: (physical block, "extent" | "indirect") for extent-tree nodes and indirect blocks
    meta: list[tuple[int, str]] = field(default_factory=list)

    def physical(self, lblk: int) -> int | None:
        for e in self.extents:
            if e.lblk <= lblk < e.lblk + e.length:
                return e.pblk + lblk - e.lblk
        return None


def superblock_from_bytes(raw: bytes) -> Superblock:
    """Decode and sanity-check a superblock (``raw`` = the 1024 bytes at byte 1024)."""
    sb = Superblock.parse(raw)
    if sb.s_magic != C.EXT4_SUPER_MAGIC:
        raise Ext4FormatError(f"bad ext4 magic {sb.s_magic:#06x}")
    if sb.s_log_block_size > 6:
        raise Ext4FormatError(f"block size 2^{10 + sb.s_log_block_size} out of range")
    if sb.s_blocks_per_group == 0 or sb.s_inodes_per_group == 0:
        raise Ext4FormatError("zero blocks or inodes per group")
    return sb


def probe(source: ByteSource) -> bool:
    """True if an ext2/3/4 superblock magic sits at byte 1024 + 0x38."""
    raw = source.pread(C.EXT4_SUPERBLOCK_OFFSET + 0x38, 2)
    return len(raw) == 2 and struct.unpack("<H", raw)[0] == C.EXT4_SUPER_MAGIC


class Ext4FS:
    """The static layout of one ext4 file system, with lazy decoders over ``reader``."""

    def __init__(
        self, sb: Superblock, reader: BlockReader, *, device_bytes: int | None = None
    ) -> None:
        """``device_bytes``: the size of the device holding the file system (its geometry
        must fit in it, as the kernel checks at mount; None: not checked)."""
        self.sb = sb
        self.reader = reader
        self.block_size = 1024 << sb.s_log_block_size
        #: decoding steps left before :meth:`charge` refuses (refilled by the caller)
        self.work_left = DEFAULT_WORK_BUDGET
        incompat = sb.s_feature_incompat
        unsupported = incompat & ~int(C.SUPPORTED_INCOMPAT)
        if unsupported:
            names = str(C.FeatureIncompat(unsupported)).removeprefix("FeatureIncompat.")
            raise Ext4FormatError(f"unsupported incompat features: {names}")
        if sb.s_feature_ro_compat & C.FeatureRoCompat.BIGALLOC:
            raise Ext4FormatError("bigalloc file systems are not supported")
        self.bit64 = bool(incompat & C.FeatureIncompat.BIT64)
        self.desc_size = sb.s_desc_size if self.bit64 else C.EXT4_MIN_DESC_SIZE
        if self.bit64 and not (
            C.EXT4_MIN_DESC_SIZE_64BIT <= self.desc_size <= EXT4_MAX_DESC_SIZE
            and self.desc_size & (self.desc_size - 1) == 0
        ):
            raise Ext4FormatError(f"64bit file system with s_desc_size {self.desc_size}")
        self.filetype = bool(incompat & C.FeatureIncompat.FILETYPE)
        self.inode_size = sb.s_inode_size if sb.s_rev_level >= 1 else C.EXT4_GOOD_OLD_INODE_SIZE
        if (
            self.inode_size < C.EXT4_GOOD_OLD_INODE_SIZE
            or self.inode_size > self.block_size
            or self.inode_size & (self.inode_size - 1)
        ):
            raise Ext4FormatError(f"inode size {self.inode_size} invalid")
        self.first_ino = sb.s_first_ino if sb.s_rev_level >= 1 else C.EXT4_GOOD_OLD_FIRST_INO
        self.blocks_count = sb.s_blocks_count_lo | (sb.s_blocks_count_hi << 32 if self.bit64 else 0)
        self._check_geometry(sb, device_bytes)
        first = sb.s_first_data_block
        self.group_count = max(1, -(-(self.blocks_count - first) // sb.s_blocks_per_group))
        self.inodes_per_block = self.block_size // self.inode_size
        if sb.s_inodes_per_group % self.inodes_per_block:
            raise Ext4FormatError("s_inodes_per_group is not a whole number of blocks")
        if sb.s_inodes_count > self.group_count * sb.s_inodes_per_group:
            raise Ext4FormatError(
                f"s_inodes_count {sb.s_inodes_count} exceeds {self.group_count} groups of "
                f"{sb.s_inodes_per_group} inodes"
            )
        self.inode_table_blocks = sb.s_inodes_per_group // self.inodes_per_block
        if incompat & C.FeatureIncompat.META_BG:
            raise Ext4FormatError("meta_bg group descriptor layout is not supported")
        self.gdt_start = first + 1
        self.gdt_blocks = -(-(self.group_count * self.desc_size) // self.block_size)
        if self.gdt_blocks + sb.s_reserved_gdt_blocks >= sb.s_blocks_per_group:
            # the descriptor table sits in group 0, after the superblock: a table longer than
            # a group is impossible (and bounds the groups read below by the geometry)
            raise Ext4FormatError(
                f"{self.group_count} group descriptors do not fit in a group of "
                f"{sb.s_blocks_per_group} blocks"
            )
        self.groups = self.read_group_descs()
        self.journal_inum = (
            sb.s_journal_inum if sb.s_feature_compat & C.FeatureCompat.HAS_JOURNAL else 0
        )

    def _check_geometry(self, sb: Superblock, device_bytes: int | None) -> None:
        """Refuse geometry the kernel refuses at mount (``ext4_fill_super``), before anything
        is read in proportion to it: a hostile superblock must not make us read 16 M group
        descriptors from a 16 MiB image."""
        bits = 8 * self.block_size
        if not MIN_BLOCKS_PER_GROUP <= sb.s_blocks_per_group <= bits:
            raise Ext4FormatError(f"s_blocks_per_group {sb.s_blocks_per_group} out of range")
        if sb.s_inodes_per_group > bits:
            raise Ext4FormatError(f"s_inodes_per_group {sb.s_inodes_per_group} out of range")
        if sb.s_first_data_block >= self.blocks_count:
            raise Ext4FormatError(
                f"s_first_data_block {sb.s_first_data_block} beyond {self.blocks_count} blocks"
            )
        if device_bytes is not None and self.blocks_count > device_bytes // self.block_size:
            raise Ext4FormatError(
                f"block count {self.blocks_count} exceeds the size of the device "
                f"({device_bytes // self.block_size} blocks of {self.block_size} bytes)"
            )

    @classmethod
    def open(cls, source: ByteSource, reader: BlockReader | None = None) -> Ext4FS:
        """Identify the fs in ``source``; ``reader`` (default: ``source``) serves blocks."""
        raw = source.pread(C.EXT4_SUPERBLOCK_OFFSET, C.EXT4_SUPERBLOCK_SIZE)
        sb = superblock_from_bytes(raw)
        return cls(
            sb,
            reader or SourceBlocks(source, 1024 << sb.s_log_block_size),
            device_bytes=source.length,
        )

    def charge(self, steps: int) -> None:
        """Spend ``steps`` of the work budget; refuse (Ext4FormatError) once it is spent."""
        self.work_left -= steps
        if self.work_left < 0:
            raise Ext4FormatError("work budget of this record exhausted (hostile metadata?)")

    # ---------------------------------------------------------------- groups and inodes
    def read_group_descs(self) -> list[GroupDesc]:
        per_block = self.block_size // self.desc_size
        groups: list[GroupDesc] = []
        for blk in range(self.gdt_blocks):
            data = self.reader.read_block(self.gdt_start + blk)
            for i in range(per_block):
                if len(groups) == self.group_count:
                    break
                groups.append(GroupDesc.parse(data, i * self.desc_size, self.bit64))
        for g, gd in enumerate(groups):
            if not (
                gd.inode_table < self.blocks_count
                and gd.block_bitmap < self.blocks_count
                and gd.inode_bitmap < self.blocks_count
            ):
                raise Ext4FormatError(f"group {g} descriptor points past the end of the fs")
        return groups

    def group_has_super(self, g: int) -> bool:
        """Sparse-super rule: groups 0, 1 and powers of 3, 5 and 7 carry backups."""
        if g <= 1 or not self.sb.s_feature_ro_compat & C.FeatureRoCompat.SPARSE_SUPER:
            return True
        for base in (3, 5, 7):
            n = base
            while n < g:
                n *= base
            if n == g:
                return True
        return False

    def inode_location(self, ino: int) -> tuple[int, int]:
        """(block, byte offset in it) of inode ``ino``."""
        g, index = divmod(ino - 1, self.sb.s_inodes_per_group)
        if not 1 <= ino <= self.sb.s_inodes_count or g >= len(self.groups):
            raise Ext4FormatError(f"inode {ino} out of range")
        blk, slot = divmod(index, self.inodes_per_block)
        return self.groups[g].inode_table + blk, slot * self.inode_size

    def inode_at(self, block: int, offset: int) -> int:
        """Inverse of :meth:`inode_location` for a block inside an inode table."""
        for g, gd in enumerate(self.groups):
            if gd.inode_table <= block < gd.inode_table + self.inode_table_blocks:
                index = (block - gd.inode_table) * self.inodes_per_block + offset // self.inode_size
                return g * self.sb.s_inodes_per_group + index + 1
        raise Ext4FormatError(f"block {block} is not in an inode table")

    def read_inode_bytes(self, ino: int) -> bytes:
        blk, off = self.inode_location(ino)
        return self.reader.read_block(blk)[off : off + self.inode_size]

    def read_inode(self, ino: int) -> Inode:
        return Inode.parse(self.read_inode_bytes(ino))

    # ---------------------------------------------------------------- block maps
    def map_inode(self, inode: Inode) -> InodeMap:
        """Extents and tree blocks of an inode (nothing for inline data or fast symlinks).

        Bounded by the geometry: a file maps at most ``blocks_count`` blocks, in logical order
        without overlap; a symlink only its first block.  Each step is charged to the work
        budget (:meth:`charge`)."""
        result = InodeMap()
        flags = inode.i_flags
        if flags & _INLINE_DATA or inode.i_mode == 0:
            return result
        ftype = inode.i_mode & C.S_IFMT
        if ftype == C.S_IFLNK and inode.size < 60 and not flags & _EXTENTS:
            return result  # fast symlink: the target is in i_block
        if ftype != C.S_IFREG and ftype != C.S_IFDIR and ftype != C.S_IFLNK:
            return result  # devices, fifos, sockets: i_block is not a block map
        end = 1 if ftype == C.S_IFLNK else MAX_LBLK  # a symlink target fits in one block
        if flags & _EXTENTS:
            node = inode.i_block
            magic, entries, _, depth = _EXT_HEADER4.unpack_from(node)
            if magic == C.EXT4_EXT_MAGIC and depth == 0 and len(node) == 60 and end > 1:
                # the common case (a small file: a leaf in the inode), decoded without the
                # per-entry objects of the general walk; the same extents, in the same order
                # (at most 4 in the inode, each <= 32768 blocks: bounded as it is)
                self.work_left -= 1 + entries  # charge(), inlined: once per inode
                if self.work_left < 0:
                    self.charge(0)
                extents = result.extents
                nblocks = self.blocks_count
                for i in range(min(entries, 4)):
                    ee_block, ee_len, hi, lo = _EXT_LEAF.unpack_from(node, 12 + 12 * i)
                    unwritten = ee_len > C.EXT4_EXT_INIT_MAX_LEN
                    if unwritten:
                        ee_len -= C.EXT4_EXT_INIT_MAX_LEN
                    pblk = lo | hi << 32
                    if ee_len and pblk + ee_len <= nblocks:
                        extents.append(Extent(ee_block, pblk, ee_len, unwritten))
            else:
                _ExtentWalk(self, result, end).node(node, MAX_EXTENT_DEPTH + 1)
        else:
            self._walk_blockmap(inode.i_block, result, end)
        if ftype == C.S_IFDIR and sum(e.length for e in result.extents) > MAX_DIR_BLOCKS:
            raise Ext4FormatError(f"directory of more than {MAX_DIR_BLOCKS} blocks")
        return result

    def _walk_blockmap(self, i_block: bytes, out: InodeMap, end: int) -> None:
        ptrs = struct.unpack("<15I", i_block)
        walk = _IndirectWalk(self, out)
        per = self.block_size // 4
        for i in range(min(C.EXT4_NDIR_BLOCKS, end)):
            walk.add(i, ptrs[i])
        span = per
        lblk = C.EXT4_NDIR_BLOCKS
        for level, ptr in enumerate(ptrs[C.EXT4_IND_BLOCK :], start=1):
            if lblk >= end:
                break
            walk.indirect(ptr, level, lblk)
            lblk += span
            span *= per

    # ---------------------------------------------------------------- directories
    def parse_dir_block(self, data: bytes) -> list[DirEntry]:
        """Live entries of one directory block.

        Linear blocks, htree leaves, the htree root (its "." and ".." are real entries and the
        dx data hides inside ".."'s rec_len) and htree index nodes (one empty entry covering
        the block) all parse with the same loop; csum tails have inode 0 and are skipped.
        """
        entries: list[DirEntry] = []
        pos = 0
        size = len(data)
        layout = DIRENT_2 if self.filetype else DIRENT_1
        while pos + 8 <= size:
            ino, rec_len, name_len, *rest = layout.unpack(data, pos)
            if rec_len < 8 or rec_len % 4 or pos + rec_len > size:
                if pos == 0 and rec_len == 0:
                    break  # an all-zero (never written) block
                raise Ext4FormatError(f"directory entry at byte {pos}: bad rec_len {rec_len}")
            if ino and name_len:
                if 8 + name_len > rec_len:
                    raise Ext4FormatError(f"directory entry at byte {pos}: name overruns rec_len")
                name = data[pos + 8 : pos + 8 + name_len].decode("utf-8", "surrogateescape")
                ftype = rest[0] if self.filetype else 0
                if ino <= self.sb.s_inodes_count:
                    entries.append(DirEntry(ino, name, ftype))
            pos += rec_len
        self.work_left -= 1 + len(entries)  # charge(), inlined: once per directory block
        if self.work_left < 0:
            self.charge(0)
        return entries

    def read_dir(self, inode: Inode) -> Iterator[tuple[int, DirEntry]]:
        """(physical block, entry) for every entry of a directory (linear or htree)."""
        for ext in self.map_inode(inode).extents:
            if ext.unwritten:
                continue
            for i in range(ext.length):
                pblk = ext.pblk + i
                for entry in self.parse_dir_block(self.reader.read_block(pblk)):
                    yield pblk, entry

    def symlink_target(self, inode: Inode) -> str:
        size = min(inode.size, self.block_size)
        if inode.i_flags & _INLINE_DATA or (inode.size < 60 and not inode.i_flags & _EXTENTS):
            raw = inode.i_block[:size]
        else:
            mapping = self.map_inode(inode)
            pblk = mapping.physical(0)
            raw = self.reader.read_block(pblk)[:size] if pblk is not None else b""
        return raw.decode("utf-8", "surrogateescape")

    # ---------------------------------------------------------------- static metadata
    def static_metadata(self) -> Iterator[tuple[int, int, str, int]]:
        """(first block, count, kind, group) of superblocks, GDTs, bitmaps and inode tables."""
        first = self.sb.s_first_data_block
        for g, gd in enumerate(self.groups):
            if self.group_has_super(g):
                start = first + g * self.sb.s_blocks_per_group
                yield start, 1, "superblock", g
                yield start + 1, self.gdt_blocks + self.sb.s_reserved_gdt_blocks, "group_desc", g
            yield gd.block_bitmap, 1, "block_bitmap", g
            yield gd.inode_bitmap, 1, "inode_bitmap", g
            yield gd.inode_table, self.inode_table_blocks, "inode_table", g


class _ExtentWalk:
    """One walk of an extent tree, with the bounds of ``ext4_ext_check``: depth <= 5, entries
    <= what the node holds (``eh_max`` included), each index block visited once, extents in
    logical order without overlap, at most ``blocks_count`` blocks mapped in all; extents at or
    past ``end`` (logical) are not wanted and end the walk."""

    __slots__ = ("end", "fs", "mapped", "next_lblk", "out", "seen")

    def __init__(self, fs: Ext4FS, out: InodeMap, end: int) -> None:
        self.fs, self.out, self.end = fs, out, end
        self.seen: set[int] = set()
        self.next_lblk = 0  #: every later extent must start here or after
        self.mapped = 0

    def node(self, node: bytes, depth_budget: int) -> bool:
        """Walk one node; False once the wanted logical range is done."""
        fs = self.fs
        hdr = ExtentHeader.parse(node)
        if hdr.eh_magic != C.EXT4_EXT_MAGIC:
            raise Ext4FormatError(f"bad extent header magic {hdr.eh_magic:#06x}")
        if hdr.eh_depth >= depth_budget:
            raise Ext4FormatError(f"extent tree deeper than {MAX_EXTENT_DEPTH}")
        room = (len(node) - EXTENT_HEADER.size) // 12
        if hdr.eh_entries > hdr.eh_max or hdr.eh_max > room:
            raise Ext4FormatError(
                f"extent node with {hdr.eh_entries} entries, max {hdr.eh_max}, room for {room}"
            )
        count = hdr.eh_entries
        fs.charge(1 + count)
        prev_idx = -1
        for i in range(count):
            pos = EXTENT_HEADER.size + 12 * i
            if hdr.eh_depth == 0:
                ext = Extent.parse(node, pos)
                if ext.lblk < self.next_lblk:
                    raise Ext4FormatError(
                        f"extent at logical block {ext.lblk} overlaps or is out of order"
                    )
                if ext.lblk >= self.end:
                    return False
                self.next_lblk = ext.lblk + max(ext.length, 1)
                if ext.length and ext.pblk + ext.length <= fs.blocks_count:
                    if ext.lblk + ext.length > self.end:
                        ext = Extent(ext.lblk, ext.pblk, self.end - ext.lblk, ext.unwritten)
                    self.mapped += ext.length
                    if self.mapped > fs.blocks_count:
                        raise Ext4FormatError(
                            f"extents map more blocks than the file system's {fs.blocks_count}"
                        )
                    self.out.extents.append(ext)
                continue
            idx = ExtentIdx.parse(node, pos)
            if idx.lblk <= prev_idx:
                raise Ext4FormatError(f"extent index at logical block {idx.lblk} out of order")
            prev_idx = idx.lblk
            if idx.lblk >= self.end:
                return False
            if idx.leaf >= fs.blocks_count or idx.leaf in self.seen:
                raise Ext4FormatError(f"extent index points at block {idx.leaf}: loop or range")
            self.seen.add(idx.leaf)
            self.out.meta.append((idx.leaf, "extent"))
            if not self.node(fs.reader.read_block(idx.leaf), hdr.eh_depth):
                return False
        return True


class _IndirectWalk:
    """One walk of an ext2/3 block map: each indirect block read once (a shared one is a loop
    or a cross-link), at most ``MAX_INDIRECT_BLOCKS`` of them and ``blocks_count`` blocks
    mapped in all."""

    __slots__ = ("fs", "mapped", "out", "seen")

    def __init__(self, fs: Ext4FS, out: InodeMap) -> None:
        self.fs, self.out = fs, out
        self.seen: set[int] = set()
        self.mapped = 0

    def indirect(self, ptr: int, level: int, lblk: int) -> None:
        fs = self.fs
        if ptr == 0 or ptr >= fs.blocks_count:
            return
        if ptr in self.seen:
            raise Ext4FormatError(f"indirect block {ptr} referenced twice: loop or cross-link")
        if len(self.seen) >= min(MAX_INDIRECT_BLOCKS, fs.blocks_count):
            raise Ext4FormatError("indirect block map larger than the safety budget")
        self.seen.add(ptr)
        self.out.meta.append((ptr, "indirect"))
        per = fs.block_size // 4
        fs.charge(1 + per)
        ptrs = struct.unpack(f"<{per}I", fs.reader.read_block(ptr))
        child_span = per ** (level - 1)
        for i, p in enumerate(ptrs):
            if not p:
                continue
            if level == 1:
                self.add(lblk + i, p)
            else:
                self.indirect(p, level - 1, lblk + i * child_span)

    def add(self, lblk: int, pblk: int) -> None:
        fs, out = self.fs, self.out
        if pblk == 0 or pblk >= fs.blocks_count:
            return
        self.mapped += 1
        if self.mapped > fs.blocks_count:
            raise Ext4FormatError(f"block map maps more than the file system's {fs.blocks_count}")
        if out.extents:
            last = out.extents[-1]
            if last.lblk + last.length == lblk and last.pblk + last.length == pblk:
                out.extents[-1] = Extent(last.lblk, last.pblk, last.length + 1, False)
                return
        out.extents.append(Extent(lblk, pblk, 1, False))
