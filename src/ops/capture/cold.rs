//! Cold reads: a shut-off domain's disk file, read in process when raw or through
//! `qemu-nbd --read-only`, checked again once the reader holds the image lock.

use std::sync::Arc;

use super::super::{Controller, OpEntry};
use super::sink::Sink;
use super::Plan;
use crate::capture::file::RawFile;
use crate::capture::source::{BlockSource, NbdExport};
use crate::error::{internal, precondition, Result};
use crate::hypervisor::DomainState;

impl Controller {
    /// Reads a shut-off domain's disk file: a raw file in process ([`RawFile`]), anything
    /// else (qcow2 and its backing chain, a block device) through qemu-nbd.
    pub(super) async fn cold_read(&self, op: &OpEntry, writer: Sink, plan: &Plan) -> Result<()> {
        let cfg = &self.inner.cfg.capture;
        let native = plan.format == "raw"
            && std::fs::metadata(&plan.path).is_ok_and(|m| m.file_type().is_file());
        let export: Arc<dyn BlockSource> = if native {
            let path = plan.path.clone();
            Arc::new(
                tokio::task::spawn_blocking(move || RawFile::open(&path))
                    .await
                    .map_err(|e| internal("opening the disk file").with_source(e))??,
            )
        } else {
            Arc::new(
                NbdExport::start(
                    &cfg.qemu_nbd,
                    &plan.path,
                    &plan.format,
                    &cfg.run_dir,
                    &op.id,
                    cfg.readers,
                )
                .await?,
            )
        };
        // The domain may have been started between our check and the reader taking the image
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
