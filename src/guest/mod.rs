//! Work inside running guests through the QEMU guest agent.
//!
//! - [`agent`]: the guest agent client ([`agent::GuestAgent`]; [`agent::LibvirtAgent`] over a
//!   libvirt URI, [`agent::HypervisorAgent`] over a [`crate::hypervisor::Hypervisor`]
//!   backend): run programs, read and write files, OS facts, with the agent's limits respected
//!   and a hostile guest kept in bounds.
//! - [`prep`]: the Linux image-prep steps (`dhcp`, `udev-net-rules`, `setpasswd-hook`,
//!   `fstab-data-disks`) with plan (dry run with diffs), apply, check and restore.

pub mod agent;
pub mod prep;

pub use agent::{ExecOutput, GuestAgent, HypervisorAgent, LibvirtAgent, OsInfo};
pub use prep::{PrepStep, StepCheck, StepOutcome, StepPlan};
