"""``nats://HOST:PORT/SUBJECT`` addresses, connection options and the stream's configuration.

Shared by the ``stream`` trace target and every consumer command, so that one spelling of an
address and of its options works everywhere.  nats-py's exceptions are translated here, once,
into :class:`~blocktrace.errors.TargetError` (a server that cannot be reached or refuses) and
:class:`~blocktrace.errors.UsageError` (a bad address or option).
"""

from __future__ import annotations

import asyncio
import re
import ssl
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from blocktrace.errors import TargetError, UsageError
from blocktrace.stream.schema import parse_size

#: a NATS subject we publish to: dot-separated tokens, no wildcards, no white space
_SUBJECT_RE = re.compile(r"[A-Za-z0-9_\-$]+(\.[A-Za-z0-9_\-$]+)*")
_STREAM_RE = re.compile(r"[A-Za-z0-9_\-]{1,128}")
SCHEMES = ("nats", "tls")


def is_nats_url(text: str) -> bool:
    """True for the addresses consumer commands read from JetStream rather than a file."""
    return text.startswith(tuple(f"{s}://" for s in SCHEMES))


@dataclass(frozen=True, slots=True)
class NatsURL:
    """A parsed ``nats://HOST:PORT/SUBJECT`` (``tls://`` for TLS)."""

    scheme: str
    host: str
    port: int
    subject: str

    @property
    def server(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"

    def __str__(self) -> str:
        return f"{self.server}/{self.subject}"

    @classmethod
    def parse(cls, text: str, *, need_subject: bool = True) -> NatsURL:
        parts = urllib.parse.urlsplit(text)
        if parts.scheme not in SCHEMES:
            raise UsageError(f"{text!r}: expected nats://HOST:PORT/SUBJECT")
        try:
            port = parts.port or 4222
        except ValueError:
            raise UsageError(f"{text!r}: bad port") from None
        host = parts.hostname or "127.0.0.1"
        subject = parts.path.lstrip("/")
        if parts.query or parts.fragment or parts.username:
            raise UsageError(f"{text!r}: options go after a comma, credentials in creds=FILE")
        if (need_subject or subject) and not _SUBJECT_RE.fullmatch(subject):
            raise UsageError(f"{text!r}: {subject!r} is not a NATS subject (a.b.c, no wildcards)")
        return cls(parts.scheme, host, port, subject)


def default_stream_name(subject: str) -> str:
    """``vm1.disk`` -> ``BT_vm1_disk``: one stream per traced subject."""
    return "BT_" + re.sub(r"[^A-Za-z0-9_\-]", "_", subject)[:120]


@dataclass(frozen=True, slots=True)
class ConnectOptions:
    """How to reach and authenticate to the server (what nats-py supports)."""

    creds: str | None = None
    nkey_seed: str | None = None
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    connect_timeout: float = 5.0

    def kwargs(self, url: NatsURL) -> dict[str, Any]:
        kw: dict[str, Any] = {"servers": [url.server], "connect_timeout": self.connect_timeout}
        if self.creds:
            kw["user_credentials"] = self.creds
        if self.nkey_seed:
            kw["nkeys_seed"] = self.nkey_seed
        if url.scheme == "tls" or self.tls_ca or self.tls_cert:
            ctx = ssl.create_default_context(cafile=self.tls_ca)
            if self.tls_cert:
                ctx.load_cert_chain(self.tls_cert, self.tls_key)
            kw["tls"] = ctx
        return kw


_RETENTION = ("limits", "interest", "workqueue")
_STORAGE = ("file", "memory")


@dataclass(frozen=True, slots=True)
class StreamSettings:
    """The JetStream stream a trace publishes to (created if missing, else checked)."""

    name: str
    subject: str
    replicas: int = 1
    retention: str = "limits"
    storage: str = "file"
    max_bytes: int = -1
    max_msgs: int = -1
    max_age: float = 0.0
    duplicate_window: float = 120.0
    extra: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def pop(cls, subject: str, opts: dict[str, Any]) -> StreamSettings:
        """Take the stream keys (``stream``, ``replicas``, ``retention``...) out of ``opts``:
        text or already-parsed values (the ``stream`` target's factory passes the values its
        schema checked; the stream's name and its default are checked only here)."""
        name = str(opts.pop("stream", "") or default_stream_name(subject))
        if not _STREAM_RE.fullmatch(name):
            raise UsageError(f"stream name {name!r}: letters, digits, - and _ only")
        try:
            replicas = int(opts.pop("replicas", 1))
            max_age = float(opts.pop("max-age", 0))
            dup = float(opts.pop("duplicate-window", 120))
        except (TypeError, ValueError) as exc:
            raise UsageError(f"stream option: {exc}") from None
        if not 1 <= replicas <= 5:
            raise UsageError(f"replicas must be 1..5, not {replicas}")
        retention = str(opts.pop("retention", "limits"))
        if retention not in _RETENTION:
            raise UsageError(f"retention must be {'|'.join(_RETENTION)}, not {retention!r}")
        storage = str(opts.pop("storage", "file"))
        if storage not in _STORAGE:
            raise UsageError(f"storage must be {'|'.join(_STORAGE)}, not {storage!r}")
        max_bytes = parse_size(opts.pop("max-bytes"), "max-bytes") if "max-bytes" in opts else -1
        max_msgs = int(opts.pop("max-msgs", -1))
        return cls(name, subject, replicas, retention, storage, max_bytes, max_msgs, max_age, dup)

    def config(self) -> Any:
        """The nats-py ``StreamConfig``.  ``discard=new``: a full stream refuses the next
        record (the trace's ``on-target-error`` decides) instead of silently deleting history."""
        from nats.js.api import DiscardPolicy, RetentionPolicy, StorageType, StreamConfig

        return StreamConfig(
            name=self.name,
            subjects=[self.subject],
            retention=RetentionPolicy(self.retention),
            storage=StorageType(self.storage),
            num_replicas=self.replicas,
            max_bytes=self.max_bytes,
            max_msgs=self.max_msgs,
            max_age=self.max_age,
            discard=DiscardPolicy.NEW,
            duplicate_window=self.duplicate_window,
        )


async def connect(url: NatsURL, options: ConnectOptions, *, what: str, **kw: Any) -> Any:
    """A nats-py connection, or a :class:`TargetError` naming the server and the reason."""
    import nats
    import nats.errors

    async def quiet(exc: Exception) -> None:  # nats-py logs every reconnect attempt otherwise
        return None

    # nats-py retries an unreachable server forever when reconnects are unlimited: a server
    # that is down at start is an error now, not a hang (reconnects later are the point)
    try:
        _, writer = await asyncio.wait_for(
            asyncio.open_connection(url.host, url.port), options.connect_timeout
        )
        writer.close()
    except (OSError, TimeoutError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else "timed out"
        raise TargetError(
            what, f"cannot connect to {url.server}: {reason} (is nats-server running?)"
        ) from exc
    try:
        return await nats.connect(
            **options.kwargs(url),
            error_cb=quiet,
            max_reconnect_attempts=kw.pop("max_reconnect_attempts", -1),
            reconnect_time_wait=kw.pop("reconnect_time_wait", 0.2),
            **kw,
        )
    except (OSError, nats.errors.Error, TimeoutError) as exc:
        reason = str(exc) or type(exc).__name__
        if isinstance(exc, nats.errors.NoServersError):
            reason = "no server answered (is nats-server running?)"
        raise TargetError(what, f"cannot connect to {url.server}: {reason}") from exc


async def ensure_stream(js: Any, settings: StreamSettings, *, what: str) -> Any:
    """Create the stream if it does not exist; return its ``StreamInfo``.  An existing stream
    that does not capture ``settings.subject`` is refused (we would publish into the void)."""
    import nats.errors
    import nats.js.errors

    try:
        try:
            info = await js.stream_info(settings.name)
        except nats.js.errors.NotFoundError:
            return await js.add_stream(settings.config())
    except nats.js.errors.APIError as exc:
        raise TargetError(what, f"stream {settings.name}: {exc.description}") from exc
    except (nats.errors.Error, TimeoutError) as exc:
        raise TargetError(what, f"stream {settings.name}: {exc or type(exc).__name__}") from exc
    if settings.subject not in (info.config.subjects or []):
        raise TargetError(
            what, f"stream {settings.name} exists but does not capture {settings.subject}"
        )
    return info
