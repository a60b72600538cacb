//! Live captures: a running domain's disk, read from a point-in-time view.
//!
//! libvirt's backup API in *pull* mode (`virDomainBackupBegin` with `<domainbackup
//! mode='pull'>`) makes QEMU export the chosen disk over NBD on a unix socket, frozen at the
//! moment the job began; guest writes after that go on, with the old data copied to a scratch
//! file first (copy-before-write). The data path reads that export like any other
//! [`BlockSource`]. When the read ends, the job is aborted (`virDomainAbortJob`) and the
//! scratch file removed.
//!
//! QEMU runs as the `libvirt-qemu` user and creates the socket and the scratch file itself, so
//! each backup gets its own directory owned by that user.
//!
//! The consistency point is [`begin`]: with `quiesce`, the guest's filesystems are frozen
//! (`guest-fsfreeze-freeze`) just before the job begins and thawed right after; the window is
//! measured. [`FreezeGuard`] thaws whatever else happens (an error, a hung agent that answers
//! late, a cancelled operation), and the journal lets a restarted daemon finish the job.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::source::{connect_unix, BlockSource};
use crate::error::{Error, ErrorKind, Result};
use crate::hypervisor::Hypervisor;
use crate::nbd::NbdClient;

/// The user QEMU runs as under `qemu:///system` on Debian.
const QEMU_USER: &str = "libvirt-qemu";

/// A running pull-mode backup job serving one disk of a domain.
pub struct BackupExport {
    hv: Arc<dyn Hypervisor>,
    domain: String,
    disk: String,
    dir: PathBuf,
    socket: PathBuf,
    describe: String,
    ended: AtomicBool,
}

/// What happened at the consistency point.
#[derive(Debug, Clone, Copy, Default)]
pub struct ConsistencyPoint {
    /// Filesystems frozen (0 without quiesce).
    pub frozen_filesystems: u32,
    /// Milliseconds between freeze and thaw (0 without quiesce).
    pub freeze_window_ms: u64,
}

/// Backup and checkpoint XML for a pull-mode backup of `disk` (others excluded).
pub fn backup_xml(dir: &Path, disk: &str, other_disks: &[String]) -> String {
    let esc = |s: &str| {
        s.replace('&', "&amp;")
            .replace('\'', "&apos;")
            .replace('<', "&lt;")
    };
    let mut x = format!(
        "<domainbackup mode='pull'>\n  <server transport='unix' socket='{}'/>\n  <disks>\n    \
         <disk name='{}' backup='yes' type='file'><scratch file='{}'/></disk>\n",
        esc(&dir.join("nbd.sock").to_string_lossy()),
        esc(disk),
        esc(&dir.join("scratch.qcow2").to_string_lossy())
    );
    for d in other_disks.iter().filter(|d| d.as_str() != disk) {
        x.push_str(&format!("    <disk name='{}' backup='no'/>\n", esc(d)));
    }
    x.push_str("  </disks>\n</domainbackup>\n");
    x
}

/// Creates the job's directory, owned by QEMU's user.
fn job_dir(run_dir: &Path, tag: &str) -> Result<PathBuf> {
    let dir = run_dir.join(format!("backup-{tag}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)
        .map_err(|e| Error::io(format!("creating backup directory {}", dir.display()), e))?;
    let ids = user_ids(QEMU_USER);
    let res = match ids {
        Some((uid, gid)) => std::os::unix::fs::chown(&dir, Some(uid), Some(gid)),
        None => {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777))
        }
    };
    res.map_err(|e| {
        Error::io(
            format!("handing backup directory {} to QEMU", dir.display()),
            e,
        )
    })?;
    // The parent must be traversable by QEMU's user.
    if let Some(parent) = dir.parent() {
        use std::os::unix::fs::PermissionsExt;
        if let Ok(md) = std::fs::metadata(parent) {
            let mode = md.permissions().mode();
            if mode & 0o001 == 0 {
                let _ =
                    std::fs::set_permissions(parent, std::fs::Permissions::from_mode(mode | 0o111));
            }
        }
    }
    Ok(dir)
}

fn user_ids(user: &str) -> Option<(u32, u32)> {
    let text = std::fs::read_to_string("/etc/passwd").ok()?;
    text.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.len() > 3 && f[0] == user).then(|| Some((f[2].parse().ok()?, f[3].parse().ok()?)))?
    })
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
) -> Result<(BackupExport, ConsistencyPoint)> {
    let dir = job_dir(run_dir, tag)?;
    let xml = backup_xml(&dir, disk, all_disks);
    let export = BackupExport {
        hv: hv.clone(),
        domain: domain.to_string(),
        disk: disk.to_string(),
        socket: dir.join("nbd.sock"),
        dir,
        describe: format!("domain {domain} disk {disk} (live backup)"),
        ended: AtomicBool::new(true),
    };
    let mut point = ConsistencyPoint::default();
    let mut guard = None;
    let t0 = Instant::now();
    if quiesce {
        let g = FreezeGuard::arm(hv.clone(), domain, max_freeze);
        let (h, d) = (hv.clone(), domain.to_string());
        match hv_call(
            max_freeze,
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
    let (h, d, x) = (hv.clone(), domain.to_string(), xml.clone());
    let begun = hv_call(
        Duration::from_secs(60),
        format!("beginning the backup of domain {domain}"),
        move || h.backup_begin(&d, &x, None),
    )
    .await;
    if let Some(g) = guard {
        g.release().await;
        point.freeze_window_ms = t0.elapsed().as_millis() as u64;
    }
    begun?;
    export.ended.store(false, Ordering::SeqCst);
    tracing::info!(
        domain,
        disk,
        quiesce,
        freeze_window_ms = point.freeze_window_ms,
        "backup job began (consistency point)"
    );
    // QEMU opens the socket as the job starts; wait for it briefly.
    let t = Instant::now();
    while !export.socket.exists() && t.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok((export, point))
}

impl BackupExport {
    /// Ends the backup job and removes the scratch file and socket (once).
    pub async fn end(&self) -> Result<()> {
        if self.ended.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        let (h, d) = (self.hv.clone(), self.domain.clone());
        let res = hv_call(
            Duration::from_secs(60),
            format!("ending the backup job of domain {}", self.domain),
            move || h.backup_end(&d),
        )
        .await;
        let _ = std::fs::remove_dir_all(&self.dir);
        res
    }

    /// The job's directory (socket and scratch file).
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for BackupExport {
    fn drop(&mut self) {
        if !self.ended.swap(true, Ordering::SeqCst) {
            let (h, d, dir) = (self.hv.clone(), self.domain.clone(), self.dir.clone());
            // Ending the job must not wait for an async context that may be gone.
            std::thread::spawn(move || {
                if let Err(e) = h.backup_end(&d) {
                    tracing::warn!(domain = %d, error = %e.chain(), "could not end backup job");
                }
                let _ = std::fs::remove_dir_all(dir);
            });
        }
    }
}

#[tonic::async_trait]
impl BlockSource for BackupExport {
    async fn connect(&self) -> Result<NbdClient> {
        connect_unix(&self.socket, &self.disk, &self.describe).await
    }

    fn describe(&self) -> &str {
        &self.describe
    }
}

/// Makes sure a frozen guest is thawed: [`FreezeGuard::release`] thaws at once; if that fails
/// (or the guard is dropped without release), a watchdog keeps asking the guest agent to thaw
/// until `guest-fsfreeze-status` says `thawed`, for as long as `max_freeze` plus two minutes,
/// so an agent that answers late cannot leave the guest frozen.
pub struct FreezeGuard {
    hv: Arc<dyn Hypervisor>,
    domain: String,
    released: bool,
    max_freeze: Duration,
    deadline_task: Option<tokio::task::JoinHandle<()>>,
}

impl FreezeGuard {
    /// Arms a guard: if not released within `max_freeze`, it thaws by itself.
    pub fn arm(hv: Arc<dyn Hypervisor>, domain: &str, max_freeze: Duration) -> FreezeGuard {
        let (h, d) = (hv.clone(), domain.to_string());
        let deadline_task = tokio::spawn(async move {
            tokio::time::sleep(max_freeze).await;
            tracing::warn!(domain = %d, "freeze window exceeded its bound; thawing");
            thaw_until_thawed(h, d, Duration::from_secs(120)).await;
        });
        FreezeGuard {
            hv,
            domain: domain.to_string(),
            released: false,
            max_freeze,
            deadline_task: Some(deadline_task),
        }
    }

    /// Thaws now. Returns when the guest is thawed or a background watchdog has taken over.
    pub async fn release(mut self) {
        self.released = true;
        if let Some(t) = self.deadline_task.take() {
            t.abort();
        }
        let (h, d) = (self.hv.clone(), self.domain.clone());
        let bound = self.max_freeze.max(Duration::from_secs(5));
        match hv_call(bound, format!("thawing domain {d}"), move || h.fs_thaw(&d)).await {
            Ok(_) => {}
            Err(e) => {
                tracing::error!(domain = %self.domain, error = %e.chain(), "thaw failed; a watchdog keeps trying");
                tokio::spawn(thaw_until_thawed(
                    self.hv.clone(),
                    self.domain.clone(),
                    self.max_freeze + Duration::from_secs(120),
                ));
            }
        }
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
/// `limit` passes.
pub async fn thaw_until_thawed(hv: Arc<dyn Hypervisor>, domain: String, limit: Duration) {
    let t0 = Instant::now();
    while t0.elapsed() < limit {
        let (h, d) = (hv.clone(), domain.clone());
        let status = hv_call(
            Duration::from_secs(10),
            "fsfreeze status".into(),
            move || h.agent_command(&d, r#"{"execute":"guest-fsfreeze-status"}"#, 5),
        )
        .await;
        match status {
            Ok(s) if s.contains("thawed") => {
                tracing::info!(domain = %domain, "guest filesystems are thawed");
                return;
            }
            Ok(_) => {
                let (h, d) = (hv.clone(), domain.clone());
                let _ = hv_call(Duration::from_secs(10), "thaw".into(), move || {
                    h.agent_command(&d, r#"{"execute":"guest-fsfreeze-thaw"}"#, 5)
                })
                .await;
            }
            Err(e) if e.kind() == ErrorKind::NotFound => return, // the domain is gone
            Err(_) => {}
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    tracing::error!(domain = %domain, "could not confirm the guest is thawed; check with `virsh domfsinfo`/guest-fsfreeze-status");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backup_xml_names_the_disk_and_excludes_the_rest() {
        let x = backup_xml(
            Path::new("/run/imaged/nbd/backup-op1"),
            "vda",
            &["vda".into(), "vdb".into()],
        );
        assert!(x.contains("<domainbackup mode='pull'>"));
        assert!(x.contains("socket='/run/imaged/nbd/backup-op1/nbd.sock'"));
        assert!(x.contains("<disk name='vda' backup='yes' type='file'><scratch file='/run/imaged/nbd/backup-op1/scratch.qcow2'/>"));
        assert!(x.contains("<disk name='vdb' backup='no'/>"));
    }
}
