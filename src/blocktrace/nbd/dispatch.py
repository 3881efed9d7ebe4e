"""How :mod:`.connection` hands requests to the device: driving a device coroutine by hand,
WRITE payload buffers a device may keep, BLOCK_STATUS in growing windows.

The first two exist to spare work per request, measured in ``docs/nbd-server.md`` and
``docs/trace.md`` (PERFORMANCE):

* :class:`Resume` continues a coroutine the connection started with ``coro.send(None)``
  inside a Task, only for requests that suspend: no Task per request otherwise.
* :func:`owned_payload` gives a large WRITE payload a fresh ``bytes`` object that the event
  loop receives into directly.  A device that keeps payloads (a traced export: the trace filter
  turns each write into a record holding its data) gets that object itself, immutable from then
  on, and keeps it without copying; copying a 1 MiB payload out of a reusable buffer was one
  of the largest costs of a traced large write (a pass over cold memory on the loop).
"""

from __future__ import annotations

import ctypes
from collections.abc import Coroutine, Generator
from typing import Any

from blocktrace.block.device import BlockDevice, Extent

#: BLOCK_STATUS: first window asked of the device with REQ_ONE, and the cap without it.
_STATUS_WINDOW = 64 * 1024 * 1024
_STATUS_MAX = 1024 * 1024 * 1024
_new_bytes = ctypes.pythonapi.PyBytes_FromStringAndSize
_new_bytes.restype = ctypes.py_object
_new_bytes.argtypes = (ctypes.c_void_p, ctypes.c_ssize_t)
_view_of_memory = ctypes.pythonapi.PyMemoryView_FromMemory
_view_of_memory.restype = ctypes.py_object
_view_of_memory.argtypes = (ctypes.c_void_p, ctypes.c_ssize_t, ctypes.c_int)
_PyBUF_WRITE = 0x200
#: offset of a bytes object's data from its address (CPython's ``PyBytesObject.ob_sval``)
_BYTES_DATA = bytes.__basicsize__ - 1


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


def owned_payload(length: int) -> tuple[bytes, memoryview]:
    """A new ``bytes`` object of ``length`` bytes and a writable view of its memory.

    The object's content is undefined until the caller has filled all of it through the view
    (``PyBytes_FromStringAndSize(NULL, n)``: no zero-fill, which cost a pass over the memory).
    Only the caller knows the object until it is filled and handed on; from then on nobody
    writes it (the view must be dropped), so it is as immutable as any ``bytes``.  The view
    does not keep the object alive: the caller holds both.  A fresh
    object is never shared and its hash is not computed before it is handed on.  Callers
    check :data:`OWNED_PAYLOADS` first.
    """
    obj: bytes = _new_bytes(None, length)
    # a view of raw memory: no ctypes array type per length (ctypes caches those forever)
    view: memoryview = _view_of_memory(id(obj) + _BYTES_DATA, length, _PyBUF_WRITE)
    return obj, view


def _works() -> bool:
    """Check the layout assumption once: writing through the view changes the object."""
    try:
        obj, view = owned_payload(4096)
        view[:] = bytes(range(256)) * 16
        return obj == bytes(range(256)) * 16
    except (TypeError, ValueError, AttributeError):  # pragma: no cover - not CPython
        return False


#: the interpreter stores bytes the way :func:`owned_payload` assumes (CPython)
OWNED_PAYLOADS = _works()


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
