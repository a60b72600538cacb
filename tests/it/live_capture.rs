//! Live captures of real running guests (issue 3): quiesce (freeze window reported, guest
//! thawed and running, the image's filesystem clean), crash-consistent, shutdown with restart,
//! and the safety nets: no agent, a hung agent during the freeze, a daemon killed with a guest
//! frozen.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::support::api::proto;
use crate::support::daemon::{get_op, run, state, Daemon, DaemonOptions};
use crate::support::lab::{Guest, Lab};
use tonic::Code;

fn req(domain: &str, name: &str, mode: proto::CaptureMode) -> proto::CaptureRequest {
    proto::CaptureRequest {
        domain: domain.into(),
        image_name: name.into(),
        mode: mode as i32,
        ..Default::default()
    }
}

fn fsfreeze_status(g: &Guest) -> String {
    g.agent(r#"{"execute":"guest-fsfreeze-status"}"#)
}

/// e2fsck -fn on an exported raw image: 0 means clean.
fn fsck(raw: &Path) -> (i32, String) {
    let out = Command::new("e2fsck")
        .args(["-f", "-n"])
        .arg(raw)
        .output()
        .expect("e2fsck (e2fsprogs)");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

/// The uid and gid QEMU runs as on this host.
fn qemu_user() -> (u32, u32) {
    imaged::hypervisor::libvirt::qemu_ids(
        &std::fs::read_to_string("/etc/libvirt/qemu.conf").unwrap_or_default(),
        &std::fs::read_to_string("/etc/passwd").unwrap(),
        &std::fs::read_to_string("/etc/group").unwrap(),
    )
    .expect("QEMU's user")
}

fn boot(g: &Guest) {
    g.start();
    g.wait_agent(Duration::from_secs(180));
    g.wait_booted(Duration::from_secs(180));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quiesce_crash_consistent_and_shutdown_captures_of_a_running_guest() {
    let lab = Lab::get();
    let g = lab.guest("live").create();
    boot(&g);
    // Keep the guest writing while it is captured.
    g.sh("nohup sh -c 'while true; do date >> /root/busy.log; sync; sleep 0.2; done' >/dev/null 2>&1 &");
    let d = Daemon::start();
    let mut images = d.images().await;

    // Default mode on a running guest with an agent: quiesce.
    let op = images
        .capture(req(g.name(), "live-q", proto::CaptureMode::Unspecified))
        .await
        .expect("quiesce accepted")
        .into_inner();
    let op = d.wait_op(&op.id).await;
    d.assert_active(&op);
    assert_eq!(op.consistency, "quiesced");
    assert!(
        op.freeze_window_ms > 0 && op.freeze_window_ms < 10_000,
        "freeze window {} ms",
        op.freeze_window_ms
    );
    assert_eq!(g.state(), "running", "the guest must keep running");
    assert!(fsfreeze_status(&g).contains("thawed"), "guest left frozen");
    assert!(d.imagectl_json(&["image", "live-q"])["consistency"] == "quiesced");
    let raw = d.dir.path().join("live-q.raw");
    d.imagectl_export("live-q", "raw", &raw);
    let (code, out) = fsck(&raw);
    assert_eq!(
        code, 0,
        "the quiesced image's filesystem is not clean:\n{out}"
    );
    // No backup job or scratch file is left.
    let leftovers: Vec<_> = std::fs::read_dir(d.run_dir())
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(
        leftovers
            .iter()
            .all(|n| !n.to_string_lossy().starts_with("backup-")),
        "{leftovers:?}"
    );
    assert!(
        run("virsh", &["domjobinfo", g.name()]).contains("None"),
        "a backup job is still running"
    );

    // Crash-consistent: live, no freeze.
    let op = images
        .capture(req(g.name(), "live-c", proto::CaptureMode::CrashConsistent))
        .await
        .unwrap()
        .into_inner();
    let op = d.wait_op(&op.id).await;
    assert_eq!(state(&op), proto::OperationState::Active, "{op:?}");
    assert_eq!(op.consistency, "crash-consistent");
    assert_eq!(op.freeze_window_ms, 0);
    assert_eq!(g.state(), "running");

    // Shutdown with restart: the guest powers off, is captured cold, and comes back.
    let mut r = req(g.name(), "live-s", proto::CaptureMode::Shutdown);
    r.restart = true;
    let op = images.capture(r).await.unwrap().into_inner();
    let op = d.wait_op(&op.id).await;
    d.assert_active(&op);
    assert_eq!(op.consistency, "cold");
    assert_eq!(g.state(), "running", "restart was asked");
    g.wait_agent(Duration::from_secs(180));
    let raw = d.dir.path().join("live-s.raw");
    d.imagectl_export("live-s", "raw", &raw);
    let (code, out) = fsck(&raw);
    assert_eq!(
        code, 0,
        "the shutdown image's filesystem is not clean:\n{out}"
    );

    // Shutdown with restart, cancelled while the guest shuts down: the operation ends
    // CANCELLED, no image is listed, and the guest is started again all the same.
    g.wait_booted(Duration::from_secs(180));
    let mut r = req(g.name(), "live-cancelled", proto::CaptureMode::Shutdown);
    r.restart = true;
    let op = images.capture(r).await.unwrap().into_inner();
    let t0 = Instant::now();
    while g.state() == "running" {
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "the guest never shut down"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut ops = d.ops().await;
    let _ = ops
        .cancel_operation(proto::CancelOperationRequest { id: op.id.clone() })
        .await;
    let end = d.wait_op(&op.id).await;
    assert!(
        matches!(
            state(&end),
            proto::OperationState::Cancelled | proto::OperationState::Active
        ),
        "{end:?}"
    );
    if state(&end) == proto::OperationState::Cancelled {
        assert_eq!(
            d.imagectl(&["image", "live-cancelled"]).status.code(),
            Some(3)
        );
    }
    assert_eq!(
        g.state(),
        "running",
        "restart was asked: {end:?}\n{}",
        d.log_text()
    );
    g.wait_agent(Duration::from_secs(180));

    // Restart and prep options outside shutdown are refused before anything happens.
    let mut r = req(g.name(), "x", proto::CaptureMode::Quiesce);
    r.restart = true;
    let err = images.capture(r).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(
        err.message().contains("restart applies to mode shutdown"),
        "{}",
        err.message()
    );
    let mut r = req(g.name(), "x", proto::CaptureMode::CrashConsistent);
    r.prep = vec!["dhcp".into()];
    let err = images.capture(r).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");

    // Cold on a running domain is refused, naming the state.
    let err = images
        .capture(req(g.name(), "x", proto::CaptureMode::Cold))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("running"), "{}", err.message());
    g.destroy();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_an_agent_quiesce_is_refused_and_crash_consistent_works() {
    let lab = Lab::get();
    let g = lab.guest("noagent").no_agent().create();
    g.start();
    let d = Daemon::start();
    let mut images = d.images().await;
    for mode in [proto::CaptureMode::Unspecified, proto::CaptureMode::Quiesce] {
        let err = images.capture(req(g.name(), "x", mode)).await.unwrap_err();
        assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
        assert!(err.message().contains(g.name()), "{}", err.message());
        assert!(err.message().contains("agent"), "{}", err.message());
    }
    let err = images
        .capture(req(g.name(), "x", proto::CaptureMode::Unspecified))
        .await
        .unwrap_err();
    assert!(
        err.message().contains("crash-consistent") && err.message().contains("shutdown"),
        "{}",
        err.message()
    );
    assert_eq!(
        d.imagectl_json(&["ops"]).as_array().unwrap().len(),
        0,
        "nothing may start"
    );
    let op = images
        .capture(req(g.name(), "nc", proto::CaptureMode::CrashConsistent))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        state(&d.wait_op(&op.id).await),
        proto::OperationState::Active
    );
    g.destroy();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_is_never_left_frozen() {
    let lab = Lab::get();
    let g = lab.guest("frozen").create();
    boot(&g);
    let mut d = Daemon::start();

    // 1. The daemon dies while the guest is frozen: the restarted daemon thaws it. (The freeze
    //    window lasts ~100 ms, too short to aim a kill at, so the test freezes the guest itself
    //    and leaves the journal entry a killed capture leaves.)
    assert!(d.stop().success());
    run("virsh", &["domfsfreeze", g.name()]);
    assert!(fsfreeze_status(&g).contains("frozen"));
    let journal = d.run_dir().join("journal");
    std::fs::create_dir_all(&journal).unwrap();
    std::fs::write(
        journal.join("op-killed.json"),
        format!(
            r#"{{"op":"op-killed","domain":"{}","backup_dir":"{}","frozen":true,"started_at":0}}"#,
            g.name(),
            d.run_dir().join("backup-op-killed").display()
        ),
    )
    .unwrap();
    // Its repository cannot be opened (a file where the directory was): the daemon cannot
    // serve, but it thaws the guest before it gives up.
    let saved = d.repo.with_extension("saved");
    std::fs::rename(&d.repo, &saved).unwrap();
    std::fs::write(&d.repo, b"not a directory").unwrap();
    let status = d.run_to_exit(Duration::from_secs(90));
    assert!(!status.success(), "imaged served without its repository");
    assert!(
        fsfreeze_status(&g).contains("thawed"),
        "a broken repository kept the guest frozen:\n{}",
        d.log_text()
    );
    assert!(
        !journal.join("op-killed.json").exists(),
        "journal entry not cleared once the thaw was confirmed"
    );
    assert!(
        d.log_text().contains("recovering a capture"),
        "{}",
        d.log_text()
    );
    std::fs::remove_file(&d.repo).unwrap();
    std::fs::rename(&saved, &d.repo).unwrap();
    d.restart();

    // 1b. A backup job that imaged did not start is never aborted, even when a journal entry
    //     of ours names the same domain: the restarted daemon leaves it running.
    assert!(d.stop().success());
    let foreign = tempfile::Builder::new()
        .prefix("foreign-backup-")
        .tempdir()
        .unwrap();
    let (uid, gid) = qemu_user();
    std::os::unix::fs::chown(foreign.path(), Some(uid), Some(gid)).unwrap();
    let xml = foreign.path().join("backup.xml");
    std::fs::write(
        &xml,
        format!(
            "<domainbackup mode='pull'><server transport='unix' socket='{0}/nbd.sock'/><disks>\
             <disk name='vda' backup='yes' type='file'><scratch file='{0}/scratch.qcow2'/></disk>\
             </disks></domainbackup>",
            foreign.path().display()
        ),
    )
    .unwrap();
    run("virsh", &["backup-begin", g.name(), xml.to_str().unwrap()]);
    std::fs::write(
        journal.join("op-other.json"),
        format!(
            r#"{{"op":"op-other","domain":"{}","backup_dir":"{}","frozen":false,"started_at":0}}"#,
            g.name(),
            d.run_dir().join("backup-op-other").display()
        ),
    )
    .unwrap();
    d.restart();
    assert!(
        !run("virsh", &["domjobinfo", g.name()]).contains("None"),
        "imaged aborted a backup job it did not start:\n{}",
        d.log_text()
    );
    assert!(
        d.log_text().contains("left another backup job alone"),
        "{}",
        d.log_text()
    );
    assert!(!journal.join("op-other.json").exists());
    run("virsh", &["domjobabort", g.name()]);

    // 2. The daemon is killed (SIGKILL) while it reads from a live backup job: the restarted
    //    daemon ends the job QEMU still runs and removes its scratch directory.
    let mut images = d.images().await;
    let op = images
        .capture(req(g.name(), "killed", proto::CaptureMode::CrashConsistent))
        .await
        .unwrap()
        .into_inner();
    let mut ops = d.ops().await;
    loop {
        let o = get_op(&mut ops, &op.id).await;
        if state(&o) == proto::OperationState::Saving {
            break;
        }
        assert!(
            matches!(
                state(&o),
                proto::OperationState::Queued | proto::OperationState::Preparing
            ),
            "{o:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    d.kill();
    let backup_dir = d.run_dir().join(format!("backup-{}", op.id));
    assert!(
        backup_dir.exists(),
        "the backup job's directory should exist while its job runs"
    );
    assert!(
        !run("virsh", &["domjobinfo", g.name()]).contains("None"),
        "no backup job after the kill"
    );
    d.restart();
    assert!(
        run("virsh", &["domjobinfo", g.name()]).contains("None"),
        "the backup job was not ended:\n{}",
        d.log_text()
    );
    assert!(!backup_dir.exists(), "scratch directory left behind");
    assert_eq!(g.state(), "running");

    // 3. The agent hangs when asked to freeze (qemu-ga stopped, resumed 20 s later): the
    //    capture fails within its bound, and once the agent answers again the guard thaws
    //    the guest (the late freeze is undone).
    g.sh("nohup sh -c 'sleep 1; kill -STOP $(pidof qemu-ga); sleep 20; kill -CONT $(pidof qemu-ga)' >/dev/null 2>&1 &");
    std::thread::sleep(Duration::from_secs(3));
    let mut images = d.images().await;
    let t0 = Instant::now();
    let res = images
        .capture(req(g.name(), "hung", proto::CaptureMode::Quiesce))
        .await;
    match res {
        Err(e) => assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}"),
        Ok(op) => {
            let op = d.wait_op(&op.into_inner().id).await;
            assert_eq!(state(&op), proto::OperationState::Failed, "{op:?}");
        }
    }
    assert!(
        t0.elapsed() < Duration::from_secs(60),
        "the capture took {:?} to give up",
        t0.elapsed()
    );
    let t1 = Instant::now();
    loop {
        if let Ok(s) = g.try_agent(r#"{"execute":"guest-fsfreeze-status"}"#, 5) {
            if s.contains("thawed") && t1.elapsed() > Duration::from_secs(25) {
                break;
            }
        }
        assert!(
            t1.elapsed() < Duration::from_secs(150),
            "guest still frozen or agent gone:\n{}",
            d.log_text()
        );
        std::thread::sleep(Duration::from_secs(1));
    }
    assert_eq!(g.state(), "running");

    // 4. Someone else pulls the plug mid-capture: the operation fails saying so, and no
    //    image, backup job, scratch file or journal entry is left.
    let op = images
        .capture(req(
            g.name(),
            "unplugged",
            proto::CaptureMode::CrashConsistent,
        ))
        .await
        .unwrap()
        .into_inner();
    loop {
        let o = get_op(&mut ops, &op.id).await;
        if state(&o) == proto::OperationState::Saving {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    run("virsh", &["destroy", g.name()]);
    let end = d.wait_op(&op.id).await;
    assert_eq!(state(&end), proto::OperationState::Failed, "{end:?}");
    let msg = end.error.unwrap().message;
    assert!(
        msg.contains(g.name()),
        "the error must name the domain: {msg}"
    );
    assert!(!d.run_dir().join(format!("backup-{}", op.id)).exists());
    assert!(
        std::fs::read_dir(d.run_dir().join("journal"))
            .map(|r| r.count())
            .unwrap_or(0)
            == 0,
        "journal entry left"
    );
    let out = d.imagectl(&["image", "unplugged"]);
    assert_eq!(
        out.status.code(),
        Some(3),
        "a failed capture must not be listed"
    );
}

/// A "quiesced" label is never false: when the backup job begins only after the freeze bound
/// (here 1 ms, so always), the guard has thawed the guest first, and the capture fails saying
/// so instead of labelling a post-thaw image quiesced. The guest is thawed, no job or image is
/// left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quiesce_that_outlasts_its_freeze_bound_fails_instead_of_lying() {
    let lab = Lab::get();
    let g = lab.guest("bound").create();
    boot(&g);
    let d = Daemon::start_with(DaemonOptions {
        capture_toml: "max_freeze_ms = 1".into(),
        ..Default::default()
    });
    let mut images = d.images().await;
    let op = images
        .capture(req(g.name(), "not-quiesced", proto::CaptureMode::Quiesce))
        .await
        .unwrap()
        .into_inner();
    let end = d.wait_op(&op.id).await;
    assert_eq!(state(&end), proto::OperationState::Failed, "{end:?}");
    let msg = end.error.unwrap().message;
    assert!(
        msg.contains("freeze bound") && msg.contains("crash-consistent"),
        "{msg}"
    );
    assert!(fsfreeze_status(&g).contains("thawed"));
    // libvirt tears a backup job down asynchronously: give it a moment.
    let t0 = Instant::now();
    while !run("virsh", &["domjobinfo", g.name()]).contains("None") {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "backup job left running"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(
        d.imagectl(&["image", "not-quiesced"]).status.code(),
        Some(3)
    );
    assert_eq!(
        std::fs::read_dir(d.run_dir().join("journal"))
            .map(|r| r.count())
            .unwrap_or(0),
        0,
        "journal entry left"
    );
    assert_eq!(g.state(), "running");
    g.destroy();
}
