//! Remote byte-stream targets: a captured image leaves the host as one qcow2 or raw byte stream
//! of known size, read once, straight into an image service, with no temp copy on this host.
//!
//! The producer (the capture pipeline) hands a target an [`UploadMeta`] and a [`StreamFactory`]:
//! a closure that makes a fresh stream of the whole object from its first byte. A target that has
//! to restart an upload from scratch (Glance cannot resume) calls the factory again; a target
//! that can resend a piece from its own buffer (S3 parts) calls it once.
//!
//! Every target follows the same order:
//!
//! 1. [`StreamTarget::check`]: reachability, credentials and the destination (Glance image API,
//!    S3 bucket) are verified *before* any disk byte is read, so a typo in the config fails in
//!    a second, not after the guest was shut down and half its disk was read.
//! 2. [`StreamTarget::upload`]: the bytes are streamed while sha256 (and, for Glance, sha512)
//!    and the length are computed on the fly; the stream must have exactly `meta.size` bytes. The result is
//!    verified against what the server reports (Glance: `size` and `os_hash_value`; S3: the
//!    object's length).
//! 3. On any failure (server error, connection cut, stall, verification mismatch, an error from
//!    the producer's stream) the half-made object is removed (Glance image deleted, S3
//!    multipart upload aborted) and the error says what happened and what was cleaned up.
//!
//! Timeouts: connecting is bounded by `connect_timeout_secs`; a transfer that makes no progress
//! (no body bytes taken by the socket, no answer from the server) for `stall_timeout_secs`
//! fails. Waiting for the *producer* never counts as a stall: a slow disk is not a dead network.
//!
//! Secrets (passwords, secret keys, tokens, signed URLs) never appear in messages or logs:
//! [`Secret`] prints as `***`, and HTTP client errors are stripped of their URL, since an S3
//! presigned URL is itself a credential.
//!
//! Targets: [`glance`] (OpenStack Glance v2) and [`s3`] (S3 multipart upload); a
//! [`TargetConfig`] from a config file builds either. The one remote target that is not a byte
//! stream is [`imagerepo`]: a central repository that is sent only the chunks it lacks (it is
//! a chunk store of the capture pipeline, see its module).

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use crate::error::Error;

mod defaults;
pub mod file;
pub mod glance;
mod http;
pub mod imagerepo;
pub mod s3;

pub use crate::format::ByteStream;

/// Makes a fresh stream of the whole object from its first byte (called again for a
/// whole-upload retry).
pub type StreamFactory<'a> = &'a (dyn Fn() -> ByteStream + Send + Sync);

/// What is being uploaded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UploadMeta {
    /// Image name (Glance image name; S3 object `{prefix}{name}.{format}`).
    pub name: String,
    /// `"qcow2"` or `"raw"`.
    pub format: String,
    /// Exact byte length of the stream.
    pub size: u64,
    /// Image properties (Glance extra properties; S3 `x-amz-meta-*`).
    pub properties: BTreeMap<String, String>,
}

/// Where the image went and what was sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Uploaded {
    /// Glance image id, or `s3://bucket/key`.
    pub location: String,
    /// Bytes sent (= `meta.size`).
    pub size: u64,
    /// sha256 of the bytes sent, lowercase hex.
    pub sha256: String,
    /// sha512 of the bytes sent, lowercase hex: where the destination checks one (Glance).
    pub sha512: Option<String>,
}

/// A remote destination for one image byte stream.
#[tonic::async_trait]
pub trait StreamTarget: Send + Sync {
    /// Names the target for messages, e.g. `glance http://127.0.0.1:9292` (no secrets).
    fn describe(&self) -> String;
    /// Reachability + credentials + destination (bucket), before any disk byte is read.
    async fn check(&self) -> Result<(), Error>;
    /// Streams the object made by `body` and verifies it; cleans up on failure.
    async fn upload(&self, meta: &UploadMeta, body: StreamFactory<'_>) -> Result<Uploaded, Error>;
}

/// The protocol of a remote destination (Glance, S3), shared through an `Arc` by its handle
/// and the tasks it spawns (clean-ups, parts).
#[tonic::async_trait]
pub(crate) trait Protocol: Send + Sync + 'static {
    /// See [`StreamTarget::describe`].
    fn describe(&self) -> String;
    /// See [`StreamTarget::check`].
    async fn check(&self) -> Result<(), Error>;
    /// See [`StreamTarget::upload`]; `meta` was checked already.
    async fn upload(
        this: &Arc<Self>,
        meta: &UploadMeta,
        body: StreamFactory<'_>,
    ) -> Result<Uploaded, Error>;
}

/// The public handle of a remote destination ([`glance::Glance`], [`s3::S3`]): its protocol.
/// Every handle is a [`StreamTarget`] the same way: the upload's metadata is checked, then the
/// protocol runs.
pub(crate) trait Remote: Send + Sync {
    type Protocol: Protocol;

    fn protocol(&self) -> &Arc<Self::Protocol>;
}

#[tonic::async_trait]
impl<R: Remote> StreamTarget for R {
    fn describe(&self) -> String {
        self.protocol().describe()
    }

    async fn check(&self) -> Result<(), Error> {
        self.protocol().check().await
    }

    async fn upload(&self, meta: &UploadMeta, body: StreamFactory<'_>) -> Result<Uploaded, Error> {
        validate_meta(meta)?;
        Protocol::upload(self.protocol(), meta, body).await
    }
}

/// The settings of one remote target, as written in a config file: `kind = "glance"`,
/// `kind = "s3"` or `kind = "imagerepo"` beside that target's keys ([`glance::GlanceConfig`],
/// [`s3::S3Config`], [`imagerepo::ImagerepoConfig`]).
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum TargetConfig {
    Glance(glance::GlanceConfig),
    S3(s3::S3Config),
    Imagerepo(imagerepo::ImagerepoConfig),
}

/// A built remote target: a byte-stream destination, or a chunk repository.
pub enum Target {
    Stream(Box<dyn StreamTarget>),
    Chunks(imagerepo::ImageRepo),
}

impl Target {
    /// See [`StreamTarget::describe`].
    pub fn describe(&self) -> String {
        match self {
            Target::Stream(t) => t.describe(),
            Target::Chunks(r) => r.describe(),
        }
    }
}

impl TargetConfig {
    /// The `kind` as written in the config.
    pub fn kind(&self) -> &'static str {
        match self {
            TargetConfig::Glance(_) => "glance",
            TargetConfig::S3(_) => "s3",
            TargetConfig::Imagerepo(_) => "imagerepo",
        }
    }

    /// Checks the settings (and reads the files they name) and makes the target (nothing is
    /// contacted yet: see [`StreamTarget::check`], [`imagerepo::ImageRepo::check`]).
    pub fn build(self) -> Result<Target, Error> {
        Ok(match self {
            TargetConfig::Glance(c) => Target::Stream(Box::new(glance::Glance::new(c)?)),
            TargetConfig::S3(c) => Target::Stream(Box::new(s3::S3::new(c)?)),
            TargetConfig::Imagerepo(c) => Target::Chunks(imagerepo::ImageRepo::new(c)?),
        })
    }
}

/// A password, secret key or token: usable through [`Secret::expose`], never printed.
#[derive(Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The value, for the one place that must send it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl From<&str> for Secret {
    fn from(s: &str) -> Self {
        Secret(s.to_string())
    }
}

impl From<String> for Secret {
    fn from(s: String) -> Self {
        Secret(s)
    }
}

/// Checks the parts of [`UploadMeta`] every target relies on.
fn validate_meta(meta: &UploadMeta) -> Result<(), Error> {
    crate::util::validate_image_name(&meta.name)?;
    if meta.format != "qcow2" && meta.format != "raw" {
        return Err(crate::error::invalid(format!(
            "image {}: format {:?} is not uploadable: use qcow2 or raw",
            meta.name, meta.format
        )));
    }
    Ok(())
}

/// Human-readable byte count for messages ("12.0 MiB").
fn human(bytes: u64) -> String {
    crate::util::human_bytes(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_never_prints() {
        let s = Secret::new("hunter2");
        assert_eq!(format!("{s:?}"), "***");
        assert_eq!(s.expose(), "hunter2");
    }

    #[test]
    fn target_config_by_kind() {
        let t: TargetConfig = toml::from_str(
            r#"
            kind = "s3"
            endpoint = "http://127.0.0.1:19000"
            bucket = "images"
            access_key = "ak"
            secret_key = "sk-9"
            "#,
        )
        .unwrap();
        assert!(!format!("{t:?}").contains("sk-9"));
        assert_eq!(
            t.build().unwrap().describe(),
            "s3 http://127.0.0.1:19000 bucket images"
        );
        let t: TargetConfig = toml::from_str(
            r#"
            kind = "glance"
            endpoint = "http://127.0.0.1:19292"
            [auth.headers]
            X-Identity-Status = "Confirmed"
            "#,
        )
        .unwrap();
        assert_eq!(
            t.build().unwrap().describe(),
            "glance http://127.0.0.1:19292"
        );
        // A typo in a key is an error, not a silent default.
        let bad = toml::from_str::<TargetConfig>(
            "kind = \"s3\"\nendpoint = \"http://h\"\nbucket = \"b\"\naccess_key = \"a\"\n\
             secret_key = \"s\"\nparts_in_flite = 2\n",
        );
        assert!(bad.is_err());
    }

    #[test]
    fn human_sizes() {
        assert_eq!(human(12), "12 B");
        assert_eq!(human(12 << 20), "12.0 MiB");
        assert_eq!(human(3 << 30), "3.0 GiB");
    }

    #[test]
    fn meta_validation() {
        let mut m = UploadMeta {
            name: "web-1".into(),
            format: "qcow2".into(),
            size: 1,
            properties: BTreeMap::new(),
        };
        validate_meta(&m).unwrap();
        m.format = "vmdk".into();
        assert_eq!(
            validate_meta(&m).unwrap_err().kind(),
            crate::error::ErrorKind::InvalidArgument
        );
    }
}
