//! What the agent needs from a hypervisor, behind one small trait.
//!
//! [`Hypervisor`] is implemented by [`libvirt::Libvirt`] for real hosts and by
//! [`fake::FakeHypervisor`] in memory; operations only see the trait, so the operation logic can
//! be tested without a hypervisor. The trait speaks the agent's vocabulary, not the backend's:
//! a pull-mode backup is a [`BackupHandle`] (where its NBD export is served), the guest agent a
//! typed [`GuestAgent`]; backup XML, QEMU's user and the agent's JSON stay in the backend.
//! Methods block (libvirt's API is synchronous): async callers run them on tokio's blocking
//! pool. The libvirt backend's may block longer: a call that finds libvirtd away waits for it,
//! up to `[libvirt] reconnect_timeout_secs` (see [`libvirt::reconnect`]); only
//! [`Hypervisor::probe`] never waits.

pub mod fake;
pub mod libvirt;
pub mod xml;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::error::Result;
use crate::guest::agent::GuestAgent;

/// The run state of a domain, as libvirt reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DomainState {
    NoState,
    Running,
    Blocked,
    Paused,
    ShuttingDown,
    ShutOff,
    Crashed,
    Suspended,
}

impl DomainState {
    /// Lower-case words as `virsh domstate` prints them.
    pub fn as_str(self) -> &'static str {
        match self {
            DomainState::NoState => "no state",
            DomainState::Running => "running",
            DomainState::Blocked => "blocked",
            DomainState::Paused => "paused",
            DomainState::ShuttingDown => "in shutdown",
            DomainState::ShutOff => "shut off",
            DomainState::Crashed => "crashed",
            DomainState::Suspended => "pmsuspended",
        }
    }
}

/// One disk of a domain, from its XML definition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskInfo {
    /// Guest device name ("vda").
    pub target: String,
    /// Host path of the top image ("" when the disk has no local file or device).
    pub path: String,
    /// libvirt's disk source type: "file", "block", "network", "volume".
    pub source_type: String,
    /// Image format of the top image ("qcow2", "raw"; "" when not given).
    pub format: String,
    /// "disk", "cdrom", "floppy", "lun".
    pub device: String,
    /// `<boot order='N'/>` on the disk, if any.
    pub boot_order: Option<u32>,
    /// Guest-visible size in bytes; 0 when unknown.
    pub virtual_size: u64,
    /// Whether this is the disk captured by default.
    pub system_disk: bool,
}

/// A domain and its disks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainInfo {
    pub name: String,
    pub uuid: String,
    pub state: DomainState,
    pub persistent: bool,
    pub disks: Vec<DiskInfo>,
    /// Has a virtio channel named `org.qemu.guest_agent.0`.
    pub has_agent_channel: bool,
}

impl DomainInfo {
    /// The disk to capture: `target` when given, else the system disk.
    pub fn disk(&self, target: Option<&str>) -> Result<&DiskInfo> {
        use crate::error::{not_found, precondition};
        match target {
            Some(t) => self.disks.iter().find(|d| d.target == t).ok_or_else(|| {
                let have: Vec<&str> = self.disks.iter().map(|d| d.target.as_str()).collect();
                not_found(format!(
                    "domain {} has no disk {t} (its disks: {})",
                    self.name,
                    if have.is_empty() {
                        "none".to_string()
                    } else {
                        have.join(", ")
                    }
                ))
                .with_reason("DISK_NOT_FOUND")
                .with_field("disk")
            }),
            None => self.disks.iter().find(|d| d.system_disk).ok_or_else(|| {
                precondition(format!("domain {} has no disk to capture", self.name))
                    .with_reason("DOMAIN_HAS_NO_DISK")
                    .with_subject(format!("domains/{}", self.name))
            }),
        }
    }
}

/// The hypervisor operations the agent uses.
pub trait Hypervisor: Send + Sync + 'static {
    /// Every domain, running or not, sorted by name.
    fn list_domains(&self) -> Result<Vec<DomainInfo>>;
    /// One domain; NOT_FOUND when unknown.
    fn domain(&self, name: &str) -> Result<DomainInfo>;
    /// The current state only (cheaper than [`Hypervisor::domain`]).
    fn domain_state(&self, name: &str) -> Result<DomainState>;
    /// Starts a defined, shut-off domain.
    fn start(&self, name: &str) -> Result<()>;
    /// Asks the guest to shut down (through its agent, or by the ACPI power button); returns
    /// at once: poll [`Hypervisor::domain_state`].
    fn shutdown(&self, name: &str, how: ShutdownHow) -> Result<()>;
    /// Pulls the plug.
    fn destroy(&self, name: &str) -> Result<()>;
    /// The guest agent of domain `name`, each command allowed `command_timeout`. Getting it
    /// may open nothing: an agent that is absent or silent fails on its first command.
    fn guest_agent(&self, name: &str, command_timeout: Duration) -> Result<Arc<dyn GuestAgent>>;
    /// Freezes every guest filesystem (guest-fsfreeze-freeze); returns how many.
    fn fs_freeze(&self, name: &str) -> Result<u32>;
    /// Thaws every guest filesystem; returns how many were thawed.
    fn fs_thaw(&self, name: &str) -> Result<u32>;
    /// Makes `dir` (created anew) ready to hold a pull-mode backup of disk `disk`: its export
    /// socket and scratch data. Nothing is begun yet.
    fn prepare_pull_backup(&self, dir: &Path, disk: &str) -> Result<BackupHandle>;
    /// Begins the pull-mode backup job of `backup` on running domain `name` (the consistency
    /// point); `disks` are the domain's disks, all but the exported one left out of the job.
    /// `checkpoints` asks for a checkpoint made with the job and for an export of only what
    /// changed since an earlier one; what could be had is in the answer, with the reasons for
    /// what could not (never an error: a full, checkpoint-less job is always the fallback).
    fn begin_pull_backup(
        &self,
        name: &str,
        backup: &BackupHandle,
        disks: &[String],
        checkpoints: &CheckpointPlan,
    ) -> Result<BackupBegun>;
    /// The XML of checkpoint `checkpoint` of domain `name`, as [`SavedCheckpoint::xml`] keeps it
    /// to define it again later.
    fn checkpoint_xml(&self, name: &str, checkpoint: &str) -> Result<String>;
    /// Deletes checkpoint `checkpoint` of domain `name`: only libvirt's record of it with
    /// `keep_bitmap` (its dirty bitmap stays in the disk image, so the checkpoint can be
    /// defined again from its saved XML), else the bitmap too (the domain must run; a shut-off
    /// domain only loses the record). Ok when there is no such checkpoint.
    fn delete_checkpoint(&self, name: &str, checkpoint: &str, keep_bitmap: bool) -> Result<()>;
    /// The names of domain `name`'s checkpoints that libvirt has a record of.
    fn checkpoints(&self, name: &str) -> Result<Vec<String>>;
    /// Ends the domain's pull-mode backup job if it is ours (the one exporting on
    /// `backup.socket`); Ok when no backup job runs. A backup job with another export was not
    /// started by us: FAILED_PRECONDITION naming it, and it is left running.
    fn end_backup(&self, name: &str, backup: &BackupHandle) -> Result<()>;
    /// Whether the hypervisor answers now: one cheap round trip, never waiting for it to come
    /// back (health checks call this every few seconds). UNAVAILABLE saying why when it does
    /// not.
    fn probe(&self) -> Result<()>;
}

/// A pull-mode backup job's export: what capture needs to read it and to end it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupHandle {
    /// The job's own directory (the socket, scratch data); its owner removes it after the job.
    pub dir: PathBuf,
    /// The NBD unix socket the export is served on.
    pub socket: PathBuf,
    /// The NBD export name (the disk's target, "vda").
    pub export: String,
}

impl BackupHandle {
    /// The handle of a job whose directory is `dir`, exporting disk `export`. The export name
    /// is not needed to end a job (a recovered journal entry may not know it).
    pub fn in_dir(dir: &Path, export: &str) -> BackupHandle {
        BackupHandle {
            dir: dir.to_path_buf(),
            socket: dir.join("nbd.sock"),
            export: export.to_string(),
        }
    }
}

/// Checkpoints asked of a pull-mode backup job (see [`Hypervisor::begin_pull_backup`]).
///
/// A checkpoint is a point in a disk's history: libvirt's record of it plus a persistent dirty
/// bitmap in the disk's qcow2 image that marks every block written since. imaged keeps the
/// record only while a capture runs and saves its XML instead (see
/// `crate::ops::capture::incremental`), so a domain at rest has no checkpoint metadata and
/// `virsh undefine` works as before.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CheckpointPlan {
    /// A checkpoint to create with the job (the job's point in time), on the exported disk.
    pub create: Option<String>,
    /// Export only what changed since this earlier checkpoint (defined again from its XML).
    pub since: Option<SavedCheckpoint>,
}

/// A checkpoint as saved between captures: its name and the XML to define it again.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SavedCheckpoint {
    pub name: String,
    pub xml: String,
}

/// What a begun pull-mode backup job has of what its [`CheckpointPlan`] asked.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BackupBegun {
    /// The checkpoint created with the job.
    pub checkpoint: Option<String>,
    /// The checkpoint the job's changes are counted from: its export offers the dirty bitmap
    /// [`BackupBegun::dirty_context`] of the blocks written since.
    pub since: Option<String>,
    /// Why something asked was not had (a checkpoint that could not be made, an earlier one
    /// that is gone or broken), in words for the operation's report.
    pub notes: Vec<String>,
}

impl BackupBegun {
    /// The NBD meta context of the dirty bitmap of an incremental job on `disk`: QEMU names it
    /// after the bitmap libvirt exports, `backup-<disk>`.
    pub fn dirty_context(disk: &str) -> String {
        format!("qemu:dirty-bitmap:backup-{disk}")
    }
}

/// How to ask a guest to shut down.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShutdownHow {
    /// `guest-shutdown` through the QEMU guest agent.
    Agent,
    /// The ACPI power button.
    Acpi,
}
