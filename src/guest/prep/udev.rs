//! The `udev-net-rules` step: delete the rules files in `/etc/udev/rules.d` whose names contain
//! both `persistent` and `net` (`70-persistent-net.rules`, `30-net_persistent-names.rules`), so
//! that a VM made from the image names its NICs afresh instead of keeping the source's MAC
//! addresses bound to `eth0`, `eth1`...
//!
//! A link to `/dev/null` with such a name (`75-persistent-net-generator.rules ->
//! /dev/null`) is how images switch the rule generator off; it is left in place, with a note.
//! The guest must not reboot between this step and the capture point, or the generator writes
//! the rules again.

/// The directory looked at.
pub const RULES_DIR: &str = "/etc/udev/rules.d";

/// A rules file this step deletes (case-insensitive).
pub fn is_persistent_net_rules(name: &str) -> bool {
    let l = name.to_ascii_lowercase();
    l.contains("persistent") && l.contains("net")
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
