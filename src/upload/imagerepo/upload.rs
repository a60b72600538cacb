//! One upload into an `imagerepo`: the chunk store a capture to an `imagerepo` target writes
//! through.
//!
//! The flow, every step idempotent on the server:
//! 1. `BeginUpload` with a `request_id` derived from the capture operation
//!    ([`UploadSpec::request_id`]): beginning again with it returns the same upload.
//! 2. For every data chunk the pipeline puts: `FindMissingChunks` (batched, see `batch.rs`).
//!    A chunk the repository has is counted *existing* and not sent; a missing one is counted
//!    *new* and sent by `PutChunks` in pieces of at most 1 MiB, each piece passing the
//!    target's bandwidth cap first. A digest already stored or being sent by this upload is
//!    not asked again.
//! 3. At most `chunks_in_flight` sends run at once. A put that finds every slot busy waits
//!    (backpressure on the readers); one that gets a slot swaps buffers: the worker's buffer is
//!    sent and the worker gets a spare one of the upload's pool back, so reading the next chunk
//!    overlaps the send without a copy. Memory: `chunks_in_flight` × 4 MiB beyond the readers'.
//! 4. [`RemoteUpload::finish`]: waits for the sends, adds the manifest entries
//!    (`AddManifestEntries`, at most 8192 a call), and `CommitUpload`s with the content digest;
//!    the image name the repository made (`projects/P/images/ID`) is where the capture went.
//! 5. On failure or cancel: [`RemoteUpload::abort`] (`AbortUpload` with the reason).
//!
//! Resume: a call that fails on the network (UNAVAILABLE, a deadline, a cut stream) is retried
//! with backoff (0.25 s doubling to 5 s) for at most `retry_secs`; before each retry the
//! upload is begun again with the same `request_id` (so a restarted repository that kept the
//! upload continues it) and a chunk send first asks again whether the chunk is still missing,
//! so only what the repository lacks is sent again. A capture retried after the agent itself
//! restarted is a new operation and a new upload; it sends only what the repository still
//! lacks, since the chunks the first attempt sent are there (held by its open upload).

use std::collections::HashSet;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use futures_util::future::BoxFuture;
use sha2::{Digest as _, Sha256};
use tokio::sync::Semaphore;
use tonic::transport::Channel;

use super::batch::Coalescer;
use super::{pb, retryable, Target};
use crate::error::{Error, ErrorKind, Result};
use crate::progress::CancelToken;
use crate::repo::{ChunkBuf, ChunkStore, DataChunk, Digest, PutOutcome, CHUNK_SIZE};

/// The largest piece of a chunk in one PutChunks message.
const PIECE: usize = 1 << 20;
/// The most manifest entries in one AddManifestEntries call.
const ENTRIES_PER_CALL: usize = 8192;

/// What to begin: the image and its provenance.
#[derive(Debug, Clone, Default)]
pub struct UploadSpec {
    pub project: String,
    pub image_name: String,
    /// Empty: the repository's default ("latest").
    pub tag: String,
    /// Derived from the operation: see [`UploadSpec::request_id`].
    pub request_id: String,
    pub virtual_size: u64,
    /// "qcow2", "raw" or another.
    pub source_format: String,
    /// "cold", "quiesced", "crash-consistent".
    pub consistency: String,
    pub description: String,
    pub source_domain: String,
    pub source_host: String,
    pub os_type: String,
    pub os_version: String,
    pub architecture: String,
}

impl UploadSpec {
    /// A UUID-shaped idempotency key that is the same for every attempt of one operation:
    /// sha256 of the host, the operation's key (its request_id, or its id) and the image.
    pub fn request_id(host: &str, op_key: &str, project: &str, image: &str, tag: &str) -> String {
        let mut h = Sha256::new();
        for part in ["imaged-capture", host, op_key, project, image, tag] {
            h.update((part.len() as u64).to_le_bytes());
            h.update(part.as_bytes());
        }
        let x = hex::encode(&h.finalize()[..16]);
        format!(
            "{}-{}-{}-{}-{}",
            &x[..8],
            &x[8..12],
            &x[12..16],
            &x[16..20],
            &x[20..32]
        )
    }
}

/// What an upload did, for the log and the operation.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct UploadStats {
    pub find_calls: u64,
    pub digests_asked: u64,
    pub chunks_sent: u64,
    pub bytes_sent: u64,
    pub retries: u64,
}

type FindFn = Box<dyn Fn(Vec<Digest>) -> BoxFuture<'static, Result<Vec<Digest>>> + Send + Sync>;

/// An open upload: a [`ChunkStore`] for the capture pipeline, then [`RemoteUpload::finish`].
#[derive(Clone)]
pub struct RemoteUpload {
    inner: Arc<Shared>,
}

struct Shared {
    target: Arc<Target>,
    channel: Channel,
    spec: UploadSpec,
    cancel: CancelToken,
    /// `projects/P/uploads/U`, from BeginUpload.
    name: Mutex<String>,
    finder: Arc<Coalescer<FindFn>>,
    /// One permit per chunk send; a flush takes them all.
    slots: Arc<Semaphore>,
    /// Spare 4 MiB buffers handed to the workers in exchange for the ones being sent.
    pool: Mutex<Vec<ChunkBuf>>,
    /// Digests stored or being sent by this upload.
    known: Mutex<HashSet<Digest>>,
    /// The first send that failed for good.
    failed: Mutex<Option<(ErrorKind, String)>>,
    sends: Mutex<tokio::task::JoinSet<()>>,
    chunks_sent: AtomicU64,
    bytes_sent: AtomicU64,
    retries: AtomicU64,
}

impl RemoteUpload {
    pub(super) async fn begin(
        target: Arc<Target>,
        channel: Channel,
        spec: UploadSpec,
        cancel: CancelToken,
    ) -> Result<RemoteUpload> {
        let in_flight = target.cfg.chunks_in_flight;
        let inner = Arc::new_cyclic(|me: &Weak<Shared>| {
            let me = me.clone();
            let find: FindFn = Box::new(move |digests| {
                let me = me.clone();
                Box::pin(async move {
                    let me = me
                        .upgrade()
                        .ok_or_else(|| Error::new(ErrorKind::Cancelled, "the upload has ended"))?;
                    me.find_missing(digests).await
                })
            });
            Shared {
                target,
                channel,
                spec,
                cancel,
                name: Mutex::new(String::new()),
                finder: Coalescer::new(find),
                slots: Arc::new(Semaphore::new(in_flight)),
                pool: Mutex::new(Vec::new()),
                known: Mutex::new(HashSet::new()),
                failed: Mutex::new(None),
                sends: Mutex::new(tokio::task::JoinSet::new()),
                chunks_sent: AtomicU64::new(0),
                bytes_sent: AtomicU64::new(0),
                retries: AtomicU64::new(0),
            }
        });
        inner
            .retrying("beginning the upload", |s| {
                let s = s.clone();
                async move { s.begin_once().await }
            })
            .await?;
        Ok(RemoteUpload { inner })
    }

    /// `projects/P/uploads/U`.
    pub fn name(&self) -> String {
        self.inner.upload()
    }

    /// What was asked and sent so far.
    pub fn stats(&self) -> UploadStats {
        let s = &self.inner;
        UploadStats {
            find_calls: s.finder.stats.calls.load(Ordering::Relaxed),
            digests_asked: s.finder.stats.digests.load(Ordering::Relaxed),
            chunks_sent: s.chunks_sent.load(Ordering::Relaxed),
            bytes_sent: s.bytes_sent.load(Ordering::Relaxed),
            retries: s.retries.load(Ordering::Relaxed),
        }
    }

    /// Adds the manifest entries and commits with `content_digest`; the repository's image
    /// name (`projects/P/images/ID`).
    pub async fn finish(&self, chunks: &[DataChunk], content_digest: &str) -> Result<String> {
        self.flush().await?;
        let s = &self.inner;
        for batch in chunks.chunks(ENTRIES_PER_CALL) {
            let entries: Vec<pb::ManifestEntry> = batch
                .iter()
                .map(|c| pb::ManifestEntry {
                    index: c.index,
                    digest: hex::encode(c.digest),
                    cluster_mask: c.mask,
                })
                .collect();
            s.retrying("adding manifest entries", |s| {
                let (s, entries) = (s.clone(), entries.clone());
                async move {
                    let req = s.request(pb::AddManifestEntriesRequest {
                        upload: s.upload(),
                        entries,
                    });
                    s.client().add_manifest_entries(req).await
                }
            })
            .await?;
        }
        let digest = content_digest.to_string();
        let image = s
            .retrying("committing the upload", |s| {
                let (s, digest) = (s.clone(), digest.clone());
                async move {
                    let req = s.request(pb::CommitUploadRequest {
                        upload: s.upload(),
                        content_digest: digest,
                    });
                    s.client().commit_upload(req).await
                }
            })
            .await?;
        Ok(image.into_inner().name)
    }

    /// Ends the upload without an image, keeping `reason` on the repository's record. Sends
    /// still under way are stopped. Best effort: a failure is logged, not returned.
    pub async fn abort(&self, reason: &str) {
        let s = &self.inner;
        s.sends
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .abort_all();
        let mut req = tonic::Request::new(pb::AbortUploadRequest {
            upload: s.upload(),
            reason: reason.chars().take(1000).collect(),
        });
        req.set_timeout(Duration::from_secs(s.target.cfg.call_timeout_secs.min(15)));
        s.target.annotate(&mut req, &s.spec.project);
        match s.client().abort_upload(req).await {
            Ok(_) => {
                tracing::info!(upload = %s.upload(), target = %s.target.describe(), "upload aborted")
            }
            Err(e) => {
                tracing::warn!(upload = %s.upload(), target = %s.target.describe(), error = %e.message(),
                "could not abort the upload; the repository ends it by itself")
            }
        }
    }
}

impl Shared {
    fn upload(&self) -> String {
        self.name.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn client(&self) -> pb::chunk_service_client::ChunkServiceClient<Channel> {
        pb::chunk_service_client::ChunkServiceClient::new(self.channel.clone())
            .max_decoding_message_size(8 << 20)
    }

    /// A request with the project header and the call timeout.
    fn request<T>(&self, msg: T) -> tonic::Request<T> {
        let mut req = tonic::Request::new(msg);
        req.set_timeout(Duration::from_secs(self.target.cfg.call_timeout_secs));
        self.target.annotate(&mut req, &self.spec.project);
        req
    }

    async fn begin_once(&self) -> std::result::Result<(), tonic::Status> {
        let sp = &self.spec;
        let consistency = match sp.consistency.as_str() {
            "cold" => pb::Consistency::Cold,
            "quiesced" => pb::Consistency::Quiesced,
            "crash-consistent" => pb::Consistency::CrashConsistent,
            _ => pb::Consistency::Unspecified,
        };
        let format = match sp.source_format.as_str() {
            "qcow2" => pb::ImageFormat::Qcow2,
            "raw" => pb::ImageFormat::Raw,
            _ => pb::ImageFormat::Unspecified,
        };
        let req = self.request(pb::BeginUploadRequest {
            parent: format!("projects/{}", sp.project),
            image_name: sp.image_name.clone(),
            tag: sp.tag.clone(),
            request_id: sp.request_id.clone(),
            virtual_size_bytes: sp.virtual_size,
            source_format: format as i32,
            consistency: consistency as i32,
            description: sp.description.clone(),
            source_domain: sp.source_domain.clone(),
            source_host: sp.source_host.clone(),
            os_type: sp.os_type.clone(),
            os_version: sp.os_version.clone(),
            architecture: sp.architecture.clone(),
            licensed: false,
            kind: pb::UploadKind::Capture as i32,
        });
        let up = self.client().begin_upload(req).await?.into_inner();
        if up.state != pb::UploadState::Open as i32 {
            return Err(tonic::Status::failed_precondition(format!(
                "upload {} for request {} is no longer open (state {}): the capture ended before",
                up.name, sp.request_id, up.state
            )));
        }
        tracing::info!(upload = %up.name, image = %up.image, entries = up.entries,
            chunks_received = up.chunks_received, target = %self.target.describe(), "upload begun");
        *self.name.lock().unwrap_or_else(|p| p.into_inner()) = up.name;
        Ok(())
    }

    /// Runs `call` until it succeeds, fails for good, or network failures have gone on for
    /// `retry_secs`; between attempts, backs off and begins the upload again.
    async fn retrying<T, F, Fut>(self: &Arc<Self>, what: &str, call: F) -> Result<T>
    where
        F: Fn(&Arc<Self>) -> Fut,
        Fut: Future<Output = std::result::Result<T, tonic::Status>>,
    {
        let budget = Duration::from_secs(self.target.cfg.retry_secs);
        let mut backoff = Duration::from_millis(250);
        let mut failing_since: Option<Instant> = None;
        loop {
            self.cancel.check()?;
            let status = match call(self).await {
                Ok(v) => return Ok(v),
                Err(s) => s,
            };
            if !retryable(&status) {
                return Err(self.target.status_error(what, status));
            }
            let since = *failing_since.get_or_insert_with(Instant::now);
            if since.elapsed() >= budget {
                let secs = since.elapsed().as_secs();
                return Err(self.target.status_error(
                    &format!("{what} (gave up after {secs} s of retries)"),
                    status,
                ));
            }
            self.retries.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(target = %self.target.describe(), upload = %self.upload(), error = %status.message(),
                code = ?status.code(), wait_ms = backoff.as_millis() as u64, "{what} failed; retrying");
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
            // Begin again with the same request_id: the upload continues where it stood.
            if let Err(s) = self.begin_once().await {
                if !retryable(&s) {
                    return Err(self.target.status_error("beginning the upload again", s));
                }
            }
        }
    }

    /// One FindMissingChunks call (with retries): the digests the repository lacks.
    async fn find_missing(self: &Arc<Self>, digests: Vec<Digest>) -> Result<Vec<Digest>> {
        let hexes: Vec<String> = digests.iter().map(hex::encode).collect();
        let missing = self
            .retrying("asking which chunks are missing", |s| {
                let (s, hexes) = (s.clone(), hexes.clone());
                async move {
                    let req = s.request(pb::FindMissingChunksRequest {
                        upload: s.upload(),
                        digests: hexes,
                    });
                    s.client().find_missing_chunks(req).await
                }
            })
            .await?
            .into_inner()
            .missing;
        let mut out = Vec::with_capacity(missing.len());
        for m in missing {
            let mut d = [0u8; 32];
            hex::decode_to_slice(&m, &mut d).map_err(|e| {
                Error::new(
                    ErrorKind::Internal,
                    format!(
                        "{} answered a malformed digest {m:?}",
                        self.target.describe()
                    ),
                )
                .with_source(e)
            })?;
            out.push(d);
        }
        Ok(out)
    }

    /// Sends one chunk (with retries; a retry first asks whether it is still missing).
    async fn send(self: &Arc<Self>, digest: Digest, buf: Arc<ChunkBuf>, len: usize) -> Result<()> {
        let hexd = hex::encode(digest);
        let first = std::sync::atomic::AtomicBool::new(true);
        let what = format!("sending chunk {hexd}");
        let cap = self.target.cfg.bandwidth_limit;
        self.retrying(&what, |s| {
            let (s, buf, hexd) = (s.clone(), buf.clone(), hexd.clone());
            let again = !first.swap(false, Ordering::Relaxed);
            async move {
                if again {
                    let still = s
                        .find_missing(vec![digest])
                        .await
                        .map_err(|e| tonic::Status::unavailable(e.chain()))?;
                    if still.is_empty() {
                        return Ok(());
                    }
                }
                let upload = s.upload();
                let limiter = s.target.limiter.clone();
                let pieces = futures_util::stream::unfold(0usize, move |off| {
                    let (buf, upload, hexd, limiter) =
                        (buf.clone(), upload.clone(), hexd.clone(), limiter.clone());
                    async move {
                        if off >= len {
                            return None;
                        }
                        let end = (off + PIECE).min(len);
                        limiter.take((end - off) as u64).await;
                        let msg = pb::PutChunksRequest {
                            upload,
                            digest: if off == 0 { hexd } else { String::new() },
                            offset: off as u64,
                            data: buf[off..end].to_vec(),
                            last: end == len,
                        };
                        Some((msg, end))
                    }
                });
                let mut req = s.request(pieces);
                let at_cap = cap.map_or(0, |r| len as u64 / r);
                req.set_timeout(Duration::from_secs(s.target.cfg.call_timeout_secs + at_cap));
                s.client().put_chunks(req).await?;
                s.chunks_sent.fetch_add(1, Ordering::Relaxed);
                s.bytes_sent.fetch_add(len as u64, Ordering::Relaxed);
                Ok(())
            }
        })
        .await
    }

    fn failure(&self) -> Option<Error> {
        self.failed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|(k, m)| Error::new(*k, m.clone()))
    }
}

#[tonic::async_trait]
impl ChunkStore for RemoteUpload {
    async fn put(
        &self,
        digest: Digest,
        buf: ChunkBuf,
        len: usize,
    ) -> (ChunkBuf, Result<PutOutcome>) {
        let s = &self.inner;
        if let Some(e) = s.failure() {
            return (buf, Err(e));
        }
        if s.known
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&digest)
        {
            return (buf, Ok(PutOutcome::Existing));
        }
        match s.finder.is_missing(digest).await {
            Err(e) => return (buf, Err(e)),
            Ok(false) => {
                s.known
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(digest);
                return (buf, Ok(PutOutcome::Existing));
            }
            Ok(true) => {}
        }
        if !s
            .known
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(digest)
        {
            // Another worker is sending the same bytes.
            return (buf, Ok(PutOutcome::Existing));
        }
        // Backpressure: wait for a send slot.
        let permit = match s.slots.clone().acquire_owned().await {
            Ok(p) => p,
            Err(e) => {
                return (
                    buf,
                    Err(
                        Error::new(ErrorKind::Internal, "the upload's send slots closed")
                            .with_source(e),
                    ),
                )
            }
        };
        let spare = s
            .pool
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pop()
            .unwrap_or_else(|| ChunkBuf::zeroed(CHUNK_SIZE as usize));
        let me = s.clone();
        s.sends
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .spawn(async move {
                let sent = Arc::new(buf);
                if let Err(e) = me.send(digest, sent.clone(), len).await {
                    tracing::warn!(upload = %me.upload(), error = %e.chain(), "chunk send failed");
                    me.failed
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .get_or_insert((e.kind(), e.chain()));
                }
                if let Ok(b) = Arc::try_unwrap(sent) {
                    me.pool.lock().unwrap_or_else(|p| p.into_inner()).push(b);
                }
                drop(permit);
            });
        // Reap finished sends so the set stays small.
        {
            let mut sends = s.sends.lock().unwrap_or_else(|p| p.into_inner());
            while sends.try_join_next().is_some() {}
        }
        (spare, Ok(PutOutcome::Stored))
    }

    async fn reuse(&self, chunks: Vec<(Digest, usize)>) -> Result<Vec<bool>> {
        // One question per digest; the finder batches them into FindMissingChunks calls.
        let s = &self.inner;
        let mut out = Vec::with_capacity(chunks.len());
        for group in chunks.chunks(4096) {
            let asked = group.iter().map(|(d, _)| s.finder.is_missing(*d));
            for (missing, (d, _)) in futures_util::future::join_all(asked)
                .await
                .into_iter()
                .zip(group)
            {
                let have = !missing?;
                if have {
                    s.known.lock().unwrap_or_else(|p| p.into_inner()).insert(*d);
                }
                out.push(have);
            }
        }
        Ok(out)
    }

    async fn flush(&self) -> Result<()> {
        let s = &self.inner;
        let n = s.target.cfg.chunks_in_flight as u32;
        let all = s.slots.acquire_many(n).await.map_err(|e| {
            Error::new(ErrorKind::Internal, "the upload's send slots closed").with_source(e)
        })?;
        drop(all);
        match s.failure() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    fn describe(&self) -> String {
        self.inner.target.describe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_are_stable_per_operation_and_uuid_shaped() {
        let a = UploadSpec::request_id("h1", "op-1", "p", "web", "");
        assert_eq!(a, UploadSpec::request_id("h1", "op-1", "p", "web", ""));
        assert_eq!(a.len(), 36);
        assert_eq!(a.matches('-').count(), 4);
        for other in [
            UploadSpec::request_id("h2", "op-1", "p", "web", ""),
            UploadSpec::request_id("h1", "op-2", "p", "web", ""),
            UploadSpec::request_id("h1", "op-1", "q", "web", ""),
            UploadSpec::request_id("h1", "op-1", "p", "web", "v2"),
            // Parts are length-prefixed: moving a character between them changes the id.
            UploadSpec::request_id("h1", "op-1", "pw", "eb", ""),
        ] {
            assert_ne!(a, other);
        }
    }
}
