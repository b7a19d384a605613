//! Volume snapshots: the cut, the snapshot records and their copies.
//!
//! - [`record`]: the snapshot record in the store.
//! - [`operations`]: create, delete, get, list.
//! - [`cut`]: taking the copies at one instant (the target's write barrier
//!   on a published volume; the idle in-sync replicas of an unpublished
//!   one).
//! - [`group`]: group snapshots, one cut across several volumes.
//! - [`quiesce`]: app consistency around a cut (pre/post hooks,
//!   filesystem freeze).
//! - [`metadata`]: changed block tracking (allocated and changed ranges).
//! - [`api`]: the management API's `SnapshotService`.
//! - [`reconcile`]: removing what an interrupted create or delete left.
//!
//! # Life cycle
//!
//! ```text
//!  CreateSnapshot ──> creating ──(every copy durable)──> ready ──DeleteSnapshot──> deleting ──> (gone)
//!                        └──(the cut failed, or a crash)─────────────────────────────^
//! ```
//!
//! A snapshot id is its CSI name; each copy is named by it on its node. A
//! snapshot is independent of its source volume: the copies are reflinks
//! of the replica files, sharing blocks, not lifetimes, so the volume can
//! be deleted and the snapshot still restored.
//!
//! # What it must never do
//!
//! Report a snapshot ready before every copy is durable; keep a copy taken
//! outside a barrier that held for the whole cut (a resume answering
//! `was_paused = false` voids the cut); change a volume's record.

pub mod api;
pub mod cut;
pub mod group;
pub mod metadata;
pub mod operations;
pub mod pod_hooks;
pub mod quiesce;
pub mod reconcile;
pub mod record;

pub use operations::CreateRequest;

use std::sync::Arc;
use std::time::Duration;

use super::agents::{self, AgentError};
use super::{Context, node};
use crate::store;
use ballast_storage_node::guard::OpGuard;

/// Longest a cut may hold a volume's writes when the request does not say.
pub const DEFAULT_DEADLINE: Duration = Duration::from_secs(10);

/// Longest deadline a request may ask for (the agents' limit).
pub const MAX_DEADLINE: Duration = Duration::from_secs(600);

/// Snapshot ids that start with this are a clone's internal snapshots.
pub const CLONE_PREFIX: &str = "clone.";

/// Longest snapshot id, in bytes (the agents' copy name limit).
pub const MAX_ID_LEN: usize = 128;

/// Errors of snapshot operations.
///
/// For gRPC (see `From<Error> for tonic::Status`): arguments
/// `INVALID_ARGUMENT`; unknown snapshots and source volumes `NOT_FOUND`;
/// a failed pre-hook `FAILED_PRECONDITION`;
/// a name taken by a snapshot of another volume `ALREADY_EXISTS`; a
/// concurrent operation or a snapshot being deleted `ABORTED`; a volume
/// that is not ready `FAILED_PRECONDITION`; a cut past its deadline
/// `DEADLINE_EXCEEDED`; no reachable in-sync replica `UNAVAILABLE`.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A request argument is missing or malformed.
    #[error("Invalid argument: {reason}")]
    InvalidArgument {
        /// What is wrong.
        reason: String,
    },
    /// No snapshot with this id.
    #[error("Snapshot {snapshot} does not exist")]
    SnapshotNotFound {
        /// The snapshot id.
        snapshot: String,
    },
    /// The source volume does not exist.
    #[error("Volume {volume} does not exist")]
    VolumeNotFound {
        /// The volume id.
        volume: String,
    },
    /// The source volume is being created or deleted.
    #[error("Volume {volume} is {state}; only a ready volume can be snapshotted")]
    VolumeNotReady {
        /// The volume id.
        volume: String,
        /// Its state.
        state: &'static str,
    },
    /// The name is a snapshot of another volume (CSI CreateSnapshot:
    /// "Snapshot already exists but is incompatible").
    #[error("Snapshot {snapshot} already exists as a snapshot of volume {source_volume}")]
    SnapshotMismatch {
        /// The snapshot id.
        snapshot: String,
        /// The volume it is a snapshot of.
        source_volume: String,
    },
    /// A group snapshot of that name exists with other volumes or
    /// parameters, or a member's id is taken (CSI
    /// CreateVolumeGroupSnapshot: `ALREADY_EXISTS`).
    #[error("Group snapshot {group} already exists but is incompatible: {reason}")]
    GroupMismatch {
        /// The group id.
        group: String,
        /// What differs.
        reason: String,
    },
    /// A member of a group snapshot is deleted with its group only (CSI
    /// DeleteSnapshot: `FAILED_PRECONDITION`).
    #[error("Snapshot {snapshot} is a member of group snapshot {group}; delete the group")]
    MemberOfGroup {
        /// The snapshot id.
        snapshot: String,
        /// Its group.
        group: String,
    },
    /// Another operation on the snapshot or its volume is in progress.
    #[error("Another operation on {what} is in progress; retry later")]
    Busy {
        /// "snapshot S" or "volume V".
        what: String,
    },
    /// The snapshot is being deleted.
    #[error("Snapshot {snapshot} is being deleted; retry later")]
    Deleting {
        /// The snapshot id.
        snapshot: String,
    },
    /// A range query starts at or past the snapshot's end (CSI
    /// SnapshotMetadata: "Invalid starting_offset", `OUT_OF_RANGE`).
    #[error("Offset {offset} is at or past the snapshot's end ({size_bytes} bytes)")]
    OffsetOutOfRange {
        /// The offset asked for.
        offset: u64,
        /// The snapshot's size.
        size_bytes: u64,
    },
    /// A node the cut needs is down.
    #[error("Node {node} is down (no heartbeat within the timeout)")]
    NodeDown {
        /// The node id.
        node: String,
    },
    /// No in-sync replica of the volume could be copied.
    #[error("No in-sync replica of volume {volume} is on a node that is up")]
    NoInSyncReplica {
        /// The volume id.
        volume: String,
    },
    /// The cut did not complete while the barrier held (writes in flight
    /// outlasted the deadline, the copies took longer, or the barrier
    /// dropped before the resume). Nothing was kept.
    #[error(
        "The cut of volume {volume} did not complete within its deadline of {deadline:?}: {why}"
    )]
    CutDeadline {
        /// The volume id.
        volume: String,
        /// The deadline.
        deadline: Duration,
        /// What ran out of time.
        why: String,
    },
    /// A snapshot hook failed or timed out (a pre-hook's failure fails the
    /// snapshot before any target is paused).
    #[error("A hook of volume {volume} on node {node} failed: {message}")]
    Hook {
        /// The member volume.
        volume: String,
        /// Where it ran.
        node: String,
        /// What the runner reported (exit status, output tail).
        message: String,
    },
    /// An agent failed or refused.
    #[error(transparent)]
    Agent(#[from] AgentError),
    /// An agent cannot be addressed.
    #[error(transparent)]
    AgentAddress(#[from] agents::Error),
    /// The node registry failed.
    #[error(transparent)]
    Node(#[from] node::Error),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] store::Error),
}

impl From<Error> for tonic::Status {
    fn from(err: Error) -> Self {
        use tonic::Code;
        let code = match err {
            Error::AgentAddress(err) => return err.into(),
            Error::Node(err) => return err.into(),
            Error::Store(err) => return err.into(),
            Error::Agent(ref agent) => agent.status_code(),
            Error::InvalidArgument { .. } => Code::InvalidArgument,
            Error::SnapshotNotFound { .. } | Error::VolumeNotFound { .. } => Code::NotFound,
            Error::VolumeNotReady { .. } => Code::FailedPrecondition,
            Error::SnapshotMismatch { .. } | Error::GroupMismatch { .. } => Code::AlreadyExists,
            Error::MemberOfGroup { .. } | Error::Hook { .. } => Code::FailedPrecondition,
            Error::Busy { .. } | Error::Deleting { .. } => Code::Aborted,
            Error::NoInSyncReplica { .. } | Error::NodeDown { .. } => Code::Unavailable,
            Error::CutDeadline { .. } => Code::DeadlineExceeded,
            Error::OffsetOutOfRange { .. } => Code::OutOfRange,
        };
        tonic::Status::new(code, crate::error_chain(&err))
    }
}

/// Checks a snapshot id: 1 to [`MAX_ID_LEN`] bytes of `[A-Za-z0-9._-]`,
/// not starting with a dot (the agents' copy name rule).
///
/// # Errors
///
/// [`Error::InvalidArgument`] saying what is wrong.
pub fn validate_id(id: &str) -> Result<(), Error> {
    let reason = if id.is_empty() {
        "the snapshot name is empty".to_string()
    } else if id.len() > MAX_ID_LEN {
        format!("the snapshot name is longer than {MAX_ID_LEN} bytes")
    } else if id.starts_with('.') {
        format!("the snapshot name {id:?} starts with a dot")
    } else if !id
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        format!("the snapshot name {id:?} may only hold A-Z, a-z, 0-9, '.', '_' and '-'")
    } else {
        return Ok(());
    };
    Err(Error::InvalidArgument { reason })
}

fn invalid(reason: impl Into<String>) -> Error {
    Error::InvalidArgument {
        reason: reason.into(),
    }
}

/// The operation guard key of a snapshot (volume ids hold no `/`, so it
/// never names a volume).
fn guard_key(snapshot_id: &str) -> String {
    format!("snapshot/{snapshot_id}")
}

/// The snapshot operations, shared by the services, the volume
/// operations (restore, clone) and the reconciler.
#[derive(Debug, Clone)]
pub struct Snapshots {
    context: Arc<Context>,
}

impl Snapshots {
    /// Operations over `context`.
    pub fn new(context: Arc<Context>) -> Self {
        Self { context }
    }

    fn guard(&self, key: &str, what: String) -> Result<OpGuard, Error> {
        self.context
            .guards
            .try_acquire(key)
            .ok_or(Error::Busy { what })
    }
}
