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

use super::view::{id, OpView};
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
pub(super) fn escape_line(s: &str) -> String {
    escape_controls(s)
        .replace('\n', "\\x0a")
        .replace('\t', "\\x09")
}

/// How a [`Table`] column lines its cells up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Align {
    Left,
    Right,
}

/// A table for people: each column as wide as its widest cell or header (in terminal columns),
/// columns two spaces apart, so every cell of a column starts at the header's offset (a right
/// aligned column ends where its header ends). Cells are escaped with [`escape_line`].
pub(super) struct Table {
    headers: Vec<(&'static str, Align)>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub(super) fn new(headers: &[(&'static str, Align)]) -> Table {
        Table {
            headers: headers.to_vec(),
            rows: Vec::new(),
        }
    }

    /// Adds a row; missing trailing cells are empty.
    pub(super) fn row(&mut self, cells: Vec<String>) {
        debug_assert!(cells.len() <= self.headers.len());
        self.rows
            .push(cells.iter().map(|c| escape_line(c)).collect());
    }

    /// The table as lines, without trailing spaces, each ending in `\n`.
    pub(super) fn render(&self) -> String {
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

fn disk_device(d: i32) -> &'static str {
    match proto::DiskDevice::try_from(d) {
        Ok(proto::DiskDevice::Disk) => "disk",
        Ok(proto::DiskDevice::Cdrom) => "cdrom",
        Ok(proto::DiskDevice::Floppy) => "floppy",
        Ok(proto::DiskDevice::Lun) => "lun",
        _ => "unknown",
    }
}

fn consistency(c: i32) -> &'static str {
    match proto::Consistency::try_from(c) {
        Ok(proto::Consistency::Cold) => "cold",
        Ok(proto::Consistency::Quiesced) => "quiesced",
        Ok(proto::Consistency::CrashConsistent) => "crash-consistent",
        Ok(proto::Consistency::Imported) => "imported",
        _ => "",
    }
}

fn format_name(f: i32) -> &'static str {
    match proto::ImageFormat::try_from(f) {
        Ok(proto::ImageFormat::Qcow2) => "qcow2",
        Ok(proto::ImageFormat::Raw) => "raw",
        _ => "",
    }
}

fn secs(t: &Option<prost_types::Timestamp>) -> i64 {
    t.map_or(0, |t| t.seconds)
}

fn domain_json(d: &proto::Domain) -> Value {
    json!({
        "name": id(&d.name), "uuid": d.uid, "state": domain_state(d.state), "persistent": d.persistent,
        "has_guest_agent_channel": d.guest_agent_channel,
        "disks": d.disks.iter().map(|k| json!({
            "target": k.target, "path": k.path, "format": k.format_name,
            "virtual_size": k.virtual_size_bytes, "device": disk_device(k.device),
            "system_disk": k.system_disk,
        })).collect::<Vec<_>>(),
    })
}

/// Prints domains.
pub fn domains(ds: &[proto::Domain], json: bool) {
    if json {
        outln!("{}", Value::Array(ds.iter().map(domain_json).collect()));
        return;
    }
    out!("{}", domains_table(ds));
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
        let agent = if d.guest_agent_channel { "yes" } else { "no" };
        let first = vec![
            id(&d.name).to_string(),
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
            row.push(k.format_name.clone());
            row.push(human_bytes(k.virtual_size_bytes));
            row.push(k.path.clone());
            t.row(row);
        }
    }
    t.render()
}

/// One image as JSON.
pub fn image_json(i: &proto::Image) -> Value {
    json!({
        "name": id(&i.name), "id": i.uid, "display_name": i.display_name,
        "description": i.description, "state": "active", "size": i.size_bytes,
        "virtual_size": i.virtual_size_bytes, "source_format": format_name(i.source_format),
        "content_digest": i.content_digest, "consistency": consistency(i.consistency),
        "source_domain": id(&i.source_domain), "source_host": i.source_host,
        "source_disk": i.source_disk,
        "created_at": rfc3339(secs(&i.create_time)), "updated_at": rfc3339(secs(&i.update_time)),
        "chunk_count": i.chunk_count, "zero_chunks": i.zero_chunk_count,
        "chunk_size": i.chunk_size_bytes,
    })
}

/// Prints images.
pub fn images(is: &[proto::Image], json: bool) {
    if json {
        outln!("{}", Value::Array(is.iter().map(image_json).collect()));
        return;
    }
    out!("{}", images_table(is));
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
            id(&i.name).to_string(),
            human_bytes(i.size_bytes),
            human_bytes(i.virtual_size_bytes),
            consistency(i.consistency).to_string(),
            if i.source_domain.is_empty() {
                "-".into()
            } else {
                id(&i.source_domain).to_string()
            },
            rfc3339(secs(&i.create_time)),
        ]);
    }
    t.render()
}

/// Prints one image in full.
pub fn image_detail(i: &proto::Image, json: bool) {
    if json {
        outln!("{}", image_json(i));
        return;
    }
    outln!("name:           {}", id(&i.name));
    outln!("display name:   {}", escape_line(&i.display_name));
    if !i.description.is_empty() {
        outln!("description:    {}", escape_line(&i.description));
    }
    outln!("id:             {}", i.uid);
    outln!("state:          active");
    outln!(
        "stored:         {} in {} data chunks ({} bytes)",
        human_bytes(i.size_bytes),
        i.chunk_count - i.zero_chunk_count,
        i.size_bytes
    );
    outln!(
        "virtual size:   {} ({} bytes)",
        human_bytes(i.virtual_size_bytes),
        i.virtual_size_bytes
    );
    outln!("source format:  {}", format_name(i.source_format));
    outln!("consistency:    {}", consistency(i.consistency));
    outln!(
        "source:         domain {:?} disk {:?} on host {:?}",
        id(&i.source_domain),
        i.source_disk,
        i.source_host
    );
    outln!("content digest: sha256-tree:{}", i.content_digest);
    outln!(
        "chunks:         {} of {} ({} zero)",
        i.chunk_count,
        human_bytes(u64::from(i.chunk_size_bytes)),
        i.zero_chunk_count
    );
    outln!("created:        {}", rfc3339(secs(&i.create_time)));
    outln!("updated:        {}", rfc3339(secs(&i.update_time)));
}

/// Prints that an image was deleted.
pub fn deleted(name: &str, json: bool) {
    if json {
        outln!("{}", json!({ "deleted": name }));
    } else {
        outln!("deleted {name}");
    }
}

/// One operation as JSON.
pub fn operation_json(o: &OpView) -> Value {
    let p = o.progress();
    let m = &o.meta;
    let freeze_ms = m
        .freeze_window
        .map_or(0, |d| d.seconds as u64 * 1000 + d.nanos as u64 / 1_000_000);
    json!({
        "id": o.id, "done": o.done, "kind": op_kind(m.kind), "state": op_state(m.state),
        "domain": id(&m.domain), "image_name": o.image_name(), "request_id": m.request_id,
        "path": m.path, "requester": m.requester, "cancel_requested": m.cancel_requested,
        "progress": {
            "total_bytes": p.total_bytes, "done_bytes": p.done_bytes, "read_bytes": p.read_bytes,
            "zero_bytes": p.zero_bytes, "new_bytes": p.new_bytes, "existing_bytes": p.existing_bytes,
            "rate_bytes_per_second": p.rate_bytes_per_second, "percent_done": p.percent_done,
        },
        "error": o.error.as_ref().map(|e| json!({"code": e.code, "message": e.message, "reason": e.reason})),
        "created_at": rfc3339(secs(&m.create_time)), "updated_at": rfc3339(secs(&m.update_time)),
        "consistency": consistency(m.consistency), "freeze_window_ms": freeze_ms,
        "location": m.location,
        "prep": m.prep_steps.iter().map(prep_json).collect::<Vec<_>>(),
        "read": m.read.as_ref().map(|r| json!({
            "incremental": r.incremental, "since_checkpoint": r.since_checkpoint,
            "changed_bytes": r.changed_bytes, "checkpoint": r.checkpoint, "note": r.note,
        })),
        "image": o.image.as_ref().map(image_json),
    })
}

/// How a live capture read its disk, in a line.
fn read_summary(r: &proto::ReadReport) -> String {
    let mut s = if r.incremental {
        format!(
            "incremental: {} changed since checkpoint {}",
            human_bytes(r.changed_bytes),
            r.since_checkpoint
        )
    } else {
        "whole disk".to_string()
    };
    if !r.note.is_empty() {
        s.push_str(&format!(" ({})", escape_controls(&r.note)));
    }
    s
}

/// Prints operations.
pub fn operations(os: &[OpView], json: bool) {
    if json {
        outln!("{}", Value::Array(os.iter().map(operation_json).collect()));
        return;
    }
    out!("{}", operations_table(os));
}

fn operations_table(os: &[OpView]) -> String {
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
        t.row(vec![
            o.id.clone(),
            op_kind(o.meta.kind).to_string(),
            op_state(o.meta.state).to_string(),
            o.image_name().to_string(),
            format!("{}%", o.progress().percent_done),
            rfc3339(secs(&o.meta.create_time)),
        ]);
    }
    t.render()
}

/// Prints one operation in full.
pub fn operation_detail(o: &OpView, json: bool) {
    if json {
        outln!("{}", operation_json(o));
        return;
    }
    let m = &o.meta;
    outln!("operation: {} ({})", o.id, op_kind(m.kind));
    outln!("state:     {}", op_state(m.state));
    if !m.domain.is_empty() {
        outln!("domain:    {}", id(&m.domain));
    }
    outln!("image:     {}", o.image_name());
    if !m.path.is_empty() {
        outln!("path:      {}", m.path);
    }
    if !m.requester.is_empty() {
        outln!("requester: {}", m.requester);
    }
    outln!("progress:  {}", summary(&o.progress()));
    if let Some(r) = &m.read {
        outln!("read:      {}", read_summary(r));
    }
    if let Some(e) = &o.error {
        outln!(
            "error:     {} ({}): {}",
            e.code,
            e.reason,
            escape_controls(&e.message)
        );
    }
}

fn summary(p: &proto::Progress) -> String {
    format!(
        "{} of {} done; read {}, zero {}, new {}, already stored {}",
        human_bytes(p.done_bytes),
        human_bytes(p.total_bytes),
        human_bytes(p.read_bytes),
        human_bytes(p.zero_bytes),
        human_bytes(p.new_bytes),
        human_bytes(p.existing_bytes)
    )
}

/// The CLI's name of a prep step ("udev-net-rules").
fn step_name(s: i32) -> &'static str {
    match proto::PrepStep::try_from(s) {
        Ok(proto::PrepStep::Dhcp) => "dhcp",
        Ok(proto::PrepStep::UdevNetRules) => "udev-net-rules",
        Ok(proto::PrepStep::SetpasswdHook) => "setpasswd-hook",
        Ok(proto::PrepStep::FstabDataDisks) => "fstab-data-disks",
        _ => "unknown",
    }
}

fn outcome_name(o: i32) -> &'static str {
    match proto::PrepOutcome::try_from(o) {
        Ok(proto::PrepOutcome::Planned) => "planned",
        Ok(proto::PrepOutcome::Applied) => "applied",
        Ok(proto::PrepOutcome::Unchanged) => "unchanged",
        Ok(proto::PrepOutcome::NotApplicable) => "not-applicable",
        Ok(proto::PrepOutcome::Restored) => "restored",
        Ok(proto::PrepOutcome::Failed) => "failed",
        _ => "unknown",
    }
}

fn action_name(a: i32) -> &'static str {
    match proto::FileAction::try_from(a) {
        Ok(proto::FileAction::Modify) => "modify",
        Ok(proto::FileAction::Delete) => "delete",
        Ok(proto::FileAction::Create) => "create",
        Ok(proto::FileAction::Unmount) => "unmount",
        _ => "unknown",
    }
}

fn prep_json(r: &proto::PrepStepReport) -> Value {
    json!({
        "step": step_name(r.step), "outcome": outcome_name(r.outcome), "message": r.message,
        "changes": r.changes.iter().map(|c| json!({"path": c.path, "action": action_name(c.action), "diff": c.diff})).collect::<Vec<_>>(),
    })
}

/// Prints prep step plans or outcomes.
pub fn prep_reports(rs: &[proto::PrepStepReport], json: bool) {
    if json {
        outln!("{}", Value::Array(rs.iter().map(prep_json).collect()));
        return;
    }
    out!("{}", prep_text(rs));
}

/// Prep plans or outcomes for people: each step, its changes and their diffs, indented. Every
/// string from the guest is escaped ([`escape_controls`]); a diff is split on `\n` only, so a
/// `\r` shows as `\x0d`.
fn prep_text(rs: &[proto::PrepStepReport]) -> String {
    let mut out = String::new();
    for r in rs {
        let _ = write!(out, "{}: {}", step_name(r.step), outcome_name(r.outcome));
        if !r.message.is_empty() {
            let _ = write!(out, " ({})", escape_line(&r.message));
        }
        out.push('\n');
        for c in &r.changes {
            let _ = writeln!(out, "  {} {}", action_name(c.action), escape_line(&c.path));
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

/// Prints an RPC failure as JSON: the code name, the message and the ErrorInfo reason.
pub fn status_json(s: &tonic::Status) -> Value {
    json!({"error": {
        "code": super::view::code_name(s.code() as i32),
        "message": s.message(),
        "reason": super::view::status_reason(s),
    }})
}

/// Shows an operation while it runs.
pub struct ProgressView {
    bar: Option<ProgressBar>,
    json: bool,
    last_state: i32,
}

impl ProgressView {
    /// A bar on a terminal, state lines on a pipe, silence with `--json`.
    pub fn new(op: &OpView, json: bool) -> ProgressView {
        let bar = (!json && std::io::stderr().is_terminal()).then(|| {
            let b = ProgressBar::new(1);
            b.set_style(
                ProgressStyle::with_template(
                    "{spinner} {prefix} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta} {msg}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            b.set_prefix(format!("{} {}", op_kind(op.meta.kind), op.image_name()));
            b
        });
        if bar.is_none() && !json {
            eprintln!(
                "{} {}: {} ({})",
                op_kind(op.meta.kind),
                op.image_name(),
                op_state(op.meta.state),
                op.id
            );
        }
        ProgressView {
            bar,
            json,
            last_state: op.meta.state,
        }
    }

    /// Shows a new snapshot.
    pub fn update(&mut self, o: &OpView) {
        let p = o.progress();
        if let Some(b) = &self.bar {
            b.set_length(p.total_bytes.max(1));
            b.set_position(p.done_bytes);
            b.set_message(op_state(o.meta.state));
        } else if !self.json && o.meta.state != self.last_state {
            eprintln!(
                "{} {}: {}",
                op_kind(o.meta.kind),
                o.image_name(),
                op_state(o.meta.state)
            );
        }
        self.last_state = o.meta.state;
    }

    /// Prints the outcome.
    pub fn finish(self, o: &OpView) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
        if self.json {
            outln!("{}", operation_json(o));
            return;
        }
        let p = o.progress();
        let (kind, state) = (op_kind(o.meta.kind), op_state(o.meta.state));
        if o.error.is_none() && o.meta.kind == proto::OperationKind::Export as i32 {
            outln!(
                "export {} -> {}: {state} ({} of data written, {} of zeros left as holes)",
                o.image_name(),
                o.meta.path,
                human_bytes(p.read_bytes),
                human_bytes(p.zero_bytes)
            );
            return;
        }
        match &o.error {
            Some(e) => eprintln!(
                "{kind} {} {state}: {} ({}): {}",
                o.image_name(),
                e.code,
                e.reason,
                escape_controls(&e.message)
            ),
            None => outln!("{kind} {}: {state} ({})", o.image_name(), summary(&p)),
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
            step: proto::PrepStep::Dhcp as i32,
            outcome: proto::PrepOutcome::Planned as i32,
            message: "guest says \x1b[31mhi".into(),
            changes: vec![proto::FileChange {
                path: "/etc/net\x1b[8mwork/interfaces".into(),
                action: proto::FileAction::Modify as i32,
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
            step: proto::PrepStep::Dhcp as i32,
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
            format: proto::ImageFormat::Qcow2 as i32,
            format_name: "qcow2".into(),
            virtual_size_bytes: 2 << 30,
            device: proto::DiskDevice::Disk as i32,
            system_disk: sys,
        };
        let ds = vec![
            proto::Domain {
                name: "domains/imaged-test-a-rather-long-domain-name-12345-0".into(),
                state: proto::DomainState::ShutOff as i32,
                disks: vec![
                    disk("vda", true, "/x/a.qcow2"),
                    disk("vdb", false, "/x/b.qcow2"),
                ],
                ..Default::default()
            },
            proto::Domain {
                name: "domains/s".into(),
                state: proto::DomainState::Running as i32,
                guest_agent_channel: true,
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
