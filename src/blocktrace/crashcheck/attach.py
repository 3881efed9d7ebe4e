"""Give a checker the view as a file (nbdfuse) and a block device (loop), and take both away.

The chain is the one the tests of the kernel path use: blocktrace's NBD server -> ``nbdfuse``
(the export as a regular file) -> ``losetup`` (a loop block device the kernel can mount).
Every step is undone in ``finally`` blocks, in reverse order, even when the checker failed or
timed out, so a run never leaves a mount, a loop device or an nbdfuse process behind.

:func:`run_tool` is the one place checkers run external programs: output is captured up to a
bound (a checker printing without end must not fill memory), and a timeout kills the process.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass

from blocktrace.errors import BlocktraceError

#: Keep at most this much of a tool's output (the rest is dropped and counted).
MAX_OUTPUT = 64 * 1024


class AttachError(BlocktraceError):
    """A step of the attach chain (nbdfuse, losetup) failed: a tool problem, not a crash-point
    failure, so the run stops."""


@dataclass(frozen=True, slots=True)
class ToolResult:
    returncode: int
    output: str
    timed_out: bool = False


async def run_tool(
    argv: list[str],
    *,
    timeout: float,
    env: Mapping[str, str] | None = None,
    cwd: str | None = None,
) -> ToolResult:
    """Run ``argv`` with stdout and stderr merged; kill its process group on timeout."""
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env=dict(env) if env is not None else None,
        cwd=cwd,
        start_new_session=True,
    )
    assert proc.stdout is not None
    chunks: list[bytes] = []
    kept = dropped = 0

    async def drain() -> None:
        nonlocal kept, dropped
        assert proc.stdout is not None
        while chunk := await proc.stdout.read(65536):
            room = max(0, MAX_OUTPUT - kept)
            if room:
                chunks.append(chunk[:room])
                kept += min(room, len(chunk))
            dropped += max(0, len(chunk) - room)
        await proc.wait()

    timed_out = False
    try:
        await asyncio.wait_for(drain(), timeout)
    except TimeoutError:
        timed_out = True
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()
    text = b"".join(chunks).decode("utf-8", "replace")
    if dropped:
        text += f"\n[... {dropped} more bytes of output dropped]"
    if timed_out:
        text += f"\n[killed after {timeout:.0f}s]"
    return ToolResult(proc.returncode if proc.returncode is not None else -1, text, timed_out)


@dataclass(frozen=True, slots=True)
class Attached:
    """What a checker gets: the export's NBD URI, the view as a file, and a loop device."""

    uri: str
    file: str
    device: str
    scratch: str  # a private empty directory (mount point)


async def _wait_for_file(path: str, proc: asyncio.subprocess.Process, timeout: float) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not os.path.exists(path):
        if proc.returncode is not None:
            raise AttachError(f"nbdfuse exited {proc.returncode} before {path} appeared")
        if loop.time() > deadline:
            raise AttachError(f"nbdfuse: {path} did not appear within {timeout:.0f}s")
        await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def attached(
    uri: str, workdir: str, name: str, *, loop: bool = True, timeout: float = 60
) -> AsyncIterator[Attached]:
    """nbdfuse (+ a loop device if ``loop``) for the export at ``uri``; all torn down on exit."""
    fuse_dir = os.path.join(workdir, f"fuse-{name}")
    scratch = os.path.join(workdir, f"mnt-{name}")
    os.mkdir(fuse_dir, 0o700)
    os.mkdir(scratch, 0o700)
    fuse = await asyncio.create_subprocess_exec(
        "nbdfuse",
        fuse_dir,
        uri,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
        start_new_session=True,
    )
    device = ""
    try:
        await _wait_for_file(os.path.join(fuse_dir, "nbd"), fuse, timeout)
        file = os.path.join(fuse_dir, "nbd")
        if loop:
            res = await run_tool(["losetup", "--find", "--show", file], timeout=timeout)
            if res.returncode != 0 or not res.output.strip():
                raise AttachError(f"losetup {file}: {res.output.strip()}")
            device = res.output.strip().splitlines()[-1]
        yield Attached(uri, file, device, scratch)
    finally:
        try:
            if _mounted(scratch):  # a checker killed mid-way left its mount
                await run_tool(["umount", "-l", scratch], timeout=timeout)
            if device:
                await run_tool(["losetup", "-d", device], timeout=timeout)
                await _released(device, timeout)
            # Unmount even if nbdfuse already died: its mount would stay, "not connected".
            if _mounted(fuse_dir):
                res = await run_tool(["fusermount3", "-u", fuse_dir], timeout=timeout)
                if res.returncode != 0:
                    await run_tool(["fusermount3", "-u", "-z", fuse_dir], timeout=timeout)
            try:
                await asyncio.wait_for(fuse.wait(), timeout)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(fuse.pid, signal.SIGKILL)
                await fuse.wait()
        finally:
            for d in (scratch, fuse_dir):
                with contextlib.suppress(OSError):
                    os.rmdir(d)


async def _released(device: str, timeout: float) -> None:
    """Wait until the kernel let go of the loop device's backing file: ``losetup -d`` of a
    device still in use (udev probing it) only schedules the detach, and FUSE refuses to
    unmount a file that is still open (the old behaviour left stale mounts after a 60 s wait)."""
    backing = f"/sys/block/{os.path.basename(device)}/loop/backing_file"
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while os.path.exists(backing) and loop.time() < deadline:
        await asyncio.sleep(0.01)


def _mounted(path: str) -> bool:
    """Is ``path`` a mount point?  Read from the mount table: ``os.path.ismount`` cannot stat
    a FUSE mount whose server died."""
    target = os.path.realpath(path)
    with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
        for line in f:
            fields = line.split()
            if len(fields) > 4 and fields[4].encode().decode("unicode_escape") == target:
                return True
    return False
