"""Hostile and careless inputs to ``blocktrace log`` and ``blocktrace replay`` (issue #10).

The logs are built byte by byte the way the kernel and QEMU write them (no checksums), or with
our trailer where a checksum is what must be verified; every command runs as a real process.
Asserted: memory stays bounded whatever an entry's size claims (peak RSS from ``wait4``), a
replay never grows its target or writes outside it unless ``--grow`` is given, a bad entry is
reported in one line naming its index and byte offset (``--on-bad-entry`` picks stop or skip),
FIFOs and character devices are refused without blocking, and a block device (a loop device)
is a legitimate replay target.
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from blocktrace.logwrites.format import TRAILER, TRAILER_TAG, LogFlag
from support import blocktrace, make_image, require, run

MiB = 1024 * 1024
S = 512
MAGIC = 0x6A736677736872


def header(sector: int, nr_sectors: int, flags: int, *, trailer: int | None = None) -> bytes:
    """One header sector; ``trailer``: our checksum trailer with that (wrong) CRC, index 0."""
    buf = bytearray(S)
    struct.pack_into("<QQQQ", buf, 0, sector, nr_sectors, flags, 0)
    if trailer is not None:
        TRAILER.pack_into(buf, S - TRAILER.size, TRAILER_TAG, trailer, 1, 0, 0)
    return bytes(buf)


def write_log(path: Path, entries: list[tuple[bytes, bytes | int]]) -> Path:
    """Super + entries; an entry's data given as an int is that many sparse (hole) bytes."""
    with open(path, "wb") as f:
        f.write(struct.pack("<QQQI", MAGIC, 1, len(entries), S).ljust(S, b"\0"))
        for hdr, data in entries:
            f.write(hdr)
            if isinstance(data, int):
                f.seek(data, os.SEEK_CUR)
                f.truncate(f.tell())
            else:
                f.write(data)
    return path


#: Runs the CLI in the child and, at exit, writes the child's own peak RSS (``VmHWM`` of its
#: fresh address space) to argv[1].  ``ru_maxrss`` from ``wait4`` is not usable: Linux carries
#: the forking parent's high-water mark across ``exec``, so a large pytest process would be
#: counted as the child's.
_PEAK_WRAPPER = """
import atexit, sys
out = sys.argv.pop(1)
def report():
    with open("/proc/self/status") as f:
        hwm = [line for line in f if line.startswith("VmHWM:")][0]
    with open(out, "w") as f:
        f.write(str(int(hwm.split()[1]) * 1024))
atexit.register(report)
from blocktrace.cli.main import main
sys.argv[0] = "blocktrace"
main()
"""


def run_with_peak_rss(
    tmp_path: Path, *args: str | os.PathLike[str], timeout: float = 600
) -> tuple[int, str, int]:
    """Run ``blocktrace ARGS``; return (exit status, stderr, the child's peak RSS in bytes)."""
    out = tmp_path / "peak-rss"
    out.unlink(missing_ok=True)
    r = subprocess.run(
        [sys.executable, "-c", _PEAK_WRAPPER, out, *map(os.fspath, args)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        timeout=timeout,
    )
    return r.returncode, r.stderr, int(out.read_text())


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


# -- item 4: memory bounded whatever an entry claims -----------------------------------------


def test_log_info_and_list_verify_a_huge_entry_in_bounded_memory(tmp_path: Path) -> None:
    # a sparse log: one checksummed 512 MiB entry whose CRC is wrong; before streaming, the
    # whole entry was read into memory to check it
    size = 512 * MiB
    log = write_log(tmp_path / "huge.log", [(header(0, size // S, 0, trailer=0x1234), size)])
    assert log.stat().st_blocks * 512 < MiB  # sparse: the log costs no disk
    for cmd in (("log", "info"), ("log", "list")):
        rc, err, peak = run_with_peak_rss(tmp_path, *cmd, log)
        assert rc == 1
        line = one_line(err)
        assert "entry 0 at byte 512: checksum mismatch" in line, line
        assert peak < 200 * MiB, f"{cmd}: peak RSS {peak >> 20} MiB for a {size >> 20} MiB entry"


def test_replay_applies_a_huge_entry_in_bounded_memory(tmp_path: Path) -> None:
    size = 160 * MiB
    log = write_log(tmp_path / "big.log", [(header(0, size // S, 0), size)])
    img = tmp_path / "img"
    with open(img, "wb") as f:
        f.truncate(size)
        f.seek(size - 4096)
        f.write(b"\xaa" * 4096)  # the replay must overwrite this with the entry's zeroes
    rc, err, peak = run_with_peak_rss(tmp_path, "replay", log, img)
    assert rc == 0, err
    assert peak < 120 * MiB, f"peak RSS {peak >> 20} MiB replaying a {size >> 20} MiB entry"
    with open(img, "rb") as f:
        f.seek(size - 4096)
        assert f.read() == bytes(4096)
    assert img.stat().st_size == size


def test_watch_reads_a_huge_entry_in_bounded_memory(tmp_path: Path) -> None:
    """``watch`` takes a log's entries as records: a huge entry comes as pieces of at most
    CHUNK_BYTES, never whole (before: the 512 MiB claimed by one header was read at once)."""
    require("mkfs.ext4")
    base = tmp_path / "base.img"
    with open(base, "wb") as f:
        f.truncate(1024 * MiB)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(base)], check=True, capture_output=True)
    size = 512 * MiB
    log = write_log(tmp_path / "huge.log", [(header(256 * MiB // S, size // S, 0), size)])
    assert log.stat().st_blocks * 512 < MiB  # sparse: the log costs no disk
    rc, err, peak = run_with_peak_rss(tmp_path, "watch", base, log)
    assert rc == 0, err
    assert peak < 200 * MiB, f"peak RSS {peak >> 20} MiB for a {size >> 20} MiB entry"


# -- item 5: a hostile log never grows the target nor writes outside it ----------------------


def hostile_log(tmp_path: Path, bad: bytes) -> Path:
    """A valid write at sector 0, the ``bad`` header, then a valid write at sector 8."""
    return write_log(
        tmp_path / "hostile.log",
        [
            (header(0, 1, 0), b"\x11" * S),
            (bad, b""),
            (header(8, 1, 0), b"\x22" * S),
        ],
    )


BAD_ENTRIES = {
    # a 4 TiB DISCARD on a 1 MiB target: used to grow it to 4 TiB
    "discard-4TiB": (header(0, (4 << 40) // S, LogFlag.DISCARD), "DISCARD of 4398046511104"),
    # length overflows the file offset: used to fall back to writing zeroes, forever
    "discard-overflow": (
        header(1, (1 << 64) - 1, LogFlag.DISCARD),
        "ends past the largest file offset",
    ),
    # offset past the end, and past what pwrite takes (OverflowError) / ext4 allows (EFBIG)
    "discard-far": (header(1 << 60, 1, LogFlag.DISCARD), "ends past the largest file offset"),
    "discard-past-end": (header(2048, 8, LogFlag.DISCARD), "ends past the target's 1048576"),
}


@pytest.mark.parametrize("case", sorted(BAD_ENTRIES))
def test_replay_stops_at_an_entry_outside_the_target(tmp_path: Path, case: str) -> None:
    bad, why = BAD_ENTRIES[case]
    log = hostile_log(tmp_path, bad)
    img = make_image(tmp_path / "img", MiB, seed=3)
    before = img.read_bytes()
    r = blocktrace("replay", log, img, check=False, timeout=60)
    assert r.returncode == 1
    line = one_line(r.stderr)
    assert f"{log}: entry 1 at byte {3 * S}: " in line and why in line, line
    after = img.read_bytes()
    assert len(after) == MiB  # never grown
    assert after[:S] == b"\x11" * S and after[S:] == before[S:]  # stopped at the bad entry


@pytest.mark.parametrize("case", sorted(BAD_ENTRIES))
def test_replay_skip_policy_skips_the_bad_entry_and_goes_on(tmp_path: Path, case: str) -> None:
    bad, why = BAD_ENTRIES[case]
    log = hostile_log(tmp_path, bad)
    img = make_image(tmp_path / "img", MiB, seed=3)
    before = img.read_bytes()
    r = blocktrace("replay", "--on-bad-entry", "skip", log, img, timeout=60)
    warning, summary = r.stderr.strip().splitlines()
    assert warning.startswith(f"blocktrace: warning: skipped {log}: entry 1 at byte {3 * S}: ")
    assert why in warning
    assert "1 skipped" in summary
    after = img.read_bytes()
    assert len(after) == MiB
    assert after[:S] == b"\x11" * S and after[8 * S : 9 * S] == b"\x22" * S
    assert after[S : 8 * S] == before[S : 8 * S] and after[9 * S :] == before[9 * S :]


def test_writes_past_the_end_are_refused_and_grow_extends_only_when_asked(tmp_path: Path) -> None:
    log = write_log(tmp_path / "w.log", [(header(4096, 2, 0), b"\x33" * 2 * S)])  # at 2 MiB
    img = make_image(tmp_path / "img", MiB, seed=4)
    r = blocktrace("replay", log, img, check=False)
    assert r.returncode == 1
    assert "write of 1024 bytes at byte 2097152 ends past the target's 1048576" in one_line(
        r.stderr
    )
    assert img.stat().st_size == MiB
    blocktrace("replay", "--grow", log, img)
    assert img.stat().st_size == 2 * MiB + 2 * S
    with open(img, "rb") as f:
        f.seek(2 * MiB)
        assert f.read() == b"\x33" * 2 * S
    # --grow still refuses what no file can hold, in one line
    far = write_log(tmp_path / "far.log", [(header(1 << 60, 1, 0), b"\x44" * S)])
    r = blocktrace("replay", "--grow", far, img, check=False)
    assert r.returncode == 1 and "largest file offset" in one_line(r.stderr)
    assert img.stat().st_size == 2 * MiB + 2 * S


def test_grow_failure_from_the_file_system_is_one_line(tmp_path: Path) -> None:
    # ext4 (and most file systems) cap a file below the largest offset: EFBIG, named
    log = write_log(tmp_path / "e.log", [(header((1 << 62) // S, 1, 0), b"\x55" * S)])
    img = make_image(tmp_path / "img", MiB, seed=5)
    r = blocktrace("replay", "--grow", log, img, check=False)
    if r.returncode == 0:
        pytest.skip("this file system holds a file of 4 EiB")
    line = one_line(r.stderr)
    assert "entry 0 (log byte 512)" in line, line
    assert img.stat().st_size == MiB


# -- item 6: FIFOs and character devices -------------------------------------------------------


def test_log_commands_refuse_a_fifo_and_a_character_device_without_blocking(
    tmp_path: Path,
) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for path, kind in ((fifo, "a FIFO"), (Path("/dev/zero"), "a character device")):
        for cmd in (("log", "info"), ("log", "list"), ("log", "find", "--next-flush")):
            r = blocktrace(*cmd, path, check=False, timeout=20)
            assert r.returncode == 1
            assert f"not a regular file or block device ({kind})" in one_line(r.stderr)
        img = make_image(tmp_path / "img", MiB)
        r = blocktrace("replay", path, img, check=False, timeout=20)
        assert r.returncode == 1 and kind in one_line(r.stderr)


def test_replay_refuses_character_device_and_fifo_targets(tmp_path: Path) -> None:
    log = write_log(tmp_path / "ok.log", [(header(0, 1, 0), b"\x66" * S)])
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    r = blocktrace("replay", log, "/dev/zero", check=False, timeout=20)
    assert r.returncode == 2
    assert "is a character device, not a regular file or block device" in one_line(r.stderr)
    r = blocktrace("replay", log, fifo, check=False, timeout=20)  # no reader: must not block
    assert r.returncode == 2 and str(fifo) in one_line(r.stderr)


def test_replay_onto_a_loop_device(tmp_path: Path) -> None:
    if os.geteuid() != 0 or shutil.which("losetup") is None:
        pytest.skip("needs root and losetup")
    backing = make_image(tmp_path / "backing.img", 4 * MiB, seed=9)
    probe = subprocess.run(
        ["losetup", "--find", "--show", str(backing)], capture_output=True, text=True
    )
    if probe.returncode != 0:
        pytest.skip(f"no loop device: {probe.stderr.strip()}")
    dev = probe.stdout.strip()
    try:
        log = write_log(
            tmp_path / "d.log",
            [
                (header(8, 2, 0), b"\x77" * 2 * S),
                (header(16, 8, LogFlag.DISCARD), b""),
                (header(8192, 1, 0), b"\x88" * S),  # past the device's 4 MiB: refused
            ],
        )
        r = blocktrace("replay", log, dev, check=False)
        assert r.returncode == 1
        assert f"entry 2 at byte {5 * S}" in one_line(r.stderr)
        r = blocktrace("replay", "--on-bad-entry", "skip", "--grow", log, dev)
        assert "1 skipped" in r.stderr  # a device never grows, --grow or not
    finally:
        run(["losetup", "-d", dev])
    data = backing.read_bytes()
    assert len(data) == 4 * MiB
    assert data[8 * S : 10 * S] == b"\x77" * 2 * S and data[16 * S : 24 * S] == bytes(8 * S)
