#!/usr/bin/env bash
# Decides which accelerator the lab's guests use and prints it: `kvm` or `qemu` (TCG).
#   pick-accel.sh [CACHE_DIR]      (default /var/cache/imaged-lab)
# /dev/kvm existing is not enough: on some hosts (a paravirtual KVM flavour) a stock Debian guest
# kernel hangs under KVM. So this boots the lab's own guest (build-guest.sh, cached) once under
# KVM straight with qemu-system-x86_64, the disk in snapshot mode, and picks `kvm` only when the
# serial console shows a login prompt within IMAGED_LAB_KVM_TEST_TIMEOUT seconds (default 40),
# giving up early when the console stays empty for IMAGED_LAB_KVM_FIRST_OUTPUT seconds (15).
# The answer is cached in CACHE_DIR/accel-<key> (key: host kernel, QEMU version, guest image), so
# the test boot happens once. IMAGED_LAB_ACCEL=kvm|qemu overrides everything.
# Progress goes to stderr; stdout holds only the answer.
set -euo pipefail

CACHE=${1:-/var/cache/imaged-lab}
TIMEOUT=${IMAGED_LAB_KVM_TEST_TIMEOUT:-40}
FIRST_OUTPUT=${IMAGED_LAB_KVM_FIRST_OUTPUT:-15}
here=$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")

log() { echo "pick-accel: $*" >&2; }

case "${IMAGED_LAB_ACCEL:-}" in
  kvm|qemu) log "IMAGED_LAB_ACCEL=$IMAGED_LAB_ACCEL (override)"; echo "$IMAGED_LAB_ACCEL"; exit 0 ;;
  "") ;;
  *) log "IMAGED_LAB_ACCEL must be kvm or qemu, not '$IMAGED_LAB_ACCEL'"; exit 1 ;;
esac

if [ ! -c /dev/kvm ] || ! ( : <>/dev/kvm ) 2>/dev/null; then
  log "/dev/kvm is missing or cannot be opened: TCG"
  echo qemu
  exit 0
fi

command -v qemu-system-x86_64 >/dev/null || { log "missing qemu-system-x86_64: run scripts/install-deps.sh"; exit 1; }
guest=$("$here/build-guest.sh" "$CACHE" | tail -n1)
[ -s "$guest/vmlinuz" ] || { log "build-guest.sh gave no guest image"; exit 1; }

qemu_version=$(qemu-system-x86_64 --version | head -n1)
key=$(printf '%s\n' "$(uname -r)" "$qemu_version" "$guest" "$TIMEOUT" | sha256sum | cut -c1-16)
answer_file=$CACHE/accel-$key
if [ -s "$answer_file" ]; then
  answer=$(head -n1 "$answer_file")
  if [ "$answer" = kvm ] || [ "$answer" = qemu ]; then
    log "cached answer from $answer_file: $answer"
    echo "$answer"
    exit 0
  fi
fi

exec 9>"$CACHE/.accel.lock"
flock 9
if [ -s "$answer_file" ]; then     # decided by a concurrent run while we waited
  answer=$(head -n1 "$answer_file"); log "cached answer: $answer"; echo "$answer"; exit 0
fi

tmp=$(mktemp -d)
qpid=
cleanup() {
  if [ -n "$qpid" ]; then kill "$qpid" 2>/dev/null || true; wait "$qpid" 2>/dev/null || true; fi
  rm -rf "$tmp"
}
trap cleanup EXIT
trap 'exit 130' INT TERM HUP

log "test boot of $guest under KVM (up to ${TIMEOUT}s)"
# Same machine shape as the lab's libvirt domains: pc machine, no -cpu (libvirt's default), 1 GiB,
# 2 vCPUs, virtio disk, kernel command line root=/dev/vda ro console=ttyS0.
qemu-system-x86_64 -machine pc,accel=kvm -m 1024 -smp 2 -nodefaults -display none -no-reboot \
  -serial "file:$tmp/console.log" -kernel "$guest/vmlinuz" -initrd "$guest/initrd.img" \
  -append "root=/dev/vda ro console=ttyS0" \
  -drive "file=$guest/base.qcow2,format=qcow2,if=virtio,snapshot=on" \
  >"$tmp/qemu.log" 2>&1 &
qpid=$!
start=$SECONDS
answer=qemu
why="no login prompt within ${TIMEOUT}s"
while [ $((SECONDS - start)) -lt "$TIMEOUT" ]; do
  if grep -q 'login:' "$tmp/console.log" 2>/dev/null; then
    answer=kvm; why="login prompt after $((SECONDS - start))s"; break
  fi
  # A working KVM prints the kernel's first lines within a second or two; this host's broken
  # flavour prints nothing at all, so do not wait the whole timeout for it.
  if [ $((SECONDS - start)) -ge "$FIRST_OUTPUT" ] && [ ! -s "$tmp/console.log" ]; then
    why="no console output within ${FIRST_OUTPUT}s"; break
  fi
  if ! kill -0 "$qpid" 2>/dev/null; then
    why="QEMU exited: $(tail -n3 "$tmp/qemu.log" | tr '\n' ' ')"; break
  fi
  sleep 1
done
if [ "$answer" = qemu ]; then
  log "KVM test boot failed ($why; $(wc -l <"$tmp/console.log" 2>/dev/null || echo 0) console lines): TCG"
else
  log "KVM works ($why)"
fi
printf '%s\n# %s; %s; decided %s\n' "$answer" "$why" "$qemu_version" "$(date -u +%FT%TZ)" \
  >"$answer_file.tmp"
mv -f "$answer_file.tmp" "$answer_file"
echo "$answer"
