//! What `imagectl` reads out of the API's envelopes: a `google.longrunning.Operation` decoded
//! into one flat [`OpView`] (its metadata unpacked, its error's code, message and
//! `ErrorInfo.reason`), and resource names shortened to the IDs people type.

use prost::Message as _;

use crate::proto;
use crate::proto::google::longrunning as lro;

/// The last segment of a resource name: `images/web1` → `web1`.
pub fn id(name: &str) -> &str {
    name.rsplit_once('/').map_or(name, |(_, id)| id)
}

/// An operation's failure, as a script needs it.
#[derive(Debug, Clone, Default)]
pub struct ErrView {
    /// The gRPC code name, e.g. `FAILED_PRECONDITION`.
    pub code: String,
    pub message: String,
    /// `google.rpc.ErrorInfo.reason`, e.g. `DOMAIN_RUNNING`.
    pub reason: String,
}

/// A decoded operation.
#[derive(Debug, Clone, Default)]
pub struct OpView {
    pub id: String,
    pub done: bool,
    pub meta: proto::OperationMetadata,
    pub error: Option<ErrView>,
    /// The image an operation made (capture to the repository, import).
    pub image: Option<proto::Image>,
    /// A capture to a file or remote target: where it went.
    pub target_location: Option<String>,
}

impl OpView {
    /// Decodes an envelope; unknown metadata or response types are left empty.
    pub fn from_lro(o: &lro::Operation) -> OpView {
        let meta = o
            .metadata
            .as_ref()
            .and_then(|a| proto::OperationMetadata::decode(a.value.as_slice()).ok())
            .unwrap_or_default();
        let mut v = OpView {
            id: id(&o.name).to_string(),
            done: o.done,
            meta,
            ..OpView::default()
        };
        match &o.result {
            Some(lro::operation::Result::Error(st)) => {
                let reason = st
                    .details
                    .iter()
                    .filter(|a| a.type_url.ends_with("/google.rpc.ErrorInfo"))
                    .find_map(|a| tonic_types::pb::ErrorInfo::decode(a.value.as_slice()).ok())
                    .map(|i| i.reason)
                    .unwrap_or_default();
                v.error = Some(ErrView {
                    code: code_name(st.code),
                    message: st.message.clone(),
                    reason,
                });
            }
            Some(lro::operation::Result::Response(a)) => {
                if a.type_url.ends_with("/imaged.v1.Image") {
                    v.image = proto::Image::decode(a.value.as_slice()).ok();
                } else if a.type_url.ends_with("/imaged.v1.TargetResult") {
                    v.target_location = proto::TargetResult::decode(a.value.as_slice())
                        .ok()
                        .map(|t| t.location);
                }
            }
            None => {}
        }
        v
    }

    /// The image's ID ("" when none).
    pub fn image_name(&self) -> &str {
        id(&self.meta.image)
    }

    /// The progress (zeros when absent).
    pub fn progress(&self) -> proto::Progress {
        self.meta.progress.unwrap_or_default()
    }
}

/// The gRPC code name of a numeric code (`FAILED_PRECONDITION`).
pub fn code_name(code: i32) -> String {
    let c = tonic::Code::from_i32(code);
    let dbg = format!("{c:?}");
    // CamelCase to UPPER_SNAKE: FailedPrecondition -> FAILED_PRECONDITION.
    let mut out = String::new();
    for (i, ch) in dbg.chars().enumerate() {
        if ch.is_uppercase() && i > 0 {
            out.push('_');
        }
        out.push(ch.to_ascii_uppercase());
    }
    out
}

/// The `ErrorInfo.reason` of a failed call ("" when it has none).
pub fn status_reason(s: &tonic::Status) -> String {
    use tonic_types::StatusExt;
    s.get_error_details()
        .error_info()
        .map(|i| i.reason.clone())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_names_are_upper_snake() {
        assert_eq!(code_name(9), "FAILED_PRECONDITION");
        assert_eq!(code_name(5), "NOT_FOUND");
        assert_eq!(code_name(1), "CANCELLED");
        assert_eq!(id("images/web1"), "web1");
        assert_eq!(id("web1"), "web1");
    }
}
