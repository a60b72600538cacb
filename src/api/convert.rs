//! Conversions between the agent's types and the generated protobuf messages.

use crate::hypervisor::{DiskInfo, DomainInfo, DomainState};
use crate::ops::{OpKind, OpState, Operation};
use crate::proto;
use crate::repo::ImageRecord;

/// Domain to protobuf.
pub fn domain(d: &DomainInfo) -> proto::Domain {
    proto::Domain {
        name: d.name.clone(),
        uuid: d.uuid.clone(),
        state: domain_state(d.state) as i32,
        disks: d.disks.iter().map(disk).collect(),
        has_guest_agent_channel: d.has_agent_channel,
        persistent: d.persistent,
    }
}

fn disk(d: &DiskInfo) -> proto::Disk {
    proto::Disk {
        target: d.target.clone(),
        path: d.path.clone(),
        format: d.format.clone(),
        virtual_size: d.virtual_size,
        device: d.device.clone(),
        system_disk: d.system_disk,
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

/// Image record to protobuf.
pub fn image(r: &ImageRecord) -> proto::Image {
    proto::Image {
        name: r.name.clone(),
        id: r.id.clone(),
        state: "active".into(),
        size: r.data_bytes,
        virtual_size: r.virtual_size,
        source_format: r.source_format.clone(),
        content_digest: r.content_digest.clone(),
        consistency: r.consistency.clone(),
        source_domain: r.source_domain.clone(),
        source_host: r.source_host.clone(),
        source_disk: r.source_disk.clone(),
        created_at: r.created_at,
        updated_at: r.updated_at,
        chunk_count: r.chunk_count(),
        zero_chunks: r.zero_chunks(),
        chunk_size: r.chunk_size as u32,
    }
}

/// Operation snapshot to protobuf.
pub fn operation(o: &Operation) -> proto::Operation {
    let kind = match o.kind {
        OpKind::Capture => proto::OperationKind::Capture,
        OpKind::Import => proto::OperationKind::Import,
        OpKind::Export => proto::OperationKind::Export,
    };
    let state = match o.state {
        OpState::Queued => proto::OperationState::Queued,
        OpState::Preparing => proto::OperationState::Preparing,
        OpState::Saving => proto::OperationState::Saving,
        OpState::Active => proto::OperationState::Active,
        OpState::Failed => proto::OperationState::Failed,
        OpState::Cancelled => proto::OperationState::Cancelled,
    };
    let p = &o.progress;
    proto::Operation {
        id: o.id.clone(),
        kind: kind as i32,
        state: state as i32,
        domain: o.domain.clone(),
        image_name: o.image_name.clone(),
        request_id: o.request_id.clone(),
        progress: Some(proto::Progress {
            bytes_total: p.bytes_total,
            bytes_done: p.bytes_done,
            bytes_read: p.bytes_read,
            bytes_zero: p.bytes_zero,
            bytes_new: p.bytes_new,
            bytes_existing: p.bytes_existing,
            rate_bytes_per_sec: p.rate_bytes_per_sec,
        }),
        error: o.error.as_ref().map(|e| proto::OperationError {
            code: e.kind.code_name().to_string(),
            message: e.message.clone(),
        }),
        created_at: o.created_at,
        updated_at: o.updated_at,
        path: o.path.clone(),
        consistency: o.consistency.clone(),
        freeze_window_ms: o.freeze_window_ms,
        prep: o.prep.iter().map(prep_report).collect(),
        location: o.location.clone(),
    }
}

/// A prep report to protobuf.
pub fn prep_report(r: &crate::ops::PrepReport) -> proto::PrepStepReport {
    proto::PrepStepReport {
        step: r.step.clone(),
        outcome: r.outcome.clone(),
        changes: r
            .changes
            .iter()
            .map(|c| proto::FileChange {
                path: c.path.clone(),
                action: c.action.clone(),
                diff: c.diff.clone(),
            })
            .collect(),
        message: r.message.clone(),
    }
}
