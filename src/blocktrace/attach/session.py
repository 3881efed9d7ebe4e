"""One ``blocktrace attach`` run: disks of one running QEMU, their exports, traces, mechanisms.

Plugged into :class:`~blocktrace.service.Service` with hooks, so everything ``serve`` has
(NBD listeners, the QMP control socket, clean stop on SIGINT/SIGTERM) works unchanged:

* :meth:`AttachSession.prepare` (before the service exists): connect to QEMU's QMP, resolve
  every device, check the commands, create each export's image (a new file the operator
  named, never an existing one) at the guest-visible size;
* started hook (listening, so QEMU can connect): attach each disk with its mechanism (the
  pivot onto its export, :mod:`.pivot`, or QEMU's blklogwrites logging into a sink export
  that updates a shadow export, :mod:`.filter` and :mod:`.sink`), then start its traces;
* a watcher per disk: when a trace of the disk ends (``trace stop``, ``block-job-cancel``,
  a target failure with ``on-target-error=break``) the disk is detached; when QEMU goes away
  the traces are stopped (keeping what they received); when no disk is left the service
  stops;
* stopping hook (SIGINT/SIGTERM, QMP ``quit``, ``blocktrace detach``): detach every disk
  still attached, *then* stop its traces, so a trace ends when the VM left blocktrace.

Why traces start after the pivot and default to ``sync=full``: the export's image holds the
guest disk only once the mirror converged, and nobody but blocktrace holds it then; a
``sync=full`` trace carries its own base (the log alone rebuilds the disk from zeroes, a
replica is copied), atomically with the stream (the trace filter's gate), with no guest
pause.  ``introspect`` reads its base from the export at that same instant.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, Protocol

from blocktrace.attach.filter import Filter
from blocktrace.attach.monitor import AttachError, Disk, Monitor
from blocktrace.attach.pivot import Pivot
from blocktrace.attach.recover import (
    StaleFilter,
    drain_export,
    find_stale_filter,
    remove_stale_filter,
)
from blocktrace.attach.sink import LogSinkDevice
from blocktrace.errors import UsageError
from blocktrace.exports import Export
from blocktrace.trace.manager import Trace
from blocktrace.trace.options import TraceOptions, TraceSpec, parse_trace_spec

if TYPE_CHECKING:
    from blocktrace.service import Service

log = logging.getLogger("blocktrace.attach")

_EXPORT_NAME = re.compile(r"[^A-Za-z0-9_.-]")


Mechanism = Literal["pivot", "filter"]


class AttachMechanism(Protocol):
    """How a disk's writes reach blocktrace: :class:`~.pivot.Pivot` or :class:`~.filter.Filter`."""

    attached: bool

    async def check(self) -> None: ...

    async def attach(self) -> None: ...

    async def detach(self) -> None: ...


@dataclass
class Attached:
    """One disk of the VM and what blocktrace does with it."""

    disk: Disk
    export: str
    image: str
    mech: AttachMechanism
    #: filter: the log-sink export QEMU's blklogwrites writes to
    sink: str = ""
    #: filter: the shadow export (not served over NBD; traces attach to it)
    shadow: Export | None = None
    #: filter --resume: what a killed attach left (removed before the fresh attach), and
    #: the new sink export, served once the stale log node is gone
    stale: StaleFilter | None = None
    new_sink: Export | None = None
    specs: list[TraceSpec] = field(default_factory=list)
    traces: list[Trace] = field(default_factory=list)
    watcher: asyncio.Task[None] | None = None
    done: bool = False


def parse_disk_arg(arg: str) -> tuple[str, str]:
    """``DEVICE=IMAGE``: the device to attach and the new raw image its export lives in."""
    device, sep, image = arg.rpartition("=")
    if not sep or not device or not image:
        raise UsageError(f"{arg!r}: expected DEVICE=IMAGE")
    return device, image


class AttachSession:
    """The disks one ``blocktrace attach`` moved onto blocktrace."""

    def __init__(
        self,
        qemu_socket: str,
        disks: Sequence[tuple[str, str]],
        traces: Sequence[str],
        *,
        nbd_socket: str,
        reconnect_delay: int = 10,
        resume: bool = False,
        mechanism: Mechanism = "pivot",
    ) -> None:
        if not disks:
            raise UsageError("attach: give at least one DEVICE=IMAGE")
        self.monitor = Monitor(qemu_socket)
        self.requests = list(disks)
        self.trace_texts = list(traces)
        self.nbd_socket = os.path.abspath(nbd_socket)
        self.reconnect_delay = reconnect_delay
        #: a previous attach process died.  pivot: the disks still run on its exports; serve
        #: their images again, start new traces, detach as usual.  filter: remove the stale
        #: blklogwrites first (recover.py), then attach afresh: a new shadow, a new trace
        self.resume = resume
        self.mechanism = mechanism
        #: QEMU went away while attached (the traces were stopped, their data kept)
        self.qemu_lost = False
        #: a log sink failed (filter): the attach process exits non-zero
        self.failed = False
        self._tasks: set[asyncio.Task[None]] = set()
        self.disks: list[Attached] = []
        self._service: Service | None = None
        self._stopping = False
        self._qemu_watch: asyncio.Task[None] | None = None

    @property
    def images(self) -> list[tuple[str, str]]:
        """(export name, image) pairs for :class:`~blocktrace.service.ServiceConfig`."""
        return [(a.export, a.image) for a in self.disks]

    async def prepare(self) -> None:
        """Resolve everything and create the images; nothing in QEMU changes yet."""
        await self.monitor.connect()
        created: list[str] = []
        try:
            await self._prepare(created)
        except BaseException:
            for path in created:
                with contextlib.suppress(OSError):
                    os.unlink(path)
            await self.monitor.close()
            raise

    async def _prepare(self, created: list[str]) -> None:
        seen: set[str] = set()
        for device, image in self.requests:
            disk = await self.monitor.resolve(device)
            stale = None
            if self.resume and self.mechanism == "filter":
                stale = await self._stale_filter(disk)
            elif self.resume:
                disk = await self._resumed(disk, image)
            if disk.node in seen:
                raise AttachError(f"device {device!r}: given twice")
            seen.add(disk.node)
            export = _EXPORT_NAME.sub("_", disk.label) or "disk"
            if any(a.export == export for a in self.disks):
                raise AttachError(f"device {device!r}: export name {export!r} used twice")
            mech: AttachMechanism
            sink = ""
            if self.mechanism == "filter":
                sink = f"{export}-log"
                mech = Filter(
                    self.monitor,
                    disk,
                    self.nbd_socket,
                    sink,
                    os.path.abspath(image),
                    reconnect_delay=self.reconnect_delay,
                )
            else:
                mech = Pivot(
                    self.monitor,
                    disk,
                    socket=self.nbd_socket,
                    export=export,
                    reconnect_delay=self.reconnect_delay,
                )
            mech.attached = self.resume and stale is None
            self.disks.append(Attached(disk, export, image, mech, sink=sink, stale=stale))
        self._bind_traces()
        for a in self.disks:
            if a.stale is None:  # else checked once the stale filter is gone
                await a.mech.check()
        if self.resume and self.mechanism == "pivot":
            return
        for a in self.disks:
            _create_image(a.image, a.disk.size)
            created.append(a.image)

    async def _stale_filter(self, disk: Disk) -> StaleFilter:
        """The filter a killed attach left under ``disk``, reachable through our socket."""
        stale = await find_stale_filter(self.monitor, disk)
        if stale.socket != self.nbd_socket:
            raise AttachError(
                f"device {disk.spec!r}: its stale log node connects to {stale.socket}: "
                f"give --socket {stale.socket}"
            )
        return stale

    async def _resumed(self, running: Disk, image: str) -> Disk:
        """The disk as it was before an earlier attach moved it onto ``running.node``."""
        export = _EXPORT_NAME.sub("_", running.label) or "disk"
        if running.node != f"blocktrace-{export}" or running.driver != "nbd":
            raise AttachError(f"device {running.spec!r}: not attached (runs on {running.node!r})")
        try:
            st = os.stat(image, follow_symlinks=False)
        except OSError as exc:
            raise AttachError(f"{image}: {exc.strerror}") from None
        if st.st_size != running.size:
            raise AttachError(f"{image}: {st.st_size} bytes, the disk has {running.size}")
        candidates = [
            n
            for n in await self.monitor.unparented()
            if n["node-name"] != running.node and n["image"]["virtual-size"] == running.size
        ]
        if len(candidates) != 1:
            found = ", ".join(n["node-name"] for n in candidates) or "none"
            raise AttachError(
                f"device {running.spec!r}: cannot tell its original node (candidates: {found}); "
                "keep it on blocktrace with `blocktrace serve`"
            )
        orig = candidates[0]
        return Monitor._disk(running.spec, running.label, orig)

    def _bind_traces(self) -> None:
        if not self.trace_texts:
            raise UsageError("attach: give at least one --trace")
        by_export = {a.export: a for a in self.disks}
        for text in self.trace_texts:
            spec = parse_trace_spec(text)
            export = spec.export
            if not export:
                if len(self.disks) != 1:
                    raise UsageError(f"--trace {text!r}: name the export (EXPORT=...)")
                export = self.disks[0].export
            if export not in by_export:
                raise UsageError(
                    f"--trace {text!r}: no attached disk exported as {export!r} "
                    f"(exports: {', '.join(by_export)})"
                )
            kind = spec.target.get("type")
            explicit_sync = re.search(r"(^|,)sync=", text.partition(":")[2]) is not None
            options = spec.options
            if kind != "introspect" and options.sync.value == "none":
                if explicit_sync:
                    raise UsageError(
                        f"--trace {text!r}: attach needs sync=full for {kind} targets (the "
                        "disk's content at the switch exists only inside blocktrace)"
                    )
                options = TraceOptions.from_dict({**options.to_dict(), "sync": "full"})
            by_export[export].specs.append(
                dataclasses.replace(spec, export=export, options=options)
            )

    def install(self, service: Service) -> None:
        self._service = service
        if self.mechanism == "filter":
            service.startup_hooks.append(self._add_sinks)
        service.started_hooks.append(self._start)
        service.stopping_hooks.append(self._stop)

    # -- hooks -----------------------------------------------------------------------------

    async def _add_sinks(self, service: Service) -> None:
        """Filter: the shadow leaves the NBD namespace (only the sink may change it); the
        sink export QEMU's log child connects to takes its place."""
        for a in self.disks:
            a.shadow = service.registry.remove(a.export)
            sink = LogSinkDevice(a.shadow.device, on_error=functools.partial(self._sink_failed, a))
            if isinstance(a.mech, Filter):
                a.mech.sink = sink  # the base copy runs into the sink's shadow
            if a.stale is None:
                service.registry.add(Export(a.sink, sink))
            else:
                service.registry.add(drain_export(a.stale))
                a.new_sink = Export(a.sink, sink)

    async def _recover(self, service: Service, a: Attached) -> None:
        """Filter --resume: remove what the killed attach left, then serve the new sink."""
        assert a.stale is not None and a.new_sink is not None
        drain = service.registry.get(a.stale.sink)
        assert drain is not None
        await remove_stale_filter(self.monitor, a.stale, drain)
        service.registry.remove(a.stale.sink)
        service.nbd.disconnect_export(a.stale.sink)
        service.registry.add(a.new_sink)
        a.new_sink = None
        log.info(
            "attach %s: removed the filter a killed attach left; the old trace ends there. "
            "Attaching again: a new trace on a new base",
            a.disk.spec,
        )
        # the disk as it is now (its file name no longer names the filter)
        a.disk = await self.monitor.resolve(a.disk.spec)
        assert isinstance(a.mech, Filter)
        a.mech.disk = a.disk
        await a.mech.check()

    def _sink_failed(self, a: Attached, exc: Exception) -> None:
        """The log QEMU wrote could not be decoded: end this disk's attachment now (the
        traces end at the last decoded operation; the filter is removed)."""
        log.error("attach %s: %s; detaching", a.export, exc)
        self.failed = True
        if not a.done and not self._stopping:
            task = asyncio.get_running_loop().create_task(self._detach_logged(a))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _detach_logged(self, a: Attached) -> None:
        try:
            await self._detach(a)
        except AttachError as exc:
            log.error("detach %s: %s", a.export, exc)
        self._stop_if_idle()

    async def _start(self, service: Service) -> None:
        try:
            used = {s.job_id for a in self.disks for s in a.specs if s.job_id}
            n = 0
            for a in self.disks:
                if a.mech.attached:
                    await self._reconnected(service, a)
                else:
                    if a.stale is not None:
                        await self._recover(service, a)
                    await a.mech.attach()
                for spec in a.specs:
                    job_id = spec.job_id
                    if not job_id:
                        while f"trace{n}" in used:
                            n += 1
                        job_id = f"trace{n}"
                    used.add(job_id)
                    where = a.shadow if a.shadow is not None else a.export
                    trace = await service.traces.start(job_id, where, spec.target, spec.options)
                    a.traces.append(trace)
                    log.info("trace %s: %s -> %s", job_id, a.export, trace.target.name)
        except BaseException:
            with contextlib.suppress(AttachError):
                await self._detach_all()
            await self._close_shadows()
            await self.monitor.close()
            raise
        for a in self.disks:
            a.watcher = asyncio.create_task(self._watch(a))
        self._qemu_watch = asyncio.create_task(self._watch_qemu())

    async def _reconnected(self, service: Service, a: Attached, timeout: float = 120) -> None:
        """Wait for QEMU's nbd node to reconnect to a resumed export.

        QEMU's nbd client retries in a background thread (backoff up to 16 s) once a request
        failed; a request arriving before it connected fails at once.  A read through the
        human monitor's ``qemu-io`` kicks it when nothing else does (qemu-system only)."""
        export = service.registry.get(a.export)
        assert export is not None and isinstance(a.mech, Pivot)  # resume is pivot-only
        node = a.mech.node
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while export.connections == 0:
            if loop.time() > deadline:
                raise AttachError(f"device {a.disk.spec!r}: QEMU did not reconnect to {a.export}")
            with contextlib.suppress(AttachError):
                await self.monitor.execute(
                    "human-monitor-command",
                    {"command-line": f'qemu-io {node} "read 0 512"'},
                )
            await asyncio.sleep(1)

    async def _stop(self, service: Service) -> None:
        self._stopping = True
        await self._detach_all()
        await self._close_shadows()
        if self._qemu_watch is not None:
            self._qemu_watch.cancel()
        await self.monitor.close()

    async def _close_shadows(self) -> None:
        """The shadows are not in the registry (the service does not close them)."""
        for a in self.disks:
            if a.shadow is not None:
                shadow, a.shadow = a.shadow, None
                await shadow.device.flush()
                await shadow.device.close()

    # -- watchers --------------------------------------------------------------------------

    async def _watch(self, a: Attached) -> None:
        """Detach ``a`` when one of its traces ends on its own (stop, cancel, failure)."""
        waits = [asyncio.create_task(t.wait_concluded()) for t in a.traces]
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()
        if self._stopping or a.done:
            return
        log.info("attach %s: a trace ended; detaching", a.export)
        try:
            await self._detach(a)
        except AttachError as exc:
            log.error("detach %s: %s", a.export, exc)
        self._stop_if_idle()

    async def _watch_qemu(self) -> None:
        await self.monitor.wait_disconnected()
        if self._stopping:
            return
        log.error("attach: QEMU's QMP connection was lost (QEMU exited?); stopping the traces")
        self.qemu_lost = True
        for a in self.disks:
            a.done = True
            a.mech.attached = False
            for t in a.traces:
                if not t.concluded:
                    await t.stop()
        self._stop_if_idle()

    def _stop_if_idle(self) -> None:
        if self._service is not None and all(a.done for a in self.disks):
            self._service.request_stop()

    # -- detach ----------------------------------------------------------------------------

    async def _detach_all(self) -> None:
        errors: list[str] = []
        for a in self.disks:
            try:
                await self._detach(a)
            except AttachError as exc:
                errors.append(str(exc))
                log.error("detach %s: %s", a.export, exc)
        if errors and not self._stopping:
            raise AttachError(errors[0])

    async def _detach(self, a: Attached) -> None:
        if a.done:
            return
        a.done = True
        try:
            if self.monitor.connected:
                await a.mech.detach()
        finally:
            for t in a.traces:
                if not t.concluded:
                    await t.stop()


def _create_image(path: str, size: int) -> None:
    """A new sparse raw image; an existing path (or a symlink) is refused, never replaced."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        raise AttachError(
            f"{path}: exists; attach writes a new image and overwrites none"
        ) from None
    except OSError as exc:
        raise AttachError(f"{path}: {exc.strerror}") from None
    try:
        os.ftruncate(fd, size)
    finally:
        os.close(fd)
