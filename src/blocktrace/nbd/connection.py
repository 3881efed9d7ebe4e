"""One NBD connection: the asyncio ``BufferedProtocol`` behind :class:`~.server.NBDServer`.

Thin by design: all protocol decisions live in the sans-IO cores (:mod:`.handshake`,
:mod:`.transmission`); this module moves bytes and calls the export's device.

Hot-path choices, each for a measured reason (``docs/nbd-server.md``):

* ``BufferedProtocol`` with one receive buffer per connection (4 KiB while negotiating,
  512 KiB after): the loop ``recv_into``s it, the sans-IO :class:`~.transmission.RequestParser`
  frames requests in place, and WRITE payloads go to the device as memoryview slices of it (no
  copy).  A payload larger than the buffer gets a :class:`~.dispatch.PayloadBuffer` of its own
  that the loop fills directly, allocated as the bytes arrive and reserved from the server's
  payload budget (:mod:`.limits`): for a device that keeps payloads (a traced export) it ends
  as a fresh ``bytes`` object the device keeps without a copy, else it is a reused
  ``bytearray``.  While a device write that holds a view
  is still running, the buffer is *pinned*: instead of being rewound or compacted (which would
  overwrite the bytes under the view) it is replaced by a fresh one.
* No Task per request: the device coroutine is driven with ``coro.send(None)``; local devices
  usually finish without suspending, and the reply is written at once.  Only a coroutine that
  suspends (fdatasync in a thread, a blocking trace target) is wrapped in a Task, which resumes
  it where it stopped (:class:`~.dispatch.Resume`).  Consequence for devices: code before the first
  suspension runs outside any Task (``asyncio.current_task()`` is None there).
* Replies produced while parsing one receive are gathered and written together: header +
  payload pieces through ``writelines`` on uvloop (one ``writev``, no join); on the stock loop
  small batches are joined and large payloads written separately (no copy).
* WRITE payload views are valid only until the device's ``write`` returns: a device that keeps
  the data longer (a queue, a background copy) must copy it; a ``bytes`` payload (owned,
  above) it may keep as is.
* Back-pressure: when the transport's write buffer passes its high-water mark, or too many
  requests are in flight, or suspended requests hold too many payload bytes, or the server's
  payload budget has no room, the connection stops parsing and pauses reading, so a client
  that never reads its replies, or outruns a slow device or a full trace queue, costs a
  bounded amount of memory, in total across connections too (docs/nbd-server.md, RESOURCE
  BOUNDS).

Each connection is isolated: any exception inside it is logged and ends only that connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno as E
import logging
import socket
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any, cast

from blocktrace.block.device import BlockDevice, Extent
from blocktrace.errors import BlockDeviceError, ProtocolError
from blocktrace.exports import Export
from blocktrace.nbd import transmission as tx
from blocktrace.nbd import wire
from blocktrace.nbd.constants import (
    NBD_SIMPLE_REPLY_MAGIC,
    NBD_STRUCTURED_REPLY_MAGIC,
    Cmd,
    CmdFlag,
    ReplyFlag,
    ReplyType,
)
from blocktrace.nbd.dispatch import PayloadBuffer, Resume, block_status
from blocktrace.nbd.errors import NBDRequestError
from blocktrace.nbd.events import (
    NEED_DATA,
    HandshakeAborted,
    HandshakeDone,
    PayloadNeeded,
    PayloadRefused,
    Request,
)
from blocktrace.nbd.handshake import ServerHandshake

if TYPE_CHECKING:
    from blocktrace.nbd.server import NBDServer

log = logging.getLogger("blocktrace.nbd")

#: Receive buffer per connection; WRITE payloads up to about this size are parsed in place.
BUFFER_SIZE = 512 * 1024
#: Receive buffer while negotiating: the 512 KiB one is allocated only once a client has
#: finished the handshake, so connections that never do cost little (issue 10).
HANDSHAKE_BUFFER_SIZE = 4096
#: Requests in flight (suspended in the device) before a connection stops reading.
MAX_INFLIGHT = 256
#: Payload bytes held by suspended requests (their own large buffers, and retired receive
#: buffers they still pin) before a connection stops reading: with MAX_INFLIGHT alone, 256
#: suspended 32 MiB writes (a trace's queue at its cap, a slow remote device) could hold 8 GiB.
MAX_HELD_BYTES = 32 * 1024 * 1024
#: Transport write buffer limits: above HIGH we stop reading the client's requests.
WRITE_HIGH = 4 * 1024 * 1024
WRITE_LOW = 1024 * 1024
#: READs up to this size reserve no payload budget: what they hold is already bounded per
#: connection by the transport's high-water mark, and 4 KiB reads are the hot path.
_READ_UNRESERVED = 64 * 1024
#: Replies smaller than this are joined with their header into one write on the stock loop.
_JOIN_LIMIT = 64 * 1024
_DISCARD_CHUNK = 256 * 1024
#: Largest large-WRITE buffer kept for reuse per connection.
_SPARE_MAX = 4 * 1024 * 1024
#: Gathered reply bytes after which the batch is written out mid-parse (back-pressure).
_BATCH_LIMIT = 256 * 1024

_pack_simple = wire.SIMPLE_REPLY.pack
_SIMPLE_MAGIC = NBD_SIMPLE_REPLY_MAGIC
# A READ reply's structured header, packed inline on the small-READ path (as
# tx.encode_read_header does: one OFFSET_DATA chunk flagged DONE).
_pack_data_header = wire.CHUNK_OFFSET_DATA.pack
_STRUCTURED_MAGIC = NBD_STRUCTURED_REPLY_MAGIC
_DONE = int(ReplyFlag.DONE)
_OFFSET_DATA = int(ReplyType.OFFSET_DATA)
_REQUEST_SIZE = tx.REQUEST_SIZE
_FUA = int(CmdFlag.FUA)
_NO_HOLE = int(CmdFlag.NO_HOLE)
_FAST_ZERO = int(CmdFlag.FAST_ZERO)
_REQ_ONE = int(CmdFlag.REQ_ONE)
_READ, _WRITE, _DISC, _FLUSH, _TRIM, _CACHE, _ZERO, _STATUS = (
    Cmd.READ,
    Cmd.WRITE,
    Cmd.DISC,
    Cmd.FLUSH,
    Cmd.TRIM,
    Cmd.CACHE,
    Cmd.WRITE_ZEROES,
    Cmd.BLOCK_STATUS,
)


class NBDConnection(asyncio.BufferedProtocol):
    """One client connection: handshake, then pipelined transmission."""

    def __init__(self, server: NBDServer, conn_id: int) -> None:
        self.server = server
        self.id = conn_id
        self.export: Export | None = None
        self.transport: asyncio.Transport | None = None
        self.peer = "?"
        self.requests = 0
        self._handshake: ServerHandshake | None = ServerHandshake(
            server.lookup, server.list_exports
        )
        self._deadline: asyncio.TimerHandle | None = None
        self._session: tx.Session | None = None
        self._parser: tx.RequestParser | None = None
        self._device: BlockDevice | None = None
        self._owned = False  # the device keeps the payload being received: owned bytes
        self._budget = server.budget
        self._buf = bytearray(HANDSHAKE_BUFFER_SIZE)
        self._view = memoryview(self._buf)
        self._start = 0
        self._end = 0
        self._pins = 0  # suspended requests holding views of the current receive buffer
        # receive buffers replaced while pinned -> how many suspended requests still pin them
        self._retired: dict[int, int] = {}
        self._held = 0  # see MAX_HELD_BYTES
        # a WRITE payload too big for the receive buffer gets a buffer of its own
        self._payload: PayloadBuffer | None = None
        self._payload_req: Request | None = None
        self._payload_reserved = 0  # budget bytes the payload being received holds
        self._spare: bytearray | None = None  # reusable large-WRITE buffer (budget-counted)
        self._spare_held = 0
        # an oversized or refused WRITE payload is read into scratch space and dropped
        self._discard = 0
        self._discard_req: Request | None = None
        self._scratch: memoryview | None = None
        self._inflight = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._write_paused = False
        self._budget_wait = False  # stopped parsing until the payload budget has room
        self._reads_batched = 0  # budget bytes of READ replies in the current batch
        self._tx_held = 0  # budget bytes of READ replies sitting in a paused transport
        self._reading_paused = False
        self._stopping = False  # DISC received or server shutting down: parse no more
        self._closed = False
        self._writelines = False
        self._loop: asyncio.AbstractEventLoop | None = None
        # Replies produced while parsing one batch of received bytes, written in one go.
        self._batch: list[Any] | None = None
        self._batch_bytes = 0

    # -- asyncio protocol callbacks ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but quack the same.
        transport = cast(asyncio.Transport, transport)
        self.transport = transport
        self._loop = asyncio.get_running_loop()
        self._writelines = type(self._loop).__module__.startswith("uvloop")
        transport.set_write_buffer_limits(high=WRITE_HIGH, low=WRITE_LOW)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            with contextlib.suppress(OSError):  # best effort; asyncio usually set it already
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) and peer else "unix"
        if not self.server._added(self):
            self._handshake = None
            self._stopping = self._closed = True
            transport.abort()
            return
        self._deadline = self._loop.call_later(
            self.server.limits.handshake_timeout, self._handshake_expired
        )
        assert self._handshake is not None
        transport.write(self._handshake.data_to_send())

    def _handshake_expired(self) -> None:
        self._deadline = None
        if self._handshake is not None and not self._closed:
            log.warning(
                "connection %d from %s: handshake not finished within %gs, closing",
                self.id,
                self.peer,
                self.server.limits.handshake_timeout,
            )
            self.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._closed:
            return
        self._closed = True
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        name = self.export.name if self.export is not None else "-"
        why = f": {exc}" if exc else ""
        log.info(
            "connection %d closed (export %s, %d requests)%s", self.id, name, self.requests, why
        )
        if self.export is not None:
            self.export.connections -= 1
        # Memory this connection holds for itself (not for requests still in flight, which
        # release theirs when they finish).
        self._payload = None
        self._spare = None
        budget = self._budget
        budget.forget(self._budget_ready)
        held = self._payload_reserved + self._tx_held + self._reads_batched + self._spare_held
        self._payload_reserved = self._tx_held = self._reads_batched = self._spare_held = 0
        budget.release(held)
        self._maybe_finished()

    def pause_writing(self) -> None:
        self._write_paused = True
        self._update_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        # The READ replies parked in the transport have mostly left: their budget goes back.
        held, self._tx_held = self._tx_held, 0
        self._budget.release(held)
        self._update_reading()
        self._safe(self._process)

    def get_buffer(self, sizehint: int) -> memoryview:
        payload = self._payload
        if payload is not None and not payload.complete:
            return payload.space()
        if self._discard:
            if self._scratch is None:
                self._scratch = memoryview(bytearray(_DISCARD_CHUNK))
            return self._scratch[: min(self._discard, _DISCARD_CHUNK)]
        if self._end == len(self._buf):
            self._compact()
            if self._end == len(self._buf):  # full of unparsed requests: never expected
                grown = bytearray(2 * len(self._buf))
                grown[: self._end] = self._view[: self._end]
                self._buf, self._view, self._pins = grown, memoryview(grown), 0
        return self._view[self._end :]

    def buffer_updated(self, nbytes: int) -> None:
        self._safe(self._received, nbytes)

    def eof_received(self) -> bool:
        """The client half-closed: parse nothing more, but answer what is in flight."""
        self._stopping = True
        if self._inflight:
            return True  # keep the write side open; the last _finish closes it
        self._flush_batch()
        return False

    # -- receiving -----------------------------------------------------------------------------

    def _safe(self, fn: Any, *args: Any) -> None:
        """Run ``fn``; a protocol error or bug ends this connection only."""
        try:
            fn(*args)
        except ProtocolError as exc:
            log.warning("connection %d: protocol error: %s", self.id, exc)
            self.abort()
        except Exception:
            log.exception("connection %d: internal error", self.id)
            self.abort()

    def _received(self, nbytes: int) -> None:
        payload = self._payload
        if payload is not None and not payload.complete:
            payload.filled += nbytes
            if payload.filled == payload.length:
                if self._owned:
                    # The event loop still holds its view of the buffer during this call
                    # (asyncio and uvloop both); handed over from the next callback, the
                    # buffer has no view left and getvalue() gives it away without a copy.
                    # Bytes arriving meanwhile queue in the receive buffer.
                    assert self._loop is not None
                    self._loop.call_soon(self._safe, self._deliver_payload)
                else:
                    self._deliver_payload()
            return
        if self._discard:
            self._discard -= nbytes
            if not self._discard:
                self._refuse_discarded()
                self._process()
            return
        self._end += nbytes
        if self._handshake is not None:
            self._negotiate()
        else:
            self._process()

    def _deliver_payload(self) -> None:
        payload = self._payload
        if payload is None or self._closed:  # connection_lost released its budget
            return
        self._payload_received(payload)
        self._process()

    def _payload_received(self, payload: PayloadBuffer) -> None:
        req = self._payload_req
        assert req is not None
        self._payload = self._payload_req = None
        own, self._payload_reserved = self._payload_reserved, 0
        # owned: the device may keep it (our views are gone)
        done = self._request(req._replace(data=payload.take()), pin=False, own=own)
        spare = payload.reusable()
        if done and spare is not None and len(spare) <= _SPARE_MAX and self._spare is None:
            # The device is done with it: keep it (and its budget) for the next large
            # write, sparing an allocation and its page faults per request.
            self._spare, self._spare_held = spare, own
        elif done:
            self._budget.release(own)

    def _negotiate(self) -> None:
        hs = self._handshake
        assert hs is not None and self.transport is not None
        hs.receive_data(self._view[self._start : self._end])
        self._start = self._end = 0
        out = hs.data_to_send()
        if out:
            self.transport.write(out)
        event = hs.next_event()
        if event is NEED_DATA:
            return
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        if isinstance(event, HandshakeAborted):
            log.info("connection %d: %s", self.id, event.reason)
            self._handshake = None
            self._stopping = True
            self.transport.close()
            return
        assert isinstance(event, HandshakeDone)
        export = self.server.registry.get(event.export.name)
        if export is None:  # removed between negotiation and now
            self.abort()
            return
        self._begin_transmission(event, export)
        rest = hs.trailing_data()
        self._handshake = None
        # The full-size receive buffer, now that the client has proved it speaks NBD.
        self._buf = bytearray(max(BUFFER_SIZE, len(rest)))
        self._view = memoryview(self._buf)
        if rest:
            self._buf[: len(rest)] = rest
            self._end = len(rest)
            self._process()

    def _begin_transmission(self, event: HandshakeDone, export: Export) -> None:
        info = event.export
        self.export = export
        export.connections += 1
        self._device = export.device
        self._session = tx.Session(
            size=info.size,
            flags=info.flags,
            structured=event.structured_replies,
            meta_contexts=event.meta_contexts,
            min_block=info.min_block,
            max_block=info.max_block,
        )
        self._parser = tx.RequestParser(max_payload=info.max_block, inline_limit=BUFFER_SIZE)
        log.info(
            "connection %d opened from %s (export %s%s%s)",
            self.id,
            self.peer,
            export.name,
            ", structured replies" if event.structured_replies else "",
            ", base:allocation" if event.meta_contexts else "",
        )

    def _compact(self) -> None:
        """Make room at the end of the receive buffer, never moving bytes a running write
        still refers to."""
        start, end = self._start, self._end
        if self._pins:
            self._retired[id(self._buf)] = self._pins  # kept alive by the requests' tasks
            self._held += len(self._buf)
            self._buf = bytearray(BUFFER_SIZE)
            self._buf[: end - start] = self._view[start:end]
            self._view = memoryview(self._buf)
            self._pins = 0
        else:
            self._buf[: end - start] = self._view[start:end]
        self._start, self._end = 0, end - start

    def _budget_ready(self) -> None:
        """The payload budget has room again: parse on, from the loop (not from inside the
        release, which may be another connection's call stack)."""
        if self._closed or self._loop is None:
            return
        self._loop.call_soon(self._resume_after_budget)

    def _resume_after_budget(self) -> None:
        if self._budget_wait and not self._closed:
            self._budget_wait = False
            self._update_reading()
            self._safe(self._process)

    def _wait_for_budget(self) -> None:
        self._budget_wait = True
        self._budget.wait(self._budget_ready)

    def _process(self) -> None:
        """Parse and start every complete request in the buffer, until told to stop."""
        parser = self._parser
        if parser is None or self._closed or self._payload is not None or self._discard:
            return
        view = self._view
        pos, end = self._start, self._end
        self._batch = []
        request = self._request
        # Requests framed in one parser call per receive (RequestParser.frame); reqs[i:] are
        # not started yet and begin at ``pos``.
        reqs: list[Request] = []
        i = n = 0
        try:
            while not (
                self._stopping
                or self._write_paused
                or self._budget_wait
                or self._inflight >= MAX_INFLIGHT
                or self._held >= MAX_HELD_BYTES
            ):
                if self._batch_bytes >= _BATCH_LIMIT:
                    # Hand what we have to the transport: it may push back (pause_writing).
                    self._flush_batch()
                    self._batch = []
                    continue
                if i < n:
                    req = reqs[i]
                    data = req[5]
                    if data is None:
                        if request(req, pin=False) is None:
                            break  # a READ waits for payload budget; parsed again later
                        pos += _REQUEST_SIZE
                    else:
                        request(req, pin=True)
                        pos += _REQUEST_SIZE + len(data)
                    i += 1
                    continue
                reqs, _ = parser.frame(view, pos, end)
                n = len(reqs)
                i = 0
                if n:
                    continue
                # Not a complete in-place request: ask about it alone.
                event, after = parser.next_event(view, pos, end)
                if event is NEED_DATA:
                    break
                if type(event) is PayloadRefused:
                    pos = after
                    if self._start_discard(event.request, event.skip):
                        break  # the loop drops the rest of the payload from here
                    continue
                assert type(event) is PayloadNeeded
                req = event.request
                if self._invalid(req):
                    pos = after
                    if self._start_discard(req, req.length - len(event.first)):
                        break
                    continue
                receiving = self._start_payload(req, event.first)
                if receiving is None:
                    break  # no budget: the header stays in the buffer until there is
                pos = after
                if receiving:
                    break  # the loop fills the payload's own buffer from here
        finally:
            if pos == end and not self._pins:
                self._start = self._end = 0
            else:
                self._start = pos
            self._flush_batch()
        self._update_reading()

    def _start_payload(self, req: Request, first: memoryview) -> bool | None:
        """Give a large WRITE's payload a buffer of its own, once the budget allows: None if
        it does not yet (the caller leaves the header in the buffer), True if the payload is
        now being received, False if it was all here and the request has started."""
        length = req.length
        device = self._device
        assert device is not None
        # Asked per payload: a trace can attach (or detach) while the connection is open.
        self._owned = device.keeps_payloads
        spare = self._spare
        if spare is not None and not self._owned and len(spare) >= length:
            self._spare = None
            own, self._spare_held = self._spare_held, 0  # the spare's budget goes with it
        else:
            spare = None
            if self._spare is not None:  # too small, or the device now keeps payloads
                self._spare = None
                held, self._spare_held = self._spare_held, 0
                self._budget.release(held)
            if not self._budget.try_reserve(length):
                self._wait_for_budget()
                return None
            own = length
        payload = PayloadBuffer(length, owned=self._owned, spare=spare)
        payload.fill(first)
        self._payload_reserved = own
        self._payload_req = req
        if payload.complete:  # the whole payload was here after all
            self._payload_received(payload)
            return False
        self._payload = payload
        return True

    def _invalid(self, req: Request) -> bool:
        """Would validation refuse this WRITE?  Then its payload is dropped, not stored."""
        session = self._session
        assert session is not None
        try:
            tx.validate_request(session, req.command, req.flags, req.offset, req.length)
        except NBDRequestError:
            return True
        return False

    def _start_discard(self, req: Request, skip: int) -> bool:
        """Drop ``skip`` more payload bytes, then refuse ``req``; True while dropping."""
        self._discard_req = req
        self._discard = skip
        if not skip:
            self._refuse_discarded()
        return bool(skip)

    def _refuse_discarded(self) -> None:
        req, self._discard_req = self._discard_req, None
        assert req is not None and req.data is None
        self._request(req, pin=False)

    # -- dispatch ------------------------------------------------------------------------------

    def _request(self, req: Request, *, pin: bool, own: int = 0) -> bool | None:
        """Validate and start one request: True if it finished synchronously, False if it
        suspended (a Task finishes it), None if it is a READ that must wait for payload
        budget (nothing was done; the caller parses it again later).

        ``pin``: ``req.data`` is a view of the receive buffer.  ``own``: budget bytes a large
        WRITE's own payload buffer holds; a suspended request gives them back when it ends,
        a synchronous one leaves that to the caller (who may keep the buffer as its spare).
        """
        session = self._session
        device = self._device
        assert session is not None and device is not None
        cmd, flags, cookie, offset, length, data = req
        try:
            tx.validate_request(session, cmd, flags, offset, length)
        except NBDRequestError as exc:
            self.requests += 1
            log.debug("connection %d: %s", self.id, exc)
            self._send(tx.encode_error(session, cookie, cmd, exc.errno, str(exc)))
            return True
        coro: Coroutine[Any, Any, Any]
        reserved = 0  # budget a READ holds for its data until the reply leaves
        if cmd == _READ:
            if length > _READ_UNRESERVED:
                if not self._budget.try_reserve(length):
                    self._wait_for_budget()
                    return None
                reserved = length
            coro = device.read(offset, length)
        elif cmd == _WRITE:
            if data is None:  # oversized: validate_request refused it above
                raise AssertionError("oversized write passed validation")
            coro = device.write(offset, data, fua=bool(flags & _FUA))
        elif cmd == _FLUSH:
            coro = device.flush()
        elif cmd == _TRIM:
            coro = device.trim(offset, length, fua=bool(flags & _FUA))
        elif cmd == _ZERO:
            coro = device.write_zeroes(
                offset,
                length,
                may_trim=not flags & _NO_HOLE,
                fua=bool(flags & _FUA),
                fast=bool(flags & _FAST_ZERO),
            )
        elif cmd == _STATUS:
            coro = block_status(device, offset, length, bool(flags & _REQ_ONE))
        elif cmd == _CACHE:
            coro = device.cache(offset, length)
        elif cmd == _DISC:
            self.requests += 1
            self._stopping = True
            self._maybe_finished()
            return True
        else:  # pragma: no cover - validate_request refuses unknown commands
            raise AssertionError(f"unhandled command {cmd}")
        self.requests += 1
        try:
            fut = coro.send(None)
        except StopIteration as stop:
            batch = self._batch
            if cmd == _READ and not reserved and batch is not None:
                # The hot path, a small READ answered while parsing: its reply joins the
                # batch with no budget to account (what _complete and _send_data do).
                result = stop.value
                batch.append(
                    _pack_data_header(
                        _STRUCTURED_MAGIC, _DONE, _OFFSET_DATA, cookie, 8 + length, offset
                    )
                    if session.structured
                    else _pack_simple(_SIMPLE_MAGIC, 0, cookie)
                )
                batch.append(result)
                self._batch_bytes += len(result)
                return True
            self._complete(cmd, flags, cookie, offset, length, stop.value, reserved)
            return True
        except BlockDeviceError as exc:
            self._fail(cmd, cookie, exc.errno, str(exc), reserved)
            return True
        except Exception as exc:
            log.exception("connection %d: %s failed", self.id, tx.cmd_name(cmd))
            self._fail(cmd, cookie, E.EIO, str(exc), reserved)
            return True
        # The device suspended: finish in a Task (keeping the receive buffer pinned if the
        # device holds a view of it).
        self._inflight += 1
        if pin:
            self._pins += 1
        self._held += own  # a large payload's own buffer, held until the request finishes
        assert self._loop is not None
        task = self._loop.create_task(
            self._finish(
                coro,
                fut,
                cmd,
                flags,
                cookie,
                offset,
                length,
                self._buf if pin else None,
                own,
                reserved,
            )
        )
        self._tasks.add(task)  # the loop holds tasks weakly
        task.add_done_callback(self._tasks.discard)
        return False

    async def _finish(
        self,
        coro: Coroutine[Any, Any, Any],
        fut: Any,
        cmd: int,
        flags: int,
        cookie: int,
        offset: int,
        length: int,
        pinned: bytearray | None,
        own: int,
        reserved: int,
    ) -> None:
        try:
            result = await Resume(coro, fut)
        except BlockDeviceError as exc:
            self._fail(cmd, cookie, exc.errno, str(exc), reserved)
        except Exception as exc:
            log.exception("connection %d: %s failed", self.id, tx.cmd_name(cmd))
            self._fail(cmd, cookie, E.EIO, str(exc), reserved)
        else:
            self._complete(cmd, flags, cookie, offset, length, result, reserved)
        finally:
            if pinned is not None:
                self._unpin(pinned)
            self._held -= own
            self._budget.release(own)
            self._inflight -= 1
            self._update_reading()
            if not self._maybe_finished():
                self._safe(self._process)

    def _unpin(self, buf: bytearray) -> None:
        if buf is self._buf:
            self._pins -= 1
            return
        key = id(buf)
        left = self._retired[key] - 1
        if left:
            self._retired[key] = left
        else:
            del self._retired[key]
            self._held -= len(buf)

    def _complete(
        self,
        cmd: int,
        flags: int,
        cookie: int,
        offset: int,
        length: int,
        result: Any,
        reserved: int = 0,
    ) -> None:
        session = self._session
        assert session is not None
        if cmd == _READ:
            header = tx.encode_read_header(session, cookie, offset, length)
            self._send_data(header, result, reserved)
        elif cmd == _STATUS:
            extents: list[Extent] = result
            desc = tx.block_status_descriptors(extents, length, bool(flags & _REQ_ONE))
            self._send(tx.encode_block_status(session, cookie, desc))
        else:
            self._send(_pack_simple(_SIMPLE_MAGIC, 0, cookie))

    def _fail(self, cmd: int, cookie: int, errno: int, message: str, reserved: int = 0) -> None:
        session = self._session
        assert session is not None
        self._budget.release(reserved)
        log.debug("connection %d: %s: %s", self.id, tx.cmd_name(cmd), message)
        self._send(tx.encode_error(session, cookie, cmd, errno, message))

    # -- sending and lifecycle -----------------------------------------------------------------

    def _send(self, data: bytes) -> None:
        batch = self._batch
        if batch is not None:
            batch.append(data)
            self._batch_bytes += len(data)
        elif not self._closed and self.transport is not None:
            self.transport.write(data)

    def _send_data(self, header: bytes, data: Any, reserved: int) -> None:
        batch = self._batch
        if batch is not None:
            batch.append(header)
            batch.append(data)
            self._batch_bytes += len(data)
            self._reads_batched += reserved
            return
        t = self.transport
        if self._closed or t is None:
            self._budget.release(reserved)
            return
        if self._writelines:
            t.writelines((header, data))
        elif len(data) < _JOIN_LIMIT:
            t.write(header + data)
        else:
            t.write(header)
            t.write(data)
        self._sent_reads(reserved)

    def _sent_reads(self, reserved: int) -> None:
        """READ data of ``reserved`` budget bytes went to the transport: if the client is
        not reading (the transport paused), it stays counted until the transport drains."""
        if self._write_paused and not self._closed:
            self._tx_held += reserved
        else:
            self._budget.release(reserved)

    def _flush_batch(self) -> None:
        """Write the replies gathered while parsing: one writev on uvloop."""
        batch, self._batch = self._batch, None
        reads, self._reads_batched = self._reads_batched, 0
        t = self.transport
        if not batch or self._closed or t is None:
            self._batch_bytes = 0
            self._budget.release(reads)
            return
        if len(batch) == 1:
            t.write(batch[0])
        elif self._writelines:
            t.writelines(batch)
        elif self._batch_bytes < _JOIN_LIMIT:
            t.write(b"".join(batch))
        else:
            for item in batch:
                t.write(item)
        self._batch_bytes = 0
        self._sent_reads(reads)

    def _update_reading(self) -> None:
        t = self.transport
        if t is None or self._closed:
            return
        want_pause = (
            self._write_paused
            or self._stopping
            or self._budget_wait
            or self._inflight >= MAX_INFLIGHT
            or self._held >= MAX_HELD_BYTES
        )
        if want_pause and not self._reading_paused:
            self._reading_paused = True
            t.pause_reading()
        elif not want_pause and self._reading_paused and not self._stopping:
            self._reading_paused = False
            t.resume_reading()

    def _maybe_finished(self) -> bool:
        """Close once stopping and nothing is in flight; deregister once closed and idle."""
        if self._inflight:
            return False
        if self._closed:
            self.server._removed(self)
            return True
        if self._stopping and self.transport is not None:
            self._flush_batch()
            self.transport.close()
            return True
        return False

    def shutdown(self) -> None:
        """Stop reading requests; close after the in-flight ones are answered."""
        if self._closed or self.transport is None:
            return
        self._stopping = True
        if not self._reading_paused:
            self._reading_paused = True
            self.transport.pause_reading()
        self._maybe_finished()

    def abort(self) -> None:
        """Drop the connection at once (protocol error, or shutdown gave up waiting)."""
        self._stopping = True
        if self.transport is not None:
            self.transport.abort()
        else:
            self.server._removed(self)
