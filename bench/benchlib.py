"""What the benchmark scripts share: running commands, dropping the page cache, the test
Glance's trusted headers, a shut-off libvirt domain around an input disk, and the input disks
(random data in extents spread over a sparse disk)."""
import os
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Random data goes into this many extents spread over the virtual size.
EXTENTS = 64
GLANCE_HEADERS = {"X-Identity-Status": "Confirmed", "X-Project-Id": "bench", "X-User-Id": "bench-user",
                  "X-Roles": "member,reader"}


def sh(*args, **kw):
    return subprocess.run(args, check=True, **kw)


def drop_caches():
    """Syncs and drops the page cache; False when this process may not (not root)."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def define_domain(src, fmt):
    """Defines a shut-off domain whose disk is `src` (format `fmt`); it is never started."""
    name = f"imaged-bench-{os.getpid()}"
    xml = (f"<domain type='qemu'><name>{name}</name><memory unit='MiB'>256</memory><os><type arch='x86_64'>hvm</type></os>"
           f"<devices><disk type='file' device='disk'><driver name='qemu' type='{fmt}'/><source file='{src}'/>"
           f"<target dev='vda' bus='virtio'/></disk></devices></domain>")
    path = f"/tmp/{name}.xml"
    with open(path, "w") as f:
        f.write(xml)
    sh("virsh", "-q", "define", path, stdout=subprocess.DEVNULL)
    return name


def make_input(work, virtual_gib, data_gib, fmt="qcow2"):
    path = os.path.join(work, f"src-{virtual_gib}g-{data_gib}g.{fmt}")
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
    if fmt == "raw":
        os.rename(raw, path)
        return path
    sh("qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, path + ".tmp")
    os.rename(path + ".tmp", path)
    os.unlink(raw)
    return path


def proc_cpu(pid):
    """(user, system) CPU seconds process `pid` has used so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def start_imaged(imaged, cfg, sock, log):
    """Starts the daemon on `cfg`; returns the process once its socket exists."""
    import time
    d = subprocess.Popen([imaged, "--config", cfg], stderr=open(log, "a"))
    for _ in range(400):
        if os.path.exists(sock):
            return d
        time.sleep(0.05)
    raise SystemExit(f"imaged did not open {sock}; see {log}")
