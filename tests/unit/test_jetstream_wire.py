"""The JetStream wire format: encode/decode round trips, splitting, and a decoder that reads
untrusted messages (fuzzed): only FormatError, bounded reassembly memory."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blocktrace.errors import FormatError, UsageError
from blocktrace.jetstream import wire
from blocktrace.jetstream.conn import NatsURL, StreamSettings, default_stream_name
from blocktrace.stream.records import Record, RecordKind

TRACE = "0123456789abcdef"


def roundtrip(records: list[Record], max_body: int) -> list[Record]:
    dec = wire.Decoder()
    out = []
    for rec in records:
        msgs = wire.encode(rec, TRACE, max_body)
        for i, msg in enumerate(msgs):
            got = dec.feed(msg.headers, msg.body)
            if i < len(msgs) - 1:
                assert got is None and dec.in_record
            else:
                assert got is not None and got.trace == TRACE
                (record,) = got.records
                out.append(record)
    assert dec.pending_bytes == 0 and not dec.in_record
    return out


def test_every_kind_round_trips() -> None:
    recs = [
        Record(1, RecordKind.WRITE, 4096, 8, data=b"abcdefgh"),
        Record(2, RecordKind.WRITE, 0, 4, fua=True, data=b"\0\1\2\3"),
        Record(3, RecordKind.ZERO, 512, 1 << 20, fua=True),
        Record(4, RecordKind.TRIM, 1 << 30, 4096),
        Record(5, RecordKind.FLUSH),
        Record(6, RecordKind.MARK, name="before-upgrade ✓"),
        Record(7, RecordKind.WRITE, 0, 3, data=b"xyz", copy=True),
    ]
    assert roundtrip(recs, 1 << 20) == recs


def test_large_write_is_split_and_reassembled_losslessly() -> None:
    data = bytes(range(256)) * 1000 + b"tail"
    rec = Record(9, RecordKind.WRITE, 8192, len(data), fua=True, data=data)
    msgs = wire.encode(rec, TRACE, 4096)
    assert len(msgs) == -(-len(data) // 4096)
    assert all(len(m.body) <= 4096 for m in msgs)
    assert len({m.msg_id for m in msgs}) == len(msgs)  # each chunk de-duplicated on its own
    assert msgs[0].headers["Bt-Chunk"] == f"0/{len(msgs)}"
    assert roundtrip([rec], 4096) == [rec]


def test_message_ids_are_stable_for_a_resend() -> None:
    rec = Record(42, RecordKind.WRITE, 0, 4, data=b"abcd")
    assert wire.encode(rec, TRACE, 4096) == wire.encode(rec, TRACE, 4096)
    assert wire.encode(rec, TRACE, 4096)[0].msg_id == f"{TRACE}.42.0"


def test_reassembly_bound_refuses_huge_record_before_buffering() -> None:
    dec = wire.Decoder(max_record_bytes=1 << 20)
    rec = Record(1, RecordKind.WRITE, 0, 2 << 20, data=b"\0" * (2 << 20))
    first = wire.encode(rec, TRACE, 1 << 16)[0]
    with pytest.raises(FormatError, match="reassembly bound"):
        dec.feed(first.headers, first.body)
    assert dec.pending_bytes == 0


def test_chunks_beyond_declared_length_are_refused() -> None:
    rec = Record(1, RecordKind.WRITE, 0, 8192, data=b"a" * 8192)
    m0, m1 = wire.encode(rec, TRACE, 4096)
    dec = wire.Decoder()
    assert dec.feed(m0.headers, m0.body) is None
    with pytest.raises(FormatError, match="exceed"):
        dec.feed(m1.headers, m1.body + b"extra")


def test_out_of_order_chunk_is_refused() -> None:
    rec = Record(1, RecordKind.WRITE, 0, 12288, data=b"a" * 12288)
    m0, _m1, m2 = wire.encode(rec, TRACE, 4096)
    dec = wire.Decoder()
    dec.feed(m0.headers, m0.body)
    with pytest.raises(FormatError, match="out of order"):
        dec.feed(m2.headers, m2.body)


def test_record_torn_by_a_dead_publisher_is_dropped_and_counted() -> None:
    big = Record(1, RecordKind.WRITE, 0, 8192, data=b"a" * 8192)
    m0 = wire.encode(big, TRACE, 4096)[0]
    after = Record(2, RecordKind.WRITE, 0, 4, data=b"next")
    (m,) = wire.encode(after, "fedcba9876543210", 4096)
    dec = wire.Decoder()
    assert dec.feed(m0.headers, m0.body) is None
    got = dec.feed(m.headers, m.body)
    assert got is not None and list(got.records) == [after]
    assert dec.torn == 1 and dec.pending_bytes == 0


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"Bt-V": "3"}, "version"),
        ({"Bt-Trace": "../x"}, "Bt-Trace"),
        ({"Bt-Seq": "-1"}, "Bt-Seq"),
        ({"Bt-Kind": "rm -rf"}, "Bt-Kind"),
        ({"Bt-Off": "1e9"}, "Bt-Off"),
        ({"Bt-Len": "5"}, "data bytes"),
        ({"Bt-Flags": "evil"}, "flag"),
        ({"Bt-Chunk": "0/1"}, "chunk"),
    ],
)
def test_bad_headers_are_one_line_format_errors(change: dict[str, str], match: str) -> None:
    (msg,) = wire.encode(Record(1, RecordKind.WRITE, 0, 4, data=b"abcd"), TRACE, 4096)
    with pytest.raises(FormatError, match=match):
        wire.Decoder().feed({**msg.headers, **change}, msg.body)


header_values = st.one_of(
    st.text(max_size=30),
    st.integers(min_value=-5, max_value=1 << 70).map(str),
    st.sampled_from(["write", "zero", "trim", "flush", "mark", "1", TRACE, "0/2", "1/2", "fua"]),
)
messages = st.tuples(
    st.dictionaries(
        st.sampled_from([h[0] for h in wire.HEADERS]), header_values, max_size=len(wire.HEADERS)
    ),
    st.binary(max_size=64),
)


@settings(max_examples=400, deadline=None)
@given(st.lists(messages, max_size=12), st.integers(0, 5))
def test_fuzz_decoder_raises_only_format_error_and_stays_bounded(
    msgs: list[tuple[dict[str, str], bytes]], valid_prefix: int
) -> None:
    dec = wire.Decoder(max_record_bytes=256)
    base = {"Bt-V": "1", "Bt-Trace": TRACE}
    for i, (headers, body) in enumerate(msgs):
        if i < valid_prefix:
            headers = {**base, **headers}  # get past the first checks more often
        try:
            got = dec.feed(headers, body)
        except FormatError:
            continue
        assert dec.pending_bytes <= 256
        for rec in got.records if got is not None else ():
            if rec.data is not None:
                assert len(rec.data) == rec.length <= 256


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 1 << 40), st.binary(min_size=1, max_size=20000), st.booleans()),
        max_size=8,
    ),
    st.integers(4096, 9000),
)
def test_fuzz_round_trip_of_writes(items: list[tuple[int, bytes, bool]], max_body: int) -> None:
    recs = [
        Record(i + 1, RecordKind.WRITE, off, len(data), fua=fua, data=data)
        for i, (off, data, fua) in enumerate(items)
    ]
    assert roundtrip(recs, max_body) == recs


def test_chunk_size_leaves_room_for_headers() -> None:
    assert wire.chunk_size(1 << 20) == (1 << 20) - wire.HEADER_BUDGET
    with pytest.raises(FormatError):
        wire.chunk_size(2048)
    rec = Record(123456789, RecordKind.WRITE, 1 << 40, 1 << 25, fua=True, copy=True, data=b"")
    headers = wire.encode(rec._replace(data=b"a" * 5000), TRACE, 4096)[0].headers
    size = sum(len(k) + len(v) + 4 for k, v in headers.items()) + 64  # + expected-seq, framing
    assert size < wire.HEADER_BUDGET


def test_urls_and_stream_settings() -> None:
    url = NatsURL.parse("nats://127.0.0.1:4333/vm1.disk")
    assert (url.host, url.port, url.subject, url.server) == (
        "127.0.0.1",
        4333,
        "vm1.disk",
        "nats://127.0.0.1:4333",
    )
    assert str(NatsURL.parse("nats://[::1]:5/a")) == "nats://[::1]:5/a"
    for bad in ("http://h/a", "nats://h:1/a.*", "nats://h:1/", "nats://u:p@h/a", "nats://h:x/a"):
        with pytest.raises(UsageError):
            NatsURL.parse(bad)
    assert default_stream_name("vm1.disk") == "BT_vm1_disk"
    opts = {"replicas": "3", "retention": "interest", "max-bytes": "1M", "other": "x"}
    s = StreamSettings.pop("a.b", opts)
    assert (s.replicas, s.retention, s.max_bytes, opts) == (3, "interest", 1 << 20, {"other": "x"})
    for bad_opts in ({"replicas": "9"}, {"retention": "x"}, {"stream": "a.b"}):
        with pytest.raises(UsageError):
            StreamSettings.pop("a", dict(bad_opts))
