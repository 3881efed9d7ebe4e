"""The QMP control plane of one running server: what command handlers see, and the table.

:class:`Control` is the ``ctx`` every handler receives.  It ties the socket side
(:class:`~.server.QMPServer`, for events) to the running service (exports, traces) without
either knowing the other: the service is reached only through the small :class:`ServiceAPI`
protocol, so the QMP layer can be tested against a plain in-process service and plugged into
``blocktrace serve`` with a few lines.

:func:`build_table` assembles the commands: the QMP basics here (``qmp_capabilities``,
``query-commands``, ``query-version``, ``quit``), block exports (:mod:`.block_exports`) and
block jobs (:mod:`.jobs`).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal, Protocol

from blocktrace.errors import UsageError
from blocktrace.exports import Export, ExportRegistry
from blocktrace.qmp import errors
from blocktrace.qmp.commands import CommandTable
from blocktrace.qmp.server import QMPServer
from blocktrace.trace import TraceManager

if TYPE_CHECKING:
    from blocktrace.service import Service


class ServiceAPI(Protocol):
    """What the QMP layer needs from the running server (:class:`blocktrace.service.Service`)."""

    registry: ExportRegistry
    #: the server's traces (QMP's block jobs)
    traces: TraceManager

    def add_export(
        self, name: str, path: str, *, read_only: bool = False, description: str = ""
    ) -> Export: ...

    async def remove_export(self, name: str, *, mode: Literal["safe", "hard"] = "safe") -> None: ...

    def request_stop(self) -> None: ...


class Control:
    """Handlers' view of the server: the service, the trace jobs and the event sink."""

    def __init__(self, service: ServiceAPI, *, trace_manager: TraceManager | None = None) -> None:
        from blocktrace.qmp.jobs import JobRegistry  # jobs imports this module's types

        if trace_manager is None:
            trace_manager = service.traces

        self.service = service
        #: serialises commands that change exports or jobs (no half-applied races)
        self.lock = asyncio.Lock()
        self.table = build_table()
        self.server = QMPServer(self.table, self)
        self.jobs = JobRegistry(self, trace_manager)
        #: what ``quit`` does once it has replied (default: stop the service)
        self.on_quit: Callable[[], None] | None = service.request_stop
        self.server.on_quit = self._quit
        self._shutdown_announced = False

    def emit(self, name: str, data: dict[str, Any] | None = None) -> None:
        """Broadcast an event to every negotiated client; never blocks."""
        self.server.broadcast(name, data)

    def _quit(self) -> None:
        self.announce_shutdown("host-qmp-quit")
        if self.on_quit is not None:
            self.on_quit()

    def announce_shutdown(self, reason: str) -> None:
        """QEMU's ``SHUTDOWN`` event, once (``host-qmp-quit`` or ``host-signal``)."""
        if not self._shutdown_announced:
            self._shutdown_announced = True
            self.emit("SHUTDOWN", {"guest": False, "reason": reason})

    async def close(self) -> None:
        """Drop every client, after cancels already requested have finished (their events
        are sent first).  The service stops the traces still running."""
        await self.jobs.wait_stopped()
        await self.server.close()


def build_table() -> CommandTable:
    from blocktrace.qmp import block_exports, jobs

    table = CommandTable()
    _register_basics(table)
    block_exports.register(table)
    jobs.register(table)
    return table


def _register_basics(table: CommandTable) -> None:
    @table.command("qmp_capabilities", doc="Leave capabilities negotiation mode.")
    async def qmp_capabilities(ctx: Control, args: dict[str, Any]) -> Any:
        # The protocol core answers this one itself; reaching here means it was repeated.
        raise errors.negotiation_complete()

    @table.command(
        "query-commands", doc="List the commands this server accepts.", returns="[CommandInfo]"
    )
    async def query_commands(ctx: Control, args: dict[str, Any]) -> Any:
        return [{"name": name} for name in ctx.table.names()]

    @table.command(
        "query-version", doc="blocktrace's version in QEMU's shape.", returns="VersionInfo"
    )
    async def query_version(ctx: Control, args: dict[str, Any]) -> Any:
        return ctx.server.version.to_wire()

    @table.command("quit", doc="Stop the server (after the reply and a SHUTDOWN event).")
    async def quit(ctx: Control, args: dict[str, Any]) -> Any:
        return {}


def install(
    service: Service, *, unix: str | None = None, tcp: list[tuple[str, int]] | None = None
) -> None:
    """Give a :class:`~blocktrace.service.Service` a QMP control socket (``serve --qmp``).

    Listening starts in a startup hook, so the exports exist before the first command.  Jobs
    are the service's traces (``service.traces``), so ``serve --trace`` traces are listed and
    stopped like any other.  On shutdown (SIGTERM or ``quit``) clients get ``SHUTDOWN``, then
    the traces are stopped so they receive their ``BLOCK_JOB_*`` events, then the sockets
    close.
    """
    nbd_socket = service.config.socket
    if unix and nbd_socket and os.path.abspath(unix) == os.path.abspath(nbd_socket):
        raise UsageError(f"--qmp {unix}: the NBD socket has that path; use another")
    state: dict[str, Control] = {}

    async def start(svc: Service) -> None:
        control = Control(svc, trace_manager=svc.traces)
        state["control"] = control
        try:
            if unix:
                await control.server.listen_unix(unix)
            for host, port in tcp or []:
                for h, p in await control.server.listen_tcp(host, port):
                    svc.addresses.append(f"qmp:tcp:{h}:{p}")
        except BaseException:
            await control.server.close()
            raise
        if unix:
            svc.addresses.append(f"qmp:unix:{unix}")

    async def stop(svc: Service) -> None:
        control = state.get("control")
        if control is None:
            return
        control.announce_shutdown("host-signal")
        await control.jobs.manager.close()
        await control.close()

    service.startup_hooks.append(start)
    service.shutdown_hooks.append(stop)
