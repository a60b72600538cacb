//! The Linux image-prep steps, run inside a running guest through its guest agent.
//!
//! Four steps ([`PrepStep`]), each with a dry run, an apply, a check and an undo:
//!
//! - [`plan`] inspects the guest and returns, per step, the files it would change as unified
//!   diffs, the other actions it would take (unmounts, `swapoff`, Windows `netsh` commands) and
//!   notes for the operator. It changes nothing.
//! - [`apply`] does it. For each step: take down data-disk mounts and swap first (a busy mount
//!   fails the step before any file is touched), back up every file it changes, write the
//!   files (each replaced atomically, owner and mode kept), then inspect again: a step whose
//!   inspection still finds work is a failure. Applying twice changes nothing. If a step fails,
//!   what that step and the steps before it in the same call did is undone, and the error is
//!   returned: the guest is left as it was.
//! - [`check`] inspects and says, per step, whether anything is left to do.
//! - [`restore`] undoes applied steps from their [`StepOutcome`]s: every file back from its
//!   backup (checked against the recorded sha256), unmounted filesystems mounted again, swap
//!   switched on again; then the backups are removed. This is the "restore the source" option
//!   of quiesce captures: the image has the prepared state, the running source VM gets its own
//!   back right after the capture point.
//!
//! **Backups** live inside the guest, under [`BACKUP_ROOT`]`/<id>/<step>/<original path>`
//! (one `<id>` per [`apply`] call; directories mode 0700, files with their own mode and
//! owner), never next to the original: a copy beside `ifcfg-eth0` or in
//! `/etc/network/interfaces.d/` would itself be read as network configuration. They live under
//! `/run`, a tmpfs on every systemd guest, so they are never on the system disk: an image
//! captured after the apply holds no copy of the source's static addresses or data-disk lines.
//! [`restore`] removes them; after an [`apply`] without restore they stay until the guest
//! reboots.
//!
//! The text edits are pure functions in the submodules ([`dhcp`], [`netplan`], [`setpasswd`],
//! [`udev`], [`fstab`]); this module does the guest I/O around them. Files are edited as text
//! byte-exactly ([`text`]); a configuration file above [`MAX_CONFIG_BYTES`] is not edited (a
//! note says so).

pub mod dhcp;
pub mod fstab;
pub mod netplan;
pub mod setpasswd;
pub mod text;
pub mod udev;

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::agent::{GuestAgent, OsInfo};
use crate::error::{Error, ErrorKind, Result};
use fstab::Mount;

/// Where backups go inside the guest (see the module doc).
pub const BACKUP_ROOT: &str = "/run/imaged-prep/backup";
/// Configuration files larger than this are not edited.
pub const MAX_CONFIG_BYTES: usize = 8 << 20;
/// Time allowed for one program run by the steps (mount, umount, lsblk, cp...).
const STEP_EXEC_TIMEOUT: Duration = Duration::from_secs(120);

/// The result of a pure text transform: the new text (equal to the input when nothing
/// changes) and notes for the operator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transform {
    pub text: String,
    pub notes: Vec<String>,
}

/// One prep step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PrepStep {
    /// Static NIC configuration becomes DHCP.
    Dhcp,
    /// Persistent-net udev rules removed.
    UdevNetRules,
    /// `sh /etc/init.d/setpasswd.sh` hooked into the rc script.
    SetpasswdHook,
    /// Data-disk filesystems unmounted and their fstab lines removed.
    FstabDataDisks,
}

impl PrepStep {
    /// The four steps, in the order they run.
    pub const ALL: [PrepStep; 4] = [
        PrepStep::Dhcp,
        PrepStep::UdevNetRules,
        PrepStep::SetpasswdHook,
        PrepStep::FstabDataDisks,
    ];

    /// The step's name as the API and the CLI spell it.
    pub fn name(self) -> &'static str {
        match self {
            PrepStep::Dhcp => "dhcp",
            PrepStep::UdevNetRules => "udev-net-rules",
            PrepStep::SetpasswdHook => "setpasswd-hook",
            PrepStep::FstabDataDisks => "fstab-data-disks",
        }
    }

    /// One name: a step, or `all` for the four. INVALID_ARGUMENT listing the valid names
    /// otherwise.
    pub fn parse(name: &str) -> Result<Vec<PrepStep>> {
        let n = name.trim();
        if n.eq_ignore_ascii_case("all") {
            return Ok(PrepStep::ALL.to_vec());
        }
        PrepStep::ALL
            .iter()
            .copied()
            .find(|s| s.name().eq_ignore_ascii_case(n))
            .map(|s| vec![s])
            .ok_or_else(|| {
                Error::new(
                    ErrorKind::InvalidArgument,
                    format!(
                        "unknown prep step {name:?}: valid steps are {}, or all",
                        PrepStep::ALL.map(PrepStep::name).join(", ")
                    ),
                )
            })
    }

    /// Several names (each a step or `all`, also comma-separated): the steps in run order,
    /// each once.
    pub fn parse_list<S: AsRef<str>>(names: &[S]) -> Result<Vec<PrepStep>> {
        let mut set = BTreeSet::new();
        for n in names {
            for part in n.as_ref().split(',').filter(|p| !p.trim().is_empty()) {
                set.extend(PrepStep::parse(part)?);
            }
        }
        Ok(set.into_iter().collect())
    }
}

impl fmt::Display for PrepStep {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What happens to a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FileAction {
    Modify,
    Delete,
    Create,
}

/// A file a step would change, as a unified diff.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileChange {
    pub path: String,
    pub action: FileAction,
    /// `diff -u` style text (`--- a/PATH`, `+++ b/PATH`, hunks), bounded in size.
    pub diff: String,
}

/// Whether a step has work to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PlanStatus {
    /// It would change something.
    Changes,
    /// It applies, and the guest is already prepared.
    NothingToDo,
    /// It does not apply to this guest (e.g. no rc script, a Windows guest).
    NotApplicable,
}

/// A step's dry run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepPlan {
    pub step: PrepStep,
    pub status: PlanStatus,
    pub changes: Vec<FileChange>,
    /// Actions besides file changes, in words: `unmount /mnt/data (/dev/vdb1, ext4)`,
    /// `swapoff /dev/vdb3`, `netsh interface ip set address name=Ethernet source=dhcp`.
    pub actions: Vec<String>,
    pub notes: Vec<String>,
}

/// What an apply did to a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OutcomeStatus {
    /// Changes were made (and the check after them passed).
    Applied,
    /// Nothing to do: the guest was already prepared.
    Unchanged,
    /// The step does not apply to this guest.
    NotApplicable,
}

/// A file an apply changed, and where its backup is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppliedFile {
    pub path: String,
    pub action: FileAction,
    /// The backup inside the guest (for [`FileAction::Create`], none: empty).
    pub backup: String,
    /// sha256 of the original content (hex; empty for a created file).
    pub original_sha256: String,
    /// The original content, kept on the host too (base64 in the journal): the backup in the
    /// guest lives on its `/run` and is gone once the guest reboots (a shutdown capture). None
    /// for a created file and a removed symbolic link.
    #[serde(default, skip_serializing_if = "Option::is_none", with = "b64_opt")]
    pub original: Option<Vec<u8>>,
}

/// Bytes as base64 text in serialized outcomes.
mod b64_opt {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &Option<Vec<u8>>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(b) => s.serialize_some(&crate::guest::agent::encode_b64(b)),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<u8>>, D::Error> {
        let text: Option<String> = Option::deserialize(d)?;
        text.map(|t| {
            crate::guest::agent::decode_b64_capped(&t, 64 << 20)
                .ok_or_else(|| serde::de::Error::custom("original content is not base64"))
        })
        .transpose()
    }
}

/// A swap area an apply switched off.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SwapRecord {
    pub path: String,
}

/// What an apply did for one step: enough to [`restore`] it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepOutcome {
    pub step: PrepStep,
    pub status: OutcomeStatus,
    pub files: Vec<AppliedFile>,
    /// Filesystems unmounted, in the order they were unmounted.
    pub unmounted: Vec<Mount>,
    pub swaps_off: Vec<SwapRecord>,
    /// Commands run (Windows `netsh`), each as its argv.
    pub commands: Vec<Vec<String>>,
    /// The backup directory of this apply inside the guest, when files were backed up.
    pub backup_dir: Option<String>,
    pub notes: Vec<String>,
}

/// A step's check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepCheck {
    pub step: PrepStep,
    /// Nothing left to do (also true when the step does not apply).
    pub ok: bool,
    pub status: PlanStatus,
    /// What is left to do, in words.
    pub problems: Vec<String>,
    pub notes: Vec<String>,
}

/// A file change found by an inspection.
#[derive(Debug, Clone)]
struct Edit {
    path: String,
    old: Option<Vec<u8>>,
    new: Option<Vec<u8>>,
}

impl Edit {
    fn action(&self) -> FileAction {
        match (&self.old, &self.new) {
            (None, _) => FileAction::Create,
            (Some(_), None) => FileAction::Delete,
            (Some(_), Some(_)) => FileAction::Modify,
        }
    }
}

/// What a step would do, found by inspecting the guest.
#[derive(Debug, Clone, Default)]
struct Work {
    applicable: bool,
    edits: Vec<Edit>,
    unmounts: Vec<Mount>,
    swapoffs: Vec<String>,
    commands: Vec<Vec<String>>,
    notes: Vec<String>,
}

impl Work {
    fn is_empty(&self) -> bool {
        self.edits.is_empty()
            && self.unmounts.is_empty()
            && self.swapoffs.is_empty()
            && self.commands.is_empty()
    }

    fn actions(&self) -> Vec<String> {
        let mut a: Vec<String> = self
            .unmounts
            .iter()
            .map(|m| format!("unmount {} ({}, {})", m.target, m.source, m.fstype))
            .collect();
        a.extend(self.swapoffs.iter().map(|s| format!("swapoff {s}")));
        a.extend(self.commands.iter().map(|c| c.join(" ")));
        a
    }

    fn status(&self) -> PlanStatus {
        if !self.applicable {
            PlanStatus::NotApplicable
        } else if self.is_empty() {
            PlanStatus::NothingToDo
        } else {
            PlanStatus::Changes
        }
    }
}

struct Ctx<'a> {
    agent: &'a dyn GuestAgent,
    os: OsInfo,
}

impl Ctx<'_> {
    fn dom(&self) -> &str {
        self.agent.domain()
    }

    fn new(agent: &dyn GuestAgent) -> Result<Ctx<'_>> {
        Ok(Ctx {
            agent,
            os: agent.os_info()?,
        })
    }

    /// Runs a program that must succeed; its stdout.
    fn run(&self, what: &str, argv: &[&str]) -> Result<String> {
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
    fn sh(&self, what: &str, script: &str, args: &[&str]) -> Result<String> {
        let mut argv = vec!["sh", "-c", script, "sh"];
        argv.extend_from_slice(args);
        self.run(what, &argv)
    }

    /// The names in a guest directory, without names no guest path may hold (newlines,
    /// control characters: a hostile guest could plant them), which get a note.
    fn list(&self, work: &mut Work, dir: &str) -> Result<Vec<String>> {
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
    fn edit_file(
        &self,
        work: &mut Work,
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
}

fn one_line(s: &str) -> String {
    let l = s.lines().next().unwrap_or("").trim();
    if l.is_empty() {
        "no message".into()
    } else {
        l.chars().take(300).collect()
    }
}

fn sha256_hex(b: &[u8]) -> String {
    hex::encode(Sha256::digest(b))
}

fn join_path(dir: &str, name: &str) -> String {
    format!("{}/{name}", dir.trim_end_matches('/'))
}

fn inspect(ctx: &Ctx<'_>, step: PrepStep) -> Result<Work> {
    if ctx.os.is_windows {
        return match step {
            PrepStep::Dhcp => windows_dhcp(ctx),
            _ => Ok(Work {
                applicable: false,
                notes: vec![format!("{step} is a Linux step; this is a Windows guest")],
                ..Work::default()
            }),
        };
    }
    match step {
        PrepStep::Dhcp => dhcp_work(ctx),
        PrepStep::UdevNetRules => udev_work(ctx),
        PrepStep::SetpasswdHook => setpasswd_work(ctx),
        PrepStep::FstabDataDisks => fstab_work(ctx),
    }
}

// ---- dhcp -------------------------------------------------------------------------------

fn dhcp_work(ctx: &Ctx<'_>) -> Result<Work> {
    let mut w = Work::default();
    let mut found = false;
    for (dir, flavor) in [
        ("/etc/sysconfig/network-scripts", dhcp::IfcfgFlavor::Rhel),
        ("/etc/sysconfig/network", dhcp::IfcfgFlavor::Suse),
    ] {
        for name in ctx.list(&mut w, dir)? {
            if name.starts_with("ifcfg-") && name.contains(':') {
                w.notes
                    .push(format!("{dir}/{name}: an alias interface, left as is"));
            }
            if !dhcp::ifcfg_name_ok(&name) {
                continue;
            }
            found |= ctx.edit_file(&mut w, &join_path(dir, &name), |t| {
                dhcp::ifcfg_to_dhcp(t, flavor)
            })?;
        }
    }
    found |= ctx.edit_file(&mut w, "/etc/sysconfig/network/dhcp", dhcp::suse_dhcp_file)?;
    let mut visited = BTreeSet::new();
    found |= debian_interfaces(ctx, &mut w, "/etc/network/interfaces", 0, &mut visited)?;
    for name in ctx.list(&mut w, "/etc/netplan")? {
        if name.ends_with(".yaml") || name.ends_with(".yml") {
            found |= ctx.edit_file(
                &mut w,
                &join_path("/etc/netplan", &name),
                netplan::netplan_to_dhcp,
            )?;
        }
    }
    let nm = "/etc/NetworkManager/system-connections";
    for name in ctx.list(&mut w, nm)? {
        let backup_like = name.starts_with('.')
            || [
                "~", ".bak", ".orig", ".rpmsave", ".rpmnew", ".swp", ".tmp", ".nmmeta",
            ]
            .iter()
            .any(|s| name.ends_with(s));
        if !backup_like {
            found |= ctx.edit_file(&mut w, &join_path(nm, &name), dhcp::nm_keyfile_to_dhcp)?;
        }
    }
    for name in ctx.list(&mut w, "/etc/systemd/network")? {
        if name.ends_with(".network") {
            found |= ctx.edit_file(
                &mut w,
                &join_path("/etc/systemd/network", &name),
                dhcp::networkd_to_dhcp,
            )?;
        }
    }
    w.applicable = found;
    if !found {
        w.notes
            .push("no network configuration files found in the guest".into());
    }
    Ok(w)
}

const MAX_INCLUDE_DEPTH: usize = 8;
const MAX_INCLUDED_FILES: usize = 256;

/// `/etc/network/interfaces` and the files it includes, recursively (cycles, depth and count
/// bounded). Returns whether `path` exists.
fn debian_interfaces(
    ctx: &Ctx<'_>,
    w: &mut Work,
    path: &str,
    depth: usize,
    visited: &mut BTreeSet<String>,
) -> Result<bool> {
    if depth > MAX_INCLUDE_DEPTH || visited.len() >= MAX_INCLUDED_FILES {
        w.notes.push(format!(
            "{path}: includes nested too deep or too many; not followed"
        ));
        return Ok(false);
    }
    if !visited.insert(path.to_string()) {
        return Ok(true);
    }
    let mut includes = Vec::new();
    let exists = ctx.edit_file(w, path, |t| {
        let (tr, inc) = dhcp::interfaces_to_dhcp(t);
        includes = inc;
        tr
    })?;
    let base = path.rsplit_once('/').map(|(d, _)| d).unwrap_or("/");
    let abs = |p: &str| {
        if p.starts_with('/') {
            p.to_string()
        } else {
            join_path(if base.is_empty() { "/" } else { base }, p)
        }
    };
    for inc in includes {
        match inc {
            dhcp::Include::Source(pattern) => {
                let pattern = abs(&pattern);
                let (dir, last) = pattern.rsplit_once('/').unwrap_or(("", &pattern));
                let dir = if dir.is_empty() { "/" } else { dir };
                if dir.contains(['*', '?', '[']) {
                    w.notes.push(format!(
                        "{path}: `source {pattern}` has wildcards in a directory; not followed"
                    ));
                    continue;
                }
                if last.contains(['*', '?', '[']) {
                    for name in ctx.list(w, dir)? {
                        if dhcp::glob_match(last, &name) {
                            debian_interfaces(ctx, w, &join_path(dir, &name), depth + 1, visited)?;
                        }
                    }
                } else {
                    debian_interfaces(ctx, w, &pattern, depth + 1, visited)?;
                }
            }
            dhcp::Include::Directory(dir) => {
                let dir = abs(&dir);
                for name in ctx.list(w, &dir)? {
                    if dhcp::source_directory_name_ok(&name) {
                        debian_interfaces(ctx, w, &join_path(&dir, &name), depth + 1, visited)?;
                    }
                }
            }
        }
    }
    Ok(exists)
}

fn windows_dhcp(ctx: &Ctx<'_>) -> Result<Work> {
    let mut w = Work {
        applicable: true,
        ..Work::default()
    };
    for ifc in ctx.agent.network_interfaces()? {
        let loopback = ifc.name.to_ascii_lowercase().contains("loopback")
            || (!ifc.ip_addresses.is_empty()
                && ifc
                    .ip_addresses
                    .iter()
                    .all(|a| a.starts_with("127.") || a.starts_with("::1")));
        if loopback {
            continue;
        }
        // English-locale output tells whether DHCP is already on; otherwise we just run it
        // (netsh leaves a DHCP interface as it is).
        let name_arg = format!("name={}", ifc.name);
        let cfg = ctx.agent.exec(
            &["netsh", "interface", "ipv4", "show", "config", &name_arg],
            None,
            STEP_EXEC_TIMEOUT,
        )?;
        let dhcp_on = cfg.stdout_text().lines().any(|l| {
            let l = l.trim();
            l.starts_with("DHCP enabled") && l.ends_with("Yes")
        });
        if dhcp_on {
            continue;
        }
        for what in ["address", "dns"] {
            w.commands.push(
                [
                    "netsh",
                    "interface",
                    "ip",
                    "set",
                    what,
                    &name_arg,
                    "source=dhcp",
                ]
                .map(str::to_string)
                .to_vec(),
            );
        }
    }
    Ok(w)
}

// ---- udev-net-rules --------------------------------------------------------------------

fn udev_work(ctx: &Ctx<'_>) -> Result<Work> {
    let mut w = Work {
        applicable: true,
        ..Work::default()
    };
    let names: Vec<String> = ctx
        .list(&mut w, udev::RULES_DIR)?
        .into_iter()
        .filter(|n| udev::is_persistent_net_rules(n))
        .collect();
    if names.is_empty() {
        return Ok(w);
    }
    // Which of them are symbolic links, and to what.
    let mut args = vec![udev::RULES_DIR];
    args.extend(names.iter().map(String::as_str));
    let links = ctx.sh(
        &format!("looking at links in {}", udev::RULES_DIR),
        r#"cd -- "$1" || exit 1; shift
for f in "$@"; do [ -L "$f" ] && printf '%s\t%s\n' "$f" "$(readlink -- "$f")"; done; exit 0"#,
        &args,
    )?;
    let links: HashMap<&str, &str> = links.lines().filter_map(|l| l.split_once('\t')).collect();
    for name in names {
        let path = join_path(udev::RULES_DIR, &name);
        let old = match links.get(name.as_str()) {
            Some(&"/dev/null") => {
                w.notes.push(format!(
                    "{path}: a link to /dev/null (switches the rule generator off), left in place"
                ));
                continue;
            }
            Some(target) => {
                w.notes
                    .push(format!("{path}: a symbolic link to {target}, removed"));
                Vec::new()
            }
            None => match ctx.agent.read_file(&path)? {
                Some(b) => b,
                None => continue,
            },
        };
        w.edits.push(Edit {
            path,
            old: Some(old),
            new: None,
        });
    }
    if !w.edits.is_empty() {
        w.notes.push(
            "the guest must not reboot before the capture point, or udev writes the rules again"
                .into(),
        );
    }
    Ok(w)
}

// ---- setpasswd-hook --------------------------------------------------------------------

fn setpasswd_work(ctx: &Ctx<'_>) -> Result<Work> {
    let mut w = Work::default();
    let out = ctx.sh(
        "looking for the rc scripts",
        r#"for f in "$@"; do if [ -f "$f" ]; then readlink -f -- "$f"; else echo; fi; done
if [ -e /etc/init.d/setpasswd.sh ]; then echo yes; else echo no; fi"#,
        setpasswd::RC_FILES,
    )?;
    let lines: Vec<&str> = out.lines().collect();
    let mut seen = BTreeSet::new();
    for (i, rc) in setpasswd::RC_FILES.iter().enumerate() {
        let real = lines.get(i).copied().unwrap_or("").trim();
        if real.is_empty() {
            continue;
        }
        w.applicable = true;
        if !seen.insert(real.to_string()) {
            w.notes.push(format!(
                "{rc}: the same file as an rc script already hooked"
            ));
            continue;
        }
        ctx.edit_file(&mut w, rc, setpasswd::add_hook)?;
    }
    if !w.applicable {
        w.notes.push(format!(
            "not applicable: neither {} exists",
            setpasswd::RC_FILES.join(" nor ")
        ));
    } else if lines.get(setpasswd::RC_FILES.len()).copied() == Some("no") {
        w.notes.push(format!(
            "{} does not exist in the guest (yet); the hook runs it when it does",
            setpasswd::SETPASSWD_SCRIPT
        ));
    }
    Ok(w)
}

// ---- fstab-data-disks ------------------------------------------------------------------

const LSBLK_COLUMNS: &str = "NAME,KNAME,PKNAME,TYPE,MOUNTPOINT,UUID,LABEL,PARTUUID,PARTLABEL";

/// What the guest's disks and mounts look like.
struct DiskView {
    topo: fstab::Topology,
    mounts: Vec<Mount>,
    swaps: Vec<fstab::Swap>,
    canonical: HashMap<String, String>,
    system: BTreeSet<String>,
}

fn disk_view(ctx: &Ctx<'_>, extra_paths: &[&str]) -> Result<DiskView> {
    let a = ctx.agent;
    let dom = ctx.dom();
    let lsblk = a.exec(
        &["lsblk", "-J", "-o", LSBLK_COLUMNS],
        None,
        STEP_EXEC_TIMEOUT,
    )?;
    let topo = if lsblk.success() {
        fstab::parse_lsblk_json(&lsblk.stdout_text()).map_err(|e| {
            Error::new(
                ErrorKind::Internal,
                format!("reading the block devices of domain {dom}: {e}"),
            )
        })?
    } else {
        let pairs = a.exec(
            &["lsblk", "-P", "-o", LSBLK_COLUMNS],
            None,
            STEP_EXEC_TIMEOUT,
        )?;
        if !pairs.success() {
            return Err(Error::new(
                ErrorKind::FailedPrecondition,
                format!(
                    "cannot list the block devices of domain {dom}: `lsblk` (util-linux) failed \
                     or is missing ({})",
                    one_line(&pairs.stderr_text())
                ),
            ));
        }
        fstab::parse_lsblk_pairs(&pairs.stdout_text())
    };
    let findmnt = a.exec(&["findmnt", "-J"], None, STEP_EXEC_TIMEOUT)?;
    let mounts = match findmnt
        .success()
        .then(|| fstab::parse_findmnt_json(&findmnt.stdout_text()).ok())
        .flatten()
    {
        Some(m) => m,
        None => {
            let text = a.read_file("/proc/self/mounts")?.unwrap_or_default();
            fstab::parse_proc_mounts(&text::display_text(&text))
        }
    };
    let swaps = a
        .read_file("/proc/swaps")?
        .map(|b| fstab::parse_proc_swaps(&text::display_text(&b)))
        .unwrap_or_default();
    let root_mount = mounts.iter().rev().find(|m| m.target == "/");
    // Every /dev path we will need, canonicalised in the guest in one go.
    let mut paths: BTreeSet<String> = extra_paths
        .iter()
        .filter(|p| fstab::needs_resolving(p))
        .map(|p| p.to_string())
        .collect();
    paths.extend(
        mounts
            .iter()
            .map(|m| m.device().to_string())
            .filter(|d| fstab::needs_resolving(d)),
    );
    paths.extend(
        swaps
            .iter()
            .filter(|s| s.kind == "partition")
            .map(|s| s.path.clone()),
    );
    let mut canonical = HashMap::new();
    if !paths.is_empty() {
        let list: Vec<&str> = paths.iter().map(String::as_str).collect();
        let out = ctx.sh(
            "resolving device paths",
            r#"for p in "$@"; do
  printf '%s\t%s\n' "$p" "$(readlink -f -- "$p" 2>/dev/null)"
done"#,
            &list,
        )?;
        for l in out.lines() {
            if let Some((p, c)) = l.split_once('\t') {
                if !c.is_empty() {
                    canonical.insert(p.to_string(), c.to_string());
                }
            }
        }
    }
    let root_kname = topo
        .devs
        .values()
        .find(|d| d.mountpoint.as_deref() == Some("/"))
        .map(|d| d.kname.clone())
        .or_else(|| {
            let dev = root_mount?.device();
            let c = canonical.get(dev).map(String::as_str).unwrap_or(dev);
            topo.by_path(c).map(|d| d.kname.clone())
        });
    let system = root_kname
        .map(|k| topo.system_disks(&k))
        .unwrap_or_default();
    if system.is_empty() {
        return Err(Error::new(
            ErrorKind::FailedPrecondition,
            format!(
                "cannot tell the system disk of domain {dom}: / is mounted from {}, which is not \
                 among its block devices",
                root_mount
                    .map(|m| m.source.as_str())
                    .unwrap_or("an unknown source")
            ),
        ));
    }
    Ok(DiskView {
        topo,
        mounts,
        swaps,
        canonical,
        system,
    })
}

fn fstab_work(ctx: &Ctx<'_>) -> Result<Work> {
    let mut w = Work {
        applicable: true,
        ..Work::default()
    };
    let fstab_bytes = ctx.agent.read_file("/etc/fstab")?;
    let fstab_text = fstab_bytes.as_deref().map(text::decode);
    let entries = fstab_text
        .as_ref()
        .map(|d| fstab::parse_fstab(&d.text))
        .unwrap_or_default();
    let specs: Vec<&str> = entries.iter().map(|e| e.spec.as_str()).collect();
    let view = disk_view(ctx, &specs)?;
    let decisions = fstab::decide(&entries, &view.topo, &view.canonical, &view.system);
    let mut drop = BTreeSet::new();
    for (e, d) in entries.iter().zip(&decisions) {
        match d {
            fstab::Decision::Remove { kname } => {
                drop.insert(e.line);
                w.notes.push(format!(
                    "/etc/fstab line {}: {} on {} is on data disk {} (/dev/{kname})",
                    e.line + 1,
                    e.target,
                    e.spec,
                    view.topo
                        .roots(kname)
                        .into_iter()
                        .collect::<Vec<_>>()
                        .join(",")
                ));
            }
            fstab::Decision::RemoveBind { of } => {
                drop.insert(e.line);
                w.notes.push(format!(
                    "/etc/fstab line {}: bind mount of {} below {of}, removed with it",
                    e.line + 1,
                    e.spec
                ));
            }
            fstab::Decision::Unresolved => w.notes.push(format!(
                "/etc/fstab line {}: {} ({}) matches no device in the guest; kept",
                e.line + 1,
                e.spec,
                e.target
            )),
            fstab::Decision::Keep => {}
        }
    }
    if let (Some(bytes), Some(d)) = (&fstab_bytes, &fstab_text) {
        if !drop.is_empty() {
            w.edits.push(Edit {
                path: "/etc/fstab".into(),
                old: Some(bytes.clone()),
                new: Some(text::encode(&fstab::remove_lines(&d.text, &drop), d.latin1)),
            });
        }
    }
    w.unmounts = fstab::data_mounts(&view.mounts, &view.topo, &view.canonical, &view.system);
    for s in &view.swaps {
        let on_data = match s.kind.as_str() {
            "partition" => {
                let c = view.canonical.get(&s.path).unwrap_or(&s.path);
                view.topo
                    .by_path(c)
                    .is_some_and(|d| view.topo.on_data_disk(&d.kname, &view.system))
            }
            _ => w
                .unmounts
                .iter()
                .any(|m| fstab::is_under(&s.path, &m.target)),
        };
        if on_data {
            w.swapoffs.push(s.path.clone());
        }
    }
    Ok(w)
}

/// Unmounts `m`; when it is busy, the error names what holds it.
fn unmount(ctx: &Ctx<'_>, m: &Mount) -> Result<()> {
    let out = ctx
        .agent
        .exec(&["umount", &m.target], None, STEP_EXEC_TIMEOUT)?;
    if out.success() {
        return Ok(());
    }
    let err = out.stderr_text();
    let busy = err.contains("busy") || out.exit_code == 32;
    let holders = if busy { holders(ctx, &m.target) } else { None };
    let mut msg = format!(
        "fstab-data-disks: cannot unmount {} ({}) in domain {}",
        m.target,
        m.source,
        ctx.dom()
    );
    if busy {
        msg.push_str(": it is busy");
        match holders {
            Some(h) if !h.is_empty() => {
                msg.push_str(" (held by ");
                msg.push_str(&h);
                msg.push(')');
            }
            _ => msg.push_str(" (could not tell by what)"),
        }
    } else {
        msg.push_str(&format!(": umount said {}", one_line(&err)));
    }
    msg.push_str("; /etc/fstab was not changed");
    Err(Error::new(ErrorKind::FailedPrecondition, msg))
}

/// What keeps `target` busy: `fuser -vm` or `lsof` output when the guest has them, else the
/// processes found under /proc. None when it cannot be told.
fn holders(ctx: &Ctx<'_>, target: &str) -> Option<String> {
    let out = ctx
        .agent
        .exec(
            &[
                "sh",
                "-c",
                r#"t=$1
if command -v fuser >/dev/null 2>&1; then echo @fuser; fuser -vm -- "$t" 2>&1; exit 0; fi
if command -v lsof >/dev/null 2>&1; then
  echo @lsof; lsof -w +f -- "$t" 2>/dev/null | head -n 20; exit 0
fi
echo @proc
ls -ld /proc/[0-9]*/cwd /proc/[0-9]*/root 2>/dev/null
ls -l /proc/[0-9]*/fd/ 2>/dev/null
grep -s . /proc/[0-9]*/comm
exit 0"#,
                "sh",
                target,
            ],
            None,
            STEP_EXEC_TIMEOUT,
        )
        .ok()?;
    let text = out.stdout_text();
    let (tool, rest) = text.split_once('\n').unwrap_or((&text, ""));
    match tool.trim() {
        "@proc" => {
            let h = fstab::parse_holders(rest, target);
            let mut list: Vec<String> = h
                .iter()
                .take(10)
                .map(|h| format!("pid {} {} ({})", h.pid, h.command, h.how))
                .collect();
            if h.len() > 10 {
                list.push(format!("{} more", h.len() - 10));
            }
            Some(list.join(", "))
        }
        t => {
            let lines: Vec<&str> = rest
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .take(12)
                .collect();
            Some(format!(
                "{}: {}",
                t.trim_start_matches('@'),
                lines.join("; ")
            ))
        }
    }
}

fn mount_again(ctx: &Ctx<'_>, m: &Mount, others: &[Mount]) -> Result<()> {
    let mounted = ctx
        .agent
        .exec(&["mountpoint", "-q", &m.target], None, STEP_EXEC_TIMEOUT)?;
    if mounted.success() {
        return Ok(());
    }
    let what = format!("mounting {} on {} again", m.source, m.target);
    match m.source_root() {
        Some(root) if root != "/" && m.fstype != "btrfs" => {
            // A bind mount: from where the same device is mounted whole (among those being
            // mounted again, else among the guest's current mounts).
            let whole = |o: &&Mount| o.device() == m.device() && o.source_root().is_none();
            let live = match others.iter().find(whole) {
                Some(_) => Vec::new(),
                None => {
                    let out = ctx.run("listing mounts", &["findmnt", "-J"])?;
                    fstab::parse_findmnt_json(&out).unwrap_or_default()
                }
            };
            let Some(base) = others
                .iter()
                .find(whole)
                .or_else(|| live.iter().find(whole))
            else {
                return Err(Error::new(
                    ErrorKind::Internal,
                    format!(
                        "{what} in domain {}: no mount of {} to bind from",
                        ctx.dom(),
                        m.device()
                    ),
                ));
            };
            let from = format!("{}{}", base.target.trim_end_matches('/'), root);
            ctx.run(&what, &["mount", "--bind", &from, &m.target])?;
        }
        _ => {
            ctx.run(
                &what,
                &[
                    "mount",
                    "-t",
                    &m.fstype,
                    "-o",
                    &m.options,
                    m.device(),
                    &m.target,
                ],
            )?;
        }
    }
    Ok(())
}

/// Mounts again (shallowest first, binds last) what was unmounted; collects failures.
fn remount_all(ctx: &Ctx<'_>, unmounted: &[Mount], errors: &mut Vec<Error>) {
    let mut order: Vec<&Mount> = unmounted.iter().rev().collect();
    order.sort_by_key(|m| {
        (
            m.source_root().is_some_and(|r| r != "/") && m.fstype != "btrfs",
            m.target.matches('/').count(),
        )
    });
    for m in order {
        if let Err(e) = mount_again(ctx, m, unmounted) {
            errors.push(e);
        }
    }
}

fn swapon_all(ctx: &Ctx<'_>, swaps: &[SwapRecord], errors: &mut Vec<Error>) {
    for s in swaps {
        let active = ctx
            .agent
            .read_file("/proc/swaps")
            .ok()
            .flatten()
            .map(|b| {
                fstab::parse_proc_swaps(&text::display_text(&b))
                    .iter()
                    .any(|x| x.path == s.path)
            })
            .unwrap_or(false);
        if !active {
            if let Err(e) = ctx.run(&format!("swapon {}", s.path), &["swapon", &s.path]) {
                errors.push(e);
            }
        }
    }
}

// ---- the runner --------------------------------------------------------------------------

/// The dry run of `steps`: per step, the diffs of the files it would change, its other
/// actions and notes. Changes nothing in the guest.
pub fn plan(agent: &dyn GuestAgent, steps: &[PrepStep]) -> Result<Vec<StepPlan>> {
    let ctx = Ctx::new(agent)?;
    steps
        .iter()
        .map(|&step| {
            let w = inspect(&ctx, step)?;
            Ok(StepPlan {
                step,
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
    let ctx = Ctx::new(agent)?;
    steps
        .iter()
        .map(|&step| {
            let w = inspect(&ctx, step)?;
            Ok(StepCheck {
                step,
                ok: w.is_empty(),
                status: w.status(),
                problems: problems(&w),
                notes: w.notes,
            })
        })
        .collect()
}

fn problems(w: &Work) -> Vec<String> {
    let mut p: Vec<String> = w
        .edits
        .iter()
        .map(|e| match e.action() {
            FileAction::Delete => format!("{} still exists", e.path),
            _ => format!("{} is not prepared", e.path),
        })
        .collect();
    p.extend(
        w.unmounts
            .iter()
            .map(|m| format!("{} ({}) is mounted", m.target, m.source)),
    );
    p.extend(w.swapoffs.iter().map(|s| format!("swap {s} is active")));
    p.extend(
        w.commands
            .iter()
            .map(|c| format!("not yet run: {}", c.join(" "))),
    );
    p
}

/// Applies `steps` in order (see the module doc). On failure, everything this call changed is
/// undone before the error is returned.
pub fn apply(agent: &dyn GuestAgent, steps: &[PrepStep]) -> Result<Vec<StepOutcome>> {
    let ctx = Ctx::new(agent)?;
    let backup_root = format!("{BACKUP_ROOT}/{}", crate::util::random_id("apply"));
    let mut done: Vec<StepOutcome> = Vec::new();
    for &step in steps {
        match apply_step(&ctx, step, &format!("{backup_root}/{step}")) {
            Ok(o) => done.push(o),
            Err(e) => {
                if done.iter().any(|o| o.status == OutcomeStatus::Applied) {
                    if let Err(r) = restore_with(&ctx, &done) {
                        tracing::error!(
                            domain = ctx.dom(),
                            error = %e.chain(),
                            undo_error = %r.chain(),
                            "a prep step failed, and undoing the steps before it failed too"
                        );
                        return Err(Error::new(
                            e.kind(),
                            format!("{e}; undoing the steps applied before it failed too"),
                        )
                        .with_source(r));
                    }
                }
                return Err(e);
            }
        }
    }
    Ok(done)
}

fn apply_step(ctx: &Ctx<'_>, step: PrepStep, backup_root: &str) -> Result<StepOutcome> {
    let w = inspect(ctx, step)?;
    let mut o = StepOutcome {
        step,
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
        // 1. Swap and mounts on data disks come down first: a busy mount stops the step
        //    before any file changes.
        for s in &w.swapoffs {
            ctx.run(&format!("swapoff {s}"), &["swapoff", s])?;
            o.swaps_off.push(SwapRecord { path: s.clone() });
        }
        for m in &w.unmounts {
            unmount(ctx, m)?;
            o.unmounted.push(m.clone());
        }
        // 2. Backups of every file, checked.
        if !w.edits.is_empty() {
            o.backup_dir = Some(backup_root.to_string());
        }
        let backups = backup_all(ctx, &w.edits, backup_root)?;
        // 3. The changes.
        for (e, b) in w.edits.iter().zip(backups) {
            o.files.push(b);
            match &e.new {
                Some(bytes) => ctx.agent.write_file(&e.path, bytes, None)?,
                None => ctx.agent.remove_file(&e.path)?,
            }
        }
        // 4. Commands (Windows).
        for c in &w.commands {
            let argv: Vec<&str> = c.iter().map(String::as_str).collect();
            let out = ctx.agent.exec(&argv, None, STEP_EXEC_TIMEOUT)?;
            let said = out.stdout_text();
            if !out.success() && !said.to_ascii_lowercase().contains("already") {
                return Err(Error::new(
                    ErrorKind::Internal,
                    format!(
                        "`{}` in domain {} failed with exit status {}: {}",
                        c.join(" "),
                        ctx.dom(),
                        out.exit_code,
                        one_line(&said)
                    ),
                ));
            }
            o.commands.push(c.clone());
        }
        // 5. The check.
        let after = inspect(ctx, step)?;
        if !after.is_empty() && !ctx.os.is_windows {
            return Err(Error::new(
                ErrorKind::Internal,
                format!(
                    "{step} in domain {}: the check after applying still finds work: {}",
                    ctx.dom(),
                    problems(&after).join("; ")
                ),
            ));
        }
        Ok(())
    })();
    match result {
        Ok(()) => Ok(o),
        Err(e) => {
            // Undo this step's part.
            if let Err(r) = restore_with(ctx, std::slice::from_ref(&o)) {
                tracing::error!(domain = ctx.dom(), step = %step, error = %e.chain(),
                    undo_error = %r.chain(), "a prep step failed, and undoing it failed too");
                return Err(Error::new(
                    e.kind(),
                    format!("{e}; undoing what the step had done failed too"),
                )
                .with_source(r));
            }
            Err(e)
        }
    }
}

/// Copies the files to the backup tree (one program for all) and checks each copy.
fn backup_all(ctx: &Ctx<'_>, edits: &[Edit], root: &str) -> Result<Vec<AppliedFile>> {
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
        ctx.sh(
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
            let copy = ctx.agent.read_file(&dest)?;
            if copy.as_deref() != Some(old.as_slice()) {
                return Err(Error::new(
                    ErrorKind::Aborted,
                    format!(
                        "{} in domain {} changed while it was being prepared (its backup {dest} \
                         differs from what was inspected)",
                        e.path,
                        ctx.dom()
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

fn restore_file(ctx: &Ctx<'_>, f: &AppliedFile) -> Result<()> {
    match f.action {
        FileAction::Create => ctx.agent.remove_file(&f.path),
        FileAction::Modify => {
            let data = match (ctx.agent.read_file(&f.backup)?, &f.original) {
                (Some(d), _) => d,
                // The guest rebooted since (its /run is new): the host kept the content.
                (None, Some(orig)) => orig.clone(),
                (None, None) => {
                    return Err(Error::new(
                        ErrorKind::FailedPrecondition,
                        format!(
                            "cannot restore {} in domain {}: its backup {} is gone",
                            f.path,
                            ctx.dom(),
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
                        ctx.dom(),
                        f.backup
                    ),
                ));
            }
            ctx.agent.write_file(&f.path, &data, None)
        }
        FileAction::Delete => {
            // The backup keeps the file as it was (a link stays a link, modes and owner kept);
            // when the guest rebooted since, the host's copy of the content is written back.
            let res = ctx.sh(
                &format!("restoring {} from {}", f.path, f.backup),
                r#"[ -e "$1" ] || [ -L "$1" ] || { echo "backup $1 is gone" >&2; exit 3; }
cp -a -- "$1" "$2""#,
                &[&f.backup, &f.path],
            );
            match (res, &f.original) {
                (Ok(_), _) => Ok(()),
                (Err(_), Some(orig)) if sha256_hex(orig) == f.original_sha256 => {
                    ctx.agent.write_file(&f.path, orig, None)
                }
                (Err(e), _) => Err(e),
            }
        }
    }
}

/// Undoes applied steps (see the module doc): files first, then mounts and swap, in reverse
/// step order; the backups are removed when everything came back. Every part is attempted;
/// the first failure is returned (naming how many parts failed), the others are logged.
pub fn restore(agent: &dyn GuestAgent, outcomes: &[StepOutcome]) -> Result<()> {
    let ctx = Ctx {
        agent,
        // Restore needs no OS facts; skip a round trip.
        os: OsInfo {
            id: String::new(),
            name: String::new(),
            version_id: String::new(),
            kernel: String::new(),
            is_windows: false,
        },
    };
    restore_with(&ctx, outcomes)
}

fn restore_with(ctx: &Ctx<'_>, outcomes: &[StepOutcome]) -> Result<()> {
    let mut errors: Vec<Error> = Vec::new();
    for o in outcomes.iter().rev() {
        if o.status != OutcomeStatus::Applied {
            continue;
        }
        if !o.commands.is_empty() {
            errors.push(Error::new(
                ErrorKind::FailedPrecondition,
                format!(
                    "{} in domain {}: the Windows network settings changed by netsh cannot be \
                     restored automatically",
                    o.step,
                    ctx.dom()
                ),
            ));
        }
        for f in o.files.iter().rev() {
            if let Err(e) = restore_file(ctx, f) {
                errors.push(e);
            }
        }
        remount_all(ctx, &o.unmounted, &mut errors);
        swapon_all(ctx, &o.swaps_off, &mut errors);
    }
    if errors.is_empty() {
        let dirs: BTreeSet<&str> = outcomes
            .iter()
            .filter_map(|o| o.backup_dir.as_deref())
            .filter(|d| d.starts_with(BACKUP_ROOT) && !d.contains("/../"))
            .collect();
        for d in dirs {
            if let Err(e) = ctx.sh(
                &format!("removing the backups in {d}"),
                r#"rm -rf -- "$1"
d=$(dirname -- "$1")
while [ "${d#/run/imaged-prep}" != "$d" ]; do rmdir -- "$d" 2>/dev/null || break; d=$(dirname -- "$d"); done
exit 0"#,
                &[d],
            ) {
                tracing::warn!(domain = ctx.dom(), error = %e.chain(), "prep backups left behind");
            }
        }
        return Ok(());
    }
    let n = errors.len();
    for e in &errors[1..] {
        tracing::error!(domain = ctx.dom(), error = %e.chain(), "restoring a prep change failed");
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
            ctx.dom()
        ),
    )
    .with_source(first))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_names_parse() {
        assert_eq!(PrepStep::parse("dhcp").unwrap(), [PrepStep::Dhcp]);
        assert_eq!(PrepStep::parse("all").unwrap(), PrepStep::ALL);
        assert_eq!(
            PrepStep::parse(" Fstab-Data-Disks ").unwrap(),
            [PrepStep::FstabDataDisks]
        );
        let e = PrepStep::parse("dhcpp").unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidArgument);
        assert_eq!(
            e.to_string(),
            "unknown prep step \"dhcpp\": valid steps are dhcp, udev-net-rules, setpasswd-hook, \
             fstab-data-disks, or all"
        );
        assert_eq!(
            PrepStep::parse_list(&["fstab-data-disks,dhcp", "dhcp"]).unwrap(),
            [PrepStep::Dhcp, PrepStep::FstabDataDisks]
        );
        assert_eq!(
            PrepStep::parse_list(&["all", "dhcp"]).unwrap(),
            PrepStep::ALL
        );
        assert!(PrepStep::parse_list(&["dhcp", "x"]).is_err());
        assert_eq!(PrepStep::UdevNetRules.to_string(), "udev-net-rules");
        assert_eq!(
            serde_json::to_string(&PrepStep::SetpasswdHook).unwrap(),
            "\"setpasswd-hook\""
        );
    }

    /// A Windows guest as the agent shows it: two NICs and a loopback; netsh answers in
    /// English; every command run is recorded.
    struct FakeWindows {
        ran: std::sync::Mutex<Vec<Vec<String>>>,
    }

    impl GuestAgent for FakeWindows {
        fn domain(&self) -> &str {
            "win1"
        }
        fn ping(&self) -> Result<()> {
            Ok(())
        }
        fn os_info(&self) -> Result<OsInfo> {
            Ok(OsInfo {
                id: "mswindows".into(),
                name: "Microsoft Windows Server 2019".into(),
                version_id: "2019".into(),
                kernel: "10.0".into(),
                is_windows: true,
            })
        }
        fn network_interfaces(&self) -> Result<Vec<crate::guest::agent::NetInterface>> {
            let nic = |name: &str, ip: &str| crate::guest::agent::NetInterface {
                name: name.into(),
                hardware_address: None,
                ip_addresses: vec![ip.into()],
            };
            Ok(vec![
                nic("Ethernet 2", "192.168.1.5/24"),
                nic("Ethernet 3", "10.0.0.5/8"),
                nic("Loopback Pseudo-Interface 1", "127.0.0.1/8"),
            ])
        }
        fn exec(
            &self,
            argv: &[&str],
            _stdin: Option<&[u8]>,
            _timeout: Duration,
        ) -> Result<crate::guest::agent::ExecOutput> {
            self.ran
                .lock()
                .unwrap()
                .push(argv.iter().map(|a| a.to_string()).collect());
            let dhcp = if argv.contains(&"name=Ethernet 3") {
                "Yes"
            } else {
                "No"
            };
            Ok(crate::guest::agent::ExecOutput {
                exit_code: 0,
                signal: None,
                stdout: format!("\r\n    DHCP enabled:                         {dhcp}\r\n")
                    .into_bytes(),
                stderr: Vec::new(),
            })
        }
        fn read_file(&self, _: &str) -> Result<Option<Vec<u8>>> {
            unreachable!("no file access on Windows")
        }
        fn write_file(&self, _: &str, _: &[u8], _: Option<u32>) -> Result<()> {
            unreachable!("no file access on Windows")
        }
        fn remove_file(&self, _: &str) -> Result<()> {
            unreachable!("no file access on Windows")
        }
        fn list_dir(&self, _: &str) -> Result<Vec<String>> {
            unreachable!("no file access on Windows")
        }
        fn rename(&self, _: &str, _: &str) -> Result<()> {
            unreachable!("no file access on Windows")
        }
    }

    #[test]
    fn windows_dhcp_runs_netsh_per_static_interface() {
        let agent = FakeWindows {
            ran: std::sync::Mutex::new(Vec::new()),
        };
        let plans = plan(&agent, &PrepStep::ALL).unwrap();
        assert_eq!(plans[0].status, PlanStatus::Changes);
        assert_eq!(
            plans[0].actions,
            [
                "netsh interface ip set address name=Ethernet 2 source=dhcp",
                "netsh interface ip set dns name=Ethernet 2 source=dhcp"
            ]
        );
        for p in &plans[1..] {
            assert_eq!(p.status, PlanStatus::NotApplicable, "{p:?}");
        }
        agent.ran.lock().unwrap().clear();
        let outcomes = apply(&agent, &PrepStep::ALL).unwrap();
        assert_eq!(outcomes[0].status, OutcomeStatus::Applied);
        assert_eq!(outcomes[0].commands.len(), 2);
        let ran = agent.ran.lock().unwrap().clone();
        assert!(ran.contains(&vec![
            "netsh".to_string(),
            "interface".into(),
            "ip".into(),
            "set".into(),
            "address".into(),
            "name=Ethernet 2".into(),
            "source=dhcp".into()
        ]));
        assert!(!ran.iter().flatten().any(|a| a.contains("Loopback")));
        let e = restore(&agent, &outcomes).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::FailedPrecondition);
        assert!(
            e.to_string().contains("cannot be restored automatically"),
            "{e}"
        );
    }

    #[test]
    fn outcomes_serialize_for_the_journal() {
        let o = StepOutcome {
            step: PrepStep::FstabDataDisks,
            status: OutcomeStatus::Applied,
            files: vec![AppliedFile {
                path: "/etc/fstab".into(),
                action: FileAction::Modify,
                backup: format!("{BACKUP_ROOT}/apply-1/etc/fstab"),
                original_sha256: sha256_hex(b"x"),
                original: Some(b"UUID=1 / ext4 defaults 0 1\n\x1b[2J".to_vec()),
            }],
            unmounted: vec![Mount {
                target: "/mnt/data".into(),
                source: "/dev/vdb1".into(),
                fstype: "ext4".into(),
                options: "rw,relatime".into(),
            }],
            swaps_off: vec![SwapRecord {
                path: "/dev/vdb3".into(),
            }],
            commands: vec![],
            backup_dir: Some(format!("{BACKUP_ROOT}/apply-1")),
            notes: vec![],
        };
        let j = serde_json::to_string(&o).unwrap();
        assert!(j.contains("\"step\":\"fstab-data-disks\""), "{j}");
        assert_eq!(serde_json::from_str::<StepOutcome>(&j).unwrap(), o);
    }
}
