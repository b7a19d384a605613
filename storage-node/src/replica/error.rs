//! Errors of the replica catalog, each with its gRPC code.

use std::io;
use std::path::PathBuf;

use nix::errno::Errno;

use super::{META_FORMAT_VERSION, SIZE_ALIGN_BYTES};
use crate::pool;

/// Errors of replica catalog operations; [`Error::code`] gives each its gRPC
/// code.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The replica name is empty, too long, starts with a dot, or has
    /// characters outside `[A-Za-z0-9._-]`.
    #[error("Invalid replica name {name:?}: {reason}")]
    InvalidName {
        /// The rejected name.
        name: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The size is zero, not a multiple of 4096 bytes, or too large.
    #[error(
        "Invalid replica size {size_bytes} bytes: must be a positive multiple of {SIZE_ALIGN_BYTES} below 2^63"
    )]
    InvalidSize {
        /// The rejected size in bytes.
        size_bytes: u64,
    },
    /// No replica has this name.
    #[error("Replica {name} not found")]
    NotFound {
        /// The requested name.
        name: String,
    },
    /// A replica with this name exists with other parameters.
    #[error(
        "Replica {name} already exists in pool {pool} for volume {volume_id} with {size_bytes} bytes, thin={thin}, source snapshot {source_snapshot:?}"
    )]
    AlreadyExists {
        /// The replica name.
        name: String,
        /// Its pool.
        pool: String,
        /// Its volume.
        volume_id: String,
        /// Its size in bytes.
        size_bytes: u64,
        /// Whether it is thin.
        thin: bool,
        /// The snapshot copy it was restored from; empty if none.
        source_snapshot: String,
    },
    /// A restore names a pool other than the one holding the snapshot copy
    /// (a reflink cannot cross filesystems).
    #[error(
        "Replica {name} cannot be restored into pool {pool}: snapshot copy {snapshot_id} is in pool {source_pool}"
    )]
    SourcePool {
        /// The replica name.
        name: String,
        /// The requested pool.
        pool: String,
        /// The snapshot copy.
        snapshot_id: String,
        /// The pool holding the copy.
        source_pool: String,
    },
    /// A restore asks for fewer bytes than the snapshot copy holds.
    #[error(
        "Replica {name} of {size_bytes} bytes is smaller than snapshot copy {snapshot_id} ({source_bytes} bytes)"
    )]
    SmallerThanSource {
        /// The replica name.
        name: String,
        /// The requested size in bytes.
        size_bytes: u64,
        /// The snapshot copy.
        snapshot_id: String,
        /// The copy's size in bytes.
        source_bytes: u64,
    },
    /// The pool's filesystem cannot reflink (FICLONE answered `EOPNOTSUPP`,
    /// `EXDEV` or `EINVAL`).
    #[error("Cannot reflink {} into {}: the pool does not support it", source_path.display(), path.display())]
    ReflinkUnsupported {
        /// The new data file.
        path: PathBuf,
        /// The file it was to share blocks with.
        source_path: PathBuf,
        /// The ioctl's error.
        #[source]
        source: Errno,
    },
    /// FICLONE failed for another reason.
    #[error("Cannot reflink {} into {}", source_path.display(), path.display())]
    CloneData {
        /// The new data file.
        path: PathBuf,
        /// The file it was to share blocks with.
        source_path: PathBuf,
        /// The ioctl's error.
        #[source]
        source: Errno,
    },
    /// A grow request smaller than the current size.
    #[error("Replica {name} is {size_bytes} bytes; it cannot shrink to {requested_bytes}")]
    Shrink {
        /// The replica name.
        name: String,
        /// Its current size in bytes.
        size_bytes: u64,
        /// The requested size in bytes.
        requested_bytes: u64,
    },
    /// An epoch lower than the highest accepted one: the request comes from a
    /// stale target and is fenced off.
    #[error("Replica {name} has accepted epoch {epoch}; refusing older epoch {requested}")]
    StaleEpoch {
        /// The replica name.
        name: String,
        /// The highest accepted epoch.
        epoch: u64,
        /// The refused epoch.
        requested: u64,
    },
    /// The replica was found damaged at start-up; only destroy is allowed.
    #[error("Replica {name} is faulted: {reason}")]
    Faulted {
        /// The replica name.
        name: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Two pools hold a replica of the same name.
    #[error("Replica {name} exists in both pool {first_pool} and pool {second_pool}")]
    DuplicateReplica {
        /// The replica name.
        name: String,
        /// The pool scanned first.
        first_pool: String,
        /// The pool scanned second.
        second_pool: String,
    },
    /// A pool error: pool not found, overcommit limit, insufficient space.
    #[error(transparent)]
    Pool(#[from] pool::Error),
    /// The pool ran out of space while allocating the replica's blocks.
    #[error("No space left in the pool to allocate {}", path.display())]
    NoSpace {
        /// The data file.
        path: PathBuf,
        /// `ENOSPC` or `EDQUOT`.
        #[source]
        source: Errno,
    },
    /// The data file could not be created or opened.
    #[error("Cannot open replica data file {}", path.display())]
    OpenData {
        /// The data file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Setting the data file's size (ftruncate or fallocate) failed.
    #[error("Cannot size replica data file {}", path.display())]
    ResizeData {
        /// The data file.
        path: PathBuf,
        /// The system call's error.
        #[source]
        source: Errno,
    },
    /// fsync of the data file failed.
    #[error("Cannot sync replica data file {}", path.display())]
    SyncData {
        /// The data file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// stat of the data file failed.
    #[error("Cannot stat replica data file {}", path.display())]
    StatData {
        /// The data file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A replica file could not be removed.
    #[error("Cannot remove {}", path.display())]
    Remove {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A pool's replicas directory could not be listed.
    #[error("Cannot scan replica directory {}", path.display())]
    Scan {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A metadata file could not be read.
    #[error("Cannot read replica metadata {}", path.display())]
    ReadMeta {
        /// The metadata file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A metadata file is not valid JSON of the expected shape.
    #[error("Cannot parse replica metadata {}", path.display())]
    ParseMeta {
        /// The metadata file.
        path: PathBuf,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
    /// A metadata file written by a newer Ballast.
    #[error("Replica metadata {} has format version {version}; this agent reads up to {META_FORMAT_VERSION}", path.display())]
    UnsupportedMetaVersion {
        /// The metadata file.
        path: PathBuf,
        /// The version found.
        version: u32,
    },
    /// A metadata file could not be written.
    #[error("Cannot write replica metadata {}", path.display())]
    WriteMeta {
        /// The metadata file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
}

impl Error {
    /// Returns the gRPC status code for this error.
    pub fn code(&self) -> tonic::Code {
        use tonic::Code;
        // No `_` arm: a new variant must choose its code.
        match self {
            Self::InvalidName { .. }
            | Self::InvalidSize { .. }
            | Self::SourcePool { .. }
            | Self::SmallerThanSource { .. } => Code::InvalidArgument,
            Self::NotFound { .. } => Code::NotFound,
            Self::AlreadyExists { .. } => Code::AlreadyExists,
            // CSI's ControllerExpandVolume answers an unsupported capacity so.
            Self::Shrink { .. } => Code::OutOfRange,
            Self::StaleEpoch { .. }
            | Self::Faulted { .. }
            | Self::DuplicateReplica { .. }
            | Self::ReflinkUnsupported { .. } => Code::FailedPrecondition,
            Self::Pool(e) => e.code(),
            Self::NoSpace { .. } => Code::ResourceExhausted,
            Self::OpenData { .. }
            | Self::CloneData { .. }
            | Self::ResizeData { .. }
            | Self::SyncData { .. }
            | Self::StatData { .. }
            | Self::Remove { .. }
            | Self::Scan { .. }
            | Self::ReadMeta { .. }
            | Self::ParseMeta { .. }
            | Self::UnsupportedMetaVersion { .. }
            | Self::WriteMeta { .. } => Code::Internal,
        }
    }
}

impl From<Error> for tonic::Status {
    fn from(e: Error) -> Self {
        tonic::Status::new(e.code(), crate::error_chain(&e))
    }
}
