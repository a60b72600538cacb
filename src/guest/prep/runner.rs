//! The runner: [`plan`], [`check`], [`apply`] and [`restore`] over a list of steps, driving
//! each through its [`Step`] (see the module doc of [`super`] for what each does). It does what
//! is the same for every step: the plan's diffs, the check's verdicts, backing up and writing
//! the files an inspection edits, the check after an apply, and the all-or-nothing undo: a
//! failed apply undoes that step's part and the steps before it in the same call.

use std::collections::BTreeSet;

use super::io::{GuestIo, BACKUP_ROOT};
use super::steps::{step, Inspection, Step};
use super::text;
use super::{FileChange, OutcomeStatus, PrepStep, StepCheck, StepOutcome, StepPlan};
use crate::error::{Error, ErrorKind, Result};
use crate::guest::agent::GuestAgent;

/// What `step` would do in this guest (Linux or Windows).
fn inspect(io: &GuestIo<'_>, step: &dyn Step) -> Result<Inspection> {
    if io.os.is_windows {
        step.inspect_windows(io)
    } else {
        step.inspect(io)
    }
}

/// The dry run of `steps`: per step, the diffs of the files it would change, its other
/// actions and notes. Changes nothing in the guest.
pub fn plan(agent: &dyn GuestAgent, steps: &[PrepStep]) -> Result<Vec<StepPlan>> {
    let io = GuestIo::new(agent)?;
    steps
        .iter()
        .map(|&id| {
            let w = inspect(&io, step(id))?;
            Ok(StepPlan {
                step: id,
                status: w.status(),
                changes: w
                    .edits
                    .iter()
                    .map(|e| FileChange {
                        path: e.path.clone(),
                        action: e.action(),
                        diff: text::unified_diff(
                            &e.path,
                            e.old.as_deref().map(text::display_text).as_deref(),
                            e.new.as_deref().map(text::display_text).as_deref(),
                        ),
                    })
                    .collect(),
                actions: w.actions(),
                notes: w.notes,
            })
        })
        .collect()
}

/// Whether each step has anything left to do.
pub fn check(agent: &dyn GuestAgent, steps: &[PrepStep]) -> Result<Vec<StepCheck>> {
    let io = GuestIo::new(agent)?;
    steps
        .iter()
        .map(|&id| {
            let w = inspect(&io, step(id))?;
            Ok(StepCheck {
                step: id,
                ok: w.is_empty(),
                status: w.status(),
                problems: w.problems(),
                notes: w.notes,
            })
        })
        .collect()
}

/// The reason of an apply's error when undoing its own changes failed too: the guest may be
/// left partly prepped, so a journaled duty to restore it must stay.
pub const UNDO_FAILED: &str = "PREP_UNDO_FAILED";

/// Called by [`apply_recorded`] before it changes the guest, with the outcomes so far and the
/// step about to change (its mounts taken down, or its backups made) as if it were applied. A
/// caller journals them there, so that a process killed in the middle of an apply leaves a
/// record that [`restore`] can undo from: restoring a change not made yet writes back what is
/// there already. An error stops the apply, which then undoes what it did.
pub type BeforeChange<'a> = &'a mut dyn FnMut(&[StepOutcome]) -> Result<()>;

/// Applies `steps` in order (see the module doc). On failure, everything this call changed is
/// undone before the error is returned.
pub fn apply(agent: &dyn GuestAgent, steps: &[PrepStep]) -> Result<Vec<StepOutcome>> {
    apply_recorded(agent, steps, &mut |_| Ok(()))
}

/// [`apply`], telling `before` what it is about to change before each change.
pub fn apply_recorded(
    agent: &dyn GuestAgent,
    steps: &[PrepStep],
    before: BeforeChange<'_>,
) -> Result<Vec<StepOutcome>> {
    let io = GuestIo::new(agent)?;
    let backup_root = format!("{BACKUP_ROOT}/{}", crate::util::random_id("apply"));
    let mut done: Vec<StepOutcome> = Vec::new();
    for &id in steps {
        match apply_step(
            &io,
            step(id),
            &format!("{backup_root}/{id}"),
            &done,
            &mut *before,
        ) {
            Ok(o) => done.push(o),
            Err(e) => {
                if done.iter().any(|o| o.status == OutcomeStatus::Applied) {
                    if let Err(r) = restore_with(&io, &done) {
                        tracing::error!(
                            domain = io.dom(),
                            error = %e.chain(),
                            undo_error = %r.chain(),
                            "a prep step failed, and undoing the steps before it failed too"
                        );
                        return Err(Error::new(
                            e.kind(),
                            format!("{e}; undoing the steps applied before it failed too"),
                        )
                        .with_reason(UNDO_FAILED)
                        .with_source(r));
                    }
                }
                return Err(e);
            }
        }
    }
    Ok(done)
}

/// `before` told of `done` and `o`.
fn record(before: BeforeChange<'_>, done: &[StepOutcome], o: &StepOutcome) -> Result<()> {
    let mut all = done.to_vec();
    all.push(o.clone());
    before(&all)
}

/// Applies one step, its backups under `backup_root`; on failure, undoes what it did. `before`
/// hears of each change first (see [`BeforeChange`]); `done` are the steps applied before.
fn apply_step(
    io: &GuestIo<'_>,
    step: &dyn Step,
    backup_root: &str,
    done: &[StepOutcome],
    before: BeforeChange<'_>,
) -> Result<StepOutcome> {
    let id = step.id();
    let w = inspect(io, step)?;
    let mut o = StepOutcome {
        step: id,
        status: OutcomeStatus::Unchanged,
        files: Vec::new(),
        unmounted: Vec::new(),
        swaps_off: Vec::new(),
        commands: Vec::new(),
        backup_dir: None,
        notes: w.notes.clone(),
    };
    if !w.applicable {
        o.status = OutcomeStatus::NotApplicable;
        return Ok(o);
    }
    if w.is_empty() {
        return Ok(o);
    }
    o.status = OutcomeStatus::Applied;
    let result = (|| -> Result<()> {
        // 1. What must come down first (swap and mounts on data disks): a busy mount stops
        //    the step before any file changes.
        step.take_down(io, &w, &mut o)?;
        if !o.unmounted.is_empty() || !o.swaps_off.is_empty() {
            record(&mut *before, done, &o)?;
        }
        // 2. Backups of every file, checked; the duty to restore them is recorded before any
        //    file changes.
        if !w.edits.is_empty() {
            o.backup_dir = Some(backup_root.to_string());
        }
        o.files = io.back_up(&w.edits, backup_root)?;
        record(&mut *before, done, &o)?;
        // 3. The changes.
        for e in &w.edits {
            match &e.new {
                Some(bytes) => io.agent.write_file(&e.path, bytes, None)?,
                None => io.agent.remove_file(&e.path)?,
            }
        }
        // 4. Commands (Windows).
        step.run_commands(io, &w, &mut o)?;
        // 5. The check.
        let after = inspect(io, step)?;
        if !after.is_empty() && !io.os.is_windows {
            return Err(Error::new(
                ErrorKind::Internal,
                format!(
                    "{id} in domain {}: the check after applying still finds work: {}",
                    io.dom(),
                    after.problems().join("; ")
                ),
            ));
        }
        Ok(())
    })();
    match result {
        Ok(()) => Ok(o),
        Err(e) => {
            // Undo this step's part.
            if let Err(r) = restore_with(io, std::slice::from_ref(&o)) {
                tracing::error!(domain = io.dom(), step = %id, error = %e.chain(),
                    undo_error = %r.chain(), "a prep step failed, and undoing it failed too");
                return Err(Error::new(
                    e.kind(),
                    format!("{e}; undoing what the step had done failed too"),
                )
                .with_reason(UNDO_FAILED)
                .with_source(r));
            }
            Err(e)
        }
    }
}

/// Undoes applied steps (see the module doc): files first, then mounts and swap, in reverse
/// step order; the backups are removed when everything came back. Every part is attempted;
/// the first failure is returned (naming how many parts failed), the others are logged.
pub fn restore(agent: &dyn GuestAgent, outcomes: &[StepOutcome]) -> Result<()> {
    restore_with(&GuestIo::without_os_facts(agent), outcomes)
}

fn restore_with(io: &GuestIo<'_>, outcomes: &[StepOutcome]) -> Result<()> {
    let mut errors: Vec<Error> = Vec::new();
    for o in outcomes.iter().rev() {
        if o.status != OutcomeStatus::Applied {
            continue;
        }
        for f in o.files.iter().rev() {
            if let Err(e) = io.restore_file(f) {
                errors.push(e);
            }
        }
        step(o.step).undo(io, o, &mut errors);
    }
    if errors.is_empty() {
        let dirs: BTreeSet<&str> = outcomes
            .iter()
            .filter_map(|o| o.backup_dir.as_deref())
            .filter(|d| d.starts_with(BACKUP_ROOT) && !d.contains("/../"))
            .collect();
        for d in dirs {
            io.remove_backups(d);
        }
        return Ok(());
    }
    let n = errors.len();
    for e in &errors[1..] {
        tracing::error!(domain = io.dom(), error = %e.chain(), "restoring a prep change failed");
    }
    let first = errors.remove(0);
    if n == 1 {
        return Err(first);
    }
    Err(Error::new(
        first.kind(),
        format!(
            "restoring the prep changes in domain {} failed in {n} places (the first below, the \
             others in the log)",
            io.dom()
        ),
    )
    .with_source(first))
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};
    use std::sync::Mutex;
    use std::time::Duration;

    use super::*;
    use crate::guest::agent::{ExecOutput, NetInterface, OsInfo};
    use crate::guest::prep::PlanStatus;

    const RC: &str = "#!/bin/sh\nrunlevel_scripts\nexit 0\n";
    const FSTAB: &str = "/dev/vda1 / ext4 defaults 0 1\n/dev/vdb1 /mnt/data ext4 defaults 0 2\n";
    const LSBLK: &str = r#"{"blockdevices": [
      {"name":"vda","kname":"vda","pkname":null,"type":"disk","mountpoint":null,"children":[
        {"name":"vda1","kname":"vda1","pkname":"vda","type":"part","mountpoint":"/"}]},
      {"name":"vdb","kname":"vdb","pkname":null,"type":"disk","mountpoint":null,"children":[
        {"name":"vdb1","kname":"vdb1","pkname":"vdb","type":"part","mountpoint":"/mnt/data"}]}
    ]}"#;

    /// A Linux guest in memory: its files, what is mounted, and the few programs the steps
    /// run (`sh` scripts recognised by what they do). One write can be made to fail.
    struct FakeLinux {
        files: Mutex<BTreeMap<String, Vec<u8>>>,
        mounted: Mutex<BTreeSet<String>>,
        fail_write: Mutex<Option<String>>,
        ran: Mutex<Vec<String>>,
    }

    impl FakeLinux {
        fn new() -> FakeLinux {
            let files = [("/etc/init.d/rc", RC), ("/etc/fstab", FSTAB)]
                .map(|(p, t)| (p.to_string(), t.as_bytes().to_vec()));
            FakeLinux {
                files: Mutex::new(files.into_iter().collect()),
                mounted: Mutex::new(["/", "/mnt/data"].map(String::from).into()),
                fail_write: Mutex::new(None),
                ran: Mutex::new(Vec::new()),
            }
        }

        fn file(&self, path: &str) -> Option<String> {
            let files = self.files.lock().unwrap();
            files
                .get(path)
                .map(|b| String::from_utf8_lossy(b).into_owned())
        }

        fn backups_left(&self) -> Vec<String> {
            let files = self.files.lock().unwrap();
            files
                .keys()
                .filter(|k| k.starts_with("/run/"))
                .cloned()
                .collect()
        }

        fn sh(&self, script: &str, args: &[&str]) -> (i32, String) {
            let mut files = self.files.lock().unwrap();
            if script.contains("setpasswd.sh") {
                let mut out: String = args
                    .iter()
                    .map(|a| match files.contains_key(*a) {
                        true => format!("{a}\n"),
                        false => "\n".into(),
                    })
                    .collect();
                out.push_str("no\n");
                (0, out)
            } else if script.contains("readlink -f") {
                (0, args.iter().map(|a| format!("{a}\t{a}\n")).collect())
            } else if script.starts_with("set -e; umask 077") {
                for pair in args[1..].chunks(2) {
                    let copy = files[pair[0]].clone();
                    files.insert(format!("{}{}", args[0], pair[0]), copy);
                }
                (0, String::new())
            } else if script.starts_with("rm -rf") {
                files.retain(|k, _| !k.starts_with(args[0]));
                (0, String::new())
            } else {
                (127, String::new())
            }
        }
    }

    impl GuestAgent for FakeLinux {
        fn domain(&self) -> &str {
            "lin1"
        }
        fn ping(&self) -> Result<()> {
            Ok(())
        }
        fn os_info(&self) -> Result<OsInfo> {
            Ok(OsInfo {
                id: "debian".into(),
                name: "Debian GNU/Linux".into(),
                version_id: "12".into(),
                kernel: "6.1.0".into(),
                is_windows: false,
            })
        }
        fn network_interfaces(&self) -> Result<Vec<NetInterface>> {
            Ok(Vec::new())
        }
        fn exec(&self, argv: &[&str], _: Option<&[u8]>, _: Duration) -> Result<ExecOutput> {
            self.ran.lock().unwrap().push(argv.join(" "));
            let mut mounted = self.mounted.lock().unwrap();
            let (exit_code, stdout) = match argv {
                ["sh", "-c", script, "sh", args @ ..] => self.sh(script, args),
                ["lsblk", "-J", ..] => (0, LSBLK.to_string()),
                ["findmnt", "-J"] => {
                    let dev = |t: &str| if t == "/" { "/dev/vda1" } else { "/dev/vdb1" };
                    let list: Vec<String> = mounted
                        .iter()
                        .map(|t| {
                            format!(
                                r#"{{"target":"{t}","source":"{}","fstype":"ext4","options":"rw"}}"#,
                                dev(t)
                            )
                        })
                        .collect();
                    (0, format!(r#"{{"filesystems":[{}]}}"#, list.join(",")))
                }
                ["umount", t] => (i32::from(!mounted.remove(*t)), String::new()),
                ["mountpoint", "-q", t] => (i32::from(!mounted.contains(*t)), String::new()),
                ["mount", "-t", _, "-o", _, _, t] => {
                    (i32::from(!mounted.insert(t.to_string())), String::new())
                }
                _ => (127, String::new()),
            };
            Ok(ExecOutput {
                exit_code,
                signal: None,
                stdout: stdout.into_bytes(),
                stderr: Vec::new(),
            })
        }
        fn read_file(&self, path: &str) -> Result<Option<Vec<u8>>> {
            Ok(self.files.lock().unwrap().get(path).cloned())
        }
        fn write_file(&self, path: &str, data: &[u8], _: Option<u32>) -> Result<()> {
            let mut fail = self.fail_write.lock().unwrap();
            if fail.as_deref() == Some(path) {
                *fail = None;
                return Err(Error::new(ErrorKind::Unavailable, "the agent went away"));
            }
            self.files
                .lock()
                .unwrap()
                .insert(path.to_string(), data.to_vec());
            Ok(())
        }
        fn remove_file(&self, path: &str) -> Result<()> {
            self.files.lock().unwrap().remove(path);
            Ok(())
        }
        fn list_dir(&self, _: &str) -> Result<Vec<String>> {
            Ok(Vec::new())
        }
        fn rename(&self, _: &str, _: &str) -> Result<()> {
            unreachable!("the steps rename nothing")
        }
    }

    const STEPS: [PrepStep; 2] = [PrepStep::SetpasswdHook, PrepStep::FstabDataDisks];

    #[test]
    fn apply_check_and_restore_on_linux() {
        let g = FakeLinux::new();
        let plans = plan(&g, &STEPS).unwrap();
        assert!(
            plans.iter().all(|p| p.status == PlanStatus::Changes),
            "{plans:?}"
        );
        assert_eq!(plans[1].actions, ["unmount /mnt/data (/dev/vdb1, ext4)"]);
        let outcomes = apply(&g, &STEPS).unwrap();
        assert!(outcomes.iter().all(|o| o.status == OutcomeStatus::Applied));
        assert!(g
            .file("/etc/init.d/rc")
            .unwrap()
            .contains("sh /etc/init.d/setpasswd.sh"));
        assert_eq!(
            g.file("/etc/fstab").unwrap(),
            "/dev/vda1 / ext4 defaults 0 1\n"
        );
        assert!(!g.mounted.lock().unwrap().contains("/mnt/data"));
        assert!(check(&g, &STEPS).unwrap().iter().all(|c| c.ok));
        restore(&g, &outcomes).unwrap();
        assert_eq!(g.file("/etc/init.d/rc").unwrap(), RC);
        assert_eq!(g.file("/etc/fstab").unwrap(), FSTAB);
        assert!(g.mounted.lock().unwrap().contains("/mnt/data"));
        assert_eq!(g.backups_left(), Vec::<String>::new());
    }

    /// Every change is announced before it is made, with backups a restore can work from: a
    /// process killed right after any announcement leaves a record that puts the guest back.
    #[test]
    fn each_change_is_recorded_before_it_is_made_and_the_record_restores() {
        let g = FakeLinux::new();
        let mut records: Vec<Vec<StepOutcome>> = Vec::new();
        let mut seen_before: Vec<(String, String)> = Vec::new();
        let outcomes = apply_recorded(&g, &STEPS, &mut |so_far| {
            // Nothing the last announced step edits has changed yet.
            let cur = so_far.last().unwrap();
            for f in &cur.files {
                seen_before.push((f.path.clone(), g.file(&f.path).unwrap_or_default()));
            }
            records.push(so_far.to_vec());
            Ok(())
        })
        .unwrap();
        assert!(seen_before.contains(&("/etc/init.d/rc".to_string(), RC.to_string())));
        assert!(seen_before.contains(&("/etc/fstab".to_string(), FSTAB.to_string())));
        // The last record holds every applied file with its backup, as the final outcomes do.
        let last = records.last().unwrap();
        let files = |v: &[StepOutcome]| -> Vec<String> {
            v.iter()
                .flat_map(|o| o.files.iter().map(|f| f.path.clone()))
                .collect()
        };
        assert_eq!(files(last), files(&outcomes));
        // A "kill" after the first record: restoring from it leaves the guest as it was.
        let g2 = FakeLinux::new();
        let mut first: Option<Vec<StepOutcome>> = None;
        let _ = apply_recorded(&g2, &STEPS, &mut |so_far| {
            if first.is_none() && so_far.iter().any(|o| !o.files.is_empty()) {
                first = Some(so_far.to_vec());
            }
            Ok(())
        })
        .unwrap();
        // The apply went on to the end; restoring only what was recorded first restores those
        // files (a change announced is undone whether or not it was made).
        restore(&g2, first.as_deref().unwrap()).unwrap();
        let rec = first.unwrap();
        for o in &rec {
            for f in &o.files {
                let want = if f.path == "/etc/init.d/rc" {
                    RC
                } else {
                    FSTAB
                };
                if f.path == "/etc/init.d/rc" || f.path == "/etc/fstab" {
                    assert_eq!(g2.file(&f.path).unwrap(), want, "{}", f.path);
                }
            }
        }
        // An error from the record stops the apply, which undoes itself.
        let g3 = FakeLinux::new();
        let e = apply_recorded(&g3, &STEPS, &mut |_| {
            Err(crate::error::internal("journal full"))
        })
        .unwrap_err();
        assert!(e.to_string().contains("journal full"), "{e}");
        assert_eq!(g3.file("/etc/init.d/rc").unwrap(), RC);
        assert_eq!(g3.file("/etc/fstab").unwrap(), FSTAB);
        assert!(g3.mounted.lock().unwrap().contains("/mnt/data"));
    }

    #[test]
    fn a_failed_step_undoes_itself_and_the_steps_before_it() {
        let g = FakeLinux::new();
        *g.fail_write.lock().unwrap() = Some("/etc/fstab".into());
        let e = apply(&g, &STEPS).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Unavailable, "{e}");
        assert_eq!(g.file("/etc/init.d/rc").unwrap(), RC);
        assert_eq!(g.file("/etc/fstab").unwrap(), FSTAB);
        assert!(g.mounted.lock().unwrap().contains("/mnt/data"));
        assert_eq!(g.backups_left(), Vec::<String>::new());
        let ran = g.ran.lock().unwrap();
        let umount = ran.iter().position(|c| c == "umount /mnt/data").unwrap();
        let mount = ran
            .iter()
            .position(|c| c == "mount -t ext4 -o rw /dev/vdb1 /mnt/data")
            .unwrap();
        assert!(umount < mount, "{ran:?}");
    }
}
