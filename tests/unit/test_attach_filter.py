"""The filter mechanism's QMP sequence and base copy, against a recording fake monitor.

What QEMU does with the commands is proved by the guest tests
(``tests/integration/test_attach_guest.py``); here: no ``stop``/``cont`` is ever sent, the
base copy runs between the inserting reopen and a second (settling) reopen, the shadow ends
equal to the file, and a detach during the copy ends the attach with one line.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import pytest

from blocktrace.attach.filter import Filter
from blocktrace.attach.monitor import AttachError, Disk, Monitor
from blocktrace.attach.sink import LogSinkDevice
from blocktrace.block.file import FileDevice
from blocktrace.trace.filter import TraceFilter

SIZE = 8 << 20


class FakeMonitor(Monitor):
    """Records every command; ``on`` runs a hook when a command is sent."""

    def __init__(self) -> None:
        super().__init__("fake.sock")
        self.sent: list[tuple[str, dict[str, Any]]] = []
        self.on: dict[str, Any] = {}

    async def execute(self, cmd: str, args: dict[str, Any] | None = None) -> Any:
        self.sent.append((cmd, args or {}))
        hook = self.on.pop(cmd, None)
        if hook is not None:
            await hook()
        return {}


def make(tmp_path: Path) -> tuple[Filter, FakeMonitor, LogSinkDevice, Path, Path]:
    disk_file, shadow_file = tmp_path / "vm.raw", tmp_path / "shadow.raw"
    with open(disk_file, "wb") as f:
        f.truncate(SIZE)
        f.seek(1 << 20)
        f.write(os.urandom(3 << 20))
    with open(shadow_file, "wb") as f:
        f.truncate(SIZE)
    mon = FakeMonitor()
    disk = Disk("disk0", "fmt0", "disk0", SIZE, "raw", str(disk_file), {})
    filt = Filter(mon, disk, "n.sock", "disk0-log", str(shadow_file))
    filt._proto = "proto0"
    filt.sink = LogSinkDevice(TraceFilter(FileDevice(shadow_file)))
    return filt, mon, filt.sink, disk_file, shadow_file


def test_attach_never_stops_the_vm_and_copies_the_base_between_two_reopens(
    tmp_path: Path,
) -> None:
    async def main() -> None:
        filt, mon, sink, disk_file, shadow_file = make(tmp_path)
        await filt.attach()
        assert [c for c, _ in mon.sent] == [
            "blockdev-add",
            "blockdev-add",
            "blockdev-reopen",
            "blockdev-reopen",
        ]
        assert mon.sent[2][1] == mon.sent[3][1]  # the settle is the same reopen again
        assert mon.sent[3][1]["options"][0]["file"] == "blocktrace-blw-disk0-log"
        assert sink.base is None and filt.attached and len(filt.pause_seconds) == 2
        assert filt.copy is not None and filt.copy.read == 3 << 20
        assert shadow_file.read_bytes() == disk_file.read_bytes()
        await filt.detach()
        assert [c for c, _ in mon.sent[4:]] == ["blockdev-reopen", "blockdev-del", "blockdev-del"]
        assert mon.sent[4][1]["options"][0]["file"] == "proto0"
        await sink.shadow.close()

    asyncio.run(main())


def test_a_detach_during_the_copy_ends_the_attach_with_one_line(tmp_path: Path) -> None:
    async def main() -> None:
        filt, mon, sink, _, _ = make(tmp_path)

        async def fail_soon() -> None:
            # the sink failed (a decoding error) as the copy began: the session detaches
            asyncio.get_running_loop().call_soon(lambda: asyncio.ensure_future(filt.detach()))

        mon.on["blockdev-reopen"] = fail_soon
        with pytest.raises(AttachError, match="detached during the base copy"):
            await filt.attach()
        assert not filt.attached and sink.base is None
        cmds = [c for c, _ in mon.sent]
        assert cmds.count("blockdev-del") == 2 and cmds.count("blockdev-reopen") == 2
        await sink.shadow.close()

    asyncio.run(main())
