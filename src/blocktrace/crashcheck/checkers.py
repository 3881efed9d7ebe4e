"""The checks run at each crash point: built-in ones per file system, or the user's command.

A check must *judge before it repairs*: ``e2fsck -y`` (even ``-E journal_only``) repairs
damage from backup structures and would hide it.  So each built-in check first lets the kernel
do what it does after a power cut (mount, which replays the journal or log, then unmount),
which is what a real machine would see, and then runs the file system's checker read-only
(``e2fsck -fn``, ``xfs_repair -n``, ``fsck.vfat -n``).  A refused mount is a failure too.
Every write of the mount lands in the view's throw-away layer.
"""

from __future__ import annotations

import abc
import os
from dataclasses import dataclass

from blocktrace.crashcheck.attach import Attached, ToolResult, run_tool
from blocktrace.errors import UsageError


@dataclass(frozen=True, slots=True)
class Outcome:
    """A check's verdict at one point; ``stage`` names the step that failed."""

    passed: bool
    output: str
    stage: str = ""


class Checker(abc.ABC):
    """One kind of check.  ``needs_device``: it wants a loop device (else the file is enough)."""

    name: str
    needs_device: bool = True

    @abc.abstractmethod
    async def check(self, view: Attached, point: int, timeout: float) -> Outcome:
        """Judge the view at entry ``point``; never modify anything but the view."""


def _fail(stage: str, argv: list[str], res: ToolResult) -> Outcome:
    return Outcome(False, f"$ {' '.join(argv)}  (exit {res.returncode})\n{res.output}", stage)


class MountThenFsck(Checker):
    """Mount and unmount (the kernel's own recovery), then a read-only fsck of the device."""

    fstype: str
    mount_options: str
    fsck: tuple[str, ...]

    async def check(self, view: Attached, point: int, timeout: float) -> Outcome:
        mount = ["mount", "-t", self.fstype, "-o", self.mount_options, view.device, view.scratch]
        res = await run_tool(mount, timeout=timeout)
        if res.returncode != 0:
            return _fail("mount", mount, res)
        umount = ["umount", view.scratch]
        res = await run_tool(umount, timeout=timeout)
        if res.returncode != 0:
            return _fail("umount", umount, res)
        argv = [*self.fsck, view.device]
        res = await run_tool(argv, timeout=timeout)
        if res.returncode != 0:
            return _fail("fsck", argv, res)
        return Outcome(True, res.output)


class Ext4Check(MountThenFsck):
    name = "ext4"
    fstype = "ext4"
    mount_options = "rw"
    fsck = ("e2fsck", "-f", "-n")


class XfsCheck(MountThenFsck):
    name = "xfs"
    fstype = "xfs"
    mount_options = "nouuid"  # parallel views of one file system share its UUID
    fsck = ("xfs_repair", "-n")


class VfatCheck(Checker):
    """FAT has no journal: nothing to replay, so ``fsck.vfat -n`` judges the image directly
    (no mount: this also works where the kernel has no vfat driver)."""

    name = "vfat"
    needs_device = False

    async def check(self, view: Attached, point: int, timeout: float) -> Outcome:
        argv = ["fsck.vfat", "-n", view.file]
        res = await run_tool(argv, timeout=timeout)
        if res.returncode != 0:
            return _fail("fsck", argv, res)
        return Outcome(True, res.output)


class CommandCheck(Checker):
    """``--check CMD``: run by ``sh -c`` with the view in the environment; exit 0 passes.

    ``BLOCKTRACE_VIEW`` (the view as a file), ``BLOCKTRACE_DEVICE`` (a loop device),
    ``BLOCKTRACE_NBD_URI``, ``BLOCKTRACE_POINT`` (the entry index), ``BLOCKTRACE_SCRATCH``
    (an empty private directory, e.g. for a mount point)."""

    name = "command"

    def __init__(self, command: str) -> None:
        self.command = command

    async def check(self, view: Attached, point: int, timeout: float) -> Outcome:
        env = dict(os.environ)
        env.update(
            BLOCKTRACE_VIEW=view.file,
            BLOCKTRACE_DEVICE=view.device,
            BLOCKTRACE_NBD_URI=view.uri,
            BLOCKTRACE_POINT=str(point),
            BLOCKTRACE_SCRATCH=view.scratch,
        )
        argv = ["sh", "-c", self.command]
        res = await run_tool(argv, timeout=timeout, env=env, cwd=view.scratch)
        if res.returncode != 0:
            return _fail("check", argv, res)
        return Outcome(True, res.output)


BUILTIN: dict[str, type[Checker]] = {"ext4": Ext4Check, "xfs": XfsCheck, "vfat": VfatCheck}

#: (offset, bytes) signatures, first match wins; ext4 also covers ext2/ext3 (e2fsck checks all).
_SIGNATURES: list[tuple[str, int, bytes]] = [
    ("ext4", 1080, b"\x53\xef"),
    ("xfs", 0, b"XFSB"),
    ("vfat", 82, b"FAT32   "),
    ("vfat", 54, b"FAT16   "),
    ("vfat", 54, b"FAT12   "),
]


def detect_fs(base: str) -> str:
    """The file system on ``base`` (whole disk, no partition table), or a UsageError."""
    try:
        with open(base, "rb") as f:
            head = f.read(2048)
    except OSError as exc:
        raise UsageError(f"{base}: cannot read the base image: {exc.strerror}") from None
    for name, off, sig in _SIGNATURES:
        if head[off : off + len(sig)] == sig:
            return name
    raise UsageError(
        f"{base}: no ext4, XFS or FAT file system found at the start of the disk;"
        " name one with --fs or give --check CMD"
    )


def make_checker(fs: str | None, command: str | None, base: str) -> Checker:
    if command is not None:
        return CommandCheck(command)
    name = detect_fs(base) if fs in (None, "auto") else fs
    assert name is not None
    if name not in BUILTIN:
        raise UsageError(f"--fs {name!r}: expected one of {', '.join(sorted(BUILTIN))}")
    return BUILTIN[name]()
