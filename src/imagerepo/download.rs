//! Download links: an image version served over plain HTTP/1.1 to anyone holding a signed,
//! expiring token, in raw or qcow2, generated from the manifest while it is sent.
//!
//! # Links
//!
//! A link is `/v1/download/{token}`. The token is URL-safe base64 (no padding) of
//!
//! ```text
//! version (1) | format (1: 0 raw, 1 qcow2) | expires_unix (u64 BE)
//!   | image length (u32 BE) | image | content digest length (u32 BE) | content digest
//!   | HMAC-SHA256 (32 bytes) over a domain label and everything before it
//! ```
//!
//! so the claim ([`LinkClaim`]) travels in the link itself and the server keeps no table of
//! links. The key ([`LinkSigner`]) is 32 random bytes in a file of mode 0600; servers that
//! share one address must share the key file. [`LinkSigner::verify`] checks the MAC in constant
//! time before it reads any field, then the expiry: a link altered in any byte is
//! PERMISSION_DENIED with reason `LINK_INVALID`, an expired one `LINK_EXPIRED` (HTTP 403 both).
//! The expiry is checked when a request starts: a download under way is not cut at the expiry.
//! A link names one version (the content digest): when the image is recaptured, deleted or
//! purged, the [`ImageSource`] answers NOT_FOUND and the link answers `410 Gone`.
//!
//! # Bodies, and `Range`
//!
//! Nothing is stored per format. Each request asks the [`ImageSource`] for the version's
//! manifest (data chunks only) and generates the requested bytes on a blocking thread that
//! hands pieces of at most 1 MiB to the connection through a queue of [`QUEUE_PIECES`]: memory
//! per download is one chunk buffer (4 MiB) plus the queue, whatever the image size. A client
//! that goes away closes the queue and the generator stops.
//!
//! - **raw**: the guest address space. A data chunk's bytes are read (and sliced to the range);
//!   a chunk the manifest does not list is a hole, sent as zeros and never read.
//! - **qcow2**: the stream of the project's own encoder ([`crate::format::qcow2`]), laid out
//!   once per request from the manifest's cluster masks ([`Qcow2Layout`]): metadata (header,
//!   L1, refcounts, L2), then the allocated guest clusters in guest order, each 64 KiB. The
//!   layout tells where every byte is without generating what comes before, so a range is
//!   served by starting there: the metadata from its first cluster in the range on
//!   ([`Qcow2Layout::metadata_from`], added to the encoder for this), the data clusters found
//!   from the host offset through the running count of allocated clusters per range. Chunks
//!   outside the range are never read. The bytes are the same as the exporter's `qcow2` file
//!   (`src/export`), which walks the same layout from byte 0.
//!
//! A single `Range: bytes=a-b`, `bytes=a-` or `bytes=-n` is answered `206` with
//! `Content-Range`; a range starting past the end (or `-0`) is `416` with `bytes */LEN`. A
//! request for several ranges, a malformed header or another unit is answered `200` with the
//! whole image (RFC 9110 lets a server ignore `Range`), and so is a `Range` whose `If-Range`
//! does not match the current `ETag` (`"{content digest}-{format}"`), so a resume never glues
//! two versions together. Responses carry `Content-Length`, `Accept-Ranges: bytes`, `ETag`
//! and a `Content-Disposition` file name `{image id}-{digest prefix}.{raw|qcow2}`.
//!
//! The [`ImageSource`] checks each chunk's digest as it reads it (as
//! [`crate::repo::Repository::read_chunk`] does); a failed read mid-body ends the connection
//! before `Content-Length` bytes were sent, so the client sees a broken download, never wrong
//! bytes. On shutdown the listener closes and downloads in flight are cut: clients resume
//! with `Range`.

use std::convert::Infallible;
use std::future::Future;
use std::io::Read;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use hmac::{Hmac, Mac};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use sha2::Sha256;
use tokio::sync::mpsc;

use crate::error::{denied, internal, Error, ErrorKind, Result};
use crate::format::qcow2::Qcow2Layout;
use crate::repo::manifest::{allocated_cluster_ranges, chunk_len};
use crate::repo::{DataChunk, CHUNK_SIZE, CLUSTER_SIZE};

/// Length of the signing key in bytes.
const KEY_LEN: usize = 32;
/// Length of the MAC at the end of a token.
const MAC_LEN: usize = 32;
/// The token layout's version byte.
const TOKEN_VERSION: u8 = 1;
/// Fed to the MAC before the claim, so a key used for anything else cannot sign links.
const MAC_LABEL: &[u8] = b"imagerepo.v1 download link\0";
/// Longest token accepted (the URL path stays well under common limits).
const MAX_TOKEN_CHARS: usize = 4096;
/// The URL path prefix of a link.
pub const DOWNLOAD_PATH: &str = "/v1/download/";

/// Largest body piece handed to the connection.
const PIECE: usize = 1 << 20;
/// Body pieces queued between the generator and the connection.
pub const QUEUE_PIECES: usize = 4;
/// Connections served at once; more are closed at accept.
const MAX_CONNECTIONS: usize = 256;
/// A client must send its request head within this time.
const HEADER_TIMEOUT: Duration = Duration::from_secs(30);

/// Zeros for holes, sent without a copy.
static ZEROS: [u8; PIECE] = [0; PIECE];

type HmacSha256 = Hmac<Sha256>;

/// The format a link serves, chosen when the link is made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkFormat {
    Raw,
    Qcow2,
}

impl LinkFormat {
    /// "raw" or "qcow2" (also the file name extension).
    pub fn as_str(self) -> &'static str {
        match self {
            LinkFormat::Raw => "raw",
            LinkFormat::Qcow2 => "qcow2",
        }
    }

    fn code(self) -> u8 {
        match self {
            LinkFormat::Raw => 0,
            LinkFormat::Qcow2 => 1,
        }
    }

    fn from_code(c: u8) -> Option<LinkFormat> {
        match c {
            0 => Some(LinkFormat::Raw),
            1 => Some(LinkFormat::Qcow2),
            _ => None,
        }
    }
}

/// What a link grants: one version of one image, in one format, until a time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkClaim {
    /// `projects/{project}/images/{image}`.
    pub image: String,
    /// The version: the image's content digest when the link was made.
    pub content_digest: String,
    pub format: LinkFormat,
    /// Seconds since the Unix epoch; the link is refused from this second on.
    pub expires_unix: u64,
}

/// Signs and verifies link tokens with the server's key.
pub struct LinkSigner {
    key: [u8; KEY_LEN],
}

impl std::fmt::Debug for LinkSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LinkSigner { key: <hidden> }")
    }
}

impl LinkSigner {
    /// A signer over `key` (tests, or a key kept elsewhere).
    pub fn from_key(key: [u8; KEY_LEN]) -> LinkSigner {
        LinkSigner { key }
    }

    /// Reads the key at `key_path`, or creates it (32 bytes from `/dev/urandom`, mode 0600,
    /// written to a temp file, fsynced and renamed into place) when the file does not exist.
    /// A key file that group or others may read or write, that is not a regular file (a
    /// symbolic link is not followed) or that is not exactly 32 bytes long is refused.
    pub fn load_or_create(key_path: &Path) -> Result<LinkSigner> {
        match read_key(key_path)? {
            Some(key) => Ok(LinkSigner { key }),
            None => {
                let mut key = [0u8; KEY_LEN];
                std::fs::File::open("/dev/urandom")
                    .and_then(|mut f| f.read_exact(&mut key))
                    .map_err(|e| Error::io("reading /dev/urandom for the download link key", e))?;
                crate::util::write_atomic(key_path, &key).map_err(|e| {
                    Error::new(
                        e.kind(),
                        format!("creating the download link key {}", key_path.display()),
                    )
                    .with_source(e)
                })?;
                tracing::info!(path = %key_path.display(), "created a new download link key");
                // Read back what is on disk: the one file every later start uses.
                match read_key(key_path)? {
                    Some(key) => Ok(LinkSigner { key }),
                    None => Err(internal(format!(
                        "download link key {} vanished right after it was written",
                        key_path.display()
                    ))),
                }
            }
        }
    }

    /// The URL-safe token of `claim`: its fields and their HMAC-SHA256.
    pub fn sign(&self, claim: &LinkClaim) -> String {
        let mut out = encode_claim(claim);
        let mac = self.mac(&out).finalize().into_bytes();
        out.extend_from_slice(&mac);
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(out)
    }

    /// The claim of `token` if its MAC is ours (compared in constant time) and it has not
    /// expired at `now_unix`. PERMISSION_DENIED with reason `LINK_INVALID` (altered, truncated,
    /// another key) or `LINK_EXPIRED`.
    pub fn verify(&self, token: &str, now_unix: u64) -> Result<LinkClaim> {
        let invalid = || {
            denied("the download link is not valid: it was altered, cut short or signed by another server key")
                .with_reason("LINK_INVALID")
        };
        if token.len() > MAX_TOKEN_CHARS {
            return Err(invalid());
        }
        let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(token)
            .map_err(|_| invalid())?;
        if raw.len() < MAC_LEN {
            return Err(invalid());
        }
        let (body, tag) = raw.split_at(raw.len() - MAC_LEN);
        self.mac(body).verify_slice(tag).map_err(|_| invalid())?;
        let claim = decode_claim(body).ok_or_else(invalid)?;
        if now_unix >= claim.expires_unix {
            return Err(denied(format!(
                "the download link of image {} expired at {}: ask for a new link",
                claim.image,
                crate::util::rfc3339(claim.expires_unix.min(i64::MAX as u64) as i64)
            ))
            .with_reason("LINK_EXPIRED")
            .with_subject(claim.image));
        }
        Ok(claim)
    }

    fn mac(&self, body: &[u8]) -> HmacSha256 {
        let mut m =
            <HmacSha256 as Mac>::new_from_slice(&self.key).expect("HMAC takes a key of any length");
        m.update(MAC_LABEL);
        m.update(body);
        m
    }
}

/// Reads a key file; `None` when it does not exist.
fn read_key(path: &Path) -> Result<Option<[u8; KEY_LEN]>> {
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    let what = || format!("download link key {}", path.display());
    let mut f = match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
            return Err(Error::new(
                ErrorKind::FailedPrecondition,
                format!("{} is a symbolic link: give the key file itself", what()),
            )
            .with_reason("LINK_KEY_UNSAFE"))
        }
        Err(e) => return Err(Error::io(format!("opening {}", what()), e)),
    };
    let meta = f
        .metadata()
        .map_err(|e| Error::io(format!("reading {}", what()), e))?;
    if !meta.is_file() {
        return Err(Error::new(
            ErrorKind::FailedPrecondition,
            format!("{} is not a regular file", what()),
        )
        .with_reason("LINK_KEY_UNSAFE"));
    }
    if meta.mode() & 0o077 != 0 {
        return Err(Error::new(
            ErrorKind::FailedPrecondition,
            format!(
                "{} has mode {:04o}: group and others must have no access to it, whoever \
                 reads it can make download links for every image (chmod 600 {})",
                what(),
                meta.mode() & 0o7777,
                path.display()
            ),
        )
        .with_reason("LINK_KEY_UNSAFE"));
    }
    if meta.len() != KEY_LEN as u64 {
        return Err(Error::new(
            ErrorKind::FailedPrecondition,
            format!(
                "{} is {} bytes long, a key is exactly {KEY_LEN}: remove the file to have a new \
                 key made (links made with the old key stop working)",
                what(),
                meta.len()
            ),
        )
        .with_reason("LINK_KEY_INVALID"));
    }
    let mut key = [0u8; KEY_LEN];
    f.read_exact(&mut key)
        .map_err(|e| Error::io(format!("reading {}", what()), e))?;
    Ok(Some(key))
}

fn encode_claim(c: &LinkClaim) -> Vec<u8> {
    let mut out = Vec::with_capacity(18 + c.image.len() + c.content_digest.len() + MAC_LEN);
    out.push(TOKEN_VERSION);
    out.push(c.format.code());
    out.extend_from_slice(&c.expires_unix.to_be_bytes());
    for s in [&c.image, &c.content_digest] {
        out.extend_from_slice(&(s.len() as u32).to_be_bytes());
        out.extend_from_slice(s.as_bytes());
    }
    out
}

fn decode_claim(body: &[u8]) -> Option<LinkClaim> {
    fn take<'a>(b: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
        if b.len() < n {
            return None;
        }
        let (head, rest) = b.split_at(n);
        *b = rest;
        Some(head)
    }
    fn string(b: &mut &[u8]) -> Option<String> {
        let n = u32::from_be_bytes(take(b, 4)?.try_into().ok()?) as usize;
        String::from_utf8(take(b, n)?.to_vec()).ok()
    }
    let mut b = body;
    if take(&mut b, 1)? != [TOKEN_VERSION] {
        return None;
    }
    let format = LinkFormat::from_code(take(&mut b, 1)?[0])?;
    let expires_unix = u64::from_be_bytes(take(&mut b, 8)?.try_into().ok()?);
    let image = string(&mut b)?;
    let content_digest = string(&mut b)?;
    b.is_empty().then_some(LinkClaim {
        image,
        content_digest,
        format,
        expires_unix,
    })
}

/// Where the bytes come from: the server's catalog and chunk store. Blocking calls, made on
/// the blocking pool.
pub trait ImageSource: Send + Sync {
    /// The virtual size and data chunks (any order) of version `content_digest` of `image`;
    /// NOT_FOUND when the image or that version is gone (the link answers 410).
    fn manifest(
        &self,
        image: &str,
        content_digest: &str,
    ) -> crate::error::Result<(u64, Vec<crate::repo::DataChunk>)>;
    /// Fills `buf` (cleared first) with the bytes of chunk `digest`, checking the digest.
    fn read_chunk(
        &self,
        digest: &crate::repo::Digest,
        buf: &mut Vec<u8>,
    ) -> crate::error::Result<()>;
}

/// Bytes a link of `format` serves for an image of `virtual_size` with data chunks `chunks`;
/// 0 when it cannot be served in that format (see [`try_image_len`] for why).
pub fn image_len(virtual_size: u64, chunks: &[DataChunk], format: LinkFormat) -> u64 {
    try_image_len("image", virtual_size, chunks, format).unwrap_or(0)
}

/// Bytes a link of `format` serves, or why it cannot: a manifest entry beyond the virtual
/// size or listed twice, or (qcow2) a virtual size that is not whole 512-byte sectors. The
/// server calls this when it makes a link, so a link it hands out can be served.
pub fn try_image_len(
    image: &str,
    virtual_size: u64,
    chunks: &[DataChunk],
    format: LinkFormat,
) -> Result<u64> {
    Ok(Body::new(image, virtual_size, chunks.to_vec(), format)?.len())
}

/// The generator of one image version's bytes in one format.
struct Body {
    image: String,
    virtual_size: u64,
    /// Sorted by index.
    chunks: Vec<DataChunk>,
    qcow2: Option<Qcow2Plan>,
}

struct Qcow2Plan {
    layout: Qcow2Layout,
    /// `data_before[i]`: allocated clusters in the layout's ranges before range `i`.
    data_before: Vec<u64>,
}

impl Body {
    fn new(
        image: &str,
        virtual_size: u64,
        mut chunks: Vec<DataChunk>,
        format: LinkFormat,
    ) -> Result<Body> {
        chunks.sort_unstable_by_key(|c| c.index);
        let count = virtual_size.div_ceil(CHUNK_SIZE);
        for w in chunks.windows(2) {
            if w[0].index == w[1].index {
                return Err(internal(format!(
                    "image {image}: the manifest lists chunk {} twice",
                    w[0].index
                )));
            }
        }
        if let Some(c) = chunks.iter().find(|c| c.index >= count || c.mask == 0) {
            return Err(internal(format!(
                "image {image}: manifest entry {} is beyond the virtual size of {virtual_size} \
                 bytes or has no data cluster",
                c.index
            )));
        }
        let qcow2 = match format {
            LinkFormat::Raw => None,
            LinkFormat::Qcow2 => {
                let layout = Qcow2Layout::new(virtual_size, allocated_cluster_ranges(&chunks))
                    .map_err(|e| {
                        Error::new(
                            ErrorKind::FailedPrecondition,
                            format!("image {image} cannot be laid out as qcow2"),
                        )
                        .with_reason("QCOW2_UNSUPPORTED")
                        .with_source(e)
                    })?;
                let mut data_before = Vec::with_capacity(layout.allocated_ranges().len());
                let mut n = 0;
                for r in layout.allocated_ranges() {
                    data_before.push(n);
                    n += r.end - r.start;
                }
                Some(Qcow2Plan {
                    layout,
                    data_before,
                })
            }
        };
        Ok(Body {
            image: image.to_string(),
            virtual_size,
            chunks,
            qcow2,
        })
    }

    fn len(&self) -> u64 {
        match &self.qcow2 {
            None => self.virtual_size,
            Some(q) => q.layout.total_size(),
        }
    }

    fn chunk(&self, index: u64) -> Option<&DataChunk> {
        self.chunks
            .binary_search_by_key(&index, |c| c.index)
            .ok()
            .map(|i| &self.chunks[i])
    }

    /// Reads chunk `c` into `buf` through `source`, checking its length.
    fn read(&self, source: &dyn ImageSource, c: &DataChunk, buf: &mut Vec<u8>) -> Result<()> {
        source.read_chunk(&c.digest, buf)?;
        let want = chunk_len(self.virtual_size, c.index);
        if buf.len() as u64 != want {
            return Err(internal(format!(
                "image {}: chunk {} holds {} bytes, expected {want}",
                self.image,
                c.index,
                buf.len()
            )));
        }
        Ok(())
    }

    /// Sends bytes `range` of the image to `out`.
    fn generate(&self, source: &dyn ImageSource, range: Range<u64>, out: &mut Out) -> Result<()> {
        match &self.qcow2 {
            None => self.generate_raw(source, range, out),
            Some(q) => self.generate_qcow2(q, source, range, out),
        }
    }

    fn generate_raw(&self, source: &dyn ImageSource, r: Range<u64>, out: &mut Out) -> Result<()> {
        let mut buf = Vec::with_capacity(CHUNK_SIZE as usize);
        let mut pos = r.start;
        while pos < r.end {
            let index = pos / CHUNK_SIZE;
            let base = index * CHUNK_SIZE;
            let end = (base + CHUNK_SIZE).min(r.end);
            match self.chunk(index) {
                None => out.zeros(end - pos)?,
                Some(c) => {
                    self.read(source, c, &mut buf)?;
                    out.put(&buf[(pos - base) as usize..(end - base) as usize])?;
                }
            }
            pos = end;
        }
        Ok(())
    }

    fn generate_qcow2(
        &self,
        q: &Qcow2Plan,
        source: &dyn ImageSource,
        r: Range<u64>,
        out: &mut Out,
    ) -> Result<()> {
        let meta_end = q.layout.data_offset();
        if r.start < meta_end {
            let first = r.start / CLUSTER_SIZE;
            let mut pos = first * CLUSTER_SIZE;
            for piece in q.layout.metadata_from(first) {
                let p = pos..pos + piece.len() as u64;
                let (a, b) = (p.start.max(r.start), p.end.min(r.end));
                if a < b {
                    out.put(&piece[(a - p.start) as usize..(b - p.start) as usize])?;
                }
                pos = p.end;
                if pos >= r.end {
                    break;
                }
            }
        }
        if r.end <= meta_end {
            return Ok(());
        }
        // Data cluster k (the k-th allocated guest cluster) sits at meta_end + k * CLUSTER_SIZE.
        let start = r.start.max(meta_end);
        let k_first = (start - meta_end) / CLUSTER_SIZE;
        let k_end = (r.end - meta_end).div_ceil(CLUSTER_SIZE);
        let ranges = q.layout.allocated_ranges();
        let mut ri = q.data_before.partition_point(|&d| d <= k_first) - 1;
        let mut buf = Vec::with_capacity(CHUNK_SIZE as usize);
        let mut cached: Option<u64> = None;
        let mut cluster = vec![0u8; CLUSTER_SIZE as usize];
        let per_chunk = CHUNK_SIZE / CLUSTER_SIZE;
        for k in k_first..k_end {
            while k - q.data_before[ri] >= ranges[ri].end - ranges[ri].start {
                ri += 1;
            }
            let guest = ranges[ri].start + (k - q.data_before[ri]);
            let index = guest / per_chunk;
            if cached != Some(index) {
                let c = self.chunk(index).ok_or_else(|| {
                    internal(format!(
                        "image {}: qcow2 cluster {guest} maps to no data chunk",
                        self.image
                    ))
                })?;
                self.read(source, c, &mut buf)?;
                cached = Some(index);
            }
            let off = ((guest % per_chunk) * CLUSTER_SIZE) as usize;
            let inside = (buf.len() - off).min(CLUSTER_SIZE as usize);
            cluster[..inside].copy_from_slice(&buf[off..off + inside]);
            cluster[inside..].fill(0);
            let p = meta_end + k * CLUSTER_SIZE;
            let (a, b) = (p.max(r.start), (p + CLUSTER_SIZE).min(r.end));
            out.put(&cluster[(a - p) as usize..(b - p) as usize])?;
        }
        Ok(())
    }
}

/// The client went away: stop generating.
struct Gone;

impl From<Gone> for Error {
    fn from(_: Gone) -> Error {
        Error::new(ErrorKind::Cancelled, "the client closed the download")
    }
}

/// Gathers generated bytes into pieces of at most [`PIECE`] and queues them for the
/// connection (blocking while the queue is full: the client's pace is the generator's).
struct Out {
    tx: mpsc::Sender<std::io::Result<Bytes>>,
    pending: BytesMut,
    sent: u64,
}

impl Out {
    fn put(&mut self, mut data: &[u8]) -> std::result::Result<(), Gone> {
        while !data.is_empty() {
            let n = (PIECE - self.pending.len()).min(data.len());
            self.pending.extend_from_slice(&data[..n]);
            data = &data[n..];
            if self.pending.len() == PIECE {
                self.flush()?;
            }
        }
        Ok(())
    }

    fn zeros(&mut self, mut n: u64) -> std::result::Result<(), Gone> {
        self.flush()?;
        while n > 0 {
            let k = n.min(PIECE as u64) as usize;
            self.send(Bytes::from_static(&ZEROS[..k]))?;
            n -= k as u64;
        }
        Ok(())
    }

    fn flush(&mut self) -> std::result::Result<(), Gone> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let piece = self.pending.split().freeze();
        self.pending.reserve(PIECE);
        self.send(piece)
    }

    fn send(&mut self, b: Bytes) -> std::result::Result<(), Gone> {
        self.sent += b.len() as u64;
        self.tx.blocking_send(Ok(b)).map_err(|_| Gone)
    }
}

/// What a `Range` header asks of a body of known length.
#[derive(Debug, Clone, PartialEq, Eq)]
enum RangeAsk {
    /// No range (or one this server ignores: several, malformed, another unit): `200`.
    Whole,
    /// One satisfiable range, clamped to the body: `206`.
    Part(Range<u64>),
    /// A range that starts past the end: `416`.
    Unsatisfiable,
}

/// Parses a `Range` header value against a body of `len` bytes (RFC 9110 §14.1.2).
fn parse_range(value: &str, len: u64) -> RangeAsk {
    let value = value.trim();
    let Some((unit, set)) = value.split_once('=') else {
        return RangeAsk::Whole;
    };
    if !unit.trim().eq_ignore_ascii_case("bytes") || set.contains(',') {
        return RangeAsk::Whole;
    }
    let Some((first, last)) = set.trim().split_once('-') else {
        return RangeAsk::Whole;
    };
    let (first, last) = (first.trim(), last.trim());
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if first.is_empty() {
        // Suffix: the last n bytes.
        if !digits(last) {
            return RangeAsk::Whole;
        }
        let n = last.parse::<u64>().unwrap_or(u64::MAX);
        if n == 0 || len == 0 {
            return RangeAsk::Unsatisfiable;
        }
        return RangeAsk::Part(len - n.min(len)..len);
    }
    if !digits(first) || !(last.is_empty() || digits(last)) {
        return RangeAsk::Whole;
    }
    // Too many digits to be a u64: past any end.
    let Ok(a) = first.parse::<u64>() else {
        return RangeAsk::Unsatisfiable;
    };
    let b = if last.is_empty() {
        u64::MAX
    } else {
        last.parse::<u64>().unwrap_or(u64::MAX)
    };
    if b < a {
        return RangeAsk::Whole;
    }
    if a >= len {
        return RangeAsk::Unsatisfiable;
    }
    RangeAsk::Part(a..b.min(len - 1) + 1)
}

type RespBody = BoxBody<Bytes, std::io::Error>;

struct Ctx {
    signer: Arc<LinkSigner>,
    source: Arc<dyn ImageSource>,
}

/// Serves download links on `listener` until `shutdown` completes: `GET` and `HEAD` of
/// `/v1/download/{token}` (see the [module docs](self)). HTTP/1.1, keep-alive; at most 256
/// connections at once; a request head must arrive within 30 s. When `shutdown` completes
/// the listener is dropped and downloads in flight are cut.
pub async fn serve(
    listener: tokio::net::TcpListener,
    signer: Arc<LinkSigner>,
    source: Arc<dyn ImageSource>,
    shutdown: impl Future<Output = ()>,
) -> Result<()> {
    let ctx = Arc::new(Ctx { signer, source });
    let limit = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let mut conns = tokio::task::JoinSet::new();
    let mut shutdown = std::pin::pin!(shutdown);
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "serving download links");
    }
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // Out of file descriptors and the like: wait a little, keep serving.
                        tracing::warn!(error = %e, "accepting a download connection");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let Ok(permit) = limit.clone().try_acquire_owned() else {
                    tracing::warn!(%peer, "too many download connections: closing a new one");
                    continue;
                };
                let ctx = ctx.clone();
                conns.spawn(async move {
                    let _permit = permit;
                    let service = hyper::service::service_fn(move |req| {
                        let ctx = ctx.clone();
                        async move { Ok::<_, Infallible>(handle(&ctx, req, peer).await) }
                    });
                    let conn = hyper::server::conn::http1::Builder::new()
                        .timer(hyper_util::rt::TokioTimer::new())
                        .header_read_timeout(HEADER_TIMEOUT)
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
                    if let Err(e) = conn.await {
                        tracing::debug!(%peer, error = %e, "download connection ended");
                    }
                });
            }
        }
    }
    drop(listener);
    conns.shutdown().await;
    tracing::info!("stopped serving download links");
    Ok(())
}

fn text(status: StatusCode, msg: impl Into<String>) -> Response<RespBody> {
    let mut body = msg.into();
    body.push('\n');
    let mut r = Response::new(
        Full::new(Bytes::from(body))
            .map_err(|n: Infallible| match n {})
            .boxed(),
    );
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

fn now_unix() -> u64 {
    crate::util::now_unix().max(0) as u64
}

/// The file name offered: `{image id}-{first 12 of the digest}.{format}`, safe characters only.
fn file_name(claim: &LinkClaim) -> String {
    let id = claim.image.rsplit('/').next().unwrap_or("image");
    let digest: String = claim.content_digest.chars().take(12).collect();
    let safe = |s: &str| -> String {
        s.chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                    c
                } else {
                    '_'
                }
            })
            .collect()
    };
    format!("{}-{}.{}", safe(id), safe(&digest), claim.format.as_str())
}

async fn handle(ctx: &Ctx, req: Request<Incoming>, peer: SocketAddr) -> Response<RespBody> {
    let Some(token) = req.uri().path().strip_prefix(DOWNLOAD_PATH) else {
        return text(
            StatusCode::NOT_FOUND,
            "no such path: links look like /v1/download/TOKEN",
        );
    };
    if token.is_empty() || token.contains('/') {
        return text(
            StatusCode::NOT_FOUND,
            "no such path: links look like /v1/download/TOKEN",
        );
    }
    let head = req.method() == Method::HEAD;
    if !head && req.method() != Method::GET {
        let mut r = text(StatusCode::METHOD_NOT_ALLOWED, "use GET or HEAD");
        r.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        return r;
    }
    let claim = match ctx.signer.verify(token, now_unix()) {
        Ok(c) => c,
        Err(e) => {
            tracing::info!(%peer, reason = %e.facts().reason, "download link refused");
            return text(StatusCode::FORBIDDEN, e.to_string());
        }
    };
    let source = ctx.source.clone();
    let (image, digest, format) = (
        claim.image.clone(),
        claim.content_digest.clone(),
        claim.format,
    );
    let body = tokio::task::spawn_blocking(move || {
        let (size, chunks) = source.manifest(&image, &digest)?;
        Body::new(&image, size, chunks, format)
    })
    .await
    .unwrap_or_else(|e| Err(internal(format!("manifest task failed: {e}"))));
    let body = match body {
        Ok(b) => Arc::new(b),
        Err(e) if e.kind() == ErrorKind::NotFound => {
            tracing::info!(%peer, image = %claim.image, version = %claim.content_digest, "download of a version that is gone");
            return text(
                StatusCode::GONE,
                format!(
                    "image {} no longer holds the version this link names ({}): {}",
                    claim.image,
                    claim.content_digest,
                    e.chain()
                ),
            );
        }
        Err(e) => {
            tracing::error!(%peer, image = %claim.image, error = %e.chain(), "download failed before its first byte");
            let status = if e.kind() == ErrorKind::Unavailable {
                StatusCode::SERVICE_UNAVAILABLE
            } else {
                StatusCode::INTERNAL_SERVER_ERROR
            };
            return text(
                status,
                format!("image {} cannot be served: {}", claim.image, e),
            );
        }
    };
    let len = body.len();
    let etag = format!("\"{}-{}\"", claim.content_digest, claim.format.as_str());
    let header_str = |name| req.headers().get(name).and_then(|v| v.to_str().ok());
    let if_range_ok = header_str(header::IF_RANGE).is_none_or(|v| v.trim() == etag);
    let ask = match header_str(header::RANGE) {
        Some(v) if if_range_ok => parse_range(v, len),
        _ => RangeAsk::Whole,
    };
    let (status, range) = match &ask {
        RangeAsk::Whole => (StatusCode::OK, 0..len),
        RangeAsk::Part(r) => (StatusCode::PARTIAL_CONTENT, r.clone()),
        RangeAsk::Unsatisfiable => (StatusCode::RANGE_NOT_SATISFIABLE, 0..0),
    };
    tracing::info!(
        %peer,
        image = %claim.image,
        version = %claim.content_digest,
        format = claim.format.as_str(),
        method = %req.method(),
        range = %format!("{}-{}", range.start, range.end),
        size = len,
        status = status.as_u16(),
        "download"
    );
    let resp_body: RespBody = if head || range.is_empty() {
        Empty::new().map_err(|n: Infallible| match n {}).boxed()
    } else {
        let (tx, rx) = mpsc::channel(QUEUE_PIECES);
        let source = ctx.source.clone();
        let gen = body.clone();
        let r = range.clone();
        tokio::task::spawn_blocking(move || {
            let mut out = Out {
                tx,
                pending: BytesMut::with_capacity(PIECE),
                sent: 0,
            };
            let res = gen
                .generate(source.as_ref(), r.clone(), &mut out)
                .and_then(|()| out.flush().map_err(Error::from));
            match res {
                Ok(()) if out.sent == r.end - r.start => {
                    tracing::debug!(image = %gen.image, range = ?r, "download sent");
                }
                Ok(()) => {
                    tracing::error!(image = %gen.image, range = ?r, sent = out.sent, "download generated the wrong length");
                    let _ = out
                        .tx
                        .blocking_send(Err(std::io::Error::other("length mismatch")));
                }
                Err(e) if e.kind() == ErrorKind::Cancelled => {
                    tracing::info!(image = %gen.image, range = ?r, sent = out.sent, "download cut by the client");
                }
                Err(e) => {
                    tracing::error!(image = %gen.image, range = ?r, sent = out.sent, error = %e.chain(), "download failed");
                    let _ = out.tx.blocking_send(Err(std::io::Error::other(e.chain())));
                }
            }
        });
        let stream = tokio_stream::wrappers::ReceiverStream::new(rx).map(|r| r.map(Frame::data));
        BodyExt::boxed(StreamBody::new(stream))
    };
    let mut resp = Response::new(resp_body);
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    let hv = |s: String| HeaderValue::from_str(&s).unwrap_or(HeaderValue::from_static("-"));
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    h.insert(header::ETAG, hv(etag));
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("private, no-transform"),
    );
    match ask {
        RangeAsk::Unsatisfiable => {
            h.insert(header::CONTENT_RANGE, hv(format!("bytes */{len}")));
            h.insert(header::CONTENT_LENGTH, HeaderValue::from(0u64));
        }
        _ => {
            if status == StatusCode::PARTIAL_CONTENT {
                h.insert(
                    header::CONTENT_RANGE,
                    hv(format!("bytes {}-{}/{len}", range.start, range.end - 1)),
                );
            }
            h.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/octet-stream"),
            );
            h.insert(
                header::CONTENT_DISPOSITION,
                hv(format!("attachment; filename=\"{}\"", file_name(&claim))),
            );
            h.insert(
                header::CONTENT_LENGTH,
                HeaderValue::from(range.end - range.start),
            );
        }
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::not_found;
    use crate::repo::manifest::{cluster_mask, is_zero};
    use crate::repo::Digest;
    use sha2::Digest as _;
    use std::collections::HashMap;
    use std::sync::atomic::{AtomicU64, Ordering};

    const CL: usize = CLUSTER_SIZE as usize;
    const CH: usize = CHUNK_SIZE as usize;
    const IMAGE: &str = "projects/p1/images/img-0123";

    fn signer() -> LinkSigner {
        LinkSigner::from_key([7u8; KEY_LEN])
    }

    fn claim(format: LinkFormat) -> LinkClaim {
        LinkClaim {
            image: IMAGE.into(),
            content_digest: "ab".repeat(32),
            format,
            expires_unix: 2_000_000_000,
        }
    }

    fn reason(e: &Error) -> String {
        e.facts().reason
    }

    #[test]
    fn link_round_trip() {
        let s = signer();
        for f in [LinkFormat::Raw, LinkFormat::Qcow2] {
            let t = s.sign(&claim(f));
            assert!(t
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'));
            assert_eq!(s.verify(&t, 1_999_999_999).unwrap(), claim(f));
        }
    }

    #[test]
    fn link_tampered_is_refused() {
        let s = signer();
        let c = claim(LinkFormat::Raw);
        let t = s.sign(&c);
        let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(&t)
            .unwrap();
        let mac = &raw[raw.len() - MAC_LEN..];
        let b64 = |v: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v);
        let refused = |token: &str, what: &str| {
            let e = s.verify(token, 1).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::PermissionDenied, "{what}");
            assert_eq!(reason(&e), "LINK_INVALID", "{what}");
        };
        // Each field changed, the original MAC kept.
        let variants = [
            LinkClaim {
                image: "projects/p2/images/img-0123".into(),
                ..c.clone()
            },
            LinkClaim {
                content_digest: "cd".repeat(32),
                ..c.clone()
            },
            LinkClaim {
                format: LinkFormat::Qcow2,
                ..c.clone()
            },
            LinkClaim {
                expires_unix: c.expires_unix + 86_400,
                ..c.clone()
            },
        ];
        for v in &variants {
            let mut body = encode_claim(v);
            body.extend_from_slice(mac);
            refused(&b64(&body), &format!("{v:?}"));
        }
        // Every single byte flipped, the MAC's included.
        for i in 0..raw.len() {
            let mut m = raw.clone();
            m[i] ^= 0x01;
            refused(&b64(&m), &format!("byte {i} flipped"));
        }
        refused(&b64(&raw[..raw.len() - 1]), "cut short");
        refused(&b64(&raw[..MAC_LEN - 1]), "shorter than a MAC");
        refused("", "empty");
        refused("not base64!", "not base64");
        refused(&"A".repeat(MAX_TOKEN_CHARS + 1), "too long");
        // Another server's key.
        let other = LinkSigner::from_key([8u8; KEY_LEN]);
        refused(&other.sign(&c), "another key");
    }

    #[test]
    fn link_expired_is_refused() {
        let s = signer();
        let c = LinkClaim {
            expires_unix: 1_000,
            ..claim(LinkFormat::Qcow2)
        };
        let t = s.sign(&c);
        assert_eq!(s.verify(&t, 999).unwrap(), c);
        for now in [1_000, 1_001, u64::MAX] {
            let e = s.verify(&t, now).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::PermissionDenied);
            assert_eq!(reason(&e), "LINK_EXPIRED");
            assert!(e.to_string().contains(IMAGE), "{e}");
            assert!(e.to_string().contains("1970-01-01T00:16:40Z"), "{e}");
        }
    }

    #[test]
    fn key_file_is_made_private_and_kept() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("link.key");
        let a = LinkSigner::load_or_create(&path).unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        assert_eq!(meta.len(), KEY_LEN as u64);
        let b = LinkSigner::load_or_create(&path).unwrap();
        assert_eq!(a.key, b.key, "the key is read back, not made again");
        let t = a.sign(&claim(LinkFormat::Raw));
        b.verify(&t, 0).unwrap();
        assert!(!format!("{a:?}").contains("7"), "Debug hides the key");

        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = LinkSigner::load_or_create(&path).unwrap_err();
        assert_eq!(reason(&e), "LINK_KEY_UNSAFE");
        assert!(e.to_string().contains("chmod 600"), "{e}");

        let short = dir.path().join("short.key");
        std::fs::write(&short, b"too short").unwrap();
        std::fs::set_permissions(&short, std::fs::Permissions::from_mode(0o600)).unwrap();
        let e = LinkSigner::load_or_create(&short).unwrap_err();
        assert_eq!(reason(&e), "LINK_KEY_INVALID");
        assert!(e.to_string().contains("9 bytes long"), "{e}");

        let link = dir.path().join("sym.key");
        std::os::unix::fs::symlink(&short, &link).unwrap();
        let e = LinkSigner::load_or_create(&link).unwrap_err();
        assert_eq!(reason(&e), "LINK_KEY_UNSAFE");
    }

    #[test]
    fn range_parsing() {
        use RangeAsk::*;
        let p = |s: &str| parse_range(s, 1000);
        assert_eq!(p("bytes=0-99"), Part(0..100));
        assert_eq!(p("bytes=0-0"), Part(0..1));
        assert_eq!(p("bytes=999-999"), Part(999..1000));
        assert_eq!(p("bytes=500-"), Part(500..1000));
        assert_eq!(p("bytes=500-5000"), Part(500..1000), "clamped to the end");
        assert_eq!(p("bytes=0-99999999999999999999999"), Part(0..1000));
        assert_eq!(p("bytes=-1"), Part(999..1000));
        assert_eq!(p("bytes=-300"), Part(700..1000));
        assert_eq!(
            p("bytes=-5000"),
            Part(0..1000),
            "suffix longer than the body"
        );
        assert_eq!(p("BYTES = 10 - 19 "), Part(10..20), "case and spaces");
        assert_eq!(p("bytes=1000-"), Unsatisfiable);
        assert_eq!(p("bytes=1000-2000"), Unsatisfiable);
        assert_eq!(p("bytes=99999999999999999999999-"), Unsatisfiable);
        assert_eq!(p("bytes=-0"), Unsatisfiable);
        assert_eq!(parse_range("bytes=0-", 0), Unsatisfiable);
        // Ignored: the whole body.
        assert_eq!(p("bytes=0-1,5-6"), Whole, "several ranges");
        assert_eq!(p("bytes=9-5"), Whole, "last before first");
        assert_eq!(p("bytes=-"), Whole);
        assert_eq!(p("bytes=a-b"), Whole);
        assert_eq!(p("bytes=+1-2"), Whole);
        assert_eq!(p("bytes=1-+2"), Whole);
        assert_eq!(p("bytes 0-1"), Whole);
        assert_eq!(p("items=0-1"), Whole);
        assert_eq!(p(""), Whole);
    }

    /// An image in memory, counting chunk reads.
    struct MemSource {
        virtual_size: u64,
        chunks: Vec<DataChunk>,
        data: HashMap<Digest, Vec<u8>>,
        digest: String,
        reads: AtomicU64,
    }

    impl ImageSource for MemSource {
        fn manifest(&self, image: &str, content_digest: &str) -> Result<(u64, Vec<DataChunk>)> {
            if image != IMAGE || content_digest != self.digest {
                return Err(not_found(format!(
                    "image {image} has no version {content_digest}"
                )));
            }
            // Any order: the server sorts.
            let mut c = self.chunks.clone();
            c.reverse();
            Ok((self.virtual_size, c))
        }

        fn read_chunk(&self, digest: &Digest, buf: &mut Vec<u8>) -> Result<()> {
            self.reads.fetch_add(1, Ordering::Relaxed);
            buf.clear();
            buf.extend_from_slice(
                self.data
                    .get(digest)
                    .ok_or_else(|| not_found("no such chunk"))?,
            );
            Ok(())
        }
    }

    /// A disk of four full chunks and a short fifth (ending mid-cluster): chunk 0 data with
    /// zero clusters inside, 1 a hole, 2 two scattered bits of data, 3 a hole, 4 all data.
    fn disk() -> (Vec<u8>, MemSource) {
        let vs = 4 * CHUNK_SIZE + 200 * 1024 + 512;
        let mut raw = vec![0u8; vs as usize];
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut fill = |buf: &mut [u8]| {
            for b in buf {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *b = (x >> 24) as u8 | 1;
            }
        };
        fill(&mut raw[..10 * CL]);
        fill(&mut raw[20 * CL..CH]);
        let b2 = 2 * CH;
        fill(&mut raw[b2 + 5 * CL..b2 + 6 * CL]);
        fill(&mut raw[b2 + CH - 100..b2 + CH]);
        fill(&mut raw[4 * CH..]);
        let mut chunks = Vec::new();
        let mut data = HashMap::new();
        for (i, c) in raw.chunks(CH).enumerate() {
            if is_zero(c) {
                continue;
            }
            let d: Digest = Sha256::digest(c).into();
            chunks.push(DataChunk {
                index: i as u64,
                digest: d,
                mask: cluster_mask(c),
            });
            data.insert(d, c.to_vec());
        }
        assert_eq!(chunks.len(), 3);
        let digest = crate::repo::manifest::content_digest(vs, &chunks);
        let src = MemSource {
            virtual_size: vs,
            chunks,
            data,
            digest,
            reads: AtomicU64::new(0),
        };
        (raw, src)
    }

    struct Server {
        base: String,
        signer: Arc<LinkSigner>,
        source: Arc<MemSource>,
        stop: Option<tokio::sync::oneshot::Sender<()>>,
        task: tokio::task::JoinHandle<Result<()>>,
    }

    impl Server {
        async fn start(source: MemSource) -> Server {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let base = format!("http://{}", listener.local_addr().unwrap());
            let signer = Arc::new(signer());
            let source = Arc::new(source);
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            let task = tokio::spawn(serve(
                listener,
                signer.clone(),
                source.clone() as Arc<dyn ImageSource>,
                async move {
                    let _ = stopped.await;
                },
            ));
            Server {
                base,
                signer,
                source,
                stop: Some(stop),
                task,
            }
        }

        fn url(&self, format: LinkFormat) -> String {
            let c = LinkClaim {
                content_digest: self.source.digest.clone(),
                expires_unix: now_unix() + 3600,
                ..claim(format)
            };
            format!("{}{DOWNLOAD_PATH}{}", self.base, self.signer.sign(&c))
        }

        async fn stop(mut self) {
            let _ = self.stop.take().unwrap().send(());
            self.task.await.unwrap().unwrap();
        }
    }

    async fn get(url: &str, range: Option<&str>) -> (u16, reqwest::header::HeaderMap, Vec<u8>) {
        let mut req = reqwest::Client::new().get(url);
        if let Some(r) = range {
            req = req.header("Range", r);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let body = resp.bytes().await.unwrap().to_vec();
        (status, headers, body)
    }

    fn h<'a>(headers: &'a reqwest::header::HeaderMap, name: &str) -> &'a str {
        headers.get(name).map(|v| v.to_str().unwrap()).unwrap_or("")
    }

    /// Reads `url` from byte 0 until at least `cut` bytes came, then drops the connection;
    /// returns exactly the first `cut` bytes.
    async fn get_cut(url: &str, cut: usize) -> Vec<u8> {
        let mut resp = reqwest::Client::new().get(url).send().await.unwrap();
        assert_eq!(resp.status().as_u16(), 200);
        let mut got = Vec::new();
        while got.len() < cut {
            let piece = resp
                .chunk()
                .await
                .unwrap()
                .expect("body ended before the cut");
            got.extend_from_slice(&piece);
        }
        drop(resp);
        got.truncate(cut);
        got
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn raw_download_with_ranges_and_refusals() {
        let (raw, src) = disk();
        let len = raw.len() as u64;
        assert_eq!(image_len(len, &src.chunks, LinkFormat::Raw), len);
        let srv = Server::start(src).await;
        let url = srv.url(LinkFormat::Raw);

        let (st, hd, body) = get(&url, None).await;
        assert_eq!(st, 200);
        assert!(body == raw, "the raw download differs from the disk");
        assert_eq!(h(&hd, "content-length"), len.to_string());
        assert_eq!(h(&hd, "accept-ranges"), "bytes");
        let etag = format!("\"{}-raw\"", srv.source.digest);
        assert_eq!(h(&hd, "etag"), etag);
        assert_eq!(
            h(&hd, "content-disposition"),
            format!(
                "attachment; filename=\"img-0123-{}.raw\"",
                &srv.source.digest[..12]
            )
        );
        assert_eq!(
            srv.source.reads.load(Ordering::Relaxed),
            3,
            "holes are not read"
        );

        // HEAD: the headers, no body.
        let resp = reqwest::Client::new().head(&url).send().await.unwrap();
        assert_eq!(resp.status().as_u16(), 200);
        assert_eq!(h(resp.headers(), "content-length"), len.to_string());

        // Ranges across chunk boundaries, inside holes, at the short end.
        for (a, b) in [
            (0u64, 0u64),
            (CH as u64 - 10, CH as u64 + 10),
            (CH as u64 + 100, 2 * CH as u64 - 1),
            (2 * CH as u64 + 5 * CL as u64 - 1, 4 * CH as u64 + 1),
            (len - 1, len - 1),
        ] {
            let (st, hd, body) = get(&url, Some(&format!("bytes={a}-{b}"))).await;
            assert_eq!(st, 206, "{a}-{b}");
            assert_eq!(h(&hd, "content-range"), format!("bytes {a}-{b}/{len}"));
            assert!(body == raw[a as usize..=b as usize], "bytes {a}-{b} differ");
        }
        // A range inside a hole reads no chunk.
        let before = srv.source.reads.load(Ordering::Relaxed);
        let (st, _, body) = get(&url, Some("bytes=4194304-8388607")).await;
        assert_eq!((st, body.len()), (206, CH));
        assert!(is_zero(&body));
        assert_eq!(srv.source.reads.load(Ordering::Relaxed), before);
        // Suffix, open end.
        let (st, _, body) = get(&url, Some("bytes=-1000")).await;
        assert_eq!(st, 206);
        assert!(body == raw[raw.len() - 1000..]);
        let (st, _, body) = get(&url, Some(&format!("bytes={}-", len - 5000))).await;
        assert_eq!(st, 206);
        assert!(body == raw[raw.len() - 5000..]);
        // Unsatisfiable: 416 with the length.
        let (st, hd, _) = get(&url, Some(&format!("bytes={len}-"))).await;
        assert_eq!(st, 416);
        assert_eq!(h(&hd, "content-range"), format!("bytes */{len}"));
        // Several ranges: the whole image.
        let (st, _, body) = get(&url, Some("bytes=0-1,5-9")).await;
        assert_eq!((st, body.len() as u64), (200, len));
        // If-Range of another version: the whole image, never a glued one.
        let resp = reqwest::Client::new()
            .get(&url)
            .header("Range", "bytes=10-")
            .header("If-Range", "\"0000-raw\"")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 200);
        let resp = reqwest::Client::new()
            .get(&url)
            .header("Range", "bytes=10-")
            .header("If-Range", &etag)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 206);

        // A download cut in the middle, resumed with Range, is the disk.
        let cut = 2 * CH + 5 * CL + 777;
        let mut got = get_cut(&url, cut).await;
        let (st, _, rest) = get(&url, Some(&format!("bytes={cut}-"))).await;
        assert_eq!(st, 206);
        got.extend_from_slice(&rest);
        assert!(got == raw, "the resumed raw download differs");

        // Refusals: tampered, expired, another version, wrong path and method.
        let token = url.rsplit('/').next().unwrap();
        let mut t = token.as_bytes().to_vec();
        t[5] = if t[5] == b'A' { b'B' } else { b'A' };
        let tampered = format!(
            "{}{DOWNLOAD_PATH}{}",
            srv.base,
            String::from_utf8(t).unwrap()
        );
        let (st, _, body) = get(&tampered, None).await;
        assert_eq!(st, 403);
        assert!(String::from_utf8_lossy(&body).contains("not valid"));
        let expired = LinkClaim {
            content_digest: srv.source.digest.clone(),
            expires_unix: now_unix() - 1,
            ..claim(LinkFormat::Raw)
        };
        let expired = format!("{}{DOWNLOAD_PATH}{}", srv.base, srv.signer.sign(&expired));
        let (st, _, body) = get(&expired, None).await;
        assert_eq!(st, 403);
        assert!(String::from_utf8_lossy(&body).contains("expired"));
        let gone = LinkClaim {
            content_digest: "00".repeat(32),
            expires_unix: now_unix() + 60,
            ..claim(LinkFormat::Raw)
        };
        let gone = format!("{}{DOWNLOAD_PATH}{}", srv.base, srv.signer.sign(&gone));
        assert_eq!(get(&gone, None).await.0, 410);
        assert_eq!(get(&format!("{}/v1/other", srv.base), None).await.0, 404);
        let resp = reqwest::Client::new().post(&url).send().await.unwrap();
        assert_eq!(resp.status().as_u16(), 405);
        srv.stop().await;
    }

    fn qemu_img(args: &[&str]) -> String {
        let out = std::process::Command::new("qemu-img")
            .args(args)
            .output()
            .expect("qemu-img is not installed: it judges the qcow2 downloads");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "qemu-img {args:?} failed: {text}");
        text
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn qcow2_download_judged_by_qemu_img_and_resumed() {
        let (raw, src) = disk();
        let qlen = image_len(src.virtual_size, &src.chunks, LinkFormat::Qcow2);
        let layout =
            Qcow2Layout::new(src.virtual_size, allocated_cluster_ranges(&src.chunks)).unwrap();
        assert_eq!(qlen, layout.total_size());
        let meta_end = layout.data_offset();
        let srv = Server::start(src).await;
        let url = srv.url(LinkFormat::Qcow2);

        let (st, hd, full) = get(&url, None).await;
        assert_eq!(st, 200);
        assert_eq!(full.len() as u64, qlen);
        assert_eq!(h(&hd, "etag"), format!("\"{}-qcow2\"", srv.source.digest));
        assert!(h(&hd, "content-disposition").ends_with(".qcow2\""));

        let dir = tempfile::tempdir().unwrap();
        let raw_path = dir.path().join("disk.raw");
        let q_path = dir.path().join("disk.qcow2");
        std::fs::write(&raw_path, &raw).unwrap();
        std::fs::write(&q_path, &full).unwrap();
        let (rp, qp) = (raw_path.to_str().unwrap(), q_path.to_str().unwrap());
        qemu_img(&["check", "-f", "qcow2", qp]);
        qemu_img(&["compare", "-f", "raw", "-F", "qcow2", rp, qp]);

        // Ranges starting and ending anywhere: in the header, across the metadata's end,
        // inside a data cluster, across chunks, at the end; each is the full stream's slice.
        let ql = qlen as usize;
        let m = meta_end as usize;
        for (a, b) in [
            (0, 103),
            (1, CL + 1),
            (m - 3, m + 2),
            (m, m + CL - 1),
            (m + 7 * CL + 13, m + 12 * CL + 7),
            (m + 50 * CL, ql - 1),
            (ql - 1, ql - 1),
        ] {
            let (st, hd, body) = get(&url, Some(&format!("bytes={a}-{b}"))).await;
            assert_eq!(st, 206, "{a}-{b}");
            assert_eq!(h(&hd, "content-range"), format!("bytes {a}-{b}/{qlen}"));
            assert!(body == full[a..=b], "qcow2 bytes {a}-{b} differ");
        }
        // A range of the metadata reads no chunk.
        let before = srv.source.reads.load(Ordering::Relaxed);
        let (st, _, _) = get(&url, Some(&format!("bytes=0-{}", m - 1))).await;
        assert_eq!(st, 206);
        assert_eq!(srv.source.reads.load(Ordering::Relaxed), before);

        // Cut in the middle of the data, resumed with Range: the same file, judged again.
        for cut in [m / 2 + 3, m + 30 * CL + 5] {
            let mut got = get_cut(&url, cut).await;
            let (st, _, rest) = get(&url, Some(&format!("bytes={cut}-"))).await;
            assert_eq!(st, 206);
            got.extend_from_slice(&rest);
            assert!(got == full, "the download resumed at {cut} differs");
            let resumed = dir.path().join(format!("resumed-{cut}.qcow2"));
            std::fs::write(&resumed, &got).unwrap();
            let rq = resumed.to_str().unwrap();
            qemu_img(&["check", "-f", "qcow2", rq]);
            qemu_img(&["compare", "-f", "raw", "-F", "qcow2", rp, rq]);
        }
        srv.stop().await;
    }

    #[test]
    fn qcow2_needs_whole_sectors() {
        let e = try_image_len("i", 1000, &[], LinkFormat::Qcow2).unwrap_err();
        assert_eq!(reason(&e), "QCOW2_UNSUPPORTED");
        assert_eq!(image_len(1000, &[], LinkFormat::Qcow2), 0);
        assert_eq!(image_len(1000, &[], LinkFormat::Raw), 1000);
        let bad = DataChunk {
            index: 5,
            digest: [0; 32],
            mask: 1,
        };
        assert!(try_image_len("i", CHUNK_SIZE, &[bad], LinkFormat::Raw).is_err());
    }
}
