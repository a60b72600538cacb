#!/usr/bin/env python3
"""Benchmark: a nightly recapture into imagerepo against Nova's way, same disk, same run.

Input: a raw disk of VIRTUAL GiB holding DATA GiB of random bytes in 64 extents (built once,
cached in the work dir), the disk of a shut-off libvirt domain that is never started. Steps,
page cache dropped before each:

  Nova's way, full        qemu-img convert -O qcow2 to a temp file, then upload it to Glance
                          (the real Glance of tests/servers/glance.sh): every night the whole
                          flattened image goes over the wire again.
  imaged -> imagerepo     imagectl capture --mode cold --to central: the chunk pipeline, over
                          the repository's socket; the repository is told of every data chunk
                          and sent only the ones it lacks.
  CHANGE% of the disk is then overwritten with new random bytes, spread over the data, twice:
  first in 64 MiB runs (files written), then in scattered 1 MiB pieces (the worst case for
  4 MiB chunks: most chunks get a piece); after each, both ways run again. Nova converts and
  uploads everything again; imaged sends only the chunks that changed.

It prints, for each step, the wall time, the bytes that went over the wire and the ratio to
Nova's way; and checks that the recaptured image, read back from the repository through the
download link, equals the changed source (`qemu-img compare`). Run as root (it drops caches
and defines a libvirt domain). Figures go to the README ("Benchmark").

Usage: bench/recapture_imagerepo.py [--work DIR] [--virtual 20] [--data 4] [--change 5]
"""
import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

from benchlib import EXTENTS, GLANCE_HEADERS, ROOT, define_domain, drop_caches, make_input, proc_cpu, sh


def data_extents(virtual_gib, data_gib):
    extent = (data_gib << 30) // EXTENTS
    stride = (virtual_gib << 30) // EXTENTS
    return [(i * stride, extent) for i in range(EXTENTS)]


def change(src, virtual_gib, data_gib, percent, piece, seed):
    """Overwrites `percent` of the virtual size with new random bytes, in pieces of `piece`
    bytes spread over the data extents (a guest's writes land where its files are): whole
    files written are runs of many MiB; small scattered updates are 1 MiB pieces, the worst
    case for 4 MiB chunks. Returns bytes written."""
    total = (virtual_gib << 30) * percent // 100
    spots = []
    for off, length in data_extents(virtual_gib, data_gib):
        spots += [off + k * piece for k in range(length // piece)]
    rng = random.Random(seed)
    chosen = sorted(rng.sample(spots, min(len(spots), total // piece)))
    with open("/dev/urandom", "rb") as rnd, open(src, "r+b") as f:
        for off in chosen:
            f.seek(off)
            left = piece
            while left:
                n = min(left, 8 << 20)
                f.write(rnd.read(n))
                left -= n
        f.flush()
        os.fsync(f.fileno())
    return len(chosen) * piece


def nova_way(src, run, glance, label):
    """qemu-img convert to a temp qcow2, upload it to Glance; returns (seconds, bytes sent)."""
    hdr = sum((["-H", f"{k}: {v}"] for k, v in GLANCE_HEADERS.items()), [])
    tmp = os.path.join(run, "nova-temp.qcow2")
    drop_caches()
    t0 = time.monotonic()
    sh("qemu-img", "convert", "-f", "raw", "-O", "qcow2", src, tmp)
    out = subprocess.run(["curl", "-sf", "-X", "POST", f"{glance}/v2/images", "-H", "Content-Type: application/json",
                          *hdr, "-d", json.dumps({"name": f"nova-{label}", "disk_format": "qcow2",
                                                  "container_format": "bare"})],
                         capture_output=True, check=True).stdout
    iid = json.loads(out)["id"]
    sh("curl", "-sf", "-X", "PUT", "-H", "Content-Type: application/octet-stream", *hdr, "-T", tmp,
       f"{glance}/v2/images/{iid}/file")
    dt = time.monotonic() - t0
    sent = os.path.getsize(tmp)
    os.unlink(tmp)
    # Leave Glance as it was: every run would add gigabytes.
    sh("curl", "-sf", "-X", "DELETE", *hdr, f"{glance}/v2/images/{iid}")
    return dt, sent


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="/var/tmp/imaged-bench")
    ap.add_argument("--virtual", type=int, default=20, help="virtual size, GiB")
    ap.add_argument("--data", type=int, default=4, help="data, GiB")
    ap.add_argument("--change", type=int, default=5, help="percent of the virtual size changed")
    a = ap.parse_args()
    os.makedirs(a.work, exist_ok=True)
    sh("cargo", "build", "--release", "--quiet", "--bins", cwd=ROOT)
    rel = os.path.join(ROOT, "target/release")
    run = os.path.join(a.work, "recapture-run")
    shutil.rmtree(run, ignore_errors=True)
    os.makedirs(run)
    glance = subprocess.run(["bash", os.path.join(ROOT, "tests/servers/glance.sh"), "start"],
                            capture_output=True, text=True, check=True).stdout.split()[-1]
    repo_sock = os.path.join(run, "imagerepo.sock")
    repo_cfg = os.path.join(run, "imagerepo.toml")
    with open(repo_cfg, "w") as f:
        f.write(f'[server]\ndata_dir = "{run}/repo"\nsocket = "{repo_sock}"\nlog_level = "warn"\n'
                f'[download]\ndownload_listen = "127.0.0.1:0"\nkey_file = "{run}/download.key"\n')
    sock = os.path.join(run, "imaged.sock")
    cfg = os.path.join(run, "imaged.toml")
    with open(os.open(cfg, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
        f.write(f'[daemon]\nsocket = "{sock}"\nlog_level = "warn"\nstate_dir = "{run}/state"\n'
                f'[repository]\npath = "{run}/local"\n[capture]\nrun_dir = "{run}/nbd"\n'
                f'[targets.central]\nkind = "imagerepo"\naddress = "unix:{repo_sock}"\nproject = "bench"\n')
    procs = []

    def start(args, sock_path, log):
        p = subprocess.Popen(args, stderr=open(os.path.join(run, log), "a"))
        procs.append(p)
        for _ in range(400):
            if os.path.exists(sock_path):
                return p
            if p.poll() is not None:
                sys.exit(f"{args[0]} exited: see {os.path.join(run, log)}")
            time.sleep(0.05)
        sys.exit(f"{args[0]} did not open {sock_path}")

    repo = start([os.path.join(rel, "imagerepo"), "--config", repo_cfg], repo_sock, "imagerepo.log")
    daemon = start([os.path.join(rel, "imaged"), "--config", cfg], sock, "imaged.log")
    ctl = [os.path.join(rel, "imagectl"), "--socket", sock, "--json"]
    src = make_input(a.work, a.virtual, a.data, "raw")
    work_src = os.path.join(run, "disk.raw")
    sh("cp", "--sparse=always", src, work_src)
    dom = define_domain(work_src, "raw")
    label = f"{a.virtual} GiB virt, {a.data} GiB data"
    rows = []
    cached = drop_caches()
    print(f"recapture into imagerepo vs Nova's convert+upload (page cache {'dropped' if cached else 'NOT dropped'}, "
          f"{os.cpu_count()} CPUs)")
    print(f"{'step':<58} {'seconds':>8} {'sent MiB':>9} {'vs Nova':>8}  cpu user/sys s (imaged, imagerepo)")
    try:
        rounds = ((1, "full", 0),
                  (2, f"{a.change}% changed, 64 MiB runs", 64 << 20),
                  (3, f"{a.change}% changed, scattered 1 MiB", 1 << 20))
        for round_, what, piece in rounds:
            if piece:
                written = change(work_src, a.virtual, a.data, a.change, piece, round_)
                print(f"(changed {written >> 20} MiB of the disk in pieces of {piece >> 20} MiB)")
            nova_t, nova_sent = nova_way(work_src, run, glance, f"{os.getpid()}-{round_}")
            print(f"{'Nova: convert + upload to Glance, ' + what:<58} {nova_t:8.2f} {nova_sent / 2**20:9.0f} {1.0:7.2f}x")
            drop_caches()
            c0 = proc_cpu(daemon.pid) + proc_cpu(repo.pid)
            t0 = time.monotonic()
            out = subprocess.run(ctl + ["capture", dom, "--name", "nightly", "--mode", "cold", "--to", "central",
                                        "--tag", "nightly"], capture_output=True, text=True)
            dt = time.monotonic() - t0
            c1 = proc_cpu(daemon.pid) + proc_cpu(repo.pid)
            if out.returncode != 0:
                sys.exit(f"capture failed: {out.stdout} {out.stderr}")
            op = json.loads(out.stdout)
            if op.get("state") != "active":
                sys.exit(f"capture failed: {op}")
            p = op.get("progress", {})
            sent = p.get("new_bytes", 0)
            cpu = [round(c1[i] - c0[i], 2) for i in range(4)]
            print(f"{'imaged -> imagerepo, ' + what:<58} {dt:8.2f} {sent / 2**20:9.0f} {dt / nova_t:7.2f}x  "
                  f"{cpu[0]}/{cpu[1]}, {cpu[2]}/{cpu[3]}")
            rows.append({"round": what, "nova_seconds": round(nova_t, 3), "nova_bytes": nova_sent,
                         "imaged_seconds": round(dt, 3), "imaged_new_bytes": sent,
                         "imaged_existing_bytes": p.get("existing_bytes", 0),
                         "cpu_user_sys_imaged_imagerepo": cpu, "location": op.get("location", "")})
        # The recaptured version, read back through a download link, is the changed disk.
        loc = rows[-1]["location"]
        link = subprocess.run([os.path.join(rel, "imagectl"), "repo", "--repo-endpoint", f"unix://{repo_sock}",
                               "link", loc, "--format", "raw", "--json"], capture_output=True, text=True)
        if link.returncode == 0:
            url = json.loads(link.stdout)["url"]
            back = os.path.join(run, "back.raw")
            sh("curl", "-sf", "-o", back, url)
            sh("qemu-img", "compare", "-f", "raw", "-F", "raw", work_src, back, stdout=subprocess.DEVNULL)
            os.unlink(back)
            print("the recaptured image, downloaded from the repository, equals the changed disk (qemu-img compare)")
        else:
            print(f"(no read-back: imagectl repo link failed: {link.stderr.strip()})")
    finally:
        subprocess.run(["virsh", "-q", "undefine", dom], stdout=subprocess.DEVNULL)
        for p in procs:
            p.send_signal(signal.SIGTERM)
            p.wait(timeout=60)
    with open(os.path.join(a.work, "recapture-results.json"), "w") as f:
        json.dump({"input": label, "change_percent": a.change, "rows": rows}, f, indent=1)
    shutil.rmtree(run, ignore_errors=True)


if __name__ == "__main__":
    main()
