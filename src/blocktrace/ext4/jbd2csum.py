"""JBD2 checksums: CRC32C (csum v2/v3) and big-endian CRC32 (v1 ``COMPAT_CHECKSUM``).

Why: a transaction whose blocks did not all reach the disk (torn: the guest or host crashed
mid-commit, a stale block from an earlier pass round the ring) or were corrupted must not be
turned into events; the kernel's recovery (``fs/jbd2/recovery.c``) tells them apart by these
checksums, and so does :mod:`.journal`.

Both CRCs use the kernel's convention (``crc32c(seed, buf, len)``, ``crc32_be(seed, buf,
len)``): the caller passes the running value, no inversion before or after.  The standard
library has neither, so: e2fsprogs' ``libext2fs`` (installed wherever ``mkfs.ext4`` is) through
ctypes when it loads (about 9 us per 4 KiB block), else table-driven Python (correct, about
170x slower: fine for the few metadata blocks a journal carries, slow for heavy streams).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable

Buffer = bytes | bytearray | memoryview
_MASK = 0xFFFFFFFF


def _py_table(poly: int) -> list[int]:
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ poly if c & 1 else c >> 1
        table.append(c)
    return table


_CRC32C_TABLE: list[int] = []  # Castagnoli, reflected; built on first use


def py_crc32c(crc: int, data: Buffer) -> int:
    """CRC32C (Castagnoli, little-endian bit order) of ``data`` continuing from ``crc``."""
    if not _CRC32C_TABLE:
        _CRC32C_TABLE.extend(_py_table(0x82F63B78))
    table = _CRC32C_TABLE
    crc &= _MASK
    for b in bytes(data):
        crc = table[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc


_REV8 = bytes(int(f"{n:08b}"[::-1], 2) for n in range(256))


def _rev32(x: int) -> int:
    return int(f"{x & _MASK:032b}"[::-1], 2)


def py_crc32_be(crc: int, data: Buffer) -> int:
    """The kernel's ``crc32_be`` (poly 0x04C11DB7, most significant bit first) from ``crc``.

    Computed with zlib's reflected CRC-32 on bit-reversed bytes: reversing every input bit
    turns the MSB-first register into the LSB-first one, with its value bit-reversed."""
    raw = zlib.crc32(bytes(data).translate(_REV8), _rev32(crc) ^ _MASK) ^ _MASK
    return _rev32(raw)


def _load() -> tuple[Callable[[int, Buffer], int], Callable[[int, Buffer], int], str]:
    import ctypes  # here, not at import: most streams never need a JBD2 checksum

    lib = None
    for name in ("libext2fs.so.2", "libext2fs.so"):  # find_library() would spawn ldconfig
        try:
            lib = ctypes.CDLL(name)
            c32c, c32be = lib.ext2fs_crc32c_le, lib.ext2fs_crc32_be
            break
        except (OSError, AttributeError):
            lib = None
    if lib is None:
        return py_crc32c, py_crc32_be, "python"
    for fn in (c32c, c32be):
        fn.restype = ctypes.c_uint32
        fn.argtypes = [ctypes.c_uint32, ctypes.c_char_p, ctypes.c_size_t]

    def crc32c(crc: int, data: Buffer) -> int:
        b = data if isinstance(data, bytes) else bytes(data)
        return int(c32c(crc & _MASK, b, len(b)))

    def crc32_be(crc: int, data: Buffer) -> int:
        b = data if isinstance(data, bytes) else bytes(data)
        return int(c32be(crc & _MASK, b, len(b)))

    # trust the library only if it gives the standard check values ("123456789")
    probe = b"123456789"
    if crc32c(_MASK, probe) != 0xE3069283 ^ _MASK or crc32_be(_MASK, probe) != 0xFC891918 ^ _MASK:
        return py_crc32c, py_crc32_be, "python"
    return crc32c, crc32_be, "libext2fs"


_impl: tuple[Callable[[int, Buffer], int], Callable[[int, Buffer], int], str] | None = None


def implementation() -> str:
    """``libext2fs`` or ``python``: which CRC code is in use (loaded on first use)."""
    global _impl
    if _impl is None:
        _impl = _load()
    return _impl[2]


def crc32c(crc: int, data: Buffer) -> int:
    """The kernel's ``crc32c(crc, data, len)``."""
    if _impl is None:
        implementation()
    assert _impl is not None
    return _impl[0](crc, data)


def crc32_be(crc: int, data: Buffer) -> int:
    """The kernel's ``crc32_be(crc, data, len)``."""
    if _impl is None:
        implementation()
    assert _impl is not None
    return _impl[1](crc, data)
