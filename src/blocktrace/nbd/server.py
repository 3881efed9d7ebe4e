"""asyncio NBD server: serves an :class:`~blocktrace.exports.ExportRegistry`.

:class:`NBDServer` is the protocol factory given to ``create_unix_server`` /
``create_server``; it answers negotiation from the registry (so exports added or removed at
runtime are seen by the next client) and tracks connections for shutdown.  The per-connection
work, and the hot-path design, is in :mod:`blocktrace.nbd.connection`.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Callable

from blocktrace.block.device import BlockDevice
from blocktrace.exports import Export, ExportRegistry
from blocktrace.nbd.connbase import BUFFER_SIZE, MAX_INFLIGHT
from blocktrace.nbd.connection import NBDConnection
from blocktrace.nbd.constants import NBD_DEFAULT_MAX_PAYLOAD, TransmissionFlag
from blocktrace.nbd.events import ExportInfo
from blocktrace.nbd.limits import PayloadBudget, ServerLimits

__all__ = [
    "BUFFER_SIZE",
    "MAX_INFLIGHT",
    "NBDConnection",
    "NBDServer",
    "export_info",
    "transmission_flags",
]

log = logging.getLogger("blocktrace.nbd")


def transmission_flags(device: BlockDevice) -> TransmissionFlag:
    """The NBD transmission flags a device's capabilities translate to."""
    f = TransmissionFlag.HAS_FLAGS | TransmissionFlag.SEND_CACHE
    if device.read_only:
        f |= TransmissionFlag.READ_ONLY
    if device.can_flush:
        f |= TransmissionFlag.SEND_FLUSH
    if device.can_fua:
        f |= TransmissionFlag.SEND_FUA
    if not device.read_only:
        if device.can_trim:
            f |= TransmissionFlag.SEND_TRIM
        if device.can_zero:
            f |= TransmissionFlag.SEND_WRITE_ZEROES
            if device.can_fast_zero:
                f |= TransmissionFlag.SEND_FAST_ZERO
    if device.can_multi_conn:
        f |= TransmissionFlag.CAN_MULTI_CONN
    return f


def export_info(export: Export) -> ExportInfo:
    d = export.device
    return ExportInfo(
        name=export.name,
        size=d.size,
        flags=transmission_flags(d),
        description=export.description,
        min_block=d.min_block_size,
        preferred_block=max(d.preferred_block_size, d.min_block_size, 512),
        max_block=min(d.max_block_size, NBD_DEFAULT_MAX_PAYLOAD),
    )


class NBDServer:
    """Accepts NBD connections for the exports in ``registry``; one device object per export
    is shared by all its connections (what makes ``CAN_MULTI_CONN`` true).

    ``limits`` bound what all clients together can cost (:mod:`.limits`): connections past
    ``max_connections`` are closed on arrival, negotiation has a deadline, and every
    connection draws its large payloads and READ data from one :class:`PayloadBudget`.
    """

    def __init__(self, registry: ExportRegistry, limits: ServerLimits | None = None) -> None:
        self.registry = registry
        self.limits = limits or ServerLimits()
        self.budget = PayloadBudget(self.limits.payload_memory)
        #: connections closed on arrival because ``max_connections`` were open
        self.refused = 0
        self.connections: set[NBDConnection] = set()
        self._ids = itertools.count(1)
        self._idle = asyncio.Event()
        self._idle.set()

    def protocol_factory(self) -> NBDConnection:
        return NBDConnection(self, next(self._ids))

    def lookup(self, name: str) -> ExportInfo | None:
        export = self.registry.get(name) if name else self.registry.default
        return export_info(export) if export is not None else None

    def list_exports(self) -> list[ExportInfo]:
        return [export_info(e) for e in self.registry]

    def _added(self, conn: NBDConnection) -> bool:
        """Admit a new connection, or refuse it (False) when the cap is reached."""
        cap = self.limits.max_connections
        if len(self.connections) >= cap:
            self.refused += 1
            log.warning(
                "refusing connection from %s: %d connections open (--max-connections %d)",
                conn.peer,
                len(self.connections),
                cap,
            )
            return False
        self.connections.add(conn)
        self._idle.clear()
        return True

    def _removed(self, conn: NBDConnection) -> None:
        self.connections.discard(conn)
        if not self.connections:
            self._idle.set()

    def disconnect_export(self, name: str) -> int:
        """Shut down every connection using export ``name``; returns how many."""
        conns = [c for c in self.connections if c.export is not None and c.export.name == name]
        for c in conns:
            c.shutdown()
        return len(conns)

    async def shutdown(
        self, timeout: float = 30.0, *, on_timeout: Callable[[], None] | None = None
    ) -> None:
        """Stop every connection after its in-flight requests finished; abort stragglers
        (after ``on_timeout()``, which can fail the requests that must not outlive them)."""
        for c in list(self.connections):
            c.shutdown()
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            if on_timeout is not None:
                on_timeout()
            for c in list(self.connections):
                log.warning("connection %d: did not finish in %.0fs, aborting", c.id, timeout)
                c.abort()
