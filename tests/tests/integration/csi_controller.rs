//! The CSI Controller service as the sidecars use it: tonic clients on the
//! controller's unix socket (`DIR/csi.sock`) of a real three-node local
//! cluster with 1 GiB pools. Every Controller RPC: success, idempotency,
//! and each error code the CSI spec names for it, plus the per-volume
//! guard (`ABORTED`, held deterministically by a SIGSTOPped agent) and the
//! volume condition through a SIGKILLed agent and its return.
//!
//! Each test starts one cluster and groups many cases; the `Cluster`
//! fixture stops it on drop, and a stopped agent is continued by a guard
//! that also runs when an assertion fails. Every wait is bounded.

use std::collections::HashMap;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use ballast_csi::cluster::ProcessInfo;
use ballast_proto::csi;
use ballast_proto::csi::controller_client::ControllerClient;
use ballast_proto::csi::controller_service_capability::rpc::Type as RpcType;
use ballast_proto::csi::volume_capability::access_mode::Mode;
use ballast_proto::csi::volume_capability::{AccessMode, AccessType, BlockVolume, MountVolume};
use nix::sys::signal::Signal;
use tonic::Code;
use tonic::transport::Channel;

use crate::harness::cluster::Cluster;
use crate::harness::csi::{MIB, NBD_URI_KEY, channel, create_request};
use crate::harness::{qemu_io, wait_for};

const TOPOLOGY_NODE_KEY: &str = "topology.ballast.io/node";

type Ctl = ControllerClient<Channel>;

/// A three-node cluster and a client of its controller's CSI socket.
async fn cluster(name: &str) -> Result<(Cluster, Ctl)> {
    let cluster = Cluster::up(name, 3, "embedded", &[])?;
    cluster.wait_all_up(3)?;
    let ctl = ControllerClient::new(channel(&cluster.path.join("csi.sock")).await?);
    Ok((cluster, ctl))
}

fn cap(mode: Mode, fs_type: Option<&str>) -> csi::VolumeCapability {
    csi::VolumeCapability {
        access_mode: Some(AccessMode { mode: mode.into() }),
        access_type: Some(match fs_type {
            None => AccessType::Block(BlockVolume {}),
            Some(fs) => AccessType::Mount(MountVolume {
                fs_type: fs.into(),
                ..Default::default()
            }),
        }),
    }
}

fn on_node(node: &str) -> csi::Topology {
    csi::Topology {
        segments: HashMap::from([(TOPOLOGY_NODE_KEY.to_string(), node.to_string())]),
    }
}

/// Checks that `result` failed with `code` and a message holding `says`.
fn refused<T: std::fmt::Debug>(
    result: Result<tonic::Response<T>, tonic::Status>,
    code: Code,
    says: &str,
    case: &str,
) -> Result<()> {
    let status = match result {
        Ok(response) => anyhow::bail!("{case}: succeeded, expected {code:?}: {response:?}"),
        Err(status) => status,
    };
    ensure!(
        status.code() == code && status.message().contains(says),
        "{case}: expected {code:?} saying {says:?}, got {:?}: {}",
        status.code(),
        status.message()
    );
    Ok(())
}

async fn create(ctl: &mut Ctl, req: csi::CreateVolumeRequest) -> Result<csi::Volume> {
    let name = req.name.clone();
    ctl.create_volume(req)
        .await
        .with_context(|| format!("CreateVolume {name}"))?
        .into_inner()
        .volume
        .context("CreateVolume returned no volume")
}

/// Nodes holding a replica named `volume`.
fn holders(cluster: &Cluster, volume: &str) -> Result<Vec<String>> {
    Ok(cluster
        .all_replicas()?
        .into_iter()
        .filter(|(_, names)| names.iter().any(|n| n == volume))
        .map(|(node, _)| node)
        .collect())
}

async fn get(ctl: &mut Ctl, volume: &str) -> Result<csi::ControllerGetVolumeResponse> {
    Ok(ctl
        .controller_get_volume(csi::ControllerGetVolumeRequest {
            volume_id: volume.into(),
        })
        .await?
        .into_inner())
}

async fn condition(ctl: &mut Ctl, volume: &str) -> Result<csi::VolumeCondition> {
    get(ctl, volume)
        .await?
        .status
        .and_then(|s| s.volume_condition)
        .context("ControllerGetVolume has no volume_condition")
}

fn publish_request(
    volume: &str,
    node: &str,
    cap: csi::VolumeCapability,
) -> csi::ControllerPublishVolumeRequest {
    csi::ControllerPublishVolumeRequest {
        volume_id: volume.into(),
        node_id: node.into(),
        volume_capability: Some(cap),
        ..Default::default()
    }
}

fn unpublish_request(volume: &str, node: &str) -> csi::ControllerUnpublishVolumeRequest {
    csi::ControllerUnpublishVolumeRequest {
        volume_id: volume.into(),
        node_id: node.into(),
        ..Default::default()
    }
}

fn expand_request(volume: &str, required: i64, limit: i64) -> csi::ControllerExpandVolumeRequest {
    csi::ControllerExpandVolumeRequest {
        volume_id: volume.into(),
        capacity_range: Some(csi::CapacityRange {
            required_bytes: required,
            limit_bytes: limit,
        }),
        volume_capability: Some(cap(Mode::SingleNodeWriter, Some(""))),
        ..Default::default()
    }
}

/// GetCapacity's available capacity and maximum volume size.
async fn capacity_of(ctl: &mut Ctl, req: csi::GetCapacityRequest) -> Result<(i64, i64)> {
    let answer = ctl.get_capacity(req).await?.into_inner();
    Ok((
        answer.available_capacity,
        answer.maximum_volume_size.unwrap_or(-1),
    ))
}

/// A SIGSTOPped process, continued when dropped (also when a test fails).
struct Stopped(ProcessInfo);

impl Stopped {
    fn new(process: ProcessInfo) -> Result<Self> {
        process.signal(Signal::SIGSTOP)?;
        Ok(Self(process))
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        let _ = self.0.signal(Signal::SIGCONT);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_validate_list_and_capacity() -> Result<()> {
    let (cluster, mut ctl) = cluster("csictl-create").await?;

    let caps = ctl
        .controller_get_capabilities(csi::ControllerGetCapabilitiesRequest {})
        .await?
        .into_inner();
    let mut announced: Vec<RpcType> = caps
        .capabilities
        .iter()
        .filter_map(|c| {
            let csi::controller_service_capability::Type::Rpc(rpc) = c.r#type.as_ref()?;
            Some(rpc.r#type())
        })
        .collect();
    announced.sort_unstable();
    assert_eq!(
        announced,
        [
            RpcType::CreateDeleteVolume,
            RpcType::PublishUnpublishVolume,
            RpcType::ListVolumes,
            RpcType::GetCapacity,
            RpcType::CreateDeleteSnapshot,
            RpcType::ListSnapshots,
            RpcType::CloneVolume,
            RpcType::ExpandVolume,
            RpcType::ListVolumesPublishedNodes,
            RpcType::VolumeCondition,
            RpcType::GetVolume,
            RpcType::SingleNodeMultiWriter,
            RpcType::GetSnapshot,
        ],
        "no readonly or modify capability until they exist"
    );

    // CreateVolume: success and idempotency.
    let volume = create(&mut ctl, create_request("vol-a", 64 * MIB, 3)).await?;
    assert_eq!(volume.capacity_bytes, 64 * MIB);
    assert_eq!(
        volume.volume_context.get("fsType").map(String::as_str),
        Some("ext4")
    );
    assert!(
        volume.accessible_topology.is_empty(),
        "accessible from every node: {volume:?}"
    );
    assert_eq!(holders(&cluster, "vol-a")?, ["node-1", "node-2", "node-3"]);
    let again = create(&mut ctl, create_request("vol-a", 64 * MIB, 3)).await?;
    assert_eq!(again, volume, "the same request returns the same volume");
    let smaller = create(&mut ctl, create_request("vol-a", 32 * MIB, 3)).await?;
    assert_eq!(smaller, volume, "64 MiB satisfies required_bytes of 32 MiB");
    let mut multi_writer = create_request("vol-a", 64 * MIB, 3);
    multi_writer.volume_capabilities = vec![cap(Mode::SingleNodeMultiWriter, Some("ext4"))];
    assert_eq!(
        create(&mut ctl, multi_writer).await?,
        volume,
        "any single-node mode of the same access type"
    );

    // ALREADY_EXISTS: the name with a request the volume does not satisfy.
    let mut incompatible: Vec<(&str, csi::CreateVolumeRequest, &str)> = vec![
        ("larger", create_request("vol-a", 128 * MIB, 3), "size"),
        (
            "fewer replicas",
            create_request("vol-a", 64 * MIB, 2),
            "replica",
        ),
    ];
    let mut xfs = create_request("vol-a", 64 * MIB, 3);
    xfs.parameters.insert("fsType".into(), "xfs".into());
    incompatible.push(("another filesystem", xfs, "mount (xfs)"));
    let mut block = create_request("vol-a", 64 * MIB, 3);
    block.volume_capabilities = vec![cap(Mode::SingleNodeWriter, None)];
    incompatible.push(("block access", block, "block"));
    let mut thick = create_request("vol-a", 64 * MIB, 3);
    thick.parameters.insert("thin".into(), "false".into());
    incompatible.push(("thick", thick, "thin"));
    let mut elsewhere = create_request("vol-a", 64 * MIB, 3);
    elsewhere
        .parameters
        .insert("allowedNodes".into(), "node-1,node-2".into());
    incompatible.push((
        "outside allowedNodes",
        elsewhere,
        "replica on node-3 is not among allowedNodes",
    ));
    for (case, req, says) in incompatible {
        refused(
            ctl.create_volume(req).await,
            Code::AlreadyExists,
            says,
            case,
        )?;
    }

    // INVALID_ARGUMENT, before anything is created.
    let mut invalid: Vec<(&str, csi::CreateVolumeRequest, &str)> = vec![
        ("no name", create_request("", MIB, 1), "name"),
        ("bad name", create_request("a/b", MIB, 1), "may only hold"),
    ];
    let mut no_caps = create_request("vol-x", MIB, 1);
    no_caps.volume_capabilities.clear();
    invalid.push(("no capabilities", no_caps, "volume_capabilities"));
    let mut no_mode = create_request("vol-x", MIB, 1);
    no_mode.volume_capabilities[0].access_mode = None;
    invalid.push(("no access mode", no_mode, "access_mode"));
    for mode in [
        Mode::MultiNodeMultiWriter,
        Mode::MultiNodeSingleWriter,
        Mode::MultiNodeReaderOnly,
    ] {
        let mut multi = create_request("vol-x", MIB, 1);
        multi.volume_capabilities = vec![cap(mode, Some(""))];
        invalid.push((mode.as_str_name(), multi, "single-node"));
    }
    let mut btrfs = create_request("vol-x", MIB, 1);
    btrfs.volume_capabilities = vec![cap(Mode::SingleNodeWriter, Some("btrfs"))];
    btrfs.parameters.remove("fsType");
    invalid.push(("btrfs", btrfs, "btrfs"));
    let mut contradiction = create_request("vol-x", MIB, 1);
    contradiction.volume_capabilities = vec![cap(Mode::SingleNodeWriter, Some("xfs"))];
    invalid.push(("fs_type against fsType", contradiction, "fsType"));
    let mut unknown = create_request("vol-x", MIB, 1);
    unknown.parameters.insert("colour".into(), "red".into());
    invalid.push(("unknown parameter", unknown, "colour"));
    let mut mutable = create_request("vol-x", MIB, 1);
    mutable
        .mutable_parameters
        .insert("iops".into(), "100".into());
    invalid.push(("mutable parameters", mutable, "MODIFY_VOLUME"));
    let mut typeless = create_request("vol-x", MIB, 1);
    typeless.volume_content_source = Some(csi::VolumeContentSource { r#type: None });
    invalid.push(("content source without a type", typeless, "no type"));
    for (case, req, says) in invalid {
        refused(
            ctl.create_volume(req).await,
            Code::InvalidArgument,
            says,
            case,
        )?;
    }

    // OUT_OF_RANGE and RESOURCE_EXHAUSTED.
    let mut limited = create_request("vol-x", MIB + 1, 1);
    limited.capacity_range = Some(csi::CapacityRange {
        required_bytes: MIB + 1,
        limit_bytes: MIB + 2,
    });
    refused(
        ctl.create_volume(limited).await,
        Code::OutOfRange,
        "4096",
        "no aligned size",
    )?;
    let mut inverted = create_request("vol-x", 2 * MIB, 1);
    inverted.capacity_range = Some(csi::CapacityRange {
        required_bytes: 2 * MIB,
        limit_bytes: MIB,
    });
    refused(
        ctl.create_volume(inverted).await,
        Code::OutOfRange,
        "exceeds",
        "required > limit",
    )?;
    refused(
        ctl.create_volume(create_request("vol-x", MIB, 4)).await,
        Code::ResourceExhausted,
        "Not enough nodes",
        "4 replicas on 3 nodes",
    )?;
    refused(
        ctl.create_volume(create_request("vol-x", 64 << 30, 1))
            .await,
        Code::ResourceExhausted,
        "have room",
        "larger than any pool may hold",
    )?;
    let mut nowhere = create_request("vol-x", MIB, 1);
    nowhere
        .parameters
        .insert("allowedNodes".into(), "node-9".into());
    refused(
        ctl.create_volume(nowhere).await,
        Code::ResourceExhausted,
        "3 other up node(s) are not among allowedNodes",
        "an allowed node that does not exist",
    )?;
    let mut cramped = create_request("vol-x", MIB, 2);
    cramped
        .parameters
        .insert("allowedNodes".into(), "node-2".into());
    refused(
        ctl.create_volume(cramped).await,
        Code::ResourceExhausted,
        "2 other up node(s) are not among allowedNodes",
        "two replicas on one allowed node",
    )?;
    let mut malformed = create_request("vol-x", MIB, 1);
    malformed
        .parameters
        .insert("allowedNodes".into(), "node-1,,node-2".into());
    refused(
        ctl.create_volume(malformed).await,
        Code::InvalidArgument,
        "allowedNodes",
        "an empty node id in allowedNodes",
    )?;
    assert!(
        holders(&cluster, "vol-x")?.is_empty(),
        "no refused request created a replica"
    );

    // Topology: the volume is reachable from every node, so a requisite
    // of one node (what csi-sanity and a WaitForFirstConsumer claim send)
    // is met by any placement; its node gets one replica for locality.
    let mut pinned = create_request("vol-pinned", 16 * MIB, 3);
    pinned.accessibility_requirements = Some(csi::TopologyRequirement {
        requisite: vec![on_node("node-1")],
        preferred: Vec::new(),
    });
    let volume = create(&mut ctl, pinned).await?;
    assert!(volume.accessible_topology.is_empty(), "{volume:?}");
    assert_eq!(
        holders(&cluster, "vol-pinned")?,
        ["node-1", "node-2", "node-3"]
    );
    let mut near = create_request("vol-near", 16 * MIB, 1);
    near.accessibility_requirements = Some(csi::TopologyRequirement {
        requisite: vec![on_node("node-3"), on_node("node-1")],
        preferred: Vec::new(),
    });
    create(&mut ctl, near).await?;
    assert_eq!(holders(&cluster, "vol-near")?, ["node-3"]);
    for volume_id in ["vol-pinned", "vol-near"] {
        ctl.delete_volume(csi::DeleteVolumeRequest {
            volume_id: volume_id.into(),
            ..Default::default()
        })
        .await?;
    }
    // The first preferred node that fits holds a replica; allowedNodes
    // hold every replica.
    let mut local = create_request("vol-local", 16 * MIB, 1);
    local.accessibility_requirements = Some(csi::TopologyRequirement {
        requisite: Vec::new(),
        preferred: vec![on_node("node-2"), on_node("node-1")],
    });
    create(&mut ctl, local).await?;
    assert_eq!(holders(&cluster, "vol-local")?, ["node-2"]);
    let mut fenced = create_request("vol-fenced", 16 * MIB, 2);
    fenced
        .parameters
        .insert("allowedNodes".into(), "node-1,node-3".into());
    fenced.accessibility_requirements = Some(csi::TopologyRequirement {
        requisite: vec![on_node("node-2")],
        preferred: vec![on_node("node-3")],
    });
    create(&mut ctl, fenced).await?;
    assert_eq!(holders(&cluster, "vol-fenced")?, ["node-1", "node-3"]);

    // ValidateVolumeCapabilities.
    let validate = |caps: Vec<csi::VolumeCapability>,
                    context: &[(&str, &str)],
                    parameters: &[(&str, &str)]| {
        let pairs = |list: &[(&str, &str)]| {
            list.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<HashMap<_, _>>()
        };
        csi::ValidateVolumeCapabilitiesRequest {
            volume_id: "vol-a".into(),
            volume_capabilities: caps,
            volume_context: pairs(context),
            parameters: pairs(parameters),
            ..Default::default()
        }
    };
    let confirmed = [
        validate(vec![cap(Mode::SingleNodeWriter, Some(""))], &[], &[]),
        validate(
            vec![
                cap(Mode::SingleNodeMultiWriter, Some("ext4")),
                cap(Mode::SingleNodeReaderOnly, Some("")),
            ],
            &[("fsType", "ext4")],
            &[("replicas", "3"), ("thin", "true"), ("fsType", "ext4")],
        ),
    ];
    for req in confirmed {
        let answer = ctl
            .validate_volume_capabilities(req.clone())
            .await?
            .into_inner();
        let confirmed = answer.confirmed.context("not confirmed")?;
        assert_eq!(confirmed.volume_capabilities, req.volume_capabilities);
        assert_eq!(confirmed.volume_context, req.volume_context);
        assert_eq!(confirmed.parameters, req.parameters);
    }
    let rejected = [
        (
            "block",
            validate(vec![cap(Mode::SingleNodeWriter, None)], &[], &[]),
            "created for mount (ext4) access, not block",
        ),
        (
            "xfs",
            validate(vec![cap(Mode::SingleNodeWriter, Some("xfs"))], &[], &[]),
            "not mount (xfs)",
        ),
        (
            "multi-node",
            validate(vec![cap(Mode::MultiNodeReaderOnly, Some(""))], &[], &[]),
            "single-node",
        ),
        (
            "replicas",
            validate(
                vec![cap(Mode::SingleNodeWriter, Some(""))],
                &[],
                &[("replicas", "2")],
            ),
            "has 3 replica(s)",
        ),
        (
            "context",
            validate(
                vec![cap(Mode::SingleNodeWriter, Some(""))],
                &[("fsType", "xfs")],
                &[],
            ),
            "volume_context",
        ),
    ];
    for (case, req, says) in rejected {
        let answer = ctl.validate_volume_capabilities(req).await?.into_inner();
        ensure!(
            answer.confirmed.is_none() && answer.message.contains(says),
            "{case}: expected a message saying {says:?}: {answer:?}"
        );
    }
    let mut unknown = validate(vec![cap(Mode::SingleNodeWriter, Some(""))], &[], &[]);
    unknown.volume_id = "vol-nope".into();
    refused(
        ctl.validate_volume_capabilities(unknown).await,
        Code::NotFound,
        "vol-nope",
        "unknown volume",
    )?;
    let mut no_id = validate(vec![cap(Mode::SingleNodeWriter, Some(""))], &[], &[]);
    no_id.volume_id.clear();
    refused(
        ctl.validate_volume_capabilities(no_id).await,
        Code::InvalidArgument,
        "volume_id",
        "no id",
    )?;
    refused(
        ctl.validate_volume_capabilities(validate(Vec::new(), &[], &[]))
            .await,
        Code::InvalidArgument,
        "volume_capabilities",
        "no capabilities",
    )?;

    // ListVolumes: pages of two in id order, then a token that names a
    // volume deleted since.
    for name in ["vol-b", "vol-c"] {
        create(&mut ctl, create_request(name, 8 * MIB, 1)).await?;
    }
    let expected = ["vol-a", "vol-b", "vol-c", "vol-fenced", "vol-local"];
    let mut seen = Vec::new();
    let mut tokens = Vec::new();
    let mut token = String::new();
    for _ in 0..expected.len() {
        let page = ctl
            .list_volumes(csi::ListVolumesRequest {
                max_entries: 2,
                starting_token: token.clone(),
            })
            .await?
            .into_inner();
        ensure!(page.entries.len() <= 2, "{page:?}");
        for entry in &page.entries {
            let volume = entry.volume.as_ref().context("entry without volume")?;
            let status = entry.status.as_ref().context("entry without status")?;
            let condition = status.volume_condition.as_ref().context("no condition")?;
            ensure!(!condition.abnormal, "{entry:?}");
            ensure!(status.published_node_ids.is_empty(), "{entry:?}");
            ensure!(volume.volume_context.contains_key("fsType"), "{entry:?}");
            seen.push(volume.volume_id.clone());
        }
        token = page.next_token;
        if token.is_empty() {
            break;
        }
        tokens.push(token.clone());
    }
    assert_eq!(seen, expected, "every volume once, in id order");
    let all = ctl
        .list_volumes(csi::ListVolumesRequest::default())
        .await?
        .into_inner();
    assert_eq!(all.entries.len(), expected.len());
    assert!(all.next_token.is_empty());
    refused(
        ctl.list_volumes(csi::ListVolumesRequest {
            max_entries: 0,
            starting_token: "invalid-token".into(),
        })
        .await,
        Code::Aborted,
        "starting_token",
        "a token never handed out",
    )?;
    let stale = tokens
        .first()
        .context("no next_token after page one")?
        .clone();
    ctl.delete_volume(csi::DeleteVolumeRequest {
        volume_id: stale.clone(),
        ..Default::default()
    })
    .await?;
    refused(
        ctl.list_volumes(csi::ListVolumesRequest {
            max_entries: 2,
            starting_token: stale,
        })
        .await,
        Code::Aborted,
        "list again",
        "a token whose volume was deleted",
    )?;
    refused(
        ctl.list_volumes(csi::ListVolumesRequest {
            max_entries: -1,
            starting_token: String::new(),
        })
        .await,
        Code::InvalidArgument,
        "max_entries",
        "negative max_entries",
    )?;

    // GetCapacity: per node segment and for the whole cluster, thin or
    // thick, and nothing for what cannot be served.
    let capacity = |segment: Option<&str>, parameters: &[(&str, &str)]| csi::GetCapacityRequest {
        volume_capabilities: vec![cap(Mode::SingleNodeWriter, Some(""))],
        parameters: parameters
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        accessible_topology: segment.map(on_node),
    };
    let thick_params = [("replicas", "1"), ("thin", "false")];
    let (node1_thin, node1_thin_max) =
        capacity_of(&mut ctl, capacity(Some("node-1"), &[("replicas", "1")])).await?;
    let (node1_thick, _) = capacity_of(&mut ctl, capacity(Some("node-1"), &thick_params)).await?;
    assert!(
        node1_thick > 0 && node1_thick <= node1_thin,
        "{node1_thick} {node1_thin}"
    );
    assert!(node1_thin_max > 0 && node1_thin_max <= node1_thin);
    let (cluster_one, _) = capacity_of(&mut ctl, capacity(None, &[("replicas", "1")])).await?;
    let (cluster_three, cluster_three_max) =
        capacity_of(&mut ctl, capacity(None, &[("replicas", "3")])).await?;
    assert!(
        cluster_one > node1_thin && cluster_three < cluster_one,
        "the cluster holds more than one node, three copies take more: {cluster_one} {cluster_three}"
    );
    assert!(cluster_three_max > 0);
    assert_eq!(
        capacity_of(&mut ctl, capacity(None, &[("replicas", "4")])).await?,
        (0, 0),
        "three nodes"
    );
    assert_eq!(
        capacity_of(&mut ctl, capacity(Some("node-9"), &[]))
            .await?
            .0,
        0,
        "no such node"
    );
    let mut multi = capacity(None, &[]);
    multi.volume_capabilities = vec![cap(Mode::MultiNodeMultiWriter, None)];
    assert_eq!(
        capacity_of(&mut ctl, multi).await?.0,
        0,
        "a mode Ballast cannot serve"
    );
    // A thick volume on node-1 takes its size from node-1's room.
    let mut thick = create_request("vol-thick", 256 * MIB, 1);
    thick.parameters.insert("thin".into(), "false".into());
    thick.accessibility_requirements = Some(csi::TopologyRequirement {
        requisite: vec![on_node("node-1")],
        preferred: Vec::new(),
    });
    create(&mut ctl, thick).await?;
    assert_eq!(holders(&cluster, "vol-thick")?, ["node-1"]);
    // Heartbeats bring the agents' own figures: wait for one that has
    // the new replica.
    let mut after = node1_thick;
    for _ in 0..100 {
        after = capacity_of(&mut ctl, capacity(Some("node-1"), &thick_params))
            .await?
            .0;
        if node1_thick - after >= 256 * MIB {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        node1_thick - after >= 256 * MIB,
        "node-1's thick capacity went from {node1_thick} to {after}"
    );

    // Sources that do not exist (CSI spec, CreateVolume: "Source does
    // not exist", NOT_FOUND).
    for (case, source, says) in [
        (
            "missing snapshot",
            csi::volume_content_source::Type::Snapshot(
                csi::volume_content_source::SnapshotSource {
                    snapshot_id: "snap-missing".into(),
                },
            ),
            "Snapshot snap-missing does not exist",
        ),
        (
            "missing volume",
            csi::volume_content_source::Type::Volume(csi::volume_content_source::VolumeSource {
                volume_id: "vol-missing".into(),
            }),
            "Volume vol-missing does not exist",
        ),
    ] {
        let mut from = create_request("vol-x", MIB, 1);
        from.volume_content_source = Some(csi::VolumeContentSource {
            r#type: Some(source),
        });
        refused(ctl.create_volume(from).await, Code::NotFound, says, case)?;
    }
    refused(
        ctl.create_snapshot(csi::CreateSnapshotRequest {
            source_volume_id: "vol-missing".into(),
            name: "snap".into(),
            ..Default::default()
        })
        .await,
        Code::NotFound,
        "Volume vol-missing does not exist",
        "CreateSnapshot of a missing volume",
    )?;
    let listed = ctl
        .list_snapshots(csi::ListSnapshotsRequest::default())
        .await?
        .into_inner();
    assert!(listed.entries.is_empty(), "{listed:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_expand_unpublish_and_delete() -> Result<()> {
    let (cluster, mut ctl) = cluster("csictl-publish").await?;
    create(&mut ctl, create_request("vol-p", 64 * MIB, 3)).await?;
    let mut block = create_request("vol-blk", 16 * MIB, 2);
    block.volume_capabilities = vec![cap(Mode::SingleNodeWriter, None)];
    let block = create(&mut ctl, block).await?;
    assert!(block.volume_context.is_empty(), "no filesystem: {block:?}");
    let mount = || cap(Mode::SingleNodeWriter, Some(""));

    // ControllerPublishVolume: success, idempotency, every error.
    let context = ctl
        .controller_publish_volume(publish_request("vol-p", "node-1", mount()))
        .await?
        .into_inner()
        .publish_context;
    let uri = context.get(NBD_URI_KEY).context("no NBD URI")?.clone();
    qemu_io(&uri, &["write -P 0x5a 0 1M", "flush", "read -P 0x5a 0 1M"])?;
    let again = ctl
        .controller_publish_volume(publish_request(
            "vol-p",
            "node-1",
            cap(Mode::SingleNodeWriter, Some("ext4")),
        ))
        .await?
        .into_inner()
        .publish_context;
    assert_eq!(
        again, context,
        "the same publication, fs_type spelled out or not"
    );
    refused(
        ctl.controller_publish_volume(publish_request(
            "vol-p",
            "node-1",
            cap(Mode::SingleNodeReaderOnly, Some("")),
        ))
        .await,
        Code::AlreadyExists,
        "as SINGLE_NODE_WRITER mount (ext4), not as SINGLE_NODE_READER_ONLY",
        "same node, another access mode",
    )?;
    refused(
        ctl.controller_publish_volume(publish_request(
            "vol-p",
            "node-1",
            cap(Mode::SingleNodeWriter, None),
        ))
        .await,
        Code::InvalidArgument,
        "created for mount (ext4) access, not block",
        "an access type the volume was not created for",
    )?;
    let mut readonly = publish_request("vol-p", "node-1", mount());
    readonly.readonly = true;
    refused(
        ctl.controller_publish_volume(readonly).await,
        Code::InvalidArgument,
        "PUBLISH_READONLY",
        "readonly",
    )?;
    refused(
        ctl.controller_publish_volume(publish_request("vol-p", "node-2", mount()))
            .await,
        Code::FailedPrecondition,
        "published on node node-1",
        "a second node",
    )?;
    refused(
        ctl.controller_publish_volume(publish_request("vol-nope", "node-1", mount()))
            .await,
        Code::NotFound,
        "vol-nope",
        "unknown volume",
    )?;
    refused(
        ctl.controller_publish_volume(publish_request(
            "vol-blk",
            "node-9",
            cap(Mode::SingleNodeWriter, None),
        ))
        .await,
        Code::NotFound,
        "node-9",
        "unknown node",
    )?;
    for (case, mut req, says) in [
        (
            "no volume id",
            publish_request("", "node-1", mount()),
            "volume_id",
        ),
        (
            "no node id",
            publish_request("vol-p", "", mount()),
            "node_id",
        ),
        (
            "no capability",
            publish_request("vol-p", "node-1", mount()),
            "volume_capability",
        ),
    ] {
        if case == "no capability" {
            req.volume_capability = None;
        }
        refused(
            ctl.controller_publish_volume(req).await,
            Code::InvalidArgument,
            says,
            case,
        )?;
    }

    // ControllerGetVolume and ListVolumes show where it is published.
    let got = get(&mut ctl, "vol-p").await?;
    let status = got.status.context("no status")?;
    assert_eq!(status.published_node_ids, ["node-1"]);
    assert_eq!(status.volume_condition.map(|c| c.abnormal), Some(false));
    assert_eq!(
        got.volume.map(|v| v.volume_context),
        Some(HashMap::from([("fsType".to_string(), "ext4".to_string())]))
    );
    let listed = ctl
        .list_volumes(csi::ListVolumesRequest::default())
        .await?
        .into_inner();
    let published: Vec<(String, Vec<String>)> = listed
        .entries
        .iter()
        .map(|e| {
            (
                e.volume
                    .as_ref()
                    .map(|v| v.volume_id.clone())
                    .unwrap_or_default(),
                e.status
                    .as_ref()
                    .map(|s| s.published_node_ids.clone())
                    .unwrap_or_default(),
            )
        })
        .collect();
    assert_eq!(
        published,
        [
            ("vol-blk".to_string(), Vec::new()),
            ("vol-p".to_string(), vec!["node-1".to_string()])
        ]
    );
    refused(
        ctl.controller_get_volume(csi::ControllerGetVolumeRequest {
            volume_id: "vol-nope".into(),
        })
        .await,
        Code::NotFound,
        "vol-nope",
        "GetVolume of an unknown volume",
    )?;
    refused(
        ctl.controller_get_volume(csi::ControllerGetVolumeRequest::default())
            .await,
        Code::InvalidArgument,
        "volume_id",
        "GetVolume without id",
    )?;

    // Expansion is offline and deletion needs an unpublished volume.
    refused(
        ctl.controller_expand_volume(expand_request("vol-p", 128 * MIB, 0))
            .await,
        Code::FailedPrecondition,
        "unpublish it first",
        "expand while published",
    )?;
    refused(
        ctl.delete_volume(csi::DeleteVolumeRequest {
            volume_id: "vol-p".into(),
            ..Default::default()
        })
        .await,
        Code::FailedPrecondition,
        "node-1",
        "delete while published",
    )?;

    // ControllerUnpublishVolume: OK for what is not published.
    for (case, req) in [
        (
            "a node it is not published on",
            unpublish_request("vol-p", "node-2"),
        ),
        ("an unknown node", unpublish_request("vol-p", "node-9")),
        ("an unknown volume", unpublish_request("vol-nope", "node-1")),
    ] {
        ctl.controller_unpublish_volume(req)
            .await
            .with_context(|| format!("unpublish from {case}"))?;
    }
    assert_eq!(
        get(&mut ctl, "vol-p")
            .await?
            .status
            .map(|s| s.published_node_ids),
        Some(vec!["node-1".to_string()]),
        "still published on node-1"
    );
    refused(
        ctl.controller_unpublish_volume(unpublish_request("", "node-1"))
            .await,
        Code::InvalidArgument,
        "volume_id",
        "unpublish without volume id",
    )?;
    for _ in 0..2 {
        ctl.controller_unpublish_volume(unpublish_request("vol-p", "node-1"))
            .await
            .context("unpublish, then again")?;
    }
    assert_eq!(
        get(&mut ctl, "vol-p")
            .await?
            .status
            .map(|s| s.published_node_ids),
        Some(Vec::new())
    );

    // ControllerExpandVolume.
    let grown = ctl
        .controller_expand_volume(expand_request("vol-p", 128 * MIB, 0))
        .await?
        .into_inner();
    assert_eq!(grown.capacity_bytes, 128 * MIB);
    assert!(grown.node_expansion_required, "a filesystem must grow too");
    for (node, replicas) in cluster.all_replicas()? {
        if replicas.iter().any(|r| r == "vol-p") {
            let size = cluster.replicas_on(&node)?.get("vol-p").map(|r| r.1);
            assert_eq!(size, Some(128 << 20), "vol-p on {node}");
        }
    }
    for (required, limit) in [(128 * MIB, 0), (MIB, 0)] {
        let same = ctl
            .controller_expand_volume(expand_request("vol-p", required, limit))
            .await?
            .into_inner();
        assert_eq!(same.capacity_bytes, 128 * MIB, "already that large");
    }
    refused(
        ctl.controller_expand_volume(expand_request("vol-p", MIB, 64 * MIB))
            .await,
        Code::OutOfRange,
        "above limit_bytes",
        "the volume is already above the limit",
    )?;
    refused(
        ctl.controller_expand_volume(expand_request("vol-nope", 128 * MIB, 0))
            .await,
        Code::NotFound,
        "vol-nope",
        "expand an unknown volume",
    )?;
    refused(
        ctl.controller_expand_volume(expand_request("", 128 * MIB, 0))
            .await,
        Code::InvalidArgument,
        "volume_id",
        "expand without id",
    )?;
    let mut no_range = expand_request("vol-p", 0, 0);
    no_range.capacity_range = None;
    refused(
        ctl.controller_expand_volume(no_range).await,
        Code::InvalidArgument,
        "capacity_range",
        "expand without range",
    )?;
    let mut raw = expand_request("vol-blk", 32 * MIB, 0);
    raw.volume_capability = Some(cap(Mode::SingleNodeWriter, None));
    let raw = ctl.controller_expand_volume(raw).await?.into_inner();
    assert!(
        !raw.node_expansion_required,
        "a block volume needs nothing on the node"
    );

    // Published on another node, the grown volume holds what was written.
    let moved = ctl
        .controller_publish_volume(publish_request("vol-p", "node-2", mount()))
        .await?
        .into_inner()
        .publish_context;
    let moved_uri = moved.get(NBD_URI_KEY).context("no NBD URI")?;
    assert_ne!(moved_uri, &uri, "the target moved to node-2");
    qemu_io(moved_uri, &["read -P 0x5a 0 1M", "read -P 0 100M 1M"])?;
    ctl.controller_unpublish_volume(unpublish_request("vol-p", ""))
        .await
        .context("unpublish from every node")?;

    // DeleteVolume.
    for _ in 0..2 {
        ctl.delete_volume(csi::DeleteVolumeRequest {
            volume_id: "vol-p".into(),
            ..Default::default()
        })
        .await
        .context("delete, then again")?;
    }
    assert!(
        holders(&cluster, "vol-p")?.is_empty(),
        "every replica destroyed"
    );
    refused(
        ctl.controller_get_volume(csi::ControllerGetVolumeRequest {
            volume_id: "vol-p".into(),
        })
        .await,
        Code::NotFound,
        "vol-p",
        "GetVolume after delete",
    )?;
    refused(
        ctl.delete_volume(csi::DeleteVolumeRequest::default()).await,
        Code::InvalidArgument,
        "volume_id",
        "delete without id",
    )?;
    let reused = create(&mut ctl, create_request("vol-p", 32 * MIB, 3)).await?;
    assert_eq!(reused.capacity_bytes, 32 * MIB, "the name is free again");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aborted_guard_and_volume_condition_under_agent_faults() -> Result<()> {
    let (cluster, mut ctl) = cluster("csictl-faults").await?;

    // A stopped agent holds CreateVolume inside the volume's guard: the
    // record exists (state creating) while a replica waits for node-2.
    let stopped = Stopped::new(cluster.node_process("node-2")?)?;
    let mut first = ctl.clone();
    let held = tokio::spawn(async move {
        first
            .create_volume(create_request("vol-held", 64 * MIB, 3))
            .await
    });
    wait_for("vol-held to be creating", Duration::from_secs(30), || {
        cluster
            .volume("vol-held")
            .ok()
            .filter(|v| v["status"] == "creating")
    })?;
    refused(
        ctl.create_volume(create_request("vol-held", 64 * MIB, 3))
            .await,
        Code::Aborted,
        "in progress",
        "a second CreateVolume",
    )?;
    refused(
        ctl.delete_volume(csi::DeleteVolumeRequest {
            volume_id: "vol-held".into(),
            ..Default::default()
        })
        .await,
        Code::Aborted,
        "in progress",
        "DeleteVolume during CreateVolume",
    )?;
    refused(
        ctl.controller_publish_volume(publish_request(
            "vol-held",
            "node-1",
            cap(Mode::SingleNodeWriter, Some("")),
        ))
        .await,
        Code::Aborted,
        "in progress",
        "ControllerPublishVolume during CreateVolume",
    )?;
    refused(
        ctl.controller_expand_volume(expand_request("vol-held", 128 * MIB, 0))
            .await,
        Code::Aborted,
        "in progress",
        "ControllerExpandVolume during CreateVolume",
    )?;
    drop(stopped);
    let created = tokio::time::timeout(Duration::from_secs(120), held)
        .await
        .context("the held CreateVolume never returned")??
        .context("the held CreateVolume failed once node-2 continued")?
        .into_inner()
        .volume
        .context("no volume")?;
    assert_eq!(created.capacity_bytes, 64 * MIB);
    assert_eq!(
        holders(&cluster, "vol-held")?,
        ["node-1", "node-2", "node-3"]
    );
    create(&mut ctl, create_request("vol-held", 64 * MIB, 3))
        .await
        .context("the guard is free again")?;

    // The condition: a replica's agent dies under I/O, the target drops
    // it, the volume is abnormal and says which; the node returns, the
    // replica is rebuilt, the volume is normal again.
    let uri = ctl
        .controller_publish_volume(publish_request(
            "vol-held",
            "node-1",
            cap(Mode::SingleNodeWriter, Some("")),
        ))
        .await?
        .into_inner()
        .publish_context
        .get(NBD_URI_KEY)
        .context("no NBD URI")?
        .clone();
    let healthy = condition(&mut ctl, "vol-held").await?;
    assert!(!healthy.abnormal, "{healthy:?}");
    cluster.node_process("node-3")?.signal(Signal::SIGKILL)?;
    qemu_io(&uri, &["write -P 0x3c 0 4M", "flush"])?;
    let mut abnormal = None;
    for _ in 0..600 {
        let now = condition(&mut ctl, "vol-held").await?;
        if now.abnormal {
            abnormal = Some(now);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let abnormal = abnormal.context("the volume never turned abnormal")?;
    assert!(
        abnormal.message.contains("2 of 3") && abnormal.message.contains("node-3"),
        "{abnormal:?}"
    );
    let listed = ctl
        .list_volumes(csi::ListVolumesRequest::default())
        .await?
        .into_inner();
    let entry = listed
        .entries
        .iter()
        .find(|e| e.volume.as_ref().is_some_and(|v| v.volume_id == "vol-held"))
        .context("vol-held not listed")?;
    assert_eq!(
        entry
            .status
            .as_ref()
            .and_then(|s| s.volume_condition.as_ref())
            .map(|c| c.abnormal),
        Some(true),
        "ListVolumes reports the same condition"
    );
    cluster.cli_ok(&["cluster", "restart-node", "node-3"])?;
    let mut recovered = false;
    for _ in 0..1800 {
        if !condition(&mut ctl, "vol-held").await?.abnormal {
            recovered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    ensure!(
        recovered,
        "the volume never recovered: {:?}",
        condition(&mut ctl, "vol-held").await?
    );
    qemu_io(&uri, &["read -P 0x3c 0 4M"])?;
    Ok(())
}
