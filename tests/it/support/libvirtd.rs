//! The host's libvirtd as a shared resource of the test binary: the [`shared`]/[`exclusive`]
//! lock that keeps a test which stops libvirtd away from every other test that uses it, and
//! [`Outage`], which stops (SIGTERM) or kills (SIGKILL) libvirtd and starts it again.
//!
//! # The lock
//!
//! Every test that uses libvirt holds the lock shared, without asking for it: a lab [`Guest`]
//! takes it when it is created and keeps it until it is dropped (its domain is undefined),
//! [`Lab::get`] takes it while it sets the lab up, and a [`Daemon`] takes it for its whole life
//! unless its config names another libvirt URI than the lab's (every daemon talks to libvirt:
//! its health reports DomainService, its journal recovery calls libvirt). A test that stops
//! libvirtd takes it exclusively with [`exclusive`], first thing, before any guest or daemon.
//!
//! Deadlocks are ruled out by three rules:
//! - writers are preferred (a waiting exclusive request holds new shared requests back, so the
//!   restart tests are not starved by a stream of ordinary tests), *except* for a thread that
//!   already holds the lock shared: its further shared requests (a daemon started after its
//!   guest) are granted at once. Otherwise a test holding shared would wait for a writer that
//!   waits for that very test.
//! - the thread holding it exclusively gets any shared request as a no-op (a restart test makes
//!   guests and daemons like any other test);
//! - asking for it exclusively while holding it shared panics at once (that upgrade would
//!   wait forever).
//!
//! Ownership is per thread (the test's own thread: `#[tokio::test]` runs the test body there),
//! so guests and daemons are made on the test's thread, as every test does. A shared request
//! that waits longer than [`SHARED_WAIT_LIMIT`] panics describing the lock instead of hanging.
//!
//! [`Guest`]: super::lab::Guest
//! [`Lab::get`]: super::lab::Lab::get
//! [`Daemon`]: super::daemon::Daemon

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::thread::{sleep, ThreadId};
use std::time::{Duration, Instant};

use super::lab::virsh;

/// How long a shared request may wait (the restart tests together take well under this).
pub const SHARED_WAIT_LIMIT: Duration = Duration::from_secs(80 * 60);

#[derive(Debug)]
struct State {
    /// The thread holding the lock exclusively, and its test's name.
    writer: Option<(ThreadId, String)>,
    /// Exclusive requests waiting.
    writers_waiting: usize,
    /// Shared holds per thread (threads with none are not listed).
    readers: Vec<(ThreadId, usize)>,
}

impl State {
    fn held_by(&self, id: ThreadId) -> usize {
        self.readers
            .iter()
            .find(|r| r.0 == id)
            .map(|r| r.1)
            .unwrap_or(0)
    }
}

/// A readers-writer lock between tests with the rules of the module doc. [`LIBVIRT`] is the
/// one instance that guards libvirtd; the `restarts` module tests the rules on private ones.
#[derive(Debug)]
pub struct TestLock {
    state: Mutex<State>,
    changed: Condvar,
}

/// The lock that guards the host's libvirtd.
pub static LIBVIRT: TestLock = TestLock::new();

/// A shared hold of a [`TestLock`]; released on drop.
#[derive(Debug)]
pub struct Shared {
    lock: &'static TestLock,
    /// The thread counted as holding it; `None` when the holder's exclusive hold covers it.
    thread: Option<ThreadId>,
}

/// The exclusive hold of a [`TestLock`]; released on drop.
#[derive(Debug)]
pub struct Exclusive {
    lock: &'static TestLock,
}

fn me() -> (ThreadId, String) {
    let t = std::thread::current();
    (t.id(), t.name().unwrap_or("unnamed thread").to_string())
}

impl TestLock {
    pub const fn new() -> TestLock {
        TestLock {
            state: Mutex::new(State {
                writer: None,
                writers_waiting: 0,
                readers: Vec::new(),
            }),
            changed: Condvar::new(),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A test that panicked while holding the mutex left consistent counts (every change is
        // one statement); keep going.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn wait<'a>(&self, st: MutexGuard<'a, State>) -> MutexGuard<'a, State> {
        self.changed
            .wait_timeout(st, Duration::from_millis(500))
            .unwrap_or_else(|e| e.into_inner())
            .0
    }

    /// Takes the lock shared (see the module doc): at once when this thread already holds it,
    /// else once no test holds it exclusively or waits to. Panics after `limit`.
    pub fn shared_within(&'static self, limit: Duration) -> Shared {
        let (id, name) = me();
        let mut st = self.state();
        if st.writer.as_ref().map(|w| w.0) == Some(id) {
            return Shared {
                lock: self,
                thread: None,
            };
        }
        let t0 = Instant::now();
        loop {
            let mine = st.held_by(id) > 0;
            if st.writer.is_none() && (st.writers_waiting == 0 || mine) {
                match st.readers.iter_mut().find(|r| r.0 == id) {
                    Some(r) => r.1 += 1,
                    None => st.readers.push((id, 1)),
                }
                return Shared {
                    lock: self,
                    thread: Some(id),
                };
            }
            let waited = t0.elapsed();
            if waited >= limit {
                panic!(
                    "test {name} waited {waited:?} for the libvirt lock (shared): {st:?}; a test \
                     holding it exclusively never let go, or a guest or daemon was made off its \
                     test's thread while a restart test waited"
                );
            }
            st = self.wait(st);
        }
    }

    /// Takes the lock exclusively: waits until no other test holds it. Panics when this thread
    /// holds it already (shared: the upgrade could never be granted; exclusive: not
    /// reentrant).
    pub fn exclusive(&'static self) -> Exclusive {
        let (id, name) = me();
        let mut st = self.state();
        let held = st.held_by(id);
        assert_eq!(
            held, 0,
            "test {name} holds the libvirt lock shared ({held} guest(s)/daemon(s)) and asked for \
             it exclusively: that would wait forever; take it exclusively before making guests \
             or daemons"
        );
        assert!(
            st.writer.as_ref().map(|w| w.0) != Some(id),
            "test {name} already holds the libvirt lock exclusively"
        );
        st.writers_waiting += 1;
        let t0 = Instant::now();
        while st.writer.is_some() || !st.readers.is_empty() {
            st = self.wait(st);
        }
        st.writers_waiting -= 1;
        st.writer = Some((id, name.clone()));
        let waited = t0.elapsed();
        if waited > Duration::from_secs(1) {
            eprintln!("libvirt lock: {name} waited {waited:.1?} for exclusive use");
        }
        Exclusive { lock: self }
    }

    /// Exclusive requests now waiting.
    pub fn writers_waiting(&self) -> usize {
        self.state().writers_waiting
    }
}

impl Default for TestLock {
    fn default() -> Self {
        TestLock::new()
    }
}

/// Takes [`LIBVIRT`] shared (waits at most [`SHARED_WAIT_LIMIT`]).
pub fn shared() -> Shared {
    LIBVIRT.shared_within(SHARED_WAIT_LIMIT)
}

/// Takes [`LIBVIRT`] exclusively.
pub fn exclusive() -> Exclusive {
    LIBVIRT.exclusive()
}

impl Drop for Shared {
    fn drop(&mut self) {
        if let Some(id) = self.thread {
            let mut st = self.lock.state();
            if let Some(r) = st.readers.iter_mut().find(|r| r.0 == id) {
                r.1 -= 1;
            }
            st.readers.retain(|r| r.1 > 0);
            self.lock.changed.notify_all();
        }
    }
}

impl Drop for Exclusive {
    fn drop(&mut self) {
        let mut st = self.lock.state();
        st.writer = None;
        self.lock.changed.notify_all();
    }
}

// ------------------------------------------------------------------------------ libvirtd

/// The pid of the running libvirtd (`pgrep -x libvirtd`), if any.
pub fn pid() -> Option<u32> {
    let out = Command::new("pgrep")
        .args(["-x", "libvirtd"])
        .stdin(Stdio::null())
        .output()
        .expect("running pgrep (procps)");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .find(|p| alive(*p))
}

/// True while `pid` runs (a zombie nobody reaped yet counts as gone).
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name.
        Ok(stat) => stat
            .rsplit_once(')')
            .map(|(_, rest)| !rest.trim_start().starts_with(['Z', 'X']))
            .unwrap_or(false),
        Err(_) => false,
    }
}

/// True when `virsh -c qemu:///system list` answers.
pub fn answers() -> bool {
    virsh(&["list"]).is_ok()
}

/// Starts libvirtd (and virtlogd) with tests/lab/start-libvirt.sh unless it runs, then waits
/// up to 60 s until `virsh list` answers. Panics saying what failed.
pub fn start() {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/lab/start-libvirt.sh");
    let out = Command::new(&script)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
    assert!(
        out.status.success(),
        "{} failed ({}): {}{}",
        script.display(),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let t0 = Instant::now();
    while !answers() {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "expected `virsh -c qemu:///system list` to answer within 60 s of starting libvirtd; \
             it does not (libvirtd pid {:?})",
            pid()
        );
        sleep(Duration::from_millis(250));
    }
}

/// How libvirtd is brought down.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// SIGTERM: libvirtd shuts down in order.
    Term,
    /// SIGKILL: libvirtd dies on the spot.
    Kill,
}

/// libvirtd brought down by a test: [`Outage::begin`] stops it and waits until it is gone;
/// [`Outage::end`] (or the drop, also when the test panics) starts it again. Only under
/// [`exclusive`].
#[derive(Debug)]
pub struct Outage {
    ended: bool,
    started: Instant,
}

impl Outage {
    /// Stops the running libvirtd with `how` and waits (up to 60 s) until the process is gone.
    /// Panics when no libvirtd runs.
    pub fn begin(lock: &Exclusive, how: Stop) -> Outage {
        assert!(
            std::ptr::eq(lock.lock, &LIBVIRT),
            "an outage of libvirtd needs the libvirt lock (LIBVIRT) held exclusively"
        );
        let pid = pid().expect(
            "expected a running libvirtd to stop (`pgrep -x libvirtd` found none): the lab starts \
             it with tests/lab/start-libvirt.sh",
        );
        let sig = match how {
            Stop::Term => libc::SIGTERM,
            Stop::Kill => libc::SIGKILL,
        };
        // SAFETY: kill(2) on a pid pgrep just reported; no memory is involved.
        let rc = unsafe { libc::kill(pid as i32, sig) };
        assert_eq!(
            rc,
            0,
            "kill({pid}, {how:?}) failed: {}",
            std::io::Error::last_os_error()
        );
        let outage = Outage {
            ended: false,
            started: Instant::now(),
        };
        let t0 = Instant::now();
        while alive(pid) {
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "expected libvirtd (pid {pid}) to exit within 60 s of {how:?}; it still runs"
            );
            sleep(Duration::from_millis(50));
        }
        eprintln!(
            "libvirtd: pid {pid} stopped ({how:?}) in {:.1?}",
            t0.elapsed()
        );
        outage
    }

    /// Starts libvirtd again; returns how long it was down.
    pub fn end(mut self) -> Duration {
        self.ended = true;
        start();
        let down = self.started.elapsed();
        eprintln!(
            "libvirtd: running again (pid {:?}) after {down:.1?} down",
            pid()
        );
        down
    }
}

impl Drop for Outage {
    fn drop(&mut self) {
        if !self.ended {
            // Never leave the host without libvirtd, whatever the test did.
            if std::panic::catch_unwind(start).is_err() {
                eprintln!("libvirtd: could not be started again; run tests/lab/start-libvirt.sh");
            }
        }
    }
}
