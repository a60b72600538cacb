//! Disk files of this host read in this process: the native readers of cold captures and
//! imports. Raw files here ([`RawFile`]); qcow2 chains in [`qcow2`] (through imago).
//!
//! A raw image needs no format driver: its bytes are the guest's bytes. Reading it through
//! `qemu-nbd` costs a process, a socket and two more copies of every byte; here the workers
//! `pread` straight into their chunk buffers (on the blocking pool), and the allocation map
//! comes from the file system (`SEEK_DATA`/`SEEK_HOLE`): holes are never read. [`open_path`]
//! picks the reader for a format, or says why a file goes through `qemu-nbd`
//! ([`super::source::NbdExport`]) instead.
//!
//! **Locks.** While a [`RawFile`] is open it holds QEMU's image locks the way a read-only
//! QEMU user does (QEMU's `file-posix` protocol: open-file-description byte-range locks,
//! byte 100 + n for "I use permission n", byte 200 + n for "nobody else may have permission
//! n"). It uses consistent reads and shares neither writing nor resizing, so a QEMU that
//! starts on the disk for writing fails to take its lock, as it does against `qemu-nbd`: the
//! domain cannot start mid-capture. A file some QEMU already writes is refused at open.
//!
//! **Size.** QEMU presents a raw file in whole 512-byte sectors; so does this reader (the
//! tail past the end of the file reads as zeros), so both roads give the same image.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use super::source::{BlockSource, DiskReader};
use crate::error::{Error, ErrorKind, Result};
use crate::nbd::{Extent, NBD_STATE_HOLE, NBD_STATE_ZERO};
use crate::repo::ChunkBuf;

pub mod qcow2;

pub use qcow2::Qcow2File;

/// QEMU's lock byte of "this open file uses permission n" is `PERM_BASE + n`.
const PERM_BASE: i64 = 100;
/// QEMU's lock byte of "this open file lets nobody else have permission n" is `SHARED_BASE + n`.
const SHARED_BASE: i64 = 200;
/// QEMU's permission bits (`BLK_PERM_*`), as bit numbers.
const PERM_CONSISTENT_READ: i64 = 0;
const PERM_WRITE: i64 = 1;
const PERM_RESIZE: i64 = 3;

/// What a disk file of this host is read through.
pub enum Native {
    /// In process.
    Reader(Arc<dyn BlockSource>),
    /// Not here, for this reason: through qemu-nbd.
    NotNative(String),
}

impl From<qcow2::Qcow2Open> for Native {
    fn from(o: qcow2::Qcow2Open) -> Native {
        match o {
            qcow2::Qcow2Open::Native(q) => Native::Reader(Arc::new(q)),
            qcow2::Qcow2Open::NotNative(why) => Native::NotNative(why),
        }
    }
}

/// Opens the disk file `path` of `format` ("raw" or "qcow2") to be read in process, taking
/// QEMU's image locks; errors are refusals (a VM writes the disk, the file cannot be opened).
/// Blocks: call it on the blocking pool.
pub fn open_path(path: &Path, format: &str) -> Result<Native> {
    match format {
        "raw" => {
            // Opened once: the descriptor checked is the one read.
            let file = match File::open(path) {
                Ok(f) if f.metadata().is_ok_and(|m| m.is_file()) => f,
                _ => {
                    return Ok(Native::NotNative(format!(
                        "{} is not a regular file",
                        path.display()
                    )))
                }
            };
            let describe = format!("{} (raw)", path.display());
            Ok(Native::Reader(Arc::new(RawFile::from_file(
                file, describe,
            )?)))
        }
        "qcow2" => Ok(Qcow2File::open(path)?.into()),
        other => Ok(Native::NotNative(format!("format {other}"))),
    }
}

/// The same for a file already open (an import's inspected descriptor, duplicated); `path`
/// only names it. A qcow2 backing file is not followed.
pub fn open_file(file: File, path: &Path, format: &str) -> Result<Native> {
    let describe = format!("{} ({format})", path.display());
    match format {
        "raw" => Ok(Native::Reader(Arc::new(RawFile::from_file(
            file, describe,
        )?))),
        "qcow2" => Ok(Qcow2File::from_file(file, path, describe)?.into()),
        other => Ok(Native::NotNative(format!("format {other}"))),
    }
}

/// A raw disk file opened read-only, with QEMU's read locks held until it drops.
pub struct RawFile {
    file: Arc<File>,
    size: u64,
    describe: String,
}

impl RawFile {
    /// Opens `path` read-only and takes the locks; refuses a file that is not a regular
    /// file, or that a running QEMU has open for writing.
    pub fn open(path: &Path) -> Result<RawFile> {
        let describe = format!("{} (raw)", path.display());
        let file = File::open(path).map_err(|e| {
            Error::new(
                ErrorKind::FailedPrecondition,
                format!("cannot open disk {describe}"),
            )
            .with_source(e)
        })?;
        Self::from_file(file, describe)
    }

    /// Reads `file` (already open, e.g. the descriptor an import was inspected through),
    /// named `describe` in messages.
    pub fn from_file(file: File, describe: String) -> Result<RawFile> {
        let meta = file
            .metadata()
            .map_err(|e| Error::io(format!("reading the metadata of disk {describe}"), e))?;
        if !meta.is_file() {
            return Err(Error::new(
                ErrorKind::FailedPrecondition,
                format!("disk {describe} is not a regular file"),
            ));
        }
        lock_shared_read(&file, &describe)?;
        Ok(RawFile {
            size: meta.len().div_ceil(512) * 512,
            file: Arc::new(file),
            describe,
        })
    }

    /// The virtual size: the file's length in whole 512-byte sectors.
    pub fn size(&self) -> u64 {
        self.size
    }
}

/// One `fcntl` record lock on byte `at`: set (`F_OFD_SETLK`) or tested (`F_OFD_GETLK`).
/// Returns whether the byte is free of conflicting locks (tests) or locked (sets).
fn ofd_lock(file: &File, cmd: libc::c_int, kind: libc::c_int, at: i64) -> std::io::Result<bool> {
    // SAFETY: `flock` is a plain C struct; zeroed is a valid value, and the fields that
    // matter are set below.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = kind as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = at;
    fl.l_len = 1;
    // l_pid must be 0 for open-file-description locks.
    fl.l_pid = 0;
    // SAFETY: fcntl with an OFD lock command reads (and for GETLK writes) the `flock` we own,
    // on a descriptor that stays open for the call.
    let r = unsafe { libc::fcntl(file.as_raw_fd(), cmd, &mut fl as *mut libc::flock) };
    if r == -1 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(cmd != libc::F_OFD_GETLK || fl.l_type == libc::F_UNLCK as libc::c_short)
}

/// Takes QEMU's locks of a read-only user that shares neither writing nor resizing, and
/// checks that nobody writes or resizes the file already.
pub(super) fn lock_shared_read(file: &File, describe: &str) -> Result<()> {
    let locked = |e: std::io::Error| {
        Error::new(
            ErrorKind::FailedPrecondition,
            format!("cannot lock disk {describe} for reading (is a VM using this disk?)"),
        )
        .with_source(e)
    };
    for byte in [
        PERM_BASE + PERM_CONSISTENT_READ,
        SHARED_BASE + PERM_WRITE,
        SHARED_BASE + PERM_RESIZE,
    ] {
        ofd_lock(file, libc::F_OFD_SETLK, libc::F_RDLCK, byte).map_err(locked)?;
    }
    for perm in [PERM_WRITE, PERM_RESIZE] {
        let free =
            ofd_lock(file, libc::F_OFD_GETLK, libc::F_WRLCK, PERM_BASE + perm).map_err(locked)?;
        if !free {
            return Err(Error::new(
                ErrorKind::FailedPrecondition,
                format!(
                    "disk {describe} is open for {} by another process (is a VM using this \
                     disk?): it cannot be read consistently",
                    if perm == PERM_WRITE {
                        "writing"
                    } else {
                        "resizing"
                    }
                ),
            ));
        }
    }
    Ok(())
}

/// The data and hole runs of `[start, end)` of `file`, in order and covering the range:
/// `(offset, length, is_data)`, from `SEEK_DATA`/`SEEK_HOLE`. A file system without them
/// reports all data. Bytes past the end of the file count as hole.
pub(super) fn data_runs(
    file: &File,
    start: u64,
    end: u64,
) -> std::io::Result<Vec<(u64, u64, bool)>> {
    let fd = file.as_raw_fd();
    let seek = |off: u64, whence: libc::c_int| -> std::io::Result<Option<u64>> {
        // SAFETY: lseek on a descriptor we hold open; it only moves this description's offset,
        // which no reader uses (they all use pread).
        let r = unsafe { libc::lseek(fd, off as libc::off_t, whence) };
        if r >= 0 {
            return Ok(Some(r as u64));
        }
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ENXIO) {
            Ok(None) // no data (or no hole) at or after `off`
        } else {
            Err(e)
        }
    };
    let mut out: Vec<(u64, u64, bool)> = Vec::new();
    let mut push = |offset: u64, to: u64, data: bool| {
        if to > offset {
            out.push((offset, to - offset, data));
        }
    };
    let mut at = start;
    while at < end {
        let data = match seek(at, libc::SEEK_DATA) {
            Ok(Some(d)) => d.min(end),
            Ok(None) => end,
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                // No SEEK_DATA here: everything from `at` on is data.
                push(at, end, true);
                break;
            }
            Err(e) => return Err(e),
        };
        push(at, data, false);
        if data >= end {
            break;
        }
        let hole = seek(data, libc::SEEK_HOLE)?.unwrap_or(end).min(end);
        push(data, hole, true);
        at = hole;
    }
    Ok(out)
}

/// The extents of a raw file of `len` bytes presented as `size` bytes (the sector tail past
/// the end of the file is a hole).
fn extents(file: &File, len: u64, size: u64) -> std::io::Result<Vec<Extent>> {
    const HOLE: u32 = NBD_STATE_HOLE | NBD_STATE_ZERO;
    let mut out: Vec<Extent> = data_runs(file, 0, len)?
        .into_iter()
        .map(|(o, l, data)| Extent::new(o, l, if data { 0 } else { HOLE }))
        .collect();
    if size > len {
        out.push(Extent::new(len, size - len, HOLE));
    }
    Ok(out)
}

/// Runs `map` (a blocking walk of a file's allocation) on the blocking pool; names the disk
/// (`describe`) in its error.
pub(super) async fn map_blocking<F>(describe: &str, map: F) -> Result<Vec<Extent>>
where
    F: FnOnce() -> std::io::Result<Vec<Extent>> + Send + 'static,
{
    match tokio::task::spawn_blocking(map).await {
        Ok(Ok(ex)) => Ok(ex),
        Ok(Err(e)) => Err(Error::io(
            format!("reading the allocation map of {describe}"),
            e,
        )),
        Err(e) => Err(Error::new(ErrorKind::Internal, "allocation map task failed").with_source(e)),
    }
}

/// Runs `read` (a blocking read of `at.len()` bytes at disk offset `offset` into the slice it
/// is given, `buf[at]`) on the blocking pool, the buffer travelling with it; names the disk in
/// its error. The buffer always comes back (a fresh one if the task itself failed).
pub(super) async fn read_blocking<F>(
    describe: &str,
    offset: u64,
    buf: ChunkBuf,
    at: std::ops::Range<usize>,
    read: F,
) -> (ChunkBuf, Result<()>)
where
    F: FnOnce(&mut [u8]) -> std::io::Result<()> + Send + 'static,
{
    let len = at.len();
    let cap = buf.len();
    let res = tokio::task::spawn_blocking(move || {
        let mut buf = buf;
        let r = read(&mut buf[at]);
        (buf, r)
    })
    .await;
    match res {
        Ok((buf, r)) => {
            let r = r.map_err(|e| {
                Error::io(
                    format!("reading {len} bytes at offset {offset} of {describe}"),
                    e,
                )
            });
            (buf, r)
        }
        Err(e) => (
            ChunkBuf::zeroed(cap),
            Err(Error::new(ErrorKind::Internal, "read task failed").with_source(e)),
        ),
    }
}

#[tonic::async_trait]
impl BlockSource for RawFile {
    async fn reader(&self) -> Result<Box<dyn DiskReader>> {
        Ok(Box::new(RawReader {
            file: self.file.clone(),
            size: self.size,
            describe: Arc::from(self.describe.as_str()),
        }))
    }

    fn describe(&self) -> &str {
        &self.describe
    }
}

/// A worker's reader of a [`RawFile`]: `pread` on the blocking pool.
struct RawReader {
    file: Arc<File>,
    size: u64,
    describe: Arc<str>,
}

#[tonic::async_trait]
impl DiskReader for RawReader {
    fn size(&self) -> u64 {
        self.size
    }

    async fn allocation_map(&mut self) -> Result<Vec<Extent>> {
        let (file, size) = (self.file.clone(), self.size);
        map_blocking(&self.describe, move || {
            let len = file.metadata()?.len().min(size);
            extents(&file, len, size)
        })
        .await
    }

    async fn read(
        &mut self,
        offset: u64,
        buf: ChunkBuf,
        at: std::ops::Range<usize>,
    ) -> (ChunkBuf, Result<()>) {
        let file = self.file.clone();
        read_blocking(&self.describe, offset, buf, at, move |b| {
            file.read_exact_at(b, offset)
        })
        .await
    }

    async fn close(self: Box<Self>) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map_of(f: &File, size: u64) -> Vec<(u64, u64, bool)> {
        let len = f.metadata().unwrap().len();
        extents(f, len, size)
            .unwrap()
            .into_iter()
            .map(|e| (e.offset, e.length, e.flags & NBD_STATE_ZERO == 0))
            .collect()
    }

    #[test]
    fn holes_are_mapped_as_zeros_and_data_as_data() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.raw");
        let f = File::create(&p).unwrap();
        let m = 1u64 << 20;
        f.set_len(16 * m).unwrap();
        f.write_all_at(&[7u8; 4096], 4 * m).unwrap();
        f.write_all_at(&[9u8; 4096], 15 * m).unwrap();
        let f = File::open(&p).unwrap();
        let map = map_of(&f, 16 * m);
        // The extents cover the file in order.
        let mut at = 0;
        for (off, len, _) in &map {
            assert_eq!(*off, at);
            at += len;
        }
        assert_eq!(at, 16 * m);
        // Every written byte is in a data extent; most of the file is hole (a file system
        // may round data extents to its blocks).
        let data: u64 = map.iter().filter(|e| e.2).map(|e| e.1).sum();
        assert!(data < 2 * m, "{map:?}");
        for spot in [4 * m, 15 * m] {
            assert!(
                map.iter()
                    .any(|(o, l, d)| *d && *o <= spot && spot + 4096 <= o + l),
                "{spot} not in data: {map:?}"
            );
        }
    }

    #[test]
    fn a_file_of_odd_length_reads_in_whole_sectors_with_a_zero_tail() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .build()
            .unwrap();
        rt.block_on(async {
            let dir = tempfile::tempdir().unwrap();
            let p = dir.path().join("odd.raw");
            std::fs::write(&p, vec![5u8; 1000]).unwrap();
            let src = RawFile::open(&p).unwrap();
            assert_eq!(src.size(), 1024);
            let mut r = src.reader().await.unwrap();
            let map = r.allocation_map().await.unwrap();
            assert_eq!(
                map.last().unwrap().offset + map.last().unwrap().length,
                1024
            );
            let tail = map.iter().find(|e| e.offset + e.length == 1024).unwrap();
            assert_ne!(tail.flags & NBD_STATE_ZERO, 0, "{map:?}");
            let (buf, res) = r.read(0, ChunkBuf::zeroed(1000), 0..1000).await;
            res.unwrap();
            assert!(buf.iter().all(|b| *b == 5));
            // Reading past the end of the file is an error naming the disk.
            let (_, res) = r.read(512, ChunkBuf::zeroed(1024), 0..1024).await;
            let e = res.unwrap_err();
            assert!(e.to_string().contains("odd.raw"), "{e}");
            r.close().await;
        });
    }

    #[test]
    fn a_disk_held_for_writing_is_refused_and_our_lock_keeps_a_writer_out() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("held.raw");
        std::fs::write(&p, vec![0u8; 4096]).unwrap();
        // A writer as QEMU takes it: "I use write" on byte 101.
        let writer = File::options().read(true).write(true).open(&p).unwrap();
        assert!(ofd_lock(
            &writer,
            libc::F_OFD_SETLK,
            libc::F_RDLCK,
            PERM_BASE + PERM_WRITE
        )
        .unwrap());
        let e = RawFile::open(&p)
            .err()
            .expect("refused while a writer holds it");
        assert_eq!(e.kind(), ErrorKind::FailedPrecondition);
        assert!(e.to_string().contains("held.raw"), "{e}");
        assert!(e.to_string().contains("writing"), "{e}");
        drop(writer);
        // Now ours: a QEMU that wants to write tests byte 201 and finds it taken.
        let ours = RawFile::open(&p).unwrap();
        let other = File::open(&p).unwrap();
        let free = ofd_lock(
            &other,
            libc::F_OFD_GETLK,
            libc::F_WRLCK,
            SHARED_BASE + PERM_WRITE,
        )
        .unwrap();
        assert!(!free, "a writer would not see our lock");
        drop(ours);
        let free = ofd_lock(
            &other,
            libc::F_OFD_GETLK,
            libc::F_WRLCK,
            SHARED_BASE + PERM_WRITE,
        )
        .unwrap();
        assert!(free, "our lock outlived the reader");
    }
}
