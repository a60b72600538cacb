//! The prep steps' public types: the step names ([`PrepStep`]), what a dry run reports
//! ([`StepPlan`], [`FileChange`], [`PlanStatus`]), what an apply did ([`StepOutcome`],
//! [`AppliedFile`], [`SwapRecord`], [`OutcomeStatus`]; the journal keeps these, serialized),
//! what a check finds ([`StepCheck`]), and the result of a pure text transform
//! ([`Transform`]).

use std::collections::BTreeSet;
use std::fmt;

use serde::{Deserialize, Serialize};

use super::fstab::Mount;
use crate::error::{Error, ErrorKind, Result};

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

/// What an apply did for one step: enough to [`restore`](super::restore) it.
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::guest::prep::io::{sha256_hex, BACKUP_ROOT};

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
        // The journal's shape: an outcome written by an older imaged must still read back.
        assert_eq!(
            j,
            concat!(
                r#"{"step":"fstab-data-disks","status":"applied","files":[{"path":"/etc/fstab","#,
                r#""action":"modify","backup":"/run/imaged-prep/backup/apply-1/etc/fstab","#,
                r#""original_sha256":"#,
                r#""2d711642b726b04401627ca9fbac32f5c8530fb1903cc4db02258717921a4881","#,
                r#""original":"VVVJRD0xIC8gZXh0NCBkZWZhdWx0cyAwIDEKG1sySg=="}],"#,
                r#""unmounted":[{"target":"/mnt/data","source":"/dev/vdb1","fstype":"ext4","#,
                r#""options":"rw,relatime"}],"swaps_off":[{"path":"/dev/vdb3"}],"commands":[],"#,
                r#""backup_dir":"/run/imaged-prep/backup/apply-1","notes":[]}"#,
            )
        );
        assert!(j.contains("\"step\":\"fstab-data-disks\""), "{j}");
        assert_eq!(serde_json::from_str::<StepOutcome>(&j).unwrap(), o);
    }
}
