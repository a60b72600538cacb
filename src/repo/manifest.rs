//! Image manifests: what an image is made of, stored as one JSON file per image.
//!
//! An image is the ordered list of the 4 MiB chunks of its guest address space. A chunk is
//! either *zero* (a hole or all zero bytes: never stored) or *data*: the sha256 of its bytes
//! plus a 64-bit mask of which of its 64 KiB clusters hold non-zero bytes. The mask lets the
//! qcow2 exporter lay out its tables before reading a single chunk, and keeps zero clusters
//! inside data chunks unallocated in exports.

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::error::{internal, Result};

/// Bytes of guest address space per chunk.
pub const CHUNK_SIZE: u64 = 4 << 20;
/// Bytes per cluster inside a chunk (the unit of the allocation mask and of qcow2 exports).
pub const CLUSTER_SIZE: u64 = 64 << 10;
/// Clusters per chunk: exactly the bits of a `u64` mask.
pub const CLUSTERS_PER_CHUNK: u64 = CHUNK_SIZE / CLUSTER_SIZE;

/// The manifest format written by this version.
pub const FORMAT_VERSION: u32 = 1;

/// A sha256 digest.
pub type Digest = [u8; 32];

/// One chunk of an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkRef {
    /// All zeros (or a hole): not stored.
    Zero,
    /// Stored under `digest`; bit i of `mask` set when cluster i holds non-zero bytes.
    Data { digest: Digest, mask: u64 },
}

impl ChunkRef {
    /// Text form used in manifests: `z`, or `<digest hex>/<mask hex>`.
    fn encode(&self) -> String {
        match self {
            ChunkRef::Zero => "z".into(),
            ChunkRef::Data { digest, mask } => format!("{}/{mask:016x}", hex::encode(digest)),
        }
    }

    fn decode(s: &str) -> Option<ChunkRef> {
        if s == "z" {
            return Some(ChunkRef::Zero);
        }
        let (d, m) = s.split_once('/')?;
        let mut digest = [0u8; 32];
        hex::decode_to_slice(d, &mut digest).ok()?;
        let mask = u64::from_str_radix(m, 16).ok()?;
        (mask != 0).then_some(ChunkRef::Data { digest, mask })
    }
}

/// Everything the repository records about one image.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ImageRecord {
    pub format_version: u32,
    pub id: String,
    pub name: String,
    pub virtual_size: u64,
    pub chunk_size: u64,
    /// See [`content_digest`].
    pub content_digest: String,
    /// "cold", "imported".
    pub consistency: String,
    pub source_domain: String,
    pub source_host: String,
    pub source_disk: String,
    pub source_format: String,
    pub created_at: i64,
    pub updated_at: i64,
    /// Guest bytes held by data chunks.
    pub data_bytes: u64,
    #[serde(with = "chunk_list")]
    pub chunks: Vec<ChunkRef>,
}

mod chunk_list {
    use super::ChunkRef;
    use serde::{de::Error as _, Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[ChunkRef], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(v.iter().map(|c| c.encode()))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<ChunkRef>, D::Error> {
        let raw: Vec<String> = Vec::deserialize(d)?;
        raw.iter()
            .enumerate()
            .map(|(i, s)| {
                ChunkRef::decode(s)
                    .ok_or_else(|| D::Error::custom(format!("chunk {i}: bad entry {s:?}")))
            })
            .collect()
    }
}

impl ImageRecord {
    /// Number of chunks a disk of `virtual_size` bytes has.
    pub fn chunk_count_for(virtual_size: u64) -> u64 {
        virtual_size.div_ceil(CHUNK_SIZE)
    }

    /// Length in bytes of chunk `index` (the last one may be short).
    pub fn chunk_len(&self, index: u64) -> u64 {
        chunk_len(self.virtual_size, index)
    }

    /// Checks the record's internal consistency (after reading it from disk).
    pub fn validate(&self) -> Result<()> {
        if self.format_version != FORMAT_VERSION {
            return Err(internal(format!(
                "image {}: manifest format {} is not supported (this agent reads {FORMAT_VERSION})",
                self.name, self.format_version
            )));
        }
        if self.chunk_size != CHUNK_SIZE {
            return Err(internal(format!(
                "image {}: chunk size {} unsupported",
                self.name, self.chunk_size
            )));
        }
        if self.chunks.len() as u64 != Self::chunk_count_for(self.virtual_size) {
            return Err(internal(format!(
                "image {}: {} chunks listed for a virtual size of {} bytes",
                self.name,
                self.chunks.len(),
                self.virtual_size
            )));
        }
        Ok(())
    }

    /// Number of zero chunks.
    pub fn zero_chunks(&self) -> u64 {
        self.chunks
            .iter()
            .filter(|c| matches!(c, ChunkRef::Zero))
            .count() as u64
    }

    /// Allocated 64 KiB clusters as sorted ranges of cluster indices (for the qcow2 exporter).
    pub fn allocated_cluster_ranges(&self) -> Vec<std::ops::Range<u64>> {
        let mut out: Vec<std::ops::Range<u64>> = Vec::new();
        for (i, c) in self.chunks.iter().enumerate() {
            let ChunkRef::Data { mask, .. } = c else {
                continue;
            };
            let base = i as u64 * CLUSTERS_PER_CHUNK;
            let mut m = *mask;
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

/// The image's content digest: sha256 over the concatenated sha256 digests of its chunks in
/// guest order, zero chunks included as the digest of their zero bytes. It identifies the
/// guest-visible bytes as surely as a sha256 of the whole raw image, but costs nothing for
/// holes (a whole-image hash would spend seconds per 10 GiB hashing zeros).
pub fn content_digest(virtual_size: u64, chunks: &[ChunkRef]) -> String {
    let mut h = Sha256::new();
    for (i, c) in chunks.iter().enumerate() {
        match c {
            ChunkRef::Zero => h.update(zero_digest(chunk_len(virtual_size, i as u64))),
            ChunkRef::Data { digest, .. } => h.update(digest),
        }
    }
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

/// True when every byte is zero (64-byte blocks OR-folded, which the compiler vectorises).
pub fn is_zero(buf: &[u8]) -> bool {
    let mut blocks = buf.chunks_exact(64);
    blocks
        .by_ref()
        .all(|c| c.iter().fold(0u8, |a, &b| a | b) == 0)
        && blocks.remainder().iter().all(|&b| b == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_ref_text_round_trip() {
        let d = ChunkRef::Data {
            digest: [7; 32],
            mask: 0x8000_0000_0000_0001,
        };
        assert_eq!(ChunkRef::decode(&d.encode()), Some(d));
        assert_eq!(ChunkRef::decode("z"), Some(ChunkRef::Zero));
        assert_eq!(ChunkRef::decode("zz"), None);
        assert_eq!(ChunkRef::decode(&format!("{}/0", "ab".repeat(32))), None);
    }

    #[test]
    fn masks_and_ranges() {
        let mut data = vec![0u8; CHUNK_SIZE as usize];
        data[0] = 1;
        data[CLUSTER_SIZE as usize * 5 + 3] = 1;
        data[CHUNK_SIZE as usize - 1] = 1;
        let mask = cluster_mask(&data);
        assert_eq!(mask, 1 | 1 << 5 | 1 << 63);
        let rec = ImageRecord {
            format_version: 1,
            id: "i".into(),
            name: "n".into(),
            virtual_size: 3 * CHUNK_SIZE,
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
            chunks: vec![
                ChunkRef::Data {
                    digest: [0; 32],
                    mask,
                },
                ChunkRef::Data {
                    digest: [0; 32],
                    mask: u64::MAX,
                },
                ChunkRef::Zero,
            ],
        };
        assert_eq!(rec.allocated_cluster_ranges(), vec![0..1, 5..6, 63..128]);
        rec.validate().unwrap();
        let json = serde_json::to_string(&rec).unwrap();
        let back: ImageRecord = serde_json::from_str(&json).unwrap();
        assert_eq!(back, rec);
    }

    #[test]
    fn zero_detection() {
        assert!(is_zero(&[0u8; 1000][3..]));
        let mut v = vec![0u8; 4099];
        v[4098] = 1;
        assert!(!is_zero(&v));
    }

    #[test]
    fn content_digest_matches_split_definition() {
        let v = CHUNK_SIZE + 10;
        let chunks = [ChunkRef::Zero, ChunkRef::Zero];
        let mut h = Sha256::new();
        h.update(Sha256::digest(vec![0u8; CHUNK_SIZE as usize]));
        h.update(Sha256::digest([0u8; 10]));
        assert_eq!(content_digest(v, &chunks), hex::encode(h.finalize()));
    }
}
