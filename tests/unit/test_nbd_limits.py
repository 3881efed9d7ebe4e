"""Resource bounds of the NBD server against hostile clients (issue 10 item 1).

Each test runs the real server in-process over a real Unix socket, plays a hostile client
with raw bytes, and asserts on behaviour (a refusal, a closed socket) or on memory Python
allocated (``tracemalloc``: every buffer the server makes for a client is a Python object),
never on RSS or timing.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import tracemalloc
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from tests.unit.test_nbd_server import Client

from blocktrace.block.memory import MemoryDevice
from blocktrace.errors import UsageError
from blocktrace.exports import Export, ExportRegistry
from blocktrace.nbd import wire
from blocktrace.nbd.constants import Cmd
from blocktrace.nbd.limits import ServerLimits
from blocktrace.nbd.server import NBDServer

MiB = 1024 * 1024
Body = Callable[[str, NBDServer], Awaitable[None]]


def run_server(tmp_path: Path, body: Body, limits: ServerLimits, size: int = 64 * MiB) -> None:
    dev = MemoryDevice(size)

    async def main() -> None:
        reg = ExportRegistry()
        reg.add(Export("disk", dev))
        srv = NBDServer(reg, limits)
        path = os.fspath(tmp_path / "s.sock")
        listener = await asyncio.get_running_loop().create_unix_server(srv.protocol_factory, path)
        try:
            await asyncio.wait_for(body(path, srv), 60)
        finally:
            listener.close()
            await srv.shutdown(timeout=5)

    asyncio.run(main())


async def wait_until(cond: Callable[[], bool], what: str, timeout: float = 20) -> None:
    for _ in range(int(timeout / 0.01)):
        if cond():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


async def closed_by_server(reader: asyncio.StreamReader, timeout: float = 20) -> bool:
    """Read until EOF (the server closed) or the timeout; True on EOF."""
    try:
        async with asyncio.timeout(timeout):
            while await reader.read(65536):
                pass
        return True
    except (TimeoutError, ConnectionError):
        return False


def test_limits_are_validated() -> None:
    with pytest.raises(UsageError, match="max-connections"):
        ServerLimits(max_connections=0)
    with pytest.raises(UsageError, match="handshake-timeout"):
        ServerLimits(handshake_timeout=0)
    with pytest.raises(UsageError, match="payload-memory"):
        ServerLimits(payload_memory=MiB)


def test_connections_past_the_cap_are_refused_with_a_log_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def body(path: str, srv: NBDServer) -> None:
        clients = [await Client.connect(path) for _ in range(2)]
        negotiating = await asyncio.open_unix_connection(path)  # counts while negotiating
        await wait_until(lambda: len(srv.connections) == 3, "three connections")
        r, w = await asyncio.open_unix_connection(path)
        assert await closed_by_server(r)  # closed at once, before any greeting
        assert srv.refused == 1 and len(srv.connections) == 3
        await clients[0].close()
        await wait_until(lambda: len(srv.connections) == 2, "a slot to free up")
        again = await Client.connect(path)  # a slot is free again
        again.request(Cmd.READ, 1, 0, 512)
        assert (await again.reply(512))[1] == 0
        for c in (again, clients[1]):
            await c.close()
        negotiating[1].close()
        w.close()

    with caplog.at_level(logging.WARNING, "blocktrace.nbd"):
        run_server(tmp_path, body, ServerLimits(max_connections=3))
    assert "refusing connection from unix: 3 connections open (--max-connections 3)" in (
        caplog.text
    )


def test_a_silent_client_is_closed_at_the_handshake_deadline(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def body(path: str, srv: NBDServer) -> None:
        r, w = await asyncio.open_unix_connection(path)
        await r.readexactly(18)  # the greeting; then say nothing
        assert await closed_by_server(r, timeout=20)
        assert not srv.connections
        # a client that negotiates in time is not affected by the deadline
        c = await Client.connect(path)
        await asyncio.sleep(0.6)
        c.request(Cmd.READ, 1, 0, 512)
        assert (await c.reply(512))[1] == 0
        await c.close()
        w.close()

    with caplog.at_level(logging.WARNING, "blocktrace.nbd"):
        run_server(tmp_path, body, ServerLimits(handshake_timeout=0.3))
    assert "handshake not finished within 0.3s, closing" in caplog.text


def test_connections_that_never_negotiate_cost_little_memory(tmp_path: Path) -> None:
    """Today's main gave each new connection its 512 KiB receive buffer at once (200
    connections: 100 MiB); now that waits until negotiation has finished."""
    n = 200

    async def body(path: str, srv: NBDServer) -> None:
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            conns = [await asyncio.open_unix_connection(path) for _ in range(n)]
            await wait_until(lambda: len(srv.connections) == n, f"{n} connections")
            grown = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
        assert grown < n * 64 * 1024, f"{grown} bytes for {n} idle connections"
        for _, w in conns:
            w.close()

    run_server(tmp_path, body, ServerLimits(max_connections=n))


def hostile_write_headers(path: str, count: int, length: int) -> list[socket.socket]:
    """``count`` clients that negotiate, announce a ``length``-byte WRITE, send 1 KiB of it
    and stall (blocking sockets, negotiated from a thread)."""
    from tests.nbd_helpers import RawClient

    socks = []
    for i in range(count):
        c = RawClient(path)
        c.handshake("disk")
        c.send(wire.pack_request(Cmd.WRITE, i, 0, length, 0) + bytes(1024))
        socks.append(c.sock)
    return socks


def test_a_write_header_costs_no_memory_until_its_payload_arrives(tmp_path: Path) -> None:
    """A 28-byte header announcing 32 MiB allocated and zeroed 32 MiB on today's main, per
    connection; now the payload buffer grows with the bytes that arrived, and the claims
    together cannot pass the payload budget (the rest wait, holding nothing)."""
    n = 8
    length = 32 * MiB
    budget = 64 * MiB

    async def body(path: str, srv: NBDServer) -> None:
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            socks = await asyncio.to_thread(hostile_write_headers, path, n, length)
            await wait_until(lambda: len(srv.connections) == n, f"{n} connections")
            await asyncio.sleep(0.5)  # every header has been parsed by now
            grown = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
        # 8 receive buffers (512 KiB) + 2 payload buffers of one 1 MiB step, plus slack
        assert grown < 12 * MiB, f"{grown} bytes after {n} hostile headers"
        await wait_until(
            lambda: srv.budget.used == budget and srv.budget.waiting == n - 2,
            "two reservations and six waiters",
        )
        assert srv.budget.peak <= budget
        # the clients go away: everything they reserved comes back
        for s in socks:
            s.close()
        await wait_until(lambda: not srv.connections, "connections to close")
        assert srv.budget.used == 0 and srv.budget.waiting == 0

    run_server(tmp_path, body, ServerLimits(payload_memory=budget))


def test_writes_waiting_for_the_budget_all_complete_in_turn(tmp_path: Path) -> None:
    """Back-pressure, not refusal: more large writes than the budget holds at once all land."""
    n = 6
    length = 20 * MiB
    payloads = [os.urandom(length) for _ in range(n)]

    async def body(path: str, srv: NBDServer) -> None:
        clients = [await Client.connect(path) for _ in range(n)]
        for i, (c, p) in enumerate(zip(clients, payloads, strict=True)):
            c.request(Cmd.WRITE, i, i * length, length, data=p)
        for i, c in enumerate(clients):
            assert await c.reply() == (i, 0, b"")
        for i, c in enumerate(clients):
            c.request(Cmd.READ, 100 + i, i * length, length)
            assert await c.reply(length) == (100 + i, 0, payloads[i])
            await c.close()
        assert srv.budget.peak <= 48 * MiB

    run_server(tmp_path, body, ServerLimits(payload_memory=48 * MiB), size=n * length)


def test_reads_a_client_never_collects_are_bounded_by_the_budget(tmp_path: Path) -> None:
    """READ data waiting in the transport of a client that does not read counts against the
    budget: four such clients asking for 32 MiB at a time hold at most the budget."""
    n = 4
    budget = 40 * MiB

    async def body(path: str, srv: NBDServer) -> None:
        clients = [await Client.connect(path) for _ in range(n)]
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            for c in clients:
                for k in range(4):
                    c.request(Cmd.READ, k, 0, 32 * MiB)
            await asyncio.sleep(1.0)  # every READ the server will start has started
            grown = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
        assert grown < budget + 8 * MiB, f"{grown} bytes of unread READ data"
        await wait_until(lambda: srv.budget.waiting == n - 1, "three waiting readers")
        assert srv.budget.peak <= budget
        # the reader that got its data drains it; the others then get theirs
        for c in clients:
            for k in range(4):
                cookie, err, data = await c.reply(32 * MiB)
                assert (cookie, err, len(data)) == (k, 0, 32 * MiB)
            await c.close()

    run_server(tmp_path, body, ServerLimits(payload_memory=budget))
