//! What a running piece of work shares with the operation that owns it: live byte counters
//! ([`Progress`]) and a cancel flag ([`CancelToken`]). A leaf, used by capture, export and
//! upload alike, so none of them has to import another for it.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use crate::error::{Error, ErrorKind, Result};

/// Live counters of a running capture, shared with the operation that reports them.
#[derive(Debug, Default)]
pub struct Progress {
    pub bytes_total: AtomicU64,
    pub bytes_done: AtomicU64,
    pub bytes_read: AtomicU64,
    pub bytes_zero: AtomicU64,
    pub bytes_new: AtomicU64,
    pub bytes_existing: AtomicU64,
}

/// A cancel flag shared between an operation and its pipeline.
#[derive(Debug, Clone, Default)]
pub struct CancelToken(Arc<AtomicBool>);

impl CancelToken {
    /// Asks the work to stop.
    pub fn cancel(&self) {
        self.0.store(true, Ordering::SeqCst);
    }
    /// True once cancelled.
    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
    /// CANCELLED error when cancelled.
    pub fn check(&self) -> Result<()> {
        if self.is_cancelled() {
            Err(Error::new(ErrorKind::Cancelled, "cancelled"))
        } else {
            Ok(())
        }
    }
}
