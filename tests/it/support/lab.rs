//! The test lab: real libvirt, real QEMU guests, the real QEMU guest agent.
//!
//! [`Lab::get`] (once per test binary) starts libvirtd if needed (`tests/lab/start-libvirt.sh`),
//! builds or finds the cached Debian 12 guest image (`tests/lab/build-guest.sh`), picks the
//! accelerator (`tests/lab/pick-accel.sh`: `kvm`, or `qemu` = TCG where KVM does not boot a stock
//! kernel) and removes domains left behind by killed runs. When a part cannot be set up it
//! panics with a message naming what is missing: a test of real parts fails, it never skips.
//!
//! [`Lab::new_guest`] (or [`Lab::guest`] for a [`GuestBuilder`] with options) defines a
//! persistent, not yet started domain named `imaged-test-<prefix>-<pid>-<n>`, with its own
//! directory `/var/lib/imaged-lab/run/<name>/` holding a qcow2 overlay over the cached base image
//! (a backing chain on purpose), optional data disks, and `console.log` (the serial console).
//! The directory belongs to the user QEMU runs as (`libvirt-qemu`), so tests may put backup
//! scratch files and NBD sockets there. Dropping a [`Guest`] destroys and undefines the domain
//! and removes its directory, also when the test panicked (the console tail is printed then).
//!
//! Every guest holds the libvirt lock of [`super::libvirtd`] shared while it exists, so a test
//! that stops libvirtd (which takes it exclusively) never runs beside a test with guests.
//!
//! Everything goes through the command line (`virsh -c qemu:///system`, `qemu-img`); the guest
//! agent's commands and replies are JSON (`serde_json`) with base64 payloads (`base64`).
//!
//! Environment: `IMAGED_LAB_CACHE` (default `/var/cache/imaged-lab`), `IMAGED_LAB_RUN`
//! (default `/var/lib/imaged-lab/run`), `IMAGED_LAB_ACCEL` (`kvm`/`qemu`, skips the test boot).

use std::fmt::Write as _;
use std::fs;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;
use std::thread::sleep;
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use serde_json::{json, Value};

/// The libvirt connection every lab command uses.
pub const URI: &str = "qemu:///system";
/// Every lab domain's name starts with this; [`Lab::cleanup_stale`] only touches such names.
pub const DOMAIN_PREFIX: &str = "imaged-test-";
/// The kernel command line of lab guests (the root filesystem is the whole of `/dev/vda`).
pub const CMDLINE: &str = "root=/dev/vda ro console=ttyS0";

const DEFAULT_CACHE: &str = "/var/cache/imaged-lab";
const DEFAULT_RUN: &str = "/var/lib/imaged-lab/run";
/// The user QEMU runs as under qemu:///system on Debian.
const QEMU_USER: &str = "libvirt-qemu";

/// The lab of one test binary: where the guest image is and how guests run.
#[derive(Debug)]
pub struct Lab {
    image_dir: PathBuf,
    run_dir: PathBuf,
    accel: String,
}

static LAB: OnceLock<Result<Lab, String>> = OnceLock::new();
static COUNTER: AtomicU32 = AtomicU32::new(0);

impl Lab {
    /// The lab, set up on first use in this test binary. Panics, naming what is missing, when
    /// libvirt, the guest image or an accelerator cannot be had (the same message for every test
    /// of the binary, without retrying the setup).
    pub fn get() -> &'static Lab {
        // The setup starts libvirtd and removes stale domains: never while a test has it down.
        let _libvirt = super::libvirtd::shared();
        match LAB.get_or_init(Lab::setup) {
            Ok(lab) => lab,
            Err(e) => panic!("test lab unavailable: {e}"),
        }
    }

    fn setup() -> Result<Lab, String> {
        for (bin, pkg) in [
            ("virsh", "libvirt-clients"),
            ("qemu-img", "qemu-utils"),
            ("qemu-system-x86_64", "qemu-system-x86"),
            ("debootstrap", "debootstrap"),
            ("mkfs.ext4", "e2fsprogs"),
        ] {
            if !on_path(bin) {
                return Err(format!(
                    "`{bin}` not found (Debian package {pkg}): run scripts/install-deps.sh as root"
                ));
            }
        }
        let cache_dir = env_path("IMAGED_LAB_CACHE", DEFAULT_CACHE);
        let run_dir = env_path("IMAGED_LAB_RUN", DEFAULT_RUN);
        let cache = cache_dir.to_string_lossy().into_owned();

        run_script("start-libvirt.sh", &[])?;
        let image_dir = PathBuf::from(run_script("build-guest.sh", &[&cache])?);
        for f in ["base.qcow2", "vmlinuz", "initrd.img"] {
            if !image_dir.join(f).is_file() {
                return Err(format!(
                    "build-guest.sh printed {} but {f} is not there",
                    image_dir.display()
                ));
            }
        }
        let accel = run_script("pick-accel.sh", &[&cache])?;
        if accel != "kvm" && accel != "qemu" {
            return Err(format!("pick-accel.sh printed {accel:?}, not kvm or qemu"));
        }
        make_dirs(&run_dir, 0o755)
            .map_err(|e| format!("cannot create {}: {e}", run_dir.display()))?;
        let lab = Lab {
            image_dir,
            run_dir,
            accel,
        };
        lab.cleanup_stale();
        Ok(lab)
    }

    /// `kvm` or `qemu` (TCG): the domain type of lab guests.
    pub fn accel(&self) -> &str {
        &self.accel
    }
    /// The cached base image every guest's overlay is backed by. Never write to it.
    pub fn base_image(&self) -> PathBuf {
        self.image_dir.join("base.qcow2")
    }
    /// The guest kernel (direct kernel boot).
    pub fn kernel(&self) -> PathBuf {
        self.image_dir.join("vmlinuz")
    }
    /// The guest initrd (virtio_pci, virtio_blk, virtio_console, ext4 only).
    pub fn initrd(&self) -> PathBuf {
        self.image_dir.join("initrd.img")
    }

    /// A new guest with the default shape: overlay system disk, guest agent channel, 1 GiB,
    /// 2 vCPUs, no NIC. Defined, not started.
    pub fn new_guest(&self, name_prefix: &str) -> Guest {
        self.guest(name_prefix).create()
    }

    /// A guest whose system disk is a copy of the qcow2 `image` (e.g. an exported capture),
    /// started; returns once its guest agent answers (within 180 s).
    pub fn boot_from(&self, name_prefix: &str, image: &Path) -> Guest {
        let guest = self
            .guest(name_prefix)
            .system_disk(SystemDisk::Qcow2)
            .create();
        fs::copy(image, guest.disk_path())
            .unwrap_or_else(|e| panic!("copying {} into {}: {e}", image.display(), guest.name));
        guest.start();
        guest.wait_agent(Duration::from_secs(180));
        guest
    }

    /// A builder for a guest with options (data disks, no agent, no disk, ...).
    pub fn guest(&self, name_prefix: &str) -> GuestBuilder<'_> {
        GuestBuilder {
            lab: self,
            prefix: name_prefix.to_string(),
            system_disk: SystemDisk::Overlay,
            agent: true,
            data_disks: Vec::new(),
        }
    }

    /// Removes lab domains (names starting with [`DOMAIN_PREFIX`]) and guest directories left
    /// by earlier runs whose process is gone (killed runs never reach `Drop`). Domains of live
    /// processes, e.g. another test binary running now, are left alone.
    pub fn cleanup_stale(&self) {
        let me = std::process::id();
        let stale = |name: &str| match owner_pid(name) {
            Some(pid) => pid != me && !Path::new(&format!("/proc/{pid}")).exists(),
            None => name.starts_with(DOMAIN_PREFIX),
        };
        if let Ok(list) = virsh(&["list", "--all", "--name"]) {
            for name in list
                .lines()
                .map(str::trim)
                .filter(|n| n.starts_with(DOMAIN_PREFIX))
            {
                if stale(name) {
                    eprintln!("lab: removing stale domain {name}");
                    remove_domain(name);
                }
            }
        }
        if let Ok(entries) = fs::read_dir(&self.run_dir) {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if name.starts_with(DOMAIN_PREFIX) && stale(&name) {
                    eprintln!("lab: removing stale guest directory {name}");
                    let _ = fs::remove_dir_all(entry.path());
                }
            }
        }
    }
}

/// What the guest's system disk (`vda`) is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SystemDisk {
    /// `disk.qcow2`, a qcow2 overlay backed by the cached base image (the default).
    Overlay,
    /// `disk.qcow2`, a standalone qcow2 copy of the base image (no backing file).
    Qcow2,
    /// `disk.raw`, a sparse raw copy of the base image.
    Raw,
    /// No system disk at all (the kernel boots and finds no root).
    None,
}

/// Options of a lab guest; [`GuestBuilder::create`] defines it.
#[derive(Debug)]
pub struct GuestBuilder<'a> {
    lab: &'a Lab,
    prefix: String,
    system_disk: SystemDisk,
    agent: bool,
    /// Sizes of the qcow2 data disks.
    data_disks: Vec<u64>,
}

impl GuestBuilder<'_> {
    /// What the system disk is (default: a qcow2 overlay over the base image).
    pub fn system_disk(mut self, kind: SystemDisk) -> Self {
        self.system_disk = kind;
        self
    }
    /// No system disk at all.
    pub fn no_disk(self) -> Self {
        self.system_disk(SystemDisk::None)
    }
    /// No guest agent channel (for tests of "no agent" paths).
    pub fn no_agent(mut self) -> Self {
        self.agent = false;
        self
    }
    /// Adds an empty qcow2 data disk of `size` bytes (vdb, then vdc, ...).
    pub fn data_disk(mut self, size: u64) -> Self {
        self.data_disks.push(size);
        self
    }
    /// Creates the guest's directory and disks and defines the domain (not started).
    pub fn create(self) -> Guest {
        // Held as long as the guest exists: no test stops libvirtd under it.
        let libvirt = super::libvirtd::shared();
        let lab = self.lab;
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let name = format!(
            "{DOMAIN_PREFIX}{}-{}-{n}",
            sanitize(&self.prefix),
            std::process::id()
        );
        let dir = lab.run_dir.join(&name);
        if dir.exists() {
            let _ = fs::remove_dir_all(&dir);
        }
        make_dirs(&dir, 0o750).unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
        // QEMU (libvirt-qemu) may then create backup scratch files and NBD sockets here.
        if let Some((uid, gid)) = user_ids(QEMU_USER) {
            std::os::unix::fs::chown(&dir, Some(uid), Some(gid))
                .unwrap_or_else(|e| panic!("chown {}: {e}", dir.display()));
        } else {
            fs::set_permissions(&dir, fs::Permissions::from_mode(0o777))
                .unwrap_or_else(|e| panic!("chmod {}: {e}", dir.display()));
        }
        // From here on, Drop cleans up whatever was made.
        let mut guest = Guest {
            name,
            dir: dir.clone(),
            disk: None,
            disk_format: "qcow2",
            data_disks: Vec::new(),
            console: dir.join("console.log"),
            defined: false,
            _libvirt: libvirt,
        };
        let base = lab.base_image();
        let base_s = base.to_string_lossy();
        match self.system_disk {
            SystemDisk::Overlay => {
                let disk = dir.join("disk.qcow2");
                qcow2_overlay(&base, &disk);
                guest.disk = Some(disk);
            }
            SystemDisk::Qcow2 => {
                let disk = dir.join("disk.qcow2");
                qemu_img(&["convert", "-f", "qcow2", "-O", "qcow2", &base_s, &s(&disk)])
                    .unwrap_or_else(|e| panic!("{e}"));
                guest.disk = Some(disk);
            }
            SystemDisk::Raw => {
                let disk = dir.join("disk.raw");
                qemu_img(&["convert", "-f", "qcow2", "-O", "raw", &base_s, &s(&disk)])
                    .unwrap_or_else(|e| panic!("{e}"));
                guest.disk = Some(disk);
                guest.disk_format = "raw";
            }
            SystemDisk::None => {}
        }
        for (i, size) in self.data_disks.iter().enumerate() {
            let path = dir.join(format!("data{}.qcow2", i + 1));
            qemu_img(&["create", "-q", "-f", "qcow2", &s(&path), &size.to_string()])
                .unwrap_or_else(|e| panic!("{e}"));
            guest.data_disks.push(path);
        }

        let xml = self.domain_xml(&guest);
        let xml_path = dir.join("domain.xml");
        fs::write(&xml_path, &xml).unwrap_or_else(|e| panic!("write {}: {e}", xml_path.display()));
        virsh(&["define", &s(&xml_path)])
            .unwrap_or_else(|e| panic!("defining lab domain {}: {e}\n{xml}", guest.name));
        guest.defined = true;
        guest
    }

    fn domain_xml(&self, g: &Guest) -> String {
        let lab = self.lab;
        let mut x = String::new();
        let _ = writeln!(x, "<domain type='{}'>", lab.accel);
        let _ = writeln!(x, "  <name>{}</name>", esc(&g.name));
        x.push_str("  <memory unit='MiB'>1024</memory>\n  <vcpu>2</vcpu>\n");
        x.push_str("  <os>\n    <type arch='x86_64' machine='pc'>hvm</type>\n");
        let _ = writeln!(x, "    <kernel>{}</kernel>", esc(&s(&lab.kernel())));
        let _ = writeln!(x, "    <initrd>{}</initrd>", esc(&s(&lab.initrd())));
        let _ = writeln!(x, "    <cmdline>{}</cmdline>", esc(CMDLINE));
        x.push_str("  </os>\n  <features><acpi/><apic/></features>\n  <clock offset='utc'/>\n");
        x.push_str("  <on_poweroff>destroy</on_poweroff>\n  <on_reboot>restart</on_reboot>\n");
        x.push_str("  <on_crash>destroy</on_crash>\n  <devices>\n");
        let mut disk = |path: &Path, format: &str, dev: &str| {
            let _ = write!(
                x,
                "    <disk type='file' device='disk'>\n      <driver name='qemu' type='{format}'/>\n      \
                 <source file='{}'/>\n      <target dev='{dev}' bus='virtio'/>\n    </disk>\n",
                esc(&s(path))
            );
        };
        if let Some(d) = &g.disk {
            disk(d, g.disk_format, "vda");
        }
        for (i, path) in g.data_disks.iter().enumerate() {
            disk(path, "qcow2", &format!("vd{}", (b'b' + i as u8) as char));
        }
        let _ = write!(
            x,
            "    <serial type='file'>\n      <source path='{}' append='on'/>\n      \
             <target port='0'/>\n    </serial>\n",
            esc(&s(&g.console))
        );
        if self.agent {
            x.push_str(
                "    <channel type='unix'>\n      \
                 <target type='virtio' name='org.qemu.guest_agent.0'/>\n    </channel>\n",
            );
        }
        x.push_str("    <controller type='usb' model='none'/>\n    <memballoon model='none'/>\n");
        x.push_str("  </devices>\n</domain>\n");
        x
    }
}

/// A lab domain and its directory; removed on drop.
#[derive(Debug)]
pub struct Guest {
    name: String,
    dir: PathBuf,
    disk: Option<PathBuf>,
    /// `qcow2` or `raw`: the system disk's format.
    disk_format: &'static str,
    data_disks: Vec<PathBuf>,
    console: PathBuf,
    defined: bool,
    /// The shared hold of the libvirt lock (see [`super::libvirtd`]), released after the
    /// domain is gone.
    _libvirt: super::libvirtd::Shared,
}

/// Result of [`Guest::exec`]: exit code (128 + signal when killed by one), stdout, stderr.
pub type ExecResult = (i32, String, String);

impl Guest {
    /// The libvirt domain name.
    pub fn name(&self) -> &str {
        &self.name
    }
    /// The guest's own directory (owned by the QEMU user; removed on drop).
    pub fn dir(&self) -> &Path {
        &self.dir
    }
    /// The system disk (`vda`). Panics for a guest made with [`GuestBuilder::no_disk`].
    pub fn disk_path(&self) -> &Path {
        self.disk
            .as_deref()
            .unwrap_or_else(|| panic!("guest {} has no system disk", self.name))
    }
    /// The data disks (`vdb`, `vdc`, ...), in order.
    pub fn data_disk_paths(&self) -> Vec<&Path> {
        self.data_disks.iter().map(PathBuf::as_path).collect()
    }
    /// The serial console output so far (empty before the first start).
    pub fn console_log(&self) -> String {
        fs::read(&self.console)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }
    /// The last `n` lines of the console log.
    pub fn console_tail(&self, n: usize) -> String {
        let log = self.console_log();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }
    /// The live (or, when shut off, persistent) domain XML.
    pub fn xml(&self) -> String {
        virsh(&["dumpxml", &self.name]).unwrap_or_else(|e| panic!("{e}"))
    }

    /// `virsh start`.
    pub fn start(&self) {
        virsh(&["start", &self.name]).unwrap_or_else(|e| panic!("starting {}: {e}", self.name));
    }
    /// `virsh domstate`: `running`, `shut off`, `paused`, ...
    pub fn state(&self) -> String {
        virsh(&["domstate", &self.name])
            .unwrap_or_else(|e| panic!("{e}"))
            .trim()
            .to_string()
    }
    /// `virsh domstate --reason` (`paused (I/O error)`, `shut off (shutdown)`): what a failure
    /// message wants (a guest paused on a full host disk reads differently from a hung one);
    /// the error text when virsh fails.
    pub fn state_with_reason(&self) -> String {
        match virsh(&["domstate", "--reason", &self.name]) {
            Ok(s) => s.trim().to_string(),
            Err(e) => e,
        }
    }
    /// Force-off (`virsh destroy`); no error when the domain is not running.
    pub fn destroy(&self) {
        if let Err(e) = virsh(&["destroy", &self.name]) {
            if self.state() != "shut off" {
                panic!("destroying {}: {e}", self.name);
            }
        }
    }

    /// A raw guest agent command (`virsh qemu-agent-command`), e.g.
    /// `{"execute":"guest-get-osinfo"}`; returns the agent's JSON reply. Panics on error.
    pub fn agent(&self, json: &str) -> String {
        self.try_agent(json, 30).unwrap_or_else(|e| panic!("{e}"))
    }
    /// A raw guest agent command with a timeout in seconds, errors returned.
    pub fn try_agent(&self, json: &str, timeout_secs: u32) -> Result<String, String> {
        virsh(&[
            "qemu-agent-command",
            &self.name,
            json,
            "--timeout",
            &timeout_secs.to_string(),
        ])
        .map(|s| s.trim().to_string())
    }

    /// Polls `guest-ping` until the agent answers; returns how long that took. Panics (with the
    /// console tail) after `timeout`.
    pub fn wait_agent(&self, timeout: Duration) -> Duration {
        let start = Instant::now();
        let mut last = String::new();
        while start.elapsed() < timeout {
            match self.try_agent(r#"{"execute":"guest-ping"}"#, 5) {
                Ok(_) => return start.elapsed(),
                Err(e) => last = e,
            }
            if self.state() != "running" {
                break;
            }
            sleep(Duration::from_millis(500));
        }
        panic!(
            "guest agent of {} did not answer within {timeout:?} (state {}; last error: {last})\n\
             --- console tail ---\n{}",
            self.name,
            self.state(),
            self.console_tail(40)
        );
    }

    /// Waits for the agent, then for `systemctl is-system-running --wait` (through guest-exec)
    /// to say `running` or `degraded`, which it returns (failed units are printed when degraded).
    /// An ACPI shutdown sent before this point may be lost.
    pub fn wait_booted(&self, timeout: Duration) -> String {
        let start = Instant::now();
        self.wait_agent(timeout);
        loop {
            let left = timeout
                .saturating_sub(start.elapsed())
                .max(Duration::from_secs(1));
            let (_, out, err) =
                self.exec_timeout(&["systemctl", "is-system-running", "--wait"], left);
            let state = out.trim().to_string();
            match state.as_str() {
                "running" => return state,
                "degraded" => {
                    let failed = self
                        .exec(&["systemctl", "--failed", "--no-legend", "--plain"])
                        .1;
                    eprintln!(
                        "lab: {} booted degraded; failed units:\n{failed}",
                        self.name
                    );
                    return state;
                }
                _ if start.elapsed() >= timeout => panic!(
                    "{} not booted within {timeout:?}: is-system-running says {state:?} {err}\n\
                     --- console tail ---\n{}",
                    self.name,
                    self.console_tail(40)
                ),
                _ => sleep(Duration::from_millis(500)),
            }
        }
    }

    /// Runs a program in the guest (guest-exec, PATH searched) and waits up to 120 s for it.
    pub fn exec(&self, argv: &[&str]) -> ExecResult {
        self.exec_full(argv, None, Duration::from_secs(120))
    }
    /// [`Guest::exec`] with a timeout.
    pub fn exec_timeout(&self, argv: &[&str], timeout: Duration) -> ExecResult {
        self.exec_full(argv, None, timeout)
    }
    /// [`Guest::exec`] with bytes on the program's stdin.
    pub fn exec_input(&self, argv: &[&str], stdin: &[u8]) -> ExecResult {
        self.exec_full(argv, Some(stdin), Duration::from_secs(120))
    }
    /// Runs a program that must exit 0; returns its stdout.
    pub fn exec_ok(&self, argv: &[&str]) -> String {
        let (code, out, err) = self.exec(argv);
        assert_eq!(
            code, 0,
            "{argv:?} in {} exited {code}: {err}{out}",
            self.name
        );
        out
    }
    /// Runs `sh -c SCRIPT` in the guest.
    pub fn sh(&self, script: &str) -> ExecResult {
        self.exec(&["sh", "-c", script])
    }
    /// Runs `sh -c SCRIPT`, which must exit 0; returns its stdout.
    pub fn sh_ok(&self, script: &str) -> String {
        let (code, out, err) = self.sh(script);
        assert_eq!(
            code, 0,
            "`{script}` in {} exited {code}: {err}{out}",
            self.name
        );
        out
    }

    /// A guest agent command with arguments; its `return` member. Panics on any error.
    fn call(&self, execute: &str, arguments: Value) -> Value {
        let reply = self.agent(&agent_command(execute, arguments));
        agent_return(&reply).unwrap_or_else(|e| panic!("{execute} in {}: {e}", self.name))
    }

    fn exec_full(&self, argv: &[&str], stdin: Option<&[u8]>, timeout: Duration) -> ExecResult {
        let (path, args) = argv.split_first().expect("exec needs a program");
        let mut arguments = json!({ "path": path, "arg": args, "capture-output": true });
        if let Some(input) = stdin {
            arguments["input-data"] = BASE64.encode(input).into();
        }
        let pid = self.call("guest-exec", arguments)["pid"]
            .as_i64()
            .unwrap_or_else(|| panic!("guest-exec {argv:?}: no pid in the reply"));
        let start = Instant::now();
        let mut pause = Duration::from_millis(50);
        loop {
            let r = self.call("guest-exec-status", json!({ "pid": pid }));
            if let Some(done) =
                exec_status(&r).unwrap_or_else(|e| panic!("guest-exec {argv:?}: {e}"))
            {
                return done;
            }
            if start.elapsed() > timeout {
                panic!(
                    "guest-exec {argv:?} in {} still running after {timeout:?}",
                    self.name
                );
            }
            sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(500));
        }
    }

    /// Writes a file in the guest through guest-file-open/write/close.
    pub fn write_file(&self, path: &str, data: &[u8]) {
        let h = self.file_handle(path, "w");
        // One argv word stays below the kernel's 128 KiB limit.
        for chunk in data.chunks(48 * 1024) {
            self.call(
                "guest-file-write",
                json!({ "handle": h, "buf-b64": BASE64.encode(chunk) }),
            );
        }
        self.call("guest-file-close", json!({ "handle": h }));
    }

    /// Reads a whole file from the guest through guest-file-open/read/close.
    pub fn read_file(&self, path: &str) -> Vec<u8> {
        let h = self.file_handle(path, "r");
        let mut out = Vec::new();
        loop {
            let r = self.call("guest-file-read", json!({ "handle": h, "count": 1048576 }));
            out.extend(
                agent_data(r["buf-b64"].as_str().unwrap_or(""))
                    .unwrap_or_else(|e| panic!("guest-file-read {path}: {e}")),
            );
            if r["eof"] != false {
                break;
            }
        }
        self.call("guest-file-close", json!({ "handle": h }));
        out
    }

    fn file_handle(&self, path: &str, mode: &str) -> i64 {
        self.call("guest-file-open", json!({ "path": path, "mode": mode }))
            .as_i64()
            .unwrap_or_else(|| panic!("guest-file-open {path}: no handle in the reply"))
    }

    /// Graceful shutdown through the guest agent (`virsh shutdown --mode agent`; guest-shutdown
    /// sends no reply), then polls the state until `shut off`. Returns how long it took.
    ///
    /// The agent's own `shutdown` child can be killed by the very shutdown it started (systemd
    /// stops qemu-guest-agent.service with its children) before the agent sees it exit; libvirt
    /// then reports "child process has terminated abnormally" although the guest is going down.
    /// So an agent error is not the end: the power button (ACPI) is pressed too, as imaged's own
    /// shutdown does, and only a guest that does not reach `shut off` fails the test (the agent's
    /// answer printed just before).
    pub fn shutdown(&self, timeout: Duration) -> Duration {
        let start = Instant::now();
        if let Err(agent) = virsh(&["shutdown", "--mode", "agent", &self.name]) {
            eprintln!(
                "lab: agent shutdown of {} answered: {agent}; pressing the power button too",
                self.name
            );
            if let Err(acpi) = virsh(&["shutdown", "--mode", "acpi", &self.name]) {
                if self.state() != "shut off" {
                    panic!(
                        "{} could not be shut down: through the agent: {agent}; by ACPI: {acpi}",
                        self.name
                    );
                }
            }
        }
        self.wait_state("shut off", timeout.saturating_sub(start.elapsed()));
        start.elapsed()
    }

    /// Polls `virsh domstate` until it says `state`; panics after `timeout`.
    pub fn wait_state(&self, state: &str, timeout: Duration) {
        let start = Instant::now();
        loop {
            let now = self.state();
            if now == state {
                return;
            }
            if start.elapsed() >= timeout {
                panic!(
                    "{} is {:?}, not {state:?}, after {timeout:?}\n--- console tail ---\n{}",
                    self.name,
                    self.state_with_reason(),
                    self.console_tail(40)
                );
            }
            sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "lab: test panicked with guest {} ({}); console tail:\n{}",
                self.name,
                self.state_with_reason(),
                self.console_tail(30)
            );
        }
        if self.defined {
            remove_domain(&self.name);
        }
        if let Err(e) = fs::remove_dir_all(&self.dir) {
            if e.kind() != std::io::ErrorKind::NotFound {
                eprintln!("lab: cannot remove {}: {e}", self.dir.display());
            }
        }
    }
}

/// Destroys (if running) and undefines a domain, with whatever metadata it has; never panics.
fn remove_domain(name: &str) {
    let _ = virsh(&["destroy", name]);
    let full = [
        "undefine",
        name,
        "--managed-save",
        "--snapshots-metadata",
        "--checkpoints-metadata",
        "--nvram",
    ];
    if virsh(&full).is_ok() {
        return;
    }
    // Older libvirt or a flag that does not apply: try smaller sets.
    for flags in [
        &["--checkpoints-metadata", "--snapshots-metadata"][..],
        &[][..],
    ] {
        let mut args = vec!["undefine", name];
        args.extend_from_slice(flags);
        if virsh(&args).is_ok() {
            return;
        }
    }
    if virsh(&["dominfo", name]).is_ok() {
        eprintln!(
            "lab: could not undefine {name}: {}",
            virsh(&full).unwrap_err()
        );
    }
}

/// Runs `virsh -c qemu:///system ARGS`; stdout, or an error holding the command and stderr.
pub fn virsh(args: &[&str]) -> Result<String, String> {
    let mut all = vec!["-c", URI];
    all.extend_from_slice(args);
    run("virsh", &all)
}

/// Runs `qemu-img ARGS`; stdout, or an error holding the command and stderr.
pub fn qemu_img(args: &[&str]) -> Result<String, String> {
    run("qemu-img", args)
}

/// Creates `overlay`, a qcow2 whose backing file is the qcow2 `backing`. Panics on failure.
pub fn qcow2_overlay(backing: &Path, overlay: &Path) {
    let (b, o) = (s(backing), s(overlay));
    qemu_img(&["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", &b, &o])
        .unwrap_or_else(|e| panic!("{e}"));
}

/// Runs a program; stdout on exit 0, else an error naming the command, status and stderr.
pub fn run(program: &str, args: &[&str]) -> Result<String, String> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {program}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "`{program} {}` failed ({}): {}{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            String::from_utf8_lossy(&out.stdout).trim()
        ))
    }
}

/// Runs tests/lab/SCRIPT; its last stdout line, or an error with the tail of its output.
fn run_script(script: &str, args: &[&str]) -> Result<String, String> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/lab")
        .join(script);
    let start = Instant::now();
    let out = Command::new(&path)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {}: {e}", path.display()))?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprint!("{stderr}{stdout}");
    eprintln!("lab: {script} took {:.1?}", start.elapsed());
    if !out.status.success() {
        let tail: Vec<&str> = stderr.lines().chain(stdout.lines()).collect();
        return Err(format!(
            "{} failed ({}):\n{}",
            path.display(),
            out.status,
            tail[tail.len().saturating_sub(30)..].join("\n")
        ));
    }
    Ok(stdout.lines().last().unwrap_or("").trim().to_string())
}

fn on_path(bin: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(bin).is_file()))
        .unwrap_or(false)
}

fn env_path(var: &str, default: &str) -> PathBuf {
    std::env::var_os(var)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| default.into())
}

/// Creates a directory and its missing parents with `mode` (not masked by the umask).
fn make_dirs(dir: &Path, mode: u32) -> std::io::Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(mode)
        .create(dir)?;
    fs::set_permissions(dir, fs::Permissions::from_mode(mode))
}

/// uid and primary gid of a user, from /etc/passwd.
fn user_ids(user: &str) -> Option<(u32, u32)> {
    let passwd = fs::read_to_string("/etc/passwd").ok()?;
    let line = passwd.lines().find(|l| l.split(':').next() == Some(user))?;
    let f: Vec<&str> = line.split(':').collect();
    Some((f.get(2)?.parse().ok()?, f.get(3)?.parse().ok()?))
}

/// The pid in a lab name `imaged-test-<prefix>-<pid>-<n>`.
fn owner_pid(name: &str) -> Option<u32> {
    let rest = name.strip_prefix(DOMAIN_PREFIX)?;
    let mut parts = rest.rsplit('-');
    parts.next()?.parse::<u32>().ok()?;
    parts.next()?.parse().ok()
}

fn sanitize(prefix: &str) -> String {
    let s: String = prefix
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .take(32)
        .collect();
    if s.is_empty() {
        "guest".into()
    } else {
        s
    }
}

fn s(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

/// XML text/attribute escaping.
fn esc(v: &str) -> String {
    v.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('\'', "&apos;")
        .replace('"', "&quot;")
}

/// A guest agent command with arguments, as `virsh qemu-agent-command` takes it.
pub fn agent_command(execute: &str, arguments: Value) -> String {
    json!({ "execute": execute, "arguments": arguments }).to_string()
}

/// The `return` member of a guest agent reply, or why there is none.
pub fn agent_return(reply: &str) -> Result<Value, String> {
    let mut j: Value = serde_json::from_str(reply).map_err(|e| format!("{e}: {reply}"))?;
    match j.get_mut("return") {
        Some(r) => Ok(r.take()),
        None => Err(format!("no \"return\" in {reply}")),
    }
}

/// What a `guest-exec-status` return says: `None` while the program runs, else its exit code
/// (128 + signal when killed by one), stdout and stderr. Output the agent truncated is an error.
pub fn exec_status(r: &Value) -> Result<Option<ExecResult>, String> {
    if r["exited"] != true {
        return Ok(None);
    }
    for flag in ["out-truncated", "err-truncated"] {
        if r[flag] == true {
            return Err(format!("output truncated by the agent ({flag})"));
        }
    }
    let code = match (r.get("exitcode"), r.get("signal")) {
        (Some(c), _) => c.as_i64().unwrap_or(-1) as i32,
        (None, Some(sig)) => 128 + sig.as_i64().unwrap_or(0) as i32,
        _ => -1,
    };
    let data = |k: &str| -> Result<String, String> {
        let bytes = agent_data(r[k].as_str().unwrap_or(""))?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    };
    Ok(Some((code, data("out-data")?, data("err-data")?)))
}

/// A base64 payload of the guest agent (`out-data`, `buf-b64`, ...), decoded.
pub fn agent_data(b64: &str) -> Result<Vec<u8>, String> {
    BASE64
        .decode(b64)
        .map_err(|e| format!("bad base64 from the guest agent ({e}): {b64:?}"))
}
