//! Cold reads: a shut-off domain's disk file through `qemu-nbd --read-only`, checked again
//! once qemu-nbd holds the image lock.

use std::sync::Arc;

use super::super::{Controller, OpEntry};
use super::sink::Sink;
use super::Plan;
use crate::capture::source::NbdExport;
use crate::error::{precondition, Result};
use crate::hypervisor::DomainState;

impl Controller {
    /// Reads a shut-off domain's disk file through qemu-nbd.
    pub(super) async fn cold_read(&self, op: &OpEntry, writer: Sink, plan: &Plan) -> Result<()> {
        let cfg = &self.inner.cfg.capture;
        let export = Arc::new(
            NbdExport::start(
                &cfg.qemu_nbd,
                &plan.path,
                &plan.format,
                &cfg.run_dir,
                &op.id,
                cfg.readers,
            )
            .await?,
        );
        // The domain may have been started between our check and qemu-nbd taking the image
        // lock; from here on it cannot start on this disk.
        let d = plan.info.name.clone();
        let state = self.hv(move |hv| hv.domain_state(&d)).await?;
        if state != DomainState::ShutOff {
            drop(export);
            return Err(precondition(format!(
                "domain {} was started ({}) while the capture was being prepared",
                plan.info.name,
                state.as_str()
            )));
        }
        self.deliver(op, writer, export, &plan.provenance()).await
    }
}
