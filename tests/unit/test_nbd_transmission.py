"""Transmission core: request parsing (whole and byte by byte), validation, reply bytes."""

from __future__ import annotations

import contextlib
import errno as E
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blocktrace.block.device import Extent, ExtentFlags
from blocktrace.errors import RemoteProtocolError
from blocktrace.nbd import wire
from blocktrace.nbd.constants import Cmd, CmdFlag, NBDError, ReplyType, TransmissionFlag
from blocktrace.nbd.errors import NBDRemoteProtocolError, NBDRequestError, nbd_error
from blocktrace.nbd.events import (
    NEED_DATA,
    PayloadNeeded,
    PayloadRefused,
    ReplyChunk,
    Request,
    SimpleReply,
)
from blocktrace.nbd.transmission import (
    REQUEST_SIZE,
    ReplyParser,
    RequestParser,
    Session,
    block_status_descriptors,
    encode_block_status,
    encode_error,
    encode_read_header,
    encode_request,
    validate_request,
)

TF = TransmissionFlag
ALL = (
    TF.HAS_FLAGS
    | TF.SEND_FLUSH
    | TF.SEND_FUA
    | TF.SEND_TRIM
    | TF.SEND_WRITE_ZEROES
    | TF.SEND_FAST_ZERO
    | TF.SEND_CACHE
    | TF.CAN_MULTI_CONN
)
SIZE = 1 << 20


def session(**kw: object) -> Session:
    args: dict[str, object] = {
        "size": SIZE,
        "flags": ALL,
        "structured": True,
        "meta_contexts": {1: "base:allocation"},
    }
    args.update(kw)
    return Session(**args)  # type: ignore[arg-type]


# spec layout: magic 0x25609513, u16 flags, u16 type, u64 cookie, u64 offset, u32 length
WRITE_VECTOR = bytes.fromhex("25609513000100010102030405060708000000000000100000000004") + b"abcd"
READ_VECTOR = bytes.fromhex("256095130000000000000000000000ff000000000000020000000200")


def parse_all(
    p: RequestParser, data: bytes, *, bytewise: bool = False, framed: bool = False
) -> list[object]:
    """Drive the server's parser as the server does: bytes arrive into a buffer, events are
    asked for until NEED_DATA; payload bytes an event hands out (a PayloadNeeded's rest, a
    PayloadRefused's skip) are taken off the stream by the caller before parsing goes on.
    ``framed``: complete in-place requests are framed a receive at a time with
    :meth:`RequestParser.frame` first, :meth:`~RequestParser.next_event` asked only about
    what it stops at (the server's connection does this)."""
    events: list[object] = []
    buf = bytearray()
    pos = 0
    owed = 0
    chunks = [data[i : i + 1] for i in range(len(data))] if bytewise else [data]
    for chunk in chunks:
        buf += chunk
        while True:
            if owed:
                n = min(owed, len(buf) - pos)
                pos += n
                owed -= n
                if owed:
                    break
            view = memoryview(bytes(buf))
            if framed:
                reqs, framed_to = p.frame(view, pos, len(view))
                for req in reqs:
                    pos += REQUEST_SIZE + (0 if req.data is None else len(req.data))
                    data_ = None if req.data is None else bytes(req.data)
                    events.append(req._replace(data=data_))
                assert pos == framed_to
            ev, after = p.next_event(view, pos, len(view))
            if framed:
                assert type(ev) is not Request  # frame took every complete one
            if ev is NEED_DATA:
                assert after == pos
                break
            assert after > pos
            pos = after
            if isinstance(ev, Request) and ev.data is not None:
                ev = Request(ev.command, ev.flags, ev.cookie, ev.offset, ev.length, bytes(ev.data))
            elif isinstance(ev, PayloadNeeded):
                owed = ev.request.length - len(ev.first)
            elif isinstance(ev, PayloadRefused):
                owed = ev.skip
            events.append(ev)
    return events


@pytest.mark.parametrize("framed", [False, True])
@pytest.mark.parametrize("bytewise", [False, True])
def test_request_vectors(bytewise: bool, framed: bool) -> None:
    events = parse_all(
        RequestParser(), WRITE_VECTOR + READ_VECTOR, bytewise=bytewise, framed=framed
    )
    assert events == [
        Request(Cmd.WRITE, CmdFlag.FUA, 0x0102030405060708, 0x1000, 4, b"abcd"),
        Request(Cmd.READ, 0, 0xFF, 0x200, 0x200),
    ]
    assert encode_request(Cmd.READ, 0xFF, 0x200, 0x200) == READ_VECTOR


def test_bad_request_magic_is_a_protocol_error() -> None:
    data = memoryview(b"\x25\x60\x95\x14" + READ_VECTOR[4:])
    with pytest.raises(NBDRemoteProtocolError):
        RequestParser().next_event(data, 0, len(data))


def test_oversized_write_payload_is_refused_and_skipped_never_stored() -> None:
    p = RequestParser(max_payload=8)
    data = encode_request(Cmd.WRITE, 1, 0, 16) + bytes(6)
    ev, after = p.next_event(memoryview(data), 0, len(data))
    assert isinstance(ev, PayloadRefused) and ev.skip == 10 and after == len(data)
    assert ev.request.length == 16 and ev.request.data is None
    events = parse_all(p, encode_request(Cmd.WRITE, 1, 0, 16) + bytes(16) + READ_VECTOR)
    assert isinstance(events[0], PayloadRefused)
    assert events[1] == Request(Cmd.READ, 0, 0xFF, 0x200, 0x200)


def test_a_large_write_payload_is_handed_out_not_buffered() -> None:
    """Past the caller's buffer size the parser asks for a buffer of the payload's own,
    giving the bytes already here as a view: it never waits for (or copies) 32 MiB."""
    p = RequestParser(inline_limit=64)
    data = encode_request(Cmd.WRITE, 7, 4096, 1 << 20) + b"x" * 10
    ev, after = p.next_event(memoryview(data), 0, len(data))
    assert isinstance(ev, PayloadNeeded) and after == len(data)
    assert ev.request.length == 1 << 20 and bytes(ev.first) == b"x" * 10
    # within the limit, a partial payload waits in the caller's buffer instead
    small = memoryview(encode_request(Cmd.WRITE, 7, 0, 30) + b"x" * 10)
    assert p.next_event(small, 0, len(small)) == (NEED_DATA, 0)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.binary(max_size=400), st.booleans())
def test_any_bytes_parse_or_raise_remote_protocol_error(data: bytes, bytewise: bool) -> None:
    with contextlib.suppress(RemoteProtocolError):
        parse_all(RequestParser(max_payload=64, inline_limit=96), data, bytewise=bytewise)


def _outcome(p: RequestParser, data: bytes, bytewise: bool, framed: bool) -> object:
    try:
        return parse_all(p, data, bytewise=bytewise, framed=framed)
    except RemoteProtocolError as exc:
        return type(exc)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(
    st.lists(
        st.tuples(
            st.sampled_from([Cmd.READ, Cmd.WRITE, Cmd.FLUSH, Cmd.TRIM, 99]),
            st.integers(0, 120),
            st.booleans(),
        ),
        max_size=12,
    ),
    st.binary(max_size=8),
    st.booleans(),
)
def test_frame_agrees_with_next_event(
    reqs: list[tuple[int, int, bool]], tail: bytes, bytewise: bool
) -> None:
    """Framing a receive at once gives exactly the events (and the protocol errors) of asking
    request by request: one framing, two entry points."""
    data = b""
    for i, (cmd, length, bad_magic) in enumerate(reqs):
        head = encode_request(cmd, i, 512 * i, length)
        if bad_magic and i == len(reqs) - 1:
            head = b"\x00" + head[1:]
        data += head + (bytes([i]) * length if cmd == Cmd.WRITE else b"")
    data += tail
    p = RequestParser(max_payload=64, inline_limit=96)
    assert _outcome(p, data, bytewise, True) == _outcome(p, data, bytewise, False)


BAD = [
    # (session kwargs, cmd, flags, offset, length, errno)
    ({}, 9, 0, 0, 512, E.EINVAL),  # unknown command
    ({}, Cmd.READ, 0x40, 0, 512, E.EINVAL),  # unknown flag
    ({}, Cmd.READ, CmdFlag.DF, 0, 512, E.EINVAL),  # DF not advertised
    ({}, Cmd.WRITE, CmdFlag.NO_HOLE, 0, 512, E.EINVAL),  # NO_HOLE only on WRITE_ZEROES
    ({}, Cmd.READ, CmdFlag.REQ_ONE, 0, 512, E.EINVAL),
    ({}, Cmd.READ, 0, SIZE - 511, 512, E.EINVAL),  # past the end
    ({}, Cmd.READ, 0, (1 << 64) - 1, 512, E.EINVAL),  # offset + length overflows u64
    ({}, Cmd.WRITE, 0, SIZE, 1, E.ENOSPC),
    ({}, Cmd.WRITE_ZEROES, 0, SIZE - 1, 2, E.ENOSPC),
    ({}, Cmd.TRIM, 0, SIZE, 1, E.EINVAL),
    ({}, Cmd.READ, 0, 0, 0, E.EINVAL),  # zero length
    ({}, Cmd.READ, 0, 0, (32 << 20) + 1, E.EOVERFLOW),  # over the maximum payload
    ({}, Cmd.FLUSH, 0, 0, 1, E.EINVAL),
    ({}, Cmd.DISC, 0, 1, 0, E.EINVAL),
    ({"flags": ALL | TF.READ_ONLY}, Cmd.WRITE, 0, 0, 512, E.EROFS),
    ({"flags": ALL | TF.READ_ONLY}, Cmd.TRIM, 0, SIZE, 512, E.EROFS),  # read-only wins
    ({"flags": ALL & ~TF.SEND_TRIM}, Cmd.TRIM, 0, 0, 512, E.EINVAL),
    ({"flags": ALL & ~TF.SEND_FAST_ZERO}, Cmd.WRITE_ZEROES, CmdFlag.FAST_ZERO, 0, 512, E.EINVAL),
    ({"structured": False}, Cmd.BLOCK_STATUS, 0, 0, 512, E.EINVAL),
    ({"meta_contexts": {}}, Cmd.BLOCK_STATUS, 0, 0, 512, E.EINVAL),
    ({"min_block": 512}, Cmd.READ, 0, 1, 512, E.EINVAL),
]


@pytest.mark.parametrize(("kw", "cmd", "flags", "offset", "length", "err"), BAD)
def test_validate_request_refusals(
    kw: dict[str, object], cmd: int, flags: int, offset: int, length: int, err: int
) -> None:
    with pytest.raises(NBDRequestError) as info:
        validate_request(session(**kw), cmd, flags, offset, length)
    assert info.value.errno == err
    assert str(info.value).startswith("invalid request: ")


@pytest.mark.parametrize(
    ("cmd", "flags", "offset", "length"),
    [
        (Cmd.READ, 0, 0, SIZE),
        (Cmd.READ, CmdFlag.FUA, SIZE - 1, 1),  # FUA is accepted on any command
        (Cmd.WRITE, CmdFlag.FUA, 0, 4096),
        (Cmd.FLUSH, 0, 0, 0),
        (Cmd.DISC, 0, 0, 0),
        (Cmd.TRIM, CmdFlag.FUA, 0, SIZE),
        (Cmd.WRITE_ZEROES, CmdFlag.NO_HOLE | CmdFlag.FAST_ZERO | CmdFlag.FUA, 0, SIZE),
        (Cmd.CACHE, 0, 0, SIZE),
        (Cmd.BLOCK_STATUS, CmdFlag.REQ_ONE, 0, SIZE),
    ],
)
def test_validate_request_accepts(cmd: int, flags: int, offset: int, length: int) -> None:
    validate_request(session(), cmd, flags, offset, length)


def test_df_needs_send_df() -> None:
    validate_request(session(flags=ALL | TF.SEND_DF), Cmd.READ, CmdFlag.DF, 0, 65536)
    with pytest.raises(NBDRequestError):
        validate_request(session(flags=ALL | TF.SEND_DF), Cmd.WRITE, CmdFlag.DF, 0, 512)


def test_errno_mapping() -> None:
    assert nbd_error(E.EROFS) == NBDError.EPERM
    assert nbd_error(E.EDQUOT) == nbd_error(E.EFBIG) == NBDError.ENOSPC
    assert nbd_error(E.EOPNOTSUPP) == NBDError.ENOTSUP
    assert nbd_error(E.EBADF) == NBDError.EIO
    assert nbd_error(E.EOVERFLOW) == 75 and nbd_error(E.ESHUTDOWN) == 108


def test_reply_bytes() -> None:
    s = session()
    assert wire.pack_simple_reply(7, 28) == bytes.fromhex("674466980000001c0000000000000007")
    # structured READ: one OFFSET_DATA chunk flagged DONE, length = 8 + data
    assert encode_read_header(s, 7, 0x200, 4) == bytes.fromhex(
        "668e33ef0001000100000000000000070000000c0000000000000200"
    )
    assert encode_read_header(session(structured=False), 7, 0, 4) == wire.pack_simple_reply(7)
    # READ errors are structured ERROR chunks once negotiated, simple replies otherwise
    assert (
        encode_error(s, 7, Cmd.READ, E.EINVAL, "bad")
        == bytes.fromhex("668e33ef00018001000000000000000700000009000000160003") + b"bad"
    )
    assert encode_error(s, 7, Cmd.WRITE, E.EROFS) == wire.pack_simple_reply(7, 1)
    assert encode_block_status(s, 9, [(4096, 3), (512, 0)]) == bytes.fromhex(
        "668e33ef000100050000000000000009000000140000000100001000000000030000020000000000"
    )


def test_block_status_descriptors() -> None:
    H, Z, D = ExtentFlags.HOLE, ExtentFlags.ZERO, ExtentFlags.DATA
    ext = [Extent(100, D), Extent(50, D), Extent(10, H | Z), Extent(1000, D)]
    assert block_status_descriptors(ext, 200, False) == [(150, 0), (10, 3), (40, 0)]
    assert block_status_descriptors(ext, 200, True) == [(150, 0)]
    assert block_status_descriptors([], 64, False) == [(64, 0)]
    assert block_status_descriptors([Extent(0, H)], 64, False) == [(64, 0)]


def test_reply_parser_simple_and_structured() -> None:
    p = ReplyParser(lambda cookie: 4 if cookie == 1 else 0)
    data = (
        wire.pack_simple_reply(2, 5)
        + wire.pack_simple_reply(1)
        + b"wxyz"
        + wire.pack_chunk_offset_data_header(3, 0, 2)
        + b"hi"
        + wire.pack_chunk_none(4)
    )
    out = []
    pos = 0
    for i in range(len(data)):  # a byte at a time: every NEED_DATA path
        view = memoryview(data)[: i + 1]
        while True:
            ev, after = p.next_event(view, pos, len(view))
            if ev is NEED_DATA:
                assert after == pos
                break
            pos = after
            out.append(ev)
    assert out[0] == SimpleReply(2, 5, None)
    assert out[1] == SimpleReply(1, 0, memoryview(b"wxyz"))
    assert out[2] == ReplyChunk(3, 1, ReplyType.OFFSET_DATA, struct.pack(">Q", 0) + b"hi")
    assert out[3] == ReplyChunk(4, 1, ReplyType.NONE, b"")
    with pytest.raises(NBDRemoteProtocolError):
        p.next_event(memoryview(b"\x00" * 20), 0, 20)


def test_reply_parser_bounds_chunk_payloads() -> None:
    p = ReplyParser(lambda cookie: 0, max_chunk=1024)
    header = memoryview(wire.pack_chunk_offset_data_header(3, 0, 2048))
    with pytest.raises(NBDRemoteProtocolError, match="too large"):
        p.next_event(header, 0, len(header))
