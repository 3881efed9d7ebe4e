"""blocktrace.verify: first differing offset, differing block counts, sources by scheme."""

from __future__ import annotations

from pathlib import Path

import pytest

from blocktrace.errors import UsageError
from blocktrace.verify import compare, open_source, register_source, verify


class BytesSource:
    def __init__(self, name: str, data: bytes) -> None:
        self.name = name
        self.data = data
        self.size = len(data)

    def read(self, offset: int, length: int) -> bytes:
        return self.data[offset : offset + length]

    def close(self) -> None:
        pass


def test_identical_and_differences_across_chunks() -> None:
    a = bytes(5 * 4096 * 3 + 100)
    r = compare(BytesSource("a", a), BytesSource("b", a), chunk=8192)
    assert r.identical and r.differing_blocks == 0
    b = bytearray(a)
    b[4096 * 2 + 17] = 1  # block 2
    b[4096 * 2 + 4000] = 1  # same block
    b[4096 * 9] = 1  # block 9 (another chunk)
    b[-1] = 1  # the last, partial block
    r = compare(BytesSource("a", a), BytesSource("b", bytes(b)), chunk=8192)
    assert r.first_difference == 4096 * 2 + 17
    assert r.differing_blocks == 3  # blocks 2, 9 and the last
    assert r.total_blocks == -(-len(a) // 4096)


def test_size_mismatch_counts_the_extra_blocks() -> None:
    a = bytes(10000)
    b = bytes(10000) + b"\0" * 10000  # same common content, longer
    r = compare(BytesSource("a", a), BytesSource("b", b), block_size=4096)
    assert r.first_difference == 10000
    # Blocks 2 (partial in a), 3 and 4 exist only in full in b.
    assert r.differing_blocks == 3 and r.total_blocks == 5
    c = bytearray(b)
    c[9000] = 1  # block 2 differs in the common part too: counted once
    r = compare(BytesSource("a", a), BytesSource("c", bytes(c)), block_size=4096)
    assert r.first_difference == 9000 and r.differing_blocks == 3


def test_first_mismatch_is_exact_anywhere() -> None:
    base = bytes(65536)
    for pos in (0, 1, 63, 64, 65, 4095, 4096, 30000, 65535):
        other = bytearray(base)
        other[pos] = 9
        assert (
            compare(BytesSource("a", base), BytesSource("b", bytes(other))).first_difference == pos
        )


def test_sources_by_scheme(tmp_path: Path) -> None:
    p = tmp_path / "x.img"
    p.write_bytes(b"abc" * 1000)
    src = open_source(f"file://{p}")
    assert src.size == 3000 and src.read(3, 3) == b"abc"
    src.close()
    with pytest.raises(UsageError, match="unsupported source scheme"):
        open_source("gopher://localhost/x")
    register_source("mem", lambda spec: BytesSource(spec, b"abc" * 1000))
    assert verify(str(p), "mem://anything").identical
    with pytest.raises(UsageError):
        open_source(str(tmp_path / "missing"))
