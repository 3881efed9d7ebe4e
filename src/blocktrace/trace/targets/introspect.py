"""The ``introspect`` trace target: ext4 introspection of a running trace, live.

``serve --trace disk=introspect:/var/tmp/events.jsonl`` (or QMP ``{"type": "introspect",
"filename": ...}``) feeds every record of the trace to a
:class:`~blocktrace.ext4.watcher.Watcher` and appends its file-level events, one JSON object a
line, to ``filename`` (``-`` for the server's stdout).  A consumer follows them with
``tail -f``; :class:`IntrospectTarget` also takes an in-process callback.

The base image is the export's image file as it is when the trace becomes attached (from then
on the stream carries every change, the trace's ``sync=none`` contract); ``sync=full`` starts
from an all-zero image and is refused.  Inference runs in a worker thread, one batch at a
time (the delivery layer never calls a target concurrently), so the event loop keeps serving
I/O; with ``copy-mode=background`` a slow inference only lengthens the trace's queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from collections.abc import Callable, Sequence
from typing import IO, Any

from blocktrace.errors import BlocktraceError, TargetError, UsageError
from blocktrace.outfile import open_output, output_mode
from blocktrace.trace.records import TraceRecord
from blocktrace.trace.targets.base import Target, TargetInfo, served_images
from blocktrace.trace.targets.replica import parse_bool

EventSink = Callable[[Any], None]  #: receives each FileEvent


class IntrospectTarget(Target):
    """File-level events of the traced export's ext4 file systems."""

    def __init__(
        self,
        filename: str | None = None,
        *,
        sink: EventSink | None = None,
        max_pending: int | None = None,
        max_pending_bytes: int | None = None,
        force: bool = False,
    ) -> None:
        self.name = f"introspect:{filename}" if filename else "introspect"
        self.filename = filename
        self.force = force
        self.sink = sink
        self.limits: dict[str, int] = {}
        if max_pending is not None:
            self.limits["max_pending"] = max_pending
        if max_pending_bytes is not None:
            self.limits["max_pending_bytes"] = max_pending_bytes
        self._info: TargetInfo | None = None
        self._watcher: Any = None
        self._crawl: asyncio.Future[Any] | None = None
        self._out: IO[str] | None = None
        self.events = 0

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> IntrospectTarget:
        spec = dict(spec)
        spec.pop("type", None)
        filename = spec.pop("filename", None)
        if not isinstance(filename, str) or not filename:
            raise UsageError("introspect target needs a filename (or - for stdout)")
        limits: list[int | None] = []
        for key in ("max-pending", "max-pending-bytes"):
            value = spec.pop(key, None)
            try:
                limits.append(None if value is None else int(value))
            except (TypeError, ValueError):
                raise UsageError(f"introspect target: {key} must be an integer") from None
        force = parse_bool("force", spec.pop("force", False))
        if spec:
            raise UsageError(f"introspect target: unknown option {sorted(spec)[0]!r}")
        return cls(filename, max_pending=limits[0], max_pending_bytes=limits[1], force=force)

    async def open(self, info: TargetInfo) -> None:
        if info.sync == "full":
            raise UsageError("introspect targets need sync=none (the base is the live image)")
        if not info.filename:
            raise UsageError(f"introspect target: export {info.export} has no image file")
        self._info = info
        await asyncio.to_thread(_check_followable, info.filename, self.name)
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
            )
            self._out = os.fdopen(fd, "w", encoding="utf-8")

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

            assert self._info is not None
            try:
                self._watcher = Watcher(self._info.filename, **self.limits)
            except BlocktraceError as exc:
                raise TargetError(self.name, str(exc)) from exc
        return self._watcher

    async def deliver(self, records: Sequence[TraceRecord]) -> None:
        await self._crawled()
        await asyncio.to_thread(self._process, records)

    def _process(self, records: Sequence[TraceRecord]) -> None:
        from blocktrace.ext4.watcher import from_trace_record

        watcher = self._ensure_watcher()
        for rec in records:
            self._emit(watcher.process(from_trace_record(rec)))
        if self._out is not None:
            self._out.flush()

    def _emit(self, events: list[Any]) -> None:
        for event in events:
            self.events += 1
            if self.sink is not None:
                self.sink(event)
            if self._out is not None:
                self._out.write(event.to_json() + "\n")

    async def make_durable(self) -> None:
        if self._out is not None and self._out is not sys.stdout:
            out = self._out
            out.flush()
            await asyncio.to_thread(os.fsync, out.fileno())

    async def close(self, *, clean: bool) -> None:
        if self._crawl is not None:
            with contextlib.suppress(TargetError):  # reported by deliver, or nothing to finish
                await self._crawled()
        if self._watcher is not None:
            self._emit(await asyncio.to_thread(self._watcher.finish))
            self._watcher.close()
            self._watcher = None
        if self._out is not None:
            self._out.flush()
            if self._out is not sys.stdout:
                self._out.close()
            self._out = None

    def stats(self) -> dict[str, Any]:
        return self._watcher.stats() if self._watcher is not None else {}

    def describe(self) -> dict[str, Any]:
        return {
            "type": "introspect",
            "filename": self.filename or "",
            "events": self.events,
            "force": self.force,
        }


def _check_followable(filename: str, name: str) -> None:
    """Refuse, before the trace starts, an image with no ext4 file system to follow (the
    superblock and group descriptors only: bounded by the geometry; the crawl comes later)."""
    from blocktrace.ext4.fs import Ext4FS, FileSource
    from blocktrace.ext4.partitions import discover, slice_source

    try:
        source = FileSource(filename)
    except OSError as exc:
        raise TargetError(name, f"{filename}: {exc.strerror or exc}") from exc
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
