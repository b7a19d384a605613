//! `ExportService`: the gRPC adapter of the raw export path ([`crate::raw_export`]).

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use ballast_proto::agent as pb;
use ballast_proto::agent::export_service_server::ExportService;
use tonic::{Request, Response, Status};
use tracing::instrument;

use crate::agent::Agent;
use crate::raw_export::ExportInfo;

pub(super) struct ExportApi {
    agent: Arc<Agent>,
}

impl ExportApi {
    pub(super) fn new(agent: Arc<Agent>) -> Self {
        Self { agent }
    }
}

fn to_proto(info: ExportInfo) -> pb::Export {
    pb::Export {
        uri: info.uri(),
        name: info.name,
        socket_path: info.socket.display().to_string(),
        tcp_address: info.tcp.map(|a| a.to_string()).unwrap_or_default(),
        connections: u32::try_from(info.connections).unwrap_or(u32::MAX),
    }
}

#[tonic::async_trait]
impl ExportService for ExportApi {
    #[instrument(err, skip_all, fields(replica.id = %request.get_ref().name))]
    async fn start_export(
        &self,
        request: Request<pb::StartExportRequest>,
    ) -> Result<Response<pb::Export>, Status> {
        let req = request.into_inner();
        if req.name.is_empty() || req.socket_path.is_empty() {
            return Err(Status::invalid_argument(
                "Export name and socket path are required",
            ));
        }
        let tcp = match req.tcp_address.as_str() {
            "" => None,
            text => Some(text.parse::<SocketAddr>().map_err(|_| {
                Status::invalid_argument(format!("Invalid TCP address {text:?}: expected IP:PORT"))
            })?),
        };
        let info = self
            .agent
            .start_export(&req.name, Path::new(&req.socket_path), tcp)
            .await?;
        Ok(Response::new(to_proto(info)))
    }

    #[instrument(err, skip_all, fields(replica.id = %request.get_ref().name))]
    async fn stop_export(
        &self,
        request: Request<pb::StopExportRequest>,
    ) -> Result<Response<pb::StopExportResponse>, Status> {
        let name = &request.get_ref().name;
        if name.is_empty() {
            return Err(Status::invalid_argument("Export name is required"));
        }
        self.agent.stop_export(name).await;
        Ok(Response::new(pb::StopExportResponse {}))
    }

    #[instrument(err, skip_all)]
    async fn list_exports(
        &self,
        _request: Request<pb::ListExportsRequest>,
    ) -> Result<Response<pb::ListExportsResponse>, Status> {
        let exports = self.agent.list_exports().await;
        Ok(Response::new(pb::ListExportsResponse {
            exports: exports.into_iter().map(to_proto).collect(),
        }))
    }
}
