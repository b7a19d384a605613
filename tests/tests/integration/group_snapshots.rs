//! Group snapshots on a local cluster: one instant across volumes whose
//! targets run on different nodes (DESIGN.md invariant 5), checked with a
//! writer whose every record depends on the one before it on the other
//! volume; the same check applied to two single snapshots shows that it
//! can see a violation.

use std::time::Duration;

use anyhow::{Context, Result, ensure};

use crate::harness::cluster::Cluster;
use crate::harness::{Child, files_ending, run_ok};

/// Bytes of one record.
const RECORD_BYTES: usize = 4096;

/// Writes numbered records alternately to two volumes, each one after the
/// previous one was acknowledged: record i goes to the first volume when
/// i is even, at (i / 2) * 4096, else to the second. Stops when `stop`
/// exists.
const WRITER: &str = r#"
import os, sys, nbd, struct
a, b = nbd.NBD(), nbd.NBD()
a.connect_uri(sys.argv[1]); b.connect_uri(sys.argv[2])
stop = sys.argv[3]
i = 0
while not os.path.exists(stop) and i < 8000:
    body = struct.pack("<8sQ", b"BALGRPv1", i) + bytes([i % 251]) * 4080
    (a if i % 2 == 0 else b).pwrite(body, (i // 2) * 4096)
    i += 1
"#;

/// The records of one volume's image that form an unbroken run from its
/// first, and whether a valid record lies past that run. `parity` is 0
/// for the first volume, 1 for the second.
fn records(image: &[u8], parity: u64) -> (u64, bool) {
    let valid = |slot: usize| -> bool {
        let Some(record) = image.get(slot * RECORD_BYTES..(slot + 1) * RECORD_BYTES) else {
            return false;
        };
        let seq = slot as u64 * 2 + parity;
        let mut head = [0u8; 16];
        head[..8].copy_from_slice(b"BALGRPv1");
        head[8..].copy_from_slice(&seq.to_le_bytes());
        record[..16] == head && record[16..].iter().all(|b| u64::from(*b) == seq % 251)
    };
    let slots = image.len() / RECORD_BYTES;
    let run = (0..slots).take_while(|s| valid(*s)).count();
    let beyond = (run + 1..slots).any(valid);
    (run as u64, beyond)
}

/// Checks that the pair of images holds a prefix of the writer's
/// sequence: every record present has every earlier one, on both volumes.
fn consistent(a: &[u8], b: &[u8]) -> Result<(u64, u64)> {
    let (on_a, beyond_a) = records(a, 0);
    let (on_b, beyond_b) = records(b, 1);
    ensure!(!beyond_a && !beyond_b, "a record past a gap");
    // Records go A0 B1 A2 B3 ...: a prefix holds as many on B as on A, or
    // one fewer.
    ensure!(
        on_a == on_b || on_a == on_b + 1,
        "not a prefix of the write order: {on_a} records on the first volume, {on_b} on the second"
    );
    Ok((on_a, on_b))
}

fn copy_of(cluster: &Cluster, snapshot: &str) -> Result<Vec<u8>> {
    let path = files_ending(&cluster.path, &format!("snapshots/{snapshot}.data"))
        .into_iter()
        .next()
        .with_context(|| format!("no copy of {snapshot}"))?;
    Ok(std::fs::read(path)?)
}

#[test]
fn group_snapshots_hold_one_instant_across_targets_on_two_nodes() -> Result<()> {
    let cluster = Cluster::up("group-order", 3, "embedded", &[])?;
    let mut uris = Vec::new();
    for (volume, node) in [("vol-a", "node-1"), ("vol-b", "node-2")] {
        cluster.cli_ok(&[
            "volume",
            "create",
            volume,
            "--size",
            "64MiB",
            "--replicas",
            "2",
            "--thin",
        ])?;
        let uri = cluster.cli_ok(&["volume", "publish", volume, "--node", node])?;
        uris.push(uri.trim().to_string());
    }
    let stop = cluster.dir.join("stop-writer");
    let mut writer = Child::spawn(
        "group writer",
        std::process::Command::new("/usr/bin/python3")
            .args(["-c", WRITER, &uris[0], &uris[1]])
            .arg(&stop),
        &cluster.dir.join("writer.log"),
    )?;
    std::thread::sleep(Duration::from_millis(500));

    let mut groups = Vec::new();
    for i in 0..4 {
        let name = format!("g{i}");
        let group = cluster.cli_json(&[
            "snapshot", "group", "create", &name, "--volume", "vol-a", "--volume", "vol-b",
        ])?;
        ensure!(group["state"] == "ready", "{group}");
        ensure!(
            group["snapshots"].as_array().map(Vec::len) == Some(2),
            "{group}"
        );
        groups.push(name);
        std::thread::sleep(Duration::from_millis(300));
    }
    // The control: two single snapshots, one after the other, under the
    // same writer.
    cluster.cli_ok(&["snapshot", "create", "single-a", "--volume", "vol-a"])?;
    std::thread::sleep(Duration::from_millis(300));
    cluster.cli_ok(&["snapshot", "create", "single-b", "--volume", "vol-b"])?;
    std::fs::write(&stop, b"")?;
    let status = writer.wait_timeout(Duration::from_secs(60))?;
    ensure!(status.success(), "the writer failed");

    let mut last = (0, 0);
    for name in &groups {
        let a = copy_of(&cluster, &format!("{name}-vol-a"))?;
        let b = copy_of(&cluster, &format!("{name}-vol-b"))?;
        let counts = consistent(&a, &b).with_context(|| format!("group {name}"))?;
        ensure!(counts >= last, "{name}: {counts:?} after {last:?}");
        last = counts;
    }
    ensure!(last.0 > 0, "no record in any group snapshot");
    let control = consistent(
        &copy_of(&cluster, "single-a")?,
        &copy_of(&cluster, "single-b")?,
    );
    ensure!(
        control.is_err(),
        "two single snapshots 300 ms apart looked like one instant: {control:?}"
    );

    // A restored pair, read through NBD, holds the same prefix.
    let last_group = groups.last().context("a group")?;
    let mut restored = Vec::new();
    for (volume, node) in [("vol-a", "node-3"), ("vol-b", "node-3")] {
        let name = format!("r-{volume}");
        let member = format!("{last_group}-{volume}");
        cluster.cli_ok(&["volume", "create", &name, "--from-snapshot", &member])?;
        let uri = cluster.cli_ok(&["volume", "publish", &name, "--node", node])?;
        let image = cluster.dir.join(&format!("{name}.img"));
        run_ok(
            std::process::Command::new("nbdcopy")
                .arg(uri.trim())
                .arg(&image),
            Duration::from_secs(120),
        )?;
        restored.push(std::fs::read(&image)?);
    }
    let counts = consistent(&restored[0], &restored[1])?;
    ensure!(counts == last, "restored {counts:?}, copies {last:?}");

    // Members go with their group only.
    let err = cluster.cli_err(&["snapshot", "delete", &format!("{last_group}-vol-a")])?;
    ensure!(err.contains("delete the group"), "{err}");
    for name in &groups {
        cluster.cli_ok(&["snapshot", "group", "delete", name])?;
    }
    let left = cluster.cli_json(&["snapshot", "group", "list"])?;
    ensure!(left.as_array().is_some_and(Vec::is_empty), "{left}");
    for name in &groups {
        for volume in ["vol-a", "vol-b"] {
            let member = format!("snapshots/{name}-{volume}.data");
            ensure!(
                files_ending(&cluster.path, &member).is_empty(),
                "{member} stayed after its group was deleted"
            );
        }
    }
    Ok(())
}

#[test]
fn a_group_cut_whose_member_stalls_fails_and_a_retry_succeeds() -> Result<()> {
    let cluster = Cluster::up("group-stall", 3, "embedded", &["--heartbeat-timeout", "5s"])?;
    let mut uris = Vec::new();
    for (volume, node) in [("vol-a", "node-1"), ("vol-b", "node-2")] {
        cluster.cli_ok(&[
            "volume",
            "create",
            volume,
            "--size",
            "32MiB",
            "--replicas",
            "3",
            "--thin",
        ])?;
        let uri = cluster.cli_ok(&["volume", "publish", volume, "--node", node])?;
        uris.push(uri.trim().to_string());
    }
    crate::harness::qemu_io(&uris[0], &["write -P 0x61 0 1M"])?;
    crate::harness::qemu_io(&uris[1], &["write -P 0x62 0 1M"])?;
    // node-2 runs vol-b's target: stopped, it never answers its pause.
    let stalled = cluster.node_process("node-2")?;
    stalled.signal(nix::sys::signal::Signal::SIGSTOP)?;
    let outcome = (|| -> Result<()> {
        let err = cluster.cli_err(&[
            "snapshot",
            "group",
            "create",
            "g-stall",
            "--volume",
            "vol-a",
            "--volume",
            "vol-b",
            "--deadline",
            "1s",
        ])?;
        ensure!(err.contains("deadline"), "{err}");
        // vol-a's target was paused with the group and resumed: its writes
        // go on while vol-b's node is stopped.
        crate::harness::qemu_io(&uris[0], &["write -P 0x63 1M 1M", "read -P 0x61 0 1M"])?;
        let groups = cluster.cli_json(&["snapshot", "group", "list"])?;
        ensure!(
            groups
                .as_array()
                .is_some_and(|g| g.iter().all(|g| g["state"] != "ready")),
            "{groups}"
        );
        Ok(())
    })();
    stalled.signal(nix::sys::signal::Signal::SIGCONT)?;
    outcome?;
    // Once the node answers, the failed group's leftovers go and a retry
    // under the same name succeeds.
    crate::harness::wait_for(
        "the failed group to be removed",
        Duration::from_secs(120),
        || {
            let groups = cluster.cli_json(&["snapshot", "group", "list"]).ok()?;
            groups.as_array()?.is_empty().then_some(())
        },
    )?;
    let group = cluster.cli_json(&[
        "snapshot", "group", "create", "g-stall", "--volume", "vol-a", "--volume", "vol-b",
    ])?;
    ensure!(group["state"] == "ready", "{group}");
    crate::harness::qemu_io(&uris[1], &["read -P 0x62 0 1M"])?;
    Ok(())
}

#[test]
fn a_controller_killed_while_members_are_paused_holds_no_write_past_the_deadline() -> Result<()> {
    let cluster = Cluster::up("group-kill", 3, "embedded", &["--heartbeat-timeout", "5s"])?;
    let mut uris = Vec::new();
    for (volume, node) in [("vol-a", "node-1"), ("vol-b", "node-2")] {
        cluster.cli_ok(&[
            "volume",
            "create",
            volume,
            "--size",
            "32MiB",
            "--replicas",
            "3",
            "--thin",
        ])?;
        let uri = cluster.cli_ok(&["volume", "publish", volume, "--node", node])?;
        uris.push(uri.trim().to_string());
    }
    let info = cluster.info()?;
    // node-3 holds a replica of both and answers nothing: the cut waits in
    // its copy phase, with both targets paused.
    let stalled = cluster.node_process("node-3")?;
    stalled.signal(nix::sys::signal::Signal::SIGSTOP)?;
    let outcome = (|| -> Result<()> {
        let mut group = Child::spawn(
            "group create",
            std::process::Command::new(crate::harness::bin("ballast"))
                .arg("--cluster")
                .arg(&cluster.path)
                .args(["snapshot", "group", "create", "g-kill"])
                .args(["--volume", "vol-a", "--volume", "vol-b", "--deadline", "4s"]),
            &cluster.dir.join("group-create.log"),
        )?;
        for (id, member) in [("node-1", "g-kill-vol-a"), ("node-2", "g-kill-vol-b")] {
            let log = cluster.node_process(id)?.log;
            crate::harness::wait_for(
                &format!("{member}'s barrier on {id}"),
                Duration::from_secs(60),
                || {
                    let text = std::fs::read_to_string(&log).ok()?;
                    text.lines()
                        .any(|l| l.contains("Write barrier raised") && l.contains(member))
                        .then_some(())
                },
            )?;
        }
        let controller = info.controller.as_ref().context("controller")?;
        controller
            .process
            .signal(nix::sys::signal::Signal::SIGKILL)?;
        let _ = group.wait_timeout(Duration::from_secs(30));
        Ok(())
    })();
    stalled.signal(nix::sys::signal::Signal::SIGCONT)?;
    outcome?;
    // No controller: both targets drop their barriers at the deadline on
    // their own, and writes go on (node-3 answers again, so no write needs
    // a drop the dead controller would have to commit).
    crate::harness::qemu_io(&uris[0], &["write -P 0x21 0 1M", "read -P 0x21 0 1M"])?;
    crate::harness::qemu_io(&uris[1], &["write -P 0x22 0 1M", "read -P 0x22 0 1M"])?;

    // A restarted controller's reconciler removes the partial group; a
    // retry under the same name succeeds.
    let controller = info.controller.as_ref().context("controller")?;
    let _restarted = Child::spawn(
        "ballast-csi",
        std::process::Command::new(&controller.process.command[0])
            .args(&controller.process.command[1..]),
        &cluster.dir.join("controller-restarted.log"),
    )?;
    cluster.wait_all_up(3)?;
    crate::harness::wait_for(
        "the partial group to be removed",
        Duration::from_secs(120),
        || {
            let groups = cluster.cli_json(&["snapshot", "group", "list"]).ok()?;
            let snapshots = cluster.cli_json(&["snapshot", "list"]).ok()?;
            (groups.as_array()?.is_empty() && snapshots.as_array()?.is_empty()).then_some(())
        },
    )?;
    let group = cluster.cli_json(&[
        "snapshot", "group", "create", "g-kill", "--volume", "vol-a", "--volume", "vol-b",
    ])?;
    ensure!(group["state"] == "ready", "{group}");
    Ok(())
}
