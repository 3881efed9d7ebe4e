"""The log sink's decoder (sans-IO): QEMU blklogwrites' writes in, guest operations out.

Byte vectors built the way QEMU 7.2 lays entries out (reference notes,
dm-log-writes-format.md 5.3-5.4): header sector + data in one write, a zero write as a
header-only write and a separate write-zeroes, FLUSH and DISCARD as header-only entries, the
super block at byte 0.
"""

from __future__ import annotations

import asyncio
import random

import pytest

from blocktrace.attach.sink import LogSinkDecoder, LogSinkDevice, LogSinkError, SinkOp
from blocktrace.block.memory import MemoryDevice
from blocktrace.logwrites.format import (
    LOG_WRITE_ENTRY,
    LOG_WRITE_SUPER,
    WRITE_LOG_MAGIC,
    LogFlag,
)

S = 512


def header(sector: int, nr: int, flags: int = 0) -> bytes:
    return LOG_WRITE_ENTRY.pack(sector, nr, flags, 0).ljust(S, b"\0")


def super_block(nr_entries: int) -> bytes:
    return LOG_WRITE_SUPER.pack(WRITE_LOG_MAGIC, 1, nr_entries, S).ljust(S, b"\0")


class Log:
    """Lays out entries as QEMU does; ``pieces`` are (offset, data or zero length)."""

    def __init__(self) -> None:
        self.pos = S
        self.pieces: list[tuple[int, bytes | int]] = []

    def write(self, sector: int, data: bytes) -> None:
        self.pieces.append((self.pos, header(sector, len(data) // S) + data))
        self.pos += S + len(data)

    def zero(self, sector: int, nr: int) -> None:
        self.pieces.append((self.pos, header(sector, nr)))
        self.pieces.append((self.pos + S, nr * S))
        self.pos += S + nr * S

    def flush(self) -> None:
        self.pieces.append((self.pos, header(0, 0, LogFlag.FLUSH)))
        self.pos += S

    def discard(self, sector: int, nr: int) -> None:
        self.pieces.append((self.pos, header(sector, nr, LogFlag.DISCARD)))
        self.pos += S


def feed(dec: LogSinkDecoder, pieces: list[tuple[int, bytes | int]]) -> None:
    for off, item in pieces:
        if isinstance(item, int):
            dec.feed_zeroes(off, item)
        else:
            dec.feed_write(off, item)


def sample() -> tuple[Log, list[SinkOp]]:
    log = Log()
    log.write(8, b"a" * 1024)
    log.zero(100, 4)
    log.flush()
    log.discard(200, 16)
    log.write(0, b"b" * 512)
    want = [
        SinkOp("write", 8 * S, 1024, b"a" * 1024),
        SinkOp("zero", 100 * S, 4 * S),
        SinkOp("flush"),
        SinkOp("trim", 200 * S, 16 * S),
        SinkOp("write", 0, 512, b"b" * 512),
    ]
    return log, want


def test_entries_in_position_order_become_guest_operations() -> None:
    log, want = sample()
    dec = LogSinkDecoder(S)
    feed(dec, [(0, super_block(0)), *log.pieces, (0, super_block(5))])
    assert list(dec.ops) == want


@pytest.mark.parametrize("seed", range(20))
def test_out_of_position_arrival_is_decoded_in_position_order(seed: int) -> None:
    log, want = sample()
    pieces = list(log.pieces)
    random.Random(seed).shuffle(pieces)
    dec = LogSinkDecoder(S)
    feed(dec, pieces)
    assert list(dec.ops) == want


def test_a_late_earlier_entry_holds_back_later_ones() -> None:
    log, want = sample()
    dec = LogSinkDecoder(S)
    feed(dec, log.pieces[1:])
    assert not dec.ops
    feed(dec, log.pieces[:1])
    assert list(dec.ops) == want


def test_qemu_72_write_zeroes_race_is_detected_not_decoded() -> None:
    # Entry #1 (zero write) writes its header at p; #2 reserves p+S (the zeroes' place,
    # QEMU < 9.0) and writes a data entry there; #1's zeroes land after it.
    dec = LogSinkDecoder(S)
    p = S
    dec.feed_write(p, header(100, 4))
    with pytest.raises(LogSinkError, match="write-zeroes race"):
        dec.feed_write(p + S, header(8, 1) + b"x" * S)


def test_pending_bytes_are_bounded() -> None:
    dec = LogSinkDecoder(S, max_pending=4 * S)
    with pytest.raises(LogSinkError, match="wait behind"):
        dec.feed_write(100 * S, header(0, 8) + bytes(8 * S))


def test_foreign_super_block_and_flags_are_refused() -> None:
    with pytest.raises(LogSinkError, match="magic"):
        LogSinkDecoder(S).feed_write(0, bytes(S))
    with pytest.raises(LogSinkError, match="flags"):
        LogSinkDecoder(S).feed_write(S, header(0, 0, LogFlag.MARK))


def test_an_entry_split_by_the_nbd_client_is_joined() -> None:
    dec = LogSinkDecoder(S)
    entry = header(16, 4) + b"z" * (4 * S)
    dec.feed_write(S + 3 * S, entry[3 * S :])
    dec.feed_write(S, entry[: 3 * S])
    assert list(dec.ops) == [SinkOp("write", 16 * S, 4 * S, b"z" * (4 * S))]


def test_device_applies_operations_to_the_shadow_and_drops_after_an_error() -> None:
    async def main() -> None:
        shadow = MemoryDevice(1 << 20)
        await shadow.write(0, b"\xff" * (1 << 20))
        sink = LogSinkDevice(shadow, S)
        log, _ = sample()
        for off, item in reversed(log.pieces):
            if isinstance(item, int):
                await sink.write_zeroes(off, item)
            else:
                await sink.write(off, item)
        image = bytes(await shadow.read(0, 1 << 20))
        assert image[8 * S : 10 * S] == b"a" * 1024
        assert image[0:S] == b"b" * S
        assert image[100 * S : 104 * S] == bytes(4 * S)
        assert image[200 * S : 216 * S] == bytes(16 * S)
        assert image[104 * S : 200 * S] == b"\xff" * (96 * S)
        from blocktrace.errors import BlockDeviceError

        with pytest.raises(BlockDeviceError):
            await sink.write(0, bytes(S))
        # Failed: later writes are acknowledged and dropped, so QEMU's reopen (which
        # flushes through blklogwrites) can remove the filter; nothing more is applied.
        await sink.write(log.pos, header(300, 1) + b"c" * S)
        await sink.flush()
        assert bytes(await shadow.read(300 * S, S)) == b"\xff" * S

    asyncio.run(main())


def test_operations_decoded_before_a_failure_are_applied_then_on_error() -> None:
    """One write completes an earlier gap and then fails: the entries it completed reach the
    shadow (the traces end at the last operation decoded), then ``on_error`` is told."""

    async def main() -> None:
        shadow = MemoryDevice(1 << 20)
        seen: list[bytes] = []

        def failed(exc: LogSinkError) -> None:
            seen.append(bytes(shadow.buf[8 * S : 9 * S]))

        sink = LogSinkDevice(shadow, S, on_error=failed)
        log = Log()
        log.write(8, b"a" * S)
        log.zero(100, 2)  # its zeroes' position gets data: the QEMU < 9.0 race
        first, (zero_hdr_off, zero_hdr), _ = log.pieces
        await sink.write(zero_hdr_off, zero_hdr)  # waits behind the first entry
        await sink.write(zero_hdr_off + S, header(5, 1) + b"x" * S)  # data where zeroes due
        from blocktrace.errors import BlockDeviceError

        with pytest.raises(BlockDeviceError):
            await sink.write(*first)  # type: ignore[arg-type]
        assert seen == [b"a" * S]

    asyncio.run(main())
