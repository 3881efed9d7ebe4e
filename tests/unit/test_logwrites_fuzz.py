"""Fuzzing the log reader and replay (issue #10 "Done when"): bounded, seeded, in the suite.

Two small real logs -- one written by our writer (checksummed: writes, zeroes, discards,
flushes, marks) and one laid out as the kernel and QEMU write them (no checksums) -- are
byte-flipped with a fixed seed and a fixed count; hypothesis builds checksum-less logs from
hostile header fields with fixed examples (``derandomize``).  Every input goes through the real
CLI commands (``log info``, ``log list``, ``log find``, ``replay`` under both bad-entry
policies), each under a wall-clock bound enforced here (``SIGALRM``: a hang fails the test
naming the input).  Asserted for every input: the only failures are blocktrace's documented
errors, each one line (what the CLI prints); the replay target keeps its size (never grown)
and holds no more allocated blocks than its size (nothing written outside it).
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import struct
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blocktrace.cli.main import cli
from blocktrace.errors import BlocktraceError
from blocktrace.logwrites.format import LogFlag
from blocktrace.logwrites.writer import LogWriter

S = 512
TARGET_SIZE = 64 * 1024
#: wall-clock bound per input, for all its commands together (they take milliseconds)
PER_INPUT_SECONDS = 20
FLIPS_PER_LOG = 400
MAGIC = 0x6A736677736872


@pytest.fixture
def work(tmp_path: Path) -> Iterator[Path]:
    """Scratch space in tmpfs where there is one: each replay ends with an fsync of its target,
    free in memory, milliseconds each on a shared disk."""
    shm = Path("/dev/shm")
    if not (shm.is_dir() and os.access(shm, os.W_OK)):
        yield tmp_path
        return
    d = Path(tempfile.mkdtemp(prefix="blocktrace-fuzz-", dir=shm))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


class Hang(Exception):
    pass


@contextmanager
def time_bound(seconds: float, what: str) -> Iterator[None]:
    def alarm(signum: int, frame: FrameType | None) -> None:
        raise Hang(f"{what}: still running after {seconds}s")

    old = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def ours(path: Path) -> bytes:
    with LogWriter.create(path, sector_size=S, direct=False) as w:
        w.mark("start")
        w.write(0, b"\x01" * 4096, fua=True)
        w.write_zeroes(8192, 8192)
        w.discard(16384, 4096)
        w.flush()
        w.write(40960, bytes(range(256)) * 4)
        w.mark("end")
        w.sync()
    return path.read_bytes()


def kernel_style() -> bytes:
    def hdr(sector: int, nr: int, flags: int, tail: bytes = bytes(8)) -> bytes:
        return (struct.pack("<QQQ", sector, nr, flags) + tail).ljust(S, b"\0")

    entries = [
        hdr(0, 0, LogFlag.MARK, struct.pack("<Q", 4) + b"mkfs"),
        hdr(0, 4, LogFlag.METADATA) + b"\x02" * 4 * S,
        hdr(0, 0, LogFlag.FLUSH),
        hdr(16, 8, LogFlag.DISCARD),
        hdr(64, 2, LogFlag.FUA) + b"\x03" * 2 * S,
    ]
    return struct.pack("<QQQI", MAGIC, 1, len(entries), S).ljust(S, b"\0") + b"".join(entries)


def check_input(tmp: Path, data: bytes, label: str) -> None:
    """Run every reader/replay command on ``data``; fail on anything but a one-line error, a
    grown target, or a hang."""
    log = tmp / "fuzz.log"
    log.write_bytes(data)
    img = tmp / "target.img"
    runner = CliRunner()
    commands: list[list[str]] = [
        ["log", "info", str(log)],
        ["log", "list", str(log)],
        ["log", "list", "--salvage", str(log)],
        ["log", "find", "--next-fua", str(log)],
        ["replay", str(log), str(img)],
        ["replay", "--on-bad-entry", "skip", "--salvage", str(log), str(img)],
    ]
    with time_bound(PER_INPUT_SECONDS, label):
        for args in commands:
            if args[0] == "replay":
                with open(img, "wb") as f:
                    f.truncate(TARGET_SIZE)
            result = runner.invoke(cli, args, catch_exceptions=True)
            exc = result.exception
            if exc is not None and not isinstance(exc, SystemExit):
                if isinstance(exc, Hang):
                    raise exc
                assert isinstance(exc, BlocktraceError), (
                    f"{label}: {' '.join(args[:2])} raised {type(exc).__name__}: {exc}"
                )
                assert "\n" not in str(exc), f"{label}: multi-line error {exc!r}"
            if args[0] == "replay":
                st_ = img.stat()
                assert st_.st_size == TARGET_SIZE, f"{label}: target grew to {st_.st_size}"
                assert st_.st_blocks * 512 <= TARGET_SIZE + 4096, f"{label}: wrote outside"


def flips(base: bytes, seed: int, count: int) -> Iterator[tuple[str, bytes]]:
    rng = random.Random(seed)
    for i in range(count):
        buf = bytearray(base)
        for _ in range(rng.randint(1, 4)):
            pos = rng.randrange(len(buf))
            if rng.random() < 0.3:  # whole-field damage: a header's sector / nr_sectors byte
                buf[pos] = rng.choice((0x00, 0x7F, 0x80, 0xFF))
            else:
                buf[pos] ^= 1 << rng.randrange(8)
        if rng.random() < 0.1:
            buf = buf[: rng.randrange(len(buf))]
        yield f"seed {seed} input {i}", bytes(buf)


@pytest.mark.parametrize("which", ["ours", "kernel"])
def test_byte_flip_fuzz_reader_and_replay(work: Path, which: str) -> None:
    base = ours(work / "base.log") if which == "ours" else kernel_style()
    assert len(base) <= 16 * 1024
    check_input(work, base, "unmodified")  # the real log itself passes cleanly
    for label, data in flips(base, seed=10 if which == "ours" else 11, count=FLIPS_PER_LOG):
        check_input(work, data, f"{which} {label}")


# -- hypothesis: hostile header fields, fixed examples --------------------------------------

edge = st.sampled_from([0, 1, 7, 8, 127, 128, 2**31, 2**32 - 1, 2**55, 2**63 - 1, 2**63, 2**64 - 1])
field_value = st.one_of(edge, st.integers(0, 256), st.integers(0, 2**64 - 1))
entry_strategy = st.tuples(
    field_value,  # sector
    field_value,  # nr_sectors
    st.sampled_from([0, 1, 2, 4, 5, 6, 8, 16, 0x40, 0xFFFF_FFFF_FFFF_FFFF]),  # flags
    st.booleans(),  # give the data its sectors (when small enough to be plausible)
)


def build(entries: list[tuple[int, int, int, bool]], nr: int) -> bytes:
    out = bytearray(struct.pack("<QQQI", MAGIC, 1, nr, S).ljust(S, b"\0"))
    for sector, nr_sectors, flags, with_data in entries:
        out += struct.pack("<QQQQ", sector, nr_sectors, flags, 0).ljust(S, b"\0")
        if with_data and not flags & LogFlag.DISCARD and nr_sectors <= 8:
            out += b"\x5a" * (nr_sectors * S)
    return bytes(out)


@settings(
    max_examples=120,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    entries=st.lists(entry_strategy, min_size=1, max_size=6),
    extra=st.sampled_from([0, 1, 2**32, 2**64 - 1]),
)
def test_hypothesis_hostile_headers(
    work: Path, entries: list[tuple[int, int, int, bool]], extra: int
) -> None:
    nr = len(entries) if extra == 0 else min(len(entries) + extra, 2**64 - 1)
    check_input(work, build(entries, nr), f"entries={entries} nr={nr}")


def test_fuzz_harness_catches_a_hang(tmp_path: Path) -> None:
    """The bound is real: a command that blocks is reported as a hang, not waited for."""
    with pytest.raises(Hang), time_bound(0.2, "sleeper"):
        os.read(os.pipe()[0], 1)
