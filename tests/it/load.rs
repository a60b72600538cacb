//! Load on loopback, bounded in count and in time: one daemon that runs two operations at a
//! time is asked for 50 cold captures at once (48 of them wait QUEUED), while 200
//! WatchOperation streams (4 per operation, over 4 connections) are read to their end.
//!
//! The 50 domains are real libvirt domains that never boot: each is defined from a minimal
//! XML over its own small qcow2 (32 MiB virtual; 4 MiB that all of them share, so dedup shows,
//! and 4 MiB of their own), so every capture really reads, hashes and stores data. They are
//! undefined again when the test ends, also when it panics.
//!
//! What must hold: every capture ends ACTIVE with its Image as the response; every stream ends
//! after a done snapshot, its states only moving forward; nothing is left undone; and the
//! daemon's peak RSS, its descriptors and its threads stay bounded, and the descriptors and
//! threads come back to where they started once the clients are gone. The figures are printed
//! (`--nocapture`) for the README.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use imaged::cli::view::OpView;
use imaged::proto as pb;
use pb::image_service_client::ImageServiceClient;
use pb::operation_service_client::OperationServiceClient;
use tonic::transport::Channel;

use crate::support::daemon::{chunk_files, run, Daemon, DaemonOptions};
use crate::support::lab::virsh;
use crate::support::libvirtd;

/// How many domains are captured at once.
const DOMAINS: usize = 50;
/// WatchOperation streams per operation.
const WATCHERS_PER_OP: usize = 4;
/// Client connections the calls and streams are spread over.
const CHANNELS: usize = 4;
/// Every capture and every stream must be done within this.
const BOUND: Duration = Duration::from_secs(600);
/// The daemon's peak RSS must stay under this. Measured: 75-78 MiB (35 MiB idle; two
/// captures at a time with their read buffers, and the malloc arenas of the threads below,
/// which keep what they freed). A queued operation or an open stream costs kilobytes, so
/// 256 MiB leaves room for allocator slack while catching anything that grows with the number
/// of operations or streams (50 × 4 MiB buffers alone would pass it).
const MAX_HWM: u64 = 256 << 20;
/// The daemon's threads must stay at or under this at their peak: tokio's 2 workers and the
/// main thread, plus its blocking pool, which libvirt calls and the captures' file and hashing
/// work run on. A CaptureImage call makes its libvirt calls there (a connection per call), so
/// 50 calls at once may hold up to 50 blocking threads for a moment, and the 2 running
/// captures a few more (measured: 21-59 at the peak); idle ones end after 10 s. The 200
/// streams are tasks, not threads: the bound does not grow with them.
const MAX_THREADS: usize = DOMAINS + 32;
/// Every load domain's name starts with this (the lab's prefix, so a later lab run removes
/// those a killed run left behind), then `<pid>-<n>`.
const PREFIX: &str = "imaged-test-load-";
/// The byte all domains share at the start of their disks.
const SHARED: u8 = 0xa5;

/// The load domains: defined at once, undefined on drop (also on a panic). They hold the
/// libvirt lock shared, as lab guests do.
struct LoadDomains {
    names: Vec<String>,
    dir: tempfile::TempDir,
    /// Released after the domains are undefined (fields drop after [`Drop::drop`]).
    _libvirt: libvirtd::Shared,
}

impl LoadDomains {
    /// Defines `n` shut-off domains, each over its own qcow2 in a temp dir: 4 MiB of the
    /// shared byte at 0 and 4 MiB of its own byte (`n + 1`) at 16 MiB, the rest unallocated.
    fn define(n: usize) -> LoadDomains {
        let libvirt = libvirtd::shared();
        remove_stale();
        let dir = tempfile::Builder::new()
            .prefix("imaged-load-")
            .tempdir()
            .expect("temp dir");
        let mut doms = LoadDomains {
            names: Vec::with_capacity(n),
            dir,
            _libvirt: libvirt,
        };
        let until = Instant::now() + Duration::from_secs(60);
        for i in 0..n {
            let name = format!("{PREFIX}{}-{i}", std::process::id());
            let disk = doms.dir.path().join(format!("{name}.qcow2"));
            let disk_s = disk.to_str().unwrap();
            run("qemu-img", &["create", "-q", "-f", "qcow2", disk_s, "32M"]);
            run(
                "qemu-io",
                &[
                    "-f",
                    "qcow2",
                    "-c",
                    &format!("write -q -P {SHARED} 0 4M"),
                    "-c",
                    &format!("write -q -P {} 16M 4M", i + 1),
                    disk_s,
                ],
            );
            let xml = doms.dir.path().join(format!("{name}.xml"));
            std::fs::write(&xml, domain_xml(&name, &disk)).unwrap();
            patient_virsh(&["define", xml.to_str().unwrap()], until)
                .unwrap_or_else(|e| panic!("defining load domain {name}: {e}"));
            doms.names.push(name);
        }
        doms
    }
}

impl Drop for LoadDomains {
    fn drop(&mut self) {
        let until = Instant::now() + Duration::from_secs(60);
        for name in &self.names {
            if let Err(e) = patient_virsh(&["undefine", name], until) {
                eprintln!("load: could not undefine {name} ({e}); a later run removes it");
            }
        }
    }
}

/// `virsh ARGS`, tried again until `until` while libvirtd cannot be reached (a test run of
/// another worktree on this host may stop it for a moment).
fn patient_virsh(args: &[&str], until: Instant) -> Result<String, String> {
    loop {
        match virsh(args) {
            Err(e) if e.contains("failed to connect") && Instant::now() < until => {
                std::thread::sleep(Duration::from_millis(500));
            }
            r => return r,
        }
    }
}

/// A domain that is never started: one vCPU, 64 MiB, the qcow2 as `vda`, no other devices.
fn domain_xml(name: &str, disk: &Path) -> String {
    format!(
        "<domain type='qemu'>\n  <name>{name}</name>\n  <memory unit='MiB'>64</memory>\n  \
         <vcpu>1</vcpu>\n  <os>\n    <type arch='x86_64' machine='pc'>hvm</type>\n  </os>\n  \
         <devices>\n    <disk type='file' device='disk'>\n      \
         <driver name='qemu' type='qcow2'/>\n      <source file='{}'/>\n      \
         <target dev='vda' bus='virtio'/>\n    </disk>\n    \
         <controller type='usb' model='none'/>\n    <memballoon model='none'/>\n  \
         </devices>\n</domain>\n",
        disk.display()
    )
}

/// Undefines load domains whose test process is gone (a killed run never reaches `Drop`).
fn remove_stale() {
    let Ok(list) = virsh(&["list", "--all", "--name"]) else {
        return;
    };
    for name in list.lines().map(str::trim) {
        let Some(pid) = name
            .strip_prefix(PREFIX)
            .and_then(|rest| rest.split('-').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
            eprintln!("load: removing stale domain {name}");
            let _ = virsh(&["undefine", name]);
        }
    }
}

/// A number from `/proc/PID/status` (`VmHWM` in bytes, `Threads` as is).
fn status_field(pid: u32, field: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = s
        .lines()
        .find(|l| l.starts_with(field) && l[field.len()..].starts_with(':'))
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"));
    let v: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    if line.ends_with(" kB") {
        v * 1024
    } else {
        v
    }
}

fn threads(pid: u32) -> usize {
    status_field(pid, "Threads") as usize
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

/// Peaks of the daemon's descriptors and threads, sampled every 20 ms on a plain thread.
struct Sampler {
    stop: Arc<AtomicBool>,
    handle: std::thread::JoinHandle<(usize, usize)>,
}

impl Sampler {
    fn start(pid: u32) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let handle = std::thread::spawn(move || {
            let (mut fds, mut thr) = (0, 0);
            while !flag.load(Ordering::Relaxed) {
                fds = fds.max(open_fds(pid));
                thr = thr.max(threads(pid));
                std::thread::sleep(Duration::from_millis(20));
            }
            (fds, thr)
        });
        Sampler { stop, handle }
    }

    /// Peak descriptors and peak threads.
    fn finish(self) -> (usize, usize) {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().unwrap()
    }
}

/// What one stream saw: every message's state and done flag, the Image of the last one, and
/// when it first saw the operation past QUEUED.
struct Watched {
    op: usize,
    states: Vec<(i32, bool)>,
    last_image: Option<pb::Image>,
    started_at: Option<Duration>,
}

/// Reads a WatchOperation stream to its end.
async fn watch(
    ch: Channel,
    op: usize,
    name: String,
    t0: Instant,
    open: Arc<AtomicUsize>,
    peak: Arc<AtomicUsize>,
) -> Watched {
    let mut ops = OperationServiceClient::new(ch);
    let mut stream = ops
        .watch_operation(pb::WatchOperationRequest { name: name.clone() })
        .await
        .unwrap_or_else(|e| panic!("WatchOperation {name}: {e:?}"))
        .into_inner();
    let now = open.fetch_add(1, Ordering::SeqCst) + 1;
    peak.fetch_max(now, Ordering::SeqCst);
    let mut w = Watched {
        op,
        states: Vec::new(),
        last_image: None,
        started_at: None,
    };
    while let Some(msg) = stream
        .message()
        .await
        .unwrap_or_else(|e| panic!("WatchOperation {name} broke: {e:?}"))
    {
        let v = OpView::from_lro(&msg);
        if w.started_at.is_none() && v.meta.state != pb::OperationState::Queued as i32 {
            w.started_at = Some(t0.elapsed());
        }
        w.states.push((v.meta.state, v.done));
        w.last_image = v.image;
    }
    open.fetch_sub(1, Ordering::SeqCst);
    w
}

/// What one capture's task gives back: its index, its operation's name, its state and the
/// time when CaptureImage answered, and what its streams saw.
struct Submitted {
    i: usize,
    name: String,
    answered: i32,
    answered_at: Duration,
    streams: Vec<Watched>,
}

/// The most operations a `ListOperations` (filter `done = false`, polled every 20 ms) showed
/// queued at once, and the most it showed running.
async fn poll_list(ch: Channel, stop: Arc<AtomicBool>) -> (usize, usize) {
    let mut ops = OperationServiceClient::new(ch);
    let (mut queued, mut running) = (0, 0);
    while !stop.load(Ordering::Relaxed) {
        let page = ops
            .list_operations(pb::ListOperationsRequest {
                filter: "done = false".into(),
                page_size: 1000,
                ..Default::default()
            })
            .await
            .unwrap_or_else(|e| panic!("ListOperations during the load: {e:?}"))
            .into_inner();
        let states: Vec<i32> = page
            .operations
            .iter()
            .map(|o| OpView::from_lro(o).meta.state)
            .collect();
        let q = pb::OperationState::Queued as i32;
        queued = queued.max(states.iter().filter(|s| **s == q).count());
        running = running.max(states.iter().filter(|s| **s != q).count());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    (queued, running)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_cold_captures_at_once_with_two_hundred_watchers() {
    let t_setup = Instant::now();
    let doms = LoadDomains::define(DOMAINS);
    eprintln!(
        "load: {DOMAINS} domains defined in {:.1?}",
        t_setup.elapsed()
    );
    let d = Daemon::start_with(DaemonOptions {
        daemon_toml: "max_running_operations = 2\nmax_operations_per_identity = 100\n".into(),
        ..Default::default()
    });
    let pid = d.pid();
    let (fds0, threads0) = (open_fds(pid), threads(pid));
    let sampler = Sampler::start(pid);

    let mut channels = Vec::with_capacity(CHANNELS);
    for _ in 0..CHANNELS {
        channels.push(d.channel().await);
    }
    let open = Arc::new(AtomicUsize::new(0));
    let peak_open = Arc::new(AtomicUsize::new(0));
    let stop_polling = Arc::new(AtomicBool::new(false));
    let poller = tokio::spawn(poll_list(channels[0].clone(), stop_polling.clone()));

    // All 50 captures at once, each on a task of its own; each task opens the operation's 4
    // streams, one per connection, as soon as its call returns.
    let t0 = Instant::now();
    let mut captures = tokio::task::JoinSet::new();
    for (i, dom) in doms.names.iter().enumerate() {
        let channels = channels.clone();
        let dom = dom.clone();
        let (open, peak_open) = (open.clone(), peak_open.clone());
        captures.spawn(async move {
            let mut images = ImageServiceClient::new(channels[i % CHANNELS].clone());
            let op = images
                .capture_image(pb::CaptureImageRequest {
                    image_id: format!("load-{i:02}"),
                    domain: format!("domains/{dom}"),
                    mode: pb::CaptureMode::Cold as i32,
                    ..Default::default()
                })
                .await
                .unwrap_or_else(|e| panic!("CaptureImage of {dom}: {e:?}"))
                .into_inner();
            let answered_at = t0.elapsed();
            let watchers: Vec<_> = channels
                .iter()
                .take(WATCHERS_PER_OP)
                .map(|ch| {
                    tokio::spawn(watch(
                        ch.clone(),
                        i,
                        op.name.clone(),
                        t0,
                        open.clone(),
                        peak_open.clone(),
                    ))
                })
                .collect();
            let mut streams = Vec::new();
            for w in watchers {
                streams.push(w.await.unwrap());
            }
            Submitted {
                i,
                answered: OpView::from_lro(&op).meta.state,
                name: op.name,
                answered_at,
                streams,
            }
        });
    }
    let mut all = tokio::time::timeout(BOUND, async {
        let mut all = Vec::new();
        while let Some(r) = captures.join_next().await {
            all.push(r.unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic())));
        }
        all
    })
    .await
    .unwrap_or_else(|_| {
        panic!(
            "the captures and their streams did not all end within {BOUND:?}; daemon log \
             tail:\n{}",
            tail(&d.log_text(), 60)
        )
    });
    let elapsed = t0.elapsed();
    stop_polling.store(true, Ordering::Relaxed);
    let (max_queued, max_running) = poller.await.unwrap();
    let (peak_fds, peak_threads) = sampler.finish();
    let hwm = status_field(pid, "VmHWM");
    all.sort_by_key(|s| s.i);

    // What the streams saw.
    let queued = pb::OperationState::Queued as i32;
    let mut streams = 0;
    for s in &all {
        for w in &s.streams {
            streams += 1;
            let ctx = format!("stream of operation {} ({}): {:?}", w.op, s.name, w.states);
            let (last_state, last_done) = *w.states.last().expect(&ctx);
            assert!(last_done, "ended without a done snapshot; {ctx}");
            assert_eq!(
                last_state,
                pb::OperationState::Active as i32,
                "{ctx}\n{}",
                tail(&d.log_text(), 60)
            );
            assert!(
                w.states[..w.states.len() - 1].iter().all(|s| !s.1),
                "done before its last message; {ctx}"
            );
            assert!(
                w.states.windows(2).all(|p| p[0].0 <= p[1].0)
                    && w.states.iter().all(|s| s.0 >= queued),
                "states went backwards; {ctx}"
            );
            let img = w.last_image.as_ref().expect(&ctx);
            assert_eq!(img.name, format!("images/load-{:02}", s.i), "{ctx}");
        }
    }
    assert_eq!(streams, DOMAINS * WATCHERS_PER_OP);
    let queued_answers = all.iter().filter(|s| s.answered == queued).count();
    let queued_watched = all
        .iter()
        .filter(|s| {
            s.streams
                .iter()
                .any(|w| w.states.first().map(|f| f.0) == Some(queued))
        })
        .count();

    // Every operation is done, ACTIVE, its Image the response, as GetOperation says too.
    let mut ops = OperationServiceClient::new(channels[0].clone());
    for s in &all {
        let op = ops
            .get_operation(pb::GetOperationRequest {
                name: s.name.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        let v = OpView::from_lro(&op);
        assert!(v.done, "{v:?}");
        assert_eq!(v.meta.state, pb::OperationState::Active as i32, "{v:?}");
        let img = v
            .image
            .unwrap_or_else(|| panic!("operation {} has no Image", s.name));
        assert_eq!(img.name, format!("images/load-{:02}", s.i));
        assert_eq!(img.virtual_size_bytes, 32 << 20);
        assert_eq!((img.chunk_count, img.zero_chunk_count), (8, 6), "{img:?}");
    }
    let undone = ops
        .list_operations(pb::ListOperationsRequest {
            filter: "done = false".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        undone.operations.is_empty() && undone.next_page_token.is_empty(),
        "operations not done: {:?}",
        undone
            .operations
            .iter()
            .map(|o| &o.name)
            .collect::<Vec<_>>()
    );
    // Each domain's own chunk, and the shared one once.
    assert_eq!(chunk_files(&d.repo).len(), DOMAINS + 1);

    // The order the queue was served in (printed, not asserted: the API promises no order).
    // The daemon logs "capture queued" as it queues each capture; the streams saw when each
    // left QUEUED. Overtaken: how many operations queued after one started before it.
    let queue_order: Vec<usize> = d
        .log_text()
        .lines()
        .filter(|l| l.contains("capture queued"))
        .filter_map(|l| {
            l.split_whitespace()
                .find_map(|w| w.strip_prefix("image=load-"))
        })
        .map(|n| n.parse().unwrap())
        .collect();
    assert_eq!(queue_order.len(), DOMAINS, "{queue_order:?}");
    let queue_rank: HashMap<usize, usize> = queue_order
        .iter()
        .enumerate()
        .map(|(rank, i)| (*i, rank))
        .collect();
    let started: HashMap<usize, Duration> = all
        .iter()
        .map(|s| {
            let at = s.streams.iter().filter_map(|w| w.started_at).min();
            (s.i, at.expect("every operation was seen started"))
        })
        .collect();
    let overtaken = (0..DOMAINS)
        .map(|x| {
            (0..DOMAINS)
                .filter(|y| queue_rank[y] > queue_rank[&x] && started[y] < started[&x])
                .count()
        })
        .max()
        .unwrap();
    let answered = all.iter().map(|s| s.answered_at);
    let answer_span = answered.clone().max().unwrap() - answered.min().unwrap();

    // The clients go: the daemon's descriptors come back to where they started, and its idle
    // blocking threads end (tokio lets them idle 10 s). Up to 4 more threads than at start are
    // not a leak: the health probe's periodic libvirt calls keep a blocking thread or two warm
    // (3 or 4 threads at start, 5 measured after).
    drop(ops);
    drop(channels);
    drop(all);
    let t_close = Instant::now();
    let mut fds_end = open_fds(pid);
    let mut threads_end = threads(pid);
    while (fds_end > fds0 + 2 || threads_end > threads0 + 4)
        && t_close.elapsed() < Duration::from_secs(30)
    {
        tokio::time::sleep(Duration::from_millis(200)).await;
        fds_end = open_fds(pid);
        threads_end = threads(pid);
    }

    eprintln!(
        "load: {DOMAINS} cold captures (2 running at a time) and {streams} WatchOperation \
         streams over {CHANNELS} connections: all done in {elapsed:.1?}"
    );
    eprintln!(
        "load: CaptureImage answered within {answer_span:.1?}, {queued_answers} of them QUEUED; \
         {queued_watched} operations first watched QUEUED; ListOperations showed up to \
         {max_queued} queued and {max_running} running at once; {} streams open at once at \
         the peak; an operation was overtaken in the queue by up to {overtaken} later ones",
        peak_open.load(Ordering::SeqCst)
    );
    eprintln!(
        "load: daemon VmHWM {:.1} MiB; fds {fds0} at start, {peak_fds} at peak, {fds_end} \
         after the clients left; threads {threads0} at start, {peak_threads} at peak, \
         {threads_end} {:.1?} after the run",
        hwm as f64 / (1 << 20) as f64,
        t_close.elapsed()
    );

    assert!(
        max_queued >= DOMAINS / 2,
        "at most {max_queued} operations were seen queued at once"
    );
    // Two run at a time; a third may show PREPARING for an instant, as the daemon hands an
    // ending operation's slot on just before it records that operation's end.
    assert!(
        (1..=3).contains(&max_running),
        "{max_running} operations were seen running at once"
    );
    assert!(hwm < MAX_HWM, "daemon peak RSS {hwm} bytes");
    assert!(
        fds_end <= fds0 + 2,
        "the daemon holds {fds_end} descriptors after the run, {fds0} before: {:?}",
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .filter_map(|e| std::fs::read_link(e.unwrap().path()).ok())
            .collect::<Vec<_>>()
    );
    assert!(
        peak_threads <= MAX_THREADS,
        "the daemon ran {peak_threads} threads at its peak"
    );
    assert!(
        threads_end <= threads0 + 4,
        "the daemon still runs {threads_end} threads, {threads0} at start"
    );
    drop(d);
    drop(doms);
}

/// The last `n` lines of a text.
fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
