"""The publisher of file-level events (docs/jetstream.md, "Events out").

One NATS message per event, the JSON line of the documented schema (docs/introspection.md),
published in the order the events were produced on one connection (NATS keeps a connection's
order).  :meth:`EventPublisher.flush` returns once the server has everything published so far,
or raises :class:`~blocktrace.errors.TargetError` after ``timeout``: used by ``watch --events``
at its end and by the live ``introspect`` target (``events-to=``) after every batch, so a
server that fails is a bounded wait and then a clear error, never a silent loss.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterable
from typing import Any

from blocktrace.errors import TargetError
from blocktrace.jetstream.conn import ConnectOptions, NatsURL, connect

#: seconds to wait for the server to confirm what was published (a PING round trip)
FLUSH_TIMEOUT = 10.0


class EventPublisher:
    """Publishes file-level events (JSON, docs/jetstream.md) to a NATS subject."""

    def __init__(self, url: str, *, name: str | None = None) -> None:
        self.url = NatsURL.parse(url)
        self.name = name or f"events:{self.url}"
        self._nc: Any = None
        self.published = 0

    async def open(self) -> None:
        self._nc = await connect(self.url, ConnectOptions(), what=self.name)

    async def publish(self, line: str) -> None:
        await self.publish_all((line,))

    async def publish_all(self, lines: Iterable[str]) -> None:
        """Publish ``lines`` in order (buffered by the connection; :meth:`flush` confirms)."""
        import nats.errors

        try:
            for line in lines:
                await self._nc.publish(self.url.subject, line.encode())
                self.published += 1
        except (nats.errors.Error, OSError) as exc:
            raise TargetError(self.name, f"publishing to {self.url}: {_why(exc)}") from exc

    async def flush(self, timeout: float = FLUSH_TIMEOUT) -> None:
        """Return once the server has received every event published so far."""
        import nats.errors

        nc = self._nc
        deadline = time.monotonic() + timeout
        # while nats-py reconnects, its flush() returns at once without a round trip: wait
        # for the connection (bounded), so a server that is gone is an error, not a loss
        while not nc.is_connected and not nc.is_closed:
            if time.monotonic() >= deadline:
                raise TargetError(
                    self.name,
                    f"{self.url.server} did not take the events: not connected for {timeout:g}s",
                )
            await asyncio.sleep(0.05)
        try:
            await nc.flush(timeout=max(deadline - time.monotonic(), 0.001))
        except (nats.errors.Error, OSError, TimeoutError) as exc:
            raise TargetError(
                self.name, f"{self.url.server} did not take the events: {_why(exc)}"
            ) from exc

    async def close(self) -> None:
        """Flush (a :class:`TargetError` if the server does not confirm), then disconnect."""
        if self._nc is None:
            return
        try:
            await self.flush()
        finally:
            nc, self._nc = self._nc, None
            with contextlib.suppress(Exception):  # already closed: nothing to undo
                await nc.close()


def _why(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__
