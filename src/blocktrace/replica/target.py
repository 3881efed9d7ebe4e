"""The replica engine: a trace target that keeps a second block device equal to the source.

Shared by ``targets/replica.py`` (a local raw image) and ``targets/nbd.py`` (any NBD
export); a subclass only says how to open the replica device and how to fingerprint it.

Design (DRBD's, ``peers.md`` section 3, in user space):

* **Streaming.**  The delivery worker hands records over in stream order; each batch is
  applied with non-overlapping writes in flight together and overlapping ones strictly in
  order, FLUSH as a replica flush after everything before it, FUA as a FUA write.  So in
  ``write-blocking`` mode a client's write is acknowledged once both copies hold it (FLUSH and
  FUA once both are durable: DRBD protocol C); in ``background`` mode the trace's bounded
  queue is the lag (protocol A, with backpressure instead of drops).
* **Dirty bitmap.**  Every region written since the replica's last flush is also marked in an
  *unflushed* bitmap; when the replica fails (disconnect, ENOSPC, EIO) that bitmap is merged
  into the persistent *dirty* bitmap, the target turns ``degraded`` and from then on records
  only set bits: clients never notice (unless ``on-disconnect=fail``).
* **Synchronisation** (initial full copy, resync of dirty regions, compare after an unclean
  stop) is one background worker that copies a chunk at a time *under the same lock as
  delivery*: it reads the source at some instant, and every write applied to the source
  after that instant is a record not yet delivered, so it lands on the replica after the
  copy.  A copied region and a write to it therefore never land in the wrong order, while
  new writes keep streaming between chunks.  Holes and zero extents are zeroed, not copied.
* **Reconnect** with exponential backoff (50 ms to ``reconnect-max``), then resync of only
  the dirty regions, then plain streaming again (``ready``).
* **Persistence** (:mod:`blocktrace.replica.meta`): generation ids decide at ``open`` whether
  to resume from the bitmap, compare, copy fully, or refuse (split brain).

States: ``synchronizing`` -> ``ready`` <-> ``degraded`` -> ``synchronizing`` -> ``ready``...
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import dataclasses
import hashlib
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from blocktrace.block.device import BlockDevice
from blocktrace.errors import BlocktraceError, TargetError, UsageError
from blocktrace.replica.bitmap import DEFAULT_GRANULARITY, DirtyBitmap
from blocktrace.replica.copy import CopyStats, SourceReadError, copy_region
from blocktrace.replica.meta import (
    SOURCE_SUFFIX,
    AttachMode,
    AttachPlan,
    Fingerprint,
    ReplicaMeta,
    SourceRecord,
    atomic_write,
    encode_meta,
    file_fingerprint,
    load_meta,
    new_generation,
    plan_attach,
    rotate_generation,
)
from blocktrace.replica.stream import StreamApplier
from blocktrace.stream.contract import StateListener, StateReporter, Target, TargetInfo
from blocktrace.stream.records import Record

log = logging.getLogger(__name__)

#: unit of background copying (one read + one write under the delivery lock)
SYNC_CHUNK = 1024 * 1024
BACKOFF_MIN = 0.05
#: metadata is rewritten at most this often while streaming (always on state changes)
SAVE_INTERVAL = 1.0

Listener = StateListener


class ReplicaTarget(StreamApplier, StateReporter, Target):
    """A trace target that applies the stream to a replica device (see module docstring)."""

    #: ``replica`` or ``nbd``: the QMP target type
    kind = "replica"
    synchronizes = True

    def __init__(
        self,
        name: str,
        key: str,
        *,
        meta_path: Path | None = None,
        force: bool = False,
        on_disconnect: str = "degrade",
        granularity: int = DEFAULT_GRANULARITY,
        reconnect_max: float = 5.0,
    ) -> None:
        if on_disconnect not in ("degrade", "fail"):
            raise UsageError(f"on-disconnect must be degrade|fail, not {on_disconnect!r}")
        self.name = name
        self.key = key
        self.meta_path = meta_path
        self.force = force
        self.on_disconnect = on_disconnect
        self.granularity = granularity
        self.reconnect_max = reconnect_max
        self.state = "connecting"
        self.size = 0
        self.device: BlockDevice | None = None
        self.source: BlockDevice | None = None
        self.source_path: str | None = None
        self.meta: ReplicaMeta | None = None
        self.plan_reason = ""
        self.sync_mode = AttachMode.NONE
        self.last_error: str | None = None
        self.reconnects = 0
        self.applied_seq = 0
        self.applied_records = 0
        self.missed_records = 0  # records that found the replica degraded
        self._copy_stats = CopyStats()
        self.synchronized = asyncio.Event()
        self._dirty = DirtyBitmap(0, granularity)
        self._unflushed = DirtyBitmap(0, granularity)
        self._compare = DirtyBitmap(0, granularity)
        self._unflushed_ops = 0
        self._lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._worker: asyncio.Task[None] | None = None
        self._closing = False
        self._fatal: BaseException | None = None
        self._last_save = 0.0
        self._save_task: asyncio.Task[None] | None = None
        self._listeners: list[Listener] = []
        self._source_record: SourceRecord | None = None

    # -- subclass hooks ---------------------------------------------------------------------

    @abc.abstractmethod
    async def open_device(self) -> BlockDevice:
        """Open (or reconnect to) the replica device; raise on failure."""

    def replica_fingerprint(self) -> Fingerprint | None:
        """Evidence that the replica was not written behind our back (local files only)."""
        return None

    def replica_exists(self) -> bool:
        """False if the replica is known to be gone (a local image deleted): copy it all."""
        return True

    def default_meta_path(self) -> Path | None:
        """Where the metadata lives when ``meta=`` is not given."""
        if self.source_path is None:
            return None
        digest = hashlib.sha1(self.key.encode()).hexdigest()[:12]
        return Path(f"{self.source_path}.{digest}.btreplica")

    # -- observation --------------------------------------------------------------------------

    def add_listener(self, listener: Listener) -> None:
        """``listener(target, state, details)`` on every state change (for QMP events)."""
        self._listeners.append(listener)

    def _set_state(self, state: str, **details: Any) -> None:
        if state == self.state:
            return
        log.info("%s: %s -> %s %s", self.name, self.state, state, details or "")
        self.state = state
        for listener in list(self._listeners):
            try:
                listener(self, state, details)
            except Exception:  # a listener must not break replication
                log.exception("replica state listener failed")

    @property
    def dirty_bytes(self) -> int:
        return self._dirty.dirty_bytes()

    @property
    def consistent(self) -> bool:
        """The replica equals the source as of ``applied_seq`` (no copy pending, connected)."""
        return self.state == "ready"

    def settings(self) -> dict[str, Any]:
        return {"type": self.kind, **super().settings()}

    def status(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "state": self.state,
            "consistent": self.consistent,
            "applied-seq": self.applied_seq,
            "applied-records": self.applied_records,
            "lag-records": self.missed_records if self.state != "ready" else 0,
            "lag-bytes": self._dirty.dirty_bytes() + self._compare.dirty_bytes(),
            "sync-mode": self.sync_mode.value,
            "sync-reason": self.plan_reason,
            "synced-bytes": self._copy_stats.copied,
            "compared-bytes": self._copy_stats.compared,
            "reconnects": self.reconnects,
            "generation": self.meta.generation if self.meta else None,
        }
        if self.meta_path is not None:
            out["meta"] = str(self.meta_path)
        if self.last_error:
            out["last-error"] = self.last_error
        return out

    async def wait_synchronized(self) -> None:
        """Return once the replica first became equal to the source (``ready``)."""
        await self.synchronized.wait()

    # -- Target interface -----------------------------------------------------------------------

    async def open(self, info: TargetInfo) -> None:
        source = info.device
        if source is None:
            raise TargetError(self.name, "replica targets need the source device to read from")
        self.source = source
        filename = info.filename
        self.source_path = filename or None
        sync = info.sync.value
        self.size = info.size
        if self.meta_path is None:
            self.meta_path = self.default_meta_path()
        src_rec_path = Path(filename + SOURCE_SUFFIX) if filename else None
        try:
            self._source_record = SourceRecord.load(src_rec_path)
            loaded = load_meta(self.meta_path) if self.meta_path else None
        except BlocktraceError as exc:
            raise TargetError(self.name, str(exc)) from exc
        meta, bitmap = loaded if loaded else (None, None)
        exists = self.replica_exists()
        plan = plan_attach(
            meta,
            bitmap,
            self._source_record,
            self.key,
            size=self.size,
            sync=sync,
            force=self.force,
            replica_fingerprint=self.replica_fingerprint(),
            source_fingerprint=file_fingerprint(filename) if filename else None,
        )
        try:
            self.device = await self.open_device()
        except UsageError:
            raise  # an operator error (a replica of itself), not an outage to wait out
        except (BlocktraceError, OSError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            if self.on_disconnect != "degrade" or loaded is None:
                raise TargetError(self.name, f"cannot open replica: {reason}") from exc
            # a known replica, gone for now (a source restart during an outage): serve the
            # source anyway, degraded; the worker connects when the replica is back
            log.warning("%s: replica unavailable (%s); starting degraded", self.name, reason)
            self.last_error = reason
        if self.device is not None:
            problem = ""
            if self.device.size < self.size:
                problem = f"replica is {self.device.size} bytes, source is {self.size}"
            elif self.device.read_only:
                problem = "replica is read-only"
            if problem:
                await self.device.close()
                raise TargetError(self.name, problem)
        if meta is not None and not exists and plan.mode is not AttachMode.FULL:
            plan = AttachPlan(AttachMode.FULL, "the replica image was missing: full copy")
        g = self.granularity
        if meta is None or meta.source_id != self._source_record.source_id or bitmap is None:
            meta = ReplicaMeta(
                source_id=self._source_record.source_id,
                generation=new_generation(),
                target=self.key,
                size=self.size,
                granularity=g,
            )
            bitmap = DirtyBitmap(self.size, g)
        elif meta.size != self.size:  # resized source: plan_attach chose a full copy
            bitmap = DirtyBitmap(self.size, g)
            meta.size, meta.granularity = self.size, g
        else:  # a known replica keeps the granularity its bitmap was made with
            g = self.granularity = bitmap.granularity
        self._dirty = bitmap
        self._unflushed = DirtyBitmap(self.size, g)
        self._compare = DirtyBitmap(self.size, g)
        self.sync_mode, self.plan_reason = plan.mode, plan.reason
        if plan.mode is AttachMode.FULL:
            self._dirty.mark(0, self.size)
        elif plan.mode is AttachMode.COMPARE:
            self._compare.mark(0, self.size)
        elif plan.mode is AttachMode.NONE:
            self._dirty.clear_all()
        log.info("%s: attach plan %s (%s)", self.name, plan.mode.value, plan.reason)
        rotate_generation(meta, self._source_record, self.key)
        meta.target = self.key
        meta.clean = False
        meta.consistent = not (self._dirty or self._compare)
        self.meta = meta
        try:  # source record first: see blocktrace.replica.meta on crash ordering
            self._source_record.save(src_rec_path)
            self._save(force=True)
        except OSError as exc:
            if self.device is not None:
                await self.device.close()
            raise TargetError(self.name, f"cannot write replica metadata: {exc}") from exc
        self._set_state("synchronizing" if self.device is not None else "degraded")

    def attached(self) -> None:
        """The stream now holds every write: copying from the source is safe from here on
        (a copy made earlier could miss a write applied before the trace was attached)."""
        if self._worker is None and not self._closing:
            self._worker = asyncio.get_running_loop().create_task(
                self._run_worker(), name=f"replica:{self.name}"
            )

    async def deliver(self, records: Sequence[Record]) -> None:
        async with self._lock:
            await self._quiesce()
            self._check_fatal()
            await self._apply(records)
            self._check_fatal()
            self._maybe_save()

    async def make_durable(self) -> None:
        async with self._lock:
            await self._quiesce()
            self._check_fatal()
            if self.device is not None and self._unflushed_ops:
                try:
                    await self.device.flush()
                    self._flushed()
                except Exception as exc:
                    self._degrade(exc)
                    self._check_fatal()
            self._maybe_save()

    async def close(self, *, clean: bool) -> None:
        self._closing = True
        self._wake.set()
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._worker
        if self._save_task is not None:  # the final save must be the last rename
            with contextlib.suppress(Exception):
                await self._save_task
        async with self._lock:
            await self._quiesce()
            if self.device is not None:
                try:
                    await self.device.flush()
                    self._flushed()
                except Exception as exc:
                    self._degrade(exc, reconnect=False)
            self._dirty.merge(self._unflushed)
            if self.meta is not None:
                # clean: every record was delivered, so the bitmap names all the replica lacks
                self.meta.clean = clean
                self.meta.consistent = clean and not (self._dirty or self._compare)
                self.meta.applied_seq = self.applied_seq
                if self.meta.clean and self.device is not None:
                    fp = self.replica_fingerprint()
                    self.meta.fingerprint = list(fp) if fp else None
                if clean and self._source_record is not None and self.source_path:
                    rec = self._source_record.replicas.get(self.key)
                    fp = file_fingerprint(self.source_path)
                    if rec is not None:
                        rec["fingerprint"] = list(fp) if fp else None
                    with contextlib.suppress(OSError):
                        self._source_record.save(Path(self.source_path + SOURCE_SUFFIX))
                with contextlib.suppress(OSError):
                    self._save(force=True)
            if self.device is not None:
                with contextlib.suppress(Exception):
                    await self.device.close()
                self.device = None
        self._set_state("closed")

    # -- streaming ------------------------------------------------------------------------------

    def _check_fatal(self) -> None:
        if self._fatal is not None:
            raise TargetError(self.name, str(self._fatal)) from self._fatal

    def _fail(self, exc: BaseException, records: Sequence[Record]) -> None:
        """The replica failed while applying ``records``: they (and anything unflushed) are
        dirty now.  With ``on-disconnect=fail`` the trace fails instead."""
        self._skip(records)
        self._degrade(exc)

    def _degrade(self, exc: BaseException, *, reconnect: bool = True) -> None:
        msg = str(exc) or type(exc).__name__
        self.last_error = msg
        self._dirty.merge(self._unflushed)
        self._unflushed.clear_all()
        self._unflushed_ops = 0
        dev, self.device = self.device, None
        if dev is not None:
            task = asyncio.get_running_loop().create_task(dev.close())
            task.add_done_callback(lambda t: t.cancelled() or t.exception())
        if self.on_disconnect == "fail" and reconnect:
            self._fatal = exc
            self._set_state("failed", error=msg)
            return
        if self.meta is not None:
            self.meta.consistent = False
        self._set_state("degraded", error=msg)
        with contextlib.suppress(OSError):
            self._save(force=True)
        self._wake.set()

    # -- background: connect, synchronise -------------------------------------------------------

    async def _run_worker(self) -> None:
        delay = BACKOFF_MIN
        while not self._closing:
            if self.device is None:
                if self._fatal is not None:
                    return
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.reconnect_max)
                try:
                    dev = await self.open_device()
                    if dev.size < self.size:
                        await dev.close()
                        raise TargetError(self.name, "replica shrank")
                except Exception as exc:
                    log.debug("%s: reconnect failed: %s", self.name, exc)
                    self.last_error = str(exc) or type(exc).__name__
                    continue
                async with self._lock:
                    await self._quiesce()
                    self.device = dev
                self.reconnects += 1
                self._set_state("synchronizing")
            try:
                done = await self._sync_step()
            except Exception as exc:  # the *source* failed: nothing sensible left to do
                log.error("%s: synchronisation failed: %s", self.name, exc)
                self._fatal = exc
                self._set_state("failed", error=str(exc))
                return
            if not done:
                continue
            delay = BACKOFF_MIN
            self._wake.clear()
            if self.device is not None:
                self._set_state("ready")
                self.synchronized.set()
            await self._wake.wait()

    async def _sync_step(self) -> bool:
        """Copy (or compare) one chunk; True when nothing is left and the replica is flushed."""
        async with self._lock:
            await self._quiesce()
            dev, src = self.device, self.source
            if dev is None or src is None:
                return False
            run = next(self._dirty.runs(SYNC_CHUNK), None)
            compare = False
            if run is None:
                run = next(self._compare.runs(SYNC_CHUNK), None)
                compare = True
            if run is None:
                if self._unflushed_ops or self._unflushed:
                    try:
                        await dev.flush()
                    except Exception as exc:
                        self._degrade(exc)
                        return False
                    self._flushed()
                if self.meta is not None and not self.meta.consistent:
                    self.meta.consistent = True
                    self.meta.applied_seq = self.applied_seq
                    with contextlib.suppress(OSError):
                        self._save(force=True)
                return True
            offset, length = run
            self._unflushed.mark(offset, length)
            try:
                await copy_region(dev, src, offset, length, compare=compare, stats=self._copy_stats)
            except SourceReadError as exc:
                raise (exc.__cause__ or exc) from None
            except Exception as exc:
                self._degrade(exc)
                return False
            self._unflushed_ops += 1
            (self._compare if compare else self._dirty).clear(offset, length)
            return False

    # -- persistence ----------------------------------------------------------------------------

    def _maybe_save(self) -> None:
        """Periodic save while streaming, written by a worker thread: an fsync must not stall
        the event loop (and so every client) once a second."""
        if (
            self._save_task is None
            and self.meta is not None
            and self.meta_path is not None
            and time.monotonic() - self._last_save >= SAVE_INTERVAL
        ):
            data = self._encode()
            self._last_save = time.monotonic()
            self._save_task = asyncio.get_running_loop().create_task(
                self._save_in_thread(self.meta_path, data)
            )

    async def _save_in_thread(self, path: Path, data: bytes) -> None:
        try:
            await asyncio.to_thread(atomic_write, path, data, ".tmp-bg")
        except OSError as exc:
            log.warning("%s: cannot save replica metadata: %s", self.name, exc)
        finally:
            self._save_task = None

    def _encode(self) -> bytes:
        assert self.meta is not None
        if self.state == "ready":
            self.meta.applied_seq = self.applied_seq
        self.meta.updated = time.time()
        bitmap = self._dirty.copy()
        bitmap.merge(self._compare)  # a pending compare is a pending copy for a reader
        # On disk, ``consistent`` is claimed only by a clean close: during a session the
        # replica may already hold records past the saved ``applied-seq`` (and a crash may
        # leave writes in flight half-done), so a reader after a kill -9 must not trust it.
        saved = dataclasses.replace(self.meta, consistent=self.meta.consistent and self.meta.clean)
        return encode_meta(saved, bitmap)

    def _save(self, *, force: bool) -> None:
        """Save now, in this thread (state changes, open and close)."""
        if self.meta is None or self.meta_path is None:
            return
        atomic_write(self.meta_path, self._encode())
        self._last_save = time.monotonic()
