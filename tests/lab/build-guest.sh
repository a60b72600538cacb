#!/usr/bin/env bash
# Builds, once, the test lab's Debian 12 guest image and caches it:
#   build-guest.sh [CACHE_DIR]      (default /var/cache/imaged-lab)
# Result: CACHE_DIR/<hash>/{base.qcow2,vmlinuz,initrd.img}, where <hash> is taken over this script
# and the package list, so editing the recipe builds a new image next to the old one. The build
# happens in a temporary directory that is renamed into place only when complete, under a lock,
# so an interrupted or concurrent build never leaves a half image that looks done.
# The last line of stdout is the result directory; progress goes to stderr.
#
# The guest: debootstrap minbase + systemd, dbus, udev, qemu-guest-agent (started by Debian's
# udev rule when the virtio port org.qemu.guest_agent.0 appears), ifupdown, e2fsprogs and the
# stock kernel; root filesystem = the whole of /dev/vda (ext4, label "root", no partition table,
# no bootloader: the host boots vmlinuz + initrd.img directly with `root=/dev/vda ro`); a 6 MiB
# initrd holding only virtio_pci virtio_blk virtio_console ext4; kernel modules for display, sound,
# radio and other absent hardware, docs, man pages and locales removed; root password locked; no NIC
# configured (only `lo` in /etc/network/interfaces); apt timers masked so the guest stays quiet.
# Environment: IMAGED_LAB_MIRROR (default: the Debian mirror of the host's apt sources).
set -euo pipefail

CACHE=${1:-/var/cache/imaged-lab}
SUITE=bookworm
INCLUDE=systemd-sysv,dbus,udev,kmod,qemu-guest-agent,ifupdown,e2fsprogs,linux-image-amd64
INITRD_MODULES=(virtio_pci virtio_blk virtio_console ext4)
DISK_SIZE=2G
GUEST_HOSTNAME=imaged-lab-guest

log() { echo "build-guest: $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# The Debian mirror the host's apt uses (deb822 .sources or one-line .list), else deb.debian.org.
host_mirror() {
  local m
  m=$(grep -hsE '^URIs:' /etc/apt/sources.list.d/*.sources 2>/dev/null |
        awk '{for (i = 2; i <= NF; i++) print $i}' | grep -E '/debian/?$' | head -n1 || true)
  [ -n "$m" ] || m=$(grep -hsE '^deb ' /etc/apt/sources.list 2>/dev/null |
        grep -oE 'https?://[^ ]+/debian/?( |$)' | head -n1 | tr -d ' ' || true)
  echo "${m:-http://deb.debian.org/debian}"
}
MIRROR=${IMAGED_LAB_MIRROR:-$(host_mirror)}

self=$(readlink -f "${BASH_SOURCE[0]}")
hash=$({ cat "$self"; echo "$SUITE $INCLUDE ${INITRD_MODULES[*]}"; } | sha256sum | cut -c1-16)
final=$CACHE/$hash

done_already() { [ -s "$final/base.qcow2" ] && [ -s "$final/vmlinuz" ] && [ -s "$final/initrd.img" ]; }

if done_already; then
  log "cached image in $final"
  echo "$final"
  exit 0
fi

for b in debootstrap mkfs.ext4 qemu-img chroot flock sha256sum; do
  command -v "$b" >/dev/null || die "missing $b: run scripts/install-deps.sh"
done
[ "$(id -u)" = 0 ] || die "must run as root (debootstrap, chroot, mounts)"

mkdir -p "$CACHE"
chmod 0755 "$CACHE"
exec 9>"$CACHE/.build.lock"
log "waiting for the build lock $CACHE/.build.lock"
flock 9
if done_already; then        # someone else built it while we waited
  log "cached image in $final (built by a concurrent run)"
  echo "$final"
  exit 0
fi

# mounts_under DIR: mount points at or below DIR, deepest first.
mounts_under() {
  awk -v d="$1" '$2 == d || index($2, d "/") == 1 { print $2 }' /proc/self/mounts | sort -r
}
# unmount_all DIR: unmount everything below DIR (debootstrap's own /proc, /sys, our binds).
unmount_all() {
  local m
  for m in $(mounts_under "$1"); do
    umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || log "could not unmount $m"
  done
}
# remove_tree DIR: rm -rf, but never while something (a bind of the host's /dev!) is mounted below.
remove_tree() {
  unmount_all "$1"
  if [ -n "$(mounts_under "$1")" ]; then
    log "NOT removing $1: still has mounts: $(mounts_under "$1" | tr '\n' ' ')"
    return 1
  fi
  rm -rf --one-file-system "$1"
}

# Leftovers of builds that were killed (we hold the lock, so nobody is using them).
for old in "$CACHE"/.tmp-*; do
  [ -e "$old" ] || continue
  log "removing leftover of an interrupted build: $old"
  remove_tree "$old" || true
done

tmp=$(mktemp -d "$CACHE/.tmp-$hash.XXXXXX")
root=$tmp/root
out=$tmp/out
cleanup() {
  local rc=$?
  remove_tree "$tmp" || true
  [ $rc -eq 0 ] || log "build FAILED (exit $rc); nothing was left in $CACHE"
}
trap cleanup EXIT
trap 'exit 130' INT TERM HUP

mkdir -p "$root" "$out"
start=$SECONDS
log "debootstrap $SUITE from $MIRROR into $root (about 1.5 min)"
if ! debootstrap --variant=minbase --include="$INCLUDE" "$SUITE" "$root" "$MIRROR" \
     >"$tmp/debootstrap.log" 2>&1; then
  tail -n 30 "$tmp/debootstrap.log" >&2
  [ -f "$root/debootstrap/debootstrap.log" ] && tail -n 30 "$root/debootstrap/debootstrap.log" >&2
  die "debootstrap failed"
fi
log "debootstrap done in $((SECONDS - start))s"

# --- configuration ---------------------------------------------------------------------------
echo "$GUEST_HOSTNAME" >"$root/etc/hostname"
cat >"$root/etc/hosts" <<HOSTS
127.0.0.1	localhost
127.0.1.1	$GUEST_HOSTNAME
::1		localhost ip6-localhost ip6-loopback
HOSTS
cat >"$root/etc/fstab" <<'FSTAB'
# <device>	<mount point>	<type>	<options>		<dump>	<pass>
/dev/vda	/		ext4	errors=remount-ro	0	1
FSTAB
# Only the loopback: the test guests have no NIC. Tests of the DHCP prep step add stanzas here
# or in interfaces.d.
mkdir -p "$root/etc/network/interfaces.d"
cat >"$root/etc/network/interfaces" <<'IFACES'
# interfaces(5) file used by ifup(8) and ifdown(8)
source /etc/network/interfaces.d/*

auto lo
iface lo inet loopback
IFACES
mkdir -p "$root/etc/udev/rules.d"
# Nobody logs in: root has no usable password (the serial getty still shows the boot).
chroot "$root" passwd --lock root >/dev/null
# Quiet guest: no apt runs in the background of a test.
for u in apt-daily.timer apt-daily-upgrade.timer apt-daily.service apt-daily-upgrade.service; do
  ln -sfn /dev/null "$root/etc/systemd/system/$u"
done
# A short wait instead of 90 s when a unit hangs at shutdown.
mkdir -p "$root/etc/systemd/system.conf.d"
printf '[Manager]\nDefaultTimeoutStopSec=15s\n' >"$root/etc/systemd/system.conf.d/10-imaged-lab.conf"
[ -e "$root/lib/udev/rules.d/60-qemu-guest-agent.rules" ] ||
  grep -rqs guest_agent "$root/lib/udev/rules.d" ||
  die "qemu-guest-agent's udev rule is missing: the agent would not start at boot"

# --- a small initrd: only what a virtio disk with ext4 needs -----------------------------------
kvers=("$root"/lib/modules/*)
[ ${#kvers[@]} -eq 1 ] && [ -d "${kvers[0]}" ] || die "expected one kernel in $root/lib/modules"
kver=$(basename "${kvers[0]}")
# Drivers a virtual machine without display, sound, radio or exotic hardware never loads: about
# 170 MB of the 390 MB of modules. Less allocated data makes every capture test faster.
kdir=$root/lib/modules/$kver/kernel
rm -rf "$kdir"/sound "$kdir"/drivers/{gpu,media,infiniband,iio,staging,comedi,bluetooth} \
       "$kdir"/drivers/net/wireless "$kdir"/net/{wireless,mac80211,bluetooth}
chroot "$root" depmod -a "$kver"
sed -i 's/^MODULES=.*/MODULES=list/' "$root/etc/initramfs-tools/initramfs.conf"
printf '%s\n' "${INITRD_MODULES[@]}" >>"$root/etc/initramfs-tools/modules"
mkdir -p "$root/etc/initramfs-tools/conf.d"
echo RESUME=none >"$root/etc/initramfs-tools/conf.d/resume"
log "update-initramfs for $kver"
mount -t proc proc "$root/proc"
mount -t sysfs sysfs "$root/sys"
mount --bind /dev "$root/dev"
chroot "$root" update-initramfs -u -k "$kver" >"$tmp/initramfs.log" 2>&1 ||
  { cat "$tmp/initramfs.log" >&2; die "update-initramfs failed"; }
unmount_all "$root"
[ -z "$(mounts_under "$root")" ] || die "could not unmount $(mounts_under "$root")"

install -m 0644 "$root/boot/vmlinuz-$kver" "$out/vmlinuz"
install -m 0644 "$root/boot/initrd.img-$kver" "$out/initrd.img"
log "initrd.img is $(du -h "$out/initrd.img" | cut -f1)"

# --- trim and make the disk -----------------------------------------------------------------------
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* "$root"/debootstrap \
       "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/usr/share/locale/*

log "mkfs.ext4 -d (root filesystem, $DISK_SIZE)"
mkfs.ext4 -q -L root -d "$root" "$tmp/root.raw" "$DISK_SIZE" >&2
qemu-img convert -f raw -O qcow2 "$tmp/root.raw" "$out/base.qcow2"
rm -f "$tmp/root.raw"
# Read-only even for the user QEMU runs as (libvirt chowns backing files to it and never gives
# them back): a test that commits into the backing file fails instead of spoiling the cache.
chmod 0444 "$out/base.qcow2"
cat >"$out/RECIPE" <<RECIPE
suite=$SUITE
include=$INCLUDE
mirror=$MIRROR
kernel=$kver
initrd_modules=${INITRD_MODULES[*]}
built=$(date -u +%Y-%m-%dT%H:%M:%SZ)
build_seconds=$((SECONDS - start))
RECIPE
sync -f "$out/base.qcow2"
chmod 0755 "$out"
mv -T "$out" "$final"        # atomic: the directory appears complete or not at all
log "built $final in $((SECONDS - start))s ($(du -h "$final/base.qcow2" | cut -f1) qcow2)"
echo "$final"
