#!/usr/bin/env bash
# Starts virtlogd and libvirtd by hand (this host's PID 1 is not systemd) unless
# `virsh -c qemu:///system version` already answers, then waits (up to 60 s) until it does.
# Idempotent: run it as often as you like; it prints what it did.
# The lab uses no libvirt storage pool and no libvirt network: disks are plain files given by
# path and test guests have no NIC, so a missing or inactive `default` pool/network is fine.
set -euo pipefail

URI=qemu:///system
WAIT=${IMAGED_LAB_LIBVIRT_WAIT:-60}

say() { echo "start-libvirt: $*"; }

answers() { timeout 15 virsh -c "$URI" version >/dev/null 2>&1; }

# running PIDFILE: true when the pid written in PIDFILE is a live process.
running() {
  local pid
  [ -s "$1" ] || return 1
  pid=$(cat "$1" 2>/dev/null) || return 1
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null
}

for b in virsh /usr/sbin/virtlogd /usr/sbin/libvirtd; do
  command -v "$b" >/dev/null || { say "missing $b: run scripts/install-deps.sh" >&2; exit 1; }
done

# Without udev nobody gives /dev/kvm its usual root:kvm 0660 (Debian's udev rule does). Left at
# root-only, QEMU (run as libvirt-qemu:kvm) cannot open it and libvirt, which probed KVM as root,
# throws its capability cache away on every call: each define/start/version costs 4-8 s more.
if [ -c /dev/kvm ] && getent group kvm >/dev/null; then
  if [ "$(stat -c %G /dev/kvm)" != kvm ] || [ $(( 0$(stat -c %a /dev/kvm) & 060 )) -ne $(( 060 )) ]; then
    chgrp kvm /dev/kvm && chmod 0660 /dev/kvm
    say "gave /dev/kvm group kvm, mode 0660 (what udev does on a normal host)"
  fi
fi

if answers; then
  say "libvirtd already answers on $URI: nothing to do"
else
  if running /run/virtlogd.pid; then
    say "virtlogd already running (pid $(cat /run/virtlogd.pid))"
  else
    say "starting virtlogd"
    /usr/sbin/virtlogd -d
  fi
  if running /run/libvirtd.pid; then
    say "libvirtd already running (pid $(cat /run/libvirtd.pid)), not answering yet"
  else
    say "starting libvirtd"
    /usr/sbin/libvirtd -d
  fi
  start=$SECONDS
  until answers; do
    if [ $((SECONDS - start)) -ge "$WAIT" ]; then
      say "libvirtd does not answer on $URI after ${WAIT}s" >&2
      virsh -c "$URI" version >&2 || true
      exit 1
    fi
    sleep 1
  done
  say "libvirtd answers on $URI after $((SECONDS - start))s"
fi

# Both daemons must be up: libvirtd needs virtlogd for the guests' console logs.
if ! running /run/virtlogd.pid; then
  say "starting virtlogd (libvirtd was up without it)"
  /usr/sbin/virtlogd -d
  for _ in $(seq 20); do running /run/virtlogd.pid && break; sleep 0.5; done
  running /run/virtlogd.pid || { say "virtlogd did not start" >&2; exit 1; }
fi
say "no storage pool or network needed: lab disks are plain files given by path, guests have no NIC"
say "$(virsh -c "$URI" version 2>/dev/null | grep -i 'running hypervisor' || echo 'ready')"
