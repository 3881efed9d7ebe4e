"""The *pivot* mechanism: live storage migration of a VM's disk into a blocktrace export.

The way ``virsh blockcopy --pivot`` works, with blocktrace as the destination:

1. ``blockdev-add`` an ``nbd`` node on the blocktrace export (a raw image the operator named,
   the guest-visible size);
2. ``blockdev-mirror`` the device's root node into it, ``sync=full``,
   ``copy-mode=write-blocking`` (a guest write completes only once both sides have it);
3. wait for the job to be ready, then ``block-job-complete``: QEMU drains the device and
   swaps the nbd node in.  From then on the VM's disk *is* the export, at guest offsets
   whatever the source format was (a qcow2 is copied as what the guest sees), with every
   blocktrace guarantee: FUA, FLUSH, marks, write-blocking delivery.

Detach reverses it: the original node (kept alive by QEMU when it was created with
``-blockdev``/``blockdev-add``, re-opened from its recorded file name otherwise) becomes the
target of a second ``sync=full`` mirror, completed the same way, and the nbd node is deleted.
The VM ends on its own image, which holds every write the guest made while attached.

Why not leave the mirror running instead of completing it: a mirror merges writes through
its dirty bitmap and flushes only its source, so FLUSH never reaches the target; only after
the pivot does every guest request reach blocktrace one by one.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from blocktrace.attach.guard import check_resume_socket
from blocktrace.attach.monitor import AttachError, Disk, Monitor

log = logging.getLogger("blocktrace.attach")

#: the QMP commands the pivot needs (checked before anything changes)
PIVOT_COMMANDS = ("blockdev-add", "blockdev-del", "blockdev-mirror", "block-job-complete")


@dataclass
class Pivot:
    """One disk moved onto a blocktrace export (and back)."""

    monitor: Monitor
    disk: Disk
    #: the blocktrace NBD socket and export QEMU connects to
    socket: str
    export: str
    #: seconds QEMU's nbd client keeps requests while reconnecting to a restarted blocktrace
    reconnect_delay: int = 10
    #: the nbd node's name in QEMU
    node: str = ""
    #: how long each switch took (block-job-complete until the device ran on the new node)
    switch_seconds: list[float] = field(default_factory=list)
    attached: bool = False

    def __post_init__(self) -> None:
        if not self.node:
            self.node = f"blocktrace-{self.export}"

    @property
    def job_id(self) -> str:
        return f"blocktrace-pivot-{self.export}"

    async def check(self) -> None:
        """Refuse a QEMU without the commands, or a resume on another socket than the one
        the disk's nbd node reconnects to (nothing changes)."""
        await self.monitor.require(PIVOT_COMMANDS)
        if self.attached:
            check_resume_socket(await self.monitor.node(self.node), self.socket, self.disk.spec)

    async def attach(self) -> None:
        """Move the disk onto the export; on failure leave QEMU's graph as it was."""
        if await self.monitor.node(self.node) is not None:
            raise AttachError(f"QEMU already has a node {self.node!r} (attached already?)")
        await self.monitor.execute(
            "blockdev-add",
            {
                "driver": "nbd",
                "node-name": self.node,
                "server": {"type": "unix", "path": self.socket},
                "export": self.export,
                "reconnect-delay": self.reconnect_delay,
            },
        )
        try:
            await self._mirror(self.disk.node, self.node)
        except BaseException:
            await self._drop_node(self.node)
            raise
        self.attached = True
        log.info(
            "attach %s: %s (%s %s) now runs on blocktrace export %s (switch %.1f ms)",
            self.disk.spec,
            self.disk.node,
            self.disk.driver,
            self.disk.filename,
            self.export,
            self.switch_seconds[-1] * 1000,
        )

    async def detach(self) -> None:
        """Move the disk back onto its own image (every attached write included)."""
        if not self.attached:
            return
        target = self.disk.node
        created = False
        if await self.monitor.node(target) is None:
            target = await self._reopen_original()
            created = True
        try:
            await self._mirror(self.node, target)
        except BaseException:
            if created:
                await self._drop_node(target)
            raise
        self.attached = False
        await self._drop_node(self.node)
        log.info(
            "detach %s: back on %s (switch %.1f ms)",
            self.disk.spec,
            target,
            self.switch_seconds[-1] * 1000,
        )

    async def _mirror(self, source: str, target: str) -> None:
        job = self.job_id
        await self.monitor.execute(
            "blockdev-mirror",
            {
                "job-id": job,
                "device": source,
                "target": target,
                "sync": "full",
                "copy-mode": "write-blocking",
                "auto-dismiss": True,
            },
        )
        try:
            await self.monitor.wait_job_ready(job)
            t0 = time.perf_counter()
            await self.monitor.execute("block-job-complete", {"device": job})
            await self.monitor.wait_job_gone(job)
            self.switch_seconds.append(time.perf_counter() - t0)
        except BaseException:
            if await self._job_exists(job):
                await self._cancel(job)
            raise
        now = await self.monitor.root_of(self.disk, (source, target))
        if now != target:
            raise AttachError(
                f"device {self.disk.spec!r}: mirror ended but the device runs on {now!r}, "
                f"not {target!r}"
            )

    async def _job_exists(self, job: str) -> bool:
        try:
            return await self.monitor.job(job) is not None
        except AttachError:
            return False

    async def _cancel(self, job: str) -> None:
        try:
            await self.monitor.execute("block-job-cancel", {"device": job, "force": True})
            await self.monitor.wait_job_gone(job)
        except AttachError as exc:
            log.error("cancel %s: %s", job, exc)

    async def _drop_node(self, name: str) -> None:
        try:
            await self.monitor.execute("blockdev-del", {"node-name": name})
        except AttachError as exc:
            log.error("blockdev-del %s: %s", name, exc)

    async def _reopen_original(self) -> str:
        """QEMU deleted the original nodes at the pivot (they belonged to a ``-drive``):
        open the same image again, same driver, to mirror back into."""
        info: dict[str, Any] = self.disk.info
        filename = self.disk.filename
        if not filename or filename.startswith("json:") or ":" in filename.split("/")[0]:
            raise AttachError(
                f"device {self.disk.spec!r}: its original node is gone and {filename!r} "
                "cannot be re-opened; the VM stays on blocktrace"
            )
        name = f"{self.node}-orig"
        await self.monitor.execute(
            "blockdev-add",
            {
                "driver": info.get("drv", "raw"),
                "node-name": name,
                "file": {"driver": "file", "filename": filename},
                "discard": "unmap",
            },
        )
        return name
