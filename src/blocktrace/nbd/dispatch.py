"""How :mod:`.connection` hands requests to the device: driving a device coroutine by hand,
WRITE payload buffers allocated as the payload arrives, BLOCK_STATUS in growing windows.

The first two exist to spare work per request, measured in ``docs/nbd-server.md`` and
``docs/trace.md`` (PERFORMANCE):

* :class:`Resume` continues a coroutine the connection started with ``coro.send(None)``
  inside a Task, only for requests that suspend: no Task per request otherwise.
* :class:`PayloadBuffer` receives a large WRITE payload directly from the event loop.  A
  device that keeps payloads (a traced export: the trace filter turns each write into a record
  holding its data) gets an immutable ``bytes`` it keeps without copying; copying a 1 MiB
  payload out of a reusable buffer was one of the largest costs of a traced large write (a
  pass over cold memory on the loop).
"""

from __future__ import annotations

import io
from collections.abc import Coroutine, Generator
from typing import Any

from blocktrace.block.device import BlockDevice, Extent

#: BLOCK_STATUS: first window asked of the device with REQ_ONE, and the cap without it.
_STATUS_WINDOW = 64 * 1024 * 1024
_STATUS_MAX = 1024 * 1024 * 1024
#: A large payload's buffer starts at this size (or the payload's) and doubles as it fills.
GROW_STEP = 1024 * 1024


class Resume:
    """Awaitable continuing a coroutine that already ran up to its first suspension.

    The coroutine yielded ``fut`` to nobody (we drove it by hand); yielding that same future up
    to the Task now awaiting us makes the Task wait on it and resume us, and we resume the
    coroutine: exactly the steps the Task would have taken had it run the coroutine itself.
    """

    __slots__ = ("coro", "fut")

    def __init__(self, coro: Coroutine[Any, Any, Any], fut: Any) -> None:
        self.coro = coro
        self.fut = fut

    def __await__(self) -> Generator[Any, None, Any]:
        coro, fut = self.coro, self.fut
        while True:
            try:
                yield fut
            except BaseException as exc:  # cancellation and friends go to the coroutine
                try:
                    fut = coro.throw(exc)
                except StopIteration as stop:
                    return stop.value
            else:
                try:
                    fut = coro.send(None)
                except StopIteration as stop:
                    return stop.value


class PayloadBuffer:
    """The buffer one large WRITE payload is received into, allocated as its bytes arrive.

    The header's claim is never allocated up front (a 28-byte header announcing 32 MiB must
    not cost 32 MiB): the buffer starts at :data:`GROW_STEP` (or the payload's length, if
    smaller) and doubles when full, so it holds at most twice the bytes received, or one step.
    The event loop receives straight into it (:meth:`space`); :meth:`take` hands the payload
    to the device.

    Two kinds, by what the device does with the data:

    * ``owned`` (the device keeps payloads, a traced export): an ``io.BytesIO`` whose
      :meth:`~io.BytesIO.getbuffer` view is the receive target and whose
      :meth:`~io.BytesIO.getvalue` then yields an immutable ``bytes`` the device keeps.  Both
      are documented behaviour on every interpreter; on CPython ``getvalue`` returns the
      buffer itself, without a copy, once no view of it is left (uvloop drops its view before
      ``buffer_updated``; the stock loop still holds one there, and CPython then copies).
      This replaced writing into a fresh ``bytes`` through ctypes, which relied on CPython's
      object layout (issue 11).
    * otherwise a ``bytearray``, possibly a connection's spare one, reused request after
      request (the device is done with the data when ``write`` returns); :meth:`take` gives
      a view of it.
    """

    __slots__ = ("_bio", "_cap", "_store", "_view", "filled", "length")

    def __init__(self, length: int, *, owned: bool, spare: bytearray | None = None) -> None:
        self.length = length
        self.filled = 0
        self._bio: io.BytesIO | None = io.BytesIO() if owned else None
        self._store: bytearray | None = None
        self._view: memoryview | None = None
        self._cap = 0
        if not owned and spare is not None and len(spare) >= length:
            self._store = spare
            self._cap = length
            self._view = memoryview(spare)

    @property
    def capacity(self) -> int:
        """Bytes allocated so far (what the server's accounting reports)."""
        return self._cap

    @property
    def complete(self) -> bool:
        return self.filled == self.length

    def space(self) -> memoryview:
        """Writable view of where the next payload bytes go (never empty before completion)."""
        if self.filled == self._cap:
            self._grow(min(self.length, max(GROW_STEP, 2 * self._cap)))
        assert self._view is not None
        return self._view[self.filled : self._cap]

    def fill(self, data: memoryview) -> None:
        """Copy bytes that arrived with the header (at most the receive buffer's size)."""
        while data:
            room = self.space()
            n = min(len(room), len(data))
            room[:n] = data[:n]
            self.filled += n
            data = data[n:]

    def _grow(self, cap: int) -> None:
        self._view = None  # no view of ours may pin the old memory while it is resized
        bio = self._bio
        if bio is not None:
            try:
                bio.seek(cap - 1)
                bio.write(b"\0")
            except BufferError:  # someone still holds a view: grow a copy instead
                old = bio.getvalue()
                bio = self._bio = io.BytesIO()
                bio.write(old)
                bio.seek(cap - 1)
                bio.write(b"\0")
            self._view = bio.getbuffer()
        else:
            store = self._store
            if store is None:
                store = self._store = bytearray(cap)
            else:
                try:
                    store.extend(bytes(cap - len(store)))
                except BufferError:
                    grown = bytearray(cap)
                    grown[: self.filled] = memoryview(store)[: self.filled]
                    store = self._store = grown
            self._view = memoryview(store)
        self._cap = cap

    def take(self) -> bytes | memoryview:
        """The complete payload: a ``bytes`` nobody else holds (owned), or a view of the
        reusable buffer (valid until the device's ``write`` returns)."""
        assert self.complete
        view, self._view = self._view, None
        if self._bio is not None:
            del view  # the last view of ours: getvalue() can hand over the buffer itself
            data = self._bio.getvalue()
            self._bio = None
            return data
        assert self._store is not None and view is not None
        return view[: self.length]

    def reusable(self) -> bytearray | None:
        """The ``bytearray`` to keep as a connection's spare, if this was one."""
        return self._store


async def block_status(
    device: BlockDevice, offset: int, length: int, req_one: bool
) -> list[Extent]:
    """Ask the device about a window, not the whole (up to 4 GiB) request: mapping a
    fragmented file costs per extent, and QEMU asks with REQ_ONE for one extent at a time
    over the rest of the disk, which would make a full map quadratic.  The window grows
    while one extent fills it; the spec lets a reply describe a prefix of the range."""
    window = min(length, _STATUS_WINDOW if req_one else _STATUS_MAX)
    while True:
        extents = await device.block_status(offset, window)
        if window >= length or len(extents) != 1 or extents[0].length < window:
            return extents
        window = min(length, window * 4)
