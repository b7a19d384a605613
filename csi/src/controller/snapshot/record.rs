//! The snapshot record: one JSON value per snapshot at
//! `/ballast/snapshots/<id>`, and the only ways to change it.
//!
//! The record is written before any copy is taken (state `creating`, with
//! every node that may come to hold a copy), so that a controller that
//! crashes mid-cut leaves a record from which the leftovers reconciler
//! removes the copies. Fields added later must be `#[serde(default)]`.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::store::{self, ClusterStore, ClusterStoreExt, Expect, Versioned, keys};

/// Life cycle of a snapshot record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SnapshotState {
    /// The cut is being taken; copies may exist on `nodes`.
    Creating,
    /// Every copy is durable: the snapshot can be restored.
    Ready,
    /// Copies are being removed; the record goes once none is left.
    Deleting,
}

impl SnapshotState {
    /// The state as the API spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            SnapshotState::Creating => "creating",
            SnapshotState::Ready => "ready",
            SnapshotState::Deleting => "deleting",
        }
    }
}

/// One node's copy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CopyRecord {
    /// The node holding it.
    pub node_id: String,
    /// Its pool on that node.
    pub pool: String,
    /// Bytes of the pool it maps when it was taken.
    pub allocated_bytes: u64,
}

/// A snapshot as the store keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotRecord {
    /// The snapshot id, which is its CSI name and its copies' name.
    pub snapshot_id: String,
    /// The volume it was taken of (which may since have been deleted).
    pub source_volume_id: String,
    /// The volume's size at the cut, in bytes.
    pub size_bytes: u64,
    /// Life cycle state.
    pub state: SnapshotState,
    /// Nodes that may hold a copy: every replica node of the volume when
    /// the cut began (a superset of `copies` until the snapshot is ready),
    /// so a crashed cut can be cleaned up.
    pub nodes: Vec<String>,
    /// The durable copies, once ready.
    #[serde(default)]
    pub copies: Vec<CopyRecord>,
    /// The cut, in nanoseconds since the Unix epoch: when the target's
    /// barrier closed, or when the copies of an unpublished volume began.
    #[serde(default)]
    pub created_at_unix_nanos: u64,
    /// How long the volume's writes were held, in milliseconds.
    #[serde(default)]
    pub paused_ms: u64,
    /// The volume had stopped without its target confirming its writes
    /// (`VolumeRecord::unclean_stop`): copies may differ in writes that
    /// were never acknowledged, so a volume restored from them is
    /// resynchronised when first published.
    #[serde(default)]
    pub unclean: bool,
    /// For a clone's internal snapshot: the volume being created from it,
    /// which deletes the snapshot once created.
    #[serde(default)]
    pub clone_for: Option<String>,
    /// For a member of a group snapshot: the group, which it is deleted
    /// with.
    #[serde(default)]
    pub group_snapshot_id: Option<String>,
    /// What was done for app consistency, when it was asked for.
    #[serde(default)]
    pub quiesce: Option<super::quiesce::QuiesceRecord>,
}

impl SnapshotRecord {
    /// The copy on `node_id`, if any.
    pub fn copy_on(&self, node_id: &str) -> Option<&CopyRecord> {
        self.copies.iter().find(|c| c.node_id == node_id)
    }
}

/// Reads snapshot `snapshot_id`.
///
/// # Errors
///
/// The store's error.
pub async fn read(
    store: &Arc<dyn ClusterStore>,
    snapshot_id: &str,
) -> Result<Option<Versioned<SnapshotRecord>>, store::Error> {
    store.get_json(&keys::snapshot(snapshot_id)).await
}

/// Reads every snapshot, sorted by id.
///
/// # Errors
///
/// The store's error.
pub async fn list(store: &Arc<dyn ClusterStore>) -> Result<Vec<SnapshotRecord>, store::Error> {
    Ok(store
        .list_json::<SnapshotRecord>(keys::SNAPSHOTS)
        .await?
        .into_iter()
        .map(|(_, versioned)| versioned.value)
        .collect())
}

/// Writes a new record; the key must be absent.
///
/// # Errors
///
/// `store::Error::Conflict` if the snapshot exists.
pub async fn create(
    store: &Arc<dyn ClusterStore>,
    record: &SnapshotRecord,
) -> Result<u64, store::Error> {
    store
        .compare_and_put_json(&keys::snapshot(&record.snapshot_id), record, Expect::Absent)
        .await
}

/// Replaces the record if it is still at `revision`; returns the new
/// revision.
///
/// # Errors
///
/// `store::Error::Conflict` if it changed since.
pub async fn replace(
    store: &Arc<dyn ClusterStore>,
    record: &SnapshotRecord,
    revision: u64,
) -> Result<u64, store::Error> {
    store
        .compare_and_put_json(
            &keys::snapshot(&record.snapshot_id),
            record,
            Expect::Revision(revision),
        )
        .await
}

/// Deletes the record if it is still at `revision`.
///
/// # Errors
///
/// `store::Error::Conflict` if it changed since.
pub async fn remove(
    store: &Arc<dyn ClusterStore>,
    snapshot_id: &str,
    revision: u64,
) -> Result<(), store::Error> {
    store
        .compare_and_delete(&keys::snapshot(snapshot_id), Expect::Revision(revision))
        .await
        .map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_without_later_fields_loads() {
        let json = r#"{"snapshot_id":"s","source_volume_id":"v","size_bytes":4096,
            "state":"ready","nodes":["n1"]}"#;
        let record: SnapshotRecord = serde_json::from_str(json).expect("parse");
        assert_eq!(record.state, SnapshotState::Ready);
        assert!(record.copies.is_empty());
        assert_eq!(record.clone_for, None);
    }
}
