#!/usr/bin/env bash
# Set up a fresh Debian 12 machine for blocktrace: the system tools it serves and is tested
# against, a virtual environment that can see Debian's python3-libnbd, and the package itself.
# Idempotent: installs only what is missing.  Usage: scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
  qemu-utils qemu-system-x86 qemu-system-common  # qemu-img, qemu-io, qemu-nbd, qemu-storage-daemon
  libnbd-bin python3-libnbd                      # nbdinfo, nbdcopy, nbdsh, nbdfuse, module nbd
  nbdkit fio e2fsprogs fuse3 util-linux          # fio's nbd engine, mkfs.ext4/debugfs, losetup
  file kmod procps                               # nbdinfo runs file(1); modprobe; ps/pkill
  xfsprogs dosfstools                            # crashcheck: mkfs.xfs/xfs_repair, fsck.vfat
  python3-venv python3-pip
  nats-server                                    # JetStream for the stream target and its tests
  libdeflate0                                    # optional: 2-3x faster log CRCs (zlib otherwise)
  linux-image-amd64 busybox-static cpio          # the attach tests' guest (scripts/build-guest.sh)
  libvirt-daemon libvirt-daemon-driver-qemu      # attach to libvirt-managed VMs: libvirtd,
  libvirt-clients python3-libvirt                # virsh, attach --libvirt (tests/libvirt_helpers.py)
)

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]} with apt-get (a minute or two on a fresh machine)" >&2
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# libvirtd's QEMU driver looks up its default QEMU user at start, even when qemu.conf says
# root (the tests' does).  Debian's libvirt-daemon-system creates it, but also brings systemd
# units and a default network this project does not want; create just the user.
if ! getent passwd libvirt-qemu >/dev/null; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO useradd --system --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin \
    libvirt-qemu
fi

# Debian's python3-libnbd is not on PyPI: the venv must be made by Debian's own interpreter
# with --system-site-packages so that `import nbd` works inside it.
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c 'import nbd' 2>/dev/null; then
  echo "setup: making the virtual environment .venv (with Debian's python3-libnbd visible)" >&2
  rm -rf .venv
  /usr/bin/python3 -m venv --system-site-packages .venv
fi
stamp=.venv/.blocktrace-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "setup: installing blocktrace and its Python dependencies into .venv" >&2
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e '.[test]'
  touch "$stamp"
fi
echo "setup: done (.venv/bin/blocktrace)" >&2
