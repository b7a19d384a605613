//! NBD wire format: magic numbers, constants and message encoding.
//!
//! This module owns every byte layout of the protocol (NBD protocol
//! specification, `doc/proto.md` of the NetworkBlockDevice/nbd project) and
//! nothing else: it does no I/O, holds no state and never panics on input.
//! Decoders take fixed-size arrays or slices that came off the network and
//! return [`Error`] for anything malformed; encoders write into fixed arrays
//! or caller-owned vectors so the hot path allocates nothing.
//!
//! All integers are big-endian ("network byte order", spec "Conventions").
//! To support a new option or command, add its constant here, its decoding if
//! it carries data, and its handling in `handshake` or `transmission`.

/// Magic numbers (spec "Handshake" and "Transmission").
pub mod magic {
    /// `NBDMAGIC`, the first 8 bytes the server sends (also `INIT_PASSWD`).
    pub const NBD: u64 = 0x4e42_444d_4147_4943;
    /// `IHAVEOPT`: sent by the server after `NBDMAGIC`, and by the client at
    /// the start of every option.
    pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
    /// Starts every option reply of fixed newstyle negotiation.
    pub const OPTION_REPLY: u64 = 0x0003_e889_0455_65a9;
    /// `NBD_REQUEST_MAGIC`, starts every transmission request.
    pub const REQUEST: u32 = 0x2560_9513;
    /// `NBD_SIMPLE_REPLY_MAGIC`, starts every simple reply.
    pub const SIMPLE_REPLY: u32 = 0x6744_6698;
    /// `NBD_STRUCTURED_REPLY_MAGIC`, starts every structured reply chunk.
    pub const STRUCTURED_REPLY: u32 = 0x668e_33ef;
}

/// Handshake flags sent by the server (spec "Handshake flags"), 16 bits.
pub mod handshake_flag {
    /// `NBD_FLAG_FIXED_NEWSTYLE`: the server speaks fixed newstyle.
    pub const FIXED_NEWSTYLE: u16 = 1 << 0;
    /// `NBD_FLAG_NO_ZEROES`: the client may ask to skip the 124 zero bytes
    /// after `NBD_OPT_EXPORT_NAME`.
    pub const NO_ZEROES: u16 = 1 << 1;
}

/// Client flags (spec "Client flags"), 32 bits.
pub mod client_flag {
    /// `NBD_FLAG_C_FIXED_NEWSTYLE`: the client speaks fixed newstyle.
    pub const FIXED_NEWSTYLE: u32 = 1 << 0;
    /// `NBD_FLAG_C_NO_ZEROES`: omit the 124 zero bytes after
    /// `NBD_OPT_EXPORT_NAME`.
    pub const NO_ZEROES: u32 = 1 << 1;
}

/// Transmission flags (spec "Transmission flags"), 16 bits.
pub mod tx_flag {
    /// `NBD_FLAG_HAS_FLAGS`: always set.
    pub const HAS_FLAGS: u16 = 1 << 0;
    /// `NBD_FLAG_READ_ONLY`: the export refuses writes.
    pub const READ_ONLY: u16 = 1 << 1;
    /// `NBD_FLAG_SEND_FLUSH`: `NBD_CMD_FLUSH` is supported.
    pub const SEND_FLUSH: u16 = 1 << 2;
    /// `NBD_FLAG_SEND_FUA`: `NBD_CMD_FLAG_FUA` is supported.
    pub const SEND_FUA: u16 = 1 << 3;
    /// `NBD_FLAG_ROTATIONAL`: the export behaves like a spinning disk.
    pub const ROTATIONAL: u16 = 1 << 4;
    /// `NBD_FLAG_SEND_TRIM`: `NBD_CMD_TRIM` is supported.
    pub const SEND_TRIM: u16 = 1 << 5;
    /// `NBD_FLAG_SEND_WRITE_ZEROES`: `NBD_CMD_WRITE_ZEROES` and
    /// `NBD_CMD_FLAG_NO_HOLE` are supported.
    pub const SEND_WRITE_ZEROES: u16 = 1 << 6;
    /// `NBD_FLAG_SEND_DF`: `NBD_CMD_FLAG_DF` is supported on reads (only
    /// with structured replies).
    pub const SEND_DF: u16 = 1 << 7;
    /// `NBD_FLAG_CAN_MULTI_CONN`: flush and FUA on one connection cover
    /// writes completed on every connection to the export.
    pub const CAN_MULTI_CONN: u16 = 1 << 8;
    /// `NBD_FLAG_SEND_CACHE`: `NBD_CMD_CACHE` is understood.
    pub const SEND_CACHE: u16 = 1 << 10;
    /// `NBD_FLAG_SEND_FAST_ZERO`: `NBD_CMD_FLAG_FAST_ZERO` is supported.
    pub const SEND_FAST_ZERO: u16 = 1 << 11;
}

/// Option types sent by the client during negotiation (spec "Option types").
pub mod opt {
    /// `NBD_OPT_EXPORT_NAME`: select an export and enter transmission;
    /// cannot fail gracefully.
    pub const EXPORT_NAME: u32 = 1;
    /// `NBD_OPT_ABORT`: end the session.
    pub const ABORT: u32 = 2;
    /// `NBD_OPT_LIST`: list exports.
    pub const LIST: u32 = 3;
    /// `NBD_OPT_STARTTLS`: upgrade to TLS.
    pub const STARTTLS: u32 = 5;
    /// `NBD_OPT_INFO`: describe an export without selecting it.
    pub const INFO: u32 = 6;
    /// `NBD_OPT_GO`: describe and select an export, enter transmission.
    pub const GO: u32 = 7;
    /// `NBD_OPT_STRUCTURED_REPLY`: use structured replies.
    pub const STRUCTURED_REPLY: u32 = 8;
    /// `NBD_OPT_LIST_META_CONTEXT`: list metadata contexts.
    pub const LIST_META_CONTEXT: u32 = 9;
    /// `NBD_OPT_SET_META_CONTEXT`: select metadata contexts.
    pub const SET_META_CONTEXT: u32 = 10;
    /// `NBD_OPT_EXTENDED_HEADERS`: 64-bit request and reply headers.
    pub const EXTENDED_HEADERS: u32 = 11;
}

/// Option reply types (spec "Option reply types").
pub mod rep {
    /// `NBD_REP_ACK`: the option succeeded (or a list ended).
    pub const ACK: u32 = 1;
    /// `NBD_REP_SERVER`: one export in the reply to `NBD_OPT_LIST`.
    pub const SERVER: u32 = 2;
    /// `NBD_REP_INFO`: one item of export information.
    pub const INFO: u32 = 3;
    /// Bit set in every error reply type.
    pub const ERR: u32 = 1 << 31;
    /// `NBD_REP_ERR_UNSUP`: unknown option.
    pub const ERR_UNSUP: u32 = ERR | 1;
    /// `NBD_REP_ERR_POLICY`: forbidden by server policy.
    pub const ERR_POLICY: u32 = ERR | 2;
    /// `NBD_REP_ERR_INVALID`: syntactically or semantically invalid option.
    pub const ERR_INVALID: u32 = ERR | 3;
    /// `NBD_REP_ERR_UNKNOWN`: no such export.
    pub const ERR_UNKNOWN: u32 = ERR | 6;
    /// `NBD_REP_ERR_SHUTDOWN`: the server is shutting down.
    pub const ERR_SHUTDOWN: u32 = ERR | 7;
    /// `NBD_REP_ERR_TOO_BIG`: the request is too large to process.
    pub const ERR_TOO_BIG: u32 = ERR | 9;
}

/// Information types of `NBD_REP_INFO` (spec "Option reply types").
pub mod info {
    /// `NBD_INFO_EXPORT`: size and transmission flags.
    pub const EXPORT: u16 = 0;
    /// `NBD_INFO_NAME`: canonical export name.
    pub const NAME: u16 = 1;
    /// `NBD_INFO_DESCRIPTION`: human-readable description.
    pub const DESCRIPTION: u16 = 2;
    /// `NBD_INFO_BLOCK_SIZE`: minimum, preferred and maximum block sizes.
    pub const BLOCK_SIZE: u16 = 3;
}

/// Command types of transmission requests (spec "Request types").
pub mod cmd {
    /// `NBD_CMD_READ`.
    pub const READ: u16 = 0;
    /// `NBD_CMD_WRITE`: followed by `length` bytes of payload.
    pub const WRITE: u16 = 1;
    /// `NBD_CMD_DISC`: soft disconnect, no reply.
    pub const DISC: u16 = 2;
    /// `NBD_CMD_FLUSH`.
    pub const FLUSH: u16 = 3;
    /// `NBD_CMD_TRIM`.
    pub const TRIM: u16 = 4;
    /// `NBD_CMD_CACHE`.
    pub const CACHE: u16 = 5;
    /// `NBD_CMD_WRITE_ZEROES`.
    pub const WRITE_ZEROES: u16 = 6;
    /// `NBD_CMD_BLOCK_STATUS`.
    pub const BLOCK_STATUS: u16 = 7;
}

/// Command flags of transmission requests (spec "Command flags").
pub mod cmd_flag {
    /// `NBD_CMD_FLAG_FUA`: reply only once the written data is durable.
    pub const FUA: u16 = 1 << 0;
    /// `NBD_CMD_FLAG_NO_HOLE`: `NBD_CMD_WRITE_ZEROES` must not punch a hole.
    pub const NO_HOLE: u16 = 1 << 1;
    /// `NBD_CMD_FLAG_DF`: reply to a read with at most one data chunk.
    pub const DF: u16 = 1 << 2;
    /// `NBD_CMD_FLAG_REQ_ONE`: one extent per block status context.
    pub const REQ_ONE: u16 = 1 << 3;
    /// `NBD_CMD_FLAG_FAST_ZERO`: fail write-zeroes unless it is fast.
    pub const FAST_ZERO: u16 = 1 << 4;
}

/// Structured reply chunk flags and types (spec "Structured reply flags",
/// "Structured reply types").
pub mod chunk {
    /// `NBD_REPLY_FLAG_DONE`: the last chunk of a reply.
    pub const FLAG_DONE: u16 = 1 << 0;
    /// `NBD_REPLY_TYPE_NONE`: no payload; ends a reply.
    pub const NONE: u16 = 0;
    /// `NBD_REPLY_TYPE_OFFSET_DATA`: 64-bit offset followed by data.
    pub const OFFSET_DATA: u16 = 1;
    /// `NBD_REPLY_TYPE_ERROR`: 32-bit error, 16-bit message length, message.
    pub const ERROR: u16 = (1 << 15) + 1;
}

/// Error values of replies (spec "Error values"). They equal the Linux
/// errno values of the same name.
pub mod errno {
    /// `NBD_EPERM`: operation not permitted.
    pub const EPERM: u32 = 1;
    /// `NBD_EIO`: input/output error.
    pub const EIO: u32 = 5;
    /// `NBD_ENOMEM`: cannot allocate memory.
    pub const ENOMEM: u32 = 12;
    /// `NBD_EINVAL`: invalid argument.
    pub const EINVAL: u32 = 22;
    /// `NBD_ENOSPC`: no space left on device.
    pub const ENOSPC: u32 = 28;
    /// `NBD_EOVERFLOW`: value too large.
    pub const EOVERFLOW: u32 = 75;
    /// `NBD_ENOTSUP`: operation not supported.
    pub const ENOTSUP: u32 = 95;
    /// `NBD_ESHUTDOWN`: server is shutting down.
    pub const ESHUTDOWN: u32 = 108;
}

/// Length in bytes of the server's first message: `NBDMAGIC`, `IHAVEOPT`
/// and the 16-bit handshake flags.
pub const GREETING_LEN: usize = 18;
/// Length in bytes of an option header: magic, option, data length.
pub const OPTION_HEADER_LEN: usize = 16;
/// Length in bytes of an option reply header: magic, option, type, length.
pub const OPTION_REPLY_HEADER_LEN: usize = 20;
/// Length in bytes of a (compact) transmission request header.
pub const REQUEST_HEADER_LEN: usize = 28;
/// Length in bytes of the zero padding after the `NBD_OPT_EXPORT_NAME` reply
/// unless `NBD_FLAG_C_NO_ZEROES` was negotiated.
pub const EXPORT_NAME_PADDING: usize = 124;
/// Maximum length in bytes of a protocol string (spec "Conventions").
pub const MAX_STRING_LEN: usize = 4096;

/// Errors of decoding messages received from a client.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    /// An option header did not start with `IHAVEOPT`.
    #[error("Option header has magic {0:#018x}, expected IHAVEOPT")]
    OptionMagic(u64),
    /// A request header did not start with `NBD_REQUEST_MAGIC`.
    #[error("Request header has magic {0:#010x}, expected {REQUEST:#010x}", REQUEST = magic::REQUEST)]
    RequestMagic(u32),
    /// Option data is shorter than its fields say.
    #[error("Option data of {length} bytes is too short for its fields")]
    OptionTruncated {
        /// Length of the option data in bytes.
        length: usize,
    },
    /// Option data is longer than its fields say.
    #[error("Option data of {length} bytes has {extra} trailing bytes")]
    OptionTrailing {
        /// Length of the option data in bytes.
        length: usize,
        /// Bytes left over after the last field.
        extra: usize,
    },
    /// A string is not valid UTF-8, contains NUL or exceeds 4096 bytes.
    #[error("String of {length} bytes is not a valid NBD string")]
    InvalidString {
        /// Length of the string in bytes.
        length: usize,
    },
}

/// An option header sent by the client (spec "Newstyle negotiation").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    /// The option type (see [`opt`]).
    pub option: u32,
    /// Length in bytes of the option data that follows the header.
    pub length: u32,
}

impl OptionHeader {
    /// Decodes an option header.
    ///
    /// # Errors
    /// [`Error::OptionMagic`] if it does not start with `IHAVEOPT`.
    pub fn decode(buf: &[u8; OPTION_HEADER_LEN]) -> Result<Self, Error> {
        let magic = be_u64(buf, 0);
        if magic != magic::IHAVEOPT {
            return Err(Error::OptionMagic(magic));
        }
        Ok(Self {
            option: be_u32(buf, 8),
            length: be_u32(buf, 12),
        })
    }

    /// Encodes the header (used by tests and client-side tools).
    pub fn encode(&self) -> [u8; OPTION_HEADER_LEN] {
        let mut out = [0; OPTION_HEADER_LEN];
        out[0..8].copy_from_slice(&magic::IHAVEOPT.to_be_bytes());
        out[8..12].copy_from_slice(&self.option.to_be_bytes());
        out[12..16].copy_from_slice(&self.length.to_be_bytes());
        out
    }
}

/// The server's first message of fixed newstyle negotiation.
pub fn greeting(handshake_flags: u16) -> [u8; GREETING_LEN] {
    let mut out = [0; GREETING_LEN];
    out[0..8].copy_from_slice(&magic::NBD.to_be_bytes());
    out[8..16].copy_from_slice(&magic::IHAVEOPT.to_be_bytes());
    out[16..18].copy_from_slice(&handshake_flags.to_be_bytes());
    out
}

/// Appends an option reply (header and `data`) to `out` (spec "Fixed
/// newstyle negotiation").
///
/// `data` must be shorter than 4 GiB; callers only pass strings bounded by
/// [`MAX_STRING_LEN`] and fixed-size information items.
pub fn push_option_reply(out: &mut Vec<u8>, option: u32, reply_type: u32, data: &[u8]) {
    let length = u32::try_from(data.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&magic::OPTION_REPLY.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&reply_type.to_be_bytes());
    out.extend_from_slice(&length.to_be_bytes());
    out.extend_from_slice(data);
}

/// Appends an `NBD_REP_INFO` reply carrying `NBD_INFO_EXPORT`: the export
/// size in bytes and the transmission flags (length 12).
pub fn push_info_export(out: &mut Vec<u8>, option: u32, size_bytes: u64, flags: u16) {
    let mut data = [0u8; 12];
    data[0..2].copy_from_slice(&info::EXPORT.to_be_bytes());
    data[2..10].copy_from_slice(&size_bytes.to_be_bytes());
    data[10..12].copy_from_slice(&flags.to_be_bytes());
    push_option_reply(out, option, rep::INFO, &data);
}

/// Appends an `NBD_REP_INFO` reply carrying `NBD_INFO_BLOCK_SIZE`: minimum,
/// preferred and maximum block sizes in bytes (length 14).
pub fn push_info_block_size(out: &mut Vec<u8>, option: u32, sizes: BlockSizes) {
    let mut data = [0u8; 14];
    data[0..2].copy_from_slice(&info::BLOCK_SIZE.to_be_bytes());
    data[2..6].copy_from_slice(&sizes.minimum.to_be_bytes());
    data[6..10].copy_from_slice(&sizes.preferred.to_be_bytes());
    data[10..14].copy_from_slice(&sizes.maximum.to_be_bytes());
    push_option_reply(out, option, rep::INFO, &data);
}

/// Appends an `NBD_REP_INFO` reply carrying `NBD_INFO_NAME` or
/// `NBD_INFO_DESCRIPTION` (`info_type`) with `text`.
pub fn push_info_text(out: &mut Vec<u8>, option: u32, info_type: u16, text: &str) {
    let mut data = Vec::with_capacity(2 + text.len());
    data.extend_from_slice(&info_type.to_be_bytes());
    data.extend_from_slice(text.as_bytes());
    push_option_reply(out, option, rep::INFO, &data);
}

/// Appends an `NBD_REP_SERVER` reply naming one export (reply to
/// `NBD_OPT_LIST`).
pub fn push_rep_server(out: &mut Vec<u8>, name: &str) {
    let mut data = Vec::with_capacity(4 + name.len());
    let name_len = u32::try_from(name.len()).unwrap_or(u32::MAX);
    data.extend_from_slice(&name_len.to_be_bytes());
    data.extend_from_slice(name.as_bytes());
    push_option_reply(out, opt::LIST, rep::SERVER, &data);
}

/// The reply to `NBD_OPT_EXPORT_NAME`: export size in bytes, transmission
/// flags, then 124 zero bytes unless `no_zeroes` (spec "Newstyle
/// negotiation").
pub fn push_export_name_reply(out: &mut Vec<u8>, size_bytes: u64, flags: u16, no_zeroes: bool) {
    out.extend_from_slice(&size_bytes.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    if !no_zeroes {
        out.extend_from_slice(&[0; EXPORT_NAME_PADDING]);
    }
}

/// Block size constraints in bytes (spec "Block size constraints").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockSizes {
    /// Smallest addressable length and alignment.
    pub minimum: u32,
    /// Smallest length and alignment that avoids read-modify-write.
    pub preferred: u32,
    /// Largest length of a single read or write payload.
    pub maximum: u32,
}

/// The data of an `NBD_OPT_INFO` or `NBD_OPT_GO` option.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest<'a> {
    /// Requested export name; empty selects the default export.
    pub name: &'a str,
    /// Requested information types (see [`info`]), in the client's order.
    pub requests: Vec<u16>,
}

impl<'a> InfoRequest<'a> {
    /// Decodes the option data: 32-bit name length, name, 16-bit count of
    /// information requests, 16 bits per request (spec "`NBD_OPT_INFO` and
    /// `NBD_OPT_GO`").
    ///
    /// # Errors
    /// [`Error::OptionTruncated`] or [`Error::OptionTrailing`] if the lengths
    /// disagree with `data.len()`; [`Error::InvalidString`] for a bad name.
    pub fn decode(data: &'a [u8]) -> Result<Self, Error> {
        let truncated = || Error::OptionTruncated { length: data.len() };
        let name_len = data.get(0..4).ok_or_else(truncated)?;
        let name_end = 4 + be_u32(name_len, 0) as usize;
        let name = data.get(4..name_end).ok_or_else(truncated)?;
        let count = data.get(name_end..name_end + 2).ok_or_else(truncated)?;
        let count = usize::from(u16::from_be_bytes([count[0], count[1]]));
        let list = &data[name_end + 2..];
        if list.len() < count * 2 {
            return Err(truncated());
        }
        if list.len() > count * 2 {
            return Err(Error::OptionTrailing {
                length: data.len(),
                extra: list.len() - count * 2,
            });
        }
        let requests = list
            .chunks_exact(2)
            .map(|b| u16::from_be_bytes([b[0], b[1]]))
            .collect();
        Ok(Self {
            name: decode_string(name)?,
            requests,
        })
    }
}

/// Checks that `bytes` form an NBD string (spec "Conventions"): UTF-8,
/// without NUL, at most [`MAX_STRING_LEN`] bytes.
///
/// # Errors
/// [`Error::InvalidString`] otherwise.
pub fn decode_string(bytes: &[u8]) -> Result<&str, Error> {
    let invalid = || Error::InvalidString {
        length: bytes.len(),
    };
    if bytes.len() > MAX_STRING_LEN || bytes.contains(&0) {
        return Err(invalid());
    }
    std::str::from_utf8(bytes).map_err(|_| invalid())
}

/// A transmission request type (spec "Request types").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// `NBD_CMD_READ`.
    Read,
    /// `NBD_CMD_WRITE`, followed by `length` bytes of payload.
    Write,
    /// `NBD_CMD_DISC`.
    Disc,
    /// `NBD_CMD_FLUSH`.
    Flush,
    /// `NBD_CMD_TRIM`.
    Trim,
    /// `NBD_CMD_WRITE_ZEROES`.
    WriteZeroes,
    /// Any type this server does not implement (including `NBD_CMD_CACHE`
    /// and `NBD_CMD_BLOCK_STATUS`, which it does not advertise).
    Other(u16),
}

impl Command {
    /// Maps the 16-bit type field to a command.
    pub fn from_type(kind: u16) -> Self {
        match kind {
            cmd::READ => Self::Read,
            cmd::WRITE => Self::Write,
            cmd::DISC => Self::Disc,
            cmd::FLUSH => Self::Flush,
            cmd::TRIM => Self::Trim,
            cmd::WRITE_ZEROES => Self::WriteZeroes,
            other => Self::Other(other),
        }
    }

    /// The 16-bit type field of this command.
    pub fn to_type(self) -> u16 {
        match self {
            Self::Read => cmd::READ,
            Self::Write => cmd::WRITE,
            Self::Disc => cmd::DISC,
            Self::Flush => cmd::FLUSH,
            Self::Trim => cmd::TRIM,
            Self::WriteZeroes => cmd::WRITE_ZEROES,
            Self::Other(other) => other,
        }
    }
}

/// A transmission request header (spec "Request message").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// Command flags (see [`cmd_flag`]).
    pub flags: u16,
    /// Request type.
    pub command: Command,
    /// Opaque handle echoed in the reply.
    pub handle: u64,
    /// Offset into the export in bytes.
    pub offset: u64,
    /// Length in bytes (of the payload for `NBD_CMD_WRITE`).
    pub length: u32,
}

impl Request {
    /// Decodes a request header.
    ///
    /// # Errors
    /// [`Error::RequestMagic`] if it does not start with
    /// `NBD_REQUEST_MAGIC`; the stream cannot be resynchronised after that.
    pub fn decode(buf: &[u8; REQUEST_HEADER_LEN]) -> Result<Self, Error> {
        let magic = be_u32(buf, 0);
        if magic != magic::REQUEST {
            return Err(Error::RequestMagic(magic));
        }
        Ok(Self {
            flags: u16::from_be_bytes([buf[4], buf[5]]),
            command: Command::from_type(u16::from_be_bytes([buf[6], buf[7]])),
            handle: be_u64(buf, 8),
            offset: be_u64(buf, 16),
            length: be_u32(buf, 24),
        })
    }

    /// Encodes the header (used by tests and client-side tools).
    pub fn encode(&self) -> [u8; REQUEST_HEADER_LEN] {
        let mut out = [0; REQUEST_HEADER_LEN];
        out[0..4].copy_from_slice(&magic::REQUEST.to_be_bytes());
        out[4..6].copy_from_slice(&self.flags.to_be_bytes());
        out[6..8].copy_from_slice(&self.command.to_type().to_be_bytes());
        out[8..16].copy_from_slice(&self.handle.to_be_bytes());
        out[16..24].copy_from_slice(&self.offset.to_be_bytes());
        out[24..28].copy_from_slice(&self.length.to_be_bytes());
        out
    }
}

/// Capacity of [`ReplyHeader`]: the largest header the server sends, a
/// structured `NBD_REPLY_TYPE_OFFSET_DATA` chunk header with its offset.
const REPLY_HEADER_CAPACITY: usize = 28;

/// The bytes of one reply that precede its data payload, kept inline so
/// queueing a reply allocates nothing.
#[derive(Clone, Copy)]
pub struct ReplyHeader {
    bytes: [u8; REPLY_HEADER_CAPACITY],
    len: u8,
}

impl ReplyHeader {
    /// A simple reply (spec "Simple reply message"): magic, error, handle.
    /// For a successful `NBD_CMD_READ` the data follows.
    pub fn simple(handle: u64, error: u32) -> Self {
        let mut h = Self::empty();
        h.push(&magic::SIMPLE_REPLY.to_be_bytes());
        h.push(&error.to_be_bytes());
        h.push(&handle.to_be_bytes());
        h
    }

    /// The final `NBD_REPLY_TYPE_OFFSET_DATA` chunk of a read of `length`
    /// bytes (at least 1) at `offset`; the data follows.
    pub fn offset_data(handle: u64, offset: u64, length: u32) -> Self {
        let mut h = Self::chunk(handle, chunk::OFFSET_DATA, length.saturating_add(8));
        h.push(&offset.to_be_bytes());
        h
    }

    /// A final `NBD_REPLY_TYPE_ERROR` chunk with `error` and no message.
    pub fn error_chunk(handle: u64, error: u32) -> Self {
        let mut h = Self::chunk(handle, chunk::ERROR, 6);
        h.push(&error.to_be_bytes());
        h.push(&0u16.to_be_bytes());
        h
    }

    /// A final `NBD_REPLY_TYPE_NONE` chunk (success without data).
    pub fn none_chunk(handle: u64) -> Self {
        Self::chunk(handle, chunk::NONE, 0)
    }

    /// The encoded bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }

    fn chunk(handle: u64, chunk_type: u16, length: u32) -> Self {
        let mut h = Self::empty();
        h.push(&magic::STRUCTURED_REPLY.to_be_bytes());
        h.push(&chunk::FLAG_DONE.to_be_bytes());
        h.push(&chunk_type.to_be_bytes());
        h.push(&handle.to_be_bytes());
        h.push(&length.to_be_bytes());
        h
    }

    fn empty() -> Self {
        Self {
            bytes: [0; REPLY_HEADER_CAPACITY],
            len: 0,
        }
    }

    fn push(&mut self, bytes: &[u8]) {
        let start = usize::from(self.len);
        self.bytes[start..start + bytes.len()].copy_from_slice(bytes);
        // Constructors push at most REPLY_HEADER_CAPACITY (28) bytes.
        self.len += bytes.len() as u8;
    }
}

impl std::fmt::Debug for ReplyHeader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("ReplyHeader")
            .field(&self.as_bytes())
            .finish()
    }
}

/// Maps an errno from a [`crate::block::BlockError`] or the system to an
/// NBD error value. Only the values the spec defines ("Error values") are
/// sent; `EDQUOT` and `EFBIG` become `NBD_ENOSPC` as the spec asks, and
/// anything else becomes `NBD_EIO`.
pub fn error_value(errno: i32) -> u32 {
    match errno {
        libc::EPERM => errno::EPERM,
        libc::ENOMEM => errno::ENOMEM,
        libc::EINVAL => errno::EINVAL,
        libc::ENOSPC | libc::EDQUOT | libc::EFBIG => errno::ENOSPC,
        libc::EOVERFLOW => errno::EOVERFLOW,
        libc::ENOTSUP => errno::ENOTSUP,
        libc::ESHUTDOWN => errno::ESHUTDOWN,
        _ => errno::EIO,
    }
}

fn be_u32(buf: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([buf[at], buf[at + 1], buf[at + 2], buf[at + 3]])
}

fn be_u64(buf: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&buf[at..at + 8]);
    u64::from_be_bytes(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_round_trips_and_checks_magic() {
        let req = Request {
            flags: cmd_flag::FUA,
            command: Command::Write,
            handle: 0x0102_0304_0506_0708,
            offset: 4096,
            length: 512,
        };
        let bytes = req.encode();
        assert_eq!(&bytes[0..4], &[0x25, 0x60, 0x95, 0x13]);
        assert_eq!(Request::decode(&bytes), Ok(req));

        let mut bad = bytes;
        bad[0] = 0;
        assert_eq!(Request::decode(&bad), Err(Error::RequestMagic(0x0060_9513)));
    }

    #[test]
    fn unknown_commands_are_preserved() {
        assert_eq!(Command::from_type(cmd::CACHE), Command::Other(5));
        assert_eq!(Command::from_type(cmd::TRIM), Command::Trim);
        assert_eq!(Command::Other(42).to_type(), 42);
    }

    #[test]
    fn option_header_checks_magic() {
        let hdr = OptionHeader {
            option: opt::GO,
            length: 10,
        };
        assert_eq!(OptionHeader::decode(&hdr.encode()), Ok(hdr));
        let mut bad = hdr.encode();
        bad[7] ^= 1;
        assert!(matches!(
            OptionHeader::decode(&bad),
            Err(Error::OptionMagic(_))
        ));
    }

    fn info_data(name: &[u8], requests: &[u16]) -> Vec<u8> {
        let mut d = Vec::new();
        d.extend_from_slice(&(name.len() as u32).to_be_bytes());
        d.extend_from_slice(name);
        d.extend_from_slice(&(requests.len() as u16).to_be_bytes());
        for r in requests {
            d.extend_from_slice(&r.to_be_bytes());
        }
        d
    }

    #[test]
    fn info_request_decodes() {
        let data = info_data(b"vol-1", &[info::BLOCK_SIZE, info::NAME]);
        let req = InfoRequest::decode(&data).expect("valid");
        assert_eq!(req.name, "vol-1");
        assert_eq!(req.requests, vec![info::BLOCK_SIZE, info::NAME]);

        let empty = info_data(b"", &[]);
        assert_eq!(InfoRequest::decode(&empty).expect("valid").name, "");
    }

    #[test]
    fn info_request_rejects_inconsistent_lengths() {
        let data = info_data(b"vol-1", &[info::BLOCK_SIZE]);
        // Cut anywhere: always an error, never a panic.
        for cut in 0..data.len() {
            assert!(InfoRequest::decode(&data[..cut]).is_err(), "cut at {cut}");
        }
        let mut trailing = data.clone();
        trailing.push(0);
        assert!(matches!(
            InfoRequest::decode(&trailing),
            Err(Error::OptionTrailing { extra: 1, .. })
        ));
        // A name length pointing far beyond the data.
        let mut huge = data;
        huge[0..4].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(
            InfoRequest::decode(&huge),
            Err(Error::OptionTruncated { .. })
        ));
    }

    #[test]
    fn strings_are_validated() {
        assert_eq!(decode_string(b"ok"), Ok("ok"));
        assert!(decode_string(b"a\0b").is_err());
        assert!(decode_string(&[0xff, 0xfe]).is_err());
        assert!(decode_string(&vec![b'a'; MAX_STRING_LEN + 1]).is_err());
        assert!(decode_string(&vec![b'a'; MAX_STRING_LEN]).is_ok());
    }

    #[test]
    fn reply_headers_have_spec_layout() {
        let simple = ReplyHeader::simple(7, errno::EINVAL);
        assert_eq!(
            simple.as_bytes(),
            &[0x67, 0x44, 0x66, 0x98, 0, 0, 0, 22, 0, 0, 0, 0, 0, 0, 0, 7]
        );

        let data = ReplyHeader::offset_data(9, 4096, 512);
        let b = data.as_bytes();
        assert_eq!(b.len(), 28);
        assert_eq!(&b[0..4], &magic::STRUCTURED_REPLY.to_be_bytes());
        assert_eq!(&b[4..6], &chunk::FLAG_DONE.to_be_bytes());
        assert_eq!(&b[6..8], &chunk::OFFSET_DATA.to_be_bytes());
        assert_eq!(&b[8..16], &9u64.to_be_bytes());
        assert_eq!(&b[16..20], &520u32.to_be_bytes());
        assert_eq!(&b[20..28], &4096u64.to_be_bytes());

        let err = ReplyHeader::error_chunk(3, errno::EIO);
        let b = err.as_bytes();
        assert_eq!(b.len(), 26);
        assert_eq!(&b[6..8], &chunk::ERROR.to_be_bytes());
        assert_eq!(&b[16..20], &6u32.to_be_bytes());
        assert_eq!(&b[20..24], &5u32.to_be_bytes());

        assert_eq!(ReplyHeader::none_chunk(1).as_bytes().len(), 20);
    }

    #[test]
    fn option_replies_have_spec_layout() {
        let mut out = Vec::new();
        push_info_export(&mut out, opt::GO, 1 << 30, tx_flag::HAS_FLAGS);
        assert_eq!(out.len(), OPTION_REPLY_HEADER_LEN + 12);
        assert_eq!(&out[0..8], &magic::OPTION_REPLY.to_be_bytes());
        assert_eq!(&out[8..12], &opt::GO.to_be_bytes());
        assert_eq!(&out[12..16], &rep::INFO.to_be_bytes());
        assert_eq!(&out[16..20], &12u32.to_be_bytes());
        assert_eq!(&out[20..22], &info::EXPORT.to_be_bytes());
        assert_eq!(&out[22..30], &(1u64 << 30).to_be_bytes());

        let mut out = Vec::new();
        push_export_name_reply(&mut out, 1, 1, false);
        assert_eq!(out.len(), 10 + EXPORT_NAME_PADDING);
        out.clear();
        push_export_name_reply(&mut out, 1, 1, true);
        assert_eq!(out.len(), 10);
    }

    #[test]
    fn errno_mapping_only_sends_spec_values() {
        assert_eq!(error_value(libc::EINVAL), errno::EINVAL);
        assert_eq!(error_value(libc::EDQUOT), errno::ENOSPC);
        assert_eq!(error_value(libc::ESHUTDOWN), errno::ESHUTDOWN);
        assert_eq!(error_value(libc::EBADF), errno::EIO);
    }
}

/// decode(encode(x)) == x over generated headers (proptest).
#[cfg(test)]
mod properties {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn requests_round_trip(
            flags in any::<u16>(),
            kind in any::<u16>(),
            handle in any::<u64>(),
            offset in any::<u64>(),
            length in any::<u32>(),
        ) {
            let request = Request { flags, command: Command::from_type(kind), handle, offset, length };
            prop_assert_eq!(Request::decode(&request.encode()).ok(), Some(request));
        }

        #[test]
        fn option_headers_round_trip(option in any::<u32>(), length in any::<u32>()) {
            let header = OptionHeader { option, length };
            prop_assert_eq!(OptionHeader::decode(&header.encode()).ok(), Some(header));
        }

        #[test]
        fn a_request_without_its_magic_is_refused(
            bytes in any::<[u8; REQUEST_HEADER_LEN]>(),
        ) {
            prop_assume!(bytes[0..4] != magic::REQUEST.to_be_bytes());
            prop_assert!(Request::decode(&bytes).is_err());
        }
    }
}
