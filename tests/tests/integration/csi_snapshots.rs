//! The CSI snapshot RPCs as the external-snapshotter and the
//! external-provisioner call them, over a local cluster's controller
//! socket: every field and error code the spec lists for CreateSnapshot,
//! DeleteSnapshot, ListSnapshots and GetSnapshot, and CreateVolume from a
//! snapshot or a volume; then the same through mounted ext4 and XFS
//! filesystems staged by the node plugins.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, Result, ensure};
use ballast_proto::csi;
use ballast_proto::csi::controller_client::ControllerClient;
use tonic::Code;
use tonic::transport::Channel;

use crate::harness::cluster::Cluster;
use crate::harness::csi::{
    MIB, NBD_URI_KEY, NodePlugin, channel, code, create_request, fs_type_at, mount_cap,
    stage_and_publish, unpublish_and_unstage,
};
use crate::harness::{qemu_io, run_ok};

type Ctl = ControllerClient<Channel>;

fn snapshot_request(name: &str, volume: &str) -> csi::CreateSnapshotRequest {
    csi::CreateSnapshotRequest {
        source_volume_id: volume.into(),
        name: name.into(),
        parameters: HashMap::from([(
            "csi.storage.k8s.io/volumesnapshot/name".to_string(),
            name.to_string(),
        )]),
        ..Default::default()
    }
}

async fn snapshot(ctl: &mut Ctl, name: &str, volume: &str) -> Result<csi::Snapshot> {
    ctl.create_snapshot(snapshot_request(name, volume))
        .await?
        .into_inner()
        .snapshot
        .context("no snapshot in the response")
}

fn from_snapshot(name: &str, snapshot: &str, required: i64) -> csi::CreateVolumeRequest {
    csi::CreateVolumeRequest {
        volume_content_source: Some(csi::VolumeContentSource {
            r#type: Some(csi::volume_content_source::Type::Snapshot(
                csi::volume_content_source::SnapshotSource {
                    snapshot_id: snapshot.into(),
                },
            )),
        }),
        ..create_request(name, required, 2)
    }
}

fn from_volume(name: &str, volume: &str) -> csi::CreateVolumeRequest {
    csi::CreateVolumeRequest {
        volume_content_source: Some(csi::VolumeContentSource {
            r#type: Some(csi::volume_content_source::Type::Volume(
                csi::volume_content_source::VolumeSource {
                    volume_id: volume.into(),
                },
            )),
        }),
        capacity_range: None,
        ..create_request(name, 0, 2)
    }
}

async fn create(ctl: &mut Ctl, req: csi::CreateVolumeRequest) -> Result<csi::Volume> {
    ctl.create_volume(req)
        .await?
        .into_inner()
        .volume
        .context("no volume in the response")
}

async fn list(ctl: &mut Ctl, req: csi::ListSnapshotsRequest) -> Result<(Vec<String>, String)> {
    let listed = ctl.list_snapshots(req).await?.into_inner();
    let ids = listed
        .entries
        .iter()
        .filter_map(|e| e.snapshot.as_ref().map(|s| s.snapshot_id.clone()))
        .collect();
    Ok((ids, listed.next_token))
}

async fn controller_publish(
    ctl: &mut Ctl,
    volume: &csi::Volume,
    node: &str,
) -> Result<HashMap<String, String>> {
    Ok(ctl
        .controller_publish_volume(csi::ControllerPublishVolumeRequest {
            volume_id: volume.volume_id.clone(),
            node_id: node.into(),
            volume_capability: Some(mount_cap("")),
            volume_context: volume.volume_context.clone(),
            ..Default::default()
        })
        .await?
        .into_inner()
        .publish_context)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_rpcs_answer_as_the_spec_says() -> Result<()> {
    let cluster = Cluster::up("csi-snapshots", 3, "embedded", &[])?;
    cluster.wait_all_up(3)?;
    let mut ctl = ControllerClient::new(channel(&cluster.path.join("csi.sock")).await?);
    let vol_a = create(&mut ctl, create_request("vol-a", 16 * MIB, 2)).await?;
    let context = controller_publish(&mut ctl, &vol_a, "node-1").await?;
    let uri = context.get(NBD_URI_KEY).context("NBD URI")?.clone();
    qemu_io(&uri, &["write -P 0x41 0 2M"])?;
    create(&mut ctl, create_request("vol-b", 8 * MIB, 1)).await?;

    // CreateSnapshot: the fields, idempotency, ALREADY_EXISTS, arguments.
    let snap1 = snapshot(&mut ctl, "snap-1", "vol-a").await?;
    assert_eq!(snap1.snapshot_id, "snap-1");
    assert_eq!(snap1.source_volume_id, "vol-a");
    assert_eq!(snap1.size_bytes, 16 * MIB);
    assert!(snap1.ready_to_use, "{snap1:?}");
    let time = snap1.creation_time.context("creation_time")?;
    ensure!(time.seconds > 1_600_000_000, "{time:?}");
    let again = snapshot(&mut ctl, "snap-1", "vol-a").await?;
    assert_eq!(again, snap1, "the same request returns the same snapshot");
    assert_eq!(
        code(
            ctl.create_snapshot(snapshot_request("snap-1", "vol-b"))
                .await
        ),
        Some(Code::AlreadyExists)
    );
    for (case, request) in [
        ("no name", snapshot_request("", "vol-a")),
        ("no source", snapshot_request("snap-x", "")),
        ("bad name", snapshot_request("snap/x", "vol-a")),
        (
            "unknown parameter",
            csi::CreateSnapshotRequest {
                parameters: HashMap::from([("colour".to_string(), "red".to_string())]),
                ..snapshot_request("snap-x", "vol-a")
            },
        ),
    ] {
        assert_eq!(
            code(ctl.create_snapshot(request).await),
            Some(Code::InvalidArgument),
            "{case}"
        );
    }
    let snap2 = snapshot(&mut ctl, "snap-2", "vol-b").await?;
    assert_eq!(snap2.size_bytes, 8 * MIB);

    // ListSnapshots: order, filters, tokens.
    let all = csi::ListSnapshotsRequest::default();
    assert_eq!(list(&mut ctl, all.clone()).await?.0, ["snap-1", "snap-2"]);
    let page = csi::ListSnapshotsRequest {
        max_entries: 1,
        ..all.clone()
    };
    let (first, token) = list(&mut ctl, page.clone()).await?;
    assert_eq!(
        (first.as_slice(), token.as_str()),
        (&["snap-1".to_string()][..], "snap-2")
    );
    let (second, end) = list(
        &mut ctl,
        csi::ListSnapshotsRequest {
            starting_token: token,
            ..page.clone()
        },
    )
    .await?;
    assert_eq!(
        (second.as_slice(), end.as_str()),
        (&["snap-2".to_string()][..], "")
    );
    assert_eq!(
        code(
            ctl.list_snapshots(csi::ListSnapshotsRequest {
                starting_token: "nope".into(),
                ..all.clone()
            })
            .await
        ),
        Some(Code::Aborted)
    );
    let by_id = |id: &str| csi::ListSnapshotsRequest {
        snapshot_id: id.into(),
        ..all.clone()
    };
    assert_eq!(list(&mut ctl, by_id("snap-2")).await?.0, ["snap-2"]);
    assert!(list(&mut ctl, by_id("snap-missing")).await?.0.is_empty());
    let by_volume = csi::ListSnapshotsRequest {
        source_volume_id: "vol-a".into(),
        ..all.clone()
    };
    assert_eq!(list(&mut ctl, by_volume).await?.0, ["snap-1"]);

    // GetSnapshot.
    let got = ctl
        .get_snapshot(csi::GetSnapshotRequest {
            snapshot_id: "snap-1".into(),
            ..Default::default()
        })
        .await?
        .into_inner()
        .snapshot;
    assert_eq!(got.as_ref(), Some(&snap1));
    for (id, expected) in [
        ("snap-missing", Code::NotFound),
        ("", Code::InvalidArgument),
    ] {
        let result = ctl
            .get_snapshot(csi::GetSnapshotRequest {
                snapshot_id: id.into(),
                ..Default::default()
            })
            .await;
        assert_eq!(code(result), Some(expected), "GetSnapshot {id:?}");
    }

    // CreateVolume from a snapshot: larger, idempotent, another source is
    // ALREADY_EXISTS, a limit below the source is OUT_OF_RANGE.
    let restored = create(&mut ctl, from_snapshot("vol-r", "snap-1", 32 * MIB)).await?;
    assert_eq!(restored.capacity_bytes, 32 * MIB);
    assert_eq!(
        restored.content_source,
        from_snapshot("vol-r", "snap-1", 0).volume_content_source
    );
    create(&mut ctl, from_snapshot("vol-r", "snap-1", 32 * MIB)).await?;
    assert_eq!(
        code(
            ctl.create_volume(from_snapshot("vol-r", "snap-2", 32 * MIB))
                .await
        ),
        Some(Code::AlreadyExists)
    );
    let mut capped = from_snapshot("vol-small", "snap-1", 4 * MIB);
    capped.capacity_range = Some(csi::CapacityRange {
        required_bytes: 4 * MIB,
        limit_bytes: 8 * MIB,
    });
    assert_eq!(
        code(ctl.create_volume(capped).await),
        Some(Code::OutOfRange)
    );
    let restored_context = controller_publish(&mut ctl, &restored, "node-2").await?;
    let restored_uri = restored_context.get(NBD_URI_KEY).context("NBD URI")?;
    qemu_io(restored_uri, &["read -P 0x41 0 2M", "read -P 0 16M 16M"])?;

    // CreateVolume from a published volume: a clone at its barrier, with
    // the source's size when no capacity is given.
    let clone = create(&mut ctl, from_volume("vol-c", "vol-a")).await?;
    assert_eq!(clone.capacity_bytes, 16 * MIB);
    assert_eq!(
        clone.content_source,
        from_volume("vol-c", "vol-a").volume_content_source
    );
    qemu_io(&uri, &["write -P 0x42 0 2M"])?;
    let clone_context = controller_publish(&mut ctl, &clone, "node-3").await?;
    let clone_uri = clone_context.get(NBD_URI_KEY).context("NBD URI")?;
    qemu_io(clone_uri, &["read -P 0x41 0 2M"])?;
    assert_eq!(
        list(&mut ctl, all.clone()).await?.0,
        ["snap-1", "snap-2"],
        "a clone's internal snapshot is not listed"
    );

    // DeleteSnapshot is idempotent; a volume with snapshots can be
    // deleted and its snapshots stay.
    for _ in 0..2 {
        ctl.delete_snapshot(csi::DeleteSnapshotRequest {
            snapshot_id: "snap-1".into(),
            ..Default::default()
        })
        .await?;
    }
    assert_eq!(
        code(
            ctl.delete_snapshot(csi::DeleteSnapshotRequest::default())
                .await
        ),
        Some(Code::InvalidArgument)
    );
    ctl.delete_volume(csi::DeleteVolumeRequest {
        volume_id: "vol-b".into(),
        ..Default::default()
    })
    .await?;
    assert_eq!(list(&mut ctl, all).await?.0, ["snap-2"]);
    let from_deleted = create(&mut ctl, from_snapshot("vol-b2", "snap-2", 8 * MIB)).await?;
    assert_eq!(from_deleted.capacity_bytes, 8 * MIB);
    Ok(())
}

/// Writes a tree of files under `root` and syncs them.
fn write_tree(root: &Path, seed: u8) -> Result<()> {
    std::fs::create_dir_all(root.join("dir"))?;
    for i in 0..8u32 {
        let data: Vec<u8> = (0..(100_000 + i * 37_000))
            .map(|b| (b as u8).wrapping_mul(seed).wrapping_add(i as u8))
            .collect();
        std::fs::write(root.join(format!("dir/file-{i}")), data)?;
    }
    run_ok(
        std::process::Command::new("sync").arg("-f").arg(root),
        std::time::Duration::from_secs(60),
    )?;
    Ok(())
}

async fn filesystem_round_trip(fs_type: &str) -> Result<()> {
    let cluster = Cluster::up(&format!("csi-snap-{fs_type}"), 3, "embedded", &[])?;
    cluster.wait_all_up(3)?;
    let mut ctl = ControllerClient::new(channel(&cluster.path.join("csi.sock")).await?);
    let mut node1 = NodePlugin::start(&cluster, "node-1").await?;
    let mut node2 = NodePlugin::start(&cluster, "node-2").await?;
    let mut request = create_request("pvc-src", 320 * MIB, 2);
    request
        .parameters
        .insert("fsType".into(), fs_type.to_string());
    let source = create(&mut ctl, request).await?;
    let context = controller_publish(&mut ctl, &source, "node-1").await?;
    let pod1 = cluster.dir.join("pod-1");
    let mounted = stage_and_publish(&mut node1, &pod1, &source, &context).await?;
    assert_eq!(fs_type_at(&mounted).as_deref(), Some(fs_type));
    write_tree(&mounted, 3)?;
    let expected = cluster.dir.join("expected");
    run_ok(
        std::process::Command::new("cp")
            .arg("-a")
            .arg(mounted.join("dir"))
            .arg(&expected),
        std::time::Duration::from_secs(60),
    )?;

    snapshot(&mut ctl, "snap-fs", "pvc-src").await?;
    // Change everything after the cut.
    write_tree(&mounted, 7)?;
    std::fs::write(mounted.join("dir/late"), b"after the cut")?;

    let mut restore = from_snapshot("pvc-restored", "snap-fs", 320 * MIB);
    restore
        .parameters
        .insert("fsType".into(), fs_type.to_string());
    let restored = create(&mut ctl, restore).await?;
    let restored_context = controller_publish(&mut ctl, &restored, "node-2").await?;
    let pod2 = cluster.dir.join("pod-2");
    let restored_mount = stage_and_publish(&mut node2, &pod2, &restored, &restored_context).await?;
    assert_eq!(fs_type_at(&restored_mount).as_deref(), Some(fs_type));
    run_ok(
        std::process::Command::new("diff")
            .arg("-r")
            .arg(&expected)
            .arg(restored_mount.join("dir")),
        std::time::Duration::from_secs(60),
    )
    .context("the restored tree differs from the one at the cut")?;
    ensure!(
        !restored_mount.join("dir/late").exists(),
        "a file written after the cut is in the snapshot"
    );
    unpublish_and_unstage(&mut node2, "pvc-restored", &pod2).await?;
    unpublish_and_unstage(&mut node1, "pvc-src", &pod1).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ext4_snapshot_restores_the_files_at_the_cut() -> Result<()> {
    filesystem_round_trip("ext4").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_xfs_snapshot_restores_the_files_at_the_cut() -> Result<()> {
    filesystem_round_trip("xfs").await
}

type Metadata = csi::snapshot_metadata_client::SnapshotMetadataClient<Channel>;

/// Every tuple of a GetMetadataAllocated stream, with the messages' sizes.
async fn allocated(
    md: &mut Metadata,
    snapshot: &str,
    offset: i64,
    max: i32,
) -> Result<(Vec<(i64, i64)>, Vec<usize>, i64)> {
    let mut stream = md
        .get_metadata_allocated(csi::GetMetadataAllocatedRequest {
            snapshot_id: snapshot.into(),
            starting_offset: offset,
            max_results: max,
            ..Default::default()
        })
        .await?
        .into_inner();
    let (mut tuples, mut sizes, mut capacity) = (Vec::new(), Vec::new(), 0);
    while let Some(message) = stream.message().await? {
        ensure!(
            message.block_metadata_type() == csi::BlockMetadataType::VariableLength,
            "{message:?}"
        );
        capacity = message.volume_capacity_bytes;
        sizes.push(message.block_metadata.len());
        tuples.extend(
            message
                .block_metadata
                .iter()
                .map(|b| (b.byte_offset, b.size_bytes)),
        );
    }
    Ok((tuples, sizes, capacity))
}

async fn delta(
    md: &mut Metadata,
    base: &str,
    target: &str,
    offset: i64,
    max: i32,
) -> Result<Vec<(i64, i64)>, tonic::Status> {
    let mut stream = md
        .get_metadata_delta(csi::GetMetadataDeltaRequest {
            base_snapshot_id: base.into(),
            target_snapshot_id: target.into(),
            starting_offset: offset,
            max_results: max,
            ..Default::default()
        })
        .await?
        .into_inner();
    let mut tuples = Vec::new();
    while let Some(message) = stream.message().await? {
        tuples.extend(
            message
                .block_metadata
                .iter()
                .map(|b| (b.byte_offset, b.size_bytes)),
        );
    }
    Ok(tuples)
}

/// Checks tuples are strictly ascending and do not overlap.
fn ascending(tuples: &[(i64, i64)]) -> Result<()> {
    for pair in tuples.windows(2) {
        ensure!(
            pair[0].0 + pair[0].1 <= pair[1].0 && pair[0].1 > 0,
            "not ascending: {pair:?}"
        );
    }
    Ok(())
}

fn covers(tuples: &[(i64, i64)], (offset, length): (i64, i64)) -> bool {
    let mut at = offset;
    for &(o, l) in tuples {
        if o <= at && at < o + l {
            at = o + l;
        }
        if at >= offset + length {
            return true;
        }
    }
    false
}

fn overlaps(a: (i64, i64), b: (i64, i64)) -> bool {
    a.0 < b.0 + b.1 && b.0 < a.0 + a.1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changed_block_tracking_reports_the_written_ranges() -> Result<()> {
    let cluster = Cluster::up("csi-cbt", 2, "embedded", &[])?;
    cluster.wait_all_up(2)?;
    let channel = channel(&cluster.path.join("csi.sock")).await?;
    let mut ctl = ControllerClient::new(channel.clone());
    let mut md = Metadata::new(channel);
    let volume = create(&mut ctl, create_request("vol-cbt", 64 * MIB, 2)).await?;
    let context = controller_publish(&mut ctl, &volume, "node-1").await?;
    let uri = context.get(NBD_URI_KEY).context("NBD URI")?.clone();

    let first: [(i64, i64); 3] = [(MIB, 64 << 10), (10 * MIB, MIB), (40 * MIB, 4096)];
    let commands: Vec<String> = first
        .iter()
        .map(|(o, l)| format!("write -P 0x61 {o} {l}"))
        .collect();
    let commands: Vec<&str> = commands.iter().map(String::as_str).collect();
    qemu_io(&uri, &commands)?;
    snapshot(&mut ctl, "cbt-1", "vol-cbt").await?;

    // Allocated: exactly the written ranges of the thin volume.
    let (tuples, _, capacity) = allocated(&mut md, "cbt-1", 0, 0).await?;
    assert_eq!(capacity, 64 * MIB);
    ascending(&tuples)?;
    assert_eq!(tuples, first, "allocated ranges of a thin volume");
    // Paged one tuple per message, and resumed inside a range.
    let (paged, sizes, _) = allocated(&mut md, "cbt-1", 0, 1).await?;
    assert_eq!(paged, first);
    ensure!(sizes.iter().all(|n| *n <= 1), "{sizes:?}");
    let (resumed, _, _) = allocated(&mut md, "cbt-1", 10 * MIB + 4096, 0).await?;
    assert_eq!(
        resumed,
        [(10 * MIB + 4096, MIB - 4096), (40 * MIB, 4096)],
        "a stream resumed inside a range starts there"
    );

    let second: [(i64, i64); 3] = [
        (2 * MIB, 4096),
        (10 * MIB + 512 * 1024, 8192),
        (50 * MIB, 2 * MIB),
    ];
    let commands: Vec<String> = second
        .iter()
        .map(|(o, l)| format!("write -P 0x62 {o} {l}"))
        .collect();
    let commands: Vec<&str> = commands.iter().map(String::as_str).collect();
    qemu_io(&uri, &commands)?;
    snapshot(&mut ctl, "cbt-2", "vol-cbt").await?;

    // Delta: every written range, nothing in ranges never written since.
    let changed = delta(&mut md, "cbt-1", "cbt-2", 0, 0).await?;
    ascending(&changed)?;
    for range in second {
        ensure!(
            covers(&changed, range),
            "{range:?} missing from {changed:?}"
        );
    }
    for range in &changed {
        ensure!(
            second.iter().any(|w| overlaps(*w, *range)),
            "{range:?} was not written between the snapshots: {changed:?}"
        );
    }
    let paged = delta(&mut md, "cbt-1", "cbt-2", 0, 1).await?;
    assert_eq!(paged, changed, "paging changes nothing");
    let from = changed.get(1).map(|r| r.0).context("two ranges")?;
    let resumed = delta(&mut md, "cbt-1", "cbt-2", from, 0).await?;
    assert_eq!(resumed, changed[1..], "resumed at a range's start");
    let same = delta(&mut md, "cbt-2", "cbt-2", 0, 0).await?;
    assert!(same.is_empty(), "a snapshot differs from itself: {same:?}");

    // The CLI prints the same ranges.
    let diff = cluster.cli_json(&["snapshot", "diff", "cbt-1", "cbt-2"])?;
    let cli: Vec<(i64, i64)> = diff["ranges"]
        .as_array()
        .context("ranges")?
        .iter()
        .map(|r| {
            (
                r["offset"].as_i64().unwrap_or(-1),
                r["length"].as_i64().unwrap_or(-1),
            )
        })
        .collect();
    assert_eq!(cli, changed);

    // Errors.
    let code_of = |r: Result<Vec<(i64, i64)>, tonic::Status>| r.err().map(|s| s.code());
    assert_eq!(
        code_of(delta(&mut md, "cbt-1", "cbt-2", 64 * MIB, 0).await),
        Some(Code::OutOfRange)
    );
    assert_eq!(
        code_of(delta(&mut md, "cbt-1", "nope", 0, 0).await),
        Some(Code::NotFound)
    );
    assert_eq!(
        code_of(delta(&mut md, "", "cbt-2", 0, 0).await),
        Some(Code::InvalidArgument)
    );
    create(&mut ctl, create_request("vol-other", 64 * MIB, 1)).await?;
    snapshot(&mut ctl, "cbt-other", "vol-other").await?;
    assert_eq!(
        code_of(delta(&mut md, "cbt-1", "cbt-other", 0, 0).await),
        Some(Code::InvalidArgument),
        "snapshots of two volumes"
    );
    let out_of_range = md
        .get_metadata_allocated(csi::GetMetadataAllocatedRequest {
            snapshot_id: "cbt-1".into(),
            starting_offset: 64 * MIB,
            ..Default::default()
        })
        .await;
    assert_eq!(code(out_of_range), Some(Code::OutOfRange));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_controller_rpcs_answer_as_the_spec_says() -> Result<()> {
    use ballast_proto::csi::group_controller_client::GroupControllerClient;
    use ballast_proto::csi::group_controller_service_capability::rpc::Type as GroupRpc;

    let cluster = Cluster::up("csi-groups", 3, "embedded", &[])?;
    cluster.wait_all_up(3)?;
    let channel = channel(&cluster.path.join("csi.sock")).await?;
    let mut ctl = ControllerClient::new(channel.clone());
    let mut groups = GroupControllerClient::new(channel);
    let caps = groups
        .group_controller_get_capabilities(csi::GroupControllerGetCapabilitiesRequest {})
        .await?
        .into_inner();
    let announced: Vec<GroupRpc> = caps
        .capabilities
        .iter()
        .filter_map(|c| {
            c.r#type.as_ref().map(|t| match t {
                csi::group_controller_service_capability::Type::Rpc(rpc) => rpc.r#type(),
            })
        })
        .collect();
    assert_eq!(announced, [GroupRpc::CreateDeleteGetVolumeGroupSnapshot]);

    let data = create(&mut ctl, create_request("pvc-data", 16 * MIB, 2)).await?;
    let wal = create(&mut ctl, create_request("pvc-wal", 8 * MIB, 2)).await?;
    let data_uri = controller_publish(&mut ctl, &data, "node-1").await?[NBD_URI_KEY].clone();
    let wal_uri = controller_publish(&mut ctl, &wal, "node-2").await?[NBD_URI_KEY].clone();
    qemu_io(&data_uri, &["write -P 0x44 0 1M"])?;
    qemu_io(&wal_uri, &["write -P 0x57 0 1M"])?;
    create(&mut ctl, create_request("pvc-other", 8 * MIB, 1)).await?;

    let request = |name: &str, volumes: &[&str]| csi::CreateVolumeGroupSnapshotRequest {
        name: name.into(),
        source_volume_ids: volumes.iter().map(|v| v.to_string()).collect(),
        parameters: HashMap::from([(
            "csi.storage.k8s.io/volumegroupsnapshot/name".to_string(),
            name.to_string(),
        )]),
        ..Default::default()
    };
    let group = groups
        .create_volume_group_snapshot(request("grp-1", &["pvc-wal", "pvc-data"]))
        .await?
        .into_inner()
        .group_snapshot
        .context("no group")?;
    assert_eq!(group.group_snapshot_id, "grp-1");
    assert!(group.ready_to_use, "{group:?}");
    assert!(group.creation_time.is_some());
    let mut members: Vec<(String, String, String)> = group
        .snapshots
        .iter()
        .map(|s| {
            (
                s.snapshot_id.clone(),
                s.source_volume_id.clone(),
                s.group_snapshot_id.clone(),
            )
        })
        .collect();
    members.sort();
    assert_eq!(
        members,
        [
            ("grp-1-pvc-data".into(), "pvc-data".into(), "grp-1".into()),
            ("grp-1-pvc-wal".into(), "pvc-wal".into(), "grp-1".into()),
        ]
    );
    ensure!(group.snapshots.iter().all(|s| s.ready_to_use), "{group:?}");
    // Idempotent in any order of the volumes.
    let again = groups
        .create_volume_group_snapshot(request("grp-1", &["pvc-data", "pvc-wal"]))
        .await?
        .into_inner()
        .group_snapshot
        .context("no group")?;
    assert_eq!(again.creation_time, group.creation_time);
    for (case, req, expected) in [
        (
            "other volumes",
            request("grp-1", &["pvc-data", "pvc-other"]),
            Code::AlreadyExists,
        ),
        ("no name", request("", &["pvc-data"]), Code::InvalidArgument),
        ("no volumes", request("grp-2", &[]), Code::InvalidArgument),
        (
            "a volume twice",
            request("grp-2", &["pvc-data", "pvc-data"]),
            Code::InvalidArgument,
        ),
        (
            "unknown volume",
            request("grp-2", &["pvc-data", "pvc-missing"]),
            Code::NotFound,
        ),
    ] {
        assert_eq!(
            code(groups.create_volume_group_snapshot(req).await),
            Some(expected),
            "{case}"
        );
    }

    // Get, with and without the member list.
    let get = |id: &str, ids: &[&str]| csi::GetVolumeGroupSnapshotRequest {
        group_snapshot_id: id.into(),
        snapshot_ids: ids.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    };
    let got = groups
        .get_volume_group_snapshot(get("grp-1", &["grp-1-pvc-wal", "grp-1-pvc-data"]))
        .await?
        .into_inner()
        .group_snapshot
        .context("no group")?;
    assert_eq!(got.creation_time, group.creation_time);
    assert_eq!(
        code(
            groups
                .get_volume_group_snapshot(get("grp-1", &["grp-1-pvc-wal"]))
                .await
        ),
        Some(Code::InvalidArgument),
        "a member list that is not the group's"
    );
    assert_eq!(
        code(groups.get_volume_group_snapshot(get("grp-x", &[])).await),
        Some(Code::NotFound)
    );

    // Members are ordinary snapshots: listed with their group, restorable;
    // deleted only with the group.
    let (listed, _) = list(&mut ctl, csi::ListSnapshotsRequest::default()).await?;
    assert_eq!(listed, ["grp-1-pvc-data", "grp-1-pvc-wal"]);
    assert_eq!(
        code(
            ctl.delete_snapshot(csi::DeleteSnapshotRequest {
                snapshot_id: "grp-1-pvc-data".into(),
                ..Default::default()
            })
            .await
        ),
        Some(Code::FailedPrecondition)
    );
    qemu_io(&data_uri, &["write -P 0x45 0 1M"])?;
    let restored = create(
        &mut ctl,
        from_snapshot("pvc-data-r", "grp-1-pvc-data", 16 * MIB),
    )
    .await?;
    let restored_uri =
        controller_publish(&mut ctl, &restored, "node-3").await?[NBD_URI_KEY].clone();
    qemu_io(&restored_uri, &["read -P 0x44 0 1M"])?;

    // Delete: a wrong member list is refused, then idempotent.
    let delete = |ids: &[&str]| csi::DeleteVolumeGroupSnapshotRequest {
        group_snapshot_id: "grp-1".into(),
        snapshot_ids: ids.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    };
    assert_eq!(
        code(
            groups
                .delete_volume_group_snapshot(delete(&["grp-1-pvc-data"]))
                .await
        ),
        Some(Code::InvalidArgument)
    );
    for _ in 0..2 {
        groups
            .delete_volume_group_snapshot(delete(&["grp-1-pvc-data", "grp-1-pvc-wal"]))
            .await?;
    }
    assert_eq!(
        code(groups.get_volume_group_snapshot(get("grp-1", &[])).await),
        Some(Code::NotFound)
    );
    assert!(
        list(&mut ctl, csi::ListSnapshotsRequest::default())
            .await?
            .0
            .is_empty()
    );
    qemu_io(&restored_uri, &["read -P 0x44 0 1M"])?;
    Ok(())
}

/// Writes every other 4 KiB block of the first `bytes` of `uri`, so that a
/// copy's extent map needs many records.
const SPARSE_WRITER: &str = r#"
import sys, nbd
h = nbd.NBD()
h.connect_uri(sys.argv[1])
for block in range(0, int(sys.argv[2]) // 4096, 2):
    h.pwrite(b"\x42" * 4096, block * 4096)
h.flush()
"#;

/// Allocates what is left of the XFS pool mounted at `mount` to one file.
fn fill_pool(mount: &Path) -> Result<std::path::PathBuf> {
    let path = mount.join("filler");
    let filler = std::fs::File::options()
        .write(true)
        .create_new(true)
        .open(&path)?;
    let mut offset: i64 = 0;
    let mut chunk: i64 = 256 << 20;
    while chunk >= 4096 {
        match nix::fcntl::fallocate(&filler, nix::fcntl::FallocateFlags::empty(), offset, chunk) {
            Ok(()) => offset += chunk,
            Err(_) => chunk /= 2,
        }
    }
    filler.sync_all()?;
    Ok(path)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_on_a_full_pool_is_resource_exhausted_and_leaves_nothing() -> Result<()> {
    let cluster = Cluster::up("csi-snap-full", 1, "embedded", &[])?;
    cluster.wait_all_up(1)?;
    let mut ctl = ControllerClient::new(channel(&cluster.path.join("csi.sock")).await?);
    let volume = create(&mut ctl, create_request("vol-full", 32 * MIB, 1)).await?;
    let uri = controller_publish(&mut ctl, &volume, "node-1").await?[NBD_URI_KEY].clone();
    run_ok(
        std::process::Command::new("/usr/bin/python3").args([
            "-c",
            SPARSE_WRITER,
            &uri,
            &(32 << 20).to_string(),
        ]),
        std::time::Duration::from_secs(120),
    )?;
    snapshot(&mut ctl, "before-full", "vol-full").await?;
    let pool = crate::harness::cluster::mounts_under(&cluster.path)
        .into_iter()
        .map(std::path::PathBuf::from)
        .find(|m| m.join("snapshots").is_dir())
        .context("the pool's mount")?;
    let filler = fill_pool(&pool)?;

    // Each copy needs extent-map records; the full pool soon refuses one.
    let mut refused = None;
    for i in 0..64 {
        let name = format!("full-{i}");
        match ctl
            .create_snapshot(snapshot_request(&name, "vol-full"))
            .await
        {
            Ok(_) => {}
            Err(status) => {
                ensure!(
                    status.code() == Code::ResourceExhausted,
                    "{name}: {status:?}"
                );
                refused = Some(name);
                break;
            }
        }
    }
    let refused = refused.context("64 copies fit in a full pool")?;
    // Nothing of it is left: no record (CSI or management), no copy file.
    crate::harness::wait_for(
        "the refused snapshot's record to go",
        std::time::Duration::from_secs(30),
        || {
            let listed = cluster.cli_json(&["snapshot", "list"]).ok()?;
            listed
                .as_array()?
                .iter()
                .all(|s| s["snapshot_id"] != refused.as_str())
                .then_some(())
        },
    )?;
    for suffix in [".data", ".meta.json"] {
        ensure!(
            !pool
                .join("snapshots")
                .join(format!("{refused}{suffix}"))
                .exists(),
            "{refused}{suffix} was left in the pool"
        );
    }
    assert_eq!(
        code(
            ctl.get_snapshot(csi::GetSnapshotRequest {
                snapshot_id: refused.clone(),
                ..Default::default()
            })
            .await
        ),
        Some(Code::NotFound)
    );
    // With room again, the same name succeeds; the earlier snapshot is
    // intact.
    std::fs::remove_file(&filler)?;
    snapshot(&mut ctl, &refused, "vol-full").await?;
    let mut restore = from_snapshot("vol-back", "before-full", 32 * MIB);
    restore.parameters.insert("replicas".into(), "1".into());
    let restored = create(&mut ctl, restore).await?;
    let restored_uri =
        controller_publish(&mut ctl, &restored, "node-1").await?[NBD_URI_KEY].clone();
    qemu_io(&restored_uri, &["read -P 0x42 0 4k", "read -P 0 4k 4k"])?;
    Ok(())
}
