"""On-disk layouts of ext4 and JBD2, as precompiled ``struct.Struct`` objects.

Design: a :class:`Layout` is a list of ``(offset, format, kernel field name)`` rows compiled into
one ``struct.Struct`` with the gaps padded, so one ``unpack_from`` decodes a whole structure
(pyelftools' ``structs.py`` idea without ``construct``'s per-field cost).  Each decoded form is a
slotted dataclass whose fields are exactly the layout's names, in order; a unit test checks the
offsets against the kernel's C text.  Every decoder goes through :meth:`Layout.unpack`, which
turns a short buffer into :class:`Ext4FormatError`, so no parser leaks ``struct.error``.

Variants are chosen by the caller from the superblock (identify, then specialise): group
descriptors are 32 or 64 bytes, directory entries have a one-byte file type or a two-byte name
length, JBD2 tags are 8/12/16 bytes depending on 64bit/csum v2/v3.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

from blocktrace.errors import FormatError
from blocktrace.ext4 import constants as C


class Ext4FormatError(FormatError):
    """An ext4 or JBD2 structure is corrupt, truncated or of an unsupported variant."""


class Layout:
    """A C structure: named fields at fixed offsets, decoded in one ``unpack_from``."""

    def __init__(
        self, name: str, size: int, fields: list[tuple[int, str, str]], endian: str = "<"
    ) -> None:
        self.name = name
        self.size = size
        self.fields = sorted(fields)
        fmt = endian
        pos = 0
        for offset, code, fname in self.fields:
            if offset < pos:
                raise ValueError(f"{name}.{fname} overlaps the previous field")
            if offset > pos:
                fmt += f"{offset - pos}x"
            fmt += code
            pos = offset + struct.calcsize(endian + code)
        if pos > size:
            raise ValueError(f"{name} fields end at {pos}, beyond its size {size}")
        self.struct = struct.Struct(fmt)
        self.names = [f for _, _, f in self.fields]
        self.size = max(size, self.struct.size)

    def unpack(self, buf: bytes | bytearray | memoryview, offset: int = 0) -> tuple[Any, ...]:
        if offset < 0 or offset + self.size > len(buf):
            raise Ext4FormatError(
                f"{self.name} at byte {offset} runs past the end of its {len(buf)}-byte buffer"
            )
        return self.struct.unpack_from(buf, offset)


def _struct(layout: Layout) -> Any:
    """Class decorator: attach LAYOUT and a ``parse`` classmethod."""

    def wrap(cls: Any) -> Any:
        cls.LAYOUT = layout
        return cls

    return wrap


_T = TypeVar("_T", bound="_Parsed")


class _Parsed:
    __slots__ = ()
    LAYOUT: ClassVar[Layout]

    @classmethod
    def parse(cls: type[_T], buf: bytes | bytearray | memoryview, offset: int = 0) -> _T:
        return cls(*cls.LAYOUT.unpack(buf, offset))


# --------------------------------------------------------------------------- superblock
SUPERBLOCK = Layout(
    "ext4_super_block",
    1024,
    [
        (0x00, "I", "s_inodes_count"),
        (0x04, "I", "s_blocks_count_lo"),
        (0x14, "I", "s_first_data_block"),
        (0x18, "I", "s_log_block_size"),
        (0x1C, "I", "s_log_cluster_size"),
        (0x20, "I", "s_blocks_per_group"),
        (0x24, "I", "s_clusters_per_group"),
        (0x28, "I", "s_inodes_per_group"),
        (0x38, "H", "s_magic"),
        (0x3A, "H", "s_state"),
        (0x4C, "I", "s_rev_level"),
        (0x54, "I", "s_first_ino"),
        (0x58, "H", "s_inode_size"),
        (0x5C, "I", "s_feature_compat"),
        (0x60, "I", "s_feature_incompat"),
        (0x64, "I", "s_feature_ro_compat"),
        (0x68, "16s", "s_uuid"),
        (0x78, "16s", "s_volume_name"),
        (0xCE, "H", "s_reserved_gdt_blocks"),
        (0xE0, "I", "s_journal_inum"),
        (0xE4, "I", "s_journal_dev"),
        (0xFC, "B", "s_def_hash_version"),
        (0xFE, "H", "s_desc_size"),
        (0x104, "I", "s_first_meta_bg"),
        (0x150, "I", "s_blocks_count_hi"),
        (0x174, "B", "s_log_groups_per_flex"),
    ],
)


@_struct(SUPERBLOCK)
@dataclass(frozen=True, slots=True)
class Superblock(_Parsed):
    s_inodes_count: int
    s_blocks_count_lo: int
    s_first_data_block: int
    s_log_block_size: int
    s_log_cluster_size: int
    s_blocks_per_group: int
    s_clusters_per_group: int
    s_inodes_per_group: int
    s_magic: int
    s_state: int
    s_rev_level: int
    s_first_ino: int
    s_inode_size: int
    s_feature_compat: int
    s_feature_incompat: int
    s_feature_ro_compat: int
    s_uuid: bytes
    s_volume_name: bytes
    s_reserved_gdt_blocks: int
    s_journal_inum: int
    s_journal_dev: int
    s_def_hash_version: int
    s_desc_size: int
    s_first_meta_bg: int
    s_blocks_count_hi: int
    s_log_groups_per_flex: int


# --------------------------------------------------------------------------- group descriptors
GROUP_DESC_32 = Layout(
    "ext4_group_desc",
    32,
    [
        (0x00, "I", "bg_block_bitmap_lo"),
        (0x04, "I", "bg_inode_bitmap_lo"),
        (0x08, "I", "bg_inode_table_lo"),
        (0x12, "H", "bg_flags"),
    ],
)
GROUP_DESC_64 = Layout(
    "ext4_group_desc",
    64,
    [
        *GROUP_DESC_32.fields,
        (0x20, "I", "bg_block_bitmap_hi"),
        (0x24, "I", "bg_inode_bitmap_hi"),
        (0x28, "I", "bg_inode_table_hi"),
    ],
)


@dataclass(frozen=True, slots=True)
class GroupDesc:
    """One block group's metadata locations, lo/hi halves already joined."""

    block_bitmap: int
    inode_bitmap: int
    inode_table: int
    flags: int

    @classmethod
    def parse(cls, buf: bytes | bytearray | memoryview, offset: int, bit64: bool) -> GroupDesc:
        if bit64:
            bb, ib, it, fl, bbh, ibh, ith = GROUP_DESC_64.unpack(buf, offset)
            return cls(bb | bbh << 32, ib | ibh << 32, it | ith << 32, fl)
        bb, ib, it, fl = GROUP_DESC_32.unpack(buf, offset)
        return cls(bb, ib, it, fl)


# --------------------------------------------------------------------------- inode
INODE = Layout(
    "ext4_inode",
    128,
    [
        (0x00, "H", "i_mode"),
        (0x02, "H", "i_uid"),
        (0x04, "I", "i_size_lo"),
        (0x08, "I", "i_atime"),
        (0x0C, "I", "i_ctime"),
        (0x10, "I", "i_mtime"),
        (0x14, "I", "i_dtime"),
        (0x18, "H", "i_gid"),
        (0x1A, "H", "i_links_count"),
        (0x20, "I", "i_flags"),
        (0x28, "60s", "i_block"),
        (0x64, "I", "i_generation"),
        (0x68, "I", "i_file_acl_lo"),
        (0x6C, "I", "i_size_high"),
        (0x76, "H", "l_i_file_acl_high"),
        (0x78, "H", "l_i_uid_high"),
        (0x7A, "H", "l_i_gid_high"),
    ],
)


_S_IFMT, _S_IFDIR, _S_IFREG, _S_IFLNK = C.S_IFMT, C.S_IFDIR, C.S_IFREG, C.S_IFLNK


@_struct(INODE)
@dataclass(slots=True)  # not frozen: a frozen __init__ costs a object.__setattr__ per field,
class Inode(_Parsed):  # and inodes are decoded by the thousand per settle (never mutated)
    i_mode: int
    i_uid: int
    i_size_lo: int
    i_atime: int
    i_ctime: int
    i_mtime: int
    i_dtime: int
    i_gid: int
    i_links_count: int
    i_flags: int
    i_block: bytes
    i_generation: int
    i_file_acl_lo: int
    i_size_high: int
    l_i_file_acl_high: int
    l_i_uid_high: int
    l_i_gid_high: int

    @property
    def size(self) -> int:
        return self.i_size_lo | self.i_size_high << 32

    @property
    def uid(self) -> int:
        return self.i_uid | self.l_i_uid_high << 16

    @property
    def gid(self) -> int:
        return self.i_gid | self.l_i_gid_high << 16

    @property
    def file_acl(self) -> int:
        return self.i_file_acl_lo | self.l_i_file_acl_high << 32

    @property
    def file_type(self) -> int:
        return self.i_mode & C.S_IFMT

    @property
    def in_use(self) -> bool:
        """Allocated and linked: what a directory entry may point at."""
        return self.i_links_count > 0 and self.i_mode != 0

    # the type tests inline ``file_type`` (called per inode several times in a settle)
    @property
    def is_dir(self) -> bool:
        return self.i_mode & _S_IFMT == _S_IFDIR

    @property
    def is_reg(self) -> bool:
        return self.i_mode & _S_IFMT == _S_IFREG

    @property
    def is_symlink(self) -> bool:
        return self.i_mode & _S_IFMT == _S_IFLNK


#: the fields after the 128-byte base inode (offsets relative to byte 0x80)
INODE_EXTRA = Layout(
    "ext4_inode_extra", 4, [(0x00, "H", "i_extra_isize"), (0x02, "H", "i_checksum_hi")]
)


# --------------------------------------------------------------------------- extents
EXTENT_HEADER = Layout(
    "ext4_extent_header",
    12,
    [
        (0, "H", "eh_magic"),
        (2, "H", "eh_entries"),
        (4, "H", "eh_max"),
        (6, "H", "eh_depth"),
        (8, "I", "eh_generation"),
    ],
)
EXTENT = Layout(
    "ext4_extent",
    12,
    [
        (0, "I", "ee_block"),
        (4, "H", "ee_len"),
        (6, "H", "ee_start_hi"),
        (8, "I", "ee_start_lo"),
    ],
)
EXTENT_IDX = Layout(
    "ext4_extent_idx",
    12,
    [
        (0, "I", "ei_block"),
        (4, "I", "ei_leaf_lo"),
        (8, "H", "ei_leaf_hi"),
    ],
)


@_struct(EXTENT_HEADER)
@dataclass(slots=True)  # not frozen: decoded per inode/entry (hot), never mutated
class ExtentHeader(_Parsed):
    eh_magic: int
    eh_entries: int
    eh_max: int
    eh_depth: int
    eh_generation: int


@dataclass(slots=True)  # not frozen: decoded per inode/entry (hot), never mutated
class Extent:
    """A leaf entry: ``length`` blocks from logical ``lblk`` at physical ``pblk``."""

    lblk: int
    pblk: int
    length: int
    unwritten: bool

    @classmethod
    def parse(cls, buf: bytes | bytearray | memoryview, offset: int) -> Extent:
        ee_block, ee_len, hi, lo = EXTENT.unpack(buf, offset)
        unwritten = ee_len > C.EXT4_EXT_INIT_MAX_LEN
        length = ee_len - C.EXT4_EXT_INIT_MAX_LEN if unwritten else ee_len
        return cls(ee_block, lo | hi << 32, length, unwritten)


@dataclass(slots=True)  # not frozen: decoded per inode/entry (hot), never mutated
class ExtentIdx:
    lblk: int
    leaf: int

    @classmethod
    def parse(cls, buf: bytes | bytearray | memoryview, offset: int) -> ExtentIdx:
        ei_block, lo, hi = EXTENT_IDX.unpack(buf, offset)
        return cls(ei_block, lo | hi << 32)


# --------------------------------------------------------------------------- directories
DIRENT_2 = Layout(
    "ext4_dir_entry_2",
    8,
    [
        (0, "I", "inode"),
        (4, "H", "rec_len"),
        (6, "B", "name_len"),
        (7, "B", "file_type"),
    ],
)
DIRENT_1 = Layout(
    "ext4_dir_entry", 8, [(0, "I", "inode"), (4, "H", "rec_len"), (6, "H", "name_len")]
)
DX_ROOT_INFO = Layout(
    "dx_root_info",
    8,
    [
        (0, "I", "reserved_zero"),
        (4, "B", "hash_version"),
        (5, "B", "info_length"),
        (6, "B", "indirect_levels"),
        (7, "B", "unused_flags"),
    ],
)
DX_COUNTLIMIT = Layout("dx_countlimit", 4, [(0, "H", "limit"), (2, "H", "count")])


@dataclass(frozen=True, slots=True)
class DxRoot:
    """The htree root that follows the fake "." and ".." entries of a hashed directory."""

    hash_version: int
    indirect_levels: int
    limit: int
    count: int
    blocks: tuple[int, ...]  #: logical blocks of the next level

    @classmethod
    def parse(cls, buf: bytes | bytearray | memoryview) -> DxRoot:
        # "." is 12 bytes; ".." has rec_len blocksize-12; dx_root_info sits at 0x18.
        zero, hv, ilen, levels, _ = DX_ROOT_INFO.unpack(buf, 0x18)
        if zero != 0 or ilen != 8:
            raise Ext4FormatError("not an htree root block")
        limit, count = DX_COUNTLIMIT.unpack(buf, 0x20)
        if count > limit or 0x20 + 8 * count > len(buf):
            raise Ext4FormatError(f"htree root count {count} exceeds limit {limit}")
        first = struct.unpack_from("<I", buf, 0x24)[0]
        rest = [struct.unpack_from("<I", buf, 0x20 + 8 * i + 4)[0] for i in range(1, count)]
        return cls(hv, levels, limit, count, (first, *rest))


# --------------------------------------------------------------------------- MBR / GPT
MBR_PARTITION = Layout(
    "mbr_partition",
    16,
    [
        (0, "B", "status"),
        (4, "B", "type"),
        (8, "I", "lba_start"),
        (12, "I", "num_sectors"),
    ],
)
GPT_HEADER = Layout(
    "gpt_header",
    92,
    [
        (0, "8s", "signature"),
        (72, "Q", "partition_entry_lba"),
        (80, "I", "num_entries"),
        (84, "I", "entry_size"),
    ],
)
GPT_ENTRY = Layout(
    "gpt_entry",
    128,
    [
        (0, "16s", "type_guid"),
        (16, "16s", "unique_guid"),
        (32, "Q", "first_lba"),
        (40, "Q", "last_lba"),
        (56, "72s", "name"),
    ],
)

# --------------------------------------------------------------------------- JBD2 (big-endian)
JBD2_HEADER = Layout(
    "journal_header_t",
    12,
    [(0, "I", "h_magic"), (4, "I", "h_blocktype"), (8, "I", "h_sequence")],
    ">",
)
JBD2_SUPERBLOCK = Layout(
    "journal_superblock_t",
    1024,
    [
        (0x0C, "I", "s_blocksize"),
        (0x10, "I", "s_maxlen"),
        (0x14, "I", "s_first"),
        (0x18, "I", "s_sequence"),
        (0x1C, "I", "s_start"),
        (0x24, "I", "s_feature_compat"),
        (0x28, "I", "s_feature_incompat"),
        (0x2C, "I", "s_feature_ro_compat"),
        (0x30, "16s", "s_uuid"),
        (0x50, "B", "s_checksum_type"),
        (0x54, "I", "s_num_fc_blks"),
    ],
    ">",
)
JBD2_COMMIT = Layout(
    "commit_header",
    60,
    [
        (0x0C, "B", "h_chksum_type"),
        (0x0D, "B", "h_chksum_size"),
        (0x10, "I", "h_chksum0"),
        (0x30, "Q", "h_commit_sec"),
        (0x38, "I", "h_commit_nsec"),
    ],
    ">",
)
JBD2_REVOKE = Layout("jbd2_journal_revoke_header_t", 16, [(0x0C, "I", "r_count")], ">")
JBD2_TAG3 = Layout(
    "journal_block_tag3_t",
    16,
    [
        (0, "I", "t_blocknr"),
        (4, "I", "t_flags"),
        (8, "I", "t_blocknr_high"),
        (12, "I", "t_checksum"),
    ],
    ">",
)
JBD2_TAG = Layout(
    "journal_block_tag_t",
    12,
    [
        (0, "I", "t_blocknr"),
        (4, "H", "t_checksum"),
        (6, "H", "t_flags"),
        (8, "I", "t_blocknr_high"),
    ],
    ">",
)
JBD2_BLOCK_TAIL_SIZE = 4  #: jbd2_journal_block_tail: a be32 checksum closing csum v2/v3 blocks


@_struct(JBD2_SUPERBLOCK)
@dataclass(frozen=True, slots=True)
class JournalSuperblock(_Parsed):
    s_blocksize: int
    s_maxlen: int
    s_first: int
    s_sequence: int
    s_start: int
    s_feature_compat: int
    s_feature_incompat: int
    s_feature_ro_compat: int
    s_uuid: bytes
    s_checksum_type: int
    s_num_fc_blks: int


@dataclass(frozen=True, slots=True)
class JournalTag:
    """One descriptor tag: the home block of the next logged block, its flags, and (csum
    v2: low 16 bits, v3: 32 bits) the CRC32C of the logged block."""

    blocknr: int
    flags: int
    checksum: int = 0


#: plain ints: ``int & IntFlag`` goes through enum's Python ``__and__`` (per descriptor tag)
_J_CSUM_V2, _J_CSUM_V3, _J_BIT64 = (
    int(f)
    for f in (
        C.JBD2FeatureIncompat.CSUM_V2,
        C.JBD2FeatureIncompat.CSUM_V3,
        C.JBD2FeatureIncompat.BIT64,
    )
)
_T_SAME_UUID, _T_LAST_TAG = int(C.JBD2TagFlags.SAME_UUID), int(C.JBD2TagFlags.LAST_TAG)


def jbd2_tag_size(incompat: int) -> int:
    """``journal_tag_bytes()``: 16 with csum v3, else 8 + 4 if 64bit + 2 if csum v2."""
    if incompat & _J_CSUM_V3:
        return JBD2_TAG3.size
    size = JBD2_TAG.size + (2 if incompat & _J_CSUM_V2 else 0)
    return size if incompat & _J_BIT64 else size - 4


def parse_descriptor_tags(block: bytes | bytearray | memoryview, incompat: int) -> list[JournalTag]:
    """The tags of a descriptor block, up to LAST_TAG or the end (before a csum tail)."""
    tag_size = jbd2_tag_size(incompat)
    csum = incompat & (_J_CSUM_V2 | _J_CSUM_V3)
    end = len(block) - (JBD2_BLOCK_TAIL_SIZE if csum else 0)
    bit64 = bool(incompat & _J_BIT64)
    tags: list[JournalTag] = []
    pos = JBD2_HEADER.size
    while pos + tag_size <= end:
        if incompat & _J_CSUM_V3:
            lo, flags, hi, csum = JBD2_TAG3.unpack(block, pos)
        else:
            lo, csum, flags = struct.unpack_from(">IHH", block, pos)
            hi = struct.unpack_from(">I", block, pos + 8)[0] if bit64 else 0
        tags.append(JournalTag(lo | (hi << 32 if bit64 else 0), flags, csum))
        pos += tag_size
        if not flags & _T_SAME_UUID:
            pos += 16
        if flags & _T_LAST_TAG:
            break
    return tags


def parse_revoke_blocks(block: bytes | bytearray | memoryview, incompat: int) -> list[int]:
    """Block numbers listed by a revoke block (``r_count`` bytes used, header included)."""
    (r_count,) = JBD2_REVOKE.unpack(block)
    width = 8 if incompat & _J_BIT64 else 4
    if r_count > len(block) or r_count < JBD2_REVOKE.size:
        raise Ext4FormatError(f"revoke block r_count {r_count} out of range")
    n = (r_count - JBD2_REVOKE.size) // width
    return list(struct.unpack_from(f">{n}{'Q' if width == 8 else 'I'}", block, JBD2_REVOKE.size))
