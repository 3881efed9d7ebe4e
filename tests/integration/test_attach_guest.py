"""``blocktrace attach`` on a real running VM: a Linux guest under qemu-system-x86_64 (TCG).

The guest writes files on ext4 (fsync, rm, fstrim) while blocktrace is attached; after the
detach the log replayed onto an all-zero disk, the replica and the VM's own image (qcow2
converted to raw) are the same bytes, and the introspection target saw the guest's files.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from attach_graph import block_graph, qemu_qmp, qsd_export_argv

from blocktrace.qmp.client import QMPClient
from guest import Guest, GuestDisk, guest_visible, make_ext4_disk
from support import BLOCKTRACE, blocktrace, require, run

pytestmark = pytest.mark.slow


class AttachProcess:
    """``blocktrace attach`` in a subprocess, its QMP control socket at ``self.qmp``.
    ``qemu_qmp`` is QEMU's QMP socket, or the arguments that say where QEMU is otherwise
    (``["--libvirt", DOMAIN, ...]``)."""

    def __init__(self, workdir: Path, qemu_qmp: Path | list[str], disks: list[str],
                 traces: list[str],
                 *, name: str = "attach", extra: tuple[str, ...] = (),
                 nbd: Path | None = None) -> None:  # fmt: skip
        self.qmp = workdir / f"{name}-qmp.sock"
        self.nbd = nbd or workdir / f"{name}-nbd.sock"
        self.stderr_path = workdir / f"{name}.stderr"
        where = qemu_qmp if isinstance(qemu_qmp, list) else ["--qemu", str(qemu_qmp)]
        args = ["attach", *where, "--socket", str(self.nbd),
                "--qmp", str(self.qmp), *extra, *disks]  # fmt: skip
        for t in traces:
            args += ["--trace", t]
        self._err = open(self.stderr_path, "wb")  # noqa: SIM115 - closed in wait()
        self.proc = subprocess.Popen([*BLOCKTRACE, *args], stderr=self._err)

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def wait_ready(self, n_traces: int, timeout: float = 300) -> list[dict[str, Any]]:
        """Wait until the pivot is done and ``n_traces`` traces are ready."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, (
                f"attach exited {self.proc.returncode}: {self.stderr()}"
            )
            if self.qmp.exists():
                try:
                    with QMPClient.connect_to(str(self.qmp), timeout=30) as c:
                        jobs: list[dict[str, Any]] = c.execute("query-block-jobs")
                except Exception:
                    jobs = []
                if len(jobs) == n_traces and all(j["ready"] for j in jobs):
                    return jobs
            time.sleep(0.2)
        raise AssertionError(f"attach not ready: {self.stderr()}")

    def wait(self, timeout: float = 300) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            self._err.close()


def device_node(path: Path, device: str) -> str:
    for blk in qemu_qmp(path, "query-block"):
        if device in blk.get("qdev", ""):
            return str(blk["inserted"]["node-name"])
    raise AssertionError(f"no device {device}")


def replay_from_zero(tmp: Path, log: Path, size: int, name: str) -> Path:
    out = tmp / name
    with open(out, "wb") as f:
        f.truncate(size)
    blocktrace("replay", log, out)
    return out


def start_background_writer(g: Guest, path: str) -> None:
    """A guest loop rewriting a file with fsync until told to stop: I/O in flight while
    blocktrace switches the disk."""
    g.sh(f"touch /tmp/run; rm -f /tmp/done; (while [ -e /tmp/run ]; do dd if=/dev/urandom "
         f"of={path} bs=4k count=16 conv=fsync 2>/dev/null; done; touch /tmp/done) "
         ">/dev/null 2>&1 &")  # fmt: skip


def stop_background_writer(g: Guest) -> None:
    g.sh("rm /tmp/run; while [ ! -e /tmp/done ]; do sleep 1; done; sync")


def freeze(g: Guest) -> None:
    """Fix the comparison point before a detach: flush /mnt and stop the guest writing to it.

    A mounted ext4 writes on its own (an atime update after a read, its jbd2 commit up to
    5 s later, writeback of committed metadata): after the detach those writes reach the
    VM's image and no trace, so a comparison of a trace with the live disk fails whenever
    one lands first (seen under load: a journal block 5 s after a ``cat``).  Frozen, the
    file system writes nothing (atime updates are skipped) until :func:`thaw`."""
    g.sh("fsfreeze --freeze /mnt")


def thaw(g: Guest) -> None:
    g.sh("fsfreeze --unfreeze /mnt")


def visible_now(g: Guest, disk: Path, fmt: str, out: Path) -> Path:
    """The guest-visible disk with QEMU's caches written out: ``stop`` drains and flushes
    every node (a qcow2's metadata cache included) before ``qemu-img`` reads the file."""
    qemu_qmp(g.test_qmp, "stop")
    try:
        return guest_visible(disk, fmt, out)
    finally:
        qemu_qmp(g.test_qmp, "cont")


def file_events(path: Path) -> set[tuple[str, str | None]]:
    """(kind, path) of every event an introspect target wrote."""
    return {(e["kind"], e.get("path")) for e in map(json.loads, path.read_text().splitlines())}


def guest_workload(g: Guest, tag: str) -> None:
    """Files on ext4: written with fsync, overwritten, removed, trimmed."""
    g.sh(f"dd if=/dev/urandom of=/mnt/{tag}-big bs=64k count=48 conv=fsync 2>/dev/null")
    g.sh(f"echo hello-{tag} | dd of=/mnt/{tag}-small conv=fsync 2>/dev/null")
    g.sh(f"dd if=/dev/urandom of=/mnt/{tag}-keep bs=4k count=33 conv=fsync 2>/dev/null")
    g.sh(f"rm /mnt/{tag}-big && sync && fstrim /mnt && sync")


@pytest.fixture(scope="module", autouse=True)
def _tools() -> None:
    require("qemu-system-x86_64", "qemu-img", "mkfs.ext4")


def test_attach_qcow2_vm_log_replica_introspect_detach_and_reattach(tmp_path: Path) -> None:
    size = 64 << 20
    disk = tmp_path / "vm.qcow2"
    make_ext4_disk(disk, "qcow2", size)
    with Guest(tmp_path, [GuestDisk(disk, "qcow2")]) as g:
        g.sh("mount -o discard /dev/vda /mnt && echo before > /mnt/before && sync")
        start_background_writer(g, "/mnt/bg")
        log = tmp_path / "a.log"
        events = tmp_path / "events.jsonl"
        replica = tmp_path / "replica.img"
        att = AttachProcess(tmp_path, g.qmp, [f"disk0={tmp_path / 'bt.img'}"],
                            [f"log:{log}", f"replica:{replica}",
                             f"introspect:{events}"])  # fmt: skip
        jobs = att.wait_ready(3)
        assert {j["export"] for j in jobs} == {"disk0"}
        assert device_node(g.test_qmp, "disk0") == "blocktrace-disk0"
        guest_workload(g, "one")
        stop_background_writer(g)
        with QMPClient.connect_to(str(att.qmp)) as c:
            c.execute("block-trace-mark", {"job-id": "trace0", "name": "after-one"})
        g.sh("sync")
        freeze(g)
        out = blocktrace("detach", "--socket", att.qmp, timeout=300)
        assert "detached" in out.stdout
        assert att.wait() == 0, att.stderr()
        # QEMU's graph is what it was; the VM runs on, on its own image.
        assert device_node(g.test_qmp, "disk0") == "fmt0"
        names = {n["node-name"] for n in qemu_qmp(g.test_qmp, "query-named-block-nodes")}
        assert not any(n.startswith("blocktrace") for n in names)
        assert "hello-one" in g.sh("cat /mnt/one-small")

        visible = visible_now(g, disk, "qcow2", tmp_path / "visible.raw")
        replayed = replay_from_zero(tmp_path, log, size, "replayed.raw")
        blocktrace("verify", replayed, visible)
        blocktrace("verify", replica, visible)
        assert "after-one" in blocktrace("log", "info", log).stdout
        seen = file_events(events)
        assert ("create", "/one-small") in seen, seen
        assert ("create", "/one-big") in seen and ("delete", "/one-big") in seen, seen
        assert not any(kind == "error" for kind, _ in seen), seen
        thaw(g)

        # Reattach to the same VM, guest still writing, and detach with SIGTERM this time.
        log2 = tmp_path / "b.log"
        att2 = AttachProcess(tmp_path, g.qmp, [f"disk0={tmp_path / 'bt2.img'}"],
                             [f"log:{log2}"], name="attach2")  # fmt: skip
        att2.wait_ready(1)
        guest_workload(g, "two")
        freeze(g)
        att2.proc.send_signal(signal.SIGTERM)
        assert att2.wait() == 0, att2.stderr()
        assert device_node(g.test_qmp, "disk0") == "fmt0"
        g.sh("ls /mnt/two-keep")
        visible = visible_now(g, disk, "qcow2", tmp_path / "visible2.raw")
        blocktrace("verify", replay_from_zero(tmp_path, log2, size, "replayed2.raw"), visible)
        thaw(g)
        g.sh("umount /mnt")
    os.unlink(tmp_path / "bt.img")


def make_filled_ext4(tmp: Path, disk: Path, size: int, files: dict[str, int]) -> None:
    """A sparse raw disk with ext4 holding ``files`` (name: MiB of random data), made on
    the host with ``mkfs.ext4 -d`` (the guest would take minutes to write them)."""
    content = tmp / "fill-content"
    content.mkdir()
    for name, mib in files.items():
        with open(content / name, "wb") as f:
            for _ in range(mib):
                f.write(os.urandom(1 << 20))
    with open(disk, "wb") as f:
        f.truncate(size)
    run(["mkfs.ext4", "-q", "-F", "-E", "nodiscard", "-d", str(content), str(disk)])
    subprocess.run(["rm", "-rf", str(content)], check=True)


def drop_cache(path: Path) -> None:
    """Evict the file's clean pages from the host's cache: the base copy then reads from
    the disk, slowly, so guest writes land while its chunks are being read."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def test_filter_raw_vm_log_replica_introspect_detach(tmp_path: Path) -> None:
    """--mechanism filter on a 384 MiB disk holding 200 MiB of data, the guest writing all
    along (a hot file overwritten in place with O_DIRECT, a file rewritten with fsync, files
    created and removed) while blocktrace inserts blklogwrites and copies the base with the
    VM running: after the detach the shadow, the log replayed from zero and the replica all
    equal the VM's disk, and the introspection target saw the files.  With the copy map's
    skip removed (the copy writing every chunk it read) the shadow differed from the disk in
    1-4 blocks in 5 of 6 runs (2026-12-03): the attach log counts the entries that reached
    a chunk while it was being read."""
    size = 384 << 20
    disk = tmp_path / "vm.raw"
    make_filled_ext4(tmp_path, disk, size, {"hot": 64, "cold": 136})
    with Guest(tmp_path, [GuestDisk(disk, "raw")]) as g:
        g.sh("mount -o discard /dev/vda /mnt && echo before > /mnt/before && sync")
        start_background_writer(g, "/mnt/bg")
        # eight writers in place, 4 KiB at a time, each front to back through its eighth of
        # /mnt/hot: a block is written once, so a base copied over its entry would last
        # until the comparison (and the copy's read of the chunk a writer is in overlaps
        # that writer's next write more often than not)
        g.sh("for q in 0 1 2 3 4 5 6 7; do dd if=/dev/urandom of=/mnt/hot bs=4k count=2048 "
             "seek=$((q*2048)) oflag=direct conv=notrunc >/dev/null 2>&1 & echo $! "
             ">> /tmp/hot-pids; done")  # fmt: skip
        g.sh("touch /tmp/churn; (i=0; while [ -e /tmp/churn ]; do i=$((i+1)); dd "
             "if=/dev/urandom of=/mnt/c$i bs=4k count=4 conv=fsync 2>/dev/null; rm -f "
             "/mnt/c$((i-2)); done; touch /tmp/churn-done) >/dev/null 2>&1 &")  # fmt: skip
        drop_cache(disk)
        log, events, replica = tmp_path / "f.log", tmp_path / "ev.jsonl", tmp_path / "rep.img"
        shadow = tmp_path / "shadow.img"
        att = AttachProcess(tmp_path, g.qmp, [f"disk0={shadow}"],
                            [f"log:{log}", f"replica:{replica}", f"introspect:{events}"],
                            extra=("--mechanism", "filter"))  # fmt: skip
        att.wait_ready(3)
        names = {n["node-name"] for n in qemu_qmp(g.test_qmp, "query-named-block-nodes")}
        assert {"blocktrace-blw-disk0-log", "blocktrace-log-disk0-log"} <= names
        guest_workload(g, "f")
        g.sh("for p in $(cat /tmp/hot-pids); do kill $p; while kill -0 $p; do sleep 1; done; "
             "done 2>/dev/null; rm /tmp/churn; while [ ! -e /tmp/churn-done ]; do sleep 1; "
             "done")  # fmt: skip
        stop_background_writer(g)
        freeze(g)
        blocktrace("detach", "--socket", att.qmp, timeout=300)
        assert att.wait() == 0, att.stderr()
        pauses = re.findall(r"guest paused ([0-9.]+) ms", att.stderr())
        assert len(pauses) == 3, att.stderr()  # insert, settle, remove: no stop/cont
        copied = re.search(r"base copied in .*\(([0-9.]+) MiB read", att.stderr())
        assert copied and float(copied.group(1)) >= 200, att.stderr()
        names = {n["node-name"] for n in qemu_qmp(g.test_qmp, "query-named-block-nodes")}
        assert not any(n.startswith("blocktrace") for n in names)
        assert device_node(g.test_qmp, "disk0") == "fmt0"
        blocktrace("verify", shadow, disk)
        blocktrace("verify", replay_from_zero(tmp_path, log, size, "r.raw"), disk)
        blocktrace("verify", replica, disk)
        blocktrace("verify", replica, shadow)
        seen = file_events(events)
        assert ("create", "/f-small") in seen and ("delete", "/f-big") in seen, seen
        thaw(g)
        g.sh("ls /mnt/f-keep && umount /mnt")
    assert os.stat(shadow).st_blocks * 512 < size  # holes stayed holes


def test_two_raw_disks_blockdev_and_drive_cancel_one_then_sigint(tmp_path: Path) -> None:
    size = 64 << 20
    d0, d1 = tmp_path / "d0.raw", tmp_path / "d1.raw"
    make_ext4_disk(d0, "raw", size)
    make_ext4_disk(d1, "raw", size)
    disks = [GuestDisk(d0, "raw"), GuestDisk(d1, "raw", style="drive")]
    with Guest(tmp_path, disks) as g:
        g.sh("mount -o discard /dev/vda /mnt && mkdir /m1 && mount -o discard /dev/vdb /m1")
        drive_node = device_node(g.test_qmp, "disk1")
        l0, l1 = tmp_path / "d0.log", tmp_path / "d1.log"
        qdev1 = "/machine/peripheral/disk1/virtio-backend"  # the qdev path works too
        att = AttachProcess(tmp_path, g.qmp,
                            [f"disk0={tmp_path / 'bt0.img'}", f"{qdev1}={tmp_path / 'bt1.img'}"],
                            [f"disk0=log:{l0},job-id=t0", f"disk1=log:{l1},job-id=t1"])  # fmt: skip
        att.wait_ready(2)
        assert device_node(g.test_qmp, "disk0") == "blocktrace-disk0"
        assert device_node(g.test_qmp, "disk1") == "blocktrace-disk1"
        g.sh("dd if=/dev/urandom of=/mnt/f bs=4k count=100 conv=fsync 2>/dev/null")
        g.sh("dd if=/dev/urandom of=/m1/f bs=4k count=100 conv=fsync 2>/dev/null && sync")
        # block-job-cancel of disk1's trace (QEMU's own command, on blocktrace's socket)
        # detaches disk1 only: it goes back to a re-opened node on its image (-drive's
        # nodes die with the pivot), disk0 stays attached.
        blocktrace("trace", "stop", "--socket", att.qmp, "t1")
        deadline = time.monotonic() + 300
        while device_node(g.test_qmp, "disk1") == "blocktrace-disk1":
            assert time.monotonic() < deadline, att.stderr()
            time.sleep(0.2)
        # re-opened on the same image, by blocktrace
        assert device_node(g.test_qmp, "disk1") == "blocktrace-disk1-orig" != drive_node
        assert device_node(g.test_qmp, "disk0") == "blocktrace-disk0"
        assert att.proc.poll() is None
        g.sh("dd if=/dev/urandom of=/m1/g bs=4k count=10 conv=fsync 2>/dev/null && sync")
        g.sh("dd if=/dev/urandom of=/mnt/g bs=4k count=10 conv=fsync 2>/dev/null && sync")
        att.proc.send_signal(signal.SIGINT)
        assert att.wait() == 0, att.stderr()
        assert device_node(g.test_qmp, "disk0") == "fmt0"
        # disk0's trace covered the whole attachment; disk1's ended at its stop, before
        # the guest wrote /m1/g: its log is the disk as of that stop.
        blocktrace("verify", replay_from_zero(tmp_path, l0, size, "r0.raw"), d0)
        r1 = replay_from_zero(tmp_path, l1, size, "r1.raw")
        assert blocktrace("verify", r1, d1, check=False).returncode == 1
        g.sh("umount /mnt && umount /m1")


def test_one_line_errors_change_nothing(tmp_path: Path) -> None:
    """Missing QMP socket, unknown device, an image that exists: one line, nothing changed
    (against a real qemu-storage-daemon, no guest needed)."""
    require("qemu-storage-daemon")
    img = tmp_path / "src.raw"
    with open(img, "wb") as f:
        f.truncate(16 << 20)
    qcow = tmp_path / "q.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(qcow), "16M"], check=True)
    qmp = tmp_path / "qsd.sock"
    qsd = subprocess.Popen(
        [
            "qemu-storage-daemon",
            "--blockdev",
            f"driver=file,filename={img},node-name=p0",
            "--blockdev",
            "driver=raw,file=p0,node-name=n0",
            "--chardev",
            f"socket,id=m,path={qmp},server=on,wait=off",
            "--monitor",
            "chardev=m",
        ]
    )
    try:
        deadline = time.monotonic() + 30
        while not qmp.exists():
            assert time.monotonic() < deadline
            time.sleep(0.05)

        def attach_err(*args: str) -> str:
            p = blocktrace("attach", "--socket", str(tmp_path / "n.sock"), "--trace",
                           f"log:{tmp_path / 'x.log'}", *args, check=False)  # fmt: skip
            assert p.returncode != 0
            lines = p.stderr.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("blocktrace: "), p.stderr
            return lines[0]

        assert "No such file" in attach_err("--qemu", str(tmp_path / "nope.sock"), "d=x.img")
        assert "no device or block node named 'nosuch'" in attach_err(
            "--qemu", str(qmp), f"nosuch={tmp_path / 'bt.img'}"
        )
        (tmp_path / "exists.img").write_bytes(b"keep")
        assert "exists" in attach_err("--qemu", str(qmp), f"n0={tmp_path / 'exists.img'}")
        assert (tmp_path / "exists.img").read_bytes() == b"keep"
        assert not (tmp_path / "bt.img").exists()
        assert not (tmp_path / "x.log").exists()
        with QMPClient.connect_to(str(qmp)) as c:
            qfile = {"driver": "file", "filename": str(qcow)}
            c.execute("blockdev-add", {"driver": "qcow2", "node-name": "q0", "file": qfile})
        assert "use --mechanism pivot" in attach_err(
            "--qemu", str(qmp), "--mechanism", "filter", f"q0={tmp_path / 'bt.img'}"
        )
        assert not (tmp_path / "bt.img").exists()
        with QMPClient.connect_to(str(qmp)) as c:
            nodes = {n["node-name"] for n in c.execute("query-named-block-nodes")}
        others = nodes - {"p0", "n0", "q0"}  # q0's file child, named by QEMU
        assert len(others) == 1 and next(iter(others)).startswith("#"), nodes
    finally:
        qsd.kill()
        qsd.wait()


def test_faults_kill9_blocktrace_resume_then_kill9_qemu(tmp_path: Path) -> None:
    """kill -9 of blocktrace while attached: the guest's I/O fails after the reconnect delay
    (it does not hang), nothing it saw acknowledged is lost, and ``attach --resume`` serves
    the disk again and detaches cleanly.  Then QEMU killed while attached: blocktrace ends
    the trace with its event, keeps the log, and exits with a one-line error."""
    size = 64 << 20
    disk = tmp_path / "vm.raw"
    with open(disk, "wb") as f:
        f.truncate(size)
    bt = tmp_path / "bt.img"
    with Guest(tmp_path, [GuestDisk(disk, "raw")]) as g:
        att = AttachProcess(tmp_path, g.qmp, [f"disk0={bt}"], [f"log:{tmp_path / 'a.log'}"],
                            extra=("--reconnect-delay", "2"))  # fmt: skip
        att.wait_ready(1)
        g.sh("dd if=/dev/urandom of=/tmp/a bs=4k count=64 2>/dev/null")
        g.sh("dd if=/tmp/a of=/dev/vda bs=4k seek=100 oflag=direct conv=fsync 2>/dev/null")
        want_a = g.sh("md5sum < /tmp/a").split()[0]
        att.proc.kill()
        att.wait()
        # The guest is not stuck: its next write fails once the reconnect delay is over.
        rc, _ = g.run("dd if=/dev/zero of=/dev/vda bs=4k count=1 seek=9000 oflag=direct 2>&1")
        assert rc != 0
        # The log of the killed process reads cleanly and holds the fsync'ed data.
        blocktrace("log", "info", tmp_path / "a.log")
        replayed = replay_from_zero(tmp_path, tmp_path / "a.log", size, "a.raw")
        with open(replayed, "rb") as f1, open(bt, "rb") as f2:
            f1.seek(100 * 4096)
            f2.seek(100 * 4096)
            assert f1.read(64 * 4096) == f2.read(64 * 4096)

        # A restarted blocktrace serves the same image again; QEMU reconnects.
        res = AttachProcess(tmp_path, g.qmp, [f"disk0={bt}"], [f"log:{tmp_path / 'b.log'}"],
                            name="resume", extra=("--resume",), nbd=att.nbd)  # fmt: skip
        res.wait_ready(1)
        got = g.sh("dd if=/dev/vda bs=4k skip=100 count=64 iflag=direct 2>/dev/null | md5sum")
        assert got.split()[0] == want_a
        g.sh("dd if=/dev/urandom of=/dev/vda bs=4k seek=300 count=16 oflag=direct conv=fsync")
        res.proc.send_signal(signal.SIGTERM)
        assert res.wait() == 0, res.stderr()
        assert device_node(g.test_qmp, "disk0") == "fmt0"
        vis = g.sh("dd if=/dev/vda bs=4k count=400 iflag=direct 2>/dev/null | md5sum").split()[0]
        with open(disk, "rb") as f:
            import hashlib

            assert hashlib.md5(f.read(400 * 4096)).hexdigest() == vis

        # QEMU killed while attached.
        att3 = AttachProcess(tmp_path, g.qmp, [f"disk0={tmp_path / 'bt3.img'}"],
                             [f"log:{tmp_path / 'c.log'},job-id=c"], name="att3")  # fmt: skip
        att3.wait_ready(1)
        g.sh("dd if=/dev/urandom of=/dev/vda bs=4k seek=500 count=16 oflag=direct conv=fsync")
        with QMPClient.connect_to(str(att3.qmp), timeout=120) as c:
            g.kill()
            ev = c.wait_event(lambda e: e["event"] == "BLOCK_JOB_COMPLETED")
        assert ev["data"]["device"] == "c"
        assert att3.wait() == 1
        assert att3.stderr().strip().splitlines()[-1].startswith("blocktrace: QEMU went away")
        replayed = replay_from_zero(tmp_path, tmp_path / "c.log", size, "c.raw")
        blocktrace("verify", replayed, tmp_path / "bt3.img")


@pytest.mark.parametrize("mechanism", ["pivot", "filter"])
def test_attach_on_qemu_storage_daemon_export(tmp_path: Path, mechanism: str) -> None:
    """qemu-storage-daemon: the disk is a node behind its NBD export (no device, no
    ``stop``).  The pivot moves the export's backend onto blocktrace and back; the filter
    inserts blklogwrites under it and copies its 5 MiB of data; an NBD client writes through
    the export while attached; either way the log replays to the daemon's image (and the
    filter's shadow is that image at the detach)."""
    require("qemu-storage-daemon", "qemu-io")
    size = 16 << 20
    img = tmp_path / "src.raw"
    with open(img, "wb") as f:
        f.truncate(size)
        f.seek(3 << 20)
        f.write(os.urandom(5 << 20))  # data for the filter's base copy
    qmp, nbd = tmp_path / "qsd.sock", tmp_path / "qsd-nbd.sock"
    argv = qsd_export_argv(img, qmp, nbd)
    qsd = subprocess.Popen(argv)
    uri = f"nbd+unix:///n0?socket={nbd}"
    try:
        deadline = time.monotonic() + 30
        while not (qmp.exists() and nbd.exists()):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        log, bt = tmp_path / "q.log", tmp_path / "bt.img"
        att = AttachProcess(tmp_path, qmp, [f"n0={bt}"], [f"log:{log}"],
                            extra=("--mechanism", mechanism))  # fmt: skip
        att.wait_ready(1)
        run(["qemu-io", "-f", "raw", "-c", "write -P 0x5a 4096 65536", "-c", "flush",
             "-c", "write -z 1048576 131072", "-c", "discard 4194304 65536",
             "-c", "write -P 0x17 7340032 4096", uri])  # fmt: skip
        att.proc.send_signal(signal.SIGTERM)
        assert att.wait() == 0, att.stderr()
        if mechanism == "filter":
            assert len(re.findall(r"guest paused [0-9.]+ ms", att.stderr())) == 3
            blocktrace("verify", bt, img)  # the shadow is the image at the detach
        run(["qemu-io", "-f", "raw", "-c", "write -P 0x33 2097152 4096", uri])
        with QMPClient.connect_to(str(qmp)) as c:
            nodes = {n["node-name"] for n in c.execute("query-named-block-nodes")}
        assert nodes == {"p0", "n0"}, nodes
        replayed = replay_from_zero(tmp_path, log, size, "r.raw")
        with open(img, "rb") as f1, open(replayed, "rb") as f2:
            want, got = f1.read(), bytearray(f2.read())
        # the write after detach went to the daemon's own image, not through blocktrace
        assert want[2097152 : 2097152 + 4096] == b"\x33" * 4096
        got[2097152 : 2097152 + 4096] = b"\x33" * 4096
        assert bytes(got) == want
    finally:
        qsd.kill()
        qsd.wait()


def guest_md5(g: Guest, skip: int, count: int) -> str:
    """md5 of ``count`` 4 KiB blocks of the guest's disk from block ``skip`` (O_DIRECT)."""
    cmd = f"dd if=/dev/vda bs=4k skip={skip} count={count} iflag=direct 2>/dev/null | md5sum"
    return g.sh(cmd).split()[0]


def host_md5(path: Path, skip: int, count: int) -> str:
    import hashlib

    with open(path, "rb") as f:
        f.seek(skip * 4096)
        return hashlib.md5(f.read(count * 4096)).hexdigest()


def guest_write(g: Guest, seek: int, count: int, name: str) -> tuple[int, str]:
    """Write ``count`` random 4 KiB blocks at block ``seek`` (O_DIRECT, fsync): (exit status,
    md5 of what was written)."""
    g.sh(f"dd if=/dev/urandom of=/tmp/{name} bs=4k count={count} 2>/dev/null")
    rc, _ = g.run(f"dd if=/tmp/{name} of=/dev/vda bs=4k seek={seek} oflag=direct conv=fsync "
                  "2>/dev/null")  # fmt: skip
    return rc, g.sh(f"md5sum < /tmp/{name}").split()[0]


def empty_raw(path: Path, size: int) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def start_raw_writer(g: Guest, seek: int) -> None:
    """A guest loop writing the raw disk (O_DIRECT, no flush) until told to stop; a write
    that fails leaves /tmp/failed."""
    g.sh(f"touch /tmp/run; rm -f /tmp/done /tmp/failed; (while [ -e /tmp/run ]; do "
         f"dd if=/dev/urandom of=/dev/vda bs=4k seek={seek} count=8 oflag=direct 2>/dev/null "
         "|| touch /tmp/failed; done; touch /tmp/done) >/dev/null 2>&1 &")  # fmt: skip


def stop_raw_writer(g: Guest) -> bool:
    """Stop :func:`start_raw_writer`'s loop; whether one of its writes failed."""
    g.sh("rm /tmp/run; while [ ! -e /tmp/done ]; do sleep 1; done")
    return g.run("ls /tmp/failed")[0] == 0


def test_filter_kill9_detach_qemu_then_kill9_attach_resume(tmp_path: Path) -> None:
    """--mechanism filter, blocktrace killed (SIGKILL) while the guest writes: its writes fail
    (after the log node's reconnect delay) but reach the image, reads work; ``blocktrace
    detach --qemu`` puts the graph back exactly as before the attach and the guest writes
    again, everything it saw acknowledged on its disk.  Killed again, ``attach --resume
    --mechanism filter`` removes the stale filter and starts a new trace on a new base, whose
    log replays to the disk at detach."""
    size = 64 << 20
    disk = empty_raw(tmp_path / "vm.raw", size)
    with Guest(tmp_path, [GuestDisk(disk, "raw")]) as g:
        before = block_graph(g.test_qmp)
        filt = ("--mechanism", "filter", "--reconnect-delay", "2")
        att = AttachProcess(tmp_path, g.qmp, [f"disk0={tmp_path / 's1.img'}"],
                            [f"log:{tmp_path / 'a.log'}"], extra=filt)  # fmt: skip
        att.wait_ready(1)
        assert block_graph(g.test_qmp) != before
        rc, want_a = guest_write(g, 100, 64, "a")
        assert rc == 0
        start_raw_writer(g, 2000)
        att.proc.kill()
        att.wait()
        # Writes fail (EIO once the reconnect delay is over) but their data is on the image
        # (blklogwrites writes the data, then the log entry; dd stops at the first EIO).
        rc, want_b = guest_write(g, 200, 1, "b")
        assert rc != 0
        assert host_md5(disk, 200, 1) == want_b
        assert guest_md5(g, 100, 64) == want_a  # reads go to the image: they work
        assert stop_raw_writer(g)  # it saw its writes fail

        out = blocktrace("detach", "--qemu", g.qmp, "disk0", timeout=300)
        assert "detached disk0: back on proto0" in out.stdout, out
        assert block_graph(g.test_qmp) == before
        rc, want_c = guest_write(g, 300, 16, "c")
        assert rc == 0
        assert host_md5(disk, 100, 64) == want_a and host_md5(disk, 300, 16) == want_c

        # Killed again; this time a restarted attach removes the filter and attaches afresh,
        # within the reconnect delay: the guest's write meanwhile waits and then succeeds.
        filt = ("--mechanism", "filter", "--reconnect-delay", "600")
        att2 = AttachProcess(tmp_path, g.qmp, [f"disk0={tmp_path / 's2.img'}"],
                             [f"log:{tmp_path / 'b.log'}"], name="att2", extra=filt)  # fmt: skip
        att2.wait_ready(1)
        assert guest_write(g, 400, 16, "d")[0] == 0
        att2.proc.kill()
        att2.wait()
        g.sh("dd if=/dev/urandom of=/tmp/e bs=4k count=1 2>/dev/null")
        want_e = g.sh("md5sum < /tmp/e").split()[0]
        g.sh("rm -f /tmp/rc_e; (dd if=/tmp/e of=/dev/vda bs=4k seek=500 oflag=direct "
             "conv=fsync 2>/dev/null; echo $? > /tmp/rc_e) >/dev/null 2>&1 &")  # fmt: skip
        deadline = time.monotonic() + 300
        while host_md5(disk, 500, 1) != want_e:  # data on the image, its log write held
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert g.run("ls /tmp/rc_e")[0] != 0  # still waiting
        new_log = tmp_path / "c.log"
        att3 = AttachProcess(tmp_path, g.qmp, [f"disk0={tmp_path / 's3.img'}"],
                             [f"log:{new_log}"], name="att3", extra=(*filt, "--resume"),
                             nbd=att2.nbd)  # fmt: skip
        att3.wait_ready(1)
        assert "a new trace on a new base" in att3.stderr()
        g.sh("while [ ! -e /tmp/rc_e ]; do sleep 1; done")
        assert g.sh("cat /tmp/rc_e").strip() == "0"  # the held write succeeded
        rc, want_f = guest_write(g, 600, 16, "f")
        assert rc == 0
        att3.proc.send_signal(signal.SIGTERM)
        assert att3.wait() == 0, att3.stderr()
        assert block_graph(g.test_qmp) == before
        # The new trace (sync=full) rebuilds the disk at detach from zeroes.
        blocktrace("verify", replay_from_zero(tmp_path, new_log, size, "c.raw"), disk)
        blocktrace("verify", tmp_path / "s3.img", disk)
        assert host_md5(disk, 600, 16) == want_f


def test_filter_sink_failure_detaches_and_keeps_the_trace(tmp_path: Path) -> None:
    """The sink cannot decode what it receives (here: a second NBD client writes a super block
    without magic into the sink export): the filter is removed, the trace ends at the last
    decoded operation with its data, the attach process exits 1 with one line, the VM runs
    on."""
    require("qemu-io")
    size = 64 << 20
    disk = empty_raw(tmp_path / "vm.raw", size)
    with Guest(tmp_path, [GuestDisk(disk, "raw")]) as g:
        before = block_graph(g.test_qmp)
        shadow, log = tmp_path / "shadow.img", tmp_path / "f.log"
        att = AttachProcess(tmp_path, g.qmp, [f"disk0={shadow}"], [f"log:{log}"],
                            extra=("--mechanism", "filter"))  # fmt: skip
        att.wait_ready(1)
        rc, want_a = guest_write(g, 100, 64, "a")
        assert rc == 0
        # The guest keeps writing (no flush: the detach's reopen flushes through the filter)
        # and counts the writes that fail.
        start_raw_writer(g, 2000)
        time.sleep(2)
        bad = subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 0x55 0 512",
                              f"nbd+unix:///disk0-log?socket={att.nbd}"],
                             capture_output=True, text=True, timeout=120)  # fmt: skip
        assert bad.returncode != 0 and "Input/output error" in bad.stdout, bad
        assert att.wait() == 1
        last = att.stderr().strip().splitlines()[-1]
        assert last == "blocktrace: a log sink failed (see above); its disk was detached", last
        assert "super block written without dm-log-writes magic" in att.stderr()
        assert block_graph(g.test_qmp) == before
        assert not stop_raw_writer(g), "the guest saw a write fail"
        # The VM runs on, untraced; the trace ends with what was decoded.
        rc, want_b = guest_write(g, 300, 16, "b")
        assert rc == 0 and host_md5(disk, 300, 16) == want_b
        replayed = replay_from_zero(tmp_path, log, size, "r.raw")
        blocktrace("verify", replayed, shadow)
        assert host_md5(replayed, 100, 64) == want_a
        assert host_md5(replayed, 300, 16) == host_md5(tmp_path / "r.raw", 300, 16)
        assert host_md5(shadow, 300, 16) != want_b
