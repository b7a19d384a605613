//! The node plugin's `QuiesceService` (Ballast's own, `agent.proto`): the
//! freeze, thaw and hook calls that the node's agent forwards from the
//! controller. A thin adapter over [`crate::node::freeze`] and
//! [`crate::node::hook`].

use std::sync::Arc;
use std::time::Duration;

use ballast_proto::agent as pb;
use tonic::{Request, Response, Status};
use tracing::{instrument, warn};

use crate::node::freeze::{Freezer, Frozen};
use crate::node::hook::{self, Hook, Phase};

/// The service, over the node plugin's freezer.
pub struct Quiesce {
    freezer: Arc<Freezer>,
}

impl Quiesce {
    /// Serves freezes and hooks with `freezer`.
    pub fn new(freezer: Arc<Freezer>) -> Self {
        Self { freezer }
    }
}

#[tonic::async_trait]
impl pb::quiesce_service_server::QuiesceService for Quiesce {
    #[instrument(skip_all, err, fields(volume.id = %request.get_ref().volume_id, freeze.id = %request.get_ref().freeze_id))]
    async fn freeze_filesystem(
        &self,
        request: Request<pb::FreezeFilesystemRequest>,
    ) -> Result<Response<pb::FreezeFilesystemResponse>, Status> {
        let request = request.into_inner();
        let deadline = Duration::from_millis(u64::from(request.deadline_ms));
        let frozen = self
            .freezer
            .freeze(&request.volume_id, &request.freeze_id, deadline)
            .await?;
        Ok(Response::new(match frozen {
            Frozen::At(path) => pb::FreezeFilesystemResponse {
                frozen: true,
                mount_path: path.to_string_lossy().into_owned(),
                skipped_reason: String::new(),
            },
            Frozen::Skipped(reason) => pb::FreezeFilesystemResponse {
                frozen: false,
                mount_path: String::new(),
                skipped_reason: reason,
            },
        }))
    }

    #[instrument(skip_all, err, fields(volume.id = %request.get_ref().volume_id, freeze.id = %request.get_ref().freeze_id))]
    async fn thaw_filesystem(
        &self,
        request: Request<pb::ThawFilesystemRequest>,
    ) -> Result<Response<pb::ThawFilesystemResponse>, Status> {
        let request = request.into_inner();
        let was_frozen = self
            .freezer
            .thaw(&request.volume_id, &request.freeze_id)
            .await?;
        Ok(Response::new(pb::ThawFilesystemResponse { was_frozen }))
    }

    #[instrument(skip_all, err, fields(volume.id = %request.get_ref().volume_id, snapshot.id = %request.get_ref().snapshot_id, phase = %request.get_ref().phase))]
    async fn run_hook(
        &self,
        request: Request<pb::RunHookRequest>,
    ) -> Result<Response<pb::RunHookResponse>, Status> {
        let request = request.into_inner();
        let phase = Phase::parse(&request.phase).ok_or_else(|| {
            Status::invalid_argument(format!("phase {:?} is not pre or post", request.phase))
        })?;
        // A hook of a volume not staged here still runs (it may not need
        // the files: `psql -c CHECKPOINT`), with an empty mount path.
        let mount_path = match self.freezer.filesystem_mount(&request.volume_id).await? {
            Ok(path) => Some(path),
            Err(reason) => {
                warn!(%reason, "The hook runs without a mount path");
                None
            }
        };
        let output = hook::run(&Hook {
            volume_id: &request.volume_id,
            snapshot_id: &request.snapshot_id,
            phase,
            command: &request.command,
            timeout: Duration::from_millis(u64::from(request.timeout_ms)),
            mount_path: mount_path.as_deref(),
        })
        .await?;
        Ok(Response::new(pb::RunHookResponse {
            output,
            mount_path: mount_path
                .map(|p| p.to_string_lossy().into_owned())
                .unwrap_or_default(),
        }))
    }
}
