//! Snapshots, restores and clones on a local cluster through the CLI,
//! checked with qemu-io: what a snapshot holds is exactly what was
//! acknowledged before its cut, restored volumes are independent of their
//! source and of the snapshot, and a snapshot outlives its volume.

use anyhow::{Context, Result, ensure};
use serde_json::Value;

use crate::harness::cluster::{Cluster, ControllerCli as _};
use crate::harness::{files_ending, qemu_io, wait_for};

fn publish(cluster: &Cluster, volume: &str, node: &str) -> Result<String> {
    Ok(cluster
        .cli_ok(&["volume", "publish", volume, "--node", node])?
        .trim()
        .to_string())
}

/// Creates a thin volume and publishes it on `node`; returns its NBD URI.
fn published(
    cluster: &Cluster,
    volume: &str,
    size: &str,
    replicas: u32,
    node: &str,
) -> Result<String> {
    let replicas = replicas.to_string();
    cluster.cli_ok(&[
        "volume",
        "create",
        volume,
        "--size",
        size,
        "--replicas",
        &replicas,
        "--thin",
    ])?;
    publish(cluster, volume, node)
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
    let source = published(&cluster, "vol-s", "64MiB", 3, "node-1")?;
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
    let uri = published(&cluster, "vol-i", "32MiB", 2, "node-1")?;
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
    let uri = published(&cluster, "vol-1", "32MiB", 1, "node-1")?;
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

/// Where the sequence log lives in the volume, past fio's region.
const LOG_OFFSET: u64 = 100 << 20;
/// Bytes of one log record.
const RECORD_BYTES: usize = 4096;

/// Writes numbered 4 KiB records one after another (each waits for the
/// previous acknowledgement) from LOG_OFFSET, until `stop` exists.
const LOG_WRITER: &str = r#"
import os, sys, nbd, struct
h = nbd.NBD()
h.connect_uri(sys.argv[1])
offset, stop = int(sys.argv[2]), sys.argv[3]
i = 0
while not os.path.exists(stop) and i < 6000:
    body = struct.pack("<8sQ", b"BALLOGv1", i) + bytes([i % 251]) * 4080
    h.pwrite(body, offset + i * 4096)
    i += 1
print(i, flush=True)
"#;

/// The records of a log image: how many form an unbroken prefix from
/// record 0, and whether any valid record lies beyond that prefix.
fn log_prefix(image: &[u8]) -> (usize, bool) {
    let valid = |i: usize| -> bool {
        let Some(record) = image.get(i * RECORD_BYTES..(i + 1) * RECORD_BYTES) else {
            return false;
        };
        let mut head = [0u8; 16];
        head[..8].copy_from_slice(b"BALLOGv1");
        head[8..].copy_from_slice(&(i as u64).to_le_bytes());
        record[..16] == head && record[16..].iter().all(|b| usize::from(*b) == i % 251)
    };
    let records = image.len() / RECORD_BYTES;
    let prefix = (0..records).take_while(|i| valid(*i)).count();
    let beyond = (prefix + 1..records).any(valid);
    (prefix, beyond)
}

#[test]
fn snapshots_under_load_are_one_instant_on_every_replica() -> Result<()> {
    let cluster = Cluster::up("snap-load", 3, "embedded", &[])?;
    let uri = published(&cluster, "vol-l", "128MiB", 3, "node-1")?;
    let mut fio = crate::harness::fio::start(&cluster.dir, &uri, "fio-snap.log")?;
    let stop = cluster.dir.join("stop-log");
    let mut writer = crate::harness::Child::spawn(
        "log writer",
        std::process::Command::new("/usr/bin/python3")
            .args(["-c", LOG_WRITER, &uri, &LOG_OFFSET.to_string()])
            .arg(&stop),
        &cluster.dir.join("log-writer.log"),
    )?;

    let mut taken = Vec::new();
    for i in 0..5 {
        std::thread::sleep(std::time::Duration::from_secs(1));
        let name = format!("load-{i}");
        let snapshot = cluster.cli_json(&["snapshot", "create", &name, "--volume", "vol-l"])?;
        assert_eq!(copy_nodes(&snapshot).len(), 3, "{snapshot}");
        taken.push(name);
    }
    std::fs::write(&stop, b"")?;
    let status = writer.wait_timeout(std::time::Duration::from_secs(60))?;
    ensure!(status.success(), "log writer failed");
    crate::harness::fio::assert_clean(&cluster.dir, &mut fio, "fio-snap.log")?;

    let mut last = 0;
    for name in &taken {
        let copies = files_ending(&cluster.path, &format!("snapshots/{name}.data"));
        assert_eq!(copies.len(), 3, "{name}: {copies:?}");
        // One instant: every replica's copy holds the same bytes.
        let first = std::fs::read(&copies[0])?;
        for other in &copies[1..] {
            ensure!(
                std::fs::read(other)? == first,
                "{name}: {} and {} differ",
                copies[0].display(),
                other.display()
            );
        }
        let start = usize::try_from(LOG_OFFSET)?;
        let (prefix, beyond) = log_prefix(first.get(start..).context("log region")?);
        ensure!(
            !beyond,
            "{name}: a record past the first {prefix} is present without them"
        );
        ensure!(
            prefix >= last,
            "{name}: {prefix} records, fewer than an earlier snapshot's {last}"
        );
        last = prefix;
    }
    ensure!(last > 0, "no log record in any snapshot");
    Ok(())
}

#[test]
fn a_cut_that_outlasts_its_deadline_fails_and_loses_no_write() -> Result<()> {
    let cluster = Cluster::up(
        "snap-deadline",
        3,
        "embedded",
        &["--heartbeat-timeout", "5s"],
    )?;
    let uri = published(&cluster, "vol-d", "32MiB", 3, "node-1")?;
    qemu_io(&uri, &["write -P 0x31 0 1M"])?;
    let hung = cluster.node_process("node-3")?;
    hung.stop(std::time::Duration::from_secs(5))?;
    let outcome = (|| -> Result<()> {
        // A write in flight to the stopped replica holds the barrier off
        // until the replica times out and is dropped.
        let mut write = crate::harness::Child::spawn(
            "qemu-io",
            std::process::Command::new("qemu-io")
                .args(["-f", "raw", "-c", "write -P 0x32 1M 1M"])
                .arg(&uri),
            &cluster.dir.join("pending-write.log"),
        )?;
        std::thread::sleep(std::time::Duration::from_millis(300));
        let err = cluster.cli_err(&[
            "snapshot",
            "create",
            "snap-late",
            "--volume",
            "vol-d",
            "--deadline",
            "500ms",
        ])?;
        ensure!(
            err.contains("did not complete within its deadline"),
            "{err}"
        );
        // Nothing of it is ready; its prepared copies go with its record
        // (node-3's once the node answers again, below).
        let listed = cluster.cli_json(&["snapshot", "list"])?;
        ensure!(
            listed
                .as_array()
                .is_some_and(|l| l.iter().all(|s| s["state"] == "deleting")),
            "{listed}"
        );
        // The write completes once the replica is dropped, and every
        // acknowledged byte is there.
        let status = write.wait_timeout(std::time::Duration::from_secs(120))?;
        ensure!(status.success(), "the pending write failed");
        qemu_io(&uri, &["read -P 0x31 0 1M", "read -P 0x32 1M 1M"])?;
        // A snapshot now holds copies of the in-sync replicas only.
        let snapshot = cluster.cli_json(&["snapshot", "create", "snap-ok", "--volume", "vol-d"])?;
        ensure!(
            copy_nodes(&snapshot) == ["node-1", "node-2"],
            "copies of a dropped replica: {snapshot}"
        );
        Ok(())
    })();
    hung.signal(nix::sys::signal::Signal::SIGCONT)?;
    outcome?;
    wait_for(
        "the failed snapshot's record and copies to go",
        std::time::Duration::from_secs(120),
        || {
            let listed = cluster.cli_json(&["snapshot", "list"]).ok()?;
            let gone = listed
                .as_array()?
                .iter()
                .all(|s| s["snapshot_id"] != "snap-late");
            (gone && files_ending(&cluster.path, "snapshots/snap-late.data").is_empty())
                .then_some(())
        },
    )?;
    cluster.cli_ok(&["volume", "create", "vol-back", "--from-snapshot", "snap-ok"])?;
    let restored = publish(&cluster, "vol-back", "node-2")?;
    qemu_io(&restored, &["read -P 0x31 0 1M", "read -P 0x32 1M 1M"])?;
    Ok(())
}

#[test]
fn a_restore_copied_to_another_node_survives_the_loss_of_its_source() -> Result<()> {
    let cluster = Cluster::up(
        "snap-copy-kill",
        3,
        "embedded",
        &["--heartbeat-timeout", "5s"],
    )?;
    let uri = published(&cluster, "vol-k", "512MiB", 2, "node-1")?;
    let writes: Vec<String> = (0..8)
        .map(|i| format!("write -P {} {}M 48M", 0x40 + i, i * 64))
        .collect();
    let writes: Vec<&str> = writes.iter().map(String::as_str).collect();
    qemu_io(&uri, &writes)?;
    cluster.cli_ok(&["volume", "unpublish", "vol-k"])?;
    let snapshot = cluster.cli_json(&["snapshot", "create", "snap-k", "--volume", "vol-k"])?;
    let holders = copy_nodes(&snapshot);
    assert_eq!(holders, ["node-1", "node-2"], "{snapshot}");

    // Three replicas: two reflinks, node-3's filled by a copy at publish,
    // from one of the restored replicas.
    cluster.cli_ok(&[
        "volume",
        "create",
        "vol-kr",
        "--from-snapshot",
        "snap-k",
        "--replicas",
        "3",
        "--thin",
    ])?;
    let restored = publish(&cluster, "vol-kr", "node-3")?;
    let log = cluster.node_process("node-3")?.log;
    let source = wait_for(
        "node-3's copy to start",
        std::time::Duration::from_secs(60),
        || {
            let text = std::fs::read_to_string(&log).ok()?;
            let line = text
                .lines()
                .find(|l| l.contains("Copying regions") && l.contains("volume.id=vol-kr"))?;
            ["node-1", "node-2"]
                .into_iter()
                .find(|n| line.contains(&format!("source={n}")))
        },
    )?;
    let victim = cluster.node_process(source)?;
    // Freeze the source mid-copy, check the copy is not done, then kill it.
    victim.stop(std::time::Duration::from_secs(5))?;
    let shown = cluster.volume("vol-kr")?;
    let node3 = shown["replicas"]
        .as_array()
        .and_then(|r| r.iter().find(|r| r["node_id"] == "node-3"))
        .context("node-3 replica")?
        .clone();
    victim.signal(nix::sys::signal::Signal::SIGKILL)?;
    ensure!(
        node3["sync_state"] != "in-sync",
        "the copy finished before its source could be stopped: {node3}"
    );

    // The copy starts again from the other restored replica.
    let other = if source == "node-1" {
        "node-2"
    } else {
        "node-1"
    };
    wait_for(
        "node-3 in sync again",
        std::time::Duration::from_secs(180),
        || {
            cluster.replica_states("vol-kr").ok().filter(|states| {
                states
                    .iter()
                    .filter(|(n, s)| (n == "node-3" || n == other) && s == "in-sync")
                    .count()
                    == 2
            })
        },
    )?;
    // Byte for byte what the snapshot holds (its surviving copy).
    let copy = files_ending(&cluster.path, "snapshots/snap-k.data")
        .into_iter()
        .find(|p| p.to_string_lossy().contains(&format!("/{other}/")))
        .context("the surviving copy")?;
    crate::harness::run_ok(
        std::process::Command::new("qemu-img")
            .args(["compare", "-f", "raw", "-F", "raw"])
            .arg(&copy)
            .arg(&restored),
        std::time::Duration::from_secs(120),
    )?;
    Ok(())
}

#[test]
fn a_snapshot_while_a_replica_rebuilds_copies_only_the_in_sync_ones() -> Result<()> {
    let cluster = Cluster::up(
        "snap-rebuilding",
        3,
        "embedded",
        &["--heartbeat-timeout", "5s"],
    )?;
    let uri = published(&cluster, "vol-1", "256MiB", 1, "node-1")?;
    let writes: Vec<String> = (0..4)
        .map(|i| format!("write -P {} {}M 60M", 0x70 + i, i * 64))
        .collect();
    let writes: Vec<&str> = writes.iter().map(String::as_str).collect();
    qemu_io(&uri, &writes)?;
    cluster.cli_ok(&["snapshot", "create", "base", "--volume", "vol-1"])?;
    // Three replicas: node-1's restored, the two others to be copied at
    // publish; node-3's agent is stopped, so its replica stays out of sync.
    cluster.cli_ok(&[
        "volume",
        "create",
        "vol-3",
        "--from-snapshot",
        "base",
        "--replicas",
        "3",
        "--thin",
    ])?;
    let stopped = cluster.node_process("node-3")?;
    stopped.stop(std::time::Duration::from_secs(5))?;
    let outcome = (|| -> Result<Value> {
        let restored = publish(&cluster, "vol-3", "node-1")?;
        qemu_io(&restored, &["write -P 0x7f 250M 1M"])?;
        let shown = cluster.volume("vol-3")?;
        let node3 = shown["replicas"]
            .as_array()
            .and_then(|r| r.iter().find(|r| r["node_id"] == "node-3"))
            .context("node-3's replica")?;
        ensure!(node3["sync_state"] != "in-sync", "{shown}");
        cluster.cli_json(&["snapshot", "create", "during", "--volume", "vol-3"])
    })();
    stopped.signal(nix::sys::signal::Signal::SIGCONT)?;
    let snapshot = outcome?;
    let nodes = copy_nodes(&snapshot);
    ensure!(
        nodes.contains(&"node-1".to_string()) && !nodes.contains(&"node-3".to_string()),
        "copies must be of in-sync replicas only: {snapshot}"
    );
    cluster.cli_ok(&["volume", "create", "vol-back", "--from-snapshot", "during"])?;
    let back = publish(&cluster, "vol-back", "node-2")?;
    qemu_io(
        &back,
        &[
            "read -P 0x70 0 60M",
            "read -P 0x73 192M 58M",
            "read -P 0x7f 250M 1M",
        ],
    )?;
    Ok(())
}
