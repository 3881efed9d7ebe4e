"""Our replay and ``--find`` against xfstests' replay-log, and both against a Python model.

Random logs are made with our writer (checksums on), replayed by replay-log and by blocktrace
with the same selection options, and compared with the image a plain model of the entries
predicts.  replay-log is not packaged in Debian: the tests skip, naming it, where it is absent.
"""

from __future__ import annotations

import os
import random
import struct
import subprocess
from pathlib import Path

import pytest

from blocktrace.logwrites.reader import LogReader
from blocktrace.logwrites.replay import ReplayOptions, find, replay
from blocktrace.logwrites.writer import LogWriter
from support import blocktrace, require

SIZE = 1024 * 1024


def make_random_log(path: Path, seed: int, sector_size: int, n: int = 60) -> None:
    rng = random.Random(seed)
    marks = iter(["m1", "m2", "m3"])
    mark_at = sorted(rng.sample(range(5, n), 3))
    with LogWriter.create(path, sector_size=sector_size) as w:
        for i in range(n):
            if i in mark_at:
                w.mark(next(marks))
                continue
            nsec = SIZE // sector_size
            off = rng.randrange(nsec - 16) * sector_size
            length = rng.randint(1, 16) * sector_size
            kind = rng.choices(["write", "discard", "zero", "flush"], [6, 1, 1, 2])[0]
            if kind == "write":
                w.write(off, rng.randbytes(length), fua=rng.random() < 0.15)
            elif kind == "discard":
                w.discard(off, length)
            elif kind == "zero":
                w.write_zeroes(off, length, fua=rng.random() < 0.2)
            else:
                w.flush()


def model(log: Path, opts: ReplayOptions) -> tuple[bytearray, int | None]:
    """Apply the entries replay-log's documented rules select; returns (image, stop index)."""
    img = bytearray(SIZE)
    with LogReader(log) as r:
        entries = r.entry_list()
        start = opts.start_entry
        if opts.start_mark is not None:
            start = next(e.index for e in entries if e.mark == opts.start_mark) + 1
        stop = None
        for count, e in enumerate(entries[start:], 1):
            if e.is_data and not (e.is_discard and opts.no_discard):
                data = bytes(e.length) if e.is_discard else e.read_data()
                img[e.target_offset : e.target_offset + e.length] = data
            if opts.limit and count == opts.limit:
                stop = e.index
                break
            if opts.end_mark is not None:
                if e.mark == opts.end_mark:
                    stop = e.index
                    break
            elif (opts.next_flush and e.flags & 1) or (opts.next_fua and e.flags & 2):
                stop = e.index
                break
    return img, stop


def replay_log_args(opts: ReplayOptions) -> list[str]:
    args = []
    if opts.limit:
        args += ["--limit", str(opts.limit)]
    if opts.start_entry:
        args += ["--start-entry", str(opts.start_entry)]
    if opts.start_mark is not None:
        args += ["--start-mark", opts.start_mark]
    if opts.end_mark is not None:
        args += ["--end-mark", opts.end_mark]
    if opts.next_flush:
        args.append("--next-flush")
    if opts.next_fua:
        args.append("--next-fua")
    if opts.no_discard:
        args.append("--no-discard")
    return args


CASES = [
    ReplayOptions(),
    ReplayOptions(limit=5),
    ReplayOptions(start_entry=3, limit=4),
    ReplayOptions(next_flush=True),
    ReplayOptions(next_fua=True),
    ReplayOptions(start_entry=20, next_flush=True),
    ReplayOptions(start_entry=10, next_fua=True, next_flush=True),
    ReplayOptions(end_mark="m2"),
    ReplayOptions(end_mark="nonexistent"),
    ReplayOptions(start_mark="m1"),
    ReplayOptions(start_mark="m1", end_mark="m3"),
    ReplayOptions(end_mark="m3", next_flush=True),  # replay-log: the mark disables FLUSH stops
    ReplayOptions(no_discard=True, limit=40),
    ReplayOptions(start_mark="m2", limit=3),
]


@pytest.mark.parametrize("sector_size", [512, 4096])
def test_replay_and_find_match_replay_log(tmp_path: Path, sector_size: int) -> None:
    require("replay-log")
    log = tmp_path / "log"
    make_random_log(log, seed=sector_size, sector_size=sector_size)
    for opts in CASES:
        expected, stop = model(log, opts)
        theirs = tmp_path / "theirs.img"
        ours = tmp_path / "ours.img"
        for p in (theirs, ours):
            p.write_bytes(bytes(SIZE))
        args = replay_log_args(opts)
        subprocess.run(
            ["replay-log", "--log", log, "--replay", theirs, *args],
            check=True,
            timeout=60,
            capture_output=True,
        )
        replay(log, ours, opts)
        assert theirs.read_bytes() == expected, opts
        assert ours.read_bytes() == expected, opts
        found = subprocess.run(
            ["replay-log", "--log", log, "--find", *args],
            timeout=60,
            capture_output=True,
            text=True,
        )
        with LogReader(log) as r:
            ours_found = find(r, opts)
        if stop is None:
            assert found.returncode == 1 and ours_found is None, opts
        else:
            assert found.returncode == 0, (opts, found.stderr)
            assert ours_found is not None
            assert found.stdout.strip() == f"{ours_found.index}@{ours_found.pos_after_data}"
            assert ours_found.index == stop
        cli = blocktrace("log", "find", log, *[a for a in args if a != "--no-discard"], check=False)
        assert cli.returncode == found.returncode and cli.stdout == found.stdout, opts


def test_cli_replay_matches_replay_log_verbose_positions(tmp_path: Path) -> None:
    require("replay-log")
    log = tmp_path / "log"
    make_random_log(log, seed=7, sector_size=512, n=20)
    img = tmp_path / "img"
    img.write_bytes(bytes(SIZE))
    theirs = subprocess.run(
        ["replay-log", "-v", "--log", log, "--replay", img],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    ours = blocktrace("replay", "-v", log, img)
    want = [ln for ln in theirs.stdout.splitlines() if ln.startswith("replaying")]
    got = [ln.split(" mark ")[0] for ln in ours.stdout.splitlines()]
    assert got == want


def test_replay_log_rejects_nothing_we_write_at_the_edges(tmp_path: Path) -> None:
    """Longest mark, 4 KiB sectors, FUA/METADATA flags, split discards: replay-log accepts."""
    require("replay-log")
    log = tmp_path / "log"
    with LogWriter.create(log, sector_size=4096) as w:
        w.mark("x" * (4096 - 57))
        w.write(0, b"\x01" * 4096, fua=True, metadata=True)
        w.write_zeroes(4096, 130 * 1024 * 1024)
        w.mark("end")
    img = tmp_path / "img"
    img.write_bytes(b"\xff" * 8192)
    out = subprocess.run(
        ["replay-log", "--log", log, "--replay", img, "--end-mark", "end"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert os.path.getsize(img) == 4096 + 130 * 1024 * 1024
    with open(img, "rb") as f:
        assert f.read(8192) == b"\x01" * 4096 + bytes(4096)
    found = subprocess.run(
        ["replay-log", "--log", log, "--find", "--end-mark", "x" * 4039],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert found.stdout.strip() == "0@2"


@pytest.mark.parametrize("sector_size", [512, 4096])
def test_replay_matches_model_without_replay_log(tmp_path: Path, sector_size: int) -> None:
    """The same cases where replay-log is absent: ours against the model alone."""
    log = tmp_path / "log"
    make_random_log(log, seed=sector_size + 1, sector_size=sector_size)
    for opts in CASES:
        expected, stop = model(log, opts)
        ours = tmp_path / "ours.img"
        ours.write_bytes(bytes(SIZE))
        result = replay(log, ours, opts)
        assert ours.read_bytes() == expected, opts
        assert (result.stopped_by == "end") == (stop is None), opts
        with LogReader(log) as r:
            hit = find(r, opts)
        assert (hit.index if hit else None) == stop, opts


def test_skip_policy_matches_replay_log_on_an_oversized_discard(tmp_path: Path) -> None:
    """replay-log skips a discard it cannot zero-fill (over 128 MiB) on a regular file; our
    ``--on-bad-entry skip`` skips the same entry (it lies outside the 1 MiB target) and the
    images agree, and ours keeps its size."""
    require("replay-log")
    S = 512
    hdrs = [
        (struct.pack("<QQQQ", 0, 2, 0, 0).ljust(S, b"\0"), b"\x11" * 2 * S),
        (struct.pack("<QQQQ", 0, (256 << 20) // S, 4, 0).ljust(S, b"\0"), b""),  # 256 MiB
        (struct.pack("<QQQQ", 8, 1, 0, 0).ljust(S, b"\0"), b"\x22" * S),
    ]
    log = tmp_path / "log"
    log.write_bytes(
        struct.pack("<QQQI", 0x6A736677736872, 1, len(hdrs), S).ljust(S, b"\0")
        + b"".join(h + d for h, d in hdrs)
    )
    theirs, ours = tmp_path / "theirs.img", tmp_path / "ours.img"
    for p in (theirs, ours):
        p.write_bytes(b"\x07" * SIZE)
    subprocess.run(
        ["replay-log", "--log", log, "--replay", theirs],
        check=True,
        timeout=60,
        capture_output=True,
    )
    r = blocktrace("replay", "--on-bad-entry", "skip", log, ours)
    assert "1 skipped" in r.stderr
    assert ours.read_bytes() == theirs.read_bytes()
    assert ours.stat().st_size == SIZE
