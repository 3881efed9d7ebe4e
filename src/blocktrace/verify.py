"""Compare two disk images fast: the first differing byte offset and how many blocks differ.

Design: a *source* is anything with a size and positional reads (:class:`Source`).
:func:`open_source` picks an opener by URI scheme from :data:`SOURCE_OPENERS`; plain paths are
files.  Other modules register more schemes (the replica work adds ``nbd://``,
``nbd+unix://``...) with :func:`register_source`, so ``blocktrace verify`` compares an image
with a live NBD export without changing this module.

The comparison reads both sources in large chunks (8 MiB) and compares whole chunks with one
``==`` (memcmp); only a chunk that differs is examined block by block.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from blocktrace.block.source import FileSource
from blocktrace.errors import UsageError

CHUNK = 8 * 1024 * 1024
DEFAULT_BLOCK_SIZE = 4096


class Source(Protocol):
    """A readable image: ``size`` bytes, positional reads, ``close``."""

    name: str
    size: int

    def read(self, offset: int, length: int) -> bytes:
        """Exactly ``length`` bytes at ``offset`` (callers stay within ``size``)."""
        ...

    def close(self) -> None: ...


#: URI scheme -> opener.  Plain paths (no ``scheme://``) open as files.
SOURCE_OPENERS: dict[str, Callable[[str], Source]] = {"file": lambda s: FileSource(s[7:])}


def _open_nbd(spec: str) -> Source:
    """NBD URIs (``nbd://HOST:PORT/NAME``, ``nbd+unix:///NAME?socket=PATH``): imported lazily."""
    from blocktrace.nbd.source import NBDSource

    return NBDSource(spec)


SOURCE_OPENERS.update({"nbd": _open_nbd, "nbd+unix": _open_nbd, "nbds": _open_nbd})
_SCHEME = re.compile(r"^([a-z][a-z0-9+.-]*)://", re.IGNORECASE)


def register_source(scheme: str, opener: Callable[[str], Source]) -> None:
    """Let ``open_source`` handle ``scheme://...`` specs (e.g. NBD URIs)."""
    SOURCE_OPENERS[scheme.lower()] = opener


def open_source(spec: str) -> Source:
    """Open a path or URI for reading."""
    m = _SCHEME.match(spec)
    if m is None:
        return FileSource(spec)
    opener = SOURCE_OPENERS.get(m.group(1).lower())
    if opener is None:
        raise UsageError(f"{spec}: unsupported source scheme {m.group(1)!r}")
    return opener(spec)


@dataclass(frozen=True, slots=True)
class VerifyResult:
    size_a: int
    size_b: int
    block_size: int
    first_difference: int | None  # byte offset, None if identical
    differing_blocks: int
    total_blocks: int
    #: coalesced differing ``(offset, length)`` byte ranges, block-aligned (the first
    #: MAX_REGIONS of them; ``differing_blocks`` counts them all)
    regions: tuple[tuple[int, int], ...] = ()

    @property
    def identical(self) -> bool:
        return self.first_difference is None


def compare(
    a: Source,
    b: Source,
    *,
    block_size: int = DEFAULT_BLOCK_SIZE,
    chunk: int = CHUNK,
    progress: Callable[[int], None] | None = None,
) -> VerifyResult:
    """Compare two sources.  Bytes past the shorter one count as differing blocks.

    ``progress`` is called with the number of bytes compared so far after each chunk.
    """
    if block_size <= 0:
        raise UsageError("block size must be positive")
    chunk = max(block_size, chunk - chunk % block_size)
    common = min(a.size, b.size)
    longest = max(a.size, b.size)
    first: int | None = None
    differing = 0
    partial_differs = False  # the block straddling the end of the shorter source
    regions: list[tuple[int, int]] = []
    pos = 0
    while pos < common:
        n = min(chunk, common - pos)
        da = a.read(pos, n)
        db = b.read(pos, n)
        if da != db:
            for off in range(0, n, block_size):
                ba = da[off : off + block_size]
                bb = db[off : off + block_size]
                if ba != bb:
                    _add_region(regions, pos + off, len(ba))
                    differing += 1
                    partial_differs = pos + off + block_size > common
                    if first is None:
                        first = pos + off + _first_mismatch(ba, bb)
        pos += n
        if progress is not None:
            progress(pos)
    if longest > common:
        differing += -(-longest // block_size) - -(-common // block_size)
        if common % block_size and not partial_differs:
            differing += 1
        if first is None:
            first = common
        tail = common - common % block_size if not partial_differs else common
        _add_region(regions, tail, longest - tail)
        if progress is not None:
            progress(longest)
    return VerifyResult(
        a.size,
        b.size,
        block_size,
        first,
        differing,
        -(-longest // block_size),
        tuple(regions[:MAX_REGIONS]),
    )


#: differing regions kept in a result (a summary, not an inventory)
MAX_REGIONS = 1000


def _add_region(regions: list[tuple[int, int]], offset: int, length: int) -> None:
    if length <= 0:
        return
    if regions and regions[-1][0] + regions[-1][1] >= offset:
        start = regions[-1][0]
        regions[-1] = (start, max(regions[-1][0] + regions[-1][1], offset + length) - start)
    elif len(regions) <= MAX_REGIONS:
        regions.append((offset, length))


def _first_mismatch(x: bytes, y: bytes) -> int:
    """Index of the first differing byte (binary search on slices keeps it in C)."""
    lo, hi = 0, min(len(x), len(y))
    while hi - lo > 64:
        mid = (lo + hi) // 2
        if x[lo:mid] != y[lo:mid]:
            hi = mid
        else:
            lo = mid
    for i in range(lo, hi):
        if x[i] != y[i]:
            return i
    return hi


def verify(
    spec_a: str,
    spec_b: str,
    *,
    block_size: int = DEFAULT_BLOCK_SIZE,
    progress: Callable[[int], None] | None = None,
) -> VerifyResult:
    """Open both specs and :func:`compare` them."""
    a = open_source(spec_a)
    try:
        b = open_source(spec_b)
        try:
            return compare(a, b, block_size=block_size, progress=progress)
        finally:
            b.close()
    finally:
        a.close()
