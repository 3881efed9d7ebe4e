"""A real Linux guest under ``qemu-system-x86_64 -accel tcg``, driven from a test.

The kernel is Debian's (``linux-image-amd64``); the initramfs is busybox plus the virtio and
ext4 modules, built and cached by ``scripts/build-guest.sh`` (under ``$BLOCKTRACE_GUEST_CACHE``
or ``~/.cache/blocktrace/guest``, outside the repository).  The guest's second serial port is
a Unix socket carrying a line protocol: the test sends one shell command a line, the guest
answers with its output and ``@@RC <status>``.  Disks are virtio-blk, given as ``-blockdev``
(file + format node, named ``proto<i>``/``fmt<i>``, device ``disk<i>``) or as ``-drive``;
QMP is a Unix socket.  TCG because ``/dev/kvm`` here is a nested virtualiser that stock guest
kernels hang on.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BOOT_TIMEOUT = 600.0  # the machine is shared and TCG is slow; never asserted


def guest_dir() -> Path:
    """Build (or find cached) the guest kernel + initramfs; skip-free: a missing kernel or
    busybox is a setup error, reported by the script."""
    cache = os.environ.get("BLOCKTRACE_GUEST_CACHE") or str(
        Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "blocktrace" / "guest"
    )
    extra = ["--with-fio"] if os.environ.get("BLOCKTRACE_GUEST_FIO") else []
    out = subprocess.run(
        [str(REPO / "scripts" / "build-guest.sh"), cache, *extra],
        check=True,
        capture_output=True,
        text=True,
    )
    return Path(out.stdout.strip().splitlines()[-1])


def make_ext4_disk(path: Path, fmt: str, size: int = 64 << 20) -> None:
    """A fresh ext4 file system on a raw or qcow2 image."""
    raw = path if fmt == "raw" else path.with_suffix(".mkfs.raw")
    with open(raw, "wb") as f:
        f.truncate(size)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-E", "nodiscard", str(raw)], check=True)
    if fmt != "raw":
        subprocess.run(["qemu-img", "convert", "-O", fmt, str(raw), str(path)], check=True)
        raw.unlink()


def guest_visible(image: Path, fmt: str, out: Path) -> Path:
    """The disk as the guest sees it, as a raw file (``-U``: the VM still holds its lock)."""
    subprocess.run(
        ["qemu-img", "convert", "-U", "-f", fmt, "-O", "raw", str(image), str(out)], check=True
    )
    return out


@dataclass
class GuestDisk:
    path: Path
    fmt: str
    #: ``blockdev`` (libvirt's way) or ``drive`` (the legacy option; QEMU names the nodes)
    style: str = "blockdev"


class Guest:
    """``with Guest(tmp, [GuestDisk(...)]) as g: g.sh("...")``."""

    def __init__(
        self,
        workdir: Path,
        disks: list[GuestDisk],
        *,
        memory: int = 256,
        blklogwrites_log: Path | None = None,
    ) -> None:
        self.workdir = workdir
        #: put QEMU's blklogwrites (log in this file) between disk 0's file and format nodes
        self.blklogwrites_log = blklogwrites_log
        self.disks = disks
        self.memory = memory
        self.qmp = workdir / "qemu-qmp.sock"
        #: a second monitor for the test itself: a QMP socket serves one client at a time
        self.test_qmp = workdir / "qemu-qmp-test.sock"
        self.cmd_path = workdir / "guest-cmd.sock"
        self.console = workdir / "console.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._sock: socket.socket | None = None
        self._buf = b""

    def argv(self) -> list[str]:
        g = guest_dir()
        # no_timer_check: on a loaded host TCG's timer can look broken to the kernel's
        # IO-APIC check, which then panics at boot.
        argv = [
            shutil.which("qemu-system-x86_64") or "qemu-system-x86_64",
            "-accel", "tcg", "-machine", "pc", "-m", str(self.memory),
            "-nodefaults", "-display", "none", "-no-reboot",
            "-kernel", str(g / "vmlinuz"), "-initrd", str(g / "initrd.gz"),
            "-append", "console=ttyS0 panic=-1 quiet no_timer_check",
            "-serial", f"file:{self.console}",
            "-chardev", f"socket,id=cmd,path={self.cmd_path},server=on,wait=off",
            "-serial", "chardev:cmd",
            "-qmp", f"unix:{self.qmp},server=on,wait=off",
            "-qmp", f"unix:{self.test_qmp},server=on,wait=off",
        ]  # fmt: skip
        for i, d in enumerate(self.disks):
            if i == 0 and self.blklogwrites_log is not None:
                argv += [
                    "-blockdev", f"driver=file,filename={d.path},node-name=data0",
                    "-blockdev", f"driver=file,filename={self.blklogwrites_log},node-name=log0",
                    "-blockdev", "driver=blklogwrites,file=data0,log=log0,node-name=proto0,"
                                 "log-super-update-interval=1",
                    "-blockdev", f"driver={d.fmt},file=proto0,node-name=fmt0",
                    "-device", "virtio-blk-pci,drive=fmt0,id=disk0",
                ]  # fmt: skip
            elif d.style == "blockdev":
                argv += [
                    "-blockdev", f"driver=file,filename={d.path},node-name=proto{i},discard=unmap",
                    "-blockdev", f"driver={d.fmt},file=proto{i},node-name=fmt{i},discard=unmap",
                    "-device", f"virtio-blk-pci,drive=fmt{i},id=disk{i}",
                ]  # fmt: skip
            else:
                argv += [
                    "-drive", f"if=none,id=drive{i},file={d.path},format={d.fmt},discard=unmap",
                    "-device", f"virtio-blk-pci,drive=drive{i},id=disk{i}",
                ]  # fmt: skip
        return argv

    def __enter__(self) -> Guest:
        self.proc = subprocess.Popen(
            self.argv(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=None
        )
        deadline = time.monotonic() + 30
        while not (self.cmd_path.exists() and self.qmp.exists()):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"qemu-system-x86_64 did not start (rc {self.proc.poll()})")
            time.sleep(0.05)
        self.connect_serial()
        return self

    def connect_serial(self) -> None:
        """Connect to the guest's command port and wait until its init is ready."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(str(self.cmd_path))
        self._sock = sock
        self._until(b"@@READY\n", BOOT_TIMEOUT)

    def __exit__(self, *exc: object) -> None:
        self.kill()

    def kill(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def _until(self, marker: bytes, timeout: float) -> bytes:
        assert self._sock is not None
        deadline = time.monotonic() + timeout
        while marker not in self._buf:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"guest: no {marker!r}; console: {self.console_tail()}")
            self._sock.settimeout(remaining)
            data = self._sock.recv(65536)
            if not data:
                raise RuntimeError(f"guest: serial closed; console: {self.console_tail()}")
            self._buf += data
        i = self._buf.index(marker) + len(marker)
        out, self._buf = self._buf[:i], self._buf[i:]
        return out

    def run(self, command: str, timeout: float = 300.0) -> tuple[int, str]:
        """Run one shell command line in the guest: (exit status, output)."""
        assert self._sock is not None and "\n" not in command
        self._sock.sendall(command.encode() + b"\n")
        out = self._until(b"@@RC ", timeout)[: -len(b"@@RC ")]
        rc = int(self._until(b"\n", timeout))
        return rc, out.decode(errors="replace")

    def sh(self, command: str, timeout: float = 300.0) -> str:
        """Run and require success."""
        rc, out = self.run(command, timeout)
        if rc != 0:
            raise AssertionError(f"guest: {command!r} exited {rc}: {out}")
        return out

    def console_tail(self, n: int = 2000) -> str:
        try:
            return self.console.read_text(errors="replace")[-n:]
        except OSError:
            return ""
