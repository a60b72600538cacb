//! Issue 4 end to end: a real guest's disk captured as one byte stream, qcow2 and raw, into a
//! file, a real Glance and a real S3 server, with no temp copy on the agent's host; the bytes
//! that land there compare identical to the guest's disk.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::support::api::proto;
use crate::support::daemon::{
    assert_identical, assert_qcow2_clean, mode_of, run, Daemon, DaemonOptions,
};
use crate::support::lab::Lab;
use crate::support::servers::{Glance, GLANCE_LOCK, S3, S3_LOCK};
use tonic::Code;

const PROJECT: &str = "imaged-stream-e2e";

fn targets_toml(s3_secret: &str) -> String {
    let g = Glance::get();
    let s = S3::get();
    let mut t = format!(
        "[targets.glance]\nkind = \"glance\"\nendpoint = \"{}\"\n[targets.glance.auth.headers]\n",
        g.endpoint
    );
    for (k, v) in Glance::headers(PROJECT) {
        t.push_str(&format!("{k} = \"{v}\"\n"));
    }
    t.push_str(&format!(
        "[targets.s3]\nkind = \"s3\"\nendpoint = \"{}\"\nbucket = \"{}\"\naccess_key = \"{}\"\nsecret_key = \"{s3_secret}\"\nprefix = \"e2e-{}/\"\n",
        s.endpoint,
        s.bucket,
        s.access_key,
        std::process::id()
    ));
    t
}

fn capture(domain: &str, name: &str, target: proto::target::Kind) -> proto::CaptureRequest {
    proto::CaptureRequest {
        domain: domain.into(),
        image_name: name.into(),
        mode: proto::CaptureMode::Cold as i32,
        target: Some(proto::Target { kind: Some(target) }),
        ..Default::default()
    }
}

fn remote(name: &str, format: proto::ImageFormat) -> proto::target::Kind {
    proto::target::Kind::Remote(proto::RemoteTarget {
        name: name.into(),
        format: format as i32,
        ..Default::default()
    })
}

async fn download(url: String, headers: BTreeMap<String, String>, to: &Path) {
    let mut rb = reqwest::Client::new().get(url);
    for (k, v) in headers {
        rb = rb.header(k, v);
    }
    let r = rb.send().await.expect("download");
    assert!(r.status().is_success(), "download: {}", r.status());
    let bytes = r.bytes().await.unwrap();
    std::fs::write(to, &bytes).unwrap();
}

/// A presigned URL to GET (or, with `delete`, DELETE) an object of the test bucket.
fn s3_signed(key: &str, delete: bool) -> String {
    let (bucket, creds) = S3::get().client();
    use rusty_s3::S3Action;
    let expiry = Duration::from_secs(300);
    if delete {
        bucket
            .delete_object(Some(&creds), key)
            .sign(expiry)
            .to_string()
    } else {
        bucket
            .get_object(Some(&creds), key)
            .sign(expiry)
            .to_string()
    }
}

fn s3_url(key: &str) -> String {
    s3_signed(key, false)
}

/// Watches the daemon's open files while a capture runs: the largest regular file it has
/// open for writing, in bytes.
fn watch_open_files(
    pid: u32,
    stop: Arc<AtomicBool>,
    largest: Arc<AtomicU64>,
) -> std::thread::JoinHandle<Vec<PathBuf>> {
    std::thread::spawn(move || {
        let mut seen = Vec::new();
        while !stop.load(Ordering::SeqCst) {
            if let Ok(rd) = std::fs::read_dir(format!("/proc/{pid}/fd")) {
                for fd in rd.flatten() {
                    let Ok(target) = std::fs::read_link(fd.path()) else {
                        continue;
                    };
                    let Ok(md) = std::fs::metadata(&target) else {
                        continue;
                    };
                    if md.is_file() {
                        let fdinfo = std::fs::read_to_string(format!(
                            "/proc/{pid}/fdinfo/{}",
                            fd.file_name().to_string_lossy()
                        ))
                        .unwrap_or_default();
                        let flags = fdinfo
                            .lines()
                            .find_map(|l| l.strip_prefix("flags:"))
                            .map(|f| u32::from_str_radix(f.trim(), 8).unwrap_or(0))
                            .unwrap_or(0);
                        if flags & 0o3 != 0 {
                            largest.fetch_max(md.len(), Ordering::SeqCst);
                            if !seen.contains(&target) {
                                seen.push(target);
                            }
                        }
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        seen
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_guest_streams_into_a_file_glance_and_s3() {
    // Glance must stay up, and our uploads must not show in a targets test on s3s-fs's disk.
    let (_g, _s) = (GLANCE_LOCK.read().await, S3_LOCK.read().await);
    let lab = Lab::get();
    let guest = lab.guest("stream").create();
    let d = Daemon::start_with(DaemonOptions {
        extra_toml: targets_toml(&S3::get().secret_key),
        ..Default::default()
    });
    let mut images = d.images().await;
    let disk = guest.disk_path().to_path_buf();

    // A local file, qcow2 and raw: one forward pass, identical to the disk.
    for (fmt, pf) in [
        ("qcow2", proto::ImageFormat::Qcow2),
        ("raw", proto::ImageFormat::Raw),
    ] {
        let out = d.dir.path().join(format!("out.{fmt}"));
        let kind = proto::target::Kind::File(proto::FileTarget {
            path: out.to_str().unwrap().into(),
            format: pf as i32,
            overwrite: false,
        });
        let op = images
            .capture(capture(guest.name(), &format!("file-{fmt}"), kind))
            .await
            .expect("file capture")
            .into_inner();
        let op = d.wait_op(&op.id).await;
        d.assert_active(&op);
        assert_eq!(op.location, out.to_str().unwrap());
        if fmt == "qcow2" {
            assert_qcow2_clean(&out);
        }
        assert_identical(&disk, "qcow2", &out, fmt);
    }
    // Nothing went into the repository.
    assert_eq!(d.imagectl_json(&["images"]).as_array().unwrap().len(), 0);

    // Glance, qcow2 and raw, with the agent's open files watched for a temp copy.
    let g = Glance::get();
    for (fmt, pf) in [
        ("qcow2", proto::ImageFormat::Qcow2),
        ("raw", proto::ImageFormat::Raw),
    ] {
        let (stop, largest) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicU64::new(0)),
        );
        let watcher = watch_open_files(d.pid(), stop.clone(), largest.clone());
        let name = format!("glance-{fmt}-{}", std::process::id());
        let op = images
            .capture(capture(guest.name(), &name, remote("glance", pf)))
            .await
            .expect("glance capture")
            .into_inner();
        let op = d.wait_op(&op.id).await;
        stop.store(true, Ordering::SeqCst);
        let files = watcher.join().unwrap();
        d.assert_active(&op);
        let largest = largest.load(Ordering::SeqCst);
        assert!(
            largest < 1 << 20,
            "the agent wrote a {largest}-byte file during the capture: {files:?}"
        );
        let id = op.location.clone();
        let mut rb = reqwest::Client::new().get(format!("{}/v2/images/{id}", g.endpoint));
        for (k, v) in Glance::headers(PROJECT) {
            rb = rb.header(k, v);
        }
        let img: serde_json::Value = rb.send().await.unwrap().json().await.unwrap();
        assert_eq!(img["status"], "active", "{img}");
        assert_eq!(img["disk_format"], fmt);
        assert_eq!(img["imaged_source_domain"], guest.name());
        assert_eq!(img["imaged_consistency"], "cold");
        assert_eq!(img["hw_qemu_guest_agent"], "yes");
        let back = d.dir.path().join(format!("from-glance.{fmt}"));
        download(
            format!("{}/v2/images/{id}/file", g.endpoint),
            Glance::headers(PROJECT),
            &back,
        )
        .await;
        assert_eq!(
            img["size"].as_u64().unwrap(),
            std::fs::metadata(&back).unwrap().len()
        );
        assert_identical(&disk, "qcow2", &back, fmt);
        std::fs::remove_file(&back).unwrap();
        // Leave the shared test server as it was (a 2 GiB raw image per run adds up).
        let mut rb = reqwest::Client::new().delete(format!("{}/v2/images/{id}", g.endpoint));
        for (k, v) in Glance::headers(PROJECT) {
            rb = rb.header(k, v);
        }
        assert!(
            rb.send().await.unwrap().status().is_success(),
            "deleting Glance image {id}"
        );
    }

    // S3, qcow2 and raw; range GETs of the raw object match the disk's bytes.
    for (fmt, pf) in [
        ("qcow2", proto::ImageFormat::Qcow2),
        ("raw", proto::ImageFormat::Raw),
    ] {
        let name = format!("s3-{fmt}");
        let op = images
            .capture(capture(guest.name(), &name, remote("s3", pf)))
            .await
            .expect("s3 capture")
            .into_inner();
        let op = d.wait_op(&op.id).await;
        d.assert_active(&op);
        let key = op
            .location
            .split_once(&format!("{}/", S3::get().bucket))
            .map(|(_, k)| k.to_string())
            .expect("s3 location");
        let back = d.dir.path().join(format!("from-s3.{fmt}"));
        download(s3_url(&key), BTreeMap::new(), &back).await;
        assert_identical(&disk, "qcow2", &back, fmt);
        if fmt == "raw" {
            let raw = d.dir.path().join("disk.raw");
            run(
                "qemu-img",
                &[
                    "convert",
                    "-f",
                    "qcow2",
                    "-O",
                    "raw",
                    disk.to_str().unwrap(),
                    raw.to_str().unwrap(),
                ],
            );
            let all = std::fs::read(&raw).unwrap();
            for (a, len) in [
                (0u64, 4096u64),
                (1 << 20, 65536),
                (all.len() as u64 - 512, 512),
                (300 << 20, 1 << 20),
            ] {
                let r = reqwest::Client::new()
                    .get(s3_url(&key))
                    .header("range", format!("bytes={a}-{}", a + len - 1))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status().as_u16(), 206);
                assert_eq!(
                    &r.bytes().await.unwrap()[..],
                    &all[a as usize..(a + len) as usize],
                    "range at {a}"
                );
            }
        }
        std::fs::remove_file(&back).unwrap();
        for k in [key.clone(), format!("{key}.sha256")] {
            let r = reqwest::Client::new()
                .delete(s3_signed(&k, true))
                .send()
                .await
                .unwrap();
            assert!(
                r.status().is_success(),
                "deleting s3 object {k}: {}",
                r.status()
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_targets_are_refused_before_any_byte_is_read() {
    // Glance must stay up, and our uploads must not show in a targets test on s3s-fs's disk.
    let (_g, _s) = (GLANCE_LOCK.read().await, S3_LOCK.read().await);
    let lab = Lab::get();
    let guest = lab.guest("badtarget").create();
    let d = Daemon::start_with(DaemonOptions {
        extra_toml: targets_toml("not-the-secret"),
        ..Default::default()
    });
    let mut images = d.images().await;
    // Wrong S3 secret: refused by the call itself, nothing started.
    let err = images
        .capture(capture(
            guest.name(),
            "x",
            remote("s3", proto::ImageFormat::Qcow2),
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(
        !err.message().contains("not-the-secret"),
        "a secret leaked: {}",
        err.message()
    );
    // A target the config does not name.
    let err = images
        .capture(capture(
            guest.name(),
            "x",
            remote("nowhere", proto::ImageFormat::Qcow2),
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert!(
        err.message().contains("glance") && err.message().contains("s3"),
        "{}",
        err.message()
    );
    // A file target whose directory does not exist (in an allowed directory), and one outside
    // the allowed directories.
    let missing = std::env::temp_dir().join(format!("imaged-no-such-dir-{}", std::process::id()));
    for (path, code) in [
        (missing.join("x.qcow2"), Code::FailedPrecondition),
        ("/nonexistent-dir/x.qcow2".into(), Code::PermissionDenied),
    ] {
        let kind = proto::target::Kind::File(proto::FileTarget {
            path: path.to_str().unwrap().into(),
            format: 1,
            overwrite: false,
        });
        let err = images
            .capture(capture(guest.name(), "x", kind))
            .await
            .unwrap_err();
        assert_eq!(err.code(), code, "{path:?}: {err:?}");
    }
    assert_eq!(
        d.imagectl_json(&["ops"]).as_array().unwrap().len(),
        0,
        "no operation may start"
    );
    // imagectl: --to NAME and its errors.
    let out = d.imagectl(&["capture", guest.name(), "--name", "x", "--to", "s3"]);
    assert_eq!(
        out.status.code(),
        Some(4),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn file_target(path: &Path, overwrite: bool) -> proto::target::Kind {
    proto::target::Kind::File(proto::FileTarget {
        path: path.to_str().unwrap().into(),
        format: proto::ImageFormat::Raw as i32,
        overwrite,
    })
}

/// Issue 11, item 9: a capture into a file makes a file only root can read (or the configured
/// mode), and never writes through a symbolic link in the path or at the name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_target_is_private_and_never_written_through_links() {
    let lab = Lab::get();
    // A small disk keeps the capture short: no system disk, one 64 MiB data disk with data.
    let guest = lab.guest("filemode").no_disk().data_disk(64 << 20).create();
    let disk = guest.data_disk_paths()[0].to_path_buf();
    run(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 0x5a 1M 2M",
            disk.to_str().unwrap(),
        ],
    );
    for (mode_toml, want) in [("", "0600"), ("[export]\nfile_mode = \"0640\"\n", "0640")] {
        let d = Daemon::start_with(DaemonOptions {
            extra_toml: mode_toml.into(),
            ..Default::default()
        });
        let mut images = d.images().await;
        let out = d.dir.path().join("out.raw");
        let op = images
            .capture(capture(guest.name(), "private", file_target(&out, false)))
            .await
            .expect("file capture")
            .into_inner();
        let op = d.wait_op(&op.id).await;
        d.assert_active(&op);
        assert_eq!(mode_of(&out), want, "{mode_toml:?}");
        assert_identical(&disk, "qcow2", &out, "raw");
    }

    let d = Daemon::start();
    let mut images = d.images().await;
    let elsewhere = d.dir.path().join("elsewhere");
    std::fs::create_dir(&elsewhere).unwrap();
    let victim = elsewhere.join("victim");
    std::fs::write(&victim, b"keep me").unwrap();
    let link_dir = d.dir.path().join("link");
    std::os::unix::fs::symlink(&elsewhere, &link_dir).unwrap();
    let link_file = d.dir.path().join("to-victim.raw");
    std::os::unix::fs::symlink(&victim, &link_file).unwrap();
    for (dest, named) in [
        (link_dir.join("x.raw"), &link_dir),
        (link_file.clone(), &link_file),
    ] {
        for overwrite in [false, true] {
            let err = images
                .capture(capture(
                    guest.name(),
                    "through-link",
                    file_target(&dest, overwrite),
                ))
                .await
                .expect_err("a file target through a link must be refused");
            assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
            assert!(
                err.message().contains(named.to_str().unwrap())
                    && err.message().contains("symbolic link"),
                "{}",
                err.message()
            );
        }
    }
    assert_eq!(std::fs::read(&victim).unwrap(), b"keep me");
    assert_eq!(
        std::fs::read_dir(&elsewhere).unwrap().count(),
        1,
        "nothing may land behind the link"
    );
    assert_eq!(
        d.imagectl_json(&["ops"]).as_array().unwrap().len(),
        0,
        "no operation may start"
    );
}
