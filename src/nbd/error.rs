//! [`NbdError`], the one error type of the NBD client, and helpers that build it.
//!
//! Each variant says what went wrong in its own words; a variant that wraps an
//! [`std::io::Error`] exposes it as its `source()` and does not repeat its text.

use std::fmt;
use std::io;

use super::proto::{known_errno_name, reply_name};

/// What can go wrong while talking to an NBD server.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NbdError {
    /// The socket to the server could not be opened.
    #[error("cannot connect to NBD server at {target}")]
    Connect {
        /// The socket path or address we tried.
        target: String,
        /// Why the connection failed.
        #[source]
        source: io::Error,
    },

    /// Reading from or writing to the connection failed, including the server closing it
    /// early. The connection is unusable afterwards.
    #[error("NBD connection failed while {during}")]
    Io {
        /// What the client was doing.
        during: &'static str,
        /// The underlying I/O error.
        #[source]
        source: io::Error,
    },

    /// The server broke the protocol (bad magic, a length out of bounds, a chunk outside the
    /// request...). The connection is unusable afterwards.
    #[error("NBD protocol violation: {0}")]
    Protocol(String),

    /// The server answered a handshake option with an error reply.
    #[error("NBD server refused {option} ({}){}", reply_name(*reply), ServerMessage(message))]
    OptionRefused {
        /// The option's name, e.g. `NBD_OPT_STRUCTURED_REPLY`.
        option: &'static str,
        /// The error reply type the server sent (bit 31 set).
        reply: u32,
        /// The server's own message, possibly empty.
        message: String,
    },

    /// The server has no export of that name (`NBD_REP_ERR_UNKNOWN`).
    #[error("NBD server has no export named {name:?}{}", ServerMessage(message))]
    ExportNotFound {
        /// The export name we asked for.
        name: String,
        /// The server's own message, possibly empty.
        message: String,
    },

    /// A requested meta context is not offered by the server for this export.
    #[error("NBD server does not offer meta context {context:?} on export {export:?}")]
    MetaContextUnavailable {
        /// The context name we asked for.
        context: String,
        /// The export it was asked for.
        export: String,
    },

    /// The server failed a request with an NBD error number. The connection stays usable.
    #[error(
        "NBD server failed {command} at offset {offset}, length {length}: {}{}{}",
        Errno(*errno),
        ErrorOffset(*error_offset),
        ServerMessage(message)
    )]
    Server {
        /// The command's name, e.g. `NBD_CMD_READ`.
        command: &'static str,
        /// The NBD error number (`NBD_EIO` = 5, ...), see [`errno_name`](super::errno_name).
        errno: u32,
        /// The server's own message, possibly empty.
        message: String,
        /// Offset of the failed request.
        offset: u64,
        /// Length of the failed request.
        length: u64,
        /// Where inside the request the error happened, when the server said so.
        error_offset: Option<u64>,
    },

    /// The caller asked for something this connection cannot do (a range outside the export,
    /// a misaligned request, a meta context that was not negotiated...). Nothing was sent.
    #[error("invalid NBD request: {0}")]
    InvalidRequest(String),

    /// An earlier request on this connection failed in a way that left the stream out of
    /// step (I/O error, protocol violation, or a cancelled future). Open a new connection.
    #[error("NBD connection is unusable after an earlier request failed or was cancelled")]
    Unusable,
}

impl NbdError {
    /// Whether the connection can still be used after this error (only server-reported
    /// request errors and rejected arguments leave it usable).
    pub fn connection_usable(&self) -> bool {
        matches!(self, NbdError::Server { .. } | NbdError::InvalidRequest(_))
    }
}

/// Builds the `map_err` closure for an I/O failure during `during`.
pub(crate) fn io_err(during: &'static str) -> impl FnOnce(io::Error) -> NbdError {
    move |source| NbdError::Io { during, source }
}

/// Shorthand for a protocol violation.
pub(crate) fn protocol(msg: impl Into<String>) -> NbdError {
    NbdError::Protocol(msg.into())
}

/// Turns a server-supplied message into something safe to print: lossy UTF-8, control
/// characters replaced, at most 1024 characters.
pub(crate) fn clean_message(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes)
        .chars()
        .take(1024)
        .map(|c| if c.is_control() { '\u{fffd}' } else { c })
        .collect()
}

/// Displays `: "message"` after an error when the server sent one, nothing otherwise.
struct ServerMessage<'a>(&'a str);

impl fmt::Display for ServerMessage<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            Ok(())
        } else {
            write!(f, ": server says {:?}", self.0)
        }
    }
}

/// Displays an NBD error number by name, with the number when it is not a known one.
struct Errno(u32);

impl fmt::Display for Errno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match known_errno_name(self.0) {
            Some(name) => f.write_str(name),
            None => write!(f, "unknown error number {}", self.0),
        }
    }
}

/// Displays ` (error at offset N)` when the server named the failing offset.
struct ErrorOffset(Option<u64>);

impl fmt::Display for ErrorOffset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(off) => write!(f, " (at offset {off})"),
            None => Ok(()),
        }
    }
}
