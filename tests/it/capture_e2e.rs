//! Cold capture end to end on a real libvirt host with a real Debian guest built by the lab:
//! the guest writes a file and is shut down through its agent; the daemon captures its disk
//! (a qcow2 overlay on a backing file) over gRPC and through `imagectl`; the exports compare
//! identical to the disk; a new domain boots from the exported qcow2 to its guest agent and
//! finds the file. Then the refusals: unknown, running and diskless domains, a missing disk
//! file, a domain another operation holds, and the domain kept from starting mid-read.

use std::path::Path;
use std::time::Duration;

use crate::support::api::proto;
use crate::support::daemon::{assert_identical, assert_qcow2_clean, state, Daemon};
use crate::support::lab::{virsh, Lab, SystemDisk};
use tonic::Code;

fn capture_req(domain: &str, name: &str) -> proto::CaptureRequest {
    proto::CaptureRequest {
        domain: domain.into(),
        image_name: name.into(),
        mode: proto::CaptureMode::Cold as i32,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cold_capture_of_a_real_guest_round_trips_and_boots() {
    let lab = Lab::get();
    let guest = lab.guest("capture").create();
    guest.start();
    guest.wait_agent(Duration::from_secs(180));
    guest.wait_booted(Duration::from_secs(180));
    guest.exec_ok(&["sh", "-c", "echo captured-by-imaged > /root/marker && sync"]);
    guest.shutdown(Duration::from_secs(120));
    assert_eq!(guest.state(), "shut off");

    let d = Daemon::start();
    // The domain is listed with its disk and agent channel.
    let doms = d.imagectl_json(&["domains"]);
    let me = doms
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["name"] == guest.name())
        .expect("guest listed");
    assert_eq!(me["state"], "shut off");
    assert_eq!(me["has_guest_agent_channel"], true);
    let disk = &me["disks"][0];
    assert_eq!(disk["target"], "vda");
    assert_eq!(disk["system_disk"], true);
    assert_eq!(disk["format"], "qcow2");
    assert_eq!(disk["virtual_size"], 2u64 << 30);

    // Capture through the gRPC API, with a request id: a retry gets the same operation, the
    // same id with other parameters is refused.
    let mut images = d.images().await;
    let mut first = capture_req(guest.name(), "first");
    first.request_id = "capture-req-1".into();
    let op = images
        .capture(first.clone())
        .await
        .expect("capture accepted")
        .into_inner();
    assert_eq!(op.domain, guest.name());
    let again = images.capture(first.clone()).await.unwrap().into_inner();
    assert_eq!(again.id, op.id, "a retry must return the first operation");
    let mut other = first.clone();
    other.image_name = "second-name".into();
    let err = images.capture(other).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    assert!(
        err.message().contains("other parameters"),
        "{}",
        err.message()
    );
    let op = d.wait_op(&op.id).await;
    d.assert_active(&op);
    let p = op.progress.unwrap();
    assert_eq!(p.total_bytes, 2 << 30);
    assert!(
        p.read_bytes < p.total_bytes / 2,
        "holes must not be read: {p:?}"
    );
    assert!(p.new_bytes > 0);
    let img = d.imagectl_json(&["image", "first"]);
    assert_eq!(img["consistency"], "cold");
    assert_eq!(img["source_domain"], guest.name());
    assert_eq!(img["source_disk"], "vda");

    // A second capture of the unchanged disk, through imagectl, stores no new chunk.
    let op2 = d.imagectl_json(&["capture", guest.name(), "--name", "second"]);
    assert_eq!(op2["state"], "active", "{op2}");
    assert_eq!(op2["progress"]["new_bytes"], 0, "{op2}");
    assert!(op2["progress"]["existing_bytes"].as_u64().unwrap() > 0);
    assert_eq!(
        d.imagectl_json(&["image", "second"])["content_digest"],
        img["content_digest"]
    );

    // Exports compare identical to the guest's disk (read through its backing chain).
    let q = d.dir.path().join("first.qcow2");
    let r = d.dir.path().join("first.raw");
    d.imagectl_export("first", "qcow2", &q);
    d.imagectl_export("first", "raw", &r);
    assert_qcow2_clean(&q);
    assert_identical(guest.disk_path(), "qcow2", &q, "qcow2");
    assert_identical(guest.disk_path(), "qcow2", &r, "raw");

    // A domain booted from the exported qcow2 reaches its guest agent and has the file.
    let clone = lab.boot_from("from-image", &q);
    let marker = clone.exec_ok(&["cat", "/root/marker"]);
    assert_eq!(marker.trim(), "captured-by-imaged");
    clone.destroy();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_name_the_domain_and_change_nothing() {
    let lab = Lab::get();
    let d = Daemon::start();
    let mut images = d.images().await;

    let err = images
        .capture(capture_req("no-such-domain-imaged", "x"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    assert!(
        err.message().contains("no-such-domain-imaged"),
        "{}",
        err.message()
    );
    let out = d.imagectl(&["capture", "no-such-domain-imaged", "--name", "x"]);
    assert_eq!(out.status.code(), Some(3));

    // A domain with no disk: refused while shut off, and refused as running once started.
    let diskless = lab.guest("nodisk").no_disk().create();
    let err = images
        .capture(capture_req(diskless.name(), "x"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(
        err.message().contains("no disk") && err.message().contains(diskless.name()),
        "{}",
        err.message()
    );
    diskless.start();
    let err = images
        .capture(capture_req(diskless.name(), "x"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(
        err.message().contains("running") && err.message().contains(diskless.name()),
        "{}",
        err.message()
    );
    let out = d.imagectl(&["capture", diskless.name(), "--name", "x"]);
    assert_eq!(
        out.status.code(),
        Some(4),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    diskless.destroy();

    // A disk file that is gone.
    let broken = lab.guest("nofile").system_disk(SystemDisk::Raw).create();
    std::fs::remove_file(broken.disk_path()).unwrap();
    let err = images
        .capture(capture_req(broken.name(), "x"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(
        err.message().contains("does not exist") && err.message().contains(broken.name()),
        "{}",
        err.message()
    );

    // Bad image names never reach libvirt.
    let guest = lab.guest("held").create();
    let err = images
        .capture(capture_req(guest.name(), "../../x"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);

    // One operation per domain at a time.
    let first = images
        .capture(capture_req(guest.name(), "held-1"))
        .await
        .unwrap()
        .into_inner();
    let err = images
        .capture(capture_req(guest.name(), "held-2"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Aborted, "{err:?}");
    assert!(err.message().contains(&first.id), "{}", err.message());
    assert_eq!(
        state(&d.wait_op(&first.id).await),
        proto::OperationState::Active
    );
    // Name taken.
    let err = images
        .capture(capture_req(guest.name(), "held-1"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists);
    let list = d.imagectl_json(&["images"]);
    assert_eq!(list.as_array().unwrap().len(), 1, "{list}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn domain_cannot_start_while_its_disk_is_read() {
    let lab = Lab::get();
    let guest = lab.guest("locked").create();
    let run = tempfile::tempdir().unwrap();
    let export = imaged::capture::source::NbdExport::start(
        Path::new("qemu-nbd"),
        guest.disk_path(),
        "qcow2",
        run.path(),
        "lock-test",
        1,
    )
    .await
    .expect("qemu-nbd on the guest disk");
    let started = virsh(&["start", guest.name()]);
    assert!(
        started.is_err(),
        "the domain started while qemu-nbd read its disk"
    );
    let msg = started.unwrap_err();
    assert!(
        msg.contains("lock"),
        "expected QEMU's image lock to refuse the start: {msg}"
    );
    assert_eq!(guest.state(), "shut off");
    export.stop().await;
    virsh(&["start", guest.name()]).expect("the domain starts once the read has ended");
    guest.destroy();
}
