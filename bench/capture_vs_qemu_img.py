#!/usr/bin/env python3
"""Benchmark: imaged's capture path against `qemu-img convert` on the same input, same run.

Input: a sparse qcow2 of VIRTUAL GiB holding DATA GiB of random bytes in 64 extents (built
once, cached in the work dir). For each size it measures, page cache dropped before each run:

  qemu-img convert -O qcow2 SRC DST          the baseline (what Nova's snapshot path runs)
  imagectl import SRC (imaged, release)      extent map, reads, sha256 of every chunk,
                                             chunk files written, manifest committed
  imagectl import again                      the same disk once more: dedup, nothing stored
  imagectl export --format qcow2             our one-pass qcow2 encoder from the repository

and prints wall time, peak RSS and the ratio to qemu-img. Run as root (it drops caches).
Usage: bench/capture_vs_qemu_img.py [--work DIR] [--sizes 20:2,80:2]
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

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXTENTS = 64


def sh(*args, **kw):
    return subprocess.run(args, check=True, **kw)


def drop_caches():
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def make_input(work, virtual_gib, data_gib):
    path = os.path.join(work, f"src-{virtual_gib}g-{data_gib}g.qcow2")
    if os.path.exists(path):
        return path
    raw = path + ".raw"
    with open(raw, "wb") as f:
        f.truncate(virtual_gib << 30)
    extent = (data_gib << 30) // EXTENTS
    stride = (virtual_gib << 30) // EXTENTS
    with open("/dev/urandom", "rb") as rnd, open(raw, "r+b") as f:
        for i in range(EXTENTS):
            f.seek(i * stride)
            left = extent
            while left:
                n = min(left, 8 << 20)
                f.write(rnd.read(n))
                left -= n
    sh("qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, path + ".tmp")
    os.rename(path + ".tmp", path)
    os.unlink(raw)
    return path


WRAP = ("import resource, subprocess, sys; p = subprocess.run(sys.argv[1:], stdout=subprocess.PIPE); "
        "sys.stdout.buffer.write(p.stdout); "
        "sys.stderr.write('maxrss=%d\\n' % resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); "
        "sys.exit(p.returncode)")


def timed(args):
    """Runs a command; returns (seconds, its peak RSS in MiB, stdout)."""
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-c", WRAP] + args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    dt = time.monotonic() - t0
    if p.returncode != 0:
        sys.exit(f"{args} failed: {p.stderr.decode()}")
    rss = [l for l in p.stderr.decode().splitlines() if l.startswith("maxrss=")]
    return dt, int(rss[-1].split("=")[1]) / 1024.0 if rss else 0.0, p.stdout


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


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="/var/tmp/imaged-bench")
    ap.add_argument("--sizes", default="20:2,80:2", help="VIRTUAL:DATA GiB pairs")
    ap.add_argument("--readers", type=int, default=2)
    a = ap.parse_args()
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
    with open(cfg, "w") as f:
        f.write(f'[daemon]\nsocket = "{sock}"\nlog_level = "warn"\n[repository]\npath = "{repo}"\n'
                f'[capture]\nrun_dir = "{run}/nbd"\nreaders = {a.readers}\n')
    daemon = subprocess.Popen([imaged, "--config", cfg], stderr=open(os.path.join(run, "imaged.log"), "w"))
    for _ in range(200):
        if os.path.exists(sock):
            break
        time.sleep(0.05)
    ctl = [imagectl, "--socket", sock, "--json"]
    cached = drop_caches()
    print(f"imaged capture vs qemu-img convert (page cache {'dropped' if cached else 'NOT dropped'} before each run, "
          f"{os.cpu_count()} CPUs, readers={a.readers})")
    print(f"{'input':<22} {'step':<34} {'seconds':>8} {'peak MiB':>9} {'vs qemu-img':>12}")
    results = []
    try:
        for pair in a.sizes.split(","):
            v, d = (int(x) for x in pair.split(":"))
            src = make_input(a.work, v, d)
            label = f"{v} GiB virt, {d} GiB data"
            dst = os.path.join(run, "qemu-img-out.qcow2")
            drop_caches()
            base_t, base_m, _ = timed(["qemu-img", "convert", "-f", "qcow2", "-O", "qcow2", src, dst])
            os.unlink(dst)
            print(f"{label:<22} {'qemu-img convert -O qcow2':<34} {base_t:8.2f} {base_m:9.0f} {1.0:11.2f}x")
            rows = []
            for step, args in [
                ("imaged capture (new chunks)", ctl + ["import", src, "--format", "qcow2", "--name", f"b{v}"]),
                ("imaged capture again (dedup)", ctl + ["import", src, "--format", "qcow2", "--name", f"b{v}-2"]),
                ("imaged export -> qcow2", ctl + ["export", f"b{v}", "--format", "qcow2", "-o", os.path.join(run, "exp.qcow2")]),
            ]:
                drop_caches()
                reset_hwm(daemon.pid)
                t, _, out = timed(args)
                op = json.loads(out)
                if op.get("state") != "active":
                    sys.exit(f"{step} failed: {op}")
                m = hwm_mib(daemon.pid)
                print(f"{label:<22} {step:<34} {t:8.2f} {m:9.0f} {t / base_t:11.2f}x")
                rows.append({"step": step, "seconds": round(t, 3), "peak_rss_mib": round(m), "ratio": round(t / base_t, 2)})
            sh("qemu-img", "compare", "-f", "qcow2", "-F", "qcow2", src, os.path.join(run, "exp.qcow2"), stdout=subprocess.DEVNULL)
            os.unlink(os.path.join(run, "exp.qcow2"))
            for name in (f"b{v}", f"b{v}-2"):
                subprocess.run(ctl + ["rm", name], stdout=subprocess.DEVNULL, check=True)
            results.append({"input": label, "qemu_img_seconds": round(base_t, 3), "qemu_img_peak_rss_mib": round(base_m), "imaged": rows})
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(timeout=60)
    print("peak MiB for imaged is the daemon's VmHWM during that step (reset before each step).")
    print("export verified identical to the source with qemu-img compare.")
    with open(os.path.join(a.work, "results.json"), "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
