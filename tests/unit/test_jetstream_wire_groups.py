"""Version 2 of the JetStream wire format: several whole records per message (a group).

Round trips of every kind, the group's bounds (bytes, records, FLUSH/FUA/mark), version 1
messages (old streams, and large records' chunks) read by the same decoder, and a decoder of
untrusted groups that raises only FormatError and holds at most one message's records (fuzzed).
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blocktrace.errors import FormatError
from blocktrace.jetstream import wire
from blocktrace.stream.records import Record, RecordKind

TRACE = "0123456789abcdef"
W, Z, T, F, M = (RecordKind.WRITE, RecordKind.ZERO, RecordKind.TRIM, RecordKind.FLUSH,
                 RecordKind.MARK)  # fmt: skip


def decode_all(msgs: list[wire.Message], dec: wire.Decoder | None = None) -> list[Record]:
    dec = dec or wire.Decoder()
    out: list[Record] = []
    for msg in msgs:
        got = dec.feed(msg.headers, msg.body)
        if got is not None:
            assert got.trace == TRACE
            out.extend(got.records)
    assert not dec.in_record
    return out


def writes(n: int, first: int = 1, size: int = 4096) -> list[Record]:
    return [
        Record(i, W, i * size, size, data=bytes([i % 251]) * size) for i in range(first, first + n)
    ]


def test_every_kind_round_trips_in_groups_and_large_writes_in_chunks() -> None:
    big = bytes(range(256)) * 300  # 76,800 bytes: chunks at max_body 32 KiB
    recs = [
        Record(1, W, 4096, 8, data=b"abcdefgh"),
        Record(2, Z, 512, 1 << 20),
        Record(3, T, 1 << 30, 4096, copy=True),
        Record(4, W, 0, 4, fua=True, data=b"\0\1\2\3"),  # FUA: ends the group
        Record(5, W, 8192, len(big), data=big),  # too big for a message: version 1 chunks
        Record(6, W, 0, 3, data=b"xyz", copy=True),
        Record(7, F),  # ends the group
        Record(8, M, name="before-upgrade ✓"),  # its own group: ends it
        Record(9, Z, 0, 512, fua=True),
        Record(10, W, 4, 2, data=b"zz"),
    ]
    msgs = wire.encode_batch(recs, TRACE, 32 * 1024)
    assert [m.headers["Bt-V"] for m in msgs] == ["2", "1", "1", "1", "2", "2", "2", "2"]
    assert [m.headers.get("Bt-Count") for m in msgs if m.headers["Bt-V"] == "2"] == [
        "4", "2", "1", "1", "1"
    ]  # fmt: skip
    assert decode_all(msgs) == recs


def test_groups_are_bounded_by_bytes_and_by_records() -> None:
    recs = writes(3000)
    msgs = wire.encode_batch(recs, TRACE, 64 * 1024)
    assert all(len(m.body) <= 64 * 1024 for m in msgs)
    # 15 frames of 4096 + 26 bytes fit in 64 KiB, 16 do not
    assert {m.headers["Bt-Count"] for m in msgs[:-1]} == {"15"}
    assert decode_all(msgs) == recs
    zeroes = [Record(i, Z, i * 512, 512) for i in range(1, 3001)]
    msgs = wire.encode_batch(zeroes, TRACE, 1 << 20)
    assert [int(m.headers["Bt-Count"]) for m in msgs] == [1024, 1024, 952]
    assert decode_all(msgs) == zeroes
    msgs = wire.encode_batch(zeroes, TRACE, 1 << 20, max_group_records=7)
    assert max(int(m.headers["Bt-Count"]) for m in msgs) == 7


def test_message_ids_are_stable_and_unique() -> None:
    recs = [*writes(40), Record(41, F), *writes(40, first=42)]
    a = wire.encode_batch(recs, TRACE, 64 * 1024)
    assert a == wire.encode_batch(recs, TRACE, 64 * 1024)  # a re-send is the same messages
    ids = [m.msg_id for m in a]
    assert len(set(ids)) == len(ids)
    assert ids[0] == f"{TRACE}.1.g"
    assert all(m.headers["Bt-Seq"] == m.msg_id.split(".")[1] for m in a)


def test_old_streams_stay_readable_and_versions_mix() -> None:
    """A stream written before groups (version 1 only), then by this publisher (groups and
    chunks), read by one decoder: every record, in order."""
    old = [
        Record(1, W, 0, 4, data=b"abcd"),
        Record(2, Z, 512, 4096, fua=True),
        Record(3, T, 8192, 512),
        Record(4, F),
        Record(5, M, name="v1 mark"),
        Record(6, W, 0, 10000, data=b"q" * 10000),  # chunks
    ]
    v1 = [m for r in old for m in wire.encode(r, TRACE, 4096)]
    assert {m.headers["Bt-V"] for m in v1} == {"1"}
    new = [*writes(20, first=7), Record(27, F)]
    v2 = wire.encode_batch(new, TRACE, 32 * 1024)
    assert decode_all(v1 + v2) == old + new


def test_a_group_inside_a_split_record() -> None:
    big = Record(1, W, 0, 8192, data=b"a" * 8192)
    first_chunk = wire.encode(big, TRACE, 4096)[0]
    (group,) = wire.encode_batch(writes(2, first=2), TRACE, 64 * 1024)
    dec = wire.Decoder()
    dec.feed(first_chunk.headers, first_chunk.body)
    with pytest.raises(FormatError, match="inside a split record"):
        dec.feed(group.headers, group.body)
    # another trace run's group: the split record was torn by a publisher that died
    dec = wire.Decoder()
    dec.feed(first_chunk.headers, first_chunk.body)
    other = {**group.headers, "Bt-Trace": "fedcba9876543210"}
    got = dec.feed(other, group.body)
    assert got is not None and list(got.records) == writes(2, first=2)
    assert dec.torn == 1 and not dec.in_record and dec.pending_bytes == 0


def frame(seq: int, kind: int, offset: int = 0, length: int = 0, flags: int = 0) -> bytes:
    return wire.FRAME.pack(seq, offset, length, kind, flags)


def group(body: bytes, count: int, first: int = 1) -> tuple[dict[str, str], bytes]:
    headers = {"Bt-V": "2", "Bt-Trace": TRACE, "Bt-Seq": str(first), "Bt-Count": str(count)}
    return headers, body


@pytest.mark.parametrize(
    ("headers", "body", "match"),
    [
        (*group(frame(1, 4), 2), "cut short"),
        (*group(frame(1, 4) + b"x", 1), "after its last record"),
        (*group(frame(1, 9), 1), "bad kind"),
        (*group(frame(1, 4, flags=4), 1), "bad kind, flags"),
        (*group(frame(1 << 63, 4), 1, 1 << 63), "Bt-Seq"),
        (*group(frame(1, 4, 0, 5), 1), "flush #1 with a range"),
        (*group(frame(1, 1, 0, 10) + b"short", 1), "overruns"),
        (*group(frame(1, 1, 1 << 63, 1) + b"x", 1), "overruns"),
        (*group(frame(1, 5, 0, 2) + b"\xff\xfe", 1), "not UTF-8"),
        (*group(frame(1, 5, 0, 5000) + b"m" * 5000, 1), "bad mark"),
        (*group(frame(1, 2, 1 << 63, 1), 1), "out of range"),
        (*group(frame(2, 4), 1), "first record is #2"),
        (*group(b"", 0), "Bt-Count 0"),
        (*group(frame(1, 4) * 2000, 2000), "Bt-Count 2000 exceeds"),
        ({"Bt-V": "2", "Bt-Trace": TRACE, "Bt-Count": "1"}, frame(1, 4), "lacks Bt-Seq"),
        ({"Bt-V": "2", "Bt-Trace": "x", "Bt-Seq": "1", "Bt-Count": "1"}, frame(1, 4), "Trace"),
    ],
)
def test_hostile_groups_are_one_line_format_errors(
    headers: dict[str, str], body: bytes, match: str
) -> None:
    with pytest.raises(FormatError, match=match) as err:
        wire.Decoder().feed(headers, body)
    assert "\n" not in str(err.value)


def test_a_write_beyond_the_reassembly_bound_is_refused() -> None:
    (msg,) = wire.encode_batch(writes(1, size=8192), TRACE, 64 * 1024)
    with pytest.raises(FormatError, match="overruns"):
        wire.Decoder(max_record_bytes=4096).feed(msg.headers, msg.body)


frames = st.lists(
    st.tuples(
        st.integers(0, (1 << 64) - 1),  # seq
        st.sampled_from([0, 1, 1 << 62, (1 << 64) - 1]),  # offset
        st.one_of(st.integers(0, 80), st.integers(0, (1 << 64) - 1)),  # length
        st.integers(0, 7),  # kind code
        st.integers(0, 255),  # flags
        st.binary(max_size=80),  # what follows the frame
    ),
    max_size=10,
)


@settings(max_examples=400, deadline=None)
@given(frames, st.integers(-2, 12), st.integers(0, (1 << 64)), st.binary(max_size=40))
def test_fuzz_group_decoder_raises_only_format_error_and_stays_bounded(
    items: list[tuple[int, int, int, int, int, bytes]], count: int, first: int, tail: bytes
) -> None:
    body = b"".join(struct.pack("<QQQBB", *item[:5]) + item[5] for item in items) + tail
    headers = {"Bt-V": "2", "Bt-Trace": TRACE, "Bt-Seq": str(first), "Bt-Count": str(count)}
    dec = wire.Decoder(max_record_bytes=64)
    try:
        got = dec.feed(headers, body)
    except FormatError:
        return
    assert got is not None and 1 <= len(got.records) <= wire.MAX_GROUP_RECORDS
    for rec in got.records:
        if rec.kind is W:
            assert rec.data is not None and len(rec.data) == rec.length <= 64
        else:
            assert rec.data is None
    assert dec.pending_bytes == 0


records_strategy = st.lists(
    st.one_of(
        st.tuples(st.just(W), st.integers(0, 1 << 40), st.binary(min_size=1, max_size=9000)),
        st.tuples(st.sampled_from([Z, T]), st.integers(0, 1 << 40), st.integers(0, 1 << 30)),
        st.tuples(st.just(F), st.just(0), st.just(0)),
        st.tuples(st.just(M), st.just(0), st.text(max_size=20)),
    ),
    max_size=40,
)


@settings(max_examples=200, deadline=None)
@given(
    records_strategy,
    st.lists(st.booleans(), min_size=40, max_size=40),
    st.integers(4096, 20000),
    st.integers(1, 50),
)
def test_fuzz_batches_round_trip(
    items: list[tuple[RecordKind, int, object]], fuas: list[bool], max_body: int, per_group: int
) -> None:
    recs: list[Record] = []
    for i, (kind, off, arg) in enumerate(items, 1):
        if kind is W:
            assert isinstance(arg, bytes)
            recs.append(Record(i, W, off, len(arg), fua=fuas[i - 1], data=arg))
        elif kind is M:
            assert isinstance(arg, str)
            recs.append(Record(i, M, name=arg))
        elif kind is F:
            recs.append(Record(i, F))
        else:
            assert isinstance(arg, int)
            recs.append(Record(i, kind, off, arg, fua=fuas[i - 1], copy=not fuas[i - 1]))
    msgs = wire.encode_batch(recs, TRACE, max_body, max_group_records=per_group)
    assert all(len(m.body) <= max_body for m in msgs)
    assert decode_all(msgs) == recs
    # a group never runs past a FLUSH, a FUA record or a mark
    dec = wire.Decoder()
    for m in msgs:
        got = dec.feed(m.headers, m.body)
        if got is not None:
            for rec in got.records[:-1]:
                assert not rec.fua and rec.kind is not F and rec.kind is not M
