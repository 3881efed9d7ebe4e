"""Applying the write stream to the replica: the streaming half of the replica engine.

A mixin of :class:`blocktrace.replica.target.ReplicaTarget` (which owns the state, the
locking and the failure handling); split out to keep each module readable.

Two ways in:

* :meth:`StreamApplier._apply` (from ``deliver``, under the target's lock): a batch in stream
  order, non-overlapping records in flight together (one send to an NBD replica),
  overlapping ones strictly one after the other, FLUSH as a flush after everything before it.
* :meth:`StreamApplier.start_direct`, the ``copy-mode=write-blocking`` fast path: the
  delivery layer hands over the *only* record not yet held, from the client's own request
  (no wake-up of the delivery worker), and is told from the NBD reply handler that the
  replica holds it (no task between the reply and the client's acknowledgement).  Stream
  order holds because it is taken only when the target's lock is free and every lock holder
  first waits for direct writes in flight (:meth:`StreamApplier._quiesce`): a direct write is
  always the latest record and is on the replica before anything after it is sent.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from blocktrace.block.device import BlockDevice, PipelinedWrites
from blocktrace.errors import TargetError
from blocktrace.replica.bitmap import DirtyBitmap
from blocktrace.stream.apply import apply_group
from blocktrace.stream.contract import DirectWrites, Done
from blocktrace.stream.records import Record, RecordKind

log = logging.getLogger(__name__)

#: most records applied concurrently: pipelined in one send to a device with ``write_many``
#: (NBD), tasks otherwise
MAX_GROUP = 256
MAX_GROUP_TASKS = 32


class StreamApplier(DirectWrites):
    """Stream application for :class:`~blocktrace.replica.target.ReplicaTarget`."""

    name: str
    device: BlockDevice | None
    applied_seq: int
    applied_records: int
    missed_records: int
    _dirty: DirtyBitmap
    _unflushed: DirtyBitmap
    _unflushed_ops: int
    _lock: asyncio.Lock
    _fatal: BaseException | None
    #: direct writes in flight, and a future set when the last one completes
    _direct: int = 0
    _direct_idle: asyncio.Future[None] | None = None

    def _fail(self, exc: BaseException, records: Sequence[Record]) -> None:
        raise NotImplementedError

    # -- the write-blocking fast path -----------------------------------------------------------

    def start_direct(self, rec: Record, done: Done) -> bool:
        """Send WRITE ``rec`` to the replica now; ``done(None)`` once the replica holds it (or
        it failed and was marked dirty: degraded), ``done(exc)`` if the trace must fail
        (``on-disconnect=fail``).  False, with nothing done, when this path does not apply:
        then the record goes through :meth:`deliver` as usual.

        The caller guarantees ``rec`` is the only record not yet held; this side guarantees
        nothing is sent after it before it completes (lock free now, :meth:`_quiesce` later).
        """
        dev = self.device
        if (
            not isinstance(dev, PipelinedWrites)
            or rec.kind is not RecordKind.WRITE
            or rec.fua
            or rec.data is None
            or self._fatal is not None
            or self._lock.locked()
        ):
            return False
        self._unflushed.mark(rec.offset, rec.length)

        def finished(exc: BaseException | None) -> None:
            try:
                if exc is None:
                    self.applied_seq = rec.seq
                    self.applied_records += 1
                    self._unflushed_ops += 1
                elif self.device is dev:
                    self._fail(exc, [rec])
                else:  # the replica failed meanwhile: rec's region is dirty like the rest
                    self._skip([rec])
            except Exception:  # pragma: no cover - bookkeeping must not break the reply loop
                log.exception("%s: direct write bookkeeping failed", self.name)
            finally:
                self._direct -= 1
                idle = self._direct_idle
                if not self._direct and idle is not None:
                    self._direct_idle = None
                    if not idle.done():
                        idle.set_result(None)
            fatal = self._fatal
            done(TargetError(self.name, str(fatal)) if fatal is not None else None)

        self._direct += 1
        try:
            sent = dev.start_write(rec.offset, rec.data, finished)
        except Exception as exc:  # the connection was already gone: nothing was sent
            finished(exc)
            return True
        if not sent:
            self._direct -= 1
            return False
        return True

    async def _quiesce(self) -> None:
        """Wait until no direct write is in flight (every lock holder calls this first)."""
        while self._direct:
            if self._direct_idle is None:
                self._direct_idle = asyncio.get_running_loop().create_future()
            await self._direct_idle

    # -- batches ---------------------------------------------------------------------------------

    async def _apply(self, records: Sequence[Record]) -> None:
        group: list[Record] = []
        blocks: set[int] = set()  # 4 KiB blocks the group touches: a cheap overlap test
        dev = self.device
        pipelined = dev is not None and (dev.applies_inline or isinstance(dev, PipelinedWrites))
        max_group = MAX_GROUP if pipelined else MAX_GROUP_TASKS
        for i, rec in enumerate(records):
            if self.device is None:  # degraded: only remember what the replica lacks
                self._skip(records[i:])
                return
            kind = rec.kind
            if kind is RecordKind.MARK:
                continue
            if kind is RecordKind.FLUSH:
                if group and not await self._run_group(group):
                    self._skip(records[i:])
                    return
                group = []
                blocks.clear()
                try:
                    await self.device.flush()
                    self._flushed()
                    self._applied(rec)
                except Exception as exc:
                    self._fail(exc, [rec])
                    self._skip(records[i + 1 :])
                    return
                continue
            first = rec.offset >> 12
            last = (rec.offset + rec.length - 1) >> 12
            if first == last:  # one 4 KiB block: the common case, one set lookup
                if group and (first in blocks or len(group) >= max_group):
                    if not await self._run_group(group):
                        self._skip(records[i:])
                        return
                    group = []
                    blocks.clear()
                blocks.add(first)
                group.append(rec)
                continue
            large = last - first > 256  # applied on its own rather than indexed
            if group and (
                large or len(group) >= max_group or any(b in blocks for b in range(first, last + 1))
            ):
                if not await self._run_group(group):
                    self._skip(records[i:])
                    return
                group = []
                blocks.clear()
            if large:
                if not await self._run_group([rec]):
                    self._skip(records[i + 1 :])
                    return
                continue
            blocks.update(range(first, last + 1))
            group.append(rec)
        if group and not await self._run_group(group):
            return

    async def _run_group(self, group: list[Record]) -> bool:
        """Apply non-overlapping records concurrently; False if the replica failed."""
        dev = self.device
        assert dev is not None
        self._unflushed.mark_many([(r.offset, r.length) for r in group])
        try:
            await apply_group(dev, group)
        except Exception as exc:
            self._fail(exc, group)
            return False
        # a group holds data records only (FLUSH and MARK never join one)
        self.applied_seq = group[-1].seq
        self.applied_records += len(group)
        self._unflushed_ops += len(group)
        return True

    def _applied(self, rec: Record) -> None:
        self.applied_seq = rec.seq
        self.applied_records += 1
        if rec.kind is not RecordKind.FLUSH:
            self._unflushed_ops += 1

    def _flushed(self) -> None:
        self._unflushed.clear_all()
        self._unflushed_ops = 0

    def _skip(self, records: Sequence[Record]) -> None:
        for rec in records:
            if rec.kind.is_data:
                self._dirty.mark(rec.offset, rec.length)
                self.missed_records += 1
