"""NBDDevice: a BlockDevice backed by a remote NBD export (qemu-nbd, nbdkit, another blocktrace).

URIs follow the NBD URI spec (``doc/uri.md`` in the NBD project, as libnbd and QEMU read
them): ``nbd://HOST[:PORT]/[EXPORT]`` (port 10809 by default) and
``nbd+unix:///[EXPORT]?socket=PATH``.  TLS (``nbds``) is not supported.

Requests larger than the server's maximum payload are split; the transmission flags decide
the ``can_*`` attributes, so a caller (the replica target) can fall back when a server lacks
FUA, TRIM or WRITE_ZEROES, as the device contract's defaults already do.
"""

from __future__ import annotations

import asyncio
import errno
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import parse_qs, unquote, urlsplit

from blocktrace.block.device import (
    Extent,
    ExtentFlags,
    PipelinedWrites,
    ReadableBuffer,
    WriteCallback,
)
from blocktrace.errors import BlockDeviceError, UsageError
from blocktrace.nbd.client import NBDClient
from blocktrace.nbd.constants import NBD_PORT
from blocktrace.nbd.constants import TransmissionFlag as TF


@dataclass(frozen=True, slots=True)
class NBDAddress:
    """Where an export is: TCP ``host``/``port`` or a Unix ``socket``, and its name."""

    export: str
    host: str = ""
    port: int = NBD_PORT
    socket: str = ""

    @property
    def uri(self) -> str:
        if self.socket:
            return f"nbd+unix:///{self.export}?socket={self.socket}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"nbd://{host}:{self.port}/{self.export}"


def parse_nbd_uri(uri: str) -> NBDAddress:
    """Parse an NBD URI; :class:`UsageError` (one line) for anything else."""
    try:
        parts = urlsplit(uri)
    except ValueError as exc:
        raise UsageError(f"bad NBD URI {uri!r}: {exc}") from None
    export = unquote(parts.path[1:] if parts.path.startswith("/") else parts.path)
    query = parse_qs(parts.query)
    if parts.scheme == "nbd":
        if not parts.hostname:
            raise UsageError(f"bad NBD URI {uri!r}: no host")
        try:
            port = parts.port or NBD_PORT
        except ValueError:
            raise UsageError(f"bad NBD URI {uri!r}: bad port") from None
        return NBDAddress(export=export, host=parts.hostname, port=port)
    if parts.scheme == "nbd+unix":
        sockets = query.get("socket")
        if not sockets:
            raise UsageError(f"bad NBD URI {uri!r}: nbd+unix needs ?socket=PATH")
        return NBDAddress(export=export, socket=sockets[0])
    if parts.scheme in ("nbds", "nbds+unix"):
        raise UsageError(f"NBD URI {uri!r}: TLS is not supported")
    raise UsageError(
        f"not an NBD URI: {uri!r} (want nbd://HOST:PORT/NAME or nbd+unix:///NAME?socket=PATH)"
    )


def is_nbd_uri(text: str) -> bool:
    return text.startswith(("nbd://", "nbd+unix://", "nbds://", "nbds+unix://"))


class NBDDevice(PipelinedWrites):
    """A remote export.  ``dev = NBDDevice(uri); await dev.connect()``, or
    ``await NBDDevice.open(uri)``."""

    def __init__(self, uri: str, *, read_only: bool = False, timeout: float = 10) -> None:
        self.uri = uri
        self.address = parse_nbd_uri(uri)
        self.read_only = read_only
        self.timeout = timeout
        self.size = 0
        self.client: NBDClient | None = None

    @classmethod
    async def open(cls, uri: str, *, read_only: bool = False, timeout: float = 10) -> NBDDevice:
        dev = cls(uri, read_only=read_only, timeout=timeout)
        await dev.connect()
        return dev

    async def connect(self) -> None:
        a = self.address
        try:
            if a.socket:
                client = await NBDClient.connect_unix(a.socket, a.export, timeout=self.timeout)
            else:
                client = await NBDClient.connect_tcp(a.host, a.port, a.export, timeout=self.timeout)
        except TimeoutError:
            raise BlockDeviceError(errno.ETIMEDOUT, f"{self.uri}: connection timed out") from None
        except OSError as exc:
            raise BlockDeviceError(
                exc.errno or errno.EIO, f"{self.uri}: {exc.strerror or exc}"
            ) from None
        self.client = client
        info = client.export
        flags = info.flags
        self.size = info.size
        self.read_only = self.read_only or bool(flags & TF.READ_ONLY)
        self.min_block_size = info.min_block
        self.preferred_block_size = info.preferred_block
        self.max_block_size = min(info.max_block, 32 * 1024 * 1024)
        self.can_flush = bool(flags & TF.SEND_FLUSH)
        self.can_fua = bool(flags & TF.SEND_FUA)
        self.can_trim = bool(flags & TF.SEND_TRIM)
        self.can_zero = bool(flags & TF.SEND_WRITE_ZEROES)
        self.can_fast_zero = bool(flags & TF.SEND_FAST_ZERO)
        self.can_cache = bool(flags & TF.SEND_CACHE)
        self.can_extents = client.can_block_status
        self.can_multi_conn = bool(flags & TF.CAN_MULTI_CONN)

    def _client(self) -> NBDClient:
        if self.client is None:
            raise BlockDeviceError(errno.ENOTCONN, f"{self.uri}: not connected")
        return self.client

    @property
    def connected(self) -> bool:
        return self.client is not None and not self.client.closed

    # -- data path ---------------------------------------------------------------------------

    async def read(self, offset: int, length: int) -> ReadableBuffer:
        c = self._client()
        step = self.max_block_size
        if length <= step:
            return await c.read(offset, length)
        out = bytearray()
        for pos in range(offset, offset + length, step):
            out += await c.read(pos, min(step, offset + length - pos))
        return bytes(out)

    async def write(self, offset: int, data: ReadableBuffer, *, fua: bool = False) -> None:
        c = self._client()
        step = self.max_block_size
        view = memoryview(data).cast("B")
        fua_native = fua and self.can_fua
        if len(view) <= step:
            await c.write(offset, view, fua=fua_native)
        else:
            for i in range(0, len(view), step):
                await c.write(offset + i, view[i : i + step], fua=fua_native)
        if fua and not fua_native:
            await self.flush()

    async def write_many(self, items: Sequence[tuple[int, ReadableBuffer, bool]]) -> None:
        """Several non-overlapping writes ``(offset, data, fua)``, pipelined in one send."""
        if any(len(d) > self.max_block_size for _, d, _ in items) or (
            not self.can_fua and any(f for _, _, f in items)
        ):
            await asyncio.gather(*(self.write(o, d, fua=f) for o, d, f in items))
            return
        await self._client().write_many(items)

    def start_write(self, offset: int, data: ReadableBuffer, callback: WriteCallback) -> bool:
        """Send one plain WRITE now, without a task or a future; ``callback(exc_or_None)`` runs
        from the reply handler (the replica's write-blocking fast path).  False, with nothing
        sent, when it cannot go this way (not connected, over the server's size limit, the send
        buffer full): use :meth:`write` then."""
        c = self.client
        if c is None or len(data) > self.max_block_size or c.write_paused:
            return False
        c.start_writes([(offset, data, False)], callback=callback)
        return True

    async def flush(self) -> None:
        if self.can_flush:
            await self._client().flush()

    async def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        if not self.can_trim:
            raise BlockDeviceError(errno.EOPNOTSUPP, "server does not support TRIM")
        await self._client().trim(offset, length, fua=fua and self.can_fua)

    async def write_zeroes(
        self,
        offset: int,
        length: int,
        *,
        may_trim: bool = False,
        fua: bool = False,
        fast: bool = False,
    ) -> None:
        if not self.can_zero or (fast and not self.can_fast_zero):
            await super().write_zeroes(offset, length, may_trim=may_trim, fua=fua, fast=fast)
            return
        c = self._client()
        step = 1 << 30  # lengths are u32 on the wire
        pos, end = offset, offset + length
        while pos < end:
            n = min(step, end - pos)
            await c.write_zeroes(pos, n, may_trim=may_trim, fua=fua and self.can_fua, fast=fast)
            pos += n
        if fua and not self.can_fua:
            await self.flush()

    async def block_status(self, offset: int, length: int) -> list[Extent]:
        if not self.can_extents:
            return [Extent(length, ExtentFlags.DATA)]
        extents = await self._client().block_status(offset, min(length, 1 << 30))
        # a server may describe more than asked for: clip (the device contract says never more)
        out: list[Extent] = []
        left = length
        for ext in extents:
            n = min(ext.length, left)
            if n <= 0:
                break
            out.append(Extent(n, ext.flags))
            left -= n
        return out or [Extent(length, ExtentFlags.DATA)]

    async def cache(self, offset: int, length: int) -> None:
        if self.can_cache:
            await self._client().cache(offset, length)

    async def close(self) -> None:
        client, self.client = self.client, None
        if client is not None:
            try:
                await client.disconnect()
            except Exception:  # closing a dead connection: nothing more to do
                client.abort()
