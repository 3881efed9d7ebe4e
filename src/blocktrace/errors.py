"""The one tree of blocktrace errors.

::

    BlocktraceError
     +-- ProtocolError                 a peer broke a wire protocol (NBD, QMP)
     |    +-- LocalProtocolError       we were asked to send something the protocol forbids
     |    +-- RemoteProtocolError      the peer sent something the protocol forbids
     +-- BlockDeviceError(errno)       an I/O request failed; carries the errno the client sees
     +-- FormatError                   corrupt or unsupported on-disk data (logs, file systems)
     +-- TargetError                   a trace target failed (disk full, vanished peer)
     +-- StateError                    an operation not valid in the object's current state
     +-- UsageError                    an operator mistake: printed as one line, exit status 2

Parsers raise only :class:`FormatError` subclasses on bad input, never ``struct.error`` or
``IndexError``; protocol cores raise only :class:`ProtocolError` subclasses.  The CLI turns every
:class:`BlocktraceError` that reaches it into one line on stderr and a non-zero exit.
"""

from __future__ import annotations

import errno as _errno
import os


class BlocktraceError(Exception):
    """Root of every error blocktrace raises on purpose."""


class ProtocolError(BlocktraceError):
    """A wire protocol was violated."""


class LocalProtocolError(ProtocolError):
    """We tried to do something the protocol forbids (a bug, or a misuse of a core)."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something the protocol forbids; the connection cannot continue."""


class BlockDeviceError(BlocktraceError):
    """An I/O request failed.  ``errno`` is what the client is told (EIO, ENOSPC, EROFS...)."""

    def __init__(self, errno: int, message: str | None = None) -> None:
        self.errno = errno
        super().__init__(message or os.strerror(errno))

    @classmethod
    def from_oserror(cls, exc: OSError) -> BlockDeviceError:
        return cls(exc.errno or _errno.EIO, str(exc))


class FormatError(BlocktraceError):
    """On-disk data is corrupt, truncated or of an unsupported variant."""


class TargetError(BlocktraceError):
    """A trace target failed; ``target`` names it, ``__cause__`` holds the underlying error.

    ``errno`` (ENOSPC, EIO...) is the OS error behind it when there is one: given, or taken
    from an ``OSError``/``BlockDeviceError`` cause (QMP's ``io-status`` is ``nospace`` for
    ENOSPC)."""

    def __init__(self, target: str, message: str, errno: int | None = None) -> None:
        self.target = target
        self._errno = errno
        super().__init__(f"{target}: {message}")

    @property
    def errno(self) -> int | None:
        if self._errno is not None:
            return self._errno
        cause = self.__cause__
        if isinstance(cause, OSError | BlockDeviceError):
            return cause.errno
        return None


class StateError(BlocktraceError):
    """An operation is not valid in the object's current state."""


class UsageError(BlocktraceError):
    """An operator mistake (bad argument, missing file, socket in use): one line, exit 2."""
