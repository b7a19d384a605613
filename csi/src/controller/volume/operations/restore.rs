//! Volumes created from a snapshot (restore) or from another volume
//! (clone): where their replicas go and what each starts with.
//!
//! A replica placed on a node that holds a copy of the snapshot starts as
//! a reflink of it (instant, thin, in sync from the start). Where placement
//! needs more nodes than hold copies (copy nodes down or full, a larger
//! replica count than the source's, `allowedNodes`), the other replicas
//! start empty and faulted with `full_rebuild`: the volume's target copies
//! them in full from a restored replica over the replica protocol
//! (sparse-aware, progress in `ballast volume show`) and they join the
//! in-sync set only when complete (invariant 4). Until the volume is first
//! published it is degraded, and its status says why.
//!
//! A clone is a restore from an internal snapshot of the source volume
//! (`clone.<new volume>`, taken at the source's write barrier when it is
//! published), deleted once the clone is created.

use super::*;
use crate::controller::snapshot::record::{SnapshotRecord, SnapshotState};
use crate::controller::snapshot::{self, CLONE_PREFIX, Snapshots};

/// What a volume is created from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A snapshot id.
    Snapshot(String),
    /// A volume id (a clone).
    Volume(String),
}

impl Source {
    /// Whether `existing` was created from this source.
    pub(super) fn matches(&self, existing: Option<&ContentSource>) -> bool {
        match (self, existing) {
            (Source::Snapshot(id), Some(s)) => s.volume_id.is_none() && s.snapshot_id == *id,
            (Source::Volume(id), Some(s)) => s.volume_id.as_deref() == Some(id),
            (_, None) => false,
        }
    }

    /// "snapshot S" or "volume V", for people.
    pub(super) fn describe(&self) -> String {
        match self {
            Source::Snapshot(id) => format!("snapshot {id}"),
            Source::Volume(id) => format!("volume {id}"),
        }
    }
}

/// The snapshot a new volume starts from, and where its replicas go.
pub(super) struct Restore {
    pub(super) snapshot: SnapshotRecord,
    pub(super) content_source: ContentSource,
}

impl Volumes {
    fn snapshots(&self) -> Snapshots {
        Snapshots::new(self.context.clone())
    }

    /// The ready snapshot `request.source` names; for a clone, takes the
    /// internal snapshot of the source volume first.
    ///
    /// # Errors
    ///
    /// [`Error::Snapshot`]: the snapshot or source volume does not exist
    /// (`NOT_FOUND`), is not ready, or the clone's cut failed;
    /// [`Error::InvalidArgument`] for a clone whose name is too long for
    /// its internal snapshot.
    pub(super) async fn resolve_source(
        &self,
        name: &str,
        source: &Source,
    ) -> Result<Restore, Error> {
        let snapshots = self.snapshots();
        let (snapshot, volume_id) = match source {
            Source::Snapshot(id) => (snapshots.get(id).await?, None),
            Source::Volume(volume_id) => {
                let internal = format!("{CLONE_PREFIX}{name}");
                if internal.len() > snapshot::MAX_ID_LEN {
                    return Err(Error::InvalidArgument {
                        reason: format!(
                            "a clone's name may be at most {} bytes",
                            snapshot::MAX_ID_LEN - CLONE_PREFIX.len()
                        ),
                    });
                }
                let request = snapshot::CreateRequest {
                    clone_for: Some(name.to_string()),
                    ..snapshot::CreateRequest::new(&internal, volume_id)
                };
                (snapshots.create(&request).await?, Some(volume_id.clone()))
            }
        };
        if snapshot.state != SnapshotState::Ready {
            return Err(snapshot::Error::Busy {
                what: format!(
                    "snapshot {} ({})",
                    snapshot.snapshot_id,
                    snapshot.state.as_str()
                ),
            }
            .into());
        }
        let content_source = ContentSource {
            snapshot_id: snapshot.snapshot_id.clone(),
            volume_id,
        };
        Ok(Restore {
            snapshot,
            content_source,
        })
    }

    /// Places the replicas of a volume restored from `snapshot`: as many
    /// as fit on nodes holding a copy (returned first), the rest anywhere.
    ///
    /// # Errors
    ///
    /// [`Error::Placement`] when no node holding a copy is up with room,
    /// or the other replicas do not fit.
    pub(super) fn place_restore(
        &self,
        candidates: &[Candidate],
        snapshot: &SnapshotRecord,
        request: &scheduling::Request<'_>,
    ) -> Result<(Vec<String>, Vec<String>), Error> {
        let holders: Vec<Candidate> = candidates
            .iter()
            .map(|c| Candidate {
                up: c.up && snapshot.copy_on(&c.node_id).is_some(),
                ..c.clone()
            })
            .collect();
        let usable = holders.iter().filter(|c| c.up).count();
        let most = request.count.min(usable);
        let mut last_error = None;
        for count in (1..=most).rev() {
            let restored = scheduling::Request {
                count,
                preferred_node: None,
                preferred: &[],
                ..request.clone()
            };
            match scheduling::place(&holders, &restored) {
                Ok(restored) => {
                    let rest = scheduling::place(
                        candidates,
                        &scheduling::Request {
                            count: request.count - restored.len(),
                            preferred_node: None,
                            preferred: &[],
                            exclude: &restored,
                            holders: &restored,
                            ..request.clone()
                        },
                    )?;
                    return Ok((restored, rest));
                }
                Err(err) => last_error = Some(err),
            }
        }
        Err(match last_error {
            Some(err) => err.into(),
            None => scheduling::Error::NoSourceCopy {
                snapshot: snapshot.snapshot_id.clone(),
                nodes: snapshot.copies.iter().map(|c| c.node_id.clone()).collect(),
            }
            .into(),
        })
    }

    /// Deletes a clone's internal snapshot once the clone is created; a
    /// failure is left to the snapshot reconciler.
    pub(super) async fn drop_clone_snapshot(&self, source: &ContentSource) {
        if source.volume_id.is_none() {
            return;
        }
        if let Err(err) = self.snapshots().delete(&source.snapshot_id).await {
            warn!(snapshot.id = %source.snapshot_id, error = %crate::error_chain(&err), "Cannot delete the clone's internal snapshot yet; the reconciler does");
        }
    }
}

/// The replicas of a restored volume: those on copy nodes in sync, the
/// others faulted until a full rebuild fills them.
pub(super) fn restored_replicas(
    volume_id: &str,
    restored: &[String],
    others: &[String],
) -> Vec<ReplicaRecord> {
    let now = now_unix_ms();
    restored
        .iter()
        .map(|node| ReplicaRecord {
            node_id: node.clone(),
            replica_name: volume_id.to_string(),
            state: ReplicaState::InSync,
            faulted_since_unix_ms: 0,
            full_rebuild: false,
        })
        .chain(others.iter().map(|node| ReplicaRecord {
            node_id: node.clone(),
            replica_name: volume_id.to_string(),
            state: ReplicaState::Faulted,
            faulted_since_unix_ms: now,
            full_rebuild: true,
        }))
        .collect()
}
