"""A private libvirtd for a test, and a guest it runs (Debian 12's libvirt 9.0, QEMU 7.2).

No systemd here and several engineers (and CI runs) share the machine, so the test starts
its own privileged ``libvirtd`` in a private mount namespace (``unshare -m``): libvirt's
fixed state directories (``/etc/libvirt``, ``/run/libvirt``, ``/var/lib/libvirt``,
``/var/cache/libvirt``, ``/var/log/libvirt``) are bind-mounted from the test's temporary
directory, so two daemons never meet and nothing of the host's is touched; its client socket
is in the temporary directory, where ``virsh -c qemu:///system?socket=...`` finds it.
``qemu.conf`` runs QEMU as root with no security driver, no cgroups, no namespaces and
``stdio_handler = "file"`` (no virtlogd): the parts of a libvirt host this machine lacks.

The guest is the one of tests/guest.py (same kernel, initramfs and serial line protocol),
defined as a ``<domain type='qemu'>`` (TCG) with ``-blockdev`` disks named by libvirt
(``libvirt-1-format``...) and a second QMP monitor given at start through
``<qemu:commandline>``: the way in docs/attach.md describes for libvirt-managed VMs.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path
from xml.sax.saxutils import quoteattr

import pytest

from guest import Guest, GuestDisk, guest_dir

#: libvirt's state directories in its (private) mount namespace, and ours for each
STATE_DIRS = {
    "etc": "/etc/libvirt",
    "run": "/run/libvirt",
    "lib": "/var/lib/libvirt",
    "cache": "/var/cache/libvirt",
    "log": "/var/log/libvirt",
}

QEMU_CONF = """\
user = "root"
group = "root"
dynamic_ownership = 0
remember_owner = 0
security_driver = "none"
cgroup_controllers = [ ]
namespaces = [ ]
stdio_handler = "file"
"""


def require_libvirt() -> None:
    """Fail (not skip) when libvirt is missing: scripts/setup.sh installs it, and a skip
    would hide that gap in CI."""
    missing = [t for t in ("libvirtd", "virsh", "unshare") if shutil.which(t) is None]
    if missing:
        pytest.fail(f"{', '.join(missing)} missing: run scripts/setup.sh (it installs libvirt)")
    if os.geteuid() != 0:
        pytest.fail("a private libvirtd (unshare -m, bind mounts) needs root")


class Libvirtd:
    """``with Libvirtd(tmp) as lv: lv.virsh("list")``."""

    def __init__(self, workdir: Path) -> None:
        self.dir = workdir
        self.sock_dir = workdir / "sock"
        self.uri = f"qemu:///system?socket={self.sock_dir / 'libvirt-sock'}"
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Libvirtd:
        require_libvirt()
        for sub, target in STATE_DIRS.items():
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
            os.makedirs(target, exist_ok=True)  # the mount point, empty on the host
        self.sock_dir.mkdir(exist_ok=True)
        conf = self.dir / "etc" / "libvirtd.conf"
        conf.write_text(
            f'unix_sock_dir = "{self.sock_dir}"\n'
            'unix_sock_rw_perms = "0700"\nauth_unix_rw = "none"\nauth_unix_ro = "none"\n'
            f'log_outputs = "3:file:{self.dir / "libvirtd.log"}"\n'
        )
        (self.dir / "etc" / "qemu.conf").write_text(QEMU_CONF)
        binds = " && ".join(
            f"mount --bind {self.dir / sub} {target}" for sub, target in STATE_DIRS.items()
        )
        script = f"{binds} && exec libvirtd -f {conf} -p {self.dir / 'libvirtd.pid'}"
        self.proc = subprocess.Popen(
            ["unshare", "-m", "--propagation", "private", "sh", "-c", script],
            stdout=open(self.dir / "libvirtd.out", "wb"),
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 60
        while self.virsh("version", check=False).returncode != 0:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"libvirtd did not start: {self.log_tail()}")
            time.sleep(0.2)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is None:
            return
        for name in self.virsh("list", "--name", check=False).stdout.split():
            self.virsh("destroy", name, check=False)
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def virsh(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        out = subprocess.run(
            ["virsh", "-q", "-c", self.uri, *args], capture_output=True, text=True, timeout=120
        )
        if check and out.returncode != 0:
            raise AssertionError(f"virsh {' '.join(args)}: {out.stderr.strip()}")
        return out

    def log_tail(self, n: int = 3000) -> str:
        try:
            return (self.dir / "libvirtd.log").read_text(errors="replace")[-n:]
        except OSError:
            return ""


def domain_xml(name: str, g: Guest, disk: GuestDisk, memory: int) -> str:
    """A TCG domain booting the test guest, its disk on virtio-blk, the command serial port
    on ``g.cmd_path`` and a second QMP monitor on ``g.qmp`` (libvirt keeps its own)."""
    kernel = guest_dir()
    q = quoteattr
    return f"""<domain type='qemu' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>{name}</name>
  <memory unit='MiB'>{memory}</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{kernel / "vmlinuz"}</kernel>
    <initrd>{kernel / "initrd.gz"}</initrd>
    <cmdline>console=ttyS0 panic=-1 quiet no_timer_check</cmdline>
  </os>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>{shutil.which("qemu-system-x86_64")}</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type={q(disk.fmt)} discard='unmap'/>
      <source file={q(str(disk.path))}/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <serial type='file'><source path={q(str(g.console))}/><target port='0'/></serial>
    <serial type='unix'>
      <source mode='bind' path={q(str(g.cmd_path))}/><target port='1'/>
    </serial>
    <memballoon model='none'/>
  </devices>
  <qemu:commandline>
    <qemu:arg value='-qmp'/>
    <qemu:arg value={q(f"unix:{g.qmp},server=on,wait=off")}/>
  </qemu:commandline>
</domain>
"""


class LibvirtGuest(Guest):
    """The test guest, run by libvirt (``virsh create``) instead of by the test."""

    def __init__(
        self, lv: Libvirtd, workdir: Path, disk: GuestDisk, *, name: str, memory: int = 160
    ) -> None:
        super().__init__(workdir, [disk], memory=memory)
        self.lv = lv
        self.name = name
        self.disk = disk

    def __enter__(self) -> LibvirtGuest:
        xml = self.workdir / f"{self.name}.xml"
        xml.write_text(domain_xml(self.name, self, self.disk, self.memory))
        self.lv.virsh("create", str(xml))
        deadline = time.monotonic() + 60
        while not (self.cmd_path.exists() and self.qmp.exists()):
            if time.monotonic() > deadline:
                raise RuntimeError(f"libvirt's QEMU did not start: {self.lv.log_tail()}")
            time.sleep(0.05)
        self.connect_serial()
        return self

    def kill(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self.lv.virsh("destroy", self.name, check=False)
