"""The stream target's publisher against a real nats-server, in process: a re-send is a no-op
(``Nats-Msg-Id``), and a server that stops answering mid-window (SIGSTOP) makes the publisher
re-send from exactly the first message not stored, so the stream holds every record once, in
order."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from pathlib import Path

from blocktrace.jetstream.conn import NatsURL
from blocktrace.jetstream.consumer import StreamSource
from blocktrace.stream import Record, RecordKind, TargetInfo
from blocktrace.stream.registry import targets
from blocktrace.targets.stream import StreamTarget
from nats_helpers import NatsCluster, require_nats


def stream_target(spec: dict[str, str]) -> StreamTarget:
    """The target as ``--trace``/QMP build it: through the registry and the type's schema."""
    target = targets().create(spec)
    assert isinstance(target, StreamTarget)
    return target


def records(n: int, first: int = 1, *, fua: bool = False) -> list[Record]:
    """4 KiB writes; ``fua`` ones each end their group, so each is a message of its own."""
    return [
        Record(i, RecordKind.WRITE, (i % 1024) * 4096, 4096, fua=fua, data=os.urandom(4096))
        for i in range(first, first + n)
    ]


async def read_back(url: str) -> list[Record]:
    async with StreamSource(NatsURL.parse(url)) as src:
        return [p.record async for p in src.records()]


def test_resend_of_a_stored_batch_is_a_no_op(tmp_path: Path) -> None:
    require_nats()
    with NatsCluster(tmp_path / "nats", 1) as cluster:
        url = cluster.url(0, "dedup.disk")

        async def run() -> None:
            target = stream_target({"type": "stream", "uri": url})
            await target.open(TargetInfo("disk", 1 << 30, 512))
            recs = records(300)
            start = target.publisher.last_seq
            await target.deliver(recs)
            end = target.publisher.last_seq
            assert 0 < end - start < 300  # grouped: a few messages
            # what a retry after a reconnect does: the same messages again
            target.publisher.last_seq = start  # it believes none of them was stored
            await target.deliver(recs)
            assert target.publisher.duplicates == end - start
            assert target.publisher.last_seq == end
            fua = records(300, first=301, fua=True)  # one message each
            await target.deliver(fua)
            assert target.publisher.last_seq == end + 300
            target.publisher.last_seq = end
            await target.deliver(fua)
            assert target.publisher.duplicates == end - start + 300
            await target.close(clean=True)
            assert await read_back(url) == recs + fua

        asyncio.run(run())


def test_server_paused_mid_window_loses_and_duplicates_nothing(tmp_path: Path) -> None:
    """SIGSTOP the server, publish, SIGCONT it 1.5 s later from another thread: no
    acknowledgement within ack-timeout, so the publisher asks where the stream ends and goes on
    from there.  Then the same at moments swept across a 4000-message window (where the pause
    falls depends on the machine's speed; it catches windows partly acknowledged: FUA writes,
    so that each record is a message of its own).  Every time the stream holds each record
    once, in order."""
    require_nats()
    with NatsCluster(tmp_path / "nats", 1) as cluster:
        proc = cluster.procs[0]
        assert proc is not None

        def pause(seconds: float) -> None:
            proc.send_signal(signal.SIGSTOP)
            time.sleep(seconds)
            proc.send_signal(signal.SIGCONT)

        async def attempt(n: int, count: int, delay: float | None) -> int:
            url = cluster.url(0, f"pause{n}.disk")
            target = stream_target(
                {"type": "stream", "uri": url, "ack-timeout": "0.5", "retry-timeout": "30"}
            )
            await target.open(TargetInfo("disk", 1 << 30, 512))
            recs = records(count, fua=True)
            if delay is None:  # paused before the window is sent
                proc.send_signal(signal.SIGSTOP)
                timer = threading.Timer(1.5, proc.send_signal, (signal.SIGCONT,))
            else:
                timer = threading.Timer(delay, pause, (1.0,))
            timer.start()
            await target.deliver(recs)
            timer.join()
            more = records(50, first=count + 1)  # grouped
            await target.deliver(more)  # and the stream goes on from where it is
            retries = target.publisher.retries
            await target.close(clean=True)
            assert await read_back(url) == recs + more
            return retries

        try:
            assert asyncio.run(attempt(0, 200, None)) >= 1
            for n, delay in enumerate((0.2, 0.4, 0.6, 0.8, 1.0), 1):
                asyncio.run(attempt(n, 4000, delay))
        finally:
            proc.send_signal(signal.SIGCONT)
