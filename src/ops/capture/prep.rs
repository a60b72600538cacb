//! Prep around the consistency point of a capture: applied in the running guest before it,
//! reported on the operation once journaled, undone in the source when asked or on failure.

use super::super::journal::{Entry, Journal};
use super::super::prep::report_outcome;
use super::super::{Controller, OpEntry};
use super::Plan;
use crate::error::{Error, Result};
use crate::guest::prep::StepOutcome;

impl Controller {
    /// Applies the plan's prep steps, journaling each change before it is made (a daemon killed
    /// mid-apply leaves a duty start-up recovery undoes), then journals the entry with their
    /// final outcomes before anything else happens; if the journal cannot be written, the guest
    /// gets its configuration back and the error is returned. The outcomes go on the operation.
    pub(super) async fn prep_journaled(
        &self,
        op: &OpEntry,
        plan: &Plan,
        journal: &Journal,
        entry: &mut Entry,
    ) -> Result<Option<Vec<StepOutcome>>> {
        let (j, mut pending) = (journal.clone(), entry.clone());
        let before = Box::new(move |so_far: &[StepOutcome]| {
            pending.prep = Some(so_far.to_vec());
            j.write(&pending)
        });
        let applied = match self.prep_before(op, plan, before).await {
            Ok(a) => a,
            Err(e) => {
                // The apply undid itself: the duty it journaled on the way is void. When its
                // undo failed too, the duty stays, and the janitor restores the guest.
                if e.facts().reason != crate::guest::prep::UNDO_FAILED {
                    journal.remove(&op.id);
                }
                return Err(e);
            }
        };
        entry.prep = applied.clone();
        if let Err(e) = journal.write(entry) {
            if let Some(outcomes) = applied {
                self.undo_prep(op, &plan.info.name, outcomes, false).await;
            }
            return Err(e);
        }
        report_applied(op, &applied);
        Ok(applied)
    }

    /// Applies the plan's prep steps in the running guest; None when there are none. The
    /// caller journals the outcomes, then reports them ([`report_applied`]).
    pub(super) async fn prep_before(
        &self,
        op: &OpEntry,
        plan: &Plan,
        before: super::super::prep::RecordPrep,
    ) -> Result<Option<Vec<StepOutcome>>> {
        if plan.steps.is_empty() {
            return Ok(None);
        }
        let name = plan.info.name.clone();
        tracing::info!(op = %op.id, domain = %name, steps = ?plan.steps, "applying prep steps");
        let outcomes = self
            .apply_prep(&name, plan.steps.clone(), before)
            .await
            .map_err(|e| {
                if e.facts().reason == crate::guest::prep::UNDO_FAILED {
                    Error::new(
                        e.kind(),
                        format!(
                            "prep steps failed in domain {name}, and undoing them failed too; \
                             imaged keeps trying to restore the guest"
                        ),
                    )
                    .with_reason(crate::guest::prep::UNDO_FAILED)
                    .with_source(e)
                } else {
                    Error::new(
                        e.kind(),
                        format!("prep steps failed in domain {name}; the guest was left as it was"),
                    )
                    .with_source(e)
                }
            })?;
        Ok(Some(outcomes))
    }

    /// Restores prep changes in the running source; reports the outcome on the operation.
    /// False when the restore is worth trying again (the guest agent did not answer): the
    /// journal then keeps the duty for the janitor.
    pub(super) async fn undo_prep(
        &self,
        op: &OpEntry,
        domain: &str,
        outcomes: Vec<StepOutcome>,
        asked: bool,
    ) -> bool {
        let reports: Vec<_> = outcomes.iter().map(|o| report_outcome(o, true)).collect();
        match self.restore_prep(domain, outcomes).await {
            Ok(()) => {
                tracing::info!(op = %op.id, domain, asked, "prep changes undone in the source");
                op.set_prep(reports);
                true
            }
            Err(e) => {
                let again = e.kind() == crate::error::ErrorKind::Unavailable;
                tracing::error!(op = %op.id, domain, error = %e.chain(), "could not undo the prep changes in the source");
                op.set_prep(
                    reports
                        .into_iter()
                        .map(|mut r| {
                            r.outcome = "failed".into();
                            r.message = format!("restoring the source failed: {}", e.chain());
                            r
                        })
                        .collect(),
                );
                !again
            }
        }
    }
}

/// Puts the prep outcomes on the operation (once they are journaled).
fn report_applied(op: &OpEntry, applied: &Option<Vec<StepOutcome>>) {
    if let Some(outcomes) = applied {
        op.set_prep(outcomes.iter().map(|o| report_outcome(o, false)).collect());
    }
}
