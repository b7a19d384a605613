//! A real application on Ballast: PostgreSQL with its data on a 3-replica
//! volume of a local cluster, driven through the CSI sockets.
//!
//! - `ballast demo` itself, as a user runs it (short pgbench phases): it
//!   must pass every check, print measured numbers, and leave no process,
//!   mount or loop device behind.
//! - The target's node fails: the agent of the node where PostgreSQL runs
//!   is SIGKILLed under pgbench. PostgreSQL is killed, the node's stage and
//!   publish are cleaned up through its node plugin, the volume moves to
//!   node-2 (ControllerUnpublishVolume, then ControllerPublishVolume, as
//!   Kubernetes does), PostgreSQL recovers there, and every transaction
//!   pgbench saw committed is in the database.
//!
//! PostgreSQL runs as the `postgres` user, so each test directory is made
//! enterable by others (mode 0755).

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use ballast_csi::demo::postgres::Instance;
use nix::sys::signal::Signal;

use crate::harness::cluster::{
    Cluster, ControllerCli as _, loops_under, mark_owner, mounts_under, sweep_orphans,
};
use crate::harness::postgres::{committing_load, history, kubelet};
use crate::harness::{Child, TestDir, bin, wait_for};

/// Bound of the whole demo run (it takes about 40 s on an idle machine).
const DEMO_TIMEOUT: Duration = Duration::from_secs(240);

/// Makes a test directory enterable by the `postgres` user.
fn open_to_postgres(dir: &TestDir) -> Result<()> {
    std::fs::set_permissions(dir.join(""), std::fs::Permissions::from_mode(0o755))?;
    Ok(())
}

/// Processes whose command line names something under `dir`.
fn processes_under(dir: &Path) -> Vec<String> {
    let needle = dir.display().to_string();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_str()
                .is_some_and(|n| n.parse::<u32>().is_ok())
        })
        .filter_map(|e| {
            let raw = std::fs::read(e.path().join("cmdline")).ok()?;
            let line = String::from_utf8_lossy(&raw).replace('\0', " ");
            line.contains(&needle)
                .then(|| format!("{}: {line}", e.file_name().display()))
        })
        .collect()
}

/// The number after `label` on the report line that holds it.
fn figure(report: &str, label: &str) -> Option<f64> {
    report
        .lines()
        .find_map(|l| l.trim().strip_prefix(label))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
}

/// Runs `ballast demo ARGS` as a user does, in a directory of its own;
/// returns the cluster (to check what is left), the whole output and the
/// report after `REPORT`, once every check passed.
fn run_demo(name: &str, args: &[&str]) -> Result<(Cluster, String, String)> {
    sweep_orphans();
    let dir = TestDir::new(name);
    mark_owner(&dir)?;
    open_to_postgres(&dir)?;
    // Dropped last: `cluster down` on the demo's directory even if the
    // demo could not clean up after itself.
    let cluster = Cluster {
        path: dir.join("cluster"),
        dir,
    };
    let output = cluster.dir.join("demo.out");
    let mut demo = Child::spawn(
        "ballast demo",
        Command::new(bin("ballast"))
            .arg("demo")
            .args(args)
            .arg("--dir")
            .arg(&cluster.path)
            .args(["--pgbench-seconds", "6", "--scale", "2"]),
        &output,
    )?;
    let status = match demo.wait_timeout(DEMO_TIMEOUT) {
        Ok(status) => status,
        Err(err) => {
            // SIGTERM lets the demo clean up before the drop kills it.
            let _ = demo.signal(Signal::SIGTERM);
            let _ = demo.wait_timeout(Duration::from_secs(90));
            bail!(
                "{err}; output:\n{}",
                std::fs::read_to_string(&output).unwrap_or_default()
            );
        }
    };
    let text = std::fs::read_to_string(&output)?;
    assert!(status.success(), "ballast demo failed ({status}):\n{text}");

    let report = text
        .split_once("REPORT")
        .map(|(_, r)| r.to_string())
        .with_context(|| format!("no report:\n{text}"))?;
    let checks: Vec<&str> = report
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("PASS") || l.starts_with("FAIL"))
        .collect();
    assert!(checks.len() >= 5, "every check is reported:\n{report}");
    assert!(
        checks.iter().all(|c| c.starts_with("PASS")),
        "every check passes:\n{report}"
    );
    assert!(report.contains("RESULT: PASS"), "{report}");
    Ok((cluster, text, report))
}

/// Nothing of the demo is left: no mount, loop device or process.
fn nothing_left(cluster: &Cluster) {
    assert_eq!(mounts_under(&cluster.path), Vec::<String>::new());
    assert_eq!(loops_under(&cluster.path), Vec::<String>::new());
    assert_eq!(processes_under(&cluster.path), Vec::<String>::new());
}

#[test]
fn the_demo_passes_every_check_with_measured_numbers() -> Result<()> {
    let (cluster, text, report) = run_demo("demo", &[])?;
    let report = report.as_str();
    assert!(
        report
            .lines()
            .filter(|l| l.trim().starts_with("PASS"))
            .count()
            >= 7,
        "every check is reported:\n{report}"
    );
    for label in [
        "TPS before the fault:",
        "TPS during the fault:",
        "TPS after the rebuild:",
    ] {
        let tps = figure(report, label).with_context(|| format!("{label} in\n{report}"))?;
        assert!(tps > 0.0, "{label} {tps}\n{report}");
    }
    assert!(
        figure(report, "longest stall:").is_some(),
        "the longest stall is measured:\n{report}"
    );
    assert!(
        text.contains("back in sync") && text.contains("SIGKILL the agent of node-2"),
        "the steps are shown:\n{text}"
    );
    nothing_left(&cluster);
    Ok(())
}

#[test]
fn the_snapshot_demo_restores_postgres_from_a_frozen_group_snapshot() -> Result<()> {
    let (cluster, text, report) = run_demo("demo-snapshot", &["snapshot"])?;
    for volume in ["pvc-pg-data", "pvc-pg-wal"] {
        let line = report
            .lines()
            .find(|l| l.trim().starts_with(volume))
            .with_context(|| format!("no line of {volume} in\n{report}"))?;
        line.split_once("writes held: ")
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .and_then(|n| n.parse::<u64>().ok())
            .with_context(|| format!("no paused window in {line:?}"))?;
        assert!(line.contains(", frozen,"), "{line}");
    }
    assert!(report.contains("stall at the cut: "), "{report}");
    assert!(
        text.contains("CreateVolumeGroupSnapshot grp-pg-demo"),
        "the steps are shown:\n{text}"
    );
    nothing_left(&cluster);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_recovers_every_commit_on_node_2_after_its_nodes_agent_dies() -> Result<()> {
    const VOLUME: &str = "pvc-pg-target-fault";
    let cluster = Cluster::up("demo-target-fault", 3, "embedded", &[])?;
    let info = cluster.info()?;
    let mut kubelet = kubelet(&cluster).await?;
    let volume = kubelet.create_volume(VOLUME, 768 << 20, 3, "ext4").await?;
    let context = kubelet.controller_publish(&volume, "node-1").await?;
    let first = kubelet.attachment(VOLUME, "node-1", "postgres-0");
    kubelet.node_publish(&volume, &context, &first).await?;

    let pg = Instance::new(
        &first.target_path.join("pgdata"),
        &cluster.dir.join("pg"),
        &cluster.dir.join("postgres.log"),
    )?;
    pg.init().await?;
    let server = pg.start().await?;
    let load = committing_load(&pg, &cluster, Duration::from_secs(120)).await?;

    // The node where PostgreSQL runs loses its agent: the volume's target
    // and node-1's replica die with it.
    let node1 = info
        .nodes
        .iter()
        .find(|n| n.node_id == "node-1")
        .context("node-1")?;
    node1.process.signal(Signal::SIGKILL)?;
    assert!(
        node1.process.wait_exit(Duration::from_secs(10)),
        "node-1's agent is gone"
    );
    // PostgreSQL's I/O now fails (or hangs); let it meet the failure, then
    // end every process of the instance, as a node's death would.
    tokio::time::sleep(Duration::from_secs(2)).await;
    server.kill().await?;
    let outcome = load.finish(Duration::from_secs(120)).await?;
    let committed = outcome
        .processed
        .with_context(|| format!("pgbench printed no count: {:?}", outcome.errors))?;
    assert!(
        committed > 0,
        "pgbench committed transactions before the fault"
    );

    // kubelet on node-1 tears the pod's volume down through the node
    // plugin, although the export under it is dead.
    kubelet.node_unpublish(&first).await?;
    for path in [&first.target_path, &first.staging_path] {
        assert_eq!(
            mounts_under(path),
            Vec::<String>::new(),
            "{}",
            path.display()
        );
    }
    // The attacher moves the volume: ControllerUnpublishVolume from the
    // dead node, ControllerPublishVolume on node-2.
    kubelet.controller_unpublish(VOLUME, "node-1").await?;
    let context = kubelet.controller_publish(&volume, "node-2").await?;
    let second = kubelet.attachment(VOLUME, "node-2", "postgres-0");
    kubelet.node_publish(&volume, &context, &second).await?;

    // PostgreSQL recovers from its WAL on node-2.
    let pg = pg.with_data_dir(&second.target_path.join("pgdata"))?;
    let server = pg.start().await?;
    // The old target died uncleanly, so the new one kept its own replica
    // and rebuilds node-3's from it (an unacknowledged write may have
    // reached one of them only); node-1's replica waits for its node.
    let shown = cluster.volume(VOLUME)?;
    assert_eq!(shown["target_node_id"], "node-2", "{shown}");
    wait_for(
        "node-2 and node-3 in sync, node-1 not",
        Duration::from_secs(120),
        || {
            cluster.replica_states(VOLUME).ok().filter(|states| {
                states
                    .iter()
                    .all(|(node, state)| (state == "in-sync") == (node != "node-1"))
            })
        },
    )?;
    let rows = history(&pg).await?;
    assert!(
        rows >= committed,
        "every transaction pgbench saw committed is there: {rows} rows, {committed} committed"
    );
    eprintln!(
        "after failover: {rows} rows in pgbench_history, {committed} committed by pgbench (exit code {:?}, first error {:?})",
        outcome.exit_code,
        outcome.errors.first()
    );
    let amcheck = pg.amcheck().await?;
    assert!(
        !amcheck.corrupt && amcheck.relations > 0,
        "pg_amcheck: {amcheck:?}"
    );
    let recovered = wait_for(
        "the recovery to show in the server log",
        Duration::from_secs(10),
        || {
            std::fs::read_to_string(pg.log())
                .ok()
                .filter(|log| log.contains("database system was not properly shut down"))
        },
    );
    assert!(recovered.is_ok(), "PostgreSQL ran crash recovery");

    server.stop().await?;
    kubelet.node_unpublish(&second).await?;
    kubelet.controller_unpublish(VOLUME, "node-2").await?;
    Ok(())
}
