"""Copying one region from the source to the replica: the unit of every synchronisation.

Used by the replica engine's background worker (:mod:`blocktrace.replica.target`) under its
delivery lock.  Zero and hole extents of the source are zeroed on the replica rather than
copied (a sparse 1 TiB source costs a few WRITE_ZEROES, not a terabyte), and in *compare* mode
(after an unclean stop) a range is written only where the replica's bytes differ.
"""

from __future__ import annotations

from dataclasses import dataclass

from blocktrace.block.device import BlockDevice, ExtentFlags


class SourceReadError(Exception):
    """Reading the *source* failed (``__cause__``): fatal, unlike a failing replica."""


@dataclass
class CopyStats:
    copied: int = 0  #: bytes written to the replica (zeroed ranges included)
    compared: int = 0  #: bytes read on both sides to compare


async def copy_region(
    dev: BlockDevice,
    src: BlockDevice,
    offset: int,
    length: int,
    *,
    compare: bool,
    stats: CopyStats,
) -> None:
    """Make ``dev`` equal ``src`` over ``[offset, offset+length)``.

    Raises :class:`SourceReadError` when the source fails; replica errors propagate as
    they are (the caller degrades).
    """
    try:
        extents = await src.block_status(offset, length) if src.can_extents else []
    except Exception as exc:
        raise SourceReadError() from exc
    pos, end = offset, offset + length
    for ext in extents:
        n = min(ext.length, end - pos)
        if n <= 0:
            break
        if ext.flags & ExtentFlags.ZERO:
            if compare:
                stats.compared += n
            if not compare or bytes(await dev.read(pos, n)).count(0) != n:
                await dev.write_zeroes(pos, n, may_trim=bool(ext.flags & ExtentFlags.HOLE))
                stats.copied += n
        else:
            await _copy_data(dev, src, pos, n, compare, stats)
        pos += n
    if pos < end:
        await _copy_data(dev, src, pos, end - pos, compare, stats)


async def _copy_data(
    dev: BlockDevice, src: BlockDevice, offset: int, length: int, compare: bool, stats: CopyStats
) -> None:
    try:
        data = bytes(await src.read(offset, length))
    except Exception as exc:
        raise SourceReadError() from exc
    if compare:
        stats.compared += length
        if bytes(await dev.read(offset, length)) == data:
            return
    if data.count(0) == length:
        await dev.write_zeroes(offset, length)
    else:
        await dev.write(offset, data)
    stats.copied += length
