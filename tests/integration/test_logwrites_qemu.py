"""QEMU's blklogwrites as an independent producer: its logs replay to its own image.

qemu-io drives a ``driver=blklogwrites`` node in sessions of random writes, zeroes, discards,
FUA writes and flushes; after each session the image is snapshotted.  Our replay of the whole
log onto the base must equal QEMU's final image, and prefix replays (``--limit`` at each
session end, ``--next-flush``) must equal the snapshots.  QEMU also appends to our log.
"""

from __future__ import annotations

import random
import shutil
import subprocess
from pathlib import Path

import pytest

from blocktrace.logwrites.reader import LogReader
from blocktrace.logwrites.replay import ReplayOptions, replay
from blocktrace.logwrites.writer import LogWriter
from support import blocktrace, make_image, require, run, wait_for_socket

MiB = 1024 * 1024
SIZE = 8 * MiB


def qemu_io(image: Path, log: Path, cmds: list[str], *, append: bool) -> None:
    opts = (
        f"driver=blklogwrites,file.driver=file,file.filename={image},"
        f"log.driver=file,log.filename={log},"
        + ("log-append=on" if append else "log-sector-size=512")
    )
    # writeback: the default writethrough mode adds FLUSH entries of its own.
    args = ["qemu-io", "-t", "writeback", "-d", "unmap", "--image-opts", opts]
    for c in cmds:
        args += ["-c", c]
    run(args, timeout=60)


def random_session(rng: random.Random, *, fua: bool) -> list[str]:
    """Random ops ending in a flush; ``fua=False``: no FUA and no other flush either."""
    cmds = []
    for _ in range(rng.randint(4, 10)):
        off = rng.randrange(SIZE // 512 - 256) * 512
        length = rng.randint(1, 256) * 512
        kind = rng.choices(
            ["write", "zero", "zero-unmap", "discard", "fua", "flush"],
            [6, 1, 1, 2, 2 if fua else 0, 1],
        )[0]
        if kind == "write":
            cmds.append(f"write -P {rng.randrange(1, 256):#x} {off} {length}")
        elif kind == "zero":
            cmds.append(f"write -z {off} {length}")
        elif kind == "zero-unmap":
            cmds.append(f"write -z -u {off} {length}")
        elif kind == "discard":
            cmds.append(f"discard {off} {length}")
        elif kind == "fua":
            cmds.append(f"write -f -P {rng.randrange(1, 256):#x} {off} {length}")
        else:
            cmds.append("flush")
    cmds.append("flush")
    return cmds


def test_qemu_log_replays_to_qemu_image_with_prefixes(tmp_path: Path) -> None:
    require("qemu-io")
    rng = random.Random(20240518)
    base = make_image(tmp_path / "base.img", SIZE, seed=1)
    image = tmp_path / "image.img"
    shutil.copyfile(base, image)
    log = tmp_path / "qemu.log"
    log.touch()
    snapshots: list[tuple[int, Path]] = []
    for k in range(5):
        qemu_io(image, log, random_session(rng, fua=k >= 2), append=k > 0)
        snap = tmp_path / f"snap{k}.img"
        shutil.copyfile(image, snap)
        with LogReader(log) as r:
            snapshots.append((r.nr_entries, snap))
            assert r.super.log_id is None and r.tail().state == "clean"
    # Whole log.
    out = tmp_path / "out.img"
    shutil.copyfile(base, out)
    blocktrace("replay", log, out)
    assert blocktrace("verify", image, out).returncode == 0
    # Every session end, by --limit (inclusive).
    for nr, snap in snapshots:
        shutil.copyfile(base, out)
        result = replay(log, out, ReplayOptions(limit=nr))
        assert result.entries == nr
        assert out.read_bytes() == snap.read_bytes(), nr
    # Sessions 0 and 1 have no FUA or inner flush, so their only FLUSH entries end them.
    shutil.copyfile(base, out)
    blocktrace("replay", "--next-flush", log, out)
    assert out.read_bytes() == snapshots[0][1].read_bytes()
    found = blocktrace("log", "find", "--next-flush", "--start-entry", str(snapshots[0][0]), log)
    assert found.stdout.strip().split("@")[0] == str(snapshots[1][0] - 1)
    blocktrace("replay", "--next-flush", "--start-entry", str(snapshots[0][0]), log, out)
    assert out.read_bytes() == snapshots[1][1].read_bytes()


def test_qemu_log_replays_with_replay_log_too(tmp_path: Path) -> None:
    require("qemu-io", "replay-log")
    rng = random.Random(99)
    base = make_image(tmp_path / "base.img", SIZE, seed=2)
    image = tmp_path / "image.img"
    shutil.copyfile(base, image)
    log = tmp_path / "qemu.log"
    log.touch()
    qemu_io(image, log, random_session(rng, fua=True) + random_session(rng, fua=True), append=False)
    theirs = tmp_path / "theirs.img"
    shutil.copyfile(base, theirs)
    run(["replay-log", "--log", log, "--replay", theirs])
    ours = tmp_path / "ours.img"
    shutil.copyfile(base, ours)
    replay(log, ours)
    assert theirs.read_bytes() == image.read_bytes() == ours.read_bytes()


def test_qemu_appends_to_our_log(tmp_path: Path) -> None:
    """QEMU's log-append=on accepts a log with our checksum trailers; the mix replays."""
    require("qemu-io")
    base = make_image(tmp_path / "base.img", SIZE, seed=3)
    image = tmp_path / "image.img"
    shutil.copyfile(base, image)
    log = tmp_path / "ours.log"
    rng = random.Random(5)
    with LogWriter.create(log) as w, open(image, "r+b") as img:
        w.mark("ours")
        for _ in range(20):
            off = rng.randrange(SIZE // 512 - 64) * 512
            data = rng.randbytes(rng.randint(1, 64) * 512)
            w.write(off, data, fua=rng.random() < 0.3)
            img.seek(off)
            img.write(data)
        w.write_zeroes(4096, 8192)
        img.seek(4096)
        img.write(bytes(8192))
        w.flush()
    qemu_io(image, log, random_session(rng, fua=True), append=True)
    with LogReader(log) as r:
        entries = r.entry_list()
        assert r.nr_entries > 23
        assert [e.checksummed for e in entries[:23]] == [True] * 23
        assert not any(e.checksummed for e in entries[23:])
    out = tmp_path / "out.img"
    shutil.copyfile(base, out)
    replay(log, out)
    assert out.read_bytes() == image.read_bytes()
    # And we append after QEMU: reopen, add entries, replay still matches.
    with LogWriter.open(log) as w, open(image, "r+b") as img:
        w.write(0, b"\x5a" * 4096)
        img.write(b"\x5a" * 4096)
    shutil.copyfile(base, out)
    replay(log, out)
    assert out.read_bytes() == image.read_bytes()
    assert "checksums:" in blocktrace("log", "info", log).stdout


def test_qemu_nbd_concurrent_client_log_replays(tmp_path: Path) -> None:
    """qemu-nbd serving a blklogwrites node, a libnbd client with many requests in flight
    (writes, FUA writes and trims on disjoint ranges within a batch, then a zero and a flush):
    QEMU logs in completion order, and our replay of its log equals its image."""
    require("qemu-nbd")
    nbd = pytest.importorskip("nbd")
    base = make_image(tmp_path / "base.img", SIZE, seed=4)
    image = tmp_path / "image.img"
    shutil.copyfile(base, image)
    log = tmp_path / "qemu.log"
    log.touch()
    sock = tmp_path / "nbd.sock"
    opts = (
        f"driver=blklogwrites,file.driver=file,file.filename={image},"
        f"log.driver=file,log.filename={log},log-sector-size=512"
    )
    proc = subprocess.Popen(
        ["qemu-nbd", "--discard=unmap", "--cache=writeback", "-k", str(sock), "--image-opts", opts],
        stderr=subprocess.PIPE,
    )
    try:
        wait_for_socket(sock, None)
        h = nbd.NBD()
        h.connect_unix(str(sock))
        rng = random.Random(8)
        slots = SIZE // (64 * 1024)
        for _ in range(12):
            for slot in rng.sample(range(slots), 16):  # disjoint ranges in flight together
                off = slot * 64 * 1024 + rng.randrange(64) * 512
                length = rng.randint(1, (slot + 1) * 64 * 1024 - off) // 512 * 512 or 512
                kind = rng.choices(["w", "fua", "trim"], [6, 1, 1])[0]
                if kind == "trim":
                    h.aio_trim(length, off)
                else:
                    buf = nbd.Buffer.from_bytearray(bytearray(rng.randbytes(length)))
                    h.aio_pwrite(buf, off, flags=nbd.CMD_FLAG_FUA if kind == "fua" else 0)
            while h.aio_in_flight() > 0:
                h.poll(-1)
            # Zeroes one at a time: QEMU < 9.0 corrupts its log when a write-zeroes runs
            # concurrently with other requests (fixed by QEMU commit 23a512f4).
            h.zero(rng.randint(1, 64) * 512, rng.randrange(SIZE // 512 - 64) * 512)
            h.flush()
        h.shutdown()
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        if proc.stderr:
            proc.stderr.close()
    out = tmp_path / "out.img"
    shutil.copyfile(base, out)
    result = replay(log, out)
    assert result.entries > 12 * 16
    assert out.read_bytes() == image.read_bytes()
