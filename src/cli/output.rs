//! How `imagectl` shows things: tables for people, JSON for scripts, a progress bar for
//! long work on a terminal and plain state lines elsewhere.
//!
//! Human output passes every string through [`escape_controls`]: guest file contents (prep
//! diffs), messages and names never reach the admin's terminal with control characters in them.
//! JSON output carries the exact strings (serde escapes them).

use std::borrow::Cow;
use std::fmt::Write as _;
use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{json, Value};

use crate::proto;
use crate::util::{human_bytes, rfc3339};

/// `s` with its control characters made visible: C0 controls but `\n` and `\t` (so ESC,
/// `\r`, backspace, ...) and DEL as `\x1b`-style escapes, C1 controls (U+0080–U+009F) as
/// `\u{9b}`-style escapes. Everything else is kept as it is.
pub fn escape_controls(s: &str) -> Cow<'_, str> {
    let bad = |c: char| {
        (c < ' ' && c != '\n' && c != '\t') || c == '\u{7f}' || ('\u{80}'..='\u{9f}').contains(&c)
    };
    if !s.chars().any(bad) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if !bad(c) {
            out.push(c);
        } else if c <= '\u{7f}' {
            let _ = write!(out, "\\x{:02x}", c as u32);
        } else {
            let _ = write!(out, "\\u{{{:x}}}", c as u32);
        }
    }
    Cow::Owned(out)
}

/// `s` for one table cell or one line: [`escape_controls`], and `\n` and `\t` escaped too.
fn escape_line(s: &str) -> String {
    escape_controls(s)
        .replace('\n', "\\x0a")
        .replace('\t', "\\x09")
}

/// How a [`Table`] column lines its cells up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Align {
    Left,
    Right,
}

/// A table for people: each column as wide as its widest cell or header (in terminal columns),
/// columns two spaces apart, so every cell of a column starts at the header's offset (a right
/// aligned column ends where its header ends). Cells are escaped with [`escape_line`].
struct Table {
    headers: Vec<(&'static str, Align)>,
    rows: Vec<Vec<String>>,
}

impl Table {
    fn new(headers: &[(&'static str, Align)]) -> Table {
        Table {
            headers: headers.to_vec(),
            rows: Vec::new(),
        }
    }

    /// Adds a row; missing trailing cells are empty.
    fn row(&mut self, cells: Vec<String>) {
        debug_assert!(cells.len() <= self.headers.len());
        self.rows
            .push(cells.iter().map(|c| escape_line(c)).collect());
    }

    /// The table as lines, without trailing spaces, each ending in `\n`.
    fn render(&self) -> String {
        let mut widths: Vec<usize> = self.headers.iter().map(|(h, _)| width(h)).collect();
        for r in &self.rows {
            for (w, c) in widths.iter_mut().zip(r) {
                *w = (*w).max(width(c));
            }
        }
        let mut out = String::new();
        let header: Vec<String> = self.headers.iter().map(|(h, _)| h.to_string()).collect();
        for cells in std::iter::once(&header).chain(&self.rows) {
            let mut line = String::new();
            for (i, (&w, (_, align))) in widths.iter().zip(&self.headers).enumerate() {
                let cell = cells.get(i).map(String::as_str).unwrap_or("");
                let pad = " ".repeat(w - width(cell));
                if i > 0 {
                    line.push_str("  ");
                }
                match align {
                    Align::Left => {
                        line.push_str(cell);
                        line.push_str(&pad);
                    }
                    Align::Right => {
                        line.push_str(&pad);
                        line.push_str(cell);
                    }
                }
            }
            out.push_str(line.trim_end_matches(' '));
            out.push('\n');
        }
        out
    }
}

/// Terminal columns `s` takes.
fn width(s: &str) -> usize {
    unicode_width::UnicodeWidthStr::width(s)
}

fn domain_state(s: i32) -> &'static str {
    match proto::DomainState::try_from(s) {
        Ok(proto::DomainState::Running) => "running",
        Ok(proto::DomainState::Blocked) => "blocked",
        Ok(proto::DomainState::Paused) => "paused",
        Ok(proto::DomainState::ShuttingDown) => "in shutdown",
        Ok(proto::DomainState::ShutOff) => "shut off",
        Ok(proto::DomainState::Crashed) => "crashed",
        Ok(proto::DomainState::Suspended) => "pmsuspended",
        _ => "unknown",
    }
}

/// Lower-case name of an operation state.
pub fn op_state(s: i32) -> &'static str {
    match proto::OperationState::try_from(s) {
        Ok(proto::OperationState::Queued) => "queued",
        Ok(proto::OperationState::Preparing) => "preparing",
        Ok(proto::OperationState::Saving) => "saving",
        Ok(proto::OperationState::Active) => "active",
        Ok(proto::OperationState::Failed) => "failed",
        Ok(proto::OperationState::Cancelled) => "cancelled",
        _ => "unknown",
    }
}

fn op_kind(k: i32) -> &'static str {
    match proto::OperationKind::try_from(k) {
        Ok(proto::OperationKind::Capture) => "capture",
        Ok(proto::OperationKind::Import) => "import",
        Ok(proto::OperationKind::Export) => "export",
        _ => "unknown",
    }
}

fn domain_json(d: &proto::Domain) -> Value {
    json!({
        "name": d.name, "uuid": d.uuid, "state": domain_state(d.state), "persistent": d.persistent,
        "has_guest_agent_channel": d.has_guest_agent_channel,
        "disks": d.disks.iter().map(|k| json!({
            "target": k.target, "path": k.path, "format": k.format, "virtual_size": k.virtual_size,
            "device": k.device, "system_disk": k.system_disk,
        })).collect::<Vec<_>>(),
    })
}

/// Prints domains.
pub fn domains(ds: &[proto::Domain], json: bool) {
    if json {
        println!("{}", Value::Array(ds.iter().map(domain_json).collect()));
        return;
    }
    print!("{}", domains_table(ds));
}

/// The domains table: one row per disk (the domain's name, state and agent on its first), a
/// `-` disk for a domain without disks; `*` marks the system disk.
fn domains_table(ds: &[proto::Domain]) -> String {
    use Align::*;
    let mut t = Table::new(&[
        ("DOMAIN", Left),
        ("STATE", Left),
        ("AGENT", Left),
        ("DISK", Left),
        ("FORMAT", Left),
        ("SIZE", Right),
        ("PATH", Left),
    ]);
    for d in ds {
        let agent = if d.has_guest_agent_channel {
            "yes"
        } else {
            "no"
        };
        let first = vec![
            d.name.clone(),
            domain_state(d.state).to_string(),
            agent.to_string(),
        ];
        if d.disks.is_empty() {
            let mut row = first.clone();
            row.push("-".into());
            t.row(row);
        }
        for (i, k) in d.disks.iter().enumerate() {
            let mut row = if i == 0 {
                first.clone()
            } else {
                vec![String::new(); 3]
            };
            row.push(if k.system_disk {
                format!("{}*", k.target)
            } else {
                k.target.clone()
            });
            row.push(k.format.clone());
            row.push(human_bytes(k.virtual_size));
            row.push(k.path.clone());
            t.row(row);
        }
    }
    t.render()
}

/// One image as JSON.
pub fn image_json(i: &proto::Image) -> Value {
    json!({
        "name": i.name, "id": i.id, "state": i.state, "size": i.size, "virtual_size": i.virtual_size,
        "source_format": i.source_format, "content_digest": i.content_digest, "consistency": i.consistency,
        "source_domain": i.source_domain, "source_host": i.source_host, "source_disk": i.source_disk,
        "created_at": rfc3339(i.created_at), "updated_at": rfc3339(i.updated_at),
        "chunk_count": i.chunk_count, "zero_chunks": i.zero_chunks, "chunk_size": i.chunk_size,
    })
}

/// Prints images.
pub fn images(is: &[proto::Image], json: bool) {
    if json {
        println!("{}", Value::Array(is.iter().map(image_json).collect()));
        return;
    }
    print!("{}", images_table(is));
}

fn images_table(is: &[proto::Image]) -> String {
    use Align::*;
    let mut t = Table::new(&[
        ("IMAGE", Left),
        ("SIZE", Right),
        ("VIRTUAL", Right),
        ("CONSISTENT", Left),
        ("SOURCE", Left),
        ("CREATED", Left),
    ]);
    for i in is {
        t.row(vec![
            i.name.clone(),
            human_bytes(i.size),
            human_bytes(i.virtual_size),
            i.consistency.clone(),
            if i.source_domain.is_empty() {
                "-".into()
            } else {
                i.source_domain.clone()
            },
            rfc3339(i.created_at),
        ]);
    }
    t.render()
}

/// Prints one image in full.
pub fn image_detail(i: &proto::Image, json: bool) {
    if json {
        println!("{}", image_json(i));
        return;
    }
    println!("name:           {}", i.name);
    println!("id:             {}", i.id);
    println!("state:          {}", i.state);
    println!(
        "stored:         {} in {} data chunks ({} bytes)",
        human_bytes(i.size),
        i.chunk_count - i.zero_chunks,
        i.size
    );
    println!(
        "virtual size:   {} ({} bytes)",
        human_bytes(i.virtual_size),
        i.virtual_size
    );
    println!("source format:  {}", i.source_format);
    println!("consistency:    {}", i.consistency);
    println!(
        "source:         domain {:?} disk {:?} on host {:?}",
        i.source_domain, i.source_disk, i.source_host
    );
    println!("content digest: sha256-tree:{}", i.content_digest);
    println!(
        "chunks:         {} of {} ({} zero)",
        i.chunk_count,
        human_bytes(u64::from(i.chunk_size)),
        i.zero_chunks
    );
    println!("created:        {}", rfc3339(i.created_at));
}

/// Prints what a delete freed.
pub fn deleted(name: &str, r: &proto::DeleteImageResponse, json: bool) {
    if json {
        println!(
            "{}",
            json!({"deleted": name, "chunks_removed": r.chunks_removed, "bytes_freed": r.bytes_freed})
        );
    } else {
        println!(
            "deleted {name}: {} chunks removed, {} freed",
            r.chunks_removed,
            human_bytes(r.bytes_freed)
        );
    }
}

/// One operation as JSON.
pub fn operation_json(o: &proto::Operation) -> Value {
    let p = o.progress.unwrap_or_default();
    json!({
        "id": o.id, "kind": op_kind(o.kind), "state": op_state(o.state), "domain": o.domain,
        "image_name": o.image_name, "request_id": o.request_id, "path": o.path,
        "progress": {
            "bytes_total": p.bytes_total, "bytes_done": p.bytes_done, "bytes_read": p.bytes_read,
            "bytes_zero": p.bytes_zero, "bytes_new": p.bytes_new, "bytes_existing": p.bytes_existing,
            "rate_bytes_per_sec": p.rate_bytes_per_sec,
        },
        "error": o.error.as_ref().map(|e| json!({"code": e.code, "message": e.message})),
        "created_at": rfc3339(o.created_at), "updated_at": rfc3339(o.updated_at),
        "consistency": o.consistency, "freeze_window_ms": o.freeze_window_ms, "location": o.location,
        "prep": o.prep.iter().map(prep_json).collect::<Vec<_>>(),
    })
}

/// Prints operations.
pub fn operations(os: &[proto::Operation], json: bool) {
    if json {
        println!("{}", Value::Array(os.iter().map(operation_json).collect()));
        return;
    }
    print!("{}", operations_table(os));
}

fn operations_table(os: &[proto::Operation]) -> String {
    use Align::*;
    let mut t = Table::new(&[
        ("OPERATION", Left),
        ("KIND", Left),
        ("STATE", Left),
        ("IMAGE", Left),
        ("DONE", Right),
        ("CREATED", Left),
    ]);
    for o in os {
        let p = o.progress.unwrap_or_default();
        let pct = (p.bytes_done * 100).checked_div(p.bytes_total).unwrap_or(0);
        t.row(vec![
            o.id.clone(),
            op_kind(o.kind).to_string(),
            op_state(o.state).to_string(),
            o.image_name.clone(),
            format!("{pct}%"),
            rfc3339(o.created_at),
        ]);
    }
    t.render()
}

/// Prints one operation in full.
pub fn operation_detail(o: &proto::Operation, json: bool) {
    if json {
        println!("{}", operation_json(o));
        return;
    }
    let p = o.progress.unwrap_or_default();
    println!("operation: {} ({})", o.id, op_kind(o.kind));
    println!("state:     {}", op_state(o.state));
    if !o.domain.is_empty() {
        println!("domain:    {}", o.domain);
    }
    println!("image:     {}", o.image_name);
    if !o.path.is_empty() {
        println!("path:      {}", o.path);
    }
    println!("progress:  {}", summary(&p));
    if let Some(e) = &o.error {
        println!("error:     {}: {}", e.code, escape_controls(&e.message));
    }
}

fn summary(p: &proto::Progress) -> String {
    format!(
        "{} of {} done; read {}, zero {}, new {}, already stored {}",
        human_bytes(p.bytes_done),
        human_bytes(p.bytes_total),
        human_bytes(p.bytes_read),
        human_bytes(p.bytes_zero),
        human_bytes(p.bytes_new),
        human_bytes(p.bytes_existing)
    )
}

fn prep_json(r: &proto::PrepStepReport) -> Value {
    json!({
        "step": r.step, "outcome": r.outcome, "message": r.message,
        "changes": r.changes.iter().map(|c| json!({"path": c.path, "action": c.action, "diff": c.diff})).collect::<Vec<_>>(),
    })
}

/// Prints prep step plans or outcomes.
pub fn prep_reports(rs: &[proto::PrepStepReport], json: bool) {
    if json {
        println!("{}", Value::Array(rs.iter().map(prep_json).collect()));
        return;
    }
    print!("{}", prep_text(rs));
}

/// Prep plans or outcomes for people: each step, its changes and their diffs, indented. Every
/// string from the guest is escaped ([`escape_controls`]); a diff is split on `\n` only, so a
/// `\r` shows as `\x0d`.
fn prep_text(rs: &[proto::PrepStepReport]) -> String {
    let mut out = String::new();
    for r in rs {
        let _ = write!(out, "{}: {}", escape_line(&r.step), escape_line(&r.outcome));
        if !r.message.is_empty() {
            let _ = write!(out, " ({})", escape_line(&r.message));
        }
        out.push('\n');
        for c in &r.changes {
            let _ = writeln!(out, "  {} {}", escape_line(&c.action), escape_line(&c.path));
            let diff = c.diff.strip_suffix('\n').unwrap_or(&c.diff);
            if diff.is_empty() {
                continue;
            }
            for l in diff.split('\n') {
                let _ = writeln!(out, "    {}", escape_line(l));
            }
        }
    }
    out
}

/// Prints an RPC failure as JSON.
pub fn status_json(s: &tonic::Status) -> Value {
    json!({"error": {"code": format!("{:?}", s.code()), "message": s.message()}})
}

/// Shows an operation while it runs.
pub struct ProgressView {
    bar: Option<ProgressBar>,
    json: bool,
    last_state: i32,
}

impl ProgressView {
    /// A bar on a terminal, state lines on a pipe, silence with `--json`.
    pub fn new(op: &proto::Operation, json: bool) -> ProgressView {
        let bar = (!json && std::io::stderr().is_terminal()).then(|| {
            let b = ProgressBar::new(1);
            b.set_style(
                ProgressStyle::with_template(
                    "{spinner} {prefix} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta} {msg}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            b.set_prefix(format!("{} {}", op_kind(op.kind), op.image_name));
            b
        });
        if bar.is_none() && !json {
            eprintln!(
                "{} {}: {} ({})",
                op_kind(op.kind),
                op.image_name,
                op_state(op.state),
                op.id
            );
        }
        ProgressView {
            bar,
            json,
            last_state: op.state,
        }
    }

    /// Shows a new snapshot.
    pub fn update(&mut self, o: &proto::Operation) {
        let p = o.progress.unwrap_or_default();
        if let Some(b) = &self.bar {
            b.set_length(p.bytes_total.max(1));
            b.set_position(p.bytes_done);
            b.set_message(op_state(o.state));
        } else if !self.json && o.state != self.last_state {
            eprintln!(
                "{} {}: {}",
                op_kind(o.kind),
                o.image_name,
                op_state(o.state)
            );
        }
        self.last_state = o.state;
    }

    /// Prints the outcome.
    pub fn finish(self, o: &proto::Operation) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
        if self.json {
            println!("{}", operation_json(o));
            return;
        }
        let p = o.progress.unwrap_or_default();
        if o.error.is_none() && o.kind == proto::OperationKind::Export as i32 {
            println!(
                "export {} -> {}: {} ({} of data written, {} of zeros left as holes)",
                o.image_name,
                o.path,
                op_state(o.state),
                human_bytes(p.bytes_read),
                human_bytes(p.bytes_zero)
            );
            return;
        }
        match &o.error {
            Some(e) => eprintln!(
                "{} {} {}: {}: {}",
                op_kind(o.kind),
                o.image_name,
                op_state(o.state),
                e.code,
                escape_controls(&e.message)
            ),
            None => println!(
                "{} {}: {} ({})",
                op_kind(o.kind),
                o.image_name,
                op_state(o.state),
                summary(&p)
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_controls_makes_controls_visible() {
        assert!(matches!(escape_controls("plain\ttext\n"), Cow::Borrowed(_)));
        assert_eq!(escape_controls("a\x1b[2Jb"), "a\\x1b[2Jb");
        assert_eq!(
            escape_controls("x\ry\x08z\x00\x7f"),
            "x\\x0dy\\x08z\\x00\\x7f"
        );
        assert_eq!(
            escape_controls("c1 \u{9b}31m \u{85}"),
            "c1 \\u{9b}31m \\u{85}"
        );
        // Kept: newline, tab, printable non-ASCII just past and before the C1 range.
        assert_eq!(escape_controls("é\u{a0}ü\u{7e}\n\t"), "é\u{a0}ü~\n\t");
        assert_eq!(escape_line("a\tb\nc"), "a\\x09b\\x0ac");
    }

    #[test]
    fn prep_text_escapes_hostile_guest_content() {
        let diff = "--- a/etc/network/interfaces\n+++ b/etc/network/interfaces\n\
                    -iface eth0 inet static\x1b]0;owned\x07\r\n\
                    +iface eth0 inet dhcp \x1b[2J\x1b[H\u{9b}0m\n";
        let r = proto::PrepStepReport {
            step: "dhcp".into(),
            outcome: "planned".into(),
            message: "guest says \x1b[31mhi".into(),
            changes: vec![proto::FileChange {
                path: "/etc/net\x1b[8mwork/interfaces".into(),
                action: "modify".into(),
                diff: diff.into(),
            }],
        };
        let text = prep_text(&[r]);
        for bad in ['\x1b', '\x07', '\r', '\u{9b}'] {
            assert!(
                !text.contains(bad),
                "{bad:?} reached the terminal: {text:?}"
            );
        }
        assert_eq!(
            text,
            "dhcp: planned (guest says \\x1b[31mhi)\n  modify /etc/net\\x1b[8mwork/interfaces\n\
             \x20   --- a/etc/network/interfaces\n    +++ b/etc/network/interfaces\n\
             \x20   -iface eth0 inet static\\x1b]0;owned\\x07\\x0d\n\
             \x20   +iface eth0 inet dhcp \\x1b[2J\\x1b[H\\u{9b}0m\n"
        );
        // JSON carries the exact bytes.
        let j = prep_json(&proto::PrepStepReport {
            step: "dhcp".into(),
            changes: vec![proto::FileChange {
                diff: diff.into(),
                ..Default::default()
            }],
            ..Default::default()
        });
        assert_eq!(j["changes"][0]["diff"], diff);
    }

    /// Byte offsets where each header word starts.
    fn header_offsets(header: &str) -> Vec<usize> {
        let b = header.as_bytes();
        (0..b.len())
            .filter(|&i| b[i] != b' ' && (i == 0 || b[i - 1] == b' '))
            .collect()
    }

    #[test]
    fn table_columns_follow_the_widest_cell() {
        let mut t = Table::new(&[
            ("NAME", Align::Left),
            ("SIZE", Align::Right),
            ("PATH", Align::Left),
        ]);
        t.row(vec![
            "a-very-long-name-that-is-longer-than-any-fixed-width".into(),
            "1.0 GiB".into(),
            "/p".into(),
        ]);
        t.row(vec!["b".into(), "12 B".into(), "/q r".into()]);
        t.row(vec!["".into(), "".into(), "/s".into()]);
        let out = t.render();
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 4, "{out}");
        let name_w = "a-very-long-name-that-is-longer-than-any-fixed-width".len();
        let path_col = name_w + 2 + "1.0 GiB".len() + 2;
        assert_eq!(
            header_offsets(lines[0]),
            vec![0, path_col - 2 - 4, path_col],
            "{out}"
        );
        for l in &lines[1..] {
            assert_eq!(&l[path_col - 2..path_col], "  ", "{out}");
            assert!(l[path_col..].starts_with('/'), "{out}");
        }
        // The SIZE column ends where its header ends.
        for l in &lines[..3] {
            assert_ne!(l.as_bytes()[path_col - 3], b' ', "{out}");
        }
        assert!(lines.iter().all(|l| !l.ends_with(' ')), "{out:?}");
    }

    #[test]
    fn domains_table_lines_rows_up_with_the_header() {
        let disk = |t: &str, sys: bool, path: &str| proto::Disk {
            target: t.into(),
            path: path.into(),
            format: "qcow2".into(),
            virtual_size: 2 << 30,
            device: "disk".into(),
            system_disk: sys,
        };
        let ds = vec![
            proto::Domain {
                name: "imaged-test-a-rather-long-domain-name-12345-0".into(),
                state: proto::DomainState::ShutOff as i32,
                disks: vec![
                    disk("vda", true, "/x/a.qcow2"),
                    disk("vdb", false, "/x/b.qcow2"),
                ],
                ..Default::default()
            },
            proto::Domain {
                name: "s".into(),
                state: proto::DomainState::Running as i32,
                has_guest_agent_channel: true,
                ..Default::default()
            },
        ];
        let out = domains_table(&ds);
        let lines: Vec<&str> = out.lines().collect();
        let offs = header_offsets(lines[0]);
        assert_eq!(offs.len(), 7, "{out}");
        let (state, agent, disk, path) = (offs[1], offs[2], offs[3], offs[6]);
        assert_eq!(&lines[1][state..state + 8], "shut off");
        assert_eq!(&lines[1][agent..agent + 2], "no");
        assert_eq!(&lines[1][disk..disk + 4], "vda*");
        assert_eq!(&lines[1][path..], "/x/a.qcow2");
        assert_eq!(&lines[2][disk..disk + 3], "vdb");
        assert_eq!(&lines[2][path..], "/x/b.qcow2");
        assert_eq!(&lines[3][..2], "s ");
        assert_eq!(&lines[3][agent..agent + 3], "yes");
        assert_eq!(&lines[3][disk..], "-");
    }
}
