"""The trace manager: start, mark, pause, stop and list traces on a live server.

This is the API the QMP block-job layer and ``serve --trace`` drive.  One
:class:`TraceManager` per service; each :class:`Trace` is a block job in QEMU's sense, with
QEMU's job states (:class:`JobStatus`) and events (:class:`TraceEvent`), so the QMP layer maps
them one to one onto ``JOB_STATUS_CHANGE``, ``BLOCK_JOB_READY``, ``BLOCK_JOB_ERROR``,
``BLOCK_JOB_COMPLETED`` and ``BLOCK_JOB_CANCELLED``.

Life of a trace (QEMU's mirror job is the model)::

    created -> running --(sync copy done, or at once for sync=none)--> ready
    running <-> paused, ready <-> standby            (pause/resume: delivery stops)
    ready --stop()--> waiting -> pending -> [COMPLETED] -> concluded -> null
    running --stop()--> aborting -> [CANCELLED] -> concluded -> null
    target failure, on-target-error=break: aborting -> concluded -> null
                                                    BLOCK_JOB_ERROR + COMPLETED(error)
    target failure, on-target-error=report: stays, writes fail EIO, BLOCK_JOB_ERROR;
                                            stop() -> concluded -> null, COMPLETED(error)

``stop()`` is the clean end: new operations stop being recorded, every queued record is
delivered and made durable, the target is closed (a log gets its end mark).
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import enum
import errno
import logging
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from blocktrace.block.device import BlockDevice
from blocktrace.errors import BlockDeviceError, StateError, TargetError, UsageError
from blocktrace.stream.contract import ReadsImageAsOfRecord, SyncMode, Target, TargetInfo
from blocktrace.stream.prior import PriorContents
from blocktrace.stream.records import RECORD_OVERHEAD
from blocktrace.stream.registry import create_target
from blocktrace.trace.delivery import Delivery
from blocktrace.trace.filter import COPY_CHUNK, TraceFilter
from blocktrace.trace.options import CopyMode, OnTargetError, TraceOptions


class Export(Protocol):
    """What a trace needs of an export (:class:`blocktrace.exports.Export` is one): declared
    here so the trace layer does not import the export layer built on top of it."""

    @property
    def name(self) -> str: ...

    @property
    def device(self) -> BlockDevice: ...

    @property
    def filename(self) -> str: ...


class ExportRegistry(Protocol):
    """Export lookup by name (:class:`blocktrace.exports.ExportRegistry`)."""

    def get(self, name: str) -> Export | None: ...

    def __iter__(self) -> Iterator[Export]: ...


log = logging.getLogger(__name__)


class JobStatus(enum.Enum):
    """QEMU's ``JobStatus`` values (qapi/job.json), the ones a trace passes through."""

    CREATED = "created"
    RUNNING = "running"
    PAUSED = "paused"
    READY = "ready"
    STANDBY = "standby"
    WAITING = "waiting"
    PENDING = "pending"
    ABORTING = "aborting"
    CONCLUDED = "concluded"
    NULL = "null"


class EventKind(enum.Enum):
    STATUS_CHANGE = "JOB_STATUS_CHANGE"
    READY = "BLOCK_JOB_READY"
    ERROR = "BLOCK_JOB_ERROR"
    COMPLETED = "BLOCK_JOB_COMPLETED"
    CANCELLED = "BLOCK_JOB_CANCELLED"


@dataclass(frozen=True, slots=True)
class TraceEvent:
    """Something a QMP client should hear about; ``kind`` names the QEMU event."""

    kind: EventKind
    status: JobStatus
    #: COMPLETED: the reason the trace failed (QEMU's ``error`` member); ERROR: the error
    error: str | None = None
    #: ERROR: QEMU's ``action`` ("report" for on-target-error=report, "ignore" for break)
    action: str | None = None
    #: ERROR: QEMU's ``operation``
    operation: str = "write"


Listener = Callable[["Trace", TraceEvent], None]


@dataclass(frozen=True, slots=True)
class MarkPlace:
    """Where a mark went: ``position`` in the trace's stream (from 1: the trace's records,
    ``sync=full``'s copy included) and ``entry``, the target's own index for it (a log's
    entry index, as ``log list`` shows; None where the target has none or, while the trace
    is paused, does not hold the mark yet)."""

    position: int
    entry: int | None


@dataclass(frozen=True, slots=True)
class TraceStats:
    """Counters for ``query-block-jobs``; ``len``/``offset`` are QEMU's progress pair."""

    entries: int  #: records put in the stream so far (marks, flushes included)
    bytes: int  #: payload bytes put in the stream so far
    queued_records: int  #: records waiting for the target
    queued_bytes: int  #: queue occupancy counted against queue-size (payload + overhead)
    delivered_records: int  #: records the target holds
    delivered_bytes: int
    durable_records: int  #: records the target has made durable
    sync_total: int  #: bytes the sync=full copy has to read (0 for sync=none)
    sync_done: int

    @property
    def offset(self) -> int:
        return self.delivered_bytes

    @property
    def len(self) -> int:
        return self.bytes + (self.sync_total - self.sync_done)


class Trace:
    """One running trace: an export's write stream going to one target.  Made by
    :meth:`TraceManager.start`; also the sink the export's :class:`TraceFilter` writes to."""

    def __init__(
        self,
        job_id: str,
        export: Export,
        filt: TraceFilter,
        target: Target,
        options: TraceOptions,
        manager: TraceManager,
    ) -> None:
        self.job_id = job_id
        self.export = export
        self.filter = filt
        self.target = target
        self.options = options
        self._manager = manager
        self.status = JobStatus.CREATED
        #: why the trace failed, once it has (QEMU's job ``error``); None while healthy
        self.error: str | None = None
        self.io_status = "ok"  # QEMU's BlockDeviceIoStatus: ok | failed | nospace
        self.started_at = time.time()
        self.delivery = Delivery(target, options.queue_size, self._target_failed)
        self._blocked_error: BlockDeviceError | None = None
        self._listeners: list[Listener] = []
        self._sync_task: asyncio.Task[None] | None = None
        self._sync_total = 0
        self._sync_done = 0
        self._stopping: asyncio.Task[None] | None = None
        self._concluded = asyncio.Event()
        self._ready = asyncio.Event()
        self._resumed = asyncio.Event()
        self._resumed.set()

    # -- the sink interface (read by the filter on every operation) --------------------------

    @property
    def alignment(self) -> int:
        return self.target.alignment

    @property
    def write_blocking(self) -> bool:
        return self.options.copy_mode is CopyMode.WRITE_BLOCKING

    @property
    def breaks_on_error(self) -> bool:
        return self.options.on_target_error is OnTargetError.BREAK

    @property
    def blocked_error(self) -> BlockDeviceError | None:
        return self._blocked_error

    @property
    def prior_contents(self) -> PriorContents | None:
        target = self.target
        return target.prior_contents if isinstance(target, ReadsImageAsOfRecord) else None

    # -- public API ---------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        """The stream is complete from here on: base (or, for sync=full, zeroes) + stream
        rebuilds the device."""
        return self._ready.is_set()

    @property
    def paused(self) -> bool:
        return self.status in (JobStatus.PAUSED, JobStatus.STANDBY)

    @property
    def concluded(self) -> bool:
        return self._concluded.is_set()

    def add_listener(self, listener: Listener) -> None:
        """Call ``listener(trace, event)`` for this trace's events (synchronously)."""
        self._listeners.append(listener)

    def stats(self) -> TraceStats:
        d = self.delivery
        return TraceStats(
            entries=d.queued,
            bytes=d.bytes_queued_total,
            queued_records=d.queued_records,
            queued_bytes=d.queued_bytes,
            delivered_records=d.held,
            delivered_bytes=d.bytes_delivered,
            durable_records=d.durable,
            sync_total=self._sync_total,
            sync_done=self._sync_done,
        )

    async def mark(self, name: str) -> MarkPlace:
        """Put mark ``name`` into the stream; returns once the target holds it (at once while
        the trace is paused), with where it went: its position in this trace's stream (from
        1) and, where the target numbers what it stores (a log), its entry index there."""
        if self.concluded or self._stopping is not None:
            raise StateError(f"trace {self.job_id!r} is not running")
        if not name:
            raise UsageError("a mark needs a name")
        self.target.check_mark(name)
        if self.delivery.error is not None:
            raise StateError(f"trace {self.job_id!r} has failed: {self.error}")
        pos = self.filter.put_mark(self, name)
        seq = self.filter.seq  # put_mark numbered the mark synchronously: this is its seq
        if self.paused:
            return MarkPlace(pos, None)
        await self.delivery.wait_held(pos)
        return MarkPlace(pos, self.target.mark_entry(seq))

    def pause(self) -> None:
        """Stop delivering to the target (records keep queueing until the cap, then clients
        wait).  QEMU: running -> paused, ready -> standby."""
        if self.status is JobStatus.RUNNING:
            self._set_status(JobStatus.PAUSED)
        elif self.status is JobStatus.READY:
            self._set_status(JobStatus.STANDBY)
        else:
            raise StateError(f"trace {self.job_id!r} cannot be paused in state {self.status.value}")
        self.delivery.pause()
        self._resumed.clear()

    def resume(self) -> None:
        if self.status is JobStatus.PAUSED:
            self._set_status(JobStatus.RUNNING)
        elif self.status is JobStatus.STANDBY:
            self._set_status(JobStatus.READY)
        else:
            raise StateError(f"trace {self.job_id!r} is not paused")
        self.delivery.resume()
        self._resumed.set()

    async def stop(self) -> None:
        """End the trace cleanly: detach, deliver everything queued, close the target.

        Concurrent calls share one stop.  Raises nothing for a trace that failed: its
        ``error`` says why, and the COMPLETED event carries it.
        """
        if self.concluded:
            return
        if self._stopping is None:
            self._stopping = asyncio.get_running_loop().create_task(self._stop())
        await asyncio.shield(self._stopping)

    def abandon(self, reason: str) -> None:
        """End the trace now, without its target (server shutdown, the target does not
        answer): waiters fail, what is queued is dropped, the stop in progress concludes with
        ``reason`` as the error.  The target is left as a crash would leave it (a log readable
        up to its last sync, a replica's metadata unclean: compared at the next start)."""
        if self.concluded:
            return
        log.warning("trace %s: abandoning target %s: %s", self.job_id, self.target.name, reason)
        if self in self.filter.sinks:
            self.filter.detach_now(self)
        self.delivery.fail(TargetError(self.target.name, reason))
        self.error = reason
        self.io_status = "failed"
        if self._stopping is None:
            self._stopping = asyncio.get_running_loop().create_task(self._stop())
        self._stopping.cancel()  # its ``finally`` concludes, with the error

    async def wait_ready(self) -> None:
        """Return once the stream is complete (sync=full copy done)."""
        await self._ready.wait()

    async def wait_concluded(self) -> None:
        await self._concluded.wait()

    # -- internals ----------------------------------------------------------------------------

    async def _start(self) -> None:
        self.delivery.start()
        await self.filter.attach(self)
        self._set_status(JobStatus.RUNNING)
        self.target.attached()
        if self.target.synchronizes:  # replicas copy what they lack themselves
            self._sync_task = asyncio.get_running_loop().create_task(
                self._target_sync(), name=f"trace-sync:{self.job_id}"
            )
        elif self.options.sync is SyncMode.FULL:
            self._sync_total = self.filter.size
            self._sync_task = asyncio.get_running_loop().create_task(
                self._sync_copy(), name=f"trace-sync:{self.job_id}"
            )
        else:
            self._become_ready()

    async def _target_sync(self) -> None:
        await self.target.wait_synchronized()
        self._become_ready()

    async def _sync_copy(self) -> None:
        """sync=full: record the device's content, chunk by chunk, while writes continue."""
        size = self.filter.size
        pos = 0
        try:
            while pos < size:
                await self._resumed.wait()
                n = min(COPY_CHUNK, size - pos)
                cost = n + 16 * RECORD_OVERHEAD
                await self.delivery.reserve(cost)
                try:
                    await self.filter.copy_chunk(self, pos, n)
                finally:
                    self.delivery.unreserve(cost)
                pos += n
                self._sync_done = pos
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the target failed: _target_failed has it in hand
            log.debug("sync copy of %s stopped: %s", self.job_id, exc)
            return
        self._become_ready()

    def _become_ready(self) -> None:
        if self.concluded or self._stopping is not None or self.delivery.error is not None:
            return
        self._ready.set()
        if self.status is JobStatus.RUNNING:
            self._set_status(JobStatus.READY)
        elif self.status is JobStatus.PAUSED:
            self._set_status(JobStatus.STANDBY)
        self._emit(TraceEvent(EventKind.READY, self.status))

    def _target_failed(self, exc: BaseException) -> None:
        """Called by the delivery worker, once, when the target raised."""
        self.error = str(exc) or type(exc).__name__
        code = exc.errno if isinstance(exc, TargetError | BlockDeviceError) else None
        self.io_status = "nospace" if code == errno.ENOSPC else "failed"
        if self.breaks_on_error:
            self.filter.detach_now(self)  # clients carry on; the stream ends here
            self._emit(TraceEvent(EventKind.ERROR, self.status, self.error, action="ignore"))
            if self._stopping is None:
                self._stopping = asyncio.get_running_loop().create_task(self._stop())
        else:
            self._blocked_error = BlockDeviceError(
                errno.EIO, f"trace {self.job_id} target failed: {self.error}"
            )
            self._emit(TraceEvent(EventKind.ERROR, self.status, self.error, action="report"))

    def stream_broken(self, reason: str) -> None:
        """The filter could not record what an operation left in the image (it failed
        part-way, and the range could not be read back): from here the stream and the image
        disagree.  As a target failure, per ``on-target-error``: ``break`` ends the trace
        (what is queued is still delivered, the target is closed unclean: a log gets no end
        mark), ``report`` fails writes until the trace is stopped.  Evented as
        BLOCK_JOB_ERROR; the end event carries ``reason``."""
        if self.error is not None or self.concluded:
            return
        log.warning("trace %s: %s", self.job_id, reason)
        self.error = reason
        self.io_status = "failed"
        if self.breaks_on_error:
            self.filter.detach_now(self)
            self._emit(TraceEvent(EventKind.ERROR, self.status, reason, action="ignore"))
            if self._stopping is None:
                self._stopping = asyncio.get_running_loop().create_task(self._stop())
        else:
            self._blocked_error = BlockDeviceError(errno.EIO, f"trace {self.job_id}: {reason}")
            self._emit(TraceEvent(EventKind.ERROR, self.status, reason, action="report"))

    async def _stop(self) -> None:
        completing = self.ready and self.delivery.error is None and self.error is None
        if completing:
            self._set_status(JobStatus.WAITING)
            self._set_status(JobStatus.PENDING)
        else:
            self._set_status(JobStatus.ABORTING)
        if self._sync_task is not None and not self._sync_task.done():
            self._sync_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sync_task
        self._resumed.set()
        try:
            if self in self.filter.sinks:
                await self.filter.detach(self)
            clean = False
            if self.delivery.error is None:
                try:
                    await self.delivery.finish()
                    clean = True
                except Exception:  # recorded in self.error by _target_failed
                    pass
            else:
                await self.delivery.abort()
            try:
                await self.target.close(clean=clean and self.ready and self.error is None)
            except Exception as exc:
                if self.error is None:
                    self.error = str(exc) or type(exc).__name__
                    self.io_status = "failed"
        finally:
            self._blocked_error = None
            if self._sync_task is not None and self._sync_task.done() is False:
                self._sync_task.cancel()
            self._conclude(cancelled=not completing and self.error is None)

    def _conclude(self, *, cancelled: bool) -> None:
        if self.status is not JobStatus.ABORTING and self.error is not None:
            self._set_status(JobStatus.ABORTING)
        # QEMU's order (iotests): the end event, then "concluded", then "null"
        if cancelled:
            self._emit(TraceEvent(EventKind.CANCELLED, self.status))
        else:
            self._emit(TraceEvent(EventKind.COMPLETED, self.status, self.error))
        self._set_status(JobStatus.CONCLUDED)
        self._concluded.set()
        self._manager._forget(self)
        self._set_status(JobStatus.NULL)

    def _set_status(self, status: JobStatus) -> None:
        if status is self.status:
            return
        self.status = status
        self._emit(TraceEvent(EventKind.STATUS_CHANGE, status))

    def _emit(self, event: TraceEvent) -> None:
        for listener in (*self._manager._listeners, *self._listeners):
            try:
                listener(self, event)
            except Exception:
                log.exception("trace event listener failed")

    def __repr__(self) -> str:
        return f"<Trace {self.job_id} on {self.export.name} -> {self.target.name} {self.status}>"


class TraceManager:
    """All traces of one service, by job id.  Job ids are unique among live traces."""

    def __init__(self, exports: ExportRegistry) -> None:
        self.exports = exports
        self._traces: dict[str, Trace] = {}
        self._starting: set[str] = set()
        self._listeners: list[Listener] = []

    def add_listener(self, listener: Listener) -> None:
        """Call ``listener(trace, event)`` for every event of every trace (synchronously,
        from the event loop; must not block)."""
        self._listeners.append(listener)

    async def start(
        self,
        job_id: str,
        export: str | Export,
        target: Target | Mapping[str, Any],
        options: TraceOptions | None = None,
    ) -> Trace:
        """Start tracing ``export`` into ``target`` (a Target, or its QMP description).

        Returns once the trace is attached: every operation completed after this returns is
        in the stream.  Raises :class:`UsageError` (bad job id, export, target description)
        or :class:`~blocktrace.errors.TargetError` (the target could not be opened); nothing
        is left behind on failure.
        """
        options = options or TraceOptions()
        if not job_id:
            raise UsageError("a trace needs a job id")
        if job_id in self._traces or job_id in self._starting:
            raise UsageError(f"Job ID '{job_id}' already in use")
        exp = self.exports.get(export) if isinstance(export, str) else export
        if exp is None:
            raise UsageError(f"no export named {export!r}")
        filt = exp.device
        if not isinstance(filt, TraceFilter):
            raise UsageError(f"export {exp.name!r} cannot be traced (no trace filter)")
        tgt = create_target(target) if isinstance(target, Mapping) else target
        self._starting.add(job_id)
        try:
            info = TargetInfo(
                export=exp.name,
                size=filt.size,
                block_size=max(512, filt.min_block_size),
                job_id=job_id,
                device=filt,
                filename=exp.filename,
                sync=options.sync,
                served=tuple(e.filename for e in self.exports if e.filename),
            )
            await tgt.open(info)
            if filt.size % tgt.alignment:
                await tgt.close(clean=False)
                raise UsageError(
                    f"export {exp.name!r}: size {filt.size} is not a multiple of the "
                    f"target's sector size {tgt.alignment}"
                )
            trace = Trace(job_id, exp, filt, tgt, options, self)
            self._traces[job_id] = trace
            trace._emit(TraceEvent(EventKind.STATUS_CHANGE, JobStatus.CREATED))
            try:
                await trace._start()
            except BaseException:
                # a failed start leaves the export exactly as before: no sink on the filter
                # (a dead sink would take writes and never answer a FLUSH), no worker
                self._traces.pop(job_id, None)
                if trace in filt.sinks:
                    await filt.detach(trace)
                await trace.delivery.abort()
                await tgt.close(clean=False)
                raise
        finally:
            self._starting.discard(job_id)
        return trace

    def get(self, job_id: str) -> Trace:
        try:
            return self._traces[job_id]
        except KeyError:
            raise UsageError(f"Job ID '{job_id}' not found") from None

    def find(self, job_id: str) -> Trace | None:
        return self._traces.get(job_id)

    def __iter__(self) -> Iterator[Trace]:
        return iter(list(self._traces.values()))

    def list(self) -> builtins.list[Trace]:
        return list(self._traces.values())

    def on_export(self, export_name: str) -> builtins.list[Trace]:
        """Live traces of one export (block-export-del refuses while there are any)."""
        return [t for t in self._traces.values() if t.export.name == export_name]

    async def stop(self, job_id: str) -> Trace:
        trace = self.get(job_id)
        await trace.stop()
        return trace

    async def mark(self, job_id: str, name: str) -> MarkPlace:
        return await self.get(job_id).mark(name)

    def begin_shutdown(self) -> None:
        """Server shutdown starts: paused traces deliver again, so client requests waiting on
        a paused trace (for queue space, or for the target to hold a record) finish, traced,
        instead of holding the shutdown until it gives up.  The traces end in :meth:`close`,
        which would resume them anyway to deliver what is queued."""
        for trace in self._traces.values():
            trace.delivery.resume()

    def refuse_unapplied(self) -> None:
        """Shutdown gave up waiting for client requests: fail the traced ones not applied yet,
        so none is applied after its connection is dropped and its trace has ended."""
        error = BlockDeviceError(errno.ESHUTDOWN, "server is shutting down")
        for filt in {id(t.filter): t.filter for t in self._traces.values()}.values():
            filt.refuse(error)

    async def close(self, timeout: float | None = None) -> None:
        """Stop every trace cleanly (server shutdown).  A trace whose stop has not finished
        after ``timeout`` seconds (its target does not answer) is abandoned, so a stuck
        target cannot hold the server forever."""
        traces = self.list()
        if not traces:
            return
        stops = {asyncio.ensure_future(t.stop()): t for t in traces}
        _, pending = await asyncio.wait(stops, timeout=timeout)
        for fut in pending:
            stops[fut].abandon(f"target did not stop within {timeout:g}s")
        if pending:
            await asyncio.wait(pending)
        for trace in traces:
            if not trace.concluded:  # its stop was cancelled before it began: end it here
                trace._conclude(cancelled=False)
        for fut in stops:
            if not fut.cancelled():
                fut.exception()  # retrieved: a failed stop is in its trace's error

    def _forget(self, trace: Trace) -> None:
        if self._traces.get(trace.job_id) is trace:
            del self._traces[trace.job_id]
