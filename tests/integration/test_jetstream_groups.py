"""Groups of records in one JetStream message, against a real nats-server.

* A durable follower acknowledges only at the end of a message: an acknowledgement covers the
  whole group, so one sent mid-group and followed by a crash would make the restarted follower
  skip the group's rest.
* Streams written before groups existed (version 1 messages only, as the publisher wrote them
  then: one record per message, large ones in chunks, ``Nats-Expected-Last-Sequence``) replay
  with today's consumers, alone and continued by today's publisher.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path

import pytest

from blocktrace.cli.jetstream import follow_stream, replay_stream
from blocktrace.jetstream import wire
from blocktrace.jetstream.conn import NatsURL
from blocktrace.jetstream.consumer import StreamSource
from blocktrace.stream import Record, RecordKind, TargetInfo
from blocktrace.stream.registry import targets
from blocktrace.targets.stream import StreamTarget
from nats_helpers import NatsCluster, require_nats
from support import make_image

MiB = 1024 * 1024
TRACE = "00112233445566ff"


@pytest.fixture
def nats1(tmp_path: Path) -> NatsCluster:
    require_nats()
    with NatsCluster(tmp_path / "nats", 1) as cluster:
        yield cluster


def writes(n: int, first: int = 1) -> list[Record]:
    return [
        Record(i, RecordKind.WRITE, (i % 1024) * 4096, 4096, data=os.urandom(4096))
        for i in range(first, first + n)
    ]


def applied(base: Path, records: list[Record], out: Path) -> bytes:
    """``base`` with ``records`` applied, as the expected image."""
    shutil.copyfile(base, out)
    with open(out, "r+b") as f:
        for rec in records:
            if rec.kind is RecordKind.WRITE:
                assert rec.data is not None
                f.seek(rec.offset)
                f.write(rec.data)
            elif rec.kind.is_data:
                f.seek(rec.offset)
                f.write(bytes(rec.length))
    return out.read_bytes()


async def publish(url: str, batches: list[list[Record]]) -> None:
    target = targets().create({"type": "stream", "uri": url})
    assert isinstance(target, StreamTarget)
    await target.open(TargetInfo("disk", 4 * MiB, 512))
    for batch in batches:
        await target.deliver(batch)
    await target.close(clean=True)


class Crash(Exception):
    pass


def test_follower_acknowledges_only_whole_groups(tmp_path: Path, nats1: NatsCluster) -> None:
    """600 writes published in one batch are three group messages; a follower acknowledging
    every 100 records crashes right after its first acknowledgement.  Restarted, it must apply
    every record: the first acknowledgement fell at the end of a group, not at record 100."""
    url = nats1.url(0, "grp.disk")
    recs = writes(600)
    asyncio.run(publish(url, [recs]))
    base = make_image(tmp_path / "base.img", 4 * MiB, seed=1)
    replica = tmp_path / "replica.img"
    shutil.copyfile(base, replica)
    acks: list[int] = []

    def crash(stats: object) -> None:
        acks.append(1)
        raise Crash

    src = StreamSource(NatsURL.parse(url), durable="grp")
    with pytest.raises(Crash):
        asyncio.run(follow_stream(src, str(replica), follow=False, ack_every=100, on_batch=crash))
    assert acks == [1]
    src = StreamSource(NatsURL.parse(url), durable="grp")
    asyncio.run(follow_stream(src, str(replica), follow=False, ack_every=100))
    assert replica.read_bytes() == applied(base, recs, tmp_path / "expected.img")


def test_streams_of_the_old_format_stay_readable(tmp_path: Path, nats1: NatsCluster) -> None:
    """Version 1 messages as the publisher wrote them before groups (every kind, a write split
    in chunks), then a today's publisher appending groups to the same stream: ``replay``
    applies all of it, in order."""
    url = nats1.url(0, "old.disk")
    old = [
        *writes(5),
        Record(6, RecordKind.ZERO, 8192, 4096, fua=True),
        Record(7, RecordKind.TRIM, 0, 4096),
        Record(8, RecordKind.FLUSH),
        Record(9, RecordKind.MARK, name="old"),
        Record(10, RecordKind.WRITE, 65536, 3 * MiB, data=os.urandom(3 * MiB)),  # chunks
    ]

    async def publish_v1() -> None:
        import nats

        from blocktrace.jetstream.conn import StreamSettings, ensure_stream

        nc = await nats.connect(nats1.url(0))
        js = nc.jetstream()
        await ensure_stream(js, StreamSettings.pop("old.disk", {}), what="test")
        last = 0
        for rec in old:
            for msg in wire.encode(rec, TRACE, wire.chunk_size(nc.max_payload)):
                headers = {**msg.headers, "Nats-Expected-Last-Sequence": str(last)}
                ack = await js.publish("old.disk", msg.body, headers=headers)
                last = ack.seq
        await nc.close()

    asyncio.run(publish_v1())
    new = [*writes(300, first=11), Record(311, RecordKind.FLUSH)]
    asyncio.run(publish(url, [new]))
    base = make_image(tmp_path / "base.img", 4 * MiB, seed=2)
    copy = tmp_path / "copy.img"
    shutil.copyfile(base, copy)

    async def read() -> list[Record]:
        async with StreamSource(NatsURL.parse(url)) as src:
            return [p.record async for p in src.records()]

    assert asyncio.run(read()) == old + new
    stats = asyncio.run(replay_stream(StreamSource(NatsURL.parse(url)), str(copy)))
    assert stats.records == len(old) + len(new)
    assert copy.read_bytes() == applied(base, old + new, tmp_path / "expected.img")


def test_small_messages_then_large_ones_are_all_read(
    tmp_path: Path, nats1: NatsCluster, caplog: pytest.LogCaptureFixture
) -> None:
    """600 one-record messages (FUA writes), then 100 groups of about 1 MiB: a pull sized by
    the small messages seen so far would ask for 512 messages, 100 MiB, beyond the
    subscription's pending limit, and nats-py would drop the rest silently (the server counts
    them delivered: at the stream's end they never come).  Every record is read, once, with no
    consumer to re-create."""
    url = nats1.url(0, "mixed.disk")
    small = [r._replace(fua=True) for r in writes(600)]
    large = writes(100 * 250, first=601)
    asyncio.run(publish(url, [small, *(large[i : i + 250] for i in range(0, len(large), 250))]))

    async def read() -> list[Record]:
        async with StreamSource(NatsURL.parse(url)) as src:
            out = [p.record async for p in src.records()]
            assert src.skipped == 0
            return out

    with caplog.at_level("WARNING", logger="blocktrace.jetstream.consumer"):
        assert asyncio.run(read()) == small + large
    assert not caplog.records, [r.getMessage() for r in caplog.records]
