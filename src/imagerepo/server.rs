//! Running the repository: opens the catalog and the chunk store, serves both services on the
//! unix socket (and on TCP with mutual TLS when `server.tcp_listen` is set, through the agent's
//! TLS listener [`crate::api::auth::tls::incoming`]), with gRPC health and reflection; runs
//! the collector periodically; tells systemd it is ready; stops cleanly on SIGTERM or SIGINT.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio_stream::wrappers::UnixListenerStream;
use tonic::transport::Server;

use super::catalog::{Catalog, Settings};
use super::chunks::{ChunkStore, LocalChunks};
use super::chunks_s3::S3Chunks;
use super::config::ChunksConfig;
use super::config::RepoConfig;
use super::download::{serve as serve_downloads, ImageSource, LinkSigner};
use super::identity::RepoPolicy;
use super::service::{Links, Repo, RepoService};
use super::source::RepoSource;
use crate::api::auth::{tls, Trust};
use crate::api::server::{bind_tcp, bind_unix, notify_systemd, StopSignals};
use crate::error::{Error, ErrorKind, Result};
use crate::proto;
use crate::proto::imagerepo::v1 as pb;

/// HTTP/2 streams one connection may have open at once.
const MAX_STREAMS_PER_CONNECTION: u32 = 1024;
/// Largest message accepted: a PutChunks piece (1 MiB) or 8192 manifest entries, with room.
const MAX_REQUEST_BYTES: usize = 4 << 20;

/// Opens what the server serves (catalog, chunks), checking the data directory.
pub fn open(cfg: &RepoConfig) -> Result<Arc<Repo>> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&cfg.server.data_dir)
        .map_err(|e| {
            Error::io(
                format!("creating server.data_dir {}", cfg.server.data_dir.display()),
                e,
            )
        })?;
    let settings = Settings {
        default_image_quota: cfg.catalog.default_image_quota,
        recycle_bin_days: cfg.catalog.recycle_bin_days,
    };
    let catalog = if cfg.catalog.is_postgres() {
        let pg = cfg.catalog.postgres_config()?;
        let catalog = Catalog::open_postgres(pg, settings)?;
        tracing::info!("the catalog is in PostgreSQL");
        catalog
    } else {
        Catalog::open(&cfg.catalog_path(), settings)?
    };
    let chunks: Arc<dyn ChunkStore> = match &cfg.chunks {
        ChunksConfig::Local => Arc::new(LocalChunks::open(&cfg.chunks_dir())?),
        ChunksConfig::S3(s3) => {
            // Called on a blocking thread (see `serve`): the store runs its requests on the
            // runtime of that thread's context, and a wrong endpoint or key stops the start.
            let store = S3Chunks::new(s3, tokio::runtime::Handle::current())?;
            store.check()?;
            tracing::info!(endpoint = %s3.endpoint, bucket = %s3.bucket, prefix = %s3.prefix,
                "chunks are kept in S3-compatible storage");
            Arc::new(store)
        }
    };
    Ok(Arc::new(Repo {
        catalog: Arc::new(catalog),
        chunks,
        policy: RepoPolicy::new(cfg.policy.clone()),
        gate: Arc::new(RwLock::new(())),
        gc: cfg.gc.clone(),
        links: std::sync::OnceLock::new(),
    }))
}

/// Runs the collector every `gc.interval_secs` until `stop`.
async fn periodic_gc(repo: Arc<Repo>, mut stop: tokio::sync::watch::Receiver<bool>) {
    let every = Duration::from_secs(repo.gc.interval_secs);
    if every.is_zero() {
        return;
    }
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            _ = tick.tick() => {}
        }
        let r = repo.clone();
        let res = tokio::task::spawn_blocking(move || {
            super::gc::collect(
                &r.catalog,
                r.chunks.as_ref(),
                &r.gate,
                &r.gc,
                crate::util::now_unix(),
            )
        })
        .await;
        match res {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::error!(error = %e.chain(), "garbage collection failed"),
            Err(e) => tracing::error!(error = %e, "garbage collection panicked"),
        }
    }
}

/// Serves until SIGTERM or SIGINT (`stop`, installed before anything else).
pub async fn serve(cfg: &RepoConfig, stop: StopSignals) -> Result<()> {
    // Opening may talk to the object store ([chunks] backend = "s3"): a blocking call.
    let repo = {
        let cfg = cfg.clone();
        tokio::task::spawn_blocking(move || open(&cfg))
            .await
            .map_err(|e| {
                Error::new(ErrorKind::Internal, "opening the repository panicked").with_source(e)
            })??
    };
    let uds = bind_unix(&cfg.server.socket, cfg.socket_mode()?, "").await?;
    let (tcp, tcp_addr) = bind_tcp(&cfg.server.tcp_listen, "server.tcp_listen").await?;

    let (health_reporter, health) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<pb::chunk_service_server::ChunkServiceServer<RepoService>>()
        .await;
    health_reporter
        .set_serving::<pb::image_catalog_server::ImageCatalogServer<RepoService>>()
        .await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| {
            Error::new(ErrorKind::Internal, "building the reflection service").with_source(e)
        })?;

    let svc = RepoService::new(repo.clone());
    let router = || {
        Server::builder()
            .max_concurrent_streams(MAX_STREAMS_PER_CONNECTION)
            .add_service(health.clone())
            .add_service(reflection.clone())
            .add_service(
                pb::chunk_service_server::ChunkServiceServer::new(svc.clone())
                    .max_decoding_message_size(MAX_REQUEST_BYTES),
            )
            .add_service(
                pb::image_catalog_server::ImageCatalogServer::new(svc.clone())
                    .max_decoding_message_size(MAX_REQUEST_BYTES),
            )
    };
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let uds_task = tokio::spawn(
        router()
            .serve_with_incoming_shutdown(UnixListenerStream::new(uds), stopped(stop_rx.clone())),
    );
    let tcp_task = match (tcp, &cfg.tls) {
        (Some(l), Some(t)) => {
            let trust = Trust::with_tls(Some(tls::server_config_from(
                &t.cert,
                &t.key,
                &t.client_ca,
            )?));
            let incoming = tls::incoming(l, trust, t.handshake_timeout());
            Some(tokio::spawn(router().serve_with_incoming_shutdown(
                incoming,
                stopped(stop_rx.clone()),
            )))
        }
        (Some(_), None) => {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                "server.tcp_listen needs a [tls] section: TCP is served only with mutual TLS",
            ))
        }
        (None, _) => None,
    };
    let gc_task = tokio::spawn(periodic_gc(repo.clone(), stop_rx.clone()));
    let download_task = if cfg.download.download_listen.is_empty() {
        None
    } else {
        let l = tokio::net::TcpListener::bind(&cfg.download.download_listen)
            .await
            .map_err(|e| {
                Error::io(
                    format!(
                        "binding download.download_listen {}",
                        cfg.download.download_listen
                    ),
                    e,
                )
            })?;
        let addr = l
            .local_addr()
            .map_err(|e| Error::io("reading the address of the download listener", e))?;
        let signer = Arc::new(LinkSigner::load_or_create(&cfg.download_key_path())?);
        let base_url = if cfg.download.public_base_url.is_empty() {
            format!("http://{addr}")
        } else {
            cfg.download
                .public_base_url
                .trim_end_matches('/')
                .to_string()
        };
        tracing::info!(%addr, base_url = %base_url, "download links enabled");
        let _ = repo.links.set(Links {
            signer: signer.clone(),
            base_url,
        });
        let source: Arc<dyn ImageSource> =
            Arc::new(RepoSource::new(repo.catalog.clone(), repo.chunks.clone()));
        Some(tokio::spawn(serve_downloads(
            l,
            signer,
            source,
            stopped(stop_rx.clone()),
        )))
    };

    tracing::info!(
        socket = %cfg.server.socket.display(),
        tcp = %tcp_addr,
        data = %cfg.server.data_dir.display(),
        policy = %if cfg.policy.is_empty() { "default (uid 0 is admin)".to_string() } else { format!("{} entries", cfg.policy.len()) },
        "imagerepo ready"
    );
    notify_systemd("READY=1\nSTATUS=serving");

    stop.wait().await;
    tracing::info!("stop requested");
    notify_systemd("STOPPING=1\nSTATUS=stopping");
    let _ = stop_tx.send(true);
    let _ = gc_task.await;
    if let Ok(Err(e)) = uds_task.await {
        tracing::warn!(error = %e, "unix socket server ended with an error");
    }
    if let Some(t) = tcp_task {
        let _ = t.await;
    }
    if let Some(t) = download_task {
        if let Ok(Err(e)) = t.await {
            tracing::warn!(error = %e.chain(), "download link server ended with an error");
        }
    }
    let _ = std::fs::remove_file(&cfg.server.socket);
    tracing::info!("imagerepo stopped");
    Ok(())
}
