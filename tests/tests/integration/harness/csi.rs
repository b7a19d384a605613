//! Kubelet and the CSI sidecars, played by tonic clients over the unix
//! sockets of a local cluster: connecting, `ballast-csi node` plugins, the
//! common requests, and what the kernel's mount table says afterwards.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result};
use ballast_proto::csi;
use ballast_proto::csi::controller_client::ControllerClient;
use ballast_proto::csi::node_client::NodeClient;
use ballast_proto::csi::volume_capability::access_mode::Mode;
use ballast_proto::csi::volume_capability::{AccessMode, AccessType, BlockVolume, MountVolume};
use tonic::Code;
use tonic::transport::Channel;

use super::cluster::Cluster;
use super::{Child, bin, wait_for};

pub const NBD_URI_KEY: &str = "ballast.io/nbd-uri";
pub const MIB: i64 = 1 << 20;

/// Connects to a CSI unix socket, waiting (bounded) for it to appear and
/// to accept connections (a restarted plugin replaces a stale socket).
pub async fn channel(socket: &Path) -> Result<Channel> {
    wait_for(
        &format!("{} to exist", socket.display()),
        Duration::from_secs(30),
        || socket.exists().then_some(()),
    )?;
    let endpoint = format!("unix://{}", socket.display());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let connected = tonic::transport::Endpoint::from_shared(endpoint.clone())?
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs(120))
            .connect()
            .await;
        match connected {
            Ok(channel) => return Ok(channel),
            Err(e) if tokio::time::Instant::now() >= deadline => {
                return Err(e).with_context(|| format!("connecting to {endpoint}"));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// The `ballast-csi node` plugin that `ballast cluster up` started for a
/// node, with its client; [`NodePlugin::restart`] replaces it by one this
/// test owns (killed on drop).
pub struct NodePlugin {
    pub client: NodeClient<Channel>,
    /// The cluster's plugin process, until a restart replaces it.
    cluster_pid: Option<i32>,
    /// The plugin started by [`NodePlugin::restart`].
    process: Option<Child>,
    node_id: String,
    socket: PathBuf,
    state_dir: PathBuf,
    log: PathBuf,
}

impl NodePlugin {
    /// Connects to the node plugin of `node_id` in `cluster`.
    pub async fn start(cluster: &Cluster, node_id: &str) -> Result<Self> {
        let info = cluster.info()?;
        let node = info
            .nodes
            .iter()
            .find(|n| n.node_id == node_id)
            .with_context(|| format!("no {node_id} in the cluster"))?;
        let socket = node
            .csi_socket()
            .with_context(|| format!("{node_id} has no node plugin"))?
            .to_path_buf();
        let state_dir = node
            .csi_state_dir
            .clone()
            .with_context(|| format!("{node_id} has no node plugin state"))?;
        let client = NodeClient::new(channel(&socket).await?);
        Ok(Self {
            client,
            cluster_pid: node.plugin.as_ref().map(|p| p.pid),
            process: None,
            node_id: node_id.to_string(),
            socket,
            state_dir,
            log: cluster.dir.join(&format!("{node_id}-csi-restarted.log")),
        })
    }

    /// Where the plugin keeps its attachment records (and nbdfuse mounts).
    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    /// SIGKILLs the plugin (a crash: whatever it attached stays) and starts
    /// a new one with the same socket and state directory.
    pub async fn restart(&mut self) -> Result<()> {
        if let Some(pid) = self.cluster_pid.take() {
            nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            )?;
            wait_for("the node plugin to die", Duration::from_secs(10), || {
                (!super::cluster::pid_running(pid)).then_some(())
            })?;
        }
        if let Some(mut process) = self.process.take() {
            process.kill();
        }
        self.process = Some(Child::spawn(
            &format!("ballast-csi node {}", self.node_id),
            Command::new(bin("ballast-csi"))
                .arg("node")
                .arg("--endpoint")
                .arg(format!("unix://{}", self.socket.display()))
                .arg("--node-id")
                .arg(&self.node_id)
                .arg("--state-dir")
                .arg(&self.state_dir),
            &self.log,
        )?);
        self.client = NodeClient::new(channel(&self.socket).await?);
        Ok(())
    }
}

pub fn mount_cap(fs_type: &str) -> csi::VolumeCapability {
    csi::VolumeCapability {
        access_mode: Some(AccessMode {
            mode: Mode::SingleNodeWriter.into(),
        }),
        access_type: Some(AccessType::Mount(MountVolume {
            fs_type: fs_type.into(),
            ..Default::default()
        })),
    }
}

pub fn block_cap() -> csi::VolumeCapability {
    csi::VolumeCapability {
        access_mode: Some(AccessMode {
            mode: Mode::SingleNodeWriter.into(),
        }),
        access_type: Some(AccessType::Block(BlockVolume {})),
    }
}

pub fn create_request(name: &str, required: i64, replicas: u32) -> csi::CreateVolumeRequest {
    csi::CreateVolumeRequest {
        name: name.into(),
        capacity_range: Some(csi::CapacityRange {
            required_bytes: required,
            limit_bytes: 0,
        }),
        volume_capabilities: vec![mount_cap("")],
        parameters: HashMap::from([
            ("replicas".to_string(), replicas.to_string()),
            ("fsType".to_string(), "ext4".to_string()),
            ("thin".to_string(), "true".to_string()),
        ]),
        secrets: HashMap::from([("token".to_string(), "never-logged".to_string())]),
        ..Default::default()
    }
}

pub fn code<T>(result: Result<tonic::Response<T>, tonic::Status>) -> Option<Code> {
    result.err().map(|s| s.code())
}

/// A NodeStageVolume request for `volume` at `staging`.
pub fn stage_request(
    volume: &csi::Volume,
    context: &HashMap<String, String>,
    staging: &Path,
    capability: csi::VolumeCapability,
) -> csi::NodeStageVolumeRequest {
    csi::NodeStageVolumeRequest {
        volume_id: volume.volume_id.clone(),
        publish_context: context.clone(),
        staging_target_path: staging.display().to_string(),
        volume_capability: Some(capability),
        volume_context: volume.volume_context.clone(),
        ..Default::default()
    }
}

/// A NodePublishVolume request for `volume` from `staging` to `target`.
pub fn publish_request(
    volume: &csi::Volume,
    staging: &Path,
    target: &Path,
    capability: csi::VolumeCapability,
) -> csi::NodePublishVolumeRequest {
    csi::NodePublishVolumeRequest {
        volume_id: volume.volume_id.clone(),
        staging_target_path: staging.display().to_string(),
        target_path: target.display().to_string(),
        volume_capability: Some(capability),
        volume_context: volume.volume_context.clone(),
        ..Default::default()
    }
}

/// Stages and publishes a mount volume on `plugin` with the controller's
/// publish context; returns the target path. See [`stage_and_publish_as`].
pub async fn stage_and_publish(
    plugin: &mut NodePlugin,
    dir: &Path,
    volume: &csi::Volume,
    publish_context: &HashMap<String, String>,
) -> Result<PathBuf> {
    stage_and_publish_as(plugin, dir, volume, publish_context, mount_cap("")).await
}

/// Stages `volume` at `dir/staging` and publishes it at `dir/target` with
/// `capability` (a directory for mount access, a file for block access, as
/// kubelet does), each twice since both must be idempotent; returns the
/// target.
pub async fn stage_and_publish_as(
    plugin: &mut NodePlugin,
    dir: &Path,
    volume: &csi::Volume,
    context: &HashMap<String, String>,
    capability: csi::VolumeCapability,
) -> Result<PathBuf> {
    let staging = dir.join("staging");
    let target = dir.join("target");
    std::fs::create_dir_all(&staging)?;
    let stage = stage_request(volume, context, &staging, capability.clone());
    plugin.client.node_stage_volume(stage.clone()).await?;
    plugin
        .client
        .node_stage_volume(stage)
        .await
        .context("staging again is idempotent")?;
    let mut publish = publish_request(volume, &staging, &target, capability);
    publish.publish_context = context.clone();
    plugin.client.node_publish_volume(publish.clone()).await?;
    plugin
        .client
        .node_publish_volume(publish)
        .await
        .context("publishing again is idempotent")?;
    Ok(target)
}

pub async fn unpublish_and_unstage(
    plugin: &mut NodePlugin,
    volume_id: &str,
    dir: &Path,
) -> Result<()> {
    let target = dir.join("target").display().to_string();
    let staging = dir.join("staging").display().to_string();
    plugin
        .client
        .node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
            volume_id: volume_id.into(),
            target_path: target,
        })
        .await?;
    plugin
        .client
        .node_unstage_volume(csi::NodeUnstageVolumeRequest {
            volume_id: volume_id.into(),
            staging_target_path: staging,
        })
        .await?;
    Ok(())
}

/// The source (device) of the mount last made at `path`.
pub fn mount_source(path: &Path) -> Option<String> {
    let path = path.canonicalize().ok()?;
    let table = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let mut found = None;
    for line in table.lines() {
        let (left, right) = line.split_once(" - ")?;
        if left.split(' ').nth(4).map(Path::new) == Some(path.as_path()) {
            found = right.split(' ').nth(1).map(str::to_string);
        }
    }
    found
}

/// The filesystem type mounted last at `path`, from the mount table.
pub fn fs_type_at(path: &Path) -> Option<String> {
    let path = path.canonicalize().ok()?;
    let table = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let mut found = None;
    for line in table.lines() {
        // "... mount_point ... - fs_type source options"
        let (left, right) = line.split_once(" - ")?;
        let mount_point = left.split(' ').nth(4)?;
        if Path::new(mount_point) == path {
            found = right.split(' ').next().map(str::to_string);
        }
    }
    found
}

/// ControllerUnpublishVolume of `volume_id` from `node`, as the
/// external-attacher calls it.
pub async fn controller_unpublish(
    controller: &mut ControllerClient<Channel>,
    volume_id: &str,
    node: &str,
) -> Result<()> {
    controller
        .controller_unpublish_volume(csi::ControllerUnpublishVolumeRequest {
            volume_id: volume_id.into(),
            node_id: node.into(),
            ..Default::default()
        })
        .await?;
    Ok(())
}

/// ControllerUnpublishVolume from `node`, then DeleteVolume, as the
/// external-attacher and the external-provisioner end a volume's life;
/// fails unless no node holds a replica of it afterwards.
pub async fn unpublish_and_delete(
    controller: &mut ControllerClient<Channel>,
    cluster: &Cluster,
    volume_id: &str,
    node: &str,
) -> Result<()> {
    controller_unpublish(controller, volume_id, node).await?;
    controller
        .delete_volume(csi::DeleteVolumeRequest {
            volume_id: volume_id.into(),
            ..Default::default()
        })
        .await?;
    let left: Vec<String> = cluster
        .all_replicas()?
        .into_iter()
        .filter(|(_, volumes)| volumes.iter().any(|v| v == volume_id))
        .map(|(node, _)| node)
        .collect();
    anyhow::ensure!(left.is_empty(), "replicas of {volume_id} left on {left:?}");
    Ok(())
}
