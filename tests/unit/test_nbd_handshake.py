"""The sans-IO handshake against byte vectors from the NBD spec, fed whole and byte by byte,
and the server and client cores talking to each other in memory."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blocktrace.errors import RemoteProtocolError
from blocktrace.nbd import wire
from blocktrace.nbd.constants import (
    BASE_ALLOCATION,
    NBD_OPT_REPLY_MAGIC,
    Info,
    Opt,
    Rep,
    TransmissionFlag,
)
from blocktrace.nbd.errors import NBDRemoteProtocolError
from blocktrace.nbd.events import NEED_DATA, ExportInfo, HandshakeAborted, HandshakeDone
from blocktrace.nbd.handshake import (
    MAX_OPTION_DATA,
    ClientHandshake,
    ServerHandshake,
    encode_info_request,
    encode_meta_context_request,
)

FLAGS = (
    TransmissionFlag.HAS_FLAGS
    | TransmissionFlag.SEND_FLUSH
    | TransmissionFlag.SEND_FUA
    | TransmissionFlag.CAN_MULTI_CONN
)
DISK = ExportInfo("disk", 1 << 20, FLAGS, description="a test disk")
OTHER = ExportInfo("other", 4096, FLAGS | TransmissionFlag.READ_ONLY)
EXPORTS = {"disk": DISK, "other": OTHER}


def lookup(name: str) -> ExportInfo | None:
    return EXPORTS.get(name or "disk")


def server() -> ServerHandshake:
    return ServerHandshake(lookup, lambda: list(EXPORTS.values()))


def opt(option: int, data: bytes = b"") -> bytes:
    return b"IHAVEOPT" + struct.pack(">II", option, len(data)) + data


def rep(option: int, reply: int, data: bytes = b"") -> bytes:
    return struct.pack(">QIII", NBD_OPT_REPLY_MAGIC, option, reply, len(data)) + data


def feed(hs: ServerHandshake, data: bytes, bytewise: bool) -> bytes:
    """Feed ``data`` whole or one byte at a time; return everything the server sent."""
    out = b""
    chunks = [data[i : i + 1] for i in range(len(data))] if bytewise else [data]
    for c in chunks:
        hs.receive_data(c)
        out += hs.data_to_send()
    return out


GREETING = bytes.fromhex("4e42444d4147494349484156454f50540003")


def test_greeting_is_fixed_newstyle_with_no_zeroes() -> None:
    hs = server()
    assert hs.data_to_send() == GREETING == b"NBDMAGICIHAVEOPT\x00\x03"
    assert hs.next_event() is NEED_DATA


@pytest.mark.parametrize("bytewise", [False, True])
def test_go_with_block_size_and_name(bytewise: bool) -> None:
    hs = server()
    hs.data_to_send()
    data = encode_info_request("", [Info.BLOCK_SIZE, Info.NAME, Info.DESCRIPTION])
    out = feed(hs, b"\x00\x00\x00\x03" + opt(Opt.GO, data), bytewise)
    assert out == (
        rep(Opt.GO, Rep.INFO, struct.pack(">HQH", 0, 1 << 20, FLAGS))
        + rep(Opt.GO, Rep.INFO, b"\x00\x01disk")
        + rep(Opt.GO, Rep.INFO, b"\x00\x02a test disk")
        + rep(Opt.GO, Rep.INFO, struct.pack(">HIII", 3, 1, 4096, 32 << 20))
        + rep(Opt.GO, Rep.ACK)
    )
    ev = hs.next_event()
    assert isinstance(ev, HandshakeDone)
    assert ev.export is DISK and not ev.structured_replies and not ev.via_export_name


@pytest.mark.parametrize("bytewise", [False, True])
def test_export_name_reply_with_and_without_zeroes(bytewise: bool) -> None:
    for cflags, pad in ((3, b""), (1, bytes(124))):
        hs = server()
        hs.data_to_send()
        out = feed(hs, struct.pack(">I", cflags) + opt(Opt.EXPORT_NAME, b"other"), bytewise)
        assert out == struct.pack(">QH", 4096, OTHER.flags) + pad
        ev = hs.next_event()
        assert isinstance(ev, HandshakeDone) and ev.via_export_name and ev.export is OTHER


def test_export_name_unknown_aborts() -> None:
    hs = server()
    feed(hs, b"\x00\x00\x00\x03" + opt(Opt.EXPORT_NAME, b"nope"), False)
    ev = hs.next_event()
    assert isinstance(ev, HandshakeAborted) and "nope" in ev.reason


def test_go_unknown_export_is_err_unknown_and_haggling_continues() -> None:
    hs = server()
    hs.data_to_send()
    out = feed(hs, b"\x00\x00\x00\x03" + opt(Opt.GO, encode_info_request("nope", [])), False)
    assert out.startswith(rep(Opt.GO, Rep.ERR_UNKNOWN)[:16])
    assert hs.next_event() is NEED_DATA
    feed(hs, opt(Opt.GO, encode_info_request("other", [])), False)
    ev = hs.next_event()
    assert isinstance(ev, HandshakeDone) and ev.export is OTHER


def test_list_then_abort() -> None:
    hs = server()
    hs.data_to_send()
    out = feed(hs, b"\x00\x00\x00\x03" + opt(Opt.LIST) + opt(Opt.ABORT), True)
    assert out == (
        rep(Opt.LIST, Rep.SERVER, b"\x00\x00\x00\x04diska test disk")
        + rep(Opt.LIST, Rep.SERVER, b"\x00\x00\x00\x05other")
        + rep(Opt.LIST, Rep.ACK)
        + rep(Opt.ABORT, Rep.ACK)
    )
    assert isinstance(hs.next_event(), HandshakeAborted)


@pytest.mark.parametrize(
    ("option", "data", "reply"),
    [
        (Opt.LIST, b"x", Rep.ERR_INVALID),
        (Opt.STRUCTURED_REPLY, b"x", Rep.ERR_INVALID),
        (Opt.STARTTLS, b"", Rep.ERR_UNSUP),
        (Opt.EXTENDED_HEADERS, b"", Rep.ERR_UNSUP),
        (Opt.PEEK_EXPORT, b"", Rep.ERR_UNSUP),
        (99, b"whatever", Rep.ERR_UNSUP),
        (Opt.INFO, b"\x00\x00", Rep.ERR_INVALID),  # too short
        (Opt.INFO, b"\x00\x00\x00\x09disk\x00\x00", Rep.ERR_INVALID),  # name overruns
        (Opt.GO, b"\x00\x00\x00\x04disk\x00\x02\x00\x03", Rep.ERR_INVALID),  # count mismatch
        (Opt.GO, b"\x00\x00\x00\x02\xff\xfe\x00\x00", Rep.ERR_INVALID),  # not UTF-8
        # SET_META_CONTEXT before STRUCTURED_REPLY
        (Opt.SET_META_CONTEXT, encode_meta_context_request("", [BASE_ALLOCATION]), Rep.ERR_INVALID),
    ],
)
def test_bad_or_unsupported_options_get_errors_and_parsing_continues(
    option: int, data: bytes, reply: Rep
) -> None:
    hs = server()
    hs.data_to_send()
    out = feed(hs, b"\x00\x00\x00\x03" + opt(option, data), False)
    magic, echoed, rtype, length = wire.OPTION_REPLY.unpack_from(out, 0)
    assert (magic, echoed, rtype) == (NBD_OPT_REPLY_MAGIC, option, reply)
    assert len(out) == 20 + length  # the error carries a message and nothing else
    # the next option still parses
    out = feed(hs, opt(Opt.GO, encode_info_request("", [])), False)
    assert isinstance(hs.next_event(), HandshakeDone)


def test_oversized_option_is_discarded_with_err_too_big() -> None:
    hs = server()
    hs.data_to_send()
    big = MAX_OPTION_DATA + 10
    out = feed(hs, b"\x00\x00\x00\x03" + opt(Opt.LIST_META_CONTEXT, bytes(big)), False)
    assert wire.OPTION_REPLY.unpack_from(out, 0)[2] == Rep.ERR_TOO_BIG
    feed(hs, opt(Opt.GO, encode_info_request("", [])), False)
    assert isinstance(hs.next_event(), HandshakeDone)


def test_meta_contexts_list_and_set() -> None:
    hs = server()
    hs.data_to_send()
    feed(hs, b"\x00\x00\x00\x03" + opt(Opt.STRUCTURED_REPLY), False)
    assert hs.data_to_send() == b""
    out = feed(hs, opt(Opt.LIST_META_CONTEXT, encode_meta_context_request("disk", [])), False)
    assert out == rep(9, Rep.META_CONTEXT, b"\x00\x00\x00\x00base:allocation") + rep(9, Rep.ACK)
    out = feed(
        hs,
        opt(Opt.SET_META_CONTEXT, encode_meta_context_request("disk", ["qemu:x", BASE_ALLOCATION])),
        True,
    )
    assert out == rep(10, Rep.META_CONTEXT, b"\x00\x00\x00\x01base:allocation") + rep(10, Rep.ACK)
    out = feed(hs, opt(Opt.GO, encode_info_request("disk", [])), False)
    ev = hs.next_event()
    assert isinstance(ev, HandshakeDone)
    assert ev.structured_replies and ev.meta_contexts == {1: BASE_ALLOCATION}


def test_contexts_for_another_export_are_dropped() -> None:
    hs = server()
    feed(hs, b"\x00\x00\x00\x03" + opt(Opt.STRUCTURED_REPLY), False)
    feed(
        hs,
        opt(Opt.SET_META_CONTEXT, encode_meta_context_request("other", [BASE_ALLOCATION])),
        False,
    )
    feed(hs, opt(Opt.GO, encode_info_request("disk", [])), False)
    ev = hs.next_event()
    assert isinstance(ev, HandshakeDone) and ev.meta_contexts == {}


@pytest.mark.parametrize(
    "data",
    [
        b"\x00\x00\x00\x04",  # unknown client flag
        b"\x00\x00\x00\x03" + b"IHAVEOPX" + bytes(8),  # bad option magic
        b"\x00\x00\x00\x03" + opt(Opt.EXPORT_NAME, b"\xff"),  # undecodable export name
        b"\x00\x00\x00\x03" + b"IHAVEOPT" + struct.pack(">II", 1, MAX_OPTION_DATA + 1),
    ],
)
@pytest.mark.parametrize("bytewise", [False, True])
def test_garbage_is_a_protocol_error_and_sticks(data: bytes, bytewise: bool) -> None:
    hs = server()
    with pytest.raises(NBDRemoteProtocolError):
        feed(hs, data, bytewise)
    with pytest.raises(NBDRemoteProtocolError):
        hs.receive_data(b"x")


def test_truncated_handshake_just_needs_more_data() -> None:
    hs = server()
    feed(hs, b"\x00\x00\x00\x03" + opt(Opt.GO, encode_info_request("", []))[:-1], True)
    assert hs.next_event() is NEED_DATA


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300), st.booleans())
def test_any_bytes_parse_or_raise_remote_protocol_error(data: bytes, bytewise: bool) -> None:
    hs = server()
    try:
        feed(hs, b"\x00\x00\x00\x03" + data if data[:1] == b"I" else data, bytewise)
        while hs.next_event() is not NEED_DATA:
            pass
    except RemoteProtocolError:
        pass


def pair(client: ClientHandshake, srv: ServerHandshake) -> HandshakeDone:
    """Shuttle bytes between the two cores until the client is done."""
    for _ in range(50):
        srv_out = srv.data_to_send()
        if srv_out:
            client.receive_data(srv_out)
        ev = client.next_event()
        if isinstance(ev, HandshakeDone):
            return ev
        cli_out = client.data_to_send()
        if cli_out:
            srv.receive_data(cli_out)
    raise AssertionError("handshake did not finish")


def test_client_and_server_negotiate_structured_and_base_allocation() -> None:
    srv = server()
    ev = pair(ClientHandshake("disk"), srv)
    assert ev.structured_replies and ev.meta_contexts == {1: BASE_ALLOCATION}
    assert ev.export.size == DISK.size
    # structured replies on: SEND_DF is added (every READ reply is a single chunk)
    assert ev.export.flags == DISK.flags | TransmissionFlag.SEND_DF
    assert ev.export.description == "a test disk" and ev.export.max_block == 32 << 20
    sev = srv.next_event()
    assert isinstance(sev, HandshakeDone) and sev.meta_contexts == ev.meta_contexts


def test_client_without_structured_replies() -> None:
    ev = pair(ClientHandshake("other", structured_replies=False), server())
    assert not ev.structured_replies and ev.meta_contexts == {}
    assert ev.export.flags == OTHER.flags  # READ_ONLY, and no SEND_DF without structured


def test_client_falls_back_to_export_name_when_go_unsupported() -> None:
    srv = server()
    srv.HANDLERS = {k: v for k, v in ServerHandshake.HANDLERS.items() if k != Opt.GO}
    ev = pair(ClientHandshake("other"), srv)
    assert ev.via_export_name and ev.export.size == 4096


def test_client_reports_unknown_export() -> None:
    with pytest.raises(NBDRemoteProtocolError, match="ERR_UNKNOWN"):
        pair(ClientHandshake("missing"), server())
