//! The capture journal: what a running capture did to a guest that a restarted daemon must
//! undo or finish. Each duty is recorded *before* the step that creates it and cleared only
//! once it is done:
//!
//! - `frozen`: the guest's filesystems may be frozen → thaw until the agent says thawed;
//! - `backup_dir`: a pull-mode backup job may run, exporting on `backup_dir/nbd.sock` → end it
//!   (only that job: a job another tool started is never aborted) and remove the directory;
//! - `restart`: a shutdown capture shut the guest down and was asked to start it again →
//!   start it;
//! - `checkpoints`: a live capture's backup job defined checkpoint records on the domain (the
//!   new checkpoint, and the earlier one the job counted from) → delete them once the job is
//!   over, each with or without its bitmap as the capture got (a shut-off domain with
//!   checkpoint records cannot be undefined);
//! - `prep`: prep steps were applied in the source guest and are to be undone (restore-source,
//!   or the capture failed) → restore them through the guest agent, from the backups inside
//!   the guest or, when those are gone (the guest rebooted: they live on its `/run`), from the
//!   original contents kept in the entry itself.
//!
//! One small JSON file per capture under `<run_dir>/journal/` (temp + fsync + rename). It lives
//! under `/run`: after a host reboot nothing is frozen and no job runs. An entry is removed only
//! once each of its duties is confirmed done ([`Journal::settle`]), whether the capture
//! succeeded, failed or was cancelled: a duty the capture could not confirm in line (libvirtd
//! restarting, an agent not answering) stays, and once the operation has ended the
//! controller's janitor retries it with a backoff while holding the domain. At start the daemon
//! [`Journal::recover`]s every entry before it opens the repository or serves a call (thaws
//! first: a freeze is urgent), ends jobs of ours no entry names any more
//! ([`Journal::end_orphan_jobs`]), then [`Journal::sweep_run_dir`] removes what ended operations
//! left in the run directory, and the entries still there go to janitors. A prep restore in a
//! guest left shut off is deferred to a later start without holding the domain.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::capture::live::thaw_until_thawed;
use crate::error::{Error, Result};
use crate::guest::agent::DEFAULT_COMMAND_TIMEOUT;
use crate::guest::prep::StepOutcome;
use crate::hypervisor::{BackupHandle, DomainState, Hypervisor};
use crate::util;

/// The duties one capture in progress leaves if the daemon dies.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct Entry {
    pub op: String,
    pub domain: String,
    /// The backup job's directory (socket, scratch file); empty when no job was begun.
    #[serde(default)]
    pub backup_dir: PathBuf,
    /// Set before the freeze, cleared after the thaw.
    #[serde(default)]
    pub frozen: bool,
    /// Start the domain again (a shutdown capture with restart).
    #[serde(default)]
    pub restart: bool,
    /// The guest was asked to shut down (set just before): recovery lets it finish before it
    /// starts the guest or touches its files.
    #[serde(default)]
    pub shutting_down: bool,
    /// Checkpoint records on the domain to delete once the backup job is over.
    #[serde(default)]
    pub checkpoints: Vec<CheckpointRecord>,
    /// Prep applied in the source and still to be undone.
    #[serde(default)]
    pub prep: Option<Vec<StepOutcome>>,
    pub started_at: i64,
}

/// A checkpoint record a capture's backup job defined, and what deleting it takes.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CheckpointRecord {
    pub name: String,
    /// Keep the dirty bitmap in the image: it is the base the next capture counts from.
    pub keep_bitmap: bool,
}

impl Entry {
    /// An entry with no duty yet.
    pub fn new(op: &str, domain: &str) -> Entry {
        Entry {
            op: op.to_string(),
            domain: domain.to_string(),
            started_at: util::now_unix(),
            ..Entry::default()
        }
    }

    fn has_duties(&self) -> bool {
        self.frozen
            || !self.backup_dir.as_os_str().is_empty()
            || self.restart
            || !self.checkpoints.is_empty()
            || self.prep.is_some()
    }

    /// Sets how checkpoint `name`'s record is to be deleted (a record not listed is added);
    /// true when that changed the entry.
    pub fn checkpoint_duty(&mut self, name: &str, keep_bitmap: bool) -> bool {
        match self.checkpoints.iter_mut().find(|c| c.name == name) {
            Some(c) if c.keep_bitmap == keep_bitmap => false,
            Some(c) => {
                c.keep_bitmap = keep_bitmap;
                true
            }
            None => {
                self.checkpoints.push(CheckpointRecord {
                    name: name.to_string(),
                    keep_bitmap,
                });
                true
            }
        }
    }
}

/// A hypervisor call run on the blocking pool during recovery.
type HvCall = Box<dyn FnOnce(&dyn Hypervisor) -> Result<()> + Send>;

/// Runs one hypervisor call on the blocking pool (libvirt's API blocks).
async fn blocking_call(hv: Arc<dyn Hypervisor>, f: HvCall) -> Result<()> {
    tokio::task::spawn_blocking(move || f(hv.as_ref()))
        .await
        .unwrap_or_else(|_| Err(crate::error::internal("a recovery task failed")))
}

/// The journal directory.
#[derive(Debug, Clone)]
pub struct Journal {
    dir: PathBuf,
}

/// How long recovery waits for a restarted guest's agent before it leaves a prep restore for
/// the next start.
const RECOVERY_AGENT_WAIT: Duration = Duration::from_secs(180);

impl Journal {
    /// The journal under `run_dir`.
    pub fn new(run_dir: &Path) -> Journal {
        Journal {
            dir: run_dir.join("journal"),
        }
    }

    fn path(&self, op: &str) -> PathBuf {
        self.dir.join(format!("{op}.json"))
    }

    /// Records (or updates) an entry durably; an entry with no duty left is removed.
    pub fn write(&self, e: &Entry) -> Result<()> {
        if !e.has_duties() {
            self.remove(&e.op);
            return Ok(());
        }
        {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&self.dir)
                .map_err(|err| {
                    Error::io(format!("creating journal {}", self.dir.display()), err)
                })?;
        }
        let json = serde_json::to_vec(e).unwrap_or_default();
        util::write_atomic(&self.path(&e.op), &json)
    }

    /// Records an entry; on failure only logs (the in-memory duty still runs, and a journal
    /// that cannot be written is reported by the writes that must succeed).
    pub fn update(&self, e: &Entry) {
        if let Err(err) = self.write(e) {
            tracing::error!(op = %e.op, domain = %e.domain, error = %err.chain(), "cannot update the capture journal");
        }
    }

    /// Forgets an entry.
    pub fn remove(&self, op: &str) {
        let _ = std::fs::remove_file(self.path(op));
    }

    /// Every entry left behind. Unreadable files are named in the log and left in place.
    pub fn entries(&self) -> Vec<Entry> {
        let Ok(rd) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for f in rd.flatten() {
            let p = f.path();
            if !f.file_name().to_string_lossy().ends_with(".json") {
                continue;
            }
            match std::fs::read(&p)
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok())
            {
                Some(e) => out.push(e),
                None => {
                    tracing::error!(file = %p.display(), "capture journal entry cannot be read; left in place for an admin")
                }
            }
        }
        out
    }

    /// The entry of operation `op`, if one is on disk.
    pub fn get(&self, op: &str) -> Option<Entry> {
        let b = std::fs::read(self.path(op)).ok()?;
        serde_json::from_slice(&b).ok()
    }

    /// Carries out what dead captures left: thaws, ends their backup jobs, starts domains
    /// again, restores prep. An entry goes once all its duties are done; what cannot be done
    /// yet stays (a [`crate::ops::Controller`] janitor keeps trying once the daemon serves).
    pub async fn recover(&self, hv: Arc<dyn Hypervisor>) {
        // Every frozen guest first: a freeze is the most urgent duty, and the slow ones
        // (waiting for a guest to shut down or boot) must not keep another guest frozen.
        let mut later = Vec::new();
        for mut e in self.entries() {
            tracing::warn!(op = %e.op, domain = %e.domain, frozen = e.frozen, backup = !e.backup_dir.as_os_str().is_empty(),
                restart = e.restart, checkpoints = e.checkpoints.len(), prep = e.prep.is_some(), "recovering a capture left by a previous run");
            self.clear_if_off(&hv, &mut e).await;
            if e.frozen {
                if !thaw_until_thawed(hv.clone(), e.domain.clone(), Duration::from_secs(30)).await {
                    tracing::error!(op = %e.op, domain = %e.domain, "the guest could not be confirmed thawed; the journal entry stays");
                    continue;
                }
                e.frozen = false;
                self.update(&e);
            }
            later.push(e);
        }
        for e in later {
            let (op, domain) = (e.op.clone(), e.domain.clone());
            match self.settle(hv.clone(), e).await {
                Cleanup::Done => {
                    tracing::info!(op = %op, domain = %domain, "capture of a previous run cleaned up")
                }
                Cleanup::Retry(err) => {
                    tracing::error!(op = %op, domain = %domain, error = %err.chain(), "cleanup not confirmed yet; the journal entry stays and is retried")
                }
                Cleanup::Deferred(why) => {
                    tracing::warn!(op = %op, domain = %domain, "{why}")
                }
            }
        }
    }

    /// A freeze and a backup job live in the QEMU process: a domain that is off (or gone) has
    /// neither, so both duties are cleared at once instead of retried.
    async fn clear_if_off(&self, hv: &Arc<dyn Hypervisor>, e: &mut Entry) {
        if e.frozen || !e.backup_dir.as_os_str().is_empty() {
            let (h, d) = (hv.clone(), e.domain.clone());
            let state = tokio::task::spawn_blocking(move || h.domain_state(&d)).await;
            let off = match state {
                Ok(Ok(s)) => s == DomainState::ShutOff,
                Ok(Err(err)) => err.kind() == crate::error::ErrorKind::NotFound,
                Err(_) => false,
            };
            if off {
                tracing::info!(op = %e.op, domain = %e.domain, "the domain is off: its QEMU took the freeze and the backup job with it");
                e.frozen = false;
                if !e.backup_dir.as_os_str().is_empty() && e.backup_dir.starts_with(self.run_dir())
                {
                    let _ = std::fs::remove_dir_all(&e.backup_dir);
                }
                e.backup_dir = PathBuf::new();
                self.update(e);
            }
        }
    }

    /// Carries out every duty of `e` that is left, in order (thaw, end the backup job, let a
    /// shutdown finish, start again, restore prep), recording each one done as it is
    /// confirmed; the entry is removed once none is left. Never call it for an entry whose
    /// operation still runs.
    pub async fn settle(&self, hv: Arc<dyn Hypervisor>, mut e: Entry) -> Cleanup {
        let call = |f: HvCall| blocking_call(hv.clone(), f);
        self.clear_if_off(&hv, &mut e).await;
        if e.frozen {
            if !thaw_until_thawed(hv.clone(), e.domain.clone(), Duration::from_secs(30)).await {
                return Cleanup::Retry(Error::new(
                    crate::error::ErrorKind::Unavailable,
                    format!(
                        "the guest of domain {} could not be confirmed thawed",
                        e.domain
                    ),
                ));
            }
            e.frozen = false;
            self.update(&e);
        }
        if !e.backup_dir.as_os_str().is_empty() {
            let (d, job) = (e.domain.clone(), BackupHandle::in_dir(&e.backup_dir, ""));
            match call(Box::new(move |h| h.end_backup(&d, &job))).await {
                Ok(()) => tracing::info!(op = %e.op, domain = %e.domain, "backup job ended"),
                Err(err) if err.kind() == crate::error::ErrorKind::NotFound => {}
                Err(err) if err.kind() == crate::error::ErrorKind::FailedPrecondition => {
                    // Another tool's job: not ours to end, and ours is gone.
                    tracing::warn!(op = %e.op, domain = %e.domain, error = %err.chain(), "left another backup job alone");
                }
                Err(err) => {
                    return Cleanup::Retry(
                        Error::new(
                            err.kind(),
                            format!(
                                "ending the backup job of operation {} on domain {}",
                                e.op, e.domain
                            ),
                        )
                        .with_source(err),
                    );
                }
            }
            // Only directories of our own run dir are removed.
            if e.backup_dir.starts_with(self.run_dir()) {
                let _ = std::fs::remove_dir_all(&e.backup_dir);
            }
            e.backup_dir = PathBuf::new();
            self.update(&e);
        }
        // A checkpoint a running job uses cannot be deleted: the job is over by now.
        for c in e.checkpoints.clone() {
            let (d, name, keep) = (e.domain.clone(), c.name.clone(), c.keep_bitmap);
            match call(Box::new(move |h| h.delete_checkpoint(&d, &name, keep))).await {
                Ok(()) => {
                    tracing::info!(op = %e.op, domain = %e.domain, checkpoint = %c.name, bitmap_kept = c.keep_bitmap, "checkpoint record deleted")
                }
                Err(err) if err.kind() == crate::error::ErrorKind::NotFound => {}
                Err(err) => {
                    return Cleanup::Retry(
                        Error::new(
                            err.kind(),
                            format!(
                                "deleting checkpoint {} of domain {} (operation {})",
                                c.name, e.domain, e.op
                            ),
                        )
                        .with_source(err),
                    );
                }
            }
            e.checkpoints.retain(|x| x.name != c.name);
            self.update(&e);
        }
        if e.shutting_down {
            wait_until_off(hv.clone(), &e.domain, Duration::from_secs(120)).await;
            e.shutting_down = false;
            self.update(&e);
        }
        if e.restart {
            let d = e.domain.clone();
            let res = call(Box::new(move |h| {
                if h.domain_state(&d)? == DomainState::ShutOff {
                    h.start(&d)?;
                }
                Ok(())
            }))
            .await;
            match res {
                Ok(()) => tracing::info!(op = %e.op, domain = %e.domain, "domain running again"),
                Err(err) if err.kind() == crate::error::ErrorKind::NotFound => {
                    self.remove(&e.op);
                    return Cleanup::Done;
                }
                Err(err) => {
                    return Cleanup::Retry(
                        Error::new(
                            err.kind(),
                            format!(
                                "starting domain {} again after operation {}",
                                e.domain, e.op
                            ),
                        )
                        .with_source(err),
                    );
                }
            }
            e.restart = false;
            self.update(&e);
        }
        if let Some(outcomes) = e.prep.clone() {
            // A guest left shut off (no restart asked) keeps its prep until it runs again:
            // waiting for its agent would only hold the domain.
            let (h, d) = (hv.clone(), e.domain.clone());
            let off = tokio::task::spawn_blocking(move || h.domain_state(&d))
                .await
                .ok()
                .and_then(|r| r.ok())
                == Some(DomainState::ShutOff);
            if off {
                return Cleanup::Deferred(format!(
                    "domain {} is shut off with the prep changes of operation {} applied; a later start of imaged undoes them once it runs",
                    e.domain, e.op
                ));
            }
            match restore_prep_when_ready(hv.clone(), &e.domain, outcomes).await {
                Ok(()) => {
                    tracing::info!(op = %e.op, domain = %e.domain, "prep changes undone in the source")
                }
                Err(err) if err.kind() == crate::error::ErrorKind::Unavailable => {
                    return Cleanup::Retry(
                        Error::new(
                            err.kind(),
                            format!(
                                "undoing the prep changes of operation {} in domain {}",
                                e.op, e.domain
                            ),
                        )
                        .with_source(err),
                    );
                }
                Err(err) => {
                    // Tried once in full: repeating a partial restore would not help.
                    tracing::error!(op = %e.op, domain = %e.domain, error = %err.chain(), "undoing the prep changes failed; check the guest's files by hand");
                }
            }
            e.prep = None;
            self.update(&e);
        }
        self.remove(&e.op);
        Cleanup::Done
    }

    /// The run directory this journal lives in.
    pub fn run_dir(&self) -> &Path {
        self.dir.parent().unwrap_or(Path::new("/nonexistent"))
    }

    /// Job directories (`backup-*`) in the run directory that no journal entry names.
    fn orphan_job_dirs(&self) -> Vec<PathBuf> {
        let journaled: Vec<PathBuf> = self.entries().into_iter().map(|e| e.backup_dir).collect();
        let Ok(rd) = std::fs::read_dir(self.run_dir()) else {
            return Vec::new();
        };
        rd.flatten()
            .filter(|f| f.file_name().to_string_lossy().starts_with("backup-"))
            .filter(|f| f.file_type().is_ok_and(|t| t.is_dir()))
            .map(|f| f.path())
            .filter(|p| !journaled.contains(p))
            .collect()
    }

    /// Ends backup jobs a previous run began whose journal entry is gone (a job directory of
    /// ours with no entry): each running domain whose job is not ours to begin with is asked
    /// to end the job of each such directory; only a job exporting there is ended. Returns the
    /// directories to keep: those that could not be checked (libvirt did not answer), which a
    /// later capture of the domain ends first ([`crate::ops::Controller`]'s capture checks).
    pub async fn end_orphan_jobs(&self, hv: Arc<dyn Hypervisor>) -> Vec<PathBuf> {
        let orphans = self.orphan_job_dirs();
        if orphans.is_empty() {
            return orphans;
        }
        let call = |f: HvCall| blocking_call(hv.clone(), f);
        let h = hv.clone();
        let domains = match tokio::task::spawn_blocking(move || h.list_domains()).await {
            Ok(Ok(d)) => d,
            Ok(Err(e)) => {
                tracing::warn!(error = %e.chain(), "cannot list domains to end backup jobs a previous run left; their directories stay");
                return orphans;
            }
            Err(_) => return orphans,
        };
        let probe = BackupHandle::in_dir(&self.run_dir().join("backup-none"), "");
        let mut unsure = Vec::new();
        for d in domains.iter().filter(|d| d.state != DomainState::ShutOff) {
            let (n, p) = (d.name.clone(), probe.clone());
            match call(Box::new(move |h| h.end_backup(&n, &p))).await {
                Ok(()) => continue, // no backup job on it
                Err(e) if e.kind() == crate::error::ErrorKind::FailedPrecondition => {}
                Err(_) => {
                    unsure.clone_from(&orphans);
                    continue;
                }
            }
            for o in &orphans {
                let (n, job) = (d.name.clone(), BackupHandle::in_dir(o, ""));
                if call(Box::new(move |h| h.end_backup(&n, &job)))
                    .await
                    .is_err()
                {
                    continue;
                }
                let (n, p) = (d.name.clone(), probe.clone());
                if call(Box::new(move |h| h.end_backup(&n, &p))).await.is_ok() {
                    tracing::warn!(domain = %d.name, job = %o.display(), "ended a backup job a previous run left without a journal entry");
                    break;
                }
            }
        }
        unsure
    }

    /// Removes what ended operations of a previous run left in the run directory: qemu-nbd
    /// sockets (`op-*.sock`), backup job directories (`backup-*`) no journal entry names, temp
    /// files of journal writes. Call it after [`Journal::recover`] and before serving. Only
    /// names imaged creates are touched, symbolic links never followed nor removed;
    /// `imaged.lock` and `journal/` stay.
    pub fn sweep_run_dir(&self, keep: &[PathBuf]) {
        let mut kept: Vec<PathBuf> = self.entries().into_iter().map(|e| e.backup_dir).collect();
        kept.extend_from_slice(keep);
        let run = self.run_dir().to_path_buf();
        let Ok(rd) = std::fs::read_dir(&run) else {
            return;
        };
        for f in rd.flatten() {
            let name = f.file_name().to_string_lossy().into_owned();
            let p = f.path();
            let Ok(md) = std::fs::symlink_metadata(&p) else {
                continue;
            };
            let ft = md.file_type();
            let res = if name.starts_with("op-")
                && name.ends_with(".sock")
                && !ft.is_dir()
                && !ft.is_symlink()
            {
                std::fs::remove_file(&p)
            } else if name.starts_with("backup-") && ft.is_dir() && !kept.contains(&p) {
                std::fs::remove_dir_all(&p)
            } else {
                continue;
            };
            match res {
                Ok(()) => {
                    tracing::info!(path = %p.display(), "removed a leftover of a previous run")
                }
                Err(err) => {
                    tracing::warn!(path = %p.display(), error = %err, "cannot remove a leftover of a previous run")
                }
            }
        }
        // Temp files of journal writes a crash interrupted.
        if let Ok(rd) = std::fs::read_dir(&self.dir) {
            for f in rd.flatten() {
                let name = f.file_name().to_string_lossy().into_owned();
                if name.starts_with('.')
                    && name.contains(".json.tmp-")
                    && f.file_type().is_ok_and(|t| t.is_file())
                {
                    let _ = std::fs::remove_file(f.path());
                }
            }
        }
    }
}

/// What [`Journal::settle`] achieved.
#[derive(Debug)]
pub enum Cleanup {
    /// Every duty done; the entry is gone.
    Done,
    /// A duty could not be confirmed (libvirt or the guest agent did not answer): try again.
    Retry(Error),
    /// What is left can only be done later (prep in a shut-off guest): the entry stays for a
    /// later start of the daemon, and the domain is not held for it.
    Deferred(String),
}

/// Waits (bounded) for a domain that was asked to shut down to be shut off (or gone).
async fn wait_until_off(hv: Arc<dyn Hypervisor>, domain: &str, limit: Duration) {
    let t0 = Instant::now();
    while t0.elapsed() < limit {
        let (h, d) = (hv.clone(), domain.to_string());
        let state = tokio::task::spawn_blocking(move || h.domain_state(&d)).await;
        if !matches!(state, Ok(Ok(s)) if s != DomainState::ShutOff) {
            return;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    tracing::warn!(
        domain,
        "the domain did not shut off within {} s of the shutdown request",
        limit.as_secs()
    );
}

/// Waits (bounded) until the domain runs and its agent answers, then restores the prep. An
/// agent that never answers is UNAVAILABLE (try again later); a domain that is gone NOT_FOUND.
pub async fn restore_prep_when_ready(
    hv: Arc<dyn Hypervisor>,
    domain: &str,
    outcomes: Vec<StepOutcome>,
) -> Result<()> {
    wait_for_agent(hv.clone(), domain, RECOVERY_AGENT_WAIT).await?;
    let d = domain.to_string();
    tokio::task::spawn_blocking(move || {
        let agent = hv.guest_agent(&d, DEFAULT_COMMAND_TIMEOUT)?;
        crate::guest::prep::restore(agent.as_ref(), &outcomes)
    })
    .await
    .unwrap_or_else(|_| Err(crate::error::internal("a restore task failed")))
}

/// Waits until `domain` runs and its guest agent answers a ping, for at most `limit`.
pub async fn wait_for_agent(hv: Arc<dyn Hypervisor>, domain: &str, limit: Duration) -> Result<()> {
    let t0 = Instant::now();
    loop {
        let (h, d) = (hv.clone(), domain.to_string());
        let res = tokio::task::spawn_blocking(move || {
            if h.domain_state(&d)? != DomainState::Running {
                return Ok(false);
            }
            Ok(h.guest_agent(&d, Duration::from_secs(5))
                .and_then(|a| a.ping())
                .is_ok())
        })
        .await
        .unwrap_or_else(|_| Err(crate::error::internal("an agent wait task failed")));
        match res {
            Ok(true) => return Ok(()),
            Err(e) if e.kind() == crate::error::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        if t0.elapsed() > limit {
            return Err(Error::new(
                crate::error::ErrorKind::Unavailable,
                format!(
                    "the guest agent of domain {domain} did not answer within {} s",
                    limit.as_secs()
                ),
            ));
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_round_trip_and_an_entry_without_duties_is_removed() {
        let d = tempfile::tempdir().unwrap();
        let j = Journal::new(d.path());
        assert!(j.entries().is_empty());
        let mut e = Entry::new("op-1", "web");
        e.backup_dir = d.path().join("b");
        e.frozen = true;
        e.restart = true;
        j.write(&e).unwrap();
        assert_eq!(j.entries(), vec![e.clone()]);
        e.frozen = false;
        e.backup_dir = PathBuf::new();
        j.write(&e).unwrap();
        assert_eq!(j.entries(), vec![e.clone()]);
        e.restart = false;
        j.write(&e).unwrap();
        assert!(j.entries().is_empty(), "no duty left: the entry is gone");
    }

    #[test]
    fn entries_of_the_previous_format_still_read() {
        let d = tempfile::tempdir().unwrap();
        let j = Journal::new(d.path());
        std::fs::create_dir_all(d.path().join("journal")).unwrap();
        std::fs::write(
            d.path().join("journal/op-2.json"),
            br#"{"op":"op-2","domain":"db","backup_dir":"/run/imaged/nbd/backup-op-2","frozen":false,"started_at":7}"#,
        )
        .unwrap();
        let e = &j.entries()[0];
        assert_eq!(e.domain, "db");
        assert!(!e.restart && e.prep.is_none());
    }
}
