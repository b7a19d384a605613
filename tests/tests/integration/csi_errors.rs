//! The CSI error contract as kubernetes-csi's conformance suite
//! (csi-sanity v5.3.1, `pkg/sanity/node.go`) exercises it, over the real
//! sockets of `ballast cluster up`: the controller's `DIR/csi.sock` and
//! node-1's `DIR/node-1/csi.sock`.
//!
//! The calls, their order and their fields are csi-sanity's: it decides
//! whether to call ControllerPublishVolume from GetPluginCapabilities on
//! the *node* endpoint (CONTROLLER_SERVICE) and ControllerGetCapabilities
//! (PUBLISH_UNPUBLISH_VOLUME), takes the node id from NodeGetInfo, and
//! passes the publish context to NodeStageVolume only when it published.
//! The cluster fixture unmounts, detaches and stops everything on drop.

use std::path::Path;

use anyhow::{Context, Result, bail, ensure};
use ballast_proto::csi;
use ballast_proto::csi::controller_client::ControllerClient;
use ballast_proto::csi::controller_service_capability::rpc::Type as ControllerRpc;
use ballast_proto::csi::identity_client::IdentityClient;
use ballast_proto::csi::plugin_capability::service::Type as ServiceType;
use tonic::Code;

use crate::harness::cluster::Cluster;
use crate::harness::csi::{
    MIB, NodePlugin, block_cap, channel, code, create_request, mount_cap, publish_request,
    stage_request, unpublish_and_delete, unpublish_and_unstage,
};

fn require_root() -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("needs root (loop devices, FUSE, mounts)");
    }
    Ok(())
}

/// csi-sanity's `controllerPublishSupported`: the node endpoint's Identity
/// announces CONTROLLER_SERVICE and the controller PUBLISH_UNPUBLISH_VOLUME.
async fn sanity_publishes(node_socket: &Path, controller_socket: &Path) -> Result<bool> {
    let mut identity = IdentityClient::new(channel(node_socket).await?);
    let services = identity
        .get_plugin_capabilities(csi::GetPluginCapabilitiesRequest {})
        .await?
        .into_inner()
        .capabilities;
    let controller_service = services.iter().any(|c| {
        matches!(
            &c.r#type,
            Some(csi::plugin_capability::Type::Service(s)) if s.r#type() == ServiceType::ControllerService
        )
    });
    if !controller_service {
        return Ok(false);
    }
    let mut controller = ControllerClient::new(channel(controller_socket).await?);
    let rpcs = controller
        .controller_get_capabilities(csi::ControllerGetCapabilitiesRequest {})
        .await?
        .into_inner()
        .capabilities;
    Ok(rpcs.iter().any(|c| {
        matches!(
            &c.r#type,
            Some(csi::controller_service_capability::Type::Rpc(r)) if r.r#type() == ControllerRpc::PublishUnpublishVolume
        )
    }))
}

/// csi-sanity's "NodeUnpublishVolume should remove target path",
/// "NodeGetVolumeStats should fail when volume does not exist on the
/// specified path" and "NodeExpandVolume should work if node-expand is
/// called after node-publish", in one volume's life: ControllerExpandVolume
/// (offline, before the publish), NodeGetInfo, ControllerPublishVolume to
/// that node id, NodeStageVolume with its publish context,
/// NodePublishVolume at a target that does not exist yet, stats at
/// `some/path` (NOT_FOUND), NodeExpandVolume at the target (OK), and
/// NodeUnpublishVolume removing the target; and, besides csi-sanity,
/// NodeExpandVolume's "Exceeds capabilities" row (a block capability for
/// the published filesystem). Also the volume-not-found rows
/// of NodeGetVolumeStats and NodeExpandVolume with csi-sanity's relative
/// `some/path`.
#[tokio::test(flavor = "multi_thread")]
async fn the_csi_sanity_node_flows_pass_over_the_real_sockets() -> Result<()> {
    require_root()?;
    let cluster = Cluster::up("csi-sanity-flows", 3, "embedded", &[])?;
    cluster.wait_all_up(3)?;
    let controller_socket = cluster.path.join("csi.sock");
    let mut controller = ControllerClient::new(channel(&controller_socket).await?);
    let mut node1 = NodePlugin::start(&cluster, "node-1").await?;
    let node_socket = cluster.path.join("node-1").join("csi.sock");

    ensure!(
        sanity_publishes(&node_socket, &controller_socket).await?,
        "csi-sanity would skip ControllerPublishVolume and stage without a publish context: \
         the node plugin's GetPluginCapabilities must announce CONTROLLER_SERVICE like the \
         controller's (CSI spec, GetPluginCapabilities: every instance returns the same set)"
    );

    // Unknown volume, relative path: NOT_FOUND, not INVALID_ARGUMENT.
    let c = &mut node1.client;
    let unknown = c
        .node_get_volume_stats(csi::NodeGetVolumeStatsRequest {
            volume_id: "pvc-never-created".into(),
            volume_path: "some/path".into(),
            ..Default::default()
        })
        .await;
    ensure!(
        code(unknown) == Some(Code::NotFound),
        "stats of an unknown volume"
    );
    let unknown = c
        .node_expand_volume(csi::NodeExpandVolumeRequest {
            volume_id: "pvc-never-created".into(),
            volume_path: "some/path".into(),
            ..Default::default()
        })
        .await;
    ensure!(
        code(unknown) == Some(Code::NotFound),
        "expansion of an unknown volume"
    );

    let volume = controller
        .create_volume(create_request("sanity-node-flow", 64 * MIB, 3))
        .await?
        .into_inner()
        .volume
        .context("CreateVolume returned no volume")?;
    let id = volume.volume_id.clone();
    let expanded = controller
        .controller_expand_volume(csi::ControllerExpandVolumeRequest {
            volume_id: id.clone(),
            capacity_range: Some(csi::CapacityRange {
                required_bytes: 128 * MIB,
                limit_bytes: 0,
            }),
            ..Default::default()
        })
        .await?
        .into_inner();
    ensure!(expanded.capacity_bytes == 128 * MIB, "{expanded:?}");

    let node_id = c
        .node_get_info(csi::NodeGetInfoRequest {})
        .await?
        .into_inner()
        .node_id;
    let publish_context = controller
        .controller_publish_volume(csi::ControllerPublishVolumeRequest {
            volume_id: id.clone(),
            node_id: node_id.clone(),
            volume_capability: Some(mount_cap("")),
            volume_context: volume.volume_context.clone(),
            readonly: false,
            ..Default::default()
        })
        .await?
        .into_inner()
        .publish_context;

    let dir = cluster.dir.join("pod-sanity");
    let staging = dir.join("staging");
    let target = dir.join("target");
    std::fs::create_dir_all(&staging)?;
    c.node_stage_volume(stage_request(
        &volume,
        &publish_context,
        &staging,
        mount_cap(""),
    ))
    .await
    .context("NodeStageVolume with the publish context")?;
    let mut publish = publish_request(&volume, &staging, &target, mount_cap(""));
    publish.publish_context = publish_context.clone();
    c.node_publish_volume(publish).await?;
    ensure!(target.is_dir(), "the target was created");

    let elsewhere = c
        .node_get_volume_stats(csi::NodeGetVolumeStatsRequest {
            volume_id: id.clone(),
            volume_path: "some/path".into(),
            ..Default::default()
        })
        .await;
    ensure!(
        code(elsewhere) == Some(Code::NotFound),
        "stats of a published volume at a path where it is not"
    );
    let block = c
        .node_expand_volume(csi::NodeExpandVolumeRequest {
            volume_id: id.clone(),
            volume_path: target.display().to_string(),
            volume_capability: Some(block_cap()),
            ..Default::default()
        })
        .await;
    ensure!(
        code(block) == Some(Code::InvalidArgument),
        "NodeExpandVolume with a block capability for a filesystem (Exceeds capabilities)"
    );
    let grown = c
        .node_expand_volume(csi::NodeExpandVolumeRequest {
            volume_id: id.clone(),
            volume_path: target.display().to_string(),
            capacity_range: Some(csi::CapacityRange {
                required_bytes: 128 * MIB,
                limit_bytes: 0,
            }),
            ..Default::default()
        })
        .await
        .context("NodeExpandVolume after NodePublishVolume")?
        .into_inner();
    ensure!(grown.capacity_bytes >= 128 * MIB, "{grown:?}");

    unpublish_and_unstage(&mut node1, &id, &dir).await?;
    ensure!(!target.exists(), "NodeUnpublishVolume removed the target");
    unpublish_and_delete(&mut controller, &cluster, &id, &node_id).await?;
    Ok(())
}
