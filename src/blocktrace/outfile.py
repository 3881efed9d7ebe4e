"""Opening the files blocktrace writes for a trace (logs, events files) without harming others.

A trace's output file is named by whoever can send ``block-trace`` or start ``serve --trace``,
and it receives the guest's data.  So the one function here, :func:`open_output`, opens it
under rules that hold whatever the name points at:

* a symbolic link is never followed (``O_NOFOLLOW``): a link to the image, to ``/etc/shadow``
  or to another trace's log is refused, not written through;
* a new file is created with ``O_EXCL`` (no race with another creator) and mode ``0600`` at
  most, narrowed by the served image's own permission bits, because the output holds the
  guest's data and must not be more readable than the image;
* an existing file is refused unless ``overwrite`` was asked for (then truncated, and its
  group/other permission bits dropped);
* the served images and every other protected file are refused by *device and inode*, not by
  path, so a hard link or another spelling of the image is caught too;
* the output is locked (``flock(LOCK_EX | LOCK_NB)``) for as long as the descriptor is open:
  a second trace, in this process or another, naming a live log is refused before anything
  is truncated;
* it also takes QEMU's image locks (the ``lock`` the caller passes:
  :func:`blocktrace.block.locking.lock_output`, since this module sits below ``block``), so
  an output naming an image something is writing (a live replica, a replay, QEMU, a served
  image in another process) is refused before anything is truncated, and that writer is
  refused while the output is open;
* FIFOs, sockets and character devices are refused; the open is non-blocking so a FIFO
  cannot hang it.  Block devices are accepted only with ``overwrite`` (nothing is truncated).

Errors are :class:`~blocktrace.errors.UsageError` with one line naming the file and why.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
from collections.abc import Callable, Iterable
from typing import NamedTuple

from blocktrace.errors import UsageError

#: the widest mode a new output file gets (it holds the guest's data)
DEFAULT_MODE = 0o600

#: ``lock(fd, label)`` takes the image locks of the file about to be written and raises
#: :class:`UsageError` (naming ``label``) on a conflict: in practice always
#: :func:`blocktrace.block.locking.lock_output`, passed in because ``block`` is above us.
OutputLock = Callable[[int, str], None]


class FileId(NamedTuple):
    """A file's identity: the same file whatever path (hard link, symlink, ``..``) names it."""

    dev: int
    ino: int

    @classmethod
    def of(cls, st: os.stat_result) -> FileId:
        return cls(st.st_dev, st.st_ino)


class Protected(NamedTuple):
    """A file an output must never be: its identity and what it is (for the error)."""

    id: FileId
    what: str


def protect_path(path: str, what: str) -> list[Protected]:
    """``[Protected]`` for ``path`` if it exists (following links: the file it names)."""
    try:
        return [Protected(FileId.of(os.stat(path)), what)]
    except OSError:
        return []


def output_mode(image: str | None) -> int:
    """Mode for a new output: ``0600``, narrowed by ``image``'s owner bits (never wider than
    the image, and never wider than ``0600``); owner write is kept, we write the file."""
    if not image:
        return DEFAULT_MODE
    try:
        bits = os.stat(image).st_mode & DEFAULT_MODE
    except OSError:
        return DEFAULT_MODE
    return bits | stat.S_IWUSR


def open_output(
    path: str,
    *,
    overwrite: bool,
    lock: OutputLock,
    protected: Iterable[Protected] = (),
    mode: int = DEFAULT_MODE,
    what: str = "output",
    allow_block_device: bool = False,
) -> int:
    """Open ``path`` read-write for a trace's output under the rules of this module; return the
    descriptor (holding the exclusive ``flock`` and what ``lock`` took).  ``what`` names the
    file in errors (``log``, ``events file``)."""
    flags = os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK
    created = True
    try:
        fd = os.open(path, flags | os.O_CREAT | os.O_EXCL, mode & DEFAULT_MODE)
    except FileExistsError:
        created = False
        try:
            fd = os.open(path, flags)
        except OSError as exc:
            raise _refusal(path, what, exc) from exc
    except OSError as exc:
        raise _refusal(path, what, exc) from exc
    try:
        _check_existing(fd, path, what, protected, created, overwrite, allow_block_device, lock)
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    except BaseException:
        os.close(fd)
        if created:
            _unlink_quietly(path)
        raise
    return fd


def _check_existing(
    fd: int,
    path: str,
    what: str,
    protected: Iterable[Protected],
    created: bool,
    overwrite: bool,
    allow_block_device: bool,
    lock: OutputLock,
) -> None:
    st = os.fstat(fd)
    me = FileId.of(st)
    for p in protected:
        if p.id == me:
            raise UsageError(f"{what} {path}: refusing to write to {p.what}")
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise UsageError(
                f"{what} {path}: in use by a running trace (locked); refusing to overwrite it"
            ) from None
        raise UsageError(f"{what} {path}: cannot lock: {exc.strerror}") from exc
    lock(fd, f"{what} {path}")  # before any truncation: a live replica's image stays whole
    if created:
        return
    if stat.S_ISBLK(st.st_mode):
        if not (allow_block_device and overwrite):
            raise UsageError(
                f"{what} {path}: is a block device; refusing to overwrite it without force=on"
            )
        return
    if not stat.S_ISREG(st.st_mode):
        raise UsageError(f"{what} {path}: not a regular file; refusing to write to it")
    if not overwrite:
        raise UsageError(
            f"{what} {path}: exists ({st.st_size} bytes); refusing to overwrite it without force=on"
        )
    os.ftruncate(fd, 0)
    if st.st_mode & 0o077:  # it now receives the guest's data: owner only
        os.fchmod(fd, stat.S_IMODE(st.st_mode) & ~0o077)


def _refusal(path: str, what: str, exc: OSError) -> UsageError:
    if exc.errno == errno.ELOOP:
        return UsageError(f"{what} {path}: is a symbolic link; refusing to follow it")
    if exc.errno == errno.ENXIO:  # O_NONBLOCK open of a FIFO without a reader
        return UsageError(f"{what} {path}: not a regular file; refusing to write to it")
    return UsageError(f"{what} {path}: cannot open: {exc.strerror}")


def _unlink_quietly(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


__all__ = [
    "DEFAULT_MODE",
    "FileId",
    "OutputLock",
    "Protected",
    "open_output",
    "output_mode",
    "protect_path",
]
