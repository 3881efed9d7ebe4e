"""TraceFilter: the one funnel every write-class operation of an export passes through.

Every export's device stack is ``TraceFilter(FileDevice)`` (see ``exports.open_export``); with
no trace attached the filter forwards each call after one tuple check, so an untraced export
costs nothing measurable.  With traces attached, each WRITE, WRITE_ZEROES and TRIM goes through
:meth:`TraceFilter._traced`, which

1. reserves queue space in every attached trace (the backpressure point: a full queue makes
   the client's request wait *before* it touches the image, never drops a record);
2. applies the operation to the child (first saving, for a trace that reads the image as of
   its records, the bytes it overwrites: :mod:`blocktrace.stream.prior`);
3. assigns the sequence number and appends the record to every trace's queue, with no
   ``await`` between the child returning and the append;
4. waits, if the trace's copy mode or the request's FUA asks for it, for the target.

Why this gives one order for image and stream: local children (raw file, memory) apply an
operation before their coroutine first suspends (``pwrite`` runs inline), so steps 2-3 run
without the event loop switching tasks: the order records are appended *is* the order the
image was changed.  FUA is therefore applied as write + flush around step 3, so a FUA write
does not sit in ``fdatasync`` between applying and recording while an overlapping write
overtakes it.  Children that may suspend before applying (remote devices) set
``inline=False``; overlapping requests then hold an in-flight range
(:class:`~blocktrace.trace.ordering.RangeLock`) across steps 2-3, which makes them strictly
sequential, while disjoint ones still run concurrently.

A FLUSH record is appended when the flush *arrives*, before the child flush: it then follows
exactly the operations that completed before the flush was received (the ones it covers).

Attaching or detaching a trace closes a gate, waits until no operation is between steps 1 and
3 (only possible with non-inline children), swaps the tuple of sinks and reopens the gate, so
each operation is either wholly in a trace's stream or wholly in its base.
"""

from __future__ import annotations

import asyncio
import errno
from collections.abc import Awaitable, Callable
from typing import Protocol

from blocktrace.block.device import BlockDevice, ExtentFlags, ReadableBuffer
from blocktrace.block.filter import Filter
from blocktrace.errors import BlockDeviceError, TargetError
from blocktrace.stream.prior import Capture, PriorContents
from blocktrace.stream.records import RECORD_OVERHEAD, Record, RecordKind
from blocktrace.trace.delivery import Delivery
from blocktrace.trace.ordering import RangeLock

WRITE = RecordKind.WRITE
ZERO = RecordKind.ZERO
TRIM = RecordKind.TRIM

#: an unaligned zero/trim up to this size is recorded as one WRITE of its envelope; larger
#: ones as (head WRITE, aligned ZERO/TRIM, tail WRITE), three records for one operation
SMALL_UNALIGNED = 1024 * 1024
#: unit of a sync=full copy step (one block-status + read + record batch, atomic vs writes)
COPY_CHUNK = 1024 * 1024
#: largest range read back and recorded after an operation failed part-way on the image
MAX_READBACK = 32 * 1024 * 1024


class TraceSink(Protocol):
    """What the filter needs from an attached trace (implemented by ``manager.Trace``)."""

    @property
    def delivery(self) -> Delivery: ...

    @property
    def alignment(self) -> int: ...

    @property
    def write_blocking(self) -> bool: ...

    @property
    def breaks_on_error(self) -> bool:
        """True for ``on-target-error=break``: target errors never reach clients."""
        ...

    @property
    def blocked_error(self) -> BlockDeviceError | None:
        """Set while writes must fail (``on-target-error=report`` after a target failure)."""
        ...

    @property
    def prior_contents(self) -> PriorContents | None:
        """Where to save what each operation overwrites, before it does (a target that
        reads the image as of its records: :mod:`blocktrace.stream.prior`); None if not."""
        ...

    def stream_broken(self, reason: str) -> None:
        """The stream no longer matches the image (an operation failed part-way and what it
        left could not be recorded): fail the trace as a target failure would, per its
        ``on-target-error``."""
        ...


Apply = Callable[[bool], Awaitable[None]]


class TraceFilter(Filter):
    """Wraps an export's device; records its write stream to the attached traces."""

    def __init__(self, child: BlockDevice, *, inline: bool | None = None) -> None:
        super().__init__(child)
        if inline is None:
            inline = child.applies_inline
        #: the child applies an operation before its coroutine first suspends
        self.inline = inline
        #: sequence number of the last record made (shared by all traces on this export)
        self.seq = 0
        #: attached traces; replaced (never mutated) so a funnel's snapshot stays valid
        self.sinks: tuple[TraceSink, ...] = ()
        #: alignment of records: the largest any attached trace needs
        self.alignment = 1
        self._any_blocking = False  # some attached trace is copy-mode=write-blocking
        #: attached traces' prior-contents stores, saved into before each operation applies
        self._priors: tuple[PriorContents, ...] = ()
        self._gate: asyncio.Future[None] | None = None
        self._pending = 0  # operations between the gate and their record (non-inline only)
        self._idle: asyncio.Event | None = None
        self._ranges = RangeLock()
        #: set by :meth:`refuse`: traced operations not yet applied fail with it
        self._refused: BlockDeviceError | None = None

    @property
    def keeps_payloads(self) -> bool:
        """True while traces are attached: a WRITE's ``bytes`` payload then becomes a record's
        data by reference, so the NBD connection receives large payloads into fresh ``bytes``
        objects (:class:`blocktrace.nbd.dispatch.PayloadBuffer`) instead of a reused buffer the
        filter would have to copy out of."""
        return bool(self.sinks)

    # -- write-class operations: all through the funnel --------------------------------------

    async def write(self, offset: int, data: ReadableBuffer, *, fua: bool = False) -> None:
        sinks = self.sinks
        if self._gate is None and self.inline:
            if not sinks:
                return await self.child.write(offset, data, fua=fua)
            a = self.alignment
            n = len(data)
            if not (offset % a or n % a or self._refused):
                # The common case: an aligned write under a local child that fits every
                # queue now.  It takes the funnel's own steps (those of _commit), only
                # without the closure and the record builder the general case needs, and
                # one coroutine level less (measured: docs/performance.md).
                cost = n + RECORD_OVERHEAD
                if self._try_reserve(sinks, cost):
                    positions = await self._apply_and_record(
                        sinks, cost, WRITE, offset, n, data, fua, None
                    )
                    if fua or self._any_blocking:
                        await self._acknowledge(positions, fua)
                    return

        async def apply(fua: bool) -> None:
            await self.child.write(offset, data, fua=fua)

        await self._traced(WRITE, offset, len(data), data, fua, apply)

    async def write_zeroes(
        self,
        offset: int,
        length: int,
        *,
        may_trim: bool = False,
        fua: bool = False,
        fast: bool = False,
    ) -> None:
        if not self.sinks and self._gate is None and self.inline:
            return await self.child.write_zeroes(
                offset, length, may_trim=may_trim, fua=fua, fast=fast
            )

        async def apply(fua: bool) -> None:
            await self.child.write_zeroes(offset, length, may_trim=may_trim, fua=fua, fast=fast)

        await self._traced(ZERO, offset, length, None, fua, apply)

    async def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        if not self.sinks and self._gate is None and self.inline:
            return await self.child.trim(offset, length, fua=fua)

        async def apply(fua: bool) -> None:
            await self.child.trim(offset, length, fua=fua)

        await self._traced(TRIM, offset, length, None, fua, apply)

    async def flush(self) -> None:
        sinks = self.sinks
        if not sinks:
            return await self.child.flush()
        for sink in sinks:
            if sink.blocked_error is not None:
                raise sink.blocked_error
        self.seq += 1
        record = Record(self.seq, RecordKind.FLUSH)
        positions = [(sink, sink.delivery.put(record)) for sink in sinks]
        await self.child.flush()
        await self._wait(positions, durable=True)

    # -- the funnel --------------------------------------------------------------------------

    async def _traced(
        self,
        kind: RecordKind,
        offset: int,
        length: int,
        data: ReadableBuffer | None,
        fua: bool,
        apply: Apply,
    ) -> None:
        while True:
            if self._gate is not None:
                await asyncio.shield(self._gate)
                continue
            sinks = self.sinks
            if self._refused is not None:
                raise self._refused
            if not sinks:
                if self.inline:
                    return await apply(fua)
                self._pending += 1
                try:
                    return await apply(fua)
                finally:
                    self._done_pending()
            for sink in sinks:
                if sink.blocked_error is not None:
                    raise sink.blocked_error
            cost = self._cost(kind, offset, length)
            if await self._reserve(sinks, cost):
                break  # reserved without suspending: sinks and gate unchanged
            if self.sinks is sinks and self._gate is None:
                break
            self._unreserve(sinks, cost)

        await self._commit(sinks, cost, kind, offset, length, data, fua, apply)

    # -- the ordering and acknowledgement rules: the one place ---------------------------------

    async def _commit(
        self,
        sinks: tuple[TraceSink, ...],
        cost: int,
        kind: RecordKind,
        offset: int,
        length: int,
        data: ReadableBuffer | None,
        fua: bool,
        apply: Apply | None,
    ) -> None:
        """Steps 2-4 for an operation that holds ``cost`` in every sink: apply and record it
        (:meth:`_apply_and_record`), then acknowledge it.

        Acknowledgement rule: FUA waits until the image and every trace's target are durable
        up to its record; a write-blocking trace holds every write until its target holds
        the record.  Under a local child FUA is applied as write + flush *after* the record
        is queued, so the write is never parked in ``fdatasync`` between its application and
        its record while an overlapping write overtakes it.  ``apply=None`` is an aligned
        WRITE of ``data`` (the fast path).
        """
        if self.inline:
            positions = await self._apply_and_record(
                sinks, cost, kind, offset, length, data, fua, apply
            )
        else:
            # a remote child may suspend before applying: overlapping operations hold their
            # range from application to record, so they are applied and recorded in one order
            start, end = self._envelope(offset, length)
            self._pending += 1
            try:
                async with self._ranges.hold(start, end):
                    positions = await self._apply_and_record(
                        sinks, cost, kind, offset, length, data, fua, apply
                    )
            finally:
                self._done_pending()
        if fua or self._any_blocking:
            await self._acknowledge(positions, fua)

    async def _acknowledge(self, positions: list[tuple[TraceSink, int]], fua: bool) -> None:
        """Step 4, the acknowledgement rule (see :meth:`_commit`).  A local child applied a
        FUA operation without FUA (:meth:`_apply_and_record`): its flush comes here, after
        the record is queued; a remote child applied it with FUA."""
        if fua:
            if self.inline:
                await self.child.flush()
            await self._wait(positions, durable=True)
        else:
            await self._wait(positions, durable=False)

    async def _apply_and_record(
        self,
        sinks: tuple[TraceSink, ...],
        cost: int,
        kind: RecordKind,
        offset: int,
        length: int,
        data: ReadableBuffer | None,
        fua: bool,
        apply: Apply | None,
    ) -> list[tuple[TraceSink, int]]:
        """Steps 2-3, the ordering rule: apply the operation, then number its records and
        queue them in every sink with no ``await`` in between (a local child applies before
        its coroutine first suspends, so no other operation can come between the change of
        the image and its record).  Returns each sink's position of the last record.

        A trace that reads the image as of its records (``prior_contents``) gets the bytes
        the operation overwrites saved first, inline too, and released once its records are
        queued (or it failed)."""
        caps = self._capture(offset, length) if self._priors else None
        try:
            try:
                if apply is None:
                    assert data is not None
                    await self.child.write(offset, data)
                else:
                    await apply(fua and not self.inline)
            except BlockDeviceError as exc:
                await self._image_failed(sinks, cost, kind, offset, length, exc)
                raise
            except BaseException:
                self._unreserve(sinks, cost)
                raise
            if apply is None:
                assert data is not None
                self.seq += 1
                payload = data if type(data) is bytes else bytes(data)
                records = [Record(self.seq, WRITE, offset, length, fua, payload)]
            else:
                try:
                    records = await self._records(kind, offset, length, data, fua)
                except BaseException as exc:
                    # applied, but the image's bytes for the record cannot be read back
                    self._unreserve(sinks, cost)
                    self._break(sinks, f"cannot read back {kind.name} [{offset}, +{length}): {exc}")
                    raise
            return self._put(sinks, records, cost)
        finally:
            if caps is not None:
                for prior, cap in caps:
                    prior.recorded(cap, self.seq)

    def _capture(self, offset: int, length: int) -> list[tuple[PriorContents, Capture]]:
        start, end = self._envelope(offset, length)
        return [(prior, prior.capture(start, end - start)) for prior in self._priors]

    async def _image_failed(
        self,
        sinks: tuple[TraceSink, ...],
        cost: int,
        kind: RecordKind,
        offset: int,
        length: int,
        exc: BlockDeviceError,
    ) -> None:
        """The image failed the operation, maybe part-way (ENOSPC after some of a write's
        bytes): the client is told, but the range may hold new bytes no record carries.
        Record what the range holds now (a WRITE of the image's bytes, read back at once, so
        it takes its place in the order), so the stream and the image still agree; when that
        cannot be done (unreadable, or larger than :data:`MAX_READBACK`), the traces break,
        per their ``on-target-error``, evented as a target error would be."""
        start, end = self._envelope(offset, length)
        if end - start <= MAX_READBACK:
            try:
                now = bytes(await self.child.read(start, end - start))
            except BlockDeviceError:
                pass
            else:
                self.seq += 1
                # queued against the operation's reservation, even where a zero or trim
                # reserved less than its range: one record, at most MAX_READBACK
                self._put(sinks, [Record(self.seq, WRITE, start, end - start, data=now)], cost)
                return
        self._unreserve(sinks, cost)
        self._break(
            sinks,
            f"image {kind.name} [{start}, {end}) failed part-way ({exc}): the range is unknown",
        )

    def _break(self, sinks: tuple[TraceSink, ...], reason: str) -> None:
        for sink in sinks:
            sink.stream_broken(reason)

    def _try_reserve(self, sinks: tuple[TraceSink, ...], cost: int) -> bool:
        """Reserve ``cost`` in every sink without waiting; False (nothing held) if any sink
        is full or failing."""
        got = 0
        for sink in sinks:
            if sink.blocked_error is not None or not sink.delivery.try_reserve(cost):
                break
            got += 1
        else:
            return True
        for sink in sinks[:got]:
            sink.delivery.unreserve(cost)
        return False

    def _unreserve(self, sinks: tuple[TraceSink, ...], cost: int) -> None:
        for sink in sinks:
            sink.delivery.unreserve(cost)

    async def _reserve(self, sinks: tuple[TraceSink, ...], cost: int) -> bool:
        """Reserve ``cost`` in every sink; True if that happened without suspending."""
        if self._try_reserve(sinks, cost):
            return True
        got: list[TraceSink] = []
        try:
            for sink in sinks:
                try:
                    await sink.delivery.reserve(cost)
                except TargetError:
                    if not sink.breaks_on_error:
                        raise BlockDeviceError(errno.EIO, "trace target failed") from None
                    sink.delivery.force_reserve(cost)  # dead queue: keep the books even
                got.append(sink)
        except BaseException:
            for sink in got:
                sink.delivery.unreserve(cost)
            raise
        return False

    def _put(
        self, sinks: tuple[TraceSink, ...], records: list[Record], cost: int
    ) -> list[tuple[TraceSink, int]]:
        positions = []
        for sink in sinks:
            delivery = sink.delivery
            pos = 0
            reserved = cost
            for rec in records:
                pos = delivery.put(rec, reserved)
                reserved = 0
            positions.append((sink, pos))
        return positions

    async def _wait(self, positions: list[tuple[TraceSink, int]], *, durable: bool) -> None:
        """Acknowledgement rule: FUA/FLUSH wait for durability, write-blocking for holding."""
        for sink, pos in positions:
            try:
                if durable:
                    await sink.delivery.wait_durable(pos)
                elif sink.write_blocking:
                    await sink.delivery.wait_held(pos)
            except TargetError:
                if not sink.breaks_on_error:
                    raise BlockDeviceError(errno.EIO, "trace target failed") from None

    def _done_pending(self) -> None:
        self._pending -= 1
        if self._pending == 0 and self._idle is not None:
            self._idle.set()

    # -- building records --------------------------------------------------------------------

    def _envelope(self, offset: int, length: int) -> tuple[int, int]:
        a = self.alignment
        return offset - offset % a, -(-(offset + length) // a) * a if a > 1 else offset + length

    def _cost(self, kind: RecordKind, offset: int, length: int) -> int:
        """Upper bound of the queue bytes an operation's records take."""
        if kind is WRITE:
            start, end = self._envelope(offset, length)
            return end - start + RECORD_OVERHEAD
        if offset % self.alignment or length % self.alignment:
            start, end = self._envelope(offset, length)
            return min(end - start, SMALL_UNALIGNED + 2 * self.alignment) + 3 * RECORD_OVERHEAD
        return RECORD_OVERHEAD

    async def _records(
        self, kind: RecordKind, offset: int, length: int, data: ReadableBuffer | None, fua: bool
    ) -> list[Record]:
        """The records for an applied operation, FUA on the last; unaligned parts carry the
        image's bytes.  Reads of a local child complete inline: this does not suspend either.
        """
        records = await self._unflagged_records(kind, offset, length, data)
        if fua:
            last = records[-1]
            records[-1] = Record(last.seq, last.kind, last.offset, last.length, True, last.data)
        return records

    async def _unflagged_records(
        self, kind: RecordKind, offset: int, length: int, data: ReadableBuffer | None
    ) -> list[Record]:
        start, end = self._envelope(offset, length)
        if kind is WRITE:
            if start == offset and end == offset + length:
                assert data is not None
                payload = data if type(data) is bytes else bytes(data)
            else:
                payload = bytes(await self.child.read(start, end - start))
            self.seq += 1
            return [Record(self.seq, WRITE, start, end - start, data=payload)]
        # ZERO / TRIM: aligned middle without data, unaligned edges as writes of what's there
        a = self.alignment
        mid_start = -(-offset // a) * a
        mid_end = (offset + length) // a * a
        records: list[Record] = []
        aligned = start == offset and end == offset + length
        if mid_start >= mid_end or (not aligned and end - start <= SMALL_UNALIGNED):
            # small and unaligned: one WRITE of what the range holds now, so one operation is
            # one record; aligned zeroes and trims always stay payload-free records
            payload = bytes(await self.child.read(start, end - start))
            self.seq += 1
            return [Record(self.seq, WRITE, start, end - start, data=payload)]
        if start < mid_start:
            head = bytes(await self.child.read(start, mid_start - start))
            self.seq += 1
            records.append(Record(self.seq, WRITE, start, len(head), data=head))
        self.seq += 1
        records.append(Record(self.seq, kind, mid_start, mid_end - mid_start))
        if mid_end < end:
            tail = bytes(await self.child.read(mid_end, end - mid_end))
            self.seq += 1
            records.append(Record(self.seq, WRITE, mid_end, len(tail), data=tail))
        return records

    # -- control: attach, detach, marks, sync=full copy ----------------------------------------

    async def _drain(self) -> asyncio.Future[None]:
        """Close the gate and wait until no operation is between gate and record."""
        while self._gate is not None:
            await asyncio.shield(self._gate)
        gate: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._gate = gate
        try:
            while self._pending:
                self._idle = asyncio.Event()
                await self._idle.wait()
        except BaseException:
            self._open_gate(gate)
            raise
        finally:
            self._idle = None
        return gate

    def _open_gate(self, gate: asyncio.Future[None]) -> None:
        self._gate = None
        gate.set_result(None)

    async def attach(self, sink: TraceSink) -> None:
        """Start recording into ``sink``: every operation applied after this returns (and none
        applied before) is in its stream."""
        gate = await self._drain()
        try:
            self.sinks = (*self.sinks, sink)
            self._sinks_changed()
        finally:
            self._open_gate(gate)

    async def detach(self, sink: TraceSink) -> None:
        """Stop recording into ``sink`` (its queue is left to drain)."""
        gate = await self._drain()
        try:
            self.detach_now(sink)
        finally:
            self._open_gate(gate)

    def refuse(self, error: BlockDeviceError) -> None:
        """From now on, fail every write-class operation that is not yet applied (server
        shutdown gave up waiting): those waiting for queue space fail at once with ``error``.

        Without this, a write still waiting when its trace is stopped would be granted space
        after the detach and applied *untraced*, after its connection was already dropped.
        Operations already applied are recorded as usual.
        """
        self._refused = error
        for sink in self.sinks:
            sink.delivery.refuse_waiters(error)

    def detach_now(self, sink: TraceSink) -> None:
        """Detach without draining: for a trace that broke (its stream ends here anyway)."""
        self.sinks = tuple(s for s in self.sinks if s is not sink)
        self._sinks_changed()

    def _sinks_changed(self) -> None:
        self.alignment = max((s.alignment for s in self.sinks), default=1)
        self._any_blocking = any(s.write_blocking for s in self.sinks)
        self._priors = tuple(p for s in self.sinks if (p := s.prior_contents) is not None)

    def put_mark(self, sink: TraceSink, name: str) -> int:
        """Append a MARK record to one trace's stream; returns its position there."""
        self.seq += 1
        return sink.delivery.put(Record(self.seq, RecordKind.MARK, name=name))

    async def copy_chunk(self, sink: TraceSink, offset: int, length: int) -> int:
        """Record ``[offset, offset+length)`` as it is now into ``sink`` (``sync=full``).

        Holes become TRIM records, zero ranges ZERO records, the rest WRITE records.  Atomic
        with respect to client operations, so a concurrent write lands before (and is read
        here) or after (and is recorded after).  Returns the payload bytes recorded.
        """
        if self.inline:
            return await self._copy_chunk(sink, offset, length)
        self._pending += 1
        try:
            async with self._ranges.hold(offset, offset + length):
                return await self._copy_chunk(sink, offset, length)
        finally:
            self._done_pending()

    async def _copy_chunk(self, sink: TraceSink, offset: int, length: int) -> int:
        a = max(sink.alignment, 1)
        end = offset + length
        pieces: list[tuple[RecordKind, int, int]] = []
        pos = offset
        while pos < end:
            extents = await self.child.block_status(pos, end - pos) if self.can_extents else []
            if not extents:
                pieces.append((WRITE, pos, end - pos))
                break
            for ext in extents:
                n = min(ext.length, end - pos)
                if n <= 0:
                    break
                if ext.flags & ExtentFlags.ZERO and pos % a == 0 and (pos + n) % a == 0:
                    kind = TRIM if ext.flags & ExtentFlags.HOLE else ZERO
                else:
                    kind = WRITE
                if pieces and pieces[-1][0] is kind and pieces[-1][1] + pieces[-1][2] == pos:
                    pieces[-1] = (kind, pieces[-1][1], pieces[-1][2] + n)
                else:
                    pieces.append((kind, pos, n))
                pos += n
        nbytes = 0
        delivery = sink.delivery
        for kind, start, n in pieces:
            if kind is WRITE:
                data = bytes(await self.child.read(start, n))
                for zero, s, e in _zero_runs(data, a):
                    self.seq += 1
                    if zero:
                        delivery.put(Record(self.seq, ZERO, start + s, e - s, copy=True))
                    else:
                        rec = Record(self.seq, WRITE, start + s, e - s, data=data[s:e], copy=True)
                        delivery.put(rec)
                        nbytes += e - s
            else:
                self.seq += 1
                delivery.put(Record(self.seq, kind, start, n, copy=True))
        return nbytes


#: granularity of zero detection in sync=full copies
ZERO_BLOCK = 64 * 1024
_ZEROES = bytes(ZERO_BLOCK)


def _zero_runs(data: bytes, alignment: int) -> list[tuple[bool, int, int]]:
    """Split ``data`` into runs of all-zero and other ``ZERO_BLOCK``-sized blocks, so zero
    ranges are recorded as ZERO records (no payload).  Block edges stay ``alignment``-aligned
    because the chunk starts aligned and ZERO_BLOCK is a multiple of any sane alignment."""
    step = max(ZERO_BLOCK, alignment)
    zero = _ZEROES if step == ZERO_BLOCK else bytes(step)
    mv = memoryview(data)
    runs: list[tuple[bool, int, int]] = []
    for s in range(0, len(data), step):
        e = min(s + step, len(data))
        is_zero = mv[s:e] == zero[: e - s]
        if runs and runs[-1][0] == is_zero:
            runs[-1] = (is_zero, runs[-1][1], e)
        else:
            runs.append((is_zero, s, e))
    return runs
