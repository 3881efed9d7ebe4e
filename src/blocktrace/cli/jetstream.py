"""Consumers of a trace published to NATS JetStream (docs/jetstream.md).

``blocktrace replay nats://HOST:PORT/SUBJECT IMAGE``, ``blocktrace log save nats://... FILE``,
``blocktrace watch BASE nats://...`` and ``blocktrace follow nats://... replica:IMAGE`` read
records through :class:`~blocktrace.jetstream.consumer.StreamSource`; this module holds their
work, the commands keep their argument handling.  Records are applied to a local image with the
stream's one applier (:mod:`blocktrace.stream.apply`), bounds-checked first as ``replay`` checks
a log: a stream is untrusted input and must not write outside the image it was given.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import IO, Any, TypeVar

import click

from blocktrace.errors import FormatError, TargetError, UsageError
from blocktrace.jetstream.conn import ConnectOptions, NatsURL
from blocktrace.jetstream.consumer import Positioned, StreamSource
from blocktrace.jetstream.events import EventPublisher
from blocktrace.stream.apply import apply_inline, apply_record
from blocktrace.stream.records import Record, RecordKind

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run a consumer; a NATS error that escaped the retries becomes one line, not a
    traceback (the boundary where nats-py's exceptions are translated for the CLI)."""
    import nats.errors
    import nats.js.errors

    try:
        return asyncio.run(coro)
    except (nats.errors.Error, nats.js.errors.Error) as exc:
        raise TargetError("jetstream", str(exc) or type(exc).__name__) from exc


def source_options(f: Callable[..., object]) -> Callable[..., object]:
    """``--stream``, ``--creds``, ``--tls-ca`` shared by every JetStream consumer."""
    for opt in reversed(
        [
            click.option("--stream", metavar="NAME", help="Stream name (default BT_<subject>)."),
            click.option("--creds", type=click.Path(dir_okay=False), help="NATS credentials."),
            click.option("--tls-ca", type=click.Path(dir_okay=False), help="CA for tls://."),
        ]
    ):
        f = opt(f)
    return f


def open_source(
    url: str, stream: str | None, creds: str | None, tls_ca: str | None, **kw: Any
) -> StreamSource:
    return StreamSource(
        NatsURL.parse(url),
        stream=stream,
        connect_options=ConnectOptions(creds=creds, tls_ca=tls_ca),
        **kw,
    )


@dataclass
class Applied:
    records: int = 0
    bytes_written: int = 0
    bytes_zeroed: int = 0
    last: Record | None = None
    stopped_by: str = "end"


class ImageApplier:
    """Applies a stream's records to an existing raw image (a regular file or a block device)
    in order, through the stream's one applier (:mod:`blocktrace.stream.apply`): synchronously
    (:func:`~blocktrace.stream.apply.apply_inline`) on the raw file or block device ``replay``
    opens, which applies each operation before returning, so a group of small records costs
    no coroutine per record.

    A stream is untrusted input, bounded as ``replay`` bounds a log: every data record's range
    is admitted before anything is applied, and one that does not end within the image is
    refused whole (a :class:`FormatError` naming it), never clipped; the image is never
    written outside nor grown.  FLUSH and FUA are the caller's: it flushes the image where it
    needs durability (at the end of a replay, before a follower acknowledges)."""

    def __init__(self, path: str, *, what: str = "replay target") -> None:
        from blocktrace.logwrites.replay import open_target

        if not os.path.isfile(path) and not path.startswith("/dev/"):
            raise UsageError(f"{path}: no such image (replay writes onto an existing image)")
        # refuses anything but a regular file or block device, and locks the image (QEMU's
        # locks) until close: no VM, export, replica, log or other follower writes it meanwhile
        self.device = open_target(path, what=what)
        self.stats = Applied()

    def admit(self, rec: Record) -> None:
        """Raise :class:`FormatError` unless the data record ``rec`` fits the image."""
        if rec.offset + rec.length > self.device.size:
            raise FormatError(
                f"record #{rec.seq} ({rec.offset}+{rec.length}) lies beyond the image "
                f"({self.device.size} bytes)"
            )

    @property
    def inline(self) -> bool:
        """The image applies each operation before returning: :meth:`apply_now` works."""
        return self.device.applies_inline

    def _count(self, rec: Record) -> bool:
        """Admit and count ``rec``; True if it changes the image."""
        kind = rec.kind
        stats = self.stats
        stats.records += 1
        stats.last = rec
        if kind is RecordKind.WRITE:
            self.admit(rec)
            stats.bytes_written += rec.length
        elif kind is RecordKind.ZERO or kind is RecordKind.TRIM:
            self.admit(rec)
            stats.bytes_zeroed += rec.length
        else:
            return False
        return True

    def apply_now(self, rec: Record) -> None:
        """Apply ``rec`` synchronously (only when :attr:`inline`; FUA left to the caller)."""
        if self._count(rec):
            apply_inline(self.device, rec)

    async def apply_record(self, rec: Record) -> None:
        """Apply ``rec`` (FUA left to the caller's flush)."""
        if self._count(rec):
            if self.inline:
                apply_inline(self.device, rec)
            else:
                await apply_record(self.device, rec, fua=False)

    async def apply(self, item: Positioned) -> None:
        await self.apply_record(item.record)

    async def flush(self) -> None:
        await self.device.flush()

    async def close(self) -> None:
        await self.device.close()


def stop_after(rec: Record, end_seq: int | None, end_mark: str | None) -> str | None:
    """Why a replay stops after ``rec`` (inclusive, like replay-log's ``--end-mark``)."""
    if end_mark is not None and rec.kind is RecordKind.MARK and rec.name == end_mark:
        return f"mark {end_mark}"
    if end_seq is not None and rec.seq >= end_seq:
        return f"sequence {rec.seq}"
    return None


async def replay_stream(
    source: StreamSource,
    image: str,
    *,
    start: int = 1,
    end_seq: int | None = None,
    end_mark: str | None = None,
    limit: int = 0,
) -> Applied:
    """Apply the stream's records onto ``image``, from stream sequence ``start``."""
    applier = ImageApplier(image)
    stats = applier.stats
    try:
        async with source:
            inline = applier.inline
            async for batch in source.messages(start=start):
                why = None
                for rec in batch.records:
                    if inline:
                        applier.apply_now(rec)  # a group: no coroutine per record
                    else:
                        await applier.apply_record(rec)
                    why = stop_after(rec, end_seq, end_mark)
                    if why is None and limit and stats.records >= limit:
                        why = f"limit {limit}"
                    if why is not None:
                        stats.stopped_by = why
                        break
                if why is not None:
                    break
        await applier.flush()
    finally:
        await applier.close()
    return applier.stats


async def save_log(source: StreamSource, path: str, *, sector_size: int = 512) -> int:
    """Write the stream's records as a new dm-log-writes log at ``path``; returns entries."""
    from blocktrace.logwrites.format import LogFlag
    from blocktrace.logwrites.writer import LogWriter

    _FUA = int(LogFlag.FUA)
    writer = await asyncio.to_thread(LogWriter.create, path, sector_size=sector_size)
    n = 0
    try:
        async with source:
            async for item in source.records():
                rec = item.record
                try:
                    if rec.kind is RecordKind.WRITE:
                        assert rec.data is not None
                        writer.append_writes([(_FUA if rec.fua else 0, rec.offset, rec.data)])
                    elif rec.kind is RecordKind.ZERO:
                        writer.write_zeroes(rec.offset, rec.length, fua=rec.fua)
                    elif rec.kind is RecordKind.TRIM:
                        writer.discard(rec.offset, rec.length, fua=rec.fua)
                    elif rec.kind is RecordKind.FLUSH:
                        writer.flush()
                    else:
                        writer.mark(rec.name)
                except ValueError as exc:
                    raise FormatError(f"record #{rec.seq}: {exc}") from None
                n += 1
    finally:
        await asyncio.to_thread(writer.close, end_mark=False, sync=True)
    return n


async def follow_stream(
    source: StreamSource,
    image: str,
    *,
    follow: bool = True,
    ack_every: int = 256,
    on_batch: Callable[[Applied], None] | None = None,
) -> Applied:
    """Keep ``image`` equal to the stream: apply in order, flush the image, then acknowledge
    (durable consumer), so a restart re-applies only what was not acknowledged.

    Acknowledgements fall only at the end of a message (a group's last record): one covers
    its whole message, so acknowledging mid-group would let a restart skip the group's rest.
    A FLUSH always ends its group (the publisher closes a group there)."""
    applier = ImageApplier(image, what="follow target")
    try:
        async with source:
            pending: Positioned | None = None
            count = 0
            async for item in source.records(follow=follow):
                await applier.apply(item)
                count += 1
                if not item.ends_message:
                    continue
                pending = item
                if count >= ack_every or item.record.kind is RecordKind.FLUSH:
                    await applier.flush()
                    await source.ack(item)
                    pending, count = None, 0
                    if on_batch is not None:
                        on_batch(applier.stats)
            if pending is not None:
                await applier.flush()
                await source.ack(pending)
    finally:
        await applier.close()
    return applier.stats


async def watch_stream(
    source: StreamSource,
    base_image: str,
    out: IO[str],
    *,
    as_json: bool,
    follow: bool,
    events_url: str | None,
    watcher_kw: dict[str, int],
) -> dict[str, Any]:
    """ext4 file-level events of the stream's records, to ``out`` (and a subject)."""
    from blocktrace.ext4.watcher import Watcher

    publisher = EventPublisher(events_url) if events_url else None
    if publisher is not None:
        await publisher.open()
    try:
        with Watcher(base_image, **watcher_kw) as watcher:

            async def emit(events: list[Any]) -> None:
                for event in events:
                    line = event.to_json()
                    out.write((line if as_json else event.describe()) + "\n")
                    if publisher is not None:
                        await publisher.publish(line)
                if follow:
                    out.flush()

            async with source:
                async for item in source.records(follow=follow):
                    await emit(watcher.process(item.record))
            await emit(watcher.finish())
            stats: dict[str, Any] = watcher.stats()
            return stats
    finally:
        out.flush()
        if publisher is not None:
            await publisher.close()


@click.command("follow")
@click.argument("url", metavar="nats://HOST:PORT/SUBJECT")
@click.argument("target", metavar="replica:IMAGE")
@source_options
@click.option(
    "--durable",
    metavar="NAME",
    help="Durable consumer name (default: derived from IMAGE); its acknowledged position "
    "survives restarts.",
)
@click.option("--once", is_flag=True, help="Stop at the stream's current end.")
def follow(
    url: str,
    target: str,
    stream: str | None,
    creds: str | None,
    tls_ca: str | None,
    durable: str | None,
    once: bool,
) -> None:
    """Keep a replica image equal to a trace published on JetStream.

    Records are applied in stream order; after each group the image is flushed and the group
    acknowledged, so a restarted follower resumes exactly after the last flushed group.
    """
    kind, colon, image = target.partition(":")
    if kind != "replica" or not colon or not image:
        raise UsageError(f"follow target {target!r}: expected replica:IMAGE")
    if durable is None:
        import hashlib

        durable = "bt-follow-" + hashlib.sha256(os.path.abspath(image).encode()).hexdigest()[:12]
    source = open_source(url, stream, creds, tls_ca, durable=durable)
    result = run(follow_stream(source, image, follow=not once))
    click.echo(
        f"applied {result.records} records: {result.bytes_written} bytes written, "
        f"{result.bytes_zeroed} bytes zeroed",
        err=True,
    )


def run_replay(
    url: str,
    image: str | None,
    *,
    start: int,
    end_seq: int | None,
    end_mark: str | None,
    limit: int,
    stream: str | None = None,
    creds: str | None = None,
    tls_ca: str | None = None,
) -> None:
    """``blocktrace replay nats://... IMAGE``."""
    if image is None:
        raise UsageError("replay needs an IMAGE to write to")
    source = open_source(url, stream, creds, tls_ca)
    result = run(
        replay_stream(source, image, start=start, end_seq=end_seq, end_mark=end_mark, limit=limit)
    )
    last = (
        f", stopped after record #{result.last.seq} ({result.stopped_by})"
        if result.last is not None and result.stopped_by != "end"
        else ""
    )
    click.echo(
        f"replayed {result.records} records: {result.bytes_written} bytes written, "
        f"{result.bytes_zeroed} bytes zeroed{last}",
        err=True,
    )


def run_save(url: str, path: str, *, sector_size: int, force: bool) -> None:
    """``blocktrace log save nats://... FILE``: never overwrites unless ``force``."""
    if os.path.lexists(path) and not force:
        raise UsageError(f"{path} exists (use --force to overwrite)")
    if os.path.islink(path):
        raise UsageError(f"{path} is a symbolic link; not following it")
    n = run(save_log(open_source(url, None, None, None), path, sector_size=sector_size))
    click.echo(f"saved {n} records to {path}", err=True)


def run_watch(
    base_image: str,
    url: str,
    *,
    as_json: bool,
    follow: bool,
    events_url: str | None,
    watcher_kw: dict[str, int],
) -> dict[str, Any]:
    return run(
        watch_stream(
            open_source(url, None, None, None),
            base_image,
            sys.stdout,
            as_json=as_json,
            follow=follow,
            events_url=events_url,
            watcher_kw=watcher_kw,
        )
    )
