//! Live captures (quiesce, crash-consistent): prep, journal, then a pull-mode backup job
//! begun at the consistency point (filesystems frozen around it for quiesce, thawed at once);
//! the disk is read from the job's NBD export and the job ended. A failed capture gives the
//! source its configuration back.

use std::sync::Arc;
use std::time::Duration;

use super::super::journal::{Entry, Journal};
use super::super::{Controller, OpEntry};
use super::sink::Sink;
use super::Plan;
use crate::capture::live;
use crate::error::Result;
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
        if let (Err(_), Some(outcomes)) = (&res, restore) {
            self.undo_prep(op, &name, outcomes, false).await;
        }
        entry.prep = None;
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
        entry.backup_dir = cfg.run_dir.join(format!("backup-{}", op.id));
        entry.frozen = quiesce;
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
        let (export, point) = match begun {
            Ok(x) => x,
            Err(e) => {
                // `begin` ended what it started; a job begun late (after its call timed
                // out) is ended here too, and only ours ever is.
                let (d, job) = (
                    plan.info.name.clone(),
                    BackupHandle::in_dir(&entry.backup_dir, &plan.target),
                );
                if self.hv(move |hv| hv.end_backup(&d, &job)).await.is_ok() {
                    let _ = std::fs::remove_dir_all(&entry.backup_dir);
                    entry.backup_dir = Default::default();
                    journal.update(entry);
                }
                return Err(e);
            }
        };
        op.set_freeze_window(point.freeze_window_ms);
        if plan.decision.restore_source {
            if let Some(outcomes) = restore.take() {
                self.undo_prep(op, &plan.info.name, outcomes, true).await;
                entry.prep = None;
                journal.update(entry);
            }
        }
        if quiesce {
            tracing::info!(op = %op.id, domain = %plan.info.name, filesystems = point.frozen_filesystems, freeze_window_ms = point.freeze_window_ms, "guest thawed");
        }
        let export = Arc::new(export);
        let res = self
            .deliver(op, writer, export.clone(), &plan.provenance())
            .await;
        let ended = export.end().await;
        if ended.is_ok() {
            entry.backup_dir = Default::default();
            journal.update(entry);
        }
        res?;
        ended
    }
}
