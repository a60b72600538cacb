//! Where a capture's bytes go: the sink is opened (and checked) before anything is read,
//! then the disk is delivered into it: the chunk pipeline into the local repository, or one
//! qcow2/raw byte stream into a file, Glance or S3, with the image properties a Nova-style
//! consumer expects.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use super::super::{blocking, Controller, OpEntry, OpState};
use super::{CaptureParams, Plan, TargetSpec};
use crate::capture::source::BlockSource;
use crate::capture::stream::{self, StreamPlan};
use crate::capture::{self as pipeline};
use crate::error::{Error, Result};
use crate::format::Format;
use crate::ops::mode::consistency_of;
use crate::repo::manifest::{content_digest, FORMAT_VERSION};
use crate::repo::{ImageRecord, ImageWriter, CHUNK_SIZE};
use crate::upload::file::FileTarget;
use crate::upload::{StreamTarget, UploadMeta};
use crate::util::now_unix;

/// Where the task sends the bytes.
pub(super) enum Sink {
    Repository(ImageWriter),
    Stream {
        target: Box<dyn StreamTarget>,
        format: Format,
    },
}

/// Where an image's bytes came from, as the repository records it.
pub(in crate::ops) struct Provenance {
    pub consistency: String,
    pub domain: String,
    pub disk: String,
    pub format: String,
    /// The domain has a guest agent channel.
    pub agent: bool,
    /// "linux" or "windows" when the guest agent told.
    pub os_type: Option<String>,
    /// The guest's OS id (e.g. "debian") when the guest agent told.
    pub os_distro: Option<String>,
    /// The caller's description of the image.
    pub description: String,
}

impl Plan {
    pub(super) fn provenance(&self) -> Provenance {
        Provenance {
            consistency: consistency_of(self.mode).into(),
            domain: self.info.name.clone(),
            disk: self.target.clone(),
            format: self.format.clone(),
            agent: self.info.has_agent_channel,
            os_type: self
                .os
                .as_ref()
                .map(|o| if o.is_windows { "windows" } else { "linux" }.to_string()),
            os_distro: self.os.as_ref().and_then(|o| o.id.clone()),
            description: self.description.clone(),
        }
    }
}

impl Controller {
    /// Prepares where the bytes go, checking it before anything is read: the repository name
    /// is reserved; a stream target is reached and its credentials checked.
    pub(super) async fn open_sink(&self, p: &CaptureParams) -> Result<Sink> {
        if let TargetSpec::File {
            path, overwrite, ..
        } = &p.target
        {
            // A file target writes on the host like an export: the same directories.
            let dirs = &self.inner.cfg.paths.export_dirs;
            crate::hostfile::check_destination_within(path, *overwrite, dirs, "target file")?;
        }
        let (target, format): (Box<dyn StreamTarget>, Format) = match &p.target {
            TargetSpec::Repository => {
                return Ok(Sink::Repository(self.reserve(&p.image_name).await?))
            }
            TargetSpec::File {
                path,
                format,
                overwrite,
            } => (
                Box::new(
                    FileTarget::new(path, *overwrite)?
                        .with_mode(self.inner.cfg.export_file_mode()?),
                ),
                *format,
            ),
            TargetSpec::Remote { name, format } => {
                let cfg = self.inner.cfg.targets.get(name).cloned().ok_or_else(|| {
                    let known: Vec<&str> = self.inner.cfg.targets.keys().map(String::as_str).collect();
                    crate::error::not_found(format!(
                        "target {name} is not configured (configured: {}); add a [targets.{name}] table to the config",
                        if known.is_empty() { "none".to_string() } else { known.join(", ") }
                    ))
                })?;
                (cfg.build()?, *format)
            }
        };
        target.check().await.map_err(|e| {
            let kind = e.kind();
            Error::new(
                kind,
                format!("target {} cannot take the image", target.describe()),
            )
            .with_source(e)
        })?;
        Ok(Sink::Stream { target, format })
    }

    /// Sends the disk to its sink: the chunk pipeline into the repository, or one byte stream
    /// into a stream target.
    pub(super) async fn deliver(
        &self,
        op: &OpEntry,
        sink: Sink,
        source: Arc<dyn BlockSource>,
        from: &Provenance,
    ) -> Result<()> {
        match sink {
            Sink::Repository(writer) => self.store(op, writer, source.as_ref(), from).await,
            Sink::Stream { target, format } => {
                self.stream_out(op, target.as_ref(), format, source, from)
                    .await
            }
        }
    }

    /// One byte stream (qcow2 or raw) into a stream target; nothing is stored on this host.
    pub(super) async fn stream_out(
        &self,
        op: &OpEntry,
        target: &dyn StreamTarget,
        format: Format,
        source: Arc<dyn BlockSource>,
        from: &Provenance,
    ) -> Result<()> {
        op.set_state(OpState::Saving);
        let started = Instant::now();
        let max = self.inner.cfg.repository.max_virtual_size;
        let plan = Arc::new(StreamPlan::new(source.as_ref(), format, max).await?);
        let meta = UploadMeta {
            name: op.image_name.clone(),
            format: format.as_str().to_string(),
            size: plan.size,
            properties: self.image_properties(from, plan.virtual_size),
        };
        let readers = self.inner.cfg.capture.readers;
        let (progress, cancel) = (op.progress.clone(), op.cancel.clone());
        let factory = move || {
            stream::byte_stream(
                plan.clone(),
                source.clone(),
                readers,
                progress.clone(),
                cancel.clone(),
            )
        };
        let uploaded = target.upload(&meta, &factory).await?;
        op.set_location(&uploaded.location);
        tracing::info!(
            op = %op.id, image = %op.image_name, target = %target.describe(), location = %uploaded.location,
            bytes = uploaded.size, sha256 = %uploaded.sha256, seconds = format!("{:.2}", started.elapsed().as_secs_f64()),
            "image streamed"
        );
        Ok(())
    }

    /// Properties a Nova-style consumer expects, and ours.
    pub(super) fn image_properties(
        &self,
        from: &Provenance,
        virtual_size: u64,
    ) -> BTreeMap<String, String> {
        let mut p = BTreeMap::new();
        p.insert("architecture".into(), std::env::consts::ARCH.into());
        p.insert(
            "min_disk".into(),
            virtual_size.div_ceil(1 << 30).to_string(),
        );
        p.insert(
            "hw_qemu_guest_agent".into(),
            if from.agent { "yes" } else { "no" }.into(),
        );
        if let Some(os) = &from.os_type {
            p.insert("os_type".into(), os.clone());
        }
        if let Some(d) = &from.os_distro {
            p.insert("os_distro".into(), d.clone());
        }
        p.insert("imaged_source_host".into(), self.inner.host.clone());
        p.insert("imaged_source_domain".into(), from.domain.clone());
        p.insert("imaged_source_disk".into(), from.disk.clone());
        p.insert("imaged_consistency".into(), from.consistency.clone());
        p
    }

    /// The chunk pipeline from `source` into the repository, then the commit.
    pub(in crate::ops) async fn store(
        &self,
        op: &OpEntry,
        writer: ImageWriter,
        source: &dyn BlockSource,
        from: &Provenance,
    ) -> Result<()> {
        let readers = self.inner.cfg.capture.readers;
        op.set_state(OpState::Saving);
        let started = Instant::now();
        let captured = pipeline::run(
            source,
            readers,
            self.inner.cfg.repository.max_virtual_size,
            writer.chunk_sink(),
            op.progress.clone(),
            op.cancel.clone(),
        )
        .await;
        let captured = match captured {
            Ok(c) => c,
            Err(e) => {
                // Release the chunks this capture wrote off the async threads.
                let _ = blocking(move || {
                    drop(writer);
                    Ok(())
                })
                .await;
                return Err(e);
            }
        };
        op.cancel.check()?;
        let now = now_unix();
        let record = ImageRecord {
            format_version: FORMAT_VERSION,
            id: crate::util::random_id("img"),
            name: op.image_name.clone(),
            display_name: String::new(),
            description: from.description.clone(),
            virtual_size: captured.virtual_size,
            chunk_size: CHUNK_SIZE,
            content_digest: content_digest(captured.virtual_size, &captured.chunks),
            consistency: from.consistency.clone(),
            source_domain: from.domain.clone(),
            source_host: self.inner.host.clone(),
            source_disk: from.disk.clone(),
            source_format: from.format.clone(),
            created_at: now,
            updated_at: now,
            data_bytes: captured.data_bytes,
            chunks: captured.chunks,
        };
        let secs = started.elapsed().as_secs_f64();
        blocking(move || writer.commit(&record)).await?;
        op.set_location(&op.image_name);
        tracing::info!(op = %op.id, image = %op.image_name, seconds = format!("{secs:.2}"), "image committed");
        Ok(())
    }
}
