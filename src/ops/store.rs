//! The operations database: every operation and every `request_id`, kept across restarts.
//!
//! One SQLite file, `<[daemon] state_dir>/operations.db` (rusqlite, SQLite compiled in). All
//! SQL of the daemon's operations lives in this module.
//!
//! Schema (version 1):
//!
//! ```text
//! schema_version(version)                 one row; a newer version than this build knows is
//!                                         refused at open, naming the file
//! operations(id PK, kind, state, domain, image_name, request_id, path, target, requester,
//!            created_at, updated_at, ended_at, error_kind, error_message, consistency,
//!            freeze_window_ms, location, progress JSON, prep JSON, daemon_pid)
//!     index (created_at DESC, id DESC)    newest first, and keyset paging
//! request_ids(request_id PK, operation → operations(id) ON DELETE CASCADE, fingerprint,
//!             created_at)
//! ```
//!
//! `kind` is `capture`/`import`/`export`, `state` the upper-case state name, `error_kind` the
//! gRPC code name ([`ErrorKind::code_name`]); `ended_at` is NULL exactly while the operation
//! has not ended. `target` says where the bytes go (`repository`, `file:PATH`, `remote:NAME`)
//! so that start-up can tell what an interrupted operation may have left. `daemon_pid` is the
//! process that ran the operation. The progress counters and prep reports are JSON.
//! `fingerprint` is the sha256 of the parameters of the call that started the operation, so a
//! retry with the same `request_id` and other parameters is told apart; a `request_id` is
//! honoured for [`REQUEST_ID_TTL`] after the call, then it may start a new operation.
//!
//! Durability: WAL journal with `synchronous=FULL`, so each committed write (the insert at
//! QUEUED, each state change, the end) is on disk when the call returns: an operation a caller
//! was told about exists after a crash or power loss. Terminal rows are never changed again by
//! an update (a late state change of a racing task cannot revive an ended operation).
//!
//! Concurrency: one connection behind a `Mutex`, called synchronously, also from async code.
//! Every statement touches one row or an indexed range, and a commit costs one WAL fsync
//! (well under a millisecond to a few milliseconds), which is about what a hop to the blocking
//! pool would cost; keeping the calls synchronous lets the controller's synchronous methods
//! (`operation`, `cancel`, the state-change hook of a running operation) write and read in
//! order, without a second copy of the table in memory. Listing every operation is the one
//! call that grows with the number kept (at most a few thousand rows a day on a busy host).

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use rusqlite::{params, Connection, ErrorCode, OptionalExtension, Row};
use sha2::{Digest, Sha256};

use super::operation::{OpError, OpKind, OpState, Operation, ProgressSnapshot, ReadReport};
use crate::error::{Error, ErrorKind, Result};

/// The schema version this build writes and reads.
pub const SCHEMA_VERSION: i64 = 1;

/// How long a `request_id` returns the operation it started: 24 hours.
pub const REQUEST_ID_TTL: i64 = 24 * 3600;

/// The file name of the database in the state directory.
pub const FILE_NAME: &str = "operations.db";

const SCHEMA_V1: &str = "
CREATE TABLE schema_version (version INTEGER NOT NULL);
CREATE TABLE operations (
    id               TEXT PRIMARY KEY NOT NULL,
    kind             TEXT NOT NULL,
    state            TEXT NOT NULL,
    domain           TEXT NOT NULL,
    image_name       TEXT NOT NULL,
    request_id       TEXT NOT NULL,
    path             TEXT NOT NULL,
    target           TEXT NOT NULL,
    requester        TEXT NOT NULL DEFAULT '',
    created_at       INTEGER NOT NULL,
    updated_at       INTEGER NOT NULL,
    ended_at         INTEGER,
    error_kind       TEXT,
    error_message    TEXT,
    error_facts      TEXT,
    consistency      TEXT NOT NULL,
    freeze_window_ms INTEGER NOT NULL,
    location         TEXT NOT NULL,
    progress         TEXT NOT NULL,
    prep             TEXT NOT NULL,
    daemon_pid       INTEGER NOT NULL
);
CREATE INDEX operations_newest ON operations (created_at DESC, id DESC);
CREATE INDEX operations_ended ON operations (ended_at) WHERE ended_at IS NOT NULL;
CREATE TABLE request_ids (
    request_id  TEXT PRIMARY KEY NOT NULL,
    operation   TEXT NOT NULL REFERENCES operations (id) ON DELETE CASCADE,
    fingerprint TEXT NOT NULL,
    created_at  INTEGER NOT NULL
);
CREATE INDEX request_ids_operation ON request_ids (operation);
";

const COLUMNS: &str = "id, kind, state, domain, image_name, request_id, path, requester, \
     created_at, updated_at, error_kind, error_message, consistency, freeze_window_ms, location, \
     progress, prep, error_facts";

/// An operation the database shows as not ended, with what start-up needs to explain it.
#[derive(Debug, Clone)]
pub struct Unfinished {
    pub op: Operation,
    /// `repository`, `file:PATH` or `remote:NAME`.
    pub target: String,
    /// The process that ran it.
    pub daemon_pid: u32,
}

/// The operations database.
pub struct Store {
    path: PathBuf,
    conn: Mutex<Connection>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("path", &self.path).finish()
    }
}

/// The hex sha256 of a call's parameters, as stored.
pub fn fingerprint(params: &str) -> String {
    hex::encode(Sha256::digest(params.as_bytes()))
}

impl Store {
    /// Opens (creating it and its directory, mode 0700, if needed) the database in `dir`.
    pub fn open_in(dir: &Path) -> Result<Store> {
        {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|e| Error::io(format!("creating state directory {}", dir.display()), e))?;
        }
        Store::open(&dir.join(FILE_NAME))
    }

    /// Opens (creating if needed) the database file `path` and checks its schema.
    pub fn open(path: &Path) -> Result<Store> {
        let err = |e| db_error(path, "opening", e);
        let conn = Connection::open(path).map_err(err)?;
        {
            use std::os::unix::fs::PermissionsExt;
            // Operations name guests, disks and paths: the daemon's user only.
            let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600));
        }
        // The first statement is where a file that is not a database shows it.
        let mode: String = conn
            .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
            .map_err(err)?;
        if !mode.eq_ignore_ascii_case("wal") {
            tracing::warn!(db = %path.display(), mode, "the operations database is not in WAL mode");
        }
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(err)?;
        conn.pragma_update(None, "foreign_keys", "ON")
            .map_err(err)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(err)?;
        let store = Store {
            path: path.to_path_buf(),
            conn: Mutex::new(conn),
        };
        store.check_schema()?;
        Ok(store)
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn err(&self, what: &str) -> impl Fn(rusqlite::Error) -> Error + '_ {
        let what = what.to_string();
        move |e| db_error(&self.path, &what, e)
    }

    /// Creates the schema in a new file, refuses a newer one, upgrades an older one.
    fn check_schema(&self) -> Result<()> {
        let mut conn = self.conn();
        let err = self.err("reading the schema of");
        let tx = conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(&err)?;
        let has_table: bool = tx
            .query_row(
                "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'schema_version'",
                [],
                |r| r.get::<_, i64>(0),
            )
            .map_err(&err)?
            > 0;
        let version: Option<i64> = if has_table {
            tx.query_row("SELECT max(version) FROM schema_version", [], |r| r.get(0))
                .map_err(&err)?
        } else {
            None
        };
        match version {
            None => {
                let others: i64 = tx
                    .query_row(
                        "SELECT count(*) FROM sqlite_master WHERE type = 'table'",
                        [],
                        |r| r.get(0),
                    )
                    .map_err(&err)?;
                if others > usize::from(has_table) as i64 {
                    return Err(Error::new(
                        ErrorKind::FailedPrecondition,
                        format!(
                            "{} is a SQLite database of something else (it has tables but no \
                             schema version); give imaged its own [daemon] state_dir or move the \
                             file aside",
                            self.path.display()
                        ),
                    ));
                }
                tx.execute_batch(SCHEMA_V1).map_err(&err)?;
                tx.execute(
                    "INSERT INTO schema_version (version) VALUES (?1)",
                    [SCHEMA_VERSION],
                )
                .map_err(&err)?;
            }
            Some(v) if v > SCHEMA_VERSION => {
                return Err(Error::new(
                    ErrorKind::FailedPrecondition,
                    format!(
                        "operations database {} has schema version {v}, newer than the {} this \
                         imaged knows: a newer imaged wrote it; run that version again, or move \
                         the file aside to start with an empty operation history",
                        self.path.display(),
                        SCHEMA_VERSION
                    ),
                ));
            }
            Some(_) => {} // the only version so far
        }
        tx.commit().map_err(&err)
    }

    /// Records a new operation (QUEUED) durably, with the fingerprint of the call's
    /// parameters when it carries a `request_id`; an expired claim on that `request_id` is
    /// replaced. Fails ALREADY_EXISTS when the id or a live claim on the request_id exists.
    pub fn insert(&self, op: &Operation, target: &str, fingerprint: &str, now: i64) -> Result<()> {
        let mut conn = self.conn();
        let err = self.err("recording a new operation in");
        let tx = conn.transaction().map_err(&err)?;
        tx.execute(
            "INSERT INTO operations (id, kind, state, domain, image_name, request_id, path, \
             target, requester, created_at, updated_at, ended_at, error_kind, error_message, \
             error_facts, consistency, freeze_window_ms, location, progress, prep, daemon_pid) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, NULL, NULL, NULL, NULL, ?12, \
             ?13, ?14, ?15, ?16, ?17)",
            params![
                op.id,
                op.kind.name(),
                op.state.name(),
                op.domain,
                op.image_name,
                op.request_id,
                op.path,
                target,
                op.requester,
                op.created_at,
                op.updated_at,
                op.consistency,
                op.freeze_window_ms as i64,
                op.location,
                json(&StoredProgress::of(op)),
                json(&op.prep),
                std::process::id(),
            ],
        )
        .map_err(&err)?;
        if !op.request_id.is_empty() {
            tx.execute(
                "DELETE FROM request_ids WHERE request_id = ?1 AND created_at <= ?2",
                params![op.request_id, now - REQUEST_ID_TTL],
            )
            .map_err(&err)?;
            tx.execute(
                "INSERT INTO request_ids (request_id, operation, fingerprint, created_at) \
                 VALUES (?1, ?2, ?3, ?4)",
                params![op.request_id, op.id, fingerprint, now],
            )
            .map_err(&err)?;
        }
        tx.commit().map_err(&err)
    }

    /// Saves the current snapshot of an operation that has not ended in the database (a
    /// state change); a row that has ended is left as it is. Returns whether a row changed.
    pub fn update(&self, op: &Operation) -> Result<bool> {
        let ended = op.state.is_terminal().then_some(op.updated_at);
        let n = self
            .conn()
            .execute(
                "UPDATE operations SET state = ?2, updated_at = ?3, ended_at = ?4, \
                 error_kind = ?5, error_message = ?6, consistency = ?7, freeze_window_ms = ?8, \
                 location = ?9, progress = ?10, prep = ?11, error_facts = ?12 \
                 WHERE id = ?1 AND ended_at IS NULL",
                params![
                    op.id,
                    op.state.name(),
                    op.updated_at,
                    ended,
                    op.error.as_ref().map(|e| e.kind.code_name()),
                    op.error.as_ref().map(|e| e.message.as_str()),
                    op.consistency,
                    op.freeze_window_ms as i64,
                    op.location,
                    json(&StoredProgress::of(op)),
                    json(&op.prep),
                    op.error.as_ref().map(|e| json(&e.facts)),
                ],
            )
            .map_err(self.err("saving an operation in"))?;
        Ok(n > 0)
    }

    /// One operation.
    pub fn get(&self, id: &str) -> Result<Option<Operation>> {
        self.conn()
            .query_row(
                &format!("SELECT {COLUMNS} FROM operations WHERE id = ?1"),
                [id],
                read_op,
            )
            .optional()
            .map_err(self.err("reading an operation from"))
    }

    /// The operation `request_id` started within the last [`REQUEST_ID_TTL`] before `now`,
    /// with the fingerprint of that call's parameters.
    pub fn by_request(&self, request_id: &str, now: i64) -> Result<Option<(Operation, String)>> {
        if request_id.is_empty() {
            return Ok(None);
        }
        let cols = COLUMNS
            .split(", ")
            .map(|c| format!("o.{}", c.trim()))
            .collect::<Vec<_>>()
            .join(", ");
        self.conn()
            .query_row(
                &format!(
                    "SELECT {cols}, r.fingerprint FROM request_ids r JOIN operations o \
                     ON o.id = r.operation WHERE r.request_id = ?1 AND r.created_at > ?2"
                ),
                params![request_id, now - REQUEST_ID_TTL],
                |r| Ok((read_op(r)?, r.get::<_, String>(18)?)),
            )
            .optional()
            .map_err(self.err("looking up a request_id in"))
    }

    /// Every operation, newest first.
    pub fn list(&self) -> Result<Vec<Operation>> {
        self.page(None, u32::MAX)
    }

    /// Up to `limit` operations, newest first, after the one at `(created_at, id)` in that
    /// order (keyset paging: a page stays right while operations are added).
    pub fn page(&self, after: Option<(i64, &str)>, limit: u32) -> Result<Vec<Operation>> {
        let conn = self.conn();
        let err = self.err("listing the operations of");
        let (created, id) = after.unwrap_or((i64::MAX, ""));
        let mut stmt = conn
            .prepare_cached(&format!(
                "SELECT {COLUMNS} FROM operations WHERE (created_at, id) < (?1, ?2) \
                 ORDER BY created_at DESC, id DESC LIMIT ?3"
            ))
            .map_err(&err)?;
        let rows = stmt
            .query_map(params![created, id, i64::from(limit)], read_op)
            .map_err(&err)?;
        rows.collect::<rusqlite::Result<Vec<_>>>().map_err(&err)
    }

    /// Removes an ended operation (and its request_id). Returns false when no ended operation
    /// has that id.
    pub fn delete(&self, id: &str) -> Result<bool> {
        let n = self
            .conn()
            .execute(
                "DELETE FROM operations WHERE id = ?1 AND ended_at IS NOT NULL",
                [id],
            )
            .map_err(self.err("deleting an operation from"))?;
        Ok(n > 0)
    }

    /// The ids of the operations on `domain` that process `pid` started.
    pub fn ids_on_domain(&self, domain: &str, pid: u32) -> Result<Vec<String>> {
        let conn = self.conn();
        let err = self.err("listing the operations on a domain in");
        let mut stmt = conn
            .prepare_cached("SELECT id FROM operations WHERE domain = ?1 AND daemon_pid = ?2")
            .map_err(&err)?;
        let rows = stmt
            .query_map(params![domain, pid], |r| r.get(0))
            .map_err(&err)?;
        rows.collect::<rusqlite::Result<Vec<String>>>()
            .map_err(&err)
    }

    /// Every operation not ended, oldest first.
    pub fn unfinished(&self) -> Result<Vec<Unfinished>> {
        let conn = self.conn();
        let err = self.err("reading unfinished operations from");
        let mut stmt = conn
            .prepare(&format!(
                "SELECT {COLUMNS}, target, daemon_pid FROM operations WHERE ended_at IS NULL \
                 ORDER BY created_at, id"
            ))
            .map_err(&err)?;
        let rows = stmt
            .query_map([], |r| {
                Ok(Unfinished {
                    op: read_op(r)?,
                    target: r.get(18)?,
                    daemon_pid: r.get(19)?,
                })
            })
            .map_err(&err)?;
        rows.collect::<rusqlite::Result<Vec<_>>>().map_err(&err)
    }

    /// Removes operations that ended at or before `ended_before`, and request_ids claimed at
    /// or before `now - REQUEST_ID_TTL`. Returns how many operations went.
    pub fn prune(&self, ended_before: i64, now: i64) -> Result<usize> {
        let mut conn = self.conn();
        let err = self.err("pruning old operations of");
        let tx = conn.transaction().map_err(&err)?;
        let n = tx
            .execute(
                "DELETE FROM operations WHERE ended_at IS NOT NULL AND ended_at <= ?1",
                [ended_before],
            )
            .map_err(&err)?;
        tx.execute(
            "DELETE FROM request_ids WHERE created_at <= ?1",
            [now - REQUEST_ID_TTL],
        )
        .map_err(&err)?;
        tx.commit().map_err(&err)?;
        Ok(n)
    }
}

fn json<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string(v).unwrap_or_else(|_| "null".into())
}

/// Reads the [`COLUMNS`] of a row.
fn read_op(r: &Row<'_>) -> rusqlite::Result<Operation> {
    let text = |i: usize| r.get::<_, String>(i);
    let bad = |i: usize, what: &str, v: &str| {
        rusqlite::Error::FromSqlConversionFailure(
            i,
            rusqlite::types::Type::Text,
            format!("unknown {what} {v:?}").into(),
        )
    };
    let kind = text(1)?;
    let state = text(2)?;
    let error_kind: Option<String> = r.get(10)?;
    let error_message: Option<String> = r.get(11)?;
    let error_facts: Option<String> = r.get(17)?;
    let from_json = |i: usize| -> rusqlite::Result<String> { text(i) };
    let progress = from_json(15)?;
    let prep = from_json(16)?;
    let stored: StoredProgress = serde_json::from_str(&progress).map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(15, rusqlite::types::Type::Text, e.into())
    })?;
    Ok(Operation {
        id: text(0)?,
        kind: OpKind::parse(&kind).ok_or_else(|| bad(1, "kind", &kind))?,
        state: OpState::parse(&state).ok_or_else(|| bad(2, "state", &state))?,
        domain: text(3)?,
        image_name: text(4)?,
        request_id: text(5)?,
        path: text(6)?,
        requester: text(7)?,
        created_at: r.get(8)?,
        updated_at: r.get(9)?,
        error: error_kind.map(|k| OpError {
            kind: ErrorKind::from_code_name(&k),
            message: error_message.unwrap_or_default(),
            facts: error_facts
                .as_deref()
                .and_then(|f| serde_json::from_str(f).ok())
                .unwrap_or_default(),
        }),
        cancel_requested: false,
        consistency: text(12)?,
        freeze_window_ms: r.get::<_, i64>(13)?.max(0) as u64,
        location: text(14)?,
        progress: stored.progress,
        read: stored.read,
        prep: serde_json::from_str(&prep).map_err(|e| {
            rusqlite::Error::FromSqlConversionFailure(16, rusqlite::types::Type::Text, e.into())
        })?,
    })
}

/// The `progress` column: the counters, and how a live capture read its disk.
#[derive(serde::Serialize, serde::Deserialize)]
struct StoredProgress {
    #[serde(flatten)]
    progress: ProgressSnapshot,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    read: Option<ReadReport>,
}

impl StoredProgress {
    fn of(op: &Operation) -> StoredProgress {
        StoredProgress {
            progress: op.progress,
            read: op.read.clone(),
        }
    }
}

/// An SQLite failure while `what` the database at `path`, as an [`Error`] naming the file.
fn db_error(path: &Path, what: &str, e: rusqlite::Error) -> Error {
    let shown = path.display();
    let code = e.sqlite_error_code();
    let (kind, msg) = match code {
        Some(ErrorCode::NotADatabase) | Some(ErrorCode::DatabaseCorrupt) => (
            ErrorKind::FailedPrecondition,
            format!(
                "{what} operations database {shown}: the file is not a SQLite database or is \
                 damaged; move it aside (imaged then starts a new, empty operation history) or \
                 restore it from a backup"
            ),
        ),
        Some(ErrorCode::DiskFull) => (
            ErrorKind::ResourceExhausted,
            format!("{what} operations database {shown}: its file system is full"),
        ),
        Some(ErrorCode::ReadOnly)
        | Some(ErrorCode::CannotOpen)
        | Some(ErrorCode::PermissionDenied) => (
            ErrorKind::FailedPrecondition,
            format!("{what} operations database {shown}: it cannot be opened for writing"),
        ),
        Some(ErrorCode::DatabaseBusy) | Some(ErrorCode::DatabaseLocked) => (
            ErrorKind::Unavailable,
            format!("{what} operations database {shown}: another process holds it locked"),
        ),
        _ => (
            ErrorKind::Internal,
            format!("{what} operations database {shown}"),
        ),
    };
    Error::new(kind, msg).with_source(e)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::operation::{PrepReport, ReportedChange};

    fn op(id: &str, request_id: &str, created_at: i64) -> Operation {
        Operation {
            id: id.into(),
            kind: OpKind::Capture,
            state: OpState::Queued,
            domain: "web".into(),
            image_name: format!("img-{id}"),
            request_id: request_id.into(),
            path: "/var/lib/libvirt/images/web.qcow2".into(),
            requester: String::new(),
            progress: ProgressSnapshot::default(),
            error: None,
            created_at,
            updated_at: created_at,
            consistency: "quiesced".into(),
            freeze_window_ms: 0,
            location: String::new(),
            prep: Vec::new(),
            cancel_requested: false,
            read: None,
        }
    }

    fn store() -> (tempfile::TempDir, Store) {
        let d = tempfile::tempdir().unwrap();
        let s = Store::open_in(&d.path().join("state")).unwrap();
        (d, s)
    }

    #[test]
    fn a_full_operation_round_trips() {
        let (_d, s) = store();
        let mut o = op("op-1", "req-1", 100);
        s.insert(&o, "repository", &fingerprint("p"), 100).unwrap();
        assert_eq!(s.get("op-1").unwrap().unwrap(), o);
        o.state = OpState::Failed;
        o.updated_at = 160;
        o.requester = "uid:0".into();
        o.progress = ProgressSnapshot {
            bytes_total: 10 << 30,
            bytes_done: 5 << 30,
            bytes_read: 4 << 30,
            bytes_zero: 1 << 30,
            bytes_new: 3 << 30,
            bytes_existing: 1 << 30,
            rate_bytes_per_sec: 123_456_789,
        };
        o.error = Some(OpError {
            kind: ErrorKind::ResourceExhausted,
            message: "writing chunk: No space left on device (os error 28)".into(),
            facts: crate::error::Facts {
                reason: "REPOSITORY_FULL".into(),
                ..Default::default()
            },
        });
        o.freeze_window_ms = 842;
        o.read = Some(ReadReport {
            incremental: true,
            since_checkpoint: "imaged-vda-op-0".into(),
            changed_bytes: 96 << 20,
            checkpoint: "imaged-vda-op-1".into(),
            note: String::new(),
        });
        o.location = "img-op-1".into();
        o.prep = vec![PrepReport {
            step: "dhcp".into(),
            outcome: "applied".into(),
            changes: vec![ReportedChange {
                path: "/etc/network/interfaces".into(),
                action: "edit".into(),
                diff: "-iface eth0 inet static\n+iface eth0 inet dhcp\n".into(),
            }],
            message: "ok \u{e9}\"'".into(),
        }];
        assert!(s.update(&o).unwrap());
        let back = s.get("op-1").unwrap().unwrap();
        // The requester is written once, at the insert.
        assert_eq!(back.requester, "");
        o.requester = String::new();
        assert_eq!(back, o);
        // An ended row is not changed by a late update.
        let mut late = o.clone();
        late.state = OpState::Saving;
        late.error = None;
        assert!(!s.update(&late).unwrap());
        assert_eq!(s.get("op-1").unwrap().unwrap(), o);
        assert!(s.unfinished().unwrap().is_empty());
    }

    #[test]
    fn request_ids_last_a_day_then_may_be_reused() {
        let (_d, s) = store();
        let t0 = 1_000_000;
        s.insert(&op("op-1", "req", t0), "repository", &fingerprint("a"), t0)
            .unwrap();
        let (found, fp) = s
            .by_request("req", t0 + REQUEST_ID_TTL - 1)
            .unwrap()
            .unwrap();
        assert_eq!((found.id.as_str(), fp), ("op-1", fingerprint("a")));
        assert!(s.by_request("other", t0).unwrap().is_none());
        // A live claim cannot be taken twice.
        let e = s
            .insert(&op("op-2", "req", t0 + 5), "repository", "", t0 + 5)
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Internal, "{}", e.chain());
        assert!(
            s.get("op-2").unwrap().is_none(),
            "the failed insert left nothing"
        );
        // Expired: not found, and a new operation may claim it.
        let later = t0 + REQUEST_ID_TTL;
        assert!(s.by_request("req", later).unwrap().is_none());
        s.insert(
            &op("op-3", "req", later),
            "repository",
            &fingerprint("b"),
            later,
        )
        .unwrap();
        let (found, fp) = s.by_request("req", later).unwrap().unwrap();
        assert_eq!((found.id.as_str(), fp), ("op-3", fingerprint("b")));
        // The first operation is still there, with its request_id shown.
        assert_eq!(s.get("op-1").unwrap().unwrap().request_id, "req");
    }

    #[test]
    fn pruning_removes_ended_operations_and_old_request_ids() {
        let (_d, s) = store();
        for (id, t) in [("op-a", 100), ("op-b", 200), ("op-c", 300)] {
            let mut o = op(id, &format!("r-{id}"), t);
            s.insert(&o, "repository", "", t).unwrap();
            if id != "op-c" {
                o.state = OpState::Active;
                o.updated_at = t + 10;
                s.update(&o).unwrap();
            }
        }
        // op-a ended at 110, op-b at 210; op-c runs.
        assert_eq!(s.prune(150, 300).unwrap(), 1);
        let ids: Vec<String> = s.list().unwrap().into_iter().map(|o| o.id).collect();
        assert_eq!(ids, ["op-c", "op-b"], "newest first");
        assert!(s.by_request("r-op-a", 300).unwrap().is_none());
        // A running operation is never pruned, whatever its age.
        assert_eq!(s.prune(i64::MAX, 300).unwrap(), 1);
        assert_eq!(s.list().unwrap().len(), 1);
        // Request ids expire by age even when their operation stays.
        assert!(s.by_request("r-op-c", 300).unwrap().is_some());
        s.prune(0, 300 + REQUEST_ID_TTL).unwrap();
        assert!(s.by_request("r-op-c", 300).unwrap().is_none());
        assert_eq!(s.unfinished().unwrap()[0].op.id, "op-c");
    }

    #[test]
    fn delete_takes_only_ended_operations() {
        let (_d, s) = store();
        let mut o = op("op-1", "r", 1);
        s.insert(&o, "repository", "", 1).unwrap();
        assert!(!s.delete("op-1").unwrap(), "running: kept");
        o.state = OpState::Cancelled;
        s.update(&o).unwrap();
        assert!(s.delete("op-1").unwrap());
        assert!(s.get("op-1").unwrap().is_none());
        assert!(
            s.by_request("r", 1).unwrap().is_none(),
            "its request_id went with it"
        );
        assert!(!s.delete("op-1").unwrap());
    }

    #[test]
    fn pages_follow_each_other() {
        let (_d, s) = store();
        for i in 0..5 {
            s.insert(&op(&format!("op-{i}"), "", 10), "repository", "", 10)
                .unwrap();
        }
        let first = s.page(None, 2).unwrap();
        let last = first.last().unwrap();
        let second = s.page(Some((last.created_at, &last.id)), 10).unwrap();
        let ids: Vec<String> = first.iter().chain(&second).map(|o| o.id.clone()).collect();
        assert_eq!(ids, ["op-4", "op-3", "op-2", "op-1", "op-0"]);
    }

    #[test]
    fn operations_survive_reopening() {
        let (d, s) = store();
        s.insert(&op("op-1", "r", 1), "file:/x", "", 1).unwrap();
        drop(s);
        let s = Store::open_in(&d.path().join("state")).unwrap();
        let u = s.unfinished().unwrap();
        assert_eq!(u.len(), 1);
        assert_eq!(
            (u[0].target.as_str(), u[0].daemon_pid),
            ("file:/x", std::process::id())
        );
    }

    #[test]
    fn a_newer_schema_is_refused_naming_the_file() {
        let (d, s) = store();
        s.conn()
            .execute("UPDATE schema_version SET version = 99", [])
            .unwrap();
        drop(s);
        let path = d.path().join("state").join(FILE_NAME);
        let e = Store::open(&path).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::FailedPrecondition);
        let msg = e.chain();
        assert!(msg.contains(&path.display().to_string()), "{msg}");
        assert!(msg.contains("schema version 99"), "{msg}");
    }

    #[test]
    fn a_file_that_is_not_a_database_is_named() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join(FILE_NAME);
        std::fs::write(&path, vec![0x5a; 8192]).unwrap();
        let e = Store::open(&path).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::FailedPrecondition, "{}", e.chain());
        let msg = e.chain();
        assert!(msg.contains(&path.display().to_string()), "{msg}");
        assert!(msg.contains("not a SQLite database"), "{msg}");
        // Nothing was written over it.
        assert_eq!(std::fs::read(&path).unwrap(), vec![0x5a; 8192]);
    }

    #[test]
    fn a_damaged_database_is_named() {
        let (d, s) = store();
        for i in 0..50 {
            s.insert(&op(&format!("op-{i}"), "", 1), "repository", "", 1)
                .unwrap();
        }
        drop(s);
        let path = d.path().join("state").join(FILE_NAME);
        // Overwrite everything after the header's first page with garbage.
        let mut bytes = std::fs::read(&path).unwrap();
        for b in bytes.iter_mut().skip(100) {
            *b = 0xa5;
        }
        std::fs::write(&path, &bytes).unwrap();
        let _ = std::fs::remove_file(d.path().join("state/operations.db-wal"));
        let _ = std::fs::remove_file(d.path().join("state/operations.db-shm"));
        let e = Store::open(&path)
            .and_then(|s| s.list().map(drop))
            .unwrap_err();
        let msg = e.chain();
        assert!(msg.contains(&path.display().to_string()), "{msg}");
        assert_eq!(e.kind(), ErrorKind::FailedPrecondition, "{msg}");
    }

    #[test]
    fn another_programs_database_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join(FILE_NAME);
        Connection::open(&path)
            .unwrap()
            .execute_batch("CREATE TABLE images (name TEXT)")
            .unwrap();
        let e = Store::open(&path).unwrap_err();
        assert!(e.chain().contains("something else"), "{}", e.chain());
    }
}
