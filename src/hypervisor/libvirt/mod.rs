//! The libvirt backend of [`Hypervisor`], through the `virt` bindings.
//!
//! A connection is opened per call: libvirt calls are short and the daemon holds nothing
//! between operations (so there is no domain event subscription to renew either). Every call
//! goes through [`reconnect::Reconnect::call`], which rides through a libvirtd restart: when
//! libvirtd is away it waits, with backoff, up to `[libvirt] reconnect_timeout_secs`, and
//! repeats the call only when that is safe (reads, idempotent changes). [`connect`] and
//! [`lookup`] are the one place that opens libvirt and finds a domain.
//!
//! - [`backup`]: pull-mode backup jobs (`virDomainBackupBegin`): the job's directory owned by
//!   the user QEMU runs as, the backup XML, ending only our own job;
//! - [`agent`]: the guest agent channel (`virDomainQemuAgentCommand`) behind
//!   [`crate::guest::agent::QgaClient`], waiting out a libvirtd restart the same way;
//! - [`reconnect`]: the waiting and the retry rules.

pub mod agent;
pub mod backup;
pub mod checkpoint;
pub mod reconnect;

use virt::connect::Connect;
use virt::domain::Domain;
use virt::enumutil::Enum;
use virt::error::ErrorNumber;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use super::{
    xml, BackupBegun, BackupHandle, CheckpointPlan, DiskInfo, DomainInfo, DomainState, Hypervisor,
    ShutdownHow,
};
use crate::error::{Error, ErrorKind, Result};
use crate::guest::agent::GuestAgent;
pub use agent::{LibvirtAgent, LibvirtChannel};
pub use backup::qemu_ids;
use reconnect::{Reconnect, Retry};

/// libvirt at one URI.
pub struct Libvirt {
    uri: String,
    reconnect: Reconnect,
}

impl Libvirt {
    /// A backend for `uri` (e.g. `qemu:///system`) that waits up to
    /// [`reconnect::DEFAULT_RECONNECT_TIMEOUT`] for an unreachable libvirtd. Nothing is opened
    /// yet.
    pub fn new(uri: &str) -> Libvirt {
        Libvirt {
            uri: uri.to_string(),
            reconnect: Reconnect::new(uri, reconnect::DEFAULT_RECONNECT_TIMEOUT),
        }
    }

    /// Waits up to `bound` for an unreachable libvirtd (`[libvirt] reconnect_timeout_secs`;
    /// zero: fail at once).
    pub fn with_reconnect_timeout(mut self, bound: Duration) -> Libvirt {
        self.reconnect = Reconnect::new(&self.uri, bound);
        self
    }

    /// Opens a connection, mapping failure to UNAVAILABLE. No waiting.
    pub fn connect(&self) -> Result<Connect> {
        connect(&self.uri)
    }

    /// `f` on a connection, through [`Reconnect::call`].
    fn call<T>(&self, what: &str, retry: Retry, f: impl Fn(&Connect) -> Result<T>) -> Result<T> {
        self.reconnect.call(what, retry, || connect(&self.uri), f)
    }

    /// `f` on domain `name`, through [`Reconnect::call`]: connecting and the lookup always
    /// wait for libvirtd; `f` is repeated only when `retry` is [`Retry::Safe`].
    fn on_domain<T>(
        &self,
        name: &str,
        what: &str,
        retry: Retry,
        f: impl Fn(&Domain) -> Result<T>,
    ) -> Result<T> {
        self.reconnect.call(
            what,
            retry,
            || {
                let conn = connect(&self.uri)?;
                let dom = lookup(&conn, name)?;
                Ok((dom, conn))
            },
            |(dom, _conn)| f(dom),
        )
    }

    fn info(&self, dom: &Domain) -> Result<DomainInfo> {
        let name = dom
            .name()
            .map_err(|e| libvirt_err("reading a domain's name", e))?;
        let uuid = dom
            .uuid_string()
            .map_err(|e| libvirt_err(format!("reading domain {name}'s uuid"), e))?;
        let state = state_of(dom, &name)?;
        let persistent = dom.is_persistent().unwrap_or(false);
        let desc = dom
            .xml_desc(0)
            .map_err(|e| libvirt_err(format!("reading domain {name}'s XML"), e))?;
        let (mut disks, has_agent_channel) = xml::parse_domain_xml(&desc)?;
        for d in disks.iter_mut() {
            fill_size(dom, d);
        }
        Ok(DomainInfo {
            name,
            uuid,
            state,
            persistent,
            disks,
            has_agent_channel,
        })
    }
}

/// Opens a connection to libvirt at `uri`, mapping failure to UNAVAILABLE.
pub fn connect(uri: &str) -> Result<Connect> {
    Connect::open(Some(uri)).map_err(|e| {
        Error::new(
            ErrorKind::Unavailable,
            format!("cannot connect to libvirt at {uri} (is libvirtd running?)"),
        )
        .with_reason("HYPERVISOR_UNAVAILABLE")
        .with_source(e)
    })
}

/// Finds domain `name`; NOT_FOUND when there is none.
pub fn lookup(conn: &Connect, name: &str) -> Result<Domain> {
    conn.lookup_domain_by_name(name).map_err(|e| {
        if e.code() == Enum::Known(ErrorNumber::NoDomain) {
            Error::new(
                ErrorKind::NotFound,
                format!("domain {name} not found on this host"),
            )
            .with_reason("DOMAIN_NOT_FOUND")
            .with_subject(format!("domains/{name}"))
        } else {
            libvirt_err(format!("looking up domain {name}"), e)
        }
    })
}

fn fill_size(dom: &Domain, d: &mut DiskInfo) {
    if d.target.is_empty() || d.path.is_empty() {
        return;
    }
    if let Ok(bi) = dom.block_info(&d.target, 0) {
        d.virtual_size = bi.capacity;
    }
}

fn state_of(dom: &Domain, name: &str) -> Result<DomainState> {
    use virt::domain::DomainState as S;
    let (state, _reason) = dom
        .state()
        .map_err(|e| libvirt_err(format!("reading domain {name}'s state"), e))?;
    Ok(match state {
        Enum::Known(S::Running) => DomainState::Running,
        Enum::Known(S::Blocked) => DomainState::Blocked,
        Enum::Known(S::Paused) => DomainState::Paused,
        Enum::Known(S::Shutdown) => DomainState::ShuttingDown,
        Enum::Known(S::Shutoff) => DomainState::ShutOff,
        Enum::Known(S::Crashed) => DomainState::Crashed,
        Enum::Known(S::PMSuspended) => DomainState::Suspended,
        _ => DomainState::NoState,
    })
}

pub(crate) fn libvirt_err(what: impl Into<String>, e: virt::error::Error) -> Error {
    let kind = match e.code() {
        Enum::Known(ErrorNumber::NoDomain) => ErrorKind::NotFound,
        Enum::Known(ErrorNumber::OperationInvalid) => ErrorKind::FailedPrecondition,
        // OperationTimeout: "cannot acquire state change lock", another libvirt job still
        // holds the domain; it passes, so it is a retry-later, not an internal fault.
        Enum::Known(ErrorNumber::NoConnect)
        | Enum::Known(ErrorNumber::SystemError)
        | Enum::Known(ErrorNumber::OperationTimeout) => ErrorKind::Unavailable,
        _ => ErrorKind::Internal,
    };
    let reason = match kind {
        ErrorKind::Unavailable => "HYPERVISOR_UNAVAILABLE",
        _ => "HYPERVISOR_ERROR",
    };
    Error::new(kind, what).with_reason(reason).with_source(e)
}

impl Hypervisor for Libvirt {
    fn list_domains(&self) -> Result<Vec<DomainInfo>> {
        let what = format!("listing domains at {}", self.uri);
        self.call(&what, Retry::Safe, |conn| {
            let doms = conn
                .list_all_domains(0)
                .map_err(|e| libvirt_err(what.clone(), e))?;
            let mut out = Vec::with_capacity(doms.len());
            for d in &doms {
                match self.info(d) {
                    Ok(i) => out.push(i),
                    // A domain undefined while we list it is simply gone.
                    Err(e) if e.kind() == ErrorKind::NotFound => {}
                    Err(e) => return Err(e),
                }
            }
            out.sort_by(|a, b| a.name.cmp(&b.name));
            Ok(out)
        })
    }

    fn domain(&self, name: &str) -> Result<DomainInfo> {
        let what = format!("reading domain {name}");
        self.on_domain(name, &what, Retry::Safe, |dom| self.info(dom))
    }

    fn domain_state(&self, name: &str) -> Result<DomainState> {
        let what = format!("reading domain {name}'s state");
        self.on_domain(name, &what, Retry::Safe, |dom| state_of(dom, name))
    }

    fn start(&self, name: &str) -> Result<()> {
        let what = format!("starting domain {name}");
        self.on_domain(name, &what, Retry::ConnectOnly, |dom| {
            dom.create().map_err(|e| libvirt_err(what.clone(), e))?;
            Ok(())
        })
    }

    fn shutdown(&self, name: &str, how: ShutdownHow) -> Result<()> {
        let what = format!("asking domain {name} to shut down ({how:?})");
        let flags = match how {
            ShutdownHow::Agent => virt::sys::VIR_DOMAIN_SHUTDOWN_GUEST_AGENT,
            ShutdownHow::Acpi => virt::sys::VIR_DOMAIN_SHUTDOWN_ACPI_POWER_BTN,
        };
        self.on_domain(name, &what, Retry::ConnectOnly, |dom| {
            dom.shutdown_flags(flags)
                .map_err(|e| libvirt_err(what.clone(), e))
        })
    }

    fn destroy(&self, name: &str) -> Result<()> {
        let what = format!("forcing domain {name} off");
        self.on_domain(name, &what, Retry::ConnectOnly, |dom| {
            dom.destroy().map_err(|e| libvirt_err(what.clone(), e))
        })
    }

    fn guest_agent(&self, name: &str, command_timeout: Duration) -> Result<Arc<dyn GuestAgent>> {
        Ok(Arc::new(
            LibvirtAgent::with_reconnect(self.reconnect.clone(), name)
                .with_command_timeout(command_timeout),
        ))
    }

    fn fs_freeze(&self, name: &str) -> Result<u32> {
        let what = format!("freezing the filesystems of domain {name}");
        // Not repeated: a freeze that went through and is asked again fails in the guest
        // ("already frozen"), and the caller must know the guest may be frozen.
        self.on_domain(name, &what, Retry::ConnectOnly, |dom| {
            // SAFETY: `dom` is a live domain handle for the duration of the call; a null
            // mountpoint list with count 0 means "all filesystems", as libvirt documents.
            let n =
                unsafe { virt::sys::virDomainFSFreeze(dom.as_ptr(), std::ptr::null_mut(), 0, 0) };
            if n < 0 {
                return Err(agent_err(
                    name,
                    "freezing the filesystems of",
                    virt::error::Error::last_error(),
                ));
            }
            Ok(n as u32)
        })
    }

    fn fs_thaw(&self, name: &str) -> Result<u32> {
        let what = format!("thawing the filesystems of domain {name}");
        // A thaw asked twice thaws nothing the second time: safe to repeat.
        self.on_domain(name, &what, Retry::Safe, |dom| {
            // SAFETY: as in fs_freeze.
            let n = unsafe { virt::sys::virDomainFSThaw(dom.as_ptr(), std::ptr::null_mut(), 0, 0) };
            if n < 0 {
                return Err(agent_err(
                    name,
                    "thawing the filesystems of",
                    virt::error::Error::last_error(),
                ));
            }
            Ok(n as u32)
        })
    }

    fn prepare_pull_backup(&self, dir: &Path, disk: &str) -> Result<BackupHandle> {
        backup::job_dir(dir)?;
        Ok(BackupHandle::in_dir(dir, disk))
    }

    fn begin_pull_backup(
        &self,
        name: &str,
        backup: &BackupHandle,
        disks: &[String],
        checkpoints: &CheckpointPlan,
    ) -> Result<BackupBegun> {
        let what = format!("beginning a backup job on domain {name}");
        self.on_domain(name, &what, Retry::ConnectOnly, |dom| {
            backup::begin(dom, name, backup, disks, checkpoints)
        })
    }

    fn checkpoint_xml(&self, name: &str, cp: &str) -> Result<String> {
        let what = format!("reading checkpoint {cp} of domain {name}");
        self.on_domain(name, &what, Retry::Safe, |dom| {
            checkpoint::xml(dom, name, cp)
        })
    }

    fn delete_checkpoint(&self, name: &str, cp: &str, keep_bitmap: bool) -> Result<()> {
        let what = format!("deleting checkpoint {cp} of domain {name}");
        // Deleting twice is fine: the second time finds none.
        self.on_domain(name, &what, Retry::Safe, |dom| {
            checkpoint::delete(dom, name, cp, keep_bitmap)
        })
    }

    fn checkpoints(&self, name: &str) -> Result<Vec<String>> {
        let what = format!("listing the checkpoints of domain {name}");
        self.on_domain(name, &what, Retry::Safe, |dom| checkpoint::list(dom, name))
    }

    fn end_backup(&self, name: &str, backup: &BackupHandle) -> Result<()> {
        // Ending our job twice is fine: the second time finds none.
        let what = format!("ending the backup job of domain {name}");
        self.on_domain(name, &what, Retry::Safe, |dom| {
            backup::end(dom, name, backup)
        })
    }

    fn probe(&self) -> Result<()> {
        let conn = self.connect()?;
        conn.lib_version().map_err(|e| {
            Error::new(
                ErrorKind::Unavailable,
                format!("libvirt at {} does not answer", self.uri),
            )
            .with_source(e)
        })?;
        Ok(())
    }
}

/// Guest agent failures: not configured or not answering is FAILED_PRECONDITION, a timeout
/// UNAVAILABLE.
fn agent_err(name: &str, what: &str, e: virt::error::Error) -> Error {
    let kind = match e.code() {
        Enum::Known(ErrorNumber::AgentUnresponsive)
        | Enum::Known(ErrorNumber::ArgumentUnsupported) => ErrorKind::FailedPrecondition,
        Enum::Known(ErrorNumber::OperationInvalid) => ErrorKind::FailedPrecondition,
        Enum::Known(ErrorNumber::OperationTimeout) => ErrorKind::Unavailable,
        _ => ErrorKind::Internal,
    };
    Error::new(
        kind,
        format!("{what} domain {name} failed (is the QEMU guest agent running in it?)"),
    )
    .with_source(e)
}
