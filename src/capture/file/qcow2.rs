//! A qcow2 disk file, with its backing chain, read in this process through `imago`.
//!
//! `imago` (a qcow2/raw reader by a QEMU block-layer developer) reads the format: L1/L2
//! tables, zero and compressed clusters, cluster sizes 512 B to 2 MiB, v2 and v3 headers. What
//! it leaves to its user is done here:
//!
//! - **The chain is walked by us**, never probed: every backing file must name its format
//!   (raw or qcow2); relative names are resolved against the directory of the image that names
//!   them, as QEMU does; protocol and `json:` names, external data files, loops and chains
//!   deeper than [`MAX_DEPTH`] are not read here.
//! - **Locks:** every file of the chain is held with QEMU's read-only image locks
//!   ([`super::lock_shared_read`]), so the domain cannot start on the disk mid-read, as
//!   against `qemu-nbd`; a base shared by other guests stays usable by them.
//! - **Memory:** imago loads each L1 table whole and caches up to 128 L2 tables a file; the
//!   header and L1 table are read first, and a chain whose tables could take more than
//!   [`MAX_TABLE_MEMORY`] (large clusters with many tables, or a hostile header) is not read here.
//! - **Holes of raw backing files** (imago maps a raw file as all data) are found with
//!   `SEEK_DATA`/`SEEK_HOLE`, so they are not read.
//!
//! Anything this reader does not take (an image imago refuses, such as one marked dirty after
//! a crash, zstd-compressed, or with subclusters; the cases above) is [`Qcow2Open::NotNative`]
//! with the reason: the caller then reads the disk through `qemu-nbd` as before. Both roads
//! give the same bytes (`tests/it/native_reader.rs` compares them over a corpus).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use imago::file::File as ImagoFile;
use imago::qcow2::Qcow2;
use imago::raw::Raw;
use imago::{FormatAccess, Mapping, Storage, StorageOpenOptions};

use super::super::source::{BlockSource, DiskReader};
use super::{data_runs, lock_shared_read, map_blocking, read_blocking};
use crate::error::{Error, ErrorKind, Result};
use crate::nbd::{Extent, NBD_STATE_HOLE, NBD_STATE_ZERO};
use crate::repo::ChunkBuf;

/// The deepest backing chain read here (the top image counts as one).
pub const MAX_DEPTH: usize = 16;

/// The most memory a chain's qcow2 tables may take in imago (its L1 tables, loaded whole, and
/// its cache of up to 128 L2 tables a file): a chain that may need more (large clusters with
/// many L2 tables, or a hostile header) goes to qemu-nbd, so memory stays bounded whatever
/// the image says.
pub const MAX_TABLE_MEMORY: u64 = 96 << 20;

/// L2 tables imago caches per qcow2 file.
const L2_CACHE_TABLES: u64 = 128;

/// What opening a qcow2 file gave.
pub enum Qcow2Open {
    /// Read in process.
    Native(Qcow2File),
    /// Not read here, for this reason: read it through qemu-nbd.
    NotNative(String),
}

/// One file of the chain.
struct Layer {
    path: PathBuf,
    /// The same open file description imago reads (for `SEEK_DATA`; it carries the locks).
    file: std::fs::File,
    raw: bool,
}

/// A qcow2 disk (and its backing chain) opened read-only, locked until it drops.
pub struct Qcow2File {
    img: Arc<FormatAccess<ImagoFile>>,
    layers: Arc<Vec<Layer>>,
    size: u64,
    describe: String,
}

/// Stops the walk: the chain is not read here, for `why`.
type Walk<T> = Result<std::result::Result<T, String>>;

impl Qcow2File {
    /// Opens the qcow2 file `path` and its backing chain. Errors are refusals (a file a VM
    /// writes, an unreadable file); `NotNative` says why the chain is left to qemu-nbd.
    pub fn open(path: &Path) -> Result<Qcow2Open> {
        let describe = format!("{} (qcow2)", path.display());
        let file = std::fs::File::open(path).map_err(|e| {
            Error::new(
                ErrorKind::FailedPrecondition,
                format!("cannot open disk {describe}"),
            )
            .with_source(e)
        })?;
        Self::walk(file, path, describe, true)
    }

    /// Reads an import's qcow2 through the descriptor it was inspected by (`path` only names
    /// it); a backing file is not followed (imports have none: inspection refuses them).
    pub fn from_file(file: std::fs::File, path: &Path, describe: String) -> Result<Qcow2Open> {
        Self::walk(file, path, describe, false)
    }

    fn walk(file: std::fs::File, path: &Path, describe: String, chain: bool) -> Result<Qcow2Open> {
        let mut layers = Vec::new();
        let mut seen = Vec::new();
        let mut budget = MAX_TABLE_MEMORY;
        let img = match open_layer(
            file,
            path,
            "qcow2",
            chain,
            &mut seen,
            &mut budget,
            &mut layers,
        )? {
            Ok(img) => img,
            Err(why) => return Ok(Qcow2Open::NotNative(why)),
        };
        let size = img.size();
        if !size.is_multiple_of(512) {
            return Ok(Qcow2Open::NotNative(format!(
                "its virtual size {size} is not whole 512-byte sectors"
            )));
        }
        Ok(Qcow2Open::Native(Qcow2File {
            img: Arc::new(img),
            layers: Arc::new(layers),
            size,
            describe,
        }))
    }

    /// The virtual size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }
}

/// Opens one file of the chain as `format` and, when `chain`, what it is backed by; pushes
/// every file opened onto `layers`.
fn open_layer(
    file: std::fs::File,
    path: &Path,
    format: &str,
    chain: bool,
    seen: &mut Vec<(u64, u64)>,
    budget: &mut u64,
    layers: &mut Vec<Layer>,
) -> Walk<FormatAccess<ImagoFile>> {
    use std::os::unix::fs::MetadataExt;
    let describe = format!("{} ({format})", path.display());
    let meta = file
        .metadata()
        .map_err(|e| Error::io(format!("reading the metadata of {describe}"), e))?;
    if !meta.is_file() {
        return Ok(Err(format!("{describe} is not a regular file")));
    }
    if seen.contains(&(meta.dev(), meta.ino())) {
        return Ok(Err(format!("the backing chain loops at {describe}")));
    }
    seen.push((meta.dev(), meta.ino()));
    if seen.len() > MAX_DEPTH {
        return Ok(Err(format!(
            "the backing chain is deeper than {MAX_DEPTH} files"
        )));
    }
    lock_shared_read(&file, &describe)?;
    if format == "qcow2" {
        let need = match table_memory(&file) {
            Ok(n) => n,
            Err(e) => return Ok(Err(format!("{describe}: reading its tables: {e}"))),
        };
        if need > *budget {
            return Ok(Err(format!(
                "{describe}: its tables would take {} MiB of memory here (the chain may use {} MiB)",
                need >> 20,
                MAX_TABLE_MEMORY >> 20
            )));
        }
        *budget -= need;
    }
    let ours = file
        .try_clone()
        .map_err(|e| Error::io(format!("duplicating the descriptor of {describe}"), e))?;
    let storage = match ImagoFile::from_open_file(file, StorageOpenOptions::new().filename(path)) {
        Ok(s) => s,
        Err(e) => return Ok(Err(format!("{describe}: {e}"))),
    };
    layers.push(Layer {
        path: path.to_path_buf(),
        file: ours,
        raw: format == "raw",
    });
    if format == "raw" {
        return Ok(match Raw::open_image(storage, false) {
            Ok(r) => Ok(FormatAccess::new(r)),
            Err(e) => Err(format!("{describe}: {e}")),
        });
    }
    let mut q = match Qcow2::<ImagoFile>::open_image(storage, false) {
        Ok(q) => q,
        Err(e) => return Ok(Err(format!("{describe}: {e}"))),
    };
    if q.requires_external_data_file() {
        return Ok(Err(format!(
            "{describe} keeps its data in an external file"
        )));
    }
    let backing = match q.implicit_backing_file() {
        None => None,
        Some(_) if !chain => return Ok(Err(format!("{describe} has a backing file"))),
        Some(name) => {
            let Some(fmt) = q.implicit_backing_format().cloned() else {
                return Ok(Err(format!(
                    "{describe} does not record the format of its backing file {name:?}"
                )));
            };
            if fmt != "raw" && fmt != "qcow2" {
                return Ok(Err(format!("{describe} is backed by a {fmt} file")));
            }
            let first = name.split('/').next().unwrap_or_default();
            if first.contains(':') {
                return Ok(Err(format!(
                    "{describe} names its backing file {name:?} by protocol"
                )));
            }
            let next = if Path::new(name).is_absolute() {
                PathBuf::from(name)
            } else {
                path.parent().unwrap_or(Path::new(".")).join(name)
            };
            let f = match std::fs::File::open(&next) {
                Ok(f) => f,
                Err(e) => {
                    return Ok(Err(format!(
                        "backing file {} of {describe}: {e}",
                        next.display()
                    )))
                }
            };
            match open_layer(f, &next, &fmt, chain, seen, budget, layers)? {
                Ok(b) => Some(b),
                Err(why) => return Ok(Err(why)),
            }
        }
    };
    q.set_backing(backing);
    Ok(Ok(FormatAccess::new(q)))
}

/// The memory imago's tables of the qcow2 `file` may take: its L1 table, and one cluster for
/// each distinct L2 table the L1 names, up to the cache's 128 (read from the header and the L1
/// table; a file that is not a plausible qcow2 costs nothing here, imago refuses it).
fn table_memory(file: &std::fs::File) -> std::io::Result<u64> {
    use std::os::unix::fs::FileExt;
    let mut h = [0u8; 48];
    file.read_exact_at(&mut h, 0)?;
    let be32 = |at: usize| u32::from_be_bytes(h[at..at + 4].try_into().unwrap_or_default());
    if &h[..4] != b"QFI\xfb" {
        return Ok(0);
    }
    let cluster_bits = be32(20);
    if !(9..=21).contains(&cluster_bits) {
        return Ok(0);
    }
    let cluster = 1u64 << cluster_bits;
    let l1_bytes = u64::from(be32(36)) * 8;
    if l1_bytes > MAX_TABLE_MEMORY {
        return Ok(l1_bytes);
    }
    let l1_offset = u64::from_be_bytes(h[40..48].try_into().unwrap_or_default());
    let mut l1 = vec![0u8; l1_bytes as usize];
    file.read_exact_at(&mut l1, l1_offset)?;
    // Bits 9 to 55 of an L1 entry are its L2 table's offset; 0 is no table.
    let mut l2: Vec<u64> = l1
        .chunks_exact(8)
        .map(|e| u64::from_be_bytes(e.try_into().unwrap_or_default()) & 0x00ff_ffff_ffff_fe00)
        .filter(|o| *o != 0)
        .collect();
    l2.sort_unstable();
    l2.dedup();
    Ok(l1_bytes + (l2.len() as u64).min(L2_CACHE_TABLES) * cluster)
}

/// The whole disk's extents from the chain's own tables, holes of raw layers split out.
fn extent_map(
    img: &FormatAccess<ImagoFile>,
    layers: &[Layer],
    size: u64,
) -> std::io::Result<Vec<Extent>> {
    const HOLE: u32 = NBD_STATE_HOLE | NBD_STATE_ZERO;
    let mut out: Vec<Extent> = Vec::new();
    let mut push = |offset: u64, length: u64, flags: u32| {
        if length == 0 {
            return;
        }
        match out.last_mut() {
            Some(e) if e.offset + e.length == offset && e.flags == flags => e.length += length,
            _ => out.push(Extent::new(offset, length, flags)),
        }
    };
    let mut off = 0u64;
    while off < size {
        let (m, len) = img.get_mapping(off, size - off)?;
        let len = len.min(size - off);
        if len == 0 {
            push(off, size - off, HOLE);
            break;
        }
        match m {
            Mapping::Raw {
                storage, offset, ..
            } => {
                let name = storage.get_filename();
                match layers
                    .iter()
                    .find(|l| l.raw && name.as_deref() == Some(l.path.as_path()))
                {
                    Some(layer) => {
                        for (o, l, data) in data_runs(&layer.file, offset, offset + len)? {
                            push(off + (o - offset), l, if data { 0 } else { HOLE });
                        }
                    }
                    None => push(off, len, 0),
                }
            }
            Mapping::Zero { explicit: true, .. } => push(off, len, NBD_STATE_ZERO),
            Mapping::Zero { .. } => push(off, len, HOLE),
            Mapping::Eof { .. } => {
                push(off, size - off, HOLE);
                break;
            }
            // Compressed clusters, and whatever else imago may add: read them.
            _ => push(off, len, 0),
        }
        off += len;
    }
    Ok(out)
}

#[tonic::async_trait]
impl BlockSource for Qcow2File {
    async fn reader(&self) -> Result<Box<dyn DiskReader>> {
        Ok(Box::new(Qcow2Reader {
            img: self.img.clone(),
            layers: self.layers.clone(),
            size: self.size,
            describe: Arc::from(self.describe.as_str()),
        }))
    }

    fn describe(&self) -> &str {
        &self.describe
    }
}

/// A worker's reader of a [`Qcow2File`]: imago's reads on the blocking pool.
struct Qcow2Reader {
    img: Arc<FormatAccess<ImagoFile>>,
    layers: Arc<Vec<Layer>>,
    size: u64,
    describe: Arc<str>,
}

#[tonic::async_trait]
impl DiskReader for Qcow2Reader {
    fn size(&self) -> u64 {
        self.size
    }

    async fn allocation_map(&mut self) -> Result<Vec<Extent>> {
        let (img, layers, size) = (self.img.clone(), self.layers.clone(), self.size);
        map_blocking(&self.describe, move || extent_map(&img, &layers, size)).await
    }

    async fn read(
        &mut self,
        offset: u64,
        buf: ChunkBuf,
        at: std::ops::Range<usize>,
    ) -> (ChunkBuf, Result<()>) {
        let img = self.img.clone();
        read_blocking(&self.describe, offset, buf, at, move |b| {
            img.read(b, offset)
        })
        .await
    }

    async fn close(self: Box<Self>) {}
}
