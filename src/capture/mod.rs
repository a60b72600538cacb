//! The capture pipeline: one road for every byte.
//!
//! ```text
//! block source (extent map + reads) ──► chunker (4 MiB, zero detection, sha256) ──► sink
//! ```
//!
//! 0. The virtual size is checked against the configured maximum before anything is read.
//! 1. The extent map (`base:allocation`) is fetched first and turned into runs of chunk
//!    indices that touch data. Chunks outside them are zero and never visited, not even
//!    counted one by one: a disk that claims a petabyte with a few MiB of data costs what the
//!    data costs. Inside a data chunk, only the data extents are read (the rest is zeroed).
//! 2. `readers` workers, each with its own NBD connection and one 4 MiB buffer, take chunk
//!    indices from a shared cursor over those runs. Reading is async; hashing, the zero check
//!    and the store run on the blocking pool, so one worker reads while another hashes. Memory
//!    is `readers × 4 MiB` plus the data chunk list, whatever the virtual size.
//! 3. Each data chunk's index, sha256 and 64 KiB-cluster allocation mask go into the manifest
//!    (chunks that read as all zeros are left out); the chunk store ([`ChunkStore`]: the local
//!    repository, or an upload to a central `imagerepo`) keeps the chunks it does not have.
//!    The pipeline ends with the store's flush: every chunk it accepted is stored by then.
//!
//! Cancellation is checked before every chunk, so a cancel stops the read within one chunk.
//!
//! **Incremental reads.** Given a [`Base`] (the previous image of the same disk, captured at
//! the checkpoint a live backup job counts its changes from) and a source that has a map of
//! the blocks written since ([`BlockSource::changed_map`], QEMU's dirty bitmap), only the
//! chunks touched by a written block are read. Every other data chunk is the base's: the store
//! is asked to keep it ([`ChunkStore::reuse`]); one the store no longer has is read like a
//! changed one (the backup export shows the whole disk, so any chunk can be read). Whatever
//! stops an incremental read (another virtual size, no map) makes it a full read, and
//! [`Captured::full_reason`] says why.

pub mod file;
pub mod inspect;
pub mod live;
pub mod source;
pub mod stream;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use sha2::{Digest as _, Sha256};

use crate::error::{Error, ErrorKind, Result};
use crate::nbd::Extent;
use crate::progress::{CancelToken, Progress};
use crate::repo::manifest::{chunk_len, cluster_mask, DataChunk, Digest, CHUNK_SIZE};
use crate::repo::{ChunkBuf, ChunkStore, PutOutcome};
use source::{BlockSource, DiskReader};

/// What the pipeline produced: the data chunks of the image, ascending by index.
#[derive(Debug)]
pub struct Captured {
    pub virtual_size: u64,
    pub chunks: Vec<DataChunk>,
    pub data_bytes: u64,
    /// An incremental read: the guest bytes the changed map marked written.
    pub changed_bytes: Option<u64>,
    /// A [`Base`] was given but the whole disk was read: why.
    pub full_reason: Option<String>,
}

/// What an incremental read builds on: the previous image of the same disk, as it was at the
/// checkpoint the source's changed map counts from.
#[derive(Debug, Clone)]
pub struct Base {
    pub virtual_size: u64,
    /// Its data chunks, ascending by index.
    pub chunks: Vec<DataChunk>,
}

/// The plan of an incremental read.
struct Incremental {
    /// Chunk runs to read: changed data chunks, and base chunks the store lacks.
    to_read: Vec<std::ops::Range<u64>>,
    /// Base chunks taken as they are (the store keeps them for this image).
    reused: Vec<DataChunk>,
    changed_bytes: u64,
}

/// Opens a reader of `export`, refuses the disk when larger than `max_virtual_size`, and reads
/// its allocation map: the reader, the virtual size and the extents.
pub(crate) async fn open_mapped(
    export: &dyn BlockSource,
    max_virtual_size: u64,
) -> Result<(Box<dyn DiskReader>, u64, Vec<Extent>)> {
    let mut r = export.reader().await?;
    let size = r.size();
    if let Err(e) = check_virtual_size(size, max_virtual_size, export.describe()) {
        r.close().await;
        return Err(e);
    }
    match r.allocation_map().await {
        Ok(extents) => Ok((r, size, extents)),
        Err(e) => {
            r.close().await;
            Err(e)
        }
    }
}

/// Refuses a disk larger than `max` bytes (the `[repository] max_virtual_size` setting)
/// before a byte of it is read.
pub fn check_virtual_size(size: u64, max: u64, what: &str) -> Result<()> {
    if size > max {
        return Err(Error::new(
            ErrorKind::InvalidArgument,
            format!(
                "{what} has a virtual size of {size} bytes ({}), above the limit of {max} bytes ({}); \
                 raise [repository] max_virtual_size in the daemon's config to accept it",
                crate::util::human_bytes(size),
                crate::util::human_bytes(max)
            ),
        ));
    }
    Ok(())
}

/// Reads every data byte of `export` once into `sink`, `readers` connections in parallel;
/// with a `base`, only what changed since it (see the module doc).
/// A disk larger than `max_virtual_size` is refused before anything is read.
#[allow(clippy::too_many_arguments)]
pub async fn run(
    export: &dyn BlockSource,
    readers: usize,
    max_virtual_size: u64,
    sink: Arc<dyn ChunkStore>,
    progress: Arc<Progress>,
    cancel: CancelToken,
    base: Option<&Base>,
) -> Result<Captured> {
    let (first, size, extents) = open_mapped(export, max_virtual_size).await?;
    progress.bytes_total.store(size, Ordering::Relaxed);
    let mut runs = data_chunk_runs(&extents);
    let mut reused = Vec::new();
    let (mut changed_bytes, mut full_reason) = (None, None);
    if let Some(base) = base {
        match incremental(export, size, &runs, base, sink.as_ref()).await {
            Ok(plan) => {
                runs = plan.to_read;
                reused = plan.reused;
                changed_bytes = Some(plan.changed_bytes);
            }
            Err(reason) => full_reason = Some(reason),
        }
    }
    let span =
        |r: &std::ops::Range<u64>| (r.end - r.start - 1) * CHUNK_SIZE + chunk_len(size, r.end - 1);
    let visited: u64 = runs.iter().map(span).sum();
    let kept: u64 = reused.iter().map(|c| chunk_len(size, c.index)).sum();
    // Every chunk outside the runs is zero or kept from the base: count it done now, without
    // visiting it.
    progress.bytes_existing.fetch_add(kept, Ordering::Relaxed);
    progress
        .bytes_zero
        .fetch_add(size - visited - kept, Ordering::Relaxed);
    progress
        .bytes_done
        .fetch_add(size - visited, Ordering::Relaxed);
    let extents: Arc<Vec<Extent>> = Arc::new(extents);
    let results: Arc<Mutex<Vec<DataChunk>>> = Arc::new(Mutex::new(reused));
    let next = Arc::new(Cursor::new(runs));
    let mut clients = vec![first];
    for _ in 1..readers.max(1) {
        match export.reader().await {
            Ok(r) => clients.push(r),
            Err(e) => {
                for c in clients {
                    c.close().await;
                }
                return Err(e);
            }
        }
    }
    let mut tasks = tokio::task::JoinSet::new();
    for client in clients {
        let w = Worker {
            client,
            size,
            extents: extents.clone(),
            next: next.clone(),
            results: results.clone(),
            sink: sink.clone(),
            progress: progress.clone(),
            cancel: cancel.clone(),
        };
        tasks.spawn(w.run());
    }
    let mut first_err: Option<Error> = None;
    while let Some(joined) = tasks.join_next().await {
        let res = joined.unwrap_or_else(|e| {
            Err(Error::new(ErrorKind::Internal, "capture worker panicked").with_source(e))
        });
        if let Err(e) = res {
            // Stop the other workers at their next chunk.
            next.stop();
            // Prefer a real failure over the "cancelled" of a sibling.
            if first_err
                .as_ref()
                .is_none_or(|f| f.kind() == ErrorKind::Cancelled)
            {
                first_err = Some(e);
            }
        }
    }
    if let Some(e) = first_err {
        return Err(e);
    }
    cancel.check()?;
    sink.flush().await?;
    let mut chunks = std::mem::take(&mut *results.lock().unwrap_or_else(|p| p.into_inner()));
    chunks.sort_unstable_by_key(|c| c.index);
    let data_bytes = chunks.iter().map(|c| chunk_len(size, c.index)).sum();
    Ok(Captured {
        virtual_size: size,
        chunks,
        data_bytes,
        changed_bytes,
        full_reason,
    })
}

/// Plans an incremental read of `export` (`size` bytes, data in chunk `runs`) on `base`; the
/// reason when it cannot be one.
async fn incremental(
    export: &dyn BlockSource,
    size: u64,
    runs: &[std::ops::Range<u64>],
    base: &Base,
    sink: &dyn ChunkStore,
) -> std::result::Result<Incremental, String> {
    if base.virtual_size != size {
        return Err(format!(
            "the disk's virtual size changed from {} to {} bytes since the previous capture",
            base.virtual_size, size
        ));
    }
    let changed = match export.changed_map().await {
        Ok(Some(m)) => m,
        Ok(None) => return Err("the source has no map of changed blocks".into()),
        Err(e) => {
            return Err(format!(
                "the map of changed blocks could not be read: {}",
                e.chain()
            ))
        }
    };
    let written: Vec<Extent> = changed
        .into_iter()
        .filter(|e| e.flags & crate::nbd::NBD_STATE_DIRTY != 0 && e.length > 0)
        .collect();
    let changed_bytes = written.iter().map(|e| e.length).sum();
    let dirty = chunk_runs(&written);
    let (mut keep, mut lost): (Vec<&DataChunk>, Vec<&DataChunk>) = (Vec::new(), Vec::new());
    let clean: Vec<&DataChunk> = base
        .chunks
        .iter()
        .filter(|c| !in_runs(&dirty, c.index))
        .collect();
    let asked = clean
        .iter()
        .map(|c| (c.digest, chunk_len(size, c.index) as usize))
        .collect();
    let have = sink.reuse(asked).await.map_err(|e| {
        format!(
            "{} could not tell which chunks it has: {}",
            sink.describe(),
            e.chain()
        )
    })?;
    for (c, have) in clean.into_iter().zip(have) {
        if have {
            keep.push(c);
        } else {
            lost.push(c);
        }
    }
    let mut to_read = intersect_runs(runs, &dirty);
    to_read.extend(lost.iter().map(|c| c.index..c.index + 1));
    to_read.sort_by_key(|r| r.start);
    let mut merged: Vec<std::ops::Range<u64>> = Vec::with_capacity(to_read.len());
    for r in to_read {
        match merged.last_mut() {
            Some(last) if last.end >= r.start => last.end = last.end.max(r.end),
            _ => merged.push(r),
        }
    }
    Ok(Incremental {
        to_read: merged,
        reused: keep.into_iter().cloned().collect(),
        changed_bytes,
    })
}

/// Whether chunk `i` lies in one of the sorted, disjoint `runs`.
fn in_runs(runs: &[std::ops::Range<u64>], i: u64) -> bool {
    let k = runs.partition_point(|r| r.end <= i);
    runs.get(k).is_some_and(|r| r.start <= i)
}

/// The chunk runs in both sorted, disjoint lists `a` and `b`.
fn intersect_runs(
    a: &[std::ops::Range<u64>],
    b: &[std::ops::Range<u64>],
) -> Vec<std::ops::Range<u64>> {
    let (mut i, mut j, mut out) = (0, 0, Vec::new());
    while i < a.len() && j < b.len() {
        let lo = a[i].start.max(b[j].start);
        let hi = a[i].end.min(b[j].end);
        if lo < hi {
            out.push(lo..hi);
        }
        if a[i].end < b[j].end {
            i += 1;
        } else {
            j += 1;
        }
    }
    out
}

/// Runs of chunk indices `[start, end)` that touch a data extent (not known zero), sorted and
/// coalesced: O(extents) entries, whatever the virtual size.
pub fn data_chunk_runs(extents: &[Extent]) -> Vec<std::ops::Range<u64>> {
    let data: Vec<Extent> = extents
        .iter()
        .filter(|e| e.flags & crate::nbd::NBD_STATE_ZERO == 0)
        .copied()
        .collect();
    chunk_runs(&data)
}

/// Runs of chunk indices `[start, end)` that `extents` (sorted) touch, coalesced.
fn chunk_runs(extents: &[Extent]) -> Vec<std::ops::Range<u64>> {
    let mut out: Vec<std::ops::Range<u64>> = Vec::new();
    for e in extents {
        if e.length == 0 {
            continue;
        }
        let r = e.offset / CHUNK_SIZE..(e.offset + e.length).div_ceil(CHUNK_SIZE);
        match out.last_mut() {
            Some(last) if last.end >= r.start => last.end = last.end.max(r.end),
            _ => out.push(r),
        }
    }
    out
}

/// The shared cursor the workers take chunk indices from: walks the data runs in order.
struct Cursor {
    state: Mutex<(usize, u64)>,
    runs: Vec<std::ops::Range<u64>>,
    stopped: AtomicBool,
}

impl Cursor {
    fn new(runs: Vec<std::ops::Range<u64>>) -> Cursor {
        let first = runs.first().map_or(0, |r| r.start);
        Cursor {
            state: Mutex::new((0, first)),
            runs,
            stopped: AtomicBool::new(false),
        }
    }

    /// The next chunk index to read, or None when all are taken (or the work stopped).
    fn take(&self) -> Option<u64> {
        if self.stopped.load(Ordering::SeqCst) {
            return None;
        }
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let (run, next) = &mut *st;
        while *run < self.runs.len() {
            let r = &self.runs[*run];
            if *next < r.end {
                let i = (*next).max(r.start);
                *next = i + 1;
                return Some(i);
            }
            *run += 1;
            if let Some(r) = self.runs.get(*run) {
                *next = r.start;
            }
        }
        None
    }

    /// Makes every worker stop at its next chunk.
    fn stop(&self) {
        self.stopped.store(true, Ordering::SeqCst);
    }
}

struct Worker {
    client: Box<dyn DiskReader>,
    size: u64,
    extents: Arc<Vec<Extent>>,
    next: Arc<Cursor>,
    results: Arc<Mutex<Vec<DataChunk>>>,
    sink: Arc<dyn ChunkStore>,
    progress: Arc<Progress>,
    cancel: CancelToken,
}

/// What hashing and storing one chunk gave: its buffer back, and the entry (None: all zeros).
type Hashed = (ChunkBuf, Result<Option<(Digest, u64, PutOutcome)>>);

impl Worker {
    /// Reads chunk after chunk; while one chunk is hashed (on the blocking pool) and handed
    /// to the store, the next one is already being read (two buffers per worker), so the NBD
    /// server, the CPU and the store all stay busy.
    async fn run(mut self) -> Result<()> {
        let mut pending = None;
        let res = self.work(&mut pending).await;
        // A chunk still being stored must land before the caller cleans up after an error.
        if let Some((_, _, handle)) = pending.take() {
            let _ = handle.await;
        }
        self.client.close().await;
        res
    }

    async fn work(
        &mut self,
        pending: &mut Option<(usize, u64, tokio::task::JoinHandle<Hashed>)>,
    ) -> Result<()> {
        let mut free = ChunkBuf::zeroed(CHUNK_SIZE as usize);
        let mut spare = Some(ChunkBuf::zeroed(CHUNK_SIZE as usize));
        loop {
            self.cancel.check()?;
            let next = self.next_data_chunk();
            if let Some((i, len, ref ranges)) = next {
                free = self
                    .read_chunk(i, len, ranges, std::mem::take(&mut free))
                    .await?;
            }
            if let Some((pi, plen, handle)) = pending.take() {
                let (buf, outcome) = handle.await.map_err(|e| {
                    Error::new(ErrorKind::Internal, "hashing task failed").with_source(e)
                })?;
                spare = Some(buf);
                self.record(pi, plen, outcome?);
            }
            let Some((i, len, _)) = next else { break };
            let sink = self.sink.clone();
            let owned = std::mem::replace(
                &mut free,
                spare
                    .take()
                    .unwrap_or_else(|| ChunkBuf::zeroed(CHUNK_SIZE as usize)),
            );
            let handle = tokio::spawn(async move {
                let hashed = tokio::task::spawn_blocking(move || {
                    let data = &owned[..len as usize];
                    let mask = cluster_mask(data);
                    let digest = (mask != 0).then(|| -> Digest { Sha256::digest(data).into() });
                    (owned, digest.map(|d| (d, mask)))
                })
                .await;
                let (owned, hashed) = match hashed {
                    Ok(h) => h,
                    Err(e) => {
                        let e =
                            Error::new(ErrorKind::Internal, "hashing task failed").with_source(e);
                        return (ChunkBuf::zeroed(CHUNK_SIZE as usize), Err(e));
                    }
                };
                let Some((digest, mask)) = hashed else {
                    return (owned, Ok(None));
                };
                let (buf, res) = sink.put(digest, owned, len as usize).await;
                (buf, res.map(|o| Some((digest, mask, o))))
            });
            *pending = Some((i, len, handle));
        }
        Ok(())
    }

    /// Takes chunk indices until one holds data, recording the zero ones on the way.
    fn next_data_chunk(&mut self) -> Option<(usize, u64, Vec<std::ops::Range<u64>>)> {
        loop {
            let i = self.next.take()? as usize;
            let start = i as u64 * CHUNK_SIZE;
            let len = chunk_len(self.size, i as u64);
            let ranges = data_ranges(&self.extents, start, len);
            if !ranges.is_empty() {
                return Some((i, len, ranges));
            }
            self.progress.bytes_zero.fetch_add(len, Ordering::Relaxed);
            self.progress.bytes_done.fetch_add(len, Ordering::Relaxed);
        }
    }

    /// Reads the data ranges of chunk `i` into `buf`, zeroing the rest; returns the buffer.
    async fn read_chunk(
        &mut self,
        i: usize,
        len: u64,
        ranges: &[std::ops::Range<u64>],
        mut buf: ChunkBuf,
    ) -> Result<ChunkBuf> {
        let start = i as u64 * CHUNK_SIZE;
        let mut read = 0;
        // Only the bytes no range covers are zeroed (the buffer holds the previous chunk).
        let mut zeroed_to = 0;
        for r in ranges {
            let lo = (r.start - start) as usize;
            let hi = (r.end - start) as usize;
            buf[zeroed_to..lo].fill(0);
            zeroed_to = hi;
            let (back, res) = self.client.read(r.start, buf, lo..hi).await;
            buf = back;
            res?;
            read += r.end - r.start;
        }
        buf[zeroed_to..len as usize].fill(0);
        self.progress.bytes_read.fetch_add(read, Ordering::Relaxed);
        Ok(buf)
    }

    /// Counts a hashed chunk and puts its entry in the manifest.
    fn record(&self, i: usize, len: u64, outcome: Option<(Digest, u64, PutOutcome)>) {
        let p = &self.progress;
        match outcome {
            None => {
                p.bytes_zero.fetch_add(len, Ordering::Relaxed);
            }
            Some((digest, mask, o)) => {
                let counter = match o {
                    PutOutcome::Stored => &p.bytes_new,
                    PutOutcome::Existing => &p.bytes_existing,
                };
                counter.fetch_add(len, Ordering::Relaxed);
                self.results
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(DataChunk {
                        index: i as u64,
                        digest,
                        mask,
                    });
            }
        }
        p.bytes_done.fetch_add(len, Ordering::Relaxed);
    }
}

/// The byte ranges of `[start, start+len)` that are not known zeros, coalesced.
/// `extents` is sorted and covers the disk.
pub fn data_ranges(extents: &[Extent], start: u64, len: u64) -> Vec<std::ops::Range<u64>> {
    let end = start + len;
    let first = extents.partition_point(|e| e.offset + e.length <= start);
    let mut out: Vec<std::ops::Range<u64>> = Vec::new();
    for e in &extents[first..] {
        if e.offset >= end {
            break;
        }
        if e.flags & crate::nbd::NBD_STATE_ZERO != 0 {
            continue;
        }
        let r = e.offset.max(start)..(e.offset + e.length).min(end);
        match out.last_mut() {
            Some(last) if last.end == r.start => last.end = r.end,
            _ => out.push(r),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A disk in memory: every chunk data, `changed` the dirty extents of an incremental job.
    struct MemDisk {
        data: Vec<u8>,
        changed: Option<Vec<Extent>>,
    }

    struct MemReader(Arc<Vec<u8>>);

    #[tonic::async_trait]
    impl BlockSource for MemDisk {
        async fn reader(&self) -> Result<Box<dyn DiskReader>> {
            Ok(Box::new(MemReader(Arc::new(self.data.clone()))))
        }
        fn describe(&self) -> &str {
            "memory disk"
        }
        async fn changed_map(&self) -> Result<Option<Vec<Extent>>> {
            Ok(self.changed.clone())
        }
    }

    #[tonic::async_trait]
    impl DiskReader for MemReader {
        fn size(&self) -> u64 {
            self.0.len() as u64
        }
        async fn allocation_map(&mut self) -> Result<Vec<Extent>> {
            Ok(vec![Extent::new(0, self.0.len() as u64, 0)])
        }
        async fn read(
            &mut self,
            offset: u64,
            mut buf: ChunkBuf,
            at: std::ops::Range<usize>,
        ) -> (ChunkBuf, Result<()>) {
            let o = offset as usize;
            let n = at.len();
            buf[at].copy_from_slice(&self.0[o..o + n]);
            (buf, Ok(()))
        }
        async fn close(self: Box<Self>) {}
    }

    /// Chunks by digest; `forget` drops some, as a store whose chunks were collected.
    #[derive(Default)]
    struct MemStore(Mutex<std::collections::HashMap<Digest, Vec<u8>>>);

    #[tonic::async_trait]
    impl ChunkStore for MemStore {
        async fn put(
            &self,
            digest: Digest,
            buf: ChunkBuf,
            len: usize,
        ) -> (ChunkBuf, Result<PutOutcome>) {
            let mut m = self.0.lock().unwrap();
            let o = if m.insert(digest, buf[..len].to_vec()).is_some() {
                PutOutcome::Existing
            } else {
                PutOutcome::Stored
            };
            (buf, Ok(o))
        }
        async fn reuse(&self, chunks: Vec<(Digest, usize)>) -> Result<Vec<bool>> {
            let m = self.0.lock().unwrap();
            Ok(chunks.iter().map(|(d, _)| m.contains_key(d)).collect())
        }
        async fn flush(&self) -> Result<()> {
            Ok(())
        }
        fn describe(&self) -> String {
            "memory".into()
        }
    }

    async fn capture(disk: &MemDisk, store: Arc<MemStore>, base: Option<&Base>) -> (Captured, u64) {
        let progress = Arc::new(Progress::default());
        let c = run(
            disk,
            2,
            u64::MAX,
            store,
            progress.clone(),
            CancelToken::default(),
            base,
        )
        .await
        .unwrap();
        let p = &progress;
        let done = p.bytes_done.load(Ordering::Relaxed);
        assert_eq!(done, c.virtual_size, "every byte is counted done once");
        (c, p.bytes_read.load(Ordering::Relaxed))
    }

    #[tokio::test]
    async fn an_incremental_read_reads_changed_chunks_and_equals_a_full_read() {
        let c = CHUNK_SIZE as usize;
        // 10 chunks of distinct bytes, the last one short; chunk 5 all zeros.
        let mut a: Vec<u8> = (0..10 * c - 4096)
            .map(|i| (i / 4093 % 251) as u8 + 1)
            .collect();
        a[5 * c..6 * c].fill(0);
        let store = Arc::new(MemStore::default());
        let (first, _) = capture(
            &MemDisk {
                data: a.clone(),
                changed: None,
            },
            store.clone(),
            None,
        )
        .await;
        assert_eq!(first.chunks.len(), 9);
        let base = Base {
            virtual_size: first.virtual_size,
            chunks: first.chunks.clone(),
        };

        // Written since: 100 bytes in chunk 2, chunk 5 (zero before), and across chunks 8-9.
        let mut b = a.clone();
        b[2 * c + 7..2 * c + 107].fill(0xee);
        b[5 * c + 64..5 * c + 128].fill(0xdd);
        b[9 * c - 10..9 * c + 10].fill(0xcc);
        let changed = vec![
            Extent::new(0, 2 * CHUNK_SIZE, 0),
            Extent::new(2 * CHUNK_SIZE, 65536, 1),
            Extent::new(2 * CHUNK_SIZE + 65536, 3 * CHUNK_SIZE - 65536, 0),
            Extent::new(5 * CHUNK_SIZE, 65536, 1),
            Extent::new(5 * CHUNK_SIZE + 65536, 3 * CHUNK_SIZE - 2 * 65536, 0),
            Extent::new(9 * CHUNK_SIZE - 65536, 2 * 65536, 1),
            Extent::new(9 * CHUNK_SIZE + 65536, CHUNK_SIZE - 4096 - 65536, 0),
        ];
        let disk = MemDisk {
            data: b.clone(),
            changed: Some(changed.clone()),
        };
        let (inc, read) = capture(&disk, store.clone(), Some(&base)).await;
        assert_eq!(inc.full_reason, None);
        assert_eq!(inc.changed_bytes, Some(4 * 65536));
        let expect_read = 3 * CHUNK_SIZE + (CHUNK_SIZE - 4096);
        assert_eq!(read, expect_read, "chunks 2, 5, 8 and 9 are read");
        let (full, _) = capture(
            &MemDisk {
                data: b.clone(),
                changed: None,
            },
            Arc::new(MemStore::default()),
            None,
        )
        .await;
        assert_eq!(inc.chunks, full.chunks, "the same image as a full read");

        // A store that lost an unchanged chunk gets it read again.
        let lost = base.chunks.iter().find(|x| x.index == 0).unwrap().digest;
        store.0.lock().unwrap().remove(&lost);
        let (again, read) = capture(&disk, store.clone(), Some(&base)).await;
        assert_eq!(read, expect_read + CHUNK_SIZE, "chunk 0 is read again");
        assert_eq!(again.chunks, full.chunks);
        assert!(
            store.0.lock().unwrap().contains_key(&lost),
            "and stored again"
        );

        // Another virtual size: a full read that says why.
        let mut grown = b.clone();
        grown.extend(std::iter::repeat_n(1u8, c));
        let (g, read) = capture(
            &MemDisk {
                data: grown.clone(),
                changed: Some(changed),
            },
            store.clone(),
            Some(&base),
        )
        .await;
        assert!(g.full_reason.unwrap().contains("virtual size changed"));
        assert_eq!(read, grown.len() as u64);
        assert_eq!(g.changed_bytes, None);

        // No map of changed blocks: a full read too.
        let (n, _) = capture(
            &MemDisk {
                data: b,
                changed: None,
            },
            store,
            Some(&base),
        )
        .await;
        assert!(n.full_reason.unwrap().contains("no map of changed blocks"));
        assert_eq!(n.chunks, full.chunks);
    }

    #[test]
    fn run_sets_intersect_and_contain() {
        assert_eq!(
            intersect_runs(&[0..5, 8..12], &[3..9, 11..20]),
            vec![3..5, 8..9, 11..12]
        );
        assert!(intersect_runs(&[0..2, 5..6], &[2..4, 6..7]).is_empty());
        let runs = vec![2..4, 9..10];
        assert!(!in_runs(&runs, 1) && in_runs(&runs, 2) && in_runs(&runs, 3));
        assert!(!in_runs(&runs, 4) && in_runs(&runs, 9) && !in_runs(&runs, 10));
    }

    #[test]
    fn ranges_skip_zero_extents() {
        let m = 1 << 20;
        let ex = vec![
            Extent::new(0, m, 0),
            Extent::new(m, 2 * m, 3),
            Extent::new(3 * m, 2 * m, 0),
            Extent::new(5 * m, 4 * m, 2),
        ];
        assert_eq!(data_ranges(&ex, 0, 4 * m), vec![0..m, 3 * m..4 * m]);
        assert_eq!(data_ranges(&ex, 4 * m, 4 * m), vec![4 * m..5 * m]);
        assert!(data_ranges(&ex, 5 * m, 4 * m).is_empty());
        // A hole that is not zero (HOLE without ZERO) must still be read.
        let ex2 = vec![Extent::new(0, m, 1), Extent::new(m, m, 0)];
        assert_eq!(data_ranges(&ex2, 0, 2 * m), vec![0..2 * m]);
    }

    #[test]
    fn runs_and_cursor_visit_only_data_chunks() {
        let c = CHUNK_SIZE;
        let pib = 1u64 << 50;
        // A petabyte disk with data in chunk 0, chunks 5-6 (across a boundary) and the last.
        let ex = vec![
            Extent::new(0, 4096, 0),
            Extent::new(4096, 5 * c - 4096 + 100, 3),
            Extent::new(5 * c + 100, c, 0),
            Extent::new(6 * c + 100, pib - 6 * c - 100 - 512, 3),
            Extent::new(pib - 512, 512, 0),
        ];
        let runs = data_chunk_runs(&ex);
        let last = pib / c - 1;
        assert_eq!(runs, vec![0..1, 5..7, last..last + 1]);
        let cur = Cursor::new(runs);
        let got: Vec<u64> = std::iter::from_fn(|| cur.take()).collect();
        assert_eq!(got, vec![0, 5, 6, last]);
        let cur = Cursor::new(vec![0..5, 7..10]);
        assert_eq!(cur.take(), Some(0));
        cur.stop();
        assert_eq!(cur.take(), None);
    }
}
