"""ext4/JBD2 layouts: offsets match the kernel's C structures; bad bytes give FormatError only."""

from __future__ import annotations

import contextlib
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blocktrace.errors import FormatError
from blocktrace.ext4 import constants as C
from blocktrace.ext4.structs import (
    EXTENT,
    EXTENT_HEADER,
    EXTENT_IDX,
    GROUP_DESC_32,
    GROUP_DESC_64,
    INODE,
    JBD2_COMMIT,
    JBD2_TAG,
    JBD2_TAG3,
    SUPERBLOCK,
    DxRoot,
    Ext4FormatError,
    Extent,
    GroupDesc,
    Inode,
    Superblock,
    jbd2_tag_size,
    parse_descriptor_tags,
    parse_revoke_blocks,
)


def offsets(layout):  # type: ignore[no-untyped-def]
    return {name: off for off, _, name in layout.fields}


def test_offsets_match_kernel_headers() -> None:
    # fs/ext4/ext4.h struct ext4_super_block
    sb = offsets(SUPERBLOCK)
    assert (sb["s_magic"], sb["s_inode_size"], sb["s_feature_incompat"]) == (0x38, 0x58, 0x60)
    assert (sb["s_journal_inum"], sb["s_desc_size"], sb["s_blocks_count_hi"]) == (0xE0, 0xFE, 0x150)
    # struct ext4_inode
    ino = offsets(INODE)
    assert (ino["i_links_count"], ino["i_flags"], ino["i_block"], ino["i_generation"]) == (
        0x1A,
        0x20,
        0x28,
        0x64,
    )
    assert (ino["i_size_high"], ino["l_i_uid_high"]) == (0x6C, 0x78)
    # struct ext4_group_desc (32 and 64 bytes)
    assert offsets(GROUP_DESC_64)["bg_inode_table_hi"] == 0x28
    assert (GROUP_DESC_32.size, GROUP_DESC_64.size) == (32, 64)
    # ext4_extents.h: 12-byte header, extent and index
    assert EXTENT_HEADER.size == EXTENT.size == EXTENT_IDX.size == 12
    assert EXTENT.struct.size == 12 and EXTENT_IDX.struct.size <= 12
    # include/linux/jbd2.h
    assert JBD2_TAG3.struct.size == 16 and JBD2_TAG.struct.size == 12
    assert offsets(JBD2_COMMIT)["h_commit_sec"] == 0x30


def test_dataclass_fields_follow_layouts() -> None:
    for cls in (Superblock, Inode):
        assert list(cls.__dataclass_fields__) == cls.LAYOUT.names  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("incompat", "size"),
    [
        (0, 8),
        (C.JBD2FeatureIncompat.BIT64, 12),
        (C.JBD2FeatureIncompat.CSUM_V2, 10),
        (C.JBD2FeatureIncompat.CSUM_V2 | C.JBD2FeatureIncompat.BIT64, 14),
        (C.JBD2FeatureIncompat.CSUM_V3, 16),
        (C.JBD2FeatureIncompat.CSUM_V3 | C.JBD2FeatureIncompat.BIT64, 16),
    ],
)
def test_jbd2_tag_sizes(incompat: int, size: int) -> None:
    assert jbd2_tag_size(incompat) == size


def test_extent_unwritten_and_64bit_start() -> None:
    raw = struct.pack("<IHHI", 10, 32768 + 5, 1, 7)
    ext = Extent.parse(raw, 0)
    assert (ext.lblk, ext.length, ext.unwritten, ext.pblk) == (10, 5, True, (1 << 32) | 7)


def test_group_desc_joins_hi_halves() -> None:
    raw = bytearray(64)
    struct.pack_into("<III", raw, 0, 1, 2, 3)
    struct.pack_into("<III", raw, 0x20, 1, 1, 1)
    gd = GroupDesc.parse(raw, 0, bit64=True)
    assert (gd.block_bitmap, gd.inode_bitmap, gd.inode_table) == (
        1 + (1 << 32),
        2 + (1 << 32),
        3 + (1 << 32),
    )
    assert GroupDesc.parse(raw, 0, bit64=False).inode_table == 3


def test_descriptor_tags_csum_v3_and_uuid() -> None:
    block = bytearray(1024)
    struct.pack_into(">III", block, 0, C.JBD2_MAGIC_NUMBER, 1, 7)
    incompat = C.JBD2FeatureIncompat.CSUM_V3 | C.JBD2FeatureIncompat.BIT64
    struct.pack_into(">IIII", block, 12, 100, 0, 0, 0)  # first tag: UUID follows
    struct.pack_into(
        ">IIII",
        block,
        12 + 16 + 16,
        200,
        C.JBD2TagFlags.SAME_UUID | C.JBD2TagFlags.LAST_TAG | C.JBD2TagFlags.ESCAPE,
        1,
        0,
    )
    tags = parse_descriptor_tags(block, incompat)
    assert [t.blocknr for t in tags] == [100, 200 + (1 << 32)]
    assert tags[1].flags & C.JBD2TagFlags.ESCAPE


def test_descriptor_tags_32bit_v2() -> None:
    block = bytearray(1024)
    incompat = C.JBD2FeatureIncompat.CSUM_V2  # 10-byte tags: blocknr, csum16, flags16, pad
    struct.pack_into(">IHH", block, 12, 5, 0, C.JBD2TagFlags.SAME_UUID)
    struct.pack_into(
        ">IHH", block, 12 + 10 + 16 - 16, 6, 0, C.JBD2TagFlags.SAME_UUID | C.JBD2TagFlags.LAST_TAG
    )
    assert [t.blocknr for t in parse_descriptor_tags(block, incompat)] == [5, 6]


def test_revoke_block() -> None:
    block = bytearray(1024)
    struct.pack_into(">IIII", block, 0, C.JBD2_MAGIC_NUMBER, 5, 3, 16 + 3 * 8)
    struct.pack_into(">QQQ", block, 16, 1, 2, 1 << 40)
    assert parse_revoke_blocks(block, C.JBD2FeatureIncompat.BIT64) == [1, 2, 1 << 40]
    struct.pack_into(">I", block, 12, 5000)
    with pytest.raises(Ext4FormatError):
        parse_revoke_blocks(block, 0)


def test_short_buffers_raise_format_error() -> None:
    with pytest.raises(Ext4FormatError):
        Superblock.parse(b"\0" * 100)
    with pytest.raises(FormatError):
        Inode.parse(b"\0" * 127)
    with pytest.raises(FormatError):
        DxRoot.parse(b"\0" * 16)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=1100), st.sampled_from([0, 2, 8, 10, 16, 18]))
def test_hostile_bytes_only_raise_format_error(data: bytes, incompat: int) -> None:
    for parse in (
        lambda: parse_descriptor_tags(data, incompat),
        lambda: parse_revoke_blocks(data, incompat),
        lambda: DxRoot.parse(data),
        lambda: Superblock.parse(data),
        lambda: Extent.parse(data, 0),
    ):
        with contextlib.suppress(FormatError):
            parse()
