//! The CSI Node service (CSI spec, "Node Service RPC").
//!
//! A thin adapter over [`crate::node::staging`], which holds the stage and
//! publish logic with the spec's idempotency and error rules. This layer
//! converts requests, takes the per-volume guard (a second concurrent call
//! for the same volume gets `ABORTED`, CSI spec, "Concurrency": "the
//! Plugin SHOULD handle this as gracefully as possible ... MAY return
//! ABORTED"), and answers NodeGetInfo and NodeGetCapabilities.
//!
//! The node id given with `--node-id` must be the node's agent id: the
//! controller starts the volume's target on the agent of that id when
//! ControllerPublishVolume names it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ballast_proto::csi;
use ballast_proto::csi::node_service_capability::rpc::Type as RpcType;
use tonic::{Request, Response, Status};
use tracing::instrument;

use super::TOPOLOGY_NODE_KEY;
use super::controller::CONTEXT_FS_TYPE;
use crate::node::PUBLISH_CONTEXT_NBD_URI;
use crate::node::attach::Attacher;
use crate::node::mount::{FsType, Mounter};
use crate::node::staging::{self, Access, Capability, PublishRequest, StageRequest};
use ballast_storage_node::guard::{OpGuard, OpGuards};

/// Errors of the Node service's own checks; the staging logic's errors
/// pass through [`Error::Staging`].
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A field is malformed.
    #[error("Invalid argument: {0}")]
    InvalidArgument(String),
    /// Another operation on the volume is in progress on this node.
    #[error("Another operation on volume {0} is in progress on this node; retry later")]
    Busy(String),
    /// The stage and publish logic failed.
    #[error(transparent)]
    Staging(#[from] staging::Error),
}

impl From<Error> for Status {
    fn from(err: Error) -> Self {
        match err {
            Error::InvalidArgument(_) => Status::invalid_argument(err.to_string()),
            Error::Busy(_) => Status::aborted(err.to_string()),
            Error::Staging(err) => err.into(),
        }
    }
}

/// Settings of a node plugin.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// This node's id (its agent's id).
    pub node_id: String,
    /// Most volumes this node may have published at once (0: no limit).
    pub max_volumes: i64,
    /// Topology labels of this node besides `topology.ballast.io/node`
    /// (e.g. `topology.kubernetes.io/zone`), as the agent registers them.
    pub topology: HashMap<String, String>,
}

/// The Node service.
#[derive(Clone)]
pub struct Node {
    config: NodeConfig,
    attacher: Arc<dyn Attacher>,
    mounter: Arc<dyn Mounter>,
    guards: OpGuards,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("config", &self.config)
            .field("attacher", &self.attacher.name())
            .finish_non_exhaustive()
    }
}

impl Node {
    /// The service over an attacher and a mounter.
    pub fn new(config: NodeConfig, attacher: Arc<dyn Attacher>, mounter: Arc<dyn Mounter>) -> Self {
        Self {
            config,
            attacher,
            mounter,
            guards: OpGuards::default(),
        }
    }

    fn guard(&self, volume_id: &str) -> Result<OpGuard, Error> {
        if volume_id.is_empty() {
            return Err(staging::Error::MissingField("volume_id").into());
        }
        self.guards
            .try_acquire(volume_id)
            .ok_or_else(|| Error::Busy(volume_id.to_string()))
    }
}

/// The capability of a stage or publish request. A mount capability
/// without fs_type takes the StorageClass's `fsType` from the volume
/// context (set by CreateVolume).
fn capability(
    cap: Option<&csi::VolumeCapability>,
    context: &HashMap<String, String>,
) -> Result<Capability, Error> {
    let mut capability = staging::capability(cap)?;
    if let Access::Mount { fs_type, .. } = &mut capability.access
        && fs_type.is_none()
        && let Some(name) = context.get(CONTEXT_FS_TYPE)
    {
        *fs_type = Some(FsType::parse(name).ok_or_else(|| {
            Error::InvalidArgument(format!(
                "volume_context {CONTEXT_FS_TYPE}={name:?} is not ext4 or xfs"
            ))
        })?);
    }
    Ok(capability)
}

fn rpc(kind: RpcType) -> csi::NodeServiceCapability {
    csi::NodeServiceCapability {
        r#type: Some(csi::node_service_capability::Type::Rpc(
            csi::node_service_capability::Rpc {
                r#type: kind.into(),
            },
        )),
    }
}

fn i64_bytes(bytes: u64) -> i64 {
    i64::try_from(bytes).unwrap_or(i64::MAX)
}

#[tonic::async_trait]
impl csi::node_server::Node for Node {
    /// CSI spec, NodeStageVolume: the NBD URI comes from the
    /// `publish_context` ControllerPublishVolume returned.
    #[instrument(err, skip_all, fields(volume.id = %request.get_ref().volume_id))]
    async fn node_stage_volume(
        &self,
        request: Request<csi::NodeStageVolumeRequest>,
    ) -> Result<Response<csi::NodeStageVolumeResponse>, Status> {
        let req = request.get_ref();
        let capability = capability(req.volume_capability.as_ref(), &req.volume_context)?;
        let uri = req
            .publish_context
            .get(PUBLISH_CONTEXT_NBD_URI)
            .cloned()
            .unwrap_or_default();
        let _guard = self.guard(&req.volume_id)?;
        staging::stage(
            self.attacher.as_ref(),
            self.mounter.as_ref(),
            &StageRequest {
                volume_id: req.volume_id.clone(),
                uri,
                staging_path: PathBuf::from(&req.staging_target_path),
                capability,
            },
        )
        .await
        .map_err(Error::from)?;
        Ok(Response::new(csi::NodeStageVolumeResponse {}))
    }

    #[instrument(err, skip_all, fields(volume.id = %request.get_ref().volume_id))]
    async fn node_unstage_volume(
        &self,
        request: Request<csi::NodeUnstageVolumeRequest>,
    ) -> Result<Response<csi::NodeUnstageVolumeResponse>, Status> {
        let req = request.get_ref();
        let _guard = self.guard(&req.volume_id)?;
        staging::unstage(
            self.attacher.as_ref(),
            self.mounter.as_ref(),
            &req.volume_id,
            Path::new(&req.staging_target_path),
        )
        .await
        .map_err(Error::from)?;
        Ok(Response::new(csi::NodeUnstageVolumeResponse {}))
    }

    #[instrument(err, skip_all, fields(volume.id = %request.get_ref().volume_id))]
    async fn node_publish_volume(
        &self,
        request: Request<csi::NodePublishVolumeRequest>,
    ) -> Result<Response<csi::NodePublishVolumeResponse>, Status> {
        let req = request.get_ref();
        let capability = capability(req.volume_capability.as_ref(), &req.volume_context)?;
        let _guard = self.guard(&req.volume_id)?;
        staging::publish(
            self.attacher.as_ref(),
            self.mounter.as_ref(),
            &PublishRequest {
                volume_id: req.volume_id.clone(),
                staging_path: PathBuf::from(&req.staging_target_path),
                target_path: PathBuf::from(&req.target_path),
                capability,
                read_only: req.readonly,
            },
        )
        .await
        .map_err(Error::from)?;
        Ok(Response::new(csi::NodePublishVolumeResponse {}))
    }

    #[instrument(err, skip_all, fields(volume.id = %request.get_ref().volume_id))]
    async fn node_unpublish_volume(
        &self,
        request: Request<csi::NodeUnpublishVolumeRequest>,
    ) -> Result<Response<csi::NodeUnpublishVolumeResponse>, Status> {
        let req = request.get_ref();
        let _guard = self.guard(&req.volume_id)?;
        staging::unpublish(
            self.mounter.as_ref(),
            &req.volume_id,
            Path::new(&req.target_path),
        )
        .await
        .map_err(Error::from)?;
        Ok(Response::new(csi::NodeUnpublishVolumeResponse {}))
    }

    /// CSI spec, NodeGetVolumeStats: bytes (and inodes for a filesystem)
    /// and the volume's condition from this node: abnormal when its
    /// attachment cannot serve I/O (the replicas' health is the
    /// controller's ControllerGetVolume).
    #[instrument(err, skip_all, fields(volume.id = %request.get_ref().volume_id))]
    async fn node_get_volume_stats(
        &self,
        request: Request<csi::NodeGetVolumeStatsRequest>,
    ) -> Result<Response<csi::NodeGetVolumeStatsResponse>, Status> {
        use csi::volume_usage::Unit;
        let req = request.get_ref();
        let staging::Stats {
            usage: stats,
            problem,
        } = staging::stats(
            self.attacher.as_ref(),
            self.mounter.as_ref(),
            &req.volume_id,
            Path::new(&req.volume_path),
        )
        .await
        .map_err(Error::from)?;
        let mut usage = vec![csi::VolumeUsage {
            available: i64_bytes(stats.available_bytes),
            total: i64_bytes(stats.total_bytes),
            used: i64_bytes(stats.used_bytes),
            unit: Unit::Bytes.into(),
        }];
        if let Some(inodes) = stats.inodes {
            usage.push(csi::VolumeUsage {
                available: i64_bytes(inodes.free),
                total: i64_bytes(inodes.total),
                used: i64_bytes(inodes.used),
                unit: Unit::Inodes.into(),
            });
        }
        let volume_condition = Some(match problem {
            Some(message) => csi::VolumeCondition {
                abnormal: true,
                message,
            },
            None => csi::VolumeCondition {
                abnormal: false,
                message: "The volume's attachment serves I/O".to_string(),
            },
        });
        Ok(Response::new(csi::NodeGetVolumeStatsResponse {
            usage,
            volume_condition,
        }))
    }

    /// CSI spec, NodeExpandVolume: grows the filesystem to its device
    /// (see [`staging::expand`]); more than the device holds is
    /// `OUT_OF_RANGE`, a `volume_capability` that is not what is at
    /// `volume_path` `INVALID_ARGUMENT` ("Exceeds capabilities").
    #[instrument(err, skip_all, fields(volume.id = %request.get_ref().volume_id))]
    async fn node_expand_volume(
        &self,
        request: Request<csi::NodeExpandVolumeRequest>,
    ) -> Result<Response<csi::NodeExpandVolumeResponse>, Status> {
        let req = request.get_ref();
        let required = req.capacity_range.as_ref().map_or(0, |r| r.required_bytes);
        let required = u64::try_from(required).map_err(|_| {
            Error::InvalidArgument(format!(
                "capacity_range.required_bytes {required} is negative"
            ))
        })?;
        // OPTIONAL here; when given it must describe what is at the path.
        let capability = req
            .volume_capability
            .as_ref()
            .map(|cap| staging::capability(Some(cap)))
            .transpose()?;
        let _guard = self.guard(&req.volume_id)?;
        let bytes = staging::expand(
            self.attacher.as_ref(),
            self.mounter.as_ref(),
            &req.volume_id,
            Path::new(&req.volume_path),
            capability.as_ref().map(|c| &c.access),
            required,
        )
        .await
        .map_err(Error::from)?;
        Ok(Response::new(csi::NodeExpandVolumeResponse {
            capacity_bytes: i64_bytes(bytes),
        }))
    }

    #[instrument(err, skip_all)]
    async fn node_get_capabilities(
        &self,
        _request: Request<csi::NodeGetCapabilitiesRequest>,
    ) -> Result<Response<csi::NodeGetCapabilitiesResponse>, Status> {
        let capabilities = [
            RpcType::StageUnstageVolume,
            RpcType::GetVolumeStats,
            RpcType::ExpandVolume,
            RpcType::VolumeCondition,
        ]
        .into_iter()
        .map(rpc)
        .collect();
        Ok(Response::new(csi::NodeGetCapabilitiesResponse {
            capabilities,
        }))
    }

    /// CSI spec, NodeGetInfo: the id ControllerPublishVolume receives, and
    /// the node's topology segment: its own node key plus its labels.
    #[instrument(err, skip_all)]
    async fn node_get_info(
        &self,
        _request: Request<csi::NodeGetInfoRequest>,
    ) -> Result<Response<csi::NodeGetInfoResponse>, Status> {
        Ok(Response::new(csi::NodeGetInfoResponse {
            node_id: self.config.node_id.clone(),
            max_volumes_per_node: self.config.max_volumes,
            accessible_topology: Some(csi::Topology {
                segments: self
                    .config
                    .topology
                    .clone()
                    .into_iter()
                    .chain([(TOPOLOGY_NODE_KEY.to_string(), self.config.node_id.clone())])
                    .collect(),
            }),
        }))
    }
}

#[cfg(test)]
mod tests {
    use ballast_proto::csi::node_server::Node as _;
    use ballast_proto::csi::volume_capability::access_mode::Mode;
    use ballast_proto::csi::volume_capability::{AccessMode, AccessType, MountVolume};
    use tonic::Code;

    use super::*;
    use crate::node::staging::tests::Fake;

    const URI: &str = "nbd+unix:///vol-1?socket=/run/t/vol-1.sock";

    fn service(fake: &Fake) -> Node {
        Node::new(
            NodeConfig {
                node_id: "node-7".into(),
                max_volumes: 16,
                topology: HashMap::from([(
                    "topology.kubernetes.io/zone".to_string(),
                    "zone-a".to_string(),
                )]),
            },
            Arc::new(fake.clone()),
            Arc::new(fake.clone()),
        )
    }

    fn stage_request(fs_type: &str, context_fs: Option<&str>) -> csi::NodeStageVolumeRequest {
        csi::NodeStageVolumeRequest {
            volume_id: "vol-1".into(),
            publish_context: HashMap::from([(
                PUBLISH_CONTEXT_NBD_URI.to_string(),
                URI.to_string(),
            )]),
            staging_target_path: "/staging/vol-1".into(),
            volume_capability: Some(csi::VolumeCapability {
                access_mode: Some(AccessMode {
                    mode: Mode::SingleNodeWriter.into(),
                }),
                access_type: Some(AccessType::Mount(MountVolume {
                    fs_type: fs_type.into(),
                    ..Default::default()
                })),
            }),
            volume_context: context_fs
                .map(|fs| HashMap::from([(CONTEXT_FS_TYPE.to_string(), fs.to_string())]))
                .unwrap_or_default(),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn stage_takes_the_storage_class_fs_type_from_the_volume_context() {
        let fake = Fake::default();
        let node = service(&fake);
        node.node_stage_volume(Request::new(stage_request("", Some("xfs"))))
            .await
            .expect("stage");
        let formatted: Vec<FsType> = fake.world().mkfs.iter().map(|(_, fs)| *fs).collect();
        assert_eq!(formatted, [FsType::Xfs]);
        let bad = node
            .node_stage_volume(Request::new(stage_request("", Some("ntfs"))))
            .await;
        assert_eq!(bad.err().map(|s| s.code()), Some(Code::InvalidArgument));
    }

    #[tokio::test]
    async fn a_concurrent_operation_on_the_volume_is_aborted() {
        let fake = Fake::default();
        let node = service(&fake);
        let held = node.guard("vol-1").expect("guard");
        let busy = node
            .node_stage_volume(Request::new(stage_request("ext4", None)))
            .await;
        assert_eq!(busy.err().map(|s| s.code()), Some(Code::Aborted));
        assert!(fake.world().mkfs.is_empty(), "nothing was done");
        drop(held);
        node.node_stage_volume(Request::new(stage_request("ext4", None)))
            .await
            .expect("stage once the other operation ended");
        let missing = node
            .node_unstage_volume(Request::new(csi::NodeUnstageVolumeRequest {
                volume_id: String::new(),
                staging_target_path: "/staging/vol-1".into(),
            }))
            .await;
        assert_eq!(missing.err().map(|s| s.code()), Some(Code::InvalidArgument));
    }

    #[tokio::test]
    async fn stats_report_the_attachment_problem_as_an_abnormal_condition() {
        let fake = Fake::default();
        let node = service(&fake);
        node.node_stage_volume(Request::new(stage_request("ext4", None)))
            .await
            .expect("stage");
        let stats = |node: Node| async move {
            node.node_get_volume_stats(Request::new(csi::NodeGetVolumeStatsRequest {
                volume_id: "vol-1".into(),
                volume_path: "/staging/vol-1".into(),
                ..Default::default()
            }))
            .await
            .expect("stats")
            .into_inner()
            .volume_condition
            .expect("VOLUME_CONDITION requires a condition")
        };
        assert!(!stats(node.clone()).await.abnormal);
        fake.world().problem = Some("nbdfuse has exited".into());
        let condition = stats(node).await;
        assert!(condition.abnormal);
        assert_eq!(condition.message, "nbdfuse has exited");
    }

    #[tokio::test]
    async fn info_names_the_node_and_its_topology() {
        let node = service(&Fake::default());
        let info = node
            .node_get_info(Request::new(csi::NodeGetInfoRequest {}))
            .await
            .expect("info")
            .into_inner();
        assert_eq!(info.node_id, "node-7");
        assert_eq!(info.max_volumes_per_node, 16);
        let segments = info
            .accessible_topology
            .map(|t| t.segments)
            .unwrap_or_default();
        assert_eq!(
            segments.get(TOPOLOGY_NODE_KEY).map(String::as_str),
            Some("node-7")
        );
        assert_eq!(
            segments
                .get("topology.kubernetes.io/zone")
                .map(String::as_str),
            Some("zone-a"),
            "the zone label given with --topology"
        );
        assert_eq!(segments.len(), 2);
    }
}
