"""The dm-log-writes byte layout, pinned offset by offset against the kernel's structs."""

from __future__ import annotations

import struct
import zlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from blocktrace.logwrites.format import (
    ENTRY_SIZE,
    LOG_WRITE_ENTRY,
    LOG_WRITE_SUPER,
    SUPER_SIZE,
    TRAILER_SIZE,
    WRITE_LOG_MAGIC,
    BadSuperBlock,
    CorruptEntry,
    ExtFlag,
    LogFlag,
    SuperBlock,
    TruncatedLog,
    check_sector_size,
    entry_crc,
    flags_str,
    max_mark_len,
    pack_entry_header,
    seal_entry_header,
    unpack_entry_header,
    validate_mark,
)


def test_struct_sizes_match_the_kernel() -> None:
    assert LOG_WRITE_SUPER.size == 28  # packed fields (QEMU_PACKED); kernel sizeof is 32
    assert SUPER_SIZE == 32
    assert LOG_WRITE_ENTRY.size == ENTRY_SIZE == 32
    assert TRAILER_SIZE == 24
    assert "struct log_write_super" in (type(LOG_WRITE_SUPER).__doc__ or "")
    assert "struct log_write_entry" in (type(LOG_WRITE_ENTRY).__doc__ or "")


def test_flag_values() -> None:
    assert (LogFlag.FLUSH, LogFlag.FUA, LogFlag.DISCARD, LogFlag.MARK, LogFlag.METADATA) == (
        0x1,
        0x2,
        0x4,
        0x8,
        0x10,
    )
    assert flags_str(0) == "NONE"
    assert flags_str(0x12) == "FUA|METADATA"
    assert flags_str(0x41) == "FLUSH|UNKNOWN.0x40"


def test_super_block_byte_layout() -> None:
    raw = SuperBlock(nr_entries=2, sector_size=512).pack()
    assert len(raw) == 512
    assert raw[0:8] == b"rhswfsj\0"  # magic 0x6a736677736872 little-endian
    assert struct.unpack_from("<Q", raw, 0)[0] == WRITE_LOG_MAGIC
    assert struct.unpack_from("<Q", raw, 8)[0] == 1  # version
    assert struct.unpack_from("<Q", raw, 16)[0] == 2  # nr_entries
    assert struct.unpack_from("<I", raw, 24)[0] == 512  # sectorsize at 24, not 28
    assert raw[28:] == bytes(512 - 28)  # padding and rest zero without the extension
    # The QEMU super quoted in the reference, byte for byte.
    assert raw[:32].hex() == ("7268737766736a00010000000000000002000000000000000002000000000000")


def test_super_block_extension_and_roundtrip() -> None:
    raw = SuperBlock(7, 4096, log_id=0xDEADBEEF).pack()
    assert len(raw) == 4096
    assert raw[28:32] == bytes(4)
    assert raw[32:40] == b"btrace\x00\x01"
    assert SuperBlock.unpack(raw) == SuperBlock(7, 4096, log_id=0xDEADBEEF)
    assert SuperBlock.unpack(raw[:28]) == SuperBlock(7, 4096)  # what QEMU reads


@pytest.mark.parametrize(
    ("mutate", "offset"),
    [
        (lambda b: b.__setitem__(0, 0), 0),
        (lambda b: struct.pack_into("<Q", b, 8, 2), 8),
        (lambda b: struct.pack_into("<I", b, 24, 1000), 24),
    ],
)
def test_bad_super_blocks(mutate: object, offset: int) -> None:
    raw = bytearray(SuperBlock(1, 512).pack())
    mutate(raw)  # type: ignore[operator]
    with pytest.raises(BadSuperBlock) as info:
        SuperBlock.unpack(raw)
    assert info.value.offset == offset


def test_sector_size_rules() -> None:
    assert check_sector_size(512, for_writing=True) == 512
    assert check_sector_size(32) == 32  # QEMU accepts small sizes; we can read them
    for bad in (0, 500, 256):
        with pytest.raises(ValueError):
            check_sector_size(bad, for_writing=True)
    with pytest.raises(ValueError):
        check_sector_size(1 << 25)


def test_entry_header_layout_and_mark_text() -> None:
    hdr = pack_entry_header(512, 0, 0, LogFlag.MARK, b"mkfs")
    assert LOG_WRITE_ENTRY.unpack_from(hdr) == (0, 0, 8, 4)
    assert hdr[32:36] == b"mkfs" and hdr[36] == 0
    data = pack_entry_header(512, 10, 3, LogFlag.FUA)
    assert LOG_WRITE_ENTRY.unpack_from(data) == (10, 3, 2, 0)
    assert data[32:] == bytes(480)  # replay-log requires byte 32 == 0 for non-marks


def test_trailer_checksum_covers_header_and_data() -> None:
    payload = bytes(range(256)) * 4
    hdr = pack_entry_header(512, 4, 2, LogFlag.NONE)
    crc = seal_entry_header(hdr, payload, log_id=0x1234, index=9, ext_flags=ExtFlag.SPLIT)
    assert hdr[512 - 24 : 512 - 20] == b"BTck"
    assert hdr[32 : 512 - 24] == bytes(512 - 24 - 32)  # still zero padded where others look
    decoded = unpack_entry_header(hdr, 512)
    assert decoded.trailer is not None
    assert (decoded.trailer.crc, decoded.trailer.log_id, decoded.trailer.index) == (crc, 0x1234, 9)
    assert decoded.trailer.ext_flags == ExtFlag.SPLIT
    assert entry_crc(hdr, [memoryview(payload)]) == crc
    assert entry_crc(hdr, [memoryview(payload[:-1] + b"x")]) != crc
    zeroed = bytearray(hdr)
    zeroed[512 - 20 : 512 - 16] = bytes(4)
    assert crc == zlib.crc32(payload, zlib.crc32(zeroed))


def test_malformed_headers_are_rejected_like_replay_log() -> None:
    with pytest.raises(CorruptEntry, match="flags and nr_sectors"):
        unpack_entry_header(bytes(512), 512, entry=3, offset=2048)
    bad = pack_entry_header(512, 1, 1, 0)
    bad[32] = 1
    with pytest.raises(CorruptEntry) as info:
        unpack_entry_header(bad, 512, entry=5, offset=4096)
    assert (info.value.entry, info.value.offset) == (5, 4096)
    assert "entry 5 at byte 4096" in str(info.value)
    with pytest.raises(TruncatedLog):
        unpack_entry_header(bytes(100), 512)


def test_mark_limits() -> None:
    assert max_mark_len(512, checksums=False) == 479  # the kernel's kstrndup(maxsize - 1)
    assert max_mark_len(512) == 455
    assert max_mark_len(4096) == 4096 - 57
    assert validate_mark("a" * 455, 512) == b"a" * 455
    with pytest.raises(ValueError):
        validate_mark("a" * 456, 512)
    for bad in ("", "two words", "tab\t", "caf\u00e9", "nul\0"):
        with pytest.raises(ValueError):
            validate_mark(bad, 512)


@given(
    sector=st.integers(0, 2**40),
    nr=st.integers(0, 2**20),
    flags=st.integers(0, 0x1F),
    shift=st.integers(9, 13),
)
def test_header_roundtrip(sector: int, nr: int, flags: int, shift: int) -> None:
    S = 1 << shift
    if flags == 0 and nr == 0:
        nr = 1
    mark = b"m" if flags == LogFlag.MARK else b""
    hdr = pack_entry_header(S, sector, nr, flags, mark)
    seal_entry_header(hdr, None, log_id=1, index=2)
    got = unpack_entry_header(hdr, S)
    assert (got.sector, got.nr_sectors, got.flags, got.data_len) == (sector, nr, flags, len(mark))
    assert got.data_bytes(S) == (0 if flags & LogFlag.DISCARD else nr * S)
