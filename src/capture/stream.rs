//! A disk as one byte stream, qcow2 or raw, produced on the fly for targets that take a single
//! object (Glance, S3, a local file): no temp file, no seeking, memory bounded.
//!
//! The extent map is fetched first. For **qcow2**, the clusters that hold data are known before
//! the first byte, so [`Qcow2Layout`] writes header, L1, refcount and L2 tables up front and the
//! data clusters follow in guest order; holes stay unallocated. For **raw**, zero extents become
//! zeros from a static buffer (a byte stream cannot be sparse) and only data extents are read.
//! Either way the exact length is known before the first byte ([`StreamPlan::size`]).
//!
//! Reads go over `readers` NBD connections with up to `readers` segments (≤ 4 MiB each) in
//! flight, delivered in order through a bounded channel: memory is about
//! `2 × readers × 4 MiB` plus what the consumer holds (an S3 upload, its parts in flight),
//! whatever the disk size. Dropping the stream stops the producer. A segment's buffer goes
//! back to the stream's [`BufPool`] once the consumer drops the last `Bytes` of it, so a stream
//! reuses the same few buffers instead of faulting in fresh pages for every 4 MiB.

use std::ops::Range;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::stream::{FuturesOrdered, StreamExt};
use tokio::sync::{mpsc, Mutex};

use super::source::{BlockSource, DiskReader};
use super::{CancelToken, Progress};
use crate::error::{Error, ErrorKind, Result};
use crate::format::qcow2::{clusters_covering, Qcow2Layout};
use crate::format::Format;
use crate::nbd::{Extent, NBD_STATE_ZERO};
use crate::repo::ChunkBuf;

pub use crate::format::ByteStream;

/// Largest read per segment.
const SEGMENT: u64 = 4 << 20;
static ZEROS: [u8; 1 << 20] = [0; 1 << 20];

/// What the stream of one disk will be: format, exact size, the extent map.
pub struct StreamPlan {
    pub format: Format,
    pub virtual_size: u64,
    /// Exact length of the stream in bytes.
    pub size: u64,
    /// Guest bytes that hold data (what will be read).
    pub data_bytes: u64,
    extents: Vec<Extent>,
    layout: Option<Qcow2Layout>,
}

enum Segment {
    Bytes(Bytes),
    Zeros(u64),
    Read { offset: u64, len: u64, pad: u64 },
}

impl StreamPlan {
    /// Fetches the extent map of `export` and lays out the stream. A disk larger than
    /// `max_virtual_size` is refused before its map is read.
    pub async fn new(
        export: &dyn BlockSource,
        format: Format,
        max_virtual_size: u64,
    ) -> Result<StreamPlan> {
        let (c, virtual_size, extents) = super::open_mapped(export, max_virtual_size).await?;
        c.close().await;
        Self::from_extents(virtual_size, extents, format)
    }

    /// Lays out the stream from an extent map (pure; unit-tested).
    pub fn from_extents(
        virtual_size: u64,
        extents: Vec<Extent>,
        format: Format,
    ) -> Result<StreamPlan> {
        let data: Vec<Range<u64>> = extents
            .iter()
            .filter(|e| e.flags & NBD_STATE_ZERO == 0)
            .map(|e| e.offset..e.offset + e.length)
            .collect();
        let data_bytes = data.iter().map(|r| r.end - r.start).sum();
        let (size, layout) = match format {
            Format::Raw => (virtual_size, None),
            Format::Qcow2 => {
                let layout =
                    Qcow2Layout::new(virtual_size, clusters_covering(data)).map_err(|e| {
                        Error::new(
                            ErrorKind::FailedPrecondition,
                            "cannot lay out a qcow2 for this disk",
                        )
                        .with_source(e)
                    })?;
                (layout.total_size(), Some(layout))
            }
        };
        Ok(StreamPlan {
            format,
            virtual_size,
            size,
            data_bytes,
            extents,
            layout,
        })
    }

    /// Every segment of the stream, in order (small: O(extents) entries at a time).
    fn segments(&self) -> Box<dyn Iterator<Item = Segment> + Send + '_> {
        match &self.layout {
            Some(layout) => {
                let meta = layout.metadata().map(|p| Segment::Bytes(Bytes::from(p)));
                let vs = self.virtual_size;
                let data = layout.allocated_ranges().iter().flat_map(move |r| {
                    let start = r.start * Qcow2Layout::CLUSTER_SIZE;
                    let end = r.end * Qcow2Layout::CLUSTER_SIZE;
                    split(start, end, SEGMENT).map(move |(off, len)| {
                        let real = len.min(vs.saturating_sub(off));
                        Segment::Read {
                            offset: off,
                            len: real,
                            pad: len - real,
                        }
                    })
                });
                Box::new(meta.chain(data))
            }
            None => Box::new(self.extents.iter().flat_map(|e| {
                let zero = e.flags & NBD_STATE_ZERO != 0;
                let step = if zero { ZEROS.len() as u64 } else { SEGMENT };
                split(e.offset, e.offset + e.length, step).map(move |(off, len)| {
                    if zero {
                        Segment::Zeros(len)
                    } else {
                        Segment::Read {
                            offset: off,
                            len,
                            pad: 0,
                        }
                    }
                })
            })),
        }
    }
}

fn split(start: u64, end: u64, step: u64) -> impl Iterator<Item = (u64, u64)> {
    (start..end)
        .step_by(step as usize)
        .map(move |o| (o, step.min(end - o)))
}

/// Starts producing the stream of `plan` from `export`. The producer runs on a task and stops
/// when the stream is dropped, cancelled, or fails (the error is the last item).
pub fn byte_stream(
    plan: Arc<StreamPlan>,
    export: Arc<dyn BlockSource>,
    readers: usize,
    progress: Arc<Progress>,
    cancel: CancelToken,
) -> ByteStream {
    let (tx, rx) = mpsc::channel::<Result<Bytes>>(readers.max(1) * 2);
    tokio::spawn(async move {
        if let Err(e) = produce(
            &plan,
            export.as_ref(),
            readers.max(1),
            &progress,
            &cancel,
            &tx,
        )
        .await
        {
            let _ = tx.send(Err(e)).await;
        }
    });
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}

async fn produce(
    plan: &StreamPlan,
    export: &dyn BlockSource,
    readers: usize,
    progress: &Progress,
    cancel: &CancelToken,
    tx: &mpsc::Sender<Result<Bytes>>,
) -> Result<()> {
    progress
        .bytes_total
        .store(plan.virtual_size, Ordering::Relaxed);
    let (pool_tx, pool_rx) = mpsc::channel::<Box<dyn DiskReader>>(readers);
    for _ in 0..readers {
        let c = export.reader().await?;
        let _ = pool_tx.send(c).await;
    }
    let pool = Arc::new((pool_tx, Mutex::new(pool_rx)));
    let bufs = Arc::new(BufPool::default());
    let mut inflight = FuturesOrdered::new();
    let mut segments = plan.segments();
    let mut done = false;
    loop {
        while !done && inflight.len() < readers {
            match segments.next() {
                Some(seg) => inflight.push_back(fetch(seg, pool.clone(), bufs.clone())),
                None => done = true,
            }
        }
        let Some(res) = inflight.next().await else {
            break;
        };
        cancel.check()?;
        let (bytes, guest, read) = res?;
        progress.bytes_done.fetch_add(guest, Ordering::Relaxed);
        if read {
            progress.bytes_read.fetch_add(guest, Ordering::Relaxed);
        } else {
            progress.bytes_zero.fetch_add(guest, Ordering::Relaxed);
        }
        if tx.send(Ok(bytes)).await.is_err() {
            return Ok(()); // the consumer went away
        }
    }
    // Holes skipped by the qcow2 layout count as done too.
    let total = plan.virtual_size;
    let seen = progress.bytes_done.load(Ordering::Relaxed);
    if seen < total {
        progress
            .bytes_zero
            .fetch_add(total - seen, Ordering::Relaxed);
        progress.bytes_done.store(total, Ordering::Relaxed);
    }
    let mut rx = pool.1.lock().await;
    while let Ok(c) = rx.try_recv() {
        c.close().await;
    }
    Ok(())
}

/// The segment buffers of one stream, each `SEGMENT` bytes, given back by [`Pooled`] on drop.
/// It holds at most as many as were ever in use at once, and goes with the stream.
#[derive(Default)]
struct BufPool(std::sync::Mutex<Vec<ChunkBuf>>);

impl BufPool {
    fn take(&self) -> ChunkBuf {
        let reused = self.0.lock().unwrap_or_else(|p| p.into_inner()).pop();
        reused.unwrap_or_else(|| ChunkBuf::zeroed(SEGMENT as usize))
    }
}

/// The first `len` bytes of a pooled buffer, as the owner of a segment's `Bytes`.
struct Pooled {
    buf: ChunkBuf,
    len: usize,
    pool: Arc<BufPool>,
}

impl AsRef<[u8]> for Pooled {
    fn as_ref(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        let buf = std::mem::take(&mut self.buf);
        self.pool
            .0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(buf);
    }
}

type Pool = Arc<(
    mpsc::Sender<Box<dyn DiskReader>>,
    Mutex<mpsc::Receiver<Box<dyn DiskReader>>>,
)>;

/// One segment's bytes, plus the guest bytes it covers and whether they were read.
async fn fetch(seg: Segment, pool: Pool, bufs: Arc<BufPool>) -> Result<(Bytes, u64, bool)> {
    match seg {
        Segment::Bytes(b) => Ok((b, 0, false)),
        Segment::Zeros(n) => Ok((Bytes::from_static(&ZEROS[..n as usize]), n, false)),
        Segment::Read { offset, len, pad } => {
            let mut client = {
                let mut rx = pool.1.lock().await;
                rx.recv()
                    .await
                    .ok_or_else(|| Error::new(ErrorKind::Internal, "NBD connection pool closed"))?
            };
            let (len_u, total) = (len as usize, (len + pad) as usize);
            let mut buf = bufs.take();
            // A reused buffer holds an earlier segment: the padding must read as zeros.
            buf[len_u..total].fill(0);
            let (buf, res) = client.read(offset, buf, 0..len_u).await;
            let _ = pool.0.send(client).await;
            let owner = Pooled {
                buf,
                len: total,
                pool: bufs,
            };
            res?;
            Ok((Bytes::from_owner(owner), len, true))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Streams `path` (raw) as `format`; `hold` keeps every piece until the end (no buffer is
    /// reused), else each is dropped at once (the next segments reuse its buffer).
    async fn stream_file(path: &std::path::Path, format: Format, hold: bool) -> Vec<u8> {
        let src: Arc<dyn BlockSource> =
            Arc::new(crate::capture::file::RawFile::open(path).unwrap());
        let plan = Arc::new(
            StreamPlan::new(src.as_ref(), format, u64::MAX)
                .await
                .unwrap(),
        );
        let mut stream = byte_stream(
            plan.clone(),
            src,
            2,
            Arc::new(Progress::default()),
            CancelToken::default(),
        );
        let (mut out, mut held) = (Vec::new(), Vec::new());
        while let Some(piece) = stream.next().await {
            let piece = piece.unwrap();
            out.extend_from_slice(&piece);
            if hold {
                held.push(piece);
            }
        }
        assert_eq!(out.len() as u64, plan.size);
        out
    }

    /// Segment buffers are reused once the consumer drops them: the bytes are the same as
    /// with none reused, and a reused buffer's tail (the padding of a short last cluster) reads
    /// as zeros, not as the earlier segment.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reused_segment_buffers_give_the_same_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.raw");
        let m = 1usize << 20;
        // Data, a hole, data up to an end that is not cluster-aligned.
        // (More segments than the stream holds at once, so the last ones reuse buffers.)
        let size = 53 * m + 4096 + 512;
        let f = std::fs::File::create(&path).unwrap();
        f.set_len(size as u64).unwrap();
        use std::os::unix::fs::FileExt;
        let pattern = |n: usize, seed: u8| -> Vec<u8> {
            (0..n).map(|i| (i as u8).wrapping_mul(31) ^ seed).collect()
        };
        f.write_all_at(&pattern(9 * m, 0x5a), 0).unwrap();
        f.write_all_at(&pattern(40 * m + 4096 + 512, 0xc3), (13 * m) as u64)
            .unwrap();
        drop(f);
        let want = std::fs::read(&path).unwrap();
        let raw = stream_file(&path, Format::Raw, false).await;
        assert!(raw == want, "the raw stream differs from the file");
        let held = stream_file(&path, Format::Qcow2, true).await;
        let reused = stream_file(&path, Format::Qcow2, false).await;
        assert!(held == reused, "reused buffers changed the qcow2 stream");
    }

    #[test]
    fn raw_plan_covers_every_byte() {
        let m = 1 << 20;
        let p = StreamPlan::from_extents(
            10 * m,
            vec![Extent::new(0, 3 * m, 0), Extent::new(3 * m, 7 * m, 3)],
            Format::Raw,
        )
        .unwrap();
        assert_eq!(p.size, 10 * m);
        assert_eq!(p.data_bytes, 3 * m);
        let mut total = 0;
        for s in p.segments() {
            total += match s {
                Segment::Bytes(b) => b.len() as u64,
                Segment::Zeros(n) => n,
                Segment::Read { len, pad, .. } => len + pad,
            };
        }
        assert_eq!(total, p.size);
    }

    #[test]
    fn qcow2_plan_reads_only_data_clusters() {
        let m = 1 << 20;
        let v = 100 * m + 512;
        let p = StreamPlan::from_extents(
            v,
            vec![
                Extent::new(0, m, 0),
                Extent::new(m, 99 * m, 3),
                Extent::new(100 * m, 512, 0),
            ],
            Format::Qcow2,
        )
        .unwrap();
        let mut total = 0;
        let mut read = 0;
        for s in p.segments() {
            match s {
                Segment::Bytes(b) => total += b.len() as u64,
                Segment::Zeros(_) => panic!("a qcow2 stream has no zero runs"),
                Segment::Read { len, pad, .. } => {
                    total += len + pad;
                    read += len;
                }
            }
        }
        assert_eq!(total, p.size);
        assert_eq!(read, m + 512);
    }
}
