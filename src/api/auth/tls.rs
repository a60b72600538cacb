//! Mutual TLS on the TCP listener, done here over a plain `TcpListener` so the verified
//! client identity travels with the connection into every request ([`TlsPeer`] as tonic's
//! connect info).
//!
//! [`incoming`] accepts TCP connections and runs each handshake on its own task, bounded by
//! the configured timeout and by [`MAX_HANDSHAKES`] at once, so a slow or hostile client never
//! stalls the accept loop; a failed handshake is logged with the peer's address and the
//! reason. A client must present a certificate that chains to `[tls] client_ca` and is valid
//! now (rustls' webpki verifier); the handshake of one without, with one of another CA or an
//! expired one fails. Each handshake takes the server config in force ([`Trust::tls`]), so a
//! reload applies to new connections and leaves open ones alone.

use std::io;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::rustls::{self, server::WebPkiClientVerifier, RootCertStore, ServerConfig};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::Connected;

use super::Trust;
use crate::config::TlsConfig;
use crate::error::{invalid, Error, ErrorKind, Result};

/// How many handshakes may be under way at once; connections beyond are closed at once.
pub const MAX_HANDSHAKES: usize = 128;

/// The names of a verified client certificate.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsIdentity {
    /// The subject's common name.
    pub cn: Option<String>,
    /// DNS subject alternative names.
    pub dns: Vec<String>,
    /// URI subject alternative names.
    pub uris: Vec<String>,
}

impl TlsIdentity {
    /// The names of `cert` (DER), which the verifier has accepted.
    pub fn of(cert: &CertificateDer<'_>) -> Result<TlsIdentity> {
        let ee = webpki::EndEntityCert::try_from(cert).map_err(|e| {
            Error::new(ErrorKind::Internal, "reading the client certificate").with_source(e)
        })?;
        Ok(TlsIdentity {
            cn: super::x509::common_name(ee.subject()),
            dns: ee.valid_dns_names().map(str::to_string).collect(),
            uris: ee.valid_uri_names().map(str::to_string).collect(),
        })
    }

    /// Every subject alternative name, DNS then URI.
    pub fn sans(&self) -> impl Iterator<Item = &String> {
        self.dns.iter().chain(&self.uris)
    }

    /// One name that tells the client: `CN=cp1`, else its first SAN (`DNS=...`, `URI=...`).
    pub fn short(&self) -> String {
        if let Some(cn) = &self.cn {
            format!("CN={cn}")
        } else if let Some(d) = self.dns.first() {
            format!("DNS={d}")
        } else if let Some(u) = self.uris.first() {
            format!("URI={u}")
        } else {
            "(a certificate without names)".to_string()
        }
    }

    /// Every name: `CN=cp1 (SANs cp1.example.org, spiffe://example.org/cp1)`.
    pub fn describe(&self) -> String {
        let sans: Vec<&str> = self.sans().map(String::as_str).collect();
        if sans.is_empty() || self.cn.is_none() {
            self.short()
        } else {
            format!("{} (SANs {})", self.short(), sans.join(", "))
        }
    }
}

/// The connect info of a TLS connection: in the extensions of each of its requests.
#[derive(Debug, Clone)]
pub struct TlsPeer {
    /// The client's address.
    pub addr: SocketAddr,
    /// Its verified certificate's names.
    pub identity: Arc<TlsIdentity>,
}

/// A TCP connection after a successful mutual TLS handshake.
pub struct TlsConn {
    inner: tokio_rustls::server::TlsStream<TcpStream>,
    peer: TlsPeer,
}

impl Connected for TlsConn {
    type ConnectInfo = TlsPeer;

    fn connect_info(&self) -> TlsPeer {
        self.peer.clone()
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Reads a file named by `[tls] key` (`key`), refusing it when others may read it: the mode
/// is taken from the opened file.
fn read_file(path: &Path, key: &str, private: bool) -> Result<Vec<u8>> {
    use std::io::Read;
    let shown = path.display();
    let reading = |e| Error::io(format!("{key}: reading {shown}"), e);
    let mut f = std::fs::File::open(path).map_err(reading)?;
    if private {
        let mode = f.metadata().map_err(reading)?.permissions().mode() & 0o777;
        if mode & 0o004 != 0 {
            return Err(Error::new(
                ErrorKind::PermissionDenied,
                format!(
                    "{key}: private key {shown} has mode {mode:04o}, readable by every user of \
                     the host: chmod 600 {shown} (or 640 with a trusted group)"
                ),
            ));
        }
    }
    let mut out = Vec::new();
    f.read_to_end(&mut out).map_err(reading)?;
    Ok(out)
}

/// The certificates in a PEM file; at least one.
fn certificates(path: &Path, key: &str) -> Result<Vec<CertificateDer<'static>>> {
    let pem = read_file(path, key, false)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| invalid(format!("{key}: {} is not PEM", path.display())).with_source(e))?;
    if certs.is_empty() {
        return Err(invalid(format!(
            "{key}: {} holds no CERTIFICATE block",
            path.display()
        )));
    }
    Ok(certs)
}

/// The rustls server config of `[tls]`: the server's chain and key, client certificates
/// required and verified against the client CA, HTTP/2 by ALPN, ring as the crypto provider.
pub fn server_config(t: &TlsConfig) -> Result<Arc<ServerConfig>> {
    server_config_from(&t.cert, &t.key, &t.client_ca)
}

/// [`server_config`] from the three files themselves (for servers with their own config
/// type, such as `imagerepo`); messages name them as `tls.cert`, `tls.key`, `tls.client_ca`.
pub fn server_config_from(cert: &Path, key: &Path, client_ca: &Path) -> Result<Arc<ServerConfig>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let chain = certificates(cert, "tls.cert")?;
    let key_pem = read_file(key, "tls.key", true)?;
    let private = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| {
        invalid(format!(
            "tls.key: {} holds no private key in PEM (PKCS#8, PKCS#1 or SEC1)",
            key.display()
        ))
        .with_source(e)
    })?;
    let mut roots = RootCertStore::empty();
    for c in certificates(client_ca, "tls.client_ca")? {
        roots.add(c).map_err(|e| {
            invalid(format!(
                "tls.client_ca: {} holds a certificate that is not a usable CA",
                client_ca.display()
            ))
            .with_source(e)
        })?;
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| {
            invalid(format!(
                "tls.client_ca: {} cannot verify client certificates",
                client_ca.display()
            ))
            .with_source(e)
        })?;
    let mut cfg = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::new(ErrorKind::Internal, "choosing TLS versions").with_source(e))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, private)
        .map_err(|e| {
            invalid(format!(
                "tls.cert {} and tls.key {} do not make a usable pair",
                cert.display(),
                key.display()
            ))
            .with_source(e)
        })?;
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(cfg))
}

/// The verified connections of `listener`, for tonic's `serve_with_incoming_shutdown`. The
/// accept loop runs on its own task and ends when the stream is dropped.
pub fn incoming(
    listener: TcpListener,
    trust: Arc<Trust>,
    timeout: Duration,
) -> ReceiverStream<io::Result<TlsConn>> {
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(accept_loop(listener, trust, timeout, tx));
    ReceiverStream::new(rx)
}

async fn accept_loop(
    listener: TcpListener,
    trust: Arc<Trust>,
    timeout: Duration,
    tx: tokio::sync::mpsc::Sender<io::Result<TlsConn>>,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
    loop {
        let accepted = tokio::select! {
            _ = tx.closed() => return,
            a = listener.accept() => a,
        };
        let (tcp, addr) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of descriptors and the like: wait a little rather than spin.
                tracing::warn!(error = %e, "accepting a TCP connection failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::warn!(peer = %addr, "TLS handshake refused: {MAX_HANDSHAKES} handshakes are under way already");
            continue;
        };
        let Some(cfg) = trust.tls() else {
            tracing::error!(peer = %addr, "no TLS config in force: connection closed");
            continue;
        };
        let tx = tx.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let _ = tcp.set_nodelay(true);
            let acceptor = tokio_rustls::TlsAcceptor::from(cfg);
            let stream = match tokio::time::timeout(timeout, acceptor.accept(tcp)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    tracing::warn!(peer = %addr, reason = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::warn!(peer = %addr, timeout = ?timeout, "TLS handshake timed out");
                    return;
                }
            };
            let cert = stream
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first().cloned());
            let identity = match cert.as_ref().map(TlsIdentity::of) {
                Some(Ok(id)) => id,
                Some(Err(e)) => {
                    tracing::warn!(peer = %addr, reason = %e.chain(), "TLS client certificate unreadable");
                    return;
                }
                None => {
                    // The verifier requires a certificate: this cannot happen.
                    tracing::warn!(peer = %addr, "TLS client sent no certificate");
                    return;
                }
            };
            tracing::debug!(peer = %addr, client = %identity.describe(), "TLS client connected");
            let conn = TlsConn {
                inner: stream,
                peer: TlsPeer {
                    addr,
                    identity: Arc::new(identity),
                },
            };
            let _ = tx.send(Ok(conn)).await;
        });
    }
}
