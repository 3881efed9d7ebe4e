"""Copy-on-write views of a disk being replayed: the base read through, never copied.

Why: checking a log at hundreds of crash points with one full copy of the disk per point costs
a copy per point (time and disk space).  Here the log is replayed *once*, forward, into a
sparse :class:`Layer` over the read-only base; a crash point is a :class:`View`, a throw-away
layer on top, served to the checker as an ordinary :class:`~blocktrace.block.device.BlockDevice`
(so the NBD server exports it and the kernel mounts it through nbdfuse + loop).

A view must keep showing the disk *as it was at its point* while the replay moves on for the
next points (``--jobs``): before the replay changes a granule, it copies the granule's current
content into every open view that does not hold it yet (copy-before-write).  A view therefore
holds two kinds of granules in one sparse file: those the checker wrote (journal replay during
mount) and those preserved from the replay; both shadow what lies below.  Disk space is the
base, the replay layer (the log's distinct data) and, per open view, what changed since its
point plus what its checker wrote: bounded by the views open at once, not by the points.

Layout of a layer (one table, so the on-disk form is explicit):

=========================  ===============================================================
sparse file, ``size``      granule ``g`` lives at byte ``g * GRANULE`` when present
``present`` (bytearray)    one byte per granule: 1 = this layer holds it, 0 = read below
=========================  ===============================================================

The files are created ``O_EXCL | O_NOFOLLOW`` inside the run's private directory and deleted
when the layer closes.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator

from blocktrace.block.device import BlockDevice, Extent, ExtentFlags, ReadableBuffer
from blocktrace.block.file import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, fallocate
from blocktrace.errors import BlockDeviceError, UsageError

#: Copy-on-write unit.  File systems and the loop device do 4 KiB I/O; a smaller write costs
#: one read-modify-write of its granule.
GRANULE = 4096


def _runs(present: bytearray, g0: int, g1: int) -> Iterator[tuple[int, int, bool]]:
    """Maximal runs ``(start, end, held)`` of ``present[g0:g1]`` (``bytes.find``: C speed)."""
    g = g0
    while g < g1:
        held = present[g] != 0
        nxt = present.find(b"\0" if held else b"\1", g, g1)
        end = g1 if nxt < 0 else nxt
        yield g, end, held
        g = end


def _pwrite_all(fd: int, data: ReadableBuffer, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n


class Layer:
    """A sparse file plus a presence map: the granules one layer of the stack holds."""

    def __init__(self, path: str, size: int) -> None:
        self.path = path
        self.size = size
        self.fd = os.open(
            path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
        )
        os.ftruncate(self.fd, size)
        self.present = bytearray(-(-size // GRANULE))

    def pread(self, offset: int, length: int) -> bytes:
        data = os.pread(self.fd, length, offset)
        return data if len(data) == length else data.ljust(length, b"\0")

    def store(self, offset: int, data: ReadableBuffer) -> None:
        """Write granule-aligned ``data`` (the last granule may end at ``size``)."""
        _pwrite_all(self.fd, data, offset)
        g0 = offset // GRANULE
        g1 = -(-(offset + len(data)) // GRANULE)
        self.present[g0:g1] = b"\1" * (g1 - g0)

    def store_zeroes(self, offset: int, length: int) -> None:
        """Granule-aligned zeroes: punch a hole (no data written, no space used)."""
        try:
            fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise
            _pwrite_all(self.fd, bytes(length), offset)
        g0, g1 = offset // GRANULE, -(-(offset + length) // GRANULE)
        self.present[g0:g1] = b"\1" * (g1 - g0)

    def allocated(self) -> int:
        """Bytes of disk space the layer's file uses."""
        return os.fstat(self.fd).st_blocks * 512

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
            os.unlink(self.path)


class Stack:
    """The base image (read-only) under the replay layer; makes views and applies the log.

    Synchronous on purpose: every method completes without yielding, so when the NBD server
    and the replay share one event loop, a read of a view never sees half a replayed entry.
    """

    def __init__(self, base: str, workdir: str) -> None:
        self.base_path = base
        self.workdir = workdir
        try:
            self.base_fd = os.open(base, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise UsageError(f"{base}: cannot open the base image: {exc.strerror}") from None
        st = os.fstat(self.base_fd)
        self.size = st.st_size if st.st_size else os.lseek(self.base_fd, 0, os.SEEK_END)
        self._serial = 0
        self.replay = self._layer("replay")
        self.views: list[View] = []

    def _layer(self, name: str) -> Layer:
        self._serial += 1
        return Layer(os.path.join(self.workdir, f"{name}-{self._serial}.layer"), self.size)

    # -- reading ------------------------------------------------------------------------------

    def read(self, offset: int, length: int, layers: tuple[Layer, ...] = ()) -> bytes:
        """Bytes at ``offset`` through ``layers`` (top first), then the replay layer, then base."""
        return b"".join(self._read_pieces(offset, length, (*layers, self.replay)))

    def _read_pieces(self, offset: int, length: int, layers: tuple[Layer, ...]) -> Iterator[bytes]:
        if not layers:
            data = os.pread(self.base_fd, length, offset)
            yield data if len(data) == length else data.ljust(length, b"\0")
            return
        top, rest = layers[0], layers[1:]
        end = offset + length
        for g0, g1, held in _runs(top.present, offset // GRANULE, -(-end // GRANULE)):
            lo, hi = max(offset, g0 * GRANULE), min(end, g1 * GRANULE)
            if held:
                yield top.pread(lo, hi - lo)
            else:
                yield from self._read_pieces(lo, hi - lo, rest)

    # -- writing ------------------------------------------------------------------------------

    def _granules(self, offset: int, length: int) -> tuple[int, int]:
        start = offset // GRANULE * GRANULE
        end = min(self.size, -(-(offset + length) // GRANULE) * GRANULE)
        return start, end

    def _merge(
        self, offset: int, data: ReadableBuffer, layers: tuple[Layer, ...]
    ) -> tuple[int, bytes | ReadableBuffer]:
        """``data`` widened to whole granules with what ``layers`` show around it."""
        start, end = self._granules(offset, len(data))
        if start == offset and end == offset + len(data):
            return start, data
        buf = bytearray(self.read(start, end - start, layers))
        buf[offset - start : offset - start + len(data)] = data
        return start, buf

    def _preserve(self, offset: int, length: int) -> None:
        """Copy-before-write: every open view keeps the granules about to change."""
        start, end = self._granules(offset, length)
        for view in self.views:
            for g0, g1, held in _runs(view.layer.present, start // GRANULE, -(-end // GRANULE)):
                if not held:
                    lo, hi = g0 * GRANULE, min(self.size, g1 * GRANULE)
                    view.layer.store(lo, self.read(lo, hi - lo))

    def apply_write(self, offset: int, data: ReadableBuffer) -> None:
        """Replay one write (the caller checked it lies inside the disk)."""
        self._preserve(offset, len(data))
        start, buf = self._merge(offset, data, ())
        self.replay.store(start, buf)

    def apply_zeroes(self, offset: int, length: int) -> None:
        """Replay a discard or write-zeroes: the range reads as zeroes afterwards."""
        self._preserve(offset, length)
        end = offset + length
        inner0 = -(-offset // GRANULE) * GRANULE
        inner1 = min(self.size, end // GRANULE * GRANULE) if end < self.size else self.size
        if inner0 >= inner1:
            self.apply_write(offset, bytes(length))
            return
        if offset < inner0:
            self.apply_write(offset, bytes(inner0 - offset))
        self.replay.store_zeroes(inner0, inner1 - inner0)
        if inner1 < end:
            self.apply_write(inner1, bytes(end - inner1))

    # -- views --------------------------------------------------------------------------------

    def view(self, name: str) -> View:
        """A device showing the disk as replayed so far, private to one checker."""
        v = View(self, self._layer(name), name)
        self.views.append(v)
        return v

    def reset(self) -> None:
        """Forget the replay (for ``--bisect`` going backwards); views must be closed."""
        if self.views:
            raise RuntimeError("reset with open views")
        self.replay.close()
        self.replay = self._layer("replay")

    def allocated(self) -> int:
        """Disk space used by the replay layer and every open view."""
        return self.replay.allocated() + sum(v.layer.allocated() for v in self.views)

    def close(self) -> None:
        for v in list(self.views):
            v.discard()
        self.replay.close()
        if self.base_fd >= 0:
            os.close(self.base_fd)
            self.base_fd = -1


class View(BlockDevice):
    """The disk at one crash point: reads fall through to the replay layer and the base;
    writes (the checker's journal recovery) land in a private layer dropped by :meth:`discard`.
    Flush and FUA are no-ops: nothing here outlives the check."""

    def __init__(self, stack: Stack, layer: Layer, name: str) -> None:
        self.stack = stack
        self.layer = layer
        self.name = name
        self.size = stack.size
        self.min_block_size = 512
        self.preferred_block_size = GRANULE

    async def read(self, offset: int, length: int) -> ReadableBuffer:
        return self.stack.read(offset, length, (self.layer,))

    async def write(self, offset: int, data: ReadableBuffer, *, fua: bool = False) -> None:
        self._check_open()
        start, buf = self.stack._merge(offset, data, (self.layer,))
        self.layer.store(start, buf)

    async def flush(self) -> None:
        pass

    async def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        await self.write_zeroes(offset, length, may_trim=True)  # the base class: 1 MiB chunks

    async def block_status(self, offset: int, length: int) -> list[Extent]:
        return [Extent(length, ExtentFlags.DATA)]

    def _check_open(self) -> None:
        if self.layer.fd < 0:
            raise BlockDeviceError(errno.ESHUTDOWN, f"view {self.name} was discarded")

    def discard(self) -> None:
        """Drop the view's layer (its file is deleted) and stop preserving for it."""
        if self in self.stack.views:
            self.stack.views.remove(self)
        self.layer.close()

    async def close(self) -> None:
        self.discard()
