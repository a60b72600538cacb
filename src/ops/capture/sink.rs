//! Where a capture's bytes go: the sink is opened (and checked) before anything is read,
//! then the disk is delivered into it: the chunk pipeline into the local repository or into a
//! central imagerepo (which is sent only the chunks it lacks), or one qcow2/raw byte stream
//! into a file, Glance or S3, with the image properties a Nova-style consumer expects.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use super::super::{blocking, Controller, OpEntry, OpState};
use super::{CaptureParams, Plan, TargetSpec};
use crate::capture::source::BlockSource;
use crate::capture::stream::{self, StreamPlan};
use crate::capture::{self as pipeline, Base, Captured};
use crate::error::{invalid, Error, ErrorKind, Result};
use crate::format::Format;
use crate::ops::mode::consistency_of;
use crate::repo::manifest::{content_digest, FORMAT_VERSION};
use crate::repo::{ImageRecord, ImageWriter, CHUNK_SIZE};
use crate::upload::file::FileTarget;
use crate::upload::imagerepo::{ImageRepo, UploadSpec};
use crate::upload::{StreamTarget, Target, UploadMeta};
use crate::util::now_unix;

/// Where the task sends the bytes.
pub(super) enum Sink {
    Repository(ImageWriter),
    Stream {
        target: Box<dyn StreamTarget>,
        format: Format,
    },
    /// A central imagerepo: the chunk pipeline, sending only what it lacks.
    Central {
        repo: ImageRepo,
        project: String,
        tag: String,
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
            TargetSpec::Remote {
                name,
                format,
                project,
                tag,
            } => {
                let cfg = self.inner.cfg.targets.get(name).cloned().ok_or_else(|| {
                    let known: Vec<&str> = self.inner.cfg.targets.keys().map(String::as_str).collect();
                    crate::error::not_found(format!(
                        "target {name} is not configured (configured: {}); add a [targets.{name}] table to the config",
                        if known.is_empty() { "none".to_string() } else { known.join(", ") }
                    ))
                })?;
                let kind = cfg.kind();
                match cfg.build()? {
                    Target::Chunks(repo) => {
                        if format.is_some() {
                            return Err(invalid(format!(
                                "target {name} is an imagerepo, which stores chunks and makes formats at download: \
                                 leave target.remote.format unset"
                            ))
                            .with_field("target.remote.format"));
                        }
                        let repo = repo.named(name);
                        let project = repo.project(project.as_deref())?;
                        if let Some(t) = tag {
                            validate_tag(t)?;
                        }
                        repo.check(&project).await?;
                        return Ok(Sink::Central {
                            repo,
                            project,
                            tag: tag.clone().unwrap_or_default(),
                        });
                    }
                    Target::Stream(target) => {
                        for (field, v) in [("project", project), ("tag", tag)] {
                            if v.is_some() {
                                return Err(invalid(format!(
                                    "target.remote.{field} is for imagerepo targets; target {name} is a {kind} target"
                                ))
                                .with_field(&format!("target.remote.{field}")));
                            }
                        }
                        // A stream's format: qcow2 unless asked.
                        (target, format.unwrap_or(Format::Qcow2))
                    }
                }
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

    /// Sends the disk to its sink: the chunk pipeline into the repository (with `base`, only
    /// what changed since it), or one byte stream into a stream target. The chunk sinks answer
    /// what they stored; a stream None.
    pub(super) async fn deliver(
        &self,
        op: &OpEntry,
        sink: Sink,
        source: Arc<dyn BlockSource>,
        from: &Provenance,
        base: Option<&Base>,
    ) -> Result<Option<Captured>> {
        match sink {
            Sink::Repository(writer) => self
                .store(op, writer, source.as_ref(), from, base)
                .await
                .map(Some),
            Sink::Stream { target, format } => self
                .stream_out(op, target.as_ref(), format, source, from)
                .await
                .map(|()| None),
            Sink::Central { repo, project, tag } => self
                .to_imagerepo(op, &repo, project, tag, source.as_ref(), from, base)
                .await
                .map(Some),
        }
    }

    /// The chunk pipeline into a central imagerepo: begin the upload (an idempotency key made
    /// from the operation), send only the chunks it lacks, then add the manifest and commit;
    /// on any failure or cancel the upload is aborted with the reason.
    #[allow(clippy::too_many_arguments)]
    async fn to_imagerepo(
        &self,
        op: &OpEntry,
        repo: &ImageRepo,
        project: String,
        tag: String,
        source: &dyn BlockSource,
        from: &Provenance,
        base: Option<&Base>,
    ) -> Result<Captured> {
        op.set_state(OpState::Saving);
        let started = Instant::now();
        let max = self.inner.cfg.repository.max_virtual_size;
        // The virtual size goes into BeginUpload, before the pipeline reads anything.
        let virtual_size = {
            let c = source.reader().await?;
            let size = c.size();
            c.close().await;
            pipeline::check_virtual_size(size, max, source.describe())?;
            size
        };
        let op_key = if op.request_id.is_empty() {
            &op.id
        } else {
            &op.request_id
        };
        let spec = UploadSpec {
            request_id: UploadSpec::request_id(
                &self.inner.host,
                op_key,
                &project,
                &op.image_name,
                &tag,
            ),
            project,
            image_name: op.image_name.clone(),
            tag,
            virtual_size,
            source_format: from.format.clone(),
            consistency: from.consistency.clone(),
            description: from.description.clone(),
            source_domain: from.domain.clone(),
            source_host: self.inner.host.clone(),
            os_type: from.os_type.clone().unwrap_or_default(),
            os_version: from.os_distro.clone().unwrap_or_default(),
            architecture: std::env::consts::ARCH.into(),
        };
        let upload = repo.begin(spec, op.cancel.clone()).await?;
        let res = async {
            let captured = pipeline::run(
                source,
                self.inner.cfg.capture.readers,
                max,
                Arc::new(upload.clone()),
                op.progress.clone(),
                op.cancel.clone(),
                base,
            )
            .await?;
            op.cancel.check()?;
            let digest = content_digest(captured.virtual_size, &captured.chunks);
            let image = upload.finish(&captured.chunks, &digest).await?;
            Ok::<_, Error>((image, captured))
        }
        .await;
        let (image, captured) = match res {
            Ok(done) => done,
            Err(e) => {
                let reason = if e.kind() == ErrorKind::Cancelled {
                    format!("capture operation {} was cancelled", op.id)
                } else {
                    format!("capture operation {} failed: {}", op.id, e.chain())
                };
                upload.abort(&reason).await;
                return Err(e);
            }
        };
        op.set_location(&image);
        let st = upload.stats();
        let p = &op.progress;
        tracing::info!(
            op = %op.id, image = %image, target = %repo.describe(), upload = %upload.name(),
            bytes_new = p.bytes_new.load(std::sync::atomic::Ordering::Relaxed),
            bytes_existing = p.bytes_existing.load(std::sync::atomic::Ordering::Relaxed),
            bytes_sent = st.bytes_sent, chunks_sent = st.chunks_sent,
            find_calls = st.find_calls, digests_asked = st.digests_asked, retries = st.retries,
            seconds = format!("{:.2}", started.elapsed().as_secs_f64()),
            "image uploaded to the central repository"
        );
        Ok(captured)
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

    /// The chunk pipeline from `source` into the repository (with `base`, only what changed
    /// since it), then the commit; what was stored.
    pub(in crate::ops) async fn store(
        &self,
        op: &OpEntry,
        writer: ImageWriter,
        source: &dyn BlockSource,
        from: &Provenance,
        base: Option<&Base>,
    ) -> Result<Captured> {
        let readers = self.inner.cfg.capture.readers;
        op.set_state(OpState::Saving);
        let started = Instant::now();
        let captured = pipeline::run(
            source,
            readers,
            self.inner.cfg.repository.max_virtual_size,
            Arc::new(writer.chunk_sink()),
            op.progress.clone(),
            op.cancel.clone(),
            base,
        )
        .await;
        let mut captured = match captured {
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
            chunks: std::mem::take(&mut captured.chunks),
        };
        let secs = started.elapsed().as_secs_f64();
        let record = blocking(move || writer.commit(&record).map(|()| record)).await?;
        captured.chunks = record.chunks;
        op.set_location(&op.image_name);
        tracing::info!(op = %op.id, image = %op.image_name, seconds = format!("{secs:.2}"), "image committed");
        Ok(captured)
    }
}

/// A repository tag: 1 to 128 letters, digits, '.', '_' or '-', not starting with '.' or '-'.
fn validate_tag(tag: &str) -> Result<()> {
    let ok = (1..=128).contains(&tag.len())
        && tag
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        && !tag.starts_with(['.', '-']);
    if ok {
        Ok(())
    } else {
        Err(invalid(format!(
            "target.remote.tag {tag:?} must be 1 to 128 letters, digits, '.', '_' or '-', not starting with '.' or '-'"
        ))
        .with_field("target.remote.tag"))
    }
}
