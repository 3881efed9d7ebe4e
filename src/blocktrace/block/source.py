"""FileSource: a raw image opened read-only for plain blocking reads.

Offline tools read images without a device stack or an event loop: ``blocktrace verify``
compares two images (:meth:`FileSource.read`, exact, a short read is an error), and the ext4
watcher reads its base image (:meth:`FileSource.pread`, the ``ByteSource`` of the ext4 model:
reads past the end give zeroes, so a truncated image looks like a disk with empty blocks).
"""

from __future__ import annotations

import os
import stat

from blocktrace.errors import UsageError


class FileSource:
    """A regular file or block device, read-only.  ``size``: the whole file; ``length``:
    the bytes :meth:`pread` addresses, from ``offset`` (a partition inside the image)."""

    def __init__(
        self, path: str | os.PathLike[str], offset: int = 0, length: int | None = None
    ) -> None:
        self.name = os.fspath(path)
        try:
            self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise UsageError(f"cannot open {self.name}: {exc.strerror}") from exc
        st = os.fstat(self.fd)
        if stat.S_ISDIR(st.st_mode):
            os.close(self.fd)
            raise UsageError(f"{self.name} is a directory")
        self.size = st.st_size if stat.S_ISREG(st.st_mode) else os.lseek(self.fd, 0, os.SEEK_END)
        self.offset = offset
        self.length = max(0, self.size - offset) if length is None else length

    def read(self, offset: int, length: int) -> bytes:
        """Exactly ``length`` bytes at ``offset`` of the file (callers stay within ``size``)."""
        data = os.pread(self.fd, length, offset)
        while len(data) < length:  # short reads on devices/pipes-backed files
            more = os.pread(self.fd, length - len(data), offset + len(data))
            if not more:
                raise UsageError(f"{self.name}: unexpected end of data at byte {offset}")
            data += more
        return data

    def pread(self, offset: int, length: int) -> bytes:
        """``length`` bytes at ``offset`` of the slice; past its end reads as zeroes."""
        if offset < 0 or length <= 0:
            return b""
        avail = max(0, min(length, self.length - offset))
        data = os.pread(self.fd, avail, self.offset + offset) if avail else b""
        return data + bytes(length - len(data)) if len(data) < length else data

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
