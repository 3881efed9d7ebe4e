"""The ``stream`` trace target: publish the write stream to a NATS JetStream subject.

``--trace disk=stream:nats://127.0.0.1:4222/vm1.disk[,replicas=3,...]`` or QMP
``{"type": "stream", "uri": "nats://...", ...}``.  Each record (write with its data, zero,
trim, flush, FUA, mark) becomes one message, or several chunks when its data is larger than the
server's ``max_payload`` (:mod:`blocktrace.jetstream.wire`), published in stream order by
:class:`~blocktrace.jetstream.publisher.Publisher`: pipelined, each message conditional on the
stream ending where the previous one was stored, and de-duplicated by ``Nats-Msg-Id``.

``deliver`` returns when JetStream has acknowledged every message of the batch, i.e. stored it
on the stream's replicas (a quorum for R3): that is what "held" means here, so
``copy-mode=write-blocking`` acknowledges a client write only after JetStream did, and
``background`` keeps the trace's bounded queue in front.  ``make_durable`` has nothing to add:
a FLUSH or FUA is acknowledged once the acknowledgements covering it arrived (the delivery
layer waits for ``deliver`` before ``make_durable``).  How durable a JetStream acknowledgement is
against power loss is the server's choice (docs/jetstream.md).

Options: ``stream`` (name, default ``BT_<subject>``), ``replicas``, ``retention``
(limits|interest|workqueue), ``storage`` (file|memory), ``max-bytes``, ``max-msgs``,
``max-age`` (seconds), ``duplicate-window`` (seconds), ``creds``, ``nkey``, ``tls-ca``,
``tls-cert``, ``tls-key``, ``ack-timeout``, ``retry-timeout`` (seconds).
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from typing import Any

from blocktrace.errors import TargetError, UsageError
from blocktrace.jetstream.conn import (
    ConnectOptions,
    NatsURL,
    StreamSettings,
    connect,
    ensure_stream,
    reject_unknown,
)
from blocktrace.jetstream.publisher import Publisher
from blocktrace.trace.records import TraceRecord
from blocktrace.trace.targets.base import Target, TargetInfo


class StreamTarget(Target):
    """Publish a trace to a JetStream stream."""

    def __init__(
        self,
        url: NatsURL,
        *,
        settings: StreamSettings,
        connect_options: ConnectOptions,
        ack_timeout: float = 5.0,
        retry_timeout: float = 60.0,
    ) -> None:
        self.url = url
        self.name = f"stream:{url}"
        self.settings = settings
        self.connect_options = connect_options
        self.ack_timeout = ack_timeout
        self.retry_timeout = retry_timeout
        #: this run's id: part of every message id, so a re-send is a no-op
        self.trace_id = secrets.token_hex(8)
        self._nc: Any = None
        self._publisher: Publisher | None = None
        self._alignment = 512

    @property
    def alignment(self) -> int:
        """The export's block size (at least 512), as for a log: a consumer can save the
        stream as a dm-log-writes log (``blocktrace log save``) without reading the image."""
        return self._alignment

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> StreamTarget:
        opts = dict(spec)
        opts.pop("type", None)
        uri = opts.pop("uri", None)
        if not isinstance(uri, str) or not uri:
            raise UsageError("stream target needs a 'uri' (nats://HOST:PORT/SUBJECT)")
        url = NatsURL.parse(uri)
        settings = StreamSettings.pop(url.subject, opts)
        conn = ConnectOptions.pop(opts)
        try:
            ack_timeout = float(opts.pop("ack-timeout", 5.0))
            retry_timeout = float(opts.pop("retry-timeout", 60.0))
        except (TypeError, ValueError) as exc:
            raise UsageError(f"stream target: {exc}") from None
        reject_unknown(opts, "stream target")
        return cls(
            url,
            settings=settings,
            connect_options=conn,
            ack_timeout=ack_timeout,
            retry_timeout=retry_timeout,
        )

    @property
    def publisher(self) -> Publisher:
        if self._publisher is None:
            raise TargetError(self.name, "stream is not open")
        return self._publisher

    async def open(self, info: TargetInfo) -> None:
        self._alignment = max(512, info.block_size)
        self._nc = await connect(
            self.url,
            self.connect_options,
            what=self.name,
            name=f"blocktrace {info.export} {self.trace_id}",
        )
        try:
            js = self._nc.jetstream(timeout=self.ack_timeout)
            await ensure_stream(js, self.settings, what=self.name)
            self._publisher = Publisher(
                self._nc,
                js,
                subject=self.url.subject,
                stream=self.settings.name,
                trace=self.trace_id,
                name=self.name,
                ack_timeout=self.ack_timeout,
                retry_timeout=self.retry_timeout,
            )
            await self._publisher.open()
        except BaseException:
            await self._nc.close()
            self._nc = None
            raise

    async def deliver(self, records: Sequence[TraceRecord]) -> None:
        await self.publisher.publish(records)

    async def make_durable(self) -> None:
        """Every delivered record was acknowledged by JetStream already (see module doc)."""

    async def close(self, *, clean: bool) -> None:
        if self._publisher is not None:
            await self._publisher.close()
            self._publisher = None
        if self._nc is not None:
            try:
                await self._nc.close()
            finally:
                self._nc = None

    def describe(self) -> dict[str, Any]:
        desc: dict[str, Any] = {
            "type": "stream",
            "uri": str(self.url),
            "stream": self.settings.name,
            "replicas": self.settings.replicas,
            "trace-id": self.trace_id,
        }
        if self._publisher is not None:
            desc["last-seq"] = self._publisher.last_seq
            desc["duplicates"] = self._publisher.duplicates
            desc["retries"] = self._publisher.retries
        return desc
