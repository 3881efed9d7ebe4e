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

Who takes them (one helper, :func:`lock_image`, for all): every writable export and
read-only export (:class:`~blocktrace.block.file.FileDevice` with ``lock=True``), and
everything else blocktrace *writes* for as long as it writes it, all :data:`WRITABLE`: a
``replica:`` target's image (also while it resyncs or compares), the image of ``replay``
(a log or a JetStream trace) and of ``follow``, and every output of a trace (a log, an events
file; :func:`blocktrace.outfile.open_output` calls back into :func:`lock_image`).  So a log
naming a live replica's image, a replica naming a live log or another replica's image, and
any of them naming an image QEMU holds, are refused by the kernel's view of the *file* (the
locks are on the inode), whatever path, link or bind mount names it.

The holder of a conflicting lock is named where the kernel shows it: an OFD lock has no
owner pid (``/proc/locks`` says -1), but ``/proc/PID/fdinfo/FD`` lists the locks each open
file description holds (:func:`lock_holders`).
"""

from __future__ import annotations

import enum
import errno
import fcntl
import os
import struct
import time
from collections.abc import Sequence
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


#: the advice a refused export gives (the default of :func:`lock_image`)
EXPORT_ADVICE = "stop it or serve read-only"
#: what a refusal says when the holder cannot be named (no /proc, another PID namespace)
UNKNOWN_HOLDER = "QEMU, qemu-nbd, another blocktrace"


class ImageLockedError(UsageError):
    """Another user of the image holds, or refuses to share, a permission this open needs."""

    def __init__(
        self,
        path: str,
        perm: Perm,
        *,
        shared: bool,
        holders: Sequence[str] = (),
        advice: str = EXPORT_ADVICE,
    ) -> None:
        self.path = path
        self.perm = perm
        #: True: someone holds ``perm`` which we refuse to share; False: someone refuses to
        #: share ``perm`` which we want (QEMU's 'Failed to get [shared] "perm" lock').
        self.shared = shared
        #: ``NAME (pid N)`` of each process found holding lock bytes on the file
        self.holders = tuple(holders)
        what = f'shared "{PERM_NAMES[perm]}"' if shared else f'"{PERM_NAMES[perm]}"'
        who = ": " + ", ".join(self.holders) if self.holders else f" ({UNKNOWN_HOLDER})"
        super().__init__(
            f"{path}: failed to get {what} lock: the image is in use by another process or "
            f"export{who}; {advice}"
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


def lock_image(fd: int, path: str, mode: LockMode, *, advice: str = EXPORT_ADVICE) -> None:
    """Take ``mode``'s lock bytes on ``fd``, then check nobody conflicts with them.

    The one locking helper: exports, replica images, replay targets and trace outputs all
    come through here.  Raises :class:`ImageLockedError` on a conflict, naming the holders it
    can find and ending with ``advice`` (the caller closes ``fd``, which drops what was
    taken), and :class:`UsageError` if the file system refuses OFD locks outright.
    """
    try:
        for p in _bits(mode.held):
            _lock(fd, PERM_BASE + p.bit_length() - 1)
        for p in _bits(mode.unshared):
            _lock(fd, SHARED_BASE + p.bit_length() - 1)
        for p in _bits(mode.held):
            if _in_use(fd, SHARED_BASE + p.bit_length() - 1):
                raise ImageLockedError(
                    path, p, shared=False, holders=lock_holders(fd), advice=advice
                )
        for p in _bits(mode.unshared):
            if _in_use(fd, PERM_BASE + p.bit_length() - 1):
                raise ImageLockedError(
                    path, p, shared=True, holders=lock_holders(fd), advice=advice
                )
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EACCES):  # a write lock on our byte: a conflict
            raise ImageLockedError(
                path, Perm.WRITE, shared=False, holders=lock_holders(fd), advice=advice
            ) from None
        raise UsageError(f"{path}: cannot lock the image: {exc.strerror}") from None


#: the advice of a refused output (a log, an events file)
OUTPUT_ADVICE = "name another file"


def lock_output(fd: int, label: str) -> None:
    """Lock a file blocktrace is about to write as an output (:data:`WRITABLE`): the
    ``lock`` :func:`blocktrace.outfile.open_output` takes.  ``label`` (``log PATH``) starts
    the error."""
    lock_image(fd, label, WRITABLE, advice=OUTPUT_ADVICE)


#: lock bytes QEMU's protocol uses (a lock elsewhere in the file is not about image sharing)
_LOCK_RANGE = range(PERM_BASE, SHARED_BASE + 64)
#: at most this many holders are named, and the search gives up after this many seconds
#: (about 0.1-0.2 ms per descriptor here: docs/performance.md): it runs only on a refusal,
#: and a machine with very many open files gets the generic message instead of a long wait
MAX_HOLDERS = 4
SCAN_SECONDS = 0.5


def lock_holders(fd: int, *, proc: str = "/proc") -> list[str]:
    """``NAME (pid N)`` of every other open file description holding QEMU lock bytes on
    ``fd``'s file, this process's other descriptors included (``NAME (pid N, this
    process)``: another export, replica or log of the same server); ``[]`` if none is seen.

    Only ``/proc/PID/fdinfo/FD`` is read, never the file behind a descriptor, so a hung
    network or FUSE file system elsewhere cannot stall the search; the file is recognised by
    the ``MAJ:MIN:INODE`` the kernel prints on each of its lock lines.
    """
    st = os.fstat(fd)
    key = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    me = str(os.getpid())
    found: list[str] = []
    deadline = time.monotonic() + SCAN_SECONDS
    try:
        pids = [p for p in os.listdir(proc) if p.isdigit()]
    except OSError:
        return found
    for pid in pids:
        try:
            fds = os.listdir(f"{proc}/{pid}/fdinfo")
        except OSError:  # gone, or not ours to read
            continue
        for n in fds:
            if time.monotonic() > deadline:
                return found
            if pid == me and n == str(fd):
                continue
            info = _read_small(f"{proc}/{pid}/fdinfo/{n}")
            if info and _holds_lock_bytes(info, key):
                mine = ", this process" if pid == me else ""
                found.append(f"{_comm(proc, pid)} (pid {pid}{mine})")
                break  # one mention per process
        if len(found) >= MAX_HOLDERS:
            break
    return found


def _holds_lock_bytes(fdinfo: str, key: str) -> bool:
    """Does this fdinfo text list a lock on file ``key`` within QEMU's lock bytes?
    A line reads ``lock:  1: OFDLCK ADVISORY  READ -1 fe:00:2146354 100 100``."""
    for line in fdinfo.splitlines():
        if not line.startswith("lock:"):
            continue
        f = line.split()
        if len(f) < 3 or f[-3] != key:
            continue
        try:
            start = int(f[-2])
            end = int(f[-1]) if f[-1] != "EOF" else _LOCK_RANGE.stop
        except ValueError:
            continue
        if start < _LOCK_RANGE.stop and end >= _LOCK_RANGE.start:
            return True
    return False


def _read_small(path: str) -> str:
    """A /proc text file's first 64 KiB ("" if it cannot be read): one open, one read."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return ""
    try:
        return os.read(fd, 65536).decode(errors="replace")
    except OSError:
        return ""
    finally:
        os.close(fd)


def _comm(proc: str, pid: str) -> str:
    return _read_small(f"{proc}/{pid}/comm").strip() or "?"
