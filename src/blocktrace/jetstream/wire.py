"""The wire format of a trace record on a NATS subject, as a sans-IO encoder and decoder.

One record is one NATS message, or several ("chunks") when its data is larger than the
server's ``max_payload`` allows.  Everything but the data travels in NATS headers, so a
consumer can filter or inspect a stream with the stock ``nats`` tools and the body is the raw
payload, never copied into an envelope.  The layout is declared once, as :data:`HEADERS`, and
docs/jetstream.md prints the same table.

Why headers rather than a binary envelope: JetStream already frames and checksums messages, and
``Nats-Msg-Id`` (the de-duplication key) must be a header anyway; a handful of short decimal
strings costs ~150 bytes a message, negligible beside 4 KiB of data.

The decoder reads *untrusted* messages (anyone allowed to publish on the subject), so it checks
every field, bounds the memory held for reassembly (:data:`DEFAULT_MAX_RECORD_BYTES`; at most one
record is reassembled at a time), and raises only :class:`~blocktrace.errors.FormatError`.
Both the publisher (:mod:`blocktrace.jetstream.publisher`) and every consumer use this module,
as do the unit and fuzz tests.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from blocktrace.errors import FormatError
from blocktrace.stream.records import Record, RecordKind

#: format version in ``Bt-V``; a consumer refuses any other
VERSION = "1"

#: the message layout: (header, when present, value, meaning)
HEADERS: tuple[tuple[str, str, str, str], ...] = (
    ("Nats-Msg-Id", "always", "TRACE.SEQ.CHUNK", "JetStream de-duplication key"),
    ("Bt-V", "always", "1", "wire format version"),
    ("Bt-Trace", "always", "16 hex digits", "one run of a trace (a publisher process)"),
    ("Bt-Seq", "always", "decimal", "the export's operation sequence number"),
    ("Bt-Kind", "always", "write|zero|trim|flush|mark", "what the record does"),
    ("Bt-Off", "write/zero/trim", "decimal bytes", "offset on the traced device"),
    ("Bt-Len", "write/zero/trim", "decimal bytes", "length (of the whole record if split)"),
    ("Bt-Flags", "if any", "fua,copy", "FUA write; made by sync=full's copy"),
    ("Bt-Chunk", "if split", "I/N", "chunk I (0-based) of N; bodies concatenate in order"),
    # body: the data (write; a chunk's slice of it), the mark's UTF-8 name (mark), else empty
)

#: bytes of headers a message may need at most (NATS counts headers in ``max_payload``)
HEADER_BUDGET = 1024
#: largest record a consumer reassembles by default (NBD's maximum request is 32 MiB; a
#: write widened to the trace's alignment is a little larger)
DEFAULT_MAX_RECORD_BYTES = 64 * 1024 * 1024
#: mark names are short (a log sector holds them); a bound for hostile input
MAX_MARK_BYTES = 4096
#: most chunks one record may be split into
MAX_CHUNKS = 1 << 16

_TRACE_RE = re.compile(r"[0-9a-f]{16}")
_KINDS = {k.value: k for k in RecordKind}
_KIND_TEXT = {k: k.value for k in RecordKind}


@dataclass(frozen=True, slots=True)
class Message:
    """One NATS message to publish: headers and body."""

    headers: dict[str, str]
    body: bytes

    @property
    def msg_id(self) -> str:
        return self.headers["Nats-Msg-Id"]


def chunk_size(max_payload: int) -> int:
    """Most data bytes one message carries on a server with this ``max_payload``."""
    size = max_payload - HEADER_BUDGET
    if size < 4096:
        raise FormatError(f"server max_payload {max_payload} is too small for trace records")
    return size


def encode(record: Record, trace: str, max_body: int) -> list[Message]:
    """The messages for ``record`` of trace run ``trace``, in publication order."""
    seq = str(record.seq)
    kind = record.kind
    base = {"Bt-V": VERSION, "Bt-Trace": trace, "Bt-Seq": seq, "Bt-Kind": _KIND_TEXT[kind]}
    if kind is not RecordKind.FLUSH and kind is not RecordKind.MARK:
        base["Bt-Off"] = str(record.offset)
        base["Bt-Len"] = str(record.length)
    flags = ",".join(f for f, on in (("fua", record.fua), ("copy", record.copy)) if on)
    if flags:
        base["Bt-Flags"] = flags
    prefix = f"{trace}.{seq}."
    if kind is RecordKind.MARK:
        return [Message({"Nats-Msg-Id": prefix + "0", **base}, record.name.encode())]
    data = record.data if kind is RecordKind.WRITE else None
    if data is None or len(data) <= max_body:
        return [Message({"Nats-Msg-Id": prefix + "0", **base}, data if data is not None else b"")]
    view = memoryview(data)
    count = -(-len(data) // max_body)
    return [
        Message(
            {"Nats-Msg-Id": f"{prefix}{i}", **base, "Bt-Chunk": f"{i}/{count}"},
            bytes(view[i * max_body : (i + 1) * max_body]),
        )
        for i in range(count)
    ]


@dataclass(frozen=True, slots=True)
class Decoded:
    """A whole record read back, with the trace run that published it."""

    trace: str
    record: Record


def _int(headers: Mapping[str, str], name: str, limit: int) -> int:
    text = headers.get(name)
    if text is None:
        raise FormatError(f"trace message lacks {name}")
    if not text.isascii() or not text.isdigit() or len(text) > 20:
        raise FormatError(f"trace message: {name} is not a decimal number: {text[:40]!r}")
    value = int(text)
    if value > limit:
        raise FormatError(f"trace message: {name} {value} exceeds {limit}")
    return value


class Decoder:
    """Reassembles records from the messages of one subject, in stream order.

    ``feed`` returns a :class:`Decoded` when a message completes a record, else None.  At most
    one record is being reassembled, and never more than ``max_record_bytes`` of it is held.
    A partial record followed by a message of another trace run was torn by a publisher that
    died mid-record (its client was never acknowledged for it in ``write-blocking``): it is
    dropped and counted in :attr:`torn`.  Any other inconsistency is a :class:`FormatError`.
    """

    def __init__(self, max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES) -> None:
        self.max_record_bytes = max_record_bytes
        self.torn = 0
        self._partial: list[bytes] = []
        self._partial_bytes = 0
        self._key: tuple[str, int] | None = None  # (trace, seq) being reassembled
        self._next_chunk = 0
        self._chunks = 0
        self._head: Record | None = None

    @property
    def pending_bytes(self) -> int:
        """Data bytes held for the record being reassembled."""
        return self._partial_bytes

    @property
    def in_record(self) -> bool:
        """True between the first and the last chunk of a split record (a consumer may only
        acknowledge or stop at a record boundary)."""
        return self._key is not None

    def _drop_partial(self) -> None:
        self._partial = []
        self._partial_bytes = 0
        self._key = None
        self._head = None

    def feed(self, headers: Mapping[str, str] | None, body: bytes) -> Decoded | None:
        if not headers:
            raise FormatError("trace message without headers")
        if headers.get("Bt-V") != VERSION:
            raise FormatError(f"trace message of unknown version {headers.get('Bt-V')!r}")
        trace = headers.get("Bt-Trace", "")
        if not _TRACE_RE.fullmatch(trace):
            raise FormatError(f"trace message: bad Bt-Trace {trace[:40]!r}")
        seq = _int(headers, "Bt-Seq", (1 << 63) - 1)
        kind = _KINDS.get(headers.get("Bt-Kind", ""))
        if kind is None:
            raise FormatError(f"trace message: bad Bt-Kind {headers.get('Bt-Kind', '')[:40]!r}")
        flags = headers.get("Bt-Flags", "")
        fua = copy = False
        for flag in flags.split(",") if flags else ():
            if flag == "fua":
                fua = True
            elif flag == "copy":
                copy = True
            else:
                raise FormatError(f"trace message: unknown flag {flag[:40]!r}")
        chunk_text = headers.get("Bt-Chunk")
        if self._key is not None and self._key[0] != trace:
            self.torn += 1
            self._drop_partial()
        if kind is RecordKind.MARK or kind is RecordKind.FLUSH:
            if chunk_text is not None or self._key is not None:
                raise FormatError(f"trace message #{seq}: {kind.value} inside a split record")
            if kind is RecordKind.FLUSH:
                if body:
                    raise FormatError(f"trace message #{seq}: flush with a body")
                return Decoded(trace, Record(seq, kind, fua=fua, copy=copy))
            if len(body) > MAX_MARK_BYTES:
                raise FormatError(f"trace message #{seq}: mark name of {len(body)} bytes")
            try:
                name = body.decode()
            except UnicodeDecodeError:
                raise FormatError(f"trace message #{seq}: mark name is not UTF-8") from None
            return Decoded(trace, Record(seq, kind, name=name))
        offset = _int(headers, "Bt-Off", 1 << 62)
        length = _int(headers, "Bt-Len", 1 << 62)
        if kind is not RecordKind.WRITE:
            if chunk_text is not None or body or self._key is not None:
                raise FormatError(f"trace message #{seq}: {kind.value} with data or chunks")
            return Decoded(trace, Record(seq, kind, offset, length, fua=fua, copy=copy))
        if length > self.max_record_bytes:
            raise FormatError(
                f"trace message #{seq}: record of {length} bytes exceeds the reassembly bound "
                f"{self.max_record_bytes}"
            )
        if chunk_text is None:
            if self._key is not None:
                raise FormatError(f"trace message #{seq}: whole record inside a split record")
            if len(body) != length:
                raise FormatError(f"trace message #{seq}: {len(body)} data bytes, Bt-Len {length}")
            record = Record(seq, kind, offset, length, fua=fua, data=body, copy=copy)
            return Decoded(trace, record)
        index_text, slash, count_text = chunk_text.partition("/")
        if not slash:
            raise FormatError(f"trace message #{seq}: bad Bt-Chunk {chunk_text[:40]!r}")
        index = _int({"i": index_text}, "i", MAX_CHUNKS)
        count = _int({"n": count_text}, "n", MAX_CHUNKS)
        if count < 2 or index >= count or not body:
            raise FormatError(f"trace message #{seq}: bad chunk {chunk_text[:40]!r}")
        if index == 0:
            if self._key is not None:
                raise FormatError(f"trace message #{seq}: new record inside a split record")
            self._key = (trace, seq)
            self._chunks = count
            self._next_chunk = 0
            self._head = Record(seq, kind, offset, length, fua=fua, copy=copy)
        elif (
            self._key != (trace, seq)
            or index != self._next_chunk
            or count != self._chunks
            or self._head is None
            or (self._head.offset, self._head.length, self._head.fua) != (offset, length, fua)
        ):
            raise FormatError(f"trace message #{seq}: chunk {chunk_text[:40]!r} out of order")
        if self._partial_bytes + len(body) > length:
            raise FormatError(f"trace message #{seq}: chunks exceed Bt-Len {length}")
        self._partial.append(body)
        self._partial_bytes += len(body)
        self._next_chunk = index + 1
        if index + 1 < count:
            return None
        head = self._head
        data = b"".join(self._partial)
        self._drop_partial()
        assert head is not None
        if len(data) != length:
            raise FormatError(f"trace message #{seq}: {len(data)} data bytes, Bt-Len {length}")
        return Decoded(trace, head._replace(data=data))
