//! A log hint for gRPC clients whose HTTP/2 `:authority` the server refuses.
//!
//! grpc-core based clients (Python `grpcio`, Ruby, C++, PHP) dialling `unix:///path` send the
//! socket's path, percent-encoded, as `:authority`. The HTTP/2 stack under tonic (h2) resets
//! such a stream with PROTOCOL_ERROR before any of our code runs, and offers no option to accept
//! it (hyperium/h2#487); the client only sees `INTERNAL: RST_STREAM`. h2 reports the refusal as
//! a DEBUG event of its own; [`AuthorityHint`] watches for that event and logs, at DEBUG too,
//! what the client has to change. It changes nothing on the wire.

use std::fmt;

use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::{Context, Layer};

/// What h2's message starts with when it refuses a request's `:authority`.
const H2_BAD_AUTHORITY: &str = "malformed headers: malformed authority";

/// What the daemon logs after h2 refused a stream for its `:authority`.
pub const HINT: &str = "a gRPC client's stream was reset: its HTTP/2 :authority is not a host \
    name (grpc-core clients such as Python grpcio send the unix socket's path). Make the client \
    send a host name, e.g. Python: grpc.insecure_channel(\"unix:///run/imaged/imaged.sock\", \
    options=[(\"grpc.default_authority\", \"localhost\")])";

/// A [`Layer`] that adds [`HINT`] to the log after h2 refuses a stream's `:authority`.
#[derive(Debug, Default, Clone, Copy)]
pub struct AuthorityHint;

impl<S: Subscriber> Layer<S> for AuthorityHint {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        let meta = event.metadata();
        if *meta.level() != Level::DEBUG || !meta.target().starts_with("h2") {
            return;
        }
        let mut msg = Message(String::new());
        event.record(&mut msg);
        if is_authority_refusal(&msg.0) {
            tracing::debug!(target: "imaged::api", "{HINT}");
        }
    }
}

/// Whether an h2 log message is its refusal of a request's `:authority`.
fn is_authority_refusal(message: &str) -> bool {
    message.starts_with(H2_BAD_AUTHORITY)
}

/// Collects an event's `message` field.
struct Message(String);

impl Visit for Message {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if field.name() == "message" {
            self.0 = format!("{value:?}");
        }
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.0 = value.to_string();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_h2s_refusal_only() {
        assert!(is_authority_refusal(
            "malformed headers: malformed authority (b\"run%2Fimaged%2Fimaged.sock\"): invalid authority"
        ));
        assert!(!is_authority_refusal("malformed headers: missing method"));
        assert!(!is_authority_refusal(""));
    }
}
