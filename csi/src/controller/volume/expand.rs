//! Offline volume expansion: every replica grows, then the record.
//!
//! A published volume is refused: its target serves the size it started
//! with, so the volume grows only between an unpublish and the next
//! publish (CSI plugin capability VolumeExpansion OFFLINE). Replicas grow
//! first and the record last, so a crash in between leaves replicas
//! larger than the record, which is harmless (the target serves the
//! record's size) and which a retried expand completes; a replica never
//! serves a size the record does not hold.

use ballast_proto::agent as agent_pb;
use tracing::{info, instrument};

use super::operations::SIZE_ALIGN_BYTES;
use super::record::{self, Change, VolumeState};
use super::{Error, Volumes};
use crate::controller::agents::AgentError;

impl Volumes {
    /// Grows an unpublished volume to at least `size_bytes` (rounded up to
    /// [`SIZE_ALIGN_BYTES`]) and returns its new size. A volume already
    /// that large is left as it is (idempotent; volumes never shrink).
    ///
    /// # Errors
    ///
    /// [`Error::VolumeNotFound`]; [`Error::Published`] while published;
    /// [`Error::Creating`] or [`Error::Deleting`]; [`Error::NodeDown`] or
    /// [`Error::Agent`] if a replica cannot grow (retry: growing is
    /// idempotent).
    #[instrument(err, skip(self), fields(volume.id = %volume_id))]
    pub async fn expand(&self, volume_id: &str, size_bytes: u64) -> Result<u64, Error> {
        if volume_id.is_empty() {
            return Err(Error::InvalidArgument {
                reason: "volume_id is required".to_string(),
            });
        }
        let size_bytes = size_bytes
            .checked_next_multiple_of(SIZE_ALIGN_BYTES)
            .ok_or_else(|| Error::InvalidArgument {
                reason: format!("the size {size_bytes} is too large"),
            })?;
        let _guard = self.guard(volume_id)?;
        let store = &self.context.store;
        let current = record::read(store, volume_id)
            .await?
            .ok_or_else(|| Error::VolumeNotFound {
                volume: volume_id.to_string(),
            })?
            .value;
        match current.state {
            VolumeState::Ready => {}
            VolumeState::Creating => {
                return Err(Error::Creating {
                    volume: volume_id.to_string(),
                });
            }
            VolumeState::Deleting => {
                return Err(Error::Deleting {
                    volume: volume_id.to_string(),
                    pending: String::new(),
                });
            }
        }
        if size_bytes <= current.size_bytes {
            return Ok(current.size_bytes);
        }
        if let Some(target) = &current.target {
            return Err(Error::Published {
                volume: volume_id.to_string(),
                node: target.node_id.clone(),
            });
        }
        for replica in &current.replicas {
            let node = self.up_node(&replica.node_id).await?;
            let mut client = self.context.agents.replicas(&node.record.agent_address)?;
            client
                .grow_replica(agent_pb::GrowReplicaRequest {
                    name: replica.replica_name.clone(),
                    size_bytes,
                })
                .await
                .map_err(|status| {
                    AgentError::new(
                        &replica.node_id,
                        format!("Growing replica {}", replica.replica_name),
                        status,
                    )
                })?;
            info!(node.id = %replica.node_id, size_bytes, "Replica grown");
        }
        record::update(store, volume_id, |r| {
            if r.target.is_some() || r.size_bytes >= size_bytes {
                return Ok::<_, Error>(Change::Keep);
            }
            r.size_bytes = size_bytes;
            Ok(Change::Write)
        })
        .await?;
        info!(size_bytes, "Volume grown");
        Ok(size_bytes)
    }
}
