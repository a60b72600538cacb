//! Shutdown captures: prep in the running guest, journal, shut it down (agent, else ACPI;
//! forced off only when asked), read the disk cold; then, in every outcome, start the guest
//! again when asked and undo the prep when asked or when the capture failed. A restart or
//! restore that cannot be confirmed stays in the journal for the janitor
//! ([`super::super::janitor`]): an image that was captured is not failed for it.

use std::time::{Duration, Instant};

use super::super::journal::{wait_for_agent, Entry, Journal};
use super::super::prep::report_outcome;
use super::super::{Controller, OpEntry};
use super::sink::Sink;
use super::{CaptureParams, Plan};
use crate::error::{precondition, Result};
use crate::guest::prep::StepOutcome;
use crate::hypervisor::{DomainInfo, DomainState, ShutdownHow};

impl Controller {
    /// Prep in the running guest, shut it down, read the disk cold; then, whatever happened,
    /// start it again when asked and undo the prep when asked (or when the capture failed).
    pub(super) async fn shutdown_capture(
        &self,
        op: &OpEntry,
        writer: Sink,
        plan: &Plan,
        p: &CaptureParams,
    ) -> Result<()> {
        let name = plan.info.name.clone();
        let journal = Journal::new(&self.inner.cfg.capture.run_dir);
        let mut entry = Entry::new(&op.id, &name);
        entry.restart = plan.decision.restart;
        let applied = self.prep_journaled(op, plan, &journal, &mut entry).await?;
        let res = async {
            if plan.was_running {
                entry.shutting_down = true;
                journal.write(&entry)?;
                self.shut_down(op, &plan.info, p.shutdown_timeout, p.force_off)
                    .await?;
            }
            self.cold_read(op, writer, plan).await
        }
        .await;
        // A shutdown asked for and then interrupted (cancel, timeout) may still be under way:
        // let it finish before deciding whether there is a guest to start again.
        let wait_off = if entry.shutting_down && res.is_err() {
            p.shutdown_timeout
        } else {
            Duration::ZERO
        };
        entry.shutting_down = false;
        if entry.restart {
            match self.start_again(op, &name, wait_off).await {
                Ok(()) => {
                    entry.restart = false;
                    journal.update(&entry);
                }
                Err(e) => {
                    // The journal keeps the duty and the janitor finishes it once the
                    // operation has ended; a captured image stays good (the operation
                    // succeeds), and the log says the restart is still owed.
                    journal.update(&entry);
                    if res.is_ok() {
                        tracing::warn!(op = %op.id, domain = %name, image = %op.image_name, error = %e.chain(),
                            "image {} was captured, but domain {name} could not be started again yet; imaged keeps trying in the background", op.image_name);
                    } else {
                        tracing::error!(op = %op.id, domain = %name, error = %e.chain(), "could not start the domain again; imaged keeps trying in the background");
                    }
                }
            }
        }
        if let Some(outcomes) = applied {
            let undo = plan.decision.restore_source || res.is_err();
            let done = !undo
                || self
                    .undo_prep_when_running(op, &name, outcomes, plan.decision.restore_source)
                    .await;
            // Not done (the guest is off, or its agent never answered): the journal keeps
            // the duty for a later start of the daemon.
            if done {
                entry.prep = None;
            }
            journal.update(&entry);
        }
        res
    }

    /// Starts a domain that a shutdown capture shut down (nothing to do when it runs). With
    /// `wait_off`, first gives a shutdown under way that long to complete.
    pub(super) async fn start_again(
        &self,
        op: &OpEntry,
        name: &str,
        wait_off: Duration,
    ) -> Result<()> {
        let t0 = Instant::now();
        while t0.elapsed() < wait_off {
            let n = name.to_string();
            if self.hv(move |hv| hv.domain_state(&n)).await? == DomainState::ShutOff {
                break;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let n = name.to_string();
        let started = self
            .hv(move |hv| {
                if hv.domain_state(&n)? == DomainState::ShutOff {
                    hv.start(&n)?;
                    return Ok(true);
                }
                Ok(false)
            })
            .await?;
        if started {
            tracing::info!(op = %op.id, domain = %name, "domain started again");
        }
        Ok(())
    }

    /// Undoes prep in a guest that may be booting: waits (bounded by `capture.agent_wait_secs`)
    /// for its agent, then restores. A guest left shut off keeps the prep, and the operation
    /// says so.
    pub(super) async fn undo_prep_when_running(
        &self,
        op: &OpEntry,
        name: &str,
        outcomes: Vec<StepOutcome>,
        asked: bool,
    ) -> bool {
        let n = name.to_string();
        let state = self.hv(move |hv| hv.domain_state(&n)).await;
        if matches!(state, Ok(DomainState::ShutOff)) {
            tracing::warn!(op = %op.id, domain = %name, "the domain is shut off with the prep changes applied");
            op.set_prep(
                outcomes
                    .iter()
                    .map(|o| {
                        let mut r = report_outcome(o, false);
                        r.message = format!(
                            "not undone yet: domain {name} is shut off with these changes applied; \
                             imaged undoes them at its next start once the domain runs"
                        );
                        r
                    })
                    .collect(),
            );
            return false;
        }
        let wait = Duration::from_secs(self.inner.cfg.capture.agent_wait_secs);
        if let Err(e) = wait_for_agent(self.inner.hv.clone(), name, wait).await {
            tracing::error!(op = %op.id, domain = %name, error = %e.chain(), "cannot undo the prep changes");
            op.set_prep(
                outcomes
                    .iter()
                    .map(|o| {
                        let mut r = report_outcome(o, false);
                        r.outcome = "failed".into();
                        r.message = format!("restoring the source failed: {}", e.chain());
                        r
                    })
                    .collect(),
            );
            return false;
        }
        self.undo_prep(op, name, outcomes, asked).await
    }

    /// Shuts a guest down: agent first when it has one, ACPI otherwise (or when the agent
    /// does not take it); forced off only when asked.
    pub(super) async fn shut_down(
        &self,
        op: &OpEntry,
        info: &DomainInfo,
        timeout: Duration,
        force: bool,
    ) -> Result<()> {
        let name = info.name.clone();
        let t0 = Instant::now();
        let mut how = if info.has_agent_channel {
            ShutdownHow::Agent
        } else {
            ShutdownHow::Acpi
        };
        loop {
            let n = name.clone();
            match self.hv(move |hv| hv.shutdown(&n, how)).await {
                Ok(()) => break,
                Err(e) if how == ShutdownHow::Agent => {
                    tracing::warn!(op = %op.id, domain = %name, error = %e.chain(), "agent shutdown refused; trying ACPI");
                    how = ShutdownHow::Acpi;
                }
                Err(e) => return Err(e),
            }
        }
        tracing::info!(op = %op.id, domain = %name, how = ?how, "shutdown requested");
        let mut acpi_fallback_sent = how == ShutdownHow::Acpi;
        loop {
            op.cancel.check()?;
            let n = name.clone();
            if self.hv(move |hv| hv.domain_state(&n)).await? == DomainState::ShutOff {
                tracing::info!(op = %op.id, domain = %name, seconds = t0.elapsed().as_secs(), "domain is shut off");
                return Ok(());
            }
            // An agent that accepted the command but did nothing: try the power button halfway.
            if !acpi_fallback_sent && t0.elapsed() > timeout / 2 {
                acpi_fallback_sent = true;
                let n = name.clone();
                let _ = self.hv(move |hv| hv.shutdown(&n, ShutdownHow::Acpi)).await;
            }
            if t0.elapsed() > timeout {
                if force {
                    tracing::warn!(op = %op.id, domain = %name, "shutdown timed out; forcing the domain off");
                    let n = name.clone();
                    self.hv(move |hv| hv.destroy(&n)).await?;
                    return Ok(());
                }
                return Err(precondition(format!(
                    "domain {name} did not shut down within {} s; retry with force_off, or shut it down by hand",
                    timeout.as_secs()
                )));
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}
