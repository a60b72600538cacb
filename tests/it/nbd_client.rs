//! Integration tests of `imaged::nbd` against real NBD servers: `qemu-nbd` serving a qcow2
//! image with data, zero and hole regions (and a persistent dirty bitmap), and `nbdkit`
//! (pattern, memory and data plugins, error and blocksize-policy filters, structured
//! replies turned off) as a second, independent server implementation.
//!
//! The tools are required: when one is missing the test fails and names it; nothing skips.
//! Every server is a child process killed by a drop guard, also when a test panics.

use std::fs::File;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use imaged::nbd::{
    self, ConnectOptions, Extent, NbdClient, NbdError, BASE_ALLOCATION, NBD_FLAG_HAS_FLAGS,
    NBD_FLAG_READ_ONLY, NBD_STATE_DIRTY, NBD_STATE_HOLE, NBD_STATE_ZERO,
};
use tempfile::TempDir;

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
/// Virtual size of the qcow2 test image.
const DISK_SIZE: u64 = 80 * MIB;
/// Export name qemu-nbd serves the image under.
const EXPORT: &str = "disk";
/// Persistent dirty bitmap in the image, exported by qemu-nbd.
const BITMAP_CONTEXT: &str = "qemu:dirty-bitmap:b0";

// ---- helpers ---------------------------------------------------------------------------

/// Full path of a required tool; panics with a clear message when it is missing.
fn tool(name: &str, package: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        let candidate = dir.join(name);
        if candidate.is_file() {
            return candidate;
        }
    }
    panic!(
        "required tool `{name}` was not found in PATH; install it (Debian package `{package}`) \
         — this test does not skip"
    );
}

/// Runs a command to completion and panics with its stderr when it fails.
fn run(cmd: &mut Command) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed with {}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A server child process; killed (and reaped) on drop.
struct Server {
    child: Child,
    socket: PathBuf,
    log: PathBuf,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    /// Spawns `cmd` (which must listen on `socket`) and waits until the socket accepts.
    fn spawn(mut cmd: Command, socket: PathBuf, log: PathBuf) -> Server {
        let log_file = File::create(&log).expect("create server log");
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
        let mut server = Server { child, socket, log };
        server.wait_ready();
        server
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = self.child.try_wait().expect("poll server") {
                panic!("NBD server exited early with {status}: {}", self.log_text());
            }
            if std::os::unix::net::UnixStream::connect(&self.socket).is_ok() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "NBD server did not listen on {} within 10 s: {}",
                self.socket.display(),
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// The qcow2 test image, its raw contents (from `qemu-img convert`) and a qemu-nbd serving it.
struct QemuFixture {
    server: Server,
    raw: Vec<u8>,
    _dir: TempDir, // dropped after `server` (fields drop in order)
}

/// Builds an 80 MiB qcow2 image:
/// - [1M, 4M) data 0xab, of which [2M, 2M+64K) rewritten 0xcd after bitmap b0 was added,
/// - [8M, 9M) zeroes written as zero clusters,
/// - [40M, 72M) data 0x5a,
/// - everything else never written (holes),
///
/// and serves it read-only with `qemu-nbd`, export name `disk`, bitmap `b0`.
fn qemu_fixture() -> QemuFixture {
    let qemu_img = tool("qemu-img", "qemu-utils");
    let qemu_io = tool("qemu-io", "qemu-utils");
    let qemu_nbd = tool("qemu-nbd", "qemu-utils");
    let dir = tempfile::tempdir().expect("tempdir");
    let image = dir.path().join("disk.qcow2");
    let raw_path = dir.path().join("disk.raw");

    run(Command::new(&qemu_img)
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&image)
        .arg(DISK_SIZE.to_string()));
    run(Command::new(&qemu_io)
        .args(["-f", "qcow2"])
        .args([
            "-c",
            "write -P 0xab 1M 3M",
            "-c",
            "write -z 8M 1M",
            "-c",
            "write -P 0x5a 40M 32M",
        ])
        .arg(&image));
    run(Command::new(&qemu_img)
        .args(["bitmap", "--add"])
        .arg(&image)
        .arg("b0"));
    run(Command::new(&qemu_io)
        .args(["-f", "qcow2", "-c", "write -P 0xcd 2M 64K"])
        .arg(&image));
    run(Command::new(&qemu_img)
        .args(["convert", "-f", "qcow2", "-O", "raw"])
        .arg(&image)
        .arg(&raw_path));
    let raw = std::fs::read(&raw_path).expect("read raw image");
    assert_eq!(raw.len() as u64, DISK_SIZE);
    assert_eq!(raw[MIB as usize], 0xab, "qemu-io did not write the fixture");

    let socket = dir.path().join("nbd.sock");
    let mut cmd = Command::new(qemu_nbd);
    cmd.args([
        "--read-only",
        "--format=qcow2",
        "--persistent",
        "--shared=4",
    ])
    .arg(format!("--socket={}", socket.display()))
    .arg(format!("--export-name={EXPORT}"))
    .arg("--bitmap=b0")
    .arg(&image);
    let server = Server::spawn(cmd, socket, dir.path().join("qemu-nbd.log"));
    QemuFixture {
        server,
        raw,
        _dir: dir,
    }
}

/// Runs nbdkit in the foreground on a unix socket in a fresh directory.
fn nbdkit(args: &[&str]) -> (Server, TempDir) {
    let nbdkit = tool("nbdkit", "nbdkit");
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("nbdkit.sock");
    let mut cmd = Command::new(nbdkit);
    cmd.args(["-f", "-r", "--exit-with-parent", "-U"])
        .arg(&socket)
        .args(args);
    let server = Server::spawn(cmd, socket, dir.path().join("nbdkit.log"));
    (server, dir)
}

fn opts(export: &str, contexts: &[&str]) -> ConnectOptions {
    ConnectOptions {
        export_name: export.to_owned(),
        meta_contexts: contexts.iter().map(|c| c.to_string()).collect(),
    }
}

/// Checks that a map covers [offset, offset + length) contiguously, without empty extents
/// and without two neighbours of equal flags.
fn assert_contiguous(map: &[Extent], offset: u64, length: u64) {
    assert!(!map.is_empty(), "empty map");
    assert_eq!(
        map[0].offset, offset,
        "map does not start at {offset}: {map:?}"
    );
    for w in map.windows(2) {
        assert_eq!(w[0].end(), w[1].offset, "gap or overlap in {map:?}");
        assert_ne!(w[0].flags, w[1].flags, "unmerged neighbours in {map:?}");
    }
    assert!(map.iter().all(|e| e.length > 0));
    assert_eq!(
        map.last().unwrap().end(),
        offset + length,
        "map does not end at the range end"
    );
}

/// Ranges of a map whose flags satisfy `pred`, merged.
fn ranges(map: &[Extent], pred: impl Fn(u32) -> bool) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for e in map.iter().filter(|e| pred(e.flags)) {
        match out.last_mut() {
            Some(last) if last.1 == e.offset => last.1 = e.end(),
            _ => out.push((e.offset, e.end())),
        }
    }
    out
}

/// Expected byte of nbdkit's pattern plugin: each 8-byte word holds its own offset, big-endian.
fn pattern_byte(offset: u64) -> u8 {
    ((offset & !7) >> (8 * (7 - (offset & 7)))) as u8
}

fn assert_same(got: &[u8], want: &[u8], offset: u64) {
    if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
        panic!(
            "data differs at export offset {}: got {:#04x}, want {:#04x}",
            offset + i as u64,
            got[i],
            want[i]
        );
    }
    assert_eq!(got.len(), want.len());
}

// ---- qemu-nbd --------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_nbd_reports_size_flags_and_contexts() {
    let fx = qemu_fixture();
    let client = nbd::connect_unix(
        &fx.server.socket,
        &opts(EXPORT, &[BASE_ALLOCATION, BITMAP_CONTEXT]),
    )
    .await
    .expect("connect");
    assert_eq!(client.size(), DISK_SIZE);
    assert_eq!(client.export_name(), EXPORT);
    let flags = client.transmission_flags();
    assert_ne!(flags & NBD_FLAG_HAS_FLAGS, 0, "flags {flags:#x}");
    assert_ne!(
        flags & NBD_FLAG_READ_ONLY,
        0,
        "qemu-nbd --read-only must say read-only"
    );
    assert!(client.is_read_only());
    let names: Vec<&str> = client
        .meta_contexts()
        .iter()
        .map(|(n, _)| n.as_str())
        .collect();
    assert_eq!(names, [BASE_ALLOCATION, BITMAP_CONTEXT]);
    let bs = client.block_size();
    assert!(
        bs.minimum.is_power_of_two() && bs.maximum >= bs.minimum,
        "{bs:?}"
    );
    client.disconnect().await.expect("disconnect");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_nbd_allocation_map_separates_data_from_holes_and_zeroes() {
    let fx = qemu_fixture();
    let mut client = nbd::connect_unix(&fx.server.socket, &opts(EXPORT, &[BASE_ALLOCATION]))
        .await
        .expect("connect");
    let map = client
        .allocation_map(BASE_ALLOCATION, 0, DISK_SIZE)
        .await
        .expect("allocation map");
    assert_contiguous(&map, 0, DISK_SIZE);

    let data = ranges(&map, |f| f & (NBD_STATE_HOLE | NBD_STATE_ZERO) == 0);
    assert_eq!(
        data,
        [(MIB, 4 * MIB), (40 * MIB, 72 * MIB)],
        "data ranges in {map:?}"
    );
    // Everything else reads as zeroes: the never-written holes and the zero clusters.
    let zero = ranges(&map, |f| f & NBD_STATE_ZERO != 0);
    assert_eq!(
        zero,
        [(0, MIB), (4 * MIB, 40 * MIB), (72 * MIB, DISK_SIZE)],
        "zero ranges in {map:?}"
    );
    // The never-written start of the disk is a hole.
    assert_ne!(map[0].flags & NBD_STATE_HOLE, 0, "{map:?}");
    // And the map agrees with the bytes.
    for e in map.iter().filter(|e| e.flags & NBD_STATE_ZERO != 0) {
        assert!(
            fx.raw[e.offset as usize..e.end() as usize]
                .iter()
                .all(|&b| b == 0),
            "{e:?} not zero"
        );
    }

    // A single block status call answers within the range asked for.
    let ext = client
        .block_status(MIB - 64 * KIB, 128 * KIB, BASE_ALLOCATION)
        .await
        .expect("block status");
    assert!(!ext.is_empty());
    assert_eq!(ext[0].offset, MIB - 64 * KIB);
    assert!(ext.last().unwrap().end() <= MIB + 64 * KIB, "{ext:?}");
    assert_ne!(ext[0].flags & NBD_STATE_ZERO, 0, "{ext:?}");
    client.disconnect().await.expect("disconnect");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_nbd_dirty_bitmap_context_shows_changed_blocks() {
    let fx = qemu_fixture();
    let mut client = nbd::connect_unix(
        &fx.server.socket,
        &opts(EXPORT, &[BASE_ALLOCATION, BITMAP_CONTEXT]),
    )
    .await
    .expect("connect");
    // Both contexts are selected, so each reply carries two chunks; we get the one asked for.
    let dirty = client
        .allocation_map(BITMAP_CONTEXT, 0, DISK_SIZE)
        .await
        .expect("bitmap map");
    assert_contiguous(&dirty, 0, DISK_SIZE);
    assert_eq!(
        ranges(&dirty, |f| f & NBD_STATE_DIRTY != 0),
        [(2 * MIB, 2 * MIB + 64 * KIB)],
        "dirty ranges in {dirty:?}"
    );
    let alloc = client
        .allocation_map(BASE_ALLOCATION, 0, DISK_SIZE)
        .await
        .expect("allocation map");
    assert_contiguous(&alloc, 0, DISK_SIZE);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_nbd_reads_match_raw_image() {
    let fx = qemu_fixture();
    let mut client = nbd::connect_unix(&fx.server.socket, &opts(EXPORT, &[]))
        .await
        .expect("connect");
    let min = u64::from(client.block_size().minimum);

    // The whole disk in 1 MiB pieces.
    let mut buf = vec![0u8; MIB as usize];
    for off in (0..DISK_SIZE).step_by(MIB as usize) {
        buf.fill(0x77);
        client.read(off, &mut buf).await.expect("read");
        assert_same(&buf, &fx.raw[off as usize..(off + MIB) as usize], off);
    }
    // Reads straddling data/hole/zero boundaries, and the last bytes of the disk.
    for (off, len) in [
        (MIB - 4 * KIB, 8 * KIB),
        (2 * MIB + 60 * KIB, 8 * KIB),
        (4 * MIB - 512, 1024),
        (8 * MIB - 512, MIB + 1024),
        (40 * MIB - 3 * MIB, 5 * MIB),
        (DISK_SIZE - 4 * KIB, 4 * KIB),
    ] {
        let mut buf = vec![0x77u8; len as usize];
        client.read(off, &mut buf).await.expect("read");
        assert_same(&buf, &fx.raw[off as usize..(off + len) as usize], off);
    }
    // Byte-granular reads where the server allows them.
    if min == 1 {
        let mut buf = vec![0u8; 3];
        client
            .read(MIB - 1, &mut buf)
            .await
            .expect("unaligned read");
        assert_eq!(buf, [0, 0xab, 0xab]);
    }
    client.disconnect().await.expect("disconnect");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_nbd_large_read_of_64_mib() {
    let fx = qemu_fixture();
    let mut client = nbd::connect_unix(&fx.server.socket, &opts(EXPORT, &[]))
        .await
        .expect("connect");
    let offset = 12 * MIB; // holes, then 32 MiB of data, then holes
    let mut buf = vec![0x77u8; (64 * MIB) as usize];
    let start = Instant::now();
    client.read(offset, &mut buf).await.expect("64 MiB read");
    let took = start.elapsed();
    assert_same(
        &buf,
        &fx.raw[offset as usize..offset as usize + buf.len()],
        offset,
    );
    eprintln!("64 MiB read from qemu-nbd in {took:?}");
    assert!(took < Duration::from_secs(5), "64 MiB read took {took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_nbd_serves_several_connections_at_once() {
    let fx = qemu_fixture();
    let raw = std::sync::Arc::new(fx.raw.clone());
    let quarter = DISK_SIZE / 4;
    let mut clients = Vec::new();
    for _ in 0..4 {
        // All four are connected before any is used: they really are concurrent.
        clients.push(
            nbd::connect_unix(&fx.server.socket, &opts(EXPORT, &[BASE_ALLOCATION]))
                .await
                .expect("connect"),
        );
    }
    let mut tasks = Vec::new();
    for (i, mut client) in clients.into_iter().enumerate() {
        let raw = raw.clone();
        tasks.push(tokio::spawn(async move {
            let start = i as u64 * quarter;
            let map = client
                .allocation_map(BASE_ALLOCATION, start, quarter)
                .await
                .expect("map");
            assert_contiguous(&map, start, quarter);
            let mut buf = vec![0u8; (4 * MIB) as usize];
            for off in (start..start + quarter).step_by(buf.len()) {
                client.read(off, &mut buf).await.expect("read");
                assert_same(&buf, &raw[off as usize..off as usize + buf.len()], off);
            }
            client.disconnect().await.expect("disconnect");
        }));
    }
    for t in tasks {
        t.await.expect("reader task");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_nbd_unknown_export_is_a_clean_error() {
    let fx = qemu_fixture();
    for contexts in [&[][..], &[BASE_ALLOCATION][..]] {
        let err = nbd::connect_unix(&fx.server.socket, &opts("no-such-export", contexts))
            .await
            .expect_err("unknown export must fail");
        match &err {
            NbdError::ExportNotFound { name, .. } => assert_eq!(name, "no-such-export"),
            other => panic!("expected ExportNotFound, got {other:?}"),
        }
        assert!(err.to_string().contains("no-such-export"), "{err}");
    }
    // The server is still fine for the real export.
    let client = nbd::connect_unix(&fx.server.socket, &opts(EXPORT, &[]))
        .await
        .expect("connect");
    client.disconnect().await.expect("disconnect");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_nbd_unknown_meta_context_is_a_clean_error() {
    let fx = qemu_fixture();
    for missing in ["qemu:dirty-bitmap:no-such-bitmap", "base:no-such-context"] {
        let err = nbd::connect_unix(
            &fx.server.socket,
            &opts(EXPORT, &[BASE_ALLOCATION, missing]),
        )
        .await
        .expect_err("unknown context must fail");
        match &err {
            NbdError::MetaContextUnavailable { context, export } => {
                assert_eq!(context, missing);
                assert_eq!(export, EXPORT);
            }
            other => panic!("expected MetaContextUnavailable, got {other:?}"),
        }
        assert!(err.to_string().contains(missing), "{err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_nbd_bad_requests_are_refused_locally_and_the_connection_survives() {
    let fx = qemu_fixture();
    let mut client = nbd::connect_unix(&fx.server.socket, &opts(EXPORT, &[BASE_ALLOCATION]))
        .await
        .expect("connect");
    let mut buf = vec![0u8; 8192];
    let err = client
        .read(DISK_SIZE - 4096, &mut buf)
        .await
        .expect_err("read past the end");
    assert!(matches!(err, NbdError::InvalidRequest(_)), "{err:?}");
    assert!(err.connection_usable());
    let err = client
        .read(u64::MAX - 10, &mut buf)
        .await
        .expect_err("offset overflow");
    assert!(matches!(err, NbdError::InvalidRequest(_)), "{err:?}");
    let err = client
        .block_status(0, MIB, BITMAP_CONTEXT)
        .await
        .expect_err("context not selected");
    assert!(matches!(err, NbdError::InvalidRequest(_)), "{err:?}");
    let err = client
        .block_status(DISK_SIZE, MIB, BASE_ALLOCATION)
        .await
        .expect_err("past the end");
    assert!(matches!(err, NbdError::InvalidRequest(_)), "{err:?}");

    client
        .read(MIB, &mut buf)
        .await
        .expect("read after refused requests");
    assert!(buf.iter().all(|&b| b == 0xab));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_nbd_over_tcp() {
    let qemu_img = tool("qemu-img", "qemu-utils");
    let qemu_nbd = tool("qemu-nbd", "qemu-utils");
    let dir = tempfile::tempdir().expect("tempdir");
    let image = dir.path().join("small.qcow2");
    run(Command::new(&qemu_img)
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&image)
        .arg("4M"));
    // Pick a free loopback port; qemu-nbd binds it right after.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut cmd = Command::new(qemu_nbd);
    cmd.args([
        "--read-only",
        "--format=qcow2",
        "--persistent",
        "--bind=127.0.0.1",
    ])
    .arg(format!("--port={port}"))
    .arg(&image)
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(Stdio::null());
    let child = cmd.spawn().expect("spawn qemu-nbd");
    let _guard = Server {
        child,
        socket: PathBuf::new(),
        log: PathBuf::new(),
    };
    let addr = format!("127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut client = loop {
        match nbd::connect_tcp(addr.as_str(), &opts("", &[BASE_ALLOCATION])).await {
            Ok(c) => break c,
            Err(NbdError::Connect { .. }) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await
            }
            Err(e) => panic!("connect over TCP: {e}"),
        }
    };
    assert_eq!(client.size(), 4 * MIB);
    let map = client
        .allocation_map(BASE_ALLOCATION, 0, 4 * MIB)
        .await
        .expect("map");
    assert_eq!(map.len(), 1);
    assert_ne!(map[0].flags & NBD_STATE_ZERO, 0);
    let mut buf = vec![1u8; MIB as usize];
    client.read(3 * MIB, &mut buf).await.expect("read");
    assert!(buf.iter().all(|&b| b == 0));
    client.disconnect().await.expect("disconnect");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connecting_to_a_missing_socket_is_a_connect_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("nobody-listens.sock");
    let err = NbdClient::connect_unix(&path, &opts("", &[]))
        .await
        .expect_err("no server");
    assert!(matches!(err, NbdError::Connect { .. }), "{err:?}");
    assert!(err.to_string().contains("nobody-listens.sock"), "{err}");
    assert!(std::error::Error::source(&err).is_some());
}

// ---- nbdkit ----------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdkit_pattern_plugin_reads_and_large_read() {
    let (server, _dir) = nbdkit(&["pattern", "size=96M"]);
    let mut client = nbd::connect_unix(&server.socket, &opts("", &[BASE_ALLOCATION]))
        .await
        .expect("connect");
    assert_eq!(client.size(), 96 * MIB);

    let offset = 24 * MIB + 4096;
    let mut buf = vec![0u8; (64 * MIB) as usize];
    let start = Instant::now();
    client.read(offset, &mut buf).await.expect("64 MiB read");
    let took = start.elapsed();
    eprintln!("64 MiB read from nbdkit in {took:?}");
    let want: Vec<u8> = (offset..offset + buf.len() as u64)
        .map(pattern_byte)
        .collect();
    assert_same(&buf, &want, offset);

    let mut small = [0u8; 16];
    client.read(8, &mut small).await.expect("small read");
    assert_eq!(small, [0, 0, 0, 0, 0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0, 16]);

    let map = client
        .allocation_map(BASE_ALLOCATION, 0, 96 * MIB)
        .await
        .expect("map");
    assert_contiguous(&map, 0, 96 * MIB);
    assert!(
        map.iter().all(|e| e.flags & NBD_STATE_ZERO == 0),
        "pattern data is not zero: {map:?}"
    );
    client.disconnect().await.expect("disconnect");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdkit_data_plugin_map_agrees_with_bytes() {
    // 1 MiB of 0x11 at 1 MiB, a short byte string at 5 MiB, the rest sparse.
    let (server, _dir) = nbdkit(&[
        "data",
        "@1048576 ( 0x11 )*1048576 @5242880 1 2 3 4 5 6 7 8",
        "size=8M",
    ]);
    let mut client = nbd::connect_unix(&server.socket, &opts("", &[BASE_ALLOCATION]))
        .await
        .expect("connect");
    let size = client.size();
    assert_eq!(size, 8 * MIB);
    let mut all = vec![0x77u8; size as usize];
    client.read(0, &mut all).await.expect("read all");
    let mut want = vec![0u8; size as usize];
    want[MIB as usize..2 * MIB as usize].fill(0x11);
    want[5 * MIB as usize..5 * MIB as usize + 8].copy_from_slice(&[1, 2, 3, 4, 5, 6, 7, 8]);
    assert_same(&all, &want, 0);

    let map = client
        .allocation_map(BASE_ALLOCATION, 0, size)
        .await
        .expect("map");
    assert_contiguous(&map, 0, size);
    for e in &map {
        let bytes = &want[e.offset as usize..e.end() as usize];
        if e.flags & NBD_STATE_ZERO != 0 {
            assert!(bytes.iter().all(|&b| b == 0), "{e:?} claims zero");
        }
    }
    let data = ranges(&map, |f| f & NBD_STATE_HOLE == 0);
    for must in [MIB, 2 * MIB - 1, 5 * MIB] {
        assert!(
            data.iter().any(|&(a, b)| a <= must && must < b),
            "{must} not in data {data:?}"
        );
    }
    assert!(
        data.iter().all(|&(a, _)| a >= MIB),
        "start of disk should be a hole: {map:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdkit_memory_plugin_is_all_hole() {
    let (server, _dir) = nbdkit(&["memory", "64M"]);
    let mut client = nbd::connect_unix(&server.socket, &opts("", &[BASE_ALLOCATION]))
        .await
        .expect("connect");
    let map = client
        .allocation_map(BASE_ALLOCATION, 0, 64 * MIB)
        .await
        .expect("map");
    assert_eq!(
        map,
        [Extent {
            offset: 0,
            length: 64 * MIB,
            flags: NBD_STATE_HOLE | NBD_STATE_ZERO
        }]
    );
    let mut buf = vec![0x77u8; (40 * MIB) as usize];
    client.read(0, &mut buf).await.expect("read");
    assert!(buf.iter().all(|&b| b == 0));
    client.disconnect().await.expect("disconnect");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdkit_server_error_is_reported_and_the_connection_survives() {
    let (server, _dir) = nbdkit(&[
        "--filter=error",
        "pattern",
        "size=16M",
        "error-pread=EIO",
        "error-pread-rate=100%",
    ]);
    let mut client = nbd::connect_unix(&server.socket, &opts("", &[BASE_ALLOCATION]))
        .await
        .expect("connect");
    let mut buf = vec![0u8; 64 * KIB as usize];
    let err = client
        .read(MIB, &mut buf)
        .await
        .expect_err("the error filter fails every read");
    match &err {
        NbdError::Server {
            command,
            errno,
            offset,
            length,
            ..
        } => {
            assert_eq!(*command, "NBD_CMD_READ");
            assert_eq!(*errno, 5);
            assert_eq!((*offset, *length), (MIB, 64 * KIB));
        }
        other => panic!("expected a server error, got {other:?}"),
    }
    let text = err.to_string();
    assert!(text.contains("EIO") && text.contains("1048576"), "{text}");
    assert!(err.connection_usable());
    // Same connection, next request.
    let ext = client
        .block_status(0, MIB, BASE_ALLOCATION)
        .await
        .expect("block status after error");
    assert!(!ext.is_empty());
    client.disconnect().await.expect("disconnect");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdkit_block_size_constraints_are_honoured() {
    let (server, _dir) = nbdkit(&[
        "--filter=blocksize-policy",
        "pattern",
        "size=16M",
        "blocksize-minimum=512",
        "blocksize-preferred=4096",
        "blocksize-maximum=65536",
        "blocksize-error-policy=error",
    ]);
    let mut client = nbd::connect_unix(&server.socket, &opts("", &[]))
        .await
        .expect("connect");
    let bs = client.block_size();
    assert!(bs.advertised, "{bs:?}");
    assert_eq!((bs.minimum, bs.preferred, bs.maximum), (512, 4096, 65536));
    // 1 MiB + 512 must go out as requests of at most 64 KiB, else the server errors.
    let offset = 3 * MIB - 512;
    let mut buf = vec![0u8; (MIB + 512) as usize];
    client.read(offset, &mut buf).await.expect("split read");
    let want: Vec<u8> = (offset..offset + buf.len() as u64)
        .map(pattern_byte)
        .collect();
    assert_same(&buf, &want, offset);
    // Misaligned requests are refused before they reach the server.
    let mut odd = [0u8; 100];
    let err = client.read(4096, &mut odd).await.expect_err("misaligned");
    assert!(matches!(err, NbdError::InvalidRequest(_)), "{err:?}");
    client
        .read(4096, &mut buf[..512])
        .await
        .expect("aligned read after a refused one");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdkit_without_structured_replies_is_refused_cleanly() {
    let (server, _dir) = nbdkit(&["--no-sr", "memory", "1M"]);
    let err = nbd::connect_unix(&server.socket, &opts("", &[]))
        .await
        .expect_err("must refuse");
    match &err {
        NbdError::OptionRefused { option, .. } => assert_eq!(*option, "NBD_OPT_STRUCTURED_REPLY"),
        other => panic!("expected OptionRefused, got {other:?}"),
    }
    assert!(
        err.to_string().contains("NBD_OPT_STRUCTURED_REPLY"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdkit_unknown_meta_context_is_a_clean_error() {
    let (server, _dir) = nbdkit(&["memory", "1M"]);
    let err = nbd::connect_unix(
        &server.socket,
        &opts("", &[BASE_ALLOCATION, BITMAP_CONTEXT]),
    )
    .await
    .expect_err("nbdkit has no dirty bitmaps");
    assert!(
        matches!(&err, NbdError::MetaContextUnavailable { context, .. } if context == BITMAP_CONTEXT),
        "{err:?}"
    );
}
