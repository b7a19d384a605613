//! The CSI Node service over its real socket: `ballast-csi node` plugins
//! (nbdfuse + loop) on the nodes of a local cluster, driven by tonic
//! clients as kubelet would, after the controller's CSI socket created and
//! published the volume.
//!
//! Each test checks what the node is left holding through the system, not
//! the plugin: mounts in the kernel's table, loop devices over files in the
//! plugin's state directory, live nbdfuse processes. Every wait is bounded;
//! the cluster fixture unmounts, detaches and stops everything on drop.

use std::collections::HashMap;
use std::os::unix::fs::FileTypeExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use ballast_proto::csi;
use ballast_proto::csi::controller_client::ControllerClient;
use tonic::Code;
use tonic::transport::Channel;

use crate::harness::cluster::Cluster;
use crate::harness::csi::{
    MIB, NBD_URI_KEY, NodePlugin, block_cap, channel, code, controller_unpublish, create_request,
    fs_type_at, mount_cap, publish_request, stage_and_publish, stage_and_publish_as, stage_request,
    unpublish_and_delete, unpublish_and_unstage,
};
use crate::harness::run;

fn require_root() -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("needs root (loop devices, FUSE, mounts)");
    }
    Ok(())
}

/// What a node plugin with state directory `state_dir` still holds on
/// this machine: mounts under it (nbdfuse's FUSE mounts), loop devices
/// over files under it, and live nbdfuse processes serving files under it.
fn attachments(state_dir: &Path) -> Vec<String> {
    let Ok(dir) = state_dir.canonicalize() else {
        return Vec::new();
    };
    let mut found = Vec::new();
    let table = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    for line in table.lines() {
        if let Some(point) = line.split(' ').nth(4)
            && Path::new(point).starts_with(&dir)
        {
            found.push(format!("mount {point}"));
        }
    }
    for entry in std::fs::read_dir("/sys/block")
        .into_iter()
        .flatten()
        .flatten()
    {
        let name = entry.file_name().to_string_lossy().into_owned();
        let backing = std::fs::read_to_string(entry.path().join("loop/backing_file"));
        if let Ok(backing) = backing
            && Path::new(backing.trim().trim_end_matches(" (deleted)")).starts_with(&dir)
        {
            found.push(format!("loop device {name} over {}", backing.trim()));
        }
    }
    let needle = dir.as_os_str().as_encoded_bytes();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let nbdfuse = cmdline
            .split(|b| *b == 0)
            .next()
            .is_some_and(|arg0| arg0.ends_with(b"nbdfuse"));
        // A zombie (state Z after the command name) has exited.
        let alive = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|stat| {
                stat.rsplit_once(") ")
                    .map(|(_, rest)| !rest.starts_with('Z'))
            })
            .unwrap_or(false);
        if nbdfuse && alive && cmdline.windows(needle.len()).any(|w| w == needle) {
            found.push(format!("nbdfuse process {pid}"));
        }
    }
    found
}

/// Waits (bounded) until the plugin holds nothing: nbdfuse exits a moment
/// after its FUSE mount is gone.
fn assert_nothing_attached(plugin: &NodePlugin) -> Result<()> {
    let left = crate::harness::wait_for(
        "the node plugin's attachments to go",
        Duration::from_secs(15),
        || attachments(plugin.state_dir()).is_empty().then_some(()),
    );
    ensure!(
        left.is_ok(),
        "left attached: {:?}",
        attachments(plugin.state_dir())
    );
    Ok(())
}

/// CreateVolume (with `capability`) and ControllerPublishVolume on
/// `node`; returns the volume and the publish context.
async fn create_and_publish(
    controller: &mut ControllerClient<Channel>,
    mut request: csi::CreateVolumeRequest,
    capability: csi::VolumeCapability,
    node: &str,
) -> Result<(csi::Volume, HashMap<String, String>)> {
    request.volume_capabilities = vec![capability.clone()];
    let volume = controller
        .create_volume(request)
        .await?
        .into_inner()
        .volume
        .context("CreateVolume returned no volume")?;
    let context = controller_publish(controller, &volume, capability, node).await?;
    Ok((volume, context))
}

async fn controller_publish(
    controller: &mut ControllerClient<Channel>,
    volume: &csi::Volume,
    capability: csi::VolumeCapability,
    node: &str,
) -> Result<HashMap<String, String>> {
    Ok(controller
        .controller_publish_volume(csi::ControllerPublishVolumeRequest {
            volume_id: volume.volume_id.clone(),
            node_id: node.into(),
            volume_capability: Some(capability),
            volume_context: volume.volume_context.clone(),
            ..Default::default()
        })
        .await?
        .into_inner()
        .publish_context)
}

async fn stats(
    plugin: &mut NodePlugin,
    volume_id: &str,
    path: &Path,
) -> Result<csi::NodeGetVolumeStatsResponse> {
    Ok(plugin
        .client
        .node_get_volume_stats(csi::NodeGetVolumeStatsRequest {
            volume_id: volume_id.into(),
            volume_path: path.display().to_string(),
            ..Default::default()
        })
        .await?
        .into_inner())
}

/// A copy of `request` changed by `change`.
fn with<T: Clone>(request: &T, change: impl FnOnce(&mut T)) -> T {
    let mut changed = request.clone();
    change(&mut changed);
    changed
}

/// Total bytes of the first (bytes) usage entry.
fn total_bytes(stats: &csi::NodeGetVolumeStatsResponse) -> i64 {
    stats.usage.first().map_or(0, |u| u.total)
}

/// fio on a block device file: random 4 KiB writes over 8 MiB with
/// crc32c checksums, then every block read back and verified
/// (`verify_only` skips the writes and verifies what an earlier run with
/// the same job left). Fails unless fio ran clean over all 8 MiB.
fn fio_verified(device: &Path, verify_only: bool) -> Result<()> {
    const BYTES: u64 = 8 << 20;
    let mut cmd = Command::new("fio");
    cmd.args(["--name=block", "--ioengine=libaio", "--direct=1"])
        .args(["--iodepth=8", "--rw=randwrite", "--bs=4k", "--size=8M"])
        .args(["--verify=crc32c", "--do_verify=1", "--verify_fatal=1"])
        .args(["--verify_state_save=0", "--output-format=json"])
        .arg(format!("--filename={}", device.display()));
    if verify_only {
        cmd.arg("--verify_only");
    }
    let out = run(&mut cmd, Duration::from_secs(240))?;
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success(),
        "fio failed ({}): {text} {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_str(&text[text.find('{').unwrap_or(0)..])
        .with_context(|| format!("fio JSON: {text}"))?;
    let job = &report["jobs"][0];
    ensure!(job["error"] == 0, "fio job error: {job}");
    if !verify_only {
        ensure!(
            job["write"]["io_bytes"].as_u64() == Some(BYTES),
            "fio wrote all 8 MiB: {}",
            job["write"]
        );
    }
    ensure!(
        job["read"]["io_bytes"].as_u64() >= Some(BYTES),
        "fio read back and verified all 8 MiB: {}",
        job["read"]
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_raw_block_volume_takes_verified_fio_and_leaves_nothing_behind() -> Result<()> {
    require_root()?;
    let cluster = Cluster::up("csi-block", 2, "embedded", &[])?;
    cluster.wait_all_up(2)?;
    let mut controller = ControllerClient::new(channel(&cluster.path.join("csi.sock")).await?);
    let mut node1 = NodePlugin::start(&cluster, "node-1").await?;
    let mut node2 = NodePlugin::start(&cluster, "node-2").await?;
    let mut request = create_request("pvc-block", 64 * MIB, 2);
    request.parameters.remove("fsType");
    let (volume, context) =
        create_and_publish(&mut controller, request, block_cap(), "node-1").await?;

    let dir = cluster.dir.join("pod-block");
    let target = stage_and_publish_as(&mut node1, &dir, &volume, &context, block_cap()).await?;
    assert_eq!(
        fs_type_at(&dir.join("staging")),
        None,
        "block staging mounts nothing"
    );
    assert!(
        std::fs::metadata(&target)?.file_type().is_block_device(),
        "the target is the volume's device node"
    );
    assert_eq!(fs_type_at(&target).as_deref(), Some("devtmpfs"));

    fio_verified(&target, false)?;

    let got = stats(&mut node1, "pvc-block", &target).await?;
    assert_eq!(total_bytes(&got), 64 * MIB, "{got:?}");
    assert_eq!(
        got.volume_condition.map(|c| c.abnormal),
        Some(false),
        "a volume condition is reported"
    );
    let expanded = node1
        .client
        .node_expand_volume(csi::NodeExpandVolumeRequest {
            volume_id: "pvc-block".into(),
            volume_path: target.display().to_string(),
            capacity_range: Some(csi::CapacityRange {
                required_bytes: 64 * MIB,
                limit_bytes: 0,
            }),
            volume_capability: Some(block_cap()),
            ..Default::default()
        })
        .await?
        .into_inner();
    assert_eq!(
        expanded.capacity_bytes,
        64 * MIB,
        "a block volume needs no node work"
    );

    unpublish_and_unstage(&mut node1, "pvc-block", &dir).await?;
    assert!(!target.exists(), "the target file is removed");
    unpublish_and_unstage(&mut node1, "pvc-block", &dir)
        .await
        .context("unpublishing and unstaging again is OK")?;
    assert_nothing_attached(&node1)?;
    controller_unpublish(&mut controller, "pvc-block", "node-1").await?;

    // What fio wrote through node-1's device is on the replicas: node-2
    // reads it all back and verifies it.
    let context = controller_publish(&mut controller, &volume, block_cap(), "node-2").await?;
    let dir2 = cluster.dir.join("pod-block-2");
    let target2 = stage_and_publish_as(&mut node2, &dir2, &volume, &context, block_cap()).await?;
    fio_verified(&target2, true)?;
    unpublish_and_unstage(&mut node2, "pvc-block", &dir2).await?;
    assert_nothing_attached(&node2)?;
    controller_unpublish(&mut controller, "pvc-block", "node-2").await?;
    controller
        .delete_volume(csi::DeleteVolumeRequest {
            volume_id: "pvc-block".into(),
            ..Default::default()
        })
        .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_node_plugin_finds_and_cleans_up_what_its_predecessor_staged() -> Result<()> {
    require_root()?;
    let cluster = Cluster::up("csi-restart", 1, "embedded", &[])?;
    cluster.wait_all_up(1)?;
    let mut controller = ControllerClient::new(channel(&cluster.path.join("csi.sock")).await?);
    let mut node1 = NodePlugin::start(&cluster, "node-1").await?;
    let (volume, context) = create_and_publish(
        &mut controller,
        create_request("pvc-restart", 64 * MIB, 1),
        mount_cap(""),
        "node-1",
    )
    .await?;
    let dir = cluster.dir.join("pod-restart");
    let target = stage_and_publish(&mut node1, &dir, &volume, &context).await?;
    std::fs::write(target.join("before.txt"), b"written before the crash")?;
    let held = attachments(node1.state_dir());
    assert!(
        held.iter().any(|a| a.starts_with("loop device"))
            && held.iter().any(|a| a.starts_with("mount"))
            && held.iter().any(|a| a.starts_with("nbdfuse process")),
        "a staged volume holds a loop device, a FUSE mount and nbdfuse: {held:?}"
    );

    // SIGKILL: nothing is unstaged, the new plugin starts with no memory.
    node1.restart().await?;
    assert_eq!(
        attachments(node1.state_dir()),
        held,
        "the volume stayed attached through the crash"
    );
    let got = stats(&mut node1, "pvc-restart", &target).await?;
    assert!(total_bytes(&got) > 32 * MIB, "{got:?}");

    // kubelet repeats NodeStage and NodePublish after a plugin restart.
    let again = stage_and_publish(&mut node1, &dir, &volume, &context)
        .await
        .context("stage and publish are idempotent across a restart")?;
    assert_eq!(again, target);
    assert_eq!(
        attachments(node1.state_dir()),
        held,
        "nothing was attached twice"
    );
    assert_eq!(
        std::fs::read(target.join("before.txt"))?,
        b"written before the crash"
    );
    std::fs::write(target.join("after.txt"), b"written after the restart")?;

    unpublish_and_unstage(&mut node1, "pvc-restart", &dir).await?;
    assert_eq!(fs_type_at(&target), None, "the publish bind mount is gone");
    assert!(!target.exists(), "the target directory is removed");
    assert_eq!(fs_type_at(&dir.join("staging")), None, "unmounted");
    assert_nothing_attached(&node1)?;
    controller_unpublish(&mut controller, "pvc-restart", "node-1").await?;

    // Nothing was lost on the way: staged again, both files are there.
    let context = controller_publish(&mut controller, &volume, mount_cap(""), "node-1").await?;
    let target = stage_and_publish(&mut node1, &dir, &volume, &context).await?;
    assert_eq!(
        std::fs::read(target.join("after.txt"))?,
        b"written after the restart"
    );
    unpublish_and_unstage(&mut node1, "pvc-restart", &dir).await?;
    assert_nothing_attached(&node1)?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_stage_leaves_nothing_attached_and_no_filesystem_is_formatted_over() -> Result<()>
{
    require_root()?;
    let cluster = Cluster::up("csi-stage-fail", 1, "embedded", &[])?;
    cluster.wait_all_up(1)?;
    let mut controller = ControllerClient::new(channel(&cluster.path.join("csi.sock")).await?);
    let mut node1 = NodePlugin::start(&cluster, "node-1").await?;
    let (volume, context) = create_and_publish(
        &mut controller,
        create_request("pvc-fail", 64 * MIB, 1),
        mount_cap(""),
        "node-1",
    )
    .await?;
    let dir = cluster.dir.join("pod-fail");
    let staging = dir.join("staging");
    std::fs::create_dir_all(&staging)?;

    // A filesystem the plugin cannot make: refused before attaching.
    let btrfs = node1
        .client
        .node_stage_volume(stage_request(
            &volume,
            &context,
            &staging,
            mount_cap("btrfs"),
        ))
        .await;
    assert_eq!(code(btrfs), Some(Code::InvalidArgument));
    assert_nothing_attached(&node1)?;

    // A mount option ext4 rejects: the mount fails after the attach (and
    // after mkfs of the blank device), and the attach is undone.
    let mut bad_flag = mount_cap("ext4");
    if let Some(csi::volume_capability::AccessType::Mount(m)) = bad_flag.access_type.as_mut() {
        m.mount_flags = vec!["nosuchoption".into()];
    }
    let failed = node1
        .client
        .node_stage_volume(stage_request(&volume, &context, &staging, bad_flag))
        .await;
    assert_eq!(code(failed), Some(Code::Internal));
    assert_eq!(fs_type_at(&staging), None, "nothing mounted");
    assert_nothing_attached(&node1)?;

    // An export that cannot be reached: nbdfuse fails, nothing is left.
    let mut unreachable = context.clone();
    unreachable.insert(
        NBD_URI_KEY.into(),
        format!(
            "nbd+unix:///pvc-fail?socket={}",
            dir.join("nobody.sock").display()
        ),
    );
    let failed = node1
        .client
        .node_stage_volume(stage_request(
            &volume,
            &unreachable,
            &staging,
            mount_cap(""),
        ))
        .await;
    assert_eq!(code(failed), Some(Code::Unavailable));
    assert_nothing_attached(&node1)?;

    // The device now holds ext4 with a file on it.
    let target = stage_and_publish(&mut node1, &dir, &volume, &context).await?;
    assert_eq!(fs_type_at(&target).as_deref(), Some("ext4"));
    std::fs::write(target.join("keep.txt"), b"must survive")?;
    unpublish_and_unstage(&mut node1, "pvc-fail", &dir).await?;

    // Asked for XFS over it: refused, nothing formatted, nothing left.
    let xfs = node1
        .client
        .node_stage_volume(stage_request(&volume, &context, &staging, mount_cap("xfs")))
        .await;
    let status = xfs.err().context("staging xfs over ext4 succeeded")?;
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert!(
        status.message().contains("ext4") && status.message().contains("xfs"),
        "the error names both filesystems: {status:?}"
    );
    assert_eq!(fs_type_at(&staging), None);
    assert_nothing_attached(&node1)?;

    let target = stage_and_publish(&mut node1, &dir, &volume, &context).await?;
    assert_eq!(
        fs_type_at(&target).as_deref(),
        Some("ext4"),
        "not reformatted"
    );
    assert_eq!(std::fs::read(target.join("keep.txt"))?, b"must survive");
    unpublish_and_unstage(&mut node1, "pvc-fail", &dir).await?;
    assert_nothing_attached(&node1)?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_rpcs_answer_bad_requests_with_the_spec_codes() -> Result<()> {
    require_root()?;
    let cluster = Cluster::up("csi-node-errors", 1, "embedded", &[])?;
    cluster.wait_all_up(1)?;
    let mut controller = ControllerClient::new(channel(&cluster.path.join("csi.sock")).await?);
    let node1 = NodePlugin::start(&cluster, "node-1").await?;
    let (volume, context) = create_and_publish(
        &mut controller,
        create_request("pvc-errors", 64 * MIB, 1),
        mount_cap(""),
        "node-1",
    )
    .await?;
    let dir = cluster.dir.join("pod-errors");
    let staging = dir.join("staging");
    let target = dir.join("target");
    std::fs::create_dir_all(&staging)?;
    let stage = stage_request(&volume, &context, &staging, mount_cap(""));
    let publish = publish_request(&volume, &staging, &target, mount_cap(""));
    let unstage = csi::NodeUnstageVolumeRequest {
        volume_id: "pvc-errors".into(),
        staging_target_path: staging.display().to_string(),
    };
    let unpublish = csi::NodeUnpublishVolumeRequest {
        volume_id: "pvc-errors".into(),
        target_path: target.display().to_string(),
    };
    let volume_stats = csi::NodeGetVolumeStatsRequest {
        volume_id: "pvc-errors".into(),
        volume_path: staging.display().to_string(),
        ..Default::default()
    };
    let expand = csi::NodeExpandVolumeRequest {
        volume_id: "pvc-errors".into(),
        volume_path: staging.display().to_string(),
        ..Default::default()
    };

    // INVALID_ARGUMENT for each missing REQUIRED field of each RPC.
    let c = &mut node1.client.clone();
    let mut invalid = Vec::new();
    for (what, r) in [
        ("no volume_id", with(&stage, |r| r.volume_id.clear())),
        (
            "no staging path",
            with(&stage, |r| r.staging_target_path.clear()),
        ),
        (
            "relative staging path",
            with(&stage, |r| r.staging_target_path = "rel".into()),
        ),
        (
            "no capability",
            with(&stage, |r| r.volume_capability = None),
        ),
        (
            "no access mode",
            with(&stage, |r| {
                if let Some(cap) = r.volume_capability.as_mut() {
                    cap.access_mode = None;
                }
            }),
        ),
    ] {
        invalid.push(("stage", what, code(c.node_stage_volume(r).await)));
    }
    for (what, r) in [
        ("no volume_id", with(&unstage, |r| r.volume_id.clear())),
        (
            "no staging path",
            with(&unstage, |r| r.staging_target_path.clear()),
        ),
    ] {
        invalid.push(("unstage", what, code(c.node_unstage_volume(r).await)));
    }
    for (what, r) in [
        ("no volume_id", with(&publish, |r| r.volume_id.clear())),
        ("no target path", with(&publish, |r| r.target_path.clear())),
        (
            "no capability",
            with(&publish, |r| r.volume_capability = None),
        ),
    ] {
        invalid.push(("publish", what, code(c.node_publish_volume(r).await)));
    }
    for (what, r) in [
        ("no volume_id", with(&unpublish, |r| r.volume_id.clear())),
        (
            "no target path",
            with(&unpublish, |r| r.target_path.clear()),
        ),
    ] {
        invalid.push(("unpublish", what, code(c.node_unpublish_volume(r).await)));
    }
    for (what, r) in [
        ("no volume_id", with(&volume_stats, |r| r.volume_id.clear())),
        (
            "no volume path",
            with(&volume_stats, |r| r.volume_path.clear()),
        ),
    ] {
        invalid.push(("stats", what, code(c.node_get_volume_stats(r).await)));
    }
    for (what, r) in [
        ("no volume_id", with(&expand, |r| r.volume_id.clear())),
        ("no volume path", with(&expand, |r| r.volume_path.clear())),
    ] {
        invalid.push(("expand", what, code(c.node_expand_volume(r).await)));
    }
    let wrong: Vec<_> = invalid
        .iter()
        .filter(|(_, _, got)| *got != Some(Code::InvalidArgument))
        .collect();
    assert!(wrong.is_empty(), "not INVALID_ARGUMENT: {wrong:?}");
    assert_nothing_attached(&node1)?;

    // Order and state errors.
    assert_eq!(
        code(c.node_publish_volume(publish.clone()).await),
        Some(Code::FailedPrecondition),
        "NodePublishVolume before NodeStageVolume"
    );
    assert!(!target.exists(), "the refused publish created no target");
    assert_eq!(
        code(c.node_get_volume_stats(volume_stats.clone()).await),
        Some(Code::NotFound),
        "stats of a volume that is not staged"
    );
    assert_eq!(
        code(c.node_expand_volume(expand.clone()).await),
        Some(Code::NotFound),
        "expansion of a volume that is not staged"
    );
    c.node_stage_volume(stage.clone()).await?;
    let elsewhere = dir.join("staging-2");
    std::fs::create_dir_all(&elsewhere)?;
    assert_eq!(
        code(
            c.node_stage_volume(stage_request(&volume, &context, &elsewhere, mount_cap("")))
                .await
        ),
        Some(Code::AlreadyExists),
        "the same volume at a second staging path"
    );
    assert_eq!(fs_type_at(&elsewhere), None);
    let not_mounted = csi::NodeGetVolumeStatsRequest {
        volume_path: elsewhere.display().to_string(),
        ..volume_stats.clone()
    };
    assert_eq!(
        code(c.node_get_volume_stats(not_mounted).await),
        Some(Code::NotFound),
        "stats of a path where the volume is not mounted"
    );
    let got = c.node_get_volume_stats(volume_stats).await?.into_inner();
    let condition = got.volume_condition.context("no volume condition")?;
    assert!(
        !condition.abnormal && !condition.message.is_empty(),
        "{condition:?}"
    );
    let too_big = csi::NodeExpandVolumeRequest {
        capacity_range: Some(csi::CapacityRange {
            required_bytes: 128 * MIB,
            limit_bytes: 0,
        }),
        ..expand.clone()
    };
    assert_eq!(
        code(c.node_expand_volume(too_big).await),
        Some(Code::OutOfRange),
        "more than the attached device holds"
    );
    let same = c.node_expand_volume(expand).await?.into_inner();
    assert_eq!(same.capacity_bytes, 64 * MIB, "a full filesystem is fine");

    // SINGLE_NODE_SINGLE_WRITER (ReadWriteOncePod): one target at a time.
    let single_writer = || {
        let mut cap = mount_cap("");
        cap.access_mode = Some(csi::volume_capability::AccessMode {
            mode: csi::volume_capability::access_mode::Mode::SingleNodeSingleWriter.into(),
        });
        cap
    };
    let first_pod = publish_request(&volume, &staging, &target, single_writer());
    c.node_publish_volume(first_pod.clone()).await?;
    let second_target = dir.join("target-2");
    let second_pod = publish_request(&volume, &staging, &second_target, single_writer());
    assert_eq!(
        code(c.node_publish_volume(second_pod.clone()).await),
        Some(Code::FailedPrecondition),
        "a second pod of a SINGLE_NODE_SINGLE_WRITER volume"
    );
    assert_eq!(fs_type_at(&second_target), None);
    c.node_unpublish_volume(unpublish.clone()).await?;
    c.node_publish_volume(second_pod)
        .await
        .context("the single writer moves once the first pod is gone")?;
    c.node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
        target_path: second_target.display().to_string(),
        ..unpublish
    })
    .await?;

    c.node_unstage_volume(unstage).await?;
    assert_nothing_attached(&node1)?;
    Ok(())
}

/// A second operation on a volume while a first one is in progress gets
/// ABORTED. The first NodeStageVolume is held deterministically: its
/// export is a unix socket this test listens on and never answers, so the
/// attach waits on the NBD handshake (inside the volume's guard) until the
/// test hangs up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_concurrent_operation_on_a_volume_is_aborted() -> Result<()> {
    require_root()?;
    let cluster = Cluster::up("csi-node-aborted", 1, "embedded", &[])?;
    cluster.wait_all_up(1)?;
    let mut node1 = NodePlugin::start(&cluster, "node-1").await?;
    let dir = cluster.dir.join("pod-held");
    let staging = dir.join("staging");
    std::fs::create_dir_all(&staging)?;
    let socket = dir.join("silent-nbd.sock");
    let listener = tokio::net::UnixListener::bind(&socket)?;
    let volume = csi::Volume {
        volume_id: "pvc-held".into(),
        ..Default::default()
    };
    let context = HashMap::from([(
        NBD_URI_KEY.to_string(),
        format!("nbd+unix:///pvc-held?socket={}", socket.display()),
    )]);
    let stage = stage_request(&volume, &context, &staging, mount_cap(""));

    let mut client = node1.client.clone();
    let first = tokio::spawn({
        let stage = stage.clone();
        async move { client.node_stage_volume(stage).await }
    });
    let (connection, _) = tokio::time::timeout(Duration::from_secs(60), listener.accept())
        .await
        .context("nbdfuse never connected")??;

    let c = &mut node1.client;
    assert_eq!(
        code(c.node_stage_volume(stage.clone()).await),
        Some(Code::Aborted)
    );
    assert_eq!(
        code(
            c.node_unstage_volume(csi::NodeUnstageVolumeRequest {
                volume_id: "pvc-held".into(),
                staging_target_path: staging.display().to_string(),
            })
            .await
        ),
        Some(Code::Aborted)
    );
    c.node_unstage_volume(csi::NodeUnstageVolumeRequest {
        volume_id: "pvc-other".into(),
        staging_target_path: staging.display().to_string(),
    })
    .await
    .context("the guard is per volume")?;
    assert!(!first.is_finished(), "the first stage is still held");

    // Hang up: nbdfuse fails its handshake, the first stage fails and
    // leaves nothing attached.
    drop(connection);
    drop(listener);
    let first = tokio::time::timeout(Duration::from_secs(90), first)
        .await
        .context("the first stage did not end")??;
    assert_eq!(code(first), Some(Code::Unavailable));
    assert_nothing_attached(&node1)?;
    Ok(())
}

/// The Kubernetes flow for an XFS volume: written on node-1, moved to
/// node-2 with an offline expansion on the way, grown to the new size on
/// node-2 (at stage, then NodeExpandVolume), files intact, deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_xfs_volume_moves_to_another_node_and_grows() -> Result<()> {
    require_root()?;
    const SMALL: i64 = 320 * MIB;
    const BIG: i64 = 480 * MIB;
    let cluster = Cluster::up("csi-xfs-flow", 3, "embedded", &[])?;
    cluster.wait_all_up(3)?;
    let mut controller = ControllerClient::new(channel(&cluster.path.join("csi.sock")).await?);
    let mut node1 = NodePlugin::start(&cluster, "node-1").await?;
    let mut node2 = NodePlugin::start(&cluster, "node-2").await?;
    let mut request = create_request("pvc-xfs", SMALL, 3);
    request.parameters.insert("fsType".into(), "xfs".into());
    let (volume, context) =
        create_and_publish(&mut controller, request, mount_cap(""), "node-1").await?;

    let dir1 = cluster.dir.join("pod-xfs-1");
    let target1 = stage_and_publish(&mut node1, &dir1, &volume, &context).await?;
    assert_eq!(
        fs_type_at(&target1).as_deref(),
        Some("xfs"),
        "fsType from the StorageClass"
    );
    let files: Vec<(PathBuf, Vec<u8>)> = (0..4u8)
        .map(|i| {
            let data: Vec<u8> = (0..300_000u32).map(|b| (b % 251) as u8 ^ i).collect();
            (PathBuf::from(format!("dir{i}/file{i}.bin")), data)
        })
        .collect();
    for (name, data) in &files {
        let path = target1.join(name);
        std::fs::create_dir_all(path.parent().context("parent")?)?;
        std::fs::write(&path, data)?;
        std::fs::File::open(&path)?.sync_all()?;
    }
    let small_total = total_bytes(&stats(&mut node1, "pvc-xfs", &target1).await?);
    assert!(small_total > 0 && small_total <= SMALL, "{small_total}");
    unpublish_and_unstage(&mut node1, "pvc-xfs", &dir1).await?;
    assert_nothing_attached(&node1)?;
    controller_unpublish(&mut controller, "pvc-xfs", "node-1").await?;

    let expanded = controller
        .controller_expand_volume(csi::ControllerExpandVolumeRequest {
            volume_id: "pvc-xfs".into(),
            capacity_range: Some(csi::CapacityRange {
                required_bytes: BIG,
                limit_bytes: 0,
            }),
            volume_capability: Some(mount_cap("")),
            ..Default::default()
        })
        .await?
        .into_inner();
    assert_eq!(expanded.capacity_bytes, BIG);
    assert!(expanded.node_expansion_required);

    let context2 = controller_publish(&mut controller, &volume, mount_cap(""), "node-2").await?;
    let dir2 = cluster.dir.join("pod-xfs-2");
    let target2 = stage_and_publish(&mut node2, &dir2, &volume, &context2).await?;
    for (name, data) in &files {
        let read = std::fs::read(target2.join(name))?;
        assert!(read == *data, "{} is intact on node-2", name.display());
    }
    let staged_total = total_bytes(&stats(&mut node2, "pvc-xfs", &target2).await?);
    assert!(
        staged_total >= small_total + (BIG - SMALL) * 9 / 10,
        "NodeStageVolume grew the filesystem: {small_total} -> {staged_total} bytes"
    );
    let grown = node2
        .client
        .node_expand_volume(csi::NodeExpandVolumeRequest {
            volume_id: "pvc-xfs".into(),
            volume_path: target2.display().to_string(),
            capacity_range: Some(csi::CapacityRange {
                required_bytes: BIG,
                limit_bytes: 0,
            }),
            staging_target_path: dir2.join("staging").display().to_string(),
            volume_capability: Some(mount_cap("")),
            ..Default::default()
        })
        .await?
        .into_inner();
    assert_eq!(grown.capacity_bytes, BIG);
    let big_total = total_bytes(&stats(&mut node2, "pvc-xfs", &target2).await?);
    assert!(
        big_total >= small_total + (BIG - SMALL) * 9 / 10 && big_total <= BIG,
        "the filesystem sees the new size: {small_total} -> {big_total} bytes"
    );
    std::fs::write(target2.join("after-growth.txt"), b"room to spare")?;

    unpublish_and_unstage(&mut node2, "pvc-xfs", &dir2).await?;
    assert_nothing_attached(&node2)?;
    unpublish_and_delete(&mut controller, &cluster, "pvc-xfs", "node-2").await
}

/// When nbdfuse, which carries the volume's I/O, dies under a mounted
/// volume, NodeGetVolumeStats says the volume is abnormal and why, and
/// unpublish and unstage still clean up everything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_volume_whose_nbdfuse_died_is_abnormal_and_still_cleans_up() -> Result<()> {
    require_root()?;
    let cluster = Cluster::up("csi-nbdfuse-died", 1, "embedded", &[])?;
    cluster.wait_all_up(1)?;
    let mut controller = ControllerClient::new(channel(&cluster.path.join("csi.sock")).await?);
    let mut node1 = NodePlugin::start(&cluster, "node-1").await?;
    let (volume, context) = create_and_publish(
        &mut controller,
        create_request("pvc-died", 64 * MIB, 1),
        mount_cap(""),
        "node-1",
    )
    .await?;
    let dir = cluster.dir.join("pod-died");
    let target = stage_and_publish(&mut node1, &dir, &volume, &context).await?;
    let healthy = stats(&mut node1, "pvc-died", &target).await?;
    assert_eq!(
        healthy.volume_condition.map(|c| c.abnormal),
        Some(false),
        "healthy at first"
    );

    let pids: Vec<i32> = attachments(node1.state_dir())
        .iter()
        .filter_map(|a| a.strip_prefix("nbdfuse process ")?.parse().ok())
        .collect();
    assert_eq!(pids.len(), 1, "one nbdfuse serves the volume");
    for pid in &pids {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(*pid),
            nix::sys::signal::Signal::SIGKILL,
        )?;
    }
    crate::harness::wait_for("nbdfuse to die", Duration::from_secs(15), || {
        attachments(node1.state_dir())
            .iter()
            .all(|a| !a.starts_with("nbdfuse process"))
            .then_some(())
    })?;

    let condition = stats(&mut node1, "pvc-died", &target)
        .await?
        .volume_condition
        .context("no volume condition")?;
    assert!(condition.abnormal, "{condition:?}");
    assert!(condition.message.contains("nbdfuse"), "{condition:?}");

    unpublish_and_unstage(&mut node1, "pvc-died", &dir).await?;
    assert_eq!(fs_type_at(&target), None);
    assert_eq!(fs_type_at(&dir.join("staging")), None);
    assert_nothing_attached(&node1)?;
    Ok(())
}

/// NodeGetInfo over the socket: the node id kubelet hands to
/// ControllerPublishVolume, the node's own topology key and the zone label
/// the plugin was started with, and the volume limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_get_info_reports_the_node_its_zone_and_its_limit() -> Result<()> {
    let dir = crate::harness::TestDir::new("csi-node-info");
    let socket = dir.join("csi.sock");
    let _plugin = crate::harness::Child::spawn(
        "ballast-csi node",
        Command::new(crate::harness::bin("ballast-csi"))
            .arg("node")
            .arg("--endpoint")
            .arg(format!("unix://{}", socket.display()))
            .arg("--node-id")
            .arg("worker-7")
            .arg("--state-dir")
            .arg(dir.join("state"))
            .args(["--max-volumes", "12"])
            .args(["--topology", "topology.kubernetes.io/zone=zone-b"]),
        &dir.join("plugin.log"),
    )?;
    let mut node = csi::node_client::NodeClient::new(channel(&socket).await?);
    let info = node
        .node_get_info(csi::NodeGetInfoRequest {})
        .await?
        .into_inner();
    assert_eq!(info.node_id, "worker-7");
    assert_eq!(info.max_volumes_per_node, 12);
    let segments = info
        .accessible_topology
        .map(|t| t.segments)
        .unwrap_or_default();
    assert_eq!(
        segments,
        HashMap::from([
            (
                "topology.ballast.io/node".to_string(),
                "worker-7".to_string()
            ),
            (
                "topology.kubernetes.io/zone".to_string(),
                "zone-b".to_string()
            ),
        ])
    );
    Ok(())
}
