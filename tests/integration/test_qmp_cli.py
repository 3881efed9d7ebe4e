"""``blocktrace serve --qmp`` as a subprocess, driven by the CLI (``blocktrace trace``,
``blocktrace qmp``), the qemu.qmp legacy API and qmp-shell."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
from pathlib import Path

import nbd
import pytest
from qemu.qmp.legacy import QEMUMonitorProtocol

from support import ServerProcess, blocktrace, make_image

MiB = 1024 * 1024


def write_some(srv: ServerProcess, export: str = "disk", n: int = 8) -> None:
    h = nbd.NBD()
    h.connect_uri(srv.uri(export))
    for i in range(n):
        h.pwrite(bytes([0x40 + i]) * 8192, i * 65536 + 512)
    h.flush()
    h.shutdown()


def test_trace_cli_round_trip(tmp_path: Path) -> None:
    img = make_image(tmp_path / "disk.img", 8 * MiB, seed=3)
    base = tmp_path / "base.img"
    shutil.copyfile(img, base)
    qmp = tmp_path / "qmp.sock"
    log = tmp_path / "cli.log"
    with ServerProcess(tmp_path, [img], ["--qmp", str(qmp)]) as srv:
        assert stat.S_IMODE(os.lstat(qmp).st_mode) == 0o600
        out = blocktrace("trace", "start", f"disk=log:{log}", "--job-id", "t1", "-s", qmp).stdout
        assert out.startswith("trace t1 started: disk -> log:") and "ready" in out
        write_some(srv)
        out = blocktrace("trace", "mark", "t1", "checkpoint", "-s", qmp).stdout
        assert "checkpoint" in out and "entry" in out
        listing = blocktrace("trace", "list", "-s", qmp).stdout
        assert "t1" in listing and "ready" in listing and str(log) in listing
        (job,) = json.loads(blocktrace("trace", "list", "-s", qmp, "--json").stdout)
        assert job["device"] == "t1" and job["export"] == "disk" and job["entries"] >= 9
        write_some(srv, n=4)
        stopped = json.loads(blocktrace("trace", "stop", "t1", "-s", qmp, "--json").stdout)
        assert stopped["event"] == "BLOCK_JOB_COMPLETED" and stopped["device"] == "t1"
        assert "error" not in stopped
        assert blocktrace("trace", "list", "-s", qmp).stdout.strip() == "no traces running"
    # the log replays onto the base image to the final image
    blocktrace("replay", log, base)
    assert base.read_bytes() == img.read_bytes()


@pytest.mark.parametrize("sync", ["none", "full"])
def test_trace_mark_reports_the_entry_log_list_shows(tmp_path: Path, sync: str) -> None:
    """``trace mark`` answered the stream position (from 1, copy records included) where
    ``log list`` shows the entry index (from 0): the two must name the same entry."""
    img = make_image(tmp_path / "disk.img", 4 * MiB, seed=5)
    qmp = tmp_path / "qmp.sock"
    log = tmp_path / "m.log"
    with ServerProcess(tmp_path, [img], ["--qmp", str(qmp)]) as srv:
        blocktrace("trace", "start", f"disk=log:{log},sync={sync}", "--job-id", "t", "-s", qmp)
        write_some(srv, n=5)
        reply = json.loads(blocktrace("trace", "mark", "t", "here", "-s", qmp, "--json").stdout)
        write_some(srv, n=2)
        blocktrace("trace", "stop", "t", "-s", qmp)
    listed = [
        line for line in blocktrace("log", "list", log).stdout.splitlines() if "mark here" in line
    ]
    assert len(listed) == 1, listed
    assert listed[0].startswith(f"entry {reply['entry']}@"), (reply, listed)
    assert reply["position"] == reply["entry"] + 1  # a fresh log: one entry per record


def test_qmp_cli_commands_and_errors(tmp_path: Path) -> None:
    img = make_image(tmp_path / "disk.img", 2 * MiB)
    extra = make_image(tmp_path / "extra.img", MiB)
    qmp = tmp_path / "qmp.sock"
    with ServerProcess(tmp_path, [img], ["--qmp", str(qmp)]):
        version = json.loads(blocktrace("qmp", "query-version", "-s", qmp, "--json").stdout)
        assert version["qemu"]["minor"] == 1
        add = json.dumps({"id": "extra", "filename": str(extra)})
        assert blocktrace("qmp", "block-export-add", "-s", qmp, add).stdout == ""
        exports = json.loads(blocktrace("qmp", "query-block-exports", "-s", qmp, "--json").stdout)
        assert [e["id"] for e in exports] == ["disk", "extra"]
        assert exports[1]["writable"] is False
        # key=value arguments, nested with dots, values parsed as JSON
        r = blocktrace("qmp", "block-trace", "-s", qmp, "device=disk", "job-id=kv",
                       "target.type=log", f"target.filename={tmp_path / 'kv.log'}",
                       "queue-size=2097152", "--json")  # fmt: skip
        assert json.loads(r.stdout) == {}
        pretty = blocktrace("qmp", "query-block-jobs", "-s", qmp).stdout
        assert '"device": "kv"' in pretty
        blocktrace("trace", "stop", "kv", "-s", qmp)
        # operator errors: one line on stderr, non-zero exit, no traceback
        for args, expect in [
            (["qmp", "nope", "-s", qmp], "CommandNotFound: The command nope has not been found"),
            (["qmp", "block-job-cancel", "-s", qmp, "device=zz"],
             "DeviceNotActive: Block job 'zz' not found"),
            (["qmp", "block-export-del", "-s", qmp, '{"id": 1}'],
             "Invalid parameter type for 'id', expected: string"),
            (["trace", "stop", "nojob", "-s", qmp], "Block job 'nojob' not found"),
            (["trace", "start", "nodev=log:/tmp/x.log", "-s", qmp],
             "Cannot find device='nodev' nor node-name='nodev'"),
            (["trace", "start", "log:/tmp/x.log", "-s", qmp], "2 exports"),
            (["qmp", "query-version", "-s", tmp_path / "missing.sock"], "cannot connect"),
            (["qmp", "query-version", "-s", qmp, "notkeyvalue"], "KEY=VALUE"),
            (["qmp", "query-version"], "no QMP socket"),
        ]:  # fmt: skip
            proc = blocktrace(*args, check=False, env={**os.environ, "BLOCKTRACE_QMP": ""})
            assert proc.returncode != 0, args
            assert expect in proc.stderr, (args, proc.stderr)
            assert "Traceback" not in proc.stderr
            assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_legacy_client_and_qmp_shell_against_serve(tmp_path: Path) -> None:
    img = make_image(tmp_path / "disk.img", 4 * MiB)
    qmp = tmp_path / "qmp.sock"
    log = tmp_path / "shell.log"
    with ServerProcess(tmp_path, [img], ["--qmp", str(qmp)]) as srv:
        mon = QEMUMonitorProtocol(os.fspath(qmp))
        mon.connect()
        try:
            shell = Path(sys.executable).parent / "qmp-shell"
            if not shell.exists():
                pytest.skip("machine lacks qmp-shell (installed with qemu.qmp)")
            script = (
                "block-trace job-id=sh device=disk "
                f'target={{"type":"log","filename":"{log}"}}\n'
                "query-block-jobs\n"
                "block-trace-mark job-id=sh name=from-shell\n"
                "block-job-cancel device=sh\n"
            )
            proc = subprocess.run([os.fspath(shell), "-p", os.fspath(qmp)], input=script,
                                  capture_output=True, text=True, timeout=60)  # fmt: skip
            assert "Connected to QEMU 0.1.0" in proc.stdout, proc.stdout + proc.stderr
            assert '"device": "sh"' in proc.stdout
            assert '"entry"' in proc.stdout
            # the legacy client, connected all along, saw the job's whole life, in order
            seen = []
            while not seen or seen[-1] != "null":
                ev = mon.pull_event(wait=30)
                assert ev is not None
                data = ev.get("data", {})
                seen.append(data["status"] if ev["event"] == "JOB_STATUS_CHANGE" else ev["event"])
            assert seen == ["created", "running", "ready", "BLOCK_JOB_READY", "waiting",
                            "pending", "BLOCK_JOB_COMPLETED", "concluded", "null"]  # fmt: skip
            write_some(srv)  # the export still works after the job is gone
        finally:
            mon.close()


def test_quit_and_tcp_listener(tmp_path: Path) -> None:
    img = make_image(tmp_path / "disk.img", MiB)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = ServerProcess(tmp_path, [img], ["--qmp-listen", f"127.0.0.1:{port}"]).start()
    try:
        mon = QEMUMonitorProtocol(("127.0.0.1", port))
        mon.connect()
        assert mon.cmd("query-version")["qemu"]["major"] == 0
        out = blocktrace("qmp", "query-block-jobs", "--tcp", f"127.0.0.1:{port}", "--json")
        assert json.loads(out.stdout) == []
        assert mon.cmd("quit") == {}
        with contextlib.suppress(EOFError):  # the server hung up first, as QEMU does
            mon.close()
        assert srv.proc is not None
        assert srv.proc.wait(30) == 0, srv.stderr()
    finally:
        srv.kill()


def test_sigterm_ends_traces_and_tells_clients(tmp_path: Path) -> None:
    img = make_image(tmp_path / "disk.img", 4 * MiB, seed=9)
    base = tmp_path / "base.img"
    shutil.copyfile(img, base)
    qmp = tmp_path / "qmp.sock"
    log = tmp_path / "term.log"
    srv = ServerProcess(tmp_path, [img], ["--qmp", str(qmp)]).start()
    try:
        mon = QEMUMonitorProtocol(os.fspath(qmp))
        mon.connect()
        target = {"type": "log", "filename": str(log)}
        assert mon.cmd("block-trace", **{"job-id": "t", "device": "disk", "target": target}) == {}
        write_some(srv)
        assert srv.stop() == 0, srv.stderr()
        events = []
        while True:
            ev = mon.pull_event(wait=30)
            assert ev is not None
            events.append(ev)
            if ev["event"] == "BLOCK_JOB_COMPLETED":
                break
        names = [e["event"] for e in events]
        assert "SHUTDOWN" in names
        shutdown = events[names.index("SHUTDOWN")]
        assert shutdown["data"] == {"guest": False, "reason": "host-signal"}
        assert names.index("SHUTDOWN") < names.index("BLOCK_JOB_COMPLETED")
        assert "error" not in events[-1]["data"]
        with contextlib.suppress(EOFError):
            mon.close()
    finally:
        srv.kill()
    blocktrace("replay", log, base)
    assert base.read_bytes() == img.read_bytes()


def test_serve_trace_is_a_job_too(tmp_path: Path) -> None:
    """Traces started by ``serve --trace`` are the same jobs QMP lists and stops."""
    img = make_image(tmp_path / "disk.img", 2 * MiB, seed=4)
    base = tmp_path / "base.img"
    shutil.copyfile(img, base)
    qmp = tmp_path / "qmp.sock"
    log = tmp_path / "boot.log"
    args = ["--qmp", str(qmp), "--trace", f"disk=log:{log},job-id=boot"]
    with ServerProcess(tmp_path, [img], args) as srv:
        (job,) = json.loads(blocktrace("trace", "list", "-s", qmp, "--json").stdout)
        assert job["device"] == "boot" and job["status"] == "ready"
        write_some(srv)
        out = blocktrace("trace", "stop", "boot", "-s", qmp).stdout
        assert out.startswith("trace boot stopped:")
    blocktrace("replay", log, base)
    assert base.read_bytes() == img.read_bytes()


def test_serve_qmp_operator_errors(tmp_path: Path) -> None:
    img = make_image(tmp_path / "disk.img", MiB)
    sock = tmp_path / "same.sock"
    regular = tmp_path / "regular-file"
    regular.write_text("not a socket")
    for args, expect in [
        (["--socket", sock, "--qmp", sock], "the NBD socket has that path"),
        (["--socket", tmp_path / "n.sock", "--qmp", regular], "not a socket"),
        (["--socket", tmp_path / "n.sock", "--qmp-listen", "localhost:notaport"], "HOST:PORT"),
    ]:
        proc = blocktrace("serve", img, *args, check=False, timeout=30)
        assert proc.returncode == 2, (args, proc.stderr)
        assert expect in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert regular.read_text() == "not a socket"
