//! The `fstab-data-disks` step: the filesystems and swap on data disks come down and their
//! `/etc/fstab` lines are removed. This file holds the pure part (which filesystems live on a
//! data disk, from the parsed output of the guest's tools) and, below it, the step's guest I/O
//! (`FstabDataDisks`: the inspection, unmounting and `swapoff`, and mounting and `swapon`
//! again on undo).
//!
//! The guest's block devices come from `lsblk -J -o NAME,KNAME,PKNAME,TYPE,MOUNTPOINT,UUID,
//! LABEL,PARTUUID,PARTLABEL` ([`parse_lsblk_json`]; `lsblk -P` output, for util-linux older
//! than 2.27, through [`parse_lsblk_pairs`]), its mounts from `findmnt -J`
//! ([`parse_findmnt_json`]; `/proc/self/mounts` through [`parse_proc_mounts`]) and its active
//! swap from `/proc/swaps` ([`parse_proc_swaps`]). Device paths (`/dev/disk/by-*`,
//! `/dev/mapper/*`, `/dev/vdb1`) are canonicalised inside the guest (`readlink -f`) by the
//! inspection and looked up by kernel name.
//!
//! The *system disks* are the top-level disks under the device holding `/` (several for RAID or
//! LVM spanning disks). A device is on a *data disk* when every top-level device under it is a
//! `disk` that is not a system disk (so loop devices and CD-ROMs are never data disks). An
//! fstab entry is removed when its source resolves to a device on a data disk (swap included),
//! or when it bind-mounts a path below a removed entry's mount point; pseudo filesystems
//! (proc, sysfs, tmpfs, ...), network filesystems (nfs, cifs, ...) and entries that resolve to
//! no device are kept (the last with a note).

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde_json::Value;

use super::{Edit, Inspection, Step};
use crate::error::{Error, ErrorKind, Result};
use crate::guest::prep::io::{one_line, GuestIo, STEP_EXEC_TIMEOUT};
use crate::guest::prep::text::{self, dominant_eol, lines, Builder};
use crate::guest::prep::{PrepStep, StepOutcome, SwapRecord};

/// Filesystem types that are not on a block device.
pub const PSEUDO_FS: &[&str] = &[
    "proc",
    "sysfs",
    "tmpfs",
    "devtmpfs",
    "devpts",
    "cgroup",
    "cgroup2",
    "securityfs",
    "debugfs",
    "tracefs",
    "hugetlbfs",
    "mqueue",
    "pstore",
    "bpf",
    "configfs",
    "fusectl",
    "efivarfs",
    "autofs",
    "binfmt_misc",
    "ramfs",
    "rpc_pipefs",
    "nfsd",
    "overlay",
    "squashfs",
    "none",
];
/// Network and cluster filesystem types.
pub const NETWORK_FS: &[&str] = &[
    "nfs",
    "nfs4",
    "cifs",
    "smbfs",
    "smb3",
    "ncpfs",
    "glusterfs",
    "ceph",
    "fuse.sshfs",
    "fuse.glusterfs",
    "fuse.s3fs",
    "davfs",
    "9p",
    "virtiofs",
    "afs",
    "lustre",
];

/// Whether an fstype is pseudo or network (never on a data disk).
pub fn is_pseudo_or_network(fstype: &str) -> bool {
    fstype
        .split(',')
        .any(|t| PSEUDO_FS.contains(&t) || NETWORK_FS.contains(&t))
}

/// A block device as lsblk reports it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BlockDev {
    /// Kernel name (`vdb1`, `dm-0`).
    pub kname: String,
    /// lsblk's name (`vg-data` for device-mapper devices).
    pub name: String,
    /// `disk`, `part`, `lvm`, `crypt`, `raid1`, `loop`, `rom`...
    pub dtype: String,
    pub mountpoint: Option<String>,
    pub uuid: Option<String>,
    pub label: Option<String>,
    pub partuuid: Option<String>,
    pub partlabel: Option<String>,
    /// Kernel names of the devices it sits on (several for RAID and spanning LVM).
    pub parents: Vec<String>,
}

/// The guest's block devices by kernel name.
#[derive(Debug, Clone, Default)]
pub struct Topology {
    pub devs: BTreeMap<String, BlockDev>,
}

fn opt_str(v: &Value, k: &str) -> Option<String> {
    v.get(k)
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
}

/// Parses `lsblk -J` (tree or list form; KNAME and PKNAME columns optional).
pub fn parse_lsblk_json(text: &str) -> Result<Topology, String> {
    let v: Value = serde_json::from_str(text).map_err(|e| format!("lsblk -J output: {e}"))?;
    let list = v
        .get("blockdevices")
        .and_then(Value::as_array)
        .ok_or("lsblk -J output has no blockdevices")?;
    let mut topo = Topology::default();
    fn walk(t: &mut Topology, v: &Value, parent: Option<&str>, depth: usize) {
        if depth > 64 {
            return;
        }
        let Some(name) = opt_str(v, "name") else {
            return;
        };
        let kname = opt_str(v, "kname").unwrap_or_else(|| name.clone());
        let mut parents: Vec<String> = parent.map(str::to_string).into_iter().collect();
        if let Some(pk) = opt_str(v, "pkname") {
            parents.push(pk);
        }
        let mountpoint = opt_str(v, "mountpoint").or_else(|| {
            v.get("mountpoints")
                .and_then(Value::as_array)
                .and_then(|a| a.iter().find_map(|m| m.as_str().map(str::to_string)))
        });
        let d = t.devs.entry(kname.clone()).or_insert_with(|| BlockDev {
            kname: kname.clone(),
            name: name.clone(),
            dtype: opt_str(v, "type").unwrap_or_default(),
            mountpoint,
            uuid: opt_str(v, "uuid"),
            label: opt_str(v, "label"),
            partuuid: opt_str(v, "partuuid"),
            partlabel: opt_str(v, "partlabel"),
            parents: Vec::new(),
        });
        for p in parents {
            if !d.parents.contains(&p) {
                d.parents.push(p);
            }
        }
        if let Some(children) = v.get("children").and_then(Value::as_array) {
            for c in children {
                walk(t, c, Some(&kname), depth + 1);
            }
        }
    }
    for d in list {
        walk(&mut topo, d, None, 0);
    }
    Ok(topo)
}

/// Splits `KEY="value" KEY2="value"` (lsblk -P, with `\xNN` escapes).
fn parse_pairs(line: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut rest = line.trim();
    while let Some(eq) = rest.find("=\"") {
        let key = rest[..eq].trim().to_string();
        let body = &rest[eq + 2..];
        let Some(end) = body.find('"') else { break };
        out.push((key, unescape_hex(&body[..end])));
        rest = &body[end + 1..];
    }
    out
}

fn unescape_hex(s: &str) -> String {
    let b = s.as_bytes();
    let hex = |c: u8| (c as char).to_digit(16);
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1] == b'x' {
            if let (Some(h), Some(l)) = (hex(b[i + 2]), hex(b[i + 3])) {
                out.push((h * 16 + l) as u8);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parses `lsblk -P -o NAME,KNAME,PKNAME,TYPE,MOUNTPOINT,UUID,LABEL,PARTUUID,PARTLABEL`.
pub fn parse_lsblk_pairs(text: &str) -> Topology {
    let mut topo = Topology::default();
    for line in text.lines() {
        let kv: HashMap<String, String> = parse_pairs(line).into_iter().collect();
        let get = |k: &str| kv.get(k).filter(|v| !v.is_empty()).cloned();
        let Some(name) = get("NAME") else { continue };
        let kname = get("KNAME").unwrap_or_else(|| name.clone());
        let d = topo.devs.entry(kname.clone()).or_insert_with(|| BlockDev {
            kname,
            name,
            dtype: get("TYPE").unwrap_or_default(),
            mountpoint: get("MOUNTPOINT"),
            uuid: get("UUID"),
            label: get("LABEL"),
            partuuid: get("PARTUUID"),
            partlabel: get("PARTLABEL"),
            parents: Vec::new(),
        });
        if let Some(pk) = get("PKNAME") {
            if !d.parents.contains(&pk) {
                d.parents.push(pk);
            }
        }
    }
    topo
}

impl Topology {
    /// The top-level devices under `kname` (itself when it has no parent).
    pub fn roots(&self, kname: &str) -> BTreeSet<String> {
        let mut out = BTreeSet::new();
        let mut stack = vec![kname.to_string()];
        let mut seen = BTreeSet::new();
        while let Some(k) = stack.pop() {
            if !seen.insert(k.clone()) || seen.len() > 4096 {
                continue;
            }
            match self.devs.get(&k) {
                Some(d) if !d.parents.is_empty() => stack.extend(d.parents.iter().cloned()),
                Some(_) => {
                    out.insert(k);
                }
                None => {}
            }
        }
        out
    }

    /// The device for a tag spec (`UUID=`, `LABEL=`, `PARTUUID=`, `PARTLABEL=`), if any.
    pub fn by_tag(&self, spec: &str) -> Option<&BlockDev> {
        let (tag, value) = spec.split_once('=')?;
        let value = value.trim_matches(|c| c == '"' || c == '\'');
        if value.is_empty() {
            return None;
        }
        self.devs.values().find(|d| match tag {
            "UUID" => d
                .uuid
                .as_deref()
                .is_some_and(|u| u.eq_ignore_ascii_case(value)),
            "LABEL" => d.label.as_deref() == Some(value),
            "PARTUUID" => d
                .partuuid
                .as_deref()
                .is_some_and(|u| u.eq_ignore_ascii_case(value)),
            "PARTLABEL" => d.partlabel.as_deref() == Some(value),
            _ => false,
        })
    }

    /// The device a canonical device path (`/dev/vdb1`, `/dev/dm-0`) names.
    pub fn by_path(&self, canonical: &str) -> Option<&BlockDev> {
        let name = canonical.strip_prefix("/dev/")?;
        self.devs
            .get(name)
            .or_else(|| self.devs.values().find(|d| d.name == name))
    }

    /// The top-level disks under the device mounted at `/`.
    pub fn system_disks(&self, root_kname: &str) -> BTreeSet<String> {
        self.roots(root_kname)
    }

    /// Whether `kname` lives only on disks that are not system disks.
    pub fn on_data_disk(&self, kname: &str, system: &BTreeSet<String>) -> bool {
        let roots = self.roots(kname);
        !roots.is_empty()
            && roots
                .iter()
                .all(|r| !system.contains(r) && self.devs.get(r).is_some_and(|d| d.dtype == "disk"))
    }
}

/// A mounted filesystem.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Mount {
    /// Mount point.
    pub target: String,
    /// Source as findmnt shows it (`/dev/vdb1`, `/dev/vdb1[/sub]` for a bind mount).
    pub source: String,
    pub fstype: String,
    pub options: String,
}

impl Mount {
    /// The source device path without a `[/path]` suffix.
    pub fn device(&self) -> &str {
        match self.source.find('[') {
            Some(i) if self.source.ends_with(']') => &self.source[..i],
            _ => &self.source,
        }
    }
    /// The `[/path]` part of the source (a bind mount or btrfs subvolume), if any.
    pub fn source_root(&self) -> Option<&str> {
        let i = self.source.find('[')?;
        self.source[i + 1..].strip_suffix(']')
    }
}

/// Parses `findmnt -J` (tree form, or `--list`), in mount order.
pub fn parse_findmnt_json(text: &str) -> Result<Vec<Mount>, String> {
    let v: Value = serde_json::from_str(text).map_err(|e| format!("findmnt -J output: {e}"))?;
    let list = v
        .get("filesystems")
        .and_then(Value::as_array)
        .ok_or("findmnt -J output has no filesystems")?;
    let mut out = Vec::new();
    fn walk(out: &mut Vec<Mount>, v: &Value, depth: usize) {
        if depth > 256 || out.len() > 100_000 {
            return;
        }
        if let (Some(target), Some(source)) = (opt_str(v, "target"), opt_str(v, "source")) {
            out.push(Mount {
                target,
                source,
                fstype: opt_str(v, "fstype").unwrap_or_default(),
                options: opt_str(v, "options").unwrap_or_default(),
            });
        }
        if let Some(children) = v.get("children").and_then(Value::as_array) {
            for c in children {
                walk(out, c, depth + 1);
            }
        }
    }
    for m in list {
        walk(&mut out, m, 0);
    }
    Ok(out)
}

/// Undoes the octal escapes of /proc/mounts and fstab (`\040` for a space).
pub fn unescape_octal(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() {
            let o = &b[i + 1..i + 4];
            if o.iter().all(|c| (b'0'..=b'7').contains(c)) {
                let v = u32::from(o[0] - b'0') * 64
                    + u32::from(o[1] - b'0') * 8
                    + u32::from(o[2] - b'0');
                if let Ok(v) = u8::try_from(v) {
                    out.push(v);
                    i += 4;
                    continue;
                }
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parses `/proc/self/mounts` (fallback when findmnt has no JSON).
pub fn parse_proc_mounts(text: &str) -> Vec<Mount> {
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() >= 4).then(|| Mount {
                source: unescape_octal(f[0]),
                target: unescape_octal(f[1]),
                fstype: f[2].to_string(),
                options: f[3].to_string(),
            })
        })
        .collect()
}

/// An active swap area from `/proc/swaps`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Swap {
    pub path: String,
    /// `partition` or `file`.
    pub kind: String,
}

/// Parses `/proc/swaps`.
pub fn parse_proc_swaps(text: &str) -> Vec<Swap> {
    text.lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() >= 2).then(|| Swap {
                path: unescape_octal(f[0]),
                kind: f[1].to_string(),
            })
        })
        .collect()
}

/// One entry (line) of `/etc/fstab`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FstabEntry {
    /// Index of its line in the file (from 0).
    pub line: usize,
    /// First field, unescaped (`UUID=...`, `/dev/vdb1`, `server:/x`).
    pub spec: String,
    /// Mount point (`none` or `swap` for swap).
    pub target: String,
    pub fstype: String,
    pub options: String,
}

impl FstabEntry {
    /// A swap entry.
    pub fn is_swap(&self) -> bool {
        self.fstype == "swap"
    }
    /// A bind mount.
    pub fn is_bind(&self) -> bool {
        self.options.split(',').any(|o| o == "bind" || o == "rbind")
    }
}

/// The entries of an fstab (comments, blank and malformed lines skipped).
pub fn parse_fstab(text: &str) -> Vec<FstabEntry> {
    lines(text)
        .iter()
        .enumerate()
        .filter_map(|(i, l)| {
            let t = l.text.trim();
            if t.is_empty() || t.starts_with('#') {
                return None;
            }
            let f: Vec<&str> = t.split_whitespace().collect();
            (f.len() >= 3).then(|| FstabEntry {
                line: i,
                spec: unescape_octal(f[0]),
                target: unescape_octal(f[1]),
                fstype: f[2].to_string(),
                options: f.get(3).copied().unwrap_or("defaults").to_string(),
            })
        })
        .collect()
}

/// `text` without the lines at the given indexes (other lines byte-identical).
pub fn remove_lines(text: &str, drop: &BTreeSet<usize>) -> String {
    let mut b = Builder::new(dominant_eol(text), text.len());
    for (i, l) in lines(text).iter().enumerate() {
        if !drop.contains(&i) {
            b.keep(l);
        }
    }
    b.finish()
}

/// A device path in `spec` that must be canonicalised in the guest (`/dev/...`).
pub fn needs_resolving(spec: &str) -> bool {
    spec.starts_with("/dev/")
}

/// Why an fstab entry stays or goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Stays: on the system disk, pseudo, network, CD-ROM, loop...
    Keep,
    /// Stays, but its source could not be found among the guest's devices.
    Unresolved,
    /// Goes: on data-disk device `kname`.
    Remove { kname: String },
    /// Goes: a bind mount of a path below the removed mount point `of`.
    RemoveBind { of: String },
}

/// `path` is `dir` or below it.
pub fn is_under(path: &str, dir: &str) -> bool {
    let dir = dir.trim_end_matches('/');
    if dir.is_empty() {
        return path.starts_with('/');
    }
    path == dir
        || path
            .strip_prefix(dir)
            .is_some_and(|rest| rest.starts_with('/'))
}

/// Decides every fstab entry. `canonical` maps each `/dev/...` spec to `readlink -f` of it
/// in the guest; `system` is the set of system disks.
pub fn decide(
    entries: &[FstabEntry],
    topo: &Topology,
    canonical: &HashMap<String, String>,
    system: &BTreeSet<String>,
) -> Vec<Decision> {
    let resolve = |spec: &str| -> Option<String> {
        if needs_resolving(spec) {
            let c = canonical.get(spec).map(String::as_str).unwrap_or(spec);
            topo.by_path(c).map(|d| d.kname.clone())
        } else if spec.contains('=') {
            topo.by_tag(spec).map(|d| d.kname.clone())
        } else {
            None
        }
    };
    let mut out: Vec<Decision> = entries
        .iter()
        .map(|e| {
            if is_pseudo_or_network(&e.fstype) || e.is_bind() {
                return Decision::Keep;
            }
            match resolve(&e.spec) {
                Some(k) if topo.on_data_disk(&k, system) => Decision::Remove { kname: k },
                Some(_) => Decision::Keep,
                None if needs_resolving(&e.spec) || e.spec.contains('=') => Decision::Unresolved,
                None => Decision::Keep,
            }
        })
        .collect();
    let removed_targets: Vec<String> = entries
        .iter()
        .zip(&out)
        .filter(|(e, d)| matches!(d, Decision::Remove { .. }) && !e.is_swap())
        .map(|(e, _)| e.target.clone())
        .collect();
    for (e, d) in entries.iter().zip(out.iter_mut()) {
        if e.is_bind() {
            if let Some(of) = removed_targets.iter().find(|t| is_under(&e.spec, t)) {
                *d = Decision::RemoveBind { of: of.clone() };
            }
        }
    }
    out
}

/// The mounts to take down, deepest first: those whose source device is on a data disk and
/// everything mounted below them. `canonical` maps mount source devices to `readlink -f`.
pub fn data_mounts(
    mounts: &[Mount],
    topo: &Topology,
    canonical: &HashMap<String, String>,
    system: &BTreeSet<String>,
) -> Vec<Mount> {
    let on_data = |m: &Mount| {
        if is_pseudo_or_network(&m.fstype) || !needs_resolving(m.device()) {
            return false;
        }
        let c = canonical
            .get(m.device())
            .map(String::as_str)
            .unwrap_or(m.device());
        topo.by_path(c)
            .is_some_and(|d| topo.on_data_disk(&d.kname, system))
    };
    let data: Vec<&Mount> = mounts.iter().filter(|m| on_data(m)).collect();
    let mut out: Vec<(usize, Mount)> = mounts
        .iter()
        .enumerate()
        .filter(|(_, m)| on_data(m) || data.iter().any(|d| is_under(&m.target, &d.target)))
        .map(|(i, m)| (i, m.clone()))
        .collect();
    // Deepest first; among equals, the later mount first.
    out.sort_by(|(ia, a), (ib, b)| {
        let depth = |m: &Mount| m.target.matches('/').count() - usize::from(m.target == "/");
        depth(b).cmp(&depth(a)).then(ib.cmp(ia))
    });
    out.into_iter().map(|(_, m)| m).collect()
}

/// A process that keeps a mount busy, from `ls -l /proc/*/{cwd,root,fd/}` output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    pub pid: u32,
    pub command: String,
    /// `cwd`, `root` or `fd N`.
    pub how: String,
}

/// Finds the processes holding `target` in the output of the holder script: `ls -ld
/// /proc/[0-9]*/cwd /proc/[0-9]*/root`, `ls -l /proc/[0-9]*/fd/` and `grep . /proc/*/comm`.
pub fn parse_holders(text: &str, target: &str) -> Vec<Holder> {
    let mut comm: HashMap<u32, String> = HashMap::new();
    let mut found: Vec<(u32, String)> = Vec::new();
    let mut fd_dir: Option<u32> = None;
    let pid_of =
        |p: &str| -> Option<u32> { p.strip_prefix("/proc/")?.split('/').next()?.parse().ok() };
    for line in text.lines() {
        // `/proc/123/comm:sleep`
        if let Some((path, name)) = line.split_once("/comm:") {
            if let Some(pid) = pid_of(&format!("{path}/")) {
                comm.insert(pid, name.trim().to_string());
                continue;
            }
        }
        // `/proc/123/fd:` header of an `ls -l DIR...` listing.
        if line.starts_with("/proc/") && line.ends_with("/fd:") {
            fd_dir = pid_of(line);
            continue;
        }
        let Some((left, dest)) = line.split_once(" -> ") else {
            continue;
        };
        if !is_under(dest.trim_end(), target) {
            continue;
        }
        let last = left.split_whitespace().last().unwrap_or("");
        if let Some(pid) = pid_of(last) {
            let how = last.rsplit('/').next().unwrap_or("").to_string();
            found.push((pid, how));
        } else if let Some(pid) = fd_dir {
            found.push((pid, format!("fd {last}")));
        }
    }
    let mut out: Vec<Holder> = Vec::new();
    for (pid, how) in found {
        if out.iter().any(|h| h.pid == pid) {
            continue;
        }
        out.push(Holder {
            pid,
            command: comm.get(&pid).cloned().unwrap_or_else(|| "?".into()),
            how,
        });
    }
    out
}

// ---- the step: guest I/O ----------------------------------------------------------------

/// The `fstab-data-disks` step.
pub(crate) struct FstabDataDisks;

impl Step for FstabDataDisks {
    fn id(&self) -> PrepStep {
        PrepStep::FstabDataDisks
    }

    fn inspect(&self, io: &GuestIo<'_>) -> Result<Inspection> {
        inspection(io)
    }

    /// Swap on data disks off, then the data-disk filesystems unmounted (a busy one fails
    /// the step, naming what holds it).
    fn take_down(&self, io: &GuestIo<'_>, work: &Inspection, done: &mut StepOutcome) -> Result<()> {
        for s in &work.swapoffs {
            io.run(&format!("swapoff {s}"), &["swapoff", s])?;
            done.swaps_off.push(SwapRecord { path: s.clone() });
        }
        for m in &work.unmounts {
            unmount(io, m)?;
            done.unmounted.push(m.clone());
        }
        Ok(())
    }

    /// The filesystems mounted again, then the swap switched on again.
    fn undo(&self, io: &GuestIo<'_>, done: &StepOutcome, errors: &mut Vec<Error>) {
        remount_all(io, &done.unmounted, errors);
        swapon_all(io, &done.swaps_off, errors);
    }
}

/// The columns asked from `lsblk`.
const LSBLK_COLUMNS: &str = "NAME,KNAME,PKNAME,TYPE,MOUNTPOINT,UUID,LABEL,PARTUUID,PARTLABEL";

/// What the guest's disks and mounts look like.
struct DiskView {
    topo: Topology,
    mounts: Vec<Mount>,
    swaps: Vec<Swap>,
    canonical: HashMap<String, String>,
    system: BTreeSet<String>,
}

/// Looks at the guest's disks and mounts; `extra_paths` (fstab sources) are canonicalised
/// too. FAILED_PRECONDITION when the system disk cannot be told.
fn disk_view(io: &GuestIo<'_>, extra_paths: &[&str]) -> Result<DiskView> {
    let a = io.agent;
    let dom = io.dom();
    let lsblk = a.exec(
        &["lsblk", "-J", "-o", LSBLK_COLUMNS],
        None,
        STEP_EXEC_TIMEOUT,
    )?;
    let topo = if lsblk.success() {
        parse_lsblk_json(&lsblk.stdout_text()).map_err(|e| {
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
        parse_lsblk_pairs(&pairs.stdout_text())
    };
    let findmnt = a.exec(&["findmnt", "-J"], None, STEP_EXEC_TIMEOUT)?;
    let mounts = match findmnt
        .success()
        .then(|| parse_findmnt_json(&findmnt.stdout_text()).ok())
        .flatten()
    {
        Some(m) => m,
        None => {
            let text = a.read_file("/proc/self/mounts")?.unwrap_or_default();
            parse_proc_mounts(&text::display_text(&text))
        }
    };
    let swaps = a
        .read_file("/proc/swaps")?
        .map(|b| parse_proc_swaps(&text::display_text(&b)))
        .unwrap_or_default();
    let root_mount = mounts.iter().rev().find(|m| m.target == "/");
    // Every /dev path we will need, canonicalised in the guest in one go.
    let mut paths: BTreeSet<String> = extra_paths
        .iter()
        .filter(|p| needs_resolving(p))
        .map(|p| p.to_string())
        .collect();
    paths.extend(
        mounts
            .iter()
            .map(|m| m.device().to_string())
            .filter(|d| needs_resolving(d)),
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
        let out = io.sh(
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

/// The data-disk lines of `/etc/fstab`, and the data-disk mounts and swap that are active.
fn inspection(io: &GuestIo<'_>) -> Result<Inspection> {
    let mut w = Inspection {
        applicable: true,
        ..Inspection::default()
    };
    let fstab_bytes = io.agent.read_file("/etc/fstab")?;
    let fstab_text = fstab_bytes.as_deref().map(text::decode);
    let entries = fstab_text
        .as_ref()
        .map(|d| parse_fstab(&d.text))
        .unwrap_or_default();
    let specs: Vec<&str> = entries.iter().map(|e| e.spec.as_str()).collect();
    let view = disk_view(io, &specs)?;
    let decisions = decide(&entries, &view.topo, &view.canonical, &view.system);
    let mut drop = BTreeSet::new();
    for (e, d) in entries.iter().zip(&decisions) {
        match d {
            Decision::Remove { kname } => {
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
            Decision::RemoveBind { of } => {
                drop.insert(e.line);
                w.notes.push(format!(
                    "/etc/fstab line {}: bind mount of {} below {of}, removed with it",
                    e.line + 1,
                    e.spec
                ));
            }
            Decision::Unresolved => w.notes.push(format!(
                "/etc/fstab line {}: {} ({}) matches no device in the guest; kept",
                e.line + 1,
                e.spec,
                e.target
            )),
            Decision::Keep => {}
        }
    }
    if let (Some(bytes), Some(d)) = (&fstab_bytes, &fstab_text) {
        if !drop.is_empty() {
            w.edits.push(Edit {
                path: "/etc/fstab".into(),
                old: Some(bytes.clone()),
                new: Some(text::encode(&remove_lines(&d.text, &drop), d.latin1)),
            });
        }
    }
    w.unmounts = data_mounts(&view.mounts, &view.topo, &view.canonical, &view.system);
    for s in &view.swaps {
        let on_data = match s.kind.as_str() {
            "partition" => {
                let c = view.canonical.get(&s.path).unwrap_or(&s.path);
                view.topo
                    .by_path(c)
                    .is_some_and(|d| view.topo.on_data_disk(&d.kname, &view.system))
            }
            _ => w.unmounts.iter().any(|m| is_under(&s.path, &m.target)),
        };
        if on_data {
            w.swapoffs.push(s.path.clone());
        }
    }
    Ok(w)
}

/// Unmounts `m`; when it is busy, the error names what holds it.
fn unmount(io: &GuestIo<'_>, m: &Mount) -> Result<()> {
    let out = io
        .agent
        .exec(&["umount", &m.target], None, STEP_EXEC_TIMEOUT)?;
    if out.success() {
        return Ok(());
    }
    let err = out.stderr_text();
    let busy = err.contains("busy") || out.exit_code == 32;
    let holders = if busy { holders(io, &m.target) } else { None };
    let mut msg = format!(
        "fstab-data-disks: cannot unmount {} ({}) in domain {}",
        m.target,
        m.source,
        io.dom()
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
fn holders(io: &GuestIo<'_>, target: &str) -> Option<String> {
    let out = io
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
            let h = parse_holders(rest, target);
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

/// Mounts `m` again unless something is mounted there; a bind mount from where its device is
/// mounted whole (among `others`, else among the guest's mounts).
fn mount_again(io: &GuestIo<'_>, m: &Mount, others: &[Mount]) -> Result<()> {
    let mounted = io
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
                    let out = io.run("listing mounts", &["findmnt", "-J"])?;
                    parse_findmnt_json(&out).unwrap_or_default()
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
                        io.dom(),
                        m.device()
                    ),
                ));
            };
            let from = format!("{}{}", base.target.trim_end_matches('/'), root);
            io.run(&what, &["mount", "--bind", &from, &m.target])?;
        }
        _ => {
            io.run(
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
fn remount_all(io: &GuestIo<'_>, unmounted: &[Mount], errors: &mut Vec<Error>) {
    let mut order: Vec<&Mount> = unmounted.iter().rev().collect();
    order.sort_by_key(|m| {
        (
            m.source_root().is_some_and(|r| r != "/") && m.fstype != "btrfs",
            m.target.matches('/').count(),
        )
    });
    for m in order {
        if let Err(e) = mount_again(io, m, unmounted) {
            errors.push(e);
        }
    }
}

/// Switches on again the swap areas that are not active; collects failures.
fn swapon_all(io: &GuestIo<'_>, swaps: &[SwapRecord], errors: &mut Vec<Error>) {
    for s in swaps {
        let active = io
            .agent
            .read_file("/proc/swaps")
            .ok()
            .flatten()
            .map(|b| {
                parse_proc_swaps(&text::display_text(&b))
                    .iter()
                    .any(|x| x.path == s.path)
            })
            .unwrap_or(false);
        if !active {
            if let Err(e) = io.run(&format!("swapon {}", s.path), &["swapon", &s.path]) {
                errors.push(e);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LSBLK: &str = r#"{"blockdevices": [
      {"name":"vda","kname":"vda","pkname":null,"type":"disk","mountpoint":null,"uuid":null,"label":null,"partuuid":null,"partlabel":null,
       "children":[
         {"name":"vda1","kname":"vda1","pkname":"vda","type":"part","mountpoint":"/boot","uuid":"B00T","label":null,"partuuid":"aaaa-01","partlabel":null},
         {"name":"vda2","kname":"vda2","pkname":"vda","type":"part","mountpoint":null,"uuid":"pv","label":null,"partuuid":"aaaa-02","partlabel":null,
          "children":[
            {"name":"vg-root","kname":"dm-0","pkname":"vda2","type":"lvm","mountpoint":"/","uuid":"R00T","label":"root","partuuid":null,"partlabel":null},
            {"name":"vg-swap","kname":"dm-1","pkname":"vda2","type":"lvm","mountpoint":"[SWAP]","uuid":"SW","label":null,"partuuid":null,"partlabel":null}
          ]}
       ]},
      {"name":"vdb","kname":"vdb","pkname":null,"type":"disk","mountpoint":null,"uuid":null,"label":null,"partuuid":null,"partlabel":null,
       "children":[
         {"name":"vdb1","kname":"vdb1","pkname":"vdb","type":"part","mountpoint":"/mnt/data","uuid":"d4t4-0001","label":null,"partuuid":"1234abcd-01","partlabel":null},
         {"name":"vdb2","kname":"vdb2","pkname":"vdb","type":"part","mountpoint":"/srv/label","uuid":"d4t4-0002","label":"datalabel","partuuid":"1234abcd-02","partlabel":"p2"},
         {"name":"vdb3","kname":"vdb3","pkname":"vdb","type":"part","mountpoint":"[SWAP]","uuid":"sw2","label":null,"partuuid":"1234abcd-03","partlabel":null}
       ]},
      {"name":"vdc","kname":"vdc","pkname":null,"type":"disk","mountpoint":"/mnt/whole","uuid":"WH0LE","label":null,"partuuid":null,"partlabel":null},
      {"name":"sr0","kname":"sr0","pkname":null,"type":"rom","mountpoint":null,"uuid":"2024-01-01","label":"CDROM","partuuid":null,"partlabel":null},
      {"name":"loop0","kname":"loop0","pkname":null,"type":"loop","mountpoint":"/mnt/iso","uuid":"L00P","label":null,"partuuid":null,"partlabel":null}
    ]}"#;

    const FSTAB: &str = "\
# /etc/fstab: static file system information.
#
# <file system>\t<mount point>\t<type>\t<options>\t<dump>\t<pass>
/dev/mapper/vg-root /               ext4    errors=remount-ro 0       1
UUID=b00t /boot ext4 defaults 0 2
/dev/mapper/vg-swap none            swap    sw              0       0
UUID=\"D4T4-0001\"\t/mnt/data\text4\tdefaults\t0\t2
LABEL=datalabel /srv/label ext4 defaults,nofail 0 2
PARTUUID=1234abcd-03 none swap sw 0 0
/dev/disk/by-uuid/WH0LE /mnt/whole ext4 defaults 0 2
/mnt/data/www /var/www none bind 0 0
/var/lib/x /var/y none bind 0 0
proc /proc proc defaults 0 0
tmpfs /tmp tmpfs size=1g 0 0
nas:/export /mnt/nfs nfs4 _netdev 0 0
//srv/share /mnt/smb cifs credentials=/root/c 0 0
/dev/sr0 /media/cdrom0 udf,iso9660 user,noauto 0 0
/srv/disk.iso /mnt/iso iso9660 loop 0 0
UUID=gone /mnt/gone ext4 nofail 0 2
/dev/vdz1 /mnt/vdz ext4 nofail 0 2
";

    fn canonical() -> HashMap<String, String> {
        [
            ("/dev/mapper/vg-root", "/dev/dm-0"),
            ("/dev/mapper/vg-swap", "/dev/dm-1"),
            ("/dev/disk/by-uuid/WH0LE", "/dev/vdc"),
            ("/dev/sr0", "/dev/sr0"),
            ("/dev/vdb1", "/dev/vdb1"),
            ("/dev/vdc", "/dev/vdc"),
            ("/dev/loop0", "/dev/loop0"),
            ("/dev/vdz1", "/dev/vdz1"),
        ]
        .into_iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect()
    }

    #[test]
    fn topology_roots_and_data_disks() {
        let t = parse_lsblk_json(LSBLK).unwrap();
        let root = t
            .devs
            .values()
            .find(|d| d.mountpoint.as_deref() == Some("/"))
            .unwrap();
        assert_eq!(root.kname, "dm-0");
        let system = t.system_disks(&root.kname);
        assert_eq!(system.iter().collect::<Vec<_>>(), ["vda"]);
        assert!(t.on_data_disk("vdb1", &system));
        assert!(t.on_data_disk("vdc", &system));
        assert!(!t.on_data_disk("dm-1", &system));
        assert!(!t.on_data_disk("sr0", &system), "a CD-ROM is no data disk");
        assert!(!t.on_data_disk("loop0", &system));
        assert!(!t.on_data_disk("unknown", &system));
        assert_eq!(t.by_tag("UUID=b00t").unwrap().kname, "vda1");
        assert_eq!(t.by_tag("PARTLABEL=p2").unwrap().kname, "vdb2");
        assert_eq!(t.by_path("/dev/vg-root").unwrap().kname, "dm-0");
    }

    #[test]
    fn raid_on_two_disks_makes_both_system_disks() {
        let j = r#"{"blockdevices":[
          {"name":"vda","type":"disk","children":[{"name":"vda1","type":"part","children":[{"name":"md0","type":"raid1","mountpoint":"/"}]}]},
          {"name":"vdb","type":"disk","children":[{"name":"vdb1","type":"part","children":[{"name":"md0","type":"raid1","mountpoint":"/"}]}]},
          {"name":"vdc","type":"disk","mountpoint":"/data"}]}"#;
        let t = parse_lsblk_json(j).unwrap();
        let system = t.system_disks("md0");
        assert_eq!(system.len(), 2);
        assert!(!t.on_data_disk("vdb1", &system));
        assert!(t.on_data_disk("vdc", &system));
    }

    #[test]
    fn fstab_decisions() {
        let t = parse_lsblk_json(LSBLK).unwrap();
        let system = t.system_disks("dm-0");
        let entries = parse_fstab(FSTAB);
        let d = decide(&entries, &t, &canonical(), &system);
        let by_target: Vec<(&str, &Decision)> =
            entries.iter().map(|e| e.target.as_str()).zip(&d).collect();
        let expect = |target: &str, spec: &str| {
            let (_, dec) = by_target
                .iter()
                .find(|(t, _)| *t == target && entries.iter().any(|e| e.spec.starts_with(spec)))
                .unwrap_or_else(|| panic!("{target}"));
            (*dec).clone()
        };
        assert_eq!(expect("/", "/dev/mapper"), Decision::Keep);
        assert_eq!(expect("/boot", "UUID"), Decision::Keep);
        assert_eq!(
            expect("/mnt/data", "UUID"),
            Decision::Remove {
                kname: "vdb1".into()
            }
        );
        assert_eq!(
            expect("/srv/label", "LABEL"),
            Decision::Remove {
                kname: "vdb2".into()
            }
        );
        assert_eq!(
            expect("/mnt/whole", "/dev/disk"),
            Decision::Remove {
                kname: "vdc".into()
            }
        );
        assert_eq!(
            expect("/var/www", "/mnt/data"),
            Decision::RemoveBind {
                of: "/mnt/data".into()
            }
        );
        assert_eq!(expect("/var/y", "/var/lib"), Decision::Keep);
        assert_eq!(expect("/media/cdrom0", "/dev/sr0"), Decision::Keep);
        assert_eq!(expect("/mnt/gone", "UUID"), Decision::Unresolved);
        assert_eq!(expect("/mnt/vdz", "/dev/vdz1"), Decision::Unresolved);
        let swaps: Vec<&Decision> = entries
            .iter()
            .zip(&d)
            .filter(|(e, _)| e.is_swap())
            .map(|(_, d)| d)
            .collect();
        assert_eq!(
            swaps,
            [
                &Decision::Keep,
                &Decision::Remove {
                    kname: "vdb3".into()
                }
            ]
        );
        for fs in ["/proc", "/tmp", "/mnt/nfs", "/mnt/smb", "/mnt/iso"] {
            assert_eq!(expect(fs, ""), Decision::Keep, "{fs}");
        }
        let drop: BTreeSet<usize> = entries
            .iter()
            .zip(&d)
            .filter(|(_, d)| matches!(d, Decision::Remove { .. } | Decision::RemoveBind { .. }))
            .map(|(e, _)| e.line)
            .collect();
        let out = remove_lines(FSTAB, &drop);
        assert!(!out.contains("D4T4") && !out.contains("datalabel") && !out.contains("WH0LE"));
        assert!(!out.contains("/var/www") && !out.contains("1234abcd-03"));
        assert!(out.contains("/dev/mapper/vg-swap") && out.contains("nas:/export"));
        assert_eq!(out.lines().count(), FSTAB.lines().count() - 5);
    }

    #[test]
    fn mounts_to_take_down_deepest_first() {
        let t = parse_lsblk_json(LSBLK).unwrap();
        let system = t.system_disks("dm-0");
        let findmnt = r#"{"filesystems":[{"target":"/","source":"/dev/mapper/vg-root","fstype":"ext4","options":"rw",
          "children":[
            {"target":"/mnt/data","source":"/dev/vdb1","fstype":"ext4","options":"rw,relatime",
             "children":[{"target":"/mnt/data/tmp","source":"tmpfs","fstype":"tmpfs","options":"rw"}]},
            {"target":"/var/www","source":"/dev/vdb1[/www]","fstype":"ext4","options":"rw,relatime"},
            {"target":"/mnt/whole","source":"/dev/vdc","fstype":"ext4","options":"rw"},
            {"target":"/proc","source":"proc","fstype":"proc","options":"rw"},
            {"target":"/mnt/iso","source":"/dev/loop0","fstype":"iso9660","options":"ro"}]}]}"#;
        let mounts = parse_findmnt_json(findmnt).unwrap();
        assert_eq!(mounts.len(), 7);
        assert_eq!(mounts[3].device(), "/dev/vdb1");
        assert_eq!(mounts[3].source_root(), Some("/www"));
        let down = data_mounts(&mounts, &t, &canonical(), &system);
        let targets: Vec<&str> = down.iter().map(|m| m.target.as_str()).collect();
        assert_eq!(
            targets,
            ["/mnt/data/tmp", "/mnt/whole", "/var/www", "/mnt/data"]
        );
    }

    #[test]
    fn fallback_parsers() {
        let t = parse_lsblk_pairs(
            "NAME=\"vda\" KNAME=\"vda\" PKNAME=\"\" TYPE=\"disk\" MOUNTPOINT=\"/\" UUID=\"u1\" LABEL=\"my\\x20root\" PARTUUID=\"\" PARTLABEL=\"\"\n\
             NAME=\"vdb1\" KNAME=\"vdb1\" PKNAME=\"vdb\" TYPE=\"part\" MOUNTPOINT=\"/mnt/a b\" UUID=\"u2\" LABEL=\"\" PARTUUID=\"p\" PARTLABEL=\"\"\n\
             NAME=\"vdb\" KNAME=\"vdb\" PKNAME=\"\" TYPE=\"disk\" MOUNTPOINT=\"\" UUID=\"\" LABEL=\"\" PARTUUID=\"\" PARTLABEL=\"\"\n",
        );
        assert_eq!(t.devs["vda"].label.as_deref(), Some("my root"));
        assert_eq!(t.devs["vdb1"].parents, ["vdb"]);
        assert!(t.on_data_disk("vdb1", &t.system_disks("vda")));
        let m = parse_proc_mounts(
            "/dev/vdb1 /mnt/a\\040b ext4 rw,relatime 0 0\nproc /proc proc rw 0 0\n",
        );
        assert_eq!(m[0].target, "/mnt/a b");
        let s = parse_proc_swaps(
            "Filename\t\t\t\tType\t\tSize\t\tUsed\t\tPriority\n/dev/vdb3                               partition\t23548\t\t0\t\t-2\n",
        );
        assert_eq!(
            s,
            [Swap {
                path: "/dev/vdb3".into(),
                kind: "partition".into()
            }]
        );
        assert_eq!(unescape_octal("a\\040b\\"), "a b\\");
        assert_eq!(unescape_octal("\\\u{e9}\u{e9}\\777"), "\\\u{e9}\u{e9}\\777");
        assert_eq!(unescape_hex("\\x\u{e9}\\x41"), "\\x\u{e9}A");
        assert!(parse_lsblk_json("{\"x\":1}").is_err());
        assert!(parse_findmnt_json("[").is_err());
    }

    #[test]
    fn fstab_crlf_tabs_and_no_final_newline() {
        let src = "UUID=x\t/a\text4\tdefaults\t0\t2\r\n# c\r\n/dev/vdb /b ext4 defaults 0 2";
        let e = parse_fstab(src);
        assert_eq!(e.len(), 2);
        assert_eq!(e[1].line, 2);
        assert_eq!(
            remove_lines(src, &[1].into_iter().collect()),
            "UUID=x\t/a\text4\tdefaults\t0\t2\r\n/dev/vdb /b ext4 defaults 0 2"
        );
        assert_eq!(
            remove_lines(src, &[2].into_iter().collect()),
            "UUID=x\t/a\text4\tdefaults\t0\t2\r\n# c\r\n"
        );
    }

    #[test]
    fn holders_from_proc_listing() {
        let out = "\
lrwxrwxrwx 1 root root 0 Nov 26 09:03 /proc/1/cwd -> /
lrwxrwxrwx 1 root root 0 Nov 26 09:03 /proc/294/cwd -> /mnt/data
lrwxrwxrwx 1 root root 0 Nov 26 09:03 /proc/300/cwd -> /mnt/data2
/proc/1/fd:
total 0
lr-x------ 1 root root 64 Nov 26 09:03 0 -> /dev/null
/proc/301/fd:
l-wx------ 1 root root 64 Nov 26 09:03 3 -> /mnt/data/log.txt (deleted)
/proc/1/comm:systemd
/proc/294/comm:sleep
/proc/301/comm:writer
";
        let h = parse_holders(out, "/mnt/data");
        assert_eq!(
            h,
            [
                Holder {
                    pid: 294,
                    command: "sleep".into(),
                    how: "cwd".into()
                },
                Holder {
                    pid: 301,
                    command: "writer".into(),
                    how: "fd 3".into()
                },
            ]
        );
        assert!(is_under("/a/b", "/a") && !is_under("/ab", "/a") && is_under("/x", "/"));
    }
}
