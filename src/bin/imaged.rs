//! `imaged`: the host agent daemon. Reads its config, opens the repository, serves the gRPC
//! API on a unix socket until SIGTERM.

use std::path::PathBuf;
use std::sync::Arc;

use clap::Parser;

use imaged::config::{Config, DEFAULT_CONFIG_PATH};
use imaged::hypervisor::libvirt::Libvirt;
use imaged::ops::Controller;
use imaged::repo::Repository;

/// The imaged host agent: captures libvirt/QEMU guest disks into an image repository and
/// serves a gRPC API for a control plane (and for `imagectl`).
///
/// Every setting has a default, so `imaged` runs with no config file: libvirt at
/// qemu:///system, the repository in /var/lib/imaged/repo, the API on /run/imaged/imaged.sock.
#[derive(Parser)]
#[command(version, about, long_about)]
struct Args {
    /// Config file (TOML). The default path may be absent; an explicit one must exist.
    #[arg(short, long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Check the config, print the settings in effect and exit.
    #[arg(long)]
    check_config: bool,
    /// Override daemon.socket.
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// Override repository.path.
    #[arg(long, value_name = "DIR")]
    repository: Option<PathBuf>,
}

/// Holds (`block`) or releases SIGTERM, SIGINT and SIGHUP for the calling thread and every thread it
/// starts afterwards. `main` holds them from its first line, so a stop request that arrives while
/// the daemon starts waits, pending, until the handlers are installed, and is then served
/// gracefully instead of killing the process by the default action. Child processes start with
/// an empty mask (the standard library resets it before `exec`).
fn hold_stop_signals(block: bool) {
    // SAFETY: `set` is a plain C struct that sigemptyset initialises before any other use;
    // pthread_sigmask only changes the calling thread's mask and reads `set`.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGHUP);
        let how = if block {
            libc::SIG_BLOCK
        } else {
            libc::SIG_UNBLOCK
        };
        libc::pthread_sigmask(how, &set, std::ptr::null_mut());
    }
}

/// Takes a directory's lock (`<dir>/imaged.lock`, held for the daemon's life), or fails naming
/// the directory (`what`, its config key `key`) when another daemon holds it.
fn lock_dir(
    run_dir: &std::path::Path,
    what: &str,
    key: &str,
) -> imaged::error::Result<std::fs::File> {
    use imaged::error::{Error, ErrorKind};
    use std::os::unix::fs::OpenOptionsExt;
    use std::os::unix::io::AsRawFd;
    std::fs::create_dir_all(run_dir)
        .map_err(|e| Error::io(format!("creating {what} {}", run_dir.display()), e))?;
    let path = run_dir.join("imaged.lock");
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&path)
        .map_err(|e| Error::io(format!("opening {}", path.display()), e))?;
    // SAFETY: flock on a descriptor we own and keep open; no memory is involved.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        return Err(Error::new(
            ErrorKind::FailedPrecondition,
            format!(
                "another imaged uses {what} {} (it holds {}); stop it first, or give this one another {key}",
                run_dir.display(),
                path.display()
            ),
        )
        .with_source(std::io::Error::last_os_error()));
    }
    Ok(f)
}

fn main() -> std::process::ExitCode {
    imaged::util::tune_malloc_for_daemon();
    hold_stop_signals(true);
    let args = Args::parse();
    let (path, required) = match &args.config {
        Some(p) => (p.clone(), true),
        None => (PathBuf::from(DEFAULT_CONFIG_PATH), false),
    };
    let file = imaged::api::server::ConfigFile {
        path: path.clone(),
        required,
    };
    let mut cfg = match Config::load(&path, required) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("imaged: {}", e.chain());
            return std::process::ExitCode::from(2);
        }
    };
    if let Some(s) = args.socket {
        cfg.daemon.socket = s;
    }
    if let Some(r) = args.repository {
        cfg.repository.path = r;
    }
    if let Err(e) = cfg.validate() {
        eprintln!("imaged: {}", e.chain());
        return std::process::ExitCode::from(2);
    }
    // The TLS files and the policy are read now too, so --check-config catches a bad key.
    if let Err(e) = imaged::api::auth::Trust::new(&cfg) {
        eprintln!("imaged: {}", e.chain());
        return std::process::ExitCode::from(2);
    }
    if args.check_config {
        println!("{cfg:#?}");
        return std::process::ExitCode::SUCCESS;
    }
    let level = cfg.log_level().unwrap_or(tracing::Level::INFO);
    // Under systemd the journal adds timestamps; elsewhere keep them.
    let journal = std::env::var_os("JOURNAL_STREAM").is_some();
    let builder = tracing_subscriber::fmt()
        .with_max_level(level)
        .with_target(false)
        .with_ansi(false)
        .with_writer(std::io::stderr);
    // AuthorityHint: see imaged::api::authority_hint (grpc-core clients over the unix socket).
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let hint = imaged::api::authority_hint::AuthorityHint;
    if journal {
        builder.without_time().finish().with(hint).init();
    } else {
        builder.finish().with(hint).init();
    }

    // libvirt prints every failed call to stderr by default; our errors carry its message.
    virt::error::clear_error_callback();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("imaged: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let res = rt.block_on(async move {
        // The handlers first (this future runs on the main thread), then the signals are let
        // through: one that came during start-up is delivered now, to the handler.
        let stop = imaged::api::server::StopSignals::install()?;
        hold_stop_signals(false);
        // One daemon per run directory: a second one must not "recover" the captures the
        // first is running (thaw its guests mid-freeze, end its backup jobs).
        let _run_lock = lock_dir(&cfg.capture.run_dir, "run directory", "capture.run_dir")?;
        // Nor may it end the operations the first one runs as "interrupted".
        let _state_lock = lock_dir(&cfg.daemon.state_dir, "state directory", "daemon.state_dir")?;
        let hv = Arc::new(
            Libvirt::new(&cfg.libvirt.uri).with_reconnect_timeout(cfg.libvirt.reconnect_timeout()),
        );
        // Undo what captures of a previous run left (thaw guests, end backup jobs, restore
        // prep, start domains again) before anything else can fail: a full or read-only
        // repository must not keep a guest frozen.
        let journal = imaged::ops::journal::Journal::new(&cfg.capture.run_dir);
        journal.recover(hv.clone()).await;
        // Then what ended operations of that run left in the run directory (sockets, job
        // directories no entry names); entries still there go to janitors, which keep trying
        // while the daemon serves and hold their domains meanwhile.
        let unsure = journal.end_orphan_jobs(hv.clone()).await;
        journal.sweep_run_dir(&unsure);
        let repo = Repository::open(&cfg.repository.path)?;
        // The import and export directories, created and made real once.
        let mut cfg = cfg;
        cfg.resolve_paths()?;
        // Operations the previous run left unfinished are ended here, after recovery (their
        // messages say what recovery did) and before anything is served.
        let ctl = Controller::open(cfg.clone(), hv, repo)?;
        ctl.adopt_journal();
        imaged::api::server::serve(&cfg, ctl, stop, file).await
    });
    match res {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e.chain(), "imaged cannot run");
            eprintln!("imaged: {}", e.chain());
            std::process::ExitCode::FAILURE
        }
    }
}
