//! The handshake phase: the fixed newstyle greeting, then the options we send in order —
//! `NBD_OPT_STRUCTURED_REPLY`, `NBD_OPT_SET_META_CONTEXT` (when contexts are wanted) and
//! `NBD_OPT_GO` — with every option reply checked for size and consistency.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tracing::debug;

use super::error::{clean_message, io_err, protocol, NbdError};
use super::proto::*;
use super::{BlockSizeConstraints, ConnectOptions};

/// Largest option reply payload we accept.
const MAX_OPTION_REPLY: u32 = 64 * 1024;
/// Most replies we accept for one option (META_CONTEXT or INFO replies before the final one).
const MAX_REPLIES_PER_OPTION: usize = 4096;
/// Longest string the protocol allows (export names, context names).
const MAX_STRING: usize = 4096;

/// What the handshake established.
#[derive(Debug)]
pub(crate) struct Negotiated {
    pub size: u64,
    pub transmission_flags: u16,
    pub block_size: BlockSizeConstraints,
    /// Selected meta contexts: (name, id), in the order the caller asked for them.
    pub contexts: Vec<(String, u32)>,
    /// Ids of contexts the server selected although we did not name them (their block
    /// status chunks are skipped).
    pub other_context_ids: Vec<u32>,
}

/// Runs the whole handshake on a fresh connection.
pub(crate) async fn negotiate<R, W>(
    rd: &mut R,
    wr: &mut W,
    opts: &ConnectOptions,
) -> Result<Negotiated, NbdError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    check_string("export name", &opts.export_name)?;
    for ctx in &opts.meta_contexts {
        check_string("meta context name", ctx)?;
        if !ctx.contains(':') {
            return Err(NbdError::InvalidRequest(format!(
                "meta context name {ctx:?} has no namespace (expected \"namespace:name\")"
            )));
        }
    }

    let mut greeting = [0u8; 18];
    rd.read_exact(&mut greeting)
        .await
        .map_err(io_err("reading the server greeting"))?;
    if be64(&greeting[0..8]) != NBDMAGIC {
        return Err(protocol(
            "the server did not greet with NBDMAGIC (not an NBD server?)",
        ));
    }
    match be64(&greeting[8..16]) {
        IHAVEOPT => {}
        OLDSTYLE_MAGIC => {
            return Err(protocol(
                "the server speaks only the oldstyle handshake, which we do not support",
            ))
        }
        other => return Err(protocol(format!("unknown handshake magic {other:#018x}"))),
    }
    let hflags = be16(&greeting[16..18]);
    if hflags & FLAG_FIXED_NEWSTYLE == 0 {
        return Err(protocol(
            "the server does not support the fixed newstyle handshake",
        ));
    }
    let mut cflags = FLAG_C_FIXED_NEWSTYLE;
    if hflags & FLAG_NO_ZEROES != 0 {
        cflags |= FLAG_C_NO_ZEROES;
    }
    wr.write_all(&cflags.to_be_bytes())
        .await
        .map_err(io_err("sending the client flags"))?;

    let mut opt = Options {
        rd,
        wr,
        payload: Vec::with_capacity(256),
    };

    // Structured replies: required.
    opt.send(OPT_STRUCTURED_REPLY, &[]).await?;
    match opt.reply(OPT_STRUCTURED_REPLY).await? {
        REP_ACK => {}
        r if r & REP_FLAG_ERROR != 0 => return Err(opt.refusal(OPT_STRUCTURED_REPLY, r, opts)),
        r => return Err(unexpected(OPT_STRUCTURED_REPLY, r)),
    }

    let (contexts, other_context_ids) = if opts.meta_contexts.is_empty() {
        (Vec::new(), Vec::new())
    } else {
        opt.set_meta_contexts(opts).await?
    };

    let (size, transmission_flags, block_size) = opt.go(opts).await?;
    if transmission_flags & NBD_FLAG_HAS_FLAGS == 0 {
        debug!(
            transmission_flags,
            "NBD server did not set NBD_FLAG_HAS_FLAGS"
        );
    }
    debug!(
        export = %opts.export_name,
        size,
        transmission_flags,
        ?block_size,
        ?contexts,
        "NBD handshake done"
    );
    Ok(Negotiated {
        size,
        transmission_flags,
        block_size,
        contexts,
        other_context_ids,
    })
}

/// Option requests and replies over one connection, with a reused payload buffer.
struct Options<'a, R, W> {
    rd: &'a mut R,
    wr: &'a mut W,
    payload: Vec<u8>,
}

impl<R, W> Options<'_, R, W>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    /// Sends one option request and flushes.
    async fn send(&mut self, option: u32, data: &[u8]) -> Result<(), NbdError> {
        let len = u32::try_from(data.len())
            .map_err(|_| NbdError::InvalidRequest("option request too large".into()))?;
        let mut head = [0u8; 16];
        head[0..8].copy_from_slice(&IHAVEOPT.to_be_bytes());
        head[8..12].copy_from_slice(&option.to_be_bytes());
        head[12..16].copy_from_slice(&len.to_be_bytes());
        let during = "sending an option request";
        self.wr.write_all(&head).await.map_err(io_err(during))?;
        self.wr.write_all(data).await.map_err(io_err(during))?;
        self.wr.flush().await.map_err(io_err(during))
    }

    /// Reads one option reply to `option`; returns its type, with its payload in
    /// `self.payload`.
    async fn reply(&mut self, option: u32) -> Result<u32, NbdError> {
        let mut head = [0u8; 20];
        self.rd
            .read_exact(&mut head)
            .await
            .map_err(io_err("reading an option reply"))?;
        let magic = be64(&head[0..8]);
        if magic != OPTION_REPLY_MAGIC {
            return Err(protocol(format!(
                "option reply magic {magic:#018x} to {} is wrong",
                option_name(option)
            )));
        }
        let replied_to = be32(&head[8..12]);
        if replied_to != option {
            return Err(protocol(format!(
                "got a reply to {} while waiting for one to {}",
                option_name(replied_to),
                option_name(option)
            )));
        }
        let kind = be32(&head[12..16]);
        let len = be32(&head[16..20]);
        if len > MAX_OPTION_REPLY {
            return Err(protocol(format!(
                "reply to {} announces {len} bytes of payload (limit {MAX_OPTION_REPLY})",
                option_name(option)
            )));
        }
        self.payload.clear();
        self.payload.resize(len as usize, 0);
        self.rd
            .read_exact(&mut self.payload)
            .await
            .map_err(io_err("reading an option reply payload"))?;
        if kind == REP_ACK && len != 0 {
            return Err(protocol(format!(
                "NBD_REP_ACK to {} carries a payload",
                option_name(option)
            )));
        }
        Ok(kind)
    }

    /// The error for an error reply `reply` to `option` (payload is the server's message).
    fn refusal(&self, option: u32, reply: u32, opts: &ConnectOptions) -> NbdError {
        let message = clean_message(&self.payload);
        if reply == REP_ERR_UNKNOWN && option != OPT_STRUCTURED_REPLY {
            NbdError::ExportNotFound {
                name: opts.export_name.clone(),
                message,
            }
        } else {
            NbdError::OptionRefused {
                option: option_name(option),
                reply,
                message,
            }
        }
    }

    /// `NBD_OPT_SET_META_CONTEXT` for all requested contexts; returns (name, id) for each,
    /// and the ids of any other contexts the server selected.
    async fn set_meta_contexts(
        &mut self,
        opts: &ConnectOptions,
    ) -> Result<(Vec<(String, u32)>, Vec<u32>), NbdError> {
        let mut data = Vec::new();
        put_string(&mut data, &opts.export_name);
        data.extend_from_slice(&(opts.meta_contexts.len() as u32).to_be_bytes());
        for ctx in &opts.meta_contexts {
            put_string(&mut data, ctx);
        }
        self.send(OPT_SET_META_CONTEXT, &data).await?;

        let mut selected: Vec<(String, u32)> = Vec::new();
        let mut others: Vec<u32> = Vec::new();
        for _ in 0..MAX_REPLIES_PER_OPTION {
            match self.reply(OPT_SET_META_CONTEXT).await? {
                REP_META_CONTEXT => {
                    if self.payload.len() < 5 {
                        return Err(protocol("NBD_REP_META_CONTEXT reply too short"));
                    }
                    let id = be32(&self.payload[0..4]);
                    let name = std::str::from_utf8(&self.payload[4..]).map_err(|_| {
                        protocol("NBD_REP_META_CONTEXT carries a name that is not UTF-8")
                    })?;
                    if selected.iter().any(|(_, other)| *other == id) || others.contains(&id) {
                        return Err(protocol(format!(
                            "server gave meta context id {id} to two contexts"
                        )));
                    }
                    if opts.meta_contexts.iter().any(|c| c == name)
                        && !selected.iter().any(|(n, _)| n == name)
                    {
                        selected.push((name.to_owned(), id));
                    } else {
                        others.push(id);
                        debug!(
                            context = name,
                            id, "NBD server selected a context we did not ask for"
                        );
                    }
                }
                REP_ACK => {
                    let mut ordered = Vec::with_capacity(opts.meta_contexts.len());
                    for wanted in &opts.meta_contexts {
                        match selected.iter().find(|(n, _)| n == wanted) {
                            Some(pair) => {
                                if !ordered.contains(pair) {
                                    ordered.push(pair.clone());
                                }
                            }
                            None => {
                                return Err(NbdError::MetaContextUnavailable {
                                    context: wanted.clone(),
                                    export: opts.export_name.clone(),
                                })
                            }
                        }
                    }
                    return Ok((ordered, others));
                }
                r if r & REP_FLAG_ERROR != 0 => {
                    return Err(self.refusal(OPT_SET_META_CONTEXT, r, opts))
                }
                r => return Err(unexpected(OPT_SET_META_CONTEXT, r)),
            }
        }
        Err(protocol("too many replies to NBD_OPT_SET_META_CONTEXT"))
    }

    /// `NBD_OPT_GO` with a block size information request; returns (size, transmission
    /// flags, block size constraints).
    async fn go(
        &mut self,
        opts: &ConnectOptions,
    ) -> Result<(u64, u16, BlockSizeConstraints), NbdError> {
        let mut data = Vec::new();
        put_string(&mut data, &opts.export_name);
        data.extend_from_slice(&1u16.to_be_bytes());
        data.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        self.send(OPT_GO, &data).await?;

        let mut export: Option<(u64, u16)> = None;
        let mut block_size = BlockSizeConstraints::default();
        for _ in 0..MAX_REPLIES_PER_OPTION {
            match self.reply(OPT_GO).await? {
                REP_INFO => {
                    let p = &self.payload;
                    if p.len() < 2 {
                        return Err(protocol("NBD_REP_INFO reply too short"));
                    }
                    match be16(&p[0..2]) {
                        INFO_EXPORT => {
                            if p.len() != 12 {
                                return Err(protocol(format!(
                                    "NBD_INFO_EXPORT has length {} instead of 12",
                                    p.len()
                                )));
                            }
                            export = Some((be64(&p[2..10]), be16(&p[10..12])));
                        }
                        INFO_BLOCK_SIZE => {
                            if p.len() != 14 {
                                return Err(protocol(format!(
                                    "NBD_INFO_BLOCK_SIZE has length {} instead of 14",
                                    p.len()
                                )));
                            }
                            block_size = check_block_size(
                                be32(&p[2..6]),
                                be32(&p[6..10]),
                                be32(&p[10..14]),
                            )?;
                        }
                        _ => {} // information we did not ask for: ignore
                    }
                }
                REP_ACK => {
                    let (size, flags) = export
                        .ok_or_else(|| protocol("NBD_OPT_GO succeeded without NBD_INFO_EXPORT"))?;
                    if size > i64::MAX as u64 {
                        return Err(protocol(format!("export size {size} is implausible")));
                    }
                    return Ok((size, flags, block_size));
                }
                r if r & REP_FLAG_ERROR != 0 => return Err(self.refusal(OPT_GO, r, opts)),
                r => return Err(unexpected(OPT_GO, r)),
            }
        }
        Err(protocol("too many replies to NBD_OPT_GO"))
    }
}

/// Politely ends a negotiation that we give up on while the stream is still in step
/// (`NBD_OPT_ABORT`, without waiting for the reply), then closes our side. Best effort.
pub(crate) async fn abort<W: AsyncWrite + Unpin>(wr: &mut W) {
    let mut msg = [0u8; 16];
    msg[0..8].copy_from_slice(&IHAVEOPT.to_be_bytes());
    msg[8..12].copy_from_slice(&OPT_ABORT.to_be_bytes());
    let _ = wr.write_all(&msg).await;
    let _ = wr.flush().await;
    let _ = wr.shutdown().await;
}

/// Validates `NBD_INFO_BLOCK_SIZE` values against the protocol's rules.
fn check_block_size(
    minimum: u32,
    preferred: u32,
    maximum: u32,
) -> Result<BlockSizeConstraints, NbdError> {
    let ok = minimum.is_power_of_two()
        && minimum <= 64 * 1024
        && preferred.is_power_of_two()
        && preferred >= minimum
        && maximum >= minimum
        && (maximum == u32::MAX || maximum.is_multiple_of(minimum));
    if !ok {
        return Err(protocol(format!(
            "invalid block size constraints: minimum {minimum}, preferred {preferred}, maximum {maximum}"
        )));
    }
    Ok(BlockSizeConstraints {
        minimum,
        preferred,
        maximum,
        advertised: true,
    })
}

fn unexpected(option: u32, reply: u32) -> NbdError {
    protocol(format!(
        "unexpected reply {} ({reply:#x}) to {}",
        reply_name(reply),
        option_name(option)
    ))
}

/// Appends a length-prefixed string.
fn put_string(data: &mut Vec<u8>, s: &str) {
    data.extend_from_slice(&(s.len() as u32).to_be_bytes());
    data.extend_from_slice(s.as_bytes());
}

/// Checks a string we are about to send against the protocol's limits.
fn check_string(what: &str, s: &str) -> Result<(), NbdError> {
    if s.len() > MAX_STRING {
        return Err(NbdError::InvalidRequest(format!(
            "{what} is {} bytes long (limit {MAX_STRING})",
            s.len()
        )));
    }
    if s.contains('\0') {
        return Err(NbdError::InvalidRequest(format!(
            "{what} {s:?} contains a NUL byte"
        )));
    }
    Ok(())
}
