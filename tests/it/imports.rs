//! Imports and the repository against hostile or broken input, with the real daemon, real
//! qemu-img/qemu-io-made files and real qemu-nbd: what is refused (fast, nothing stored), the
//! virtual size limit and petabyte-sized claims (manifest and memory scale with the data), the
//! path swapped between inspection and read, damaged chunk files and unreadable manifests, and
//! request_id retries.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::support::api::proto;
use crate::support::daemon::{
    assert_identical, chunk_files, get_op, run, state, Daemon, DaemonOptions,
};
use tonic::Code;

fn req(path: &Path, format: &str, name: &str, request_id: &str) -> proto::ImportRequest {
    proto::ImportRequest {
        path: path.to_str().unwrap().into(),
        format: format.into(),
        image_name: name.into(),
        request_id: request_id.into(),
    }
}

/// Calls Import; a call that does not answer within 5 s fails the test (never hangs it).
async fn call_import(
    d: &Daemon,
    r: proto::ImportRequest,
) -> Result<proto::Operation, tonic::Status> {
    call_import_within(d, r, 5).await
}

async fn call_import_within(
    d: &Daemon,
    r: proto::ImportRequest,
    secs: u64,
) -> Result<proto::Operation, tonic::Status> {
    let mut images = d.images().await;
    let what = format!("Import of {}", r.path);
    tokio::time::timeout(Duration::from_secs(secs), images.import(r))
        .await
        .unwrap_or_else(|_| panic!("{what} did not answer within {secs} s"))
        .map(|r| r.into_inner())
}

/// Imports and waits for the end.
async fn import_ok(d: &Daemon, path: &Path, format: &str, name: &str) -> proto::Operation {
    let op = call_import(d, req(path, format, name, ""))
        .await
        .unwrap_or_else(|e| panic!("import of {} refused: {e:?}", path.display()));
    let op = d.wait_op(&op.id).await;
    d.assert_active(&op);
    op
}

async fn export(d: &Daemon, name: &str, format: &str, dest: &Path) -> proto::Operation {
    let mut images = d.images().await;
    let op = images
        .export_image(proto::ExportImageRequest {
            name: name.into(),
            format: fmt_of(format),
            path: dest.to_str().unwrap().into(),
            overwrite: false,
            request_id: String::new(),
        })
        .await
        .expect("export accepted")
        .into_inner();
    let op = d.wait_op(&op.id).await;
    assert_eq!(state(&op), proto::OperationState::Active, "{op:?}");
    op
}

fn fmt_of(f: &str) -> i32 {
    match f {
        "qcow2" => proto::ImageFormat::Qcow2 as i32,
        _ => proto::ImageFormat::Raw as i32,
    }
}

fn qemu_img(args: &[&str]) -> String {
    run("qemu-img", args)
}

fn qemu_io(fmt: &str, path: &Path, cmds: &[&str]) {
    let mut args = vec!["-f", fmt];
    for c in cmds {
        args.push("-c");
        args.push(c);
    }
    args.push(path.to_str().unwrap());
    run("qemu-io", &args);
}

fn manifests(repo: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(repo.join("images"))
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Peak resident memory of a process (VmHWM), in bytes.
fn vm_hwm(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = s.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    line.split_whitespace()
        .nth(1)
        .unwrap()
        .parse::<u64>()
        .unwrap()
        * 1024
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_and_broken_sources_are_refused_fast_and_store_nothing() {
    let d = Daemon::start();
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n);

    // A FIFO: opening it for reading would block until a writer comes.
    let fifo = p("pipe.raw");
    run("mkfifo", &[fifo.to_str().unwrap()]);
    // An empty file.
    std::fs::write(p("empty.raw"), b"").unwrap();
    // A symlink to a good file.
    let good = p("good.raw");
    std::fs::write(&good, vec![7u8; 1 << 20]).unwrap();
    std::os::unix::fs::symlink(&good, p("link.raw")).unwrap();
    // A 7.8 MB qcow2 cut to 300 kB: its data clusters lie beyond the end of the file.
    let trunc = p("trunc.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        trunc.to_str().unwrap(),
        "64M",
    ]);
    qemu_io("qcow2", &trunc, &["write -P 0x5c 0 7M"]);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&trunc)
        .unwrap()
        .set_len(300 << 10)
        .unwrap();
    // Other formats declared raw.
    let mut foreign = Vec::new();
    for (fmt, name) in [
        ("qcow2", "q.img"),
        ("vmdk", "v.img"),
        ("vpc", "vhd.img"),
        ("vhdx", "vhdx.img"),
        ("vdi", "vdi.img"),
        ("qed", "qed.img"),
    ] {
        let f = p(name);
        qemu_img(&["create", "-q", "-f", fmt, f.to_str().unwrap(), "16M"]);
        foreign.push(f);
    }
    let mut luks = vec![0u8; 1 << 20];
    luks[..6].copy_from_slice(b"LUKS\xba\xbe");
    std::fs::write(p("luks.img"), &luks).unwrap();
    foreign.push(p("luks.img"));

    let mut cases: Vec<(PathBuf, &str, Code, &str)> = vec![
        (fifo.clone(), "raw", Code::InvalidArgument, "FIFO"),
        // A device is refused as one (unit tests of capture::inspect); here it lies outside
        // the import directories, which is said first.
        (
            "/dev/zero".into(),
            "raw",
            Code::PermissionDenied,
            "outside the directories",
        ),
        (p("empty.raw"), "raw", Code::InvalidArgument, "empty"),
        (p("link.raw"), "raw", Code::InvalidArgument, "symbolic link"),
        (
            dir.path().to_path_buf(),
            "raw",
            Code::InvalidArgument,
            "directory",
        ),
        (trunc.clone(), "qcow2", Code::InvalidArgument, "qcow2"),
    ];
    for f in &foreign {
        cases.push((f.clone(), "raw", Code::InvalidArgument, "declared raw"));
    }
    for (i, (path, fmt, code, says)) in cases.iter().enumerate() {
        let t0 = Instant::now();
        let res = call_import(&d, req(path, fmt, &format!("bad{i}"), "")).await;
        let took = t0.elapsed();
        let err = match res {
            Err(e) => e,
            Ok(op) => {
                let op = d.wait_op(&op.id).await;
                panic!("{} ({fmt}) was accepted: {op:?}", path.display());
            }
        };
        assert_eq!(err.code(), *code, "{}: {err:?}", path.display());
        assert!(
            err.message().contains(path.to_str().unwrap()) && err.message().contains(says),
            "{}: the message must name the file and say {says:?}: {}",
            path.display(),
            err.message()
        );
        assert!(
            took < Duration::from_secs(1),
            "{} refused after {took:?}",
            path.display()
        );
    }
    assert!(manifests(&d.repo).is_empty(), "{:?}", manifests(&d.repo));
    assert!(chunk_files(&d.repo).is_empty());
    assert!(d.imagectl_json(&["images"]).as_array().unwrap().is_empty());

    // An ISO 9660 image is a raw disk: accepted (the decision documented in the README).
    let iso = p("cd.iso");
    let mut bytes = vec![0u8; 1 << 20];
    bytes[0x8001..0x8006].copy_from_slice(b"CD001");
    std::fs::write(&iso, &bytes).unwrap();
    import_ok(&d, &iso, "raw", "iso").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn petabyte_claims_are_refused_by_the_limit_and_stay_small_when_allowed() {
    let dir = tempfile::tempdir().unwrap();
    let big = dir.path().join("pib.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", big.to_str().unwrap(), "1P"]);
    qemu_io(
        "qcow2",
        &big,
        &[
            "write -P 0x11 0 2M",
            "write -P 0x22 300T 1M",
            "write -P 0x33 1023T 3M",
        ],
    );

    // The default limit (64 TiB) refuses it at once, naming the limit and the setting.
    let d = Daemon::start();
    let t0 = Instant::now();
    let err = call_import(&d, req(&big, "qcow2", "pib", ""))
        .await
        .expect_err("a 1 PiB import must be refused by the default limit");
    assert!(t0.elapsed() < Duration::from_secs(1), "{:?}", t0.elapsed());
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(
        err.message().contains("max_virtual_size") && err.message().contains("70368744177664"),
        "{}",
        err.message()
    );
    assert!(manifests(&d.repo).is_empty());
    drop(d);

    // Raised to 2 PiB: it imports, with a manifest of a few KiB and flat memory.
    let d = Daemon::start_with(DaemonOptions {
        repository_toml: "max_virtual_size = \"2P\"".into(),
        ..Default::default()
    });
    // Its inspection walks the map of a petabyte (qemu-img map, about 6 s here).
    let t0 = Instant::now();
    let op = call_import_within(&d, req(&big, "qcow2", "pib", ""), 60)
        .await
        .expect("accepted under a 2 PiB limit");
    let op = d.wait_op(&op.id).await;
    assert_eq!(state(&op), proto::OperationState::Active, "{op:?}");
    let took = t0.elapsed();
    let manifest = d.repo.join("images/pib.json");
    let len = std::fs::metadata(&manifest).unwrap().len();
    assert!(len < 16 << 10, "manifest is {len} bytes");
    let img = d.imagectl_json(&["image", "pib"]);
    assert_eq!(img["virtual_size"].as_u64(), Some(1 << 50), "{img}");
    assert_eq!(img["chunk_count"].as_u64(), Some(1 << 28), "{img}");
    assert_eq!(img["zero_chunks"].as_u64(), Some((1 << 28) - 3), "{img}");
    let hwm = vm_hwm(d.pid());
    assert!(hwm < 256 << 20, "daemon peak RSS {hwm} bytes");
    eprintln!("1 PiB import: {took:?}, manifest {len} bytes, daemon VmHWM {hwm} bytes");

    // Deleting another image is fast and flat beside it.
    let small = dir.path().join("small.raw");
    std::fs::write(&small, vec![9u8; 3 << 20]).unwrap();
    import_ok(&d, &small, "raw", "small").await;
    let t0 = Instant::now();
    let chunks_before = chunk_files(&d.repo).len();
    let out = d.imagectl_json(&["rm", "small"]);
    assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
    assert_eq!(out["deleted"], "small", "{out}");
    assert_eq!(
        chunk_files(&d.repo).len(),
        chunks_before - 1,
        "its one chunk freed"
    );
    let hwm2 = vm_hwm(d.pid());
    assert!(
        hwm2 < 256 << 20,
        "daemon peak RSS {hwm2} bytes after delete"
    );

    // A smaller sparse case exports back identical (qcow2 and raw).
    let mid = dir.path().join("mid.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", mid.to_str().unwrap(), "2T"]);
    qemu_io(
        "qcow2",
        &mid,
        &[
            "write -P 0x44 5M 1M",
            "write -P 0x55 1T 64k",
            "write -P 0x66 2047G 3M",
        ],
    );
    import_ok(&d, &mid, "qcow2", "mid").await;
    let out_q = dir.path().join("mid-out.qcow2");
    export(&d, "mid", "qcow2", &out_q).await;
    assert_identical(&mid, "qcow2", &out_q, "qcow2");
    let out_r = dir.path().join("mid-out.raw");
    export(&d, "mid", "raw", &out_r).await;
    assert_identical(&mid, "qcow2", &out_r, "raw");
    let mid_len = std::fs::metadata(d.repo.join("images/mid.json"))
        .unwrap()
        .len();
    assert!(mid_len < 8 << 10, "manifest is {mid_len} bytes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_file_inspected_is_the_file_read_even_when_the_path_is_swapped() {
    let d = Daemon::start_with(DaemonOptions {
        daemon_toml: "max_running_operations = 1".into(),
        capture_toml: "readers = 1".into(),
        ..Default::default()
    });
    let dir = tempfile::tempdir().unwrap();
    // The slow operation that holds the only run slot: 1 GiB of data to read and hash.
    let slow = dir.path().join("slow.raw");
    qemu_img(&["create", "-q", "-f", "raw", slow.to_str().unwrap(), "1G"]);
    qemu_io("raw", &slow, &["write -P 0x5a 0 1G"]);
    // The file to import, and the hostile qcow2 that will replace it: its backing file is a
    // host file (created with -u, which opens nothing).
    let secret = dir.path().join("secret.raw");
    std::fs::write(&secret, vec![0xee; 4 << 20]).unwrap();
    let original = dir.path().join("orig.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        original.to_str().unwrap(),
        "8M",
    ]);
    qemu_io("qcow2", &original, &["write -P 0x42 1M 1M"]);
    let hostile = dir.path().join("hostile.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-u",
        "-b",
        secret.to_str().unwrap(),
        "-F",
        "raw",
        hostile.to_str().unwrap(),
        "8M",
    ]);
    let keep = dir.path().join("orig-copy.qcow2");
    std::fs::copy(&original, &keep).unwrap();

    for (round, via_symlink) in [(0, false), (1, true)] {
        let target = dir.path().join(format!("upload{round}.qcow2"));
        std::fs::copy(&original, &target).unwrap();
        let hold = call_import(&d, req(&slow, "raw", &format!("slow{round}"), ""))
            .await
            .expect("slow import accepted");
        let op = call_import(&d, req(&target, "qcow2", &format!("img{round}"), ""))
            .await
            .expect("import accepted (inspected while the slot is held)");
        assert_eq!(state(&op), proto::OperationState::Queued, "{op:?}");
        // Swap the path for the hostile image while the import waits in the queue.
        if via_symlink {
            let link = dir.path().join("swap-link");
            std::os::unix::fs::symlink(&hostile, &link).unwrap();
            std::fs::rename(&link, &target).unwrap();
        } else {
            let copy = dir.path().join("swap-copy");
            std::fs::copy(&hostile, &copy).unwrap();
            std::fs::rename(&copy, &target).unwrap();
        }
        let mut ops = d.ops().await;
        let held = get_op(&mut ops, &hold.id).await;
        assert!(
            !matches!(
                state(&held),
                proto::OperationState::Active | proto::OperationState::Failed
            ),
            "the slow operation ended before the swap; the test proves nothing: {held:?}"
        );
        ops.cancel_operation(proto::CancelOperationRequest {
            id: hold.id.clone(),
        })
        .await
        .unwrap();
        let op = d.wait_op(&op.id).await;
        d.assert_active(&op);
        let out = dir.path().join(format!("out{round}.qcow2"));
        export(&d, &format!("img{round}"), "qcow2", &out).await;
        assert_identical(&keep, "qcow2", &out, "qcow2");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_chunk_is_replaced_by_the_next_import() {
    let d = Daemon::start();
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", src.to_str().unwrap(), "64M"]);
    qemu_io(
        "qcow2",
        &src,
        &["write -P 0x71 0 4M", "write -P 0x72 8M 4M"],
    );
    import_ok(&d, &src, "qcow2", "first").await;
    let chunks = chunk_files(&d.repo);
    assert_eq!(chunks.len(), 2, "{chunks:?}");
    // A power loss left one chunk truncated, the other empty.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&chunks[0])
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    std::fs::write(&chunks[1], b"").unwrap();
    let op = import_ok(&d, &src, "qcow2", "second").await;
    let p = op.progress.unwrap_or_default();
    assert_eq!(
        p.new_bytes,
        8 << 20,
        "both chunks must be stored again: {p:?}"
    );
    for c in &chunks {
        assert_eq!(
            std::fs::metadata(c).unwrap().len(),
            4 << 20,
            "{}",
            c.display()
        );
    }
    for name in ["first", "second"] {
        let out = dir.path().join(format!("{name}.raw"));
        export(&d, name, "raw", &out).await;
        assert_identical(&src, "qcow2", &out, "raw");
    }
    // Its digest is checked too, not only its length: a same-length damaged chunk is replaced.
    std::fs::write(&chunks[0], vec![0u8; 4 << 20]).unwrap();
    let mut d = d;
    d.stop();
    d.restart();
    import_ok(&d, &src, "qcow2", "third").await;
    let out = dir.path().join("third.raw");
    export(&d, "third", "raw", &out).await;
    assert_identical(&src, "qcow2", &out, "raw");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_is_refused_while_a_manifest_cannot_be_read() {
    let d = Daemon::start();
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.raw");
    std::fs::write(&src, vec![0x3cu8; 6 << 20]).unwrap();
    import_ok(&d, &src, "raw", "keep").await;
    import_ok(&d, &src, "raw", "victim").await;
    let before = chunk_files(&d.repo);
    let newer = r#"{"format_version":99,"name":"future","chunks":["0:x"]}"#;
    for (file, text) in [
        ("future.json", newer),
        ("broken.json", "{\"format_version\":2,\"chunks\":[\"tru"),
    ] {
        let bad = d.repo.join("images").join(file);
        std::fs::write(&bad, text).unwrap();
        let mut images = d.images().await;
        let err = images
            .delete_image(proto::DeleteImageRequest {
                name: "victim".into(),
            })
            .await
            .expect_err("delete must be refused");
        assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
        assert!(err.message().contains(file), "{}", err.message());
        assert!(d.repo.join("images/victim.json").exists());
        assert_eq!(chunk_files(&d.repo), before);
        std::fs::remove_file(&bad).unwrap();
    }
    // With the manifests readable again, the delete goes through and keeps the shared chunks.
    d.imagectl_json(&["rm", "victim"]);
    assert_eq!(chunk_files(&d.repo), before);
    let out = dir.path().join("keep.raw");
    export(&d, "keep", "raw", &out).await;
    assert_identical(&src, "raw", &out, "raw");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn temp_manifests_of_interrupted_writes_are_removed_at_start() {
    let mut d = Daemon::start();
    d.stop();
    let stale = d.repo.join("images/.x.json.tmp-12345");
    std::fs::write(&stale, vec![b'z'; 1 << 20]).unwrap();
    d.restart();
    assert!(!stale.exists(), "temp manifest left behind");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_ids_are_checked_and_operations_say_what_they_did() {
    let d = Daemon::start();
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.raw");
    std::fs::write(&src, vec![0x61u8; 5 << 20]).unwrap();
    let first = call_import(&d, req(&src, "raw", "a", "req-1"))
        .await
        .unwrap();
    let again = call_import(&d, req(&src, "raw", "a", "req-1"))
        .await
        .unwrap();
    assert_eq!(again.id, first.id);
    let err = call_import(&d, req(&src, "raw", "b", "req-1"))
        .await
        .expect_err("same request_id, other image name");
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("req-1"), "{}", err.message());
    let op = d.wait_op(&first.id).await;
    assert_eq!(state(&op), proto::OperationState::Active, "{op:?}");
    assert_eq!(op.consistency, "imported", "{op:?}");

    let dest = dir.path().join("a.qcow2");
    let ereq = |path: &Path, format: &str| proto::ExportImageRequest {
        name: "a".into(),
        format: fmt_of(format),
        path: path.to_str().unwrap().into(),
        overwrite: false,
        request_id: "req-2".into(),
    };
    let mut images = d.images().await;
    let e1 = images
        .export_image(ereq(&dest, "qcow2"))
        .await
        .unwrap()
        .into_inner();
    let e1 = d.wait_op(&e1.id).await;
    assert_eq!(state(&e1), proto::OperationState::Active, "{e1:?}");
    assert_eq!(e1.location, dest.to_str().unwrap(), "{e1:?}");
    let e2 = images
        .export_image(ereq(&dest, "qcow2"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(e2.id, e1.id);
    let err = images
        .export_image(ereq(&dest, "raw"))
        .await
        .expect_err("same request_id, other format");
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
}
