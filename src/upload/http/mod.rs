//! HTTP shared by the upload destinations (Glance, S3): the executor that sends requests and
//! maps their failures ([`exec`]), the retry policy ([`retry`]), the guard that cleans up an
//! upload that did not finish ([`cleanup`]), and the body wrappers: stall detection, length
//! checks and hashing on another core ([`hashed`], [`HashFeed`]).
//!
//! Stall detection: reqwest has a connect timeout and a total timeout, but nothing that notices
//! a long upload whose peer stopped reading. So every request body is wrapped in a stream that
//! records when the HTTP client last pulled bytes from it ([`Progress`]), and the request future
//! runs under [`with_stall_guard`], which gives up once neither the body moved nor an answer came
//! for the stall timeout. Time spent waiting for the producer (the disk) is not counted.
//!
//! Redirects are never followed. Every request of a destination carries a credential (a
//! Keystone password or application-credential secret in the body, an `X-Auth-Token`, fixed
//! auth headers, an S3 signature), and a followed 307/308 would resend it to wherever the
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

pub(crate) mod cleanup;
pub(crate) mod exec;
pub(crate) mod retry;

pub(crate) use cleanup::{CleanupGuard, Undo};
pub(crate) use exec::{check_url, is_transient_status, status_kind, Answer, Executor};
pub(crate) use retry::{Failure, Retry, RetryPolicy};

/// sha256 + length of a byte stream, updated as it goes; and sha512 where the destination
/// checks one (Glance's `os_hash_value`): it costs more CPU than the rest of a transfer, so
/// nothing computes it that no one reads.
pub(crate) struct Digests {
    sha256: Sha256,
    sha512: Option<Sha512>,
    len: u64,
}

impl Digests {
    pub(crate) fn new(sha512: bool) -> Self {
        Digests {
            sha256: Sha256::new(),
            sha512: sha512.then(Sha512::new),
            len: 0,
        }
    }

    pub(crate) fn update(&mut self, data: &[u8]) {
        self.sha256.update(data);
        if let Some(h) = self.sha512.as_mut() {
            h.update(data);
        }
        self.len += data.len() as u64;
    }

    /// (sha256 hex, sha512 hex when computed, length).
    pub(crate) fn finish(self) -> (String, Option<String>, u64) {
        (
            hex::encode(self.sha256.finalize()),
            self.sha512.map(|h| hex::encode(h.finalize())),
            self.len,
        )
    }
}

/// [`Digests`] computed on a blocking thread beside the transfer: the task that cuts the stream
/// hands each piece over (a `Bytes` clone, no copy) and goes on, so hashing overlaps reading
/// and sending. The hand-over queue is short, so memory stays bounded: a hasher that falls
/// behind holds the stream up.
pub(crate) struct HashFeed {
    tx: Option<tokio::sync::mpsc::Sender<Bytes>>,
    hasher: tokio::task::JoinHandle<Digests>,
    len: u64,
}

impl HashFeed {
    /// Pieces queued for the hasher at most.
    const QUEUE: usize = 4;

    pub(crate) fn spawn(sha512: bool) -> HashFeed {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Bytes>(Self::QUEUE);
        let hasher = tokio::task::spawn_blocking(move || {
            let mut d = Digests::new(sha512);
            while let Some(piece) = rx.blocking_recv() {
                d.update(&piece);
            }
            d
        });
        HashFeed {
            tx: Some(tx),
            hasher,
            len: 0,
        }
    }

    /// Bytes handed over so far.
    pub(crate) fn len(&self) -> u64 {
        self.len
    }

    pub(crate) async fn update(&mut self, piece: Bytes) -> Result<(), Error> {
        self.len += piece.len() as u64;
        let gone = || {
            Error::new(
                ErrorKind::Internal,
                "the stream's hashing thread ended early",
            )
        };
        match &self.tx {
            Some(tx) => tx.send(piece).await.map_err(|_| gone()),
            None => Err(gone()),
        }
    }

    /// Waits for the hasher to take in every piece: (sha256 hex, sha512 hex when computed,
    /// length).
    pub(crate) async fn finish(mut self) -> Result<(String, Option<String>, u64), Error> {
        self.tx = None;
        let d = (&mut self.hasher).await.map_err(|e| {
            Error::new(ErrorKind::Internal, "the stream's hashing thread failed").with_source(e)
        })?;
        Ok(d.finish())
    }
}

/// A producer's stream as it passes through a pump task that hands every piece to a
/// [`HashFeed`] before passing it on: the consumer (the HTTP client's body) gets the same pieces
/// while they are hashed on another core. The pump holds at most one piece ahead of the
/// consumer besides the hasher's short queue, so memory stays bounded, and it stops with the
/// consumer or when [`Hashed`] is dropped.
pub(crate) fn hashed(mut inner: ByteStream, sha512: bool) -> (ByteStream, Hashed) {
    use futures_util::StreamExt;
    let (tx, mut rx) = tokio::sync::mpsc::channel::<crate::error::Result<Bytes>>(1);
    let pump = tokio::spawn(async move {
        let mut feed = HashFeed::spawn(sha512);
        while let Some(item) = inner.next().await {
            let piece = match item {
                Ok(piece) => piece,
                Err(e) => {
                    let _ = tx.send(Err(e)).await;
                    return None;
                }
            };
            if let Err(e) = feed.update(piece.clone()).await {
                let _ = tx.send(Err(e)).await;
                return None;
            }
            if tx.send(Ok(piece)).await.is_err() {
                return None; // the consumer is gone
            }
        }
        drop(tx);
        feed.finish().await.ok()
    });
    let stream = futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx));
    (Box::pin(stream), Hashed { pump })
}

/// The digests of a [`hashed`] stream, ready once the stream ended; dropping it stops the
/// pump (and drops the producer) wherever it is.
pub(crate) struct Hashed {
    pump: tokio::task::JoinHandle<Option<(String, Option<String>, u64)>>,
}

impl Hashed {
    /// (sha256 hex, sha512 hex when asked, length) of everything the stream gave; an error
    /// when the stream did not end cleanly (its consumer saw why).
    pub(crate) async fn finish(mut self) -> Result<(String, Option<String>, u64), Error> {
        match (&mut self.pump).await {
            Ok(Some(d)) => Ok(d),
            Ok(None) => Err(Error::new(
                ErrorKind::Internal,
                "the stream ended before all of it was hashed",
            )),
            Err(e) => Err(
                Error::new(ErrorKind::Internal, "the stream's hashing task failed").with_source(e),
            ),
        }
    }
}

impl Drop for Hashed {
    fn drop(&mut self) {
        self.pump.abort();
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
    /// Bytes the HTTP client took.
    pub sent: u64,
    /// The producer's own error, kept with its kind (the HTTP client only sees an I/O error).
    pub producer_error: Option<Error>,
    /// The stream ended with exactly the expected length.
    pub complete: bool,
    expected: u64,
}

impl Meter {
    /// A meter for a stream of `expected` bytes.
    pub(crate) fn new(expected: u64) -> Arc<Mutex<Meter>> {
        Arc::new(Mutex::new(Meter {
            sent: 0,
            producer_error: None,
            complete: false,
            expected,
        }))
    }

    pub(crate) fn sent(&self) -> u64 {
        self.sent
    }
}

/// Locks a meter; a poisoned lock (a panic elsewhere) still holds usable counters.
pub(crate) fn lock(m: &Mutex<Meter>) -> std::sync::MutexGuard<'_, Meter> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A request body over the producer's stream: counts what the HTTP client takes,
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
                    m.sent += chunk.len() as u64;
                    (m.sent, m.expected)
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
    pieces: Arc<[Bytes]>,
    /// The piece being sent, and the offset in it.
    at: (usize, usize),
    progress: Arc<Progress>,
}

impl BufferBody {
    const SLICE: usize = 256 * 1024;

    /// A body of `pieces`, one after the other (shared, not copied: a resend makes another).
    pub(crate) fn new(pieces: Arc<[Bytes]>, progress: Arc<Progress>) -> Self {
        BufferBody {
            pieces,
            at: (0, 0),
            progress,
        }
    }
}

impl Stream for BufferBody {
    type Item = Result<Bytes, std::io::Error>;

    fn poll_next(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.progress.touch();
        loop {
            let (i, pos) = self.at;
            let Some(piece) = self.pieces.get(i) else {
                return Poll::Ready(None);
            };
            if pos >= piece.len() {
                self.at = (i + 1, 0);
                continue;
            }
            let end = (pos + Self::SLICE).min(piece.len());
            let slice = piece.slice(pos..end);
            self.at = (i, end);
            return Poll::Ready(Some(Ok(slice)));
        }
    }
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

    fn stream_of(chunks: Vec<Result<Bytes, Error>>) -> ByteStream {
        Box::pin(futures_util::stream::iter(chunks))
    }

    #[tokio::test]
    async fn buffer_body_sends_its_pieces_in_order_in_slices() {
        let big: Vec<u8> = (0..600_000u32).map(|i| (i % 251) as u8).collect();
        let pieces: Arc<[Bytes]> = vec![
            Bytes::from_static(b"head"),
            Bytes::new(),
            Bytes::from(big.clone()),
            Bytes::from_static(b"tail"),
        ]
        .into();
        let out: Vec<Bytes> = BufferBody::new(pieces.clone(), Progress::new())
            .map(|r| r.unwrap())
            .collect()
            .await;
        assert!(out
            .iter()
            .all(|s| !s.is_empty() && s.len() <= BufferBody::SLICE));
        let joined: Vec<u8> = out.concat();
        let want: Vec<u8> = pieces.iter().flat_map(|p| p.to_vec()).collect();
        assert_eq!(joined, want);
        // A resend is a new body over the same pieces.
        let again: Vec<u8> = BufferBody::new(pieces, Progress::new())
            .map(|r| r.unwrap().to_vec())
            .collect::<Vec<_>>()
            .await
            .concat();
        assert_eq!(again, want);
    }

    #[tokio::test]
    async fn hash_feed_hashes_off_thread_what_it_was_handed() {
        let mut feed = HashFeed::spawn(false);
        for piece in [&b"hello"[..], b" ", b"world"] {
            feed.update(Bytes::copy_from_slice(piece)).await.unwrap();
        }
        assert_eq!(feed.len(), 11);
        let (s256, s512, len) = feed.finish().await.unwrap();
        assert_eq!(len, 11);
        assert_eq!(
            s256,
            "b94d27b9934d3e08a52e52d7da7dabfac484efe37a5380ee9088f7ace2efcde9"
        );
        assert_eq!(s512, None, "no sha512 was asked for");
        let mut feed = HashFeed::spawn(true);
        feed.update(Bytes::from_static(b"abc")).await.unwrap();
        let (_, s512, _) = feed.finish().await.unwrap();
        assert_eq!(
            s512.as_deref(),
            Some(
                "ddaf35a193617abacc417349ae20413112e6fa4e89a97ea20a9eeee64b55d39a\
                 2192992a274fc1a836ba3c23a3feebbd454d4423643ce80e2a9ac94fa54ca49f"
            )
        );
    }

    #[tokio::test]
    async fn a_hashed_metered_body_hashes_and_checks_length() {
        let data = Bytes::from_static(b"hello world");
        let meter = Meter::new(11);
        let (stream, hashes) = hashed(
            stream_of(vec![Ok(data.slice(..5)), Ok(data.slice(5..))]),
            true,
        );
        let body = MeteredBody::new(stream, meter.clone(), Progress::new());
        let out: Vec<_> = body.collect().await;
        let got: Vec<u8> = out.into_iter().flat_map(|r| r.unwrap().to_vec()).collect();
        assert_eq!(got, b"hello world");
        assert!(lock(&meter).complete);
        assert_eq!(lock(&meter).sent, 11);
        let (s256, s512, len) = hashes.finish().await.unwrap();
        assert_eq!(len, 11);
        assert_eq!(
            s256,
            "b94d27b9934d3e08a52e52d7da7dabfac484efe37a5380ee9088f7ace2efcde9"
        );
        assert_eq!(s512.map(|h| h.len()), Some(128));
    }

    #[tokio::test]
    async fn a_hashed_stream_passes_errors_on_and_has_no_digests() {
        let (stream, hashes) = hashed(
            stream_of(vec![
                Ok(Bytes::from_static(b"ab")),
                Err(Error::new(ErrorKind::Unavailable, "nbd gone")),
            ]),
            false,
        );
        let out: Vec<_> = stream.collect().await;
        assert_eq!(out.len(), 2);
        assert_eq!(out[1].as_ref().unwrap_err().kind(), ErrorKind::Unavailable);
        assert!(hashes.finish().await.is_err());
        // A consumer that goes away early stops the pump; the digests are refused.
        let (stream, hashes) = hashed(
            stream_of((0..100).map(|_| Ok(Bytes::from_static(b"ab"))).collect()),
            false,
        );
        let mut stream = stream;
        assert!(futures_util::StreamExt::next(&mut stream).await.is_some());
        drop(stream);
        assert!(hashes.finish().await.is_err());
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
