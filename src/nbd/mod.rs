//! Our own small async NBD client: the way every byte of a guest disk is read.
//!
//! It speaks just what the capture path needs from `qemu-nbd`, libvirt's pull-mode backup
//! exports and `nbdkit`: the fixed newstyle handshake, `NBD_OPT_STRUCTURED_REPLY`
//! (required), `NBD_OPT_SET_META_CONTEXT` (`base:allocation`, `qemu:dirty-bitmap:NAME`),
//! `NBD_OPT_GO`, then `NBD_CMD_READ`, `NBD_CMD_BLOCK_STATUS` and `NBD_CMD_DISC`.
//! It is read-only by design.
//!
//! One request is in flight at a time per [`NbdClient`]; open several connections for
//! parallelism (servers such as `qemu-nbd --shared=N` allow it). Reads go straight into the
//! caller's buffer, with no allocation per chunk.
//!
//! Every length the server sends is checked before anything is allocated or read: option
//! replies are capped at 64 KiB, reply chunks must lie inside the request, block status
//! replies are capped in size, so a hostile server cannot make us allocate without bound or
//! write outside the caller's buffer.
//!
//! There are no timeouts inside: wrap calls in `tokio::time::timeout` where needed. A call
//! whose future is dropped half-way leaves the connection [`NbdError::Unusable`].
//!
//! Layout:
//! - this file: the public types ([`ConnectOptions`], [`Extent`], [`BlockSizeConstraints`])
//!   and the `connect_*` shorthands;
//! - `client`: [`NbdClient`], the transmission phase;
//! - `handshake`: option negotiation up to `NBD_OPT_GO`;
//! - `error`: [`NbdError`];
//! - `proto`: wire constants and their names.

mod client;
mod error;
mod handshake;
mod proto;
#[cfg(test)]
mod tests;

use std::path::Path;

pub use client::NbdClient;
pub use error::NbdError;
pub use proto::{
    errno_name, NBD_FLAG_CAN_MULTI_CONN, NBD_FLAG_HAS_FLAGS, NBD_FLAG_READ_ONLY,
    NBD_FLAG_ROTATIONAL, NBD_FLAG_SEND_CACHE, NBD_FLAG_SEND_DF, NBD_FLAG_SEND_FAST_ZERO,
    NBD_FLAG_SEND_FLUSH, NBD_FLAG_SEND_FUA, NBD_FLAG_SEND_TRIM, NBD_FLAG_SEND_WRITE_ZEROES,
};

/// The standard allocation meta context.
pub const BASE_ALLOCATION: &str = "base:allocation";
/// `base:allocation` flag: the extent is not allocated (a hole).
pub const NBD_STATE_HOLE: u32 = 1;
/// `base:allocation` flag: the extent reads as zeroes.
pub const NBD_STATE_ZERO: u32 = 2;
/// `qemu:dirty-bitmap:*` flag: the extent changed since the bitmap was started.
pub const NBD_STATE_DIRTY: u32 = 1;

/// What to ask the server for during the handshake.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConnectOptions {
    /// The export to open (`""` is the server's default export).
    pub export_name: String,
    /// Meta contexts to select, by exact name (e.g. [`BASE_ALLOCATION`],
    /// `qemu:dirty-bitmap:backup-vda`). Each must be offered by the server, or the
    /// connection fails with [`NbdError::MetaContextUnavailable`].
    pub meta_contexts: Vec<String>,
}

impl ConnectOptions {
    /// Options for `export_name` with no meta context.
    pub fn new(export_name: impl Into<String>) -> Self {
        Self {
            export_name: export_name.into(),
            meta_contexts: Vec::new(),
        }
    }

    /// Adds a meta context to select.
    pub fn with_meta_context(mut self, context: impl Into<String>) -> Self {
        self.meta_contexts.push(context.into());
        self
    }
}

/// A run of bytes with the same status in one meta context.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Extent {
    /// Start of the extent in the export.
    pub offset: u64,
    /// Length in bytes (never zero).
    pub length: u64,
    /// Status flags, meaning defined by the context ([`NBD_STATE_HOLE`], [`NBD_STATE_ZERO`]
    /// for `base:allocation`; [`NBD_STATE_DIRTY`] for dirty bitmaps).
    pub flags: u32,
}

impl Extent {
    /// An extent of `length` bytes at `offset` with status `flags`.
    pub const fn new(offset: u64, length: u64, flags: u32) -> Extent {
        Extent {
            offset,
            length,
            flags,
        }
    }

    /// One past the last byte of the extent.
    pub fn end(&self) -> u64 {
        self.offset + self.length
    }
}

/// The server's block size constraints (from `NBD_INFO_BLOCK_SIZE`, or defaults).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockSizeConstraints {
    /// Requests' offsets and lengths must be multiples of this (a power of two, at most
    /// 64 KiB); 1 when the server did not say.
    pub minimum: u32,
    /// Size for efficient I/O; 4096 when the server did not say.
    pub preferred: u32,
    /// Largest read the server accepts (`0xffffffff` means no inherent limit); 32 MiB when
    /// the server did not say.
    pub maximum: u32,
    /// Whether the server advertised these values.
    pub advertised: bool,
}

impl Default for BlockSizeConstraints {
    fn default() -> Self {
        Self {
            minimum: 1,
            preferred: 4096,
            maximum: 32 << 20,
            advertised: false,
        }
    }
}

/// Connects to an NBD server on a unix socket; same as [`NbdClient::connect_unix`].
pub async fn connect_unix(
    path: impl AsRef<Path>,
    options: &ConnectOptions,
) -> Result<NbdClient, NbdError> {
    NbdClient::connect_unix(path, options).await
}

/// Connects to an NBD server over TCP; same as [`NbdClient::connect_tcp`].
pub async fn connect_tcp(
    addr: impl tokio::net::ToSocketAddrs + std::fmt::Display,
    options: &ConnectOptions,
) -> Result<NbdClient, NbdError> {
    NbdClient::connect_tcp(addr, options).await
}
