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
import socket
from typing import Any, cast

from blocktrace.errors import ProtocolError
from blocktrace.exports import Export
from blocktrace.nbd import transmission as tx
from blocktrace.nbd.connbase import (
    _DISCARD_CHUNK,
    BUFFER_SIZE,
    MAX_HELD_BYTES,
    MAX_INFLIGHT,
    WRITE_HIGH,
    WRITE_LOW,
    log,
)
from blocktrace.nbd.events import (
    NEED_DATA,
    HandshakeAborted,
    HandshakeDone,
)
from blocktrace.nbd.receiving import Receiving
from blocktrace.nbd.serving import Serving


class NBDConnection(Receiving, Serving, asyncio.BufferedProtocol):
    """One client connection: handshake, then pipelined transmission.

    Its code is in parts (:mod:`.connbase`): here the protocol callbacks, negotiation and
    lifecycle; :class:`~.receiving.Receiving` the receive path; :class:`~.serving.Serving`
    requests and replies."""

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

    # -- errors --------------------------------------------------------------------------------

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

    # -- negotiation ---------------------------------------------------------------------------

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

    # -- flow control and lifecycle ------------------------------------------------------------

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
