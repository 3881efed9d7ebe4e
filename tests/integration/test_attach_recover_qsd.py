"""``blocktrace detach --qemu``: a blklogwrites filter left by a killed attach, removed.

Against a real ``qemu-storage-daemon`` 7.2, no guest needed: the filter is built with the
node names and shape ``blocktrace attach --mechanism filter`` uses (it cannot attach there
itself: the daemon has no ``stop``), its log on a real NBD server (``qemu-nbd``) that is
then killed with SIGKILL, as blocktrace would be.  tests/integration/test_attach_guest.py
does the same with a real guest and a real killed ``blocktrace attach``.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from attach_graph import block_graph, qemu_qmp

from support import blocktrace, require

pytestmark = pytest.mark.slow

SIZE = 16 << 20


class Daemon:
    """qemu-storage-daemon with ``p0`` (file) under ``n0`` (raw), exported over NBD."""

    def __init__(self, tmp: Path) -> None:
        require("qemu-storage-daemon", "qemu-nbd", "qemu-io")
        self.img = tmp / "disk.raw"
        with open(self.img, "wb") as f:
            f.truncate(SIZE)
        self.qmp, nbd = tmp / "qsd.sock", tmp / "qsd-nbd.sock"
        self.uri = f"nbd+unix:///n0?socket={nbd}"
        self.proc = subprocess.Popen(
            ["qemu-storage-daemon",
             "--blockdev", f"driver=file,filename={self.img},node-name=p0",
             "--blockdev", "driver=raw,file=p0,node-name=n0",
             "--nbd-server", f"addr.type=unix,addr.path={nbd}",
             "--export", "type=nbd,id=e0,node-name=n0,writable=on",
             "--chardev", f"socket,id=m,path={self.qmp},server=on,wait=off",
             "--monitor", "chardev=m"]
        )  # fmt: skip
        wait_for(self.qmp, nbd)

    def io(self, command: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["qemu-io", "-f", "raw", "-c", command, self.uri],
                              capture_output=True, text=True, timeout=120)  # fmt: skip

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


def data_at(path: Path, offset: int, length: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


def wait_for(*paths: Path) -> None:
    deadline = time.monotonic() + 30
    while not all(p.exists() for p in paths):
        assert time.monotonic() < deadline, paths
        time.sleep(0.05)


def insert_filter(d: Daemon, sink_socket: Path, blw: str, log: str, export: str,
                  delay: int = 1) -> None:  # fmt: skip
    """What ``Filter.attach`` does, on a node of the daemon."""
    server = {"type": "unix", "path": str(sink_socket)}
    qemu_qmp(d.qmp, "blockdev-add", {"driver": "nbd", "node-name": log, "server": server,
                                     "export": export, "reconnect-delay": delay})  # fmt: skip
    qemu_qmp(d.qmp, "blockdev-add", {"driver": "blklogwrites", "node-name": blw, "file": "p0",
                                     "log": log, "log-sector-size": 512,
                                     "discard": "unmap"})  # fmt: skip
    qemu_qmp(d.qmp, "blockdev-reopen", {"options": [{"driver": "raw", "node-name": "n0",
                                                     "file": blw}]})  # fmt: skip


def dead_sink(tmp: Path, sock: Path, export: str) -> subprocess.Popen[bytes]:
    """A real NBD server for the log, to be killed as blocktrace would be."""
    logfile = tmp / "sink.raw"
    with open(logfile, "wb") as f:
        f.truncate(1 << 30)
    p = subprocess.Popen(["qemu-nbd", "-f", "raw", "-k", str(sock), "-x", export,
                          "--persistent", str(logfile)])  # fmt: skip
    wait_for(sock)
    return p


def test_detach_qemu_removes_a_killed_filter_and_restores_the_graph(tmp_path: Path) -> None:
    d = Daemon(tmp_path)
    try:
        before: Any = block_graph(d.qmp)
        sock = tmp_path / "attach-nbd.sock"
        sink = dead_sink(tmp_path, sock, "n0-log")
        insert_filter(d, sock, "blocktrace-blw-n0-log", "blocktrace-log-n0-log", "n0-log")
        assert d.io("write -P 0x11 0 4096").returncode == 0
        # While the sink still runs (the attach process is alive), nothing is touched.
        live: Any = block_graph(d.qmp)
        busy = blocktrace("detach", "--qemu", d.qmp, "n0", check=False)
        assert busy.returncode != 0 and busy.stderr.strip().splitlines() == [
            f"blocktrace: {sock}: socket in use by a running server"
        ], busy.stderr
        assert block_graph(d.qmp) == live
        sink.kill()
        sink.wait()
        # The data write reaches the image; its log write fails: the client sees EIO.
        failed = d.io("write -P 0x22 8192 4096")
        assert failed.returncode != 0 and "Input/output error" in failed.stdout, failed
        with open(d.img, "rb") as f:
            f.seek(8192)
            assert f.read(4096) == b"\x22" * 4096
        # A restarted attach must serve the socket the stale log node connects to.
        stale: Any = block_graph(d.qmp)
        wrong = blocktrace("attach", "--qemu", d.qmp, "--mechanism", "filter", "--resume",
                           "--socket", tmp_path / "other.sock", "--trace",
                           f"log:{tmp_path / 'x.log'}", f"n0={tmp_path / 'new.img'}",
                           check=False)  # fmt: skip
        assert wrong.returncode == 1, wrong
        assert wrong.stderr.strip().splitlines()[-1] == (
            f"blocktrace: device 'n0': its stale log node connects to {sock}: give --socket {sock}"
        )
        assert block_graph(d.qmp) == stale
        assert not (tmp_path / "new.img").exists() and not (tmp_path / "x.log").exists()
        out = blocktrace("detach", "--qemu", d.qmp, "n0", timeout=300)
        assert "detached n0: back on p0" in out.stdout, out
        assert block_graph(d.qmp) == before
        assert not sock.exists()  # the drain's socket is gone with it
        ok = d.io("write -P 0x33 16384 4096")
        assert ok.returncode == 0, ok
        with open(d.img, "rb") as f:
            data = f.read(20480)
        assert data[:4096] == b"\x11" * 4096 and data[16384:20480] == b"\x33" * 4096
    finally:
        d.close()


def test_detach_qemu_refuses_a_graph_blocktrace_did_not_build(tmp_path: Path) -> None:
    """A blklogwrites under the disk that is not blocktrace's (other names), or a disk with
    no filter: one line, nothing changed."""
    d = Daemon(tmp_path)
    try:

        def refused(*args: str) -> str:
            p = blocktrace("detach", "--qemu", d.qmp, *args, check=False)
            lines = p.stderr.strip().splitlines()
            assert p.returncode != 0 and len(lines) == 1, p.stderr
            return lines[0]

        plain: Any = block_graph(d.qmp)
        assert "'n0' is on 'p0'" in refused("n0")
        assert block_graph(d.qmp) == plain
        sock = tmp_path / "other.sock"
        sink = dead_sink(tmp_path, sock, "lg")
        insert_filter(d, sock, "blw", "lg", "lg")
        sink.kill()
        sink.wait()
        with_filter: Any = block_graph(d.qmp)
        assert "not the graph a blocktrace filter leaves" in refused("n0")
        assert "no device or block node named 'nosuch'" in refused("nosuch")
        assert block_graph(d.qmp) == with_filter
        assert not sock.exists() or sock.is_socket()
    finally:
        d.close()


def test_a_restart_within_the_reconnect_delay_shows_the_writer_no_error(tmp_path: Path) -> None:
    """A write issued after the sink died waits (the log node's reconnect delay) instead of
    failing; ``detach --qemu`` serves the drain it reconnects to, and the write completes
    successfully, its data on the image."""
    d = Daemon(tmp_path)
    try:
        before: Any = block_graph(d.qmp)
        sock = tmp_path / "attach-nbd.sock"
        sink = dead_sink(tmp_path, sock, "n0-log")
        insert_filter(d, sock, "blocktrace-blw-n0-log", "blocktrace-log-n0-log", "n0-log",
                      delay=600)  # fmt: skip
        sink.kill()
        sink.wait()
        held = subprocess.Popen(["qemu-io", "-f", "raw", "-c", "write -P 0x44 4096 4096",
                                 "-c", "flush", d.uri], stdout=subprocess.PIPE,
                                text=True)  # fmt: skip
        # blklogwrites writes the data first: once it is on the image, the write is held at
        # its log write (qemu-io has not returned).
        deadline = time.monotonic() + 120
        while data_at(d.img, 4096, 4096) != b"\x44" * 4096:
            assert held.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        assert held.poll() is None
        blocktrace("detach", "--qemu", d.qmp, "n0", timeout=300)
        out, _ = held.communicate(timeout=300)
        assert held.returncode == 0 and "wrote 4096/4096" in out, out
        assert block_graph(d.qmp) == before
    finally:
        d.close()
