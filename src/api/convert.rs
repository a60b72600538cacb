//! Conversions between the agent's types and the generated `imaged.v1` messages: resources with
//! their names, enums for what the core keeps as strings, timestamps and durations, and the
//! `google.longrunning.Operation` envelope (typed metadata, `error` with details, `response`).
//! Also the [`Fields`] views List methods filter and order by.

use prost::Message as _;

use super::list::{Fields, Value};
use super::names::{self, DOMAINS, IMAGES, OPERATIONS};
use crate::error::rich_status;
use crate::hypervisor::{DiskInfo, DomainInfo, DomainState};
use crate::ops::{OpKind, OpState, Operation, PrepReport};
use crate::proto;
use crate::proto::google::longrunning as lro;
use crate::repo::ImageRecord;

/// Packs `msg` as a `google.protobuf.Any` of type `imaged.v1.{type_name}`.
fn any(type_name: &str, msg: &impl prost::Message) -> prost_types::Any {
    prost_types::Any {
        type_url: format!("type.googleapis.com/imaged.v1.{type_name}"),
        value: msg.encode_to_vec(),
    }
}

/// Unix seconds to a Timestamp (None for 0: not set).
pub fn timestamp(secs: i64) -> Option<prost_types::Timestamp> {
    (secs != 0).then_some(prost_types::Timestamp {
        seconds: secs,
        nanos: 0,
    })
}

/// Domain to protobuf.
pub fn domain(d: &DomainInfo) -> proto::Domain {
    proto::Domain {
        name: names::name(DOMAINS, &d.name),
        uid: d.uuid.clone(),
        state: domain_state(d.state) as i32,
        disks: d.disks.iter().map(disk).collect(),
        guest_agent_channel: d.has_agent_channel,
        persistent: d.persistent,
    }
}

fn disk(d: &DiskInfo) -> proto::Disk {
    let device = match d.device.as_str() {
        "disk" => proto::DiskDevice::Disk,
        "cdrom" => proto::DiskDevice::Cdrom,
        "floppy" => proto::DiskDevice::Floppy,
        "lun" => proto::DiskDevice::Lun,
        _ => proto::DiskDevice::Unspecified,
    };
    proto::Disk {
        target: d.target.clone(),
        path: d.path.clone(),
        format: image_format(&d.format) as i32,
        format_name: d.format.clone(),
        virtual_size_bytes: d.virtual_size,
        device: device as i32,
        system_disk: d.system_disk,
    }
}

/// A format name of the core ("qcow2", "raw") to the enum; UNSPECIFIED for any other.
pub fn image_format(f: &str) -> proto::ImageFormat {
    match f {
        "qcow2" => proto::ImageFormat::Qcow2,
        "raw" => proto::ImageFormat::Raw,
        _ => proto::ImageFormat::Unspecified,
    }
}

fn domain_state(s: DomainState) -> proto::DomainState {
    use proto::DomainState as P;
    match s {
        DomainState::NoState => P::Unspecified,
        DomainState::Running => P::Running,
        DomainState::Blocked => P::Blocked,
        DomainState::Paused => P::Paused,
        DomainState::ShuttingDown => P::ShuttingDown,
        DomainState::ShutOff => P::ShutOff,
        DomainState::Crashed => P::Crashed,
        DomainState::Suspended => P::Suspended,
    }
}

fn consistency(c: &str) -> proto::Consistency {
    match c {
        "cold" => proto::Consistency::Cold,
        "quiesced" => proto::Consistency::Quiesced,
        "crash-consistent" => proto::Consistency::CrashConsistent,
        "imported" => proto::Consistency::Imported,
        _ => proto::Consistency::Unspecified,
    }
}

/// Image record to protobuf.
pub fn image(r: &ImageRecord) -> proto::Image {
    proto::Image {
        name: names::name(IMAGES, &r.name),
        uid: r.id.clone(),
        display_name: if r.display_name.is_empty() {
            r.name.clone()
        } else {
            r.display_name.clone()
        },
        description: r.description.clone(),
        state: proto::ImageState::Active as i32,
        size_bytes: r.data_bytes,
        virtual_size_bytes: r.virtual_size,
        source_format: image_format(&r.source_format) as i32,
        content_digest: r.content_digest.clone(),
        consistency: consistency(&r.consistency) as i32,
        source_domain: if r.source_domain.is_empty() {
            String::new()
        } else {
            names::name(DOMAINS, &r.source_domain)
        },
        source_host: r.source_host.clone(),
        source_disk: r.source_disk.clone(),
        create_time: timestamp(r.created_at),
        update_time: timestamp(r.updated_at),
        chunk_count: r.chunk_count(),
        zero_chunk_count: r.zero_chunks(),
        chunk_size_bytes: r.chunk_size as u32,
    }
}

fn op_kind(k: OpKind) -> proto::OperationKind {
    match k {
        OpKind::Capture => proto::OperationKind::Capture,
        OpKind::Import => proto::OperationKind::Import,
        OpKind::Export => proto::OperationKind::Export,
    }
}

fn op_state(s: OpState) -> proto::OperationState {
    match s {
        OpState::Queued => proto::OperationState::Queued,
        OpState::Preparing => proto::OperationState::Preparing,
        OpState::Saving => proto::OperationState::Saving,
        OpState::Active => proto::OperationState::Active,
        OpState::Failed => proto::OperationState::Failed,
        OpState::Cancelled => proto::OperationState::Cancelled,
    }
}

/// The typed metadata of an operation.
pub fn metadata(o: &Operation) -> proto::OperationMetadata {
    let p = &o.progress;
    let percent = (p.bytes_done.saturating_mul(100))
        .checked_div(p.bytes_total)
        .unwrap_or(if o.state == OpState::Active { 100 } else { 0 })
        .min(100) as i32;
    proto::OperationMetadata {
        kind: op_kind(o.kind) as i32,
        state: op_state(o.state) as i32,
        image: if o.image_name.is_empty() {
            String::new()
        } else {
            names::name(IMAGES, &o.image_name)
        },
        domain: if o.domain.is_empty() {
            String::new()
        } else {
            names::name(DOMAINS, &o.domain)
        },
        request_id: o.request_id.clone(),
        progress: Some(proto::Progress {
            total_bytes: p.bytes_total,
            done_bytes: p.bytes_done,
            read_bytes: p.bytes_read,
            zero_bytes: p.bytes_zero,
            new_bytes: p.bytes_new,
            existing_bytes: p.bytes_existing,
            rate_bytes_per_second: p.rate_bytes_per_sec,
            percent_done: percent,
        }),
        create_time: timestamp(o.created_at),
        update_time: timestamp(o.updated_at),
        end_time: if o.state.is_terminal() {
            timestamp(o.updated_at)
        } else {
            None
        },
        path: o.path.clone(),
        consistency: consistency(&o.consistency) as i32,
        freeze_window: (o.freeze_window_ms > 0).then(|| prost_types::Duration {
            seconds: (o.freeze_window_ms / 1000) as i64,
            nanos: ((o.freeze_window_ms % 1000) * 1_000_000) as i32,
        }),
        prep_steps: o.prep.iter().map(prep_report).collect(),
        location: o.location.clone(),
        cancel_requested: o.cancel_requested,
        requester: o.requester.clone(),
        read: o.read.as_ref().map(|r| proto::ReadReport {
            incremental: r.incremental,
            since_checkpoint: r.since_checkpoint.clone(),
            changed_bytes: r.changed_bytes,
            checkpoint: r.checkpoint.clone(),
            note: r.note.clone(),
        }),
    }
}

/// What a finished operation made, for `response`: the image (capture to the repository, import),
/// the file written (export), the location (capture to a file or remote target).
pub enum Outcome {
    Image(Box<ImageRecord>),
    Exported { path: String, size_bytes: u64 },
    Target { location: String },
}

/// An operation in the `google.longrunning.Operation` envelope. `outcome` is what an ACTIVE
/// operation produced (ignored otherwise).
pub fn operation(o: &Operation, outcome: Option<Outcome>) -> lro::Operation {
    let result = match (o.state, &o.error) {
        (OpState::Failed | OpState::Cancelled, err) => {
            let (kind, message, facts) = match err {
                Some(e) => (e.kind, e.message.clone(), e.facts.clone()),
                None => (
                    crate::error::ErrorKind::Internal,
                    "failed without a recorded error".to_string(),
                    Default::default(),
                ),
            };
            let st = rich_status(kind, &message, &facts);
            let details = tonic_types::pb::Status::decode(st.details()).unwrap_or_else(|_| {
                tonic_types::pb::Status {
                    code: kind.grpc_code() as i32,
                    message: message.clone(),
                    details: Vec::new(),
                }
            });
            Some(lro::operation::Result::Error(details))
        }
        (OpState::Active, _) => outcome.map(|out| {
            lro::operation::Result::Response(match out {
                Outcome::Image(r) => any("Image", &image(&r)),
                Outcome::Exported { path, size_bytes } => any(
                    "ExportImageResponse",
                    &proto::ExportImageResponse { path, size_bytes },
                ),
                Outcome::Target { location } => {
                    any("TargetResult", &proto::TargetResult { location })
                }
            })
        }),
        _ => None,
    };
    lro::Operation {
        name: names::name(OPERATIONS, &o.id),
        metadata: Some(any("OperationMetadata", &metadata(o))),
        done: o.state.is_terminal(),
        result,
    }
}

/// A prep step's core name ("udev-net-rules") to the enum.
pub fn prep_step(name: &str) -> proto::PrepStep {
    match name {
        "dhcp" => proto::PrepStep::Dhcp,
        "udev-net-rules" => proto::PrepStep::UdevNetRules,
        "setpasswd-hook" => proto::PrepStep::SetpasswdHook,
        "fstab-data-disks" => proto::PrepStep::FstabDataDisks,
        _ => proto::PrepStep::Unspecified,
    }
}

/// The enum back to the core's step name; None for UNSPECIFIED or an unknown number.
pub fn prep_step_name(v: i32) -> Option<&'static str> {
    Some(match proto::PrepStep::try_from(v).ok()? {
        proto::PrepStep::Dhcp => "dhcp",
        proto::PrepStep::UdevNetRules => "udev-net-rules",
        proto::PrepStep::SetpasswdHook => "setpasswd-hook",
        proto::PrepStep::FstabDataDisks => "fstab-data-disks",
        proto::PrepStep::Unspecified => return None,
    })
}

/// A prep report to protobuf.
pub fn prep_report(r: &PrepReport) -> proto::PrepStepReport {
    let outcome = match r.outcome.as_str() {
        "planned" => proto::PrepOutcome::Planned,
        "applied" => proto::PrepOutcome::Applied,
        "unchanged" => proto::PrepOutcome::Unchanged,
        "not-applicable" => proto::PrepOutcome::NotApplicable,
        "restored" => proto::PrepOutcome::Restored,
        "failed" => proto::PrepOutcome::Failed,
        _ => proto::PrepOutcome::Unspecified,
    };
    proto::PrepStepReport {
        step: prep_step(&r.step) as i32,
        outcome: outcome as i32,
        changes: r
            .changes
            .iter()
            .map(|c| proto::FileChange {
                path: c.path.clone(),
                action: match c.action.as_str() {
                    "modify" => proto::FileAction::Modify,
                    "delete" => proto::FileAction::Delete,
                    "create" => proto::FileAction::Create,
                    "unmount" => proto::FileAction::Unmount,
                    _ => proto::FileAction::Unspecified,
                } as i32,
                diff: c.diff.clone(),
            })
            .collect(),
        message: r.message.clone(),
    }
}

/// The short name of an enum value: `DOMAIN_STATE_RUNNING` → `RUNNING`.
fn short(full: &str, prefix: &str) -> Value {
    Value::Enum(
        full.strip_prefix(prefix).unwrap_or(full).to_string(),
        prefix.to_string(),
    )
}

/// Fields ListDomains filters and orders by.
pub const DOMAIN_FIELDS: &[&str] = &["name", "state", "persistent"];

impl Fields for proto::Domain {
    fn name(&self) -> String {
        self.name.clone()
    }
    fn field(&self, f: &str) -> Option<Value> {
        Some(match f {
            "name" => Value::Str(self.name.clone()),
            "state" => short(self.state().as_str_name(), "DOMAIN_STATE_"),
            "persistent" => Value::Bool(self.persistent),
            _ => return None,
        })
    }
}

/// Fields ListImages filters and orders by.
pub const IMAGE_FIELDS: &[&str] = &[
    "name",
    "display_name",
    "state",
    "source_domain",
    "consistency",
    "source_format",
    "create_time",
    "update_time",
    "size_bytes",
    "virtual_size_bytes",
];

impl Fields for proto::Image {
    fn name(&self) -> String {
        self.name.clone()
    }
    fn field(&self, f: &str) -> Option<Value> {
        let secs = |t: &Option<prost_types::Timestamp>| Value::Int(t.map_or(0, |t| t.seconds));
        Some(match f {
            "name" => Value::Str(self.name.clone()),
            "display_name" => Value::Str(self.display_name.clone()),
            "state" => short(self.state().as_str_name(), "IMAGE_STATE_"),
            "source_domain" => Value::Str(self.source_domain.clone()),
            "consistency" => short(self.consistency().as_str_name(), "CONSISTENCY_"),
            "source_format" => short(self.source_format().as_str_name(), "IMAGE_FORMAT_"),
            "create_time" => secs(&self.create_time),
            "update_time" => secs(&self.update_time),
            "size_bytes" => Value::Int(self.size_bytes as i64),
            "virtual_size_bytes" => Value::Int(self.virtual_size_bytes as i64),
            _ => return None,
        })
    }
}

/// Fields ListOperations filters and orders by.
pub const OPERATION_FIELDS: &[&str] = &[
    "name",
    "state",
    "kind",
    "done",
    "domain",
    "image",
    "request_id",
    "requester",
    "create_time",
    "update_time",
];

impl Fields for Operation {
    fn name(&self) -> String {
        names::name(OPERATIONS, &self.id)
    }
    fn field(&self, f: &str) -> Option<Value> {
        Some(match f {
            "name" => Value::Str(Fields::name(self)),
            "state" => short(op_state(self.state).as_str_name(), "OPERATION_STATE_"),
            "kind" => short(op_kind(self.kind).as_str_name(), "OPERATION_KIND_"),
            "done" => Value::Bool(self.state.is_terminal()),
            "domain" => Value::Str(names::name(DOMAINS, &self.domain)),
            "image" => Value::Str(names::name(IMAGES, &self.image_name)),
            "request_id" => Value::Str(self.request_id.clone()),
            "requester" => Value::Str(self.requester.clone()),
            "create_time" => Value::Int(self.created_at),
            "update_time" => Value::Int(self.updated_at),
            _ => return None,
        })
    }
}
