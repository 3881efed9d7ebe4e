"""Helpers shared by the test suite: real tools, real processes, no mocks.

* :func:`require` skips a test, naming the missing capability, when the machine lacks a tool.
* :class:`ServerProcess` runs ``blocktrace serve`` as a subprocess on a private Unix socket.
* :func:`run` runs a command and fails the test with its output when it fails.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

BLOCKTRACE = [sys.executable, "-m", "blocktrace"]
MiB = 1024 * 1024


def require(*tools: str) -> None:
    """Skip the calling test unless every tool is on PATH."""
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        pytest.skip(f"machine lacks {', '.join(missing)}")


def require_fuse_and_loop() -> None:
    """Skip unless the kernel can mount ext4 through nbdfuse + a loop device (needs root)."""
    require("nbdfuse", "losetup", "mount")
    if os.geteuid() != 0:
        pytest.skip("mounting through nbdfuse + loop needs root")
    if not os.path.exists("/dev/fuse"):
        pytest.skip("machine lacks /dev/fuse")
    if not os.path.exists("/dev/loop-control"):
        pytest.skip("machine lacks loop devices (/dev/loop-control)")


def run(
    cmd: Sequence[str | os.PathLike[str]],
    *,
    timeout: float = 120,
    check: bool = True,
    input: bytes | None = None,
    **kw: Any,
) -> subprocess.CompletedProcess[str]:
    """Run ``cmd``; on failure, fail the test showing stdout and stderr."""
    proc = subprocess.run(
        [os.fspath(c) for c in cmd],
        capture_output=True,
        text=True,
        timeout=timeout,
        input=input.decode() if input else None,
        **kw,
    )
    if check and proc.returncode != 0:
        pytest.fail(
            f"{' '.join(map(str, cmd))} exited {proc.returncode}\n"
            f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
        )
    return proc


def blocktrace(*args: str | os.PathLike[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    """Run the ``blocktrace`` CLI in a subprocess."""
    return run([*BLOCKTRACE, *args], **kw)


def make_image(path: Path, size: int, *, seed: int | None = None) -> Path:
    """Create a sparse raw image; with ``seed``, fill it with reproducible random data."""
    with open(path, "wb") as f:
        if seed is None:
            f.truncate(size)
        else:
            rng = random.Random(seed)
            f.write(rng.randbytes(size))
    return path


def wait_for_socket(
    path: Path, proc: subprocess.Popen[bytes] | None = None, timeout: float = 15
) -> None:
    """Wait until a Unix socket accepts connections (or the process died)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            out = proc.stderr.read().decode() if proc.stderr else ""
            raise AssertionError(f"server exited {proc.returncode} before listening:\n{out}")
        if path.exists():
            with socket.socket(socket.AF_UNIX) as s:
                try:
                    s.connect(os.fspath(path))
                    return
                except OSError:
                    pass
        time.sleep(0.02)
    raise AssertionError(f"{path} did not accept connections within {timeout}s")


def qemu_io(uri: str, *cmds: str) -> None:
    """Run qemu-io's ``cmds`` (``write -P 1 0 4M``, ``flush``...) on a raw NBD ``uri``."""
    args = ["qemu-io", "-f", "raw"]
    for c in cmds:
        args += ["-c", c]
    run([*args, uri])


class ServerProcess:
    """``blocktrace serve`` in a subprocess: ``with ServerProcess(tmp_path, [img]) as srv:``.

    ``srv.socket`` is the NBD Unix socket; ``srv.uri(name)`` an NBD URI for libnbd tools.
    Extra arguments (``--trace``, ``--qmp``...) go in ``args``.  On exit the server gets
    SIGTERM and must stop cleanly within the timeout (asserted: exit status 0).
    """

    def __init__(
        self,
        workdir: Path,
        images: Sequence[str | os.PathLike[str]],
        args: Sequence[str] = (),
        *,
        name: str = "nbd",
    ) -> None:
        self.workdir = workdir
        self.socket = workdir / f"{name}.sock"
        self.cmd = [
            *BLOCKTRACE,
            "serve",
            *map(os.fspath, images),
            "--socket",
            os.fspath(self.socket),
            *args,
        ]
        self.proc: subprocess.Popen[bytes] | None = None
        self.stderr_path = workdir / f"{name}.stderr"

    def start(self) -> ServerProcess:
        self._stderr = open(self.stderr_path, "wb")  # noqa: SIM115 - closed in stop()/kill()
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.DEVNULL, stderr=self._stderr)
        try:
            wait_for_socket(self.socket, None)
        except AssertionError:
            self.kill()
            raise AssertionError(f"server did not start: {self.stderr()}") from None
        return self

    def uri(self, export: str = "") -> str:
        return f"nbd+unix:///{export}?socket={self.socket}"

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM and wait; returns the exit status."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout)
        finally:
            self._stderr.close()
        return rc

    def kill(self) -> None:
        """kill -9, for crash tests."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._stderr.close()

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            rc = self.stop()
            if exc[0] is None:
                assert rc == 0, f"server exited {rc} on SIGTERM:\n{self.stderr()}"


@contextlib.contextmanager
def small_tmpfs(mnt: Path, size: str) -> Iterator[Path]:
    """Mount a tmpfs of ``size`` (``512k``, ``1m``) on ``mnt``: a real file system that fills
    up (ENOSPC).  Skips the test where mounting is not possible (not root, no tmpfs)."""
    require("mount", "umount")
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mnt.mkdir(exist_ok=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)],
                          capture_output=True, text=True, timeout=30)  # fmt: skip
    if proc.returncode != 0:
        pytest.skip(f"machine cannot mount tmpfs: {proc.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], timeout=30, check=False)
