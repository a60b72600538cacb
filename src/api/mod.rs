//! The gRPC transport: thin services that decode a request (resource names, enums, durations,
//! field limits), call the [`Controller`], and encode the answer. No decision is taken here;
//! errors map to status codes with `google.rpc` details through [`crate::error`].
//!
//! Four services share one [`Api`]: `imaged.v1` DomainService, ImageService, OperationService,
//! and the standard `google.longrunning.Operations` (the same operations, for stock LRO clients).

pub mod auth;
pub mod authority_hint;
pub mod convert;
pub mod list;
pub mod names;
pub mod server;

use std::path::PathBuf;
use std::pin::Pin;
use std::time::Duration;

use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use crate::error::{invalid, Result};
use crate::format::Format;
use crate::ops::{
    CaptureParams, Controller, ExportParams, ImportParams, Mode, OpKind, OpState, Operation,
    TargetSpec,
};
use crate::proto;
use crate::proto::google::longrunning as lro;
use convert::Outcome;
use list::Query;
use names::{DOMAINS, IMAGES, OPERATIONS};

/// Longest `request_id`, description and display name accepted.
const MAX_REQUEST_ID: usize = 128;
const MAX_DESCRIPTION: usize = 1024;
const MAX_DISPLAY_NAME: usize = 256;
/// Longest host path accepted in a request.
const MAX_PATH: usize = 4096;
/// Longest and default wait of WaitOperation.
const MAX_WAIT: Duration = Duration::from_secs(600);

/// Implements the services over one [`Controller`].
#[derive(Clone)]
pub struct Api {
    ctl: Controller,
}

impl Api {
    /// Services over the controller `ctl`.
    pub fn new(ctl: Controller) -> Api {
        Api { ctl }
    }

    /// An operation in its envelope, with the image or file it made when it succeeded.
    async fn envelope(&self, op: &Operation) -> lro::Operation {
        let outcome = if op.state == OpState::Active {
            self.outcome(op).await
        } else {
            None
        };
        convert::operation(op, outcome)
    }

    async fn outcome(&self, op: &Operation) -> Option<Outcome> {
        match op.kind {
            OpKind::Export => {
                let size = std::fs::metadata(&op.path).map(|m| m.len()).unwrap_or(0);
                Some(Outcome::Exported {
                    path: op.path.clone(),
                    size_bytes: size,
                })
            }
            OpKind::Capture if !op.location.is_empty() && op.location != op.image_name => {
                Some(Outcome::Target {
                    location: op.location.clone(),
                })
            }
            _ => self
                .ctl
                .image(&op.image_name)
                .await
                .ok()
                .map(|r| Outcome::Image(Box::new(r))),
        }
    }
}

type ApiResult<T> = std::result::Result<Response<T>, Status>;

/// A string field's length limit, as INVALID_ARGUMENT naming the field.
fn limit(field: &str, value: &str, max: usize) -> Result<()> {
    if value.len() > max {
        return Err(invalid(format!(
            "{field} is {} bytes long; at most {max}",
            value.len()
        ))
        .with_field(field));
    }
    Ok(())
}

/// A request_id: empty, or at most 128 printable ASCII characters (a UUID is expected).
fn request_id(v: &str) -> Result<String> {
    limit("request_id", v, MAX_REQUEST_ID)?;
    if v.chars().any(|c| !c.is_ascii_graphic()) {
        return Err(
            invalid("request_id must be printable ASCII without spaces (a UUID)")
                .with_field("request_id"),
        );
    }
    Ok(v.to_string())
}

fn format_of(f: i32, field: &str) -> Result<Format> {
    match proto::ImageFormat::try_from(f) {
        Ok(proto::ImageFormat::Qcow2) => Ok(Format::Qcow2),
        Ok(proto::ImageFormat::Raw) => Ok(Format::Raw),
        _ => Err(invalid(format!(
            "{field} must be IMAGE_FORMAT_QCOW2 or IMAGE_FORMAT_RAW"
        ))
        .with_field(field)),
    }
}

fn host_path(field: &str, p: &str) -> Result<PathBuf> {
    limit(field, p, MAX_PATH)?;
    if p.is_empty() {
        return Err(invalid(format!("{field} is empty: give an absolute path")).with_field(field));
    }
    Ok(PathBuf::from(p))
}

fn prep_steps(v: &[i32], field: &str) -> Result<Vec<String>> {
    let mut out: Vec<String> = Vec::new();
    for s in v {
        let name = convert::prep_step_name(*s).ok_or_else(|| {
            invalid(format!(
                "{field}: {s} is not a prep step: use PREP_STEP_DHCP, PREP_STEP_UDEV_NET_RULES, \
                 PREP_STEP_SETPASSWD_HOOK or PREP_STEP_FSTAB_DATA_DISKS"
            ))
            .with_field(field)
        })?;
        if out.iter().any(|o| o == name) {
            return Err(invalid(format!("{field}: {name} is given twice")).with_field(field));
        }
        out.push(name.to_string());
    }
    Ok(out)
}

/// The capture target of a request; the repository when none is given.
fn target_spec(t: Option<proto::Target>) -> Result<TargetSpec> {
    use proto::target::Kind;
    Ok(match t.and_then(|t| t.kind) {
        None | Some(Kind::Repository(_)) => TargetSpec::Repository,
        Some(Kind::File(f)) => TargetSpec::File {
            path: host_path("target.file.path", &f.path)?,
            format: format_of(f.format, "target.file.format")?,
            overwrite: f.overwrite,
        },
        Some(Kind::Remote(r)) => {
            if r.name.is_empty() {
                return Err(invalid(
                    "target.remote.name is empty: name a [targets.NAME] of the daemon config",
                )
                .with_field("target.remote.name"));
            }
            limit("target.remote.name", &r.name, 128)?;
            limit("target.remote.project", &r.project, 63)?;
            limit("target.remote.tag", &r.tag, 128)?;
            // Whether the format, project and tag suit the target's kind is checked where
            // the config is known (the capture's sink).
            TargetSpec::Remote {
                format: (r.format != proto::ImageFormat::Unspecified as i32)
                    .then(|| format_of(r.format, "target.remote.format"))
                    .transpose()?,
                project: (!r.project.is_empty()).then_some(r.project),
                tag: (!r.tag.is_empty()).then_some(r.tag),
                name: r.name,
            }
        }
    })
}

fn capture_params(r: proto::CaptureImageRequest, requester: String) -> Result<CaptureParams> {
    let mode = match proto::CaptureMode::try_from(r.mode) {
        Ok(proto::CaptureMode::Unspecified) => Mode::Auto,
        Ok(proto::CaptureMode::Cold) => Mode::Cold,
        Ok(proto::CaptureMode::Shutdown) => Mode::Shutdown,
        Ok(proto::CaptureMode::Quiesce) => Mode::Quiesce,
        Ok(proto::CaptureMode::CrashConsistent) => Mode::CrashConsistent,
        Err(_) => {
            return Err(invalid(format!("mode {} is not a capture mode", r.mode)).with_field("mode"))
        }
    };
    let shutdown_timeout = match r.shutdown_timeout {
        None => Duration::from_secs(120),
        Some(d) if d.seconds < 1 || d.seconds > 3600 || d.nanos != 0 => {
            return Err(invalid(
                "shutdown_timeout must be whole seconds from 1 s to 3600 s (default 120 s)",
            )
            .with_field("shutdown_timeout"))
        }
        Some(d) => Duration::from_secs(d.seconds as u64),
    };
    limit("description", &r.description, MAX_DESCRIPTION)?;
    limit("disk", &r.disk, 64)?;
    Ok(CaptureParams {
        domain: names::parse(DOMAINS, &r.domain, "domain")?.to_string(),
        image_name: r.image_id,
        request_id: request_id(&r.request_id)?,
        disk: (!r.disk.is_empty()).then_some(r.disk),
        mode,
        shutdown_timeout,
        force_off: r.force_off,
        restart: r.restart,
        target: target_spec(r.target)?,
        prep: prep_steps(&r.prep_steps, "prep_steps")?,
        restore_source: r.restore_source,
        description: r.description,
        requester,
    })
}

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
        req: Request<proto::ListDomainsRequest>,
    ) -> ApiResult<proto::ListDomainsResponse> {
        let r = req.into_inner();
        let q = Query::parse(
            r.page_size,
            &r.page_token,
            &r.filter,
            &r.order_by,
            convert::DOMAIN_FIELDS,
            "name",
        )?;
        let doms = self.ctl.list_domains().await?;
        let (domains, next_page_token) = q.page(doms.iter().map(convert::domain).collect())?;
        Ok(Response::new(proto::ListDomainsResponse {
            domains,
            next_page_token,
        }))
    }

    async fn get_domain(&self, req: Request<proto::GetDomainRequest>) -> ApiResult<proto::Domain> {
        let r = req.into_inner();
        let d = self
            .ctl
            .domain(names::parse(DOMAINS, &r.name, "name")?)
            .await?;
        Ok(Response::new(convert::domain(&d)))
    }
}

#[tonic::async_trait]
impl proto::image_service_server::ImageService for Api {
    async fn capture_image(
        &self,
        req: Request<proto::CaptureImageRequest>,
    ) -> ApiResult<lro::Operation> {
        let requester = requester(&req);
        let op = self
            .ctl
            .capture(capture_params(req.into_inner(), requester)?)
            .await?;
        Ok(Response::new(self.envelope(&op).await))
    }

    async fn import_image(
        &self,
        req: Request<proto::ImportImageRequest>,
    ) -> ApiResult<lro::Operation> {
        let requester = requester(&req);
        let r = req.into_inner();
        limit("description", &r.description, MAX_DESCRIPTION)?;
        let format = format_of(r.format, "format")?;
        let op = self
            .ctl
            .import(ImportParams {
                path: host_path("path", &r.path)?,
                format: format.as_str().to_string(),
                image_name: r.image_id,
                request_id: request_id(&r.request_id)?,
                description: r.description,
                requester,
            })
            .await?;
        Ok(Response::new(self.envelope(&op).await))
    }

    async fn plan_prep(
        &self,
        req: Request<proto::PlanPrepRequest>,
    ) -> ApiResult<proto::PlanPrepResponse> {
        let r = req.into_inner();
        let domain = names::parse(DOMAINS, &r.domain, "domain")?;
        let steps = prep_steps(&r.prep_steps, "prep_steps")?;
        if steps.is_empty() {
            return Err(invalid("prep_steps is empty: name the steps to plan")
                .with_field("prep_steps")
                .into());
        }
        let reports = self.ctl.plan_prep(domain, &steps).await?;
        Ok(Response::new(proto::PlanPrepResponse {
            steps: reports.iter().map(convert::prep_report).collect(),
        }))
    }

    async fn list_images(
        &self,
        req: Request<proto::ListImagesRequest>,
    ) -> ApiResult<proto::ListImagesResponse> {
        let r = req.into_inner();
        let q = Query::parse(
            r.page_size,
            &r.page_token,
            &r.filter,
            &r.order_by,
            convert::IMAGE_FIELDS,
            "name",
        )?;
        let images = self.ctl.list_images().await?;
        let (images, next_page_token) = q.page(images.iter().map(convert::image).collect())?;
        Ok(Response::new(proto::ListImagesResponse {
            images,
            next_page_token,
        }))
    }

    async fn get_image(&self, req: Request<proto::GetImageRequest>) -> ApiResult<proto::Image> {
        let r = req.into_inner();
        let rec = self
            .ctl
            .image(names::parse(IMAGES, &r.name, "name")?)
            .await?;
        Ok(Response::new(convert::image(&rec)))
    }

    async fn update_image(
        &self,
        req: Request<proto::UpdateImageRequest>,
    ) -> ApiResult<proto::Image> {
        let r = req.into_inner();
        let img = r.image.ok_or_else(|| {
            invalid("image is missing: give the image with its name and the new values")
                .with_field("image")
        })?;
        let id = names::parse(IMAGES, &img.name, "image.name")?;
        let paths: Vec<String> = r.update_mask.map(|m| m.paths).unwrap_or_default();
        let (mut display, mut desc) = (None, None);
        if paths.is_empty() {
            display = (!img.display_name.is_empty()).then(|| img.display_name.clone());
            desc = (!img.description.is_empty()).then(|| img.description.clone());
        }
        for p in &paths {
            match p.as_str() {
                "*" => {
                    display = Some(img.display_name.clone());
                    desc = Some(img.description.clone());
                }
                "display_name" => display = Some(img.display_name.clone()),
                "description" => desc = Some(img.description.clone()),
                other => {
                    return Err(invalid(format!(
                        "update_mask: {other:?} cannot be changed; only display_name and \
                         description can"
                    ))
                    .with_field("update_mask")
                    .into())
                }
            }
        }
        if let Some(d) = &display {
            limit("image.display_name", d, MAX_DISPLAY_NAME)?;
        }
        if let Some(d) = &desc {
            limit("image.description", d, MAX_DESCRIPTION)?;
        }
        let rec = self.ctl.update_image(id, display, desc).await?;
        Ok(Response::new(convert::image(&rec)))
    }

    async fn delete_image(&self, req: Request<proto::DeleteImageRequest>) -> ApiResult<()> {
        let r = req.into_inner();
        self.ctl
            .delete_image(names::parse(IMAGES, &r.name, "name")?)
            .await?;
        Ok(Response::new(()))
    }

    async fn export_image(
        &self,
        req: Request<proto::ExportImageRequest>,
    ) -> ApiResult<lro::Operation> {
        let requester = requester(&req);
        let r = req.into_inner();
        let op = self
            .ctl
            .export(ExportParams {
                image_name: names::parse(IMAGES, &r.name, "name")?.to_string(),
                format: format_of(r.format, "format")?,
                path: host_path("path", &r.path)?,
                overwrite: r.overwrite,
                request_id: request_id(&r.request_id)?,
                requester,
            })
            .await?;
        Ok(Response::new(self.envelope(&op).await))
    }
}

type OpStream = Pin<Box<dyn Stream<Item = std::result::Result<lro::Operation, Status>> + Send>>;

/// The operations half, shared by `imaged.v1.OperationService` and `google.longrunning.Operations`.
impl Api {
    async fn get_op(&self, name: &str) -> Result<lro::Operation> {
        let op = self
            .ctl
            .operation(names::parse(OPERATIONS, name, "name")?)?;
        Ok(self.envelope(&op).await)
    }

    async fn list_ops(
        &self,
        page_size: i32,
        page_token: &str,
        filter: &str,
        order_by: &str,
    ) -> Result<(Vec<lro::Operation>, String)> {
        let q = Query::parse(
            page_size,
            page_token,
            filter,
            order_by,
            convert::OPERATION_FIELDS,
            "create_time desc",
        )?;
        let (page, next) = q.page(self.ctl.operations()?)?;
        let mut out = Vec::with_capacity(page.len());
        for op in &page {
            out.push(self.envelope(op).await);
        }
        Ok((out, next))
    }

    async fn wait_op(
        &self,
        name: &str,
        timeout: Option<prost_types::Duration>,
    ) -> Result<lro::Operation> {
        let id = names::parse(OPERATIONS, name, "name")?;
        let wait = match timeout {
            None => MAX_WAIT,
            Some(d) if d.seconds < 0 || d.nanos < 0 => {
                return Err(invalid("timeout is negative").with_field("timeout"))
            }
            Some(d) => Duration::new(d.seconds as u64, d.nanos as u32).min(MAX_WAIT),
        };
        let op = self.ctl.wait_operation(id, wait).await?;
        Ok(self.envelope(&op).await)
    }

    async fn cancel_op(&self, name: &str) -> Result<lro::Operation> {
        let op = self.ctl.cancel(names::parse(OPERATIONS, name, "name")?)?;
        Ok(self.envelope(&op).await)
    }

    fn delete_op(&self, name: &str) -> Result<()> {
        self.ctl
            .delete_operation(names::parse(OPERATIONS, name, "name")?)
    }
}

#[tonic::async_trait]
impl proto::operation_service_server::OperationService for Api {
    async fn get_operation(
        &self,
        req: Request<proto::GetOperationRequest>,
    ) -> ApiResult<lro::Operation> {
        Ok(Response::new(self.get_op(&req.into_inner().name).await?))
    }

    async fn list_operations(
        &self,
        req: Request<proto::ListOperationsRequest>,
    ) -> ApiResult<proto::ListOperationsResponse> {
        let r = req.into_inner();
        let (operations, next_page_token) = self
            .list_ops(r.page_size, &r.page_token, &r.filter, &r.order_by)
            .await?;
        Ok(Response::new(proto::ListOperationsResponse {
            operations,
            next_page_token,
        }))
    }

    async fn wait_operation(
        &self,
        req: Request<proto::WaitOperationRequest>,
    ) -> ApiResult<lro::Operation> {
        let r = req.into_inner();
        Ok(Response::new(self.wait_op(&r.name, r.timeout).await?))
    }

    type WatchOperationStream = OpStream;

    async fn watch_operation(
        &self,
        req: Request<proto::WatchOperationRequest>,
    ) -> ApiResult<Self::WatchOperationStream> {
        let name = req.into_inner().name;
        let id = names::parse(OPERATIONS, &name, "name")?.to_string();
        // An operation that is no longer live (finished, perhaps before a restart) is sent once.
        let entry = match self.ctl.watch(&id) {
            Ok(e) => e,
            Err(e) if e.kind() == crate::error::ErrorKind::NotFound => {
                let op = self.ctl.operation(&id)?;
                let once = self.envelope(&op).await;
                return Ok(Response::new(Box::pin(tokio_stream::once(Ok(once)))));
            }
            Err(e) => return Err(e.into()),
        };
        let api = self.clone();
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            let mut status = entry.subscribe();
            let mut last: Option<lro::Operation> = None;
            loop {
                let terminal = entry.state().is_terminal();
                let snap = api.envelope(&entry.snapshot()).await;
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
                    _ = tx.closed() => return,
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
    ) -> ApiResult<lro::Operation> {
        Ok(Response::new(self.cancel_op(&req.into_inner().name).await?))
    }

    async fn delete_operation(&self, req: Request<proto::DeleteOperationRequest>) -> ApiResult<()> {
        self.delete_op(&req.into_inner().name)?;
        Ok(Response::new(()))
    }
}

#[tonic::async_trait]
impl lro::operations_server::Operations for Api {
    async fn list_operations(
        &self,
        req: Request<lro::ListOperationsRequest>,
    ) -> ApiResult<lro::ListOperationsResponse> {
        let r = req.into_inner();
        if !r.name.is_empty() && r.name != OPERATIONS {
            return Err(invalid(format!(
                "name {:?}: imaged has one collection of operations; leave name empty",
                r.name
            ))
            .with_field("name")
            .into());
        }
        let (operations, next_page_token) = self
            .list_ops(r.page_size, &r.page_token, &r.filter, "")
            .await?;
        Ok(Response::new(lro::ListOperationsResponse {
            operations,
            next_page_token,
        }))
    }

    async fn get_operation(
        &self,
        req: Request<lro::GetOperationRequest>,
    ) -> ApiResult<lro::Operation> {
        Ok(Response::new(self.get_op(&req.into_inner().name).await?))
    }

    async fn delete_operation(&self, req: Request<lro::DeleteOperationRequest>) -> ApiResult<()> {
        self.delete_op(&req.into_inner().name)?;
        Ok(Response::new(()))
    }

    async fn cancel_operation(&self, req: Request<lro::CancelOperationRequest>) -> ApiResult<()> {
        self.cancel_op(&req.into_inner().name).await?;
        Ok(Response::new(()))
    }

    async fn wait_operation(
        &self,
        req: Request<lro::WaitOperationRequest>,
    ) -> ApiResult<lro::Operation> {
        let r = req.into_inner();
        Ok(Response::new(self.wait_op(&r.name, r.timeout).await?))
    }
}
