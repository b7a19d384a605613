//! The CSI Controller service (CSI spec, "Controller Service RPC").
//!
//! A thin adapter: it checks each request as the spec demands, converts
//! it, and calls the controller's volume operations in-process
//! ([`Volumes`]), which take the per-volume operation guard (a concurrent
//! operation on the same volume gets `ABORTED`) and keep every decision in
//! the cluster store. Nothing here keeps state.
//!
//! # StorageClass parameters
//!
//! - `replicas`: number of replicas, each on its own node (default 3). Too
//!   few nodes with room is `RESOURCE_EXHAUSTED`, never a silent cap.
//! - `thin`: `"true"` (default) or `"false"`.
//! - `fsType`: `ext4` (default) or `xfs`; returned in `volume_context`.
//! - Keys under `csi.storage.k8s.io/` (added by the external-provisioner)
//!   are ignored; any other key is `INVALID_ARGUMENT`.
//!
//! # Not yet served
//!
//! Snapshots (CREATE_DELETE_SNAPSHOT, LIST_SNAPSHOTS) and
//! ControllerModifyVolume answer `UNIMPLEMENTED` and are not announced in
//! ControllerGetCapabilities; ControllerExpandVolume is offline only; a `volume_content_source` is
//! `INVALID_ARGUMENT` (CSI spec, CreateVolume errors: "Source incompatible
//! or not supported").

use std::collections::HashMap;
use std::sync::Arc;

use ballast_proto::csi;
use ballast_proto::csi::controller_service_capability::rpc::Type as RpcType;
use ballast_proto::csi::volume_capability::AccessType;
use ballast_proto::csi::volume_capability::access_mode::Mode;
use tonic::{Request, Response, Status};
use tracing::instrument;

use super::TOPOLOGY_NODE_KEY;
use crate::controller::volume::operations::{CreateRequest, SIZE_ALIGN_BYTES};
use crate::controller::volume::record::VolumeRecord;
use crate::controller::volume::{self, Volumes};
use crate::node::PUBLISH_CONTEXT_NBD_URI;
use crate::node::mount::FsType;

/// Size of a volume whose request gives no capacity (CSI spec,
/// CreateVolume: "If not specified, the Plugin MAY choose an
/// implementation-defined capacity range").
pub const DEFAULT_SIZE_BYTES: u64 = 1 << 30;

/// Replicas of a volume whose StorageClass does not say.
pub const DEFAULT_REPLICAS: u32 = 3;

/// `volume_context` key of the filesystem type.
pub const CONTEXT_FS_TYPE: &str = "fsType";

/// Prefix of the parameters the external-provisioner adds.
const PROVISIONER_PREFIX: &str = "csi.storage.k8s.io/";

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
    /// A ListVolumes token this plugin did not hand out (CSI spec,
    /// ListVolumes: "Invalid starting_token", `ABORTED`).
    #[error("Invalid starting_token {0:?}")]
    InvalidToken(String),
    /// The RPC is not served yet.
    #[error("{0} is not supported yet")]
    Unimplemented(&'static str),
    /// A volume operation failed.
    #[error(transparent)]
    Volume(#[from] volume::Error),
}

impl From<Error> for Status {
    fn from(err: Error) -> Self {
        match err {
            Error::InvalidArgument(_) => Status::invalid_argument(err.to_string()),
            Error::OutOfRange(_) => Status::out_of_range(err.to_string()),
            Error::InvalidToken(_) => Status::aborted(err.to_string()),
            Error::Unimplemented(_) => Status::unimplemented(err.to_string()),
            Error::Volume(err) => err.into(),
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

/// Checks one volume capability; `Ok(Some(reason))` when it is well formed
/// but not supported. Every Ballast volume is served by one target on one
/// node, so only single-node access modes are supported, with block or
/// mount (ext4, xfs) access.
fn unsupported(cap: &csi::VolumeCapability) -> Result<Option<String>, Error> {
    let mode = cap
        .access_mode
        .as_ref()
        .map(|m| m.mode())
        .filter(|m| *m != Mode::Unknown)
        .ok_or_else(|| invalid("volume_capability.access_mode is required"))?;
    match cap.access_type.as_ref() {
        None => return Err(invalid("volume_capability.access_type is required")),
        Some(AccessType::Block(_)) => {}
        Some(AccessType::Mount(m)) => {
            if !m.fs_type.is_empty() && FsType::parse(&m.fs_type).is_none() {
                return Ok(Some(format!(
                    "filesystem type {:?} is not supported (ext4, xfs)",
                    m.fs_type
                )));
            }
        }
    }
    Ok(match mode {
        Mode::SingleNodeWriter
        | Mode::SingleNodeReaderOnly
        | Mode::SingleNodeSingleWriter
        | Mode::SingleNodeMultiWriter => None,
        other => Some(format!(
            "access mode {} is not supported: a volume is served from one node at a time",
            other.as_str_name()
        )),
    })
}

/// Checks a list of capabilities that must all be supported.
fn supported(caps: &[csi::VolumeCapability], field: &str) -> Result<(), Error> {
    if caps.is_empty() {
        return Err(invalid(format!("{field} is required")));
    }
    for cap in caps {
        if let Some(reason) = unsupported(cap)? {
            return Err(invalid(reason));
        }
    }
    Ok(())
}

/// The size to create for `range` (CSI spec, CapacityRange: at least
/// `required_bytes`, at most `limit_bytes`, either may be 0 for unset),
/// rounded up to [`SIZE_ALIGN_BYTES`].
fn size_for(range: Option<&csi::CapacityRange>) -> Result<u64, Error> {
    let (required, limit) = range.map_or((0, 0), |r| (r.required_bytes, r.limit_bytes));
    let required =
        u64::try_from(required).map_err(|_| invalid("capacity_range.required_bytes < 0"))?;
    let limit = u64::try_from(limit).map_err(|_| invalid("capacity_range.limit_bytes < 0"))?;
    if limit > 0 && required > limit {
        return Err(Error::OutOfRange(format!(
            "required_bytes {required} exceeds limit_bytes {limit}"
        )));
    }
    let size = match (required, limit) {
        (0, 0) => DEFAULT_SIZE_BYTES,
        (0, limit) => DEFAULT_SIZE_BYTES.min(limit - limit % SIZE_ALIGN_BYTES),
        (required, _) => required
            .checked_next_multiple_of(SIZE_ALIGN_BYTES)
            .ok_or_else(|| Error::OutOfRange(format!("required_bytes {required} is too large")))?,
    };
    if size == 0 || (limit > 0 && size > limit) {
        return Err(Error::OutOfRange(format!(
            "no multiple of {SIZE_ALIGN_BYTES} bytes lies within [{required}, {limit}]"
        )));
    }
    if i64::try_from(size).is_err() {
        return Err(Error::OutOfRange(format!("{size} bytes is too large")));
    }
    Ok(size)
}

/// StorageClass parameters, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Parameters {
    replicas: u32,
    thin: bool,
    fs_type: FsType,
}

impl Parameters {
    fn parse(parameters: &HashMap<String, String>) -> Result<Self, Error> {
        let mut parsed = Self {
            replicas: DEFAULT_REPLICAS,
            thin: true,
            fs_type: FsType::DEFAULT,
        };
        for (key, value) in parameters {
            match key.as_str() {
                "replicas" => {
                    parsed.replicas = value.parse().ok().filter(|n| *n >= 1).ok_or_else(|| {
                        invalid(format!(
                            "parameter replicas={value:?} is not a count of at least 1"
                        ))
                    })?;
                }
                "thin" => {
                    parsed.thin = match value.as_str() {
                        "true" => true,
                        "false" => false,
                        _ => {
                            return Err(invalid(format!(
                                "parameter thin={value:?} is not \"true\" or \"false\""
                            )));
                        }
                    };
                }
                "fsType" => {
                    parsed.fs_type = FsType::parse(value).ok_or_else(|| {
                        invalid(format!("parameter fsType={value:?} is not ext4 or xfs"))
                    })?;
                }
                other if other.starts_with(PROVISIONER_PREFIX) => {}
                other => return Err(invalid(format!("unknown parameter {other:?}"))),
            }
        }
        Ok(parsed)
    }
}

/// The node named by the first preferred (else requisite) topology that
/// names one (CSI spec, TopologyRequirement: the plugin SHOULD try the
/// preferred topologies in order).
fn preferred_node(requirement: Option<&csi::TopologyRequirement>) -> Option<String> {
    let requirement = requirement?;
    requirement
        .preferred
        .iter()
        .chain(&requirement.requisite)
        .find_map(|t| t.segments.get(TOPOLOGY_NODE_KEY).cloned())
}

fn i64_bytes(bytes: u64) -> i64 {
    i64::try_from(bytes).unwrap_or(i64::MAX)
}

fn to_volume(record: &VolumeRecord, context: HashMap<String, String>) -> csi::Volume {
    csi::Volume {
        capacity_bytes: i64_bytes(record.size_bytes),
        volume_id: record.volume_id.clone(),
        volume_context: context,
        content_source: None,
        // Any node with an agent can run the volume's target, so the
        // volume is accessible from every node (CSI spec, Volume: an empty
        // accessible_topology means accessible from all nodes).
        accessible_topology: Vec::new(),
    }
}

/// Abnormal while fewer replicas are in sync than the volume asks for
/// (CSI spec, VolumeCondition).
fn condition(record: &VolumeRecord) -> csi::VolumeCondition {
    let in_sync = record.in_sync_count();
    let wanted = usize::try_from(record.replica_count).unwrap_or(usize::MAX);
    if in_sync < wanted {
        csi::VolumeCondition {
            abnormal: true,
            message: format!("{in_sync} of {wanted} replicas are in sync"),
        }
    } else {
        csi::VolumeCondition {
            abnormal: false,
            message: format!("All {wanted} replicas are in sync"),
        }
    }
}

fn published_nodes(record: &VolumeRecord) -> Vec<String> {
    record.target.iter().map(|t| t.node_id.clone()).collect()
}

/// The Controller service.
#[derive(Debug, Clone)]
pub struct Controller {
    volumes: Arc<Volumes>,
}

impl Controller {
    /// The service over the controller's volume operations.
    pub fn new(volumes: Arc<Volumes>) -> Self {
        Self { volumes }
    }

    async fn create(&self, req: &csi::CreateVolumeRequest) -> Result<csi::Volume, Error> {
        required("name", &req.name)?;
        volume::operations::validate_name(&req.name)?;
        supported(&req.volume_capabilities, "volume_capabilities")?;
        if req.volume_content_source.is_some() {
            return Err(invalid(
                "volume_content_source is not supported yet (no snapshots or clones)",
            ));
        }
        let parameters = Parameters::parse(&req.parameters)?;
        let size_bytes = size_for(req.capacity_range.as_ref())?;
        let request = CreateRequest {
            name: req.name.clone(),
            size_bytes,
            replica_count: parameters.replicas,
            thin: parameters.thin,
            preferred_node: preferred_node(req.accessibility_requirements.as_ref()),
        };
        let record = self.volumes.create(&request).await?;
        let context = HashMap::from([(
            CONTEXT_FS_TYPE.to_string(),
            parameters.fs_type.as_str().to_string(),
        )]);
        Ok(to_volume(&record, context))
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
        if let Some(reason) = unsupported(cap)? {
            return Err(invalid(reason));
        }
        // NOT_FOUND for an unknown volume before the node is looked at
        // (CSI spec, ControllerPublishVolume: "Volume does not exist").
        self.volumes.get(&req.volume_id).await?;
        let publication = self
            .volumes
            .publish(&req.volume_id, &req.node_id, false)
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
        // The token is the index of the next entry in id order.
        let start = if req.starting_token.is_empty() {
            0
        } else {
            req.starting_token
                .parse::<usize>()
                .ok()
                .filter(|i| *i <= volumes.len())
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
                volume: Some(to_volume(v, HashMap::new())),
                status: Some(csi::list_volumes_response::VolumeStatus {
                    published_node_ids: published_nodes(v),
                    volume_condition: Some(condition(v)),
                }),
            })
            .collect();
        let next_token = if end < volumes.len() {
            end.to_string()
        } else {
            String::new()
        };
        Ok(csi::ListVolumesResponse {
            entries,
            next_token,
        })
    }

    /// The largest volume that fits now: each replica needs its own node,
    /// so it is the `replicas`-th largest headroom among up nodes (a
    /// node's headroom is that of its roomiest pool).
    async fn capacity(&self, req: &csi::GetCapacityRequest) -> Result<u64, Error> {
        for cap in &req.volume_capabilities {
            if unsupported(cap)?.is_some() {
                return Ok(0);
            }
        }
        let parameters = Parameters::parse(&req.parameters)?;
        let wanted_node = req
            .accessible_topology
            .as_ref()
            .and_then(|t| t.segments.get(TOPOLOGY_NODE_KEY));
        let mut headrooms: Vec<u64> = Vec::new();
        let mut on_wanted = None;
        for candidate in self.volumes.candidates().await? {
            if !candidate.up {
                continue;
            }
            let headroom = candidate
                .pools
                .iter()
                .map(|p| {
                    if parameters.thin {
                        p.headroom_bytes()
                    } else {
                        p.headroom_bytes().min(p.free_bytes)
                    }
                })
                .max()
                .unwrap_or(0);
            if wanted_node == Some(&candidate.node_id) {
                on_wanted = Some(headroom);
            }
            headrooms.push(headroom);
        }
        headrooms.sort_unstable_by(|a, b| b.cmp(a));
        let index = usize::try_from(parameters.replicas.saturating_sub(1)).unwrap_or(usize::MAX);
        let mut capacity = headrooms.get(index).copied().unwrap_or(0);
        if wanted_node.is_some() {
            // One replica must sit on the wanted node.
            capacity = capacity.min(on_wanted.unwrap_or(0));
        }
        Ok(capacity - capacity % SIZE_ALIGN_BYTES)
    }
}

fn capability(kind: RpcType) -> csi::ControllerServiceCapability {
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
    /// capability is supported; otherwise a `message` says why.
    #[instrument(err, skip_all, fields(volume.id = %request.get_ref().volume_id))]
    async fn validate_volume_capabilities(
        &self,
        request: Request<csi::ValidateVolumeCapabilitiesRequest>,
    ) -> Result<Response<csi::ValidateVolumeCapabilitiesResponse>, Status> {
        let req = request.get_ref();
        required("volume_id", &req.volume_id)?;
        if req.volume_capabilities.is_empty() {
            return Err(invalid("volume_capabilities is required").into());
        }
        let mut reasons = Vec::new();
        for cap in &req.volume_capabilities {
            if let Some(reason) = unsupported(cap)? {
                reasons.push(reason);
            }
        }
        self.volumes
            .get(&req.volume_id)
            .await
            .map_err(Error::from)?;
        if let Err(err) = Parameters::parse(&req.parameters) {
            reasons.push(err.to_string());
        }
        let response = if reasons.is_empty() {
            csi::ValidateVolumeCapabilitiesResponse {
                confirmed: Some(csi::validate_volume_capabilities_response::Confirmed {
                    volume_context: req.volume_context.clone(),
                    volume_capabilities: req.volume_capabilities.clone(),
                    parameters: req.parameters.clone(),
                    mutable_parameters: req.mutable_parameters.clone(),
                }),
                message: String::new(),
            }
        } else {
            csi::ValidateVolumeCapabilitiesResponse {
                confirmed: None,
                message: reasons.join("; "),
            }
        };
        Ok(Response::new(response))
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
        let capacity = i64_bytes(self.capacity(request.get_ref()).await?);
        Ok(Response::new(csi::GetCapacityResponse {
            available_capacity: capacity,
            maximum_volume_size: Some(capacity),
            minimum_volume_size: Some(i64_bytes(SIZE_ALIGN_BYTES)),
        }))
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
        ]
        .into_iter()
        .map(capability)
        .collect();
        Ok(Response::new(csi::ControllerGetCapabilitiesResponse {
            capabilities,
        }))
    }

    #[instrument(err, skip_all)]
    async fn create_snapshot(
        &self,
        _request: Request<csi::CreateSnapshotRequest>,
    ) -> Result<Response<csi::CreateSnapshotResponse>, Status> {
        Err(Error::Unimplemented("CreateSnapshot").into())
    }

    #[instrument(err, skip_all)]
    async fn delete_snapshot(
        &self,
        _request: Request<csi::DeleteSnapshotRequest>,
    ) -> Result<Response<csi::DeleteSnapshotResponse>, Status> {
        Err(Error::Unimplemented("DeleteSnapshot").into())
    }

    #[instrument(err, skip_all)]
    async fn list_snapshots(
        &self,
        _request: Request<csi::ListSnapshotsRequest>,
    ) -> Result<Response<csi::ListSnapshotsResponse>, Status> {
        Err(Error::Unimplemented("ListSnapshots").into())
    }

    #[instrument(err, skip_all)]
    async fn get_snapshot(
        &self,
        _request: Request<csi::GetSnapshotRequest>,
    ) -> Result<Response<csi::GetSnapshotResponse>, Status> {
        Err(Error::Unimplemented("GetSnapshot").into())
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
        let size = size_for(Some(range))?;
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
            volume: Some(to_volume(&record, HashMap::new())),
            status: Some(csi::controller_get_volume_response::VolumeStatus {
                published_node_ids: published_nodes(&record),
                volume_condition: Some(condition(&record)),
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
