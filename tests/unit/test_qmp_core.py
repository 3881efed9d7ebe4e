"""Sans-IO QMP core: framing, envelope checks, negotiation, argument validation.

Byte vectors are fed whole and one byte at a time; both must give the same events.  Expected
sentences are QEMU 7.2's (see docs/qmp.md and the reference notes).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blocktrace.qmp import errors
from blocktrace.qmp.commands import (
    Bool,
    CommandTable,
    Enum,
    Int,
    ListOf,
    Member,
    Str,
    Struct,
    Union,
)
from blocktrace.qmp.errors import QMPError
from blocktrace.qmp.framing import JSONSplitter, ParseError, Value
from blocktrace.qmp.protocol import (
    NO_ID,
    Execute,
    Reply,
    ServerConnection,
    State,
    VersionInfo,
    render_event,
    timestamp,
)

VERSION = VersionInfo(0, 1, 0, "blocktrace 0.1.0")


def feed_whole(data: bytes, **kw: Any) -> list[Any]:
    return JSONSplitter(**kw).feed(data)


def feed_bytewise(data: bytes, **kw: Any) -> list[Any]:
    s = JSONSplitter(**kw)
    out: list[Any] = []
    for i in range(len(data)):
        out += s.feed(data[i : i + 1])
    return out


def both(data: bytes, **kw: Any) -> list[Any]:
    whole = feed_whole(data, **kw)
    assert feed_bytewise(data, **kw) == whole
    return whole


# --- framing ----------------------------------------------------------------------------------


def test_split_without_newlines() -> None:
    data = b'{"execute":"a"}{"execute":"b","id":1}  [1,2]"str" 42 {"x":"}{\\"\\\\"}'
    assert both(data) == [
        Value({"execute": "a"}),
        Value({"execute": "b", "id": 1}),
        Value([1, 2]),
        Value("str"),
        Value(42),
        Value({"x": '}{"\\'}),
    ]


def test_partial_message_waits() -> None:
    s = JSONSplitter()
    assert s.feed(b'{"execute": "qu') == []
    assert s.pending > 0
    assert s.feed(b'it"}\r\n') == [Value({"execute": "quit"})]
    assert s.pending == 0


def test_bad_json_resumes_with_next_message() -> None:
    assert both(b'{"execute": }{"execute":"ok"}') == [
        ParseError("JSON parse error, expecting value"),
        Value({"execute": "ok"}),
    ]


def test_control_character_resets_parser() -> None:
    # The spec's way to reset: a control character drops the partial message.
    # as QEMU: inside a string the stray token is the string so far
    assert both(b'{"execute": "half\x1b{"execute":"x"}') == [
        ParseError("JSON parse error, stray '\"half\x1b'"),
        Value({"execute": "x"}),
    ]
    assert both(b'{"a": 1\xff{"b":2}') == [
        ParseError("JSON parse error, stray '\ufffd'"),
        Value({"b": 2}),
    ]


def test_utf8_strings_and_bad_utf8() -> None:
    assert both('{"name": "d\u00e9j\u00e0 \u2713"}'.encode()) == [
        Value({"name": "d\u00e9j\u00e0 \u2713"})
    ]
    out = both(b'{"name": "\xc3("}')
    assert out == [ParseError("JSON parse error, invalid UTF-8 sequence in string")]


def test_nan_and_infinity_refused() -> None:
    out = both(b'{"a": NaN} ')
    assert len(out) == 1 and isinstance(out[0], ParseError)


def test_size_limit_is_fatal() -> None:
    s = JSONSplitter(max_size=100)
    out = s.feed(b'{"execute": "' + b"x" * 200)
    assert out == [ParseError("JSON token size limit exceeded", fatal=True)]
    assert s.fatal and s.pending == 0
    assert s.feed(b'"}{"execute":"x"}') == []
    # byte at a time: the same verdict, and memory stays bounded meanwhile
    s = JSONSplitter(max_size=100)
    results: list[Any] = []
    for _ in range(1000):
        results += s.feed(b"[")
        assert s.pending <= 101
    assert results == [ParseError("JSON nesting depth limit exceeded", fatal=True)] or results == [
        ParseError("JSON token size limit exceeded", fatal=True)
    ]


def test_nesting_limit_is_fatal() -> None:
    out = both(b"[" * 30, max_depth=20)
    assert out == [ParseError("JSON nesting depth limit exceeded", fatal=True)]


def test_message_at_limit_is_accepted() -> None:
    msg = json.dumps({"execute": "x", "arguments": {"pad": "p" * 50}}).encode()
    assert both(msg, max_size=len(msg)) == [Value(json.loads(msg))]


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=200), st.integers(min_value=1, max_value=7))
def test_any_bytes_parse_or_error_and_chunking_is_irrelevant(data: bytes, step: int) -> None:
    """The h11 invariant: any byte string gives values or ParseErrors, however it is split."""
    whole = JSONSplitter(max_size=64).feed(data)
    s = JSONSplitter(max_size=64)
    chunked: list[Any] = []
    for i in range(0, len(data), step):
        chunked += s.feed(data[i : i + step])
    assert chunked == whole
    assert all(isinstance(x, Value | ParseError) for x in whole)


@settings(max_examples=100, deadline=None)
@given(
    st.lists(
        st.dictionaries(
            st.text(max_size=8),
            st.recursive(
                st.none() | st.booleans() | st.integers() | st.text(max_size=10),
                lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=4), c),
                max_leaves=6,
            ),
            max_size=4,
        ),
        max_size=4,
    )
)
def test_concatenated_objects_round_trip(objs: list[dict[str, Any]]) -> None:
    data = b"".join(json.dumps(o, ensure_ascii=False).encode() for o in objs)
    assert both(data) == [Value(o) for o in objs]


# --- protocol: greeting, envelope, negotiation --------------------------------------------------


def wire(b: bytes) -> Any:
    assert b.endswith(b"\r\n") and b.count(b"\n") == 1
    return json.loads(b)


def replies(events: list[Any]) -> list[Any]:
    return [wire(e.data) for e in events if isinstance(e, Reply)]


def test_greeting_shape() -> None:
    conn = ServerConnection(VERSION)
    g = wire(conn.greeting())
    assert g == {
        "QMP": {
            "version": {"qemu": {"major": 0, "minor": 1, "micro": 0}, "package": VERSION.package},
            "capabilities": [],
        }
    }


def test_negotiation_then_commands() -> None:
    conn = ServerConnection(VERSION)
    out = conn.receive_data(b'{"execute":"query-version","id":"a"}')
    assert replies(out) == [
        {
            "error": {
                "class": "CommandNotFound",
                "desc": "Expecting capabilities negotiation with 'qmp_capabilities'",
            },
            "id": "a",
        }
    ]
    out = conn.receive_data(b'{"execute":"qmp_capabilities","arguments":{}}')
    assert replies(out) == [{"return": {}}]
    assert isinstance(out[0], Reply) and out[0].negotiated
    assert conn.state is State.COMMAND
    out = conn.receive_data(b'{"execute":"qmp_capabilities","id":[1,{"x":null}]}')
    assert replies(out) == [
        {
            "error": {
                "class": "CommandNotFound",
                "desc": "Capabilities negotiation is already complete, command ignored",
            },
            "id": [1, {"x": None}],
        }
    ]
    out = conn.receive_data(b'{"execute":"query-version","arguments":{"a":1},"id":7}')
    assert out == [Execute("query-version", {"a": 1}, 7)]
    out = conn.receive_data(b'{"execute":"quit"}')
    assert out == [Execute("quit", {}, NO_ID)]


def test_oob_not_offered() -> None:
    conn = ServerConnection(VERSION)
    out = conn.receive_data(b'{"execute":"qmp_capabilities","arguments":{"enable":["oob"]}}')
    assert replies(out)[0]["error"] == {
        "class": "GenericError",
        "desc": "Capability oob not available",  # monitor/qmp-cmds-control.c
    }
    assert conn.state is State.NEGOTIATION
    out = conn.receive_data(b'{"execute":"qmp_capabilities","arguments":{"enable":["x"]}}')
    assert replies(out)[0]["error"]["desc"] == "Parameter 'null' does not accept value 'x'"


@pytest.mark.parametrize(
    ("message", "desc", "has_id"),
    [
        (b'{"execute": "x", "bogus": 1, "id": 3}', "QMP input member 'bogus' is unexpected", True),
        (b'{"arguments": {}, "id": 3}', "QMP input lacks member 'execute'", True),
        (b'{"execute": 1, "id": 3}', "QMP input member 'execute' must be a string", True),
        (b'{"execute": "x", "arguments": [], "id": 3}',
         "QMP input member 'arguments' must be an object", True),
        (b"[1, 2]", "QMP input must be a JSON object", False),
        (b"42 ", "QMP input must be a JSON object", False),
        (b'{"execute": ]', "JSON parse error, expecting value", False),
    ],
)  # fmt: skip
def test_envelope_errors(message: bytes, desc: str, has_id: bool) -> None:
    for negotiated in (False, True):
        conn = ServerConnection(VERSION)
        if negotiated:
            conn.receive_data(b'{"execute":"qmp_capabilities"}')
        for chunks in ([message], [message[i : i + 1] for i in range(len(message))]):
            out: list[Any] = []
            for c in chunks:
                out += conn.receive_data(c)
            (r,) = replies(out)
            assert r["error"] == {"class": "GenericError", "desc": desc}
            assert ("id" in r) == has_id
            assert conn.state is not State.CLOSED


def test_oversized_message_closes() -> None:
    conn = ServerConnection(VERSION, max_message=1000)
    conn.receive_data(b'{"execute":"qmp_capabilities"}')
    out = conn.receive_data(b'{"execute":"x","arguments":{"a":"' + b"a" * 5000 + b'"}}')
    assert len(out) == 1 and isinstance(out[0], Reply) and out[0].close
    assert wire(out[0].data) == {
        "error": {"class": "GenericError", "desc": "JSON token size limit exceeded"}
    }
    assert conn.state is State.CLOSED
    assert conn.receive_data(b'{"execute":"quit"}') == []


def test_event_rendering() -> None:
    ev = wire(render_event("BLOCK_JOB_READY", {"device": "j"}, now=1267061043.959568))
    assert ev == {
        "event": "BLOCK_JOB_READY",
        "data": {"device": "j"},
        "timestamp": {"seconds": 1267061043, "microseconds": 959568},
    }
    assert timestamp(-1.0) == {"seconds": -1, "microseconds": -1}
    assert "data" not in wire(render_event("SHUTDOWN", None))


def test_output_is_ascii() -> None:
    from blocktrace.qmp.protocol import render_return

    b = render_return({"name": "d\u00e9j\u00e0"}, "i")
    assert b.isascii() and wire(b)["return"]["name"] == "d\u00e9j\u00e0"


# --- argument schema ----------------------------------------------------------------------------

TARGET = Union(
    "BlockTraceTarget",
    Member("type", Enum("BlockTraceTargetType", ("log", "nbd"))),
    {
        "log": (Member("filename", Str()), Member("sector-size", Int(512, 4096), optional=True)),
        "nbd": (Member("uri", Str()),),
    },
)
ARGS = Struct(
    "t",
    (
        Member("job-id", Str()),
        Member("device", Str()),
        Member("target", TARGET),
        Member("sync", Enum("MirrorSyncMode", ("full", "none")), optional=True, default="none"),
        Member("speed", Int(0), optional=True, default=0),
        Member("flag", Bool(), optional=True, default=False),
        Member("tags", ListOf(Str()), optional=True, default=[]),
    ),
)


def check(value: dict[str, Any]) -> Any:
    return ARGS.check(value, "")


def desc_of(value: dict[str, Any]) -> str:
    with pytest.raises(QMPError) as info:
        check(value)
    assert info.value.error_class is errors.ErrorClass.GenericError
    return info.value.desc


def test_schema_defaults_and_success() -> None:
    args = check({"job-id": "j", "device": "d", "target": {"type": "log", "filename": "f"}})
    assert args == {
        "job-id": "j",
        "device": "d",
        "target": {"type": "log", "filename": "f", "sector-size": None},
        "sync": "none",
        "speed": 0,
        "flag": False,
        "tags": [],
    }


BASE = {"job-id": "j", "device": "d", "target": {"type": "log", "filename": "f"}}


@pytest.mark.parametrize(
    ("change", "desc"),
    [
        ({"device": None}, "Parameter 'device' is missing"),
        ({"device": 5}, "Invalid parameter type for 'device', expected: string"),
        ({"bogus": 1}, "Parameter 'bogus' is unexpected"),
        ({"sync": "top"}, "Parameter 'sync' does not accept value 'top'"),
        ({"sync": 1}, "Invalid parameter type for 'sync', expected: string"),
        ({"speed": True}, "Invalid parameter type for 'speed', expected: integer"),
        ({"speed": 1.5}, "Invalid parameter type for 'speed', expected: integer"),
        ({"flag": "yes"}, "Invalid parameter type for 'flag', expected: boolean"),
        ({"tags": "a"}, "Invalid parameter type for 'tags', expected: array"),
        ({"tags": ["a", 1]}, "Invalid parameter type for 'tags[1]', expected: string"),
        ({"target": "f"}, "Invalid parameter type for 'target', expected: object"),
        ({"target": {"filename": "f"}}, "Parameter 'target.type' is missing"),
        ({"target": {"type": "x"}}, "Parameter 'target.type' does not accept value 'x'"),
        ({"target": {"type": "log"}}, "Parameter 'target.filename' is missing"),
        ({"target": {"type": "nbd", "filename": "f"}}, "Parameter 'target.uri' is missing"),
        ({"target": {"type": "log", "filename": "f", "uri": "u"}},
         "Parameter 'target.uri' is unexpected"),
        ({"target": {"type": "log", "filename": "f", "sector-size": 8192}},
         "Parameter 'target.sector-size' expects int"),
    ],
)  # fmt: skip
def test_schema_errors(change: dict[str, Any], desc: str) -> None:
    value = dict(BASE)
    for k, v in change.items():
        if v is None:
            del value[k]
        else:
            value[k] = v
    assert desc_of(value) == desc


def test_missing_reported_before_unexpected() -> None:
    # QEMU visits members first, leftovers last.
    assert desc_of({"bogus": 1, "device": "d"}) == "Parameter 'job-id' is missing"


def test_table_dispatch_and_command_not_found() -> None:
    table = CommandTable()
    seen: list[Any] = []

    @table.command("echo", Member("text", Str()), Member("n", Int(0), optional=True, default=1))
    async def echo(ctx: Any, args: dict[str, Any]) -> Any:
        seen.append((ctx, args))
        return {"text": args["text"] * args["n"]}

    assert asyncio.run(table.dispatch("c", "echo", {"text": "ab", "n": 2})) == {"text": "abab"}
    assert seen == [("c", {"text": "ab", "n": 2})]
    with pytest.raises(QMPError) as info:
        asyncio.run(table.dispatch("c", "nope", {}))
    assert info.value.error_class is errors.ErrorClass.CommandNotFound
    assert info.value.desc == "The command nope has not been found"
    with pytest.raises(ValueError):
        table.add("echo", echo)


def test_every_command_is_documented() -> None:
    """docs/qmp.md has a section for every command the server offers."""
    from pathlib import Path

    from blocktrace.qmp.control import build_table

    doc = (Path(__file__).parents[2] / "docs" / "qmp.md").read_text()
    headings = {
        name.strip()
        for line in doc.splitlines()
        if line.startswith("### ")
        for name in line[4:].split(",")
    }
    missing = [name for name in build_table().names() if name not in headings]
    assert not missing, f"undocumented commands: {missing}"


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.binary(max_size=40),
            st.sampled_from([b'{"execute":"qmp_capabilities"}', b'{"execute":"x","id":1}',
                             b'{"execute":', b"}", b'"', b"\\", b"\x1b", b"[[", b"\r\n"]),
        ),
        max_size=12,
    )
)  # fmt: skip
def test_connection_survives_any_input(chunks: list[bytes]) -> None:
    """Whatever arrives, the core answers with well-formed CRLF JSON or hands over a command."""
    conn = ServerConnection(VERSION, max_message=128)
    for chunk in chunks:
        for ev in conn.receive_data(chunk):
            if isinstance(ev, Reply):
                msg = wire(ev.data)
                assert set(msg) <= {"return", "error", "id"} and ("return" in msg) != (
                    "error" in msg
                )
            else:
                assert isinstance(ev, Execute) and isinstance(ev.name, str)
                assert isinstance(ev.arguments, dict)
                assert conn.state in (State.COMMAND, State.CLOSED)


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"{'execute': 'x', 'id': 'it\\'s \"q\"'}", Value({"execute": "x", "id": 'it\'s "q"'})),
        (b"{'a': '}{'}", Value({"a": "}{"})),
        (b'{"a": "it\\\'s"}', Value({"a": "it's"})),
        (b"'top' ", Value("top")),
        (b'{"a": 1, "a": 2}', ParseError("JSON parse error, duplicate key")),
        (b'{"a": tru}', ParseError("JSON parse error, invalid keyword 'tru'")),
        (b"nul ", ParseError("JSON parse error, invalid keyword 'nul'")),
        (b'{"a": 1,}', ParseError("JSON parse error, expecting value")),
        (b"{1: 2}", ParseError("JSON parse error, key is not a string in object")),
        (b'{"a" 1}', ParseError("JSON parse error, missing : in object pair")),
        (b'{"a": 1 "b": 2}', ParseError("JSON parse error, expected separator in dict")),
        (b'{"a": [1 2]}', ParseError("JSON parse error, expected separator in list")),
        (b'{"a": "\\q"}', ParseError("JSON parse error, invalid escape sequence in string")),
        (b"}", ParseError("JSON parse error, expecting value")),
    ],
)  # fmt: skip
def test_qemu_parser_extensions_and_wording(data: bytes, expected: Any) -> None:
    """QEMU 7.2's parser behaviour, as observed on the real one (test_qmp_qemu_parity.py)."""
    assert both(data) == [expected]
