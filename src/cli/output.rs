//! How `imagectl` shows things: tables for people, JSON for scripts, a progress bar for
//! long work on a terminal and plain state lines elsewhere.

use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{json, Value};

use crate::proto;
use crate::util::{human_bytes, rfc3339};

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
    println!(
        "{:<24} {:<10} {:<6} {:<6} {:<8} {:>10}  PATH",
        "DOMAIN", "STATE", "AGENT", "DISK", "FORMAT", "SIZE"
    );
    for d in ds {
        let agent = if d.has_guest_agent_channel {
            "yes"
        } else {
            "no"
        };
        if d.disks.is_empty() {
            println!(
                "{:<24} {:<10} {:<6} {:<6}",
                d.name,
                domain_state(d.state),
                agent,
                "-"
            );
        }
        for (i, k) in d.disks.iter().enumerate() {
            let (name, state, ag) = if i == 0 {
                (d.name.as_str(), domain_state(d.state), agent)
            } else {
                ("", "", "")
            };
            let target = if k.system_disk {
                format!("{}*", k.target)
            } else {
                k.target.clone()
            };
            println!(
                "{:<30} {:<10} {:<6} {:<6} {:<8} {:>10}  {}",
                name,
                state,
                ag,
                target,
                k.format,
                human_bytes(k.virtual_size),
                k.path
            );
        }
    }
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
    println!(
        "{:<32} {:>10} {:>10} {:<10} {:<20} CREATED",
        "IMAGE", "SIZE", "VIRTUAL", "CONSISTENT", "SOURCE"
    );
    for i in is {
        println!(
            "{:<32} {:>10} {:>10} {:<10} {:<20} {}",
            i.name,
            human_bytes(i.size),
            human_bytes(i.virtual_size),
            i.consistency,
            if i.source_domain.is_empty() {
                "-"
            } else {
                &i.source_domain
            },
            rfc3339(i.created_at)
        );
    }
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
    println!(
        "{:<20} {:<8} {:<10} {:<28} {:>7} CREATED",
        "OPERATION", "KIND", "STATE", "IMAGE", "DONE"
    );
    for o in os {
        let p = o.progress.unwrap_or_default();
        let pct = (p.bytes_done * 100).checked_div(p.bytes_total).unwrap_or(0);
        println!(
            "{:<20} {:<8} {:<10} {:<28} {:>6}% {}",
            o.id,
            op_kind(o.kind),
            op_state(o.state),
            o.image_name,
            pct,
            rfc3339(o.created_at)
        );
    }
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
        println!("error:     {}: {}", e.code, e.message);
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
    for r in rs {
        println!(
            "{}: {}{}",
            r.step,
            r.outcome,
            if r.message.is_empty() {
                String::new()
            } else {
                format!(" ({})", r.message)
            }
        );
        for c in &r.changes {
            println!("  {} {}", c.action, c.path);
            for l in c.diff.lines() {
                println!("    {l}");
            }
        }
    }
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
                e.message
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
