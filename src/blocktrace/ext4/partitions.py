"""Find the file systems on a disk: bare, or behind an MBR or GPT partition table.

Identify-then-specialise again: a bare ext4 superblock at byte 1024 wins (a file system made on
the whole disk); otherwise the MBR signature 0x55AA at byte 510 selects the MBR table, whose
protective entry (type 0xEE) in turn selects the GPT at LBA 1.  Every candidate partition is
then probed for the ext4 magic; partitions holding anything else are listed but not followed.
Extended MBR partitions (logical drives) are not walked.
"""

from __future__ import annotations

from dataclasses import dataclass

from blocktrace.ext4.fs import ByteSource, probe
from blocktrace.ext4.structs import GPT_ENTRY, GPT_HEADER, MBR_PARTITION, Ext4FormatError

SECTOR = 512
MBR_TYPE_GPT_PROTECTIVE = 0xEE
MBR_TYPES_EXTENDED = (0x05, 0x0F, 0x85)
MAX_GPT_ENTRIES = 1024


@dataclass(frozen=True, slots=True)
class Partition:
    name: str  #: "" for a bare file system, else "p1", "p2"... (table order, 1-based)
    offset: int  #: bytes from the start of the disk
    length: int
    scheme: str  #: "none", "mbr" or "gpt"
    ext4: bool  #: an ext2/3/4 superblock was found


class _Slice:
    def __init__(self, source: ByteSource, offset: int, length: int) -> None:
        self.source, self.offset, self.length = source, offset, length

    def pread(self, offset: int, length: int) -> bytes:
        n = max(0, min(length, self.length - offset))
        data = self.source.pread(self.offset + offset, n) if n > 0 else b""
        return data + bytes(length - len(data))


def slice_source(source: ByteSource, offset: int, length: int) -> ByteSource:
    """A partition's bytes as a source of their own."""
    return _Slice(source, offset, length)


def discover(source: ByteSource, disk_size: int) -> list[Partition]:
    """Every partition (or the bare file system) on the disk, in table order."""
    if probe(source):
        return [Partition("", 0, disk_size, "none", True)]
    mbr = source.pread(0, SECTOR)
    if len(mbr) < SECTOR or mbr[510:512] != b"\x55\xaa":
        return []
    entries = [MBR_PARTITION.unpack(mbr, 446 + 16 * i) for i in range(4)]
    if any(e[1] == MBR_TYPE_GPT_PROTECTIVE for e in entries):
        return _gpt(source, disk_size)
    parts = []
    for i, (_, ptype, lba, count) in enumerate(entries, start=1):
        if ptype == 0 or count == 0 or ptype in MBR_TYPES_EXTENDED:
            continue
        parts.append(_part(source, f"p{i}", lba * SECTOR, count * SECTOR, "mbr", disk_size))
    return parts


def _gpt(source: ByteSource, disk_size: int) -> list[Partition]:
    hdr = source.pread(SECTOR, SECTOR)
    sig, entry_lba, num, size = GPT_HEADER.unpack(hdr)
    if sig != b"EFI PART":
        raise Ext4FormatError("protective MBR without a GPT header")
    if size < GPT_ENTRY.size or size > 4096 or num > MAX_GPT_ENTRIES:
        raise Ext4FormatError(f"GPT entry size {size} / count {num} out of range")
    table = source.pread(entry_lba * SECTOR, num * size)
    parts = []
    for i in range(num):
        type_guid, _, first, last, _ = GPT_ENTRY.unpack(table, i * size)
        if type_guid == bytes(16) or last < first:
            continue
        parts.append(
            _part(
                source, f"p{i + 1}", first * SECTOR, (last - first + 1) * SECTOR, "gpt", disk_size
            )
        )
    return parts


def _part(
    source: ByteSource, name: str, offset: int, length: int, scheme: str, disk_size: int
) -> Partition:
    length = max(0, min(length, disk_size - offset))
    return Partition(
        name, offset, length, scheme, length > 2048 and probe(slice_source(source, offset, length))
    )
