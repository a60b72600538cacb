//! The QEMU guest agent of a libvirt domain: [`LibvirtChannel`] carries one command through
//! `virDomainQemuAgentCommand` (the `virt` crate's `qemu` feature) and maps libvirt's errors to
//! the agent's error kinds; [`LibvirtAgent`] is [`QgaClient`] over it.
//!
//! A command rides through a libvirtd restart like every libvirt call (see [`super::reconnect`]):
//! libvirt being away is waited for and reported as libvirt's absence, never as the guest
//! agent's. Only commands that read, or that may be asked twice ([`SAFE_COMMANDS`]), are sent
//! again after a connection lost in flight; the others (exec, file writes, freeze) return
//! UNAVAILABLE saying their outcome is unknown.

use std::cell::RefCell;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::Value;
use virt::connect::Connect;
use virt::domain::Domain;
use virt::enumutil::Enum;
use virt::error::ErrorNumber;

use super::reconnect::{Reconnect, Retry, DEFAULT_RECONNECT_TIMEOUT};
use crate::error::{Error, ErrorKind, Result};
use crate::guest::agent::{parse_reply, QgaClient, QgaTransport};

/// Agent commands that change nothing, or nothing more when asked twice: sent again on a new
/// connection after libvirtd went away mid-command. Not here: `guest-file-read` (advances the
/// file position), `guest-exec-status` (reaps the process once it exited), `guest-file-open`
/// (a new handle each time), every write, exec and freeze.
pub const SAFE_COMMANDS: [&str; 7] = [
    "guest-ping",
    "guest-sync",
    "guest-info",
    "guest-get-osinfo",
    "guest-network-get-interfaces",
    "guest-fsfreeze-status",
    "guest-fsfreeze-thaw",
];

/// The guest agent of a libvirt domain, through `virDomainQemuAgentCommand`.
pub type LibvirtAgent = QgaClient<LibvirtChannel>;

impl LibvirtAgent {
    /// The agent of domain `domain` at libvirt `uri` (e.g. `qemu:///system`), waiting for an
    /// unreachable libvirtd up to the default bound. Nothing is opened until the first command.
    pub fn new(uri: &str, domain: &str) -> LibvirtAgent {
        QgaClient::with_transport(LibvirtChannel::new(uri, domain))
    }

    /// The agent of domain `domain`, waiting for libvirt as `reconnect` says.
    pub fn with_reconnect(reconnect: Reconnect, domain: &str) -> LibvirtAgent {
        QgaClient::with_transport(LibvirtChannel::with_reconnect(reconnect, domain))
    }
}

/// A libvirt connection to one domain's guest agent. The connection is opened on first use
/// and kept; after any libvirt error it is dropped and the next command opens a new one. The
/// mutex also keeps to one command at a time on the agent's single channel.
pub struct LibvirtChannel {
    uri: String,
    domain: String,
    reconnect: Reconnect,
    conn: Mutex<Option<(Domain, Connect)>>,
}

impl LibvirtChannel {
    /// A channel to `domain` at `uri`, waiting for an unreachable libvirtd up to the default
    /// bound; nothing opened yet.
    pub fn new(uri: &str, domain: &str) -> LibvirtChannel {
        LibvirtChannel::with_reconnect(Reconnect::new(uri, DEFAULT_RECONNECT_TIMEOUT), domain)
    }

    /// A channel to `domain`, waiting for libvirt as `reconnect` says; nothing opened yet.
    pub fn with_reconnect(reconnect: Reconnect, domain: &str) -> LibvirtChannel {
        LibvirtChannel {
            uri: reconnect.uri().to_string(),
            domain: domain.to_string(),
            reconnect,
            conn: Mutex::new(None),
        }
    }

    /// The libvirt URI.
    pub fn uri(&self) -> &str {
        &self.uri
    }

    fn open(&self) -> Result<(Domain, Connect)> {
        let conn = super::connect(&self.uri)?;
        let dom = super::lookup(&conn, &self.domain)?;
        Ok((dom, conn))
    }

    fn map_err(&self, execute: &str, e: virt::error::Error, timed_out: bool) -> Error {
        let d = &self.domain;
        let (kind, msg) = match e.code() {
            Enum::Known(ErrorNumber::ArgumentUnsupported) => (
                ErrorKind::FailedPrecondition,
                format!(
                    "domain {d} has no responding guest agent (no guest agent channel is \
                     configured; add a virtio channel org.qemu.guest_agent.0)"
                ),
            ),
            Enum::Known(ErrorNumber::OperationInvalid) => (
                ErrorKind::FailedPrecondition,
                format!("domain {d} has no responding guest agent (the domain is not running)"),
            ),
            Enum::Known(ErrorNumber::AgentCommandTimeout)
            | Enum::Known(ErrorNumber::OperationTimeout) => (
                ErrorKind::Unavailable,
                format!("the guest agent of domain {d} did not answer {execute} in time"),
            ),
            // libvirt reports both "not connected" and "no reply in time" as unresponsive;
            // the elapsed time tells them apart.
            Enum::Known(ErrorNumber::AgentUnresponsive) if timed_out => (
                ErrorKind::Unavailable,
                format!("the guest agent of domain {d} did not answer {execute} in time"),
            ),
            Enum::Known(ErrorNumber::AgentUnresponsive) => (
                ErrorKind::FailedPrecondition,
                format!(
                    "domain {d} has no responding guest agent (is qemu-guest-agent installed \
                     and running in the guest?)"
                ),
            ),
            Enum::Known(ErrorNumber::NoDomain) => (
                ErrorKind::NotFound,
                format!("domain {d} not found on this host"),
            ),
            Enum::Known(ErrorNumber::Rpc) => (
                ErrorKind::Internal,
                format!(
                    "libvirt could not carry the guest agent's reply to {execute} for domain {d} \
                     (replies over libvirt's 4 MiB message limit fail this way)"
                ),
            ),
            Enum::Known(ErrorNumber::NoConnect) | Enum::Known(ErrorNumber::SystemError) => (
                ErrorKind::Unavailable,
                format!(
                    "lost the libvirt connection at {} while talking to domain {d}'s guest agent",
                    self.uri
                ),
            ),
            _ => (
                ErrorKind::Internal,
                format!("the guest agent of domain {d} failed {execute}"),
            ),
        };
        Error::new(kind, msg).with_source(e)
    }
}

impl QgaTransport for LibvirtChannel {
    fn domain(&self) -> &str {
        &self.domain
    }

    fn call(&self, cmd: &Value, timeout: Duration) -> Result<Value> {
        let execute = cmd
            .get("execute")
            .and_then(Value::as_str)
            .unwrap_or("?")
            .to_string();
        let text = cmd.to_string();
        let secs = timeout.as_secs().clamp(1, i32::MAX as u64) as i32;
        let retry = if SAFE_COMMANDS.contains(&execute.as_str()) {
            Retry::Safe
        } else {
            Retry::ConnectOnly
        };
        let what = format!(
            "running {execute} in the guest agent of domain {}",
            self.domain
        );
        let mut guard = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        // The kept connection goes back in only after a command went through on it.
        let kept = RefCell::new(guard.take());
        let reply = self.reconnect.call(
            &what,
            retry,
            || match kept.borrow_mut().take() {
                // A change is not sent on a connection whose daemon may have gone since the
                // last command: a request lost that way would have an unknown outcome.
                Some((_, conn)) if retry == Retry::ConnectOnly && conn.lib_version().is_err() => {
                    self.open()
                }
                Some(pair) => Ok(pair),
                None => self.open(),
            },
            |(dom, conn)| {
                let start = Instant::now();
                match dom.qemu_agent_command(&text, secs, 0) {
                    Ok(r) => {
                        *kept.borrow_mut() = Some((dom.clone(), conn.clone()));
                        Ok(r)
                    }
                    Err(e) => {
                        let timed_out = start.elapsed() + Duration::from_millis(200) >= timeout;
                        Err(self.map_err(&execute, e, timed_out))
                    }
                }
            },
        );
        *guard = kept.into_inner();
        drop(guard);
        parse_reply(&self.domain, &execute, &reply?)
    }
}
