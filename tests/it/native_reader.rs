//! Issue 10, the native readers: a disk file read in process (raw: [`RawFile`]; qcow2 and its
//! backing chain through imago: [`Qcow2File`]) gives the same image as the same file served by
//! the real `qemu-nbd`, over a corpus of images made by the real `qemu-img`/`qemu-io`
//! (compressed clusters, 512 B to 2 MiB clusters, zero clusters, discarded ranges, v2 headers,
//! a raw ← qcow2 ← qcow2 chain with a relative backing name); images the native reader does
//! not take are handed to qemu-nbd with the reason; and both readers hold QEMU's image lock the
//! way qemu-nbd does, so a real libvirt domain cannot start on a disk being read.
//!
//! Real parts: `qemu-nbd` (read-only, format named) on the same files, the capture pipeline
//! (`imaged::capture::run`) over both roads, and lab domains under libvirt. The pipeline's chunk store here is an in-memory map (the stores are tested
//! on their own elsewhere): what is compared is every chunk's index, digest and cluster mask.

use std::collections::HashMap;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::{Arc, Mutex};

use imaged::capture::file::{self, Native, RawFile};
use imaged::capture::source::{BlockSource, NbdExport};
use imaged::progress::{CancelToken, Progress};
use imaged::repo::{ChunkBuf, ChunkStore, DataChunk, Digest, PutOutcome, CHUNK_SIZE};

use crate::support::lab::{Lab, SystemDisk};

/// Keeps chunks in memory: what the pipeline stored, by digest.
#[derive(Default)]
struct MemStore(Mutex<HashMap<Digest, Vec<u8>>>);

#[tonic::async_trait]
impl ChunkStore for MemStore {
    async fn put(
        &self,
        digest: Digest,
        buf: ChunkBuf,
        len: usize,
    ) -> (ChunkBuf, imaged::error::Result<PutOutcome>) {
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

    async fn reuse(&self, chunks: Vec<(Digest, usize)>) -> imaged::error::Result<Vec<bool>> {
        let m = self.0.lock().unwrap();
        Ok(chunks.iter().map(|(d, _)| m.contains_key(d)).collect())
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
        None,
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

/// Runs `qemu-img` or `qemu-io`, failing the test with its output.
fn run(cmd: &str, args: &[&str]) {
    let out = std::process::Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Fills a qcow2 with data in a pattern per offset, zero clusters and discarded ranges.
fn fill(path: &Path) {
    let p = path.to_str().unwrap();
    run(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 0x11 0 1536",
            "-c",
            "write -P 0x22 4190208 65536",
            "-c",
            "write -P 0x33 20M 3M",
            "-c",
            "write -z 21M 512k",
            "-c",
            "discard 22M 64k",
            "-c",
            "write -P 0x44 40M 4k",
            p,
        ],
    );
}

/// Captures `disk` (format `fmt`) on both roads and compares the chunks.
async fn both_roads(disk: &Path, fmt: &str, run_dir: &Path) -> usize {
    let native = match file::open_path(disk, fmt).expect("opening") {
        Native::Reader(r) => r,
        Native::NotNative(why) => panic!("{}: not read natively: {why}", disk.display()),
    };
    let (a, size_a, _) = capture(native.as_ref(), 2).await;
    drop(native);
    let export = NbdExport::start(Path::new("qemu-nbd"), disk, fmt, run_dir, "corpus", 2)
        .await
        .expect("qemu-nbd");
    let (b, size_b, _) = capture(&export, 2).await;
    export.stop().await;
    assert_eq!(size_a, size_b, "{}: virtual sizes differ", disk.display());
    assert_eq!(
        a,
        b,
        "{}: the two roads give different chunks",
        disk.display()
    );
    a.len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qcow2_images_read_in_process_give_the_images_qemu_nbd_gives() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut checked = Vec::new();
    // Cluster sizes from 512 B to 2 MiB; v2 and v3 headers.
    for (name, opts) in [
        ("c512.qcow2", "cluster_size=512"),
        ("c64k.qcow2", "cluster_size=65536"),
        ("c2m.qcow2", "cluster_size=2097152"),
        ("v2.qcow2", "compat=0.10"),
    ] {
        let p = d.join(name);
        run(
            "qemu-img",
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                opts,
                p.to_str().unwrap(),
                "64M",
            ],
        );
        fill(&p);
        checked.push((p, "qcow2"));
    }
    // Compressed clusters (qemu-img convert -c), from one of the above.
    let comp = d.join("compressed.qcow2");
    run(
        "qemu-img",
        &[
            "convert",
            "-q",
            "-c",
            "-f",
            "qcow2",
            "-O",
            "qcow2",
            d.join("c64k.qcow2").to_str().unwrap(),
            comp.to_str().unwrap(),
        ],
    );
    checked.push((comp, "qcow2"));
    // A chain: sparse raw base <- qcow2 (in a subdirectory, relative name) <- qcow2 top,
    // the top larger than its backing.
    let base = d.join("base.raw");
    make_disk(&base);
    std::fs::create_dir(d.join("sub")).unwrap();
    let mid = d.join("sub/mid.qcow2");
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=512",
            "-b",
            "../base.raw",
            "-F",
            "raw",
            mid.to_str().unwrap(),
        ],
    );
    run(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 0x55 8M 1M",
            "-c",
            "write -z 0 4096",
            mid.to_str().unwrap(),
        ],
    );
    let top = d.join("top.qcow2");
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "sub/mid.qcow2",
            "-F",
            "qcow2",
            top.to_str().unwrap(),
            "128M",
        ],
    );
    run(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 0x66 9M 64k",
            "-c",
            "write -P 0x77 100M 1M",
            top.to_str().unwrap(),
        ],
    );
    checked.push((top, "qcow2"));
    for (p, fmt) in &checked {
        let n = both_roads(p, fmt, d).await;
        assert!(n > 0, "{}: no data chunks", p.display());
        eprintln!("{}: {n} data chunks, the same on both roads", p.display());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn images_the_native_reader_does_not_take_go_to_qemu_nbd_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mk = |name: &str, opts: &str| -> std::path::PathBuf {
        let p = d.join(name);
        run(
            "qemu-img",
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                opts,
                p.to_str().unwrap(),
                "16M",
            ],
        );
        run(
            "qemu-io",
            &[
                "-f",
                "qcow2",
                "-c",
                "write -P 0x5a 1M 1M",
                p.to_str().unwrap(),
            ],
        );
        p
    };
    let zstd = mk("zstd.qcow2", "compression_type=zstd");
    let subclusters = mk("el2.qcow2", "extended_l2=on");
    let external = mk(
        "ext.qcow2",
        &format!("data_file={}", d.join("ext.data").display()),
    );
    // Marked dirty (incompatible feature bit 0), as a lazy-refcounts image after a crash.
    let dirty = mk("dirty.qcow2", "lazy_refcounts=on");
    {
        let f = std::fs::File::options()
            .read(true)
            .write(true)
            .open(&dirty)
            .unwrap();
        let mut b = [0u8; 1];
        f.read_exact_at(&mut b, 79).unwrap();
        f.write_all_at(&[b[0] | 1], 79).unwrap();
    }
    // A backing file named by protocol (QEMU's business, not a path).
    let protocol = d.join("proto.qcow2");
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-u",
            "-b",
            "nbd://127.0.0.1:1/x",
            "-F",
            "raw",
            protocol.to_str().unwrap(),
            "16M",
        ],
    );
    // A header whose L1 table names 100 L2 tables of 2 MiB clusters (a hostile one, or a
    // 50 TiB disk with data everywhere): imago would cache 200 MiB of them.
    let tables = d.join("tables.qcow2");
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=2M",
            tables.to_str().unwrap(),
            "60T",
        ],
    );
    {
        let f = std::fs::File::options()
            .read(true)
            .write(true)
            .open(&tables)
            .unwrap();
        let mut h = [0u8; 8];
        f.read_exact_at(&mut h, 40).unwrap();
        let l1 = u64::from_be_bytes(h);
        for i in 0..100u64 {
            let entry = ((i + 8) << 21) | (1 << 63);
            f.write_all_at(&entry.to_be_bytes(), l1 + i * 8).unwrap();
        }
    }
    for (p, want) in [
        (&tables, "memory"),
        (&zstd, "compression"),
        (&subclusters, "extended"),
        (&external, "external"),
        (&dirty, "dirty"),
        (&protocol, "protocol"),
    ] {
        match file::open_path(p, "qcow2").expect("a refusal is not an error") {
            Native::Reader(_) => panic!("{} was read natively", p.display()),
            Native::NotNative(why) => {
                assert!(why.to_lowercase().contains(want), "{}: {why}", p.display());
                eprintln!("{}: to qemu-nbd: {why}", p.display());
            }
        }
    }
    // qemu-nbd reads them (the fallback works): the dirty one, for instance.
    let export = NbdExport::start(Path::new("qemu-nbd"), &dirty, "qcow2", d, "dirty", 1)
        .await
        .expect("qemu-nbd on a dirty image");
    let (chunks, _, _) = capture(&export, 1).await;
    export.stop().await;
    assert_eq!(chunks.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_domain_cannot_start_while_its_qcow2_chain_is_read_in_process() {
    let lab = Lab::get();
    let guest = lab.guest("locked-q2").create();
    // A sibling on the same base image: the base stays usable by others.
    let sibling = lab.guest("locked-q2-sib").create();
    let reader = match file::open_path(guest.disk_path(), "qcow2").expect("opening the overlay") {
        Native::Reader(r) => r,
        Native::NotNative(why) => panic!("the lab's overlay is not read natively: {why}"),
    };
    let started = crate::support::lab::virsh(&["start", guest.name()]);
    let msg = started.expect_err("the domain started while its disk was read");
    assert!(
        msg.contains("lock"),
        "expected QEMU's image lock to refuse the start: {msg}"
    );
    assert_eq!(guest.state(), "shut off");
    crate::support::lab::virsh(&["start", sibling.name()])
        .expect("a sibling on the same base starts while the base is read");
    sibling.destroy();
    drop(reader);
    crate::support::lab::virsh(&["start", guest.name()])
        .expect("the domain starts once the reader is gone");
    let e = match file::open_path(guest.disk_path(), "qcow2") {
        Err(e) => e,
        Ok(_) => panic!("a disk QEMU writes was opened"),
    };
    assert!(e.to_string().contains("VM"), "{e}");
    guest.destroy();
}
