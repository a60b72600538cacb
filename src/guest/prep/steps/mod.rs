//! The prep steps, one module each, and what they have in common: the [`Step`] trait the
//! runner drives them through, and the [`Inspection`] a step returns when it looks at a guest.
//!
//! - [`dhcp`] (`dhcp`): static NIC configuration becomes DHCP; its netplan edit is
//!   [`netplan`]. On a Windows guest, `netsh` commands instead.
//! - [`udev`] (`udev-net-rules`): the persistent-net udev rules are removed.
//! - [`setpasswd`] (`setpasswd-hook`): `sh /etc/init.d/setpasswd.sh` is hooked into the rc
//!   script.
//! - [`fstab`] (`fstab-data-disks`): data-disk filesystems and swap come down and their
//!   `/etc/fstab` lines are removed.
//!
//! Each module holds the step's pure text transforms (with their tests) and its guest I/O: the
//! inspection, and for `fstab-data-disks` and Windows `dhcp` the actions besides file edits
//! and their undo. Backing up, writing and restoring files is the same for every step and is
//! done by the runner.

pub mod dhcp;
pub mod fstab;
pub mod netplan;
pub mod setpasswd;
pub mod udev;

use super::io::GuestIo;
use super::{FileAction, PlanStatus, PrepStep, StepOutcome};
use crate::error::{Error, Result};
use fstab::Mount;

/// One prep step, as the runner drives it.
///
/// - plan and check: [`Step::inspect`] (or [`Step::inspect_windows`]) only;
/// - apply: inspect; [`Step::take_down`]; the runner backs up and writes the files of the
///   inspection's edits; [`Step::run_commands`]; inspect again (work left is a failure). On a
///   failure the runner undoes what the outcome records so far;
/// - restore (and that undo): the runner puts the files back, then [`Step::undo`].
///
/// Each part of an apply records what it did in the [`StepOutcome`] as it goes, so that
/// whatever point a failure comes at, the outcome tells what to undo.
pub(crate) trait Step: Sync {
    /// Which step this is.
    fn id(&self) -> PrepStep;

    /// What the step would do in a Linux guest. Changes nothing.
    fn inspect(&self, io: &GuestIo<'_>) -> Result<Inspection>;

    /// What the step would do in a Windows guest. Changes nothing. By default the step does
    /// not apply there.
    fn inspect_windows(&self, _io: &GuestIo<'_>) -> Result<Inspection> {
        Ok(Inspection {
            applicable: false,
            notes: vec![format!(
                "{} is a Linux step; this is a Windows guest",
                self.id()
            )],
            ..Inspection::default()
        })
    }

    /// Apply, before any file is touched: what must come down first (swap, mounts), each
    /// recorded in `done` once it is down. A failure here stops the step before its files
    /// change. Nothing by default.
    fn take_down(
        &self,
        _io: &GuestIo<'_>,
        _work: &Inspection,
        _done: &mut StepOutcome,
    ) -> Result<()> {
        Ok(())
    }

    /// Apply, after the files are written: the inspection's commands, each recorded in `done`
    /// once it ran. Nothing by default.
    fn run_commands(
        &self,
        _io: &GuestIo<'_>,
        _work: &Inspection,
        _done: &mut StepOutcome,
    ) -> Result<()> {
        Ok(())
    }

    /// Undo, after the runner put the files back: what [`Step::take_down`] and
    /// [`Step::run_commands`] recorded in `done`. Every part is attempted; failures go to
    /// `errors`. Nothing by default.
    fn undo(&self, _io: &GuestIo<'_>, _done: &StepOutcome, _errors: &mut Vec<Error>) {}
}

/// The step that `id` names.
pub(crate) fn step(id: PrepStep) -> &'static dyn Step {
    match id {
        PrepStep::Dhcp => &dhcp::Dhcp,
        PrepStep::UdevNetRules => &udev::UdevNetRules,
        PrepStep::SetpasswdHook => &setpasswd::SetpasswdHook,
        PrepStep::FstabDataDisks => &fstab::FstabDataDisks,
    }
}

/// A file change found by an inspection: `old` is the content inspected (none: the file is
/// created), `new` what it becomes (none: the file is removed).
#[derive(Debug, Clone)]
pub(crate) struct Edit {
    pub(crate) path: String,
    pub(crate) old: Option<Vec<u8>>,
    pub(crate) new: Option<Vec<u8>>,
}

impl Edit {
    /// What happens to the file.
    pub(crate) fn action(&self) -> FileAction {
        match (&self.old, &self.new) {
            (None, _) => FileAction::Create,
            (Some(_), None) => FileAction::Delete,
            (Some(_), Some(_)) => FileAction::Modify,
        }
    }
}

/// What a step would do, found by inspecting the guest.
#[derive(Debug, Clone, Default)]
pub(crate) struct Inspection {
    /// The step applies to this guest.
    pub(crate) applicable: bool,
    pub(crate) edits: Vec<Edit>,
    /// Filesystems to unmount, in this order.
    pub(crate) unmounts: Vec<Mount>,
    /// Swap areas to switch off.
    pub(crate) swapoffs: Vec<String>,
    /// Commands to run, each as its argv.
    pub(crate) commands: Vec<Vec<String>>,
    pub(crate) notes: Vec<String>,
}

impl Inspection {
    /// Nothing to do.
    pub(crate) fn is_empty(&self) -> bool {
        self.edits.is_empty()
            && self.unmounts.is_empty()
            && self.swapoffs.is_empty()
            && self.commands.is_empty()
    }

    /// The actions besides file edits, in words (for a plan).
    pub(crate) fn actions(&self) -> Vec<String> {
        let mut a: Vec<String> = self
            .unmounts
            .iter()
            .map(|m| format!("unmount {} ({}, {})", m.target, m.source, m.fstype))
            .collect();
        a.extend(self.swapoffs.iter().map(|s| format!("swapoff {s}")));
        a.extend(self.commands.iter().map(|c| c.join(" ")));
        a
    }

    /// The plan status this inspection amounts to.
    pub(crate) fn status(&self) -> PlanStatus {
        if !self.applicable {
            PlanStatus::NotApplicable
        } else if self.is_empty() {
            PlanStatus::NothingToDo
        } else {
            PlanStatus::Changes
        }
    }

    /// What is left to do, in words (for a check).
    pub(crate) fn problems(&self) -> Vec<String> {
        let mut p: Vec<String> = self
            .edits
            .iter()
            .map(|e| match e.action() {
                FileAction::Delete => format!("{} still exists", e.path),
                _ => format!("{} is not prepared", e.path),
            })
            .collect();
        p.extend(
            self.unmounts
                .iter()
                .map(|m| format!("{} ({}) is mounted", m.target, m.source)),
        );
        p.extend(self.swapoffs.iter().map(|s| format!("swap {s} is active")));
        p.extend(
            self.commands
                .iter()
                .map(|c| format!("not yet run: {}", c.join(" "))),
        );
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_step_has_its_module() {
        for id in PrepStep::ALL {
            assert_eq!(step(id).id(), id);
        }
    }
}
