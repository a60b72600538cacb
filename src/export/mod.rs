//! Exports: an image of the repository written out as a file, in one forward pass.
//!
//! - **raw**: a sparse file; only the non-zero 64 KiB clusters are written (`pwrite`), holes
//!   stay holes.
//! - **qcow2**: our streaming encoder ([`crate::format::qcow2`]): the manifest's cluster masks give the
//!   allocation before any data is read, so the tables are written first and the data clusters
//!   follow in guest order; the writer never seeks.
//!
//! Every chunk's digest is checked as it is read: a corrupt chunk fails the export instead of
//! landing in the file. Reading and checking run ahead of the writer on [`READERS`] threads
//! (each at most [`AHEAD`] chunks ahead, buffers handed back for reuse), so the chunk files'
//! reads, their sha256 and the writes overlap; memory stays `READERS × (AHEAD + 2)` chunks.

use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::Ordering;

use crate::error::{Error, ErrorKind, Result};
use crate::format::{qcow2, Format};
use crate::progress::{CancelToken, Progress};
use crate::repo::manifest::CLUSTER_SIZE;
use crate::repo::{ImageRecord, Repository, CHUNK_SIZE};

/// Writes image `rec` to `dest` as a new file of permission bits `mode`: a temp file in its
/// directory, renamed into place when whole (replacing an existing file only with
/// `overwrite`). No symbolic link is followed on the way (see [`crate::hostfile`]). Blocking.
#[allow(clippy::too_many_arguments)]
pub fn export_to(
    repo: &Repository,
    rec: &ImageRecord,
    format: Format,
    dest: &Path,
    overwrite: bool,
    mode: u32,
    progress: &Progress,
    cancel: &CancelToken,
) -> Result<()> {
    let new = crate::hostfile::Destination::open(dest, overwrite, "export path")?.create(mode)?;
    write_file(repo, rec, format, new.file(), dest, progress, cancel)?;
    cancel.check()?;
    new.commit(overwrite)
}

/// Writes image `rec` into the empty `file` (named `dest` in messages). Blocking.
pub fn write_file(
    repo: &Repository,
    rec: &ImageRecord,
    format: Format,
    file: &std::fs::File,
    dest: &Path,
    progress: &Progress,
    cancel: &CancelToken,
) -> Result<()> {
    progress
        .bytes_total
        .store(rec.virtual_size, Ordering::Relaxed);
    let werr = |e: std::io::Error| Error::io(format!("writing export file {}", dest.display()), e);
    match format {
        Format::Raw => {
            file.set_len(rec.virtual_size).map_err(werr)?;
            for_each_data_chunk(repo, rec, progress, cancel, |index, data, mask| {
                let base = index * CHUNK_SIZE;
                for (ci, cl) in data.chunks(CLUSTER_SIZE as usize).enumerate() {
                    if mask & (1 << ci) != 0 {
                        file.write_all_at(cl, base + ci as u64 * CLUSTER_SIZE)
                            .map_err(werr)?;
                    }
                }
                Ok(())
            })?;
        }
        Format::Qcow2 => {
            let layout = qcow2::Qcow2Layout::new(rec.virtual_size, rec.allocated_cluster_ranges())
                .map_err(|e| {
                    Error::new(
                        ErrorKind::Internal,
                        format!("laying out qcow2 for image {}", rec.name),
                    )
                    .with_source(e)
                })?;
            // Around the page cache (the commit syncs the file): see `repo::direct`.
            let mut w = crate::repo::direct::SequentialWriter::new(file);
            for piece in layout.metadata() {
                w.write_all(&piece).map_err(werr)?;
            }
            let pad = vec![0u8; CLUSTER_SIZE as usize];
            for_each_data_chunk(repo, rec, progress, cancel, |_, data, mask| {
                for (ci, cl) in data.chunks(CLUSTER_SIZE as usize).enumerate() {
                    if mask & (1 << ci) != 0 {
                        w.write_all(cl).map_err(werr)?;
                        if cl.len() < CLUSTER_SIZE as usize {
                            w.write_all(&pad[cl.len()..]).map_err(werr)?;
                        }
                    }
                }
                Ok(())
            })?;
            w.finish().map_err(werr)?;
            let len = file.metadata().map_err(werr)?.len();
            if len != layout.total_size() {
                return Err(Error::new(
                    ErrorKind::Internal,
                    format!(
                        "qcow2 export of {} is {len} bytes, layout said {}",
                        rec.name,
                        layout.total_size()
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// Threads that read and check chunks ahead of the writer.
pub const READERS: usize = 2;
/// How many checked chunks each of them may hold ready.
pub const AHEAD: usize = 2;

/// Calls `f(index, bytes, mask)` for each data chunk in guest order (the manifest lists data
/// chunks only, so holes cost nothing), counting progress and checking `cancel` between chunks.
/// The chunks are read and checked by [`READERS`] threads, reader `r` taking the chunks
/// `r, r + READERS, ...`, so taking them back round-robin keeps the order.
fn for_each_data_chunk(
    repo: &Repository,
    rec: &ImageRecord,
    progress: &Progress,
    cancel: &CancelToken,
    mut f: impl FnMut(u64, &[u8], u64) -> Result<()>,
) -> Result<()> {
    use std::sync::atomic::AtomicBool;
    use std::sync::mpsc;
    // Zero chunks are never visited: their bytes are counted up front.
    let data_len: u64 = rec.chunks.iter().map(|c| rec.chunk_len(c.index)).sum();
    let zero_len = rec.virtual_size - data_len;
    progress.bytes_zero.fetch_add(zero_len, Ordering::Relaxed);
    progress.bytes_done.fetch_add(zero_len, Ordering::Relaxed);
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        let mut ready = Vec::with_capacity(READERS);
        let mut spent = Vec::with_capacity(READERS);
        for r in 0..READERS {
            let (tx, rx) = mpsc::sync_channel::<Result<Vec<u8>>>(AHEAD);
            let (back, reuse) = mpsc::channel::<Vec<u8>>();
            ready.push(rx);
            spent.push(back);
            let stop = &stop;
            s.spawn(move || {
                for c in rec.chunks.iter().skip(r).step_by(READERS) {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let mut buf = reuse
                        .try_recv()
                        .unwrap_or_else(|_| Vec::with_capacity(CHUNK_SIZE as usize));
                    let res = repo.read_chunk(&c.digest, &mut buf).map(|()| buf);
                    let failed = res.is_err();
                    if tx.send(res).is_err() || failed {
                        break;
                    }
                }
            });
        }
        let res = (|| {
            for (n, c) in rec.chunks.iter().enumerate() {
                cancel.check()?;
                let (i, len) = (c.index, rec.chunk_len(c.index));
                let buf = ready[n % READERS].recv().map_err(|_| {
                    Error::new(ErrorKind::Internal, "an export reader stopped early")
                })??;
                if buf.len() as u64 != len {
                    return Err(Error::new(
                        ErrorKind::Internal,
                        format!(
                            "image {}: chunk {i} holds {} bytes, expected {len}",
                            rec.name,
                            buf.len()
                        ),
                    ));
                }
                f(i, &buf, c.mask)?;
                let _ = spent[n % READERS].send(buf);
                progress.bytes_read.fetch_add(len, Ordering::Relaxed);
                progress.bytes_done.fetch_add(len, Ordering::Relaxed);
            }
            Ok(())
        })();
        // On an error or a cancel the readers stop at their next chunk; dropping the
        // receivers frees one blocked on a full channel.
        stop.store(true, Ordering::Relaxed);
        drop(ready);
        res
    })
}
