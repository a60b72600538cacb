//! The `udev-net-rules` step: delete the rules files in `/etc/udev/rules.d` whose names contain
//! both `persistent` and `net` (`70-persistent-net.rules`, `30-net_persistent-names.rules`), so
//! that a VM made from the image names its NICs afresh instead of keeping the source's MAC
//! addresses bound to `eth0`, `eth1`...
//!
//! A link to `/dev/null` with such a name (`75-persistent-net-generator.rules ->
//! /dev/null`) is how images switch the rule generator off; it is left in place, with a note.
//! The guest must not reboot between this step and the capture point, or the generator writes
//! the rules again.

use std::collections::HashMap;

use super::{Edit, Inspection, Step};
use crate::error::Result;
use crate::guest::prep::io::{join_path, GuestIo};
use crate::guest::prep::PrepStep;

/// The directory looked at.
pub const RULES_DIR: &str = "/etc/udev/rules.d";

/// A rules file this step deletes (case-insensitive).
pub fn is_persistent_net_rules(name: &str) -> bool {
    let l = name.to_ascii_lowercase();
    l.contains("persistent") && l.contains("net")
}

/// The `udev-net-rules` step.
pub(crate) struct UdevNetRules;

impl Step for UdevNetRules {
    fn id(&self) -> PrepStep {
        PrepStep::UdevNetRules
    }

    fn inspect(&self, io: &GuestIo<'_>) -> Result<Inspection> {
        inspection(io)
    }
}

/// The rules files to remove (links to `/dev/null` kept).
fn inspection(io: &GuestIo<'_>) -> Result<Inspection> {
    let mut w = Inspection {
        applicable: true,
        ..Inspection::default()
    };
    let names: Vec<String> = io
        .list(&mut w, RULES_DIR)?
        .into_iter()
        .filter(|n| is_persistent_net_rules(n))
        .collect();
    if names.is_empty() {
        return Ok(w);
    }
    // Which of them are symbolic links, and to what.
    let mut args = vec![RULES_DIR];
    args.extend(names.iter().map(String::as_str));
    let links = io.sh(
        &format!("looking at links in {}", RULES_DIR),
        r#"cd -- "$1" || exit 1; shift
for f in "$@"; do [ -L "$f" ] && printf '%s\t%s\n' "$f" "$(readlink -- "$f")"; done; exit 0"#,
        &args,
    )?;
    let links: HashMap<&str, &str> = links.lines().filter_map(|l| l.split_once('\t')).collect();
    for name in names {
        let path = join_path(RULES_DIR, &name);
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
            None => match io.agent.read_file(&path)? {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for yes in [
            "70-persistent-net.rules",
            "30-net_persistent-names.rules",
            "75-Persistent-NET-generator.rules",
        ] {
            assert!(is_persistent_net_rules(yes), "{yes}");
        }
        for no in [
            "70-persistent-cd.rules",
            "80-net-setup-link.rules",
            "99-local.rules",
        ] {
            assert!(!is_persistent_net_rules(no), "{no}");
        }
    }
}
