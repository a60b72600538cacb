//! Operations across restarts: ending those a previous run left unfinished, and pruning old ones.
//!
//! **At start** ([`Controller::open`], after the journal's recovery and before serving), every
//! operation the database shows as not ended was cut off by the end of the previous process
//! (a crash, SIGKILL, a power loss; a clean stop cancels and records its operations). Nothing
//! runs it now, so it is ended at once, before any caller can see it:
//!
//! - FAILED with kind ABORTED and a message that says which process stopped in which state,
//!   what start-up recovery did or still does to the guest (a capture's journal entry is gone
//!   once its duties are done; one that is still there goes to a janitor), and what became of
//!   the image: nothing visible in the repository (an image is listed only once its manifest
//!   is written; chunks it had stored stay on disk unreferenced), no file at a file
//!   destination (written under a temp name, renamed only when whole; the temp file is
//!   removed here), a remote target's partial upload possibly left on that side.
//!   ABORTED and not UNAVAILABLE: nothing the operation depends on is down, the work was cut
//!   off and may simply be asked for again; UNAVAILABLE on an operation here means libvirt or
//!   the repository failed it, which would send an operator looking for an outage.
//! - ACTIVE instead when it wrote to the repository and its image is there: the name was
//!   reserved for it from the request on, so an image of that name was committed by it (the
//!   process stopped after the commit and before the end was saved).
//!
//! A retry with the same `request_id` returns that ended operation, as any retry does
//! (idempotency): a caller that wants the work done again uses a new `request_id`.
//!
//! **Pruning**: operations that ended more than `[daemon] operation_retention_days` ago and
//! request_ids older than 24 hours are removed at start and then hourly by a task that lives
//! as long as the controller; the same task saves again the end of an operation whose end
//! could not be saved when it happened.

use std::sync::{Arc, Weak};
use std::time::Duration;

use super::journal::Journal;
use super::store::Unfinished;
use super::{Controller, Inner, OpError, OpKind, OpState, Operation};
use crate::error::{ErrorKind, Result};
use crate::util::{now_unix, rfc3339};

/// How often old operations are pruned.
const PRUNE_EVERY: Duration = Duration::from_secs(3600);

impl Controller {
    /// Ends every operation a previous run left unfinished (see the module doc).
    pub(super) fn end_interrupted(&self) -> Result<()> {
        let store = &self.inner.store;
        for u in store.unfinished()? {
            let op = self.interrupted(&u);
            store.update(&op)?;
            match &op.error {
                Some(e) => {
                    tracing::warn!(op = %op.id, kind = op.kind.name(), image = %op.image_name, error = %e.message, "operation interrupted by the previous run marked FAILED")
                }
                None => {
                    tracing::warn!(op = %op.id, kind = op.kind.name(), image = %op.image_name, "operation interrupted by the previous run after its image was committed marked ACTIVE")
                }
            }
        }
        Ok(())
    }

    /// How an interrupted operation ends.
    fn interrupted(&self, u: &Unfinished) -> Operation {
        let mut op = u.op.clone();
        let now = now_unix();
        op.updated_at = now.max(op.updated_at);
        op.progress.rate_bytes_per_sec = 0;
        let to_repository = u.target == "repository" && op.kind != OpKind::Export;
        if to_repository && self.inner.repo.get(&op.image_name).is_ok() {
            op.state = OpState::Active;
            op.error = None;
            op.location = op.image_name.clone();
            return op;
        }
        let mut msg = format!(
            "imaged (pid {}) stopped while this operation was {} (its last recorded change was \
             at {}), so it never finished",
            u.daemon_pid,
            op.state.name(),
            rfc3339(u.op.updated_at)
        );
        if op.kind == OpKind::Capture {
            let journal = Journal::new(&self.inner.cfg.capture.run_dir);
            if journal.get(&op.id).is_some() {
                msg.push_str(&format!(
                    "; what it did to domain {} (a freeze, a backup job, a shutdown to start \
                     again from, prep changes) is not all confirmed undone yet: a janitor keeps \
                     trying and holds the domain meanwhile (prep in a guest left shut off is \
                     undone once it runs again)",
                    op.domain
                ));
            } else {
                msg.push_str(&format!(
                    "; start-up recovery has undone whatever it had recorded doing to domain {} \
                     (thawed the guest, ended its backup job, started it again, restored its \
                     prep changes) or there was nothing to undo",
                    op.domain
                ));
            }
        }
        if let Some(path) = u.target.strip_prefix("file:") {
            let removed = crate::hostfile::remove_temp_files(std::path::Path::new(path));
            msg.push_str(&format!(
                "; no file was written at {path} (it is written under a temp name and renamed \
                 into place only when whole){}",
                match removed {
                    Ok(0) => String::new(),
                    Ok(n) => format!(", {n} temp file(s) it left there removed"),
                    Err(e) => format!(", and its temp file could not be removed: {}", e.chain()),
                }
            ));
        } else if let Some(name) = u.target.strip_prefix("remote:") {
            msg.push_str(&format!(
                "; its upload to target {name} was cut off: an S3 multipart upload or a Glance \
                 image it had begun may be left there, for a lifecycle rule or an admin to remove"
            ));
        } else if to_repository {
            msg.push_str(&format!(
                "; no image {} was kept (an image is listed only once it is whole; chunks it had \
                 stored stay in the repository unreferenced)",
                op.image_name
            ));
        }
        msg.push_str(
            "; a retry with the same request_id returns this operation: use a new request_id to \
             run it again",
        );
        op.state = OpState::Failed;
        op.error = Some(OpError {
            kind: ErrorKind::Aborted,
            message: msg,
            facts: crate::error::Facts {
                reason: "DAEMON_RESTARTED".into(),
                subject: format!("operations/{}", op.id),
                ..Default::default()
            },
        });
        op
    }

    /// Removes what is past its retention, and saves the end of operations whose end could
    /// not be saved when it happened. Failures are logged.
    pub(super) fn prune_operations(&self) {
        let unsaved: Vec<_> = self
            .table()
            .live
            .values()
            .filter(|e| e.state().is_terminal())
            .cloned()
            .collect();
        for e in unsaved {
            if self.inner.store.update(&e.snapshot()).is_ok() {
                self.table().live.remove(&e.id);
            }
        }
        let now = now_unix();
        let days = i64::from(self.inner.cfg.daemon.operation_retention_days);
        match self.inner.store.prune(now - days * 86_400, now) {
            Ok(0) => {}
            Ok(n) => tracing::info!(
                removed = n,
                days,
                "pruned operations that ended beyond the retention"
            ),
            Err(e) => tracing::error!(error = %e.chain(), "cannot prune old operations"),
        }
    }

    /// Starts the hourly pruning task (when a runtime runs); it ends with the controller.
    pub(super) fn spawn_pruner(&self) {
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let weak: Weak<Inner> = Arc::downgrade(&self.inner);
        rt.spawn(async move {
            let mut tick = tokio::time::interval(PRUNE_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await; // the first tick is at once; start-up has pruned already
            loop {
                tick.tick().await;
                let Some(inner) = weak.upgrade() else {
                    return;
                };
                let ctl = Controller { inner };
                let _ = tokio::task::spawn_blocking(move || ctl.prune_operations()).await;
            }
        });
    }
}
