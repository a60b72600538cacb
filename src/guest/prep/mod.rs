//! The Linux image-prep steps, run inside a running guest through its guest agent.
//!
//! Four steps ([`PrepStep`]), each with a dry run, an apply, a check and an undo:
//!
//! - [`plan`] inspects the guest and returns, per step, the files it would change as unified
//!   diffs, the other actions it would take (unmounts, `swapoff`, Windows `netsh` commands) and
//!   notes for the operator. It changes nothing.
//! - [`apply`] does it. For each step: take down data-disk mounts and swap first (a busy mount
//!   fails the step before any file is touched), back up every file it changes, write the
//!   files (each replaced atomically, owner and mode kept), then inspect again: a step whose
//!   inspection still finds work is a failure. Applying twice changes nothing. If a step fails,
//!   what that step and the steps before it in the same call did is undone, and the error is
//!   returned: the guest is left as it was.
//! - [`check`] inspects and says, per step, whether anything is left to do.
//! - [`restore`] undoes applied steps from their [`StepOutcome`]s: every file back from its
//!   backup (checked against the recorded sha256), unmounted filesystems mounted again, swap
//!   switched on again; then the backups are removed. This is the "restore the source" option
//!   of quiesce captures: the image has the prepared state, the running source VM gets its own
//!   back right after the capture point.
//!
//! **Backups** live inside the guest, under [`BACKUP_ROOT`]`/<id>/<step>/<original path>`
//! (one `<id>` per [`apply`] call; directories mode 0700, files with their own mode and
//! owner), never next to the original: a copy beside `ifcfg-eth0` or in
//! `/etc/network/interfaces.d/` would itself be read as network configuration. They live under
//! `/run`, a tmpfs on every systemd guest, so they are never on the system disk: an image
//! captured after the apply holds no copy of the source's static addresses or data-disk lines.
//! [`restore`] removes them; after an [`apply`] without restore they stay until the guest
//! reboots.
//!
//! **Layout.** One module per step under `steps/` ([`dhcp`] with its netplan edit [`netplan`],
//! [`udev`], [`setpasswd`], [`fstab`]), each holding the step's pure text transforms and its
//! guest I/O; the runner (`runner.rs`) drives every step the same way through the step trait
//! (`steps/mod.rs`): inspect for a plan or a check; for an apply take down, back up and write
//! the files, run commands, inspect again; undo. The guest I/O shared by the steps and the
//! backups are in `io.rs`, the public types in `types.rs`. Files are edited as text
//! byte-exactly ([`text`]); a configuration file above [`MAX_CONFIG_BYTES`] is not edited (a
//! note says so).

mod io;
mod runner;
mod steps;
pub mod text;
mod types;

pub use io::{BACKUP_ROOT, MAX_CONFIG_BYTES};
pub use runner::{apply, apply_recorded, check, plan, restore, BeforeChange, UNDO_FAILED};
pub use steps::{dhcp, fstab, netplan, setpasswd, udev};
pub use types::{
    AppliedFile, FileAction, FileChange, OutcomeStatus, PlanStatus, PrepStep, StepCheck,
    StepOutcome, StepPlan, SwapRecord, Transform,
};
