//! Riding through a libvirtd restart: [`Reconnect::call`] is the one place where a libvirt call
//! that finds libvirtd gone waits for it, with backoff, up to a bound
//! (`[libvirt] reconnect_timeout_secs`), instead of failing the operation at once.
//!
//! Every call has two steps: *open* (connect, look the domain up: nothing changes anywhere yet)
//! and *the call proper*. Opening always waits. The call proper is repeated, on a new
//! connection, only when it is [`Retry::Safe`] (reads, and changes that can be asked twice
//! without harm: ending our own backup job, a thaw); a call that changes state
//! ([`Retry::ConnectOnly`]: start, shutdown, begin backup, freeze, agent exec) and loses its
//! connection after its request went out returns UNAVAILABLE saying the outcome is unknown,
//! for the caller who owns the journal to decide.
//!
//! A lost connection whose request provably never left (libvirt's client refuses to send on a
//! socket it knows is closed; a failed connect) is sent again even for a change.
//!
//! Which failures mean "libvirtd is away" is decided by [`is_lost_connection`] from the libvirt
//! error's code and message, measured against a libvirtd stopped by SIGTERM (libvirt 9.0):
//! connecting gives `SystemError` ("Failed to connect socket to '/var/run/libvirt/libvirt-sock':
//! No such file or directory"); the first call on a connection whose daemon went away gives
//! `SystemError` ("Cannot write data: Broken pipe"), every later one `InternalError` ("client
//! socket is closed"), also after the daemon is back; a reply lost in flight is `SystemError`
//! ("End of file while reading data").

use std::time::{Duration, Instant};

use virt::enumutil::Enum;
use virt::error::{ErrorNumber, ErrorNumberEnum};

use crate::error::{Error, ErrorKind, Result};

/// First pause after finding libvirtd away; doubled after each failed attempt.
const FIRST_DELAY: Duration = Duration::from_millis(100);
/// Longest pause between two attempts.
const MAX_DELAY: Duration = Duration::from_secs(2);
/// The default bound of the wait (`[libvirt] reconnect_timeout_secs`).
pub const DEFAULT_RECONNECT_TIMEOUT: Duration = Duration::from_secs(60);

/// Whether a call may be repeated after its connection was lost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    /// Reads and idempotent changes: repeated whole on a new connection.
    Safe,
    /// Changes that must not be sent twice: only opening waits; a connection lost after the
    /// request went out is returned (UNAVAILABLE, outcome unknown).
    ConnectOnly,
}

/// Whether a libvirt error with `code` and `message` means the daemon is unreachable (not
/// running, restarting, or the connection to it dropped), as opposed to a refusal by a live
/// daemon.
pub fn is_lost_connection(code: ErrorNumberEnum, message: &str) -> bool {
    const LOST: [&str; 6] = [
        "client socket is closed",
        "end of file while reading data",
        "failed to connect socket",
        "cannot recv data",
        "cannot write data",
        "connection reset by peer",
    ];
    let lost_text = || {
        let m = message.to_ascii_lowercase();
        LOST.iter().any(|l| m.contains(l))
    };
    match code {
        // Connecting: the socket is missing or refuses; a call: the daemon went away.
        Enum::Known(ErrorNumber::SystemError) => true,
        // "invalid connection pointer" and the like: the connection is unusable.
        Enum::Known(ErrorNumber::NoConnect) => true,
        Enum::Known(ErrorNumber::InternalError)
        | Enum::Known(ErrorNumber::Rpc)
        | Enum::Known(ErrorNumber::OperationFailed) => lost_text(),
        _ => false,
    }
}

/// Whether a lost-connection error with `code` and `message` was raised before the request
/// left this process, so that even a change may be sent again: libvirt's RPC client refuses
/// to send on a socket it already knows is closed ("client socket is closed",
/// `virNetClientSendInternal`), a write refused with a broken pipe ("Cannot write data") never
/// reached a reader, and a failed connect sent nothing.
pub fn never_sent(code: ErrorNumberEnum, message: &str) -> bool {
    let m = message.to_ascii_lowercase();
    match code {
        Enum::Known(ErrorNumber::InternalError) => m.contains("client socket is closed"),
        // A write refused with EPIPE: the daemon had closed its end, so it cannot have read
        // (let alone run) the whole request.
        Enum::Known(ErrorNumber::SystemError) => {
            m.contains("failed to connect socket") || m.contains("cannot write data")
        }
        _ => false,
    }
}

/// The libvirt error in `e`'s chain, if any.
fn libvirt_cause(e: &Error) -> Option<&virt::error::Error> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(c) = cur {
        if let Some(v) = c.downcast_ref::<virt::error::Error>() {
            return Some(v);
        }
        cur = c.source();
    }
    None
}

/// How a failure bears on waiting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Failure {
    /// A live daemon's answer (or not libvirt's at all): returned as is.
    Answer,
    /// libvirtd is away and the request never left: safe to send again.
    NotSent,
    /// libvirtd went away with the request possibly delivered.
    Lost,
}

/// Classifies `e` by the libvirt error in its chain.
fn classify(e: &Error) -> Failure {
    match libvirt_cause(e) {
        Some(v) if never_sent(v.code(), v.message()) => Failure::NotSent,
        Some(v) if is_lost_connection(v.code(), v.message()) => Failure::Lost,
        _ => Failure::Answer,
    }
}

/// The pauses between attempts: 100 ms doubling up to 2 s.
#[derive(Debug, Clone)]
pub struct Backoff {
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff { next: FIRST_DELAY }
    }
}

impl Backoff {
    /// The next pause, at most `left` (the time the bound still allows); None when no time is
    /// left.
    pub fn pause(&mut self, left: Duration) -> Option<Duration> {
        if left.is_zero() {
            return None;
        }
        let p = self.next.min(left);
        self.next = (self.next * 2).min(MAX_DELAY);
        Some(p)
    }
}

/// The waiting policy for libvirt at one URI.
#[derive(Debug, Clone)]
pub struct Reconnect {
    uri: String,
    bound: Duration,
}

impl Reconnect {
    /// Waits up to `bound` for libvirt at `uri` (zero: fail at once).
    pub fn new(uri: &str, bound: Duration) -> Reconnect {
        Reconnect {
            uri: uri.to_string(),
            bound,
        }
    }

    /// The URI.
    pub fn uri(&self) -> &str {
        &self.uri
    }

    /// The bound of a wait.
    pub fn bound(&self) -> Duration {
        self.bound
    }

    /// Runs `what` (words for messages: "listing domains"): `open` then `call` on what it
    /// opened. A failure that means libvirtd is away (see [`is_lost_connection`]) is waited
    /// out, with backoff, while the bound allows: always in `open`, in `call` only when `retry`
    /// is [`Retry::Safe`]. Any other failure is returned at once.
    pub fn call<S, T>(
        &self,
        what: &str,
        retry: Retry,
        open: impl FnMut() -> Result<S>,
        call: impl FnMut(&S) -> Result<T>,
    ) -> Result<T> {
        self.run(what, retry, classify, open, call)
    }

    /// [`Reconnect::call`] with the classification of failures given.
    fn run<S, T>(
        &self,
        what: &str,
        retry: Retry,
        classify: impl Fn(&Error) -> Failure,
        mut open: impl FnMut() -> Result<S>,
        mut call: impl FnMut(&S) -> Result<T>,
    ) -> Result<T> {
        let mut waiting: Option<(Instant, Backoff)> = None;
        // Logs the end of a wait: libvirtd answered (whatever it said).
        let back = |waiting: &Option<(Instant, Backoff)>| {
            if let Some((since, _)) = waiting {
                tracing::info!(
                    uri = %self.uri,
                    waited_ms = since.elapsed().as_millis() as u64,
                    "libvirt at {} reachable again ({what})",
                    self.uri
                );
            }
        };
        loop {
            let err = match open() {
                Ok(s) => match call(&s) {
                    Ok(v) => {
                        back(&waiting);
                        return Ok(v);
                    }
                    Err(e) if classify(&e) == Failure::Answer => {
                        back(&waiting);
                        return Err(e);
                    }
                    Err(e) if retry == Retry::ConnectOnly && classify(&e) == Failure::Lost => {
                        return Err(Error::new(
                            ErrorKind::Unavailable,
                            format!(
                                "lost the connection to libvirt at {} while {what}; whether it \
                                 took effect is unknown",
                                self.uri
                            ),
                        )
                        .with_source(e))
                    }
                    Err(e) => e,
                },
                Err(e) if classify(&e) == Failure::Answer => {
                    back(&waiting);
                    return Err(e);
                }
                Err(e) => e,
            };
            let (since, backoff) = waiting.get_or_insert_with(|| {
                if !self.bound.is_zero() {
                    tracing::warn!(
                        uri = %self.uri,
                        error = %err.chain(),
                        "libvirt at {} unreachable; waiting up to {} s ({what})",
                        self.uri,
                        self.bound.as_secs()
                    );
                }
                (Instant::now(), Backoff::default())
            });
            let left = self.bound.saturating_sub(since.elapsed());
            match backoff.pause(left) {
                Some(p) => std::thread::sleep(p),
                None => {
                    let waited = since.elapsed();
                    return Err(Error::new(
                        ErrorKind::Unavailable,
                        if self.bound.is_zero() {
                            format!(
                                "libvirt at {} is unreachable (is libvirtd running?); {what} failed \
                                 (libvirt.reconnect_timeout_secs is 0: no waiting)",
                                self.uri
                            )
                        } else {
                            format!(
                                "libvirt at {} stayed unreachable for {:.1} s (is libvirtd \
                                 running?); gave up {what}",
                                self.uri,
                                waited.as_secs_f64()
                            )
                        },
                    )
                    .with_source(err));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    #[test]
    fn lost_connections_are_told_from_refusals() {
        let k = |n| Enum::Known(n);
        assert!(is_lost_connection(
            k(ErrorNumber::SystemError),
            "Failed to connect socket to '/var/run/libvirt/libvirt-sock': No such file or directory"
        ));
        assert!(is_lost_connection(
            k(ErrorNumber::InternalError),
            "internal error: client socket is closed"
        ));
        assert!(is_lost_connection(
            k(ErrorNumber::Rpc),
            "End of file while reading data: Input/output error"
        ));
        assert!(is_lost_connection(k(ErrorNumber::NoConnect), "anything"));
        // A live daemon saying no: never waited for.
        assert!(!is_lost_connection(
            k(ErrorNumber::InternalError),
            "internal error: unable to execute QEMU command"
        ));
        assert!(!is_lost_connection(
            k(ErrorNumber::NoDomain),
            "Domain not found"
        ));
        assert!(!is_lost_connection(
            k(ErrorNumber::OperationInvalid),
            "domain is not running"
        ));
        assert!(!is_lost_connection(
            k(ErrorNumber::AgentUnresponsive),
            "Guest agent is not responding"
        ));
        assert!(!is_lost_connection(
            Enum::Unknown(9999),
            "client socket is closed"
        ));
        // Only what the client refused before sending counts as never sent.
        assert!(never_sent(
            k(ErrorNumber::InternalError),
            "internal error: client socket is closed"
        ));
        assert!(never_sent(
            k(ErrorNumber::SystemError),
            "Cannot write data: Broken pipe"
        ));
        assert!(!never_sent(
            k(ErrorNumber::SystemError),
            "End of file while reading data: Input/output error"
        ));
    }

    #[test]
    fn backoff_doubles_to_two_seconds_and_never_passes_the_bound() {
        let mut b = Backoff::default();
        let big = Duration::from_secs(3600);
        let ms: Vec<u128> = (0..7).map(|_| b.pause(big).unwrap().as_millis()).collect();
        assert_eq!(ms, [100, 200, 400, 800, 1600, 2000, 2000]);
        assert_eq!(
            b.pause(Duration::from_millis(30)),
            Some(Duration::from_millis(30))
        );
        assert_eq!(b.pause(Duration::ZERO), None);
        // The pauses of a whole wait sum to the bound, not past it.
        let bound = Duration::from_millis(5_250);
        let (mut b, mut spent) = (Backoff::default(), Duration::ZERO);
        while let Some(p) = b.pause(bound - spent) {
            spent += p;
        }
        assert_eq!(spent, bound);
    }

    /// A test classifier: "gone" is a lost connection, "closed" one that sent nothing.
    fn gone(e: &Error) -> Failure {
        let m = e.to_string();
        if m.contains("gone") {
            Failure::Lost
        } else if m.contains("closed") {
            Failure::NotSent
        } else {
            Failure::Answer
        }
    }

    fn away() -> Error {
        Error::new(ErrorKind::Internal, "libvirtd gone")
    }

    #[test]
    fn a_safe_call_is_repeated_until_libvirt_is_back() {
        let r = Reconnect::new("qemu:///test", Duration::from_secs(10));
        let (opens, calls) = (Cell::new(0), Cell::new(0));
        let t = Instant::now();
        let v = r
            .run(
                "listing domains",
                Retry::Safe,
                gone,
                || {
                    opens.set(opens.get() + 1);
                    if opens.get() < 3 {
                        Err(away())
                    } else {
                        Ok(7)
                    }
                },
                |s| {
                    calls.set(calls.get() + 1);
                    if calls.get() < 2 {
                        Err(away())
                    } else {
                        Ok(*s * 6)
                    }
                },
            )
            .unwrap();
        assert_eq!((v, opens.get(), calls.get()), (42, 4, 2));
        // Pauses of 100, 200 and 400 ms.
        let took = t.elapsed();
        assert!(took >= Duration::from_millis(700), "{took:?}");
        assert!(took < Duration::from_secs(10), "{took:?}");
    }

    #[test]
    fn a_change_waits_to_connect_but_is_never_sent_twice() {
        let r = Reconnect::new("qemu:///test", Duration::from_secs(10));
        let (opens, calls) = (Cell::new(0), Cell::new(0));
        let e = r
            .run(
                "beginning a backup job on domain d",
                Retry::ConnectOnly,
                gone,
                || {
                    opens.set(opens.get() + 1);
                    if opens.get() < 2 {
                        Err(away())
                    } else {
                        Ok(())
                    }
                },
                |_| -> Result<()> {
                    calls.set(calls.get() + 1);
                    Err(away())
                },
            )
            .unwrap_err();
        assert_eq!((opens.get(), calls.get()), (2, 1));
        assert_eq!(e.kind(), ErrorKind::Unavailable);
        assert!(
            e.to_string().contains("whether it took effect is unknown"),
            "{e}"
        );
        assert!(e.to_string().contains("qemu:///test"), "{e}");
        // Refused by the client before sending: sent again.
        let calls = Cell::new(0);
        r.run(
            "starting domain d",
            Retry::ConnectOnly,
            gone,
            || Ok(()),
            |_| {
                calls.set(calls.get() + 1);
                if calls.get() < 2 {
                    Err(Error::new(ErrorKind::Internal, "client socket closed"))
                } else {
                    Ok(())
                }
            },
        )
        .unwrap();
        assert_eq!(calls.get(), 2);
    }

    #[test]
    fn the_wait_is_bounded_and_says_how_long_it_was() {
        let r = Reconnect::new("qemu:///test", Duration::from_millis(350));
        let t = Instant::now();
        let e = r
            .run(
                "listing domains",
                Retry::Safe,
                gone,
                || -> Result<()> { Err(away()) },
                |_| Ok(()),
            )
            .unwrap_err();
        let took = t.elapsed();
        assert!(
            // Bounded, not precise: a loaded machine may oversleep, never undersleep.
            took >= Duration::from_millis(350) && took < Duration::from_secs(5),
            "{took:?}"
        );
        assert_eq!(e.kind(), ErrorKind::Unavailable);
        let msg = e.to_string();
        assert!(
            msg.contains("libvirt at qemu:///test stayed unreachable for ") && msg.contains(" s "),
            "{msg}"
        );
        assert!(e.chain().contains("libvirtd gone"), "{}", e.chain());
        // Zero: no waiting at all.
        let r = Reconnect::new("qemu:///test", Duration::ZERO);
        let t = Instant::now();
        let e = r
            .run(
                "listing domains",
                Retry::Safe,
                gone,
                || -> Result<()> { Err(away()) },
                |_| Ok(()),
            )
            .unwrap_err();
        assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
        assert!(e.to_string().contains("reconnect_timeout_secs is 0"), "{e}");
    }

    #[test]
    fn refusals_return_at_once_and_zero_bound_does_not_wait() {
        let r = Reconnect::new("qemu:///test", Duration::from_secs(60));
        let calls = Cell::new(0);
        let e = r
            .call(
                "reading",
                Retry::Safe,
                || Ok(()),
                |_| -> Result<()> {
                    calls.set(calls.get() + 1);
                    Err(Error::new(ErrorKind::NotFound, "domain x not found"))
                },
            )
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::NotFound);
        assert_eq!(calls.get(), 1);
    }
}
