//! `kind = "imagerepo"` targets: captures go through the chunk pipeline into a central
//! `imagerepo` server (the ChunkService of `proto/imagerepo/v1/imagerepo.proto`), which is sent
//! only the chunks it lacks.
//!
//! Why here: this is the agent's side of a remote destination, beside Glance and S3, reached
//! through `[targets.NAME]` like them; it is the one target that is a chunk store
//! ([`crate::repo::ChunkStore`]) instead of a byte stream, so `upload` may name `repo` (for
//! that trait and the chunk types) and `proto` (for the generated client). The server lives in
//! `crate::imagerepo`, which the agent never links to: the two meet only in the proto.
//!
//! ```toml
//! [targets.central]
//! kind = "imagerepo"
//! address = "https://repo.example:7444"   # or "unix:/run/imagerepo/imagerepo.sock"
//! ca = "/etc/imaged/repo-ca.pem"          # https: the CA the server's certificate chains to
//! cert = "/etc/imaged/agent.pem"          # https: this agent's client certificate (mTLS)
//! key = "/etc/imaged/agent.key"
//! project = "p1"                          # default project (a capture may name another)
//! chunks_in_flight = 4                    # chunk sends at once (memory: 4 MiB each)
//! bandwidth_limit = 104857600             # bytes/s, shared by the target's captures
//! connect_timeout_secs = 10
//! call_timeout_secs = 60                  # one call (a chunk send: plus its bytes at the cap)
//! retry_secs = 120                        # how long a broken connection is retried
//! ```
//!
//! The files are read when the config is loaded: a missing or unreadable one is an error
//! naming its key. An upload ([`upload::RemoteUpload`]) is begun with a `request_id` derived
//! from the capture operation, so every retry of a call within the capture resumes the same
//! upload; see `upload.rs` for the flow, [`batch`] for how FindMissingChunks is batched and
//! [`bandwidth`] for the cap.

mod bandwidth;
mod batch;
mod upload;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use serde::Deserialize;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity, Uri};

use super::defaults;
use crate::error::{invalid, Error, ErrorKind, Result};
use crate::proto::imagerepo::v1 as pb;
pub use upload::{RemoteUpload, UploadSpec, UploadStats};

/// Settings of an `imagerepo` target.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImagerepoConfig {
    /// `https://HOST:PORT` (mutual TLS: `ca`, `cert` and `key` needed) or `unix:/PATH`.
    pub address: String,
    /// CA certificate(s) (PEM) the server's certificate must chain to.
    #[serde(default)]
    pub ca: Option<PathBuf>,
    /// This agent's client certificate (PEM).
    #[serde(default)]
    pub cert: Option<PathBuf>,
    /// This agent's private key (PEM).
    #[serde(default)]
    pub key: Option<PathBuf>,
    /// The project images go to when a capture names none.
    #[serde(default)]
    pub project: Option<String>,
    /// Chunk sends at once (1 to 64); each holds one 4 MiB buffer.
    #[serde(default = "chunks_in_flight")]
    pub chunks_in_flight: usize,
    /// Bytes a second all chunk sends to this address may use together; none: no cap.
    #[serde(default)]
    pub bandwidth_limit: Option<u64>,
    #[serde(default = "defaults::connect_timeout_secs")]
    pub connect_timeout_secs: u64,
    /// How long one call may take (a chunk send: plus the time its bytes take at the cap).
    #[serde(default = "call_timeout_secs")]
    pub call_timeout_secs: u64,
    /// How long calls that fail on the network are retried (with backoff) before the capture
    /// fails.
    #[serde(default = "retry_secs")]
    pub retry_secs: u64,
}

fn chunks_in_flight() -> usize {
    4
}
fn call_timeout_secs() -> u64 {
    60
}
fn retry_secs() -> u64 {
    120
}

/// How the target is reached.
#[derive(Debug, Clone)]
enum Address {
    Tls { url: String, tls: ClientTlsConfig },
    Unix(PathBuf),
}

/// A configured `imagerepo` target. Cheap to clone.
#[derive(Clone)]
pub struct ImageRepo {
    inner: Arc<Target>,
}

struct Target {
    /// The `[targets.NAME]` name, for messages.
    name: Mutex<String>,
    cfg: ImagerepoConfig,
    address: Address,
    limiter: Arc<bandwidth::Limiter>,
    channel: tokio::sync::OnceCell<Channel>,
}

/// Reads a file a key names; the error names the key.
fn read_key_file(key: &str, path: &Option<PathBuf>, address: &str) -> Result<Vec<u8>> {
    let Some(p) = path else {
        return Err(invalid(format!(
            "{key} is missing: address {address} is TCP, which needs mutual TLS (ca, cert and key)"
        )));
    };
    if !p.is_absolute() {
        return Err(invalid(format!(
            "{key} = {:?} must be an absolute path",
            p.display()
        )));
    }
    std::fs::read(p).map_err(|e| Error::io(format!("{key} = {}: cannot read it", p.display()), e))
}

/// The limiters of this process, by address and rate.
type Limiters = Mutex<HashMap<(String, u64), Arc<bandwidth::Limiter>>>;

/// One limiter per address and rate, shared by every capture to it in this process.
fn shared_limiter(address: &str, rate: Option<u64>) -> Arc<bandwidth::Limiter> {
    static LIMITERS: OnceLock<Limiters> = OnceLock::new();
    let Some(r) = rate else {
        return Arc::new(bandwidth::Limiter::new(None));
    };
    let mut m = LIMITERS
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    m.entry((address.to_string(), r))
        .or_insert_with(|| Arc::new(bandwidth::Limiter::new(Some(r))))
        .clone()
}

impl std::fmt::Debug for ImageRepo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

impl ImageRepo {
    /// Checks the settings and reads the TLS files (nothing is contacted yet).
    pub fn new(cfg: ImagerepoConfig) -> Result<ImageRepo> {
        let address = if let Some(path) = cfg.address.strip_prefix("unix:") {
            if !Path::new(path).is_absolute() {
                return Err(invalid(format!(
                    "address {}: write unix:/ABSOLUTE/PATH",
                    cfg.address
                )));
            }
            for (k, v) in [("ca", &cfg.ca), ("cert", &cfg.cert), ("key", &cfg.key)] {
                if v.is_some() {
                    return Err(invalid(format!(
                        "{k} is set but address {} is a unix socket, which uses no TLS; remove {k}",
                        cfg.address
                    )));
                }
            }
            Address::Unix(PathBuf::from(path))
        } else if cfg.address.starts_with("https://") {
            Uri::try_from(cfg.address.as_str()).map_err(|e| {
                invalid(format!("address {} is not a URL", cfg.address)).with_source(e)
            })?;
            let ca = read_key_file("ca", &cfg.ca, &cfg.address)?;
            let cert = read_key_file("cert", &cfg.cert, &cfg.address)?;
            let key = read_key_file("key", &cfg.key, &cfg.address)?;
            let tls = ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(ca))
                .identity(Identity::from_pem(cert, key));
            Address::Tls {
                url: cfg.address.clone(),
                tls,
            }
        } else {
            return Err(invalid(format!(
                "address {:?}: write https://HOST:PORT (mutual TLS) or unix:/PATH",
                cfg.address
            )));
        };
        if !(1..=64).contains(&cfg.chunks_in_flight) {
            return Err(invalid(format!(
                "chunks_in_flight must be 1 to 64, got {}",
                cfg.chunks_in_flight
            )));
        }
        if cfg.bandwidth_limit == Some(0) {
            return Err(invalid(
                "bandwidth_limit must be above 0 bytes/s (leave it out for no cap)",
            ));
        }
        for (k, v) in [
            ("connect_timeout_secs", cfg.connect_timeout_secs),
            ("call_timeout_secs", cfg.call_timeout_secs),
        ] {
            if !(1..=3600).contains(&v) {
                return Err(invalid(format!("{k} must be 1 to 3600, got {v}")));
            }
        }
        if cfg.retry_secs > 86400 {
            return Err(invalid(format!(
                "retry_secs must be 0 to 86400, got {}",
                cfg.retry_secs
            )));
        }
        if let Some(p) = &cfg.project {
            check_project(p).map_err(|e| invalid(format!("project: {e}")))?;
        }
        let limiter = shared_limiter(&cfg.address, cfg.bandwidth_limit);
        Ok(ImageRepo {
            inner: Arc::new(Target {
                name: Mutex::new(String::new()),
                cfg,
                address,
                limiter,
                channel: tokio::sync::OnceCell::new(),
            }),
        })
    }

    /// Names the target (`[targets.NAME]`) in its messages.
    pub fn named(self, name: &str) -> ImageRepo {
        *self.inner.name.lock().unwrap_or_else(|p| p.into_inner()) = name.to_string();
        self
    }

    /// `imagerepo ADDRESS`, or `target NAME (imagerepo ADDRESS)` once named.
    pub fn describe(&self) -> String {
        self.inner.describe()
    }

    /// The project a capture names, or the configured default; INVALID_ARGUMENT when neither.
    pub fn project(&self, asked: Option<&str>) -> Result<String> {
        let p = asked.or(self.inner.cfg.project.as_deref()).ok_or_else(|| {
            invalid(format!(
                "{} has no project: set target.remote.project or `project` in its [targets] table",
                self.describe()
            ))
            .with_field("target.remote.project")
        })?;
        check_project(p).map_err(|e| invalid(e).with_field("target.remote.project"))?;
        Ok(p.to_string())
    }

    /// Reaches the repository before any disk byte is read: connects (TCP, TLS with this
    /// agent's certificate, or the unix socket) and asks about an upload that cannot exist,
    /// which any answering repository refuses. UNAVAILABLE when it cannot be reached,
    /// PERMISSION_DENIED when it refuses this agent.
    pub async fn check(&self, project: &str) -> Result<()> {
        let ch = self.inner.channel().await?;
        let mut client = pb::chunk_service_client::ChunkServiceClient::new(ch);
        let mut req = tonic::Request::new(pb::GetUploadRequest {
            name: format!("projects/{project}/uploads/imaged-reachability-check"),
        });
        req.set_timeout(Duration::from_secs(self.inner.cfg.call_timeout_secs));
        self.inner.annotate(&mut req, project);
        match client.get_upload(req).await {
            Ok(_) => Ok(()),
            Err(s) => match s.code() {
                tonic::Code::NotFound | tonic::Code::InvalidArgument => Ok(()),
                _ => Err(self.inner.status_error("reaching it", s)),
            },
        }
    }

    /// Begins (or resumes) the upload `spec` describes.
    pub async fn begin(
        &self,
        spec: UploadSpec,
        cancel: crate::progress::CancelToken,
    ) -> Result<RemoteUpload> {
        let ch = self.inner.channel().await?;
        RemoteUpload::begin(self.inner.clone(), ch, spec, cancel).await
    }
}

/// A project id as the repository spells them: 1 to 63 lower-case letters, digits and '-'.
fn check_project(p: &str) -> std::result::Result<(), String> {
    let ok = (1..=63).contains(&p.len())
        && p.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
        && !p.starts_with('-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "project {p:?} must be 1 to 63 lower-case letters, digits, '-' or '_'"
        ))
    }
}

impl Target {
    fn describe(&self) -> String {
        let name = self.name.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if name.is_empty() {
            format!("imagerepo {}", self.cfg.address)
        } else {
            format!("target {name} (imagerepo {})", self.cfg.address)
        }
    }

    /// The channel, connected on first use; it reconnects by itself after a broken
    /// connection.
    async fn channel(&self) -> Result<Channel> {
        self.channel
            .get_or_try_init(|| self.connect())
            .await
            .cloned()
    }

    async fn connect(&self) -> Result<Channel> {
        let tune = |e: Endpoint| {
            e.connect_timeout(Duration::from_secs(self.cfg.connect_timeout_secs))
                // A dead peer is found by keepalive pings, not by the call timeout alone.
                .http2_keep_alive_interval(Duration::from_secs(10))
                .keep_alive_timeout(Duration::from_secs(20))
                .keep_alive_while_idle(true)
                // Chunks are 4 MiB: windows that hold one keep a long link busy.
                .initial_stream_window_size(Some(4 << 20))
                .initial_connection_window_size(Some(16 << 20))
        };
        let unreachable = |e: tonic::transport::Error| {
            Error::new(
                ErrorKind::Unavailable,
                format!(
                    "{} is unreachable: is imagerepo listening at {}, and does it trust this agent's certificate?",
                    self.describe(),
                    self.cfg.address
                ),
            )
            .with_reason("IMAGEREPO_UNAVAILABLE")
            .with_subject(self.cfg.address.clone())
            .with_source(e)
        };
        match &self.address {
            Address::Tls { url, tls } => {
                let ep = Endpoint::from_shared(url.clone())
                    .map_err(|e| invalid(format!("address {url} is not a URL")).with_source(e))?
                    .tls_config(tls.clone())
                    .map_err(|e| invalid(format!("address {url}: TLS settings")).with_source(e))?;
                tune(ep).connect().await.map_err(unreachable)
            }
            Address::Unix(path) => {
                let path = path.clone();
                let ep = tune(Endpoint::from_static("http://imagerepo.local"));
                ep.connect_with_connector(tower::service_fn(move |_: Uri| {
                    let path = path.clone();
                    async move {
                        Ok::<_, std::io::Error>(TokioIo::new(
                            tokio::net::UnixStream::connect(path).await?,
                        ))
                    }
                }))
                .await
                .map_err(unreachable)
            }
        }
    }

    /// Names the project a call acts for (the header a service identity needs).
    fn annotate<T>(&self, req: &mut tonic::Request<T>, project: &str) {
        if let Ok(v) = project.parse() {
            req.metadata_mut().insert("x-imagerepo-project", v);
        }
    }

    /// An error of the repository as an agent error naming the target.
    fn status_error(&self, what: &str, s: tonic::Status) -> Error {
        use tonic::Code;
        let kind = match s.code() {
            Code::InvalidArgument | Code::OutOfRange => ErrorKind::InvalidArgument,
            Code::NotFound => ErrorKind::NotFound,
            Code::AlreadyExists => ErrorKind::AlreadyExists,
            Code::FailedPrecondition => ErrorKind::FailedPrecondition,
            Code::Aborted => ErrorKind::Aborted,
            Code::ResourceExhausted => ErrorKind::ResourceExhausted,
            Code::PermissionDenied | Code::Unauthenticated => ErrorKind::PermissionDenied,
            Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::Unknown => {
                ErrorKind::Unavailable
            }
            _ => ErrorKind::Internal,
        };
        let mut e = Error::new(
            kind,
            format!(
                "{} {what}: {} ({:?})",
                self.describe(),
                s.message(),
                s.code()
            ),
        )
        .with_subject(self.cfg.address.clone());
        if kind == ErrorKind::Unavailable {
            e = e.with_reason("IMAGEREPO_UNAVAILABLE");
        }
        e
    }
}

/// A failure that a new attempt over a new connection may not see.
fn retryable(s: &tonic::Status) -> bool {
    use tonic::Code;
    matches!(
        s.code(),
        Code::Unavailable | Code::DeadlineExceeded | Code::Unknown | Code::Cancelled
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<ImageRepo> {
        let cfg: ImagerepoConfig = toml::from_str(text).map_err(|e| invalid(e.to_string()))?;
        ImageRepo::new(cfg)
    }

    #[test]
    fn settings_are_checked_and_files_named_by_key() {
        let dir = tempfile::tempdir().unwrap();
        let f = |n: &str| {
            let p = dir.path().join(n);
            std::fs::write(&p, "-----BEGIN CERTIFICATE-----\n").unwrap();
            p.display().to_string()
        };
        let (ca, cert, key) = (f("ca.pem"), f("cert.pem"), f("key.pem"));
        let ok = format!(
            "address = \"https://127.0.0.1:7444\"\nca = \"{ca}\"\ncert = \"{cert}\"\nkey = \"{key}\"\n"
        );
        let r = parse(&ok).unwrap().named("central");
        assert_eq!(
            r.describe(),
            "target central (imagerepo https://127.0.0.1:7444)"
        );
        assert_eq!(r.inner.cfg.chunks_in_flight, 4);
        // No project anywhere: the capture is refused, naming the field.
        let e = r.project(None).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidArgument);
        assert_eq!(r.project(Some("p1")).unwrap(), "p1");
        assert!(r.project(Some("P 1")).is_err());

        let missing = ok.replace(&key, "/nonexistent/agent.key");
        let e = parse(&missing).unwrap_err();
        assert!(
            e.chain().contains("key = /nonexistent/agent.key"),
            "{}",
            e.chain()
        );
        let no_cert = format!("address = \"https://h:1\"\nca = \"{ca}\"\nkey = \"{key}\"\n");
        assert!(parse(&no_cert)
            .unwrap_err()
            .to_string()
            .starts_with("cert is missing"));
        let e = parse(&format!("{ok}chunks_in_flight = 0\n")).unwrap_err();
        assert!(e.to_string().contains("chunks_in_flight"), "{e}");
        let e = parse(&format!("{ok}bandwidth_limit = 0\n")).unwrap_err();
        assert!(e.to_string().contains("bandwidth_limit"), "{e}");
        assert!(parse(&format!("{ok}chunks_in_flite = 2\n")).is_err());

        let unix = parse("address = \"unix:/run/imagerepo.sock\"\nproject = \"p2\"\n").unwrap();
        assert_eq!(unix.project(None).unwrap(), "p2");
        let e = parse(&format!("address = \"unix:/run/r.sock\"\nca = \"{ca}\"\n")).unwrap_err();
        assert!(e.to_string().starts_with("ca is set"), "{e}");
        assert!(parse("address = \"http://h:1\"\n").is_err());
        assert!(parse("address = \"unix:relative.sock\"\n").is_err());
    }

    #[tokio::test]
    async fn an_unreachable_repository_is_unavailable_and_named() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("nobody.sock");
        let r = ImageRepo::new(ImagerepoConfig {
            address: format!("unix:{}", sock.display()),
            ca: None,
            cert: None,
            key: None,
            project: Some("p1".into()),
            chunks_in_flight: 4,
            bandwidth_limit: None,
            connect_timeout_secs: 2,
            call_timeout_secs: 2,
            retry_secs: 0,
        })
        .unwrap()
        .named("central");
        let e = r.check("p1").await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Unavailable);
        assert!(e.to_string().contains("target central"), "{e}");
        assert!(e.to_string().contains(&sock.display().to_string()), "{e}");
        assert_eq!(e.facts().reason, "IMAGEREPO_UNAVAILABLE");
    }
}
