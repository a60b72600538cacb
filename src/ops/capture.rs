//! Captures: from a request to an image, by mode.
//!
//! | mode | the domain | consistency point | how the disk is read |
//! |---|---|---|---|
//! | cold | shut off | — | `qemu-nbd --read-only` on the disk file |
//! | shutdown | running or shut off | the guest powered off (agent, else ACPI; forced only when asked) | as cold; started again if `restart` |
//! | quiesce | running, agent answers | filesystems frozen, backup job begun, thawed at once | QEMU's pull-mode backup export |
//! | crash-consistent | running | backup job begun | QEMU's pull-mode backup export |
//!
//! Every precondition is checked before the call returns (the mode and option decision is
//! [`super::mode::decide`]); the work then runs as an operation. What a capture does to the
//! guest that must be undone or finished (a freeze, a backup job, a shutdown to restart from,
//! prep changes) is recorded in the [`Journal`] first, so a restarted daemon finishes it.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use std::collections::BTreeMap;
use std::sync::Arc;

use super::journal::{wait_for_agent, Entry, Journal};
use super::mode::{consistency_of, decide, needs_agent, AgentState, Asked, Decision, Facts, Mode};
use super::prep::report_outcome;
use super::{blocking, check_readable, Controller, OpEntry, OpKind, OpState, Operation};
use crate::capture::live;
use crate::capture::source::{BlockSource, NbdExport};
use crate::capture::stream::{self, StreamPlan};
use crate::capture::{self as pipeline};
use crate::error::{precondition, Error, ErrorKind, Result};
use crate::format::Format;
use crate::guest::prep::{PrepStep, StepOutcome};
use crate::hypervisor::{BackupHandle, DomainInfo, DomainState, ShutdownHow};
use crate::repo::manifest::{content_digest, FORMAT_VERSION};
use crate::repo::{ImageRecord, ImageWriter, CHUNK_SIZE};
use crate::upload::file::FileTarget;
use crate::upload::{StreamTarget, UploadMeta};
use crate::util::{now_unix, validate_image_name};

/// A capture request.
#[derive(Debug, Clone)]
pub struct CaptureParams {
    pub domain: String,
    pub image_name: String,
    pub request_id: String,
    /// Disk target; `None` for the system disk.
    pub disk: Option<String>,
    pub mode: Mode,
    pub shutdown_timeout: Duration,
    pub force_off: bool,
    pub restart: bool,
    /// Where the image goes.
    pub target: TargetSpec,
    /// Prep step names ("dhcp", ..., "all") run in the guest before the consistency point.
    pub prep: Vec<String>,
    /// quiesce: undo the prep in the running guest right after the consistency point.
    pub restore_source: bool,
}

/// Where a capture writes the image.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum TargetSpec {
    /// The local repository (chunks, dedup).
    #[default]
    Repository,
    /// One file on this host, written as a stream.
    File {
        path: PathBuf,
        format: Format,
        overwrite: bool,
    },
    /// A `[targets.NAME]` of the config (Glance, S3).
    Remote { name: String, format: Format },
}

/// Where the task sends the bytes.
enum Sink {
    Repository(ImageWriter),
    Stream {
        target: Box<dyn StreamTarget>,
        format: Format,
    },
}

impl Default for CaptureParams {
    fn default() -> Self {
        CaptureParams {
            domain: String::new(),
            image_name: String::new(),
            request_id: String::new(),
            disk: None,
            mode: Mode::Auto,
            shutdown_timeout: Duration::from_secs(120),
            force_off: false,
            restart: false,
            target: TargetSpec::Repository,
            prep: Vec::new(),
            restore_source: false,
        }
    }
}

/// What the checks decided: everything the task needs.
struct Plan {
    mode: Mode,
    decision: Decision,
    info: DomainInfo,
    target: String,
    path: PathBuf,
    format: String,
    was_running: bool,
    /// What the guest agent said of the OS, when it was asked.
    os: Option<GuestOs>,
    /// Prep steps to apply before the consistency point.
    steps: Vec<PrepStep>,
}

impl Controller {
    /// Starts a capture of a domain's disk (see [`Mode`]).
    pub async fn capture(&self, p: CaptureParams) -> Result<Operation> {
        validate_image_name(&p.image_name)?;
        // Every parameter but the request id: a retry must ask for the same capture.
        let fp = format!(
            "{:?}",
            CaptureParams {
                request_id: String::new(),
                ..p.clone()
            }
        );
        if let Some(op) = self.same_request(&p.request_id, OpKind::Capture, &fp)? {
            return Ok(op);
        }
        let info = self.domain(&p.domain).await?;
        let steps = super::prep::parse_steps(&p.prep)?;
        let asked = Asked {
            mode: p.mode,
            prep: !steps.is_empty(),
            restore_source: p.restore_source,
            restart: p.restart,
            force_off: p.force_off,
        };
        let (agent, os) = if !info.has_agent_channel {
            (AgentState::NoChannel, None)
        } else if needs_agent(&asked, info.state, info.has_agent_channel) {
            match self.agent_os(&info).await {
                Ok(os) if os.is_windows => (AgentState::Windows, Some(os)),
                Ok(os) => (AgentState::Linux, Some(os)),
                Err(e) => {
                    tracing::info!(domain = %info.name, error = %e.chain(), "guest agent does not answer");
                    (AgentState::Silent, None)
                }
            }
        } else {
            (AgentState::NotAsked, None)
        };
        let decision = decide(
            &asked,
            &Facts {
                domain: &info.name,
                state: info.state,
                has_agent_channel: info.has_agent_channel,
                agent,
            },
        )?;
        let mode = decision.mode;
        let disk = info.disk(p.disk.as_deref())?.clone();
        if disk.path.is_empty() || !matches!(disk.source_type.as_str(), "file" | "block") {
            return Err(precondition(format!(
                "disk {} of domain {} is a {} disk with no local path; only file and block disks can be captured",
                disk.target, info.name, disk.source_type
            )));
        }
        if matches!(mode, Mode::Cold | Mode::Shutdown) {
            check_readable(
                std::path::Path::new(&disk.path),
                &format!("disk {} of domain {}", disk.target, info.name),
            )?;
        }
        let sink = self.open_sink(&p).await?;
        let op = OpEntry::new(
            OpKind::Capture,
            &info.name,
            &p.image_name,
            &p.request_id,
            &disk.path,
        );
        op.set_consistency(consistency_of(mode));
        {
            let mut t = self.table();
            if let Some(holder) = t.domain_locks.get(&info.name) {
                return Err(Error::new(
                    ErrorKind::Aborted,
                    format!(
                        "domain {} is held by operation {holder}; wait for it or cancel it",
                        info.name
                    ),
                ));
            }
            if let Some(op) = Self::request_matching(&t, &p.request_id, OpKind::Capture, &fp)? {
                return Ok(op);
            }
            t.domain_locks.insert(info.name.clone(), op.id.clone());
            self.insert(&mut t, &op);
            t.fingerprints.insert(op.id.clone(), fp);
        }
        tracing::info!(op = %op.id, domain = %info.name, disk = %disk.target, mode = ?mode, image = %p.image_name, "capture queued");
        let plan = Plan {
            steps,
            mode,
            decision,
            was_running: decision.was_running,
            os,
            target: disk.target.clone(),
            path: PathBuf::from(&disk.path),
            format: if disk.format.is_empty() {
                "raw".into()
            } else {
                disk.format.clone()
            },
            info,
        };
        let ctl = self.clone();
        let entry = op.clone();
        tokio::spawn(async move {
            let res = ctl.run_capture(&entry, sink, plan, p).await;
            ctl.end(&entry, res);
        });
        Ok(op.snapshot())
    }

    /// Prepares where the bytes go, checking it before anything is read: the repository name
    /// is reserved; a stream target is reached and its credentials checked.
    async fn open_sink(&self, p: &CaptureParams) -> Result<Sink> {
        let (target, format): (Box<dyn StreamTarget>, Format) = match &p.target {
            TargetSpec::Repository => {
                return Ok(Sink::Repository(self.reserve(&p.image_name).await?))
            }
            TargetSpec::File {
                path,
                format,
                overwrite,
            } => (
                Box::new(
                    FileTarget::new(path, *overwrite)?
                        .with_mode(self.inner.cfg.export_file_mode()?),
                ),
                *format,
            ),
            TargetSpec::Remote { name, format } => {
                let cfg = self.inner.cfg.targets.get(name).cloned().ok_or_else(|| {
                    let known: Vec<&str> = self.inner.cfg.targets.keys().map(String::as_str).collect();
                    crate::error::not_found(format!(
                        "target {name} is not configured (configured: {}); add a [targets.{name}] table to the config",
                        if known.is_empty() { "none".to_string() } else { known.join(", ") }
                    ))
                })?;
                (cfg.build()?, *format)
            }
        };
        target.check().await.map_err(|e| {
            let kind = e.kind();
            Error::new(
                kind,
                format!("target {} cannot take the image", target.describe()),
            )
            .with_source(e)
        })?;
        Ok(Sink::Stream { target, format })
    }

    /// Pings the guest agent and reads the OS; FAILED_PRECONDITION when it does not answer.
    async fn agent_os(&self, info: &DomainInfo) -> Result<GuestOs> {
        if !info.has_agent_channel {
            return Err(precondition(format!(
                "domain {} has no guest agent channel (org.qemu.guest_agent.0); add one and install qemu-guest-agent in the guest",
                info.name
            )));
        }
        let name = info.name.clone();
        let os = self
            .hv(move |hv| {
                let agent = hv.guest_agent(&name, Duration::from_secs(5))?;
                agent.ping()?;
                agent.os_info()
            })
            .await?;
        // The id comes from inside the guest: it reaches Glance's `os_distro` only when it
        // looks like an OS id (lower-case letters, digits, '.', '_', '-'; 1 to 64 of them).
        let id = Some(os.id.as_str())
            .filter(|id| !id.is_empty())
            .and_then(|id| {
                let ok = valid_os_id(id);
                if !ok {
                    tracing::warn!(domain = %info.name, id = %id.escape_debug(), "ignoring the OS id the guest agent reported: not a plain OS id");
                }
                ok.then(|| id.to_string())
            });
        Ok(GuestOs {
            is_windows: id.as_deref() == Some("mswindows"),
            id,
        })
    }

    async fn run_capture(
        &self,
        op: &OpEntry,
        writer: Sink,
        plan: Plan,
        p: CaptureParams,
    ) -> Result<()> {
        let _permit = self.slot(op).await?;
        op.set_state(OpState::Preparing);
        match plan.mode {
            Mode::Cold | Mode::Auto => self.cold_read(op, writer, &plan).await,
            Mode::Shutdown => self.shutdown_capture(op, writer, &plan, &p).await,
            Mode::Quiesce | Mode::CrashConsistent => self.live_capture(op, writer, &plan).await,
        }
    }

    /// Prep in the running guest, shut it down, read the disk cold; then, whatever happened,
    /// start it again when asked and undo the prep when asked (or when the capture failed).
    async fn shutdown_capture(
        &self,
        op: &OpEntry,
        writer: Sink,
        plan: &Plan,
        p: &CaptureParams,
    ) -> Result<()> {
        let name = plan.info.name.clone();
        let journal = Journal::new(&self.inner.cfg.capture.run_dir);
        let mut entry = Entry::new(&op.id, &name);
        let applied = self.prep_before(op, plan).await?;
        entry.prep = applied.clone();
        entry.restart = plan.decision.restart;
        if let Err(e) = journal.write(&entry) {
            if let Some(outcomes) = applied {
                self.undo_prep(op, &name, outcomes, false).await;
            }
            return Err(e);
        }
        report_applied(op, &applied);
        let res = async {
            if plan.was_running {
                entry.shutting_down = true;
                journal.write(&entry)?;
                self.shut_down(op, &plan.info, p.shutdown_timeout, p.force_off)
                    .await?;
            }
            self.cold_read(op, writer, plan).await
        }
        .await;
        // A shutdown asked for and then interrupted (cancel, timeout) may still be under way:
        // let it finish before deciding whether there is a guest to start again.
        let wait_off = if entry.shutting_down && res.is_err() {
            p.shutdown_timeout
        } else {
            Duration::ZERO
        };
        entry.shutting_down = false;
        let mut res = res;
        if entry.restart {
            match self.start_again(op, &name, wait_off).await {
                Ok(()) => {
                    entry.restart = false;
                    journal.update(&entry);
                }
                Err(e) => {
                    // The journal keeps the duty: the next daemon start tries again.
                    tracing::error!(op = %op.id, domain = %name, error = %e.chain(), "could not start the domain again");
                    if res.is_ok() {
                        res = Err(Error::new(
                            e.kind(),
                            format!("image {} was captured, but domain {name} could not be started again", op.image_name),
                        )
                        .with_source(e));
                    }
                }
            }
        }
        if let Some(outcomes) = applied {
            let undo = plan.decision.restore_source || res.is_err();
            let done = !undo
                || self
                    .undo_prep_when_running(op, &name, outcomes, plan.decision.restore_source)
                    .await;
            // Not done (the guest is off, or its agent never answered): the journal keeps
            // the duty for a later start of the daemon.
            if done {
                entry.prep = None;
            }
            journal.update(&entry);
        }
        res
    }

    /// Starts a domain that a shutdown capture shut down (nothing to do when it runs). With
    /// `wait_off`, first gives a shutdown under way that long to complete.
    async fn start_again(&self, op: &OpEntry, name: &str, wait_off: Duration) -> Result<()> {
        let t0 = Instant::now();
        while t0.elapsed() < wait_off {
            let n = name.to_string();
            if self.hv(move |hv| hv.domain_state(&n)).await? == DomainState::ShutOff {
                break;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let n = name.to_string();
        let started = self
            .hv(move |hv| {
                if hv.domain_state(&n)? == DomainState::ShutOff {
                    hv.start(&n)?;
                    return Ok(true);
                }
                Ok(false)
            })
            .await?;
        if started {
            tracing::info!(op = %op.id, domain = %name, "domain started again");
        }
        Ok(())
    }

    /// Undoes prep in a guest that may be booting: waits (bounded by `capture.agent_wait_secs`)
    /// for its agent, then restores. A guest left shut off keeps the prep, and the operation
    /// says so.
    async fn undo_prep_when_running(
        &self,
        op: &OpEntry,
        name: &str,
        outcomes: Vec<StepOutcome>,
        asked: bool,
    ) -> bool {
        let n = name.to_string();
        let state = self.hv(move |hv| hv.domain_state(&n)).await;
        if matches!(state, Ok(DomainState::ShutOff)) {
            tracing::warn!(op = %op.id, domain = %name, "the domain is shut off with the prep changes applied");
            op.set_prep(
                outcomes
                    .iter()
                    .map(|o| {
                        let mut r = report_outcome(o, false);
                        r.message = format!(
                            "not undone yet: domain {name} is shut off with these changes applied; \
                             imaged undoes them at its next start once the domain runs"
                        );
                        r
                    })
                    .collect(),
            );
            return false;
        }
        let wait = Duration::from_secs(self.inner.cfg.capture.agent_wait_secs);
        if let Err(e) = wait_for_agent(self.inner.hv.clone(), name, wait).await {
            tracing::error!(op = %op.id, domain = %name, error = %e.chain(), "cannot undo the prep changes");
            op.set_prep(
                outcomes
                    .iter()
                    .map(|o| {
                        let mut r = report_outcome(o, false);
                        r.outcome = "failed".into();
                        r.message = format!("restoring the source failed: {}", e.chain());
                        r
                    })
                    .collect(),
            );
            return false;
        }
        self.undo_prep(op, name, outcomes, asked).await;
        true
    }

    /// Prep (if any), then the live read; a failed capture gives the source its
    /// configuration back, whatever was asked.
    async fn live_capture(&self, op: &OpEntry, writer: Sink, plan: &Plan) -> Result<()> {
        let name = plan.info.name.clone();
        let journal = Journal::new(&self.inner.cfg.capture.run_dir);
        let mut entry = Entry::new(&op.id, &name);
        let applied = self.prep_before(op, plan).await?;
        entry.prep = applied.clone();
        if let Err(e) = journal.write(&entry) {
            if let Some(outcomes) = applied {
                self.undo_prep(op, &name, outcomes, false).await;
            }
            return Err(e);
        }
        report_applied(op, &applied);
        let mut restore = applied;
        let res = self
            .live_read(op, writer, plan, &mut restore, &journal, &mut entry)
            .await;
        if let (Err(_), Some(outcomes)) = (&res, restore) {
            self.undo_prep(op, &name, outcomes, false).await;
        }
        entry.prep = None;
        journal.update(&entry);
        res
    }

    /// Applies the plan's prep steps in the running guest; None when there are none. The
    /// caller journals the outcomes, then reports them ([`report_applied`]).
    async fn prep_before(&self, op: &OpEntry, plan: &Plan) -> Result<Option<Vec<StepOutcome>>> {
        if plan.steps.is_empty() {
            return Ok(None);
        }
        let name = plan.info.name.clone();
        tracing::info!(op = %op.id, domain = %name, steps = ?plan.steps, "applying prep steps");
        let outcomes = self
            .apply_prep(&name, plan.steps.clone())
            .await
            .map_err(|e| {
                Error::new(
                    e.kind(),
                    format!("prep steps failed in domain {name}; the guest was left as it was"),
                )
                .with_source(e)
            })?;
        Ok(Some(outcomes))
    }

    /// Restores prep changes in the running source; reports the outcome on the operation.
    async fn undo_prep(&self, op: &OpEntry, domain: &str, outcomes: Vec<StepOutcome>, asked: bool) {
        let reports: Vec<_> = outcomes.iter().map(|o| report_outcome(o, true)).collect();
        match self.restore_prep(domain, outcomes).await {
            Ok(()) => {
                tracing::info!(op = %op.id, domain, asked, "prep changes undone in the source");
                op.set_prep(reports);
            }
            Err(e) => {
                tracing::error!(op = %op.id, domain, error = %e.chain(), "could not undo the prep changes in the source");
                op.set_prep(
                    reports
                        .into_iter()
                        .map(|mut r| {
                            r.outcome = "failed".into();
                            r.message = format!("restoring the source failed: {}", e.chain());
                            r
                        })
                        .collect(),
                );
            }
        }
    }

    /// Shuts a guest down: agent first when it has one, ACPI otherwise (or when the agent
    /// does not take it); forced off only when asked.
    async fn shut_down(
        &self,
        op: &OpEntry,
        info: &DomainInfo,
        timeout: Duration,
        force: bool,
    ) -> Result<()> {
        let name = info.name.clone();
        let t0 = Instant::now();
        let mut how = if info.has_agent_channel {
            ShutdownHow::Agent
        } else {
            ShutdownHow::Acpi
        };
        loop {
            let n = name.clone();
            match self.hv(move |hv| hv.shutdown(&n, how)).await {
                Ok(()) => break,
                Err(e) if how == ShutdownHow::Agent => {
                    tracing::warn!(op = %op.id, domain = %name, error = %e.chain(), "agent shutdown refused; trying ACPI");
                    how = ShutdownHow::Acpi;
                }
                Err(e) => return Err(e),
            }
        }
        tracing::info!(op = %op.id, domain = %name, how = ?how, "shutdown requested");
        let mut acpi_fallback_sent = how == ShutdownHow::Acpi;
        loop {
            op.cancel.check()?;
            let n = name.clone();
            if self.hv(move |hv| hv.domain_state(&n)).await? == DomainState::ShutOff {
                tracing::info!(op = %op.id, domain = %name, seconds = t0.elapsed().as_secs(), "domain is shut off");
                return Ok(());
            }
            // An agent that accepted the command but did nothing: try the power button halfway.
            if !acpi_fallback_sent && t0.elapsed() > timeout / 2 {
                acpi_fallback_sent = true;
                let n = name.clone();
                let _ = self.hv(move |hv| hv.shutdown(&n, ShutdownHow::Acpi)).await;
            }
            if t0.elapsed() > timeout {
                if force {
                    tracing::warn!(op = %op.id, domain = %name, "shutdown timed out; forcing the domain off");
                    let n = name.clone();
                    self.hv(move |hv| hv.destroy(&n)).await?;
                    return Ok(());
                }
                return Err(precondition(format!(
                    "domain {name} did not shut down within {} s; retry with force_off, or shut it down by hand",
                    timeout.as_secs()
                )));
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// Reads a shut-off domain's disk file through qemu-nbd.
    async fn cold_read(&self, op: &OpEntry, writer: Sink, plan: &Plan) -> Result<()> {
        let cfg = &self.inner.cfg.capture;
        let export = Arc::new(
            NbdExport::start(
                &cfg.qemu_nbd,
                &plan.path,
                &plan.format,
                &cfg.run_dir,
                &op.id,
                cfg.readers,
            )
            .await?,
        );
        // The domain may have been started between our check and qemu-nbd taking the image
        // lock; from here on it cannot start on this disk.
        let d = plan.info.name.clone();
        let state = self.hv(move |hv| hv.domain_state(&d)).await?;
        if state != DomainState::ShutOff {
            drop(export);
            return Err(precondition(format!(
                "domain {} was started ({}) while the capture was being prepared",
                plan.info.name,
                state.as_str()
            )));
        }
        self.deliver(op, writer, export, &plan.provenance()).await
    }

    /// Reads a running domain's disk from a pull-mode backup job.
    /// With `restore` set (restore-source), the prep changes are undone in the guest right
    /// after the consistency point, before the disk is read.
    async fn live_read(
        &self,
        op: &OpEntry,
        writer: Sink,
        plan: &Plan,
        restore: &mut Option<Vec<StepOutcome>>,
        journal: &Journal,
        entry: &mut Entry,
    ) -> Result<()> {
        let cfg = &self.inner.cfg.capture;
        let quiesce = plan.mode == Mode::Quiesce;
        let all: Vec<String> = plan
            .info
            .disks
            .iter()
            .filter(|d| d.device == "disk")
            .map(|d| d.target.clone())
            .collect();
        entry.backup_dir = cfg.run_dir.join(format!("backup-{}", op.id));
        entry.frozen = quiesce;
        journal.write(entry)?;
        let max_freeze = Duration::from_millis(cfg.max_freeze_ms);
        let begun = live::begin(
            self.inner.hv.clone(),
            &plan.info.name,
            &plan.target,
            &all,
            &cfg.run_dir,
            &op.id,
            quiesce,
            max_freeze,
        )
        .await;
        // The journal keeps the freeze until the thaw is confirmed (a failed thaw leaves a
        // watchdog that dies with the daemon), and the job until it is known ended.
        let thawed = !quiesce
            || live::thaw_until_thawed(
                self.inner.hv.clone(),
                plan.info.name.clone(),
                Duration::from_secs(30),
            )
            .await;
        if thawed {
            entry.frozen = false;
            journal.update(entry);
        }
        let (export, point) = match begun {
            Ok(x) => x,
            Err(e) => {
                // `begin` ended what it started; a job begun late (after its call timed
                // out) is ended here too, and only ours ever is.
                let (d, job) = (
                    plan.info.name.clone(),
                    BackupHandle::in_dir(&entry.backup_dir, &plan.target),
                );
                if self.hv(move |hv| hv.end_backup(&d, &job)).await.is_ok() {
                    let _ = std::fs::remove_dir_all(&entry.backup_dir);
                    entry.backup_dir = Default::default();
                    journal.update(entry);
                }
                return Err(e);
            }
        };
        op.set_freeze_window(point.freeze_window_ms);
        if plan.decision.restore_source {
            if let Some(outcomes) = restore.take() {
                self.undo_prep(op, &plan.info.name, outcomes, true).await;
                entry.prep = None;
                journal.update(entry);
            }
        }
        if quiesce {
            tracing::info!(op = %op.id, domain = %plan.info.name, filesystems = point.frozen_filesystems, freeze_window_ms = point.freeze_window_ms, "guest thawed");
        }
        let export = Arc::new(export);
        let res = self
            .deliver(op, writer, export.clone(), &plan.provenance())
            .await;
        let ended = export.end().await;
        if ended.is_ok() {
            entry.backup_dir = Default::default();
            journal.update(entry);
        }
        res?;
        ended
    }

    /// Sends the disk to its sink: the chunk pipeline into the repository, or one byte stream
    /// into a stream target.
    async fn deliver(
        &self,
        op: &OpEntry,
        sink: Sink,
        source: Arc<dyn BlockSource>,
        from: &Provenance,
    ) -> Result<()> {
        match sink {
            Sink::Repository(writer) => self.store(op, writer, source.as_ref(), from).await,
            Sink::Stream { target, format } => {
                self.stream_out(op, target.as_ref(), format, source, from)
                    .await
            }
        }
    }

    /// One byte stream (qcow2 or raw) into a stream target; nothing is stored on this host.
    async fn stream_out(
        &self,
        op: &OpEntry,
        target: &dyn StreamTarget,
        format: Format,
        source: Arc<dyn BlockSource>,
        from: &Provenance,
    ) -> Result<()> {
        op.set_state(OpState::Saving);
        let started = Instant::now();
        let max = self.inner.cfg.repository.max_virtual_size;
        let plan = Arc::new(StreamPlan::new(source.as_ref(), format, max).await?);
        let meta = UploadMeta {
            name: op.image_name.clone(),
            format: format.as_str().to_string(),
            size: plan.size,
            properties: self.image_properties(from, plan.virtual_size),
        };
        let readers = self.inner.cfg.capture.readers;
        let (progress, cancel) = (op.progress.clone(), op.cancel.clone());
        let factory = move || {
            stream::byte_stream(
                plan.clone(),
                source.clone(),
                readers,
                progress.clone(),
                cancel.clone(),
            )
        };
        let uploaded = target.upload(&meta, &factory).await?;
        op.set_location(&uploaded.location);
        tracing::info!(
            op = %op.id, image = %op.image_name, target = %target.describe(), location = %uploaded.location,
            bytes = uploaded.size, sha256 = %uploaded.sha256, seconds = format!("{:.2}", started.elapsed().as_secs_f64()),
            "image streamed"
        );
        Ok(())
    }

    /// Properties a Nova-style consumer expects, and ours.
    fn image_properties(&self, from: &Provenance, virtual_size: u64) -> BTreeMap<String, String> {
        let mut p = BTreeMap::new();
        p.insert("architecture".into(), std::env::consts::ARCH.into());
        p.insert(
            "min_disk".into(),
            virtual_size.div_ceil(1 << 30).to_string(),
        );
        p.insert(
            "hw_qemu_guest_agent".into(),
            if from.agent { "yes" } else { "no" }.into(),
        );
        if let Some(os) = &from.os_type {
            p.insert("os_type".into(), os.clone());
        }
        if let Some(d) = &from.os_distro {
            p.insert("os_distro".into(), d.clone());
        }
        p.insert("imaged_source_host".into(), self.inner.host.clone());
        p.insert("imaged_source_domain".into(), from.domain.clone());
        p.insert("imaged_source_disk".into(), from.disk.clone());
        p.insert("imaged_consistency".into(), from.consistency.clone());
        p
    }

    /// The chunk pipeline from `source` into the repository, then the commit.
    pub(super) async fn store(
        &self,
        op: &OpEntry,
        writer: ImageWriter,
        source: &dyn BlockSource,
        from: &Provenance,
    ) -> Result<()> {
        let readers = self.inner.cfg.capture.readers;
        op.set_state(OpState::Saving);
        let started = Instant::now();
        let captured = pipeline::run(
            source,
            readers,
            self.inner.cfg.repository.max_virtual_size,
            writer.chunk_sink(),
            op.progress.clone(),
            op.cancel.clone(),
        )
        .await;
        let captured = match captured {
            Ok(c) => c,
            Err(e) => {
                // Release the chunks this capture wrote off the async threads.
                let _ = blocking(move || {
                    drop(writer);
                    Ok(())
                })
                .await;
                return Err(e);
            }
        };
        op.cancel.check()?;
        let now = now_unix();
        let record = ImageRecord {
            format_version: FORMAT_VERSION,
            id: crate::util::random_id("img"),
            name: op.image_name.clone(),
            virtual_size: captured.virtual_size,
            chunk_size: CHUNK_SIZE,
            content_digest: content_digest(captured.virtual_size, &captured.chunks),
            consistency: from.consistency.clone(),
            source_domain: from.domain.clone(),
            source_host: self.inner.host.clone(),
            source_disk: from.disk.clone(),
            source_format: from.format.clone(),
            created_at: now,
            updated_at: now,
            data_bytes: captured.data_bytes,
            chunks: captured.chunks,
        };
        let secs = started.elapsed().as_secs_f64();
        blocking(move || writer.commit(&record)).await?;
        op.set_location(&op.image_name);
        tracing::info!(op = %op.id, image = %op.image_name, seconds = format!("{secs:.2}"), "image committed");
        Ok(())
    }
}

/// Where an image's bytes came from, as the repository records it.
pub(super) struct Provenance {
    pub consistency: String,
    pub domain: String,
    pub disk: String,
    pub format: String,
    /// The domain has a guest agent channel.
    pub agent: bool,
    /// "linux" or "windows" when the guest agent told.
    pub os_type: Option<String>,
    /// The guest's OS id (e.g. "debian") when the guest agent told.
    pub os_distro: Option<String>,
}

impl Plan {
    fn provenance(&self) -> Provenance {
        Provenance {
            consistency: consistency_of(self.mode).into(),
            domain: self.info.name.clone(),
            disk: self.target.clone(),
            format: self.format.clone(),
            agent: self.info.has_agent_channel,
            os_type: self
                .os
                .as_ref()
                .map(|o| if o.is_windows { "windows" } else { "linux" }.to_string()),
            os_distro: self.os.as_ref().and_then(|o| o.id.clone()),
        }
    }
}

struct GuestOs {
    is_windows: bool,
    id: Option<String>,
}

/// Puts the prep outcomes on the operation (once they are journaled).
fn report_applied(op: &OpEntry, applied: &Option<Vec<StepOutcome>>) {
    if let Some(outcomes) = applied {
        op.set_prep(outcomes.iter().map(|o| report_outcome(o, false)).collect());
    }
}

/// An OS id as `/etc/os-release` `ID=` spells them ("debian", "rhel", "opensuse-leap",
/// "mswindows"): 1 to 64 lower-case letters, digits, '.', '_' or '-', starting with a letter or
/// digit.
pub fn valid_os_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
        && id.as_bytes()[0].is_ascii_alphanumeric()
}

#[cfg(test)]
mod tests {
    use super::valid_os_id;

    #[test]
    fn guest_os_ids_are_checked_before_they_reach_glance() {
        for ok in [
            "debian",
            "rhel",
            "opensuse-leap",
            "sles_sap",
            "ubuntu.22",
            "mswindows",
        ] {
            assert!(valid_os_id(ok), "{ok}");
        }
        for bad in [
            "",
            "Debian",
            "deb ian",
            "x\u{1b}[2J",
            "-rf",
            "a/b",
            &"a".repeat(65),
            "dé",
        ] {
            assert!(!valid_os_id(bad), "{bad:?}");
        }
    }
}
