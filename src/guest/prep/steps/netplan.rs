//! The netplan part of the `dhcp` step: a careful textual edit of netplan YAML.
//!
//! No YAML library: the file is edited line by line so that comments, key order, quoting and
//! spacing stay as the admin wrote them, and only the lines that carry static addressing are
//! touched. The edit understands block-style YAML (the form netplan files are written in):
//! indentation-nested mappings, block sequences (also at the same indentation as their key),
//! quoted keys, trailing comments, CRLF lines. For every interface under `network:` →
//! `ethernets`, `bonds`, `bridges`, `vlans` or `wifis` that has `addresses`:
//!
//! - `addresses`, `gateway4` and `gateway6` are removed;
//! - `routes` entries to `default`, `0.0.0.0/0` or `::/0` are removed (the key too when none is
//!   left; a flow-style `routes: [...]` naming a default route is removed whole);
//! - `nameservers.addresses` is removed (`nameservers` too when nothing else is in it);
//! - `dhcp4: true` is set (replacing a false value, or in place of `addresses`).
//!
//! What it cannot edit safely is left unchanged with a note: flow-style mappings
//! (`network: {...}`, `eth0: {...}`), tab indentation, more than one YAML document. An
//! interface matched by MAC address is noted (a VM made from the image has another MAC).

use crate::guest::prep::text::{dominant_eol, lines, Builder, Line};
use crate::guest::prep::Transform;

const SECTIONS: &[&str] = &["ethernets", "bonds", "bridges", "vlans", "wifis"];

#[derive(Debug, Clone, PartialEq, Eq)]
enum Kind {
    Blank,
    Comment,
    /// `key: value` (value without trailing comment, trimmed; empty for a block).
    Key {
        key: String,
        value: String,
    },
    /// A block sequence item `- ...`; `inner` is the `key: value` on the same line, if any.
    Item {
        inner: Option<(String, String)>,
    },
    /// A document marker or directive (`---`, `...`, `%YAML`).
    Marker,
    Other,
}

#[derive(Debug, Clone)]
struct YLine {
    indent: usize,
    kind: Kind,
}

impl YLine {
    fn content(&self) -> bool {
        !matches!(self.kind, Kind::Blank | Kind::Comment)
    }
}

/// Splits `key: value` (the body of a line after its indentation); None when not a mapping
/// entry.
fn split_key(body: &str) -> Option<(String, String)> {
    let (key, rest) = if let Some(q @ ('"' | '\'')) = body.chars().next() {
        let end = body[1..].find(q)? + 1;
        let key = body[1..end].to_string();
        (key, body[end + 1..].trim_start())
    } else {
        if body.starts_with(['{', '[', '#', '&', '*', '!', '|', '>']) {
            return None;
        }
        // The first ':' followed by a space or the end of the line.
        let b = body.as_bytes();
        let mut i = 0;
        loop {
            let c = body[i..].find(':')? + i;
            if c + 1 == b.len() || b[c + 1] == b' ' || b[c + 1] == b'\t' {
                i = c;
                break;
            }
            i = c + 1;
        }
        let key = body[..i].trim_end();
        if key.is_empty() {
            return None;
        }
        (key.to_string(), &body[i..])
    };
    let rest = rest.strip_prefix(':')?;
    Some((key, strip_comment(rest).trim().to_string()))
}

/// A value without its trailing ` # comment` (a `#` inside quotes is kept).
fn strip_comment(v: &str) -> &str {
    let mut quote: Option<char> = None;
    let mut prev_space = true;
    for (i, c) in v.char_indices() {
        match quote {
            Some(q) if c == q => quote = None,
            Some(_) => {}
            None if c == '"' || c == '\'' => quote = Some(c),
            None if c == '#' && prev_space => return &v[..i],
            None => {}
        }
        prev_space = c == ' ' || c == '\t';
    }
    v
}

fn unquote(v: &str) -> &str {
    let v = v.trim();
    for q in ['"', '\''] {
        if let Some(s) = v.strip_prefix(q).and_then(|s| s.strip_suffix(q)) {
            return s;
        }
    }
    v
}

fn classify(l: &Line<'_>) -> Result<YLine, String> {
    let body = l.text.trim_start_matches(' ');
    let indent = l.text.len() - body.len();
    if body.starts_with('\t') && !body.trim().is_empty() {
        return Err("indented with tabs".into());
    }
    let t = body.trim_end();
    let kind = if t.is_empty() {
        Kind::Blank
    } else if t.starts_with('#') {
        Kind::Comment
    } else if indent == 0
        && (t == "---" || t == "..." || t.starts_with("--- ") || t.starts_with('%'))
    {
        Kind::Marker
    } else if t == "-" || t.starts_with("- ") {
        let rest = t[1..].trim_start();
        Kind::Item {
            inner: split_key(rest),
        }
    } else if let Some((key, value)) = split_key(t) {
        Kind::Key { key, value }
    } else {
        Kind::Other
    };
    Ok(YLine { indent, kind })
}

struct Doc<'a> {
    ls: Vec<Line<'a>>,
    ys: Vec<YLine>,
}

impl Doc<'_> {
    fn key(&self, i: usize) -> Option<(&str, &str)> {
        match &self.ys[i].kind {
            Kind::Key { key, value } => Some((key, value)),
            _ => None,
        }
    }

    /// End (exclusive) of the block of the key or item at `i`: the lines after it that are more
    /// indented (or, for a key with an empty value, sequence items at its own indentation),
    /// without trailing blank and comment lines.
    fn block_end(&self, i: usize) -> usize {
        let n = self.ys[i].indent;
        let seq_same_indent =
            matches!(&self.ys[i].kind, Kind::Key { value, .. } if value.is_empty());
        let mut last = i;
        for j in i + 1..self.ys.len() {
            let y = &self.ys[j];
            if !y.content() {
                continue;
            }
            let inside = y.indent > n
                || (seq_same_indent && y.indent == n && matches!(y.kind, Kind::Item { .. }));
            if !inside {
                break;
            }
            last = j;
        }
        last + 1
    }

    /// The keys directly inside the block (from, to): (line, end of its block).
    fn children(&self, from: usize, to: usize) -> Vec<(usize, usize)> {
        let Some(indent) = (from..to)
            .filter(|&j| self.ys[j].content())
            .map(|j| self.ys[j].indent)
            .min()
        else {
            return Vec::new();
        };
        (from..to)
            .filter(|&j| self.ys[j].indent == indent && matches!(self.ys[j].kind, Kind::Key { .. }))
            .map(|j| (j, self.block_end(j)))
            .collect()
    }

    fn child(&self, kids: &[(usize, usize)], name: &str) -> Option<(usize, usize)> {
        kids.iter()
            .copied()
            .find(|&(j, _)| self.key(j).map(|(k, _)| k) == Some(name))
    }

    /// The sequence items directly inside a block: (line, end).
    fn items(&self, from: usize, to: usize) -> Vec<(usize, usize)> {
        let Some(indent) = (from..to)
            .filter(|&j| self.ys[j].content())
            .map(|j| self.ys[j].indent)
            .min()
        else {
            return Vec::new();
        };
        (from..to)
            .filter(|&j| {
                self.ys[j].indent == indent && matches!(self.ys[j].kind, Kind::Item { .. })
            })
            .map(|j| (j, self.block_end(j)))
            .collect()
    }
}

/// One edit: lines [from, to) replaced by `with` (a line of text, or nothing).
#[derive(Debug, Clone)]
struct Edit {
    from: usize,
    to: usize,
    with: Option<String>,
}

fn is_default_route(to: &str) -> bool {
    matches!(unquote(to), "default" | "0.0.0.0/0" | "::/0")
}

/// A netplan YAML file with static addressing turned to DHCP (see the module doc).
pub fn netplan_to_dhcp(text: &str) -> Transform {
    let unchanged = |why: String| Transform {
        text: text.to_string(),
        notes: vec![why],
    };
    let ls = lines(text);
    let mut ys = Vec::with_capacity(ls.len());
    for (i, l) in ls.iter().enumerate() {
        match classify(l) {
            Ok(y) => ys.push(y),
            Err(e) => return unchanged(format!("line {} is {e}: not edited", i + 1)),
        }
    }
    let markers = ys.iter().filter(|y| y.kind == Kind::Marker).count();
    let doc = Doc { ls, ys };
    // More than one document (a marker after content).
    if markers > 1
        || doc.ys.iter().enumerate().any(|(i, y)| {
            y.kind == Kind::Marker
                && doc.ys[..i]
                    .iter()
                    .any(|p| p.content() && p.kind != Kind::Marker)
        })
    {
        return unchanged("more than one YAML document: not edited".into());
    }
    let n = doc.ys.len();
    let top = doc.children(0, n);
    let Some((net, net_end)) = doc.child(&top, "network") else {
        return Transform {
            text: text.to_string(),
            notes: Vec::new(),
        };
    };
    if !doc.key(net).map(|(_, v)| v).unwrap_or("").is_empty() {
        return unchanged("flow-style `network:` mapping: not edited".into());
    }
    let mut edits: Vec<Edit> = Vec::new();
    let mut notes = Vec::new();
    let net_kids = doc.children(net + 1, net_end);
    for section in SECTIONS {
        let Some((sec, sec_end)) = doc.child(&net_kids, section) else {
            continue;
        };
        if !doc.key(sec).map(|(_, v)| v).unwrap_or("").is_empty() {
            notes.push(format!("flow-style `{section}:`: not edited"));
            continue;
        }
        for (ifc, ifc_end) in doc.children(sec + 1, sec_end) {
            let (name, value) = doc.key(ifc).expect("a key");
            if !value.is_empty() {
                if value.contains("addresses") {
                    notes.push(format!("{name}: flow-style mapping, not edited"));
                }
                continue;
            }
            convert_interface(&doc, name, ifc, ifc_end, &mut edits, &mut notes);
        }
    }
    if edits.is_empty() {
        return Transform {
            text: text.to_string(),
            notes,
        };
    }
    edits.sort_by_key(|e| e.from);
    let mut b = Builder::new(dominant_eol(text), text.len());
    let mut i = 0;
    let mut e = 0;
    while i < n {
        if e < edits.len() && edits[e].from == i {
            if let Some(t) = &edits[e].with {
                b.push(t, doc.ls[i].eol);
            }
            i = edits[e].to.max(i + 1);
            e += 1;
            // Skip edits nested in the one just applied.
            while e < edits.len() && edits[e].from < i {
                e += 1;
            }
            continue;
        }
        b.keep(&doc.ls[i]);
        i += 1;
    }
    Transform {
        text: b.finish(),
        notes,
    }
}

fn convert_interface(
    doc: &Doc<'_>,
    name: &str,
    ifc: usize,
    ifc_end: usize,
    edits: &mut Vec<Edit>,
    notes: &mut Vec<String>,
) {
    let kids = doc.children(ifc + 1, ifc_end);
    if let Some((m, m_end)) = doc.child(&kids, "match") {
        let has_mac = doc
            .children(m + 1, m_end)
            .iter()
            .any(|&(j, _)| doc.key(j).map(|(k, _)| k) == Some("macaddress"))
            || doc.key(m).is_some_and(|(_, v)| v.contains("macaddress"));
        if has_mac {
            notes.push(format!(
                "{name}: matched by MAC address; a VM made from the image has another MAC"
            ));
        }
    }
    let Some((addr, addr_end)) = doc.child(&kids, "addresses") else {
        return;
    };
    let child_indent = doc.ys[addr].indent;
    let pad = " ".repeat(child_indent);
    let dhcp4 = doc.child(&kids, "dhcp4");
    match dhcp4 {
        Some((d, _)) => {
            edits.push(Edit {
                from: addr,
                to: addr_end,
                with: None,
            });
            let v = doc.key(d).map(|(_, v)| unquote(v).to_ascii_lowercase());
            if !matches!(v.as_deref(), Some("true" | "yes" | "on" | "y")) {
                edits.push(Edit {
                    from: d,
                    to: d + 1,
                    with: Some(format!("{pad}dhcp4: true")),
                });
            }
        }
        None => edits.push(Edit {
            from: addr,
            to: addr_end,
            with: Some(format!("{pad}dhcp4: true")),
        }),
    }
    for key in ["gateway4", "gateway6"] {
        if let Some((g, g_end)) = doc.child(&kids, key) {
            edits.push(Edit {
                from: g,
                to: g_end,
                with: None,
            });
        }
    }
    if let Some((r, r_end)) = doc.child(&kids, "routes") {
        let value = doc.key(r).map(|(_, v)| v).unwrap_or("");
        if !value.is_empty() {
            if value.contains("default") || value.contains("0.0.0.0/0") || value.contains("::/0") {
                edits.push(Edit {
                    from: r,
                    to: r_end,
                    with: None,
                });
            }
        } else {
            let items = doc.items(r + 1, r_end);
            let defaults: Vec<(usize, usize)> = items
                .iter()
                .copied()
                .filter(|&(j, j_end)| {
                    let inner_to = match &doc.ys[j].kind {
                        Kind::Item {
                            inner: Some((k, v)),
                        } if k == "to" => Some(v.clone()),
                        _ => None,
                    };
                    let to = inner_to.or_else(|| {
                        (j + 1..j_end).find_map(|x| match doc.key(x) {
                            Some(("to", v)) => Some(v.to_string()),
                            _ => None,
                        })
                    });
                    to.as_deref().is_some_and(is_default_route)
                })
                .collect();
            if !defaults.is_empty() && defaults.len() == items.len() {
                edits.push(Edit {
                    from: r,
                    to: r_end,
                    with: None,
                });
            } else {
                for (j, j_end) in defaults {
                    edits.push(Edit {
                        from: j,
                        to: j_end,
                        with: None,
                    });
                }
            }
        }
    }
    if let Some((ns, ns_end)) = doc.child(&kids, "nameservers") {
        let value = doc.key(ns).map(|(_, v)| v).unwrap_or("");
        if !value.is_empty() {
            edits.push(Edit {
                from: ns,
                to: ns_end,
                with: None,
            });
        } else {
            let ns_kids = doc.children(ns + 1, ns_end);
            if let Some((a, a_end)) = doc.child(&ns_kids, "addresses") {
                if ns_kids.len() == 1 {
                    edits.push(Edit {
                        from: ns,
                        to: ns_end,
                        with: None,
                    });
                } else {
                    edits.push(Edit {
                        from: a,
                        to: a_end,
                        with: None,
                    });
                }
            }
        }
    }
    notes.push(format!("{name}: static addresses removed, dhcp4 enabled"));
}

#[cfg(test)]
mod tests {
    use super::*;

    const STATIC: &str = "\
# This is the network config written by 'subiquity'
network:
  version: 2
  renderer: networkd
  ethernets:
    eth0:
      match:
        macaddress: \"52:54:00:12:34:56\"
      set-name: eth0
      addresses:
        - 192.168.1.50/24   # primary
        - \"2001:db8::50/64\"
      gateway4: 192.168.1.1
      routes:
      - to: default
        via: 192.168.1.1
      - to: 10.30.0.0/16
        via: 192.168.1.254
      nameservers:
        addresses: [192.168.1.2, 8.8.8.8]
        search: [example.com]
      dhcp4: false # static
      mtu: 1500
    eth1:
      dhcp4: true
";

    #[test]
    fn static_interface_becomes_dhcp() {
        let t = netplan_to_dhcp(STATIC);
        assert_eq!(
            t.text,
            "\
# This is the network config written by 'subiquity'
network:
  version: 2
  renderer: networkd
  ethernets:
    eth0:
      match:
        macaddress: \"52:54:00:12:34:56\"
      set-name: eth0
      routes:
      - to: 10.30.0.0/16
        via: 192.168.1.254
      nameservers:
        search: [example.com]
      dhcp4: true
      mtu: 1500
    eth1:
      dhcp4: true
"
        );
        assert!(t.notes.iter().any(|n| n.contains("MAC")), "{:?}", t.notes);
        let again = netplan_to_dhcp(&t.text);
        assert_eq!(again.text, t.text);
    }

    #[test]
    fn flow_sequences_inserted_dhcp4_and_crlf() {
        let src = "network:\r\n  version: 2\r\n  ethernets:\r\n    \"enp1s0\":\r\n      \
                   addresses: [10.0.0.5/24]\r\n      routes: [{to: 0.0.0.0/0, via: 10.0.0.1}]\r\n      \
                   nameservers: {addresses: [10.0.0.2]}\r\n  bonds:\r\n    bond0:\r\n      \
                   interfaces: [enp2s0, enp3s0]\r\n      addresses:\r\n      - 10.1.0.5/24\r\n      \
                   gateway6: \"fd00::1\"";
        let t = netplan_to_dhcp(src);
        assert_eq!(
            t.text,
            "network:\r\n  version: 2\r\n  ethernets:\r\n    \"enp1s0\":\r\n      dhcp4: true\r\n  \
             bonds:\r\n    bond0:\r\n      interfaces: [enp2s0, enp3s0]\r\n      dhcp4: true\r\n"
        );
        assert_eq!(netplan_to_dhcp(&t.text).text, t.text);
    }

    #[test]
    fn unsupported_shapes_are_left_alone() {
        for src in [
            "network: {version: 2, ethernets: {eth0: {addresses: [10.0.0.5/24]}}}\n",
            "network:\n\tethernets:\n",
            "network:\n  ethernets:\n    eth0: {addresses: [10.0.0.5/24]}\n",
            "---\nnetwork:\n  version: 2\n---\nnetwork:\n  version: 2\n",
        ] {
            let t = netplan_to_dhcp(src);
            assert_eq!(t.text, src);
            assert_eq!(t.notes.len(), 1, "{src}: {:?}", t.notes);
        }
        // Nothing static: untouched, no notes.
        let dhcp = "network:\n  version: 2\n  ethernets:\n    eth0:\n      dhcp4: yes\n";
        let t = netplan_to_dhcp(dhcp);
        assert_eq!((t.text.as_str(), t.notes.len()), (dhcp, 0));
        // A document marker first is fine.
        let t =
            netplan_to_dhcp("---\nnetwork:\n  ethernets:\n    e:\n      addresses: [1.2.3.4/8]\n");
        assert_eq!(
            t.text,
            "---\nnetwork:\n  ethernets:\n    e:\n      dhcp4: true\n"
        );
    }

    #[test]
    fn keys_with_colons_and_comments() {
        assert_eq!(split_key("a:b: c # x"), Some(("a:b".into(), "c".into())));
        assert_eq!(
            split_key("'x: y': \"v # not comment\""),
            Some(("x: y".into(), "\"v # not comment\"".into()))
        );
        assert_eq!(split_key("http://x"), None);
        assert_eq!(split_key("key:"), Some(("key".into(), String::new())));
    }

    #[test]
    fn huge_input_is_bounded() {
        let mut s = String::from("network:\n  ethernets:\n");
        for i in 0..50_000 {
            s.push_str(&format!(
                "    e{i}:\n      addresses:\n        - 10.0.0.1/8\n"
            ));
        }
        let t0 = std::time::Instant::now();
        let t = netplan_to_dhcp(&s);
        assert!(t0.elapsed() < std::time::Duration::from_secs(10));
        assert_eq!(t.text.matches("dhcp4: true").count(), 50_000);
    }
}
