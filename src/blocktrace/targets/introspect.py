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
import os
import sys
from collections.abc import Callable, Sequence
from typing import IO, Any

from blocktrace.errors import BlocktraceError, TargetError, UsageError
from blocktrace.stream import Record, SyncMode, Target, TargetInfo
from blocktrace.stream.schema import Integer, Option, TargetType, Text

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
    ) -> None:
        self.name = f"introspect:{filename}" if filename else "introspect"
        self.filename = filename
        self.sink = sink
        self.limits: dict[str, int] = {}
        if max_pending is not None:
            self.limits["max_pending"] = max_pending
        if max_pending_bytes is not None:
            self.limits["max_pending_bytes"] = max_pending_bytes
        self._info: TargetInfo | None = None
        self._watcher: Any = None
        self._out: IO[str] | None = None
        self.events = 0

    async def open(self, info: TargetInfo) -> None:
        if info.sync is SyncMode.FULL:
            raise UsageError("introspect targets need sync=none (the base is the live image)")
        if not info.filename:
            raise UsageError(f"introspect target: export {info.export} has no image file")
        self._info = info
        if self.filename == "-":
            self._out = sys.stdout
        elif self.filename:
            try:
                self._out = open(self.filename, "a", encoding="utf-8")  # noqa: SIM115
            except OSError as exc:
                raise TargetError(self.name, exc.strerror or str(exc)) from exc

    def attached(self) -> None:
        self._ensure_watcher()

    def _ensure_watcher(self) -> Any:
        if self._watcher is None:
            from blocktrace.ext4.watcher import Watcher

            assert self._info is not None
            try:
                self._watcher = Watcher(self._info.filename, **self.limits)
            except BlocktraceError as exc:
                raise TargetError(self.name, str(exc)) from exc
        return self._watcher

    async def deliver(self, records: Sequence[Record]) -> None:
        await asyncio.to_thread(self._process, records)

    def _process(self, records: Sequence[Record]) -> None:
        watcher = self._ensure_watcher()
        for rec in records:
            self._emit(watcher.process(rec))
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

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "type": "introspect", "filename": self.filename or ""}

    def status(self) -> dict[str, Any]:
        return {"events": self.events}


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
    ),
    factory=lambda v: IntrospectTarget(
        v["filename"], max_pending=v["max-pending"], max_pending_bytes=v["max-pending-bytes"]
    ),
)
