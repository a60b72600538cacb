//! [`NbdClient`]: one NBD connection in the transmission phase — connecting (unix socket,
//! TCP or any stream), reads, block status, disconnect — and the checks that keep a hostile
//! server from making us allocate without bound or write outside the caller's buffer.

use std::path::Path;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::{TcpStream, UnixStream};

use super::error::{clean_message, io_err, protocol, NbdError};
use super::handshake::{abort, negotiate};
use super::proto::*;
use super::{BlockSizeConstraints, ConnectOptions, Extent};

type BoxRead = Box<dyn AsyncRead + Send + Unpin>;
type BoxWrite = Box<dyn AsyncWrite + Send + Unpin>;

/// Read buffer size; reads at least this large bypass the buffer entirely.
const READ_BUFFER: usize = 128 * 1024;
/// Largest single read request we send, whatever the server allows (the protocol's
/// portable limit).
const MAX_READ_REQUEST: u32 = 32 << 20;
/// Most descriptors we accept in one block status chunk.
const MAX_EXTENTS_PER_CHUNK: u32 = 1 << 20;
/// Most disjoint pieces a read reply may arrive in before we call it hostile (chunks that
/// arrive in order merge into one piece, so real servers stay at one or two).
const MAX_READ_FRAGMENTS: usize = 1024;
/// Longest unknown error chunk we skip over.
const MAX_UNKNOWN_ERROR_CHUNK: u32 = 64 * 1024;

/// One connection to an NBD export, after a successful handshake.
///
/// Methods take `&mut self`: one request is in flight at a time. Open several clients for
/// parallel reads. Dropping the client closes the connection; [`NbdClient::disconnect`]
/// tells the server first.
pub struct NbdClient {
    rd: BufReader<BoxRead>,
    wr: BufWriter<BoxWrite>,
    export_name: String,
    size: u64,
    transmission_flags: u16,
    block_size: BlockSizeConstraints,
    contexts: Vec<(String, u32)>,
    other_context_ids: Vec<u32>,
    next_cookie: u64,
    /// Set while a request is on the wire, and left set when one fails mid-stream or its
    /// future is dropped: the stream is then out of step and the client refuses to go on.
    busy: bool,
    /// Disjoint byte ranges (relative to the request) already filled by the current read
    /// reply; reused across requests.
    covered: Vec<(u64, u64)>,
}

impl std::fmt::Debug for NbdClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NbdClient")
            .field("export_name", &self.export_name)
            .field("size", &self.size)
            .field("transmission_flags", &self.transmission_flags)
            .field("block_size", &self.block_size)
            .field("contexts", &self.contexts)
            .field("usable", &!self.busy)
            .finish_non_exhaustive()
    }
}

/// A reply header.
enum Reply {
    Simple { error: u32 },
    Chunk { flags: u16, kind: u16, length: u32 },
}

/// An error reported inside a reply.
struct ReplyError {
    errno: u32,
    message: String,
    offset: Option<u64>,
}

impl NbdClient {
    /// Connects to an NBD server listening on a unix socket and runs the handshake.
    pub async fn connect_unix(
        path: impl AsRef<Path>,
        options: &ConnectOptions,
    ) -> Result<Self, NbdError> {
        let path = path.as_ref();
        let stream = UnixStream::connect(path)
            .await
            .map_err(|source| NbdError::Connect {
                target: path.display().to_string(),
                source,
            })?;
        let (r, w) = stream.into_split();
        Self::handshake(Box::new(r), Box::new(w), options).await
    }

    /// Connects to an NBD server over TCP (e.g. `"127.0.0.1:10809"`) and runs the handshake.
    pub async fn connect_tcp(
        addr: impl tokio::net::ToSocketAddrs + std::fmt::Display,
        options: &ConnectOptions,
    ) -> Result<Self, NbdError> {
        let target = addr.to_string();
        let stream = TcpStream::connect(addr)
            .await
            .map_err(|source| NbdError::Connect { target, source })?;
        // Requests are tiny and each is followed by a wait for its reply.
        let _ = stream.set_nodelay(true);
        let (r, w) = stream.into_split();
        Self::handshake(Box::new(r), Box::new(w), options).await
    }

    /// Runs the handshake over an already-open stream (a socket passed in by another
    /// process, an in-memory pipe in tests...).
    pub async fn connect_stream<S>(stream: S, options: &ConnectOptions) -> Result<Self, NbdError>
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (r, w) = tokio::io::split(stream);
        Self::handshake(Box::new(r), Box::new(w), options).await
    }

    async fn handshake(
        r: BoxRead,
        w: BoxWrite,
        options: &ConnectOptions,
    ) -> Result<Self, NbdError> {
        let mut rd = BufReader::with_capacity(READ_BUFFER, r);
        let mut wr = BufWriter::with_capacity(8 * 1024, w);
        let n = match negotiate(&mut rd, &mut wr, options).await {
            Ok(n) => n,
            Err(e) => {
                if matches!(
                    e,
                    NbdError::OptionRefused { .. }
                        | NbdError::ExportNotFound { .. }
                        | NbdError::MetaContextUnavailable { .. }
                ) {
                    abort(&mut wr).await;
                }
                return Err(e);
            }
        };
        Ok(Self {
            rd,
            wr,
            export_name: options.export_name.clone(),
            size: n.size,
            transmission_flags: n.transmission_flags,
            block_size: n.block_size,
            contexts: n.contexts,
            other_context_ids: n.other_context_ids,
            next_cookie: 1,
            busy: false,
            covered: Vec::new(),
        })
    }

    /// Size of the export in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The transmission flags the server sent (`NBD_FLAG_*`).
    pub fn transmission_flags(&self) -> u16 {
        self.transmission_flags
    }

    /// Whether the server marked the export read-only.
    pub fn is_read_only(&self) -> bool {
        self.transmission_flags & NBD_FLAG_READ_ONLY != 0
    }

    /// Whether the server allows several connections to share one consistent view.
    pub fn can_multi_conn(&self) -> bool {
        self.transmission_flags & NBD_FLAG_CAN_MULTI_CONN != 0
    }

    /// The server's block size constraints (defaults when it did not advertise any).
    pub fn block_size(&self) -> BlockSizeConstraints {
        self.block_size
    }

    /// The export name this connection opened.
    pub fn export_name(&self) -> &str {
        &self.export_name
    }

    /// The meta contexts selected on this connection, as (name, server-assigned id).
    pub fn meta_contexts(&self) -> &[(String, u32)] {
        &self.contexts
    }

    /// Reads `buf.len()` bytes at `offset` into `buf`.
    ///
    /// The range must lie inside the export and, when the server advertised a minimum
    /// block size, be aligned to it (a range ending at the end of the export may have any
    /// length). Larger reads are split into requests no larger than the server's maximum
    /// block size (and at most 32 MiB). Holes are filled with zeroes.
    pub async fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), NbdError> {
        self.ensure_usable()?;
        let len = buf.len() as u64;
        self.check_range("read", offset, len)?;
        if buf.is_empty() {
            return Ok(());
        }
        let piece = self.max_read_piece();
        let mut done = 0usize;
        while done < buf.len() {
            let n = piece.min(buf.len() - done);
            self.read_request(offset + done as u64, &mut buf[done..done + n])
                .await?;
            done += n;
        }
        Ok(())
    }

    /// Asks for the status of `[offset, offset + length)` in meta context `context`.
    ///
    /// Returns consecutive extents starting at `offset`. Servers may answer for less than
    /// the whole range (and very long ranges are asked in pieces of under 4 GiB): the
    /// extents then end early; see [`NbdClient::allocation_map`] for a loop that covers
    /// the range. Extents never reach past the requested range.
    pub async fn block_status(
        &mut self,
        offset: u64,
        length: u64,
        context: &str,
    ) -> Result<Vec<Extent>, NbdError> {
        self.ensure_usable()?;
        let id = self.context_id(context)?;
        if length == 0 {
            return Err(NbdError::InvalidRequest(
                "block status of an empty range".into(),
            ));
        }
        self.check_range("block status", offset, length)?;
        // Ask at most u32::MAX rounded down to the minimum block size.
        let min = u64::from(self.block_size.minimum);
        let cap = u64::from(u32::MAX) / min * min;
        let req_len = length.min(cap);
        self.block_status_request(offset, req_len as u32, id, context)
            .await
    }

    /// The full extent map of `[offset, offset + length)` in `context`: asks as often as the
    /// server needs, and merges adjacent extents with equal flags.
    pub async fn allocation_map(
        &mut self,
        context: &str,
        offset: u64,
        length: u64,
    ) -> Result<Vec<Extent>, NbdError> {
        self.ensure_usable()?;
        self.context_id(context)?;
        self.check_range("allocation map", offset, length)?;
        let end = offset + length;
        let mut map: Vec<Extent> = Vec::new();
        let mut pos = offset;
        while pos < end {
            let extents = self.block_status(pos, end - pos, context).await?;
            for e in extents {
                match map.last_mut() {
                    Some(last) if last.end() == e.offset && last.flags == e.flags => {
                        last.length += e.length;
                    }
                    _ => map.push(e),
                }
            }
            // block_status returns at least one extent, contiguous from `pos`.
            pos = map.last().map_or(end, Extent::end);
        }
        Ok(map)
    }

    /// Sends `NBD_CMD_DISC` and closes the connection.
    pub async fn disconnect(mut self) -> Result<(), NbdError> {
        if !self.busy {
            let cookie = self.next_cookie;
            self.send_request(CMD_DISC, cookie, 0, 0).await?;
        }
        self.wr
            .shutdown()
            .await
            .map_err(io_err("closing the connection"))
    }

    // ---- internals ----------------------------------------------------------------------

    fn ensure_usable(&self) -> Result<(), NbdError> {
        if self.busy {
            Err(NbdError::Unusable)
        } else {
            Ok(())
        }
    }

    fn context_id(&self, context: &str) -> Result<u32, NbdError> {
        self.contexts
            .iter()
            .find(|(n, _)| n == context)
            .map(|(_, id)| *id)
            .ok_or_else(|| {
                NbdError::InvalidRequest(format!(
                    "meta context {context:?} was not selected on this connection"
                ))
            })
    }

    /// Checks that a request lies inside the export and is aligned to the minimum block
    /// size (its end may also be the export's end).
    fn check_range(&self, what: &str, offset: u64, length: u64) -> Result<(), NbdError> {
        let end = offset.checked_add(length).filter(|&e| e <= self.size).ok_or_else(|| {
            NbdError::InvalidRequest(format!(
                "{what} of {length} bytes at offset {offset} goes past the end of the export ({} bytes)",
                self.size
            ))
        })?;
        let min = u64::from(self.block_size.minimum);
        if !offset.is_multiple_of(min) || (!end.is_multiple_of(min) && end != self.size) {
            return Err(NbdError::InvalidRequest(format!(
                "{what} of {length} bytes at offset {offset} is not aligned to the server's minimum block size {min}"
            )));
        }
        Ok(())
    }

    /// Largest piece of a read sent as one request.
    fn max_read_piece(&self) -> usize {
        let min = self.block_size.minimum;
        let max = self.block_size.maximum.min(MAX_READ_REQUEST);
        (max / min * min).max(min) as usize
    }

    fn take_cookie(&mut self) -> u64 {
        let c = self.next_cookie;
        self.next_cookie = self.next_cookie.wrapping_add(1);
        c
    }

    async fn send_request(
        &mut self,
        command: u16,
        cookie: u64,
        offset: u64,
        length: u32,
    ) -> Result<(), NbdError> {
        let mut req = [0u8; 28];
        req[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        req[4..6].copy_from_slice(&0u16.to_be_bytes()); // command flags
        req[6..8].copy_from_slice(&command.to_be_bytes());
        req[8..16].copy_from_slice(&cookie.to_be_bytes());
        req[16..24].copy_from_slice(&offset.to_be_bytes());
        req[24..28].copy_from_slice(&length.to_be_bytes());
        self.wr
            .write_all(&req)
            .await
            .map_err(io_err("sending a request"))?;
        self.wr.flush().await.map_err(io_err("sending a request"))
    }

    /// Reads the next reply header, which must belong to `cookie`.
    async fn reply_header(&mut self, cookie: u64) -> Result<Reply, NbdError> {
        let mut magic = [0u8; 4];
        self.rd
            .read_exact(&mut magic)
            .await
            .map_err(io_err("reading a reply header"))?;
        let (reply, got) = match be32(&magic) {
            SIMPLE_REPLY_MAGIC => {
                let mut h = [0u8; 12];
                self.rd
                    .read_exact(&mut h)
                    .await
                    .map_err(io_err("reading a reply header"))?;
                (
                    Reply::Simple {
                        error: be32(&h[0..4]),
                    },
                    be64(&h[4..12]),
                )
            }
            STRUCTURED_REPLY_MAGIC => {
                let mut h = [0u8; 16];
                self.rd
                    .read_exact(&mut h)
                    .await
                    .map_err(io_err("reading a reply header"))?;
                let reply = Reply::Chunk {
                    flags: be16(&h[0..2]),
                    kind: be16(&h[2..4]),
                    length: be32(&h[12..16]),
                };
                (reply, be64(&h[4..12]))
            }
            other => return Err(protocol(format!("unknown reply magic {other:#010x}"))),
        };
        if got != cookie {
            return Err(protocol(format!(
                "reply for cookie {got} while the only request in flight has cookie {cookie}"
            )));
        }
        Ok(reply)
    }

    /// Reads the payload of an error chunk (`length` bytes, type `kind`); an offset it names
    /// must lie inside `[req_offset, req_offset + req_len)`.
    async fn error_chunk(
        &mut self,
        kind: u16,
        length: u32,
        req_offset: u64,
        req_len: u64,
    ) -> Result<ReplyError, NbdError> {
        let during = "reading an error chunk";
        if length < 6 {
            return Err(protocol(format!(
                "{} chunk of {length} bytes is too short",
                chunk_type_name(kind)
            )));
        }
        let mut h = [0u8; 6];
        self.rd.read_exact(&mut h).await.map_err(io_err(during))?;
        let errno = be32(&h[0..4]);
        let msg_len = u32::from(be16(&h[4..6]));
        let rest = length - 6;
        if msg_len > rest {
            return Err(protocol(format!(
                "error chunk message of {msg_len} bytes does not fit its {length}-byte chunk"
            )));
        }
        if errno == 0 {
            return Err(protocol("error chunk with error number 0"));
        }
        let tail = rest - msg_len;
        match kind {
            REPLY_TYPE_ERROR if tail != 0 => {
                return Err(protocol("NBD_REPLY_TYPE_ERROR chunk has trailing bytes"))
            }
            REPLY_TYPE_ERROR_OFFSET if tail != 8 => {
                return Err(protocol(
                    "NBD_REPLY_TYPE_ERROR_OFFSET chunk has the wrong length",
                ))
            }
            REPLY_TYPE_ERROR | REPLY_TYPE_ERROR_OFFSET => {}
            _ if length > MAX_UNKNOWN_ERROR_CHUNK => {
                return Err(protocol(format!(
                    "unknown error chunk type {kind:#06x} of {length} bytes"
                )))
            }
            _ => {}
        }
        let mut msg = vec![0u8; msg_len as usize]; // error path only; at most 64 KiB
        self.rd.read_exact(&mut msg).await.map_err(io_err(during))?;
        let mut offset = None;
        if kind == REPLY_TYPE_ERROR_OFFSET {
            let mut o = [0u8; 8];
            self.rd.read_exact(&mut o).await.map_err(io_err(during))?;
            let off = be64(&o);
            if off < req_offset || off - req_offset >= req_len {
                return Err(protocol(format!(
                    "error offset {off} lies outside the request ({req_len} bytes at {req_offset})"
                )));
            }
            offset = Some(off);
        } else if tail > 0 {
            self.skip(u64::from(tail), during).await?;
        }
        Ok(ReplyError {
            errno,
            message: clean_message(&msg),
            offset,
        })
    }

    async fn skip(&mut self, n: u64, during: &'static str) -> Result<(), NbdError> {
        let copied = tokio::io::copy(&mut (&mut self.rd).take(n), &mut tokio::io::sink())
            .await
            .map_err(io_err(during))?;
        if copied != n {
            return Err(NbdError::Io {
                during,
                source: std::io::ErrorKind::UnexpectedEof.into(),
            });
        }
        Ok(())
    }

    fn server_error(command: u16, offset: u64, length: u64, e: ReplyError) -> NbdError {
        NbdError::Server {
            command: command_name(command),
            errno: e.errno,
            message: e.message,
            offset,
            length,
            error_offset: e.offset,
        }
    }

    /// One `NBD_CMD_READ` of `buf.len()` (≤ max block size) bytes.
    async fn read_request(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), NbdError> {
        let len = buf.len() as u64;
        let cookie = self.take_cookie();
        self.busy = true;
        self.send_request(CMD_READ, cookie, offset, buf.len() as u32)
            .await?;
        self.covered.clear();
        let mut filled = 0u64;
        let mut error: Option<ReplyError> = None;
        loop {
            let (flags, kind, length) = self.chunk_header(cookie, CMD_READ, offset, len).await?;
            match kind {
                REPLY_TYPE_OFFSET_DATA => {
                    if length < 9 {
                        return Err(protocol(format!(
                            "data chunk of {length} bytes is too short"
                        )));
                    }
                    let mut o = [0u8; 8];
                    self.rd
                        .read_exact(&mut o)
                        .await
                        .map_err(io_err("reading a data chunk"))?;
                    let (start, end) = self.place(offset, len, be64(&o), u64::from(length - 8))?;
                    self.rd
                        .read_exact(&mut buf[start as usize..end as usize])
                        .await
                        .map_err(io_err("reading a data chunk"))?;
                    filled += end - start;
                }
                REPLY_TYPE_OFFSET_HOLE => {
                    if length != 12 {
                        return Err(protocol(format!(
                            "hole chunk of {length} bytes instead of 12"
                        )));
                    }
                    let mut h = [0u8; 12];
                    self.rd
                        .read_exact(&mut h)
                        .await
                        .map_err(io_err("reading a hole chunk"))?;
                    let hole = u64::from(be32(&h[8..12]));
                    if hole == 0 {
                        return Err(protocol("hole chunk of zero bytes"));
                    }
                    let (start, end) = self.place(offset, len, be64(&h[0..8]), hole)?;
                    buf[start as usize..end as usize].fill(0);
                    filled += end - start;
                }
                k => {
                    self.other_chunk(k, flags, length, CMD_READ, offset, len, &mut error)
                        .await?
                }
            }
            if flags & REPLY_FLAG_DONE != 0 {
                break;
            }
        }
        self.busy = false;
        if let Some(e) = error {
            return Err(Self::server_error(CMD_READ, offset, len, e));
        }
        if filled != len {
            self.busy = true; // the server lied about success: do not trust this stream
            return Err(protocol(format!(
                "read of {len} bytes at offset {offset} succeeded with only {filled} bytes sent"
            )));
        }
        Ok(())
    }

    /// The next chunk header of the structured reply to `cmd` (`len` bytes at `offset`):
    /// `(flags, type, length)`. A simple reply is a protocol error, or the server's error.
    async fn chunk_header(
        &mut self,
        cookie: u64,
        cmd: u16,
        offset: u64,
        len: u64,
    ) -> Result<(u16, u16, u32), NbdError> {
        match self.reply_header(cookie).await? {
            Reply::Simple { error: 0 } => Err(protocol(format!(
                "simple reply to {} although structured replies were negotiated",
                command_name(cmd)
            ))),
            Reply::Simple { error: errno } => {
                self.busy = false;
                let e = ReplyError {
                    errno,
                    message: String::new(),
                    offset: None,
                };
                Err(Self::server_error(cmd, offset, len, e))
            }
            Reply::Chunk {
                flags,
                kind,
                length,
            } => Ok((flags, kind, length)),
        }
    }

    /// A chunk that is not content: `NBD_REPLY_TYPE_NONE` (must be empty and last), or an
    /// error chunk (the first is kept in `error`); any other type is a protocol error.
    #[allow(clippy::too_many_arguments)]
    async fn other_chunk(
        &mut self,
        kind: u16,
        flags: u16,
        length: u32,
        cmd: u16,
        offset: u64,
        len: u64,
        error: &mut Option<ReplyError>,
    ) -> Result<(), NbdError> {
        match kind {
            REPLY_TYPE_NONE => {
                if length != 0 || flags & REPLY_FLAG_DONE == 0 {
                    return Err(protocol("malformed NBD_REPLY_TYPE_NONE chunk"));
                }
            }
            k if k & REPLY_TYPE_ERROR_BIT != 0 => {
                let e = self.error_chunk(k, length, offset, len).await?;
                error.get_or_insert(e);
            }
            k => {
                return Err(protocol(format!(
                    "unexpected {} ({k}) chunk in the reply to {}",
                    chunk_type_name(k),
                    command_name(cmd)
                )))
            }
        }
        Ok(())
    }

    /// Checks that a content chunk `[chunk_off, chunk_off + chunk_len)` lies inside the
    /// request and overlaps nothing received before; records it and returns its range
    /// relative to the request.
    fn place(
        &mut self,
        req_off: u64,
        req_len: u64,
        chunk_off: u64,
        chunk_len: u64,
    ) -> Result<(u64, u64), NbdError> {
        let start = chunk_off.wrapping_sub(req_off);
        if chunk_off < req_off || start > req_len || chunk_len > req_len - start {
            return Err(protocol(format!(
                "chunk of {chunk_len} bytes at offset {chunk_off} lies outside the request ({req_len} bytes at {req_off})"
            )));
        }
        let end = start + chunk_len;
        let v = &mut self.covered;
        let i = v.partition_point(|&(a, _)| a < start);
        if (i > 0 && v[i - 1].1 > start) || (i < v.len() && v[i].0 < end) {
            return Err(protocol(format!(
                "chunk of {chunk_len} bytes at offset {chunk_off} overlaps an earlier chunk"
            )));
        }
        let joins_prev = i > 0 && v[i - 1].1 == start;
        let joins_next = i < v.len() && v[i].0 == end;
        match (joins_prev, joins_next) {
            (true, true) => {
                v[i - 1].1 = v[i].1;
                v.remove(i);
            }
            (true, false) => v[i - 1].1 = end,
            (false, true) => v[i].0 = start,
            (false, false) => {
                if v.len() >= MAX_READ_FRAGMENTS {
                    return Err(protocol("read reply arrived in too many scattered chunks"));
                }
                v.insert(i, (start, end));
            }
        }
        Ok((start, end))
    }

    /// One `NBD_CMD_BLOCK_STATUS`; returns the extents of context `id`, clamped to the
    /// request.
    async fn block_status_request(
        &mut self,
        offset: u64,
        length: u32,
        id: u32,
        context: &str,
    ) -> Result<Vec<Extent>, NbdError> {
        let req_len = u64::from(length);
        let end = offset + req_len;
        let cookie = self.take_cookie();
        self.busy = true;
        self.send_request(CMD_BLOCK_STATUS, cookie, offset, length)
            .await?;
        let during = "reading a block status chunk";
        let mut extents: Option<Vec<Extent>> = None;
        let mut error: Option<ReplyError> = None;
        loop {
            let (flags, kind, chunk_len) = self
                .chunk_header(cookie, CMD_BLOCK_STATUS, offset, req_len)
                .await?;
            match kind {
                REPLY_TYPE_BLOCK_STATUS => {
                    if chunk_len < 12 || (chunk_len - 4) % 8 != 0 {
                        return Err(protocol(format!(
                            "block status chunk of {chunk_len} bytes is malformed"
                        )));
                    }
                    let count = (chunk_len - 4) / 8;
                    if count > MAX_EXTENTS_PER_CHUNK {
                        return Err(protocol(format!(
                            "block status chunk with {count} descriptors (limit {MAX_EXTENTS_PER_CHUNK})"
                        )));
                    }
                    let mut b = [0u8; 4];
                    self.rd.read_exact(&mut b).await.map_err(io_err(during))?;
                    let chunk_id = be32(&b);
                    if chunk_id != id {
                        if !self.contexts.iter().any(|(_, other)| *other == chunk_id)
                            && !self.other_context_ids.contains(&chunk_id)
                        {
                            return Err(protocol(format!(
                                "block status for meta context id {chunk_id}, which was never selected"
                            )));
                        }
                        // Another selected context: not asked for here.
                        self.skip(u64::from(count) * 8, during).await?;
                    } else {
                        if extents.is_some() {
                            return Err(protocol(format!(
                                "two block status chunks for {context:?}"
                            )));
                        }
                        let mut list = Vec::with_capacity(count.min(1024) as usize);
                        let mut pos = offset;
                        for _ in 0..count {
                            let mut d = [0u8; 8];
                            self.rd.read_exact(&mut d).await.map_err(io_err(during))?;
                            let ext_len = u64::from(be32(&d[0..4]));
                            if ext_len == 0 {
                                return Err(protocol("block status descriptor of length zero"));
                            }
                            if pos >= end {
                                return Err(protocol(format!(
                                    "block status descriptors go past the requested range ({req_len} bytes at {offset})"
                                )));
                            }
                            let clamped = ext_len.min(end - pos);
                            list.push(Extent {
                                offset: pos,
                                length: clamped,
                                flags: be32(&d[4..8]),
                            });
                            pos += clamped;
                        }
                        extents = Some(list);
                    }
                }
                k => {
                    let cmd = CMD_BLOCK_STATUS;
                    self.other_chunk(k, flags, chunk_len, cmd, offset, req_len, &mut error)
                        .await?
                }
            }
            if flags & REPLY_FLAG_DONE != 0 {
                break;
            }
        }
        self.busy = false;
        if let Some(e) = error {
            return Err(Self::server_error(CMD_BLOCK_STATUS, offset, req_len, e));
        }
        extents.ok_or_else(|| {
            self.busy = true;
            protocol(format!(
                "block status reply without extents for {context:?}"
            ))
        })
    }
}
