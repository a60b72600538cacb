//! The tests' view of the `imaged.v1` API: thin clients that make the real AIP-style calls
//! (resource names, `google.longrunning.Operation` envelopes) and hand the tests one flat
//! [`proto::Operation`] (the metadata unpacked, the error's code, message and `ErrorInfo`
//! reason), so a test reads like what it checks. Everything else of the generated API is
//! re-exported unchanged in [`proto`].

use tonic::transport::Channel;
use tonic::{Response, Status};

use imaged::cli::view::OpView;
use imaged::proto as pb;

pub mod proto {
    //! The generated `imaged.v1` types, plus the tests' flat requests and operation.
    pub use super::{
        CancelOperationRequest, CaptureRequest, DeleteImageRequest, GetImageRequest,
        GetOperationRequest, ImportRequest, Operation,
    };
    pub use ::imaged::proto::*;
}

/// A capture request with the image ID and domain as bare IDs.
#[derive(Debug, Clone, Default)]
pub struct CaptureRequest {
    pub domain: String,
    pub image_name: String,
    pub request_id: String,
    pub mode: i32,
    pub disk: String,
    /// 0: the server's default.
    pub shutdown_timeout_seconds: u32,
    pub force_off: bool,
    pub restart: bool,
    /// Step names ("dhcp", ..., "all").
    pub prep: Vec<String>,
    pub restore_source: bool,
    pub target: Option<pb::Target>,
}

/// An import request; `format` is "qcow2" or "raw" (anything else is sent as UNSPECIFIED).
#[derive(Debug, Clone, Default)]
pub struct ImportRequest {
    pub path: String,
    pub format: String,
    pub image_name: String,
    pub request_id: String,
}

/// Get/Delete of an image by its ID.
#[derive(Debug, Clone, Default)]
pub struct GetImageRequest {
    pub name: String,
}
pub type DeleteImageRequest = GetImageRequest;

/// Get/Cancel of an operation by its ID.
#[derive(Debug, Clone, Default)]
pub struct GetOperationRequest {
    pub id: String,
}
pub type CancelOperationRequest = GetOperationRequest;

/// An operation's failure.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct OperationError {
    pub code: String,
    pub message: String,
    pub reason: String,
}

/// An operation, flat.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Operation {
    pub id: String,
    pub kind: i32,
    pub state: i32,
    pub done: bool,
    pub domain: String,
    pub image_name: String,
    pub request_id: String,
    pub path: String,
    pub progress: Option<pb::Progress>,
    pub error: Option<OperationError>,
    pub consistency: String,
    pub freeze_window_ms: u64,
    pub prep: Vec<pb::PrepStepReport>,
    pub location: String,
    /// The image in `response`, when the operation made one.
    pub image: Option<pb::Image>,
    /// Live captures: how the disk was read.
    pub read: Option<pb::ReadReport>,
}

impl From<&pb::google::longrunning::Operation> for Operation {
    fn from(o: &pb::google::longrunning::Operation) -> Operation {
        let v = OpView::from_lro(o);
        let m = &v.meta;
        Operation {
            id: v.id.clone(),
            kind: m.kind,
            state: m.state,
            done: v.done,
            domain: imaged::cli::view::id(&m.domain).to_string(),
            image_name: v.image_name().to_string(),
            request_id: m.request_id.clone(),
            path: m.path.clone(),
            progress: m.progress,
            error: v.error.as_ref().map(|e| OperationError {
                code: e.code.clone(),
                message: e.message.clone(),
                reason: e.reason.clone(),
            }),
            consistency: match pb::Consistency::try_from(m.consistency) {
                Ok(pb::Consistency::Cold) => "cold",
                Ok(pb::Consistency::Quiesced) => "quiesced",
                Ok(pb::Consistency::CrashConsistent) => "crash-consistent",
                Ok(pb::Consistency::Imported) => "imported",
                _ => "",
            }
            .to_string(),
            freeze_window_ms: m
                .freeze_window
                .map_or(0, |d| d.seconds as u64 * 1000 + d.nanos as u64 / 1_000_000),
            prep: m.prep_steps.clone(),
            location: m.location.clone(),
            image: v.image.clone(),
            read: m.read.clone(),
        }
    }
}

fn flat(r: Response<pb::google::longrunning::Operation>) -> Response<Operation> {
    Response::new(Operation::from(r.get_ref()))
}

fn format_enum(f: &str) -> i32 {
    match f {
        "qcow2" => pb::ImageFormat::Qcow2 as i32,
        "raw" => pb::ImageFormat::Raw as i32,
        _ => pb::ImageFormat::Unspecified as i32,
    }
}

/// Step names to the API's enum ("all" is the four steps; an unknown name is sent as 0, which
/// the server refuses).
pub fn prep_enums(names: &[String]) -> Vec<i32> {
    use pb::PrepStep as P;
    let mut out = Vec::new();
    for n in names.iter().flat_map(|n| n.split(',')) {
        let steps: Vec<P> = match n {
            "all" => vec![
                P::Dhcp,
                P::UdevNetRules,
                P::SetpasswdHook,
                P::FstabDataDisks,
            ],
            "dhcp" => vec![P::Dhcp],
            "udev-net-rules" => vec![P::UdevNetRules],
            "setpasswd-hook" => vec![P::SetpasswdHook],
            "fstab-data-disks" => vec![P::FstabDataDisks],
            _ => vec![P::Unspecified],
        };
        out.extend(steps.into_iter().map(|s| s as i32));
    }
    out
}

/// ImageService, with the tests' requests.
#[derive(Clone)]
pub struct Images(pub pb::image_service_client::ImageServiceClient<Channel>);

impl Images {
    pub async fn capture(&mut self, r: CaptureRequest) -> Result<Response<Operation>, Status> {
        let req = pb::CaptureImageRequest {
            image_id: r.image_name,
            domain: format!("domains/{}", r.domain),
            disk: r.disk,
            mode: r.mode,
            shutdown_timeout: (r.shutdown_timeout_seconds > 0).then(|| prost_types::Duration {
                seconds: i64::from(r.shutdown_timeout_seconds),
                nanos: 0,
            }),
            force_off: r.force_off,
            restart: r.restart,
            prep_steps: prep_enums(&r.prep),
            restore_source: r.restore_source,
            target: r.target,
            description: String::new(),
            request_id: r.request_id,
        };
        self.0.capture_image(req).await.map(flat)
    }

    pub async fn import(&mut self, r: ImportRequest) -> Result<Response<Operation>, Status> {
        let req = pb::ImportImageRequest {
            image_id: r.image_name,
            path: r.path,
            format: format_enum(&r.format),
            description: String::new(),
            request_id: r.request_id,
        };
        self.0.import_image(req).await.map(flat)
    }

    /// `name` is the image ID.
    pub async fn export_image(
        &mut self,
        mut r: pb::ExportImageRequest,
    ) -> Result<Response<Operation>, Status> {
        if !r.name.starts_with("images/") {
            r.name = format!("images/{}", r.name);
        }
        self.0.export_image(r).await.map(flat)
    }

    pub async fn get_image(&mut self, r: GetImageRequest) -> Result<Response<pb::Image>, Status> {
        self.0
            .get_image(pb::GetImageRequest {
                name: format!("images/{}", r.name),
            })
            .await
    }

    pub async fn delete_image(&mut self, r: GetImageRequest) -> Result<Response<()>, Status> {
        self.0
            .delete_image(pb::DeleteImageRequest {
                name: format!("images/{}", r.name),
            })
            .await
    }
}

/// What [`Ops::list_operations`] returns.
#[derive(Debug, Clone, Default)]
pub struct OperationList {
    pub operations: Vec<Operation>,
}

/// OperationService, by operation ID.
#[derive(Clone)]
pub struct Ops(pub pb::operation_service_client::OperationServiceClient<Channel>);

impl Ops {
    pub async fn get_operation(
        &mut self,
        r: GetOperationRequest,
    ) -> Result<Response<Operation>, Status> {
        self.0
            .get_operation(pb::GetOperationRequest {
                name: format!("operations/{}", r.id),
            })
            .await
            .map(flat)
    }

    /// Every operation (all pages), newest first.
    pub async fn list_operations(
        &mut self,
        mut r: pb::ListOperationsRequest,
    ) -> Result<Response<OperationList>, Status> {
        let mut operations = Vec::new();
        loop {
            let page = self.0.list_operations(r.clone()).await?.into_inner();
            operations.extend(page.operations.iter().map(Operation::from));
            if page.next_page_token.is_empty() {
                break;
            }
            r.page_token = page.next_page_token;
        }
        Ok(Response::new(OperationList { operations }))
    }

    pub async fn cancel_operation(
        &mut self,
        r: GetOperationRequest,
    ) -> Result<Response<Operation>, Status> {
        self.0
            .cancel_operation(pb::CancelOperationRequest {
                name: format!("operations/{}", r.id),
            })
            .await
            .map(flat)
    }
}
