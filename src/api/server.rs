//! Serving the API: the unix socket (and TCP with mutual TLS, [`super::auth::tls`]), gRPC
//! health and reflection, systemd readiness, a clean stop on SIGTERM/SIGINT, and on SIGHUP a
//! reload of the TLS certificates, key, client CA and the policy ([`super::auth::Trust`]).
//!
//! Every request passes [`AuthLayer`] first (who may call what). Messages in are limited to
//! [`MAX_REQUEST_BYTES`], out to [`MAX_RESPONSE_BYTES`]; one connection may hold
//! [`MAX_STREAMS_PER_CONNECTION`] calls at once (watch streams included).
//!
//! Health: the overall service ("") and ImageService and OperationService are SERVING while the
//! daemon runs (images and operations need no hypervisor); DomainService follows libvirt,
//! probed every [`PROBE_PERIOD`] by [`watch_hypervisor`]: NOT_SERVING while libvirtd is
//! unreachable, SERVING again when it answers.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::transport::Server;

use super::auth::{AuthLayer, Trust};
use super::Api;
use crate::config::Config;
use crate::error::{Error, ErrorKind, Result};
use crate::hypervisor::Hypervisor;
use crate::ops::Controller;
use crate::proto;

/// How long running operations get to cancel cleanly on SIGTERM.
const STOP_GRACE: Duration = Duration::from_secs(30);
/// How often the health of the hypervisor-dependent services is probed.
pub const PROBE_PERIOD: Duration = Duration::from_secs(5);
/// The largest request message accepted (no request of the API comes near it).
pub const MAX_REQUEST_BYTES: usize = 4 << 20;
/// The largest response message sent (a list of many images or operations).
pub const MAX_RESPONSE_BYTES: usize = 64 << 20;
/// HTTP/2 streams one connection may have open at once: room for hundreds of watch streams
/// from one control plane, while one client cannot open unbounded numbers of calls.
pub const MAX_STREAMS_PER_CONNECTION: u32 = 1024;

/// Where the config came from, read again on SIGHUP.
#[derive(Debug, Clone)]
pub struct ConfigFile {
    /// The file.
    pub path: PathBuf,
    /// False for the default path, which may be absent (then the defaults apply).
    pub required: bool,
}

type DomainServer = proto::domain_service_server::DomainServiceServer<Api>;

/// Keeps DomainService's health in step with `hv`: probes it now and every `period`
/// ([`Hypervisor::probe`], no waiting) and sets DomainService SERVING or NOT_SERVING on
/// `reporter`, logging each change once; returns when `stop` turns true.
pub async fn watch_hypervisor(
    reporter: tonic_health::server::HealthReporter,
    hv: Arc<dyn Hypervisor>,
    period: Duration,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut reachable = true;
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            _ = tick.tick() => {}
        }
        let probe_hv = hv.clone();
        // A probe stuck in a hung libvirtd must not hold up the stop.
        let res = tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            r = tokio::task::spawn_blocking(move || probe_hv.probe()) => r.unwrap_or_else(|e| {
                Err(Error::new(ErrorKind::Internal, "probing the hypervisor").with_source(e))
            }),
        };
        match (reachable, res) {
            (true, Err(e)) => {
                tracing::warn!(error = %e.chain(), "libvirt unreachable: DomainService NOT_SERVING");
                reporter.set_not_serving::<DomainServer>().await;
                reachable = false;
            }
            (false, Ok(())) => {
                tracing::info!("libvirt reachable again: DomainService SERVING");
                reporter.set_serving::<DomainServer>().await;
                reachable = true;
            }
            _ => {}
        }
    }
}

/// Binds the unix socket at `path` with `mode` and optional `group`. A stale socket file from
/// a dead daemon is replaced; a live one (another daemon answering) is an error.
pub async fn bind_unix(path: &Path, mode: u32, group: &str) -> Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::io(format!("creating socket directory {}", dir.display()), e))?;
    }
    if path.exists() {
        if tokio::net::UnixStream::connect(path).await.is_ok() {
            return Err(Error::new(
                ErrorKind::Unavailable,
                format!(
                    "socket {} is in use: another server answers there; stop it or choose another path",
                    path.display()
                ),
            ));
        }
        std::fs::remove_file(path)
            .map_err(|e| Error::io(format!("removing stale socket {}", path.display()), e))?;
    }
    let l = UnixListener::bind(path)
        .map_err(|e| Error::io(format!("binding socket {}", path.display()), e))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| Error::io(format!("setting mode of socket {}", path.display()), e))?;
    if !group.is_empty() {
        let gid = group_id(group)?;
        std::os::unix::fs::chown(path, None, Some(gid)).map_err(|e| {
            Error::io(
                format!("giving socket {} to group {group}", path.display()),
                e,
            )
        })?;
    }
    Ok(l)
}

/// Binds the TCP address `addr` (the config key `key` names it in errors); `None` when `addr`
/// is empty (no TCP listener asked for). With the listener, the address it got (the port
/// chosen when `addr` asked for port 0), for the ready log line.
pub async fn bind_tcp(addr: &str, key: &str) -> Result<(Option<tokio::net::TcpListener>, String)> {
    if addr.is_empty() {
        return Ok((None, String::new()));
    }
    let l = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| Error::io(format!("binding {key} {addr}"), e))?;
    let bound = l
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|_| addr.to_string());
    Ok((Some(l), bound))
}

/// Looks a group name up in /etc/group.
fn group_id(group: &str) -> Result<u32> {
    let text =
        std::fs::read_to_string("/etc/group").map_err(|e| Error::io("reading /etc/group", e))?;
    text.lines()
        .filter_map(|l| {
            let mut f = l.split(':');
            let name = f.next()?;
            let gid = f.nth(1)?.parse().ok()?;
            (name == group).then_some(gid)
        })
        .next()
        .ok_or_else(|| {
            Error::new(
                ErrorKind::InvalidArgument,
                format!("daemon.socket_group: no group named {group}"),
            )
        })
}

/// Reloads the trust (TLS files and policy) from `file` at every SIGHUP until `stop`; a
/// reload that fails keeps what is in force and logs why.
async fn reload_on_hangup(
    mut hup: tokio::signal::unix::Signal,
    file: ConfigFile,
    trust: Arc<Trust>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            got = hup.recv() => if got.is_none() { return },
        }
        let path = file.path.clone();
        let required = file.required;
        let trust = trust.clone();
        let loaded = tokio::task::spawn_blocking(move || {
            let cfg = Config::load(&path, required)?;
            trust.reload(&cfg)
        })
        .await
        .unwrap_or_else(|e| Err(Error::new(ErrorKind::Internal, "reloading").with_source(e)));
        match loaded {
            Ok(summary) => {
                tracing::info!(config = %file.path.display(), "SIGHUP: reloaded {summary}")
            }
            Err(e) => {
                tracing::warn!(config = %file.path.display(), error = %e.chain(), "SIGHUP: reload failed; the TLS config and policy in force are kept")
            }
        }
    }
}

/// Serves the API until SIGTERM or SIGINT, then cancels running operations and returns.
/// SIGHUP re-reads `file` for the TLS files and the policy.
pub async fn serve(
    cfg: &Config,
    ctl: Controller,
    mut stop: StopSignals,
    file: ConfigFile,
) -> Result<()> {
    let trust = Trust::new(cfg)?;
    let uds = bind_unix(
        &cfg.daemon.socket,
        cfg.socket_mode()?,
        &cfg.daemon.socket_group,
    )
    .await?;
    let (tcp, tcp_addr) = bind_tcp(&cfg.daemon.tcp_listen, "daemon.tcp_listen").await?;

    let (health_reporter, health) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<proto::image_service_server::ImageServiceServer<Api>>()
        .await;
    health_reporter
        .set_serving::<proto::domain_service_server::DomainServiceServer<Api>>()
        .await;
    health_reporter
        .set_serving::<proto::operation_service_server::OperationServiceServer<Api>>()
        .await;
    health_reporter
        .set_serving::<proto::google::longrunning::operations_server::OperationsServer<Api>>()
        .await;
    // Reflection v1 (grpcurl) and v1alpha (Python's grpcio-reflection, older tools).
    let reflection_builder = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_err =
        |e| Error::new(ErrorKind::Internal, "building the reflection service").with_source(e);
    let reflection = reflection_builder().build_v1().map_err(reflection_err)?;
    let reflection_v1alpha = reflection_builder()
        .build_v1alpha()
        .map_err(reflection_err)?;

    let api = Api::new(ctl.clone());
    let router = || {
        Server::builder()
            .max_concurrent_streams(MAX_STREAMS_PER_CONNECTION)
            .layer(AuthLayer::new(trust.clone()))
            .add_service(health.clone())
            .add_service(reflection.clone())
            .add_service(reflection_v1alpha.clone())
            .add_service(
                proto::domain_service_server::DomainServiceServer::new(api.clone())
                    .max_decoding_message_size(MAX_REQUEST_BYTES)
                    .max_encoding_message_size(MAX_RESPONSE_BYTES),
            )
            .add_service(
                proto::image_service_server::ImageServiceServer::new(api.clone())
                    .max_decoding_message_size(MAX_REQUEST_BYTES)
                    .max_encoding_message_size(MAX_RESPONSE_BYTES),
            )
            .add_service(
                proto::operation_service_server::OperationServiceServer::new(api.clone())
                    .max_decoding_message_size(MAX_REQUEST_BYTES)
                    .max_encoding_message_size(MAX_RESPONSE_BYTES),
            )
            .add_service(
                proto::google::longrunning::operations_server::OperationsServer::new(api.clone())
                    .max_decoding_message_size(MAX_REQUEST_BYTES)
                    .max_encoding_message_size(MAX_RESPONSE_BYTES),
            )
    };

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    // The hypervisor the controller uses, probed without waiting.
    let probed = ctl.hypervisor();
    let watch_task = tokio::spawn(watch_hypervisor(
        health_reporter.clone(),
        probed,
        PROBE_PERIOD,
        stop_rx.clone(),
    ));
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let uds_task = tokio::spawn(
        router()
            .serve_with_incoming_shutdown(UnixListenerStream::new(uds), stopped(stop_rx.clone())),
    );
    let tcp_task = match (tcp, &cfg.tls) {
        (Some(l), Some(t)) => {
            let incoming = super::auth::tls::incoming(l, trust.clone(), t.handshake_timeout());
            Some(tokio::spawn(router().serve_with_incoming_shutdown(
                incoming,
                stopped(stop_rx.clone()),
            )))
        }
        (Some(_), None) => {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                "daemon.tcp_listen needs a [tls] section: TCP is served only with mutual TLS",
            ))
        }
        (None, _) => None,
    };
    let reload_task = stop
        .hangup
        .take()
        .map(|hup| tokio::spawn(reload_on_hangup(hup, file, trust.clone(), stop_rx.clone())));

    let policy = trust.policy();
    tracing::info!(
        socket = %cfg.daemon.socket.display(),
        tcp = %tcp_addr,
        policy = %if policy.is_empty() { "default (uid 0 is admin)".to_string() } else { format!("{} entries", policy.len()) },
        repository = %ctl.repository().root().display(),
        libvirt = %cfg.libvirt.uri,
        "imaged ready"
    );
    notify_systemd("READY=1\nSTATUS=serving");

    stop.wait().await;
    tracing::info!("stop requested: cancelling running operations");
    notify_systemd("STOPPING=1\nSTATUS=stopping");
    ctl.shutdown(STOP_GRACE).await;
    let _ = stop_tx.send(true);
    let _ = watch_task.await;
    if let Some(t) = reload_task {
        let _ = t.await;
    }
    let _ = uds_task.await;
    if let Some(t) = tcp_task {
        let _ = t.await;
    }
    let _ = std::fs::remove_file(&cfg.daemon.socket);
    tracing::info!("imaged stopped");
    Ok(())
}

/// The daemon's stop requests (SIGTERM, SIGINT) and reload requests (SIGHUP), listened for
/// from [`StopSignals::install`] on: install them before anything else, so no such signal
/// falls to its default action (which ends the process).
pub struct StopSignals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    /// SIGHUP, taken by [`serve`] for reloads.
    hangup: Option<tokio::signal::unix::Signal>,
}

impl StopSignals {
    /// Installs the handlers (needs a running tokio runtime).
    pub fn install() -> Result<StopSignals> {
        use tokio::signal::unix::{signal, SignalKind};
        let handler = |kind: SignalKind, name: &str| {
            signal(kind).map_err(|e| Error::io(format!("installing the {name} handler"), e))
        };
        Ok(StopSignals {
            term: handler(SignalKind::terminate(), "SIGTERM")?,
            int: handler(SignalKind::interrupt(), "SIGINT")?,
            hangup: Some(handler(SignalKind::hangup(), "SIGHUP")?),
        })
    }

    /// Returns at the first stop request.
    pub async fn wait(mut self) {
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
    }
}

/// Sends a state string to systemd's `NOTIFY_SOCKET` (a path, or `@name` for the abstract
/// namespace). Without the variable this does nothing.
pub fn notify_systemd(state: &str) {
    let Some(addr) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let addr = addr.to_string_lossy().into_owned();
    let sock = match std::os::unix::net::UnixDatagram::unbound() {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot notify systemd");
            return;
        }
    };
    let res = if let Some(name) = addr.strip_prefix('@') {
        use std::os::linux::net::SocketAddrExt;
        std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())
            .and_then(|a| sock.send_to_addr(state.as_bytes(), &a))
    } else {
        sock.send_to(state.as_bytes(), &addr)
    };
    if let Err(e) = res {
        tracing::warn!(socket = %addr, error = %e, "cannot notify systemd");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hypervisor::fake::FakeHypervisor;
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_server::Health;
    use tonic_health::pb::HealthCheckRequest;

    async fn status(svc: &tonic_health::server::HealthService, name: &str) -> ServingStatus {
        let req = tonic::Request::new(HealthCheckRequest {
            service: name.to_string(),
        });
        let r = svc.check(req).await.unwrap().into_inner();
        ServingStatus::try_from(r.status).unwrap()
    }

    async fn until(svc: &tonic_health::server::HealthService, name: &str, want: ServingStatus) {
        for _ in 0..200 {
            if status(svc, name).await == want {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("{name} never became {want:?}");
    }

    #[tokio::test]
    async fn domain_service_health_follows_the_hypervisor_and_nothing_else_does() {
        let (reporter, _) = tonic_health::server::health_reporter();
        reporter.set_serving::<DomainServer>().await;
        reporter
            .set_serving::<proto::image_service_server::ImageServiceServer<Api>>()
            .await;
        let svc = tonic_health::server::HealthService::from_health_reporter(reporter.clone());
        let hv = FakeHypervisor::default();
        hv.set_reachable(false);
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(watch_hypervisor(
            reporter,
            Arc::new(hv.clone()),
            Duration::from_millis(20),
            stop_rx,
        ));
        let domain = "imaged.v1.DomainService";
        let image = "imaged.v1.ImageService";
        until(&svc, domain, ServingStatus::NotServing).await;
        assert_eq!(status(&svc, image).await, ServingStatus::Serving);
        assert_eq!(status(&svc, "").await, ServingStatus::Serving);
        hv.set_reachable(true);
        until(&svc, domain, ServingStatus::Serving).await;
        stop_tx.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(2), task)
            .await
            .expect("the watch stops on request")
            .unwrap();
    }
}
