//! Live captures (quiesce, crash-consistent): prep, journal, then a pull-mode backup job
//! begun at the consistency point (filesystems frozen around it for quiesce, thawed at once);
//! the disk is read from the job's NBD export and the job ended. A failed capture gives the
//! source its configuration back.
//!
//! Before it begins, a capture ends a backup job that imaged itself left on the domain (its
//! export lies under our run directory); another tool's job is left alone and refused
//! FAILED_PRECONDITION. Ending the job after the image was committed is cleanup: when it
//! fails, the image stays, the operation succeeds with a warning in the log, and the journal
//! entry hands the job to the janitor.

use std::sync::Arc;
use std::time::Duration;

use super::super::journal::{Entry, Journal};
use super::super::{Controller, OpEntry};
use super::incremental;
use super::sink::Sink;
use super::Plan;
use crate::capture::live;
use crate::error::{Error, ErrorKind, Result};
use crate::guest::prep::StepOutcome;
use crate::hypervisor::BackupHandle;
use crate::ops::mode::Mode;

impl Controller {
    /// Prep (if any), then the live read; a failed capture gives the source its
    /// configuration back, whatever was asked.
    pub(super) async fn live_capture(&self, op: &OpEntry, writer: Sink, plan: &Plan) -> Result<()> {
        let name = plan.info.name.clone();
        let journal = Journal::new(&self.inner.cfg.capture.run_dir);
        let mut entry = Entry::new(&op.id, &name);
        let applied = self.prep_journaled(op, plan, &journal, &mut entry).await?;
        let mut restore = applied;
        let res = self
            .live_read(op, writer, plan, &mut restore, &journal, &mut entry)
            .await;
        let undone = match (&res, restore) {
            (Err(_), Some(outcomes)) => self.undo_prep(op, &name, outcomes, false).await,
            _ => true,
        };
        // A restore the agent did not answer stays a duty of the janitor.
        if undone {
            entry.prep = None;
        }
        journal.update(&entry);
        res
    }

    /// Reads a running domain's disk from a pull-mode backup job.
    /// With `restore` set (restore-source), the prep changes are undone in the guest right
    /// after the consistency point, before the disk is read.
    pub(super) async fn live_read(
        &self,
        op: &OpEntry,
        writer: Sink,
        plan: &Plan,
        restore: &mut Option<Vec<StepOutcome>>,
        journal: &Journal,
        entry: &mut Entry,
    ) -> Result<()> {
        let cfg = &self.inner.cfg.capture;
        let quiesce = plan.mode == Mode::Quiesce;
        let all: Vec<String> = plan
            .info
            .disks
            .iter()
            .filter(|d| d.device == "disk")
            .map(|d| d.target.clone())
            .collect();
        self.end_own_leftover_job(op, &plan.info.name).await?;
        let chunked = matches!(writer, Sink::Repository(_) | Sink::Central { .. });
        let prepared = self.prepare_checkpoints(op, plan, chunked).await;
        entry.backup_dir = cfg.run_dir.join(format!("backup-{}", op.id));
        entry.frozen = quiesce;
        // The records the job defines: the earlier checkpoint (its bitmap is the base) and the
        // new one (worth nothing until the image is committed).
        if let Some(old) = &prepared.checkpoints.since {
            entry.checkpoint_duty(&old.name, true);
        }
        if let Some(new) = &prepared.checkpoints.create {
            entry.checkpoint_duty(new, false);
        }
        journal.write(entry)?;
        let max_freeze = Duration::from_millis(cfg.max_freeze_ms);
        let begun = live::begin(
            self.inner.hv.clone(),
            &plan.info.name,
            &plan.target,
            &all,
            &cfg.run_dir,
            &op.id,
            quiesce,
            max_freeze,
            prepared.checkpoints.clone(),
        )
        .await;
        // The journal keeps the freeze until the thaw is confirmed (a failed thaw leaves a
        // watchdog that dies with the daemon), and the job until it is known ended.
        let thawed = !quiesce
            || live::thaw_until_thawed(
                self.inner.hv.clone(),
                plan.info.name.clone(),
                Duration::from_secs(30),
            )
            .await;
        if thawed {
            entry.frozen = false;
            journal.update(entry);
        }
        let (export, point, begun) = match begun {
            Ok(x) => x,
            Err(e) => {
                // `begin` ended what it started; a job begun late (after its call timed
                // out) is ended here too, and only ours ever is.
                let (d, job) = (
                    plan.info.name.clone(),
                    BackupHandle::in_dir(&entry.backup_dir, &plan.target),
                );
                if live::job_gone(&self.hv(move |hv| hv.end_backup(&d, &job)).await) {
                    let _ = std::fs::remove_dir_all(&entry.backup_dir);
                    entry.backup_dir = Default::default();
                    journal.update(entry);
                }
                return Err(busy(e, &plan.info.name));
            }
        };
        op.set_freeze_window(point.freeze_window_ms);
        if plan.decision.restore_source {
            if let Some(outcomes) = restore.take() {
                if self.undo_prep(op, &plan.info.name, outcomes, true).await {
                    entry.prep = None;
                    journal.update(entry);
                }
            }
        }
        if quiesce {
            tracing::info!(op = %op.id, domain = %plan.info.name, filesystems = point.frozen_filesystems, freeze_window_ms = point.freeze_window_ms, "guest thawed");
        }
        if chunked {
            op.set_read(incremental::report(&prepared.note, &begun, None));
        }
        for n in &begun.notes {
            tracing::info!(op = %op.id, domain = %plan.info.name, disk = %plan.target, "{n}");
        }
        let export = Arc::new(export);
        let res = self
            .deliver(
                op,
                writer,
                export.clone(),
                &plan.provenance(),
                prepared.base.as_ref().filter(|_| begun.since.is_some()),
            )
            .await;
        let ended = export.end().await;
        if live::job_gone(&ended) {
            entry.backup_dir = Default::default();
            journal.update(entry);
        }
        let captured = res.as_ref().ok().and_then(|c| c.as_ref());
        if chunked {
            let read = incremental::report(&prepared.note, &begun, captured);
            tracing::info!(op = %op.id, domain = %plan.info.name, disk = %plan.target,
                incremental = read.incremental, since = %read.since_checkpoint, changed_bytes = read.changed_bytes,
                checkpoint = %read.checkpoint, note = %read.note, "how the disk was read");
            op.set_read(read);
        }
        self.settle_checkpoints(op, plan, &begun, captured, journal, entry)
            .await;
        res?;
        if let Err(e) = ended {
            // The image is whole and committed: ending the job is cleanup that can be retried,
            // not a reason to fail it. The journal keeps the job; the janitor ends it.
            tracing::warn!(op = %op.id, domain = %plan.info.name, image = %op.image_name, error = %e.chain(),
                "image {} was captured, but the backup job on domain {} could not be ended yet; imaged keeps trying in the background",
                op.image_name, plan.info.name);
        }
        Ok(())
    }

    /// Ends a backup job that imaged itself left on `domain` (an earlier capture whose job
    /// outlived it: its export socket lies under our run directory), so a new capture is not
    /// refused for our own leftover. A job another tool began is left alone:
    /// FAILED_PRECONDITION naming the domain.
    pub(in crate::ops) async fn end_own_leftover_job(
        &self,
        op: &OpEntry,
        domain: &str,
    ) -> Result<()> {
        let run = self.inner.cfg.capture.run_dir.clone();
        // Our new job is not begun yet: ending it answers Ok when no job runs, and
        // FAILED_PRECONDITION when some other job does.
        let probe = BackupHandle::in_dir(&run.join(format!("backup-{}", op.id)), "");
        let (d, h) = (domain.to_string(), probe.clone());
        let foreign = match self.hv(move |hv| hv.end_backup(&d, &h)).await {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == ErrorKind::FailedPrecondition => e,
            Err(e) => return Err(busy(e, domain)),
        };
        // Where our earlier jobs exported: job directories in the run directory, the journal's
        // entries, and the operations of this run on this domain (a directory may be gone).
        let mut candidates: Vec<std::path::PathBuf> = Journal::new(&run)
            .entries()
            .into_iter()
            .filter(|e| e.domain == domain && !e.backup_dir.as_os_str().is_empty())
            .map(|e| e.backup_dir)
            .collect();
        // Ended operations of this run are in the database only.
        match self.inner.store.ids_on_domain(domain, std::process::id()) {
            Ok(ids) => {
                for id in ids.into_iter().filter(|id| *id != op.id) {
                    candidates.push(run.join(format!("backup-{id}")));
                }
            }
            Err(e) => {
                tracing::warn!(domain, error = %e.chain(), "cannot list this run's operations on the domain")
            }
        }
        let running: Vec<String> = {
            let t = self.table();
            t.live
                .values()
                .filter(|e| !e.state().is_terminal())
                .map(|e| e.id.clone())
                .collect()
        };
        if let Ok(rd) = std::fs::read_dir(&run) {
            for f in rd.flatten() {
                let name = f.file_name().to_string_lossy().into_owned();
                if name.starts_with("backup-") && f.file_type().is_ok_and(|t| t.is_dir()) {
                    candidates.push(f.path());
                }
            }
        }
        candidates.sort();
        candidates.dedup();
        // A job of a capture that still runs (on another domain) is never touched: ending a
        // job with its handle on this domain could only end this domain's job anyway.
        candidates.retain(|c| {
            !running
                .iter()
                .any(|id| c.file_name() == Some(std::ffi::OsStr::new(&format!("backup-{id}"))))
        });
        for dir in candidates {
            let (d, job) = (domain.to_string(), BackupHandle::in_dir(&dir, ""));
            if self.hv(move |hv| hv.end_backup(&d, &job)).await.is_err() {
                continue; // not that one
            }
            // Ok: that job ended, or none runs any more; the probe tells.
            let (d, h) = (domain.to_string(), probe.clone());
            if self.hv(move |hv| hv.end_backup(&d, &h)).await.is_ok() {
                tracing::warn!(op = %op.id, domain, job = %dir.display(), "ended a backup job imaged had left on the domain");
                let journaled = Journal::new(&run)
                    .entries()
                    .iter()
                    .any(|e| e.backup_dir == dir);
                if !journaled && dir.starts_with(&run) {
                    let _ = std::fs::remove_dir_all(&dir);
                }
                return Ok(());
            }
        }
        Err(Error::new(
            ErrorKind::FailedPrecondition,
            format!(
                "domain {domain} runs a backup job that imaged did not start; it is left alone: \
                 end it with `virsh domjobabort {domain}` if it is stale, then retry"
            ),
        )
        .with_source(foreign))
    }
}

/// libvirt's "cannot acquire state change lock" (another libvirt job still runs on the domain,
/// e.g. one a restarted libvirtd is still recovering): a domain busy for a while, so
/// UNAVAILABLE (retry later), saying so in the domain's words. The libvirt backend already maps
/// it to UNAVAILABLE; a backend that reports it as INTERNAL is caught here too.
fn busy(e: Error, domain: &str) -> Error {
    if matches!(e.kind(), ErrorKind::Internal | ErrorKind::Unavailable)
        && e.chain().contains("cannot acquire state change lock")
    {
        return Error::new(
            ErrorKind::Unavailable,
            format!(
                "domain {domain} is busy with another libvirt job (libvirt cannot acquire its \
                 state change lock); retry in a while"
            ),
        )
        .with_source(e);
    }
    e
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_state_change_lock_timeout_is_a_busy_domain_not_an_internal_error() {
        let e = busy(
            crate::error::internal("Timed out during operation: cannot acquire state change lock (held by monitor=remoteDispatchDomainBackupBegin)"),
            "web",
        );
        assert_eq!(e.kind(), ErrorKind::Unavailable);
        assert!(e.chain().contains("domain web is busy"), "{}", e.chain());
        let other = busy(crate::error::internal("boom"), "web");
        assert_eq!(other.kind(), ErrorKind::Internal);
    }
}
