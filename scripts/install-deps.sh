#!/usr/bin/env bash
# Installs what imaged, its tests and its benchmark need on a fresh Debian 12 host (as root).
# Idempotent: packages already present are left alone.
set -euo pipefail
pkgs=(qemu-system-x86 qemu-utils libvirt-daemon-system libvirt-clients libvirt-dev pkg-config
      debootstrap e2fsprogs nbdkit libnbd-bin ca-certificates)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "install-deps: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
command -v cargo >/dev/null || { echo "install-deps: cargo not found: install a Rust toolchain (rustup) first" >&2; exit 1; }
