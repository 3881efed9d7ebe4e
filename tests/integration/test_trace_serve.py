"""``blocktrace serve --trace``: real server process, real clients (libnbd, fio), real logs.

Every workload is checked the same way: the server is stopped (SIGTERM: traces end cleanly)
and the log, replayed onto the trace's base (the image before the workload, or an empty image
for ``sync=full``), must equal the final image byte for byte.  Plus: kill -9 keeps everything
acknowledged as durable; a full log disk under both ``on-target-error`` policies.
"""

from __future__ import annotations

import contextlib
import errno
import os
import random
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from blocktrace.logwrites.reader import LogReader
from blocktrace.logwrites.replay import replay
from support import ServerProcess, blocktrace, make_image, require, run

nbd = pytest.importorskip("nbd", reason="machine lacks python3-libnbd")

MiB = 1024 * 1024
SIZE = 32 * MiB


def drain(h: object, cookies: list[int], limit: int = 0) -> list[int]:
    """Wait until at most ``limit`` commands are in flight; raise on any failed one."""
    while len(cookies) > limit:
        h.poll(-1)  # type: ignore[attr-defined]
        cookies = [c for c in cookies if not h.aio_command_completed(c)]  # type: ignore[attr-defined]
    return cookies


def nbd_workload(uri: str, seed: int, *, conns: int = 3, ops: int = 400, depth: int = 8) -> None:
    """Random overlapping writes, zeroes, trims, FUA and flushes on ``conns`` connections,
    up to ``depth`` requests in flight on each."""
    rng = random.Random(seed)
    handles = []
    for _ in range(conns):
        h = nbd.NBD()
        h.connect_uri(uri)
        handles.append(h)
    pending: dict[int, list[int]] = {i: [] for i in range(conns)}
    keep = []  # buffers must outlive their commands
    hot = [rng.randrange(0, SIZE - MiB) for _ in range(4)]  # overlapping regions
    for _ in range(ops):
        i = rng.randrange(conns)
        h = handles[i]
        base = rng.choice(hot) if rng.random() < 0.6 else rng.randrange(0, SIZE - MiB)
        off = base + rng.randrange(0, 64) * 512
        ln = rng.choice([512, 4096, 4096, 65536, 3 * 512, 300000])
        flags = nbd.CMD_FLAG_FUA if rng.random() < 0.1 else 0
        r = rng.random()
        if r < 0.65:
            buf = nbd.Buffer.from_bytearray(bytearray(rng.randbytes(ln)))
            keep.append(buf)
            c = h.aio_pwrite(buf, off, flags=flags)
        elif r < 0.77:
            c = h.aio_zero(ln, off, flags=flags)
        elif r < 0.88:
            c = h.aio_trim(ln, off, flags=flags)
        else:
            c = h.aio_flush()
        pending[i].append(c)
        pending[i] = drain(h, pending[i], depth)
    for i, h in enumerate(handles):
        drain(h, pending[i])
        h.shutdown()


def check_replay(log: Path, base: Path, image: Path, work: Path) -> None:
    shutil.copyfile(base, work)
    replay(log, work)
    assert work.read_bytes() == image.read_bytes(), "log replay differs from the image"


@pytest.mark.parametrize("mode", ["background", "write-blocking"])
def test_libnbd_concurrent_workload_replays_to_final_image(tmp_path: Path, mode: str) -> None:
    img = make_image(tmp_path / "disk.img", SIZE, seed=1)
    base = tmp_path / "base.img"
    shutil.copyfile(img, base)
    log = tmp_path / "disk.log"
    with ServerProcess(tmp_path, [img], ["--trace", f"disk=log:{log},copy-mode={mode}"]) as srv:
        nbd_workload(srv.uri("disk"), seed=5)
    check_replay(log, base, img, tmp_path / "work.img")
    if shutil.which("replay-log"):
        work = tmp_path / "rl.img"
        shutil.copyfile(base, work)
        run(["replay-log", "--log", log, "--replay", work], timeout=60)
        assert work.read_bytes() == img.read_bytes(), "replay-log disagrees"


def test_two_traces_on_one_export_with_different_sector_sizes(tmp_path: Path) -> None:
    """512-byte requests under a 4096-byte log: records widened with the image's bytes."""
    img = make_image(tmp_path / "disk.img", SIZE, seed=2)
    base = tmp_path / "base.img"
    shutil.copyfile(img, base)
    a, b = tmp_path / "a.log", tmp_path / "b.log"
    args = [
        "--trace",
        f"disk=log:{a},job-id=a",
        "--trace",
        f"disk=log:{b},sync=full,sector-size=4096,copy-mode=write-blocking,job-id=b",
    ]
    with ServerProcess(tmp_path, [img], args) as srv:
        nbd_workload(srv.uri("disk"), seed=8, ops=300)
    check_replay(a, base, img, tmp_path / "work.img")
    check_replay(b, make_image(tmp_path / "empty.img", SIZE), img, tmp_path / "work.img")
    with LogReader(b) as reader:
        assert reader.super.sector_size == 4096


def test_fio_workload_sync_full_rebuilds_from_empty(tmp_path: Path) -> None:
    require("fio")
    img = make_image(tmp_path / "disk.img", SIZE)
    with open(img, "r+b") as f:  # some data before the trace starts, the rest holes
        for off in range(0, SIZE, 4 * MiB):
            f.seek(off)
            f.write(random.Random(off).randbytes(256 * 1024))
    log = tmp_path / "full.log"
    args = ["--trace", f"disk=log:{log},sync=full,queue-size=4M"]
    with ServerProcess(tmp_path, [img], args) as srv:
        run(
            [
                "fio",
                "--name=w",
                "--ioengine=nbd",
                f"--uri={srv.uri('disk')}",
                "--rw=randwrite",
                "--bssplit=4k/60:64k/30:1m/10",
                "--iodepth=16",
                "--numjobs=2",
                "--size=24M",
                "--io_size=16M",
                "--fsync=32",
                "--randrepeat=0",
                "--group_reporting",
            ],
            timeout=120,
        )
        run(
            [
                "fio",
                "--name=t",
                "--ioengine=nbd",
                f"--uri={srv.uri('disk')}",
                "--rw=randtrim",
                "--bs=64k",
                "--iodepth=4",
                "--size=24M",
                "--io_size=2M",
            ],
            timeout=120,
        )
    empty = make_image(tmp_path / "empty.img", SIZE)
    check_replay(log, empty, img, tmp_path / "work.img")


def test_kill9_log_holds_everything_acknowledged_durable(tmp_path: Path) -> None:
    img = make_image(tmp_path / "disk.img", SIZE)
    log = tmp_path / "crash.log"
    srv = ServerProcess(tmp_path, [img], ["--trace", f"disk=log:{log}"]).start()
    durable: dict[int, bytes] = {}  # offset -> data, acknowledged as durable
    rng = random.Random(3)
    try:
        h = nbd.NBD()
        h.connect_uri(srv.uri("disk"))
        unflushed: dict[int, bytes] = {}
        for n in range(600):
            off, data = n * 8192, rng.randbytes(4096)
            if rng.random() < 0.2:
                h.pwrite(data, off, nbd.CMD_FLAG_FUA)
                durable[off] = data
            else:
                h.pwrite(data, off)
                unflushed[off] = data
            if n % 50 == 49:
                h.flush()
                durable.update(unflushed)
                unflushed.clear()
        # more writes in flight, never acknowledged, then the crash
        bufs = [nbd.Buffer.from_bytearray(bytearray(rng.randbytes(65536))) for _ in range(32)]
        for i, b in enumerate(bufs):
            h.aio_pwrite(b, 600 * 8192 + i * 65536)
    finally:
        srv.kill()
    with LogReader(log) as reader:  # opens and verifies cleanly
        counted = reader.super.nr_entries
        assert counted >= len(durable)
    work = make_image(tmp_path / "work.img", SIZE)
    replay(log, work)
    got = work.read_bytes()
    missing = [off for off, data in durable.items() if got[off : off + 4096] != data]
    assert not missing, f"{len(missing)} acknowledged-durable writes missing after kill -9"


@contextlib.contextmanager
def small_tmpfs(path: Path, size: str = "2m") -> Iterator[Path]:
    require("mount", "umount")
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs for ENOSPC needs root")
    path.mkdir()
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    if proc.returncode != 0:
        pytest.skip(f"machine cannot mount a tmpfs: {proc.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=30)


def errname(exc: Exception) -> str:
    """libnbd's Error.errno is the errno *name* ("EIO"); normalise either form."""
    code = getattr(exc, "errno", None)
    return errno.errorcode.get(code, "?") if isinstance(code, int) else str(code)


def fill(uri: str, *, count: int = 96) -> tuple[int, str | None]:
    """Write 64 KiB blocks with a flush every 8; return (blocks written, errno of failure)."""
    h = nbd.NBD()
    h.connect_uri(uri)
    rng = random.Random(1)
    ok = 0
    try:
        for i in range(count):
            h.pwrite(rng.randbytes(65536), i * 65536)
            if i % 8 == 7:
                h.flush()
            ok += 1
    except nbd.Error as exc:
        return ok, errname(exc)
    finally:
        h.shutdown()
    return ok, None


def test_log_disk_full_report_fails_writes(tmp_path: Path) -> None:
    img = make_image(tmp_path / "disk.img", SIZE)
    with small_tmpfs(tmp_path / "full") as mnt:
        log = mnt / "disk.log"
        args = ["--trace", f"disk=log:{log},on-target-error=report"]
        with ServerProcess(tmp_path, [img], args) as srv:
            written, err = fill(srv.uri("disk"))
            assert err == "EIO" and 10 < written < 96
            # still failing: nothing diverges silently; reads still work
            h = nbd.NBD()
            h.connect_uri(srv.uri("disk"))
            with pytest.raises(nbd.Error) as exc:
                h.pwrite(b"x" * 4096, 95 * 65536)
            assert errname(exc.value) == "EIO"
            assert len(h.pread(4096, 0)) == 4096
            h.shutdown()
        assert "No space left on device" in srv.stderr()
        with LogReader(log) as reader:  # what reached the log reads cleanly
            assert reader.super.nr_entries > 0


def test_log_disk_full_break_ends_trace_and_clients_carry_on(tmp_path: Path) -> None:
    img = make_image(tmp_path / "disk.img", SIZE)
    with small_tmpfs(tmp_path / "full") as mnt:
        log = mnt / "disk.log"
        args = ["--trace", f"disk=log:{log},on-target-error=break,copy-mode=write-blocking"]
        with ServerProcess(tmp_path, [img], args) as srv:
            written, err = fill(srv.uri("disk"))
            assert err is None and written == 96
        assert "No space left on device" in srv.stderr()
        with LogReader(log) as reader:
            assert 0 < reader.super.nr_entries < 96
    data = img.read_bytes()
    assert data[95 * 65536 : 96 * 65536] == random.Random(1).randbytes(65536 * 96)[95 * 65536 :]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("disk=log:/nonexistent/dir/x.log", "no such directory"),
        ("other=log:{tmp}/x.log", "no export named 'other'"),
        ("disk=log:{tmp}/x.log,bogus=1", "unknown option 'bogus'"),
        ("disk=log:{tmp}/x.log,sync=maybe", "sync must be none|full"),
        ("disk=tape:{tmp}/x", "unknown target type 'tape'"),
    ],
)
def test_bad_trace_option_is_one_line_and_nonzero(tmp_path: Path, spec: str, message: str) -> None:
    img = make_image(tmp_path / "disk.img", MiB)
    sock = tmp_path / "s.sock"
    proc = blocktrace(
        "serve",
        img,
        "--socket",
        sock,
        "--trace",
        spec.format(tmp=tmp_path),
        check=False,
        timeout=30,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("blocktrace: "), proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert not sock.exists()
