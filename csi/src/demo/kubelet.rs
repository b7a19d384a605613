//! The calls Kubernetes makes to a CSI driver, made the way it makes them:
//! the external-provisioner's CreateVolume and DeleteVolume, the
//! external-attacher's ControllerPublishVolume and
//! ControllerUnpublishVolume on the controller's socket, and kubelet's
//! NodeStageVolume, NodePublishVolume, NodeUnpublishVolume and
//! NodeUnstageVolume on the node plugin's socket of the pod's node.
//!
//! Paths follow kubelet's layout under a root directory standing in for
//! `/var/lib/kubelet`, one per node: the staging path
//! `ROOT/<node>/plugins/kubernetes.io/csi/<driver>/<volume>/globalmount`
//! and the pod's target path
//! `ROOT/<node>/pods/<pod>/volumes/kubernetes.io~csi/<volume>/mount`. As
//! kubelet does, the staging directory and the target's parent are
//! created before the calls; the plugin creates the target itself.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ballast_proto::csi;
use ballast_proto::csi::controller_client::ControllerClient;
use ballast_proto::csi::group_controller_client::GroupControllerClient;
use ballast_proto::csi::node_client::NodeClient;
use ballast_proto::csi::volume_capability::access_mode::Mode;
use ballast_proto::csi::volume_capability::{AccessMode, AccessType, MountVolume};
use tonic::transport::{Channel, Endpoint};

/// Deadline of one CSI call (NodeStageVolume formats the volume).
const CALL_TIMEOUT: Duration = Duration::from_secs(180);
/// How long a socket may take to appear.
const SOCKET_TIMEOUT: Duration = Duration::from_secs(30);

/// Errors of the CSI calls.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A CSI socket did not appear or refused the connection.
    #[error("Cannot connect to {endpoint}: {reason}")]
    Connect {
        /// The endpoint (`unix:///...`).
        endpoint: String,
        /// Why.
        reason: String,
    },
    /// A CSI call failed.
    #[error("{call} failed: {} ({:?})", .status.message(), .status.code())]
    Call {
        /// The RPC, with the node for node calls.
        call: String,
        /// The gRPC status.
        status: tonic::Status,
    },
    /// There is no node plugin client for the node.
    #[error("No node plugin for {0}")]
    UnknownNode(String),
    /// A directory could not be created.
    #[error("Cannot create {path}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// Connects to a CSI unix socket (`unix:///path`), waiting (bounded) for
/// the socket file to appear.
///
/// # Errors
///
/// [`Error::Connect`].
pub async fn connect(endpoint: &str) -> Result<Channel, Error> {
    let failed = |reason: String| Error::Connect {
        endpoint: endpoint.to_string(),
        reason,
    };
    let socket = endpoint
        .strip_prefix("unix://")
        .ok_or_else(|| failed("not a unix:// endpoint".into()))?;
    let deadline = Instant::now() + SOCKET_TIMEOUT;
    while !Path::new(socket).exists() {
        if Instant::now() >= deadline {
            return Err(failed(format!("no socket after {SOCKET_TIMEOUT:?}")));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Endpoint::from_shared(endpoint.to_string())
        .map_err(|e| failed(e.to_string()))?
        .connect_timeout(Duration::from_secs(10))
        .timeout(CALL_TIMEOUT)
        .connect()
        .await
        .map_err(|e| failed(e.to_string()))
}

/// A volume published to a pod on a node: what unpublishing needs.
#[derive(Debug, Clone)]
pub struct Attachment {
    /// The volume.
    pub volume_id: String,
    /// The node.
    pub node_id: String,
    /// The staging path.
    pub staging_path: PathBuf,
    /// The pod's target path (where the filesystem is mounted).
    pub target_path: PathBuf,
}

/// The CSI clients of a cluster, playing kubelet and the sidecars.
#[derive(Debug, Clone)]
pub struct Kubelet {
    root: PathBuf,
    controller: ControllerClient<Channel>,
    groups: GroupControllerClient<Channel>,
    nodes: BTreeMap<String, NodeClient<Channel>>,
}

/// A single-node-writer filesystem capability (the fsType comes from the
/// StorageClass parameters through the volume context).
pub fn mount_capability() -> csi::VolumeCapability {
    csi::VolumeCapability {
        access_mode: Some(AccessMode {
            mode: Mode::SingleNodeWriter.into(),
        }),
        access_type: Some(AccessType::Mount(MountVolume::default())),
    }
}

impl Kubelet {
    /// Connects to the controller's and every node plugin's CSI socket;
    /// kubelet's directories go under `root`.
    ///
    /// # Errors
    ///
    /// [`Error::Connect`].
    pub async fn connect(
        root: &Path,
        controller_endpoint: &str,
        node_endpoints: &[(String, String)],
    ) -> Result<Self, Error> {
        let channel = connect(controller_endpoint).await?;
        let controller = ControllerClient::new(channel.clone());
        let groups = GroupControllerClient::new(channel);
        let mut nodes = BTreeMap::new();
        for (node_id, endpoint) in node_endpoints {
            nodes.insert(node_id.clone(), NodeClient::new(connect(endpoint).await?));
        }
        Ok(Self {
            root: root.to_path_buf(),
            controller,
            groups,
            nodes,
        })
    }

    /// CreateVolumeGroupSnapshot as the external-snapshotter sends it for
    /// a VolumeGroupSnapshot of a class with `parameters`.
    ///
    /// # Errors
    ///
    /// [`Error::Call`].
    pub async fn create_group_snapshot(
        &mut self,
        name: &str,
        volume_ids: &[&str],
        parameters: &[(&str, &str)],
    ) -> Result<csi::VolumeGroupSnapshot, Error> {
        let request = csi::CreateVolumeGroupSnapshotRequest {
            name: name.to_string(),
            source_volume_ids: volume_ids.iter().map(|v| v.to_string()).collect(),
            parameters: parameters
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..Default::default()
        };
        let response = self
            .groups
            .create_volume_group_snapshot(request)
            .await
            .map_err(call("CreateVolumeGroupSnapshot", None))?;
        response
            .into_inner()
            .group_snapshot
            .ok_or_else(|| Error::Call {
                call: "CreateVolumeGroupSnapshot".into(),
                status: tonic::Status::internal("the response has no group snapshot"),
            })
    }

    /// CreateVolume as the external-provisioner sends it for a PVC of a
    /// StorageClass with `replicas`, `fsType` and thin provisioning.
    ///
    /// # Errors
    ///
    /// [`Error::Call`].
    pub async fn create_volume(
        &mut self,
        name: &str,
        bytes: u64,
        replicas: u32,
        fs_type: &str,
    ) -> Result<csi::Volume, Error> {
        self.create_volume_from(name, bytes, replicas, fs_type, None)
            .await
    }

    /// CreateVolume as for a PVC whose `dataSource` is the
    /// VolumeSnapshot `snapshot_id` (when given), else as
    /// [`Kubelet::create_volume`].
    ///
    /// # Errors
    ///
    /// [`Error::Call`].
    pub async fn create_volume_from(
        &mut self,
        name: &str,
        bytes: u64,
        replicas: u32,
        fs_type: &str,
        snapshot_id: Option<&str>,
    ) -> Result<csi::Volume, Error> {
        let volume_content_source = snapshot_id.map(|id| csi::VolumeContentSource {
            r#type: Some(csi::volume_content_source::Type::Snapshot(
                csi::volume_content_source::SnapshotSource {
                    snapshot_id: id.to_string(),
                },
            )),
        });
        let request = csi::CreateVolumeRequest {
            volume_content_source,
            name: name.to_string(),
            capacity_range: Some(csi::CapacityRange {
                required_bytes: i64::try_from(bytes).unwrap_or(i64::MAX),
                limit_bytes: 0,
            }),
            volume_capabilities: vec![mount_capability()],
            parameters: HashMap::from([
                ("replicas".to_string(), replicas.to_string()),
                ("fsType".to_string(), fs_type.to_string()),
                ("thin".to_string(), "true".to_string()),
                (
                    "csi.storage.k8s.io/pvc/name".to_string(),
                    "data-postgres-0".to_string(),
                ),
            ]),
            ..Default::default()
        };
        let response = self
            .controller
            .create_volume(request)
            .await
            .map_err(call("CreateVolume", None))?;
        response.into_inner().volume.ok_or_else(|| Error::Call {
            call: "CreateVolume".into(),
            status: tonic::Status::internal("the response has no volume"),
        })
    }

    /// DeleteVolume.
    ///
    /// # Errors
    ///
    /// [`Error::Call`].
    pub async fn delete_volume(&mut self, volume_id: &str) -> Result<(), Error> {
        self.controller
            .delete_volume(csi::DeleteVolumeRequest {
                volume_id: volume_id.to_string(),
                ..Default::default()
            })
            .await
            .map_err(call("DeleteVolume", None))?;
        Ok(())
    }

    /// ControllerPublishVolume on `node_id`; returns the publish context.
    ///
    /// # Errors
    ///
    /// [`Error::Call`].
    pub async fn controller_publish(
        &mut self,
        volume: &csi::Volume,
        node_id: &str,
    ) -> Result<HashMap<String, String>, Error> {
        let response = self
            .controller
            .controller_publish_volume(csi::ControllerPublishVolumeRequest {
                volume_id: volume.volume_id.clone(),
                node_id: node_id.to_string(),
                volume_capability: Some(mount_capability()),
                readonly: false,
                volume_context: volume.volume_context.clone(),
                ..Default::default()
            })
            .await
            .map_err(call("ControllerPublishVolume", Some(node_id)))?;
        Ok(response.into_inner().publish_context)
    }

    /// ControllerUnpublishVolume from `node_id`.
    ///
    /// # Errors
    ///
    /// [`Error::Call`].
    pub async fn controller_unpublish(
        &mut self,
        volume_id: &str,
        node_id: &str,
    ) -> Result<(), Error> {
        self.controller
            .controller_unpublish_volume(csi::ControllerUnpublishVolumeRequest {
                volume_id: volume_id.to_string(),
                node_id: node_id.to_string(),
                ..Default::default()
            })
            .await
            .map_err(call("ControllerUnpublishVolume", Some(node_id)))?;
        Ok(())
    }

    /// kubelet's paths for `volume_id` used by `pod` on `node_id`.
    pub fn attachment(&self, volume_id: &str, node_id: &str, pod: &str) -> Attachment {
        let node = self.root.join(node_id);
        Attachment {
            volume_id: volume_id.to_string(),
            node_id: node_id.to_string(),
            staging_path: node
                .join("plugins/kubernetes.io/csi")
                .join(crate::service::DRIVER_NAME)
                .join(volume_id)
                .join("globalmount"),
            target_path: node
                .join("pods")
                .join(pod)
                .join("volumes/kubernetes.io~csi")
                .join(volume_id)
                .join("mount"),
        }
    }

    /// NodeStageVolume then NodePublishVolume at `attachment`'s paths, with
    /// the controller's publish context.
    ///
    /// # Errors
    ///
    /// [`Error::Io`] creating kubelet's directories, [`Error::Call`].
    pub async fn node_publish(
        &mut self,
        volume: &csi::Volume,
        publish_context: &HashMap<String, String>,
        attachment: &Attachment,
    ) -> Result<(), Error> {
        let target_parent = attachment.target_path.parent().unwrap_or(&self.root);
        for dir in [attachment.staging_path.as_path(), target_parent] {
            std::fs::create_dir_all(dir).map_err(|source| Error::Io {
                path: dir.to_path_buf(),
                source,
            })?;
        }
        let node_id = attachment.node_id.as_str();
        let node = self.node(node_id)?;
        node.node_stage_volume(csi::NodeStageVolumeRequest {
            volume_id: volume.volume_id.clone(),
            publish_context: publish_context.clone(),
            staging_target_path: attachment.staging_path.display().to_string(),
            volume_capability: Some(mount_capability()),
            volume_context: volume.volume_context.clone(),
            ..Default::default()
        })
        .await
        .map_err(call("NodeStageVolume", Some(node_id)))?;
        node.node_publish_volume(csi::NodePublishVolumeRequest {
            volume_id: volume.volume_id.clone(),
            publish_context: publish_context.clone(),
            staging_target_path: attachment.staging_path.display().to_string(),
            target_path: attachment.target_path.display().to_string(),
            volume_capability: Some(mount_capability()),
            readonly: false,
            volume_context: volume.volume_context.clone(),
            ..Default::default()
        })
        .await
        .map_err(call("NodePublishVolume", Some(node_id)))?;
        Ok(())
    }

    /// NodeUnpublishVolume then NodeUnstageVolume (both idempotent).
    ///
    /// # Errors
    ///
    /// [`Error::Call`].
    pub async fn node_unpublish(&mut self, attachment: &Attachment) -> Result<(), Error> {
        let node_id = attachment.node_id.as_str();
        let node = self.node(node_id)?;
        node.node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
            volume_id: attachment.volume_id.clone(),
            target_path: attachment.target_path.display().to_string(),
        })
        .await
        .map_err(call("NodeUnpublishVolume", Some(node_id)))?;
        node.node_unstage_volume(csi::NodeUnstageVolumeRequest {
            volume_id: attachment.volume_id.clone(),
            staging_target_path: attachment.staging_path.display().to_string(),
        })
        .await
        .map_err(call("NodeUnstageVolume", Some(node_id)))?;
        Ok(())
    }

    fn node(&mut self, node_id: &str) -> Result<&mut NodeClient<Channel>, Error> {
        self.nodes
            .get_mut(node_id)
            .ok_or_else(|| Error::UnknownNode(node_id.to_string()))
    }
}

/// Maps a failed call's status into [`Error::Call`] naming the RPC.
fn call(rpc: &'static str, node: Option<&str>) -> impl FnOnce(tonic::Status) -> Error {
    let call = match node {
        Some(node) => format!("{rpc} on {node}"),
        None => rpc.to_string(),
    };
    move |status| Error::Call { call, status }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn paths_follow_kubelets_layout() {
        let channel = Endpoint::from_static("http://127.0.0.1:1").connect_lazy();
        let kubelet = Kubelet {
            root: PathBuf::from("/k"),
            controller: ControllerClient::new(channel.clone()),
            groups: GroupControllerClient::new(channel),
            nodes: BTreeMap::new(),
        };
        let a = kubelet.attachment("pvc-1", "node-2", "postgres-0");
        assert_eq!(
            a.staging_path,
            Path::new("/k/node-2/plugins/kubernetes.io/csi/csi.ballast.io/pvc-1/globalmount")
        );
        assert_eq!(
            a.target_path,
            Path::new("/k/node-2/pods/postgres-0/volumes/kubernetes.io~csi/pvc-1/mount")
        );
    }

    #[tokio::test]
    async fn a_missing_socket_is_a_clear_error() {
        let err = connect("tcp://somewhere").await.expect_err("not unix");
        assert!(err.to_string().contains("not a unix:// endpoint"), "{err}");
    }
}
