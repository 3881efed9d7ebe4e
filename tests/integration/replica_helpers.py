"""Helpers for the replica fault tests: qemu-nbd as a replica, a cuttable TCP proxy, a libnbd
workload that remembers every acknowledged write, and QMP polling with a deadline."""

from __future__ import annotations

import contextlib
import os
import random
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from support import wait_for_socket

MiB = 1024 * 1024


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.02)
    raise AssertionError(f"port {port} did not open within {timeout}s")


class QemuNBD:
    """qemu-nbd serving a raw image as export ``r`` on a Unix socket or a TCP port, to up to
    four clients at once (the replica target, and `blocktrace verify` beside it)."""

    def __init__(self, image: Path, *, sock: Path | None = None, port: int = 0) -> None:
        self.image, self.sock, self.port = image, sock, port
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def uri(self) -> str:
        if self.sock is not None:
            return f"nbd+unix:///r?socket={self.sock}"
        return f"nbd://127.0.0.1:{self.port}/r"

    def start(self) -> QemuNBD:
        where = ["-k", str(self.sock)] if self.sock else ["-b", "127.0.0.1", "-p", str(self.port)]
        if self.sock is not None and self.sock.exists():
            self.sock.unlink()  # left behind by a kill -9
        self.proc = subprocess.Popen(
            [
                "qemu-nbd",
                "-f",
                "raw",
                "-e",
                "4",
                "--persistent",
                "-x",
                "r",
                *where,
                str(self.image),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        if self.sock is not None:
            wait_for_socket(self.sock, self.proc)
        else:
            wait_port(self.port)
        return self

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


class CutProxy:
    """A TCP forwarder on loopback whose connections the test can cut (and keep cut)."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(8)
        self.port = int(self.listener.getsockname()[1])
        self.blocked = False
        self.accepted = 0
        self._socks: list[socket.socket] = []
        self._lock = threading.Lock()
        self._stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._stop:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            if self.blocked:
                conn.close()
                continue
            try:
                up = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
            except OSError:
                conn.close()
                continue
            self.accepted += 1
            with self._lock:
                self._socks += [conn, up]
            for a, b in ((conn, up), (up, conn)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a: socket.socket, b: socket.socket) -> None:
        try:
            while data := a.recv(1 << 16):
                b.sendall(data)
        except OSError:
            pass
        for s in (a, b):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def cut(self, *, block: bool = True) -> None:
        """Reset every connection now; with ``block``, refuse new ones until :meth:`heal`."""
        self.blocked = block
        with self._lock:
            socks, self._socks = self._socks, []
        for s in socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def heal(self) -> None:
        self.blocked = False

    def close(self) -> None:
        self._stop = True
        self.cut()
        self.listener.close()


class Workload:
    """Random writes over libnbd, in one thread; ``model`` is the image as acknowledged."""

    def __init__(self, uri: str, image: Path, seed: int) -> None:
        import nbd

        self.h = nbd.NBD()
        self.h.connect_uri(uri)
        self.size = self.h.get_size()
        self.model = bytearray(image.read_bytes()[: self.size])
        self.rng = random.Random(seed)
        self.done = 0

    def run(self, n: int, *, stop: threading.Event | None = None) -> None:
        rng, h = self.rng, self.h
        for _ in range(n):
            if stop is not None and stop.is_set():
                return
            off = rng.randrange(0, self.size // 4096 - 16) * 4096 + rng.choice((0, 512, 1000))
            r = rng.random()
            if r < 0.8:
                data = rng.randbytes(rng.choice((4096, 8192, 65536, 1000)))
                h.pwrite(data, off, 1 if rng.random() < 0.1 else 0)  # 1 = LIBNBD_CMD_FLAG_FUA
                self.model[off : off + len(data)] = data
            elif r < 0.9:
                n_z = rng.choice((4096, 65536))
                h.zero(n_z, off)
                self.model[off : off + n_z] = bytes(n_z)
            else:
                h.flush()
            self.done += 1

    def check_source(self, image: Path) -> None:
        """Every acknowledged write is on the source (read back from the file)."""
        assert image.read_bytes()[: self.size] == bytes(self.model), "source lost a write"

    def close(self) -> None:
        self.h.flush()
        self.h.shutdown()


def in_thread(fn: Callable[[], None]) -> threading.Thread:
    errors: list[BaseException] = []

    def wrap() -> None:
        try:
            fn()
        except BaseException as exc:
            errors.append(exc)
            raise

    t = threading.Thread(target=wrap, daemon=True)
    t.errors = errors  # type: ignore[attr-defined]
    t.start()
    return t


class QMP:
    """The legacy qemu.qmp client with a polling helper."""

    def __init__(self, path: Path) -> None:
        from qemu.qmp.legacy import QEMUMonitorProtocol

        wait_for_socket(path)
        self.q = QEMUMonitorProtocol(str(path))
        self.q.connect()

    def job(self, job_id: str = "r") -> dict[str, Any]:
        for job in self.q.cmd("query-block-jobs"):
            if job["device"] == job_id:
                return dict(job)
        raise AssertionError(f"no job {job_id}")

    def wait(self, cond: Callable[[dict[str, Any]], bool], timeout: float = 40) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        job: dict[str, Any] = {}
        while time.monotonic() < deadline:
            job = self.job()
            if cond(job):
                return job
            time.sleep(0.02)
        raise AssertionError(f"condition not reached; last job state: {job}")

    def wait_caught_up(self, timeout: float = 40) -> dict[str, Any]:
        """Replica ready and nothing queued: it equals the source as of its applied-seq."""
        return self.wait(
            lambda j: j["target"]["state"] == "ready" and j["queued-records"] == 0, timeout
        )

    def close(self) -> None:
        self.q.close()


def same_files(a: Path, b: Path, size: int) -> bool:
    with open(a, "rb") as fa, open(b, "rb") as fb:
        return fa.read(size) == fb.read(size)


def sparse(path: Path, size: int) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def random_image(path: Path, size: int, seed: int) -> Path:
    rng = random.Random(seed)
    with open(path, "wb") as f:
        f.truncate(size)
        for _ in range(8):
            f.seek(rng.randrange(0, size - MiB))
            f.write(rng.randbytes(MiB))
    os.sync()
    return path
