//! How `imagectl` (and tests) reach the daemon: its unix socket by default, or TCP with
//! mutual TLS when an endpoint is given (`--endpoint https://host:7443 --ca F --cert F --key F`,
//! or `IMAGED_ENDPOINT`, `IMAGED_CA`, `IMAGED_CERT`, `IMAGED_KEY`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::error::{invalid, Error, ErrorKind, Result};

/// How to reach the daemon.
#[derive(clap::Args, Debug, Clone)]
pub struct ConnectOpts {
    /// The daemon's unix socket (when no --endpoint is given).
    #[arg(long, global = true, env = "IMAGED_SOCKET", default_value = crate::config::DEFAULT_SOCKET)]
    pub socket: PathBuf,
    /// The daemon's TCP endpoint, https://HOST:PORT (mutual TLS: needs --ca, --cert, --key).
    #[arg(long, global = true, env = "IMAGED_ENDPOINT", value_name = "URL")]
    pub endpoint: Option<String>,
    /// CA certificate(s) (PEM) the daemon's certificate must chain to.
    #[arg(long, global = true, env = "IMAGED_CA", value_name = "FILE")]
    pub ca: Option<PathBuf>,
    /// This client's certificate (PEM), issued by the daemon's `[tls] client_ca`.
    #[arg(long, global = true, env = "IMAGED_CERT", value_name = "FILE")]
    pub cert: Option<PathBuf>,
    /// This client's private key (PEM).
    #[arg(long, global = true, env = "IMAGED_KEY", value_name = "FILE")]
    pub key: Option<PathBuf>,
}

impl ConnectOpts {
    /// Options that reach the unix socket `socket`.
    pub fn unix(socket: &Path) -> ConnectOpts {
        ConnectOpts {
            socket: socket.to_path_buf(),
            endpoint: None,
            ca: None,
            cert: None,
            key: None,
        }
    }
}

/// How long connecting (TCP and the TLS handshake) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);

/// The error's message with every cause, for a reader who must fix something.
fn causes(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        out.push_str(": ");
        out.push_str(&s.to_string());
        cur = s.source();
    }
    out
}

fn read(
    path: &Option<PathBuf>,
    flag: &str,
    env: &str,
    need: &str,
    server: &str,
) -> Result<Vec<u8>> {
    let Some(p) = path else {
        return Err(invalid(format!(
            "{need} needs {flag} (or {env}): {server} serves TCP only with mutual TLS"
        )));
    };
    std::fs::read(p).map_err(|e| Error::io(format!("{flag} {}: reading it", p.display()), e))
}

/// Opens a channel to the daemon as `opts` say: TCP with mutual TLS when an endpoint is given,
/// otherwise the unix socket. UNAVAILABLE, with the cause (a refused certificate, say), when
/// the daemon cannot be reached.
pub async fn connect(opts: &ConnectOpts) -> Result<Channel> {
    let Some(url) = &opts.endpoint else {
        return super::connect(&opts.socket)
            .await
            .map_err(|s| Error::new(ErrorKind::Unavailable, s.message().to_string()));
    };
    tls_channel(url, opts, "--endpoint", "imaged", "the daemon").await
}

/// A channel to `url` (`https://HOST:PORT`) with mutual TLS from `opts`' `--ca`, `--cert` and
/// `--key`. `flag` is the option that gave the URL, `who` and `server` name the server in
/// messages.
async fn tls_channel(
    url: &str,
    opts: &ConnectOpts,
    flag: &str,
    who: &str,
    server: &str,
) -> Result<Channel> {
    if !url.starts_with("https://") {
        return Err(invalid(format!(
            "{flag} {url}: write https://HOST:PORT; {server} serves TCP only with mutual TLS"
        )));
    }
    let ca = read(&opts.ca, "--ca", "IMAGED_CA", flag, server)?;
    let cert = read(&opts.cert, "--cert", "IMAGED_CERT", flag, server)?;
    let key = read(&opts.key, "--key", "IMAGED_KEY", flag, server)?;
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca))
        .identity(Identity::from_pem(cert, key));
    let endpoint = Endpoint::from_shared(url.to_string())
        .map_err(|e| invalid(format!("{flag} {url} is not a URL")).with_source(e))?
        .connect_timeout(CONNECT_TIMEOUT)
        .tls_config(tls)
        .map_err(|e| invalid(format!("{flag} {url}: TLS settings: {}", causes(&e))))?;
    endpoint.connect().await.map_err(|e| {
        Error::new(
            ErrorKind::Unavailable,
            format!(
                "cannot reach {who} at {url} ({}): is {server} listening there, and does it \
                 trust this client's certificate?",
                causes(&e)
            ),
        )
    })
}

/// Opens a channel to the central image repository at `url`: `unix:///PATH` (its local
/// socket) or `https://HOST:PORT` (mutual TLS with the same `--ca`, `--cert`, `--key` as the
/// daemon's TCP endpoint). `flag` is the option that gave the URL, for messages.
pub async fn connect_repo(url: &str, opts: &ConnectOpts, flag: &str) -> Result<Channel> {
    if let Some(path) = url.strip_prefix("unix://") {
        return super::unix_channel(Path::new(path)).await.map_err(|e| {
            Error::new(
                ErrorKind::Unavailable,
                format!(
                    "cannot reach the image repository at {url} ({}): is imagerepo running? \
                     (systemctl status imagerepo), or give {flag} https://HOST:PORT",
                    std::error::Error::source(&e).map_or_else(|| e.to_string(), causes)
                ),
            )
        });
    }
    tls_channel(url, opts, flag, "the image repository", "imagerepo").await
}
