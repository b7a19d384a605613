//! Changed block tracking: the allocated ranges of one snapshot and the
//! ranges that differ between two snapshots of one volume, read from the
//! copies on one node (`GetAllocatedRanges` and `GetChangedRanges` of its
//! agent, which compare the copies' extent maps).
//!
//! Pages: each call returns at most `max_results` ranges, strictly
//! ascending, and where to continue; a caller streams pages until the
//! continuation reaches the snapshot's size. Ranges are exact for
//! allocated ranges; changed ranges are reported at the granularity of the
//! filesystem's extents (a range that shares physical blocks through
//! reflink is unchanged, any other may be reported whole), so they may be
//! wider than what was written, never narrower.

use ballast_proto::agent as agent_pb;

use super::record::{SnapshotRecord, SnapshotState};
use super::{Error, Snapshots, invalid};
use crate::controller::agents::AgentError;

/// One page of ranges.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RangesPage {
    /// `(offset, length)` pairs in bytes, ascending, not overlapping.
    pub ranges: Vec<(u64, u64)>,
    /// Where the next page starts; the snapshot's size when there is none.
    pub next_offset: u64,
    /// The snapshot's size in bytes (the target's, for a delta).
    pub size_bytes: u64,
}

impl RangesPage {
    /// True when no page follows.
    pub fn is_last(&self) -> bool {
        self.next_offset >= self.size_bytes
    }
}

impl Snapshots {
    /// A ready snapshot, for changed block tracking.
    async fn ready(&self, snapshot_id: &str) -> Result<SnapshotRecord, Error> {
        let snapshot = self.get(snapshot_id).await?;
        if snapshot.state != SnapshotState::Ready {
            return Err(Error::SnapshotNotFound {
                snapshot: snapshot_id.to_string(),
            });
        }
        Ok(snapshot)
    }

    /// The agent address of an up node holding copies of every snapshot in
    /// `snapshots`.
    async fn holder(&self, snapshots: &[&SnapshotRecord]) -> Result<(String, String), Error> {
        let Some(first) = snapshots.first() else {
            return Err(invalid("no snapshot given"));
        };
        for copy in &first.copies {
            if !snapshots.iter().all(|s| s.copy_on(&copy.node_id).is_some()) {
                continue;
            }
            if let Some(node) = self.context.nodes.get(&copy.node_id).await?
                && node.is_up()
            {
                return Ok((copy.node_id.clone(), node.record.agent_address));
            }
        }
        Err(Error::NoInSyncReplica {
            volume: first.source_volume_id.clone(),
        })
    }

    /// One page of the allocated ranges of `snapshot_id` from
    /// `starting_offset` (CSI GetMetadataAllocated).
    ///
    /// # Errors
    ///
    /// [`Error::SnapshotNotFound`]; [`Error::OffsetOutOfRange`] at or past
    /// the snapshot's size; [`Error::NoInSyncReplica`] when no node holding
    /// a copy is up; [`Error::Agent`].
    pub async fn allocated_ranges(
        &self,
        snapshot_id: &str,
        starting_offset: u64,
        max_results: u32,
    ) -> Result<RangesPage, Error> {
        let snapshot = self.ready(snapshot_id).await?;
        check_offset(&snapshot, starting_offset)?;
        let (node_id, address) = self.holder(&[&snapshot]).await?;
        let page = self
            .context
            .agents
            .snapshots(&address)?
            .get_allocated_ranges(agent_pb::GetAllocatedRangesRequest {
                snapshot_id: snapshot_id.to_string(),
                starting_offset,
                max_results,
            })
            .await
            .map_err(|status| {
                AgentError::new(
                    &node_id,
                    format!("Reading the allocated ranges of snapshot {snapshot_id}"),
                    status,
                )
            })?
            .into_inner();
        Ok(to_page(page))
    }

    /// One page of the ranges that differ between `base_id` and
    /// `target_id`, two snapshots of one volume, from `starting_offset`
    /// (CSI GetMetadataDelta).
    ///
    /// # Errors
    ///
    /// [`Error::SnapshotNotFound`]; [`Error::InvalidArgument`] for
    /// snapshots of different volumes; [`Error::OffsetOutOfRange`];
    /// [`Error::NoInSyncReplica`] when no node holding copies of both is
    /// up; [`Error::Agent`].
    pub async fn changed_ranges(
        &self,
        base_id: &str,
        target_id: &str,
        starting_offset: u64,
        max_results: u32,
    ) -> Result<RangesPage, Error> {
        let base = self.ready(base_id).await?;
        let target = self.ready(target_id).await?;
        if base.source_volume_id != target.source_volume_id {
            return Err(invalid(format!(
                "snapshot {base_id} is of volume {} and {target_id} of volume {}: a delta needs two snapshots of one volume",
                base.source_volume_id, target.source_volume_id
            )));
        }
        check_offset(&target, starting_offset)?;
        let (node_id, address) = self.holder(&[&target, &base]).await?;
        let page = self
            .context
            .agents
            .snapshots(&address)?
            .get_changed_ranges(agent_pb::GetChangedRangesRequest {
                base_snapshot_id: base_id.to_string(),
                target_snapshot_id: target_id.to_string(),
                starting_offset,
                max_results,
            })
            .await
            .map_err(|status| {
                AgentError::new(
                    &node_id,
                    format!("Comparing snapshots {base_id} and {target_id}"),
                    status,
                )
            })?
            .into_inner();
        Ok(to_page(page))
    }

    /// Every range that differs between two snapshots (all pages).
    ///
    /// # Errors
    ///
    /// As [`Snapshots::changed_ranges`].
    pub async fn all_changed_ranges(
        &self,
        base_id: &str,
        target_id: &str,
    ) -> Result<RangesPage, Error> {
        let mut all = Vec::new();
        let mut offset = 0;
        loop {
            let page = self.changed_ranges(base_id, target_id, offset, 0).await?;
            all.extend_from_slice(&page.ranges);
            // Each page moves on, or the agent broke its contract.
            if page.is_last() || page.next_offset <= offset {
                return Ok(RangesPage {
                    ranges: all,
                    next_offset: page.size_bytes,
                    size_bytes: page.size_bytes,
                });
            }
            offset = page.next_offset;
        }
    }
}

fn check_offset(snapshot: &SnapshotRecord, offset: u64) -> Result<(), Error> {
    if offset >= snapshot.size_bytes {
        return Err(Error::OffsetOutOfRange {
            offset,
            size_bytes: snapshot.size_bytes,
        });
    }
    Ok(())
}

fn to_page(page: agent_pb::RangesResponse) -> RangesPage {
    RangesPage {
        ranges: page.ranges.iter().map(|r| (r.offset, r.length)).collect(),
        next_offset: page.next_offset,
        size_bytes: page.size_bytes,
    }
}
