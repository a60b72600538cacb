//! Issue 9, the agent's side: captures of real guests through the chunk pipeline into a real
//! `imagerepo` server over TCP with mutual TLS, sending only the chunks it lacks.
//!
//! Real parts: the `imagerepo` binary (a SQLite catalog and a chunk directory in a temp dir,
//! a TCP listener with mutual TLS, an admin unix socket the test reads the images back
//! through), a real `imaged` daemon with a `[targets.central] kind = "imagerepo"` table, and
//! Debian guests of the lab under libvirt with the guest agent, whose system disks are qcow2
//! overlays over one base image.
//!
//! What each capture shows: the operation's progress (bytes new vs. already stored), the
//! server's own count of what it received for the upload (`GetUpload`), and the image read
//! back from the repository (`GetManifest` + `GetChunk` into a raw file) compared with the
//! guest's disk by `qemu-img compare`, together with the content digest recomputed from the
//! exported bytes.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use imaged::proto::imagerepo::v1 as rpb;
use rpb::chunk_service_client::ChunkServiceClient;
use sha2::{Digest as _, Sha256};
use tonic::transport::Channel;

use crate::support::api::proto;
use crate::support::daemon::{assert_identical, Daemon, DaemonOptions};
use crate::support::lab::{Guest, Lab};
use crate::support::pki::Pki;
use crate::support::servers::{PgDatabase, Postgres, S3, S3_LOCK};

const PROJECT: &str = "p1";
const AGENT_CN: &str = "imaged-agent-1";
/// A second hypervisor's agent, also a service of the repository.
const AGENT2_CN: &str = "imaged-agent-2";
const CHUNK: u64 = 4 << 20;

/// `text` without the terminal colour sequences (`ESC [ ... m`) a log may carry.
fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut it = text.chars();
    while let Some(c) = it.next() {
        if c == '\u{1b}' {
            for c in it.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Where the repository keeps its catalog and its chunks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Storage {
    /// The embedded defaults: SQLite and a chunk directory, both in the data directory.
    Local,
    /// A fresh database of the tests' PostgreSQL and a fresh prefix of the tests' S3 bucket.
    PostgresS3,
}

/// A running `imagerepo` server, killed on drop.
struct RepoServer {
    child: Child,
    /// The catalog's PostgreSQL database ([`Storage::PostgresS3`]), dropped after the server.
    _database: Option<PgDatabase>,
    dir: tempfile::TempDir,
    socket: PathBuf,
    log: PathBuf,
    /// `https://127.0.0.1:PORT`.
    url: String,
    pki: Pki,
}

impl RepoServer {
    /// Starts the server again (after [`RepoServer::kill`]) on the same port, with the same
    /// catalog and chunks.
    fn restart(&mut self) {
        let config = self.dir.path().join("imagerepo.toml");
        let text = std::fs::read_to_string(&config).unwrap();
        let addr = self.url.trim_start_matches("https://");
        std::fs::write(
            &config,
            text.replace(
                "tcp_listen = \"127.0.0.1:0\"",
                &format!("tcp_listen = \"{addr}\""),
            ),
        )
        .unwrap();
        let _ = std::fs::remove_file(&self.socket);
        let before = strip_ansi(&self.log_text())
            .matches("imagerepo ready")
            .count();
        self.child = Command::new(env!("CARGO_BIN_EXE_imagerepo"))
            .arg("--config")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(
                std::fs::OpenOptions::new()
                    .append(true)
                    .open(&self.log)
                    .unwrap(),
            )
            .spawn()
            .expect("spawning imagerepo again");
        let t0 = Instant::now();
        while strip_ansi(&self.log_text())
            .matches("imagerepo ready")
            .count()
            == before
        {
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "imagerepo did not restart within 60 s:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Kills the server (SIGKILL): connections break mid-call.
    fn kill(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// Starts the server on a free port, its catalog and chunks on `storage`; `AGENT_CN` and
    /// `AGENT2_CN` are services, uid 0 on the socket admin.
    fn start(storage: Storage) -> RepoServer {
        let dir = tempfile::Builder::new()
            .prefix("imagerepo-test-")
            .tempdir()
            .unwrap();
        let pki = Pki::new(&dir.path().join("pki"));
        pki.client(AGENT_CN, None, false);
        pki.client(AGENT2_CN, None, false);
        let socket = dir.path().join("imagerepo.sock");
        let log = dir.path().join("imagerepo.log");
        let config = dir.path().join("imagerepo.toml");
        let (database, storage_toml) = match storage {
            Storage::Local => (None, String::new()),
            Storage::PostgresS3 => {
                let db = Postgres::get().database();
                let (url, password) = db.url_and_password();
                let pw_file = dir.path().join("catalog.password");
                std::fs::write(&pw_file, format!("{password}\n")).unwrap();
                let s3 = S3::get();
                let prefix = format!(
                    "imagerepo-capture-{}-{}/",
                    std::process::id(),
                    dir.path().file_name().unwrap().to_string_lossy()
                );
                let toml = format!(
                    "[catalog]\nbackend = \"postgres\"\nurl = {url:?}\npassword_file = {pw_file:?}\n\
                     [chunks]\nbackend = \"s3\"\nendpoint = {:?}\nbucket = {:?}\naccess_key = {:?}\n\
                     secret_key = {:?}\nprefix = {prefix:?}\n",
                    s3.endpoint, s3.bucket, s3.access_key, s3.secret_key
                );
                (Some(db), toml)
            }
        };
        std::fs::write(
            &config,
            format!(
                "[server]\ndata_dir = {:?}\nsocket = {socket:?}\ntcp_listen = \"127.0.0.1:0\"\nlog_level = \"info\"\n\
                 [tls]\ncert = {:?}\nkey = {:?}\nclient_ca = {:?}\n{storage_toml}\
                 [[policy]]\nrole = \"service\"\ntls_subjects = [\"{AGENT_CN}\", \"{AGENT2_CN}\"]\n\
                 [[policy]]\nrole = \"admin\"\nunix_uids = [0]\n",
                dir.path().join("data"),
                pki.dir.join("server.pem"),
                pki.dir.join("server.key"),
                pki.dir.join("client-ca.pem"),
            ),
        )
        .unwrap();
        // Owner-only: the config and the password file hold secrets, and the server refuses
        // them when others may read them.
        for f in [config.clone(), dir.path().join("catalog.password")] {
            use std::os::unix::fs::PermissionsExt;
            if f.exists() {
                std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).unwrap();
            }
        }
        let child = Command::new(env!("CARGO_BIN_EXE_imagerepo"))
            .arg("--config")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("spawning imagerepo");
        let t0 = Instant::now();
        let url = loop {
            let text = strip_ansi(&std::fs::read_to_string(&log).unwrap_or_default());
            if let Some(at) = text.find("tcp=127.0.0.1:") {
                let rest = &text[at + "tcp=".len()..];
                let addr: String = rest.chars().take_while(|c| !c.is_whitespace()).collect();
                break format!("https://{addr}");
            }
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "imagerepo did not get ready within 60 s; its log:\n{text}"
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        RepoServer {
            child,
            _database: database,
            dir,
            socket,
            log,
            url,
            pki,
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The `[targets.central]` table of a daemon that sends to this server as `AGENT_CN`.
    fn target_toml(&self, extra: &str) -> String {
        self.target_toml_as(AGENT_CN, extra)
    }

    /// The same as the agent whose certificate names `cn`.
    fn target_toml_as(&self, cn: &str, extra: &str) -> String {
        format!(
            "[targets.central]\nkind = \"imagerepo\"\naddress = \"{}\"\nca = {:?}\ncert = {:?}\nkey = {:?}\nproject = \"{PROJECT}\"\n{extra}\n",
            self.url,
            self.pki.dir.join("server-ca.pem"),
            self.pki.dir.join(format!("{cn}.pem")),
            self.pki.dir.join(format!("{cn}.key")),
        )
    }

    /// A ChunkService client on the admin socket.
    async fn admin(&self) -> ChunkServiceClient<Channel> {
        let ch = imaged::cli::connect(&self.socket)
            .await
            .expect("imagerepo socket");
        ChunkServiceClient::new(ch).max_decoding_message_size(8 << 20)
    }

    /// Reads image `name` (`projects/P/images/ID`) back into a sparse raw file; returns the
    /// manifest header and the content digest recomputed from the bytes written.
    async fn export_raw(&self, name: &str, to: &Path) -> (rpb::ManifestHeader, String) {
        use std::os::unix::fs::FileExt;
        let mut c = self.admin().await;
        let mut s = c
            .get_manifest(rpb::GetManifestRequest { name: name.into() })
            .await
            .expect("GetManifest")
            .into_inner();
        let mut header = None;
        let mut entries = Vec::new();
        while let Some(m) = s.message().await.expect("manifest stream") {
            if m.header.is_some() {
                header = m.header;
            }
            entries.extend(m.entries);
        }
        let header = header.expect("a manifest header");
        let f = std::fs::File::create(to).unwrap();
        f.set_len(header.virtual_size_bytes).unwrap();
        let mut digests: Vec<Option<[u8; 32]>> =
            vec![None; header.virtual_size_bytes.div_ceil(CHUNK) as usize];
        for e in &entries {
            let mut st = c
                .get_chunk(rpb::GetChunkRequest {
                    image: name.into(),
                    digest: e.digest.clone(),
                })
                .await
                .expect("GetChunk")
                .into_inner();
            let mut data = Vec::new();
            while let Some(p) = st.message().await.expect("chunk stream") {
                assert_eq!(p.offset as usize, data.len(), "pieces in order");
                data.extend(p.data);
            }
            let got = hex::encode(Sha256::digest(&data));
            assert_eq!(got, e.digest, "chunk {} reads back as its digest", e.index);
            f.write_all_at(&data, e.index * CHUNK).unwrap();
            digests[e.index as usize] = Some(Sha256::digest(&data).into());
        }
        // The content digest, recomputed: sha256 over every chunk's sha256, zero chunks too.
        let mut h = Sha256::new();
        let size = header.virtual_size_bytes;
        for (i, d) in digests.iter().enumerate() {
            let d = d.unwrap_or_else(|| {
                let len = CHUNK.min(size - i as u64 * CHUNK) as usize;
                Sha256::digest(vec![0u8; len]).into()
            });
            h.update(d);
        }
        (header, hex::encode(h.finalize()))
    }

    /// The server's record of an upload: chunks and bytes it received.
    async fn upload(&self, name: &str) -> rpb::Upload {
        self.admin()
            .await
            .get_upload(rpb::GetUploadRequest { name: name.into() })
            .await
            .expect("GetUpload")
            .into_inner()
    }
}

impl Drop for RepoServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!(
                "imagerepo log ({}):\n{}",
                self.dir.path().display(),
                self.log_text()
            );
        }
    }
}

fn to_central(domain: &str, image: &str, tag: &str) -> proto::CaptureRequest {
    proto::CaptureRequest {
        domain: domain.into(),
        image_name: image.into(),
        mode: proto::CaptureMode::Cold as i32,
        target: Some(proto::Target {
            kind: Some(proto::target::Kind::Remote(proto::RemoteTarget {
                name: "central".into(),
                tag: tag.into(),
                ..Default::default()
            })),
        }),
        ..Default::default()
    }
}

/// What one capture did.
struct Captured {
    image: String,
    new_bytes: u64,
    existing_bytes: u64,
    received_bytes: u64,
}

/// Captures the shut-off `guest` into the central repository and checks the image reads back
/// identical to the disk, with the content digest the repository recorded.
async fn capture(d: &Daemon, repo: &RepoServer, guest: &Guest, image: &str, tag: &str) -> Captured {
    let mut images = d.images().await;
    let op = images
        .capture(to_central(guest.name(), image, tag))
        .await
        .expect("capture to central")
        .into_inner();
    let op = d.wait_op(&op.id).await;
    d.assert_active(&op);
    let p = op.progress.expect("progress");
    assert!(
        op.location
            .starts_with(&format!("projects/{PROJECT}/images/")),
        "the operation names the repository image: {op:?}"
    );
    // The upload the daemon logged for this operation, as the server counts it.
    let log = strip_ansi(&d.log_text());
    let line = log
        .lines()
        .rev()
        .find(|l| l.contains("image uploaded to the central repository") && l.contains(&op.id))
        .unwrap_or_else(|| panic!("no upload line for {} in the daemon log:\n{log}", op.id));
    let upload: String = line[line.find("upload=").expect("upload=") + "upload=".len()..]
        .chars()
        .take_while(|c| !c.is_whitespace())
        .collect();
    let up = repo.upload(&upload).await;
    assert_eq!(up.state, rpb::UploadState::Committed as i32, "{up:?}");
    assert_eq!(up.image, op.location);

    let raw = d.dir.path().join(format!("{image}-{tag}.raw"));
    let (header, digest) = repo.export_raw(&op.location, &raw).await;
    assert_identical(&raw, "raw", guest.disk_path(), "qcow2");
    assert_eq!(
        header.content_digest, digest,
        "content digest of {image}:{tag}"
    );
    std::fs::remove_file(&raw).unwrap();
    let field = |k: &str| -> String {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(&format!("{k}=")))
            .unwrap_or("?")
            .to_string()
    };
    eprintln!(
        "capture {image}:{tag}: new {} B, existing {} B, zero {} B; the server received {} B in {} chunks; \
         FindMissingChunks: {} calls for {} digests; {} s",
        p.new_bytes,
        p.existing_bytes,
        p.zero_bytes,
        up.bytes_received,
        up.chunks_received,
        field("find_calls"),
        field("digests_asked"),
        field("seconds"),
    );
    Captured {
        image: op.location,
        new_bytes: p.new_bytes,
        existing_bytes: p.existing_bytes,
        received_bytes: up.bytes_received,
    }
}

/// Starts the guest, writes `len` bytes of fresh data into `path` through the guest agent,
/// syncs, and shuts the guest down again.
fn write_in_guest(guest: &Guest, path: &str, len: usize, seed: u8) {
    guest.start();
    guest.wait_agent(Duration::from_secs(240));
    // Incompressible, distinct per seed: every 4 MiB of it is a chunk nobody has.
    let mut data = Vec::with_capacity(len);
    let mut x = Sha256::digest([seed]).to_vec();
    while data.len() < len {
        x = Sha256::digest(&x).to_vec();
        data.extend_from_slice(&x);
    }
    data.truncate(len);
    guest.write_file(path, &data);
    guest.exec_ok(&["sync"]);
    guest.shutdown(Duration::from_secs(240));
}

/// Two captures of one guest, with a file written in between: the second sends a small
/// fraction of the first's bytes, and both read back identical to the disk.
async fn second_capture_sends_only_what_changed(storage: Storage, guest_name: &str) {
    let lab = Lab::get();
    let repo = RepoServer::start(storage);
    let d = Daemon::start_with(DaemonOptions {
        extra_toml: repo.target_toml(""),
        ..Default::default()
    });
    let guest = lab.guest(guest_name).create();
    write_in_guest(&guest, "/root/first.bin", 3 << 20, 1);

    let first = capture(&d, &repo, &guest, "web", "v1").await;
    // The repository was empty: everything with data was new and was sent.
    assert!(
        first.new_bytes > 64 << 20,
        "first capture new bytes: {}",
        first.new_bytes
    );
    assert_eq!(first.received_bytes, first.new_bytes);

    // A file written in between: 8 MiB, two or three chunks.
    write_in_guest(&guest, "/root/second.bin", 8 << 20, 2);
    let second = capture(&d, &repo, &guest, "web", "v2").await;
    // Another tag is another image record; its chunks are the first's but for the changes.
    assert_ne!(second.image, first.image);
    assert!(
        second.existing_bytes > first.new_bytes / 2,
        "the second capture found most chunks stored: {} existing of {}",
        second.existing_bytes,
        first.new_bytes
    );
    // Sent: the new file's chunks and what the boot changed (logs, journal), a small fraction.
    assert!(second.new_bytes >= 8 << 20, "{}", second.new_bytes);
    assert!(
        second.received_bytes * 5 < first.received_bytes,
        "the second capture sent {} B, the first {} B",
        second.received_bytes,
        first.received_bytes
    );
    assert_eq!(second.received_bytes, second.new_bytes);
    eprintln!(
        "{storage:?}: sent: first capture {} B, second capture {} B ({:.1}%)",
        first.received_bytes,
        second.received_bytes,
        100.0 * second.received_bytes as f64 / first.received_bytes as f64
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_capture_of_a_guest_sends_only_what_changed() {
    second_capture_sends_only_what_changed(Storage::Local, "irepo").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_capture_sends_only_what_changed_on_postgres_and_s3() {
    let _l = S3_LOCK.read().await;
    second_capture_sends_only_what_changed(Storage::PostgresS3, "irepo-pg").await;
}

/// A live capture of a running guest into the central repository, done; its operation.
async fn live_to_central(d: &Daemon, guest: &Guest, tag: &str) -> proto::Operation {
    let mut req = to_central(guest.name(), "live", tag);
    req.mode = proto::CaptureMode::CrashConsistent as i32;
    let op = d
        .images()
        .await
        .capture(req)
        .await
        .expect("live capture to central")
        .into_inner();
    let op = d.wait_op(&op.id).await;
    d.assert_active(&op);
    op
}

/// Live recaptures into the central repository are incremental: the second reads only what the
/// guest wrote since the first, takes every other chunk from the first image (the repository is
/// asked whether it still has them), and makes the same image as a full read of the same moment.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_recapture_into_the_repository_reads_only_what_changed() {
    let lab = Lab::get();
    let repo = RepoServer::start(Storage::Local);
    let d = Daemon::start_with(DaemonOptions {
        extra_toml: repo.target_toml(""),
        ..Default::default()
    });
    let guest = lab.guest("irepo-live").create();
    guest.start();
    guest.wait_agent(Duration::from_secs(240));
    guest.wait_booted(Duration::from_secs(240));
    let first = live_to_central(&d, &guest, "t1").await;
    let read = |op: &proto::Operation| op.progress.map_or(0, |p| p.read_bytes);
    let r1 = first.read.clone().expect("a read report");
    assert!(!r1.incremental && !r1.checkpoint.is_empty(), "{r1:?}");

    guest.sh_ok("dd if=/dev/urandom of=/root/new bs=1M count=16 conv=fsync status=none");
    crate::support::daemon::run("virsh", &["suspend", guest.name()]);
    let second = live_to_central(&d, &guest, "t2").await;
    let r2 = second.read.clone().expect("a read report");
    assert!(r2.incremental, "{r2:?}");
    assert_eq!(r2.since_checkpoint, r1.checkpoint);
    assert!(
        read(&second) >= 16 << 20 && read(&second) * 4 < read(&first),
        "the recapture read {} B, the first capture {} B",
        read(&second),
        read(&first)
    );
    // The same moment read whole (no saved checkpoint): the same content.
    let saved = d.dir.path().join("state/checkpoints");
    for f in std::fs::read_dir(&saved).unwrap().flatten() {
        std::fs::remove_file(f.path()).unwrap();
    }
    let full = live_to_central(&d, &guest, "t3").await;
    assert!(!full.read.clone().expect("a read report").incremental);
    crate::support::daemon::run("virsh", &["resume", guest.name()]);
    let (inc_header, inc_digest) = repo
        .export_raw(&second.location, &d.dir.path().join("t2.raw"))
        .await;
    let (full_header, _) = repo
        .export_raw(&full.location, &d.dir.path().join("t3.raw"))
        .await;
    assert_eq!(inc_header.content_digest, inc_digest);
    assert_eq!(
        inc_header.content_digest, full_header.content_digest,
        "an incremental image equals a full read of the same moment"
    );
    eprintln!(
        "live into imagerepo: first read {} B, incremental read {} B ({} B changed)",
        read(&first),
        read(&second),
        r2.changed_bytes
    );
}

/// Two agents (two daemons, each with its own certificate, as on two hypervisors) capture two
/// guests made from the same base image: the second sends only what differs.
async fn a_sibling_on_another_agent_sends_only_what_differs(storage: Storage, prefix: &str) {
    let lab = Lab::get();
    let repo = RepoServer::start(storage);
    let agent1 = Daemon::start_with(DaemonOptions {
        extra_toml: repo.target_toml("chunks_in_flight = 2\n"),
        ..Default::default()
    });
    let agent2 = Daemon::start_with(DaemonOptions {
        extra_toml: repo.target_toml_as(AGENT2_CN, ""),
        ..Default::default()
    });
    // Both system disks are qcow2 overlays over the lab's one base image.
    let a = lab.guest(&format!("{prefix}-a")).create();
    let b = lab.guest(&format!("{prefix}-b")).create();
    let first = capture(&agent1, &repo, &a, "base-a", "").await;
    assert!(first.new_bytes > 64 << 20, "{}", first.new_bytes);

    write_in_guest(&b, "/root/b.bin", 6 << 20, 3);
    let second = capture(&agent2, &repo, &b, "guest-b", "").await;
    assert_ne!(second.image, first.image);
    assert!(second.new_bytes >= 6 << 20, "{}", second.new_bytes);
    assert!(
        second.received_bytes * 5 < first.received_bytes,
        "the sibling sent {} B, the first guest {} B",
        second.received_bytes,
        first.received_bytes
    );
    eprintln!(
        "{storage:?}: sent: first guest {} B (agent 1), sibling {} B (agent 2) ({:.1}%)",
        first.received_bytes,
        second.received_bytes,
        100.0 * second.received_bytes as f64 / first.received_bytes as f64
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_from_the_same_base_sends_only_what_differs() {
    a_sibling_on_another_agent_sends_only_what_differs(Storage::Local, "irepo").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_from_the_same_base_sends_only_what_differs_on_postgres_and_s3() {
    let _l = S3_LOCK.read().await;
    a_sibling_on_another_agent_sends_only_what_differs(Storage::PostgresS3, "irepo-pg").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_repository_refuses_the_capture_at_once() {
    let lab = Lab::get();
    // The server's port, with nothing listening on it any more: the repository is down.
    let mut repo = RepoServer::start(Storage::Local);
    let url = repo.url.clone();
    let toml = repo.target_toml("connect_timeout_secs = 3\n");
    repo.kill();
    let d = Daemon::start_with(DaemonOptions {
        extra_toml: toml,
        ..Default::default()
    });
    let guest = lab.guest("irepo-down").create();
    let mut images = d.images().await;
    let e = images
        .capture(to_central(guest.name(), "down", ""))
        .await
        .expect_err("refused");
    assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");
    assert!(e.message().contains("target central"), "{}", e.message());
    assert!(e.message().contains(&url), "{}", e.message());
    // A format is refused for an imagerepo target: formats are made at download.
    let mut r = to_central(guest.name(), "fmt", "");
    if let Some(proto::Target {
        kind: Some(proto::target::Kind::Remote(t)),
    }) = &mut r.target
    {
        t.format = proto::ImageFormat::Qcow2 as i32;
    }
    let e = images.capture(r).await.expect_err("refused");
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_capture_resumes_after_the_repository_restarts_within_the_bandwidth_cap() {
    const CAP: u64 = 32 << 20;
    let lab = Lab::get();
    let mut repo = RepoServer::start(Storage::Local);
    let d = Daemon::start_with(DaemonOptions {
        extra_toml: repo.target_toml(&format!("bandwidth_limit = {CAP}\nretry_secs = 120\n")),
        ..Default::default()
    });
    let guest = lab.guest("irepo-cut").create();
    let mut images = d.images().await;
    let t0 = Instant::now();
    let op = images
        .capture(to_central(guest.name(), "cut", ""))
        .await
        .expect("capture to central")
        .into_inner();
    // Cut the repository off once a good part is sent, for a few seconds.
    let mut ops = d.ops().await;
    loop {
        let now = crate::support::daemon::get_op(&mut ops, &op.id).await;
        assert!(!now.done, "the capture ended before the cut: {now:?}");
        if now.progress.is_some_and(|p| p.new_bytes >= 96 << 20) {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(300),
            "no progress: {now:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    repo.kill();
    tokio::time::sleep(Duration::from_secs(3)).await;
    repo.restart();
    let done = d.wait_op(&op.id).await;
    d.assert_active(&done);
    let took = t0.elapsed();
    let p = done.progress.expect("progress");
    let log = strip_ansi(&d.log_text());
    assert!(
        log.contains("failed; retrying"),
        "the daemon logged no retry:\n{log}"
    );
    // The cap held: at most CAP bytes a second went out, over the whole capture (the bucket
    // starts full: one second's worth more).
    let floor = p.new_bytes as f64 / CAP as f64 - 1.0;
    assert!(
        took.as_secs_f64() >= floor,
        "{} B sent in {:.1} s, above the cap of {CAP} B/s",
        p.new_bytes,
        took.as_secs_f64()
    );
    let raw = d.dir.path().join("cut.raw");
    let (header, digest) = repo.export_raw(&done.location, &raw).await;
    assert_identical(&raw, "raw", guest.disk_path(), "qcow2");
    assert_eq!(header.content_digest, digest);
    eprintln!(
        "resumed capture: new {} B in {:.1} s (cap {CAP} B/s)",
        p.new_bytes,
        took.as_secs_f64()
    );
}
