//! The garbage collector, with the recycle bin's retention and the end of idle uploads.
//!
//! One pass ([`collect`]): purge the images whose time in the recycle bin is over; abort the
//! open uploads idle past the limit (their records turn FAILED); then sweep. Marking is done
//! by the catalog's query: a chunk is live while any manifest entry (of an image's current
//! version or of an open upload's new version) names it or an open upload holds it (it was
//! found present for, or sent by, that upload). Only chunks that are not live *and* were
//! stored more than the grace period ago are removed, so a chunk an upload has just sent is
//! never lost. Records and files go in batches under the store's write gate: uploads take the
//! gate shared while they look a chunk up or store one, so none sees a chunk vanish between
//! its answer and its use. Chunk files without a record (a crash between the write and the
//! record) are removed the same way once past the grace period.

use std::collections::HashSet;
use std::sync::RwLock;
use std::time::{Duration, SystemTime};

use super::catalog::Catalog;
use super::chunks::ChunkStore;
use super::config::GcConfig;
use crate::error::Result;

/// Records swept per hold of the write gate.
const BATCH: usize = 512;

/// What one pass did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GcReport {
    pub images_purged: u64,
    pub uploads_aborted: u64,
    pub chunks_removed: u64,
    pub bytes_freed: u64,
    pub orphan_files_removed: u64,
}

/// One pass at time `now` (unix seconds). Blocking.
pub fn collect(
    catalog: &Catalog,
    store: &dyn ChunkStore,
    gate: &RwLock<()>,
    cfg: &GcConfig,
    now: i64,
) -> Result<GcReport> {
    let mut r = GcReport {
        images_purged: catalog.purge_expired(now)?,
        uploads_aborted: catalog.abort_idle_uploads(now, cfg.upload_idle_secs)?,
        ..Default::default()
    };
    let cutoff = now - cfg.gc_grace_secs as i64;
    loop {
        let _w = gate.write().unwrap_or_else(|p| p.into_inner());
        let batch = catalog.take_sweepable(cutoff, BATCH)?;
        for (d, size) in &batch {
            store.remove(d)?;
            r.chunks_removed += 1;
            r.bytes_freed += size;
        }
        if batch.len() < BATCH {
            break;
        }
    }
    let known: HashSet<_> = catalog.chunk_digests()?.into_iter().collect();
    let old = SystemTime::UNIX_EPOCH + Duration::from_secs(cutoff.max(0) as u64);
    for (d, mtime) in store.list()? {
        if known.contains(&d) || mtime > old {
            continue;
        }
        let _w = gate.write().unwrap_or_else(|p| p.into_inner());
        if !catalog.chunk_referenced(&d)? {
            tracing::info!(chunk = %hex::encode(d), "removing a chunk file the catalog does not know");
            store.remove(&d)?;
            r.orphan_files_removed += 1;
        }
    }
    if r != GcReport::default() {
        tracing::info!(
            images_purged = r.images_purged,
            uploads_aborted = r.uploads_aborted,
            chunks_removed = r.chunks_removed,
            bytes_freed = r.bytes_freed,
            orphan_files_removed = r.orphan_files_removed,
            "garbage collection done"
        );
    }
    Ok(r)
}
