//! Wire constants of the NBD protocol (magic numbers, options, option replies, commands,
//! structured reply chunk types, flags) and their human-readable names for error messages.
//!
//! Values follow the protocol document `doc/proto.md` of the NetworkBlockDevice/nbd project.
//! Everything on the wire is big-endian.

// ---- Handshake -------------------------------------------------------------------------

/// "NBDMAGIC": first eight bytes the server sends.
pub(crate) const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// "IHAVEOPT": second magic of the newstyle greeting, and the prefix of every option request.
pub(crate) const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Second magic of the (unsupported) oldstyle greeting.
pub(crate) const OLDSTYLE_MAGIC: u64 = 0x0000_4202_8186_1253;
/// Prefix of every option reply.
pub(crate) const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;

/// Handshake flag: the server speaks the fixed newstyle protocol.
pub(crate) const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Handshake flag: the server can omit the 124 zero bytes after `NBD_OPT_EXPORT_NAME`.
pub(crate) const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flag: we speak fixed newstyle.
pub(crate) const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flag: no zero padding wanted.
pub(crate) const FLAG_C_NO_ZEROES: u32 = 1 << 1;

pub(crate) const OPT_ABORT: u32 = 2;
pub(crate) const OPT_GO: u32 = 7;
pub(crate) const OPT_STRUCTURED_REPLY: u32 = 8;
pub(crate) const OPT_SET_META_CONTEXT: u32 = 10;

pub(crate) const REP_ACK: u32 = 1;
pub(crate) const REP_INFO: u32 = 3;
pub(crate) const REP_META_CONTEXT: u32 = 4;
/// Bit 31 marks every error reply type.
pub(crate) const REP_FLAG_ERROR: u32 = 1 << 31;
pub(crate) const REP_ERR_UNKNOWN: u32 = REP_FLAG_ERROR | 6;

pub(crate) const INFO_EXPORT: u16 = 0;
pub(crate) const INFO_BLOCK_SIZE: u16 = 3;

/// Name of an option, for error messages.
pub(crate) fn option_name(option: u32) -> &'static str {
    match option {
        1 => "NBD_OPT_EXPORT_NAME",
        OPT_ABORT => "NBD_OPT_ABORT",
        3 => "NBD_OPT_LIST",
        5 => "NBD_OPT_STARTTLS",
        6 => "NBD_OPT_INFO",
        OPT_GO => "NBD_OPT_GO",
        OPT_STRUCTURED_REPLY => "NBD_OPT_STRUCTURED_REPLY",
        9 => "NBD_OPT_LIST_META_CONTEXT",
        OPT_SET_META_CONTEXT => "NBD_OPT_SET_META_CONTEXT",
        11 => "NBD_OPT_EXTENDED_HEADERS",
        _ => "an unknown option",
    }
}

/// Name of an option reply type, for error messages.
pub(crate) fn reply_name(reply: u32) -> &'static str {
    match reply {
        REP_ACK => "NBD_REP_ACK",
        2 => "NBD_REP_SERVER",
        REP_INFO => "NBD_REP_INFO",
        REP_META_CONTEXT => "NBD_REP_META_CONTEXT",
        0x8000_0001 => "NBD_REP_ERR_UNSUP: option not supported",
        0x8000_0002 => "NBD_REP_ERR_POLICY: forbidden by server policy",
        0x8000_0003 => "NBD_REP_ERR_INVALID: request judged invalid",
        0x8000_0004 => "NBD_REP_ERR_PLATFORM: not supported on the server's platform",
        0x8000_0005 => "NBD_REP_ERR_TLS_REQD: TLS required",
        REP_ERR_UNKNOWN => "NBD_REP_ERR_UNKNOWN: export not available",
        0x8000_0007 => "NBD_REP_ERR_SHUTDOWN: server shutting down",
        0x8000_0008 => "NBD_REP_ERR_BLOCK_SIZE_REQD: block size negotiation required",
        0x8000_0009 => "NBD_REP_ERR_TOO_BIG: request or reply too large",
        0x8000_000a => "NBD_REP_ERR_EXT_HEADER_REQD: extended headers required",
        r if r & REP_FLAG_ERROR != 0 => "unknown error reply",
        _ => "unknown reply type",
    }
}

// ---- Transmission ----------------------------------------------------------------------

pub(crate) const REQUEST_MAGIC: u32 = 0x2560_9513;
pub(crate) const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub(crate) const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

pub(crate) const CMD_READ: u16 = 0;
pub(crate) const CMD_DISC: u16 = 2;
pub(crate) const CMD_BLOCK_STATUS: u16 = 7;

/// Name of a command, for error messages.
pub(crate) fn command_name(command: u16) -> &'static str {
    match command {
        CMD_READ => "NBD_CMD_READ",
        CMD_DISC => "NBD_CMD_DISC",
        CMD_BLOCK_STATUS => "NBD_CMD_BLOCK_STATUS",
        _ => "an unknown command",
    }
}

/// Structured reply flag: this is the last chunk of the reply.
pub(crate) const REPLY_FLAG_DONE: u16 = 1 << 0;

pub(crate) const REPLY_TYPE_NONE: u16 = 0;
pub(crate) const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub(crate) const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
pub(crate) const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
/// Bit 15 marks every error chunk type.
pub(crate) const REPLY_TYPE_ERROR_BIT: u16 = 1 << 15;
pub(crate) const REPLY_TYPE_ERROR: u16 = REPLY_TYPE_ERROR_BIT | 1;
pub(crate) const REPLY_TYPE_ERROR_OFFSET: u16 = REPLY_TYPE_ERROR_BIT | 2;

/// Name of a structured reply chunk type, for error messages.
pub(crate) fn chunk_type_name(kind: u16) -> &'static str {
    match kind {
        REPLY_TYPE_NONE => "NBD_REPLY_TYPE_NONE",
        REPLY_TYPE_OFFSET_DATA => "NBD_REPLY_TYPE_OFFSET_DATA",
        REPLY_TYPE_OFFSET_HOLE => "NBD_REPLY_TYPE_OFFSET_HOLE",
        REPLY_TYPE_BLOCK_STATUS => "NBD_REPLY_TYPE_BLOCK_STATUS",
        6 => "NBD_REPLY_TYPE_BLOCK_STATUS_EXT",
        REPLY_TYPE_ERROR => "NBD_REPLY_TYPE_ERROR",
        REPLY_TYPE_ERROR_OFFSET => "NBD_REPLY_TYPE_ERROR_OFFSET",
        _ => "an unknown chunk type",
    }
}

// ---- Transmission flags (public: callers may inspect `transmission_flags()`) ------------

/// Transmission flag bit 0: always set by a conforming server.
pub const NBD_FLAG_HAS_FLAGS: u16 = 1 << 0;
/// The export is read-only.
pub const NBD_FLAG_READ_ONLY: u16 = 1 << 1;
/// The server understands `NBD_CMD_FLUSH`.
pub const NBD_FLAG_SEND_FLUSH: u16 = 1 << 2;
/// The server understands the FUA command flag.
pub const NBD_FLAG_SEND_FUA: u16 = 1 << 3;
/// The export behaves like a rotational medium.
pub const NBD_FLAG_ROTATIONAL: u16 = 1 << 4;
/// The server understands `NBD_CMD_TRIM`.
pub const NBD_FLAG_SEND_TRIM: u16 = 1 << 5;
/// The server understands `NBD_CMD_WRITE_ZEROES`.
pub const NBD_FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
/// The server honours the "don't fragment" read flag.
pub const NBD_FLAG_SEND_DF: u16 = 1 << 7;
/// Several connections to this export see one consistent cache.
pub const NBD_FLAG_CAN_MULTI_CONN: u16 = 1 << 8;
/// The server understands `NBD_CMD_CACHE`.
pub const NBD_FLAG_SEND_CACHE: u16 = 1 << 10;
/// The server understands the fast-zero flag.
pub const NBD_FLAG_SEND_FAST_ZERO: u16 = 1 << 11;

// ---- Error numbers ---------------------------------------------------------------------

/// Name of an NBD error number (the protocol's fixed subset of errno values), e.g. `EIO`;
/// `"unknown error number"` for others.
pub fn errno_name(errno: u32) -> &'static str {
    known_errno_name(errno).unwrap_or("unknown error number")
}

pub(crate) fn known_errno_name(errno: u32) -> Option<&'static str> {
    Some(match errno {
        1 => "EPERM",
        5 => "EIO",
        12 => "ENOMEM",
        22 => "EINVAL",
        28 => "ENOSPC",
        75 => "EOVERFLOW",
        95 => "ENOTSUP",
        108 => "ESHUTDOWN",
        _ => return None,
    })
}

/// Big-endian field readers for fixed-size byte arrays already read from the wire.
pub(crate) fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}

pub(crate) fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

pub(crate) fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]])
}
