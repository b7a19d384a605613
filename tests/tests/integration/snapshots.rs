//! Snapshots, restores and clones on a local cluster through the CLI,
//! checked with qemu-io: what a snapshot holds is exactly what was
//! acknowledged before its cut, restored volumes are independent of their
//! source and of the snapshot, and a snapshot outlives its volume.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, ensure};
use serde_json::Value;

use crate::harness::cluster::Cluster;
use crate::harness::{qemu_io, wait_for};

/// Files under `dir` (at most 8 levels down) whose path ends in `suffix`.
fn files_ending(dir: &Path, suffix: &str) -> Vec<PathBuf> {
    fn walk(dir: &Path, suffix: &str, depth: usize, found: &mut Vec<PathBuf>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let Ok(kind) = entry.file_type() else {
                continue;
            };
            if kind.is_dir() && depth < 8 {
                walk(&path, suffix, depth + 1, found);
            } else if kind.is_file() && path.to_string_lossy().ends_with(suffix) {
                found.push(path);
            }
        }
    }
    let mut found = Vec::new();
    walk(dir, suffix, 0, &mut found);
    found.sort();
    found
}

fn publish(cluster: &Cluster, volume: &str, node: &str) -> Result<String> {
    Ok(cluster
        .cli_ok(&["volume", "publish", volume, "--node", node])?
        .trim()
        .to_string())
}

fn copy_nodes(snapshot: &Value) -> Vec<String> {
    let mut nodes: Vec<String> = snapshot["copies"]
        .as_array()
        .map(|copies| {
            copies
                .iter()
                .filter_map(|c| c["node_id"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    nodes.sort();
    nodes
}

#[test]
fn a_snapshot_of_a_published_volume_holds_what_was_acknowledged_before_the_cut() -> Result<()> {
    let cluster = Cluster::up("snap-published", 3, "embedded", &[])?;
    cluster.cli_ok(&[
        "volume",
        "create",
        "vol-s",
        "--size",
        "64MiB",
        "--replicas",
        "3",
        "--thin",
    ])?;
    let source = publish(&cluster, "vol-s", "node-1")?;
    qemu_io(&source, &["write -P 0xaa 0 4M", "write -P 0xa1 60M 1M"])?;

    let snapshot = cluster.cli_json(&["snapshot", "create", "snap-a", "--volume", "vol-s"])?;
    assert_eq!(snapshot["state"], "ready", "{snapshot}");
    assert_eq!(snapshot["ready_to_use"], true, "{snapshot}");
    assert_eq!(snapshot["size_bytes"], 64 << 20, "{snapshot}");
    assert_eq!(copy_nodes(&snapshot), ["node-1", "node-2", "node-3"]);
    ensure!(
        snapshot["created_at_unix_nanos"].as_u64().unwrap_or(0) > 0,
        "no cut time: {snapshot}"
    );
    // Idempotent by name; another volume under the same name is refused.
    let again = cluster.cli_json(&["snapshot", "create", "snap-a", "--volume", "vol-s"])?;
    assert_eq!(
        again["created_at_unix_nanos"],
        snapshot["created_at_unix_nanos"]
    );
    cluster.cli_ok(&["volume", "create", "vol-o", "--size", "4MiB", "--thin"])?;
    let err = cluster.cli_err(&["snapshot", "create", "snap-a", "--volume", "vol-o"])?;
    assert!(
        err.contains("already exists as a snapshot of volume vol-s"),
        "{err}"
    );

    // Writes after the cut change the source only.
    qemu_io(&source, &["write -P 0xbb 0 4M"])?;

    // Restored larger, on as many nodes: reflinks of the copies.
    let restored = cluster.cli_json(&[
        "volume",
        "create",
        "vol-r",
        "--from-snapshot",
        "snap-a",
        "--size",
        "128MiB",
        "--replicas",
        "3",
        "--thin",
    ])?;
    assert_eq!(restored["size_bytes"], 128 << 20, "{restored}");
    assert_eq!(restored["source_snapshot_id"], "snap-a", "{restored}");
    assert_eq!(restored["status"], "healthy", "{restored}");
    let copy = publish(&cluster, "vol-r", "node-2")?;
    qemu_io(
        &copy,
        &[
            "read -P 0xaa 0 4M",
            "read -P 0xa1 60M 1M",
            "read -P 0 64M 64M",
        ],
    )?;
    qemu_io(&source, &["read -P 0xbb 0 4M", "read -P 0xa1 60M 1M"])?;
    // The restored volume is its own: writing it changes neither the
    // source nor the snapshot.
    qemu_io(&copy, &["write -P 0xcc 0 1M"])?;
    qemu_io(&source, &["read -P 0xbb 0 4M"])?;

    // The snapshot outlives its volume.
    cluster.cli_ok(&["volume", "unpublish", "vol-s"])?;
    cluster.cli_ok(&["volume", "delete", "vol-s"])?;
    let listed = cluster.cli_json(&["snapshot", "list"])?;
    assert_eq!(listed.as_array().map(Vec::len), Some(1), "{listed}");
    cluster.cli_ok(&[
        "volume",
        "create",
        "vol-r2",
        "--from-snapshot",
        "snap-a",
        "--replicas",
        "2",
        "--thin",
    ])?;
    let second = publish(&cluster, "vol-r2", "node-3")?;
    qemu_io(&second, &["read -P 0xaa 0 4M", "read -P 0xa1 60M 1M"])?;

    // Deleting the snapshot removes its copies and leaves restored
    // volumes intact.
    ensure!(
        files_ending(&cluster.path, "snapshots/snap-a.data").len() == 3,
        "copies: {:?}",
        files_ending(&cluster.path, ".data")
    );
    cluster.cli_ok(&["snapshot", "delete", "snap-a"])?;
    cluster.cli_ok(&["snapshot", "delete", "snap-a"])?;
    let left = files_ending(&cluster.path, "snapshots/snap-a.data");
    ensure!(left.is_empty(), "copies left: {left:?}");
    let err = cluster.cli_err(&["snapshot", "show", "snap-a"])?;
    assert!(err.contains("does not exist"), "{err}");
    qemu_io(&second, &["read -P 0xaa 0 4M"])?;
    qemu_io(&copy, &["read -P 0xcc 0 1M", "read -P 0xaa 1M 3M"])?;
    Ok(())
}

#[test]
fn unpublished_volumes_are_snapshotted_and_cloned_from_their_idle_replicas() -> Result<()> {
    let cluster = Cluster::up("snap-idle", 3, "embedded", &[])?;
    cluster.cli_ok(&[
        "volume",
        "create",
        "vol-i",
        "--size",
        "32MiB",
        "--replicas",
        "2",
        "--thin",
    ])?;
    let uri = publish(&cluster, "vol-i", "node-1")?;
    qemu_io(&uri, &["write -P 0x11 0 8M", "flush"])?;
    cluster.cli_ok(&["volume", "unpublish", "vol-i"])?;

    let snapshot = cluster.cli_json(&["snapshot", "create", "snap-i", "--volume", "vol-i"])?;
    assert_eq!(snapshot["paused_ms"], 0, "no target to pause: {snapshot}");
    assert_eq!(copy_nodes(&snapshot).len(), 2, "{snapshot}");

    // A clone of the unpublished volume, and its internal snapshot gone.
    let clone = cluster.cli_json(&["volume", "create", "vol-c", "--from-volume", "vol-i"])?;
    assert_eq!(clone["source_volume_id"], "vol-i", "{clone}");
    assert_eq!(clone["size_bytes"], 32 << 20, "{clone}");
    let names: Vec<String> = cluster
        .cli_json(&["snapshot", "list"])?
        .as_array()
        .context("list")?
        .iter()
        .filter_map(|s| s["snapshot_id"].as_str().map(str::to_string))
        .collect();
    assert_eq!(names, ["snap-i"], "the clone's internal snapshot stayed");

    // Change the source; the clone and the snapshot keep the old bytes.
    let uri = publish(&cluster, "vol-i", "node-2")?;
    qemu_io(&uri, &["write -P 0x22 0 8M"])?;
    let clone_uri = publish(&cluster, "vol-c", "node-3")?;
    qemu_io(&clone_uri, &["read -P 0x11 0 8M", "read -P 0 8M 24M"])?;
    cluster.cli_ok(&["volume", "create", "vol-ri", "--from-snapshot", "snap-i"])?;
    let restored = publish(&cluster, "vol-ri", "node-1")?;
    qemu_io(&restored, &["read -P 0x11 0 8M"])?;
    Ok(())
}

#[test]
fn a_restore_on_more_nodes_than_hold_copies_rebuilds_the_others_in_full() -> Result<()> {
    let cluster = Cluster::up("snap-widen", 3, "embedded", &[])?;
    cluster.cli_ok(&[
        "volume",
        "create",
        "vol-1",
        "--size",
        "32MiB",
        "--replicas",
        "1",
        "--thin",
    ])?;
    let uri = publish(&cluster, "vol-1", "node-1")?;
    qemu_io(&uri, &["write -P 0x5e 1M 6M"])?;
    let snapshot = cluster.cli_json(&["snapshot", "create", "snap-1", "--volume", "vol-1"])?;
    let holder = copy_nodes(&snapshot);
    assert_eq!(holder.len(), 1, "{snapshot}");

    let restored = cluster.cli_json(&[
        "volume",
        "create",
        "vol-3",
        "--from-snapshot",
        "snap-1",
        "--replicas",
        "3",
        "--thin",
    ])?;
    // One reflink on the copy's node; the others wait for a full copy.
    let states: Vec<(String, String)> = restored["replicas"]
        .as_array()
        .context("replicas")?
        .iter()
        .map(|r| {
            (
                r["node_id"].as_str().unwrap_or_default().to_string(),
                r["sync_state"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    assert_eq!(states.len(), 3, "{restored}");
    for (node, state) in &states {
        let expected = if *node == holder[0] {
            "in-sync"
        } else {
            "faulted"
        };
        assert_eq!(state, expected, "{node}: {restored}");
    }
    assert_eq!(restored["status"], "degraded", "{restored}");

    // Publishing rebuilds them from the restored replica.
    let other = ["node-1", "node-2", "node-3"]
        .into_iter()
        .find(|n| *n != holder[0])
        .context("another node")?;
    let copy = publish(&cluster, "vol-3", other)?;
    wait_for(
        "the restored volume to become healthy",
        std::time::Duration::from_secs(90),
        || {
            cluster
                .volume("vol-3")
                .ok()
                .filter(|v| v["status"] == "healthy")
        },
    )?;
    qemu_io(&copy, &["read -P 0x5e 1M 6M", "read -P 0 0 1M"])?;
    // Every replica holds the same bytes.
    let files = files_ending(&cluster.path, "replicas/vol-3.data");
    assert_eq!(files.len(), 3, "{files:?}");
    let first = std::fs::read(&files[0])?;
    for file in &files[1..] {
        ensure!(
            std::fs::read(file)? == first,
            "{} differs from {}",
            file.display(),
            files[0].display()
        );
    }
    Ok(())
}
