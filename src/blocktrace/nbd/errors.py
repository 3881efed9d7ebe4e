"""NBD errors: protocol errors that end a connection, and request errors that do not.

Two kinds, kept apart as nbdkit's ``validate_request`` keeps them:

* :class:`NBDRemoteProtocolError` / :class:`NBDLocalProtocolError`: the byte stream itself is
  broken (bad magic, truncated or inconsistent handshake data).  The connection cannot continue.
* :class:`NBDRequestError`: a well-formed request the server refuses (range past the end, a
  write on a read-only export, unknown flags).  The client gets the NBD error code in the reply
  and the connection carries on.

:func:`nbd_error` maps a POSIX errno (from :class:`~blocktrace.errors.BlockDeviceError` or a
validation failure) onto the few error values NBD has.
"""

from __future__ import annotations

import errno as E

from blocktrace.errors import LocalProtocolError, RemoteProtocolError
from blocktrace.nbd.constants import NBDError


class NBDRemoteProtocolError(RemoteProtocolError):
    """The NBD peer sent bytes the protocol forbids; drop the connection."""


class NBDLocalProtocolError(LocalProtocolError):
    """We were asked to send something the NBD protocol forbids."""


class NBDRequestError(Exception):
    """A request is refused with ``errno``; the connection continues.

    Not a :class:`~blocktrace.errors.BlocktraceError`: it never leaves the NBD layer.
    """

    def __init__(self, errno: int, message: str) -> None:
        self.errno = errno
        super().__init__(message)


_ERRNO_TO_NBD: dict[int, NBDError] = {
    0: NBDError.OK,
    E.EPERM: NBDError.EPERM,
    E.EACCES: NBDError.EPERM,
    E.EROFS: NBDError.EPERM,
    E.EIO: NBDError.EIO,
    E.ENOMEM: NBDError.ENOMEM,
    E.EINVAL: NBDError.EINVAL,
    E.ENOSPC: NBDError.ENOSPC,
    E.EDQUOT: NBDError.ENOSPC,
    E.EFBIG: NBDError.ENOSPC,
    E.EOVERFLOW: NBDError.EOVERFLOW,
    E.ENOTSUP: NBDError.ENOTSUP,
    E.EOPNOTSUPP: NBDError.ENOTSUP,
    E.ESHUTDOWN: NBDError.ESHUTDOWN,
}


def nbd_error(errno: int) -> NBDError:
    """The NBD error value for a POSIX errno.

    Unknown errnos become ``NBD_EIO``: they come from the backing store, and EIO is what a
    client (QEMU maps only EPERM/EIO/ENOMEM/ENOSPC/ESHUTDOWN) reports most usefully.
    """
    return _ERRNO_TO_NBD.get(errno, NBDError.EIO)
