//! Group snapshots: one cut across several volumes (CSI GroupController,
//! DESIGN.md invariant 5). A group record at `/ballast/group-snapshots/<id>`
//! names its members, each an ordinary snapshot (restorable, listable,
//! CBT-able) whose record carries the group's id; all members are cut
//! together by [`quiesce::take_group`] (hooks and freezes around
//! [`cut::take_group`]): every member's target paused before
//! any copy, every copy durable before any resume.
//!
//! Life cycle as a snapshot's: the group record and its members' records
//! are written `creating` before the cut, turned `ready` after it, and a
//! failed or interrupted cut leaves them `deleting` until every copy is
//! removed (the snapshot reconciler finishes what a crash left). A member
//! cannot be deleted alone: it goes with its group.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tracing::{info, instrument, warn};

use super::quiesce::{self, Quiesce};
use super::record::{self, SnapshotRecord, SnapshotState};
use super::{Error, MAX_DEADLINE, Snapshots, cut, guard_key, invalid, validate_id};
use crate::controller::volume::operations::DeleteOutcome;
use crate::controller::volume::record::{self as volume_record, VolumeRecord, VolumeState};
use crate::store::{self, ClusterStore, ClusterStoreExt, Expect, Versioned, keys};
use ballast_storage_node::guard::OpGuard;

/// A group snapshot as the store keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupRecord {
    /// The group snapshot id, its CSI name.
    pub group_snapshot_id: String,
    /// The member volumes, sorted.
    pub source_volume_ids: Vec<String>,
    /// The member snapshots, in the order of `source_volume_ids`.
    pub snapshot_ids: Vec<String>,
    /// Life cycle state, as a snapshot's.
    pub state: SnapshotState,
    /// The cut: when the last member's barrier closed, nanoseconds since
    /// the Unix epoch.
    #[serde(default)]
    pub created_at_unix_nanos: u64,
    /// The parameters it was created with (compared by a repeated create).
    #[serde(default)]
    pub parameters: BTreeMap<String, String>,
}

/// What CreateVolumeGroupSnapshot asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateGroupRequest {
    /// Group name, which becomes its id.
    pub name: String,
    /// The member volumes (any order, no repeats).
    pub source_volume_ids: Vec<String>,
    /// Longest the cut may hold the members' writes.
    pub deadline: Duration,
    /// The parameters, kept for idempotency.
    pub parameters: BTreeMap<String, String>,
    /// Hooks and freeze around the cut (app consistency).
    pub quiesce: Quiesce,
}

/// The id of the member snapshot of `volume_id` in group `group_id`.
pub fn member_id(group_id: &str, volume_id: &str) -> String {
    format!("{group_id}-{volume_id}")
}

/// The operation guard key of a group snapshot.
pub(super) fn group_key(group_id: &str) -> String {
    format!("group/{group_id}")
}

async fn read(
    store: &Arc<dyn ClusterStore>,
    group_id: &str,
) -> Result<Option<Versioned<GroupRecord>>, store::Error> {
    store.get_json(&keys::group_snapshot(group_id)).await
}

impl CreateGroupRequest {
    /// The member volumes sorted, checked.
    fn volumes(&self) -> Result<Vec<String>, Error> {
        validate_id(&self.name)?;
        if self.source_volume_ids.is_empty() {
            return Err(invalid("source_volume_ids is required"));
        }
        let mut volumes = self.source_volume_ids.clone();
        volumes.sort();
        if volumes.windows(2).any(|w| w[0] == w[1]) {
            return Err(invalid("a volume is named twice in source_volume_ids"));
        }
        for volume in &volumes {
            validate_id(&member_id(&self.name, volume))?;
        }
        self.quiesce.validate()?;
        if self.deadline.is_zero() || self.deadline > MAX_DEADLINE {
            return Err(invalid(format!(
                "the deadline must be between 1 ms and {MAX_DEADLINE:?}, not {:?}",
                self.deadline
            )));
        }
        Ok(volumes)
    }
}

impl Snapshots {
    /// Takes a group snapshot, or returns it if it exists with the same
    /// volumes and parameters (idempotent by name). A group left
    /// `creating` by a crash is undone and cut again.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`]; [`Error::GroupMismatch`] for the same
    /// name with other volumes or parameters, or a member id taken by
    /// another snapshot; [`Error::VolumeNotFound`];
    /// [`Error::VolumeNotReady`]; [`Error::Busy`]; [`Error::Deleting`];
    /// [`Error::Hook`]; the cut's errors (see [`cut::take_group`]), after which nothing of
    /// the group is kept.
    #[instrument(err, skip(self, request), fields(group.id = %request.name))]
    pub async fn create_group(
        &self,
        request: &CreateGroupRequest,
    ) -> Result<(GroupRecord, Vec<SnapshotRecord>), Error> {
        let volumes = request.volumes()?;
        let id = &request.name;
        let mut guards = vec![self.guard(&group_key(id), format!("group snapshot {id}"))?];
        let store = &self.context.store;
        if let Some(existing) = read(store, id).await? {
            let existing = existing.value;
            if existing.source_volume_ids != volumes || existing.parameters != request.parameters {
                return Err(Error::GroupMismatch {
                    group: id.clone(),
                    reason: format!(
                        "it holds volumes {} with parameters {:?}",
                        existing.source_volume_ids.join(", "),
                        existing.parameters
                    ),
                });
            }
            match existing.state {
                SnapshotState::Ready => {
                    let members = self.members(&existing).await?;
                    return Ok((existing, members));
                }
                SnapshotState::Deleting => {
                    return Err(Error::Deleting {
                        snapshot: format!("group {id}"),
                    });
                }
                SnapshotState::Creating => {
                    warn!("A cut of this group was interrupted; undoing it and cutting again");
                    if let DeleteOutcome::Pending(nodes) = self.undo_group(id).await? {
                        return Err(Error::Deleting {
                            snapshot: format!("group {id} (copies remain on {})", nodes.join(", ")),
                        });
                    }
                }
            }
        }
        let ids: Vec<String> = volumes.iter().map(|v| member_id(id, v)).collect();
        for member in &ids {
            guards.push(self.guard(&guard_key(member), format!("snapshot {member}"))?);
            if let Some(taken) = record::read(store, member).await? {
                return Err(Error::GroupMismatch {
                    group: id.clone(),
                    reason: format!(
                        "its member id {member} is taken by a snapshot of volume {}",
                        taken.value.source_volume_id
                    ),
                });
            }
        }
        let mut records: Vec<VolumeRecord> = Vec::with_capacity(volumes.len());
        for volume_id in &volumes {
            guards.push(self.guard(volume_id, format!("volume {volume_id}"))?);
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
            records.push(volume);
        }

        let group = GroupRecord {
            group_snapshot_id: id.clone(),
            source_volume_ids: volumes.clone(),
            snapshot_ids: ids.clone(),
            state: SnapshotState::Creating,
            created_at_unix_nanos: 0,
            parameters: request.parameters.clone(),
        };
        let group_revision = store
            .compare_and_put_json(&keys::group_snapshot(id), &group, Expect::Absent)
            .await?;
        let mut planned = Vec::with_capacity(ids.len());
        for (member, volume) in ids.iter().zip(&records) {
            let snapshot = SnapshotRecord {
                snapshot_id: member.clone(),
                source_volume_id: volume.volume_id.clone(),
                size_bytes: volume.size_bytes,
                state: SnapshotState::Creating,
                nodes: volume.replicas.iter().map(|r| r.node_id.clone()).collect(),
                copies: Vec::new(),
                created_at_unix_nanos: 0,
                paused_ms: 0,
                unclean: volume.unclean_stop,
                clone_for: None,
                group_snapshot_id: Some(id.clone()),
                quiesce: None,
            };
            let revision = record::create(store, &snapshot).await?;
            planned.push((snapshot, revision));
        }

        let members: Vec<cut::Member<'_>> = records
            .iter()
            .zip(&ids)
            .map(|(volume, snapshot_id)| cut::Member {
                volume,
                snapshot_id,
            })
            .collect();
        let mut asked = vec![Vec::new(); members.len()];
        let taken = match quiesce::take_group(
            &self.context,
            &members,
            &request.quiesce,
            id,
            request.deadline,
            &mut asked,
        )
        .await
        {
            Ok(taken) => taken,
            Err(err) => {
                warn!(error = %crate::error_chain(&err), "The group's cut failed; removing its copies");
                self.discard_group(id, planned, asked, guards).await;
                return Err(err);
            }
        };
        let mut ready = Vec::with_capacity(planned.len());
        for ((snapshot, revision), (taken, quiesced)) in planned.into_iter().zip(taken) {
            let snapshot = SnapshotRecord {
                state: SnapshotState::Ready,
                copies: taken.copies,
                created_at_unix_nanos: taken.created_at_unix_nanos,
                paused_ms: taken.paused_ms,
                quiesce: (!request.quiesce.is_none()).then_some(quiesced),
                ..snapshot
            };
            record::replace(store, &snapshot, revision).await?;
            ready.push(snapshot);
        }
        let group = GroupRecord {
            state: SnapshotState::Ready,
            created_at_unix_nanos: ready
                .iter()
                .map(|s| s.created_at_unix_nanos)
                .max()
                .unwrap_or(0),
            ..group
        };
        store
            .compare_and_put_json(
                &keys::group_snapshot(id),
                &group,
                Expect::Revision(group_revision),
            )
            .await?;
        info!(
            members = ready.len(),
            paused_ms = ?ready.iter().map(|s| s.paused_ms).collect::<Vec<_>>(),
            "Group snapshot taken"
        );
        Ok((group, ready))
    }

    /// Marks a failed group's records `deleting` (each member narrowed to
    /// the nodes asked for a copy) and removes them in the background,
    /// holding the guards.
    async fn discard_group(
        &self,
        group_id: &str,
        planned: Vec<(SnapshotRecord, u64)>,
        asked: Vec<Vec<String>>,
        guards: Vec<OpGuard>,
    ) {
        let store = &self.context.store;
        for ((snapshot, revision), nodes) in planned.into_iter().zip(asked) {
            let narrowed = SnapshotRecord {
                state: SnapshotState::Deleting,
                nodes,
                ..snapshot
            };
            if let Err(err) = record::replace(store, &narrowed, revision).await {
                warn!(snapshot.id = %narrowed.snapshot_id, error = %crate::error_chain(&err), "Cannot mark a failed member deleting; the reconciler removes it");
            }
        }
        let snapshots = self.clone();
        let group_id = group_id.to_string();
        tokio::spawn(async move {
            let _guards = guards;
            if let Err(err) = snapshots.undo_group(&group_id).await {
                warn!(group.id = %group_id, error = %crate::error_chain(&err), "Removing a failed group's copies is not finished; the reconciler completes it");
            }
        });
    }

    /// Marks the group and its members `deleting`, removes the members'
    /// copies and records, then the group's record once no member is
    /// left. The caller holds the group's guard.
    pub(super) async fn undo_group(&self, group_id: &str) -> Result<DeleteOutcome, Error> {
        let store = &self.context.store;
        let Some(mut current) = read(store, group_id).await? else {
            return Ok(DeleteOutcome::Gone);
        };
        if current.value.state != SnapshotState::Deleting {
            current.value.state = SnapshotState::Deleting;
            current.revision = store
                .compare_and_put_json(
                    &keys::group_snapshot(group_id),
                    &current.value,
                    Expect::Revision(current.revision),
                )
                .await?;
        }
        let mut pending = Vec::new();
        for member in &current.value.snapshot_ids {
            if let DeleteOutcome::Pending(nodes) = self.undo(member).await? {
                pending.extend(nodes);
            }
        }
        if !pending.is_empty() {
            pending.sort();
            pending.dedup();
            return Ok(DeleteOutcome::Pending(pending));
        }
        store
            .compare_and_delete(
                &keys::group_snapshot(group_id),
                Expect::Revision(current.revision),
            )
            .await?;
        Ok(DeleteOutcome::Gone)
    }

    /// Deletes a group snapshot with its members and their copies.
    /// Idempotent: an unknown group is not an error.
    ///
    /// # Errors
    ///
    /// [`Error::Busy`]; [`Error::Agent`] if an agent that is up fails to
    /// remove a copy (the records stay `deleting`).
    #[instrument(err, skip(self))]
    pub async fn delete_group(&self, group_id: &str) -> Result<DeleteOutcome, Error> {
        if group_id.is_empty() {
            return Err(invalid("group_snapshot_id is required"));
        }
        let _guard = self.guard(&group_key(group_id), format!("group snapshot {group_id}"))?;
        let outcome = self.undo_group(group_id).await?;
        if outcome == DeleteOutcome::Gone {
            info!("Group snapshot deleted");
        }
        Ok(outcome)
    }

    /// One group snapshot with its members.
    ///
    /// # Errors
    ///
    /// [`Error::SnapshotNotFound`] for an unknown group.
    pub async fn get_group(
        &self,
        group_id: &str,
    ) -> Result<(GroupRecord, Vec<SnapshotRecord>), Error> {
        if group_id.is_empty() {
            return Err(invalid("group_snapshot_id is required"));
        }
        let group = read(&self.context.store, group_id)
            .await?
            .ok_or_else(|| Error::SnapshotNotFound {
                snapshot: format!("group {group_id}"),
            })?
            .value;
        let members = self.members(&group).await?;
        Ok((group, members))
    }

    /// Every group snapshot, sorted by id.
    ///
    /// # Errors
    ///
    /// The store's error.
    pub async fn list_groups(&self) -> Result<Vec<GroupRecord>, Error> {
        Ok(self
            .context
            .store
            .list_json::<GroupRecord>(keys::GROUP_SNAPSHOTS)
            .await?
            .into_iter()
            .map(|(_, versioned)| versioned.value)
            .collect())
    }

    async fn members(&self, group: &GroupRecord) -> Result<Vec<SnapshotRecord>, Error> {
        let mut members = Vec::with_capacity(group.snapshot_ids.len());
        for id in &group.snapshot_ids {
            if let Some(member) = record::read(&self.context.store, id).await? {
                members.push(member.value);
            }
        }
        Ok(members)
    }
}
