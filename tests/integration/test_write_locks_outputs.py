"""No two writers on one file, whatever names it: outputs, replica images and sources.

A log (or another replica) naming a live replica's image is refused, and a replica naming a
live log; a replica named as its own source (or another served image) is refused; a replay
onto a live log or onto the log it reads is refused.  Files are compared by what the kernel
locks or by device and inode, so a hard link, a ``..`` spelling or a bind mount of the same
file is caught (docs/trace.md FILES A TRACE WRITES, docs/replica.md LOCKING).  Before, each of
these wrote the other's file.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from ext4_recording import mkfs
from lock_helpers import LOCKED, locks_on, serve_once, wait_locked
from replica_helpers import QMP

from blocktrace.block.locking import PERM_BASE
from blocktrace.logwrites.reader import LogReader
from blocktrace.logwrites.writer import LogWriter
from support import ServerProcess, blocktrace, make_image, run

MiB = 1024 * 1024
SIZE = 4 * MiB

pytestmark = pytest.mark.timeout(180)


@contextmanager
def bind_mount(src: Path, dst: Path) -> Iterator[Path | None]:
    """``dst``, a bind mount of directory ``src``; None where mounting is not possible."""
    dst.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        yield None
        return
    if subprocess.run(["mount", "--bind", src, dst], capture_output=True).returncode != 0:
        yield None
        return
    try:
        yield dst
    finally:
        subprocess.run(["umount", dst], check=True)


def trace_error(qmp: QMP, job: str, target: dict[str, Any]) -> str:
    """Start a trace over QMP that must be refused; its one-line reason."""
    reply = qmp.q.cmd_raw("block-trace", {"job-id": job, "device": "disk", "target": target})
    assert "error" in reply, (target, reply)
    desc = str(reply["error"]["desc"])
    assert "\n" not in desc
    return desc


def other_names(path: Path, tmp_path: Path, bound: Path | None) -> list[Path]:
    """``path`` by other names: a hard link, a ``..`` detour, a bind mount (if root)."""
    hard = tmp_path / f"{path.stem}-hard-link{path.suffix}"
    os.link(path, hard)
    detour = tmp_path / "sub"
    detour.mkdir(exist_ok=True)
    names = [hard, detour / ".." / path.name]
    if bound is not None:
        names.append(bound / path.name)
    return names


def test_no_output_lands_on_a_live_replica_image(tmp_path: Path) -> None:
    img = mkfs(tmp_path / "disk.img", 16, options=("-b", "4096"))  # ext4, for introspect
    data = tmp_path / "data"
    data.mkdir()
    rep = make_image(data / "replica.img", 16 * MiB)
    qmp_sock = tmp_path / "qmp.sock"
    args = ["--trace", f"disk=replica:{rep},sync=full,job-id=r", "--qmp", str(qmp_sock)]
    with (
        bind_mount(data, tmp_path / "bound") as bound,
        ServerProcess(tmp_path, [img], args) as srv,
    ):
        qmp = QMP(qmp_sock)
        try:
            qmp.wait_caught_up()
            for n, name in enumerate([rep, *other_names(rep, data, bound)]):
                err = trace_error(
                    qmp, f"l{n}", {"type": "log", "filename": str(name), "force": True}
                )
                assert err.startswith("log ") and "failed to get" in err, err
                assert ", this process)" in err, err  # the holder: this server
                events = {"type": "introspect", "filename": str(name), "force": True}
                err = trace_error(qmp, f"e{n}", events)
                assert err.startswith("events file ") and "failed to get" in err, err
                err = trace_error(
                    qmp, f"r{n}", {"type": "replica", "filename": str(name), "force": True}
                )
                assert "failed to get" in err, err
            # a symlink (which a log never follows anyway) to the live replica's image
            sym = data / "replica-symlink.img"
            sym.symlink_to(rep)
            err = trace_error(qmp, "rs", {"type": "replica", "filename": str(sym), "force": True})
            assert "failed to get" in err, err
            # the live replica still follows its source, untouched by the refused traces
            run(["qemu-io", "-f", "raw", "-c", "write -P 0x5c 1M 64k", "-c", "flush", srv.uri()])
            qmp.wait_caught_up()
            assert rep.read_bytes() == img.read_bytes()
            assert [j["device"] for j in qmp.q.cmd("query-block-jobs")] == ["r"]
        finally:
            qmp.close()
    # another process's log on it is refused as well, before anything is truncated
    with ServerProcess(tmp_path, [img], ["--trace", f"disk=replica:{rep}"], name="again"):
        wait_locked(rep, PERM_BASE + 1)
        other = make_image(tmp_path / "other.img", SIZE)
        r = serve_once(tmp_path, [other], f"log:{rep},force=on")
        assert r.returncode == 2 and f"log {rep}: failed to get" in r.stderr, r.stderr
        assert rep.read_bytes() == img.read_bytes()


def test_no_replica_or_replay_lands_on_a_live_log(tmp_path: Path) -> None:
    img = make_image(tmp_path / "disk.img", SIZE, seed=12)
    base = tmp_path / "base.img"
    shutil.copyfile(img, base)
    log = tmp_path / "disk.log"
    qmp_sock = tmp_path / "qmp.sock"
    # sync=full: the log is bigger than the image, so only the lock can refuse a replica on it
    args = ["--trace", f"disk=log:{log},sync=full,job-id=l", "--qmp", str(qmp_sock)]
    with ServerProcess(tmp_path, [img], args) as srv:
        run(["qemu-io", "-f", "raw", "-c", "write -P 0x3c 0 64k", "-c", "flush", srv.uri()])
        qmp = QMP(qmp_sock)
        try:
            for n, name in enumerate([log, *other_names(log, tmp_path, None)]):
                err = trace_error(
                    qmp, f"r{n}", {"type": "replica", "filename": str(name), "force": True}
                )
                assert "failed to get" in err, err
            other = tmp_path / "other.log"
            with LogWriter.create(other) as w:
                w.append_writes([(0, 0, b"\x77" * 4096)])
            r = blocktrace("replay", other, log, check=False)  # a replay onto the live log
            assert r.returncode == 2 and f"replay target {log}: failed to get" in r.stderr
            r = run(["qemu-io", "-f", "raw", "-c", "write -P 0x66 0 4k", log], check=False)
            assert r.returncode != 0 and LOCKED in r.stderr, r.stderr  # QEMU's writers too
            run(["qemu-io", "-f", "raw", "-c", "write -P 0x3d 2M 4k", "-c", "flush", srv.uri()])
        finally:
            qmp.close()
    with LogReader(log) as reader:  # whole: every entry checks out, the end mark is there
        assert any(e.mark == "dm-log-writes-end" for e in reader.entries())
    blocktrace("replay", log, base)
    assert base.read_bytes() == img.read_bytes()


def test_a_replay_onto_the_log_it_reads_is_refused(tmp_path: Path) -> None:
    img = make_image(tmp_path / "disk.img", SIZE, seed=13)
    log = tmp_path / "disk.log"
    with ServerProcess(tmp_path, [img], ["--trace", f"disk=log:{log}"]) as srv:
        run(["qemu-io", "-f", "raw", "-c", "write -P 0x3c 0 64k", "-c", "flush", srv.uri()])
    before = log.read_bytes()
    hard = tmp_path / "same.log"
    os.link(log, hard)
    r = blocktrace("replay", log, hard, check=False)
    assert r.returncode == 2 and "is the log being replayed" in r.stderr, r.stderr
    assert log.read_bytes() == before and not locks_on(log)


def test_a_replica_of_a_served_image_is_refused(tmp_path: Path) -> None:
    """Its own source (by any name) or another export of the same server: refused with a
    reason of its own (not just "locked"), every image unchanged."""
    img = make_image(tmp_path / "disk.img", SIZE, seed=14)
    other = make_image(tmp_path / "other.img", SIZE, seed=15)
    before = {p: p.read_bytes() for p in (img, other)}
    hard = tmp_path / "disk-hard-link.img"
    os.link(img, hard)
    sym = tmp_path / "disk-symlink.img"
    sym.symlink_to(img)
    cases = [
        ([img], f"disk=replica:{hard},force=on"),
        ([img], f"disk=replica:{sym},force=on"),
        ([img], f"disk=replica:{tmp_path / 'sub' / '..' / 'disk.img'},force=on"),
        ([f"disk={img}", f"other={other}"], f"disk=replica:{other},force=on"),
    ]
    (tmp_path / "sub").mkdir()
    for images, trace in cases:
        r = serve_once(tmp_path, images, trace)
        assert r.returncode == 2, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert "refusing to write to a served image" in r.stderr, r.stderr
    assert {p: p.read_bytes() for p in (img, other)} == before


def test_a_new_replica_image_is_created_0600(tmp_path: Path) -> None:
    """A replica holds the disk's data: like every other output it is created 0600 (never
    wider than the source image), not with the umask's 0644."""
    img = make_image(tmp_path / "disk.img", SIZE, seed=7)
    os.chmod(img, 0o644)
    rep = tmp_path / "new-replica.img"
    qmp_sock = tmp_path / "qmp.sock"
    args = ["--trace", f"disk=replica:{rep},sync=full,job-id=r", "--qmp", str(qmp_sock)]
    with ServerProcess(tmp_path, [img], args):
        qmp = QMP(qmp_sock)
        try:
            qmp.wait_caught_up()
        finally:
            qmp.close()
        assert os.stat(rep).st_mode & 0o777 == 0o600
    assert rep.read_bytes() == img.read_bytes()
