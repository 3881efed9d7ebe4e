"""Hostile QMP input against the sans-IO core (issue #10 item 2): ids that are not doubles are
echoed as valid JSON, the outbox is bounded in bytes, and a bounded-time fuzz of the framing
and envelope layers finds no crash, no invalid JSON on the wire and no unbounded buffer."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blocktrace.qmp import errors
from blocktrace.qmp.commands import CommandTable, Int, Member, Str
from blocktrace.qmp.errors import QMPError
from blocktrace.qmp.protocol import (
    Execute,
    Reply,
    ServerConnection,
    State,
    VersionInfo,
    render_error,
    render_return,
)
from blocktrace.qmp.server import Outbox

VERSION = VersionInfo(0, 1, 0, "test")


def strict_json(line: bytes) -> Any:
    """Parse one wire message as RFC 8259 JSON: ``Infinity``/``NaN`` are not JSON."""

    def refuse(name: str) -> Any:
        raise ValueError(f"not JSON: {name}")

    assert line.endswith(b"\r\n"), line
    line.decode("ascii")
    return json.loads(line, parse_constant=refuse)


def replies(data: bytes, *, negotiated: bool = True) -> list[bytes]:
    conn = ServerConnection(VERSION)
    if negotiated:
        conn.receive_data(b'{"execute": "qmp_capabilities"}')
        assert conn.state is State.COMMAND
    out = []
    for ev in conn.receive_data(data):
        if isinstance(ev, Reply):
            out.append(ev.data)
    return out


def test_huge_number_ids_are_echoed_exactly_as_json() -> None:

    conn = ServerConnection(VERSION)
    conn.receive_data(b'{"execute": "qmp_capabilities"}')
    for raw in (b"1e400", b"-1e400", b"1E+999", b'[1e400, {"a": -2e308}]'):
        (ev,) = conn.receive_data(b'{"execute": "query-jobs", "id": ' + raw + b"}")
        assert isinstance(ev, Execute)
        ok = render_return([], ev.id)
        err = render_error(errors.generic("x"), ev.id)
        # the id's own text comes back, and the whole reply is valid JSON
        assert ok == b'{"return": [], "id": ' + raw + b"}\r\n"
        assert err.startswith(b'{"id": ' + raw + b", ")
        strict_json(ok)
        strict_json(err)
    # before negotiation the core answers itself: same rule
    (reply,) = replies(b'{"execute": "query-jobs", "id": 1e400}', negotiated=False)
    assert reply.startswith(b'{"id": 1e400, "error": ') and strict_json(reply)


def test_huge_number_is_no_argument_value() -> None:

    table = CommandTable()

    async def c(ctx: Any, args: dict[str, Any]) -> Any:
        return args

    table.add("c", c, (Member("n", Int(0, 10)), Member("s", Str(), optional=True)))
    conn = ServerConnection(VERSION)
    conn.receive_data(b'{"execute": "qmp_capabilities"}')
    for args in (b'{"n": 1e400}', b'{"n": 1, "s": 1e400}'):
        (ev,) = conn.receive_data(b'{"execute": "c", "arguments": ' + args + b"}")
        assert isinstance(ev, Execute)
        try:
            table.validate(ev.name, ev.arguments)
        except QMPError as exc:
            assert "Invalid parameter type" in exc.desc, exc.desc
        else:
            raise AssertionError(f"{args!r} was accepted")


def test_outbox_is_bounded_in_bytes() -> None:
    async def main() -> None:
        box = Outbox(1000)
        assert box.offer(b"x" * 5000)  # one message always fits an empty outbox
        assert not box.offer(b"y")
        assert await box.get() == b"x" * 5000 and box.nbytes == 0
        for _ in range(10):
            assert box.offer(b"z" * 100)
        assert not box.offer(b"z") and box.nbytes == 1000
        assert box.offer(None)  # the end marker costs nothing
        box.clear()
        assert box.nbytes == 0
        # a reply waits for room instead (the client's own commands stall), by count too
        small = Outbox(1 << 20, max_messages=2)
        await small.put(b"a")
        await small.put(b"b")
        waiting = asyncio.create_task(small.put(b"c"))
        await asyncio.sleep(0)
        assert not waiting.done() and not small.offer(b"event")
        assert await small.get() == b"a"
        await asyncio.wait_for(waiting, 10)
        assert small.nbytes == 2

    asyncio.run(main())


# --- fuzz: bounded by max_examples, not by time ---------------------------------------------

SEEDS = [
    b'{"execute": "query-jobs", "id": 1}',
    b'{"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}, "id": "c"}',
    b"{'execute': 'query-jobs', 'id': 'it\\'s'}",
    b'{"execute": "query-jobs", "id": [1e400, {"a": "\\u00e9"}]}',
    b'{"execute": "block-trace", "arguments": {"device": "d", "target": {"type": "log"}}}',
]
TOKENS = [b"{", b"}", b"[", b"]", b'"', b"'", b"\\", b":", b",", b"1e400", b"-", b"\xff", b"\x00"]


@st.composite
def hostile(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(0, 8))):
        pos = draw(st.integers(0, len(data)))
        if draw(st.booleans()):
            data[pos:pos] = draw(st.sampled_from(TOKENS))
        elif data:
            del data[pos : pos + draw(st.integers(1, 4))]
    return bytes(data) + draw(st.binary(max_size=64))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    chunks=st.lists(st.one_of(hostile(), st.binary(max_size=200)), min_size=1, max_size=6),
    cut=st.integers(1, 64),
)
def test_fuzz_framing_and_envelope(chunks: list[bytes], cut: int) -> None:
    data = b"".join(chunks)
    limit = 256
    whole = ServerConnection(VERSION, max_message=limit)
    pieces = ServerConnection(VERSION, max_message=limit)
    for conn in (whole, pieces):
        conn.receive_data(b'{"execute": "qmp_capabilities"}')
    got_whole = whole.receive_data(data)
    got_pieces: list[Any] = []
    for i in range(0, len(data), cut):
        got_pieces += pieces.receive_data(data[i : i + cut])
        assert pieces._splitter.pending <= limit + cut  # never more than one message held
    assert got_pieces == got_whole  # where the input is split never changes the result
    for ev in got_whole:
        if isinstance(ev, Reply):
            strict_json(ev.data)
        else:
            assert isinstance(ev, Execute) and isinstance(ev.arguments, dict)
            strict_json(render_return(None, ev.id))
