"""In-flight range table: one order for overlapping requests.

Needed only under a child device that can suspend *before* it has applied an operation (a
remote NBD device): there, two overlapping writes could be applied in one order and recorded
in the other.  Holding a range from before the child is called until the record is emitted
makes overlapping operations strictly sequential, so image order == stream order; requests
on disjoint ranges never wait for each other (as QEMU's mirror does in
``active_write_prepare``).

Local backends (raw files, memory) apply an operation before their coroutine first suspends,
so the trace filter skips this table for them entirely and the hot path stays a few
attribute lookups.

The table is a plain list: it holds only requests currently inside a suspending child, a few
dozen at most, and a scan beats any tree at that size.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager


class RangeLock:
    """Mutual exclusion between overlapping byte ranges ``[start, end)``; FIFO among waiters.

    A waiter that overlaps an *earlier waiter* waits behind it too, so a stream of small
    writes cannot starve a large one.
    """

    def __init__(self) -> None:
        # (start, end, future set when released); held and waiting entries alike, FIFO
        self._entries: list[tuple[int, int, asyncio.Future[None]]] = []

    def __len__(self) -> int:
        return len(self._entries)

    @asynccontextmanager
    async def hold(self, start: int, end: int) -> AsyncIterator[None]:
        """Hold ``[start, end)`` for the body; waits for every earlier overlapping entry."""
        loop = asyncio.get_running_loop()
        blockers = [f for s, e, f in self._entries if s < end and start < e]
        mine: asyncio.Future[None] = loop.create_future()
        entry = (start, end, mine)
        self._entries.append(entry)
        try:
            for fut in blockers:
                if not fut.done():
                    await asyncio.shield(fut)
            yield
        finally:
            self._entries.remove(entry)
            if not mine.done():
                mine.set_result(None)
