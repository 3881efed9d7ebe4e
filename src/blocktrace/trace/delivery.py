"""Delivery: one bounded queue and one worker task per trace, between the filter and a target.

The filter appends records synchronously (:meth:`Delivery.put`, no ``await``), in the order
operations were applied, so the queue order *is* the stream order.  A single worker task takes
batches off the head and hands them to the target; a single consumer means targets need no
locking and can write each batch as one large append.

Positions: records are numbered 1, 2, 3... in the order they were queued (``queued``);
``held`` is how many the target holds and ``durable`` how many it has made durable.  A writer
in ``copy-mode=write-blocking`` waits for ``held >= n``; a FUA write or a FLUSH, in both
modes, waits for ``durable >= n`` (the crash promise: what a client saw acknowledged as durable
is durable in the trace too).  The worker calls ``make_durable`` only when someone waits for
it, so durability is group-committed: one fsync covers every FLUSH queued meanwhile.

Backpressure: writers reserve queue space *before* applying their write
(:meth:`try_reserve`/:meth:`reserve`); when the cap is reached they wait, in FIFO order, for
the worker to drain.  A record is never dropped: the only way out of the queue is the target,
or a failure that is reported (``on-target-error``).
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
from collections import deque
from collections.abc import Callable

from blocktrace.errors import BlocktraceError, TargetError
from blocktrace.stream.contract import DirectWrites, Target
from blocktrace.stream.records import RECORD_OVERHEAD, Record

log = logging.getLogger(__name__)

#: most bytes handed to a target in one ``deliver`` call
MAX_BATCH_BYTES = 16 * 1024 * 1024
MAX_BATCH_RECORDS = 4096


_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_heap_kept = 0


def keep_heap(nbytes: int) -> None:
    """Ask glibc to keep up to ``nbytes`` of freed heap instead of returning it to the kernel.

    A background queue grows to many MiB of 4 KiB payloads and is then drained in batches;
    with glibc's default trim threshold every drain hands the memory back and the next fill
    page-faults it in again, which measured 4-8x slower per traced write.  Keeping the heap
    costs nothing beyond the queue cap, which bounds the server's RSS anyway.
    """
    global _heap_kept
    if nbytes <= _heap_kept:
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc: nothing to tune
        return
    _heap_kept = nbytes
    mallopt(_M_TRIM_THRESHOLD, min(nbytes, 2**31 - 1))
    # setting the trim threshold freezes the mmap threshold: keep big payloads on the heap
    mallopt(_M_MMAP_THRESHOLD, 32 * 1024 * 1024)


#: ``target.start_direct(record, done) -> bool`` (see :meth:`Delivery._try_direct`)
StartDirect = Callable[[Record, Callable[[BaseException | None], None]], bool]


def record_cost(record: Record) -> int:
    return record.nbytes + RECORD_OVERHEAD


class Delivery:
    """Queue + worker for one trace.  Create, :meth:`start`, :meth:`put`..., :meth:`finish`."""

    def __init__(
        self,
        target: Target,
        queue_size: int,
        on_failure: Callable[[BaseException], None],
    ) -> None:
        self.target = target
        self.queue_size = queue_size
        keep_heap(queue_size + 32 * 1024 * 1024)
        self._on_failure = on_failure
        self._queue: deque[Record] = deque()
        self.queued_bytes = 0  # payload + overhead of records in the queue
        self._reserved = 0  # space promised to writers that have not queued yet
        self._space_waiters: deque[tuple[int, asyncio.Future[None]]] = deque()
        self.queued = 0  # records ever queued
        self.held = 0  # records the target holds
        self.durable = 0  # records the target made durable
        self.bytes_delivered = 0  # payload bytes the target holds
        self.bytes_queued_total = 0  # payload bytes ever queued
        self._durable_wanted = 0
        self._held_waiters: list[tuple[int, int, asyncio.Future[None]]] = []
        self._durable_waiters: list[tuple[int, int, asyncio.Future[None]]] = []
        self._tiebreak = itertools.count()
        self._wakeup = asyncio.Event()
        self._resumed = asyncio.Event()
        self._resumed.set()
        self._closing = False
        self.error: BaseException | None = None
        self._task: asyncio.Task[None] | None = None
        #: the target's write-blocking fast path, if it offers one (see :meth:`_try_direct`)
        self._start_direct: StartDirect | None = (
            target.start_direct if isinstance(target, DirectWrites) else None
        )
        self._direct = 0  # records handed to the fast path, not yet held

    # -- producer side (the filter) ----------------------------------------------------------

    def try_reserve(self, nbytes: int) -> bool:
        """Reserve ``nbytes`` of queue space without waiting; False if it would overflow.

        An empty queue admits any size, so a request larger than the cap still makes progress.
        """
        total = self.queued_bytes + self._reserved
        if self._space_waiters or (total and total + nbytes > self.queue_size):
            return False
        self._reserved += nbytes
        return True

    async def reserve(self, nbytes: int) -> None:
        """Reserve ``nbytes``, waiting (FIFO) while the queue is full: the backpressure path."""
        if self.try_reserve(nbytes):
            return
        self._raise_if_failed()
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._space_waiters.append((nbytes, fut))
        try:
            await fut
        except BaseException:
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                self.unreserve(nbytes)  # granted, then cancelled: give it back
            else:
                with contextlib.suppress(ValueError):
                    self._space_waiters.remove((nbytes, fut))
            raise

    def refuse_waiters(self, exc: BaseException) -> None:
        """Fail every producer waiting for queue space with ``exc`` (server shutdown).

        They have not touched the image yet (space is reserved before the operation is
        applied), so failing them loses nothing: the client is told its write did not happen.
        """
        while self._space_waiters:
            _, fut = self._space_waiters.popleft()
            if not fut.done():
                fut.set_exception(exc)

    def force_reserve(self, nbytes: int) -> None:
        """Count ``nbytes`` as reserved without checking the cap (a failed queue's books)."""
        self._reserved += nbytes

    def unreserve(self, nbytes: int) -> None:
        self._reserved -= nbytes
        self._grant_space()

    def put(self, record: Record, reserved: int = 0) -> int:
        """Queue ``record`` (synchronously); returns its position.  ``reserved`` is the space
        its producer reserved, now turned into queued bytes."""
        self._reserved -= reserved
        if self.error is not None:  # a dead queue: the trace has ended with its error
            return self.queued + 1  # a position never reached: waiting on it raises
        self._queue.append(record)
        data = record.data
        n = len(data) if data is not None else 0
        self.queued_bytes += n + RECORD_OVERHEAD
        self.bytes_queued_total += n
        self.queued += 1
        if not self._wakeup.is_set():
            self._wakeup.set()
        return self.queued

    async def wait_held(self, position: int) -> None:
        """Return once the target holds record ``position`` (write-blocking acknowledgement)."""
        if self.held >= position:
            return
        direct = self._start_direct is not None and self._try_direct(position)
        if direct and self.held >= position:  # done already (a failure known at once)
            return
        await self._wait(self._held_waiters, position)

    def _try_direct(self, position: int) -> bool:
        """Write-blocking fast path: when ``position`` is the only record not yet held (the
        worker idle), the target sends it from the caller's task and reports from its reply
        handler, saving the worker's wake-up and the hand-back.  The target refuses (False)
        when it cannot, and must not return from ``deliver``/``make_durable``/``close`` while
        a record handed over this way is in flight (so stream order and ``held`` stay exact).
        """
        queue = self._queue
        if (
            len(queue) != 1
            or position != self.queued
            or self.held != position - 1
            or self._direct
            or self.error is not None
            or self._closing
            or not self._resumed.is_set()
        ):
            return False
        assert self._start_direct is not None
        rec = queue.popleft()  # taken: the worker finds nothing to deliver
        data = rec.data
        n = len(data) if data is not None else 0
        cost = n + RECORD_OVERHEAD

        def done(exc: BaseException | None) -> None:
            self._direct -= 1
            if self.error is not None:  # failed meanwhile: _fail settled every waiter
                self._wakeup.set()
                return
            self.queued_bytes -= cost
            if exc is not None:
                self._fail(exc)
                return
            self.bytes_delivered += n
            self.held = position
            _wake_upto(self._held_waiters, position)
            self._grant_space()
            if self._queue or self._closing or self._durable_wanted > self.durable:
                self._wakeup.set()

        self._direct += 1
        try:
            started = self._start_direct(rec, done)
        except Exception:  # a target bug must not lose the record: the worker delivers it
            log.exception("trace target %s: direct delivery failed", self.target.name)
            started = False
        if not started:
            self._direct -= 1
            queue.appendleft(rec)
        return started

    async def wait_durable(self, position: int) -> None:
        """Return once record ``position`` is durable in the target (FUA, FLUSH)."""
        if self.durable >= position:
            return
        self._durable_wanted = max(self._durable_wanted, position)
        self._wakeup.set()
        await self._wait(self._durable_waiters, position)

    async def _wait(self, heap: list[tuple[int, int, asyncio.Future[None]]], pos: int) -> None:
        self._raise_if_failed()
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(heap, (pos, next(self._tiebreak), fut))
        await fut

    def _raise_if_failed(self) -> None:
        if self.error is not None:
            raise _as_target_error(self.target, self.error)

    # -- control -----------------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(
            self._run(), name=f"trace-delivery:{self.target.name}"
        )

    def pause(self) -> None:
        self._resumed.clear()

    def resume(self) -> None:
        self._resumed.set()

    @property
    def paused(self) -> bool:
        return not self._resumed.is_set()

    @property
    def queued_records(self) -> int:
        return len(self._queue)

    @property
    def busy(self) -> bool:
        return bool(self._queue) or self._durable_wanted > self.durable or bool(self._direct)

    async def finish(self) -> None:
        """Deliver everything queued, make it durable, and stop the worker.

        Raises the target's error if delivery failed (the trace then ends with that error).
        """
        self._closing = True
        self._durable_wanted = max(self._durable_wanted, self.queued)
        self.resume()
        self._wakeup.set()
        if self._task is not None:
            # wait() rather than the task itself: a worker cancelled by fail() must end this
            # with the failure, not with the worker's CancelledError
            await asyncio.wait({self._task})
        self._raise_if_failed()

    def fail(self, exc: BaseException) -> None:
        """End delivery now with ``exc``, as if the target had raised it: every waiter fails,
        the queue is dropped (reported, through ``on_failure``), and a worker stuck inside
        the target is cancelled.  For a target that stopped answering (shutdown gives up)."""
        self._fail(exc)
        if self._task is not None and not self._task.done():
            self._task.cancel()

    async def abort(self) -> None:
        """Stop the worker without delivering what is queued (after a failure)."""
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    # -- the worker --------------------------------------------------------------------------

    async def _run(self) -> None:
        try:
            while True:
                await self._resumed.wait()
                wanted = self._durable_wanted
                if wanted > self.durable and self.held >= wanted:
                    # one fsync for every FUA/FLUSH waiting: group commit
                    await self.target.make_durable()
                    self._set_durable(self.held)
                elif self._queue:
                    await self._deliver_batch()
                elif self._closing and not self._direct:
                    return
                else:
                    self._wakeup.clear()
                    await self._wakeup.wait()
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # the target failed: fail everyone waiting, report
            log.warning("trace target %s failed: %s", self.target.name, exc)
            self._fail(exc)

    async def _deliver_batch(self) -> None:
        queue = self._queue
        if len(queue) <= MAX_BATCH_RECORDS and self.queued_bytes <= MAX_BATCH_BYTES:
            batch = list(queue)  # the common case: take everything, no per-record work
            queue.clear()
            cost = self.queued_bytes
            nbytes = cost - RECORD_OVERHEAD * len(batch)
        else:
            batch = []
            nbytes = 0
            while queue and len(batch) < MAX_BATCH_RECORDS:
                data = queue[0].data
                n = len(data) if data is not None else 0
                if batch and nbytes + n > MAX_BATCH_BYTES:
                    break
                batch.append(queue.popleft())
                nbytes += n
            cost = nbytes + RECORD_OVERHEAD * len(batch)
        try:
            await self.target.deliver(batch)
        except BaseException:
            # keep the accounting honest: the batch is neither held nor queued any more
            self.queued_bytes -= cost
            raise
        self.queued_bytes -= cost
        self.bytes_delivered += nbytes
        self.held += len(batch)
        _wake_upto(self._held_waiters, self.held)
        self._grant_space()

    def _set_durable(self, position: int) -> None:
        self.durable = position
        _wake_upto(self._durable_waiters, position)

    def _grant_space(self) -> None:
        while self._space_waiters:
            nbytes, fut = self._space_waiters[0]
            total = self.queued_bytes + self._reserved
            if total and total + nbytes > self.queue_size:
                return
            self._space_waiters.popleft()
            if not fut.done():
                self._reserved += nbytes
                fut.set_result(None)

    def _fail(self, exc: BaseException) -> None:
        if self.error is not None:
            return
        self.error = exc
        err = _as_target_error(self.target, exc)
        for heap in (self._held_waiters, self._durable_waiters):
            for _, _, fut in heap:
                if not fut.done():
                    fut.set_exception(err)
            heap.clear()
        while self._space_waiters:
            _, fut = self._space_waiters.popleft()
            if not fut.done():
                fut.set_exception(err)
        # dropping queued records is not silent: the trace records this error as its end
        self._queue.clear()
        self.queued_bytes = 0
        self._on_failure(exc)


def _wake_upto(heap: list[tuple[int, int, asyncio.Future[None]]], position: int) -> None:
    while heap and heap[0][0] <= position:
        _, _, fut = heapq.heappop(heap)
        if not fut.done():
            fut.set_result(None)


def _as_target_error(target: Target, exc: BaseException) -> BlocktraceError:
    if isinstance(exc, TargetError):
        return exc
    if isinstance(exc, OSError):
        err = TargetError(target.name, exc.strerror or str(exc))
    else:
        err = TargetError(target.name, str(exc) or type(exc).__name__)
    err.__cause__ = exc
    return err
