"""Trace records: one immutable value per entry of a trace's write stream.

A record is what every target receives, in stream order, and what the stream's guarantee is
stated over (docs/trace.md).  Records are produced only by the trace filter's funnel
(:mod:`blocktrace.trace.filter`) and by :meth:`Trace.mark`; they are immutable (named tuples)
because several traces on one export share the same record objects, and a background queue may
hold hundreds of thousands of them.

``offset`` and ``length`` are bytes on the traced device, aligned to the trace's alignment
(the log's sector size): the filter widens unaligned writes with the bytes around them, so a
target never has to read the image.
"""

from __future__ import annotations

import enum
from typing import NamedTuple


class RecordKind(enum.Enum):
    """What a record does to the image when replayed."""

    WRITE = "write"  #: ``data`` is written at ``offset``
    ZERO = "zero"  #: ``[offset, offset+length)`` reads as zeroes afterwards (no data carried)
    TRIM = "trim"  #: discard; our backends read back zeroes, replay zero-fills or discards
    FLUSH = "flush"  #: barrier: every earlier record was covered by a client FLUSH
    MARK = "mark"  #: a user mark (``name``); changes nothing

    @property
    def is_data(self) -> bool:
        """True for the kinds that change the image (the "data records" of the guarantee)."""
        return self in _DATA_KINDS


_DATA_KINDS = frozenset({RecordKind.WRITE, RecordKind.ZERO, RecordKind.TRIM})


class TraceRecord(NamedTuple):
    """One entry of the write stream (immutable: a named tuple, the cheapest immutable
    object Python builds, since one is made per traced request).

    ``seq`` is the export's operation sequence number (shared by every trace on the export,
    increasing in the order operations were applied to the image); a trace's own entry numbers
    are positions in its stream (see :class:`~blocktrace.trace.manager.TraceStats`).
    ``copy`` marks records made by ``sync=full``'s copy of existing content rather than by a
    client operation.
    """

    seq: int
    kind: RecordKind
    offset: int = 0
    length: int = 0
    fua: bool = False
    data: bytes | None = None
    name: str = ""
    copy: bool = False

    @property
    def nbytes(self) -> int:
        """Bytes of payload this record carries (what queue caps count)."""
        return len(self.data) if self.data is not None else 0

    def __repr__(self) -> str:
        extra = f" name={self.name!r}" if self.kind is RecordKind.MARK else ""
        flags = " fua" if self.fua else ""
        flags += " copy" if self.copy else ""
        return (
            f"TraceRecord(#{self.seq} {self.kind.value} {self.offset}+{self.length}{flags}{extra})"
        )


#: Fixed per-record cost counted against a queue cap, so that a flood of zero-length
#: records (flushes, trims) is bounded too.
RECORD_OVERHEAD = 128
