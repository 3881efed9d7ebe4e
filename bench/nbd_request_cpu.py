#!/usr/bin/env python3
"""CPU per request of the NBD server's connection code, without sockets or neighbours' noise.

One :class:`~blocktrace.nbd.connection.NBDConnection` is driven in-process as the event loop
drives it (``get_buffer`` / ``buffer_updated``) with pre-built request bytes, over an
in-memory device and a transport that discards replies; the process's CPU time
(``time.process_time``) per request is reported.  It measures exactly the code a change to
the framing, dispatch or payload handling touches, and nothing else, so two source trees can
be compared on a shared machine where fio throughput moves by 2x between runs.

Workloads: ``4k write`` (64 pipelined 4 KiB WRITEs per receive, parsed in place),
``4k read`` (64 pipelined 4 KiB READs), ``1M write owned`` (1 MiB WRITEs to a device that
keeps payloads, as a traced export: received into their own buffer in 64 KiB pieces).

Usage (run each tree in its own process; ``PYTHONPATH`` selects the tree):
    .venv/bin/python bench/nbd_request_cpu.py [--rounds 5]
    PYTHONPATH=/tmp/base/src .venv/bin/python bench/nbd_request_cpu.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from typing import Any

import blocktrace
from blocktrace.block.device import ReadableBuffer
from blocktrace.block.memory import MemoryDevice
from blocktrace.exports import Export, ExportRegistry
from blocktrace.nbd import wire
from blocktrace.nbd.constants import Cmd
from blocktrace.nbd.events import NEED_DATA
from blocktrace.nbd.handshake import ClientHandshake
from blocktrace.nbd.server import NBDServer

MiB = 1024 * 1024


class KeepingDevice(MemoryDevice):
    """Keeps every payload object, as a traced export's filter does (by reference)."""

    keeps_payloads = True

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.kept: list[ReadableBuffer] = []

    async def write(self, offset: int, data: ReadableBuffer, *, fua: bool = False) -> None:
        self.kept.append(data)
        if len(self.kept) > 8:
            del self.kept[:4]
        await super().write(offset, data, fua=fua)


class Sink:
    """Transport stand-in: accepts and drops replies, never pushes back."""

    def __init__(self) -> None:
        self.out: list[bytes] = []
        self.keep = False

    def write(self, data: Any) -> None:
        if self.keep:
            self.out.append(bytes(data))

    def writelines(self, items: Any) -> None:
        for item in items:
            self.write(item)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def close(self) -> None:
        pass

    def abort(self) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0


def feed(conn: Any, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        buf = conn.get_buffer(-1)
        n = min(len(buf), len(view))
        buf[:n] = view[:n]
        del buf
        conn.buffer_updated(n)
        view = view[n:]


def connect(srv: NBDServer) -> tuple[Any, Sink]:
    conn = srv.protocol_factory()
    sink = Sink()
    sink.keep = True
    conn.connection_made(sink)  # type: ignore[arg-type]
    hs = ClientHandshake("disk")
    while True:
        for chunk in sink.out:
            hs.receive_data(chunk)
        sink.out.clear()
        out = hs.data_to_send()
        if out:
            feed(conn, out)
        if hs.next_event() is not NEED_DATA:
            break
    sink.keep = False
    return conn, sink


async def run(workload: str, n: int) -> float:
    dev = KeepingDevice(64 * MiB) if "owned" in workload else MemoryDevice(64 * MiB)
    reg = ExportRegistry()
    reg.add(Export("disk", dev))
    srv = NBDServer(reg)
    conn, _ = connect(srv)
    if workload == "1M write owned":
        payload = bytes(range(256)) * 4096
        header = wire.pack_request(Cmd.WRITE, 1, 0, MiB, 0)
        start = time.process_time()
        for _ in range(n):
            feed(conn, header)
            for k in range(0, MiB, 64 * 1024):
                feed(conn, payload[k : k + 64 * 1024])
            await asyncio.sleep(0)  # the loop's next callbacks (payload hand-over)
        return (time.process_time() - start) / n
    cmd = Cmd.WRITE if workload == "4k write" else Cmd.READ
    batch = bytearray()
    for i in range(64):
        batch += wire.pack_request(cmd, i, (i * 4096 * 7) % (60 * MiB), 4096, 0)
        if cmd == Cmd.WRITE:
            batch += bytes(4096)
    data = bytes(batch)
    start = time.process_time()
    for _ in range(n // 64):
        feed(conn, data)
        await asyncio.sleep(0)
    return (time.process_time() - start) / (n // 64 * 64)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--requests", type=int, default=64_000, help="4 KiB requests per round")
    args = ap.parse_args()
    tree = blocktrace.__file__.rsplit("/src/", 1)[0]
    print(f"tree: {tree}")
    for workload, n in (
        ("4k write", args.requests),
        ("4k read", args.requests),
        ("1M write owned", args.requests // 64),
    ):
        samples = sorted(asyncio.run(run(workload, n)) * 1e6 for _ in range(args.rounds))
        print(
            f"{workload:<16} {statistics.median(samples):8.2f} us/request "
            f"(min {samples[0]:.2f}, max {samples[-1]:.2f}, {args.rounds} rounds)",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
