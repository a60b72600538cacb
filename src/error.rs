//! Error kinds of the agent and their mapping to gRPC status codes.
//!
//! Every failure that reaches a caller is an [`Error`]: a matchable [`ErrorKind`] (which decides
//! the gRPC code and the CLI's exit code) plus a message that names the object involved (domain,
//! image, file, config key). A lower-level cause is kept as the `source`, and its text is not
//! repeated in the message; [`Error::chain`] renders the whole story for logs and callers.

use std::fmt;

/// What kind of failure this is; decides the gRPC status code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// A field, flag or config value is malformed.
    InvalidArgument,
    /// The named domain, image or operation does not exist.
    NotFound,
    /// An image with that name exists already.
    AlreadyExists,
    /// The object is in the wrong state for the request (domain running, disk unreadable...).
    FailedPrecondition,
    /// Another operation holds the object.
    Aborted,
    /// Out of space or over a limit.
    ResourceExhausted,
    /// The caller's role does not allow the request, or a host path lies outside the
    /// directories the config allows.
    PermissionDenied,
    /// A dependency (libvirt, the repository directory, qemu-nbd) is not reachable.
    Unavailable,
    /// The operation was cancelled.
    Cancelled,
    /// A bug or an unexpected failure.
    Internal,
}

impl ErrorKind {
    /// The gRPC code name, as written in operation errors and `--json` output.
    pub fn code_name(self) -> &'static str {
        match self {
            ErrorKind::InvalidArgument => "INVALID_ARGUMENT",
            ErrorKind::NotFound => "NOT_FOUND",
            ErrorKind::AlreadyExists => "ALREADY_EXISTS",
            ErrorKind::FailedPrecondition => "FAILED_PRECONDITION",
            ErrorKind::Aborted => "ABORTED",
            ErrorKind::ResourceExhausted => "RESOURCE_EXHAUSTED",
            ErrorKind::PermissionDenied => "PERMISSION_DENIED",
            ErrorKind::Unavailable => "UNAVAILABLE",
            ErrorKind::Cancelled => "CANCELLED",
            ErrorKind::Internal => "INTERNAL",
        }
    }

    /// The tonic status code.
    pub fn grpc_code(self) -> tonic::Code {
        match self {
            ErrorKind::InvalidArgument => tonic::Code::InvalidArgument,
            ErrorKind::NotFound => tonic::Code::NotFound,
            ErrorKind::AlreadyExists => tonic::Code::AlreadyExists,
            ErrorKind::FailedPrecondition => tonic::Code::FailedPrecondition,
            ErrorKind::Aborted => tonic::Code::Aborted,
            ErrorKind::ResourceExhausted => tonic::Code::ResourceExhausted,
            ErrorKind::PermissionDenied => tonic::Code::PermissionDenied,
            ErrorKind::Unavailable => tonic::Code::Unavailable,
            ErrorKind::Cancelled => tonic::Code::Cancelled,
            ErrorKind::Internal => tonic::Code::Internal,
        }
    }

    /// Back from a gRPC code name (for errors stored on operations).
    pub fn from_code_name(name: &str) -> ErrorKind {
        match name {
            "INVALID_ARGUMENT" => ErrorKind::InvalidArgument,
            "NOT_FOUND" => ErrorKind::NotFound,
            "ALREADY_EXISTS" => ErrorKind::AlreadyExists,
            "FAILED_PRECONDITION" => ErrorKind::FailedPrecondition,
            "ABORTED" => ErrorKind::Aborted,
            "RESOURCE_EXHAUSTED" => ErrorKind::ResourceExhausted,
            "PERMISSION_DENIED" => ErrorKind::PermissionDenied,
            "UNAVAILABLE" => ErrorKind::Unavailable,
            "CANCELLED" => ErrorKind::Cancelled,
            _ => ErrorKind::Internal,
        }
    }
}

/// An agent error: a kind, a message naming the object, an optional cause, and the
/// machine-readable facts a caller gets as `google.rpc` error details ([`Facts`]).
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct Error {
    kind: ErrorKind,
    message: String,
    #[source]
    source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
    facts: Facts,
}

/// What a program needs to act on a failure without parsing English: a stable reason
/// (`DOMAIN_RUNNING`, `IMAGE_NAME_TAKEN`: `google.rpc.ErrorInfo.reason`), the request field at
/// fault (`BadRequest`), and the object whose state stopped the call (`PreconditionFailure`,
/// `ErrorInfo.metadata`).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Facts {
    /// UPPER_SNAKE_CASE; empty: the kind's code name stands in.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
    /// The request field at fault, e.g. `target.file.path`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub field: String,
    /// The resource involved, e.g. `domains/web1`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub subject: String,
}

/// Result with the agent's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// A new error of `kind` with `message`.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error {
            kind,
            message: message.into(),
            source: None,
            facts: Facts::default(),
        }
    }

    /// Sets the stable reason (`DOMAIN_RUNNING`), see [`Facts`].
    pub fn with_reason(mut self, reason: &str) -> Self {
        self.facts.reason = reason.to_string();
        self
    }

    /// Names the request field at fault (`image_id`, `target.file.path`).
    pub fn with_field(mut self, field: &str) -> Self {
        self.facts.field = field.to_string();
        self
    }

    /// Names the resource involved (`domains/web1`, `images/base`).
    pub fn with_subject(mut self, subject: impl Into<String>) -> Self {
        self.facts.subject = subject.into();
        self
    }

    /// The machine-readable facts, with the reason defaulted to the kind's code name.
    pub fn facts(&self) -> Facts {
        let mut f = self.facts.clone();
        if f.reason.is_empty() {
            f.reason = self.kind.code_name().to_string();
        }
        f
    }

    /// Attaches the lower-level cause.
    pub fn with_source(mut self, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        self.source = Some(Box::new(source));
        self
    }

    /// The kind, for matching and for the gRPC code.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The message and every cause, joined with ": ".
    pub fn chain(&self) -> String {
        let mut out = self.message.clone();
        let mut cur: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(self);
        while let Some(e) = cur {
            out.push_str(": ");
            out.push_str(&e.to_string());
            cur = e.source();
        }
        out
    }

    /// Maps an I/O error on `what` to a kind: out of space is RESOURCE_EXHAUSTED, a missing file
    /// NOT_FOUND... `what` names the object ("chunk file /var/lib/...").
    pub fn io(what: impl fmt::Display, err: std::io::Error) -> Self {
        let kind = match err.raw_os_error() {
            Some(libc::ENOSPC) | Some(libc::EDQUOT) => ErrorKind::ResourceExhausted,
            Some(libc::EACCES) | Some(libc::EPERM) | Some(libc::EROFS) => {
                ErrorKind::FailedPrecondition
            }
            Some(libc::ENOENT) => ErrorKind::NotFound,
            _ => ErrorKind::Internal,
        };
        Error::new(kind, what.to_string()).with_source(err)
    }
}

/// Shorthands for building errors.
pub fn invalid(msg: impl Into<String>) -> Error {
    Error::new(ErrorKind::InvalidArgument, msg)
}
/// NOT_FOUND with a message.
pub fn not_found(msg: impl Into<String>) -> Error {
    Error::new(ErrorKind::NotFound, msg)
}
/// FAILED_PRECONDITION with a message.
pub fn precondition(msg: impl Into<String>) -> Error {
    Error::new(ErrorKind::FailedPrecondition, msg)
}
/// PERMISSION_DENIED with a message.
pub fn denied(msg: impl Into<String>) -> Error {
    Error::new(ErrorKind::PermissionDenied, msg)
}
/// INTERNAL with a message.
pub fn internal(msg: impl Into<String>) -> Error {
    Error::new(ErrorKind::Internal, msg)
}

/// The domain of every `google.rpc.ErrorInfo` imaged sends.
pub const ERROR_DOMAIN: &str = "imaged";

/// A gRPC status with `google.rpc` details: always an `ErrorInfo` (reason, domain, and the
/// subject as metadata), a `BadRequest` violation when a field is named, a
/// `PreconditionFailure` for a wrong state of a named object.
pub fn rich_status(kind: ErrorKind, message: &str, facts: &Facts) -> tonic::Status {
    rich_status_in(ERROR_DOMAIN, kind, message, facts)
}

/// [`rich_status`] with another `ErrorInfo` domain (the repository server sends "imagerepo").
pub fn rich_status_in(
    domain: &str,
    kind: ErrorKind,
    message: &str,
    facts: &Facts,
) -> tonic::Status {
    use tonic_types::{ErrorDetails, StatusExt};
    let reason = if facts.reason.is_empty() {
        kind.code_name()
    } else {
        facts.reason.as_str()
    };
    let mut meta = std::collections::HashMap::new();
    if !facts.subject.is_empty() {
        meta.insert("resource".to_string(), facts.subject.clone());
    }
    let mut d = ErrorDetails::with_error_info(reason, domain, meta);
    if !facts.field.is_empty() {
        d.add_bad_request_violation(facts.field.clone(), message.to_string());
    }
    if kind == ErrorKind::FailedPrecondition && !facts.subject.is_empty() {
        d.add_precondition_failure_violation(reason, facts.subject.clone(), message.to_string());
    }
    tonic::Status::with_error_details(kind.grpc_code(), message.to_string(), d)
}

impl Error {
    /// The gRPC status of this error with `domain` in its `ErrorInfo` (`From<Error>` uses
    /// imaged's [`ERROR_DOMAIN`]).
    pub fn into_status_in(self, domain: &str) -> tonic::Status {
        rich_status_in(domain, self.kind, &self.chain(), &self.facts)
    }
}

impl From<Error> for tonic::Status {
    fn from(e: Error) -> Self {
        rich_status(e.kind, &e.chain(), &e.facts)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_joins_sources_without_repeating() {
        let io = std::io::Error::from_raw_os_error(libc::ENOSPC);
        let e = Error::io("writing chunk /x", io);
        assert_eq!(e.kind(), ErrorKind::ResourceExhausted);
        assert!(e.chain().starts_with("writing chunk /x: "));
        assert_eq!(e.to_string(), "writing chunk /x");
        let st: tonic::Status = e.into();
        assert_eq!(st.code(), tonic::Code::ResourceExhausted);
    }

    #[test]
    fn code_names_round_trip() {
        for k in [
            ErrorKind::InvalidArgument,
            ErrorKind::NotFound,
            ErrorKind::AlreadyExists,
            ErrorKind::FailedPrecondition,
            ErrorKind::Aborted,
            ErrorKind::ResourceExhausted,
            ErrorKind::PermissionDenied,
            ErrorKind::Unavailable,
            ErrorKind::Cancelled,
            ErrorKind::Internal,
        ] {
            assert_eq!(ErrorKind::from_code_name(k.code_name()), k);
        }
    }
}
