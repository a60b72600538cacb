//! Operations: the record of one piece of long-running work (a capture, an import, an
//! export), its state machine and its live progress.
//!
//! States: `Queued → Preparing → Saving → Active`, or `Failed` / `Cancelled` from any
//! non-terminal state. Progress counters are atomics the data path updates; a snapshot
//! ([`Operation`]) reads them together with the state. State changes are published on a
//! `watch` channel so watchers wake at once, and handed to a hook the controller sets
//! ([`OpEntry::on_change`]) that saves them in the operations database ([`super::store`]).
//! An operation read back from that database is an [`OpEntry::ended`]: a fixed record.

use std::sync::{Arc, Mutex, OnceLock};
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

impl OpKind {
    /// The lower-case name stored in the operations database.
    pub fn name(self) -> &'static str {
        match self {
            OpKind::Capture => "capture",
            OpKind::Import => "import",
            OpKind::Export => "export",
        }
    }

    /// Back from [`OpKind::name`].
    pub fn parse(s: &str) -> Option<OpKind> {
        [OpKind::Capture, OpKind::Import, OpKind::Export]
            .into_iter()
            .find(|k| k.name() == s)
    }
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

    /// The upper-case name, as the API and the operations database spell it.
    pub fn name(self) -> &'static str {
        match self {
            OpState::Queued => "QUEUED",
            OpState::Preparing => "PREPARING",
            OpState::Saving => "SAVING",
            OpState::Active => "ACTIVE",
            OpState::Failed => "FAILED",
            OpState::Cancelled => "CANCELLED",
        }
    }

    /// Back from [`OpState::name`].
    pub fn parse(s: &str) -> Option<OpState> {
        [
            OpState::Queued,
            OpState::Preparing,
            OpState::Saving,
            OpState::Active,
            OpState::Failed,
            OpState::Cancelled,
        ]
        .into_iter()
        .find(|k| k.name() == s)
    }
}

/// A failure recorded on an operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpError {
    pub kind: ErrorKind,
    pub message: String,
    /// Reason, field and subject for the error details.
    pub facts: crate::error::Facts,
}

/// The part of an operation that changes as it runs.
#[derive(Debug, Clone)]
pub struct OpStatus {
    pub state: OpState,
    pub error: Option<OpError>,
    pub updated_at: i64,
}

/// A progress reading.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct ProgressSnapshot {
    pub bytes_total: u64,
    pub bytes_done: u64,
    pub bytes_read: u64,
    pub bytes_zero: u64,
    pub bytes_new: u64,
    pub bytes_existing: u64,
    pub rate_bytes_per_sec: u64,
}

/// How a live capture read its disk: all of it, or only what changed since the checkpoint of
/// the previous capture.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct ReadReport {
    /// Only the blocks the dirty bitmap marked were read.
    pub incremental: bool,
    /// Incremental: the checkpoint the changes were counted from.
    pub since_checkpoint: String,
    /// Incremental: guest bytes the dirty bitmap marked as written since.
    pub changed_bytes: u64,
    /// The checkpoint made with this capture, for the next one ("" when none could be).
    pub checkpoint: String,
    /// Why the whole disk was read or no checkpoint was made, when either was possible in
    /// principle ("" otherwise).
    pub note: String,
}

/// A consistent snapshot of an operation, as the API shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct Operation {
    pub id: String,
    pub kind: OpKind,
    pub state: OpState,
    pub domain: String,
    pub image_name: String,
    pub request_id: String,
    pub path: String,
    /// Who asked for it (empty until callers are identified).
    pub requester: String,
    pub progress: ProgressSnapshot,
    pub error: Option<OpError>,
    pub created_at: i64,
    pub updated_at: i64,
    pub consistency: String,
    pub freeze_window_ms: u64,
    pub location: String,
    pub prep: Vec<PrepReport>,
    /// Cancellation was asked for.
    pub cancel_requested: bool,
    /// Live captures: how the disk was read.
    pub read: Option<ReadReport>,
}

/// A prep step's plan or outcome, as reported on an operation.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct PrepReport {
    pub step: String,
    /// "planned", "applied", "unchanged", "not-applicable", "restored", "failed".
    pub outcome: String,
    pub changes: Vec<ReportedChange>,
    pub message: String,
}

/// One change of a prep step: a file (with its diff when planned) or an action (unmount).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
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
    read: Option<ReadReport>,
}

/// Called with an operation after each change of its state but the end.
pub type ChangeHook = Box<dyn Fn(&OpEntry) + Send + Sync>;

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
    /// When it ended (the rate is measured up to then).
    ended: Mutex<Option<Instant>>,
    /// The rate of an operation read back from the database.
    stored_rate: u64,
    facts: Mutex<Facts>,
    on_change: OnceLock<ChangeHook>,
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
            ended: Mutex::new(None),
            stored_rate: 0,
            facts: Mutex::new(Facts::default()),
            on_change: OnceLock::new(),
        })
    }

    /// A fixed entry showing an operation read back from the database: its snapshot is `op`;
    /// a terminal one never changes, and nothing runs it.
    pub fn ended(op: Operation) -> Arc<OpEntry> {
        use std::sync::atomic::Ordering::Relaxed;
        let (status, _) = watch::channel(OpStatus {
            state: op.state,
            error: op.error,
            updated_at: op.updated_at,
        });
        let progress = Progress::default();
        let p = &op.progress;
        progress.bytes_total.store(p.bytes_total, Relaxed);
        progress.bytes_done.store(p.bytes_done, Relaxed);
        progress.bytes_read.store(p.bytes_read, Relaxed);
        progress.bytes_zero.store(p.bytes_zero, Relaxed);
        progress.bytes_new.store(p.bytes_new, Relaxed);
        progress.bytes_existing.store(p.bytes_existing, Relaxed);
        Arc::new(OpEntry {
            id: op.id,
            kind: op.kind,
            domain: op.domain,
            image_name: op.image_name,
            request_id: op.request_id,
            path: op.path,
            created_at: op.created_at,
            progress: Arc::new(progress),
            cancel: CancelToken::default(),
            status,
            saving_since: Mutex::new(None),
            ended: Mutex::new(None),
            stored_rate: op.progress.rate_bytes_per_sec,
            facts: Mutex::new(Facts {
                consistency: op.consistency,
                freeze_window_ms: op.freeze_window_ms,
                location: op.location,
                prep: op.prep,
                requester: op.requester,
                read: op.read,
            }),
            on_change: OnceLock::new(),
        })
    }

    /// Sets the hook called after each state change but the end (once; later calls are
    /// ignored). The controller saves the operation there.
    pub fn on_change(&self, hook: ChangeHook) {
        let _ = self.on_change.set(hook);
    }

    /// Records who asked for the operation (before it is recorded).
    pub fn set_requester(&self, who: &str) {
        self.facts().requester = who.to_string();
    }

    fn facts(&self) -> std::sync::MutexGuard<'_, Facts> {
        self.facts.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records the consistency level the capture gives.
    pub fn set_consistency(&self, c: &str) {
        self.facts().consistency = c.to_string();
    }

    /// Records how a live capture read its disk.
    pub fn set_read(&self, read: ReadReport) {
        self.facts().read = Some(read);
    }

    /// Records how long the guest was frozen.
    pub fn set_freeze_window(&self, ms: u64) {
        self.facts().freeze_window_ms = ms;
    }

    /// Records the prep steps' outcomes.
    pub fn set_prep(&self, reports: Vec<PrepReport>) {
        self.facts().prep = reports;
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
        let changed = self.status.send_if_modified(|s| {
            if s.state.is_terminal() || s.state == state {
                return false;
            }
            s.state = state;
            s.updated_at = now_unix();
            true
        });
        if changed {
            if let Some(hook) = self.on_change.get() {
                hook(self);
            }
        }
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
                    facts: crate::error::Facts {
                        reason: "CANCELLED".into(),
                        ..Default::default()
                    },
                }),
            ),
            Err(e) => (
                OpState::Failed,
                Some(OpError {
                    kind: e.kind(),
                    message: e.chain(),
                    facts: e.facts(),
                }),
            ),
        };
        let ended = &self.ended;
        self.status.send_if_modified(|s| {
            if s.state.is_terminal() {
                return false;
            }
            *ended.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
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
        let until = *self.ended.lock().unwrap_or_else(|p| p.into_inner());
        let rate = self
            .saving_since
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .map(|t| {
                let secs = until
                    .unwrap_or_else(Instant::now)
                    .saturating_duration_since(t)
                    .as_secs_f64();
                if secs > 0.05 {
                    (done as f64 / secs) as u64
                } else {
                    0
                }
            })
            .unwrap_or(self.stored_rate);
        Operation {
            id: self.id.clone(),
            kind: self.kind,
            state: st.state,
            domain: self.domain.clone(),
            image_name: self.image_name.clone(),
            request_id: self.request_id.clone(),
            path: self.path.clone(),
            requester: facts.requester,
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
            read: facts.read,
            cancel_requested: self.cancel.is_cancelled() && !st.state.is_terminal(),
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
