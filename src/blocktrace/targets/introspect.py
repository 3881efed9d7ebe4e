"""The ``introspect`` trace target: ext4 introspection of a running trace, live.

``serve --trace disk=introspect:/var/tmp/events.jsonl`` (or QMP ``{"type": "introspect",
"filename": ...}``) feeds every record of the trace to a
:class:`~blocktrace.ext4.watcher.Watcher` and appends its file-level events, one JSON object a
line, to ``filename`` (``-`` for the server's stdout).  A consumer follows them with
``tail -f``; :class:`IntrospectTarget` also takes an in-process callback.  With
``events-to=nats://HOST:PORT/SUBJECT`` every event line is also published to that NATS subject
(the publisher of ``watch --events``, :mod:`blocktrace.jetstream.events`): the worker thread
returns a batch's lines, the event loop publishes them in order and waits (bounded) for the
server to confirm them before the batch counts as delivered; a server that fails is a target
error, handled by the trace's ``on-target-error``.

The base image is the export's image file as it is when the trace becomes attached (from then
on the stream carries every change, the trace's ``sync=none`` contract); ``sync=full`` starts
from an all-zero image and is refused.  The engine reads that file while clients keep writing
to it, and the trace changes the image before it queues the record, so the target reads it
through :class:`~blocktrace.stream.prior.PriorContents` (it declares
:class:`~blocktrace.stream.ReadsImageAsOfRecord`): the filter saves what each operation
overwrites, and the engine sees the image exactly as of the record it is at.  Without it, a
metadata block written in place (debugfs, e2fsprogs, a file system without a journal, a JBD2
checkpoint the target has not reached yet) already held its new bytes when the engine read
its "previous" ones: no difference, no event.  Prior contents beyond their bound (a huge
WRITE_ZEROES, or a target far behind) are reported as ``error`` events, never guessed.
Inference runs in a worker thread, one batch at a time (the delivery layer never calls a
target concurrently), so the event loop keeps serving I/O; with ``copy-mode=background`` a
slow inference only lengthens the trace's queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from collections.abc import Callable, Sequence
from typing import IO, Any

from blocktrace.block.locking import lock_output
from blocktrace.errors import BlocktraceError, TargetError, UsageError
from blocktrace.outfile import open_output, output_mode
from blocktrace.stream import ReadsImageAsOfRecord, Record, SyncMode, Target, TargetInfo
from blocktrace.stream.contract import served_images
from blocktrace.stream.prior import DEFAULT_MAX_PRIOR_BYTES, PriorContents
from blocktrace.stream.schema import Flag, Integer, Option, TargetType, Text

EventSink = Callable[[Any], None]  #: receives each FileEvent


class IntrospectTarget(Target, ReadsImageAsOfRecord):
    """File-level events of the traced export's ext4 file systems."""

    def __init__(
        self,
        filename: str | None = None,
        *,
        sink: EventSink | None = None,
        max_pending: int | None = None,
        max_pending_bytes: int | None = None,
        force: bool = False,
        events_to: str | None = None,
        max_prior_bytes: int = DEFAULT_MAX_PRIOR_BYTES,
    ) -> None:
        from blocktrace.jetstream.events import EventPublisher

        self.name = f"introspect:{filename}" if filename else "introspect"
        self.filename = filename
        self.events_to = events_to
        # parsed now: a bad URL is refused with the rest of the options
        self._publisher = (
            EventPublisher(events_to, name=f"{self.name} events-to") if events_to else None
        )
        self.force = force
        self.sink = sink
        self.limits: dict[str, int] = {}
        if max_pending is not None:
            self.limits["max_pending"] = max_pending
        if max_pending_bytes is not None:
            self.limits["max_pending_bytes"] = max_pending_bytes
        self._info: TargetInfo | None = None
        self.max_prior_bytes = max_prior_bytes
        self._prior: PriorContents | None = None
        self._watcher: Any = None
        self._crawl: asyncio.Future[Any] | None = None
        self._out: IO[str] | None = None
        self.events = 0

    async def open(self, info: TargetInfo) -> None:
        if info.sync is SyncMode.FULL:
            raise UsageError("introspect targets need sync=none (the base is the live image)")
        if not info.filename:
            raise UsageError(f"introspect target: export {info.export} has no image file")
        self._info = info
        await asyncio.to_thread(_check_followable, info.filename, self.name)
        self._prior = PriorContents(info.filename, max_bytes=self.max_prior_bytes)
        if self._publisher is not None:
            await self._publisher.open()
        if self.filename == "-":
            self._out = sys.stdout
        elif self.filename:
            # the events describe the guest's files: same rules as a log (docs/trace.md)
            fd = open_output(
                self.filename,
                overwrite=self.force,
                protected=served_images(info),
                mode=output_mode(info.filename),
                what="events file",
                lock=lock_output,
            )
            self._out = os.fdopen(fd, "w", encoding="utf-8")

    @property
    def prior_contents(self) -> PriorContents | None:
        return self._prior

    def attached(self) -> None:
        """Start the crawl of the base image (now that the stream carries every later
        change) in a worker thread; records wait for it in :meth:`deliver`."""
        if self._crawl is None and self._watcher is None:
            self._crawl = asyncio.ensure_future(asyncio.to_thread(self._ensure_watcher))

    async def _crawled(self) -> None:
        if self._crawl is not None:
            crawl, self._crawl = self._crawl, None
            await crawl

    def _ensure_watcher(self) -> Any:
        if self._watcher is None:
            from blocktrace.ext4.watcher import Watcher

            assert self._prior is not None
            try:
                self._watcher = Watcher(self._prior, **self.limits)
            except BlocktraceError as exc:
                raise TargetError(self.name, str(exc)) from exc
        return self._watcher

    async def deliver(self, records: Sequence[Record]) -> None:
        await self._crawled()
        await self._publish(await asyncio.to_thread(self._process, records))

    def _process(self, records: Sequence[Record]) -> list[str]:
        watcher = self._ensure_watcher()
        prior = self._prior
        assert prior is not None
        lines: list[str] = []
        for rec in records:
            lines.extend(self._emit(watcher.process(rec)))
            prior.advance(rec)
            stale = prior.take_stale()
            if stale:
                lines.extend(self._emit([self._stale_event(rec.seq, stale)]))
        if self._out is not None:
            self._out.flush()
        return lines

    def _stale_event(self, seq: int, stale: list[tuple[int, int]]) -> Any:
        """The engine read bytes whose prior contents were over the bound: say so."""
        from blocktrace.ext4.events import FileEvent

        assert self._prior is not None
        where = ", ".join(f"[{off}, +{n})" for off, n in stale[:4])
        more = f" and {len(stale) - 4} more" if len(stale) > 4 else ""
        return FileEvent(
            "error",
            "",
            record=seq,
            message=(
                f"image bytes {where}{more} were read after later writes had changed them "
                f"(prior contents over their bound of {self._prior.max_bytes} bytes): "
                "events of this record may be missing or wrong"
            ),
        )

    def _emit(self, events: list[Any]) -> list[str]:
        """Hand ``events`` to the sink and the file; their JSON lines (for the subject)."""
        lines: list[str] = []
        for event in events:
            self.events += 1
            if self.sink is not None:
                self.sink(event)
            line = event.to_json()
            if self._out is not None:
                self._out.write(line + "\n")
            if self._publisher is not None:
                lines.append(line)
        return lines

    async def _publish(self, lines: list[str]) -> None:
        """Publish a batch's lines in order; return once the server has them (bounded)."""
        if self._publisher is not None and lines:
            await self._publisher.publish_all(lines)
            await self._publisher.flush()

    async def make_durable(self) -> None:
        if self._out is not None and self._out is not sys.stdout:
            out = self._out
            out.flush()
            await asyncio.to_thread(os.fsync, out.fileno())

    async def close(self, *, clean: bool) -> None:
        if self._crawl is not None:
            with contextlib.suppress(TargetError):  # reported by deliver, or nothing to finish
                await self._crawled()
        try:
            if self._watcher is not None:
                lines = self._emit(await asyncio.to_thread(self._watcher.finish))
                self._watcher.close()
                self._watcher = None
                if clean:
                    await self._publish(lines)
        finally:
            if self._prior is not None:  # (the watcher's source: closing twice is harmless)
                self._prior.close()
                self._prior = None
            await self._close_outputs(clean=clean)

    async def _close_outputs(self, *, clean: bool) -> None:
        if self._out is not None:
            self._out.flush()
            if self._out is not sys.stdout:
                self._out.close()
            self._out = None
        if self._publisher is not None:
            if clean:
                await self._publisher.close()
            else:  # the trace already failed: the first error is the one reported
                with contextlib.suppress(TargetError):
                    await self._publisher.close()

    def stats(self) -> dict[str, Any]:
        return self._watcher.stats() if self._watcher is not None else {}

    def settings(self) -> dict[str, Any]:
        settings = {**super().settings(), "type": "introspect", "filename": self.filename or ""}
        if self.events_to:
            settings["events-to"] = self.events_to
        return settings

    def status(self) -> dict[str, Any]:
        status: dict[str, Any] = {"events": self.events}
        if self._publisher is not None:
            status["events-published"] = self._publisher.published
        return status


TARGET_TYPE = TargetType(
    name="introspect",
    doc="live ext4 file-level events as JSON lines (docs/introspection.md)",
    order=40,
    options=(
        Option(
            "filename",
            Text("PATH"),
            "file-level events as JSON lines (- for the server's stdout)",
            main=True,
        ),
        Option(
            "max-pending",
            Integer(0, (1 << 63) - 1, kind="uint64"),
            "data blocks held while their owner is unknown",
        ),
        Option(
            "max-pending-bytes",
            Integer(0, (1 << 63) - 1, kind="uint64"),
            "bytes of such data kept for attribution",
        ),
        Option(
            "max-prior-bytes",
            Integer(0, (1 << 63) - 1, kind="uint64", size=True),
            "bytes overwritten by queued records kept for the engine (default 64M)",
        ),
        Option(
            "force",
            Flag(),
            "overwrite an existing file (not a symlink; default off)",
        ),
        Option(
            "events-to",
            Text("nats://HOST:PORT/SUBJECT"),
            "also publish each event line to this NATS subject (docs/jetstream.md)",
        ),
    ),
    factory=lambda v: IntrospectTarget(
        v["filename"],
        max_pending=v["max-pending"],
        max_pending_bytes=v["max-pending-bytes"],
        force=bool(v["force"]),
        events_to=v["events-to"],
        max_prior_bytes=(
            DEFAULT_MAX_PRIOR_BYTES if v["max-prior-bytes"] is None else v["max-prior-bytes"]
        ),
    ),
)


def _check_followable(filename: str, name: str) -> None:
    """Refuse, before the trace starts, an image with no ext4 file system to follow (the
    superblock and group descriptors only: bounded by the geometry; the crawl comes later)."""
    from blocktrace.block.source import FileSource
    from blocktrace.ext4.fs import Ext4FS
    from blocktrace.ext4.partitions import discover, slice_source

    try:
        source = FileSource(filename)
    except BlocktraceError as exc:  # cannot open, or a directory: one line naming the file
        raise TargetError(name, str(exc)) from exc
    why: list[str] = []
    try:
        for part in discover(source, source.length):
            if part.ext4:
                try:
                    Ext4FS.open(slice_source(source, part.offset, part.length))
                    return
                except BlocktraceError as exc:
                    why.append(str(exc))
        raise TargetError(
            name, f"{filename}: no ext4 file system to watch ({'; '.join(why) or 'none found'})"
        )
    except BlocktraceError as exc:
        if isinstance(exc, TargetError):
            raise
        raise TargetError(name, f"{filename}: {exc}") from exc
    finally:
        source.close()
