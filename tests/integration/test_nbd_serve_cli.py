"""``blocktrace serve`` as an operator meets it: arguments, sockets, TCP, signals, and the
one-line errors for mistakes (issue 2, items 2 and 6)."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
from pathlib import Path

import pytest

from nbd_helpers import RawClient
from support import BLOCKTRACE, MiB, ServerProcess, make_image, require, run, wait_for_socket


def serve_fails(*args: str | os.PathLike[str], cwd: Path | None = None) -> str:
    """Run ``blocktrace serve ARGS`` expecting an operator error: one line, non-zero, no
    traceback.  Returns the line."""
    proc = subprocess.run(
        [*BLOCKTRACE, "serve", *map(os.fspath, args)],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=cwd,
    )
    assert proc.returncode != 0, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert "Traceback" not in proc.stderr, proc.stderr
    assert len(lines) == 1, proc.stderr
    return lines[0]


def test_missing_image(tmp_path: Path) -> None:
    line = serve_fails(tmp_path / "nope.img", "--socket", tmp_path / "s.sock")
    assert "nope.img" in line and "no such image" in line
    assert not (tmp_path / "s.sock").exists()


def test_image_is_a_directory(tmp_path: Path) -> None:
    assert "directory" in serve_fails(tmp_path, "--socket", tmp_path / "s.sock")


def test_duplicate_export_names(tmp_path: Path) -> None:
    a = make_image(tmp_path / "a.img", MiB)
    sub = tmp_path / "sub"
    sub.mkdir()
    b = make_image(sub / "a.img", MiB)
    assert "duplicate export name 'a'" in serve_fails(a, b, "--socket", tmp_path / "s.sock")


@pytest.mark.parametrize("spec", ["localhost:notaport", "127.0.0.1:70000", "::1:x"])
def test_bad_listen(tmp_path: Path, spec: str) -> None:
    img = make_image(tmp_path / "a.img", MiB)
    assert "--listen" in serve_fails(img, "--listen", spec)


def test_socket_in_a_missing_or_forbidden_place(tmp_path: Path) -> None:
    img = make_image(tmp_path / "a.img", MiB)
    assert "does not exist" in serve_fails(img, "--socket", tmp_path / "no" / "dir" / "s.sock")
    # /proc refuses new files even to root: "no permission" for every user
    line = serve_fails(img, "--socket", "/proc/blocktrace-test.sock")
    assert "/proc/blocktrace-test.sock" in line


def test_socket_path_is_not_a_socket(tmp_path: Path) -> None:
    img = make_image(tmp_path / "a.img", MiB)
    (tmp_path / "s.sock").write_text("precious")
    assert "not a socket" in serve_fails(img, "--socket", tmp_path / "s.sock")
    assert (tmp_path / "s.sock").read_text() == "precious"


def test_live_socket_is_refused_and_stale_socket_replaced(tmp_path: Path) -> None:
    img = make_image(tmp_path / "a.img", MiB)
    with ServerProcess(tmp_path, [img]) as srv:
        line = serve_fails(img, "--socket", srv.socket)
        assert "in use" in line
        with RawClient(srv.socket) as c:  # the first server is undisturbed
            assert c.handshake("a").export.size == MiB
    # a stale socket file (nobody listening) is replaced
    stale = tmp_path / "stale.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(os.fspath(stale))
    s.close()
    assert stale.exists()
    with ServerProcess(tmp_path, [img], name="stale") as srv2, RawClient(srv2.socket) as c:
        assert c.handshake("a").export.size == MiB


def test_socket_mode_names_and_clean_stop(tmp_path: Path) -> None:
    """Mode 0600; default name = file stem; NAME=IMAGE; first image is the default export;
    SIGINT stops cleanly with exit 0 and removes the socket; one log line per connection."""
    require("nbdinfo")
    a = make_image(tmp_path / "first.img", MiB)
    b = make_image(tmp_path / "b.img", 2 * MiB)
    srv = ServerProcess(tmp_path, [a, f"second={b}"]).start()
    try:
        st = os.stat(srv.socket)
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
        listing = json.loads(run(["nbdinfo", "--list", "--json", srv.uri()]).stdout)
        assert [e["export-name"] for e in listing["exports"]] == ["first", "second"]
        sizes = json.loads(run(["nbdinfo", "--json", srv.uri("second")]).stdout)
        assert sizes["exports"][0]["export-size"] == 2 * MiB
        with RawClient(srv.socket) as c:  # "" selects the default (first) export
            assert c.handshake("").export.name == "first"
    finally:
        assert srv.proc is not None
        srv.proc.send_signal(signal.SIGINT)
        rc = srv.proc.wait(30)
    assert rc == 0, srv.stderr()
    assert not srv.socket.exists()
    log = srv.stderr()
    assert log.count(" opened from ") == 2 and log.count(" closed (") >= 3


def test_default_socket_path_and_tcp_listener(tmp_path: Path) -> None:
    require("nbdinfo")
    img = make_image(tmp_path / "tcp.img", MiB)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = subprocess.Popen(
        [
            *BLOCKTRACE,
            "serve",
            os.fspath(img),
            "--socket",
            "./blocktrace.sock",
            "--listen",
            f":{port}",
        ],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        wait_for_socket(tmp_path / "blocktrace.sock", proc)
        out = json.loads(run(["nbdinfo", "--json", f"nbd://127.0.0.1:{port}/tcp"]).stdout)
        assert out["exports"][0]["export-size"] == MiB
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "127.0.0.1:" in err.decode()
    assert not (tmp_path / "blocktrace.sock").exists()


def test_tcp_port_in_use(tmp_path: Path) -> None:
    img = make_image(tmp_path / "a.img", MiB)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        line = serve_fails(img, "--socket", tmp_path / "x.sock", "--listen", f"127.0.0.1:{port}")
        assert "address already in use" in line
    assert not (tmp_path / "x.sock").exists()


def test_read_only_flag(tmp_path: Path) -> None:
    img = make_image(tmp_path / "ro.img", MiB)
    with ServerProcess(tmp_path, [img], ["--read-only"]) as srv, RawClient(srv.socket) as c:
        assert c.handshake("ro").export.flags & 2
