//! Errors of the snapshot copy catalog and range scans, each with its gRPC
//! code.

use std::io;
use std::path::PathBuf;

use nix::errno::Errno;

use super::META_FORMAT_VERSION;
use crate::{pool, replica};

/// Errors of snapshot copy operations; [`Error::code`] gives each its gRPC
/// code.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The snapshot id is empty, too long, starts with a dot, or has
    /// characters outside `[A-Za-z0-9._-]` (the rules of replica names).
    #[error("Invalid snapshot id {id:?}: {reason}")]
    InvalidId {
        /// The rejected id.
        id: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// No copy has this id.
    #[error("Snapshot copy {id} not found")]
    NotFound {
        /// The requested id.
        id: String,
    },
    /// A copy with this id exists, taken of another replica.
    #[error("Snapshot copy {id} already exists, taken of replica {replica_name}")]
    AlreadyExists {
        /// The snapshot id.
        id: String,
        /// The replica it was taken of.
        replica_name: String,
    },
    /// A prepare of an id deleted moments ago: it is refused, so that a
    /// late prepare cannot leave a copy after the delete of its cut (the
    /// copy is then taken in full by CreateSnapshotCopy).
    #[error("Snapshot copy {id} was deleted moments ago; it is not prepared again")]
    RecentlyDeleted {
        /// The snapshot id.
        id: String,
    },
    /// The copy was found damaged at start-up; only delete is allowed.
    #[error("Snapshot copy {id} is faulted: {reason}")]
    Faulted {
        /// The snapshot id.
        id: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Two pools hold a copy with the same id.
    #[error("Snapshot copy {id} exists in both pool {first_pool} and pool {second_pool}")]
    DuplicateCopy {
        /// The snapshot id.
        id: String,
        /// The pool scanned first.
        first_pool: String,
        /// The pool scanned second.
        second_pool: String,
    },
    /// The two copies of a changed-ranges request are of different volumes.
    #[error(
        "Snapshot copies {base} (volume {base_volume:?}) and {target} (volume {target_volume:?}) are not of one volume"
    )]
    DifferentVolumes {
        /// The base copy.
        base: String,
        /// Its volume (or replica name, for a standalone replica).
        base_volume: String,
        /// The target copy.
        target: String,
        /// Its volume (or replica name, for a standalone replica).
        target_volume: String,
    },
    /// A range scan starting at or past the copy's size.
    #[error("Offset {offset} is at or past the end of snapshot copy {id} ({size_bytes} bytes)")]
    OutOfRange {
        /// The copy.
        id: String,
        /// The requested starting offset in bytes.
        offset: u64,
        /// The copy's size in bytes.
        size_bytes: u64,
    },
    /// Looking up the replica to copy failed (unknown, faulted...).
    #[error(transparent)]
    Replica(#[from] replica::Error),
    /// Looking up the pool failed.
    #[error(transparent)]
    Pool(#[from] pool::Error),
    /// The pool's filesystem cannot reflink (FICLONE answered `EOPNOTSUPP`,
    /// `EXDEV` or `EINVAL`).
    #[error("Cannot reflink {} into {}: the pool does not support it", source_path.display(), path.display())]
    ReflinkUnsupported {
        /// The copy's data file.
        path: PathBuf,
        /// The replica's data file.
        source_path: PathBuf,
        /// The ioctl's error.
        #[source]
        source: Errno,
    },
    /// The pool has no room for the copy's extent map or metadata.
    #[error("No space left in the pool for {}", path.display())]
    NoSpace {
        /// The file that could not be made.
        path: PathBuf,
        /// `ENOSPC` or `EDQUOT`.
        #[source]
        source: io::Error,
    },
    /// FICLONE failed for another reason.
    #[error("Cannot reflink {} into {}", source_path.display(), path.display())]
    Clone {
        /// The copy's data file.
        path: PathBuf,
        /// The replica's data file.
        source_path: PathBuf,
        /// The ioctl's error.
        #[source]
        source: Errno,
    },
    /// A data file could not be created or opened.
    #[error("Cannot open {}", path.display())]
    OpenData {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Truncating a new copy to its replica's size failed.
    #[error("Cannot size snapshot copy data file {}", path.display())]
    ResizeData {
        /// The data file.
        path: PathBuf,
        /// The system call's error.
        #[source]
        source: Errno,
    },
    /// fsync or stat of a data file failed.
    #[error("Cannot sync or stat snapshot copy data file {}", path.display())]
    SyncData {
        /// The data file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Punching a hole into a prepared copy's data file failed.
    #[error("Cannot punch {length} bytes at {offset} of snapshot copy data file {}", path.display())]
    PunchHole {
        /// The data file.
        path: PathBuf,
        /// Start of the range in bytes.
        offset: u64,
        /// Length of the range in bytes.
        length: u64,
        /// The system call's error.
        #[source]
        source: Errno,
    },
    /// A prepared copy's data file could not be renamed into place.
    #[error("Cannot rename {} to {}", from.display(), to.display())]
    Rename {
        /// The temporary file.
        from: PathBuf,
        /// The data file.
        to: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A copy's file could not be removed.
    #[error("Cannot remove {}", path.display())]
    Remove {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A pool's snapshots directory could not be made or listed.
    #[error("Cannot scan snapshot directory {}", path.display())]
    Scan {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A metadata file could not be read.
    #[error("Cannot read snapshot copy metadata {}", path.display())]
    ReadMeta {
        /// The metadata file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A metadata file is not valid JSON of the expected shape.
    #[error("Cannot parse snapshot copy metadata {}", path.display())]
    ParseMeta {
        /// The metadata file.
        path: PathBuf,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
    /// A metadata file written by a newer Ballast.
    #[error("Snapshot copy metadata {} has format version {version}; this agent reads up to {META_FORMAT_VERSION}", path.display())]
    UnsupportedMetaVersion {
        /// The metadata file.
        path: PathBuf,
        /// The version found.
        version: u32,
    },
    /// A metadata file could not be written.
    #[error("Cannot write snapshot copy metadata {}", path.display())]
    WriteMeta {
        /// The metadata file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// `lseek` (`SEEK_DATA`/`SEEK_HOLE`) or FIEMAP on a copy failed.
    #[error("Cannot map the ranges of snapshot copy {id}")]
    MapRanges {
        /// The copy.
        id: String,
        /// The system call's error.
        #[source]
        source: Errno,
    },
}

impl Error {
    /// Returns the gRPC status code for this error.
    pub fn code(&self) -> tonic::Code {
        use tonic::Code;
        // No `_` arm: a new variant must choose its code.
        match self {
            Self::InvalidId { .. } | Self::DifferentVolumes { .. } => Code::InvalidArgument,
            Self::NotFound { .. } => Code::NotFound,
            Self::AlreadyExists { .. } => Code::AlreadyExists,
            Self::Faulted { .. }
            | Self::DuplicateCopy { .. }
            | Self::ReflinkUnsupported { .. }
            | Self::RecentlyDeleted { .. } => Code::FailedPrecondition,
            Self::OutOfRange { .. } => Code::OutOfRange,
            Self::Replica(e) => e.code(),
            Self::Pool(e) => e.code(),
            Self::NoSpace { .. } => Code::ResourceExhausted,
            Self::Clone { .. }
            | Self::OpenData { .. }
            | Self::ResizeData { .. }
            | Self::SyncData { .. }
            | Self::PunchHole { .. }
            | Self::Rename { .. }
            | Self::Remove { .. }
            | Self::Scan { .. }
            | Self::ReadMeta { .. }
            | Self::ParseMeta { .. }
            | Self::UnsupportedMetaVersion { .. }
            | Self::WriteMeta { .. }
            | Self::MapRanges { .. } => Code::Internal,
        }
    }
}

impl From<Error> for tonic::Status {
    fn from(e: Error) -> Self {
        tonic::Status::new(e.code(), crate::error_chain(&e))
    }
}
