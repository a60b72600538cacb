#!/usr/bin/env python3
"""Benchmark: imaged's capture path against `qemu-img convert` on the same input, same run.

Input: a sparse qcow2 of VIRTUAL GiB holding DATA GiB of random bytes in 64 extents (built
once, cached in the work dir). For each size it measures, page cache dropped before each run:

  qemu-img convert -O qcow2 SRC DST          the baseline (what Nova's snapshot path runs)
  imagectl import SRC (imaged, release)      extent map, reads, sha256 of every chunk,
                                             chunk files written, manifest committed
  imagectl import again                      the same disk once more: dedup, nothing stored
  imagectl export --format qcow2             our one-pass qcow2 encoder from the repository
  cat SRC; cat SRC + dd oflag=direct         what the device allows: a read of the input, and
                                             that read while as many bytes are written O_DIRECT

and prints wall time, peak RSS and the ratio to qemu-img: the median of --rounds rounds, the steps
interleaved so that a burst of load on a shared machine spoils one sample of each, not a whole step.
Run as root (it drops caches).
With --targets it also compares, on the same disk, Nova's way of getting an image into
Glance or S3 (qemu-img convert to a temp file, then upload the file) with imaged's capture
streamed straight into the target (no temp file), using the test servers of tests/servers/.

`--input-format raw` makes the input a sparse raw file instead (qemu-img converts it from raw).
imaged reads either in process (raw directly, qcow2 through imago); `--qemu-nbd` makes it read
through qemu-nbd as before the native readers, to compare the two roads.

Usage: bench/capture_vs_qemu_img.py [--work DIR] [--sizes 20:2,80:2] [--rounds 3] [--targets] [--input-format raw]
"""
import argparse
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time

from benchlib import GLANCE_HEADERS, ROOT, define_domain, drop_caches, make_input, proc_cpu, sh


WRAP = ("import resource, subprocess, sys; p = subprocess.run(sys.argv[1:], stdout=subprocess.PIPE); "
        "sys.stdout.buffer.write(p.stdout); "
        "r = resource.getrusage(resource.RUSAGE_CHILDREN); "
        "sys.stderr.write('maxrss=%d\\ncpu=%f,%f\\n' % (r.ru_maxrss, r.ru_utime, r.ru_stime)); "
        "sys.exit(p.returncode)")


LAST_CPU = [(0.0, 0.0)]


def timed(args):
    """Runs a command; returns (seconds, its peak RSS in MiB, stdout). Its user and system CPU
    seconds are left in LAST_CPU[0]."""
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-c", WRAP] + args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    dt = time.monotonic() - t0
    if p.returncode != 0:
        sys.exit(f"{args} failed: {p.stderr.decode()}")
    lines = p.stderr.decode().splitlines()
    rss = [l for l in lines if l.startswith("maxrss=")]
    cpu = [l for l in lines if l.startswith("cpu=")]
    LAST_CPU[0] = tuple(float(x) for x in cpu[-1][4:].split(",")) if cpu else (0.0, 0.0)
    return dt, int(rss[-1].split("=")[1]) / 1024.0 if rss else 0.0, p.stdout


def median_sample(samples):
    """The sample (seconds, peak MiB, (user, sys)) whose time is the median of `samples`."""
    ordered = sorted(samples, key=lambda x: x[0])
    return ordered[len(ordered) // 2]


def hwm_mib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    return 0.0


def reset_hwm(pid):
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5\n")
    except OSError:
        pass


S3_BUCKET, S3_KEY, S3_SECRET = "imaged-test", "imaged-test", "imaged-test-secret"


def s3_delete(s3, key):
    sh("curl", "-sf", "-X", "DELETE", "--aws-sigv4", "aws:amz:us-east-1:s3", "--user", f"{S3_KEY}:{S3_SECRET}",
       "-H", "x-amz-content-sha256: UNSIGNED-PAYLOAD", f"{s3}/{S3_BUCKET}/{key}")


def nova_upload(src, fmt, run, target, glance, s3, v):
    """Nova's way: qemu-img convert to a temp file, upload the file, delete it. Returns
    (seconds, temp bytes, the server's CPU (user, sys)); the uploaded image is deleted afterwards, outside the time."""
    tmp = os.path.join(run, "nova-temp.qcow2")
    hdr = sum((["-H", f"{k}: {v2}"] for k, v2 in GLANCE_HEADERS.items()), [])
    drop_caches()
    spid = server_pid(target)
    s0 = proc_cpu(spid)
    t0 = time.monotonic()
    sh("qemu-img", "convert", "-f", fmt, "-O", "qcow2", src, tmp)
    temp_peak = os.path.getsize(tmp)
    if target == "glance":
        out = subprocess.run(["curl", "-sf", "-X", "POST", f"{glance}/v2/images", "-H", "Content-Type: application/json",
                              *hdr, "-d", json.dumps({"name": f"nova-{v}", "disk_format": "qcow2", "container_format": "bare"})],
                             capture_output=True, check=True).stdout
        iid = json.loads(out)["id"]
        sh("curl", "-sf", "-X", "PUT", "-H", "Content-Type: application/octet-stream", *hdr, "-T", tmp,
           f"{glance}/v2/images/{iid}/file")
    else:
        sh("curl", "-sf", "--aws-sigv4", "aws:amz:us-east-1:s3", "--user", f"{S3_KEY}:{S3_SECRET}",
           "-H", "x-amz-content-sha256: UNSIGNED-PAYLOAD", "-T", tmp,
           f"{s3}/{S3_BUCKET}/nova-{os.getpid()}-{v}.qcow2")
    nova_t = time.monotonic() - t0
    s1 = proc_cpu(spid)
    os.unlink(tmp)
    # Leave the servers as they were: every run would add gigabytes.
    if target == "glance":
        sh("curl", "-sf", "-X", "DELETE", *hdr, f"{glance}/v2/images/{iid}")
    else:
        s3_delete(s3, f"nova-{os.getpid()}-{v}.qcow2")
    return nova_t, temp_peak, (s1[0] - s0[0], s1[1] - s0[1])


SERVER_PIDFILES = {"glance": "/var/lib/imaged-test-servers/glance/glance-api.pid",
                   "s3": "/var/lib/imaged-test-servers/s3/s3s-fs.pid"}


def server_pid(target):
    root = os.environ.get("IMAGED_TEST_SERVERS")
    path = SERVER_PIDFILES[target]
    if root:
        path = path.replace("/var/lib/imaged-test-servers", root, 1)
    with open(path) as f:
        return int(f.read().strip())


def imaged_upload(ctl, daemon_pid, dom, target, glance, s3, v):
    """imaged's capture of `dom` streamed into `target`; returns its seconds and the CPU
    (user, sys) of the daemon and of the server. The image is deleted afterwards, outside the
    time."""
    drop_caches()
    spid = server_pid(target)
    d0, s0 = proc_cpu(daemon_pid), proc_cpu(spid)
    t, _, out = timed(ctl + ["capture", dom, "--name", f"bench-{os.getpid()}-{v}", "--mode", "cold", "--to", target,
                             "--format", "qcow2"])
    d1, s1 = proc_cpu(daemon_pid), proc_cpu(spid)
    cpu = ((d1[0] - d0[0], d1[1] - d0[1]), (s1[0] - s0[0], s1[1] - s0[1]))
    op = json.loads(out)
    if op.get("state") != "active":
        sys.exit(f"capture to {target} failed: {op}")
    loc = op.get("location", "")
    if target == "glance":
        hdr = sum((["-H", f"{k}: {v2}"] for k, v2 in GLANCE_HEADERS.items()), [])
        sh("curl", "-sf", "-X", "DELETE", *hdr, f"{glance}/v2/images/{loc}")
    else:
        key = loc.split(f"{S3_BUCKET}/", 1)[1]
        for k in (key, key + ".sha256"):
            s3_delete(s3, k)
    return t, cpu


def compare_targets(ctl, daemon_pid, src, run, label, glance, s3, v, fmt, rounds, which=("glance", "s3")):
    """Nova's way (convert to a temp file, upload it) against imaged's streamed capture, each
    `rounds` times interleaved; prints the medians."""
    rows = []
    dom = define_domain(src, fmt)
    try:
        for target in which:
            nova, ours, temp_peak = [], [], 0
            for _ in range(rounds):
                t, temp_peak, scpu = nova_upload(src, fmt, run, target, glance, s3, v)
                nova.append((t, scpu))
                ours.append(imaged_upload(ctl, daemon_pid, dom, target, glance, s3, v))
            nova_t, (nu, ns) = sorted(nova)[len(nova) // 2]
            t, ((du, ds), (su, ss)) = sorted(ours)[len(ours) // 2]
            print(f"{label:<28} {'Nova way: convert+upload to ' + target:<34} {nova_t:8.2f} "
                  f"{min(n[0] for n in nova):.2f}-{max(n[0] for n in nova):.2f} {'temp ' + str(temp_peak >> 20) + ' MiB':>14}"
                  f"{'':>19}CPU server {nu:.2f}/{ns:.2f}")
            print(f"{label:<28} {'imaged capture streamed to ' + target:<34} {t:8.2f} "
                  f"{min(o[0] for o in ours):.2f}-{max(o[0] for o in ours):.2f} {'temp 0':>14} {t / nova_t:8.2f}x of Nova"
                  f"  CPU imaged {du:.2f}/{ds:.2f}, server {su:.2f}/{ss:.2f}")
            rows.append({"step": f"nova to {target}", "seconds": round(nova_t, 3), "all_seconds": [n[0] for n in nova],
                         "cpu_server": [nu, ns],
                         "temp_bytes": temp_peak})
            rows.append({"step": f"imaged to {target}", "seconds": round(t, 3), "all_seconds": [o[0] for o in ours],
                         "temp_bytes": 0, "ratio_to_nova": round(t / nova_t, 2), "cpu_imaged": [du, ds],
                         "cpu_server": [su, ss]})
    finally:
        subprocess.run(["virsh", "-q", "undefine", dom], stdout=subprocess.DEVNULL)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="/var/tmp/imaged-bench")
    ap.add_argument("--sizes", default="20:2,80:2", help="VIRTUAL:DATA GiB pairs")
    ap.add_argument("--readers", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3,
                    help="run every step this many times, interleaved, and print the median (default 3)")
    ap.add_argument("--targets", action="store_true", help="also compare uploads to Glance and S3")
    ap.add_argument("--upload-targets", default="glance,s3",
                    help="which targets --targets compares (default glance,s3)")
    ap.add_argument("--s3-parts-in-flight", type=int, default=None,
                    help="the S3 target's parts_in_flight (default: imaged's)")
    ap.add_argument("--targets-only", action="store_true",
                    help="only the Glance and S3 comparison (implies --targets)")
    ap.add_argument("--input-format", choices=("qcow2", "raw"), default="qcow2",
                    help="the source disk's format")
    ap.add_argument("--qemu-nbd", action="store_true",
                    help="read the disk through qemu-nbd ([capture] native_reader = false), not in process")
    a = ap.parse_args()
    a.targets = a.targets or a.targets_only
    os.makedirs(a.work, exist_ok=True)
    sh("cargo", "build", "--release", "--quiet", "--bins", cwd=ROOT)
    imaged = os.path.join(ROOT, "target/release/imaged")
    imagectl = os.path.join(ROOT, "target/release/imagectl")
    run = os.path.join(a.work, "run")
    shutil.rmtree(run, ignore_errors=True)
    os.makedirs(run)
    sock = os.path.join(run, "imaged.sock")
    cfg = os.path.join(run, "imaged.toml")
    repo = os.path.join(run, "repo")
    targets = ""
    glance = s3 = None
    if a.targets:
        servers = os.path.join(ROOT, "tests/servers")
        glance = subprocess.run(["bash", f"{servers}/glance.sh", "start"], capture_output=True, text=True, check=True).stdout.split()[-1]
        s3 = subprocess.run(["bash", f"{servers}/s3.sh", "start"], capture_output=True, text=True, check=True).stdout.split()[-1]
        targets = (f'[targets.glance]\nkind = "glance"\nendpoint = "{glance}"\n[targets.glance.auth.headers]\n'
                   + "".join(f'{k} = "{v}"\n' for k, v in GLANCE_HEADERS.items())
                   + f'[targets.s3]\nkind = "s3"\nendpoint = "{s3}"\nbucket = "{S3_BUCKET}"\naccess_key = "{S3_KEY}"\n'
                   f'secret_key = "{S3_SECRET}"\nprefix = "bench-{os.getpid()}/"\n'
                   + (f"parts_in_flight = {a.s3_parts_in_flight}\n" if a.s3_parts_in_flight else ""))
    # The config holds the targets' secrets: imaged refuses it unless only root may read it.
    with open(os.open(cfg, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
        f.write(f'[daemon]\nsocket = "{sock}"\nlog_level = "warn"\nstate_dir = "{run}/state"\n'
                f'[repository]\npath = "{repo}"\n'
                f'[capture]\nrun_dir = "{run}/nbd"\nreaders = {a.readers}\nnative_reader = {"false" if a.qemu_nbd else "true"}\n'
                f'[paths]\nimport_dirs = ["{os.path.realpath(a.work)}"]\nexport_dirs = ["{os.path.realpath(run)}"]\n'
                f'{targets}')
    os.chmod(cfg, 0o600)
    def start_daemon():
        d = subprocess.Popen([imaged, "--config", cfg], stderr=open(os.path.join(run, "imaged.log"), "a"))
        for _ in range(200):
            if os.path.exists(sock):
                break
            time.sleep(0.05)
        return d

    daemon = None
    ctl = [imagectl, "--socket", sock, "--json"]
    cached = drop_caches()
    print(f"imaged capture vs qemu-img convert (page cache {'dropped' if cached else 'NOT dropped'} before each run, "
          f"{os.cpu_count()} CPUs, readers={a.readers})")
    print(f"median of {a.rounds} rounds; the range is the fastest and slowest round")
    print(f"{'input':<28} {'step':<34} {'seconds':>8} {'range':>11} {'peak MiB':>9} {'CPU user/sys':>13} {'vs qemu-img':>12}")
    results = []
    try:
        for pair in a.sizes.split(","):
            v, d = (int(x) for x in pair.split(":"))
            fmt = a.input_format
            src = make_input(a.work, v, d, fmt)
            label = f"{v} GiB virt, {d} GiB data, {fmt}"
            # A fresh daemon per input: its peak memory is that of this size alone.
            if daemon is not None:
                daemon.send_signal(signal.SIGTERM)
                daemon.wait(timeout=60)
            daemon = start_daemon()
            dst = os.path.join(run, "qemu-img-out.qcow2")
            exp = os.path.join(run, "exp.qcow2")
            steps = [
                ("qemu-img convert -O qcow2", None, ["qemu-img", "convert", "-f", fmt, "-O", "qcow2", src, dst]),
                # imaged makes its chunks durable (syncfs) before it reports success; qemu-img
                # does not sync: this row is the like-for-like baseline.
                ("qemu-img convert -O qcow2 + sync", None,
                 ["sh", "-c", f"qemu-img convert -f {fmt} -O qcow2 {src} {dst} && sync"]),
                # What the device allows, for the rows below: the input read once (a repeated
                # capture reads it and hashes), and read while as many bytes are written around
                # the page cache (a first capture reads, then writes its chunk files O_DIRECT).
                ("device: read the input (cat)", None, ["sh", "-c", f"cat {src} >/dev/null"]),
                ("device: read it + write as much", None,
                 ["sh", "-c", f"cat {src} >/dev/null & dd if=/dev/zero of={dst} bs=4M "
                  f"count={os.path.getsize(src) >> 22} oflag=direct status=none; wait"]),
                ("imaged capture (new chunks)", daemon, ctl + ["import", src, "--format", fmt, "--name", f"b{v}"]),
                ("imaged capture again (dedup)", daemon, ctl + ["import", src, "--format", fmt, "--name", f"b{v}-2"]),
                ("imaged export -> qcow2", daemon, ctl + ["export", f"b{v}", "--format", "qcow2", "-o", exp]),
            ]
            # Every step once per round, in this order, rounds one after the other: a burst of
            # load on this shared machine then spoils one sample of each step, not all of one.
            samples = {name: [] for name, _, _ in steps}
            for rnd in range(0 if a.targets_only else a.rounds):
                for name, d_proc, args in steps:
                    drop_caches()
                    if d_proc is not None:
                        reset_hwm(d_proc.pid)
                        c0 = proc_cpu(d_proc.pid)
                    t, m, out = timed(args)
                    if d_proc is not None:
                        c1 = proc_cpu(d_proc.pid)
                        cpu = (c1[0] - c0[0], c1[1] - c0[1])
                        m = hwm_mib(d_proc.pid)
                        op = json.loads(out)
                        if op.get("state") != "active":
                            sys.exit(f"{name} failed: {op}")
                    else:
                        cpu = LAST_CPU[0]
                    samples[name].append((t, m, cpu))
                    if os.path.exists(dst):
                        os.unlink(dst)
                sh("qemu-img", "compare", "-f", fmt, "-F", "qcow2", src, exp, stdout=subprocess.DEVNULL)
                os.unlink(exp)
                for name in (f"b{v}", f"b{v}-2"):
                    subprocess.run(ctl + ["rm", name], stdout=subprocess.DEVNULL, check=True)
                # rm takes the chunks no other image uses: the next round stores them all again.
            if a.targets_only:
                rows = compare_targets(ctl, daemon.pid, src, run, label, glance, s3, v, fmt, a.rounds, a.upload_targets.split(","))
                results.append({"input": label, "rounds": a.rounds, "steps": rows})
                continue
            med = {name: median_sample(samples[name]) for name in samples}
            base_t = med["qemu-img convert -O qcow2"][0]
            sync_t = med["qemu-img convert -O qcow2 + sync"][0]
            rows = []
            for name, d_proc, _ in steps:
                t, m, (cu, cs) = med[name]
                spread = f"{min(x[0] for x in samples[name]):.2f}-{max(x[0] for x in samples[name]):.2f}"
                mem = f"{m:9.0f}" if m else f"{'':>9}"
                extra = f" ({t / sync_t:.2f}x of convert+sync)" if d_proc is not None else ""
                print(f"{label:<28} {name:<34} {t:8.2f} {spread:>11} {mem} {cu:6.2f}/{cs:<6.2f} {t / base_t:11.2f}x{extra}")
                rows.append({"step": name, "seconds": round(t, 3), "all_seconds": [round(x[0], 3) for x in samples[name]],
                             "peak_rss_mib": round(m), "cpu_user": round(cu, 2), "cpu_sys": round(cs, 2),
                             "ratio": round(t / base_t, 2)})
            if a.targets:
                rows += compare_targets(ctl, daemon.pid, src, run, label, glance, s3, v, fmt, a.rounds, a.upload_targets.split(","))
            results.append({"input": label, "rounds": a.rounds, "steps": rows})
    finally:
        if daemon is not None:
            daemon.send_signal(signal.SIGTERM)
            daemon.wait(timeout=60)
    print("peak MiB for imaged is the daemon's VmHWM during that step (reset before each step); CPU is the daemon's "
          "(imaged) or the command's (qemu-img), user/system seconds.")
    print("export verified identical to the source with qemu-img compare.")
    with open(os.path.join(a.work, "results.json"), "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
