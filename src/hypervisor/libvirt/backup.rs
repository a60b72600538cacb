//! Pull-mode backup jobs through libvirt: `virDomainBackupBegin` with `<domainbackup
//! mode='pull'>` makes QEMU export one disk over NBD on a unix socket, frozen at the moment the
//! job began (copy-before-write into a scratch file); `virDomainAbortJob` ends it.
//!
//! QEMU creates the socket and the scratch file itself, as the user libvirt runs it as (`user`
//! in `/etc/libvirt/qemu.conf`; by default `libvirt-qemu` on Debian, `qemu` on RHEL and SUSE), so
//! each backup gets its own directory, mode 0700, owned by that user. When that user cannot be
//! found the capture is refused: a directory anyone could write would let a local user replace
//! the NBD socket and feed chosen bytes into the image.
//!
//! Only our own job is ever ended: the one exporting on our socket. A job another tool began
//! is left running, and ending it is refused with FAILED_PRECONDITION naming it.

use std::ffi::CString;
use std::path::Path;

use virt::domain::Domain;
use virt::enumutil::Enum;
use virt::error::ErrorNumber;

use super::{checkpoint, libvirt_err};
use crate::error::{Error, ErrorKind, Result};
use crate::hypervisor::{xml, BackupBegun, BackupHandle, CheckpointPlan};

/// libvirt's QEMU driver configuration, where the user QEMU runs as is set.
const QEMU_CONF: &str = "/etc/libvirt/qemu.conf";
/// The users libvirt runs QEMU as when `qemu.conf` names none: Debian's, then RHEL's and SUSE's.
const DEFAULT_QEMU_USERS: [&str; 2] = ["libvirt-qemu", "qemu"];

/// Backup XML for a pull-mode backup of `disk` (others excluded), of the changes since
/// checkpoint `since` when given.
pub fn backup_xml(dir: &Path, disk: &str, other_disks: &[String], since: Option<&str>) -> String {
    let esc = xml::escape;
    let incremental = since
        .map(|c| format!("  <incremental>{}</incremental>\n", esc(c)))
        .unwrap_or_default();
    let mut x = format!(
        "<domainbackup mode='pull'>\n{incremental}  <server transport='unix' socket='{}'/>\n  <disks>\n    \
         <disk name='{}' backup='yes' type='file'><scratch file='{}'/></disk>\n",
        esc(&dir.join("nbd.sock").to_string_lossy()),
        esc(disk),
        esc(&dir.join("scratch.qcow2").to_string_lossy())
    );
    for d in other_disks.iter().filter(|d| d.as_str() != disk) {
        x.push_str(&format!("    <disk name='{}' backup='no'/>\n", esc(d)));
    }
    x.push_str("  </disks>\n</domainbackup>\n");
    x
}

/// Creates the job's directory `dir` (anew), mode 0700, owned by the user and group QEMU runs
/// as; its parent is made traversable by that user.
pub(super) fn job_dir(dir: &Path) -> Result<()> {
    let conf = std::fs::read_to_string(QEMU_CONF).unwrap_or_default();
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    let group = std::fs::read_to_string("/etc/group").unwrap_or_default();
    let (uid, gid) = qemu_ids(&conf, &passwd, &group)?;
    let run_dir = dir.parent().unwrap_or(Path::new("/"));
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(run_dir)
        .map_err(|e| Error::io(format!("creating run directory {}", run_dir.display()), e))?;
    {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(dir)
            .map_err(|e| Error::io(format!("creating backup directory {}", dir.display()), e))?;
    }
    std::os::unix::fs::chown(dir, Some(uid), Some(gid)).map_err(|e| {
        Error::io(
            format!("handing backup directory {} to QEMU", dir.display()),
            e,
        )
    })?;
    // The parent must be traversable (not listable, not writable) by QEMU's user.
    use std::os::unix::fs::PermissionsExt;
    if let Ok(md) = std::fs::metadata(run_dir) {
        let mode = md.permissions().mode();
        if mode & 0o001 == 0 {
            let _ =
                std::fs::set_permissions(run_dir, std::fs::Permissions::from_mode(mode | 0o001));
        }
    }
    Ok(())
}

/// The uid and gid QEMU runs as, from the texts of `qemu.conf`, `/etc/passwd` and `/etc/group`:
/// `user`/`group` when `qemu.conf` sets them (a name, or `+N` for a number), else the first of
/// `DEFAULT_QEMU_USERS` (`libvirt-qemu`, then `qemu`) that exists, with its primary group.
/// FAILED_PRECONDITION when none can be found.
pub fn qemu_ids(conf: &str, passwd: &str, group: &str) -> Result<(u32, u32)> {
    let setting = |key: &str| {
        conf.lines().find_map(|l| {
            let l = l.trim();
            let (k, v) = l.split_once('=')?;
            (k.trim() == key).then(|| v.trim().trim_matches('"').to_string())
        })
    };
    let user_entry = |name: &str| -> Option<(u32, u32)> {
        passwd.lines().find_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            (f.len() > 3 && f[0] == name).then(|| Some((f[2].parse().ok()?, f[3].parse().ok()?)))?
        })
    };
    let unknown = |what: String| {
        Error::new(
            ErrorKind::FailedPrecondition,
            format!(
                "cannot tell which user QEMU runs as: {what}; set `user` and `group` in {QEMU_CONF} \
                 to the user libvirt runs QEMU as"
            ),
        )
    };
    let (uid, primary_gid) = match setting("user") {
        Some(u) => match u.strip_prefix('+') {
            Some(n) => {
                let uid: u32 = n
                    .parse()
                    .map_err(|_| unknown(format!("{QEMU_CONF} sets user = \"{u}\"")))?;
                let gid = passwd
                    .lines()
                    .find_map(|l| {
                        let f: Vec<&str> = l.split(':').collect();
                        (f.len() > 3 && f[2] == n).then(|| f[3].parse().ok())?
                    })
                    .unwrap_or(uid);
                (uid, gid)
            }
            None => user_entry(&u).ok_or_else(|| {
                unknown(format!(
                    "{QEMU_CONF} sets user = \"{u}\", which is not a user of this host"
                ))
            })?,
        },
        None => DEFAULT_QEMU_USERS
            .iter()
            .find_map(|u| user_entry(u))
            .ok_or_else(|| {
                unknown(format!(
                    "{QEMU_CONF} sets no user and none of {} exists",
                    DEFAULT_QEMU_USERS.join(", ")
                ))
            })?,
    };
    let gid = match setting("group") {
        None => primary_gid,
        Some(g) => match g.strip_prefix('+') {
            Some(n) => n
                .parse()
                .map_err(|_| unknown(format!("{QEMU_CONF} sets group = \"{g}\"")))?,
            None => group
                .lines()
                .find_map(|l| {
                    let f: Vec<&str> = l.split(':').collect();
                    (f.len() > 2 && f[0] == g).then(|| f[2].parse().ok())?
                })
                .ok_or_else(|| {
                    unknown(format!(
                        "{QEMU_CONF} sets group = \"{g}\", which is not a group of this host"
                    ))
                })?,
        },
    };
    Ok((uid, gid))
}

/// Begins the pull-mode backup job of `backup` on `dom` (named `name`); the domain's other
/// disks (`disks`) are left out of it. The checkpoints of `plan` are had when they can be:
/// an earlier checkpoint is defined again from its saved XML for an incremental job; when
/// libvirt says it is gone or its bitmap broken, the job is begun full; when no checkpoint can
/// be made on the disk (not qcow2, a qcow2 v2 image, an old QEMU), it is begun without one.
/// Each such fallback leaves a note in the answer.
pub(super) fn begin(
    dom: &Domain,
    name: &str,
    backup: &BackupHandle,
    disks: &[String],
    plan: &CheckpointPlan,
) -> Result<BackupBegun> {
    let disk = backup.export.as_str();
    let mut out = BackupBegun::default();
    let mut since = None;
    if let Some(saved) = &plan.since {
        // A record left by a capture that died is replaced by the saved one.
        checkpoint::delete(dom, name, &saved.name, true)?;
        match checkpoint::redefine(dom, &saved.xml) {
            Ok(()) => since = Some(saved.name.clone()),
            Err(why) => out.notes.push(format!(
                "checkpoint {} of disk {disk} could not be defined again ({why}), so the whole disk is read",
                saved.name
            )),
        }
    }
    let mut create = plan.create.clone();
    let nul = |what: &str| crate::error::invalid(format!("{what} XML holds a NUL byte"));
    loop {
        let bx = CString::new(backup_xml(&backup.dir, disk, disks, since.as_deref()))
            .map_err(|_| nul("backup"))?;
        let cx = match create.as_deref() {
            Some(c) => {
                Some(CString::new(checkpoint::create_xml(c, disk)).map_err(|_| nul("checkpoint"))?)
            }
            None => None,
        };
        let Err(e) = begin_job(dom, &bx, cx.as_deref()) else {
            out.checkpoint = create;
            out.since = since;
            return Ok(out);
        };
        let gone = matches!(
            e.code(),
            Enum::Known(ErrorNumber::NoDomainCheckpoint)
                | Enum::Known(ErrorNumber::CheckpointInconsistent)
        );
        if gone {
            if let Some(old) = since.take() {
                out.notes.push(format!(
                    "the changes since checkpoint {old} of disk {disk} cannot be told ({}), so the whole disk is read",
                    e.message()
                ));
                // Its record (defined just now) goes; so does its bitmap, broken anyway.
                if let Err(e) = checkpoint::delete(dom, name, &old, false) {
                    tracing::warn!(domain = name, checkpoint = %old, error = %e.chain(), "could not delete a broken checkpoint");
                }
                continue;
            }
        }
        // The earlier checkpoint's record, defined for this job, goes (its bitmap stays).
        if let Some(old) = since.take() {
            let _ = checkpoint::delete(dom, name, &old, true);
        }
        if let Some(new) = create.take() {
            // Some checkpoint could not be made (a raw disk, a qcow2 v2 image, a QEMU without
            // persistent bitmaps): the job without one. An error that was not about
            // checkpoints comes back from that attempt too.
            out.notes.push(format!(
                "no checkpoint could be made on disk {disk} ({}), so later captures read the whole disk too",
                e.message()
            ));
            let _ = checkpoint::delete(dom, name, &new, false);
            continue;
        }
        return Err(libvirt_err(
            format!("beginning a backup job on domain {name}"),
            e,
        ));
    }
}

/// One `virDomainBackupBegin` call; libvirt's error as is.
fn begin_job(
    dom: &Domain,
    backup_xml: &std::ffi::CStr,
    checkpoint_xml: Option<&std::ffi::CStr>,
) -> std::result::Result<(), virt::error::Error> {
    let bx = backup_xml;
    let cp = checkpoint_xml.map_or(std::ptr::null(), |c| c.as_ptr());
    // SAFETY: `dom` is live; both strings are NUL-terminated and outlive the call; a null
    // checkpoint pointer means "no checkpoint", as libvirt documents.
    let rc = unsafe { virt::sys::virDomainBackupBegin(dom.as_ptr(), bx.as_ptr(), cp, 0) };
    if rc < 0 {
        return Err(virt::error::Error::last_error());
    }
    Ok(())
}

/// Ends the domain's pull-mode backup job if it is the one exporting on `backup`'s socket
/// (ours), and returns once the job is gone (QEMU tears it down after the abort returns); Ok
/// when no backup job runs. Another job: FAILED_PRECONDITION naming it, left running.
pub(super) fn end(dom: &Domain, name: &str, backup: &BackupHandle) -> Result<()> {
    let socket = backup.socket.as_path();
    let Some(xml) = job_xml(dom, name)? else {
        // No backup job: nothing to end (whatever other job may run is not ours).
        return Ok(());
    };
    let ours = xml::backup_socket(&xml).is_some_and(|s| Path::new(&s) == socket);
    if !ours {
        return Err(Error::new(
                ErrorKind::FailedPrecondition,
                format!(
                    "domain {name} runs a backup job that imaged did not start (its export is not {}); \
                     it is left alone: end it with `virsh domjobabort {name}` if it is stale",
                    socket.display()
                ),
            ));
    }
    // SAFETY: `dom` is live for the call.
    let rc = unsafe { virt::sys::virDomainAbortJob(dom.as_ptr()) };
    if rc < 0 {
        let e = virt::error::Error::last_error();
        if e.code() != Enum::Known(ErrorNumber::OperationInvalid) {
            return Err(libvirt_err(
                format!("ending the backup job of domain {name}"),
                e,
            ));
        }
        // The job ended meanwhile.
    }
    // The abort is asked for; QEMU tears the job down after it returns. "Ended" must mean
    // gone (the journal forgets the job on it), so wait for the job to disappear.
    let t0 = std::time::Instant::now();
    while job_xml(dom, name)?.is_some() {
        if t0.elapsed() > JOB_END_WAIT {
            return Err(Error::new(
                ErrorKind::Unavailable,
                format!(
                    "the backup job of domain {name} is still ending {} s after it was aborted",
                    JOB_END_WAIT.as_secs()
                ),
            ));
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    Ok(())
}

/// How long [`end`] waits for an aborted backup job to be gone.
const JOB_END_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// The XML of the backup job running on `dom`; None when there is none.
fn job_xml(dom: &Domain, name: &str) -> Result<Option<String>> {
    // SAFETY: `dom` is live for the call; a non-null result is a NUL-terminated string
    // that libvirt allocated with malloc and that we own: copied, then freed once.
    let xml = unsafe {
        let p = virt::sys::virDomainBackupGetXMLDesc(dom.as_ptr(), 0);
        if p.is_null() {
            None
        } else {
            let s = std::ffi::CStr::from_ptr(p).to_string_lossy().into_owned();
            libc::free(p.cast());
            Some(s)
        }
    };
    if xml.is_some() {
        return Ok(xml);
    }
    let e = virt::error::Error::last_error();
    if matches!(
        e.code(),
        Enum::Known(ErrorNumber::NoDomainBackup) | Enum::Known(ErrorNumber::OperationInvalid)
    ) {
        return Ok(None);
    }
    Err(libvirt_err(
        format!("reading the backup job of domain {name}"),
        e,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backup_xml_names_the_disk_and_excludes_the_rest() {
        let x = backup_xml(
            Path::new("/run/imaged/nbd/backup-op1"),
            "vda",
            &["vda".into(), "vdb".into()],
            None,
        );
        assert!(x.contains("<domainbackup mode='pull'>"));
        assert!(x.contains("socket='/run/imaged/nbd/backup-op1/nbd.sock'"));
        assert!(x.contains("<disk name='vda' backup='yes' type='file'><scratch file='/run/imaged/nbd/backup-op1/scratch.qcow2'/>"));
        assert!(x.contains("<disk name='vdb' backup='no'/>"));
        assert!(!x.contains("incremental"), "{x}");
        let x = backup_xml(Path::new("/run/b"), "vda", &[], Some("imaged-vda-op0"));
        assert!(
            x.starts_with(
                "<domainbackup mode='pull'>\n  <incremental>imaged-vda-op0</incremental>\n"
            ),
            "{x}"
        );
    }

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/bash\nlibvirt-qemu:x:64055:108:Libvirt Qemu:/var/lib/libvirt:/usr/sbin/nologin\nqemu:x:107:107:qemu user:/:/sbin/nologin\n";
    const GROUP: &str = "root:x:0:\nkvm:x:108:\nqemu:x:107:\n";

    #[test]
    fn qemu_user_comes_from_qemu_conf_else_the_distribution_default() {
        // Debian: commented defaults, libvirt-qemu exists.
        let debian = "#user = \"libvirt-qemu\"\n#group = \"libvirt-qemu\"\n";
        assert_eq!(qemu_ids(debian, PASSWD, GROUP).unwrap(), (64055, 108));
        // RHEL/SUSE: only qemu exists.
        let rhel_passwd = "root:x:0:0::/:/bin/sh\nqemu:x:107:107::/:/sbin/nologin\n";
        assert_eq!(qemu_ids("", rhel_passwd, GROUP).unwrap(), (107, 107));
        // Set explicitly, by name and by number.
        let conf = "user = \"qemu\"\ngroup = \"kvm\"\n";
        assert_eq!(qemu_ids(conf, PASSWD, GROUP).unwrap(), (107, 108));
        assert_eq!(
            qemu_ids("user = \"+0\"\ngroup = \"+0\"", PASSWD, GROUP).unwrap(),
            (0, 0)
        );
    }

    #[test]
    fn an_unknown_qemu_user_is_refused_never_guessed() {
        let e = qemu_ids("", "root:x:0:0::/:/bin/sh\n", GROUP).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::FailedPrecondition);
        assert!(e.to_string().contains("libvirt-qemu, qemu"), "{e}");
        let e = qemu_ids("user = \"nobody-here\"", PASSWD, GROUP).unwrap_err();
        assert!(e.to_string().contains("nobody-here"), "{e}");
        let e = qemu_ids("user = \"qemu\"\ngroup = \"nogroup\"", PASSWD, GROUP).unwrap_err();
        assert!(e.to_string().contains("nogroup"), "{e}");
    }

    #[test]
    fn the_backup_directory_is_private_to_qemu() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("backup-op-t");
        job_dir(&dir).unwrap();
        use std::os::unix::fs::MetadataExt;
        let md = std::fs::metadata(&dir).unwrap();
        assert_eq!(md.mode() & 0o777, 0o700, "mode {:o}", md.mode());
        let conf = std::fs::read_to_string(QEMU_CONF).unwrap_or_default();
        let passwd = std::fs::read_to_string("/etc/passwd").unwrap();
        let group = std::fs::read_to_string("/etc/group").unwrap();
        let (uid, gid) = qemu_ids(&conf, &passwd, &group).unwrap();
        assert_eq!((md.uid(), md.gid()), (uid, gid));
    }
}
