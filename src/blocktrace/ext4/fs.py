"""An ext4 file system over a block reader: identify, then specialise; everything lazy.

Design: :class:`Ext4FS` reads and validates the superblock (magic 0xEF53 at byte 1024 + 0x38),
then decides every variant from its feature flags: 32- or 64-byte group descriptors, extents or
ext2/3 block maps, one- or two-byte name lengths.  Nothing else is read at open except the group
descriptor table (needed to place inode tables and bitmaps).  Inodes, extent trees and
directory blocks are decoded on request from a :class:`BlockReader`, which the introspection
engine points at its live view (base image + the write stream so far), so the same code reads a
static image and a changing one.

Hostile input: every loop is bounded (tree depth, entry counts, rec_len progress, indirect
block budget) and every decoder raises :class:`Ext4FormatError`, never ``struct.error``.
"""

from __future__ import annotations

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

    def pread(self, offset: int, length: int) -> bytes: ...


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

    def __init__(self, sb: Superblock, reader: BlockReader) -> None:
        self.sb = sb
        self.reader = reader
        self.block_size = 1024 << sb.s_log_block_size
        incompat = sb.s_feature_incompat
        unsupported = incompat & ~int(C.SUPPORTED_INCOMPAT)
        if unsupported:
            names = str(C.FeatureIncompat(unsupported)).removeprefix("FeatureIncompat.")
            raise Ext4FormatError(f"unsupported incompat features: {names}")
        if sb.s_feature_ro_compat & C.FeatureRoCompat.BIGALLOC:
            raise Ext4FormatError("bigalloc file systems are not supported")
        self.bit64 = bool(incompat & C.FeatureIncompat.BIT64)
        self.desc_size = sb.s_desc_size if self.bit64 else C.EXT4_MIN_DESC_SIZE
        if self.bit64 and self.desc_size < C.EXT4_MIN_DESC_SIZE_64BIT:
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
        first = sb.s_first_data_block
        self.group_count = max(1, -(-(self.blocks_count - first) // sb.s_blocks_per_group))
        if self.group_count > 1 << 24:
            raise Ext4FormatError(f"{self.group_count} block groups: implausible")
        self.inodes_per_block = self.block_size // self.inode_size
        if sb.s_inodes_per_group % self.inodes_per_block:
            raise Ext4FormatError("s_inodes_per_group is not a whole number of blocks")
        self.inode_table_blocks = sb.s_inodes_per_group // self.inodes_per_block
        if incompat & C.FeatureIncompat.META_BG:
            raise Ext4FormatError("meta_bg group descriptor layout is not supported")
        self.gdt_start = first + 1
        self.gdt_blocks = -(-(self.group_count * self.desc_size) // self.block_size)
        self.groups = self.read_group_descs()
        self.journal_inum = (
            sb.s_journal_inum if sb.s_feature_compat & C.FeatureCompat.HAS_JOURNAL else 0
        )

    @classmethod
    def open(cls, source: ByteSource, reader: BlockReader | None = None) -> Ext4FS:
        """Identify the fs in ``source``; ``reader`` (default: ``source``) serves blocks."""
        raw = source.pread(C.EXT4_SUPERBLOCK_OFFSET, C.EXT4_SUPERBLOCK_SIZE)
        sb = superblock_from_bytes(raw)
        return cls(sb, reader or SourceBlocks(source, 1024 << sb.s_log_block_size))

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
        if not 1 <= ino <= self.sb.s_inodes_count:
            raise Ext4FormatError(f"inode {ino} out of range")
        g, index = divmod(ino - 1, self.sb.s_inodes_per_group)
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
        """Extents and tree blocks of an inode (nothing for inline data or fast symlinks)."""
        result = InodeMap()
        flags = inode.i_flags
        if flags & _INLINE_DATA or inode.i_mode == 0:
            return result
        ftype = inode.i_mode & C.S_IFMT
        if ftype == C.S_IFLNK and inode.size < 60 and not flags & _EXTENTS:
            return result  # fast symlink: the target is in i_block
        if ftype != C.S_IFREG and ftype != C.S_IFDIR and ftype != C.S_IFLNK:
            return result  # devices, fifos, sockets: i_block is not a block map
        if flags & _EXTENTS:
            node = inode.i_block
            magic, entries, _, depth = _EXT_HEADER4.unpack_from(node)
            if magic == C.EXT4_EXT_MAGIC and depth == 0 and len(node) == 60:
                # the common case (a small file: a leaf in the inode), decoded without the
                # per-entry objects of the general walk; the same extents, in the same order
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
                self._walk_extents(node, MAX_EXTENT_DEPTH + 1, result, set())
        else:
            self._walk_blockmap(inode.i_block, result)
        if ftype == C.S_IFDIR and sum(e.length for e in result.extents) > MAX_DIR_BLOCKS:
            raise Ext4FormatError(f"directory of more than {MAX_DIR_BLOCKS} blocks")
        return result

    def _walk_extents(self, node: bytes, depth_budget: int, out: InodeMap, seen: set[int]) -> None:
        hdr = ExtentHeader.parse(node)
        if hdr.eh_magic != C.EXT4_EXT_MAGIC:
            raise Ext4FormatError(f"bad extent header magic {hdr.eh_magic:#06x}")
        if hdr.eh_depth >= depth_budget:
            raise Ext4FormatError(f"extent tree deeper than {MAX_EXTENT_DEPTH}")
        count = min(hdr.eh_entries, (len(node) - EXTENT_HEADER.size) // 12)
        for i in range(count):
            pos = EXTENT_HEADER.size + 12 * i
            if hdr.eh_depth == 0:
                ext = Extent.parse(node, pos)
                if ext.length and ext.pblk + ext.length <= self.blocks_count:
                    out.extents.append(ext)
                continue
            idx = ExtentIdx.parse(node, pos)
            if idx.leaf >= self.blocks_count or idx.leaf in seen:
                raise Ext4FormatError(f"extent index points at block {idx.leaf}: loop or range")
            seen.add(idx.leaf)
            out.meta.append((idx.leaf, "extent"))
            self._walk_extents(self.reader.read_block(idx.leaf), hdr.eh_depth, out, seen)

    def _walk_blockmap(self, i_block: bytes, out: InodeMap) -> None:
        ptrs = struct.unpack("<15I", i_block)
        budget = [MAX_INDIRECT_BLOCKS]
        per = self.block_size // 4
        for i in range(C.EXT4_NDIR_BLOCKS):
            self._add_block(out, i, ptrs[i])
        span = per
        lblk = C.EXT4_NDIR_BLOCKS
        for level, ptr in enumerate(ptrs[C.EXT4_IND_BLOCK :], start=1):
            self._walk_indirect(ptr, level, lblk, out, budget)
            lblk += span
            span *= per

    def _walk_indirect(
        self, ptr: int, level: int, lblk: int, out: InodeMap, budget: list[int]
    ) -> None:
        if ptr == 0 or ptr >= self.blocks_count:
            return
        budget[0] -= 1
        if budget[0] < 0:
            raise Ext4FormatError("indirect block map larger than the safety budget")
        out.meta.append((ptr, "indirect"))
        per = self.block_size // 4
        ptrs = struct.unpack(f"<{per}I", self.reader.read_block(ptr))
        child_span = per ** (level - 1)
        for i, p in enumerate(ptrs):
            if level == 1:
                self._add_block(out, lblk + i, p)
            else:
                self._walk_indirect(p, level - 1, lblk + i * child_span, out, budget)

    def _add_block(self, out: InodeMap, lblk: int, pblk: int) -> None:
        if pblk == 0 or pblk >= self.blocks_count:
            return
        if out.extents:
            last = out.extents[-1]
            if last.lblk + last.length == lblk and last.pblk + last.length == pblk:
                out.extents[-1] = Extent(last.lblk, last.pblk, last.length + 1, False)
                return
        out.extents.append(Extent(lblk, pblk, 1, False))

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
