"""What the benchmark scripts share: running commands, dropping the page cache, the test
Glance's trusted headers, and a shut-off libvirt domain around an input disk."""
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
