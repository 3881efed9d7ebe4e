"""The reader accepts what the kernel writes (hand-built here from the kernel's rules).

These logs are assembled with plain ``struct`` calls following dm-log-writes.c, not with our
writer, so they are an independent encoding: garbage in super bytes 28..31, METADATA flags,
DAX-era inline data (``data_len`` on a data entry), a pre-4.15 mark that fills its sector with
no NUL, a 4 KiB sector size and the teardown mark ``dm-log-writes-end``.
"""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from blocktrace.logwrites.format import BadSuperBlock, CorruptEntry, LogFlag, TruncatedLog
from blocktrace.logwrites.reader import LogReader
from blocktrace.logwrites.replay import ReplayOptions, find, replay

MAGIC = 0x6A736677736872


def kernel_log(
    S: int, entries: list[tuple[int, int, int, bytes, bytes]], nr: int | None = None
) -> bytes:
    """entries: (sector, nr_sectors, flags, header_tail, data); header_tail goes at byte 24
    (``data_len`` + text)."""
    out = bytearray(struct.pack("<QQQI", MAGIC, 1, len(entries) if nr is None else nr, S))
    out += b"\xde\xad\xbe\xef"  # uninitialised stack bytes 28..31
    out += bytes(S - len(out))
    for sector, nr_sectors, flags, tail, data in entries:
        hdr = struct.pack("<QQQ", sector, nr_sectors, flags) + tail
        out += hdr + bytes(S - len(hdr))
        out += data
    return bytes(out)


def mark(text: bytes) -> tuple[int, int, int, bytes, bytes]:
    return (0, 0, LogFlag.MARK, struct.pack("<Q", len(text)) + text, b"")


def data(
    sector: int, payload: bytes, flags: int = 0, data_len: int = 0, S: int = 4096
) -> tuple[int, int, int, bytes, bytes]:
    return (sector, len(payload) // S, flags, struct.pack("<Q", data_len), payload)


def test_kernel_style_log_4k(tmp_path: Path) -> None:
    S = 4096
    log = tmp_path / "k.log"
    log.write_bytes(
        kernel_log(
            S,
            [
                mark(b"mkfs"),
                data(1, b"\x01" * 8192, LogFlag.METADATA),
                (0, 0, LogFlag.FLUSH, bytes(8), b""),
                data(4, b"\x02" * 4096, LogFlag.FUA | LogFlag.METADATA),
                data(6, b"\x03" * 4096, 0, data_len=100),  # DAX-era inline data: still nr_sectors*S
                (2, 2, LogFlag.DISCARD, bytes(8), b""),
                mark(b"x" * (S - 32)),  # old kstrndup(maxsize): no NUL inside the sector
                mark(b"dm-log-writes-end"),
            ],
        )
    )
    with LogReader(log) as r:
        assert (r.sector_size, r.nr_entries, r.super.log_id) == (S, 8, None)
        es = r.entry_list()
        assert [e.flags for e in es] == [8, 0x10, 1, 0x12, 0, 4, 8, 8]
        assert es[6].mark == "x" * (S - 32)
        assert es[7].mark == "dm-log-writes-end"
        assert es[4].read_data() == b"\x03" * 4096
        assert not any(e.checksummed for e in es)
        assert r.tail().state == "clean"
        assert find(r, ReplayOptions(next_fua=True)).index == 3  # type: ignore[union-attr]
    img = tmp_path / "img"
    img.write_bytes(b"\xff" * 8 * S)
    replay(log, img)
    got = img.read_bytes()
    assert got[S : 2 * S] == b"\x01" * S
    assert got[2 * S : 4 * S] == bytes(2 * S)  # sector 2 written, then both discarded
    assert got[4 * S : 5 * S] == b"\x02" * S and got[6 * S : 7 * S] == b"\x03" * S
    assert got[0:S] == b"\xff" * S


def test_kernel_tail_beyond_nr_entries_is_reported_not_replayed(tmp_path: Path) -> None:
    """The kernel updates nr_entries only on FUA/mark: later entries exist but are uncounted."""
    log = tmp_path / "k.log"
    log.write_bytes(kernel_log(512, [mark(b"a"), data(0, b"\x05" * 4096, S=512), mark(b"b")], nr=1))
    with LogReader(log) as r:
        assert [e.index for e in r.entries()] == [0]
        tail = r.tail()
        assert (tail.state, tail.entries, tail.verified) == ("uncounted", 2, False)
        assert [e.index for e in r.entries(salvage=True)] == [0]  # unverifiable: not salvaged


def test_bad_logs(tmp_path: Path) -> None:
    p = tmp_path / "x"
    p.write_bytes(b"")
    with pytest.raises(BadSuperBlock, match="too short"):
        LogReader(p)
    p.write_bytes(bytes(4096))
    with pytest.raises(BadSuperBlock, match="not a dm-log-writes log"):
        LogReader(p)
    p.write_bytes(kernel_log(512, [data(0, b"\x01" * 4096, S=512)], nr=2))
    with LogReader(p) as r, pytest.raises(TruncatedLog) as info:
        list(r.entries())
    assert (info.value.entry, info.value.offset) == (1, 512 + 512 + 4096)
    p.write_bytes(kernel_log(512, [(0, 0, 0, bytes(8), b"")]))
    with LogReader(p) as r, pytest.raises(CorruptEntry, match="malformed"):
        list(r.entries())
