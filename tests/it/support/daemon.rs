//! Starts a real `imaged` (the binary cargo built) on a private socket and repository, and
//! talks to it over gRPC or through the real `imagectl` binary. The daemon is stopped (SIGTERM,
//! then SIGKILL) when the handle drops, also when a test panics.
//!
//! A daemon talks to the lab's libvirt (`qemu:///system`, the default URI): it holds the libvirt
//! lock of [`super::libvirtd`] shared for its whole life, so a test that stops libvirtd never
//! runs beside it. Only a daemon whose `extra_toml` names another `[libvirt] uri` goes without.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use super::api::{proto, Images, Ops};
use imaged::proto::image_service_client::ImageServiceClient;
use imaged::proto::operation_service_client::OperationServiceClient;
use tonic::transport::Channel;

/// A running daemon.
pub struct Daemon {
    pub child: Option<Child>,
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    pub repo: PathBuf,
    pub log: PathBuf,
    /// The shared hold of the libvirt lock, released after the daemon stopped (fields drop
    /// after [`Drop::drop`]); `None` for a daemon on another libvirt URI.
    _libvirt: Option<super::libvirtd::Shared>,
}

/// Options for [`Daemon::start_with`].
#[derive(Default)]
pub struct DaemonOptions {
    /// Repository directory (default: a fresh one in the daemon's temp dir).
    pub repo: Option<PathBuf>,
    /// Extra TOML appended to the `[capture]` table, e.g. `readers = 1`.
    pub capture_toml: String,
    /// Extra TOML appended to the `[daemon]` table, e.g. `max_running_operations = 1`.
    pub daemon_toml: String,
    /// Extra TOML appended to the `[repository]` table, e.g. `max_virtual_size = "2P"`.
    pub repository_toml: String,
    /// NOTIFY_SOCKET for the child.
    pub notify_socket: Option<PathBuf>,
    /// More TOML tables appended at the end (e.g. `[targets.glance]`, `[tls]`, `[[policy]]`).
    pub extra_toml: String,
    /// The `[paths]` table's keys; `None` allows imports and exports anywhere under the
    /// system temp dir (where the tests keep their files) and the lab's run directory.
    pub paths_toml: Option<String>,
}

/// The `[paths]` of a test daemon when the test does not say otherwise.
pub fn default_paths_toml() -> String {
    let mut dirs = vec![std::env::temp_dir()];
    let lab = Path::new("/var/lib/imaged-lab");
    if lab.is_dir() {
        dirs.push(lab.to_path_buf());
    }
    format!("import_dirs = {dirs:?}\nexport_dirs = {dirs:?}\n")
}

impl Daemon {
    /// The daemon's process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("daemon running").id()
    }

    /// The daemon's run directory (NBD sockets, backup jobs, journal).
    pub fn run_dir(&self) -> PathBuf {
        self.dir.path().join("run")
    }

    /// Starts a stopped daemon again with the same config and waits, up to `limit`, for it to
    /// exit by itself (for start-ups that must fail); returns its exit status.
    pub fn run_to_exit(&mut self, limit: Duration) -> std::process::ExitStatus {
        assert!(self.child.is_none(), "stop the daemon first");
        let mut child = self.spawn_again();
        let t0 = Instant::now();
        loop {
            if let Some(st) = child.try_wait().unwrap() {
                return st;
            }
            if t0.elapsed() > limit {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "imaged did not exit within {limit:?}; log:\n{}",
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn spawn_again(&self) -> Child {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_imaged"));
        cmd.arg("--config")
            .arg(self.dir.path().join("imaged.toml"))
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        cmd.stderr(
            std::fs::OpenOptions::new()
                .append(true)
                .open(&self.log)
                .unwrap(),
        );
        cmd.spawn().expect("spawning imaged")
    }

    /// Starts a stopped daemon again with the same config (same socket, repository, run dir).
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "stop the daemon first");
        self.child = Some(self.spawn_again());
        self.wait_ready();
    }

    /// A daemon with defaults.
    pub fn start() -> Daemon {
        Daemon::start_with(DaemonOptions::default())
    }

    /// A daemon with options.
    pub fn start_with(opts: DaemonOptions) -> Daemon {
        let libvirt = uses_lab_libvirt(&opts.extra_toml).then(super::libvirtd::shared);
        let dir = tempfile::Builder::new()
            .prefix("imaged-test-")
            .tempdir()
            .expect("temp dir");
        let socket = dir.path().join("imaged.sock");
        let repo = opts.repo.clone().unwrap_or_else(|| dir.path().join("repo"));
        let log = dir.path().join("imaged.log");
        let config = dir.path().join("imaged.toml");
        std::fs::write(
            &config,
            format!(
                "[daemon]\nsocket = {socket:?}\nlog_level = \"debug\"\nstate_dir = {:?}\n{}\n[repository]\npath = {repo:?}\n{}\n[capture]\nrun_dir = {:?}\n{}\n[paths]\n{}\n{}\n",
                dir.path().join("state"),
                opts.daemon_toml,
                opts.repository_toml,
                dir.path().join("run"),
                opts.capture_toml,
                opts.paths_toml.clone().unwrap_or_else(default_paths_toml),
                opts.extra_toml
            ),
        )
        .unwrap();
        // Configs of targets hold secrets: the daemon refuses them unless only its user reads.
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o600)).unwrap();
        }
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_imaged"));
        cmd.arg("--config")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        cmd.stderr(std::fs::File::create(&log).unwrap());
        if let Some(n) = &opts.notify_socket {
            cmd.env("NOTIFY_SOCKET", n);
        }
        let child = cmd.spawn().expect("spawning imaged");
        let d = Daemon {
            child: Some(child),
            dir,
            socket,
            repo,
            log,
            _libvirt: libvirt,
        };
        d.wait_ready();
        d
    }

    fn wait_ready(&self) {
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(240) {
            if std::os::unix::net::UnixStream::connect(&self.socket).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "imaged did not open {} within 240 s; its log:\n{}",
            self.socket.display(),
            self.log_text()
        );
    }

    /// Asserts that an operation of this daemon ended `Active`; the daemon's log tells why not.
    pub fn assert_active(&self, op: &proto::Operation) {
        assert_eq!(
            state(op),
            proto::OperationState::Active,
            "{op:?}\n{}",
            self.log_text()
        );
    }

    /// What the daemon logged so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// A gRPC channel to the daemon.
    pub async fn channel(&self) -> Channel {
        imaged::cli::connect(&self.socket)
            .await
            .expect("connecting to imaged")
    }

    pub async fn images(&self) -> Images {
        Images(ImageServiceClient::new(self.channel().await))
    }

    pub async fn ops(&self) -> Ops {
        Ops(OperationServiceClient::new(self.channel().await))
    }

    /// Runs the real `imagectl` against this daemon.
    pub fn imagectl(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_imagectl"))
            .arg("--socket")
            .arg(&self.socket)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("running imagectl")
    }

    /// Runs `imagectl --json ARGS`, asserts exit 0 and parses stdout.
    pub fn imagectl_json(&self, args: &[&str]) -> serde_json::Value {
        let mut full = vec!["--json"];
        full.extend_from_slice(args);
        stdout_json(&format!("imagectl {args:?}"), &self.imagectl(&full))
    }

    /// Exports the image `name` in `format` (`qcow2`, `raw`) to `dest` with `imagectl export`,
    /// which must end `active`.
    pub fn imagectl_export(&self, name: &str, format: &str, dest: &Path) {
        let dest = dest.to_str().unwrap();
        let op = self.imagectl_json(&["export", name, "--format", format, "-o", dest]);
        assert_eq!(op["state"], "active", "{op}");
    }

    /// Waits for an operation to end and returns its last snapshot.
    pub async fn wait_op(&self, id: &str) -> proto::Operation {
        let mut ops = self.ops().await;
        let t0 = Instant::now();
        loop {
            let op = get_op(&mut ops, id).await;
            if matches!(
                proto::OperationState::try_from(op.state),
                Ok(proto::OperationState::Active
                    | proto::OperationState::Failed
                    | proto::OperationState::Cancelled)
            ) {
                return op;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(300),
                "operation {id} did not end in 300 s: {op:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Kills the daemon with SIGKILL (no chance to clean up) and reaps it.
    pub fn kill(&mut self) {
        let mut child = self.child.take().expect("daemon already stopped");
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Stops the daemon with SIGTERM; returns its exit status.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("daemon already stopped");
        // SAFETY: kill(2) with a pid we spawned and have not reaped.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let t0 = Instant::now();
        loop {
            if let Some(st) = child.try_wait().unwrap() {
                return st;
            }
            if t0.elapsed() > Duration::from_secs(40) {
                let _ = child.kill();
                panic!(
                    "imaged did not stop within 40 s of SIGTERM; log:\n{}",
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: kill(2) with a pid we spawned and have not reaped.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let t0 = Instant::now();
            while t0.elapsed() < Duration::from_secs(10) {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// True unless the extra TOML of a daemon config sets `[libvirt] uri` to something other than
/// the lab's URI (an unparsable text counts as the default: the daemon will refuse it anyway).
fn uses_lab_libvirt(extra_toml: &str) -> bool {
    let Ok(table) = extra_toml.parse::<toml::Table>() else {
        return true;
    };
    match table
        .get("libvirt")
        .and_then(|l| l.get("uri"))
        .and_then(|u| u.as_str())
    {
        Some(uri) => uri.trim() == super::lab::URI,
        None => true,
    }
}

/// The gRPC services the daemon serves, as reflection lists them.
pub const SERVICES: [&str; 5] = [
    "imaged.v1.ImageService",
    "imaged.v1.DomainService",
    "imaged.v1.OperationService",
    "google.longrunning.Operations",
    "grpc.health.v1.Health",
];

/// One `GetOperation` call on a client the caller keeps (polling loops stay fast).
pub async fn get_op(ops: &mut Ops, id: &str) -> proto::Operation {
    ops.get_operation(proto::GetOperationRequest { id: id.into() })
        .await
        .unwrap()
        .into_inner()
}

/// An operation's state.
pub fn state(op: &proto::Operation) -> proto::OperationState {
    proto::OperationState::try_from(op.state).unwrap()
}

/// Asserts that a program (`what`) exited 0, and parses the JSON it printed.
pub fn stdout_json(what: &str, out: &Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "{what} failed ({:?}): {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{what} printed no JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// The chunk files of a repository (none when it has no `chunks` directory yet), sorted.
pub fn chunk_files(repo: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(repo.join("chunks")) {
        for sub in rd.flatten() {
            for f in std::fs::read_dir(sub.path()).unwrap().flatten() {
                out.push(f.path());
            }
        }
    }
    out.sort();
    out
}

/// The permission bits of `p` (not following a link), in octal like `0600`.
pub fn mode_of(p: &Path) -> String {
    use std::os::unix::fs::PermissionsExt;
    format!(
        "{:04o}",
        std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777
    )
}

/// Runs a command, asserts success, returns stdout.
pub fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd} ({e}): install it (scripts/install-deps.sh)"));
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `qemu-img compare` of two images (formats probed only for our own test files).
pub fn assert_identical(a: &Path, fmt_a: &str, b: &Path, fmt_b: &str) {
    let out = run(
        "qemu-img",
        &[
            "compare",
            "-f",
            fmt_a,
            "-F",
            fmt_b,
            a.to_str().unwrap(),
            b.to_str().unwrap(),
        ],
    );
    assert!(out.contains("Images are identical"), "{out}");
}

/// `qemu-img check` passes on a qcow2.
pub fn assert_qcow2_clean(p: &Path) {
    let out = run("qemu-img", &["check", "-f", "qcow2", p.to_str().unwrap()]);
    assert!(out.contains("No errors were found"), "{out}");
}

/// A tmpfs of `size` (e.g. "64m") mounted at `dir`, unmounted on drop.
pub struct Tmpfs {
    pub dir: PathBuf,
}

impl Tmpfs {
    pub fn mount(dir: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(dir).unwrap();
        run(
            "mount",
            &[
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size}"),
                "tmpfs",
                dir.to_str().unwrap(),
            ],
        );
        Tmpfs {
            dir: dir.to_path_buf(),
        }
    }

    /// Bytes in use on it.
    pub fn used(&self) -> u64 {
        let out = run("df", &["-B1", "--output=used", self.dir.to_str().unwrap()]);
        out.lines().nth(1).unwrap().trim().parse().unwrap()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
    }
}

/// Makes `n - 1` more images named `{prefix}NNN` from image `src`'s manifest (same chunks,
/// another name and uid), as the repository would after `n - 1` imports of the same file.
pub fn clone_manifests(repo: &Path, src: &str, prefix: &str, n: usize) {
    let text = std::fs::read_to_string(repo.join("images").join(format!("{src}.json"))).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    for i in 1..n {
        let mut c = v.clone();
        let name = format!("{prefix}{i:03}");
        c["name"] = name.clone().into();
        c["id"] = format!("img-clone-{i}").into();
        c["created_at"] = (1_700_000_000 + i as i64).into();
        std::fs::write(
            repo.join("images").join(format!("{name}.json")),
            serde_json::to_vec(&c).unwrap(),
        )
        .unwrap();
    }
}
