"""LogWriter: entry encoding, batching, durability accounting, tails, failures, threads."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from blocktrace.errors import StateError, UsageError
from blocktrace.logwrites.format import (
    REPLAY_LOG_MAX_ZERO_SIZE,
    ChecksumMismatch,
    ExtFlag,
    LogFlag,
    SuperBlock,
    TruncatedLog,
)
from blocktrace.logwrites.reader import LogReader
from blocktrace.logwrites.writer import DIRECT_THRESHOLD, LogWriter

MiB = 1024 * 1024


@pytest.fixture(params=[True, False], ids=["direct", "buffered"])
def direct(request: pytest.FixtureRequest) -> bool:
    return bool(request.param)


def _super(path: Path) -> SuperBlock:
    return SuperBlock.unpack(path.read_bytes()[:64])


def test_create_writes_an_empty_counted_super(tmp_path: Path) -> None:
    log = tmp_path / "log"
    log.write_bytes(b"old junk" * 1000)
    with pytest.raises(UsageError, match="refusing to overwrite it without force=on"):
        LogWriter.create(log, sector_size=4096)
    assert log.read_bytes() == b"old junk" * 1000  # untouched
    w = LogWriter.create(log, sector_size=4096, overwrite=True)
    assert log.stat().st_size == 4096
    sup = _super(log)
    assert (sup.nr_entries, sup.sector_size, sup.log_id) == (0, 4096, w.log_id)
    w.close()


def test_entries_positions_and_payloads(tmp_path: Path, direct: bool) -> None:
    log = tmp_path / "log"
    with LogWriter.create(log, direct=direct) as w:
        if direct and not w.direct:
            pytest.skip("the test file system lacks O_DIRECT")
        assert w.direct == direct
        assert w.mark("start") == 0
        assert w.write(1024, b"\xab" * 1024, fua=True) == 1
        assert w.flush() == 2
        assert w.discard(4096, 8192) == 3
        assert w.write(0, bytearray(b"\x01" * 512), metadata=True) == 4
        assert w.write_zeroes(8192, 1024) == 5
    with LogReader(log) as r:
        entries = r.entry_list()
        assert [e.offset for e in entries] == [512, 1024, 2560, 3072, 3584, 4608]
        assert [e.flags for e in entries] == [8, 2, 1, 4, 0x10, 4]
        assert entries[0].mark == "start"
        assert (entries[1].sector, entries[1].nr_sectors) == (2, 2)
        assert entries[1].read_data() == b"\xab" * 1024
        assert entries[3].read_data() == b"" and entries[3].end_offset == 3584
        assert entries[5].is_zeroes and not entries[3].is_zeroes
        assert all(e.checksummed for e in entries)


def test_zeroes_as_data(tmp_path: Path) -> None:
    log = tmp_path / "log"
    with LogWriter.create(log, zeroes="data") as w:
        w.write_zeroes(0, 20 * MiB, fua=True)  # 8 MiB pieces
    with LogReader(log) as r:
        entries = r.entry_list()
        assert [e.length for e in entries] == [8 * MiB, 8 * MiB, 4 * MiB]
        assert [e.flags for e in entries] == [0, 0, LogFlag.FUA]
        assert [e.ends_record for e in entries] == [False, False, True]
        assert entries[2].read_data() == bytes(4 * MiB)


def test_big_discards_are_split_for_replay_log(tmp_path: Path) -> None:
    log = tmp_path / "log"
    with LogWriter.create(log) as w:
        w.write_zeroes(0, 300 * MiB, fua=True)
    with LogReader(log) as r:
        entries = r.entry_list()
    assert [e.length for e in entries] == [128 * MiB, 128 * MiB, 44 * MiB]
    assert all(e.length <= REPLAY_LOG_MAX_ZERO_SIZE for e in entries)
    assert [e.flags for e in entries] == [4, 4, 4 | 2]
    assert all(e.is_zeroes for e in entries)
    t = [e.header.trailer for e in entries]
    assert [bool(x and x.ext_flags & ExtFlag.SPLIT) for x in t] == [True, True, False]


def test_unaligned_and_invalid_requests(tmp_path: Path) -> None:
    with LogWriter.create(tmp_path / "log") as w:
        for call in (
            lambda: w.write(100, b"x" * 512),
            lambda: w.write(0, b"x" * 100),
            lambda: w.discard(0, 0),
            lambda: w.write(0, b""),
            lambda: w.mark("has space"),
            lambda: w.append(0, 0, 0),
        ):
            with pytest.raises(ValueError):
                call()
        assert w.nr_entries == 0


def test_buffer_may_be_reused_after_append(tmp_path: Path, direct: bool) -> None:
    log = tmp_path / "log"
    buf = bytearray(b"A" * 4096)
    big = bytearray(b"B" * DIRECT_THRESHOLD)
    with LogWriter.create(log, direct=direct) as w:
        w.write(0, buf)
        w.write(8192, memoryview(big))
        buf[:] = b"Z" * 4096
        big[:] = b"Y" * len(big)
    with LogReader(log) as r:
        a, b = r.entry_list()
        assert a.read_data() == b"A" * 4096 and b.read_data() == b"B" * DIRECT_THRESHOLD


def test_small_entries_are_batched(tmp_path: Path, direct: bool) -> None:
    with LogWriter.create(tmp_path / "log", direct=direct) as w:
        for i in range(500):
            w.write(i * 4096, b"x" * 4096)
        w.sync()
        assert w.stats.writes <= 3  # one pwritev per 4 MiB batch, not one per entry
        assert w.stats.entries == 500


def test_super_counts_only_synced_entries(tmp_path: Path, direct: bool) -> None:
    log = tmp_path / "log"
    w = LogWriter.create(log, direct=direct)
    w.write(0, b"1" * 512)
    w.flush()
    assert _super(log).nr_entries == 0
    assert w.sync() == 2 and w.durable_entries == 2
    assert _super(log).nr_entries == 2
    w.write(512, b"2" * DIRECT_THRESHOLD)  # written out now, but not counted
    assert w.nr_entries == 3 and w.durable_entries == 2
    with LogReader(log) as r:
        assert r.nr_entries == 2
        tail = r.tail()
    assert (tail.state, tail.entries, tail.verified) == ("uncounted", 1, True)
    w.close(sync=False)
    with pytest.raises(StateError):
        w.flush()


def test_reopen_cuts_uncounted_tail_and_continues(tmp_path: Path) -> None:
    log = tmp_path / "log"
    w = LogWriter.create(log)
    w.write(0, b"a" * 512)
    w.sync()
    w.write(512, b"b" * DIRECT_THRESHOLD)
    w.close(sync=False)
    w2 = LogWriter.open(log)
    assert w2.nr_entries == 1 and w2.log_id == w.log_id
    assert log.stat().st_size == 512 + 1024
    w2.write(1024, b"c" * 512)
    w2.close()
    with LogReader(log) as r:
        got = [(e.index, e.read_data()[:1]) for e in r.entries()]
        assert r.tail().state == "clean"
    assert got == [(0, b"a"), (1, b"c")]


def test_torn_tail_is_detected_and_salvage_stops_before_it(tmp_path: Path, direct: bool) -> None:
    log = tmp_path / "log"
    w = LogWriter.create(log, direct=direct)
    w.write(0, b"a" * 4096)
    w.sync()
    w.write(4096, b"b" * 4096)
    w.write(8192, b"c" * 4096)
    w.close(sync=False)
    size = log.stat().st_size
    os.truncate(log, size - 1000)  # the last entry's data is cut short
    with LogReader(log) as r:
        assert [e.index for e in r.entries()] == [0]
        tail = r.tail()
        assert (tail.state, tail.entries) == ("uncounted", 1)
        assert tail.torn_offset == 512 + 2 * (512 + 4096)
        assert [e.index for e in r.entries(salvage=True)] == [0, 1]
    # A flipped byte in the uncounted entry: not whole, so not salvaged.
    with open(log, "r+b") as f:
        f.seek(512 + (512 + 4096) + 512 + 10)
        f.write(b"X")
    with LogReader(log) as r:
        assert [e.index for e in r.entries(salvage=True)] == [0]
        assert r.tail().state == "torn"


def test_corruption_inside_the_count_names_entry_and_offset(tmp_path: Path) -> None:
    log = tmp_path / "log"
    with LogWriter.create(log) as w:
        for i in range(4):
            w.write(i * 4096, bytes([i]) * 4096)
    entry2 = 512 + 2 * (512 + 4096)
    with open(log, "r+b") as f:
        f.seek(entry2 + 512 + 7)
        f.write(b"\xff")
    with LogReader(log) as r, pytest.raises(ChecksumMismatch) as info:
        list(r.entries())
    assert (info.value.entry, info.value.offset) == (2, entry2)
    assert f"entry 2 at byte {entry2}" in str(info.value)
    with LogReader(log) as r:
        assert [e.index for e in r.entries(salvage=True)] == [0, 1]
        assert isinstance(r.salvage_error, ChecksumMismatch)
    os.truncate(log, entry2 + 100)
    with LogReader(log) as r, pytest.raises(TruncatedLog) as tinfo:
        list(r.entries())
    assert (tinfo.value.entry, tinfo.value.offset) == (2, entry2)


def test_concurrent_appends_and_syncs(tmp_path: Path, direct: bool) -> None:
    log = tmp_path / "log"
    w = LogWriter.create(log, direct=direct)
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        try:
            for i in range(50):
                w.write((n * 50 + i) * 512, bytes([n]) * 512)
                if i % 10 == 9:
                    before = w.nr_entries
                    assert w.sync() >= before  # covers every entry appended before the call
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors
    assert w.durable_entries == 200
    w.close()
    with LogReader(log) as r:
        seen = sorted((e.sector, e.read_data()[0]) for e in r.entries())
    assert seen == [(k, k // 50) for k in range(200)]


def test_write_failure_is_sticky(tmp_path: Path) -> None:
    """A log that hits the file size limit fails with EFBIG and stays failed."""
    code = f"""
import resource, signal, errno
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
from blocktrace.logwrites.writer import LogWriter, LogWriteError
w = LogWriter.create({str(tmp_path / "log")!r})
w.write(0, b"a" * 4096); w.sync()
try:
    w.write(0, b"b" * (2 << 20))
except LogWriteError as e:
    assert e.errno == errno.EFBIG, e.errno
else:
    raise SystemExit("no error")
try:
    w.flush()
except LogWriteError:
    print("sticky")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "sticky"
    with LogReader(tmp_path / "log") as r:
        assert r.nr_entries == 1 and r.entry_list()[0].read_data() == b"a" * 4096
