//! Guest prep steps as agent actions: the dry run ([`Controller::plan_prep`]), and apply / restore
//! around the consistency point of a capture. The steps themselves live in
//! [`crate::guest::prep`]; this module checks the domain, runs them on the blocking pool
//! through the guest agent, and turns their results into reports on the operation.

use super::{Controller, PrepReport, ReportedChange};
use crate::error::{invalid, precondition, Result};
use crate::guest::agent::DEFAULT_COMMAND_TIMEOUT;
use crate::guest::prep::{
    self, FileAction, OutcomeStatus, PlanStatus, PrepStep, StepOutcome, StepPlan,
};
use crate::hypervisor::{DomainInfo, DomainState};

/// Parses step names ("all" or a list); an empty list is fine (no prep).
pub fn parse_steps(names: &[String]) -> Result<Vec<PrepStep>> {
    PrepStep::parse_list(names)
}

impl Controller {
    /// Dry run: what each step would change in the running guest, as diffs. Changes nothing.
    pub async fn plan_prep(&self, domain: &str, steps: &[String]) -> Result<Vec<PrepReport>> {
        let steps = parse_steps(steps)?;
        if steps.is_empty() {
            return Err(invalid(format!(
                "name the prep steps to plan: {}, or all",
                PrepStep::ALL.map(PrepStep::name).join(", ")
            )));
        }
        let info = self.domain(domain).await?;
        self.check_prep_possible(&info)?;
        let name = info.name.clone();
        let plans = self
            .hv(move |hv| {
                prep::plan(
                    hv.guest_agent(&name, DEFAULT_COMMAND_TIMEOUT)?.as_ref(),
                    &steps,
                )
            })
            .await?;
        Ok(plans.iter().map(report_plan).collect())
    }

    /// Prep steps need the domain running with a guest agent channel.
    pub(super) fn check_prep_possible(&self, info: &DomainInfo) -> Result<()> {
        if info.state != DomainState::Running {
            return Err(precondition(format!(
                "domain {} is {}; prep steps run inside a running guest",
                info.name,
                info.state.as_str()
            )));
        }
        if !info.has_agent_channel {
            return Err(precondition(format!(
                "domain {} has no guest agent channel; prep steps run through the QEMU guest agent",
                info.name
            )));
        }
        Ok(())
    }

    /// Applies the steps in the guest (all or nothing: a failed step undoes the others);
    /// `before` hears of each change before it is made ([`prep::BeforeChange`]).
    pub(super) async fn apply_prep(
        &self,
        domain: &str,
        steps: Vec<PrepStep>,
        mut before: RecordPrep,
    ) -> Result<Vec<StepOutcome>> {
        let name = domain.to_string();
        self.hv(move |hv| {
            prep::apply_recorded(
                hv.guest_agent(&name, DEFAULT_COMMAND_TIMEOUT)?.as_ref(),
                &steps,
                &mut *before,
            )
        })
        .await
    }

    /// Puts the guest back as it was before [`Controller::apply_prep`].
    pub(super) async fn restore_prep(
        &self,
        domain: &str,
        outcomes: Vec<StepOutcome>,
    ) -> Result<()> {
        let name = domain.to_string();
        self.hv(move |hv| {
            prep::restore(
                hv.guest_agent(&name, DEFAULT_COMMAND_TIMEOUT)?.as_ref(),
                &outcomes,
            )
        })
        .await
    }
}

fn action_name(a: FileAction) -> &'static str {
    match a {
        FileAction::Modify => "modify",
        FileAction::Delete => "delete",
        FileAction::Create => "create",
    }
}

/// A dry run as a report.
pub fn report_plan(p: &StepPlan) -> PrepReport {
    let mut changes: Vec<ReportedChange> = p
        .changes
        .iter()
        .map(|c| ReportedChange {
            path: c.path.clone(),
            action: action_name(c.action).into(),
            diff: c.diff.clone(),
        })
        .collect();
    changes.extend(p.actions.iter().map(|a| ReportedChange {
        path: String::new(),
        action: a.clone(),
        diff: String::new(),
    }));
    PrepReport {
        step: p.step.name().into(),
        outcome: match p.status {
            PlanStatus::Changes => "planned",
            PlanStatus::NothingToDo => "unchanged",
            PlanStatus::NotApplicable => "not-applicable",
        }
        .into(),
        changes,
        message: p.notes.join("; "),
    }
}

/// An apply as a report.
pub fn report_outcome(o: &StepOutcome, restored: bool) -> PrepReport {
    let mut changes: Vec<ReportedChange> = o
        .files
        .iter()
        .map(|f| ReportedChange {
            path: f.path.clone(),
            action: action_name(f.action).into(),
            diff: String::new(),
        })
        .collect();
    changes.extend(o.unmounted.iter().map(|m| ReportedChange {
        path: m.target.clone(),
        action: "unmount".into(),
        diff: String::new(),
    }));
    let outcome = match (o.status, restored) {
        (OutcomeStatus::Applied, true) => "restored",
        (OutcomeStatus::Applied, false) => "applied",
        (OutcomeStatus::Unchanged, _) => "unchanged",
        (OutcomeStatus::NotApplicable, _) => "not-applicable",
    };
    PrepReport {
        step: o.step.name().into(),
        outcome: outcome.into(),
        changes,
        message: o.notes.join("; "),
    }
}

/// What a capture does with each prep change announced before it is made: journals it (see
/// [`prep::BeforeChange`]); sent to the blocking pool with the apply.
pub(super) type RecordPrep = Box<dyn FnMut(&[StepOutcome]) -> Result<()> + Send>;
