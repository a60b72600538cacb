#!/usr/bin/env bash
# The main job, on a fresh Debian 12 machine as root: builds imaged, starts it with its embedded
# defaults (no config file: libvirt at qemu:///system, repository /var/lib/imaged/repo, API on
# /run/imaged/imaged.sock), defines a small Debian test guest (shut off) and captures it end to
# end with imagectl, then exports the image as qcow2 and proves it identical to the guest's disk.
#
#   scripts/demo.sh            run it, then stop the daemon
#   scripts/demo.sh --keep     leave the daemon running afterwards (imagectl keeps working)
set -euo pipefail
cd "$(dirname "$0")/.."
keep=0
[ "${1:-}" = "--keep" ] && keep=1

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

say "installing packages and building imaged (release)"
scripts/install-deps.sh
cargo build --release --locked --bins
IMAGED=$PWD/target/release/imaged
IMAGECTL=$PWD/target/release/imagectl

say "starting libvirt and preparing the demo guest"
tests/lab/start-libvirt.sh
img=$(tests/lab/build-guest.sh | tail -n1)
accel=$(tests/lab/pick-accel.sh | tail -n1)
DOM=imaged-demo
DIR=/var/lib/imaged-demo
mkdir -p "$DIR"
if ! virsh -c qemu:///system dominfo "$DOM" >/dev/null 2>&1; then
  qemu-img create -q -f qcow2 -F qcow2 -b "$img/base.qcow2" "$DIR/disk.qcow2"
  cat > "$DIR/domain.xml" <<XML
<domain type='$accel'>
  <name>$DOM</name>
  <memory unit='MiB'>1024</memory>
  <vcpu>2</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>$img/vmlinuz</kernel>
    <initrd>$img/initrd.img</initrd>
    <cmdline>root=/dev/vda ro console=ttyS0</cmdline>
  </os>
  <features><acpi/><apic/></features>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='$DIR/disk.qcow2'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>
    <serial type='file'><source path='$DIR/console.log'/><target port='0'/></serial>
  </devices>
</domain>
XML
  virsh -c qemu:///system define "$DIR/domain.xml" >/dev/null
  echo "defined domain $DOM (disk $DIR/disk.qcow2, backed by $img/base.qcow2)"
fi
if [ "$(virsh -c qemu:///system domstate "$DOM")" != "shut off" ]; then
  echo "domain $DOM is running; shutting it down for a cold capture"
  virsh -c qemu:///system shutdown "$DOM" >/dev/null || true
  for _ in $(seq 60); do [ "$(virsh -c qemu:///system domstate "$DOM")" = "shut off" ] && break; sleep 1; done
fi

say "starting imaged with its embedded defaults"
started=0
if ! "$IMAGECTL" images >/dev/null 2>&1; then
  "$IMAGED" >>/var/log/imaged-demo.log 2>&1 &
  pid=$!
  started=1
  for _ in $(seq 100); do "$IMAGECTL" images >/dev/null 2>&1 && break; sleep 0.1; done
  echo "imaged running (pid $pid), log in /var/log/imaged-demo.log"
fi
stop() {
  if [ "$started" = 1 ] && [ "$keep" = 0 ]; then kill -TERM "$pid"; wait "$pid" || true; echo "imaged stopped"; fi
}
trap stop EXIT

say "imagectl domains"
"$IMAGECTL" domains
NAME="$DOM-$(date +%Y%m%d-%H%M%S)"
say "imagectl capture $DOM --name $NAME"
"$IMAGECTL" capture "$DOM" --name "$NAME"
say "imagectl image $NAME"
"$IMAGECTL" image "$NAME"
# Exports go only to allowed directories; the daemon's own is <repository>/export.
OUT=/var/lib/imaged/repo/export
say "imagectl export $NAME --format qcow2 -o $OUT/$NAME.qcow2"
"$IMAGECTL" export "$NAME" --format qcow2 -o "$OUT/$NAME.qcow2"
qemu-img compare -f qcow2 -F qcow2 "$DIR/disk.qcow2" "$OUT/$NAME.qcow2"
say "imagectl images"
"$IMAGECTL" images
echo
echo "done: image $NAME is in /var/lib/imaged/repo, its qcow2 export in $OUT/$NAME.qcow2"
