"""The writer's batch fast path (``LogWriter.append_writes``, used by the trace log target)
writes byte-for-byte the log that one ``write`` call per entry writes: same headers, trailers,
CRCs and layout, with O_DIRECT and buffered, with and without checksums, with libdeflate's
CRC and with zlib's, whatever the batch boundaries and write-out points."""

from __future__ import annotations

import errno
import random
from pathlib import Path

import pytest

from blocktrace.logwrites import writer as writer_mod
from blocktrace.logwrites.reader import LogReader
from blocktrace.logwrites.writer import DIRECT_THRESHOLD, LogWriter


def _entries(rng: random.Random, sector: int, n: int) -> list[tuple[int, int, bytes]]:
    sizes = [sector, 4096, 4096, 8192, 65536, DIRECT_THRESHOLD, 1 << 20]
    out = []
    for _ in range(n):
        size = max(sector, rng.choice(sizes) // sector * sector)
        out.append((rng.choice([0, 2]), rng.randrange(4096) * sector, rng.randbytes(size)))
    return out


@pytest.mark.parametrize("sector", [512, 4096])
@pytest.mark.parametrize("direct", [True, False])
@pytest.mark.parametrize("checksums", [True, False])
@pytest.mark.parametrize("fast_crc", [True, False])
def test_append_writes_equals_one_write_per_entry(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    sector: int,
    direct: bool,
    checksums: bool,
    fast_crc: bool,
) -> None:
    if fast_crc and writer_mod._fast_crc32 is None:
        pytest.skip("libdeflate (libdeflate.so.0) is not installed")
    if not fast_crc:
        monkeypatch.setattr(writer_mod, "_fast_crc32", None)
    rng = random.Random(sector + direct * 2 + checksums * 4 + fast_crc * 8)
    entries = _entries(rng, sector, 120)
    # one batch over the packing buffer's size (8 MiB): the overflow buffer path
    entries += [(0, i * 65536, rng.randbytes(65536)) for i in range(140)]
    ref = LogWriter.create(tmp_path / "ref", sector_size=sector, checksums=checksums)
    fast = LogWriter.create(
        tmp_path / "fast", sector_size=sector, checksums=checksums, direct=direct
    )
    fast.log_id = ref.log_id
    for flags, offset, data in entries:
        ref.write(offset, data, fua=bool(flags & 2))
    head = entries[:-140]
    i = 0
    while i < len(head):
        k = rng.randrange(1, 30)
        assert fast.append_writes(head[i : i + k]) == min(i + k, len(head)) - 1
        i += k
        if rng.random() < 0.3:
            fast.write_out()
        if rng.random() < 0.1:
            fast.sync()
    fast.append_writes(entries[-140:])
    assert fast.nr_entries == len(entries)
    ref.close(end_mark=True)
    fast.close(end_mark=True)
    assert (tmp_path / "fast").read_bytes() == (tmp_path / "ref").read_bytes()
    with LogReader(tmp_path / "fast") as r:
        got = [(e.target_offset, e.read_data()) for e in r.entries() if e.nr_sectors]
        assert r.tail().state == "clean"
    assert got == [(offset, data) for _, offset, data in entries]


def test_append_writes_refuses_bad_entries_and_appends_nothing(tmp_path: Path) -> None:
    w = LogWriter.create(tmp_path / "log")
    good = (0, 0, b"x" * 512)
    for bad in [(0, 100, b"x" * 512), (0, 0, b"x" * 100), (0, 0, b""), (4, 0, b"x" * 512)]:
        with pytest.raises(ValueError):
            w.append_writes([good, bad])
    assert w.nr_entries == 0 and w.pending_bytes == 0
    w.close()


@pytest.mark.parametrize("direct", [True, False])
def test_log_target_large_batches_keep_order_and_bytes(tmp_path: Path, direct: bool) -> None:
    """A batch bigger than the packing buffer (packed and written out in a thread, in
    several write-outs) and small ones (packed on the loop) give the entries in stream
    order, each with its data, FUA, flush and mark entries in place."""
    import asyncio

    from blocktrace.stream.contract import TargetInfo
    from blocktrace.stream.records import Record, RecordKind
    from blocktrace.targets.logwrites import LogTarget

    rng = random.Random(7)
    records: list[Record] = []
    for seq in range(1, 3001):
        if seq % 500 == 0:
            records.append(Record(seq, RecordKind.FLUSH))
        elif seq % 777 == 0:
            records.append(Record(seq, RecordKind.MARK, name=f"m{seq}"))
        else:
            size = rng.choice([4096, 4096, 8192, 512 * 1024])
            off = rng.randrange(256) * 4096
            data = rng.randbytes(size)
            records.append(Record(seq, RecordKind.WRITE, off, size, seq % 3 == 0, data))

    async def main() -> None:
        target = LogTarget(str(tmp_path / "t.log"), direct=direct)
        await target.open(TargetInfo("disk", 1 << 30, 512))
        await target.deliver(records[:2500])  # > 8 MiB: the thread path
        for i in range(2500, 3000, 7):  # small batches: packed on the loop
            await target.deliver(records[i : i + 7])
        await target.make_durable()
        await target.close(clean=True)

    asyncio.run(main())
    with LogReader(tmp_path / "t.log") as r:
        entries = list(r.entries())
        assert r.tail().state == "clean"
        assert len(entries) == len(records) + 1  # + dm-log-writes-end
        for rec, e in zip(records, entries, strict=False):
            if rec.kind is RecordKind.WRITE:
                assert (e.target_offset, e.read_data()) == (rec.offset, rec.data)
                assert bool(e.flags & 2) == rec.fua
            elif rec.kind is RecordKind.FLUSH:
                assert e.flags == 1
            else:
                assert e.flags == 8


@pytest.mark.parametrize("refuse_direct", [False, True])
def test_large_entries_crc_while_staging_equal_one_write_per_entry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, refuse_direct: bool
) -> None:
    """Large payloads under O_DIRECT get their CRC computed while they are staged (fileio's
    ``OpenHeader``): entries that fit the stage, one larger than the stage (sealed first) and
    a batch rewritten through the page cache after O_DIRECT is refused (sealed there) all give
    the bytes of one ``write`` per entry."""
    from blocktrace.logwrites import fileio

    rng = random.Random(11)
    entries = [
        (rng.choice([0, 2]), rng.randrange(64) * 1024 * 1024, rng.randbytes(size))
        for size in [1 << 20, DIRECT_THRESHOLD, 3 << 20, fileio.STAGE_BYTES + 4096, 1 << 20]
    ]
    ref = LogWriter.create(tmp_path / "ref", sector_size=512)
    fast = LogWriter.create(tmp_path / "fast", sector_size=512, direct=True)
    fast.log_id = ref.log_id
    if not fast.direct:
        pytest.skip("no O_DIRECT on this file system")
    if refuse_direct:
        calls: list[int] = []

        def refuse(self: fileio.LogFile, view: memoryview, pos: int) -> int:
            calls.append(pos)
            raise OSError(errno.EINVAL, "refused")

        monkeypatch.setattr(fileio.LogFile, "_direct_write", refuse)
    for flags, offset, data in entries:
        ref.write(offset, data, fua=bool(flags & 2))
    fast.append_writes(entries[:2])
    fast.write_out()
    fast.append_writes(entries[2:])
    fast.write_out()
    assert fast.direct is not refuse_direct
    ref.close(end_mark=True)
    fast.close(end_mark=True)
    assert (tmp_path / "fast").read_bytes() == (tmp_path / "ref").read_bytes()
