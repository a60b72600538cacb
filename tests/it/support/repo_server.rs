//! Starts the real `imagerepo` binary (the one cargo built) on a temp dir with a test PKI, and
//! gives tonic clients of it: over the unix socket (the test's uid 0 is a *service*, naming
//! its project per call in `x-imagerepo-project`) and over TCP with mutual TLS (client
//! certificates `repo-admin` → admin, `alpha-ui` → project alpha, `stranger` → no role).
//! The server is stopped (SIGTERM, then SIGKILL) when the handle drops, also when a test
//! panics; [`RepoServer::kill`] and [`RepoServer::restart`] let a test crash it on purpose.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use imaged::proto::imagerepo::v1 as pb;
use pb::chunk_service_client::ChunkServiceClient;
use pb::image_catalog_client::ImageCatalogClient;
use sha2::{Digest as _, Sha256};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::Request;

use super::pki::Pki;
use super::servers::{PgDatabase, Postgres};

/// The catalog backend a test server runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// `catalog.db` in the data directory (the default).
    Sqlite,
    /// A fresh database of the tests' PostgreSQL ([`Postgres::database`]), the password in an
    /// owner-only `password_file`.
    Postgres,
}

/// A running repository server.
pub struct RepoServer {
    pub child: Option<Child>,
    /// Holds the temp dir (config, data, log, PKI) for the server's life.
    _dir: tempfile::TempDir,
    pub socket: PathBuf,
    pub data: PathBuf,
    pub log: PathBuf,
    pub config: PathBuf,
    pub pki: Pki,
    /// `https://127.0.0.1:PORT` of the TLS listener (a new port after each restart).
    pub url: String,
    /// The PostgreSQL database of the catalog (backend Postgres), dropped after the server.
    _database: Option<PgDatabase>,
}

/// A caller: a catalog and a chunk client on one channel, and the project named in every
/// request's metadata (for the service identity of the unix socket).
#[derive(Clone)]
pub struct Caller {
    pub catalog: ImageCatalogClient<Channel>,
    pub chunks: ChunkServiceClient<Channel>,
    pub project: Option<String>,
}

impl Caller {
    /// `msg` as a request with this caller's project header.
    pub fn req<T>(&self, msg: T) -> Request<T> {
        let mut r = Request::new(msg);
        if let Some(p) = &self.project {
            r.metadata_mut()
                .insert("x-imagerepo-project", p.parse().unwrap());
        }
        r
    }
}

impl RepoServer {
    /// A server on SQLite whose config has `catalog_toml` appended to its `[catalog]` table
    /// and `gc_toml` as its `[gc]` table body.
    pub fn start(catalog_toml: &str, gc_toml: &str) -> RepoServer {
        Self::start_on(Backend::Sqlite, catalog_toml, gc_toml)
    }

    /// The same on `backend`.
    pub fn start_on(backend: Backend, catalog_toml: &str, gc_toml: &str) -> RepoServer {
        Self::start_full(backend, catalog_toml, gc_toml, true)
    }

    /// The same, serving download links (on a free port) only when `downloads`.
    pub fn start_full(
        backend: Backend,
        catalog_toml: &str,
        gc_toml: &str,
        downloads: bool,
    ) -> RepoServer {
        let dir = tempfile::Builder::new()
            .prefix("imagerepo-test-")
            .tempdir()
            .expect("temp dir");
        let pki = Pki::new(&dir.path().join("pki"));
        for cn in ["repo-admin", "alpha-ui", "stranger"] {
            pki.client(cn, None, false);
        }
        let socket = dir.path().join("imagerepo.sock");
        let data = dir.path().join("data");
        let log = dir.path().join("imagerepo.log");
        let config = dir.path().join("imagerepo.toml");
        let (database, backend_toml) = match backend {
            Backend::Sqlite => (None, String::new()),
            Backend::Postgres => {
                let db = Postgres::get().database();
                let (url, password) = db.url_and_password();
                let pw_file = dir.path().join("catalog.password");
                std::fs::write(&pw_file, format!("{password}\n")).unwrap();
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(&pw_file, std::fs::Permissions::from_mode(0o600)).unwrap();
                let toml =
                    format!("backend = \"postgres\"\nurl = {url:?}\npassword_file = {pw_file:?}\n");
                (Some(db), toml)
            }
        };
        let catalog_toml = format!("{backend_toml}{catalog_toml}");
        std::fs::write(
            &config,
            format!(
                "[server]\ndata_dir = {data:?}\nsocket = {socket:?}\ntcp_listen = \"127.0.0.1:0\"\n\
                 log_level = \"debug\"\n{tls}\n[catalog]\n{catalog_toml}\n[gc]\ninterval_secs = 0\n{gc_toml}\n\
                 [download]\n{download}\
                 [[policy]]\nrole = \"service\"\nunix_uids = [0]\n\
                 [[policy]]\nrole = \"admin\"\ntls_subjects = [\"repo-admin\"]\n\
                 [[policy]]\nrole = \"project\"\nproject = \"alpha\"\ntls_subjects = [\"alpha-ui\"]\n",
                tls = pki.tls_toml(),
                download = if downloads {
                    "download_listen = \"127.0.0.1:0\"\n"
                } else {
                    ""
                },
            ),
        )
        .unwrap();
        // Owner-only, as an admin keeps a config that may hold the object store's secret key
        // (the server refuses such a file when others may read it).
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o600)).unwrap();
        }
        let mut s = RepoServer {
            child: None,
            _dir: dir,
            socket,
            data,
            log,
            config,
            pki,
            url: String::new(),
            _database: database,
        };
        s.spawn();
        s
    }

    fn spawn(&mut self) {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_imagerepo"));
        cmd.arg("--config")
            .arg(&self.config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&self.log)
                    .unwrap(),
            );
        let before = self.log_text().len();
        self.child = Some(cmd.spawn().expect("spawning imagerepo"));
        // The ready line names the bound TCP address.
        let t0 = Instant::now();
        loop {
            let log = self.log_text();
            let fresh = &log[before.min(log.len())..];
            if let Some(at) = fresh.find("tcp=127.0.0.1:") {
                let rest = &fresh[at + "tcp=".len()..];
                let addr: String = rest.chars().take_while(|c| !c.is_whitespace()).collect();
                self.url = format!("https://{addr}");
                if std::os::unix::net::UnixStream::connect(&self.socket).is_ok() {
                    return;
                }
            }
            if let Some(st) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("imagerepo exited ({st}) at start; log:\n{log}");
            }
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "imagerepo not ready in 60 s; log:\n{log}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// What the server logged so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGKILL: the server dies at once, wherever it is.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the killed or stopped server again on the same data.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "kill or stop the server first");
        self.spawn();
    }

    /// SIGTERM and the wait for a clean exit; returns its status.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        let mut c = self.child.take().expect("server running");
        // SAFETY: kill(2) on the pid of our own child, which has not been waited for.
        unsafe {
            libc::kill(c.id() as i32, libc::SIGTERM);
        }
        let t0 = Instant::now();
        loop {
            if let Some(st) = c.try_wait().unwrap() {
                return st;
            }
            if t0.elapsed() > Duration::from_secs(20) {
                let _ = c.kill();
                panic!(
                    "imagerepo did not stop on SIGTERM; log:\n{}",
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The unix socket as the service identity acting for `project`.
    pub async fn service(&self, project: &str) -> Caller {
        let ch = imaged::cli::connect(&self.socket)
            .await
            .expect("connecting to imagerepo");
        Caller {
            catalog: ImageCatalogClient::new(ch.clone()),
            chunks: ChunkServiceClient::new(ch),
            project: Some(project.to_string()),
        }
    }

    /// TCP with mutual TLS as the client certificate `cn` (see the module doc).
    pub async fn tls(&self, cn: &str) -> Caller {
        let dir = &self.pki.dir;
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(
                std::fs::read(dir.join("server-ca.pem")).unwrap(),
            ))
            .identity(Identity::from_pem(
                std::fs::read(dir.join(format!("{cn}.pem"))).unwrap(),
                std::fs::read(dir.join(format!("{cn}.key"))).unwrap(),
            ));
        let ch = Endpoint::from_shared(self.url.clone())
            .unwrap()
            .connect_timeout(Duration::from_secs(10))
            .tls_config(tls)
            .unwrap()
            .connect()
            .await
            .expect("connecting to imagerepo over TLS");
        Caller {
            catalog: ImageCatalogClient::new(ch.clone()),
            chunks: ChunkServiceClient::new(ch),
            project: None,
        }
    }

    /// The file of a stored chunk.
    pub fn chunk_file(&self, digest: &str) -> PathBuf {
        self.data.join("chunks").join(&digest[..2]).join(digest)
    }
}

impl Drop for RepoServer {
    fn drop(&mut self) {
        if self.child.is_some() {
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                self.stop();
            }));
            self.kill();
        }
    }
}

/// The `google.rpc.ErrorInfo` reason of a status (asserting the domain is "imagerepo").
pub fn reason(st: &tonic::Status) -> String {
    use tonic_types::StatusExt;
    let info = st
        .get_error_details()
        .error_info()
        .cloned()
        .unwrap_or_else(|| panic!("no ErrorInfo in {st:?}"));
    assert_eq!(info.domain, "imagerepo", "{st:?}");
    info.reason
}

/// One chunk of a test disk: its index and bytes.
#[derive(Clone)]
pub struct TestChunk {
    pub index: u64,
    pub data: Vec<u8>,
}

impl TestChunk {
    /// A chunk at `index` of `len` bytes made from `seed` (distinct seeds, distinct bytes).
    pub fn new(index: u64, seed: u64, len: usize) -> TestChunk {
        let mut data = Vec::with_capacity(len);
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        while data.len() < len {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            data.extend_from_slice(&x.to_le_bytes());
        }
        data.truncate(len);
        TestChunk { index, data }
    }

    pub fn digest(&self) -> String {
        hex::encode(Sha256::digest(&self.data))
    }

    pub fn entry(&self) -> pb::ManifestEntry {
        pb::ManifestEntry {
            index: self.index,
            digest: self.digest(),
            cluster_mask: imaged::repo::manifest::cluster_mask(&self.data),
        }
    }
}

/// The content digest of a disk of `virtual_size` with `chunks` as its data.
pub fn content_digest(virtual_size: u64, chunks: &[TestChunk]) -> String {
    let mut data: Vec<imaged::repo::DataChunk> = chunks
        .iter()
        .map(|c| {
            let mut d = [0u8; 32];
            d.copy_from_slice(&Sha256::digest(&c.data));
            imaged::repo::DataChunk {
                index: c.index,
                digest: d,
                mask: imaged::repo::manifest::cluster_mask(&c.data),
            }
        })
        .collect();
    data.sort_by_key(|c| c.index);
    imaged::repo::manifest::content_digest(virtual_size, &data)
}

/// PutChunks messages for `chunks`, in pieces of at most 1 MiB, naming `upload` first.
pub fn pieces(upload: &str, chunks: &[&TestChunk]) -> Vec<pb::PutChunksRequest> {
    let mut out = Vec::new();
    for c in chunks {
        let n = c.data.len().div_ceil(1 << 20).max(1);
        for i in 0..n {
            let from = i << 20;
            let to = ((i + 1) << 20).min(c.data.len());
            out.push(pb::PutChunksRequest {
                upload: if out.is_empty() {
                    upload.to_string()
                } else {
                    String::new()
                },
                digest: if i == 0 { c.digest() } else { String::new() },
                offset: from as u64,
                data: c.data[from..to].to_vec(),
                last: i == n - 1,
            });
        }
    }
    out
}

/// Begins an upload of `name:tag` of a disk of `virtual_size`.
pub async fn begin(
    c: &mut Caller,
    project: &str,
    name: &str,
    tag: &str,
    request_id: &str,
    virtual_size: u64,
) -> Result<pb::Upload, tonic::Status> {
    let req = c.req(pb::BeginUploadRequest {
        parent: format!("projects/{project}"),
        image_name: name.into(),
        tag: tag.into(),
        request_id: request_id.into(),
        virtual_size_bytes: virtual_size,
        os_type: "linux".into(),
        source_host: "host1".into(),
        ..Default::default()
    });
    c.chunks.begin_upload(req).await.map(|r| r.into_inner())
}

/// Sends the chunks the repository lacks, adds every entry and commits; returns the image
/// and the number of chunks it asked for.
pub async fn finish(
    c: &mut Caller,
    upload: &str,
    virtual_size: u64,
    chunks: &[TestChunk],
) -> Result<(pb::Image, usize), tonic::Status> {
    let missing = c
        .chunks
        .find_missing_chunks(c.req(pb::FindMissingChunksRequest {
            upload: upload.into(),
            digests: chunks.iter().map(TestChunk::digest).collect(),
        }))
        .await?
        .into_inner()
        .missing;
    let send: Vec<&TestChunk> = chunks
        .iter()
        .filter(|x| missing.contains(&x.digest()))
        .collect();
    if !send.is_empty() {
        let msgs = pieces(upload, &send);
        c.chunks.put_chunks(c.req(tokio_stream::iter(msgs))).await?;
    }
    c.chunks
        .add_manifest_entries(c.req(pb::AddManifestEntriesRequest {
            upload: upload.into(),
            entries: chunks.iter().map(TestChunk::entry).collect(),
        }))
        .await?;
    let img = c
        .chunks
        .commit_upload(c.req(pb::CommitUploadRequest {
            upload: upload.into(),
            content_digest: content_digest(virtual_size, chunks),
        }))
        .await?
        .into_inner();
    Ok((img, missing.len()))
}

/// A whole capture of `name:tag` in `project`.
pub async fn capture(
    c: &mut Caller,
    project: &str,
    name: &str,
    tag: &str,
    virtual_size: u64,
    chunks: &[TestChunk],
) -> Result<pb::Image, tonic::Status> {
    let up = begin(c, project, name, tag, "", virtual_size).await?;
    finish(c, &up.name, virtual_size, chunks).await.map(|r| r.0)
}

/// Reads a chunk back through `image`.
pub async fn read_chunk(
    c: &mut Caller,
    image: &str,
    digest: &str,
) -> Result<Vec<u8>, tonic::Status> {
    let mut s = c
        .chunks
        .get_chunk(c.req(pb::GetChunkRequest {
            image: image.into(),
            digest: digest.into(),
        }))
        .await?
        .into_inner();
    let mut out = Vec::new();
    while let Some(m) = s.message().await? {
        assert_eq!(m.offset, out.len() as u64);
        out.extend_from_slice(&m.data);
    }
    Ok(out)
}
