//! One-pass streaming qcow2 (version 3) encoder.
//!
//! A qcow2 image is written here as a plain forward byte stream: to a file, an HTTP upload or an
//! S3 multipart upload, with no temporary file and no seeking. That is possible because the set of
//! allocated guest clusters (the extent map) is known before the first byte: every table can be
//! laid out up front, and the data clusters follow in guest order.
//!
//! What lives here:
//!
//! - [`Qcow2Layout`]: validates the input (virtual size, allocated guest cluster ranges) and
//!   computes where everything goes; its [`metadata`](Qcow2Layout::metadata) iterator produces the
//!   metadata region in bounded pieces, generating each table cluster only when it is reached.
//! - [`write_qcow2`]: the convenience that writes the whole stream to a [`Write`].
//! - [`clusters_covering`]: turns byte extents (from a block status map) into cluster ranges.
//!
//! # Layout
//!
//! Cluster size is fixed at 64 KiB (`cluster_bits` 16) and refcounts are 16 bits wide
//! (`refcount_order` 4). The host file is a run of clusters, every one of them used exactly once,
//! so every refcount is 1 and nothing leaks:
//!
//! ```text
//! cluster 0                  header (104 bytes, then the header extension end marker)
//! L1 table                   ceil(l1_size * 8 / 64 KiB) clusters, l1_size = ceil(size / 512 MiB)
//! refcount table             enough clusters to point at every refcount block
//! refcount blocks            32768 refcounts each, covering every cluster of the file, themselves too
//! L2 tables                  one per L1 entry that maps at least one allocated cluster, in L1 order
//! data clusters              one per allocated guest cluster, in ascending guest order
//! ```
//!
//! After the metadata ([`Qcow2Layout::data_offset`] bytes) come the data clusters, each exactly
//! 64 KiB, the last one zero-padded past the virtual size; [`Qcow2Layout::total_size`] is known
//! before the first byte. The virtual size must be whole 512-byte sectors, as QEMU reads it so.
//!
//! L1 and L2 entries carry the `COPIED` flag (bit 63), since every refcount is exactly 1.
//! Unallocated guest clusters have a zero L2 entry (or sit under a zero L1 entry) and read as
//! zeros, as there is no backing file.
//!
//! The refcount blocks must count themselves and the refcount table, which in turn depends on the
//! number of refcount blocks; the sizes are found by iterating to the least fixed point.
//!
//! Memory is O(number of allocated ranges): the layout keeps the ranges, a running count of data
//! clusters per range and the runs of L1 indices that own an L2 table. Any metadata cluster can be
//! computed on its own from those, in O(log ranges) plus the cluster's bytes, so the metadata
//! stream never holds more than one piece (at most 1 MiB) at a time, whatever the image size.

use std::io::{self, Write};
use std::iter::FusedIterator;
use std::ops::Range;

/// log2 of the cluster size.
pub const CLUSTER_BITS: u32 = 16;
const CLUSTER: u64 = 1 << CLUSTER_BITS;
const CLUSTER_USIZE: usize = 1 << CLUSTER_BITS;
/// Entries in one L2 table (8-byte entries in one cluster).
const L2_ENTRIES: u64 = CLUSTER / 8;
/// Entries in one L1 or refcount table cluster (8-byte entries).
const TABLE_ENTRIES_PER_CLUSTER: u64 = CLUSTER / 8;
/// Refcounts in one refcount block (16-bit entries, `refcount_order` 4).
const REFCOUNTS_PER_BLOCK: u64 = CLUSTER / 2;
/// QEMU's limit on the L1 table: 32 MiB (`QCOW_MAX_L1_SIZE`).
const MAX_L1_ENTRIES: u64 = (32 << 20) / 8;
/// QEMU's limit on the refcount table: 8 MiB (`QCOW_MAX_REFTABLE_SIZE`).
const MAX_REFTABLE_CLUSTERS: u64 = (8 << 20) / CLUSTER;
/// Metadata clusters per piece yielded by [`MetadataPieces`] (1 MiB).
const PIECE_CLUSTERS: u64 = 16;
/// Sector size: QEMU reads qcow2 sizes in whole 512-byte sectors.
const SECTOR: u64 = 512;

const QCOW2_MAGIC: u32 = 0x5146_49fb; // "QFI\xfb"
const QCOW2_VERSION: u32 = 3;
/// Length of the version 3 header without the optional compression type byte.
const HEADER_LENGTH: u32 = 104;
/// 16-bit refcounts.
const REFCOUNT_ORDER: u32 = 4;
/// L1/L2 entry flag: the cluster's refcount is exactly 1 (writable in place).
const OFLAG_COPIED: u64 = 1 << 63;

/// Why a [`Qcow2Layout`] cannot be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Qcow2Error {
    /// The virtual size is zero.
    #[error("qcow2 virtual size must be greater than zero")]
    ZeroVirtualSize,
    /// The virtual size is not a whole number of 512-byte sectors.
    #[error(
        "qcow2 virtual size {0} bytes is not a multiple of 512 (QEMU reads the size in whole sectors)"
    )]
    UnalignedVirtualSize(u64),
    /// The virtual size needs a larger L1 table than QEMU accepts.
    #[error(
        "qcow2 virtual size {size} bytes exceeds the limit of {max} bytes for 64 KiB clusters"
    )]
    VirtualSizeTooLarge {
        /// The requested size.
        size: u64,
        /// The largest size allowed.
        max: u64,
    },
    /// An allocated range holds no cluster.
    #[error("allocated cluster range #{index} ({start}..{end}) is empty")]
    EmptyRange {
        /// Position of the range in the input.
        index: usize,
        /// First cluster.
        start: u64,
        /// One past the last cluster.
        end: u64,
    },
    /// An allocated range starts before the previous one ends.
    #[error(
        "allocated cluster range #{index} ({start}..{end}) starts before the previous range ends \
         (at cluster {previous_end}): ranges must be sorted and must not overlap"
    )]
    UnsortedRange {
        /// Position of the range in the input.
        index: usize,
        /// First cluster.
        start: u64,
        /// One past the last cluster.
        end: u64,
        /// End of the previous range.
        previous_end: u64,
    },
    /// An allocated range reaches past the last guest cluster.
    #[error(
        "allocated cluster range #{index} ({start}..{end}) reaches past the end of the disk \
         ({clusters} clusters of 64 KiB for a virtual size of {virtual_size} bytes)"
    )]
    RangeOutOfBounds {
        /// Position of the range in the input.
        index: usize,
        /// First cluster.
        start: u64,
        /// One past the last cluster.
        end: u64,
        /// Guest clusters in the virtual size.
        clusters: u64,
        /// The virtual size in bytes.
        virtual_size: u64,
    },
    /// The image would need a larger refcount table than QEMU accepts.
    #[error(
        "the qcow2 image would need a refcount table of {clusters} clusters, \
         more than the limit of {max}"
    )]
    RefcountTableTooLarge {
        /// Clusters the refcount table would need.
        clusters: u64,
        /// The limit.
        max: u64,
    },
}

/// A run of consecutive L1 indices that each own an L2 table; their tables are consecutive too.
#[derive(Debug, Clone, PartialEq, Eq)]
struct L2Run {
    /// First L1 index of the run.
    first_l1: u64,
    /// Number of L1 indices (and L2 tables) in the run.
    count: u64,
    /// Rank of the run's first L2 table among all L2 tables.
    first_table: u64,
}

impl L2Run {
    fn end_l1(&self) -> u64 {
        self.first_l1 + self.count
    }

    fn end_table(&self) -> u64 {
        self.first_table + self.count
    }
}

/// Where everything goes in a streamed qcow2 image. See the [module docs](self) for the layout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Qcow2Layout {
    virtual_size: u64,
    /// Allocated guest cluster ranges, sorted, merged when adjacent.
    ranges: Vec<Range<u64>>,
    /// `data_before[i]`: allocated clusters in `ranges[..i]`.
    data_before: Vec<u64>,
    l2_runs: Vec<L2Run>,
    l1_entries: u64,
    allocated: u64,
    // Host cluster indices where each region begins.
    l1_start: u64,
    reftable_start: u64,
    refblock_start: u64,
    l2_start: u64,
    data_start: u64,
    reftable_clusters: u64,
    refblocks: u64,
    l2_tables: u64,
    /// Host clusters in the whole file.
    host_clusters: u64,
}

impl Qcow2Layout {
    /// Cluster size in bytes (`cluster_bits` 16).
    pub const CLUSTER_SIZE: u64 = CLUSTER;

    /// Largest virtual size accepted: what an L1 table of QEMU's maximum size maps (2 PiB).
    pub const MAX_VIRTUAL_SIZE: u64 = MAX_L1_ENTRIES * L2_ENTRIES * CLUSTER;

    /// Lays out an image of `virtual_size` bytes whose guest clusters in `allocated` hold data.
    ///
    /// `allocated` lists ranges of guest cluster indices (64 KiB clusters), sorted, non-empty and
    /// non-overlapping (adjacent ranges are fine), inside the virtual size. Clusters not listed
    /// are left unallocated and read as zeros. `virtual_size` must be a positive multiple of 512
    /// no larger than [`MAX_VIRTUAL_SIZE`](Self::MAX_VIRTUAL_SIZE).
    pub fn new(virtual_size: u64, allocated: Vec<Range<u64>>) -> Result<Self, Qcow2Error> {
        if virtual_size == 0 {
            return Err(Qcow2Error::ZeroVirtualSize);
        }
        if !virtual_size.is_multiple_of(SECTOR) {
            return Err(Qcow2Error::UnalignedVirtualSize(virtual_size));
        }
        if virtual_size > Self::MAX_VIRTUAL_SIZE {
            return Err(Qcow2Error::VirtualSizeTooLarge {
                size: virtual_size,
                max: Self::MAX_VIRTUAL_SIZE,
            });
        }
        let guest_clusters = virtual_size.div_ceil(CLUSTER);

        // Validate, and merge adjacent ranges so that the tables below stay small.
        let mut ranges: Vec<Range<u64>> = Vec::with_capacity(allocated.len());
        let mut previous_end = 0u64;
        for (index, r) in allocated.into_iter().enumerate() {
            if r.start >= r.end {
                return Err(Qcow2Error::EmptyRange {
                    index,
                    start: r.start,
                    end: r.end,
                });
            }
            if index > 0 && r.start < previous_end {
                return Err(Qcow2Error::UnsortedRange {
                    index,
                    start: r.start,
                    end: r.end,
                    previous_end,
                });
            }
            if r.end > guest_clusters {
                return Err(Qcow2Error::RangeOutOfBounds {
                    index,
                    start: r.start,
                    end: r.end,
                    clusters: guest_clusters,
                    virtual_size,
                });
            }
            previous_end = r.end;
            match ranges.last_mut() {
                Some(last) if last.end == r.start => last.end = r.end,
                _ => ranges.push(r),
            }
        }
        ranges.shrink_to_fit();

        let mut data_before = Vec::with_capacity(ranges.len());
        let mut allocated = 0u64;
        let mut l2_runs: Vec<L2Run> = Vec::new();
        let mut l2_tables = 0u64;
        for r in &ranges {
            data_before.push(allocated);
            allocated += r.end - r.start;
            let first = r.start / L2_ENTRIES;
            let end = (r.end - 1) / L2_ENTRIES + 1;
            match l2_runs.last_mut() {
                // Shares an L2 table with the previous range, or continues its run.
                Some(run) if first <= run.end_l1() => {
                    if end > run.end_l1() {
                        l2_tables += end - run.end_l1();
                        run.count = end - run.first_l1;
                    }
                }
                _ => {
                    l2_runs.push(L2Run {
                        first_l1: first,
                        count: end - first,
                        first_table: l2_tables,
                    });
                    l2_tables += end - first;
                }
            }
        }
        l2_runs.shrink_to_fit();

        let l1_entries = guest_clusters.div_ceil(L2_ENTRIES);
        let l1_clusters = l1_entries.div_ceil(TABLE_ENTRIES_PER_CLUSTER);

        // The refcount blocks cover every host cluster, themselves and the refcount table
        // included, and the refcount table grows with the number of blocks: iterate from below
        // to the least fixed point. Each step can only grow the counts, and they are bounded.
        let fixed = 1 + l1_clusters + l2_tables + allocated;
        let mut refblocks = 0u64;
        let (reftable_clusters, host_clusters) = loop {
            let reftable_clusters = refblocks.div_ceil(TABLE_ENTRIES_PER_CLUSTER).max(1);
            if reftable_clusters > MAX_REFTABLE_CLUSTERS {
                return Err(Qcow2Error::RefcountTableTooLarge {
                    clusters: reftable_clusters,
                    max: MAX_REFTABLE_CLUSTERS,
                });
            }
            let host_clusters = fixed + reftable_clusters + refblocks;
            let needed = host_clusters.div_ceil(REFCOUNTS_PER_BLOCK);
            if needed == refblocks {
                break (reftable_clusters, host_clusters);
            }
            refblocks = needed;
        };

        let l1_start = 1;
        let reftable_start = l1_start + l1_clusters;
        let refblock_start = reftable_start + reftable_clusters;
        let l2_start = refblock_start + refblocks;
        let data_start = l2_start + l2_tables;
        debug_assert_eq!(data_start + allocated, host_clusters);

        Ok(Self {
            virtual_size,
            ranges,
            data_before,
            l2_runs,
            l1_entries,
            allocated,
            l1_start,
            reftable_start,
            refblock_start,
            l2_start,
            data_start,
            reftable_clusters,
            refblocks,
            l2_tables,
            host_clusters,
        })
    }

    /// The guest-visible size in bytes.
    pub fn virtual_size(&self) -> u64 {
        self.virtual_size
    }

    /// Exact size in bytes of the whole stream: metadata plus every allocated cluster.
    pub fn total_size(&self) -> u64 {
        self.host_clusters * CLUSTER
    }

    /// Byte offset where the first data cluster begins, i.e. the length of the metadata region.
    pub fn data_offset(&self) -> u64 {
        self.data_start * CLUSTER
    }

    /// Number of allocated guest clusters, i.e. data clusters in the stream.
    pub fn allocated_clusters(&self) -> u64 {
        self.allocated
    }

    /// The allocated guest cluster ranges, sorted, with adjacent ranges merged.
    pub fn allocated_ranges(&self) -> &[Range<u64>] {
        &self.ranges
    }

    /// Number of guest clusters in the virtual size (the last one may be partial).
    pub fn guest_clusters(&self) -> u64 {
        self.virtual_size.div_ceil(CLUSTER)
    }

    /// Byte offset in the stream of guest cluster `guest_cluster`'s data, or `None` when the
    /// cluster is not allocated.
    pub fn host_offset(&self, guest_cluster: u64) -> Option<u64> {
        let i = self.ranges.partition_point(|r| r.end <= guest_cluster);
        let r = self.ranges.get(i)?;
        if r.start > guest_cluster {
            return None;
        }
        Some((self.data_start + self.data_before[i] + guest_cluster - r.start) * CLUSTER)
    }

    /// The metadata region as pieces of at most 1 MiB, in stream order. Their lengths add up to
    /// [`data_offset`](Self::data_offset). Each piece is generated when the iterator reaches it.
    pub fn metadata(&self) -> MetadataPieces<'_> {
        MetadataPieces {
            layout: self,
            next_cluster: 0,
        }
    }

    /// The metadata region from cluster `first_cluster` on (a stream resumed at byte
    /// `first_cluster * CLUSTER_SIZE`, e.g. an HTTP `Range`): the clusters before it are
    /// never generated. Empty when `first_cluster` lies at or past
    /// [`data_offset`](Self::data_offset).
    pub fn metadata_from(&self, first_cluster: u64) -> MetadataPieces<'_> {
        MetadataPieces {
            layout: self,
            next_cluster: first_cluster.min(self.data_start),
        }
    }

    /// Fills `buf` (one cluster, zeroed by the caller) with metadata cluster `index`.
    fn fill_metadata_cluster(&self, index: u64, buf: &mut [u8]) {
        debug_assert!(index < self.data_start);
        debug_assert_eq!(buf.len(), CLUSTER_USIZE);
        if index == 0 {
            self.fill_header(buf);
        } else if index < self.reftable_start {
            self.fill_l1(index - self.l1_start, buf);
        } else if index < self.refblock_start {
            self.fill_reftable(index - self.reftable_start, buf);
        } else if index < self.l2_start {
            self.fill_refblock(index - self.refblock_start, buf);
        } else {
            self.fill_l2(index - self.l2_start, buf);
        }
    }

    fn fill_header(&self, buf: &mut [u8]) {
        put_u32(buf, 0, QCOW2_MAGIC);
        put_u32(buf, 4, QCOW2_VERSION);
        put_u64(buf, 8, 0); // backing_file_offset: no backing file
        put_u32(buf, 16, 0); // backing_file_size
        put_u32(buf, 20, CLUSTER_BITS);
        put_u64(buf, 24, self.virtual_size);
        put_u32(buf, 32, 0); // crypt_method: none
        put_u32(
            buf,
            36,
            u32::try_from(self.l1_entries).expect("l1_size is bounded by MAX_VIRTUAL_SIZE"),
        );
        put_u64(buf, 40, self.l1_start * CLUSTER);
        put_u64(buf, 48, self.reftable_start * CLUSTER);
        put_u32(
            buf,
            56,
            u32::try_from(self.reftable_clusters).expect("bounded by MAX_REFTABLE_CLUSTERS"),
        );
        put_u32(buf, 60, 0); // nb_snapshots
        put_u64(buf, 64, 0); // snapshots_offset
        put_u64(buf, 72, 0); // incompatible_features
        put_u64(buf, 80, 0); // compatible_features
        put_u64(buf, 88, 0); // autoclear_features
        put_u32(buf, 96, REFCOUNT_ORDER);
        put_u32(buf, 100, HEADER_LENGTH);
        // Header extensions start at header_length: the end marker (type 0, length 0).
        put_u32(buf, HEADER_LENGTH as usize, 0);
        put_u32(buf, HEADER_LENGTH as usize + 4, 0);
    }

    /// L1 table cluster `c`: entries for the L1 indices that own an L2 table.
    fn fill_l1(&self, c: u64, buf: &mut [u8]) {
        let lo = c * TABLE_ENTRIES_PER_CLUSTER;
        let hi = (lo + TABLE_ENTRIES_PER_CLUSTER).min(self.l1_entries);
        let first_run = self.l2_runs.partition_point(|run| run.end_l1() <= lo);
        for run in self.l2_runs[first_run..]
            .iter()
            .take_while(|run| run.first_l1 < hi)
        {
            for l1 in run.first_l1.max(lo)..run.end_l1().min(hi) {
                let table = self.l2_start + run.first_table + (l1 - run.first_l1);
                put_u64(
                    buf,
                    ((l1 - lo) * 8) as usize,
                    (table * CLUSTER) | OFLAG_COPIED,
                );
            }
        }
    }

    /// Refcount table cluster `c`: pointers to the refcount blocks.
    fn fill_reftable(&self, c: u64, buf: &mut [u8]) {
        let lo = c * TABLE_ENTRIES_PER_CLUSTER;
        let hi = (lo + TABLE_ENTRIES_PER_CLUSTER).min(self.refblocks);
        for block in lo..hi {
            put_u64(
                buf,
                ((block - lo) * 8) as usize,
                (self.refblock_start + block) * CLUSTER,
            );
        }
    }

    /// Refcount block `b`: refcount 1 for every host cluster of the file it covers.
    fn fill_refblock(&self, b: u64, buf: &mut [u8]) {
        let lo = b * REFCOUNTS_PER_BLOCK;
        let hi = (lo + REFCOUNTS_PER_BLOCK).min(self.host_clusters);
        for cluster in lo..hi {
            let at = ((cluster - lo) * 2) as usize;
            buf[at..at + 2].copy_from_slice(&1u16.to_be_bytes());
        }
    }

    /// L2 table of rank `t`: entries for the allocated guest clusters it maps.
    fn fill_l2(&self, t: u64, buf: &mut [u8]) {
        let run_index = self.l2_runs.partition_point(|run| run.end_table() <= t);
        let run = &self.l2_runs[run_index];
        let l1 = run.first_l1 + (t - run.first_table);
        let lo = l1 * L2_ENTRIES;
        let hi = lo + L2_ENTRIES;
        let first_range = self.ranges.partition_point(|r| r.end <= lo);
        for (i, r) in self
            .ranges
            .iter()
            .enumerate()
            .skip(first_range)
            .take_while(|(_, r)| r.start < hi)
        {
            let base = self.data_start + self.data_before[i];
            for guest in r.start.max(lo)..r.end.min(hi) {
                let host = base + (guest - r.start);
                put_u64(
                    buf,
                    ((guest - lo) * 8) as usize,
                    (host * CLUSTER) | OFLAG_COPIED,
                );
            }
        }
    }
}

/// The metadata region of a [`Qcow2Layout`], one piece of at most 1 MiB (16 clusters) at a time.
#[derive(Debug, Clone)]
pub struct MetadataPieces<'a> {
    layout: &'a Qcow2Layout,
    next_cluster: u64,
}

impl Iterator for MetadataPieces<'_> {
    type Item = Vec<u8>;

    fn next(&mut self) -> Option<Vec<u8>> {
        let end = self.layout.data_start;
        if self.next_cluster >= end {
            return None;
        }
        let count = (end - self.next_cluster).min(PIECE_CLUSTERS);
        let mut piece = vec![0u8; count as usize * CLUSTER_USIZE];
        for (i, buf) in piece.chunks_exact_mut(CLUSTER_USIZE).enumerate() {
            self.layout
                .fill_metadata_cluster(self.next_cluster + i as u64, buf);
        }
        self.next_cluster += count;
        Some(piece)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let left = self
            .layout
            .data_start
            .saturating_sub(self.next_cluster)
            .div_ceil(PIECE_CLUSTERS);
        let left = usize::try_from(left).unwrap_or(usize::MAX);
        (left, Some(left))
    }
}

impl ExactSizeIterator for MetadataPieces<'_> {}
impl FusedIterator for MetadataPieces<'_> {}

/// Writes the whole qcow2 stream of `layout` to `w`: the metadata, then every allocated guest
/// cluster in ascending order, then flushes `w`. Exactly [`Qcow2Layout::total_size`] bytes.
///
/// `read_cluster(index, buf)` must fill `buf` with the guest bytes of cluster `index`. `buf` is
/// [`Qcow2Layout::CLUSTER_SIZE`] bytes long, except for a final cluster that extends past the
/// virtual size: there it holds only the bytes inside the disk, and the encoder writes the
/// padding as zeros.
pub fn write_qcow2<W: Write + ?Sized>(
    layout: &Qcow2Layout,
    w: &mut W,
    mut read_cluster: impl FnMut(u64, &mut [u8]) -> io::Result<()>,
) -> io::Result<()> {
    for piece in layout.metadata() {
        w.write_all(&piece)?;
    }
    let mut buf = vec![0u8; CLUSTER_USIZE];
    for r in layout.allocated_ranges() {
        for guest in r.clone() {
            let inside = (layout.virtual_size - guest * CLUSTER).min(CLUSTER) as usize;
            read_cluster(guest, &mut buf[..inside])?;
            buf[inside..].fill(0);
            w.write_all(&buf)?;
        }
    }
    w.flush()
}

/// The guest cluster ranges that cover the byte ranges `extents`: each range is widened to
/// whole 64 KiB clusters, then the result is sorted and overlapping or adjacent ranges are
/// merged. Empty byte ranges are dropped. The result suits [`Qcow2Layout::new`] as long as the
/// extents lie inside the virtual size.
pub fn clusters_covering(extents: impl IntoIterator<Item = Range<u64>>) -> Vec<Range<u64>> {
    let mut clusters: Vec<Range<u64>> = extents
        .into_iter()
        .filter(|e| e.start < e.end)
        .map(|e| e.start / CLUSTER..e.end.div_ceil(CLUSTER))
        .collect();
    clusters.sort_unstable_by_key(|r| r.start);
    let mut merged: Vec<Range<u64>> = Vec::with_capacity(clusters.len());
    for r in clusters {
        match merged.last_mut() {
            Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
            _ => merged.push(r),
        }
    }
    merged
}

fn put_u32(buf: &mut [u8], at: usize, value: u32) {
    buf[at..at + 4].copy_from_slice(&value.to_be_bytes());
}

fn put_u64(buf: &mut [u8], at: usize, value: u64) {
    buf[at..at + 8].copy_from_slice(&value.to_be_bytes());
}

#[cfg(test)]
// A one-range list of allocated clusters is a real input here, not a mistaken `vec![0; n]`.
#[allow(clippy::single_range_in_vec_init)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    const CS: u64 = Qcow2Layout::CLUSTER_SIZE;
    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;
    const TIB: u64 = 1 << 40;

    fn be32(buf: &[u8], at: u64) -> u32 {
        let at = at as usize;
        u32::from_be_bytes(buf[at..at + 4].try_into().unwrap())
    }

    fn be64(buf: &[u8], at: u64) -> u64 {
        let at = at as usize;
        u64::from_be_bytes(buf[at..at + 8].try_into().unwrap())
    }

    fn be16(buf: &[u8], at: u64) -> u16 {
        let at = at as usize;
        u16::from_be_bytes(buf[at..at + 2].try_into().unwrap())
    }

    /// Whole metadata region, checking piece sizes on the way.
    fn collect_metadata(layout: &Qcow2Layout) -> Vec<u8> {
        let pieces = layout.metadata();
        let expected_pieces = pieces.len();
        let mut out = Vec::new();
        let mut n = 0;
        for piece in pieces {
            assert!(!piece.is_empty() && piece.len() as u64 <= MIB);
            assert_eq!(piece.len() as u64 % CS, 0);
            out.extend_from_slice(&piece);
            n += 1;
        }
        assert_eq!(n, expected_pieces);
        assert_eq!(out.len() as u64, layout.data_offset());
        out
    }

    #[test]
    fn metadata_from_a_cluster_is_the_tail_of_the_whole() {
        // Enough refcount and L2 clusters that the metadata spans several 1 MiB pieces.
        let ranges: Vec<Range<u64>> = (0..40u64).map(|i| i * 9000..i * 9000 + 3).collect();
        let layout = Qcow2Layout::new(1 << 40, ranges).unwrap();
        let whole = collect_metadata(&layout);
        let clusters = layout.data_offset() / CS;
        assert!(clusters > PIECE_CLUSTERS, "{clusters} metadata clusters");
        for first in [
            0,
            1,
            5,
            PIECE_CLUSTERS - 1,
            PIECE_CLUSTERS,
            clusters - 1,
            clusters,
            clusters + 7,
        ] {
            let tail: Vec<u8> = layout.metadata_from(first).flatten().collect();
            let from = (first.min(clusters) * CS) as usize;
            assert!(tail == whole[from..], "metadata from cluster {first}");
        }
    }

    /// An independent reader: parses the metadata as qemu would, checks every structural rule
    /// (alignment, flags, refcounts = references = 1 for every host cluster, no leaks) and that
    /// guest clusters map exactly to the allocated ones, in ascending host order.
    fn verify(layout: &Qcow2Layout) {
        let meta = collect_metadata(layout);
        let total = layout.total_size();
        assert_eq!(total % CS, 0);
        let host_clusters = total / CS;
        let data_offset = layout.data_offset();
        assert_eq!(data_offset + layout.allocated_clusters() * CS, total);

        // Header.
        assert_eq!(&meta[0..4], b"QFI\xfb");
        assert_eq!(be32(&meta, 4), 3);
        assert_eq!(be64(&meta, 8), 0);
        assert_eq!(be32(&meta, 16), 0);
        assert_eq!(be32(&meta, 20), 16);
        let size = be64(&meta, 24);
        assert_eq!(size, layout.virtual_size());
        assert_eq!(be32(&meta, 32), 0);
        let l1_size = u64::from(be32(&meta, 36));
        let l1_offset = be64(&meta, 40);
        let rt_offset = be64(&meta, 48);
        let rt_clusters = u64::from(be32(&meta, 56));
        assert_eq!(be32(&meta, 60), 0);
        assert_eq!(be64(&meta, 64), 0);
        assert_eq!(be64(&meta, 72), 0);
        assert_eq!(be64(&meta, 80), 0);
        assert_eq!(be64(&meta, 88), 0);
        assert_eq!(be32(&meta, 96), 4);
        assert_eq!(be32(&meta, 100), 104);
        assert_eq!(be64(&meta, 104), 0, "header extension end marker");
        let guest_clusters = size.div_ceil(CS);
        assert_eq!(l1_size, guest_clusters.div_ceil(8192));
        assert_eq!(l1_offset % CS, 0);
        assert_eq!(rt_offset % CS, 0);

        // Every reference to a host cluster, counted.
        let mut refs = vec![0u32; host_clusters as usize];
        let mut add_ref = |offset: u64, what: &str| {
            assert_eq!(offset % CS, 0, "{what} at {offset} is not cluster aligned");
            assert!(offset < total, "{what} at {offset} is past the end {total}");
            refs[(offset / CS) as usize] += 1;
        };
        add_ref(0, "header");
        for c in 0..(l1_size * 8).div_ceil(CS) {
            add_ref(l1_offset + c * CS, "L1 table");
        }
        for c in 0..rt_clusters {
            add_ref(rt_offset + c * CS, "refcount table");
        }
        let mut refblock_offsets = Vec::new();
        for e in 0..rt_clusters * 8192 {
            let entry = be64(&meta, rt_offset + e * 8);
            if entry != 0 {
                assert!(entry < data_offset, "refcount block outside the metadata");
                add_ref(entry, "refcount block");
                refblock_offsets.push((e, entry));
            }
        }
        let mut mapped = Vec::new();
        for i in 0..l1_size {
            let entry = be64(&meta, l1_offset + i * 8);
            if entry == 0 {
                continue;
            }
            assert_ne!(entry & OFLAG_COPIED, 0, "L1 entry {i} lacks COPIED");
            let l2 = entry & !OFLAG_COPIED;
            assert_eq!(l2 & !0x00ff_ffff_ffff_fe00, 0, "L1 entry {i} reserved bits");
            assert!(l2 < data_offset, "L2 table outside the metadata");
            add_ref(l2, "L2 table");
            let mut used = 0;
            for j in 0..8192 {
                let e = be64(&meta, l2 + j * 8);
                if e == 0 {
                    continue;
                }
                used += 1;
                let guest = i * 8192 + j;
                assert!(
                    guest < guest_clusters,
                    "L2 maps cluster {guest} past the end"
                );
                assert_ne!(e & OFLAG_COPIED, 0, "L2 entry for {guest} lacks COPIED");
                assert_eq!(e & (1 << 62), 0, "compressed flag");
                let host = e & !OFLAG_COPIED;
                assert_eq!(host & !0x00ff_ffff_ffff_fe00, 0, "L2 entry reserved bits");
                assert!(host >= data_offset, "data cluster inside the metadata");
                add_ref(host, "data cluster");
                mapped.push((guest, host));
            }
            assert!(used > 0, "L2 table {i} maps nothing");
        }

        // Refcounts: exactly the references, every host cluster used once.
        for (c, &n) in refs.iter().enumerate() {
            assert_eq!(n, 1, "host cluster {c} referenced {n} times");
        }
        let mut covered = 0;
        for (block, offset) in refblock_offsets {
            for k in 0..CS / 2 {
                let cluster = block * (CS / 2) + k;
                let rc = be16(&meta, offset + k * 2);
                if cluster < host_clusters {
                    assert_eq!(rc, 1, "refcount of host cluster {cluster}");
                    covered += 1;
                } else {
                    assert_eq!(rc, 0, "refcount past the end, cluster {cluster}");
                }
            }
        }
        assert_eq!(
            covered, host_clusters,
            "refcount blocks must cover the file"
        );

        // Mapping: exactly the allocated clusters, data in ascending guest order.
        let expected: Vec<u64> = layout
            .allocated_ranges()
            .iter()
            .flat_map(|r| r.clone())
            .collect();
        let guests: Vec<u64> = mapped.iter().map(|m| m.0).collect();
        assert_eq!(guests, expected);
        for (rank, (guest, host)) in mapped.iter().enumerate() {
            assert_eq!(*host, data_offset + rank as u64 * CS);
            assert_eq!(layout.host_offset(*guest), Some(*host));
        }
    }

    /// Clusters of each region: header, L1, refcount table, refcount blocks, L2, data.
    fn regions(l: &Qcow2Layout) -> [u64; 6] {
        [
            1,
            l.reftable_start - l.l1_start,
            l.reftable_clusters,
            l.refblocks,
            l.l2_tables,
            l.allocated,
        ]
    }

    struct XorShift(u64);

    impl XorShift {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }

        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    #[test]
    fn one_cluster_image() {
        let l = Qcow2Layout::new(CS, vec![0..1]).unwrap();
        assert_eq!(regions(&l), [1, 1, 1, 1, 1, 1]);
        assert_eq!(l.data_offset(), 5 * CS);
        assert_eq!(l.total_size(), 6 * CS);
        assert_eq!(l.allocated_clusters(), 1);
        assert_eq!(l.metadata().len(), 1);
        verify(&l);
    }

    #[test]
    fn one_sector_image() {
        let l = Qcow2Layout::new(512, vec![0..1]).unwrap();
        assert_eq!(l.guest_clusters(), 1);
        assert_eq!(l.total_size(), 6 * CS);
        verify(&l);
    }

    #[test]
    fn no_allocated_clusters() {
        for size in [512, CS, 3 * GIB + 512, TIB, Qcow2Layout::MAX_VIRTUAL_SIZE] {
            let l = Qcow2Layout::new(size, vec![]).unwrap();
            let l1 = size.div_ceil(512 * MIB).div_ceil(8192);
            assert_eq!(regions(&l), [1, l1, 1, 1, 0, 0], "size {size}");
            assert_eq!(l.total_size(), (3 + l1) * CS);
            assert_eq!(l.data_offset(), l.total_size());
            assert_eq!(l.allocated_clusters(), 0);
            if size <= TIB {
                verify(&l);
            }
        }
        // The largest image: a 32 MiB L1 table, still streamed in 1 MiB pieces.
        let l = Qcow2Layout::new(Qcow2Layout::MAX_VIRTUAL_SIZE, vec![]).unwrap();
        assert_eq!(regions(&l)[1], 512);
        let mut total = 0;
        for piece in l.metadata() {
            assert!(piece.len() as u64 <= MIB);
            total += piece.len() as u64;
        }
        assert_eq!(total, l.data_offset());
    }

    #[test]
    fn size_not_a_multiple_of_the_cluster_size() {
        let size = 3 * CS + 512;
        let l = Qcow2Layout::new(size, vec![1..2, 3..4]).unwrap();
        assert_eq!(l.guest_clusters(), 4);
        assert_eq!(regions(&l), [1, 1, 1, 1, 1, 2]);
        assert_eq!(l.total_size(), 7 * CS);
        assert_eq!(l.host_offset(0), None);
        assert_eq!(l.host_offset(1), Some(5 * CS));
        assert_eq!(l.host_offset(2), None);
        assert_eq!(l.host_offset(3), Some(6 * CS));
        assert_eq!(l.host_offset(4), None);
        verify(&l);
    }

    #[test]
    fn clusters_at_the_very_end_and_across_l2_boundaries() {
        // 1 GiB + 320 KiB: three L1 entries, the last one mapping five clusters.
        let size = GIB + 5 * CS;
        let last = size / CS - 1;
        let l = Qcow2Layout::new(
            size,
            vec![0..1, 8191..8193, 16383..16384, 16384..16385, last..last + 1],
        )
        .unwrap();
        // 16383..16385 merges; L2 tables: [0, 1, 2] are one run of three tables.
        assert_eq!(
            l.allocated_ranges(),
            &[0..1, 8191..8193, 16383..16385, last..last + 1][..]
        );
        assert_eq!(regions(&l), [1, 1, 1, 1, 3, 6]);
        assert_eq!(l.l2_runs.len(), 1);
        verify(&l);

        // Only the last cluster of a disk whose size is not a multiple of the cluster size.
        let size = 5 * GIB + 7 * 512;
        let last = size.div_ceil(CS) - 1;
        let l = Qcow2Layout::new(size, vec![last..last + 1]).unwrap();
        assert_eq!(regions(&l), [1, 1, 1, 1, 1, 1]);
        assert_eq!(l.host_offset(last), Some(5 * CS));
        verify(&l);
    }

    #[test]
    fn everything_allocated() {
        let size = 700 * MIB + 512;
        let clusters = size.div_ceil(CS);
        let l = Qcow2Layout::new(size, vec![0..clusters]).unwrap();
        assert_eq!(regions(&l), [1, 1, 1, 1, 2, clusters]);
        verify(&l);
    }

    #[test]
    fn refcount_blocks_cover_themselves_at_the_boundary() {
        // Sweep the data so the file crosses 32768 host clusters: 1 header + 1 L1 + 1 reftable
        // + refblocks + L2 tables (5 for 32768 clusters) + data.
        let mut saw_two = false;
        for data in 32755..32775u64 {
            let l = Qcow2Layout::new(CS * 40960, vec![0..data]).unwrap();
            let n = l.total_size() / CS;
            let per_block = CS / 2;
            assert!(
                l.refblocks * per_block >= n,
                "data {data}: blocks must cover the file"
            );
            assert!(
                (l.refblocks - 1) * per_block < n,
                "data {data}: no spare block"
            );
            saw_two |= l.refblocks == 2;
            let fixed = 1 + 1 + 1 + data.div_ceil(8192) + data;
            assert_eq!(n, fixed + l.refblocks);
        }
        assert!(saw_two);
        // The exact boundary: 32768 clusters fit one block, one more needs a second.
        let l = Qcow2Layout::new(CS * 40960, vec![0..32760]).unwrap();
        assert_eq!((l.refblocks, l.total_size() / CS), (1, 32768));
        verify(&l);
        let l = Qcow2Layout::new(CS * 40960, vec![0..32761]).unwrap();
        assert_eq!((l.refblocks, l.total_size() / CS), (2, 32770));
        verify(&l);
    }

    #[test]
    fn refcount_table_of_several_clusters() {
        // 2^28 data clusters (16 TiB) need more than 8192 refcount blocks: a two-cluster
        // refcount table. Only the layout and the refcount clusters are checked: the L2 tables
        // alone would be 2 GiB.
        let data = 1u64 << 28;
        let l = Qcow2Layout::new(data * CS, vec![0..data]).unwrap();
        let n = l.total_size() / CS;
        assert_eq!(l.reftable_clusters, 2);
        assert_eq!(l.refblocks, n.div_ceil(CS / 2));
        assert!(l.refblocks > 8192);
        assert_eq!(l.l2_tables, data / 8192);
        assert_eq!(regions(&l).iter().sum::<u64>(), n);
        assert_eq!(l.metadata().len() as u64, l.data_start.div_ceil(16));

        let mut buf = vec![0u8; CLUSTER_USIZE];
        l.fill_metadata_cluster(l.reftable_start + 1, &mut buf);
        let second = l.refblocks - 8192;
        for e in 0..8192 {
            let expected = if e < second {
                (l.refblock_start + 8192 + e) * CS
            } else {
                0
            };
            assert_eq!(be64(&buf, e * 8), expected);
        }
        buf.fill(0);
        l.fill_metadata_cluster(l.l2_start - 1, &mut buf);
        let in_last = n - (l.refblocks - 1) * (CS / 2);
        for k in 0..CS / 2 {
            assert_eq!(be16(&buf, k * 2), u16::from(k < in_last));
        }
        buf.fill(0);
        l.fill_metadata_cluster(l.data_start - 1, &mut buf);
        for k in 0..8192 {
            let guest = data - 8192 + k;
            let expected = ((l.data_start + guest) * CS) | OFLAG_COPIED;
            assert_eq!(be64(&buf, k * 8), expected);
        }
    }

    #[test]
    fn sparse_one_tib_layout() {
        // Data scattered over 1 TiB: at the start, around L2 boundaries, in the middle, at the
        // very end, and a run of 4000 single-cluster ranges.
        let size = TIB;
        let last = size / CS;
        let mut ranges = vec![0..16, 8190..8194, (1 << 22)..(1 << 22) + 100];
        for i in 0..4000u64 {
            let start = (1 << 23) + i * 1000;
            ranges.push(start..start + 1);
        }
        ranges.push(last - 3..last);
        let l = Qcow2Layout::new(size, ranges.clone()).unwrap();
        let data = 16 + 4 + 100 + 4000 + 3;
        // L2 tables: 0 and 1 (one run), 512, 1024..=1512 (4000 ranges 1000 apart from
        // 2^23 = L1 index 1024 to 2^23 + 3_999_000 = index 1512), and 2047.
        let l2 = 2 + 1 + (1512 - 1024 + 1) + 1;
        assert_eq!(regions(&l), [1, 1, 1, 1, l2, data]);
        assert_eq!(l.allocated_clusters(), data);
        assert_eq!(l.data_offset(), (4 + l2) * CS);
        assert_eq!(l.total_size(), (4 + l2 + data) * CS);
        // Memory: O(ranges), not O(size).
        assert_eq!(l.ranges.len(), ranges.len());
        assert!(l.l2_runs.len() <= 4);
        verify(&l);
    }

    #[test]
    fn full_one_tib_streams_in_bounded_pieces() {
        // A fully allocated 1 TiB image: 128 MiB of L2 tables and 16M data clusters, produced
        // piece by piece without ever holding more than 1 MiB of metadata.
        let clusters = TIB / CS;
        let l = Qcow2Layout::new(TIB, vec![0..clusters]).unwrap();
        let n = l.total_size() / CS;
        assert_eq!(l.l2_tables, 2048);
        assert_eq!(l.refblocks, n.div_ceil(CS / 2));
        assert_eq!(n, 1 + 1 + 1 + l.refblocks + 2048 + clusters);
        let mut total = 0u64;
        let mut pieces = 0;
        let mut last_l2 = Vec::new();
        for piece in l.metadata() {
            assert!(piece.len() as u64 <= MIB);
            total += piece.len() as u64;
            pieces += 1;
            last_l2 = piece;
        }
        assert_eq!(total, l.data_offset());
        assert_eq!(pieces, l.data_start.div_ceil(16));
        // The last L2 entry maps the last guest cluster onto the last host cluster.
        let tail = &last_l2[last_l2.len() - 8..];
        assert_eq!(
            u64::from_be_bytes(tail.try_into().unwrap()),
            ((n - 1) * CS) | OFLAG_COPIED
        );
    }

    #[test]
    fn random_layouts() {
        let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
        for _ in 0..40 {
            let clusters = 1 + rng.below(40_000);
            let size = (clusters - 1) * CS + 512 * (1 + rng.below(128));
            let mut ranges = Vec::new();
            let mut at = rng.below(20);
            while at < clusters && ranges.len() < 200 {
                let len = 1 + rng.below(3000).min(clusters - at - 1);
                ranges.push(at..at + len);
                at += len + rng.below(9000);
            }
            let l = Qcow2Layout::new(size, ranges).unwrap();
            verify(&l);
        }
    }

    #[test]
    fn write_qcow2_streams_metadata_then_data() {
        let size = 2 * CS + 1024; // last cluster holds 1024 bytes
        let l = Qcow2Layout::new(size, vec![0..1, 2..3]).unwrap();
        let mut out = Vec::new();
        let mut asked = Vec::new();
        write_qcow2(&l, &mut out, |g, buf| {
            asked.push((g, buf.len()));
            buf.fill(0xa0 + g as u8);
            Ok(())
        })
        .unwrap();
        assert_eq!(asked, vec![(0, CS as usize), (2, 1024)]);
        assert_eq!(out.len() as u64, l.total_size());
        let meta: Vec<u8> = l.metadata().flatten().collect();
        assert_eq!(&out[..meta.len()], &meta[..]);
        let d0 = l.host_offset(0).unwrap() as usize;
        let d2 = l.host_offset(2).unwrap() as usize;
        assert!(out[d0..d0 + CS as usize].iter().all(|&b| b == 0xa0));
        assert!(out[d2..d2 + 1024].iter().all(|&b| b == 0xa2));
        assert!(out[d2 + 1024..].iter().all(|&b| b == 0));
    }

    #[test]
    fn write_qcow2_passes_errors_through() {
        let l = Qcow2Layout::new(4 * CS, vec![1..3]).unwrap();
        let mut out = Vec::new();
        let err = write_qcow2(&l, &mut out, |g, _| {
            if g == 2 {
                Err(io::Error::other("source failed"))
            } else {
                Ok(())
            }
        })
        .unwrap_err();
        assert_eq!(err.to_string(), "source failed");
    }

    #[test]
    fn clusters_covering_rounds_and_merges() {
        let r = clusters_covering(vec![
            5 * CS + 1..6 * CS,
            0..1,
            CS - 1..CS + 1,
            3 * CS..3 * CS,
            6 * CS..6 * CS + 1,
            10 * CS..12 * CS,
            11 * CS..11 * CS + 5,
        ]);
        assert_eq!(r, vec![0..2, 5..7, 10..12]);
        assert!(clusters_covering(Vec::new()).is_empty());
    }

    #[test]
    fn rejects_bad_input() {
        use Qcow2Error::*;
        let new = Qcow2Layout::new;
        assert_eq!(new(0, vec![]), Err(ZeroVirtualSize));
        assert_eq!(new(1000, vec![]), Err(UnalignedVirtualSize(1000)));
        let max = Qcow2Layout::MAX_VIRTUAL_SIZE;
        assert_eq!(
            new(max + 512, vec![]),
            Err(VirtualSizeTooLarge {
                size: max + 512,
                max
            })
        );
        assert!(matches!(
            new(4 * CS, vec![0..1, 2..2]),
            Err(EmptyRange { index: 1, .. })
        ));
        #[allow(clippy::reversed_empty_ranges)]
        let reversed = vec![3..1];
        assert!(matches!(new(4 * CS, reversed), Err(EmptyRange { .. })));
        assert!(matches!(
            new(4 * CS, vec![2..3, 0..1]),
            Err(UnsortedRange {
                index: 1,
                previous_end: 3,
                ..
            })
        ));
        assert!(matches!(
            new(4 * CS, vec![0..2, 1..3]),
            Err(UnsortedRange { index: 1, .. })
        ));
        assert!(matches!(
            new(3 * CS + 512, vec![3..5]),
            Err(RangeOutOfBounds {
                index: 0,
                clusters: 4,
                ..
            })
        ));
        // A fully allocated 2 PiB image needs a refcount table past QEMU's 8 MiB limit.
        let all = max / CS;
        assert_eq!(
            new(max, vec![0..all]),
            Err(RefcountTableTooLarge {
                clusters: 129,
                max: 128
            })
        );
        let msg = new(4 * CS, vec![2..3, 0..1]).unwrap_err().to_string();
        assert!(msg.contains("sorted"), "{msg}");
    }

    #[test]
    fn adjacent_ranges_merge() {
        let l = Qcow2Layout::new(10 * CS, vec![0..2, 2..4, 6..7, 7..8]).unwrap();
        assert_eq!(l.allocated_ranges(), &[0..4, 6..8][..]);
        assert_eq!(l.allocated_clusters(), 6);
        let distinct: HashSet<u64> = (0..10).filter_map(|g| l.host_offset(g)).collect();
        assert_eq!(distinct.len(), 6);
        verify(&l);
    }
}
