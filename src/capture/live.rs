//! Live captures: a running domain's disk, read from a point-in-time view.
//!
//! The hypervisor's pull-mode backup ([`Hypervisor::begin_pull_backup`]; libvirt's backup API,
//! see [`crate::hypervisor::libvirt::backup`]) exports the chosen disk over NBD on a unix
//! socket, frozen at the moment the job began; guest writes after that go on, with the old data
//! copied to a scratch file first (copy-before-write). The data path reads that export like any
//! other [`BlockSource`]. When the read ends, the job is ended ([`Hypervisor::end_backup`]) and
//! its directory (socket, scratch file) removed once the job is known gone (a job that could
//! not be ended keeps it: the capture's journal entry names it, and a janitor ends it). Each job gets its own directory,
//! `<run_dir>/backup-<tag>`, which the backend makes private to the hypervisor.
//!
//! The consistency point is [`begin`]: with `quiesce`, the guest's filesystems are frozen
//! (`guest-fsfreeze-freeze`) just before the job begins and thawed right after; the window is
//! measured. [`FreezeGuard`] thaws whatever else happens (an error, a hung agent that answers
//! late, a cancelled operation), and the journal lets a restarted daemon finish the job.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::source::{connect_unix, BlockSource, DiskReader, NbdReader};
use crate::error::{Error, ErrorKind, Result};
use crate::guest::agent::FreezeStatus;
use crate::hypervisor::{BackupBegun, BackupHandle, CheckpointPlan, Hypervisor};
use crate::nbd::{ConnectOptions, Extent, NbdClient};

/// Time allowed for one guest agent command while making sure a guest is thawed.
const AGENT_TIMEOUT: Duration = Duration::from_secs(5);

/// A running pull-mode backup job serving one disk of a domain.
pub struct BackupExport {
    hv: Arc<dyn Hypervisor>,
    domain: String,
    backup: BackupHandle,
    describe: String,
    ended: AtomicBool,
    /// An incremental job: the NBD meta context of its dirty bitmap.
    dirty_context: Option<String>,
}

/// What happened at the consistency point.
#[derive(Debug, Clone, Copy, Default)]
pub struct ConsistencyPoint {
    /// Filesystems frozen (0 without quiesce).
    pub frozen_filesystems: u32,
    /// Milliseconds between freeze and thaw (0 without quiesce).
    pub freeze_window_ms: u64,
}

/// Runs blocking hypervisor work off the async threads, with a time limit. A call that
/// overruns keeps its thread until libvirt returns, but the caller moves on.
async fn hv_call<T: Send + 'static>(
    limit: Duration,
    what: String,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    match tokio::time::timeout(limit, tokio::task::spawn_blocking(f)).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => {
            Err(Error::new(ErrorKind::Internal, format!("{what}: the task failed")).with_source(e))
        }
        Err(_) => Err(Error::new(
            ErrorKind::Unavailable,
            format!("{what}: no answer within {} s", limit.as_secs()),
        )),
    }
}

/// Begins a pull-mode backup of `disk` of running domain `domain`: the consistency point.
/// With `quiesce`, freezes the guest's filesystems first and thaws them right after the job
/// began (never later than `max_freeze`).
#[allow(clippy::too_many_arguments)]
pub async fn begin(
    hv: Arc<dyn Hypervisor>,
    domain: &str,
    disk: &str,
    all_disks: &[String],
    run_dir: &Path,
    tag: &str,
    quiesce: bool,
    max_freeze: Duration,
    checkpoints: CheckpointPlan,
) -> Result<(BackupExport, ConsistencyPoint, BackupBegun)> {
    let backup = hv.prepare_pull_backup(&run_dir.join(format!("backup-{tag}")), disk)?;
    let mut export = BackupExport {
        hv: hv.clone(),
        domain: domain.to_string(),
        backup: backup.clone(),
        describe: format!("domain {domain} disk {disk} (live backup)"),
        ended: AtomicBool::new(true),
        dirty_context: None,
    };
    let mut point = ConsistencyPoint::default();
    let mut guard = None;
    let t0 = Instant::now();
    if quiesce {
        let g = FreezeGuard::arm(hv.clone(), domain, max_freeze);
        let (h, d) = (hv.clone(), domain.to_string());
        // The freeze itself may outlast the bound (the agent syncs every filesystem first):
        // the guard then thaws at the bound, and the check below refuses the capture.
        match hv_call(
            max_freeze.max(Duration::from_secs(10)),
            format!("freezing the filesystems of domain {domain}"),
            move || h.fs_freeze(&d),
        )
        .await
        {
            Ok(n) => point.frozen_filesystems = n,
            Err(e) => {
                g.release().await;
                return Err(e);
            }
        }
        guard = Some(g);
    }
    let (h, d, disks) = (hv.clone(), domain.to_string(), all_disks.to_vec());
    let begun = hv_call(
        Duration::from_secs(60),
        format!("beginning the backup of domain {domain}"),
        move || h.begin_pull_backup(&d, &backup, &disks, &checkpoints),
    )
    .await;
    let mut in_time = true;
    if let Some(g) = guard {
        in_time = g.release().await;
        point.freeze_window_ms = t0.elapsed().as_millis() as u64;
    }
    let begun = begun?;
    export.ended.store(false, Ordering::SeqCst);
    if begun.since.is_some() {
        export.dirty_context = Some(BackupBegun::dirty_context(disk));
    }
    if !in_time {
        // The guard thawed the guest before the job began: the point in time the export shows
        // is not the frozen one. Never label such an image quiesced.
        let _ = export.end().await;
        return Err(Error::new(
            ErrorKind::Aborted,
            format!(
                "the backup job of domain {domain} began only after {} ms, past the {} ms freeze bound, \
                 so the guest was thawed before the consistency point and the image would not be quiesced; \
                 retry, raise capture.max_freeze_ms, or use mode crash-consistent",
                point.freeze_window_ms,
                max_freeze.as_millis()
            ),
        ));
    }
    tracing::info!(
        domain,
        disk,
        quiesce,
        freeze_window_ms = point.freeze_window_ms,
        "backup job began (consistency point)"
    );
    // QEMU opens the socket as the job starts; wait for it briefly.
    let t = Instant::now();
    while !export.backup.socket.exists() && t.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok((export, point, begun))
}

impl BackupExport {
    /// Ends the backup job and removes the scratch file and socket (once).
    pub async fn end(&self) -> Result<()> {
        if self.ended.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        let (h, d, b) = (self.hv.clone(), self.domain.clone(), self.backup.clone());
        let res = hv_call(
            Duration::from_secs(60),
            format!("ending the backup job of domain {}", self.domain),
            move || h.end_backup(&d, &b),
        )
        .await;
        // The directory goes only with the job: while the job may run, QEMU serves on its
        // socket and writes its scratch file, and the journal still names it.
        if job_gone(&res) {
            let _ = std::fs::remove_dir_all(&self.backup.dir);
        }
        res
    }

    /// The job's directory (socket and scratch file).
    pub fn dir(&self) -> &Path {
        &self.backup.dir
    }
}

impl Drop for BackupExport {
    fn drop(&mut self) {
        if !self.ended.swap(true, Ordering::SeqCst) {
            let (h, d, b) = (self.hv.clone(), self.domain.clone(), self.backup.clone());
            // Ending the job must not wait for an async context that may be gone.
            std::thread::spawn(move || {
                let res = h.end_backup(&d, &b);
                if let Err(e) = &res {
                    tracing::warn!(domain = %d, error = %e.chain(), "could not end backup job");
                }
                if job_gone(&res) {
                    let _ = std::fs::remove_dir_all(&b.dir);
                }
            });
        }
    }
}

/// True when the answer to ending a job says it no longer runs: ended, the domain gone, or
/// another tool's job running in its place (a domain runs one backup job at a time).
pub fn job_gone(res: &Result<()>) -> bool {
    match res {
        Ok(()) => true,
        Err(e) => matches!(
            e.kind(),
            ErrorKind::NotFound | ErrorKind::FailedPrecondition
        ),
    }
}

#[tonic::async_trait]
impl BlockSource for BackupExport {
    async fn reader(&self) -> Result<Box<dyn DiskReader>> {
        let c = connect_unix(&self.backup.socket, &self.backup.export, &self.describe).await?;
        Ok(Box::new(NbdReader::new(c, &self.describe)))
    }

    fn describe(&self) -> &str {
        &self.describe
    }

    async fn changed_map(&self) -> Result<Option<Vec<Extent>>> {
        let Some(context) = &self.dirty_context else {
            return Ok(None);
        };
        let opts = ConnectOptions {
            export_name: self.backup.export.clone(),
            meta_contexts: vec![context.clone()],
        };
        let what = || format!("reading the changed blocks of {}", self.describe);
        let mut c = NbdClient::connect_unix(&self.backup.socket, &opts)
            .await
            .map_err(|e| Error::new(ErrorKind::Unavailable, what()).with_source(e))?;
        let size = c.size();
        let map = c.allocation_map(context, 0, size).await;
        let _ = c.disconnect().await;
        map.map(Some)
            .map_err(|e| Error::new(ErrorKind::Internal, what()).with_source(e))
    }
}

/// Makes sure a frozen guest is thawed: [`FreezeGuard::release`] thaws at once; if that fails
/// (or the guard is dropped without release), a watchdog keeps asking the guest agent to thaw
/// until `guest-fsfreeze-status` says `thawed`, for as long as `max_freeze` plus two minutes,
/// so an agent that answers late cannot leave the guest frozen. When `max_freeze` passes
/// before the release, the guard *expires*: it thaws by itself, and `release` reports it, so
/// the caller knows the freeze did not cover what came after.
pub struct FreezeGuard {
    hv: Arc<dyn Hypervisor>,
    domain: String,
    released: bool,
    max_freeze: Duration,
    /// [`ARMED`], then [`RELEASED`] or [`EXPIRED`]: whichever side moves it first wins.
    state: Arc<AtomicU8>,
    deadline_task: Option<tokio::task::JoinHandle<()>>,
}

const ARMED: u8 = 0;
const RELEASED: u8 = 1;
const EXPIRED: u8 = 2;

impl FreezeGuard {
    /// Arms a guard: if not released within `max_freeze`, it thaws by itself.
    pub fn arm(hv: Arc<dyn Hypervisor>, domain: &str, max_freeze: Duration) -> FreezeGuard {
        let (h, d) = (hv.clone(), domain.to_string());
        let state = Arc::new(AtomicU8::new(ARMED));
        let st = state.clone();
        let deadline_task = tokio::spawn(async move {
            tokio::time::sleep(max_freeze).await;
            if st
                .compare_exchange(ARMED, EXPIRED, Ordering::SeqCst, Ordering::SeqCst)
                .is_err()
            {
                return; // released in time
            }
            tracing::warn!(domain = %d, max_freeze_ms = max_freeze.as_millis() as u64, "freeze window reached its bound; thawing");
            thaw_until_thawed(h, d, Duration::from_secs(120)).await;
        });
        FreezeGuard {
            hv,
            domain: domain.to_string(),
            released: false,
            max_freeze,
            state,
            deadline_task: Some(deadline_task),
        }
    }

    /// Thaws now. Returns when the guest is thawed or a background watchdog has taken over:
    /// true when released within the bound, false when the guard had already expired (and
    /// thawed the guest) before this call.
    pub async fn release(mut self) -> bool {
        self.released = true;
        let in_time = self
            .state
            .compare_exchange(ARMED, RELEASED, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok();
        if in_time {
            if let Some(t) = self.deadline_task.take() {
                t.abort();
            }
        }
        let (h, d) = (self.hv.clone(), self.domain.clone());
        let bound = self.max_freeze.max(Duration::from_secs(5));
        match hv_call(bound, format!("thawing domain {d}"), move || h.fs_thaw(&d)).await {
            Ok(_) => {}
            Err(e) => {
                tracing::error!(domain = %self.domain, error = %e.chain(), "thaw failed; a watchdog keeps trying");
                let (h, d) = (self.hv.clone(), self.domain.clone());
                let limit = self.max_freeze + Duration::from_secs(120);
                tokio::spawn(async move {
                    thaw_until_thawed(h, d, limit).await;
                });
            }
        }
        in_time
    }
}

impl Drop for FreezeGuard {
    fn drop(&mut self) {
        if !self.released {
            if let Some(t) = self.deadline_task.take() {
                t.abort();
            }
            let (h, d) = (self.hv.clone(), self.domain.clone());
            let limit = self.max_freeze + Duration::from_secs(120);
            std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build();
                if let Ok(rt) = rt {
                    rt.block_on(thaw_until_thawed(h, d, limit));
                }
            });
        }
    }
}

/// Asks the agent to thaw, and checks `guest-fsfreeze-status`, until it says `thawed` or
/// `limit` passes. True when the guest is confirmed thawed (or gone, so nothing is frozen).
pub async fn thaw_until_thawed(hv: Arc<dyn Hypervisor>, domain: String, limit: Duration) -> bool {
    let t0 = Instant::now();
    while t0.elapsed() < limit {
        let (h, d) = (hv.clone(), domain.clone());
        let status = hv_call(
            Duration::from_secs(10),
            "fsfreeze status".into(),
            move || {
                let agent = h.guest_agent(&d, AGENT_TIMEOUT)?;
                agent.fsfreeze_status().map(|s| (agent, s))
            },
        )
        .await;
        match status {
            Ok((_, FreezeStatus::Thawed)) => {
                tracing::info!(domain = %domain, "guest filesystems are thawed");
                return true;
            }
            Ok((agent, FreezeStatus::Frozen)) => {
                let _ = hv_call(Duration::from_secs(10), "thaw".into(), move || {
                    agent.fsfreeze_thaw()
                })
                .await;
            }
            Err(e) if e.kind() == ErrorKind::NotFound => return true, // the domain is gone
            Err(_) => {}
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    tracing::error!(domain = %domain, "could not confirm the guest is thawed; check with `virsh domfsinfo`/guest-fsfreeze-status");
    false
}
