"""``blocktrace attach`` on a VM that libvirt runs and owns the monitor of.

A private libvirtd (tests/libvirt_helpers.py) runs the test guest from a qcow2 image, with
a second QMP monitor given at start through ``<qemu:commandline>``.  blocktrace attaches
through that monitor, the guest writes, blocktrace detaches; libvirt then still sees its disk
as before (``virsh domblklist``, ``domblkinfo``, the device on libvirt's own node) and the
guest still writes to it, and the log replays to the disk.  Then the same without a second
monitor: ``attach --libvirt DOMAIN`` through libvirt's QMP pass-through, detach, ``kill -9``
and ``--resume``, and the domain destroyed while attached.
"""

from __future__ import annotations

import hashlib
import json
import signal
from pathlib import Path
from typing import Any

import pytest
from test_attach_guest import (
    AttachProcess,
    freeze,
    guest_workload,
    replay_from_zero,
    start_background_writer,
    stop_background_writer,
    thaw,
)

from blocktrace.qmp.client import QMPClient
from guest import GuestDisk, guest_visible, make_ext4_disk
from libvirt_helpers import Libvirtd, LibvirtGuest
from support import blocktrace

pytestmark = pytest.mark.slow

DOMAIN = "bt-attach"


def monitor(lv: Libvirtd, command: str) -> Any:
    """A QMP command through libvirt's own monitor (``virsh qemu-monitor-command``)."""
    out = lv.virsh("qemu-monitor-command", DOMAIN, json.dumps({"execute": command})).stdout
    return json.loads(out)["return"]


def root_node(lv: Libvirtd) -> str:
    (blk,) = [b for b in monitor(lv, "query-block") if "virtio-disk0" in b.get("qdev", "")]
    return str(blk["inserted"]["node-name"])


def visible_suspended(lv: Libvirtd, disk: Path, out: Path) -> Path:
    """The qcow2's guest-visible disk, read while libvirt has the domain suspended (QEMU's
    ``stop`` drains and flushes every node, the qcow2 metadata cache included)."""
    lv.virsh("suspend", DOMAIN)
    try:
        return guest_visible(disk, "qcow2", out)
    finally:
        lv.virsh("resume", DOMAIN)


def blkinfo(lv: Libvirtd) -> dict[str, str]:
    lines = lv.virsh("domblkinfo", DOMAIN, "vda").stdout.splitlines()
    return {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in lines)}


def written_requests(lv: Libvirtd) -> int:
    for line in lv.virsh("domblkstat", DOMAIN, "vda").stdout.splitlines():
        if line.split()[1] == "wr_req":
            return int(line.split()[2])
    raise AssertionError("no wr_req in domblkstat")


def test_attach_libvirt_vm_through_a_second_monitor_then_detach(tmp_path: Path) -> None:
    size = 64 << 20
    disk = tmp_path / "vm.qcow2"
    make_ext4_disk(disk, "qcow2", size)
    with (
        Libvirtd(tmp_path / "libvirt") as lv,
        LibvirtGuest(lv, tmp_path, GuestDisk(disk, "qcow2"), name=DOMAIN) as g,
    ):
        listed = lv.virsh("domblklist", DOMAIN).stdout
        assert str(disk) in listed
        capacity = blkinfo(lv)["Capacity"]
        assert root_node(lv) == "libvirt-1-format"
        g.sh("mount -o discard /dev/vda /mnt && echo before > /mnt/before && sync")
        start_background_writer(g, "/mnt/bg")

        log = tmp_path / "lv.log"
        att = AttachProcess(tmp_path, g.qmp, [f"virtio-disk0={tmp_path / 'bt.img'}"],
                            [f"log:{log},job-id=lv"])  # fmt: skip
        assert [j["export"] for j in att.wait_ready(1)] == ["virtio-disk0"]
        assert root_node(lv) == "blocktrace-virtio-disk0"
        # libvirt does not see the graph change: its disk definition stays as it was
        assert lv.virsh("domblklist", DOMAIN).stdout == listed
        guest_workload(g, "lv")
        blocktrace("trace", "mark", "--socket", att.qmp, "lv", "in-libvirt")
        stop_background_writer(g)
        freeze(g)
        blocktrace("detach", "--socket", att.qmp, timeout=300)
        assert att.wait() == 0, att.stderr()

        # libvirt sees its disk as before: same definition, size, libvirt's own node
        assert root_node(lv) == "libvirt-1-format"
        assert lv.virsh("domblklist", DOMAIN).stdout == listed
        assert blkinfo(lv)["Capacity"] == capacity
        names = {n["node-name"] for n in monitor(lv, "query-named-block-nodes")}
        assert not any(n.startswith("blocktrace") for n in names), names
        # The log replays to the guest-visible disk.
        visible = visible_suspended(lv, disk, tmp_path / "visible.raw")
        blocktrace("verify", replay_from_zero(tmp_path, log, size, "replayed.raw"), visible)
        assert "in-libvirt" in blocktrace("log", "info", log).stdout
        thaw(g)

        # The guest still writes to its disk, and libvirt counts the writes.
        before = written_requests(lv)
        g.sh("dd if=/dev/urandom of=/mnt/after bs=4k count=16 conv=fsync 2>/dev/null")
        assert written_requests(lv) > before
        g.sh("ls /mnt/lv-keep /mnt/after")

        # No second monitor needed: --libvirt DOMAIN goes through libvirt's pass-through.
        via = ["--libvirt", DOMAIN, "--libvirt-uri", lv.uri]
        p = blocktrace("attach", "--libvirt", "nosuch", "--libvirt-uri", lv.uri, "--socket",
                       str(tmp_path / "x.sock"), f"virtio-disk0={tmp_path / 'x.img'}",
                       "--trace", f"log:{tmp_path / 'x.log'}", check=False)  # fmt: skip
        assert p.returncode == 1 and p.stderr.strip().splitlines() == [
            f"blocktrace: {lv.uri}: no libvirt domain named 'nosuch'"
        ], p.stderr
        assert not (tmp_path / "x.img").exists()
        log2 = tmp_path / "lv2.log"
        att2 = AttachProcess(tmp_path, via, [f"virtio-disk0={tmp_path / 'bt2.img'}"],
                             [f"log:{log2},job-id=lv2"], name="attach2")  # fmt: skip
        att2.wait_ready(1)
        assert root_node(lv) == "blocktrace-virtio-disk0"
        guest_workload(g, "two")
        freeze(g)
        att2.proc.send_signal(signal.SIGTERM)
        assert att2.wait() == 0, att2.stderr()
        assert root_node(lv) == "libvirt-1-format"
        assert lv.virsh("domblklist", DOMAIN).stdout == listed
        assert blkinfo(lv)["Capacity"] == capacity
        visible = visible_suspended(lv, disk, tmp_path / "visible2.raw")
        blocktrace("verify", replay_from_zero(tmp_path, log2, size, "replayed2.raw"), visible)
        thaw(g)
        g.sh("ls /mnt/two-keep && umount /mnt")

        # kill -9 of an attach that went through libvirt: QEMU holds the guest's I/O while it
        # reconnects, and `--resume --libvirt` takes the VM back, then detaches cleanly.
        btk = tmp_path / "btk.img"
        attk = AttachProcess(tmp_path, via, [f"virtio-disk0={btk}"],
                             [f"log:{tmp_path / 'k.log'}"], name="attachk",
                             extra=("--reconnect-delay", "120"))  # fmt: skip
        attk.wait_ready(1)
        g.sh("dd if=/dev/urandom of=/tmp/k bs=4k count=16 2>/dev/null")
        g.sh("dd if=/tmp/k of=/dev/vda bs=4k seek=700 oflag=direct conv=fsync 2>/dev/null")
        want = g.sh("md5sum < /tmp/k").split()[0]
        attk.proc.kill()
        attk.wait()
        res = AttachProcess(tmp_path, via, [f"virtio-disk0={btk}"],
                            [f"log:{tmp_path / 'k2.log'}"], name="resumek",
                            extra=("--resume",), nbd=attk.nbd)  # fmt: skip
        res.wait_ready(1)
        got = g.sh("dd if=/dev/vda bs=4k skip=700 count=16 iflag=direct 2>/dev/null | md5sum")
        assert got.split()[0] == want
        res.proc.send_signal(signal.SIGTERM)
        assert res.wait() == 0, res.stderr()
        assert root_node(lv) == "libvirt-1-format"
        assert lv.virsh("domblklist", DOMAIN).stdout == listed
        visible = visible_suspended(lv, disk, tmp_path / "visiblek.raw")
        with open(visible, "rb") as f:
            f.seek(700 * 4096)
            assert hashlib.md5(f.read(16 * 4096)).hexdigest() == want

        # The domain destroyed while attached through libvirt: the trace ends with its
        # event, keeps what it received, and attach exits with one line.
        log3, bt3 = tmp_path / "lv3.log", tmp_path / "bt3.img"
        att3 = AttachProcess(tmp_path, via, [f"virtio-disk0={bt3}"], [f"log:{log3},job-id=c"],
                             name="attach3")  # fmt: skip
        att3.wait_ready(1)
        g.sh("dd if=/dev/urandom of=/dev/vda bs=4k seek=500 count=16 oflag=direct conv=fsync")
        with QMPClient.connect_to(str(att3.qmp), timeout=120) as c:
            lv.virsh("destroy", DOMAIN)
            ev = c.wait_event(lambda e: e["event"] == "BLOCK_JOB_COMPLETED")
        assert ev["data"]["device"] == "c"
        assert att3.wait() == 1
        assert att3.stderr().strip().splitlines()[-1].startswith("blocktrace: QEMU went away")
        blocktrace("verify", replay_from_zero(tmp_path, log3, size, "replayed3.raw"), bt3)
