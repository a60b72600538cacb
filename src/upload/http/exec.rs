//! The HTTP executor of the upload destinations: one client per destination, and one way to
//! send a request and map what goes wrong to a crate [`Error`]. Glance and S3 build their
//! requests (URLs, headers, signatures, bodies) and judge the answers; how a request is sent,
//! bounded in time, kept from following redirects and stripped of its URL in errors is here.
//!
//! Error mapping, the same for every destination:
//! - a transport error (no HTTP status: cannot connect, timed out, connection lost) is
//!   UNAVAILABLE, named by what was being done, with the URL stripped from its cause (a
//!   presigned S3 URL is a credential) ([`transport_error`]);
//! - a redirect is refused, never followed: FAILED_PRECONDITION naming both URLs without their
//!   queries ([`redirect_error`]);
//! - a streamed upload that stops moving is UNAVAILABLE ([`stall_error`]);
//! - an error status maps to a kind by [`status_kind`]; 5xx and 429 are worth a retry
//!   ([`is_transient_status`]).

use std::sync::Mutex;
use std::time::Duration;

use reqwest::header::HeaderMap;
use reqwest::{RequestBuilder, Response, StatusCode};

use super::retry::Failure;
use super::{lock, small_body, with_stall_guard, Meter, Progress, Stalled};
use crate::error::{invalid, Error, ErrorKind};
use crate::upload::human;

/// The HTTP client of a target: bounded connect, keep-alive pool, HTTP/1.1 (streamed uploads
/// and `Expect`-less PUTs behave the same on every server), no redirect followed.
fn client(connect_timeout: Duration) -> Result<reqwest::Client, Error> {
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

/// Sends the requests of one destination: small requests whose answer must come within a
/// timeout, and streamed uploads under a stall guard.
pub(crate) struct Executor {
    client: reqwest::Client,
    stall: Duration,
}

/// A whole small answer: status, headers and (at most 64 KiB of) body.
pub(crate) struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub text: String,
}

impl Executor {
    /// A client connecting within `connect_timeout`; answers and transfers that do not move for
    /// `stall` fail.
    pub(crate) fn new(connect_timeout: Duration, stall: Duration) -> Result<Self, Error> {
        Ok(Executor {
            client: client(connect_timeout)?,
            stall,
        })
    }

    /// The client, to build requests with.
    pub(crate) fn client(&self) -> &reqwest::Client {
        &self.client
    }

    /// The stall timeout.
    pub(crate) fn stall(&self) -> Duration {
        self.stall
    }

    /// Sends a request whose whole answer must come within the stall timeout; see
    /// [`Executor::send_within`].
    pub(crate) async fn send(&self, what: &str, rb: RequestBuilder) -> Result<Response, Error> {
        self.send_within(what, rb, self.stall).await
    }

    /// Sends a request whose whole answer must come within `timeout`: a transport error or a
    /// redirect is an error named `what`; any other answer is returned as it is.
    pub(crate) async fn send_within(
        &self,
        what: &str,
        rb: RequestBuilder,
        timeout: Duration,
    ) -> Result<Response, Error> {
        let resp = rb
            .timeout(timeout)
            .send()
            .await
            .map_err(|e| transport_error(what.to_string(), e))?;
        if let Some(e) = redirect_error(what, &resp) {
            return Err(e);
        }
        Ok(resp)
    }

    /// [`Executor::send`], then the answer read whole.
    pub(crate) async fn call(&self, what: &str, rb: RequestBuilder) -> Result<Answer, Error> {
        self.call_within(what, rb, self.stall).await
    }

    /// [`Executor::send_within`], then the answer read whole.
    pub(crate) async fn call_within(
        &self,
        what: &str,
        rb: RequestBuilder,
        timeout: Duration,
    ) -> Result<Answer, Error> {
        let resp = self.send_within(what, rb, timeout).await?;
        Ok(self.read(resp).await)
    }

    /// Reads an answer whole: its body bounded in size and by the stall timeout.
    pub(crate) async fn read(&self, resp: Response) -> Answer {
        let status = resp.status();
        let headers = resp.headers().clone();
        let text = small_body(resp, self.stall).await;
        Answer {
            status,
            headers,
            text,
        }
    }

    /// Sends a request with a streamed body whose reads move `progress` (no total timeout: a
    /// long upload is fine while it moves). A stall or a transport error is a retryable
    /// [`Failure`], a redirect a final one. With the body's `meter`, the messages say how far
    /// the upload got.
    pub(crate) async fn send_streamed(
        &self,
        what: &str,
        rb: RequestBuilder,
        progress: &Progress,
        meter: Option<&Mutex<Meter>>,
    ) -> Result<Response, Failure> {
        let res = with_stall_guard(rb.send(), progress, self.stall).await;
        let sent = meter.map(|m| {
            let m = lock(m);
            (m.sent(), m.expected)
        });
        match res {
            Err(stalled) => Err(Failure::of(stall_error(
                what,
                stalled,
                sent.map(|(s, _)| s),
            ))),
            Ok(Err(e)) => {
                let what = match sent {
                    Some((s, of)) => format!("{what} after {} of {}", human(s), human(of)),
                    None => what.to_string(),
                };
                Err(Failure::of(transport_error(what, e)))
            }
            Ok(Ok(resp)) => match redirect_error(what, &resp) {
                Some(e) => Err(Failure::fatal(e)),
                None => Ok(resp),
            },
        }
    }
}

/// Checks a configured URL of destination `dest` (`glance`, `s3`): http(s), a host, no
/// credentials in it. The URL is not echoed: it might hold a password.
pub(crate) fn check_url(dest: &str, what: &str, url: &str) -> Result<reqwest::Url, Error> {
    let parsed = reqwest::Url::parse(url)
        .map_err(|e| invalid(format!("{dest} target: {what} is not a URL: {e}")))?;
    if !matches!(parsed.scheme(), "http" | "https") || parsed.host_str().is_none() {
        return Err(invalid(format!(
            "{dest} target: {what} must be an http(s) URL with a host"
        )));
    }
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err(invalid(format!(
            "{dest} target: {what} must not carry credentials in the URL"
        )));
    }
    Ok(parsed)
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
