//! Guest I/O for the prep steps: [`GuestIo`] runs programs in the guest and reads, edits and
//! lists its files through the guest agent (recording each edit in an [`Inspection`]), and
//! keeps the backups of the files an apply changes under [`BACKUP_ROOT`]: taking them (each
//! copy checked against what was inspected), restoring a file from its backup (or from the
//! copy the host kept), and removing them.

use std::time::Duration;

use sha2::{Digest, Sha256};

use super::steps::{Edit, Inspection};
use super::text;
use super::{AppliedFile, FileAction, Transform};
use crate::error::{Error, ErrorKind, Result};
use crate::guest::agent::{GuestAgent, OsInfo};

/// Where backups go inside the guest (see the module doc of [`super`]).
pub const BACKUP_ROOT: &str = "/run/imaged-prep/backup";
/// Configuration files larger than this are not edited.
pub const MAX_CONFIG_BYTES: usize = 8 << 20;
/// Time allowed for one program run by the steps (mount, umount, lsblk, cp...).
pub(crate) const STEP_EXEC_TIMEOUT: Duration = Duration::from_secs(120);

/// One guest, as the steps see it: its agent and its OS facts.
pub(crate) struct GuestIo<'a> {
    pub(crate) agent: &'a dyn GuestAgent,
    pub(crate) os: OsInfo,
}

impl GuestIo<'_> {
    /// The guest, with its OS facts asked from the agent.
    pub(crate) fn new(agent: &dyn GuestAgent) -> Result<GuestIo<'_>> {
        Ok(GuestIo {
            agent,
            os: agent.os_info()?,
        })
    }

    /// The guest, without asking for its OS facts (a restore needs none; this skips a round
    /// trip): they read as an empty Linux.
    pub(crate) fn without_os_facts(agent: &dyn GuestAgent) -> GuestIo<'_> {
        GuestIo {
            agent,
            os: OsInfo {
                id: String::new(),
                name: String::new(),
                version_id: String::new(),
                kernel: String::new(),
                is_windows: false,
            },
        }
    }

    /// The domain's name, for messages.
    pub(crate) fn dom(&self) -> &str {
        self.agent.domain()
    }

    /// Runs a program that must succeed; its stdout.
    pub(crate) fn run(&self, what: &str, argv: &[&str]) -> Result<String> {
        let out = self.agent.exec(argv, None, STEP_EXEC_TIMEOUT)?;
        if !out.success() {
            return Err(Error::new(
                ErrorKind::Internal,
                format!(
                    "{what} in domain {} failed (`{}` exit status {}: {})",
                    self.dom(),
                    argv.first().copied().unwrap_or(""),
                    out.exit_code,
                    one_line(&out.stderr_text())
                ),
            ));
        }
        Ok(out.stdout_text())
    }

    /// Runs `sh -c SCRIPT sh ARGS...`, which must succeed; its stdout.
    pub(crate) fn sh(&self, what: &str, script: &str, args: &[&str]) -> Result<String> {
        let mut argv = vec!["sh", "-c", script, "sh"];
        argv.extend_from_slice(args);
        self.run(what, &argv)
    }

    /// The names in a guest directory, without names no guest path may hold (newlines,
    /// control characters: a hostile guest could plant them), which get a note.
    pub(crate) fn list(&self, work: &mut Inspection, dir: &str) -> Result<Vec<String>> {
        let mut names = self.agent.list_dir(dir)?;
        names.retain(|n| {
            let ok = !n.chars().any(char::is_control);
            if !ok {
                work.notes.push(format!(
                    "{dir}: a file name with control characters {n:?}, skipped"
                ));
            }
            ok
        });
        Ok(names)
    }

    /// Reads a guest file, applies `f` to its text, and records the edit when the text
    /// changes. Returns whether the file exists.
    pub(crate) fn edit_file(
        &self,
        work: &mut Inspection,
        path: &str,
        f: impl FnOnce(&str) -> Transform,
    ) -> Result<bool> {
        let Some(bytes) = self.agent.read_file(path)? else {
            return Ok(false);
        };
        if bytes.len() > MAX_CONFIG_BYTES {
            work.notes.push(format!(
                "{path}: larger than {} MiB, not edited",
                MAX_CONFIG_BYTES >> 20
            ));
            return Ok(true);
        }
        let d = text::decode(&bytes);
        let t = f(&d.text);
        work.notes
            .extend(t.notes.into_iter().map(|n| format!("{path}: {n}")));
        if t.text != d.text {
            work.edits.push(Edit {
                path: path.to_string(),
                new: Some(text::encode(&t.text, d.latin1)),
                old: Some(bytes),
            });
        }
        Ok(true)
    }

    /// Copies the files to the backup tree `root` (one program for all) and checks each copy;
    /// what each edit's file becomes in the outcome.
    pub(crate) fn back_up(&self, edits: &[Edit], root: &str) -> Result<Vec<AppliedFile>> {
        let mut args: Vec<&str> = vec![root];
        for e in edits.iter().filter(|e| e.old.is_some()) {
            args.push(&e.path);
            // A deleted file is copied as it is (a link stays a link); an edited one by content,
            // since the edit writes through a link.
            args.push(if e.action() == FileAction::Delete {
                "link"
            } else {
                "deref"
            });
        }
        if args.len() > 1 {
            self.sh(
                &format!("backing up files to {root}"),
                r#"set -e; umask 077
r=$1; shift
while [ $# -ge 2 ]; do
  p=$1 how=$2; shift 2
  b=$r$p
  mkdir -p -- "$(dirname -- "$b")"
  if [ "$how" = deref ]; then cp -pL -- "$p" "$b"; else cp -a -- "$p" "$b"; fi
done"#,
                &args,
            )?;
        }
        let mut out = Vec::new();
        for e in edits {
            let action = e.action();
            let Some(old) = &e.old else {
                out.push(AppliedFile {
                    path: e.path.clone(),
                    action,
                    backup: String::new(),
                    original_sha256: String::new(),
                    original: None,
                });
                continue;
            };
            let dest = format!("{root}{}", e.path);
            // A removed symbolic link was inspected without content.
            let is_link = action == FileAction::Delete && old.is_empty();
            if !is_link {
                let copy = self.agent.read_file(&dest)?;
                if copy.as_deref() != Some(old.as_slice()) {
                    return Err(Error::new(
                        ErrorKind::Aborted,
                        format!(
                            "{} in domain {} changed while it was being prepared (its backup {dest} \
                             differs from what was inspected)",
                            e.path,
                            self.dom()
                        ),
                    ));
                }
            }
            out.push(AppliedFile {
                path: e.path.clone(),
                action,
                backup: dest,
                original_sha256: sha256_hex(old),
                original: (!is_link).then(|| old.clone()),
            });
        }
        Ok(out)
    }

    /// Puts one changed file back: a created file removed, a modified one rewritten from its
    /// backup (or the host's copy once the guest rebooted), checked against the recorded
    /// sha256; a deleted one copied back as it was.
    pub(crate) fn restore_file(&self, f: &AppliedFile) -> Result<()> {
        match f.action {
            FileAction::Create => self.agent.remove_file(&f.path),
            FileAction::Modify => {
                let data = match (self.agent.read_file(&f.backup)?, &f.original) {
                    (Some(d), _) => d,
                    // The guest rebooted since (its /run is new): the host kept the content.
                    (None, Some(orig)) => orig.clone(),
                    (None, None) => {
                        return Err(Error::new(
                            ErrorKind::FailedPrecondition,
                            format!(
                                "cannot restore {} in domain {}: its backup {} is gone",
                                f.path,
                                self.dom(),
                                f.backup
                            ),
                        ))
                    }
                };
                if sha256_hex(&data) != f.original_sha256 {
                    return Err(Error::new(
                        ErrorKind::FailedPrecondition,
                        format!(
                            "cannot restore {} in domain {}: its backup {} was changed",
                            f.path,
                            self.dom(),
                            f.backup
                        ),
                    ));
                }
                self.agent.write_file(&f.path, &data, None)
            }
            FileAction::Delete => {
                // The backup keeps the file as it was (a link stays a link, modes and owner kept);
                // when the guest rebooted since, the host's copy of the content is written back.
                let res = self.sh(
                    &format!("restoring {} from {}", f.path, f.backup),
                    r#"[ -e "$1" ] || [ -L "$1" ] || { echo "backup $1 is gone" >&2; exit 3; }
cp -a -- "$1" "$2""#,
                    &[&f.backup, &f.path],
                );
                match (res, &f.original) {
                    (Ok(_), _) => Ok(()),
                    (Err(_), Some(orig)) if sha256_hex(orig) == f.original_sha256 => {
                        self.agent.write_file(&f.path, orig, None)
                    }
                    (Err(e), _) => Err(e),
                }
            }
        }
    }

    /// Removes the backup directory `dir` of an apply, and the directories above it under
    /// `/run/imaged-prep` that are left empty. A failure is only logged.
    pub(crate) fn remove_backups(&self, dir: &str) {
        if let Err(e) = self.sh(
            &format!("removing the backups in {dir}"),
            r#"rm -rf -- "$1"
d=$(dirname -- "$1")
while [ "${d#/run/imaged-prep}" != "$d" ]; do rmdir -- "$d" 2>/dev/null || break; d=$(dirname -- "$d"); done
exit 0"#,
            &[dir],
        ) {
            tracing::warn!(domain = self.dom(), error = %e.chain(), "prep backups left behind");
        }
    }
}

/// The first line of a program's message, bounded, for an error message.
pub(crate) fn one_line(s: &str) -> String {
    let l = s.lines().next().unwrap_or("").trim();
    if l.is_empty() {
        "no message".into()
    } else {
        l.chars().take(300).collect()
    }
}

/// sha256 of `b`, as lowercase hex.
pub(crate) fn sha256_hex(b: &[u8]) -> String {
    hex::encode(Sha256::digest(b))
}

/// `dir/name`, with one slash between them.
pub(crate) fn join_path(dir: &str, name: &str) -> String {
    format!("{}/{name}", dir.trim_end_matches('/'))
}
