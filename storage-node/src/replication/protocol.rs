//! The replica protocol's frames: how a target talks to a replica on another
//! node over TCP.
//!
//! # Shape
//!
//! A connection carries requests from the client (the target) and responses
//! from the server (the replica's agent). Requests are pipelined: a client
//! sends many without waiting, and the server answers each once, in any
//! order, matched by its request id. Every frame is a fixed header, an
//! optional variable part, and a payload. All integers are little-endian
//! (the byte order of every platform Ballast runs on, so nothing is
//! swapped). Lengths and offsets are in bytes.
//!
//! ## Request frame (64 bytes + volume id + payload)
//!
//! | offset | size | field | meaning |
//! |---:|---:|---|---|
//! | 0 | 4 | magic | `"BLRQ"` (`42 4C 52 51`) |
//! | 4 | 1 | version | [`VERSION`] (2) |
//! | 5 | 1 | op | [`Op`] |
//! | 6 | 2 | flags | bit 0 [`Flags::FUA`], bit 1 [`Flags::NO_HOLE`]; other bits zero |
//! | 8 | 8 | request id | chosen by the client, echoed in the response |
//! | 16 | 8 | epoch | the target's epoch (fencing) |
//! | 24 | 8 | session | the client's connection session (see below) |
//! | 32 | 8 | offset | first byte of the range |
//! | 40 | 8 | length | length of the range (see the ops) |
//! | 48 | 4 | payload length | bytes of payload after the volume id, at most [`MAX_PAYLOAD_BYTES`] |
//! | 52 | 4 | payload CRC | CRC32C of the payload (0 when empty) |
//! | 56 | 1 | volume id length | 1 to [`MAX_VOLUME_ID_BYTES`] |
//! | 57 | 3 | reserved | zero |
//! | 60 | 4 | header CRC | CRC32C of bytes 0..60 followed by the volume id |
//! | 64 | n | volume id | UTF-8 |
//! | 64+n | p | payload | |
//!
//! ## Sessions
//!
//! A client takes a new session number, higher than any it (or any other
//! client in its process) used before, for every connection it opens, and
//! sends it in every request of that connection. A replica admits a
//! request only if its (epoch, session) is not older than the newest it
//! admitted: a lower session under the current epoch is refused with
//! STALE_SESSION, and a higher one first waits for every request admitted
//! under older sessions to complete (see [`super::fence`]). So requests of
//! a connection the client gave up on (a timeout tore it down while they
//! sat in the replica's socket buffer, e.g. its node was paused) can never
//! execute after a request of a newer connection. Version 1 had no session
//! and is refused.
//!
//! ## Response frame (36 bytes + payload)
//!
//! | offset | size | field | meaning |
//! |---:|---:|---|---|
//! | 0 | 4 | magic | `"BLRS"` (`42 4C 52 53`) |
//! | 4 | 1 | version | [`VERSION`] |
//! | 5 | 1 | status | [`Status`] |
//! | 6 | 2 | reserved | zero |
//! | 8 | 8 | request id | of the request answered (0 if it could not be trusted) |
//! | 16 | 8 | detail | STALE_EPOCH: the replica's epoch; STALE_SESSION: its newest session; OUT_OF_RANGE: its size in bytes; else 0 |
//! | 24 | 4 | payload length | at most [`MAX_PAYLOAD_BYTES`] |
//! | 28 | 4 | payload CRC | CRC32C of the payload |
//! | 32 | 4 | header CRC | CRC32C of bytes 0..32 |
//! | 36 | p | payload | OK: see the ops; errors: a UTF-8 message of at most [`MAX_MESSAGE_BYTES`] |
//!
//! ## Operations
//!
//! | op | code | request | OK response payload |
//! |---|---:|---|---|
//! | READ | 1 | offset, length (≤ 32 MiB) | the `length` bytes |
//! | WRITE | 2 | offset, length = payload length, payload = data; FUA | none |
//! | FLUSH | 3 | offset = length = 0 | none |
//! | TRIM | 4 | offset, length | none |
//! | WRITE_ZEROES | 5 | offset, length; FUA, NO_HOLE (keep allocated) | none |
//! | REGION_HASHES | 6 | offset, length, payload = region size (u64); at most [`MAX_REGIONS_PER_REQUEST`] regions | per region: 1 byte (1 = hole, else 0), 16 bytes XXH3-128 |
//! | ALLOCATED_EXTENTS | 7 | offset, length | u64 complete-to, then per extent u64 offset, u64 length (at most [`MAX_EXTENTS_PER_RESPONSE`]) |
//! | INFO | 8 | none | u64 size, u64 block size, u64 epoch |
//!
//! Flags other than those listed for an op are refused. Every op carries the
//! epoch and is fenced; INFO is how a target claims a replica with a new
//! epoch. ALLOCATED_EXTENTS answers at most [`MAX_EXTENTS_PER_RESPONSE`]
//! extents; *complete-to* is the offset up to which the list is complete,
//! and the client asks again from there.
//!
//! ## Integrity and errors
//!
//! Both CRCs are CRC32C (Castagnoli, hardware accelerated on x86-64 and
//! aarch64). The header CRC covers the payload CRC, so one header check
//! covers the whole frame. A receiver validates the fixed header (magic,
//! version, volume id length), reads the volume id, checks the header CRC,
//! bounds the payload length, then reads and checks the payload; nothing is
//! executed before the whole frame checks out.
//!
//! A server answers a request whose CRC fails with CHECKSUM, and any other
//! malformed request (bad magic or version, unknown op, bad flags, payload
//! too large, non-UTF-8 volume id, nonzero reserved bytes, inconsistent
//! lengths) with BAD_REQUEST, then closes the connection: the stream can no
//! longer be trusted. A client that receives a malformed response or one
//! whose CRC fails fails every request outstanding on the connection and
//! reconnects for the next one.
//!
//! # Extending it
//!
//! A new op takes the next code, documents its fields and payloads in the
//! table above, and names the flags it accepts in [`Op::allowed_flags`]. A
//! change to a frame's layout bumps [`VERSION`].

use std::fmt;
use std::io;

use tokio::io::{AsyncRead, AsyncReadExt};

use super::{Extent, RegionHash, ReplicaInfo};
use crate::buf::IoBuf;

pub use super::{
    MAX_EXTENTS_PER_RESPONSE, MAX_PAYLOAD_BYTES, MAX_REGIONS_PER_REQUEST, MAX_VOLUME_ID_BYTES,
};

/// Protocol version this code speaks (2: sessions in the request header).
/// Frames of any other version are refused with BAD_REQUEST.
pub const VERSION: u8 = 2;

/// Magic of request frames: `"BLRQ"`.
pub const REQUEST_MAGIC: [u8; 4] = *b"BLRQ";

/// Magic of response frames: `"BLRS"`.
pub const RESPONSE_MAGIC: [u8; 4] = *b"BLRS";

/// Bytes of the fixed request header, before the volume id.
pub const REQUEST_HEADER_LEN: usize = 64;

/// Bytes of the response header.
pub const RESPONSE_HEADER_LEN: usize = 36;

/// Longest error message in a response, in bytes.
pub const MAX_MESSAGE_BYTES: usize = 1024;

/// Bytes per region in a REGION_HASHES response.
pub const REGION_HASH_BYTES: usize = 17;

/// Bytes per extent in an ALLOCATED_EXTENTS response (after the 8-byte
/// complete-to offset).
pub const EXTENT_BYTES: usize = 16;

/// Bytes of an INFO response.
pub const INFO_BYTES: usize = 24;

/// Errors of reading and decoding frames. Any of them ends the connection.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The peer closed the connection in the middle of a frame, or while
    /// requests were outstanding.
    #[error("Connection closed by the peer")]
    Closed,
    /// Reading or writing the socket failed.
    #[error("Connection I/O failed")]
    Io(#[source] io::Error),
    /// The frame does not start with the expected magic.
    #[error("Bad frame magic {0:02x?}")]
    BadMagic([u8; 4]),
    /// The frame has a protocol version this code does not speak.
    #[error("Unsupported protocol version {0} (this side speaks {VERSION})")]
    BadVersion(u8),
    /// The volume id length is zero or larger than [`MAX_VOLUME_ID_BYTES`].
    #[error("Volume id length of {0} bytes is not between 1 and {MAX_VOLUME_ID_BYTES}")]
    VolumeIdLength(u8),
    /// The header's CRC32C does not match: the header was corrupted.
    #[error("Header checksum mismatch")]
    HeaderChecksum,
    /// The payload's CRC32C does not match: the payload was corrupted.
    #[error("Payload checksum mismatch in frame {request_id}")]
    PayloadChecksum {
        /// Request id of the frame.
        request_id: u64,
    },
    /// The payload length exceeds [`MAX_PAYLOAD_BYTES`].
    #[error(
        "Payload of {len} bytes in frame {request_id} exceeds the maximum of {MAX_PAYLOAD_BYTES}"
    )]
    PayloadTooLarge {
        /// Request id of the frame.
        request_id: u64,
        /// The announced payload length in bytes.
        len: u32,
    },
    /// The op code is unknown.
    #[error("Unknown operation {op} in request {request_id}")]
    UnknownOp {
        /// Request id of the frame.
        request_id: u64,
        /// The op code.
        op: u8,
    },
    /// The status code is unknown.
    #[error("Unknown status {status} in response {request_id}")]
    UnknownStatus {
        /// Request id of the frame.
        request_id: u64,
        /// The status code.
        status: u8,
    },
    /// Flags the op does not accept.
    #[error("Flags {flags:#06x} are not valid for {op} in request {request_id}")]
    BadFlags {
        /// Request id of the frame.
        request_id: u64,
        /// The op.
        op: Op,
        /// The flags.
        flags: u16,
    },
    /// Reserved bytes are not zero.
    #[error("Reserved header bytes are not zero in frame {request_id}")]
    Reserved {
        /// Request id of the frame.
        request_id: u64,
    },
    /// The volume id is not UTF-8.
    #[error("Volume id of request {request_id} is not UTF-8")]
    VolumeIdUtf8 {
        /// Request id of the frame.
        request_id: u64,
    },
    /// A length or payload is inconsistent with the op.
    #[error("Malformed frame {request_id}: {reason}")]
    Malformed {
        /// Request id of the frame.
        request_id: u64,
        /// What is inconsistent.
        reason: String,
    },
    /// The peer answered CHECKSUM: a frame was corrupted on the way to it.
    #[error("The peer refused a corrupted frame")]
    PeerChecksum,
    /// The connection was torn down after a request on it timed out, so its
    /// state is unknown.
    #[error("Connection abandoned after a request timed out")]
    Abandoned,
    /// The client was closed.
    #[error("Client closed")]
    ClientClosed,
}

impl Error {
    /// True when the error is a CRC mismatch (answered with CHECKSUM rather
    /// than BAD_REQUEST).
    pub fn is_checksum(&self) -> bool {
        matches!(self, Error::HeaderChecksum | Error::PayloadChecksum { .. })
    }

    /// The request id to answer the error with: the frame's, when its header
    /// checked out, else 0.
    pub fn request_id(&self) -> u64 {
        match self {
            Error::PayloadChecksum { request_id }
            | Error::PayloadTooLarge { request_id, .. }
            | Error::UnknownOp { request_id, .. }
            | Error::UnknownStatus { request_id, .. }
            | Error::BadFlags { request_id, .. }
            | Error::Reserved { request_id }
            | Error::VolumeIdUtf8 { request_id }
            | Error::Malformed { request_id, .. } => *request_id,
            Error::Closed
            | Error::Io(_)
            | Error::BadMagic(_)
            | Error::BadVersion(_)
            | Error::VolumeIdLength(_)
            | Error::HeaderChecksum
            | Error::PeerChecksum
            | Error::Abandoned
            | Error::ClientClosed => 0,
        }
    }
}

impl From<io::Error> for Error {
    fn from(error: io::Error) -> Self {
        if error.kind() == io::ErrorKind::UnexpectedEof {
            Error::Closed
        } else {
            Error::Io(error)
        }
    }
}

/// Operation codes of requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Op {
    /// Read bytes.
    Read = 1,
    /// Write bytes.
    Write = 2,
    /// Make completed writes durable.
    Flush = 3,
    /// Discard a range.
    Trim = 4,
    /// Write zeroes to a range.
    WriteZeroes = 5,
    /// Hash regions of a range.
    RegionHashes = 6,
    /// List allocated extents of a range.
    AllocatedExtents = 7,
    /// Report size, block size and epoch.
    Info = 8,
}

impl Op {
    /// Decodes an op code.
    pub fn from_code(code: u8) -> Option<Op> {
        Some(match code {
            1 => Op::Read,
            2 => Op::Write,
            3 => Op::Flush,
            4 => Op::Trim,
            5 => Op::WriteZeroes,
            6 => Op::RegionHashes,
            7 => Op::AllocatedExtents,
            8 => Op::Info,
            _ => return None,
        })
    }

    /// The flags this op accepts.
    pub fn allowed_flags(self) -> Flags {
        match self {
            Op::Write => Flags::FUA,
            Op::WriteZeroes => Flags(Flags::FUA.0 | Flags::NO_HOLE.0),
            Op::Read
            | Op::Flush
            | Op::Trim
            | Op::RegionHashes
            | Op::AllocatedExtents
            | Op::Info => Flags::NONE,
        }
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self {
            Op::Read => "READ",
            Op::Write => "WRITE",
            Op::Flush => "FLUSH",
            Op::Trim => "TRIM",
            Op::WriteZeroes => "WRITE_ZEROES",
            Op::RegionHashes => "REGION_HASHES",
            Op::AllocatedExtents => "ALLOCATED_EXTENTS",
            Op::Info => "INFO",
        };
        f.write_str(name)
    }
}

/// Request flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Flags(pub u16);

impl Flags {
    /// No flags.
    pub const NONE: Flags = Flags(0);
    /// Force unit access: the data is durable when the write is answered.
    pub const FUA: Flags = Flags(1);
    /// WRITE_ZEROES must keep the range allocated (no hole).
    pub const NO_HOLE: Flags = Flags(2);

    /// True when every bit of `other` is set.
    pub fn contains(self, other: Flags) -> bool {
        self.0 & other.0 == other.0
    }

    /// Sets the bits of `other` when `on`.
    pub fn with(self, other: Flags, on: bool) -> Flags {
        if on { Flags(self.0 | other.0) } else { self }
    }
}

/// Response status codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Status {
    /// Success.
    Ok = 0,
    /// The request's epoch is lower than the replica's (in `detail`).
    StaleEpoch = 1,
    /// No replica of the volume on this node.
    NotFound = 2,
    /// The range is beyond the end of the replica (its size in `detail`).
    OutOfRange = 3,
    /// The replica's pool is full.
    NoSpace = 4,
    /// The replica's storage failed (or a new epoch could not be persisted).
    IoError = 5,
    /// The request is malformed; the connection is closed after it unless the
    /// request was well-framed but invalid (e.g. a zero region size).
    BadRequest = 6,
    /// The request failed its CRC; the connection is closed after it.
    Checksum = 7,
    /// The replica is not accepting I/O (stopping).
    Unavailable = 8,
    /// The request's session is older than the newest the replica admitted
    /// under its epoch (in `detail`): it comes from a connection the client
    /// gave up on, and was not executed.
    StaleSession = 9,
}

impl Status {
    /// Decodes a status code.
    pub fn from_code(code: u8) -> Option<Status> {
        Some(match code {
            0 => Status::Ok,
            1 => Status::StaleEpoch,
            2 => Status::NotFound,
            3 => Status::OutOfRange,
            4 => Status::NoSpace,
            5 => Status::IoError,
            6 => Status::BadRequest,
            7 => Status::Checksum,
            8 => Status::Unavailable,
            9 => Status::StaleSession,
            _ => return None,
        })
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self {
            Status::Ok => "OK",
            Status::StaleEpoch => "STALE_EPOCH",
            Status::NotFound => "NOT_FOUND",
            Status::OutOfRange => "OUT_OF_RANGE",
            Status::NoSpace => "NO_SPACE",
            Status::IoError => "IO_ERROR",
            Status::BadRequest => "BAD_REQUEST",
            Status::Checksum => "CHECKSUM",
            Status::Unavailable => "UNAVAILABLE",
            Status::StaleSession => "STALE_SESSION",
        };
        f.write_str(name)
    }
}

/// The fixed fields of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHeader {
    /// The operation.
    pub op: Op,
    /// Its flags.
    pub flags: Flags,
    /// Client-chosen id, echoed in the response.
    pub request_id: u64,
    /// The target's epoch.
    pub epoch: u64,
    /// The client's connection session (see the module docs).
    pub session: u64,
    /// First byte of the range.
    pub offset: u64,
    /// Length of the range in bytes.
    pub length: u64,
    /// Payload bytes following the volume id.
    pub payload_len: u32,
    /// CRC32C of the payload.
    pub payload_crc: u32,
}

/// An encoded request header with its volume id, without allocating.
#[derive(Clone)]
pub struct EncodedRequest {
    bytes: [u8; REQUEST_HEADER_LEN + MAX_VOLUME_ID_BYTES],
    len: usize,
}

impl EncodedRequest {
    /// The bytes to send before the payload.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len]
    }

    /// Mutable access to the encoded bytes, for tests that corrupt frames.
    #[cfg(test)]
    pub(crate) fn as_mut_bytes(&mut self) -> &mut [u8] {
        &mut self.bytes[..self.len]
    }
}

impl RequestHeader {
    /// Encodes the header for `volume_id`, computing the header CRC.
    ///
    /// # Panics
    /// Panics if `volume_id` is empty or longer than
    /// [`MAX_VOLUME_ID_BYTES`]; callers validate it once, up front.
    pub fn encode(&self, volume_id: &str) -> EncodedRequest {
        let id = volume_id.as_bytes();
        assert!(
            !id.is_empty() && id.len() <= MAX_VOLUME_ID_BYTES,
            "volume id length checked by the caller"
        );
        let mut bytes = [0u8; REQUEST_HEADER_LEN + MAX_VOLUME_ID_BYTES];
        bytes[0..4].copy_from_slice(&REQUEST_MAGIC);
        bytes[4] = VERSION;
        bytes[5] = self.op as u8;
        bytes[6..8].copy_from_slice(&self.flags.0.to_le_bytes());
        bytes[8..16].copy_from_slice(&self.request_id.to_le_bytes());
        bytes[16..24].copy_from_slice(&self.epoch.to_le_bytes());
        bytes[24..32].copy_from_slice(&self.session.to_le_bytes());
        bytes[32..40].copy_from_slice(&self.offset.to_le_bytes());
        bytes[40..48].copy_from_slice(&self.length.to_le_bytes());
        bytes[48..52].copy_from_slice(&self.payload_len.to_le_bytes());
        bytes[52..56].copy_from_slice(&self.payload_crc.to_le_bytes());
        bytes[56] = id.len() as u8;
        let len = REQUEST_HEADER_LEN + id.len();
        bytes[REQUEST_HEADER_LEN..len].copy_from_slice(id);
        let crc = crc32c::crc32c_append(crc32c::crc32c(&bytes[..60]), id);
        bytes[60..64].copy_from_slice(&crc.to_le_bytes());
        EncodedRequest { bytes, len }
    }
}

/// Reads the next request header and volume id, validating everything but
/// the payload, which the caller reads with [`read_payload`].
///
/// Returns `Ok(None)` when the peer closed the connection between frames.
///
/// # Cancel safety
/// Not cancel safe: a partially read frame is lost.
pub async fn read_request_header<R: AsyncRead + Unpin>(
    reader: &mut R,
) -> Result<Option<(RequestHeader, String)>, Error> {
    let mut fixed = [0u8; REQUEST_HEADER_LEN];
    if !read_frame_start(reader, &mut fixed).await? {
        return Ok(None);
    }
    if fixed[0..4] != REQUEST_MAGIC {
        return Err(Error::BadMagic(array(&fixed, 0)));
    }
    if fixed[4] != VERSION {
        return Err(Error::BadVersion(fixed[4]));
    }
    let id_len = fixed[56];
    if id_len == 0 || usize::from(id_len) > MAX_VOLUME_ID_BYTES {
        return Err(Error::VolumeIdLength(id_len));
    }
    let mut id = vec![0u8; usize::from(id_len)];
    reader.read_exact(&mut id).await?;
    let crc = crc32c::crc32c_append(crc32c::crc32c(&fixed[..60]), &id);
    if crc != u32::from_le_bytes(array(&fixed, 60)) {
        return Err(Error::HeaderChecksum);
    }
    // The header is intact from here on: its fields can be trusted.
    let request_id = u64::from_le_bytes(array(&fixed, 8));
    let payload_len = u32::from_le_bytes(array(&fixed, 48));
    if payload_len as usize > MAX_PAYLOAD_BYTES {
        return Err(Error::PayloadTooLarge {
            request_id,
            len: payload_len,
        });
    }
    if fixed[57..60] != [0; 3] {
        return Err(Error::Reserved { request_id });
    }
    let op = Op::from_code(fixed[5]).ok_or(Error::UnknownOp {
        request_id,
        op: fixed[5],
    })?;
    let flags = Flags(u16::from_le_bytes(array(&fixed, 6)));
    if flags.0 & !op.allowed_flags().0 != 0 {
        return Err(Error::BadFlags {
            request_id,
            op,
            flags: flags.0,
        });
    }
    let volume_id = String::from_utf8(id).map_err(|_| Error::VolumeIdUtf8 { request_id })?;
    let header = RequestHeader {
        op,
        flags,
        request_id,
        epoch: u64::from_le_bytes(array(&fixed, 16)),
        session: u64::from_le_bytes(array(&fixed, 24)),
        offset: u64::from_le_bytes(array(&fixed, 32)),
        length: u64::from_le_bytes(array(&fixed, 40)),
        payload_len,
        payload_crc: u32::from_le_bytes(array(&fixed, 52)),
    };
    Ok(Some((header, volume_id)))
}

/// Reads a payload of `len` bytes (already bounded by the header check) into
/// an aligned buffer and checks its CRC32C against `crc`.
///
/// # Cancel safety
/// Not cancel safe: a partially read payload is lost.
pub async fn read_payload<R: AsyncRead + Unpin>(
    reader: &mut R,
    request_id: u64,
    len: u32,
    crc: u32,
) -> Result<IoBuf, Error> {
    let mut payload = IoBuf::zeroed(len as usize);
    reader.read_exact(&mut payload).await?;
    if crc32c::crc32c(&payload) != crc {
        return Err(Error::PayloadChecksum { request_id });
    }
    Ok(payload)
}

/// The fields of a response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResponseHeader {
    /// The outcome.
    pub status: Status,
    /// Id of the request answered.
    pub request_id: u64,
    /// Status-specific detail (see the module docs).
    pub detail: u64,
    /// Payload bytes following the header.
    pub payload_len: u32,
    /// CRC32C of the payload.
    pub payload_crc: u32,
}

impl ResponseHeader {
    /// Encodes the header, computing its CRC.
    pub fn encode(&self) -> [u8; RESPONSE_HEADER_LEN] {
        let mut bytes = [0u8; RESPONSE_HEADER_LEN];
        bytes[0..4].copy_from_slice(&RESPONSE_MAGIC);
        bytes[4] = VERSION;
        bytes[5] = self.status as u8;
        bytes[8..16].copy_from_slice(&self.request_id.to_le_bytes());
        bytes[16..24].copy_from_slice(&self.detail.to_le_bytes());
        bytes[24..28].copy_from_slice(&self.payload_len.to_le_bytes());
        bytes[28..32].copy_from_slice(&self.payload_crc.to_le_bytes());
        let crc = crc32c::crc32c(&bytes[..32]);
        bytes[32..36].copy_from_slice(&crc.to_le_bytes());
        bytes
    }
}

/// Reads and validates the next response header (the caller reads the
/// payload with [`read_payload`]).
///
/// Returns `Ok(None)` when the peer closed the connection between frames.
///
/// # Cancel safety
/// Not cancel safe: a partially read frame is lost.
pub async fn read_response_header<R: AsyncRead + Unpin>(
    reader: &mut R,
) -> Result<Option<ResponseHeader>, Error> {
    let mut bytes = [0u8; RESPONSE_HEADER_LEN];
    if !read_frame_start(reader, &mut bytes).await? {
        return Ok(None);
    }
    if bytes[0..4] != RESPONSE_MAGIC {
        return Err(Error::BadMagic(array(&bytes, 0)));
    }
    if bytes[4] != VERSION {
        return Err(Error::BadVersion(bytes[4]));
    }
    if crc32c::crc32c(&bytes[..32]) != u32::from_le_bytes(array(&bytes, 32)) {
        return Err(Error::HeaderChecksum);
    }
    let request_id = u64::from_le_bytes(array(&bytes, 8));
    if bytes[6..8] != [0; 2] {
        return Err(Error::Reserved { request_id });
    }
    let status = Status::from_code(bytes[5]).ok_or(Error::UnknownStatus {
        request_id,
        status: bytes[5],
    })?;
    let payload_len = u32::from_le_bytes(array(&bytes, 24));
    if payload_len as usize > MAX_PAYLOAD_BYTES {
        return Err(Error::PayloadTooLarge {
            request_id,
            len: payload_len,
        });
    }
    Ok(Some(ResponseHeader {
        status,
        request_id,
        detail: u64::from_le_bytes(array(&bytes, 16)),
        payload_len,
        payload_crc: u32::from_le_bytes(array(&bytes, 28)),
    }))
}

/// Fills `buf` with the start of a frame; false if the stream ended cleanly
/// before its first byte.
async fn read_frame_start<R: AsyncRead + Unpin>(
    reader: &mut R,
    buf: &mut [u8],
) -> Result<bool, Error> {
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..]).await {
            Ok(0) if filled == 0 => return Ok(false),
            Ok(0) => return Err(Error::Closed),
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(true)
}

fn array<const N: usize>(bytes: &[u8], at: usize) -> [u8; N] {
    let mut out = [0u8; N];
    out.copy_from_slice(&bytes[at..at + N]);
    out
}

/// Encodes the payload of a REGION_HASHES request: the region size.
pub fn encode_region_bytes(region_bytes: u64) -> [u8; 8] {
    region_bytes.to_le_bytes()
}

/// Decodes the payload of a REGION_HASHES request.
pub fn decode_region_bytes(request_id: u64, payload: &[u8]) -> Result<u64, Error> {
    let bytes: [u8; 8] = payload.try_into().map_err(|_| Error::Malformed {
        request_id,
        reason: format!("REGION_HASHES payload is {} bytes, not 8", payload.len()),
    })?;
    Ok(u64::from_le_bytes(bytes))
}

/// Encodes the OK payload of a REGION_HASHES response.
pub fn encode_region_hashes(hashes: &[RegionHash]) -> Vec<u8> {
    let mut out = Vec::with_capacity(hashes.len() * REGION_HASH_BYTES);
    for region in hashes {
        out.push(u8::from(region.hole));
        out.extend_from_slice(&region.hash.to_le_bytes());
    }
    out
}

/// Decodes a REGION_HASHES response for the regions of `region_bytes` in
/// `offset..offset + length`.
pub fn decode_region_hashes(
    request_id: u64,
    offset: u64,
    length: u64,
    region_bytes: u64,
    payload: &[u8],
) -> Result<Vec<RegionHash>, Error> {
    let count = length.div_ceil(region_bytes);
    if payload.len() as u64 != count * REGION_HASH_BYTES as u64 {
        return Err(Error::Malformed {
            request_id,
            reason: format!(
                "REGION_HASHES response of {} bytes for {count} regions",
                payload.len()
            ),
        });
    }
    let end = offset + length;
    let mut start = offset;
    Ok(payload
        .chunks_exact(REGION_HASH_BYTES)
        .map(|entry| {
            let region = RegionHash {
                offset: start,
                length: region_bytes.min(end - start),
                hash: u128::from_le_bytes(array(entry, 1)),
                hole: entry[0] == 1,
            };
            start += region.length;
            region
        })
        .collect())
}

/// Encodes the OK payload of an ALLOCATED_EXTENTS response.
pub fn encode_extents(extents: &[Extent], complete_to: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + extents.len() * EXTENT_BYTES);
    out.extend_from_slice(&complete_to.to_le_bytes());
    for extent in extents {
        out.extend_from_slice(&extent.offset.to_le_bytes());
        out.extend_from_slice(&extent.length.to_le_bytes());
    }
    out
}

/// Decodes an ALLOCATED_EXTENTS response for `offset..end`: the extents and
/// the offset up to which they are complete. Extents must be ascending,
/// non-empty, non-overlapping and inside the range, and complete-to must
/// advance past `offset` (or equal `end`), so a client paging through a
/// range always makes progress.
pub fn decode_extents(
    request_id: u64,
    offset: u64,
    end: u64,
    payload: &[u8],
) -> Result<(Vec<Extent>, u64), Error> {
    let malformed = |reason: &str| Error::Malformed {
        request_id,
        reason: format!("ALLOCATED_EXTENTS response: {reason}"),
    };
    if payload.len() < 8 || !(payload.len() - 8).is_multiple_of(EXTENT_BYTES) {
        return Err(malformed("bad length"));
    }
    let complete_to = u64::from_le_bytes(array(payload, 0));
    if complete_to > end || (complete_to <= offset && complete_to != end) {
        return Err(malformed("complete-to outside the range"));
    }
    let mut extents = Vec::with_capacity((payload.len() - 8) / EXTENT_BYTES);
    let mut floor = offset;
    for entry in payload[8..].chunks_exact(EXTENT_BYTES) {
        let extent = Extent {
            offset: u64::from_le_bytes(array(entry, 0)),
            length: u64::from_le_bytes(array(entry, 8)),
        };
        let valid = extent.length > 0
            && extent.offset >= floor
            && extent
                .offset
                .checked_add(extent.length)
                .is_some_and(|e| e <= complete_to);
        if !valid {
            return Err(malformed("extents out of order or outside the range"));
        }
        floor = extent.end();
        extents.push(extent);
    }
    Ok((extents, complete_to))
}

/// Encodes the OK payload of an INFO response.
pub fn encode_info(info: &ReplicaInfo) -> [u8; INFO_BYTES] {
    let mut out = [0u8; INFO_BYTES];
    out[0..8].copy_from_slice(&info.size_bytes.to_le_bytes());
    out[8..16].copy_from_slice(&info.block_size.to_le_bytes());
    out[16..24].copy_from_slice(&info.epoch.to_le_bytes());
    out
}

/// Decodes an INFO response.
pub fn decode_info(request_id: u64, payload: &[u8]) -> Result<ReplicaInfo, Error> {
    if payload.len() != INFO_BYTES {
        return Err(Error::Malformed {
            request_id,
            reason: format!("INFO response of {} bytes", payload.len()),
        });
    }
    Ok(ReplicaInfo {
        size_bytes: u64::from_le_bytes(array(payload, 0)),
        block_size: u64::from_le_bytes(array(payload, 8)),
        epoch: u64::from_le_bytes(array(payload, 16)),
    })
}

/// Truncates an error message to [`MAX_MESSAGE_BYTES`] on a character
/// boundary.
pub fn truncate_message(message: &str) -> &str {
    if message.len() <= MAX_MESSAGE_BYTES {
        return message;
    }
    let mut end = MAX_MESSAGE_BYTES;
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    &message[..end]
}

#[cfg(test)]
mod properties;
#[cfg(test)]
mod tests;
