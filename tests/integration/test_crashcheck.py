"""``blocktrace crashcheck`` and ``blocktrace record`` with the real kernel and real tools.

Workloads run on the Linux ext4 and XFS drivers through blocktrace's own traced NBD server,
nbdfuse and a loop device (``blocktrace record``); crash points are checked by mounting views
(the kernel's journal/log recovery) and e2fsck -fn / xfs_repair -n.  Damaged logs are made
from real recordings by moving one write across a flush (crash_damage.py): a well-formed log
whose order a buggy file system could have produced.  Every test ends by checking that no
mount, loop device or nbdfuse process of the run is left behind.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from crash_damage import (
    JBD2_COMMIT,
    JBD2_DESCRIPTOR,
    Op,
    jbd2_blocks,
    load,
    next_flush,
    save,
    xfs_log_sectors,
)

from blocktrace.logwrites.format import LogFlag
from blocktrace.logwrites.reader import LogReader
from blocktrace.logwrites.writer import LogWriter
from support import BLOCKTRACE, require, require_fuse_and_loop

WORKLOAD = """set -e
blocktrace mark start
pwd > where
for i in 1 2 3; do mkdir d$i; head -c 30000 /dev/urandom > d$i/f; sync; done
blocktrace mark middle
mv d1 d4; rm -r d2; echo hello > d3/g; sync
blocktrace mark end
"""


def leftovers(root: Path) -> list[str]:
    """Mounts, loop devices and nbdfuse processes that mention ``root``."""
    found: list[str] = []
    with open("/proc/mounts") as f:
        found += [f"mount: {line.strip()}" for line in f if str(root) in line]
    loops = subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout
    found += [f"loop: {line}" for line in loops.splitlines() if str(root) in line]
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "nbdfuse" in cmd and str(root) in cmd:
            found.append(f"process {pid}: {cmd}")
    return found


@pytest.fixture
def views(tmp_path: Path) -> Iterator[Path]:
    """The --tmpdir of a test's runs; afterwards it must be empty and nothing left mounted."""
    require_fuse_and_loop()
    d = tmp_path / "views"
    d.mkdir()
    yield d
    assert leftovers(tmp_path) == []
    assert os.listdir(d) == [], "run directories are removed"


def env_with(tmpdir: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["TMPDIR"] = str(tmpdir)  # record's private socket directory goes there too
    env["PATH"] = f"{Path(BLOCKTRACE[0]).parent}:{env.get('PATH', '')}"
    return env


def bt(*args: str | Path, tmpdir: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*BLOCKTRACE, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env_with(tmpdir),
    )


def crashcheck(log: Path, base: Path, *args: str, tmpdir: Path) -> tuple[int, dict[str, Any]]:
    proc = bt("crashcheck", log, base, "--json", "--tmpdir", tmpdir, *args, tmpdir=tmpdir)
    assert proc.returncode in (0, 1), proc.stderr
    return proc.returncode, json.loads(proc.stdout)


def recorded(tmp: Path, fs: str, size: str) -> tuple[Path, Path, dict[str, Any]]:
    """Run WORKLOAD under ``blocktrace record`` (which also crashchecks the flush points)."""
    views = tmp / "views"
    views.mkdir(exist_ok=True)
    script = tmp / "workload.sh"
    script.write_text(WORKLOAD)
    out = tmp / "rec"
    proc = bt(
        "record", "-o", out, "--fs", fs, "--size", size, "--json", "--", "sh", script, tmpdir=views
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert leftovers(tmp) == [] and os.listdir(views) == []
    return out / "trace.log", out / "base.img", json.loads(proc.stdout)


@pytest.fixture(scope="module")
def ext4_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[str, Any]]:
    require_fuse_and_loop()
    require("mkfs.ext4", "e2fsck")
    return recorded(tmp_path_factory.mktemp("ext4"), "ext4", "32M")


@pytest.fixture(scope="module")
def xfs_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[str, Any]]:
    require_fuse_and_loop()
    require("mkfs.xfs", "xfs_repair")
    with open("/proc/filesystems") as f:
        if "xfs" not in f.read():
            pytest.skip("the kernel has no XFS driver (not in /proc/filesystems)")
    return recorded(tmp_path_factory.mktemp("xfs"), "xfs", "300M")


def flush_entries(log: Path) -> list[int]:
    with LogReader(log) as r:
        return [e.index for e in r.entries() if e.flags & LogFlag.FLUSH]


def marks(log: Path) -> dict[str, int]:
    with LogReader(log) as r:
        return {e.mark: e.index for e in r.entries() if e.mark is not None}


# -- a healthy workload -----------------------------------------------------------------------


def test_record_runs_the_workload_in_the_mount_and_every_flush_point_passes(
    ext4_run: tuple[Path, Path, dict[str, Any]],
) -> None:
    log, base, report = ext4_run
    flushes = flush_entries(log)
    assert len(flushes) >= 5
    assert report["failed"] == 0 and report["check"] == "ext4"
    assert [r["entry"] for r in report["results"]] == flushes
    assert all(r["passed"] and r["kind"] == "flush" for r in report["results"])
    m = marks(log)
    assert {"start", "middle", "end"} <= set(m), "blocktrace mark reached the log"
    assert m["start"] < m["middle"] < m["end"]
    inside = [r for r in report["results"] if m["start"] < r["entry"] < m["middle"]]
    assert inside and all(
        (r["mark_before"], r["mark_after"]) == ("start", "middle") for r in inside
    )
    where = subprocess.run(
        ["debugfs", "-R", "cat /where", str(log.parent / "disk.img")],
        capture_output=True,
        text=True,
    ).stdout
    assert "mnt-record" in where, "the workload ran with the mount as its cwd"
    assert base.stat().st_size == 32 << 20


def test_views_equal_a_full_replay_at_every_point_with_parallel_jobs(
    ext4_run: tuple[Path, Path, dict[str, Any]], views: Path, tmp_path: Path
) -> None:
    """The copy-on-write view a checker sees at entry p, read through NBD, nbdfuse and the
    loop device while the replay has moved on for the other job, is byte for byte the image
    `blocktrace replay --limit p+1` makes from a full copy (the plain approach)."""
    log, base, _ = ext4_run
    check = (
        f'cp --sparse=always {base} "$BLOCKTRACE_SCRATCH/copy" && '
        f'blocktrace replay --limit $((BLOCKTRACE_POINT + 1)) {log} "$BLOCKTRACE_SCRATCH/copy" && '
        'cmp "$BLOCKTRACE_SCRATCH/copy" "$BLOCKTRACE_VIEW" && '
        'cmp "$BLOCKTRACE_SCRATCH/copy" "$BLOCKTRACE_DEVICE"; rc=$?; '
        'rm -f "$BLOCKTRACE_SCRATCH/copy"; exit $rc'
    )
    rc, report = crashcheck(
        log,
        base,
        "--points",
        "all",
        "--entries",
        "0:40",
        "--jobs",
        "2",
        "--check",
        check,
        tmpdir=views,
    )
    assert rc == 0, [r["output"] for r in report["results"] if not r["passed"]]
    assert report["checked"] == 41


# -- damaged logs -----------------------------------------------------------------------------


def journal_block_after_flush(log: Path, out: Path) -> tuple[Path, int, int]:
    """ "A flush moved earlier": the first journaled block of a transaction reaches the disk
    only after the flush that follows its commit.  Returns (log, the first flush point that
    lacks the block, the entry index of the descriptor)."""
    sector_size, ops = load(log)
    spb = 4096 // sector_size
    for d, op in enumerate(ops):
        if jbd2_blocks(op, JBD2_DESCRIPTOR)[:1] != [0] or marks(log).get("start", 1 << 60) > d:
            continue
        c = next(i for i in range(d, len(ops)) if jbd2_blocks(ops[i], JBD2_COMMIT))
        f = next_flush(ops, c)
        target = op.sector + spb  # the journal block after the descriptor
        w = next(
            i
            for i in range(d, c)
            if ops[i].data and ops[i].sector <= target < ops[i].sector + ops[i].nr_sectors
        )
        src = ops[w]
        k = (target - src.sector) * sector_size
        pieces = [
            Op(src.flags, src.sector, k // sector_size, src.data[:k], None),
            Op(
                src.flags,
                target + spb,
                src.nr_sectors - (k // sector_size) - spb,
                src.data[k + 4096 :],
                None,
            ),
        ]
        pieces = [p for p in pieces if p.nr_sectors > 0]
        moved = Op(0, target, spb, src.data[k : k + 4096], None)
        new = ops[:w] + pieces + ops[w + 1 : f + 1] + [moved] + ops[f + 1 :]
        return save(out, sector_size, new), f + len(pieces) - 1, d
    raise AssertionError("no journal transaction after the start mark")


def test_ext4_journal_block_after_the_flush_fails_at_that_flush(
    ext4_run: tuple[Path, Path, dict[str, Any]], views: Path, tmp_path: Path
) -> None:
    log, base, _ = ext4_run
    bad, expected, _ = journal_block_after_flush(log, tmp_path / "bad.log")
    rc, report = crashcheck(bad, base, tmpdir=views)
    assert rc == 1
    failed = [r for r in report["results"] if not r["passed"]]
    assert report["first_failure"] == expected == failed[0]["entry"]
    assert all(r["passed"] for r in report["results"] if r["entry"] < expected)
    first = failed[0]
    assert first["kind"] == "flush" and first["stage"] in ("mount", "fsck")
    assert first["output"].strip(), "the checker's output is in the report"
    assert (first["mark_before"], first["mark_after"]) in (("start", "middle"), ("middle", "end"))
    assert any("checksum" in a for a in first["anomalies"]), first["anomalies"]
    assert first["transaction"] is None or first["transaction"] < expected
    # the human report says the same
    proc = bt("crashcheck", bad, base, "--tmpdir", views, tmpdir=views)
    assert proc.returncode == 1
    assert f"FAIL entry {expected} (flush)" in proc.stdout
    assert "introspection:" in proc.stdout and "first failure" in proc.stdout


def test_ext4_dropped_journal_commit_fails_while_its_blocks_go_home(
    ext4_run: tuple[Path, Path, dict[str, Any]], views: Path, tmp_path: Path
) -> None:
    """ "A journal commit dropped": without the first transaction's commit block, recovery
    stops at the journal's tail and replays nothing, so the points where the transaction's
    metadata is partly written home (its write-back after the commit) are inconsistent.
    Every point up to the drop is the healthy log's; failures start inside the window
    between the dropped commit and the next one, and e2fsck says why."""
    log, base, _ = ext4_run
    sector_size, ops = load(log)
    commits = [i for i, op in enumerate(ops) if jbd2_blocks(op, JBD2_COMMIT)]
    assert len(commits) >= 2
    c0, c1 = commits[0], commits[1] - 1  # c1: the second commit, once c0 is gone
    bad = save(tmp_path / "bad.log", sector_size, ops[:c0] + ops[c0 + 1 :])
    rc, report = crashcheck(
        bad, base, "--points", "all", "--entries", f"{c0}:{c1}", "-j", "2", tmpdir=views
    )
    assert rc == 1
    failed = [r for r in report["results"] if not r["passed"]]
    assert c0 <= failed[0]["entry"] < c1
    assert failed[0]["stage"] == "fsck" and "e2fsck" in failed[0]["output"]
    rc, _ = crashcheck(
        log, base, "--points", "all", "--entries", f"{c0}:{c1 + 1}", "-j", "2", tmpdir=views
    )
    assert rc == 0, "the same window of the undamaged log passes everywhere"


def test_bisect_finds_the_first_failing_point_in_fewer_checks(
    ext4_run: tuple[Path, Path, dict[str, Any]], views: Path, tmp_path: Path
) -> None:
    """Bisection over a window whose last point fails finds the first failing point with
    O(log n) checks.  Over the whole log it finds nothing: the moved block lands later and
    the end state is clean, the non-monotonic case the docs warn about."""
    log, base, _ = ext4_run
    bad, expected, _ = journal_block_after_flush(log, tmp_path / "bad.log")
    rc, report = crashcheck(
        bad, base, "--points", "all", "--entries", f":{expected}", "--bisect", tmpdir=views
    )
    assert rc == 1 and report["bisect"]
    assert report["first_failure"] == expected
    assert report["points"] == expected + 1
    assert report["checked"] <= (expected + 1).bit_length() + 1
    rc, report = crashcheck(bad, base, "--points", "all", "--bisect", tmpdir=views)
    assert rc == 0 and report["checked"] == 1, "only the (clean) last point was probed"


def test_xfs_overwrite_reordered_before_the_log_fails_at_the_next_flush(
    xfs_run: tuple[Path, Path, dict[str, Any]], views: Path, tmp_path: Path
) -> None:
    """Unmount-time metadata overwrites (the AIL push) moved before the log records that make
    them safe: XFS write-ahead logging violated.  The first flush point after the moved
    write must fail, through xfs_repair -n or a refused mount; every point before passes."""
    log, base, healthy = xfs_run
    assert healthy["failed"] == 0 and healthy["check"] == "xfs"
    sector_size, ops = load(log)
    m = marks(log)
    # The first in-place metadata write after "end".  Not simply the first write: a
    # transaction that committed after the workload's last sync (deferred inode inactivation
    # of the removed files, run by a background worker) is forced to the log at unmount, and
    # whether that log write lands before or after the "end" mark depends on timing.
    journal = xfs_log_sectors(base)
    w = next(i for i in range(m["end"], len(ops)) if ops[i].data and ops[i].sector not in journal)
    at = m["start"] + 1
    new = [*ops[:at], ops[w], *ops[at:w], *ops[w + 1 :]]
    bad = save(tmp_path / "bad.log", sector_size, new)
    expected = next_flush(new, at)
    rc, report = crashcheck(bad, base, tmpdir=views)
    assert rc == 1
    assert report["first_failure"] == expected
    assert all(r["passed"] for r in report["results"] if r["entry"] < expected)
    first = next(r for r in report["results"] if not r["passed"])
    assert first["stage"] in ("mount", "fsck") and first["output"].strip()
    assert first["mark_before"] == "start"


# -- hostile logs and failing tools -----------------------------------------------------------


def small_base(tmp_path: Path) -> Path:
    base = tmp_path / "base.img"
    base.write_bytes(bytes(1 << 20))
    return base


@pytest.mark.parametrize("damage", ["not-a-log", "beyond-base", "truncated", "flipped"])
def test_hostile_log_is_one_clear_line(tmp_path: Path, views: Path, damage: str) -> None:
    base = small_base(tmp_path)
    log = tmp_path / "h.log"
    w = LogWriter.create(log, direct=False)
    w.write(0, b"a" * 4096)
    w.flush()
    if damage == "beyond-base":
        w.write((1 << 20) - 512, b"b" * 4096)
    else:
        w.write(8192, b"b" * 4096)
    w.flush()
    w.close()
    raw = bytearray(log.read_bytes())
    if damage == "not-a-log":
        raw[:8] = b"garbage!"
    elif damage == "truncated":
        raw = raw[: 512 * 4]
    elif damage == "flipped":
        raw[512 * 2 + 100] ^= 0xFF  # inside entry 0's data
    log.write_bytes(bytes(raw))
    proc = bt(
        "crashcheck",
        log,
        base,
        "--points",
        "all",
        "--check",
        "true",
        "--tmpdir",
        views,
        tmpdir=views,
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("blocktrace: "), proc.stderr
    expect = {
        "not-a-log": "magic",
        "beyond-base": "beyond the base",
        "truncated": "entry",
        "flipped": "checksum",
    }[damage]
    assert expect in lines[0].lower(), lines[0]
    assert base.read_bytes() == bytes(1 << 20), "the base is never written"


@pytest.mark.parametrize("check", [None, "true"])
def test_missing_base_is_one_clear_line(tmp_path: Path, check: str | None) -> None:
    log = tmp_path / "t.log"
    LogWriter.create(log, direct=False).close()
    extra = ["--check", check] if check else []
    proc = bt("crashcheck", log, tmp_path / "nope.img", *extra, tmpdir=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("blocktrace: ") and "nope.img" in proc.stderr


def test_checker_timeout_and_forgotten_mount_are_cleaned_up(
    tmp_path: Path, views: Path, ext4_run: tuple[Path, Path, dict[str, Any]]
) -> None:
    """A checker that mounts the view and never returns is killed; the mount, the loop
    device and nbdfuse still go away (the `views` fixture checks)."""
    log, base, _ = ext4_run
    check = 'mount "$BLOCKTRACE_DEVICE" "$BLOCKTRACE_SCRATCH" && sleep 60'
    rc, report = crashcheck(
        log, base, "--entries", ":20", "--timeout", "2", "--check", check, tmpdir=views
    )
    assert rc == 1
    assert all(not r["passed"] and "killed after" in r["output"] for r in report["results"])


def test_mark_outside_record_says_why(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BLOCKTRACE_")}
    proc = subprocess.run(
        [*BLOCKTRACE, "mark", "x"], capture_output=True, text=True, env=env, timeout=60
    )
    assert proc.returncode == 2
    assert "not inside `blocktrace record`" in proc.stderr


def test_record_refuses_to_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious").write_text("keep")
    proc = bt("record", "-o", out, "--no-check", "--", "true", tmpdir=tmp_path)
    assert proc.returncode == 2 and "refusing to overwrite" in proc.stderr
    assert os.listdir(out) == ["precious"]
    shutil.rmtree(out)


def test_vfat_check_judges_the_fat_without_mounting(tmp_path: Path, views: Path) -> None:
    """FAT has no journal: fsck.vfat -n reads the view as a file (no kernel vfat driver
    needed).  The fresh file system passes; after a write that makes the two FAT copies
    disagree (a FAT update torn between its copies) the next flush point fails."""
    require("mkfs.vfat", "fsck.vfat")
    base = tmp_path / "fat.img"
    with open(base, "wb") as f:
        f.truncate(32 << 20)
    proc = subprocess.run(["mkfs.vfat", "-F", "16", str(base)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    raw = base.read_bytes()
    reserved = int.from_bytes(raw[14:16], "little")  # BPB: reserved sectors before FAT 1
    log = tmp_path / "fat.log"
    w = LogWriter.create(log, direct=False)
    w.write(4096, raw[4096:8192])  # 0: rewrites what is there: harmless
    w.flush()  # 1
    w.mark("tear")  # 2
    w.write(reserved * 512 + 512, b"\xff" * 512)  # 3: FAT 1 claims clusters; FAT 2 does not
    w.flush()  # 4
    w.close()
    rc, report = crashcheck(log, base, "--points", "flush", tmpdir=views)
    assert rc == 1 and report["check"] == "vfat", "detected from the boot sector"
    assert [(r["entry"], r["passed"]) for r in report["results"]] == [(1, True), (4, False)]
    bad = report["results"][1]
    assert bad["stage"] == "fsck" and "fsck.vfat" in bad["output"]
    assert bad["mark_before"] == "tear"


def test_progress_bar_with_eta_on_a_terminal(
    ext4_run: tuple[Path, Path, dict[str, Any]], views: Path
) -> None:
    """On a terminal (script(1) gives one) stderr shows a bar counting points, with an ETA."""
    require("script")
    log, base, _ = ext4_run
    cmd = " ".join(
        [*BLOCKTRACE, "crashcheck", str(log), str(base), "--entries", ":30", "--tmpdir", str(views)]
    )
    proc = subprocess.run(
        ["script", "-qec", cmd, "/dev/null"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env_with(views),
    )
    assert proc.returncode == 0, proc.stdout
    assert "crash points" in proc.stdout and "ETA" in proc.stdout
    n = sum(1 for e in flush_entries(log) if e <= 30)
    assert f"{n}/{n}" in proc.stdout.replace(" ", "")


def test_a_dead_nbdfuse_is_still_unmounted(
    ext4_run: tuple[Path, Path, dict[str, Any]], views: Path
) -> None:
    """A checker that kills the view's nbdfuse leaves a FUSE mount whose server is gone
    ("transport endpoint is not connected"): teardown must still unmount it (the `views`
    fixture checks that no mount, loop device or process is left)."""
    log, base, _ = ext4_run
    check = (
        'fuse=$(dirname "$BLOCKTRACE_VIEW"); '
        "for p in /proc/[0-9]*; do "
        'grep -qa "nbdfuse.$fuse" "$p/cmdline" 2>/dev/null && kill -9 "${p#/proc/}"; '
        "done; sleep 0.5; exit 1"
    )
    rc, report = crashcheck(log, base, "--entries", ":10", "--check", check, tmpdir=views)
    assert rc == 1 and report["failed"] == report["checked"] >= 1


def test_a_huge_entry_is_applied_in_bounded_memory(tmp_path: Path, views: Path) -> None:
    """An entry's size is the log's claim: crashcheck applies it piece by piece, never
    holding it whole (before: ``read_data`` held all 160 MiB of it)."""
    from test_logwrites_hostile import run_with_peak_rss

    base = tmp_path / "base.img"
    with open(base, "wb") as f:
        f.truncate(192 << 20)
    log = tmp_path / "big.log"
    w = LogWriter.create(log, direct=False)
    w.write(4096, os.urandom(1 << 20) * 160)
    w.flush()
    w.close()
    rc, err, peak = run_with_peak_rss(
        tmp_path,
        "crashcheck",
        log,
        base,
        "--points",
        "flush",
        "--check",
        "true",
        "--tmpdir",
        views,
    )
    assert rc == 0, err
    assert peak < 120 << 20, f"peak RSS {peak >> 20} MiB for a 160 MiB entry"
