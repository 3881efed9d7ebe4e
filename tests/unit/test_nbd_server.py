"""The asyncio adapter in-process, over real Unix/TCP sockets, with devices that suspend:
the Task fallback, receive-buffer pinning, out-of-order replies, large payloads, flush,
shutdown with requests in flight, runtime export add/remove."""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from blocktrace.block.device import Extent, ExtentFlags, ReadableBuffer
from blocktrace.block.memory import MemoryDevice
from blocktrace.errors import BlockDeviceError, StateError
from blocktrace.exports import Export, ExportRegistry
from blocktrace.nbd import server as nbd_server
from blocktrace.nbd import wire
from blocktrace.nbd.constants import Cmd, CmdFlag, NBDError
from blocktrace.nbd.events import NEED_DATA, HandshakeDone
from blocktrace.nbd.handshake import ClientHandshake
from blocktrace.nbd.server import NBDServer
from blocktrace.service import Service, ServiceConfig

MiB = 1024 * 1024


class GatedDevice(MemoryDevice):
    """Writes wait on ``gate`` (when closed) before touching ``data``: a device that holds the
    server's payload view across a suspension, like a blocking trace target would."""

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.gate = asyncio.Event()
        self.gate.set()
        self.flushes = 0
        self.fail_at: int | None = None

    async def write(self, offset: int, data: ReadableBuffer, *, fua: bool = False) -> None:
        if offset == self.fail_at:
            raise BlockDeviceError(errno.EIO, "injected")
        if not self.gate.is_set():
            await self.gate.wait()
        await super().write(offset, data, fua=fua)
        if fua:
            await asyncio.sleep(0)

    async def flush(self) -> None:
        self.flushes += 1
        await asyncio.sleep(0)


class Client:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def connect(cls, path: str, export: str = "disk", structured: bool = False) -> Client:
        r, w = await asyncio.open_unix_connection(path)
        c = cls(r, w)
        contexts = ("base:allocation",) if structured else ()
        hs = ClientHandshake(export, structured_replies=structured, meta_contexts=contexts)
        while True:
            out = hs.data_to_send()
            if out:
                w.write(out)
            ev = hs.next_event()
            if ev is not NEED_DATA:
                assert isinstance(ev, HandshakeDone)
                return c
            data = await r.read(65536)
            assert data, "server closed during handshake"
            hs.receive_data(data)

    def request(
        self,
        cmd: int,
        cookie: int,
        offset: int = 0,
        length: int = 0,
        flags: int = 0,
        data: bytes = b"",
    ) -> None:
        self.writer.write(wire.pack_request(cmd, cookie, offset, length, flags) + data)

    async def reply(self, read_len: int = 0) -> tuple[int, int, bytes]:
        magic, error, cookie = struct.unpack(">IIQ", await self.reader.readexactly(16))
        assert magic == 0x67446698
        data = await self.reader.readexactly(read_len) if read_len and not error else b""
        return cookie, error, data

    async def close(self) -> None:
        self.writer.close()
        await self.writer.wait_closed()


Body = Callable[[str, GatedDevice, NBDServer], Awaitable[None]]


def serve(
    tmp_path: Path, body: Body, size: int = 8 * MiB, device: type[GatedDevice] | None = None
) -> GatedDevice:
    """Run ``body`` against an in-process server of one export backed by a ``device``
    (a :class:`GatedDevice` by default); returns the device, for checks after shutdown."""
    dev = (device or GatedDevice)(size)

    async def main() -> None:
        reg = ExportRegistry()
        reg.add(Export("disk", dev))
        srv = NBDServer(reg)
        path = os.fspath(tmp_path / "s.sock")
        listener = await asyncio.get_running_loop().create_unix_server(srv.protocol_factory, path)
        try:
            await asyncio.wait_for(body(path, dev, srv), 20)
        finally:
            listener.close()
            await srv.shutdown(5)

    asyncio.run(main())
    return dev


def test_pinned_buffer_survives_suspended_writes(tmp_path: Path) -> None:
    """200 pipelined 8 KiB writes (more than the receive buffer holds) all suspend holding a
    view of the receive buffer; none may see its bytes overwritten by later requests."""

    async def body(path: str, dev: GatedDevice, srv: NBDServer) -> None:
        dev.gate.clear()
        c = await Client.connect(path)
        n, bs = 200, 8192  # under MAX_INFLIGHT, over the receive buffer size
        assert n * bs > nbd_server.BUFFER_SIZE
        for i in range(n):
            c.request(Cmd.WRITE, i, i * bs, bs, data=bytes([i % 251 + 1]) * bs)
        await c.writer.drain()
        # wait until the server parsed them all (they are parked in the device)
        for _ in range(500):
            if sum(conn._inflight for conn in srv.connections) == n:
                break
            await asyncio.sleep(0.01)
        assert sum(conn._inflight for conn in srv.connections) == n
        dev.gate.set()
        cookies = set()
        for _ in range(n):
            cookie, error, _ = await c.reply()
            assert error == 0
            cookies.add(cookie)
        assert cookies == set(range(n))
        for i in range(n):
            assert dev.buf[i * bs : (i + 1) * bs] == bytes([i % 251 + 1]) * bs, i
        (conn,) = srv.connections
        assert conn._held == 0 and not conn._retired  # every retired buffer was released
        await c.close()

    serve(tmp_path, body)


def test_suspended_payload_bytes_are_bounded(tmp_path: Path) -> None:
    """Large writes parked in the device (a full trace queue, a slow remote) hold their
    payloads; past MAX_HELD_BYTES the connection stops reading instead of buffering more of
    the client's pipeline, and resumes once they finish."""
    from blocktrace.nbd import connbase as connection

    async def body(path: str, dev: GatedDevice, srv: NBDServer) -> None:
        dev.gate.clear()
        c = await Client.connect(path)
        bs = 2 * MiB
        n = connection.MAX_HELD_BYTES // bs + 8  # 8 more than may be held
        payloads = [os.urandom(bs) for _ in range(n)]
        for i, p in enumerate(payloads):
            c.request(Cmd.WRITE, i, i * bs, bs, data=p)
        limit = connection.MAX_HELD_BYTES // bs
        (conn,) = srv.connections
        for _ in range(1000):
            if conn._inflight >= limit and conn._reading_paused:
                break
            await asyncio.sleep(0.01)
        assert conn._reading_paused
        assert conn._inflight == limit  # the rest stays in the socket, not in our memory
        assert conn._held == limit * bs
        dev.gate.set()
        assert {(await c.reply())[:2] for _ in range(n)} == {(i, 0) for i in range(n)}
        for i, p in enumerate(payloads):
            assert bytes(dev.buf[i * bs : (i + 1) * bs]) == p, i
        assert conn._held == 0 and conn._inflight == 0
        await c.close()

    serve(tmp_path, body, size=(connection.MAX_HELD_BYTES // (2 * MiB) + 8) * 2 * MiB)


def test_out_of_order_replies_and_large_write(tmp_path: Path) -> None:
    async def body(path: str, dev: GatedDevice, srv: NBDServer) -> None:
        c = await Client.connect(path)
        big = os.urandom(3 * MiB)  # larger than the receive buffer: its own payload buffer
        dev.gate.clear()
        c.request(Cmd.WRITE, 1, 0, len(big), data=big)  # parks in the device
        c.request(Cmd.READ, 2, 4 * MiB, 4096)  # completes at once
        cookie, error, data = await c.reply(4096)
        assert (cookie, error, data) == (2, 0, bytes(4096))  # answered before cookie 1
        dev.gate.set()
        assert await c.reply() == (1, 0, b"")
        assert bytes(dev.buf[: len(big)]) == big
        # two large writes completing at once: the second reuses the first's buffer
        a, b = os.urandom(2 * MiB), os.urandom(MiB + 4096)
        c.request(Cmd.WRITE, 10, 0, len(a), data=a)
        c.request(Cmd.WRITE, 11, 4 * MiB, len(b), data=b)
        assert {await c.reply(), await c.reply()} == {(10, 0, b""), (11, 0, b"")}
        assert bytes(dev.buf[: len(a)]) == a and bytes(dev.buf[4 * MiB : 4 * MiB + len(b)]) == b
        c.request(Cmd.WRITE, 3, 5 * MiB, 4096, CmdFlag.FUA, b"f" * 4096)
        c.request(Cmd.FLUSH, 4)
        assert {await c.reply(), await c.reply()} == {(3, 0, b""), (4, 0, b"")}
        assert dev.flushes == 1
        dev.fail_at = 6 * MiB
        c.request(Cmd.WRITE, 5, 6 * MiB, 512, data=bytes(512))
        assert await c.reply() == (5, NBDError.EIO, b"")
        c.request(Cmd.DISC, 6)
        assert await c.reader.read() == b""  # server closed after DISC
        await c.close()

    serve(tmp_path, body)


class KeepingDevice(GatedDevice):
    """Keeps every WRITE payload object it is given, by reference (a trace filter does that
    with ``bytes``; were a reused buffer handed over, later requests would overwrite it)."""

    keeps_payloads = True

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.kept: list[tuple[int, ReadableBuffer]] = []
        self.views: list[ReadableBuffer] = []  # the objects themselves

    async def write(self, offset: int, data: ReadableBuffer, *, fua: bool = False) -> None:
        self.kept.append((offset, data if type(data) is bytes else memoryview(data).tobytes()))
        self.views.append(data)
        await super().write(offset, data, fua=fua)


def test_large_payloads_a_device_keeps_are_owned_never_reused(tmp_path: Path) -> None:
    """For a device that keeps payloads, a large WRITE arrives as a fresh ``bytes`` object
    (no copy needed to keep it), and no later request ever writes into one kept earlier, with
    writes completing at once, suspending, and interleaved with small ones."""
    sent: list[tuple[int, bytes]] = []

    async def body(path: str, dev: GatedDevice, srv: NBDServer) -> None:
        assert isinstance(dev, KeepingDevice)
        c = await Client.connect(path)
        for i in range(8):
            size = [MiB, 3 * MiB, 600 * 1024, 4096][i % 4]
            data = os.urandom(size)
            if i == 5:
                dev.gate.clear()  # this one suspends in the device
            c.request(Cmd.WRITE, i, i * 4 * MiB, size, data=data)
            sent.append((i * 4 * MiB, data))
            if i == 5:
                for _ in range(500):
                    if len(dev.kept) == 6:
                        break
                    await asyncio.sleep(0.01)
                dev.gate.set()
        for _ in range(8):
            assert (await c.reply())[1] == 0
        await c.close()

    dev = serve(tmp_path, body, 32 * MiB, KeepingDevice)
    assert isinstance(dev, KeepingDevice)
    assert dev.kept == sent  # every kept object still holds what was sent
    large = [v for v in dev.views if len(v) > nbd_server.BUFFER_SIZE]
    assert len(large) == 6 and all(type(v) is bytes for v in large)
    assert [bytes(v) for v in large] == [d for _, d in sent if len(d) > nbd_server.BUFFER_SIZE]
    for offset, data in sent:
        assert bytes(dev.buf[offset : offset + len(data)]) == data


class LateKeepingDevice(KeepingDevice):
    """Starts keeping payloads only when told: a trace attached to a live export."""

    keeping = False

    @property
    def keeps_payloads(self) -> bool:  # type: ignore[override]
        return self.keeping


def test_payloads_become_owned_when_a_trace_attaches_to_an_open_connection(
    tmp_path: Path,
) -> None:
    async def body(path: str, dev: GatedDevice, srv: NBDServer) -> None:
        assert isinstance(dev, LateKeepingDevice)
        c = await Client.connect(path)
        data = [os.urandom(MiB) for _ in range(3)]
        for i, d in enumerate(data):
            dev.keeping = i > 0
            c.request(Cmd.WRITE, i, i * MiB, MiB, data=d)
            assert (await c.reply())[:2] == (i, 0)
        await c.close()
        assert [type(v) is bytes for v in dev.views] == [False, True, True]
        assert [d for _, d in dev.kept] == data

    serve(tmp_path, body, 8 * MiB, LateKeepingDevice)


@pytest.mark.parametrize("owned", [True, False])
def test_payload_buffer_grows_as_bytes_arrive_and_hands_over_the_payload(owned: bool) -> None:
    """A 32 MiB payload's buffer starts at one step and doubles as it fills: it never holds
    more than twice what arrived (or one step); an owned one ends as a fresh ``bytes``."""
    from blocktrace.nbd.dispatch import GROW_STEP, PayloadBuffer

    length = 32 * MiB
    data = os.urandom(length)
    p = PayloadBuffer(length, owned=owned)
    assert p.capacity == 0  # nothing allocated from the header's claim
    p.fill(memoryview(data)[:1000])
    pos = 1000
    while not p.complete:
        room = p.space()
        assert p.capacity <= max(GROW_STEP, 2 * pos)
        n = min(len(room), 300_000)
        room[:n] = data[pos : pos + n]
        del room
        p.filled += n
        pos += n
    out = p.take()
    assert bytes(out) == data
    if owned:
        assert type(out) is bytes
        out2 = PayloadBuffer(4096, owned=True)
        out2.fill(memoryview(b"y" * 4096))
        assert out2.take() == b"y" * 4096 and out == data  # a fresh object: no sharing
    else:
        assert p.reusable() is not None


def test_shutdown_finishes_in_flight_requests(tmp_path: Path) -> None:
    async def body(path: str, dev: GatedDevice, srv: NBDServer) -> None:
        c = await Client.connect(path)
        dev.gate.clear()
        c.request(Cmd.WRITE, 1, 0, 4096, data=b"s" * 4096)
        await c.writer.drain()
        while not any(conn._inflight for conn in srv.connections):
            await asyncio.sleep(0.01)
        stopping = asyncio.ensure_future(srv.shutdown(10))
        await asyncio.sleep(0.05)
        assert not stopping.done()  # waiting for the write
        dev.gate.set()
        assert await c.reply() == (1, 0, b"")
        await stopping
        assert await c.reader.read() == b""
        assert dev.buf[:4096] == b"s" * 4096
        await c.close()

    serve(tmp_path, body)


def test_tcp_connections_use_nodelay(tmp_path: Path) -> None:
    async def main() -> None:
        reg = ExportRegistry()
        reg.add(Export("disk", MemoryDevice(MiB)))
        srv = NBDServer(reg)
        listener = await asyncio.get_running_loop().create_server(
            srv.protocol_factory, "127.0.0.1", 0
        )
        port = listener.sockets[0].getsockname()[1]
        r, w = await asyncio.open_connection("127.0.0.1", port)
        assert (await r.readexactly(18))[:8] == b"NBDMAGIC"
        (conn,) = srv.connections
        assert conn.transport is not None
        sock = conn.transport.get_extra_info("socket")
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        w.close()
        listener.close()
        await srv.shutdown(5)

    asyncio.run(main())


def test_service_runtime_export_add_and_remove(tmp_path: Path) -> None:
    a = tmp_path / "a.img"
    a.write_bytes(bytes(MiB))
    b = tmp_path / "b.img"
    b.write_bytes(b"b" * MiB)
    sock = tmp_path / "svc.sock"

    async def main() -> None:
        svc = Service(ServiceConfig(images=[("a", os.fspath(a))], socket=os.fspath(sock)))
        started: list[str] = []
        stopped: list[str] = []

        async def on_start(s: Service) -> None:
            started.append(",".join(e.name for e in s.registry))

        async def on_stop(s: Service) -> None:
            stopped.append("x")

        svc.startup_hooks.append(on_start)
        svc.shutdown_hooks.append(on_stop)
        await svc.start()
        assert started == ["a"]
        assert oct(os.stat(sock).st_mode & 0o777) == "0o600"
        svc.add_export("b", os.fspath(b))
        c = await Client.connect(os.fspath(sock), "b")
        c.request(Cmd.READ, 1, 0, 4)
        assert await c.reply(4) == (1, 0, b"bbbb")
        with pytest.raises(StateError):
            await svc.remove_export("b")  # in use: "safe" refuses
        await svc.remove_export("b", mode="hard")
        assert await c.reader.read() == b""
        await c.close()
        assert "b" not in svc.registry
        await svc.stop()
        assert stopped == ["x"] and not sock.exists()

    asyncio.run(main())


def test_half_close_still_gets_in_flight_replies(tmp_path: Path) -> None:
    async def body(path: str, dev: GatedDevice, srv: NBDServer) -> None:
        c = await Client.connect(path)
        dev.gate.clear()
        c.request(Cmd.WRITE, 1, 0, 512, data=b"h" * 512)
        await c.writer.drain()
        while not any(conn._inflight for conn in srv.connections):
            await asyncio.sleep(0.01)
        c.writer.write_eof()
        await asyncio.sleep(0.05)
        dev.gate.set()
        assert await c.reply() == (1, 0, b"")
        assert await c.reader.read() == b""
        await c.close()

    serve(tmp_path, body)


def test_random_garbage_after_negotiation_never_breaks_the_server(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """200 connections each send random bytes, some shaped like requests (right magic, random
    fields); each is answered or dropped, nothing is logged as an internal error, and a
    bystander connection opened first still works at the end."""
    import random

    rng = random.Random(1234)

    async def body(path: str, dev: GatedDevice, srv: NBDServer) -> None:
        bystander = await Client.connect(path)
        for _ in range(200):
            c = await Client.connect(path)
            junk = bytearray()
            for _ in range(rng.randint(1, 4)):
                if rng.random() < 0.7:
                    cmd = rng.choice([0, 1, 2, 3, 4, 5, 6, 7, 8, 200])
                    length = rng.choice([0, 1, 512, 4096, 1 << 20, (1 << 32) - 1])
                    offset = rng.choice([0, 512, dev.size - 512, dev.size, (1 << 64) - 1])
                    junk += wire.pack_request(
                        cmd, rng.getrandbits(64), offset, length, rng.getrandbits(16)
                    )
                    if cmd == 1 and length <= 4096:
                        junk += os.urandom(length)
                else:
                    junk += os.urandom(rng.randint(1, 64))
            c.writer.write(bytes(junk))
            await c.writer.drain()
            c.writer.close()
        c = bystander
        c.request(Cmd.READ, 1, 0, 512)
        cookie, error, _ = await c.reply(512)
        assert (cookie, error) == (1, 0)
        await c.close()

    with caplog.at_level("WARNING", logger="blocktrace.nbd"):
        serve(tmp_path, body)
    assert not [r for r in caplog.records if r.levelname == "ERROR"], caplog.text


class HugeSparseDevice(MemoryDevice):
    """1 TiB of holes; records the ranges block status was asked about."""

    def __init__(self) -> None:
        super().__init__(0)
        self.size = 1 << 40
        self.asked: list[int] = []

    async def block_status(self, offset: int, length: int) -> list[Extent]:
        self.asked.append(length)
        return [Extent(length, ExtentFlags.HOLE | ExtentFlags.ZERO)]


def test_block_status_asks_the_device_in_growing_windows(tmp_path: Path) -> None:
    async def main() -> None:
        dev = HugeSparseDevice()
        reg = ExportRegistry()
        reg.add(Export("disk", dev))
        srv = NBDServer(reg)
        path = os.fspath(tmp_path / "bs.sock")
        listener = await asyncio.get_running_loop().create_unix_server(srv.protocol_factory, path)
        c = await Client.connect(path, structured=True)
        full = (1 << 32) - 4096
        c.request(Cmd.BLOCK_STATUS, 1, 0, full, CmdFlag.REQ_ONE)
        head = await c.reader.readexactly(20)
        magic, flags, rtype, cookie, length = struct.unpack(">IHHQI", head)
        payload = await c.reader.readexactly(length)
        assert (magic, flags, rtype, cookie) == (0x668E33EF, 1, 5, 1)
        ctx, ext_len, ext_flags = struct.unpack(">III", payload)
        assert (ctx, ext_len, ext_flags) == (1, full, 3)  # one extent covering the request
        assert dev.asked[0] == 64 * MiB and dev.asked[-1] == full  # 64M, 256M, 1G, 4G-4K
        dev.asked.clear()
        c.request(Cmd.BLOCK_STATUS, 2, 0, 4096)
        await c.reader.readexactly(20 + 12)
        assert dev.asked == [4096]
        await c.close()
        listener.close()
        await srv.shutdown(5)

    asyncio.run(main())
