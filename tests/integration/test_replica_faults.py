"""Replicas under real faults, with real processes: ``blocktrace serve --trace ...=nbd:URI``
against qemu-nbd (killed with -9 and restarted), a TCP connection cut by a proxy, a replica
on a full tmpfs, a source server restarted cleanly and after kill -9, and two blocktrace
instances on loopback TCP.  After each fault the replica must verify identical to the source
(``blocktrace verify``, over NBD where the replica is remote), every acknowledged write must be
on the source, and resynchronisation must move less than the device.
"""

from __future__ import annotations

import os
import subprocess
import threading
from pathlib import Path

import pytest
from replica_helpers import (
    QMP,
    CutProxy,
    QemuNBD,
    Workload,
    free_port,
    in_thread,
    random_image,
    same_files,
    sparse,
)

from support import BLOCKTRACE, ServerProcess, blocktrace, require

MiB = 1024 * 1024
SIZE = 32 * MiB

pytestmark = pytest.mark.timeout(120)


def source_server(tmp: Path, src: Path, target: str, extra: str = "", **kw: str) -> ServerProcess:
    opts = f"job-id=r,sync=full,reconnect-max=1{extra}"
    return ServerProcess(
        tmp, [src], ["--trace", f"src={target},{opts}", "--qmp", str(tmp / "qmp.sock")], **kw
    )


def test_kill9_of_replica_qemu_nbd_mid_workload(tmp_path: Path) -> None:
    require("qemu-nbd")
    src = random_image(tmp_path / "src.img", SIZE, 1)
    rep = sparse(tmp_path / "rep.img", SIZE)
    q = QemuNBD(rep, sock=tmp_path / "rep.sock").start()
    srv = source_server(tmp_path, src, f"nbd:{q.uri}", ",copy-mode=write-blocking").start()
    try:
        qmp = QMP(tmp_path / "qmp.sock")
        first = qmp.wait_caught_up()
        initial = first["target"]["synced-bytes"]
        assert initial == SIZE
        wl = Workload(srv.uri("src"), src, 2)
        stop = threading.Event()
        t = in_thread(lambda: wl.run(100_000, stop=stop))
        qmp.wait(lambda j: j["target"]["applied-records"] > 50)
        q.kill9()  # mid-workload: requests in flight to the replica are lost
        stop.set()
        t.join(30)
        assert not t.errors  # type: ignore[attr-defined]
        wl.run(60)  # a bounded outage, so the dirty regions are a fraction of the device
        qmp.wait(lambda j: j["target"]["state"] in ("degraded", "synchronizing"))
        q.start()
        qmp.wait(lambda j: j["target"]["reconnects"] >= 1 and j["target"]["state"] == "ready")
        wl.run(50)
        wl.close()
        job = qmp.wait_caught_up()
        resynced = job["target"]["synced-bytes"] - initial
        assert 0 < resynced < SIZE // 2, job["target"]
        qmp.close()
    finally:
        srv.stop()
        q.stop()
    wl.check_source(src)
    assert blocktrace("verify", str(src), str(rep)).returncode == 0


def test_connection_cut_by_proxy(tmp_path: Path) -> None:
    require("qemu-nbd")
    src = random_image(tmp_path / "src.img", SIZE, 3)
    rep = sparse(tmp_path / "rep.img", SIZE)
    q = QemuNBD(rep, port=free_port()).start()
    proxy = CutProxy(q.port)
    uri = f"nbd://127.0.0.1:{proxy.port}/r"
    srv = source_server(tmp_path, src, f"nbd:{uri}").start()
    try:
        qmp = QMP(tmp_path / "qmp.sock")
        initial = qmp.wait_caught_up()["target"]["synced-bytes"]
        wl = Workload(srv.uri("src"), src, 4)
        wl.run(100)
        proxy.cut()  # reset the connection and refuse reconnects for now
        wl.run(100)
        qmp.wait(lambda j: j["target"]["state"] == "degraded")
        assert qmp.job()["target"]["lag-bytes"] > 0
        proxy.heal()
        job = qmp.wait(lambda j: j["target"]["reconnects"] >= 1 and j["target"]["state"] == "ready")
        events = [e for e in qmp.q.get_events() if e["event"] == "BLOCK_TRACE_REPLICA_STATE"]
        states = [e["data"]["state"] for e in events]
        assert "degraded" in states and states[-1] == "ready", states
        assert all(e["data"]["device"] == "r" for e in events)
        wl.run(50)
        wl.close()
        job = qmp.wait_caught_up()
        assert job["target"]["synced-bytes"] - initial < SIZE // 2
        # verify over NBD while both run: source via blocktrace, replica via qemu-nbd
        out = blocktrace("verify", srv.uri("src"), q.uri)
        assert "identical" in out.stdout
        qmp.close()
    finally:
        srv.stop()
        proxy.close()
        q.stop()
    wl.check_source(src)
    assert same_files(src, rep, SIZE)


def test_replica_disk_full_degrades_then_recovers(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(mnt)], timeout=10)
    if r.returncode != 0:
        pytest.skip("machine cannot mount tmpfs")
    try:
        src = random_image(tmp_path / "src.img", SIZE, 5)  # ~8 MiB of data: more than fits
        rep = mnt / "rep.img"
        meta = tmp_path / "rep.btreplica"
        target = f"replica:{rep},meta={meta}"
        srv = source_server(tmp_path, src, target, ",copy-mode=write-blocking").start()
        try:
            qmp = QMP(tmp_path / "qmp.sock")
            job = qmp.wait(lambda j: j["target"]["state"] == "degraded")
            assert "space" in job["target"].get("last-error", "")
            wl = Workload(srv.uri("src"), src, 6)
            wl.run(200)  # the source keeps taking writes while the replica is full
            subprocess.run(["mount", "-o", "remount,size=64m", str(mnt)], timeout=10, check=True)
            wl.run(50)
            wl.close()
            qmp.wait_caught_up(60)
            qmp.close()
        finally:
            srv.stop()
        wl.check_source(src)
        assert blocktrace("verify", str(src), str(rep)).returncode == 0
    finally:
        subprocess.run(["umount", "-l", str(mnt)], timeout=10)


def test_source_restart_resumes_without_full_copy(tmp_path: Path) -> None:
    require("qemu-nbd")
    src = random_image(tmp_path / "src.img", SIZE, 7)
    rep = sparse(tmp_path / "rep.img", SIZE)
    q = QemuNBD(rep, sock=tmp_path / "rep.sock").start()
    target = f"nbd:{q.uri}"
    try:
        with source_server(tmp_path, src, target) as srv:
            qmp = QMP(tmp_path / "qmp.sock")
            qmp.wait_caught_up()
            wl = Workload(srv.uri("src"), src, 8)
            wl.run(150)
            wl.close()
            qmp.wait_caught_up()
            qmp.close()
        # clean restart: the metadata says nothing is missing
        with source_server(tmp_path, src, target) as srv:
            qmp = QMP(tmp_path / "qmp.sock")
            job = qmp.wait_caught_up()
            assert job["target"]["sync-mode"] == "bitmap"
            assert job["target"]["synced-bytes"] == 0
            wl = Workload(srv.uri("src"), src, 9)
            wl.run(150)
            wl.close()
            qmp.close()
            srv.kill()  # kill -9 of the source: queued records are lost with it
        wl.check_source(src)  # acknowledged writes survive on the source
        with source_server(tmp_path, src, target) as srv:
            qmp = QMP(tmp_path / "qmp.sock")
            job = qmp.wait_caught_up()
            assert job["target"]["sync-mode"] == "compare"  # unclean: compare, copy only diffs
            assert job["target"]["synced-bytes"] < SIZE // 2
            qmp.close()
        q.stop()
        # the source restarts while the replica is down: it serves anyway, degraded
        with source_server(tmp_path, src, target) as srv:
            qmp = QMP(tmp_path / "qmp.sock")
            assert qmp.job()["target"]["state"] == "degraded"
            wl = Workload(srv.uri("src"), src, 10)
            wl.run(100)
            q.start()
            job = qmp.wait_caught_up()
            assert job["target"]["sync-mode"] == "bitmap"
            assert 0 < job["target"]["synced-bytes"] < SIZE // 2
            wl.run(20)
            wl.close()
            qmp.wait_caught_up()
            qmp.close()
        wl.check_source(src)
    finally:
        q.stop()
    assert blocktrace("verify", str(src), str(rep)).returncode == 0


def test_two_blocktrace_instances_on_loopback_tcp(tmp_path: Path) -> None:
    src = random_image(tmp_path / "src.img", SIZE, 11)
    rep = sparse(tmp_path / "rep.img", SIZE)
    port = free_port()
    b = ServerProcess(tmp_path, [rep], ["--listen", f"127.0.0.1:{port}"], name="b").start()
    uri = f"nbd://127.0.0.1:{port}/rep"
    try:
        with source_server(tmp_path, src, f"nbd:{uri}", ",copy-mode=write-blocking") as a:
            qmp = QMP(tmp_path / "qmp.sock")
            qmp.wait_caught_up()
            wl = Workload(a.uri("src"), src, 12)
            wl.run(300)
            wl.close()
            qmp.wait_caught_up()
            out = blocktrace("verify", a.uri("src"), uri)
            assert "identical" in out.stdout
            qmp.close()
        wl.check_source(src)
        # another source pointed at the same replica (same metadata) is refused, untouched
        meta = next(tmp_path.glob("src.img.*.btreplica"))
        other = sparse(tmp_path / "other.img", SIZE)
        proc = subprocess.run(
            [
                *BLOCKTRACE,
                "serve",
                str(other),
                "--socket",
                str(tmp_path / "c.sock"),
                "--trace",
                f"other=nbd:{uri},meta={meta}",
            ],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert proc.returncode != 0
        assert "belongs to source" in proc.stderr and "Traceback" not in proc.stderr
    finally:
        b.stop()
    assert same_files(src, rep, SIZE)


def test_qmp_block_trace_to_replica_reports_states(tmp_path: Path) -> None:
    """block-trace with a replica target over QMP: options, READY, state events, cancel."""
    src = random_image(tmp_path / "src.img", SIZE, 13)
    rep = tmp_path / "rep.img"
    with ServerProcess(tmp_path, [src], ["--qmp", str(tmp_path / "qmp.sock")]) as srv:
        qmp = QMP(tmp_path / "qmp.sock")
        target = {"type": "replica", "filename": str(rep), "force": False, "granularity": 65536}
        qmp.q.cmd(
            "block-trace",
            **{"job-id": "r", "device": "src", "sync": "full", "target": target},
        )
        job = qmp.wait_caught_up()
        assert job["status"] == "ready" and job["target"]["filename"] == str(rep)
        wl = Workload(srv.uri("src"), src, 14)
        wl.run(100)
        wl.close()
        qmp.wait_caught_up()
        qmp.q.cmd("block-job-cancel", device="r")
        events = []
        while not any(e["event"] == "BLOCK_JOB_COMPLETED" for e in events):
            events += qmp.q.get_events(wait=10.0)
        names = [e["event"] for e in events]
        assert "BLOCK_JOB_READY" in names
        states = [e["data"]["state"] for e in events if e["event"] == "BLOCK_TRACE_REPLICA_STATE"]
        assert "ready" in states and states[-1] == "closed"
        qmp.close()
    wl.check_source(src)
    assert same_files(src, rep, SIZE)


def test_kill9_of_replica_during_fio_with_verify(tmp_path: Path) -> None:
    """fio (ioengine=nbd, QD16, crc32c verify) on the source while the replica's qemu-nbd is
    killed and restarted: fio's own read-back proves every acknowledged write is on the
    source, and the replica verifies identical afterwards."""
    require("qemu-nbd", "fio")
    src = sparse(tmp_path / "src.img", SIZE)
    rep = sparse(tmp_path / "rep.img", SIZE)
    q = QemuNBD(rep, sock=tmp_path / "rep.sock").start()
    srv = source_server(tmp_path, src, f"nbd:{q.uri}").start()
    try:
        qmp = QMP(tmp_path / "qmp.sock")
        qmp.wait_caught_up()
        fio = subprocess.Popen(
            ["fio", "--name=w", "--ioengine=nbd", f"--uri={srv.uri('src')}", "--rw=randwrite",
             "--bs=4k", "--iodepth=16", "--size=24M", "--verify=crc32c", "--verify_fatal=1",
             "--verify_state_save=0", "--randrepeat=0", "--loops=3"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        try:
            qmp.wait(lambda j: j["target"]["applied-records"] > 300 or fio.poll() is not None)
            q.kill9()
            qmp.wait(lambda j: j["target"]["state"] != "ready" or fio.poll() is not None)
            q.start()
            out, _ = fio.communicate(timeout=60)
        finally:
            if fio.poll() is None:
                fio.kill()
                fio.wait()
        assert fio.returncode == 0, out
        assert "verify" in out or "err= 0" in out
        job = qmp.wait_caught_up()
        assert job["target"]["reconnects"] >= 1, job["target"]
        qmp.close()
    finally:
        srv.stop()
        q.stop()
    assert blocktrace("verify", str(src), str(rep)).returncode == 0
