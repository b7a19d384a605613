//! The CSI GroupController service (CSI spec v1.11+, "GroupController
//! Service RPC") over the controller's group snapshots
//! ([`crate::controller::snapshot::group`]): CreateVolumeGroupSnapshot,
//! DeleteVolumeGroupSnapshot, GetVolumeGroupSnapshot, announced as
//! CREATE_DELETE_GET_VOLUME_GROUP_SNAPSHOT.
//!
//! Errors as the spec lists them: a missing name or volume list, a volume
//! named twice, a bad or unknown parameter `INVALID_ARGUMENT`; the same
//! name with other volumes or parameters `ALREADY_EXISTS`; an unknown
//! volume `NOT_FOUND`; a volume being created or deleted
//! `FAILED_PRECONDITION`; the cut past its `deadline` `DEADLINE_EXCEEDED`
//! (nothing kept). Delete and Get: `snapshot_ids`, when given, must be the
//! group's members (else `INVALID_ARGUMENT`); Get of an unknown group is
//! `NOT_FOUND`, Delete of one is OK.
//!
//! VolumeGroupSnapshotClass parameters are the VolumeSnapshotClass ones
//! (`deadline`; see the controller service's snapshot docs).

use std::collections::BTreeMap;
use std::sync::Arc;

use ballast_proto::csi;
use ballast_proto::csi::group_controller_service_capability::rpc::Type as RpcType;
use tonic::{Request, Response, Status};
use tracing::instrument;

use super::controller::snapshot::{
    SNAPSHOTTER_PREFIX, class_parameters, to_snapshot, to_timestamp,
};
use crate::controller::snapshot::group::{CreateGroupRequest, GroupRecord};
use crate::controller::snapshot::record::{SnapshotRecord, SnapshotState};
use crate::controller::snapshot::{self, Snapshots};
use crate::controller::volume::operations::DeleteOutcome;

/// The GroupController service.
#[derive(Debug, Clone)]
pub struct GroupController {
    snapshots: Arc<Snapshots>,
}

impl GroupController {
    /// The service over the controller's snapshot operations.
    pub fn new(snapshots: Arc<Snapshots>) -> Self {
        Self { snapshots }
    }
}

fn to_group(group: &GroupRecord, members: &[SnapshotRecord]) -> csi::VolumeGroupSnapshot {
    csi::VolumeGroupSnapshot {
        group_snapshot_id: group.group_snapshot_id.clone(),
        snapshots: members
            .iter()
            .map(|m| csi::Snapshot {
                group_snapshot_id: group.group_snapshot_id.clone(),
                ..to_snapshot(m)
            })
            .collect(),
        creation_time: Some(to_timestamp(group.created_at_unix_nanos)),
        ready_to_use: group.state == SnapshotState::Ready
            && members.iter().all(|m| m.state == SnapshotState::Ready),
    }
}

/// Checks that `given` (if any) is exactly the group's members (CSI spec,
/// DeleteVolumeGroupSnapshot and GetVolumeGroupSnapshot: "Snapshot list
/// mismatch", `INVALID_ARGUMENT`).
fn check_members(group: &GroupRecord, given: &[String]) -> Result<(), Status> {
    if given.is_empty() {
        return Ok(());
    }
    let mut given = given.to_vec();
    given.sort();
    let mut members = group.snapshot_ids.clone();
    members.sort();
    if given != members {
        return Err(Status::invalid_argument(format!(
            "snapshot_ids {given:?} are not the members of group snapshot {}: {members:?}",
            group.group_snapshot_id
        )));
    }
    Ok(())
}

#[tonic::async_trait]
impl csi::group_controller_server::GroupController for GroupController {
    #[instrument(skip_all)]
    async fn group_controller_get_capabilities(
        &self,
        _request: Request<csi::GroupControllerGetCapabilitiesRequest>,
    ) -> Result<Response<csi::GroupControllerGetCapabilitiesResponse>, Status> {
        let capability = csi::GroupControllerServiceCapability {
            r#type: Some(csi::group_controller_service_capability::Type::Rpc(
                csi::group_controller_service_capability::Rpc {
                    r#type: RpcType::CreateDeleteGetVolumeGroupSnapshot.into(),
                },
            )),
        };
        Ok(Response::new(csi::GroupControllerGetCapabilitiesResponse {
            capabilities: vec![capability],
        }))
    }

    #[instrument(err, skip_all, fields(group.id = %request.get_ref().name))]
    async fn create_volume_group_snapshot(
        &self,
        request: Request<csi::CreateVolumeGroupSnapshotRequest>,
    ) -> Result<Response<csi::CreateVolumeGroupSnapshotResponse>, Status> {
        let req = request.into_inner();
        if req.name.is_empty() {
            return Err(Status::invalid_argument("name is required"));
        }
        if req.source_volume_ids.is_empty() {
            return Err(Status::invalid_argument("source_volume_ids is required"));
        }
        let class = class_parameters(&req.parameters).map_err(Status::from)?;
        let parameters: BTreeMap<String, String> = req
            .parameters
            .into_iter()
            .filter(|(k, _)| !k.starts_with(SNAPSHOTTER_PREFIX))
            .collect();
        let (group, members) = self
            .snapshots
            .create_group(&CreateGroupRequest {
                name: req.name,
                source_volume_ids: req.source_volume_ids,
                deadline: class.deadline,
                parameters,
                quiesce: class.quiesce,
            })
            .await?;
        Ok(Response::new(csi::CreateVolumeGroupSnapshotResponse {
            group_snapshot: Some(to_group(&group, &members)),
        }))
    }

    #[instrument(err, skip_all, fields(group.id = %request.get_ref().group_snapshot_id))]
    async fn delete_volume_group_snapshot(
        &self,
        request: Request<csi::DeleteVolumeGroupSnapshotRequest>,
    ) -> Result<Response<csi::DeleteVolumeGroupSnapshotResponse>, Status> {
        let req = request.into_inner();
        if req.group_snapshot_id.is_empty() {
            return Err(Status::invalid_argument("group_snapshot_id is required"));
        }
        match self.snapshots.get_group(&req.group_snapshot_id).await {
            Ok((group, _)) => check_members(&group, &req.snapshot_ids)?,
            Err(snapshot::Error::SnapshotNotFound { .. }) => {
                return Ok(Response::new(csi::DeleteVolumeGroupSnapshotResponse {}));
            }
            Err(err) => return Err(err.into()),
        }
        // Pending: copies on down nodes go when they return.
        let _: DeleteOutcome = self.snapshots.delete_group(&req.group_snapshot_id).await?;
        Ok(Response::new(csi::DeleteVolumeGroupSnapshotResponse {}))
    }

    #[instrument(err, skip_all, fields(group.id = %request.get_ref().group_snapshot_id))]
    async fn get_volume_group_snapshot(
        &self,
        request: Request<csi::GetVolumeGroupSnapshotRequest>,
    ) -> Result<Response<csi::GetVolumeGroupSnapshotResponse>, Status> {
        let req = request.into_inner();
        let (group, members) = self.snapshots.get_group(&req.group_snapshot_id).await?;
        if group.state == SnapshotState::Deleting {
            return Err(Status::not_found(format!(
                "Group snapshot {} is being deleted",
                group.group_snapshot_id
            )));
        }
        check_members(&group, &req.snapshot_ids)?;
        Ok(Response::new(csi::GetVolumeGroupSnapshotResponse {
            group_snapshot: Some(to_group(&group, &members)),
        }))
    }
}
