"""Dirty-region bitmap: which regions of a replica may differ from its source.

One bit per ``granularity`` bytes (64 KiB by default, QEMU's dirty-bitmap default; DRBD uses
4 KiB), set when a region's write could not be applied to the replica (disconnect, ENOSPC) or
was applied but not yet made durable there, cleared only after the region was copied from the
source *and* the replica flushed.  A set bit is therefore always safe (it costs a re-copy of
the region); a missing bit would be a silent divergence, so every path that drops a write to
the replica sets bits first.

Pure data, no I/O: :mod:`blocktrace.replica.meta` persists it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator

DEFAULT_GRANULARITY = 64 * 1024
_NONZERO = re.compile(b"[^\x00]")


class DirtyBitmap:
    """A bit per ``granularity`` bytes of a ``size``-byte device."""

    __slots__ = ("_bits", "_shift", "granularity", "nbits", "size")

    def __init__(self, size: int, granularity: int = DEFAULT_GRANULARITY) -> None:
        if granularity < 512 or granularity & (granularity - 1):
            raise ValueError(f"granularity must be a power of two >= 512, not {granularity}")
        self.size = size
        self.granularity = granularity
        self._shift = granularity.bit_length() - 1
        self.nbits = (size + granularity - 1) >> self._shift
        self._bits = bytearray((self.nbits + 7) // 8)

    # -- updates -----------------------------------------------------------------------------

    def mark(self, offset: int, length: int) -> None:
        """Set the bits of every region ``[offset, offset+length)`` touches."""
        if length <= 0:
            return
        first = offset >> self._shift
        last = min((offset + length - 1) >> self._shift, self.nbits - 1)
        self._set_range(first, last, True)

    def mark_many(self, extents: Iterable[tuple[int, int]]) -> None:
        """:meth:`mark` for many ``(offset, length)``; a region-sized or smaller extent inside
        one region (the replica's per-record case) sets its bit without a call."""
        bits, shift, nbits = self._bits, self._shift, self.nbits
        for offset, length in extents:
            first = offset >> shift
            if length > 0 and first == (offset + length - 1) >> shift and first < nbits:
                bits[first >> 3] |= 1 << (first & 7)
            else:
                self.mark(offset, length)

    def clear(self, offset: int, length: int) -> None:
        """Clear the bits of regions *entirely* inside ``[offset, offset+length)``."""
        g = self.granularity
        first = (offset + g - 1) >> self._shift
        end = offset + length
        last = (end >> self._shift) - 1
        if end >= self.size:  # the last, possibly partial, region counts as covered
            last = self.nbits - 1
        if last >= first:
            self._set_range(first, last, False)

    def clear_all(self) -> None:
        self._bits[:] = bytes(len(self._bits))

    def merge(self, other: DirtyBitmap) -> None:
        """OR ``other`` (same geometry) into this bitmap."""
        if other.nbits != self.nbits or other.granularity != self.granularity:
            raise ValueError("bitmaps of different geometry")
        self._bits[:] = (
            int.from_bytes(self._bits, "little") | int.from_bytes(other._bits, "little")
        ).to_bytes(len(self._bits), "little")

    def _set_range(self, first: int, last: int, value: bool) -> None:
        bits = self._bits
        i = first
        while i <= last:
            byte, bit = divmod(i, 8)
            if bit == 0 and i + 7 <= last:  # whole bytes at a time
                nbytes = (last + 1 - i) // 8
                bits[byte : byte + nbytes] = (b"\xff" if value else b"\x00") * nbytes
                i += nbytes * 8
                continue
            if value:
                bits[byte] |= 1 << bit
            else:
                bits[byte] &= ~(1 << bit) & 0xFF
            i += 1

    # -- queries -----------------------------------------------------------------------------

    def test(self, offset: int) -> bool:
        i = offset >> self._shift
        return bool(self._bits[i >> 3] & (1 << (i & 7)))

    def count(self) -> int:
        """Number of dirty regions."""
        return int.from_bytes(self._bits, "little").bit_count()

    def dirty_bytes(self) -> int:
        """Bytes covered by dirty regions (the last region clipped to the device size)."""
        n = self.count() * self.granularity
        if n and self.test(self.size - 1):
            n -= self.nbits * self.granularity - self.size
        return n

    def __bool__(self) -> bool:
        return _NONZERO.search(self._bits) is not None

    def runs(self, max_run: int | None = None, start: int = 0) -> Iterator[tuple[int, int]]:
        """Coalesced dirty ``(offset, length)`` runs in offset order from byte offset
        ``start`` (rounded down to a region), clipped to ``size``, each at most ``max_run``
        bytes when given.  Clean stretches are skipped at C speed (a regex over the bytes)."""
        bits = self._bits
        g = self.granularity
        n = self.nbits
        i = start >> self._shift
        while i < n:
            if not bits[i >> 3] & (1 << (i & 7)):
                if i & 7 == 0 or not bits[i >> 3] >> (i & 7):
                    m = _NONZERO.search(bits, (i >> 3) + (1 if i & 7 else 0))
                    if m is None:
                        return
                    i = max(i, m.start() * 8)
                while i < n and not bits[i >> 3] & (1 << (i & 7)):
                    i += 1
                continue
            first = i
            while i < n and bits[i >> 3] & (1 << (i & 7)):
                i += 1
            off = first * g
            end = min(i * g, self.size)
            while off < end:
                step = end - off if max_run is None else min(max_run, end - off)
                yield off, step
                off += step

    # -- serialisation -----------------------------------------------------------------------

    def to_bytes(self) -> bytes:
        return bytes(self._bits)

    @classmethod
    def from_bytes(cls, size: int, granularity: int, raw: bytes) -> DirtyBitmap:
        bm = cls(size, granularity)
        if len(raw) != len(bm._bits):
            raise ValueError(f"bitmap is {len(raw)} bytes, expected {len(bm._bits)}")
        bm._bits[:] = raw
        # Bits past nbits in the last byte must be clear for count() to be exact.
        extra = len(bm._bits) * 8 - bm.nbits
        if extra and bm._bits:
            bm._bits[-1] &= (1 << (8 - extra)) - 1
        return bm

    def copy(self) -> DirtyBitmap:
        return DirtyBitmap.from_bytes(self.size, self.granularity, self.to_bytes())

    def __repr__(self) -> str:
        return f"DirtyBitmap({self.count()}/{self.nbits} x {self.granularity})"
