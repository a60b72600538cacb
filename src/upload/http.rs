//! HTTP plumbing shared by the targets: the client, stall detection, hashing body wrappers and
//! the mapping of transport errors and status codes to [`ErrorKind`]s.
//!
//! Stall detection: reqwest has a connect timeout and a total timeout, but nothing that notices
//! a long upload whose peer stopped reading. So every request body is wrapped in a stream that
//! records when the HTTP client last pulled bytes from it ([`Progress`]), and the request future
//! runs under [`with_stall_guard`], which gives up once neither the body moved nor an answer came
//! for the stall timeout. Time spent waiting for the producer (the disk) is not counted.
//!
//! Redirects are never followed. Every request of a target carries a credential (a Keystone
//! password or application-credential secret in the body, an `X-Auth-Token`, fixed auth
//! headers, an S3 signature), and a followed 307/308 would resend it to wherever the
//! `Location` points, another host or plain http included. A 3xx answer becomes an error
//! naming the URL and its `Location` ([`redirect_error`]): the config must name the final URL.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::Stream;
use sha2::{Digest, Sha256, Sha512};

use super::{human, ByteStream};
use crate::error::{Error, ErrorKind};

/// The HTTP client of a target: bounded connect, keep-alive pool, HTTP/1.1 (streamed uploads
/// and `Expect`-less PUTs behave the same on every server), no redirect followed.
pub(crate) fn client(connect_timeout: Duration) -> Result<reqwest::Client, Error> {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(connect_timeout)
        .pool_idle_timeout(Duration::from_secs(30))
        .tcp_nodelay(true)
        .http1_only()
        .user_agent(concat!("imaged/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| {
            Error::new(ErrorKind::Internal, "building the HTTP client").with_source(e.without_url())
        })
}

/// sha256 + sha512 + length of a byte stream, updated as it goes.
pub(crate) struct Digests {
    sha256: Sha256,
    sha512: Sha512,
    len: u64,
}

impl Digests {
    pub(crate) fn new() -> Self {
        Digests {
            sha256: Sha256::new(),
            sha512: Sha512::new(),
            len: 0,
        }
    }

    pub(crate) fn update(&mut self, data: &[u8]) {
        self.sha256.update(data);
        self.sha512.update(data);
        self.len += data.len() as u64;
    }

    pub(crate) fn len(&self) -> u64 {
        self.len
    }

    /// (sha256 hex, sha512 hex, length).
    pub(crate) fn finish(self) -> (String, String, u64) {
        (
            hex::encode(self.sha256.finalize()),
            hex::encode(self.sha512.finalize()),
            self.len,
        )
    }
}

/// When a transfer last moved, shared between a body stream and its [`with_stall_guard`].
pub(crate) struct Progress {
    base: Instant,
    last_ms: AtomicU64,
    waiting_on_source: AtomicBool,
}

impl Progress {
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(Progress {
            base: Instant::now(),
            last_ms: AtomicU64::new(0),
            waiting_on_source: AtomicBool::new(false),
        })
    }

    /// Something moved just now.
    pub(crate) fn touch(&self) {
        let ms = self.base.elapsed().as_millis() as u64;
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    /// The HTTP client is waiting for the producer, not the other way round.
    fn set_waiting_on_source(&self, waiting: bool) {
        self.waiting_on_source.store(waiting, Ordering::Relaxed);
        self.touch();
    }

    fn stalled_for(&self) -> Duration {
        if self.waiting_on_source.load(Ordering::Relaxed) {
            return Duration::ZERO;
        }
        let now = self.base.elapsed().as_millis() as u64;
        Duration::from_millis(now.saturating_sub(self.last_ms.load(Ordering::Relaxed)))
    }
}

/// The transfer made no progress for the stall timeout.
#[derive(Debug)]
pub(crate) struct Stalled(pub Duration);

/// Runs `fut` (a request and its upload) until it finishes or the transfer stalls.
pub(crate) async fn with_stall_guard<F: std::future::Future>(
    fut: F,
    progress: &Progress,
    stall: Duration,
) -> Result<F::Output, Stalled> {
    let tick = (stall / 4).clamp(Duration::from_millis(50), Duration::from_secs(1));
    tokio::pin!(fut);
    loop {
        tokio::select! {
            out = &mut fut => return Ok(out),
            _ = tokio::time::sleep(tick) => {
                if progress.stalled_for() >= stall {
                    return Err(Stalled(stall));
                }
            }
        }
    }
}

/// What a [`MeteredBody`] saw, read by the uploader once the request is over.
pub(crate) struct Meter {
    pub digests: Option<Digests>,
    /// The producer's own error, kept with its kind (the HTTP client only sees an I/O error).
    pub producer_error: Option<Error>,
    /// The stream ended with exactly the expected length.
    pub complete: bool,
    expected: u64,
}

impl Meter {
    pub(crate) fn new(expected: u64) -> Arc<Mutex<Meter>> {
        Arc::new(Mutex::new(Meter {
            digests: Some(Digests::new()),
            producer_error: None,
            complete: false,
            expected,
        }))
    }

    pub(crate) fn sent(&self) -> u64 {
        self.digests.as_ref().map_or(0, |d| d.len())
    }
}

/// Locks a meter; a poisoned lock (a panic elsewhere) still holds usable counters.
pub(crate) fn lock(m: &Mutex<Meter>) -> std::sync::MutexGuard<'_, Meter> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A request body over the producer's stream: hashes and counts what the HTTP client takes,
/// records progress, and fails the request (rather than letting it end cleanly) when the
/// producer errs or sends more or fewer bytes than announced, so the server never accepts a
/// truncated object as complete.
pub(crate) struct MeteredBody {
    inner: ByteStream,
    meter: Arc<Mutex<Meter>>,
    progress: Arc<Progress>,
    done: bool,
}

impl MeteredBody {
    pub(crate) fn new(
        inner: ByteStream,
        meter: Arc<Mutex<Meter>>,
        progress: Arc<Progress>,
    ) -> Self {
        MeteredBody {
            inner,
            meter,
            progress,
            done: false,
        }
    }

    fn fail(&mut self, err: Error) -> Poll<Option<Result<Bytes, std::io::Error>>> {
        self.done = true;
        let msg = err.to_string();
        let mut m = lock(&self.meter);
        if m.producer_error.is_none() {
            m.producer_error = Some(err);
        }
        Poll::Ready(Some(Err(std::io::Error::other(msg))))
    }
}

impl Stream for MeteredBody {
    type Item = Result<Bytes, std::io::Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.done {
            return Poll::Ready(None);
        }
        self.progress.touch();
        match self.inner.as_mut().poll_next(cx) {
            Poll::Pending => {
                self.progress.set_waiting_on_source(true);
                Poll::Pending
            }
            Poll::Ready(Some(Ok(chunk))) => {
                self.progress.set_waiting_on_source(false);
                let (sent, expected) = {
                    let mut m = lock(&self.meter);
                    if let Some(d) = m.digests.as_mut() {
                        d.update(&chunk);
                    }
                    (m.sent(), m.expected)
                };
                if sent > expected {
                    return self.fail(Error::new(
                        ErrorKind::Internal,
                        format!("the image stream is longer than the announced {expected} bytes"),
                    ));
                }
                Poll::Ready(Some(Ok(chunk)))
            }
            Poll::Ready(Some(Err(e))) => {
                self.progress.set_waiting_on_source(false);
                let sent = lock(&self.meter).sent();
                let kind = e.kind();
                self.fail(
                    Error::new(
                        kind,
                        format!("the image stream failed after {}", human(sent)),
                    )
                    .with_source(e),
                )
            }
            Poll::Ready(None) => {
                self.progress.set_waiting_on_source(false);
                let (sent, expected) = {
                    let m = lock(&self.meter);
                    (m.sent(), m.expected)
                };
                if sent != expected {
                    return self.fail(Error::new(
                        ErrorKind::Internal,
                        format!(
                            "the image stream ended after {sent} bytes; {expected} were announced"
                        ),
                    ));
                }
                self.done = true;
                lock(&self.meter).complete = true;
                Poll::Ready(None)
            }
        }
    }
}

/// A request body over a buffer already in memory (an S3 part), handed out in slices so that
/// progress is seen as the socket takes it.
pub(crate) struct BufferBody {
    data: Bytes,
    pos: usize,
    progress: Arc<Progress>,
}

impl BufferBody {
    const SLICE: usize = 256 * 1024;

    pub(crate) fn new(data: Bytes, progress: Arc<Progress>) -> Self {
        BufferBody {
            data,
            pos: 0,
            progress,
        }
    }
}

impl Stream for BufferBody {
    type Item = Result<Bytes, std::io::Error>;

    fn poll_next(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.progress.touch();
        if self.pos >= self.data.len() {
            return Poll::Ready(None);
        }
        let end = (self.pos + Self::SLICE).min(self.data.len());
        let slice = self.data.slice(self.pos..end);
        self.pos = end;
        Poll::Ready(Some(Ok(slice)))
    }
}

/// Maps a transport error (no HTTP status) to an error: every one of them means the server
/// could not be reached or the connection broke, i.e. UNAVAILABLE, and is worth a retry. The
/// URL is stripped from the cause (a presigned S3 URL is a credential).
pub(crate) fn transport_error(what: impl Into<String>, err: reqwest::Error) -> Error {
    let detail = if err.is_connect() {
        "cannot connect"
    } else if err.is_timeout() {
        "timed out"
    } else if err.is_body() || err.is_request() {
        "connection lost"
    } else if err.is_decode() {
        "unreadable answer"
    } else {
        "HTTP failure"
    };
    Error::new(ErrorKind::Unavailable, format!("{}: {detail}", what.into()))
        .with_source(err.without_url())
}

/// A URL as shown in messages: no user, password, query or fragment (a presigned S3 URL
/// carries its signature in the query).
fn shown_url(url: &reqwest::Url) -> String {
    let mut u = url.clone();
    let had_query = u.query().is_some();
    let _ = u.set_username("");
    let _ = u.set_password(None);
    u.set_query(None);
    u.set_fragment(None);
    if had_query {
        format!("{u}?…")
    } else {
        u.to_string()
    }
}

/// The error for a redirect answer (3xx with a `Location`), which is never followed; `None`
/// for any other answer.
pub(crate) fn redirect_error(what: &str, resp: &reqwest::Response) -> Option<Error> {
    let status = resp.status();
    if !status.is_redirection() {
        return None;
    }
    let location = resp.headers().get(reqwest::header::LOCATION)?;
    let to = match location.to_str().ok().map(|l| resp.url().join(l)) {
        Some(Ok(u)) => shown_url(&u),
        _ => "an unreadable Location".to_string(),
    };
    Some(Error::new(
        ErrorKind::FailedPrecondition,
        format!(
            "{what}: the endpoint {} answered {status} and redirected to {to}; redirects are \
             not followed (they would carry the credentials elsewhere): configure the final URL",
            shown_url(resp.url())
        ),
    ))
}

/// The error of a stall.
pub(crate) fn stall_error(what: impl Into<String>, stalled: Stalled, sent: Option<u64>) -> Error {
    let at = sent
        .map(|s| format!(" after {}", human(s)))
        .unwrap_or_default();
    Error::new(
        ErrorKind::Unavailable,
        format!(
            "{}: no progress for {} s{at} (network cut or server hung)",
            what.into(),
            stalled.0.as_secs()
        ),
    )
}

/// The kind of an HTTP error status (for answers that are not specific to a request).
pub(crate) fn status_kind(status: reqwest::StatusCode) -> ErrorKind {
    use reqwest::StatusCode as S;
    match status {
        // A redirect without a Location (one with is [`redirect_error`]): wrong URL configured.
        s if s.is_redirection() => ErrorKind::FailedPrecondition,
        S::UNAUTHORIZED | S::FORBIDDEN => ErrorKind::FailedPrecondition,
        S::NOT_FOUND => ErrorKind::NotFound,
        S::CONFLICT => ErrorKind::AlreadyExists,
        S::PAYLOAD_TOO_LARGE | S::INSUFFICIENT_STORAGE | S::TOO_MANY_REQUESTS => {
            ErrorKind::ResourceExhausted
        }
        s if s.is_server_error() => ErrorKind::Unavailable,
        s if s.is_client_error() => ErrorKind::InvalidArgument,
        _ => ErrorKind::Internal,
    }
}

/// Worth retrying: the server is down, overloaded or broke the connection.
pub(crate) fn is_transient_status(status: reqwest::StatusCode) -> bool {
    status.is_server_error() || status == reqwest::StatusCode::TOO_MANY_REQUESTS
}

/// A short, single-line excerpt of an error body for messages: tags removed, whitespace
/// collapsed, at most 300 characters. (Callers never pass bodies that could hold secrets.)
pub(crate) fn excerpt(body: &str) -> String {
    let mut out = String::new();
    let mut in_tag = false;
    let mut last_space = true;
    for c in body.chars() {
        match c {
            '<' => in_tag = true,
            '>' if in_tag => {
                in_tag = false;
                if !last_space {
                    out.push(' ');
                    last_space = true;
                }
            }
            _ if in_tag => {}
            c if c.is_whitespace() || c.is_control() => {
                if !last_space {
                    out.push(' ');
                    last_space = true;
                }
            }
            c => {
                out.push(c);
                last_space = false;
            }
        }
        if out.len() >= 300 {
            out.push('…');
            break;
        }
    }
    out.trim().to_string()
}

/// Reads a small answer body, bounded in time and size.
pub(crate) async fn small_body(resp: reqwest::Response, timeout: Duration) -> String {
    const MAX: usize = 64 * 1024;
    let read = async {
        let mut resp = resp;
        let mut buf = Vec::new();
        while let Ok(Some(chunk)) = resp.chunk().await {
            buf.extend_from_slice(&chunk);
            if buf.len() >= MAX {
                buf.truncate(MAX);
                break;
            }
        }
        buf
    };
    match tokio::time::timeout(timeout, read).await {
        Ok(buf) => String::from_utf8_lossy(&buf).into_owned(),
        Err(_) => String::new(),
    }
}

/// Backoff before retry `attempt` (1-based): 0.5 s, 1 s, 2 s, ... capped at 8 s.
pub(crate) fn backoff(base: Duration, attempt: u32) -> Duration {
    let factor = 1u32 << attempt.saturating_sub(1).min(4);
    (base * factor).min(Duration::from_secs(8))
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::StreamExt;

    #[test]
    fn excerpt_strips_html() {
        let body = "<html>\n <head>\n  <title>400 Bad Request</title>\n </head>\n <body>\n  \
                    <h1>400 Bad Request</h1>\n  Provided object does not match schema.<br /><br />\
                    \n\n </body>\n</html>";
        assert_eq!(
            excerpt(body),
            "400 Bad Request 400 Bad Request Provided object does not match schema."
        );
        assert!(excerpt(&"x".repeat(1000)).chars().count() <= 301);
    }

    #[test]
    fn backoff_doubles_and_caps() {
        let b = Duration::from_millis(500);
        assert_eq!(backoff(b, 1), Duration::from_millis(500));
        assert_eq!(backoff(b, 2), Duration::from_secs(1));
        assert_eq!(backoff(b, 3), Duration::from_secs(2));
        assert_eq!(backoff(b, 10), Duration::from_secs(8));
    }

    fn stream_of(chunks: Vec<Result<Bytes, Error>>) -> ByteStream {
        Box::pin(futures_util::stream::iter(chunks))
    }

    #[tokio::test]
    async fn metered_body_hashes_and_checks_length() {
        let data = Bytes::from_static(b"hello world");
        let meter = Meter::new(11);
        let body = MeteredBody::new(
            stream_of(vec![Ok(data.slice(..5)), Ok(data.slice(5..))]),
            meter.clone(),
            Progress::new(),
        );
        let out: Vec<_> = body.collect().await;
        assert!(out.iter().all(|r| r.is_ok()));
        let mut m = lock(&meter);
        assert!(m.complete);
        let (s256, _, len) = m.digests.take().unwrap().finish();
        assert_eq!(len, 11);
        assert_eq!(
            s256,
            "b94d27b9934d3e08a52e52d7da7dabfac484efe37a5380ee9088f7ace2efcde9"
        );
    }

    #[tokio::test]
    async fn metered_body_fails_short_long_and_broken_streams() {
        for (chunks, want) in [
            (vec![Ok(Bytes::from_static(b"abc"))], ErrorKind::Internal),
            (
                vec![Ok(Bytes::from_static(b"abcdefgh"))],
                ErrorKind::Internal,
            ),
            (
                vec![
                    Ok(Bytes::from_static(b"ab")),
                    Err(Error::new(ErrorKind::Unavailable, "nbd gone")),
                ],
                ErrorKind::Unavailable,
            ),
        ] {
            let meter = Meter::new(5);
            let body = MeteredBody::new(stream_of(chunks), meter.clone(), Progress::new());
            let out: Vec<_> = body.collect().await;
            assert!(out.last().unwrap().is_err());
            let m = lock(&meter);
            assert!(!m.complete);
            assert_eq!(m.producer_error.as_ref().unwrap().kind(), want);
        }
    }

    #[tokio::test]
    async fn stall_guard_fires_only_without_progress() {
        let p = Progress::new();
        let stall = Duration::from_millis(200);
        let slow = tokio::time::sleep(Duration::from_secs(5));
        let t = Instant::now();
        assert!(with_stall_guard(slow, &p, stall).await.is_err());
        assert!(t.elapsed() < Duration::from_secs(2));
        // Waiting on the producer is not a stall.
        p.set_waiting_on_source(true);
        let wait = tokio::time::sleep(Duration::from_millis(600));
        assert!(with_stall_guard(wait, &p, stall).await.is_ok());
    }
}
