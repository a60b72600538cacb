//! Image formats, as bytes: the [`Format`] names, the streaming qcow2 encoder ([`qcow2`]) and
//! the [`ByteStream`] type an encoded image travels in.
//!
//! A leaf: nothing here knows the repository, the hypervisor or where the bytes go. The capture
//! pipeline and the exporter produce these formats, the upload targets carry them.

pub mod qcow2;

use crate::error::{invalid, Result};

/// A stream of the bytes of one image object.
pub type ByteStream = std::pin::Pin<
    Box<dyn futures_util::Stream<Item = Result<bytes::Bytes, crate::error::Error>> + Send>,
>;

/// Output formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Qcow2,
    Raw,
}

impl Format {
    /// Parses "qcow2" or "raw".
    pub fn parse(s: &str) -> Result<Format> {
        match s {
            "qcow2" => Ok(Format::Qcow2),
            "raw" => Ok(Format::Raw),
            other => Err(invalid(format!(
                "format {other:?} is not supported: use qcow2 or raw"
            ))),
        }
    }

    /// The name.
    pub fn as_str(self) -> &'static str {
        match self {
            Format::Qcow2 => "qcow2",
            Format::Raw => "raw",
        }
    }
}
