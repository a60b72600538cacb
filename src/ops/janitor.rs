//! The janitor: finishes the cleanup an ended capture could not confirm.
//!
//! A capture's duties (thaw, end its backup job, start the domain again, restore prep, remove
//! the job's directory) are journaled ([`super::journal`]) and done in line when they can be.
//! When one cannot be confirmed (libvirtd restarting, a guest agent not answering), the entry
//! stays on disk and, once the operation has ended, [`Controller::end`] hands it here: a task
//! retries [`Journal::settle`] with a backoff (1 s doubling to 30 s) until every duty is
//! confirmed and the entry is gone. Only entries of ended operations are touched; entries left
//! by a previous run are adopted at start ([`Controller::adopt_journal`]) once recovery had its
//! first try.
//!
//! While it works, the janitor holds the domain's lock (the same lock a capture takes): a new
//! capture of that domain is refused ABORTED with a message saying cleanup is under way, so it
//! never meets our own leftover job. Each attempt's failure is logged once per change of the
//! error, and the success once. A duty that can only be done later (prep in a guest left shut
//! off) releases the domain and stays for a later start of the daemon.

use std::time::Duration;

use super::journal::{Cleanup, Journal};
use super::Controller;

/// The first pause between two attempts; doubled after each failure up to [`MAX_BACKOFF`].
#[cfg(not(test))]
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
#[cfg(test)]
const FIRST_BACKOFF: Duration = Duration::from_millis(10);
/// The longest pause between two attempts.
#[cfg(not(test))]
const MAX_BACKOFF: Duration = Duration::from_secs(30);
#[cfg(test)]
const MAX_BACKOFF: Duration = Duration::from_millis(100);

/// What holds a domain in the lock table while a janitor cleans up after operation `op`.
pub(super) fn holder(op: &str) -> String {
    format!("cleanup:{op}")
}

impl Controller {
    fn journal(&self) -> Journal {
        Journal::new(&self.inner.cfg.capture.run_dir)
    }

    /// True when operation `op` (ended) left a journal entry with duties to finish.
    pub(super) fn has_cleanup(&self, op: &str) -> bool {
        self.journal().get(op).is_some()
    }

    /// Starts a janitor for the journal entries of ended operations `ops` on `domain`, one
    /// after the other; the caller has put [`holder`]`(ops[0])` in the domain's lock, which
    /// the janitor releases when done.
    pub(super) fn spawn_janitor(&self, ops: Vec<String>, domain: String) {
        let ctl = self.clone();
        let key = holder(ops.first().map(String::as_str).unwrap_or_default());
        tokio::spawn(async move {
            for op in &ops {
                ctl.janitor(op, &domain).await;
            }
            let mut t = ctl.table();
            if t.domain_locks.get(&domain) == Some(&key) {
                t.domain_locks.remove(&domain);
            }
        });
    }

    async fn janitor(&self, op: &str, domain: &str) {
        let journal = self.journal();
        let mut pause = FIRST_BACKOFF;
        let mut last = String::new();
        let mut attempts = 0u32;
        while let Some(e) = journal.get(op) {
            attempts += 1;
            match journal.settle(self.inner.hv.clone(), e).await {
                Cleanup::Done => {
                    tracing::info!(
                        op,
                        domain,
                        attempts,
                        "cleanup after the operation confirmed; the domain is free"
                    );
                    return;
                }
                Cleanup::Deferred(why) => {
                    tracing::warn!(op, domain, "{why}");
                    return;
                }
                Cleanup::Retry(err) => {
                    let msg = err.chain();
                    if msg != last {
                        tracing::warn!(op, domain, attempts, error = %msg, "cleanup after the operation not confirmed yet; retrying (logged again only if the error changes)");
                        last = msg;
                    }
                }
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(MAX_BACKOFF);
        }
    }

    /// Hands every journal entry left on disk (by a previous run, after
    /// [`Journal::recover`]) to a janitor, holding its domain. Call once at start, before
    /// serving.
    pub fn adopt_journal(&self) {
        let mut by_domain: std::collections::BTreeMap<String, Vec<String>> = Default::default();
        for e in self.journal().entries() {
            tracing::info!(op = %e.op, domain = %e.domain, "a janitor takes over the cleanup left by a previous run");
            by_domain.entry(e.domain).or_default().push(e.op);
        }
        for (domain, ops) in by_domain {
            {
                let mut t = self.table();
                if t.domain_locks.contains_key(&domain) {
                    continue; // already held by a janitor
                }
                t.domain_locks.insert(domain.clone(), holder(&ops[0]));
            }
            self.spawn_janitor(ops, domain);
        }
    }
}
