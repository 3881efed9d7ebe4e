"""Listening Unix sockets, bound race-free: shared by the NBD service and the QMP server."""

from __future__ import annotations

import contextlib
import os
import socket
import stat
import tempfile

from blocktrace.errors import UsageError

#: longest ``sun_path`` Linux accepts (108 bytes with the terminating NUL)
MAX_SUN_PATH = 107


def bind_unix(path: str, mode: int) -> socket.socket:
    """Bind a listening Unix socket at ``path`` with ``mode``, race-free.

    The socket is bound inside a private 0700 directory next to ``path``, chmod-ed, then
    renamed into place, so it is never reachable with looser permissions.  An existing socket
    file is replaced only if nothing accepts connections on it.
    """
    if len(os.fsencode(path)) > MAX_SUN_PATH:
        raise UsageError(f"{path}: socket path too long (max {MAX_SUN_PATH} bytes)")
    try:
        st = os.stat(path)
    except FileNotFoundError:
        st = None
    except OSError as exc:
        raise UsageError(f"{path}: {exc.strerror}") from None
    if st is not None:
        if not stat.S_ISSOCK(st.st_mode):
            raise UsageError(f"{path}: exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            pass  # stale: nobody listens
        except OSError as exc:
            raise UsageError(f"{path}: cannot check socket: {exc.strerror}") from None
        else:
            raise UsageError(f"{path}: socket in use by a running server")
        finally:
            probe.close()
    directory = os.path.dirname(os.path.abspath(path))
    try:
        tmpdir = tempfile.mkdtemp(prefix=".blocktrace-", dir=directory)
    except FileNotFoundError:
        raise UsageError(f"{path}: directory {directory} does not exist") from None
    except PermissionError:
        raise UsageError(f"{path}: permission denied") from None
    except OSError as exc:
        raise UsageError(f"{path}: {exc.strerror}") from None
    tmp = min(os.path.join(tmpdir, "s"), os.path.relpath(os.path.join(tmpdir, "s")), key=len)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        if len(os.fsencode(tmp)) > MAX_SUN_PATH:
            raise UsageError(f"{path}: socket path too long (max {MAX_SUN_PATH} bytes)")
        sock.bind(tmp)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
        sock.listen(128)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise UsageError(f"{path}: cannot create socket: {exc.strerror}") from None
    except BaseException:
        sock.close()
        raise
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        with contextlib.suppress(OSError):
            os.rmdir(tmpdir)
    return sock
