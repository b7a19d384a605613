//! `QuiesceService` on the agent: every call is forwarded to the CSI node
//! plugin of this node (`--node-plugin-endpoint`), which holds the volumes'
//! mounts. The agent is the node's one endpoint the controller reaches;
//! the node plugin listens only on its unix socket. Nothing is decided
//! here: answers, errors included, pass through unchanged.

use std::time::Duration;

use ballast_proto::agent as pb;
use ballast_proto::agent::quiesce_service_client::QuiesceServiceClient;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

/// Slack beyond a call's own bound (a freeze's deadline, a hook's timeout)
/// for the node plugin to answer.
const ANSWER_SLACK: Duration = Duration::from_secs(10);

/// How long a thaw may take: an ioctl and a file removal.
const THAW_TIMEOUT: Duration = Duration::from_secs(30);

pub(super) struct QuiesceApi {
    node_plugin: Option<Channel>,
}

impl QuiesceApi {
    pub(super) fn new(node_plugin: Option<Channel>) -> Self {
        Self { node_plugin }
    }

    fn client(&self) -> Result<QuiesceServiceClient<Channel>, Status> {
        self.node_plugin
            .clone()
            .map(QuiesceServiceClient::new)
            .ok_or_else(|| {
                Status::unavailable(
                    "This agent has no node plugin (--node-plugin-endpoint): it cannot freeze filesystems or run hooks",
                )
            })
    }
}

/// Forwards within `bound`; a node plugin that does not answer is
/// UNAVAILABLE.
async fn within<T>(
    bound: Duration,
    call: impl Future<Output = Result<Response<T>, Status>>,
) -> Result<Response<T>, Status> {
    match tokio::time::timeout(bound, call).await {
        Ok(answer) => answer,
        Err(_) => Err(Status::unavailable(format!(
            "The node plugin did not answer within {bound:?}"
        ))),
    }
}

fn millis(ms: u32) -> Duration {
    Duration::from_millis(u64::from(ms))
}

#[tonic::async_trait]
impl pb::quiesce_service_server::QuiesceService for QuiesceApi {
    async fn freeze_filesystem(
        &self,
        request: Request<pb::FreezeFilesystemRequest>,
    ) -> Result<Response<pb::FreezeFilesystemResponse>, Status> {
        let request = request.into_inner();
        let bound = millis(request.deadline_ms) + ANSWER_SLACK;
        within(bound, self.client()?.freeze_filesystem(request)).await
    }

    async fn thaw_filesystem(
        &self,
        request: Request<pb::ThawFilesystemRequest>,
    ) -> Result<Response<pb::ThawFilesystemResponse>, Status> {
        let request = request.into_inner();
        within(THAW_TIMEOUT, self.client()?.thaw_filesystem(request)).await
    }

    async fn run_hook(
        &self,
        request: Request<pb::RunHookRequest>,
    ) -> Result<Response<pb::RunHookResponse>, Status> {
        let request = request.into_inner();
        let bound = millis(request.timeout_ms) + ANSWER_SLACK;
        within(bound, self.client()?.run_hook(request)).await
    }
}
