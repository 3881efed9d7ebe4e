"""The wire format of a trace record on a NATS subject, as a sans-IO encoder and decoder.

Two message layouts share a subject, told apart by ``Bt-V``:

* **version 2, a group** (what the publisher writes for every record that fits in one
  message): several whole records in one message, framed in the body by :data:`FRAME` (a
  fixed 26-byte header per record, then its data or mark name).  Why: a message costs nats-py,
  the server and every consumer the same whatever it carries; packing the records of one
  ``deliver`` batch (up to the server's ``max_payload``, :data:`MAX_GROUP_RECORDS` records,
  and never past a FLUSH, a FUA record or a mark) cut the per-record cost of a 4 KiB write
  several times over (docs/performance.md, "JetStream (issue 13)").
* **version 1, one record** (or a chunk of one) with everything but the data in NATS headers
  (:data:`HEADERS`).  The publisher still writes it for a record too large for one message
  (split into chunks, reassembled by the consumer), and streams written before groups existed
  are all version 1: they stay readable.

Both are declared once, as tables (:data:`HEADERS`, :data:`GROUP_HEADERS`, :data:`FRAME_FIELDS`),
and docs/jetstream.md prints the same tables.

The decoder reads *untrusted* messages (anyone allowed to publish on the subject), so it checks
every field, bounds the memory held for reassembly (:data:`DEFAULT_MAX_RECORD_BYTES`; at most one
record is reassembled at a time) and the records one group may hold (:data:`MAX_GROUP_RECORDS`),
and raises only :class:`~blocktrace.errors.FormatError`.  Both the publisher
(:mod:`blocktrace.jetstream.publisher`) and every consumer use this module, as do the unit and
fuzz tests.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from blocktrace.errors import FormatError
from blocktrace.stream.records import Record, RecordKind

#: ``Bt-V`` of a message holding one record (or a chunk of one) described by headers
VERSION = "1"
#: ``Bt-V`` of a message holding a group of whole records framed in its body
GROUP_VERSION = "2"

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

#: the layout of a group message's headers (version 2): (header, value, meaning)
GROUP_HEADERS: tuple[tuple[str, str, str], ...] = (
    ("Nats-Msg-Id", "TRACE.SEQ.g", "de-duplication key: trace run and the first record's seq"),
    ("Bt-V", "2", "wire format version: a group"),
    ("Bt-Trace", "16 hex digits", "one run of a trace (a publisher process)"),
    ("Bt-Seq", "decimal", "the first record's sequence number"),
    ("Bt-Count", "decimal, 1..1024", "records in the body"),
    # body: Bt-Count frames, each FRAME then its payload, nothing after the last
)

#: one record in a group's body, little-endian: (field, struct code, meaning)
FRAME_FIELDS: tuple[tuple[str, str, str], ...] = (
    ("seq", "Q", "the export's operation sequence number"),
    ("offset", "Q", "offset on the traced device (write/zero/trim; else 0)"),
    ("length", "Q", "write: data bytes that follow; zero/trim: bytes of the range; "
     "mark: bytes of the UTF-8 name that follow; flush: 0"),
    ("kind", "B", "1 write, 2 zero, 3 trim, 4 flush, 5 mark"),
    ("flags", "B", "bit 0 FUA, bit 1 made by sync=full's copy; other bits 0"),
)  # fmt: skip
#: the frame header as a struct (26 bytes)
FRAME = struct.Struct("<" + "".join(code for _, code, _ in FRAME_FIELDS))
#: kind codes of :data:`FRAME`
KIND_CODES: dict[RecordKind, int] = {
    RecordKind.WRITE: 1,
    RecordKind.ZERO: 2,
    RecordKind.TRIM: 3,
    RecordKind.FLUSH: 4,
    RecordKind.MARK: 5,
}
_CODE_KINDS = {code: kind for kind, code in KIND_CODES.items()}
_FLAG_FUA = 1
_FLAG_COPY = 2
#: most records in one group: bounds a consumer's work per message whatever it claims
MAX_GROUP_RECORDS = 1024

#: bytes of headers a message may need at most (NATS counts headers in ``max_payload``)
HEADER_BUDGET = 1024
#: largest record a consumer reassembles by default (NBD's maximum request is 32 MiB; a
#: write widened to the trace's alignment is a little larger)
DEFAULT_MAX_RECORD_BYTES = 64 * 1024 * 1024
#: mark names are short (a log sector holds them); a bound for hostile input
MAX_MARK_BYTES = 4096
#: most chunks one record may be split into
MAX_CHUNKS = 1 << 16
#: largest sequence number, offset and length a record may carry
MAX_SEQ = (1 << 63) - 1
MAX_OFFSET = 1 << 62

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
    """The version 1 messages for ``record`` of trace run ``trace``, in publication order:
    one, or its chunks when its data is larger than ``max_body``."""
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


def encode_batch(
    records: Iterable[Record],
    trace: str,
    max_body: int,
    *,
    max_group_records: int = MAX_GROUP_RECORDS,
) -> list[Message]:
    """The messages for ``records`` (in order) of trace run ``trace``: groups of whole records
    (version 2), each at most ``max_body`` bytes and ``max_group_records`` records, and ending
    after a FLUSH, a FUA record or a mark; a record too large for a message of its own is
    split into version 1 chunks (:func:`encode`).

    Records are grouped only with records already handed over together: nothing waits for
    more, so grouping adds no delay to an acknowledgement.  Why end a group at a FLUSH, FUA or
    mark: a consumer acknowledges (and resumes) at message boundaries, so a durable follower's
    flush point and a mark a replay stops at are always the end of a message.  Message ids
    depend only on the records, so a re-send of the same batch is de-duplicated.
    """
    msgs: list[Message] = []
    parts: list[bytes] = []
    size = count = 0
    first = 0
    pack = FRAME.pack
    frame = FRAME.size
    write, mark, flush = RecordKind.WRITE, RecordKind.MARK, RecordKind.FLUSH

    def close() -> None:
        nonlocal parts, size, count
        if count:
            headers = {
                "Nats-Msg-Id": f"{trace}.{first}.g",
                "Bt-V": GROUP_VERSION,
                "Bt-Trace": trace,
                "Bt-Seq": str(first),
                "Bt-Count": str(count),
            }
            msgs.append(Message(headers, b"".join(parts)))
        parts, size, count = [], 0, 0

    for rec in records:
        kind = rec.kind
        payload: bytes | None
        if kind is write:
            payload = rec.data
            assert payload is not None
            length = len(payload)
        elif kind is mark:
            payload = rec.name.encode()
            length = len(payload)
        else:
            payload = None
            length = 0 if kind is flush else rec.length
        need = frame + (len(payload) if payload is not None else 0)
        if need > max_body:  # only a large write (or an absurd mark name): chunks
            close()
            msgs.extend(encode(rec, trace, max_body))
            continue
        if count and (size + need > max_body or count >= max_group_records):
            close()
        if not count:
            first = rec.seq
        flags = (_FLAG_FUA if rec.fua else 0) | (_FLAG_COPY if rec.copy else 0)
        offset = rec.offset if kind is not flush and kind is not mark else 0
        parts.append(pack(rec.seq, offset, length, KIND_CODES[kind], flags))
        if payload:
            parts.append(payload)
        size += need
        count += 1
        if rec.fua or kind is flush or kind is mark:
            close()
    close()
    return msgs


@dataclass(frozen=True, slots=True)
class Decoded:
    """The whole records one message completed (one, or a group's), with the trace run that
    published them."""

    trace: str
    records: Sequence[Record]


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
        version = headers.get("Bt-V")
        trace = headers.get("Bt-Trace", "")
        if version != VERSION and version != GROUP_VERSION:
            raise FormatError(f"trace message of unknown version {str(version)[:40]!r}")
        if not _TRACE_RE.fullmatch(trace):
            raise FormatError(f"trace message: bad Bt-Trace {trace[:40]!r}")
        if version == GROUP_VERSION:
            return self._feed_group(headers, body, trace)
        seq = _int(headers, "Bt-Seq", MAX_SEQ)
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
                return Decoded(trace, (Record(seq, kind, fua=fua, copy=copy),))
            if len(body) > MAX_MARK_BYTES:
                raise FormatError(f"trace message #{seq}: mark name of {len(body)} bytes")
            try:
                name = body.decode()
            except UnicodeDecodeError:
                raise FormatError(f"trace message #{seq}: mark name is not UTF-8") from None
            return Decoded(trace, (Record(seq, kind, name=name),))
        offset = _int(headers, "Bt-Off", MAX_OFFSET)
        length = _int(headers, "Bt-Len", MAX_OFFSET)
        if kind is not RecordKind.WRITE:
            if chunk_text is not None or body or self._key is not None:
                raise FormatError(f"trace message #{seq}: {kind.value} with data or chunks")
            return Decoded(trace, (Record(seq, kind, offset, length, fua=fua, copy=copy),))
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
            return Decoded(trace, (record,))
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
        return Decoded(trace, (head._replace(data=data),))

    def _feed_group(self, headers: Mapping[str, str], body: bytes, trace: str) -> Decoded:
        """The records of a group message (version 2), every frame checked: the memory is
        the message's (its data are slices of the body) plus at most
        :data:`MAX_GROUP_RECORDS` records, whatever the headers claim."""
        if self._key is not None:
            if self._key[0] == trace:
                raise FormatError("trace message: a group inside a split record")
            self.torn += 1  # a new trace run began: the split record was torn
            self._drop_partial()
        first = _int(headers, "Bt-Seq", MAX_SEQ)
        count = _int(headers, "Bt-Count", MAX_GROUP_RECORDS)
        if count < 1:
            raise FormatError(f"trace group #{first}: Bt-Count 0")
        unpack = FRAME.unpack_from
        frame = FRAME.size
        end = len(body)
        limit = min(self.max_record_bytes, MAX_OFFSET)
        write, flush, mark = RecordKind.WRITE, RecordKind.FLUSH, RecordKind.MARK
        records: list[Record] = []
        pos = 0
        for i in range(count):
            if pos + frame > end:
                raise FormatError(f"trace group #{first}: record {i} of {count} is cut short")
            seq, offset, length, code, flags = unpack(body, pos)
            pos += frame
            kind = _CODE_KINDS.get(code)
            if kind is None or flags & ~(_FLAG_FUA | _FLAG_COPY) or seq > MAX_SEQ:
                raise FormatError(f"trace group #{first}: record {i} has a bad kind, flags or seq")
            fua = bool(flags & _FLAG_FUA)
            copy = bool(flags & _FLAG_COPY)
            if kind is write:
                stop = pos + length
                if stop > end or length > limit or offset > MAX_OFFSET:
                    raise FormatError(f"trace group #{first}: write #{seq} overruns the message")
                records.append(Record(seq, kind, offset, length, fua, body[pos:stop], "", copy))
                pos = stop
            elif kind is mark:
                stop = pos + length
                if stop > end or length > MAX_MARK_BYTES or offset or flags:
                    raise FormatError(f"trace group #{first}: bad mark #{seq}")
                try:
                    name = body[pos:stop].decode()
                except UnicodeDecodeError:
                    raise FormatError(f"trace group #{first}: mark #{seq} is not UTF-8") from None
                records.append(Record(seq, kind, name=name))
                pos = stop
            elif kind is flush:
                if offset or length:
                    raise FormatError(f"trace group #{first}: flush #{seq} with a range")
                records.append(Record(seq, kind, fua=fua, copy=copy))
            else:
                if offset > MAX_OFFSET or length > MAX_OFFSET:
                    raise FormatError(f"trace group #{first}: {kind.value} #{seq} out of range")
                records.append(Record(seq, kind, offset, length, fua, None, "", copy))
        if pos != end:
            raise FormatError(f"trace group #{first}: {end - pos} bytes after its last record")
        if records[0].seq != first:
            raise FormatError(f"trace group #{first}: its first record is #{records[0].seq}")
        return Decoded(trace, records)
