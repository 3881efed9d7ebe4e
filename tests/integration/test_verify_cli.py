"""``blocktrace verify A B``: exit 0 identical, 1 different, one-line errors."""

from __future__ import annotations

from pathlib import Path

from support import blocktrace, make_image

MiB = 1024 * 1024


def test_verify_cli(tmp_path: Path) -> None:
    a = make_image(tmp_path / "a.img", 16 * MiB, seed=1)
    b = tmp_path / "b.img"
    b.write_bytes(a.read_bytes())
    res = blocktrace("verify", a, b)
    assert res.stdout.strip() == f"identical: {16 * MiB} bytes"
    with open(b, "r+b") as f:
        f.seek(5 * MiB + 3)
        f.write(b"\x00\x01\x02")
        f.seek(12 * MiB)
        f.write(b"x" * 8192)
    res = blocktrace("verify", a, b, check=False)
    assert res.returncode == 1
    assert f"first difference at byte {5 * MiB + 3}" in res.stdout
    assert "3 of 4096 blocks of 4096 bytes differ" in res.stdout
    res = blocktrace("verify", "--block-size", "1048576", a, b, check=False)
    assert "2 of 16 blocks" in res.stdout
    res = blocktrace("verify", a, tmp_path / "nope", check=False)
    assert res.returncode == 2 and res.stderr.startswith("blocktrace: cannot open")
    short = tmp_path / "short.img"
    short.write_bytes(a.read_bytes()[: 8 * MiB])
    res = blocktrace("verify", a, short, check=False)
    assert res.returncode == 1 and "sizes differ" in res.stdout
