"""The pending set's bulk fast path (``PendingData.run``) must leave exactly the state and
counters of the per-block reference loop (``PendingData.per_block``), whichever caps bind."""

from __future__ import annotations

import random
import subprocess
from pathlib import Path

import pytest

from blocktrace.ext4.engine import Ext4Engine
from blocktrace.ext4.fs import FileSource
from support import require

BS = 1024


@pytest.mark.parametrize(
    ("max_pending", "max_bytes"),
    [(1 << 18, 64 << 20), (1 << 18, 20 * BS), (40, 1 << 30), (40, 30 * BS), (25, 0)],
)
def test_fast_path_matches_per_block_policy(
    tmp_path: Path, max_pending: int, max_bytes: int
) -> None:
    require("mkfs.ext4")
    img = tmp_path / "p.img"
    with open(img, "wb") as f:
        f.truncate(8 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-b", str(BS), str(img)], check=True)
    fast, ref = (
        Ext4Engine(FileSource(img), max_pending=max_pending, max_pending_bytes=max_bytes)
        for _ in range(2)
    )
    rng = random.Random(max_pending * 31 + max_bytes)
    for record in range(300):
        start = rng.randrange(2000, 7000)
        count = rng.choice([1, 2, 5, 16, 64])
        skew = rng.choice([0, 0, 0, 100])  # a write not aligned to blocks: partial ends
        offset = start * BS + skew
        data = memoryview(rng.randbytes(count * BS - skew))
        first, end = offset // BS, (offset + len(data) - 1) // BS + 1
        fast.pend.run(first, end, record, offset, data)
        ref.pend.per_block(first, end, record, offset, data)
        if rng.random() < 0.2:  # some get claimed, as a commit would
            lo = rng.randrange(2000, 7000)
            assert fast.claim_pending(lo, 50) == ref.claim_pending(lo, 50)
        assert list(fast.pending.items()) == list(ref.pending.items())
        assert list(fast.pending_data.items()) == list(ref.pending_data.items())
        assert fast.stats == ref.stats
    assert fast.stats.pending_blocks > 0
