"""NBDSource: a synchronous, read-only view of an NBD export for ``blocktrace verify``.

``blocktrace verify`` reads sources with plain blocking calls (:class:`blocktrace.verify.Source`);
this adapter runs the project's own asyncio NBD client on a private event loop and turns one
large read into several requests in flight at once (``PIPELINE`` x 1 MiB), which keeps a
loopback or LAN link busy instead of paying one round trip per MiB.  Registered for the
``nbd`` and ``nbd+unix`` schemes by :mod:`blocktrace.verify`.
"""

from __future__ import annotations

import asyncio

from blocktrace.errors import BlockDeviceError, UsageError
from blocktrace.nbd.device import NBDDevice

REQUEST = 1024 * 1024
PIPELINE = 8


class NBDSource:
    """``NBDSource("nbd://127.0.0.1:10809/disk")``: ``size``, ``read``, ``close``."""

    def __init__(self, uri: str) -> None:
        self.name = uri
        self._loop = asyncio.new_event_loop()
        try:
            self._dev = self._loop.run_until_complete(NBDDevice.open(uri, read_only=True))
        except BlockDeviceError as exc:
            self._loop.close()
            raise UsageError(f"cannot open {uri}: {exc}") from None
        except BaseException:
            self._loop.close()
            raise
        self.size = self._dev.size

    def read(self, offset: int, length: int) -> bytes:
        try:
            return self._loop.run_until_complete(self._read(offset, length))
        except BlockDeviceError as exc:
            raise UsageError(f"{self.name}: read at byte {offset} failed: {exc}") from None

    async def _read(self, offset: int, length: int) -> bytes:
        sem = asyncio.Semaphore(PIPELINE)

        async def piece(pos: int) -> bytes:
            async with sem:
                return bytes(await self._dev.read(pos, min(REQUEST, offset + length - pos)))

        parts = await asyncio.gather(*(piece(p) for p in range(offset, offset + length, REQUEST)))
        return b"".join(parts)

    def close(self) -> None:
        if not self._loop.is_closed():
            try:
                self._loop.run_until_complete(self._dev.close())
            finally:
                self._loop.close()
