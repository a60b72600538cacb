//! The catalog's schema, versioned: `schema_version` holds the version a database is at, and
//! [`MIGRATIONS`] lists the steps from each version to the next (append new steps; never edit
//! a released one). The SQL stays in the subset SQLite and PostgreSQL share (`BIGINT`, `TEXT`,
//! partial unique indexes, `ON CONFLICT DO NOTHING`), so a PostgreSQL backend can run the same
//! steps.

use super::backend::{params, Conn, OptionalExtension};
use super::db;
use crate::error::{internal, Result};

/// Each migration step: the version it leads to and its statements.
pub const MIGRATIONS: &[(i64, &str)] = &[(
    1,
    r#"
CREATE TABLE projects (
    name TEXT PRIMARY KEY,
    image_limit BIGINT NOT NULL
);
CREATE TABLE images (
    id TEXT PRIMARY KEY,
    seq BIGINT NOT NULL UNIQUE,
    project TEXT NOT NULL,
    image_name TEXT NOT NULL,
    tag TEXT NOT NULL,
    display_name TEXT NOT NULL,
    description TEXT NOT NULL,
    state TEXT NOT NULL,
    failure_reason TEXT NOT NULL,
    deleted_from TEXT NOT NULL,
    source_domain TEXT NOT NULL,
    source_host TEXT NOT NULL,
    os_type TEXT NOT NULL,
    os_version TEXT NOT NULL,
    architecture TEXT NOT NULL,
    source_format BIGINT NOT NULL,
    consistency BIGINT NOT NULL,
    licensed BIGINT NOT NULL,
    in_use_by TEXT NOT NULL,
    version_id TEXT NOT NULL,
    virtual_size BIGINT NOT NULL,
    stored_size BIGINT NOT NULL,
    data_chunk_count BIGINT NOT NULL,
    content_digest TEXT NOT NULL,
    create_time BIGINT NOT NULL,
    update_time BIGINT NOT NULL,
    last_used_time BIGINT NOT NULL,
    delete_time BIGINT NOT NULL,
    purge_time BIGINT NOT NULL
);
CREATE UNIQUE INDEX images_live_name ON images (project, image_name, tag) WHERE state <> 'DELETED';
CREATE INDEX images_project_seq ON images (project, seq);
CREATE TABLE manifest_entries (
    version_id TEXT NOT NULL,
    idx BIGINT NOT NULL,
    digest TEXT NOT NULL,
    cluster_mask BIGINT NOT NULL,
    PRIMARY KEY (version_id, idx)
);
CREATE INDEX manifest_entries_digest ON manifest_entries (digest);
CREATE TABLE uploads (
    id TEXT PRIMARY KEY,
    project TEXT NOT NULL,
    request_id TEXT NOT NULL,
    image_id TEXT NOT NULL,
    version_id TEXT NOT NULL,
    state TEXT NOT NULL,
    created_image BIGINT NOT NULL,
    meta TEXT NOT NULL,
    chunks_received BIGINT NOT NULL,
    bytes_received BIGINT NOT NULL,
    create_time BIGINT NOT NULL,
    update_time BIGINT NOT NULL
);
CREATE UNIQUE INDEX uploads_request ON uploads (project, request_id) WHERE request_id <> '';
CREATE INDEX uploads_image ON uploads (image_id, state);
CREATE TABLE chunks (
    digest TEXT PRIMARY KEY,
    size BIGINT NOT NULL,
    create_time BIGINT NOT NULL
);
CREATE TABLE upload_holds (
    upload_id TEXT NOT NULL,
    digest TEXT NOT NULL,
    PRIMARY KEY (upload_id, digest)
);
CREATE INDEX upload_holds_digest ON upload_holds (digest);
CREATE TABLE members (
    image_id TEXT NOT NULL,
    member_project TEXT NOT NULL,
    state TEXT NOT NULL,
    create_time BIGINT NOT NULL,
    update_time BIGINT NOT NULL,
    PRIMARY KEY (image_id, member_project)
);
CREATE INDEX members_project ON members (member_project);
"#,
)];

/// The version the last migration leads to.
pub fn latest() -> i64 {
    MIGRATIONS.last().map(|m| m.0).unwrap_or(0)
}

/// Brings `conn` to the latest version, one transaction per step. A database newer than this
/// program is refused. On PostgreSQL, servers starting together migrate one at a time (an
/// advisory lock held for the migration; a step's transaction is serializable too).
pub fn migrate(conn: &mut Conn) -> Result<i64> {
    let pg = matches!(conn, Conn::Postgres(_));
    if pg {
        conn.batch("SELECT pg_advisory_lock(7263001)").map_err(db)?;
    }
    let out = steps(conn);
    if pg {
        let unlock = conn.batch("SELECT pg_advisory_unlock(7263001)").map_err(db);
        out.and_then(|v| unlock.map(|_| v))
    } else {
        out
    }
}

fn steps(conn: &mut Conn) -> Result<i64> {
    conn.batch("CREATE TABLE IF NOT EXISTS schema_version (version BIGINT NOT NULL);")
        .map_err(db)?;
    let current: i64 = {
        let tx = conn.transaction().map_err(db)?;
        let v = tx
            .query_row("SELECT MAX(version) FROM schema_version", params![], |r| {
                r.get::<Option<i64>>(0)
            })
            .optional()
            .map_err(db)?
            .flatten()
            .unwrap_or(0);
        tx.commit().map_err(db)?;
        v
    };
    if current > latest() {
        return Err(internal(format!(
            "the catalog is at schema version {current}, newer than this imagerepo knows ({}): \
             run a newer imagerepo",
            latest()
        )));
    }
    for (version, sql) in MIGRATIONS.iter().filter(|m| m.0 > current) {
        let tx = conn.transaction().map_err(db)?;
        for stmt in sql.split(';').map(str::trim).filter(|s| !s.is_empty()) {
            tx.execute(stmt, params![]).map_err(db)?;
        }
        tx.execute("DELETE FROM schema_version", params![])
            .map_err(db)?;
        tx.execute(
            "INSERT INTO schema_version (version) VALUES (?1)",
            [version],
        )
        .map_err(db)?;
        tx.commit().map_err(db)?;
        tracing::info!(version, "catalog schema migrated");
    }
    Ok(latest())
}
