"""Image locking compatible with QEMU's: open file description (OFD) byte-range locks.

Why: the same image served twice writable (two exports of one file, two servers, or a QEMU
VM and blocktrace) lets a second writer change the disk behind the first one's back, and a
second writable export of a traced image bypasses the trace.  QEMU solved this for its own
processes (block/file-posix.c), and libvirt, qemu-img, qemu-io, qemu-nbd and
qemu-storage-daemon all honour the same protocol, so speaking it makes QEMU and blocktrace
refuse each other, with no lock file and nothing left behind after a crash (OFD locks die
with the file description).

The protocol (learnt from QEMU's documentation and source, not copied): each block-layer
permission has a bit number ``i``; a user *holding* permission ``i`` read-locks byte
``PERM_BASE + i``, and a user *not sharing* permission ``i`` with others read-locks byte
``SHARED_BASE + i``.  A new user first takes its own bytes, then tests (``F_OFD_GETLK`` with a
write lock) the bytes that would conflict: ``SHARED_BASE + i`` for every permission it wants
(someone refuses to share it) and ``PERM_BASE + i`` for every permission it refuses to share
(someone holds it).  Taking before testing means two users starting at once both see each
other and both refuse, rather than both proceeding.

What blocktrace takes (:data:`WRITABLE` and :data:`READ_ONLY`):

==========  ===========================  ==========================================
export      holds (PERM_BASE + i)         does not share (SHARED_BASE + i)
==========  ===========================  ==========================================
writable    consistent-read, write        write, resize
read-only   consistent-read               resize
==========  ===========================  ==========================================

So a writable export refuses any other writer (a VM, ``qemu-io`` writing, ``qemu-nbd``, a
second export) and is refused while one is there; a read-only export coexists with other
readers and with writers that share writing, as ``qemu-nbd --read-only`` does; ``qemu-img
info`` without ``-U`` on an image a writable export holds fails exactly as it does on a
running VM's disk.
"""

from __future__ import annotations

import enum
import errno
import fcntl
import os
import struct
from dataclasses import dataclass

from blocktrace.errors import UsageError

#: Lock byte of "holds permission i" is PERM_BASE + i; of "does not share it", SHARED_BASE + i.
PERM_BASE = 100
SHARED_BASE = 200

# struct flock (Linux, 64-bit off_t): short l_type, short l_whence, off_t l_start,
# off_t l_len, pid_t l_pid (must be 0 for OFD locks), padded to its C size.
_FLOCK = struct.Struct("@hhqqi4x")


class Perm(enum.IntFlag):
    """QEMU's block permissions (``BLK_PERM_*``); the bit number is the lock byte offset."""

    CONSISTENT_READ = 0x01
    WRITE = 0x02
    WRITE_UNCHANGED = 0x04
    RESIZE = 0x08


PERM_NAMES = {
    Perm.CONSISTENT_READ: "consistent read",
    Perm.WRITE: "write",
    Perm.WRITE_UNCHANGED: "write unchanged",
    Perm.RESIZE: "resize",
}


@dataclass(frozen=True)
class LockMode:
    """The permissions an open holds and the ones it does not share with other users."""

    held: Perm
    unshared: Perm


WRITABLE = LockMode(held=Perm.CONSISTENT_READ | Perm.WRITE, unshared=Perm.WRITE | Perm.RESIZE)
READ_ONLY = LockMode(held=Perm.CONSISTENT_READ, unshared=Perm.RESIZE)


class ImageLockedError(UsageError):
    """Another user of the image holds, or refuses to share, a permission this open needs."""

    def __init__(self, path: str, perm: Perm, *, shared: bool) -> None:
        self.path = path
        self.perm = perm
        #: True: someone holds ``perm`` which we refuse to share; False: someone refuses to
        #: share ``perm`` which we want (QEMU's 'Failed to get [shared] "perm" lock').
        self.shared = shared
        what = f'shared "{PERM_NAMES[perm]}"' if shared else f'"{PERM_NAMES[perm]}"'
        super().__init__(
            f"{path}: failed to get {what} lock: the image is in use by another process or "
            "export (QEMU, qemu-nbd, another blocktrace); stop it or serve read-only"
        )


def _bits(perms: Perm) -> list[Perm]:
    return [p for p in Perm if p & perms]


def _set(fd: int, cmd: int, kind: int, offset: int) -> bytes:
    return fcntl.fcntl(fd, cmd, _FLOCK.pack(kind, os.SEEK_SET, offset, 1, 0))


def _lock(fd: int, offset: int) -> None:
    _set(fd, fcntl.F_OFD_SETLK, fcntl.F_RDLCK, offset)


def _in_use(fd: int, offset: int) -> bool:
    """Does any *other* file description hold a lock on this byte (``F_OFD_GETLK``)?"""
    out = _set(fd, fcntl.F_OFD_GETLK, fcntl.F_WRLCK, offset)
    kind: int = _FLOCK.unpack(out)[0]
    return kind != fcntl.F_UNLCK


def lock_image(fd: int, path: str, mode: LockMode) -> None:
    """Take ``mode``'s lock bytes on ``fd``, then check nobody conflicts with them.

    Raises :class:`ImageLockedError` on a conflict (the caller closes ``fd``, which drops what
    was taken) and :class:`UsageError` if the file system refuses OFD locks outright.
    """
    try:
        for p in _bits(mode.held):
            _lock(fd, PERM_BASE + p.bit_length() - 1)
        for p in _bits(mode.unshared):
            _lock(fd, SHARED_BASE + p.bit_length() - 1)
        for p in _bits(mode.held):
            if _in_use(fd, SHARED_BASE + p.bit_length() - 1):
                raise ImageLockedError(path, p, shared=False)
        for p in _bits(mode.unshared):
            if _in_use(fd, PERM_BASE + p.bit_length() - 1):
                raise ImageLockedError(path, p, shared=True)
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EACCES):  # a write lock on our byte: a conflict
            raise ImageLockedError(path, Perm.WRITE, shared=False) from None
        raise UsageError(f"{path}: cannot lock the image: {exc.strerror}") from None
