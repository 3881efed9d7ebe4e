"""Bounded-time fuzzing of the NBD server's parsers, in the normal suite (issue 10, "Done
when"): the handshake core, the request framing, and the live server behind both.

Byte-flip loops with fixed seeds and counts (reproducible, a few seconds each, no hypothesis
deadline flakiness): valid transcripts are mutated (bytes flipped, inserted, deleted, the
stream cut) and fed in random chunks.  Asserted: only the documented error type
(:class:`~blocktrace.errors.RemoteProtocolError`) escapes a core, each core's buffering stays
bounded, every feed ends (no loop without progress), and the live server answers or drops
each hostile connection, logs no internal error, keeps its memory bounded, and still serves
a well-behaved client afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import tracemalloc
from pathlib import Path

import pytest
from tests.unit.test_nbd_handshake import EXPORTS, lookup
from tests.unit.test_nbd_server import Client, GatedDevice, serve

from blocktrace.errors import RemoteProtocolError
from blocktrace.nbd import wire
from blocktrace.nbd.constants import BASE_ALLOCATION, IHAVEOPT, ClientFlag, Cmd, Info, Opt
from blocktrace.nbd.events import NEED_DATA, HandshakeAborted, HandshakeDone
from blocktrace.nbd.handshake import (
    MAX_OPTION_DATA,
    ServerHandshake,
    encode_info_request,
    encode_meta_context_request,
)
from blocktrace.nbd.limits import ServerLimits
from blocktrace.nbd.transmission import REQUEST_SIZE, RequestParser, Session, validate_request

MiB = 1024 * 1024


def opt(option: int, data: bytes = b"") -> bytes:
    return wire.OPTION.pack(IHAVEOPT, option, len(data)) + data


def handshake_transcript(rng: random.Random) -> bytes:
    """A valid client side of fixed-newstyle negotiation, options in a random order."""
    flags = int(ClientFlag.C_FIXED_NEWSTYLE | ClientFlag.C_NO_ZEROES)
    options = [
        opt(Opt.STRUCTURED_REPLY),
        opt(Opt.LIST),
        opt(Opt.LIST_META_CONTEXT, encode_meta_context_request("disk", [BASE_ALLOCATION])),
        opt(Opt.SET_META_CONTEXT, encode_meta_context_request("disk", [BASE_ALLOCATION])),
        opt(Opt.INFO, encode_info_request("disk", [Info.BLOCK_SIZE, Info.DESCRIPTION])),
        opt(99, b"unknown option data"),
    ]
    rng.shuffle(options)
    end = opt(Opt.GO, encode_info_request("disk", [Info.BLOCK_SIZE]))
    if rng.random() < 0.2:
        end = opt(Opt.EXPORT_NAME, b"disk")
    return wire.U32.pack(flags) + b"".join(options[: rng.randint(0, len(options))]) + end


def requests_transcript(rng: random.Random) -> bytes:
    out = bytearray()
    for i in range(rng.randint(1, 6)):
        cmd = rng.choice([Cmd.READ, Cmd.WRITE, Cmd.FLUSH, Cmd.TRIM, Cmd.WRITE_ZEROES])
        length = 0 if cmd == Cmd.FLUSH else rng.choice([512, 4096, 70_000])
        out += wire.pack_request(cmd, i, rng.choice([0, 4096]), length, 0)
        if cmd == Cmd.WRITE:
            out += rng.randbytes(length)
    return bytes(out)


def mutate(rng: random.Random, data: bytes) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        what = rng.random()
        pos = rng.randrange(len(b) + 1)
        if what < 0.6 and b:
            b[min(pos, len(b) - 1)] ^= 1 << rng.randrange(8)
        elif what < 0.75:
            b[pos:pos] = rng.randbytes(rng.randint(1, 8))
        elif what < 0.9 and b:
            del b[pos : pos + rng.randint(1, 8)]
        else:
            # a length field blown up: the classic "announce a huge size" attack
            b[pos:pos] = b"\xff\xff\xff\xf0"
    return bytes(b)


def chunks(rng: random.Random, data: bytes) -> list[bytes]:
    out, pos = [], 0
    while pos < len(data):
        n = rng.choice([1, 3, 16, 64, 1 << 16])
        out.append(data[pos : pos + n])
        pos += n
    return out


def test_fuzz_handshake_core() -> None:
    """3000 mutated negotiations: each ends in HandshakeDone, HandshakeAborted, NEED_DATA or
    RemoteProtocolError, never another exception; the core's input buffer never holds more
    than one option's worth (MAX_OPTION_DATA plus its header)."""
    rng = random.Random(0xB10C)
    outcomes: dict[str, int] = {}
    for _ in range(3000):
        hs = ServerHandshake(lookup, lambda: list(EXPORTS.values()))
        data = mutate(rng, handshake_transcript(rng))
        outcome = "need-data"
        try:
            for piece in chunks(rng, data):
                hs.receive_data(piece)
                hs.data_to_send()
                assert len(hs._buf) <= MAX_OPTION_DATA + wire.OPTION.size + len(piece)
                ev = hs.next_event()
                if isinstance(ev, HandshakeDone | HandshakeAborted):
                    outcome = type(ev).__name__
                    break
                assert ev is NEED_DATA
        except RemoteProtocolError:
            outcome = "protocol-error"
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    # the mutations exercised every ending, not just one
    assert {"HandshakeDone", "protocol-error", "need-data"} <= outcomes.keys(), outcomes


def test_fuzz_request_framing_and_validation() -> None:
    """3000 mutated request streams through the server's RequestParser and validator: only
    RemoteProtocolError (framing lost) or an NBDRequestError answer; every event consumes
    bytes (no loop without progress); no event hands out more payload than was announced."""
    from tests.unit.test_nbd_transmission import ALL

    from blocktrace.nbd.errors import NBDRequestError
    from blocktrace.nbd.events import PayloadNeeded, PayloadRefused, Request

    rng = random.Random(0xF00D)
    sess = Session(size=1 * MiB, flags=ALL, structured=True, meta_contexts={1: BASE_ALLOCATION})
    parser = RequestParser(max_payload=64 * 1024, inline_limit=32 * 1024)
    for _ in range(3000):
        data = memoryview(mutate(rng, requests_transcript(rng)))
        pos, end = 0, len(data)
        try:
            while True:
                ev, after = parser.next_event(data, pos, end)
                if ev is NEED_DATA:
                    assert after == pos
                    break
                assert after > pos
                if isinstance(ev, PayloadNeeded | PayloadRefused):
                    req = ev.request
                    owed = req.length - len(ev.first) if isinstance(ev, PayloadNeeded) else ev.skip
                    assert 0 <= owed <= req.length
                    after = min(end, after + owed)  # the caller takes the rest off the stream
                else:
                    assert isinstance(ev, Request)
                    req = ev
                    assert ev.data is None or len(ev.data) == ev.length
                assert after - pos <= REQUEST_SIZE + max(req.length, 0)
                pos = after
                with contextlib.suppress(NBDRequestError):  # answered, connection goes on
                    validate_request(sess, req.command, req.flags, req.offset, req.length)
        except RemoteProtocolError:
            pass


def test_fuzz_live_server(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """300 connections to a real server, each a mutated negotiation followed by a mutated
    request stream, sent in pieces, then closed: every connection ends (none left open), no
    internal error is logged, the Python memory the server holds afterwards is back near where
    it started, and a bystander negotiated first still gets its reads answered."""
    rng = random.Random(0x5EED)
    limits = ServerLimits(handshake_timeout=5, max_connections=16)

    async def body(path: str, dev: GatedDevice, srv: object) -> None:
        from blocktrace.nbd.server import NBDServer

        assert isinstance(srv, NBDServer)
        srv.limits = limits  # the in-process helper builds the server with defaults
        bystander = await Client.connect(path)
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            for _ in range(300):
                _, w = await asyncio.open_unix_connection(path)
                data = mutate(rng, handshake_transcript(rng) + requests_transcript(rng))
                for piece in chunks(rng, data):
                    w.write(piece)
                with_eof = rng.random() < 0.5
                if with_eof:
                    w.write_eof()
                await w.drain()
                w.close()
                await w.wait_closed()
            for _ in range(1000):
                if len(srv.connections) <= 1:
                    break
                await asyncio.sleep(0.01)
            assert len(srv.connections) == 1, "a fuzzed connection was left open"
            grown = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
        assert grown < 8 * MiB, f"{grown} bytes still held after 300 fuzzed connections"
        assert srv.budget.used == 0
        bystander.request(Cmd.READ, 1, 0, 512)
        assert (await bystander.reply(512))[:2] == (1, 0)
        await bystander.close()

    with caplog.at_level(logging.WARNING, logger="blocktrace.nbd"):
        serve(tmp_path, body)
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, caplog.text
