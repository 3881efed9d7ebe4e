"""The stream contract: one record type, one applier, one schema per target type.

The option walk drives every option every target type declares through the command line's
parser (``serve --trace`` / ``trace start`` spelling) and QMP's ``block-trace`` argument check,
builds the target both ways and compares what ``query-block-jobs`` would show: an option that
exists on one face and not the other (QMP refusing the log target's ``direct``, #10 item 17)
fails here.  Every option must also appear in ``serve --help`` and in the docs.
"""

from __future__ import annotations

import asyncio
import errno
import os
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from blocktrace.block.device import PipelinedWrites, ReadableBuffer
from blocktrace.block.file import FileDevice
from blocktrace.block.memory import MemoryDevice
from blocktrace.errors import BlockDeviceError, UsageError
from blocktrace.logwrites.records import log_records
from blocktrace.logwrites.replay import replay
from blocktrace.logwrites.writer import LogWriter
from blocktrace.qmp import errors as qmp_errors
from blocktrace.qmp.control import build_table
from blocktrace.stream.apply import apply_group, apply_inline, apply_records
from blocktrace.stream.records import Record, RecordKind
from blocktrace.stream.registry import TargetRegistry, discover, targets
from blocktrace.stream.schema import (
    Choice,
    Flag,
    Integer,
    Option,
    OptionType,
    Seconds,
    TargetType,
    Text,
)
from blocktrace.trace.options import parse_trace_spec

DOCS = Path(__file__).resolve().parents[2] / "docs"
W, Z, T, F, M = (RecordKind.WRITE, RecordKind.ZERO, RecordKind.TRIM, RecordKind.FLUSH,
                 RecordKind.MARK)  # fmt: skip


# -- the option walk ---------------------------------------------------------------------------


def sample(opt: Option) -> tuple[str, Any, Any]:
    """(command-line text, QMP JSON value, parsed value) for a non-default value of ``opt``."""
    t: OptionType = opt.type
    if isinstance(t, Flag):
        value = not bool(opt.default)
        return ("on" if value else "off"), value, value
    if isinstance(t, Choice):
        value = next(v for v in reversed(t.values) if v != opt.default)
        return value, value, value
    if isinstance(t, Integer):
        n = max(t.minimum, 1) * 2
        if n > t.maximum or n == opt.default:
            n = max(t.minimum, 1)
        text = f"{n // 1024}K" if t.size and n % 1024 == 0 else str(n)
        return text, n, n
    if isinstance(t, Seconds):
        return "7", 7, 7.0
    assert isinstance(t, Text)
    value = {
        "URI": "nbd://127.0.0.1:1/x,y",
        "nats://HOST:PORT/SUBJECT": "nats://127.0.0.1:1/x.y",  # a subject has no comma
        "NAME": "x_y",  # a JetStream stream name: letters, digits, - and _
    }.get(t.placeholder, "/var/tmp/x,y")
    return value, value, value


#: a valid main argument per target type, when another option is walked
MAIN = {"nbd": "nbd://127.0.0.1:1/x", "stream": "nats://127.0.0.1:1/x"}


def cli_arg(text: str) -> str:
    return text.replace(",", ",,")  # QEMU's escaping of commas in --trace values


def walk() -> list[tuple[TargetType, Option]]:
    return [(t, o) for t in targets() for o in t.options]


def qmp_target(spec: dict[str, Any]) -> dict[str, Any]:
    """``block-trace``'s argument check, then what its handler hands the trace manager."""
    _, args = build_table().validate("block-trace", {"device": "disk", "target": spec})
    return {k: v for k, v in args["target"].items() if v is not None}


def test_the_registry_holds_every_target_module() -> None:
    assert targets().names() == ("log", "replica", "nbd", "introspect", "stream")


@pytest.mark.parametrize(("ttype", "opt"), walk(), ids=lambda x: getattr(x, "name", ""))
def test_every_option_through_cli_and_qmp(ttype: TargetType, opt: Option) -> None:
    main = ttype.main
    text, json_value, parsed = sample(opt)
    main_text = main_json = MAIN.get(ttype.name, "/var/tmp/img")
    if opt.main:
        main_text, main_json = text, json_value
    # the command line (serve --trace, trace start)
    given = f"{opt.name}={cli_arg(text)}" if not opt.main else ""
    cli = parse_trace_spec(f"disk={ttype.name}:{cli_arg(main_text)},{given}")
    cli_target = targets().create(cli.target)
    # QMP block-trace, as a client writes it and as trace start sends it
    spec = {"type": ttype.name, main.name: main_json}
    if not opt.main:
        spec[opt.name] = json_value
    sent = ttype.to_json(cli.target)
    assert sent == spec
    qmp = targets().create(qmp_target(spec))
    assert cli_target.settings() == qmp.settings()
    shown = qmp.settings()[opt.name]
    if opt.name == "filename" and ttype.name == "log":
        parsed = os.path.abspath(parsed)
    assert shown == parsed


@pytest.mark.parametrize(("ttype", "opt"), walk(), ids=lambda x: getattr(x, "name", ""))
def test_every_option_is_documented(ttype: TargetType, opt: Option) -> None:
    from blocktrace.cli.serve import serve

    help_text = CliRunner().invoke(serve, ["--help"], terminal_width=200).output
    assert f"{ttype.name}:{ttype.main.type.metavar}" in help_text
    if not opt.main:
        assert f"{opt.name}={opt.type.metavar}" in help_text
    docs = "".join(p.read_text() for p in DOCS.glob("*.md"))
    assert f"`{opt.name}" in docs or f"{opt.name}=" in docs, f"{ttype.name} {opt.name} undocumented"


def test_cli_and_qmp_refuse_the_same_values() -> None:
    bad = [
        ("log", "sector-size", "1000", 1000, "power of two"),
        ("log", "zeroes", "maybe", "maybe", None),
        ("replica", "granularity", "100", 100, "power of two"),
        ("introspect", "max-pending", "lots", "lots", None),
        ("stream", "replicas", "9", 9, "[1, 5]"),
        ("stream", "retention", "forever", "forever", None),
    ]
    for tname, key, text, json_value, why in bad:
        main = targets().get(tname).main.name
        with pytest.raises(UsageError) as cli:
            parse_trace_spec(f"disk={tname}:/tmp/a,{key}={text}")
        assert key in str(cli.value)
        if why:
            assert why in str(cli.value)
        spec = {"type": tname, main: "/tmp/a", key: json_value}
        try:
            targets().create(qmp_target(spec))
        except qmp_errors.QMPError as exc:  # the JSON type or enum was refused first
            assert key in str(exc)
        except UsageError as exc:
            assert str(exc) == str(cli.value)
        else:
            pytest.fail(f"QMP accepted {spec}")
    with pytest.raises(UsageError, match="unknown option 'nope'"):
        parse_trace_spec("disk=log:/tmp/a,nope=1")
    with pytest.raises(qmp_errors.QMPError, match=r"target\.nope"):
        qmp_target({"type": "log", "filename": "/tmp/a", "nope": 1})


def test_a_new_target_type_is_one_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A module with a TARGET_TYPE in the targets package is a type: nothing else lists it."""
    pkg = tmp_path / "plugtargets"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "echo.py").write_text(
        "from blocktrace.stream.schema import Flag, Option, TargetType, Text\n"
        "from blocktrace.targets.memory import MemoryTarget\n"
        "TARGET_TYPE = TargetType('echo', 'records kept in memory', (\n"
        "    Option('label', Text('NAME'), 'a label', main=True),\n"
        "    Option('loud', Flag(), 'shout', default=False)),\n"
        "    factory=lambda v: MemoryTarget())\n"
    )
    (pkg / "helper.py").write_text("X = 1\n")  # no TARGET_TYPE: not a type
    monkeypatch.syspath_prepend(str(tmp_path))
    reg = discover("plugtargets")
    assert reg.names() == ("echo",)
    target = reg.create({"type": "echo", "label": "a", "loud": "on"})
    assert target.settings() == {"type": "echo", "label": "a", "loud": True}
    assert "echo:NAME" in reg.help_text() and "loud=on|off" in reg.help_text()
    from blocktrace.qmp.jobs import target_union

    union = target_union(reg)
    assert union.check({"type": "echo", "label": "a", "loud": True}, "target")["loud"] is True


def test_registry_refuses_unknown_types_in_one_line() -> None:
    reg = TargetRegistry()
    with pytest.raises(UsageError, match="not supported"):
        reg.get("nope")


# -- one record type, one applier ----------------------------------------------------------------


def test_apply_records_meaning() -> None:
    dev = MemoryDevice(8192, data=b"\xff" * 8192)
    recs = [
        Record(1, W, 0, 4, data=b"abcd"),
        Record(2, Z, 1024, 512),
        Record(3, T, 2048, 512),
        Record(4, F),
        Record(5, M, name="m"),
    ]
    assert asyncio.run(apply_records(dev, recs)) == 3
    assert dev.buf[:4] == b"abcd" and dev.buf[4:1024] == b"\xff" * 1020
    assert dev.buf[1024:1536] == bytes(512) and dev.buf[2048:2560] == bytes(512)
    assert dev.buf[2560:] == b"\xff" * (8192 - 2560)


class Pipelined(MemoryDevice, PipelinedWrites):
    applies_inline = False

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.sends: list[int] = []

    async def write_many(self, items: Any) -> None:
        self.sends.append(len(items))
        for offset, data, fua in items:
            await self.write(offset, data, fua=fua)

    def start_write(self, offset: int, data: ReadableBuffer, callback: Any) -> bool:
        return False


def test_apply_group_uses_the_declared_pipeline() -> None:
    dev = Pipelined(8192)
    group = [Record(i, W, i * 512, 512, data=bytes([i]) * 512) for i in range(1, 5)]
    asyncio.run(apply_group(dev, group))
    assert dev.sends == [4]  # one send for the group
    assert bytes(dev.buf[512:1024]) == b"\x01" * 512
    asyncio.run(apply_group(dev, [*group[:2], Record(9, Z, 4096, 512)]))
    assert dev.sends == [4]  # a ZERO in the group: applied one by one


def test_apply_inline_needs_an_inline_device() -> None:
    with pytest.raises(TypeError):
        apply_inline(Pipelined(4096), Record(1, W, 0, 3, data=b"abc"))
    dev = MemoryDevice(4096)
    assert apply_inline(dev, Record(1, W, 0, 3, data=b"abc"))
    assert not apply_inline(dev, Record(2, F))
    assert dev.buf[:3] == b"abc"


def test_log_records_are_the_stream_record(tmp_path: Path) -> None:
    """A log read back gives the same kinds a live trace records: DISCARD is TRIM, our
    WRITE_ZEROES discard is ZERO, FUA is a flag, a FLUSH entry a FLUSH record."""
    log = tmp_path / "t.log"
    w = LogWriter.create(log, sector_size=512, direct=False)
    w.write(0, b"a" * 512, fua=True)
    w.write_zeroes(512, 1024)
    w.discard(2048, 512)
    w.flush()
    w.mark("here")
    w.close(end_mark=False, sync=True)
    got = [(r.kind, r.offset, r.length, r.fua, r.data, r.name) for r in log_records(log)]
    assert got == [
        (W, 0, 512, True, b"a" * 512, ""),
        (Z, 512, 1024, False, None, ""),
        (T, 2048, 512, False, None, ""),
        (F, 0, 0, False, None, ""),
        (M, 0, 0, False, None, "here"),
    ]


def test_replay_stops_on_a_write_that_makes_no_progress(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Replay writes through FileDevice: a pwrite that writes nothing is ENOSPC, not an
    endless loop (the old replay FileTarget looped without pwrite_all's guard)."""
    log = tmp_path / "t.log"
    w = LogWriter.create(log, sector_size=512, direct=False)
    w.write(0, b"a" * 4096)
    w.close(end_mark=False, sync=True)
    img = tmp_path / "img"
    img.write_bytes(bytes(8192))
    calls = 0
    real = os.pwrite

    def stuck(fd: int, data: Any, offset: int) -> int:
        nonlocal calls
        if fd == image_fd[0]:
            calls += 1
            if calls > 100:
                raise AssertionError("replay kept retrying a write that made no progress")
            return 0
        return real(fd, data, offset)

    image_fd = [-1]
    real_init = FileDevice.__init__

    def init(self: FileDevice, *a: Any, **kw: Any) -> None:
        real_init(self, *a, **kw)
        image_fd[0] = self.fd

    monkeypatch.setattr(FileDevice, "__init__", init)
    monkeypatch.setattr(os, "pwrite", stuck)
    with pytest.raises(BlockDeviceError) as info:
        replay(log, img)
    assert info.value.errno == errno.ENOSPC and calls == 1
