//! The daemon end to end without a hypervisor: readiness, signals, config errors, and the data
//! path through `Import` (a disk file of the host) and `Export`, with real qemu-nbd, real
//! qemu-img as the judge, and real filesystems for the failure cases (tmpfs full, read-only).

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::support::api::proto;
use crate::support::daemon::{
    assert_identical, assert_qcow2_clean, chunk_files, get_op, mode_of, run, state, Daemon,
    DaemonOptions, Tmpfs, SERVICES,
};
use crate::support::lab::qcow2_overlay;
use tonic::Code;

/// A 1 GiB qcow2 with data, written zeros and holes; two chunks hold the same bytes.
fn make_source(dir: &Path) -> std::path::PathBuf {
    let p = dir.join("src.qcow2");
    run(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", p.to_str().unwrap(), "1G"],
    );
    run(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 0xab 1M 3M",
            "-c",
            "write -P 0x11 500M 10M",
            "-c",
            "write -z 700M 1M",
            "-c",
            "write -P 0x77 1023M 64k",
            p.to_str().unwrap(),
        ],
    );
    p
}

async fn import(d: &Daemon, path: &Path, name: &str) -> proto::Operation {
    let mut images = d.images().await;
    let op = images
        .import(proto::ImportRequest {
            path: path.to_str().unwrap().into(),
            format: "qcow2".into(),
            image_name: name.into(),
            request_id: String::new(),
        })
        .await
        .expect("import accepted")
        .into_inner();
    d.wait_op(&op.id).await
}

#[test]
fn notifies_readiness_and_stops_cleanly_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let notify = dir.path().join("notify.sock");
    let listener = std::os::unix::net::UnixDatagram::bind(&notify).unwrap();
    listener
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut d = Daemon::start_with(DaemonOptions {
        notify_socket: Some(notify.clone()),
        ..Default::default()
    });
    let mut buf = [0u8; 256];
    let n = listener
        .recv(&mut buf)
        .expect("imaged sent no sd_notify message");
    let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(msg.contains("READY=1"), "{msg}");
    // A new repository holds guests' disks: private to the daemon's user.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&d.repo).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700, "repository mode {mode:o}");
    let st = d.stop();
    assert!(
        st.success(),
        "imaged exited with {st:?}; log:\n{}",
        d.log_text()
    );
    assert!(!d.socket.exists(), "socket left behind after a clean stop");
    let n = listener.recv(&mut buf).expect("no STOPPING message");
    assert!(String::from_utf8_lossy(&buf[..n]).contains("STOPPING=1"));
    let log = d.log_text();
    assert!(
        log.contains("imaged ready") && log.contains("imaged stopped"),
        "{log}"
    );
}

/// The signal mask line `key` (SigBlk, SigCgt) of a process, as a bit set.
fn signal_mask(pid: u32, key: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{key}:")))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or(0)
}

/// A stop request that comes while the daemon is still starting (before it binds its socket
/// or says READY) is served gracefully once the handler is in place: the daemon never dies by
/// the signal's default action. Each round sends SIGTERM as soon as the new process holds it
/// (its main's first line), at a different moment of the start-up.
#[test]
fn sigterm_during_start_up_stops_gracefully() {
    let mut d = Daemon::start();
    assert!(d.stop().success());
    let mut held_early = 0;
    for round in 0..12u64 {
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_imaged"))
            .arg("--config")
            .arg(d.dir.path().join("imaged.toml"))
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let term = 1u64 << (libc::SIGTERM - 1);
        let t0 = std::time::Instant::now();
        while signal_mask(child.id(), "SigBlk") & term == 0
            && signal_mask(child.id(), "SigCgt") & term == 0
        {
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "imaged never held SIGTERM"
            );
            std::thread::sleep(Duration::from_micros(200));
        }
        if signal_mask(child.id(), "SigBlk") & term != 0 {
            held_early += 1;
        }
        std::thread::sleep(Duration::from_millis(round * 3));
        // SAFETY: kill(2) with a pid we spawned and have not reaped.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let st = loop {
            if let Some(st) = child.try_wait().unwrap() {
                break st;
            }
            if t0.elapsed() > Duration::from_secs(60) {
                let _ = child.kill();
                panic!("round {round}: imaged did not stop within 60 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        assert!(
            st.success(),
            "round {round}: imaged died of the signal or failed: {st:?}"
        );
    }
    assert!(
        held_early > 0,
        "SIGTERM was never seen held during start-up: a stop request then would kill imaged"
    );
    std::fs::remove_file(&d.socket).ok();
}

/// Two daemons on one run directory would "recover" each other's running captures, on one
/// state directory end each other's operations: the second one is refused at start, naming
/// the directory, and the first keeps serving.
#[test]
fn a_second_daemon_on_the_same_run_directory_is_refused() {
    let d = Daemon::start();
    let cfg = std::fs::read_to_string(d.dir.path().join("imaged.toml")).unwrap();
    let other = d.dir.path().join("other.toml");
    let socket = d.dir.path().join("other.sock");
    std::fs::write(
        &other,
        cfg.replace(
            &format!("socket = {:?}", d.socket),
            &format!("socket = {socket:?}"),
        ),
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_imaged"))
        .arg("--config")
        .arg(&other)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a second daemon started: {err}");
    assert!(err.contains("another imaged uses run directory"), "{err}");
    assert!(!socket.exists());
    // Another run directory, the same state directory: it would end the first one's running
    // operations as interrupted.
    let run = d.run_dir();
    std::fs::write(
        &other,
        cfg.replace(
            &format!("socket = {:?}", d.socket),
            &format!("socket = {socket:?}"),
        )
        .replace(
            &format!("run_dir = {run:?}"),
            &format!("run_dir = {:?}", d.dir.path().join("run2")),
        ),
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_imaged"))
        .arg("--config")
        .arg(&other)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a second daemon started: {err}");
    assert!(
        err.contains("another imaged uses state directory") && err.contains("daemon.state_dir"),
        "{err}"
    );
    assert!(!socket.exists());
    assert!(std::os::unix::net::UnixStream::connect(&d.socket).is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_reflection_are_served() {
    let d = Daemon::start();
    let mut health = tonic_health::pb::health_client::HealthClient::new(d.channel().await);
    for service in [
        "",
        "imaged.v1.ImageService",
        "imaged.v1.DomainService",
        "imaged.v1.OperationService",
    ] {
        let r = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap_or_else(|e| panic!("health of {service:?}: {e}"))
            .into_inner();
        assert_eq!(
            r.status,
            tonic_health::pb::health_check_response::ServingStatus::Serving as i32,
            "{service:?}"
        );
    }
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::{
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
        ServerReflectionRequest,
    };
    let mut refl = ServerReflectionClient::new(d.channel().await);
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = refl
        .server_reflection_info(tokio_stream::iter(vec![req]))
        .await
        .unwrap()
        .into_inner();
    let resp = stream
        .message()
        .await
        .unwrap()
        .expect("a reflection answer");
    let Some(MessageResponse::ListServicesResponse(list)) = resp.message_response else {
        panic!("{resp:?}")
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for want in SERVICES {
        assert!(
            names.iter().any(|n| n == want),
            "{want} not listed: {names:?}"
        );
    }
}

#[test]
fn bad_config_is_refused_with_the_key_name() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("bad.toml");
    for (text, key) in [
        ("[capture]\nreaders = 99\n", "capture.readers"),
        ("[daemon]\nsokcet = \"/x\"\n", "sokcet"),
        ("[daemon]\nsocket_mode = \"rw\"\n", "daemon.socket_mode"),
    ] {
        std::fs::write(&cfg, text).unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_imaged"))
            .arg("--config")
            .arg(&cfg)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{text}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(key), "{text}: {err}");
    }
    let out = Command::new(env!("CARGO_BIN_EXE_imaged"))
        .args(["--config", "/nonexistent/imaged.toml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/imaged.toml"));
}

#[test]
fn systemd_unit_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let unit = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/systemd/imaged.service"
    ))
    .unwrap();
    assert!(
        unit.contains("Type=notify"),
        "the unit must wait for readiness"
    );
    // Point ExecStart at the binary cargo built so verify can check it exists.
    let unit = unit.replace("/usr/local/bin/imaged", env!("CARGO_BIN_EXE_imaged"));
    let p = dir.path().join("imaged.service");
    std::fs::write(&p, unit).unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&p)
        .output()
        .expect("systemd-analyze (package systemd)");
    let err = String::from_utf8_lossy(&out.stderr);
    let relevant: Vec<&str> = err
        .lines()
        .filter(|l| l.contains("imaged.service"))
        .collect();
    assert!(
        out.status.success() && relevant.is_empty(),
        "systemd-analyze verify: {err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn import_export_round_trip_and_dedup() {
    let d = Daemon::start();
    let src = make_source(d.dir.path());
    let op = import(&d, &src, "golden").await;
    assert_eq!(state(&op), proto::OperationState::Active, "{op:?}");
    let p = op.progress.unwrap();
    assert_eq!(p.total_bytes, 1 << 30);
    assert_eq!(p.done_bytes, 1 << 30);
    // Holes and zeros are never read: only the extents with data are.
    assert!(
        p.read_bytes <= 16 << 20,
        "read {} bytes of a 1 GiB disk holding 13.1 MiB",
        p.read_bytes
    );
    // Five data chunks, two of them identical: four chunk files. (Two workers may both store
    // the identical pair at the same moment; the file is still one.)
    assert_eq!(
        chunk_files(&d.repo).len(),
        4,
        "identical chunks must be stored once: {p:?}"
    );

    let img = d.imagectl_json(&["image", "golden"]);
    assert_eq!(img["virtual_size"], 1u64 << 30);
    assert_eq!(img["consistency"], "imported");

    let q = d.dir.path().join("out.qcow2");
    let r = d.dir.path().join("out.raw");
    d.imagectl_export("golden", "qcow2", &q);
    d.imagectl_export("golden", "raw", &r);
    assert_qcow2_clean(&q);
    assert_identical(&src, "qcow2", &q, "qcow2");
    assert_identical(&src, "qcow2", &r, "raw");
    let raw_blocks = std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(&r).unwrap()) * 512;
    assert!(
        raw_blocks < 32 << 20,
        "raw export is not sparse: {raw_blocks} bytes allocated"
    );

    // The same disk again: every chunk is already stored.
    let before = chunk_files(&d.repo).len();
    let op2 = import(&d, &src, "golden-again").await;
    assert_eq!(state(&op2), proto::OperationState::Active);
    assert_eq!(op2.progress.unwrap().new_bytes, 0);
    assert_eq!(chunk_files(&d.repo).len(), before);
    let img2 = d.imagectl_json(&["image", "golden-again"]);
    assert_eq!(img2["content_digest"], img["content_digest"]);

    // Deleting one keeps the chunks the other uses; deleting both frees them.
    let del = d.imagectl_json(&["rm", "golden"]);
    assert_eq!(del["deleted"], "golden");
    assert_eq!(chunk_files(&d.repo).len(), before);
    d.imagectl_json(&["rm", "golden-again"]);
    assert!(d.repo.join("chunks").is_dir());
    assert_eq!(chunk_files(&d.repo).len(), 0);
    let list = d.imagectl_json(&["images"]);
    assert_eq!(list.as_array().unwrap().len(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_clear_errors_and_change_nothing() {
    let d = Daemon::start();
    let src = make_source(d.dir.path());
    let mut images = d.images().await;
    let imp = |name: &str, path: &str, format: &str| proto::ImportRequest {
        path: path.into(),
        format: format.into(),
        image_name: name.into(),
        request_id: String::new(),
    };
    let s = src.to_str().unwrap();
    let missing = d.dir.path().join("nonexistent/disk.qcow2");
    let missing = missing.to_str().unwrap();
    let text = d.dir.path().join("hostname.txt");
    std::fs::write(&text, "not an image\n").unwrap();
    let text = text.to_str().unwrap();
    for (req, code, words) in [
        (
            imp("a/../../etc/passwd", s, "qcow2"),
            Code::InvalidArgument,
            "'/'",
        ),
        (imp("", s, "qcow2"), Code::InvalidArgument, "empty"),
        (
            imp("ok", "relative.qcow2", "qcow2"),
            Code::InvalidArgument,
            "absolute",
        ),
        (
            imp("ok", s, "vmdk"),
            Code::InvalidArgument,
            "IMAGE_FORMAT_QCOW2 or IMAGE_FORMAT_RAW",
        ),
        (
            imp("ok", missing, "qcow2"),
            Code::FailedPrecondition,
            "does not exist",
        ),
        (
            imp("ok", text, "qcow2"),
            Code::InvalidArgument,
            "not a valid qcow2",
        ),
        (
            imp("ok", "/etc/hostname", "qcow2"),
            Code::PermissionDenied,
            "outside the directories",
        ),
    ] {
        let err = images
            .import(req.clone())
            .await
            .expect_err("must be refused");
        assert_eq!(err.code(), code, "{req:?}: {err:?}");
        assert!(err.message().contains(words), "{req:?}: {}", err.message());
    }
    // An image with a backing file would make us read another file of the host.
    let child = d.dir.path().join("child.qcow2");
    qcow2_overlay(&src, &child);
    let err = images
        .import(imp("ok", child.to_str().unwrap(), "qcow2"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("backing file"), "{}", err.message());

    let op = import(&d, &src, "taken").await;
    assert_eq!(state(&op), proto::OperationState::Active);
    let err = images.import(imp("taken", s, "qcow2")).await.unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists, "{err:?}");
    assert!(err.message().contains("taken"));

    // Exports: unknown image, existing destination, missing directory, relative path, a
    // directory outside the export directories.
    let missing_dir = d.dir.path().join("nonexistent-dir/x.qcow2");
    let missing_dir = missing_dir.to_str().unwrap();
    let exp = |name: &str, path: &str| proto::ExportImageRequest {
        name: name.into(),
        format: proto::ImageFormat::Qcow2 as i32,
        path: path.into(),
        overwrite: false,
        request_id: String::new(),
    };
    let existing = d.dir.path().join("exists.qcow2");
    std::fs::write(&existing, b"keep me").unwrap();
    for (req, code) in [
        (exp("nope", "/tmp/nope.qcow2"), Code::NotFound),
        (
            exp("taken", existing.to_str().unwrap()),
            Code::AlreadyExists,
        ),
        (exp("taken", missing_dir), Code::FailedPrecondition),
        (
            exp("taken", "/nonexistent-dir/x.qcow2"),
            Code::PermissionDenied,
        ),
        (exp("taken", "x.qcow2"), Code::InvalidArgument),
    ] {
        let err = images
            .export_image(req.clone())
            .await
            .expect_err("must be refused");
        assert_eq!(err.code(), code, "{req:?}: {err:?}");
    }
    assert_eq!(std::fs::read(&existing).unwrap(), b"keep me");

    let mut ops = d.ops().await;
    let err = ops
        .cancel_operation(proto::CancelOperationRequest {
            id: "op-nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = ops
        .cancel_operation(proto::CancelOperationRequest { id: op.id.clone() })
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        Code::FailedPrecondition,
        "cancelling a finished operation"
    );

    // imagectl: exit codes and messages that name the object.
    let out = d.imagectl(&["image", "nope"]);
    assert_eq!(out.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&out.stderr).contains("image nope not found"));
    let out = d.imagectl(&[
        "export",
        "taken",
        "--format",
        "qcow2",
        "-o",
        existing.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(4));
    let out = Command::new(env!("CARGO_BIN_EXE_imagectl"))
        .args(["--socket", "/nonexistent/imaged.sock", "images"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(5));
    assert!(String::from_utf8_lossy(&out.stderr).contains("is the daemon running"));

    // Only the one good image exists.
    let list = d.imagectl_json(&["images"]);
    assert_eq!(list.as_array().unwrap().len(), 1, "{list}");

    // A reader that went away (`imagectl images | head -0`): imagectl ends quietly with 141,
    // as a Unix tool ended by SIGPIPE does, not with a panic.
    let mut child = Command::new(env!("CARGO_BIN_EXE_imagectl"))
        .args(["--socket", d.socket.to_str().unwrap(), "images"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(141), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_id_makes_retries_idempotent() {
    let d = Daemon::start();
    let src = make_source(d.dir.path());
    let mut images = d.images().await;
    let req = proto::ImportRequest {
        path: src.to_str().unwrap().into(),
        format: "qcow2".into(),
        image_name: "once".into(),
        request_id: "req-42".into(),
    };
    let a = images.import(req.clone()).await.unwrap().into_inner();
    let b = images.import(req.clone()).await.unwrap().into_inner();
    assert_eq!(a.id, b.id);
    let done = d.wait_op(&a.id).await;
    assert_eq!(state(&done), proto::OperationState::Active);
    // Even after it finished, the retry answers with the same operation.
    let c = images.import(req).await.unwrap().into_inner();
    assert_eq!(c.id, a.id);
    let list = d.imagectl_json(&["ops"]);
    assert_eq!(list.as_array().unwrap().len(), 1);
}

/// A raw file of `mib` MiB of random bytes (every chunk distinct).
fn random_raw(path: &Path, mib: usize) {
    run(
        "dd",
        &[
            "if=/dev/urandom",
            &format!("of={}", path.display()),
            "bs=1M",
            &format!("count={mib}"),
            "status=none",
        ],
    );
}

async fn import_raw(d: &Daemon, path: &Path, name: &str) -> proto::Operation {
    let mut images = d.images().await;
    images
        .import(proto::ImportRequest {
            path: path.to_str().unwrap().into(),
            format: "raw".into(),
            image_name: name.into(),
            request_id: String::new(),
        })
        .await
        .expect("import accepted")
        .into_inner()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_mid_capture_leaves_nothing() {
    let d = Daemon::start_with(DaemonOptions {
        capture_toml: "readers = 1".into(),
        ..Default::default()
    });
    let src = d.dir.path().join("big.raw");
    random_raw(&src, 1024);
    let op = import_raw(&d, &src, "big").await;
    let mut ops = d.ops().await;
    // Cancel once it is reading.
    loop {
        let o = get_op(&mut ops, &op.id).await;
        let p = o.progress.unwrap_or_default();
        if p.done_bytes > 0 {
            assert!(
                p.done_bytes < p.total_bytes,
                "capture finished before it could be cancelled"
            );
            break;
        }
        assert!(!matches!(state(&o), proto::OperationState::Failed), "{o:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let t0 = std::time::Instant::now();
    ops.cancel_operation(proto::CancelOperationRequest { id: op.id.clone() })
        .await
        .unwrap();
    let end = d.wait_op(&op.id).await;
    assert!(
        t0.elapsed() < Duration::from_secs(5),
        "cancel took {:?}",
        t0.elapsed()
    );
    assert_eq!(state(&end), proto::OperationState::Cancelled, "{end:?}");
    assert_eq!(end.error.unwrap().code, "CANCELLED");
    assert_eq!(d.imagectl_json(&["images"]).as_array().unwrap().len(), 0);
    assert_eq!(
        chunk_files(&d.repo).len(),
        0,
        "chunks of the cancelled capture were left behind"
    );
    let out = d.imagectl(&["image", "big"]);
    assert_eq!(out.status.code(), Some(3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_full_fails_cleanly_and_releases_space() {
    let base = tempfile::tempdir().unwrap();
    let fs = Tmpfs::mount(&base.path().join("repo"), "64m");
    let d = Daemon::start_with(DaemonOptions {
        repo: Some(fs.dir.clone()),
        ..Default::default()
    });
    let used_before = fs.used();
    let src = d.dir.path().join("big.raw");
    random_raw(&src, 160);
    let op = import_raw(&d, &src, "too-big").await;
    let end = d.wait_op(&op.id).await;
    assert_eq!(state(&end), proto::OperationState::Failed, "{end:?}");
    let err = end.error.unwrap();
    assert_eq!(err.code, "RESOURCE_EXHAUSTED", "{err:?}");
    assert!(err.message.contains("No space left"), "{}", err.message);
    assert!(
        err.message.contains(fs.dir.to_str().unwrap()),
        "the error must name the repository: {}",
        err.message
    );
    assert_eq!(d.imagectl_json(&["images"]).as_array().unwrap().len(), 0);
    assert!(fs.dir.join("chunks").is_dir());
    assert_eq!(chunk_files(&fs.dir).len(), 0);
    let used_after = fs.used();
    assert!(
        used_after <= used_before + (1 << 20),
        "space not released: {used_before} -> {used_after}"
    );
    // The repository still works for an image that fits.
    let small = d.dir.path().join("small.raw");
    random_raw(&small, 8);
    let op = import_raw(&d, &small, "fits").await;
    assert_eq!(
        state(&d.wait_op(&op.id).await),
        proto::OperationState::Active
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_only_repository_is_refused_before_reading() {
    let base = tempfile::tempdir().unwrap();
    let fs = Tmpfs::mount(&base.path().join("repo"), "16m");
    let d = Daemon::start_with(DaemonOptions {
        repo: Some(fs.dir.clone()),
        ..Default::default()
    });
    run("mount", &["-o", "remount,ro", fs.dir.to_str().unwrap()]);
    let src = make_source(d.dir.path());
    let mut images = d.images().await;
    let err = images
        .import(proto::ImportRequest {
            path: src.to_str().unwrap().into(),
            format: "qcow2".into(),
            image_name: "ro".into(),
            request_id: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(
        err.message().contains("not writable") && err.message().contains(fs.dir.to_str().unwrap()),
        "{}",
        err.message()
    );
    let ops = d.imagectl_json(&["ops"]);
    assert_eq!(
        ops.as_array().unwrap().len(),
        0,
        "no operation may start: {ops}"
    );
}

/// Every regular file under `dir` (no link followed).
fn files_under(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let ft = e.file_type().unwrap();
        if ft.is_dir() {
            out.extend(files_under(&e.path()));
        } else if ft.is_file() {
            out.push(e.path());
        }
    }
    out
}

async fn export_req(
    d: &Daemon,
    name: &str,
    format: proto::ImageFormat,
    path: &Path,
    overwrite: bool,
) -> Result<proto::Operation, tonic::Status> {
    let mut images = d.images().await;
    let op = images
        .export_image(proto::ExportImageRequest {
            name: name.into(),
            format: format as i32,
            path: path.to_str().unwrap().into(),
            overwrite,
            request_id: String::new(),
        })
        .await?
        .into_inner();
    Ok(d.wait_op(&op.id).await)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exports_are_private_files_never_written_through_links() {
    let d = Daemon::start();
    let src = make_source(d.dir.path());
    assert_eq!(
        state(&import(&d, &src, "golden").await),
        proto::OperationState::Active
    );
    let out = d.dir.path().join("out");
    std::fs::create_dir(&out).unwrap();

    // Both formats, new and overwritten: 0600, whatever the daemon's umask.
    for (fmt, pf) in [
        ("qcow2", proto::ImageFormat::Qcow2),
        ("raw", proto::ImageFormat::Raw),
    ] {
        let p = out.join(format!("golden.{fmt}"));
        for overwrite in [false, true] {
            let op = export_req(&d, "golden", pf, &p, overwrite).await.unwrap();
            assert_eq!(state(&op), proto::OperationState::Active, "{op:?}");
            assert_eq!(
                mode_of(&p),
                "0600",
                "{} (overwrite {overwrite})",
                p.display()
            );
        }
        assert_identical(&src, "qcow2", &p, fmt);
    }

    // A symbolic link in the directory path, at its end or in the middle: refused by the call,
    // naming the link, and nothing lands where it points.
    let elsewhere = d.dir.path().join("elsewhere");
    std::fs::create_dir_all(elsewhere.join("sub")).unwrap();
    let link_dir = out.join("link");
    std::os::unix::fs::symlink(&elsewhere, &link_dir).unwrap();
    for dest in [link_dir.join("x.raw"), link_dir.join("sub/x.raw")] {
        for overwrite in [false, true] {
            let err = export_req(&d, "golden", proto::ImageFormat::Raw, &dest, overwrite)
                .await
                .expect_err("a path through a link must be refused");
            assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
            assert!(
                err.message().contains(link_dir.to_str().unwrap())
                    && err.message().contains("symbolic link"),
                "{}",
                err.message()
            );
        }
    }
    // A symbolic link at the final name, to an existing file and to a new name.
    let victim = elsewhere.join("victim");
    std::fs::write(&victim, b"keep me").unwrap();
    let link_file = out.join("to-victim.raw");
    std::os::unix::fs::symlink(&victim, &link_file).unwrap();
    let dangling = out.join("dangling.raw");
    std::os::unix::fs::symlink(elsewhere.join("created"), &dangling).unwrap();
    for dest in [&link_file, &dangling] {
        for overwrite in [false, true] {
            let err = export_req(&d, "golden", proto::ImageFormat::Raw, dest, overwrite)
                .await
                .expect_err("a link at the final name must be refused");
            assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
            assert!(
                err.message().contains(dest.to_str().unwrap())
                    && err.message().contains("symbolic link"),
                "{}",
                err.message()
            );
        }
    }
    assert_eq!(std::fs::read(&victim).unwrap(), b"keep me");
    assert_eq!(files_under(&elsewhere), vec![victim.clone()]);
    assert!(std::fs::symlink_metadata(&link_file)
        .unwrap()
        .file_type()
        .is_symlink());
    // No temp file left anywhere.
    let mut left = files_under(&out);
    left.sort();
    assert_eq!(
        left,
        vec![out.join("golden.qcow2"), out.join("golden.raw")],
        "only the two exports"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configured_export_file_mode_is_honoured_and_world_writable_refused() {
    let d = Daemon::start_with(DaemonOptions {
        extra_toml: "[export]\nfile_mode = \"0640\"\n".into(),
        ..Default::default()
    });
    let src = make_source(d.dir.path());
    assert_eq!(
        state(&import(&d, &src, "golden").await),
        proto::OperationState::Active
    );
    let p = d.dir.path().join("golden.raw");
    let op = export_req(&d, "golden", proto::ImageFormat::Raw, &p, false)
        .await
        .unwrap();
    assert_eq!(state(&op), proto::OperationState::Active, "{op:?}");
    assert_eq!(mode_of(&p), "0640");

    let cfg = d.dir.path().join("bad.toml");
    for mode in ["0666", "0602", "0777"] {
        std::fs::write(&cfg, format!("[export]\nfile_mode = \"{mode}\"\n")).unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_imaged"))
            .arg("--config")
            .arg(&cfg)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{mode}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("export.file_mode") && err.contains("world-write"),
            "{mode}: {err}"
        );
    }
}

/// Operations outlive the daemon: an ended one is the same after a clean restart; after a
/// SIGKILL, the operations it left unfinished (one reading, one waiting for the only run slot)
/// are FAILED (ABORTED) with the reason, found by id and by a retry with their request_id, and
/// none is shown running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operations_outlive_the_daemon_and_a_kill_leaves_none_running() {
    use proto::OperationState::*;
    let mut d = Daemon::start_with(DaemonOptions {
        daemon_toml: "max_running_operations = 1".into(),
        capture_toml: "readers = 1".into(),
        ..Default::default()
    });
    let dir = tempfile::tempdir().unwrap();
    let req = |path: &Path, name: &str, request_id: &str| proto::ImportRequest {
        path: path.to_str().unwrap().into(),
        format: "raw".into(),
        image_name: name.into(),
        request_id: request_id.into(),
    };
    let small = dir.path().join("small.raw");
    random_raw(&small, 4);
    let done = import_raw(&d, &small, "small").await;
    let done = d.wait_op(&done.id).await;
    d.assert_active(&done);
    assert!(d.stop().success(), "clean stop");
    d.restart();
    let mut ops = d.ops().await;
    assert_eq!(
        get_op(&mut ops, &done.id).await,
        done,
        "the same after a restart"
    );

    // 512 MiB of one repeated chunk: read and hashed in full (slow), stored once.
    let slow = dir.path().join("slow.raw");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&slow).unwrap();
        let block = vec![0x5au8; 4 << 20];
        for _ in 0..128 {
            f.write_all(&block).unwrap();
        }
    }
    let mut images = d.images().await;
    let running = images
        .import(req(&slow, "slow", "req-slow"))
        .await
        .unwrap()
        .into_inner();
    let queued = images
        .import(req(&small, "queued", "req-queued"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(state(&queued), Queued, "{queued:?}");
    let held = get_op(&mut ops, &running.id).await;
    assert!(
        !matches!(state(&held), Active | Failed | Cancelled),
        "the slow import ended before the kill; the test proves nothing: {held:?}"
    );
    let pid = d.pid();
    d.kill();
    d.restart();

    let mut ops = d.ops().await;
    let mut images = d.images().await;
    let q = get_op(&mut ops, &queued.id).await;
    assert_eq!(state(&q), Failed, "{q:?}");
    let err = q.error.clone().unwrap();
    assert_eq!(err.code, "ABORTED");
    for part in [
        &format!("imaged (pid {pid}) stopped while this operation was QUEUED"),
        "no image queued was kept",
        "a retry with the same request_id returns this operation",
    ] {
        assert!(err.message.contains(part), "{part:?} in {}", err.message);
    }
    let retry = images
        .import(req(&small, "queued", "req-queued"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(retry, q, "the retry returns the failed operation");
    let other = images
        .import(req(&slow, "queued", "req-queued"))
        .await
        .unwrap_err();
    assert_eq!(other.code(), Code::InvalidArgument, "{other:?}");

    // The reading one: FAILED, unless its image was committed just before the kill.
    let s = get_op(&mut ops, &running.id).await;
    if d.repo.join("images/slow.json").exists() {
        assert_eq!(state(&s), Active, "{s:?}");
    } else {
        assert_eq!(state(&s), Failed, "{s:?}");
        let msg = &s.error.as_ref().unwrap().message;
        assert!(
            msg.contains(&format!(
                "imaged (pid {pid}) stopped while this operation was"
            )),
            "{msg}"
        );
    }
    let list = ops
        .list_operations(proto::ListOperationsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .operations;
    assert_eq!(list.len(), 3, "{list:?}");
    assert!(
        list.iter()
            .all(|o| matches!(state(o), Active | Failed | Cancelled)),
        "none shown running: {list:?}"
    );
    // A new request_id runs it again.
    let fresh = images
        .import(req(&small, "queued", "req-queued-2"))
        .await
        .unwrap()
        .into_inner();
    assert_ne!(fresh.id, q.id);
    d.assert_active(&d.wait_op(&fresh.id).await);
}
