//! `TargetService`: starts, stops and shows the volume targets of this
//! agent, and adds replicas to them (rebuilds). Called by the controller.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, UNIX_EPOCH};

use ballast_proto::agent as pb;
use ballast_proto::agent::target_service_server::TargetService;
use tonic::{Request, Response, Status};
use tracing::instrument;

use crate::agent::Agent;
use crate::target::barrier::PauseError;
use crate::target::{self, ReplicaAddress, StartTarget, TargetInfo};

/// The TargetService handlers.
pub struct TargetApi {
    agent: Arc<Agent>,
}

impl TargetApi {
    /// Handlers over `agent`.
    pub fn new(agent: Arc<Agent>) -> Self {
        Self { agent }
    }
}

fn address(replica: &pb::TargetReplica) -> ReplicaAddress {
    ReplicaAddress {
        node_id: replica.node_id.clone(),
        replica_name: replica.replica_name.clone(),
        data_address: replica.data_address.clone(),
        in_sync: replica.in_sync,
    }
}

fn to_proto(info: TargetInfo) -> pb::Target {
    let status = info.status;
    pb::Target {
        volume_id: status.volume_id,
        epoch: status.epoch,
        size_bytes: status.size_bytes,
        socket_path: info.socket_path.display().to_string(),
        nbd_uri: info.nbd_uri,
        replicas: status
            .replicas
            .into_iter()
            .map(|r| pb::TargetReplica {
                node_id: r.node_id,
                replica_name: r.replica_name,
                data_address: r.data_address,
                in_sync: r.state == target::SyncState::InSync,
                state: r.state.as_str().to_owned(),
                rebuild_done_bytes: r.rebuild_done_bytes,
                rebuild_total_bytes: r.rebuild_total_bytes,
            })
            .collect(),
        serving: status.serving,
    }
}

fn require(volume_id: &str) -> Result<(), Status> {
    if volume_id.is_empty() {
        return Err(Status::invalid_argument("volume_id is required"));
    }
    Ok(())
}

#[tonic::async_trait]
impl TargetService for TargetApi {
    #[instrument(err, skip(self, request), fields(volume.id = %request.get_ref().volume_id, epoch = request.get_ref().epoch))]
    async fn start_target(
        &self,
        request: Request<pb::StartTargetRequest>,
    ) -> Result<Response<pb::Target>, Status> {
        let request = request.into_inner();
        require(&request.volume_id)?;
        let start = StartTarget {
            volume_id: request.volume_id,
            epoch: request.epoch,
            size_bytes: request.size_bytes,
            socket_path: (!request.socket_path.is_empty())
                .then(|| PathBuf::from(request.socket_path)),
            replicas: request.replicas.iter().map(address).collect(),
            controller_address: request.controller_address,
        };
        let info = self.agent.targets().start(start).await?;
        Ok(Response::new(to_proto(info)))
    }

    #[instrument(err, skip(self, request), fields(volume.id = %request.get_ref().volume_id))]
    async fn stop_target(
        &self,
        request: Request<pb::StopTargetRequest>,
    ) -> Result<Response<pb::StopTargetResponse>, Status> {
        let request = request.into_inner();
        require(&request.volume_id)?;
        self.agent.targets().stop(&request.volume_id).await?;
        Ok(Response::new(pb::StopTargetResponse {}))
    }

    #[instrument(err, skip(self, request), fields(volume.id = %request.get_ref().volume_id))]
    async fn get_target(
        &self,
        request: Request<pb::GetTargetRequest>,
    ) -> Result<Response<pb::Target>, Status> {
        let request = request.into_inner();
        require(&request.volume_id)?;
        Ok(Response::new(to_proto(
            self.agent.targets().get(&request.volume_id)?,
        )))
    }

    async fn list_targets(
        &self,
        _request: Request<pb::ListTargetsRequest>,
    ) -> Result<Response<pb::ListTargetsResponse>, Status> {
        let targets = self
            .agent
            .targets()
            .list()
            .into_iter()
            .map(to_proto)
            .collect();
        Ok(Response::new(pb::ListTargetsResponse { targets }))
    }

    #[instrument(err, skip(self, request), fields(volume.id = %request.get_ref().volume_id, epoch = request.get_ref().epoch))]
    async fn add_replica(
        &self,
        request: Request<pb::AddReplicaRequest>,
    ) -> Result<Response<pb::Target>, Status> {
        let request = request.into_inner();
        require(&request.volume_id)?;
        let replica = request
            .replica
            .as_ref()
            .ok_or_else(|| Status::invalid_argument("replica is required"))?;
        let info = self
            .agent
            .targets()
            .add_replica(
                &request.volume_id,
                request.epoch,
                address(replica),
                request.full_rebuild,
            )
            .await?;
        Ok(Response::new(to_proto(info)))
    }

    #[instrument(err, skip(self, request), fields(volume.id = %request.get_ref().volume_id, epoch = request.get_ref().epoch, pause.id = %request.get_ref().pause_id))]
    async fn pause_target(
        &self,
        request: Request<pb::PauseTargetRequest>,
    ) -> Result<Response<pb::PauseTargetResponse>, Status> {
        // The deadline counts from the request's arrival.
        let started = Instant::now();
        let request = request.into_inner();
        require(&request.volume_id)?;
        let deadline = Duration::from_millis(u64::from(request.deadline_ms));
        let cut = self
            .agent
            .targets()
            .pause(
                &request.volume_id,
                request.epoch,
                &request.pause_id,
                started,
                deadline,
            )
            .await?;
        let paused_at_unix_nanos = cut
            .paused_at
            .duration_since(UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
            .unwrap_or(0);
        Ok(Response::new(pb::PauseTargetResponse {
            paused_at_unix_nanos,
            in_sync_node_ids: cut.in_sync_node_ids,
        }))
    }

    #[instrument(err, skip(self, request), fields(volume.id = %request.get_ref().volume_id, pause.id = %request.get_ref().pause_id))]
    async fn resume_target(
        &self,
        request: Request<pb::ResumeTargetRequest>,
    ) -> Result<Response<pb::ResumeTargetResponse>, Status> {
        let request = request.into_inner();
        require(&request.volume_id)?;
        let resumed = self
            .agent
            .targets()
            .resume(&request.volume_id, &request.pause_id)?;
        Ok(Response::new(pb::ResumeTargetResponse {
            was_paused: resumed.was_paused,
            paused_ms: u64::try_from(resumed.paused.as_millis()).unwrap_or(u64::MAX),
        }))
    }
}

impl From<target::Error> for Status {
    fn from(e: target::Error) -> Self {
        use tonic::Code;
        // No `_` arm: every new error must choose its code.
        let code = match &e {
            target::Error::InvalidArgument { .. } | target::Error::ControllerAddress { .. } => {
                Code::InvalidArgument
            }
            target::Error::TargetNotFound { .. } => Code::NotFound,
            target::Error::StaleEpoch { .. }
            | target::Error::EpochMismatch { .. }
            | target::Error::Fenced { .. } => Code::FailedPrecondition,
            target::Error::Busy { .. } => Code::Aborted,
            target::Error::ReplicaDropping { .. }
            | target::Error::NoInSyncReplica { .. }
            | target::Error::Replica { .. } => Code::Unavailable,
            target::Error::Pause { source, .. } => match source {
                PauseError::Held { .. } => Code::FailedPrecondition,
                PauseError::Deadline { .. } => Code::DeadlineExceeded,
                PauseError::InvalidDeadline { .. } => Code::InvalidArgument,
            },
            target::Error::SocketDir { .. } | target::Error::Export { .. } => Code::Internal,
        };
        let mut message = crate::error_chain(&e);
        if let target::Error::NoInSyncReplica { errors, .. } = &e {
            message.push_str(": ");
            message.push_str(errors);
        }
        Status::new(code, message)
    }
}
