//! `imagerepo`: the central image repository server. Reads its config (every key has a
//! default), opens the catalog and the chunk store, serves the `imagerepo.v1` API until
//! SIGTERM.

use std::path::PathBuf;

use clap::Parser;

use imaged::imagerepo::config::{RepoConfig, DEFAULT_CONFIG_PATH};

/// The central image repository: hypervisor agents (`imaged`) send it only the chunks it
/// lacks, and control planes (and `imagectl repo`) manage its catalog of images: projects,
/// tags, quotas, sharing, the recycle bin, download links.
///
/// Every setting has a default, so `imagerepo` runs with no config file: data in
/// /var/lib/imagerepo (catalog.db, chunks/), the API on /run/imagerepo/imagerepo.sock where
/// uid 0 is admin. A config (TOML, default /etc/imagerepo/imagerepo.toml) adds a TCP listener
/// with mutual TLS (`[server] tcp_listen` and `[tls] cert, key, client_ca`), a policy of who
/// is admin, service or which project (`[[policy]] role = "project", project = "alpha",
/// tls_subjects = ["alpha-portal"]`), quotas (`[catalog] default_image_quota`), the recycle
/// bin's retention (`[catalog] recycle_bin_days`) and the collector (`[gc] gc_grace_secs,
/// interval_secs, upload_idle_secs`). Unknown keys are refused by name.
///
/// An admin runs the garbage collector at once with the ImageCatalog/RunGarbageCollection
/// call; it also runs every `[gc] interval_secs`.
#[derive(Parser)]
#[command(version, about, long_about)]
struct Args {
    /// Config file (TOML). The default path may be absent; an explicit one must exist.
    #[arg(short, long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Check the config, print the settings in effect and exit.
    #[arg(long)]
    check_config: bool,
}

fn main() -> std::process::ExitCode {
    imaged::util::tune_malloc_for_daemon();
    let args = Args::parse();
    let (path, required) = match &args.config {
        Some(p) => (p.clone(), true),
        None => (PathBuf::from(DEFAULT_CONFIG_PATH), false),
    };
    let cfg = match RepoConfig::load(&path, required) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("imagerepo: {}", e.chain());
            return std::process::ExitCode::from(2);
        }
    };
    if args.check_config {
        println!(
            "config: {}{}",
            path.display(),
            if path.exists() {
                ""
            } else {
                " (absent: defaults)"
            }
        );
        println!("catalog: {}", cfg.catalog_path().display());
        println!("chunks: {}", cfg.chunks_dir().display());
        println!("socket: {}", cfg.server.socket.display());
        println!(
            "tcp: {}",
            if cfg.server.tcp_listen.is_empty() {
                "(none)"
            } else {
                &cfg.server.tcp_listen
            }
        );
        println!(
            "policy: {}",
            if cfg.policy.is_empty() {
                "default (uid 0 on the socket is admin)".to_string()
            } else {
                format!("{} entries", cfg.policy.len())
            }
        );
        println!(
            "quota: {} images per project; recycle bin: {} days; gc: grace {} s, every {} s, idle uploads aborted after {} s",
            cfg.catalog.default_image_quota,
            cfg.catalog.recycle_bin_days,
            cfg.gc.gc_grace_secs,
            cfg.gc.interval_secs,
            cfg.gc.upload_idle_secs
        );
        return std::process::ExitCode::SUCCESS;
    }
    let level = cfg.log_level().unwrap_or(tracing::Level::INFO);
    // AuthorityHint: grpc-core clients (Python grpcio) over the unix socket get a log hint.
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    tracing_subscriber::fmt()
        .with_max_level(level)
        .with_target(false)
        .with_ansi(false)
        .with_writer(std::io::stderr)
        .finish()
        .with(imaged::api::authority_hint::AuthorityHint)
        .init();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("imagerepo: starting the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let res = rt.block_on(async {
        let stop = imaged::api::server::StopSignals::install()?;
        imaged::imagerepo::server::serve(&cfg, stop).await
    });
    match res {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e.chain(), "imagerepo failed");
            eprintln!("imagerepo: {}", e.chain());
            std::process::ExitCode::FAILURE
        }
    }
}
