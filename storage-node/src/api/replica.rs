//! `ReplicaService`: create, grow, destroy and list replicas.

use std::sync::Arc;

use ballast_proto::agent as pb;
use ballast_proto::agent::replica_service_server::ReplicaService;
use tonic::{Request, Response, Status};
use tracing::instrument;

use crate::agent::{Agent, ReplicaStatus};
use crate::replica::CreateReplica;

pub(super) struct ReplicaApi {
    agent: Arc<Agent>,
}

impl ReplicaApi {
    pub(super) fn new(agent: Arc<Agent>) -> Self {
        Self { agent }
    }
}

fn to_proto(status: ReplicaStatus) -> pb::Replica {
    let r = status.replica;
    pb::Replica {
        name: r.name,
        pool: r.pool,
        volume_id: r.meta.volume_id,
        size_bytes: r.meta.size_bytes,
        thin: r.meta.thin,
        allocated_bytes: status.allocated_bytes,
        epoch: r.meta.epoch,
        path: r.data_path.display().to_string(),
        exported: status.exported,
        source_snapshot: r.meta.source_snapshot,
    }
}

fn require_name(name: &str) -> Result<(), Status> {
    if name.is_empty() {
        return Err(Status::invalid_argument("Replica name is required"));
    }
    Ok(())
}

#[tonic::async_trait]
impl ReplicaService for ReplicaApi {
    #[instrument(err, skip_all, fields(replica.id = %request.get_ref().name, snapshot.id = %request.get_ref().source_snapshot))]
    async fn create_replica(
        &self,
        request: Request<pb::CreateReplicaRequest>,
    ) -> Result<Response<pb::Replica>, Status> {
        let req = request.into_inner();
        require_name(&req.name)?;
        let create = CreateReplica {
            name: req.name,
            volume_id: req.volume_id,
            size_bytes: req.size_bytes,
            thin: req.thin,
            pool: (!req.pool.is_empty()).then_some(req.pool),
        };
        let status = if req.source_snapshot.is_empty() {
            self.agent.create_replica(create).await?
        } else {
            self.agent
                .restore_replica(create, &req.source_snapshot)
                .await?
        };
        Ok(Response::new(to_proto(status)))
    }

    #[instrument(err, skip_all, fields(replica.id = %request.get_ref().name))]
    async fn grow_replica(
        &self,
        request: Request<pb::GrowReplicaRequest>,
    ) -> Result<Response<pb::Replica>, Status> {
        let req = request.into_inner();
        require_name(&req.name)?;
        let status = self.agent.grow_replica(&req.name, req.size_bytes).await?;
        Ok(Response::new(to_proto(status)))
    }

    #[instrument(err, skip_all, fields(replica.id = %request.get_ref().name))]
    async fn destroy_replica(
        &self,
        request: Request<pb::DestroyReplicaRequest>,
    ) -> Result<Response<pb::DestroyReplicaResponse>, Status> {
        let name = &request.get_ref().name;
        require_name(name)?;
        self.agent.destroy_replica(name).await?;
        Ok(Response::new(pb::DestroyReplicaResponse {}))
    }

    #[instrument(err, skip_all)]
    async fn list_replicas(
        &self,
        _request: Request<pb::ListReplicasRequest>,
    ) -> Result<Response<pb::ListReplicasResponse>, Status> {
        let replicas = self.agent.list_replicas().await?;
        Ok(Response::new(pb::ListReplicasResponse {
            replicas: replicas.into_iter().map(to_proto).collect(),
        }))
    }
}
