"""A small blocking QMP client for the command line (``blocktrace qmp``, ``blocktrace trace``).

Why not qemu.qmp: it is a test dependency only, and the CLI needs three things: negotiate,
run a command, wait for an event.  The framing is the server's own sans-IO splitter, so the
client accepts exactly what QEMU sends (CRLF lines) and what blocktrace sends.  Events that
arrive while waiting for a reply are kept, in order, for :meth:`QMPClient.wait_event`.
"""

from __future__ import annotations

import itertools
import json
import os
import socket
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from blocktrace.errors import BlocktraceError, RemoteProtocolError, UsageError
from blocktrace.qmp.framing import JSONSplitter, ParseError

DEFAULT_TIMEOUT = 60.0


class CommandError(BlocktraceError):
    """The server answered a command with an error; ``error_class`` is QMP's class."""

    def __init__(self, error_class: str, desc: str) -> None:
        self.error_class = error_class
        self.desc = desc
        super().__init__(desc)


class QMPClient:
    """``with QMPClient.connect_to(path) as qmp: qmp.execute("query-block-jobs")``."""

    def __init__(self, sock: socket.socket, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.sock = sock
        self.timeout = timeout
        self._splitter = JSONSplitter(max_size=64 << 20)
        self._messages: deque[dict[str, Any]] = deque()
        self.events: deque[dict[str, Any]] = deque()
        self._ids = itertools.count()
        self.greeting: dict[str, Any] = {}

    @classmethod
    def connect_to(
        cls, address: str | tuple[str, int], *, timeout: float = DEFAULT_TIMEOUT
    ) -> QMPClient:
        """Connect to a Unix socket path or a (host, port), read the greeting, negotiate."""
        where: str | tuple[str, int]
        if isinstance(address, tuple):
            family, where = socket.AF_INET6 if ":" in address[0] else socket.AF_INET, address
            shown = f"{address[0]}:{address[1]}"
        else:
            family, where, shown = socket.AF_UNIX, os.fspath(address), os.fspath(address)
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(where)
        except OSError as exc:
            sock.close()
            raise UsageError(f"cannot connect to QMP socket {shown}: {exc.strerror}") from None
        client = cls(sock, timeout=timeout)
        try:
            greeting = client._next_message(time.monotonic() + timeout)
            if "QMP" not in greeting:
                raise RemoteProtocolError(f"{shown} is not a QMP server (no greeting)")
            client.greeting = greeting
            client.execute("qmp_capabilities")
        except BaseException:
            sock.close()
            raise
        return client

    def __enter__(self) -> QMPClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def _next_message(self, deadline: float) -> dict[str, Any]:
        while not self._messages:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BlocktraceError("timed out waiting for the QMP server")
            self.sock.settimeout(remaining)
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                raise BlocktraceError("timed out waiting for the QMP server") from None
            except OSError as exc:
                raise BlocktraceError(f"QMP connection failed: {exc.strerror}") from None
            if not data:
                raise BlocktraceError("the QMP server closed the connection")
            for item in self._splitter.feed(data):
                if isinstance(item, ParseError):
                    raise RemoteProtocolError(f"QMP server sent bad JSON: {item.desc}")
                if not isinstance(item.value, dict):
                    raise RemoteProtocolError("QMP server sent a non-object")
                self._messages.append(item.value)
        return self._messages.popleft()

    def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        """Run ``command``; its ``return`` value, or :class:`CommandError`."""
        msg_id = f"blocktrace#{next(self._ids)}"
        msg: dict[str, Any] = {"execute": command, "id": msg_id}
        if arguments:
            msg["arguments"] = arguments
        self.sock.sendall(json.dumps(msg).encode())
        deadline = time.monotonic() + self.timeout
        while True:
            reply = self._next_message(deadline)
            if "event" in reply:
                self.events.append(reply)
                continue
            if reply.get("id") != msg_id:
                if "error" in reply and "id" not in reply:
                    err = reply["error"]
                    raise CommandError(err.get("class", "GenericError"), err.get("desc", ""))
                continue  # a reply to somebody else's id: QMP says drop it
            if "error" in reply:
                err = reply["error"]
                raise CommandError(str(err.get("class")), str(err.get("desc")))
            return reply.get("return")

    def wait_event(
        self, match: Callable[[dict[str, Any]], bool], timeout: float | None = None
    ) -> dict[str, Any]:
        """The first event (already received or still to come) for which ``match`` is true;
        earlier events are discarded."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            while self.events:
                ev = self.events.popleft()
                if match(ev):
                    return ev
            msg = self._next_message(deadline)
            if "event" in msg:
                self.events.append(msg)
