//! The gRPC transport: thin services that decode a request, call the [`Controller`], and encode
//! the answer. No decision is taken here; errors map to status codes through
//! [`crate::error::ErrorKind`].

pub mod auth;
pub mod authority_hint;
pub mod convert;
pub mod server;

use std::path::PathBuf;
use std::pin::Pin;
use std::time::Duration;

use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use crate::error::invalid;
use crate::format::Format;
use crate::ops::{CaptureParams, Controller, ExportParams, ImportParams, Mode, TargetSpec};
use crate::proto;

/// Implements the three `imaged.v1` services over one [`Controller`].
#[derive(Clone)]
pub struct Api {
    ctl: Controller,
}

impl Api {
    /// Services over the controller `ctl`.
    pub fn new(ctl: Controller) -> Api {
        Api { ctl }
    }
}

type ApiResult<T> = Result<Response<T>, Status>;

/// The caller [`auth::AuthLayer`] resolved for a request (`uid:1000`, `tls:CN=cp1`); empty
/// when the request did not pass the layer (direct calls in tests).
fn requester<T>(req: &Request<T>) -> String {
    req.extensions()
        .get::<auth::Caller>()
        .map(|c| c.name.clone())
        .unwrap_or_default()
}

#[tonic::async_trait]
impl proto::domain_service_server::DomainService for Api {
    async fn list_domains(
        &self,
        _: Request<proto::ListDomainsRequest>,
    ) -> ApiResult<proto::ListDomainsResponse> {
        let doms = self.ctl.list_domains().await?;
        Ok(Response::new(proto::ListDomainsResponse {
            domains: doms.iter().map(convert::domain).collect(),
        }))
    }

    async fn get_domain(&self, req: Request<proto::GetDomainRequest>) -> ApiResult<proto::Domain> {
        let d = self.ctl.domain(&req.into_inner().name).await?;
        Ok(Response::new(convert::domain(&d)))
    }
}

#[tonic::async_trait]
impl proto::image_service_server::ImageService for Api {
    async fn capture(&self, req: Request<proto::CaptureRequest>) -> ApiResult<proto::Operation> {
        let requester = requester(&req);
        let r = req.into_inner();
        let mode = match proto::CaptureMode::try_from(r.mode) {
            Ok(proto::CaptureMode::Unspecified) => Mode::Auto,
            Ok(proto::CaptureMode::Cold) => Mode::Cold,
            Ok(proto::CaptureMode::Shutdown) => Mode::Shutdown,
            Ok(proto::CaptureMode::Quiesce) => Mode::Quiesce,
            Ok(proto::CaptureMode::CrashConsistent) => Mode::CrashConsistent,
            Err(_) => return Err(invalid(format!("capture mode {} is unknown", r.mode)).into()),
        };
        if r.shutdown_timeout_seconds > 3600 {
            return Err(invalid("shutdown_timeout_seconds must be at most 3600").into());
        }
        if r.domain.is_empty() {
            return Err(invalid("domain is empty: name the libvirt domain to capture").into());
        }
        let op = self
            .ctl
            .capture(CaptureParams {
                domain: r.domain,
                image_name: r.image_name,
                request_id: r.request_id,
                disk: (!r.disk.is_empty()).then_some(r.disk),
                mode,
                shutdown_timeout: Duration::from_secs(match r.shutdown_timeout_seconds {
                    0 => 120,
                    n => u64::from(n),
                }),
                force_off: r.force_off,
                restart: r.restart,
                target: target_spec(r.target)?,
                prep: r.prep,
                restore_source: r.restore_source,
                requester,
            })
            .await?;
        Ok(Response::new(convert::operation(&op)))
    }

    async fn import(&self, req: Request<proto::ImportRequest>) -> ApiResult<proto::Operation> {
        let requester = requester(&req);
        let r = req.into_inner();
        let op = self
            .ctl
            .import(ImportParams {
                path: PathBuf::from(r.path),
                format: r.format,
                image_name: r.image_name,
                request_id: r.request_id,
                requester,
            })
            .await?;
        Ok(Response::new(convert::operation(&op)))
    }

    async fn plan_prep(
        &self,
        req: Request<proto::PlanPrepRequest>,
    ) -> ApiResult<proto::PlanPrepResponse> {
        let r = req.into_inner();
        let steps = self.ctl.plan_prep(&r.domain, &r.prep).await?;
        Ok(Response::new(proto::PlanPrepResponse {
            steps: steps.iter().map(convert::prep_report).collect(),
        }))
    }

    async fn list_images(
        &self,
        _: Request<proto::ListImagesRequest>,
    ) -> ApiResult<proto::ListImagesResponse> {
        let images = self.ctl.list_images().await?;
        Ok(Response::new(proto::ListImagesResponse {
            images: images.iter().map(convert::image).collect(),
        }))
    }

    async fn get_image(&self, req: Request<proto::GetImageRequest>) -> ApiResult<proto::Image> {
        let r = self.ctl.image(&req.into_inner().name).await?;
        Ok(Response::new(convert::image(&r)))
    }

    async fn delete_image(
        &self,
        req: Request<proto::DeleteImageRequest>,
    ) -> ApiResult<proto::DeleteImageResponse> {
        let s = self.ctl.delete_image(&req.into_inner().name).await?;
        Ok(Response::new(proto::DeleteImageResponse {
            chunks_removed: s.chunks_removed,
            bytes_freed: s.bytes_freed,
        }))
    }

    async fn export_image(
        &self,
        req: Request<proto::ExportImageRequest>,
    ) -> ApiResult<proto::Operation> {
        let requester = requester(&req);
        let r = req.into_inner();
        let format = match proto::ImageFormat::try_from(r.format) {
            Ok(proto::ImageFormat::Qcow2) => Format::Qcow2,
            Ok(proto::ImageFormat::Raw) => Format::Raw,
            _ => return Err(invalid("export format must be QCOW2 or RAW").into()),
        };
        let op = self
            .ctl
            .export(ExportParams {
                image_name: r.name,
                format,
                path: PathBuf::from(r.path),
                overwrite: r.overwrite,
                request_id: r.request_id,
                requester,
            })
            .await?;
        Ok(Response::new(convert::operation(&op)))
    }
}

fn format_of(f: i32, what: &str) -> Result<Format, Status> {
    match proto::ImageFormat::try_from(f) {
        Ok(proto::ImageFormat::Qcow2) => Ok(Format::Qcow2),
        Ok(proto::ImageFormat::Raw) => Ok(Format::Raw),
        _ => Err(invalid(format!("{what}: format must be QCOW2 or RAW")).into()),
    }
}

/// The capture target of a request; the repository when none is given.
fn target_spec(t: Option<proto::Target>) -> Result<TargetSpec, Status> {
    use proto::target::Kind;
    Ok(match t.and_then(|t| t.kind) {
        None | Some(Kind::Repository(_)) => TargetSpec::Repository,
        Some(Kind::File(f)) => {
            if f.path.is_empty() {
                return Err(invalid("target file: path is empty").into());
            }
            TargetSpec::File {
                path: PathBuf::from(f.path),
                format: format_of(f.format, "target file")?,
                overwrite: f.overwrite,
            }
        }
        Some(Kind::Remote(r)) => {
            if r.name.is_empty() {
                return Err(invalid(
                    "remote target: name is empty: name a [targets.NAME] of the daemon config",
                )
                .into());
            }
            TargetSpec::Remote {
                format: format_of(r.format, &format!("target {}", r.name))?,
                name: r.name,
            }
        }
    })
}

type OpStream = Pin<Box<dyn Stream<Item = Result<proto::Operation, Status>> + Send>>;

#[tonic::async_trait]
impl proto::operation_service_server::OperationService for Api {
    async fn get_operation(
        &self,
        req: Request<proto::GetOperationRequest>,
    ) -> ApiResult<proto::Operation> {
        let op = self.ctl.operation(&req.into_inner().id)?;
        Ok(Response::new(convert::operation(&op)))
    }

    async fn list_operations(
        &self,
        _: Request<proto::ListOperationsRequest>,
    ) -> ApiResult<proto::ListOperationsResponse> {
        let ops = self.ctl.operations();
        Ok(Response::new(proto::ListOperationsResponse {
            operations: ops.iter().map(convert::operation).collect(),
        }))
    }

    type WatchOperationStream = OpStream;

    async fn watch_operation(
        &self,
        req: Request<proto::WatchOperationRequest>,
    ) -> ApiResult<Self::WatchOperationStream> {
        let entry = self.ctl.watch(&req.into_inner().id)?;
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            let mut status = entry.subscribe();
            let mut last: Option<proto::Operation> = None;
            loop {
                let snap = convert::operation(&entry.snapshot());
                let terminal = entry.state().is_terminal();
                if last.as_ref() != Some(&snap) {
                    if tx.send(Ok(snap.clone())).await.is_err() {
                        return; // the watcher went away
                    }
                    last = Some(snap);
                }
                if terminal {
                    return;
                }
                tokio::select! {
                    _ = status.changed() => {}
                    _ = tokio::time::sleep(Duration::from_millis(250)) => {}
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn cancel_operation(
        &self,
        req: Request<proto::CancelOperationRequest>,
    ) -> ApiResult<proto::Operation> {
        let op = self.ctl.cancel(&req.into_inner().id)?;
        Ok(Response::new(convert::operation(&op)))
    }
}
