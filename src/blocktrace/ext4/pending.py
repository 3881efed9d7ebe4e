"""Pending data: blocks written before any structure owned them (data before its metadata).

With delayed allocation ext4 writes a file's data to freshly allocated blocks *before* the
transaction that records the extent commits, so the write hits a block the model does not own
yet.  :class:`PendingData` remembers such blocks (the record that wrote each, and its contents
within a byte cap) until an extent claims them (:meth:`PendingData.claim`: the file's ``write``
event then names the earlier record) or the block turns out to be metadata (the engine adopts
the contents into its view).

Policy (bounded memory, whatever the guest writes): at most ``max_blocks`` blocks (about 100
bytes of bookkeeping each), the oldest forgotten beyond that (``pending_overflow``); contents
kept within ``max_bytes``, oldest dropped first (``pending_data_dropped``).  Blocks written as
zeroes (WRITE_ZEROES) are pending with no contents kept: :data:`ZEROED`, read as zeroes.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from itertools import repeat
from typing import Protocol, cast

#: the pending contents of a block written as zeroes: nothing kept, it reads as zeroes
ZEROED = b""


class PendingStats(Protocol):
    """The counters :class:`PendingData` keeps current (the engine's ``EngineStats``)."""

    pending_blocks: int
    pending_bytes: int
    pending_overflow: int
    pending_data_dropped: int
    attributed: int


class PendingData:
    """Unowned blocks written so far, in write order (oldest first)."""

    def __init__(
        self,
        stats: PendingStats,
        block_size: int,
        max_blocks: int,
        max_bytes: int,
        block_bytes: Callable[[int, int, memoryview], bytes],
    ) -> None:
        """``block_bytes(b, offset, mv)``: block ``b`` as a write of ``mv`` at byte
        ``offset`` leaves it (the view's bytes around a partial write)."""
        self.stats = stats
        self.block_size = block_size
        self.max_blocks = max_blocks
        self.max_bytes = max_bytes
        self.block_bytes = block_bytes
        self.blocks: OrderedDict[int, int] = OrderedDict()  #: block -> record that wrote it
        self.data: OrderedDict[int, bytes] = OrderedDict()  #: block -> contents (or ZEROED)
        self.nbytes = 0

    def contents(self, b: int) -> bytes | None:
        """What pending block ``b`` holds (None: not pending, or its contents were dropped)."""
        data = self.data.get(b)
        if data is None:
            return None
        return data or bytes(self.block_size)

    def run(self, start: int, end: int, record: int, offset: int, mv: memoryview) -> None:
        """Remember blocks ``[start, end)`` as pending (the bulk-data path: data written before
        its extent is committed).  Policy per block, in order: a rewrite moves to the newest
        end; contents kept within ``max_pending_bytes`` (oldest dropped); at most
        ``max_pending`` blocks (oldest forgotten with their contents).

        Fast path, for whole blocks none of which is pending yet and when the block count cap
        does not bind: insert the run at once, then drop the oldest contents over the byte cap;
        the result and the counters are those of the per-block loop (tested against it)."""
        bs = self.block_size
        lo = start * bs - offset
        count = end - start
        pending, pending_data = self.blocks, self.data
        if (
            lo >= 0
            and lo + count * bs <= len(mv)
            and len(pending) + count <= self.max_blocks
            and (not pending or pending.keys().isdisjoint(range(start, end)))
            and (not pending_data or pending_data.keys().isdisjoint(range(start, end)))
        ):
            blocks = range(start, end)
            pending.update(dict.fromkeys(blocks, record))
            if self.max_bytes >= bs:
                pending_data.update(
                    zip(
                        blocks,
                        [mv[i : i + bs].tobytes() for i in range(lo, lo + count * bs, bs)],
                        strict=True,
                    )
                )
                self.nbytes += count * bs
                while self.nbytes > self.max_bytes:
                    _, dropped = pending_data.popitem(last=False)
                    self.nbytes -= len(dropped)
                    self.stats.pending_data_dropped += 1
            self.stats.pending_blocks = len(pending)
            self.stats.pending_bytes = self.nbytes
            return
        self.per_block(start, end, record, offset, mv)

    def per_block(self, start: int, end: int, record: int, offset: int, mv: memoryview) -> None:
        """:meth:`run`, block by block (the reference the fast path must match)."""
        bs = self.block_size
        pending, pending_data, stats = self.blocks, self.data, self.stats
        max_pending, max_bytes = self.max_blocks, self.max_bytes
        pending_bytes = self.nbytes
        n = len(mv)
        for b in range(start, end):
            lo = b * bs - offset
            block = mv[lo : lo + bs].tobytes() if lo >= 0 and lo + bs <= n else None
            if block is None:
                block = self.block_bytes(b, offset, mv)
            pending.pop(b, None)  # a rewrite moves to the end, as move_to_end would
            pending[b] = record
            old = pending_data.pop(b, None)
            if old is not None:
                pending_bytes -= len(old)
            size = len(block)
            if max_bytes >= size:
                pending_data[b] = block
                pending_bytes += size
                while pending_bytes > max_bytes:
                    _, dropped = pending_data.popitem(last=False)
                    pending_bytes -= len(dropped)
                    stats.pending_data_dropped += 1
            while len(pending) > max_pending:
                gone, _ = pending.popitem(last=False)
                dropped_data = pending_data.pop(gone, None)
                if dropped_data is not None:
                    pending_bytes -= len(dropped_data)
                stats.pending_overflow += 1
        self.nbytes = pending_bytes
        stats.pending_blocks = len(pending)
        stats.pending_bytes = pending_bytes

    def zeroed(self, start: int, end: int, record: int) -> None:
        """Blocks ``[start, end)`` of free space written as zeroes: pending like written ones,
        with no contents kept (they read as zeroes).  Only the newest ``max_pending`` of a
        larger range are remembered (the older ones would be forgotten at once anyway)."""
        if end - start > self.max_blocks:
            self.stats.pending_overflow += end - self.max_blocks - start
            start = end - self.max_blocks
        self.forget_range(start, end)  # a rewrite moves to the newest end
        pending = self.blocks
        blocks = range(start, end)
        pending.update(dict.fromkeys(blocks, record))
        self.data.update(dict.fromkeys(blocks, ZEROED))
        while len(pending) > self.max_blocks:
            gone, _ = pending.popitem(last=False)
            dropped = self.data.pop(gone, None)
            if dropped is not None:
                self.nbytes -= len(dropped)
            self.stats.pending_overflow += 1
        self.stats.pending_blocks = len(pending)
        self.stats.pending_bytes = self.nbytes

    def claim(self, pblk: int, n: int) -> list[tuple[int, int, int]]:
        """Unpend blocks ``[pblk, pblk+n)``: the runs ``(i, j, first_record)`` of offsets into
        the range that were pending (``first_record``: the earliest record of the run)."""
        pending = self.blocks
        runs: list[tuple[int, int, int]] = []
        if not pending or n <= 0:
            return runs
        pop, data_pop = pending.pop, self.data.pop
        blocks = range(pblk, pblk + n)
        recs = list(map(pop, blocks, repeat(None, n)))
        if None not in recs:  # the common case (all pending: one run), in C-level loops
            gone = filter(None, map(data_pop, blocks, repeat(None, n)))
            self.nbytes -= sum(map(len, gone))
            self.stats.attributed += n
            self.stats.pending_blocks = len(pending)
            self.stats.pending_bytes = self.nbytes
            return [(0, n, min(cast("list[int]", recs)))]
        start = -1
        first_rec = 0
        claimed = 0
        for i, rec in enumerate(recs):
            if rec is None:
                if start >= 0:
                    runs.append((start, i, first_rec))
                    start = -1
                continue
            claimed += 1
            data = data_pop(pblk + i, None)
            if data is not None:
                self.nbytes -= len(data)
            if start < 0:
                start, first_rec = i, rec
            elif rec < first_rec:
                first_rec = rec
        if start >= 0:
            runs.append((start, n, first_rec))
        if claimed:
            self.stats.attributed += claimed
            self.stats.pending_blocks = len(pending)
            self.stats.pending_bytes = self.nbytes
        return runs

    def forget(self, b: int) -> int | None:
        record = self.blocks.pop(b, None)
        if record is not None:
            data = self.data.pop(b, None)
            if data is not None:
                self.nbytes -= len(data)
            self.stats.pending_blocks = len(self.blocks)
            self.stats.pending_bytes = self.nbytes
        return record

    def forget_range(self, start: int, end: int) -> None:
        """Forget pending blocks in ``[start, end)`` (cheap for huge ranges, e.g. a discard of
        the whole disk: it walks whichever is smaller, the range or the pending set)."""
        if not self.blocks:
            return
        if end - start > len(self.blocks):
            for b in [b for b in self.blocks if start <= b < end]:
                self.forget(b)
        else:
            for b in range(start, end):
                self.forget(b)
