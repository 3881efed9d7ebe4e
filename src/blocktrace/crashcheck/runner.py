"""Drive a crashcheck run: replay once, forward; a view per point; checks in parallel.

One asyncio loop holds everything: blocktrace's NBD server (on a Unix socket in the run's
private directory) serving one export per open view, the replay (synchronous steps between
``await`` points, so an NBD read never sees half an entry), and up to ``jobs`` checkers, each
an external process.  The replay advances to a point only once a job slot is free, so at most
``jobs`` views are open: that, not the number of points, bounds the space used.

``--bisect`` probes points by binary search (assuming failures are monotonic, which they need
not be: a later transaction can overwrite the damage); probing backwards restarts the replay.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from blocktrace.crashcheck.attach import attached
from blocktrace.crashcheck.checkers import Checker
from blocktrace.crashcheck.overlay import Stack, View
from blocktrace.crashcheck.points import CrashPoint
from blocktrace.errors import BlocktraceError, UsageError
from blocktrace.exports import Export, ExportRegistry
from blocktrace.logwrites.reader import LogEntry, LogReader
from blocktrace.nbd.server import NBDServer
from blocktrace.sockets import MAX_SUN_PATH

#: Yield to the event loop (NBD requests of running checks) after replaying this many bytes.
_YIELD_BYTES = 4 << 20


class CrashcheckError(BlocktraceError):
    """The run could not go on (a hostile log, a tool that failed): one line for the user."""


@dataclass(slots=True)
class PointResult:
    """The verdict at one point, and what the report says about it."""

    point: CrashPoint
    passed: bool
    output: str
    stage: str = ""
    seconds: float = 0.0
    #: ext4 introspection: the last transaction committed at or before the point...
    transaction: int | None = None
    #: ...and the files it changed.
    files: list[str] = field(default_factory=list)
    #: What introspection could not parse between that transaction and the point (a journal
    #: block that is not what its descriptor promises often names the culprit).
    anomalies: list[str] = field(default_factory=list)


@dataclass(slots=True)
class RunResult:
    points: int  # points selected
    results: list[PointResult]
    seconds: float
    peak_space: int  # bytes used by the replay layer and views at the fullest moment
    entries_replayed: int
    bisect: bool = False

    @property
    def failures(self) -> list[PointResult]:
        return [r for r in self.results if not r.passed]


@dataclass(slots=True)
class RunConfig:
    log: str
    base: str
    checker: Checker
    jobs: int = 1
    timeout: float = 300.0
    tmpdir: str | None = None
    bisect: bool = False
    on_result: Callable[[PointResult], None] | None = None


class Replayer:
    """The log applied to a :class:`Stack`, forward only, up to a chosen entry."""

    def __init__(self, log: str, stack: Stack) -> None:
        self.log = log
        self.stack = stack
        self.reader = LogReader(log)
        self._entries = self.reader.entries(with_data=True)
        self.applied = -1  # index of the last entry applied
        self.total = 0  # entries applied over the run (restarts included)

    def close(self) -> None:
        self.reader.close()

    async def advance_to(self, index: int) -> None:
        pending = 0
        while self.applied < index:
            entry = next(self._entries, None)
            if entry is None:
                raise CrashcheckError(f"{self.log}: log ends before entry {index}")
            pending += self._apply(entry)
            self.applied = entry.index
            self.total += 1
            if pending >= _YIELD_BYTES:
                pending = 0
                await asyncio.sleep(0)

    def _apply(self, entry: LogEntry) -> int:
        if not entry.is_data:
            return 0
        off, n = entry.target_offset, entry.length
        if off + n > self.stack.size:
            raise CrashcheckError(
                f"{self.log}: entry {entry.index} at byte {entry.offset} covers disk bytes"
                f" {off}..{off + n}, beyond the base's {self.stack.size} bytes"
            )
        if entry.is_discard:
            self.stack.apply_zeroes(off, n)
        else:
            # piece by piece: an entry's size is the log's claim (bounded only by the base),
            # so never hold a whole one; fresh pieces, since the overlay may keep them
            for at, piece in entry.data_chunks():
                self.stack.apply_write(off + at, piece)
        return n


class Run:
    """One crashcheck run (see the module docstring)."""

    def __init__(self, cfg: RunConfig, workdir: str, socket: str) -> None:
        self.cfg = cfg
        self.workdir = workdir
        self.stack = Stack(cfg.base, workdir)
        self.replayer = Replayer(cfg.log, self.stack)
        self.registry = ExportRegistry()
        self.server = NBDServer(self.registry)
        self.socket = socket
        self.peak_space = 0

    def open_view(self, point: CrashPoint) -> View:
        """Freeze the disk as replayed so far (the replay must stand at ``point.index``).
        Called before any later entry is applied: a view made inside the check task would
        start only after the replay moved on."""
        assert self.replayer.applied == point.index
        view = self.stack.view(f"p{point.index}")
        self.registry.add(Export(view.name, view))
        return view

    async def check(self, point: CrashPoint, view: View) -> PointResult:
        """Check ``view``, the disk at ``point``; drop the view afterwards."""
        name = view.name
        started = time.monotonic()
        try:
            async with attached(
                f"nbd+unix:///{name}?socket={self.socket}",
                self.workdir,
                name,
                loop=self.cfg.checker.needs_device,
            ) as target:
                outcome = await self.cfg.checker.check(target, point.index, self.cfg.timeout)
        finally:
            self.peak_space = max(self.peak_space, self.stack.allocated())
            self.server.disconnect_export(name)
            self.registry.remove(name)
            view.discard()
        result = PointResult(
            point, outcome.passed, outcome.output, outcome.stage, time.monotonic() - started
        )
        if self.cfg.on_result is not None:
            self.cfg.on_result(result)
        return result

    async def all_points(self, points: list[CrashPoint]) -> list[PointResult]:
        slots = asyncio.Semaphore(self.cfg.jobs)
        results: dict[int, PointResult] = {}

        async def one(point: CrashPoint, view: View) -> None:
            try:
                results[point.index] = await self.check(point, view)
            finally:
                slots.release()

        async with asyncio.TaskGroup() as group:
            for point in points:
                await slots.acquire()
                try:
                    await self.replayer.advance_to(point.index)
                    view = self.open_view(point)
                except BaseException:
                    slots.release()
                    raise
                group.create_task(one(point, view))
        return [results[p.index] for p in points]

    async def seek(self, index: int) -> None:
        if index < self.replayer.applied:
            self.replayer.close()
            self.stack.reset()
            self.replayer = Replayer(self.cfg.log, self.stack)
            self.replayer.total = 0
        await self.replayer.advance_to(index)

    async def bisect(self, points: list[CrashPoint]) -> list[PointResult]:
        """Binary search for a failing point whose predecessor (among ``points``) passes."""
        done: list[PointResult] = []

        async def probe(i: int) -> bool:
            await self.seek(points[i].index)
            done.append(await self.check(points[i], self.open_view(points[i])))
            return done[-1].passed

        lo, hi = 0, len(points) - 1
        if await probe(hi):
            return done
        while lo < hi:  # points[hi] fails; every point before lo passed (when probed)
            mid = (lo + hi) // 2
            if await probe(mid):
                lo = mid + 1
            else:
                hi = mid
        return done

    async def main(self, points: list[CrashPoint]) -> list[PointResult]:
        loop = asyncio.get_running_loop()
        listener = await loop.create_unix_server(self.server.protocol_factory, self.socket)
        try:
            if not points:
                return []
            if self.cfg.bisect:
                return await self.bisect(points)
            return await self.all_points(points)
        finally:
            listener.close()
            await self.server.shutdown(5)

    def close(self) -> None:
        self.replayer.close()
        self.stack.close()


def run(cfg: RunConfig, points: list[CrashPoint]) -> RunResult:
    """Check ``points`` of ``cfg.log`` over ``cfg.base``; cleans up everything it made."""
    if cfg.jobs < 1:
        raise UsageError("--jobs must be at least 1")
    if not os.path.exists(cfg.base):
        raise UsageError(f"{cfg.base}: no such base image")
    workdir = tempfile.mkdtemp(prefix="blocktrace-crashcheck-", dir=cfg.tmpdir)
    sockdir = None
    try:
        sock = os.path.join(workdir, "nbd.sock")
        if len(sock) > MAX_SUN_PATH:  # a deep --tmpdir: the socket alone goes to $TMPDIR
            sockdir = tempfile.mkdtemp(prefix="blocktrace-cc-")
            sock = os.path.join(sockdir, "nbd.sock")
            if len(sock) > MAX_SUN_PATH:
                raise UsageError(f"{sock}: path too long for a Unix socket (set TMPDIR)")
        started = time.monotonic()
        r = Run(cfg, workdir, sock)
        try:
            results = asyncio.run(r.main(points))
        finally:
            r.close()
        return RunResult(
            len(points),
            results,
            time.monotonic() - started,
            r.peak_space,
            r.replayer.total,
            cfg.bisect,
        )
    except BaseExceptionGroup as group:  # from the TaskGroup: report our error as one line
        first = _first_error(group)
        if first is None:
            raise
        raise first from None
    finally:
        for d in (workdir, sockdir):
            if d is not None:
                with contextlib.suppress(OSError):
                    shutil.rmtree(d)


def _first_error(group: BaseExceptionGroup[BaseException]) -> BlocktraceError | None:
    for exc in group.exceptions:
        if isinstance(exc, BlocktraceError):
            return exc
        if isinstance(exc, BaseExceptionGroup):
            inner = _first_error(exc)
            if inner is not None:
                return inner
    return None
