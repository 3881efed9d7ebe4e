"""Several VMs on one host, each with its own ``blocktrace attach`` process.

The design (docs/attach.md, "Several VMs"): one attach process per QEMU.  These tests prove
that two of them run side by side without anything crossing between the VMs: two real TCG
guests attached at once (pivot for one, filter for the other), and, against two QEMUs that
never start their CPU (no guest needed), that a VM still reconnecting to a killed attach's
socket can never be served another VM's image.
"""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from test_attach_guest import (
    AttachProcess,
    device_node,
    freeze,
    guest_workload,
    qemu_qmp,
    replay_from_zero,
    start_background_writer,
    stop_background_writer,
    thaw,
)

from blocktrace.qmp.client import QMPClient
from guest import Guest, GuestDisk, make_ext4_disk
from support import blocktrace, require

pytestmark = pytest.mark.slow

SIZE = 16 << 20


@contextmanager
def stopped_vm(tmp: Path, name: str) -> Iterator[tuple[Path, Path, Path]]:
    """A qemu-system-x86_64 that never runs a CPU (``-S``), with disk ``disk0`` on a raw
    image: (QMP socket for attach, QMP socket for the test, image).  Every such VM has the
    same device and node names, as libvirt's VMs do: only the socket paths tell them apart.
    Its disk is written through the human monitor's ``qemu-io`` (the device's own
    BlockBackend)."""
    img = tmp / f"{name}.raw"
    with open(img, "wb") as f:
        f.truncate(SIZE)
    qmp, test_qmp = tmp / f"{name}-qmp.sock", tmp / f"{name}-test-qmp.sock"
    argv = ["qemu-system-x86_64", "-accel", "tcg", "-machine", "pc", "-m", "64", "-S",
            "-nodefaults", "-display", "none",
            "-blockdev", f"driver=file,filename={img},node-name=proto0",
            "-blockdev", "driver=raw,file=proto0,node-name=fmt0",
            "-device", "virtio-blk-pci,drive=fmt0,id=disk0",
            "-qmp", f"unix:{qmp},server=on,wait=off",
            "-qmp", f"unix:{test_qmp},server=on,wait=off"]  # fmt: skip
    vm = subprocess.Popen(argv, stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while not test_qmp.exists():
            assert vm.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        yield qmp, test_qmp, img
    finally:
        vm.kill()
        vm.wait()


def vm_write(qmp: Path, pattern: int, offset: int, length: int = 65536) -> None:
    """A write to the VM's disk0 through its device's BlockBackend, as the guest would make
    it (blocks while QEMU's nbd node reconnects).  qemu-io reports to QEMU's stdout, so the
    images are checked instead."""
    dev = "/machine/peripheral/disk0/virtio-backend"
    cmd = f'qemu-io -d {dev} "write -P {pattern:#x} {offset} {length}"'
    with QMPClient.connect_to(str(qmp), timeout=300) as c:
        out = c.execute("human-monitor-command", {"command-line": cmd})
    assert "rror" not in out, out


def nodes(qmp: Path) -> set[str]:
    with QMPClient.connect_to(str(qmp)) as c:
        return {n["node-name"] for n in c.execute("query-named-block-nodes")}


def holds(image: Path, pattern: int, offset: int, length: int = 65536) -> bool:
    with open(image, "rb") as f:
        f.seek(offset)
        return f.read(length) == bytes([pattern]) * length


def one_line_error(args: list[str]) -> str:
    p = blocktrace(*args, check=False, timeout=60)
    assert p.returncode != 0, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("blocktrace: "), p.stderr
    return lines[0]


def test_a_vm_reconnecting_to_a_killed_attach_never_reaches_another_vms_image(
    tmp_path: Path,
) -> None:
    """VM A's attach is killed (A's nbd node keeps reconnecting to its socket); an attach
    for VM B given the same socket, or a resume of A given B's socket, is refused: A's
    writes never land in B's image (without the check they did, on QEMU 7.2)."""
    require("qemu-system-x86_64")
    with (
        stopped_vm(tmp_path, "a") as (qmp_a, test_a, _),
        stopped_vm(tmp_path, "b") as (
            qmp_b,
            test_b,
            img_b,
        ),
    ):
        sock_a, sock_b = tmp_path / "a.sock", tmp_path / "b.sock"
        bt_a, bt_b = tmp_path / "bt-a.img", tmp_path / "bt-b.img"
        att_a = AttachProcess(tmp_path, qmp_a, [f"disk0={bt_a}"], [f"log:{tmp_path / 'a.log'}"],
                              name="att-a", nbd=sock_a,
                              extra=("--reconnect-delay", "120"))  # fmt: skip
        att_a.wait_ready(1)
        vm_write(test_a, 0xAA, 0)
        att_a.proc.kill()
        att_a.wait()
        assert sock_a.exists()  # left by the kill; A's nbd node reconnects to it

        # An attach for VM B (same device name, same size) on A's socket: refused, nothing
        # made, B unchanged.  (Without the check it served B's image there, and A's next
        # write landed in it.)
        bt_b2 = tmp_path / "bt-b2.img"
        err = one_line_error(["attach", "--qemu", str(qmp_b), "--socket", str(sock_a),
                              f"disk0={bt_b2}", "--trace", f"log:{tmp_path / 'b2.log'}"],
                             )  # fmt: skip
        assert "exists" in err and "--socket" in err, err
        assert not bt_b2.exists() and not (tmp_path / "b2.log").exists()
        assert nodes(test_b) == {"proto0", "fmt0"}

        att_b = AttachProcess(tmp_path, qmp_b, [f"disk0={bt_b}"], [f"log:{tmp_path / 'b.log'}"],
                              name="att-b", nbd=sock_b,
                              extra=("--reconnect-delay", "120"))  # fmt: skip
        att_b.wait_ready(1)
        vm_write(test_b, 0xBB, 0)
        att_b.proc.kill()
        att_b.wait()
        # Resuming B on A's socket (A would reconnect into B's image): refused.
        err = one_line_error(["attach", "--resume", "--qemu", str(qmp_b),
                              "--socket", str(sock_a), f"disk0={bt_b}",
                              "--trace", f"log:{tmp_path / 'b3.log'}"])  # fmt: skip
        assert f"connects to {sock_b}" in err, err
        assert nodes(test_b) == {"proto0", "fmt0", "blocktrace-disk0"}

        # Each resumed on its own socket: A's write lands in A's image only, B's in B's.
        res_a = AttachProcess(tmp_path, qmp_a, [f"disk0={bt_a}"], [f"log:{tmp_path / 'a2.log'}"],
                              name="res-a", nbd=sock_a, extra=("--resume",))  # fmt: skip
        res_b = AttachProcess(tmp_path, qmp_b, [f"disk0={bt_b}"], [f"log:{tmp_path / 'b4.log'}"],
                              name="res-b", nbd=sock_b, extra=("--resume",))  # fmt: skip
        res_a.wait_ready(1)
        res_b.wait_ready(1)
        vm_write(test_a, 0xEE, 1 << 20)
        vm_write(test_b, 0xDD, 2 << 20)
        for p in (res_a, res_b):
            p.proc.send_signal(signal.SIGTERM)
            assert p.wait() == 0, p.stderr()
        assert holds(bt_a, 0xAA, 0) and holds(bt_a, 0xEE, 1 << 20)
        assert holds(bt_b, 0xBB, 0) and holds(bt_b, 0xDD, 2 << 20)
        assert not holds(bt_b, 0xEE, 1 << 20) and not holds(bt_a, 0xDD, 2 << 20)
        assert holds(img_b, 0xDD, 2 << 20) and not holds(img_b, 0xEE, 1 << 20)
        assert nodes(test_a) == nodes(test_b) == {"proto0", "fmt0"}


def test_two_guests_attached_at_once_pivot_and_filter_nothing_crosses(tmp_path: Path) -> None:
    """Two TCG guests, each with its own attach process, both disks exported as ``disk0``:
    VM A by the pivot, VM B by the filter, attached at the same time while both write; a mark
    in each; A detached while B stays attached and writes on; then B.  Each log replays to its
    own VM's disk, each mark is in its own log only, and each VM's marker bytes are in its own
    replay only."""
    require("qemu-system-x86_64", "qemu-img", "mkfs.ext4")
    size = 64 << 20
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    disk_a, disk_b = tmp_path / "a" / "vm.raw", tmp_path / "b" / "vm.raw"
    make_ext4_disk(disk_a, "raw", size)
    make_ext4_disk(disk_b, "raw", size)
    log_a, log_b = tmp_path / "a.log", tmp_path / "b.log"
    shadow_b = tmp_path / "b-shadow.img"
    with (
        Guest(tmp_path / "a", [GuestDisk(disk_a, "raw")], memory=160) as ga,
        Guest(tmp_path / "b", [GuestDisk(disk_b, "raw")], memory=160) as gb,
    ):
        for g, tag in ((ga, "A"), (gb, "B")):
            g.sh("mount -o discard /dev/vda /mnt")
            g.sh(f"yes VM-{tag}-DATA | head -c 262144 > /mnt/marker && sync")
            start_background_writer(g, "/mnt/bg")
        # Both attach processes start together; each has its own sockets (nothing shared).
        att_a = AttachProcess(tmp_path, ga.qmp, [f"disk0={tmp_path / 'a-bt.img'}"],
                              [f"log:{log_a},job-id=a"], name="att-a")  # fmt: skip
        att_b = AttachProcess(tmp_path, gb.qmp, [f"disk0={shadow_b}"],
                              [f"log:{log_b},job-id=b"], name="att-b",
                              extra=("--mechanism", "filter"))  # fmt: skip
        assert [j["export"] for j in att_a.wait_ready(1)] == ["disk0"]
        assert [j["export"] for j in att_b.wait_ready(1)] == ["disk0"]
        assert device_node(ga.test_qmp, "disk0") == "blocktrace-disk0"
        names_b = {n["node-name"] for n in qemu_qmp(gb.test_qmp, "query-named-block-nodes")}
        assert "blocktrace-blw-disk0-log" in names_b and "blocktrace-disk0" not in names_b
        for g, att, job, tag in ((ga, att_a, "a", "A"), (gb, att_b, "b", "B")):
            guest_workload(g, tag.lower())
            g.sh(f"yes VM-{tag}-MORE | head -c 131072 > /mnt/more && sync")
            blocktrace("trace", "mark", "--socket", att.qmp, job, f"{job}-mid")
        stop_background_writer(ga)

        # A leaves blocktrace; B stays attached and goes on writing.
        freeze(ga)
        blocktrace("detach", "--socket", att_a.qmp, timeout=300)
        assert att_a.wait() == 0, att_a.stderr()
        assert device_node(ga.test_qmp, "disk0") == "fmt0"
        assert att_b.proc.poll() is None
        names_b = {n["node-name"] for n in qemu_qmp(gb.test_qmp, "query-named-block-nodes")}
        assert "blocktrace-blw-disk0-log" in names_b
        guest_workload(gb, "b2")
        blocktrace("trace", "mark", "--socket", att_b.qmp, "b", "b-late")
        replay_a = replay_from_zero(tmp_path, log_a, size, "a-replayed.raw")
        blocktrace("verify", replay_a, disk_a)
        thaw(ga)
        ga.sh("dd if=/dev/urandom of=/mnt/after bs=4k count=8 conv=fsync 2>/dev/null")

        stop_background_writer(gb)
        freeze(gb)
        blocktrace("detach", "--socket", att_b.qmp, timeout=300)
        assert att_b.wait() == 0, att_b.stderr()
        assert device_node(gb.test_qmp, "disk0") == "fmt0"
        replay_b = replay_from_zero(tmp_path, log_b, size, "b-replayed.raw")
        blocktrace("verify", replay_b, disk_b)
        blocktrace("verify", shadow_b, disk_b)
        thaw(gb)

        info_a = blocktrace("log", "info", log_a).stdout
        info_b = blocktrace("log", "info", log_b).stdout
        assert "a-mid" in info_a and "b-mid" not in info_a and "b-late" not in info_a
        assert "b-mid" in info_b and "b-late" in info_b and "a-mid" not in info_b
        a_bytes, b_bytes = replay_a.read_bytes(), replay_b.read_bytes()
        for data, mine, theirs in ((a_bytes, b"VM-A-", b"VM-B-"), (b_bytes, b"VM-B-", b"VM-A-")):
            assert mine + b"DATA" in data and mine + b"MORE" in data
            assert theirs not in data
        # B's writes after A's detach are in B's log (it stayed attached), not in A's.
        assert b"hello-b2" in b_bytes and b"hello-b2" not in a_bytes
        for g in (ga, gb):
            g.sh("ls /mnt/marker /mnt/more && umount /mnt")
