#!/usr/bin/env bash
# Installs what imaged, its tests and its benchmark need on a fresh Debian 12 host (as root),
# then checks that every binary the project runs is really there.
#
# One apt transaction for everything, so apt can never remove one needed package to satisfy
# another: a host that carries qemu-utils from bookworm-backports (10.x) cannot keep it beside
# Debian 12's qemu-system-x86 (7.2; qemu-utils 10 "Breaks: qemu-system-common < 8.0"), and a
# plain `apt-get install qemu-system-x86` would silently remove qemu-utils. So when QEMU's
# system emulator is missing, qemu-utils is pinned to the very version of qemu-system-x86 that
# apt will install (a downgrade where needed, said aloud). Idempotent: packages already present
# are left alone.
set -euo pipefail
pkgs=(qemu-system-x86 qemu-utils libvirt-daemon-system libvirt-clients libvirt-dev pkg-config
      debootstrap e2fsprogs nbdkit libnbd-bin ca-certificates curl)
# Binaries the project runs, and the package that brings each.
bins=(qemu-img:qemu-utils qemu-nbd:qemu-utils qemu-system-x86_64:qemu-system-x86
      virsh:libvirt-clients /usr/sbin/libvirtd:libvirt-daemon-system
      /usr/sbin/virtlogd:libvirt-daemon-system debootstrap:debootstrap mkfs.ext4:e2fsprogs
      debugfs:e2fsprogs e2fsck:e2fsprogs nbdkit:nbdkit nbdinfo:libnbd-bin pkg-config:pkg-config
      curl:curl)

say() { echo "install-deps: $*"; }
installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'ok installed'; }

missing=()
for p in "${pkgs[@]}"; do installed "$p" || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  args=()
  for p in "${missing[@]}"; do
    [ "$p" = qemu-utils ] || args+=("$p")
  done
  if ! installed qemu-system-x86; then
    # qemu-utils must come from the same QEMU release as the emulator apt is about to install.
    v=$(apt-cache policy qemu-system-x86 | awk '/Candidate:/ {print $2}')
    [ -n "$v" ] && [ "$v" != "(none)" ] || { say "apt has no candidate for qemu-system-x86" >&2; exit 1; }
    have=$(dpkg-query -W -f='${Version}' qemu-utils 2>/dev/null || true)
    if installed qemu-utils && [ "$have" != "$v" ]; then
      say "qemu-utils $have cannot stay beside qemu-system-x86 $v: installing qemu-utils $v with it"
    fi
    args+=("qemu-utils=$v")
  elif [[ " ${missing[*]} " == *" qemu-utils "* ]]; then
    args+=(qemu-utils)
  fi
  say "installing ${args[*]}"
  apt-get install -y -q --no-install-recommends --allow-downgrades "${args[@]}"
fi

# Check what was produced: every binary we run, by name, with the package that brings it.
bad=0
for b in "${bins[@]}"; do
  bin=${b%%:*} pkg=${b##*:}
  if ! command -v "$bin" >/dev/null 2>&1; then
    say "missing $bin (package $pkg) after install" >&2
    bad=1
  fi
done
for p in "${pkgs[@]}"; do
  installed "$p" || { say "package $p is not installed after install" >&2; bad=1; }
done
[ "$bad" = 0 ] || exit 1
command -v cargo >/dev/null || { say "cargo not found: install a Rust toolchain (rustup) first" >&2; exit 1; }
