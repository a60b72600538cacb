//! A client of the QEMU guest agent (qemu-ga): run programs and read and write files inside a
//! running guest.
//!
//! [`GuestAgent`] is what the prep steps and the operations use; its methods block, so async
//! callers run them on tokio's blocking pool. [`QgaClient`] implements the agent's protocol
//! over any [`QgaTransport`], a channel that sends one JSON command and returns the agent's
//! reply. The channels live with the hypervisor backends (libvirt's
//! `virDomainQemuAgentCommand` in `crate::hypervisor::libvirt`), which hand out a
//! [`GuestAgent`] per domain; this module knows no hypervisor.
//!
//! - [`client`]: the protocol ([`QgaClient`], reply parsing, `guest-exec` polling, base64);
//! - [`files`]: the file helpers (read through `guest-file-*`, write / remove / list / rename
//!   through `sh` programs);
//! - [`types`]: what the agent reports ([`OsInfo`], [`ExecOutput`], [`NetInterface`],
//!   [`FreezeStatus`]).
//!
//! The guest is not trusted: every byte count the agent reports is checked, base64 is decoded
//! strictly, and nothing larger than [`MAX_GUEST_BYTES`] (64 MiB) is accepted from it, whether a
//! file or a program's output. `guest-exec` output that the agent truncated (its `out-truncated`
//! / `err-truncated` flags) is an error, never acted upon. Files are read with
//! `guest-file-read` in pieces of [`READ_PIECE`] bytes (the agent allows at most 48 MB a call,
//! libvirt passes at most 4 MiB of reply text). Program output travels in one
//! `guest-exec-status` reply, so through libvirt it is limited to about 3 MiB per stream.
//!
//! The file helpers beyond reading ([`GuestAgent::write_file`], [`GuestAgent::remove_file`],
//! [`GuestAgent::rename`], [`GuestAgent::list_dir`]) run POSIX `sh` and coreutils/busybox
//! programs through `guest-exec`: they are for Linux guests. Paths must be absolute and must not
//! contain newlines or NUL bytes.
//!
//! Error kinds: a domain that is not running, that has no guest agent channel or whose agent is
//! not connected is FAILED_PRECONDITION ("domain X has no responding guest agent ..."); an agent
//! that does not answer in time, or a program that does not finish in time, is UNAVAILABLE; an
//! unknown domain is NOT_FOUND; a command the agent rejects is INTERNAL, with a message naming
//! the domain and the guest file or program.

pub mod client;
pub mod files;
pub mod types;

use std::time::Duration;

use serde_json::Value;

use crate::error::{Error, ErrorKind, Result};

pub use client::{decode_b64_capped, encode_b64, parse_reply, QgaClient};
pub use types::{ExecOutput, FreezeStatus, NetInterface, OsInfo};

/// The most bytes accepted from the guest in one piece of data: a file, or a program's stdout
/// or stderr.
pub const MAX_GUEST_BYTES: usize = 64 << 20;
/// Bytes asked for per `guest-file-read` call: 2 MiB is 2.7 MiB of base64, below libvirt's
/// 4 MiB limit on one reply.
pub const READ_PIECE: usize = 2 << 20;
/// Bytes sent per `guest-file-write` call. Seen on qemu-ga 7.2 under libvirt 9.0: a command
/// carrying 256 KiB (350 KB of base64) is answered, one carrying 300 KiB never is; 128 KiB
/// keeps a wide margin.
pub const WRITE_PIECE: usize = 128 << 10;
/// Default time allowed for one agent command (not for a whole `exec`).
pub const DEFAULT_COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

/// The guest agent of one running domain. Every method blocks.
pub trait GuestAgent: Send + Sync {
    /// The domain's name, for messages.
    fn domain(&self) -> &str;
    /// `guest-ping`: the agent answers.
    fn ping(&self) -> Result<()>;
    /// `guest-get-osinfo`.
    fn os_info(&self) -> Result<OsInfo>;
    /// `guest-network-get-interfaces`: the guest's network interfaces.
    fn network_interfaces(&self) -> Result<Vec<NetInterface>>;
    /// Runs `argv` (the program is looked up in the guest's PATH) with `stdin` as its input (at
    /// most [`WRITE_PIECE`] bytes) and waits up to `timeout` for it to exit. A non-zero exit is
    /// not an error: look at [`ExecOutput::exit_code`]. Output truncated by the agent is an
    /// error.
    fn exec(&self, argv: &[&str], stdin: Option<&[u8]>, timeout: Duration) -> Result<ExecOutput>;
    /// The whole content of a guest file; `None` when it does not exist.
    fn read_file(&self, path: &str) -> Result<Option<Vec<u8>>>;
    /// Replaces (or creates) a guest file safely: the bytes go to a temporary file in the same
    /// directory, which then takes the original's owner and mode (or `mode`, when given; 0644
    /// for a new file) and is renamed over it. A symbolic link is followed: its target is
    /// replaced, the link stays.
    fn write_file(&self, path: &str, data: &[u8], mode: Option<u32>) -> Result<()>;
    /// Removes a guest file; no error when it does not exist.
    fn remove_file(&self, path: &str) -> Result<()>;
    /// Names in a guest directory (without `.` and `..`), sorted; empty when the directory
    /// does not exist or is not a directory.
    fn list_dir(&self, path: &str) -> Result<Vec<String>>;
    /// Renames a guest file (`mv -f`).
    fn rename(&self, from: &str, to: &str) -> Result<()>;
    /// `guest-fsfreeze-status`: whether the guest's filesystems are frozen.
    fn fsfreeze_status(&self) -> Result<FreezeStatus> {
        Err(unsupported(self.domain(), "guest-fsfreeze-status"))
    }
    /// `guest-fsfreeze-thaw`: thaws every frozen filesystem; returns how many were thawed.
    fn fsfreeze_thaw(&self) -> Result<u32> {
        Err(unsupported(self.domain(), "guest-fsfreeze-thaw"))
    }
}

/// What an agent that has no such command answers.
fn unsupported(domain: &str, execute: &str) -> Error {
    Error::new(
        ErrorKind::FailedPrecondition,
        format!("the guest agent of domain {domain} does not support {execute}"),
    )
}

/// A channel to one domain's guest agent: sends one command, returns the `return` member of
/// the reply.
pub trait QgaTransport: Send + Sync {
    /// The domain's name, for messages.
    fn domain(&self) -> &str;
    /// Sends `cmd` (`{"execute": ..., "arguments": ...}`) and waits up to `timeout` for the
    /// reply; returns its `return` value.
    fn call(&self, cmd: &Value, timeout: Duration) -> Result<Value>;
}

/// A scripted transport for the unit tests of this module.
#[cfg(test)]
mod scripted {
    use std::collections::VecDeque;
    use std::sync::Mutex;
    use std::time::Duration;

    use serde_json::Value;

    use super::{QgaClient, QgaTransport};
    use crate::error::Result;

    /// A transport that answers from a script and records the commands.
    pub struct Scripted {
        pub replies: Mutex<VecDeque<Result<Value>>>,
        pub sent: Mutex<Vec<Value>>,
    }

    impl Scripted {
        pub fn new(replies: Vec<Result<Value>>) -> QgaClient<Scripted> {
            QgaClient::with_transport(Scripted {
                replies: Mutex::new(replies.into()),
                sent: Mutex::new(Vec::new()),
            })
        }
    }

    impl QgaTransport for Scripted {
        fn domain(&self) -> &str {
            "dom1"
        }
        fn call(&self, cmd: &Value, _timeout: Duration) -> Result<Value> {
            self.sent.lock().unwrap().push(cmd.clone());
            self.replies
                .lock()
                .unwrap()
                .pop_front()
                .unwrap_or_else(|| panic!("unexpected command {cmd}"))
        }
    }

    pub fn sent(c: &QgaClient<Scripted>) -> Vec<String> {
        c.transport()
            .sent
            .lock()
            .unwrap()
            .iter()
            .map(|v| v["execute"].as_str().unwrap().to_string())
            .collect()
    }
}
