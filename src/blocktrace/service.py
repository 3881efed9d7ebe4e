"""The running blocktrace server: exports, NBD listeners, hooks, signals, clean stop.

:class:`Service` owns the :class:`~blocktrace.exports.ExportRegistry` and the NBD server and is
the one object the other parts plug into:

* the QMP control socket calls :meth:`Service.add_export` / :meth:`Service.remove_export`
  (``block-export-add`` / ``block-export-del``) and stops the server with
  :meth:`Service.request_stop`;
* the trace manager and QMP server register async callbacks in :attr:`Service.startup_hooks`
  (run after the exports are open and before clients are accepted) and
  :attr:`Service.shutdown_hooks` (run, in reverse order, after the last NBD connection
  closed and before devices are flushed and closed).

Stop order on SIGINT/SIGTERM: stop accepting, let every connection finish its in-flight
requests, run shutdown hooks, flush and close every device, remove the socket files.  That
order is what makes "the image and the trace agree after a clean stop" true.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import signal
import threading
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from blocktrace.errors import BlocktraceError, StateError, UsageError
from blocktrace.exports import Export, ExportRegistry, open_export
from blocktrace.nbd.limits import ServerLimits
from blocktrace.nbd.server import NBDServer
from blocktrace.sockets import bind_unix
from blocktrace.trace.manager import TraceManager

log = logging.getLogger("blocktrace.service")

T = TypeVar("T")
Hook = Callable[["Service"], Awaitable[None]]

DEFAULT_SOCKET = "./blocktrace.sock"


@dataclass
class ServiceConfig:
    """Everything ``blocktrace serve`` was asked to do (other parts add their own fields)."""

    #: (export name, image path) in the order given; the first is the default export.
    images: list[tuple[str, str]] = field(default_factory=list)
    #: NBD Unix socket, or None for none.
    socket: str | None = DEFAULT_SOCKET
    socket_mode: int = 0o600
    #: NBD TCP listeners as (host, port).
    listen: list[tuple[str, int]] = field(default_factory=list)
    read_only: bool = False
    #: Seconds to wait for in-flight requests on stop before dropping connections.
    stop_timeout: float = 30.0
    #: What NBD clients may cost: connections, handshake time, payload memory.
    limits: ServerLimits = field(default_factory=ServerLimits)


class Service:
    """The server process: ``await Service(config).run()`` until SIGINT/SIGTERM."""

    def __init__(self, config: ServiceConfig) -> None:
        self.config = config
        self.registry = ExportRegistry()
        self.nbd = NBDServer(self.registry, config.limits)
        #: Traces of this server's exports (``serve --trace``, QMP ``block-trace``).
        self.traces = TraceManager(self.registry)
        #: ``async def hook(service)``: run after exports open, before accepting clients.
        self.startup_hooks: list[Hook] = []
        #: Run in reverse order after the last connection closed, before devices close.
        self.shutdown_hooks: list[Hook] = []
        #: Run once listening (clients can connect): ``blocktrace attach`` moves a VM's disk
        #: onto an export here, which needs QEMU to connect to the NBD socket.
        self.started_hooks: list[Hook] = []
        #: Run in reverse order first thing on stop, while connections are still served:
        #: ``blocktrace attach`` moves a VM's disk back off its export here.
        self.stopping_hooks: list[Hook] = []
        # First in, so it runs last: traces end (queues delivered, logs closed) once every
        # connection is done, before the devices close.
        self.shutdown_hooks.append(_stop_traces)
        self._servers: list[asyncio.AbstractServer] = []
        self._socket_paths: list[str] = []
        self._stop = asyncio.Event()
        self._stopped = False
        self._running = False
        #: Where clients can connect, for messages: "unix:PATH", "tcp:HOST:PORT".
        self.addresses: list[str] = []

    # -- exports ---------------------------------------------------------------------------

    def add_export(
        self, name: str, path: str, *, read_only: bool = False, description: str = ""
    ) -> Export:
        """Open ``path`` and export it as ``name`` (new connections see it at once)."""
        if name in self.registry:
            raise UsageError(f"export {name!r} already exists")
        export = open_export(name, path, read_only=read_only)
        if description:
            export.description = description
        self.registry.add(export)
        # At startup the "serving ..." line names the exports; later additions log here.
        log.log(
            logging.INFO if self._running else logging.DEBUG,
            "export %s: %s (%d bytes%s)",
            name,
            path,
            export.device.size,
            ", read-only" if export.read_only else "",
        )
        return export

    async def remove_export(self, name: str, *, mode: Literal["safe", "hard"] = "safe") -> None:
        """Stop exporting ``name``.  ``safe`` refuses while clients are connected (QEMU's
        block-export-del default); ``hard`` disconnects them after their in-flight requests."""
        export = self.registry.get(name)
        if export is None:
            raise UsageError(f"no export named {name!r}")
        if mode == "safe" and export.connections:
            raise StateError(f"export {name!r} is in use by {export.connections} connection(s)")
        self.registry.remove(name)
        self.nbd.disconnect_export(name)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.stop_timeout
        while users := [c for c in self.nbd.connections if c.export is export]:
            if loop.time() > deadline:
                for c in users:
                    c.abort()
            await asyncio.sleep(0.01)
        await self._close_device(export)

    async def _close_device(self, export: Export) -> None:
        try:
            if not export.read_only:
                await export.device.flush()
        except BlocktraceError as exc:
            log.error("export %s: flush on close failed: %s", export.name, exc)
        finally:
            await export.device.close()

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Open exports, run startup hooks, start listening.  Raises UsageError for operator
        mistakes, leaving nothing behind."""
        cfg = self.config
        if not cfg.images:
            raise UsageError("no images to serve")
        try:
            for name, path in cfg.images:
                self.add_export(name, path, read_only=cfg.read_only)
            for hook in self.startup_hooks:
                await hook(self)
            await self._listen()
            for hook in self.started_hooks:
                await hook(self)
        except BaseException:
            await self._close_all()
            raise
        self._running = True
        log.info(
            "serving %s on %s",
            ", ".join(e.name for e in self.registry),
            ", ".join(self.addresses),
        )

    async def _listen(self) -> None:
        cfg = self.config
        loop = asyncio.get_running_loop()
        if not cfg.socket and not cfg.listen:
            raise UsageError("nothing to listen on: give --socket or --listen")
        # TCP first, the Unix socket last: a script (or test) that waits for the socket file
        # to accept connections then knows every listener is up.
        for host, port in cfg.listen:
            try:
                server = await loop.create_server(
                    self.nbd.protocol_factory, host, port, reuse_address=True
                )
            except OSError as exc:
                why = exc.strerror or str(exc)
                if exc.errno == errno.EADDRINUSE:
                    why = "address already in use"
                raise UsageError(f"--listen {host}:{port}: {why}") from None
            self._servers.append(server)
            for s in server.sockets:
                addr = s.getsockname()
                self.addresses.append(f"tcp:{addr[0]}:{addr[1]}")
        if cfg.socket:
            sock = bind_unix(cfg.socket, cfg.socket_mode)
            self._socket_paths.append(cfg.socket)
            try:
                server = await loop.create_unix_server(self.nbd.protocol_factory, sock=sock)
            except BaseException:
                sock.close()
                raise
            self._servers.append(server)
            self.addresses.insert(0, f"unix:{cfg.socket}")

    def request_stop(self) -> None:
        """Ask :meth:`run` to stop (signal handlers and QMP ``quit`` call this)."""
        self._stop.set()

    async def run(self) -> None:
        """Start, serve until SIGINT/SIGTERM (or :meth:`request_stop`), stop cleanly."""
        loop = asyncio.get_running_loop()
        signals = (signal.SIGINT, signal.SIGTERM)
        # Handlers first: a signal arriving while we start must stop us cleanly, not kill us
        # with the socket already bound.
        for sig in signals:
            loop.add_signal_handler(sig, self.request_stop)
        try:
            await self.start()
        except BaseException:
            for sig in signals:
                loop.remove_signal_handler(sig)
            raise
        try:
            await self._stop.wait()
            log.info("stopping")
        finally:
            # The handlers stay installed while we stop: a second SIGTERM (systemd and
            # `timeout` signal the whole group; impatient operators press ^C twice) must not
            # kill us half way through delivering queued records and closing logs.  Once
            # stopped, the process is on its way out: later signals are ignored rather than
            # allowed to turn a clean exit into "killed by SIGTERM".
            try:
                await self.stop()
            finally:
                for sig in signals:
                    loop.remove_signal_handler(sig)
                    if threading.current_thread() is threading.main_thread():
                        signal.signal(sig, signal.SIG_IGN)

    async def stop(self) -> None:
        """Stop accepting, finish in-flight requests, run shutdown hooks, flush, close."""
        if self._stopped:
            return
        self._stopped = True
        for hook in reversed(self.stopping_hooks):
            try:
                await hook(self)
            except Exception:
                log.exception("stopping hook %r failed", hook)
        for server in self._servers:
            server.close()
        self.traces.begin_shutdown()
        await self.nbd.shutdown(self.config.stop_timeout, on_timeout=self.traces.refuse_unapplied)
        for hook in reversed(self.shutdown_hooks):
            try:
                await hook(self)
            except Exception:
                log.exception("shutdown hook %r failed", hook)
        await self._close_all()

    async def _close_all(self) -> None:
        for server in self._servers:
            server.close()
        self._servers.clear()
        for export in self.registry:
            self.registry.remove(export.name)
            await self._close_device(export)
        for path in self._socket_paths:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        self._socket_paths.clear()


async def _stop_traces(service: Service) -> None:
    await service.traces.close(service.config.stop_timeout)


def run(main: Coroutine[Any, Any, T]) -> T:
    """Run ``main`` on uvloop when importable (``BLOCKTRACE_NO_UVLOOP=1`` opts out)."""
    factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    if not os.environ.get("BLOCKTRACE_NO_UVLOOP"):
        try:
            import uvloop

            factory = uvloop.new_event_loop
        except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
            factory = None
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)
