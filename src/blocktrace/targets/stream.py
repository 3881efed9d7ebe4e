"""The ``stream`` trace target: publish the write stream to a NATS JetStream subject.

``--trace disk=stream:nats://127.0.0.1:4222/vm1.disk[,replicas=3,...]`` or QMP
``{"type": "stream", "uri": "nats://...", ...}``.  The records of each ``deliver`` batch
(write with its data, zero, trim, flush, FUA, mark) travel in as few messages as the wire format
allows: groups of whole records (a group ends at a FLUSH, a FUA record or a mark), or several
chunks for a write larger than the server's ``max_payload`` (:mod:`blocktrace.jetstream.wire`);
they are published in stream order by
:class:`~blocktrace.jetstream.publisher.Publisher`: pipelined, each message conditional on the
stream ending where the previous one was stored, and de-duplicated by ``Nats-Msg-Id``.

``deliver`` returns when JetStream has acknowledged every message of the batch, i.e. stored it
on the stream's replicas (a quorum for R3): that is what "held" means here, so
``copy-mode=write-blocking`` acknowledges a client write only after JetStream did, and
``background`` keeps the trace's bounded queue in front.  ``make_durable`` has nothing to add:
a FLUSH or FUA is acknowledged once the acknowledgements covering it arrived (the delivery
layer waits for ``deliver`` before ``make_durable``).  How durable a JetStream acknowledgement is
against power loss is the server's choice (docs/jetstream.md).

The options are declared once, in :data:`TARGET_TYPE` (docs/jetstream.md has the table):
``--trace``, QMP ``block-trace``, ``trace start``, ``--help`` and ``query-block-jobs`` come
from it.  The schema checks each value's type and range; the factory then checks what only
NATS knows (the address, the stream's name) with the same one-line
:class:`~blocktrace.errors.UsageError` on the command line and in QMP.  nats-py itself is
imported only when the target opens (:mod:`blocktrace.jetstream` imports it inside its
functions), since the registry imports every target module.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping, Sequence
from typing import Any

from blocktrace.errors import TargetError
from blocktrace.jetstream.conn import (
    ConnectOptions,
    NatsURL,
    StreamSettings,
    connect,
    ensure_stream,
)
from blocktrace.jetstream.publisher import Publisher
from blocktrace.stream import Record, Target, TargetInfo
from blocktrace.stream.schema import Choice, Integer, Option, Seconds, TargetType, Text

#: the options :class:`~blocktrace.jetstream.conn.StreamSettings` takes (the stream's config)
_STREAM_KEYS = (
    "stream",
    "replicas",
    "retention",
    "storage",
    "max-bytes",
    "max-msgs",
    "max-age",
    "duplicate-window",
)


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
        self.stream_settings = settings
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
            await ensure_stream(js, self.stream_settings, what=self.name)
            self._publisher = Publisher(
                self._nc,
                js,
                subject=self.url.subject,
                stream=self.stream_settings.name,
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

    async def deliver(self, records: Sequence[Record]) -> None:
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

    def settings(self) -> dict[str, Any]:
        """The declared options, with the stream's effective name and replica count."""
        return {
            "type": "stream",
            "uri": str(self.url),
            **super().settings(),
            "stream": self.stream_settings.name,
            "replicas": self.stream_settings.replicas,
        }

    def status(self) -> dict[str, Any]:
        status: dict[str, Any] = {"trace-id": self.trace_id}
        if self._publisher is not None:
            status["last-seq"] = self._publisher.last_seq
            status["duplicates"] = self._publisher.duplicates
            status["retries"] = self._publisher.retries
        return status


def _create(values: Mapping[str, Any]) -> StreamTarget:
    """The target from the schema's parsed values (absent options are None)."""
    url = NatsURL.parse(values["uri"])
    stream_opts = {k: values[k] for k in _STREAM_KEYS if values[k] is not None}
    settings = StreamSettings.pop(url.subject, stream_opts)
    return StreamTarget(
        url,
        settings=settings,
        connect_options=ConnectOptions(
            creds=values["creds"],
            nkey_seed=values["nkey"],
            tls_ca=values["tls-ca"],
            tls_cert=values["tls-cert"],
            tls_key=values["tls-key"],
        ),
        ack_timeout=float(values["ack-timeout"]),
        retry_timeout=float(values["retry-timeout"]),
    )


TARGET_TYPE = TargetType(
    name="stream",
    doc="a NATS JetStream subject, consumed anywhere (docs/jetstream.md)",
    order=50,
    options=(
        Option(
            "uri",
            Text("nats://HOST:PORT/SUBJECT"),
            "the subject to publish to (tls:// for TLS)",
            main=True,
        ),
        Option("stream", Text("NAME"), "JetStream stream name (default BT_<subject>)"),
        Option("replicas", Integer(1, 5, kind="uint32"), "stream replicas", default=1),
        Option(
            "retention",
            Choice(("limits", "interest", "workqueue")),
            "the stream's retention policy",
            default="limits",
        ),
        Option("storage", Choice(("file", "memory")), "the stream's storage", default="file"),
        Option(
            "max-bytes",
            Integer(0, (1 << 63) - 1, kind="uint64", size=True),
            "stream byte limit (a full stream is a target error: on-target-error)",
        ),
        Option("max-msgs", Integer(0, (1 << 63) - 1, kind="uint64"), "stream message limit"),
        Option(
            "max-age",
            Seconds(0, (1 << 32) - 1, floor=0.0),
            "age limit of the stream's messages, seconds (0: none)",
        ),
        Option(
            "duplicate-window",
            Seconds(0, (1 << 32) - 1, floor=0.0),
            "how long JetStream remembers message ids, seconds",
            default=120,
        ),
        Option("creds", Text("PATH"), "NATS credentials file"),
        Option("nkey", Text("PATH"), "NATS nkey seed file"),
        Option("tls-ca", Text("PATH"), "CA certificates for TLS"),
        Option("tls-cert", Text("PATH"), "client certificate for TLS"),
        Option("tls-key", Text("PATH"), "client certificate's key for TLS"),
        Option(
            "ack-timeout",
            Seconds(1, 3600),
            "wait this long for an acknowledgement before re-sending, seconds",
            default=5,
        ),
        Option(
            "retry-timeout",
            Seconds(1, 86400),
            "give up (a target error) after retrying this long, seconds",
            default=60,
        ),
    ),
    factory=_create,
)
