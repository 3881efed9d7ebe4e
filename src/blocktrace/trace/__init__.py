"""Precise write tracing: an export's ordered, lossless write stream, sent to targets.

Public API (see docs/trace.md, section API)::

    from blocktrace.trace import TraceManager, TraceOptions, parse_trace_spec
    manager = TraceManager(service.exports)
    trace = await manager.start("job0", "disk", {"type": "log", "filename": "d.log"},
                                TraceOptions.from_dict({"sync": "full"}))
    await trace.mark("before-upgrade")
    await trace.stop()

Modules: :mod:`.records` (TraceRecord), :mod:`.options` (TraceOptions, ``--trace`` parsing),
:mod:`.filter` (TraceFilter, the funnel), :mod:`.ordering` (range lock), :mod:`.delivery`
(queues, copy modes), :mod:`.manager` (Trace, TraceManager, job states and events),
:mod:`.targets` (Target protocol and the factory).
"""

from __future__ import annotations

from blocktrace.trace.filter import TraceFilter
from blocktrace.trace.manager import (
    EventKind,
    JobStatus,
    Trace,
    TraceEvent,
    TraceManager,
    TraceStats,
)
from blocktrace.trace.options import (
    CopyMode,
    OnTargetError,
    SyncMode,
    TraceOptions,
    TraceSpec,
    parse_trace_spec,
)
from blocktrace.trace.records import RecordKind, TraceRecord
from blocktrace.trace.targets import Target, TargetInfo, create_target

__all__ = [
    "CopyMode",
    "EventKind",
    "JobStatus",
    "OnTargetError",
    "RecordKind",
    "SyncMode",
    "Target",
    "TargetInfo",
    "Trace",
    "TraceEvent",
    "TraceFilter",
    "TraceManager",
    "TraceOptions",
    "TraceRecord",
    "TraceSpec",
    "TraceStats",
    "create_target",
    "parse_trace_spec",
]
