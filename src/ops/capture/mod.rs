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
//! prep changes) is recorded in the [`super::journal::Journal`] first, so a restarted daemon
//! finishes it.
//!
//! Where each part lives: this file holds the request ([`CaptureParams`], [`TargetSpec`]),
//! the checks and the mode decision ([`Controller::capture`]) and the dispatch by mode;
//! `shutdown.rs`, `live.rs` and `cold.rs` are the per-mode state machines; `prep.rs` applies
//! and undoes prep around the consistency point; `sink.rs` opens where the bytes go and
//! delivers them there (repository, file, Glance, S3).

mod cold;
mod incremental;
mod live;
mod prep;
mod shutdown;
mod sink;

use std::path::PathBuf;
use std::time::Duration;

use super::mode::{consistency_of, decide, needs_agent, AgentState, Asked, Decision, Facts, Mode};
use super::{check_readable, Controller, OpEntry, OpKind, OpState, Operation};
use crate::error::{precondition, Error, ErrorKind, Result};
use crate::format::Format;
use crate::guest::prep::PrepStep;
use crate::hypervisor::DomainInfo;
use crate::util::validate_image_name;
pub(super) use sink::Provenance;
use sink::Sink;

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
    /// Kept on the image.
    pub description: String,
    /// Who asks (the API caller), for the per-identity operation limit.
    pub requester: String,
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
    /// A `[targets.NAME]` of the config: Glance or S3 (a byte stream in `format`), or an
    /// imagerepo (chunks; no format, a project and a tag instead).
    Remote {
        name: String,
        /// Glance and S3 only: the format of the stream.
        format: Option<Format>,
        /// imagerepo only: the project (default: the target's `project`).
        project: Option<String>,
        /// imagerepo only: the tag (default: the repository's, "latest").
        tag: Option<String>,
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
            description: String::new(),
            requester: String::new(),
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
    /// Kept on the image.
    description: String,
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
        op.set_requester(&p.requester);
        op.set_consistency(consistency_of(mode));
        {
            let mut t = self.table();
            if let Some(op) = self.request_matching(&t, &p.request_id, OpKind::Capture, &fp)? {
                return Ok(op);
            }
            if let Some(holder) = t.domain_locks.get(&info.name) {
                if let Some(ended) = holder.strip_prefix("cleanup:") {
                    return Err(Error::new(
                        ErrorKind::Aborted,
                        format!(
                            "domain {} is being cleaned up after operation {ended} (a backup job to end, \
                             a restart or prep to undo is not confirmed done yet; imaged keeps trying); retry shortly",
                            info.name
                        ),
                    )
                    .with_reason("DOMAIN_CLEANUP_PENDING")
                    .with_subject(format!("domains/{}", info.name)));
                }
                return Err(Error::new(
                    ErrorKind::Aborted,
                    format!(
                        "domain {} is held by operation {holder}; wait for it or cancel it",
                        info.name
                    ),
                )
                .with_reason("DOMAIN_BUSY")
                .with_subject(format!("domains/{}", info.name)));
            }
            let target = match &p.target {
                TargetSpec::Repository => "repository".to_string(),
                TargetSpec::File { path, .. } => format!("file:{}", path.display()),
                TargetSpec::Remote { name, .. } => format!("remote:{name}"),
            };
            self.insert(&mut t, &op, &target, &fp)?;
            t.domain_locks.insert(info.name.clone(), op.id.clone());
        }
        tracing::info!(op = %op.id, domain = %info.name, disk = %disk.target, mode = ?mode, image = %p.image_name, "capture queued");
        let plan = Plan {
            description: p.description.clone(),
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
        let res = match plan.mode {
            Mode::Cold | Mode::Auto => self.cold_read(op, writer, &plan).await,
            Mode::Shutdown => self.shutdown_capture(op, writer, &plan, &p).await,
            Mode::Quiesce | Mode::CrashConsistent => self.live_capture(op, writer, &plan).await,
        };
        // An operation and its image agree: a failed capture leaves no image listed. Cleanup
        // after the commit does not fail a capture (it is the janitor's), so this only
        // catches a failure a later change might add after the commit.
        if res.is_err()
            && p.target == TargetSpec::Repository
            && op.snapshot().location == op.image_name
        {
            let (repo, name) = (self.inner.repo.clone(), op.image_name.clone());
            match super::blocking(move || repo.delete(&name)).await {
                Ok(_) => {
                    tracing::warn!(op = %op.id, image = %op.image_name, "the capture failed after its image was committed; the image was removed")
                }
                Err(e) => {
                    tracing::error!(op = %op.id, image = %op.image_name, error = %e.chain(), "the capture failed after its image was committed, and the image could not be removed")
                }
            }
        }
        res
    }
}

struct GuestOs {
    is_windows: bool,
    id: Option<String>,
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
