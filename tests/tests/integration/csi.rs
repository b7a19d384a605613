//! The CSI contract over the real sockets: a local cluster whose
//! controller serves CSI on `DIR/csi.sock` and whose nodes each run a
//! `ballast-csi node` plugin (`DIR/node-K/csi.sock`, nbdfuse + loop here),
//! and tonic clients playing kubelet and the CSI sidecars.
//!
//! Every wait is bounded. The cluster with its node plugins, and every
//! mount and loop device under the test directory, are torn down on drop,
//! so a failed assertion leaves nothing behind.

use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use ballast_proto::csi;
use ballast_proto::csi::controller_client::ControllerClient;
use ballast_proto::csi::identity_client::IdentityClient;
use tonic::Code;

use crate::harness::cluster::Cluster;
use crate::harness::csi::{
    MIB, NBD_URI_KEY, NodePlugin, channel, code, create_request, fs_type_at, mount_cap,
    mount_source, stage_and_publish, unpublish_and_delete, unpublish_and_unstage,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_and_create_volume_rules() -> Result<()> {
    let cluster = Cluster::up("csi-create", 3, "embedded", &[])?;
    cluster.wait_all_up(3)?;
    let socket = cluster.path.join("csi.sock");
    let channel = channel(&socket).await?;
    let mode = std::fs::metadata(&socket)?.permissions();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
        0o600,
        "the CSI socket is for root only"
    );

    let mut identity = IdentityClient::new(channel.clone());
    let info = identity
        .get_plugin_info(csi::GetPluginInfoRequest {})
        .await?
        .into_inner();
    assert_eq!(info.name, "csi.ballast.io");
    assert!(!info.vendor_version.is_empty());
    let caps = identity
        .get_plugin_capabilities(csi::GetPluginCapabilitiesRequest {})
        .await?
        .into_inner();
    // Controller, accessibility constraints, snapshot metadata, group
    // controller, offline expansion.
    assert_eq!(caps.capabilities.len(), 5, "{caps:?}");
    let probe = identity.probe(csi::ProbeRequest {}).await?.into_inner();
    assert_eq!(probe.ready, Some(true));

    let mut controller = ControllerClient::new(channel);
    let volume = controller
        .create_volume(create_request("pvc-a", 10 * MIB + 1, 3))
        .await?
        .into_inner()
        .volume
        .context("CreateVolume returned no volume")?;
    assert_eq!(volume.volume_id, "pvc-a");
    assert_eq!(volume.capacity_bytes, 10 * MIB + 4096, "rounded up to 4096");
    assert_eq!(
        volume.volume_context.get("fsType").map(String::as_str),
        Some("ext4")
    );
    let replicas = cluster.all_replicas()?;
    let holders = replicas
        .values()
        .filter(|v| v.contains(&"pvc-a".to_string()))
        .count();
    assert_eq!(holders, 3, "one replica on each node: {replicas:?}");

    let again = controller
        .create_volume(create_request("pvc-a", 10 * MIB + 1, 3))
        .await?
        .into_inner()
        .volume;
    assert_eq!(again.as_ref(), Some(&volume), "idempotent by name");
    assert_eq!(
        code(
            controller
                .create_volume(create_request("pvc-a", 20 * MIB, 3))
                .await
        ),
        Some(Code::AlreadyExists)
    );
    let mut no_caps = create_request("pvc-b", MIB, 1);
    no_caps.volume_capabilities.clear();
    assert_eq!(
        code(controller.create_volume(no_caps).await),
        Some(Code::InvalidArgument)
    );
    let mut too_big = create_request("pvc-b", MIB + 1, 1);
    too_big.capacity_range = Some(csi::CapacityRange {
        required_bytes: MIB + 1,
        limit_bytes: MIB + 2,
    });
    assert_eq!(
        code(controller.create_volume(too_big).await),
        Some(Code::OutOfRange)
    );
    assert_eq!(
        code(
            controller
                .create_volume(create_request("pvc-b", MIB, 4))
                .await
        ),
        Some(Code::ResourceExhausted),
        "4 replicas on 3 nodes"
    );
    let log = std::fs::read_to_string(cluster.path.join("controller.log"))?;
    assert!(!log.contains("never-logged"), "a secret reached the log");
    assert!(
        !cluster
            .all_replicas()?
            .values()
            .flatten()
            .any(|r| r == "pvc-b"),
        "refused requests created no replica"
    );
    controller
        .delete_volume(csi::DeleteVolumeRequest {
            volume_id: "pvc-a".into(),
            ..Default::default()
        })
        .await?;
    controller
        .delete_volume(csi::DeleteVolumeRequest {
            volume_id: "pvc-a".into(),
            ..Default::default()
        })
        .await
        .context("deleting a deleted volume is OK")?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_volume_follows_its_pod_to_another_node() -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("needs root (loop devices, FUSE, mounts)");
    }
    let cluster = Cluster::up("csi-flow", 3, "embedded", &[])?;
    cluster.wait_all_up(3)?;
    let mut controller = ControllerClient::new(channel(&cluster.path.join("csi.sock")).await?);
    let mut node1 = NodePlugin::start(&cluster, "node-1").await?;
    let mut node2 = NodePlugin::start(&cluster, "node-2").await?;

    let info = node1
        .client
        .node_get_info(csi::NodeGetInfoRequest {})
        .await?
        .into_inner();
    assert_eq!(info.node_id, "node-1");
    let segments = info
        .accessible_topology
        .map(|t| t.segments)
        .unwrap_or_default();
    assert_eq!(
        segments.get("topology.ballast.io/node").map(String::as_str),
        Some("node-1")
    );
    let node_caps = node1
        .client
        .node_get_capabilities(csi::NodeGetCapabilitiesRequest {})
        .await?
        .into_inner();
    assert_eq!(node_caps.capabilities.len(), 4, "{node_caps:?}");

    let volume = controller
        .create_volume(create_request("pvc-flow", 64 * MIB, 3))
        .await?
        .into_inner()
        .volume
        .context("no volume")?;

    // On node-1: publish, stage, publish, write.
    let publish = |node: &str| csi::ControllerPublishVolumeRequest {
        volume_id: "pvc-flow".into(),
        node_id: node.into(),
        volume_capability: Some(mount_cap("")),
        volume_context: volume.volume_context.clone(),
        ..Default::default()
    };
    let context1 = controller
        .controller_publish_volume(publish("node-1"))
        .await?
        .into_inner()
        .publish_context;
    assert!(
        context1
            .get(NBD_URI_KEY)
            .is_some_and(|u| u.starts_with("nbd+unix:///")),
        "{context1:?}"
    );
    assert_eq!(
        code(
            controller
                .controller_publish_volume(publish("node-2"))
                .await
        ),
        Some(Code::FailedPrecondition),
        "single-node writer already published on node-1"
    );
    let dir1 = cluster.dir.join("pod-on-node-1");
    let target1 = stage_and_publish(&mut node1, &dir1, &volume, &context1).await?;
    assert_eq!(
        fs_type_at(&target1).as_deref(),
        Some("ext4"),
        "fsType from the StorageClass"
    );
    let payload: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(target1.join("data.bin"), &payload)?;
    std::fs::File::open(target1.join("data.bin"))?.sync_all()?;
    let stats = node1
        .client
        .node_get_volume_stats(csi::NodeGetVolumeStatsRequest {
            volume_id: "pvc-flow".into(),
            volume_path: target1.display().to_string(),
            ..Default::default()
        })
        .await?
        .into_inner();
    assert!(
        stats.usage.first().is_some_and(|u| u.used >= 1_000_000),
        "{stats:?}"
    );

    // Move: tear down on node-1, unpublish, publish on node-2.
    unpublish_and_unstage(&mut node1, "pvc-flow", &dir1).await?;
    assert_eq!(fs_type_at(&target1), None, "nothing left mounted on node-1");
    controller
        .controller_unpublish_volume(csi::ControllerUnpublishVolumeRequest {
            volume_id: "pvc-flow".into(),
            node_id: "node-1".into(),
            ..Default::default()
        })
        .await?;
    // Offline expansion while no node has it published.
    let expanded = controller
        .controller_expand_volume(csi::ControllerExpandVolumeRequest {
            volume_id: "pvc-flow".into(),
            capacity_range: Some(csi::CapacityRange {
                required_bytes: 128 * MIB,
                limit_bytes: 0,
            }),
            volume_capability: Some(mount_cap("")),
            ..Default::default()
        })
        .await?
        .into_inner();
    assert_eq!(expanded.capacity_bytes, 128 * MIB);
    assert!(expanded.node_expansion_required);
    let context2 = controller
        .controller_publish_volume(publish("node-2"))
        .await?
        .into_inner()
        .publish_context;
    assert_ne!(context2, context1, "the target moved to node-2");
    let dir2 = cluster.dir.join("pod-on-node-2");
    let target2 = stage_and_publish(&mut node2, &dir2, &volume, &context2).await?;
    let read = std::fs::read(target2.join("data.bin"))?;
    assert!(
        read == payload,
        "the file written on node-1 is intact on node-2"
    );

    let device = mount_source(&target2).context("the device mounted at the target")?;
    let size = crate::harness::run_ok(
        Command::new("blockdev").arg("--getsize64").arg(&device),
        Duration::from_secs(30),
    )?;
    assert_eq!(
        size.trim(),
        (128 * MIB).to_string(),
        "the device on node-2 has the new size"
    );
    // ext4 cannot grow online here (no CAP_SYS_RESOURCE in containers):
    // NodeStageVolume grew it offline before mounting it.
    let staged = node2
        .client
        .node_get_volume_stats(csi::NodeGetVolumeStatsRequest {
            volume_id: "pvc-flow".into(),
            volume_path: target2.display().to_string(),
            ..Default::default()
        })
        .await?
        .into_inner();
    let total = staged.usage.first().map_or(0, |u| u.total);
    assert!(
        total > 100 * MIB && total <= 128 * MIB,
        "the filesystem on node-2 sees the new size: {staged:?}"
    );
    let grown = node2
        .client
        .node_expand_volume(csi::NodeExpandVolumeRequest {
            volume_id: "pvc-flow".into(),
            volume_path: target2.display().to_string(),
            capacity_range: Some(csi::CapacityRange {
                required_bytes: 128 * MIB,
                limit_bytes: 0,
            }),
            ..Default::default()
        })
        .await?
        .into_inner();
    assert_eq!(
        grown.capacity_bytes,
        128 * MIB,
        "a filesystem that fills its device needs no online growth"
    );
    let read = std::fs::read(target2.join("data.bin"))?;
    assert!(read == payload, "the file survived the growth");

    let got = controller
        .controller_get_volume(csi::ControllerGetVolumeRequest {
            volume_id: "pvc-flow".into(),
        })
        .await?
        .into_inner();
    let status = got.status.unwrap_or_default();
    assert_eq!(status.published_node_ids, ["node-2"]);
    assert_eq!(status.volume_condition.map(|c| c.abnormal), Some(false));

    unpublish_and_unstage(&mut node2, "pvc-flow", &dir2).await?;
    unpublish_and_delete(&mut controller, &cluster, "pvc-flow", "node-2").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_down_unstages_what_node_plugins_left() -> Result<()> {
    let cluster = Cluster::up("csi-down", 2, "embedded", &[])?;
    cluster.wait_all_up(2)?;
    let info = cluster.info()?;
    for node in &info.nodes {
        let socket = node.csi_socket().context("a node plugin per node")?;
        assert!(socket.exists(), "{} exists", socket.display());
        let mode = std::fs::metadata(socket)?.permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o600,
            "the CSI socket is for root only"
        );
    }
    let mut controller = ControllerClient::new(channel(&cluster.path.join("csi.sock")).await?);
    let mut node2 = NodePlugin::start(&cluster, "node-2").await?.client;
    let answer = node2.node_get_info(csi::NodeGetInfoRequest {}).await?;
    assert_eq!(answer.into_inner().node_id, "node-2");

    let volume = controller
        .create_volume(create_request("pvc-left", 32 * MIB, 2))
        .await?
        .into_inner()
        .volume
        .context("no volume")?;
    let context = controller
        .controller_publish_volume(csi::ControllerPublishVolumeRequest {
            volume_id: "pvc-left".into(),
            node_id: "node-2".into(),
            volume_capability: Some(mount_cap("")),
            volume_context: volume.volume_context.clone(),
            ..Default::default()
        })
        .await?
        .into_inner()
        .publish_context;
    // Kubelet's paths are outside the cluster directory: down must find
    // the mounts by their device, not by where they are.
    let kubelet = cluster.dir.join("kubelet");
    let staging = kubelet.join("staging");
    let target = kubelet.join("target");
    std::fs::create_dir_all(&staging)?;
    node2
        .node_stage_volume(csi::NodeStageVolumeRequest {
            volume_id: "pvc-left".into(),
            publish_context: context.clone(),
            staging_target_path: staging.display().to_string(),
            volume_capability: Some(mount_cap("")),
            volume_context: volume.volume_context.clone(),
            ..Default::default()
        })
        .await?;
    node2
        .node_publish_volume(csi::NodePublishVolumeRequest {
            volume_id: "pvc-left".into(),
            publish_context: context,
            staging_target_path: staging.display().to_string(),
            target_path: target.display().to_string(),
            volume_capability: Some(mount_cap("")),
            volume_context: volume.volume_context.clone(),
            ..Default::default()
        })
        .await?;
    std::fs::write(target.join("left.txt"), b"left behind")?;
    assert_eq!(fs_type_at(&target).as_deref(), Some("ext4"));

    cluster.cli_ok(&["cluster", "down"])?;
    assert_eq!(fs_type_at(&target), None, "the publish bind mount is gone");
    assert_eq!(fs_type_at(&staging), None, "the staging mount is gone");
    assert!(
        crate::harness::cluster::loops_under(&cluster.path).is_empty(),
        "no loop device left"
    );
    assert!(
        crate::harness::cluster::mounts_under(&cluster.path).is_empty(),
        "no FUSE or pool mount left"
    );
    for node in &info.nodes {
        let plugin = node.plugin.as_ref().context("plugin recorded")?;
        assert!(
            !crate::harness::cluster::pid_running(plugin.pid),
            "the node plugin of {} stopped",
            node.node_id
        );
    }
    Ok(())
}
