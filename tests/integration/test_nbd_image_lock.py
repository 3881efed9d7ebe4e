"""Image locking against real QEMU processes, both ways (issue 10 item 8).

blocktrace takes QEMU's OFD lock bytes on every image it exports (block/locking.py), so a
second writer is refused whichever side starts first: qemu-io, qemu-nbd, qemu-storage-daemon,
another ``blocktrace serve``, or a second export in the same server.  Read-only opens keep
working where QEMU lets them.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from lock_helpers import LOCKED, locks_on, qemu_process, storage_daemon, wait_locked
from tests.support import BLOCKTRACE, MiB, ServerProcess, make_image, require, run

from blocktrace.block.file import FileDevice
from blocktrace.block.locking import PERM_BASE, SHARED_BASE, ImageLockedError, Perm
from blocktrace.errors import UsageError
from blocktrace.service import Service, ServiceConfig


def serve_fails(tmp_path: Path, *args: str) -> str:
    proc = subprocess.run(
        [*BLOCKTRACE, "serve", *args, "--socket", os.fspath(tmp_path / "second.sock")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr  # one clear line
    return proc.stderr


def test_a_served_image_refuses_qemu_writers_and_allows_readers(tmp_path: Path) -> None:
    require("qemu-io", "qemu-img")
    img = make_image(tmp_path / "disk.img", 4 * MiB)
    with ServerProcess(tmp_path, [img]):
        assert {PERM_BASE, PERM_BASE + 1, SHARED_BASE + 1, SHARED_BASE + 3} <= locks_on(img)
        w = run(["qemu-io", "-f", "raw", "-c", "write 0 4k", img], check=False)
        assert w.returncode != 0 and LOCKED in w.stderr
        r = run(["qemu-io", "-r", "-f", "raw", "-c", "read 0 4k", img])
        assert "read 4096/4096" in r.stdout
        run(["qemu-img", "info", "-U", img])
    # Stopped: the locks went with the server and QEMU may write again.
    assert not locks_on(img)
    run(["qemu-io", "-f", "raw", "-c", "write 0 4k", img])


@pytest.mark.parametrize("tool", ["qemu-io", "qemu-nbd", "qemu-storage-daemon"])
def test_serve_refuses_an_image_a_qemu_writer_holds(tmp_path: Path, tool: str) -> None:
    require(tool)
    img = make_image(tmp_path / "disk.img", 4 * MiB)
    cmd = {
        # qemu-io keeps the image open, writable, while it waits on its (never closed) stdin
        "qemu-io": ["qemu-io", "-f", "raw", os.fspath(img)],
        "qemu-nbd": ["qemu-nbd", "-f", "raw", "-k", os.fspath(tmp_path / "q.sock"), os.fspath(img)],
        "qemu-storage-daemon": storage_daemon(img, tmp_path / "q.sock"),
    }[tool]
    if tool == "qemu-io":
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
        try:
            wait_locked(img, PERM_BASE + 1)
            err = serve_fails(tmp_path, os.fspath(img))
        finally:
            proc.kill()
            proc.wait(10)
    else:
        with qemu_process(cmd, img, PERM_BASE + 1):
            err = serve_fails(tmp_path, os.fspath(img))
            # QEMU's writers share writing with readers, so a read-only export still works.
            ro = ServerProcess(tmp_path, [img], ["--read-only"], name="ro").start()
            ro.stop()
    assert 'failed to get shared "write" lock' in err and "in use by another process" in err


def test_a_second_blocktrace_or_a_second_export_is_refused(tmp_path: Path) -> None:
    img = make_image(tmp_path / "disk.img", 4 * MiB)
    with ServerProcess(tmp_path, [img]):
        err = serve_fails(tmp_path, os.fspath(img))
        assert 'failed to get "write" lock' in err
    # two exports of one file in one server
    err = serve_fails(tmp_path, f"a={img}", f"b={img}")
    assert "disk.img: failed to get" in err
    # read-only, twice, is fine (QEMU allows shared read-only opens)
    srv = ServerProcess(tmp_path, [f"a={img}", f"b={img}"], ["--read-only"]).start()
    srv.stop()


def test_a_writable_qemu_nbd_is_refused_while_blocktrace_serves(tmp_path: Path) -> None:
    require("qemu-nbd", "qemu-storage-daemon")
    img = make_image(tmp_path / "disk.img", 4 * MiB)
    with ServerProcess(tmp_path, [img]):
        q = run(["qemu-nbd", "-f", "raw", "-k", tmp_path / "q.sock", img], check=False, timeout=30)
        assert q.returncode != 0 and LOCKED in q.stderr
        qsd = run(storage_daemon(img, tmp_path / "q.sock"), check=False, timeout=30)
        assert qsd.returncode != 0 and LOCKED in qsd.stderr


def test_runtime_export_add_of_a_served_image_is_refused_and_leaves_nothing(
    tmp_path: Path,
) -> None:
    import asyncio

    img = make_image(tmp_path / "disk.img", 1 * MiB)

    async def main() -> None:
        svc = Service(ServiceConfig(images=[("a", os.fspath(img))], socket=None))
        svc.add_export("a", os.fspath(img))
        with pytest.raises(ImageLockedError) as info:
            svc.add_export("b", os.fspath(img))
        assert isinstance(info.value, UsageError) and info.value.perm is Perm.WRITE
        assert "b" not in svc.registry
        await svc.remove_export("a")
        # the refused open left no lock behind: a fresh writer gets the image
        dev = FileDevice(img, lock=True)
        await dev.close()

    asyncio.run(main())
