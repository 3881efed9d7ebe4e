"""The *filter* mechanism: QEMU's own ``blklogwrites`` inserted under a running disk.

Recipe A of the reference notes (live-attach.md), checked on QEMU 7.2:

1. ``stop`` the VM (QEMU drains every request), copy the disk's raw file into the shadow
   image: the base, exactly the disk at the first entry;
2. ``blockdev-add`` an ``nbd`` node on blocktrace's log-sink export (:mod:`.sink`) and a
   ``blklogwrites`` node over the disk's protocol node with that log;
3. ``blockdev-reopen`` the format node onto the ``blklogwrites`` node, restating the options
   QEMU reports for it (reopen resets the ones left out);
4. ``cont``.  The pause (stop to cont) is measured and logged.

Detach reopens the format node back onto its protocol node and deletes the two nodes.  No
copy of the disk goes back: the VM never left its image.

Refused: any format but ``raw`` without ``offset``/``size`` (blklogwrites sits below the
format node, so with qcow2 its entries are in qcow2-file offsets: a trace in the wrong
coordinates; use the pivot), and a protocol node other than a local file (the base copy
reads the file).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

from blocktrace.attach.monitor import AttachError, Disk, Monitor

log = logging.getLogger("blocktrace.attach")

FILTER_COMMANDS = ("blockdev-add", "blockdev-del", "blockdev-reopen", "stop", "cont")


@dataclass
class Filter:
    """One disk with QEMU's blklogwrites logging into blocktrace."""

    monitor: Monitor
    disk: Disk
    socket: str
    #: the log-sink export QEMU's log child connects to
    sink_export: str
    #: the shadow image (new, empty, the disk's size) the base is copied into
    shadow: str
    sector_size: int = 512
    #: seconds QEMU's log node holds log writes (and so the guest's writes) when blocktrace
    #: dies, waiting for a restart (recover.py) before they fail
    reconnect_delay: int = 10
    pause_seconds: list[float] = field(default_factory=list)
    attached: bool = False
    _proto: str = ""

    @property
    def log_node(self) -> str:
        return f"blocktrace-log-{self.sink_export}"

    @property
    def filter_node(self) -> str:
        return f"blocktrace-blw-{self.sink_export}"

    async def check(self) -> None:
        """Refuse what this mechanism cannot trace in guest coordinates (nothing changes)."""
        if self.disk.driver != "raw":
            raise AttachError(
                f"device {self.disk.spec!r}: a {self.disk.driver} disk; blklogwrites below it "
                "would log file offsets, not guest offsets: use --mechanism pivot"
            )
        await self.monitor.require(FILTER_COMMANDS)
        graph = await self.monitor.execute("x-debug-query-block-graph")
        ids = {n["id"]: n for n in graph["nodes"]}
        fmt = [n for n in graph["nodes"] if n.get("name") == self.disk.node]
        files = [e for e in graph["edges"] if fmt and e["parent"] == fmt[0]["id"]]
        if len(files) != 1 or files[0]["name"] != "file":
            raise AttachError(f"device {self.disk.spec!r}: raw node without one file child")
        self._proto = ids[files[0]["child"]]["name"]
        proto = await self.monitor.node(self._proto)
        if proto is None or proto.get("drv") != "file":
            raise AttachError(f"device {self.disk.spec!r}: not on a local file; use pivot")
        size = int(proto["image"]["virtual-size"])
        if size != self.disk.size:
            raise AttachError(
                f"device {self.disk.spec!r}: raw node with offset/size options; use pivot"
            )

    async def attach(self) -> None:
        status = await self.monitor.execute("query-status")
        running = bool(status.get("running"))
        t0 = time.perf_counter()
        if running:
            await self.monitor.execute("stop")
        added: list[str] = []
        try:
            await asyncio.to_thread(_copy_file, self.disk.filename, self.shadow, self.disk.size)
            await self.monitor.execute(
                "blockdev-add",
                {
                    "driver": "nbd",
                    "node-name": self.log_node,
                    "server": {"type": "unix", "path": self.socket},
                    "export": self.sink_export,
                    "reconnect-delay": self.reconnect_delay,
                },
            )
            added.append(self.log_node)
            await self.monitor.execute(
                "blockdev-add",
                {
                    "driver": "blklogwrites",
                    "node-name": self.filter_node,
                    "file": self._proto,
                    "log": self.log_node,
                    "log-sector-size": self.sector_size,
                    "discard": "unmap",
                },
            )
            added.append(self.filter_node)
            await self._reopen(self.filter_node)
        except BaseException:
            for node in reversed(added):
                try:
                    await self.monitor.execute("blockdev-del", {"node-name": node})
                except AttachError as exc:
                    log.error("blockdev-del %s: %s", node, exc)
            raise
        finally:
            if running:
                await self.monitor.execute("cont")
                self.pause_seconds.append(time.perf_counter() - t0)
        self.attached = True
        log.info(
            "attach %s: blklogwrites under %s logs to blocktrace (guest paused %.1f ms)",
            self.disk.spec,
            self.disk.node,
            (self.pause_seconds or [0.0])[-1] * 1000,
        )

    async def detach(self) -> None:
        if not self.attached:
            return
        await self._reopen(self._proto)
        self.attached = False
        for node in (self.filter_node, self.log_node):
            await self.monitor.execute("blockdev-del", {"node-name": node})
        log.info("detach %s: blklogwrites removed", self.disk.spec)

    async def _reopen(self, file: str) -> None:
        info: dict[str, Any] = self.disk.info
        cache = info.get("cache", {})
        options: dict[str, Any] = {
            "driver": "raw",
            "node-name": self.disk.node,
            "file": file,
            "read-only": bool(info.get("ro", False)),
            "detect-zeroes": info.get("detect_zeroes", "off"),
            "cache": {
                "direct": bool(cache.get("direct", False)),
                "no-flush": bool(cache.get("no-flush", False)),
            },
        }
        await self.monitor.execute("blockdev-reopen", {"options": [options]})


def _copy_file(src: str, dst: str, size: int) -> None:
    """Copy ``size`` bytes of ``src`` into the existing ``dst``, keeping holes holes."""
    fin = os.open(src, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        fout = os.open(dst, os.O_WRONLY | os.O_NOFOLLOW)
        try:
            pos = 0
            while pos < size:
                try:
                    data = os.lseek(fin, pos, os.SEEK_DATA)
                except OSError:  # ENXIO: only a hole is left
                    break
                try:
                    hole = min(os.lseek(fin, data, os.SEEK_HOLE), size)
                except OSError:
                    hole = size
                off = data
                while off < hole:
                    n = os.copy_file_range(fin, fout, hole - off, off, off)
                    if n <= 0:
                        raise AttachError(f"{src}: short copy at {off}")
                    off += n
                pos = hole
            os.fsync(fout)
        finally:
            os.close(fout)
    finally:
        os.close(fin)
