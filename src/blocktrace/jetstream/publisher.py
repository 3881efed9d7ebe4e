"""The ordered, acknowledged publisher behind the ``stream`` target.

Order.  One trace owns its stream (one subject, one publisher).  Every message carries
``Nats-Expected-Last-Sequence``: the stream sequence the previous message got.  The server
stores a message only if the stream ends where the publisher believes, so messages are
*pipelined* (a whole batch is in flight, no round trip per record) and still the stream is
always a prefix of what was sent: if one message is lost (a leader dies, a connection drops),
every later one is refused rather than stored out of order.

Exactly once.  Every message also carries ``Nats-Msg-Id`` (:mod:`.wire`: trace run and first
record of a group, or record and chunk), so a message re-sent after a reconnect that the server
had in fact stored is answered "duplicate" and not stored twice.  A batch is encoded once, so
its re-sent messages are the same groups with the same ids.

Groups.  The records of one ``publish`` call travel as few messages as the wire format allows
(version 2 groups, :func:`.wire.encode_batch`): one message, one acknowledgement, one stored
entry for many small records.  Nothing is held back for a later call, so grouping never delays
an acknowledgement; the stream position (``last_seq``) counts messages, not records.

Recovery.  When an acknowledgement is an error, or does not come within ``ack_timeout``, the
publisher asks the stream where it ends (``last_seq``), checks that the last message is its own,
and re-sends from the first message not stored, with the right expected sequence, backing off
until ``retry_timeout``; then it gives up with :class:`~blocktrace.errors.TargetError` and the
trace's ``on-target-error`` decides.  A stream that refuses a message because it is full
(``discard=new`` and a limit reached) is a target error at once: waiting would not help.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
from collections.abc import Sequence
from typing import Any

from blocktrace.errors import TargetError
from blocktrace.jetstream import wire
from blocktrace.stream.records import Record

log = logging.getLogger(__name__)

#: JetStream's error code for a failed ``Nats-Expected-Last-Sequence`` check
ERR_WRONG_LAST_SEQUENCE = 10071
#: error codes of a full stream (``discard=new``): bytes, messages, message size
ERR_STREAM_FULL = frozenset({10077, 10078, 10054})
#: most messages in flight at once
MAX_INFLIGHT = 4096


#: an acknowledgement that is neither an error nor a duplicate
_PLAIN_ACK = re.compile(rb'\{"stream":"[^"]*", ?(?:"domain":"[^"]*", ?)?"seq":(\d+)\}')


class _Retry(Exception):
    """A batch must be re-sent from where the stream ends (internal)."""


class Publisher:
    """Publish records to ``subject`` on the stream ``stream``, in order, acknowledged."""

    def __init__(
        self,
        nc: Any,
        js: Any,
        *,
        subject: str,
        stream: str,
        trace: str,
        name: str,
        ack_timeout: float = 5.0,
        retry_timeout: float = 60.0,
    ) -> None:
        self.nc = nc
        self.js = js
        self.subject = subject
        self.stream = stream
        self.trace = trace
        self.name = name
        self.ack_timeout = ack_timeout
        self.retry_timeout = retry_timeout
        self.max_body = wire.chunk_size(nc.max_payload)
        #: stream sequence of the last message stored (ours or, at open, anyone's)
        self.last_seq = 0
        self.published = 0  # messages acknowledged
        self.duplicates = 0  # acknowledgements that said "duplicate" (a re-send was a no-op)
        self.retries = 0
        self._inbox = ""
        self._futures: dict[str, asyncio.Future[bytes]] = {}
        self._token = 0
        self._sub: Any = None
        self._next = 0  # index in the batch being published of the first unacknowledged message

    async def open(self) -> None:
        self._inbox = self.nc.new_inbox()
        self._sub = await self.nc.subscribe(self._inbox + ".*", cb=self._on_reply)
        self.last_seq = await self._stream_end()

    async def close(self) -> None:
        if self._sub is not None:
            with contextlib.suppress(Exception):  # a closed connection: nothing to undo
                await self._sub.unsubscribe()
        for fut in self._futures.values():
            fut.cancel()
        self._futures.clear()

    async def _on_reply(self, msg: Any) -> None:
        fut = self._futures.pop(msg.subject[len(self._inbox) + 1 :], None)
        if fut is not None and not fut.done():
            if msg.headers and msg.headers.get("Status") == "503":
                fut.set_result(b'{"error": {"code": 503, "description": "no responders"}}')
            else:
                fut.set_result(msg.data)

    async def _stream_end(self) -> int:
        info = await self.js.stream_info(self.stream)
        return int(info.state.last_seq)

    async def publish(self, records: Sequence[Record]) -> None:
        """Return once every record is stored on the stream (acknowledged by JetStream).

        The records are packed into as few messages as :func:`~.wire.encode_batch` allows (a
        group ends at a FLUSH, FUA or mark, and at the message's bounds); only these records
        are grouped, so a record's acknowledgement never waits for a later one.
        """
        msgs = wire.encode_batch(records, self.trace, self.max_body)
        self._next = 0
        deadline: float | None = None
        while self._next < len(msgs):
            try:
                await self._send(msgs)
                deadline = None
            except _Retry as exc:
                now = time.monotonic()
                if deadline is None:
                    deadline = now + self.retry_timeout
                    log.warning("%s: %s; re-sending from where the stream ends", self.name, exc)
                if now > deadline:
                    raise TargetError(self.name, f"JetStream unavailable: {exc}") from None
                self.retries += 1
                self._next = await self._resync(msgs, self._next, deadline)

    async def _send(self, msgs: list[wire.Message]) -> None:
        """Send up to MAX_INFLIGHT messages from ``msgs[self._next]`` pipelined, then check
        their acknowledgements in order, advancing ``self._next`` past each stored one; raise
        :class:`_Retry` at the first that is missing or refused."""
        import nats.errors

        start = self._next
        end = min(len(msgs), start + MAX_INFLIGHT)
        futs: list[asyncio.Future[bytes]] = []
        loop = asyncio.get_running_loop()
        expected = self.last_seq
        try:
            for msg in msgs[start:end]:
                self._token += 1
                token = str(self._token)
                fut: asyncio.Future[bytes] = loop.create_future()
                self._futures[token] = fut
                futs.append(fut)
                headers = dict(msg.headers)
                headers["Nats-Expected-Last-Sequence"] = str(expected)
                expected += 1
                await self.nc.publish(
                    self.subject, msg.body, reply=f"{self._inbox}.{token}", headers=headers
                )
            # one timer for the window: acknowledgements come back in order
            await asyncio.wait(futs, timeout=self.ack_timeout)
        except (nats.errors.Error, OSError) as exc:
            self._forget(futs)
            raise _Retry(f"publish failed: {exc or type(exc).__name__}") from None
        try:
            for fut in futs:
                if not fut.done():
                    raise _Retry("no acknowledgement within the ack timeout")
                self._check_ack(fut.result(), msgs[self._next])
                self._next += 1
        finally:
            self._forget(futs)

    def _forget(self, futs: list[asyncio.Future[bytes]]) -> None:
        for fut in futs:
            if not fut.done():
                fut.cancel()
        if len(self._futures) > 4 * MAX_INFLIGHT:  # replies that never came
            self._futures = {k: f for k, f in self._futures.items() if not f.done()}

    def _check_ack(self, raw: bytes, msg: wire.Message) -> None:
        plain = _PLAIN_ACK.fullmatch(raw)
        if plain is not None:  # the common case, without a JSON parse
            seq = int(plain.group(1))
            if seq != self.last_seq + 1:
                raise _Retry(f"stored at {seq}, expected {self.last_seq + 1}")
            self.last_seq = seq
            self.published += 1
            return
        try:
            resp = json.loads(raw)
        except ValueError:
            raise _Retry(f"bad acknowledgement {raw[:80]!r}") from None
        err = resp.get("error")
        if err is not None:
            code = err.get("err_code", 0)
            text = err.get("description", "error")
            if code in ERR_STREAM_FULL or "maximum" in text:
                raise TargetError(self.name, f"stream {self.stream} is full: {text}")
            if code == ERR_WRONG_LAST_SEQUENCE or err.get("code") in (503, 408):
                raise _Retry(text)
            raise TargetError(self.name, f"JetStream refused {msg.msg_id}: {text}")
        seq = int(resp.get("seq", 0))
        if resp.get("duplicate"):
            self.duplicates += 1
        elif seq != self.last_seq + 1:
            raise _Retry(f"stored at {seq}, expected {self.last_seq + 1}")
        self.last_seq = max(self.last_seq, seq)
        self.published += 1

    async def _resync(self, msgs: list[wire.Message], start: int, deadline: float) -> int:
        """Find where the stream ends; return the index of the first message to re-send."""
        import nats.errors
        import nats.js.errors

        delay = 0.05
        while True:
            try:
                end = await self._stream_end()
                break
            except (nats.errors.Error, nats.js.errors.Error, OSError, TimeoutError) as exc:
                if time.monotonic() > deadline:
                    raise TargetError(self.name, f"JetStream unavailable: {exc}") from None
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)
        stored = end - self.last_seq
        if stored < 0 or start + stored > len(msgs):
            raise TargetError(
                self.name,
                f"stream {self.stream} ends at {end}, this trace at {self.last_seq}: "
                "another publisher or a purge; stopping rather than interleaving",
            )
        if stored:
            await self._check_own(end, msgs[start + stored - 1])
        self.last_seq = end
        self.published += stored
        return start + stored

    async def _check_own(self, seq: int, msg: wire.Message) -> None:
        raw = await self.js.get_msg(self.stream, seq)
        headers = raw.headers or {}
        if headers.get("Nats-Msg-Id") != msg.msg_id:
            raise TargetError(
                self.name,
                f"stream {self.stream} message {seq} is {headers.get('Nats-Msg-Id')!r}, "
                f"not {msg.msg_id!r}: another publisher on the stream",
            )
