"""The receive path of an NBD connection: buffer, WRITE payloads, framing.

The event loop ``recv_into``s the connection's buffer; :meth:`Receiving._process` frames the
requests in it with the sans-IO :class:`~.transmission.RequestParser` (one call per receive)
and starts each (:mod:`.serving`).  A WRITE payload larger than the buffer gets a
:class:`~.dispatch.PayloadBuffer` of its own, reserved from the server's payload budget; an
oversized or refused one is read into scratch space and dropped.  The hot-path choices are
explained in :mod:`.connection`.
"""

from __future__ import annotations

from blocktrace.nbd import transmission as tx
from blocktrace.nbd.connbase import (
    _BATCH_LIMIT,
    _REQUEST_SIZE,
    _SPARE_MAX,
    BUFFER_SIZE,
    MAX_HELD_BYTES,
    MAX_INFLIGHT,
    ConnectionBase,
)
from blocktrace.nbd.dispatch import PayloadBuffer
from blocktrace.nbd.errors import NBDRequestError
from blocktrace.nbd.events import (
    NEED_DATA,
    PayloadNeeded,
    PayloadRefused,
    Request,
)


class Receiving(ConnectionBase):
    """Receive buffer and framing of one connection."""

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

    # -- framing -------------------------------------------------------------------------------

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
