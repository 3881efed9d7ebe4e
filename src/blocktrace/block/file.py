"""Raw image file backend.

Reads and writes are plain ``pread``/``pwrite`` on the event loop thread: on a page-cached file
they cost microseconds, far less than handing them to a thread, and doing them inline means an
operation is applied the moment its coroutine runs, with no ``await`` in between, which the
trace filter relies on to give the image and the stream one order.  The calls that can block
for milliseconds (``fdatasync``, FUA writes) run in a worker thread so other clients keep
moving; that is safe because a flush only has to cover writes that completed before it.

TRIM and zeroing use ``fallocate`` (punch hole / zero range) through libc, since Python has no
wrapper; block status comes from ``SEEK_DATA``/``SEEK_HOLE``.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import errno
import os
import stat
from collections.abc import Sequence

from blocktrace.block.device import (
    Extent,
    ExtentFlags,
    PipelinedWrites,
    ReadableBuffer,
    WriteCallback,
)
from blocktrace.block.locking import EXPORT_ADVICE, READ_ONLY, WRITABLE, lock_image
from blocktrace.errors import BlockDeviceError, UsageError

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_libc.fallocate.restype = ctypes.c_int


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """Linux ``fallocate(2)``; raises OSError."""
    if _libc.fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


#: fsync(2) errors that mean "this file system cannot sync a directory", not "it failed"
_NO_DIR_SYNC = frozenset({errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP})


def fsync_dir(directory: str | os.PathLike[str]) -> None:
    """Make the directory entries of ``directory`` durable (a file created or renamed in it).

    A file system that cannot sync directories (EINVAL/EOPNOTSUPP from ``fsync``) is not an
    error: there is nothing more to do there.  Any other failure raises ``OSError``, since a
    caller that asks for this is about to promise durability.
    """
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in _NO_DIR_SYNC:
            raise
    finally:
        os.close(fd)


class FileDevice(PipelinedWrites):
    """A raw disk image (regular file or block device) opened read-write or read-only."""

    applies_inline = True

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        read_only: bool = False,
        lock: bool = False,
        lock_advice: str = EXPORT_ADVICE,
    ) -> None:
        """``lock``: take QEMU-compatible image locks (:mod:`.locking`) for as long as the
        device is open, so another writer of the same image (QEMU, qemu-nbd, a second export,
        a replica, a replay) is refused, and refuses us; ``lock_advice`` ends that refusal."""
        self.path = os.fspath(path)
        flags = os.O_RDONLY if read_only else os.O_RDWR
        try:
            self.fd = os.open(self.path, flags | os.O_CLOEXEC)
        except FileNotFoundError:
            raise UsageError(f"{self.path}: no such image") from None
        except IsADirectoryError:
            raise UsageError(f"{self.path}: is a directory, not an image") from None
        except PermissionError:
            raise UsageError(f"{self.path}: permission denied") from None
        except OSError as exc:
            raise UsageError(f"{self.path}: {exc.strerror}") from None
        if lock:
            try:
                lock_image(
                    self.fd, self.path, READ_ONLY if read_only else WRITABLE, advice=lock_advice
                )
            except BaseException:
                os.close(self.fd)
                raise
        st = os.fstat(self.fd)
        self.is_block_device = stat.S_ISBLK(st.st_mode)
        self.size = os.lseek(self.fd, 0, os.SEEK_END) if self.is_block_device else st.st_size
        self.read_only = read_only
        self.min_block_size = 1
        self.preferred_block_size = 4096
        self.can_fast_zero = True
        self._closed = False

    # -- data path ---------------------------------------------------------------------------

    async def read(self, offset: int, length: int) -> ReadableBuffer:
        try:
            data = os.pread(self.fd, length, offset)
        except OSError as exc:
            raise BlockDeviceError.from_oserror(exc) from exc
        if len(data) < length:  # past EOF of a file that shrank: reads as zeroes
            data += bytes(length - len(data))
        return data

    async def write(self, offset: int, data: ReadableBuffer, *, fua: bool = False) -> None:
        self._check_writable()
        try:
            self.pwrite_all(data, offset)
        except OSError as exc:
            raise BlockDeviceError.from_oserror(exc) from exc
        if fua:
            await self.flush()

    def pwrite_all(self, data: ReadableBuffer, offset: int) -> None:
        """Write all of ``data`` at ``offset`` now, on the calling thread (``OSError`` on
        failure): the inline write every caller that must not suspend relies on."""
        view = memoryview(data).cast("B")
        while view:
            n = os.pwrite(self.fd, view, offset)
            if n == 0:
                raise OSError(errno.ENOSPC, "short write")
            view = view[n:]
            offset += n

    async def write_many(self, items: Sequence[tuple[int, ReadableBuffer, bool]]) -> None:
        for offset, data, fua in items:
            await self.write(offset, data, fua=fua)

    def start_write(self, offset: int, data: ReadableBuffer, callback: WriteCallback) -> bool:
        """``pwrite`` now and report at once: the write is done before this returns."""
        try:
            self._check_writable()
            self.pwrite_all(data, offset)
        except OSError as exc:
            callback(BlockDeviceError.from_oserror(exc))
            return True
        except BlockDeviceError as exc:
            callback(exc)
            return True
        callback(None)
        return True

    async def flush(self) -> None:
        if self.read_only:
            return
        try:
            await asyncio.to_thread(os.fdatasync, self.fd)
        except OSError as exc:
            raise BlockDeviceError.from_oserror(exc) from exc

    async def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        self._check_writable()
        try:
            fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
                raise BlockDeviceError.from_oserror(exc) from exc
            # A file system without hole punching: a trim may leave any contents; we zero
            # anyway so that trimmed ranges read back the same everywhere (replay, replicas).
            await super().write_zeroes(offset, length)
        if fua:
            await self.flush()

    async def write_zeroes(
        self,
        offset: int,
        length: int,
        *,
        may_trim: bool = False,
        fua: bool = False,
        fast: bool = False,
    ) -> None:
        self._check_writable()
        modes = [FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE] if may_trim else []
        modes.append(FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE)
        for mode in modes:
            try:
                fallocate(self.fd, mode, offset, length)
                break
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    raise BlockDeviceError.from_oserror(exc) from exc
        else:
            await super().write_zeroes(offset, length, fast=fast)
        if fua:
            await self.flush()

    async def block_status(self, offset: int, length: int) -> list[Extent]:
        """Map holes and data with SEEK_HOLE/SEEK_DATA; holes read as zeroes."""
        end = offset + length
        extents: list[Extent] = []
        pos = offset
        try:
            while pos < end:
                try:
                    data = os.lseek(self.fd, pos, os.SEEK_DATA)
                except OSError as exc:
                    if exc.errno != errno.ENXIO:  # ENXIO: no data after pos
                        raise
                    data = end
                if data > pos:
                    n = min(data, end) - pos
                    extents.append(Extent(n, ExtentFlags.HOLE | ExtentFlags.ZERO))
                    pos += n
                    continue
                hole = os.lseek(self.fd, pos, os.SEEK_HOLE)
                n = min(hole, end) - pos
                extents.append(Extent(n, ExtentFlags.DATA))
                pos += n
        except OSError:
            # No SEEK_DATA support (or a block device): report what we know, all data.
            return extents or [Extent(length, ExtentFlags.DATA)]
        return extents

    async def cache(self, offset: int, length: int) -> None:
        os.posix_fadvise(self.fd, offset, length, os.POSIX_FADV_WILLNEED)

    async def close(self) -> None:
        if not self._closed:
            self._closed = True
            os.close(self.fd)

    def _check_writable(self) -> None:
        if self.read_only:
            raise BlockDeviceError(errno.EROFS, "read-only device")
