"""Every image blocktrace writes besides its exports is locked too, against real QEMU peers.

A ``replica:`` target's image, the image ``blocktrace replay`` writes (from a log or from
JetStream) and the one ``blocktrace follow`` keeps take QEMU's image locks for as long as they
are written (block/locking.py, ``WRITABLE``): qemu-io, qemu-img, qemu-nbd and
qemu-storage-daemon (written through QEMU's own nbd driver by qemu-io) are refused while
blocktrace writes, blocktrace is refused while they hold the image, naming them, and readers
QEMU allows (``qemu-io -r``, ``qemu-img info -U``) keep working.  Before, both wrote at once.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from attach_graph import qsd_export_argv
from lock_helpers import LOCKED, locks_on, qemu_process, serve_once, storage_daemon, wait_locked

from blocktrace.block.locking import PERM_BASE
from blocktrace.logwrites.replay import replay
from blocktrace.logwrites.writer import LogWriter
from support import BLOCKTRACE, ServerProcess, blocktrace, make_image, require, run

MiB = 1024 * 1024
SIZE = 4 * MiB
WRITE_BYTE = PERM_BASE + 1  # "holds write": what every writer takes

pytestmark = pytest.mark.timeout(180)

#: the process name /proc shows for each holder (comm is cut at 15 characters)
COMM = {"qemu-io": "qemu-io", "qemu-nbd": "qemu-nbd", "qemu-storage-daemon": "qemu-storage-da"}


def make_log(path: Path, writes: list[tuple[int, bytes]]) -> Path:
    """A small dm-log-writes log of ``writes`` (offset, data), then a flush."""
    with LogWriter.create(path) as w:
        w.append_writes([(0, off, data) for off, data in writes])
        w.flush()
    return path


def qemu_writers(image: Path, tmp_path: Path) -> dict[str, list[str]]:
    """One command per QEMU tool that opens ``image`` for writing (and exits on a refusal)."""
    src = make_image(tmp_path / "qemu-src.img", SIZE, seed=99)
    return {
        "qemu-io": ["qemu-io", "-f", "raw", "-c", "write -P 0x77 0 64k", os.fspath(image)],
        "qemu-img": ["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", src, image],
        "qemu-nbd": ["qemu-nbd", "-f", "raw", "-k", tmp_path / "qn.sock", image],
        "qemu-storage-daemon": storage_daemon(image, tmp_path / "qsd.sock"),
    }


def assert_qemu_refused(image: Path, tmp_path: Path) -> None:
    """Every QEMU writer of ``image`` is refused; QEMU's readers still read it."""
    before = image.read_bytes()
    for tool, cmd in qemu_writers(image, tmp_path).items():
        require(tool if tool != "qemu-img" else "qemu-img")
        r = run(cmd, check=False, timeout=30)
        assert r.returncode != 0 and LOCKED in r.stderr, (tool, r.stderr)
    assert image.read_bytes() == before
    r = run(["qemu-io", "-r", "-f", "raw", "-c", "read 0 4k", image])
    assert "read 4096/4096" in r.stdout
    run(["qemu-img", "info", "-U", image])


@contextmanager
def qemu_holder(tool: str, image: Path, tmp_path: Path) -> Iterator[None]:
    """``tool`` holding ``image`` open for writing; qemu-storage-daemon is also written
    through its NBD export by qemu-io (QEMU's nbd driver), so the image is live."""
    require(tool, "qemu-io")
    if tool == "qemu-io":  # keeps the image open, writable, while it waits on stdin
        proc = subprocess.Popen(
            ["qemu-io", "-f", "raw", os.fspath(image)],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
        )
        try:
            wait_locked(image, WRITE_BYTE)
            yield
        finally:
            proc.kill()
            proc.wait(10)
        return
    sock = tmp_path / "holder.sock"
    cmd = {
        "qemu-nbd": ["qemu-nbd", "-f", "raw", "-k", os.fspath(sock), os.fspath(image)],
        "qemu-storage-daemon": storage_daemon(image, sock),
    }[tool]
    with qemu_process(cmd, image, WRITE_BYTE):
        if tool == "qemu-storage-daemon":
            uri = f"nbd+unix:///f?socket={sock}"
            run(["qemu-io", "-f", "raw", "-c", "write -P 0x5a 0 64k", "-c", "flush", uri])
        yield


def refused(proc: subprocess.CompletedProcess[str], tool: str) -> str:
    """A blocktrace command refused in one line that names the holder."""
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr.strip()
    assert len(err.splitlines()) == 1, err
    assert "failed to get" in err and f"{COMM[tool]} (pid " in err, err
    return err


# -- replica: targets ------------------------------------------------------------------------


def test_a_live_replica_image_refuses_every_qemu_writer_and_is_released_at_stop(
    tmp_path: Path,
) -> None:
    require("qemu-io", "qemu-img", "qemu-nbd", "qemu-storage-daemon")
    img = make_image(tmp_path / "disk.img", SIZE, seed=1)
    rep = make_image(tmp_path / "replica.img", SIZE)
    with ServerProcess(tmp_path, [img], ["--trace", f"disk=replica:{rep},sync=full"]) as srv:
        wait_locked(rep, WRITE_BYTE)
        run(["qemu-io", "-f", "raw", "-c", "write -P 0x33 0 64k", "-c", "flush", srv.uri("disk")])
        assert_qemu_refused(rep, tmp_path)
        # another blocktrace writing it: a second server's replica, a replay
        other = make_image(tmp_path / "other.img", SIZE, seed=2)
        r = serve_once(tmp_path, [other], f"replica:{rep},force=on")
        assert r.returncode == 2 and "failed to get" in r.stderr, r.stderr
        log = make_log(tmp_path / "w.log", [(0, b"\x99" * 4096)])
        r = blocktrace("replay", log, rep, check=False)
        assert r.returncode == 2 and "replay target" in r.stderr and "failed to get" in r.stderr
    assert rep.read_bytes() == img.read_bytes()  # the replica alone wrote it
    assert not locks_on(rep)
    run(["qemu-io", "-f", "raw", "-c", "write -P 0x44 0 4k", rep])  # released


@pytest.mark.parametrize("tool", ["qemu-io", "qemu-nbd", "qemu-storage-daemon"])
def test_a_replica_is_refused_on_an_image_a_qemu_writer_holds(tmp_path: Path, tool: str) -> None:
    img = make_image(tmp_path / "disk.img", SIZE, seed=3)
    rep = make_image(tmp_path / "replica.img", SIZE, seed=4)
    with qemu_holder(tool, rep, tmp_path):
        before = rep.read_bytes()
        r = serve_once(tmp_path, [img], f"disk=replica:{rep},sync=full")
        refused(r, tool)
        assert rep.read_bytes() == before  # no full copy landed on the holder's image


def test_a_degraded_replica_keeps_its_image_locked_until_it_resyncs(tmp_path: Path) -> None:
    """A replica that fills its file system degrades and closes its image, but keeps the
    lock: a QEMU writer in the meantime is refused (its writes would be invisible to the
    dirty bitmap, so the resync would miss them), and the replica converges once it has
    room again."""
    from replica_helpers import QMP, random_image

    from support import small_tmpfs

    require("qemu-io")
    src = random_image(tmp_path / "src.img", 32 * MiB, 21)  # ~8 MiB of data: more than fits
    with small_tmpfs(tmp_path / "small", "6m") as mnt:
        rep = mnt / "rep.img"
        qmp_sock = tmp_path / "qmp.sock"
        trace = f"replica:{rep},meta={tmp_path / 'rep.btreplica'},job-id=r,sync=full"
        with ServerProcess(tmp_path, [src], ["--trace", trace, "--qmp", str(qmp_sock)]) as srv:
            qmp = QMP(qmp_sock)
            try:
                job = qmp.wait(lambda j: j["target"]["state"] == "degraded")
                assert "space" in job["target"].get("last-error", ""), job
                assert WRITE_BYTE in locks_on(rep)
                r = run(["qemu-io", "-f", "raw", "-c", "write -P 0x66 0 4k", rep], check=False)
                assert r.returncode != 0 and LOCKED in r.stderr, r.stderr
                run(["mount", "-o", "remount,size=64m", mnt], timeout=30)
                run(["qemu-io", "-f", "raw", "-c", "write -P 0x67 1M 64k", srv.uri()])
                qmp.wait_caught_up(60)
            finally:
                qmp.close()
        assert rep.read_bytes() == src.read_bytes()
        assert not locks_on(rep)


def test_attach_replica_traces_lock_their_image_both_ways(tmp_path: Path) -> None:
    """``blocktrace attach`` with a replica trace, on a qemu-storage-daemon node (no guest
    needed): an image qemu-io holds is refused in one line naming it and the daemon's disk
    stays where it was; while attached, the replica image refuses QEMU's writers."""
    import signal

    from test_attach_guest import AttachProcess

    from blocktrace.qmp.client import QMPClient

    require("qemu-storage-daemon", "qemu-io")
    img = make_image(tmp_path / "src.raw", 16 * MiB)
    qmp, nbd = tmp_path / "qsd.sock", tmp_path / "qsd-nbd.sock"
    argv = qsd_export_argv(img, qmp, nbd)
    qsd = subprocess.Popen(argv)
    try:
        deadline = time.monotonic() + 30
        while not (qmp.exists() and nbd.exists()):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        held = make_image(tmp_path / "held.img", 16 * MiB)
        with qemu_holder("qemu-io", held, tmp_path):
            r = blocktrace("attach", "--qemu", qmp, "--socket", tmp_path / "a.sock",
                           f"n0={tmp_path / 'bt.img'}", "--trace", f"replica:{held}",
                           check=False, timeout=120)  # fmt: skip
            assert r.returncode != 0
            err = r.stderr.strip().splitlines()[-1]  # after attach's INFO lines: one error
            assert err.startswith("blocktrace: ") and "failed to get" in err, r.stderr
            assert "qemu-io (pid " in err, err
        with QMPClient.connect_to(str(qmp)) as c:
            nodes = {n["node-name"] for n in c.execute("query-named-block-nodes")}
        assert nodes == {"p0", "n0"}, nodes
        rep = tmp_path / "rep.img"
        att = AttachProcess(tmp_path, qmp, [f"n0={tmp_path / 'bt2.img'}"], [f"replica:{rep}"])
        try:
            att.wait_ready(1)
            run(["qemu-io", "-f", "raw", "-c", "write -P 0x5a 4096 65536", "-c", "flush",
                 f"nbd+unix:///n0?socket={nbd}"])  # fmt: skip
            wait_locked(rep, WRITE_BYTE)
            r = run(["qemu-io", "-f", "raw", "-c", "write -P 0x66 0 4k", rep], check=False)
            assert r.returncode != 0 and LOCKED in r.stderr, r.stderr
        finally:
            att.proc.send_signal(signal.SIGTERM)
            assert att.wait() == 0, att.stderr()
        assert not locks_on(rep)
        assert rep.read_bytes()[4096 : 4096 + 65536] == b"\x5a" * 65536
    finally:
        qsd.kill()
        qsd.wait()


@pytest.mark.parametrize("tool", ["qemu-io", "qemu-storage-daemon"])
def test_a_log_with_force_is_refused_on_an_image_a_qemu_writer_holds(
    tmp_path: Path, tool: str
) -> None:
    """``force=on`` replaces an existing log, but never truncates an image QEMU is writing."""
    img = make_image(tmp_path / "disk.img", SIZE, seed=22)
    held = make_image(tmp_path / "held.img", SIZE, seed=23)
    with qemu_holder(tool, held, tmp_path):
        before = held.read_bytes()
        err = refused(serve_once(tmp_path, [img], f"log:{held},force=on"), tool)
        assert f"log {held}: failed to get" in err, err
        assert held.read_bytes() == before


# -- replay LOG IMAGE ------------------------------------------------------------------------


@pytest.mark.parametrize("tool", ["qemu-io", "qemu-nbd", "qemu-storage-daemon"])
def test_replay_is_refused_on_an_image_a_qemu_writer_holds(tmp_path: Path, tool: str) -> None:
    target = make_image(tmp_path / "target.img", SIZE, seed=5)
    log = make_log(tmp_path / "w.log", [(0, b"\x99" * 65536), (MiB, b"\x98" * 4096)])
    with qemu_holder(tool, target, tmp_path):
        before = target.read_bytes()
        err = refused(blocktrace("replay", log, target, check=False), tool)
        assert err.startswith(f"blocktrace: replay target {target}:"), err
        assert target.read_bytes() == before


def test_a_running_replay_refuses_qemu_writers_and_releases_the_image(tmp_path: Path) -> None:
    """Checked from inside a real replay: after its first entry, every QEMU writer is
    refused and QEMU's readers read; once it returns, QEMU writes again."""
    require("qemu-io", "qemu-img", "qemu-nbd", "qemu-storage-daemon")
    target = make_image(tmp_path / "target.img", SIZE)
    log = make_log(tmp_path / "w.log", [(0, b"\x11" * 65536), (MiB, b"\x22" * 65536)])
    seen: list[int] = []

    def during(entry: object) -> None:
        if not seen:
            wait_locked(target, WRITE_BYTE, timeout=1)
            assert_qemu_refused(target, tmp_path)
        seen.append(1)

    result = replay(log, target, progress=during)
    assert seen and result.applied == 2
    data = target.read_bytes()
    assert data[:65536] == b"\x11" * 65536 and data[MiB : MiB + 65536] == b"\x22" * 65536
    assert not locks_on(target)
    run(["qemu-io", "-f", "raw", "-c", "write -P 0x44 0 4k", target])


# -- JetStream: replay nats://... and follow -------------------------------------------------


@pytest.fixture
def published(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A nats-server with a trace published on it: (its URL, the traced image)."""
    from nats_helpers import NatsCluster, require_nats

    require_nats()
    require("qemu-io")
    with NatsCluster(tmp_path / "nats", 1) as cluster:
        url = cluster.url(0, "vm.disk")
        img = make_image(tmp_path / "disk.img", SIZE, seed=6)
        with ServerProcess(tmp_path, [img], ["--trace", f"disk=stream:{url}"]) as srv:
            run(["qemu-io", "-f", "raw", "-c", "write -P 0x61 0 1M", "-c", "flush", srv.uri()])
        yield url, img


def test_a_follower_locks_its_replica_and_a_second_writer_is_refused(
    tmp_path: Path, published: tuple[str, Path]
) -> None:
    require("qemu-img", "qemu-nbd", "qemu-storage-daemon")
    url, _img = published
    rep = make_image(tmp_path / "replica.img", SIZE)
    follower = subprocess.Popen(
        [*BLOCKTRACE, "follow", url, f"replica:{rep}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        wait_locked(rep, WRITE_BYTE, timeout=30)
        deadline = time.monotonic() + 30
        while rep.read_bytes()[:MiB] != b"\x61" * MiB:  # caught up with the stream
            assert time.monotonic() < deadline and follower.poll() is None
            time.sleep(0.05)
        assert_qemu_refused(rep, tmp_path)
        hard = tmp_path / "replica-hard-link.img"
        os.link(rep, hard)
        r = blocktrace("follow", url, f"replica:{hard}", "--once", check=False, timeout=60)
        assert r.returncode == 2 and "follow target" in r.stderr and "failed to get" in r.stderr
        r = blocktrace("replay", url, rep, check=False, timeout=60)
        assert r.returncode == 2 and "failed to get" in r.stderr, r.stderr
    finally:
        follower.terminate()
        follower.wait(30)
    assert not locks_on(rep)
    run(["qemu-io", "-f", "raw", "-c", "write -P 0x44 0 4k", rep])


@pytest.mark.parametrize("command", ["follow", "replay"])
def test_follow_and_replay_from_jetstream_are_refused_while_qemu_holds_the_image(
    tmp_path: Path, published: tuple[str, Path], command: str
) -> None:
    url, _img = published
    rep = make_image(tmp_path / "replica.img", SIZE, seed=8)
    with qemu_holder("qemu-storage-daemon", rep, tmp_path):
        before = rep.read_bytes()
        args = (
            ["follow", url, f"replica:{rep}", "--once"]
            if command == "follow"
            else [
                "replay",
                url,
                rep,
            ]
        )
        refused(blocktrace(*args, check=False, timeout=60), "qemu-storage-daemon")
        assert rep.read_bytes() == before


def test_replay_onto_a_copy_made_by_replay_records_keeps_working(tmp_path: Path) -> None:
    """The Python API that copies a base then replays (``replay_records(base=...)``) takes
    and drops the lock twice on the same file: it must not refuse itself."""
    from blocktrace.logwrites.replay import replay_records

    base = make_image(tmp_path / "base.img", SIZE, seed=9)
    log = make_log(tmp_path / "w.log", [(0, b"\x12" * 4096)])
    out = tmp_path / "out.img"
    replay_records(log, out, 1, base=base)
    want = bytearray(base.read_bytes())
    want[:4096] = b"\x12" * 4096
    assert out.read_bytes() == bytes(want)
