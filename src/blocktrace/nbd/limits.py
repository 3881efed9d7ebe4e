"""What one NBD server may spend on its clients: connections, handshake time, payload memory.

An NBD client is untrusted input: a 28-byte header can announce a 32 MiB WRITE, a client can
open connections and never finish negotiating, or send READs and never read the replies.
These limits bound what that costs, in total and not only per connection
(docs/nbd-server.md, "Resource bounds"):

* ``max_connections``: connections open at once (negotiating or not); one more is closed at
  once, with a warning in the log naming the peer.
* ``handshake_timeout``: seconds a connection may take to finish negotiation before it is
  closed: a client that connects and says nothing costs its socket for that long, no more.
* ``payload_memory``: bytes of request and reply payload all connections may hold at once:
  a large WRITE reserves its announced length before its payload is read (and its buffer is
  allocated only as the bytes arrive), a READ over 64 KiB reserves its length before the
  device reads it until the reply leaves for a client that is reading.  A connection that
  cannot reserve stops reading until another one releases: back-pressure, never an
  allocation.

:class:`PayloadBudget` is the sans-IO accounting; the connections are its only users.
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from blocktrace.errors import UsageError
from blocktrace.nbd.constants import NBD_DEFAULT_MAX_PAYLOAD

MiB = 1024 * 1024

DEFAULT_MAX_CONNECTIONS = 64
DEFAULT_HANDSHAKE_TIMEOUT = 10.0
DEFAULT_PAYLOAD_MEMORY = 256 * MiB


@dataclass(frozen=True)
class ServerLimits:
    """The limits of one NBD server (``blocktrace serve --max-connections`` ...)."""

    max_connections: int = DEFAULT_MAX_CONNECTIONS
    handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT
    payload_memory: int = DEFAULT_PAYLOAD_MEMORY

    def __post_init__(self) -> None:
        if self.max_connections < 1:
            raise UsageError(f"--max-connections {self.max_connections}: must be at least 1")
        if not self.handshake_timeout > 0:
            raise UsageError(f"--handshake-timeout {self.handshake_timeout}: must be positive")
        if self.payload_memory < NBD_DEFAULT_MAX_PAYLOAD:
            # one request of the largest size we accept must fit, or it would wait forever
            raise UsageError(
                f"--payload-memory {self.payload_memory}: must be at least "
                f"{NBD_DEFAULT_MAX_PAYLOAD} (one maximal request)"
            )


class PayloadBudget:
    """Bytes of payload memory the connections of one server hold, against a limit.

    ``try_reserve`` either takes the bytes or says no; whoever was told no registers a waiter
    and is called back (once) after a release, when it tries again.  Reservations are whole:
    a request never holds part of what it needs while waiting for the rest, so waiters cannot
    deadlock each other.
    """

    __slots__ = ("_waiters", "limit", "peak", "used")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self.peak = 0
        self._waiters: deque[Callable[[], None]] = deque()

    def try_reserve(self, n: int) -> bool:
        used = self.used + n
        if used > self.limit:
            return False
        self.used = used
        if used > self.peak:
            self.peak = used
        return True

    def release(self, n: int) -> None:
        if not n:
            return
        self.used -= n
        assert self.used >= 0, "payload budget released more than was reserved"
        if self._waiters:
            waiters, self._waiters = self._waiters, deque()
            for wake in waiters:
                wake()

    def wait(self, wake: Callable[[], None]) -> None:
        """Call ``wake()`` after the next release (the caller then tries again)."""
        if wake not in self._waiters:
            self._waiters.append(wake)

    def forget(self, wake: Callable[[], None]) -> None:
        """A waiter went away (its connection closed)."""
        with contextlib.suppress(ValueError):
            self._waiters.remove(wake)

    @property
    def waiting(self) -> int:
        return len(self._waiters)
