"""``blocktrace attach`` argument handling: disks, trace binding, the sync default."""

from __future__ import annotations

import pytest

from blocktrace.attach.monitor import Disk, Monitor
from blocktrace.attach.pivot import Pivot
from blocktrace.attach.session import Attached, AttachSession, parse_disk_arg
from blocktrace.errors import UsageError


def session(traces: list[str], labels: tuple[str, ...] = ("disk0",)) -> AttachSession:
    s = AttachSession("q.sock", [(lbl, f"{lbl}.img") for lbl in labels], traces,
                      nbd_socket="n.sock")  # fmt: skip
    for lbl in labels:
        disk = Disk(lbl, f"fmt-{lbl}", lbl, 1 << 20, "qcow2", "x.qcow2", {})
        pivot = Pivot(Monitor("q.sock"), disk, socket="n.sock", export=lbl)
        s.disks.append(Attached(disk, lbl, f"{lbl}.img", pivot))
    s._bind_traces()
    return s


def test_parse_disk_arg() -> None:
    assert parse_disk_arg("disk0=/tmp/a=b.img") == ("disk0=/tmp/a", "b.img")
    assert parse_disk_arg("/machine/peripheral/d/virtio-backend=x.img")[0].endswith("backend")
    with pytest.raises(UsageError):
        parse_disk_arg("disk0")


def test_log_and_replica_default_to_sync_full_introspect_stays() -> None:
    s = session(["log:a.log", "replica:r.img", "introspect:e.jsonl"])
    syncs = [spec.options.sync.value for spec in s.disks[0].specs]
    assert syncs == ["full", "full", "none"]


def test_explicit_sync_none_for_a_log_is_refused() -> None:
    with pytest.raises(UsageError, match="sync=full"):
        session(["log:a.log,sync=none"])


def test_several_disks_need_the_export_named() -> None:
    with pytest.raises(UsageError, match="name the export"):
        session(["log:a.log"], ("disk0", "disk1"))
    with pytest.raises(UsageError, match="no attached disk exported as 'disk9'"):
        session(["disk9=log:a.log"], ("disk0", "disk1"))
    s = session(["disk1=log:a.log"], ("disk0", "disk1"))
    assert [len(a.specs) for a in s.disks] == [0, 1]
