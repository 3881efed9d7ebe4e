"""Removing the blklogwrites filter a killed ``blocktrace attach --mechanism filter`` left.

After ``kill -9`` of the attach process, QEMU still has (docs/attach.md, FAULTS)::

    device -> FMT (raw) -file-> blocktrace-blw-SINK (blklogwrites) -file-> PROTO (file)
                                                                  -log-->  blocktrace-log-SINK
                                                                           (nbd, SINK export
                                                                            on the dead socket)

The guest's writes reach PROTO, but their log writes fail: the old trace has a gap and can
never be continued.  Removing the filter is the filter's own detach (``blockdev-reopen``
FMT back onto PROTO with its options, ``blockdev-del`` of the two nodes), with one catch:
``blockdev-reopen`` first flushes FMT, which through blklogwrites writes a FLUSH entry to
the log, and QEMU refuses the reopen ("Error flushing drive") while the log child cannot
be written.  So the restarted blocktrace serves a :class:`DrainSink` under SINK on the same
socket, lets QEMU's nbd client reconnect to it (it retries in the background; a read
through the human monitor's ``qemu-io`` kicks it), and only then reopens.  What reaches the
drain (the FLUSH entry, the guest's writes until the reopen) is acknowledged and dropped:
those writes are on the image, and no trace is running.

:func:`stale_filter` is the sans-IO recognition: node names *and* graph shape, or a
one-line refusal, before anything changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from blocktrace.attach.filter import Filter
from blocktrace.attach.guard import nbd_node_socket
from blocktrace.attach.monitor import AttachError, Disk, Monitor
from blocktrace.attach.sink import SINK_SIZE
from blocktrace.block.device import BlockDevice, ReadableBuffer
from blocktrace.exports import Export, ExportRegistry
from blocktrace.nbd.server import NBDServer
from blocktrace.sockets import bind_unix

_FILTER_NODE = re.compile(r"blocktrace-blw-(?P<sink>.+)")


@dataclass(frozen=True)
class StaleFilter:
    """What a killed filter attach left under one disk."""

    disk: Disk
    #: the protocol node the format node goes back onto
    proto: str
    #: the log-sink export name QEMU's log node asks for
    sink: str
    #: the Unix socket QEMU's log node connects to
    socket: str

    @property
    def filter_node(self) -> str:
        return f"blocktrace-blw-{self.sink}"

    @property
    def log_node(self) -> str:
        return f"blocktrace-log-{self.sink}"


def stale_filter(disk: Disk, graph: dict[str, Any], nodes: list[dict[str, Any]]) -> StaleFilter:
    """Recognise the graph a blocktrace filter leaves under ``disk`` (names and shape).

    ``graph`` is ``x-debug-query-block-graph``, ``nodes`` ``query-named-block-nodes``.
    Anything else raises :class:`AttachError` with one line: nothing is changed on a graph
    blocktrace did not build."""
    by_id = {n["id"]: n for n in graph["nodes"]}
    ids = {n["name"]: n["id"] for n in graph["nodes"] if n.get("name")}
    info = {n["node-name"]: n for n in nodes}

    def refuse(why: str) -> AttachError:
        return AttachError(
            f"device {disk.spec!r}: {why}: not the graph a blocktrace filter leaves; "
            "nothing changed"
        )

    def children(name: str) -> dict[str, str]:
        return {
            e["name"]: by_id[e["child"]].get("name", "")
            for e in graph["edges"]
            if e["parent"] == ids.get(name)
        }

    def parents(name: str) -> list[str]:
        return [
            by_id[e["parent"]].get("name", "") for e in graph["edges"] if e["child"] == ids[name]
        ]

    if disk.driver == "nbd" and disk.node.startswith("blocktrace-"):
        raise AttachError(
            f"device {disk.spec!r}: runs on blocktrace export {disk.node!r} (pivot): "
            "`blocktrace attach --resume` serves its image again and detaches it"
        )
    if disk.driver != "raw":
        raise refuse(f"a {disk.driver} node")
    below = children(disk.node)
    blw = below.get("file", "")
    m = _FILTER_NODE.fullmatch(blw)
    if set(below) != {"file"} or m is None:
        raise refuse(f"{disk.node!r} is on {blw or 'nothing'!r}")
    sink = m["sink"]
    log_node = f"blocktrace-log-{sink}"
    if info.get(blw, {}).get("drv") != "blklogwrites" or parents(blw) != [disk.node]:
        raise refuse(f"{blw!r} is not a blklogwrites node used by {disk.node!r} only")
    kids = children(blw)
    proto = kids.get("file", "")
    if set(kids) != {"file", "log"} or kids["log"] != log_node:
        raise refuse(f"{blw!r} has children {kids}")
    if info.get(proto, {}).get("drv") != "file":
        raise refuse(f"{blw!r} is not on a local file")
    log_info = info.get(log_node, {})
    if log_info.get("drv") != "nbd" or parents(log_node) != [blw] or children(log_node):
        raise refuse(f"{log_node!r} is not an nbd node used by {blw!r} only")
    socket = nbd_node_socket(log_info)
    if not socket or urlsplit(str(log_info.get("file", ""))).path != f"/{sink}":
        raise refuse(f"{log_node!r} connects to {log_info.get('file')!r}")
    return StaleFilter(disk=disk, proto=proto, sink=sink, socket=socket)


async def find_stale_filter(monitor: Monitor, disk: Disk) -> StaleFilter:
    graph = await monitor.execute("x-debug-query-block-graph")
    return stale_filter(disk, graph, await monitor.nodes())


class DrainSink(BlockDevice):
    """The export a stale log node reconnects to: acknowledges every write, keeps nothing.

    Bounded by construction (nothing is stored).  Only ever served while its filter is being
    removed; the guest writes it receives meanwhile are on the image already."""

    def __init__(self) -> None:
        self.size = SINK_SIZE
        self.min_block_size = 1
        self.can_trim = False
        self.can_fua = False
        self.can_extents = False
        #: log bytes received and dropped (for the log line)
        self.dropped = 0

    async def read(self, offset: int, length: int) -> ReadableBuffer:
        return bytes(length)

    async def write(self, offset: int, data: ReadableBuffer, *, fua: bool = False) -> None:
        self.dropped += len(memoryview(data))

    async def write_zeroes(
        self,
        offset: int,
        length: int,
        *,
        may_trim: bool = False,
        fast: bool = False,
        fua: bool = False,
    ) -> None:
        self.dropped += length

    async def flush(self) -> None:
        return None


def drain_export(stale: StaleFilter) -> Export:
    return Export(stale.sink, DrainSink(), description="stale blocktrace log (dropped)")


async def remove_stale_filter(
    monitor: Monitor, stale: StaleFilter, export: Export, *, timeout: float = 120
) -> None:
    """Put the disk back on its protocol node, ``export`` (a :class:`DrainSink` served as
    ``stale.sink`` on ``stale.socket``) taking the dead sink's place meanwhile.

    QEMU's nbd client reconnects only after a request failed (then in the background, with
    a backoff up to 16 s): the reopen's own flush is such a request, and so is a read
    through the human monitor's ``qemu-io`` (qemu-system only).  A reopen that fails
    changes nothing, so it is retried until the log node is back on the drain."""
    mech = Filter(monitor, stale.disk, stale.socket, stale.sink, "", _proto=stale.proto)
    mech.attached = True
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    tries_connected = 0
    while True:
        try:
            await mech.detach()
            return
        except AttachError as exc:
            if export.connections:
                tries_connected += 1
            if tries_connected > 3 or loop.time() > deadline:
                raise AttachError(
                    f"device {stale.disk.spec!r}: cannot remove {stale.filter_node} "
                    f"(log node {'reconnected' if export.connections else 'not reconnected'} "
                    f"to {stale.socket}): {exc}"
                ) from None
        with contextlib.suppress(AttachError):
            await monitor.execute(
                "human-monitor-command",
                {"command-line": f'qemu-io {stale.log_node} "read 0 512"'},
            )
        await asyncio.sleep(0.5)


@contextlib.asynccontextmanager
async def serving_drains(socket: str, exports: list[Export]) -> AsyncIterator[None]:
    """Serve ``exports`` on ``socket`` (no ``blocktrace attach`` process is running): what
    ``blocktrace detach --qemu`` needs for the stale log nodes to reconnect to."""
    registry = ExportRegistry()
    for e in exports:
        registry.add(e)
    nbd = NBDServer(registry)
    sock = bind_unix(socket, 0o600)
    try:
        server = await asyncio.get_running_loop().create_unix_server(
            nbd.protocol_factory, sock=sock
        )
    except BaseException:
        sock.close()
        raise
    try:
        yield
    finally:
        server.close()
        await nbd.shutdown(10)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(socket)


async def detach_stale(qemu_socket: str, devices: list[str]) -> list[StaleFilter]:
    """``blocktrace detach --qemu``: remove the filters a killed attach left under
    ``devices``, no attach process running.  Every device is checked before any changes."""
    monitor = Monitor(qemu_socket)
    await monitor.connect()
    try:
        stales = [await find_stale_filter(monitor, await monitor.resolve(d)) for d in devices]
        sockets = sorted({s.socket for s in stales})
        if len(sockets) != 1:
            raise AttachError(f"the devices' log nodes use several sockets: {', '.join(sockets)}")
        exports = [drain_export(s) for s in stales]
        async with serving_drains(sockets[0], exports):
            for stale, export in zip(stales, exports, strict=True):
                await remove_stale_filter(monitor, stale, export)
        return stales
    finally:
        await monitor.close()
