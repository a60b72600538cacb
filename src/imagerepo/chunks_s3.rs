//! Chunks in S3-compatible object storage (Ceph RGW, MinIO, AWS S3, s3s): [`S3Chunks`], the
//! second [`ChunkStore`], for repositories that outgrow one machine's disks.
//!
//! One object a chunk, `{prefix}ab/abcd…` (the lowercase hex sha256 of its bytes), sent with
//! one signed `PUT` (SigV4 presigned URLs made by rusty-s3, sent by reqwest). An S3 `PUT` is
//! atomic and durable when it answers 200: an object is whole or absent, so there is no temp
//! name and [`ChunkStore::sync`] has nothing to do. Every chunk is re-hashed before it is sent
//! ([`verify`]), and a chunk read back is checked against its digest too: a damaged object is
//! an error naming it, never bytes served as an image.
//!
//! Every call is idempotent (`HEAD`, `PUT` of content-addressed bytes, `GET`, `DELETE`,
//! `ListObjectsV2`), so a network failure, a timeout or a 5xx is retried (3 attempts with
//! backoff); a 4xx is final. Errors name the bucket and the object and carry S3's own error
//! code, never the signed URL (it holds a signature).
//!
//! The trait is blocking (the server calls it from blocking threads): each call runs its
//! request on the runtime the store was opened on.

use std::time::{Duration, SystemTime};

use reqwest::StatusCode;
use rusty_s3::actions::{ListObjectsV2, S3Action};
use rusty_s3::{Bucket, Credentials, UrlStyle};
use serde::Deserialize;

use super::chunks::{parse_digest, verify, ChunkStore};
use crate::error::{invalid, Error, ErrorKind, Result};
use crate::repo::Digest;

/// How long a signed URL stays valid: longer than any one request may take.
const SIGN_FOR: Duration = Duration::from_secs(600);
/// Attempts of one request (network failures, timeouts, 5xx).
const ATTEMPTS: u32 = 3;

/// `[chunks]` with `backend = "s3"`: where the objects go.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct S3ChunksConfig {
    /// `http://127.0.0.1:9000` or `https://s3.example.org`.
    pub endpoint: String,
    pub bucket: String,
    #[serde(default = "default_region")]
    pub region: String,
    pub access_key: String,
    pub secret_key: String,
    /// Key prefix of chunk objects (default `chunks/`).
    #[serde(default = "default_prefix")]
    pub prefix: String,
    /// `path` (default: `endpoint/bucket/key`, what MinIO and s3s expect) or `virtual`
    /// (`bucket.endpoint/key`, AWS's default).
    #[serde(default = "default_style")]
    pub url_style: String,
    /// Timeout of one request, seconds (default 60).
    #[serde(default = "default_timeout")]
    pub timeout_secs: u64,
}

fn default_region() -> String {
    "us-east-1".into()
}
fn default_prefix() -> String {
    "chunks/".into()
}
fn default_style() -> String {
    "path".into()
}
fn default_timeout() -> u64 {
    60
}

impl S3ChunksConfig {
    /// Checks every setting (the config calls this at load), and makes the bucket handle.
    pub fn bucket(&self) -> Result<Bucket> {
        let url: reqwest::Url = self.endpoint.parse().map_err(|_| {
            invalid(format!(
                "chunks.endpoint: {:?} is not a URL like http://127.0.0.1:9000",
                self.endpoint
            ))
        })?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(invalid(format!(
                "chunks.endpoint: {:?} must be http:// or https://",
                self.endpoint
            )));
        }
        let style = match self.url_style.as_str() {
            "path" => UrlStyle::Path,
            "virtual" => UrlStyle::VirtualHost,
            other => {
                return Err(invalid(format!(
                    "chunks.url_style: {other:?} is neither \"path\" nor \"virtual\""
                )))
            }
        };
        if self.access_key.is_empty() || self.secret_key.is_empty() {
            return Err(invalid(
                "chunks.access_key and chunks.secret_key must be set for backend = \"s3\"",
            ));
        }
        if self.prefix.starts_with('/') || self.prefix.contains("..") {
            return Err(invalid(format!(
                "chunks.prefix: {:?} must be a relative key prefix like \"chunks/\"",
                self.prefix
            )));
        }
        if !(1..=3600).contains(&self.timeout_secs) {
            return Err(invalid(format!(
                "chunks.timeout_secs must be 1 to 3600, got {}",
                self.timeout_secs
            )));
        }
        Bucket::new(url, style, self.bucket.clone(), self.region.clone())
            .map_err(|e| invalid(format!("chunks.bucket {:?}: {e}", self.bucket)))
    }
}

impl std::fmt::Debug for S3ChunksConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3ChunksConfig")
            .field("endpoint", &self.endpoint)
            .field("bucket", &self.bucket)
            .field("region", &self.region)
            .field("prefix", &self.prefix)
            .field("url_style", &self.url_style)
            .field("secret_key", &"(hidden)")
            .finish_non_exhaustive()
    }
}

/// Chunks as objects of one bucket.
pub struct S3Chunks {
    bucket: Bucket,
    creds: Credentials,
    prefix: String,
    http: reqwest::Client,
    rt: tokio::runtime::Handle,
}

impl S3Chunks {
    /// Checks the settings and makes the client; `rt` runs the requests and must be a
    /// multi-thread runtime (its workers drive them while a blocking thread waits). Nothing is
    /// sent: the first call says whether the bucket answers ([`S3Chunks::check`] asks at once).
    pub fn new(cfg: &S3ChunksConfig, rt: tokio::runtime::Handle) -> Result<S3Chunks> {
        let bucket = cfg.bucket()?;
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(cfg.timeout_secs))
            .connect_timeout(Duration::from_secs(10))
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| {
                Error::new(
                    ErrorKind::Internal,
                    "making the S3 chunk store's HTTP client",
                )
                .with_source(e)
            })?;
        Ok(S3Chunks {
            bucket,
            creds: Credentials::new(cfg.access_key.clone(), cfg.secret_key.clone()),
            prefix: cfg.prefix.clone(),
            http,
            rt,
        })
    }

    /// Lists one key of the bucket: fails (UNAVAILABLE or PERMISSION_DENIED, naming the bucket)
    /// when the bucket does not answer, so a wrong endpoint or key stops the server at start.
    pub fn check(&self) -> Result<()> {
        let mut list = ListObjectsV2::new(&self.bucket, Some(&self.creds));
        list.with_prefix(self.prefix.as_str());
        list.with_max_keys(1);
        let url = list.sign(SIGN_FOR);
        let (status, body) = self.send("listing", &self.prefix, || self.http.get(url.clone()))?;
        if status.is_success() {
            Ok(())
        } else {
            Err(self.answer_error("listing", &self.prefix, status, &body))
        }
    }

    fn key(&self, digest: &Digest) -> String {
        let h = hex::encode(digest);
        format!("{}{}/{}", self.prefix, &h[..2], h)
    }

    fn place(&self, key: &str) -> String {
        format!("s3://{}/{key}", self.bucket.name())
    }

    /// Sends a request (made anew for each attempt) and returns the status and body of the
    /// first answer that is not a network failure, a timeout or a 5xx (or of the last one).
    fn send(
        &self,
        what: &str,
        key: &str,
        make: impl Fn() -> reqwest::RequestBuilder,
    ) -> Result<(StatusCode, bytes::Bytes)> {
        self.rt.block_on(async {
            let mut last: Option<Error> = None;
            for attempt in 0..ATTEMPTS {
                if attempt > 0 {
                    tokio::time::sleep(Duration::from_millis(200 << attempt)).await;
                }
                match make().send().await {
                    Ok(resp) => {
                        let status = resp.status();
                        match resp.bytes().await {
                            Ok(body) if !status.is_server_error() => return Ok((status, body)),
                            Ok(body) => {
                                last = Some(self.answer_error(what, key, status, &body));
                            }
                            Err(e) => last = Some(self.network_error(what, key, e)),
                        }
                    }
                    Err(e) => last = Some(self.network_error(what, key, e)),
                }
            }
            Err(last.unwrap_or_else(|| self.network_error_text(what, key, "no attempt made")))
        })
    }

    fn network_error(&self, what: &str, key: &str, e: reqwest::Error) -> Error {
        // reqwest's text names the URL, with its signature: keep only the kind of failure.
        let kind = if e.is_timeout() {
            "timed out"
        } else if e.is_connect() {
            "could not connect"
        } else {
            "the connection failed"
        };
        self.network_error_text(what, key, kind)
    }

    fn network_error_text(&self, what: &str, key: &str, kind: &str) -> Error {
        Error::new(
            ErrorKind::Unavailable,
            format!(
                "{what} {} at {}: {kind} (after {ATTEMPTS} attempts)",
                self.place(key),
                self.bucket.base_url()
            ),
        )
        .with_reason("CHUNK_STORE_UNAVAILABLE")
        .with_subject(self.place(key))
    }

    fn answer_error(&self, what: &str, key: &str, status: StatusCode, body: &[u8]) -> Error {
        let text = String::from_utf8_lossy(body);
        let field = |tag: &str| -> String {
            let open = format!("<{tag}>");
            let close = format!("</{tag}>");
            text.split_once(&open)
                .and_then(|(_, rest)| rest.split_once(&close))
                .map(|(v, _)| v.chars().take(200).collect())
                .unwrap_or_default()
        };
        let (code, message) = (field("Code"), field("Message"));
        let kind = match status {
            StatusCode::FORBIDDEN | StatusCode::UNAUTHORIZED => ErrorKind::PermissionDenied,
            s if s.is_server_error() => ErrorKind::Unavailable,
            _ => ErrorKind::Internal,
        };
        Error::new(
            kind,
            format!(
                "{what} {}: the object store answered {status}{}{}",
                self.place(key),
                if code.is_empty() {
                    String::new()
                } else {
                    format!(" {code}")
                },
                if message.is_empty() {
                    String::new()
                } else {
                    format!(": {message}")
                },
            ),
        )
        .with_reason("CHUNK_STORE_FAILED")
        .with_subject(self.place(key))
    }
}

impl ChunkStore for S3Chunks {
    fn has(&self, digest: &Digest) -> Result<bool> {
        let key = self.key(digest);
        let url = self
            .bucket
            .head_object(Some(&self.creds), &key)
            .sign(SIGN_FOR);
        let (status, body) = self.send("looking up", &key, || self.http.head(url.clone()))?;
        match status {
            s if s.is_success() => Ok(true),
            StatusCode::NOT_FOUND => Ok(false),
            s => Err(self.answer_error("looking up", &key, s, &body)),
        }
    }

    fn put(&self, digest: &Digest, data: &[u8]) -> Result<bool> {
        verify(digest, data)?;
        let key = self.key(digest);
        let url = self
            .bucket
            .put_object(Some(&self.creds), &key)
            .sign(SIGN_FOR);
        let body = bytes::Bytes::copy_from_slice(data);
        let (status, answer) = self.send("storing", &key, || {
            self.http
                .put(url.clone())
                .header(reqwest::header::CONTENT_LENGTH, body.len())
                .body(body.clone())
        })?;
        if !status.is_success() {
            return Err(self.answer_error("storing", &key, status, &answer));
        }
        Ok(true)
    }

    fn read(&self, digest: &Digest, buf: &mut Vec<u8>) -> Result<()> {
        let key = self.key(digest);
        let url = self
            .bucket
            .get_object(Some(&self.creds), &key)
            .sign(SIGN_FOR);
        let (status, body) = self.send("reading", &key, || self.http.get(url.clone()))?;
        if status == StatusCode::NOT_FOUND {
            return Err(Error::new(
                ErrorKind::NotFound,
                format!("chunk object {} is missing", self.place(&key)),
            )
            .with_reason("CHUNK_MISSING")
            .with_subject(self.place(&key)));
        }
        if !status.is_success() {
            return Err(self.answer_error("reading", &key, status, &body));
        }
        verify(digest, &body).map_err(|e| {
            Error::new(
                ErrorKind::Internal,
                format!("chunk object {} is damaged: {e}", self.place(&key)),
            )
            .with_reason("CHUNK_DAMAGED")
            .with_subject(self.place(&key))
        })?;
        buf.clear();
        buf.extend_from_slice(&body);
        Ok(())
    }

    fn sync(&self) -> Result<()> {
        // A PUT that answered 200 is durable: nothing is pending.
        Ok(())
    }

    fn list(&self) -> Result<Vec<(Digest, SystemTime)>> {
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let mut list = ListObjectsV2::new(&self.bucket, Some(&self.creds));
            list.with_prefix(self.prefix.as_str());
            if let Some(t) = &token {
                list.with_continuation_token(t.as_str());
            }
            let url = list.sign(SIGN_FOR);
            let (status, body) =
                self.send("listing", &self.prefix, || self.http.get(url.clone()))?;
            if !status.is_success() {
                return Err(self.answer_error("listing", &self.prefix, status, &body));
            }
            let text = String::from_utf8_lossy(&body);
            let page = ListObjectsV2::parse_response(&text).map_err(|e| {
                Error::new(
                    ErrorKind::Internal,
                    format!(
                        "listing {}: unreadable answer ({e})",
                        self.place(&self.prefix)
                    ),
                )
            })?;
            for o in &page.contents {
                // Only `{prefix}ab/{digest}` objects are chunks; anything else is left alone.
                let Some(rest) = o.key.strip_prefix(self.prefix.as_str()) else {
                    continue;
                };
                let Some((dir, name)) = rest.split_once('/') else {
                    continue;
                };
                let Ok(d) = parse_digest(name, "key") else {
                    continue;
                };
                if !name.starts_with(dir) {
                    continue;
                }
                let when = o
                    .last_modified
                    .as_deref()
                    .and_then(parse_rfc3339_utc)
                    .unwrap_or(SystemTime::UNIX_EPOCH);
                out.push((d, when));
            }
            match page.next_continuation_token {
                Some(t) if !t.is_empty() => token = Some(t),
                _ => return Ok(out),
            }
        }
    }

    fn remove(&self, digest: &Digest) -> Result<()> {
        let key = self.key(digest);
        let url = self
            .bucket
            .delete_object(Some(&self.creds), &key)
            .sign(SIGN_FOR);
        let (status, body) = self.send("removing", &key, || self.http.delete(url.clone()))?;
        if status.is_success() || status == StatusCode::NOT_FOUND {
            Ok(())
        } else {
            Err(self.answer_error("removing", &key, status, &body))
        }
    }
}

/// `2026-12-01T09:30:00.000Z` (S3's LastModified) as a time; None when it is not UTC RFC 3339.
fn parse_rfc3339_utc(text: &str) -> Option<SystemTime> {
    let t = text.strip_suffix('Z')?;
    let (date, time) = t.split_once('T')?;
    let mut d = date.split('-').map(|p| p.parse::<i64>().ok());
    let (y, m, day) = (d.next()??, d.next()??, d.next()??);
    let time = time.split('.').next()?;
    let mut h = time.split(':').map(|p| p.parse::<i64>().ok());
    let (hh, mm, ss) = (h.next()??, h.next()??, h.next()??);
    if !(1..=12).contains(&m) || !(1..=31).contains(&day) || hh > 23 || mm > 59 || ss > 60 {
        return None;
    }
    // Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's civil algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + hh * 3600 + mm * 60 + ss;
    u64::try_from(secs)
        .ok()
        .map(|s| SystemTime::UNIX_EPOCH + Duration::from_secs(s))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn last_modified_times_parse() {
        let t = |s: &str| {
            parse_rfc3339_utc(s).map(|t| t.duration_since(SystemTime::UNIX_EPOCH).unwrap())
        };
        assert_eq!(t("1970-01-01T00:00:00Z"), Some(Duration::ZERO));
        assert_eq!(
            t("2000-03-01T00:00:00.000Z"),
            Some(Duration::from_secs(951_868_800))
        );
        assert_eq!(
            t("2026-12-01T09:30:15.123Z"),
            Some(Duration::from_secs(1_796_117_415))
        );
        for bad in [
            "2026-12-01 09:30:15Z",
            "2026-13-01T00:00:00Z",
            "2026-12-01T00:00:00+01:00",
            "",
        ] {
            assert_eq!(t(bad), None, "{bad}");
        }
    }

    fn cfg() -> S3ChunksConfig {
        toml::from_str(
            "endpoint = \"http://127.0.0.1:1\"\nbucket = \"b\"\naccess_key = \"a\"\n\
             secret_key = \"s\"\n",
        )
        .unwrap()
    }

    #[test]
    fn settings_are_checked_by_name() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let ok = S3Chunks::new(&cfg(), rt.handle().clone()).unwrap();
        assert_eq!(
            ok.key(&[0xab; 32]),
            format!("chunks/ab/{}", "ab".repeat(32))
        );
        for (edit, key) in [
            (
                &(|c: &mut S3ChunksConfig| c.endpoint = "ftp://h".into()) as &dyn Fn(&mut _),
                "chunks.endpoint",
            ),
            (
                &|c: &mut S3ChunksConfig| c.endpoint = "nowhere".into(),
                "chunks.endpoint",
            ),
            (
                &|c: &mut S3ChunksConfig| c.url_style = "sideways".into(),
                "chunks.url_style",
            ),
            (
                &|c: &mut S3ChunksConfig| c.secret_key.clear(),
                "chunks.secret_key",
            ),
            (
                &|c: &mut S3ChunksConfig| c.prefix = "/abs".into(),
                "chunks.prefix",
            ),
            (
                &|c: &mut S3ChunksConfig| c.timeout_secs = 0,
                "chunks.timeout_secs",
            ),
        ] {
            let mut c = cfg();
            edit(&mut c);
            let e = S3Chunks::new(&c, rt.handle().clone()).err().unwrap();
            assert!(e.to_string().contains(key), "{key}: {e}");
        }
        assert!(
            !format!("{:?}", cfg()).contains("\"s\""),
            "the secret is printed"
        );
    }

    #[test]
    fn an_unreachable_store_is_unavailable_naming_the_bucket() {
        // A multi-thread runtime, as the server's: its workers drive the requests the store
        // waits for (a current-thread runtime is driven only by its own `block_on`).
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let s = S3Chunks::new(&cfg(), rt.handle().clone()).unwrap();
        let e = s.has(&[1; 32]).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Unavailable, "{e}");
        assert!(e.to_string().contains("s3://b/chunks/01/"), "{e}");
        assert!(!e.to_string().contains("X-Amz-Signature"), "{e}");
    }
}
