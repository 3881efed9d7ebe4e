"""The dm-log-writes on-disk format, byte for byte, plus blocktrace's ignorable extensions.

Design: pure functions and frozen dataclasses, no I/O.  Every layout is a :class:`struct.Struct`
whose docstring quotes the kernel's C definition (``drivers/md/dm-log-writes.c``) so the field
names and offsets can be checked against the source.  The writer, reader and replayer share this
module, and the unit tests pin every offset.

A log is ``[super sector][entry header sector][data sectors]...``; every unit is the log's
``sectorsize`` ``S`` (512 unless the recorded device had bigger logical blocks).

Our extensions live only where every other consumer provably does not look:

* super sector bytes ``[32, 48)``: ``SUPER_EXT`` (a tag, an extension version and a random
  ``log_id``).  The kernel zeroes this area, replay-log reads 32 bytes of the super and seeks
  past the rest, QEMU reads 28 bytes (and rewrites the super *without* it when appending, which
  readers tolerate: the ``log_id`` then comes from the entries).
* entry header bytes ``[S-24, S)``: ``TRAILER`` (tag, CRC-32 of header sector + data, ``log_id``,
  extension flags, entry index).  replay-log checks only byte 32 of a header (it must be 0 unless
  the entry is a mark) and the mark text up to its NUL; QEMU reads 32 bytes; the kernel never
  reads headers.  This costs marks 24 bytes of text: see :func:`max_mark_len`.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from enum import IntFlag

from blocktrace.errors import FormatError

#: ``#define WRITE_LOG_MAGIC 0x6a736677736872ULL``; on disk ``b"rhswfsj\\0"``.
WRITE_LOG_MAGIC = 0x6A736677736872
#: ``#define WRITE_LOG_VERSION 1ULL`` -- the only version that exists.
WRITE_LOG_VERSION = 1
#: ``#define WRITE_LOG_SUPER_SECTOR 0``
WRITE_LOG_SUPER_SECTOR = 0


class LogFlag(IntFlag):
    """``LOG_*_FLAG`` bits of ``log_write_entry.flags``.

    .. code-block:: c

        #define LOG_FLUSH_FLAG    (1 << 0)
        #define LOG_FUA_FLAG      (1 << 1)
        #define LOG_DISCARD_FLAG  (1 << 2)
        #define LOG_MARK_FLAG     (1 << 3)
        #define LOG_METADATA_FLAG (1 << 4)
    """

    NONE = 0
    FLUSH = 1 << 0
    FUA = 1 << 1
    DISCARD = 1 << 2
    MARK = 1 << 3
    METADATA = 1 << 4


#: Every flag bit a reader knows; others are kept opaque (replay-log prints ``UNKNOWN.0x..``).
KNOWN_FLAGS = int(LogFlag.FLUSH | LogFlag.FUA | LogFlag.DISCARD | LogFlag.MARK | LogFlag.METADATA)
#: QEMU's ``LOG_FLAG_MASK``: ``log-append=on`` rejects a log with any other bit (e.g. METADATA).
QEMU_FLAG_MASK = 0xF


class LogWriteSuper(struct.Struct):
    """Super block at byte 0: 28 bytes of fields (the kernel's ``sizeof`` is 32).

    .. code-block:: c

        struct log_write_super {
            __le64 magic;
            __le64 version;
            __le64 nr_entries;
            __le32 sectorsize;
        };
    """


LOG_WRITE_SUPER = LogWriteSuper("<QQQI")
#: Bytes the kernel and replay-log treat as the super (``sizeof`` on LP64, with tail padding).
SUPER_SIZE = 32


class LogWriteEntry(struct.Struct):
    """Entry header at the start of each entry's header sector (32 bytes).

    .. code-block:: c

        struct log_write_entry {
            __le64 sector;
            __le64 nr_sectors;
            __le64 flags;
            __le64 data_len;
        };

    ``sector``/``nr_sectors`` count ``sectorsize`` units; ``data_len`` is the mark text length (or
    inline DAX data on v4.15-v5.16 kernels).  Mark text starts at byte 32, right after the
        struct.
    """


LOG_WRITE_ENTRY = LogWriteEntry("<QQQQ")
ENTRY_SIZE = LOG_WRITE_ENTRY.size

#: blocktrace extension in the super sector at byte 32: tag, extension version, log id.
SUPER_EXT = struct.Struct("<8sII")
SUPER_EXT_OFFSET = SUPER_SIZE
SUPER_EXT_TAG = b"btrace\x00\x01"
EXT_VERSION = 1

#: blocktrace extension at the end of every entry header sector:
#: tag, crc32, log_id, extension flags, entry index.
TRAILER = struct.Struct("<4sIIIQ")
TRAILER_TAG = b"BTck"
TRAILER_SIZE = TRAILER.size  # 24
_CRC_FIELD = 4  # offset of the crc inside the trailer


class ExtFlag(IntFlag):
    """Bits of the trailer's extension flags (meaningful to blocktrace only)."""

    NONE = 0
    #: This DISCARD entry records a WRITE_ZEROES, not a TRIM (both replay as zeroes).
    ZEROES = 1 << 0
    #: More entries of the same request follow (a request split to fit replay-log's limits);
    #: counting entries without SPLIT counts the recorded requests.
    SPLIT = 1 << 1


#: A replay-log zero-fill fallback silently skips discards larger than this
#: (``log->max_zero_size``); the writer splits discard entries to stay within it.
REPLAY_LOG_MAX_ZERO_SIZE = 128 * 1024 * 1024

MIN_SECTOR_SIZE_READ = 32  # QEMU accepts >= sizeof(struct log_write_entry)
MAX_SECTOR_SIZE = 1 << 24  # QEMU's upper bound (exclusive in QEMU; we accept < 16 MiB too)
MIN_SECTOR_SIZE_WRITE = 512


class LogFormatError(FormatError):
    """A log is corrupt, truncated or not a log.  Names the entry and byte offset when known."""

    def __init__(
        self,
        message: str,
        *,
        entry: int | None = None,
        offset: int | None = None,
        path: str | None = None,
    ) -> None:
        self.entry = entry
        self.offset = offset
        self.path = path
        self.reason = message
        where = []
        if entry is not None:
            where.append(f"entry {entry}")
        if offset is not None:
            where.append(f"at byte {offset}")
        prefix = f"{path}: " if path else ""
        super().__init__(f"{prefix}{' '.join(where)}{': ' if where else ''}{message}")


class BadSuperBlock(LogFormatError):
    """Byte 0 holds no usable dm-log-writes super block (wrong magic/version/sector size)."""


class TruncatedLog(LogFormatError):
    """The log ends inside an entry that the super block counts."""


class CorruptEntry(LogFormatError):
    """An entry header is malformed (replay-log would say "Malformed entry")."""


class ChecksumMismatch(CorruptEntry):
    """An entry's blocktrace checksum does not match its header and data."""


def is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def check_sector_size(sector_size: int, *, for_writing: bool = False) -> int:
    """Validate a log sector size; writers need >= 512 (room for marks and the trailer)."""
    low = MIN_SECTOR_SIZE_WRITE if for_writing else MIN_SECTOR_SIZE_READ
    if not is_power_of_two(sector_size) or not low <= sector_size <= MAX_SECTOR_SIZE:
        raise ValueError(
            f"log sector size {sector_size} is not a power of two in [{low}, {MAX_SECTOR_SIZE}]"
        )
    return sector_size


def max_mark_len(sector_size: int, *, checksums: bool = True) -> int:
    """Longest mark text we write: the kernel's ``sectorsize - 32 - 1``, less the trailer.

    The kernel truncates at ``sectorsize - sizeof(entry) - 1`` (479 for 512-byte sectors) so a
    NUL always follows the text, which replay-log's ``strncmp(.., data_len + 1)`` relies on.
    """
    n = sector_size - ENTRY_SIZE - 1
    return n - TRAILER_SIZE if checksums else n


def validate_mark(text: str | bytes, sector_size: int, *, checksums: bool = True) -> bytes:
    """Return the mark as bytes or raise ValueError.

    Marks are one ``dmsetup message`` argv token: non-empty printable ASCII without whitespace
    or NUL, at most :func:`max_mark_len` bytes (we refuse rather than silently truncate).
    """
    if isinstance(text, str):
        if not text.isascii():
            raise ValueError(f"mark {text!r}: only printable ASCII without spaces is allowed")
        raw = text.encode("ascii")
    else:
        raw = bytes(text)
    if not raw:
        raise ValueError("mark text is empty")
    if any(b <= 0x20 or b >= 0x7F for b in raw):
        raise ValueError(f"mark {text!r}: only printable ASCII without spaces is allowed")
    limit = max_mark_len(sector_size, checksums=checksums)
    if len(raw) > limit:
        raise ValueError(
            f"mark is {len(raw)} bytes; at most {limit} fit a {sector_size}-byte sector"
        )
    return raw


@dataclass(frozen=True, slots=True)
class SuperBlock:
    """The decoded super sector.  ``log_id`` is set only if our extension is present."""

    nr_entries: int
    sector_size: int
    version: int = WRITE_LOG_VERSION
    log_id: int | None = None

    def pack(self) -> bytes:
        """The whole super sector: fields, zero padding (bytes 28..31 too), our extension."""
        buf = bytearray(self.sector_size)
        LOG_WRITE_SUPER.pack_into(
            buf, 0, WRITE_LOG_MAGIC, self.version, self.nr_entries, self.sector_size
        )
        if self.log_id is not None:
            SUPER_EXT.pack_into(buf, SUPER_EXT_OFFSET, SUPER_EXT_TAG, EXT_VERSION, self.log_id)
        return bytes(buf)

    @classmethod
    def unpack(cls, buf: bytes | bytearray | memoryview) -> SuperBlock:
        """Decode the first bytes of a log (at least 28; 48 to see our extension)."""
        if len(buf) < LOG_WRITE_SUPER.size:
            raise BadSuperBlock(f"too short for a super block ({len(buf)} bytes)", offset=0)
        magic, version, nr_entries, sector_size = LOG_WRITE_SUPER.unpack_from(buf, 0)
        if magic != WRITE_LOG_MAGIC:
            raise BadSuperBlock(f"not a dm-log-writes log (magic {magic:#x})", offset=0)
        if version != WRITE_LOG_VERSION:
            raise BadSuperBlock(f"unsupported log version {version}", offset=8)
        try:
            check_sector_size(sector_size)
        except ValueError as exc:
            raise BadSuperBlock(str(exc), offset=24) from None
        log_id = None
        if len(buf) >= SUPER_EXT_OFFSET + SUPER_EXT.size and sector_size >= 64:
            tag, ext_version, lid = SUPER_EXT.unpack_from(buf, SUPER_EXT_OFFSET)
            if tag == SUPER_EXT_TAG and ext_version == EXT_VERSION:
                log_id = lid
        return cls(nr_entries, sector_size, version, log_id)


@dataclass(frozen=True, slots=True)
class Trailer:
    """Our per-entry extension, decoded."""

    crc: int
    log_id: int
    ext_flags: ExtFlag
    index: int


@dataclass(frozen=True, slots=True)
class EntryHeader:
    """A decoded ``log_write_entry`` plus the mark text and our trailer (if present)."""

    sector: int
    nr_sectors: int
    flags: int
    data_len: int
    mark: bytes = b""
    trailer: Trailer | None = None

    def data_bytes(self, sector_size: int) -> int:
        """Bytes of payload after the header sector (none for discards)."""
        return 0 if self.flags & LogFlag.DISCARD else self.nr_sectors * sector_size

    @property
    def is_mark(self) -> bool:
        return bool(self.flags & LogFlag.MARK)


def flags_str(flags: int) -> str:
    """replay-log's rendering: ``FLUSH|FUA``, ``NONE``, ``UNKNOWN.0x40``."""
    names = [
        f.name
        for f in (LogFlag.FLUSH, LogFlag.FUA, LogFlag.DISCARD, LogFlag.MARK, LogFlag.METADATA)
        if flags & f
    ]
    rest = flags & ~KNOWN_FLAGS
    if rest:
        names.append(f"UNKNOWN.{rest:#x}")
    return "|".join(n for n in names if n) or "NONE"


def pack_entry_header(
    sector_size: int, sector: int, nr_sectors: int, flags: int, mark: bytes = b""
) -> bytearray:
    """One header sector without trailer: struct, mark text (marks only), zero padding."""
    buf = bytearray(sector_size)
    LOG_WRITE_ENTRY.pack_into(buf, 0, sector, nr_sectors, flags, len(mark))
    if mark:
        if len(mark) > sector_size - ENTRY_SIZE - 1:
            raise ValueError("mark text does not fit the header sector")
        buf[ENTRY_SIZE : ENTRY_SIZE + len(mark)] = mark
    return buf


def header_sector_struct(sector_size: int) -> struct.Struct:
    """One whole header sector: entry fields, zero padding, our trailer (``QQQQ`` +
    ``4sIIIQ``).  ``pack_into`` zeroes the padding itself, so the writer's fast path packs a
    header with one call into any buffer (no mark text: data entries only)."""
    st = _HEADER_SECTOR_STRUCTS.get(sector_size)
    if st is None:
        pad = sector_size - ENTRY_SIZE - TRAILER_SIZE
        st = _HEADER_SECTOR_STRUCTS[sector_size] = struct.Struct(f"<QQQQ{pad}x4sIIIQ")
    return st


_HEADER_SECTOR_STRUCTS: dict[int, struct.Struct] = {}


def seal_entry_header(
    header: bytearray,
    data: bytes | bytearray | memoryview | None,
    *,
    log_id: int,
    index: int,
    ext_flags: int = 0,
) -> int:
    """Write our trailer into ``header`` (in place) and return the CRC.

    The CRC-32 covers the whole header sector with the crc field zeroed, then the data, so a
    torn header, torn data or a stale entry from an older log at this position is detected.
    """
    pos = len(header) - TRAILER_SIZE
    TRAILER.pack_into(header, pos, TRAILER_TAG, 0, log_id, ext_flags, index)
    crc = zlib.crc32(header)
    if data:
        crc = zlib.crc32(data, crc)
    struct.pack_into("<I", header, pos + _CRC_FIELD, crc)
    return crc


def unpack_entry_header(
    buf: bytes | bytearray | memoryview,
    sector_size: int,
    *,
    entry: int | None = None,
    offset: int | None = None,
) -> EntryHeader:
    """Decode a header sector, applying replay-log's validity rules (``log_entry_valid``).

    Raises :class:`CorruptEntry` for the headers replay-log calls "Malformed": all-zero
    ``flags`` and ``nr_sectors``, or a non-mark header whose byte 32 is not 0; and for mark
    text that runs past the sector.
    """
    if len(buf) < sector_size:
        raise TruncatedLog("entry header sector is cut short", entry=entry, offset=offset)
    sector, nr_sectors, flags, data_len = LOG_WRITE_ENTRY.unpack_from(buf, 0)
    if flags == 0 and nr_sectors == 0:
        raise CorruptEntry(
            "malformed entry (flags and nr_sectors are zero)", entry=entry, offset=offset
        )
    if flags != LogFlag.MARK and buf[ENTRY_SIZE] != 0:
        raise CorruptEntry(
            "malformed entry (header not zero padded at byte 32)", entry=entry, offset=offset
        )
    mark = b""
    if flags & LogFlag.MARK:
        if data_len > sector_size - ENTRY_SIZE:
            raise CorruptEntry(
                f"mark length {data_len} exceeds the header sector", entry=entry, offset=offset
            )
        mark = bytes(buf[ENTRY_SIZE : ENTRY_SIZE + data_len]).split(b"\0", 1)[0]
    trailer = None
    if sector_size >= MIN_SECTOR_SIZE_WRITE:
        tag, crc, log_id, ext_flags, index = TRAILER.unpack_from(buf, sector_size - TRAILER_SIZE)
        end_of_text = ENTRY_SIZE + (data_len if flags & LogFlag.MARK else 0)
        if tag == TRAILER_TAG and end_of_text < sector_size - TRAILER_SIZE:
            known = ext_flags & int(ExtFlag.ZEROES | ExtFlag.SPLIT)
            trailer = Trailer(crc, log_id, ExtFlag(known), index)
    return EntryHeader(sector, nr_sectors, flags, data_len, mark, trailer)


def entry_crc(
    header: bytes | bytearray | memoryview, data_chunks: list[memoryview] | None = None
) -> int:
    """Recompute the CRC of a sealed header (+ data) the way :func:`seal_entry_header` did."""
    hdr = bytearray(header)
    struct.pack_into("<I", hdr, len(hdr) - TRAILER_SIZE + _CRC_FIELD, 0)
    crc = zlib.crc32(hdr)
    for chunk in data_chunks or ():
        crc = zlib.crc32(chunk, crc)
    return crc
