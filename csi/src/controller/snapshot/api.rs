//! `SnapshotService`: the management API's gRPC adapter of [`Snapshots`].
//!
//! Handlers convert messages and errors and hold no state.

use std::sync::Arc;
use std::time::Duration;

use ballast_proto::controller as pb;
use ballast_proto::controller::snapshot_service_server::SnapshotService;
use tonic::{Request, Response, Status};
use tracing::instrument;

use super::group::{CreateGroupRequest, GroupRecord};
use super::quiesce::{DEFAULT_HOOK_TIMEOUT, Quiesce};
use super::record::{SnapshotRecord, SnapshotState};
use super::{CreateRequest, DEFAULT_DEADLINE, Snapshots};

/// The snapshot service.
pub struct SnapshotApi {
    snapshots: Arc<Snapshots>,
}

impl SnapshotApi {
    /// Serves `snapshots`.
    pub fn new(snapshots: Arc<Snapshots>) -> Self {
        Self { snapshots }
    }
}

/// The snapshot as the management API shows it.
pub fn to_proto(record: &SnapshotRecord) -> pb::Snapshot {
    pb::Snapshot {
        snapshot_id: record.snapshot_id.clone(),
        source_volume_id: record.source_volume_id.clone(),
        size_bytes: record.size_bytes,
        state: record.state.as_str().to_string(),
        ready_to_use: record.state == SnapshotState::Ready,
        created_at_unix_nanos: record.created_at_unix_nanos,
        copies: record
            .copies
            .iter()
            .map(|c| pb::SnapshotCopy {
                node_id: c.node_id.clone(),
                pool: c.pool.clone(),
                allocated_bytes: c.allocated_bytes,
            })
            .collect(),
        paused_ms: record.paused_ms,
        group_snapshot_id: record.group_snapshot_id.clone().unwrap_or_default(),
        frozen: record.quiesce.as_ref().is_some_and(|q| q.frozen),
        hooks_run: record.quiesce.as_ref().map_or(0, |q| q.hooks_run),
        quiesce_notes: record
            .quiesce
            .as_ref()
            .map(|q| q.notes.clone())
            .unwrap_or_default(),
    }
}

/// The group snapshot as the management API shows it.
pub fn group_to_proto(group: &GroupRecord, members: &[SnapshotRecord]) -> pb::GroupSnapshot {
    pb::GroupSnapshot {
        group_snapshot_id: group.group_snapshot_id.clone(),
        source_volume_ids: group.source_volume_ids.clone(),
        state: group.state.as_str().to_string(),
        ready_to_use: group.state == SnapshotState::Ready,
        created_at_unix_nanos: group.created_at_unix_nanos,
        snapshots: members.iter().map(to_proto).collect(),
    }
}

fn deadline(ms: u32) -> Duration {
    match ms {
        0 => DEFAULT_DEADLINE,
        ms => Duration::from_millis(u64::from(ms)),
    }
}

/// The app consistency a management API request asks for.
fn quiesce(
    freeze: bool,
    pre_hooks: Vec<String>,
    post_hooks: Vec<String>,
    hook_timeout_ms: u32,
) -> Quiesce {
    Quiesce {
        freeze,
        pre_hooks,
        post_hooks,
        hook_timeout: match hook_timeout_ms {
            0 => DEFAULT_HOOK_TIMEOUT,
            ms => Duration::from_millis(u64::from(ms)),
        },
    }
}

#[tonic::async_trait]
impl SnapshotService for SnapshotApi {
    #[instrument(err, skip(self, request), fields(snapshot.id = %request.get_ref().name))]
    async fn create_snapshot(
        &self,
        request: Request<pb::CreateSnapshotRequest>,
    ) -> Result<Response<pb::Snapshot>, Status> {
        let request = request.into_inner();
        let snapshot = self
            .snapshots
            .create(&CreateRequest {
                deadline: deadline(request.deadline_ms),
                quiesce: quiesce(
                    request.freeze,
                    request.pre_hooks,
                    request.post_hooks,
                    request.hook_timeout_ms,
                ),
                ..CreateRequest::new(&request.name, &request.source_volume_id)
            })
            .await?;
        Ok(Response::new(to_proto(&snapshot)))
    }

    #[instrument(err, skip(self, request), fields(snapshot.id = %request.get_ref().snapshot_id))]
    async fn delete_snapshot(
        &self,
        request: Request<pb::DeleteSnapshotRequest>,
    ) -> Result<Response<pb::DeleteSnapshotResponse>, Status> {
        self.snapshots
            .delete(&request.get_ref().snapshot_id)
            .await?;
        Ok(Response::new(pb::DeleteSnapshotResponse {}))
    }

    #[instrument(level = "debug", err, skip(self, request), fields(snapshot.id = %request.get_ref().snapshot_id))]
    async fn get_snapshot(
        &self,
        request: Request<pb::GetSnapshotRequest>,
    ) -> Result<Response<pb::Snapshot>, Status> {
        let snapshot = self.snapshots.get(&request.get_ref().snapshot_id).await?;
        Ok(Response::new(to_proto(&snapshot)))
    }

    #[instrument(level = "debug", err, skip_all)]
    async fn list_snapshots(
        &self,
        request: Request<pb::ListSnapshotsRequest>,
    ) -> Result<Response<pb::ListSnapshotsResponse>, Status> {
        let volume = &request.get_ref().source_volume_id;
        let snapshots = self
            .snapshots
            .list()
            .await?
            .iter()
            .filter(|s| volume.is_empty() || s.source_volume_id == *volume)
            .map(to_proto)
            .collect();
        Ok(Response::new(pb::ListSnapshotsResponse { snapshots }))
    }

    #[instrument(err, skip(self, request), fields(base = %request.get_ref().base_snapshot_id, target = %request.get_ref().target_snapshot_id))]
    async fn diff_snapshots(
        &self,
        request: Request<pb::DiffSnapshotsRequest>,
    ) -> Result<Response<pb::DiffSnapshotsResponse>, Status> {
        let request = request.into_inner();
        let diff = self
            .snapshots
            .all_changed_ranges(&request.base_snapshot_id, &request.target_snapshot_id)
            .await?;
        Ok(Response::new(pb::DiffSnapshotsResponse {
            changed_bytes: diff.ranges.iter().map(|(_, length)| length).sum(),
            ranges: diff
                .ranges
                .iter()
                .map(|&(offset, length)| pb::ByteRange { offset, length })
                .collect(),
            size_bytes: diff.size_bytes,
        }))
    }

    #[instrument(err, skip(self, request), fields(group.id = %request.get_ref().name))]
    async fn create_group_snapshot(
        &self,
        request: Request<pb::CreateGroupSnapshotRequest>,
    ) -> Result<Response<pb::GroupSnapshot>, Status> {
        let request = request.into_inner();
        let (group, members) = self
            .snapshots
            .create_group(&CreateGroupRequest {
                name: request.name,
                source_volume_ids: request.source_volume_ids,
                deadline: deadline(request.deadline_ms),
                parameters: Default::default(),
                quiesce: quiesce(
                    request.freeze,
                    request.pre_hooks,
                    request.post_hooks,
                    request.hook_timeout_ms,
                ),
            })
            .await?;
        Ok(Response::new(group_to_proto(&group, &members)))
    }

    #[instrument(err, skip(self, request), fields(group.id = %request.get_ref().group_snapshot_id))]
    async fn delete_group_snapshot(
        &self,
        request: Request<pb::DeleteGroupSnapshotRequest>,
    ) -> Result<Response<pb::DeleteGroupSnapshotResponse>, Status> {
        self.snapshots
            .delete_group(&request.get_ref().group_snapshot_id)
            .await?;
        Ok(Response::new(pb::DeleteGroupSnapshotResponse {}))
    }

    #[instrument(level = "debug", err, skip(self, request), fields(group.id = %request.get_ref().group_snapshot_id))]
    async fn get_group_snapshot(
        &self,
        request: Request<pb::GetGroupSnapshotRequest>,
    ) -> Result<Response<pb::GroupSnapshot>, Status> {
        let (group, members) = self
            .snapshots
            .get_group(&request.get_ref().group_snapshot_id)
            .await?;
        Ok(Response::new(group_to_proto(&group, &members)))
    }

    #[instrument(level = "debug", err, skip_all)]
    async fn list_group_snapshots(
        &self,
        _request: Request<pb::ListGroupSnapshotsRequest>,
    ) -> Result<Response<pb::ListGroupSnapshotsResponse>, Status> {
        let mut group_snapshots = Vec::new();
        for group in self.snapshots.list_groups().await? {
            let (group, members) = self.snapshots.get_group(&group.group_snapshot_id).await?;
            group_snapshots.push(group_to_proto(&group, &members));
        }
        Ok(Response::new(pb::ListGroupSnapshotsResponse {
            group_snapshots,
        }))
    }
}
