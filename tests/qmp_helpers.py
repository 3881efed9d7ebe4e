"""Helpers for the QMP tests: an in-process server on its own thread, and a raw client.

The server thread runs the real :class:`~blocktrace.service.Service` (exports, NBD socket)
with the real :class:`~blocktrace.qmp.control.Control` on a Unix socket, so synchronous
clients (legacy API, qmp-shell, libnbd) and async ones (QMPClient in the test's own loop) talk
to it exactly as to ``blocktrace serve --qmp``, while the test can still reach inside (emit an
event, count clients).
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import threading
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

from blocktrace.qmp.control import Control
from blocktrace.service import Service, ServiceConfig
from blocktrace.trace import TraceManager

T = TypeVar("T")


class ServerThread:
    """``with ServerThread(tmp_path, images) as st:`` QMP on ``st.path``, NBD on ``st.nbd``.

    ``images`` are ``(export name, path)`` pairs served from the start (at least one: the
    service refuses to start empty).
    """

    def __init__(self, workdir: Path, images: list[tuple[str, str]], **server_kw: Any) -> None:
        self.path = workdir / "qmp.sock"
        self.nbd = workdir / "nbd.sock"
        self.images = images
        self.server_kw = server_kw
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.control: Control | None = None
        self.quit_called = threading.Event()
        self.service: Service

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def run(self, fn: Callable[[], T], timeout: float = 30) -> T:
        async def wrap() -> T:
            return fn()

        return self.call(wrap(), timeout)

    def __enter__(self) -> ServerThread:
        self.thread.start()

        async def start() -> Control:
            self.service = Service(ServiceConfig(images=self.images, socket=str(self.nbd)))
            await self.service.start()
            control = Control(self.service, trace_manager=TraceManager(self.service.registry))
            for k, v in self.server_kw.items():
                setattr(control.server, k, v)
            control.on_quit = self.quit_called.set
            await control.server.listen_unix(self.path)
            return control

        self.control = self.call(start())
        return self

    def emit(self, name: str, data: dict[str, Any] | None = None) -> None:
        assert self.control is not None
        control = self.control
        self.run(lambda: control.emit(name, data))

    def client_count(self) -> int:
        assert self.control is not None
        control = self.control
        return self.run(lambda: len(control.server.clients))

    def __exit__(self, *exc: object) -> None:
        if self.control is not None:
            self.call(self.control.jobs.manager.close())
            self.call(self.control.close())
            self.call(self.service.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


def wait_until(cond: Callable[[], bool], timeout: float = 15, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


class RawClient:
    """A blocking line client for byte-level tests (QEMU's CRLF framing, no library)."""

    def __init__(self, path: Path | str, *, negotiate: bool = True, timeout: float = 10) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(timeout)
        self.sock.connect(os.fspath(path))
        self.file = self.sock.makefile("rb")
        self.greeting = self.recv()
        if negotiate:
            self.send(b'{"execute":"qmp_capabilities"}')
            assert self.recv() == {"return": {}}

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv_raw(self) -> bytes:
        line = self.file.readline()
        if not line:
            raise EOFError("server closed the connection")
        return bytes(line)

    def recv(self) -> Any:
        line = self.recv_raw()
        assert line.endswith(b"\r\n"), line
        return json.loads(line)

    def cmd(self, name: str, args: dict[str, Any] | None = None, id: Any = None) -> Any:
        msg: dict[str, Any] = {"execute": name}
        if args is not None:
            msg["arguments"] = args
        if id is not None:
            msg["id"] = id
        self.send(json.dumps(msg).encode())
        while True:
            reply = self.recv()
            if "event" not in reply:
                return reply

    def closed(self) -> bool:
        """True once the server has closed the connection (reads EOF)."""
        try:
            return self.file.readline() == b""
        except (ConnectionError, OSError):
            return True

    def close(self) -> None:
        self.file.close()
        self.sock.close()
