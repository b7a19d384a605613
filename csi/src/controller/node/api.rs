//! `NodeService`: the gRPC adapter of the node registry.
//!
//! Handlers validate, call [`super::Registry`] and convert; they hold no
//! state of their own.

use std::sync::Arc;

use ballast_proto::controller as pb;
use ballast_proto::controller::node_service_server::NodeService;
use tonic::{Request, Response, Status};
use tracing::instrument;

use super::Error;
use crate::controller::Context;

/// The node service.
pub struct NodeApi {
    context: Arc<Context>,
}

impl NodeApi {
    /// Serves the registry of `context`.
    pub fn new(context: Arc<Context>) -> Self {
        Self { context }
    }
}

#[tonic::async_trait]
impl NodeService for NodeApi {
    #[instrument(err, skip(self, request), fields(node.id = %request.get_ref().node.as_ref().map(|n| n.node_id.as_str()).unwrap_or("")))]
    async fn register_node(
        &self,
        request: Request<pb::RegisterNodeRequest>,
    ) -> Result<Response<pb::RegisterNodeResponse>, Status> {
        let node = request
            .into_inner()
            .node
            .ok_or_else(|| Error::InvalidNode {
                reason: "the request has no node".to_string(),
            })?;
        self.context.nodes.register(&node).await?;
        Ok(Response::new(pb::RegisterNodeResponse {}))
    }

    // Heartbeats arrive every 2 s from every node: logged only on error.
    #[instrument(level = "debug", err, skip(self, request), fields(node.id = %request.get_ref().node_id))]
    async fn heartbeat(
        &self,
        request: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatResponse>, Status> {
        let request = request.into_inner();
        self.context
            .nodes
            .heartbeat(&request.node_id, &request.pools)
            .await?;
        Ok(Response::new(pb::HeartbeatResponse {}))
    }

    #[instrument(err, skip_all)]
    async fn list_nodes(
        &self,
        _request: Request<pb::ListNodesRequest>,
    ) -> Result<Response<pb::ListNodesResponse>, Status> {
        let nodes = self.context.nodes.list().await?;
        Ok(Response::new(pb::ListNodesResponse {
            nodes: nodes.iter().map(super::NodeView::to_proto).collect(),
        }))
    }
}
