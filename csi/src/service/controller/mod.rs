//! The CSI Controller service (CSI spec, "Controller Service RPC").
//!
//! A thin adapter: it checks each request as the spec demands, converts
//! it, and calls the controller's volume operations in-process
//! ([`Volumes`]), which take the per-volume operation guard (a concurrent
//! operation on the same volume gets `ABORTED`), decide idempotency from
//! the record, and keep every decision in the cluster store. Nothing here
//! keeps state.
//!
//! - [`capability`]: which volume capabilities are served.
//! - [`parameters`]: StorageClass parameters, capacity ranges, topology
//!   requirements.
//!
//! # What a volume remembers
//!
//! CreateVolume records the capabilities (access mode, and block or mount
//! with the filesystem), the StorageClass parameters and the requisite
//! topology in the volume record. A repeated CreateVolume that the volume
//! does not satisfy is `ALREADY_EXISTS`; ValidateVolumeCapabilities
//! confirms only capabilities of an access type the volume was created
//! for; ControllerPublishVolume records the capability it published with,
//! and a repeat on the same node with another one is `ALREADY_EXISTS`.
//!
//! # Topology
//!
//! Every node is its own segment `topology.ballast.io/node=<id>` (agents
//! may add more labels, such as a zone, which segments can also name).
//! Requisite segments limit every replica, also later replacements;
//! preferred segments are tried in order for one replica (data locality
//! under WaitForFirstConsumer). A volume's `accessible_topology` is empty,
//! which the spec defines as accessible from every node: any node with an
//! agent can run its target, including nodes that join later, which a
//! list of today's nodes would shut out.
//!
//! # Snapshots, restores and clones
//!
//! [`snapshot`] serves CREATE_DELETE_SNAPSHOT, LIST_SNAPSHOTS and
//! GET_SNAPSHOT. CreateVolume takes a `volume_content_source` (a snapshot,
//! or a volume: CLONE_VOLUME): an unknown source is `NOT_FOUND`, a source
//! larger than `capacity_range.limit_bytes` is `OUT_OF_RANGE`, a request
//! without a capacity gets the source's size, and a larger one grows it.
//! The same name with another source is `ALREADY_EXISTS`.
//!
//! # Not yet served
//!
//! ControllerModifyVolume answers `UNIMPLEMENTED` and is not announced in
//! ControllerGetCapabilities; ControllerExpandVolume is offline only;
//! `readonly` publishing
//! (PUBLISH_READONLY) is `INVALID_ARGUMENT`: a target cannot refuse writes,
//! so read-only access is a read-only mount by NodePublishVolume.

mod capability;
mod parameters;
pub(crate) mod snapshot;

use std::collections::HashMap;
use std::sync::Arc;

use ballast_proto::csi;
use ballast_proto::csi::controller_service_capability::rpc::Type as RpcType;
use ballast_proto::csi::volume_capability::AccessType;
use tonic::{Request, Response, Status};
use tracing::instrument;

use self::parameters::Requirement;
pub use self::parameters::{DEFAULT_REPLICAS, DEFAULT_SIZE_BYTES, Parameters};
pub use self::snapshot::{ClassParameters, class_parameters as snapshot_class_parameters};
use crate::controller::node::Topology;
use crate::controller::snapshot::Snapshots;
use crate::controller::volume::operations::{CreateRequest, SIZE_ALIGN_BYTES, Source};
use crate::controller::volume::record::{ContentSource, VolumeRecord};
use crate::controller::volume::scheduling;
use crate::controller::volume::{self, Volumes};
use crate::node::PUBLISH_CONTEXT_NBD_URI;
use crate::node::mount::FsType;

/// `volume_context` key of the filesystem type.
pub const CONTEXT_FS_TYPE: &str = "fsType";

/// Errors of the Controller service's own checks; the volume operations'
/// errors pass through [`Error::Volume`].
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A REQUIRED field is missing or a field is malformed.
    #[error("Invalid argument: {0}")]
    InvalidArgument(String),
    /// The capacity range cannot be met (CSI spec, CreateVolume:
    /// "Unsupported capacity", `OUT_OF_RANGE`).
    #[error("Unsupported capacity: {0}")]
    OutOfRange(String),
    /// A ListVolumes token that names no volume (CSI spec, ListVolumes:
    /// "Invalid starting_token", `ABORTED`).
    #[error("Invalid starting_token {0:?}: no such volume; list again from the start")]
    InvalidToken(String),
    /// The RPC is not served yet.
    #[error("{0} is not supported yet")]
    Unimplemented(&'static str),
    /// A volume operation failed.
    #[error(transparent)]
    Volume(#[from] volume::Error),
    /// A snapshot operation failed.
    #[error(transparent)]
    Snapshot(#[from] crate::controller::snapshot::Error),
}

impl From<Error> for Status {
    fn from(err: Error) -> Self {
        match err {
            Error::InvalidArgument(_) => Status::invalid_argument(err.to_string()),
            Error::OutOfRange(_) => Status::out_of_range(err.to_string()),
            Error::InvalidToken(_) => Status::aborted(err.to_string()),
            Error::Unimplemented(_) => Status::unimplemented(err.to_string()),
            Error::Volume(err) => err.into(),
            Error::Snapshot(err) => err.into(),
        }
    }
}

fn invalid(reason: impl Into<String>) -> Error {
    Error::InvalidArgument(reason.into())
}

fn required(field: &str, value: &str) -> Result<(), Error> {
    if value.is_empty() {
        return Err(invalid(format!("{field} is required")));
    }
    Ok(())
}

fn i64_bytes(bytes: u64) -> i64 {
    i64::try_from(bytes).unwrap_or(i64::MAX)
}

/// The volume's `volume_context`: the same for every call, from the
/// record (CSI spec, Volume: "A volume uniquely identified by volume_id
/// SHALL always report the same volume_context").
fn context(record: &VolumeRecord) -> HashMap<String, String> {
    record
        .fs_type()
        .map(|fs| HashMap::from([(CONTEXT_FS_TYPE.to_string(), fs.to_string())]))
        .unwrap_or_default()
}

fn to_volume(record: &VolumeRecord) -> csi::Volume {
    csi::Volume {
        capacity_bytes: i64_bytes(record.size_bytes),
        volume_id: record.volume_id.clone(),
        volume_context: context(record),
        content_source: record.content_source.as_ref().map(content_source),
        // Empty: accessible from every node (see the module docs).
        accessible_topology: Vec::new(),
    }
}

/// The source CreateVolume was given, as CSI spells it.
fn content_source(source: &ContentSource) -> csi::VolumeContentSource {
    use csi::volume_content_source::{SnapshotSource, Type, VolumeSource};
    let r#type = match &source.volume_id {
        Some(volume_id) => Type::Volume(VolumeSource {
            volume_id: volume_id.clone(),
        }),
        None => Type::Snapshot(SnapshotSource {
            snapshot_id: source.snapshot_id.clone(),
        }),
    };
    csi::VolumeContentSource {
        r#type: Some(r#type),
    }
}

/// The filesystem a mount of `record` without an `fs_type` gets.
fn volume_fs(record: &VolumeRecord) -> &str {
    record.fs_type().unwrap_or(FsType::DEFAULT.as_str())
}

fn published_nodes(record: &VolumeRecord) -> Vec<String> {
    record.target.iter().map(|t| t.node_id.clone()).collect()
}

/// The Controller service.
#[derive(Debug, Clone)]
pub struct Controller {
    volumes: Arc<Volumes>,
    snapshots: Arc<Snapshots>,
}

impl Controller {
    /// The service over the controller's volume and snapshot operations.
    pub fn new(volumes: Arc<Volumes>, snapshots: Arc<Snapshots>) -> Self {
        Self { volumes, snapshots }
    }

    fn condition(&self, record: &VolumeRecord) -> csi::VolumeCondition {
        let condition = self.volumes.condition(record);
        csi::VolumeCondition {
            abnormal: condition.abnormal,
            message: condition.message,
        }
    }

    async fn create(&self, req: &csi::CreateVolumeRequest) -> Result<csi::Volume, Error> {
        required("name", &req.name)?;
        volume::operations::validate_name(&req.name)?;
        if req.volume_capabilities.is_empty() {
            return Err(invalid("volume_capabilities is required"));
        }
        let source = match req.volume_content_source.as_ref().map(|s| &s.r#type) {
            None => None,
            Some(Some(csi::volume_content_source::Type::Snapshot(s))) => {
                required("volume_content_source.snapshot.snapshot_id", &s.snapshot_id)?;
                Some(Source::Snapshot(s.snapshot_id.clone()))
            }
            Some(Some(csi::volume_content_source::Type::Volume(v))) => {
                required("volume_content_source.volume.volume_id", &v.volume_id)?;
                Some(Source::Volume(v.volume_id.clone()))
            }
            Some(None) => return Err(invalid("volume_content_source has no type")),
        };
        if !req.mutable_parameters.is_empty() {
            return Err(invalid(
                "mutable_parameters are not supported (no MODIFY_VOLUME capability)",
            ));
        }
        let parameters = Parameters::parse(&req.parameters)?;
        let fs_type = capability::fs_type_for_create(&req.volume_capabilities, parameters.fs_type)?;
        let capabilities = req
            .volume_capabilities
            .iter()
            .map(|c| capability::supported(c, &fs_type))
            .collect::<Result<Vec<_>, _>>()?;
        let topology = Requirement::parse(req.accessibility_requirements.as_ref())?;
        // A restore without a capacity takes the source's size.
        let size_bytes = match (&source, &req.capacity_range) {
            (Some(_), None) => 0,
            _ => parameters::size_for(req.capacity_range.as_ref())?,
        };
        let request = CreateRequest {
            compatible_sizes: parameters::sizes_within(req.capacity_range.as_ref())?,
            preferred_topology: topology.preferred,
            requisite_topology: topology.requisite,
            capabilities,
            parameters: parameters::to_keep(&req.parameters),
            source,
            ..CreateRequest::new(&req.name, size_bytes, parameters.replicas, parameters.thin)
        };
        let record = self.volumes.create(&request).await?;
        Ok(to_volume(&record))
    }

    async fn publish(
        &self,
        req: &csi::ControllerPublishVolumeRequest,
    ) -> Result<HashMap<String, String>, Error> {
        required("volume_id", &req.volume_id)?;
        required("node_id", &req.node_id)?;
        let cap = req
            .volume_capability
            .as_ref()
            .ok_or_else(|| invalid("volume_capability is required"))?;
        if req.readonly {
            return Err(invalid(
                "readonly is not supported (no PUBLISH_READONLY capability): a target cannot refuse writes; publish read-write and mount read-only with NodePublishVolume",
            ));
        }
        // NOT_FOUND for an unknown volume before the node is looked at
        // (CSI spec, ControllerPublishVolume: "Volume does not exist").
        let record = self.volumes.get(&req.volume_id).await?;
        let capability = capability::supported(cap, volume_fs(&record))?;
        let publication = self
            .volumes
            .publish_with(&req.volume_id, &req.node_id, &capability)
            .await?;
        Ok(HashMap::from([(
            PUBLISH_CONTEXT_NBD_URI.to_string(),
            publication.nbd_uri,
        )]))
    }

    async fn unpublish(&self, req: &csi::ControllerUnpublishVolumeRequest) -> Result<(), Error> {
        required("volume_id", &req.volume_id)?;
        // CSI spec, ControllerUnpublishVolume: a volume or node the plugin
        // does not know, or a volume not published on that node, is
        // already unpublished: 0 OK.
        let node = Some(req.node_id.as_str()).filter(|n| !n.is_empty());
        match self.volumes.unpublish_from(&req.volume_id, node).await {
            Ok(()) | Err(volume::Error::VolumeNotFound { .. }) => Ok(()),
            Err(err) => Err(err.into()),
        }
    }

    /// Confirms `req` if every capability, and the context and
    /// parameters it gives, fit the volume; else says why not.
    async fn validate(
        &self,
        req: &csi::ValidateVolumeCapabilitiesRequest,
    ) -> Result<csi::ValidateVolumeCapabilitiesResponse, Error> {
        required("volume_id", &req.volume_id)?;
        if req.volume_capabilities.is_empty() {
            return Err(invalid("volume_capabilities is required"));
        }
        let record = self.volumes.get(&req.volume_id).await?;
        let mut reasons = Vec::new();
        for cap in &req.volume_capabilities {
            let resolved = capability::resolve(cap, volume_fs(&record))?;
            reasons.extend(capability::unsupported(&resolved));
            reasons.extend(record.supports(&resolved).err());
        }
        reasons.extend(parameters::differences(&req.parameters, &record));
        if !req.mutable_parameters.is_empty() {
            reasons.push("mutable_parameters are not supported".to_string());
        }
        // A volume created before records kept capabilities has no
        // known context to compare with.
        let context = context(&record);
        if !req.volume_context.is_empty()
            && !record.capabilities.is_empty()
            && req.volume_context != context
        {
            reasons.push(format!(
                "volume_context {:?} is not the volume's {context:?}",
                req.volume_context
            ));
        }
        if !reasons.is_empty() {
            return Ok(csi::ValidateVolumeCapabilitiesResponse {
                confirmed: None,
                message: reasons.join("; "),
            });
        }
        Ok(csi::ValidateVolumeCapabilitiesResponse {
            confirmed: Some(csi::validate_volume_capabilities_response::Confirmed {
                volume_context: req.volume_context.clone(),
                volume_capabilities: req.volume_capabilities.clone(),
                parameters: req.parameters.clone(),
                mutable_parameters: HashMap::new(),
            }),
            message: String::new(),
        })
    }

    /// Ready volumes in id order. A page's `next_token` is the id of the
    /// next volume, so volumes created or deleted between pages shift
    /// nothing; a token naming no volume (deleted since, or never handed
    /// out) is `ABORTED` and the caller starts again.
    async fn list(&self, req: &csi::ListVolumesRequest) -> Result<csi::ListVolumesResponse, Error> {
        let max = usize::try_from(req.max_entries)
            .map_err(|_| invalid("max_entries must not be negative"))?;
        let volumes: Vec<VolumeRecord> = self
            .volumes
            .list()
            .await?
            .into_iter()
            .filter(|v| v.state == volume::record::VolumeState::Ready)
            .collect();
        let start = if req.starting_token.is_empty() {
            0
        } else {
            volumes
                .iter()
                .position(|v| v.volume_id == req.starting_token)
                .ok_or_else(|| Error::InvalidToken(req.starting_token.clone()))?
        };
        let end = if max == 0 {
            volumes.len()
        } else {
            start.saturating_add(max).min(volumes.len())
        };
        let entries = volumes
            .get(start..end)
            .unwrap_or_default()
            .iter()
            .map(|v| csi::list_volumes_response::Entry {
                volume: Some(to_volume(v)),
                status: Some(csi::list_volumes_response::VolumeStatus {
                    published_node_ids: published_nodes(v),
                    volume_condition: Some(self.condition(v)),
                }),
            })
            .collect();
        let next_token = volumes
            .get(end)
            .map(|v| v.volume_id.clone())
            .unwrap_or_default();
        Ok(csi::ListVolumesResponse {
            entries,
            next_token,
        })
    }

    /// See [`scheduling::capacity`]: in a topology segment, the room of
    /// its nodes; without one, the cluster's room divided by the replica
    /// count. Capabilities Ballast cannot serve have no capacity.
    async fn capacity(
        &self,
        req: &csi::GetCapacityRequest,
    ) -> Result<csi::GetCapacityResponse, Error> {
        let parameters = Parameters::parse(&req.parameters)?;
        let fs_type = parameters.fs_type.unwrap_or(FsType::DEFAULT);
        let mut servable = true;
        for cap in &req.volume_capabilities {
            let resolved = capability::resolve(cap, fs_type.as_str())?;
            servable &= capability::unsupported(&resolved).is_none();
        }
        let segment: Option<Topology> = req
            .accessible_topology
            .as_ref()
            .filter(|t| !t.segments.is_empty())
            .map(|t| {
                t.segments
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect()
            });
        let replicas = usize::try_from(parameters.replicas).unwrap_or(usize::MAX);
        let capacity = if servable {
            scheduling::capacity(
                &self.volumes.candidates().await?,
                segment.as_ref(),
                replicas,
                parameters.thin,
                SIZE_ALIGN_BYTES,
            )
        } else {
            scheduling::Capacity {
                available_bytes: 0,
                largest_volume_bytes: 0,
            }
        };
        Ok(csi::GetCapacityResponse {
            available_capacity: i64_bytes(capacity.available_bytes),
            maximum_volume_size: Some(i64_bytes(capacity.largest_volume_bytes)),
            minimum_volume_size: Some(i64_bytes(SIZE_ALIGN_BYTES)),
        })
    }
}

fn rpc_capability(kind: RpcType) -> csi::ControllerServiceCapability {
    csi::ControllerServiceCapability {
        r#type: Some(csi::controller_service_capability::Type::Rpc(
            csi::controller_service_capability::Rpc {
                r#type: kind.into(),
            },
        )),
    }
}

#[tonic::async_trait]
impl csi::controller_server::Controller for Controller {
    #[instrument(err, skip_all, fields(volume.id = %request.get_ref().name))]
    async fn create_volume(
        &self,
        request: Request<csi::CreateVolumeRequest>,
    ) -> Result<Response<csi::CreateVolumeResponse>, Status> {
        let volume = self.create(request.get_ref()).await?;
        Ok(Response::new(csi::CreateVolumeResponse {
            volume: Some(volume),
        }))
    }

    /// CSI spec, DeleteVolume: a volume that does not exist is deleted
    /// (0 OK); a published one is `FAILED_PRECONDITION` ("Volume in use").
    #[instrument(err, skip_all, fields(volume.id = %request.get_ref().volume_id))]
    async fn delete_volume(
        &self,
        request: Request<csi::DeleteVolumeRequest>,
    ) -> Result<Response<csi::DeleteVolumeResponse>, Status> {
        let req = request.get_ref();
        required("volume_id", &req.volume_id)?;
        match self.volumes.delete(&req.volume_id).await {
            // Pending: replicas on down nodes are destroyed by the
            // reconciler; the volume is gone for CSI.
            Ok(_) | Err(volume::Error::VolumeNotFound { .. }) => {}
            Err(err) => return Err(Error::from(err).into()),
        }
        Ok(Response::new(csi::DeleteVolumeResponse {}))
    }

    #[instrument(err, skip_all, fields(volume.id = %request.get_ref().volume_id, node.id = %request.get_ref().node_id))]
    async fn controller_publish_volume(
        &self,
        request: Request<csi::ControllerPublishVolumeRequest>,
    ) -> Result<Response<csi::ControllerPublishVolumeResponse>, Status> {
        let publish_context = self.publish(request.get_ref()).await?;
        Ok(Response::new(csi::ControllerPublishVolumeResponse {
            publish_context,
        }))
    }

    #[instrument(err, skip_all, fields(volume.id = %request.get_ref().volume_id, node.id = %request.get_ref().node_id))]
    async fn controller_unpublish_volume(
        &self,
        request: Request<csi::ControllerUnpublishVolumeRequest>,
    ) -> Result<Response<csi::ControllerUnpublishVolumeResponse>, Status> {
        self.unpublish(request.get_ref()).await?;
        Ok(Response::new(csi::ControllerUnpublishVolumeResponse {}))
    }

    /// CSI spec, ValidateVolumeCapabilities: `confirmed` only if every
    /// capability, and the context and parameters given, fit the volume;
    /// otherwise a `message` says why.
    #[instrument(err, skip_all, fields(volume.id = %request.get_ref().volume_id))]
    async fn validate_volume_capabilities(
        &self,
        request: Request<csi::ValidateVolumeCapabilitiesRequest>,
    ) -> Result<Response<csi::ValidateVolumeCapabilitiesResponse>, Status> {
        Ok(Response::new(self.validate(request.get_ref()).await?))
    }

    #[instrument(err, skip_all)]
    async fn list_volumes(
        &self,
        request: Request<csi::ListVolumesRequest>,
    ) -> Result<Response<csi::ListVolumesResponse>, Status> {
        Ok(Response::new(self.list(request.get_ref()).await?))
    }

    #[instrument(err, skip_all)]
    async fn get_capacity(
        &self,
        request: Request<csi::GetCapacityRequest>,
    ) -> Result<Response<csi::GetCapacityResponse>, Status> {
        Ok(Response::new(self.capacity(request.get_ref()).await?))
    }

    #[instrument(err, skip_all)]
    async fn controller_get_capabilities(
        &self,
        _request: Request<csi::ControllerGetCapabilitiesRequest>,
    ) -> Result<Response<csi::ControllerGetCapabilitiesResponse>, Status> {
        let capabilities = [
            RpcType::CreateDeleteVolume,
            RpcType::PublishUnpublishVolume,
            RpcType::ListVolumes,
            RpcType::GetCapacity,
            RpcType::ListVolumesPublishedNodes,
            RpcType::VolumeCondition,
            RpcType::GetVolume,
            RpcType::SingleNodeMultiWriter,
            RpcType::ExpandVolume,
            RpcType::CreateDeleteSnapshot,
            RpcType::ListSnapshots,
            RpcType::GetSnapshot,
            RpcType::CloneVolume,
        ]
        .into_iter()
        .map(rpc_capability)
        .collect();
        Ok(Response::new(csi::ControllerGetCapabilitiesResponse {
            capabilities,
        }))
    }

    #[instrument(err, skip_all, fields(snapshot.id = %request.get_ref().name, volume.id = %request.get_ref().source_volume_id))]
    async fn create_snapshot(
        &self,
        request: Request<csi::CreateSnapshotRequest>,
    ) -> Result<Response<csi::CreateSnapshotResponse>, Status> {
        let snapshot = self.create_snapshot_rpc(request.get_ref()).await?;
        Ok(Response::new(csi::CreateSnapshotResponse {
            snapshot: Some(snapshot),
        }))
    }

    #[instrument(err, skip_all, fields(snapshot.id = %request.get_ref().snapshot_id))]
    async fn delete_snapshot(
        &self,
        request: Request<csi::DeleteSnapshotRequest>,
    ) -> Result<Response<csi::DeleteSnapshotResponse>, Status> {
        self.delete_snapshot_rpc(request.get_ref()).await?;
        Ok(Response::new(csi::DeleteSnapshotResponse {}))
    }

    #[instrument(err, skip_all)]
    async fn list_snapshots(
        &self,
        request: Request<csi::ListSnapshotsRequest>,
    ) -> Result<Response<csi::ListSnapshotsResponse>, Status> {
        Ok(Response::new(
            self.list_snapshots_rpc(request.get_ref()).await?,
        ))
    }

    #[instrument(err, skip_all, fields(snapshot.id = %request.get_ref().snapshot_id))]
    async fn get_snapshot(
        &self,
        request: Request<csi::GetSnapshotRequest>,
    ) -> Result<Response<csi::GetSnapshotResponse>, Status> {
        let snapshot = self.get_snapshot_rpc(request.get_ref()).await?;
        Ok(Response::new(csi::GetSnapshotResponse {
            snapshot: Some(snapshot),
        }))
    }

    /// CSI spec, ControllerExpandVolume: offline only (a published volume
    /// is `FAILED_PRECONDITION`, "Volume in use"); a volume already at
    /// least that large succeeds unchanged; above `limit_bytes` is
    /// `OUT_OF_RANGE`. A mounted filesystem then needs NodeExpandVolume.
    #[instrument(err, skip_all, fields(volume.id = %request.get_ref().volume_id))]
    async fn controller_expand_volume(
        &self,
        request: Request<csi::ControllerExpandVolumeRequest>,
    ) -> Result<Response<csi::ControllerExpandVolumeResponse>, Status> {
        let req = request.get_ref();
        required("volume_id", &req.volume_id)?;
        let range = req
            .capacity_range
            .as_ref()
            .ok_or_else(|| invalid("capacity_range is required"))?;
        if range.required_bytes <= 0 {
            return Err(invalid("capacity_range.required_bytes is required").into());
        }
        let size = parameters::size_for(Some(range))?;
        let grown = self
            .volumes
            .expand(&req.volume_id, size)
            .await
            .map_err(Error::from)?;
        if range.limit_bytes > 0 && i64_bytes(grown) > range.limit_bytes {
            return Err(Error::OutOfRange(format!(
                "the volume is already {grown} bytes, above limit_bytes {}",
                range.limit_bytes
            ))
            .into());
        }
        let node_expansion_required = !matches!(
            req.volume_capability
                .as_ref()
                .and_then(|c| c.access_type.as_ref()),
            Some(AccessType::Block(_))
        );
        Ok(Response::new(csi::ControllerExpandVolumeResponse {
            capacity_bytes: i64_bytes(grown),
            node_expansion_required,
        }))
    }

    #[instrument(err, skip_all, fields(volume.id = %request.get_ref().volume_id))]
    async fn controller_get_volume(
        &self,
        request: Request<csi::ControllerGetVolumeRequest>,
    ) -> Result<Response<csi::ControllerGetVolumeResponse>, Status> {
        let req = request.get_ref();
        required("volume_id", &req.volume_id)?;
        let record = self
            .volumes
            .get(&req.volume_id)
            .await
            .map_err(Error::from)?;
        Ok(Response::new(csi::ControllerGetVolumeResponse {
            volume: Some(to_volume(&record)),
            status: Some(csi::controller_get_volume_response::VolumeStatus {
                published_node_ids: published_nodes(&record),
                volume_condition: Some(self.condition(&record)),
            }),
        }))
    }

    #[instrument(err, skip_all)]
    async fn controller_modify_volume(
        &self,
        _request: Request<csi::ControllerModifyVolumeRequest>,
    ) -> Result<Response<csi::ControllerModifyVolumeResponse>, Status> {
        Err(Error::Unimplemented("ControllerModifyVolume").into())
    }
}

#[cfg(test)]
mod tests;
