//! The raw export path (`ballast export start`) and fencing (DESIGN.md,
//! invariants 3 and 4): a replica of a volume is written only by its
//! volume's target, never through a raw export; a standalone replica that
//! is exported can never be taken over by a volume.

use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use ballast_proto::agent::target_service_client::TargetServiceClient;
use ballast_proto::agent::{StartTargetRequest, TargetReplica};

use crate::harness::{Agent, GIB, PoolFile, TestDir, free_port, run, run_ok};

const T: Duration = Duration::from_secs(120);

/// Writes 64 KiB of `pattern` at offset 0 of `uri` with qemu-io; true when
/// the write was acknowledged.
fn qemu_write(uri: &str, pattern: u8) -> Result<bool> {
    let out = run(
        Command::new("qemu-io")
            .args(["-f", "raw", "-c"])
            .arg(format!("write -P {pattern:#x} 0 64k"))
            .arg(uri),
        T,
    )?;
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(out.status.success() && text.contains("wrote"))
}

/// Checks with qemu-io that `uri` holds 64 KiB of `pattern` at offset 0.
fn qemu_holds(uri: &str, pattern: u8) -> Result<bool> {
    let out = run_ok(
        Command::new("qemu-io")
            .args(["-f", "raw", "-c"])
            .arg(format!("read -P {pattern:#x} 0 64k"))
            .arg(uri),
        T,
    )?;
    Ok(!out.contains("Pattern verification failed"))
}

/// Asks the agent to export `name` on `socket` (and TCP); returns the
/// CLI's output when refused, or `None` when the export started.
fn export_refusal(agent: &Agent, name: &str, socket: &std::path::Path) -> Result<Option<String>> {
    let out = agent.cli(&[
        "export",
        "start",
        name,
        "--socket",
        &socket.to_string_lossy(),
        "--tcp",
        "127.0.0.1:0",
    ])?;
    if out.status.success() {
        return Ok(None);
    }
    Ok(Some(format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )))
}

#[test]
fn a_volume_replica_is_never_written_through_a_raw_export() -> Result<()> {
    let dir = TestDir::new("export-fence");
    let data = format!("127.0.0.1:{}", free_port());
    let agent = Agent::start_with(
        &dir,
        vec![PoolFile {
            path: dir.join("pool0.img"),
            size_bytes: GIB,
        }],
        &["--data-listen", &data, "--node-id", "node-1"],
    )?;
    agent.cli_ok(&[
        "replica",
        "create",
        "vol-f",
        "--size",
        "64MiB",
        "--thin",
        "--volume-id",
        "vol-f",
    ])?;
    let raw = dir.join("raw.sock");
    let raw_uri = format!("nbd+unix:///vol-f?socket={}", raw.display());

    // Created for a volume, not yet published (epoch 0): refused.
    let refused = export_refusal(&agent, "vol-f", &raw)?;
    let why = refused.context("a replica of volume vol-f was exported")?;
    ensure!(
        why.contains("FAILED_PRECONDITION") || why.contains("FailedPrecondition"),
        "{why}"
    );
    ensure!(why.contains("belongs to volume"), "{why}");
    ensure!(!qemu_write(&raw_uri, 0xbb)?, "a raw export took a write");

    // Held by a target at epoch 1: still refused, and the target's data
    // is the target's.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let target = runtime.block_on(async {
        let mut client = TargetServiceClient::connect(format!("http://{}", agent.grpc)).await?;
        let target = client
            .start_target(StartTargetRequest {
                volume_id: "vol-f".into(),
                epoch: 1,
                size_bytes: 64 << 20,
                socket_path: String::new(),
                replicas: vec![TargetReplica {
                    node_id: "node-1".into(),
                    replica_name: "vol-f".into(),
                    data_address: data.clone(),
                    in_sync: true,
                    ..Default::default()
                }],
                // Never called: no replica fails in these tests.
                controller_address: "http://127.0.0.1:1".into(),
            })
            .await?
            .into_inner();
        anyhow::Ok(target)
    })?;
    ensure!(
        qemu_write(&target.nbd_uri, 0xaa)?,
        "the target refused a write"
    );
    let refused = export_refusal(&agent, "vol-f", &raw)?;
    ensure!(refused.is_some(), "a replica held by a target was exported");
    ensure!(!qemu_write(&raw_uri, 0xbb)?, "a raw export took a write");
    ensure!(
        qemu_holds(&target.nbd_uri, 0xaa)?,
        "the volume's data was overwritten around its target"
    );
    Ok(())
}

#[test]
fn an_exported_standalone_replica_cannot_join_a_volume() -> Result<()> {
    let dir = TestDir::new("export-standalone");
    let data = format!("127.0.0.1:{}", free_port());
    let agent = Agent::start_with(
        &dir,
        vec![PoolFile {
            path: dir.join("pool0.img"),
            size_bytes: GIB,
        }],
        &["--data-listen", &data, "--node-id", "node-1"],
    )?;
    let raw = dir.join("raw.sock");
    let uri = agent.create_export("vol-s", "64MiB", &raw, true)?;
    ensure!(
        qemu_write(&uri, 0xcc)?,
        "a standalone export refused a write"
    );

    // A volume of the same name claims it: the controller's create and a
    // target both find no replica of theirs.
    let create = agent.cli(&[
        "replica",
        "create",
        "vol-s",
        "--size",
        "64MiB",
        "--thin",
        "--volume-id",
        "vol-s",
    ])?;
    ensure!(
        !create.status.success(),
        "the standalone replica was taken over by volume vol-s"
    );
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let started = runtime.block_on(async {
        let mut client = TargetServiceClient::connect(format!("http://{}", agent.grpc)).await?;
        let started = client
            .start_target(StartTargetRequest {
                volume_id: "vol-s".into(),
                epoch: 1,
                size_bytes: 64 << 20,
                socket_path: String::new(),
                replicas: vec![TargetReplica {
                    node_id: "node-1".into(),
                    replica_name: "vol-s".into(),
                    data_address: data.clone(),
                    in_sync: true,
                    ..Default::default()
                }],
                // Never called: no replica fails in these tests.
                controller_address: "http://127.0.0.1:1".into(),
            })
            .await;
        anyhow::Ok(started)
    })?;
    if let Ok(target) = started {
        let target = target.into_inner();
        ensure!(
            !qemu_write(&target.nbd_uri, 0xdd)?,
            "a target wrote the exported standalone replica"
        );
    }
    // The export still serves the replica as it was, at epoch 0.
    ensure!(qemu_holds(&uri, 0xcc)?, "the standalone replica changed");
    ensure!(qemu_write(&uri, 0xee)?, "the export was fenced");
    let replicas = agent.cli_json(&["replica", "list"])?;
    let epoch = replicas
        .as_array()
        .and_then(|list| list.iter().find(|r| r["name"] == "vol-s"))
        .map(|r| r["epoch"].as_u64().unwrap_or(0));
    ensure!(
        epoch == Some(0),
        "the replica's epoch was raised: {replicas}"
    );
    Ok(())
}
