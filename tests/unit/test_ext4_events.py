"""FileEvent forms (JSON lines, human lines) and the introspect target's spec handling."""

from __future__ import annotations

import json

import pytest

from blocktrace.errors import UsageError
from blocktrace.ext4.events import FileEvent
from blocktrace.stream.registry import create_target
from blocktrace.targets.introspect import IntrospectTarget
from blocktrace.trace.options import parse_trace_spec


def test_json_omits_absent_fields_and_round_trips() -> None:
    ev = FileEvent(
        "write",
        "/a/b",
        ino=12,
        record=40,
        time=1700000000.0,
        offset=4096,
        length=100,
        data_record=31,
        size=4196,
    )
    d = json.loads(ev.to_json())
    assert d == {
        "kind": "write",
        "path": "/a/b",
        "ino": 12,
        "record": 40,
        "time": 1700000000.0,
        "offset": 4096,
        "length": 100,
        "data_record": 31,
        "size": 4196,
    }
    assert FileEvent.from_dict(d) == ev


@pytest.mark.parametrize(
    ("event", "tail"),
    [
        (FileEvent("rename", "/new", old_path="/old", record=3), "rename   /old -> /new"),
        (FileEvent("symlink", "/s", target="t", record=3), "/s -> t"),
        (FileEvent("write", "/f", offset=0, length=10, record=3), "/f [0, 10)"),
        (FileEvent("truncate", "/f", size=7, record=3), "/f size=7"),
        (FileEvent("chmod", "/f", mode=0o100640, record=3), "/f rw-r----- (640)"),
        (FileEvent("chown", "/f", uid=1, gid=2, record=3), "/f 1:2"),
        (FileEvent("mkdir", "/d", fs="p2", record=3, time=0.0), "mkdir    p2:/d"),
    ],
)
def test_human_lines(event: FileEvent, tail: str) -> None:
    line = event.describe()
    assert line.endswith(tail), line
    assert "#3" in line


def test_introspect_target_from_trace_spec(tmp_path: object) -> None:
    spec = parse_trace_spec("disk=introspect:/tmp/ev.jsonl,max-pending=10,copy-mode=write-blocking")
    assert spec.target == {"type": "introspect", "filename": "/tmp/ev.jsonl", "max-pending": "10"}
    target = create_target(spec.target)
    assert isinstance(target, IntrospectTarget)
    assert target.limits == {"max_pending": 10}
    assert target.describe()["filename"] == "/tmp/ev.jsonl"


@pytest.mark.parametrize(
    "spec",
    [
        {"type": "introspect"},
        {"type": "introspect", "filename": "x", "max-pending": "lots"},
        {"type": "introspect", "filename": "x", "colour": "blue"},
    ],
)
def test_introspect_target_bad_specs(spec: dict[str, str]) -> None:
    with pytest.raises(UsageError):
        create_target(spec)
