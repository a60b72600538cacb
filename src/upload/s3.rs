//! S3 (and S3-compatible: Ceph RGW, MinIO, s3s) as a stream target, by multipart upload.
//!
//! Protocol flow of one upload (`upload` of [`S3`] as a [`StreamTarget`](super::StreamTarget)),
//! every request signed with SigV4 presigned URLs (rusty-s3) and sent by the shared executor
//! (`upload::http`):
//!
//! 1. `HEAD` the object `{prefix}{name}.{format}`: an existing object is refused
//!    (ALREADY_EXISTS) unless `overwrite` is set.
//! 2. `CreateMultipartUpload` (`POST ?uploads`) with the object metadata as signed
//!    `x-amz-meta-*` headers: `size`, `format` and every caller property (names lowercased,
//!    `_` and other signs become `-`; values that are not plain printable ASCII are sent
//!    RFC 2047-encoded, `=?UTF-8?B?…?=`, as S3 itself does).
//! 3. The producer's stream is cut into parts as it arrives: part size
//!    `max(min_part_size_mib, ceil(size / 9000))` rounded up to 1 MiB, so the 10,000-part limit
//!    is never reached. A part is the stream's own pieces, not a copy; it is uploaded
//!    (`UploadPart`) while the next one fills; at most `parts_in_flight` parts are on the wire,
//!    so memory holds at most `parts_in_flight + 1` parts. A part that fails on the network,
//!    stalls or gets a 5xx is resent from its pieces up to `part_retries` times with backoff; a
//!    4xx is final. The sha256 and the length of the whole stream are computed on the way, the
//!    hash on a thread of its own.
//! 4. The object's sha256 is only known after the last byte, when the metadata can no longer
//!    change, so it goes into a companion object `{key}.sha256` in `sha256sum` format
//!    (`<hex>  <name>.<format>`), written *before* the upload is completed: whoever sees the
//!    object also sees its checksum (`sha256sum -c` verifies a download). The caller's
//!    properties (e.g. the raw image's content digest) are on the object itself.
//!    `checksum_object = false` turns the companion off.
//! 5. `CompleteMultipartUpload` with the parts' ETags in order (a 200 whose body is an
//!    `<Error>` is a failure), then `HEAD` the object: its length must be `size`.
//!
//! On any failure after step 2 the multipart upload is aborted (`AbortMultipartUpload`), so no
//! orphan parts are left to be stored and paid for, and the companion object is deleted; the
//! error says what happened and whether the abort went through. Dropping the upload future (a
//! cancelled operation) aborts it the same way, from a task spawned on the runtime. (A bucket
//! lifecycle rule
//! `AbortIncompleteMultipartUpload` is the server-side safety net for a host that dies
//! mid-upload.)
//!
//! No per-part checksum is sent: integrity in transit rests on TCP/TLS, and the end result is
//! checked by length; the sha256 companion lets any reader verify the bytes.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::future::BoxFuture;
use futures_util::StreamExt;
use reqwest::header::{CONTENT_LENGTH, CONTENT_TYPE, ETAG};
use reqwest::StatusCode;
use rusty_s3::actions::{CompleteMultipartUploadResponse, CreateMultipartUpload};
use rusty_s3::{Bucket, Credentials, S3Action, UrlStyle};
use serde::Deserialize;
use tokio::task::JoinSet;

use super::defaults;
use super::http::{self, CleanupGuard, Executor, Failure, Progress, RetryPolicy, Undo};
use super::{human, Protocol, Remote, Secret, StreamFactory, UploadMeta, Uploaded};
use crate::error::{invalid, Error, ErrorKind};

/// Settings of an S3 target.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct S3Config {
    /// Service URL, e.g. `https://s3.eu-west-1.amazonaws.com` or `http://rgw:7480`.
    pub endpoint: String,
    #[serde(default = "defaults::s3_region")]
    pub region: String,
    pub bucket: String,
    /// Prepended to every object key (e.g. `images/`).
    #[serde(default)]
    pub prefix: String,
    pub access_key: String,
    pub secret_key: Secret,
    /// Temporary credentials' session token.
    #[serde(default)]
    pub session_token: Option<Secret>,
    /// `http://host/bucket/key` (true) or `http://bucket.host/key` (false).
    #[serde(default = "defaults::yes")]
    pub path_style: bool,
    /// Replace an existing object of the same name.
    #[serde(default)]
    pub overwrite: bool,
    /// Smallest part size; raised for big objects so no more than 9000 parts are needed.
    #[serde(default = "defaults::s3_min_part_size_mib")]
    pub min_part_size_mib: u64,
    /// Parts uploading at once (1 to 8); memory holds this many parts plus one.
    #[serde(default = "defaults::s3_parts_in_flight")]
    pub parts_in_flight: usize,
    /// Resends of a failed part (network error, stall, 5xx).
    #[serde(default = "defaults::s3_part_retries")]
    pub part_retries: u32,
    /// First retry delay; doubles each time, at most 8 s.
    #[serde(default = "defaults::s3_retry_backoff_ms")]
    pub retry_backoff_ms: u64,
    /// Write the `{key}.sha256` companion object.
    #[serde(default = "defaults::yes")]
    pub checksum_object: bool,
    #[serde(default = "defaults::connect_timeout_secs")]
    pub connect_timeout_secs: u64,
    /// A transfer with no progress for this long fails.
    #[serde(default = "defaults::stall_timeout_secs")]
    pub stall_timeout_secs: u64,
    /// How long the server may take to assemble the parts (CompleteMultipartUpload).
    #[serde(default = "defaults::s3_complete_timeout_secs")]
    pub complete_timeout_secs: u64,
}

impl S3Config {
    /// A config with every optional setting at its default.
    pub fn new(
        endpoint: impl Into<String>,
        bucket: impl Into<String>,
        access_key: impl Into<String>,
        secret_key: impl Into<Secret>,
    ) -> Self {
        S3Config {
            endpoint: endpoint.into(),
            region: defaults::s3_region(),
            bucket: bucket.into(),
            prefix: String::new(),
            access_key: access_key.into(),
            secret_key: secret_key.into(),
            session_token: None,
            path_style: true,
            overwrite: false,
            min_part_size_mib: defaults::s3_min_part_size_mib(),
            parts_in_flight: defaults::s3_parts_in_flight(),
            part_retries: defaults::s3_part_retries(),
            retry_backoff_ms: defaults::s3_retry_backoff_ms(),
            checksum_object: true,
            connect_timeout_secs: defaults::connect_timeout_secs(),
            stall_timeout_secs: defaults::stall_timeout_secs(),
            complete_timeout_secs: defaults::s3_complete_timeout_secs(),
        }
    }
}

/// Presigned URLs are made right before each request; this only has to outlive one request.
const SIGN_EXPIRY: Duration = Duration::from_secs(3600);
const MIB: u64 = 1 << 20;
/// S3's limit on parts per upload, and the most a part number can be.
const MAX_PARTS: u64 = 10_000;
/// S3's limit on the user metadata of an object (names without `x-amz-meta-`, plus values).
const MAX_METADATA: usize = 2048;

/// The part size for an object of `size` bytes: at least `min_mib` MiB, big enough that 9000
/// parts hold it, a whole number of MiB.
pub fn part_size(size: u64, min_mib: u64) -> u64 {
    let min = min_mib.max(5) * MIB;
    let need = size.div_ceil(9000).div_ceil(MIB) * MIB;
    need.max(min)
}

/// The S3 target.
pub struct S3 {
    inner: Arc<Inner>,
}

impl Remote for S3 {
    type Protocol = Inner;

    fn protocol(&self) -> &Arc<Inner> {
        &self.inner
    }
}

pub(crate) struct Inner {
    cfg: S3Config,
    bucket: Bucket,
    creds: Credentials,
    http: Executor,
    endpoint: String,
}

/// What an upload created so far, for the cleanup. Its [`CleanupGuard`] is disarmed once
/// CompleteMultipartUpload went through (the object is whole, nothing to abort); while armed,
/// dropping it (the upload future was dropped: a cancelled operation) aborts the upload, as
/// after a failure.
struct Made {
    inner: Arc<Inner>,
    key: String,
    upload_id: String,
    companion: Option<String>,
}

impl Undo for Made {
    fn cancelled(&self) {
        tracing::warn!(upload_id = %self.upload_id, object = %self.inner.location(&self.key),
            "s3 upload cancelled: aborting it");
    }

    fn stranded(&self) {
        tracing::error!(upload_id = %self.upload_id,
            "s3 upload dropped outside a runtime: its multipart upload is left behind");
    }

    fn undo(&self) -> BoxFuture<'static, ()> {
        let (inner, key, upload_id, companion) = (
            Arc::clone(&self.inner),
            self.key.clone(),
            self.upload_id.clone(),
            self.companion.clone(),
        );
        Box::pin(async move {
            // Parts still on the wire when the upload was dropped may land after a first
            // abort (S3 documents this): abort again a moment later.
            let first = inner.abort(&key, &upload_id).await;
            tokio::time::sleep(Duration::from_secs(1)).await;
            let second = inner.abort(&key, &upload_id).await;
            if let (Err(e), Err(_)) = (first, second) {
                tracing::error!(upload_id = %upload_id, error = %e.chain(),
                    "could not abort the multipart upload of a cancelled upload");
            }
            if let Some(c) = companion {
                let _ = inner.delete_object(&c).await;
            }
        })
    }
}

impl S3 {
    /// Checks the settings and builds the HTTP client (nothing is contacted yet).
    pub fn new(cfg: S3Config) -> Result<Self, Error> {
        let url = http::check_url("s3", "endpoint", &cfg.endpoint)?;
        if cfg.bucket.is_empty() {
            return Err(invalid("s3 target: bucket is empty"));
        }
        if cfg.access_key.is_empty() || cfg.secret_key.expose().is_empty() {
            return Err(invalid("s3 target: access_key and secret_key are required"));
        }
        if !(1..=8).contains(&cfg.parts_in_flight) {
            return Err(invalid("s3 target: parts_in_flight must be 1 to 8"));
        }
        if !(5..=5120).contains(&cfg.min_part_size_mib) {
            return Err(invalid(
                "s3 target: min_part_size_mib must be 5 to 5120 (S3's part size limits)",
            ));
        }
        if cfg.stall_timeout_secs == 0
            || cfg.connect_timeout_secs == 0
            || cfg.complete_timeout_secs == 0
        {
            return Err(invalid("s3 target: timeouts must be at least 1 s"));
        }
        let style = if cfg.path_style {
            UrlStyle::Path
        } else {
            UrlStyle::VirtualHost
        };
        let bucket = Bucket::new(url, style, cfg.bucket.clone(), cfg.region.clone())
            .map_err(|e| invalid(format!("s3 target: bucket {:?}: {e}", cfg.bucket)))?;
        let creds = match &cfg.session_token {
            Some(t) => Credentials::new_with_token(
                cfg.access_key.clone(),
                cfg.secret_key.expose(),
                t.expose(),
            ),
            None => Credentials::new(cfg.access_key.clone(), cfg.secret_key.expose()),
        };
        let http = Executor::new(
            Duration::from_secs(cfg.connect_timeout_secs),
            Duration::from_secs(cfg.stall_timeout_secs),
        )?;
        let endpoint = cfg.endpoint.trim_end_matches('/').to_string();
        Ok(S3 {
            inner: Arc::new(Inner {
                cfg,
                bucket,
                creds,
                http,
                endpoint,
            }),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &S3Config {
        &self.inner.cfg
    }

    /// The object key an upload of `meta` writes.
    pub fn key_for(&self, meta: &UploadMeta) -> String {
        self.inner.key_for(meta)
    }
}

impl std::fmt::Debug for S3 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3")
            .field("config", &self.inner.cfg)
            .finish_non_exhaustive()
    }
}

/// `(Code, Message)` of an S3 XML error body.
fn s3_error_fields(body: &str) -> (String, String) {
    fn field(body: &str, tag: &str) -> String {
        let open = format!("<{tag}>");
        let close = format!("</{tag}>");
        body.find(&open)
            .and_then(|i| {
                let rest = &body[i + open.len()..];
                rest.find(&close).map(|j| rest[..j].to_string())
            })
            .unwrap_or_default()
    }
    (field(body, "Code"), http::excerpt(&field(body, "Message")))
}

/// RFC 2047 "B" encoding of a UTF-8 value (what S3 returns for non-ASCII metadata).
fn rfc2047(value: &str) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let b = value.as_bytes();
    let mut out = String::from("=?UTF-8?B?");
    for c in b.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        out.push(T[(n >> 18) as usize & 63] as char);
        out.push(T[(n >> 12) as usize & 63] as char);
        out.push(if c.len() > 1 {
            T[(n >> 6) as usize & 63] as char
        } else {
            '='
        });
        out.push(if c.len() > 2 {
            T[n as usize & 63] as char
        } else {
            '='
        });
    }
    out.push_str("?=");
    out
}

/// A header-safe metadata value: plain printable ASCII with single inner spaces is sent as is
/// (SigV4 canonicalization trims and collapses spaces, so anything else would break the
/// signature), everything else RFC 2047-encoded.
fn meta_value(v: &str) -> String {
    let plain = !v.is_empty()
        && v.bytes().all(|b| (0x20..0x7f).contains(&b))
        && !v.starts_with(' ')
        && !v.ends_with(' ')
        && !v.contains("  ")
        && !v.starts_with("=?");
    if plain {
        v.to_string()
    } else {
        rfc2047(v)
    }
}

/// The `x-amz-meta-*` headers of an upload (lowercase names, as signed).
fn metadata_headers(meta: &UploadMeta) -> Result<Vec<(String, String)>, Error> {
    let mut out = vec![
        ("size".to_string(), meta.size.to_string()),
        ("format".to_string(), meta.format.clone()),
    ];
    let mut seen: BTreeSet<String> = out.iter().map(|(k, _)| k.clone()).collect();
    for (k, v) in &meta.properties {
        let name: String = k
            .chars()
            .map(|c| {
                let c = c.to_ascii_lowercase();
                if c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' {
                    c
                } else {
                    '-'
                }
            })
            .collect();
        if name.is_empty() || !seen.insert(name.clone()) {
            return Err(invalid(format!(
                "image {}: property {k:?} becomes the S3 metadata name x-amz-meta-{name}, \
                 which is empty or already used",
                meta.name
            )));
        }
        out.push((name, meta_value(v)));
    }
    let total: usize = out.iter().map(|(k, v)| k.len() + v.len()).sum();
    if total > MAX_METADATA {
        return Err(invalid(format!(
            "image {}: the properties make {total} bytes of S3 metadata; S3 allows {MAX_METADATA}",
            meta.name
        )));
    }
    Ok(out
        .into_iter()
        .map(|(k, v)| (format!("x-amz-meta-{k}"), v))
        .collect())
}

impl Inner {
    fn key_for(&self, meta: &UploadMeta) -> String {
        format!("{}{}.{}", self.cfg.prefix, meta.name, meta.format)
    }

    fn location(&self, key: &str) -> String {
        format!("s3://{}/{key}", self.cfg.bucket)
    }

    /// The error for an S3 answer that is not a success.
    fn answer_error(&self, what: &str, status: StatusCode, body: &str) -> Error {
        let (code, message) = s3_error_fields(body);
        let b = &self.cfg.bucket;
        let (kind, hint) = match (status, code.as_str()) {
            (_, "NoSuchBucket") => (
                ErrorKind::FailedPrecondition,
                format!("bucket {b} does not exist at {}", self.endpoint),
            ),
            (_, "InvalidAccessKeyId" | "SignatureDoesNotMatch") => (
                ErrorKind::FailedPrecondition,
                "credentials rejected: wrong access key or secret key".to_string(),
            ),
            (StatusCode::FORBIDDEN, _) => (
                ErrorKind::FailedPrecondition,
                "access denied: wrong credentials or no permission".to_string(),
            ),
            (StatusCode::NOT_FOUND, _) => (ErrorKind::NotFound, "not found".to_string()),
            (s, _) => (http::status_kind(s), String::new()),
        };
        let code = if code.is_empty() {
            String::new()
        } else {
            format!(" {code}")
        };
        let detail = [hint, message]
            .into_iter()
            .filter(|s| !s.is_empty())
            .collect::<Vec<_>>()
            .join(": ");
        Error::new(
            kind,
            format!(
                "{what}: S3 answered {status}{code}{}",
                if detail.is_empty() {
                    String::new()
                } else {
                    format!(" ({detail})")
                }
            ),
        )
    }

    /// The object's length, or `None` when it does not exist (or cannot be seen).
    async fn head_object(&self, key: &str) -> Result<Option<u64>, Error> {
        let what = format!("s3 {}: HEAD {}", self.endpoint, self.location(key));
        let url = self
            .bucket
            .head_object(Some(&self.creds), key)
            .sign(SIGN_EXPIRY);
        let resp = self.http.send(&what, self.http.client().head(url)).await?;
        match resp.status() {
            s if s.is_success() => Ok(Some(
                resp.headers()
                    .get(CONTENT_LENGTH)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0),
            )),
            StatusCode::NOT_FOUND => Ok(None),
            // Without ListBucket permission S3 says 403 for a missing key: carry on, the
            // CreateMultipartUpload that follows tells a real credential problem.
            StatusCode::FORBIDDEN => Ok(None),
            s => Err(self.answer_error(&what, s, "")),
        }
    }

    async fn create_upload(
        &self,
        key: &str,
        headers: &[(String, String)],
    ) -> Result<String, Error> {
        let what = format!(
            "s3 {}: CreateMultipartUpload {}",
            self.endpoint,
            self.location(key)
        );
        let mut action = CreateMultipartUpload::new(&self.bucket, Some(&self.creds), key);
        for (k, v) in headers {
            action.headers_mut().insert(k.clone(), v.clone());
        }
        let url = action.sign(SIGN_EXPIRY);
        let mut rb = self
            .http
            .client()
            .post(url)
            .header(CONTENT_TYPE, "application/octet-stream");
        for (k, v) in headers {
            rb = rb.header(k.as_str(), v.as_str());
        }
        let http::Answer { status, text, .. } = self.http.call(&what, rb).await?;
        if !status.is_success() {
            return Err(self.answer_error(&what, status, &text));
        }
        let parsed = CreateMultipartUpload::parse_response(&text).map_err(|e| {
            Error::new(
                ErrorKind::Internal,
                format!("{what}: unreadable answer: {}", http::excerpt(&text)),
            )
            .with_source(e)
        })?;
        Ok(parsed.upload_id().to_string())
    }

    /// Resends of a failed part, the companion or the completion: `part_retries` after the
    /// first attempt.
    fn retry_policy(&self) -> RetryPolicy {
        RetryPolicy::new(
            self.cfg.part_retries + 1,
            Duration::from_millis(self.cfg.retry_backoff_ms),
        )
    }

    /// The failure of an S3 answer that is not a success: retryable when transient.
    fn answer_failure(&self, what: &str, answer: &http::Answer) -> Failure {
        Failure::answer(
            self.answer_error(what, answer.status, &answer.text),
            answer.status,
        )
    }

    /// Uploads one part from its buffer, resending it on transient failures.
    async fn upload_part(
        self: Arc<Self>,
        key: String,
        upload_id: String,
        number: u16,
        data: Arc<[Bytes]>,
    ) -> Result<(u16, String), Error> {
        let len: usize = data.iter().map(Bytes::len).sum();
        let what = format!(
            "s3 {}: part {number} ({}) of {}",
            self.endpoint,
            human(len as u64),
            self.location(&key)
        );
        let once = |_| async {
            let url = self
                .bucket
                .upload_part(Some(&self.creds), &key, number, &upload_id)
                .sign(SIGN_EXPIRY);
            let progress = Progress::new();
            let body = http::BufferBody::new(data.clone(), progress.clone());
            let req = self
                .http
                .client()
                .put(url)
                .header(CONTENT_LENGTH, len)
                .body(reqwest::Body::wrap_stream(body));
            let resp = self.http.send_streamed(&what, req, &progress, None).await?;
            let answer = self.http.read(resp).await;
            let etag = answer
                .headers
                .get(ETAG)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            match (answer.status.is_success(), etag) {
                (true, Some(etag)) => Ok((number, etag)),
                (true, None) => Err(Failure::fatal(Error::new(
                    ErrorKind::Internal,
                    format!("{what}: S3 answered {} without an ETag", answer.status),
                ))),
                (false, _) => Err(self.answer_failure(&what, &answer)),
            }
        };
        let told = |r: &http::Retry<'_>| {
            tracing::warn!(part = number, attempt = r.attempt, attempts = r.attempts,
                error = %r.error.chain(), retry_in_ms = r.wait.as_millis() as u64,
                "s3 part upload failed, resending it");
        };
        self.retry_policy().run(once, told).await.map_err(|g| {
            if !g.retryable {
                return g.error;
            }
            Error::new(
                g.error.kind(),
                format!("part {number} failed {} times, giving up", g.attempts),
            )
            .with_source(g.error)
        })
    }

    /// A small object (the sha256 companion), retried like a part.
    async fn put_small(&self, key: &str, body: String) -> Result<(), Error> {
        let what = format!("s3 {}: PUT {}", self.endpoint, self.location(key));
        let once = |_| async {
            let url = self
                .bucket
                .put_object(Some(&self.creds), key)
                .sign(SIGN_EXPIRY);
            let rb = self
                .http
                .client()
                .put(url)
                .header(CONTENT_TYPE, "text/plain")
                .body(body.clone());
            let answer = self.http.call(&what, rb).await.map_err(Failure::of)?;
            if answer.status.is_success() {
                return Ok(());
            }
            Err(self.answer_failure(&what, &answer))
        };
        self.retry_policy()
            .run(once, |_| {})
            .await
            .map_err(|g| g.error)
    }

    async fn delete_object(&self, key: &str) -> Result<(), Error> {
        let what = format!("s3 {}: DELETE {}", self.endpoint, self.location(key));
        let url = self
            .bucket
            .delete_object(Some(&self.creds), key)
            .sign(SIGN_EXPIRY);
        let answer = self
            .http
            .call(&what, self.http.client().delete(url))
            .await?;
        if answer.status.is_success() || answer.status == StatusCode::NOT_FOUND {
            Ok(())
        } else {
            Err(self.answer_error(&what, answer.status, &answer.text))
        }
    }

    /// `CompleteMultipartUpload`; a lost answer is settled by looking at the object.
    async fn complete(
        &self,
        key: &str,
        upload_id: &str,
        etags: &[String],
        size: u64,
    ) -> Result<(), Error> {
        let what = format!(
            "s3 {}: CompleteMultipartUpload of {} ({} parts)",
            self.endpoint,
            self.location(key),
            etags.len()
        );
        let once = |attempt: u32| {
            let what = &what;
            async move {
                let action = self.bucket.complete_multipart_upload(
                    Some(&self.creds),
                    key,
                    upload_id,
                    etags.iter().map(String::as_str),
                );
                let url = action.sign(SIGN_EXPIRY);
                let rb = self
                    .http
                    .client()
                    .post(url)
                    .header(CONTENT_TYPE, "application/xml")
                    .body(action.body());
                let timeout = Duration::from_secs(self.cfg.complete_timeout_secs);
                let answer = self
                    .http
                    .call_within(what, rb, timeout)
                    .await
                    .map_err(Failure::of)?;
                if answer.status.is_success() {
                    return match CompleteMultipartUploadResponse::parse(&answer.text) {
                        Ok(_) => Ok(()),
                        Err(_) => Err(Failure::fatal({
                            let mut e = self.answer_error(what, answer.status, &answer.text);
                            if e.kind() == ErrorKind::Internal {
                                e = Error::new(ErrorKind::Unavailable, e.to_string());
                            }
                            e
                        })),
                    };
                }
                let (code, _) = s3_error_fields(&answer.text);
                if attempt > 1 && code == "NoSuchUpload" {
                    // An earlier try completed it but its answer was lost.
                    if self.head_object(key).await.map_err(Failure::fatal)? == Some(size) {
                        return Ok(());
                    }
                }
                Err(self.answer_failure(what, &answer))
            }
        };
        let told = |r: &http::Retry<'_>| {
            tracing::warn!(attempt = r.attempt, attempts = r.attempts, error = %r.error.chain(),
                "s3 complete failed, retrying");
        };
        self.retry_policy()
            .run(once, told)
            .await
            .map_err(|g| g.error)
    }

    async fn abort(&self, key: &str, upload_id: &str) -> Result<(), Error> {
        let what = format!(
            "s3 {}: AbortMultipartUpload {upload_id} of {}",
            self.endpoint,
            self.location(key)
        );
        let once = |_| async {
            let url = self
                .bucket
                .abort_multipart_upload(Some(&self.creds), key, upload_id)
                .sign(SIGN_EXPIRY);
            let answer = self
                .http
                .call(&what, self.http.client().delete(url))
                .await
                .map_err(Failure::of)?;
            if answer.status.is_success() || answer.status == StatusCode::NOT_FOUND {
                return Ok(());
            }
            Err(self.answer_failure(&what, &answer))
        };
        RetryPolicy::new(3, Duration::from_millis(500))
            .run(once, |_| {})
            .await
            .map_err(|g| g.error)
    }

    /// Step 3: cuts the stream into parts and uploads them (at most `parts_in_flight` at once,
    /// in `tasks`); the parts' ETags in order and the stream's (sha256, length).
    ///
    /// A part is the stream's own pieces (`Bytes`, sliced where a part ends), not a copy, and
    /// the sha256 of the whole stream is computed on a blocking thread beside the sends
    /// ([`http::HashFeed`]): on the two cores this runs on, a copy of every byte and hashing
    /// in line with the cutting each cost as much as the sends.
    async fn send_parts(
        self: &Arc<Self>,
        key: &str,
        upload_id: &str,
        meta: &UploadMeta,
        factory: StreamFactory<'_>,
        tasks: &mut JoinSet<Result<(u16, String), Error>>,
    ) -> Result<(Vec<String>, String, u64), Error> {
        let psize = part_size(meta.size, self.cfg.min_part_size_mib);
        let psize_usize = usize::try_from(psize).map_err(|_| invalid("part size too big"))?;
        let limit = self.cfg.parts_in_flight;
        let mut stream = factory();
        let mut hash = http::HashFeed::spawn(false);
        // The part being filled: its pieces and their length.
        let mut part: (Vec<Bytes>, usize) = (Vec::new(), 0);
        let mut next: u64 = 1;
        let mut etags: BTreeMap<u16, String> = BTreeMap::new();

        async fn join_one(
            tasks: &mut JoinSet<Result<(u16, String), Error>>,
            etags: &mut BTreeMap<u16, String>,
        ) -> Result<(), Error> {
            match tasks.join_next().await {
                Some(Ok(Ok((n, etag)))) => {
                    etags.insert(n, etag);
                    Ok(())
                }
                Some(Ok(Err(e))) => Err(e),
                Some(Err(e)) => Err(Error::new(
                    ErrorKind::Internal,
                    "an S3 part upload task failed",
                )
                .with_source(e)),
                None => Ok(()),
            }
        }

        let dispatch =
            |tasks: &mut JoinSet<_>, number: u64, part: Vec<Bytes>| -> Result<(), Error> {
                if number > MAX_PARTS {
                    return Err(Error::new(
                        ErrorKind::Internal,
                        format!("more than {MAX_PARTS} parts of {}", human(psize)),
                    ));
                }
                tasks.spawn(Arc::clone(self).upload_part(
                    key.to_string(),
                    upload_id.to_string(),
                    number as u16,
                    part.into(),
                ));
                Ok(())
            };

        while let Some(item) = stream.next().await {
            let chunk = item.map_err(|e| {
                let kind = e.kind();
                Error::new(
                    kind,
                    format!("the image stream failed after {}", human(hash.len())),
                )
                .with_source(e)
            })?;
            if hash.len() + chunk.len() as u64 > meta.size {
                return Err(Error::new(
                    ErrorKind::Internal,
                    format!(
                        "the image stream is longer than the announced {} bytes",
                        meta.size
                    ),
                ));
            }
            hash.update(chunk.clone()).await?;
            let mut rest = chunk;
            while !rest.is_empty() {
                let take = (psize_usize - part.1).min(rest.len());
                part.0.push(rest.split_to(take));
                part.1 += take;
                if part.1 == psize_usize {
                    while tasks.len() >= limit {
                        join_one(tasks, &mut etags).await?;
                    }
                    dispatch(tasks, next, std::mem::take(&mut part.0))?;
                    part.1 = 0;
                    next += 1;
                }
            }
        }
        if hash.len() != meta.size {
            return Err(Error::new(
                ErrorKind::Internal,
                format!(
                    "the image stream ended after {} bytes; {} were announced",
                    hash.len(),
                    meta.size
                ),
            ));
        }
        if part.1 > 0 || next == 1 {
            while tasks.len() >= limit {
                join_one(tasks, &mut etags).await?;
            }
            dispatch(tasks, next, part.0)?;
            next += 1;
        }
        while !tasks.is_empty() {
            join_one(tasks, &mut etags).await?;
        }
        let etags: Vec<String> = etags.into_values().collect();
        if etags.len() as u64 != next - 1 {
            return Err(Error::new(
                ErrorKind::Internal,
                format!("{} parts sent, {} acknowledged", next - 1, etags.len()),
            ));
        }
        let (sha256, _, size) = hash.finish().await?;
        Ok((etags, sha256, size))
    }

    /// Steps 3 to 5: the parts, the companion, complete, verify.
    async fn transfer(
        self: &Arc<Self>,
        key: &str,
        meta: &UploadMeta,
        factory: StreamFactory<'_>,
        made: &mut CleanupGuard<Made>,
    ) -> Result<Uploaded, Error> {
        let mut tasks = JoinSet::new();
        let sent = self
            .send_parts(key, &made.upload_id, meta, factory, &mut tasks)
            .await;
        let (etags, sha256, size) = match sent {
            Ok(v) => v,
            Err(e) => {
                // Cancel the parts still on the wire and wait until they are gone, so that the
                // abort that follows does not race with a part being stored.
                tasks.shutdown().await;
                return Err(e);
            }
        };
        if self.cfg.checksum_object {
            let companion = format!("{key}.sha256");
            let file = key.rsplit('/').next().unwrap_or(key);
            made.companion = Some(companion.clone());
            self.put_small(&companion, format!("{sha256}  {file}\n"))
                .await?;
        }
        self.complete(key, &made.upload_id, &etags, size).await?;
        made.disarm();
        match self.head_object(key).await? {
            Some(len) if len == size => {}
            other => {
                let seen = other.map_or("no object".to_string(), |l| format!("{l} bytes"));
                let _ = self.delete_object(key).await;
                return Err(Error::new(
                    ErrorKind::Internal,
                    format!(
                        "{} after completing the upload: {seen}, expected {size} bytes; the object was deleted",
                        self.location(key)
                    ),
                ));
            }
        }
        Ok(Uploaded {
            location: self.location(key),
            size,
            sha256,
            sha512: None,
        })
    }
}

#[tonic::async_trait]
impl Protocol for Inner {
    fn describe(&self) -> String {
        format!("s3 {} bucket {}", self.endpoint, self.cfg.bucket)
    }

    async fn check(&self) -> Result<(), Error> {
        let what = format!("{}: checking bucket {}", self.endpoint, self.cfg.bucket);
        let url = self.bucket.head_bucket(Some(&self.creds)).sign(SIGN_EXPIRY);
        let resp = self
            .http
            .send(&format!("s3 {what}"), self.http.client().head(url))
            .await?;
        let status = resp.status();
        let b = &self.cfg.bucket;
        match status {
            s if s.is_success() => Ok(()),
            StatusCode::NOT_FOUND => Err(Error::new(
                ErrorKind::FailedPrecondition,
                format!("s3 {}: bucket {b} does not exist", self.endpoint),
            )),
            StatusCode::FORBIDDEN | StatusCode::UNAUTHORIZED => Err(Error::new(
                ErrorKind::FailedPrecondition,
                format!(
                    "s3 {}: access to bucket {b} denied ({status}): wrong access key or secret \
                     key, or no permission on the bucket",
                    self.endpoint
                ),
            )),
            StatusCode::MOVED_PERMANENTLY => {
                let region = resp
                    .headers()
                    .get("x-amz-bucket-region")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("another region")
                    .to_string();
                Err(Error::new(
                    ErrorKind::FailedPrecondition,
                    format!(
                        "s3 {}: bucket {b} is in {region}, not {}: fix the region",
                        self.endpoint, self.cfg.region
                    ),
                ))
            }
            s => Err(Error::new(
                http::status_kind(s),
                format!("s3 {what}: S3 answered {s}"),
            )),
        }
    }

    async fn upload(
        inner: &Arc<Self>,
        meta: &UploadMeta,
        body: StreamFactory<'_>,
    ) -> Result<Uploaded, Error> {
        let key = inner.key_for(meta);
        if key.len() > 1024 {
            return Err(invalid(format!(
                "image {}: object key {key:?} is longer than S3's 1024 bytes",
                meta.name
            )));
        }
        let headers = metadata_headers(meta)?;
        let location = inner.location(&key);
        // Some S3-compatible servers (s3s-fs) create a missing bucket on the fly when an
        // object is written: check it first so a typo fails the same way everywhere.
        inner.check().await?;
        if !inner.cfg.overwrite {
            if let Some(len) = inner.head_object(&key).await? {
                return Err(Error::new(
                    ErrorKind::AlreadyExists,
                    format!(
                        "{location} exists already ({}); set overwrite = true on the s3 target to replace it",
                        human(len)
                    ),
                ));
            }
        }
        let started = Instant::now();
        let upload_id = inner.create_upload(&key, &headers).await?;
        tracing::info!(image = %meta.name, object = %location, upload_id = %upload_id,
            part_size = part_size(meta.size, inner.cfg.min_part_size_mib),
            "s3 multipart upload started");
        let mut made = CleanupGuard::new(Made {
            inner: Arc::clone(inner),
            key: key.clone(),
            upload_id,
            companion: None,
        });
        let outcome = inner.transfer(&key, meta, body, &mut made).await;
        if outcome.is_ok() {
            made.disarm();
        }
        match outcome {
            Ok(up) => {
                let secs = started.elapsed().as_secs_f64();
                tracing::info!(image = %meta.name, object = %location, bytes = up.size, secs,
                    mib_per_s = up.size as f64 / MIB as f64 / secs.max(1e-6),
                    "s3 upload complete");
                Ok(up)
            }
            Err(e) => {
                let mut notes = Vec::new();
                match inner.abort(&key, &made.upload_id).await {
                    Ok(()) => notes.push(format!("multipart upload {} aborted", made.upload_id)),
                    Err(ae) => notes.push(format!(
                        "multipart upload {} could NOT be aborted ({}): abort it by hand or let a lifecycle rule do it",
                        made.upload_id,
                        ae.chain()
                    )),
                }
                if let Some(c) = &made.companion {
                    if let Err(de) = inner.delete_object(c).await {
                        notes.push(format!(
                            "companion {} not deleted ({})",
                            inner.location(c),
                            de.chain()
                        ));
                    }
                }
                made.disarm();
                let kind = e.kind();
                Err(Error::new(
                    kind,
                    format!(
                        "upload of image {} ({}, {}) to {location} failed; {}",
                        meta.name,
                        meta.format,
                        human(meta.size),
                        notes.join("; ")
                    ),
                )
                .with_source(e))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upload::StreamTarget;

    #[test]
    fn part_sizes() {
        assert_eq!(part_size(0, 16), 16 * MIB);
        assert_eq!(part_size(100 * MIB, 16), 16 * MIB);
        // 1 TiB: ceil(2^40 / 9000) = 122,167,289 bytes → 117 MiB.
        assert_eq!(part_size(1 << 40, 16), 117 * MIB);
        for size in [1u64 << 40, 5 << 40, (48u64 << 40) + 12345] {
            let p = part_size(size, 16);
            assert_eq!(p % MIB, 0);
            assert!(size.div_ceil(p) <= 9000, "{size}");
        }
        assert_eq!(part_size(1, 1), 5 * MIB);
    }

    #[test]
    fn metadata_names_and_values() {
        let mut meta = UploadMeta {
            name: "web-1".into(),
            format: "raw".into(),
            size: 42,
            properties: BTreeMap::new(),
        };
        meta.properties
            .insert("hw_qemu_guest_agent".into(), "yes".into());
        meta.properties.insert("domain".into(), "café".into());
        meta.properties.insert("note".into(), " padded ".into());
        let h = metadata_headers(&meta).unwrap();
        let get = |k: &str| h.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
        assert_eq!(get("x-amz-meta-size").as_deref(), Some("42"));
        assert_eq!(get("x-amz-meta-format").as_deref(), Some("raw"));
        assert_eq!(
            get("x-amz-meta-hw-qemu-guest-agent").as_deref(),
            Some("yes")
        );
        assert_eq!(
            get("x-amz-meta-domain").as_deref(),
            Some("=?UTF-8?B?Y2Fmw6k=?=")
        );
        assert_eq!(
            get("x-amz-meta-note").as_deref(),
            Some("=?UTF-8?B?IHBhZGRlZCA=?=")
        );
        meta.properties.insert("SIZE".into(), "1".into());
        assert!(metadata_headers(&meta).is_err());
        meta.properties.remove("SIZE");
        meta.properties.insert("big".into(), "x".repeat(3000));
        assert!(metadata_headers(&meta).is_err());
    }

    #[test]
    fn rfc2047_padding() {
        for (value, encoded) in [
            ("a", "=?UTF-8?B?YQ==?="),
            ("ab", "=?UTF-8?B?YWI=?="),
            ("abc", "=?UTF-8?B?YWJj?="),
            ("", "=?UTF-8?B??="),
        ] {
            assert_eq!(rfc2047(value), encoded);
        }
    }

    #[test]
    fn s3_errors_parsed_without_secrets() {
        let body = "<?xml version=\"1.0\"?><Error><Code>SignatureDoesNotMatch</Code>\
                    <Message>The request signature we calculated does not match</Message>\
                    <StringToSign>AWS4-HMAC-SHA256 secret-ish</StringToSign></Error>";
        let (c, m) = s3_error_fields(body);
        assert_eq!(c, "SignatureDoesNotMatch");
        assert_eq!(m, "The request signature we calculated does not match");
        let s3 = S3::new(S3Config::new("http://127.0.0.1:9", "b", "ak", "sk-1")).unwrap();
        let e = s3.inner.answer_error("x", StatusCode::FORBIDDEN, body);
        assert_eq!(e.kind(), ErrorKind::FailedPrecondition);
        assert!(!e.chain().contains("secret-ish"));
        assert!(!format!("{:?}", s3.config()).contains("sk-1"));
    }

    #[test]
    fn config_from_toml() {
        let cfg: S3Config = toml::from_str(
            r#"
            endpoint = "http://127.0.0.1:19000"
            bucket = "images"
            access_key = "ak"
            secret_key = "sk-2"
            prefix = "captures/"
            "#,
        )
        .unwrap();
        assert!(cfg.path_style && !cfg.overwrite && cfg.checksum_object);
        assert_eq!(cfg.parts_in_flight, 4);
        assert!(!format!("{cfg:?}").contains("sk-2"));
        let s3 = S3::new(cfg).unwrap();
        let meta = UploadMeta {
            name: "web-1".into(),
            format: "qcow2".into(),
            size: 1,
            properties: BTreeMap::new(),
        };
        assert_eq!(s3.key_for(&meta), "captures/web-1.qcow2");
        assert_eq!(s3.describe(), "s3 http://127.0.0.1:19000 bucket images");
    }
}
