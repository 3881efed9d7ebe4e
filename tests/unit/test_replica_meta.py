"""Replica state: dirty bitmap, metadata file (crash-safe format), the attach decision table."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blocktrace.errors import FormatError
from blocktrace.replica.bitmap import DirtyBitmap
from blocktrace.replica.meta import (
    AttachMode,
    ReplicaMeta,
    SourceRecord,
    SplitBrainError,
    decode_meta,
    encode_meta,
    load_meta,
    plan_attach,
    rotate_generation,
    save_meta,
)

G = 64 * 1024


def test_bitmap_mark_clear_runs() -> None:
    bm = DirtyBitmap(10 * G + 100, G)  # last region is partial
    assert bm.nbits == 11 and not bm
    bm.mark(G - 1, 2)  # straddles regions 0 and 1
    assert list(bm.runs()) == [(0, 2 * G)]
    bm.mark(10 * G + 50, 10)
    assert list(bm.runs()) == [(0, 2 * G), (10 * G, 100)]
    assert bm.dirty_bytes() == 2 * G + 100
    bm.clear(0, G + 5)  # only region 0 is entirely inside
    assert list(bm.runs()) == [(G, G), (10 * G, 100)]
    bm.clear(10 * G, 100)  # the partial last region counts as covered
    assert list(bm.runs()) == [(G, G)]
    bm.mark(0, 10 * G + 100)
    assert list(bm.runs(max_run=4 * G)) == [(0, 4 * G), (4 * G, 4 * G), (8 * G, 2 * G + 100)]
    assert bm.count() == 11
    assert list(bm.runs(start=5 * G + 7)) == [(5 * G, 5 * G + 100)]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(0, 40 * G), st.integers(1, 8 * G))))
def test_bitmap_matches_model(ops: list[tuple[bool, int, int]]) -> None:
    size = 40 * G
    bm = DirtyBitmap(size, G)
    model = [False] * bm.nbits
    for is_mark, off, n in ops:
        n = min(n, size - off) or 1
        if off >= size:
            continue
        if is_mark:
            bm.mark(off, n)
            for i in range(off // G, (off + n - 1) // G + 1):
                model[i] = True
        else:
            bm.clear(off, n)
            for i in range(-(-off // G), (off + n) // G):
                model[i] = False
    assert [bm.test(i * G) for i in range(bm.nbits)] == model
    covered = [False] * bm.nbits
    for off, n in bm.runs(max_run=3 * G):
        for i in range(off // G, (off + n - 1) // G + 1):
            covered[i] = True
    assert covered == model
    assert bm.dirty_bytes() == sum(n for _, n in bm.runs()) == sum(model) * G
    assert bool(bm) == any(model)
    mid = size // 2  # a run crossing ``start`` is cut there
    want = [(max(o, mid), o + n - max(o, mid)) for o, n in bm.runs() if o + n > mid]
    assert list(bm.runs(start=mid)) == want
    again = DirtyBitmap.from_bytes(size, G, bm.to_bytes())
    assert list(again.runs()) == list(bm.runs())


def _meta(**kw: object) -> ReplicaMeta:
    base: dict[str, object] = {
        "source_id": "S",
        "generation": "g1",
        "target": "/r.img",
        "size": 1 << 20,
        "granularity": G,
    }
    base.update(kw)
    return ReplicaMeta(**base)  # type: ignore[arg-type]


def test_meta_file_roundtrip_and_corruption(tmp_path: Path) -> None:
    path = tmp_path / "r.btreplica"
    assert load_meta(path) is None
    bm = DirtyBitmap(1 << 20, G)
    bm.mark(3 * G, 1)
    meta = _meta(applied_seq=42, clean=True, history=["g0"])
    save_meta(path, meta, bm)
    got, gbm = load_meta(path)  # type: ignore[misc]
    assert got.applied_seq == 42 and got.history == ["g0"] and got.clean
    assert list(gbm.runs()) == [(3 * G, G)]
    assert not (tmp_path / "r.btreplica.tmp").exists()
    raw = bytearray(path.read_bytes())
    for i in (0, 20, len(raw) - 1):  # magic, JSON, CRC: each detected
        bad = bytearray(raw)
        bad[i] ^= 0xFF
        with pytest.raises(FormatError):
            decode_meta(bytes(bad))
    with pytest.raises(FormatError, match=r"truncated|length"):
        decode_meta(bytes(raw[: len(raw) // 2]))


def test_meta_torn_tmp_leaves_old_file(tmp_path: Path) -> None:
    """A crash mid-save leaves PATH.tmp behind; PATH itself is the previous, valid version."""
    path = tmp_path / "r.btreplica"
    save_meta(path, _meta(applied_seq=1), DirtyBitmap(1 << 20, G))
    data = encode_meta(_meta(applied_seq=2), DirtyBitmap(1 << 20, G))
    (tmp_path / "r.btreplica.tmp").write_bytes(data[: len(data) // 3])
    got, _ = load_meta(path)  # type: ignore[misc]
    assert got.applied_seq == 1


def _source(gen: str = "g1", previous: str = "g0", fp: list[int] | None = None) -> SourceRecord:
    return SourceRecord(
        "S", {"/r.img": {"generation": gen, "previous": previous, "fingerprint": fp}}
    )


def test_plan_new_replica() -> None:
    src = SourceRecord("S")
    assert plan_attach(None, None, src, "/r.img", size=1 << 20).mode is AttachMode.FULL
    plan = plan_attach(None, None, src, "/r.img", size=1 << 20, sync="none")
    assert plan.mode is AttachMode.NONE


def test_plan_resume_clean_uses_bitmap() -> None:
    bm = DirtyBitmap(1 << 20, G)
    bm.mark(0, 1)
    meta = _meta(clean=True, fingerprint=[1, 2])
    plan = plan_attach(meta, bm, _source(), "/r.img", size=1 << 20, replica_fingerprint=(1, 2))
    assert plan.mode is AttachMode.BITMAP and str(G) in plan.reason
    # the generation before the current one is accepted too (crash between the two saves)
    plan = plan_attach(_meta(generation="g0", clean=True), bm, _source(), "/r.img", size=1 << 20)
    assert plan.mode is AttachMode.BITMAP


def test_plan_unclean_compares_and_source_changed_compares() -> None:
    plan = plan_attach(_meta(clean=False), None, _source(), "/r.img", size=1 << 20)
    assert plan.mode is AttachMode.COMPARE
    src = _source(fp=[100, 5])
    plan = plan_attach(
        _meta(clean=True), None, src, "/r.img", size=1 << 20, source_fingerprint=(100, 6)
    )
    assert plan.mode is AttachMode.COMPARE and "source changed" in plan.reason


@pytest.mark.parametrize("sync", ["full", "none"])
def test_plan_known_replica_ignores_sync_none(sync: str) -> None:
    """The decision table holds for every sync mode (issue #10 item 10): ``sync=none`` vouches
    for a new replica only; a known one's metadata decides."""
    bm = DirtyBitmap(1 << 20, G)  # stale: records queued at a kill -9 are not in it
    plan = plan_attach(_meta(clean=False), bm, _source(), "/r.img", size=1 << 20, sync=sync)
    assert plan.mode is AttachMode.COMPARE, plan
    plan = plan_attach(
        _meta(clean=True),
        bm,
        _source(fp=[100, 5]),
        "/r.img",
        size=1 << 20,
        sync=sync,
        source_fingerprint=(100, 6),
    )
    assert plan.mode is AttachMode.COMPARE and "source changed" in plan.reason, plan


def test_plan_refuses_other_source_unless_forced() -> None:
    meta = _meta(source_id="OTHER", clean=True)
    with pytest.raises(SplitBrainError, match="belongs to source OTHER"):
        plan_attach(meta, None, _source(), "/r.img", size=1 << 20)
    plan = plan_attach(meta, None, _source(), "/r.img", size=1 << 20, force=True)
    assert plan.mode is AttachMode.FULL


def test_plan_refuses_unknown_generation_and_out_of_band_writes() -> None:
    with pytest.raises(SplitBrainError, match="split brain"):
        plan_attach(_meta(generation="gX", clean=True), None, _source(), "/r.img", size=1 << 20)
    meta = _meta(clean=True, fingerprint=[10, 20])
    with pytest.raises(SplitBrainError, match="modified after"):
        plan_attach(meta, None, _source(), "/r.img", size=1 << 20, replica_fingerprint=(10, 21))
    plan = plan_attach(
        meta, None, _source(), "/r.img", size=1 << 20, replica_fingerprint=(10, 21), force=True
    )
    assert plan.mode is AttachMode.COMPARE


def test_rotate_generation_keeps_history() -> None:
    meta = _meta()
    src = _source()
    gen = rotate_generation(meta, src, "/r.img")
    assert meta.generation == gen != "g1"
    assert meta.history[0] == "g1"
    assert src.replicas["/r.img"] == {"generation": gen, "previous": "g1", "fingerprint": None}
    # the rotated pair is accepted by the next attach
    meta.clean = True
    assert plan_attach(meta, None, src, "/r.img", size=1 << 20).mode is AttachMode.BITMAP


def test_source_record_roundtrip(tmp_path: Path) -> None:
    path = tmp_path / "s.img.btsource"
    rec = SourceRecord.load(path)
    rec.replicas["k"] = {"generation": "a", "previous": "b", "fingerprint": [1, 2]}
    rec.save(path)
    again = SourceRecord.load(path)
    assert again.source_id == rec.source_id and again.replicas == rec.replicas
    path.write_text("[1, 2]")
    with pytest.raises(FormatError):
        SourceRecord.load(path)
    assert SourceRecord.load(None).source_id != rec.source_id
