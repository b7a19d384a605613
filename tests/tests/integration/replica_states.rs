//! Replica states that tell the truth, through a real local cluster: an
//! agent holding a replica of a published volume is SIGKILLed under fio
//! writes and not restarted; `ballast volume show -o json` and the CSI
//! VolumeCondition (ControllerGetVolume over the controller's CSI socket)
//! must report that replica's node as down, with how long and when the
//! replica is replaced, never as rebuilding (docs/operations.md).
//!
//! The heartbeat timeout is longer than the time the target takes to drop
//! the replica, so the repair reconciler hands the replica to the target
//! for a rebuild while its node still counts as up: the record then says
//! rebuilding, which is what `volume show` used to print for minutes. The
//! `Cluster` fixture stops everything on drop; every wait is bounded.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use ballast_proto::csi;
use ballast_proto::csi::controller_client::ControllerClient;
use nix::sys::signal::Signal;
use serde_json::Value;

use crate::harness::cluster::Cluster;
use crate::harness::csi::channel;
use crate::harness::{fio, wait_for};

/// The killed node.
const LOST: &str = "node-3";

/// The controller's `--node-down-after`: long enough that the replica is
/// not replaced while the test looks at it.
const NODE_DOWN_AFTER_MS: i64 = 600_000;

/// `LOST`'s replica as `volume show -o json` prints it.
fn lost_replica(cluster: &Cluster) -> Result<Value> {
    let shown = cluster.volume("vol")?;
    shown["replicas"]
        .as_array()
        .context("replicas is an array")?
        .iter()
        .find(|r| r["node_id"] == LOST)
        .cloned()
        .with_context(|| format!("no replica on {LOST}: {shown}"))
}

fn int(value: &Value, field: &str) -> i64 {
    // prost's int64 fields are serialised as JSON numbers.
    value[field].as_i64().unwrap_or_default()
}

#[tokio::test]
async fn a_sigkilled_replica_agent_is_shown_down_not_rebuilding() -> Result<()> {
    let cluster = Cluster::up(
        "replica-states",
        3,
        "embedded",
        &["--heartbeat-timeout", "20s", "--node-down-after", "10m"],
    )?;
    cluster.wait_all_up(3)?;
    cluster.cli_ok(&[
        "volume",
        "create",
        "vol",
        "--size",
        "256MiB",
        "--replicas",
        "3",
        "--thin",
    ])?;
    let uri = cluster.cli_ok(&["volume", "publish", "vol", "--node", "node-1"])?;
    let mut ctl = ControllerClient::new(channel(&cluster.path.join("csi.sock")).await?);

    let mut fio = fio::start(&cluster.dir, uri.trim(), "fio-states.log")?;
    std::thread::sleep(Duration::from_secs(2));
    let info = cluster.info()?;
    let process = info
        .nodes
        .iter()
        .find(|n| n.node_id == LOST)
        .context("no node-3")?
        .process
        .clone();
    process.signal(Signal::SIGKILL)?;

    // The target drops the replica; its node still counts as up.
    wait_for(
        "node-3's replica to leave the in-sync set",
        Duration::from_secs(60),
        || {
            lost_replica(&cluster)
                .ok()
                .filter(|r| r["sync_state"] != "in-sync")
        },
    )?;
    fio::assert_clean(&cluster.dir, &mut fio, "fio-states.log")?;

    // Once the heartbeat timeout passes, the replica is shown down, with
    // when its node went silent and when it is replaced.
    // The sync states the record went through meanwhile, for the logs and
    // failure messages (whether the reconciler started a rebuild before
    // the heartbeat timeout depends on timing).
    let mut seen: Vec<String> = Vec::new();
    let replica = wait_for(
        "node-3's replica to be shown down",
        Duration::from_secs(90),
        || {
            let replica = lost_replica(&cluster).ok()?;
            let sync = replica["sync_state"].as_str().unwrap_or_default();
            if seen.last().map(String::as_str) != Some(sync) {
                seen.push(sync.to_string());
            }
            (replica["state"] == "node-down").then_some(replica)
        },
    )?;
    eprintln!("node-3's recorded sync states until it was shown down: {seen:?}");
    ensure!(replica["node_state"] == "down", "{replica} after {seen:?}");
    let since = int(&replica, "node_down_since_unix_ms");
    ensure!(since > 0, "the node's silence has a start: {replica}");
    ensure!(
        int(&replica, "replace_at_unix_ms") == since + NODE_DOWN_AFTER_MS,
        "the replacement time is the silence's start plus --node-down-after: {replica}"
    );

    // The record stops claiming a rebuild the live target does not run.
    wait_for(
        "node-3's recorded sync state to be faulted",
        Duration::from_secs(60),
        || {
            lost_replica(&cluster)
                .ok()
                .filter(|r| r["sync_state"] == "faulted")
        },
    )?;
    let replica = lost_replica(&cluster)?;
    ensure!(replica["state"] == "node-down", "{replica}");

    let shown = cluster.volume("vol")?;
    let detail = shown["status_detail"].as_str().unwrap_or_default();
    ensure!(
        detail.contains("Replica on node-3 is down") && !detail.contains("rebuilding"),
        "{shown}"
    );
    let table = cluster.cli_ok(&["volume", "show", "vol"])?;
    let row = table
        .lines()
        .find(|l| l.trim_start().starts_with(LOST))
        .with_context(|| format!("no row for {LOST}: {table}"))?;
    ensure!(
        row.contains("node-down") && row.contains("replaced in") && !row.contains("rebuilding"),
        "{table}"
    );

    let condition = ctl
        .controller_get_volume(csi::ControllerGetVolumeRequest {
            volume_id: "vol".into(),
        })
        .await?
        .into_inner()
        .status
        .and_then(|s| s.volume_condition)
        .context("ControllerGetVolume has no volume_condition")?;
    ensure!(condition.abnormal, "{condition:?}");
    ensure!(
        condition.message.contains("2 of 3")
            && condition.message.contains("replica on node-3 is down")
            && condition.message.contains("replaced on another node in")
            && !condition.message.contains("rebuilding"),
        "{condition:?}"
    );
    Ok(())
}
