#!/usr/bin/env python3
"""Benchmark: an incremental live recapture against the full live capture, same guest, same run.

A lab guest (the tests' Debian image, TCG or KVM as the lab picks) runs with a data disk `vdb`:
a qcow2 of VIRTUAL GiB holding DATA GiB of random bytes in 64 extents. imaged (release) captures
`vdb` live (crash-consistent) into its local repository: the first capture reads the whole disk
and makes a checkpoint. Then the guest overwrites CHANGE % of the virtual size with random bytes
(`dd` in the guest, in 64 MiB runs inside the data extents), and imaged captures again: only the
chunks the dirty bitmap marks are read. Page cache dropped before each capture. Printed: wall
time, bytes read, the changed bytes the bitmap reported, the daemon's and QEMU's user/system CPU,
and the ratios the issue sets (recapture reads <= 1.1x the changed bytes rounded to chunks, and
takes <= 0.2x the full capture's time). `qemu-img convert -U -O qcow2` of the data disk, run
alongside, is the baseline of the full capture.

Usage (root): bench/incremental_live.py [--work DIR] [--virtual 20] [--data 4] [--change 5]
"""
import argparse
import base64
import json
import os
import shutil
import signal
import subprocess
import sys
import time

from benchlib import ROOT, drop_caches, make_input, proc_cpu, sh, start_imaged

CHUNK = 4 << 20
RUN = 64 << 20


def agent(dom, cmd, args=None, timeout=30):
    msg = {"execute": cmd}
    if args is not None:
        msg["arguments"] = args
    out = subprocess.run(["virsh", "qemu-agent-command", dom, json.dumps(msg), "--timeout", str(timeout)],
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(out.stderr.strip())
    return json.loads(out.stdout)["return"]


def guest_sh(dom, script, limit=1800):
    pid = agent(dom, "guest-exec", {"path": "/bin/sh", "arg": ["-c", script], "capture-output": True})["pid"]
    t0 = time.monotonic()
    while time.monotonic() - t0 < limit:
        st = agent(dom, "guest-exec-status", {"pid": pid})
        if st.get("exited"):
            if st.get("exitcode", 1) != 0:
                err = base64.b64decode(st.get("err-data", "")).decode(errors="replace")
                sys.exit(f"`{script}` in the guest failed: {err}")
            return
        time.sleep(1)
    sys.exit(f"`{script}` in the guest did not end within {limit} s")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="/var/tmp/imaged-bench")
    ap.add_argument("--virtual", type=int, default=20, help="GiB")
    ap.add_argument("--data", type=int, default=4, help="GiB of random data")
    ap.add_argument("--change", type=float, default=5.0, help="percent of the virtual size rewritten")
    a = ap.parse_args()
    os.makedirs(a.work, exist_ok=True)
    lab = os.path.join(ROOT, "tests/lab")
    sh("bash", f"{lab}/start-libvirt.sh", stdout=subprocess.DEVNULL)
    image_dir = subprocess.run(["bash", f"{lab}/build-guest.sh", "/var/cache/imaged-lab"], capture_output=True,
                               text=True, check=True).stdout.split()[-1]
    accel = subprocess.run(["bash", f"{lab}/pick-accel.sh", "/var/cache/imaged-lab"], capture_output=True,
                           text=True, check=True).stdout.split()[-1]
    sh("cargo", "build", "--release", "--quiet", "--bins", cwd=ROOT)
    imaged = os.path.join(ROOT, "target/release/imaged")
    imagectl = os.path.join(ROOT, "target/release/imagectl")
    src = make_input(a.work, a.virtual, a.data, "qcow2")

    run = os.path.join(a.work, "incr-run")
    shutil.rmtree(run, ignore_errors=True)
    os.makedirs(run)
    os.chmod(run, 0o755)
    system = os.path.join(run, "system.qcow2")
    data = os.path.join(run, "data.qcow2")
    sh("qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", os.path.join(image_dir, "base.qcow2"), system)
    shutil.copyfile(src, data)
    for p in (system, data):
        shutil.chown(p, "libvirt-qemu", "libvirt-qemu")
    dom = f"imaged-bench-incr-{os.getpid()}"
    disk = lambda path, dev: (f"<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='{path}'/>"
                              f"<target dev='{dev}' bus='virtio'/></disk>")
    xml = (f"<domain type='{accel}'><name>{dom}</name><memory unit='MiB'>1024</memory><vcpu>2</vcpu>"
           f"<os><type arch='x86_64' machine='pc'>hvm</type><kernel>{image_dir}/vmlinuz</kernel>"
           f"<initrd>{image_dir}/initrd.img</initrd><cmdline>root=/dev/vda ro console=ttyS0</cmdline></os>"
           f"<features><acpi/><apic/></features><devices>{disk(system, 'vda')}{disk(data, 'vdb')}"
           f"<channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>"
           f"<controller type='usb' model='none'/><memballoon model='none'/></devices></domain>")
    with open(os.path.join(run, "dom.xml"), "w") as f:
        f.write(xml)
    sock = os.path.join(run, "imaged.sock")
    cfg = os.path.join(run, "imaged.toml")
    with open(os.open(cfg, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
        f.write(f'[daemon]\nsocket = "{sock}"\nlog_level = "info"\nstate_dir = "{run}/state"\n'
                f'[repository]\npath = "{run}/repo"\n[capture]\nrun_dir = "{run}/nbd"\n')
    daemon = None
    sh("virsh", "-q", "create", os.path.join(run, "dom.xml"), stdout=subprocess.DEVNULL)
    try:
        t0 = time.monotonic()
        while True:
            try:
                agent(dom, "guest-ping", timeout=5)
                break
            except RuntimeError:
                if time.monotonic() - t0 > 300:
                    sys.exit("the guest agent did not answer within 300 s")
                time.sleep(2)
        qemu_pid = int(open(f"/run/libvirt/qemu/{dom}.pid").read().strip())
        daemon = start_imaged(imaged, cfg, sock, os.path.join(run, "imaged.log"))
        ctl = [imagectl, "--socket", sock, "--json"]
        print(f"incremental live recapture ({a.virtual} GiB virtual, {a.data} GiB data, {a.change:g}% rewritten in the guest; "
              f"{accel}; page cache dropped before each step)")
        print(f"{'step':<40} {'seconds':>8} {'read MiB':>9} {'imaged user/sys s':>18} {'QEMU user/sys s':>16}")

        drop_caches()
        out = os.path.join(run, "convert.qcow2")
        t = time.monotonic()
        sh("qemu-img", "convert", "-U", "-f", "qcow2", "-O", "qcow2", data, out)
        convert_t = time.monotonic() - t
        os.unlink(out)
        print(f"{'qemu-img convert -U -O qcow2 (vdb)':<40} {convert_t:8.2f}")

        def capture(name):
            drop_caches()
            c0, q0 = proc_cpu(daemon.pid), proc_cpu(qemu_pid)
            t = time.monotonic()
            p = subprocess.run(ctl + ["capture", dom, "--disk", "vdb", "--mode", "crash-consistent", "--name", name],
                               capture_output=True, text=True)
            dt = time.monotonic() - t
            c1, q1 = proc_cpu(daemon.pid), proc_cpu(qemu_pid)
            op = json.loads(p.stdout) if p.stdout.strip() else {}
            if op.get("state") != "active":
                sys.exit(f"capture {name} failed: {p.stdout}{p.stderr}")
            cpu = (c1[0] - c0[0], c1[1] - c0[1]), (q1[0] - q0[0], q1[1] - q0[1])
            return dt, op, cpu

        full_t, full, (dc, qc) = capture("incr-full")
        full_read = full["progress"]["read_bytes"]
        print(f"{'full live capture':<40} {full_t:8.2f} {full_read >> 20:9} {dc[0]:8.2f}/{dc[1]:<8.2f} {qc[0]:7.2f}/{qc[1]:<7.2f}"
              f"  {full_t / convert_t:.2f}x of convert")

        # Rewrite CHANGE % of the virtual size, in 64 MiB runs spread over the data extents.
        total = int(a.virtual * (1 << 30) * a.change / 100) // RUN * RUN
        extent, stride = (a.data << 30) // 64, (a.virtual << 30) // 64
        runs = total // RUN
        per_extent = max(1, -(-runs // 64))
        script = []
        done = 0
        for i in range(64):
            for k in range(per_extent):
                if done == runs or (k + 1) * RUN > extent:
                    break
                script.append(f"dd if=/dev/urandom of=/dev/vdb bs=4M seek={(i * stride + k * RUN) // CHUNK} count={RUN // CHUNK} "
                              f"oflag=direct conv=notrunc status=none")
                done += 1
        t = time.monotonic()
        guest_sh(dom, " && ".join(script) + " && sync")
        print(f"{'(guest rewrote ' + str((done * RUN) >> 20) + ' MiB)':<40} {time.monotonic() - t:8.2f}")

        inc_t, inc, (dc, qc) = capture("incr-2")
        r = inc.get("read") or {}
        inc_read = inc["progress"]["read_bytes"]
        changed = r.get("changed_bytes", 0)
        print(f"{'incremental live recapture':<40} {inc_t:8.2f} {inc_read >> 20:9} {dc[0]:8.2f}/{dc[1]:<8.2f} {qc[0]:7.2f}/{qc[1]:<7.2f}"
              f"  {inc_t / full_t:.2f}x of the full capture")
        if not r.get("incremental"):
            sys.exit(f"the recapture was not incremental: {r}")
        rounded = -(-changed // CHUNK) * CHUNK
        print(f"changed (dirty bitmap): {changed >> 20} MiB; read {inc_read >> 20} MiB = {inc_read / max(changed, 1):.2f}x of it "
              f"(target <= 1.1x of the changed bytes rounded to chunks, {rounded >> 20} MiB: {inc_read / max(rounded, 1):.2f}x); "
              f"time {inc_t / full_t:.2f}x of the full capture (target <= 0.2x)")
        with open(os.path.join(a.work, "incremental-results.json"), "w") as f:
            json.dump({"virtual_gib": a.virtual, "data_gib": a.data, "change_percent": a.change, "convert_seconds": round(convert_t, 3),
                       "full_seconds": round(full_t, 3), "full_read_bytes": full_read, "incremental_seconds": round(inc_t, 3),
                       "incremental_read_bytes": inc_read, "changed_bytes": changed}, f, indent=1)
    finally:
        if daemon is not None:
            daemon.send_signal(signal.SIGTERM)
            daemon.wait(timeout=60)
        subprocess.run(["virsh", "-q", "destroy", dom], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        shutil.rmtree(run, ignore_errors=True)


if __name__ == "__main__":
    main()
