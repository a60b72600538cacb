//! An in-memory [`Hypervisor`] for tests: domains with states, disks and a guest agent channel,
//! a scripted guest agent (answers ping, OS info, freeze status and thaw; can be made
//! unreachable), a record of every call that changes a guest, and failures injected on demand.
//!
//! It keeps libvirt's rules where operations depend on them: only a shut-off domain starts,
//! only a running one shuts down, freezes or begins a backup; one backup job per domain, and
//! [`Hypervisor::end_backup`] ends only the job exporting on the given socket. A shutdown
//! completes at once. It reads and writes no disk: there is no data path here.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use super::{
    BackupBegun, BackupHandle, CheckpointPlan, DiskInfo, DomainInfo, DomainState, Hypervisor,
    ShutdownHow,
};
use crate::error::{internal, not_found, precondition, Result};
use crate::guest::agent::{ExecOutput, FreezeStatus, GuestAgent, NetInterface, OsInfo};

/// How a fake domain's guest agent behaves (when the domain has an agent channel).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FakeAgent {
    /// Answers; a Linux guest (`debian`).
    Linux,
    /// Answers; a Windows guest (`mswindows`).
    Windows,
    /// Never answers (not installed, hung).
    Unreachable,
}

/// A call that changes a guest, as recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Call {
    Start(String),
    Shutdown(String, ShutdownHow),
    Destroy(String),
    Freeze(String),
    /// A thaw, through the hypervisor or the guest agent.
    Thaw(String),
    /// A backup job begun: domain, exported disk.
    BackupBegin(String, String),
    /// A backup job of ours ended.
    BackupEnd(String),
}

/// What can be made to fail with [`FakeHypervisor::fail`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Step {
    Start,
    Shutdown,
    Destroy,
    Freeze,
    Thaw,
    BackupBegin,
    BackupEnd,
    CheckpointDelete,
}

/// One domain of the fake.
#[derive(Debug, Clone)]
pub struct FakeDomain {
    pub info: DomainInfo,
    pub agent: FakeAgent,
}

impl FakeDomain {
    /// A domain in `state` with a guest agent channel, a Linux agent that answers, and one
    /// qcow2 system disk `vda` at `/var/lib/libvirt/images/<name>.qcow2`.
    pub fn new(name: &str, state: DomainState) -> FakeDomain {
        FakeDomain {
            info: DomainInfo {
                name: name.to_string(),
                uuid: format!("00000000-0000-4000-8000-{:012x}", name.len()),
                state,
                persistent: true,
                disks: vec![DiskInfo {
                    target: "vda".into(),
                    path: format!("/var/lib/libvirt/images/{name}.qcow2"),
                    source_type: "file".into(),
                    format: "qcow2".into(),
                    device: "disk".into(),
                    boot_order: Some(1),
                    virtual_size: 1 << 30,
                    system_disk: true,
                }],
                has_agent_channel: true,
            },
            agent: FakeAgent::Linux,
        }
    }

    /// Without a guest agent channel.
    pub fn no_agent_channel(mut self) -> FakeDomain {
        self.info.has_agent_channel = false;
        self
    }

    /// With this guest agent behaviour.
    pub fn agent(mut self, agent: FakeAgent) -> FakeDomain {
        self.agent = agent;
        self
    }

    /// The system disk's file is `path`.
    pub fn disk_path(mut self, path: &Path) -> FakeDomain {
        self.info.disks[0].path = path.to_string_lossy().into_owned();
        self
    }
}

#[derive(Default)]
struct State {
    domains: BTreeMap<String, FakeDomain>,
    calls: Vec<Call>,
    failing: BTreeSet<Step>,
    frozen: BTreeSet<String>,
    /// Domain -> socket of its running backup job.
    jobs: BTreeMap<String, PathBuf>,
    /// Steps that fail a number of times more, with an error of the given kind.
    failing_times: BTreeMap<Step, (u32, crate::error::ErrorKind)>,
    /// [`Hypervisor::probe`] fails (see [`FakeHypervisor::set_reachable`]).
    unreachable: bool,
    /// Domain -> the checkpoints libvirt has a record of.
    checkpoints: BTreeMap<String, BTreeSet<String>>,
    /// Domain -> the checkpoint bitmaps in its disk image.
    bitmaps: BTreeMap<String, BTreeSet<String>>,
}

impl State {
    fn dom(&self, name: &str) -> Result<&FakeDomain> {
        self.domains
            .get(name)
            .ok_or_else(|| not_found(format!("domain {name} not found on this host")))
    }

    fn dom_mut(&mut self, name: &str) -> Result<&mut FakeDomain> {
        self.domains
            .get_mut(name)
            .ok_or_else(|| not_found(format!("domain {name} not found on this host")))
    }

    fn check(&mut self, step: Step) -> Result<()> {
        if self.failing.contains(&step) {
            return Err(internal(format!("injected failure: {step:?}")));
        }
        if let Some((n, kind)) = self.failing_times.get_mut(&step) {
            let kind = *kind;
            *n -= 1;
            if *n == 0 {
                self.failing_times.remove(&step);
            }
            return Err(crate::error::Error::new(
                kind,
                format!("injected failure: {step:?}"),
            ));
        }
        Ok(())
    }

    fn running(&self, name: &str, what: &str) -> Result<()> {
        let d = self.dom(name)?;
        if d.info.state != DomainState::Running {
            return Err(precondition(format!(
                "cannot {what} domain {name}: it is {}",
                d.info.state.as_str()
            )));
        }
        Ok(())
    }

    /// The agent answers: the domain runs, has a channel and a reachable agent.
    fn agent(&self, name: &str) -> Result<FakeAgent> {
        let d = self.dom(name)?;
        if d.info.state != DomainState::Running {
            return Err(precondition(format!(
                "domain {name} has no responding guest agent (the domain is not running)"
            )));
        }
        if !d.info.has_agent_channel || d.agent == FakeAgent::Unreachable {
            return Err(precondition(format!(
                "domain {name} has no responding guest agent"
            )));
        }
        Ok(d.agent)
    }
}

/// The in-memory hypervisor.
#[derive(Clone, Default)]
pub struct FakeHypervisor {
    state: Arc<Mutex<State>>,
}

impl FakeHypervisor {
    /// A hypervisor with these domains.
    pub fn new(domains: impl IntoIterator<Item = FakeDomain>) -> FakeHypervisor {
        let hv = FakeHypervisor::default();
        for d in domains {
            hv.add(d);
        }
        hv
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds (or replaces) a domain.
    pub fn add(&self, d: FakeDomain) {
        self.lock().domains.insert(d.info.name.clone(), d);
    }

    /// Sets a domain's state.
    pub fn set_state(&self, name: &str, state: DomainState) {
        if let Some(d) = self.lock().domains.get_mut(name) {
            d.info.state = state;
        }
    }

    /// Every call that changed a guest, in order.
    pub fn calls(&self) -> Vec<Call> {
        self.lock().calls.clone()
    }

    /// Makes every call of `step` fail (INTERNAL) until [`FakeHypervisor::heal`].
    pub fn fail(&self, step: Step) {
        self.lock().failing.insert(step);
    }

    /// Makes the next `times` calls of `step` fail with an error of `kind` (UNAVAILABLE: libvirtd
    /// restarting), then succeed again.
    pub fn fail_times(&self, step: Step, times: u32, kind: crate::error::ErrorKind) {
        if times > 0 {
            self.lock().failing_times.insert(step, (times, kind));
        }
    }

    /// Undoes [`FakeHypervisor::fail`].
    pub fn heal(&self, step: Step) {
        self.lock().failing.remove(&step);
    }

    /// Whether the domain's filesystems are frozen.
    pub fn is_frozen(&self, name: &str) -> bool {
        self.lock().frozen.contains(name)
    }

    /// Makes a backup job that another tool began, exporting on `socket`.
    pub fn foreign_backup(&self, name: &str, socket: &Path) {
        self.lock().jobs.insert(name.into(), socket.to_path_buf());
    }

    /// Makes [`Hypervisor::probe`] fail (`false`: the hypervisor is away) or answer again.
    pub fn set_reachable(&self, reachable: bool) {
        self.lock().unreachable = !reachable;
    }

    /// The checkpoint bitmaps in the domain's disk image.
    pub fn bitmaps(&self, name: &str) -> Vec<String> {
        self.lock()
            .bitmaps
            .get(name)
            .map(|b| b.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// The socket of the domain's running backup job, if one runs.
    pub fn backup_job(&self, name: &str) -> Option<PathBuf> {
        self.lock().jobs.get(name).cloned()
    }
}

impl Hypervisor for FakeHypervisor {
    fn probe(&self) -> Result<()> {
        if self.lock().unreachable {
            return Err(crate::error::Error::new(
                crate::error::ErrorKind::Unavailable,
                "the fake hypervisor is unreachable (set_reachable(false))",
            ));
        }
        Ok(())
    }

    fn list_domains(&self) -> Result<Vec<DomainInfo>> {
        Ok(self
            .lock()
            .domains
            .values()
            .map(|d| d.info.clone())
            .collect())
    }

    fn domain(&self, name: &str) -> Result<DomainInfo> {
        Ok(self.lock().dom(name)?.info.clone())
    }

    fn domain_state(&self, name: &str) -> Result<DomainState> {
        Ok(self.lock().dom(name)?.info.state)
    }

    fn start(&self, name: &str) -> Result<()> {
        let mut s = self.lock();
        s.check(Step::Start)?;
        let d = s.dom_mut(name)?;
        if d.info.state != DomainState::ShutOff {
            return Err(precondition(format!("domain {name} is already running")));
        }
        d.info.state = DomainState::Running;
        s.calls.push(Call::Start(name.into()));
        Ok(())
    }

    fn shutdown(&self, name: &str, how: ShutdownHow) -> Result<()> {
        let mut s = self.lock();
        s.check(Step::Shutdown)?;
        s.running(name, "shut down")?;
        if how == ShutdownHow::Agent {
            s.agent(name)?;
        }
        s.dom_mut(name)?.info.state = DomainState::ShutOff;
        s.frozen.remove(name);
        s.calls.push(Call::Shutdown(name.into(), how));
        Ok(())
    }

    fn destroy(&self, name: &str) -> Result<()> {
        let mut s = self.lock();
        s.check(Step::Destroy)?;
        let d = s.dom_mut(name)?;
        if d.info.state == DomainState::ShutOff {
            return Err(precondition(format!("domain {name} is not running")));
        }
        d.info.state = DomainState::ShutOff;
        s.frozen.remove(name);
        s.calls.push(Call::Destroy(name.into()));
        Ok(())
    }

    fn guest_agent(&self, name: &str, _command_timeout: Duration) -> Result<Arc<dyn GuestAgent>> {
        Ok(Arc::new(FakeGuestAgent {
            hv: self.clone(),
            domain: name.to_string(),
        }))
    }

    fn fs_freeze(&self, name: &str) -> Result<u32> {
        let mut s = self.lock();
        s.check(Step::Freeze)?;
        s.agent(name)?;
        s.frozen.insert(name.into());
        s.calls.push(Call::Freeze(name.into()));
        Ok(1)
    }

    fn fs_thaw(&self, name: &str) -> Result<u32> {
        let mut s = self.lock();
        s.check(Step::Thaw)?;
        s.agent(name)?;
        let n = u32::from(s.frozen.remove(name));
        s.calls.push(Call::Thaw(name.into()));
        Ok(n)
    }

    fn prepare_pull_backup(&self, dir: &Path, disk: &str) -> Result<BackupHandle> {
        Ok(BackupHandle::in_dir(dir, disk))
    }

    fn begin_pull_backup(
        &self,
        name: &str,
        backup: &BackupHandle,
        _disks: &[String],
        plan: &CheckpointPlan,
    ) -> Result<BackupBegun> {
        let mut s = self.lock();
        s.check(Step::BackupBegin)?;
        s.running(name, "back up")?;
        if s.jobs.contains_key(name) {
            return Err(precondition(format!(
                "domain {name} already runs a backup job"
            )));
        }
        let mut out = BackupBegun::default();
        if let Some(saved) = &plan.since {
            if s.bitmaps.get(name).is_some_and(|b| b.contains(&saved.name)) {
                s.checkpoints
                    .entry(name.into())
                    .or_default()
                    .insert(saved.name.clone());
                out.since = Some(saved.name.clone());
            } else {
                out.notes.push(format!(
                    "the changes since checkpoint {} cannot be told (no bitmap), so the whole disk is read",
                    saved.name
                ));
            }
        }
        if let Some(c) = &plan.create {
            s.checkpoints
                .entry(name.into())
                .or_default()
                .insert(c.clone());
            s.bitmaps.entry(name.into()).or_default().insert(c.clone());
            out.checkpoint = Some(c.clone());
        }
        s.jobs.insert(name.into(), backup.socket.clone());
        s.calls
            .push(Call::BackupBegin(name.into(), backup.export.clone()));
        Ok(out)
    }

    fn checkpoint_xml(&self, name: &str, checkpoint: &str) -> Result<String> {
        let s = self.lock();
        s.dom(name)?;
        if !s
            .checkpoints
            .get(name)
            .is_some_and(|c| c.contains(checkpoint))
        {
            return Err(not_found(format!(
                "domain {name} has no checkpoint {checkpoint}"
            )));
        }
        Ok(format!(
            "<domaincheckpoint><name>{checkpoint}</name></domaincheckpoint>"
        ))
    }

    fn delete_checkpoint(&self, name: &str, checkpoint: &str, keep_bitmap: bool) -> Result<()> {
        let mut s = self.lock();
        s.check(Step::CheckpointDelete)?;
        let running = s.dom(name)?.info.state == DomainState::Running;
        if let Some(c) = s.checkpoints.get_mut(name) {
            c.remove(checkpoint);
        }
        if !keep_bitmap && running {
            if let Some(b) = s.bitmaps.get_mut(name) {
                b.remove(checkpoint);
            }
        }
        Ok(())
    }

    fn checkpoints(&self, name: &str) -> Result<Vec<String>> {
        let s = self.lock();
        s.dom(name)?;
        Ok(s.checkpoints
            .get(name)
            .map(|c| c.iter().cloned().collect())
            .unwrap_or_default())
    }

    fn end_backup(&self, name: &str, backup: &BackupHandle) -> Result<()> {
        let mut s = self.lock();
        s.check(Step::BackupEnd)?;
        s.dom(name)?;
        match s.jobs.get(name) {
            None => Ok(()),
            Some(sock) if *sock != backup.socket => Err(precondition(format!(
                "domain {name} runs a backup job that imaged did not start (its export is not {}); \
                 it is left alone",
                backup.socket.display()
            ))),
            Some(_) => {
                s.jobs.remove(name);
                s.calls.push(Call::BackupEnd(name.into()));
                Ok(())
            }
        }
    }
}

/// The scripted guest agent of a fake domain. It runs no programs and has no files: `exec`
/// fails, `read_file` finds nothing, `list_dir` is empty, writes fail.
struct FakeGuestAgent {
    hv: FakeHypervisor,
    domain: String,
}

impl FakeGuestAgent {
    fn answering(&self) -> Result<FakeAgent> {
        self.hv.lock().agent(&self.domain)
    }

    fn no_files(&self) -> crate::error::Error {
        internal(format!(
            "the fake guest agent of domain {} keeps no files",
            self.domain
        ))
    }
}

impl GuestAgent for FakeGuestAgent {
    fn domain(&self) -> &str {
        &self.domain
    }

    fn ping(&self) -> Result<()> {
        self.answering().map(|_| ())
    }

    fn os_info(&self) -> Result<OsInfo> {
        let windows = self.answering()? == FakeAgent::Windows;
        let (id, name) = if windows {
            ("mswindows", "Microsoft Windows")
        } else {
            ("debian", "Debian GNU/Linux")
        };
        Ok(OsInfo {
            id: id.into(),
            name: name.into(),
            version_id: "12".into(),
            kernel: "6.1.0".into(),
            is_windows: windows,
        })
    }

    fn network_interfaces(&self) -> Result<Vec<NetInterface>> {
        self.answering().map(|_| Vec::new())
    }

    fn exec(&self, argv: &[&str], _stdin: Option<&[u8]>, _timeout: Duration) -> Result<ExecOutput> {
        self.answering()?;
        Err(internal(format!(
            "the fake guest agent of domain {} runs no programs (asked for `{}`)",
            self.domain,
            argv.join(" ")
        )))
    }

    fn read_file(&self, _path: &str) -> Result<Option<Vec<u8>>> {
        self.answering().map(|_| None)
    }

    fn write_file(&self, _path: &str, _data: &[u8], _mode: Option<u32>) -> Result<()> {
        self.answering()?;
        Err(self.no_files())
    }

    fn remove_file(&self, _path: &str) -> Result<()> {
        self.answering().map(|_| ())
    }

    fn list_dir(&self, _path: &str) -> Result<Vec<String>> {
        self.answering().map(|_| Vec::new())
    }

    fn rename(&self, _from: &str, _to: &str) -> Result<()> {
        self.answering()?;
        Err(self.no_files())
    }

    fn fsfreeze_status(&self) -> Result<FreezeStatus> {
        self.answering()?;
        Ok(if self.hv.is_frozen(&self.domain) {
            FreezeStatus::Frozen
        } else {
            FreezeStatus::Thawed
        })
    }

    fn fsfreeze_thaw(&self) -> Result<u32> {
        self.answering()?;
        let mut s = self.hv.lock();
        s.check(Step::Thaw)?;
        let n = u32::from(s.frozen.remove(&self.domain));
        s.calls.push(Call::Thaw(self.domain.clone()));
        Ok(n)
    }
}
