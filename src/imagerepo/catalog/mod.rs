//! The image catalog: projects and quotas, image records and their current version's
//! manifest, uploads, the chunks known, sharing. SQLite (WAL) behind a plain Rust API: each
//! method is one transaction and applies every rule of `imagerepo.v1` (see the proto's
//! comments) for the [`Principal`] that calls it, so the rules are tested without gRPC.
//!
//! Records:
//! - an image (`images`) has a stable id and points at its current version (`version_id`)
//!   whose data entries are in `manifest_entries`; a recapture to the same name and tag
//!   writes a new version and swaps it in at commit (the old entries go, their chunks stay
//!   until the collector finds nothing uses them);
//! - an upload (`uploads`) fills one version of one image; the digests it was told are present
//!   or sent are held (`upload_holds`) until it ends, so the collector keeps them;
//! - `chunks` lists every chunk stored (digest, size, when), the truth FindMissingChunks reads.
//!
//! States: QUEUED (begun) → SAVING or IMPORTING (data arriving) → ACTIVE (committed); FAILED
//! with a reason; DELETED (recycle bin; `deleted_from` remembers the state to restore).

pub mod backend;
pub mod filter;
pub mod schema;

use std::path::Path;
use std::sync::Mutex;

use backend::{params, Conn, DbError, DbResult, OptionalExtension, Row, Tx, Value};
use serde::{Deserialize, Serialize};

use super::identity::Principal;
use crate::error::{denied, invalid, not_found, precondition, Error, ErrorKind, Result};
use crate::repo::manifest::{chunk_len, content_digest, ImageRecord};
use crate::repo::{DataChunk, Digest};
use crate::util;

/// Most members an image may have.
pub const MAX_MEMBERS: u64 = 128;
/// Most manifest entries one AddManifestEntries call may carry.
pub const MAX_ENTRIES_PER_CALL: usize = 8192;
/// Most digests one FindMissingChunks call may carry.
pub const MAX_DIGESTS_PER_CALL: usize = 4096;

/// The reason of a transaction that lost a race with another server's (PostgreSQL) and runs
/// again; callers never see it unless the retries run out.
const CONFLICT: &str = "CATALOG_CONFLICT";

/// A database error as an internal error (a lost race marked to be retried).
pub(crate) fn db(e: impl Into<DbError>) -> Error {
    let e = e.into();
    let err = Error::new(ErrorKind::Internal, "catalog database");
    if e.retryable() {
        Error::new(
            ErrorKind::Aborted,
            "catalog database: a concurrent transaction changed what this one read",
        )
        .with_reason(CONFLICT)
        .with_source(e)
    } else {
        err.with_source(e)
    }
}

/// An image's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Queued,
    Saving,
    Importing,
    Active,
    Failed,
    Deleted,
}

impl State {
    /// Every state.
    pub const ALL: [State; 6] = [
        State::Queued,
        State::Saving,
        State::Importing,
        State::Active,
        State::Failed,
        State::Deleted,
    ];

    /// The name stored and shown (the proto enum's).
    pub fn name(self) -> &'static str {
        match self {
            State::Queued => "QUEUED",
            State::Saving => "SAVING",
            State::Importing => "IMPORTING",
            State::Active => "ACTIVE",
            State::Failed => "FAILED",
            State::Deleted => "DELETED",
        }
    }

    /// The state named `s`.
    pub fn parse(s: &str) -> Option<State> {
        State::ALL.into_iter().find(|x| x.name() == s)
    }

    /// True while an upload fills the record.
    pub fn uploading(self) -> bool {
        matches!(self, State::Queued | State::Saving | State::Importing)
    }
}

/// A membership's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemberState {
    Pending,
    Accepted,
    Rejected,
}

impl MemberState {
    /// The name stored.
    pub fn name(self) -> &'static str {
        match self {
            MemberState::Pending => "PENDING",
            MemberState::Accepted => "ACCEPTED",
            MemberState::Rejected => "REJECTED",
        }
    }

    fn parse(s: &str) -> MemberState {
        match s {
            "ACCEPTED" => MemberState::Accepted,
            "REJECTED" => MemberState::Rejected,
            _ => MemberState::Pending,
        }
    }
}

/// An upload's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UploadState {
    Open,
    Committed,
    Aborted,
}

impl UploadState {
    /// The name stored.
    pub fn name(self) -> &'static str {
        match self {
            UploadState::Open => "OPEN",
            UploadState::Committed => "COMMITTED",
            UploadState::Aborted => "ABORTED",
        }
    }

    fn parse(s: &str) -> UploadState {
        match s {
            "COMMITTED" => UploadState::Committed,
            "ABORTED" => UploadState::Aborted,
            _ => UploadState::Open,
        }
    }
}

/// `projects/{project}/images/{id}`, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRef {
    pub project: String,
    pub id: String,
}

impl ImageRef {
    /// Parses an image's resource name; `field` names the request field in errors.
    pub fn parse(name: &str, field: &str) -> Result<ImageRef> {
        let parts: Vec<&str> = name.split('/').collect();
        match parts.as_slice() {
            ["projects", p, "images", id] if !p.is_empty() && !id.is_empty() => Ok(ImageRef {
                project: p.to_string(),
                id: id.to_string(),
            }),
            _ => Err(invalid(format!(
                "{field}: {name:?} is not an image name: projects/{{project}}/images/{{image}}"
            ))
            .with_reason("BAD_NAME")
            .with_field(field)),
        }
    }

    /// The resource name.
    pub fn name(&self) -> String {
        format!("projects/{}/images/{}", self.project, self.id)
    }
}

/// `projects/{project}/uploads/{id}`, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UploadRef {
    pub project: String,
    pub id: String,
}

impl UploadRef {
    /// Parses an upload's resource name.
    pub fn parse(name: &str, field: &str) -> Result<UploadRef> {
        let parts: Vec<&str> = name.split('/').collect();
        match parts.as_slice() {
            ["projects", p, "uploads", id] if !p.is_empty() && !id.is_empty() => Ok(UploadRef {
                project: p.to_string(),
                id: id.to_string(),
            }),
            _ => Err(invalid(format!(
                "{field}: {name:?} is not an upload name: projects/{{project}}/uploads/{{upload}}"
            ))
            .with_reason("BAD_NAME")
            .with_field(field)),
        }
    }

    /// The resource name.
    pub fn name(&self) -> String {
        format!("projects/{}/uploads/{}", self.project, self.id)
    }
}

/// Parses `projects/{project}` (`-` allowed when `any` is true: returns `None`).
pub fn parse_parent(parent: &str, any: bool) -> Result<Option<String>> {
    match parent.strip_prefix("projects/") {
        Some("-") if any => Ok(None),
        Some(p) if !p.is_empty() && !p.contains('/') => {
            super::config::validate_project(p).map_err(|e| e.with_field("parent"))?;
            Ok(Some(p.to_string()))
        }
        _ => Err(invalid(format!(
            "parent {parent:?} is not projects/{{project}}{}",
            if any { " or projects/-" } else { "" }
        ))
        .with_reason("BAD_NAME")
        .with_field("parent")),
    }
}

/// What an upload brings: the new version's facts, kept with the upload until its commit.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UploadMeta {
    pub image_name: String,
    pub tag: String,
    pub virtual_size: u64,
    /// The proto's ImageFormat number.
    pub source_format: i32,
    /// The proto's Consistency number.
    pub consistency: i32,
    pub description: String,
    pub source_domain: String,
    pub source_host: String,
    pub os_type: String,
    pub os_version: String,
    pub architecture: String,
    pub licensed: bool,
    /// An import (IMPORTING while it uploads) rather than a capture (SAVING).
    pub import: bool,
}

/// An image record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRow {
    pub id: String,
    pub seq: i64,
    pub project: String,
    pub image_name: String,
    pub tag: String,
    pub display_name: String,
    pub description: String,
    pub state: State,
    pub failure_reason: String,
    pub deleted_from: Option<State>,
    pub source_domain: String,
    pub source_host: String,
    pub os_type: String,
    pub os_version: String,
    pub architecture: String,
    pub source_format: i32,
    pub consistency: i32,
    pub licensed: bool,
    pub in_use_by: String,
    pub version_id: String,
    pub virtual_size: u64,
    pub stored_size: u64,
    pub data_chunk_count: u64,
    pub content_digest: String,
    pub create_time: i64,
    pub update_time: i64,
    pub last_used_time: i64,
    pub delete_time: i64,
    pub purge_time: i64,
}

const IMAGE_COLS: &str = "id, seq, project, image_name, tag, display_name, description, state, \
    failure_reason, deleted_from, source_domain, source_host, os_type, os_version, architecture, \
    source_format, consistency, licensed, in_use_by, version_id, virtual_size, stored_size, \
    data_chunk_count, content_digest, create_time, update_time, last_used_time, delete_time, \
    purge_time";

impl ImageRow {
    fn from_row(r: &Row) -> DbResult<ImageRow> {
        let state: String = r.get(7)?;
        let deleted_from: String = r.get(9)?;
        Ok(ImageRow {
            id: r.get(0)?,
            seq: r.get(1)?,
            project: r.get(2)?,
            image_name: r.get(3)?,
            tag: r.get(4)?,
            display_name: r.get(5)?,
            description: r.get(6)?,
            state: State::parse(&state).unwrap_or(State::Failed),
            failure_reason: r.get(8)?,
            deleted_from: State::parse(&deleted_from),
            source_domain: r.get(10)?,
            source_host: r.get(11)?,
            os_type: r.get(12)?,
            os_version: r.get(13)?,
            architecture: r.get(14)?,
            source_format: r.get(15)?,
            consistency: r.get(16)?,
            licensed: r.get::<i64>(17)? != 0,
            in_use_by: r.get(18)?,
            version_id: r.get(19)?,
            virtual_size: r.get::<i64>(20)? as u64,
            stored_size: r.get::<i64>(21)? as u64,
            data_chunk_count: r.get::<i64>(22)? as u64,
            content_digest: r.get(23)?,
            create_time: r.get(24)?,
            update_time: r.get(25)?,
            last_used_time: r.get(26)?,
            delete_time: r.get(27)?,
            purge_time: r.get(28)?,
        })
    }

    /// Its resource name.
    pub fn name(&self) -> String {
        format!("projects/{}/images/{}", self.project, self.id)
    }
}

/// An image as one caller sees it: shared images carry the caller's membership.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageView {
    pub image: ImageRow,
    /// The caller's membership, for an image shared with the caller's project.
    pub membership: Option<MemberState>,
}

impl ImageView {
    /// The name shown: a member sees the owner project in front, `owner/display name`.
    pub fn display_name(&self) -> String {
        match self.membership {
            Some(_) => format!("{}/{}", self.image.project, self.image.display_name),
            None => self.image.display_name.clone(),
        }
    }
}

/// An upload record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UploadRow {
    pub id: String,
    pub project: String,
    pub request_id: String,
    pub image_id: String,
    pub version_id: String,
    pub state: UploadState,
    /// The upload created the image record (rather than recapturing or retrying one).
    pub created_image: bool,
    pub meta: UploadMeta,
    pub chunks_received: u64,
    pub bytes_received: u64,
    /// Manifest entries added so far.
    pub entries: u64,
    pub create_time: i64,
    pub update_time: i64,
}

impl UploadRow {
    /// Its resource name.
    pub fn name(&self) -> String {
        format!("projects/{}/uploads/{}", self.project, self.id)
    }

    /// The image it fills.
    pub fn image_name(&self) -> String {
        format!("projects/{}/images/{}", self.project, self.image_id)
    }
}

/// A member project of an image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberRow {
    pub image: ImageRef,
    pub member_project: String,
    pub state: MemberState,
    pub create_time: i64,
    pub update_time: i64,
}

impl MemberRow {
    /// `projects/{owner}/images/{image}/members/{member}`.
    pub fn name(&self) -> String {
        format!("{}/members/{}", self.image.name(), self.member_project)
    }
}

/// A project's quota and use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quota {
    pub image_limit: u32,
    pub image_count: u32,
}

/// A list query of images.
#[derive(Debug, Clone, Default)]
pub struct ListQuery {
    /// `projects/{p}` or `projects/-`.
    pub parent: String,
    pub filter: String,
    pub show_deleted: bool,
    pub page_size: i32,
    pub page_token: String,
}

/// What an image may be asked for: seeing it, using its data, or changing it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Need {
    See,
    Use,
    Own,
}

/// The catalog's settings.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    pub default_image_quota: u32,
    pub recycle_bin_days: u32,
}

/// The catalog: one connection (SQLite or PostgreSQL, see [`backend`]) behind a mutex (every
/// method is a short transaction).
pub struct Catalog {
    conn: Mutex<Conn>,
    /// How to connect again after a PostgreSQL connection is lost.
    reconnect: Option<postgres::Config>,
    settings: Settings,
}

/// How many times a transaction that lost a race (PostgreSQL serialization failure) runs.
const ATTEMPTS: u32 = 30;

fn now() -> i64 {
    util::now_unix()
}

fn hexd(d: &Digest) -> String {
    hex::encode(d)
}

fn quota_exceeded(project: &str, count: u32, limit: u32) -> Error {
    Error::new(
        ErrorKind::ResourceExhausted,
        format!(
            "project {project} holds {count} private images and its quota is {limit}: delete \
             (and purge) images or ask an admin to raise the limit of {limit}"
        ),
    )
    .with_reason("QUOTA_EXCEEDED")
    .with_subject(format!("projects/{project}/quota"))
}

impl Catalog {
    /// Opens (creating and migrating) the SQLite catalog at `path`.
    pub fn open(path: &Path, settings: Settings) -> Result<Catalog> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
        }
        let conn = rusqlite::Connection::open(path).map_err(|e| {
            Error::new(
                ErrorKind::Unavailable,
                format!("opening catalog {}", path.display()),
            )
            .with_source(e)
        })?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(db)?;
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(db)?;
        conn.pragma_update(None, "foreign_keys", "ON").map_err(db)?;
        conn.busy_timeout(std::time::Duration::from_secs(10))
            .map_err(db)?;
        Self::with_conn(Conn::Sqlite(conn), None, settings)
    }

    /// An in-memory SQLite catalog (tests).
    pub fn in_memory(settings: Settings) -> Result<Catalog> {
        let conn = rusqlite::Connection::open_in_memory().map_err(db)?;
        Self::with_conn(Conn::Sqlite(conn), None, settings)
    }

    /// Opens (migrating) the PostgreSQL catalog `config` names (see
    /// [`postgres_config`](super::config::CatalogConfig)); UNAVAILABLE naming the host when
    /// the server does not answer.
    pub fn open_postgres(config: postgres::Config, settings: Settings) -> Result<Catalog> {
        let conn = Self::connect(&config)?;
        Self::with_conn(conn, Some(config), settings)
    }

    fn connect(config: &postgres::Config) -> Result<Conn> {
        let client = config.connect(postgres::NoTls).map_err(|e| {
            let hosts: Vec<String> = config
                .get_hosts()
                .iter()
                .map(|h| match h {
                    postgres::config::Host::Tcp(h) => h.clone(),
                    postgres::config::Host::Unix(p) => p.display().to_string(),
                })
                .collect();
            let ports = config.get_ports();
            Error::new(
                ErrorKind::Unavailable,
                format!(
                    "connecting to the PostgreSQL catalog at {}{} (database {}): {}",
                    hosts.join(","),
                    ports.first().map(|p| format!(":{p}")).unwrap_or_default(),
                    config.get_dbname().unwrap_or("(default)"),
                    DbError::Postgres(e)
                ),
            )
            .with_reason("CATALOG_UNAVAILABLE")
        })?;
        Ok(Conn::Postgres(Box::new(backend::PgConn::new(client))))
    }

    fn with_conn(
        mut conn: Conn,
        reconnect: Option<postgres::Config>,
        settings: Settings,
    ) -> Result<Catalog> {
        schema::migrate(&mut conn)?;
        Ok(Catalog {
            conn: Mutex::new(conn),
            reconnect,
            settings,
        })
    }

    /// Runs `f` in one transaction, committed when it returns Ok. On PostgreSQL a transaction
    /// that lost a race with another server's (serialization failure) runs again, up to
    /// [`ATTEMPTS`] times, after a short randomised pause.
    fn tx<T>(&self, mut f: impl FnMut(&Tx<'_>) -> Result<T>) -> Result<T> {
        let mut c = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        let mut attempt = 0;
        loop {
            attempt += 1;
            if c.is_closed() {
                if let Some(config) = &self.reconnect {
                    *c = Self::connect(config)?;
                }
            }
            let out = c.transaction().map_err(db).and_then(|tx| {
                let out = f(&tx)?;
                tx.commit().map_err(db)?;
                Ok(out)
            });
            match out {
                Err(e) if e.facts().reason == CONFLICT && attempt < ATTEMPTS => {
                    let jitter = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map(|d| u64::from(d.subsec_nanos() % 20))
                        .unwrap_or(7);
                    let pause = 1 + jitter * u64::from(attempt.min(5));
                    std::thread::sleep(std::time::Duration::from_millis(pause));
                }
                out => return out,
            }
        }
    }

    // ----- access -----------------------------------------------------------------------

    /// The caller must act for `project` (or be admin).
    fn own_project(who: &Principal, project: &str, what: &str) -> Result<()> {
        match who {
            Principal::Admin => Ok(()),
            Principal::Project(p) if p == project => Ok(()),
            Principal::Project(p) => Err(denied(format!(
                "project {p} may not {what} in project {project}"
            ))
            .with_reason("OTHER_PROJECT")
            .with_subject(format!("projects/{project}"))),
        }
    }

    fn image_row(tx: &Tx<'_>, r: &ImageRef) -> Result<Option<ImageRow>> {
        tx.query_row(
            &format!("SELECT {IMAGE_COLS} FROM images WHERE id = ?1 AND project = ?2"),
            params![r.id, r.project],
            ImageRow::from_row,
        )
        .optional()
        .map_err(db)
    }

    fn membership(tx: &Tx<'_>, image_id: &str, project: &str) -> Result<Option<MemberState>> {
        let s: Option<String> = tx
            .query_row(
                "SELECT state FROM members WHERE image_id = ?1 AND member_project = ?2",
                params![image_id, project],
                |r| r.get(0),
            )
            .optional()
            .map_err(db)?;
        Ok(s.map(|s| MemberState::parse(&s)))
    }

    /// The image `r` if `who` may `need` it; PERMISSION_DENIED (without saying whether an
    /// image of another project exists) or NOT_FOUND otherwise.
    fn access(tx: &Tx<'_>, who: &Principal, r: &ImageRef, need: Need) -> Result<ImageView> {
        let me = match who {
            Principal::Admin => None,
            Principal::Project(p) => Some(p.as_str()),
        };
        let missing = || {
            not_found(format!("image {} does not exist", r.name()))
                .with_reason("IMAGE_NOT_FOUND")
                .with_subject(r.name())
        };
        match me {
            None => Ok(ImageView {
                image: Self::image_row(tx, r)?.ok_or_else(missing)?,
                membership: None,
            }),
            Some(p) if p == r.project => Ok(ImageView {
                image: Self::image_row(tx, r)?.ok_or_else(missing)?,
                membership: None,
            }),
            Some(p) => {
                let not_visible = || {
                    denied(format!(
                        "project {p} may not use {}: it belongs to project {} and is not \
                         shared with {p}",
                        r.name(),
                        r.project
                    ))
                    .with_reason("IMAGE_NOT_VISIBLE")
                    .with_subject(r.name())
                };
                let m = Self::membership(tx, &r.id, p)?.ok_or_else(not_visible)?;
                let image = Self::image_row(tx, r)?.ok_or_else(not_visible)?;
                if image.state == State::Deleted {
                    return Err(not_visible());
                }
                match need {
                    Need::See => {}
                    Need::Use if m == MemberState::Accepted => {}
                    Need::Use => {
                        return Err(denied(format!(
                            "{} is shared with project {p} but not accepted ({}): accept it \
                             before using it",
                            r.name(),
                            m.name()
                        ))
                        .with_reason("SHARE_NOT_ACCEPTED")
                        .with_subject(r.name()))
                    }
                    Need::Own => {
                        return Err(denied(format!(
                            "{} is shared with project {p}, which may only use it: only its \
                             owner, project {}, may change, delete or share it",
                            r.name(),
                            r.project
                        ))
                        .with_reason("NOT_OWNER")
                        .with_subject(r.name()))
                    }
                }
                Ok(ImageView {
                    image,
                    membership: Some(m),
                })
            }
        }
    }

    fn view(tx: &Tx<'_>, who: &Principal, r: &ImageRef) -> Result<ImageView> {
        Self::access(tx, who, r, Need::See)
    }

    // ----- quotas -------------------------------------------------------------------------

    fn limit_of(&self, tx: &Tx<'_>, project: &str) -> Result<u32> {
        let l: Option<i64> = tx
            .query_row(
                "SELECT image_limit FROM projects WHERE name = ?1",
                [project],
                |r| r.get(0),
            )
            .optional()
            .map_err(db)?;
        Ok(l.map(|l| l as u32)
            .unwrap_or(self.settings.default_image_quota))
    }

    fn count_of(tx: &Tx<'_>, project: &str) -> Result<u32> {
        let n: i64 = tx
            .query_row(
                "SELECT COUNT(*) FROM images WHERE project = ?1 AND state <> 'DELETED'",
                [project],
                |r| r.get(0),
            )
            .map_err(db)?;
        Ok(n as u32)
    }

    fn check_quota(&self, tx: &Tx<'_>, project: &str) -> Result<()> {
        let limit = self.limit_of(tx, project)?;
        let count = Self::count_of(tx, project)?;
        if count >= limit {
            return Err(quota_exceeded(project, count, limit));
        }
        Ok(())
    }

    /// A project's quota and use.
    pub fn quota(&self, who: &Principal, project: &str) -> Result<Quota> {
        Self::own_project(who, project, "read the quota")?;
        self.tx(|tx| {
            Ok(Quota {
                image_limit: self.limit_of(tx, project)?,
                image_count: Self::count_of(tx, project)?,
            })
        })
    }

    /// Sets a project's image limit (admins only).
    pub fn set_quota(&self, who: &Principal, project: &str, limit: u32) -> Result<Quota> {
        if *who != Principal::Admin {
            return Err(denied("only an admin may change quotas").with_reason("ADMIN_ONLY"));
        }
        self.tx(|tx| {
            tx.execute(
                "INSERT INTO projects (name, image_limit) VALUES (?1, ?2) \
                 ON CONFLICT (name) DO UPDATE SET image_limit = excluded.image_limit",
                params![project, i64::from(limit)],
            )
            .map_err(db)?;
            Ok(Quota {
                image_limit: limit,
                image_count: Self::count_of(tx, project)?,
            })
        })
    }

    // ----- uploads ------------------------------------------------------------------------

    fn upload_row(tx: &Tx<'_>, project: &str, id: &str) -> Result<Option<UploadRow>> {
        let row = tx
            .query_row(
                "SELECT id, project, request_id, image_id, version_id, state, created_image, meta, \
                 chunks_received, bytes_received, create_time, update_time FROM uploads \
                 WHERE id = ?1 AND project = ?2",
                params![id, project],
                |r| {
                    Ok((
                        r.get::<String>(0)?,
                        r.get::<String>(1)?,
                        r.get::<String>(2)?,
                        r.get::<String>(3)?,
                        r.get::<String>(4)?,
                        r.get::<String>(5)?,
                        r.get::<i64>(6)?,
                        r.get::<String>(7)?,
                        r.get::<i64>(8)?,
                        r.get::<i64>(9)?,
                        r.get::<i64>(10)?,
                        r.get::<i64>(11)?,
                    ))
                },
            )
            .optional()
            .map_err(db)?;
        let Some(r) = row else { return Ok(None) };
        let meta: UploadMeta = serde_json::from_str(&r.7).map_err(|e| {
            Error::new(ErrorKind::Internal, format!("upload {}: bad metadata", r.0)).with_source(e)
        })?;
        let entries: i64 = tx
            .query_row(
                "SELECT COUNT(*) FROM manifest_entries WHERE version_id = ?1",
                [&r.4],
                |x| x.get(0),
            )
            .map_err(db)?;
        Ok(Some(UploadRow {
            id: r.0,
            project: r.1,
            request_id: r.2,
            image_id: r.3,
            version_id: r.4,
            state: UploadState::parse(&r.5),
            created_image: r.6 != 0,
            meta,
            chunks_received: r.8 as u64,
            bytes_received: r.9 as u64,
            entries: entries as u64,
            create_time: r.10,
            update_time: r.11,
        }))
    }

    /// The upload `u` for `who`.
    fn upload_for(tx: &Tx<'_>, who: &Principal, u: &UploadRef) -> Result<UploadRow> {
        Self::own_project(who, &u.project, "use uploads")?;
        Self::upload_row(tx, &u.project, &u.id)?.ok_or_else(|| {
            not_found(format!("upload {} does not exist", u.name()))
                .with_reason("UPLOAD_NOT_FOUND")
                .with_subject(u.name())
        })
    }

    fn open_upload_for(tx: &Tx<'_>, who: &Principal, u: &UploadRef) -> Result<UploadRow> {
        let up = Self::upload_for(tx, who, u)?;
        if up.state != UploadState::Open {
            return Err(precondition(format!(
                "upload {} is {}: begin a new upload",
                u.name(),
                up.state.name()
            ))
            .with_reason("UPLOAD_NOT_OPEN")
            .with_subject(u.name()));
        }
        Ok(up)
    }

    /// Notes activity on an open upload: its time, and QUEUED → SAVING/IMPORTING.
    fn touch(tx: &Tx<'_>, up: &UploadRow) -> Result<()> {
        let t = now();
        tx.execute(
            "UPDATE uploads SET update_time = ?1 WHERE id = ?2",
            params![t, up.id],
        )
        .map_err(db)?;
        let next = if up.meta.import {
            State::Importing
        } else {
            State::Saving
        };
        tx.execute(
            "UPDATE images SET state = ?1, update_time = ?2 WHERE id = ?3 AND state = 'QUEUED'",
            params![next.name(), t, up.image_id],
        )
        .map_err(db)?;
        Ok(())
    }

    /// Begins (or, with the `request_id` of an upload of this project, resumes) an upload of
    /// a new version of `meta.image_name:meta.tag` in `project`.
    pub fn begin_upload(
        &self,
        who: &Principal,
        project: &str,
        request_id: &str,
        mut meta: UploadMeta,
    ) -> Result<UploadRow> {
        Self::own_project(who, project, "upload images")?;
        util::validate_image_name(&meta.image_name).map_err(|e| e.with_field("image_name"))?;
        if meta.tag.is_empty() {
            meta.tag = "latest".into();
        }
        util::validate_image_name(&meta.tag)
            .map_err(|e| invalid(format!("tag: {e}")).with_field("tag"))?;
        if meta.virtual_size == 0 {
            return Err(
                invalid("virtual_size_bytes must be given (the disk's size)")
                    .with_field("virtual_size_bytes"),
            );
        }
        self.tx(|tx| {
            if !request_id.is_empty() {
                let id: Option<String> = tx
                    .query_row(
                        "SELECT id FROM uploads WHERE project = ?1 AND request_id = ?2",
                        params![project, request_id],
                        |r| r.get(0),
                    )
                    .optional()
                    .map_err(db)?;
                if let Some(id) = id {
                    let up = Self::upload_row(tx, project, &id)?
                        .ok_or_else(|| crate::error::internal("upload vanished"))?;
                    if up.meta.image_name != meta.image_name || up.meta.tag != meta.tag {
                        return Err(invalid(format!(
                            "request_id {request_id} was used for {}:{} (upload {}), not for {}:{}",
                            up.meta.image_name,
                            up.meta.tag,
                            up.name(),
                            meta.image_name,
                            meta.tag
                        ))
                        .with_reason("REQUEST_ID_REUSED")
                        .with_field("request_id"));
                    }
                    return Ok(up);
                }
            }
            let t = now();
            let live = tx
                .query_row(
                    &format!(
                        "SELECT {IMAGE_COLS} FROM images WHERE project = ?1 AND image_name = ?2 \
                         AND tag = ?3 AND state <> 'DELETED'"
                    ),
                    params![project, meta.image_name, meta.tag],
                    ImageRow::from_row,
                )
                .optional()
                .map_err(db)?;
            let (image_id, created) = match live {
                Some(img) => {
                    let open: Option<String> = tx
                        .query_row(
                            "SELECT id FROM uploads WHERE image_id = ?1 AND state = 'OPEN'",
                            [&img.id],
                            |r| r.get(0),
                        )
                        .optional()
                        .map_err(db)?;
                    if let Some(open) = open {
                        return Err(Error::new(
                            ErrorKind::Aborted,
                            format!(
                                "{}:{} is being uploaded already (projects/{project}/uploads/{open}): \
                                 resume that upload with its request_id, or abort it",
                                meta.image_name, meta.tag
                            ),
                        )
                        .with_reason("UPLOAD_IN_PROGRESS")
                        .with_subject(format!("projects/{project}/uploads/{open}")));
                    }
                    if img.state != State::Active {
                        // A failed (or interrupted) record is retried in place.
                        tx.execute(
                            "UPDATE images SET state = 'QUEUED', failure_reason = '', \
                             update_time = ?1 WHERE id = ?2",
                            params![t, img.id],
                        )
                        .map_err(db)?;
                    }
                    (img.id, false)
                }
                None => {
                    self.check_quota(tx, project)?;
                    let id = uuid_like();
                    let seq: i64 = tx
                        .query_row("SELECT COALESCE(MAX(seq), 0) + 1 FROM images", params![], |r| {
                            r.get(0)
                        })
                        .map_err(db)?;
                    tx.execute(
                        &format!(
                            "INSERT INTO images ({IMAGE_COLS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, \
                             'QUEUED', '', '', ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, '', '', ?16, \
                             0, 0, '', ?17, ?17, 0, 0, 0)"
                        ),
                        params![
                            id,
                            seq,
                            project,
                            meta.image_name,
                            meta.tag,
                            format!("{}:{}", meta.image_name, meta.tag),
                            meta.description,
                            meta.source_domain,
                            meta.source_host,
                            meta.os_type,
                            meta.os_version,
                            meta.architecture,
                            meta.source_format,
                            meta.consistency,
                            i64::from(meta.licensed),
                            meta.virtual_size as i64,
                            t
                        ],
                    )
                    .map_err(db)?;
                    (id, true)
                }
            };
            let up_id = format!("up-{}", uuid_like());
            let json = serde_json::to_string(&meta)
                .map_err(|e| crate::error::internal("encoding upload metadata").with_source(e))?;
            tx.execute(
                "INSERT INTO uploads (id, project, request_id, image_id, version_id, state, \
                 created_image, meta, chunks_received, bytes_received, create_time, update_time) \
                 VALUES (?1, ?2, ?3, ?4, ?5, 'OPEN', ?6, ?7, 0, 0, ?8, ?8)",
                params![
                    up_id,
                    project,
                    request_id,
                    image_id,
                    format!("v-{}", uuid_like()),
                    i64::from(created),
                    json,
                    t
                ],
            )
            .map_err(db)?;
            tracing::info!(upload = %format!("projects/{project}/uploads/{up_id}"), image = %format!("projects/{project}/images/{image_id}"),
                name = %format!("{}:{}", meta.image_name, meta.tag), recapture = !created, "upload begun");
            Self::upload_row(tx, project, &up_id)?
                .ok_or_else(|| crate::error::internal("upload vanished"))
        })
    }

    /// The upload `u`.
    pub fn get_upload(&self, who: &Principal, u: &UploadRef) -> Result<UploadRow> {
        self.tx(|tx| Self::upload_for(tx, who, u))
    }

    /// Which of `digests` are not stored, in the order asked; the stored ones are held for
    /// the upload until it ends.
    pub fn find_missing(
        &self,
        who: &Principal,
        u: &UploadRef,
        digests: &[Digest],
    ) -> Result<Vec<Digest>> {
        if digests.len() > MAX_DIGESTS_PER_CALL {
            return Err(invalid(format!(
                "{} digests in one call; at most {MAX_DIGESTS_PER_CALL}",
                digests.len()
            ))
            .with_field("digests"));
        }
        self.tx(|tx| {
            let up = Self::open_upload_for(tx, who, u)?;
            Self::touch(tx, &up)?;
            let mut missing = Vec::new();
            let mut has = tx
                .prepare_cached("SELECT 1 FROM chunks WHERE digest = ?1")
                .map_err(db)?;
            let mut hold = tx
                .prepare_cached(
                    "INSERT INTO upload_holds (upload_id, digest) VALUES (?1, ?2) \
                     ON CONFLICT DO NOTHING",
                )
                .map_err(db)?;
            for d in digests {
                let h = hexd(d);
                if has.exists([&h]).map_err(db)? {
                    hold.execute(params![up.id, h]).map_err(db)?;
                } else {
                    missing.push(*d);
                }
            }
            Ok(missing)
        })
    }

    /// Checks that `u` is an open upload `who` may send chunks to (before storing any).
    pub fn check_open(&self, who: &Principal, u: &UploadRef) -> Result<UploadRow> {
        self.tx(|tx| Self::open_upload_for(tx, who, u))
    }

    /// Records a chunk the store now holds (sent over `u`, which holds it), with its size.
    pub fn chunk_stored(&self, u: &UploadRef, digest: &Digest, size: u64) -> Result<()> {
        self.tx(|tx| {
            let up = Self::upload_row(tx, &u.project, &u.id)?
                .ok_or_else(|| not_found(format!("upload {} does not exist", u.name())))?;
            let h = hexd(digest);
            tx.execute(
                "INSERT INTO chunks (digest, size, create_time) VALUES (?1, ?2, ?3) \
                 ON CONFLICT DO NOTHING",
                params![h, size as i64, now()],
            )
            .map_err(db)?;
            tx.execute(
                "INSERT INTO upload_holds (upload_id, digest) VALUES (?1, ?2) \
                 ON CONFLICT DO NOTHING",
                params![up.id, h],
            )
            .map_err(db)?;
            tx.execute(
                "UPDATE uploads SET chunks_received = chunks_received + 1, \
                 bytes_received = bytes_received + ?1 WHERE id = ?2",
                params![size as i64, up.id],
            )
            .map_err(db)?;
            Self::touch(tx, &up)
        })
    }

    /// Drops the record of a chunk whose file is gone, so FindMissingChunks asks for it again.
    pub fn forget_chunk(&self, digest: &Digest) -> Result<()> {
        tracing::warn!(chunk = %hexd(digest), "a recorded chunk's file is gone: it will be asked for again");
        self.tx(|tx| {
            tx.execute("DELETE FROM chunks WHERE digest = ?1", [hexd(digest)])
                .map_err(db)?;
            Ok(())
        })
    }

    /// True when the catalog knows the chunk (stored and recorded).
    pub fn chunk_known(&self, digest: &Digest) -> Result<bool> {
        self.tx(|tx| {
            tx.prepare_cached("SELECT 1 FROM chunks WHERE digest = ?1")
                .and_then(|mut s| s.exists([hexd(digest)]))
                .map_err(db)
        })
    }

    /// Adds manifest entries `(index, digest, cluster mask)`; returns how many the upload has.
    pub fn add_entries(
        &self,
        who: &Principal,
        u: &UploadRef,
        entries: &[DataChunk],
    ) -> Result<u64> {
        if entries.len() > MAX_ENTRIES_PER_CALL {
            return Err(invalid(format!(
                "{} entries in one call; at most {MAX_ENTRIES_PER_CALL}",
                entries.len()
            ))
            .with_field("entries"));
        }
        self.tx(|tx| {
            let up = Self::open_upload_for(tx, who, u)?;
            let count = ImageRecord::chunk_count_for(up.meta.virtual_size);
            let mut get = tx
                .prepare_cached(
                    "SELECT digest FROM manifest_entries WHERE version_id = ?1 AND idx = ?2",
                )
                .map_err(db)?;
            let mut put = tx
                .prepare_cached(
                    "INSERT INTO manifest_entries (version_id, idx, digest, cluster_mask) \
                     VALUES (?1, ?2, ?3, ?4)",
                )
                .map_err(db)?;
            for e in entries {
                if e.index >= count {
                    return Err(invalid(format!(
                        "entry index {} is past the end of a {}-byte disk ({count} chunks)",
                        e.index, up.meta.virtual_size
                    ))
                    .with_reason("INDEX_OUT_OF_RANGE")
                    .with_field("entries.index"));
                }
                if e.mask == 0 {
                    return Err(invalid(format!(
                        "entry {}: cluster_mask is 0; zero chunks are left out of the manifest",
                        e.index
                    ))
                    .with_field("entries.cluster_mask"));
                }
                let h = hexd(&e.digest);
                let old: Option<String> = get
                    .query_row(params![up.version_id, e.index as i64], |r| r.get(0))
                    .optional()
                    .map_err(db)?;
                match old {
                    Some(o) if o == h => {}
                    Some(o) => {
                        return Err(invalid(format!(
                            "entry {} was added with digest {o}, now {h}: an entry cannot change",
                            e.index
                        ))
                        .with_reason("ENTRY_CONFLICT")
                        .with_field("entries"))
                    }
                    None => {
                        put.execute(params![up.version_id, e.index as i64, h, e.mask as i64])
                            .map_err(db)?;
                    }
                }
            }
            Self::touch(tx, &up)?;
            let n: i64 = tx
                .query_row(
                    "SELECT COUNT(*) FROM manifest_entries WHERE version_id = ?1",
                    [&up.version_id],
                    |r| r.get(0),
                )
                .map_err(db)?;
            Ok(n as u64)
        })
    }

    fn entries_of(tx: &Tx<'_>, version: &str) -> Result<Vec<(DataChunk, Option<u64>)>> {
        let mut st = tx
            .prepare_cached(
                "SELECT e.idx, e.digest, e.cluster_mask, c.size FROM manifest_entries e \
                 LEFT JOIN chunks c ON c.digest = e.digest WHERE e.version_id = ?1 ORDER BY e.idx",
            )
            .map_err(db)?;
        let rows = st
            .query_map([version], |r| {
                Ok((
                    r.get::<i64>(0)?,
                    r.get::<String>(1)?,
                    r.get::<i64>(2)?,
                    r.get::<Option<i64>>(3)?,
                ))
            })
            .map_err(db)?;
        let mut out = Vec::new();
        for row in rows {
            let (idx, d, mask, size) = row.map_err(db)?;
            let mut digest = [0u8; 32];
            hex::decode_to_slice(&d, &mut digest)
                .map_err(|_| crate::error::internal(format!("catalog: bad digest {d}")))?;
            out.push((
                DataChunk {
                    index: idx as u64,
                    digest,
                    mask: mask as u64,
                },
                size.map(|s| s as u64),
            ));
        }
        Ok(out)
    }

    /// Ends upload `u`: every entry's chunk must be stored with the right size and
    /// `content_digest` must match; then `sync` (given the entries) checks the chunk files and
    /// makes them durable, and the image turns
    /// ACTIVE with the new version. Committing a committed upload returns the image again.
    pub fn commit(
        &self,
        who: &Principal,
        u: &UploadRef,
        want_digest: &str,
        sync: impl FnOnce(&[DataChunk]) -> Result<()>,
    ) -> Result<ImageView> {
        let checked = self.tx(|tx| {
            let up = Self::upload_for(tx, who, u)?;
            match up.state {
                UploadState::Committed => return Ok(None),
                UploadState::Aborted => {
                    return Err(precondition(format!("upload {} was aborted", u.name()))
                        .with_reason("UPLOAD_NOT_OPEN")
                        .with_subject(u.name()))
                }
                UploadState::Open => {}
            }
            let entries = Self::entries_of(tx, &up.version_id)?;
            let missing: Vec<String> = entries
                .iter()
                .filter(|(_, s)| s.is_none())
                .map(|(e, _)| hexd(&e.digest))
                .collect();
            if !missing.is_empty() {
                let first: Vec<&str> = missing.iter().take(5).map(String::as_str).collect();
                return Err(precondition(format!(
                    "{} chunk(s) the manifest names are not stored: {}{}; send them with \
                     PutChunks and commit again",
                    missing.len(),
                    first.join(", "),
                    if missing.len() > 5 { ", ..." } else { "" }
                ))
                .with_reason("CHUNK_MISSING")
                .with_subject(format!("chunks/{}", missing[0])));
            }
            for (e, size) in &entries {
                let want = chunk_len(up.meta.virtual_size, e.index);
                if *size != Some(want) {
                    return Err(invalid(format!(
                        "entry {}: chunk {} holds {} bytes, but chunk {} of a {}-byte disk has {want}",
                        e.index,
                        hexd(&e.digest),
                        size.unwrap_or(0),
                        e.index,
                        up.meta.virtual_size
                    ))
                    .with_reason("CHUNK_SIZE_MISMATCH")
                    .with_field("entries"));
                }
            }
            let chunks: Vec<DataChunk> = entries.iter().map(|(e, _)| *e).collect();
            let got = content_digest(up.meta.virtual_size, &chunks);
            if got != want_digest {
                return Err(invalid(format!(
                    "content_digest {want_digest:?} does not match the manifest's entries, which \
                     give {got}"
                ))
                .with_reason("CONTENT_DIGEST_MISMATCH")
                .with_field("content_digest"));
            }
            let stored: u64 = entries.iter().filter_map(|(_, s)| *s).sum();
            Ok(Some((up, got, stored, chunks)))
        })?;
        if let Some((up, _, _, chunks)) = &checked {
            // The chunks reach the disk before any record names them as ACTIVE.
            sync(chunks).inspect_err(|e| {
                tracing::error!(upload = %up.name(), error = %e.chain(), "syncing chunks before a commit failed");
            })?;
        }
        self.tx(|tx| {
            let up = Self::upload_for(tx, who, u)?;
            // A commit of the same upload that raced this one and won: its image is the answer.
            let checked = checked.as_ref().filter(|_| up.state != UploadState::Committed);
            if let Some((_, digest, stored, chunks)) = checked {
                if up.state != UploadState::Open {
                    return Err(precondition(format!(
                        "upload {} ended while it was being committed",
                        u.name()
                    ))
                    .with_reason("UPLOAD_NOT_OPEN"));
                }
                let old: String = tx
                    .query_row(
                        "SELECT version_id FROM images WHERE id = ?1",
                        [&up.image_id],
                        |r| r.get(0),
                    )
                    .map_err(db)?;
                let m = &up.meta;
                let t = now();
                tx.execute(
                    "UPDATE images SET state = 'ACTIVE', failure_reason = '', version_id = ?1, \
                     virtual_size = ?2, stored_size = ?3, data_chunk_count = ?4, \
                     content_digest = ?5, source_format = ?6, consistency = ?7, \
                     source_domain = ?8, source_host = ?9, os_type = ?10, os_version = ?11, \
                     architecture = ?12, licensed = CASE WHEN ?13 = 1 THEN 1 ELSE licensed END, \
                     description = CASE WHEN ?14 = '' THEN description ELSE ?14 END, \
                     update_time = ?15 WHERE id = ?16",
                    params![
                        up.version_id,
                        m.virtual_size as i64,
                        *stored as i64,
                        chunks.len() as i64,
                        digest,
                        m.source_format,
                        m.consistency,
                        m.source_domain,
                        m.source_host,
                        m.os_type,
                        m.os_version,
                        m.architecture,
                        i64::from(m.licensed),
                        m.description,
                        t,
                        up.image_id
                    ],
                )
                .map_err(db)?;
                if !old.is_empty() && old != up.version_id {
                    tx.execute("DELETE FROM manifest_entries WHERE version_id = ?1", [&old])
                        .map_err(db)?;
                }
                tx.execute(
                    "UPDATE uploads SET state = 'COMMITTED', update_time = ?1 WHERE id = ?2",
                    params![t, up.id],
                )
                .map_err(db)?;
                tx.execute("DELETE FROM upload_holds WHERE upload_id = ?1", [&up.id])
                    .map_err(db)?;
                tracing::info!(upload = %up.name(), image = %up.image_name(), content_digest = %digest, "upload committed: image ACTIVE");
            }
            let r = ImageRef {
                project: up.project.clone(),
                id: up.image_id.clone(),
            };
            Self::view(tx, who, &r)
        })
    }

    fn end_upload(tx: &Tx<'_>, up: &UploadRow, reason: &str) -> Result<()> {
        let t = now();
        tx.execute(
            "UPDATE uploads SET state = 'ABORTED', update_time = ?1 WHERE id = ?2",
            params![t, up.id],
        )
        .map_err(db)?;
        tx.execute("DELETE FROM upload_holds WHERE upload_id = ?1", [&up.id])
            .map_err(db)?;
        tx.execute(
            "DELETE FROM manifest_entries WHERE version_id = ?1",
            [&up.version_id],
        )
        .map_err(db)?;
        let img: Option<(String, String)> = tx
            .query_row(
                "SELECT state, version_id FROM images WHERE id = ?1",
                [&up.image_id],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
            .map_err(db)?;
        let Some((state, version)) = img else {
            return Ok(());
        };
        let uploading = State::parse(&state).is_some_and(State::uploading);
        if !uploading {
            // A recapture of an ACTIVE image: the image keeps its version.
            return Ok(());
        }
        if reason.is_empty() && up.created_image && version.is_empty() {
            tx.execute("DELETE FROM images WHERE id = ?1", [&up.image_id])
                .map_err(db)?;
        } else {
            let why = if reason.is_empty() {
                "the upload was aborted"
            } else {
                reason
            };
            tx.execute(
                "UPDATE images SET state = 'FAILED', failure_reason = ?1, update_time = ?2 \
                 WHERE id = ?3",
                params![why, t, up.image_id],
            )
            .map_err(db)?;
        }
        Ok(())
    }

    /// Ends upload `u` without a version: the record it created turns FAILED with `reason`,
    /// or is dropped when `reason` is empty. Aborting an aborted upload is fine.
    pub fn abort_upload(&self, who: &Principal, u: &UploadRef, reason: &str) -> Result<()> {
        self.tx(|tx| {
            let up = Self::upload_for(tx, who, u)?;
            match up.state {
                UploadState::Aborted => Ok(()),
                UploadState::Committed => Err(precondition(format!(
                    "upload {} is committed: delete the image instead",
                    u.name()
                ))
                .with_reason("UPLOAD_NOT_OPEN")),
                UploadState::Open => {
                    tracing::info!(upload = %up.name(), reason, "upload aborted");
                    Self::end_upload(tx, &up, reason)
                }
            }
        })
    }

    /// Aborts open uploads idle since before `now - idle_secs`; returns how many.
    pub fn abort_idle_uploads(&self, now: i64, idle_secs: u64) -> Result<u64> {
        self.tx(|tx| {
            let cutoff = now - idle_secs as i64;
            let ids: Vec<(String, String)> = {
                let mut st = tx
                    .prepare("SELECT project, id FROM uploads WHERE state = 'OPEN' AND update_time < ?1")
                    .map_err(db)?;
                let rows = st
                    .query_map([cutoff], |r| Ok((r.get(0)?, r.get(1)?)))
                    .map_err(db)?;
                rows.collect::<DbResult<_>>().map_err(db)?
            };
            for (p, id) in &ids {
                if let Some(up) = Self::upload_row(tx, p, id)? {
                    let why = format!("the upload was idle for more than {idle_secs} s and was aborted by the repository");
                    tracing::warn!(upload = %up.name(), "{why}");
                    Self::end_upload(tx, &up, &why)?;
                }
            }
            Ok(ids.len() as u64)
        })
    }

    // ----- images -------------------------------------------------------------------------

    /// The image `r` as `who` sees it.
    pub fn get_image(&self, who: &Principal, r: &ImageRef) -> Result<ImageView> {
        self.tx(|tx| Self::view(tx, who, r))
    }

    /// A page of the images `who` sees, newest first, and the next page's token.
    pub fn list_images(&self, who: &Principal, q: &ListQuery) -> Result<(Vec<ImageView>, String)> {
        let parent = parse_parent(&q.parent, true)?;
        let filters = filter::parse(&q.filter, filter::IMAGE_FILTER_FIELDS)?;
        let size = filter::page_size(q.page_size)?;
        let fp =
            filter::fingerprint(&[&q.parent, &q.filter, if q.show_deleted { "d" } else { "" }]);
        let after = filter::position(&q.page_token, &fp)?;
        let mut sql = format!("SELECT {IMAGE_COLS} FROM images i WHERE 1 = 1");
        let mut args: Vec<Value> = Vec::new();
        let arg = |v: Value, args: &mut Vec<Value>| {
            args.push(v);
            format!("?{}", args.len())
        };
        let me = who.project().map(str::to_string);
        // Which images: for a project its own and the shared ones it has not rejected (of
        // their owner's live images); for an admin every project's, or the parent's.
        let mut visibility: Option<&str> = None;
        for (k, v) in &filters {
            if k == "visibility" {
                if v != "OWN" && v != "SHARED" {
                    return Err(
                        invalid(format!("filter: visibility is OWN or SHARED, not {v:?}"))
                            .with_field("filter"),
                    );
                }
                visibility = Some(v.as_str());
            }
        }
        match (&me, &parent) {
            (Some(p), Some(parent)) if p != parent => {
                return Err(denied(format!(
                    "project {p} may not list the images of project {parent}"
                ))
                .with_reason("OTHER_PROJECT")
                .with_subject(format!("projects/{parent}")))
            }
            (Some(p), _) => {
                let a = arg(Value::Text(p.clone()), &mut args);
                let own = format!("i.project = {a}");
                let shared = format!(
                    "(i.state <> 'DELETED' AND EXISTS (SELECT 1 FROM members m WHERE \
                     m.image_id = i.id AND m.member_project = {a} AND m.state IN ('PENDING', 'ACCEPTED')))"
                );
                match visibility {
                    Some("OWN") => sql.push_str(&format!(" AND {own}")),
                    Some(_) => sql.push_str(&format!(" AND {shared}")),
                    None => sql.push_str(&format!(" AND ({own} OR {shared})")),
                }
            }
            (None, Some(parent)) => {
                let a = arg(Value::Text(parent.clone()), &mut args);
                sql.push_str(&format!(" AND i.project = {a}"));
            }
            (None, None) => {}
        }
        let mut state_filtered = false;
        for (k, v) in &filters {
            let col = match k.as_str() {
                "visibility" => continue,
                "state" => {
                    if State::parse(v).is_none() {
                        return Err(invalid(format!(
                            "filter: state {v:?} is not one of QUEUED, SAVING, IMPORTING, ACTIVE, \
                             FAILED, DELETED"
                        ))
                        .with_field("filter"));
                    }
                    state_filtered = true;
                    "i.state"
                }
                "os_type" => "i.os_type",
                "image_name" => "i.image_name",
                "tag" => "i.tag",
                "project" => "i.project",
                _ => continue,
            };
            let a = arg(Value::Text(v.clone()), &mut args);
            sql.push_str(&format!(" AND {col} = {a}"));
        }
        if !q.show_deleted && !state_filtered {
            sql.push_str(" AND i.state <> 'DELETED'");
        }
        if let Some(pos) = after {
            let a = arg(Value::Integer(pos), &mut args);
            sql.push_str(&format!(" AND i.seq < {a}"));
        }
        let a = arg(Value::Integer(size as i64 + 1), &mut args);
        sql.push_str(&format!(" ORDER BY i.seq DESC LIMIT {a}"));
        self.tx(|tx| {
            let mut rows: Vec<ImageRow> = {
                let mut st = tx.prepare(&sql).map_err(db)?;
                let it = st
                    .query_map(args.as_slice(), ImageRow::from_row)
                    .map_err(db)?;
                it.collect::<DbResult<_>>().map_err(db)?
            };
            let next = if rows.len() > size {
                rows.truncate(size);
                filter::token(rows[size - 1].seq, &fp)
            } else {
                String::new()
            };
            let mut out = Vec::with_capacity(rows.len());
            for image in rows {
                let membership = match &me {
                    Some(p) if *p != image.project => Self::membership(tx, &image.id, p)?,
                    _ => None,
                };
                out.push(ImageView { image, membership });
            }
            Ok((out, next))
        })
    }

    /// Changes the display name, the description (any state) and, for admins, `licensed`.
    pub fn update_image(
        &self,
        who: &Principal,
        r: &ImageRef,
        display_name: Option<&str>,
        description: Option<&str>,
        licensed: Option<bool>,
    ) -> Result<ImageView> {
        if licensed.is_some() && *who != Principal::Admin {
            return Err(
                denied("only an admin may change whether an image is licensed")
                    .with_reason("ADMIN_ONLY")
                    .with_field("image.licensed"),
            );
        }
        if let Some(d) = display_name {
            if d.trim().is_empty() || d.len() > 255 {
                return Err(
                    invalid("display_name must be 1 to 255 characters, not blank")
                        .with_field("image.display_name"),
                );
            }
        }
        if description.is_some_and(|d| d.len() > 4096) {
            return Err(
                invalid("description is at most 4096 bytes").with_field("image.description")
            );
        }
        self.tx(|tx| {
            let v = Self::access(tx, who, r, Need::Own)?;
            let t = now();
            if let Some(d) = display_name {
                tx.execute(
                    "UPDATE images SET display_name = ?1, update_time = ?2 WHERE id = ?3",
                    params![d, t, v.image.id],
                )
                .map_err(db)?;
            }
            if let Some(d) = description {
                tx.execute(
                    "UPDATE images SET description = ?1, update_time = ?2 WHERE id = ?3",
                    params![d, t, v.image.id],
                )
                .map_err(db)?;
            }
            if let Some(l) = licensed {
                if l {
                    let n = Self::member_count(tx, &v.image.id)?;
                    if n > 0 {
                        return Err(precondition(format!(
                            "{} is shared with {n} project(s): remove its members before marking \
                             it licensed",
                            r.name()
                        ))
                        .with_reason("IMAGE_SHARED")
                        .with_subject(r.name()));
                    }
                }
                tx.execute(
                    "UPDATE images SET licensed = ?1, update_time = ?2 WHERE id = ?3",
                    params![i64::from(l), t, v.image.id],
                )
                .map_err(db)?;
            }
            Self::view(tx, who, r)
        })
    }

    /// Moves an ACTIVE or FAILED image to the recycle bin.
    pub fn delete_image(&self, who: &Principal, r: &ImageRef) -> Result<ImageView> {
        let days = i64::from(self.settings.recycle_bin_days);
        self.tx(|tx| {
            let v = Self::access(tx, who, r, Need::Own)?;
            let img = &v.image;
            if !img.in_use_by.is_empty() {
                return Err(precondition(format!(
                    "{} is in use by {}: it cannot be deleted until that use is cleared",
                    r.name(),
                    img.in_use_by
                ))
                .with_reason("IMAGE_IN_USE")
                .with_subject(r.name()));
            }
            let open: Option<String> = tx
                .query_row(
                    "SELECT id FROM uploads WHERE image_id = ?1 AND state = 'OPEN'",
                    [&img.id],
                    |x| x.get(0),
                )
                .optional()
                .map_err(db)?;
            if let Some(open) = open {
                return Err(precondition(format!(
                    "{} is being uploaded (projects/{}/uploads/{open}): abort the upload first",
                    r.name(),
                    img.project
                ))
                .with_reason("IMAGE_UPLOADING")
                .with_subject(r.name()));
            }
            if !matches!(img.state, State::Active | State::Failed) {
                return Err(precondition(format!(
                    "{} is {}: only ACTIVE or FAILED images can be deleted",
                    r.name(),
                    img.state.name()
                ))
                .with_reason(if img.state == State::Deleted {
                    "IMAGE_DELETED"
                } else {
                    "IMAGE_UPLOADING"
                })
                .with_subject(r.name()));
            }
            let t = now();
            tx.execute(
                "UPDATE images SET state = 'DELETED', deleted_from = ?1, delete_time = ?2, \
                 purge_time = ?3, update_time = ?2 WHERE id = ?4",
                params![img.state.name(), t, t + days * 86400, img.id],
            )
            .map_err(db)?;
            tracing::info!(image = %r.name(), by = %who.describe(), "image moved to the recycle bin");
            Self::view(tx, who, r)
        })
    }

    /// Restores a DELETED image to the state it was deleted in.
    pub fn undelete_image(&self, who: &Principal, r: &ImageRef) -> Result<ImageView> {
        self.tx(|tx| {
            let v = Self::access(tx, who, r, Need::Own)?;
            let img = &v.image;
            if img.state != State::Deleted {
                return Err(precondition(format!(
                    "{} is {}, not in the recycle bin",
                    r.name(),
                    img.state.name()
                ))
                .with_reason("IMAGE_NOT_DELETED")
                .with_subject(r.name()));
            }
            let taken: Option<String> = tx
                .query_row(
                    "SELECT id FROM images WHERE project = ?1 AND image_name = ?2 AND tag = ?3 \
                     AND state <> 'DELETED'",
                    params![img.project, img.image_name, img.tag],
                    |x| x.get(0),
                )
                .optional()
                .map_err(db)?;
            if let Some(other) = taken {
                return Err(Error::new(
                    ErrorKind::AlreadyExists,
                    format!(
                        "{}:{} now names projects/{}/images/{other}: delete or rename that one \
                         before restoring this one",
                        img.image_name, img.tag, img.project
                    ),
                )
                .with_reason("IMAGE_NAME_TAKEN")
                .with_subject(r.name()));
            }
            self.check_quota(tx, &img.project)?;
            let back = img.deleted_from.unwrap_or(State::Active);
            tx.execute(
                "UPDATE images SET state = ?1, deleted_from = '', delete_time = 0, purge_time = 0, \
                 update_time = ?2 WHERE id = ?3",
                params![back.name(), now(), img.id],
            )
            .map_err(db)?;
            Self::view(tx, who, r)
        })
    }

    fn purge_row(tx: &Tx<'_>, img: &ImageRow) -> Result<()> {
        tx.execute(
            "DELETE FROM manifest_entries WHERE version_id = ?1",
            [&img.version_id],
        )
        .map_err(db)?;
        tx.execute("DELETE FROM members WHERE image_id = ?1", [&img.id])
            .map_err(db)?;
        tx.execute("DELETE FROM images WHERE id = ?1", [&img.id])
            .map_err(db)?;
        Ok(())
    }

    /// Removes a DELETED image for good.
    pub fn purge_image(&self, who: &Principal, r: &ImageRef) -> Result<()> {
        self.tx(|tx| {
            let v = Self::access(tx, who, r, Need::Own)?;
            if v.image.state != State::Deleted {
                return Err(precondition(format!(
                    "{} is {}: delete it (to the recycle bin) before purging it",
                    r.name(),
                    v.image.state.name()
                ))
                .with_reason("IMAGE_NOT_DELETED")
                .with_subject(r.name()));
            }
            Self::purge_row(tx, &v.image)?;
            tracing::info!(image = %r.name(), by = %who.describe(), "image purged");
            Ok(())
        })
    }

    /// Purges the images whose time in the recycle bin ended by `now`; returns how many.
    pub fn purge_expired(&self, now: i64) -> Result<u64> {
        self.tx(|tx| {
            let rows: Vec<ImageRow> = {
                let sql = format!(
                    "SELECT {IMAGE_COLS} FROM images WHERE state = 'DELETED' AND purge_time <= ?1"
                );
                let mut st = tx.prepare(&sql).map_err(db)?;
                let it = st.query_map([now], ImageRow::from_row).map_err(db)?;
                it.collect::<DbResult<_>>().map_err(db)?
            };
            for img in &rows {
                tracing::info!(image = %img.name(), "recycle bin: purged after its retention");
                Self::purge_row(tx, img)?;
            }
            Ok(rows.len() as u64)
        })
    }

    /// Marks an image in use by `user` (a VM, a person): deleting it is refused meanwhile.
    pub fn mark_in_use(&self, who: &Principal, r: &ImageRef, user: &str) -> Result<ImageView> {
        if user.trim().is_empty() {
            return Err(
                invalid("user must name who uses the image, e.g. domains/web1@host3")
                    .with_field("user"),
            );
        }
        self.tx(|tx| {
            let v = Self::access(tx, who, r, Need::Use)?;
            if v.image.state == State::Deleted {
                return Err(precondition(format!("{} is in the recycle bin", r.name()))
                    .with_reason("IMAGE_DELETED"));
            }
            tx.execute(
                "UPDATE images SET in_use_by = ?1, last_used_time = ?2 WHERE id = ?3",
                params![user, now(), v.image.id],
            )
            .map_err(db)?;
            Self::view(tx, who, r)
        })
    }

    /// Clears the in-use mark.
    pub fn clear_in_use(&self, who: &Principal, r: &ImageRef) -> Result<ImageView> {
        self.tx(|tx| {
            let v = Self::access(tx, who, r, Need::Use)?;
            tx.execute(
                "UPDATE images SET in_use_by = '' WHERE id = ?1",
                params![v.image.id],
            )
            .map_err(db)?;
            Self::view(tx, who, r)
        })
    }

    /// The current version's data entries of an ACTIVE image `who` may use; notes the use.
    pub fn manifest(&self, who: &Principal, r: &ImageRef) -> Result<(ImageView, Vec<DataChunk>)> {
        self.tx(|tx| {
            let v = Self::access(tx, who, r, Need::Use)?;
            if v.image.state != State::Active {
                return Err(precondition(format!(
                    "{} is {}: only ACTIVE images have a manifest to read",
                    r.name(),
                    v.image.state.name()
                ))
                .with_reason("IMAGE_NOT_ACTIVE")
                .with_subject(r.name()));
            }
            tx.execute(
                "UPDATE images SET last_used_time = ?1 WHERE id = ?2",
                params![now(), v.image.id],
            )
            .map_err(db)?;
            let entries = Self::entries_of(tx, &v.image.version_id)?
                .into_iter()
                .map(|(e, _)| e)
                .collect();
            Ok((v, entries))
        })
    }

    /// Checks that `who` may read chunk `digest` through image `r` (ACTIVE, usable, and the
    /// chunk is in its current version). The refusal does not say whether the chunk exists.
    pub fn may_read_chunk(&self, who: &Principal, r: &ImageRef, digest: &Digest) -> Result<()> {
        self.tx(|tx| {
            let v = Self::access(tx, who, r, Need::Use)?;
            let ok = v.image.state == State::Active
                && tx
                    .prepare_cached(
                        "SELECT 1 FROM manifest_entries WHERE version_id = ?1 AND digest = ?2",
                    )
                    .and_then(|mut s| s.exists(params![v.image.version_id, hexd(digest)]))
                    .map_err(db)?;
            if !ok {
                return Err(denied(format!(
                    "chunk {} is not readable through {}",
                    hexd(digest),
                    r.name()
                ))
                .with_reason("CHUNK_NOT_READABLE")
                .with_subject(r.name()));
            }
            Ok(())
        })
    }

    /// The manifest of an image by name and the content digest the caller expects (for
    /// download links: the link names the version by its digest).
    pub fn manifest_of_version(&self, r: &ImageRef, digest: &str) -> Result<(u64, Vec<DataChunk>)> {
        self.tx(|tx| {
            let img = Self::image_row(tx, r)?.ok_or_else(|| {
                not_found(format!("image {} does not exist", r.name()))
                    .with_reason("IMAGE_NOT_FOUND")
            })?;
            if img.state != State::Active || img.content_digest != digest {
                return Err(not_found(format!(
                    "{} no longer holds the version with content digest {digest}",
                    r.name()
                ))
                .with_reason("VERSION_GONE"));
            }
            let entries = Self::entries_of(tx, &img.version_id)?
                .into_iter()
                .map(|(e, _)| e)
                .collect();
            Ok((img.virtual_size, entries))
        })
    }

    // ----- sharing ------------------------------------------------------------------------

    fn member_count(tx: &Tx<'_>, image_id: &str) -> Result<u64> {
        let n: i64 = tx
            .query_row(
                "SELECT COUNT(*) FROM members WHERE image_id = ?1",
                [image_id],
                |r| r.get(0),
            )
            .map_err(db)?;
        Ok(n as u64)
    }

    fn member_row(tx: &Tx<'_>, r: &ImageRef, member: &str) -> Result<Option<MemberRow>> {
        tx.query_row(
            "SELECT state, create_time, update_time FROM members WHERE image_id = ?1 AND \
             member_project = ?2",
            params![r.id, member],
            |x| {
                Ok(MemberRow {
                    image: r.clone(),
                    member_project: member.to_string(),
                    state: MemberState::parse(&x.get::<String>(0)?),
                    create_time: x.get(1)?,
                    update_time: x.get(2)?,
                })
            },
        )
        .optional()
        .map_err(db)
    }

    /// Shares image `r` with `member` (the owner or an admin): the member sees it PENDING.
    /// Adding a member again returns its membership unchanged.
    pub fn add_member(&self, who: &Principal, r: &ImageRef, member: &str) -> Result<MemberRow> {
        super::config::validate_project(member).map_err(|e| e.with_field("member_project"))?;
        self.tx(|tx| {
            let v = Self::access(tx, who, r, Need::Own)?;
            if member == v.image.project {
                return Err(invalid(format!(
                    "project {member} owns {}: it cannot be a member of it",
                    r.name()
                ))
                .with_field("member_project"));
            }
            if v.image.licensed {
                return Err(precondition(format!(
                    "{} carries a license: licensed images cannot be shared",
                    r.name()
                ))
                .with_reason("IMAGE_LICENSED")
                .with_subject(r.name()));
            }
            if v.image.state == State::Deleted {
                return Err(precondition(format!("{} is in the recycle bin", r.name()))
                    .with_reason("IMAGE_DELETED")
                    .with_subject(r.name()));
            }
            if let Some(m) = Self::member_row(tx, r, member)? {
                return Ok(m);
            }
            let n = Self::member_count(tx, &v.image.id)?;
            if n >= MAX_MEMBERS {
                return Err(Error::new(
                    ErrorKind::ResourceExhausted,
                    format!(
                        "{} is shared with {n} projects already, the most an image may be: \
                         remove a member first",
                        r.name()
                    ),
                )
                .with_reason("MEMBER_LIMIT")
                .with_subject(r.name()));
            }
            let t = now();
            tx.execute(
                "INSERT INTO members (image_id, member_project, state, create_time, update_time) \
                 VALUES (?1, ?2, 'PENDING', ?3, ?3)",
                params![v.image.id, member, t],
            )
            .map_err(db)?;
            tracing::info!(image = %r.name(), member, "image shared");
            Self::member_row(tx, r, member)?
                .ok_or_else(|| crate::error::internal("member vanished"))
        })
    }

    /// Stops sharing `r` with `member` (the owner or an admin).
    pub fn remove_member(&self, who: &Principal, r: &ImageRef, member: &str) -> Result<()> {
        self.tx(|tx| {
            Self::access(tx, who, r, Need::Own)?;
            let n = tx
                .execute(
                    "DELETE FROM members WHERE image_id = ?1 AND member_project = ?2",
                    params![r.id, member],
                )
                .map_err(db)?;
            if n == 0 {
                return Err(
                    not_found(format!("{} is not shared with project {member}", r.name()))
                        .with_reason("MEMBER_NOT_FOUND"),
                );
            }
            Ok(())
        })
    }

    /// A page of the members of `r` (the owner or an admin).
    pub fn list_members(
        &self,
        who: &Principal,
        r: &ImageRef,
        page_size: i32,
        page_token: &str,
    ) -> Result<(Vec<MemberRow>, String)> {
        let size = filter::page_size(page_size)?;
        let fp = filter::fingerprint(&[&r.name()]);
        let after = filter::position(page_token, &fp)?.unwrap_or(-1);
        self.tx(|tx| {
            Self::access(tx, who, r, Need::Own)?;
            let mut st = tx
                .prepare(
                    "SELECT member_project, state, create_time, update_time FROM members \
                     WHERE image_id = ?1 ORDER BY create_time, member_project",
                )
                .map_err(db)?;
            let all: Vec<MemberRow> = st
                .query_map([&r.id], |x| {
                    Ok(MemberRow {
                        image: r.clone(),
                        member_project: x.get(0)?,
                        state: MemberState::parse(&x.get::<String>(1)?),
                        create_time: x.get(2)?,
                        update_time: x.get(3)?,
                    })
                })
                .map_err(db)?
                .collect::<DbResult<_>>()
                .map_err(db)?;
            let start = (after + 1) as usize;
            let page: Vec<MemberRow> = all.iter().skip(start).take(size).cloned().collect();
            let next = if start + size < all.len() {
                filter::token((start + size - 1) as i64, &fp)
            } else {
                String::new()
            };
            Ok((page, next))
        })
    }

    /// The member's answer: ACCEPTED or REJECTED (only the member project, or an admin).
    pub fn update_membership(
        &self,
        who: &Principal,
        r: &ImageRef,
        member: &str,
        state: MemberState,
    ) -> Result<MemberRow> {
        if state == MemberState::Pending {
            return Err(invalid("state must be ACCEPTED or REJECTED").with_field("state"));
        }
        if let Principal::Project(p) = who {
            if p != member {
                return Err(denied(format!(
                    "project {p} may not answer for member project {member}"
                ))
                .with_reason("NOT_MEMBER")
                .with_subject(format!("{}/members/{member}", r.name())));
            }
        }
        self.tx(|tx| {
            let m = Self::member_row(tx, r, member)?.ok_or_else(|| {
                denied(format!(
                    "{} is not shared with project {member}",
                    r.name()
                ))
                .with_reason("NOT_MEMBER")
                .with_subject(r.name())
            })?;
            let img = Self::image_row(tx, r)?.ok_or_else(|| not_found("image vanished"))?;
            if img.state == State::Deleted {
                return Err(denied(format!("{} is not shared with project {member}", r.name()))
                    .with_reason("NOT_MEMBER"));
            }
            tx.execute(
                "UPDATE members SET state = ?1, update_time = ?2 WHERE image_id = ?3 AND \
                 member_project = ?4",
                params![state.name(), now(), r.id, member],
            )
            .map_err(db)?;
            tracing::info!(image = %r.name(), member, from = m.state.name(), to = state.name(), "membership answered");
            Self::member_row(tx, r, member)?.ok_or_else(|| crate::error::internal("member vanished"))
        })
    }

    // ----- garbage collection -------------------------------------------------------------

    /// Deletes (and returns) up to `limit` chunk records that nothing references — no
    /// manifest entry of any image version or open upload, no hold of an open upload — and
    /// that were stored before `cutoff`. The caller removes their files, holding the store's
    /// gate so no upload can see a record vanish under it.
    pub fn take_sweepable(&self, cutoff: i64, limit: usize) -> Result<Vec<(Digest, u64)>> {
        self.tx(|tx| {
            let rows: Vec<(String, i64)> = {
                let mut st = tx
                    .prepare(
                        "SELECT c.digest, c.size FROM chunks c WHERE c.create_time <= ?1 \
                         AND NOT EXISTS (SELECT 1 FROM manifest_entries e WHERE e.digest = c.digest) \
                         AND NOT EXISTS (SELECT 1 FROM upload_holds h WHERE h.digest = c.digest) \
                         LIMIT ?2",
                    )
                    .map_err(db)?;
                let it = st
                    .query_map(params![cutoff, limit as i64], |r| Ok((r.get(0)?, r.get(1)?)))
                    .map_err(db)?;
                it.collect::<DbResult<_>>().map_err(db)?
            };
            let mut out = Vec::with_capacity(rows.len());
            for (d, size) in rows {
                tx.execute("DELETE FROM chunks WHERE digest = ?1", [&d])
                    .map_err(db)?;
                let mut digest = [0u8; 32];
                if hex::decode_to_slice(&d, &mut digest).is_ok() {
                    out.push((digest, size as u64));
                }
            }
            Ok(out)
        })
    }

    /// Every chunk the catalog has a record of.
    pub fn chunk_digests(&self) -> Result<Vec<Digest>> {
        self.tx(|tx| {
            let mut st = tx.prepare("SELECT digest FROM chunks").map_err(db)?;
            let it = st
                .query_map(params![], |r| r.get::<String>(0))
                .map_err(db)?;
            let mut out = Vec::new();
            for d in it {
                let d = d.map_err(db)?;
                let mut digest = [0u8; 32];
                if hex::decode_to_slice(&d, &mut digest).is_ok() {
                    out.push(digest);
                }
            }
            Ok(out)
        })
    }

    /// True when a chunk record exists or anything references the digest (for files the
    /// store holds without a record: the collector removes only unknown, unreferenced ones).
    pub fn chunk_referenced(&self, digest: &Digest) -> Result<bool> {
        let h = hexd(digest);
        self.tx(|tx| {
            tx.query_row(
                "SELECT (SELECT COUNT(*) FROM chunks WHERE digest = ?1) + \
                 (SELECT COUNT(*) FROM manifest_entries WHERE digest = ?1) + \
                 (SELECT COUNT(*) FROM upload_holds WHERE digest = ?1)",
                [&h],
                |r| r.get::<i64>(0),
            )
            .map(|n| n > 0)
            .map_err(db)
        })
    }
}

/// A random id of 32 hex digits (128 bits from the kernel's RNG).
fn uuid_like() -> String {
    let a = util::random_id("x");
    let b = util::random_id("x");
    format!("{}{}", &a[2..], &b[2..])
}

#[cfg(test)]
mod tests;
