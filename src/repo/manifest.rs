//! Image manifests: what an image is made of, stored as one JSON file per image.
//!
//! An image is a virtual size cut into 4 MiB chunks of guest address space. A manifest lists
//! only the *data* chunks, in ascending index order: each entry is the chunk's index, the sha256
//! of its bytes and a 64-bit mask of which of its 64 KiB clusters hold non-zero bytes. Every
//! chunk not listed is zero (a hole or all zero bytes: never stored). So a manifest's size, and
//! the memory of everything that reads it, scale with the data, never with the virtual size (a
//! qcow2 header may claim petabytes). The mask lets the qcow2 exporter lay out its tables before
//! reading a single chunk, and keeps zero clusters inside data chunks unallocated in exports.
//!
//! Formats: version 2 (written) has entries `"<index>:<digest hex>/<mask hex>"`; version 1
//! (still read) listed every chunk in order, `"z"` for a zero chunk.

use std::collections::HashSet;

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::error::{internal, Error, ErrorKind, Result};

/// Bytes of guest address space per chunk.
pub const CHUNK_SIZE: u64 = 4 << 20;
/// Bytes per cluster inside a chunk (the unit of the allocation mask and of qcow2 exports).
pub const CLUSTER_SIZE: u64 = 64 << 10;
/// Clusters per chunk: exactly the bits of a `u64` mask.
pub const CLUSTERS_PER_CHUNK: u64 = CHUNK_SIZE / CLUSTER_SIZE;

/// The manifest format written by this version (1 is still read).
pub const FORMAT_VERSION: u32 = 2;

/// A sha256 digest.
pub type Digest = [u8; 32];

/// One data chunk of an image: its index in the guest address space, the sha256 of its bytes
/// and bit i of `mask` set when cluster i holds non-zero bytes (never 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DataChunk {
    pub index: u64,
    pub digest: Digest,
    pub mask: u64,
}

impl DataChunk {
    /// Text form of format 2: `<index>:<digest hex>/<mask hex>`.
    fn encode(&self) -> String {
        format!(
            "{}:{}/{:016x}",
            self.index,
            hex::encode(self.digest),
            self.mask
        )
    }
}

/// One entry of a manifest's chunk list as written: format 2 names its index, format 1 was
/// positional (`None` index) and had `z` entries for zero chunks (`Zero`).
#[derive(Debug, PartialEq, Eq)]
enum Entry {
    Zero,
    Data {
        index: Option<u64>,
        digest: Digest,
        mask: u64,
    },
}

fn decode_entry(s: &str) -> Option<Entry> {
    if s == "z" {
        return Some(Entry::Zero);
    }
    let (index, rest) = match s.split_once(':') {
        Some((i, rest)) if !i.is_empty() && i.bytes().all(|b| b.is_ascii_digit()) => {
            (Some(i.parse().ok()?), rest)
        }
        Some(_) => return None,
        None => (None, s),
    };
    let (d, m) = rest.split_once('/')?;
    let mut digest = [0u8; 32];
    hex::decode_to_slice(d, &mut digest).ok()?;
    let mask = u64::from_str_radix(m, 16).ok()?;
    (mask != 0).then_some(Entry::Data {
        index,
        digest,
        mask,
    })
}

/// Everything the repository records about one image.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ImageRecord {
    pub format_version: u32,
    pub id: String,
    pub name: String,
    /// A name for people, changeable at any time ("" shows as `name`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub display_name: String,
    /// Free text, changeable at any time.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub description: String,
    pub virtual_size: u64,
    pub chunk_size: u64,
    /// See [`content_digest`].
    pub content_digest: String,
    /// "cold", "quiesced", "crash-consistent", "imported".
    pub consistency: String,
    pub source_domain: String,
    pub source_host: String,
    pub source_disk: String,
    pub source_format: String,
    pub created_at: i64,
    pub updated_at: i64,
    /// Guest bytes held by data chunks.
    pub data_bytes: u64,
    /// The data chunks, ascending by index; every other chunk is zero.
    #[serde(with = "chunk_list")]
    pub chunks: Vec<DataChunk>,
}

/// Serde of a chunk list as compact entries (`#[serde(with = ...)]`).
pub(crate) mod chunk_list {
    use super::{decode_entry, DataChunk, Entry};
    use serde::de::{Error as _, SeqAccess, Visitor};
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[DataChunk], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(v.iter().map(|c| c.encode()))
    }

    /// One entry, decoded from a borrowed or scratch string without keeping it.
    struct EntrySeed;

    impl<'de> serde::de::DeserializeSeed<'de> for EntrySeed {
        type Value = Entry;
        fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Entry, D::Error> {
            struct V;
            impl Visitor<'_> for V {
                type Value = Entry;
                fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                    f.write_str("a chunk entry")
                }
                fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<Entry, E> {
                    decode_entry(s).ok_or_else(|| E::custom(format!("bad chunk entry {s:?}")))
                }
            }
            d.deserialize_str(V)
        }
    }

    /// Walks a chunk list, calling `f` on each data chunk with its index (positional for
    /// format 1 entries). Zero entries only advance the position.
    pub(super) fn walk<'de, A: SeqAccess<'de>>(
        mut seq: A,
        mut f: impl FnMut(DataChunk) -> Result<(), String>,
    ) -> Result<(), A::Error> {
        let mut pos: u64 = 0;
        while let Some(e) = seq.next_element_seed(EntrySeed)? {
            match e {
                Entry::Zero => pos += 1,
                Entry::Data {
                    index,
                    digest,
                    mask,
                } => {
                    let index = index.unwrap_or(pos);
                    f(DataChunk {
                        index,
                        digest,
                        mask,
                    })
                    .map_err(A::Error::custom)?;
                    pos = index + 1;
                }
            }
        }
        Ok(())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<DataChunk>, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Vec<DataChunk>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a list of chunk entries")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Vec<DataChunk>, A::Error> {
                let mut out: Vec<DataChunk> = Vec::new();
                walk(seq, |c| {
                    if out.last().is_some_and(|l| l.index >= c.index) {
                        return Err(format!("chunk {} listed out of order", c.index));
                    }
                    out.push(c);
                    Ok(())
                })?;
                Ok(out)
            }
        }
        d.deserialize_seq(V)
    }

    /// Only the digests of a chunk list (for the repository's in-use set).
    pub struct Digests(pub std::collections::HashSet<super::Digest>);

    impl<'de> serde::Deserialize<'de> for Digests {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Digests, D::Error> {
            struct V;
            impl<'de> Visitor<'de> for V {
                type Value = Digests;
                fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                    f.write_str("a list of chunk entries")
                }
                fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Digests, A::Error> {
                    let mut out = std::collections::HashSet::new();
                    walk(seq, |c| {
                        out.insert(c.digest);
                        Ok(())
                    })?;
                    Ok(Digests(out))
                }
            }
            d.deserialize_seq(V)
        }
    }
}

/// What [`scan_digests`] needs of a manifest: its version and its chunk digests, nothing else.
#[derive(Deserialize)]
struct DigestScan {
    format_version: u32,
    chunks: chunk_list::Digests,
}

/// Reads the chunk digests a manifest names, streaming from `reader`: memory is one entry plus
/// the set of distinct digests, never the whole record. `what` names the manifest in errors.
/// A manifest of a newer format, or one that does not parse, is an error.
pub fn scan_digests(reader: impl std::io::Read, what: &str) -> Result<HashSet<Digest>> {
    let scan: DigestScan =
        serde_json::from_reader(std::io::BufReader::new(reader)).map_err(|e| {
            Error::new(
                ErrorKind::FailedPrecondition,
                format!("manifest {what} cannot be read; repair or remove it"),
            )
            .with_source(e)
        })?;
    check_version(scan.format_version, what)?;
    Ok(scan.chunks.0)
}

fn check_version(v: u32, what: &str) -> Result<()> {
    if !(1..=FORMAT_VERSION).contains(&v) {
        return Err(Error::new(
            ErrorKind::FailedPrecondition,
            format!(
                "manifest {what} has format {v}, this agent reads formats 1 to {FORMAT_VERSION}; \
                 upgrade imaged to use it"
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
impl ImageRecord {
    /// A cold raw image record with empty provenance, id "i" and no digest (for tests).
    pub(crate) fn blank(name: &str, virtual_size: u64, chunks: Vec<DataChunk>) -> ImageRecord {
        ImageRecord {
            display_name: String::new(),
            description: String::new(),
            format_version: FORMAT_VERSION,
            id: "i".into(),
            name: name.into(),
            virtual_size,
            chunk_size: CHUNK_SIZE,
            content_digest: String::new(),
            consistency: "cold".into(),
            source_domain: String::new(),
            source_host: String::new(),
            source_disk: String::new(),
            source_format: "raw".into(),
            created_at: 0,
            updated_at: 0,
            data_bytes: 0,
            chunks,
        }
    }
}

impl ImageRecord {
    /// Number of chunks a disk of `virtual_size` bytes has.
    pub fn chunk_count_for(virtual_size: u64) -> u64 {
        virtual_size.div_ceil(CHUNK_SIZE)
    }

    /// Number of chunks of this image, zero ones included.
    pub fn chunk_count(&self) -> u64 {
        Self::chunk_count_for(self.virtual_size)
    }

    /// Length in bytes of chunk `index` (the last one may be short).
    pub fn chunk_len(&self, index: u64) -> u64 {
        chunk_len(self.virtual_size, index)
    }

    /// Checks the record's internal consistency (after reading it from disk).
    pub fn validate(&self) -> Result<()> {
        check_version(self.format_version, &format!("of image {}", self.name))?;
        if self.chunk_size != CHUNK_SIZE {
            return Err(internal(format!(
                "image {}: chunk size {} unsupported",
                self.name, self.chunk_size
            )));
        }
        let count = self.chunk_count();
        let mut prev: Option<u64> = None;
        for c in &self.chunks {
            if c.index >= count || prev.is_some_and(|p| p >= c.index) || c.mask == 0 {
                return Err(internal(format!(
                    "image {}: chunk entry {} is out of order or beyond the virtual size of {} bytes",
                    self.name, c.index, self.virtual_size
                )));
            }
            prev = Some(c.index);
        }
        Ok(())
    }

    /// Number of zero chunks.
    pub fn zero_chunks(&self) -> u64 {
        self.chunk_count() - self.chunks.len() as u64
    }

    /// Allocated 64 KiB clusters as sorted ranges of cluster indices (for the qcow2 exporter).
    pub fn allocated_cluster_ranges(&self) -> Vec<std::ops::Range<u64>> {
        allocated_cluster_ranges(&self.chunks)
    }
}

/// Allocated 64 KiB clusters of the data chunks `chunks` (in index order) as sorted ranges of
/// guest cluster indices, adjacent runs merged: what [`crate::format::qcow2::Qcow2Layout`] lays
/// out. Used by the exporter and by the repository's download links.
pub fn allocated_cluster_ranges(chunks: &[DataChunk]) -> Vec<std::ops::Range<u64>> {
    let mut out: Vec<std::ops::Range<u64>> = Vec::new();
    for c in chunks {
        let base = c.index * CLUSTERS_PER_CHUNK;
        let mut m = c.mask;
        while m != 0 {
            let start = m.trailing_zeros() as u64;
            let run = (m >> start).trailing_ones() as u64;
            let r = base + start..base + start + run;
            match out.last_mut() {
                Some(last) if last.end == r.start => last.end = r.end,
                _ => out.push(r),
            }
            m = if start + run >= 64 {
                0
            } else {
                m & !(((1u64 << run) - 1) << start)
            };
        }
    }
    out
}

/// Length in bytes of chunk `index` of a disk of `virtual_size` bytes.
pub fn chunk_len(virtual_size: u64, index: u64) -> u64 {
    (virtual_size - index * CHUNK_SIZE).min(CHUNK_SIZE)
}

/// sha256 of `len` zero bytes (the digest a zero chunk contributes to the content digest).
pub fn zero_digest(len: u64) -> Digest {
    static FULL: std::sync::OnceLock<Digest> = std::sync::OnceLock::new();
    let compute = |len: u64| {
        let zeros = vec![0u8; len as usize];
        Sha256::digest(&zeros).into()
    };
    if len == CHUNK_SIZE {
        *FULL.get_or_init(|| compute(CHUNK_SIZE))
    } else {
        compute(len)
    }
}

/// The image's content digest: sha256 over the concatenated sha256 digests of *all* its chunks
/// in guest order, zero chunks included as the digest of their zero bytes (the last chunk may be
/// short). It identifies the guest-visible bytes as surely as a sha256 of the whole raw image,
/// and is reproduced by `split -b 4M disk.raw; sha256sum x* | cut -c1-64 | xxd -r -p | sha256sum`.
/// It is computed from the data chunks alone: runs of zero chunks feed a constant buffer of
/// repeated zero digests, so memory is constant and time is 32 bytes hashed per zero chunk
/// (about 0.3 s for 64 TiB of holes), never a read of the holes.
pub fn content_digest(virtual_size: u64, data: &[DataChunk]) -> String {
    const RUN: usize = 2048;
    let count = ImageRecord::chunk_count_for(virtual_size);
    let full = zero_digest(CHUNK_SIZE);
    let run: Vec<u8> = full.iter().copied().cycle().take(32 * RUN).collect();
    let mut h = Sha256::new();
    // Zero chunks [from, to), all full-sized but possibly the very last one of the disk.
    let zeros = |h: &mut Sha256, from: u64, to: u64| {
        let mut n = to - from;
        let last_short = to == count && chunk_len(virtual_size, count - 1) != CHUNK_SIZE;
        if last_short && n > 0 {
            n -= 1;
        }
        while n > 0 {
            let k = n.min(RUN as u64);
            h.update(&run[..32 * k as usize]);
            n -= k;
        }
        if last_short && to > from {
            h.update(zero_digest(chunk_len(virtual_size, count - 1)));
        }
    };
    let mut next = 0u64;
    for c in data {
        zeros(&mut h, next, c.index);
        h.update(c.digest);
        next = c.index + 1;
    }
    zeros(&mut h, next, count);
    hex::encode(h.finalize())
}

/// Bit mask of the 64 KiB clusters of `data` that hold a non-zero byte.
pub fn cluster_mask(data: &[u8]) -> u64 {
    let mut mask = 0u64;
    for (i, cl) in data.chunks(CLUSTER_SIZE as usize).enumerate() {
        if !is_zero(cl) {
            mask |= 1 << i;
        }
    }
    mask
}

pub use crate::util::is_zero;

#[cfg(test)]
mod tests {
    use super::*;

    fn record(virtual_size: u64, chunks: Vec<DataChunk>) -> ImageRecord {
        ImageRecord::blank("n", virtual_size, chunks)
    }

    #[test]
    fn entry_text_forms() {
        let d = DataChunk {
            index: 17,
            digest: [7; 32],
            mask: 0x8000_0000_0000_0001,
        };
        assert_eq!(
            decode_entry(&d.encode()),
            Some(Entry::Data {
                index: Some(17),
                digest: [7; 32],
                mask: d.mask
            })
        );
        assert_eq!(decode_entry("z"), Some(Entry::Zero));
        assert_eq!(decode_entry("zz"), None);
        assert_eq!(decode_entry(&format!("{}/0", "ab".repeat(32))), None);
        assert_eq!(decode_entry(&format!("x:{}/1", "ab".repeat(32))), None);
    }

    #[test]
    fn masks_ranges_and_round_trip() {
        let mut data = vec![0u8; CHUNK_SIZE as usize];
        data[0] = 1;
        data[CLUSTER_SIZE as usize * 5 + 3] = 1;
        data[CHUNK_SIZE as usize - 1] = 1;
        let mask = cluster_mask(&data);
        assert_eq!(mask, 1 | 1 << 5 | 1 << 63);
        let rec = record(
            3 * CHUNK_SIZE,
            vec![
                DataChunk {
                    index: 0,
                    digest: [0; 32],
                    mask,
                },
                DataChunk {
                    index: 1,
                    digest: [0; 32],
                    mask: u64::MAX,
                },
            ],
        );
        assert_eq!(rec.allocated_cluster_ranges(), vec![0..1, 5..6, 63..128]);
        assert_eq!(rec.zero_chunks(), 1);
        rec.validate().unwrap();
        let json = serde_json::to_string(&rec).unwrap();
        let back: ImageRecord = serde_json::from_str(&json).unwrap();
        assert_eq!(back, rec);
    }

    #[test]
    fn version_1_manifests_are_read_sparse() {
        let d = "cd".repeat(32);
        let json = format!(
            r#"{{"format_version":1,"id":"i","name":"old","virtual_size":{},"chunk_size":{},
            "content_digest":"","consistency":"cold","source_domain":"","source_host":"",
            "source_disk":"","source_format":"raw","created_at":0,"updated_at":0,"data_bytes":0,
            "chunks":["z","{d}/ff","z","z"]}}"#,
            4 * CHUNK_SIZE,
            CHUNK_SIZE
        );
        let rec: ImageRecord = serde_json::from_str(&json).unwrap();
        rec.validate().unwrap();
        assert_eq!(rec.chunks.len(), 1);
        assert_eq!(rec.chunks[0].index, 1);
        assert_eq!(rec.zero_chunks(), 3);
        let set = scan_digests(json.as_bytes(), "old").unwrap();
        assert_eq!(set.len(), 1);
        assert!(set.contains(&[0xcd; 32]));
    }

    #[test]
    fn newer_or_broken_manifests_are_refused_by_the_scan() {
        let newer = r#"{"format_version":99,"chunks":[]}"#;
        let e = scan_digests(newer.as_bytes(), "x.json").unwrap_err();
        assert_eq!(e.kind(), ErrorKind::FailedPrecondition);
        assert!(e.to_string().contains("format 99"), "{e}");
        let e = scan_digests(&b"{\"format_version\":2,\"chunks\":[\"q"[..], "y.json").unwrap_err();
        assert_eq!(e.kind(), ErrorKind::FailedPrecondition);
        assert!(e.to_string().contains("y.json"), "{e}");
    }

    #[test]
    fn out_of_order_entries_are_refused() {
        let mut rec = record(
            8 * CHUNK_SIZE,
            vec![
                DataChunk {
                    index: 3,
                    digest: [1; 32],
                    mask: 1,
                },
                DataChunk {
                    index: 3,
                    digest: [1; 32],
                    mask: 1,
                },
            ],
        );
        assert!(rec.validate().is_err());
        rec.chunks[1].index = 8;
        assert!(rec.validate().is_err());
        rec.chunks[1].index = 7;
        rec.validate().unwrap();
    }

    #[test]
    fn zero_detection() {
        assert!(is_zero(&[0u8; 1000][3..]));
        let mut v = vec![0u8; 4099];
        v[4098] = 1;
        assert!(!is_zero(&v));
    }

    /// The definition: sha256 over every chunk's sha256, zero chunks included.
    fn content_digest_by_definition(virtual_size: u64, data: &[DataChunk]) -> String {
        let full = Sha256::digest(vec![0u8; CHUNK_SIZE as usize]);
        let mut h = Sha256::new();
        for i in 0..ImageRecord::chunk_count_for(virtual_size) {
            match data.iter().find(|c| c.index == i) {
                Some(c) => h.update(c.digest),
                None if chunk_len(virtual_size, i) == CHUNK_SIZE => h.update(full),
                None => h.update(Sha256::digest(vec![
                    0u8;
                    chunk_len(virtual_size, i) as usize
                ])),
            }
        }
        hex::encode(h.finalize())
    }

    #[test]
    fn content_digest_matches_its_definition() {
        let d = |index| DataChunk {
            index,
            digest: [index as u8; 32],
            mask: 1,
        };
        for (size, data) in [
            (CHUNK_SIZE + 10, vec![]),
            (CHUNK_SIZE + 10, vec![d(1)]),
            (CHUNK_SIZE + 10, vec![d(0)]),
            (5000 * CHUNK_SIZE, vec![d(0), d(2100), d(4999)]),
            (5000 * CHUNK_SIZE - 512, vec![d(7)]),
            (512, vec![]),
        ] {
            assert_eq!(
                content_digest(size, &data),
                content_digest_by_definition(size, &data),
                "size {size}, {} data chunks",
                data.len()
            );
        }
    }
}
