"""Side by side with the real QEMU: the same bytes sent to ``qemu-system-x86_64 -qmp`` and to
blocktrace must get the same replies (class, sentence, id, key order).

Inputs cover the wire layer (framing, parser errors, QEMU's JSON extensions), the envelope,
negotiation, argument validation and the block-job verbs on a job that does not exist, i.e.
everything whose wording a script may depend on.  After each input a sentinel command marks
where its replies end.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from qmp_helpers import ServerThread
from support import make_image, require, wait_for_socket

INPUTS = [
    b'{"execute": "query-version", "id": 0}',  # before negotiation
    b'{"execute": "qmp_capabilities", "arguments": {"enable": ["x"]}, "id": "c0"}',
    b'{"execute": "qmp_capabilities", "arguments": {"bogus": 1}, "id": "c1"}',
    b'{"execute": "qmp_capabilities", "id": "c"}',
    b'{"execute": "qmp_capabilities", "id": 12}',
    b'{"execute": "qmp_capabilities", "arguments": {"bogus": 1}, "id": "c2"}',
    b'{"execute": "qmp_capabilities", "arguments": {"enable": [1]}, "id": "c3"}',
    b'{"execute": "nope", "id": 1}',
    b'{"execute": "query-jobs", "bogus": 1, "id": 2}',
    b'{"arguments": {}, "id": 3}',
    b'{"execute": 1, "id": 4}',
    b'{"execute": "query-jobs", "arguments": [], "id": 5}',
    b'{"execute": "query-jobs", "exec-oob": "x", "id": 22}',
    b"[1, 2]",
    b'"just a string"',
    b"42 ",
    b"true ",
    b'{"execute": ]',
    b'{"execute": "query-jobs", "arguments": {"x": 1}, "id": 6}',
    b'{"execute": "block-job-cancel", "id": 7}',
    b'{"execute": "block-job-cancel", "arguments": {"device": 5}, "id": 8}',
    b'{"execute": "block-job-cancel", "arguments": {"device": "j"}, "id": 9}',
    b'{"execute": "block-job-cancel", "arguments": {"device": "j", "force": "yes"}, "id": 16}',
    b'{"execute": "block-job-pause", "arguments": {"device": "j", "bogus": true}, "id": 10}',
    b'{"execute": "block-job-resume", "arguments": {"device": "j"}, "id": 17}',
    b'{"execute": "block-job-complete", "arguments": {"device": "j"}, "id": 18}',
    b'{"execute": "job-cancel", "arguments": {"id": "zz"}, "id": 13}',
    b'{"execute": "job-pause", "arguments": {"id": "j"}, "id": 19}',
    b'{"execute": "block-export-del", "arguments": {"id": "zz"}, "id": 14}',
    b'{"execute": "block-export-del", "arguments": {"id": "zz", "mode": "soft"}, "id": 15}',
    b'{"execute": "query-jobs", "id": 11}',
    b'{"execute": "query-block-jobs", "id": 20}',
    b'{"execute": "query-jobs", "id": [1, {"a": null}]}',
    b'{"execute": "query-jobs", "id": 25} {"execute": "query-jobs", "id": 26}',
    b'{"execute": "query-jobs", "id": 21, "execute": "x"}',
    b'{"execute": "quer\x1b',
    b"\xff",
    b'{"a": tru}',
    b'{"a": 1,}',
    b'{"a": [1,]}',
    b"{1: 2}",
    b'{"a" 1}',
    b'{"a": 1 "b": 2}',
    b"[1 2]",
    b'{"a": "\\q"}',
    b"}",
    b'{"a": 1}}',
    b"{'execute': 'query-jobs', 'arguments': {}, 'id': 'it\\'s \"q\"'}",
    b'{"execute": "query-jobs", "id": "\xc3\xa9\\u00e9"}',
    b'{"execute": "query-jobs", "id": "\xc3("}',
    b'{"execute": "query-jobs", "id": "a\\/b"}',
    b'{"execute": "query-jobs", "id": 1.5}',
]


def sentinel(n: int) -> bytes:
    return json.dumps({"execute": "query-jobs", "id": f"sentinel-{n}"}).encode()


def exchange(path: Path) -> list[list[tuple[list[str], Any]]]:
    """Send every input; for each, the replies before its sentinel as (key order, value)."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(15)
        s.connect(os.fspath(path))
        f = s.makefile("rb")
        json.loads(f.readline())  # greeting
        results = []
        for n, data in enumerate(INPUTS):
            s.sendall(data + sentinel(n))
            replies = []
            while True:
                line = f.readline()
                assert line.endswith(b"\r\n"), line
                msg = json.loads(line)
                if msg.get("id") == f"sentinel-{n}":
                    break
                if "event" not in msg:
                    replies.append((list(msg), msg))
            results.append(replies)
        return results


@pytest.fixture
def qemu_qmp(tmp_path: Path) -> Iterator[Path]:
    require("qemu-system-x86_64")
    path = tmp_path / "qemu.sock"
    proc = subprocess.Popen(
        ["qemu-system-x86_64", "-machine", "none", "-nodefaults", "-display", "none",
         "-qmp", f"unix:{path},server=on,wait=off"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        wait_for_socket(path, proc)
        yield path
    finally:
        proc.kill()
        proc.wait(10)
        if proc.stderr:
            proc.stderr.close()


def test_same_replies_as_qemu(qemu_qmp: Path, tmp_path: Path) -> None:
    img = make_image(tmp_path / "disk.img", 1024 * 1024)
    qemu = exchange(qemu_qmp)
    with ServerThread(tmp_path, [("disk", os.fspath(img))]) as st:
        ours = exchange(st.path)
    mismatches = [
        f"{INPUTS[n]!r}:\n  qemu: {q}\n  ours: {o}"
        for n, (q, o) in enumerate(zip(qemu, ours, strict=True))
        if q != o
    ]
    assert not mismatches, "\n".join(mismatches)


def job_life(
    path: Path, start: tuple[str, dict[str, Any]], setup: list[Any], *, single_client: bool = False
) -> dict[str, Any]:
    """Start a job, pause it twice, resume it twice, cancel it; what a client sees.

    ``single_client``: the server is QEMU's monitor, which serves one client at a time and
    drops a connection that arrives while it is still tearing down the previous one (the
    fixture's readiness probe): such a connection is retried, within a deadline.
    """
    from qemu.qmp import ConnectError, ExecuteError
    from qemu.qmp.legacy import QEMUMonitorProtocol

    deadline = time.monotonic() + 15
    while True:
        mon = QEMUMonitorProtocol(os.fspath(path))
        try:
            mon.connect()
            break
        except ConnectError:
            mon.close()
            if not single_client or time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    seen: list[str] = []
    data: dict[str, list[str]] = {}

    def pull_until(name: str, status: str | None = None) -> None:
        while True:
            ev = mon.pull_event(wait=30)
            assert ev is not None
            if ev["event"] == "JOB_STATUS_CHANGE":
                seen.append(ev["data"]["status"])
                if ev["data"]["status"] == status:
                    return
            else:
                seen.append(ev["event"])
                data[ev["event"]] = sorted(ev["data"])
                if ev["event"] == name and status is None:
                    return

    def error_of(cmd: str, **args: Any) -> str:
        try:
            mon.cmd(cmd, **args)
        except ExecuteError as exc:
            return f"{exc.error_class}: {exc}"
        return "no error"

    try:
        for cmd, args in setup:
            mon.cmd(cmd, **args)
        mon.cmd(start[0], **start[1])
        pull_until("BLOCK_JOB_READY")
        (info,) = mon.cmd("query-block-jobs")
        mon.cmd("block-job-pause", device="j")
        paused = error_of("block-job-pause", device="j")
        (paused_info,) = mon.cmd("query-block-jobs")
        mon.cmd("block-job-resume", device="j")
        resumed = error_of("block-job-resume", device="j")
        mon.cmd("block-job-cancel", device="j")
        pull_until("", "null")
        return {
            "events": seen,
            "data": data,
            "query": sorted(info),
            "paused": (paused_info["status"], paused_info["paused"]),
            "errors": [paused, resumed],
            "after": mon.cmd("query-block-jobs"),
        }
    finally:
        mon.close()


def test_job_life_as_a_mirror_job(qemu_qmp: Path, tmp_path: Path) -> None:
    """A trace job goes through the same states and events, in the same order, with the same
    data members, as QEMU's own mirror job driven the same way."""
    mib = 1024 * 1024
    qemu = job_life(
        qemu_qmp,
        ("blockdev-mirror", {"job-id": "j", "device": "src", "target": "dst", "sync": "full"}),
        [("blockdev-add", {"driver": "null-co", "node-name": n, "size": mib})
         for n in ("src", "dst")],
        single_client=True,
    )  # fmt: skip
    img = make_image(tmp_path / "disk.img", mib)
    target = {"type": "log", "filename": str(tmp_path / "j.log")}
    with ServerThread(tmp_path, [("disk", os.fspath(img))]) as st:
        ours = job_life(st.path, ("block-trace", {"job-id": "j", "device": "disk",
                                                  "target": target}), [])  # fmt: skip
    assert ours["events"] == qemu["events"]
    assert ours["data"] == qemu["data"]
    assert set(qemu["query"]) <= set(ours["query"])
    assert ours["paused"] == qemu["paused"] == ("standby", True)
    assert ours["errors"] == qemu["errors"]
    assert ours["after"] == qemu["after"] == []
