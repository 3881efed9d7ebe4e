"""A running QEMU's QMP monitor, as ``blocktrace attach`` needs it.

A thin asyncio adapter over the ``qemu.qmp`` library (QEMU's own QMP client): connect,
execute, and the few questions attach asks: which block node a device name means
(:meth:`Monitor.resolve`), whether this QEMU has the commands a mechanism needs
(:meth:`Monitor.require`), and where a block job is (:meth:`Monitor.job`).  Every failure
becomes an :class:`AttachError` with one line saying what and where, so the CLI prints it
once; ``qemu.qmp``'s exception types never leave this module.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import stat
from dataclasses import dataclass
from typing import Any

from blocktrace.errors import BlocktraceError


class AttachError(BlocktraceError):
    """Attach or detach could not be done; the message is the one line the operator sees."""


@dataclass(frozen=True)
class Disk:
    """One guest disk as QEMU describes it (``query-block`` / ``query-named-block-nodes``)."""

    #: what the operator asked for (device id, qdev path or node name)
    spec: str
    #: the device's root node: the node the device (or export) reads and writes
    node: str
    #: qdev id (``-device ...,id=``), drive name, or the node name for qemu-storage-daemon
    label: str
    #: guest-visible size in bytes
    size: int
    #: the root node's driver (``raw``, ``qcow2``...)
    driver: str
    #: the root node's image file name as QEMU reports it
    filename: str
    #: the root node as ``query-named-block-nodes`` lists it, for restoring it on detach
    info: dict[str, Any]


def _qdev_id(qdev: str) -> str:
    """``/machine/peripheral/disk0/virtio-backend`` -> ``disk0``; a plain id stays."""
    parts = [p for p in qdev.split("/") if p]
    if len(parts) >= 3 and parts[0] == "machine" and parts[1] == "peripheral":
        return parts[2]
    return qdev


class Monitor:
    """One QMP connection to QEMU (``qemu-system-*`` or ``qemu-storage-daemon``)."""

    def __init__(self, path: str, *, name: str = "blocktrace-attach") -> None:
        self.path = path
        self._name = name
        self._client: Any = None

    async def connect(self) -> None:
        from qemu.qmp import QMPClient

        try:
            st = os.stat(self.path)
        except OSError as exc:
            raise AttachError(f"{self.path}: QMP socket: {exc.strerror}") from None
        if not stat.S_ISSOCK(st.st_mode):
            raise AttachError(f"{self.path}: not a socket")
        client = QMPClient(self._name)
        try:
            await asyncio.wait_for(client.connect(self.path), 30)
        except Exception as exc:
            raise AttachError(f"{self.path}: cannot connect to QEMU's QMP: {exc}") from None
        self._client = client

    async def close(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            # QEMU may be gone already: nothing is left to close then.
            with contextlib.suppress(Exception):
                await client.disconnect()

    @property
    def connected(self) -> bool:
        from qemu.qmp import Runstate

        return self._client is not None and self._client.runstate == Runstate.RUNNING

    async def wait_disconnected(self) -> None:
        """Return when the connection to QEMU is lost (QEMU exited or was killed)."""
        from qemu.qmp import Runstate

        client = self._client
        if client is None:
            return
        while client.runstate == Runstate.RUNNING:
            await client.runstate_changed()

    async def execute(self, cmd: str, args: dict[str, Any] | None = None) -> Any:
        from qemu.qmp import ExecuteError

        if self._client is None:
            raise AttachError(f"{self.path}: not connected to QEMU")
        try:
            return await self._client.execute(cmd, args or {})
        except ExecuteError as exc:
            raise AttachError(f"QEMU {cmd}: {exc}") from None
        except Exception as exc:
            raise AttachError(f"QEMU {cmd}: {self.path}: connection lost ({exc})") from None

    async def require(self, commands: tuple[str, ...]) -> None:
        """One-line error when this QEMU lacks a command a mechanism needs."""
        have = {c["name"] for c in await self.execute("query-commands")}
        missing = [c for c in commands if c not in have]
        if missing:
            raise AttachError(f"{self.path}: this QEMU has no {', '.join(missing)}")

    async def nodes(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = await self.execute("query-named-block-nodes", {"flat": True})
        return result

    async def node(self, name: str) -> dict[str, Any] | None:
        for n in await self.nodes():
            if n.get("node-name") == name:
                return n
        return None

    async def resolve(self, spec: str) -> Disk:
        """The disk a device id, qdev path, drive name or node name means."""
        for blk in await self.execute("query-block"):
            inserted = blk.get("inserted")
            qdev = blk.get("qdev", "")
            names = {blk.get("device", ""), qdev, _qdev_id(qdev)}
            if inserted is not None:
                names.add(inserted.get("node-name", ""))
            names.discard("")
            if spec not in names:
                continue
            if inserted is None:
                raise AttachError(f"device {spec!r}: no medium inserted")
            label = _qdev_id(qdev) if qdev else (blk.get("device") or inserted["node-name"])
            return self._disk(spec, label, inserted)
        for n in await self.nodes():
            if n.get("node-name") == spec:
                return self._disk(spec, spec, n)
        raise AttachError(f"{self.path}: no device or block node named {spec!r}")

    @staticmethod
    def _disk(spec: str, label: str, node: dict[str, Any]) -> Disk:
        if node.get("ro"):
            raise AttachError(f"device {spec!r}: read-only; nothing to trace")
        return Disk(
            spec=spec,
            node=node["node-name"],
            label=label,
            size=int(node["image"]["virtual-size"]),
            driver=node.get("drv", ""),
            filename=node.get("file", ""),
            info=node,
        )

    async def unparented(self) -> list[dict[str, Any]]:
        """Block nodes nothing uses (no parent node, no device or export): after a pivot the
        disk's original node, kept alive by its ``-blockdev``/``blockdev-add`` reference."""
        graph = await self.execute("x-debug-query-block-graph")
        children = {e["child"] for e in graph["edges"]}
        names = {
            n["name"]
            for n in graph["nodes"]
            if n["type"] == "block-driver" and n["id"] not in children
        }
        return [n for n in await self.nodes() if n.get("node-name") in names]

    async def job(self, job_id: str) -> dict[str, Any] | None:
        for j in await self.execute("query-block-jobs"):
            if j.get("device") == job_id:
                return dict(j)
        return None

    async def wait_job_ready(self, job_id: str, *, poll: float = 0.05) -> None:
        """Wait until the mirror ``job_id`` is ready (source and target converged)."""
        while True:
            job = await self.job(job_id)
            if job is None:
                raise AttachError(f"QEMU block job {job_id!r} ended before it was ready")
            if job.get("io-status", "ok") != "ok":
                raise AttachError(f"QEMU block job {job_id!r}: I/O {job['io-status']}")
            if job.get("ready"):
                return
            await asyncio.sleep(poll)

    async def wait_job_gone(self, job_id: str, *, poll: float = 0.02) -> None:
        while await self.job(job_id) is not None:
            await asyncio.sleep(poll)

    async def root_of(self, disk: Disk, candidates: tuple[str, ...]) -> str | None:
        """Which of ``candidates`` the device (or, on qemu-storage-daemon, the export's
        anonymous block backend) uses now: it changes when a mirror completes."""
        for blk in await self.execute("query-block"):
            qdev = blk.get("qdev", "")
            inserted = blk.get("inserted")
            if inserted is None:
                continue
            if disk.label in (_qdev_id(qdev), blk.get("device")) and disk.label:
                name = str(inserted["node-name"])
                return name if name in candidates else None
        graph = await self.execute("x-debug-query-block-graph")
        by_id = {n["id"]: n for n in graph["nodes"]}
        used = [
            by_id[e["child"]]["name"]
            for e in graph["edges"]
            if by_id[e["parent"]]["type"] == "block-backend"
            and by_id[e["child"]]["name"] in candidates
        ]
        return used[0] if len(used) == 1 else None
