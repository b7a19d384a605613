//! `SnapshotService`: snapshot copies of replicas, and their allocated and
//! changed ranges.

use std::sync::Arc;

use ballast_proto::agent as pb;
use ballast_proto::agent::snapshot_service_server::SnapshotService;
use tonic::{Request, Response, Status};
use tracing::instrument;

use crate::agent::{Agent, SnapshotCopyStatus};
use crate::snapshot::RangesPage;

pub(super) struct SnapshotApi {
    agent: Arc<Agent>,
}

impl SnapshotApi {
    pub(super) fn new(agent: Arc<Agent>) -> Self {
        Self { agent }
    }
}

fn to_proto(status: SnapshotCopyStatus) -> pb::SnapshotCopy {
    let c = status.copy;
    pb::SnapshotCopy {
        snapshot_id: c.snapshot_id,
        replica_name: c.meta.replica_name,
        volume_id: c.meta.volume_id,
        pool: c.pool,
        size_bytes: c.meta.size_bytes,
        allocated_bytes: status.allocated_bytes,
        created_at_unix_nanos: c.meta.created_at_unix_nanos,
        path: c.data_path.display().to_string(),
    }
}

fn ranges_to_proto((page, size_bytes): (RangesPage, u64)) -> pb::RangesResponse {
    pb::RangesResponse {
        ranges: page
            .ranges
            .into_iter()
            .map(|r| pb::ByteRange {
                offset: r.offset,
                length: r.length,
            })
            .collect(),
        next_offset: page.next_offset,
        size_bytes,
    }
}

fn require(value: &str, what: &str) -> Result<(), Status> {
    if value.is_empty() {
        return Err(Status::invalid_argument(format!("{what} is required")));
    }
    Ok(())
}

#[tonic::async_trait]
impl SnapshotService for SnapshotApi {
    #[instrument(err, skip_all, fields(snapshot.id = %request.get_ref().snapshot_id, replica.name = %request.get_ref().replica_name))]
    async fn create_snapshot_copy(
        &self,
        request: Request<pb::CreateSnapshotCopyRequest>,
    ) -> Result<Response<pb::SnapshotCopy>, Status> {
        let req = request.into_inner();
        require(&req.snapshot_id, "Snapshot id")?;
        require(&req.replica_name, "Replica name")?;
        let status = self
            .agent
            .create_snapshot_copy(&req.snapshot_id, &req.replica_name)
            .await?;
        Ok(Response::new(to_proto(status)))
    }

    #[instrument(err, skip_all, fields(snapshot.id = %request.get_ref().snapshot_id, replica.name = %request.get_ref().replica_name))]
    async fn prepare_snapshot_copy(
        &self,
        request: Request<pb::CreateSnapshotCopyRequest>,
    ) -> Result<Response<pb::PrepareSnapshotCopyResponse>, Status> {
        let req = request.into_inner();
        require(&req.snapshot_id, "Snapshot id")?;
        require(&req.replica_name, "Replica name")?;
        self.agent
            .prepare_snapshot_copy(&req.snapshot_id, &req.replica_name)
            .await?;
        Ok(Response::new(pb::PrepareSnapshotCopyResponse {}))
    }

    #[instrument(err, skip_all, fields(snapshot.id = %request.get_ref().snapshot_id))]
    async fn delete_snapshot_copy(
        &self,
        request: Request<pb::DeleteSnapshotCopyRequest>,
    ) -> Result<Response<pb::DeleteSnapshotCopyResponse>, Status> {
        let id = &request.get_ref().snapshot_id;
        require(id, "Snapshot id")?;
        self.agent.delete_snapshot_copy(id).await?;
        Ok(Response::new(pb::DeleteSnapshotCopyResponse {}))
    }

    #[instrument(err, skip_all)]
    async fn list_snapshot_copies(
        &self,
        _request: Request<pb::ListSnapshotCopiesRequest>,
    ) -> Result<Response<pb::ListSnapshotCopiesResponse>, Status> {
        let copies = self.agent.list_snapshot_copies().await?;
        Ok(Response::new(pb::ListSnapshotCopiesResponse {
            copies: copies.into_iter().map(to_proto).collect(),
        }))
    }

    #[instrument(err, skip_all, fields(snapshot.id = %request.get_ref().snapshot_id))]
    async fn get_allocated_ranges(
        &self,
        request: Request<pb::GetAllocatedRangesRequest>,
    ) -> Result<Response<pb::RangesResponse>, Status> {
        let req = request.into_inner();
        require(&req.snapshot_id, "Snapshot id")?;
        let page = self
            .agent
            .allocated_ranges(&req.snapshot_id, req.starting_offset, req.max_results)
            .await?;
        Ok(Response::new(ranges_to_proto(page)))
    }

    #[instrument(err, skip_all, fields(snapshot.id = %request.get_ref().target_snapshot_id, base = %request.get_ref().base_snapshot_id))]
    async fn get_changed_ranges(
        &self,
        request: Request<pb::GetChangedRangesRequest>,
    ) -> Result<Response<pb::RangesResponse>, Status> {
        let req = request.into_inner();
        require(&req.base_snapshot_id, "Base snapshot id")?;
        require(&req.target_snapshot_id, "Target snapshot id")?;
        let page = self
            .agent
            .changed_ranges(
                &req.base_snapshot_id,
                &req.target_snapshot_id,
                req.starting_offset,
                req.max_results,
            )
            .await?;
        Ok(Response::new(ranges_to_proto(page)))
    }
}
