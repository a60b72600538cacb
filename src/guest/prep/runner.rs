//! The runner: [`plan`], [`check`], [`apply`] and [`restore`] over a list of steps, driving
//! each through its [`Step`] (see the module doc of [`super`] for what each does). It does what
//! is the same for every step: the plan's diffs, the check's verdicts, backing up and writing
//! the files an inspection edits, the check after an apply, and the all-or-nothing undo: a
//! failed apply undoes that step's part and the steps before it in the same call.

use std::collections::BTreeSet;

use super::io::{GuestIo, BACKUP_ROOT};
use super::steps::{step, Inspection, Step};
use super::text;
use super::{FileChange, OutcomeStatus, PrepStep, StepCheck, StepOutcome, StepPlan};
use crate::error::{Error, ErrorKind, Result};
use crate::guest::agent::GuestAgent;

/// What `step` would do in this guest (Linux or Windows).
fn inspect(io: &GuestIo<'_>, step: &dyn Step) -> Result<Inspection> {
    if io.os.is_windows {
        step.inspect_windows(io)
    } else {
        step.inspect(io)
    }
}

/// The dry run of `steps`: per step, the diffs of the files it would change, its other
/// actions and notes. Changes nothing in the guest.
pub fn plan(agent: &dyn GuestAgent, steps: &[PrepStep]) -> Result<Vec<StepPlan>> {
    let io = GuestIo::new(agent)?;
    steps
        .iter()
        .map(|&id| {
            let w = inspect(&io, step(id))?;
            Ok(StepPlan {
                step: id,
                status: w.status(),
                changes: w
                    .edits
                    .iter()
                    .map(|e| FileChange {
                        path: e.path.clone(),
                        action: e.action(),
                        diff: text::unified_diff(
                            &e.path,
                            e.old.as_deref().map(text::display_text).as_deref(),
                            e.new.as_deref().map(text::display_text).as_deref(),
                        ),
                    })
                    .collect(),
                actions: w.actions(),
                notes: w.notes,
            })
        })
        .collect()
}

/// Whether each step has anything left to do.
pub fn check(agent: &dyn GuestAgent, steps: &[PrepStep]) -> Result<Vec<StepCheck>> {
    let io = GuestIo::new(agent)?;
    steps
        .iter()
        .map(|&id| {
            let w = inspect(&io, step(id))?;
            Ok(StepCheck {
                step: id,
                ok: w.is_empty(),
                status: w.status(),
                problems: w.problems(),
                notes: w.notes,
            })
        })
        .collect()
}

/// Applies `steps` in order (see the module doc). On failure, everything this call changed is
/// undone before the error is returned.
pub fn apply(agent: &dyn GuestAgent, steps: &[PrepStep]) -> Result<Vec<StepOutcome>> {
    let io = GuestIo::new(agent)?;
    let backup_root = format!("{BACKUP_ROOT}/{}", crate::util::random_id("apply"));
    let mut done: Vec<StepOutcome> = Vec::new();
    for &id in steps {
        match apply_step(&io, step(id), &format!("{backup_root}/{id}")) {
            Ok(o) => done.push(o),
            Err(e) => {
                if done.iter().any(|o| o.status == OutcomeStatus::Applied) {
                    if let Err(r) = restore_with(&io, &done) {
                        tracing::error!(
                            domain = io.dom(),
                            error = %e.chain(),
                            undo_error = %r.chain(),
                            "a prep step failed, and undoing the steps before it failed too"
                        );
                        return Err(Error::new(
                            e.kind(),
                            format!("{e}; undoing the steps applied before it failed too"),
                        )
                        .with_source(r));
                    }
                }
                return Err(e);
            }
        }
    }
    Ok(done)
}

/// Applies one step, its backups under `backup_root`; on failure, undoes what it did.
fn apply_step(io: &GuestIo<'_>, step: &dyn Step, backup_root: &str) -> Result<StepOutcome> {
    let id = step.id();
    let w = inspect(io, step)?;
    let mut o = StepOutcome {
        step: id,
        status: OutcomeStatus::Unchanged,
        files: Vec::new(),
        unmounted: Vec::new(),
        swaps_off: Vec::new(),
        commands: Vec::new(),
        backup_dir: None,
        notes: w.notes.clone(),
    };
    if !w.applicable {
        o.status = OutcomeStatus::NotApplicable;
        return Ok(o);
    }
    if w.is_empty() {
        return Ok(o);
    }
    o.status = OutcomeStatus::Applied;
    let result = (|| -> Result<()> {
        // 1. What must come down first (swap and mounts on data disks): a busy mount stops
        //    the step before any file changes.
        step.take_down(io, &w, &mut o)?;
        // 2. Backups of every file, checked.
        if !w.edits.is_empty() {
            o.backup_dir = Some(backup_root.to_string());
        }
        let backups = io.back_up(&w.edits, backup_root)?;
        // 3. The changes.
        for (e, b) in w.edits.iter().zip(backups) {
            o.files.push(b);
            match &e.new {
                Some(bytes) => io.agent.write_file(&e.path, bytes, None)?,
                None => io.agent.remove_file(&e.path)?,
            }
        }
        // 4. Commands (Windows).
        step.run_commands(io, &w, &mut o)?;
        // 5. The check.
        let after = inspect(io, step)?;
        if !after.is_empty() && !io.os.is_windows {
            return Err(Error::new(
                ErrorKind::Internal,
                format!(
                    "{id} in domain {}: the check after applying still finds work: {}",
                    io.dom(),
                    after.problems().join("; ")
                ),
            ));
        }
        Ok(())
    })();
    match result {
        Ok(()) => Ok(o),
        Err(e) => {
            // Undo this step's part.
            if let Err(r) = restore_with(io, std::slice::from_ref(&o)) {
                tracing::error!(domain = io.dom(), step = %id, error = %e.chain(),
                    undo_error = %r.chain(), "a prep step failed, and undoing it failed too");
                return Err(Error::new(
                    e.kind(),
                    format!("{e}; undoing what the step had done failed too"),
                )
                .with_source(r));
            }
            Err(e)
        }
    }
}

/// Undoes applied steps (see the module doc): files first, then mounts and swap, in reverse
/// step order; the backups are removed when everything came back. Every part is attempted;
/// the first failure is returned (naming how many parts failed), the others are logged.
pub fn restore(agent: &dyn GuestAgent, outcomes: &[StepOutcome]) -> Result<()> {
    restore_with(&GuestIo::without_os_facts(agent), outcomes)
}

fn restore_with(io: &GuestIo<'_>, outcomes: &[StepOutcome]) -> Result<()> {
    let mut errors: Vec<Error> = Vec::new();
    for o in outcomes.iter().rev() {
        if o.status != OutcomeStatus::Applied {
            continue;
        }
        for f in o.files.iter().rev() {
            if let Err(e) = io.restore_file(f) {
                errors.push(e);
            }
        }
        step(o.step).undo(io, o, &mut errors);
    }
    if errors.is_empty() {
        let dirs: BTreeSet<&str> = outcomes
            .iter()
            .filter_map(|o| o.backup_dir.as_deref())
            .filter(|d| d.starts_with(BACKUP_ROOT) && !d.contains("/../"))
            .collect();
        for d in dirs {
            io.remove_backups(d);
        }
        return Ok(());
    }
    let n = errors.len();
    for e in &errors[1..] {
        tracing::error!(domain = io.dom(), error = %e.chain(), "restoring a prep change failed");
    }
    let first = errors.remove(0);
    if n == 1 {
        return Err(first);
    }
    Err(Error::new(
        first.kind(),
        format!(
            "restoring the prep changes in domain {} failed in {n} places (the first below, the \
             others in the log)",
            io.dom()
        ),
    )
    .with_source(first))
}
