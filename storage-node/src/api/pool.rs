//! `PoolService`: pools and their capacity.

use std::sync::Arc;

use ballast_proto::agent as pb;
use ballast_proto::agent::pool_service_server::PoolService;
use tonic::{Request, Response, Status};
use tracing::instrument;

use crate::agent::{Agent, PoolStatus};
use crate::pool::PoolSource;

pub(super) struct PoolApi {
    agent: Arc<Agent>,
}

impl PoolApi {
    pub(super) fn new(agent: Arc<Agent>) -> Self {
        Self { agent }
    }
}

fn to_proto(status: PoolStatus) -> pb::Pool {
    let pool = &status.pool;
    let file = match pool.source() {
        PoolSource::File { path, .. } => path.display().to_string(),
        PoolSource::Device(_) => String::new(),
    };
    pb::Pool {
        name: pool.name().to_string(),
        uuid: pool.uuid().to_string(),
        device: pool.device().display().to_string(),
        file,
        mount_path: pool.mount_path().display().to_string(),
        total_bytes: status.capacity.total_bytes,
        free_bytes: status.capacity.free_bytes,
        provisioned_bytes: status.capacity.provisioned_bytes,
        overcommit_percent: status.capacity.overcommit_percent,
        replica_count: u32::try_from(status.capacity.replica_count).unwrap_or(u32::MAX),
    }
}

#[tonic::async_trait]
impl PoolService for PoolApi {
    #[instrument(err, skip_all)]
    async fn list_pools(
        &self,
        _request: Request<pb::ListPoolsRequest>,
    ) -> Result<Response<pb::ListPoolsResponse>, Status> {
        let pools = self.agent.list_pools().await?;
        Ok(Response::new(pb::ListPoolsResponse {
            pools: pools.into_iter().map(to_proto).collect(),
        }))
    }

    #[instrument(err, skip_all, fields(pool.name = %request.get_ref().name))]
    async fn get_pool(
        &self,
        request: Request<pb::GetPoolRequest>,
    ) -> Result<Response<pb::Pool>, Status> {
        let name = &request.get_ref().name;
        if name.is_empty() {
            return Err(Status::invalid_argument("Pool name is required"));
        }
        Ok(Response::new(to_proto(self.agent.get_pool(name).await?)))
    }
}
