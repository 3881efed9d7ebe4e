"""Thin asyncio adapter around the sans-IO QMP core: sockets, per-client tasks, event fan-out.

Each client gets three tasks, in the qemu.qmp shape (reader, executor, writer) joined by two
bounded queues, so nothing one client does can grow memory or stall anybody else:

* the **reader** feeds bytes to :class:`~.protocol.ServerConnection` and queues its output; when
  the client pipelines more commands than the executor keeps up with, the reader stops reading
  (the socket pushes back on that client alone);
* the **executor** runs that client's commands one at a time, in order, like QEMU's monitor;
* the **writer** sends replies and events from a per-client :class:`Outbox` bounded in
  *bytes* as well as messages (one reply echoing a 1 MiB id of non-ASCII characters is 6 MiB
  on the wire, so a count bound alone let a client that never reads hold gigabytes).

A reply waits for room in its client's outbox, so a client that does not read stalls its own
commands (then the reader, then its socket) and nothing else.  Events
(:meth:`QMPServer.broadcast`) are rendered once and offered without waiting: a client whose
outbox is full has stopped reading, and is disconnected, alone, its queued messages released.
``broadcast`` never awaits, so the trace and NBD paths that emit events are never blocked.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
from collections import deque
from collections.abc import Callable
from typing import Any

from blocktrace import __version__
from blocktrace.errors import BlocktraceError, UsageError
from blocktrace.qmp import errors
from blocktrace.qmp.commands import CommandTable
from blocktrace.qmp.errors import QMPError
from blocktrace.qmp.framing import DEFAULT_MAX_SIZE
from blocktrace.qmp.protocol import (
    Execute,
    Reply,
    ServerConnection,
    State,
    VersionInfo,
    render_error,
    render_event,
    render_return,
)
from blocktrace.sockets import bind_unix

log = logging.getLogger(__name__)

#: bytes of replies and events buffered per client before it counts as not reading; one
#: message is always admitted into an empty outbox, however big
DEFAULT_MAX_OUTGOING = 8 * 1024 * 1024
#: ... and messages: many small events cost more than their bytes (one object each), and a
#: client that reads nothing should be noticed long before 8 MiB of 100-byte events
DEFAULT_EVENT_QUEUE = 1024
DEFAULT_COMMAND_QUEUE = 16  # pipelined commands accepted ahead of execution per client
DEFAULT_MAX_CLIENTS = 64
READ_CHUNK = 65536


def blocktrace_version() -> VersionInfo:
    """Our version in QEMU's shape (qmp-shell prints it as ``QEMU 0.1.0``)."""
    parts = [int(p) if p.isdigit() else 0 for p in __version__.split(".")[:3]]
    parts += [0] * (3 - len(parts))
    return VersionInfo(parts[0], parts[1], parts[2], f"blocktrace {__version__}")


class Outbox:
    """A client's outgoing messages, bounded by their total size in bytes and their count.

    A message that would take the total past ``limit`` bytes or ``max_messages`` messages
    does not fit, unless the outbox is empty (so any single message can go out).  ``offer``
    (events) never waits and refuses what does not fit; ``put`` (replies) waits for room.
    ``None`` is the end marker and costs nothing.
    """

    def __init__(self, limit: int, max_messages: int = DEFAULT_EVENT_QUEUE) -> None:
        self.limit = limit
        self.max_messages = max_messages
        self.nbytes = 0
        self._items: deque[bytes | None] = deque()
        self._ready = asyncio.Event()
        self._space = asyncio.Event()

    def _fits(self, size: int) -> bool:
        return not self._items or (
            self.nbytes + size <= self.limit and len(self._items) < self.max_messages
        )

    def _append(self, data: bytes | None) -> None:
        self._items.append(data)
        self.nbytes += 0 if data is None else len(data)
        self._ready.set()

    def offer(self, data: bytes | None) -> bool:
        """Queue without waiting (events, the end marker); False if it does not fit."""
        if data is not None and not self._fits(len(data)):
            return False
        self._append(data)
        return True

    async def put(self, data: bytes) -> None:
        """Queue a reply, waiting while the outbox is full: the client's own commands wait
        for it to read (one producer per outbox: the client's executor)."""
        while not self._fits(len(data)):
            self._space.clear()
            await self._space.wait()
        self._append(data)

    async def get(self) -> bytes | None:
        while not self._items:
            self._ready.clear()
            await self._ready.wait()
        data = self._items.popleft()
        if data is not None:
            self.nbytes -= len(data)
        self._space.set()
        return data

    def clear(self) -> None:
        """Drop everything unsent (the client is being disconnected)."""
        self._items.clear()
        self.nbytes = 0


class Client:
    """One connected client: the core, the tasks and the outgoing queue."""

    def __init__(
        self,
        server: QMPServer,
        number: int,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        self.server = server
        self.number = number
        self.name = f"qmp#{number}"
        self.reader = reader
        self.writer = writer
        self.conn = ServerConnection(server.version, max_message=server.max_message)
        self.outgoing = Outbox(server.max_outgoing, server.event_queue)
        self.commands: asyncio.Queue[Execute | Reply | None] = asyncio.Queue(server.command_queue)
        self.events_on = False
        self.closing = False
        self.done = asyncio.Event()
        self._aborted = asyncio.Event()

    def offer_event(self, data: bytes) -> None:
        """Queue an event without waiting; a client too far behind is dropped."""
        if not self.events_on or self.closing:
            return
        if not self.outgoing.offer(data):
            log.warning(
                "%s: not reading (%d bytes unsent); disconnecting it",
                self.name,
                self.outgoing.nbytes,
            )
            self.abort()

    def finish(self) -> None:
        """Close after sending what is queued (replies, the last events); no new events."""
        if self.closing:
            return
        self.closing = True
        self.outgoing.offer(None)

    def abort(self) -> None:
        """Drop the connection now, discarding anything unsent."""
        self.closing = True
        self.conn.close()
        self.outgoing.clear()
        self._aborted.set()
        self.writer.transport.abort()

    async def run(self) -> None:
        tasks = [
            asyncio.create_task(self._read_loop(), name=f"{self.name}-reader"),
            asyncio.create_task(self._exec_loop(), name=f"{self.name}-executor"),
            asyncio.create_task(self._write_loop(), name=f"{self.name}-writer"),
        ]
        aborted = asyncio.create_task(self._aborted.wait())
        try:
            # Normally the writer ends last: after EOF the executor finishes the commands already
            # received and the writer flushes their replies.  An abort ends everything at once.
            await asyncio.wait([tasks[2], aborted], return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in [*tasks, aborted]:
                t.cancel()
            results = await asyncio.gather(*tasks, return_exceptions=True)
            for r in results:
                if isinstance(r, Exception) and not isinstance(r, ConnectionError | OSError):
                    log.error("%s: %s", self.name, r)
            if self._aborted.is_set():
                self.writer.transport.abort()
            else:
                self.writer.close()  # sends what is still buffered, then closes
            with contextlib.suppress(Exception):
                await self.writer.wait_closed()
            self.done.set()

    async def _read_loop(self) -> None:
        # The end marker is queued only on a normal end: when the connection is being torn
        # down (cancelled), awaiting space in a full queue would never finish.
        try:
            await self.outgoing.put(self.conn.greeting())
            await self._read_commands()
        except (ConnectionError, OSError) as exc:
            log.debug("%s: read: %s", self.name, exc)
        await self.commands.put(None)

    async def _read_commands(self) -> None:
        while not self.closing:
            data = await self.reader.read(READ_CHUNK)
            if not data:
                return
            for item in self.conn.receive_data(data):
                await self.commands.put(item)
                if isinstance(item, Reply) and item.close:
                    return
            if self.conn.state is State.CLOSED:
                return

    async def _exec_loop(self) -> None:
        while True:
            item = await self.commands.get()
            if item is None:
                break
            if isinstance(item, Reply):
                await self.outgoing.put(item.data)
                if item.negotiated:
                    self.events_on = True
                if item.close:
                    break
                continue
            data = await self.server.execute(self, item)
            if data is not None:
                await self.outgoing.put(data)
        self.outgoing.offer(None)

    async def _write_loop(self) -> None:
        while True:
            data = await self.outgoing.get()
            if data is None:
                return
            self.writer.write(data)
            await self.writer.drain()


class QMPServer:
    """Serves one :class:`CommandTable` on any number of Unix and TCP listeners.

    ``context`` is what command handlers receive as ``ctx`` (the service facade); it may set
    itself up later (:attr:`context` is a plain attribute).
    """

    def __init__(
        self,
        table: CommandTable,
        context: Any = None,
        *,
        version: VersionInfo | None = None,
        max_message: int = DEFAULT_MAX_SIZE,
        max_outgoing: int = DEFAULT_MAX_OUTGOING,
        event_queue: int = DEFAULT_EVENT_QUEUE,
        command_queue: int = DEFAULT_COMMAND_QUEUE,
        max_clients: int = DEFAULT_MAX_CLIENTS,
    ) -> None:
        self.table = table
        self.context = context
        self.version = version or blocktrace_version()
        self.max_message = max_message
        self.max_outgoing = max_outgoing
        self.event_queue = event_queue
        self.command_queue = command_queue
        self.max_clients = max_clients
        self.clients: dict[int, Client] = {}
        self._servers: list[asyncio.Server] = []
        self._paths: list[str] = []
        self._numbers = itertools.count(1)
        self._tasks: set[asyncio.Task[Any]] = set()
        #: called after ``quit`` has been answered (the service stops itself)
        self.on_quit: Callable[[], None] | None = None

    # --- listeners ----------------------------------------------------------------------------

    async def listen_unix(self, path: str | os.PathLike[str]) -> None:
        """Listen on a Unix socket readable and writable by the owner only (mode 0600).

        Bound the service's way (under a private name, chmod-ed, renamed into place), so it
        is never reachable with looser permissions; a stale socket is replaced, a live one
        refused.
        """
        path = os.fspath(path)
        sock = bind_unix(path, 0o600)
        try:
            server = await asyncio.start_unix_server(self._accept, sock=sock)
        except BaseException:
            sock.close()
            raise
        self._servers.append(server)
        self._paths.append(path)

    async def listen_tcp(self, host: str, port: int) -> list[tuple[str, int]]:
        """Listen on TCP; returns the bound addresses (port 0 picks a free port)."""
        try:
            server = await asyncio.start_server(self._accept, host, port, reuse_address=True)
        except OSError as exc:
            raise UsageError(f"cannot listen on QMP {host}:{port}: {exc.strerror}") from exc
        self._servers.append(server)
        return [s.getsockname()[:2] for s in server.sockets]

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self.clients) >= self.max_clients:
            log.warning("QMP: refusing a client: %d already connected", len(self.clients))
            writer.transport.abort()
            return
        client = Client(self, next(self._numbers), reader, writer)
        self.clients[client.number] = client
        log.info("%s: connected", client.name)
        try:
            await client.run()
        finally:
            self.clients.pop(client.number, None)
            log.info("%s: disconnected", client.name)

    async def close(self) -> None:
        """Stop listening; each client gets what was queued for it, then is disconnected."""
        for server in self._servers:
            server.close()
        clients = list(self.clients.values())
        for client in clients:
            client.finish()
        for client in clients:
            try:
                await asyncio.wait_for(client.done.wait(), 2)
            except TimeoutError:
                client.abort()  # it does not read what we send: drop it
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(client.done.wait(), 2)
        for server in self._servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 5)
        for path in self._paths:
            with contextlib.suppress(OSError):
                os.unlink(path)
        self._servers.clear()
        self._paths.clear()

    # --- commands and events ------------------------------------------------------------------

    async def execute(self, client: Client, request: Execute) -> bytes | None:
        """Run one command; the rendered reply.  Never raises for a command's failure."""
        # A command runs to its end even if its client goes away meanwhile: cancelling it
        # halfway could leave a half-applied change (a job registered but not started).
        task = asyncio.create_task(
            self.table.dispatch(self.context, request.name, request.arguments),
            name=f"{client.name}-{request.name}",
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        try:
            value = await asyncio.shield(task)
        except QMPError as exc:
            return render_error(exc, request.id)
        except BlocktraceError as exc:
            return render_error(errors.generic(str(exc)), request.id)
        except Exception as exc:
            log.exception("%s: command %s failed", client.name, request.name)
            return render_error(errors.generic(f"internal error: {exc}"), request.id)
        data = render_return(value, request.id)
        if request.name == "quit":
            await client.outgoing.put(data)
            if self.on_quit is not None:
                self.on_quit()
            return None
        return data

    def broadcast(self, name: str, data: dict[str, Any] | None = None) -> None:
        """Send an event to every negotiated client.  Never blocks; safe from any callback."""
        message = render_event(name, data)
        log.debug("event %s %s", name, data)
        for client in list(self.clients.values()):
            client.offer_event(message)
