//! Live captures: a running domain's disk, read from a point-in-time view.
//!
//! libvirt's backup API in *pull* mode (`virDomainBackupBegin` with `<domainbackup
//! mode='pull'>`) makes QEMU export the chosen disk over NBD on a unix socket, frozen at the
//! moment the job began; guest writes after that go on, with the old data copied to a scratch
//! file first (copy-before-write). The data path reads that export like any other
//! [`BlockSource`]. When the read ends, the job is aborted (`virDomainAbortJob`) and the
//! scratch file removed.
//!
//! QEMU creates the socket and the scratch file itself, as the user libvirt runs it as (`user`
//! in `/etc/libvirt/qemu.conf`; by default `libvirt-qemu` on Debian, `qemu` on RHEL and SUSE), so
//! each backup gets its own directory, mode 0700, owned by that user. When that user cannot be
//! found the capture is refused: a directory anyone could write would let a local user replace
//! the NBD socket and feed chosen bytes into the image.
//!
//! The consistency point is [`begin`]: with `quiesce`, the guest's filesystems are frozen
//! (`guest-fsfreeze-freeze`) just before the job begins and thawed right after; the window is
//! measured. [`FreezeGuard`] thaws whatever else happens (an error, a hung agent that answers
//! late, a cancelled operation), and the journal lets a restarted daemon finish the job.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::source::{connect_unix, BlockSource};
use crate::error::{Error, ErrorKind, Result};
use crate::hypervisor::Hypervisor;
use crate::nbd::NbdClient;

/// libvirt's QEMU driver configuration, where the user QEMU runs as is set.
const QEMU_CONF: &str = "/etc/libvirt/qemu.conf";
/// The users libvirt runs QEMU as when `qemu.conf` names none: Debian's, then RHEL's and SUSE's.
const DEFAULT_QEMU_USERS: [&str; 2] = ["libvirt-qemu", "qemu"];

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

/// Creates the job's directory, mode 0700, owned by the user and group QEMU runs as.
fn job_dir(run_dir: &Path, tag: &str) -> Result<PathBuf> {
    let conf = std::fs::read_to_string(QEMU_CONF).unwrap_or_default();
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    let group = std::fs::read_to_string("/etc/group").unwrap_or_default();
    let (uid, gid) = qemu_ids(&conf, &passwd, &group)?;
    let dir = run_dir.join(format!("backup-{tag}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(run_dir)
        .map_err(|e| Error::io(format!("creating run directory {}", run_dir.display()), e))?;
    {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .map_err(|e| Error::io(format!("creating backup directory {}", dir.display()), e))?;
    }
    std::os::unix::fs::chown(&dir, Some(uid), Some(gid)).map_err(|e| {
        Error::io(
            format!("handing backup directory {} to QEMU", dir.display()),
            e,
        )
    })?;
    // The parent must be traversable (not listable, not writable) by QEMU's user.
    use std::os::unix::fs::PermissionsExt;
    if let Ok(md) = std::fs::metadata(run_dir) {
        let mode = md.permissions().mode();
        if mode & 0o001 == 0 {
            let _ =
                std::fs::set_permissions(run_dir, std::fs::Permissions::from_mode(mode | 0o001));
        }
    }
    Ok(dir)
}

/// The uid and gid QEMU runs as, from the texts of `qemu.conf`, `/etc/passwd` and `/etc/group`:
/// `user`/`group` when `qemu.conf` sets them (a name, or `+N` for a number), else the first of
/// [`DEFAULT_QEMU_USERS`] that exists, with its primary group. FAILED_PRECONDITION when none
/// can be found.
pub fn qemu_ids(conf: &str, passwd: &str, group: &str) -> Result<(u32, u32)> {
    let setting = |key: &str| {
        conf.lines().find_map(|l| {
            let l = l.trim();
            let (k, v) = l.split_once('=')?;
            (k.trim() == key).then(|| v.trim().trim_matches('"').to_string())
        })
    };
    let user_entry = |name: &str| -> Option<(u32, u32)> {
        passwd.lines().find_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            (f.len() > 3 && f[0] == name).then(|| Some((f[2].parse().ok()?, f[3].parse().ok()?)))?
        })
    };
    let unknown = |what: String| {
        Error::new(
            ErrorKind::FailedPrecondition,
            format!(
                "cannot tell which user QEMU runs as: {what}; set `user` and `group` in {QEMU_CONF} \
                 to the user libvirt runs QEMU as"
            ),
        )
    };
    let (uid, primary_gid) = match setting("user") {
        Some(u) => match u.strip_prefix('+') {
            Some(n) => {
                let uid: u32 = n
                    .parse()
                    .map_err(|_| unknown(format!("{QEMU_CONF} sets user = \"{u}\"")))?;
                let gid = passwd
                    .lines()
                    .find_map(|l| {
                        let f: Vec<&str> = l.split(':').collect();
                        (f.len() > 3 && f[2] == n).then(|| f[3].parse().ok())?
                    })
                    .unwrap_or(uid);
                (uid, gid)
            }
            None => user_entry(&u).ok_or_else(|| {
                unknown(format!(
                    "{QEMU_CONF} sets user = \"{u}\", which is not a user of this host"
                ))
            })?,
        },
        None => DEFAULT_QEMU_USERS
            .iter()
            .find_map(|u| user_entry(u))
            .ok_or_else(|| {
                unknown(format!(
                    "{QEMU_CONF} sets no user and none of {} exists",
                    DEFAULT_QEMU_USERS.join(", ")
                ))
            })?,
    };
    let gid = match setting("group") {
        None => primary_gid,
        Some(g) => match g.strip_prefix('+') {
            Some(n) => n
                .parse()
                .map_err(|_| unknown(format!("{QEMU_CONF} sets group = \"{g}\"")))?,
            None => group
                .lines()
                .find_map(|l| {
                    let f: Vec<&str> = l.split(':').collect();
                    (f.len() > 2 && f[0] == g).then(|| f[2].parse().ok())?
                })
                .ok_or_else(|| {
                    unknown(format!(
                        "{QEMU_CONF} sets group = \"{g}\", which is not a group of this host"
                    ))
                })?,
        },
    };
    Ok((uid, gid))
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
    let (h, d, x) = (hv.clone(), domain.to_string(), xml.clone());
    let begun = hv_call(
        Duration::from_secs(60),
        format!("beginning the backup of domain {domain}"),
        move || h.backup_begin(&d, &x, None),
    )
    .await;
    let mut in_time = true;
    if let Some(g) = guard {
        in_time = g.release().await;
        point.freeze_window_ms = t0.elapsed().as_millis() as u64;
    }
    begun?;
    export.ended.store(false, Ordering::SeqCst);
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
        let (h, d, sock) = (self.hv.clone(), self.domain.clone(), self.socket.clone());
        let res = hv_call(
            Duration::from_secs(60),
            format!("ending the backup job of domain {}", self.domain),
            move || h.backup_end(&d, &sock),
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
            let sock = self.socket.clone();
            // Ending the job must not wait for an async context that may be gone.
            std::thread::spawn(move || {
                if let Err(e) = h.backup_end(&d, &sock) {
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
            move || h.agent_command(&d, r#"{"execute":"guest-fsfreeze-status"}"#, 5),
        )
        .await;
        match status {
            Ok(s) if s.contains("thawed") => {
                tracing::info!(domain = %domain, "guest filesystems are thawed");
                return true;
            }
            Ok(_) => {
                let (h, d) = (hv.clone(), domain.clone());
                let _ = hv_call(Duration::from_secs(10), "thaw".into(), move || {
                    h.agent_command(&d, r#"{"execute":"guest-fsfreeze-thaw"}"#, 5)
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

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/bash\nlibvirt-qemu:x:64055:108:Libvirt Qemu:/var/lib/libvirt:/usr/sbin/nologin\nqemu:x:107:107:qemu user:/:/sbin/nologin\n";
    const GROUP: &str = "root:x:0:\nkvm:x:108:\nqemu:x:107:\n";

    #[test]
    fn qemu_user_comes_from_qemu_conf_else_the_distribution_default() {
        // Debian: commented defaults, libvirt-qemu exists.
        let debian = "#user = \"libvirt-qemu\"\n#group = \"libvirt-qemu\"\n";
        assert_eq!(qemu_ids(debian, PASSWD, GROUP).unwrap(), (64055, 108));
        // RHEL/SUSE: only qemu exists.
        let rhel_passwd = "root:x:0:0::/:/bin/sh\nqemu:x:107:107::/:/sbin/nologin\n";
        assert_eq!(qemu_ids("", rhel_passwd, GROUP).unwrap(), (107, 107));
        // Set explicitly, by name and by number.
        let conf = "user = \"qemu\"\ngroup = \"kvm\"\n";
        assert_eq!(qemu_ids(conf, PASSWD, GROUP).unwrap(), (107, 108));
        assert_eq!(
            qemu_ids("user = \"+0\"\ngroup = \"+0\"", PASSWD, GROUP).unwrap(),
            (0, 0)
        );
    }

    #[test]
    fn an_unknown_qemu_user_is_refused_never_guessed() {
        let e = qemu_ids("", "root:x:0:0::/:/bin/sh\n", GROUP).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::FailedPrecondition);
        assert!(e.to_string().contains("libvirt-qemu, qemu"), "{e}");
        let e = qemu_ids("user = \"nobody-here\"", PASSWD, GROUP).unwrap_err();
        assert!(e.to_string().contains("nobody-here"), "{e}");
        let e = qemu_ids("user = \"qemu\"\ngroup = \"nogroup\"", PASSWD, GROUP).unwrap_err();
        assert!(e.to_string().contains("nogroup"), "{e}");
    }

    #[test]
    fn the_backup_directory_is_private_to_qemu() {
        let d = tempfile::tempdir().unwrap();
        let dir = job_dir(d.path(), "op-t").unwrap();
        use std::os::unix::fs::MetadataExt;
        let md = std::fs::metadata(&dir).unwrap();
        assert_eq!(md.mode() & 0o777, 0o700, "mode {:o}", md.mode());
        let conf = std::fs::read_to_string(QEMU_CONF).unwrap_or_default();
        let passwd = std::fs::read_to_string("/etc/passwd").unwrap();
        let group = std::fs::read_to_string("/etc/group").unwrap();
        let (uid, gid) = qemu_ids(&conf, &passwd, &group).unwrap();
        assert_eq!((md.uid(), md.gid()), (uid, gid));
    }
}
