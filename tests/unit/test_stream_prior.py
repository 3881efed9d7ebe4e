"""PriorContents: a live image read as of the last record its consumer processed.

The producer protocol is the trace filter's (capture, change the file, record); the reference
is the base image with the processed records applied in memory.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

from blocktrace.stream.prior import GRANULE, PriorContents
from blocktrace.stream.records import Record, RecordKind

SIZE = 64 * 1024


class Producer:
    """The trace filter's side: save, change the image, number and queue the record."""

    def __init__(self, path: Path, prior: PriorContents) -> None:
        self.fd = os.open(path, os.O_RDWR)
        self.prior = prior
        self.seq = 0
        self.queue: list[Record] = []

    def write(self, offset: int, data: bytes) -> None:
        cap = self.prior.capture(offset, len(data))
        os.pwrite(self.fd, data, offset)
        self.seq += 1
        self.queue.append(Record(self.seq, RecordKind.WRITE, offset, len(data), data=data))
        self.prior.recorded(cap, self.seq)

    def zero(self, offset: int, length: int) -> None:
        cap = self.prior.capture(offset, length)
        os.pwrite(self.fd, bytes(length), offset)
        self.seq += 1
        self.queue.append(Record(self.seq, RecordKind.ZERO, offset, length))
        self.prior.recorded(cap, self.seq)

    def close(self) -> None:
        os.close(self.fd)


def image(tmp_path: Path) -> tuple[Path, bytearray]:
    path = tmp_path / "disk.img"
    base = bytearray(random.Random(1).randbytes(SIZE))
    path.write_bytes(base)
    return path, base


def test_reads_are_as_of_the_processed_record_and_copies_are_freed(tmp_path: Path) -> None:
    path, base = image(tmp_path)
    prior = PriorContents(path)
    prod = Producer(path, prior)
    prod.write(0, b"B" * 8192)
    prod.write(4096 + 100, b"C" * 512)  # partial granule, already saved
    assert prior.pread(0, 8192) == bytes(base[:8192]), "the future is visible"
    prior.advance(prod.queue[0])
    assert prior.pread(0, 8192) == b"B" * 8192
    prior.advance(prod.queue[1])
    assert prior.pread(4096, 4096) == b"B" * 100 + b"C" * 512 + b"B" * (4096 - 612)
    assert prior.bytes == 0, "copies outlived the records that needed them"
    assert prior.peak_bytes == 2 * GRANULE
    prod.close()
    prior.close()


def test_over_the_bound_reads_are_reported_stale(tmp_path: Path) -> None:
    path, _ = image(tmp_path)
    prior = PriorContents(path, max_bytes=GRANULE)
    prod = Producer(path, prior)
    prod.zero(0, 4 * GRANULE)  # 4 granules: over the bound, lost
    prod.write(8192, b"x" * 4096)  # on lost bytes: lost too (the image is ahead there)
    assert prior.bytes == 0 and prior.lost_granules == 4
    assert prior.pread(GRANULE, 100) == bytes(100)  # the image as it is now...
    assert prior.take_stale() == [(GRANULE, GRANULE)]  # ...and said so
    assert prior.take_stale() == []
    prior.advance(prod.queue[0])
    assert prior.pread(2 * GRANULE, 10) == b"x" * 10  # still ahead: the write is queued
    assert prior.take_stale() == [(2 * GRANULE, GRANULE)]
    for rec in prod.queue:
        prior.advance(rec)
    assert prior.pread(0, 3 * GRANULE) == bytes(8192) + b"x" * 4096
    assert prior.take_stale() == [], "lost ranges outlived their records"
    prod.close()
    prior.close()


def test_a_wide_operation_over_the_bound_is_one_range(tmp_path: Path, monkeypatch: Any) -> None:
    """An operation over more than WIDE granules (a TRIM of a whole disk) costs one range,
    not an entry per granule; its granules read as stale until its record is processed."""
    from blocktrace.stream import prior as prior_module

    monkeypatch.setattr(prior_module, "WIDE", 4)
    path, base = image(tmp_path)
    prior = PriorContents(path, max_bytes=2 * GRANULE)
    prod = Producer(path, prior)
    prod.write(GRANULE, b"a" * 10)  # saved: one granule
    prod.zero(0, 8 * GRANULE)  # wide and over the bound
    assert prior.bytes == GRANULE and len(prior._saved) == 1 and prior.lost_granules == 8
    assert prior.pread(GRANULE, 4) == bytes(base[GRANULE : GRANULE + 4])
    assert prior.take_stale() == []  # the saved granule is exact...
    prior.pread(3 * GRANULE, 1)
    assert prior.take_stale() == [(3 * GRANULE, GRANULE)]  # ...the others are not
    prod.write(5 * GRANULE, b"b")  # inside the wide range: lost as well
    for rec in prod.queue:
        prior.advance(rec)
    assert prior.pread(0, 8 * GRANULE) == path.read_bytes()[: 8 * GRANULE]
    assert prior.take_stale() == [] and prior.bytes == 0 and not prior._saved
    prod.close()
    prior.close()


def test_random_interleavings_read_exactly_the_processed_image(tmp_path: Path) -> None:
    """Writes and zeroes of any alignment, the consumer lagging by a random amount: every
    read equals the base with exactly the processed records applied."""
    rng = random.Random(7)
    path, base = image(tmp_path)
    prior = PriorContents(path)
    prod = Producer(path, prior)
    ref = bytearray(base)
    done = 0
    for _ in range(3000):
        if rng.random() < 0.6:
            off = rng.randrange(SIZE - 1)
            n = rng.randint(1, min(3 * GRANULE, SIZE - off))
            if rng.random() < 0.8:
                prod.write(off, rng.randbytes(n))
            else:
                prod.zero(off, n)
        if rng.random() < 0.5 and done < len(prod.queue):
            for rec in prod.queue[done : done + rng.randint(1, 3)]:
                end = rec.offset + rec.length
                ref[rec.offset : end] = rec.data if rec.data is not None else bytes(rec.length)
                prior.advance(rec)
                done += 1
        off = rng.randrange(SIZE - 1)
        n = rng.randint(1, min(2 * GRANULE, SIZE - off))
        assert prior.pread(off, n) == bytes(ref[off : off + n])
    for rec in prod.queue[done:]:
        prior.advance(rec)
    assert prior.bytes == 0 and prior.take_stale() == []
    assert prior.pread(0, SIZE) == path.read_bytes()
    prod.close()
    prior.close()
