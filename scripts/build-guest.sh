#!/usr/bin/env bash
# Build the tiny Linux guest the attach tests boot under qemu-system-x86_64 -accel tcg: the
# Debian kernel (linux-image-amd64) and a busybox initramfs holding the modules a virtio-blk
# ext4 disk needs.  The guest runs a line protocol on its second serial port (ttyS1): each
# line is a shell command, answered by its output and "@@RC <status>".  Cached: rebuilt only
# when the kernel, busybox or this script change.
# Usage: scripts/build-guest.sh CACHE_DIR [--with-fio]   (prints the directory holding
# vmlinuz + initrd.gz).  --with-fio adds the host's fio and its libraries (bench/attach.py).
set -euo pipefail
cache=${1:?usage: build-guest.sh CACHE_DIR [--with-fio]}
with_fio=${2:-}
kernel=$(ls /boot/vmlinuz-*-amd64 2>/dev/null | sort -V | tail -1)
[ -n "$kernel" ] || { echo "build-guest: no /boot/vmlinuz-*-amd64 (apt-get install linux-image-amd64)" >&2; exit 1; }
kver=${kernel#/boot/vmlinuz-}
busybox=$(command -v busybox) || { echo "build-guest: no busybox (apt-get install busybox-static)" >&2; exit 1; }
key=$(cat "$0" "$busybox" | sha256sum | cut -c1-16)-$kver
if [ "$with_fio" = --with-fio ]; then key=$key-fio; fi
out="$cache/guest-$key"
if [ -f "$out/initrd.gz" ]; then echo "$out"; exit 0; fi
mkdir -p "$cache"
work=$(mktemp -d "$cache/.build-XXXXXX")
trap 'rm -rf "$work"' EXIT
root="$work/root"
mkdir -p "$root"/{bin,dev,proc,sys,mnt,tmp,lib/modules}
cp "$busybox" "$root/bin/busybox"
for app in $("$busybox" --list); do [ "$app" = busybox ] || ln -sf busybox "$root/bin/$app"; done
# Modules in dependency order (modules.dep lists a module's dependencies after it).
moddir=/lib/modules/$kver
order=()
add() {
  local m=$1 deps
  for seen in "${order[@]:-}"; do [ "$seen" = "$m" ] && return 0; done
  deps=$(grep -E "^$m:" "$moddir/modules.dep" | cut -d: -f2-)
  for d in $deps; do add "$d"; done
  order+=("$m")
}
for name in virtio_pci virtio_blk crc32c_generic ext4; do
  path=$(grep -oE "^[^:]*/$name\.ko(\.xz|\.zst)?:" "$moddir/modules.dep" | tr -d :)
  add "$path"
done
: >"$root/modules"
for m in "${order[@]}"; do
  base=$(basename "$m")
  case "$base" in
    *.xz) xz -dc "$moddir/$m" >"$root/lib/modules/${base%.xz}"; base=${base%.xz} ;;
    *.zst) zstd -qdc "$moddir/$m" >"$root/lib/modules/${base%.zst}"; base=${base%.zst} ;;
    *) cp "$moddir/$m" "$root/lib/modules/$base" ;;
  esac
  echo "$base" >>"$root/modules"
done
if [ "$with_fio" = --with-fio ]; then
  fio=$(command -v fio) || { echo "build-guest: no fio" >&2; exit 1; }
  cp "$fio" "$root/bin/fio"
  for lib in $(ldd "$fio" | grep -oE '/[^ ]+'); do
    mkdir -p "$root$(dirname "$lib")"
    cp -L "$lib" "$root$lib"
  done
fi
cat >"$root/init" <<'INIT'
#!/bin/sh
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs tmp /tmp
for m in $(cat /modules); do insmod /lib/modules/$m 2>/dev/null; done
echo 1 >/proc/sys/kernel/printk
stty -F /dev/ttyS1 raw -echo
exec </dev/ttyS1 >/dev/ttyS1 2>&1
echo "@@READY"
while IFS= read -r line; do
  sh -c "$line" >/tmp/out 2>&1
  rc=$?
  cat /tmp/out
  echo "@@RC $rc"
done
poweroff -f
INIT
chmod +x "$root/init"
(cd "$root" && find . | cpio -o -H newc --quiet | gzip -1) >"$work/initrd.gz"
mkdir -p "$out"
cp "$kernel" "$out/vmlinuz"
mv "$work/initrd.gz" "$out/initrd.gz"
echo "$out"
