//! What the snapshot resource does: create (the record, then the cut),
//! delete, get and list. Every operation takes the snapshot's guard; a
//! create also the source volume's. A record is written before any copy
//! exists and removed only after every copy is gone, so a crash at any
//! point leaves a record from which the reconciler removes the copies.

use std::time::Duration;

use ballast_proto::agent as agent_pb;
use tracing::{info, instrument, warn};

use super::quiesce::{self, Quiesce};
use super::record::{self, SnapshotRecord, SnapshotState};
use super::{
    CLONE_PREFIX, DEFAULT_DEADLINE, Error, MAX_DEADLINE, Snapshots, cut, guard_key, invalid,
    validate_id,
};
use crate::controller::agents::AgentError;
use crate::controller::volume::operations::DeleteOutcome;
use crate::controller::volume::record::{self as volume_record, VolumeState};
use crate::store;
use ballast_storage_node::guard::OpGuard;

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
    /// Hooks and freeze around the cut (app consistency).
    pub quiesce: Quiesce,
}

impl CreateRequest {
    /// A snapshot of `source_volume_id` with the default deadline.
    pub fn new(name: &str, source_volume_id: &str) -> Self {
        Self {
            name: name.to_string(),
            source_volume_id: source_volume_id.to_string(),
            deadline: DEFAULT_DEADLINE,
            clone_for: None,
            quiesce: Quiesce::default(),
        }
    }

    fn validate(&self) -> Result<(), Error> {
        validate_id(&self.name)?;
        self.quiesce.validate()?;
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

impl Snapshots {
    /// Takes a snapshot, or returns it if it exists for the same volume
    /// (idempotent by name). A record left `creating` by a crash is undone
    /// and the cut taken again.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`], [`Error::SnapshotMismatch`],
    /// [`Error::VolumeNotFound`], [`Error::VolumeNotReady`],
    /// [`Error::Busy`], [`Error::Deleting`], [`Error::Hook`] for a failed
    /// pre-hook, and the cut's errors (see [`cut::take_group`]), after
    /// which nothing of the snapshot is left.
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
            group_snapshot_id: None,
            quiesce: None,
        };
        let revision = record::create(store, &planned).await?;
        let mut asked = vec![Vec::new()];
        let member = cut::Member {
            volume: &volume,
            snapshot_id: id,
        };
        let cut = quiesce::take_group(
            &self.context,
            &[member],
            &request.quiesce,
            id,
            request.deadline,
            &mut asked,
        )
        .await;
        let asked = asked.into_iter().flatten().collect();
        let (taken, quiesced) = match cut.map(|mut taken| taken.remove(0)) {
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
            quiesce: (!request.quiesce.is_none()).then_some(quiesced),
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
    /// is not an error. A group's member is refused
    /// ([`Error::MemberOfGroup`]): it goes with its group. Copies on nodes that are down are removed when the
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
        if let Some(current) = record::read(&self.context.store, snapshot_id).await?
            && let Some(group) = current.value.group_snapshot_id
        {
            return Err(Error::MemberOfGroup {
                snapshot: snapshot_id.to_string(),
                group,
            });
        }
        let outcome = self.undo(snapshot_id).await?;
        if outcome == DeleteOutcome::Gone {
            info!("Snapshot deleted");
        }
        Ok(outcome)
    }

    /// Marks the snapshot `deleting` and removes its copies; the caller
    /// holds its guard.
    pub(super) async fn undo(&self, snapshot_id: &str) -> Result<DeleteOutcome, Error> {
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
