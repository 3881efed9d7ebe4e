"""The *filter* mechanism: QEMU's own ``blklogwrites`` inserted under a running disk.

Recipe A of the reference notes (live-attach.md), checked on QEMU 7.2, with no ``stop``:

1. ``blockdev-add`` an ``nbd`` node on blocktrace's log-sink export (:mod:`.sink`) and a
   ``blklogwrites`` node over the disk's protocol node with that log;
2. ``blockdev-reopen`` the format node onto the ``blklogwrites`` node, restating the options
   QEMU reports for it (reopen resets the ones left out).  QEMU drains the node for the
   reopen: every write completed before it is in the file, every write after it is logged.
   That drain is the only guest pause (logged, with the two ``blockdev-add``: ``guest paused
   N ms``), and it does not grow with the disk;
3. copy the file into the shadow with the VM running, the sink applying entries to the same
   shadow (:mod:`.basecopy`: a granule gets the file's bytes at most once, before any
   entry);
4. drain once more (a no-op ``blockdev-reopen``): every entry of a write the copy could have
   read is applied when it returns, so the shadow is the disk as of its last applied entry
   and the traces can start (the session starts them after :meth:`Filter.attach`).

Detach reopens the format node back onto its protocol node and deletes the two nodes.  No
copy of the disk goes back: the VM never left its image.

Refused: any format but ``raw`` without ``offset``/``size`` (blklogwrites sits below the
format node, so with qcow2 its entries are in qcow2-file offsets: a trace in the wrong
coordinates; use the pivot), and a protocol node other than a local file (the base copy
reads the file).  No ``stop``/``cont`` is used, so ``qemu-storage-daemon`` works too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

from blocktrace.attach.basecopy import BaseCopy, CopyStats, RawFileSource
from blocktrace.attach.monitor import AttachError, Disk, Monitor
from blocktrace.attach.sink import LogSinkDevice
from blocktrace.block.device import BlockDevice
from blocktrace.errors import BlocktraceError
from blocktrace.trace.filter import TraceFilter

log = logging.getLogger("blocktrace.attach")

FILTER_COMMANDS = ("blockdev-add", "blockdev-del", "blockdev-reopen")


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
    #: the log-sink device of ``sink_export`` (set by the session before :meth:`attach`):
    #: its shadow is what the base is copied into
    sink: LogSinkDevice | None = None
    #: seconds QEMU's log node holds log writes (and so the guest's writes) when blocktrace
    #: dies, waiting for a restart (recover.py) before they fail
    reconnect_delay: int = 10
    #: each guest pause (QEMU's drains): insertion, settle after the copy, removal
    pause_seconds: list[float] = field(default_factory=list)
    copy: CopyStats | None = None
    attached: bool = False
    _base: BaseCopy | None = None
    #: a detach has begun (a sink failure may start one while :meth:`attach` copies)
    _detaching: bool = False
    #: one detach at a time; a second waits for the first (then finds nothing to do)
    _detach_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
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
        """Insert the filter, copy the base with the VM running, settle (module doc)."""
        if self.sink is None:
            raise AttachError(f"device {self.disk.spec!r}: no log sink to attach to")
        await self._presync()
        t0 = time.perf_counter()
        reopen = await self._insert()
        self.pause_seconds.append(time.perf_counter() - t0)
        self.attached = True
        log.info(
            "attach %s: blklogwrites under %s logs to blocktrace (guest paused %.1f ms: "
            "blockdev-add x2, blockdev-reopen %.1f ms)",
            self.disk.spec,
            self.disk.node,
            self.pause_seconds[-1] * 1000,
            reopen * 1000,
        )
        try:
            await self._copy_base(self.sink)
        except BaseException:
            with contextlib.suppress(AttachError):
                await self.detach()
            raise

    async def _insert(self) -> float:
        """Steps 1-2; returns the reopen's time (the drain: the moment guest I/O waits)."""
        added: list[str] = []
        try:
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
            t0 = time.perf_counter()
            await self._reopen(self.filter_node)
            return time.perf_counter() - t0
        except BaseException:
            for node in reversed(added):
                try:
                    await self.monitor.execute("blockdev-del", {"node-name": node})
                except AttachError as exc:
                    log.error("blockdev-del %s: %s", node, exc)
            raise

    async def _copy_base(self, sink: LogSinkDevice) -> None:
        """Step 3 and 4: the base copy while the sink applies entries, then the settle."""
        try:
            source = RawFileSource(self.disk.filename, self.disk.size)
        except OSError as exc:
            raise AttachError(f"{self.disk.filename}: {exc.strerror}") from None
        try:
            base = BaseCopy(source, _image_under(sink.shadow))
            sink.base = self._base = base
            try:
                await base.run()
            except OSError as exc:
                raise AttachError(f"{self.disk.filename}: base copy: {exc.strerror}") from None
            finally:
                sink.base = self._base = None
        finally:
            source.close()
        self.copy = base.stats
        self._check_attached(sink)
        await self._presync(sink)
        self._check_attached(sink)
        t0 = time.perf_counter()
        await self._reopen(self.filter_node)  # a drain: every entry the copy saw is applied
        self.pause_seconds.append(time.perf_counter() - t0)
        self._check_attached(sink)
        st = base.stats
        log.info(
            "attach %s: base copied in %.2f s (%.1f MiB read, %.1f MiB written, %.1f MiB "
            "skipped for newer entries, %d entries applied to a chunk while it was read, "
            "%d filled for an entry first); settled (guest paused %.1f ms: blockdev-reopen)",
            self.disk.spec,
            st.seconds,
            st.read / (1 << 20),
            st.written / (1 << 20),
            st.skipped / (1 << 20),
            st.raced,
            st.filled,
            self.pause_seconds[-1] * 1000,
        )

    def _check_attached(self, sink: LogSinkDevice) -> None:
        if self._detaching or not self.attached or sink.error is not None:
            raise AttachError(f"device {self.disk.spec!r}: detached during the base copy")

    async def detach(self) -> None:
        async with self._detach_lock:
            if not self.attached:
                return
            self._detaching = True
            try:
                await self._remove()
            finally:
                self._detaching = False

    async def _remove(self) -> None:
        if self._base is not None:
            self._base.cancelled = True  # detached while copying (a sink failure)
        await self._presync(self.sink)
        t0 = time.perf_counter()
        await self._reopen(self._proto)
        pause = time.perf_counter() - t0
        self.attached = False
        for node in (self.filter_node, self.log_node):
            await self.monitor.execute("blockdev-del", {"node-name": node})
        log.info(
            "detach %s: blklogwrites removed (guest paused %.1f ms: blockdev-reopen)",
            self.disk.spec,
            pause * 1000,
        )

    async def _presync(self, sink: LogSinkDevice | None = None) -> None:
        """Write out what the host holds dirty for the disk's file (and the shadow's) before
        a ``blockdev-reopen``: QEMU flushes the node inside the reopen's drain
        (``bdrv_reopen_multiple``), down to the file and, through blklogwrites, the sink's
        shadow, so whatever is dirty then is synced while guest I/O waits.  Synced here
        first, with the VM running, the reopen finds (almost) nothing left.  Best effort:
        a failure only makes the pause longer."""
        try:
            await asyncio.to_thread(_fdatasync, self.disk.filename)
            if sink is not None:
                # the raw file only: a flush of the trace filter would add a FLUSH record
                await _raw_image(sink.shadow).flush()
        except (OSError, BlocktraceError) as exc:
            log.warning("attach %s: sync before reopen: %s", self.disk.spec, exc)

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


def _fdatasync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        os.fdatasync(fd)
    finally:
        os.close(fd)


def _raw_image(shadow: BlockDevice) -> BlockDevice:
    """The raw image under the shadow's trace filter."""
    return shadow.child if isinstance(shadow, TraceFilter) else shadow


def _image_under(shadow: BlockDevice) -> BlockDevice:
    """The raw image under the shadow's trace filter: the base copy writes there directly
    (it runs before any trace attaches, and must write without suspending)."""
    if isinstance(shadow, TraceFilter) and shadow.sinks:
        raise AttachError("the shadow is traced already: the base copy comes first")
    return _raw_image(shadow)
