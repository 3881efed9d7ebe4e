"""asyncio NBD client: a thin adapter over the sans-IO handshake core and the wire layouts.

One :class:`asyncio.Protocol` per connection.  Negotiation is the core's
:class:`~blocktrace.nbd.handshake.ClientHandshake` (fixed newstyle, structured replies,
``base:allocation``, ``NBD_OPT_GO`` with the export name, falling back to ``EXPORT_NAME``).
In the transmission phase every request gets a fresh cookie and a future; any number of
requests are in flight at once (bounded by ``max_in_flight``) and replies, simple or
structured, are matched by cookie in whatever order the server sends them.

Replies are framed in place in one receive buffer by the sans-IO
:class:`~blocktrace.nbd.transmission.ReplyParser` (the one its unit tests drive): a
successful write's reply settles its request without a future or task per reply, which is
the replica's hot path.

Why a Protocol and not streams: replies are dispatched from ``data_received`` without a reader
task in between, so a completed request's waiter is woken in the same loop iteration the reply
arrived in, which keeps a loopback round trip short.

Errors: a request the server refuses raises :class:`~blocktrace.errors.BlockDeviceError` with
the server's errno; a lost connection fails every pending request (and all later ones) with
:class:`NBDDisconnected`; a server that breaks the protocol raises
:class:`~blocktrace.nbd.errors.NBDRemoteProtocolError` from the request that saw it, and the
connection is closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import socket
from collections.abc import Callable, Iterable, Sequence
from typing import cast

from blocktrace.block.device import Extent, ExtentFlags, ReadableBuffer
from blocktrace.errors import BlockDeviceError
from blocktrace.nbd import wire
from blocktrace.nbd.constants import (
    BASE_ALLOCATION,
    NBD_REQUEST_MAGIC,
    Cmd,
    CmdFlag,
    ReplyFlag,
    ReplyType,
    TransmissionFlag,
)
from blocktrace.nbd.errors import NBDRemoteProtocolError
from blocktrace.nbd.events import (
    NEED_DATA,
    ExportInfo,
    HandshakeDone,
    Need,
    ReplyChunk,
    SimpleReply,
)
from blocktrace.nbd.handshake import ClientHandshake
from blocktrace.nbd.transmission import MAX_CHUNK, ReplyParser, encode_request

_REQUEST = wire.REQUEST
_MAGIC = NBD_REQUEST_MAGIC
_WRITE = int(Cmd.WRITE)
_READ = int(Cmd.READ)
_FUA = int(CmdFlag.FUA)
#: WRITE payloads up to this size are joined with their header into one send
_JOIN_LIMIT = 64 * 1024


class NBDDisconnected(BlockDeviceError):
    """The connection to the NBD server is gone; the request's outcome is unknown."""

    def __init__(self, message: str = "NBD connection lost") -> None:
        super().__init__(errno.EIO, message)


class _Pending:
    """One request in flight, or one group of WRITEs sharing a completion (``left`` replies
    still due).  Completion is a future, or a plain ``callback(exc)`` run from the reply
    handler itself (no loop iteration in between: the replica's write-blocking path)."""

    __slots__ = (
        "callback",
        "cmd",
        "data",
        "error",
        "extents",
        "future",
        "left",
        "length",
        "message",
        "offset",
    )

    def __init__(
        self,
        cmd: int,
        offset: int,
        length: int,
        future: asyncio.Future[object] | None,
        left: int = 1,
        callback: Callable[[BaseException | None], None] | None = None,
    ) -> None:
        self.cmd = cmd
        self.offset = offset
        self.length = length
        self.future = future
        self.left = left
        self.callback = callback
        self.data: bytearray | None = None
        self.extents: list[Extent] = []
        self.error = 0
        self.message = ""

    def settle(self, result: object = None) -> None:
        """One reply is in: complete once every reply of the group is (first error wins)."""
        self.left -= 1
        if self.left:
            return
        exc = BlockDeviceError(self.error, self.message or None) if self.error else None
        if self.callback is not None:
            cb, self.callback = self.callback, None
            cb(exc)
            return
        fut = self.future
        if fut is None or fut.done():
            return
        if exc is not None:
            fut.set_exception(exc)
        else:
            fut.set_result(result)

    def fail(self, exc: BaseException) -> None:
        """The connection is gone: complete now, whatever replies were still due."""
        self.left = 0
        if self.callback is not None:
            cb, self.callback = self.callback, None
            cb(exc)
        elif self.future is not None and not self.future.done():
            self.future.set_exception(exc)


class _Proto(asyncio.Protocol):
    def __init__(self, client: NBDClient) -> None:
        self.client = client

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.client._transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.client._on_data(data)

    def eof_received(self) -> bool | None:
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.client._on_lost(exc)

    def pause_writing(self) -> None:
        self.client._can_write.clear()

    def resume_writing(self) -> None:
        self.client._can_write.set()


class NBDClient:
    """A connected NBD client; make one with :meth:`connect_tcp` or :meth:`connect_unix`."""

    def __init__(
        self,
        export_name: str = "",
        *,
        structured_replies: bool = True,
        meta_contexts: Iterable[str] = (BASE_ALLOCATION,),
        max_in_flight: int = 64,
    ) -> None:
        self._hs = ClientHandshake(
            export_name, structured_replies=structured_replies, meta_contexts=meta_contexts
        )
        self._rbuf = bytearray()
        self._parser = ReplyParser(self._read_length, MAX_CHUNK)
        self._transport: asyncio.Transport | None = None
        self._loop = asyncio.get_running_loop()
        self._done: asyncio.Future[HandshakeDone] = self._loop.create_future()
        self._pending: dict[int, _Pending] = {}
        self._cookie = 0
        self._slots = asyncio.Semaphore(max_in_flight)
        self._can_write = asyncio.Event()
        self._can_write.set()
        self._lost: BaseException | None = None
        self._closed = asyncio.Event()
        self.info: HandshakeDone | None = None

    # -- connecting ----------------------------------------------------------------------------

    @classmethod
    async def connect_tcp(
        cls, host: str, port: int, export_name: str = "", *, timeout: float = 10, **kw: object
    ) -> NBDClient:
        loop = asyncio.get_running_loop()
        client = cls(export_name, **kw)  # type: ignore[arg-type]
        async with asyncio.timeout(timeout):
            transport, _ = await loop.create_connection(lambda: _Proto(client), host, port)
            sock = transport.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            await client._handshake()
        return client

    @classmethod
    async def connect_unix(
        cls, path: str, export_name: str = "", *, timeout: float = 10, **kw: object
    ) -> NBDClient:
        loop = asyncio.get_running_loop()
        client = cls(export_name, **kw)  # type: ignore[arg-type]
        async with asyncio.timeout(timeout):
            await loop.create_unix_connection(lambda: _Proto(client), path)
            await client._handshake()
        return client

    async def _handshake(self) -> None:
        try:
            self.info = await self._done
        except BaseException:
            self._abort()
            raise

    @property
    def socket(self) -> socket.socket | None:
        """The connected socket (for peer checks such as :mod:`blocktrace.block.peer`)."""
        if self._transport is None:
            return None
        # asyncio gives a TransportSocket, uvloop a PseudoSocket: both have socket's
        # getsockopt/getpeername/family, which is all a peer check needs
        return cast("socket.socket | None", self._transport.get_extra_info("socket"))

    # -- what negotiation said -----------------------------------------------------------------

    @property
    def export(self) -> ExportInfo:
        assert self.info is not None
        return self.info.export

    @property
    def flags(self) -> TransmissionFlag:
        return self.export.flags

    @property
    def structured_replies(self) -> bool:
        return self.info is not None and self.info.structured_replies

    @property
    def can_block_status(self) -> bool:
        return (
            self.info is not None
            and self.info.structured_replies
            and BASE_ALLOCATION in self.info.meta_contexts.values()
        )

    @property
    def closed(self) -> bool:
        return self._lost is not None

    # -- requests ------------------------------------------------------------------------------

    async def read(self, offset: int, length: int) -> bytes:
        result = await self._request(Cmd.READ, offset, length)
        assert isinstance(result, bytes | bytearray)
        return bytes(result)

    async def write(self, offset: int, data: ReadableBuffer, *, fua: bool = False) -> None:
        await self._request(Cmd.WRITE, offset, len(data), CmdFlag.FUA if fua else 0, data)

    async def write_many(self, items: Sequence[tuple[int, ReadableBuffer, bool]]) -> None:
        """Send several WRITEs ``(offset, data, fua)`` in one ``send`` and wait for all.

        Pipelining as :meth:`write` from concurrent tasks does, minus a syscall and a task per
        request: what a replica applying a batch of non-overlapping records needs.  Raises the
        first failure once every reply is in.
        """
        if not items:
            return
        fut: asyncio.Future[object] = self._loop.create_future()
        self.start_writes(items, future=fut)
        if not self._can_write.is_set():
            await self._can_write.wait()
        await fut

    def start_writes(
        self,
        items: Sequence[tuple[int, ReadableBuffer, bool]],
        *,
        future: asyncio.Future[object] | None = None,
        callback: Callable[[BaseException | None], None] | None = None,
    ) -> None:
        """Send WRITEs ``(offset, data, fua)`` now, in one ``send``, without waiting.

        Completion (every reply in, first error wins) sets ``future`` or calls
        ``callback(exc_or_None)`` from the reply handler.  One completion for the whole group:
        no future, task or callback per request.  Raises :class:`NBDDisconnected` at once if
        the connection is gone (nothing is sent then).  Callers watch :attr:`write_paused`.
        """
        if self._lost is not None:
            raise NBDDisconnected(f"NBD connection lost: {self._lost}")
        transport = self._transport
        assert transport is not None
        pend = _Pending(_WRITE, 0, 0, future, len(items), callback)
        pending = self._pending
        pack = _REQUEST.pack
        cookie = self._cookie
        out: list[bytes | bytearray | memoryview] = []
        for offset, data, fua in items:
            cookie = (cookie + 1) & 0xFFFFFFFFFFFFFFFF
            pending[cookie] = pend
            out.append(pack(_MAGIC, _FUA if fua else 0, _WRITE, cookie, offset, len(data)))
            out.append(data)
        self._cookie = cookie
        transport.write(b"".join(out))

    @property
    def write_paused(self) -> bool:
        """The transport's buffer is over its high-water mark: wait for :meth:`drained`."""
        return not self._can_write.is_set()

    async def drained(self) -> None:
        await self._can_write.wait()

    async def flush(self) -> None:
        await self._request(Cmd.FLUSH, 0, 0)

    async def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        await self._request(Cmd.TRIM, offset, length, CmdFlag.FUA if fua else 0)

    async def write_zeroes(
        self,
        offset: int,
        length: int,
        *,
        may_trim: bool = False,
        fua: bool = False,
        fast: bool = False,
    ) -> None:
        flags = (0 if may_trim else CmdFlag.NO_HOLE) | (CmdFlag.FUA if fua else 0)
        if fast:
            flags |= CmdFlag.FAST_ZERO
        await self._request(Cmd.WRITE_ZEROES, offset, length, flags)

    async def block_status(self, offset: int, length: int) -> list[Extent]:
        result = await self._request(Cmd.BLOCK_STATUS, offset, length)
        assert isinstance(result, list)
        return result

    async def cache(self, offset: int, length: int) -> None:
        await self._request(Cmd.CACHE, offset, length)

    async def disconnect(self) -> None:
        """Clean end: wait for pending replies, send NBD_CMD_DISC, close."""
        if self._lost is None and self._transport is not None:
            pending = [p.future for p in self._pending.values() if p.future is not None]
            if pending:
                await asyncio.wait(pending, timeout=10)
            if self._lost is None:
                self._transport.write(encode_request(Cmd.DISC, self._next_cookie()))
                self._transport.close()  # sends what is buffered (DISC included), then closes
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(5):
                        await self._closed.wait()
        self._abort()
        await self._closed.wait()

    def abort(self) -> None:
        """Drop the connection at once; pending requests fail with :class:`NBDDisconnected`."""
        self._abort()

    async def _request(
        self,
        cmd: int,
        offset: int,
        length: int,
        flags: int = 0,
        data: ReadableBuffer | None = None,
    ) -> object:
        if self._lost is not None:
            raise NBDDisconnected(f"NBD connection lost: {self._lost}")
        async with self._slots:
            if self._lost is not None:
                raise NBDDisconnected(f"NBD connection lost: {self._lost}")
            cookie = self._next_cookie()
            fut: asyncio.Future[object] = self._loop.create_future()
            pend = _Pending(cmd, offset, length, fut)
            if cmd == Cmd.READ:
                pend.data = bytearray(length)
            self._pending[cookie] = pend
            header = encode_request(cmd, cookie, offset, length, flags)
            transport = self._transport
            assert transport is not None
            if data is None:
                transport.write(header)
            elif len(data) <= _JOIN_LIMIT:
                transport.write(header + bytes(data))
            else:
                transport.write(header)
                transport.write(data)
            if not self._can_write.is_set():
                await self._can_write.wait()
            return await fut

    def _next_cookie(self) -> int:
        self._cookie = (self._cookie + 1) & 0xFFFFFFFFFFFFFFFF
        return self._cookie

    # -- protocol callbacks ----------------------------------------------------------------------

    def _on_data(self, data: bytes) -> None:
        try:
            if self.info is None and not self._done.done():
                self._hs.receive_data(data)
                out = self._hs.data_to_send()
                if out and self._transport is not None:
                    self._transport.write(out)
                ev = self._hs.next_event()
                if isinstance(ev, HandshakeDone):
                    self._done.set_result(ev)
                    data = self._hs.trailing_data()
                    if not data:
                        return
                else:
                    return
            self._replies(data)
        except NBDRemoteProtocolError as exc:
            if not self._done.done():
                self._done.set_exception(exc)
            self._fail_all(exc)
            self._abort()

    def _read_length(self, cookie: int) -> int:
        """Data bytes a successful simple reply to ``cookie`` carries (the parser asks)."""
        pend = self._pending.get(cookie)
        return pend.length if pend is not None and pend.cmd == _READ else 0

    def _replies(self, data: bytes) -> None:
        """Frame every complete reply in the buffer with the sans-IO :class:`ReplyParser`
        (views, no copies) and complete its request; a successful write's reply settles its
        group without building a future or task (the replica's hot path)."""
        buf = self._rbuf
        buf += data
        pos, end = 0, len(buf)
        pending = self._pending
        parser = self._parser
        ev: SimpleReply | ReplyChunk | Need | None = None
        try:
            with memoryview(buf) as view:
                while True:
                    ev, after = parser.next_event(view, pos, end)
                    if ev is NEED_DATA:
                        break
                    pos = after
                    if type(ev) is SimpleReply:
                        if not ev.error and ev.data is None:  # a write acknowledged
                            pend = pending.pop(ev.cookie, None)
                            if pend is None:
                                raise NBDRemoteProtocolError(f"reply to unknown cookie {ev.cookie}")
                            pend.settle()
                            continue
                        self._on_simple(ev)
                    else:
                        assert type(ev) is ReplyChunk
                        self._on_chunk(ev)
        finally:
            ev = None  # no view of the buffer may outlive this call
            try:
                del buf[:pos]
            except BufferError:  # an exception's traceback still holds a view: copy
                self._rbuf = bytearray(memoryview(buf)[pos:])

    def _on_simple(self, ev: SimpleReply) -> None:
        pend = self._pending.pop(ev.cookie, None)
        if pend is None:
            raise NBDRemoteProtocolError(f"reply to unknown cookie {ev.cookie}")
        if ev.error:
            pend.error = pend.error or ev.error
            pend.settle()
        elif pend.cmd == Cmd.READ:
            pend.settle(bytes(ev.data or b""))
        else:
            pend.settle()

    def _on_chunk(self, ev: ReplyChunk) -> None:
        pend = self._pending.get(ev.cookie)
        if pend is None:
            raise NBDRemoteProtocolError(f"reply chunk for unknown cookie {ev.cookie}")
        rtype, payload = ev.type, ev.payload
        if rtype == ReplyType.OFFSET_DATA:
            if pend.data is None or len(payload) < 8:
                raise NBDRemoteProtocolError("unexpected OFFSET_DATA chunk")
            (off,) = wire.U64.unpack_from(payload, 0)
            rel = off - pend.offset
            n = len(payload) - 8
            if rel < 0 or rel + n > pend.length:
                raise NBDRemoteProtocolError("OFFSET_DATA outside the request")
            pend.data[rel : rel + n] = memoryview(payload)[8:]
        elif rtype == ReplyType.OFFSET_HOLE:
            if pend.data is None or len(payload) != 12:
                raise NBDRemoteProtocolError("unexpected OFFSET_HOLE chunk")
            off, n = wire.U64.unpack_from(payload, 0)[0], wire.U32.unpack_from(payload, 8)[0]
            rel = off - pend.offset
            if rel < 0 or rel + n > pend.length:
                raise NBDRemoteProtocolError("OFFSET_HOLE outside the request")
            # the buffer starts zeroed; a hole needs no copy
        elif rtype == ReplyType.BLOCK_STATUS:
            if len(payload) < 4 or (len(payload) - 4) % 8:
                raise NBDRemoteProtocolError("bad BLOCK_STATUS chunk")
            for i in range(4, len(payload), 8):
                n, flags = wire.EXTENT.unpack_from(payload, i)
                pend.extents.append(Extent(n, ExtentFlags(flags & 3)))
        elif rtype in (ReplyType.ERROR, ReplyType.ERROR_OFFSET):
            if len(payload) < 6:
                raise NBDRemoteProtocolError("short error chunk")
            err, mlen = wire.ERROR_PAYLOAD.unpack_from(payload, 0)
            pend.error = pend.error or err or errno.EIO
            pend.message = bytes(payload[6 : 6 + mlen]).decode(errors="replace")
        elif rtype != ReplyType.NONE and rtype & 0x8000:
            # unknown error types are still errors; unknown others are ignored (spec)
            pend.error = pend.error or errno.EIO
        if ev.flags & ReplyFlag.DONE:
            del self._pending[ev.cookie]
            if pend.error:
                pend.settle()
            elif pend.cmd == Cmd.READ:
                assert pend.data is not None
                pend.settle(bytes(pend.data))
            elif pend.cmd == Cmd.BLOCK_STATUS:
                pend.settle(pend.extents)
            else:
                pend.settle()

    def _on_lost(self, exc: Exception | None) -> None:
        reason: BaseException = exc or ConnectionResetError("server closed the connection")
        if self._lost is None:
            self._lost = reason
        if not self._done.done():
            self._done.set_exception(NBDDisconnected(f"NBD handshake failed: {reason}"))
        self._fail_all(NBDDisconnected(f"NBD connection lost: {reason}"))
        self._can_write.set()
        self._closed.set()

    def _fail_all(self, exc: BaseException) -> None:
        pending, self._pending = self._pending, {}
        for pend in pending.values():
            pend.fail(exc)

    def _abort(self) -> None:
        if self._lost is None:
            self._lost = ConnectionAbortedError("closed by client")
        if self._transport is not None:
            self._transport.abort()
        else:
            self._closed.set()
        self._fail_all(NBDDisconnected("NBD connection closed"))
