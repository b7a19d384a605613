//! The in-sync set changes a target asks for, and its rebuild reports.
//!
//! These decide safety (docs/architecture.md, invariants 2 and 4):
//!
//! - Every request carries the target's epoch; anything but the volume's
//!   current epoch is refused ([`Error::StaleEpoch`]), so a stale target
//!   can never change the in-sync set.
//! - [`Volumes::drop_replica`] commits the new in-sync set to the store
//!   before it returns: the target acknowledges the writes the dropped
//!   replica missed only after that. It never drops the last in-sync
//!   replica ([`Error::LastInSync`]).
//! - [`Volumes::replica_in_sync`] adds a replica back only when its target
//!   says it holds every acknowledged write.
//!
//! Both are idempotent and take no operation guard (a target must get its
//! answer even while a reconciler works on the volume); compare-and-set on
//! the record orders them against everything else.

use tracing::{info, instrument, warn};

use super::record::{self, Change, ReplicaState, VolumeRecord};
use super::{Error, Progress, Volumes, operations::not_found};
use crate::controller::now_unix_ms;

/// Checks the target's epoch against the record's.
fn check_epoch(volume: &VolumeRecord, epoch: u64) -> Result<(), Error> {
    if epoch != volume.epoch {
        return Err(Error::StaleEpoch {
            volume: volume.volume_id.clone(),
            epoch,
            current: volume.epoch,
        });
    }
    Ok(())
}

fn require(volume_id: &str, node_id: &str) -> Result<(), Error> {
    if volume_id.is_empty() || node_id.is_empty() {
        return Err(Error::InvalidArgument {
            reason: "volume_id and node_id are required".to_string(),
        });
    }
    Ok(())
}

impl Volumes {
    /// Removes the replica on `node_id` from the in-sync set (state
    /// `faulted`), committed before returning. Idempotent: a replica that
    /// is already faulted is left as it is.
    ///
    /// # Errors
    ///
    /// [`Error::StaleEpoch`], [`Error::LastInSync`],
    /// [`Error::ReplicaNotFound`], [`Error::VolumeNotFound`], or the
    /// store's error (then nothing is committed and the target must not
    /// acknowledge).
    #[instrument(err, skip(self), fields(volume.id = %volume_id, node.id = %node_id, epoch = epoch))]
    pub async fn drop_replica(
        &self,
        volume_id: &str,
        epoch: u64,
        node_id: &str,
        reason: &str,
    ) -> Result<VolumeRecord, Error> {
        require(volume_id, node_id)?;
        let now = now_unix_ms();
        let mut dropped = false;
        let updated = record::update(&self.context.store, volume_id, |r| {
            dropped = false;
            check_epoch(r, epoch)?;
            let in_sync = r.in_sync_count();
            let replica = r
                .replica_mut(node_id)
                .ok_or_else(|| Error::ReplicaNotFound {
                    volume: volume_id.to_string(),
                    node: node_id.to_string(),
                })?;
            match replica.state {
                ReplicaState::Faulted => return Ok::<_, Error>(Change::Keep),
                ReplicaState::InSync if in_sync <= 1 => {
                    return Err(Error::LastInSync {
                        volume: volume_id.to_string(),
                        node: node_id.to_string(),
                    });
                }
                ReplicaState::InSync | ReplicaState::Rebuilding => {}
            }
            replica.state = ReplicaState::Faulted;
            replica.faulted_since_unix_ms = now;
            dropped = true;
            Ok(Change::Write)
        })
        .await?
        .ok_or_else(|| not_found(volume_id))?;
        self.context.rebuilds.clear(volume_id, node_id);
        if dropped {
            warn!(%reason, in_sync = updated.value.in_sync_count(), "Replica dropped from the in-sync set");
        }
        Ok(updated.value)
    }

    /// Adds the replica on `node_id` to the in-sync set. Idempotent.
    ///
    /// # Errors
    ///
    /// [`Error::StaleEpoch`], [`Error::ReplicaNotFound`],
    /// [`Error::VolumeNotFound`], or the store's error.
    #[instrument(err, skip(self), fields(volume.id = %volume_id, node.id = %node_id, epoch = epoch))]
    pub async fn replica_in_sync(
        &self,
        volume_id: &str,
        epoch: u64,
        node_id: &str,
    ) -> Result<VolumeRecord, Error> {
        require(volume_id, node_id)?;
        let mut joined = false;
        let updated = record::update(&self.context.store, volume_id, |r| {
            joined = false;
            check_epoch(r, epoch)?;
            let replica = r
                .replica_mut(node_id)
                .ok_or_else(|| Error::ReplicaNotFound {
                    volume: volume_id.to_string(),
                    node: node_id.to_string(),
                })?;
            if replica.state == ReplicaState::InSync {
                return Ok::<_, Error>(Change::Keep);
            }
            replica.state = ReplicaState::InSync;
            replica.faulted_since_unix_ms = 0;
            replica.full_rebuild = false;
            joined = true;
            Ok(Change::Write)
        })
        .await?
        .ok_or_else(|| not_found(volume_id))?;
        self.context.rebuilds.clear(volume_id, node_id);
        if joined {
            info!(
                in_sync = updated.value.in_sync_count(),
                "Replica joined the in-sync set"
            );
        }
        Ok(updated.value)
    }

    /// Records rebuild progress (memory only; for `GetVolume` and the CLI).
    ///
    /// # Errors
    ///
    /// [`Error::StaleEpoch`], [`Error::ReplicaNotFound`],
    /// [`Error::VolumeNotFound`].
    pub async fn report_rebuild(
        &self,
        volume_id: &str,
        epoch: u64,
        node_id: &str,
        done_bytes: u64,
        total_bytes: u64,
    ) -> Result<(), Error> {
        require(volume_id, node_id)?;
        let volume = self.get(volume_id).await?;
        check_epoch(&volume, epoch)?;
        if volume.replica(node_id).is_none() {
            return Err(Error::ReplicaNotFound {
                volume: volume_id.to_string(),
                node: node_id.to_string(),
            });
        }
        self.context.rebuilds.report(
            volume_id,
            node_id,
            Progress {
                epoch,
                done_bytes,
                total_bytes,
            },
        );
        Ok(())
    }
}
