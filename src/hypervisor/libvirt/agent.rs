//! The QEMU guest agent of a libvirt domain: [`LibvirtChannel`] carries one command through
//! `virDomainQemuAgentCommand` (the `virt` crate's `qemu` feature) and maps libvirt's errors to
//! the agent's error kinds; [`LibvirtAgent`] is [`QgaClient`] over it.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::Value;
use virt::connect::Connect;
use virt::domain::Domain;
use virt::enumutil::Enum;
use virt::error::ErrorNumber;

use crate::error::{Error, ErrorKind, Result};
use crate::guest::agent::{parse_reply, QgaClient, QgaTransport};

/// The guest agent of a libvirt domain, through `virDomainQemuAgentCommand`.
pub type LibvirtAgent = QgaClient<LibvirtChannel>;

impl LibvirtAgent {
    /// The agent of domain `domain` at libvirt `uri` (e.g. `qemu:///system`). Nothing is
    /// opened until the first command.
    pub fn new(uri: &str, domain: &str) -> LibvirtAgent {
        QgaClient::with_transport(LibvirtChannel::new(uri, domain))
    }
}

/// A libvirt connection to one domain's guest agent. The connection is opened on first use
/// and kept; after any libvirt error it is dropped and the next command opens a new one. The
/// mutex also keeps to one command at a time on the agent's single channel.
pub struct LibvirtChannel {
    uri: String,
    domain: String,
    conn: Mutex<Option<(Domain, Connect)>>,
}

impl LibvirtChannel {
    /// A channel to `domain` at `uri`; nothing opened yet.
    pub fn new(uri: &str, domain: &str) -> LibvirtChannel {
        LibvirtChannel {
            uri: uri.to_string(),
            domain: domain.to_string(),
            conn: Mutex::new(None),
        }
    }

    /// The libvirt URI.
    pub fn uri(&self) -> &str {
        &self.uri
    }

    fn open(&self) -> Result<(Domain, Connect)> {
        let conn = super::connect(&self.uri)?;
        let dom = super::lookup(&conn, &self.domain).map_err(|e| {
            if e.kind() == ErrorKind::NotFound {
                e
            } else {
                Error::new(
                    ErrorKind::Unavailable,
                    format!("looking up domain {} in libvirt", self.domain),
                )
                .with_source(e)
            }
        })?;
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
        let mut guard = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        if guard.is_none() {
            *guard = Some(self.open()?);
        }
        let (dom, _) = guard.as_ref().expect("connection just opened");
        let start = Instant::now();
        let reply = match dom.qemu_agent_command(&text, secs, 0) {
            Ok(r) => r,
            Err(e) => {
                *guard = None;
                let timed_out = start.elapsed() + Duration::from_millis(200) >= timeout;
                return Err(self.map_err(&execute, e, timed_out));
            }
        };
        drop(guard);
        parse_reply(&self.domain, &execute, &reply)
    }
}
