"""``blocktrace record -- CMD``: a workload on a traced scratch disk, ready for crashcheck.

The loop a file-system developer would otherwise script: make a scratch image with a chosen
file system (``base.img``, kept as the log's base), copy it to ``disk.img``, serve that with
``blocktrace serve`` tracing every write to ``trace.log`` (a child process, so its event loop
is its own), attach it through nbdfuse + loop, mount it, run CMD with the mount as its working
directory, unmount, detach, stop the server (which syncs and closes the log).  Everything set
up is torn down in ``finally`` blocks, in reverse order, whatever CMD does.

CMD finds the control socket in ``$BLOCKTRACE_QMP`` and the trace job in
``$BLOCKTRACE_TRACE_JOB``: ``blocktrace mark NAME`` (or ``blocktrace trace mark``) writes a mark
into the log between two phases of the workload.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

from blocktrace.crashcheck.attach import attached, run_tool
from blocktrace.errors import BlocktraceError, UsageError

#: mkfs per file system (quiet, force: the target is the scratch image we just made).
MKFS: dict[str, tuple[str, ...]] = {
    "ext4": ("mkfs.ext4", "-q", "-F"),
    "xfs": ("mkfs.xfs", "-q", "-f"),
    "vfat": ("mkfs.vfat",),
}
#: The smallest scratch disk each file system's mkfs accepts here.
MIN_SIZE = {"ext4": 1 << 20, "xfs": 300 << 20, "vfat": 1 << 20}
ENV_SOCKET = "BLOCKTRACE_QMP"
ENV_JOB = "BLOCKTRACE_TRACE_JOB"
JOB = "trace0"


class RecordError(BlocktraceError):
    """A step of ``record`` failed (mkfs, the server, mount): one line for the user."""


@dataclass(slots=True)
class Recording:
    """What ``record`` produced: the log, its base, and how the workload ended."""

    log: str
    base: str
    image: str
    workload_status: int
    files: list[str] = field(default_factory=list)


def _wait_socket(path: str, proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RecordError(f"blocktrace serve exited {proc.returncode} before listening")
        if os.path.exists(path):
            with socket.socket(socket.AF_UNIX) as s:
                try:
                    s.connect(path)
                    return
                except OSError:
                    pass
        time.sleep(0.02)
    raise RecordError(f"blocktrace serve: {path} not ready within {timeout:.0f}s")


def _prepare(out: str, fs: str, size: int, mkfs_options: list[str]) -> tuple[str, str, str]:
    if fs not in MKFS:
        raise UsageError(f"--fs {fs!r}: expected one of {', '.join(sorted(MKFS))}")
    if size < MIN_SIZE[fs]:
        raise UsageError(f"--size: {fs} needs at least {MIN_SIZE[fs] >> 20} MiB")
    if os.path.lexists(out) and (not os.path.isdir(out) or os.path.islink(out) or os.listdir(out)):
        raise UsageError(f"{out}: exists and is not an empty directory (refusing to overwrite)")
    os.makedirs(out, exist_ok=True)
    base, image, log = (os.path.join(out, n) for n in ("base.img", "disk.img", "trace.log"))
    fd = os.open(base, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    try:
        os.ftruncate(fd, size)
    finally:
        os.close(fd)
    argv = [*MKFS[fs], *mkfs_options, base]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=600, check=False)
    if proc.returncode != 0:
        raise RecordError(f"{' '.join(argv)}: {(proc.stderr or proc.stdout).strip()}")
    subprocess.run(["cp", "--sparse=always", base, image], check=True, timeout=600)
    return base, image, log


async def _mounted_workload(
    uri: str, workdir: str, fs: str, mount_options: str, command: list[str], env: dict[str, str]
) -> int:
    async with attached(uri, workdir, "record") as target:
        opts = ["-o", mount_options] if mount_options else []
        res = await run_tool(["mount", "-t", fs, *opts, target.device, target.scratch], timeout=120)
        if res.returncode != 0:
            raise RecordError(f"mount {target.device}: {res.output.strip()}")
        try:
            proc = await asyncio.create_subprocess_exec(*command, cwd=target.scratch, env=env)
            return await proc.wait()
        finally:
            os.sync()
            res = await run_tool(["umount", target.scratch], timeout=300)
            if res.returncode != 0:
                raise RecordError(f"umount {target.scratch}: {res.output.strip()}")


def record(
    out: str,
    command: list[str],
    *,
    fs: str = "ext4",
    size: int = 64 << 20,
    mkfs_options: list[str] | None = None,
    mount_options: str = "",
) -> Recording:
    """Run ``command`` on a fresh traced ``fs`` disk in directory ``out`` (see module doc)."""
    if not command:
        raise UsageError("record: give the workload after --, e.g. record -o out -- fsstress")
    base, image, log = _prepare(out, fs, size, list(mkfs_options or ()))
    private = tempfile.mkdtemp(prefix="blocktrace-record-")  # short socket paths
    nbd_sock, qmp_sock = os.path.join(private, "nbd.sock"), os.path.join(private, "qmp.sock")
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "blocktrace",
            "serve",
            f"disk={image}",
            "--socket",
            nbd_sock,
            "--qmp",
            qmp_sock,
            "--trace",
            f"disk=log:{log},job-id={JOB}",
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        _wait_socket(nbd_sock, server)
        _wait_socket(qmp_sock, server)
        env = dict(os.environ)
        env[ENV_SOCKET] = qmp_sock
        env[ENV_JOB] = JOB
        status = asyncio.run(
            _mounted_workload(
                f"nbd+unix:///disk?socket={nbd_sock}", private, fs, mount_options, command, env
            )
        )
    finally:
        if server.poll() is None:
            server.send_signal(signal.SIGTERM)
        try:
            rc = server.wait(120)
        except subprocess.TimeoutExpired:
            server.kill()
            rc = server.wait(10)
        err = server.stderr.read().decode(errors="replace") if server.stderr else ""
        shutil.rmtree(private, ignore_errors=True)
    if rc != 0:
        raise RecordError(f"blocktrace serve exited {rc}: {err.strip()[-2000:]}")
    return Recording(log, base, image, status)
