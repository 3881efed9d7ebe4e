"""The one record type of a write stream: what every source produces and every target takes.

A :class:`Record` is one entry of a disk's write stream, whoever made it: the trace filter's
funnel (live NBD clients), a dm-log-writes log read back (the kernel's, QEMU's blklogwrites or
blocktrace's own), or any future source.  Targets (logs, replicas, introspection, network
streams) and the applier (:mod:`blocktrace.stream.apply`) consume the same value, so a record
means the same thing everywhere: ``TRIM`` is a trim whether it came from NBD or from a log's
DISCARD entry, and FUA is a flag on the data record it made durable.

Records are immutable named tuples: several traces on one export share the same record
objects, a background queue may hold hundreds of thousands of them, and a named tuple is the
cheapest immutable object Python builds (one is made per traced request).

Payload ownership: ``data`` is a ``bytes`` object the record owns.  It is never a view of a
buffer someone will reuse (an NBD receive buffer, a log reader's page), so a consumer may keep
it as long as it likes, and a producer that had a view copies it exactly once, when it makes
the record.  Only WRITE records carry data.

``offset`` and ``length`` are bytes on the device the stream describes.  A source may promise
an alignment (the trace filter widens unaligned operations to its targets' alignment with the
image's surrounding bytes, so a target never has to read the image).
"""

from __future__ import annotations

import enum
from typing import NamedTuple


class RecordKind(enum.Enum):
    """What a record does to the device when applied (the values are the JSON/human names)."""

    WRITE = "write"  #: ``data`` is written at ``offset``
    ZERO = "zero"  #: ``[offset, offset+length)`` reads as zeroes afterwards (no data carried)
    TRIM = "trim"  #: discard (a log's DISCARD); blocktrace's devices read back zeroes
    FLUSH = "flush"  #: barrier: every earlier record was covered by a client FLUSH
    MARK = "mark"  #: a user mark (``name``); changes nothing

    @property
    def is_data(self) -> bool:
        """True for the kinds that change the device (the "data records" of the guarantee)."""
        return self in DATA_KINDS


#: the kinds that change the device
DATA_KINDS = frozenset({RecordKind.WRITE, RecordKind.ZERO, RecordKind.TRIM})


class Record(NamedTuple):
    """One entry of a write stream.

    ``seq`` orders the stream: increasing in the order operations were applied to the device
    (the trace filter's export-wide sequence number, or a log entry's index; a log entry that
    carries data and a FLUSH gives two records with its index).
    ``fua``: the operation was durable on the device when it was acknowledged.  ``copy``
    marks records made by a ``sync=full`` copy of existing content rather than by a client.
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
        return f"Record(#{self.seq} {self.kind.value} {self.offset}+{self.length}{flags}{extra})"


#: Fixed per-record cost counted against a queue cap, so that a flood of zero-length
#: records (flushes, trims) is bounded too.
RECORD_OVERHEAD = 128
