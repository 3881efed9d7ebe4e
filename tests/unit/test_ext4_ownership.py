"""The block -> owner interval map, checked against a per-block dict model."""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from blocktrace.ext4.ownership import Owner, OwnerKind, OwnershipMap


def test_lookup_gives_logical_block_within_run() -> None:
    m = OwnershipMap()
    m.assign(100, 10, Owner(OwnerKind.DATA, ino=12, lblk=50))
    assert m.lookup(99) is None and m.lookup(110) is None
    assert m.lookup(105) == Owner(OwnerKind.DATA, 12, 55)


def test_assign_cuts_overlapped_runs_and_release_respects_owner() -> None:
    m = OwnershipMap()
    m.assign(0, 100, Owner(OwnerKind.DATA, ino=1))
    m.assign(40, 10, Owner(OwnerKind.DIR, ino=2))
    assert m.lookup(39) == Owner(OwnerKind.DATA, 1, 39)
    assert m.lookup(45) == Owner(OwnerKind.DIR, 2, 5)
    assert m.lookup(50) == Owner(OwnerKind.DATA, 1, 50)
    m.release(0, 100, ino=1)  # a stale release for inode 1 keeps inode 2's run
    assert m.lookup(45) == Owner(OwnerKind.DIR, 2, 5)
    assert m.lookup(10) is None and len(m) == 1


def test_overlaps_covers_range_with_gaps() -> None:
    m = OwnershipMap()
    m.assign(10, 5, Owner(OwnerKind.INODE_TABLE))
    m.assign(20, 5, Owner(OwnerKind.DATA, ino=3))
    pieces = [(s, e, o.kind if o else None) for s, e, o in m.overlaps(0, 30)]
    assert pieces == [
        (0, 10, None),
        (10, 15, OwnerKind.INODE_TABLE),
        (15, 20, None),
        (20, 25, OwnerKind.DATA),
        (25, 30, None),
    ]


ops = st.lists(
    st.tuples(st.booleans(), st.integers(0, 60), st.integers(1, 20), st.integers(1, 4)), max_size=40
)


@settings(max_examples=200, deadline=None)
@given(ops)
def test_matches_per_block_model(steps: list[tuple[bool, int, int, int]]) -> None:
    m = OwnershipMap()
    model: dict[int, tuple[int, int]] = {}
    for assign, start, length, ino in steps:
        if assign:
            m.assign(start, length, Owner(OwnerKind.DATA, ino, lblk=start * 10))
            for i in range(length):
                model[start + i] = (ino, start * 10 + i)
        else:
            m.release(start, length, ino)
            for b in range(start, start + length):
                if b in model and model[b][0] == ino:
                    del model[b]
    for b in range(0, 90):
        got = m.lookup(b)
        assert (None if got is None else (got.ino, got.lblk)) == model.get(b)
    covered = [(s, e) for s, e, _ in m.overlaps(0, 90)]
    assert covered[0][0] == 0 and covered[-1][1] == 90
    assert all(a[1] == b[0] for a, b in itertools.pairwise(covered))


@settings(max_examples=200, deadline=None)
@given(ops)
def test_matches_per_block_model_across_chunks(steps: list[tuple[bool, int, int, int]]) -> None:
    """The same model with chunks of 1-2 runs: every split, merge and cross-chunk cut."""
    import blocktrace.ext4.ownership as ownership

    saved = ownership.CHUNK
    ownership.CHUNK = 1
    try:
        test_matches_per_block_model.hypothesis.inner_test(steps)  # type: ignore[attr-defined]
    finally:
        ownership.CHUNK = saved


def test_many_runs_in_random_order_stay_sorted_and_found() -> None:
    """Thousands of runs (several chunk splits), assigned out of order, then half released."""
    import random

    rng = random.Random(7)
    m = OwnershipMap()
    order = list(range(3000))
    rng.shuffle(order)
    for k in order:
        m.assign(k * 4, 3, Owner(OwnerKind.DATA, ino=k + 1))
    assert len(m) == 3000
    assert [s for s, _, _ in m.runs()] == [k * 4 for k in range(3000)]
    for k in order[:1500]:
        m.release(k * 4, 3, ino=k + 1)
    gone = set(order[:1500])
    for k in range(3000):
        got = m.lookup(k * 4 + 2)
        assert (got is None) == (k in gone)
        if got is not None:
            assert got.ino == k + 1 and got.lblk == 2
    assert len(m) == 1500 == len(list(m.runs()))
