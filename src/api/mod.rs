//! The gRPC transport: thin services that decode a request, call the [`Agent`], and encode
//! the answer. No decision is taken here; errors map to status codes through
//! [`crate::error::ErrorKind`].

pub mod convert;
pub mod server;

use std::path::PathBuf;
use std::pin::Pin;
use std::time::Duration;

use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use crate::error::invalid;
use crate::export::Format;
use crate::ops::{Agent, CaptureParams, ExportParams, ImportParams};
use crate::proto;

/// Implements the three `imaged.v1` services over one [`Agent`].
#[derive(Clone)]
pub struct Api {
    agent: Agent,
}

impl Api {
    /// Services over `agent`.
    pub fn new(agent: Agent) -> Api {
        Api { agent }
    }
}

type ApiResult<T> = Result<Response<T>, Status>;

#[tonic::async_trait]
impl proto::domain_service_server::DomainService for Api {
    async fn list_domains(
        &self,
        _: Request<proto::ListDomainsRequest>,
    ) -> ApiResult<proto::ListDomainsResponse> {
        let doms = self.agent.list_domains().await?;
        Ok(Response::new(proto::ListDomainsResponse {
            domains: doms.iter().map(convert::domain).collect(),
        }))
    }

    async fn get_domain(&self, req: Request<proto::GetDomainRequest>) -> ApiResult<proto::Domain> {
        let d = self.agent.domain(&req.into_inner().name).await?;
        Ok(Response::new(convert::domain(&d)))
    }
}

#[tonic::async_trait]
impl proto::image_service_server::ImageService for Api {
    async fn capture(&self, req: Request<proto::CaptureRequest>) -> ApiResult<proto::Operation> {
        let r = req.into_inner();
        let mode = proto::CaptureMode::try_from(r.mode)
            .map_err(|_| invalid(format!("capture mode {} is unknown", r.mode)))?;
        match mode {
            proto::CaptureMode::Unspecified | proto::CaptureMode::Cold => {}
        }
        if r.domain.is_empty() {
            return Err(invalid("domain is empty: name the libvirt domain to capture").into());
        }
        let op = self
            .agent
            .capture(CaptureParams {
                domain: r.domain,
                image_name: r.image_name,
                request_id: r.request_id,
                disk: (!r.disk.is_empty()).then_some(r.disk),
            })
            .await?;
        Ok(Response::new(convert::operation(&op)))
    }

    async fn import(&self, req: Request<proto::ImportRequest>) -> ApiResult<proto::Operation> {
        let r = req.into_inner();
        let op = self
            .agent
            .import(ImportParams {
                path: PathBuf::from(r.path),
                format: r.format,
                image_name: r.image_name,
                request_id: r.request_id,
            })
            .await?;
        Ok(Response::new(convert::operation(&op)))
    }

    async fn list_images(
        &self,
        _: Request<proto::ListImagesRequest>,
    ) -> ApiResult<proto::ListImagesResponse> {
        let images = self.agent.list_images().await?;
        Ok(Response::new(proto::ListImagesResponse {
            images: images.iter().map(convert::image).collect(),
        }))
    }

    async fn get_image(&self, req: Request<proto::GetImageRequest>) -> ApiResult<proto::Image> {
        let r = self.agent.image(&req.into_inner().name).await?;
        Ok(Response::new(convert::image(&r)))
    }

    async fn delete_image(
        &self,
        req: Request<proto::DeleteImageRequest>,
    ) -> ApiResult<proto::DeleteImageResponse> {
        let s = self.agent.delete_image(&req.into_inner().name).await?;
        Ok(Response::new(proto::DeleteImageResponse {
            chunks_removed: s.chunks_removed,
            bytes_freed: s.bytes_freed,
        }))
    }

    async fn export_image(
        &self,
        req: Request<proto::ExportImageRequest>,
    ) -> ApiResult<proto::Operation> {
        let r = req.into_inner();
        let format = match proto::ImageFormat::try_from(r.format) {
            Ok(proto::ImageFormat::Qcow2) => Format::Qcow2,
            Ok(proto::ImageFormat::Raw) => Format::Raw,
            _ => return Err(invalid("export format must be QCOW2 or RAW").into()),
        };
        let op = self
            .agent
            .export(ExportParams {
                image_name: r.name,
                format,
                path: PathBuf::from(r.path),
                overwrite: r.overwrite,
                request_id: r.request_id,
            })
            .await?;
        Ok(Response::new(convert::operation(&op)))
    }
}

type OpStream = Pin<Box<dyn Stream<Item = Result<proto::Operation, Status>> + Send>>;

#[tonic::async_trait]
impl proto::operation_service_server::OperationService for Api {
    async fn get_operation(
        &self,
        req: Request<proto::GetOperationRequest>,
    ) -> ApiResult<proto::Operation> {
        let op = self.agent.operation(&req.into_inner().id)?;
        Ok(Response::new(convert::operation(&op)))
    }

    async fn list_operations(
        &self,
        _: Request<proto::ListOperationsRequest>,
    ) -> ApiResult<proto::ListOperationsResponse> {
        let ops = self.agent.operations();
        Ok(Response::new(proto::ListOperationsResponse {
            operations: ops.iter().map(convert::operation).collect(),
        }))
    }

    type WatchOperationStream = OpStream;

    async fn watch_operation(
        &self,
        req: Request<proto::WatchOperationRequest>,
    ) -> ApiResult<Self::WatchOperationStream> {
        let entry = self.agent.watch(&req.into_inner().id)?;
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
        let op = self.agent.cancel(&req.into_inner().id)?;
        Ok(Response::new(convert::operation(&op)))
    }
}
