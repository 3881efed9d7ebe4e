"""The asyncio NBD client and NBDDevice against real servers: qemu-nbd and blocktrace serve.

Each server gets the same script: pipelined writes (FUA on some), reads back, zeroes, trims,
block status, flush, requests past the end (the server's error comes back as errno), an
unknown export (refused with the server's reason), and a server killed under load (every
pending request fails with NBDDisconnected; none hangs).
"""

from __future__ import annotations

import asyncio
import errno
import os
import random
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from replica_helpers import QemuNBD, free_port, sparse

from blocktrace.block.device import ExtentFlags
from blocktrace.errors import BlockDeviceError, RemoteProtocolError, UsageError
from blocktrace.nbd.client import NBDDisconnected
from blocktrace.nbd.device import NBDDevice, parse_nbd_uri
from support import ServerProcess, blocktrace, require

MiB = 1024 * 1024
SIZE = 16 * MiB


@pytest.fixture(params=["qemu-nbd", "blocktrace"])
def server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, object]]:
    img = sparse(tmp_path / "r.img", SIZE)
    if request.param == "qemu-nbd":
        require("qemu-nbd")
        q = QemuNBD(img, sock=tmp_path / "q.sock").start()
        try:
            yield q.uri, q
        finally:
            q.stop()
    else:
        with ServerProcess(tmp_path, [img]) as srv:
            yield srv.uri("r"), srv


def test_parse_nbd_uri() -> None:
    a = parse_nbd_uri("nbd://example.org:10810/disk%20one")
    assert (a.host, a.port, a.export) == ("example.org", 10810, "disk one")
    assert parse_nbd_uri("nbd://[::1]/x").host == "::1"
    assert parse_nbd_uri("nbd://h").port == 10809
    u = parse_nbd_uri("nbd+unix:///disk?socket=/run/s.sock")
    assert (u.socket, u.export) == ("/run/s.sock", "disk")
    for bad in ("nbd+unix:///disk", "http://x/y", "nbds://h/x", "nbd:///x"):
        with pytest.raises(UsageError):
            parse_nbd_uri(bad)


def test_client_against_server(server: tuple[str, object]) -> None:
    uri, _ = server

    async def main() -> None:
        dev = await NBDDevice.open(uri)
        assert dev.size == SIZE and dev.can_fua and dev.can_flush and dev.can_zero
        rng = random.Random(1)
        model = bytearray(SIZE)
        writes = [(i * 65536 + rng.randrange(0, 4096), rng.randbytes(5000)) for i in range(64)]
        await asyncio.gather(
            *(dev.write(off, data, fua=i % 7 == 0) for i, (off, data) in enumerate(writes))
        )
        for off, data in writes:
            model[off : off + len(data)] = data
        await dev.write_many([(8 * MiB + i * 8192, b"m" * 4096, i == 3) for i in range(10)])
        for i in range(10):
            model[8 * MiB + i * 8192 : 8 * MiB + i * 8192 + 4096] = b"m" * 4096
        await dev.flush()
        big = os.urandom(3 * MiB + 17)
        await dev.write(10 * MiB, big)
        model[10 * MiB : 10 * MiB + len(big)] = big
        await dev.write_zeroes(10 * MiB, MiB, may_trim=True)
        model[10 * MiB : 11 * MiB] = bytes(MiB)
        await dev.write_zeroes(12 * MiB, 4096)
        model[12 * MiB : 12 * MiB + 4096] = bytes(4096)
        assert bytes(await dev.read(0, SIZE)) == bytes(model)
        parts = await asyncio.gather(*(dev.read(o, 65536) for o in range(0, SIZE, 65536)))
        assert b"".join(bytes(p) for p in parts) == bytes(model)
        if dev.can_extents:
            ext = await dev.block_status(14 * MiB, 2 * MiB)
            assert sum(e.length for e in ext) <= 2 * MiB
            assert ext[0].flags & ExtentFlags.ZERO  # never written: reads as zeroes
        with pytest.raises(BlockDeviceError) as err:
            await dev.read(SIZE - 4096, 8192)
        assert err.value.errno in (errno.EINVAL, errno.ENOSPC, errno.EIO)
        assert bytes(await dev.read(0, 4096)) == bytes(model[:4096])  # still usable
        await dev.close()

    asyncio.run(main())


def test_grouped_writes_complete_once_with_the_first_error(server: tuple[str, object]) -> None:
    """``write_many`` (one completion for the group) and ``start_write`` (a callback from the
    reply handler): a group with a write past the end raises the server's error only after
    every reply is in, and the group's other writes landed; callbacks run once each."""
    uri, _ = server

    async def main() -> None:
        dev = await NBDDevice.open(uri)
        items = [(i * 8192, bytes([i + 1]) * 4096, False) for i in range(8)]
        items.insert(4, (SIZE - 2048, b"x" * 4096, False))  # crosses the end: refused
        with pytest.raises(BlockDeviceError) as err:
            await dev.write_many(items)
        assert err.value.errno in (errno.EINVAL, errno.ENOSPC, errno.EIO)
        assert dev.client is not None and not dev.client._pending  # every reply was in
        for i in range(8):
            assert bytes(await dev.read(i * 8192, 4096)) == bytes([i + 1]) * 4096
        results: dict[str, list[BaseException | None]] = {"a": [], "b": [], "c": []}
        done = asyncio.Event()

        def callback(key: str) -> Callable[[BaseException | None], None]:
            def cb(exc: BaseException | None) -> None:
                results[key].append(exc)
                if all(results.values()):
                    done.set()

            return cb

        # replies come in any order (overlapping writes must never be in flight together)
        assert dev.start_write(MiB, b"a" * 4096, callback("a"))
        assert dev.start_write(MiB + 4096, b"b" * 4096, callback("b"))
        assert dev.start_write(SIZE - 2048, b"c" * 4096, callback("c"))
        async with asyncio.timeout(10):
            await done.wait()
        assert results["a"] == [None] and results["b"] == [None]
        assert len(results["c"]) == 1 and isinstance(results["c"][0], BlockDeviceError)
        assert bytes(await dev.read(MiB, 8192)) == b"a" * 4096 + b"b" * 4096
        await dev.close()
        assert not dev.start_write(0, b"z" * 4096, callback("a"))  # closed: nothing sent
        assert results["a"] == [None]

    asyncio.run(main())


def test_unknown_export_is_refused(server: tuple[str, object]) -> None:
    uri, _ = server
    bad = uri.replace("///r?", "///nosuch?")

    async def main() -> None:
        with pytest.raises(RemoteProtocolError, match="nosuch"):
            await NBDDevice.open(bad)

    asyncio.run(main())


def test_server_killed_under_load_fails_pending_requests(tmp_path: Path) -> None:
    require("qemu-nbd")
    port = free_port()
    q = QemuNBD(sparse(tmp_path / "r.img", SIZE), port=port).start()

    async def main() -> None:
        dev = await NBDDevice.open(f"nbd://127.0.0.1:{port}/r")
        tasks = [
            asyncio.create_task(dev.write((i % 256) * 65536, os.urandom(65536)))
            for i in range(2000)
        ]
        await asyncio.sleep(0)
        q.kill9()
        async with asyncio.timeout(20):
            results = await asyncio.gather(*tasks, return_exceptions=True)
        failed = [r for r in results if isinstance(r, BaseException)]
        assert failed and all(isinstance(r, NBDDisconnected) for r in failed)
        with pytest.raises(NBDDisconnected):
            await dev.flush()
        await dev.close()

    try:
        asyncio.run(main())
    finally:
        q.stop()


def test_connect_refused_is_a_block_device_error(tmp_path: Path) -> None:
    async def main() -> None:
        with pytest.raises(BlockDeviceError):
            await NBDDevice.open(f"nbd://127.0.0.1:{free_port()}/x", timeout=5)
        with pytest.raises(BlockDeviceError):
            await NBDDevice.open(f"nbd+unix:///x?socket={tmp_path}/none.sock", timeout=5)

    asyncio.run(main())


def test_verify_nbd_uri_against_file_lists_differing_regions(tmp_path: Path) -> None:
    require("qemu-nbd")
    img = sparse(tmp_path / "r.img", SIZE)
    copy = sparse(tmp_path / "copy.img", SIZE)
    with open(copy, "r+b") as f:
        for off in (4096 + 10, 5 * MiB, 5 * MiB + 4096):  # two regions, the second 8 KiB
            f.seek(off)
            f.write(b"z")
    q = QemuNBD(img, sock=tmp_path / "q.sock").start()
    try:
        same = blocktrace("verify", q.uri, str(img))
        assert "identical" in same.stdout
        out = blocktrace("verify", q.uri, str(copy), check=False)
    finally:
        q.stop()
    assert out.returncode == 1, out.stderr
    assert "first difference at byte 4106" in out.stdout
    assert "4096+4096" in out.stdout and f"{5 * MiB}+8192" in out.stdout
    bad = blocktrace("verify", "nbd+unix:///r?socket=/nonexistent.sock", str(img), check=False)
    assert bad.returncode != 0 and "Traceback" not in bad.stderr
