//! Issue 10, the native reader: a raw disk file read in process ([`RawFile`]) gives the same
//! image as the same file served by the real `qemu-nbd`, and holds QEMU's image lock the way
//! qemu-nbd does, so a real libvirt domain cannot start on a disk being read.
//!
//! Real parts: `qemu-nbd` (format raw, read-only) on the same file, the capture pipeline
//! (`imaged::capture::run`) over both roads, and a lab domain under libvirt whose system disk
//! is a raw file. The pipeline's chunk store here is an in-memory map (the stores are tested
//! on their own elsewhere): what is compared is every chunk's index, digest and cluster mask.

use std::collections::HashMap;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::{Arc, Mutex};

use imaged::capture::file::RawFile;
use imaged::capture::source::{BlockSource, NbdExport};
use imaged::progress::{CancelToken, Progress};
use imaged::repo::{ChunkStore, DataChunk, Digest, PutOutcome, CHUNK_SIZE};

use crate::support::lab::{Lab, SystemDisk};

/// Keeps chunks in memory: what the pipeline stored, by digest.
#[derive(Default)]
struct MemStore(Mutex<HashMap<Digest, Vec<u8>>>);

#[tonic::async_trait]
impl ChunkStore for MemStore {
    async fn put(
        &self,
        digest: Digest,
        buf: Vec<u8>,
        len: usize,
    ) -> (Vec<u8>, imaged::error::Result<PutOutcome>) {
        let mut m = self.0.lock().unwrap();
        let outcome = match m.entry(digest) {
            std::collections::hash_map::Entry::Occupied(_) => PutOutcome::Existing,
            std::collections::hash_map::Entry::Vacant(v) => {
                v.insert(buf[..len].to_vec());
                PutOutcome::Stored
            }
        };
        (buf, Ok(outcome))
    }

    async fn flush(&self) -> imaged::error::Result<()> {
        Ok(())
    }

    fn describe(&self) -> String {
        "memory".into()
    }
}

/// Captures `source` with the pipeline; returns its chunks and the bytes it read.
async fn capture(source: &dyn BlockSource, readers: usize) -> (Vec<DataChunk>, u64, u64) {
    let store = Arc::new(MemStore::default());
    let progress = Arc::new(Progress::default());
    let got = imaged::capture::run(
        source,
        readers,
        u64::MAX,
        store.clone(),
        progress.clone(),
        CancelToken::default(),
    )
    .await
    .unwrap_or_else(|e| panic!("capturing {}: {e}", source.describe()));
    let read = progress
        .bytes_read
        .load(std::sync::atomic::Ordering::Relaxed);
    (got.chunks, got.virtual_size, read)
}

/// A sparse raw file: data across chunk boundaries, an allocated run of zeros, holes, and a
/// length that is not whole sectors.
fn make_disk(path: &Path) -> Vec<(u64, Vec<u8>)> {
    let f = std::fs::File::create(path).unwrap();
    let len = 96 * (1 << 20) + 1000;
    f.set_len(len).unwrap();
    let mut written = Vec::new();
    let mut seed = 1u32;
    let mut rnd = |n: usize| -> Vec<u8> {
        (0..n)
            .map(|_| {
                seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                (seed >> 24) as u8
            })
            .collect()
    };
    for (off, n) in [
        (0u64, 4096usize),
        (CHUNK_SIZE - 8192, 3 << 20), // across the first chunk boundary
        (10 * CHUNK_SIZE + 65536, 1 << 20),
        (len - 1000 - 4096, 5096), // up to the odd end
    ] {
        let data = rnd(n);
        f.write_all_at(&data, off).unwrap();
        written.push((off, data));
    }
    // Written zeros: allocated, reads as zero; neither road may store them as data.
    f.write_all_at(&vec![0u8; 2 << 20], 20 * CHUNK_SIZE)
        .unwrap();
    f.sync_all().unwrap();
    written
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_raw_file_read_in_process_gives_the_image_qemu_nbd_gives() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.raw");
    let written = make_disk(&disk);

    let native = RawFile::open(&disk).expect("opening the raw file");
    let (native_chunks, native_size, native_read) = capture(&native, 3).await;
    drop(native);

    let export = NbdExport::start(
        Path::new("qemu-nbd"),
        &disk,
        "raw",
        dir.path(),
        "native-vs-nbd",
        3,
    )
    .await
    .expect("qemu-nbd on the raw file");
    let (nbd_chunks, nbd_size, nbd_read) = capture(&export, 3).await;
    export.stop().await;

    assert_eq!(native_size, nbd_size, "virtual sizes differ");
    assert_eq!(native_size % 512, 0);
    assert_eq!(
        native_chunks, nbd_chunks,
        "the two roads give different chunks"
    );
    // Every written byte is in a data chunk; the holes were not read.
    for (off, data) in &written {
        let first = off / CHUNK_SIZE;
        let last = (off + data.len() as u64 - 1) / CHUNK_SIZE;
        for i in first..=last {
            assert!(
                native_chunks.iter().any(|c| c.index == i),
                "chunk {i} (data at {off}) missing"
            );
        }
    }
    assert!(
        native_read < 16 << 20,
        "the native reader read {native_read} bytes of a file with ~9 MiB allocated"
    );
    eprintln!(
        "{} data chunks; read: native {native_read} B, qemu-nbd {nbd_read} B",
        native_chunks.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_domain_cannot_start_while_its_raw_disk_is_read_in_process() {
    let lab = Lab::get();
    let guest = lab
        .guest("locked-raw")
        .system_disk(SystemDisk::Raw)
        .create();
    let reader = RawFile::open(guest.disk_path()).expect("opening the raw system disk");
    let started = crate::support::lab::virsh(&["start", guest.name()]);
    let msg = started.expect_err("the domain started while its disk was read");
    assert!(
        msg.contains("lock"),
        "expected QEMU's image lock to refuse the start: {msg}"
    );
    assert_eq!(guest.state(), "shut off");
    drop(reader);
    crate::support::lab::virsh(&["start", guest.name()])
        .expect("the domain starts once the reader is gone");
    // And while the domain runs (QEMU holds the disk for writing), the reader refuses it.
    let e = RawFile::open(guest.disk_path())
        .err()
        .expect("a disk QEMU writes is refused");
    assert!(e.to_string().contains("VM"), "{e}");
    guest.destroy();
}
