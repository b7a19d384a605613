//! The snapshot reconciler: [`Leftovers`] finishes what an interrupted
//! operation left. A record still `creating` with no operation holding
//! its guard (the controller crashed mid-cut) is undone: its copies are
//! removed from every node that may hold one, then the record. A
//! `deleting` record has its remaining copies removed as their nodes come
//! up. A clone's internal snapshot whose volume is no longer being
//! created (the clone finished, failed or crashed) is deleted.

use std::sync::Arc;

use async_trait::async_trait;
use tracing::{info, warn};

use super::group::{GroupRecord, group_key};
use super::record::{self, SnapshotRecord, SnapshotState};
use super::{Error, Snapshots, guard_key};
use crate::controller::Context;
use crate::controller::reconciler::Reconciler;
use crate::controller::volume::record::{self as volume_record, VolumeState};
use crate::error_chain;
use crate::store;

/// Removes the copies of interrupted and deleted snapshots.
pub struct Leftovers {
    snapshots: Snapshots,
}

impl Leftovers {
    /// A reconciler over `context`.
    pub fn new(context: Arc<Context>) -> Self {
        Self {
            snapshots: Snapshots::new(context),
        }
    }

    /// True when the snapshot is a clone's whose volume creation ended.
    async fn is_spent_clone_source(&self, snapshot: &SnapshotRecord) -> Result<bool, Error> {
        let Some(volume_id) = &snapshot.clone_for else {
            return Ok(false);
        };
        let volume = volume_record::read(&self.snapshots.context.store, volume_id).await?;
        Ok(!matches!(volume, Some(v) if v.value.state == VolumeState::Creating))
    }

    async fn finish(&self, snapshot: &SnapshotRecord) -> Result<(), Error> {
        let id = &snapshot.snapshot_id;
        let Some(_guard) = self.snapshots.context.guards.try_acquire(&guard_key(id)) else {
            return Ok(());
        };
        let why = match snapshot.state {
            SnapshotState::Creating => "its cut was interrupted",
            SnapshotState::Deleting => "it is being deleted",
            SnapshotState::Ready if self.is_spent_clone_source(snapshot).await? => {
                "it served a clone that is no longer being created"
            }
            SnapshotState::Ready => return Ok(()),
        };
        info!(snapshot.id = %id, why, "Removing the snapshot's copies");
        self.snapshots.undo(id).await?;
        Ok(())
    }
}

impl Leftovers {
    /// Undoes a group left `creating` (no operation holds it) or
    /// `deleting`.
    async fn finish_group(&self, group: &GroupRecord) -> Result<(), Error> {
        let id = &group.group_snapshot_id;
        if group.state == SnapshotState::Ready {
            return Ok(());
        }
        let Some(_guard) = self.snapshots.context.guards.try_acquire(&group_key(id)) else {
            return Ok(());
        };
        info!(group.id = %id, state = group.state.as_str(), "Removing the group snapshot's copies");
        self.snapshots.undo_group(id).await?;
        Ok(())
    }
}

#[async_trait]
impl Reconciler for Leftovers {
    fn name(&self) -> &'static str {
        "snapshot-leftovers"
    }

    async fn reconcile(&self) -> Result<(), store::Error> {
        let groups = match self.snapshots.list_groups().await {
            Ok(groups) => groups,
            Err(Error::Store(err)) => return Err(err),
            Err(_) => Vec::new(),
        };
        for group in groups {
            match self.finish_group(&group).await {
                Ok(()) => {}
                Err(Error::Store(err @ store::Error::Unavailable(_))) => return Err(err),
                Err(err) => {
                    warn!(group.id = %group.group_snapshot_id, error = %error_chain(&err), "Group snapshot cleanup step failed; retrying on the next pass")
                }
            }
        }
        for snapshot in record::list(&self.snapshots.context.store).await? {
            match self.finish(&snapshot).await {
                Ok(()) => {}
                Err(Error::Store(err @ store::Error::Unavailable(_))) => return Err(err),
                Err(err) => {
                    warn!(snapshot.id = %snapshot.snapshot_id, error = %error_chain(&err), "Snapshot cleanup step failed; retrying on the next pass")
                }
            }
        }
        Ok(())
    }
}
