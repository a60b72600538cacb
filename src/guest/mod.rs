//! Work inside running guests through the QEMU guest agent.
//!
//! - [`agent`]: the guest agent client ([`agent::GuestAgent`], [`agent::QgaClient`] over any
//!   [`agent::QgaTransport`]): run programs, read and write files, OS facts, freeze state,
//!   with the agent's limits respected and a hostile guest kept in bounds. The transports live
//!   with the hypervisor backends; nothing here knows a hypervisor.
//! - [`prep`]: the Linux image-prep steps (`dhcp`, `udev-net-rules`, `setpasswd-hook`,
//!   `fstab-data-disks`) with plan (dry run with diffs), apply, check and restore.

pub mod agent;
pub mod prep;

pub use agent::{ExecOutput, FreezeStatus, GuestAgent, OsInfo};
pub use prep::{PrepStep, StepCheck, StepOutcome, StepPlan};
