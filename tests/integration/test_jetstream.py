"""The ``stream`` target and its consumers against a real nats-server (JetStream), with real
clients (qemu-io, libnbd) writing to a real ``blocktrace serve``.

Every check is the same as for a log: the trace's records, read back from JetStream and applied
to the trace's base, must equal the served image byte for byte; a saved log replays to it too.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from blocktrace.jetstream.conn import NatsURL
from blocktrace.jetstream.consumer import StreamSource
from nats_helpers import NatsCluster, require_nats
from support import BLOCKTRACE, ServerProcess, blocktrace, make_image, qemu_io, require, run

MiB = 1024 * 1024
SIZE = 16 * MiB


@pytest.fixture
def nats1(tmp_path: Path) -> NatsCluster:
    require_nats()
    # a small max_payload, so 1 MiB writes are split into chunks and reassembled
    with NatsCluster(tmp_path / "nats", 1, max_payload=64 * 1024) as cluster:
        yield cluster


def stream_records(url: str) -> list[tuple[int, object]]:
    async def read() -> list[tuple[int, object]]:
        async with StreamSource(NatsURL.parse(url)) as src:
            return [(p.stream_seq, p.record) async for p in src.records()]

    return asyncio.run(read())


def same(a: Path, b: Path) -> bool:
    return a.read_bytes() == b.read_bytes()


@pytest.mark.parametrize("mode", ["background", "write-blocking"])
def test_every_record_kind_round_trips_through_jetstream(
    tmp_path: Path, nats1: NatsCluster, mode: str
) -> None:
    """Writes (1 MiB ones split in 64 KiB messages), FUA, zeroes, trims, flushes and a mark:
    replay from the stream, and replay of the log saved from it, both equal the image; a
    replay to the mark equals the image as it was at the mark."""
    require("qemu-io")
    img = make_image(tmp_path / "disk.img", SIZE, seed=5)
    base = tmp_path / "base.img"
    shutil.copyfile(img, base)
    url = nats1.url(0, "vm1.disk")
    qmp = tmp_path / "qmp.sock"
    args = ["--trace", f"disk=stream:{url},copy-mode={mode}", "--qmp", str(qmp)]
    with ServerProcess(tmp_path, [img], args) as srv:
        uri = srv.uri("disk")
        qemu_io(uri, "write -P 0x11 0 1M", "write -P 0x22 -f 4096 4096", "flush")
        at_mark = tmp_path / "at_mark.img"
        blocktrace("trace", "mark", "--socket", qmp, "trace0", "before-upgrade")
        shutil.copyfile(img, at_mark)
        qemu_io(
            uri,
            "write -P 0x33 1536K 3M",
            "write -z 2M 64k",
            "discard 5M 1M",
            "write -P 0x44 513 700",
            "flush",
        )
    records = [r for _, r in stream_records(url)]
    kinds = {r.kind.value for r in records}  # type: ignore[attr-defined]
    assert {"write", "zero", "trim", "flush", "mark"} <= kinds
    seqs = [r.seq for r in records]  # type: ignore[attr-defined]
    assert seqs == sorted(set(seqs)), "records out of order or duplicated"

    copy = tmp_path / "copy.img"
    shutil.copyfile(base, copy)
    blocktrace("replay", url, copy)
    assert same(copy, img)

    saved = tmp_path / "saved.log"
    blocktrace("log", "save", url, saved)
    assert "entries" in blocktrace("log", "info", saved).stdout
    shutil.copyfile(base, copy)
    blocktrace("replay", saved, copy)
    assert same(copy, img)
    # never overwrites a file nobody asked it to
    proc = blocktrace("log", "save", url, saved, check=False)
    assert proc.returncode == 2 and "exists" in proc.stderr

    shutil.copyfile(base, copy)
    blocktrace("replay", url, copy, "--end-mark", "before-upgrade")
    assert same(copy, at_mark)


def test_follow_resumes_after_restart_applying_only_the_rest(
    tmp_path: Path, nats1: NatsCluster
) -> None:
    """A durable follower stopped midway resumes from its acknowledged position: the replica
    ends identical, and the second run applied only the records published after the first."""
    require("qemu-io")
    img = make_image(tmp_path / "disk.img", SIZE, seed=7)
    replica = tmp_path / "replica.img"
    shutil.copyfile(img, replica)
    url = nats1.url(0, "vm2.disk")
    with ServerProcess(tmp_path, [img], ["--trace", f"disk=stream:{url}"]) as srv:
        qemu_io(srv.uri("disk"), "write -P 0x51 0 2M", "flush")
    first = blocktrace("follow", url, f"replica:{replica}", "--once")
    n1 = int(first.stderr.split()[1])
    assert n1 > 0 and same(replica, img)
    with ServerProcess(tmp_path, [img], ["--trace", f"disk=stream:{url}"], name="b") as srv:
        qemu_io(srv.uri("disk"), "write -P 0x52 1M 1M", "write -z 3M 1M", "flush")
    second = blocktrace("follow", url, f"replica:{replica}", "--once")
    n2 = int(second.stderr.split()[1])
    assert 0 < n2 < n1 + 10 and same(replica, img)
    third = blocktrace("follow", url, f"replica:{replica}", "--once")
    assert third.stderr.split()[1] == "0"


def test_watch_reads_a_stream_and_publishes_events(tmp_path: Path, nats1: NatsCluster) -> None:
    """``watch BASE nats://...`` gives the events ``watch BASE LOG`` gives for the same trace
    (one server, a stream and a log target side by side), and ``--events`` publishes each of
    them, as the JSON line printed, to a subject."""
    require("mkfs.ext4", "debugfs", "qemu-io")
    from ext4_recording import debugfs, qemu_io_commands

    src = tmp_path / "src"
    (src / "docs").mkdir(parents=True)
    (src / "docs/readme").write_bytes(b"r" * 3000)
    img = tmp_path / "disk.img"
    with open(img, "wb") as f:
        f.truncate(SIZE)
    run(["mkfs.ext4", "-q", "-F", "-d", str(src), str(img)], timeout=60)
    base = tmp_path / "base.img"
    shutil.copyfile(img, base)
    new = tmp_path / "new.img"
    shutil.copyfile(img, new)
    payload = tmp_path / "payload"
    payload.write_bytes(bytes(range(256)) * 40)
    debugfs(new, f"mkdir /docs/sub\nwrite {payload} /docs/sub/payload\nrm /docs/readme\n")
    cmds = qemu_io_commands(tmp_path, base, new)
    url = nats1.url(0, "vm3.disk")
    log = tmp_path / "t.log"
    args = ["--trace", f"disk=stream:{url}", "--trace", f"disk=log:{log}"]
    with ServerProcess(tmp_path, [img], args) as srv:
        qemu_io(srv.uri("disk"), *cmds)

    def strip(lines: list[str]) -> list[dict[str, object]]:
        out = []
        for line in lines:
            event = json.loads(line)
            for key in ("record", "data_record"):  # log entry index vs trace sequence number
                event.pop(key, None)
            out.append(event)
        return out

    from_log = blocktrace("watch", base, log, "--json").stdout.splitlines()
    got: list[str] = []

    async def listen_while_watching() -> str:
        import nats

        nc = await nats.connect(nats1.url(0))
        sub = await nc.subscribe("vm3.events")
        await nc.flush()
        proc = await asyncio.create_subprocess_exec(
            *BLOCKTRACE, "watch", str(base), url, "--json", "--events", nats1.url(0, "vm3.events"),
            stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, _ = await proc.communicate()
        assert proc.returncode == 0
        while True:
            try:
                msg = await sub.next_msg(timeout=2)
            except Exception:
                break
            got.append(msg.data.decode())
        await nc.close()
        return out.decode()

    from_stream = asyncio.run(listen_while_watching()).splitlines()
    assert from_stream and strip(from_stream) == strip(from_log)
    assert got == from_stream
    names = " ".join(from_stream)
    assert "payload" in names and "readme" in names


def test_server_down_at_start_is_one_clear_error(tmp_path: Path) -> None:
    img = make_image(tmp_path / "disk.img", MiB)
    sock = tmp_path / "s.sock"
    with NatsCluster(tmp_path / "n", 1) as cluster:
        port = cluster.client_ports[0]
    proc = blocktrace(
        "serve",
        img,
        "--socket",
        sock,
        "--trace",
        f"disk=stream:nats://127.0.0.1:{port}/a.b",
        check=False,
        timeout=60,
    )
    assert proc.returncode != 0
    assert "cannot connect" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert not sock.exists()


def test_full_stream_report_fails_writes_and_break_carries_on(
    tmp_path: Path, nats1: NatsCluster
) -> None:
    """A stream at its byte limit refuses the next record: ``report`` fails clients' writes
    with EIO (nothing diverges silently), ``break`` ends the trace and clients carry on."""
    require("qemu-io")
    img = make_image(tmp_path / "disk.img", SIZE)
    url = nats1.url(0, "full.disk")
    args = ["--trace", f"disk=stream:{url},max-bytes=1M,on-target-error=report"]
    with ServerProcess(tmp_path, [img], args) as srv:
        proc = subprocess.run(
            ["qemu-io", "-f", "raw", "-c", "write -P 1 0 4M", "-c", "flush", srv.uri("disk")],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert "error" in (proc.stdout + proc.stderr).lower(), proc.stdout + proc.stderr
    assert "is full" in srv.stderr()
    url2 = nats1.url(0, "full2.disk")
    args = ["--trace", f"disk=stream:{url2},max-bytes=1M,on-target-error=break"]
    with ServerProcess(tmp_path, [img], args, name="b") as srv:
        qemu_io(srv.uri("disk"), "write -P 2 0 4M", "flush")
    assert "is full" in srv.stderr()
    assert img.read_bytes()[: 4 * MiB] == b"\2" * (4 * MiB)


def test_qmp_block_trace_starts_a_stream_target(tmp_path: Path, nats1: NatsCluster) -> None:
    """The same target through QMP (``trace start`` sends ``block-trace``) on a live export:
    the stream replays onto the image as it was at the start to the image at the stop."""
    require("qemu-io")
    img = make_image(tmp_path / "disk.img", SIZE, seed=3)
    qmp = tmp_path / "qmp.sock"
    url = nats1.url(0, "vm4.disk")
    with ServerProcess(tmp_path, [img], ["--qmp", str(qmp)]) as srv:
        qemu_io(srv.uri("disk"), "write -P 0x61 0 1M")  # before the trace: in the base
        base = tmp_path / "base.img"
        shutil.copyfile(img, base)
        blocktrace("trace", "start", "--socket", qmp, f"disk=stream:{url},replicas=1")
        listed = blocktrace("trace", "list", "--socket", qmp).stdout
        assert "stream" in listed
        qemu_io(srv.uri("disk"), "write -P 0x62 512K 1M", "write -z 3M 8k", "flush")
        blocktrace("trace", "stop", "--socket", qmp, "disk")
    copy = tmp_path / "copy.img"
    shutil.copyfile(base, copy)
    blocktrace("replay", url, copy)
    assert same(copy, img) and not same(base, img)


def test_large_records_are_read_without_overrunning_the_client(tmp_path: Path) -> None:
    """320 MiB of 32 MiB writes (1 MiB messages): more than nats-py's default pending limit
    of a subscription, which drops what overflows it.  The consumer sizes its pulls by bytes,
    so the replay reads every message once, with no gap to recover from."""
    require("qemu-io")
    img = make_image(tmp_path / "disk.img", 64 * MiB)
    base = tmp_path / "base.img"
    shutil.copyfile(img, base)
    with NatsCluster(tmp_path / "nats", 1) as cluster:
        url = cluster.url(0, "big.disk")
        with ServerProcess(tmp_path, [img], ["--trace", f"disk=stream:{url}"]) as srv:
            qemu_io(srv.uri("disk"), *(f"write -P {i + 1} 0 64M" for i in range(5)))
        copy = tmp_path / "copy.img"
        shutil.copyfile(base, copy)
        proc = blocktrace("replay", url, copy, timeout=300)
        assert "resuming" not in proc.stderr, proc.stderr
        assert f"{10 * 32 * MiB} bytes written" in proc.stderr
        assert same(copy, img)
