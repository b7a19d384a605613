//! `VolumeService` and `TargetControlService`: gRPC adapters of
//! [`Volumes`].
//!
//! Handlers convert messages and errors and hold no state; validation,
//! guards and idempotency live in [`super::operations`] and
//! [`super::control`].

use std::sync::Arc;

use ballast_proto::controller as pb;
use ballast_proto::controller::target_control_service_server::TargetControlService;
use ballast_proto::controller::volume_service_server::VolumeService;
use tonic::{Request, Response, Status};
use tracing::instrument;

use super::Volumes;
use super::operations::{CreateRequest, Source};
use super::record::VolumeRecord;

/// The volume service.
pub struct VolumeApi {
    volumes: Arc<Volumes>,
}

impl VolumeApi {
    /// Serves `volumes`.
    pub fn new(volumes: Arc<Volumes>) -> Self {
        Self { volumes }
    }
}

#[tonic::async_trait]
impl VolumeService for VolumeApi {
    #[instrument(err, skip(self, request), fields(volume.id = %request.get_ref().name))]
    async fn create_volume(
        &self,
        request: Request<pb::CreateVolumeRequest>,
    ) -> Result<Response<pb::Volume>, Status> {
        let request = request.into_inner();
        let source = match (&*request.source_snapshot_id, &*request.source_volume_id) {
            ("", "") => None,
            (snapshot, "") => Some(Source::Snapshot(snapshot.to_string())),
            ("", volume) => Some(Source::Volume(volume.to_string())),
            _ => {
                return Err(Status::invalid_argument(
                    "Give at most one of source_snapshot_id and source_volume_id",
                ));
            }
        };
        let volume = self
            .volumes
            .create(&CreateRequest {
                preferred_node: Some(request.preferred_node_id).filter(|n| !n.is_empty()),
                source,
                ..CreateRequest::new(
                    &request.name,
                    request.size_bytes,
                    request.replica_count,
                    request.thin,
                )
            })
            .await?;
        Ok(Response::new(self.volumes.to_proto(&volume)))
    }

    #[instrument(err, skip(self, request), fields(volume.id = %request.get_ref().volume_id))]
    async fn delete_volume(
        &self,
        request: Request<pb::DeleteVolumeRequest>,
    ) -> Result<Response<pb::DeleteVolumeResponse>, Status> {
        self.volumes.delete(&request.get_ref().volume_id).await?;
        Ok(Response::new(pb::DeleteVolumeResponse {}))
    }

    #[instrument(level = "debug", err, skip(self, request), fields(volume.id = %request.get_ref().volume_id))]
    async fn get_volume(
        &self,
        request: Request<pb::GetVolumeRequest>,
    ) -> Result<Response<pb::Volume>, Status> {
        let volume = self.volumes.get(&request.get_ref().volume_id).await?;
        Ok(Response::new(self.volumes.to_proto(&volume)))
    }

    #[instrument(level = "debug", err, skip_all)]
    async fn list_volumes(
        &self,
        _request: Request<pb::ListVolumesRequest>,
    ) -> Result<Response<pb::ListVolumesResponse>, Status> {
        let volumes = self.volumes.list().await?;
        Ok(Response::new(pb::ListVolumesResponse {
            volumes: volumes
                .iter()
                .map(|v: &VolumeRecord| self.volumes.to_proto(v))
                .collect(),
        }))
    }

    #[instrument(err, skip(self, request), fields(volume.id = %request.get_ref().volume_id, node.id = %request.get_ref().node_id))]
    async fn publish_volume(
        &self,
        request: Request<pb::PublishVolumeRequest>,
    ) -> Result<Response<pb::PublishVolumeResponse>, Status> {
        let request = request.into_inner();
        let publication = self
            .volumes
            .publish(&request.volume_id, &request.node_id, request.force)
            .await?;
        Ok(Response::new(pb::PublishVolumeResponse {
            nbd_uri: publication.nbd_uri,
            socket_path: publication.socket_path,
            epoch: publication.epoch,
        }))
    }

    #[instrument(err, skip(self, request), fields(volume.id = %request.get_ref().volume_id))]
    async fn unpublish_volume(
        &self,
        request: Request<pb::UnpublishVolumeRequest>,
    ) -> Result<Response<pb::UnpublishVolumeResponse>, Status> {
        self.volumes.unpublish(&request.get_ref().volume_id).await?;
        Ok(Response::new(pb::UnpublishVolumeResponse {}))
    }
}

/// The target control service.
pub struct TargetControlApi {
    volumes: Arc<Volumes>,
}

impl TargetControlApi {
    /// Serves `volumes`.
    pub fn new(volumes: Arc<Volumes>) -> Self {
        Self { volumes }
    }

    fn replicas(&self, volume: &VolumeRecord) -> pb::VolumeReplicas {
        pb::VolumeReplicas {
            epoch: volume.epoch,
            replicas: self.volumes.to_proto(volume).replicas,
        }
    }
}

#[tonic::async_trait]
impl TargetControlService for TargetControlApi {
    #[instrument(err, skip(self, request), fields(volume.id = %request.get_ref().volume_id, node.id = %request.get_ref().node_id, epoch = request.get_ref().epoch))]
    async fn drop_replica(
        &self,
        request: Request<pb::DropReplicaRequest>,
    ) -> Result<Response<pb::VolumeReplicas>, Status> {
        let request = request.into_inner();
        let volume = self
            .volumes
            .drop_replica(
                &request.volume_id,
                request.epoch,
                &request.node_id,
                &request.reason,
            )
            .await?;
        Ok(Response::new(self.replicas(&volume)))
    }

    #[instrument(err, skip(self, request), fields(volume.id = %request.get_ref().volume_id, node.id = %request.get_ref().node_id, epoch = request.get_ref().epoch))]
    async fn replica_in_sync(
        &self,
        request: Request<pb::ReplicaInSyncRequest>,
    ) -> Result<Response<pb::VolumeReplicas>, Status> {
        let request = request.into_inner();
        let volume = self
            .volumes
            .replica_in_sync(&request.volume_id, request.epoch, &request.node_id)
            .await?;
        Ok(Response::new(self.replicas(&volume)))
    }

    #[instrument(level = "debug", err, skip(self, request), fields(volume.id = %request.get_ref().volume_id, node.id = %request.get_ref().node_id, epoch = request.get_ref().epoch))]
    async fn report_rebuild(
        &self,
        request: Request<pb::ReportRebuildRequest>,
    ) -> Result<Response<pb::ReportRebuildResponse>, Status> {
        let request = request.into_inner();
        self.volumes
            .report_rebuild(
                &request.volume_id,
                request.epoch,
                &request.node_id,
                request.done_bytes,
                request.total_bytes,
            )
            .await?;
        Ok(Response::new(pb::ReportRebuildResponse {}))
    }
}
