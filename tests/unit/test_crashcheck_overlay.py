"""The copy-on-write stack behind crashcheck: every view must read exactly the disk as it was
at its point, whatever the replay does afterwards, and keep its own writes to itself."""

from __future__ import annotations

import asyncio
import os
import random
from pathlib import Path

import pytest

from blocktrace.crashcheck.overlay import GRANULE, Stack, View
from blocktrace.crashcheck.points import PointSpec, select_points
from blocktrace.errors import UsageError
from blocktrace.logwrites.writer import LogWriter

SIZE = 64 * GRANULE + 1536  # a partial last granule too


def read(view: View, offset: int, length: int) -> bytes:
    return bytes(asyncio.run(view.read(offset, length)))  # type: ignore[arg-type]


@pytest.fixture
def base(tmp_path: Path) -> tuple[Path, bytearray]:
    data = bytearray(random.Random(1).randbytes(SIZE))
    p = tmp_path / "base.img"
    p.write_bytes(data)
    return p, data


@pytest.mark.parametrize("seed", range(6))
def test_views_keep_their_point_while_replay_moves_on(
    tmp_path: Path, base: tuple[Path, bytearray], seed: int
) -> None:
    path, model = base
    rng = random.Random(seed)
    work = tmp_path / "w"
    work.mkdir()
    stack = Stack(str(path), str(work))
    open_views: list[tuple[View, bytearray]] = []
    try:
        for step in range(120):
            off = rng.randrange(SIZE)
            n = rng.randrange(1, min(3 * GRANULE, SIZE - off) + 1)
            if rng.random() < 0.2:
                stack.apply_zeroes(off, n)
                model[off : off + n] = bytes(n)
            else:
                data = rng.randbytes(n)
                stack.apply_write(off, data)
                model[off : off + n] = data
            if step % 10 == 0:  # a new point: its view must freeze this state
                open_views.append((stack.view(f"v{step}"), bytearray(model)))
            if open_views and rng.random() < 0.3:  # a checker writes into its view
                v, expect = rng.choice(open_views)
                o = rng.randrange(SIZE - 700)
                d = rng.randbytes(700)
                asyncio.run(v.write(o, d))
                expect[o : o + 700] = d
            if len(open_views) > 3:  # a check finished
                v, expect = open_views.pop(0)
                assert read(v, 0, SIZE) == bytes(expect)
                v.discard()
        for v, expect in open_views:
            assert read(v, 0, SIZE) == bytes(expect)
            for _ in range(20):  # unaligned reads too
                o = rng.randrange(SIZE)
                k = rng.randrange(0, SIZE - o + 1)
                assert read(v, o, k) == bytes(expect[o : o + k])
        final = stack.view("final")
        assert read(final, 0, SIZE) == bytes(model)
    finally:
        stack.close()
    assert os.listdir(work) == [], "every layer file is deleted"
    assert path.read_bytes() == random.Random(1).randbytes(SIZE), "the base is never written"


def test_reset_forgets_the_replay(tmp_path: Path, base: tuple[Path, bytearray]) -> None:
    path, model = base
    stack = Stack(str(path), str(tmp_path))
    try:
        stack.apply_write(100, b"x" * 5000)
        stack.reset()
        v = stack.view("v")
        assert read(v, 0, SIZE) == bytes(model)
        with pytest.raises(RuntimeError):
            stack.reset()
    finally:
        stack.close()


def test_zeroes_use_no_space(tmp_path: Path, base: tuple[Path, bytearray]) -> None:
    path, _ = base
    stack = Stack(str(path), str(tmp_path))
    try:
        stack.apply_zeroes(0, SIZE)
        assert stack.replay.allocated() <= 2 * GRANULE  # holes, plus the partial last granule
        assert read(stack.view("v"), 0, SIZE) == bytes(SIZE)
    finally:
        stack.close()


def make_log(path: Path) -> Path:
    w = LogWriter.create(path, direct=False)
    w.write(0, b"a" * 4096)  # 0
    w.flush()  # 1
    w.mark("one")  # 2
    w.write(4096, b"b" * 512, fua=True)  # 3
    w.write(8192, b"c" * 512)  # 4
    w.flush()  # 5
    w.mark("two")  # 6
    w.write(0, b"d" * 512)  # 7
    w.close()
    return path


@pytest.mark.parametrize(
    ("spec", "window", "expected"),
    [
        ("flush", None, [(1, "flush"), (5, "flush")]),
        ("fua", None, [(3, "fua")]),
        ("mark", None, [(2, "mark"), (6, "mark")]),
        ("flush,fua", None, [(1, "flush"), (3, "fua"), (5, "flush")]),
        ("every-3", None, [(2, "entry"), (5, "entry")]),
        ("all", "6:", [(6, "entry"), (7, "entry")]),
        ("all", ":1", [(0, "entry"), (1, "entry")]),
    ],
)
def test_point_selection(
    tmp_path: Path, spec: str, window: str | None, expected: list[tuple[int, str]]
) -> None:
    log = make_log(tmp_path / "t.log")
    points = select_points(log, PointSpec.parse(spec, window))
    assert [(p.index, p.kind) for p in points] == expected


def test_point_marks_around(tmp_path: Path) -> None:
    log = make_log(tmp_path / "t.log")
    p = {p.index: p for p in select_points(log, PointSpec.parse("all"))}
    assert (p[0].mark_before, p[0].mark_after) == (None, "one")
    assert (p[2].mark_before, p[2].mark_after) == ("one", "two")
    assert (p[5].mark_before, p[5].mark_after) == ("one", "two")
    assert (p[7].mark_before, p[7].mark_after) == ("two", None)


@pytest.mark.parametrize("bad", ["", "flushes", "every-0", "every-x", "all,bogus"])
def test_bad_point_specs(bad: str) -> None:
    with pytest.raises(UsageError):
        PointSpec.parse(bad)


def test_bad_window() -> None:
    with pytest.raises(UsageError):
        PointSpec.parse("all", "3-5")
