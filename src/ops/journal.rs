//! The live-capture journal: what a running capture did to a guest that a restarted daemon
//! must undo (a freeze, a backup job, a scratch directory).
//!
//! One small JSON file per live capture under `<run_dir>/journal/`, written (temp + rename)
//! before the guest is frozen and removed once the backup job has ended. It lives under
//! `/run` on purpose: after a host reboot no guest is frozen and no job runs, so nothing
//! stale can be replayed. At start the daemon [`recover`]s every entry it finds: it thaws the
//! guest until `guest-fsfreeze-status` says thawed, ends the backup job and removes the
//! scratch directory.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::capture::live::thaw_until_thawed;
use crate::error::Result;
use crate::hypervisor::Hypervisor;
use crate::util;

/// One live capture in progress.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Entry {
    pub op: String,
    pub domain: String,
    /// The backup job's directory (socket, scratch file).
    pub backup_dir: PathBuf,
    /// Set before the freeze, cleared after the thaw.
    pub frozen: bool,
    pub started_at: i64,
}

/// The journal directory.
#[derive(Debug, Clone)]
pub struct Journal {
    dir: PathBuf,
}

impl Journal {
    /// The journal under `run_dir`.
    pub fn new(run_dir: &Path) -> Journal {
        Journal {
            dir: run_dir.join("journal"),
        }
    }

    fn path(&self, op: &str) -> PathBuf {
        self.dir.join(format!("{op}.json"))
    }

    /// Records (or updates) an entry durably.
    pub fn write(&self, e: &Entry) -> Result<()> {
        std::fs::create_dir_all(&self.dir).map_err(|err| {
            crate::error::Error::io(format!("creating journal {}", self.dir.display()), err)
        })?;
        let json = serde_json::to_vec(e).unwrap_or_default();
        util::write_atomic(&self.path(&e.op), &json)
    }

    /// Forgets an entry.
    pub fn remove(&self, op: &str) {
        let _ = std::fs::remove_file(self.path(op));
    }

    /// Every entry left behind.
    pub fn entries(&self) -> Vec<Entry> {
        let Ok(rd) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        rd.flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with(".json"))
            .filter_map(|e| std::fs::read(e.path()).ok())
            .filter_map(|b| serde_json::from_slice(&b).ok())
            .collect()
    }

    /// Undoes what dead captures left: thaws, ends backup jobs, removes scratch directories.
    pub async fn recover(&self, hv: Arc<dyn Hypervisor>) {
        for e in self.entries() {
            tracing::warn!(op = %e.op, domain = %e.domain, frozen = e.frozen, "recovering a live capture left by a previous run");
            if e.frozen {
                thaw_until_thawed(hv.clone(), e.domain.clone(), Duration::from_secs(30)).await;
            }
            let (h, d) = (hv.clone(), e.domain.clone());
            match tokio::task::spawn_blocking(move || h.backup_end(&d)).await {
                Ok(Ok(())) => tracing::info!(domain = %e.domain, "backup job ended"),
                Ok(Err(err)) => {
                    tracing::warn!(domain = %e.domain, error = %err.chain(), "could not end backup job")
                }
                Err(_) => {}
            }
            if e.backup_dir
                .starts_with(self.dir.parent().unwrap_or(Path::new("/nonexistent")))
            {
                let _ = std::fs::remove_dir_all(&e.backup_dir);
            }
            self.remove(&e.op);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_round_trip() {
        let d = tempfile::tempdir().unwrap();
        let j = Journal::new(d.path());
        assert!(j.entries().is_empty());
        let e = Entry {
            op: "op-1".into(),
            domain: "web".into(),
            backup_dir: d.path().join("b"),
            frozen: true,
            started_at: 5,
        };
        j.write(&e).unwrap();
        assert_eq!(j.entries(), vec![e.clone()]);
        j.remove("op-1");
        assert!(j.entries().is_empty());
    }
}
