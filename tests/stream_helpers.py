"""Building stream records in tests with the names the old ext4 stream used."""

from __future__ import annotations

from blocktrace.stream.records import Record, RecordKind

#: the kinds by name; ``discard`` is the log's word for TRIM
KINDS = {k.value: k for k in RecordKind} | {"discard": RecordKind.TRIM}


def rec(
    seq: int,
    kind: str | RecordKind,
    offset: int = 0,
    length: int = 0,
    data: bytes | memoryview | None = None,
    fua: bool = False,
) -> Record:
    """``Record`` with the argument order ``(seq, kind, offset, length, data, fua)``."""
    k = kind if isinstance(kind, RecordKind) else KINDS[kind]
    payload = bytes(data) if data is not None else None
    return Record(seq, k, offset, length, fua, payload)
