"""Reading a trace back from JetStream: the records of a subject, in stream order, once each.

:class:`StreamSource` is what ``replay``, ``log save``, ``watch`` and ``follow`` read from.  It
pulls batches from a JetStream pull consumer and reassembles records with
:class:`~blocktrace.jetstream.wire.Decoder` (bounded memory; hostile messages are a
:class:`~blocktrace.errors.FormatError`).  Each record comes with the stream sequence of its
last message: the position a consumer acknowledges, or resumes after.  A message may hold a
group of records (wire format version 2): :meth:`StreamSource.messages` yields them together,
and a consumer acknowledges only after a message's last record (``Positioned.ends_message``).

Two kinds of consumer:

* ephemeral (``durable=None``): reads from ``start`` (stream sequence, default 1) to the end
  the stream had when reading began, or on and on with ``follow``; nothing is acknowledged.
* durable (``durable=NAME``): the server keeps the position.  It is re-created at every start
  from its acknowledgement floor + 1, so a consumer restarted after a crash re-reads exactly
  what it had not acknowledged, in stream order; :meth:`StreamSource.ack` acknowledges
  everything up to a record (``AckPolicy.ALL``), and callers do so only once it is applied
  (and durable, for a replica).  Re-applying an unacknowledged suffix in order leaves an image
  as applying it once did: exactly once in effect.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from blocktrace.errors import FormatError, TargetError
from blocktrace.jetstream import wire
from blocktrace.jetstream.conn import (
    ConnectOptions,
    NatsURL,
    connect,
    default_stream_name,
)
from blocktrace.stream.records import Record

log = logging.getLogger(__name__)
T = TypeVar("T")

#: how long a bounded read (replay, log save) waits for a failing-over cluster
RECOVER_SECONDS = 60.0
#: most messages per pull request
FETCH_BATCH = 512
#: most bytes one pull request may bring: nats-py *drops* messages past a subscription's
#: pending limit (set above two such pulls), and a pull cannot be bounded in bytes through
#: nats-py, so a pull asks for as many messages as fit if every one is as large as the server
#: allows (32 with the default 1 MiB ``max_payload``).  Sizing it by the messages seen so far
#: is wrong: a group's size depends on how many records its batch had, so small messages can
#: be followed by large ones, and the messages dropped at the end of a stream never arrive
FETCH_BYTES = 32 * 1024 * 1024
#: empty pulls in a row after which a bounded read gives up (a message expired meanwhile)
MAX_IDLE_PULLS = 10


@dataclass(frozen=True, slots=True)
class Positioned:
    """A record and the stream sequence of its last message."""

    stream_seq: int
    trace: str
    record: Record
    #: the message's acknowledgement subject (durable consumers)
    reply: str = ""
    #: the record is its message's last (a group's last, or a whole version 1 record): only
    #: there may a consumer acknowledge, since an acknowledgement covers the whole message
    ends_message: bool = True


@dataclass(frozen=True, slots=True)
class Batch:
    """The records one message completed, and the stream sequence of that message."""

    stream_seq: int
    trace: str
    records: Sequence[Record]
    #: the message's acknowledgement subject (durable consumers)
    reply: str = ""


class StreamSource:
    """The records published on one subject.  ``async with StreamSource(url) as src:``."""

    def __init__(
        self,
        url: NatsURL,
        *,
        stream: str | None = None,
        connect_options: ConnectOptions | None = None,
        durable: str | None = None,
        max_record_bytes: int = wire.DEFAULT_MAX_RECORD_BYTES,
    ) -> None:
        self.url = url
        self.stream = stream or default_stream_name(url.subject)
        self.connect_options = connect_options or ConnectOptions()
        self.durable = durable
        self.name = f"jetstream:{url}"
        self.decoder = wire.Decoder(max_record_bytes)
        self.skipped = 0  # redelivered messages dropped (already seen)
        self._nc: Any = None
        self._js: Any = None
        self._sub: Any = None
        self._last = 0  # stream sequence of the last message read

    async def __aenter__(self) -> StreamSource:
        self._nc = await connect(self.url, self.connect_options, what=self.name)
        self._js = self._nc.jetstream(timeout=10)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._nc is not None:
            await self._nc.close()
            self._nc = None

    async def _stream_state(self) -> tuple[int, int]:
        """The stream's (first, last) sequence now."""
        import nats.js.errors

        try:
            info = await self._js.stream_info(self.stream)
        except nats.js.errors.NotFoundError:
            raise TargetError(self.name, f"no stream {self.stream} on {self.url.server}") from None
        return int(info.state.first_seq), int(info.state.last_seq)

    async def stored_bytes(self) -> int:
        """Bytes the stream stores (messages with their headers), for throughput figures."""
        info = await self._js.stream_info(self.stream)
        return int(info.state.bytes)

    async def end(self) -> int:
        """The stream's last sequence now."""
        return (await self._stream_state())[1]

    async def _subscribe(self, start: int) -> int:
        """(Re-)create the consumer from stream sequence ``start`` (a durable one from after
        its acknowledgement floor if that is later); return where it starts."""
        import nats.js.errors
        from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

        if self._sub is not None:
            with contextlib.suppress(Exception):  # an ephemeral one also expires by itself
                await self._sub.unsubscribe()
            self._sub = None
        if self.durable is not None:
            try:
                info = await self._js.consumer_info(self.stream, self.durable)
                start = max(start, int(info.ack_floor.stream_seq) + 1)
                await self._js.delete_consumer(self.stream, self.durable)
            except nats.js.errors.NotFoundError:
                pass
        config = ConsumerConfig(
            ack_policy=AckPolicy.ALL if self.durable else AckPolicy.NONE,
            deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
            opt_start_seq=max(1, start),
            max_ack_pending=-1,
            ack_wait=3600.0,
            inactive_threshold=None if self.durable else 60.0,
        )
        self._sub = await self._js.pull_subscribe(
            self.url.subject,
            durable=self.durable,
            stream=self.stream,
            config=config,
            pending_bytes_limit=2 * FETCH_BYTES + 2 * self._nc.max_payload,
            pending_msgs_limit=4 * FETCH_BATCH,
        )
        return max(1, start)

    async def _retry(self, step: Callable[[], Awaitable[T]], deadline: float | None) -> T:
        """Run ``step`` until it succeeds, backing off while the cluster fails over (until
        ``deadline``, or for ever when None)."""
        import nats.errors
        import nats.js.errors

        delay = 0.1
        while True:
            try:
                return await step()
            except (nats.errors.Error, nats.js.errors.Error, OSError) as exc:
                why = str(exc) or type(exc).__name__
                if deadline is not None and time.monotonic() > deadline:
                    raise TargetError(self.name, why) from None
                log.warning("%s: %s; retrying", self.name, why)
                await asyncio.sleep(delay)
                delay = min(2 * delay, 2.0)

    async def _recover(self, why: str, deadline: float | None) -> None:
        """Re-create the consumer after the last message read."""
        log.warning("%s: %s; resuming after stream sequence %d", self.name, why, self._last)
        await self._retry(lambda: self._subscribe(self._last + 1), deadline)

    async def records(
        self, *, start: int = 1, follow: bool = False, idle: float = 1.0
    ) -> AsyncIterator[Positioned]:
        """Yield records from stream sequence ``start``, each with its position (see
        :meth:`messages`, which this flattens)."""
        async for batch in self.messages(start=start, follow=follow, idle=idle):
            seq, trace, reply = batch.stream_seq, batch.trace, batch.reply
            *head, last = batch.records
            for rec in head:
                yield Positioned(seq, trace, rec, reply, False)
            yield Positioned(seq, trace, last, reply)

    async def messages(
        self, *, start: int = 1, follow: bool = False, idle: float = 1.0
    ) -> AsyncIterator[Batch]:
        """Yield the records of each message from stream sequence ``start`` (a group's, or a
        whole version 1 record once its last chunk arrived), as one :class:`Batch`: what a
        consumer that applies many small records iterates, one step per message rather than
        per record.  Without ``follow``, stop at the end the stream has now; with it, wait
        for more (``idle`` seconds per empty pull).

        Every message is checked to follow the previous one: a message lost on its way (a
        consumer leader failing over can advance past messages that never arrived) makes
        the consumer be re-created after the last one read; a gap that persists means the
        stream lacks messages (deleted, expired) and is a :class:`FormatError`.
        """
        import nats.errors
        import nats.js.errors

        deadline = None if follow else time.monotonic() + RECOVER_SECONDS
        first, end = await self._retry(self._stream_state, deadline)
        self._last = max(await self._retry(lambda: self._subscribe(start), deadline), first) - 1
        if not follow and end <= self._last:
            return
        idle_pulls = 0
        gap_at = 0
        batch = max(1, min(FETCH_BATCH, FETCH_BYTES // int(self._nc.max_payload)))
        recover_by: float | None = None
        while True:
            try:
                msgs = await self._sub.fetch(batch, timeout=idle)
                idle_pulls = 0
                recover_by = None
            except (TimeoutError, nats.errors.TimeoutError):
                idle_pulls += 1
                if follow or idle_pulls < MAX_IDLE_PULLS:
                    continue
                raise TargetError(
                    self.name, f"no message after {self._last} (the stream ended at {end})"
                ) from None
            except (nats.errors.Error, nats.js.errors.Error, OSError) as exc:
                if recover_by is None and not follow:
                    recover_by = time.monotonic() + RECOVER_SECONDS
                await self._recover(f"pull failed: {exc or type(exc).__name__}", recover_by)
                continue
            for msg in msgs:
                seq = int(msg.metadata.sequence.stream)
                if seq <= self._last:
                    self.skipped += 1
                    continue
                if seq != self._last + 1:
                    if gap_at == seq:
                        raise FormatError(
                            f"{self.name}: stream lacks messages {self._last + 1}..{seq - 1}"
                        )
                    gap_at = seq
                    await self._recover(f"message {seq} after {self._last}", None)
                    break
                gap_at = 0
                self._last = seq
                decoded = self.decoder.feed(msg.headers, msg.data)
                if decoded is not None:
                    yield Batch(seq, decoded.trace, decoded.records, msg.reply or "")
                if not follow and seq >= end:
                    if self.decoder.in_record:
                        raise FormatError(f"{self.name}: stream ends inside record")
                    return

    async def ack(self, item: Positioned) -> None:
        """Acknowledge every message up to ``item``'s (durable consumers; ``AckPolicy.ALL``),
        and wait until the server has it: call only once ``item`` is applied, and only for the
        last record of its message (``item.ends_message``), since the acknowledgement covers
        every record of the message: acknowledging mid-group would let a restart skip the
        rest of the group."""
        import nats.errors

        if not item.ends_message:
            raise ValueError(f"record #{item.record.seq} is not the last of its message")
        if self.durable is None or self._nc is None or not item.reply:
            return
        try:
            await self._nc.publish(item.reply, b"+ACK")
            await self._nc.flush(timeout=10)
        except (nats.errors.Error, OSError) as exc:
            # a lost acknowledgement only means re-applying more after a restart (the next
            # one covers this one: AckPolicy.ALL)
            log.warning("%s: acknowledgement lost: %s", self.name, exc or type(exc).__name__)
