//! Operations: the record of one piece of long-running work (a capture, an import, an
//! export), its state machine and its live progress.
//!
//! States: `Queued → Preparing → Saving → Active`, or `Failed` / `Cancelled` from any
//! non-terminal state. Progress counters are atomics the data path updates; a snapshot
//! ([`Operation`]) reads them together with the state. State changes are published on a
//! `watch` channel so watchers wake at once.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::watch;

use crate::error::{Error, ErrorKind};
use crate::progress::{CancelToken, Progress};
use crate::util::now_unix;

/// What an operation does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpKind {
    Capture,
    Import,
    Export,
}

/// Where an operation is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpState {
    Queued,
    Preparing,
    Saving,
    Active,
    Failed,
    Cancelled,
}

impl OpState {
    /// True for `Active`, `Failed` and `Cancelled`.
    pub fn is_terminal(self) -> bool {
        matches!(self, OpState::Active | OpState::Failed | OpState::Cancelled)
    }
}

/// A failure recorded on an operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpError {
    pub kind: ErrorKind,
    pub message: String,
}

/// The part of an operation that changes as it runs.
#[derive(Debug, Clone)]
pub struct OpStatus {
    pub state: OpState,
    pub error: Option<OpError>,
    pub updated_at: i64,
}

/// A progress reading.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProgressSnapshot {
    pub bytes_total: u64,
    pub bytes_done: u64,
    pub bytes_read: u64,
    pub bytes_zero: u64,
    pub bytes_new: u64,
    pub bytes_existing: u64,
    pub rate_bytes_per_sec: u64,
}

/// A consistent snapshot of an operation, as the API shows it.
#[derive(Debug, Clone)]
pub struct Operation {
    pub id: String,
    pub kind: OpKind,
    pub state: OpState,
    pub domain: String,
    pub image_name: String,
    pub request_id: String,
    pub path: String,
    pub progress: ProgressSnapshot,
    pub error: Option<OpError>,
    pub created_at: i64,
    pub updated_at: i64,
    pub consistency: String,
    pub freeze_window_ms: u64,
    pub location: String,
    pub prep: Vec<PrepReport>,
    /// Who started it (the API caller, e.g. `uid:1000`); empty for internal callers.
    pub requester: String,
}

/// A prep step's plan or outcome, as reported on an operation.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PrepReport {
    pub step: String,
    /// "planned", "applied", "unchanged", "not-applicable", "restored", "failed".
    pub outcome: String,
    pub changes: Vec<ReportedChange>,
    pub message: String,
}

/// One change of a prep step: a file (with its diff when planned) or an action (unmount).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReportedChange {
    pub path: String,
    pub action: String,
    pub diff: String,
}

/// Facts an operation learns as it runs.
#[derive(Debug, Clone, Default)]
struct Facts {
    consistency: String,
    freeze_window_ms: u64,
    location: String,
    prep: Vec<PrepReport>,
    requester: String,
}

/// The live record of an operation, shared by the table and the task that runs it.
pub struct OpEntry {
    pub id: String,
    pub kind: OpKind,
    pub domain: String,
    pub image_name: String,
    pub request_id: String,
    pub path: String,
    pub created_at: i64,
    pub progress: Arc<Progress>,
    pub cancel: CancelToken,
    status: watch::Sender<OpStatus>,
    saving_since: Mutex<Option<Instant>>,
    facts: Mutex<Facts>,
}

impl OpEntry {
    /// A new QUEUED operation.
    pub fn new(
        kind: OpKind,
        domain: &str,
        image_name: &str,
        request_id: &str,
        path: &str,
    ) -> Arc<OpEntry> {
        let now = now_unix();
        let (status, _) = watch::channel(OpStatus {
            state: OpState::Queued,
            error: None,
            updated_at: now,
        });
        Arc::new(OpEntry {
            id: crate::util::random_id("op"),
            kind,
            domain: domain.to_string(),
            image_name: image_name.to_string(),
            request_id: request_id.to_string(),
            path: path.to_string(),
            created_at: now,
            progress: Arc::new(Progress::default()),
            cancel: CancelToken::default(),
            status,
            saving_since: Mutex::new(None),
            facts: Mutex::new(Facts::default()),
        })
    }

    fn facts(&self) -> std::sync::MutexGuard<'_, Facts> {
        self.facts.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records the consistency level the capture gives.
    pub fn set_consistency(&self, c: &str) {
        self.facts().consistency = c.to_string();
    }

    /// Records how long the guest was frozen.
    pub fn set_freeze_window(&self, ms: u64) {
        self.facts().freeze_window_ms = ms;
    }

    /// Records the prep steps' outcomes.
    pub fn set_prep(&self, reports: Vec<PrepReport>) {
        self.facts().prep = reports;
    }

    /// Records who asked for the operation.
    pub fn set_requester(&self, who: &str) {
        self.facts().requester = who.to_string();
    }

    /// Who asked for the operation.
    pub fn requester(&self) -> String {
        self.facts().requester.clone()
    }

    /// Records where the image landed.
    pub fn set_location(&self, l: &str) {
        self.facts().location = l.to_string();
    }

    /// The current state.
    pub fn state(&self) -> OpState {
        self.status.borrow().state
    }

    /// Moves to `state` (ignored once terminal: the first end wins).
    pub fn set_state(&self, state: OpState) {
        if state == OpState::Saving {
            *self.saving_since.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
        }
        self.status.send_if_modified(|s| {
            if s.state.is_terminal() || s.state == state {
                return false;
            }
            s.state = state;
            s.updated_at = now_unix();
            true
        });
    }

    /// Ends the operation from a result: ACTIVE, CANCELLED or FAILED with the error.
    pub fn finish(&self, result: &Result<(), Error>) {
        let (state, error) = match result {
            Ok(()) => (OpState::Active, None),
            Err(e) if e.kind() == ErrorKind::Cancelled => (
                OpState::Cancelled,
                Some(OpError {
                    kind: ErrorKind::Cancelled,
                    message: "cancelled by request".into(),
                }),
            ),
            Err(e) => (
                OpState::Failed,
                Some(OpError {
                    kind: e.kind(),
                    message: e.chain(),
                }),
            ),
        };
        self.status.send_if_modified(|s| {
            if s.state.is_terminal() {
                return false;
            }
            s.state = state;
            s.error = error;
            s.updated_at = now_unix();
            true
        });
    }

    /// A receiver that wakes on every state change.
    pub fn subscribe(&self) -> watch::Receiver<OpStatus> {
        self.status.subscribe()
    }

    /// The snapshot the API returns.
    pub fn snapshot(&self) -> Operation {
        use std::sync::atomic::Ordering::Relaxed;
        let st = self.status.borrow().clone();
        let facts = self.facts().clone();
        let p = &self.progress;
        let done = p.bytes_done.load(Relaxed);
        let rate = self
            .saving_since
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .map(|t| {
                let secs = t.elapsed().as_secs_f64();
                if secs > 0.05 {
                    (done as f64 / secs) as u64
                } else {
                    0
                }
            })
            .unwrap_or(0);
        Operation {
            id: self.id.clone(),
            kind: self.kind,
            state: st.state,
            domain: self.domain.clone(),
            image_name: self.image_name.clone(),
            request_id: self.request_id.clone(),
            path: self.path.clone(),
            progress: ProgressSnapshot {
                bytes_total: p.bytes_total.load(Relaxed),
                bytes_done: done,
                bytes_read: p.bytes_read.load(Relaxed),
                bytes_zero: p.bytes_zero.load(Relaxed),
                bytes_new: p.bytes_new.load(Relaxed),
                bytes_existing: p.bytes_existing.load(Relaxed),
                rate_bytes_per_sec: rate,
            },
            error: st.error,
            created_at: self.created_at,
            updated_at: st.updated_at,
            consistency: facts.consistency,
            freeze_window_ms: facts.freeze_window_ms,
            location: facts.location,
            prep: facts.prep,
            requester: facts.requester,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_end_wins() {
        let op = OpEntry::new(OpKind::Capture, "d", "i", "", "");
        assert_eq!(op.state(), OpState::Queued);
        op.set_state(OpState::Saving);
        op.finish(&Err(Error::new(ErrorKind::Cancelled, "x")));
        op.finish(&Ok(()));
        op.set_state(OpState::Preparing);
        let s = op.snapshot();
        assert_eq!(s.state, OpState::Cancelled);
        assert_eq!(s.error.unwrap().kind, ErrorKind::Cancelled);
    }

    #[test]
    fn failure_keeps_the_chain() {
        let op = OpEntry::new(OpKind::Export, "", "i", "", "/x");
        let e = Error::io(
            "writing /x",
            std::io::Error::from_raw_os_error(libc::ENOSPC),
        );
        op.finish(&Err(e));
        let s = op.snapshot();
        assert_eq!(s.state, OpState::Failed);
        let err = s.error.unwrap();
        assert_eq!(err.kind, ErrorKind::ResourceExhausted);
        assert!(err.message.starts_with("writing /x: "), "{}", err.message);
    }
}
