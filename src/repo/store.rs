//! The chunk-store seam of the capture pipeline: what the capture workers call for every data
//! chunk they have read and hashed, whatever keeps it.
//!
//! Two stores implement it: the local repository's [`ChunkSink`] (the embedded default: a
//! chunk file per digest on this host) and the central repository's upload
//! (`upload::imagerepo`: asks which digests the repository lacks and sends only those). The
//! trait is here, under both the pipeline and the targets, so neither has to know the other.
//!
//! The shape follows the workers' buffers: a worker hands its 4 MiB buffer over with the chunk
//! and gets a buffer back to read the next chunk into. A local store returns the same buffer
//! once the chunk file is written; a remote one may keep the buffer for a send still under way
//! and return a spare one of its bounded pool, so that sending overlaps reading without a copy,
//! and memory stays `workers + chunks in flight` buffers. What a store accepted must be stored
//! by the time [`ChunkStore::flush`] returns: a send that failed for good fails the flush (and
//! every later put).

use super::{ChunkBuf, ChunkSink, Digest, PutOutcome};
use crate::error::{Error, ErrorKind, Result};

/// Where the capture pipeline puts data chunks. Cheap to share (`Arc<dyn ChunkStore>`).
#[tonic::async_trait]
pub trait ChunkStore: Send + Sync {
    /// Stores the chunk `buf[..len]` under `digest` unless the store has it, and returns a
    /// buffer of the same capacity to read the next chunk into (`buf` itself, or a spare one).
    /// `Stored`: the chunk was new to the store (its bytes are written or being sent);
    /// `Existing`: the store had it, nothing was written or sent.
    async fn put(
        &self,
        digest: Digest,
        buf: ChunkBuf,
        len: usize,
    ) -> (ChunkBuf, Result<PutOutcome>);

    /// Takes chunks of an earlier image into this one without their bytes (an incremental
    /// capture's unchanged chunks): for each `(digest, length)`, whether the store has it; those
    /// it has are kept for this image as if put (pinned, or known to the upload), the others
    /// must be read and put.
    async fn reuse(&self, chunks: Vec<(Digest, usize)>) -> Result<Vec<bool>>;

    /// Waits until every chunk a put accepted is stored; the first failure otherwise.
    async fn flush(&self) -> Result<()>;

    /// Names the store for messages ("repository /var/lib/imaged", "imagerepo central ...").
    fn describe(&self) -> String;
}

#[tonic::async_trait]
impl ChunkStore for ChunkSink {
    async fn put(
        &self,
        digest: Digest,
        buf: ChunkBuf,
        len: usize,
    ) -> (ChunkBuf, Result<PutOutcome>) {
        let sink = self.clone();
        // File writes block: they run on the blocking pool, the buffer travels with them.
        let joined = tokio::task::spawn_blocking(move || {
            let res = sink.put(&digest, &buf[..len]);
            (buf, res)
        })
        .await;
        match joined {
            Ok(out) => out,
            Err(e) => (
                ChunkBuf::zeroed(super::CHUNK_SIZE as usize),
                Err(Error::new(ErrorKind::Internal, "storing a chunk failed").with_source(e)),
            ),
        }
    }

    async fn reuse(&self, chunks: Vec<(Digest, usize)>) -> Result<Vec<bool>> {
        let sink = self.clone();
        tokio::task::spawn_blocking(move || {
            chunks
                .iter()
                .map(|(d, len)| sink.reuse(d, *len as u64))
                .collect()
        })
        .await
        .map_err(|e| Error::new(ErrorKind::Internal, "reusing chunks failed").with_source(e))
    }

    async fn flush(&self) -> Result<()> {
        // Every put wrote its chunk file before it returned; the commit syncs them.
        Ok(())
    }

    fn describe(&self) -> String {
        format!("repository {}", self.repo.root().display())
    }
}
