"""``block-trace`` as a block job: the QMP face of :class:`blocktrace.trace.TraceManager`.

A trace is a QEMU block job in every way a QMP client can see: ``block-trace`` starts it with
drive-mirror's vocabulary (``job-id``, ``device``, ``sync``, ``copy-mode``,
``on-target-error``), ``query-block-jobs``/``query-jobs`` list it with QEMU's fields (``device``
is the *job id*, as in QEMU since 2.7; the traced export is ``export``), the ``block-job-*`` and
``job-*`` verbs act on it, and the manager's :class:`~blocktrace.trace.TraceEvent` stream is
translated one to one into ``JOB_STATUS_CHANGE``, ``BLOCK_JOB_READY``, ``BLOCK_JOB_ERROR``,
``BLOCK_JOB_COMPLETED`` and ``BLOCK_JOB_CANCELLED`` with QEMU's data shapes.

Like QEMU, ``block-job-cancel`` returns at once and the end is announced by an event: the
trace is stopped cleanly in the background (queued records delivered, the target made durable
and closed), then ``BLOCK_JOB_COMPLETED`` (the trace was ready: the stream is complete) or
``BLOCK_JOB_CANCELLED`` (a ``sync=full`` copy had not finished).  A failed trace ends with
``BLOCK_JOB_COMPLETED`` carrying ``error``.

Races: commands that create or end jobs, or add or remove exports, hold :attr:`Control.lock`,
so two ``block-trace`` with one job id, or a cancel racing a start, are serialised: the
second gets QEMU's error (``Job ID 'x' already in use``) or sees the finished start, never a
half-made job.  Target types: ``BlockTraceTarget`` is generated from the target registry
(:mod:`blocktrace.stream.registry`), one variant per type with the members its schema
declares; a target that cannot be opened fails the command with a GenericError saying why.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from blocktrace.errors import BlocktraceError, StateError
from blocktrace.qmp import errors
from blocktrace.qmp.commands import Bool, CommandTable, Enum, Int, Member, Str, Type, Union
from blocktrace.stream.contract import StateReporter
from blocktrace.stream.registry import TargetRegistry, targets
from blocktrace.stream.schema import Choice, Flag, Integer, Option, Seconds, TargetType
from blocktrace.trace import EventKind, JobStatus, Trace, TraceEvent, TraceManager, TraceOptions

if TYPE_CHECKING:
    from blocktrace.qmp.control import Control

log = logging.getLogger(__name__)

MirrorSyncMode = Enum("MirrorSyncMode", ("full", "none"))
MirrorCopyMode = Enum("MirrorCopyMode", ("background", "write-blocking"))
TraceOnTargetError = Enum("BlockTraceOnTargetError", ("report", "break"))


def _camel(name: str) -> str:
    return "".join(part.capitalize() for part in name.split("-"))


def option_member(ttype: TargetType, opt: Option) -> Member:
    """A target option as a QMP union member: its JSON type and range come from the schema,
    so QMP refuses what the schema's type refuses, with QEMU's sentences."""
    t = opt.type
    qtype: Type
    if isinstance(t, Choice):
        qtype = Enum(f"BlockTrace{_camel(ttype.name)}{_camel(opt.name)}", t.values)
    elif isinstance(t, Flag):
        qtype = Bool()
    elif isinstance(t, Integer):
        qtype = Int(t.minimum, t.maximum, kind=t.kind)
    elif isinstance(t, Seconds):
        qtype = Int(t.minimum, t.maximum, kind="uint32")
    else:
        qtype = Str()
    optional = not (opt.main or opt.required)
    return Member(opt.name, qtype, optional=optional, doc=opt.doc)


def target_union(registry: TargetRegistry) -> Union:
    """``BlockTraceTarget``: one variant per registered target type."""
    variants = {t.name: tuple(option_member(t, o) for o in t.options) for t in registry}
    return Union(
        "BlockTraceTarget",
        Member("type", Enum("BlockTraceTargetType", tuple(variants))),
        variants,
    )


BlockTraceTarget = target_union(targets())


class JobRegistry:
    """Bridges the trace manager to QMP: events out, job lookups in."""

    def __init__(self, ctx: Control, manager: TraceManager) -> None:
        self.ctx = ctx
        self.manager = manager
        self._stops: set[asyncio.Task[None]] = set()
        self._held: dict[str, TraceEvent] = {}  # a "concluded" change waiting for its end event
        self._ended: set[str] = set()  # jobs whose end event has been sent
        manager.add_listener(self._on_trace_event)
        for trace in manager.list():  # started before QMP was (serve --trace)
            self.watch_target(trace)

    def jobs_on(self, export: str) -> list[str]:
        return [t.job_id for t in self.manager.on_export(export)]

    def find(self, job_id: str) -> Trace:
        """The live trace ``job_id``; QEMU's ``DeviceNotActive`` error when there is none."""
        trace = self.manager.find(job_id)
        if trace is None or trace.concluded:
            raise errors.job_not_found(job_id)
        return trace

    def info(self, trace: Trace) -> dict[str, Any]:
        return job_info(trace)

    def stop_in_background(self, trace: Trace) -> None:
        task = asyncio.get_running_loop().create_task(trace.stop(), name=f"stop:{trace.job_id}")
        self._stops.add(task)
        task.add_done_callback(self._stop_done)

    def _stop_done(self, task: asyncio.Task[None]) -> None:
        self._stops.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("stopping trace %s failed: %s", task.get_name(), task.exception())

    async def wait_stopped(self) -> None:
        if self._stops:
            await asyncio.gather(*self._stops, return_exceptions=True)

    def watch_target(self, trace: Trace) -> None:
        """Replica targets report connection/sync state changes: QMP event
        ``BLOCK_TRACE_REPLICA_STATE`` {device, state, error?} (docs/replica.md)."""
        target = trace.target
        if not isinstance(target, StateReporter):
            return

        def on_state(_target: Any, state: str, details: dict[str, Any]) -> None:
            data = {"device": trace.job_id, "state": state, **details}
            self.ctx.emit("BLOCK_TRACE_REPLICA_STATE", data)

        target.add_listener(on_state)

    def _on_trace_event(self, trace: Trace, event: TraceEvent) -> None:
        """Translate and broadcast, in QEMU's order: QEMU announces the end of a job
        (``BLOCK_JOB_COMPLETED``/``CANCELLED``) *before* its status becomes ``concluded``, so a
        ``concluded`` change seen first is held back until the end event has gone out."""
        job = trace.job_id
        if event.kind is EventKind.STATUS_CHANGE and event.status is JobStatus.CREATED:
            self.watch_target(trace)
        if event.kind is EventKind.STATUS_CHANGE and event.status is JobStatus.CONCLUDED:
            if job not in self._ended:
                self._held[job] = event
                return
        elif event.kind is EventKind.STATUS_CHANGE and event.status is JobStatus.NULL:
            held = self._held.pop(job, None)
            if held is not None:  # no end event came: do not lose the change
                self.ctx.emit(*event_message(trace, held))
            self._ended.discard(job)
        elif event.kind in (EventKind.COMPLETED, EventKind.CANCELLED):
            self._ended.add(job)
            self.ctx.emit(*event_message(trace, event))
            held = self._held.pop(job, None)
            if held is not None:
                self.ctx.emit(*event_message(trace, held))
            return
        self.ctx.emit(*event_message(trace, event))


def job_info(trace: Trace) -> dict[str, Any]:
    """A trace as a ``query-block-jobs`` element: QEMU's fields, then the trace's (``device``
    is the job id, as in QEMU; the traced export is ``export``)."""
    st = trace.stats()
    return {
        "type": "trace",
        "device": trace.job_id,
        "len": st.len,
        "offset": st.offset,
        "busy": trace.delivery.busy,
        "paused": trace.paused,
        "speed": 0,
        "io-status": trace.io_status,
        "ready": trace.ready,
        "status": trace.status.value,
        "auto-finalize": True,
        "auto-dismiss": True,
        **({"error": trace.error} if trace.error else {}),
        "entries": st.entries,
        "bytes": st.bytes,
        "queued-bytes": st.queued_bytes,
        "queued-records": st.queued_records,
        "delivered-records": st.delivered_records,
        "durable-records": st.durable_records,
        "target": trace.target.describe(),
        **trace.options.to_dict(),
        "export": trace.export.name,
    }


def event_message(trace: Trace, event: TraceEvent) -> tuple[str, dict[str, Any]]:
    """A trace event as QEMU's event name and data."""
    if event.kind is EventKind.STATUS_CHANGE:
        return "JOB_STATUS_CHANGE", {"id": trace.job_id, "status": event.status.value}
    if event.kind is EventKind.ERROR:
        return "BLOCK_JOB_ERROR", {
            "device": trace.job_id,
            "operation": event.operation,
            "action": event.action or "report",
        }
    st = trace.stats()
    data: dict[str, Any] = {
        "type": "trace",
        "device": trace.job_id,
        "len": st.len,
        "offset": st.offset,
        "speed": 0,
    }
    if event.kind is EventKind.COMPLETED and event.error:
        data["error"] = event.error
    return event.kind.value, data


def _verb_refused(trace: Trace, verb: str) -> errors.QMPError:
    return errors.generic(
        f"Job '{trace.job_id}' in state '{trace.status.value}' cannot accept command verb '{verb}'"
    )


def register(table: CommandTable) -> None:
    @table.command(
        "block-trace",
        Member("job-id", Str(), optional=True, doc="default: the device name"),
        Member("device", Str(), doc="the export to trace"),
        Member("target", BlockTraceTarget),
        Member("sync", MirrorSyncMode, optional=True, default="none"),
        Member("copy-mode", MirrorCopyMode, optional=True, default="background"),
        Member("on-target-error", TraceOnTargetError, optional=True, default="report"),
        Member("queue-size", Int(0, kind="uint64"), optional=True, doc="bytes; default 64 MiB"),
        doc="Start tracing an export's writes to a target, as a block job.",
    )
    async def block_trace(ctx: Control, args: dict[str, Any]) -> Any:
        job_id = args["job-id"] if args["job-id"] is not None else args["device"]
        if not job_id:
            raise errors.generic("Invalid job ID ''")
        target = {k: v for k, v in args["target"].items() if v is not None}
        option_names = ("sync", "copy-mode", "on-target-error", "queue-size")
        try:
            options = TraceOptions.from_dict(
                {k: args[k] for k in option_names if args[k] is not None}
            )
        except BlocktraceError as exc:
            raise errors.generic(str(exc)) from None
        async with ctx.lock:
            if ctx.jobs.manager.find(job_id) is not None:
                raise errors.job_id_in_use(job_id)
            if args["device"] not in ctx.service.registry:
                raise errors.device_not_found(args["device"])
            try:
                await ctx.jobs.manager.start(job_id, args["device"], target, options)
            except BlocktraceError as exc:
                raise errors.generic(str(exc)) from None
        return {}

    @table.command(
        "block-trace-mark",
        Member("job-id", Str()),
        Member("name", Str()),
        doc="Write a named mark into a trace; returns once the target holds it.",
        returns="BlockTraceMarkInfo",
    )
    async def block_trace_mark(ctx: Control, args: dict[str, Any]) -> Any:
        trace = ctx.jobs.find(args["job-id"])
        try:
            place = await trace.mark(args["name"])
        except BlocktraceError as exc:
            raise errors.generic(str(exc)) from None
        info: dict[str, Any] = {"position": place.position}
        if place.entry is not None:
            info["entry"] = place.entry
        return info

    @table.command("query-block-jobs", doc="List trace jobs.", returns="[BlockJobInfo]")
    async def query_block_jobs(ctx: Control, args: dict[str, Any]) -> Any:
        return [ctx.jobs.info(t) for t in ctx.jobs.manager.list() if not t.concluded]

    @table.command("query-jobs", doc="List trace jobs, generic form.", returns="[JobInfo]")
    async def query_jobs(ctx: Control, args: dict[str, Any]) -> Any:
        out = []
        for t in ctx.jobs.manager.list():
            st = t.stats()
            info: dict[str, Any] = {
                "id": t.job_id,
                "type": "trace",
                "status": t.status.value,
                "current-progress": st.offset,
                "total-progress": st.len,
            }
            if t.error:
                info["error"] = t.error
            out.append(info)
        return out

    async def cancel(ctx: Control, trace: Trace) -> Any:
        if trace.status in (JobStatus.CREATED, JobStatus.ABORTING):  # QEMU's verb table
            raise _verb_refused(trace, "cancel")
        ctx.jobs.stop_in_background(trace)
        return {}

    async def complete(ctx: Control, trace: Trace) -> Any:
        if not trace.ready or trace.status not in (JobStatus.READY, JobStatus.STANDBY):
            raise _verb_refused(trace, "complete")
        ctx.jobs.stop_in_background(trace)
        return {}

    async def pause(ctx: Control, trace: Trace) -> Any:
        if trace.paused:
            raise errors.generic("Job is already paused")
        try:
            trace.pause()
        except StateError:
            raise _verb_refused(trace, "pause") from None
        return {}

    async def resume(ctx: Control, trace: Trace) -> Any:
        if trace.status not in (JobStatus.PAUSED, JobStatus.STANDBY):
            if trace.status in (JobStatus.RUNNING, JobStatus.READY):
                raise errors.generic("Can't resume a job that was not paused")
            raise _verb_refused(trace, "resume")
        trace.resume()
        return {}

    verbs = {"cancel": cancel, "complete": complete, "pause": pause, "resume": resume}
    docs = {
        "cancel": "Stop a trace cleanly: queued records are delivered, the target closed.",
        "complete": "Stop a ready trace cleanly (BLOCK_JOB_COMPLETED).",
        "pause": "Stop delivering to the target; records queue up to queue-size.",
        "resume": "Resume delivering to the target.",
    }
    for verb, fn in verbs.items():
        _register_verb(table, verb, fn, docs[verb])


def _register_verb(table: CommandTable, verb: str, fn: Any, doc: str) -> None:
    """``block-job-VERB {device}`` (DeviceNotActive when unknown) and ``job-VERB {id}``."""
    extra = (Member("force", Bool(), optional=True, default=False),) if verb == "cancel" else ()

    async def block_job_verb(ctx: Control, args: dict[str, Any]) -> Any:
        async with ctx.lock:
            return await fn(ctx, ctx.jobs.find(args["device"]))

    async def job_verb(ctx: Control, args: dict[str, Any]) -> Any:
        async with ctx.lock:
            trace = ctx.jobs.manager.find(args["id"])
            if trace is None or trace.concluded:
                raise errors.generic("Job not found")
            return await fn(ctx, trace)

    table.add(f"block-job-{verb}", block_job_verb, (Member("device", Str()), *extra), doc=doc)
    table.add(f"job-{verb}", job_verb, (Member("id", Str()),), doc=doc)
