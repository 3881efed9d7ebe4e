"""The README's first command ends in ``blocktrace demo``: it must work end to end."""

from __future__ import annotations

from pathlib import Path

from support import blocktrace, require


def test_demo_runs_and_replay_matches(tmp_path: Path) -> None:
    require("qemu-io", "nbdinfo")
    out = blocktrace("demo", tmp_path / "demo", timeout=300).stdout
    assert "replay == image" in out
    assert "identical" in out
    disk = (tmp_path / "demo" / "disk.img").read_bytes()
    assert disk == (tmp_path / "demo" / "replay.img").read_bytes()
    assert disk[:1] == b"\xab"  # qemu-io's first write really landed
    assert not (tmp_path / "demo" / "blocktrace.sock").exists()


def test_demo_log_has_fua_only_where_the_workload_says(tmp_path: Path) -> None:
    """The demo's workload names one FUA write; the log must agree (qemu-io's default
    writethrough cache would make every write FUA and the demo's description false)."""
    require("qemu-io", "nbdinfo")
    blocktrace("demo", tmp_path / "demo", timeout=300)
    listing = blocktrace("log", "list", tmp_path / "demo" / "disk.log").stdout
    fua = [line for line in listing.splitlines() if "FUA" in line]
    assert len(fua) == 1, listing
    assert "sector 8192, size 65536" in fua[0]
