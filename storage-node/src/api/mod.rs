//! The agent's gRPC API (`ballast.agent.v1`): one file per service, each a
//! thin adapter between protobuf messages and [`Agent`] operations.
//!
//! Handlers validate arguments, call the agent and convert the result; they
//! hold no state of their own. Every agent error becomes a gRPC status
//! through the single `From<agent::Error> for Status` below, so adding an
//! error variant forces a decision about its code.

mod pool;
mod quiesce;
mod raw_export;
mod replica;
mod snapshot;
mod target;

use std::net::SocketAddr;
use std::sync::Arc;

use ballast_proto::agent::export_service_server::ExportServiceServer;
use ballast_proto::agent::pool_service_server::PoolServiceServer;
use ballast_proto::agent::quiesce_service_server::QuiesceServiceServer;
use ballast_proto::agent::replica_service_server::ReplicaServiceServer;
use ballast_proto::agent::snapshot_service_server::SnapshotServiceServer;
use ballast_proto::agent::target_service_server::TargetServiceServer;
use tonic::Status;

use crate::agent::{self, Agent};

/// Serves the agent API on `listen` until `shutdown` completes;
/// `QuiesceService` calls go to `node_plugin` (the node's CSI node
/// plugin), or are UNAVAILABLE without one.
///
/// Errors: the transport error if the address cannot be bound or serving
/// fails.
pub async fn serve(
    agent: Arc<Agent>,
    listen: SocketAddr,
    node_plugin: Option<tonic::transport::Channel>,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    tonic::transport::Server::builder()
        .add_service(PoolServiceServer::new(pool::PoolApi::new(agent.clone())))
        .add_service(ReplicaServiceServer::new(replica::ReplicaApi::new(
            agent.clone(),
        )))
        .add_service(ExportServiceServer::new(raw_export::ExportApi::new(
            agent.clone(),
        )))
        .add_service(SnapshotServiceServer::new(snapshot::SnapshotApi::new(
            agent.clone(),
        )))
        .add_service(TargetServiceServer::new(target::TargetApi::new(agent)))
        .add_service(QuiesceServiceServer::new(quiesce::QuiesceApi::new(
            node_plugin,
        )))
        .serve_with_shutdown(listen, shutdown)
        .await
}

impl From<agent::Error> for Status {
    fn from(e: agent::Error) -> Self {
        match e {
            agent::Error::Pool(e) => e.into(),
            agent::Error::Replica(e) => e.into(),
            agent::Error::Snapshot(e) => e.into(),
            agent::Error::Export(e) => {
                let code = match &e {
                    crate::raw_export::Error::Conflict { .. } => tonic::Code::AlreadyExists,
                    crate::raw_export::Error::RelativeSocket { .. } => tonic::Code::InvalidArgument,
                    crate::raw_export::Error::VolumeReplica { .. } => {
                        tonic::Code::FailedPrecondition
                    }
                    crate::raw_export::Error::Open { .. }
                    | crate::raw_export::Error::Start { .. }
                    | crate::raw_export::Error::Resize { .. } => tonic::Code::Internal,
                };
                Status::new(code, crate::error_chain(&e))
            }
            agent::Error::ReplicaExported { .. } => {
                Status::failed_precondition(crate::error_chain(&e))
            }
            agent::Error::Engine(_) | agent::Error::Task(_) => {
                Status::internal(crate::error_chain(&e))
            }
        }
    }
}
