//! Replication: how a target reaches the replicas of its volume, and how a
//! replica fences off stale targets.
//!
//! # What it owns
//!
//! - [`fence`]: [`FencedReplica`], the only way I/O reaches a replica's data
//!   file once replication is involved. Every call carries the caller's
//!   epoch; lower epochs are refused, higher ones are persisted before any I/O
//!   runs under them (DESIGN.md, invariant 3).
//! - [`protocol`]: the binary frames of the replica protocol (TCP, pipelined,
//!   out-of-order, CRC32C on every frame).
//! - [`server`]: [`ReplicaServer`], which serves the [`FencedReplica`]s of
//!   this node to remote targets.
//! - [`client`]: [`ReplicaClient`], one pipelined connection from a target to
//!   one replica on another node.
//! - [`ReplicaIo`]: the trait both [`FencedReplica`] (in-process, no socket)
//!   and [`ReplicaClient`] (remote) implement, so a target fans a write out to
//!   a `Vec<Arc<dyn ReplicaIo>>` without caring where each replica lives.
//!
//! ```text
//!  target ──► Arc<dyn ReplicaIo> ─┬─► FencedReplica ─► ReplicaData (local file)
//!                                 └─► ReplicaClient ══TCP══► ReplicaServer
//!                                                              └─► FencedReplica ─► ReplicaData
//! ```
//!
//! # Invariants
//!
//! - A request whose epoch is lower than the replica's highest accepted epoch
//!   never touches data, and the caller learns the replica's epoch
//!   ([`Error::StaleEpoch`]).
//! - A new, higher epoch is durable (through [`EpochStore`]) before any I/O
//!   runs under it, and only after every I/O admitted under a lower epoch has
//!   completed (see [`fence`]).
//! - Within an epoch, a request of a remote client's newer connection
//!   (session) runs only after every request admitted under older sessions
//!   has completed, and requests of older sessions are refused from then
//!   on ([`Error::StaleSession`]): a connection the client tore down can
//!   never write after its replacement (see [`protocol`] and
//!   `docs/adr/0007-replica-protocol-sessions.md`).
//! - Bytes that fail their CRC32C on the wire are never written and never
//!   returned to a caller; the connection that carried them is closed.
//! - Malformed input closes that one connection; nothing in this module
//!   panics on network input.
//!
//! # Extending it
//!
//! A new operation needs: a method on [`ReplicaIo`] (and on
//! [`FencedReplica`]), an [`protocol::Op`] code with its payload layout
//! documented in [`protocol`], a branch in the server's dispatcher, and the
//! client method that encodes it. A new failure needs an [`Error`] variant and
//! a decision in [`Error::status`], [`Error::replica_failed`] and the
//! `From<Error> for BlockError` conversion (none of them has a catch-all arm).

pub mod client;
pub mod fence;
pub mod protocol;
pub mod server;
mod sparse;
mod writer;

#[cfg(test)]
mod tests;

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use crate::block::BlockError;
use crate::buf::IoBuf;

pub use client::{ClientConfig, ReplicaClient};
pub use fence::{CatalogEpochStore, EpochStore, FencedReplica, PersistError};
pub use protocol::Status;
pub use server::{ReplicaResolver, ReplicaServer, ServerConfig};

/// Largest payload of one frame, and so the largest read or write one request
/// can carry, in bytes (32 MiB, as NBD's maximum request).
pub const MAX_PAYLOAD_BYTES: usize = 32 << 20;

/// Longest volume id a request can name, in bytes of UTF-8.
pub const MAX_VOLUME_ID_BYTES: usize = 128;

/// Most regions one REGION_HASHES request may cover; larger ranges are split
/// into several requests by [`ReplicaClient`].
pub const MAX_REGIONS_PER_REQUEST: u64 = 65_536;

/// Most extents one ALLOCATED_EXTENTS response carries; the client asks again
/// from where the server stopped.
pub const MAX_EXTENTS_PER_RESPONSE: usize = 65_536;

/// Bytes hashed under one admission (one epoch check, one request): bounds
/// how long a rebuild's hashing can delay an epoch change.
pub const HASH_CHUNK_BYTES: u64 = 64 << 20;

/// The content hash of one region of a replica, for comparing replicas
/// without moving their data (rebuild).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegionHash {
    /// First byte of the region.
    pub offset: u64,
    /// Length of the region in bytes (the requested region size, except for
    /// a shorter last region).
    pub length: u64,
    /// XXH3-128 of the region's bytes. A hole hashes as the zeroes it reads
    /// as, so equal hashes mean equal content whatever the allocation.
    pub hash: u128,
    /// The region is entirely a hole (unallocated or unwritten), so it was
    /// hashed without being read. A hint only: compare `hash`.
    pub hole: bool,
}

/// An allocated (data) byte range of a replica file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// First byte.
    pub offset: u64,
    /// Length in bytes, never zero.
    pub length: u64,
}

impl Extent {
    /// One past the last byte.
    pub fn end(&self) -> u64 {
        self.offset + self.length
    }
}

/// What a replica reports about itself (the INFO operation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplicaInfo {
    /// Size of the replica in bytes.
    pub size_bytes: u64,
    /// Logical block size in bytes: requests aligned to it avoid
    /// read-modify-write on the replica.
    pub block_size: u64,
    /// The replica's highest accepted epoch (after admitting the request).
    pub epoch: u64,
}

/// Where a replica is reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Location {
    /// In this process, without a socket.
    Local,
    /// Over the replica protocol at this data address.
    Remote(SocketAddr),
}

/// Errors of replica I/O, the same for in-process and remote replicas, so a
/// target acts on them without knowing where a replica lives.
///
/// [`Error::replica_failed`] says whether the replica itself is at fault (the
/// target should ask to drop it from the in-sync set), and
/// `From<Error> for BlockError` what an NBD client is told.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request's epoch is lower than the highest the replica accepted: a
    /// newer target exists, and this one must stop.
    #[error("Epoch {request} is stale: the replica has accepted epoch {current}")]
    StaleEpoch {
        /// The refused epoch.
        request: u64,
        /// The replica's highest accepted epoch.
        current: u64,
    },
    /// The request's session is older than the newest the replica admitted
    /// under the same epoch: it was sent on a connection its client has
    /// since replaced, and was not executed. Only a request left over from
    /// a torn-down connection sees this, so its outcome counts as a failure
    /// of the replica, like the timeout that tore the connection down.
    #[error("Session {request} is stale: the replica has admitted session {current}")]
    StaleSession {
        /// The refused session.
        request: u64,
        /// The replica's newest admitted session under the request's epoch.
        current: u64,
    },
    /// The node has no replica of this volume.
    #[error("No replica of volume {volume_id} on this node")]
    VolumeNotFound {
        /// The requested volume id.
        volume_id: String,
    },
    /// The request touches bytes at or beyond the end of the replica.
    #[error(
        "Range of {length} bytes at offset {offset} is beyond the end of the replica ({size_bytes} bytes)"
    )]
    OutOfRange {
        /// First byte of the request.
        offset: u64,
        /// Length of the request in bytes.
        length: u64,
        /// Size of the replica in bytes.
        size_bytes: u64,
    },
    /// The replica's pool has no space left.
    #[error("No space left in the replica's pool")]
    NoSpace,
    /// The replica refuses I/O (its engine stopped, or it is shutting down).
    #[error("Replica is not accepting I/O: {reason}")]
    Unavailable {
        /// Why, as the replica reported it.
        reason: String,
    },
    /// The replica's storage failed.
    #[error("Replica I/O failed")]
    Device(#[source] io::Error),
    /// A new epoch could not be persisted; the old one stays in force and the
    /// request was not executed.
    #[error("Cannot persist epoch {epoch}")]
    PersistEpoch {
        /// The epoch that was to be persisted.
        epoch: u64,
        /// The epoch store's error.
        #[source]
        source: PersistError,
    },
    /// The request is malformed (zero region size, payload too large, ...);
    /// refused before anything was sent or executed.
    #[error("Invalid request: {reason}")]
    InvalidRequest {
        /// What is wrong with it.
        reason: String,
    },
    /// The remote replica answered with an error status other than those
    /// with their own variant (IO_ERROR, BAD_REQUEST, CHECKSUM).
    #[error("Replica answered {status}: {message}")]
    Remote {
        /// The status code.
        status: Status,
        /// The replica's message.
        message: String,
    },
    /// No response within the request timeout; the connection was torn down
    /// because its state is unknown. The request may or may not have executed.
    #[error("No response from {addr} within {timeout:?}")]
    Timeout {
        /// The replica's data address.
        addr: SocketAddr,
        /// The request timeout.
        timeout: Duration,
    },
    /// The connection failed while the request was outstanding or could not
    /// be used; the request may or may not have executed. The next request
    /// reconnects.
    #[error("Connection to {addr} failed")]
    Disconnected {
        /// The replica's data address.
        addr: SocketAddr,
        /// Why the connection failed.
        #[source]
        source: Arc<protocol::Error>,
    },
    /// A connection could not be established.
    #[error("Cannot connect to {addr}")]
    Connect {
        /// The replica's data address.
        addr: SocketAddr,
        /// Error of connect(2), or `TimedOut` after the connect timeout.
        #[source]
        source: io::Error,
    },
    /// The replica server could not listen on its address.
    #[error("Cannot listen on {addr}")]
    Bind {
        /// The requested listen address.
        addr: SocketAddr,
        /// Error of bind(2) or listen(2).
        #[source]
        source: io::Error,
    },
}

impl Error {
    /// The status code (and its detail field) a server answers this error
    /// with; see [`protocol`] for what each status means.
    pub fn status(&self) -> (Status, u64) {
        // No `_` arm: a new variant must choose its status.
        match self {
            Error::StaleEpoch { current, .. } => (Status::StaleEpoch, *current),
            Error::StaleSession { current, .. } => (Status::StaleSession, *current),
            Error::VolumeNotFound { .. } => (Status::NotFound, 0),
            Error::OutOfRange { size_bytes, .. } => (Status::OutOfRange, *size_bytes),
            Error::NoSpace => (Status::NoSpace, 0),
            Error::Unavailable { .. } => (Status::Unavailable, 0),
            Error::InvalidRequest { .. } => (Status::BadRequest, 0),
            Error::Remote { status, .. } => (*status, 0),
            Error::Device(_)
            | Error::PersistEpoch { .. }
            | Error::Timeout { .. }
            | Error::Disconnected { .. }
            | Error::Connect { .. }
            | Error::Bind { .. } => (Status::IoError, 0),
        }
    }

    /// True when the error means the replica is unreachable or broken, so
    /// the target should ask the controller to drop it from the in-sync set.
    ///
    /// False for [`Error::StaleEpoch`] (the *target* is fenced and must
    /// stop, not the replica) and for errors of the request itself
    /// ([`Error::OutOfRange`], [`Error::InvalidRequest`], BAD_REQUEST), which
    /// every replica would answer alike. [`Error::NoSpace`] counts as a
    /// failure of the replica (its pool is full); when every replica fails
    /// alike the target fails the request instead of dropping them all.
    pub fn replica_failed(&self) -> bool {
        match self {
            Error::StaleEpoch { .. }
            | Error::OutOfRange { .. }
            | Error::InvalidRequest { .. }
            | Error::Bind { .. } => false,
            Error::NoSpace | Error::StaleSession { .. } => true,
            Error::Remote { status, .. } => *status != Status::BadRequest,
            Error::VolumeNotFound { .. }
            | Error::Unavailable { .. }
            | Error::Device(_)
            | Error::PersistEpoch { .. }
            | Error::Timeout { .. }
            | Error::Disconnected { .. }
            | Error::Connect { .. } => true,
        }
    }
}

impl From<BlockError> for Error {
    fn from(error: BlockError) -> Self {
        match error {
            BlockError::OutOfRange {
                offset,
                length,
                size_bytes,
            } => Error::OutOfRange {
                offset,
                length,
                size_bytes,
            },
            BlockError::NoSpace => Error::NoSpace,
            BlockError::Unavailable(reason) => Error::Unavailable { reason },
            BlockError::Io(e) if e.raw_os_error() == Some(libc::ENOSPC) => Error::NoSpace,
            BlockError::Io(e) => Error::Device(e),
        }
    }
}

impl From<Error> for BlockError {
    fn from(error: Error) -> Self {
        match error {
            Error::OutOfRange {
                offset,
                length,
                size_bytes,
            } => BlockError::OutOfRange {
                offset,
                length,
                size_bytes,
            },
            Error::NoSpace => BlockError::NoSpace,
            Error::StaleEpoch { .. } | Error::Unavailable { .. } | Error::VolumeNotFound { .. } => {
                BlockError::Unavailable(error.to_string())
            }
            Error::Device(e) => BlockError::Io(e),
            Error::Timeout { .. } => BlockError::Io(io::Error::new(io::ErrorKind::TimedOut, error)),
            Error::PersistEpoch { .. }
            | Error::StaleSession { .. }
            | Error::InvalidRequest { .. }
            | Error::Remote { .. }
            | Error::Disconnected { .. }
            | Error::Connect { .. }
            | Error::Bind { .. } => BlockError::Io(io::Error::other(error)),
        }
    }
}

/// Epoch-carrying I/O on one replica of one volume, in-process
/// ([`FencedReplica`]) or remote ([`ReplicaClient`]).
///
/// Every method carries the caller's `epoch`: a replica refuses epochs lower
/// than the highest it accepted ([`Error::StaleEpoch`], nothing executed) and
/// persists a higher one before executing anything under it. Offsets and
/// lengths are in bytes and need not be aligned (aligned requests are
/// faster). Every method may be called concurrently from many tasks.
///
/// # Cancel safety
///
/// Every method is cancel safe in the sense that dropping its future never
/// corrupts the replica or the connection, but a dropped request may or may
/// not have executed (as after a timeout): a target that cancels a write must
/// treat its outcome as unknown.
#[async_trait]
pub trait ReplicaIo: Send + Sync + 'static {
    /// The volume this replica belongs to.
    fn volume_id(&self) -> &str;

    /// Where the replica lives.
    fn location(&self) -> Location;

    /// Admits `epoch` and reports the replica's size, block size and epoch.
    /// A target calls it first to claim the replica with its new epoch.
    async fn info(&self, epoch: u64) -> Result<ReplicaInfo, Error>;

    /// Reads `length` bytes (at most [`MAX_PAYLOAD_BYTES`]) at `offset`; the
    /// buffer holds exactly `length` bytes.
    async fn read(&self, epoch: u64, offset: u64, length: usize) -> Result<IoBuf, Error>;

    /// Writes `data` (at most [`MAX_PAYLOAD_BYTES`]) at `offset`; with `fua`
    /// it is durable when this returns `Ok`. `data` is shared so one buffer
    /// fans out to every replica; an in-process replica copies it unless it
    /// holds the only reference.
    async fn write(
        &self,
        epoch: u64,
        offset: u64,
        data: Arc<IoBuf>,
        fua: bool,
    ) -> Result<(), Error>;

    /// Makes every write completed before this call durable.
    async fn flush(&self, epoch: u64) -> Result<(), Error>;

    /// Discards `length` bytes at `offset`: they read as zeroes and a thin
    /// replica releases the space.
    async fn trim(&self, epoch: u64, offset: u64, length: u64) -> Result<(), Error>;

    /// Writes zeroes to `length` bytes at `offset`; the range may become a
    /// hole when `punch_hole`; with `fua` the zeroes are durable on `Ok`.
    async fn write_zeroes(
        &self,
        epoch: u64,
        offset: u64,
        length: u64,
        punch_hole: bool,
        fua: bool,
    ) -> Result<(), Error>;

    /// Hashes `length` bytes at `offset` in consecutive regions of
    /// `region_bytes` (the last may be shorter), for a rebuild to find the
    /// regions that differ. Regions that are entirely holes are not read.
    /// `region_bytes` must be between 1 and [`MAX_PAYLOAD_BYTES`].
    async fn region_hashes(
        &self,
        epoch: u64,
        offset: u64,
        length: u64,
        region_bytes: u64,
    ) -> Result<Vec<RegionHash>, Error>;

    /// Lists the allocated byte ranges within `length` bytes at `offset`,
    /// ascending and clipped to the range, so a full rebuild copies only
    /// them. Unwritten (preallocated, never written) extents may be reported
    /// as holes: they read as zeroes.
    async fn allocated_extents(
        &self,
        epoch: u64,
        offset: u64,
        length: u64,
    ) -> Result<Vec<Extent>, Error>;
}

/// Checks a read or write length against [`MAX_PAYLOAD_BYTES`].
fn check_payload_len(length: usize) -> Result<(), Error> {
    if length > MAX_PAYLOAD_BYTES {
        return Err(Error::InvalidRequest {
            reason: format!("{length} bytes exceed the maximum of {MAX_PAYLOAD_BYTES} per request"),
        });
    }
    Ok(())
}

/// Checks a region size for [`ReplicaIo::region_hashes`].
fn check_region_bytes(region_bytes: u64) -> Result<(), Error> {
    if region_bytes == 0 || region_bytes > MAX_PAYLOAD_BYTES as u64 {
        return Err(Error::InvalidRequest {
            reason: format!(
                "region size of {region_bytes} bytes is not between 1 and {MAX_PAYLOAD_BYTES}"
            ),
        });
    }
    Ok(())
}

/// The largest multiple of `region_bytes` at most [`HASH_CHUNK_BYTES`] (at
/// least one region): the bytes hashed per admission or request.
fn hash_chunk_bytes(region_bytes: u64) -> u64 {
    let regions = (HASH_CHUNK_BYTES / region_bytes).clamp(1, MAX_REGIONS_PER_REQUEST);
    regions * region_bytes
}
