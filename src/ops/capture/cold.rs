//! Cold reads: a shut-off domain's disk file, read in process or through
//! `qemu-nbd --read-only`, checked again once the reader holds the image lock.

use std::sync::Arc;

use super::super::{Controller, OpEntry};
use super::sink::Sink;
use super::Plan;
use crate::capture::file::{self, Native};
use crate::capture::source::{BlockSource, NbdExport};
use crate::error::{internal, precondition, Result};
use crate::hypervisor::DomainState;

impl Controller {
    /// Reads a shut-off domain's disk file: in process (raw, or qcow2 and its backing chain;
    /// [`file::open_path`]), or through qemu-nbd what the native reader does not take.
    pub(super) async fn cold_read(&self, op: &OpEntry, writer: Sink, plan: &Plan) -> Result<()> {
        let cfg = &self.inner.cfg.capture;
        let native = if cfg.native_reader {
            let (path, format) = (plan.path.clone(), plan.format.clone());
            tokio::task::spawn_blocking(move || file::open_path(&path, &format))
                .await
                .map_err(|e| internal("opening the disk file").with_source(e))??
        } else {
            Native::NotNative("capture.native_reader is off".into())
        };
        let export: Arc<dyn BlockSource> = match native {
            Native::Reader(r) => r,
            Native::NotNative(why) => {
                tracing::info!(op = %op.id, disk = %plan.path.display(), reason = %why, "reading the disk through qemu-nbd");
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
            }
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
        self.deliver(op, writer, export, &plan.provenance(), None)
            .await
            .map(drop)
    }
}
