"""Trace options, and the ``EXPORT=TYPE:ARG[,key=value...]`` spelling of ``serve --trace``.

The option names and values are drive-mirror's (``sync``, ``copy-mode``, ``on-target-error``,
``queue-size``), so the QMP ``block-trace`` command and the command line use one vocabulary.
Options that belong to a target (``sector-size`` for a log) are passed through to the target
factory untouched.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace
from typing import Any

from blocktrace.errors import UsageError

MiB = 1024 * 1024


class SyncMode(enum.Enum):
    NONE = "none"  #: the stream holds only operations after the start; base = image at start
    FULL = "full"  #: the stream starts with the whole device; base = an all-zero image


class CopyMode(enum.Enum):
    #: a write is acknowledged after the image write; records queue (bounded) for the target
    BACKGROUND = "background"
    #: a write is acknowledged only once the target holds its record
    WRITE_BLOCKING = "write-blocking"


class OnTargetError(enum.Enum):
    #: clients' writes fail with EIO until the trace is stopped: the image cannot run ahead of
    #: the stream unnoticed
    REPORT = "report"
    #: the trace ends with the error recorded; clients carry on untraced
    BREAK = "break"


DEFAULT_QUEUE_SIZE = 64 * MiB


@dataclass(frozen=True, slots=True)
class TraceOptions:
    """How one trace records and delivers.  Defaults: ``sync=none``, ``copy-mode=background``,
    ``on-target-error=report``, ``queue-size=64M``."""

    sync: SyncMode = SyncMode.NONE
    copy_mode: CopyMode = CopyMode.BACKGROUND
    on_target_error: OnTargetError = OnTargetError.REPORT
    #: cap on queued record bytes (payload + a fixed per-record overhead)
    queue_size: int = DEFAULT_QUEUE_SIZE

    def __post_init__(self) -> None:
        if self.queue_size < 1 * MiB:
            raise UsageError(f"queue-size must be at least 1M, not {self.queue_size}")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TraceOptions:
        """Options from QMP-style names (``copy-mode``...); unknown keys are an error."""
        opts = cls()
        for key, value in values.items():
            opts = _set_option(opts, key, value)
        return opts

    def to_dict(self) -> dict[str, Any]:
        return {
            "sync": self.sync.value,
            "copy-mode": self.copy_mode.value,
            "on-target-error": self.on_target_error.value,
            "queue-size": self.queue_size,
        }


#: option names that belong to the trace; everything else goes to the target
TRACE_OPTION_NAMES = ("sync", "copy-mode", "on-target-error", "queue-size")


def _enum_value(enum_cls: type[enum.Enum], key: str, value: Any) -> Any:
    try:
        return enum_cls(value)
    except ValueError:
        allowed = "|".join(str(m.value) for m in enum_cls)
        raise UsageError(f"{key} must be {allowed}, not {value!r}") from None


def _set_option(opts: TraceOptions, key: str, value: Any) -> TraceOptions:
    if key == "sync":
        return replace(opts, sync=_enum_value(SyncMode, key, value))
    if key == "copy-mode":
        return replace(opts, copy_mode=_enum_value(CopyMode, key, value))
    if key == "on-target-error":
        return replace(opts, on_target_error=_enum_value(OnTargetError, key, value))
    if key == "queue-size":
        return replace(opts, queue_size=parse_size(value, key))
    raise UsageError(f"unknown trace option {key!r}")


def parse_size(value: Any, what: str = "size") -> int:
    """``65536``, ``64K``, ``64M``, ``1G`` (binary units) -> bytes."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    text = str(value).strip().upper().removesuffix("B").removesuffix("I")
    mult = 1
    for suffix, m in (("K", 1 << 10), ("M", 1 << 20), ("G", 1 << 30), ("T", 1 << 40)):
        if text.endswith(suffix):
            text, mult = text[:-1], m
            break
    try:
        n = int(text) * mult
    except ValueError:
        raise UsageError(f"{what}: not a size: {value!r}") from None
    if n < 0:
        raise UsageError(f"{what}: negative size {value!r}")
    return n


@dataclass(frozen=True, slots=True)
class TraceSpec:
    """A parsed ``--trace`` argument: which export, which target, which options."""

    export: str
    #: target description in the QMP shape: ``{"type": "log", "filename": ..., ...}``
    target: dict[str, Any]
    options: TraceOptions
    #: ``job-id=`` if given (else the caller picks one)
    job_id: str = ""


#: target type -> name of its main argument in the QMP target object
_TARGET_MAIN_ARG = {
    "log": "filename",
    "replica": "filename",
    "nbd": "uri",
    "introspect": "filename",
    "stream": "uri",
}


def parse_trace_spec(text: str) -> TraceSpec:
    """Parse ``EXPORT=TYPE:ARG[,key=value...]``, e.g. ``disk=log:/tmp/d.log,sync=full``.

    ``EXPORT=`` may be omitted when the server has one export (the caller resolves ``""``).
    A comma inside ARG or a value is written ``,,`` (QEMU's escaping).
    """
    export, sep, rest = text.partition("=")
    if not sep or ":" not in rest.split(",", 1)[0]:
        # no "EXPORT=" prefix: the whole thing is TYPE:ARG,...
        export, rest = "", text
    parts = _split_commas(rest)
    ttype, colon, arg = parts[0].partition(":")
    if not colon or not ttype or not arg:
        raise UsageError(f"--trace {text!r}: expected EXPORT=TYPE:ARG[,option=value...]")
    main = _TARGET_MAIN_ARG.get(ttype)
    if main is None:
        raise UsageError(f"--trace {text!r}: unknown target type {ttype!r}")
    target: dict[str, Any] = {"type": ttype, main: arg}
    trace_opts: dict[str, Any] = {}
    job_id = ""
    for part in parts[1:]:
        key, eq, value = part.partition("=")
        if not eq or not key:
            raise UsageError(f"--trace {text!r}: expected option=value, got {part!r}")
        if key == "job-id":
            job_id = value
        elif key in TRACE_OPTION_NAMES:
            trace_opts[key] = value
        else:
            target[key] = value
    return TraceSpec(export, target, TraceOptions.from_dict(trace_opts), job_id)


def _split_commas(text: str) -> list[str]:
    parts = [p.replace("\0", ",") for p in text.replace(",,", "\0").split(",")]
    return [p for p in parts if p] or [""]
