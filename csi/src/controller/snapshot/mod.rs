//! Volume snapshots: the cut, the snapshot records and their copies.
//!
//! - [`record`]: the snapshot record in the store.
//! - [`cut`]: taking the copies at one instant (the target's write barrier
//!   on a published volume; the idle in-sync replicas of an unpublished
//!   one).
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
pub mod metadata;
pub mod reconcile;
pub mod record;

use std::sync::Arc;
use std::time::Duration;

use ballast_proto::agent as agent_pb;
use tracing::{info, instrument, warn};

use self::record::{SnapshotRecord, SnapshotState};
use super::agents::{self, AgentError};
use super::volume::operations::DeleteOutcome;
use super::volume::record::{self as volume_record, VolumeState};
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
            Error::SnapshotMismatch { .. } => Code::AlreadyExists,
            Error::Busy { .. } | Error::Deleting { .. } => Code::Aborted,
            Error::NoInSyncReplica { .. } | Error::NodeDown { .. } => Code::Unavailable,
            Error::CutDeadline { .. } => Code::DeadlineExceeded,
            Error::OffsetOutOfRange { .. } => Code::OutOfRange,
        };
        tonic::Status::new(code, crate::error_chain(&err))
    }
}

/// What CreateSnapshot asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateRequest {
    /// Snapshot name, which becomes its id.
    pub name: String,
    /// The volume to snapshot.
    pub source_volume_id: String,
    /// Longest the cut may hold the volume's writes.
    pub deadline: Duration,
    /// For a clone's internal snapshot: the volume being created.
    pub clone_for: Option<String>,
}

impl CreateRequest {
    /// A snapshot of `source_volume_id` with the default deadline.
    pub fn new(name: &str, source_volume_id: &str) -> Self {
        Self {
            name: name.to_string(),
            source_volume_id: source_volume_id.to_string(),
            deadline: DEFAULT_DEADLINE,
            clone_for: None,
        }
    }

    fn validate(&self) -> Result<(), Error> {
        validate_id(&self.name)?;
        if self.clone_for.is_none() && self.name.starts_with(CLONE_PREFIX) {
            return Err(invalid(format!(
                "snapshot names starting with {CLONE_PREFIX:?} are reserved for clones"
            )));
        }
        if self.source_volume_id.is_empty() {
            return Err(invalid("source_volume_id is required"));
        }
        if self.deadline.is_zero() || self.deadline > MAX_DEADLINE {
            return Err(invalid(format!(
                "the deadline must be between 1 ms and {MAX_DEADLINE:?}, not {:?}",
                self.deadline
            )));
        }
        Ok(())
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

    /// Takes a snapshot, or returns it if it exists for the same volume
    /// (idempotent by name). A record left `creating` by a crash is undone
    /// and the cut taken again.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`], [`Error::SnapshotMismatch`],
    /// [`Error::VolumeNotFound`], [`Error::VolumeNotReady`],
    /// [`Error::Busy`], [`Error::Deleting`], and the cut's errors (see
    /// [`cut::take`]), after which nothing of the snapshot is left.
    #[instrument(err, skip(self, request), fields(snapshot.id = %request.name, volume.id = %request.source_volume_id))]
    pub async fn create(&self, request: &CreateRequest) -> Result<SnapshotRecord, Error> {
        request.validate()?;
        let id = &request.name;
        let snapshot_guard = self.guard(&guard_key(id), format!("snapshot {id}"))?;
        let store = &self.context.store;
        if let Some(existing) = record::read(store, id).await? {
            let existing = existing.value;
            if existing.source_volume_id != request.source_volume_id {
                return Err(Error::SnapshotMismatch {
                    snapshot: id.clone(),
                    source_volume: existing.source_volume_id,
                });
            }
            match existing.state {
                SnapshotState::Ready => return Ok(existing),
                SnapshotState::Deleting => {
                    return Err(Error::Deleting {
                        snapshot: id.clone(),
                    });
                }
                SnapshotState::Creating => {
                    warn!("A cut of this snapshot was interrupted; undoing it and cutting again");
                    if let DeleteOutcome::Pending(nodes) = self.undo(id).await? {
                        return Err(Error::Deleting {
                            snapshot: format!("{id} (copies remain on {})", nodes.join(", ")),
                        });
                    }
                }
            }
        }
        let volume_id = &request.source_volume_id;
        let _volume_guard = self.guard(volume_id, format!("volume {volume_id}"))?;
        let volume = volume_record::read(store, volume_id)
            .await?
            .ok_or_else(|| Error::VolumeNotFound {
                volume: volume_id.clone(),
            })?
            .value;
        if volume.state != VolumeState::Ready {
            return Err(Error::VolumeNotReady {
                volume: volume_id.clone(),
                state: volume.state.as_str(),
            });
        }
        let planned = SnapshotRecord {
            snapshot_id: id.clone(),
            source_volume_id: volume_id.clone(),
            size_bytes: volume.size_bytes,
            state: SnapshotState::Creating,
            nodes: volume.replicas.iter().map(|r| r.node_id.clone()).collect(),
            copies: Vec::new(),
            created_at_unix_nanos: 0,
            paused_ms: 0,
            unclean: volume.unclean_stop,
            clone_for: request.clone_for.clone(),
        };
        let revision = record::create(store, &planned).await?;
        let mut asked = Vec::new();
        let cut = cut::take(&self.context, &volume, id, request.deadline, &mut asked).await;
        let taken = match cut {
            Ok(taken) => taken,
            Err(err) => {
                warn!(error = %crate::error_chain(&err), "The cut failed; removing its copies");
                self.discard(planned, revision, asked, snapshot_guard).await;
                return Err(err);
            }
        };
        let ready = SnapshotRecord {
            state: SnapshotState::Ready,
            copies: taken.copies,
            created_at_unix_nanos: taken.created_at_unix_nanos,
            paused_ms: taken.paused_ms,
            ..planned
        };
        record::replace(store, &ready, revision).await?;
        info!(
            copies = ready.copies.len(),
            paused_ms = ready.paused_ms,
            "Snapshot taken"
        );
        Ok(ready)
    }

    /// Removes what a failed cut left: only nodes that were asked for a
    /// copy may hold one, so the record is narrowed to them first; their
    /// copies are removed in the background (holding the snapshot's
    /// guard), so a stalled node does not hold the failed call too.
    async fn discard(
        &self,
        planned: SnapshotRecord,
        revision: u64,
        asked: Vec<String>,
        guard: OpGuard,
    ) {
        let narrowed = SnapshotRecord {
            state: SnapshotState::Deleting,
            nodes: asked,
            ..planned
        };
        if let Err(err) = record::replace(&self.context.store, &narrowed, revision).await {
            warn!(error = %crate::error_chain(&err), "Cannot mark the failed snapshot deleting; the reconciler removes it");
            return;
        }
        let snapshots = self.clone();
        tokio::spawn(async move {
            let _guard = guard;
            if let Err(err) = snapshots.undo(&narrowed.snapshot_id).await {
                warn!(snapshot.id = %narrowed.snapshot_id, error = %crate::error_chain(&err), "Removing the copies of a failed cut is not finished; the reconciler completes it");
            }
        });
    }

    /// Deletes a snapshot and its copies. Idempotent: a missing snapshot
    /// is not an error. Copies on nodes that are down are removed when the
    /// nodes return (the record stays, in state `deleting`).
    ///
    /// # Errors
    ///
    /// [`Error::Busy`]; [`Error::Agent`] if an agent that is up fails to
    /// remove its copy (the record stays `deleting`).
    #[instrument(err, skip(self))]
    pub async fn delete(&self, snapshot_id: &str) -> Result<DeleteOutcome, Error> {
        if snapshot_id.is_empty() {
            return Err(invalid("snapshot_id is required"));
        }
        let _guard = self.guard(&guard_key(snapshot_id), format!("snapshot {snapshot_id}"))?;
        let outcome = self.undo(snapshot_id).await?;
        if outcome == DeleteOutcome::Gone {
            info!("Snapshot deleted");
        }
        Ok(outcome)
    }

    /// Marks the snapshot `deleting` and removes its copies; the caller
    /// holds its guard.
    async fn undo(&self, snapshot_id: &str) -> Result<DeleteOutcome, Error> {
        let store = &self.context.store;
        let Some(mut current) = record::read(store, snapshot_id).await? else {
            return Ok(DeleteOutcome::Gone);
        };
        if current.value.state != SnapshotState::Deleting {
            current.value.state = SnapshotState::Deleting;
            current.revision = record::replace(store, &current.value, current.revision).await?;
        }
        self.finish_delete(current).await
    }

    /// Removes the copies of a `deleting` record on every node that is up,
    /// then the record once none is left.
    async fn finish_delete(
        &self,
        current: store::Versioned<SnapshotRecord>,
    ) -> Result<DeleteOutcome, Error> {
        let snapshot = &current.value;
        let mut pending = Vec::new();
        let mut failure = None;
        for node_id in &snapshot.nodes {
            match self.delete_copy(node_id, &snapshot.snapshot_id).await {
                Ok(true) => {}
                Ok(false) => pending.push(node_id.clone()),
                Err(Error::Agent(err)) if err.is_unreachable() => pending.push(node_id.clone()),
                Err(err) => {
                    warn!(node.id = %node_id, error = %crate::error_chain(&err), "Cannot remove snapshot copy");
                    failure.get_or_insert(err);
                }
            }
        }
        if let Some(err) = failure {
            return Err(err);
        }
        if !pending.is_empty() {
            return Ok(DeleteOutcome::Pending(pending));
        }
        record::remove(&self.context.store, &snapshot.snapshot_id, current.revision).await?;
        Ok(DeleteOutcome::Gone)
    }

    /// Removes the copy on `node_id`; `Ok(false)` while the node is down
    /// (the copy is removed when it returns).
    async fn delete_copy(&self, node_id: &str, snapshot_id: &str) -> Result<bool, Error> {
        let Some(node) = self.context.nodes.get(node_id).await? else {
            // Deregistered: its pools went with it.
            return Ok(true);
        };
        if !node.is_up() {
            return Ok(false);
        }
        let mut client = self.context.agents.snapshots(&node.record.agent_address)?;
        client
            .delete_snapshot_copy(agent_pb::DeleteSnapshotCopyRequest {
                snapshot_id: snapshot_id.to_string(),
            })
            .await
            .map_err(|status| {
                AgentError::new(
                    node_id,
                    format!("Removing the copy of snapshot {snapshot_id}"),
                    status,
                )
            })?;
        Ok(true)
    }

    /// One snapshot.
    ///
    /// # Errors
    ///
    /// [`Error::SnapshotNotFound`].
    pub async fn get(&self, snapshot_id: &str) -> Result<SnapshotRecord, Error> {
        if snapshot_id.is_empty() {
            return Err(invalid("snapshot_id is required"));
        }
        Ok(record::read(&self.context.store, snapshot_id)
            .await?
            .ok_or_else(|| Error::SnapshotNotFound {
                snapshot: snapshot_id.to_string(),
            })?
            .value)
    }

    /// Every snapshot, sorted by id.
    ///
    /// # Errors
    ///
    /// The store's error.
    pub async fn list(&self) -> Result<Vec<SnapshotRecord>, Error> {
        Ok(record::list(&self.context.store).await?)
    }
}
