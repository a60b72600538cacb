//! Incremental live captures of real running guests (issue 10): a live capture into the
//! repository makes a checkpoint, the next reads only what the guest wrote since; the image it
//! makes is the same as a full read of the same moment; a guest whose QEMU was killed (its
//! bitmap broken) and a raw disk fall back to a full read that says why; and no checkpoint
//! record stays on the domain, so a plain `virsh undefine` works, not even after the daemon
//! was killed in the middle of a capture.

use std::time::Duration;

use crate::support::api::proto::{self, Operation};
use crate::support::daemon::{run, Daemon};
use crate::support::lab::{Guest, Lab, SystemDisk};

const MIB: u64 = 1 << 20;

fn boot(g: &Guest) {
    g.start();
    g.wait_agent(Duration::from_secs(180));
    g.wait_booted(Duration::from_secs(180));
}

/// A crash-consistent capture of `g` into the daemon's repository, done.
async fn capture(d: &Daemon, g: &Guest, name: &str) -> Operation {
    let op = d
        .images()
        .await
        .capture(proto::CaptureRequest {
            domain: g.name().into(),
            image_name: name.into(),
            mode: proto::CaptureMode::CrashConsistent as i32,
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| panic!("capture {name} of {}: {e}", g.name()))
        .into_inner();
    let op = d.wait_op(&op.id).await;
    d.assert_active(&op);
    op
}

fn read_of(op: &Operation) -> proto::ReadReport {
    op.read
        .clone()
        .unwrap_or_else(|| panic!("operation {} reports no read: {op:?}", op.id))
}

fn read_bytes(op: &Operation) -> u64 {
    op.progress.map_or(0, |p| p.read_bytes)
}

fn digest(op: &Operation) -> String {
    op.image
        .as_ref()
        .map(|i| i.content_digest.clone())
        .unwrap_or_else(|| panic!("operation {} made no image", op.id))
}

/// The domain's checkpoint records, as libvirt lists them.
fn checkpoint_records(g: &Guest) -> Vec<String> {
    run("virsh", &["checkpoint-list", g.name(), "--name"])
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recapture_of_a_running_guest_reads_only_what_changed() {
    let lab = Lab::get();
    let g = lab.guest("incr").create();
    boot(&g);
    let mut d = Daemon::start();

    // The first capture reads the whole disk and makes a checkpoint.
    let first = capture(&d, &g, "incr-1").await;
    let r1 = read_of(&first);
    assert!(!r1.incremental, "{r1:?}");
    assert!(
        r1.checkpoint.starts_with("imaged-vda-"),
        "a checkpoint is made: {r1:?}"
    );
    assert!(r1.note.contains("no earlier checkpoint"), "{r1:?}");
    let full_read = read_bytes(&first);
    assert!(
        full_read > 100 * MIB,
        "the first capture read {full_read} bytes"
    );
    assert!(
        checkpoint_records(&g).is_empty(),
        "no checkpoint record stays on the domain: {:?}",
        checkpoint_records(&g)
    );

    // 32 MiB written in the guest: the recapture reads about that, not the disk.
    g.sh_ok("dd if=/dev/urandom of=/root/new bs=1M count=32 conv=fsync status=none");
    let second = capture(&d, &g, "incr-2").await;
    let r2 = read_of(&second);
    assert!(r2.incremental, "the recapture is incremental: {r2:?}");
    assert_eq!(r2.since_checkpoint, r1.checkpoint, "{r2:?}");
    assert!(
        (32 * MIB..full_read / 2).contains(&r2.changed_bytes),
        "changed bytes {} (32 MiB written; the disk holds {full_read})",
        r2.changed_bytes
    );
    let read2 = read_bytes(&second);
    assert!(
        (32 * MIB..=r2.changed_bytes + 64 * 4 * MIB).contains(&read2),
        "the recapture read {read2} bytes for {} changed",
        r2.changed_bytes
    );
    assert!(checkpoint_records(&g).is_empty());

    // The same moment read incrementally and in full gives the same image: the guest is paused
    // for both.
    g.sh_ok("dd if=/dev/urandom of=/root/more bs=1M count=8 conv=fsync status=none");
    run("virsh", &["suspend", g.name()]);
    let third = capture(&d, &g, "incr-3").await;
    let r3 = read_of(&third);
    assert!(r3.incremental, "{r3:?}");
    assert_eq!(r3.since_checkpoint, r2.checkpoint);
    // Without the saved checkpoint, the daemon reads the whole disk.
    let saved = d.dir.path().join("state/checkpoints");
    let files: Vec<_> = std::fs::read_dir(&saved)
        .unwrap_or_else(|e| panic!("{}: {e}", saved.display()))
        .flatten()
        .map(|f| f.path())
        .collect();
    assert_eq!(files.len(), 1, "one saved checkpoint per disk: {files:?}");
    std::fs::remove_file(&files[0]).unwrap();
    let full = capture(&d, &g, "incr-3-full").await;
    let rf = read_of(&full);
    assert!(!rf.incremental, "{rf:?}");
    assert_eq!(
        digest(&third),
        digest(&full),
        "an incremental image equals a full read of the same moment"
    );
    run("virsh", &["resume", g.name()]);

    // QEMU killed: its bitmap is left inconsistent; the next capture reads the whole disk and
    // says why, then incremental again.
    let pid = std::fs::read_to_string(format!("/run/libvirt/qemu/{}.pid", g.name()))
        .expect("QEMU's pid file")
        .trim()
        .to_string();
    run("kill", &["-9", &pid]);
    g.wait_state("shut off", Duration::from_secs(30));
    boot(&g);
    let after_kill = capture(&d, &g, "incr-4").await;
    let r4 = read_of(&after_kill);
    assert!(!r4.incremental, "{r4:?}");
    assert!(
        r4.note.contains("inconsistent") || r4.note.contains("cannot be told"),
        "the fallback says why: {r4:?}"
    );
    assert!(!r4.checkpoint.is_empty(), "{r4:?}");
    g.sh_ok("dd if=/dev/urandom of=/root/last bs=1M count=4 conv=fsync status=none");
    let fifth = capture(&d, &g, "incr-5").await;
    assert!(read_of(&fifth).incremental, "{:?}", read_of(&fifth));

    // Shut off, the domain has no checkpoint record: a plain undefine works.
    g.shutdown(Duration::from_secs(120));
    assert!(checkpoint_records(&g).is_empty());
    let xml = run("virsh", &["dumpxml", g.name()]);
    run("virsh", &["undefine", g.name()]);
    let path = g.dir().join("redefine.xml");
    std::fs::write(&path, xml).unwrap();
    run("virsh", &["define", &path.to_string_lossy()]);
    d.stop();
}

/// The daemon killed (SIGKILL) while an incremental capture reads: its backup job had defined
/// two checkpoint records on the domain (the earlier checkpoint, again, and its own), which the
/// capture's journal entry names. Started again, the daemon ends the job and deletes both
/// records, the earlier one without its bitmap: no record stays (an undefine would be refused),
/// and the next capture is still incremental from the earlier checkpoint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_killed_mid_capture_leaves_no_checkpoint_record_once_started_again() {
    use crate::support::daemon::{get_op, state};
    use proto::OperationState as St;
    let lab = Lab::get();
    let g = lab.guest("incr-kill").create();
    boot(&g);
    let mut d = Daemon::start();
    let first = capture(&d, &g, "kill-1").await;
    let r1 = read_of(&first);
    assert!(!r1.checkpoint.is_empty(), "{r1:?}");

    // Enough written that the recapture's read can be caught in the middle.
    g.sh_ok("dd if=/dev/urandom of=/root/big bs=1M count=384 conv=fsync status=none");
    let op = d
        .images()
        .await
        .capture(proto::CaptureRequest {
            domain: g.name().into(),
            image_name: "kill-2".into(),
            mode: proto::CaptureMode::CrashConsistent as i32,
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| panic!("capture kill-2 of {}: {e}", g.name()))
        .into_inner();
    let mut ops = d.ops().await;
    let t0 = std::time::Instant::now();
    loop {
        let o = get_op(&mut ops, &op.id).await;
        if state(&o) == St::Saving && read_bytes(&o) > 0 {
            break;
        }
        assert!(
            state(&o) != St::Active
                && state(&o) != St::Failed
                && t0.elapsed() < Duration::from_secs(120),
            "expected operation {} to be reading (the stage this test aims at); it is {:?}: {o:?}",
            op.id,
            state(&o)
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    d.kill();
    let left = checkpoint_records(&g);
    assert_eq!(
        left.len(),
        2,
        "expected the killed capture's two checkpoint records on the domain (the stage this \
         test aims at): {left:?}"
    );

    d.restart();
    let t0 = std::time::Instant::now();
    while !checkpoint_records(&g).is_empty() {
        assert!(
            t0.elapsed() < Duration::from_secs(90),
            "checkpoint records still on {} 90 s after the daemon started again: {:?}",
            g.name(),
            checkpoint_records(&g)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let o = d.wait_op(&op.id).await;
    assert_eq!(state(&o), St::Failed, "the killed capture failed: {o:?}");

    g.sh_ok("dd if=/dev/urandom of=/root/after bs=1M count=4 conv=fsync status=none");
    let next = capture(&d, &g, "kill-3").await;
    let r3 = read_of(&next);
    assert!(
        r3.incremental && r3.since_checkpoint == r1.checkpoint,
        "the earlier checkpoint's bitmap survived the recovery: {r3:?}"
    );
    assert!(checkpoint_records(&g).is_empty());
    d.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_raw_disk_is_read_whole_and_says_why() {
    let lab = Lab::get();
    let g = lab.guest("incr-raw").system_disk(SystemDisk::Raw).create();
    boot(&g);
    let mut d = Daemon::start();
    for name in ["raw-1", "raw-2"] {
        let op = capture(&d, &g, name).await;
        let r = read_of(&op);
        assert!(!r.incremental, "{r:?}");
        assert!(r.checkpoint.is_empty(), "{r:?}");
        assert!(r.note.contains("only a qcow2 image"), "{r:?}");
    }
    assert!(checkpoint_records(&g).is_empty());
    d.stop();
}
