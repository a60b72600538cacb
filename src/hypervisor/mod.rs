//! What the agent needs from a hypervisor, behind one small trait.
//!
//! [`Hypervisor`] is implemented by [`libvirt::Libvirt`] for real hosts; operations only see the
//! trait, so the operation logic can be tested without a hypervisor. Methods block (libvirt's
//! API is synchronous): async callers run them on tokio's blocking pool.

pub mod libvirt;
pub mod xml;

use crate::error::Result;

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
            }),
            None => self.disks.iter().find(|d| d.system_disk).ok_or_else(|| {
                precondition(format!("domain {} has no disk to capture", self.name))
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
    /// Sends one raw QEMU guest agent command (JSON) and returns the raw reply.
    fn agent_command(&self, name: &str, command: &str, timeout_secs: i32) -> Result<String>;
    /// Freezes every guest filesystem (guest-fsfreeze-freeze); returns how many.
    fn fs_freeze(&self, name: &str) -> Result<u32>;
    /// Thaws every guest filesystem; returns how many were thawed.
    fn fs_thaw(&self, name: &str) -> Result<u32>;
    /// Begins a backup job (`virDomainBackupBegin`) with the given backup and optional
    /// checkpoint XML.
    fn backup_begin(
        &self,
        name: &str,
        backup_xml: &str,
        checkpoint_xml: Option<&str>,
    ) -> Result<()>;
    /// Ends the domain's pull-mode backup job if it is the one exporting on `socket` (ours);
    /// Ok when no backup job runs. A backup job with another export was not started by us:
    /// FAILED_PRECONDITION naming it, and it is left running.
    fn backup_end(&self, name: &str, socket: &std::path::Path) -> Result<()>;
}

/// How to ask a guest to shut down.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShutdownHow {
    /// `guest-shutdown` through the QEMU guest agent.
    Agent,
    /// The ACPI power button.
    Acpi,
}
