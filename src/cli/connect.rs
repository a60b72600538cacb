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

fn read(path: &Option<PathBuf>, flag: &str, env: &str) -> Result<Vec<u8>> {
    let Some(p) = path else {
        return Err(invalid(format!(
            "--endpoint needs {flag} (or {env}): the daemon serves TCP only with mutual TLS"
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
    if !url.starts_with("https://") {
        return Err(invalid(format!(
            "--endpoint {url}: write https://HOST:PORT; the daemon serves TCP only with mutual TLS"
        )));
    }
    let ca = read(&opts.ca, "--ca", "IMAGED_CA")?;
    let cert = read(&opts.cert, "--cert", "IMAGED_CERT")?;
    let key = read(&opts.key, "--key", "IMAGED_KEY")?;
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca))
        .identity(Identity::from_pem(cert, key));
    let endpoint = Endpoint::from_shared(url.clone())
        .map_err(|e| invalid(format!("--endpoint {url} is not a URL")).with_source(e))?
        .connect_timeout(CONNECT_TIMEOUT)
        .tls_config(tls)
        .map_err(|e| invalid(format!("--endpoint {url}: TLS settings: {}", causes(&e))))?;
    endpoint.connect().await.map_err(|e| {
        Error::new(
            ErrorKind::Unavailable,
            format!(
                "cannot reach imaged at {url} ({}): is the daemon listening there, and does it \
                 trust this client's certificate?",
                causes(&e)
            ),
        )
    })
}
