"""Precise write tracing: an export's ordered, lossless write stream, sent to targets.

Public API (see docs/trace.md, section API)::

    from blocktrace.trace import TraceManager, TraceOptions, parse_trace_spec
    manager = TraceManager(service.exports)
    trace = await manager.start("job0", "disk", {"type": "log", "filename": "d.log"},
                                TraceOptions.from_dict({"sync": "full"}))
    await trace.mark("before-upgrade")
    await trace.stop()

Modules: :mod:`.options` (TraceOptions, ``--trace`` parsing), :mod:`.filter` (TraceFilter,
the funnel), :mod:`.ordering` (range lock), :mod:`.delivery` (queues, copy modes),
:mod:`.manager` (Trace, TraceManager, job states and events).  Records, the target contract
and the target registry are the stream's (:mod:`blocktrace.stream`); the target types live in
:mod:`blocktrace.targets`.
"""

from __future__ import annotations

from blocktrace.stream import Record, RecordKind, SyncMode, Target, TargetInfo
from blocktrace.stream.registry import create_target
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
    TraceOptions,
    TraceSpec,
    parse_trace_spec,
)

__all__ = [
    "CopyMode",
    "EventKind",
    "JobStatus",
    "OnTargetError",
    "Record",
    "RecordKind",
    "SyncMode",
    "Target",
    "TargetInfo",
    "Trace",
    "TraceEvent",
    "TraceFilter",
    "TraceManager",
    "TraceOptions",
    "TraceSpec",
    "TraceStats",
    "create_target",
    "parse_trace_spec",
]
