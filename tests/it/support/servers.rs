//! Real remote servers for the stream-target tests, and a TCP proxy that breaks connections.
//!
//! [`Glance::get`], [`Keystone::get`], [`S3::get`] and [`Postgres::get`] (once per test
//! binary) run `tests/servers/{glance,keystone,s3,postgres}.sh start`, which install the server on first use
//! (Debian's glance-api by apt, about 2–3.5 minutes; python3-keystone by apt, seconds after
//! that; s3s-fs by `cargo install`, about 4–5 minutes), start it on 127.0.0.1 and print its
//! endpoint. `Keystone` comes with a second Glance that validates Keystone tokens and is listed
//! in Keystone's catalog. When a server cannot be had they panic with the script's output: a
//! test of real parts fails, it never skips.
//!
//! [`CutProxy`] sits between a client and a server on 127.0.0.1 and injects one kind of
//! [`Fault`]: a connection cut after some bytes, a stall (bytes stop flowing, the connection
//! stays open), or a cut / an HTTP error answer for requests whose head contains a marker (an S3
//! part number). It runs on its own thread and runtime, so it works under any test runtime,
//! and stops when dropped.
//!
//! The servers are shared by every test of the binary, whatever its module: a test that uses
//! Glance or S3 holds [`GLANCE_LOCK`] or [`S3_LOCK`] shared, and a test that stops Glance or
//! asserts on s3s-fs's on-disk upload state (which any upload changes) holds it exclusively.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::RwLock;

/// The standalone Glance ([`Glance`]): shared by its users, exclusive for a test that stops it.
pub static GLANCE_LOCK: RwLock<()> = RwLock::const_new(());
/// The S3 server ([`S3`]): shared by its users, exclusive for a test that asserts on the
/// uploads s3s-fs holds on disk ([`S3::uploads_on_disk`]).
pub static S3_LOCK: RwLock<()> = RwLock::const_new(());

/// Where the scripts keep state.
pub const STATE_DIR: &str = "/var/lib/imaged-test-servers";

fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/servers")
        .join(name)
}

/// Runs `tests/servers/NAME ARG`: the last stdout line (the endpoint, for `start`), or the
/// script's story when it fails.
pub fn run_script(name: &str, arg: &str) -> Result<String, String> {
    let path = script(name);
    let out = Command::new("bash")
        .arg(&path)
        .arg(arg)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {}: {e}", path.display()))?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    if !out.status.success() {
        let tail: Vec<&str> = stderr.lines().rev().take(25).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        return Err(format!(
            "{} {arg} failed ({}):\n{}",
            path.display(),
            out.status,
            tail.join("\n")
        ));
    }
    let last = stdout.lines().last().unwrap_or("").trim().to_string();
    if arg == "start" && last.is_empty() {
        return Err(format!("{} start printed no endpoint", path.display()));
    }
    Ok(last)
}

/// A standalone Glance v2 with trusted-headers auth (see tests/servers/glance.sh).
#[derive(Debug)]
pub struct Glance {
    /// `http://127.0.0.1:19292`
    pub endpoint: String,
}

static GLANCE: OnceLock<Result<Glance, String>> = OnceLock::new();

impl Glance {
    /// The server, started (and installed) on first use in this test binary.
    pub fn get() -> &'static Glance {
        match GLANCE
            .get_or_init(|| run_script("glance.sh", "start").map(|endpoint| Glance { endpoint }))
        {
            Ok(g) => g,
            Err(e) => panic!(
                "real Glance unavailable (needs root, apt access for glance-api python3-glance, \
                 curl): {e}"
            ),
        }
    }

    /// The trusted headers of a member of `project`.
    pub fn headers(project: &str) -> BTreeMap<String, String> {
        let mut h = BTreeMap::new();
        h.insert("X-Identity-Status".into(), "Confirmed".into());
        h.insert("X-Project-Id".into(), project.into());
        h.insert("X-User-Id".into(), format!("{project}-user"));
        h.insert("X-Roles".into(), "member,reader".into());
        h
    }

    /// Stops the server (for tests of a Glance that dies); [`Glance::start`] brings it back.
    pub fn stop(&self) {
        if let Err(e) = run_script("glance.sh", "stop") {
            panic!("stopping Glance: {e}");
        }
    }

    /// Starts the server again after [`Glance::stop`].
    pub fn start(&self) {
        if let Err(e) = run_script("glance.sh", "start") {
            panic!("restarting Glance: {e}");
        }
    }
}

/// A real Keystone v3 and a second Glance that validates its tokens (see
/// tests/servers/keystone.sh), with a provisioned project and member user.
#[derive(Debug)]
pub struct Keystone {
    /// `http://127.0.0.1:15000` (no `/v3`)
    pub auth_url: String,
    /// The Keystone-backed Glance, also listed in the catalog as the `image` service.
    pub glance_endpoint: String,
    pub user: String,
    pub password: String,
    pub project: String,
    pub region: String,
}

static KEYSTONE: OnceLock<Result<Keystone, String>> = OnceLock::new();

impl Keystone {
    /// The servers, started (and installed) on first use in this test binary.
    pub fn get() -> &'static Keystone {
        let k = KEYSTONE.get_or_init(|| {
            run_script("keystone.sh", "start").map(|auth_url| Keystone {
                auth_url,
                glance_endpoint: "http://127.0.0.1:19293".into(),
                user: "imaged-test".into(),
                password: "imaged-test-pw".into(),
                project: "imaged-test".into(),
                region: "RegionOne".into(),
            })
        });
        match k {
            Ok(k) => k,
            Err(e) => panic!(
                "real Keystone unavailable (needs root, apt access for python3-keystone \
                 glance-api, curl): {e}"
            ),
        }
    }
}

/// A PostgreSQL cluster of the tests' own (see tests/servers/postgres.sh): Debian's
/// `postgresql` package, 127.0.0.1:15432, a role that may create databases.
#[derive(Debug)]
pub struct Postgres {
    /// `postgresql://USER:PASSWORD@127.0.0.1:15432/DB`, the role's own database.
    pub url: String,
}

static POSTGRES: OnceLock<Result<Postgres, String>> = OnceLock::new();
static PG_DATABASES: AtomicUsize = AtomicUsize::new(0);

impl Postgres {
    /// The server, started (and installed) on first use in this test binary.
    pub fn get() -> &'static Postgres {
        let s =
            POSTGRES.get_or_init(|| run_script("postgres.sh", "start").map(|url| Postgres { url }));
        match s {
            Ok(s) => s,
            Err(e) => panic!(
                "real PostgreSQL server unavailable (needs Debian's postgresql package, root to \
                 install it and to run pg_ctl as the postgres user): {e}"
            ),
        }
    }

    /// A new, empty database of the test role (one per test server, so tests run in
    /// parallel), dropped when the handle drops.
    pub fn database(&self) -> PgDatabase {
        let n = PG_DATABASES.fetch_add(1, Ordering::SeqCst);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        let name = format!("imaged_t_{}_{n}_{nanos}", std::process::id());
        self.psql(&format!("CREATE DATABASE {name}"))
            .unwrap_or_else(|e| panic!("creating test database {name}: {e}"));
        let (base, _) = self.url.rsplit_once('/').expect("url ends in /DB");
        PgDatabase {
            url: format!("{base}/{name}"),
            name,
        }
    }

    /// Runs `sql` with psql as the test role.
    fn psql(&self, sql: &str) -> Result<(), String> {
        let out = Command::new("psql")
            .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", &self.url, "-c", sql])
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run psql (Debian package postgresql-client): {e}"))?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).into_owned());
        }
        Ok(())
    }
}

/// A test database ([`Postgres::database`]).
#[derive(Debug)]
pub struct PgDatabase {
    pub name: String,
    /// Its URL, with the password.
    pub url: String,
}

impl PgDatabase {
    /// The URL without the password, and the password.
    pub fn url_and_password(&self) -> (String, String) {
        let (scheme, rest) = self.url.split_once("://").expect("url");
        let (userinfo, host) = rest.split_once('@').expect("url with user");
        let (user, pw) = userinfo.split_once(':').expect("url with password");
        (format!("{scheme}://{user}@{host}"), pw.to_string())
    }
}

impl Drop for PgDatabase {
    fn drop(&mut self) {
        if let Err(e) = Postgres::get().psql(&format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            self.name
        )) {
            eprintln!("dropping test database {}: {e}", self.name);
        }
    }
}

/// An s3s-fs server over a directory (see tests/servers/s3.sh).
#[derive(Debug)]
pub struct S3 {
    /// `http://127.0.0.1:19000`
    pub endpoint: String,
    pub access_key: String,
    pub secret_key: String,
    /// A bucket that exists.
    pub bucket: String,
    /// The server's root: `DATA/BUCKET/KEY` are objects, `DATA/.upload*` uploads in progress.
    pub data_dir: PathBuf,
}

static S3_SERVER: OnceLock<Result<S3, String>> = OnceLock::new();

impl S3 {
    /// The server, started (and installed) on first use in this test binary.
    pub fn get() -> &'static S3 {
        let s = S3_SERVER.get_or_init(|| {
            run_script("s3.sh", "start").map(|endpoint| {
                let s = S3 {
                    endpoint,
                    access_key: "imaged-test".into(),
                    secret_key: "imaged-test-secret".into(),
                    bucket: "imaged-test".into(),
                    data_dir: Path::new(STATE_DIR).join("s3/data"),
                };
                // The server's data outlives a run: uploads a killed or failed earlier run left
                // would read as this run's leftovers. This binary's S3 tests start from none.
                for name in s.uploads_on_disk() {
                    let _ = std::fs::remove_file(s.data_dir.join(name));
                }
                s
            })
        });
        match s {
            Ok(s) => s,
            Err(e) => panic!(
                "real S3 server unavailable (needs cargo to install s3s-fs 0.14.1, curl): {e}"
            ),
        }
    }

    /// Multipart uploads s3s-fs holds on disk (`.upload-ID.json`, `.upload_id-ID.part-N`, the
    /// metadata of uploads, temp files of parts being written): empty when no upload is in
    /// progress or orphaned.
    pub fn uploads_on_disk(&self) -> Vec<String> {
        let mut out = Vec::new();
        if let Ok(rd) = std::fs::read_dir(&self.data_dir) {
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                // Half-written parts are `.tmp.N.internal.part` until renamed.
                if name.starts_with(".upload")
                    || name.contains(".upload-")
                    || name.starts_with(".tmp.")
                {
                    out.push(name);
                }
            }
        }
        out.sort();
        out
    }

    /// The bucket (path style) and credentials, to sign requests of our own.
    pub fn client(&self) -> (rusty_s3::Bucket, rusty_s3::Credentials) {
        let bucket = rusty_s3::Bucket::new(
            self.endpoint.parse().unwrap(),
            rusty_s3::UrlStyle::Path,
            self.bucket.clone(),
            "us-east-1",
        )
        .unwrap();
        let creds = rusty_s3::Credentials::new(self.access_key.clone(), self.secret_key.clone());
        (bucket, creds)
    }

    /// The path of an object in the bucket.
    pub fn object_path(&self, key: &str) -> PathBuf {
        self.data_dir.join(&self.bucket).join(key)
    }
}

/// What a [`CutProxy`] does to the traffic.
#[derive(Debug, Clone)]
pub enum Fault {
    /// The first `times` connections that carry more than `bytes` bytes from the client are cut
    /// (both sides closed) at that point; later ones are forwarded.
    CutAfter { bytes: u64, times: usize },
    /// Like `CutAfter`, but the connection just stops moving and stays open (a black hole).
    StallAfter { bytes: u64, times: usize },
    /// A connection is cut when a request head containing `marker` comes through (every time).
    CutRequestsWith { marker: String },
    /// A request head containing `marker` is not forwarded; the client gets `status` with an
    /// S3-style XML error body instead, and the connection is closed (every time).
    RejectRequestsWith { marker: String, status: u16 },
}

/// A TCP proxy on 127.0.0.1 that injects a [`Fault`].
pub struct CutProxy {
    pub addr: SocketAddr,
    hits: Arc<AtomicUsize>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl CutProxy {
    /// A proxy to `upstream` (`http://127.0.0.1:PORT` or `127.0.0.1:PORT`).
    pub fn start(upstream: &str, fault: Fault) -> CutProxy {
        let upstream: SocketAddr = upstream
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .parse()
            .expect("upstream must be IP:PORT");
        let std_listener = std::net::TcpListener::bind("127.0.0.1:0").expect("proxy bind");
        std_listener.set_nonblocking(true).expect("nonblocking");
        let addr = std_listener.local_addr().expect("proxy addr");
        let hits = Arc::new(AtomicUsize::new(0));
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let state = Arc::new(ProxyState {
            upstream,
            fault,
            hits: hits.clone(),
            remaining: AtomicUsize::new(0),
        });
        if let Fault::CutAfter { times, .. } | Fault::StallAfter { times, .. } = &state.fault {
            state.remaining.store(*times, Ordering::SeqCst);
        }
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("proxy runtime");
            rt.block_on(async move {
                let listener = TcpListener::from_std(std_listener).expect("proxy listener");
                let accept = async {
                    loop {
                        let Ok((client, _)) = listener.accept().await else {
                            continue;
                        };
                        let st = state.clone();
                        tokio::spawn(async move {
                            let _ = st.serve(client).await;
                        });
                    }
                };
                tokio::select! {
                    _ = accept => {}
                    _ = stop_rx => {}
                }
            });
            // Dropping the runtime closes every connection.
        });
        CutProxy {
            addr,
            hits,
            stop: Some(stop_tx),
            thread: Some(thread),
        }
    }

    /// `http://127.0.0.1:PORT` of the proxy.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// How many times the fault was applied.
    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

impl Drop for CutProxy {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct ProxyState {
    upstream: SocketAddr,
    fault: Fault,
    hits: Arc<AtomicUsize>,
    remaining: AtomicUsize,
}

fn find(hay: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && hay.windows(needle.len()).any(|w| w == needle)
}

impl ProxyState {
    /// Takes one of the `times` a threshold fault may fire.
    fn take_turn(&self) -> bool {
        self.remaining
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
    }

    async fn serve(self: Arc<Self>, client: TcpStream) -> std::io::Result<()> {
        let server = TcpStream::connect(self.upstream).await?;
        let _ = client.set_nodelay(true);
        let _ = server.set_nodelay(true);
        let (mut cr, mut cw) = client.into_split();
        let (mut sr, mut sw) = server.into_split();
        let down = pump_down(&mut sr, &mut cw);
        let up = async {
            let mut buf = vec![0u8; 64 * 1024];
            let mut seen: u64 = 0;
            let mut tail: Vec<u8> = Vec::new();
            loop {
                let n = cr.read(&mut buf).await?;
                if n == 0 {
                    sw.shutdown().await?;
                    return Ok::<_, std::io::Error>(Action::Drain);
                }
                let data = &buf[..n];
                match &self.fault {
                    Fault::CutAfter { bytes, .. } | Fault::StallAfter { bytes, .. } => {
                        if seen <= *bytes && seen + n as u64 > *bytes && self.take_turn() {
                            let keep = (*bytes - seen) as usize;
                            sw.write_all(&data[..keep]).await?;
                            self.hits.fetch_add(1, Ordering::SeqCst);
                            return Ok(if matches!(self.fault, Fault::StallAfter { .. }) {
                                Action::Stall
                            } else {
                                Action::Cut
                            });
                        }
                    }
                    Fault::CutRequestsWith { marker }
                    | Fault::RejectRequestsWith { marker, .. } => {
                        let mut window = std::mem::take(&mut tail);
                        window.extend_from_slice(data);
                        if find(&window, marker.as_bytes()) {
                            self.hits.fetch_add(1, Ordering::SeqCst);
                            return Ok(match &self.fault {
                                Fault::RejectRequestsWith { status, .. } => Action::Reject(*status),
                                _ => Action::Cut,
                            });
                        }
                        let keep = marker.len().saturating_sub(1).min(window.len());
                        tail = window[window.len() - keep..].to_vec();
                    }
                }
                sw.write_all(data).await?;
                seen += n as u64;
            }
        };
        let action = tokio::select! {
            r = up => r?,
            r = down => r?,
        };
        match action {
            Action::Stall => {
                // Hold both sockets open and move nothing until the proxy stops.
                std::future::pending::<()>().await;
            }
            Action::Reject(status) => {
                let body = "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>AccessDenied\
                            </Code><Message>rejected by the test gateway</Message></Error>";
                let resp = format!(
                    "HTTP/1.1 {status} Rejected\r\nContent-Type: application/xml\r\n\
                     Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                cw.write_all(resp.as_bytes()).await?;
                cw.shutdown().await?;
                // Like a real server's lingering close: swallow what the client is still
                // sending, so it reads the answer instead of hitting a reset.
                let mut buf = vec![0u8; 64 * 1024];
                let drain = async {
                    while let Ok(n) = cr.read(&mut buf).await {
                        if n == 0 {
                            break;
                        }
                    }
                };
                let _ = tokio::time::timeout(std::time::Duration::from_secs(10), drain).await;
            }
            Action::Drain => {
                // The client finished sending: pass the rest of the answer on.
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    let n = sr.read(&mut buf).await?;
                    if n == 0 {
                        break;
                    }
                    cw.write_all(&buf[..n]).await?;
                }
            }
            Action::Cut => {}
        }
        Ok(())
    }
}

/// Server to client, until an error; after the server's EOF it waits (the client may still be
/// sending, and `up` decides how the connection ends).
async fn pump_down(
    sr: &mut tokio::net::tcp::OwnedReadHalf,
    cw: &mut tokio::net::tcp::OwnedWriteHalf,
) -> std::io::Result<Action> {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = sr.read(&mut buf).await?;
        if n == 0 {
            cw.shutdown().await?;
            std::future::pending::<()>().await;
        }
        cw.write_all(&buf[..n]).await?;
    }
}

/// How a connection's client-to-server direction ended.
enum Action {
    /// The client closed its side.
    Drain,
    /// Close both sides now.
    Cut,
    /// Keep both sides open, forward nothing.
    Stall,
    /// Answer the client with this HTTP status, then close.
    Reject(u16),
}
