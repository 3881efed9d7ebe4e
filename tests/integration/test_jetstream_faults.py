"""Faults with a real 3-node JetStream cluster (issue #13, item 4).

fio writes to a traced export (``copy-mode=write-blocking``, an R3 stream) while a durable
follower keeps a replica from the stream; then ``kill -9``: one node (brought back), the
stream's leader (brought back), the publisher, the follower.  Afterwards the stream replays to
exactly the served image, the restarted follower's replica verifies identical, and the records
on the stream are each there once, in the order they were applied.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import time
from pathlib import Path

from blocktrace.jetstream.conn import NatsURL
from blocktrace.jetstream.consumer import StreamSource
from nats_helpers import NatsCluster, require_nats
from support import BLOCKTRACE, ServerProcess, blocktrace, make_image, require

MiB = 1024 * 1024
SIZE = 32 * MiB
STREAM = "BT_fleet_vm1"


def stream_end(url: str) -> int:
    async def end() -> int:
        async with StreamSource(NatsURL.parse(url)) as src:
            return await src.end()

    try:
        return asyncio.run(end())
    except Exception:
        return -1


def wait_growth(
    cluster: NatsCluster, beyond: int, fio: subprocess.Popen[str], timeout: float = 60
) -> int:
    """Until the stream has more than ``beyond`` messages (while fio runs), asked of a live
    node."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        n = stream_end(cluster.url(cluster.alive()[0], "fleet.vm1"))
        if n > beyond:
            return n
        assert fio.poll() is None, "fio ended before the faults were injected"
        time.sleep(0.3)
    raise AssertionError(f"stream did not grow beyond {beyond} within {timeout}s")


def test_cluster_faults_under_fio_lose_and_duplicate_nothing(tmp_path: Path) -> None:
    require_nats()
    require("fio")
    img = make_image(tmp_path / "disk.img", SIZE, seed=11)
    base = tmp_path / "base.img"
    shutil.copyfile(img, base)
    replica = tmp_path / "replica.img"
    shutil.copyfile(img, replica)
    with NatsCluster(tmp_path / "nats", 3) as cluster:
        url = cluster.url(0, "fleet.vm1")
        follower_url = cluster.url(1, "fleet.vm1")
        spec = f"disk=stream:{url},replicas=3,copy-mode=write-blocking,ack-timeout=2"
        srv = ServerProcess(tmp_path, [img], ["--trace", spec]).start()
        follower_log = open(tmp_path / "follow.stderr", "wb")  # noqa: SIM115
        follower = subprocess.Popen(
            [*BLOCKTRACE, "follow", follower_url, f"replica:{replica}", "--durable", "r1"],
            stdout=subprocess.DEVNULL,
            stderr=follower_log,
        )
        fio = subprocess.Popen(
            ["fio", "--name=w", "--ioengine=nbd", f"--uri={srv.uri('disk')}", "--rw=randwrite",
             "--bs=4k", "--iodepth=8", "--size=24M", "--time_based", "--runtime=30",
             "--randrepeat=0", "--norandommap"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        try:
            n = wait_growth(cluster, 300, fio)
            leader = cluster.leader(STREAM)
            other = next(i for i in range(3) if i != leader)
            cluster.kill(other)  # 1. one node (not the leader): quorum holds
            n = wait_growth(cluster, n + 300, fio)
            cluster.start_node(other)
            cluster.wait_ready()
            time.sleep(2)  # let it catch up before the leader goes
            leader = cluster.leader(STREAM)
            cluster.kill(leader)  # 2. the stream's leader: a new one is elected
            wait_growth(cluster, n + 300, fio)
            cluster.start_node(leader)
            cluster.wait_ready()
            out, _ = fio.communicate(timeout=120)
            assert fio.returncode == 0, out  # every write acknowledged through the faults
        finally:
            if fio.poll() is None:
                fio.kill()
                fio.wait()
        assert follower.poll() is None, "the follower did not survive the node faults"
        srv.kill()  # 3. the publisher, kill -9: nothing relies on a clean end
        follower.kill()  # 4. the consumer, kill -9, wherever it was
        follower.wait(10)
        follower_log.close()
        print("publisher:", srv.stderr()[-1500:])  # shown with -s, or on failure
        print("follower:", (tmp_path / "follow.stderr").read_text()[-1500:])

        # the restarted follower resumes from its acknowledged position and catches up
        blocktrace("follow", follower_url, f"replica:{replica}", "--durable", "r1", "--once")
        assert replica.read_bytes() == img.read_bytes(), "follower replica differs"

        copy = tmp_path / "copy.img"
        shutil.copyfile(base, copy)
        blocktrace("replay", url, copy, timeout=300)
        assert copy.read_bytes() == img.read_bytes(), "stream replay differs from the image"

        async def read_all() -> list[int]:
            async with StreamSource(NatsURL.parse(url)) as src:
                seqs = [p.record.seq async for p in src.records()]
                assert src.decoder.torn == 0
                return seqs

        seqs = asyncio.run(read_all())
        assert len(seqs) > 900
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), "missing or duplicate record"
    assert os.path.exists(img)
