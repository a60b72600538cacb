//! The `dhcp` step: static NIC configuration becomes DHCP.
//!
//! The pure transforms (text in, text out, plus notes for the operator) cover:
//!
//! - RHEL / CentOS / Oracle / EulerOS `/etc/sysconfig/network-scripts/ifcfg-*`
//!   ([`ifcfg_to_dhcp`] with [`IfcfgFlavor::Rhel`]): `BOOTPROTO=dhcp`,
//!   `PERSISTENT_DHCLIENT="y"`; the static address lines (`IPADDR*`, `NETMASK*`, `PREFIX*`,
//!   `GATEWAY*`, `BROADCAST*`, `NETWORK*`, `DNS<n>`, `IPV6ADDR*`, `IPV6_DEFAULTGW`, a `PEERDNS=no`
//!   that pointed at them) and `HWADDR` (a VM made from the image has another MAC, and
//!   initscripts ignore a file whose `HWADDR` does not match) are removed.
//! - SUSE `/etc/sysconfig/network/ifcfg-*` ([`IfcfgFlavor::Suse`]): `BOOTPROTO='dhcp'`, static
//!   lines removed (`IPADDR*`, `NETMASK*`, `PREFIXLEN*`, `BROADCAST*`, `NETWORK*`,
//!   `REMOTE_IPADDR*`, `LABEL_*`, `GATEWAY*`); and `/etc/sysconfig/network/dhcp`
//!   ([`suse_dhcp_file`]): `DHCLIENT_USE_LAST_LEASE="no"`.
//! - Debian / Ubuntu `/etc/network/interfaces` ([`interfaces_to_dhcp`]): every `iface X inet
//!   static` but `lo` becomes `inet dhcp` (and `inet6 static` becomes `inet6 auto`), the
//!   stanza's `address`, `netmask`, `gateway`, `broadcast`, `network`, `pointopoint`, `scope`,
//!   `dns-nameservers` lines dropped; `source` and `source-directory` includes are followed by
//!   the step's inspection.
//! - netplan YAML (see [`super::netplan`]).
//! - NetworkManager keyfiles ([`nm_keyfile_to_dhcp`]): `[ipv4]`/`[ipv6]` `method=manual`
//!   becomes `method=auto`, `address*`, `gateway` and `dns` removed; `[ethernet] mac-address`
//!   removed from a converted profile.
//! - systemd-networkd `.network` files ([`networkd_to_dhcp`]): `Address=`, `Gateway=`, `DNS=`
//!   of `[Network]`, `[Address]` sections and default-route `[Route]` sections removed,
//!   `DHCP=yes`.
//!
//! Interfaces without a static address (bond and bridge ports, unconfigured NICs, `lo`) are
//! left alone. Windows guests: `netsh interface ip set address name=... source=dhcp` (and the
//! same for DNS) through `guest-exec` for each interface the agent reports, loopback excepted.
//!
//! The step's guest I/O (`Dhcp`: which files it reads and edits, the includes it follows,
//! the Windows `netsh` commands) comes after the pure transforms.

use std::collections::BTreeSet;

use super::netplan::netplan_to_dhcp;
use super::{Inspection, Step};
use crate::error::{Error, ErrorKind, Result};
use crate::guest::prep::io::{join_path, one_line, GuestIo, STEP_EXEC_TIMEOUT};
use crate::guest::prep::text::{dominant_eol, lines, Builder, Line};
use crate::guest::prep::{PrepStep, StepOutcome, Transform};

/// Which distribution family's ifcfg dialect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IfcfgFlavor {
    /// RHEL, CentOS, Oracle Linux, EulerOS (`network-scripts`).
    Rhel,
    /// SUSE (`/etc/sysconfig/network`).
    Suse,
}

/// One `KEY=VALUE` line of a shell-style sysconfig file.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ShellVar<'a> {
    key: &'a str,
    /// The value without quotes.
    value: String,
    /// The quote character used, if any.
    quote: Option<char>,
}

/// Parses a sysconfig line (`KEY=value`, `KEY="value"`, `KEY='value' # comment`,
/// `export KEY=...`); None for comments, blank and other lines.
fn shell_var(text: &str) -> Option<ShellVar<'_>> {
    let t = text.trim_start();
    let t = t.strip_prefix("export ").map(str::trim_start).unwrap_or(t);
    if t.starts_with('#') {
        return None;
    }
    let eq = t.find('=')?;
    let key = &t[..eq];
    if key.is_empty() || !key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
        return None;
    }
    let rest = &t[eq + 1..];
    let (value, quote) = match rest.chars().next() {
        Some(q @ ('"' | '\'')) => {
            let body = &rest[1..];
            let end = body.find(q).unwrap_or(body.len());
            (body[..end].to_string(), Some(q))
        }
        _ => {
            let end = rest
                .find(|c: char| c.is_whitespace() || c == '#' || c == ';')
                .unwrap_or(rest.len());
            (rest[..end].to_string(), None)
        }
    };
    Some(ShellVar { key, value, quote })
}

/// `key` is `base` followed by nothing, digits, or `_suffix` (SUSE secondary addresses).
fn key_family(key: &str, base: &str) -> bool {
    match key.strip_prefix(base) {
        Some("") => true,
        Some(rest) => rest.bytes().all(|b| b.is_ascii_digit()) || rest.starts_with('_'),
        None => false,
    }
}

fn is_static_key(key: &str, value: &str, flavor: IfcfgFlavor) -> bool {
    match flavor {
        IfcfgFlavor::Rhel => {
            [
                "IPADDR",
                "NETMASK",
                "PREFIX",
                "GATEWAY",
                "BROADCAST",
                "NETWORK",
                "IPV6ADDR",
            ]
            .iter()
            .any(|b| key_family(key, b))
                || key == "IPV6_DEFAULTGW"
                || key == "HWADDR"
                || (key.len() > 3
                    && key.starts_with("DNS")
                    && key[3..].bytes().all(|b| b.is_ascii_digit()))
                || (key == "PEERDNS" && value.eq_ignore_ascii_case("no"))
        }
        IfcfgFlavor::Suse => {
            [
                "IPADDR",
                "NETMASK",
                "PREFIXLEN",
                "BROADCAST",
                "NETWORK",
                "REMOTE_IPADDR",
                "GATEWAY",
            ]
            .iter()
            .any(|b| key_family(key, b))
                || key.starts_with("LABEL_")
        }
    }
}

/// Keys of an address proper (the file configures a static address).
fn is_address_key(key: &str) -> bool {
    key_family(key, "IPADDR") || key_family(key, "IPV6ADDR")
}

fn quoted(value: &str, quote: Option<char>) -> String {
    match quote {
        Some(q) => format!("{q}{value}{q}"),
        None => value.to_string(),
    }
}

/// An ifcfg file turned to DHCP. Loopback, bond/bridge/team ports and files without a static
/// address are left as they are (with a note saying why).
pub fn ifcfg_to_dhcp(text: &str, flavor: IfcfgFlavor) -> Transform {
    let ls = lines(text);
    let vars: Vec<Option<ShellVar<'_>>> = ls.iter().map(|l| shell_var(l.text)).collect();
    let get = |k: &str| {
        vars.iter()
            .flatten()
            .rfind(|v| v.key == k)
            .map(|v| v.value.clone())
    };
    let unchanged = |why: String| Transform {
        text: text.to_string(),
        notes: vec![why],
    };
    if get("DEVICE").as_deref() == Some("lo") {
        return unchanged("loopback interface, left as is".into());
    }
    for port_key in ["MASTER", "BRIDGE", "TEAM_MASTER"] {
        if let Some(m) = get(port_key).filter(|m| !m.is_empty()) {
            return unchanged(format!("a port of {m} ({port_key}), left as is"));
        }
    }
    if get("SLAVE").is_some_and(|s| s.eq_ignore_ascii_case("yes")) {
        return unchanged("a bond port (SLAVE=yes), left as is".into());
    }
    let bootproto = get("BOOTPROTO").unwrap_or_default().to_ascii_lowercase();
    let has_address = vars.iter().flatten().any(|v| is_address_key(v.key));
    let is_static = matches!(bootproto.as_str(), "" | "none" | "static");
    if is_static && !has_address {
        return unchanged("no static address configured, left as is".into());
    }
    if !is_static && !bootproto.starts_with("dhcp") {
        return unchanged(format!("BOOTPROTO={bootproto}, left as is"));
    }

    let eol = dominant_eol(text);
    let mut b = Builder::new(eol, text.len() + 64);
    let mut seen_bootproto = false;
    let mut seen_persistent = false;
    let default_quote = match flavor {
        IfcfgFlavor::Rhel => None,
        IfcfgFlavor::Suse => Some('\''),
    };
    for (l, v) in ls.iter().zip(&vars) {
        let Some(v) = v else {
            b.keep(l);
            continue;
        };
        if is_static_key(v.key, &v.value, flavor) {
            continue;
        }
        match v.key {
            "BOOTPROTO" => {
                if seen_bootproto {
                    continue; // a later duplicate would override ours
                }
                seen_bootproto = true;
                if is_static {
                    let indent = &l.text[..l.text.len() - l.text.trim_start().len()];
                    b.push(
                        &format!("{indent}BOOTPROTO={}", quoted("dhcp", v.quote)),
                        l.eol,
                    );
                } else {
                    b.keep(l);
                }
            }
            "PERSISTENT_DHCLIENT" if flavor == IfcfgFlavor::Rhel => {
                if seen_persistent {
                    continue;
                }
                seen_persistent = true;
                if matches!(
                    v.value.to_ascii_lowercase().as_str(),
                    "y" | "yes" | "1" | "true"
                ) {
                    b.keep(l);
                } else {
                    b.push("PERSISTENT_DHCLIENT=\"y\"", l.eol);
                }
            }
            _ => b.keep(l),
        }
    }
    if !seen_bootproto {
        b.line(&format!("BOOTPROTO={}", quoted("dhcp", default_quote)));
    }
    if flavor == IfcfgFlavor::Rhel && !seen_persistent {
        b.line("PERSISTENT_DHCLIENT=\"y\"");
    }
    Transform {
        text: b.finish(),
        notes: Vec::new(),
    }
}

/// SUSE's `/etc/sysconfig/network/dhcp`: `DHCLIENT_USE_LAST_LEASE="no"` (replaced in place
/// or appended).
pub fn suse_dhcp_file(text: &str) -> Transform {
    set_shell_var(text, "DHCLIENT_USE_LAST_LEASE", "no")
}

fn set_shell_var(text: &str, key: &str, value: &str) -> Transform {
    let mut b = Builder::new(dominant_eol(text), text.len() + 64);
    let mut seen = false;
    for l in lines(text) {
        match shell_var(l.text) {
            Some(v) if v.key == key => {
                if seen {
                    continue;
                }
                seen = true;
                if v.value == value {
                    b.keep(&l);
                } else {
                    b.push(&format!("{key}=\"{value}\""), l.eol);
                }
            }
            _ => b.keep(&l),
        }
    }
    if !seen {
        b.line(&format!("{key}=\"{value}\""));
    }
    Transform {
        text: b.finish(),
        notes: Vec::new(),
    }
}

/// A file included by `/etc/network/interfaces`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Include {
    /// `source PATTERN` (a path or shell glob).
    Source(String),
    /// `source-directory DIR` (files named only of letters, digits, `_` and `-`).
    Directory(String),
}

const STANZA_WORDS: &[&str] = &[
    "iface",
    "mapping",
    "auto",
    "source",
    "source-directory",
    "rename",
    "no-auto-down",
    "no-scripts",
];
const STATIC_OPTIONS: &[&str] = &[
    "address",
    "netmask",
    "gateway",
    "broadcast",
    "network",
    "pointopoint",
    "scope",
    "dns-nameservers",
    "dns-nameserver",
];

/// `/etc/network/interfaces` (or a file it includes) turned to DHCP, and the includes it
/// names (for the caller to follow).
pub fn interfaces_to_dhcp(text: &str) -> (Transform, Vec<Include>) {
    let ls = lines(text);
    let mut b = Builder::new(dominant_eol(text), text.len());
    let mut notes = Vec::new();
    let mut includes = Vec::new();
    // The stanza being converted: (interface, has up/down commands).
    let mut converting: Option<(String, bool)> = None;
    let mut i = 0;
    while i < ls.len() {
        // A logical line: physical lines joined by a trailing backslash.
        let start = i;
        while i < ls.len() && ls[i].text.ends_with('\\') {
            i += 1;
        }
        let end = (i + 1).min(ls.len());
        i = end;
        let group = &ls[start..end];
        let first = group[0].text.trim_start();
        let keep = |b: &mut Builder| group.iter().for_each(|l| b.keep(l));
        if first.is_empty() || first.starts_with('#') {
            keep(&mut b);
            continue;
        }
        let words: Vec<&str> = first.split_whitespace().collect();
        let word = words[0];
        if STANZA_WORDS.contains(&word) || word.starts_with("allow-") {
            finish_stanza(&mut converting, &mut notes);
        }
        match word {
            "iface" if words.len() >= 4 => {
                let (name, family, method) = (words[1], words[2], words[3]);
                let to = match (family, method) {
                    ("inet", "static") if name != "lo" => Some("dhcp"),
                    ("inet6", "static") if name != "lo" => Some("auto"),
                    _ => None,
                };
                match to {
                    Some(to) => {
                        b.push(&replace_word(group[0].text, 3, to), group[0].eol);
                        group[1..].iter().for_each(|l| b.keep(l));
                        if family == "inet6" {
                            notes.push(format!("{name}: inet6 static became inet6 auto"));
                        }
                        converting = Some((name.to_string(), false));
                    }
                    None => keep(&mut b),
                }
            }
            "source" | "source-directory" if words.len() >= 2 => {
                let arg = first[word.len()..].trim().to_string();
                includes.push(if word == "source" {
                    Include::Source(arg)
                } else {
                    Include::Directory(arg)
                });
                keep(&mut b);
            }
            _ => match &mut converting {
                Some(_) if STATIC_OPTIONS.contains(&word) => {}
                Some((_, cmds)) => {
                    if matches!(
                        word,
                        "up" | "down" | "pre-up" | "post-up" | "pre-down" | "post-down"
                    ) {
                        *cmds = true;
                    }
                    keep(&mut b);
                }
                None => keep(&mut b),
            },
        }
    }
    finish_stanza(&mut converting, &mut notes);
    (
        Transform {
            text: b.finish(),
            notes,
        },
        includes,
    )
}

fn finish_stanza(converting: &mut Option<(String, bool)>, notes: &mut Vec<String>) {
    if let Some((name, true)) = converting.take() {
        notes.push(format!(
            "{name}: its up/down commands were kept; check that they do not set static addresses"
        ));
    }
}

/// `text` with its `n`th whitespace-separated word (from 0) replaced, spacing kept.
fn replace_word(text: &str, n: usize, with: &str) -> String {
    let mut idx = 0;
    let mut in_word = false;
    let mut start = None;
    let mut end = text.len();
    for (pos, c) in text.char_indices() {
        if c.is_whitespace() {
            if in_word {
                if start.is_some() {
                    end = pos;
                    break;
                }
                idx += 1;
            }
            in_word = false;
        } else if !in_word {
            in_word = true;
            if idx == n {
                start = Some(pos);
            }
        }
    }
    match start {
        Some(s) => format!("{}{with}{}", &text[..s], &text[end..]),
        None => text.to_string(),
    }
}

/// Whether a file name in a `source-directory` is included (run-parts names).
pub fn source_directory_name_ok(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Shell-style glob match of one path component (`*`, `?`, `[...]`, `[!...]`); a leading `.`
/// must be matched literally.
pub fn glob_match(pattern: &str, name: &str) -> bool {
    if name.starts_with('.') && !pattern.starts_with('.') {
        return false;
    }
    let p: Vec<char> = pattern.chars().collect();
    let n: Vec<char> = name.chars().collect();
    // Iterative matcher with backtracking to the last '*' (linear in practice).
    let (mut pi, mut ni) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ni < n.len() {
        if pi < p.len() {
            match p[pi] {
                '*' => {
                    star = Some((pi, ni));
                    pi += 1;
                    continue;
                }
                '?' => {
                    pi += 1;
                    ni += 1;
                    continue;
                }
                '[' => {
                    if let Some((matched, next)) = class_match(&p, pi, n[ni]) {
                        if matched {
                            pi = next;
                            ni += 1;
                            continue;
                        }
                    } else if n[ni] == '[' {
                        pi += 1;
                        ni += 1;
                        continue;
                    }
                }
                c if c == n[ni] => {
                    pi += 1;
                    ni += 1;
                    continue;
                }
                _ => {}
            }
        }
        match star {
            Some((sp, sn)) => {
                pi = sp + 1;
                ni = sn + 1;
                star = Some((sp, sn + 1));
            }
            None => return false,
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

/// Matches `c` against the class starting at `p[i] == '['`; (matched, index after `]`), or
/// None when the class is not closed.
fn class_match(p: &[char], i: usize, c: char) -> Option<(bool, usize)> {
    let mut j = i + 1;
    let negate = matches!(p.get(j), Some('!' | '^'));
    if negate {
        j += 1;
    }
    let mut matched = false;
    let mut first = true;
    while j < p.len() {
        if p[j] == ']' && !first {
            return Some((matched != negate, j + 1));
        }
        first = false;
        if j + 2 < p.len() && p[j + 1] == '-' && p[j + 2] != ']' {
            if p[j] <= c && c <= p[j + 2] {
                matched = true;
            }
            j += 3;
        } else {
            if p[j] == c {
                matched = true;
            }
            j += 1;
        }
    }
    None
}

/// An INI-style line: section header, `key=value`, or other (comment, blank, garbage).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Ini<'a> {
    Section(&'a str),
    Key(&'a str, &'a str),
    Other,
}

fn ini_line(text: &str) -> Ini<'_> {
    let t = text.trim();
    if t.is_empty() || t.starts_with('#') || t.starts_with(';') {
        return Ini::Other;
    }
    if let Some(s) = t.strip_prefix('[').and_then(|s| s.strip_suffix(']')) {
        return Ini::Section(s.trim());
    }
    match t.find('=') {
        Some(eq) => Ini::Key(t[..eq].trim(), t[eq + 1..].trim()),
        None => Ini::Other,
    }
}

/// Sections of an INI file as (name, header line index or None for the part before any
/// header, first line, end line (exclusive)).
fn ini_sections(ls: &[Line<'_>]) -> Vec<(String, Option<usize>, usize, usize)> {
    let mut out: Vec<(String, Option<usize>, usize, usize)> = vec![(String::new(), None, 0, 0)];
    for (i, l) in ls.iter().enumerate() {
        if let Ini::Section(name) = ini_line(l.text) {
            out.last_mut().expect("one section").3 = i;
            out.push((name.to_string(), Some(i), i + 1, i + 1));
        }
    }
    out.last_mut().expect("one section").3 = ls.len();
    out
}

fn nm_address_key(key: &str) -> bool {
    ["address", "addresses"].iter().any(|b| {
        key.strip_prefix(b)
            .is_some_and(|r| r.bytes().all(|c| c.is_ascii_digit()))
    })
}

/// A NetworkManager keyfile turned to DHCP: in `[ipv4]` and `[ipv6]`, `method=manual` becomes
/// `method=auto` and the `address*`, `gateway` and `dns` keys go; extra static addresses on an
/// automatic profile go too. `[ethernet] mac-address` is removed from a converted profile.
pub fn nm_keyfile_to_dhcp(text: &str) -> Transform {
    let ls = lines(text);
    let sections = ini_sections(&ls);
    let mut drop = vec![false; ls.len()];
    let mut replace: Vec<Option<String>> = vec![None; ls.len()];
    let mut insert_after: Vec<Option<String>> = vec![None; ls.len()];
    let mut converted = false;
    let mut notes = Vec::new();
    for (name, header, from, to) in &sections {
        if name != "ipv4" && name != "ipv6" {
            continue;
        }
        let keys: Vec<(usize, &str, &str)> = (*from..*to)
            .filter_map(|i| match ini_line(ls[i].text) {
                Ini::Key(k, v) => Some((i, k, v)),
                _ => None,
            })
            .collect();
        let method = keys.iter().rev().find(|(_, k, _)| *k == "method");
        let has_addr = keys.iter().any(|(_, k, _)| nm_address_key(k));
        let manual = match method {
            Some((_, _, v)) => *v == "manual",
            None => has_addr,
        };
        let auto = matches!(method, Some((_, _, "auto")));
        if manual {
            match method {
                Some((i, _, _)) => replace[*i] = Some("method=auto".into()),
                None => {
                    if let Some(h) = header {
                        insert_after[*h] = Some("method=auto".into());
                    }
                }
            }
            for (i, k, _) in &keys {
                if nm_address_key(k) || *k == "gateway" || *k == "dns" {
                    drop[*i] = true;
                }
            }
            converted = true;
            notes.push(format!("[{name}] method manual became auto"));
        } else if auto && has_addr {
            for (i, k, _) in &keys {
                if nm_address_key(k) || *k == "gateway" {
                    drop[*i] = true;
                }
            }
            converted = true;
            notes.push(format!("[{name}] extra static addresses removed"));
        }
    }
    if converted {
        for (name, _, from, to) in &sections {
            if name == "ethernet" {
                for i in *from..*to {
                    if matches!(ini_line(ls[i].text), Ini::Key("mac-address", _)) {
                        drop[i] = true;
                    }
                }
            }
        }
    }
    let mut b = Builder::new(dominant_eol(text), text.len());
    for (i, l) in ls.iter().enumerate() {
        if drop[i] {
            continue;
        }
        match &replace[i] {
            Some(t) => b.push(t, l.eol),
            None => b.keep(l),
        }
        if let Some(t) = &insert_after[i] {
            b.line(t);
        }
    }
    Transform {
        text: b.finish(),
        notes: if converted { notes } else { Vec::new() },
    }
}

/// A systemd-networkd `.network` file turned to DHCP (see the module doc). Files matching
/// `lo` and files without a static address are left as they are.
pub fn networkd_to_dhcp(text: &str) -> Transform {
    let ls = lines(text);
    let sections = ini_sections(&ls);
    let key_at = |i: usize| match ini_line(ls[i].text) {
        Ini::Key(k, v) => Some((k, v)),
        _ => None,
    };
    let keys_of = |from: usize, to: usize| -> Vec<(usize, &str, &str)> {
        (from..to)
            .filter_map(|i| key_at(i).map(|(k, v)| (i, k, v)))
            .collect()
    };
    let mut notes = Vec::new();
    for (name, _, from, to) in &sections {
        if name == "Match" {
            for (_, k, v) in keys_of(*from, *to) {
                if k == "Name" && v.split_whitespace().any(|n| n == "lo") {
                    return Transform {
                        text: text.to_string(),
                        notes: vec!["matches the loopback interface, left as is".into()],
                    };
                }
                if k == "MACAddress" || k == "PermanentMACAddress" {
                    notes.push(format!(
                        "matches {k}={v}: a VM made from the image has another MAC and will \
                         not match this file"
                    ));
                }
            }
        }
    }
    let is_static = sections.iter().any(|(name, _, from, to)| {
        (name == "Network"
            && keys_of(*from, *to)
                .iter()
                .any(|(_, k, v)| *k == "Address" && !v.is_empty()))
            || (name == "Address"
                && keys_of(*from, *to)
                    .iter()
                    .any(|(_, k, v)| *k == "Address" && !v.is_empty()))
    });
    if !is_static {
        return Transform {
            text: text.to_string(),
            notes: Vec::new(),
        };
    }
    let mut drop = vec![false; ls.len()];
    let mut replace: Vec<Option<String>> = vec![None; ls.len()];
    let mut insert_after: Vec<Option<String>> = vec![None; ls.len()];
    let mut dhcp_set = false;
    let mut last_network_key: Option<usize> = None;
    // Drops a whole section and the blank lines after its last setting; comment lines after
    // it stay (they may describe the next section).
    let drop_section = |drop: &mut Vec<bool>, header: usize, to: usize| {
        let is_comment = |t: &str| {
            let t = t.trim_start();
            t.starts_with('#') || t.starts_with(';')
        };
        let last = (header + 1..to)
            .rev()
            .find(|&i| {
                let t = ls[i].text.trim();
                !t.is_empty() && !is_comment(t)
            })
            .unwrap_or(header);
        let mut end = last + 1;
        while end < to && ls[end].text.trim().is_empty() {
            end += 1;
        }
        drop[header..end].iter_mut().for_each(|d| *d = true);
    };
    for (name, header, from, to) in &sections {
        match name.as_str() {
            "Network" => {
                if let Some(h) = header {
                    last_network_key.get_or_insert(*h);
                }
                for (i, k, v) in keys_of(*from, *to) {
                    last_network_key = Some(i);
                    match k {
                        "Address" | "Gateway" | "DNS" => drop[i] = true,
                        "DHCP" => {
                            if matches!(v, "yes" | "true" | "both" | "1" | "on") && !dhcp_set {
                                dhcp_set = true;
                            } else if dhcp_set {
                                drop[i] = true;
                            } else {
                                replace[i] = Some("DHCP=yes".into());
                                dhcp_set = true;
                            }
                        }
                        _ => {}
                    }
                }
            }
            "Address" => {
                if let Some(h) = header {
                    drop_section(&mut drop, *h, *to);
                }
            }
            "Route" => {
                let keys = keys_of(*from, *to);
                let dest = keys
                    .iter()
                    .rev()
                    .find(|(_, k, _)| *k == "Destination")
                    .map(|(_, _, v)| *v);
                let default = matches!(dest, None | Some("0.0.0.0/0" | "::/0" | "default"));
                if default {
                    if let Some(h) = header {
                        drop_section(&mut drop, *h, *to);
                    }
                }
            }
            _ => {}
        }
    }
    let mut append_section = false;
    if !dhcp_set {
        match last_network_key {
            Some(i) => insert_after[i] = Some("DHCP=yes".into()),
            None => append_section = true,
        }
    }
    let mut b = Builder::new(dominant_eol(text), text.len() + 32);
    for (i, l) in ls.iter().enumerate() {
        if !drop[i] {
            match &replace[i] {
                Some(t) => b.push(t, l.eol),
                None => b.keep(l),
            }
        }
        if let Some(t) = &insert_after[i] {
            b.line(t);
        }
    }
    if append_section {
        let last_kept = (0..ls.len()).rev().find(|&i| !drop[i]);
        if last_kept.is_some_and(|i| !ls[i].text.trim().is_empty()) {
            b.line("");
        }
        b.line("[Network]");
        b.line("DHCP=yes");
    }
    Transform {
        text: b.finish(),
        notes,
    }
}

/// File names in an ifcfg directory that are interface configurations we may edit: `ifcfg-*`,
/// but not loopback, aliases (`ifcfg-eth0:1`, left alone) or backup copies.
pub fn ifcfg_name_ok(name: &str) -> bool {
    const IGNORED: &[&str] = &[
        "~", ".bak", ".old", ".orig", ".rpmnew", ".rpmorig", ".rpmsave", ".swp", ".tmp",
    ];
    name.starts_with("ifcfg-")
        && name != "ifcfg-lo"
        && !name.contains(':')
        && !name.contains(".imaged-")
        && !IGNORED.iter().any(|s| name.ends_with(s))
}

// ---- the step: guest I/O ----------------------------------------------------------------

/// The `dhcp` step.
pub(crate) struct Dhcp;

impl Step for Dhcp {
    fn id(&self) -> PrepStep {
        PrepStep::Dhcp
    }

    fn inspect(&self, io: &GuestIo<'_>) -> Result<Inspection> {
        linux_inspection(io)
    }

    fn inspect_windows(&self, io: &GuestIo<'_>) -> Result<Inspection> {
        windows_inspection(io)
    }

    /// The `netsh` commands; one that fails saying the interface is "already" so is fine.
    fn run_commands(
        &self,
        io: &GuestIo<'_>,
        work: &Inspection,
        done: &mut StepOutcome,
    ) -> Result<()> {
        for c in &work.commands {
            let argv: Vec<&str> = c.iter().map(String::as_str).collect();
            let out = io.agent.exec(&argv, None, STEP_EXEC_TIMEOUT)?;
            let said = out.stdout_text();
            if !out.success() && !said.to_ascii_lowercase().contains("already") {
                return Err(Error::new(
                    ErrorKind::Internal,
                    format!(
                        "`{}` in domain {} failed with exit status {}: {}",
                        c.join(" "),
                        io.dom(),
                        out.exit_code,
                        one_line(&said)
                    ),
                ));
            }
            done.commands.push(c.clone());
        }
        Ok(())
    }

    /// Settings changed by `netsh` cannot be put back: that is an error.
    fn undo(&self, io: &GuestIo<'_>, done: &StepOutcome, errors: &mut Vec<Error>) {
        if !done.commands.is_empty() {
            errors.push(Error::new(
                ErrorKind::FailedPrecondition,
                format!(
                    "{} in domain {}: the Windows network settings changed by netsh cannot be \
                     restored automatically",
                    done.step,
                    io.dom()
                ),
            ));
        }
    }
}

/// The Linux inspection: every network configuration file the step knows, edited.
fn linux_inspection(io: &GuestIo<'_>) -> Result<Inspection> {
    let mut w = Inspection::default();
    let mut found = false;
    for (dir, flavor) in [
        ("/etc/sysconfig/network-scripts", IfcfgFlavor::Rhel),
        ("/etc/sysconfig/network", IfcfgFlavor::Suse),
    ] {
        for name in io.list(&mut w, dir)? {
            if name.starts_with("ifcfg-") && name.contains(':') {
                w.notes
                    .push(format!("{dir}/{name}: an alias interface, left as is"));
            }
            if !ifcfg_name_ok(&name) {
                continue;
            }
            found |= io.edit_file(&mut w, &join_path(dir, &name), |t| ifcfg_to_dhcp(t, flavor))?;
        }
    }
    found |= io.edit_file(&mut w, "/etc/sysconfig/network/dhcp", suse_dhcp_file)?;
    let mut visited = BTreeSet::new();
    found |= debian_interfaces(io, &mut w, "/etc/network/interfaces", 0, &mut visited)?;
    for name in io.list(&mut w, "/etc/netplan")? {
        if name.ends_with(".yaml") || name.ends_with(".yml") {
            found |= io.edit_file(&mut w, &join_path("/etc/netplan", &name), netplan_to_dhcp)?;
        }
    }
    let nm = "/etc/NetworkManager/system-connections";
    for name in io.list(&mut w, nm)? {
        let backup_like = name.starts_with('.')
            || [
                "~", ".bak", ".orig", ".rpmsave", ".rpmnew", ".swp", ".tmp", ".nmmeta",
            ]
            .iter()
            .any(|s| name.ends_with(s));
        if !backup_like {
            found |= io.edit_file(&mut w, &join_path(nm, &name), nm_keyfile_to_dhcp)?;
        }
    }
    for name in io.list(&mut w, "/etc/systemd/network")? {
        if name.ends_with(".network") {
            found |= io.edit_file(
                &mut w,
                &join_path("/etc/systemd/network", &name),
                networkd_to_dhcp,
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

/// How deep `/etc/network/interfaces` includes are followed.
const MAX_INCLUDE_DEPTH: usize = 8;
/// How many files `/etc/network/interfaces` and its includes may be, in all.
const MAX_INCLUDED_FILES: usize = 256;

/// `/etc/network/interfaces` and the files it includes, recursively (cycles, depth and count
/// bounded). Returns whether `path` exists.
fn debian_interfaces(
    io: &GuestIo<'_>,
    w: &mut Inspection,
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
    let exists = io.edit_file(w, path, |t| {
        let (tr, inc) = interfaces_to_dhcp(t);
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
            Include::Source(pattern) => {
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
                    for name in io.list(w, dir)? {
                        if glob_match(last, &name) {
                            debian_interfaces(io, w, &join_path(dir, &name), depth + 1, visited)?;
                        }
                    }
                } else {
                    debian_interfaces(io, w, &pattern, depth + 1, visited)?;
                }
            }
            Include::Directory(dir) => {
                let dir = abs(&dir);
                for name in io.list(w, &dir)? {
                    if source_directory_name_ok(&name) {
                        debian_interfaces(io, w, &join_path(&dir, &name), depth + 1, visited)?;
                    }
                }
            }
        }
    }
    Ok(exists)
}

/// The Windows inspection: a `netsh` pair (address, DNS) for each interface without DHCP,
/// loopback excepted.
fn windows_inspection(io: &GuestIo<'_>) -> Result<Inspection> {
    let mut w = Inspection {
        applicable: true,
        ..Inspection::default()
    };
    for ifc in io.agent.network_interfaces()? {
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
        let cfg = io.agent.exec(
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    use crate::error::ErrorKind;
    use crate::guest::agent::{GuestAgent, OsInfo};
    use crate::guest::prep::{apply, plan, restore, OutcomeStatus, PlanStatus};

    const RHEL_STATIC: &str = "\
# Generated by parse-kickstart
TYPE=Ethernet
DEVICE=eth0
HWADDR=52:54:00:12:34:56
ONBOOT=yes
BOOTPROTO=static
IPADDR=192.168.10.5
NETMASK=255.255.255.0
PREFIX=24
GATEWAY=192.168.10.1
DNS1=192.168.10.2
DNS2=8.8.8.8
IPV6INIT=no
NAME=\"System eth0\"
";

    #[test]
    fn rhel_static_becomes_dhcp() {
        let t = ifcfg_to_dhcp(RHEL_STATIC, IfcfgFlavor::Rhel);
        assert_eq!(
            t.text,
            "\
# Generated by parse-kickstart
TYPE=Ethernet
DEVICE=eth0
ONBOOT=yes
BOOTPROTO=dhcp
IPV6INIT=no
NAME=\"System eth0\"
PERSISTENT_DHCLIENT=\"y\"
"
        );
        // Idempotent.
        assert_eq!(ifcfg_to_dhcp(&t.text, IfcfgFlavor::Rhel).text, t.text);
    }

    #[test]
    fn rhel_quoting_crlf_no_final_newline_and_numbered_keys() {
        let src =
            "DEVICE=\"eth1\"\r\nBOOTPROTO=\"none\"\r\nIPADDR0=\"10.0.0.5\"\r\nPREFIX0=\"8\"\r\n\
                   IPADDR1=10.1.0.5 # second\r\nGATEWAY0=10.0.0.1\r\nPEERDNS=no\r\nDEFROUTE=yes";
        let t = ifcfg_to_dhcp(src, IfcfgFlavor::Rhel);
        assert_eq!(
            t.text,
            "DEVICE=\"eth1\"\r\nBOOTPROTO=\"dhcp\"\r\nDEFROUTE=yes\r\nPERSISTENT_DHCLIENT=\"y\"\r\n"
        );
    }

    #[test]
    fn rhel_dhcp_file_gets_persistent_dhclient_and_keeps_value_if_set() {
        let t = ifcfg_to_dhcp("DEVICE=eth0\nBOOTPROTO=dhcp\n", IfcfgFlavor::Rhel);
        assert_eq!(
            t.text,
            "DEVICE=eth0\nBOOTPROTO=dhcp\nPERSISTENT_DHCLIENT=\"y\"\n"
        );
        let src = "DEVICE=eth0\nBOOTPROTO=dhcp\nPERSISTENT_DHCLIENT=yes\n";
        assert_eq!(ifcfg_to_dhcp(src, IfcfgFlavor::Rhel).text, src);
        let src = "DEVICE=eth0\nPERSISTENT_DHCLIENT=no\nBOOTPROTO=dhcp\nIPADDR=10.0.0.9\nBOOTPROTO=static\n";
        assert_eq!(
            ifcfg_to_dhcp(src, IfcfgFlavor::Rhel).text,
            "DEVICE=eth0\nPERSISTENT_DHCLIENT=\"y\"\nBOOTPROTO=dhcp\n"
        );
    }

    #[test]
    fn ports_loopback_and_unconfigured_are_left_alone() {
        for src in [
            "DEVICE=eth2\nBOOTPROTO=none\nMASTER=bond0\nSLAVE=yes\n",
            "DEVICE=eth3\nBRIDGE=br0\nONBOOT=yes\n",
            "DEVICE=lo\nIPADDR=127.0.0.1\n",
            "DEVICE=eth4\nBOOTPROTO=none\nONBOOT=no\n",
            "DEVICE=eth5\nBOOTPROTO=ibft\n",
        ] {
            let t = ifcfg_to_dhcp(src, IfcfgFlavor::Rhel);
            assert_eq!(t.text, src);
            assert_eq!(t.notes.len(), 1, "{src}");
        }
    }

    #[test]
    fn suse_ifcfg_and_dhcp_file() {
        let src = "BOOTPROTO='static'\nSTARTMODE='auto'\nIPADDR='192.168.1.20/24'\n\
                   IPADDR_1='10.0.0.2'\nNETMASK_1='255.0.0.0'\nLABEL_1='one'\nNAME='eth0'\n";
        let t = ifcfg_to_dhcp(src, IfcfgFlavor::Suse);
        assert_eq!(t.text, "BOOTPROTO='dhcp'\nSTARTMODE='auto'\nNAME='eth0'\n");
        assert_eq!(ifcfg_to_dhcp(&t.text, IfcfgFlavor::Suse).text, t.text);
        // SUSE bridge/bond ports: BOOTPROTO='none' and no address.
        let port = "BOOTPROTO='none'\nSTARTMODE='hotplug'\n";
        assert_eq!(ifcfg_to_dhcp(port, IfcfgFlavor::Suse).text, port);

        let dhcp = "## Type:\tyesno\n## Default:\tyes\n#\nDHCLIENT_USE_LAST_LEASE=\"yes\"\n\
                    DHCLIENT_SET_HOSTNAME=\"yes\"";
        let t = suse_dhcp_file(dhcp);
        assert_eq!(
            t.text,
            "## Type:\tyesno\n## Default:\tyes\n#\nDHCLIENT_USE_LAST_LEASE=\"no\"\n\
             DHCLIENT_SET_HOSTNAME=\"yes\""
        );
        assert_eq!(suse_dhcp_file(&t.text).text, t.text);
        assert_eq!(
            suse_dhcp_file("# empty").text,
            "# empty\nDHCLIENT_USE_LAST_LEASE=\"no\"\n"
        );
    }

    const DEBIAN: &str = "\
# This file describes the network interfaces available on your system
source /etc/network/interfaces.d/*

# The loopback network interface
auto lo
iface lo inet loopback

auto eth0
iface eth0 inet static
\taddress 192.168.1.10
\tnetmask 255.255.255.0
\tgateway 192.168.1.1
\tdns-nameservers 192.168.1.2 8.8.8.8
\tdns-search example.com
\tpost-up ip route add 10.9.0.0/16 via 192.168.1.254

iface eth0 inet6 static
    address 2001:db8::10/64
    gateway 2001:db8::1

allow-hotplug eth1
iface eth1 inet dhcp
source-directory interfaces.d
";

    #[test]
    fn debian_static_stanzas_become_dhcp() {
        let (t, inc) = interfaces_to_dhcp(DEBIAN);
        assert_eq!(
            t.text,
            "\
# This file describes the network interfaces available on your system
source /etc/network/interfaces.d/*

# The loopback network interface
auto lo
iface lo inet loopback

auto eth0
iface eth0 inet dhcp
\tdns-search example.com
\tpost-up ip route add 10.9.0.0/16 via 192.168.1.254

iface eth0 inet6 auto

allow-hotplug eth1
iface eth1 inet dhcp
source-directory interfaces.d
"
        );
        assert_eq!(
            inc,
            vec![
                Include::Source("/etc/network/interfaces.d/*".into()),
                Include::Directory("interfaces.d".into())
            ]
        );
        assert_eq!(t.notes.len(), 2, "{:?}", t.notes);
        assert_eq!(interfaces_to_dhcp(&t.text).0.text, t.text);
    }

    #[test]
    fn debian_lo_static_continuations_tabs_and_crlf() {
        let src = "iface lo inet static\r\n  address 127.0.0.1\r\niface\teth0\tinet\tstatic \r\n\
                   address 10.0.0.2\\\r\n   /8\r\n# address kept comment\r\n  mtu 1400";
        let (t, _) = interfaces_to_dhcp(src);
        assert_eq!(
            t.text,
            "iface lo inet static\r\n  address 127.0.0.1\r\niface\teth0\tinet\tdhcp \r\n\
             # address kept comment\r\n  mtu 1400"
        );
    }

    const NM: &str = "\
[connection]
id=Wired connection 1
uuid=0b5f4c2e-5f0b-4c4a-9a58-5c3f6a6f0d11
type=ethernet
interface-name=eth0

[ethernet]
mac-address=52:54:00:12:34:56

[ipv4]
address1=192.168.1.30/24,192.168.1.1
dns=192.168.1.2;8.8.8.8;
dns-search=example.com;
method=manual

[ipv6]
addr-gen-mode=stable-privacy
method=auto

[proxy]
";

    #[test]
    fn nm_keyfile_manual_becomes_auto() {
        let t = nm_keyfile_to_dhcp(NM);
        assert_eq!(
            t.text,
            "\
[connection]
id=Wired connection 1
uuid=0b5f4c2e-5f0b-4c4a-9a58-5c3f6a6f0d11
type=ethernet
interface-name=eth0

[ethernet]

[ipv4]
dns-search=example.com;
method=auto

[ipv6]
addr-gen-mode=stable-privacy
method=auto

[proxy]
"
        );
        assert_eq!(nm_keyfile_to_dhcp(&t.text).text, t.text);
        // Older keyfiles: addresses1= and no method (manual implied); ipv6 manual too.
        let old =
            "[ipv4]\naddresses1=10.0.0.3;8;10.0.0.1;\n[ipv6]\nmethod=manual\naddress1=fd00::3/64\n";
        assert_eq!(
            nm_keyfile_to_dhcp(old).text,
            "[ipv4]\nmethod=auto\n[ipv6]\nmethod=auto\n"
        );
        let dhcp = "[ipv4]\nmethod=auto\n";
        assert_eq!(nm_keyfile_to_dhcp(dhcp).text, dhcp);
    }

    const NETWORKD: &str = "\
# static
[Match]
Name=eth0

[Network]
Address=192.168.1.40/24
Gateway=192.168.1.1
DNS=192.168.1.2
Domains=example.com

[Address]
Address=10.0.0.40/8

[Route]
Gateway=192.168.1.1

[Route]
Destination=10.20.0.0/16
Gateway=192.168.1.254
";

    #[test]
    fn networkd_static_becomes_dhcp() {
        let t = networkd_to_dhcp(NETWORKD);
        assert_eq!(
            t.text,
            "\
# static
[Match]
Name=eth0

[Network]
Domains=example.com
DHCP=yes

[Route]
Destination=10.20.0.0/16
Gateway=192.168.1.254
"
        );
        assert_eq!(networkd_to_dhcp(&t.text).text, t.text);
        let lo = "[Match]\nName=lo\n[Network]\nAddress=127.0.0.1/8\n";
        assert_eq!(networkd_to_dhcp(lo).text, lo);
        let no = "[Match]\nMACAddress=52:54:00:aa:bb:cc\n[Network]\nDHCP=no\nAddress=10.1.1.1/24";
        let t = networkd_to_dhcp(no);
        assert_eq!(
            t.text,
            "[Match]\nMACAddress=52:54:00:aa:bb:cc\n[Network]\nDHCP=yes\n"
        );
        assert!(t.notes[0].contains("MACAddress"));
        // Only an [Address] section: a [Network] section is added.
        let t = networkd_to_dhcp("[Match]\nName=en*\n\n[Address]\nAddress=10.1.1.1/24\n");
        assert_eq!(t.text, "[Match]\nName=en*\n\n[Network]\nDHCP=yes\n");
    }

    #[test]
    fn globs_and_names() {
        assert!(glob_match("*", "eth0"));
        assert!(!glob_match("*", ".hidden"));
        assert!(glob_match("*.cfg", "a.cfg"));
        assert!(!glob_match("*.cfg", "a.cfg~"));
        assert!(glob_match("eth[0-9]", "eth3"));
        assert!(!glob_match("eth[!0-9]", "eth3"));
        assert!(glob_match("e?h*", "eth0.100"));
        assert!(glob_match("a*b*c", "aXbYbZc"));
        assert!(!glob_match("a*b*c", "aXbYbZ"));
        assert!(glob_match("[", "["));
        assert!(source_directory_name_ok("eth0-static_1"));
        assert!(!source_directory_name_ok("eth0.cfg"));
        assert!(ifcfg_name_ok("ifcfg-eth0"));
        for bad in [
            "ifcfg-lo",
            "ifcfg-eth0:1",
            "ifcfg-eth0.bak",
            "ifcfg-eth0~",
            "route-eth0",
            "ifcfg.template",
        ] {
            assert!(!ifcfg_name_ok(bad), "{bad}");
        }
        // Pathological pattern stays fast.
        let t = std::time::Instant::now();
        assert!(!glob_match(
            &format!("{}b", "*a".repeat(50)),
            &"a".repeat(5000)
        ));
        assert!(glob_match(&"*a".repeat(50), &"a".repeat(5000)));
        assert!(t.elapsed() < std::time::Duration::from_secs(2));
    }

    #[test]
    fn huge_hostile_input_is_linear() {
        let mut big = String::new();
        for i in 0..200_000 {
            big.push_str(&format!("iface e{i} inet static\n address 10.0.0.1\\\n"));
        }
        let t = std::time::Instant::now();
        let _ = interfaces_to_dhcp(&big);
        let _ = ifcfg_to_dhcp(&big, IfcfgFlavor::Rhel);
        let _ = nm_keyfile_to_dhcp(&"[ipv4]\n".repeat(100_000));
        let _ = networkd_to_dhcp(&"[Network]\nAddress=1.2.3.4/8\n".repeat(100_000));
        assert!(t.elapsed() < std::time::Duration::from_secs(10));
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
}
