//! App-consistent group snapshots on a local cluster: filesystems frozen
//! through the cut (`ballast.io/freeze`), pre- and post-hooks run on the
//! members' nodes, and nothing left frozen or paused when a hook fails.
//!
//! The images are read with the filesystems' own offline tools, which
//! replay no journal: a frozen ext4 has no `needs_recovery` flag
//! (`dumpe2fs -h`), and a frozen XFS has every file in place without its
//! log (`xfs_db -r -c "ls /"`), while a crash-consistent cut of the same
//! volumes needs its journal.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use ballast_csi::demo::kubelet::{Attachment, Kubelet};
use ballast_proto::agent::quiesce_service_client::QuiesceServiceClient;
use ballast_proto::csi;
use serde_json::Value;

use crate::harness::cluster::Cluster;
use crate::harness::csi::NodePlugin;
use crate::harness::postgres::kubelet;
use crate::harness::{files_ending, run_ok, wait_for};

/// Longest a shell loop or an offline filesystem tool may take.
const TOOL_TIMEOUT: Duration = Duration::from_secs(60);

/// Files each batch writes (and fsyncs) on every volume.
const FILES: usize = 40;

/// The pre-hook: a marker in the volume's root, written before the freeze,
/// so it must be in the cut.
const PRE_HOOK: &str = r#"test -n "$BALLAST_MOUNT_PATH" && echo "$BALLAST_VOLUME_ID $BALLAST_HOOK_PHASE" > "$BALLAST_MOUNT_PATH/pre-hook-ran""#;

/// The post-hook: a marker written after the thaw (it would wait if the
/// filesystem were still frozen), so it must not be in the cut.
const POST_HOOK: &str =
    r#"test -n "$BALLAST_MOUNT_PATH" && echo post > "$BALLAST_MOUNT_PATH/post-hook-ran""#;

/// Two volumes on two nodes, ext4 and XFS, staged and published as
/// kubelet does.
struct Members {
    kubelet: Kubelet,
    /// (volume id, attachment) for ext4 on node-1, XFS on node-2.
    volumes: Vec<(String, Attachment)>,
}

async fn members(cluster: &Cluster) -> Result<Members> {
    let mut kubelet = kubelet(cluster).await?;
    let mut volumes = Vec::new();
    for (name, fs, bytes, node) in [
        ("pvc-ext4", "ext4", 256u64 << 20, "node-1"),
        ("pvc-xfs", "xfs", 320 << 20, "node-2"),
    ] {
        let volume = kubelet.create_volume(name, bytes, 2, fs).await?;
        let context = kubelet.controller_publish(&volume, node).await?;
        let attachment = kubelet.attachment(name, node, "app-0");
        kubelet.node_publish(&volume, &context, &attachment).await?;
        volumes.push((name.to_string(), attachment));
    }
    Ok(Members { kubelet, volumes })
}

impl Members {
    /// Writes and fsyncs `FILES` files named `<prefix>-<i>` on every
    /// volume, through the pod's mount.
    fn write_files(&self, prefix: &str) -> Result<()> {
        for (_, attachment) in &self.volumes {
            let dir = &attachment.target_path;
            let script = format!(
                "for i in $(seq 0 {last}); do echo $i > {dir}/{prefix}-$i && sync -f {dir}/{prefix}-$i; done",
                last = FILES - 1,
                dir = dir.display()
            );
            run_ok(
                std::process::Command::new("sh").args(["-c", &script]),
                TOOL_TIMEOUT,
            )?;
        }
        Ok(())
    }

    /// CreateVolumeGroupSnapshot of both volumes with `parameters`; the
    /// controller's status when it refuses.
    async fn group(
        &mut self,
        name: &str,
        parameters: &[(&str, &str)],
    ) -> Result<Result<csi::VolumeGroupSnapshot, tonic::Status>> {
        let volumes: Vec<&str> = self.volumes.iter().map(|(v, _)| v.as_str()).collect();
        match self
            .kubelet
            .create_group_snapshot(name, &volumes, parameters)
            .await
        {
            Ok(group) => Ok(Ok(group)),
            Err(ballast_csi::demo::kubelet::Error::Call { status, .. }) => Ok(Err(status)),
            Err(err) => Err(err.into()),
        }
    }

    /// Unstages every volume (the cluster's teardown would too; doing it
    /// here checks that nothing is left frozen or busy).
    async fn unpublish(&mut self) -> Result<()> {
        for (_, attachment) in &self.volumes {
            self.kubelet.node_unpublish(attachment).await?;
        }
        Ok(())
    }
}

/// One copy of member snapshot `snapshot` (any node's: they are equal).
fn copy(cluster: &Cluster, snapshot: &str) -> Result<PathBuf> {
    files_ending(&cluster.path, &format!("snapshots/{snapshot}.data"))
        .into_iter()
        .next()
        .with_context(|| format!("no copy of {snapshot}"))
}

/// The names in the root directory of the XFS image `image`, read from
/// its on-disk metadata without replaying its log.
fn xfs_root(image: &Path) -> Result<Vec<String>> {
    let listing = run_ok(
        std::process::Command::new("xfs_db").args([
            "-r".as_ref(),
            "-c".as_ref(),
            "ls /".as_ref(),
            image.as_os_str(),
        ]),
        TOOL_TIMEOUT,
    )?;
    // Lines: "<dir offset> <inode> <type> <hash> <namelen> <name> (good)".
    Ok(listing
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            (fields.len() >= 6).then(|| fields[fields.len() - 2].to_string())
        })
        .collect())
}

/// The names in the root directory of the ext4 image `image`, read in
/// catastrophic mode (the journal is not read).
fn ext4_root(image: &Path) -> Result<Vec<String>> {
    let listing = run_ok(
        std::process::Command::new("debugfs").args([
            "-c".as_ref(),
            "-R".as_ref(),
            "ls -p /".as_ref(),
            image.as_os_str(),
        ]),
        TOOL_TIMEOUT,
    )?;
    // Lines: "/<inode>/<mode>/<uid>/<gid>/<name>/<size>/".
    Ok(listing
        .lines()
        .filter_map(|line| line.split('/').nth(5).map(str::to_string))
        .filter(|name| !name.is_empty())
        .collect())
}

/// True when the ext4 image's superblock says its journal needs replay.
fn ext4_needs_recovery(image: &Path) -> Result<bool> {
    let header = run_ok(
        std::process::Command::new("dumpe2fs").arg("-h").arg(image),
        TOOL_TIMEOUT,
    )?;
    let features = header
        .lines()
        .find(|l| l.starts_with("Filesystem features:"))
        .context("dumpe2fs printed no features")?;
    Ok(features.split_whitespace().any(|f| f == "needs_recovery"))
}

/// The files of batch `prefix` missing from `names`.
fn missing(names: &[String], prefix: &str) -> Vec<String> {
    (0..FILES)
        .map(|i| format!("{prefix}-{i}"))
        .filter(|f| !names.contains(f))
        .collect()
}

/// No freeze is recorded by any node plugin.
fn no_freeze_recorded(cluster: &Cluster) -> Result<()> {
    let left = files_ending(&cluster.path, ".json")
        .into_iter()
        .filter(|p| p.parent().is_some_and(|d| d.ends_with("frozen")))
        .collect::<Vec<_>>();
    ensure!(left.is_empty(), "freezes left recorded: {left:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_group_snapshot_holds_clean_filesystems_and_runs_its_hooks() -> Result<()> {
    let cluster = Cluster::up("app-freeze", 3, "embedded", &[])?;
    let mut members = members(&cluster).await?;

    // A crash-consistent cut first, to show what the checks below see
    // without a freeze.
    members.write_files("before-crash-cut")?;
    members.group("grp-crash", &[]).await??;
    members.write_files("before-frozen-cut")?;
    let group = members
        .group(
            "grp-frozen",
            &[
                ("ballast.io/freeze", "true"),
                ("ballast.io/pre-hook", PRE_HOOK),
                ("ballast.io/post-hook", POST_HOOK),
                ("csi.storage.k8s.io/volumegroupsnapshot/name", "grp-frozen"),
            ],
        )
        .await??;
    ensure!(group.ready_to_use, "{group:?}");

    // The post-hook ran after the thaw on each member, and the
    // filesystems take writes again.
    for (volume, attachment) in &members.volumes {
        let marker = attachment.target_path.join("post-hook-ran");
        ensure!(marker.exists(), "no post-hook marker on {volume}");
    }
    members.write_files("after-thaw")?;
    no_freeze_recorded(&cluster)?;

    // ext4: the frozen cut's journal is empty; the crash cut's is not.
    let crash = copy(&cluster, "grp-crash-pvc-ext4")?;
    let frozen = copy(&cluster, "grp-frozen-pvc-ext4")?;
    ensure!(
        ext4_needs_recovery(&crash)?,
        "the crash-consistent ext4 cut should need journal recovery"
    );
    ensure!(
        !ext4_needs_recovery(&frozen)?,
        "the frozen ext4 cut needs journal recovery"
    );
    let names = ext4_root(&frozen)?;
    ensure!(names.contains(&"pre-hook-ran".to_string()), "{names:?}");
    ensure!(!names.contains(&"post-hook-ran".to_string()), "{names:?}");
    ensure!(missing(&names, "before-frozen-cut").is_empty(), "{names:?}");

    // XFS: every file written before the freeze is in place without the
    // log; the post-hook's is not there.
    let names = xfs_root(&copy(&cluster, "grp-frozen-pvc-xfs")?)?;
    ensure!(names.contains(&"pre-hook-ran".to_string()), "{names:?}");
    ensure!(!names.contains(&"post-hook-ran".to_string()), "{names:?}");
    for batch in ["before-crash-cut", "before-frozen-cut"] {
        let gone = missing(&names, batch);
        ensure!(
            gone.is_empty(),
            "the frozen XFS cut lacks {gone:?} without its log"
        );
    }
    let crash_names = xfs_root(&copy(&cluster, "grp-crash-pvc-xfs")?)?;
    eprintln!(
        "the crash-consistent XFS cut shows {} of {FILES} files without its log",
        FILES - missing(&crash_names, "before-crash-cut").len()
    );

    // The management API records what was done.
    let shown: Value = cluster.cli_json(&["snapshot", "group", "show", "grp-frozen"])?;
    let snapshots = shown["snapshots"].as_array().context("members")?;
    ensure!(snapshots.len() == 2, "{shown}");
    for member in snapshots {
        ensure!(member["frozen"] == true, "{member}");
        ensure!(member["hooks_run"] == 2, "{member}");
    }
    let crash_shown = cluster.cli_json(&["snapshot", "show", "grp-crash-pvc-ext4"])?;
    ensure!(crash_shown["frozen"] != true, "{crash_shown}");
    members.unpublish().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_or_hung_pre_hook_fails_the_group_before_anything_is_frozen_or_paused()
-> Result<()> {
    let cluster = Cluster::up("app-hooks", 3, "embedded", &[])?;
    let mut members = members(&cluster).await?;

    for (name, hook, timeout) in [
        ("grp-fails", "echo cannot checkpoint >&2; exit 7", "30s"),
        ("grp-hangs", "sleep 60", "1s"),
    ] {
        let refused = members
            .group(
                name,
                &[
                    ("ballast.io/freeze", "true"),
                    ("ballast.io/pre-hook", hook),
                    ("ballast.io/post-hook", POST_HOOK),
                    ("ballast.io/hook-timeout", timeout),
                ],
            )
            .await?
            .expect_err("a failing pre-hook fails the group");
        ensure!(
            refused.code() == tonic::Code::FailedPrecondition,
            "{name}: {refused:?}"
        );
        if name == "grp-fails" {
            ensure!(
                refused.message().contains("cannot checkpoint"),
                "{refused:?}"
            );
            ensure!(refused.message().contains("exit code 7"), "{refused:?}");
        }
        // Nothing was prepared, copied or kept.
        for (volume, _) in &members.volumes {
            let member = format!("snapshots/{name}-{volume}.data");
            ensure!(
                files_ending(&cluster.path, &member).is_empty(),
                "{member} exists after a failed pre-hook"
            );
        }
        // Its records go in the background, as after any failed cut.
        wait_for(
            "the failed group's records to go",
            Duration::from_secs(30),
            || {
                let listed = cluster.cli_json(&["snapshot", "list"]).ok()?;
                listed.as_array().is_some_and(Vec::is_empty).then_some(())
            },
        )?;
        no_freeze_recorded(&cluster)?;
        // The post-hook ran on the members whose pre-hooks started (the
        // first member: the second's never ran), and writes go through.
        let first = &members.volumes[0].1.target_path;
        let marker = first.join("post-hook-ran");
        ensure!(marker.exists(), "{name}: the post-hook did not run");
        std::fs::remove_file(&marker)?;
        members.write_files(name)?;
    }
    // Nothing paused either: the targets never saw a pause (a pause
    // leaves a line in the agent's log).
    let info = cluster.info()?;
    for node in &info.nodes {
        let log = std::fs::read_to_string(&node.process.log)?;
        ensure!(
            !log.contains("grp-fails") && !log.contains("grp-hangs"),
            "{}'s agent saw the failed groups:\n{}",
            node.node_id,
            node.process.log_tail(20)
        );
    }
    members.unpublish().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_freeze_is_thawed_at_its_deadline_and_by_a_restarted_node_plugin() -> Result<()> {
    let cluster = Cluster::up("app-thaw", 3, "embedded", &[])?;
    let mut members = members(&cluster).await?;
    let info = cluster.info()?;
    let node1 = info
        .nodes
        .iter()
        .find(|n| n.node_id == "node-1")
        .context("node-1")?;
    let mut agent = QuiesceServiceClient::new(
        tonic::transport::Endpoint::from_shared(node1.agent_address.clone())?
            .connect()
            .await?,
    );
    let (volume, attachment) = members.volumes[0].clone();
    let freeze = |freeze_id: &str, deadline_ms| csi_freeze(&volume, freeze_id, deadline_ms);

    // A volume staged on another node is not frozen here.
    let elsewhere = agent
        .freeze_filesystem(csi_freeze("pvc-xfs", "f-0", 5_000))
        .await?
        .into_inner();
    ensure!(!elsewhere.frozen, "{elsewhere:?}");
    ensure!(
        elsewhere.skipped_reason.contains("not attached"),
        "{elsewhere:?}"
    );

    // Frozen, and nobody thaws: the node plugin does at the deadline.
    let frozen = agent
        .freeze_filesystem(freeze("f-1", 1_500))
        .await?
        .into_inner();
    ensure!(frozen.frozen, "{frozen:?}");
    let again = agent
        .freeze_filesystem(freeze("f-other", 1_500))
        .await
        .expect_err("a second freeze id is refused");
    ensure!(again.code() == tonic::Code::FailedPrecondition, "{again:?}");
    let writer = blocked_writer(&attachment.target_path, "during-freeze")?;
    wait_for("the deadline's thaw", Duration::from_secs(30), || {
        writer.is_finished().then_some(())
    })?;
    writer
        .join()
        .map_err(|_| anyhow::anyhow!("the writer panicked"))??;
    let late = agent
        .thaw_filesystem(ballast_proto::agent::ThawFilesystemRequest {
            volume_id: volume.clone(),
            freeze_id: "f-1".into(),
        })
        .await?
        .into_inner();
    ensure!(!late.was_frozen, "thawed twice: {late:?}");

    // Frozen again, then the node plugin is killed: its successor thaws
    // what its record names (well before this freeze's own deadline).
    let frozen = agent
        .freeze_filesystem(freeze("f-2", 120_000))
        .await?
        .into_inner();
    ensure!(frozen.frozen, "{frozen:?}");
    let writer = blocked_writer(&attachment.target_path, "during-crash")?;
    let mut plugin = NodePlugin::start(&cluster, "node-1").await?;
    plugin.restart().await?;
    wait_for(
        "the restarted plugin's thaw",
        Duration::from_secs(60),
        || writer.is_finished().then_some(()),
    )?;
    writer
        .join()
        .map_err(|_| anyhow::anyhow!("the writer panicked"))??;
    no_freeze_recorded(&cluster)?;
    members.unpublish().await?;
    Ok(())
}

fn csi_freeze(
    volume: &str,
    freeze_id: &str,
    deadline_ms: u32,
) -> ballast_proto::agent::FreezeFilesystemRequest {
    ballast_proto::agent::FreezeFilesystemRequest {
        volume_id: volume.to_string(),
        freeze_id: freeze_id.to_string(),
        deadline_ms,
    }
}

/// Starts writing (and fsyncing) one file under `dir` on a thread of its
/// own: on a frozen filesystem it waits until the thaw.
fn blocked_writer(dir: &Path, name: &str) -> Result<std::thread::JoinHandle<Result<()>>> {
    let path = dir.join(name);
    Ok(std::thread::spawn(move || -> Result<()> {
        std::fs::write(&path, b"written")?;
        std::fs::File::open(&path)?.sync_all()?;
        Ok(())
    }))
}
