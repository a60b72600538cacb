//! Issue 12: captures of real guests while libvirtd goes away, guests destroyed mid-capture, and
//! a bounded soak. Issue 8: the daemon killed at each stage of a capture.
//!
//! Every test here holds the libvirt lock exclusively ([`libvirtd::exclusive`], first thing),
//! so no other libvirt test of the binary runs beside it (those that stop libvirtd must; the
//! daemon-kill test aims at narrow windows on a slow guest); [`Outage`] stops libvirtd (SIGTERM or SIGKILL, waits until the process is gone) and
//! starts it again with tests/lab/start-libvirt.sh (also when the test panics).
//!
//! How each stage is hit, with what is observable from outside the daemon:
//! - *before the freeze*: the daemon runs one operation at a time
//!   (`max_running_operations = 1`); an import whose qemu-nbd is held with SIGSTOP keeps the
//!   run slot, so the capture waits QUEUED; libvirtd is stopped, then the import let go: the
//!   capture starts its work (freeze, backup job, or the cold read's state check) with libvirtd
//!   down.
//! - *during the freeze*: the guest agent runs a freeze hook (`fsfreeze-hook` in
//!   `/etc/qemu/qemu-ga.conf`) that sleeps 8 s before freezing; libvirtd is stopped 2 s into
//!   that, so the guest's filesystems freeze while libvirtd is down (the hook's log in the
//!   guest shows the freeze and the thaw that undid it).
//! - *after the freeze*: libvirtd is stopped as soon as the operation is SAVING (the backup job
//!   began, the guest was thawed, the disk is read from QEMU's NBD export).
//! - shutdown: libvirtd is stopped once the daemon logged "shutdown requested", so the guest
//!   powers off while libvirtd is down.
//!
//! The daemon itself is killed (SIGKILL) and started again at each stage of a quiesce capture
//! with prep in [`a_daemon_killed_at_each_stage_of_a_capture_loses_nothing`]: QUEUED behind a
//! held import as above; while prep is being applied (a watcher in the guest stops the agent
//! once prep rewrote a file and prints a mark on the serial console); while the freeze hook
//! holds the agent in the freeze (the journal records the freeze first); mid-read (SAVING);
//! as the progress reaches the total (committing); and just after the commit. Just before the
//! SIGKILL the daemon is stopped (SIGSTOP) and its journal entry, the repository's manifest and
//! the domain's job are read, so each stage reports what it hit.
//!
//! After each stage of libvirtd or the guest going away: the operation ends ACTIVE, or FAILED
//! naming the domain or libvirt (and then lists no image); the daemon still runs; within 90 s
//! no backup job is left on the domain (`virsh domjobinfo`), the guest runs as before (same
//! boot id, or booted again where a shutdown capture with `restart` was asked),
//! `guest-fsfreeze-status` says thawed, and `run_dir` holds nothing named after the operation;
//! then a capture of the same guest ends ACTIVE (what the daemon-kill stages check is in that
//! test's own doc). Findings are collected per stage and reported together at the end of a
//! test (the lab is put back in order between stages, so one failure does not hide the next).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use crate::support::api::proto;
use crate::support::api::Ops;
use proto::OperationState as St;

use crate::support::daemon::{get_op, state, Daemon, DaemonOptions};
use crate::support::lab::{agent_command, virsh, Guest, Lab};
use crate::support::libvirtd::{self, Outage, Stop, TestLock};

/// Time allowed for a TCG guest to boot to `systemctl is-system-running`.
const BOOT: Duration = Duration::from_secs(240);
/// How long libvirtd stays down once the daemon has met the outage.
const DOWN: Duration = Duration::from_secs(8);
/// How long the daemon gets, after a stage, to end jobs, thaw and clean up.
const SETTLE: Duration = Duration::from_secs(90);

/// The freeze hook in lab guests, and the files that steer it.
const HOOK: &str = "/etc/qemu/imaged-test-freeze-hook";
const HOOK_LOG: &str = "/run/imaged-freeze-hook.log";
const SLOW_FREEZE: &str = "/run/imaged-slow-freeze";
const FAIL_FREEZE: &str = "/run/imaged-fail-freeze";
const HOOK_SCRIPT: &str = "#!/bin/sh\n\
# imaged tests: logs each call; on freeze, fails while /run/imaged-fail-freeze exists and\n\
# first sleeps the seconds /run/imaged-slow-freeze holds.\n\
echo \"$1 $(date +%s.%N)\" >> /run/imaged-freeze-hook.log\n\
if [ \"$1\" = freeze ]; then\n\
  [ -e /run/imaged-fail-freeze ] && exit 1\n\
  [ -s /run/imaged-slow-freeze ] && sleep \"$(cat /run/imaged-slow-freeze)\"\n\
fi\n\
exit 0\n";

// ------------------------------------------------------------------------------ findings

/// The expectations of one test that were not met, reported together by [`Findings::finish`].
struct Findings {
    test: &'static str,
    failed: Vec<String>,
}

impl Findings {
    fn new(test: &'static str) -> Findings {
        Findings {
            test,
            failed: Vec::new(),
        }
    }

    fn check(&mut self, stage: &str, ok: bool, msg: impl FnOnce() -> String) {
        if !ok {
            let m = format!("[{stage}] {}", msg());
            eprintln!("{}: NOT MET {m}", self.test);
            self.failed.push(m);
        }
    }

    fn finish(self) {
        assert!(
            self.failed.is_empty(),
            "{}: {} expectation(s) not met:\n- {}",
            self.test,
            self.failed.len(),
            self.failed.join("\n- ")
        );
    }
}

// ------------------------------------------------------------------------------ helpers

fn boot(g: &Guest) {
    g.start();
    g.wait_booted(BOOT);
}

fn req(domain: &str, image: &str, mode: proto::CaptureMode) -> proto::CaptureRequest {
    proto::CaptureRequest {
        domain: domain.into(),
        image_name: image.into(),
        mode: mode as i32,
        ..Default::default()
    }
}

/// A daemon that runs one operation at a time (for the QUEUED stage). Its imports read
/// through qemu-nbd (`native_reader = false`), so that [`SlotHolder`] can hold one mid-read by
/// stopping that process; its live captures read the whole disk (`incremental = false`), so
/// that a recapture has a read to be killed in the middle of.
fn one_slot_daemon() -> Daemon {
    Daemon::start_with(DaemonOptions {
        daemon_toml: "max_running_operations = 1".into(),
        capture_toml: "native_reader = false\nincremental = false".into(),
        ..Default::default()
    })
}

fn terminal(s: St) -> bool {
    matches!(s, St::Active | St::Failed | St::Cancelled)
}

/// Polls an operation until it is in `want`; panics (the stage cannot be set up) when it ends
/// or does not get there within `limit`.
async fn wait_for(ops: &mut Ops, id: &str, want: St, limit: Duration) -> proto::Operation {
    let t0 = Instant::now();
    loop {
        let o = get_op(ops, id).await;
        let s = state(&o);
        if s == want {
            return o;
        }
        assert!(
            !terminal(s) && t0.elapsed() < limit,
            "expected operation {id} to reach {want:?} (the stage this test aims at); it is \
             {s:?} after {:?}: {o:?}",
            t0.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Polls an operation until it has left QUEUED.
async fn wait_dequeued(ops: &mut Ops, id: &str) -> St {
    let t0 = Instant::now();
    loop {
        let s = state(&get_op(ops, id).await);
        if s != St::Queued {
            return s;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "expected operation {id} to leave QUEUED within 60 s of the run slot being freed; \
             it did not"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Polls `probe` until it says Ok or `deadline` passes; the last error otherwise.
async fn until<F: FnMut() -> Result<(), String>>(
    deadline: Instant,
    mut probe: F,
) -> Result<(), String> {
    loop {
        let r = probe();
        if r.is_ok() || Instant::now() >= deadline {
            return r;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// `guest-fsfreeze-status` of a guest: `Ok(())` when thawed.
fn thawed(g: &Guest) -> Result<(), String> {
    let s = g.try_agent(r#"{"execute":"guest-fsfreeze-status"}"#, 5)?;
    if s.contains("thawed") {
        Ok(())
    } else {
        Err(format!("guest-fsfreeze-status says {s}"))
    }
}

/// No job on the domain (`virsh domjobinfo` says None, or the domain does not run).
fn no_job(g: &Guest) -> Result<(), String> {
    match virsh(&["domjobinfo", g.name()]) {
        Ok(out) if out.contains("None") => Ok(()),
        Ok(out) => Err(format!("virsh domjobinfo shows a job: {}", out.trim())),
        Err(e) => match virsh(&["domstate", g.name()]) {
            Ok(s) if s.trim() == "shut off" => Ok(()),
            _ => Err(e),
        },
    }
}

/// The guest's kernel boot id (changes when it boots again).
fn boot_id(g: &Guest) -> String {
    g.sh_ok("cat /proc/sys/kernel/random/boot_id")
        .trim()
        .to_string()
}

/// Entries under `run_dir` (recursively) whose name contains `op_id`.
fn leftovers(run_dir: &Path, op_id: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut dirs = vec![run_dir.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let p = e.path();
            if e.file_name().to_string_lossy().contains(op_id) {
                out.push(p.clone());
            }
            if p.is_dir() && !p.is_symlink() {
                dirs.push(p);
            }
        }
    }
    out
}

/// Journal entries the daemon keeps in its run directory.
fn journal_entries(d: &Daemon) -> Vec<String> {
    std::fs::read_dir(d.run_dir().join("journal"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect()
}

fn daemon_alive(d: &Daemon) -> bool {
    d.child
        .as_ref()
        .map(|c| libvirtd::alive(c.id()))
        .unwrap_or(false)
}

/// Whether `imagectl image NAME` finds the image (exit 0) or not (exit 3).
fn image_listed(d: &Daemon, name: &str) -> Option<bool> {
    match d.imagectl(&["image", name]).status.code() {
        Some(0) => Some(true),
        Some(3) => Some(false),
        _ => None,
    }
}

/// The operation ended ACTIVE (its image listed), or FAILED with a reason naming the domain
/// or libvirt (and no image listed).
fn ended_clearly(f: &mut Findings, stage: &str, d: &Daemon, g: &Guest, op: &proto::Operation) {
    match state(op) {
        St::Active => f.check(stage, image_listed(d, &op.image_name) == Some(true), || {
            format!(
                "expected image {} of the ACTIVE capture to be listed; imagectl image says {:?}",
                op.image_name,
                image_listed(d, &op.image_name)
            )
        }),
        St::Failed => {
            let msg = op.error.as_ref().map(|e| e.message.clone()).unwrap_or_default();
            eprintln!("{stage}: the capture FAILED: {msg}");
            f.check(
                stage,
                msg.contains(g.name()) || msg.to_lowercase().contains("libvirt"),
                || format!("expected the FAILED capture's reason to name domain {} or libvirt; it says {msg:?}", g.name()),
            );
            f.check(stage, image_listed(d, &op.image_name) == Some(false), || {
                format!(
                    "expected no image {} after a FAILED capture; imagectl image says {:?}",
                    op.image_name,
                    image_listed(d, &op.image_name)
                )
            });
        }
        other => f.check(stage, false, || {
            format!(
                "expected the capture to end ACTIVE (or FAILED with a clear reason); it ended {other:?}: {op:?}\n{}",
                d.log_text()
            )
        }),
    }
}

/// What must hold once a stage is over: the daemon runs, no backup job on the domain, the
/// guest in `running` (same boot when `same_boot`, agent answering, thawed) or `shut off`,
/// nothing named after the operation in `run_dir`. Polled up to [`SETTLE`].
async fn nothing_left(
    f: &mut Findings,
    stage: &str,
    d: &Daemon,
    g: &Guest,
    op_id: &str,
    running: bool,
    same_boot: Option<&str>,
) {
    let deadline = Instant::now() + SETTLE;
    f.check(stage, daemon_alive(d), || {
        format!(
            "expected the daemon to keep running; it exited:\n{}",
            d.log_text()
        )
    });
    let want = if running { "running" } else { "shut off" };
    let r = until(deadline, || {
        let s = g.state();
        (s == want).then_some(()).ok_or(format!("it is {s:?}"))
    })
    .await;
    f.check(stage, r.is_ok(), || {
        format!(
            "expected guest {} to be {want} as before; {}",
            g.name(),
            r.clone().unwrap_err()
        )
    });
    let r = until(deadline, || no_job(g)).await;
    f.check(stage, r.is_ok(), || {
        format!(
            "expected no backup job left on {} within {SETTLE:?}; {}",
            g.name(),
            r.clone().unwrap_err()
        )
    });
    if running && g.state() == "running" {
        let r = until(deadline + Duration::from_secs(120), || {
            g.try_agent(r#"{"execute":"guest-ping"}"#, 5).map(|_| ())
        })
        .await;
        f.check(stage, r.is_ok(), || {
            format!(
                "expected the guest agent to answer; {}",
                r.clone().unwrap_err()
            )
        });
        let r = until(deadline, || thawed(g)).await;
        f.check(stage, r.is_ok(), || {
            format!(
                "expected the guest thawed within {SETTLE:?}; {}",
                r.clone().unwrap_err()
            )
        });
        if let (Some(before), Ok(())) = (same_boot, &r) {
            let now = boot_id(g);
            f.check(stage, now == before, || {
                format!("expected the guest to keep running (boot id {before}); it booted again (boot id {now})")
            });
        }
    }
    let r = until(deadline, || {
        let l = leftovers(&d.run_dir(), op_id);
        l.is_empty().then_some(()).ok_or(format!("{l:?}"))
    })
    .await;
    f.check(stage, r.is_ok(), || {
        format!(
            "expected run_dir to hold nothing of operation {op_id} within {SETTLE:?}; it holds {}",
            r.clone().unwrap_err()
        )
    });
}

/// Puts the lab back in order after a stage whose findings are recorded: the guest running
/// (when `running`), its agent answering, thawed, no job on it.
fn repair(g: &Guest, running: bool) {
    if running && g.state() != "running" {
        eprintln!("repair: starting {} again", g.name());
        let _ = virsh(&["start", g.name()]);
    }
    if running {
        g.wait_agent(BOOT);
        if thawed(g).is_err() {
            eprintln!("repair: thawing {}", g.name());
            let _ = g.try_agent(r#"{"execute":"guest-fsfreeze-thaw"}"#, 30);
        }
    }
    if no_job(g).is_err() {
        eprintln!("repair: aborting the job left on {}", g.name());
        let _ = virsh(&["domjobabort", g.name()]);
        let t0 = Instant::now();
        while no_job(g).is_err() && t0.elapsed() < Duration::from_secs(30) {
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}

/// A capture of the same guest right after a stage must end ACTIVE: crash-consistent when it
/// runs, cold when it is shut off.
async fn capture_after(f: &mut Findings, stage: &str, d: &Daemon, g: &Guest, image: &str) {
    let mode = if g.state() == "running" {
        proto::CaptureMode::CrashConsistent
    } else {
        proto::CaptureMode::Cold
    };
    let mut images = d.images().await;
    match images.capture(req(g.name(), image, mode)).await {
        Ok(op) => {
            let end = d.wait_op(&op.into_inner().id).await;
            f.check(stage, state(&end) == St::Active, || {
                format!(
                    "expected the {mode:?} capture right after to end ACTIVE; it ended {:?}: {:?}",
                    state(&end),
                    end.error
                )
            });
            if state(&end) == St::Active {
                let r = until(Instant::now() + SETTLE, || no_job(g)).await;
                f.check(stage, r.is_ok(), || {
                    format!(
                        "expected the capture right after to end its backup job; {}",
                        r.clone().unwrap_err()
                    )
                });
            }
        }
        Err(e) => f.check(stage, false, || {
            format!(
                "expected the {mode:?} capture right after to be accepted; it was refused: {e:?}"
            )
        }),
    }
}

/// Installs [`HOOK_SCRIPT`] as the guest agent's freeze hook, restarts the agent, and proves
/// the hook runs (a freeze and a thaw log a line each).
fn install_freeze_hook(g: &Guest) {
    g.sh_ok("mkdir -p /etc/qemu");
    g.write_file(HOOK, HOOK_SCRIPT.as_bytes());
    g.write_file(
        "/etc/qemu/qemu-ga.conf",
        format!("[general]\nfsfreeze-hook={HOOK}\n").as_bytes(),
    );
    g.sh_ok(&format!("chmod 755 {HOOK} && sync"));
    // The agent reads its config when it starts. The restart ends the agent that runs it, so
    // it is started a second later and its status never asked for.
    g.agent(&agent_command(
        "guest-exec",
        serde_json::json!({
            "path": "sh",
            "arg": ["-c", "sleep 1; systemctl --no-block restart qemu-guest-agent"],
        }),
    ));
    std::thread::sleep(Duration::from_secs(4));
    g.wait_agent(Duration::from_secs(60));
    g.agent(r#"{"execute":"guest-fsfreeze-freeze"}"#);
    g.agent(r#"{"execute":"guest-fsfreeze-thaw"}"#);
    let log = g.sh_ok(&format!("cat {HOOK_LOG}"));
    assert!(
        log.contains("freeze") && log.contains("thaw"),
        "expected the guest agent to run the freeze hook {HOOK} (configured in \
         /etc/qemu/qemu-ga.conf) on freeze and thaw; its log says {log:?}"
    );
}

/// The hook's log, read through the agent.
fn hook_log(g: &Guest) -> String {
    g.sh(&format!("cat {HOOK_LOG}")).1
}

/// True when the hook log's last `freeze` line is followed by a `thaw` line.
fn thawed_after_last_freeze(log: &str) -> bool {
    let lines: Vec<&str> = log.lines().collect();
    match lines.iter().rposition(|l| l.starts_with("freeze")) {
        Some(i) => lines[i..].iter().any(|l| l.starts_with("thaw")),
        None => false,
    }
}

/// `qemu-nbd` processes whose parent is `pid`.
fn qemu_nbd_children(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(child) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{child}/stat")) else {
            continue;
        };
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let comm = &stat[open + 1..close];
        let ppid: Option<u32> = stat[close + 1..]
            .split_whitespace()
            .nth(1)
            .and_then(|p| p.parse().ok());
        if comm == "qemu-nbd" && ppid == Some(pid) && libvirtd::alive(child) {
            out.push(child);
        }
    }
    out
}

fn signal(pid: u32, sig: i32) {
    // SAFETY: kill(2) on a child process of the daemon under test; no memory is involved.
    unsafe { libc::kill(pid as i32, sig) };
}

/// A file of `mib` MiB of non-zero bytes (a different pattern per MiB).
fn patterned_file(path: &Path, mib: usize) {
    use std::io::Write;
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    for i in 0..mib {
        f.write_all(&vec![(i % 251) as u8 + 1; 1 << 20]).unwrap();
    }
    f.flush().unwrap();
}

/// A file of `mib` MiB of pseudo-random bytes (xorshift, seeded).
fn random_file(path: &Path, mib: usize, seed: u64) {
    use std::io::Write;
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    let mut x = seed | 1;
    let mut buf = vec![0u8; 1 << 20];
    for _ in 0..mib {
        for c in buf.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            c.copy_from_slice(&x.to_le_bytes());
        }
        f.write_all(&buf).unwrap();
    }
    f.flush().unwrap();
}

/// An import that holds the daemon's only run slot: once it reads, its qemu-nbd is stopped
/// (SIGSTOP), so the next operation waits QUEUED until [`SlotHolder::release`].
struct SlotHolder {
    nbd: u32,
    op: String,
}

impl SlotHolder {
    async fn hold(d: &Daemon, name: &str) -> SlotHolder {
        let file = d.dir.path().join("slot-holder.raw");
        if !file.exists() {
            patterned_file(&file, 1024);
        }
        let mut images = d.images().await;
        let mut ops = d.ops().await;
        let op = images
            .import(proto::ImportRequest {
                path: file.to_str().unwrap().into(),
                format: "raw".into(),
                image_name: name.into(),
                request_id: String::new(),
            })
            .await
            .expect("expected the slot-holding import to be accepted")
            .into_inner();
        wait_for(&mut ops, &op.id, St::Saving, Duration::from_secs(60)).await;
        let nbd = *qemu_nbd_children(d.pid()).first().unwrap_or_else(|| {
            panic!("expected the import to read through a qemu-nbd child of the daemon; none found")
        });
        signal(nbd, libc::SIGSTOP);
        tokio::time::sleep(Duration::from_millis(300)).await;
        let o = get_op(&mut ops, &op.id).await;
        assert!(
            !terminal(state(&o)),
            "expected the import to be held mid-read (qemu-nbd {nbd} stopped); it ended first: {o:?}"
        );
        SlotHolder { nbd, op: op.id }
    }

    /// Lets the import go on (SIGCONT); it ends ACTIVE and frees the slot.
    async fn release(mut self, d: &Daemon) {
        signal(self.nbd, libc::SIGCONT);
        self.nbd = 0;
        let end = d.wait_op(&self.op).await;
        assert_eq!(
            state(&end),
            St::Active,
            "expected the slot-holding import to end ACTIVE once let go: {end:?}"
        );
    }
}

impl Drop for SlotHolder {
    fn drop(&mut self) {
        if self.nbd != 0 {
            signal(self.nbd, libc::SIGCONT);
        }
    }
}

/// Stops libvirtd (`how`) while a capture is queued behind a held slot, lets the capture start
/// with libvirtd down, and starts libvirtd again [`DOWN`] later. Returns the capture's end.
async fn outage_before_start(
    lock: &libvirtd::Exclusive,
    d: &Daemon,
    g: &Guest,
    image: &str,
    mode: proto::CaptureMode,
    how: Stop,
) -> proto::Operation {
    let mut images = d.images().await;
    let mut ops = d.ops().await;
    let holder = SlotHolder::hold(d, &format!("{image}-holder")).await;
    let op = images
        .capture(req(g.name(), image, mode))
        .await
        .unwrap_or_else(|e| panic!("expected the {mode:?} capture to be accepted: {e:?}"))
        .into_inner();
    let s = state(&get_op(&mut ops, &op.id).await);
    assert_eq!(
        s,
        St::Queued,
        "expected the capture to wait QUEUED behind the held import; it is {s:?}"
    );
    let outage = Outage::begin(lock, how);
    let s = state(&get_op(&mut ops, &op.id).await);
    assert_eq!(
        s,
        St::Queued,
        "expected the capture still QUEUED once libvirtd was down; it is {s:?}"
    );
    holder.release(d).await;
    let s = wait_dequeued(&mut ops, &op.id).await;
    eprintln!("{image}: capture left QUEUED ({s:?}) with libvirtd down");
    tokio::time::sleep(DOWN).await;
    outage.end();
    d.wait_op(&op.id).await
}

/// Stops libvirtd (`how`) as soon as a capture is SAVING, starts it [`DOWN`] later.
async fn outage_while_saving(
    lock: &libvirtd::Exclusive,
    d: &Daemon,
    g: &Guest,
    image: &str,
    mode: proto::CaptureMode,
    how: Stop,
) -> proto::Operation {
    let mut images = d.images().await;
    let mut ops = d.ops().await;
    let op = images
        .capture(req(g.name(), image, mode))
        .await
        .unwrap_or_else(|e| panic!("expected the {mode:?} capture to be accepted: {e:?}"))
        .into_inner();
    wait_for(&mut ops, &op.id, St::Saving, Duration::from_secs(120)).await;
    let outage = Outage::begin(lock, how);
    let s = state(&get_op(&mut ops, &op.id).await);
    eprintln!("{image}: libvirtd down, the capture is {s:?}");
    tokio::time::sleep(DOWN).await;
    outage.end();
    d.wait_op(&op.id).await
}

/// Stops libvirtd (`how`) 2 s into an 8 s freeze hook of a quiesce capture, so the guest's
/// filesystems freeze while libvirtd is down; starts it [`DOWN`] later. Returns the end.
async fn outage_during_freeze(
    lock: &libvirtd::Exclusive,
    d: &Daemon,
    g: &Guest,
    image: &str,
    how: Stop,
) -> proto::Operation {
    g.sh_ok(&format!("echo 8 > {SLOW_FREEZE}"));
    let mut images = d.images().await;
    let mut ops = d.ops().await;
    let op = images
        .capture(req(g.name(), image, proto::CaptureMode::Quiesce))
        .await
        .unwrap_or_else(|e| panic!("expected the quiesce capture to be accepted: {e:?}"))
        .into_inner();
    wait_for(&mut ops, &op.id, St::Preparing, Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let s = state(&get_op(&mut ops, &op.id).await);
    assert_eq!(
        s,
        St::Preparing,
        "expected the capture still PREPARING (its freeze hook sleeps 8 s) when libvirtd goes down; it is {s:?}"
    );
    let outage = Outage::begin(lock, how);
    tokio::time::sleep(DOWN).await;
    outage.end();
    d.wait_op(&op.id).await
}

/// The freeze-hook evidence of a "during the freeze" stage, once the agent answers again.
fn check_freeze_undone(f: &mut Findings, stage: &str, g: &Guest) {
    if g.state() != "running" || g.try_agent(r#"{"execute":"guest-ping"}"#, 10).is_err() {
        return; // nothing_left has recorded why
    }
    let log = hook_log(g);
    eprintln!("{stage}: freeze hook log:\n{log}");
    f.check(stage, thawed_after_last_freeze(&log), || {
        format!("expected the guest's freeze hook log to show the last freeze undone by a thaw; it says {log:?}")
    });
    let _ = g.sh(&format!("rm -f {SLOW_FREEZE}"));
}

// ------------------------------------------------------------------------------ tests

/// libvirtd stopped and started again before, during and after the freeze of quiesce
/// captures.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn libvirtd_restarted_before_during_and_after_a_quiesce_freeze() {
    let lock = libvirtd::exclusive();
    let lab = Lab::get();
    let g = lab.guest("rs-quiesce").create();
    boot(&g);
    install_freeze_hook(&g);
    let d = one_slot_daemon();
    let mut f = Findings::new("quiesce");

    let stage = "quiesce: libvirtd stopped before the freeze (capture QUEUED)";
    let id = boot_id(&g);
    let end = outage_before_start(
        &lock,
        &d,
        &g,
        "q-before",
        proto::CaptureMode::Quiesce,
        Stop::Term,
    )
    .await;
    ended_clearly(&mut f, stage, &d, &g, &end);
    nothing_left(&mut f, stage, &d, &g, &end.id, true, Some(&id)).await;
    repair(&g, true);
    capture_after(&mut f, stage, &d, &g, "q-before-next").await;

    let stage = "quiesce: libvirtd stopped during the freeze (agent freezing)";
    let id = boot_id(&g);
    let end = outage_during_freeze(&lock, &d, &g, "q-during", Stop::Term).await;
    ended_clearly(&mut f, stage, &d, &g, &end);
    nothing_left(&mut f, stage, &d, &g, &end.id, true, Some(&id)).await;
    check_freeze_undone(&mut f, stage, &g);
    repair(&g, true);
    let _ = g.sh(&format!("rm -f {SLOW_FREEZE}"));
    capture_after(&mut f, stage, &d, &g, "q-during-next").await;

    let stage = "quiesce: libvirtd stopped after the freeze (SAVING)";
    let id = boot_id(&g);
    let end = outage_while_saving(
        &lock,
        &d,
        &g,
        "q-after",
        proto::CaptureMode::Quiesce,
        Stop::Term,
    )
    .await;
    ended_clearly(&mut f, stage, &d, &g, &end);
    if state(&end) == St::Active {
        f.check(stage, end.consistency == "quiesced", || {
            format!("expected consistency quiesced; saw {:?}", end.consistency)
        });
    }
    nothing_left(&mut f, stage, &d, &g, &end.id, true, Some(&id)).await;
    repair(&g, true);
    capture_after(&mut f, stage, &d, &g, "q-after-next").await;
    f.finish();
}

/// libvirtd stopped and started again during a crash-consistent capture (SAVING), a shutdown
/// capture (while the guest powers off) and a cold capture (its state check).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn libvirtd_restarted_during_crash_consistent_shutdown_and_cold_captures() {
    let lock = libvirtd::exclusive();
    let lab = Lab::get();
    let g = lab.guest("rs-modes").create();
    boot(&g);
    let d = one_slot_daemon();
    let mut f = Findings::new("modes");

    let stage = "crash-consistent: libvirtd stopped while SAVING";
    let id = boot_id(&g);
    let end = outage_while_saving(
        &lock,
        &d,
        &g,
        "c-saving",
        proto::CaptureMode::CrashConsistent,
        Stop::Term,
    )
    .await;
    ended_clearly(&mut f, stage, &d, &g, &end);
    nothing_left(&mut f, stage, &d, &g, &end.id, true, Some(&id)).await;
    repair(&g, true);
    capture_after(&mut f, stage, &d, &g, "c-saving-next").await;

    let stage = "shutdown (restart): libvirtd stopped while the guest powers off";
    let mut images = d.images().await;
    let mut r = req(g.name(), "s-off", proto::CaptureMode::Shutdown);
    r.restart = true;
    let op = images
        .capture(r)
        .await
        .expect("expected the shutdown capture to be accepted")
        .into_inner();
    let t0 = Instant::now();
    while !d.log_text().contains("shutdown requested") {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "expected the daemon to log \"shutdown requested\" within 60 s; its log:\n{}",
            d.log_text()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let outage = Outage::begin(&lock, Stop::Term);
    // Long enough for the guest to power off with libvirtd down.
    tokio::time::sleep(Duration::from_secs(20)).await;
    outage.end();
    let end = d.wait_op(&op.id).await;
    ended_clearly(&mut f, stage, &d, &g, &end);
    nothing_left(&mut f, stage, &d, &g, &end.id, true, None).await;
    repair(&g, true);
    capture_after(&mut f, stage, &d, &g, "s-off-next").await;

    let stage = "cold: libvirtd stopped before the cold read (capture QUEUED)";
    g.wait_booted(BOOT);
    g.shutdown(Duration::from_secs(180));
    let end = outage_before_start(
        &lock,
        &d,
        &g,
        "cold-before",
        proto::CaptureMode::Cold,
        Stop::Term,
    )
    .await;
    ended_clearly(&mut f, stage, &d, &g, &end);
    nothing_left(&mut f, stage, &d, &g, &end.id, false, None).await;
    repair(&g, false);
    capture_after(&mut f, stage, &d, &g, "cold-before-next").await;
    f.finish();
}

/// libvirtd killed (SIGKILL) while a quiesce capture is SAVING, and during a freeze.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn libvirtd_killed_mid_capture() {
    let lock = libvirtd::exclusive();
    let lab = Lab::get();
    let g = lab.guest("rs-kill").create();
    boot(&g);
    install_freeze_hook(&g);
    let d = one_slot_daemon();
    let mut f = Findings::new("killed");

    let stage = "SIGKILL while a quiesce capture is SAVING";
    let id = boot_id(&g);
    let end = outage_while_saving(
        &lock,
        &d,
        &g,
        "k-saving",
        proto::CaptureMode::Quiesce,
        Stop::Kill,
    )
    .await;
    ended_clearly(&mut f, stage, &d, &g, &end);
    nothing_left(&mut f, stage, &d, &g, &end.id, true, Some(&id)).await;
    repair(&g, true);
    capture_after(&mut f, stage, &d, &g, "k-saving-next").await;

    let stage = "SIGKILL during the freeze";
    let id = boot_id(&g);
    let end = outage_during_freeze(&lock, &d, &g, "k-during", Stop::Kill).await;
    ended_clearly(&mut f, stage, &d, &g, &end);
    nothing_left(&mut f, stage, &d, &g, &end.id, true, Some(&id)).await;
    check_freeze_undone(&mut f, stage, &g);
    repair(&g, true);
    let _ = g.sh(&format!("rm -f {SLOW_FREEZE}"));
    capture_after(&mut f, stage, &d, &g, "k-during-next").await;
    f.finish();
}

/// The health status of one service.
async fn health(d: &Daemon, service: &str) -> Result<i32, String> {
    let mut h = tonic_health::pb::health_client::HealthClient::new(d.channel().await);
    h.check(tonic_health::pb::HealthCheckRequest {
        service: service.into(),
    })
    .await
    .map(|r| r.into_inner().status)
    .map_err(|e| e.to_string())
}

/// Polls the health of `service` until it is `want` (up to 30 s); the last answer otherwise.
async fn health_becomes(d: &Daemon, service: &str, want: i32) -> Result<(), String> {
    let t0 = Instant::now();
    loop {
        let now = health(d, service).await;
        if now == Ok(want) {
            return Ok(());
        }
        if t0.elapsed() > Duration::from_secs(30) {
            return Err(format!("{service} health is {now:?} after 30 s"));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

const SERVING: i32 = tonic_health::pb::health_check_response::ServingStatus::Serving as i32;
const NOT_SERVING: i32 = tonic_health::pb::health_check_response::ServingStatus::NotServing as i32;
const DOMAINS: &str = "imaged.v1.DomainService";

/// The daemon starts while libvirtd is down: it serves (imports work, DomainService is
/// NOT_SERVING), a capture asked meanwhile waits for libvirtd and runs; and a daemon killed
/// mid-capture and started again while libvirtd is down ends the leftover backup job once
/// libvirtd is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn libvirtd_down_when_the_daemon_starts() {
    let lock = libvirtd::exclusive();
    let lab = Lab::get();
    let g = lab.guest("rs-start").create();
    boot(&g);
    let mut f = Findings::new("down-at-start");
    let id = boot_id(&g);

    let stage = "daemon started with libvirtd down";
    let outage = Outage::begin(&lock, Stop::Term);
    let mut d = Daemon::start();
    let r = health_becomes(&d, DOMAINS, NOT_SERVING).await;
    f.check(stage, r.is_ok(), || {
        format!(
            "expected DomainService NOT_SERVING while libvirtd is down; {}",
            r.clone().unwrap_err()
        )
    });
    let r = health_becomes(&d, "imaged.v1.ImageService", SERVING).await;
    f.check(stage, r.is_ok(), || {
        format!(
            "expected ImageService SERVING while libvirtd is down; {}",
            r.clone().unwrap_err()
        )
    });
    let small = d.dir.path().join("small.raw");
    random_file(&small, 4, 7);
    let mut images = d.images().await;
    let op = images
        .import(proto::ImportRequest {
            path: small.to_str().unwrap().into(),
            format: "raw".into(),
            image_name: "imported-while-down".into(),
            request_id: String::new(),
        })
        .await;
    match op {
        Ok(op) => {
            let end = d.wait_op(&op.into_inner().id).await;
            f.check(stage, state(&end) == St::Active, || {
                format!("expected an import to work while libvirtd is down; it ended {end:?}")
            });
        }
        Err(e) => f.check(stage, false, || {
            format!("expected an import to be accepted while libvirtd is down; refused: {e:?}")
        }),
    }

    let stage = "capture asked while libvirtd is down (back 10 s later)";
    let back = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(10));
        outage.end()
    });
    let t0 = Instant::now();
    let asked = images
        .capture(req(
            g.name(),
            "asked-while-down",
            proto::CaptureMode::CrashConsistent,
        ))
        .await;
    let waited = t0.elapsed();
    back.join().expect("starting libvirtd again");
    match asked {
        Ok(op) => {
            let end = d.wait_op(&op.into_inner().id).await;
            eprintln!(
                "{stage}: the call returned after {waited:?}; the capture ended {:?}",
                state(&end)
            );
            f.check(stage, state(&end) == St::Active, || {
                format!(
                    "expected the capture to wait for libvirtd and end ACTIVE; it ended {:?}: {:?}",
                    state(&end),
                    end.error
                )
            });
            nothing_left(&mut f, stage, &d, &g, &end.id, true, Some(&id)).await;
        }
        Err(e) => f.check(stage, false, || {
            format!(
                "expected the capture call to wait for libvirtd (back after 10 s, within \
                 reconnect_timeout_secs 60) and be accepted; it was refused after {waited:?}: {e:?}"
            )
        }),
    }
    let r = health_becomes(&d, DOMAINS, SERVING).await;
    f.check(stage, r.is_ok(), || {
        format!(
            "expected DomainService SERVING again once libvirtd is back; {}",
            r.clone().unwrap_err()
        )
    });
    repair(&g, true);

    let stage = "daemon killed mid-capture, started again while libvirtd is down";
    let id = boot_id(&g);
    let mut ops = d.ops().await;
    let op = images
        .capture(req(g.name(), "killed", proto::CaptureMode::CrashConsistent))
        .await
        .expect("expected the capture to be accepted")
        .into_inner();
    wait_for(&mut ops, &op.id, St::Saving, Duration::from_secs(120)).await;
    d.kill();
    assert!(
        no_job(&g).is_err(),
        "expected the killed daemon's backup job still on {} (the stage this test aims at)",
        g.name()
    );
    let outage = Outage::begin(&lock, Stop::Term);
    let back = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(10));
        outage.end()
    });
    d.restart();
    back.join().expect("starting libvirtd again");
    nothing_left(&mut f, stage, &d, &g, &op.id, true, Some(&id)).await;
    let r = until(Instant::now() + SETTLE, || {
        let j = journal_entries(&d);
        j.is_empty().then_some(()).ok_or(format!("{j:?}"))
    })
    .await;
    f.check(stage, r.is_ok(), || {
        format!(
            "expected the journal emptied once libvirtd is back; it holds {}",
            r.clone().unwrap_err()
        )
    });
    f.check(stage, image_listed(&d, "killed") == Some(false), || {
        "expected no image from the killed capture".into()
    });
    repair(&g, true);
    capture_after(&mut f, stage, &d, &g, "killed-next").await;
    f.finish();
}

/// The daemon stays up, the operation ends and nothing is left when the guest is destroyed
/// before, during and after the freeze of a quiesce capture, and right after a failed one; a
/// (cold) capture right after each succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_destroyed_at_each_stage_of_a_live_capture() {
    let lab = Lab::get();
    let g = lab.guest("rs-destroy").create();
    boot(&g);
    install_freeze_hook(&g);
    let d = one_slot_daemon();
    let mut images = d.images().await;
    let mut ops = d.ops().await;
    let mut f = Findings::new("destroyed");

    // Each stage: the capture's end, checked the same way.
    async fn judge(f: &mut Findings, stage: &str, d: &Daemon, g: &Guest, end: &proto::Operation) {
        f.check(stage, terminal(state(end)), || {
            format!("expected the capture to end; it is {end:?}")
        });
        if state(end) == St::Failed {
            let msg = end
                .error
                .as_ref()
                .map(|e| e.message.clone())
                .unwrap_or_default();
            eprintln!("{stage}: the capture FAILED: {msg}");
            f.check(stage, !msg.is_empty(), || {
                "expected a reason for the failure".into()
            });
            f.check(
                stage,
                image_listed(d, &end.image_name) == Some(false),
                || format!("expected no image {} after the failure", end.image_name),
            );
        }
        // (run_dir's journal/<op>.json included)
        nothing_left(f, stage, d, g, &end.id, false, None).await;
        capture_after(f, stage, d, g, &format!("{}-next", end.image_name)).await;
    }

    let stage = "destroyed before the freeze (capture QUEUED)";
    let holder = SlotHolder::hold(&d, "d-holder").await;
    let op = images
        .capture(req(g.name(), "d-before", proto::CaptureMode::Quiesce))
        .await
        .expect("expected the quiesce capture to be accepted")
        .into_inner();
    assert_eq!(
        state(&get_op(&mut ops, &op.id).await),
        St::Queued,
        "expected QUEUED"
    );
    g.destroy();
    holder.release(&d).await;
    let end = d.wait_op(&op.id).await;
    judge(&mut f, stage, &d, &g, &end).await;
    boot(&g);

    let stage = "destroyed during the freeze (agent freezing)";
    g.sh_ok(&format!("echo 8 > {SLOW_FREEZE}"));
    let op = images
        .capture(req(g.name(), "d-during", proto::CaptureMode::Quiesce))
        .await
        .expect("expected the quiesce capture to be accepted")
        .into_inner();
    wait_for(&mut ops, &op.id, St::Preparing, Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    g.destroy();
    let end = d.wait_op(&op.id).await;
    judge(&mut f, stage, &d, &g, &end).await;
    boot(&g);

    let stage = "destroyed after the freeze (SAVING)";
    let op = images
        .capture(req(g.name(), "d-after", proto::CaptureMode::Quiesce))
        .await
        .expect("expected the quiesce capture to be accepted")
        .into_inner();
    wait_for(&mut ops, &op.id, St::Saving, Duration::from_secs(120)).await;
    g.destroy();
    let end = d.wait_op(&op.id).await;
    f.check(stage, state(&end) == St::Failed, || {
        format!(
            "expected the capture to FAIL once its guest was destroyed mid-read; it ended {end:?}"
        )
    });
    judge(&mut f, stage, &d, &g, &end).await;
    boot(&g);

    let stage = "destroyed right after a failed capture";
    g.sh_ok(&format!("touch {FAIL_FREEZE}"));
    let op = images
        .capture(req(g.name(), "d-failed", proto::CaptureMode::Quiesce))
        .await
        .expect("expected the quiesce capture to be accepted")
        .into_inner();
    let end = d.wait_op(&op.id).await;
    g.destroy();
    assert_eq!(
        state(&end),
        St::Failed,
        "expected the capture to fail (the freeze hook refuses to freeze): {end:?}"
    );
    judge(&mut f, stage, &d, &g, &end).await;
    f.check(stage, daemon_alive(&d), || {
        "expected the daemon up at the end".into()
    });
    f.finish();
}

// ------------------------------------------------------------------------------ daemon killed

/// The files the prep steps of [`killed_req`] change in the source guest: `dhcp` rewrites the
/// static stanza of `interfaces`, `udev-net-rules` removes the persistent-net rules.
const PREP_FILES: [&str; 2] = [
    "/etc/network/interfaces",
    "/etc/udev/rules.d/70-persistent-net.rules",
];
const STATIC_INTERFACES: &str = "auto lo\niface lo inet loopback\n\nauto eth0\niface eth0 inet static\n    address 192.0.2.10\n    netmask 255.255.255.0\n    gateway 192.0.2.1\n";
const NET_RULES: &str =
    "SUBSYSTEM==\"net\", ACTION==\"add\", ATTR{address}==\"52:54:00:12:34:56\", NAME=\"eth0\"\n";
/// Where prep keeps its backups inside the guest.
const PREP_BACKUPS: &str = "/run/imaged-prep";
/// What the guest writes on its serial console once prep has rewritten `interfaces` and its
/// agent is stopped.
const PREP_MARK: &str = "IMAGED-TEST-PREP-WRITTEN";
/// The captured data disk: this many MiB of pseudo-random bytes (long enough to read that a
/// kill can be aimed at the middle of it).
const DATA_MIB: usize = 256;
/// How long the freeze hook sleeps before it lets the agent freeze, in the "frozen" stage.
const HOOK_SLEEP_SECS: u64 = 6;

/// The capture every stage kills: quiesce of the data disk with two cheap prep steps, undone in
/// the source right after the consistency point.
fn killed_req(g: &Guest, image: &str, request_id: &str) -> proto::CaptureRequest {
    proto::CaptureRequest {
        domain: g.name().into(),
        image_name: image.into(),
        request_id: request_id.into(),
        mode: proto::CaptureMode::Quiesce as i32,
        disk: "vdb".into(),
        prep: vec!["dhcp".into(), "udev-net-rules".into()],
        restore_source: true,
        ..Default::default()
    }
}

/// The source configuration the prep steps change (a static address, a persistent-net rule),
/// written afresh, with no prep backup left in the guest. Returns [`prep_files`].
fn plant_prep_targets(g: &Guest) -> String {
    g.write_file(PREP_FILES[0], STATIC_INTERFACES.as_bytes());
    g.write_file(PREP_FILES[1], NET_RULES.as_bytes());
    g.sh_ok(&format!("rm -rf {PREP_BACKUPS} && sync"));
    prep_files(g)
}

/// sha256 (or "absent") of each file prep touches, as `sha256sum` prints it.
fn prep_files(g: &Guest) -> String {
    let script = PREP_FILES
        .iter()
        .map(|p| format!("if [ -e {p} ]; then sha256sum {p}; else echo absent {p}; fi"))
        .collect::<Vec<_>>()
        .join("; ");
    g.sh_ok(&script)
}

/// What prep left under [`PREP_BACKUPS`] in the guest (empty: nothing).
fn prep_backups(g: &Guest) -> String {
    g.sh(&format!("find {PREP_BACKUPS} -mindepth 1 2>/dev/null"))
        .1
        .trim()
        .to_string()
}

/// Waits (up to 5 s) until every thread of `pid` is stopped: a thread inside a system call
/// (an fsync, a rename) finishes it first, so what the process wrote is then final.
fn wait_stopped(pid: u32) {
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(5) {
        let all = std::fs::read_dir(format!("/proc/{pid}/task"))
            .into_iter()
            .flatten()
            .flatten()
            .all(|t| {
                std::fs::read_to_string(t.path().join("stat"))
                    .ok()
                    .and_then(|s| {
                        s.rsplit_once(')')
                            .map(|(_, r)| r.trim_start().starts_with(['T', 't']))
                    })
                    .unwrap_or(true)
            });
        if all {
            return;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// What the daemon had done when it was killed, read while it was stopped.
#[derive(Debug)]
struct AtKill {
    pid: u32,
    /// Its journal entry of the operation (None: it had none).
    entry: Option<serde_json::Value>,
    /// The image's manifest was in the repository (the image was committed).
    committed: bool,
    /// A backup job ran on the domain.
    job: bool,
}

impl AtKill {
    fn journaled(&self, key: &str) -> bool {
        self.entry.as_ref().is_some_and(|e| match &e[key] {
            serde_json::Value::Bool(b) => *b,
            serde_json::Value::Null => false,
            serde_json::Value::String(s) => !s.is_empty(),
            _ => true,
        })
    }

    fn describe(&self) -> String {
        match &self.entry {
            None => format!(
                "no journal entry, image committed: {}, backup job on the domain: {}",
                self.committed, self.job
            ),
            Some(_) => format!(
                "journal entry frozen={} backup_dir={} prep={}, image committed: {}, backup job \
                 on the domain: {}",
                self.journaled("frozen"),
                self.journaled("backup_dir"),
                self.journaled("prep"),
                self.committed,
                self.job
            ),
        }
    }
}

/// Stops the daemon (SIGSTOP) so that its journal entry of `op_id`, the repository and the
/// domain's job are read as they are at the kill, then kills it (SIGKILL) and reaps it.
fn stop_and_kill(d: &mut Daemon, g: &Guest, op_id: &str, image: &str) -> AtKill {
    let pid = d.pid();
    signal(pid, libc::SIGSTOP);
    wait_stopped(pid);
    let entry = std::fs::read(d.run_dir().join("journal").join(format!("{op_id}.json")))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok());
    let committed = d.repo.join("images").join(format!("{image}.json")).exists();
    let job = no_job(g).is_err();
    d.kill();
    AtKill {
        pid,
        entry,
        committed,
        job,
    }
}

/// One stage: the capture killed, and what it was when it was.
struct Killed<'a> {
    stage: &'a str,
    /// The request, retried as it was.
    req: proto::CaptureRequest,
    op_id: String,
    /// The state it was in (the FAILED message must name it).
    was: &'static str,
    at: AtKill,
    /// The guest's boot id before the stage.
    boot: String,
    /// [`prep_files`] before the capture.
    prep_before: String,
    /// Other operations the kill cut off (their leftovers are looked for too).
    others: Vec<String>,
}

/// Whether the image `name`, exported raw with imagectl, is byte for byte `want`.
fn export_matches(d: &Daemon, name: &str, want: &Path) -> Result<(), String> {
    let out = d.dir.path().join(format!("{name}.export.raw"));
    let o = d.imagectl(&[
        "--json",
        "export",
        name,
        "--format",
        "raw",
        "-o",
        out.to_str().unwrap(),
    ]);
    if !o.status.success() {
        return Err(format!(
            "imagectl export {name} failed ({:?}): {}",
            o.status,
            String::from_utf8_lossy(&o.stderr)
        ));
    }
    let same = std::process::Command::new("cmp")
        .arg("-s")
        .arg(&out)
        .arg(want)
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    let _ = std::fs::remove_file(&out);
    same.then_some(())
        .ok_or_else(|| format!("image {name} exported raw differs from the disk it was read from"))
}

/// What must hold once the daemon killed at a stage runs again.
async fn judge_killed(f: &mut Findings, d: &Daemon, g: &Guest, k: &Killed<'_>, data: &Path) {
    let stage = k.stage;
    let mut ops = d.ops().await;
    let mut images = d.images().await;
    let op = match ops
        .get_operation(proto::GetOperationRequest {
            id: k.op_id.clone(),
        })
        .await
    {
        Ok(o) => o.into_inner(),
        Err(e) => {
            return f.check(stage, false, || {
                format!(
                    "expected GetOperation to find operation {} after the restart; {e:?}",
                    k.op_id
                )
            })
        }
    };
    let s = state(&op);
    eprintln!(
        "{stage}: after the restart the operation is {s:?}: {:?}",
        op.error
    );

    // A retry with the same request_id is that operation, not a new capture.
    let before = ops
        .list_operations(proto::ListOperationsRequest::default())
        .await
        .map(|r| r.into_inner().operations.len());
    match images.capture(k.req.clone()).await {
        Ok(r) => {
            let r = r.into_inner();
            f.check(stage, r.id == op.id && state(&r) == s, || {
                format!(
                    "expected the retry with request_id {} to return operation {} as it is \
                     ({s:?}); it returned {} ({:?})",
                    k.req.request_id,
                    op.id,
                    r.id,
                    state(&r)
                )
            });
        }
        Err(e) => f.check(stage, false, || {
            format!(
                "expected the retry with request_id {} to return operation {}; refused: {e:?}",
                k.req.request_id, op.id
            )
        }),
    }
    let after = ops
        .list_operations(proto::ListOperationsRequest::default())
        .await
        .map(|r| r.into_inner().operations.len());
    f.check(
        stage,
        matches!((&before, &after), (Ok(a), Ok(b)) if a == b),
        || {
            format!(
                "expected the retry to start nothing; operations listed before and after: \
                 {before:?} {after:?}"
            )
        },
    );

    // How it ended: FAILED naming the state it was in, or ACTIVE when its image was committed.
    match s {
        St::Failed => {
            let e = op.error.clone().unwrap_or_default();
            f.check(
                stage,
                e.reason == "DAEMON_RESTARTED" && e.code == "ABORTED",
                || {
                    format!(
                        "expected ABORTED with reason DAEMON_RESTARTED; it is {} {:?}",
                        e.code, e.reason
                    )
                },
            );
            let said = format!(
                "imaged (pid {}) stopped while this operation was {}",
                k.at.pid, k.was
            );
            f.check(stage, e.message.contains(&said), || {
                format!(
                    "expected the message to say {said:?}; it says {:?}",
                    e.message
                )
            });
            f.check(stage, !k.at.committed, || {
                "expected ACTIVE: the image was committed before the kill".into()
            });
            f.check(
                stage,
                image_listed(d, &k.req.image_name) == Some(false),
                || {
                    format!(
                        "expected no image {} after the FAILED capture; imagectl image says {:?}",
                        k.req.image_name,
                        image_listed(d, &k.req.image_name)
                    )
                },
            );
        }
        St::Active => {
            f.check(stage, k.at.committed, || {
                format!(
                    "expected FAILED: the image was not committed when the daemon was killed; \
                     it is ACTIVE: {op:?}"
                )
            });
            f.check(
                stage,
                image_listed(d, &k.req.image_name) == Some(true),
                || {
                    format!(
                        "expected image {} of the ACTIVE capture listed; imagectl image says {:?}",
                        k.req.image_name,
                        image_listed(d, &k.req.image_name)
                    )
                },
            );
            let r = export_matches(d, &k.req.image_name, data);
            f.check(stage, r.is_ok(), || {
                format!("expected the image readable and whole; {}", r.unwrap_err())
            });
        }
        other => f.check(stage, false, || {
            format!("expected FAILED (or ACTIVE after a commit); it is {other:?}: {op:?}")
        }),
    }
    for id in &k.others {
        let o = get_op(&mut ops, id).await;
        f.check(stage, terminal(state(&o)), || {
            format!("expected operation {id}, also cut off by the kill, ended; it is {o:?}")
        });
    }
    match ops
        .list_operations(proto::ListOperationsRequest {
            filter: "done = false".into(),
            ..Default::default()
        })
        .await
    {
        Ok(r) => {
            let open = r.into_inner().operations;
            f.check(stage, open.is_empty(), || {
                format!("expected no operation shown running (done = false); listed: {open:?}")
            });
        }
        Err(e) => f.check(stage, false, || {
            format!("expected ListOperations with filter done = false to answer; {e:?}")
        }),
    }

    // The guest and the host: thawed, no job, nothing of the operation left.
    nothing_left(f, stage, d, g, &k.op_id, true, Some(&k.boot)).await;
    for id in &k.others {
        let l = leftovers(&d.run_dir(), id);
        f.check(stage, l.is_empty(), || {
            format!("expected nothing of operation {id} in run_dir; it holds {l:?}")
        });
    }
    let j = journal_entries(d);
    f.check(stage, j.is_empty(), || {
        format!("expected an empty journal; it holds {j:?}")
    });
    let tmp: Vec<String> = std::fs::read_dir(d.repo.join("tmp"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    f.check(stage, tmp.is_empty(), || {
        format!("expected the repository's tmp/ empty; it holds {tmp:?}")
    });
    let manifests: Vec<String> = std::fs::read_dir(d.repo.join("images"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".tmp"))
        .collect();
    f.check(stage, manifests.is_empty(), || {
        format!("expected no temp manifest in the repository; found {manifests:?}")
    });

    if g.try_agent(r#"{"execute":"guest-ping"}"#, 10).is_err() {
        return; // nothing_left has recorded why
    }
    let log = hook_log(g);
    f.check(stage, thawed_after_last_freeze(&log), || {
        format!(
            "expected the freeze hook's log to end the last freeze with a thaw; it says {log:?}"
        )
    });

    // The prep changes are undone in the running source.
    // A restore still journaled may be a janitor's to finish: wait for it (up to SETTLE);
    // once no entry is left, nothing will change the files any more.
    let t0 = Instant::now();
    let mut now = prep_files(g);
    while now != k.prep_before && !journal_entries(d).is_empty() && t0.elapsed() < SETTLE {
        tokio::time::sleep(Duration::from_secs(1)).await;
        now = prep_files(g);
    }
    if now != k.prep_before {
        now = prep_files(g);
    }
    f.check(stage, now == k.prep_before, || {
        format!(
            "expected the files prep touched back as they were (checksums before the \
             capture):\n{}\nthey are:\n{now}",
            k.prep_before
        )
    });
    let left = prep_backups(g);
    f.check(stage, left.is_empty(), || {
        format!("expected no prep backup left in the guest; {PREP_BACKUPS} holds:\n{left}")
    });
}

impl Killed<'_> {
    /// Judges what the restarted daemon made of this kill ([`judge_killed`]), then captures
    /// again with a new request_id ([`capture_again`], `next` = image and request id): the
    /// boot id and prep files the next stage starts from.
    async fn judge_then_capture_again(
        &self,
        f: &mut Findings,
        d: &Daemon,
        g: &Guest,
        data: &Path,
        next: (&str, &str),
    ) -> (String, String) {
        judge_killed(f, d, g, self, data).await;
        capture_again(f, self.stage, d, g, next.0, next.1, &self.op_id).await
    }
}

/// The lab back in order after a stage (see [`repair`]), the source's configuration planted
/// again; then the same capture with a new request_id must end ACTIVE, quiesced, with the
/// prep undone in the source. Returns the boot id and [`prep_files`] for the next stage.
async fn capture_again(
    f: &mut Findings,
    stage: &str,
    d: &Daemon,
    g: &Guest,
    image: &str,
    request_id: &str,
    old_id: &str,
) -> (String, String) {
    repair(g, true);
    let _ = g.sh(&format!("rm -f {SLOW_FREEZE}"));
    let before = plant_prep_targets(g);
    let mut images = d.images().await;
    match images.capture(killed_req(g, image, request_id)).await {
        Ok(op) => {
            let op = op.into_inner();
            f.check(stage, op.id != old_id, || {
                format!("expected a new operation for request_id {request_id}; got {old_id} again")
            });
            let end = d.wait_op(&op.id).await;
            f.check(
                stage,
                state(&end) == St::Active && end.consistency == "quiesced",
                || {
                    format!(
                        "expected the capture with a new request_id to end ACTIVE, quiesced; it \
                         ended {:?} ({:?}): {:?}",
                        state(&end),
                        end.consistency,
                        end.error
                    )
                },
            );
            let now = prep_files(g);
            f.check(stage, now == before, || {
                format!(
                    "expected the new capture to undo its prep in the source:\n{before}\nthe \
                     files are:\n{now}"
                )
            });
        }
        Err(e) => f.check(stage, false, || {
            format!("expected the capture with a new request_id to be accepted; refused: {e:?}")
        }),
    }
    let r = until(Instant::now() + SETTLE, || no_job(g)).await;
    f.check(stage, r.is_ok(), || {
        format!(
            "expected the new capture to end its backup job; {}",
            r.clone().unwrap_err()
        )
    });
    repair(g, true);
    (boot_id(g), plant_prep_targets(g))
}

/// Polls the journal entry of `op` until `key` is set in it; panics (the stage cannot be set
/// up) when the operation ends first or after 120 s.
async fn wait_journaled(d: &Daemon, ops: &mut Ops, op: &str, key: &str) {
    let path = d.run_dir().join("journal").join(format!("{op}.json"));
    let t0 = Instant::now();
    let mut n = 0u32;
    loop {
        let entry: Option<serde_json::Value> = std::fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        if entry.is_some_and(|e| e[key] == serde_json::Value::Bool(true)) {
            return;
        }
        n += 1;
        if n.is_multiple_of(100) {
            let o = get_op(ops, op).await;
            assert!(
                !terminal(state(&o)) && t0.elapsed() < Duration::from_secs(120),
                "expected the journal entry of {op} to record {key} (the stage this test aims \
                 at); the operation is {o:?} after {:?}",
                t0.elapsed()
            );
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// The daemon killed with SIGKILL at each stage of a quiesce capture with prep and
/// restore_source, and started again at once:
/// - QUEUED: behind an import that holds the only run slot;
/// - PREPARING, prep being applied: a watcher in the guest stops its agent (SIGSTOP) as soon as
///   prep has rewritten `interfaces` and says so on the serial console; the daemon is killed
///   before it journaled the prep;
/// - PREPARING, frozen: prep applied and journaled, the freeze journaled, the agent inside the
///   freeze hook's sleep (the filesystems freeze a few seconds after the kill, while the new
///   daemon starts);
/// - SAVING: mid-read of the data disk from the backup job;
/// - committing: as soon as the progress reaches the total (the image is committed, or about
///   to be; what was on disk at the kill decides what must follow);
/// - just after the commit: as soon as the image's manifest is in the repository (the daemon
///   is then ending the backup job, the operation not yet ended).
///
/// The daemon is stopped (SIGSTOP) just before the kill, and its journal entry, the repository
/// and the domain's backup job are read then, so each stage says what it hit. After each
/// restart: GetOperation finds the operation and a retry with its request_id returns it (and
/// starts nothing); it is FAILED, ABORTED, reason DAEMON_RESTARTED, its message naming the
/// daemon's pid and the state it was in, and no image is listed (or ACTIVE, its image listed
/// and exported byte for byte, when the image was committed at the kill); ListOperations shows
/// none with done = false; the guest runs the same boot, thawed (the freeze hook's log ends
/// with a thaw), with no backup job; run_dir holds nothing of the operation, the journal is
/// empty, the repository's tmp/ holds nothing; the files prep touched have their checksums of
/// before and no prep backup is left in the guest; then the same capture with a new request_id
/// ends ACTIVE and quiesced, its prep undone in the source. At the end the data disk still
/// holds exactly the bytes put there before the guest booted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_killed_at_each_stage_of_a_capture_loses_nothing() {
    // libvirtd stays up here, but the test runs alone (the lock held exclusively): it aims
    // kills at windows of a few hundred milliseconds on a TCG guest, and with other guests
    // booting beside it on this 2-core host its guest once starved (RCU stalls, no agent
    // within 240 s).
    let _libvirt = libvirtd::exclusive();
    let t_start = Instant::now();
    let lab = Lab::get();
    let g = lab
        .guest("rs-daemon-kill")
        .data_disk((DATA_MIB as u64) << 20)
        .create();
    let files = tempfile::Builder::new()
        .prefix("imaged-kill-")
        .tempdir()
        .expect("temp dir");
    let data = files.path().join("data.raw");
    random_file(&data, DATA_MIB, 29);
    let vdb = g.data_disk_paths()[0].to_str().unwrap().to_string();
    crate::support::lab::qemu_img(&[
        "convert",
        "-n",
        "-f",
        "raw",
        "-O",
        "qcow2",
        data.to_str().unwrap(),
        &vdb,
    ])
    .expect("filling the data disk");
    boot(&g);
    install_freeze_hook(&g);
    let mut d = one_slot_daemon();
    let mut f = Findings::new("daemon-killed");
    let mut boot_before = boot_id(&g);
    let mut prep_before = plant_prep_targets(&g);
    eprintln!("daemon-killed: set up in {:?}", t_start.elapsed());

    // ---- QUEUED
    let stage = "killed while the capture is QUEUED";
    let t0 = Instant::now();
    let mut holder = SlotHolder::hold(&d, "k-queued-holder").await;
    let mut images = d.images().await;
    let mut ops = d.ops().await;
    let req = killed_req(&g, "k-queued", "kill-queued-1");
    let op = images
        .capture(req.clone())
        .await
        .expect("expected the capture to be accepted")
        .into_inner();
    let s = state(&get_op(&mut ops, &op.id).await);
    assert_eq!(
        s,
        St::Queued,
        "expected the capture QUEUED behind the held import; it is {s:?}"
    );
    let at = stop_and_kill(&mut d, &g, &op.id, "k-queued");
    eprintln!("{stage}: at the kill: QUEUED, {}", at.describe());
    let r = until(Instant::now() + Duration::from_secs(10), || {
        (!libvirtd::alive(holder.nbd))
            .then_some(())
            .ok_or(format!("qemu-nbd {} still runs", holder.nbd))
    })
    .await;
    f.check(stage, r.is_ok(), || {
        format!(
            "expected the killed daemon's qemu-nbd (the held import's) to die with it; {}",
            r.clone().unwrap_err()
        )
    });
    holder.nbd = 0;
    let others = vec![holder.op.clone()];
    drop(holder);
    d.restart();
    let k = Killed {
        stage,
        req,
        op_id: op.id.clone(),
        was: "QUEUED",
        at,
        boot: boot_before.clone(),
        prep_before: prep_before.clone(),
        others,
    };
    (boot_before, prep_before) = k
        .judge_then_capture_again(&mut f, &d, &g, &data, ("k-queued-next", "kill-queued-2"))
        .await;
    eprintln!("{stage}: took {:?}", t0.elapsed());

    // ---- PREPARING, prep being applied
    let stage = "killed while prep is being applied (PREPARING)";
    let t0 = Instant::now();
    g.sh_ok(&format!(
        "cp {0} /run/imaged-test-watch.orig && nohup sh -c 'while cmp -s {0} \
         /run/imaged-test-watch.orig; do sleep 0.02; done; kill -STOP $(pidof qemu-ga); \
         echo {PREP_MARK} > /dev/ttyS0; sleep 10; kill -CONT $(pidof qemu-ga)' >/dev/null 2>&1 &",
        PREP_FILES[0]
    ));
    let mut images = d.images().await;
    let mut ops = d.ops().await;
    let req = killed_req(&g, "k-applying", "kill-applying-1");
    let op = images
        .capture(req.clone())
        .await
        .expect("expected the capture to be accepted")
        .into_inner();
    let t = Instant::now();
    while !g.console_log().contains(PREP_MARK) {
        let o = get_op(&mut ops, &op.id).await;
        assert!(
            !terminal(state(&o)) && t.elapsed() < Duration::from_secs(120),
            "expected the guest to report that prep rewrote {} (the stage this test aims at); \
             the operation is {o:?} after {:?}",
            PREP_FILES[0],
            t.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let o = get_op(&mut ops, &op.id).await;
    let at = stop_and_kill(&mut d, &g, &op.id, "k-applying");
    eprintln!(
        "{stage}: at the kill: {:?}, {} prep report(s) on the operation, {}",
        state(&o),
        o.prep.len(),
        at.describe()
    );
    f.check(stage, state(&o) == St::Preparing, || {
        format!("expected the kill to come while PREPARING; it came at {o:?}")
    });
    d.restart();
    let k = Killed {
        stage,
        req,
        op_id: op.id.clone(),
        was: "PREPARING",
        at,
        boot: boot_before.clone(),
        prep_before: prep_before.clone(),
        others: Vec::new(),
    };
    (boot_before, prep_before) = k
        .judge_then_capture_again(
            &mut f,
            &d,
            &g,
            &data,
            ("k-applying-next", "kill-applying-2"),
        )
        .await;
    eprintln!("{stage}: took {:?}", t0.elapsed());

    // ---- PREPARING, frozen
    let stage = "killed while the freeze hook holds the guest (PREPARING, frozen)";
    let t0 = Instant::now();
    g.sh_ok(&format!("echo {HOOK_SLEEP_SECS} > {SLOW_FREEZE}"));
    let freezes = |g: &Guest| {
        hook_log(g)
            .lines()
            .filter(|l| l.starts_with("freeze"))
            .count()
    };
    let freezes_before = freezes(&g);
    let mut images = d.images().await;
    let mut ops = d.ops().await;
    let req = killed_req(&g, "k-frozen", "kill-frozen-1");
    let op = images
        .capture(req.clone())
        .await
        .expect("expected the capture to be accepted")
        .into_inner();
    wait_journaled(&d, &mut ops, &op.id, "frozen").await;
    // The agent is asked to freeze right after the journal says so; its hook sleeps.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let o = get_op(&mut ops, &op.id).await;
    let at = stop_and_kill(&mut d, &g, &op.id, "k-frozen");
    let applied = o
        .prep
        .iter()
        .filter(|r| r.outcome == proto::PrepOutcome::Applied as i32)
        .count();
    eprintln!(
        "{stage}: at the kill: {:?}, {applied} prep step(s) applied, {}",
        state(&o),
        at.describe()
    );
    f.check(
        stage,
        state(&o) == St::Preparing && at.journaled("frozen") && at.journaled("prep"),
        || {
            format!(
                "expected the kill to come while PREPARING with the freeze and the prep \
                 journaled; it came at {:?}, {}",
                state(&o),
                at.describe()
            )
        },
    );
    let t = Instant::now();
    d.restart();
    eprintln!("{stage}: the new daemon served after {:?}", t.elapsed());
    let k = Killed {
        stage,
        req,
        op_id: op.id.clone(),
        was: "PREPARING",
        at,
        boot: boot_before.clone(),
        prep_before: prep_before.clone(),
        others: Vec::new(),
    };
    judge_killed(&mut f, &d, &g, &k, &data).await;
    if g.try_agent(r#"{"execute":"guest-ping"}"#, 10).is_ok() {
        // Nothing froze the guest since but the killed daemon's request, which libvirt
        // delivered after the kill: the guest froze with that daemon gone.
        let n = freezes(&g);
        f.check(stage, n == freezes_before + 1, || {
            format!(
                "expected the killed daemon's freeze to reach the guest (one more freeze in \
                 the hook's log, {} then); it logged {n}",
                freezes_before + 1
            )
        });
    }
    check_freeze_undone(&mut f, stage, &g);
    (boot_before, prep_before) = capture_again(
        &mut f,
        stage,
        &d,
        &g,
        "k-frozen-next",
        "kill-frozen-2",
        &op.id,
    )
    .await;
    eprintln!("{stage}: took {:?}", t0.elapsed());

    // ---- SAVING
    let stage = "killed mid-read (SAVING)";
    let t0 = Instant::now();
    let mut images = d.images().await;
    let mut ops = d.ops().await;
    let req = killed_req(&g, "k-saving", "kill-saving-1");
    let op = images
        .capture(req.clone())
        .await
        .expect("expected the capture to be accepted")
        .into_inner();
    let t = Instant::now();
    let o = loop {
        let o = get_op(&mut ops, &op.id).await;
        if state(&o) == St::Saving && o.progress.is_some_and(|p| p.done_bytes > 0) {
            break o;
        }
        assert!(
            !terminal(state(&o)) && t.elapsed() < Duration::from_secs(120),
            "expected the capture to be reading (the stage this test aims at); it is {o:?}"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    };
    let at = stop_and_kill(&mut d, &g, &op.id, "k-saving");
    let p = o.progress.unwrap_or_default();
    eprintln!(
        "{stage}: at the kill: {:?}, {} of {} bytes done, {}",
        state(&o),
        p.done_bytes,
        p.total_bytes,
        at.describe()
    );
    f.check(
        stage,
        p.done_bytes < p.total_bytes && at.job && !at.committed,
        || {
            format!(
                "expected the kill mid-read with the backup job running; {} of {} bytes done, {}",
                p.done_bytes,
                p.total_bytes,
                at.describe()
            )
        },
    );
    d.restart();
    let k = Killed {
        stage,
        req,
        op_id: op.id.clone(),
        was: "SAVING",
        at,
        boot: boot_before.clone(),
        prep_before: prep_before.clone(),
        others: Vec::new(),
    };
    (boot_before, prep_before) = k
        .judge_then_capture_again(&mut f, &d, &g, &data, ("k-saving-next", "kill-saving-2"))
        .await;
    eprintln!("{stage}: took {:?}", t0.elapsed());

    // ---- committing
    let stage = "killed as the read reaches its end (committing)";
    let t0 = Instant::now();
    let mut images = d.images().await;
    let mut ops = d.ops().await;
    let req = killed_req(&g, "k-commit", "kill-commit-1");
    let op = images
        .capture(req.clone())
        .await
        .expect("expected the capture to be accepted")
        .into_inner();
    let t = Instant::now();
    let o = loop {
        let o = get_op(&mut ops, &op.id).await;
        let at_end = o
            .progress
            .is_some_and(|p| p.total_bytes > 0 && p.done_bytes >= p.total_bytes);
        if (state(&o) == St::Saving && at_end) || state(&o) == St::Active {
            break o;
        }
        assert!(
            !terminal(state(&o)) && t.elapsed() < Duration::from_secs(120),
            "expected the capture to read to its end (the stage this test aims at); it is {o:?}"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    };
    let at = stop_and_kill(&mut d, &g, &op.id, "k-commit");
    eprintln!("{stage}: at the kill: {:?}, {}", state(&o), at.describe());
    d.restart();
    let k = Killed {
        stage,
        req,
        op_id: op.id.clone(),
        was: "SAVING",
        at,
        boot: boot_before.clone(),
        prep_before: prep_before.clone(),
        others: Vec::new(),
    };
    (boot_before, prep_before) = k
        .judge_then_capture_again(&mut f, &d, &g, &data, ("k-commit-next", "kill-commit-2"))
        .await;
    eprintln!("{stage}: took {:?}", t0.elapsed());

    // ---- just after the commit
    let stage = "killed just after the commit (image committed, backup job ending)";
    let t0 = Instant::now();
    let mut images = d.images().await;
    let mut ops = d.ops().await;
    let req = killed_req(&g, "k-committed", "kill-committed-1");
    let op = images
        .capture(req.clone())
        .await
        .expect("expected the capture to be accepted")
        .into_inner();
    let manifest = d.repo.join("images").join("k-committed.json");
    let t = Instant::now();
    let mut n = 0u32;
    while !manifest.exists() {
        n += 1;
        if n.is_multiple_of(100) {
            let o = get_op(&mut ops, &op.id).await;
            assert!(
                !terminal(state(&o)) && t.elapsed() < Duration::from_secs(120),
                "expected the image committed while the capture runs (the stage this test aims \
                 at); the operation is {o:?}"
            );
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let at = stop_and_kill(&mut d, &g, &op.id, "k-committed");
    eprintln!("{stage}: at the kill: {}", at.describe());
    f.check(stage, at.committed, || {
        format!(
            "expected the kill to come after the commit; {}",
            at.describe()
        )
    });
    d.restart();
    let k = Killed {
        stage,
        req,
        op_id: op.id.clone(),
        was: "SAVING",
        at,
        boot: boot_before.clone(),
        prep_before: prep_before.clone(),
        others: Vec::new(),
    };
    k.judge_then_capture_again(
        &mut f,
        &d,
        &g,
        &data,
        ("k-committed-next", "kill-committed-2"),
    )
    .await;
    eprintln!("{stage}: took {:?}", t0.elapsed());

    // Nine captures read the data disk (three of them killed): the guest never writes to it,
    // so it must still hold exactly the bytes put there.
    let stage = "the source disk after every stage";
    let cmp = crate::support::lab::qemu_img(&[
        "compare",
        "-U",
        "-f",
        "raw",
        "-F",
        "qcow2",
        data.to_str().unwrap(),
        &vdb,
    ]);
    f.check(
        stage,
        cmp.as_ref()
            .is_ok_and(|o| o.contains("Images are identical")),
        || format!("expected the captured data disk unchanged; qemu-img compare says {cmp:?}"),
    );

    let took = t_start.elapsed();
    eprintln!("daemon-killed: took {took:?}");
    f.finish();
}

/// Open descriptors and resident memory of a process.
fn fds_and_rss(pid: u32) -> (usize, u64) {
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|r| r.count())
        .unwrap_or(0);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    (fds, rss_kib)
}

/// What one soak step should end as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    CrashConsistent,
    Quiesce,
    Import,
    CancelledCapture,
    CancelledImport,
    FailedQuiesce,
    FailedImport,
}

/// The 5 steps of soak cycle `n`: two captures and an import that succeed, one cancelled
/// operation and one that fails on purpose.
fn cycle(n: usize) -> [Step; 5] {
    let even = n.is_multiple_of(2);
    [
        Step::CrashConsistent,
        Step::Quiesce,
        Step::Import,
        if even {
            Step::CancelledCapture
        } else {
            Step::CancelledImport
        },
        if even {
            Step::FailedQuiesce
        } else {
            Step::FailedImport
        },
    ]
}

/// Bounded soak: 50 operations (captures of a small data disk, imports, cancels, failures on
/// purpose) after a warm-up cycle of 5. At the end `run_dir` holds only the daemon's lock file
/// and an empty journal directory, the repository's `tmp/` is empty (and no temp manifest is
/// left), no qemu-nbd runs, and the daemon's open descriptors are back at the warm-up count
/// (+2 allowed) and its VmRSS within 24 MiB of it (and within 12 MiB between cycle 5 and 10).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_of_captures_and_imports_leaves_nothing_and_leaks_nothing() {
    let t_start = Instant::now();
    let lab = Lab::get();
    let g = lab.guest("rs-soak").data_disk(64 << 20).create();
    boot(&g);
    g.sh_ok("dd if=/dev/urandom of=/dev/vdb bs=1M count=16 oflag=direct status=none && sync");
    install_freeze_hook(&g);
    let d = Daemon::start();
    let dir = d.dir.path();
    let small = dir.join("small.raw");
    random_file(&small, 8, 11);
    let big = dir.join("big.raw");
    patterned_file(&big, 512);
    let mut images = d.images().await;
    let mut ops = d.ops().await;
    let mut f = Findings::new("soak");
    let mut counts = std::collections::BTreeMap::<String, usize>::new();

    let mut measures = Vec::new();
    let mut n_ops = 0;
    for c in 0..11 {
        for (i, step) in cycle(c).into_iter().enumerate() {
            let name = format!("soak-{c}-{i}");
            let stage = format!("cycle {c} step {step:?}");
            let capture = |mode: proto::CaptureMode| {
                let mut r = req(g.name(), &name, mode);
                r.disk = "vdb".into();
                r
            };
            let import = |path: &Path| proto::ImportRequest {
                path: path.to_str().unwrap().into(),
                format: "raw".into(),
                image_name: name.clone(),
                request_id: String::new(),
            };
            if step == Step::FailedQuiesce {
                g.sh_ok(&format!("touch {FAIL_FREEZE}"));
            }
            let asked = match step {
                Step::CrashConsistent => {
                    images
                        .capture(capture(proto::CaptureMode::CrashConsistent))
                        .await
                }
                Step::Quiesce | Step::FailedQuiesce => {
                    images.capture(capture(proto::CaptureMode::Quiesce)).await
                }
                Step::CancelledCapture => {
                    let mut r = req(g.name(), &name, proto::CaptureMode::CrashConsistent);
                    r.disk = "vda".into();
                    images.capture(r).await
                }
                Step::Import => images.import(import(&small)).await,
                Step::CancelledImport => images.import(import(&big)).await,
                Step::FailedImport => {
                    let r = images.import(import(&small)).await;
                    // The file changes while it is read: the import must not commit it.
                    std::fs::File::options()
                        .write(true)
                        .open(&small)
                        .and_then(|fh| fh.set_modified(SystemTime::now()))
                        .expect("touching the import file");
                    r
                }
            };
            let op = match asked {
                Ok(op) => op.into_inner(),
                Err(e) => {
                    f.check(&stage, false, || {
                        format!("expected the request to be accepted; refused: {e:?}")
                    });
                    continue;
                }
            };
            if matches!(step, Step::CancelledCapture | Step::CancelledImport) {
                let _ = ops
                    .cancel_operation(proto::CancelOperationRequest { id: op.id.clone() })
                    .await;
            }
            let end = d.wait_op(&op.id).await;
            n_ops += 1;
            let want = match step {
                Step::CrashConsistent | Step::Quiesce | Step::Import => St::Active,
                Step::CancelledCapture | Step::CancelledImport => St::Cancelled,
                Step::FailedQuiesce | Step::FailedImport => St::Failed,
            };
            *counts
                .entry(format!("{step:?} {:?}", state(&end)))
                .or_default() += 1;
            f.check(&stage, state(&end) == want, || {
                format!(
                    "expected {want:?}; it ended {:?}: {:?}",
                    state(&end),
                    end.error
                )
            });
            if step == Step::FailedQuiesce {
                g.sh_ok(&format!("rm -f {FAIL_FREEZE}"));
            }
            if state(&end) == St::Active {
                if let Err(e) = images
                    .delete_image(proto::DeleteImageRequest { name: name.clone() })
                    .await
                {
                    f.check(&stage, false, || {
                        format!("expected image {name} deleted: {e:?}")
                    });
                }
            }
        }
        if c == 0 || c == 5 || c == 10 {
            // Let finished work wind down (blocking threads, connections) before measuring.
            tokio::time::sleep(Duration::from_secs(3)).await;
            let m = fds_and_rss(d.pid());
            eprintln!("soak: after cycle {c}: {} fds, VmRSS {} KiB", m.0, m.1);
            measures.push(m);
        }
    }
    let n_measured = n_ops - 5;
    eprintln!("soak: {n_measured} operations after the warm-up; outcomes {counts:?}");
    f.check("soak", n_measured >= 50, || {
        format!("expected 50 operations; ran {n_measured}")
    });

    let (base, mid) = (measures[0], measures[1]);
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut end = fds_and_rss(d.pid());
    while end.0 > base.0 + 2 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_secs(1)).await;
        end = fds_and_rss(d.pid());
    }
    eprintln!(
        "soak: fds {} -> {} -> {}, VmRSS {} -> {} -> {} KiB",
        base.0, mid.0, end.0, base.1, mid.1, end.1
    );
    f.check("soak", end.0 <= base.0 + 2, || {
        format!(
            "expected the daemon's open descriptors back at {} (+2); it has {}",
            base.0, end.0
        )
    });
    f.check("soak", end.1 <= base.1 + 24 * 1024, || {
        format!(
            "expected VmRSS within 24 MiB of {} KiB; it is {} KiB",
            base.1, end.1
        )
    });
    f.check("soak", end.1 <= mid.1 + 12 * 1024, || {
        format!(
            "expected VmRSS to grow less than 12 MiB over the last 25 operations; {} -> {} KiB",
            mid.1, end.1
        )
    });

    let stray: Vec<String> = std::fs::read_dir(d.run_dir())
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n != "imaged.lock" && n != "journal")
        .collect();
    f.check("soak", stray.is_empty(), || {
        format!("expected run_dir to hold only imaged.lock and journal/; it holds {stray:?}")
    });
    let j = journal_entries(&d);
    f.check("soak", j.is_empty(), || {
        format!("expected an empty journal; it holds {j:?}")
    });
    let tmp: Vec<String> = std::fs::read_dir(d.repo.join("tmp"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    f.check("soak", tmp.is_empty(), || {
        format!("expected the repository's tmp/ empty; it holds {tmp:?}")
    });
    let temp_manifests: Vec<String> = std::fs::read_dir(d.repo.join("images"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".tmp"))
        .collect();
    f.check("soak", temp_manifests.is_empty(), || {
        format!("expected no temp manifest in the repository; found {temp_manifests:?}")
    });
    let nbd = qemu_nbd_children(d.pid());
    f.check("soak", nbd.is_empty(), || {
        format!("expected no qemu-nbd left; running: {nbd:?}")
    });
    f.check("soak", no_job(&g).is_ok(), || {
        format!("expected no job on the guest: {:?}", no_job(&g))
    });
    f.check("soak", thawed(&g).is_ok(), || {
        format!("expected the guest thawed: {:?}", thawed(&g))
    });
    let took = t_start.elapsed();
    eprintln!("soak: took {took:?}");
    f.check("soak", took < Duration::from_secs(8 * 60), || {
        format!("expected the soak within its 8 min budget; it took {took:?}")
    });
    f.finish();
}

/// The libvirt lock's rules on a private instance: a thread holding it shared gets it shared
/// again at once while a writer waits (no deadlock), a new shared request waits behind that
/// writer, the writer gets it once the readers are gone, the exclusive holder's own shared
/// requests are granted, and upgrading shared to exclusive panics instead of hanging.
#[test]
fn the_libvirt_lock_never_deadlocks_a_test_holding_it_shared() {
    use std::thread;
    let lock: &'static TestLock = Box::leak(Box::new(TestLock::new()));
    let limit = Duration::from_secs(10);
    let first = lock.shared_within(limit);
    let writer = thread::spawn(move || {
        let x = lock.exclusive();
        let got = Instant::now();
        thread::sleep(Duration::from_millis(300));
        let released = Instant::now();
        drop(x);
        (got, released)
    });
    let t0 = Instant::now();
    while lock.writers_waiting() == 0 {
        assert!(
            t0.elapsed() < limit,
            "expected the exclusive request to be waiting"
        );
        thread::sleep(Duration::from_millis(10));
    }
    let t1 = Instant::now();
    let second = lock.shared_within(limit);
    assert!(
        t1.elapsed() < Duration::from_secs(1),
        "expected a thread holding the lock shared to get it shared again at once while a \
         writer waits; it waited {:?}",
        t1.elapsed()
    );
    let newcomer = thread::spawn(move || {
        let _s = lock.shared_within(limit);
        Instant::now()
    });
    thread::sleep(Duration::from_millis(300));
    assert!(
        !newcomer.is_finished(),
        "expected a new shared request to wait behind the waiting writer; it was granted"
    );
    let readers_gone = Instant::now();
    drop(second);
    drop(first);
    let (got, released) = writer.join().expect("the writer thread");
    assert!(
        got >= readers_gone,
        "expected the writer to get the lock only after the readers let go"
    );
    let newcomer_got = newcomer.join().expect("the newcomer thread");
    assert!(
        newcomer_got >= released,
        "expected the newcomer to get the lock only after the writer let go"
    );

    let x = lock.exclusive();
    let t2 = Instant::now();
    let nested = lock.shared_within(limit);
    assert!(
        t2.elapsed() < Duration::from_secs(1),
        "expected the exclusive holder's own shared request granted at once; it waited {:?}",
        t2.elapsed()
    );
    drop(nested);
    drop(x);

    let upgrade = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let _s = lock.shared_within(limit);
        let _x = lock.exclusive();
    }));
    assert!(
        upgrade.is_err(),
        "expected asking for the lock exclusively while holding it shared to panic"
    );
    let t3 = Instant::now();
    drop(lock.exclusive());
    assert!(
        t3.elapsed() < Duration::from_secs(1),
        "expected the lock free again after the refused upgrade; it took {:?}",
        t3.elapsed()
    );
}
