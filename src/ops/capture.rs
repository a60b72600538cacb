//! Captures: from a request to an image, by mode.
//!
//! | mode | the domain | consistency point | how the disk is read |
//! |---|---|---|---|
//! | cold | shut off | — | `qemu-nbd --read-only` on the disk file |
//! | shutdown | running or shut off | the guest powered off (agent, else ACPI; forced only when asked) | as cold; started again if `restart` |
//! | quiesce | running, agent answers | filesystems frozen, backup job begun, thawed at once | QEMU's pull-mode backup export |
//! | crash-consistent | running | backup job begun | QEMU's pull-mode backup export |
//!
//! Every precondition is checked before the call returns; the work then runs as an operation.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use std::collections::BTreeMap;
use std::sync::Arc;

use super::journal::{Entry, Journal};
use super::prep::report_outcome;
use super::{blocking, check_readable, Agent, OpEntry, OpKind, OpState, Operation};
use crate::capture::live;
use crate::capture::source::{BlockSource, NbdExport};
use crate::capture::stream::{self, StreamPlan};
use crate::capture::{self as pipeline};
use crate::error::{invalid, precondition, Error, ErrorKind, Result};
use crate::export::Format;
use crate::guest::prep::{PrepStep, StepOutcome};
use crate::hypervisor::{DomainInfo, DomainState, ShutdownHow};
use crate::repo::manifest::{content_digest, FORMAT_VERSION};
use crate::repo::{ImageRecord, ImageWriter, CHUNK_SIZE};
use crate::target::file::FileTarget;
use crate::target::{StreamTarget, UploadMeta};
use crate::util::{now_unix, validate_image_name};

/// How to reach a consistent disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// Pick what a user expects (see the API docs).
    #[default]
    Auto,
    Cold,
    Shutdown,
    Quiesce,
    CrashConsistent,
}

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

/// The bound on how long a guest may stay frozen.
const MAX_FREEZE: Duration = Duration::from_secs(10);

/// What the checks decided: everything the task needs.
struct Plan {
    mode: Mode,
    info: DomainInfo,
    target: String,
    path: PathBuf,
    format: String,
    was_running: bool,
    /// What the guest agent said of the OS, when it was asked.
    os: Option<GuestOs>,
    /// Prep steps to apply before the consistency point.
    steps: Vec<PrepStep>,
    restore_source: bool,
}

impl Agent {
    /// Starts a capture of a domain's disk (see [`Mode`]).
    pub async fn capture(&self, p: CaptureParams) -> Result<Operation> {
        validate_image_name(&p.image_name)?;
        if let Some(op) = self.existing_request(&p.request_id, OpKind::Capture)? {
            return Ok(op);
        }
        let info = self.domain(&p.domain).await?;
        let steps = super::prep::parse_steps(&p.prep)?;
        let (mode, os) = self.resolve_mode(&p, &info).await?;
        let disk = info.disk(p.disk.as_deref())?.clone();
        if disk.path.is_empty() || !matches!(disk.source_type.as_str(), "file" | "block") {
            return Err(precondition(format!(
                "disk {} of domain {} is a {} disk with no local path; only file and block disks can be captured",
                disk.target, info.name, disk.source_type
            )));
        }
        if !steps.is_empty() {
            if !matches!(mode, Mode::Quiesce | Mode::Shutdown) || info.state == DomainState::ShutOff
            {
                return Err(invalid(format!(
                    "prep steps run inside the running guest before the capture: use mode quiesce or shutdown on a running domain (domain {} is {}, mode {})",
                    info.name,
                    info.state.as_str(),
                    consistency_of(mode)
                )));
            }
            self.check_prep_possible(&info)?;
        }
        if p.restore_source && (mode != Mode::Quiesce || steps.is_empty()) {
            return Err(invalid(
                "restore_source undoes prep steps in the running source after a quiesced capture: it needs mode quiesce and prep steps",
            ));
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
            if let Some(op) = Self::request_in(&t, &p.request_id) {
                return Ok(op);
            }
            t.domain_locks.insert(info.name.clone(), op.id.clone());
            self.insert(&mut t, &op);
        }
        tracing::info!(op = %op.id, domain = %info.name, disk = %disk.target, mode = ?mode, image = %p.image_name, "capture queued");
        let plan = Plan {
            steps,
            restore_source: p.restore_source,
            mode,
            was_running: info.state != DomainState::ShutOff,
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
        let agent = self.clone();
        let entry = op.clone();
        tokio::spawn(async move {
            let res = agent.run_capture(&entry, sink, plan, p).await;
            agent.end(&entry, res);
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
            } => (Box::new(FileTarget::new(path, *overwrite)?), *format),
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

    /// Decides the mode and checks the domain's state suits it.
    async fn resolve_mode(
        &self,
        p: &CaptureParams,
        info: &DomainInfo,
    ) -> Result<(Mode, Option<GuestOs>)> {
        let name = &info.name;
        let state = info.state;
        let running = matches!(
            state,
            DomainState::Running | DomainState::Paused | DomainState::Blocked
        );
        let needs =
            |what: &str| precondition(format!("domain {name} is {}; {what}", state.as_str()));
        match p.mode {
            Mode::Cold => {
                if state != DomainState::ShutOff {
                    return Err(needs(&format!(
                        "a cold capture needs it shut off (shut it down first, e.g. `virsh shutdown {name}`, or use mode shutdown or quiesce)"
                    )));
                }
                Ok((Mode::Cold, None))
            }
            Mode::Shutdown => {
                if !running && state != DomainState::ShutOff {
                    return Err(needs("a shutdown capture needs it running or shut off"));
                }
                Ok((Mode::Shutdown, None))
            }
            Mode::CrashConsistent => {
                if !running {
                    return Err(needs("a crash-consistent capture is live and needs it running (use mode cold for a shut-off domain)"));
                }
                Ok((Mode::CrashConsistent, None))
            }
            Mode::Quiesce => {
                if !running {
                    return Err(needs("a quiesced capture is live and needs it running (use mode cold for a shut-off domain)"));
                }
                let os = self.agent_os(info).await?;
                if os.is_windows {
                    return Err(precondition(format!(
                        "domain {name} runs Windows: capture it in shutdown mode"
                    )));
                }
                Ok((Mode::Quiesce, Some(os)))
            }
            Mode::Auto => {
                if state == DomainState::ShutOff {
                    return Ok((Mode::Cold, None));
                }
                if !running {
                    return Err(needs("shut it off or start it, then capture"));
                }
                match self.agent_os(info).await {
                    Ok(os) if os.is_windows => Ok((Mode::Shutdown, Some(os))),
                    Ok(os) => Ok((Mode::Quiesce, Some(os))),
                    Err(e) => Err(precondition(format!(
                        "domain {name} is running and its guest agent does not answer, so it cannot be quiesced; \
                         choose mode crash-consistent (live, no freeze) or shutdown (ACPI power button)"
                    ))
                    .with_source(e)),
                }
            }
        }
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
        let reply = self
            .hv(move |hv| {
                hv.agent_command(&name, r#"{"execute":"guest-ping"}"#, 5)?;
                hv.agent_command(&name, r#"{"execute":"guest-get-osinfo"}"#, 5)
            })
            .await?;
        let v: serde_json::Value = serde_json::from_str(&reply).unwrap_or_default();
        let id = v
            .pointer("/return/id")
            .and_then(|x| x.as_str())
            .map(str::to_string);
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
        let name = plan.info.name.clone();
        match plan.mode {
            Mode::Cold | Mode::Auto => self.cold_read(op, writer, &plan).await,
            Mode::Shutdown => {
                if plan.was_running {
                    self.shut_down(op, &plan.info, p.shutdown_timeout, p.force_off)
                        .await?;
                }
                let res = self.cold_read(op, writer, &plan).await;
                if plan.was_running && p.restart {
                    let n = name.clone();
                    match self.hv(move |hv| hv.start(&n)).await {
                        Ok(()) => {
                            tracing::info!(op = %op.id, domain = %name, "domain started again")
                        }
                        Err(e) => {
                            tracing::error!(op = %op.id, domain = %name, error = %e.chain(), "could not start the domain again");
                            if res.is_ok() {
                                return Err(Error::new(
                                    e.kind(),
                                    format!("image {} was captured, but domain {name} could not be started again", op.image_name),
                                )
                                .with_source(e));
                            }
                        }
                    }
                }
                res
            }
            Mode::Quiesce | Mode::CrashConsistent => {
                let applied = self.prep_before(op, &plan).await?;
                let mut restore = applied.clone();
                let res = self.live_read(op, writer, &plan, &mut restore).await;
                // A failed capture gives the source its configuration back, whatever was asked.
                if let (Err(_), Some(outcomes)) = (&res, restore) {
                    self.undo_prep(op, &name, outcomes, false).await;
                }
                res
            }
        }
    }

    /// Applies the plan's prep steps in the running guest; None when there are none.
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
        op.set_prep(outcomes.iter().map(|o| report_outcome(o, false)).collect());
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
    ) -> Result<()> {
        let cfg = &self.inner.cfg.capture;
        let journal = Journal::new(&cfg.run_dir);
        let quiesce = plan.mode == Mode::Quiesce;
        let all: Vec<String> = plan
            .info
            .disks
            .iter()
            .filter(|d| d.device == "disk")
            .map(|d| d.target.clone())
            .collect();
        let entry = Entry {
            op: op.id.clone(),
            domain: plan.info.name.clone(),
            backup_dir: cfg.run_dir.join(format!("backup-{}", op.id)),
            frozen: quiesce,
            started_at: now_unix(),
        };
        journal.write(&entry)?;
        let begun = live::begin(
            self.inner.hv.clone(),
            &plan.info.name,
            &plan.target,
            &all,
            &cfg.run_dir,
            &op.id,
            quiesce,
            MAX_FREEZE,
        )
        .await;
        let (export, point) = match begun {
            Ok(x) => x,
            Err(e) => {
                journal.remove(&op.id);
                return Err(e);
            }
        };
        journal.write(&Entry {
            frozen: false,
            ..entry
        })?;
        op.set_freeze_window(point.freeze_window_ms);
        if plan.restore_source {
            if let Some(outcomes) = restore.take() {
                self.undo_prep(op, &plan.info.name, outcomes, true).await;
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
        journal.remove(&op.id);
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

/// The consistency level a mode gives.
pub fn consistency_of(mode: Mode) -> &'static str {
    match mode {
        Mode::Cold | Mode::Auto | Mode::Shutdown => "cold",
        Mode::Quiesce => "quiesced",
        Mode::CrashConsistent => "crash-consistent",
    }
}

/// Parses a mode name from the CLI.
pub fn parse_mode(s: &str) -> Result<Mode> {
    Ok(match s {
        "auto" => Mode::Auto,
        "cold" => Mode::Cold,
        "shutdown" => Mode::Shutdown,
        "quiesce" => Mode::Quiesce,
        "crash-consistent" => Mode::CrashConsistent,
        other => {
            return Err(invalid(format!(
                "capture mode {other:?} is unknown: use auto, cold, shutdown, quiesce or crash-consistent"
            )))
        }
    })
}
